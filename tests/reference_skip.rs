//! Tests of the CPU compute-skipping reference: the fused stochastic-depth residual (dropped samples
//! bit-identical, kept ones the formula with its roundings, p = 0 and p = 1, layer plans, bias
//! periods, backward against direct formulas and finite differences, the fixed reduction order),
//! per-sample compaction (order, slots, capacity, round trips, adjoint backward), token routing
//! (top-k and global budget against brute force, ties, NaN, padding, a 40 000-token sequence,
//! gather / gated scatter-add / backward with the gate's gradient) and validation.

mod common;

use common::data::Lcg;
use common::{bits, cases, invalid_name, widen};
use dropfuse::half::{bf16, f16};
use dropfuse::layer_plan::{LayerDrop, RateRule};
use dropfuse::reference::dropout::keep_scale;
use dropfuse::reference::skip::{
    chunked_sum, depth_scale, gather_samples, gather_samples_backward, gather_samples_into, gather_tokens,
    gather_tokens_backward, gather_tokens_into, route_global, route_top_k, scatter_add_samples,
    scatter_add_samples_backward, scatter_add_tokens, scatter_add_tokens_backward, scatter_samples,
    scatter_samples_backward, score_key, stochastic_depth, stochastic_depth_backward,
    stochastic_depth_in_place, Capacity, Compaction, Routing, SampleKeep, ValidTokens, D_BIAS_CHUNK,
    D_GATE_CHUNK,
};
use dropfuse::Element;
use proptest::prelude::*;

fn conv<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// This file's draws of the shared LCG.
impl Lcg {
    /// `k / 64` for `k` in `[-255, 255]`: exact in f32, f16 and bf16.
    fn grid(&mut self) -> f32 {
        (self.below(511) as i32 - 255) as f32 / 64.0
    }
    fn grids(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.grid()).collect()
    }
    /// `true` with probability `percent / 100`.
    fn flag(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn flags(&mut self, n: usize, percent: u64) -> Vec<bool> {
        (0..n).map(|_| self.flag(percent)).collect()
    }
    /// A float with a random 23-bit mantissa in [1, 2) times a random sign.
    fn float(&mut self) -> f32 {
        let v = 1.0 + self.below(1 << 23) as f32 / (1u32 << 23) as f32;
        if self.flag(50) {
            -v
        } else {
            v
        }
    }
}

// =================================================================================================
// Stochastic depth: forward

fn dropped_rows_are_bit_identical<T: Element>() {
    let row_len = 5;
    let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1.5];
    let mut rng = Lcg(1);
    let batch = 8;
    let mut res: Vec<T> = conv(&rng.grids(batch * row_len));
    res[..row_len].copy_from_slice(&conv::<T>(&special));
    res[row_len..2 * row_len].copy_from_slice(&conv::<T>(&special));
    let branch: Vec<T> = conv(&vec![f32::NAN; batch * row_len]);
    let bias: Vec<T> = conv(&rng.grids(row_len));
    let keep = [false, false, true, false, true, true, false, false];
    for bias in [None, Some(&bias[..])] {
        let out = stochastic_depth(&res, &branch, bias, row_len, SampleKeep::PerSample(&keep), 2.0).unwrap();
        let mut in_place = res.clone();
        stochastic_depth_in_place(
            &mut in_place,
            &branch,
            bias,
            row_len,
            SampleKeep::PerSample(&keep),
            2.0,
        )
        .unwrap();
        assert_eq!(bits(&out), bits(&in_place));
        for (b, &kept) in keep.iter().enumerate() {
            let rows = b * row_len..(b + 1) * row_len;
            if kept {
                assert!(
                    out[rows].iter().all(|v| v.to_f32().is_nan()),
                    "kept row {b}: NaN branch"
                );
            } else {
                assert_eq!(bits(&out[rows.clone()]), bits(&res[rows]), "dropped row {b}");
            }
        }
    }
    // Batch mode: dropped is the residual, kept equals per-sample all-kept.
    let all = vec![true; batch];
    let branch: Vec<T> = conv(&rng.grids(batch * row_len));
    let off = stochastic_depth(&res, &branch, None, row_len, SampleKeep::Batch(false), 2.0).unwrap();
    assert_eq!(bits(&off), bits(&res));
    let on = stochastic_depth(&res, &branch, None, row_len, SampleKeep::Batch(true), 2.0).unwrap();
    let per = stochastic_depth(&res, &branch, None, row_len, SampleKeep::PerSample(&all), 2.0).unwrap();
    assert_eq!(bits(&on), bits(&per));
}

#[test]
fn stochastic_depth_dropped_samples_are_the_residual() {
    dropped_rows_are_bit_identical::<f32>();
    dropped_rows_are_bit_identical::<f16>();
    dropped_rows_are_bit_identical::<bf16>();
}

/// Kept rows: with grid values and scale 1.25 every f32 step is exact, so the result is the exact
/// value rounded once to `T`.
fn kept_rows_are_the_formula<T: Element>() {
    let mut rng = Lcg(2);
    for (batch, row_len, p) in [
        (1usize, 1usize, 1usize),
        (3, 7, 7),
        (4, 12, 4),
        (6, 10, 1),
        (2, 33, 11),
    ] {
        let res: Vec<T> = conv(&rng.grids(batch * row_len));
        let branch: Vec<T> = conv(&rng.grids(batch * row_len));
        let bias: Vec<T> = conv(&rng.grids(p));
        let keep = rng.flags(batch, 60);
        let scale = 1.25f32;
        let out = stochastic_depth(
            &res,
            &branch,
            Some(&bias),
            row_len,
            SampleKeep::PerSample(&keep),
            scale,
        )
        .unwrap();
        let (r, f, c) = (widen(&res), widen(&branch), widen(&bias));
        for (b, &kept) in keep.iter().enumerate() {
            for j in 0..row_len {
                let i = b * row_len + j;
                let want = if kept {
                    T::from_f32((r[i] + 1.25 * (f[i] + c[j % p])) as f32)
                } else {
                    res[i]
                };
                assert_eq!(out[i].to_bits_u32(), want.to_bits_u32(), "{i} (b {b}, j {j})");
            }
        }
        // A bias of period P equals the same bias tiled to the whole row.
        let tiled: Vec<T> = (0..row_len).map(|j| bias[j % p]).collect();
        let out_tiled = stochastic_depth(
            &res,
            &branch,
            Some(&tiled),
            row_len,
            SampleKeep::PerSample(&keep),
            scale,
        )
        .unwrap();
        assert_eq!(bits(&out), bits(&out_tiled));
    }
}

#[test]
fn stochastic_depth_kept_samples_follow_the_formula() {
    kept_rows_are_the_formula::<f32>();
    kept_rows_are_the_formula::<f16>();
    kept_rows_are_the_formula::<bf16>();
}

/// The sum stays in f32 until the single rounding to bf16: 256 + (1 + 2^-9) rounds to 258, while
/// rounding the branch plus bias to bf16 first (1.0) gives the tie 257, rounded to even: 256.
#[test]
fn stochastic_depth_rounds_once_to_the_element_type() {
    let res = [bf16::from_f32(256.0)];
    let branch = [bf16::ONE];
    let bias = [bf16::from_f32(2f32.powi(-9))];
    let out = stochastic_depth(&res, &branch, Some(&bias), 1, SampleKeep::Batch(true), 1.0).unwrap();
    assert_eq!(out[0].to_f32(), 258.0);
    let unfused = bf16::from_f32(256.0 + bf16::from_f32(1.0 + 2f32.powi(-9)).to_f32());
    assert_eq!(unfused.to_f32(), 256.0);
}

/// Multiply and add are two f32 roundings, not a fused multiply-add.
#[test]
fn stochastic_depth_does_not_fuse_multiply_add() {
    let scale = keep_scale(0.1).unwrap();
    let mut rng = Lcg(3);
    let mut found = 0;
    for _ in 0..10_000 {
        let (r, f) = (rng.float(), rng.float());
        let two_step = r + scale * f;
        if two_step.to_bits() == scale.mul_add(f, r).to_bits() {
            continue;
        }
        let out = stochastic_depth(&[r], &[f], None, 1, SampleKeep::Batch(true), scale).unwrap();
        assert_eq!(out[0].to_bits(), two_step.to_bits(), "r {r}, f {f}");
        found += 1;
    }
    assert!(found > 10, "only {found} cases where fma differs");
}

/// Without a bias no add happens: -0 + 1 * -0 stays -0; a zero bias makes the branch +0.
#[test]
fn stochastic_depth_without_bias_adds_nothing() {
    let res = [-0.0f32];
    let branch = [-0.0f32];
    let none = stochastic_depth(&res, &branch, None, 1, SampleKeep::Batch(true), 1.0).unwrap();
    assert_eq!(none[0].to_bits(), (-0.0f32).to_bits());
    let zero = stochastic_depth(&res, &branch, Some(&[0.0]), 1, SampleKeep::Batch(true), 1.0).unwrap();
    assert_eq!(zero[0].to_bits(), 0);
}

#[test]
fn depth_scale_values() {
    assert_eq!(depth_scale(0.0, true).unwrap(), 1.0);
    assert_eq!(depth_scale(0.5, true).unwrap(), 2.0);
    assert_eq!(depth_scale(0.2, true).unwrap().to_bits(), 1.25f32.to_bits());
    assert_eq!(
        depth_scale(0.1, true).unwrap().to_bits(),
        keep_scale(0.1).unwrap().to_bits()
    );
    assert_eq!(depth_scale(1.0, true).unwrap().to_bits(), 0);
    assert_eq!(depth_scale(0.3, false).unwrap(), 1.0);
    assert_eq!(depth_scale(1.0, false).unwrap(), 1.0);
    for p in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
        assert_eq!(invalid_name(depth_scale(p, true)), "p");
        assert_eq!(invalid_name(depth_scale(p, false)), "p");
    }
}

/// p = 0 keeps every sample with scale 1; p = 1 drops every sample (scale 0): plans from
/// `layer_plan`, one decision per sample.
#[test]
fn stochastic_depth_p_zero_and_p_one() {
    let (batch, row_len) = (16, 9);
    let mut rng = Lcg(4);
    let res: Vec<f16> = conv(&rng.grids(batch * row_len));
    let branch: Vec<f16> = conv(&rng.grids(batch * row_len));
    let p0 = LayerDrop::new(3, RateRule::Uniform { p: 0.0 })
        .unwrap()
        .sample_plan(7, 11, batch)
        .unwrap();
    let keep = p0.layer_keep(1).unwrap();
    assert!(keep.iter().all(|&k| k));
    let out = stochastic_depth(
        &res,
        &branch,
        None,
        row_len,
        SampleKeep::PerSample(keep),
        p0.scales()[1],
    )
    .unwrap();
    for i in 0..res.len() {
        let want = f16::from_f32(res[i].to_f32() + branch[i].to_f32());
        assert_eq!(out[i].to_bits(), want.to_bits(), "p = 0, element {i}");
    }
    let p1 = LayerDrop::new(3, RateRule::Uniform { p: 1.0 })
        .unwrap()
        .sample_plan(7, 11, batch)
        .unwrap();
    let keep = p1.layer_keep(2).unwrap();
    assert!(keep.iter().all(|&k| !k));
    assert_eq!(p1.scales()[2], 0.0);
    let out = stochastic_depth(
        &res,
        &branch,
        None,
        row_len,
        SampleKeep::PerSample(keep),
        p1.scales()[2],
    )
    .unwrap();
    assert_eq!(bits(&out), bits(&res));
    let d = stochastic_depth_backward(&branch, row_len, SampleKeep::PerSample(keep), 0.0, Some(3)).unwrap();
    assert!(d.d_branch.iter().all(|v| v.to_bits() == 0));
    assert!(d.d_bias.unwrap().iter().all(|v| v.to_bits() == 0));
}

/// A per-sample plan at p = 0.5: dropped samples keep the residual, the compaction of the plan's
/// flags lists the plan's kept samples.
#[test]
fn stochastic_depth_with_a_sample_plan() {
    let (layers, batch, row_len) = (4, 32, 6);
    let plan = LayerDrop::new(layers, RateRule::Linear { p_max: 0.5 })
        .unwrap()
        .sample_plan(0x5eed, 3, batch)
        .unwrap();
    let mut rng = Lcg(5);
    let res: Vec<bf16> = conv(&rng.grids(batch * row_len));
    let branch: Vec<bf16> = conv(&rng.grids(batch * row_len));
    let kept_samples = plan.kept_samples();
    for (l, kept_l) in kept_samples.iter().enumerate() {
        let keep = plan.layer_keep(l).unwrap();
        let scale = plan.scales()[l];
        let out = stochastic_depth(&res, &branch, None, row_len, SampleKeep::PerSample(keep), scale).unwrap();
        for (b, &kept) in keep.iter().enumerate() {
            let rows = b * row_len..(b + 1) * row_len;
            if !kept {
                assert_eq!(bits(&out[rows.clone()]), bits(&res[rows]));
            } else {
                for i in rows {
                    let want = bf16::from_f32(res[i].to_f32() + scale * branch[i].to_f32());
                    assert_eq!(out[i].to_bits(), want.to_bits());
                }
            }
        }
        let c = Compaction::new(keep).unwrap();
        assert_eq!(c.count(), plan.kept_counts()[l]);
        let idx: Vec<usize> = c.indices().iter().map(|&b| b as usize).collect();
        assert_eq!(&idx, kept_l);
    }
}

// =================================================================================================
// Stochastic depth: backward

fn backward_formula<T: Element>() {
    let mut rng = Lcg(6);
    for (batch, row_len, p) in [(1usize, 1usize, 1usize), (5, 8, 4), (7, 6, 6), (3, 20, 5)] {
        let mut d_out: Vec<T> = conv(&rng.grids(batch * row_len));
        d_out[0] = T::from_f32(f32::NAN);
        let keep = rng.flags(batch, 50);
        let scale = 1.25f32;
        let g =
            stochastic_depth_backward(&d_out, row_len, SampleKeep::PerSample(&keep), scale, Some(p)).unwrap();
        for i in 0..d_out.len() {
            let want = if keep[i / row_len] {
                T::from_f32(scale * d_out[i].to_f32())
            } else {
                T::from_f32(0.0)
            };
            let got = g.d_branch[i];
            assert!(
                got.to_bits_u32() == want.to_bits_u32() || (got.to_f32().is_nan() && want.to_f32().is_nan()),
                "d_branch[{i}]"
            );
        }
        // d_bias with finite grid values: every partial is exact, so it is the exact sum, scaled
        // and rounded once.
        d_out[0] = T::from_f32(0.5);
        let g =
            stochastic_depth_backward(&d_out, row_len, SampleKeep::PerSample(&keep), scale, Some(p)).unwrap();
        let dy = widen(&d_out);
        let d_bias = g.d_bias.unwrap();
        assert_eq!(d_bias.len(), p);
        for (k, got) in d_bias.iter().enumerate() {
            let mut sum = 0.0f64;
            for b in (0..batch).filter(|&b| keep[b]) {
                for j in (k..row_len).step_by(p) {
                    sum += dy[b * row_len + j];
                }
            }
            assert_eq!(
                got.to_bits_u32(),
                T::from_f32((1.25 * sum) as f32).to_bits_u32(),
                "d_bias[{k}]"
            );
        }
        let none =
            stochastic_depth_backward(&d_out, row_len, SampleKeep::PerSample(&keep), scale, None).unwrap();
        assert!(none.d_bias.is_none());
        assert_eq!(bits(&none.d_branch), bits(&g.d_branch));
    }
}

#[test]
fn stochastic_depth_backward_formula() {
    backward_formula::<f32>();
    backward_formula::<f16>();
    backward_formula::<bf16>();
}

/// Central finite differences of `L = sum w * out` in f64 (the forward written in f64) against
/// the reference gradients.
#[test]
fn stochastic_depth_backward_matches_finite_differences() {
    let (batch, row_len, p) = (4, 6, 3);
    let mut rng = Lcg(7);
    let res: Vec<f64> = rng.grids(batch * row_len).iter().map(|&v| f64::from(v)).collect();
    let branch: Vec<f64> = rng.grids(batch * row_len).iter().map(|&v| f64::from(v)).collect();
    let bias: Vec<f64> = rng.grids(p).iter().map(|&v| f64::from(v)).collect();
    let w: Vec<f32> = (0..batch * row_len).map(|_| rng.float()).collect();
    let keep = [true, false, true, true];
    let scale = keep_scale(0.3).unwrap();
    let loss = |branch: &[f64], bias: &[f64]| -> f64 {
        let mut l = 0.0;
        for (b, &kept) in keep.iter().enumerate() {
            for j in 0..row_len {
                let i = b * row_len + j;
                let kb = if kept { 1.0 } else { 0.0 };
                let out = res[i] + kb * f64::from(scale) * (branch[i] + bias[j % p]);
                l += f64::from(w[i]) * out;
            }
        }
        l
    };
    let g = stochastic_depth_backward(&w, row_len, SampleKeep::PerSample(&keep), scale, Some(p)).unwrap();
    let h = 1e-3;
    for i in 0..branch.len() {
        let (mut up, mut dn) = (branch.clone(), branch.clone());
        up[i] += h;
        dn[i] -= h;
        let fd = (loss(&up, &bias) - loss(&dn, &bias)) / (2.0 * h);
        let got = f64::from(g.d_branch[i]);
        assert!(
            (fd - got).abs() <= 1e-6 * fd.abs().max(1.0),
            "d_branch[{i}]: {got} vs {fd}"
        );
    }
    let d_bias = g.d_bias.unwrap();
    for k in 0..p {
        let (mut up, mut dn) = (bias.clone(), bias.clone());
        up[k] += h;
        dn[k] -= h;
        let fd = (loss(&branch, &up) - loss(&branch, &dn)) / (2.0 * h);
        let got = f64::from(d_bias[k]);
        assert!(
            (fd - got).abs() <= 1e-5 * fd.abs().max(1.0),
            "d_bias[{k}]: {got} vs {fd}"
        );
    }
}

/// The bias gradient sums in chunks of 256 rows: 2^24 followed by 255 ones stays 2^24 (each +1 is
/// a tie rounded to even), the next chunk's two ones add 2 exactly. A plain sequential sum gives 2^24.
#[test]
fn bias_gradient_uses_the_chunked_order() {
    assert_eq!(D_BIAS_CHUNK, 256);
    let big = 16_777_216.0f32;
    let mut d_out = vec![1.0f32; 258];
    d_out[0] = big;
    let keep = vec![true; 258];
    let g = stochastic_depth_backward(&d_out, 1, SampleKeep::PerSample(&keep), 1.0, Some(1)).unwrap();
    assert_eq!(g.d_bias.unwrap()[0], big + 2.0);
    let sequential = d_out.iter().fold(0.0f32, |a, &t| a + t);
    assert_eq!(sequential, big);
    // Dropping row 256 leaves a single 1 in the second chunk: 2^24 + 1 rounds to 2^24.
    let mut keep2 = keep.clone();
    keep2[256] = false;
    let g = stochastic_depth_backward(&d_out, 1, SampleKeep::PerSample(&keep2), 1.0, Some(1)).unwrap();
    assert_eq!(g.d_bias.unwrap()[0], big);
    // The terms of one bias element run over rows, then positions: P = 1 and R = 258 (one row).
    let g = stochastic_depth_backward(&d_out, 258, SampleKeep::Batch(true), 1.0, Some(1)).unwrap();
    assert_eq!(g.d_bias.unwrap()[0], big + 2.0);
}

/// The terms of bias element `k` run over rows first, then positions (`m = b * (R / P) + q`,
/// element `j = q * P + k`): with `B = 2`, `R = 4`, `P = 2` element 0's terms are
/// `d_out[0][0], d_out[0][2], d_out[1][0], d_out[1][2]` = `1, 2^24, 1, -2^24`. In that order both
/// ones are lost (`2^24 + 1` is a tie, rounded to the even `2^24`): `0`. Position-major order
/// (`1, 1, 2^24, -2^24`) would give `2`. Element 1's terms `0.5, 0.25, 4, 8` add exactly.
#[test]
fn bias_gradient_terms_run_over_rows_then_positions() {
    let big = 16_777_216.0f32;
    let d_out = [1.0f32, 0.5, big, 0.25, 1.0, 4.0, -big, 8.0];
    let g = stochastic_depth_backward(&d_out, 4, SampleKeep::Batch(true), 1.0, Some(2)).unwrap();
    assert_eq!(bits(&g.d_bias.unwrap()), bits(&[0.0f32, 12.75][..]));
    assert_eq!(chunked_sum(&[1.0, big, 1.0, -big], D_BIAS_CHUNK).unwrap(), 0.0);
    // bf16 (which holds 2^24): the same order, the sum in f32, one rounding to bf16 at the end.
    let h: Vec<bf16> = d_out.iter().map(|&v| bf16::from_f32(v)).collect();
    let g = stochastic_depth_backward(&h, 4, SampleKeep::Batch(true), 1.0, Some(2)).unwrap();
    assert_eq!(widen(&g.d_bias.unwrap()), [0.0, 12.75]);
}

#[test]
fn chunked_sum_definition() {
    assert_eq!(chunked_sum(&[], 4).unwrap().to_bits(), 0);
    assert_eq!(chunked_sum(&[-0.0, -0.0], 1).unwrap().to_bits(), 0, "never -0");
    let big = 16_777_216.0f32;
    let t = [big, 1.0, 1.0, 1.0];
    // One chunk: a sequential sum, every +1 is lost (a tie rounded to even).
    assert_eq!(chunked_sum(&t, 4).unwrap(), big);
    // Chunk size 1: the partials are the terms, summed sequentially: the same.
    assert_eq!(chunked_sum(&t, 1).unwrap(), big);
    // Chunks of 2: [2^24 + 1 -> 2^24] + [1 + 1 = 2] = 2^24 + 2.
    assert_eq!(chunked_sum(&t, 2).unwrap(), big + 2.0);
    // [1 + 1 + 2^24 = 2^24 + 2] + [1 + 1 = 2] = 2^24 + 4.
    assert_eq!(chunked_sum(&[1.0, 1.0, big, 1.0, 1.0], 3).unwrap(), big + 4.0);
    assert_eq!(invalid_name(chunked_sum(&t, 0)), "chunk");
}

#[test]
fn stochastic_depth_validation() {
    let res = [1.0f32; 12];
    let branch = [1.0f32; 12];
    let keep = [true, false, true];
    let pk = SampleKeep::PerSample(&keep);
    let sd = |res: &[f32], branch: &[f32], bias: Option<&[f32]>, row_len, keep, scale| {
        stochastic_depth(res, branch, bias, row_len, keep, scale)
    };
    assert_eq!(invalid_name(sd(&res, &branch, None, 0, pk, 1.0)), "row_len");
    assert_eq!(invalid_name(sd(&[], &[], None, 4, pk, 1.0)), "residual");
    assert_eq!(invalid_name(sd(&res, &branch, None, 5, pk, 1.0)), "residual");
    assert_eq!(invalid_name(sd(&res, &branch[..8], None, 4, pk, 1.0)), "branch");
    assert_eq!(invalid_name(sd(&res, &branch, Some(&[]), 4, pk, 1.0)), "bias");
    assert_eq!(
        invalid_name(sd(&res, &branch, Some(&[1.0; 3]), 4, pk, 1.0)),
        "bias"
    );
    assert_eq!(
        invalid_name(sd(&res, &branch, Some(&[1.0; 8]), 4, pk, 1.0)),
        "bias"
    );
    assert_eq!(invalid_name(sd(&res, &branch, None, 6, pk, 1.0)), "keep");
    assert_eq!(
        invalid_name(sd(&res, &branch, None, 4, SampleKeep::PerSample(&[]), 1.0)),
        "keep"
    );
    for s in [f32::NAN, -1.0, f32::INFINITY, -f32::MIN_POSITIVE] {
        assert_eq!(invalid_name(sd(&res, &branch, None, 4, pk, s)), "scale");
    }
    assert!(sd(&res, &branch, Some(&[2.0; 2]), 4, pk, 0.0).is_ok());
    // Nothing is written on error.
    let mut r = res;
    assert!(stochastic_depth_in_place(&mut r, &branch, None, 4, pk, f32::NAN).is_err());
    assert_eq!(r, res);
    let bw = |d: &[f32], row_len, keep, scale, p| stochastic_depth_backward(d, row_len, keep, scale, p);
    assert_eq!(invalid_name(bw(&res, 0, pk, 1.0, None)), "row_len");
    assert_eq!(invalid_name(bw(&[], 4, pk, 1.0, None)), "d_out");
    assert_eq!(invalid_name(bw(&res, 4, pk, 1.0, Some(3))), "bias");
    assert_eq!(invalid_name(bw(&res, 4, pk, 1.0, Some(0))), "bias");
    assert_eq!(invalid_name(bw(&res, 2, pk, 1.0, None)), "keep");
    assert_eq!(invalid_name(bw(&res, 4, pk, -2.0, None)), "scale");
}

// =================================================================================================
// Per-sample compaction

#[test]
fn compaction_order_slots_and_count() {
    let keep = [false, true, true, false, false, true, false, true];
    let c = Compaction::new(&keep).unwrap();
    assert_eq!(c.batch(), 8);
    assert_eq!(c.count(), 4);
    assert_eq!(c.indices(), &[1, 2, 5, 7]);
    assert_eq!(
        c.slots(),
        &[None, Some(0), Some(1), None, None, Some(2), None, Some(3)]
    );
    assert_eq!(c.slot(5), Some(2));
    assert_eq!(c.slot(0), None);
    assert_eq!(c.slot(8), None);
    let all = Compaction::new(&[true; 5]).unwrap();
    assert_eq!(all.indices(), &[0, 1, 2, 3, 4]);
    let none = Compaction::new(&[false; 5]).unwrap();
    assert_eq!(none.count(), 0);
    assert!(none.indices().is_empty());
    let one = Compaction::new(&[true]).unwrap();
    assert_eq!((one.count(), one.slot(0)), (1, Some(0)));
    assert_eq!(invalid_name(Compaction::new(&[])), "keep");
    // Random flags: the slot of a kept sample counts the kept samples before it.
    let mut rng = Lcg(8);
    let keep = rng.flags(1000, 30);
    let c = Compaction::new(&keep).unwrap();
    let mut before = 0u32;
    for (b, &k) in keep.iter().enumerate() {
        assert_eq!(c.slots()[b], k.then_some(before));
        before += u32::from(k);
    }
    assert_eq!(c.count(), before as usize);
    assert!(c.indices().windows(2).all(|w| w[0] < w[1]));
}

fn compaction_round_trip<T: Element>() {
    let mut rng = Lcg(9);
    for (batch, row_len) in [(1usize, 1usize), (1, 17), (6, 3), (40, 5)] {
        let mut x: Vec<T> = conv(&rng.grids(batch * row_len));
        x[0] = T::from_f32(f32::NAN);
        if x.len() > 1 {
            x[1] = T::from_f32(-0.0);
        }
        for percent in [0, 50, 100] {
            let keep = rng.flags(batch, percent);
            let count = keep.iter().filter(|&&k| k).count();
            let c = gather_samples(&x, row_len, &keep).unwrap();
            assert_eq!(c.len(), count * row_len);
            for (s, &b) in Compaction::new(&keep).unwrap().indices().iter().enumerate() {
                let b = b as usize;
                assert_eq!(
                    bits(&c[s * row_len..(s + 1) * row_len]),
                    bits(&x[b * row_len..(b + 1) * row_len])
                );
            }
            // Identity layer: the round trip is the identity, bit for bit.
            let back = scatter_samples(&x, &c, row_len, &keep).unwrap();
            assert_eq!(bits(&back), bits(&x));
            // A layer (negation) on the kept samples only; skipped samples are the identity.
            let layer: Vec<T> = c.iter().map(|v| T::from_f32(-v.to_f32())).collect();
            let out = scatter_samples(&x, &layer, row_len, &keep).unwrap();
            for (i, v) in out.iter().enumerate() {
                if keep[i / row_len] {
                    assert_eq!(v.to_bits_u32(), T::from_f32(-x[i].to_f32()).to_bits_u32());
                } else {
                    assert_eq!(v.to_bits_u32(), x[i].to_bits_u32());
                }
            }
            // A pre-sized compact input with extra (garbage) rows gives the same result.
            let mut padded = layer.clone();
            padded.extend(conv::<T>(&vec![
                f32::NAN;
                (batch - count) * row_len + 2 * row_len
            ]));
            let out2 = scatter_samples(&x, &padded, row_len, &keep).unwrap();
            assert_eq!(bits(&out2), bits(&out));
        }
    }
}

#[test]
fn compaction_gather_scatter_round_trip() {
    compaction_round_trip::<f32>();
    compaction_round_trip::<f16>();
    compaction_round_trip::<bf16>();
}

#[test]
fn gather_into_a_presized_buffer() {
    let row_len = 3;
    let x: Vec<f32> = (0..15).map(|v| v as f32).collect();
    let keep = [true, false, true, true, false];
    let sentinel = -7.5f32;
    for capacity in [3usize, 4, 5] {
        let mut out = vec![sentinel; capacity * row_len];
        assert_eq!(gather_samples_into(&x, row_len, &keep, &mut out).unwrap(), 3);
        assert_eq!(&out[..9], &[0.0, 1.0, 2.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert!(
            out[9..].iter().all(|&v| v == sentinel),
            "rows beyond the count untouched"
        );
    }
    for capacity in [0usize, 1, 2] {
        let mut out = vec![sentinel; capacity * row_len];
        assert_eq!(
            invalid_name(gather_samples_into(&x, row_len, &keep, &mut out)),
            "capacity"
        );
        assert!(out.iter().all(|&v| v == sentinel), "nothing written on error");
    }
    let mut out = vec![sentinel; 10];
    assert_eq!(
        invalid_name(gather_samples_into(&x, row_len, &keep, &mut out)),
        "out"
    );
    // Nothing kept: an empty buffer is enough.
    assert_eq!(gather_samples_into(&x, row_len, &[false; 5], &mut []).unwrap(), 0);
}

/// The compact residual add is stochastic depth on the expanded branch, bit for bit.
fn scatter_add_is_stochastic_depth<T: Element>() {
    let mut rng = Lcg(10);
    let (batch, row_len) = (12, 7);
    let x: Vec<T> = conv(&rng.grids(batch * row_len));
    let keep = rng.flags(batch, 50);
    let c = Compaction::new(&keep).unwrap();
    let compact: Vec<T> = (0..c.count() * row_len)
        .map(|_| T::from_f32(rng.float()))
        .collect();
    let mut branch: Vec<T> = conv(&vec![f32::NAN; batch * row_len]);
    for (s, &b) in c.indices().iter().enumerate() {
        let b = b as usize;
        branch[b * row_len..(b + 1) * row_len].copy_from_slice(&compact[s * row_len..(s + 1) * row_len]);
    }
    let scale = keep_scale(0.15).unwrap();
    let mut got = x.clone();
    scatter_add_samples(&mut got, &compact, row_len, &keep, scale).unwrap();
    let want = stochastic_depth(&x, &branch, None, row_len, SampleKeep::PerSample(&keep), scale).unwrap();
    assert_eq!(bits(&got), bits(&want));
    // Its backward is stochastic depth's d_branch, gathered.
    let d_out: Vec<T> = (0..batch * row_len).map(|_| T::from_f32(rng.float())).collect();
    let dc = scatter_add_samples_backward(&d_out, row_len, &keep, scale).unwrap();
    let full = stochastic_depth_backward(&d_out, row_len, SampleKeep::PerSample(&keep), scale, None).unwrap();
    assert_eq!(
        bits(&dc),
        bits(&gather_samples(&full.d_branch, row_len, &keep).unwrap())
    );
}

#[test]
fn compaction_scatter_add_is_stochastic_depth() {
    scatter_add_is_stochastic_depth::<f32>();
    scatter_add_is_stochastic_depth::<f16>();
    scatter_add_is_stochastic_depth::<bf16>();
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The backward functions are the adjoints of the (linear) forwards: `<F(v), y> = <v, F^T(y)>`,
/// exact with grid values in f32.
#[test]
fn compaction_backward_is_the_adjoint() {
    let mut rng = Lcg(11);
    let (batch, row_len) = (9, 4);
    for percent in [0, 40, 100] {
        let keep = rng.flags(batch, percent);
        let count = keep.iter().filter(|&&k| k).count();
        let x = rng.grids(batch * row_len);
        let c = rng.grids(count * row_len);
        let y = rng.grids(batch * row_len);
        let z = rng.grids(count * row_len);
        // Scatter (copy): <scatter(x, c), y> = <x, d_x> + <c, d_c>.
        let out = scatter_samples(&x, &c, row_len, &keep).unwrap();
        let (d_x, d_c) = scatter_samples_backward(&y, row_len, &keep).unwrap();
        let lhs = dot(&widen(&out), &widen(&y));
        let rhs = dot(&widen(&x), &widen(&d_x)) + dot(&widen(&c), &widen(&d_c));
        assert_eq!(lhs, rhs);
        // The input's total gradient with a layer in between: scatter of d_out and d_c_in.
        let mut total = d_x.clone();
        gather_samples_backward(&z, row_len, &keep, &mut total).unwrap();
        assert_eq!(
            bits(&total),
            bits(&scatter_samples(&y, &z, row_len, &keep).unwrap())
        );
        // Gather: <gather(x), z> = <x, gather^T(z)>.
        let g = gather_samples(&x, row_len, &keep).unwrap();
        let mut gt = vec![0.0f32; batch * row_len];
        gather_samples_backward(&z, row_len, &keep, &mut gt).unwrap();
        assert_eq!(dot(&widen(&g), &widen(&z)), dot(&widen(&x), &widen(&gt)));
        // Scatter-add: <x + s * E c, y> = <x, y> + <c, d_c>.
        let scale = 2.0;
        let mut sa = x.clone();
        scatter_add_samples(&mut sa, &c, row_len, &keep, scale).unwrap();
        let d_c = scatter_add_samples_backward(&y, row_len, &keep, scale).unwrap();
        assert_eq!(d_c.len(), count * row_len);
        let lhs = dot(&widen(&sa), &widen(&y));
        let rhs = dot(&widen(&x), &widen(&y)) + dot(&widen(&c), &widen(&d_c));
        assert_eq!(lhs, rhs);
    }
}

/// The gathers' backward accumulates with one `f32` add, `round_T(f32(d_x) + f32(d_c))`: into a
/// `+0` gradient a `-0` entry of `d_c` becomes `+0` (IEEE `+0 + -0 = +0`: a plain transpose turns
/// `-0` into `+0`, as contract point 6 says), and a `-0` gradient plus `-0` stays `-0`.
#[test]
fn gather_backward_adds_signed_zeros() {
    let keep = [true, false, true];
    let d_c = [-0.0f32, 1.5, -0.0, -0.0];
    let mut d_x = [0.0f32; 6];
    gather_samples_backward(&d_c, 2, &keep, &mut d_x).unwrap();
    assert_eq!(bits(&d_x[..]), bits(&[0.0f32, 1.5, 0.0, 0.0, 0.0, 0.0][..]));
    let mut d_x = [-0.0f32; 6];
    gather_samples_backward(&d_c, 2, &keep, &mut d_x).unwrap();
    assert_eq!(bits(&d_x[..]), bits(&[-0.0f32, 1.5, -0.0, -0.0, -0.0, -0.0][..]));
    let d_c16: Vec<bf16> = d_c.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut d_x16 = [bf16::from_f32(0.0); 6];
    gather_samples_backward(&d_c16, 2, &keep, &mut d_x16).unwrap();
    assert!(d_x16
        .iter()
        .all(|v| v.to_bits() != bf16::from_f32(-0.0).to_bits()));

    let scores = [3.0f32, 1.0, 2.0, 0.5];
    let r = route_top_k(&scores, 2, ValidTokens::All, Capacity::Tokens(1)).unwrap();
    let mut d_x = [0.0f32; 8];
    gather_tokens_backward(&d_c, 2, &r, &mut d_x).unwrap();
    assert_eq!(
        bits(&d_x[..]),
        bits(&[0.0f32, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0][..])
    );
}

#[test]
fn compaction_validation() {
    let x = [1.0f32; 12];
    let keep = [true, false, true];
    let mut out = [0.0f32; 12];
    assert_eq!(invalid_name(gather_samples(&x, 0, &keep)), "row_len");
    assert_eq!(invalid_name(gather_samples(&x, 4, &[])), "keep");
    assert_eq!(invalid_name(gather_samples(&x, 3, &keep)), "x");
    assert_eq!(invalid_name(gather_samples(&x[..11], 4, &keep)), "x");
    assert_eq!(invalid_name(gather_samples_into(&x, 5, &keep, &mut out)), "x");
    assert_eq!(invalid_name(scatter_samples(&x, &x[..4], 4, &keep)), "compact");
    assert_eq!(invalid_name(scatter_samples(&x, &x[..9], 4, &keep)), "compact");
    assert!(scatter_samples(&x, &x[..8], 4, &keep).is_ok());
    assert_eq!(invalid_name(scatter_samples_backward(&x[..8], 4, &keep)), "d_out");
    let mut r = x;
    assert_eq!(
        invalid_name(scatter_add_samples(&mut r, &x[..4], 4, &keep, 1.0)),
        "compact"
    );
    assert_eq!(
        invalid_name(scatter_add_samples(&mut r, &x[..8], 4, &keep, f32::NAN)),
        "scale"
    );
    assert_eq!(r, x, "nothing written on error");
    assert_eq!(
        invalid_name(scatter_add_samples_backward(&x, 4, &keep, -1.0)),
        "scale"
    );
    assert_eq!(
        invalid_name(scatter_add_samples_backward(&x, 4, &[true], 1.0)),
        "d_out"
    );
    let mut d_x = [0.0f32; 12];
    assert_eq!(
        invalid_name(gather_samples_backward(&x[..4], 4, &keep, &mut d_x)),
        "d_compact"
    );
    assert_eq!(
        invalid_name(gather_samples_backward(&x, 4, &keep, &mut d_x[..8])),
        "d_x"
    );
}

// =================================================================================================
// Token routing: selection

#[test]
fn score_key_is_the_numeric_order() {
    let ascending = [
        f32::NEG_INFINITY,
        f32::MIN,
        -1.0,
        -f32::MIN_POSITIVE,
        -1e-45,
        0.0,
        1e-45,
        f32::MIN_POSITIVE,
        1.0,
        f32::MAX,
        f32::INFINITY,
    ];
    for w in ascending.windows(2) {
        assert!(score_key(w[0]) < score_key(w[1]), "{} < {}", w[0], w[1]);
    }
    assert_eq!(score_key(-0.0), score_key(0.0));
    for nan in [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffff_ffff),
    ] {
        assert_eq!(score_key(nan), 0);
        assert!(score_key(nan) < score_key(f32::NEG_INFINITY));
    }
}

/// Brute force: a token is selected iff it is valid and fewer than `k` valid tokens of the same
/// scope rank before it (higher key, or equal key and lower index).
fn brute_top_k(scores: &[f32], seq_len: usize, valid: &[bool], cap: Capacity) -> Vec<Vec<u32>> {
    let batch = scores.len() / seq_len;
    (0..batch)
        .map(|b| {
            let base = b * seq_len;
            let n_valid = (0..seq_len).filter(|&t| valid[base + t]).count();
            let k = cap.tokens(n_valid);
            (0..seq_len)
                .filter(|&t| {
                    valid[base + t] && {
                        let kt = score_key(scores[base + t]);
                        let before = (0..seq_len)
                            .filter(|&u| {
                                valid[base + u] && {
                                    let ku = score_key(scores[base + u]);
                                    ku > kt || (ku == kt && u < t)
                                }
                            })
                            .count();
                        before < k
                    }
                })
                .map(|t| t as u32)
                .collect()
        })
        .collect()
}

fn assert_routing(r: &Routing, lists: &[Vec<u32>]) {
    assert_eq!(r.batch(), lists.len());
    assert_eq!(r.offsets()[0], 0);
    for (b, list) in lists.iter().enumerate() {
        assert_eq!(r.sequence(b).unwrap(), &list[..], "sequence {b}");
        assert_eq!(r.counts()[b], list.len());
        assert_eq!((r.offsets()[b + 1] - r.offsets()[b]) as usize, list.len());
        for (i, &t) in list.iter().enumerate() {
            assert_eq!(r.slot(b, t as usize), Some(r.offsets()[b] as usize + i));
        }
    }
    assert_eq!(r.total(), lists.iter().map(Vec::len).sum::<usize>());
    assert!(r.sequence(lists.len()).is_none());
}

/// Scores from a small set (many ties), NaN and both zeros included.
fn score() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => (-3i32..=3).prop_map(|v| v as f32),
        1 => Just(f32::NAN),
        1 => Just(-0.0f32),
        1 => Just(f32::NEG_INFINITY),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(96)))]

    #[test]
    fn top_k_matches_brute_force(
        (seq_len, scores, valid) in (1usize..=24, 1usize..=4).prop_flat_map(|(s, b)| (
            Just(s),
            prop::collection::vec(score(), s * b),
            prop::collection::vec(prop::bool::weighted(0.8), s * b),
        )),
        k in 0usize..30,
        frac in 0.0f64..=1.0,
    ) {
        for cap in [Capacity::Tokens(k), Capacity::Fraction(frac)] {
            let r = route_top_k(&scores, seq_len, ValidTokens::Mask(&valid), cap).unwrap();
            let want = brute_top_k(&scores, seq_len, &valid, cap);
            assert_routing(&r, &want);
            let mask = r.selected_mask();
            for i in 0..scores.len() {
                prop_assert!(!mask[i] || valid[i], "padding token {} selected", i);
            }
        }
    }

    #[test]
    fn global_budget_matches_brute_force(
        (seq_len, scores, valid) in (1usize..=12, 1usize..=5).prop_flat_map(|(s, b)| (
            Just(s),
            prop::collection::vec(score(), s * b),
            prop::collection::vec(prop::bool::weighted(0.8), s * b),
        )),
        q in 0.0f64..=1.0,
    ) {
        let (r, threshold) = route_global(&scores, seq_len, ValidTokens::Mask(&valid), q).unwrap();
        let n_valid = valid.iter().filter(|&&v| v).count();
        let n = (q * n_valid as f64).round() as usize;
        prop_assert_eq!(r.total(), n);
        // Brute force over flat indices.
        let rank_before = |i: usize| {
            let ki = score_key(scores[i]);
            (0..scores.len())
                .filter(|&u| valid[u] && (score_key(scores[u]) > ki || (score_key(scores[u]) == ki && u < i)))
                .count()
        };
        let mask = r.selected_mask();
        for i in 0..scores.len() {
            prop_assert_eq!(mask[i], valid[i] && rank_before(i) < n, "token {}", i);
        }
        let lists: Vec<Vec<u32>> = (0..scores.len() / seq_len)
            .map(|b| (0..seq_len).filter(|&t| mask[b * seq_len + t]).map(|t| t as u32).collect())
            .collect();
        assert_routing(&r, &lists);
        // The threshold is the last selected score; everything keyed above it is selected.
        match threshold {
            None => prop_assert_eq!(n, 0),
            Some(th) => {
                let kth = score_key(th);
                for i in 0..scores.len() {
                    if valid[i] && score_key(scores[i]) > kth {
                        prop_assert!(mask[i]);
                    }
                    if mask[i] {
                        prop_assert!(score_key(scores[i]) >= kth);
                    }
                }
                let last = (0..scores.len()).filter(|&i| mask[i] && score_key(scores[i]) == kth).count();
                prop_assert!(last >= 1);
            }
        }
    }
}

#[test]
fn top_k_ties_go_to_the_lower_index() {
    // Equal scores: the first k valid tokens.
    let s = [0.5f32; 10];
    let r = route_top_k(&s, 10, ValidTokens::All, Capacity::Tokens(4)).unwrap();
    assert_eq!(r.indices(), &[0, 1, 2, 3]);
    let valid = [false, true, false, true, true, true, true, true, true, true];
    let r = route_top_k(&s, 10, ValidTokens::Mask(&valid), Capacity::Tokens(3)).unwrap();
    assert_eq!(r.indices(), &[1, 3, 4]);
    // A tie at the boundary.
    let s = [1.0f32, 2.0, 2.0, 0.0, 2.0, 3.0];
    let r = route_top_k(&s, 6, ValidTokens::All, Capacity::Tokens(3)).unwrap();
    assert_eq!(r.indices(), &[1, 2, 5]);
    // -0 and +0 are equal; NaN ranks below -inf.
    let s = [f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, 1.0];
    let pick = |k| {
        route_top_k(&s, 5, ValidTokens::All, Capacity::Tokens(k))
            .unwrap()
            .indices()
            .to_vec()
    };
    assert_eq!(pick(1), vec![4]);
    assert_eq!(pick(2), vec![2, 4]);
    assert_eq!(pick(3), vec![2, 3, 4]);
    assert_eq!(pick(4), vec![1, 2, 3, 4]);
    assert_eq!(pick(5), vec![0, 1, 2, 3, 4]);
    let s = [0.0f32, -0.0];
    assert_eq!(
        route_top_k(&s, 2, ValidTokens::All, Capacity::Tokens(1))
            .unwrap()
            .indices(),
        &[0]
    );
    let s = [f32::NAN, -f32::NAN, 1.0];
    assert_eq!(
        route_top_k(&s, 3, ValidTokens::All, Capacity::Tokens(2))
            .unwrap()
            .indices(),
        &[0, 2]
    );
}

#[test]
fn top_k_capacity_rules() {
    // k larger than the valid length selects every valid token; padding never.
    let s: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let lengths = [5usize];
    for cap in [
        Capacity::Tokens(100),
        Capacity::Tokens(5),
        Capacity::Fraction(1.0),
    ] {
        let r = route_top_k(&s, 8, ValidTokens::Lengths(&lengths), cap).unwrap();
        assert_eq!(r.indices(), &[0, 1, 2, 3, 4]);
    }
    let r = route_top_k(&s, 8, ValidTokens::Lengths(&lengths), Capacity::Fraction(0.0)).unwrap();
    assert_eq!(r.total(), 0);
    // k = round(c * V), half away from zero, the product in f64.
    let cases = [
        (0.1, 30, 3),
        (0.5, 5, 3),
        (0.125, 4, 1),
        (0.125, 3, 0),
        (0.29, 100, 29),
        (0.7, 10, 7),
        (0.125, 2048, 256),
        (1.0, 40_000, 40_000),
        // The f64 products 14.499999999999998 (0.29 * 50, 0.58 * 25) and 31.5 (0.42 * 75) round
        // to 14, 14 and 32; in f32 they would be 14.5, 14.5 and 31.499998: 15, 15 and 31.
        (0.29, 50, 14),
        (0.58, 25, 14),
        (0.42, 75, 32),
    ];
    for (c, v, k) in cases {
        assert_eq!(Capacity::Fraction(c).tokens(v), k, "{c} * {v}");
    }
    // The same budgets through the routings (every token valid, distinct scores).
    for (c, v, k) in [(0.29, 50usize, 14usize), (0.58, 25, 14), (0.42, 75, 32)] {
        let s: Vec<f32> = (0..v).map(|t| t as f32).collect();
        let r = route_top_k(&s, v, ValidTokens::All, Capacity::Fraction(c)).unwrap();
        assert_eq!(r.total(), k, "top-k {c} of {v}");
        let (g, _) = route_global(&s, v, ValidTokens::All, c).unwrap();
        assert_eq!(g.total(), k, "global {c} of {v}");
    }
    assert_eq!(Capacity::Tokens(7).tokens(3), 3);
    assert_eq!(Capacity::Tokens(0).tokens(3), 0);
}

#[test]
fn all_padding_selects_nothing() {
    let s = [1.0f32; 12];
    let mask = [false; 12];
    for valid in [ValidTokens::Mask(&mask), ValidTokens::Lengths(&[0, 0, 0])] {
        let r = route_top_k(&s, 4, valid, Capacity::Tokens(4)).unwrap();
        assert_eq!(r.total(), 0);
        assert_eq!(r.offsets(), &[0, 0, 0, 0]);
        assert_eq!(r.counts(), vec![0, 0, 0]);
        let (g, th) = route_global(&s, 4, valid, 1.0).unwrap();
        assert_eq!((g.total(), th), (0, None));
        // Gathering nothing and scattering nothing are valid.
        let x = vec![1.0f32; 12 * 2];
        assert!(gather_tokens(&x, 2, &r).unwrap().is_empty());
        let mut res = x.clone();
        scatter_add_tokens(&mut res, 2, &r, &[], &s).unwrap();
        assert_eq!(res, x);
    }
}

#[test]
fn mask_and_lengths_agree() {
    let mut rng = Lcg(12);
    let (batch, seq_len) = (5, 13);
    let scores: Vec<f32> = (0..batch * seq_len).map(|_| rng.below(7) as f32).collect();
    let lengths: Vec<usize> = (0..batch)
        .map(|_| rng.below(seq_len as u64 + 1) as usize)
        .collect();
    let mask: Vec<bool> = (0..batch * seq_len)
        .map(|i| i % seq_len < lengths[i / seq_len])
        .collect();
    for cap in [Capacity::Tokens(4), Capacity::Fraction(0.5)] {
        let a = route_top_k(&scores, seq_len, ValidTokens::Lengths(&lengths), cap).unwrap();
        let b = route_top_k(&scores, seq_len, ValidTokens::Mask(&mask), cap).unwrap();
        assert_eq!(a, b);
    }
    let a = route_global(&scores, seq_len, ValidTokens::Lengths(&lengths), 0.3).unwrap();
    let b = route_global(&scores, seq_len, ValidTokens::Mask(&mask), 0.3).unwrap();
    assert_eq!(a, b);
    let full = vec![seq_len; batch];
    let a = route_top_k(&scores, seq_len, ValidTokens::Lengths(&full), Capacity::Tokens(3)).unwrap();
    let b = route_top_k(&scores, seq_len, ValidTokens::All, Capacity::Tokens(3)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn one_row_batches() {
    let r = route_top_k(&[3.0], 1, ValidTokens::All, Capacity::Fraction(0.5)).unwrap();
    assert_eq!((r.indices(), r.offsets()), (&[0u32][..], &[0u32, 1][..]));
    let r = route_top_k(&[3.0], 1, ValidTokens::All, Capacity::Fraction(0.49)).unwrap();
    assert_eq!(r.total(), 0);
    let s = [0.3f32, 0.9, 0.1, 0.9, 0.5];
    let r = route_top_k(&s, 5, ValidTokens::All, Capacity::Tokens(2)).unwrap();
    assert_eq!(r.indices(), &[1, 3]);
    assert_eq!(r.batch(), 1);
    let (g, th) = route_global(&s, 5, ValidTokens::All, 0.6).unwrap();
    assert_eq!(g.indices(), &[1, 3, 4]);
    assert_eq!(th, Some(0.5));
    // Five sequences of one token each: the global budget compares across sequences.
    let (g, th) = route_global(&s, 1, ValidTokens::All, 0.4).unwrap();
    assert_eq!(g.counts(), vec![0, 1, 0, 1, 0]);
    assert_eq!(g.offsets(), &[0, 0, 1, 1, 2, 2]);
    assert_eq!(th, Some(0.9));
}

#[test]
fn global_budget_ties_and_threshold() {
    // Equal scores everywhere: lower sequence first, then lower token.
    let s = [1.0f32; 12];
    let (g, th) = route_global(&s, 4, ValidTokens::All, 0.5).unwrap();
    assert_eq!(g.counts(), vec![4, 2, 0]);
    assert_eq!(g.indices(), &[0, 1, 2, 3, 0, 1]);
    assert_eq!(th, Some(1.0));
    // Padding excluded from V and from the selection: V = 6, n = round(0.5 * 6) = 3.
    let lengths = [2usize, 0, 4];
    let (g, _) = route_global(&s, 4, ValidTokens::Lengths(&lengths), 0.5).unwrap();
    assert_eq!(g.counts(), vec![2, 0, 1]);
    assert_eq!(g.indices(), &[0, 1, 0]);
    // n = round(q * V) half away from zero: 0.5 * 5 = 2.5 -> 3.
    let s = [5.0f32, 4.0, 3.0, 2.0, 1.0];
    assert_eq!(route_global(&s, 5, ValidTokens::All, 0.5).unwrap().0.total(), 3);
    assert_eq!(route_global(&s, 5, ValidTokens::All, 0.0).unwrap().1, None);
    let (all, th) = route_global(&s, 5, ValidTokens::All, 1.0).unwrap();
    assert_eq!((all.total(), th), (5, Some(1.0)));
    // The threshold is canonical: +0 for -0, NaN for NaN.
    let s = [-0.0f32, 1.0];
    assert_eq!(
        route_global(&s, 2, ValidTokens::All, 1.0)
            .unwrap()
            .1
            .unwrap()
            .to_bits(),
        0
    );
    let s = [-f32::NAN, 1.0];
    assert!(route_global(&s, 2, ValidTokens::All, 1.0)
        .unwrap()
        .1
        .unwrap()
        .is_nan());
}

/// Two sequences of 40 000 tokens (one padded to 12 345) with heavily tied scores, capacity 1/8.
#[test]
fn long_sequences() {
    let seq_len = 40_000;
    let lengths = [seq_len, 12_345];
    let mut rng = Lcg(13);
    let scores: Vec<f32> = (0..2 * seq_len).map(|_| rng.below(1000) as f32 / 8.0).collect();
    let r = route_top_k(
        &scores,
        seq_len,
        ValidTokens::Lengths(&lengths),
        Capacity::Fraction(0.125),
    )
    .unwrap();
    assert_eq!(r.counts(), vec![5000, 1543]);
    for (b, &len) in lengths.iter().enumerate() {
        let sel = r.sequence(b).unwrap();
        assert!(sel.windows(2).all(|w| w[0] < w[1]), "ascending");
        assert!(sel.iter().all(|&t| (t as usize) < len), "no padding");
        let base = b * seq_len;
        let mut is_sel = vec![false; len];
        for &t in sel {
            is_sel[t as usize] = true;
        }
        let key = |t: usize| score_key(scores[base + t]);
        let min_sel = sel.iter().map(|&t| key(t as usize)).min().unwrap();
        let max_unsel = (0..len).filter(|&t| !is_sel[t]).map(key).max().unwrap();
        assert!(min_sel >= max_unsel);
        // At the boundary key every selected token comes before every unselected one.
        let last_sel = (0..len)
            .filter(|&t| is_sel[t] && key(t) == min_sel)
            .max()
            .unwrap();
        let first_unsel = (0..len).filter(|&t| !is_sel[t] && key(t) == min_sel).min();
        if let Some(u) = first_unsel {
            assert!(last_sel < u);
        }
    }
    let (g, _) = route_global(&scores, seq_len, ValidTokens::Lengths(&lengths), 0.25).unwrap();
    assert_eq!(g.total(), (0.25f64 * 52_345.0).round() as usize);
    assert!(g.sequence(1).unwrap().iter().all(|&t| (t as usize) < 12_345));
}

#[test]
fn routing_validation() {
    let s = [1.0f32; 12];
    let all = ValidTokens::All;
    let tk = Capacity::Tokens(2);
    assert_eq!(invalid_name(route_top_k(&s, 0, all, tk)), "seq_len");
    assert_eq!(invalid_name(route_top_k(&[], 4, all, tk)), "scores");
    assert_eq!(invalid_name(route_top_k(&s, 5, all, tk)), "scores");
    assert_eq!(
        invalid_name(route_top_k(&s, 4, ValidTokens::Mask(&[true; 11]), tk)),
        "mask"
    );
    assert_eq!(
        invalid_name(route_top_k(&s, 4, ValidTokens::Lengths(&[4, 4]), tk)),
        "lengths"
    );
    assert_eq!(
        invalid_name(route_top_k(&s, 4, ValidTokens::Lengths(&[4, 5, 0]), tk)),
        "lengths"
    );
    for c in [f64::NAN, -0.1, 1.1, f64::INFINITY] {
        assert_eq!(
            invalid_name(route_top_k(&s, 4, all, Capacity::Fraction(c))),
            "capacity"
        );
        assert_eq!(invalid_name(route_global(&s, 4, all, c)), "keep_fraction");
    }
    assert_eq!(invalid_name(route_global(&s, 0, all, 0.5)), "seq_len");
    assert_eq!(
        invalid_name(route_global(&s, 4, ValidTokens::Lengths(&[1]), 0.5)),
        "lengths"
    );
}

// =================================================================================================
// Token routing: gather, gated scatter-add, backward

fn token_round_trip<T: Element>() {
    let (batch, seq_len, hidden) = (3, 7, 5);
    let mut rng = Lcg(14);
    let scores: Vec<f32> = (0..batch * seq_len).map(|_| rng.float()).collect();
    let lengths = [7usize, 4, 6];
    let r = route_top_k(
        &scores,
        seq_len,
        ValidTokens::Lengths(&lengths),
        Capacity::Fraction(0.5),
    )
    .unwrap();
    let x: Vec<T> = conv(&rng.grids(batch * seq_len * hidden));
    let c = gather_tokens(&x, hidden, &r).unwrap();
    assert_eq!(c.len(), r.total() * hidden);
    let mask = r.selected_mask();
    // Identity layer, gate 1: selected rows double (exact), the others are untouched.
    let mut res = x.clone();
    scatter_add_tokens(&mut res, hidden, &r, &c, &vec![1.0; batch * seq_len]).unwrap();
    for (i, v) in res.iter().enumerate() {
        let want = if mask[i / hidden] {
            T::from_f32(2.0 * x[i].to_f32())
        } else {
            x[i]
        };
        assert_eq!(v.to_bits_u32(), want.to_bits_u32(), "gate 1, element {i}");
    }
    // Gate -1 cancels the selected rows to +0.
    let mut res = x.clone();
    scatter_add_tokens(&mut res, hidden, &r, &c, &vec![-1.0; batch * seq_len]).unwrap();
    for (i, v) in res.iter().enumerate() {
        let want = if mask[i / hidden] { 0 } else { x[i].to_bits_u32() };
        assert_eq!(v.to_bits_u32(), want, "gate -1, element {i}");
    }
    // Gathered rows are bit copies of their tokens' rows.
    for b in 0..batch {
        for (i, &t) in r.sequence(b).unwrap().iter().enumerate() {
            let row = r.offsets()[b] as usize + i;
            let tok = b * seq_len + t as usize;
            assert_eq!(
                bits(&c[row * hidden..(row + 1) * hidden]),
                bits(&x[tok * hidden..(tok + 1) * hidden])
            );
        }
    }
}

#[test]
fn token_gather_scatter_add_round_trip() {
    token_round_trip::<f32>();
    token_round_trip::<f16>();
    token_round_trip::<bf16>();
}

/// `res + g * branch` with the gate of each token: exact for grid values and gates in
/// {0.5, 1.25, -2}, so the result is the exact value rounded once.
fn token_scatter_formula<T: Element>() {
    let (batch, seq_len, hidden) = (2, 9, 6);
    let mut rng = Lcg(15);
    let scores: Vec<f32> = (0..batch * seq_len).map(|_| rng.below(5) as f32).collect();
    let r = route_top_k(&scores, seq_len, ValidTokens::All, Capacity::Tokens(4)).unwrap();
    let gates_set = [0.5f32, 1.25, -2.0];
    let gate: Vec<f32> = (0..batch * seq_len)
        .map(|_| gates_set[rng.below(3) as usize])
        .collect();
    let res0: Vec<T> = conv(&rng.grids(batch * seq_len * hidden));
    // A pre-sized branch buffer with extra rows.
    let branch: Vec<T> = conv(&rng.grids((r.total() + 3) * hidden));
    let mut res = res0.clone();
    scatter_add_tokens(&mut res, hidden, &r, &branch, &gate).unwrap();
    for b in 0..batch {
        for t in 0..seq_len {
            let tok = b * seq_len + t;
            for j in 0..hidden {
                let i = tok * hidden + j;
                let want = match r.slot(b, t) {
                    Some(row) => T::from_f32(
                        (f64::from(res0[i].to_f32())
                            + f64::from(gate[tok]) * f64::from(branch[row * hidden + j].to_f32()))
                            as f32,
                    ),
                    None => res0[i],
                };
                assert_eq!(
                    res[i].to_bits_u32(),
                    want.to_bits_u32(),
                    "token ({b}, {t}), j {j}"
                );
            }
        }
    }
}

#[test]
fn token_scatter_add_follows_the_formula() {
    token_scatter_formula::<f32>();
    token_scatter_formula::<f16>();
    token_scatter_formula::<bf16>();
    // One rounding to bf16: 256 + (1 + 2^-9) * 1 = 258; rounding the product to bf16 first gives 256.
    let r = route_top_k(&[1.0], 1, ValidTokens::All, Capacity::Tokens(1)).unwrap();
    let mut res = [bf16::from_f32(256.0)];
    scatter_add_tokens(&mut res, 1, &r, &[bf16::ONE], &[1.0 + 2f32.powi(-9)]).unwrap();
    assert_eq!(res[0].to_f32(), 258.0);
    // Two f32 roundings, not an fma.
    let mut rng = Lcg(16);
    let mut found = 0;
    for _ in 0..10_000 {
        let (x, f, g) = (rng.float(), rng.float(), rng.float());
        let two_step = x + g * f;
        if two_step.to_bits() == g.mul_add(f, x).to_bits() {
            continue;
        }
        let mut res = [x];
        scatter_add_tokens(&mut res, 1, &r, &[f], &[g]).unwrap();
        assert_eq!(res[0].to_bits(), two_step.to_bits());
        found += 1;
    }
    assert!(found > 10);
}

#[test]
fn token_gather_into_a_presized_buffer() {
    let scores = [3.0f32, 1.0, 2.0, 0.0, 5.0, 4.0];
    let r = route_top_k(&scores, 3, ValidTokens::All, Capacity::Tokens(2)).unwrap();
    assert_eq!(r.indices(), &[0, 2, 1, 2]);
    let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let sentinel = -1.0f32;
    let mut out = vec![sentinel; 6 * 2];
    assert_eq!(gather_tokens_into(&x, 2, &r, &mut out).unwrap(), 4);
    assert_eq!(&out[..8], &[0.0, 1.0, 4.0, 5.0, 8.0, 9.0, 10.0, 11.0]);
    assert!(out[8..].iter().all(|&v| v == sentinel));
    let mut small = vec![sentinel; 3 * 2];
    assert_eq!(
        invalid_name(gather_tokens_into(&x, 2, &r, &mut small)),
        "capacity"
    );
    assert!(small.iter().all(|&v| v == sentinel));
    assert_eq!(invalid_name(gather_tokens_into(&x, 2, &r, &mut out[..9])), "out");
}

fn token_backward_formula<T: Element>() {
    let (batch, seq_len, hidden) = (3, 6, 40);
    let mut rng = Lcg(17);
    let scores: Vec<f32> = (0..batch * seq_len).map(|_| rng.float()).collect();
    let r = route_top_k(
        &scores,
        seq_len,
        ValidTokens::Lengths(&[6, 3, 0]),
        Capacity::Tokens(3),
    )
    .unwrap();
    let gate: Vec<f32> = (0..batch * seq_len)
        .map(|_| [0.5f32, 1.25, -2.0][rng.below(3) as usize])
        .collect();
    let d_out: Vec<T> = conv(&rng.grids(batch * seq_len * hidden));
    let branch: Vec<T> = conv(&rng.grids(r.total() * hidden));
    let g = scatter_add_tokens_backward(&d_out, hidden, &r, &branch, &gate).unwrap();
    assert_eq!(g.d_branch.len(), r.total() * hidden);
    assert_eq!(g.d_gate.len(), batch * seq_len);
    let (dy, f) = (widen(&d_out), widen(&branch));
    for b in 0..batch {
        for t in 0..seq_len {
            let tok = b * seq_len + t;
            match r.slot(b, t) {
                None => assert_eq!(g.d_gate[tok].to_bits(), 0, "unselected token ({b}, {t})"),
                Some(row) => {
                    // Grid values: products are multiples of 2^-12 below 16 in magnitude, so every
                    // partial sum is exact: d_gate is the exact dot product.
                    let want: f64 = (0..hidden)
                        .map(|j| dy[tok * hidden + j] * f[row * hidden + j])
                        .sum();
                    assert_eq!(f64::from(g.d_gate[tok]), want, "d_gate ({b}, {t})");
                    for j in 0..hidden {
                        let w = T::from_f32(gate[tok] * d_out[tok * hidden + j].to_f32());
                        assert_eq!(g.d_branch[row * hidden + j].to_bits_u32(), w.to_bits_u32());
                    }
                }
            }
        }
    }
}

#[test]
fn token_backward_formula_all_types() {
    token_backward_formula::<f32>();
    token_backward_formula::<f16>();
    token_backward_formula::<bf16>();
}

/// The gate's gradient and the branch's against central finite differences of
/// `L = sum w * (res + g * branch)` (the forward in f64).
#[test]
fn gate_gradient_matches_finite_differences() {
    let (batch, seq_len, hidden) = (2, 5, 70);
    let mut rng = Lcg(18);
    let scores: Vec<f32> = (0..batch * seq_len).map(|_| rng.float()).collect();
    let r = route_top_k(&scores, seq_len, ValidTokens::All, Capacity::Fraction(0.6)).unwrap();
    let gate: Vec<f32> = (0..batch * seq_len).map(|_| rng.float() * 0.5).collect();
    let w: Vec<f32> = (0..batch * seq_len * hidden).map(|_| rng.float()).collect();
    let branch: Vec<f32> = (0..r.total() * hidden).map(|_| rng.float()).collect();
    let loss = |gate: &[f64], branch: &[f64]| -> f64 {
        let mut l = 0.0;
        for b in 0..batch {
            for t in 0..seq_len {
                let tok = b * seq_len + t;
                if let Some(row) = r.slot(b, t) {
                    for j in 0..hidden {
                        l += f64::from(w[tok * hidden + j]) * gate[tok] * branch[row * hidden + j];
                    }
                }
            }
        }
        l
    };
    let g64: Vec<f64> = gate.iter().map(|&v| f64::from(v)).collect();
    let f64s: Vec<f64> = branch.iter().map(|&v| f64::from(v)).collect();
    let grads = scatter_add_tokens_backward(&w, hidden, &r, &branch, &gate).unwrap();
    let h = 1e-4;
    for tok in 0..batch * seq_len {
        let (mut up, mut dn) = (g64.clone(), g64.clone());
        up[tok] += h;
        dn[tok] -= h;
        let fd = (loss(&up, &f64s) - loss(&dn, &f64s)) / (2.0 * h);
        let got = f64::from(grads.d_gate[tok]);
        // An f32 dot product of 70 terms of magnitude <= 4: within 1e-4.
        assert!(
            (fd - got).abs() <= 1e-4 * fd.abs().max(1.0),
            "d_gate[{tok}]: {got} vs {fd}"
        );
    }
    for i in (0..branch.len()).step_by(7) {
        let (mut up, mut dn) = (f64s.clone(), f64s.clone());
        up[i] += h;
        dn[i] -= h;
        let fd = (loss(&g64, &up) - loss(&g64, &dn)) / (2.0 * h);
        let got = f64::from(grads.d_branch[i]);
        assert!(
            (fd - got).abs() <= 1e-6 * fd.abs().max(1.0),
            "d_branch[{i}]: {got} vs {fd}"
        );
    }
}

/// The gate gradient's dot product sums chunks of 32: 2^24 then 31 ones stays 2^24, the next
/// chunk's two ones add 2.
#[test]
fn gate_gradient_uses_the_chunked_order() {
    assert_eq!(D_GATE_CHUNK, 32);
    let hidden = 34;
    let r = route_top_k(&[1.0], 1, ValidTokens::All, Capacity::Tokens(1)).unwrap();
    let mut d_out = vec![1.0f32; hidden];
    d_out[0] = 16_777_216.0;
    let branch = vec![1.0f32; hidden];
    let g = scatter_add_tokens_backward(&d_out, hidden, &r, &branch, &[1.0]).unwrap();
    assert_eq!(g.d_gate[0], 16_777_218.0);
    assert_eq!(d_out.iter().fold(0.0f32, |a, &t| a + t), 16_777_216.0);
}

/// The gather's backward accumulates into d_x, and with the scatter-add backward it is the adjoint.
#[test]
fn token_gather_backward_accumulates() {
    let (batch, seq_len, hidden) = (2, 8, 3);
    let mut rng = Lcg(19);
    let scores: Vec<f32> = (0..batch * seq_len).map(|_| rng.below(4) as f32).collect();
    let r = route_top_k(
        &scores,
        seq_len,
        ValidTokens::Lengths(&[8, 5]),
        Capacity::Tokens(3),
    )
    .unwrap();
    let x = rng.grids(batch * seq_len * hidden);
    let z = rng.grids(r.total() * hidden);
    let d_out = rng.grids(batch * seq_len * hidden);
    let mut d_x = d_out.clone();
    gather_tokens_backward(&z, hidden, &r, &mut d_x).unwrap();
    let mask = r.selected_mask();
    for (i, &v) in d_x.iter().enumerate() {
        let tok = i / hidden;
        let want = match r.slot(tok / seq_len, tok % seq_len) {
            Some(row) => d_out[i] + z[row * hidden + i % hidden],
            None => d_out[i],
        };
        assert_eq!(
            v.to_bits(),
            want.to_bits(),
            "element {i} (selected {})",
            mask[tok]
        );
    }
    // Adjoint: <gather(x), z> = <x, gather^T(z)>.
    let g = gather_tokens(&x, hidden, &r).unwrap();
    let mut gt = vec![0.0f32; x.len()];
    gather_tokens_backward(&z, hidden, &r, &mut gt).unwrap();
    assert_eq!(dot(&widen(&g), &widen(&z)), dot(&widen(&x), &widen(&gt)));
}

#[test]
fn token_ops_validation() {
    let scores = [1.0f32; 6];
    let r = route_top_k(&scores, 3, ValidTokens::All, Capacity::Tokens(2)).unwrap(); // 4 rows
    let x = vec![1.0f32; 6 * 2];
    let c = vec![1.0f32; 4 * 2];
    let gate = [1.0f32; 6];
    assert_eq!(invalid_name(gather_tokens(&x, 0, &r)), "hidden");
    assert_eq!(invalid_name(gather_tokens(&x[..10], 2, &r)), "x");
    assert_eq!(invalid_name(gather_tokens(&x, 3, &r)), "x");
    let mut res = x.clone();
    assert_eq!(
        invalid_name(scatter_add_tokens(&mut res[..10], 2, &r, &c, &gate)),
        "residual"
    );
    assert_eq!(
        invalid_name(scatter_add_tokens(&mut res, 2, &r, &c[..6], &gate)),
        "branch"
    );
    assert_eq!(
        invalid_name(scatter_add_tokens(&mut res, 2, &r, &c[..7], &gate)),
        "branch"
    );
    assert_eq!(
        invalid_name(scatter_add_tokens(&mut res, 2, &r, &c, &gate[..5])),
        "gate"
    );
    assert_eq!(res, x, "nothing written on error");
    assert_eq!(
        invalid_name(scatter_add_tokens_backward(&x[..2], 2, &r, &c, &gate)),
        "d_out"
    );
    assert_eq!(
        invalid_name(scatter_add_tokens_backward(&x, 2, &r, &c[..2], &gate)),
        "branch"
    );
    assert_eq!(
        invalid_name(scatter_add_tokens_backward(&x, 2, &r, &c, &[])),
        "gate"
    );
    let mut d_x = x.clone();
    assert_eq!(
        invalid_name(gather_tokens_backward(&c[..6], 2, &r, &mut d_x)),
        "d_compact"
    );
    assert_eq!(
        invalid_name(gather_tokens_backward(&c, 2, &r, &mut d_x[..4])),
        "d_x"
    );
    assert_eq!(
        invalid_name(gather_tokens_backward(&c, 0, &r, &mut d_x)),
        "hidden"
    );
    assert_eq!(d_x, x);
}
