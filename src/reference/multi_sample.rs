//! Multi-sample dropout with fused loss averaging (Inoue 2019) on the CPU, in `f64`: the oracle for
//! the GPU head kernels.
//!
//! `K` dropout samples of the features go through one shared linear classifier; the per-sample
//! cross-entropy losses are averaged. Plain and slow on purpose: every sum is a loop in `f64`,
//! nothing is fused. The contract:
//!
//! 1. **Inputs.** Features `h` (`B x D`, row-major, element type `T`), classifier weight `W`
//!    (`C x D`, row-major, `T`), optional bias `b` (`C`, `T`), labels `y` (`B` entries, `i64`) with
//!    an ignore index (default [`DEFAULT_IGNORE_INDEX`], `-100`; a label equal to it is ignored, even
//!    when it is in `[0, C)`), `K >= 1` samples, drop probability `p` in `[0, 1]`, label smoothing
//!    `eps` in `[0, 1]` and a [`PhiloxState`] ([`HeadConfig`]).
//! 2. **Masks.** Sample `k` (`0 <= k < K`) uses the dropout contract with the state
//!    `{ seed, offset: offset.wrapping_add(k) }` ([`sample_state`]; what
//!    [`Generator::next_streams(K)`](crate::Generator::next_streams) hands out) over the `B * D`
//!    elements of `h`, element `e = i * D + j` (element offset 0):
//!    `h_k[e] = keep ? T::from_f32(h[e].to_f32() * scale) : +0`, exactly
//!    [`dropout::forward`](crate::reference::dropout::forward), so the copies are what a kernel
//!    would materialise in `T` ([`masked_copies`]). In evaluation mode (`train = false`) `K` is
//!    taken as 1 and `h_0 = h` (every element kept, scale 1; [`Samples::identity`]); `k` and `p`
//!    are still validated.
//! 3. **Logits** (`f64`, values widened exactly): `z_k[i][c] = (sum_j W[c][j] * h_k[i][j]) + b[c]`,
//!    summed over `j` in ascending order, the bias added last ([`logits`]).
//! 4. **Cross-entropy** of row `i` with label `y_i` (not ignored) and smoothing `eps` (PyTorch's
//!    definition): `lse = m + ln(sum_c exp(z_c - m))` with `m = max_c z_c` (stable),
//!    `CE_i = (1 - eps) * (lse - z_{y_i}) + eps * (lse - mean_c z_c)`, averaged over the `n_valid`
//!    non-ignored rows. If every row is ignored, the loss is 0 and every gradient is 0.
//! 5. **Weighted loss averaging** ([`weighted_cross_entropy`], the general kernel): for `K` logit
//!    sets and weights `w_k` (finite, `>= 0`, summing to 1 within [`WEIGHT_SUM_TOLERANCE`]),
//!    `loss = sum_k w_k * mean_i CE_i(z_k)` and
//!    `dz_k[i][c] = w_k * (softmax(z_k[i])[c] - t_i[c]) / n_valid` with
//!    `t_i[c] = (1 - eps) * [c == y_i] + eps / C`, and 0 for ignored rows. Multi-sample dropout
//!    uses `w_k = 1 / K`.
//! 6. **Outputs** ([`head`], [`HeadForward`]): the loss, the averaged logits `sum_k z_k / K`
//!    (`B x C`), and the backward: `dh = sum_k (dz_k . W) * keep_k * scale` (`B x D`; the chain
//!    rule through `h_k = h * keep * scale`, ignoring the rounding to `T`), `dW = sum_k dz_k^T . h_k`
//!    (`C x D`), `db = sum_k sum_i dz_k[i]` (`C`, only with a bias). Sums over `k` run in
//!    ascending order.
//! 7. **Validation**, before any work, as [`Error::InvalidArgument`] named `h` (`B * D` elements,
//!    `B >= 1`, `D >= 1`), `weight` (`C * D`, `C >= 1`; the `K * B * C` logits must be
//!    allocatable), `bias` (`C`), `labels` (`B` entries, each in `[0, C)` or the ignore index), `k`
//!    (`>= 1`, the `K` copies allocatable), `p` (finite, in `[0, 1]`), `label_smoothing`
//!    (finite, in `[0, 1]`), `weights` (see 5), and for the lower-level functions `logits`
//!    (`K * B * C` values), `keep` (one flag per element of every copy) and `scale` (finite,
//!    `>= 0`). Non-finite inputs are not rejected; they propagate.
//!
//! [`head`] is [`masked_copies`] (or [`Samples::identity`]), [`Samples::widen`] and
//! [`head_from_samples`]; the last one is also the loss as a function of the copies, for gradient
//! checks with the masks held fixed.

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::dropout::{drop_threshold, keep, keep_scale};
use crate::rng::PhiloxState;

/// The default ignore index of the labels (PyTorch's `ignore_index`).
pub const DEFAULT_IGNORE_INDEX: i64 = -100;

/// How far the loss weights' sum may be from 1.
pub const WEIGHT_SUM_TOLERANCE: f64 = 1e-6;

/// The configuration of a multi-sample dropout head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadConfig {
    /// Dropout samples `K` (>= 1); taken as 1 when `train` is false.
    pub k: usize,
    /// Drop probability, finite and in `[0, 1]`.
    pub p: f64,
    /// Label smoothing `eps`, finite and in `[0, 1]`.
    pub label_smoothing: f64,
    /// Labels equal to this are ignored.
    pub ignore_index: i64,
    /// Training mode (dropout on); `false` runs one pass on `h` itself.
    pub train: bool,
}

impl HeadConfig {
    /// `K` samples at drop probability `p`, training mode, no smoothing, ignore index -100.
    pub fn new(k: usize, p: f64) -> Self {
        HeadConfig {
            k,
            p,
            label_smoothing: 0.0,
            ignore_index: DEFAULT_IGNORE_INDEX,
            train: true,
        }
    }
}

impl Default for HeadConfig {
    /// One sample, `p = 0`: a plain linear layer with cross-entropy.
    fn default() -> Self {
        HeadConfig::new(1, 0.0)
    }
}

/// The `K` masked copies of the features, their keep flags and the scale of kept elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples<T> {
    /// `copies[k]`: `h_k`, `B * D` values.
    pub copies: Vec<Vec<T>>,
    /// `keep[k][e]`: whether element `e` is kept in sample `k`.
    pub keep: Vec<Vec<bool>>,
    /// The scale of kept elements ([`keep_scale`]); 1 in evaluation mode.
    pub scale: f32,
}

impl<T: Element> Samples<T> {
    /// Evaluation mode: one copy, `h` itself, every element kept, scale 1.
    pub fn identity(h: &[T]) -> Self {
        Samples {
            copies: vec![h.to_vec()],
            keep: vec![vec![true; h.len()]],
            scale: 1.0,
        }
    }

    /// The copies widened exactly to `f64`.
    pub fn widen(&self) -> Samples<f64> {
        Samples {
            copies: self.copies.iter().map(|c| widen(c)).collect(),
            keep: self.keep.clone(),
            scale: self.scale,
        }
    }
}

/// The outputs of the head: the loss, the averaged logits and the gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadForward {
    /// `sum_k w_k * mean_i CE_i(z_k)` with `w_k = 1 / K`.
    pub loss: f64,
    /// `sum_k z_k / K`, `B x C` row-major.
    pub mean_logits: Vec<f64>,
    /// The gradient of the loss with respect to `h`, `B x D`.
    pub dh: Vec<f64>,
    /// The gradient with respect to `W`, `C x D`.
    pub dw: Vec<f64>,
    /// The gradient with respect to `b` (`C`), when a bias was given.
    pub db: Option<Vec<f64>>,
}

/// The state of sample `k`: `{ seed, offset: offset.wrapping_add(k) }`.
pub fn sample_state(state: PhiloxState, k: u64) -> PhiloxState {
    PhiloxState::new(state.seed, state.offset.wrapping_add(k))
}

/// Widens every value exactly to `f64`.
fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// Checks `h` (`B * D` values, `B >= 1`, `D >= 1`) and returns `B`.
fn check_h(len: usize, d: usize) -> Result<usize> {
    if d == 0 || len == 0 || len % d != 0 {
        return Err(Error::invalid(
            "h",
            format!("B * D values with B >= 1 and D = {d} >= 1"),
            format!("{len} values"),
        ));
    }
    Ok(len / d)
}

/// Checks that `weight` has `C * D` values with `C >= 1`.
fn check_weight(len: usize, c: usize, d: usize) -> Result<()> {
    match c.checked_mul(d) {
        Some(n) if c >= 1 && n == len => Ok(()),
        _ => Err(Error::invalid(
            "weight",
            format!("C * D values with C = {c} >= 1 and D = {d}"),
            format!("{len} values"),
        )),
    }
}

/// `K * B * C` logits, or an error named `name` when that overflows `usize`.
fn logits_len(name: &'static str, k: usize, b: usize, c: usize) -> Result<usize> {
    k.checked_mul(b).and_then(|kb| kb.checked_mul(c)).ok_or_else(|| {
        Error::invalid(
            name,
            format!("K * B * C logits that fit in usize (K = {k}, B = {b})"),
            format!("C = {c}"),
        )
    })
}

/// Checks that the bias, if any, has `C` values.
fn check_bias(len: Option<usize>, c: usize) -> Result<()> {
    match len {
        Some(n) if n != c => Err(Error::invalid(
            "bias",
            format!("{c} values (C)"),
            format!("{n} values"),
        )),
        _ => Ok(()),
    }
}

/// Checks `B` labels, each in `[0, C)` or equal to the ignore index.
fn check_labels(labels: &[i64], b: usize, c: usize, ignore_index: i64) -> Result<()> {
    if labels.len() != b {
        return Err(Error::invalid(
            "labels",
            format!("{b} labels (B)"),
            format!("{} labels", labels.len()),
        ));
    }
    for (i, &y) in labels.iter().enumerate() {
        let in_range = usize::try_from(y).is_ok_and(|v| v < c);
        if !in_range && y != ignore_index {
            return Err(Error::invalid(
                "labels",
                format!("labels in [0, {c}) or the ignore index {ignore_index}"),
                format!("{y} at row {i}"),
            ));
        }
    }
    Ok(())
}

/// Checks `K >= 1`.
fn check_k(k: usize) -> Result<()> {
    if k == 0 {
        Err(Error::invalid("k", "K >= 1 samples", 0))
    } else {
        Ok(())
    }
}

/// Checks that `v` is finite and in `[0, 1]` (NaN fails the comparison).
fn check_unit(name: &'static str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(name, "a finite value in [0, 1]", v))
    }
}

/// Checks `K` loss weights: finite, `>= 0`, summing to 1 within [`WEIGHT_SUM_TOLERANCE`].
fn check_weights(weights: &[f64], k: usize) -> Result<()> {
    if weights.len() != k {
        return Err(Error::invalid(
            "weights",
            format!("{k} weights (K)"),
            format!("{} weights", weights.len()),
        ));
    }
    if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(Error::invalid("weights", "finite weights >= 0", w));
    }
    let sum: f64 = weights.iter().sum();
    if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
        return Err(Error::invalid(
            "weights",
            format!("weights summing to 1 (within {WEIGHT_SUM_TOLERANCE:e})"),
            format!("a sum of {sum}"),
        ));
    }
    Ok(())
}

/// The `K` masked copies of `h` (contract point 2): sample `k` keeps element `e` iff
/// [`keep`]`(sample_state(state, k), e, drop_threshold(p))`, and kept elements become
/// `T::from_f32(h[e].to_f32() * keep_scale(p))`, dropped ones `+0`.
///
/// Errors: `h` (empty), `k` (0, or more copies than can be allocated), `p` (not a probability).
pub fn masked_copies<T: Element>(h: &[T], k: usize, p: f64, state: PhiloxState) -> Result<Samples<T>> {
    if h.is_empty() {
        return Err(Error::invalid("h", "a non-empty tensor", "0 elements"));
    }
    check_k(k)?;
    let threshold = drop_threshold(p)?;
    let scale = keep_scale(p)?;
    // K copies of h: K * n values must be addressable, the K copies' handles allocatable.
    if k.checked_mul(h.len()).is_none() {
        return Err(Error::invalid(
            "k",
            format!("K * n values that fit in usize (n = {})", h.len()),
            k,
        ));
    }
    let mut copies = crate::alloc::with_capacity("k", k)?;
    let mut keeps = crate::alloc::with_capacity("k", k)?;
    for s in 0..k {
        let st = sample_state(state, s as u64);
        let kept: Vec<bool> = (0..h.len()).map(|e| keep(st, e as u64, threshold)).collect();
        let copy = h
            .iter()
            .zip(&kept)
            .map(|(&x, &kp)| {
                if kp {
                    T::from_f32(x.to_f32() * scale)
                } else {
                    T::from_f32(0.0)
                }
            })
            .collect();
        copies.push(copy);
        keeps.push(kept);
    }
    Ok(Samples {
        copies,
        keep: keeps,
        scale,
    })
}

/// The logits of one copy (contract point 3): `z[i][c] = (sum_j W[c][j] * h[i][j]) + b[c]`,
/// `B x C` row-major, for `h` of `B x D` values and `W` of `C x D`.
///
/// Errors: `h`, `weight` (also when the `B * C` logits cannot be allocated), `bias`.
pub fn logits(h: &[f64], d: usize, weight: &[f64], c: usize, bias: Option<&[f64]>) -> Result<Vec<f64>> {
    let b = check_h(h.len(), d)?;
    check_weight(weight.len(), c, d)?;
    check_bias(bias.map(<[f64]>::len), c)?;
    let mut z = crate::alloc::filled("weight", logits_len("weight", 1, b, c)?, 0.0)?;
    for i in 0..b {
        let row = &h[i * d..(i + 1) * d];
        for cls in 0..c {
            let w = &weight[cls * d..(cls + 1) * d];
            let mut acc = 0.0;
            for j in 0..d {
                acc += w[j] * row[j];
            }
            if let Some(bias) = bias {
                acc += bias[cls];
            }
            z[i * c + cls] = acc;
        }
    }
    Ok(z)
}

/// Weighted cross-entropy averaging over `K` logit sets (contract points 4 and 5).
///
/// `logits` holds `K` sets of `B x C` values, set `k` at `k * B * C`. Returns the loss
/// `sum_k w_k * mean_i CE_i(z_k)` and `dz` (same layout as `logits`),
/// `dz_k[i][c] = w_k * (softmax(z_k[i])[c] - t_i[c]) / n_valid`, 0 on ignored rows; everything 0
/// when every row is ignored. `softmax[c]` is computed as `exp(z_c - lse)` for `c != y`; the
/// label's gradient `p_y - t_y` as `(1 - t_y) - (1 - p_y)`, with `1 - t_y = eps * (C - 1) / C` and
/// `1 - p_y` the sum of the other classes' probabilities, so that it keeps its digits on
/// confidently classified rows (`exp(z_y - lse) - t_y` cancels there), and `C = 1` gives a loss and
/// gradients of exactly 0.
///
/// Errors: `k` (0), `logits` (`B` or `C` is 0, or not `K * B * C` values), `weights`, `labels`,
/// `label_smoothing`.
#[allow(clippy::too_many_arguments)]
pub fn weighted_cross_entropy(
    logits: &[f64],
    k: usize,
    b: usize,
    c: usize,
    weights: &[f64],
    labels: &[i64],
    ignore_index: i64,
    label_smoothing: f64,
) -> Result<(f64, Vec<f64>)> {
    check_k(k)?;
    let n = k.checked_mul(b).and_then(|kb| kb.checked_mul(c));
    if b == 0 || c == 0 || n != Some(logits.len()) {
        return Err(Error::invalid(
            "logits",
            format!("K * B * C values with K = {k}, B = {b} >= 1, C = {c} >= 1"),
            format!("{} values", logits.len()),
        ));
    }
    check_weights(weights, k)?;
    check_labels(labels, b, c, ignore_index)?;
    check_unit("label_smoothing", label_smoothing)?;

    let eps = label_smoothing;
    let mut dz = vec![0.0; logits.len()];
    let n_valid = labels.iter().filter(|&&y| y != ignore_index).count();
    if n_valid == 0 {
        return Ok((0.0, dz));
    }
    let n_valid = n_valid as f64;
    let mut loss = 0.0;
    for (s, &w) in weights.iter().enumerate() {
        let mut total = 0.0;
        for (i, &y) in labels.iter().enumerate() {
            if y == ignore_index {
                continue;
            }
            let y = y as usize;
            let base = (s * b + i) * c;
            let z = &logits[base..base + c];
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
            let mean = z.iter().sum::<f64>() / c as f64;
            total += (1.0 - eps) * (lse - z[y]) + eps * (lse - mean);
            // t[y] = (1 - eps) + eps / C, written 1 - eps * (C - 1) / C so that C = 1 gives
            // exactly 1 (and a zero gradient) for every eps.
            let off_target = eps / c as f64;
            let mut others = 0.0; // 1 - p_y, summed from the other classes: no cancellation
            for (cls, g) in dz[base..base + c].iter_mut().enumerate() {
                if cls != y {
                    let p = (z[cls] - lse).exp();
                    others += p;
                    *g = w * (p - off_target) / n_valid;
                }
            }
            // p_y - t_y = (1 - t_y) - (1 - p_y), with 1 - t_y = eps * (C - 1) / C.
            dz[base + y] = w * (eps * (c - 1) as f64 / c as f64 - others) / n_valid;
        }
        loss += w * (total / n_valid);
    }
    Ok((loss, dz))
}

/// The head on given copies (contract points 3 to 6), with `w_k = 1 / K` and
/// `K = samples.copies.len()`: the loss as a function of the copies, and its gradients through
/// `h_k = h * keep_k * scale`.
///
/// Errors: `k` (no copies), `h` (copies not all `B * D` values), `keep` (not one flag per element
/// of every copy), `scale` (not finite or negative), `weight`, `bias`, `labels`, `label_smoothing`.
#[allow(clippy::too_many_arguments)]
pub fn head_from_samples(
    samples: &Samples<f64>,
    d: usize,
    weight: &[f64],
    c: usize,
    bias: Option<&[f64]>,
    labels: &[i64],
    label_smoothing: f64,
    ignore_index: i64,
) -> Result<HeadForward> {
    let k = samples.copies.len();
    check_k(k)?;
    let len = samples.copies[0].len();
    let b = check_h(len, d)?;
    if let Some(bad) = samples.copies.iter().find(|h| h.len() != len) {
        return Err(Error::invalid(
            "h",
            format!("every copy with {len} values (B * D)"),
            format!("a copy with {} values", bad.len()),
        ));
    }
    if samples.keep.len() != k || samples.keep.iter().any(|m| m.len() != len) {
        return Err(Error::invalid(
            "keep",
            format!("{k} flag sets of {len} flags (one per copy element)"),
            format!("{} flag sets", samples.keep.len()),
        ));
    }
    let scale = f64::from(samples.scale);
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(Error::invalid("scale", "a finite scale >= 0", scale));
    }
    check_weight(weight.len(), c, d)?;
    check_bias(bias.map(<[f64]>::len), c)?;
    check_labels(labels, b, c, ignore_index)?;
    check_unit("label_smoothing", label_smoothing)?;

    let mut z = crate::alloc::with_capacity("weight", logits_len("weight", k, b, c)?)?;
    for h in &samples.copies {
        z.extend(logits(h, d, weight, c, bias)?);
    }
    let weights = vec![1.0 / k as f64; k];
    let (loss, dz) = weighted_cross_entropy(&z, k, b, c, &weights, labels, ignore_index, label_smoothing)?;

    let mut mean_logits = vec![0.0; b * c];
    for zk in z.chunks(b * c) {
        for (m, &v) in mean_logits.iter_mut().zip(zk) {
            *m += v;
        }
    }
    for m in &mut mean_logits {
        *m /= k as f64;
    }

    let mut dh = vec![0.0; b * d];
    let mut dw = vec![0.0; c * d];
    let mut db = bias.map(|_| vec![0.0; c]);
    for s in 0..k {
        let dzk = &dz[s * b * c..(s + 1) * b * c];
        let h = &samples.copies[s];
        let kept = &samples.keep[s];
        for i in 0..b {
            for j in 0..d {
                let e = i * d + j;
                if kept[e] {
                    let mut g = 0.0;
                    for cls in 0..c {
                        g += dzk[i * c + cls] * weight[cls * d + j];
                    }
                    dh[e] += g * scale;
                }
            }
        }
        for cls in 0..c {
            for j in 0..d {
                let mut g = 0.0;
                for i in 0..b {
                    g += dzk[i * c + cls] * h[i * d + j];
                }
                dw[cls * d + j] += g;
            }
        }
        if let Some(db) = db.as_mut() {
            for (cls, g) in db.iter_mut().enumerate() {
                *g += (0..b).map(|i| dzk[i * c + cls]).sum::<f64>();
            }
        }
    }
    Ok(HeadForward {
        loss,
        mean_logits,
        dh,
        dw,
        db,
    })
}

/// [`head`]'s validation (every argument, before any work) and its samples (masked copies of
/// `h`, or `h` itself outside training); returns `B` and the samples.
#[allow(clippy::too_many_arguments)]
fn head_samples<T: Element>(
    h: &[T],
    d: usize,
    weight: &[T],
    c: usize,
    bias: Option<&[T]>,
    labels: &[i64],
    cfg: &HeadConfig,
    state: PhiloxState,
) -> Result<(usize, Samples<T>)> {
    let b = check_h(h.len(), d)?;
    check_weight(weight.len(), c, d)?;
    check_bias(bias.map(<[T]>::len), c)?;
    check_labels(labels, b, c, cfg.ignore_index)?;
    check_k(cfg.k)?;
    drop_threshold(cfg.p)?;
    check_unit("label_smoothing", cfg.label_smoothing)?;
    let samples = if cfg.train {
        masked_copies(h, cfg.k, cfg.p, state)?
    } else {
        Samples::identity(h)
    };
    Ok((b, samples))
}

/// The multi-sample dropout head (the whole contract): masked copies of `h` (`B x D`, `B` from
/// `h.len() / d`), logits through `W` (`C x D`) and `b`, the averaged cross-entropy and the
/// gradients.
///
/// Errors, before any work: `h`, `weight`, `bias`, `labels`, `k`, `p`, `label_smoothing`.
#[allow(clippy::too_many_arguments)]
pub fn head<T: Element>(
    h: &[T],
    d: usize,
    weight: &[T],
    c: usize,
    bias: Option<&[T]>,
    labels: &[i64],
    cfg: &HeadConfig,
    state: PhiloxState,
) -> Result<HeadForward> {
    let (_, samples) = head_samples(h, d, weight, c, bias, labels, cfg, state)?;
    let weight = widen(weight);
    let bias = bias.map(widen);
    head_from_samples(
        &samples.widen(),
        d,
        &weight,
        c,
        bias.as_deref(),
        labels,
        cfg.label_smoothing,
        cfg.ignore_index,
    )
}

/// The per-element rounding slack the GPU head documents on top of its relative bounds
/// (`dropfuse::multi_sample::MultiSampleHead`): its checks are
/// `||got - ref|| <= tol ||ref|| + ||slack||`, since the relative error norm alone cannot hold
/// when a result is a cancellation (with label smoothing `dz` rows nearly cancel; `dh` with
/// `D = 1` is a sum over the classes of `dz W` whose `dz` row sums to 0; `db` sums `p - t` over
/// rows): rounding errors are relative to a sum's terms, not to the sum.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSlack {
    /// `(D + K + 3) u` times the averaged logits' magnitudes `(1/K) sum_k (sum_j |W h_k| + |b|)`.
    pub mean_logits: Vec<f64>,
    /// `sum_k keep scale sum_c e |W|`, with `e` the bound of each `dz` element: the f32
    /// cross-entropy (relative to `softmax + t`), twice its rounding to `T`
    /// (`u_T |dz| + underflow_T / S`, `S` = `logits_grad_scale`), and the f32 sums it enters
    /// (`(max(C, K B) + K + 2) u |dz|`); first-order worst cases for any summation order.
    pub dh: Vec<f64>,
    /// `sum_k sum_i e |h_k|`.
    pub dw: Vec<f64>,
    /// `sum_k sum_i e`.
    pub db: Vec<f64>,
}

/// The [`HeadSlack`] of the head [`head`] computes from the same arguments (errors as [`head`]).
#[allow(clippy::too_many_arguments)]
pub fn head_rounding_slack<T: Element>(
    h: &[T],
    d: usize,
    weight: &[T],
    c: usize,
    bias: Option<&[T]>,
    labels: &[i64],
    cfg: &HeadConfig,
    state: PhiloxState,
) -> Result<HeadSlack> {
    const U32: f64 = 1.0 / 16_777_216.0;
    let (unit_t, underflow_t) = match T::DTYPE {
        crate::DType::F32 => (U32, 2f64.powi(-150)),
        crate::DType::F16 => (1.0 / 2048.0, 2f64.powi(-25)),
        crate::DType::BF16 => (1.0 / 256.0, 2f64.powi(-134)),
    };
    let (b, samples) = head_samples(h, d, weight, c, bias, labels, cfg, state)?;
    let samples = samples.widen();
    let k = samples.copies.len();
    let w = widen(weight);
    let bias = bias.map(widen);
    let mut z = Vec::with_capacity(k * b * c);
    for hk in &samples.copies {
        z.extend(logits(hk, d, &w, c, bias.as_deref())?);
    }
    let weights = vec![1.0 / k as f64; k];
    let (ii, eps) = (cfg.ignore_index, cfg.label_smoothing);
    let (_, dz) = weighted_cross_entropy(&z, k, b, c, &weights, labels, ii, eps)?;
    let floor = underflow_t / f64::from(crate::multi_sample::MultiSampleHead::logits_grad_scale(k, b));
    let n_valid = labels.iter().filter(|&&y| y != ii).count();
    let mut dz_err = vec![0.0; k * b * c];
    for r in 0..k * b {
        let y = labels[r % b];
        if y == ii || n_valid == 0 {
            continue; // written as exact zeros
        }
        let zr = &z[r * c..(r + 1) * c];
        let m = zr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + zr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let coef = 1.0 / (k * n_valid) as f64;
        for cls in 0..c {
            let t = if cls as i64 == y {
                1.0 - eps * (c - 1) as f64 / c as f64
            } else {
                eps / c as f64
            };
            let p = (zr[cls] - lse).exp();
            let v = dz[r * c + cls].abs();
            dz_err[r * c + cls] = (lse.abs() + 8.0) * U32 * coef * (p + t)
                + 2.0 * (unit_t * v + floor)
                + (c.max(k * b) + k + 2) as f64 * U32 * v;
        }
    }
    let gamma_logits = (d + k + 3) as f64 * U32;
    let scale = f64::from(samples.scale);
    let mut m = HeadSlack {
        mean_logits: vec![0.0; b * c],
        dh: vec![0.0; b * d],
        dw: vec![0.0; c * d],
        db: vec![0.0; c],
    };
    for (s, hk) in samples.copies.iter().enumerate() {
        let ek = &dz_err[s * b * c..(s + 1) * b * c];
        for i in 0..b {
            for cls in 0..c {
                let dot: f64 = (0..d).map(|j| (w[cls * d + j] * hk[i * d + j]).abs()).sum();
                let bias_abs = bias.as_ref().map_or(0.0, |v| v[cls].abs());
                m.mean_logits[i * c + cls] += gamma_logits * (dot + bias_abs) / k as f64;
                let e = ek[i * c + cls];
                m.db[cls] += e;
                for j in 0..d {
                    if samples.keep[s][i * d + j] {
                        m.dh[i * d + j] += e * w[cls * d + j].abs() * scale;
                    }
                    m.dw[cls * d + j] += e * hk[i * d + j].abs();
                }
            }
        }
    }
    Ok(m)
}
