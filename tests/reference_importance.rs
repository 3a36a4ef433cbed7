//! Tests of the CPU attention-importance reference: the per-token cosine similarity (PyTorch 2.x
//! semantics: identical, opposite, orthogonal and zero rows, scale invariance, the eps clamp on
//! tiny norms and where it differs from PyTorch 1.x), padding masks, batch sums, accumulation into
//! the layer plan's SimilarityAccumulator and the drop plan it feeds, the f32 tolerance (against a
//! CPU simulation of the kernel's exact f32 algorithm, over dtypes and row lengths), validation.

mod common;

use common::data::Lcg;
use common::{cases, invalid_name};
use dropfuse::half::{bf16, f16};
use dropfuse::layer_plan::{AttentionDropPlan, SimilarityAccumulator};
use dropfuse::reference::importance::{
    accumulate, batch_similarity, cosine, f32_sum_tolerance, f32_token_tolerance, token_similarities, EPS,
    TILE,
};
use dropfuse::Element;
use proptest::prelude::*;

/// This file's draws of the shared LCG.
impl Lcg {
    /// Roughly normal values (sum of uniforms), scaled.
    fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4).map(|_| (self.next() % 1_000_001) as f32 / 1e6).sum();
        (s - 2.0) * scale
    }
    fn row<T: Element>(&mut self, h: usize, scale: f32) -> Vec<T> {
        (0..h).map(|_| T::from_f32(self.normal(scale))).collect()
    }
}

/// The kernel's f32 sums, step by step (contract point 4), of `a`'s elements times `sa` and `b`'s
/// times `sb`: lane `l` owns chunks `l, l + 32, ...` of `V` consecutive elements and sums its
/// products sequentially, then a butterfly over 32 lanes (xor 16, 8, 4, 2, 1; every lane ends with
/// the same value). Returns `[a . b, |a|^2, |b|^2]`.
fn kernel_sums<T: Element>(a: &[T], b: &[T], sa: f32, sb: f32) -> [f32; 3] {
    let v = 16 / std::mem::size_of::<T>();
    let h = a.len();
    let mut lanes = [[0.0f32; 3]; 32];
    for (c, start) in (0..h).step_by(v).enumerate() {
        let lane = &mut lanes[c % 32];
        for i in start..(start + v).min(h) {
            let (x, y) = (a[i].to_f32() * sa, b[i].to_f32() * sb);
            lane[0] += x * y;
            lane[1] += x * x;
            lane[2] += y * y;
        }
    }
    let mut s = 16;
    while s > 0 {
        let prev = lanes;
        for l in 0..32 {
            for k in 0..3 {
                lanes[l][k] = prev[l][k] + prev[l ^ s][k];
            }
        }
        s /= 2;
    }
    assert!(lanes
        .iter()
        .all(|l| l.map(f32::to_bits) == lanes[0].map(f32::to_bits)));
    lanes[0]
}

/// The kernel's f32 algorithm (contract point 4): the sums, again with a row's elements times
/// 2^-90 when its sum of squares is above 2^120 (or NaN), then sqrt, max with `1e-8f32` (times the
/// row's scale), multiply, divide, all in f32.
fn kernel_cosine<T: Element>(a: &[T], b: &[T]) -> f32 {
    let (big, down) = (2f32.powi(120), 2f32.powi(-90));
    let [mut dot, mut aa, mut bb] = kernel_sums(a, b, 1.0, 1.0);
    let (mut ea, mut eb) = (1e-8f32, 1e-8f32);
    if !(aa <= big && bb <= big) {
        let sa = if aa <= big { 1.0 } else { down };
        let sb = if bb <= big { 1.0 } else { down };
        [dot, aa, bb] = kernel_sums(a, b, sa, sb);
        (ea, eb) = (1e-8 * sa, 1e-8 * sb);
    }
    dot / (aa.sqrt().max(ea) * bb.sqrt().max(eb))
}

#[test]
fn kernel_simulation_gives_every_lane_the_same_sum() {
    // The butterfly adds the same pair on lanes l and l ^ s (IEEE addition is commutative), so
    // every lane ends with the same bits (asserted inside kernel_cosine): any lane may finish.
    let mut g = Lcg(1);
    let a: Vec<f32> = g.row(1000, 1.0);
    let b: Vec<f32> = g.row(1000, 1.0);
    let c = kernel_cosine(&a, &b);
    assert!(c.is_finite() && c.abs() <= 1.0 + 1e-6);
}

// =================================================================================================
// Per-token similarity

#[test]
fn identical_opposite_orthogonal_zero() {
    let mut g = Lcg(2);
    for h in [1usize, 3, 8, 100, 4096] {
        let a: Vec<f32> = g.row(h, 3.0);
        let neg: Vec<f32> = a.iter().map(|&x| -x).collect();
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-14, "h {h}");
        assert!((cosine(&a, &neg) + 1.0).abs() < 1e-14, "h {h}");
        let zero = vec![0.0f32; h];
        assert_eq!(cosine(&a, &zero).to_bits(), 0.0f64.to_bits());
        assert_eq!(cosine(&zero, &zero).to_bits(), 0.0f64.to_bits());
    }
    let e1 = [1.0f32, 0.0, 0.0, 0.0];
    let e2 = [0.0f32, 2.0, 0.0, 0.0];
    assert_eq!(cosine(&e1, &e2), 0.0);
    // A known value: (1, 2, 3) . (4, 5, 6) / (|.| |.|) = 32 / sqrt(14 * 77).
    let want = 32.0 / (14.0f64 * 77.0).sqrt();
    assert!((cosine(&[1.0f32, 2.0, 3.0], &[4.0f32, 5.0, 6.0]) - want).abs() < 1e-15);
}

#[test]
fn scale_invariance_and_symmetry() {
    let mut g = Lcg(3);
    let a: Vec<f32> = g.row(257, 1.0);
    let b: Vec<f32> = g.row(257, 1.0);
    let c = cosine(&a, &b);
    assert_eq!(c.to_bits(), cosine(&b, &a).to_bits());
    // Powers of two scale exactly.
    let a4: Vec<f32> = a.iter().map(|&x| x * 4.0).collect();
    let b8: Vec<f32> = b.iter().map(|&x| x / 8.0).collect();
    assert!((cosine(&a4, &b8) - c).abs() < 1e-15);
}

#[test]
fn eps_clamps_each_norm_like_pytorch_2() {
    // ||a|| = 1e-9 < eps: PyTorch 2.x divides by max(||a||, eps) * max(||b||, eps) = eps * ||b||.
    let a = [1e-9f32, 0.0];
    let b = [3.0f32, 4.0];
    let a0 = f64::from(1e-9f32);
    let want_2x = a0 * 3.0 / (EPS * 5.0);
    assert!((cosine(&a, &b) - want_2x).abs() < 1e-12 * want_2x.abs());
    // PyTorch 1.x divides by sqrt(max(|a|^2 |b|^2, eps^2)): |a| |b| = 5e-9 < eps, so by eps,
    // giving 3e-9 / 1e-8 = 0.3, while 2.x gives 3e-9 / (1e-8 * 5) = 0.06: the definitions differ.
    let want_1x = a0 * 3.0 / (a0 * a0 * 25.0f64).max(EPS * EPS).sqrt();
    assert!((want_1x - want_2x).abs() > 0.1);
    // Above eps the clamp does nothing: the plain cosine.
    let a = [1e-7f32, 0.0];
    assert!((cosine(&a, &b) - 0.6).abs() < 1e-7);
}

#[test]
fn half_precision_rows_widen_exactly() {
    let mut g = Lcg(4);
    let a: Vec<bf16> = g.row(300, 2.0);
    let b: Vec<bf16> = g.row(300, 2.0);
    let af: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
    let bf: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    assert_eq!(cosine(&a, &b).to_bits(), cosine(&af, &bf).to_bits());
}

// =================================================================================================
// Tolerance of the f32 kernel

fn within_bound<T: Element>(h: usize, seed: u64, correlated: bool) -> f64 {
    let mut g = Lcg(seed);
    let a: Vec<T> = g.row(h, 1.5);
    let b: Vec<T> = if correlated {
        // b = a + small noise: cos near 1 (the interesting regime for importance)
        a.iter()
            .map(|x| T::from_f32(x.to_f32() + g.normal(0.05)))
            .collect()
    } else {
        g.row(h, 0.7)
    };
    let exact = cosine(&a, &b);
    let got = f64::from(kernel_cosine(&a, &b));
    let err = (got - exact).abs();
    let tol = f32_token_tolerance(h);
    assert!(err <= tol, "h {h}: |{got} - {exact}| = {err} > {tol}");
    err / tol
}

#[test]
fn kernel_algorithm_is_within_the_documented_bound() {
    let mut worst = 0.0f64;
    for h in [
        1usize, 2, 7, 8, 9, 31, 100, 255, 256, 257, 1000, 4096, 4100, 12_288, 65_537,
    ] {
        for seed in 0..4 {
            worst = worst.max(within_bound::<f32>(h, seed, seed % 2 == 0));
            worst = worst.max(within_bound::<f16>(h, seed + 10, seed % 2 == 0));
            worst = worst.max(within_bound::<bf16>(h, seed + 20, seed % 2 == 1));
        }
    }
    // The bound is a worst case; typical errors are far below it (and it is not vacuous: a
    // zero tolerance would fail, checked below).
    assert!(worst < 1.0);
    let mut g = Lcg(5);
    let a: Vec<f32> = g.row(4096, 1.0);
    let b: Vec<f32> = g.row(4096, 1.0);
    assert_ne!(
        f64::from(kernel_cosine(&a, &b)),
        cosine(&a, &b),
        "f32 rounding is visible"
    );
}

/// `|kernel - reference|` for rows `x`, `y` rounded to `T`.
fn kernel_error<T: Element>(x: &[f32], y: &[f32]) -> f64 {
    let x: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let y: Vec<T> = y.iter().map(|&v| T::from_f32(v)).collect();
    (f64::from(kernel_cosine(&x, &y)) - cosine(&x, &y)).abs()
}

#[test]
fn kernel_algorithm_is_within_the_bound_at_every_magnitude() {
    // Rows scaled by powers of two from f32's subnormals to 2^125 (bf16 and f32 hold them): the
    // f64 reference is scale invariant above eps; the kernel's f32 sums of squares overflow from about
    // 2^64 / sqrt(H) (plain f32 sums then give 0 or NaN) and underflow harmlessly (a norm that
    // small is clamped to eps). Both rows scaled alike, and each one alone.
    let scaled =
        |v: &[f32], e: i32| -> Vec<f32> { v.iter().map(|&x| (f64::from(x) * 2f64.powi(e)) as f32).collect() };
    let mut worst = 0.0f64;
    for h in [1usize, 4, 25, 256, 4096] {
        let tol = f32_token_tolerance(h);
        for (i, e) in [-130i32, -100, -60, 40, 58, 62, 64, 100, 125]
            .into_iter()
            .enumerate()
        {
            let mut g = Lcg(100 + i as u64);
            let a: Vec<f32> = g.row(h, 1.5);
            let b: Vec<f32> = a.iter().map(|&x| x + g.normal(0.3)).collect();
            let plain = cosine(&a, &b);
            for (x, y) in [
                (scaled(&a, e), scaled(&b, e)),
                (scaled(&a, e), b.clone()),
                (a.clone(), scaled(&b, e)),
            ] {
                if e > 0 {
                    // Norms above eps and no element lost: the reference is scale invariant.
                    let exact = cosine(&x, &y);
                    assert!((exact - plain).abs() <= 1e-14, "h {h} 2^{e}: {exact} vs {plain}");
                }
                for (ty, err) in [
                    ("f32", kernel_error::<f32>(&x, &y)),
                    ("bf16", kernel_error::<bf16>(&x, &y)),
                ] {
                    assert!(err <= tol, "{ty} h {h} 2^{e}: error {err} > {tol}");
                    worst = worst.max(err / tol);
                }
            }
        }
    }
    assert!(worst < 1.0);
}

#[test]
fn tolerance_formulas() {
    let u = 1.0 / 16_777_216.0;
    assert_eq!(f32_token_tolerance(4096), 288.0 * u);
    assert_eq!(f32_token_tolerance(16), 33.0 * u);
    assert_eq!(f32_sum_tolerance(1, 16), 33.0 * u + f64::EPSILON / 2.0);
    assert_eq!(f32_sum_tolerance(0, 4096), 0.0);
}

// =================================================================================================
// Batches, masks, accumulation

#[test]
fn mask_excludes_padding_tokens() {
    let mut g = Lcg(6);
    let (tokens, h) = (10, 24);
    let a: Vec<f16> = g.row(tokens * h, 1.0);
    let b: Vec<f16> = g.row(tokens * h, 1.0);
    let mask: Vec<bool> = (0..tokens).map(|t| t % 3 != 1).collect();
    let sims = token_similarities(&a, &b, h, Some(&mask)).unwrap();
    let (sum, count) = batch_similarity(&a, &b, h, Some(&mask)).unwrap();
    assert_eq!(count, mask.iter().filter(|&&m| m).count() as u64);
    // Equal to the batch of only the real rows.
    let keep = |v: &[f16]| -> Vec<f16> {
        (0..tokens)
            .filter(|&t| mask[t])
            .flat_map(|t| v[t * h..(t + 1) * h].to_vec())
            .collect()
    };
    let (sum2, count2) = batch_similarity(&keep(&a), &keep(&b), h, None).unwrap();
    assert_eq!((sum.to_bits(), count), (sum2.to_bits(), count2));
    for (t, s) in sims.iter().enumerate() {
        assert_eq!(s.is_some(), mask[t]);
    }
    // Padding rows may hold anything (NaN, inf): they are never read.
    let mut a2 = a.clone();
    for t in (0..tokens).filter(|&t| !mask[t]) {
        a2[t * h..(t + 1) * h].fill(f16::NAN);
    }
    assert_eq!(
        batch_similarity(&a2, &b, h, Some(&mask)).unwrap().0.to_bits(),
        sum.to_bits()
    );
    // All padding: nothing.
    let none = vec![false; tokens];
    assert_eq!(batch_similarity(&a, &b, h, Some(&none)).unwrap(), (0.0, 0));
}

#[test]
fn accumulation_feeds_the_attention_drop_plan() {
    // Three attention layers; layer 1's output equals its input (similarity 1: the most
    // redundant), layer 2 is nearly the identity, layer 0 changes the stream a lot.
    let mut g = Lcg(7);
    let (tokens, h) = (12, 32);
    let mut acc = SimilarityAccumulator::new(3).unwrap();
    let mut all = vec![Vec::new(); 3];
    for batch in 0..3 {
        let x: Vec<bf16> = g.row(tokens * h, 1.0);
        let outs: [Vec<bf16>; 3] = [
            g.row(tokens * h, 1.0),
            x.clone(),
            x.iter()
                .map(|v| bf16::from_f32(v.to_f32() + g.normal(0.1)))
                .collect(),
        ];
        let mask: Vec<bool> = (0..tokens).map(|t| t < tokens - batch).collect();
        for (layer, out) in outs.iter().enumerate() {
            let n = accumulate(&mut acc, layer, &x, out, h, Some(&mask)).unwrap();
            assert_eq!(n, (tokens - batch) as u64);
            all[layer].extend(
                token_similarities(&x, out, h, Some(&mask))
                    .unwrap()
                    .into_iter()
                    .flatten(),
            );
        }
    }
    let means = acc.means().unwrap();
    for layer in 0..3 {
        let want = all[layer].iter().sum::<f64>() / all[layer].len() as f64;
        assert!((means[layer] - want).abs() < 1e-14, "layer {layer}");
        assert_eq!(acc.tokens()[layer], all[layer].len() as u64);
    }
    assert!((means[1] - 1.0).abs() < 1e-12);
    let plan = AttentionDropPlan::from_accumulator(&acc, 2).unwrap();
    assert_eq!(plan.dropped(), &[1, 2]);
    assert_eq!(plan.kept(), &[0]);
    assert!(plan.importance()[1].abs() < 1e-12);

    // A batch of padding only adds nothing (the accumulator would reject 0 tokens).
    let before = acc.clone();
    let x: Vec<bf16> = g.row(tokens * h, 1.0);
    let n = accumulate(&mut acc, 0, &x, &x, h, Some(&vec![false; tokens])).unwrap();
    assert_eq!(n, 0);
    assert_eq!(acc, before);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(32)))]

    /// The batch sum is the sum of the token similarities, and every similarity is in [-1, 1]
    /// up to rounding.
    #[test]
    fn batch_sum_is_the_sum_of_tokens(tokens in 1usize..40, h in 1usize..70, seed: u64, pad in 0u64..100) {
        let mut g = Lcg(seed);
        let a: Vec<f32> = g.row(tokens * h, 1.0);
        let b: Vec<f32> = g.row(tokens * h, 1.0);
        let mask: Vec<bool> = (0..tokens).map(|_| g.next() % 100 >= pad).collect();
        let sims = token_similarities(&a, &b, h, Some(&mask)).unwrap();
        let (sum, count) = batch_similarity(&a, &b, h, Some(&mask)).unwrap();
        let mut s = 0.0;
        for v in sims.iter().flatten() {
            prop_assert!(v.abs() <= 1.0 + 1e-12);
            s += v;
        }
        prop_assert_eq!(s.to_bits(), sum.to_bits());
        prop_assert_eq!(count as usize, sims.iter().flatten().count());
        // The GPU's sum order (tiles of TILE, then a tree) stays within the sum tolerance's
        // f64 part of this one.
        let mut tiles = Vec::new();
        for chunk in sims.chunks(TILE) {
            tiles.push(chunk.iter().flatten().sum::<f64>());
        }
        let tree: f64 = tiles.iter().sum();
        prop_assert!((tree - sum).abs() <= f32_sum_tolerance(count, h));
    }
}

// =================================================================================================
// Validation

#[test]
fn invalid_arguments_are_named() {
    let a = vec![1.0f32; 12];
    assert_eq!(invalid_name(batch_similarity(&a, &a, 0, None)), "hidden");
    assert_eq!(invalid_name(batch_similarity(&a, &a, 5, None)), "input");
    assert_eq!(invalid_name(batch_similarity::<f32>(&[], &[], 4, None)), "input");
    assert_eq!(invalid_name(batch_similarity(&a, &a[..8], 4, None)), "output");
    assert_eq!(
        invalid_name(batch_similarity(&a, &a, 4, Some(&[true; 2]))),
        "mask"
    );
    assert_eq!(
        invalid_name(token_similarities(&a, &a, 4, Some(&[true; 4]))),
        "mask"
    );
    let mut acc = SimilarityAccumulator::new(2).unwrap();
    assert_eq!(invalid_name(accumulate(&mut acc, 2, &a, &a, 4, None)), "layer");
    assert_eq!(invalid_name(accumulate(&mut acc, 0, &a, &a, 5, None)), "input");
    let mut bad = a.clone();
    bad[0] = f32::NAN;
    assert_eq!(
        invalid_name(accumulate(&mut acc, 0, &bad, &a, 4, None)),
        "similarity_sum"
    );
    assert_eq!(
        acc,
        SimilarityAccumulator::new(2).unwrap(),
        "nothing added on error"
    );
}
