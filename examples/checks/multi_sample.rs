//! Multi-sample dropout and weighted cross-entropy, `dropfuse::reference::multi_sample`: the K
//! masked copies, the `f32` formulas of the dh reduction and of the averaged logits (the GPU's
//! contract in `dropfuse::multi_sample`, which the reference leaves to the caller), the weighted
//! cross-entropy and its documented error bounds.

use dropfuse::dropout::mask_words;
use dropfuse::reference::dropout as dropout_ref;
use dropfuse::reference::multi_sample::{self as reference, Samples};
use dropfuse::{DType, Element, PhiloxState};

use super::Checks;

/// The bounds `dropfuse::multi_sample` documents against the `f64` reference (logits of magnitude
/// up to about 10): the loss within `LOSS_TOL * max(1, |loss|)`, the gradient's relative error
/// norm within `GRAD_TOL_F32` written in `f32`, `GRAD_TOL_16` in `f16` / `bf16`.
pub const LOSS_TOL: f64 = 1e-5;
pub const GRAD_TOL_F32: f64 = 1e-5;
pub const GRAD_TOL_16: f64 = 1e-2;

/// `||got - want|| / ||want||` (the absolute norm when `want` is 0).
pub fn rel_err_norm(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// The Euclidean norm.
fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Values widened exactly to `f64`.
pub fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// A weighted cross-entropy problem: `K` logit sets of `B x C` sharing `B` labels.
#[derive(Debug, Clone)]
pub struct CeProblem {
    pub k: usize,
    pub b: usize,
    pub c: usize,
    pub weights: Vec<f64>,
    pub labels: Vec<i64>,
    pub ignore_index: i64,
    pub label_smoothing: f64,
}

impl CeProblem {
    /// The reference's loss and logits' gradient for the logits `z` (`K * B * C`, widened).
    pub fn reference(&self, z: &[f64]) -> dropfuse::Result<(f64, Vec<f64>)> {
        reference::weighted_cross_entropy(
            z,
            self.k,
            self.b,
            self.c,
            &self.weights,
            &self.labels,
            self.ignore_index,
            self.label_smoothing,
        )
    }

    /// Whether row `i` is ignored.
    pub fn ignored(&self, i: usize) -> bool {
        self.labels[i] == self.ignore_index
    }

    /// The non-ignored rows.
    pub fn n_valid(&self) -> usize {
        (0..self.b).filter(|&i| !self.ignored(i)).count()
    }

    /// A GPU result (`loss`, `dz` widened) against the reference's (`want`) within the documented
    /// bounds for a gradient written in `grad`: the loss, the gradient's relative error norm, and
    /// exactly `0` on ignored rows (everything `0` when every row is ignored). Returns the
    /// failures.
    pub fn within_bounds(
        &self,
        loss: f64,
        dz: Option<&[f64]>,
        want: &(f64, Vec<f64>),
        grad: DType,
    ) -> Vec<String> {
        let mut bad = Vec::new();
        let (want_loss, want_dz) = want;
        // Written so that a NaN fails.
        let loss_ok = (loss - want_loss).abs() <= LOSS_TOL * want_loss.abs().max(1.0);
        if !loss_ok {
            bad.push(format!(
                "loss {loss} vs reference {want_loss} (bound {LOSS_TOL:e} relative)"
            ));
        }
        if self.n_valid() == 0 && loss != 0.0 {
            bad.push(format!("every row ignored: loss {loss}, want 0"));
        }
        let Some(dz) = dz else { return bad };
        let tol = if grad == DType::F32 {
            GRAD_TOL_F32
        } else {
            GRAD_TOL_16
        };
        let err = rel_err_norm(dz, want_dz);
        // Elements below the type's normal range round to a multiple of its smallest subnormal
        // (an absolute error up to half of it, as the docs state): on confidently classified rows
        // written in f16 every element can be there, where a relative bound cannot hold.
        let (floor, min_normal) = match grad {
            DType::F32 => (0.0, 0.0),
            DType::F16 => (2f64.powi(-25), 2f64.powi(-14)),
            DType::BF16 => (2f64.powi(-134), 2f64.powi(-126)),
        };
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff: Vec<f64> = dz.iter().zip(want_dz).map(|(g, w)| g - w).collect();
        // The allowance only for the elements whose reference is below the normal range.
        let below: Vec<f64> = want_dz
            .iter()
            .map(|w| if w.abs() < min_normal { floor } else { 0.0 })
            .collect();
        let bound = tol * norm(want_dz) + norm(&below);
        // Written so that a NaN fails.
        let grad_ok = err <= tol || norm(&diff) <= bound;
        if !grad_ok {
            bad.push(format!(
                "dz relative error norm {err:e} > {tol:e} (and over the subnormal allowance)"
            ));
        }
        let row = self.c;
        let nonzero_ignored = (0..self.k * self.b)
            .filter(|&r| self.ignored(r % self.b) && dz[r * row..(r + 1) * row].iter().any(|&v| v != 0.0))
            .count();
        if nonzero_ignored > 0 {
            bad.push(format!("{nonzero_ignored} ignored rows of dz not all 0"));
        }
        bad
    }
}

/// The `K` masks as `dropfuse::reference::dropout::mask` draws them on the streams
/// `offset + k` (wrapping), sample `k`'s `ceil(n / 32)` words at `k * ceil(n / 32)`.
pub fn sample_masks(k: usize, p: f64, state: PhiloxState, n: usize) -> dropfuse::Result<Vec<u32>> {
    let mut masks = Vec::with_capacity(k * mask_words(n));
    for s in 0..k {
        let st = PhiloxState::new(state.seed, state.offset.wrapping_add(s as u64));
        masks.extend(dropout_ref::mask(p, st, 0, n)?);
    }
    Ok(masks)
}

fn bit(mask: &[u32], e: usize) -> bool {
    (mask[e / 32] >> (e % 32)) & 1 == 1
}

/// The dh reduction's formula (`MultiSample::reduce`): `dh[e] = +0 + sum_k (keep_k(e) ? f32(g_k[e])
/// * scale)`, in `f32` with `k` ascending, each product rounded, then added; rounded once to `O`.
pub fn reduce_model<G: Element, O: Element>(grads: &[G], masks: &[u32], scale: f32, n: usize) -> Vec<O> {
    let words = mask_words(n);
    let k = grads.len() / n;
    (0..n)
        .map(|e| {
            let mut acc = 0.0f32;
            for s in 0..k {
                if bit(&masks[s * words..(s + 1) * words], e) {
                    acc += grads[s * n + e].to_f32() * scale;
                }
            }
            O::from_f32(acc)
        })
        .collect()
}

/// The averaged logits' formula (`mean_logits`): `(+0 + z_0 + ... + z_{K-1}) * f32(1 / K)` in
/// `f32`, `k` ascending; rounded once to `O`.
pub fn mean_model<T: Element, O: Element>(z: &[T], k: usize, n: usize) -> Vec<O> {
    let inv = (1.0 / k as f64) as f32;
    (0..n)
        .map(|e| {
            let mut acc = 0.0f32;
            for s in 0..k {
                acc += z[s * n + e].to_f32();
            }
            O::from_f32(acc * inv)
        })
        .collect()
}

/// The masked copies (contract point 2): sample `k`'s keep flags are the dropout mask on stream
/// `offset + k`, its copy is `kept ? round_T(h * scale) : +0` with the dropout scale
/// (`(1 / (1 - p)) as f32`, `0` for `p = 1`). Returns the reference's samples.
pub fn check_copies<T: Element>(
    checks: &mut Checks,
    h: &[T],
    k: usize,
    p: f64,
    state: PhiloxState,
) -> dropfuse::Result<Samples<T>> {
    let n = h.len();
    let got = reference::masked_copies(h, k, p, state)?;
    let masks = sample_masks(k, p, state, n)?;
    let words = mask_words(n);
    let scale = if p == 1.0 { 0.0 } else { (1.0 / (1.0 - p)) as f32 };
    let mut keep_bad = None;
    let mut copy_bad = None;
    if got.copies.len() != k || got.keep.len() != k {
        keep_bad = Some(format!(
            "{} copies and {} flag sets, want {k}",
            got.copies.len(),
            got.keep.len()
        ));
    } else {
        for s in 0..k {
            let mask = &masks[s * words..(s + 1) * words];
            let flags: Vec<bool> = (0..n).map(|e| bit(mask, e)).collect();
            if keep_bad.is_none() {
                keep_bad = super::word_diff(&got.keep[s], &flags).map(|d| format!("sample {s}: {d}"));
            }
            let want: Vec<T> = (0..n)
                .map(|e| {
                    if flags[e] {
                        T::from_f32(h[e].to_f32() * scale)
                    } else {
                        T::from_f32(0.0)
                    }
                })
                .collect();
            if copy_bad.is_none() {
                copy_bad = super::bit_diff(&got.copies[s], &want).map(|d| format!("sample {s}: {d}"));
            }
        }
    }
    checks.push("keep flags of sample k: the dropout mask on offset + k", keep_bad);
    checks.push("copy k: kept ? round(h * scale) : +0", copy_bad);
    checks.expect(
        "scale: 1 / (1 - p) as f32, 0 for p = 1",
        got.scale.to_bits() == scale.to_bits(),
        || format!("{} vs {scale}", got.scale),
    );
    Ok(got)
}

/// The averaged logits' `f32` formula against the exact mean (in `f64`): within the rounding of
/// `K` adds, one multiply and the conversion to `O` (finite values only; exact for `K = 1` in `f32`).
pub fn check_mean_model<T: Element, O: Element>(checks: &mut Checks, z: &[T], k: usize, n: usize) {
    let got: Vec<O> = mean_model(z, k, n);
    let unit = 2f64.powi(-24);
    let out_unit = if O::DTYPE == DType::F32 {
        unit
    } else if O::DTYPE == DType::F16 {
        2f64.powi(-11)
    } else {
        2f64.powi(-8)
    };
    let mut bad = None;
    for e in 0..n {
        let terms: Vec<f64> = (0..k).map(|s| f64::from(z[s * n + e].to_f32())).collect();
        let g = f64::from(got[e].to_f32());
        if terms.iter().any(|t| !t.is_finite()) || !g.is_finite() {
            continue;
        }
        let exact: f64 = terms.iter().sum::<f64>() / k as f64;
        let mass: f64 = terms.iter().map(|t| t.abs()).sum::<f64>() / k as f64;
        // K adds and the multiply by a rounded 1/K, each at most one f32 unit of the running
        // magnitude, then one rounding to O (and the smallest subnormal step of O).
        let bound = (k as f64 + 3.0) * unit * mass + out_unit * exact.abs() + 2f64.powi(-24);
        if (g - exact).abs() > bound {
            bad = Some(format!("[{e}] {g} vs exact {exact} (bound {bound:e})"));
            break;
        }
    }
    checks.push(
        format!("mean -> {}: within K + 3 f32 roundings of exact", O::DTYPE.name()),
        bad,
    );
}

/// The weighted cross-entropy (points 4 and 5) against the contract written out here: the loss
/// and gradient formulas, a central finite difference of the loss at up to three logits, rows of
/// the gradient summing to 0, ignored rows exactly 0. Returns the reference's loss and gradient.
pub fn check_cross_entropy(
    checks: &mut Checks,
    z: &[f64],
    p: &CeProblem,
) -> dropfuse::Result<(f64, Vec<f64>)> {
    let got = p.reference(z)?;
    let (loss, dz) = &got;
    let (b, c) = (p.b, p.c);
    let n_valid = p.n_valid();
    let eps = p.label_smoothing;

    // The formulas: CE_i = (1 - eps) (lse - z_y) + eps (lse - mean z), dz = w (softmax - t) / n.
    let mut want_loss = 0.0;
    let mut want_dz = vec![0.0; z.len()];
    // The scale of the gradient's rounding: the norm of its two terms taken apart (softmax and
    // target cancel when the logits are equal and the smoothing is 1, leaving rounding noise).
    let mut scale_sq = 0.0f64;
    if n_valid > 0 {
        for (s, &w) in p.weights.iter().enumerate() {
            let mut total = 0.0;
            for i in (0..b).filter(|&i| !p.ignored(i)) {
                let y = p.labels[i] as usize;
                let row = &z[(s * b + i) * c..(s * b + i + 1) * c];
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let mean = row.iter().sum::<f64>() / c as f64;
                total += (1.0 - eps) * (lse - row[y]) + eps * (lse - mean);
                for (cls, &v) in row.iter().enumerate() {
                    let target = eps / c as f64 + if cls == y { 1.0 - eps } else { 0.0 };
                    let soft = (v - lse).exp();
                    want_dz[(s * b + i) * c + cls] = w * (soft - target) / n_valid as f64;
                    scale_sq += (w / n_valid as f64).powi(2) * (soft * soft + target * target);
                }
            }
            want_loss += w * total / n_valid as f64;
        }
    }
    checks.expect(
        "loss = sum_k w_k mean_i CE_i(z_k)",
        (loss - want_loss).abs() <= 1e-12 * want_loss.abs().max(1.0),
        || format!("{loss} vs {want_loss}"),
    );
    let gap: Vec<f64> = dz.iter().zip(&want_dz).map(|(a, b)| a - b).collect();
    let diff = if dz.len() == want_dz.len() {
        norm(&gap)
    } else {
        f64::INFINITY
    };
    let err = diff / scale_sq.sqrt().max(f64::MIN_POSITIVE);
    checks.expect(
        "dz = w_k (softmax - t) / n_valid",
        err <= 1e-12 || diff == 0.0,
        || format!("error norm {err:e} relative to the terms' norm"),
    );

    // d loss / d z at up to three logits of non-ignored rows, by central differences.
    let mut fd_bad = None;
    let rows: Vec<usize> = (0..p.k * b).filter(|&r| !p.ignored(r % b)).collect();
    let mut picks: Vec<usize> = [0, rows.len() / 2, rows.len().saturating_sub(1)]
        .into_iter()
        .filter(|&i| i < rows.len())
        .map(|i| rows[i])
        .collect();
    picks.dedup();
    for (t, &r) in picks.iter().enumerate() {
        let idx = r * c + (t * 7 + r) % c;
        let h = 1e-6 * z[idx].abs().max(1.0);
        let mut zp = z.to_vec();
        zp[idx] += h;
        let mut zm = z.to_vec();
        zm[idx] -= h;
        let fd = (p.reference(&zp)?.0 - p.reference(&zm)?.0) / (2.0 * h);
        if (fd - dz[idx]).abs() > 1e-6 * (1.0 + dz[idx].abs()) {
            fd_bad = Some(format!("z[{idx}]: finite difference {fd:e}, dz {:e}", dz[idx]));
            break;
        }
    }
    checks.push("dz = d loss / dz (central differences)", fd_bad);

    let mut sum_bad = None;
    for r in 0..p.k * b {
        let row = &dz[r * c..(r + 1) * c];
        let sum: f64 = row.iter().sum();
        let mass: f64 = row.iter().map(|v| v.abs()).sum();
        let ignored_nonzero = p.ignored(r % b) && row.iter().any(|&v| v != 0.0);
        if sum.abs() > 1e-12 * (mass + 1.0 / n_valid.max(1) as f64) || ignored_nonzero {
            sum_bad = Some(format!("row {r}: sum {sum:e}, ignored {}", p.ignored(r % b)));
            break;
        }
    }
    checks.push("dz rows sum to 0, ignored rows exactly 0", sum_bad);
    Ok(got)
}
