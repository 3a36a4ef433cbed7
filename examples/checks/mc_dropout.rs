//! Monte-Carlo dropout, `dropfuse::reference::mc_dropout`: the replicas as dropout on the streams
//! `offset + t` (points 1 and 2), the summaries against two-pass formulas written out here
//! (points 4 to 6), rejected pushes, and the documented `f32` tolerance (point 7), which the GPU
//! summaries are compared with.

use dropfuse::mc_dropout::McStats32;
use dropfuse::reference::dropout as dropout_ref;
use dropfuse::reference::mc_dropout::{self as reference, f32_tolerance, McStats, McSummary, Tolerance};
use dropfuse::{Element, PhiloxState};

use super::{bit_diff, within, word_diff, Checks};

/// The replicas (points 1 and 2): replica `t` is `dropout::forward` with the state
/// `{seed, offset + t}` (wrapping), outputs `R x n` and masks `R x ceil(n / 32)` words
/// concatenated; the masks alone equal the forward's; replica `t` of `R` replicas is replica `t`
/// of `R + 1`. Returns the reference's `(y, masks)`.
pub fn check_replicas<T: Element>(
    checks: &mut Checks,
    x: &[T],
    replicas: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> dropfuse::Result<(Vec<T>, Vec<u32>)> {
    let (y, masks) = reference::replicated_forward(x, replicas, p, state, element_offset)?;
    let mut want_y = Vec::with_capacity(replicas * x.len());
    let mut want_m = Vec::new();
    for t in 0..replicas {
        let st = PhiloxState::new(state.seed, state.offset.wrapping_add(t as u64));
        let (yt, mt) = dropout_ref::forward(x, p, st, element_offset)?;
        want_y.extend(yt);
        want_m.extend(mt);
    }
    checks.push(
        "replica t = dropout on stream offset + t (y)",
        bit_diff(&y, &want_y),
    );
    checks.push(
        "replica t's mask at words t * ceil(n / 32)",
        word_diff(&masks, &want_m),
    );
    checks.push(
        "replicated_mask == the forward's masks",
        word_diff(
            &reference::replicated_mask(x.len(), replicas, p, state, element_offset)?,
            &masks,
        ),
    );
    let (more, _) = reference::replicated_forward(x, replicas + 1, p, state, element_offset)?;
    checks.push(
        "the first R of R + 1 replicas == the R replicas",
        bit_diff(&more[..y.len()], &y),
    );
    Ok((y, masks))
}

/// Entropy in nats written out: `-sum q ln q`, `0 ln 0 = 0`, ascending.
fn entropy(q: &[f64]) -> f64 {
    q.iter().filter(|&&v| v > 0.0).fold(0.0, |h, &v| h - v * v.ln())
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300) || a == b
}

/// The first index where `got` and `want` are not within `rel` (relative), with both values.
fn first_far(got: &[f64], want: &[f64], rel: f64) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, want {}", got.len(), want.len()));
    }
    (0..got.len())
        .find(|&i| !close(got[i], want[i], rel))
        .map(|i| format!("[{i}] {} vs {}", got[i], want[i]))
}

/// The summaries of a `T x B x C` stack (points 4 to 6) against two-pass formulas: the mean
/// `sum / T` and the population variance `sum (x - mean)^2 / T` (Welford differs by rounding
/// only), the predictive entropy of the mean, the expected entropy (mean of the per-sample
/// entropies), `MI = max(0, H - E)`; pushing one at a time equals `summarize`; `T = 1` and
/// identical samples give variance and MI exactly 0; a push with a NaN, infinite or negative
/// value is rejected and leaves the summary unchanged; the tolerance's formulas. Returns the
/// reference's summaries.
pub fn check_summaries(
    checks: &mut Checks,
    probs: &[f32],
    samples: usize,
    batch: usize,
    classes: usize,
) -> dropfuse::Result<McStats> {
    let got = reference::summarize(probs, samples, batch, classes)?;
    let per = batch * classes;
    let mut one = McSummary::new(batch, classes)?;
    for t in 0..samples {
        one.push(&probs[t * per..(t + 1) * per])?;
    }
    checks.check("push one at a time == summarize", one.finish()? == got);

    let p = |t: usize, i: usize| f64::from(probs[t * per + i]);
    let mean: Vec<f64> = (0..per)
        .map(|i| (0..samples).map(|t| p(t, i)).sum::<f64>() / samples as f64)
        .collect();
    let var: Vec<f64> = (0..per)
        .map(|i| (0..samples).map(|t| (p(t, i) - mean[i]).powi(2)).sum::<f64>() / samples as f64)
        .collect();
    checks.push("mean = sum_t p_t / T", first_far(&got.mean, &mean, 1e-12));
    // The variance's rounding is relative to the mean's square, not to the variance.
    let var_bad =
        (0..per).find(|&i| (got.variance[i] - var[i]).abs() > 1e-12 * (mean[i] * mean[i] + var[i]) + 1e-300);
    checks.expect(
        "variance = sum_t (p_t - mean)^2 / T (population)",
        var_bad.is_none(),
        || {
            let i = var_bad.unwrap_or(0);
            format!("[{i}] {} vs {}", got.variance[i], var[i])
        },
    );
    let h: Vec<f64> = got.mean.chunks_exact(classes).map(entropy).collect();
    checks.push(
        "predictive entropy = H(mean_b)",
        first_far(&got.predictive_entropy, &h, 1e-12),
    );
    let e: Vec<f64> = (0..batch)
        .map(|b| {
            (0..samples)
                .map(|t| {
                    let row: Vec<f64> = (0..classes).map(|c| p(t, b * classes + c)).collect();
                    entropy(&row)
                })
                .sum::<f64>()
                / samples as f64
        })
        .collect();
    checks.push(
        "expected entropy = mean_t H(p_t,b)",
        first_far(&got.expected_entropy, &e, 1e-12),
    );
    let mi: Vec<f64> = (0..batch)
        .map(|b| (got.predictive_entropy[b] - got.expected_entropy[b]).max(0.0))
        .collect();
    checks.push(
        "MI = max(0, H - E), >= 0",
        word_diff(
            &got.mutual_information
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            &mi.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        ),
    );
    let identical = (1..samples).all(|t| probs[t * per..(t + 1) * per] == probs[..per]);
    if identical {
        checks.check(
            "identical samples (or T = 1): variance and MI exactly 0",
            got.variance
                .iter()
                .chain(&got.mutual_information)
                .all(|&v| v == 0.0),
        );
    }

    // A rejected push changes nothing.
    let mut s = McSummary::new(batch, classes)?;
    s.push(&probs[..per])?;
    let before = s.clone();
    let mut rejected = true;
    for (i, bad) in [(0, f32::NAN), (per / 2, -1e-30), (per - 1, f32::INFINITY)] {
        let mut v = probs[..per].to_vec();
        v[i] = bad;
        rejected &= matches!(
            s.push(&v),
            Err(dropfuse::Error::InvalidArgument { name: "probs", .. })
        );
    }
    let mut zero = probs[..per].to_vec();
    zero[0] = -0.0;
    let mut z = before.clone();
    checks.check(
        "NaN, negative, infinite pushes rejected as probs, summary unchanged; -0 accepted",
        rejected && s == before && z.push(&zero).is_ok(),
    );

    let tol = f32_tolerance(samples, classes);
    let (u, t, c) = (2f64.powi(-24), samples as f64, classes as f64);
    let l = c.ln() + 1.0;
    let want_tol = Tolerance {
        mean: (2.0 * t + 4.0) * u,
        variance: (4.0 * t + 8.0) * u,
        predictive_entropy: (8.0 * t + c + 8.0) * u * l,
        expected_entropy: (t + c + 8.0) * u * l,
        mutual_information: (8.0 * t + c + 8.0) * u * l + (t + c + 8.0) * u * l,
    };
    let tol_ok = [
        (tol.mean, want_tol.mean),
        (tol.variance, want_tol.variance),
        (tol.predictive_entropy, want_tol.predictive_entropy),
        (tol.expected_entropy, want_tol.expected_entropy),
        (tol.mutual_information, want_tol.mutual_information),
    ]
    .iter()
    .all(|&(a, b)| close(a, b, 1e-12));
    checks.check("f32_tolerance: the documented formulas", tol_ok);
    Ok(got)
}

/// The GPU's `f32` summaries against the reference within `f32_tolerance(T, C)`: the number of
/// values out of bounds, and one line per quantity with any (count and the first).
pub fn outside_tolerance(got: &McStats32, want: &McStats) -> (usize, Vec<String>) {
    let tol = f32_tolerance(want.samples, want.classes);
    let mut bad = Vec::new();
    let mut total = 0;
    for (name, g, w, t) in [
        ("mean", &got.mean, &want.mean, tol.mean),
        ("variance", &got.variance, &want.variance, tol.variance),
        (
            "predictive entropy",
            &got.predictive_entropy,
            &want.predictive_entropy,
            tol.predictive_entropy,
        ),
        (
            "expected entropy",
            &got.expected_entropy,
            &want.expected_entropy,
            tol.expected_entropy,
        ),
        (
            "mutual information",
            &got.mutual_information,
            &want.mutual_information,
            tol.mutual_information,
        ),
    ] {
        if g.len() != w.len() {
            bad.push(format!("{name}: {} values, want {}", g.len(), w.len()));
            total += g.len().max(w.len());
            continue;
        }
        // Written so that a NaN is out of bounds.
        let out: Vec<usize> = (0..g.len())
            .filter(|&i| !within((f64::from(g[i]) - w[i]).abs(), t))
            .collect();
        total += out.len();
        if let Some(&i) = out.first() {
            bad.push(format!(
                "{name}: {} outside +-{t:e}, first [{i}] {} vs {}",
                out.len(),
                g[i],
                w[i]
            ));
        }
    }
    (total, bad)
}

/// Probabilities for the summaries: `samples x batch` softmax rows of logits uniform in
/// `[-spread, spread)` (values in `[0, 1]`, rows summing to about 1), from `seed`.
pub fn softmax_stack(samples: usize, batch: usize, classes: usize, spread: f64, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(samples * batch * classes);
    for _ in 0..samples * batch {
        let z: Vec<f64> = (0..classes).map(|_| (2.0 * next() - 1.0) * spread).collect();
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / sum) as f32));
    }
    out
}
