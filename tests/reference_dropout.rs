//! Tests of the CPU dropout reference: exact thresholds and scales, validation, mask statistics,
//! the shard property, forward/backward consistency and rounding.

mod common;
use common::{assert_binomial, invalid_name};

use std::sync::OnceLock;

use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout::{
    apply_mask, backward, backward_from_mask, drop_threshold, forward, keep, keep_scale, mask, mask_bit,
    mask_words,
};
use dropfuse::reference::philox::element_word;
use dropfuse::reference::philox4x32_10;
use dropfuse::{Element, Error, PhiloxState};
use proptest::prelude::*;

const TWO_POW_32: u64 = 1 << 32;

// ---------------------------------------------------------------------------------------------
// Threshold and scale

#[test]
fn threshold_exact_values() {
    assert_eq!(drop_threshold(0.0).unwrap(), 0);
    assert_eq!(drop_threshold(-0.0).unwrap(), 0);
    assert_eq!(drop_threshold(1.0).unwrap(), TWO_POW_32);
    assert_eq!(drop_threshold(1e-9).unwrap(), 4);
    assert_eq!(drop_threshold(0.5).unwrap(), 1 << 31);
    assert_eq!(drop_threshold(0.999999).unwrap(), 4_294_963_001);
    // Ties: 1.5 steps rounds to 2 (truncation would give 1); 2.5 steps rounds away from zero to
    // 3 (round-half-to-even would give 2).
    assert_eq!(drop_threshold(1.5 / TWO_POW_32 as f64).unwrap(), 2);
    assert_eq!(drop_threshold(2.5 / TWO_POW_32 as f64).unwrap(), 3);
}

#[test]
fn scale_exact_values() {
    assert_eq!(keep_scale(0.0).unwrap().to_bits(), 1.0f32.to_bits());
    assert_eq!(keep_scale(0.5).unwrap().to_bits(), 2.0f32.to_bits());
    assert_eq!(keep_scale(0.75).unwrap().to_bits(), 4.0f32.to_bits());
    assert_eq!(keep_scale(0.2).unwrap().to_bits(), 1.25f32.to_bits());
    assert_eq!(keep_scale(0.1).unwrap().to_bits(), 0x3f8e_38e4);
    assert_eq!(keep_scale(0.999999).unwrap().to_bits(), 0x4974_2400); // 1e6
                                                                      // Computed in f64 and rounded once: an all-f32 computation would give 0x411ffffe and
                                                                      // 0x3f969696 here.
    assert_eq!(keep_scale(0.9).unwrap().to_bits(), 0x4120_0000); // 10.0
    assert_eq!(keep_scale(0.15).unwrap().to_bits(), 0x3f96_9697);
    // p = 1 drops everything; the scale is +0, not infinity.
    assert_eq!(keep_scale(1.0).unwrap().to_bits(), 0);
}

#[test]
fn p_zero_keeps_all_and_p_one_drops_all() {
    let s = PhiloxState::new(7, 3);
    for e in (0..4096u64).chain(u64::MAX - 64..=u64::MAX) {
        assert!(keep(s, e, drop_threshold(0.0).unwrap()), "p=0 dropped {e}");
        assert!(!keep(s, e, drop_threshold(1.0).unwrap()), "p=1 kept {e}");
    }
    assert_eq!(mask(0.0, s, 0, 70).unwrap(), vec![u32::MAX, u32::MAX, 0x3f]);
    assert_eq!(mask(1.0, s, 0, 70).unwrap(), vec![0, 0, 0]);
}

/// A word equal to the threshold is kept (`>=`, not `>`): choose p so the threshold is exactly
/// an element's word (w / 2^32 is exact in f64).
#[test]
fn keep_boundary_is_inclusive() {
    let s = PhiloxState::new(0xabc, 0xdef);
    for e in [0u64, 1, 2, 3, 1000, 1 << 40] {
        let w = u64::from(element_word(s, e));
        let p = w as f64 / TWO_POW_32 as f64;
        assert_eq!(drop_threshold(p).unwrap(), w);
        assert!(keep(s, e, w), "element {e}: word == threshold must be kept");
        assert!(
            !keep(s, e, w + 1),
            "element {e}: word < threshold must be dropped"
        );
        assert!(mask_bit(&mask(p, s, e, 1).unwrap(), 0));
    }
}

#[test]
fn invalid_p_is_rejected_everywhere() {
    let s = PhiloxState::new(1, 2);
    let x = [1.0f32; 5];
    let m = [0x1fu32];
    for p in [
        f64::NAN,
        -0.1,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.0 + f64::EPSILON,
    ] {
        assert_eq!(invalid_name(drop_threshold(p)), "p", "drop_threshold({p})");
        assert_eq!(invalid_name(keep_scale(p)), "p", "keep_scale({p})");
        assert_eq!(invalid_name(mask(p, s, 0, 5)), "p", "mask({p})");
        assert_eq!(invalid_name(forward(&x, p, s, 0)), "p", "forward({p})");
        assert_eq!(invalid_name(backward(&x, p, s, 0)), "p", "backward({p})");
        assert_eq!(
            invalid_name(backward_from_mask(&x, &m, p)),
            "p",
            "backward_from_mask({p})"
        );
    }
    // The error carries what was expected and what was given.
    match drop_threshold(1.5) {
        Err(Error::InvalidArgument {
            name: "p",
            expected,
            got,
        }) => {
            assert_eq!(expected, "a probability in [0, 1]");
            assert_eq!(got, "1.5");
        }
        other => panic!("unexpected {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Invalid data arguments

#[test]
fn empty_data_is_rejected() {
    let s = PhiloxState::new(1, 2);
    let empty: [f32; 0] = [];
    assert_eq!(invalid_name(forward(&empty, 0.5, s, 0)), "x");
    assert_eq!(invalid_name(apply_mask(&empty, &[], 2.0)), "x");
    assert_eq!(invalid_name(backward(&empty, 0.5, s, 0)), "dy");
    assert_eq!(invalid_name(backward_from_mask(&empty, &[], 0.5)), "dy");
    assert_eq!(invalid_name(mask(0.5, s, 0, 0)), "n");
    match forward(&empty, 0.5, s, 0) {
        Err(Error::InvalidArgument { expected, got, .. }) => {
            assert_eq!(expected, "a non-empty tensor");
            assert_eq!(got, "0 elements");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn wrong_mask_length_is_rejected() {
    let dy = [f16::ONE; 33]; // needs exactly 2 words
    for len in [0usize, 1, 3] {
        let m = vec![u32::MAX; len];
        assert_eq!(invalid_name(backward_from_mask(&dy, &m, 0.5)), "mask");
        assert_eq!(invalid_name(apply_mask(&dy, &m, 2.0)), "mask");
    }
    assert!(backward_from_mask(&dy, &[u32::MAX; 2], 0.5).is_ok());
    assert_eq!(mask_words(1), 1);
    assert_eq!(mask_words(32), 1);
    assert_eq!(mask_words(33), 2);
}

#[test]
fn element_offset_overflow_is_rejected() {
    let s = PhiloxState::new(1, 2);
    let x = [bf16::ONE; 10];
    let off = u64::MAX - 2;
    assert_eq!(invalid_name(mask(0.5, s, off, 10)), "element_offset");
    assert_eq!(invalid_name(forward(&x, 0.5, s, off)), "element_offset");
    assert_eq!(invalid_name(backward(&x, 0.5, s, off)), "element_offset");
    // The largest accepted offset: element_offset + n == u64::MAX.
    let m = mask(0.5, s, u64::MAX - 10, 10).unwrap();
    for i in 0..10 {
        assert_eq!(mask_bit(&m, i), keep(s, u64::MAX - 10 + i as u64, 1 << 31));
    }
    assert_eq!(invalid_name(mask(0.5, s, u64::MAX - 9, 10)), "element_offset");
}

// ---------------------------------------------------------------------------------------------
// Mask layout

#[test]
fn mask_layout_matches_keep() {
    let s = PhiloxState::new(0xdead_beef_0000_0001, 0x1_0000_0002);
    for (p, off, n) in [
        (0.5, 0u64, 1usize),
        (0.3, 5, 31),
        (0.7, 1 << 40, 32),
        (0.5, 3, 1000),
    ] {
        let t = drop_threshold(p).unwrap();
        let m = mask(p, s, off, n).unwrap();
        assert_eq!(m.len(), n.div_ceil(32));
        for i in 0..n {
            let expect = u64::from(element_word(s, off + i as u64)) >= t;
            assert_eq!(mask_bit(&m, i), expect, "p {p} off {off} bit {i}");
            assert_eq!((m[i / 32] >> (i % 32)) & 1 == 1, expect);
        }
        // Unused high bits of the last word are zero.
        let used = n - 32 * (m.len() - 1);
        if used < 32 {
            assert_eq!(m[m.len() - 1] >> used, 0, "p {p} n {n}: high bits set");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mask statistics

/// Draws per p for the keep-rate tests.
const STAT_N: usize = 1 << 24;
/// The state of the statistics stream.
const STAT_STATE: PhiloxState = PhiloxState::new(0x5eed_0000_1234_5678, 9);

/// The words of elements `0..STAT_N` of `STAT_STATE`, one Philox call per 4 elements (calling
/// `element_word` per element would be 4x slower in a debug build). Shared by the statistics tests.
fn stat_words() -> &'static [u32] {
    static WORDS: OnceLock<Vec<u32>> = OnceLock::new();
    WORDS.get_or_init(|| {
        let s = STAT_STATE;
        let key = [s.seed as u32, (s.seed >> 32) as u32];
        let mut words = Vec::with_capacity(STAT_N);
        for block in 0..(STAT_N / 4) as u64 {
            let counter = [
                block as u32,
                (block >> 32) as u32,
                s.offset as u32,
                (s.offset >> 32) as u32,
            ];
            words.extend_from_slice(&philox4x32_10(counter, key));
        }
        words
    })
}

#[test]
fn stat_words_are_element_words() {
    // Ties the block-wise fast path above to the reference mapping.
    let words = stat_words();
    for e in (0..4096).chain(STAT_N - 4096..STAT_N) {
        assert_eq!(words[e], element_word(STAT_STATE, e as u64), "element {e}");
    }
}

#[test]
fn keep_rate_within_six_sigma() {
    let words = stat_words();
    for p in [1e-3, 0.1, 0.5, 0.9] {
        let t = drop_threshold(p).unwrap();
        let kept = words.iter().filter(|&&w| u64::from(w) >= t).count() as u64;
        let q = 1.0 - t as f64 / TWO_POW_32 as f64;
        assert_binomial(kept, STAT_N as u64, q, &format!("keep rate at p = {p}"));
    }
}

/// Very large p (0.9 to 0.99999): thresholds round(p * 2^32) and scales f32(1 / (1 - p)) equal
/// values computed independently (exact rational arithmetic on the f64 p, in Python's fractions),
/// and the rare kept elements still arrive at rate 1 - t / 2^32 (2^24 draws: ~168 kept at
/// p = 0.99999, 6 sigma ~ 78).
#[test]
fn very_large_p_thresholds_scales_and_rates() {
    let cases: [(f64, u64, u32); 5] = [
        (0.9, 3_865_470_566, 0x4120_0000),     // scale 10
        (0.99, 4_252_017_623, 0x42c8_0000),    // 100
        (0.999, 4_290_672_329, 0x447a_0000),   // 1000
        (0.9999, 4_294_537_799, 0x461c_4000),  // 10000
        (0.99999, 4_294_924_346, 0x47c3_5000), // 100000
    ];
    let words = stat_words();
    for (p, t, scale_bits) in cases {
        assert_eq!(drop_threshold(p).unwrap(), t, "threshold at p = {p}");
        assert_eq!(keep_scale(p).unwrap().to_bits(), scale_bits, "scale at p = {p}");
        let kept = words.iter().filter(|&&w| u64::from(w) >= t).count() as u64;
        let q = 1.0 - t as f64 / TWO_POW_32 as f64;
        assert_binomial(kept, STAT_N as u64, q, &format!("keep rate at p = {p}"));
    }
}

#[test]
fn no_bias_by_bit_position() {
    let words = stat_words();
    let t = drop_threshold(0.5).unwrap();
    let mut kept = [0u64; 32];
    for (i, &w) in words.iter().enumerate() {
        if u64::from(w) >= t {
            kept[i % 32] += 1;
        }
    }
    for (j, &k) in kept.iter().enumerate() {
        assert_binomial(k, (STAT_N / 32) as u64, 0.5, &format!("bit position {j}"));
    }
}

/// Elements per mask in the correlation tests.
const CORR_N: usize = 1 << 20;

/// Keep probability of drop probability `p` (exact, from the threshold).
fn keep_prob(p: f64) -> f64 {
    1.0 - drop_threshold(p).unwrap() as f64 / TWO_POW_32 as f64
}

/// Number of positions where the two masks agree (both kept or both dropped).
fn agreeing_bits(a: &[u32], b: &[u32], n: usize) -> u64 {
    (0..n).filter(|&i| mask_bit(a, i) == mask_bit(b, i)).count() as u64
}

#[test]
fn different_seeds_and_offsets_are_uncorrelated() {
    let p = 0.3;
    let q = keep_prob(p);
    let agree = q * q + (1.0 - q) * (1.0 - q);
    let base_state = PhiloxState::new(11, 100);
    let base = mask(p, base_state, 0, CORR_N).unwrap();
    let others = [
        ("seed + 1", PhiloxState::new(12, 100), 0),
        (
            "seed with other high word",
            PhiloxState::new(11 | (1 << 32), 100),
            0,
        ),
        ("offset + 1", PhiloxState::new(11, 101), 0),
        (
            "offset with other high word",
            PhiloxState::new(11, 100 | (1 << 32)),
            0,
        ),
        ("element_offset + 2^32", base_state, 1u64 << 32),
    ];
    for (what, state, element_offset) in others {
        let other = mask(p, state, element_offset, CORR_N).unwrap();
        let k = agreeing_bits(&base, &other, CORR_N);
        assert_binomial(k, CORR_N as u64, agree, what);
    }
}

#[test]
fn adjacent_elements_are_uncorrelated() {
    let p = 0.3;
    let q = keep_prob(p);
    let agree = q * q + (1.0 - q) * (1.0 - q);
    let m = mask(p, PhiloxState::new(21, 5), 0, CORR_N).unwrap();
    // Disjoint pairs (e, e + d) for e = start, start + 2d, ...: independent Bernoulli trials.
    // d = 1 at both parities covers words within a block and across blocks; d = 4 compares the
    // same word of adjacent blocks.
    for (d, start) in [(1usize, 0usize), (1, 1), (4, 0), (4, 4)] {
        let mut pairs = 0u64;
        let mut agreeing = 0u64;
        let mut e = start;
        while e + d < CORR_N {
            pairs += 1;
            if mask_bit(&m, e) == mask_bit(&m, e + d) {
                agreeing += 1;
            }
            e += if d == 1 { 2 } else { 8 };
        }
        assert_binomial(
            agreeing,
            pairs,
            agree,
            &format!("pairs (e, e + {d}) from {start}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Shard property

proptest! {
    #[test]
    fn shard_mask_equals_slice_of_whole_mask(
        n in 1usize..3000,
        split in any::<prop::sample::Index>(),
        len in any::<prop::sample::Index>(),
        base in prop_oneof![0u64..1000, (u64::MAX - 10_000)..=(u64::MAX - 3000)],
        seed in any::<u64>(),
        offset in any::<u64>(),
        p in 0.0f64..=1.0,
    ) {
        let s = PhiloxState::new(seed, offset);
        let a = split.index(n);
        let m = 1 + len.index(n - a);
        let whole = mask(p, s, base, n).unwrap();
        let shard = mask(p, s, base + a as u64, m).unwrap();
        for j in 0..m {
            prop_assert_eq!(mask_bit(&shard, j), mask_bit(&whole, a + j), "bit {}", j);
        }
        let used = m - 32 * (shard.len() - 1);
        if used < 32 {
            prop_assert_eq!(shard[shard.len() - 1] >> used, 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward / backward

/// Checks forward against the mask and scale, and both backwards against each other.
fn check_consistency<T: Element>(x: &[T], dy: &[T], p: f64, s: PhiloxState, off: u64) {
    let n = x.len();
    let (y, m) = forward(x, p, s, off).unwrap();
    assert_eq!(m, mask(p, s, off, n).unwrap());
    assert_eq!(y.len(), n);
    let t = drop_threshold(p).unwrap();
    let scale = keep_scale(p).unwrap();
    for i in 0..n {
        assert_eq!(mask_bit(&m, i), keep(s, off + i as u64, t), "bit {i}");
        let expect = if mask_bit(&m, i) {
            T::from_f32(x[i].to_f32() * scale).to_bits_u32()
        } else {
            0 // +0, whatever x is
        };
        assert_eq!(y[i].to_bits_u32(), expect, "y[{i}] for x {:?}", x[i]);
    }
    let dx_mask = backward_from_mask(dy, &m, p).unwrap();
    let dx_philox = backward(dy, p, s, off).unwrap();
    let bits = |v: &[T]| v.iter().map(|e| e.to_bits_u32()).collect::<Vec<_>>();
    assert_eq!(bits(&dx_mask), bits(&dx_philox));
    assert_eq!(bits(&dx_mask), bits(&apply_mask(dy, &m, scale).unwrap()));
}

proptest! {
    #[test]
    fn forward_backward_consistent_f32(
        xy in prop::collection::vec((any::<u32>(), any::<u32>()), 1..200),
        p in 0.0f64..=1.0, seed in any::<u64>(), offset in any::<u64>(), off in 0u64..1 << 40,
    ) {
        let x: Vec<f32> = xy.iter().map(|&(a, _)| f32::from_bits(a)).collect();
        let dy: Vec<f32> = xy.iter().map(|&(_, b)| f32::from_bits(b)).collect();
        check_consistency(&x, &dy, p, PhiloxState::new(seed, offset), off);
    }

    #[test]
    fn forward_backward_consistent_f16(
        xy in prop::collection::vec((any::<u16>(), any::<u16>()), 1..200),
        p in 0.0f64..=1.0, seed in any::<u64>(), offset in any::<u64>(), off in 0u64..1 << 40,
    ) {
        let x: Vec<f16> = xy.iter().map(|&(a, _)| f16::from_bits(a)).collect();
        let dy: Vec<f16> = xy.iter().map(|&(_, b)| f16::from_bits(b)).collect();
        check_consistency(&x, &dy, p, PhiloxState::new(seed, offset), off);
    }

    #[test]
    fn forward_backward_consistent_bf16(
        xy in prop::collection::vec((any::<u16>(), any::<u16>()), 1..200),
        p in 0.0f64..=1.0, seed in any::<u64>(), offset in any::<u64>(), off in 0u64..1 << 40,
    ) {
        let x: Vec<bf16> = xy.iter().map(|&(a, _)| bf16::from_bits(a)).collect();
        let dy: Vec<bf16> = xy.iter().map(|&(_, b)| bf16::from_bits(b)).collect();
        check_consistency(&x, &dy, p, PhiloxState::new(seed, offset), off);
    }
}

/// Finite test values including signed zeros, subnormals and extremes, as f32.
fn finite_values() -> Vec<f32> {
    let mut v = vec![0.0, -0.0, 1.0, -1.0, 0.5, 3.25, -1234.5, 65504.0, -65504.0];
    v.extend([
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN,
    ]);
    v.extend((0..500).map(|i| (i as f32 - 250.0) * 0.37));
    v
}

/// Non-finite inputs: dropped elements must still be +0.
fn non_finite_values() -> Vec<f32> {
    vec![f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
}

fn check_p_zero_identity<T: Element>() {
    let x: Vec<T> = finite_values().into_iter().map(T::from_f32).collect();
    let (y, m) = forward(&x, 0.0, PhiloxState::new(3, 4), 17).unwrap();
    let bits = |v: &[T]| v.iter().map(|e| e.to_bits_u32()).collect::<Vec<_>>();
    assert_eq!(bits(&y), bits(&x));
    assert!((0..x.len()).all(|i| mask_bit(&m, i)));
    assert_eq!(
        bits(&backward(&x, 0.0, PhiloxState::new(3, 4), 17).unwrap()),
        bits(&x)
    );
}

fn check_p_one_zeros<T: Element>() {
    let mut v = finite_values();
    v.extend(non_finite_values());
    let x: Vec<T> = v.into_iter().map(T::from_f32).collect();
    let (y, m) = forward(&x, 1.0, PhiloxState::new(3, 4), 0).unwrap();
    assert!(
        y.iter().all(|e| e.to_bits_u32() == 0),
        "p = 1 left a non-+0 value"
    );
    assert!(m.iter().all(|&w| w == 0));
    let dx = backward_from_mask(&x, &m, 1.0).unwrap();
    assert!(dx.iter().all(|e| e.to_bits_u32() == 0));
}

#[test]
fn p_zero_is_identity() {
    check_p_zero_identity::<f32>();
    check_p_zero_identity::<f16>();
    check_p_zero_identity::<bf16>();
}

#[test]
fn p_one_gives_zeros() {
    check_p_one_zeros::<f32>();
    check_p_one_zeros::<f16>();
    check_p_one_zeros::<bf16>();
}

#[test]
fn dropped_non_finite_inputs_become_positive_zero() {
    let x: Vec<f32> = non_finite_values().into_iter().cycle().take(400).collect();
    let (y, m) = forward(&x, 0.5, PhiloxState::new(8, 8), 0).unwrap();
    let dropped = (0..x.len()).filter(|&i| !mask_bit(&m, i)).count();
    assert!(dropped > 0 && dropped < x.len());
    for i in 0..x.len() {
        if mask_bit(&m, i) {
            // Kept: NaN stays NaN, infinities keep their sign (scale 2).
            assert_eq!(y[i].is_nan(), x[i].is_nan());
            if !x[i].is_nan() {
                assert_eq!(y[i], x[i]);
            }
        } else {
            assert_eq!(y[i].to_bits(), 0);
        }
    }
}

#[test]
fn f32_forward_values_half() {
    // p = 0.5: scale 2, so kept values are exactly x + x (independent of the implementation).
    let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
    let (y, m) = forward(&x, 0.5, PhiloxState::new(99, 1), 12345).unwrap();
    let kept = (0..x.len()).filter(|&i| mask_bit(&m, i)).count();
    assert!(kept > 400 && kept < 600, "kept {kept} of 1000");
    for i in 0..x.len() {
        let expect = if mask_bit(&m, i) { x[i] + x[i] } else { 0.0 };
        assert_eq!(y[i].to_bits(), expect.to_bits(), "y[{i}]");
    }
}

// ---------------------------------------------------------------------------------------------
// Rounding

/// Forward of `x` at p = 0.2 (scale exactly 1.25): the bits of every kept output, which must all
/// equal `expect`; asserts at least one element was kept.
fn check_kept_bits<T: Element>(x: T, expect: u32) {
    assert_eq!(keep_scale(0.2).unwrap(), 1.25);
    let xs = vec![x; 64];
    let (y, m) = forward(&xs, 0.2, PhiloxState::new(5, 6), 0).unwrap();
    let kept: Vec<usize> = (0..xs.len()).filter(|&i| mask_bit(&m, i)).collect();
    assert!(!kept.is_empty());
    for i in kept {
        assert_eq!(y[i].to_bits_u32(), expect, "x {x:?}: y[{i}] = {:?}", y[i]);
    }
}

#[test]
fn f16_halfway_rounds_to_even() {
    // x = 1 + 2^-9 (f16 0x3c02); x * 1.25 = 1282.5 * 2^-10 exactly in f32: halfway between
    // f16 0x3d02 (1282, even) and 0x3d03. RNE gives 0x3d02; round-half-up would give 0x3d03.
    let x = f16::from_bits(0x3c02);
    assert_eq!(x.to_f32() * 1.25, 1282.5 / 1024.0);
    check_kept_bits(x, 0x3d02);
    // x = 1 + 6 * 2^-10: product 1287.5 * 2^-10, halfway; RNE rounds up to 1288 (0x3d08);
    // truncation would give 0x3d07.
    let x = f16::from_bits(0x3c06);
    assert_eq!(x.to_f32() * 1.25, 1287.5 / 1024.0);
    check_kept_bits(x, 0x3d08);
}

#[test]
fn bf16_halfway_rounds_to_even() {
    // x = 1 + 2^-6 (bf16 0x3f82); x * 1.25 = 162.5 * 2^-7: halfway between 0x3fa2 (even) and
    // 0x3fa3. RNE gives 0x3fa2.
    let x = bf16::from_bits(0x3f82);
    assert_eq!(x.to_f32() * 1.25, 162.5 / 128.0);
    check_kept_bits(x, 0x3fa2);
    // x = 1 + 6 * 2^-7: 167.5 * 2^-7 -> RNE 168 (0x3fa8).
    let x = bf16::from_bits(0x3f86);
    assert_eq!(x.to_f32() * 1.25, 167.5 / 128.0);
    check_kept_bits(x, 0x3fa8);
}
