//! Multi-sample dropout and weighted cross-entropy cases (`dropfuse::multi_sample` against
//! `dropfuse::reference::multi_sample` and the `f32` formulas `dropfuse::multi_sample` documents).
//!
//! Kernels, bit for bit: `multi_sample_copies` and `multi_sample_copies_masks` (the `K` copies of
//! `h`, sample `k` on the Philox stream `offset + k`, and their masks), `multi_sample_reduce`
//! (from stored masks) and `multi_sample_reduce_maskless` (masks regenerated), `multi_sample_mean`
//! (the averaged logits). Within the documented bounds of the `f64` reference: `weighted_ce`
//! (loss and logits' gradient) and `weighted_ce_loss` (the loss alone, which must also equal the
//! full call's loss bit for bit). Keys besides `dtype`, `kernel` and `data`:
//!
//! * copies and reductions: `n` (elements of `h` / `dh`), `k` (samples), `p`, `seed`, `offset`;
//!   the reductions' `dtype` is the gradients' and `out` the type of `dh` (any); the mean's `n` is
//!   its length, `k` the logit sets and `out` the mean's type (`dtype` or `f32`);
//! * cross-entropy: `shape` (`KxBxC`), `eps` (label smoothing), `labels` (`all` valid, `some`
//!   ignored, `ignored`: every row, `bad`: one to three labels neither in `[0, C)` nor the ignore
//!   index, so the call must write nothing and `check_labels` must name the first of them), `ii`
//!   (the ignore index), `weights` (`uniform` or `random`), `out` (the gradient's type, `dtype` or
//!   `f32`; not for `weighted_ce_loss`); logits uniform in `[-8, 8)` (the bounds hold up to about
//!   10), `gap`: when positive, each row's label logit (class 0 for an
//!   ignored or bad label) is set to the row's largest logit plus `gap` (confidently classified
//!   rows, where `1 - p_y` is tiny and the label's gradient must keep its digits);
//! * `xo`, `yo`, `mo`: view offsets of the input (`h`, gradients, logits), of the output (copies,
//!   `dh`, mean, `dz`) and of the masks (words).
//!
//! Without a GPU the case runs the references through `examples/checks/multi_sample.rs`: the
//! copies and the masks both reductions use, the mean's formula within its rounding bound, the
//! cross-entropy's formulas, finite differences and zero row sums, or the rejection of bad labels.

use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::multi_sample::{
    check_labels, masks_len, mean_logits, MultiSample, WeightedCrossEntropy, MAX_K,
};
use dropfuse::reference::multi_sample::{masked_copies, DEFAULT_IGNORE_INDEX};
use dropfuse::{DType, Device, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::multi_sample::{self as check, widen, CeProblem};
use crate::checks::Checks;
use crate::labels::{draw_rows, Labels};
use crate::{
    compare, dims_text, draw_p, draw_u64, padded, parse_dims, parse_dtype, sentinel, values, Case, Fields,
    FuzzElement, Kernel, Spec as CaseSpec, MASK_SENTINEL,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Copies,
    CopiesMasks,
    Reduce,
    ReduceMaskless,
    Mean,
    Ce,
    CeLoss,
}

const COPIES_KEYS: [&str; 10] = [
    "dtype", "kernel", "n", "k", "p", "seed", "offset", "xo", "yo", "data",
];
const COPIES_MASKS_KEYS: [&str; 11] = [
    "dtype", "kernel", "n", "k", "p", "seed", "offset", "xo", "yo", "mo", "data",
];
const REDUCE_KEYS: [&str; 12] = [
    "dtype", "kernel", "n", "k", "p", "seed", "offset", "out", "xo", "yo", "mo", "data",
];
const REDUCE_MASKLESS_KEYS: [&str; 11] = [
    "dtype", "kernel", "n", "k", "p", "seed", "offset", "out", "xo", "yo", "data",
];
const MEAN_KEYS: [&str; 8] = ["dtype", "kernel", "n", "k", "out", "xo", "yo", "data"];
const CE_KEYS: [&str; 12] = [
    "dtype", "kernel", "shape", "eps", "labels", "ii", "weights", "gap", "out", "xo", "yo", "data",
];
const CE_LOSS_KEYS: [&str; 10] = [
    "dtype", "kernel", "shape", "eps", "labels", "ii", "weights", "gap", "xo", "data",
];

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Copies,
        Op::CopiesMasks,
        Op::Reduce,
        Op::ReduceMaskless,
        Op::Mean,
        Op::Ce,
        Op::CeLoss,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::Copies => "multi_sample_copies",
            Op::CopiesMasks => "multi_sample_copies_masks",
            Op::Reduce => "multi_sample_reduce",
            Op::ReduceMaskless => "multi_sample_reduce_maskless",
            Op::Mean => "multi_sample_mean",
            Op::Ce => "weighted_ce",
            Op::CeLoss => "weighted_ce_loss",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Op::Copies => &COPIES_KEYS,
            Op::CopiesMasks => &COPIES_MASKS_KEYS,
            Op::Reduce => &REDUCE_KEYS,
            Op::ReduceMaskless => &REDUCE_MASKLESS_KEYS,
            Op::Mean => &MEAN_KEYS,
            Op::Ce => &CE_KEYS,
            Op::CeLoss => &CE_LOSS_KEYS,
        }
    }
    fn is_ce(self) -> bool {
        matches!(self, Op::Ce | Op::CeLoss)
    }
}

/// The multi-sample part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// Samples / logit sets `K`.
    k: usize,
    /// Cross-entropy rows and classes (0 otherwise).
    b: usize,
    c: usize,
    /// The output type: `dh`, the mean, the logits' gradient.
    out: DType,
    eps: f64,
    labels: Labels,
    ignore_index: i64,
    /// Random weights (else uniform).
    random_weights: bool,
    /// The label logit's lead over the row's largest logit (0: logits left uniform).
    gap: u32,
}

impl Spec {
    /// The logits of a cross-entropy case (the other cases' `n` is a key).
    pub fn numel(&self) -> usize {
        self.k * self.b * self.c
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "k" => self.k.to_string(),
            "shape" => dims_text(&[self.k, self.b, self.c]),
            "out" => self.out.name().to_string(),
            // `{:?}` of an f64 is the shortest string that parses back to the same bits.
            "eps" => format!("{:?}", self.eps),
            "labels" => self.labels.name().to_string(),
            "ii" => self.ignore_index.to_string(),
            "weights" => if self.random_weights { "random" } else { "uniform" }.to_string(),
            "gap" => self.gap.to_string(),
            _ => unreachable!("multi-sample cases have no key {key}"),
        }
    }

    pub fn parse(op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let keys = op.keys();
        let dtype = parse_dtype("dtype", f.get("dtype")?)?;
        let out = if keys.contains(&"out") {
            parse_dtype("out", f.get("out")?)?
        } else {
            dtype
        };
        if matches!(op, Op::Mean | Op::Ce) && out != dtype && out != DType::F32 {
            return Err(format!("out: must be the dtype {dtype} or f32, got {out}"));
        }
        if !op.is_ce() {
            let k: usize = f.num("k")?;
            if k == 0 || (op != Op::Mean && k > MAX_K) {
                return Err(format!("k: expected 1 ..= {MAX_K} samples, got {k}"));
            }
            return Ok(Spec {
                k,
                b: 0,
                c: 0,
                out,
                eps: 0.0,
                labels: Labels::All,
                ignore_index: DEFAULT_IGNORE_INDEX,
                random_weights: false,
                gap: 0,
            });
        }
        let dims = parse_dims("shape", f.get("shape")?, &[3])?;
        if dims[0] > dropfuse::multi_sample::MAX_LOSS_SETS {
            return Err(format!(
                "shape: at most {} logit sets",
                dropfuse::multi_sample::MAX_LOSS_SETS
            ));
        }
        let eps: f64 = f.num("eps")?;
        if !(0.0..=1.0).contains(&eps) {
            return Err(format!("eps: must be in [0, 1], got {eps}"));
        }
        let gap: u32 = f.num("gap")?;
        if gap > 30 {
            return Err(format!("gap: at most 30 (bf16 and f16 logits), got {gap}"));
        }
        Ok(Spec {
            k: dims[0],
            b: dims[1],
            c: dims[2],
            out,
            eps,
            labels: Labels::parse(f.get("labels")?)?,
            ignore_index: f.num("ii")?,
            random_weights: match f.get("weights")? {
                "uniform" => false,
                "random" => true,
                other => return Err(format!("weights: expected uniform or random, got {other:?}")),
            },
            gap,
        })
    }
}

// ------------------------------------------------------------------------------------------ draw

/// A multi-sample case: copies and reductions of `K` mostly up to 16 (now and then up to
/// [`MAX_K`]) samples of short, medium or 4096 / 4099 elements; cross-entropy of up to 48 rows of
/// 1 to 1001 classes; at most `max_n` elements in the largest tensor.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let mut k = if rng.random_range(0..5u32) == 0 {
        rng.random_range(17..=MAX_K)
    } else {
        rng.random_range(1..=16)
    };
    let out_any = [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)];
    let out_t_or_f32 = if rng.random_bool(0.5) { dtype } else { DType::F32 };
    let xo = rng.random_range(0..8);
    let yo = rng.random_range(0..8);
    let data = rng.random();
    if op.is_ce() {
        let mut b = if rng.random_range(0..4u32) == 0 {
            1
        } else {
            rng.random_range(1..=48)
        };
        let mut c = match rng.random_range(0..8u32) {
            0 => 1,
            1..=3 => rng.random_range(2..=40),
            4 | 5 => rng.random_range(41..=400),
            6 => 1000,
            _ => 1001,
        };
        while k * b * c > max_n {
            if c > 1 {
                c = c.div_ceil(2);
            } else if b > 1 {
                b = b.div_ceil(2);
            } else {
                k = k.div_ceil(2);
            }
        }
        let spec = Spec {
            k,
            b,
            c,
            out: if op == Op::Ce { out_t_or_f32 } else { dtype },
            eps: match rng.random_range(0..5u32) {
                0 => 0.0,
                1 => 0.1,
                2 => 1.0,
                _ => rng.random::<f64>(),
            },
            labels: Labels::draw(rng),
            ignore_index: [DEFAULT_IGNORE_INDEX, DEFAULT_IGNORE_INDEX, 0, -1][rng.random_range(0..4)],
            random_weights: rng.random_bool(0.5),
            gap: [0, 0, 0, 4, 9, 14, 20][rng.random_range(0..7)],
        };
        return Case {
            xo,
            yo: if op == Op::Ce { yo } else { 0 },
            data,
            ..Case::of(dtype, Kernel::MultiSample(op), CaseSpec::MultiSample(spec))
        };
    }
    let mut n = match rng.random_range(0..10u32) {
        0..=3 => rng.random_range(1..=40),
        4..=7 => rng.random_range(41..=3000),
        8 => 4096,
        _ => 4099,
    };
    while k * n > max_n {
        if n >= k {
            n = n.div_ceil(2);
        } else {
            k = k.div_ceil(2);
        }
    }
    let spec = Spec {
        k,
        b: 0,
        c: 0,
        out: match op {
            Op::Reduce | Op::ReduceMaskless => out_any,
            Op::Mean => out_t_or_f32,
            _ => dtype,
        },
        eps: 0.0,
        labels: Labels::All,
        ignore_index: DEFAULT_IGNORE_INDEX,
        random_weights: false,
        gap: 0,
    };
    let random = op != Op::Mean;
    Case {
        n,
        p: if random { draw_p(rng) } else { 0.0 },
        seed: if random { draw_u64(rng) } else { 0 },
        offset: if random { draw_u64(rng) } else { 0 },
        xo,
        yo,
        mo: if op.keys().contains(&"mo") {
            rng.random_range(0..4)
        } else {
            0
        },
        data,
        ..Case::of(dtype, Kernel::MultiSample(op), CaseSpec::MultiSample(spec))
    }
}

// ---------------------------------------------------------------------------------------- inputs

/// The cross-entropy problem of a case (weights and labels from the data seed), and the first bad
/// row for `labels=bad`.
fn problem(c: &Case, s: &Spec) -> (CeProblem, Option<usize>) {
    let mut rng = StdRng::seed_from_u64(c.data ^ 0x1abe);
    let weights = if s.random_weights {
        let raw: Vec<f64> = (0..s.k).map(|_| rng.random_range(1..=1000) as f64).collect();
        let sum: f64 = raw.iter().sum();
        raw.iter().map(|w| w / sum).collect()
    } else {
        vec![1.0 / s.k as f64; s.k]
    };
    let ii = s.ignore_index;
    let (labels, first_bad) = draw_rows(&mut rng, s.labels, s.b, s.c, ii);
    let p = CeProblem {
        k: s.k,
        b: s.b,
        c: s.c,
        weights,
        labels,
        ignore_index: ii,
        label_smoothing: s.eps,
    };
    (p, first_bad)
}

/// The logits of a cross-entropy case: uniform in `[-8, 8)`, and with a positive `gap` each
/// row's label logit (class 0 when the label is not a class) set to the row's largest plus `gap`.
fn ce_logits<T: FuzzElement>(s: &Spec, labels: &[i64], seed: u64) -> Vec<T> {
    let mut z = logits::<T>(s.numel(), seed);
    if s.gap > 0 {
        // z is K x B x C and the B labels are shared by the K sets.
        for (i, row) in z.chunks_mut(s.c).enumerate() {
            let label = labels[i % s.b];
            let y = if (0..s.c as i64).contains(&label) {
                label as usize
            } else {
                0
            };
            let max = row.iter().map(|v| v.to_f32()).fold(f32::NEG_INFINITY, f32::max);
            row[y] = T::from_f32(max + s.gap as f32);
        }
    }
    z
}

/// Logits uniform in `[-8, 8)`.
fn logits<T: FuzzElement>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-8.0f32..8.0)))
        .collect()
}

/// Whether `e` is the `labels` error naming row `row`.
fn names_row(e: &Error, row: usize) -> bool {
    matches!(e, Error::InvalidArgument { name: "labels", got, .. } if got.ends_with(&format!(" row {row}")))
}

// ------------------------------------------------------------------------------------------- run

/// Case `c` (operation `op`, multi-sample part `s`) for element type `T`: on the GPU `dev`, or
/// the reference self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    match (dev, op, s.out) {
        (Some(dev), Op::Copies | Op::CopiesMasks, _) => gpu_copies::<T>(dev, c, op, s),
        (Some(dev), Op::Reduce | Op::ReduceMaskless, DType::F32) => gpu_reduce::<T, f32>(dev, c, op, s),
        (Some(dev), Op::Reduce | Op::ReduceMaskless, DType::F16) => gpu_reduce::<T, f16>(dev, c, op, s),
        (Some(dev), Op::Reduce | Op::ReduceMaskless, DType::BF16) => gpu_reduce::<T, bf16>(dev, c, op, s),
        (Some(dev), Op::Mean, DType::F32) => gpu_mean::<T, f32>(dev, c, s),
        (Some(dev), Op::Mean, _) => gpu_mean::<T, T>(dev, c, s),
        (Some(dev), Op::Ce | Op::CeLoss, DType::F32) => gpu_ce::<T, f32>(dev, c, op, s),
        (Some(dev), Op::Ce | Op::CeLoss, _) => gpu_ce::<T, T>(dev, c, op, s),
        (None, Op::Mean, DType::F32) => Ok(cpu_mean::<T, f32>(c, s)),
        (None, Op::Mean, _) => Ok(cpu_mean::<T, T>(c, s)),
        (None, Op::Ce | Op::CeLoss, _) => cpu_ce::<T>(c, s),
        (None, _, _) => {
            let mut checks = Checks::new();
            check::check_copies(&mut checks, &values::<T>(c.n, c.data), s.k, c.p, c.state())?;
            Ok(checks.failures())
        }
    }
}

/// The masked copies (and masks) on the GPU against the reference, bit for bit.
fn gpu_copies<T: FuzzElement>(dev: &Device, c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (n, k, words) = (c.n, s.k, mask_words(c.n));
    let fill = sentinel::<T>();
    let h: Vec<T> = values(n, c.data);
    let want = masked_copies(&h, k, c.p, c.state())?;
    let want_copies: Vec<T> = want.copies.concat();
    let ms = MultiSample::new(k, c.p)?;
    let h_host = padded(c.xo, &h, fill);
    let hb = dev.upload(&h_host)?;
    let mut cb = dev.upload(&padded(c.yo, &vec![fill; k * n], fill))?;
    let mut mb = dev.upload(&padded(
        c.mo,
        &vec![MASK_SENTINEL; masks_len(k, n)],
        MASK_SENTINEL,
    ))?;
    let hv = hb.slice(c.xo..c.xo + n);
    let mut cv = cb.slice_mut(c.yo..c.yo + k * n);
    let kname = op.name();
    let mut bad = Vec::new();
    if op == Op::CopiesMasks {
        ms.copies_with_masks(
            st,
            c.state(),
            &hv,
            &mut cv,
            &mut mb.slice_mut(c.mo..c.mo + k * words),
        )?;
        let want_masks = check::sample_masks(k, c.p, c.state(), n)?;
        compare(
            &format!("{kname} masks"),
            &dev.download(&mb)?,
            c.mo,
            &want_masks,
            MASK_SENTINEL,
            false,
            &mut bad,
        );
    } else {
        ms.copies(st, c.state(), &hv, &mut cv)?;
        compare(
            &format!("{kname} masks (none written)"),
            &dev.download(&mb)?,
            c.mo,
            &vec![MASK_SENTINEL; k * words],
            MASK_SENTINEL,
            false,
            &mut bad,
        );
    }
    compare(
        &format!("{kname} copies"),
        &dev.download(&cb)?,
        c.yo,
        &want_copies,
        fill,
        true,
        &mut bad,
    );
    compare(
        &format!("{kname} h (must be unchanged)"),
        &dev.download(&hb)?,
        0,
        &h_host,
        fill,
        false,
        &mut bad,
    );
    Ok(bad)
}

/// The dh reduction on the GPU (gradients `G`, `dh` in `O`) against its `f32` formula.
fn gpu_reduce<G: FuzzElement, O: FuzzElement>(
    dev: &Device,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (n, k, words) = (c.n, s.k, mask_words(c.n));
    let ms = MultiSample::new(k, c.p)?;
    let grads: Vec<G> = values(k * n, c.data ^ 5);
    let masks = check::sample_masks(k, c.p, c.state(), n)?;
    let want: Vec<O> = check::reduce_model(&grads, &masks, ms.scale(), n);
    let (gfill, ofill) = (sentinel::<G>(), sentinel::<O>());
    let g_host = padded(c.xo, &grads, gfill);
    let m_host = padded(c.mo, &masks, MASK_SENTINEL);
    let gb = dev.upload(&g_host)?;
    let mb = dev.upload(&m_host)?;
    let mut db = dev.upload(&padded(c.yo, &vec![ofill; n], ofill))?;
    let gv = gb.slice(c.xo..c.xo + k * n);
    let mut dv = db.slice_mut(c.yo..c.yo + n);
    if op == Op::Reduce {
        ms.reduce(st, &mb.slice(c.mo..c.mo + k * words), &gv, &mut dv)?;
    } else {
        ms.reduce_maskless(st, c.state(), &gv, &mut dv)?;
    }
    let kname = op.name();
    let mut bad = Vec::new();
    compare(
        &format!("{kname} dh"),
        &dev.download(&db)?,
        c.yo,
        &want,
        ofill,
        true,
        &mut bad,
    );
    compare(
        &format!("{kname} grads (must be unchanged)"),
        &dev.download(&gb)?,
        0,
        &g_host,
        gfill,
        false,
        &mut bad,
    );
    compare(
        &format!("{kname} masks (must be unchanged)"),
        &dev.download(&mb)?,
        0,
        &m_host,
        MASK_SENTINEL,
        false,
        &mut bad,
    );
    Ok(bad)
}

/// The averaged logits on the GPU (`O` = `T` or `f32`) against its `f32` formula.
fn gpu_mean<T: FuzzElement, O: FuzzElement>(
    dev: &Device,
    c: &Case,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let (n, k) = (c.n, s.k);
    let z: Vec<T> = values(k * n, c.data ^ 6);
    let want: Vec<O> = check::mean_model(&z, k, n);
    let (tfill, ofill) = (sentinel::<T>(), sentinel::<O>());
    let z_host = padded(c.xo, &z, tfill);
    let zb = dev.upload(&z_host)?;
    let mut mb = dev.upload(&padded(c.yo, &vec![ofill; n], ofill))?;
    mean_logits(
        dev.stream(),
        k,
        &zb.slice(c.xo..c.xo + k * n),
        &mut mb.slice_mut(c.yo..c.yo + n),
    )?;
    let mut bad = Vec::new();
    compare(
        "multi_sample_mean mean",
        &dev.download(&mb)?,
        c.yo,
        &want,
        ofill,
        true,
        &mut bad,
    );
    compare(
        "multi_sample_mean logits (must be unchanged)",
        &dev.download(&zb)?,
        0,
        &z_host,
        tfill,
        false,
        &mut bad,
    );
    Ok(bad)
}

/// The weighted cross-entropy on the GPU (gradient in `G`) against the `f64` reference within the
/// documented bounds; bad labels write nothing and are named by `check_labels`.
fn gpu_ce<T: FuzzElement, G: FuzzElement>(
    dev: &Device,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (p, first_bad) = problem(c, s);
    let (k, b, cl) = (s.k, s.b, s.c);
    let nz = k * b * cl;
    let z: Vec<T> = ce_logits(s, &p.labels, c.data ^ 7);
    let ce = WeightedCrossEntropy::new(&p.weights)?
        .with_label_smoothing(p.label_smoothing)?
        .with_ignore_index(p.ignore_index);
    let (tfill, gfill, loss_fill) = (sentinel::<T>(), sentinel::<G>(), f32::from_bits(0xDEAD_BEEF));
    let z_host = padded(c.xo, &z, tfill);
    let zb = dev.upload(&z_host)?;
    let zv = zb.slice(c.xo..c.xo + nz);
    let lb = dev.upload(&p.labels)?;
    let loss_host = padded(0, &[loss_fill], loss_fill);
    let mut loss = dev.upload(&loss_host)?;
    let dz_host = padded(c.yo, &vec![gfill; nz], gfill);
    let mut dz = dev.upload(&dz_host)?;
    let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b))?;
    if op == Op::Ce {
        ce.forward(
            st,
            &zv,
            b,
            cl,
            &lb,
            &mut loss.slice_mut(0..1),
            &mut dz.slice_mut(c.yo..c.yo + nz),
            &mut scratch,
        )?;
    } else {
        ce.loss(st, &zv, b, cl, &lb, &mut loss.slice_mut(0..1), &mut scratch)?;
    }
    let verdict = check_labels(st, &scratch, cl, p.ignore_index);
    let kname = op.name();
    let mut bad = Vec::new();
    let got_loss = dev.download(&loss)?;
    let got_dz = dev.download(&dz)?;
    compare(
        &format!("{kname} logits (must be unchanged)"),
        &dev.download(&zb)?,
        0,
        &z_host,
        tfill,
        false,
        &mut bad,
    );
    if let Some(row) = first_bad {
        if !verdict.as_ref().is_err_and(|e| names_row(e, row)) {
            bad.push(format!(
                "{kname}: check_labels gave {verdict:?}, want the labels error naming row {row}"
            ));
        }
        compare(
            &format!("{kname} loss (nothing written)"),
            &got_loss,
            0,
            &loss_host,
            loss_fill,
            false,
            &mut bad,
        );
        compare(
            &format!("{kname} dz (nothing written)"),
            &got_dz,
            0,
            &dz_host,
            gfill,
            false,
            &mut bad,
        );
        return Ok(bad);
    }
    match verdict {
        Ok(v) if v as usize == p.n_valid() => {}
        other => bad.push(format!(
            "{kname}: check_labels gave {other:?}, want {} valid rows",
            p.n_valid()
        )),
    }
    let want = p.reference(&widen(&z))?;
    let dz_view = (op == Op::Ce).then(|| widen(&got_dz[c.yo..c.yo + nz]));
    bad.extend(
        p.within_bounds(f64::from(got_loss[0]), dz_view.as_deref(), &want, G::DTYPE)
            .into_iter()
            .map(|f| format!("{kname}: {f}")),
    );
    // Nothing outside the views: the loss's guard slots, dz's (all of dz for the loss alone).
    compare(
        &format!("{kname} loss guards"),
        &got_loss[1..],
        0,
        &[],
        loss_fill,
        false,
        &mut bad,
    );
    let mut outside: Vec<G> = got_dz[..c.yo].to_vec();
    if op == Op::Ce {
        outside.extend_from_slice(&got_dz[c.yo + nz..]);
    } else {
        outside.extend_from_slice(&got_dz[c.yo..]);
    }
    compare(
        &format!("{kname} dz outside the view"),
        &outside,
        0,
        &[],
        gfill,
        false,
        &mut bad,
    );
    if op == Op::CeLoss {
        // The loss alone equals the full call's, bit for bit.
        let mut loss2 = dev.zeros::<f32>(1)?;
        let mut dz2 = dev.zeros::<G>(nz)?;
        ce.forward(st, &zv, b, cl, &lb, &mut loss2, &mut dz2, &mut scratch)?;
        let full = dev.download(&loss2)?[0];
        if full.to_bits() != got_loss[0].to_bits() {
            bad.push(format!(
                "{kname}: loss {} but the full call's {full}",
                got_loss[0]
            ));
        }
    }
    Ok(bad)
}

/// The mean's formula within its rounding bound (no GPU).
fn cpu_mean<T: FuzzElement, O: FuzzElement>(c: &Case, s: &Spec) -> Vec<String> {
    let mut checks = Checks::new();
    check::check_mean_model::<T, O>(&mut checks, &values::<T>(s.k * c.n, c.data ^ 6), s.k, c.n);
    checks.failures()
}

/// The cross-entropy reference against its contract, or its rejection of bad labels (no GPU).
fn cpu_ce<T: FuzzElement>(c: &Case, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let (p, first_bad) = problem(c, s);
    let z = widen(&ce_logits::<T>(s, &p.labels, c.data ^ 7));
    if let Some(row) = first_bad {
        return Ok(match p.reference(&z) {
            Err(e) if names_row(&e, row) => Vec::new(),
            other => vec![format!(
                "bad labels: the reference gave {:?}, want the labels error naming row {row}",
                other.map(|r| r.0)
            )],
        });
    }
    let mut checks = Checks::new();
    check::check_cross_entropy(&mut checks, &z, &p)?;
    Ok(checks.failures())
}
