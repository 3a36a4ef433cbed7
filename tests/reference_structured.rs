//! Tests of the CPU structured-dropout reference: channel, locked and embedding-row decisions
//! against dropout's `keep` at the documented indices, every element following its decision,
//! shared slices, extent-1 axes, p = 0 / 1, keep rates, shards, forward/backward consistency for
//! every element type, and validation.

mod common;

use common::{assert_binomial, bits, cases, invalid_name};
use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout::{self, drop_threshold, keep, keep_scale, mask_bit, mask_words};
use dropfuse::reference::structured::{
    apply_mask, backward, backward_from_mask, element_mask, forward, mask, Layout,
};
use dropfuse::{Element, Error, PhiloxState};
use proptest::prelude::*;

const TWO_POW_32: u64 = 1 << 32;

/// The multi-index of row-major element `e` of `shape`.
fn unravel(shape: &[usize], mut e: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        idx[k] = e % shape[k];
        e /= shape[k];
    }
    idx
}

/// The decision index of `idx` written from the contract: the row-major index of the position with
/// the shared axes removed.
fn decision_from_contract(shape: &[usize], shared: &[usize], idx: &[usize]) -> usize {
    let mut d = 0;
    for k in 0..shape.len() {
        if !shared.contains(&k) {
            d = d * shape[k] + idx[k];
        }
    }
    d
}

/// Distinct non-zero test values (`0.25 * (e + 1)`, exact in every element type for small `e`)
/// so kept and dropped elements are told apart.
fn ramp<T: Element>(n: usize) -> Vec<T> {
    (0..n).map(|e| T::from_f32(0.25 * (e % 512 + 1) as f32)).collect()
}

/// Checks `y` element by element: kept (decision bit of `decision_of(e)`) means
/// `T::from_f32(x * scale)`, dropped means `+0`.
fn check_follows<T: Element>(layout: &Layout, x: &[T], y: &[T], m: &[u32], scale: f32) {
    for e in 0..layout.numel() {
        let expect = if mask_bit(m, layout.decision_of(e)) {
            T::from_f32(x[e].to_f32() * scale).to_bits_u32()
        } else {
            0
        };
        assert_eq!(y[e].to_bits_u32(), expect, "element {e} of {:?}", layout.shape());
    }
}

// ---------------------------------------------------------------------------------------------
// Decision indices

#[test]
fn decision_index_matches_contract_for_every_layout() {
    let shapes: [&[usize]; 5] = [&[7], &[3, 5], &[2, 3, 4], &[2, 1, 3, 5], &[3, 2, 2, 2, 3]];
    for shape in shapes {
        let r = shape.len();
        // Every subset of axes.
        for bitset in 0..(1usize << r) {
            let shared: Vec<usize> = (0..r).filter(|k| bitset >> k & 1 == 1).collect();
            let layout = Layout::shared_axes(shape, &shared).unwrap();
            let expect_decisions: usize = (0..r).filter(|k| !shared.contains(k)).map(|k| shape[k]).product();
            assert_eq!(layout.decisions(), expect_decisions);
            assert_eq!(layout.numel(), shape.iter().product::<usize>());
            assert_eq!(layout.mask_words(), mask_words(expect_decisions));
            let mut seen = vec![false; expect_decisions];
            for e in 0..layout.numel() {
                let d = decision_from_contract(shape, &shared, &unravel(shape, e));
                assert_eq!(
                    layout.decision_of(e),
                    d,
                    "{shape:?} shared {shared:?} element {e}"
                );
                seen[d] = true;
            }
            assert!(seen.iter().all(|&s| s), "every decision is used");
        }
    }
}

#[test]
fn channel_decision_is_n_times_c_plus_c() {
    for shape in [
        vec![4usize, 3],
        vec![4, 3, 5],
        vec![2, 3, 4, 5],
        vec![2, 3, 2, 3, 4],
    ] {
        let layout = Layout::channel(&shape).unwrap();
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        assert_eq!(layout.decisions(), n * c);
        assert!((0..shape.len()).all(|k| layout.is_shared(k) == (k >= 2)));
        for e in 0..layout.numel() {
            let idx = unravel(&shape, e);
            assert_eq!(layout.decision_of(e), idx[0] * c + idx[1]);
            assert_eq!(layout.decision_of(e), e / s);
        }
    }
}

#[test]
fn locked_time_axis_of_rnn_activations() {
    // (T, B, H) locked along time: mask (1, B, H), decision b * H + h.
    let (t, b, h) = (5usize, 3usize, 4usize);
    let layout = Layout::locked(&[t, b, h], 0).unwrap();
    assert_eq!(layout.decisions(), b * h);
    for e in 0..layout.numel() {
        let idx = unravel(&[t, b, h], e);
        assert_eq!(layout.decision_of(e), idx[1] * h + idx[2]);
    }
    // Batch-first (B, T, H) locked along axis 1.
    let layout = Layout::locked(&[b, t, h], 1).unwrap();
    for e in 0..layout.numel() {
        let idx = unravel(&[b, t, h], e);
        assert_eq!(layout.decision_of(e), idx[0] * h + idx[2]);
    }
}

#[test]
fn embedding_rows_are_locked_axis_one() {
    let (v, e) = (9usize, 6usize);
    let emb = Layout::embedding_rows(&[v, e]).unwrap();
    assert_eq!(emb, Layout::locked(&[v, e], 1).unwrap());
    assert_eq!(emb, Layout::shared_axes(&[v, e], &[1]).unwrap());
    assert_eq!(emb.decisions(), v);
    for i in 0..v * e {
        assert_eq!(emb.decision_of(i), i / e);
    }
    // Rank-3 channel dropout is locked along the length axis.
    assert_eq!(
        Layout::channel(&[2, 3, 4]).unwrap(),
        Layout::locked(&[2, 3, 4], 2).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Decisions, masks and elements

#[test]
fn decisions_equal_dropout_keep_at_documented_indices() {
    let s = PhiloxState::new(0x1234_5678_9abc_def0, 0xfeed_0000_0001);
    for (layout, p, off) in [
        (Layout::channel(&[3, 7, 4, 4]).unwrap(), 0.3, 0u64),
        (Layout::channel(&[5, 13, 9]).unwrap(), 0.5, 1 << 40),
        (Layout::locked(&[6, 4, 10], 0).unwrap(), 0.4, 17),
        (Layout::locked(&[4, 6, 10], 1).unwrap(), 0.6, 3),
        (Layout::embedding_rows(&[70, 8]).unwrap(), 0.2, 1000),
    ] {
        let t = drop_threshold(p).unwrap();
        let m = mask(&layout, p, s, off).unwrap();
        assert_eq!(m, dropout::mask(p, s, off, layout.decisions()).unwrap());
        assert_eq!(m.len(), mask_words(layout.decisions()));
        for d in 0..layout.decisions() {
            assert_eq!(mask_bit(&m, d), keep(s, off + d as u64, t), "decision {d}");
        }
        let used = layout.decisions() - 32 * (m.len() - 1);
        if used < 32 {
            assert_eq!(m[m.len() - 1] >> used, 0, "unused high bits");
        }
    }
}

fn check_every_element_follows<T: Element>() {
    let s = PhiloxState::new(42, 7);
    for (layout, p) in [
        (Layout::channel(&[4, 9, 5]).unwrap(), 0.5),
        (Layout::channel(&[2, 6, 3, 5]).unwrap(), 0.3),
        (Layout::channel(&[2, 5, 2, 3, 2]).unwrap(), 0.7),
        (Layout::locked(&[5, 3, 8], 0).unwrap(), 0.5),
        (Layout::locked(&[2, 3, 4, 5], 2).unwrap(), 0.25),
        (Layout::embedding_rows(&[40, 6]).unwrap(), 0.5),
    ] {
        let x: Vec<T> = ramp(layout.numel());
        let (y, m) = forward(&x, &layout, p, s, 11).unwrap();
        let scale = keep_scale(p).unwrap();
        check_follows(&layout, &x, &y, &m, scale);
        // Both outcomes occur.
        let kept = (0..layout.decisions()).filter(|&d| mask_bit(&m, d)).count();
        assert!(kept > 0 && kept < layout.decisions(), "{:?}", layout.shape());
        // The expanded mask gives plain dropout's arithmetic.
        let em = element_mask(&layout, &m).unwrap();
        assert_eq!(bits(&y), bits(&dropout::apply_mask(&x, &em, scale).unwrap()));
        for e in 0..layout.numel() {
            assert_eq!(mask_bit(&em, e), mask_bit(&m, layout.decision_of(e)));
        }
    }
}

#[test]
fn every_element_follows_its_decision() {
    check_every_element_follows::<f32>();
    check_every_element_follows::<f16>();
    check_every_element_follows::<bf16>();
}

#[test]
fn channel_feature_maps_are_all_kept_or_all_zero() {
    let shape = [3usize, 8, 4, 5];
    let layout = Layout::channel(&shape).unwrap();
    let x: Vec<f32> = ramp(layout.numel());
    let (y, m) = forward(&x, &layout, 0.5, PhiloxState::new(5, 5), 0).unwrap();
    for (map, (xs, ys)) in x.chunks(20).zip(y.chunks(20)).enumerate() {
        if mask_bit(&m, map) {
            assert!(xs.iter().zip(ys).all(|(a, b)| *b == a * 2.0), "map {map}");
        } else {
            assert!(ys.iter().all(|b| b.to_bits() == 0), "map {map}");
        }
    }
}

#[test]
fn locked_slices_share_the_mask() {
    let shape = [4usize, 3, 5, 6];
    for axis in 0..shape.len() {
        let layout = Layout::locked(&shape, axis).unwrap();
        let m = mask(&layout, 0.5, PhiloxState::new(9, axis as u64), 0).unwrap();
        let em = element_mask(&layout, &m).unwrap();
        let x: Vec<f32> = ramp(layout.numel());
        let (y, _) = forward(&x, &layout, 0.5, PhiloxState::new(9, axis as u64), 0).unwrap();
        for e in 0..layout.numel() {
            // The same position in slice i_a = 0.
            let mut idx = unravel(&shape, e);
            idx[axis] = 0;
            let e0 = idx.iter().zip(&shape).fold(0, |acc, (&i, &d)| acc * d + i);
            assert_eq!(mask_bit(&em, e), mask_bit(&em, e0), "axis {axis} element {e}");
            assert_eq!(y[e] == 0.0, y[e0] == 0.0, "axis {axis} element {e}");
        }
    }
}

#[test]
fn embedding_rows_are_zeroed_or_scaled() {
    let (v, e) = (64usize, 5usize);
    let layout = Layout::embedding_rows(&[v, e]).unwrap();
    let w: Vec<bf16> = ramp(v * e);
    let p = 0.25; // scale 4/3
    let (y, m) = forward(&w, &layout, p, PhiloxState::new(1, 2), 0).unwrap();
    let scale = keep_scale(p).unwrap();
    assert_eq!(scale, (1.0f64 / 0.75) as f32);
    for row in 0..v {
        let ys = &y[row * e..(row + 1) * e];
        let ws = &w[row * e..(row + 1) * e];
        for j in 0..e {
            let expect = if mask_bit(&m, row) {
                bf16::from_f32(ws[j].to_f32() * scale).to_bits()
            } else {
                0
            };
            assert_eq!(ys[j].to_bits(), expect, "row {row} col {j}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Extent-1 axes and degenerate layouts

#[test]
fn sharing_extent_one_axes_is_plain_dropout() {
    let s = PhiloxState::new(77, 3);
    let cases: [(Vec<usize>, Vec<usize>); 5] = [
        (vec![6, 10, 1, 1], vec![2, 3]), // channel dropout of 1x1 maps
        (vec![5, 7, 1], vec![2]),
        (vec![1, 8, 9], vec![0]), // locked along a length-1 time axis
        (vec![8, 1, 9], vec![1]),
        (vec![40, 1], vec![1]), // embedding with E = 1
    ];
    for (shape, shared) in cases {
        let layout = Layout::shared_axes(&shape, &shared).unwrap();
        assert_eq!(layout.decisions(), layout.numel());
        let x: Vec<f16> = ramp(layout.numel());
        for off in [0u64, 123] {
            let (y, m) = forward(&x, &layout, 0.4, s, off).unwrap();
            let (yd, md) = dropout::forward(&x, 0.4, s, off).unwrap();
            assert_eq!(m, md, "{shape:?}");
            assert_eq!(bits(&y), bits(&yd), "{shape:?}");
        }
    }
    assert_eq!(
        Layout::channel(&[6, 10, 1, 1]).unwrap().decisions(),
        Layout::channel(&[6, 10]).unwrap().decisions()
    );
}

#[test]
fn size_one_batch_and_channel() {
    let s = PhiloxState::new(3, 3);
    // One sample, one channel: the whole tensor follows decision 0.
    let layout = Layout::channel(&[1, 1, 4, 4]).unwrap();
    assert_eq!(layout.decisions(), 1);
    let x: Vec<f32> = ramp(16);
    for off in 0..40u64 {
        let (y, m) = forward(&x, &layout, 0.5, s, off).unwrap();
        assert_eq!(m.len(), 1);
        let kept = keep(s, off, drop_threshold(0.5).unwrap());
        assert_eq!(m[0], kept as u32);
        check_follows(&layout, &x, &y, &m, 2.0);
    }
    // Rank 1, locked along its only axis: one decision.
    let layout = Layout::locked(&[33], 0).unwrap();
    assert_eq!(layout.decisions(), 1);
    assert!((0..33).all(|e| layout.decision_of(e) == 0));
    // Every axis shared.
    assert_eq!(Layout::shared_axes(&[2, 3], &[1, 0]).unwrap().decisions(), 1);
    // One-sized locked axis next to others.
    let layout = Layout::locked(&[3, 1, 4], 1).unwrap();
    assert_eq!(layout.decisions(), 12);
}

// ---------------------------------------------------------------------------------------------
// p = 0 and p = 1

fn check_p_extremes<T: Element>() {
    let s = PhiloxState::new(8, 1);
    let mut vals: Vec<f32> = (0..60).map(|i| (i as f32 - 30.0) * 0.37).collect();
    vals.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0]);
    for layout in [
        Layout::channel(&[2, 4, 8]).unwrap(),
        Layout::locked(&[4, 2, 8], 0).unwrap(),
        Layout::embedding_rows(&[16, 4]).unwrap(),
    ] {
        let x: Vec<T> = vals.iter().map(|&v| T::from_f32(v)).collect();
        let (y, m) = forward(&x, &layout, 0.0, s, 0).unwrap();
        assert_eq!(bits(&y), bits(&x), "p = 0 is the identity");
        assert!((0..layout.decisions()).all(|d| mask_bit(&m, d)));
        assert_eq!(bits(&backward(&x, &layout, 0.0, s, 0).unwrap()), bits(&x));
        let (y, m) = forward(&x, &layout, 1.0, s, 0).unwrap();
        assert!(y.iter().all(|v| v.to_bits_u32() == 0), "p = 1 gives +0");
        assert!(m.iter().all(|&w| w == 0));
        let dx = backward_from_mask(&x, &layout, &m, 1.0).unwrap();
        assert!(dx.iter().all(|v| v.to_bits_u32() == 0));
    }
}

#[test]
fn p_zero_is_identity_and_p_one_gives_zeros() {
    check_p_extremes::<f32>();
    check_p_extremes::<f16>();
    check_p_extremes::<bf16>();
}

#[test]
fn dropped_non_finite_maps_become_positive_zero() {
    let layout = Layout::channel(&[8, 8, 3]).unwrap();
    let x: Vec<f32> = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN]
        .into_iter()
        .cycle()
        .take(layout.numel())
        .collect();
    let (y, m) = forward(&x, &layout, 0.5, PhiloxState::new(4, 4), 0).unwrap();
    let dropped = (0..64).filter(|&d| !mask_bit(&m, d)).count();
    assert!(dropped > 0 && dropped < 64);
    for e in 0..x.len() {
        if mask_bit(&m, layout.decision_of(e)) {
            assert_eq!(y[e].is_nan(), x[e].is_nan());
        } else {
            assert_eq!(y[e].to_bits(), 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keep rates

#[test]
fn keep_rates_within_six_sigma() {
    let s = PhiloxState::new(0x5eed_5eed, 12);
    for (layout, p) in [
        (Layout::channel(&[64, 256, 1]).unwrap(), 0.1),
        (Layout::locked(&[2, 128, 128], 0).unwrap(), 0.5),
        (Layout::embedding_rows(&[1 << 15, 1]).unwrap(), 0.9),
    ] {
        let m = mask(&layout, p, s, 0).unwrap();
        let n = layout.decisions() as u64;
        let kept: u64 = m.iter().map(|w| u64::from(w.count_ones())).sum();
        let q = 1.0 - drop_threshold(p).unwrap() as f64 / TWO_POW_32 as f64;
        assert_binomial(kept, n, q, &format!("{:?} at p = {p}", layout.shape()));
    }
    // Element-level: each kept decision keeps its whole group.
    let layout = Layout::channel(&[32, 64, 3, 3]).unwrap();
    let m = mask(&layout, 0.3, s, 0).unwrap();
    let em = element_mask(&layout, &m).unwrap();
    let kept_decisions: u32 = m.iter().map(|w| w.count_ones()).sum();
    let kept_elements: u32 = em.iter().map(|w| w.count_ones()).sum();
    assert_eq!(kept_elements, 9 * kept_decisions);
    assert_binomial(
        u64::from(kept_decisions),
        32 * 64,
        1.0 - drop_threshold(0.3).unwrap() as f64 / TWO_POW_32 as f64,
        "channel decisions at p = 0.3",
    );
}

// ---------------------------------------------------------------------------------------------
// Shards

#[test]
fn batch_and_vocab_shards_match_the_whole() {
    let s = PhiloxState::new(0xabcd, 99);
    // Channel dropout: samples n0..n0 + k with decision_offset n0 * C.
    let shape = [7usize, 5, 3, 2];
    let per_sample = 5 * 3 * 2;
    let whole = Layout::channel(&shape).unwrap();
    let x: Vec<f32> = ramp(whole.numel());
    let (y, m) = forward(&x, &whole, 0.5, s, 0).unwrap();
    for (n0, k) in [(0usize, 3usize), (3, 4), (6, 1), (2, 5)] {
        let part = Layout::channel(&[k, 5, 3, 2]).unwrap();
        let xs = &x[n0 * per_sample..(n0 + k) * per_sample];
        let (ys, ms) = forward(xs, &part, 0.5, s, (n0 * 5) as u64).unwrap();
        assert_eq!(bits(&ys), bits(&y[n0 * per_sample..(n0 + k) * per_sample]));
        for d in 0..k * 5 {
            assert_eq!(mask_bit(&ms, d), mask_bit(&m, n0 * 5 + d));
        }
    }
    // Vocabulary-parallel embedding: rows v0..v0 + k with decision_offset v0.
    let (v, e) = (100usize, 4usize);
    let whole = Layout::embedding_rows(&[v, e]).unwrap();
    let w: Vec<f16> = ramp(v * e);
    let (y, _) = forward(&w, &whole, 0.3, s, 0).unwrap();
    for (v0, k) in [(0usize, 50usize), (50, 50), (37, 11)] {
        let part = Layout::embedding_rows(&[k, e]).unwrap();
        let (ys, _) = forward(&w[v0 * e..(v0 + k) * e], &part, 0.3, s, v0 as u64).unwrap();
        assert_eq!(bits(&ys), bits(&y[v0 * e..(v0 + k) * e]));
    }
}

// ---------------------------------------------------------------------------------------------
// Forward / backward consistency

/// A random layout: rank 1..=4, extents 1..=5, a random subset of shared axes.
fn layouts() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    prop::collection::vec(1usize..=5, 1..=4).prop_flat_map(|shape| {
        let r = shape.len();
        (Just(shape), prop::collection::vec(any::<bool>(), r)).prop_map(|(shape, flags)| {
            let shared = (0..flags.len()).filter(|&k| flags[k]).collect();
            (shape, shared)
        })
    })
}

fn check_consistency<T: Element>(
    shape: &[usize],
    shared: &[usize],
    raw: &[(u32, u32)],
    p: f64,
    s: PhiloxState,
    off: u64,
    from_bits: fn(u32) -> T,
) {
    let layout = Layout::shared_axes(shape, shared).unwrap();
    let n = layout.numel();
    let x: Vec<T> = (0..n).map(|e| from_bits(raw[e % raw.len()].0)).collect();
    let dy: Vec<T> = (0..n).map(|e| from_bits(raw[e % raw.len()].1)).collect();
    let (y, m) = forward(&x, &layout, p, s, off).unwrap();
    assert_eq!(m, mask(&layout, p, s, off).unwrap());
    let t = drop_threshold(p).unwrap();
    for d in 0..layout.decisions() {
        assert_eq!(mask_bit(&m, d), keep(s, off + d as u64, t));
    }
    let scale = keep_scale(p).unwrap();
    check_follows(&layout, &x, &y, &m, scale);
    assert_eq!(bits(&y), bits(&apply_mask(&x, &layout, &m, scale).unwrap()));
    let dx_mask = backward_from_mask(&dy, &layout, &m, p).unwrap();
    let dx_philox = backward(&dy, &layout, p, s, off).unwrap();
    assert_eq!(bits(&dx_mask), bits(&dx_philox));
    check_follows(&layout, &dy, &dx_mask, &m, scale);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    #[test]
    fn forward_backward_consistent_f32(
        (shape, shared) in layouts(),
        raw in prop::collection::vec((any::<u32>(), any::<u32>()), 1..64),
        p in 0.0f64..=1.0, seed in any::<u64>(), offset in any::<u64>(), off in 0u64..1 << 40,
    ) {
        check_consistency(&shape, &shared, &raw, p, PhiloxState::new(seed, offset), off, f32::from_bits);
    }

    #[test]
    fn forward_backward_consistent_f16(
        (shape, shared) in layouts(),
        raw in prop::collection::vec((any::<u32>(), any::<u32>()), 1..64),
        p in 0.0f64..=1.0, seed in any::<u64>(), offset in any::<u64>(), off in 0u64..1 << 40,
    ) {
        check_consistency(&shape, &shared, &raw, p, PhiloxState::new(seed, offset), off,
            |b| f16::from_bits(b as u16));
    }

    #[test]
    fn forward_backward_consistent_bf16(
        (shape, shared) in layouts(),
        raw in prop::collection::vec((any::<u32>(), any::<u32>()), 1..64),
        p in 0.0f64..=1.0, seed in any::<u64>(), offset in any::<u64>(), off in 0u64..1 << 40,
    ) {
        check_consistency(&shape, &shared, &raw, p, PhiloxState::new(seed, offset), off,
            |b| bf16::from_bits(b as u16));
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn invalid_shapes_and_axes_are_named() {
    assert_eq!(invalid_name(Layout::channel(&[])), "shape");
    assert_eq!(invalid_name(Layout::channel(&[8])), "shape");
    assert_eq!(invalid_name(Layout::channel(&[2, 0, 3])), "shape");
    assert_eq!(invalid_name(Layout::channel(&[usize::MAX, 2, 2])), "shape");
    assert_eq!(invalid_name(Layout::locked(&[], 0)), "shape");
    assert_eq!(invalid_name(Layout::locked(&[3, 0], 0)), "shape");
    assert_eq!(invalid_name(Layout::locked(&[3, 4], 2)), "axis");
    assert_eq!(invalid_name(Layout::locked(&[3], 1)), "axis");
    assert_eq!(invalid_name(Layout::embedding_rows(&[3])), "shape");
    assert_eq!(invalid_name(Layout::embedding_rows(&[3, 4, 5])), "shape");
    assert_eq!(invalid_name(Layout::embedding_rows(&[0, 4])), "shape");
    assert_eq!(invalid_name(Layout::shared_axes(&[3, 4], &[2])), "axes");
    assert_eq!(invalid_name(Layout::shared_axes(&[3, 4], &[1, 1])), "axes");
    assert_eq!(invalid_name(Layout::shared_axes(&[], &[])), "shape");
    match Layout::locked(&[3, 4], 5) {
        Err(Error::InvalidArgument { expected, got, .. }) => {
            assert_eq!(expected, "an axis < rank 2 of [3, 4]");
            assert_eq!(got, "5");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn invalid_lengths_p_and_offsets_are_named() {
    let s = PhiloxState::new(1, 2);
    let layout = Layout::channel(&[2, 20, 3]).unwrap(); // 40 decisions: 2 mask words, 120 elements
    let x = vec![1.0f32; 120];
    let m = vec![u32::MAX; 2];
    for len in [0usize, 40, 119, 121] {
        let v = vec![1.0f32; len];
        assert_eq!(invalid_name(forward(&v, &layout, 0.5, s, 0)), "x", "len {len}");
        assert_eq!(invalid_name(apply_mask(&v, &layout, &m, 2.0)), "x");
        assert_eq!(invalid_name(backward(&v, &layout, 0.5, s, 0)), "dy");
        assert_eq!(invalid_name(backward_from_mask(&v, &layout, &m, 0.5)), "dy");
    }
    for words in [0usize, 1, 3, 4] {
        let bad = vec![u32::MAX; words];
        assert_eq!(invalid_name(apply_mask(&x, &layout, &bad, 2.0)), "mask");
        assert_eq!(invalid_name(backward_from_mask(&x, &layout, &bad, 0.5)), "mask");
        assert_eq!(invalid_name(element_mask(&layout, &bad)), "mask");
    }
    for p in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
        assert_eq!(invalid_name(mask(&layout, p, s, 0)), "p");
        assert_eq!(invalid_name(forward(&x, &layout, p, s, 0)), "p");
        assert_eq!(invalid_name(backward(&x, &layout, p, s, 0)), "p");
        assert_eq!(invalid_name(backward_from_mask(&x, &layout, &m, p)), "p");
    }
    // decision_offset + decisions must fit u64; the largest accepted offset is u64::MAX - 40.
    let off = u64::MAX - 39;
    assert_eq!(invalid_name(mask(&layout, 0.5, s, off)), "decision_offset");
    assert_eq!(invalid_name(forward(&x, &layout, 0.5, s, off)), "decision_offset");
    assert_eq!(
        invalid_name(backward(&x, &layout, 0.5, s, off)),
        "decision_offset"
    );
    let m = mask(&layout, 0.5, s, u64::MAX - 40).unwrap();
    for d in 0..40 {
        assert_eq!(mask_bit(&m, d), keep(s, u64::MAX - 40 + d as u64, 1 << 31));
    }
}
