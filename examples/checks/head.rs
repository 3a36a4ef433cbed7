//! The multi-sample dropout head, `dropfuse::reference::multi_sample::head` (points 1 to 6): the
//! head as masked copies + `head_from_samples`, the logits and averaged logits written out, the
//! cross-entropy (through `checks::multi_sample`), the gradients' formulas from `dz` and central
//! finite differences of the loss, the gradient scale `S`; and the bounds the GPU head documents
//! against the reference (`dropfuse::multi_sample::MultiSampleHead`).

use dropfuse::multi_sample::MultiSampleHead;
use dropfuse::reference::multi_sample::{self as reference, HeadConfig, HeadForward, HeadSlack, Samples};
use dropfuse::{DType, Element, PhiloxState};

use super::multi_sample::{check_cross_entropy, rel_err_norm, widen, CeProblem};
use super::{within, Checks};

/// The head's documented bounds against the `f64` reference: the loss within
/// `LOSS_TOL * max(1, |loss|)`, the averaged logits' relative error norm within `LOGITS_TOL`, the
/// gradients' within `GRAD_TOL_F32` (`f32` inputs) or `GRAD_TOL_16` (`f16` / `bf16` inputs).
pub const LOSS_TOL: f64 = 2e-5;
pub const LOGITS_TOL: f64 = 1e-5;
pub const GRAD_TOL_F32: f64 = 1e-5;
pub const GRAD_TOL_16: f64 = 1e-2;

/// The inputs of a head: `h` (`B x D`), `W` (`C x D`), the bias (`C`), labels (`B`).
#[derive(Debug, Clone)]
pub struct HeadInputs<T> {
    pub b: usize,
    pub d: usize,
    pub c: usize,
    pub h: Vec<T>,
    pub w: Vec<T>,
    pub bias: Option<Vec<T>>,
    pub labels: Vec<i64>,
}

fn splitmix(s: &mut u64) -> f32 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
}

/// Values uniform in `[-amp, amp)`.
fn uniform<T: Element>(n: usize, amp: f32, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| T::from_f32((splitmix(&mut s) * 2.0 - 1.0) * amp))
        .collect()
}

impl<T: Element> HeadInputs<T> {
    /// `h` uniform in `[-1.5, 1.5)`, `W` in `[-3 / sqrt(D), 3 / sqrt(D))` (logits of a few units,
    /// inside the bounds' range), the bias in `[-1, 1)`; `labels` as given.
    pub fn new(b: usize, d: usize, c: usize, bias: bool, labels: Vec<i64>, seed: u64) -> Self {
        HeadInputs {
            b,
            d,
            c,
            h: uniform(b * d, 1.5, seed),
            w: uniform(c * d, 3.0 / (d as f32).sqrt(), seed ^ 0x77),
            bias: bias.then(|| uniform(c, 1.0, seed ^ 0xb1a5)),
            labels,
        }
    }

    /// The reference head.
    pub fn reference(&self, cfg: &HeadConfig, state: PhiloxState) -> dropfuse::Result<HeadForward> {
        reference::head(
            &self.h,
            self.d,
            &self.w,
            self.c,
            self.bias.as_deref(),
            &self.labels,
            cfg,
            state,
        )
    }
}

/// `z = sum_j W[c][j] h[i][j] (+ b[c])`, `j` ascending, the bias last.
fn logits(h: &[f64], d: usize, w: &[f64], c: usize, bias: Option<&[f64]>) -> Vec<f64> {
    let b = h.len() / d;
    let mut z = vec![0.0; b * c];
    for i in 0..b {
        for cls in 0..c {
            let mut s = 0.0;
            for j in 0..d {
                s += w[cls * d + j] * h[i * d + j];
            }
            z[i * c + cls] = s + bias.map_or(0.0, |b| b[cls]);
        }
    }
    z
}

/// The head's loss for widened copies, weight and bias (the masks held fixed).
fn loss_of(
    samples: &Samples<f64>,
    inp_d: usize,
    w: &[f64],
    c: usize,
    bias: Option<&[f64]>,
    labels: &[i64],
    cfg: &HeadConfig,
) -> dropfuse::Result<f64> {
    Ok(reference::head_from_samples(
        samples,
        inp_d,
        w,
        c,
        bias,
        labels,
        cfg.label_smoothing,
        cfg.ignore_index,
    )?
    .loss)
}

/// The whole head contract on `inp` with `cfg` and `state` (see the module docs). Returns the
/// reference's outputs.
pub fn check_head<T: Element>(
    checks: &mut Checks,
    inp: &HeadInputs<T>,
    cfg: &HeadConfig,
    state: PhiloxState,
) -> dropfuse::Result<HeadForward> {
    let want = inp.reference(cfg, state)?;
    let (b, d, c) = (inp.b, inp.d, inp.c);
    let samples = if cfg.train {
        reference::masked_copies(&inp.h, cfg.k, cfg.p, state)?
    } else {
        Samples::identity(&inp.h)
    };
    let k = samples.copies.len();
    let wide = samples.widen();
    let w = widen(&inp.w);
    let bias = inp.bias.as_deref().map(widen);
    let composed = reference::head_from_samples(
        &wide,
        d,
        &w,
        c,
        bias.as_deref(),
        &inp.labels,
        cfg.label_smoothing,
        cfg.ignore_index,
    )?;
    checks.check(
        format!("head = masked copies ({k}) + head_from_samples"),
        composed == want,
    );

    // Logits and their mean.
    let mut z = Vec::with_capacity(k * b * c);
    for hk in &wide.copies {
        z.extend(logits(hk, d, &w, c, bias.as_deref()));
    }
    let mut mean = vec![0.0; b * c];
    for zk in z.chunks(b * c) {
        for (m, v) in mean.iter_mut().zip(zk) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= k as f64);
    let err = rel_err_norm(&want.mean_logits, &mean);
    checks.expect("mean logits = sum_k (h_k W^T + b) / K", err <= 1e-12, || {
        format!("relative error norm {err:e}")
    });

    // The averaged cross-entropy: the weighted one with w_k = 1 / K.
    let problem = CeProblem {
        k,
        b,
        c,
        weights: vec![1.0 / k as f64; k],
        labels: inp.labels.clone(),
        ignore_index: cfg.ignore_index,
        label_smoothing: cfg.label_smoothing,
    };
    checks.prefix("head CE");
    let (loss, dz) = check_cross_entropy(checks, &z, &problem)?;
    checks.prefix("");
    checks.expect(
        "loss = weighted CE with w_k = 1 / K",
        (loss - want.loss).abs() <= 1e-12 * loss.abs().max(1.0),
        || format!("{} vs {loss}", want.loss),
    );

    // Gradients from dz, each within the rounding of its terms' absolute sum (the terms can
    // cancel: equal logits with smoothing 1 leave a dz of rounding noise).
    let scale = f64::from(samples.scale);
    let mut dh = vec![(0.0, 0.0); b * d];
    let mut dw = vec![(0.0, 0.0); c * d];
    let mut db = vec![(0.0, 0.0); c];
    let add = |acc: &mut (f64, f64), t: f64| {
        acc.0 += t;
        acc.1 += t.abs();
    };
    for s in 0..k {
        let dzk = &dz[s * b * c..(s + 1) * b * c];
        for i in 0..b {
            for cls in 0..c {
                let g = dzk[i * c + cls];
                add(&mut db[cls], g);
                for j in 0..d {
                    let e = i * d + j;
                    if samples.keep[s][e] {
                        add(&mut dh[e], g * w[cls * d + j] * scale);
                    }
                    add(&mut dw[cls * d + j], g * wide.copies[s][e]);
                }
            }
        }
    }
    let far = |got: &[f64], want: &[(f64, f64)]| {
        got.len() != want.len()
            || got
                .iter()
                .zip(want)
                .any(|(g, (v, mass))| !within((g - v).abs(), 1e-12 * mass))
    };
    let bad = [
        far(&want.dh, &dh),
        far(&want.dw, &dw),
        want.db.as_deref().is_some_and(|g| far(g, &db)) || want.db.is_some() != inp.bias.is_some(),
    ];
    checks.expect(
        "dh = sum_k keep_k scale dz_k W, dW = sum_k dz_k^T h_k, db = sum dz",
        !bad.contains(&true),
        || format!("dh, dW, db differ: {bad:?}"),
    );

    // Central differences of the loss (masks fixed): h through every copy, W, the bias.
    let labels = &inp.labels;
    let mut fd_bad = None;
    let mut fd =
        |what: &str, e: usize, grad: f64, f: &dyn Fn(f64) -> dropfuse::Result<f64>| -> dropfuse::Result<()> {
            if fd_bad.is_some() {
                return Ok(());
            }
            let step = 1e-5;
            let g = (f(step)? - f(-step)?) / (2.0 * step);
            if (g - grad).abs() > 1e-7 + 1e-4 * grad.abs() {
                fd_bad = Some(format!(
                    "{what}[{e}]: difference quotient {g:e}, gradient {grad:e}"
                ));
            }
            Ok(())
        };
    for e in [0, (b * d) / 2, b * d - 1] {
        fd("h", e, want.dh[e], &|delta| {
            let mut s = wide.clone();
            for (copy, keep) in s.copies.iter_mut().zip(&wide.keep) {
                if keep[e] {
                    copy[e] += delta * scale;
                }
            }
            loss_of(&s, d, &w, c, bias.as_deref(), labels, cfg)
        })?;
    }
    for e in [0, (c * d) / 2, c * d - 1] {
        fd("W", e, want.dw[e], &|delta| {
            let mut w2 = w.clone();
            w2[e] += delta;
            loss_of(&wide, d, &w2, c, bias.as_deref(), labels, cfg)
        })?;
    }
    if let (Some(bv), Some(want_db)) = (&bias, &want.db) {
        for e in [0, c - 1] {
            fd("b", e, want_db[e], &|delta| {
                let mut b2 = bv.clone();
                b2[e] += delta;
                loss_of(&wide, d, &w, c, Some(&b2), labels, cfg)
            })?;
        }
    }
    checks.push("dh, dW, db = d loss (central differences)", fd_bad);

    let s = MultiSampleHead::logits_grad_scale(k, b);
    let m = (k * b.min(1 << 15)) as f64;
    checks.check(
        format!("dz scale S = {s}: the largest power of two <= K min(B, 2^15)"),
        f64::from(s) <= m && 2.0 * f64::from(s) > m && s.to_bits() & 0x007f_ffff == 0,
    );
    Ok(want)
}

/// What the GPU head produced, widened and divided by the gradient scale.
#[derive(Debug, Clone)]
pub struct HeadGot {
    pub loss: f64,
    pub mean_logits: Vec<f64>,
    pub dh: Vec<f64>,
    pub dw: Vec<f64>,
    pub db: Option<Vec<f64>>,
}

/// The rounding slack of the head `cfg` on `inp` at Philox state `state`
/// ([`reference::head_rounding_slack`], the model the head documents and its GPU test uses).
pub fn head_slack<T: Element>(
    inp: &HeadInputs<T>,
    cfg: &HeadConfig,
    state: PhiloxState,
) -> dropfuse::Result<HeadSlack> {
    reference::head_rounding_slack(
        &inp.h,
        inp.d,
        &inp.w,
        inp.c,
        inp.bias.as_deref(),
        &inp.labels,
        cfg,
        state,
    )
}

/// `||got - want|| <= tol ||want|| + ||slack||` (no slack: the plain relative bound); NaN fails.
/// Returns the error over the relative part's bound, for messages.
fn within_slack(got: &[f64], want: &[f64], slack: Option<&[f64]>, tol: f64) -> (bool, f64) {
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let err = norm(&mut got.iter().zip(want).map(|(g, w)| g - w));
    let extra = slack.map_or(0.0, |s| norm(&mut s.iter().copied()));
    let bound = tol * norm(&mut want.iter().copied()) + extra;
    (
        within(err, bound),
        err / norm(&mut want.iter().copied()).max(f64::MIN_POSITIVE),
    )
}

/// The documented bounds for inputs of type `input` (see the consts), with the rounding `slack`
/// of [`head_slack`] when given (without it: the plain relative bounds, which cancellations can
/// exceed); every gradient exactly 0 when no row is valid or `C = 1`. Returns the failures,
/// `(forward, backward)`.
pub fn head_bounds(
    got: &HeadGot,
    want: &HeadForward,
    input: DType,
    zero_grads: bool,
    slack: Option<&HeadSlack>,
) -> (Vec<String>, Vec<String>) {
    let mut fwd = Vec::new();
    // Written so that a NaN fails.
    if !within((got.loss - want.loss).abs(), LOSS_TOL * want.loss.abs().max(1.0)) {
        fwd.push(format!(
            "loss {} vs {} (bound {LOSS_TOL:e} relative)",
            got.loss, want.loss
        ));
    }
    let (ok, e) = within_slack(
        &got.mean_logits,
        &want.mean_logits,
        slack.map(|s| &s.mean_logits[..]),
        LOGITS_TOL,
    );
    if !ok {
        fwd.push(format!(
            "mean logits relative error norm {e:e} > {LOGITS_TOL:e} (plus the rounding slack)"
        ));
    }
    let tol = if input == DType::F32 {
        GRAD_TOL_F32
    } else {
        GRAD_TOL_16
    };
    let mut bwd = Vec::new();
    let mut grads = vec![
        ("dh", &got.dh, &want.dh, slack.map(|s| &s.dh[..])),
        ("dW", &got.dw, &want.dw, slack.map(|s| &s.dw[..])),
    ];
    match (&got.db, &want.db) {
        (Some(g), Some(w)) => grads.push(("db", g, w, slack.map(|s| &s.db[..]))),
        (None, None) => {}
        _ => bwd.push("db present on one side only".to_string()),
    }
    for (name, g, w, sl) in grads {
        let (ok, e) = within_slack(g, w, sl, tol);
        if !ok {
            bwd.push(format!(
                "{name} relative error norm {e:e} > {tol:e} (plus the rounding slack)"
            ));
        }
        if zero_grads && g.iter().any(|&v| v != 0.0) {
            bwd.push(format!("{name}: not exactly 0 (no valid row, or C = 1)"));
        }
    }
    (fwd, bwd)
}

/// A power of two that brings the largest reference gradient near 1 (gradients written in `f16`
/// must be scaled into its normal range, as the head documents).
pub fn pow2_grad_scale(want: &HeadForward) -> f32 {
    let m = want
        .dh
        .iter()
        .chain(&want.dw)
        .chain(want.db.iter().flatten())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    if m == 0.0 {
        1.0
    } else {
        2f64.powi(-(m.log2().floor() as i32)) as f32
    }
}
