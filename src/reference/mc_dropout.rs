//! Monte-Carlo dropout on the CPU: batch-replicated dropout (`T` masked replicas of a batch in one
//! launch) and streaming predictive summaries of `T` sampled class-probability outputs (mean,
//! variance, predictive entropy, expected entropy and mutual information, i.e. BALD), the oracle of
//! the MC-dropout kernels. The contract:
//!
//! 1. **Replicas.** A batch `x` (`B x F` row-major, or any `n = B * F >= 1` elements, element type
//!    `T`: `f32`, [`half::f16`], [`half::bf16`]) is replicated `R >= 1` times. Replica `t`
//!    (`0 <= t < R`) is plain dropout ([`crate::reference`] points 2 to 6) of `x` with the state
//!    `{ seed, offset: offset.wrapping_add(t) }` ([`replica_state`]; the streams
//!    [`Generator::next_streams(R)`](crate::Generator::next_streams) hands out, the same rule as
//!    multi-sample dropout's samples) and the caller's `element_offset`: replica `t` is
//!    bit for bit [`dropout::forward(x, p, replica_state(state, t), element_offset)`](dropout::forward).
//!    Replicas never share random words (distinct streams), and replica `t` of a call with
//!    `R` replicas equals replica `t` of any call with more.
//! 2. **Replica layout.** The output is `R x n` (`R x B x F`) row-major: element `i` of replica
//!    `t` is `y[t * n + i]`. The masks are `R` dropout masks of `W = ceil(n / 32)` words each,
//!    concatenated: replica `t`'s mask is words `t * W .. (t + 1) * W` (each replica starts a new
//!    word; its unused high bits are 0) ([`replicated_forward`], [`replicated_mask`]). Forward
//!    only: MC dropout is an inference-time procedure.
//! 3. **Summary inputs.** `T >= 1` sampled probability tensors `p_t`, each `B x C` row-major `f32`
//!    (`B, C >= 1`), pushed one at a time into a [`McSummary`] (in one pass over the `T x B x C`
//!    stack, which is never stored; [`summarize`] runs it over a stored stack). Every value must
//!    be finite and `>= 0`; rows need not sum to exactly 1 (softmax outputs do not), and nothing
//!    is renormalised.
//! 4. **Mean and variance** per `(b, c)`, in `f64`, by Welford's update in push order: with
//!    `x = p_t[b][c]` widened exactly, `k = t + 1`, `d = x - m`, `m += d / k`,
//!    `M2 += d * (x - m)` (the updated `m`); `mean = m`, `variance = M2 / T` (the **population**
//!    variance, `1 / T`; 0 for `T = 1`). Welford's mean of non-negative values is never negative
//!    and of identical values is exactly that value.
//! 5. **Entropies** in nats, `0 ln 0 = 0`, summed over `c` in ascending order in `f64`
//!    ([`entropy`]): `H(q) = -sum_c q_c ln q_c`. Per row `b`: the **predictive entropy**
//!    `H[mean_b]`, and the **expected entropy** `E_t[H[p_t,b]]`, the mean of the per-sample
//!    entropies by the same running-mean update as point 4 (`e += (H[p_t,b] - e) / k`, push
//!    order), so that identical entropies average to exactly themselves.
//! 6. **Mutual information (BALD)** per row: `max(0, H[mean_b] - E_t[H[p_t,b]])`. The difference
//!    is `>= 0` mathematically (`H` is concave on the non-negative orthant, so Jensen's inequality
//!    holds for any non-negative rows, normalised or not), so the clamp only removes rounding
//!    noise. `T = 1` and identical samples give exactly 0 (the mean and the expected entropy are
//!    then exactly the sample's and its entropy).
//! 7. **Kernel tolerance.** A GPU kernel computing the summaries in `f32` (Welford in `f32`,
//!    `logf`, sequential `f32` sums) meets, for probability inputs (values in `[0, 1]`, rows
//!    summing to at most about 1), `|gpu - reference| <= tolerance` with the first-order
//!    worst-case rounding bounds of [`f32_tolerance`]: with `u = 2^-24` and `L = ln C + 1`,
//!    mean `(2T + 4) u`, variance `(4T + 8) u`, predictive entropy `(8T + C + 8) u L`, expected
//!    entropy `(T + C + 8) u L`, mutual information the sum of the two entropy bounds. A kernel
//!    that reduces in a tree rather than sequentially does better.
//! 8. **Validation**, before any work or state change, as [`Error::InvalidArgument`] named:
//!    `replicas` (0, or `R * n` over `usize` or more replicas than can be allocated), `x` (empty),
//!    `p` (not finite in `[0, 1]`), `element_offset` (`element_offset + n` over `u64`), `batch` /
//!    `classes` (0; `classes` also when `B * C` overflows `usize` or cannot be allocated), `probs`
//!    (a tensor of other than `B * C` values, or `T * B * C` for [`summarize`]; a value that is
//!    NaN, infinite or negative: `-0.0` is accepted), `samples` ([`McSummary::finish`] before any push, or `T = 0` for [`summarize`]).
//!    A rejected push leaves the summary unchanged.

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::dropout::{self, drop_threshold, mask_words};
use crate::rng::PhiloxState;

/// Unit roundoff of `f32`: `2^-24`.
const F32_UNIT_ROUNDOFF: f64 = 1.0 / 16_777_216.0;

/// The state of replica `t`: `{ seed, offset: offset.wrapping_add(t) }` (contract point 1).
pub fn replica_state(state: PhiloxState, t: u64) -> PhiloxState {
    PhiloxState::new(state.seed, state.offset.wrapping_add(t))
}

/// Validates the replica arguments (contract point 8) and returns `R * n`.
fn check_replicas(n: usize, replicas: usize, p: f64, element_offset: u64) -> Result<usize> {
    if replicas == 0 {
        return Err(Error::invalid("replicas", "at least 1 replica", 0));
    }
    if n == 0 {
        return Err(Error::invalid("x", "a non-empty tensor", "0 elements"));
    }
    let total = replicas.checked_mul(n).ok_or_else(|| {
        Error::invalid(
            "replicas",
            format!("replicas * n that fits in usize (n = {n})"),
            replicas,
        )
    })?;
    drop_threshold(p)?;
    if element_offset.checked_add(n as u64).is_none() {
        return Err(Error::invalid(
            "element_offset",
            format!("element_offset + n <= 2^64 - 1 (n = {n})"),
            element_offset,
        ));
    }
    Ok(total)
}

/// The `R` concatenated replica masks of `n` elements (contract point 2): replica `t`'s
/// `ceil(n / 32)` words are `dropout::mask(p, replica_state(state, t), element_offset, n)`.
pub fn replicated_mask(
    n: usize,
    replicas: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> Result<Vec<u32>> {
    check_replicas(n, replicas, p, element_offset)?;
    // replicas * ceil(n / 32) <= replicas * n: no overflow.
    let mut words = crate::alloc::with_capacity("replicas", replicas * mask_words(n))?;
    for t in 0..replicas {
        words.extend(dropout::mask(
            p,
            replica_state(state, t as u64),
            element_offset,
            n,
        )?);
    }
    Ok(words)
}

/// Batch-replicated dropout forward (contract points 1 and 2): `(y, masks)` with `y` the
/// `R x n` replicas (replica `t` is `y[t * n .. (t + 1) * n]`) and `masks` the [`replicated_mask`].
pub fn replicated_forward<T: Element>(
    x: &[T],
    replicas: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> Result<(Vec<T>, Vec<u32>)> {
    let total = check_replicas(x.len(), replicas, p, element_offset)?;
    let mut y = crate::alloc::with_capacity("replicas", total)?;
    let mut masks = crate::alloc::with_capacity("replicas", replicas * mask_words(x.len()))?;
    for t in 0..replicas {
        let (yt, mt) = dropout::forward(x, p, replica_state(state, t as u64), element_offset)?;
        y.extend(yt);
        masks.extend(mt);
    }
    Ok((y, masks))
}

/// The entropy `-sum_c q_c ln q_c` in nats, `0 ln 0 = 0`, summed in ascending order (contract
/// point 5). Meant for non-negative `q`.
pub fn entropy(q: &[f64]) -> f64 {
    let mut h = 0.0;
    for &v in q {
        if v > 0.0 {
            h -= v * v.ln();
        }
    }
    h
}

/// The predictive summaries of `T` samples (contract points 4 to 6).
#[derive(Debug, Clone, PartialEq)]
pub struct McStats {
    /// Rows `B`.
    pub batch: usize,
    /// Classes `C`.
    pub classes: usize,
    /// Samples `T`.
    pub samples: usize,
    /// `mean[b * C + c]`: the mean over `t` of `p_t[b][c]`.
    pub mean: Vec<f64>,
    /// `variance[b * C + c]`: the population variance (`1 / T`) over `t` of `p_t[b][c]`.
    pub variance: Vec<f64>,
    /// `predictive_entropy[b]`: `H[mean_b]`.
    pub predictive_entropy: Vec<f64>,
    /// `expected_entropy[b]`: `E_t[H[p_t,b]]`.
    pub expected_entropy: Vec<f64>,
    /// `mutual_information[b]`: BALD, `max(0, H[mean_b] - E_t[H[p_t,b]])`.
    pub mutual_information: Vec<f64>,
}

/// A one-pass accumulator of MC-dropout summaries: [`McSummary::new`], one
/// [`push`](McSummary::push) per sample, [`finish`](McSummary::finish). Holds `O(B * C)` state,
/// never the `T x B x C` stack.
#[derive(Debug, Clone, PartialEq)]
pub struct McSummary {
    batch: usize,
    classes: usize,
    samples: usize,
    /// Welford means, `B * C`.
    mean: Vec<f64>,
    /// Welford sums of squared deviations, `B * C`.
    m2: Vec<f64>,
    /// Per row, the running mean over pushed samples of their entropies.
    expected_entropy: Vec<f64>,
}

impl McSummary {
    /// An empty summary of `batch x classes` probabilities (both >= 1).
    pub fn new(batch: usize, classes: usize) -> Result<McSummary> {
        let n = check_shape(batch, classes)?;
        Ok(McSummary {
            batch,
            classes,
            samples: 0,
            mean: crate::alloc::filled("classes", n, 0.0)?,
            m2: crate::alloc::filled("classes", n, 0.0)?,
            expected_entropy: crate::alloc::filled("classes", batch, 0.0)?,
        })
    }

    /// Rows `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Classes `C`.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Samples pushed so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds one sample `p_t` (`B x C` row-major, every value finite and `>= 0`). A rejected
    /// sample leaves the summary unchanged.
    pub fn push(&mut self, probs: &[f32]) -> Result<()> {
        check_probs(probs, self.mean.len(), "B * C")?;
        self.samples += 1;
        let k = self.samples as f64;
        for (i, &v) in probs.iter().enumerate() {
            let x = f64::from(v);
            let d = x - self.mean[i];
            self.mean[i] += d / k;
            self.m2[i] += d * (x - self.mean[i]);
        }
        for (b, row) in probs.chunks_exact(self.classes).enumerate() {
            let widened: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            self.expected_entropy[b] += (entropy(&widened) - self.expected_entropy[b]) / k;
        }
        Ok(())
    }

    /// The summaries of the samples pushed so far (at least one).
    pub fn finish(&self) -> Result<McStats> {
        if self.samples == 0 {
            return Err(Error::invalid("samples", "at least one pushed sample", 0));
        }
        let t = self.samples as f64;
        let variance = self.m2.iter().map(|&m2| m2 / t).collect();
        let predictive_entropy: Vec<f64> = self.mean.chunks_exact(self.classes).map(entropy).collect();
        let expected_entropy = self.expected_entropy.clone();
        let mutual_information = predictive_entropy
            .iter()
            .zip(&expected_entropy)
            .map(|(&h, &e)| (h - e).max(0.0))
            .collect();
        Ok(McStats {
            batch: self.batch,
            classes: self.classes,
            samples: self.samples,
            mean: self.mean.clone(),
            variance,
            predictive_entropy,
            expected_entropy,
            mutual_information,
        })
    }
}

/// Rejects `batch` / `classes` of 0 and `batch * classes` over `usize`; returns the product.
fn check_shape(batch: usize, classes: usize) -> Result<usize> {
    if batch == 0 {
        return Err(Error::invalid("batch", "at least 1 row", 0));
    }
    if classes == 0 {
        return Err(Error::invalid("classes", "at least 1 class", 0));
    }
    batch.checked_mul(classes).ok_or_else(|| {
        Error::invalid(
            "classes",
            format!("batch * classes that fits in usize (batch = {batch})"),
            classes,
        )
    })
}

/// Rejects a probability tensor of other than `expected` values or with a value that is not finite
/// and `>= 0`; `what` describes the expected count.
fn check_probs(probs: &[f32], expected: usize, what: &str) -> Result<()> {
    if probs.len() != expected {
        return Err(Error::invalid(
            "probs",
            format!("{expected} values ({what})"),
            format!("{} values", probs.len()),
        ));
    }
    if let Some((i, v)) = probs
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(Error::invalid(
            "probs",
            "finite values >= 0",
            format!("probs[{i}] = {v}"),
        ));
    }
    Ok(())
}

/// The summaries of a stored `T x B x C` stack (`probs[(t * B + b) * C + c]`), computed by pushing
/// its `T` samples through a [`McSummary`] in order.
pub fn summarize(probs: &[f32], samples: usize, batch: usize, classes: usize) -> Result<McStats> {
    let per_sample = check_shape(batch, classes)?;
    if samples == 0 {
        return Err(Error::invalid("samples", "at least 1 sample", 0));
    }
    let total = samples.checked_mul(per_sample).ok_or_else(|| {
        Error::invalid(
            "samples",
            format!("samples * batch * classes that fits in usize ({per_sample} per sample)"),
            samples,
        )
    })?;
    check_probs(probs, total, "T * B * C")?;
    // Allocated once the stack is known to hold T * B * C values.
    let mut summary = McSummary::new(batch, classes)?;
    for sample in probs.chunks_exact(per_sample) {
        summary.push(sample)?;
    }
    summary.finish()
}

/// The bounds a GPU `f32` kernel's summaries must meet against this reference (contract point 7).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute bound on each mean.
    pub mean: f64,
    /// Absolute bound on each variance.
    pub variance: f64,
    /// Absolute bound on each predictive entropy.
    pub predictive_entropy: f64,
    /// Absolute bound on each expected entropy.
    pub expected_entropy: f64,
    /// Absolute bound on each mutual information.
    pub mutual_information: f64,
}

/// The tolerances of contract point 7 for `samples` (`T`) samples of `classes` (`C`) classes:
/// with `u = 2^-24` and `L = ln C + 1`, mean `(2T + 4) u`, variance `(4T + 8) u`, predictive
/// entropy `(8T + C + 8) u L`, expected entropy `(T + C + 8) u L`, mutual information their sum.
pub fn f32_tolerance(samples: usize, classes: usize) -> Tolerance {
    let u = F32_UNIT_ROUNDOFF;
    let t = samples as f64;
    let c = classes as f64;
    let l = c.max(1.0).ln() + 1.0;
    let predictive_entropy = (8.0 * t + c + 8.0) * u * l;
    let expected_entropy = (t + c + 8.0) * u * l;
    Tolerance {
        mean: (2.0 * t + 4.0) * u,
        variance: (4.0 * t + 8.0) * u,
        predictive_entropy,
        expected_entropy,
        mutual_information: predictive_entropy + expected_entropy,
    }
}
