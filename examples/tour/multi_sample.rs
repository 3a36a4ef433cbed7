//! Multi-sample dropout and weighted cross-entropy in the tour (`dropfuse::multi_sample`): the `K`
//! masked copies with their masks, the dh reduction from the stored masks and with the masks
//! regenerated (bit for bit against their `f32` formulas), then on `K` logit sets the averaged
//! logits (bit for bit) and the weighted cross-entropy, loss and gradient and loss only (within
//! the documented bounds of the `f64` reference).

use dropfuse::half::{bf16, f16};
use dropfuse::multi_sample::{check_labels, masks_len, mean_logits, MultiSample, WeightedCrossEntropy};
use dropfuse::reference::multi_sample::{masked_copies, DEFAULT_IGNORE_INDEX};
use dropfuse::{Device, Element, Generator, PhiloxState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::multi_sample::{self as check, widen, CeProblem};
use crate::checks::Checks;
use crate::{
    counter_mismatches, download, element_mismatches, print_check_header, print_checks, push_rows,
    random_input, time_copy, time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// `k` samples of `b x d` features (the copies), `k` logit sets of `b x c` (the loss).
#[derive(Debug, Clone, Copy)]
struct Shape {
    k: usize,
    b: usize,
    d: usize,
    c: usize,
}

/// The benchmark shapes: K = 8 copies of 1024 x 2048 features, 8 logit sets of
/// 1024 x 1000.
const FULL: Shape = Shape {
    k: 8,
    b: 1024,
    d: 2048,
    c: 1000,
};
const SMALL: Shape = Shape {
    k: 4,
    b: 24,
    d: 67,
    c: 37,
};

/// Drop probability and label smoothing.
const P: f64 = 0.1;
const EPS: f64 = 0.1;

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "K = {}, copies of B x D = {} x {}, p = {P}; logits K x B x C = {} x {} x {}, smoothing {EPS}, \
             every 9th row ignored",
            self.k, self.b, self.d, self.k, self.b, self.c
        )
    }

    /// Uniform weights, labels `37 i mod C`, every ninth row ignored.
    fn problem(&self) -> CeProblem {
        CeProblem {
            k: self.k,
            b: self.b,
            c: self.c,
            weights: vec![1.0 / self.k as f64; self.k],
            labels: (0..self.b)
                .map(|i| {
                    if i % 9 == 4 {
                        DEFAULT_IGNORE_INDEX
                    } else {
                        (37 * i % self.c) as i64
                    }
                })
                .collect(),
            ignore_index: DEFAULT_IGNORE_INDEX,
            label_smoothing: EPS,
        }
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!("multi-sample dropout: {}", shape(scale).label())]
}

/// Logits uniform in `[-8, 8)` (the documented bounds hold up to magnitudes of about 10).
fn logits<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-8.0f32..8.0)))
        .collect()
}

fn gpu(dev: &Device, scale: Scale, rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    gpu_dtype::<f16>(dev, s, rng.next_streams(s.k as u64), 41, rows)?;
    gpu_dtype::<bf16>(dev, s, rng.next_streams(s.k as u64), 42, rows)?;
    gpu_dtype::<f32>(dev, s, rng.next_streams(s.k as u64), 43, rows)
}

fn gpu_dtype<T: Element>(
    dev: &Device,
    shape: Shape,
    state: PhiloxState,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let Shape { k, b, d, c } = shape;
    let (n, nz) = (b * d, k * b * c);
    let size = T::DTYPE.size() as u64;
    let dtype = T::DTYPE.name();
    let s = dev.stream();
    let ms = MultiSample::new(k, P)?;

    // Masked copies and the dh reduction.
    let h: Vec<T> = random_input(n, seed);
    let grads: Vec<T> = random_input(k * n, seed ^ 0x9d);
    let want = masked_copies(&h, k, P, state)?;
    let want_masks = check::sample_masks(k, P, state, n)?;
    let want_dh: Vec<T> = check::reduce_model(&grads, &want_masks, ms.scale(), n);

    let hd = dev.upload(&h)?;
    let gd = dev.upload(&grads)?;
    let mut copies = dev.zeros::<T>(k * n)?;
    let mut masks = dev.zeros::<u32>(masks_len(k, n))?;
    ms.copies_with_masks(s, state, &hd, &mut copies, &mut masks)?;
    let got = download(dev, &copies)?;
    let copies_bad = (0..k)
        .map(|i| element_mismatches(&got[i * n..(i + 1) * n], &want.copies[i]))
        .sum::<usize>()
        + counter_mismatches(&dev.download(&masks)?, &want_masks);

    let mut dh = dev.zeros::<T>(n)?;
    ms.reduce(s, &masks, &gd, &mut dh)?;
    let reduce_bad = element_mismatches(&download(dev, &dh)?, &want_dh);
    let mut dh2 = dev.zeros::<T>(n)?;
    ms.reduce_maskless(s, state, &gd, &mut dh2)?;
    let reduce_ml_bad = element_mismatches(&download(dev, &dh2)?, &want_dh);

    let words = 4 * masks_len(k, n) as u64;
    let copy_ms = time_copy(dev, &copies)?;
    let copies_ms = time_ms(dev, || {
        ms.copies_with_masks(s, state, &hd, &mut copies, &mut masks)
    })?;
    let reduce_ms = time_ms(dev, || ms.reduce(s, &masks, &gd, &mut dh))?;
    let reduce_ml_ms = time_ms(dev, || ms.reduce_maskless(s, state, &gd, &mut dh2))?;
    let kn = (k * n) as u64 * size;
    let table = [
        (
            "multi_sample_copies",
            copies_bad,
            copies_ms,
            n as u64 * size + kn + words,
        ),
        (
            "multi_sample_reduce",
            reduce_bad,
            reduce_ms,
            kn + words + n as u64 * size,
        ),
        (
            "multi_sample_reduce_maskless",
            reduce_ml_bad,
            reduce_ml_ms,
            kn + n as u64 * size,
        ),
    ];
    push_rows(rows, dtype, k * n, (copy_ms, 2 * kn), table);

    // The averaged logits and the weighted cross-entropy on K logit sets.
    let problem = shape.problem();
    let z: Vec<T> = logits(nz, seed ^ 0x2e);
    let want_mean: Vec<T> = check::mean_model(&z, k, b * c);
    let want_ce = problem.reference(&widen(&z))?;
    let ce = WeightedCrossEntropy::uniform(k)?.with_label_smoothing(EPS)?;
    let zd = dev.upload(&z)?;
    let ld = dev.upload(&problem.labels)?;
    let mut mean = dev.zeros::<T>(b * c)?;
    mean_logits(s, k, &zd, &mut mean)?;
    let mean_bad = element_mismatches(&download(dev, &mean)?, &want_mean);

    let mut loss = dev.zeros::<f32>(1)?;
    let mut dz = dev.zeros::<T>(nz)?;
    let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b))?;
    ce.forward(s, &zd, b, c, &ld, &mut loss, &mut dz, &mut scratch)?;
    let n_valid = check_labels(s, &scratch, c, ce.ignore_index())?;
    let got_loss = dev.download(&loss)?[0];
    let dz_host = widen(&download(dev, &dz)?);
    let ce_bad = problem
        .within_bounds(f64::from(got_loss), Some(&dz_host), &want_ce, T::DTYPE)
        .len()
        + usize::from(n_valid as usize != problem.n_valid());
    let mut loss2 = dev.zeros::<f32>(1)?;
    ce.loss(s, &zd, b, c, &ld, &mut loss2, &mut scratch)?;
    let got_loss2 = dev.download(&loss2)?[0];
    let loss_bad = problem
        .within_bounds(f64::from(got_loss2), None, &want_ce, T::DTYPE)
        .len()
        + usize::from(got_loss2.to_bits() != got_loss.to_bits());

    let zbytes = nz as u64 * size;
    let copy_ms = time_copy(dev, &zd)?;
    let mean_ms = time_ms(dev, || mean_logits(s, k, &zd, &mut mean))?;
    let ce_ms = time_ms(dev, || {
        ce.forward(s, &zd, b, c, &ld, &mut loss, &mut dz, &mut scratch)
    })?;
    let loss_ms = time_ms(dev, || ce.loss(s, &zd, b, c, &ld, &mut loss2, &mut scratch))?;
    let labels = 8 * b as u64;
    let table = [
        (
            "multi_sample_mean",
            mean_bad,
            mean_ms,
            zbytes + (b * c) as u64 * size,
        ),
        ("weighted_ce_fwd_bwd", ce_bad, ce_ms, 2 * zbytes + labels),
        ("weighted_ce_loss", loss_bad, loss_ms, zbytes + labels),
    ];
    push_rows(rows, dtype, nz, (copy_ms, 2 * zbytes), table);
    Ok(())
}

fn cpu(scale: Scale, rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!("CPU reference: multi-sample dropout: {}\n", s.label());
    print_check_header();
    // The last state's offsets wrap around 2^64 between the samples.
    let mut ok = cpu_dtype::<f16>(s, rng.next_streams(s.k as u64), 41)?;
    ok &= cpu_dtype::<bf16>(s, rng.next_streams(s.k as u64), 42)?;
    ok &= cpu_dtype::<f32>(s, PhiloxState::new(43, u64::MAX - 1), 43)?;
    Ok(ok)
}

/// The multi-sample references' self-checks for dtype `T`; prints one row each.
fn cpu_dtype<T: Element>(shape: Shape, state: PhiloxState, seed: u64) -> BoxResult<bool> {
    let Shape { k, b, d, c } = shape;
    let n = b * d;
    let h: Vec<T> = random_input(n, seed);
    let z: Vec<T> = logits(k * b * c, seed ^ 0x2e);
    let mut checks = Checks::new();
    let samples = check::check_copies(&mut checks, &h, k, P, state)?;
    // Keep rate of every sample within 6 sigma of 1 - p.
    let sigma = (P * (1.0 - P) / n as f64).sqrt();
    let rates: Vec<f64> = samples
        .keep
        .iter()
        .map(|flags| flags.iter().filter(|&&f| f).count() as f64 / n as f64)
        .collect();
    checks.check(
        format!("keep rate of each sample 1 - p +- 6 sigma ({:.3})", 6.0 * sigma),
        rates.iter().all(|r| (r - (1.0 - P)).abs() <= 6.0 * sigma),
    );
    checks.check(
        "the K samples' masks differ",
        (1..k).all(|i| samples.keep[i] != samples.keep[0]),
    );
    check::check_mean_model::<T, T>(&mut checks, &z, k, b * c);
    check::check_mean_model::<T, f32>(&mut checks, &z, k, b * c);
    checks.prefix("CE uniform");
    check::check_cross_entropy(&mut checks, &widen(&z), &shape.problem())?;
    let mut weighted = shape.problem();
    let total: f64 = (1..=k).map(|i| i as f64).sum();
    weighted.weights = (1..=k).map(|i| i as f64 / total).collect();
    weighted.label_smoothing = 0.0;
    checks.prefix("CE weights 1..K, eps 0");
    check::check_cross_entropy(&mut checks, &widen(&z), &weighted)?;
    Ok(print_checks(T::DTYPE.name(), n, &checks))
}
