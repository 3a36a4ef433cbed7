//! Attention-layer importance in the tour (`dropfuse::importance`): the per-token cosine
//! similarity of a layer's input and output hidden states, accumulated into one layer of an
//! accumulator of three: without a mask, with a padding mask, and writing every token's
//! similarity; the layer's `(sum, count)` and the similarities within the bounds of
//! `dropfuse::reference::importance` (`f32_sum_tolerance`, `f32_token_tolerance`), padding
//! tokens NaN, the other layers untouched.

use dropfuse::cudarc::driver::DevicePtr;
use dropfuse::half::{bf16, f16};
use dropfuse::importance::ImportanceAccumulator;
use dropfuse::reference::importance::{self as reference, f32_sum_tolerance, f32_token_tolerance};
use dropfuse::{Device, Element, Generator};

use crate::checks::importance::{self as check, hidden_states};
use crate::checks::{within, Checks};
use crate::{print_check_header, print_checks, push_rows, time_copy, time_ms, BoxResult, Family, Row, Scale};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// `tokens x H` hidden states.
#[derive(Debug, Clone, Copy)]
struct Shape {
    tokens: usize,
    hidden: usize,
}

/// The shape is 16 x 4096 x 4096 (bf16); 4096 tokens of 4096 (16 M elements) keep the CPU
/// reference quick.
const FULL: Shape = Shape {
    tokens: 4096,
    hidden: 4096,
};
/// More tokens than a tile (64), a row length that is no multiple of the vector width.
const SMALL: Shape = Shape {
    tokens: 150,
    hidden: 99,
};

/// The layer the batches go to, of [`LAYERS`].
const LAYER: usize = 1;
const LAYERS: usize = 3;

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "tokens x H = {} x {}, every fourth token padding in the masked rows",
            self.tokens, self.hidden
        )
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!("attention importance: {}", shape(scale).label())]
}

/// Real tokens: mask bytes 1 to 3; every fourth token (from token 2) padding.
fn padding_mask(tokens: usize) -> (Vec<u8>, Vec<bool>) {
    let real: Vec<bool> = (0..tokens).map(|t| t % 4 != 2).collect();
    let bytes = (0..tokens)
        .map(|t| if real[t] { 1 + (t % 3) as u8 } else { 0 })
        .collect();
    (bytes, real)
}

fn gpu(dev: &Device, scale: Scale, _rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    gpu_dtype::<f16>(dev, s, 81, rows)?;
    gpu_dtype::<bf16>(dev, s, 82, rows)?;
    gpu_dtype::<f32>(dev, s, 83, rows)
}

/// Mismatches of an accumulator after one batch into [`LAYER`]: the count, the sum within its
/// bound, the other layers `(0, 0)`.
fn layer_mismatches(acc: &ImportanceAccumulator, want: (f64, u64), hidden: usize) -> BoxResult<usize> {
    let (sums, counts) = acc.download()?;
    let (sum, count) = want;
    let mut bad = usize::from(counts[LAYER] != count);
    bad += usize::from(!within(
        (sums[LAYER] - sum).abs(),
        f32_sum_tolerance(count, hidden),
    ));
    bad += (0..LAYERS)
        .filter(|&l| l != LAYER && (sums[l] != 0.0 || counts[l] != 0))
        .count();
    Ok(bad)
}

fn gpu_dtype<T: Element>(dev: &Device, shape: Shape, seed: u64, rows: &mut Vec<Row>) -> BoxResult<()> {
    let (tokens, hidden) = (shape.tokens, shape.hidden);
    let n = tokens * hidden;
    let size = T::DTYPE.size() as u64;
    let (a_host, b_host) = hidden_states::<T>(tokens, hidden, seed);
    let (mask_bytes, real) = padding_mask(tokens);
    let want_all = reference::batch_similarity(&a_host, &b_host, hidden, None)?;
    let want_masked = reference::batch_similarity(&a_host, &b_host, hidden, Some(&real))?;
    let want_sims = reference::token_similarities(&a_host, &b_host, hidden, Some(&real))?;

    let a = dev.upload(&a_host)?;
    let b = dev.upload(&b_host)?;
    let mask = dev.upload(&mask_bytes)?;
    let mask_ref: Option<&dyn DevicePtr<u8>> = Some(&mask);

    let mut acc = ImportanceAccumulator::new(dev, LAYERS)?;
    acc.add(LAYER, hidden, &a, &b, None)?;
    let plain_bad = layer_mismatches(&acc, want_all, hidden)?;
    let mut acc_m = ImportanceAccumulator::new(dev, LAYERS)?;
    acc_m.add(LAYER, hidden, &a, &b, mask_ref)?;
    let masked_bad = layer_mismatches(&acc_m, want_masked, hidden)?;
    let mut acc_s = ImportanceAccumulator::new(dev, LAYERS)?;
    let mut sims = dev.zeros::<f32>(tokens)?;
    acc_s.add_with_similarities(LAYER, hidden, &a, &b, mask_ref, &mut sims)?;
    let tol = f32_token_tolerance(hidden);
    let got_sims = dev.download(&sims)?;
    let sims_bad = got_sims
        .iter()
        .zip(&want_sims)
        .filter(|(g, w)| match w {
            Some(w) => !within((f64::from(**g) - w).abs(), tol),
            None => !g.is_nan(),
        })
        .count()
        + layer_mismatches(&acc_s, want_masked, hidden)?;

    let data = 2 * n as u64 * size;
    let copy_ms = time_copy(dev, &a)?;
    let plain_ms = time_ms(dev, || acc.add(LAYER, hidden, &a, &b, None))?;
    let masked_ms = time_ms(dev, || acc_m.add(LAYER, hidden, &a, &b, mask_ref))?;
    let sims_ms = time_ms(dev, || {
        acc_s.add_with_similarities(LAYER, hidden, &a, &b, mask_ref, &mut sims)
    })?;
    let t = tokens as u64;
    let table = [
        ("importance", plain_bad, plain_ms, data),
        ("importance_masked", masked_bad, masked_ms, data + t),
        ("importance_similarities", sims_bad, sims_ms, data + 5 * t),
    ];
    push_rows(rows, T::DTYPE.name(), n, (copy_ms, data), table);
    Ok(())
}

fn cpu(scale: Scale, _rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!("CPU reference: attention importance: {}\n", s.label());
    print_check_header();
    let mut ok = cpu_dtype::<f16>(s, 81)?;
    ok &= cpu_dtype::<bf16>(s, 82)?;
    ok &= cpu_dtype::<f32>(s, 83)?;
    Ok(ok)
}

/// The importance reference's self-checks for dtype `T`, without and with the padding mask.
fn cpu_dtype<T: Element>(shape: Shape, seed: u64) -> BoxResult<bool> {
    let (a, b) = hidden_states::<T>(shape.tokens, shape.hidden, seed);
    let (_, real) = padding_mask(shape.tokens);
    let mut checks = Checks::new();
    checks.prefix("no mask");
    check::check_importance(&mut checks, &a, &b, shape.hidden, None)?;
    checks.prefix("padding mask");
    check::check_importance(&mut checks, &a, &b, shape.hidden, Some(&real))?;
    Ok(print_checks(T::DTYPE.name(), a.len(), &checks))
}
