//! Tests of the CPU reference of the fused bias + dropout + residual add: the mask is dropout's,
//! p = 0 is `r + (x + b)` exactly, p = 1 is the residual, kept and dropped elements follow the
//! formula with its roundings, no bias equals a bias of -0, shards equal the whole, the backward's
//! dx is dropout's, dbias is the fixed-order chunked sum (checked against its partials, an f64 sum
//! and exact sums), and validation.

mod common;

use common::data::Lcg;
use common::{bits, cases, invalid_name};
use dropfuse::half::{bf16, f16};
use dropfuse::reference::bias_dropout_residual::{
    apply_mask, backward, backward_from_mask, dbias_partials, forward, forward_in_place, D_BIAS_CHUNK,
};
use dropfuse::reference::dropout::{self, keep_scale, mask_bit};
use dropfuse::reference::skip::chunked_sum;
use dropfuse::{Element, PhiloxState};
use proptest::prelude::*;

/// This file's draws of the shared LCG.
impl Lcg {
    /// Values with random mantissas over a few binades, both signs.
    fn value<T: Element>(&mut self) -> T {
        let m = 1.0 + self.below(1 << 23) as f32 / (1u32 << 23) as f32;
        let e = (self.below(9) as i32 - 4) as f32;
        let v = m * e.exp2();
        T::from_f32(if self.below(2) == 0 { v } else { -v })
    }
    fn values<T: Element>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| self.value()).collect()
    }
    /// `k / 64` for `k` in `[-255, 255]`: exact in every element type.
    fn grid<T: Element>(&mut self, n: usize) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f32((self.below(511) as i32 - 255) as f32 / 64.0))
            .collect()
    }
}

fn state() -> PhiloxState {
    PhiloxState::new(0x1234_5678_9abc_def0, 77)
}

// =================================================================================================
// Forward

fn mask_is_dropouts<T: Element>() {
    let mut g = Lcg(1);
    for &(rows, h, p, eo) in &[
        (3usize, 7usize, 0.3, 0u64),
        (5, 32, 0.5, 5),
        (1, 100, 0.9, 1 << 40),
        (17, 13, 0.1, u64::MAX - 17 * 13),
    ] {
        let n = rows * h;
        let x = g.values::<T>(n);
        let r = g.values::<T>(n);
        let b = g.values::<T>(h);
        let (_, m) = forward(&x, &r, Some(&b), h, p, state(), eo).unwrap();
        assert_eq!(m, dropout::mask(p, state(), eo, n).unwrap(), "rows {rows} h {h}");
        let (_, m2) = forward(&x, &r, None, h, p, state(), eo).unwrap();
        assert_eq!(m, m2);
    }
}

#[test]
fn mask_is_dropouts_mask() {
    mask_is_dropouts::<f32>();
    mask_is_dropouts::<f16>();
    mask_is_dropouts::<bf16>();
}

fn p0_is_exact_sum<T: Element>() {
    let mut g = Lcg(2);
    let (rows, h) = (9, 37);
    let x = g.values::<T>(rows * h);
    let r = g.values::<T>(rows * h);
    let b = g.values::<T>(h);
    let (y, m) = forward(&x, &r, Some(&b), h, 0.0, state(), 3).unwrap();
    assert!(m[..m.len() - 1].iter().all(|&w| w == u32::MAX));
    for i in 0..rows * h {
        let want = T::from_f32(r[i].to_f32() + (x[i].to_f32() + b[i % h].to_f32()));
        assert_eq!(y[i].to_bits_u32(), want.to_bits_u32(), "element {i}");
    }
    let (y, _) = forward(&x, &r, None, h, 0.0, state(), 3).unwrap();
    for i in 0..rows * h {
        let want = T::from_f32(r[i].to_f32() + x[i].to_f32());
        assert_eq!(y[i].to_bits_u32(), want.to_bits_u32(), "element {i}, no bias");
    }
}

#[test]
fn p0_equals_residual_plus_x_plus_bias_exactly() {
    p0_is_exact_sum::<f32>();
    p0_is_exact_sum::<f16>();
    p0_is_exact_sum::<bf16>();
}

fn p1_is_residual<T: Element>() {
    let mut g = Lcg(3);
    let (rows, h) = (4, 33);
    let n = rows * h;
    let mut x = g.values::<T>(n);
    x[0] = T::from_f32(f32::NAN);
    x[1] = T::from_f32(f32::INFINITY);
    let mut r = g.values::<T>(n);
    r[5] = T::from_f32(0.0);
    let b = g.values::<T>(h);
    let (y, m) = forward(&x, &r, Some(&b), h, 1.0, state(), 0).unwrap();
    assert!(m.iter().all(|&w| w == 0));
    assert_eq!(bits(&y), bits(&r), "p = 1 must return the residual bit for bit");
    // -0 residuals become +0 (the same add as kept elements: -0 + +0 = +0).
    let mut r2 = r.clone();
    r2[7] = T::from_f32(-0.0);
    let (y2, _) = forward(&x, &r2, None, h, 1.0, state(), 0).unwrap();
    assert_eq!(y2[7].to_bits_u32(), T::from_f32(0.0).to_bits_u32());
    for i in (0..n).filter(|&i| i != 7) {
        assert_eq!(y2[i].to_bits_u32(), r2[i].to_bits_u32());
    }
}

#[test]
fn p1_equals_residual() {
    p1_is_residual::<f32>();
    p1_is_residual::<f16>();
    p1_is_residual::<bf16>();
}

/// Every element against the formula of contract point 3, written independently with the mask
/// from dropout's keep test.
fn formula<T: Element>(rows: usize, h: usize, p: f64, eo: u64, seed: u64, with_bias: bool) {
    let mut g = Lcg(seed);
    let n = rows * h;
    let x = g.values::<T>(n);
    let r = g.values::<T>(n);
    let b = g.values::<T>(h);
    let bias = with_bias.then_some(&b[..]);
    let (y, m) = forward(&x, &r, bias, h, p, state(), eo).unwrap();
    let scale = keep_scale(p).unwrap();
    let threshold = dropout::drop_threshold(p).unwrap();
    for i in 0..n {
        let keep = dropout::keep(state(), eo + i as u64, threshold);
        assert_eq!(mask_bit(&m, i), keep);
        let t = if with_bias {
            x[i].to_f32() + b[i % h].to_f32()
        } else {
            x[i].to_f32()
        };
        let o = if keep {
            r[i].to_f32() + scale * t
        } else {
            r[i].to_f32() + 0.0
        };
        assert_eq!(y[i].to_bits_u32(), T::from_f32(o).to_bits_u32(), "element {i}");
    }
}

#[test]
fn forward_follows_the_formula() {
    for (k, &(rows, h, p)) in [
        (1usize, 1usize, 0.5),
        (7, 9, 0.25),
        (3, 64, 0.9),
        (20, 5, 0.99999),
    ]
    .iter()
    .enumerate()
    {
        for with_bias in [false, true] {
            formula::<f32>(rows, h, p, k as u64 * 11, k as u64, with_bias);
            formula::<f16>(rows, h, p, k as u64 * 11, k as u64, with_bias);
            formula::<bf16>(rows, h, p, k as u64 * 11, k as u64, with_bias);
        }
    }
}

#[test]
fn fused_rounding_differs_from_unfused_bf16_somewhere() {
    // The fused op rounds once; bf16 code rounding x + b first differs on some inputs: the
    // contract's single rounding is observable (otherwise this test of the formula is vacuous).
    let mut g = Lcg(9);
    let (rows, h) = (64, 64);
    let x = g.values::<bf16>(rows * h);
    let r = g.values::<bf16>(rows * h);
    let b = g.values::<bf16>(h);
    let (y, _) = forward(&x, &r, Some(&b), h, 0.0, state(), 0).unwrap();
    let differ = (0..rows * h)
        .filter(|&i| {
            let t = bf16::from_f32(x[i].to_f32() + b[i % h].to_f32());
            let unfused = bf16::from_f32(r[i].to_f32() + t.to_f32());
            unfused.to_bits() != y[i].to_bits()
        })
        .count();
    assert!(differ > 0);
}

#[test]
fn dropped_elements_ignore_non_finite_x() {
    let h = 64;
    let x = vec![f32::NAN; h * 4];
    let b = vec![f32::INFINITY; h];
    let r: Vec<f32> = (0..h * 4).map(|i| i as f32 + 0.5).collect();
    let (y, m) = forward(&x, &r, Some(&b), h, 0.5, state(), 0).unwrap();
    let mut dropped = 0;
    for i in 0..h * 4 {
        if mask_bit(&m, i) {
            assert!(y[i].is_nan());
        } else {
            dropped += 1;
            assert_eq!(y[i].to_bits(), r[i].to_bits());
        }
    }
    assert!(dropped > 0 && dropped < h * 4);
}

#[test]
fn no_bias_equals_negative_zero_bias() {
    let mut g = Lcg(4);
    let (rows, h) = (6, 19);
    let mut x = g.values::<f16>(rows * h);
    x[3] = f16::from_f32(-0.0);
    x[4] = f16::from_f32(0.0);
    let r = g.values::<f16>(rows * h);
    let neg_zero = vec![f16::from_f32(-0.0); h];
    let (a, _) = forward(&x, &r, None, h, 0.3, state(), 0).unwrap();
    let (b, _) = forward(&x, &r, Some(&neg_zero), h, 0.3, state(), 0).unwrap();
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn in_place_and_apply_mask_equal_forward() {
    let mut g = Lcg(5);
    let (rows, h) = (8, 24);
    let x = g.values::<bf16>(rows * h);
    let r = g.values::<bf16>(rows * h);
    let b = g.values::<bf16>(h);
    let (y, m) = forward(&x, &r, Some(&b), h, 0.4, state(), 9).unwrap();
    let mut z = r.clone();
    let m2 = forward_in_place(&x, &mut z, Some(&b), h, 0.4, state(), 9).unwrap();
    assert_eq!(m, m2);
    assert_eq!(bits(&y), bits(&z));
    let y3 = apply_mask(&x, &r, Some(&b), h, &m, keep_scale(0.4).unwrap()).unwrap();
    assert_eq!(bits(&y), bits(&y3));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(32)))]

    /// Rows `a .. a + k` processed alone with element_offset `eo + a * H` equal those rows of the
    /// whole tensor: y and every mask bit.
    #[test]
    fn shards_equal_the_whole(rows in 1usize..12, h in 1usize..40, a in 0usize..12, k in 1usize..12,
                              p in 0.0f64..=1.0, eo in 0u64..1000, seed: u64) {
        let a = a % rows;
        let k = k.min(rows - a);
        let mut g = Lcg(seed);
        let x = g.values::<f16>(rows * h);
        let r = g.values::<f16>(rows * h);
        let b = g.values::<f16>(h);
        let st = PhiloxState::new(seed, seed.rotate_left(17));
        let (y, m) = forward(&x, &r, Some(&b), h, p, st, eo).unwrap();
        let (lo, hi) = (a * h, (a + k) * h);
        let (ys, ms) = forward(&x[lo..hi], &r[lo..hi], Some(&b), h, p, st, eo + lo as u64).unwrap();
        prop_assert_eq!(bits(&ys), bits(&y[lo..hi]));
        for i in 0..hi - lo {
            prop_assert_eq!(mask_bit(&ms, i), mask_bit(&m, lo + i));
        }
    }
}

// =================================================================================================
// Backward

#[test]
fn dx_is_dropouts_backward() {
    let mut g = Lcg(6);
    for &(rows, h, p) in &[
        (3usize, 7usize, 0.3),
        (300, 5, 0.5),
        (2, 100, 0.99999),
        (4, 4, 1.0),
        (4, 4, 0.0),
    ] {
        let dy = g.values::<bf16>(rows * h);
        let m = dropout::mask(p, state(), 5, rows * h).unwrap();
        let got = backward_from_mask(&dy, h, &m, p, true).unwrap();
        let want = dropout::backward_from_mask(&dy, &m, p).unwrap();
        assert_eq!(bits(&got.dx), bits(&want));
        let no_bias = backward_from_mask(&dy, h, &m, p, false).unwrap();
        assert_eq!(bits(&no_bias.dx), bits(&want));
        assert!(no_bias.dbias.is_none());
    }
}

/// dbias against an independent computation: the terms column by column, summed in 256-row
/// chunks in ascending order, then the partials in order.
fn dbias_fixed_order<T: Element>(rows: usize, h: usize, p: f64) {
    let mut g = Lcg(rows as u64 * 31 + h as u64);
    let dy = g.values::<T>(rows * h);
    let m = dropout::mask(p, state(), 0, rows * h).unwrap();
    let scale = keep_scale(p).unwrap();
    let grads = backward_from_mask(&dy, h, &m, p, true).unwrap();
    let dbias = grads.dbias.unwrap();
    let partials = dbias_partials(&dy, h, &m, p).unwrap();
    let chunks = rows.div_ceil(D_BIAS_CHUNK);
    assert_eq!(partials.len(), chunks * h);
    for j in 0..h {
        let mut total = 0.0f32;
        for c in 0..chunks {
            let mut acc = 0.0f32;
            for r in c * D_BIAS_CHUNK..rows.min((c + 1) * D_BIAS_CHUNK) {
                let i = r * h + j;
                acc += if mask_bit(&m, i) {
                    scale * dy[i].to_f32()
                } else {
                    0.0
                };
            }
            assert_eq!(acc.to_bits(), partials[c * h + j].to_bits(), "partial ({c}, {j})");
            total += acc;
        }
        assert_eq!(
            dbias[j].to_bits_u32(),
            T::from_f32(total).to_bits_u32(),
            "column {j}"
        );
        // And close to the exact sum (first-order bound: rows * u * sum |terms|).
        let exact: f64 = (0..rows)
            .map(|r| {
                let i = r * h + j;
                if mask_bit(&m, i) {
                    f64::from(scale * dy[i].to_f32())
                } else {
                    0.0
                }
            })
            .sum();
        let abs: f64 = (0..rows)
            .map(|r| f64::from(dy[r * h + j].to_f32()).abs() * f64::from(scale))
            .sum();
        let bound =
            (rows as f64 + 2.0) * abs * f64::from(f32::EPSILON) + f64::from(dbias[j].to_f32()).abs() / 128.0;
        assert!(
            (f64::from(dbias[j].to_f32()) - exact).abs() <= bound + 1e-30,
            "column {j}"
        );
    }
}

#[test]
fn dbias_is_the_fixed_order_chunked_sum() {
    for &(rows, h, p) in &[
        (1usize, 3usize, 0.5),
        (256, 4, 0.3),
        (257, 9, 0.3),
        (700, 3, 0.1),
        (1030, 2, 0.0),
    ] {
        dbias_fixed_order::<f32>(rows, h, p);
        dbias_fixed_order::<f16>(rows, h, p);
        dbias_fixed_order::<bf16>(rows, h, p);
    }
}

#[test]
fn dbias_order_matters_and_chunked_sum_is_used() {
    // Terms chosen so that a sequential sum over all rows differs from the 256-chunked sum: the
    // contract's order is observable, and the reference follows it. Row 0 is 2^24, rows 1..255
    // are 0, rows 256..511 are 1: sequentially every 1 is lost (2^24 + 1 rounds to 2^24), chunked
    // the second partial is 256 and the total 2^24 + 256.
    let h = 1;
    let rows = 512;
    let mut dy = vec![0.0f32; rows];
    dy[0] = 16_777_216.0;
    dy[256..].fill(1.0);
    let m = vec![u32::MAX; rows / 32];
    let grads = backward_from_mask(&dy, h, &m, 0.0, true).unwrap();
    let chunked = chunked_sum(&dy, D_BIAS_CHUNK).unwrap();
    let sequential: f32 = dy.iter().fold(0.0, |a, &t| a + t);
    assert_eq!(sequential, 16_777_216.0);
    assert_eq!(chunked, 16_777_472.0);
    assert_ne!(chunked.to_bits(), sequential.to_bits());
    assert_eq!(grads.dbias.unwrap()[0].to_bits(), chunked.to_bits());
}

#[test]
fn dbias_at_p0_is_the_exact_column_sum_on_a_grid() {
    // Grid values k / 64 with small sums are exact in f32: dbias is the exact column sum.
    let mut g = Lcg(8);
    let (rows, h) = (600, 11);
    let dy = g.grid::<f32>(rows * h);
    let m = dropout::mask(0.0, state(), 0, rows * h).unwrap();
    let dbias = backward_from_mask(&dy, h, &m, 0.0, true).unwrap().dbias.unwrap();
    for j in 0..h {
        let exact: f64 = (0..rows).map(|r| f64::from(dy[r * h + j])).sum();
        assert_eq!(f64::from(dbias[j]), exact);
    }
    // p = 1: everything dropped, dx and dbias are +0.
    let m1 = dropout::mask(1.0, state(), 0, rows * h).unwrap();
    let g1 = backward_from_mask(&dy, h, &m1, 1.0, true).unwrap();
    assert!(g1.dx.iter().all(|v| v.to_bits() == 0));
    assert!(g1.dbias.unwrap().iter().all(|v| v.to_bits() == 0));
}

#[test]
fn maskless_backward_equals_backward_from_the_forwards_mask() {
    let mut g = Lcg(10);
    let (rows, h) = (33, 21);
    let x = g.values::<f16>(rows * h);
    let r = g.values::<f16>(rows * h);
    let b = g.values::<f16>(h);
    let dy = g.values::<f16>(rows * h);
    let (_, m) = forward(&x, &r, Some(&b), h, 0.2, state(), 1234).unwrap();
    let a = backward_from_mask(&dy, h, &m, 0.2, true).unwrap();
    let c = backward(&dy, h, 0.2, state(), 1234, true).unwrap();
    assert_eq!(bits(&a.dx), bits(&c.dx));
    assert_eq!(bits(&a.dbias.unwrap()), bits(&c.dbias.unwrap()));
}

#[test]
fn gradients_are_the_forwards_linear_map() {
    // y is affine in x and in b with slope keep * scale: with p = 0.5 (scale 2, exact) and grid
    // values, y(x + dy) - y(x) = keep * 2 * dy exactly, and dx is that map's transpose applied to dy.
    let mut g = Lcg(11);
    let (rows, h) = (10, 8);
    let x = g.grid::<f32>(rows * h);
    let r = g.grid::<f32>(rows * h);
    let d = g.grid::<f32>(rows * h);
    let x2: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
    let (y1, m) = forward(&x, &r, None, h, 0.5, state(), 0).unwrap();
    let (y2, _) = forward(&x2, &r, None, h, 0.5, state(), 0).unwrap();
    let grads = backward_from_mask(&d, h, &m, 0.5, true).unwrap();
    for i in 0..rows * h {
        assert_eq!(y2[i] - y1[i], grads.dx[i], "element {i}");
    }
}

// =================================================================================================
// Validation

#[test]
fn invalid_arguments_are_named() {
    let x = vec![1.0f32; 12];
    let b = vec![0.5f32; 4];
    let s = state();
    assert_eq!(invalid_name(forward(&x, &x, Some(&b), 0, 0.1, s, 0)), "row_len");
    assert_eq!(
        invalid_name(forward(&x, &x, Some(&b), (1 << 31) + 1, 0.1, s, 0)),
        "row_len"
    );
    assert_eq!(invalid_name(forward(&x, &x, Some(&b), 5, 0.1, s, 0)), "x");
    assert_eq!(invalid_name(forward::<f32>(&[], &[], None, 4, 0.1, s, 0)), "x");
    assert_eq!(
        invalid_name(forward(&x, &x[..8], Some(&b), 4, 0.1, s, 0)),
        "residual"
    );
    assert_eq!(invalid_name(forward(&x, &x, Some(&b[..3]), 4, 0.1, s, 0)), "bias");
    assert_eq!(invalid_name(forward(&x, &x, Some(&b), 4, 1.5, s, 0)), "p");
    assert_eq!(invalid_name(forward(&x, &x, Some(&b), 4, f64::NAN, s, 0)), "p");
    assert_eq!(
        invalid_name(forward(&x, &x, Some(&b), 4, 0.1, s, u64::MAX - 5)),
        "element_offset"
    );
    let m = vec![0u32; 1];
    assert_eq!(invalid_name(apply_mask(&x, &x, None, 4, &[0, 0], 1.0)), "mask");
    assert_eq!(invalid_name(backward_from_mask(&x, 5, &m, 0.1, true)), "dy");
    assert_eq!(
        invalid_name(backward_from_mask(&x, 4, &[0, 0], 0.1, true)),
        "mask"
    );
    assert_eq!(invalid_name(backward_from_mask(&x, 4, &m, -0.1, true)), "p");
    assert_eq!(
        invalid_name(backward(&x, 4, 0.1, s, u64::MAX, true)),
        "element_offset"
    );
    assert_eq!(invalid_name(dbias_partials(&x, 0, &m, 0.1)), "row_len");
    // Nothing written on error.
    let mut r = vec![3.0f32; 12];
    assert_eq!(
        invalid_name(forward_in_place(&x, &mut r, Some(&b[..1]), 4, 0.1, s, 0)),
        "bias"
    );
    assert!(r.iter().all(|&v| v == 3.0));
}
