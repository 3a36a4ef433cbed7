//! Attention-layer importance, `dropfuse::reference::importance`: the per-token cosine similarity
//! written out (point 2), the batch sum and count (point 3), the accumulator, and an `f32` model
//! of the kernel's arithmetic (point 4: lanes of a warp, a butterfly, no fused multiply-adds)
//! against the documented per-token bound.

use dropfuse::layer_plan::SimilarityAccumulator;
use dropfuse::reference::importance::{self as reference, f32_sum_tolerance, f32_token_tolerance, EPS};
use dropfuse::Element;

use super::{within, Checks};

/// `a . b / (max(|a|, 1e-8) max(|b|, 1e-8))` in `f64`, each sum sequential and ascending.
fn cosine64<T: Element>(a: &[T], b: &[T]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x.to_f32()), f64::from(y.to_f32()));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    dot / (aa.sqrt().max(EPS) * bb.sqrt().max(EPS))
}

/// The kernel's arithmetic as point 4 describes it, in `f32`: 32 lanes, lane `l` summing the
/// chunks `l, l + 32, ...` of `V = 16 / sizeof(T)` consecutive elements sequentially, then a
/// butterfly over 5 levels, then `sqrtf`, `fmaxf(., 1e-8f)`, one multiply, one divide.
pub fn kernel_model<T: Element>(a: &[T], b: &[T]) -> f32 {
    let v = 16 / T::DTYPE.size();
    let mut lanes = [[0.0f32; 3]; 32];
    for (c, (ca, cb)) in a.chunks(v).zip(b.chunks(v)).enumerate() {
        let lane = &mut lanes[c % 32];
        for (x, y) in ca.iter().zip(cb) {
            let (x, y) = (x.to_f32(), y.to_f32());
            lane[0] += x * y;
            lane[1] += x * x;
            lane[2] += y * y;
        }
    }
    for off in [16, 8, 4, 2, 1] {
        let prev = lanes;
        for (l, lane) in lanes.iter_mut().enumerate() {
            for s in 0..3 {
                lane[s] = prev[l][s] + prev[l ^ off][s];
            }
        }
    }
    let [dot, aa, bb] = lanes[0];
    let eps = EPS as f32;
    dot / (aa.sqrt().max(eps) * bb.sqrt().max(eps))
}

/// Points 2 and 3 on `tokens x hidden` inputs and an optional padding mask: every real token's
/// similarity written out (padding: none), zero rows exactly 0, `|cos| <= 1` up to rounding, the
/// batch sum (ascending, `f64`) and count, an accumulator's mean after `accumulate`, the `f32`
/// kernel model within `f32_token_tolerance(hidden)` (finite inputs), the bounds' formulas.
/// Returns the reference's `(similarities, sum, count)`.
pub fn check_importance<T: Element>(
    checks: &mut Checks,
    a: &[T],
    b: &[T],
    hidden: usize,
    mask: Option<&[bool]>,
) -> dropfuse::Result<(Vec<Option<f64>>, f64, u64)> {
    let sims = reference::token_similarities(a, b, hidden, mask)?;
    let tokens = a.len() / hidden;
    let row = |t: usize| t * hidden..(t + 1) * hidden;
    let want: Vec<Option<f64>> = (0..tokens)
        .map(|t| {
            if mask.is_some_and(|m| !m[t]) {
                None
            } else {
                Some(cosine64(&a[row(t)], &b[row(t)]))
            }
        })
        .collect();
    let same = sims.len() == want.len()
        && sims.iter().zip(&want).all(|(g, w)| match (g, w) {
            (Some(g), Some(w)) => g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            (None, None) => true,
            _ => false,
        });
    checks.check("cos = a.b / (max(|a|, eps) max(|b|, eps)), padding: none", same);
    let zero_row = |v: &[T]| v.iter().all(|x| x.to_f32() == 0.0);
    let zeros_ok = (0..tokens).all(|t| {
        let z = zero_row(&a[row(t)]) || zero_row(&b[row(t)]);
        !z || !matches!(sims[t], Some(s) if s != 0.0)
    });
    checks.check("a zero row has similarity exactly 0", zeros_ok);
    checks.check(
        "|cos| <= 1 (+ rounding)",
        sims.iter()
            .flatten()
            .all(|s| s.is_nan() || s.abs() <= 1.0 + 1e-12),
    );

    let (sum, count) = reference::batch_similarity(a, b, hidden, mask)?;
    let mut want_sum = 0.0f64;
    for s in want.iter().flatten() {
        want_sum += s;
    }
    let want_count = want.iter().flatten().count() as u64;
    checks.check(
        format!("batch: {want_count} real tokens, their sum in ascending order"),
        count == want_count && (sum.to_bits() == want_sum.to_bits() || (sum.is_nan() && want_sum.is_nan())),
    );
    if sum.is_finite() {
        let mut acc = SimilarityAccumulator::new(2)?;
        let added = reference::accumulate(&mut acc, 1, a, b, hidden, mask)?;
        checks.check(
            "accumulate adds (sum, count) to its layer, skips empty batches",
            added == count && acc.tokens() == [0, count],
        );
    }

    let tol = f32_token_tolerance(hidden);
    let finite = |v: &[T]| v.iter().all(|x| x.to_f32().is_finite());
    let mut model_bad = None;
    for t in 0..tokens {
        let (Some(w), true) = (sims[t], finite(&a[row(t)]) && finite(&b[row(t)])) else {
            continue;
        };
        let g = f64::from(kernel_model(&a[row(t)], &b[row(t)]));
        if !within((g - w).abs(), tol) {
            model_bad = Some(format!("token {t}: model {g} vs {w}, bound {tol:e}"));
            break;
        }
    }
    checks.push(
        format!("f32 kernel model within (H/16 + 32) u = {tol:.2e}"),
        model_bad,
    );
    let u = 2f64.powi(-24);
    let h = hidden as f64;
    let c = want_count as f64;
    checks.check(
        "bounds: token (H/16 + 32) u, sum tokens * token + tokens^2 2^-53",
        tol == (h / 16.0 + 32.0) * u
            && (f32_sum_tolerance(want_count, hidden) - (c * tol + c * c * 2f64.powi(-53))).abs()
                <= 1e-15 * f32_sum_tolerance(want_count, hidden),
    );
    Ok((sims, sum, count))
}

/// Hidden states for the importance kernels: per token a magnitude `2^e` (`e` in -20..=10), `a`
/// uniform in `[-1, 1)` times it, `b = alpha a + noise` with `alpha` from -1 to 1 (similarities
/// spread over `[-1, 1]`); every fifth token's `b` is `a` itself, every seventh's `a` is zero.
/// Far inside the documented range (no overflow or underflow).
pub fn hidden_states<T: Element>(tokens: usize, hidden: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut a = Vec::with_capacity(tokens * hidden);
    let mut b = Vec::with_capacity(tokens * hidden);
    for t in 0..tokens {
        let mag = 2f32.powi((next() * 31.0) as i32 - 20);
        let alpha = 2.0 * next() - 1.0;
        for _ in 0..hidden {
            let x = if t % 7 == 3 {
                0.0
            } else {
                (2.0 * next() - 1.0) * mag
            };
            let y = if t % 5 == 1 {
                x
            } else {
                alpha * x + (2.0 * next() - 1.0) * mag * 0.5
            };
            a.push(T::from_f32(x));
            b.push(T::from_f32(y));
        }
    }
    (a, b)
}
