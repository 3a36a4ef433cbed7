//! Tests of the CPU Monte-Carlo dropout reference: replicas against dropout's forward on streams
//! `offset + t`, the replica layout, and the streaming summaries against a naive two-pass `f64`
//! implementation, known small examples, `T = 1` and identical samples, the `f32` kernel
//! tolerance (met by a simulated `f32` kernel), and validation.

mod common;

use common::data::splitmix;
use common::{assert_all_close, assert_close, bits, cases, invalid_name};
use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout::{self, mask_bit, mask_words};
use dropfuse::reference::mc_dropout::{
    entropy, f32_tolerance, replica_state, replicated_forward, replicated_mask, summarize, McStats, McSummary,
};
use dropfuse::{Element, Error, Generator, PhiloxState};
use proptest::prelude::*;

/// SplitMix64: a tiny deterministic generator for test data.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.0)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Row-wise `f32` softmax of `logits` (`rows x classes`).
fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&z| (z - m).exp()).collect();
        let s: f32 = e.iter().sum();
        out.extend(e.iter().map(|&v| v / s));
    }
    out
}

/// `T x B x C` random probabilities: softmax of logits in `[-spread, spread]`, with about a
/// `zeros` fraction of entries then set to exactly 0.
fn random_probs(rng: &mut SplitMix, t: usize, b: usize, c: usize, spread: f64, zeros: f64) -> Vec<f32> {
    let logits: Vec<f32> = (0..t * b * c)
        .map(|_| ((rng.unit() * 2.0 - 1.0) * spread) as f32)
        .collect();
    let mut p = softmax_rows(&logits, c);
    for v in &mut p {
        if rng.unit() < zeros {
            *v = 0.0;
        }
    }
    p
}

/// The naive two-pass `f64` summaries of a stored stack: mean = sum / T, then the variance from
/// the deviations; entropies directly.
fn naive(probs: &[f32], t: usize, b: usize, c: usize) -> McStats {
    let at = |s: usize, i: usize| f64::from(probs[s * b * c + i]);
    let mut mean = vec![0.0; b * c];
    let mut variance = vec![0.0; b * c];
    for i in 0..b * c {
        mean[i] = (0..t).map(|s| at(s, i)).sum::<f64>() / t as f64;
        variance[i] = (0..t).map(|s| (at(s, i) - mean[i]).powi(2)).sum::<f64>() / t as f64;
    }
    let h = |q: &[f64]| -> f64 { q.iter().map(|&v| if v == 0.0 { 0.0 } else { -v * v.ln() }).sum() };
    let mut predictive = vec![0.0; b];
    let mut expected = vec![0.0; b];
    let mut mi = vec![0.0; b];
    for r in 0..b {
        predictive[r] = h(&mean[r * c..(r + 1) * c]);
        expected[r] = (0..t)
            .map(|s| {
                let row: Vec<f64> = (0..c).map(|j| at(s, r * c + j)).collect();
                h(&row)
            })
            .sum::<f64>()
            / t as f64;
        mi[r] = predictive[r] - expected[r]; // unclamped
    }
    McStats {
        batch: b,
        classes: c,
        samples: t,
        mean,
        variance,
        predictive_entropy: predictive,
        expected_entropy: expected,
        mutual_information: mi,
    }
}

/// Compares the reference with the naive summaries (the naive MI is unclamped).
fn check_against_naive(probs: &[f32], t: usize, b: usize, c: usize) {
    let got = summarize(probs, t, b, c).unwrap();
    let want = naive(probs, t, b, c);
    assert_eq!((got.samples, got.batch, got.classes), (t, b, c));
    assert_all_close(&got.mean, &want.mean, 1e-14, "mean");
    assert_all_close(&got.variance, &want.variance, 1e-14, "variance");
    assert_all_close(
        &got.predictive_entropy,
        &want.predictive_entropy,
        1e-13,
        "predictive entropy",
    );
    assert_all_close(
        &got.expected_entropy,
        &want.expected_entropy,
        1e-13,
        "expected entropy",
    );
    for r in 0..b {
        let raw = want.mutual_information[r];
        assert!(raw >= -1e-12, "BALD {raw} < -1e-12 (row {r})");
        assert!(got.mutual_information[r] >= 0.0);
        assert_close(
            got.mutual_information[r],
            raw.max(0.0),
            1e-13,
            &format!("BALD[{r}]"),
        );
        assert!(got.variance.iter().all(|&v| v >= 0.0));
    }
}

// ---------------------------------------------------------------------------------------------
// Replicated dropout

fn check_replicas_are_dropout<T: Element>() {
    let s = PhiloxState::new(0xfeed_beef, 41);
    let (b, f) = (3usize, 37usize);
    let x: Vec<T> = (0..b * f).map(|i| T::from_f32(i as f32 * 0.5 - 20.0)).collect();
    let n = x.len();
    let w = mask_words(n);
    for (r, p, off) in [(1usize, 0.5, 0u64), (4, 0.3, 0), (5, 0.9, 1 << 33)] {
        let (y, masks) = replicated_forward(&x, r, p, s, off).unwrap();
        assert_eq!(y.len(), r * n);
        assert_eq!(masks.len(), r * w);
        assert_eq!(masks, replicated_mask(n, r, p, s, off).unwrap());
        for t in 0..r {
            let (yt, mt) = dropout::forward(&x, p, replica_state(s, t as u64), off).unwrap();
            assert_eq!(bits(&y[t * n..(t + 1) * n]), bits(&yt), "replica {t}");
            assert_eq!(&masks[t * w..(t + 1) * w], &mt[..], "mask of replica {t}");
        }
    }
}

#[test]
fn replica_t_is_dropout_on_stream_offset_plus_t() {
    check_replicas_are_dropout::<f32>();
    check_replicas_are_dropout::<f16>();
    check_replicas_are_dropout::<bf16>();
}

#[test]
fn replica_states_are_generator_streams() {
    let mut g = Generator::with_offset(7, 100);
    let first = g.next_streams(6);
    for t in 0..6u64 {
        assert_eq!(
            replica_state(first, t),
            PhiloxState::new(7, 100 + t),
            "replica {t}"
        );
    }
    assert_eq!(g.offset(), 106);
    // Offsets wrap around like the generator's.
    let s = PhiloxState::new(7, u64::MAX);
    assert_eq!(replica_state(s, 1), PhiloxState::new(7, 0));
    let m = replicated_mask(40, 3, 0.5, s, 0).unwrap();
    assert_eq!(
        &m[2..4],
        &dropout::mask(0.5, PhiloxState::new(7, 0), 0, 40).unwrap()[..]
    );
}

#[test]
fn replicas_are_prefix_stable_and_distinct() {
    let s = PhiloxState::new(3, 9);
    let n = 4096;
    let x = vec![1.0f32; n];
    let (y3, m3) = replicated_forward(&x, 3, 0.5, s, 0).unwrap();
    let (y5, m5) = replicated_forward(&x, 5, 0.5, s, 0).unwrap();
    assert_eq!(bits(&y3), bits(&y5[..3 * n]));
    assert_eq!(m3, m5[..3 * mask_words(n)]);
    // Distinct replicas agree on about half of the elements at p = 0.5 (6 sigma = 192).
    let w = mask_words(n);
    for (a, b) in [(0usize, 1usize), (1, 2), (0, 4)] {
        let agree = (0..n)
            .filter(|&i| mask_bit(&m5[a * w..], i) == mask_bit(&m5[b * w..], i))
            .count() as f64;
        assert!(
            (agree - 2048.0).abs() <= 192.0,
            "replicas {a} and {b} agree on {agree}"
        );
    }
}

#[test]
fn replica_masks_pad_each_replica_to_whole_words() {
    let s = PhiloxState::new(11, 0);
    let n = 33; // 2 words per replica, 31 unused bits
    let m = replicated_mask(n, 4, 0.0, s, 0).unwrap();
    assert_eq!(m, vec![u32::MAX, 1, u32::MAX, 1, u32::MAX, 1, u32::MAX, 1]);
    let (y, m) = replicated_forward(&[2.0f32; 33], 4, 1.0, s, 0).unwrap();
    assert!(m.iter().all(|&v| v == 0));
    assert!(y.iter().all(|v| v.to_bits() == 0));
}

#[test]
fn invalid_replica_arguments_are_named() {
    let s = PhiloxState::new(1, 1);
    let x = [1.0f32; 10];
    let empty: [f32; 0] = [];
    assert_eq!(invalid_name(replicated_forward(&x, 0, 0.5, s, 0)), "replicas");
    assert_eq!(invalid_name(replicated_mask(10, 0, 0.5, s, 0)), "replicas");
    assert_eq!(
        invalid_name(replicated_forward(&x, usize::MAX, 0.5, s, 0)),
        "replicas"
    );
    assert_eq!(
        invalid_name(replicated_mask(2, usize::MAX, 0.5, s, 0)),
        "replicas"
    );
    assert_eq!(invalid_name(replicated_forward(&empty, 2, 0.5, s, 0)), "x");
    assert_eq!(invalid_name(replicated_mask(0, 2, 0.5, s, 0)), "x");
    for p in [f64::NAN, -1e-9, 1.01, f64::NEG_INFINITY] {
        assert_eq!(invalid_name(replicated_forward(&x, 2, p, s, 0)), "p");
        assert_eq!(invalid_name(replicated_mask(10, 2, p, s, 0)), "p");
    }
    assert_eq!(
        invalid_name(replicated_forward(&x, 2, 0.5, s, u64::MAX - 9)),
        "element_offset"
    );
    assert!(replicated_forward(&x, 2, 0.5, s, u64::MAX - 10).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Summaries: small known examples

#[test]
fn known_examples() {
    let ln2 = std::f64::consts::LN_2;
    // Two confident, disagreeing samples: maximal epistemic uncertainty for C = 2.
    let s = summarize(&[1.0, 0.0, 0.0, 1.0], 2, 1, 2).unwrap();
    assert_eq!(s.mean, vec![0.5, 0.5]);
    assert_eq!(s.variance, vec![0.25, 0.25]);
    assert_eq!(s.predictive_entropy, vec![ln2]);
    assert_eq!(s.expected_entropy, vec![0.0]);
    assert_eq!(s.mutual_information, vec![ln2]);
    // Two identical uniform samples: all aleatoric, BALD 0.
    let s = summarize(&[0.5, 0.5, 0.5, 0.5], 2, 1, 2).unwrap();
    assert_eq!(s.variance, vec![0.0, 0.0]);
    assert_eq!(s.predictive_entropy, vec![ln2]);
    assert_eq!(s.expected_entropy, vec![ln2]);
    assert_eq!(s.mutual_information, vec![0.0]);
    // [1, 0] and [0.5, 0.5]: mean [0.75, 0.25], variance 0.0625, E[H] = ln2 / 2.
    let s = summarize(&[1.0, 0.0, 0.5, 0.5], 2, 1, 2).unwrap();
    assert_eq!(s.mean, vec![0.75, 0.25]);
    assert_eq!(s.variance, vec![0.0625, 0.0625]);
    let h = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
    assert_close(s.predictive_entropy[0], h, 1e-15, "H[mean]");
    assert_close(s.expected_entropy[0], ln2 / 2.0, 1e-15, "E[H]");
    assert_close(s.mutual_information[0], h - ln2 / 2.0, 1e-15, "BALD");
    // Two rows at once, three samples, C = 3: row 0 one-hot on different classes, row 1 uniform.
    let third = 1.0f32 / 3.0;
    let probs = [
        1.0, 0.0, 0.0, third, third, third, //
        0.0, 1.0, 0.0, third, third, third, //
        0.0, 0.0, 1.0, third, third, third,
    ];
    let s = summarize(&probs, 3, 2, 3).unwrap();
    let ln3 = 3f64.ln();
    let m = f64::from(third);
    assert_close(s.predictive_entropy[0], ln3, 1e-15, "row 0 H");
    assert_eq!(s.expected_entropy[0], 0.0);
    assert_close(s.mutual_information[0], ln3, 1e-15, "row 0 BALD");
    for c in 0..3 {
        assert_close(s.mean[c], 1.0 / 3.0, 1e-15, "row 0 mean");
        assert_close(s.variance[c], 2.0 / 9.0, 1e-15, "row 0 variance");
        assert_eq!(s.mean[3 + c], m, "row 1 mean is exactly the sample");
        assert_eq!(s.variance[3 + c], 0.0);
    }
    assert_eq!(s.mutual_information[1], 0.0);
    assert_eq!(s.predictive_entropy[1], -3.0 * m * m.ln());
    // One class: every probability mass is on it (or not), H = 0 only for 0 or 1.
    let s = summarize(&[1.0, 1.0], 2, 1, 1).unwrap();
    assert_eq!(s.predictive_entropy, vec![0.0]);
    assert_eq!(s.mutual_information, vec![0.0]);
}

#[test]
fn entropy_treats_zero_as_zero() {
    assert_eq!(entropy(&[0.0, 1.0]), 0.0);
    assert_eq!(entropy(&[0.0, 0.0]), 0.0);
    assert_eq!(entropy(&[-0.0, 1.0]), 0.0);
    assert_eq!(entropy(&[0.25; 4]), 4f64.ln());
    assert!(entropy(&[1e-300, 1.0]) > 0.0);
}

// ---------------------------------------------------------------------------------------------
// Summaries: T = 1, identical samples, streaming

#[test]
fn one_sample_has_zero_variance_and_zero_bald() {
    let mut rng = SplitMix(1);
    for (b, c) in [(1usize, 1usize), (3, 10), (5, 2)] {
        let p = random_probs(&mut rng, 1, b, c, 6.0, 0.2);
        let s = summarize(&p, 1, b, c).unwrap();
        let widened: Vec<f64> = p.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(s.mean, widened, "mean is the sample, exactly");
        assert!(s.variance.iter().all(|&v| v == 0.0));
        assert!(s.mutual_information.iter().all(|&v| v == 0.0));
        assert_eq!(s.predictive_entropy, s.expected_entropy);
    }
}

#[test]
fn identical_samples_have_zero_variance_and_zero_bald() {
    let mut rng = SplitMix(2);
    for (t, b, c) in [(2usize, 1usize, 2usize), (3, 4, 7), (10, 2, 100), (64, 3, 5)] {
        let one = random_probs(&mut rng, 1, b, c, 8.0, 0.1);
        let mut summary = McSummary::new(b, c).unwrap();
        for _ in 0..t {
            summary.push(&one).unwrap();
        }
        let s = summary.finish().unwrap();
        let widened: Vec<f64> = one.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(s.mean, widened, "Welford's mean of identical values is exact");
        assert!(s.variance.iter().all(|&v| v == 0.0));
        assert!(s.mutual_information.iter().all(|&v| v == 0.0));
        assert_eq!(
            s.predictive_entropy, s.expected_entropy,
            "H[mean] is E[H] exactly"
        );
    }
}

#[test]
fn finish_mid_stream_equals_summarize_of_the_prefix() {
    let mut rng = SplitMix(3);
    let (t, b, c) = (6usize, 2usize, 5usize);
    let probs = random_probs(&mut rng, t, b, c, 4.0, 0.0);
    let mut summary = McSummary::new(b, c).unwrap();
    assert_eq!((summary.batch(), summary.classes(), summary.samples()), (b, c, 0));
    for k in 1..=t {
        summary.push(&probs[(k - 1) * b * c..k * b * c]).unwrap();
        assert_eq!(summary.samples(), k);
        assert_eq!(
            summary.finish().unwrap(),
            summarize(&probs[..k * b * c], k, b, c).unwrap()
        );
    }
}

#[test]
fn unnormalised_rows_keep_bald_non_negative() {
    // Jensen's inequality holds for any non-negative rows: the naive difference is >= 0 up to
    // rounding, and the clamp only removes that noise.
    let mut rng = SplitMix(4);
    for (t, b, c) in [(5usize, 3usize, 4usize), (20, 2, 50)] {
        let probs: Vec<f32> = (0..t * b * c)
            .map(|_| {
                if rng.unit() < 0.2 {
                    0.0
                } else {
                    (rng.unit() * 3.0) as f32
                }
            })
            .collect();
        check_against_naive(&probs, t, b, c);
    }
}

/// Two samples one f32 ulp apart in one class: `H[mean] - E[H]` is mathematically a tiny positive
/// number (Jensen) but computes to `-2^-53` in these rows (found by a search over such pairs
/// with the reference's own formulas), so the documented `max(0, .)` is what makes BALD `+0`
/// here rather than negative. Each row is `(bits of sample 0, class bumped by one ulp in sample
/// 1)`.
#[test]
fn mutual_information_clamps_negative_rounding_noise() {
    let rows: [(&[u32], usize); 3] = [
        (&[0x3d3e9a53, 0x3f0ff5a0, 0x3d57458c, 0x3ead58c5], 2),
        (&[0x3f0cb25e, 0x3b488da0, 0x3ed7fad8, 0x3cd0f511], 1),
        (&[0x3ef9d89a, 0x3deb5fd6, 0x3ecb4f71], 1),
    ];
    let mut negative = 0;
    for (bits, j) in rows {
        let p: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut q = p.clone();
        q[j] = f32::from_bits(bits[j] + 1);
        let mut probs = p.clone();
        probs.extend(&q);
        let st = summarize(&probs, 2, 1, p.len()).unwrap();
        if st.predictive_entropy[0] - st.expected_entropy[0] < 0.0 {
            negative += 1;
        }
        assert_eq!(
            st.mutual_information[0].to_bits(),
            0.0f64.to_bits(),
            "{p:?} then {q:?}: BALD {:e} (H[mean] {:e}, E[H] {:e})",
            st.mutual_information[0],
            st.predictive_entropy[0],
            st.expected_entropy[0]
        );
    }
    assert!(negative > 0, "no row exercises the clamp");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// The one-pass reference equals the naive two-pass f64 implementation.
    #[test]
    fn summaries_match_naive_two_pass(
        t in 1usize..=12, b in 1usize..=4, c in 1usize..=8,
        seed in any::<u64>(), spread in 0.0f64..20.0, zeros in 0.0f64..0.5,
    ) {
        let mut rng = SplitMix(seed);
        let probs = random_probs(&mut rng, t, b, c, spread, zeros);
        check_against_naive(&probs, t, b, c);
    }
}

#[test]
fn summaries_match_naive_on_larger_stacks() {
    let mut rng = SplitMix(5);
    for (t, b, c) in [(100usize, 2usize, 10usize), (30, 4, 1000)] {
        let probs = random_probs(&mut rng, t, b, c, 5.0, 0.05);
        check_against_naive(&probs, t, b, c);
    }
}

// ---------------------------------------------------------------------------------------------
// The f32 kernel tolerance

/// What an `f32` kernel computes: Welford in `f32`, `f32` `ln`, sequential `f32` sums.
fn f32_kernel(probs: &[f32], t: usize, b: usize, c: usize) -> McStats {
    let n = b * c;
    let mut mean = vec![0.0f32; n];
    let mut m2 = vec![0.0f32; n];
    let mut hsum = vec![0.0f32; b];
    let h = |q: &[f32]| -> f32 {
        let mut acc = 0.0f32;
        for &v in q {
            if v > 0.0 {
                acc -= v * v.ln();
            }
        }
        acc
    };
    for s in 0..t {
        let k = (s + 1) as f32;
        let sample = &probs[s * n..(s + 1) * n];
        for i in 0..n {
            let d = sample[i] - mean[i];
            mean[i] += d / k;
            m2[i] += d * (sample[i] - mean[i]);
        }
        for r in 0..b {
            hsum[r] += h(&sample[r * c..(r + 1) * c]);
        }
    }
    let tf = t as f32;
    let predictive: Vec<f32> = mean.chunks(c).map(h).collect();
    let expected: Vec<f32> = hsum.iter().map(|&v| v / tf).collect();
    let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    McStats {
        batch: b,
        classes: c,
        samples: t,
        mean: wide(&mean),
        variance: wide(&m2.iter().map(|&v| v / tf).collect::<Vec<_>>()),
        predictive_entropy: wide(&predictive),
        expected_entropy: wide(&expected),
        mutual_information: predictive
            .iter()
            .zip(&expected)
            .map(|(&p, &e)| f64::from((p - e).max(0.0)))
            .collect(),
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn tolerance_formulas() {
    let u = 1.0 / 16_777_216.0;
    let tol = f32_tolerance(10, 1);
    assert_eq!(tol.mean, 24.0 * u);
    assert_eq!(tol.variance, 48.0 * u);
    assert_eq!(tol.predictive_entropy, 89.0 * u);
    assert_eq!(tol.expected_entropy, 19.0 * u);
    assert_eq!(tol.mutual_information, 108.0 * u);
    let tol = f32_tolerance(64, 1000);
    let l = 1000f64.ln() + 1.0;
    assert_close(tol.predictive_entropy, 1520.0 * u * l, 1e-15, "predictive");
    assert_close(tol.expected_entropy, 1072.0 * u * l, 1e-15, "expected");
}

#[test]
fn simulated_f32_kernel_meets_the_tolerance() {
    let mut rng = SplitMix(6);
    let mut cases: Vec<(usize, usize, usize, Vec<f32>)> = Vec::new();
    for (t, b, c, spread, zeros) in [
        (64usize, 4usize, 1000usize, 6.0, 0.0),
        (256, 3, 10, 3.0, 0.1),
        (1000, 2, 3, 1.0, 0.0),
        (16, 2, 2000, 20.0, 0.3),
    ] {
        let p = random_probs(&mut rng, t, b, c, spread, zeros);
        cases.push((t, b, c, p));
    }
    // Adversarial: one-hot samples rotating over the classes, and tiny probabilities.
    let (t, c) = (97usize, 7usize);
    let one_hot: Vec<f32> = (0..t)
        .flat_map(|s| (0..c).map(move |j| if j == s % c { 1.0 } else { 0.0 }))
        .collect();
    cases.push((t, 1, c, one_hot));
    let tiny: Vec<f32> = (0..50 * 8)
        .map(|i| {
            if i % 8 == 0 {
                1.0 - 7e-30
            } else {
                1e-30 * (1 + i % 5) as f32
            }
        })
        .collect();
    cases.push((50, 1, 8, tiny));
    for (t, b, c, probs) in cases {
        let reference = summarize(&probs, t, b, c).unwrap();
        let kernel = f32_kernel(&probs, t, b, c);
        let tol = f32_tolerance(t, c);
        let what = format!("T {t} B {b} C {c}");
        let checks = [
            ("mean", &reference.mean, &kernel.mean, tol.mean),
            ("variance", &reference.variance, &kernel.variance, tol.variance),
            (
                "predictive entropy",
                &reference.predictive_entropy,
                &kernel.predictive_entropy,
                tol.predictive_entropy,
            ),
            (
                "expected entropy",
                &reference.expected_entropy,
                &kernel.expected_entropy,
                tol.expected_entropy,
            ),
            (
                "mutual information",
                &reference.mutual_information,
                &kernel.mutual_information,
                tol.mutual_information,
            ),
        ];
        for (name, r, k, bound) in checks {
            let err = max_abs_diff(r, k);
            assert!(err <= bound, "{what}: {name} off by {err:e} > {bound:e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MC dropout end to end

#[test]
fn replicated_dropout_feeds_the_summary() {
    // Logits (B x C) -> R dropout replicas -> softmax per replica -> one push per replica.
    let (b, c, r) = (4usize, 6usize, 32usize);
    let logits: Vec<f32> = (0..b * c).map(|i| (i % 7) as f32 * 0.8 - 2.0).collect();
    let (y, _) = replicated_forward(&logits, r, 0.3, PhiloxState::new(12, 0), 0).unwrap();
    let mut summary = McSummary::new(b, c).unwrap();
    for t in 0..r {
        summary
            .push(&softmax_rows(&y[t * b * c..(t + 1) * b * c], c))
            .unwrap();
    }
    let s = summary.finish().unwrap();
    let stack: Vec<f32> = (0..r)
        .flat_map(|t| softmax_rows(&y[t * b * c..(t + 1) * b * c], c))
        .collect();
    assert_eq!(s, summarize(&stack, r, b, c).unwrap());
    check_against_naive(&stack, r, b, c);
    assert!(s.mutual_information.iter().all(|&v| v > 0.0), "dropout disagrees");
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn invalid_summary_inputs_are_named() {
    assert_eq!(invalid_name(McSummary::new(0, 3)), "batch");
    assert_eq!(invalid_name(McSummary::new(3, 0)), "classes");
    assert_eq!(invalid_name(McSummary::new(usize::MAX, 2)), "classes");
    let mut s = McSummary::new(2, 3).unwrap();
    assert_eq!(invalid_name(s.finish()), "samples");
    for len in [0usize, 5, 7, 12] {
        assert_eq!(invalid_name(s.push(&vec![0.1; len])), "probs", "len {len}");
    }
    s.push(&[0.2, 0.3, 0.5, 1.0, 0.0, -0.0]).unwrap();
    let before = s.clone();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-30, -1.0] {
        let v = [0.2, 0.3, 0.5, 1.0, bad, 0.0];
        match s.push(&v) {
            Err(Error::InvalidArgument {
                name: "probs",
                expected,
                got,
            }) => {
                assert_eq!(expected, "finite values >= 0");
                assert_eq!(got, format!("probs[4] = {bad}"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(s, before, "a rejected push changes nothing");
    }
    assert_eq!(s.samples(), 1);
    // summarize: T >= 1 and exactly T * B * C values.
    assert_eq!(invalid_name(summarize(&[], 0, 1, 1)), "samples");
    assert_eq!(invalid_name(summarize(&[0.5; 5], 2, 1, 2)), "probs");
    assert_eq!(invalid_name(summarize(&[0.5; 4], 2, 0, 2)), "batch");
    assert_eq!(invalid_name(summarize(&[0.5; 4], 2, 2, 0)), "classes");
    assert_eq!(invalid_name(summarize(&[0.5, f32::NAN], 1, 1, 2)), "probs");
    assert_eq!(invalid_name(summarize(&[0.5; 4], usize::MAX, 1, 2)), "samples");
}
