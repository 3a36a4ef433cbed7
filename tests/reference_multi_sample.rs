//! Tests of the CPU multi-sample dropout reference: finite-difference gradient checks, the weighted
//! cross-entropy's properties, the masks against dropout's forward, evaluation mode, edge shapes,
//! element types and validation.

mod common;

use common::{assert_all_close, assert_close, bits, cases, invalid_name};
use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout::{forward, mask_bit};
use dropfuse::reference::multi_sample::{
    head, head_from_samples, logits, masked_copies, sample_state, weighted_cross_entropy, HeadConfig,
    HeadForward, Samples, DEFAULT_IGNORE_INDEX,
};
use dropfuse::{Element, Generator, PhiloxState};
use proptest::prelude::*;

const IGNORE: i64 = DEFAULT_IGNORE_INDEX;

/// Labels from small integers: -1 stands for the ignore index.
fn to_labels(raw: &[i64]) -> Vec<i64> {
    raw.iter().map(|&y| if y < 0 { IGNORE } else { y }).collect()
}

// ---------------------------------------------------------------------------------------------
// Random problems

/// A small head problem; values are multiples of 2^-10 in [-2, 2] (exact in f32 and f64).
#[derive(Debug, Clone)]
struct Problem {
    b: usize,
    d: usize,
    c: usize,
    k: usize,
    h: Vec<f64>,
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    labels: Vec<i64>,
    p: f64,
    eps: f64,
    state: PhiloxState,
}

fn value() -> impl Strategy<Value = f64> {
    (-2048i32..=2048).prop_map(|v| f64::from(v) / 1024.0)
}

/// `B, D, C <= max_dim`, `K <= 3`, some ignored rows, bias on or off, any `p` and `eps`.
fn problem(max_dim: usize) -> impl Strategy<Value = Problem> {
    (1..=max_dim, 1..=max_dim, 1..=max_dim, 1usize..=3).prop_flat_map(|(b, d, c, k)| {
        (
            prop::collection::vec(value(), b * d),
            prop::collection::vec(value(), c * d),
            prop::option::of(prop::collection::vec(value(), c)),
            prop::collection::vec(-1..c as i64, b),
            prop_oneof![Just(0.0), Just(0.5), 0.0f64..0.9],
            prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(move |(h, w, bias, raw, p, eps, seed, offset)| Problem {
                b,
                d,
                c,
                k,
                h,
                w,
                bias,
                labels: to_labels(&raw),
                p,
                eps,
                state: PhiloxState::new(seed, offset),
            })
    })
}

// ---------------------------------------------------------------------------------------------
// Finite-difference gradient checks

/// Central-difference step.
const DELTA: f64 = 1e-6;

/// Tolerance of the finite-difference checks: `|fd - analytic| <= FD_TOL * max(|analytic|, 1e-2)`
/// (a relative error, with a floor of 1e-2 on the denominator for gradients near 0).
///
/// The loss is smooth (log-sum-exp of affine functions) with inputs in [-2, 2], so the central
/// difference's truncation error is about `DELTA^2 * |f'''| / 6 ~ 1e-11`; rounding the loss
/// (a few ulps of a value of order 1 to 10) contributes up to ~2e-9 after dividing by `2 DELTA`,
/// i.e. up to ~2e-7 relative at the floor (the worst seen over thousands of cases is ~1.1e-7). So
/// 1e-6 has a 5-10x margin, and still catches any wrong factor (a missing `scale`, `1 / K` or
/// `1 / n_valid`, a wrong target, a transposed index).
const FD_TOL: f64 = 1e-6;

fn fd_check(fd: f64, analytic: f64, what: &str) {
    let err = (fd - analytic).abs() / analytic.abs().max(1e-2);
    assert!(
        err <= FD_TOL,
        "{what}: finite difference {fd} vs analytic {analytic} (relative error {err:e})"
    );
}

/// `h_k = h * keep_k * scale` in f64, with the keep flags held fixed.
fn copies_of(h: &[f64], keep: &[Vec<bool>], scale: f32) -> Samples<f64> {
    let s = f64::from(scale);
    Samples {
        copies: keep
            .iter()
            .map(|m| {
                h.iter()
                    .zip(m)
                    .map(|(&x, &kp)| if kp { x * s } else { 0.0 })
                    .collect()
            })
            .collect(),
        keep: keep.to_vec(),
        scale,
    }
}

/// Checks `dh`, `dW` and `db` of [`head_from_samples`] against central differences of its loss in
/// `h`, `W` and `b`, with the masks of the problem's `(K, p, state)` held fixed.
fn check_head_gradients(pb: &Problem) {
    let h32: Vec<f32> = pb.h.iter().map(|&v| v as f32).collect();
    let masks = masked_copies(&h32, pb.k, pb.p, pb.state).unwrap();
    let run = |h: &[f64], w: &[f64], bias: Option<&[f64]>| {
        head_from_samples(
            &copies_of(h, &masks.keep, masks.scale),
            pb.d,
            w,
            pb.c,
            bias,
            &pb.labels,
            pb.eps,
            IGNORE,
        )
        .unwrap()
    };
    let base = run(&pb.h, &pb.w, pb.bias.as_deref());
    assert!(base.loss.is_finite() && base.loss >= 0.0);
    let central = |f: &dyn Fn(f64) -> f64| (f(DELTA) - f(-DELTA)) / (2.0 * DELTA);

    for e in 0..pb.h.len() {
        let fd = central(&|t| {
            let mut h = pb.h.clone();
            h[e] += t;
            run(&h, &pb.w, pb.bias.as_deref()).loss
        });
        fd_check(fd, base.dh[e], &format!("dh[{e}]"));
    }
    for e in 0..pb.w.len() {
        let fd = central(&|t| {
            let mut w = pb.w.clone();
            w[e] += t;
            run(&pb.h, &w, pb.bias.as_deref()).loss
        });
        fd_check(fd, base.dw[e], &format!("dW[{e}]"));
    }
    match (&pb.bias, &base.db) {
        (Some(bias), Some(db)) => {
            for e in 0..bias.len() {
                let fd = central(&|t| {
                    let mut b = bias.clone();
                    b[e] += t;
                    run(&pb.h, &pb.w, Some(&b)).loss
                });
                fd_check(fd, db[e], &format!("db[{e}]"));
            }
        }
        (None, None) => {}
        other => panic!("db present iff a bias is given: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// dh, dW and db match central differences of the loss (masks fixed), B, D, C <= 5, K <= 3.
    #[test]
    fn head_gradients_match_finite_differences(pb in problem(5)) {
        check_head_gradients(&pb);
    }

    /// dz of the weighted cross-entropy matches central differences of its loss, for arbitrary
    /// (normalised) weights.
    #[test]
    fn weighted_ce_gradient_matches_finite_differences(
        (k, b, c, z, raw_w, raw_y) in (1usize..=3, 1usize..=5, 1usize..=5).prop_flat_map(|(k, b, c)| (
            Just(k), Just(b), Just(c),
            prop::collection::vec(-8.0f64..8.0, k * b * c),
            prop::collection::vec(0.0f64..1.0, k),
            prop::collection::vec(-1..c as i64, b),
        )),
        eps in 0.0f64..=1.0,
    ) {
        let total: f64 = raw_w.iter().sum::<f64>() + 1e-3 * k as f64;
        let w: Vec<f64> = raw_w.iter().map(|v| (v + 1e-3) / total).collect();
        let y = to_labels(&raw_y);
        let (_, dz) = weighted_cross_entropy(&z, k, b, c, &w, &y, IGNORE, eps).unwrap();
        for e in 0..z.len() {
            let loss_at = |t: f64| {
                let mut zz = z.clone();
                zz[e] += t;
                weighted_cross_entropy(&zz, k, b, c, &w, &y, IGNORE, eps).unwrap().0
            };
            let fd = (loss_at(DELTA) - loss_at(-DELTA)) / (2.0 * DELTA);
            fd_check(fd, dz[e], &format!("dz[{e}]"));
        }
    }
}

#[test]
fn hand_computed_example() {
    // B = 1, D = 1, C = 2, h = [1], W = [[2], [0]], no bias, label 1, p = 0: z = [2, 0].
    let out = head(
        &[1.0f32],
        1,
        &[2.0f32, 0.0],
        2,
        None,
        &[1],
        &HeadConfig::new(1, 0.0),
        PhiloxState::new(1, 2),
    )
    .unwrap();
    let e2 = 2.0f64.exp();
    let s0 = e2 / (1.0 + e2);
    assert_close(out.loss, (1.0 + e2).ln(), 1e-15, "loss");
    assert_eq!(out.mean_logits, vec![2.0, 0.0]);
    assert_close(out.dh[0], 2.0 * s0, 1e-15, "dh");
    assert_all_close(&out.dw, &[s0, -s0], 1e-15, "dW");
    assert!(out.db.is_none());
}

// ---------------------------------------------------------------------------------------------
// Weighted cross-entropy

/// `-sum_c t_c ln(softmax_c)`, with the naive softmax `exp(z_c) / sum exp(z)` (an independent
/// formulation of PyTorch's smoothed cross-entropy; fine for |z| <= 20).
fn naive_ce(z: &[f64], y: usize, eps: f64) -> (f64, Vec<f64>) {
    let c = z.len() as f64;
    let sum: f64 = z.iter().map(|v| v.exp()).sum();
    let soft: Vec<f64> = z.iter().map(|v| v.exp() / sum).collect();
    let target = |cls: usize| (1.0 - eps) * f64::from(u8::from(cls == y)) + eps / c;
    let loss = -(0..z.len()).map(|cls| target(cls) * soft[cls].ln()).sum::<f64>();
    let grad = (0..z.len()).map(|cls| soft[cls] - target(cls)).collect();
    (loss, grad)
}

fn ce_case() -> impl Strategy<Value = (usize, usize, usize, Vec<f64>, Vec<f64>, Vec<i64>, f64)> {
    (1usize..=4, 1usize..=6, 1usize..=7)
        .prop_flat_map(|(k, b, c)| {
            (
                Just(k),
                Just(b),
                Just(c),
                prop::collection::vec(-20.0f64..20.0, k * b * c),
                prop::collection::vec(0.0f64..1.0, k),
                prop::collection::vec(-1..c as i64, b),
                prop_oneof![Just(0.0), 0.0f64..=1.0],
            )
        })
        .prop_map(|(k, b, c, z, raw_w, raw_y, eps)| {
            let total: f64 = raw_w.iter().sum::<f64>() + 1e-3 * k as f64;
            let w = raw_w.iter().map(|v| (v + 1e-3) / total).collect();
            (k, b, c, z, w, to_labels(&raw_y), eps)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(128)))]

    /// Loss and dz against the naive formulation; dz sums to 0 over classes; loss >= 0; ignored
    /// rows get 0.
    #[test]
    fn weighted_ce_matches_naive_formula((k, b, c, z, w, y, eps) in ce_case()) {
        let (loss, dz) = weighted_cross_entropy(&z, k, b, c, &w, &y, IGNORE, eps).unwrap();
        prop_assert!(loss >= 0.0);
        let n_valid = y.iter().filter(|&&v| v != IGNORE).count();
        let mut expect = 0.0;
        for (s, &ws) in w.iter().enumerate() {
            for (i, &yi) in y.iter().enumerate() {
                let row = (s * b + i) * c;
                let g = &dz[row..row + c];
                if yi == IGNORE {
                    prop_assert!(g.iter().all(|&v| v == 0.0), "ignored row {} has {:?}", i, g);
                    continue;
                }
                let (l, grad) = naive_ce(&z[row..row + c], yi as usize, eps);
                expect += ws * l / n_valid as f64;
                let scale = ws / n_valid as f64;
                for (cls, (&gc, &nc)) in g.iter().zip(&grad).enumerate() {
                    assert_close(gc, scale * nc, 1e-12, &format!("dz[{s}][{i}][{cls}]"));
                }
                let sum: f64 = g.iter().sum();
                prop_assert!(sum.abs() <= 1e-15 * c as f64, "row sum {}", sum);
            }
        }
        assert_close(loss, expect, 1e-12, "loss");
    }

    /// With eps = 0 the loss is the plain cross-entropy `mean_i (lse - z_y)`, averaged with the weights.
    #[test]
    fn no_smoothing_is_plain_cross_entropy((k, b, c, z, w, y, _eps) in ce_case()) {
        let (loss, _) = weighted_cross_entropy(&z, k, b, c, &w, &y, IGNORE, 0.0).unwrap();
        let n_valid = y.iter().filter(|&&v| v != IGNORE).count().max(1) as f64;
        let mut expect = 0.0;
        for s in 0..k {
            for i in (0..b).filter(|&i| y[i] != IGNORE) {
                let row = &z[(s * b + i) * c..(s * b + i + 1) * c];
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                expect += w[s] * (lse - row[y[i] as usize]) / n_valid;
            }
        }
        assert_close(loss, expect, 1e-12, "loss");
    }

    /// The loss is linear in the weights: sum_k w_k * (loss of set k alone); dz_k = w_k * dz of set k.
    #[test]
    fn weighted_ce_is_the_weighted_sum_of_single_sets((k, b, c, z, w, y, eps) in ce_case()) {
        let (loss, dz) = weighted_cross_entropy(&z, k, b, c, &w, &y, IGNORE, eps).unwrap();
        let mut expect = 0.0;
        for s in 0..k {
            let set = &z[s * b * c..(s + 1) * b * c];
            let (l, g) = weighted_cross_entropy(set, 1, b, c, &[1.0], &y, IGNORE, eps).unwrap();
            expect += w[s] * l;
            let scaled: Vec<f64> = g.iter().map(|v| w[s] * v).collect();
            assert_all_close(&dz[s * b * c..(s + 1) * b * c], &scaled, 1e-14, "dz");
        }
        assert_close(loss, expect, 1e-14, "loss");
    }

    /// K copies of the same logits with w_k = 1/K give the loss of one copy and dz_k = dz / K.
    #[test]
    fn identical_copies_average_to_one((_k, b, c, z, _w, y, eps) in ce_case(), k in 1usize..=5) {
        let one = &z[..b * c];
        let (l1, g1) = weighted_cross_entropy(one, 1, b, c, &[1.0], &y, IGNORE, eps).unwrap();
        let many: Vec<f64> = one.iter().copied().cycle().take(k * b * c).collect();
        let w = vec![1.0 / k as f64; k];
        let (lk, gk) = weighted_cross_entropy(&many, k, b, c, &w, &y, IGNORE, eps).unwrap();
        assert_close(lk, l1, 1e-14, "loss");
        for s in 0..k {
            let expect: Vec<f64> = g1.iter().map(|v| v / k as f64).collect();
            assert_all_close(&gk[s * b * c..(s + 1) * b * c], &expect, 1e-14, "dz");
        }
    }

    /// Ignored rows change nothing: the same loss and dz as with those rows removed.
    #[test]
    fn ignored_rows_are_removed((k, b, c, z, w, y, eps) in ce_case()) {
        let valid: Vec<usize> = (0..b).filter(|&i| y[i] != IGNORE).collect();
        prop_assume!(!valid.is_empty());
        let (loss, dz) = weighted_cross_entropy(&z, k, b, c, &w, &y, IGNORE, eps).unwrap();
        let mut zv = Vec::new();
        for s in 0..k {
            for &i in &valid {
                zv.extend_from_slice(&z[(s * b + i) * c..(s * b + i + 1) * c]);
            }
        }
        let yv: Vec<i64> = valid.iter().map(|&i| y[i]).collect();
        let (lv, gv) = weighted_cross_entropy(&zv, k, valid.len(), c, &w, &yv, IGNORE, eps).unwrap();
        prop_assert_eq!(loss.to_bits(), lv.to_bits());
        let mut kept = Vec::new();
        for s in 0..k {
            for &i in &valid {
                kept.extend_from_slice(&dz[(s * b + i) * c..(s * b + i + 1) * c]);
            }
        }
        prop_assert_eq!(kept, gv);
    }
}

#[test]
fn all_ignored_gives_zero_loss_and_gradients() {
    let z = [1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
    for eps in [0.0, 0.3] {
        let (loss, dz) = weighted_cross_entropy(&z, 2, 1, 3, &[0.5, 0.5], &[IGNORE], IGNORE, eps).unwrap();
        assert_eq!(loss.to_bits(), 0);
        assert!(dz.iter().all(|v| v.to_bits() == 0), "{dz:?}");
    }
    let h = [1.0f32, -2.0, 0.5, 3.0];
    let w = [0.5f32, 0.25, -1.0, 2.0, 1.0, 1.0];
    let cfg = HeadConfig {
        label_smoothing: 0.2,
        ..HeadConfig::new(3, 0.5)
    };
    let out = head(
        &h,
        2,
        &w,
        3,
        Some(&[1.0f32, 0.0, -1.0]),
        &[IGNORE, IGNORE],
        &cfg,
        PhiloxState::new(4, 5),
    )
    .unwrap();
    assert_eq!(out.loss, 0.0);
    assert!(out
        .dh
        .iter()
        .chain(&out.dw)
        .chain(out.db.as_ref().unwrap())
        .all(|&v| v == 0.0));
    assert!(out.mean_logits.iter().all(|v| v.is_finite()));
}

#[test]
fn extreme_logits_stay_finite() {
    // z = [1e4, -1e4, 0], label 1: lse = 1e4 exactly, CE = 2e4; softmax = [1, 0, 0].
    let z = [1e4, -1e4, 0.0];
    let (loss, dz) = weighted_cross_entropy(&z, 1, 1, 3, &[1.0], &[1], IGNORE, 0.0).unwrap();
    assert_eq!(loss, 2e4);
    assert_eq!(dz, vec![1.0, -1.0, 0.0]);
    // With eps = 0.1: 0.9 * 2e4 + 0.1 * (1e4 - 0).
    let (loss, dz) = weighted_cross_entropy(&z, 1, 1, 3, &[1.0], &[1], IGNORE, 0.1).unwrap();
    assert_close(loss, 1.9e4, 1e-15, "smoothed loss");
    assert!(dz.iter().all(|v| v.is_finite()));
    // Every logit huge and equal: uniform softmax, CE = ln 3.
    let (loss, dz) = weighted_cross_entropy(&[1e4; 3], 1, 1, 3, &[1.0], &[0], IGNORE, 0.0).unwrap();
    assert_close(loss, 3.0f64.ln(), 1e-12, "uniform");
    assert_all_close(&dz, &[1.0 / 3.0 - 1.0, 1.0 / 3.0, 1.0 / 3.0], 1e-12, "uniform dz");
    // Through the head: large features and weights.
    let out = head(
        &[100.0f32, -100.0],
        2,
        &[50.0f32, 0.0, -50.0, 0.0],
        2,
        None,
        &[1],
        &HeadConfig::new(2, 0.5),
        PhiloxState::new(9, 9),
    )
    .unwrap();
    assert!(out.loss.is_finite());
    assert!(out.dh.iter().chain(&out.dw).all(|v| v.is_finite()));
}

#[test]
fn confident_rows_keep_the_labels_gradient_digits() {
    // z = [g, 0], label 0: p_0 - 1 = -1 / (1 + e^g). exp(z_0 - lse) - 1 would give 0 from
    // g = 37 on (1 - p_0 below half an ulp of 1) and lose digits well before.
    let rel = |got: f64, want: f64, what: String| {
        assert!(
            (got - want).abs() <= 1e-13 * want.abs(),
            "{what}: {got:e} vs {want:e}"
        );
    };
    for g in [5.0f64, 20.0, 37.0, 60.0, 300.0] {
        let want = -1.0 / (1.0 + g.exp());
        let (_, dz) = weighted_cross_entropy(&[g, 0.0], 1, 1, 2, &[1.0], &[0], IGNORE, 0.0).unwrap();
        rel(dz[0], want, format!("label gradient at gap {g}"));
        rel(dz[1], -want, format!("other gradient at gap {g}"));
        // Smoothed: p_0 - (1 - eps / 2) = eps / 2 - (1 - p_0).
        let (_, dz) = weighted_cross_entropy(&[g, 0.0], 1, 1, 2, &[1.0], &[0], IGNORE, 0.25).unwrap();
        rel(dz[0], 0.125 + want, format!("smoothed at gap {g}"));
    }
}

#[test]
fn single_class_has_zero_loss() {
    // C = 1: lse = z_y and mean_c z = z_y, so CE = 0 for every eps, and softmax = target = 1.
    let z = [3.5, -1e4, 0.0, 7.25];
    for eps in [0.0, 0.1, 0.3, 1.0] {
        let (loss, dz) = weighted_cross_entropy(&z, 2, 2, 1, &[0.25, 0.75], &[0, 0], IGNORE, eps).unwrap();
        assert_eq!(loss, 0.0, "eps {eps}");
        assert!(dz.iter().all(|&v| v == 0.0), "eps {eps}: {dz:?}");
        let cfg = HeadConfig {
            label_smoothing: eps,
            ..HeadConfig::new(2, 0.3)
        };
        let out = head(
            &[1.0f32, 2.0, 3.0],
            3,
            &[0.5f32, -1.0, 2.0],
            1,
            Some(&[0.5f32]),
            &[0],
            &cfg,
            PhiloxState::new(1, 1),
        )
        .unwrap();
        assert_eq!(out.loss, 0.0);
        assert!(out
            .dh
            .iter()
            .chain(&out.dw)
            .chain(out.db.as_ref().unwrap())
            .all(|&v| v == 0.0));
    }
}

// ---------------------------------------------------------------------------------------------
// Masks

fn check_masks<T: Element>(h: &[T], k: usize, p: f64, state: PhiloxState) {
    let samples = masked_copies(h, k, p, state).unwrap();
    assert_eq!(samples.copies.len(), k);
    assert_eq!(samples.keep.len(), k);
    assert_eq!(
        samples.scale,
        dropfuse::reference::dropout::keep_scale(p).unwrap()
    );
    for s in 0..k {
        let (y, m) = forward(h, p, sample_state(state, s as u64), 0).unwrap();
        assert_eq!(bits(&samples.copies[s]), bits(&y), "sample {s}: copy");
        for e in 0..h.len() {
            assert_eq!(samples.keep[s][e], mask_bit(&m, e), "sample {s}: keep[{e}]");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// Sample k is dropout's forward with offset + k, bit for bit, for every element type.
    #[test]
    fn masks_are_dropout_forward_per_sample(
        raw in prop::collection::vec(any::<u32>(), 1..100),
        k in 1usize..=4,
        p in prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
        seed in any::<u64>(),
        offset in prop_oneof![any::<u64>(), Just(u64::MAX - 1), Just(u64::MAX)],
    ) {
        let state = PhiloxState::new(seed, offset);
        let x32: Vec<f32> = raw.iter().map(|&v| f32::from_bits(v)).collect();
        let x16: Vec<f16> = raw.iter().map(|&v| f16::from_bits(v as u16)).collect();
        let xb: Vec<bf16> = raw.iter().map(|&v| bf16::from_bits((v >> 16) as u16)).collect();
        check_masks(&x32, k, p, state);
        check_masks(&x16, k, p, state);
        check_masks(&xb, k, p, state);
    }
}

#[test]
fn sample_states_are_what_the_generator_hands_out() {
    for offset in [0u64, 17, u64::MAX - 1] {
        let mut g = Generator::with_offset(0x1234, offset);
        let first = g.clone().next_streams(3);
        for s in 0..3 {
            assert_eq!(sample_state(first, s), g.next(), "offset {offset}, sample {s}");
        }
    }
    // Wrapping: offset 2^64 - 1 plus 1 is stream 0.
    assert_eq!(
        sample_state(PhiloxState::new(5, u64::MAX), 1),
        PhiloxState::new(5, 0)
    );
}

#[test]
fn p_zero_copies_h_and_p_one_gives_zeros() {
    let h: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
    let s = masked_copies(&h, 3, 0.0, PhiloxState::new(2, 3)).unwrap();
    assert_eq!(s.scale, 1.0);
    for (copy, keep) in s.copies.iter().zip(&s.keep) {
        assert_eq!(bits(copy), bits(&h));
        assert!(keep.iter().all(|&k| k));
    }
    let s = masked_copies(&h, 3, 1.0, PhiloxState::new(2, 3)).unwrap();
    assert_eq!(s.scale, 0.0);
    for (copy, keep) in s.copies.iter().zip(&s.keep) {
        assert!(copy.iter().all(|v| v.to_bits() == 0), "p = 1 left a non-+0 value");
        assert!(keep.iter().all(|&k| !k));
    }
    // Through the head at p = 1: the logits are the bias, dh and dW are 0.
    let w: Vec<f32> = (0..3 * 37).map(|i| (i % 7) as f32 - 3.0).collect();
    let out = head(
        &h,
        37,
        &w,
        3,
        Some(&[1.0f32, 2.0, 3.0]),
        &[2],
        &HeadConfig::new(2, 1.0),
        PhiloxState::new(2, 3),
    )
    .unwrap();
    assert_eq!(out.mean_logits, vec![1.0, 2.0, 3.0]);
    assert!(out.dh.iter().chain(&out.dw).all(|&v| v == 0.0));
    let (loss, dz) = weighted_cross_entropy(&[1.0, 2.0, 3.0], 1, 1, 3, &[1.0], &[2], IGNORE, 0.0).unwrap();
    assert_close(out.loss, loss, 1e-15, "loss");
    assert_all_close(out.db.as_ref().unwrap(), &dz, 1e-15, "db");
}

/// Evaluation mode is one pass on h: identical to p = 0, K = 1 in training mode.
#[test]
fn eval_mode_is_one_pass_without_dropout() {
    let h: Vec<f32> = (0..3 * 13).map(|i| ((i * 7) % 11) as f32 * 0.25 - 1.0).collect();
    let w: Vec<f32> = (0..4 * 13).map(|i| ((i * 5) % 9) as f32 * 0.125 - 0.5).collect();
    let bias = [0.5f32, -0.5, 0.0, 1.0];
    let labels = [3, IGNORE, 0];
    let state = PhiloxState::new(77, 88);
    let eval = HeadConfig {
        train: false,
        label_smoothing: 0.1,
        ..HeadConfig::new(4, 0.7)
    };
    let plain = HeadConfig {
        label_smoothing: 0.1,
        ..HeadConfig::new(1, 0.0)
    };
    let a = head(&h, 13, &w, 4, Some(&bias), &labels, &eval, state).unwrap();
    let b = head(&h, 13, &w, 4, Some(&bias), &labels, &plain, state).unwrap();
    assert_eq!(a, b);
    // Another state changes nothing in evaluation mode.
    assert_eq!(
        a,
        head(&h, 13, &w, 4, Some(&bias), &labels, &eval, PhiloxState::new(1, 2)).unwrap()
    );
    // K identical copies (p = 0) give the same result up to rounding.
    let k3 = HeadConfig {
        label_smoothing: 0.1,
        ..HeadConfig::new(3, 0.0)
    };
    let c = head(&h, 13, &w, 4, Some(&bias), &labels, &k3, state).unwrap();
    assert_close(c.loss, a.loss, 1e-14, "loss");
    assert_all_close(&c.mean_logits, &a.mean_logits, 1e-14, "mean logits");
    assert_all_close(&c.dh, &a.dh, 1e-14, "dh");
    assert_all_close(&c.dw, &a.dw, 1e-14, "dW");
    assert_all_close(c.db.as_ref().unwrap(), a.db.as_ref().unwrap(), 1e-14, "db");
}

// ---------------------------------------------------------------------------------------------
// The head: composition, shapes, element types

/// `head::<T>` is masked_copies, widen and head_from_samples; the mean logits are the average of
/// the copies' logits; entries dropped in every sample get dh = 0.
fn check_composition<T: Element>(pb: &Problem) {
    let h: Vec<T> = pb.h.iter().map(|&v| T::from_f32(v as f32)).collect();
    let w: Vec<T> = pb.w.iter().map(|&v| T::from_f32(v as f32)).collect();
    let bias: Option<Vec<T>> = pb
        .bias
        .as_ref()
        .map(|b| b.iter().map(|&v| T::from_f32(v as f32)).collect());
    let cfg = HeadConfig {
        label_smoothing: pb.eps,
        ..HeadConfig::new(pb.k, pb.p)
    };
    let out: HeadForward = head(&h, pb.d, &w, pb.c, bias.as_deref(), &pb.labels, &cfg, pb.state).unwrap();

    let widen = |v: &[T]| v.iter().map(|x| f64::from(x.to_f32())).collect::<Vec<_>>();
    let samples = masked_copies(&h, pb.k, pb.p, pb.state).unwrap().widen();
    let (w64, b64) = (widen(&w), bias.as_deref().map(widen));
    let expect = head_from_samples(
        &samples,
        pb.d,
        &w64,
        pb.c,
        b64.as_deref(),
        &pb.labels,
        pb.eps,
        IGNORE,
    )
    .unwrap();
    assert_eq!(out, expect);

    assert_eq!(out.mean_logits.len(), pb.b * pb.c);
    assert_eq!(out.dh.len(), pb.b * pb.d);
    assert_eq!(out.dw.len(), pb.c * pb.d);
    assert_eq!(out.db.as_ref().map(Vec::len), pb.bias.as_ref().map(|_| pb.c));
    let mut sum = vec![0.0; pb.b * pb.c];
    for copy in &samples.copies {
        let z = logits(copy, pb.d, &w64, pb.c, b64.as_deref()).unwrap();
        for (s, v) in sum.iter_mut().zip(z) {
            *s += v;
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / pb.k as f64).collect();
    assert_all_close(&out.mean_logits, &mean, 1e-14, "mean logits");
    for e in 0..pb.h.len() {
        if samples.keep.iter().all(|m| !m[e]) {
            assert_eq!(out.dh[e], 0.0, "dh[{e}] of an element dropped in every sample");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// Composition and shapes for f32, f16 and bf16, with D up to 20 (not multiples of 8), B = 1
    /// included, bias on and off, ignored rows.
    #[test]
    fn head_is_the_composition_of_its_parts(pb in problem(20)) {
        check_composition::<f32>(&pb);
        check_composition::<f16>(&pb);
        check_composition::<bf16>(&pb);
    }
}

#[test]
fn edge_shapes() {
    // B = 1, D = 13 (not a multiple of 8), C = 3, K = 3, with and without bias; f16 and bf16.
    let h: Vec<f32> = (0..13).map(|i| i as f32 * 0.25 - 1.5).collect();
    let w: Vec<f32> = (0..3 * 13).map(|i| ((i * 3) % 7) as f32 * 0.5 - 1.5).collect();
    for bias in [None, Some(vec![0.25f32, -0.25, 1.0])] {
        let cfg = HeadConfig::new(3, 0.5);
        let out = head(&h, 13, &w, 3, bias.as_deref(), &[2], &cfg, PhiloxState::new(3, 4)).unwrap();
        assert!(out.loss.is_finite() && out.loss > 0.0);
        assert_eq!(out.db.is_some(), bias.is_some());
        let h16: Vec<f16> = h.iter().map(|&v| f16::from_f32(v)).collect();
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let b16: Option<Vec<f16>> = bias
            .as_ref()
            .map(|b| b.iter().map(|&v| f16::from_f32(v)).collect());
        // These values are exact in f16, and so are the copies (scale 2): the same result.
        let out16 = head(
            &h16,
            13,
            &w16,
            3,
            b16.as_deref(),
            &[2],
            &cfg,
            PhiloxState::new(3, 4),
        )
        .unwrap();
        assert_eq!(out16, out);
        let hb: Vec<bf16> = h.iter().map(|&v| bf16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let bb: Option<Vec<bf16>> = bias
            .as_ref()
            .map(|b| b.iter().map(|&v| bf16::from_f32(v)).collect());
        let outb = head(&hb, 13, &wb, 3, bb.as_deref(), &[2], &cfg, PhiloxState::new(3, 4)).unwrap();
        assert_eq!(outb, out);
    }
    // An ignore index inside [0, C): label 0 is ignored, so only row 1 counts.
    let z = [1.0, 2.0, 0.5, -0.5];
    let (loss, dz) = weighted_cross_entropy(&z, 1, 2, 2, &[1.0], &[0, 1], 0, 0.0).unwrap();
    let (l1, g1) = weighted_cross_entropy(&z[2..], 1, 1, 2, &[1.0], &[1], 0, 0.0).unwrap();
    assert_eq!(loss, l1);
    assert_eq!(dz, [vec![0.0, 0.0], g1].concat());
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn invalid_head_arguments_are_named() {
    let s = PhiloxState::new(1, 2);
    let h = [1.0f32; 6]; // B = 2, D = 3
    let w = [0.5f32; 12]; // C = 4
    let b = [0.0f32; 4];
    let y = [0i64, 3];
    let cfg = HeadConfig::new(2, 0.5);
    let ok = head(&h, 3, &w, 4, Some(&b), &y, &cfg, s);
    assert!(ok.is_ok());

    assert_eq!(invalid_name(head(&h, 0, &w, 4, Some(&b), &y, &cfg, s)), "h");
    assert_eq!(invalid_name(head(&h, 4, &w, 4, Some(&b), &y, &cfg, s)), "h");
    assert_eq!(
        invalid_name(head::<f32>(&[], 3, &w, 4, Some(&b), &y, &cfg, s)),
        "h"
    );
    assert_eq!(invalid_name(head(&h, 3, &w, 0, None, &y, &cfg, s)), "weight");
    assert_eq!(
        invalid_name(head(&h, 3, &w[..11], 4, Some(&b), &y, &cfg, s)),
        "weight"
    );
    assert_eq!(invalid_name(head(&h, 3, &w, 3, None, &y, &cfg, s)), "weight");
    assert_eq!(
        invalid_name(head(&h, 3, &w, 4, Some(&b[..3]), &y, &cfg, s)),
        "bias"
    );
    assert_eq!(
        invalid_name(head(&h, 3, &w, 4, Some(&b), &y[..1], &cfg, s)),
        "labels"
    );
    assert_eq!(
        invalid_name(head(&h, 3, &w, 4, Some(&b), &[0, 4], &cfg, s)),
        "labels"
    );
    assert_eq!(
        invalid_name(head(&h, 3, &w, 4, Some(&b), &[-1, 0], &cfg, s)),
        "labels"
    );
    let other_ignore = HeadConfig {
        ignore_index: -1,
        ..cfg
    };
    assert!(head(&h, 3, &w, 4, Some(&b), &[-1, 0], &other_ignore, s).is_ok());
    assert_eq!(
        invalid_name(head(&h, 3, &w, 4, Some(&b), &[IGNORE, 0], &other_ignore, s)),
        "labels"
    );
    for train in [true, false] {
        let k0 = HeadConfig { k: 0, train, ..cfg };
        assert_eq!(invalid_name(head(&h, 3, &w, 4, Some(&b), &y, &k0, s)), "k");
        for p in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
            let bad = HeadConfig { p, train, ..cfg };
            assert_eq!(
                invalid_name(head(&h, 3, &w, 4, Some(&b), &y, &bad, s)),
                "p",
                "p = {p}"
            );
        }
        for eps in [f64::NAN, -0.1, 1.01, f64::INFINITY] {
            let bad = HeadConfig {
                label_smoothing: eps,
                train,
                ..cfg
            };
            assert_eq!(
                invalid_name(head(&h, 3, &w, 4, Some(&b), &y, &bad, s)),
                "label_smoothing",
                "eps = {eps}"
            );
        }
    }
    // The first invalid argument in the documented order is reported.
    let all_bad = HeadConfig {
        k: 0,
        p: 2.0,
        label_smoothing: -1.0,
        ..cfg
    };
    assert_eq!(invalid_name(head(&h, 4, &w, 0, None, &[9], &all_bad, s)), "h");
    assert_eq!(invalid_name(head(&h, 3, &w, 4, Some(&b), &y, &all_bad, s)), "k");

    // masked_copies and head_from_samples.
    assert_eq!(invalid_name(masked_copies::<f32>(&[], 1, 0.5, s)), "h");
    assert_eq!(invalid_name(masked_copies(&h, 0, 0.5, s)), "k");
    assert_eq!(invalid_name(masked_copies(&h, 1, f64::NAN, s)), "p");
    let w64 = [0.5f64; 12];
    let good = masked_copies(&h, 2, 0.5, s).unwrap().widen();
    assert!(head_from_samples(&good, 3, &w64, 4, None, &y, 0.0, IGNORE).is_ok());
    let mut bad = good.clone();
    bad.copies.clear();
    bad.keep.clear();
    assert_eq!(
        invalid_name(head_from_samples(&bad, 3, &w64, 4, None, &y, 0.0, IGNORE)),
        "k"
    );
    let mut bad = good.clone();
    bad.copies[1].pop();
    assert_eq!(
        invalid_name(head_from_samples(&bad, 3, &w64, 4, None, &y, 0.0, IGNORE)),
        "h"
    );
    let mut bad = good.clone();
    bad.keep[0].pop();
    assert_eq!(
        invalid_name(head_from_samples(&bad, 3, &w64, 4, None, &y, 0.0, IGNORE)),
        "keep"
    );
    let mut bad = good.clone();
    bad.scale = f32::NAN;
    assert_eq!(
        invalid_name(head_from_samples(&bad, 3, &w64, 4, None, &y, 0.0, IGNORE)),
        "scale"
    );
    assert_eq!(
        invalid_name(logits(&[1.0; 6], 3, &w64, 4, Some(&[0.0; 5]))),
        "bias"
    );
}

#[test]
fn invalid_weighted_ce_arguments_are_named() {
    let z = [0.5f64; 12]; // K = 2, B = 2, C = 3
    let y = [0i64, 2];
    let ce =
        |z: &[f64], k, b, c, w: &[f64], y: &[i64], eps| weighted_cross_entropy(z, k, b, c, w, y, IGNORE, eps);
    assert!(ce(&z, 2, 2, 3, &[0.5, 0.5], &y, 0.0).is_ok());
    assert_eq!(invalid_name(ce(&z, 0, 2, 3, &[], &y, 0.0)), "k");
    assert_eq!(invalid_name(ce(&z, 2, 2, 2, &[0.5, 0.5], &y, 0.0)), "logits");
    assert_eq!(
        invalid_name(ce(&z[..11], 2, 2, 3, &[0.5, 0.5], &y, 0.0)),
        "logits"
    );
    assert_eq!(invalid_name(ce(&[], 2, 0, 3, &[0.5, 0.5], &[], 0.0)), "logits");
    assert_eq!(invalid_name(ce(&[], 2, 2, 0, &[0.5, 0.5], &y, 0.0)), "logits");
    for w in [
        vec![1.0],
        vec![0.5, 0.5, 0.0],
        vec![-0.5, 1.5],
        vec![f64::NAN, 1.0],
        vec![f64::INFINITY, 0.0],
        vec![0.45, 0.45],
        vec![0.5, 0.5 + 2e-6],
    ] {
        assert_eq!(
            invalid_name(ce(&z, 2, 2, 3, &w, &y, 0.0)),
            "weights",
            "weights {w:?}"
        );
    }
    // Within the tolerance of 1e-6.
    assert!(ce(&z, 2, 2, 3, &[0.5, 0.5 + 5e-7], &y, 0.0).is_ok());
    assert!(ce(&z, 2, 2, 3, &[1.0, 0.0], &y, 0.0).is_ok());
    assert_eq!(invalid_name(ce(&z, 2, 2, 3, &[0.5, 0.5], &[0], 0.0)), "labels");
    assert_eq!(invalid_name(ce(&z, 2, 2, 3, &[0.5, 0.5], &[0, 3], 0.0)), "labels");
    assert_eq!(
        invalid_name(ce(&z, 2, 2, 3, &[0.5, 0.5], &[-1, 0], 0.0)),
        "labels"
    );
    for eps in [f64::NAN, -1e-9, 1.0 + 1e-9, f64::NEG_INFINITY] {
        assert_eq!(
            invalid_name(ce(&z, 2, 2, 3, &[0.5, 0.5], &y, eps)),
            "label_smoothing"
        );
    }
}
