//! Monte-Carlo dropout in the tour (`dropfuse::mc_dropout`): `R` replicas of a batch in one launch
//! (with and without masks, bit for bit against `dropfuse::reference::mc_dropout`), then the
//! streaming summaries of a `T x B x C` stack of softmax probabilities (checked stack push,
//! unchecked stack push, `T` single pushes; each then `finish`) within
//! `reference::mc_dropout::f32_tolerance`.

use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::half::{bf16, f16};
use dropfuse::mc_dropout::{McDropout, McOutputs, McStats32, McSummaryState};
use dropfuse::reference::mc_dropout::{self as reference, McStats};
use dropfuse::{Device, Element, Generator, PhiloxState};

use crate::checks::mc_dropout::{self as check, outside_tolerance, softmax_stack};
use crate::checks::Checks;
use crate::{
    download, element_mismatches, mask_mismatches, print_check_header, print_checks, push_rows, random_input,
    time_copy, time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// Drop probability.
const P: f64 = 0.1;

/// `R` replicas of `B x F`; summaries of `T x B x C`.
#[derive(Debug, Clone, Copy)]
struct Shape {
    replicas: usize,
    batch: usize,
    features: usize,
    samples: usize,
    sbatch: usize,
    classes: usize,
}

/// The bench's shapes (R = 16 replicas of 256 x 4096; T = 16, B = 1024, C = 1000).
const FULL: Shape = Shape {
    replicas: 16,
    batch: 256,
    features: 4096,
    samples: 16,
    sbatch: 1024,
    classes: 1000,
};
const SMALL: Shape = Shape {
    replicas: 3,
    batch: 5,
    features: 67,
    samples: 4,
    sbatch: 6,
    classes: 37,
};

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "R = {} replicas of B x F = {} x {}, p = {P}; summaries of T x B x C = {} x {} x {} softmax \
             probabilities",
            self.replicas, self.batch, self.features, self.samples, self.sbatch, self.classes
        )
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!("Monte-Carlo dropout: {}", shape(scale).label())]
}

fn gpu(dev: &Device, scale: Scale, rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    let r = s.replicas as u64;
    gpu_replicas::<f16>(dev, s, rng.next_streams(r), 61, rows)?;
    gpu_replicas::<bf16>(dev, s, rng.next_streams(r), 62, rows)?;
    gpu_replicas::<f32>(dev, s, rng.next_streams(r), 63, rows)?;
    gpu_summaries(dev, s, 64, rows)
}

fn gpu_replicas<T: Element>(
    dev: &Device,
    shape: Shape,
    state: PhiloxState,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let st = dev.stream();
    let (r, n) = (shape.replicas, shape.batch * shape.features);
    let size = T::DTYPE.size() as u64;
    let mc = McDropout::new(P, r)?;
    let x_host: Vec<T> = random_input(n, seed);
    let (want_y, want_m) = reference::replicated_forward(&x_host, r, P, state, 0)?;
    let x = dev.upload(&x_host)?;
    let mut y = dev.zeros::<T>(r * n)?;
    let mut m = dev.zeros::<u32>(mc.masks_words(n))?;
    mc.forward(st, state, &x, &mut y, &mut m)?;
    let fwd_bad =
        element_mismatches(&download(dev, &y)?, &want_y) + mask_mismatches(&dev.download(&m)?, &want_m);
    let mut y2 = dev.zeros::<T>(r * n)?;
    mc.forward_maskless(st, state, &x, &mut y2)?;
    let ml_bad = element_mismatches(&download(dev, &y2)?, &want_y);

    let out = (r * n) as u64 * size;
    let read = n as u64 * size;
    let mbytes = 4 * mc.masks_words(n) as u64;
    let copy_ms = time_copy(dev, &y)?;
    let fwd_ms = time_ms(dev, || mc.forward(st, state, &x, &mut y, &mut m))?;
    let ml_ms = time_ms(dev, || mc.forward_maskless(st, state, &x, &mut y2))?;
    let table = [
        ("mc_replicas_forward", fwd_bad, fwd_ms, read + out + mbytes),
        ("mc_replicas_forward_maskless", ml_bad, ml_ms, read + out),
    ];
    push_rows(rows, T::DTYPE.name(), r * n, (copy_ms, 2 * out), table);
    Ok(())
}

/// The summaries of `state` after `finish`, against `want`: values out of bounds, plus one per
/// counter that is not `samples` accepted and none rejected.
fn summary_mismatches(
    dev: &Device,
    state: &McSummaryState,
    out: &mut McOutputs,
    want: &McStats,
) -> BoxResult<usize> {
    state.finish(dev.stream(), out)?;
    let got = McStats32::download(dev, state, out)?;
    let (bad, _) = outside_tolerance(&got, want);
    let c = state.counters(dev.stream())?;
    Ok(bad + usize::from(c.accepted != want.samples as u64 || c.rejected != 0))
}

fn gpu_summaries(dev: &Device, shape: Shape, seed: u64, rows: &mut Vec<Row>) -> BoxResult<()> {
    let st = dev.stream();
    let (t, b, c) = (shape.samples, shape.sbatch, shape.classes);
    let per = b * c;
    let probs_host = softmax_stack(t, b, c, 4.0, seed);
    let want = reference::summarize(&probs_host, t, b, c)?;
    let probs: CudaSlice<f32> = dev.upload(&probs_host)?;
    let mut out = McOutputs::new(dev, b, c)?;

    let mut stack = McSummaryState::new(dev, b, c)?;
    stack.push_stack(st, &probs, t)?;
    let stack_bad = summary_mismatches(dev, &stack, &mut out, &want)?;
    let mut unchecked = McSummaryState::new(dev, b, c)?;
    unchecked.push_stack_unchecked(st, &probs, t)?;
    let unchecked_bad = summary_mismatches(dev, &unchecked, &mut out, &want)?;
    let mut single = McSummaryState::new(dev, b, c)?;
    for k in 0..t {
        single.push(st, &probs.slice(k * per..(k + 1) * per))?;
    }
    let single_bad = summary_mismatches(dev, &single, &mut out, &want)?;

    // Bytes as the bench counts them: the stack read once, mean and M2 read and written, the
    // finish reading mean and M2 and writing the variance.
    let bytes = 4 * (t * per) as u64 + 16 * per as u64 + 12 * per as u64;
    let copy_ms = time_copy(dev, &probs)?;
    let stack_ms = time_ms(dev, || {
        stack.push_stack(st, &probs, t)?;
        stack.finish(st, &mut out)
    })?;
    let unchecked_ms = time_ms(dev, || {
        unchecked.push_stack_unchecked(st, &probs, t)?;
        unchecked.finish(st, &mut out)
    })?;
    let single_ms = time_ms(dev, || {
        for k in 0..t {
            single.push(st, &probs.slice(k * per..(k + 1) * per))?;
        }
        single.finish(st, &mut out)
    })?;
    let table = [
        ("mc_summaries", stack_bad, stack_ms, bytes),
        ("mc_summaries_unchecked", unchecked_bad, unchecked_ms, bytes),
        ("mc_summaries_single_pushes", single_bad, single_ms, bytes),
    ];
    push_rows(rows, "f32", t * per, (copy_ms, 8 * (t * per) as u64), table);
    Ok(())
}

fn cpu(scale: Scale, rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!("CPU reference: Monte-Carlo dropout: {}\n", s.label());
    print_check_header();
    let r = s.replicas as u64;
    let mut ok = cpu_replicas::<f16>(s, rng.next_streams(r), 61)?;
    ok &= cpu_replicas::<bf16>(s, rng.next_streams(r), 62)?;
    // Streams wrapping around 2^64 between the replicas.
    ok &= cpu_replicas::<f32>(s, PhiloxState::new(63, u64::MAX - 1), 63)?;
    let (t, b, c) = (s.samples, s.sbatch, s.classes);
    for (what, probs, samples) in [
        ("softmax", softmax_stack(t, b, c, 4.0, 64), t),
        ("near one-hot", softmax_stack(t, b, c, 40.0, 65), t),
        ("identical samples", softmax_stack(1, b, c, 4.0, 66).repeat(t), t),
        ("T = 1", softmax_stack(1, b, c, 4.0, 67), 1),
    ] {
        let mut checks = Checks::new();
        checks.prefix(what);
        check::check_summaries(&mut checks, &probs, samples, b, c)?;
        ok &= print_checks("f32", samples * b * c, &checks);
    }
    Ok(ok)
}

/// The replica reference's self-checks for dtype `T`; prints one row each.
fn cpu_replicas<T: Element>(shape: Shape, state: PhiloxState, seed: u64) -> BoxResult<bool> {
    let (r, n) = (shape.replicas, shape.batch * shape.features);
    let x: Vec<T> = random_input(n, seed);
    let mut checks = Checks::new();
    let (_, masks) = check::check_replicas(&mut checks, &x, r, P, state, 0)?;
    let words = masks.len() / r;
    checks.check(
        "the replicas' masks differ",
        (1..r).all(|t| masks[t * words..(t + 1) * words] != masks[..words]),
    );
    Ok(print_checks(T::DTYPE.name(), r * n, &checks))
}
