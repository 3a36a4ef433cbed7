//! Attention-layer importance on the CPU ("What Matters in Transformers? Not All Attention is
//! Needed", He et al. 2024): the per-token cosine similarity between a layer's input and output
//! hidden states, summed over the real tokens of calibration batches per layer; importance is
//! `1 - mean similarity`. The oracle of `kernels/importance.cu`, and the producer of what
//! [`AttentionDropPlan`](crate::layer_plan::AttentionDropPlan) consumes. The contract:
//!
//! 1. **Inputs.** A layer's input `a` and output `b` hidden states, `B x S x H` row-major (any
//!    `tokens = B * S >= 1` rows of `H = hidden >= 1` elements), element type `f32`, `f16` or
//!    `bf16`; an optional padding mask of one flag per token (`true` = a real token; padding
//!    tokens are skipped entirely: not read, not counted).
//!
//! 2. **Per-token similarity** ([`cosine`]), PyTorch 2.x's `F.cosine_similarity(a, b, dim=-1,
//!    eps=1e-8)`: ATen (`aten/src/ATen/native/Distance.cpp`, since the 2.0 series) divides each
//!    row by `max(||row||_2, eps)` and sums the products, i.e.
//!    `cos(a, b) = (a . b) / (max(||a||, eps) * max(||b||, eps))` with [`EPS`] `= 1e-8`. (PyTorch
//!    1.x computed `(a . b) / sqrt(max(||a||^2 * ||b||^2, eps^2))` instead; the two agree unless a
//!    norm is below `eps`.) A zero row has similarity exactly `0`; `|cos| <= 1` up to rounding.
//!    Here everything is `f64`: values widened exactly, products exact (two 24-bit significands),
//!    the three sums `a . b`, `||a||^2`, `||b||^2` sequential in ascending element order, then
//!    `sqrt`, `max`, one multiply and one divide. No clamping to `[-1, 1]`.
//!
//! 3. **Batch sum** ([`batch_similarity`]). The similarities of the real tokens in ascending
//!    token order, summed sequentially in `f64`, and the number of real tokens (`u64`). Adding a
//!    batch to a layer of a [`SimilarityAccumulator`] is its `add(layer, sum, tokens)` (skipped
//!    when the batch has no real token: the accumulator rejects 0 tokens, and nothing is added);
//!    the accumulator's mean `sum / tokens` over all batches is the layer's similarity and
//!    `1 - mean` its importance ([`accumulate`]). The GPU accumulator
//!    ([`crate::importance::ImportanceAccumulator`]) keeps the same per-layer `(f64 sum, u64
//!    count)` on the device and hands them over in one read.
//!
//! 4. **Kernel arithmetic and tolerance.** The GPU computes each row in `f32` without fused
//!    multiply-adds: every lane of a warp sums `a_i * b_i`, `a_i^2`, `b_i^2` over its own
//!    elements sequentially (chunks of `V` consecutive elements, `V = 16 / sizeof(T)`, lanes
//!    interleaved), then the 32 lane sums are added in a fixed butterfly (5 levels); then
//!    `sqrtf`, `fmaxf(., 1e-8f)`, one multiply, one divide. A row whose sum of squares is above
//!    `2^120` (or NaN) is summed again the same way with its elements multiplied by `2^-90` (the
//!    other row's sums are recomputed too, unscaled unless it is above `2^120` as well), and its
//!    clamp becomes `fmaxf(., 1e-8f * 2^-90)`: the same similarity, since
//!    `max(s ||x||, s eps) = s max(||x||, eps)` and the scales cancel, where the plain `f32`
//!    squares overflow (elements from about `2^64 / sqrt(H)` on, which bf16 and f32 hold). Every
//!    sum has at most
//!    `m = ceil(H / 32V) * V + 5 <= H / 32 + 13` roundings on the path of any term, so (first
//!    order, `u = 2^-24`): `|fl(a . b) - a . b| <= (m + 1) u sum |a_i b_i| <= (m + 1) u ||a|| ||b||`,
//!    the squared norms have relative error `(m + 1) u`, each `sqrt` adds `u` (and halves the
//!    error), the product `u`, the division `u`, and `f32(1e-8)` differs from `1e-8` by less
//!    than `u / 2` relatively. With `D = max(||a||, eps) max(||b||, eps) >= ||a|| ||b||` and
//!    `|cos| <= 1`:
//!    `|cos_gpu - cos| <= (m + 1) u + |cos| (m + 1 + 4) u <= (2m + 6) u <= (H / 16 + 32) u`
//!    ([`f32_token_tolerance`]; `1.7e-5` for `H = 4096`). This holds for every finite input.
//!    The scaling by `2^-90` is exact except for elements it pushes into `f32`'s subnormals
//!    (below `2^-36`, in a row whose norm is above `2^60`), and underflow is harmless wherever it
//!    happens: each product below `2^-126` is off by at most `2^-150`, negligible next to the
//!    denominator (at least `eps^2` as computed, `2^-57` in a scaled pass: a sum of squares that
//!    small belongs to a norm below eps, which is clamped). Rows holding an
//!    infinity or a NaN have similarity NaN (here and on the GPU). The batch sum is added in
//!    `f64` in a fixed order (tiles of [`TILE`] tokens summed in ascending order, then the tiles
//!    in a fixed tree), so its own rounding is below
//!    `tokens^2 * 2^-53`: `|sum_gpu - sum| <= tokens * (H / 16 + 32) u + tokens^2 2^-53`
//!    ([`f32_sum_tolerance`]), and the mean is off by at most that divided by `tokens`. The
//!    GPU result is deterministic: run to run and GPU to GPU (the order depends on the shape only).
//!
//! 5. **Validation**, before anything is computed or changed, as [`Error::InvalidArgument`]
//!    named: `hidden` (0), `input` (empty or not whole rows), `output` (not the input's length),
//!    `mask` (not one flag per token), `layer` (out of range, via the accumulator).

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layer_plan::SimilarityAccumulator;

/// PyTorch's default `eps` of `cosine_similarity`.
pub const EPS: f64 = 1e-8;

/// Tokens per tile of the GPU's fixed-order batch sum (contract point 4).
pub const TILE: usize = 64;

/// Unit roundoff of `f32`: `2^-24`.
const U: f64 = 1.0 / 16_777_216.0;

/// The similarity of one pair of rows (contract point 2), in `f64`.
///
/// # Panics
/// If the rows differ in length (the checked entry points validate that first).
pub fn cosine<T: Element>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len(), "rows of different lengths");
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x.to_f32()), f64::from(y.to_f32()));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    dot / (aa.sqrt().max(EPS) * bb.sqrt().max(EPS))
}

/// Validates the inputs (contract point 5) and returns the number of tokens.
fn check<T>(input: &[T], output: &[T], hidden: usize, mask: Option<&[bool]>) -> Result<usize> {
    if hidden == 0 {
        return Err(Error::invalid("hidden", "at least 1", 0));
    }
    if input.is_empty() || input.len() % hidden != 0 {
        return Err(Error::invalid(
            "input",
            format!("a non-empty whole number of rows of {hidden} elements"),
            format!("{} elements", input.len()),
        ));
    }
    if output.len() != input.len() {
        return Err(Error::invalid(
            "output",
            format!("{} elements (the input's length)", input.len()),
            format!("{} elements", output.len()),
        ));
    }
    let tokens = input.len() / hidden;
    if let Some(m) = mask {
        if m.len() != tokens {
            return Err(Error::invalid(
                "mask",
                format!("{tokens} flags (one per token)"),
                format!("{} flags", m.len()),
            ));
        }
    }
    Ok(tokens)
}

/// The similarity of every token (contract point 2); `None` for padding tokens.
///
/// Errors: `hidden`, `input`, `output`, `mask`.
pub fn token_similarities<T: Element>(
    input: &[T],
    output: &[T],
    hidden: usize,
    mask: Option<&[bool]>,
) -> Result<Vec<Option<f64>>> {
    let tokens = check(input, output, hidden, mask)?;
    Ok((0..tokens)
        .map(|t| {
            if mask.is_some_and(|m| !m[t]) {
                None
            } else {
                let r = t * hidden..(t + 1) * hidden;
                Some(cosine(&input[r.clone()], &output[r]))
            }
        })
        .collect())
}

/// The sum of the real tokens' similarities (ascending token order, `f64`) and their number
/// (contract point 3).
///
/// Errors: `hidden`, `input`, `output`, `mask`.
pub fn batch_similarity<T: Element>(
    input: &[T],
    output: &[T],
    hidden: usize,
    mask: Option<&[bool]>,
) -> Result<(f64, u64)> {
    let sims = token_similarities(input, output, hidden, mask)?;
    let mut sum = 0.0f64;
    let mut count = 0u64;
    for s in sims.into_iter().flatten() {
        sum += s;
        count += 1;
    }
    Ok((sum, count))
}

/// Adds one calibration batch of attention layer `layer` to `acc` (contract point 3): its
/// [`batch_similarity`], unless it has no real token. Returns the batch's token count.
///
/// Errors: `hidden`, `input`, `output`, `mask`, and the accumulator's (`layer`,
/// `similarity_sum` when a similarity is not finite, `tokens` on overflow); nothing is added on
/// error.
pub fn accumulate<T: Element>(
    acc: &mut SimilarityAccumulator,
    layer: usize,
    input: &[T],
    output: &[T],
    hidden: usize,
    mask: Option<&[bool]>,
) -> Result<u64> {
    if layer >= acc.layers() {
        return Err(Error::invalid(
            "layer",
            format!("an attention layer index < {}", acc.layers()),
            layer,
        ));
    }
    let (sum, count) = batch_similarity(input, output, hidden, mask)?;
    if count > 0 {
        acc.add(layer, sum, count)?;
    }
    Ok(count)
}

/// The bound on `|cos_gpu - cos|` of one token (contract point 4): `(H / 16 + 32) * 2^-24`.
pub fn f32_token_tolerance(hidden: usize) -> f64 {
    (hidden as f64 / 16.0 + 32.0) * U
}

/// The bound on `|sum_gpu - sum|` of a batch of `tokens` real tokens (contract point 4):
/// `tokens * f32_token_tolerance(hidden) + tokens^2 * 2^-53`.
pub fn f32_sum_tolerance(tokens: u64, hidden: usize) -> f64 {
    let t = tokens as f64;
    t * f32_token_tolerance(hidden) + t * t * f64::EPSILON / 2.0
}
