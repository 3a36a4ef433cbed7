//! Monte-Carlo dropout on the GPU vs the CPU reference: replicas bit for bit (outputs and masks,
//! every dtype, misaligned views, element offsets), summaries within
//! `reference::mc_dropout::f32_tolerance` (one push at a time, a stored stack, classes held in
//! registers or not), rejected pushes leaving the state unchanged, exact zeros for identical
//! samples, validation. Without a GPU the GPU tests print a SKIPPED line and return; an `f32`
//! model of the kernels' summary arithmetic is checked against the tolerance on the CPU.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::{splitmix, unit};
use common::guard::GUARD;
use common::huge;
use common::{bits, gpu, invalid_name, ok, run_cases};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::mc_dropout::{summarize, McDropout, McOutputs, McStats32, McSummaryState};
use dropfuse::reference::dropout::mask_words;
use dropfuse::reference::mc_dropout::{self as reference, f32_tolerance, McStats, McSummary};
use dropfuse::{Device, Element, PhiloxState};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---- replicas ----

#[derive(Debug, Clone)]
struct ReplicaCase {
    n: usize,
    replicas: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
    x_off: usize,
    y_off: usize,
    m_off: usize,
    seed: u64,
}

fn replica_case() -> impl Strategy<Value = ReplicaCase> {
    let n = prop_oneof![
        2 => 1usize..=100,
        2 => 100usize..=5000,
        1 => prop::sample::select(vec![31usize, 32, 33, 64, 1024, 4096, 4100]),
    ];
    let p = prop_oneof![Just(0.0), Just(1.0), Just(0.99999), 0.0f64..=1.0];
    let eo = prop_oneof![
        Just(0u64),
        0u64..1000,
        any::<u64>(),
        (1u64..(1 << 30)).prop_map(|k| (k << 34) - 77)
    ];
    (
        n,
        1usize..=6,
        p,
        any::<u64>(),
        any::<u64>(),
        eo,
        0usize..9,
        0usize..9,
        0usize..3,
        any::<u64>(),
    )
        .prop_map(
            |(n, replicas, p, seed, offset, eo, x_off, y_off, m_off, s)| ReplicaCase {
                n,
                replicas,
                p,
                state: PhiloxState::new(seed, offset),
                element_offset: eo.min(u64::MAX - n as u64),
                x_off,
                y_off,
                m_off,
                seed: s,
            },
        )
}

fn check_replicas<T: Element>(dev: &Device, c: &ReplicaCase) -> Result<(), TestCaseError> {
    let mut s = c.seed;
    let x: Vec<T> = (0..c.n).map(|_| T::from_f32(unit(&mut s) * 16.0 - 8.0)).collect();
    let (want_y, want_m) = ok(
        reference::replicated_forward(&x, c.replicas, c.p, c.state, c.element_offset),
        "reference",
    )?;
    let mc = ok(McDropout::new(c.p, c.replicas), "new")?.with_element_offset(c.element_offset);
    let total = c.n * c.replicas;
    let words = c.replicas * mask_words(c.n);
    assert_eq!(mc.masks_words(c.n), words);
    let sent = T::from_f32(-12345.0);
    let mut hx = vec![sent; c.x_off + c.n + GUARD];
    hx[c.x_off..c.x_off + c.n].copy_from_slice(&x);
    let xd = ok(dev.upload(&hx), "upload")?;
    let xv = xd.slice(c.x_off..c.x_off + c.n);
    let mut y: CudaSlice<T> = ok(dev.upload(&vec![sent; c.y_off + total + GUARD]), "alloc")?;
    let mut m: CudaSlice<u32> = ok(
        dev.upload(&vec![0xDEAD_BEEFu32; c.m_off + words + GUARD]),
        "alloc",
    )?;
    ok(
        mc.forward(
            dev.stream(),
            c.state,
            &xv,
            &mut y.slice_mut(c.y_off..c.y_off + total),
            &mut m.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward",
    )?;
    let gy = bits(&ok(dev.download(&y), "dl")?);
    let gm = ok(dev.download(&m), "dl")?;
    let mut wy = vec![sent.to_bits_u32(); c.y_off + total + GUARD];
    wy[c.y_off..c.y_off + total].copy_from_slice(&bits(&want_y));
    let mut wm = vec![0xDEAD_BEEFu32; c.m_off + words + GUARD];
    wm[c.m_off..c.m_off + words].copy_from_slice(&want_m);
    prop_assert_eq!(gy, wy.clone(), "replicas");
    prop_assert_eq!(gm, wm, "masks");
    let mut y2: CudaSlice<T> = ok(dev.upload(&vec![sent; c.y_off + total + GUARD]), "alloc")?;
    ok(
        mc.forward_maskless(
            dev.stream(),
            c.state,
            &xv,
            &mut y2.slice_mut(c.y_off..c.y_off + total),
        ),
        "forward_maskless",
    )?;
    prop_assert_eq!(bits(&ok(dev.download(&y2), "dl")?), wy, "maskless replicas");
    Ok(())
}

fn run_replicas<T: Element>(test: &str) {
    run_cases(test, 24, replica_case(), |dev, c| check_replicas::<T>(dev, &c));
}

#[test]
fn gpu_replicas_match_reference_f32() {
    run_replicas::<f32>("gpu_replicas_match_reference_f32");
}

#[test]
fn gpu_replicas_match_reference_f16() {
    run_replicas::<f16>("gpu_replicas_match_reference_f16");
}

#[test]
fn gpu_replicas_match_reference_bf16() {
    run_replicas::<bf16>("gpu_replicas_match_reference_bf16");
}

/// Replicas of a tensor over 2^31 elements (f16, 3 replicas: y over 2^32 elements, 12.9 GB): the
/// 64-bit offsets `t * n` of the replicas and `t * ceil(n / 32)` of their masks. n * 2 bytes is a
/// multiple of 16 (the vector kernel) and n % 32 != 0 (the tail word of every replica); the element
/// offset is not a multiple of 4. Probes around the start, the 2^31 boundary and the end of every
/// replica against the reference decisions.
#[test]
fn gpu_replicas_huge() {
    let Some(dev) = gpu("gpu_replicas_huge") else {
        return;
    };
    let n = (1usize << 31) + 24;
    let r = 3;
    let (p, eo) = (0.5, 5u64);
    let state = PhiloxState::new(123, 456);
    let mc = McDropout::new(p, r).unwrap().with_element_offset(eo);
    let need = (r + 1) * n * 2 + mc.masks_words(n) * 4 + (1 << 30);
    if !huge::enough_memory(&dev, "gpu_replicas_huge", need) {
        return;
    }
    let value = huge::value;
    let x = huge::value_tensor(&dev, n);
    let mut y = dev.zeros::<f16>(r * n).unwrap();
    let w = mask_words(n);
    let mut m = dev.upload(&vec![0xDEAD_BEEFu32; mc.masks_words(n)]).unwrap();
    mc.forward(dev.stream(), state, &x, &mut y, &mut m).unwrap();
    let threshold = dropfuse::reference::dropout::drop_threshold(p).unwrap();
    let scale = mc.scale();
    for t in 0..r {
        let rs = reference::replica_state(state, t as u64);
        for i in [
            0,
            1,
            31,
            32,
            (1 << 31) - 1,
            1 << 31,
            (1 << 31) + 1,
            n - 24,
            n - 2,
            n - 1,
        ] {
            let keep = dropfuse::reference::dropout::keep(rs, eo + i as u64, threshold);
            let want = if keep {
                f16::from_f32(value(i).to_f32() * scale)
            } else {
                f16::from_f32(0.0)
            };
            let got = dev.download(&y.slice(t * n + i..t * n + i + 1)).unwrap()[0];
            assert_eq!(got.to_bits(), want.to_bits(), "replica {t}, element {i}");
            let word = dev
                .download(&m.slice(t * w + i / 32..t * w + i / 32 + 1))
                .unwrap()[0];
            assert_eq!((word >> (i % 32)) & 1 == 1, keep, "replica {t}, mask bit {i}");
        }
        // The tail word's unused high bits are 0.
        let last = dev.download(&m.slice(t * w + w - 1..t * w + w)).unwrap()[0];
        assert_eq!(last >> (n % 32), 0, "replica {t}: unused mask bits");
    }
}

// ---- summaries ----

/// `samples` probability tensors `B x C` (softmax of random logits, some rows peaked, some with
/// exact zeros), stacked.
fn prob_stack(samples: usize, batch: usize, classes: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut out = Vec::with_capacity(samples * batch * classes);
    for _ in 0..samples * batch {
        let kind = splitmix(&mut s) % 4;
        let temp = if kind == 0 { 0.1 } else { 2.0 };
        let logits: Vec<f32> = (0..classes).map(|_| unit(&mut s) * 8.0 / temp).collect();
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        for (c, &v) in e.iter().enumerate() {
            // kind 3: zero out every third class (0 ln 0 = 0)
            out.push(if kind == 3 && c % 3 == 1 { 0.0 } else { v / sum });
        }
    }
    out
}

fn assert_within(got: &McStats32, want: &McStats, what: &str) {
    let tol = f32_tolerance(want.samples, want.classes);
    let cmp = |name: &str, g: &[f32], w: &[f64], t: f64| {
        assert_eq!(g.len(), w.len(), "{what}: {name} length");
        for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
            let err = (f64::from(g) - w).abs();
            assert!(
                err <= t,
                "{what}: {name}[{i}] = {g}, reference {w}, error {err:e} > {t:e}"
            );
        }
    };
    cmp("mean", &got.mean, &want.mean, tol.mean);
    cmp("variance", &got.variance, &want.variance, tol.variance);
    cmp(
        "predictive_entropy",
        &got.predictive_entropy,
        &want.predictive_entropy,
        tol.predictive_entropy,
    );
    cmp(
        "expected_entropy",
        &got.expected_entropy,
        &want.expected_entropy,
        tol.expected_entropy,
    );
    cmp(
        "mutual_information",
        &got.mutual_information,
        &want.mutual_information,
        tol.mutual_information,
    );
}

#[test]
fn gpu_summaries_within_tolerance() {
    let Some(dev) = gpu("gpu_summaries_within_tolerance") else {
        return;
    };
    let s = dev.stream();
    // classes above 2048 take the kernel's non-register path
    for (i, &(samples, batch, classes)) in [
        (1usize, 3usize, 1usize),
        (2, 5, 2),
        (7, 17, 10),
        (16, 9, 257),
        (16, 33, 1000),
        (5, 4, 2100),
        (30, 2, 5000),
    ]
    .iter()
    .enumerate()
    {
        let stack = prob_stack(samples, batch, classes, i as u64 + 100);
        let want = reference::summarize(&stack, samples, batch, classes).unwrap();
        // one push per sample
        let mut state = McSummaryState::new(&dev, batch, classes).unwrap();
        let per = batch * classes;
        for t in 0..samples {
            let d = dev.upload(&stack[t * per..(t + 1) * per]).unwrap();
            if t % 2 == 0 {
                state.push(s, &d).unwrap();
            } else {
                state.push_unchecked(s, &d).unwrap();
            }
        }
        let mut out = McOutputs::new(&dev, batch, classes).unwrap();
        state.finish(s, &mut out).unwrap();
        state.check(s).unwrap();
        let c = state.counters(s).unwrap();
        assert_eq!(
            (c.accepted, c.rejected, c.first_invalid),
            (samples as u64, 0, None)
        );
        assert_within(&McStats32::download(&dev, &state, &out).unwrap(), &want, "pushes");
        // the stored stack, one launch
        let d = dev.upload(&stack).unwrap();
        let (state2, out2) = summarize(&dev, &d, samples, batch, classes).unwrap();
        assert_within(
            &McStats32::download(&dev, &state2, &out2).unwrap(),
            &want,
            "summarize",
        );
    }
}

#[test]
fn gpu_identical_samples_give_zero_mutual_information() {
    let Some(dev) = gpu("gpu_identical_samples_give_zero_mutual_information") else {
        return;
    };
    let (batch, classes) = (6, 300);
    let sample = prob_stack(1, batch, classes, 5);
    let d = dev.upload(&sample).unwrap();
    let mut state = McSummaryState::new(&dev, batch, classes).unwrap();
    for _ in 0..9 {
        state.push(dev.stream(), &d).unwrap();
    }
    let mut out = McOutputs::new(&dev, batch, classes).unwrap();
    state.finish(dev.stream(), &mut out).unwrap();
    let got = McStats32::download(&dev, &state, &out).unwrap();
    assert_eq!(got.mean, sample, "the mean of identical values is the value");
    assert!(got.variance.iter().all(|&v| v == 0.0));
    assert!(
        got.mutual_information.iter().all(|&v| v == 0.0),
        "{:?}",
        got.mutual_information
    );
    assert_eq!(got.predictive_entropy, got.expected_entropy);
}

/// Mutual information is clamped at +0: samples that differ by an ulp have a true mutual
/// information of ~0, so the f32 difference of the entropies is rounding noise of either sign,
/// and a negative one must come out as +0 (the contract), in every row.
#[test]
fn gpu_mutual_information_is_never_negative() {
    let Some(dev) = gpu("gpu_mutual_information_is_never_negative") else {
        return;
    };
    let (batch, classes) = (256, 10);
    let a = prob_stack(1, batch, classes, 11);
    let b: Vec<f32> = a
        .iter()
        .enumerate()
        .map(|(i, &v)| match (v, i % 2) {
            (0.0, _) => v,
            (_, 0) => f32::from_bits(v.to_bits() + 1),
            _ => f32::from_bits(v.to_bits() - 1),
        })
        .collect();
    let mut state = McSummaryState::new(&dev, batch, classes).unwrap();
    for sample in [&a, &b, &a] {
        state.push(dev.stream(), &dev.upload(sample).unwrap()).unwrap();
    }
    let mut out = McOutputs::new(&dev, batch, classes).unwrap();
    state.finish(dev.stream(), &mut out).unwrap();
    let got = McStats32::download(&dev, &state, &out).unwrap();
    for (row, &mi) in got.mutual_information.iter().enumerate() {
        assert!(
            mi >= 0.0 && !mi.is_sign_negative(),
            "row {row}: mutual information {mi:e}"
        );
        assert!(mi < 1e-5, "row {row}: mutual information {mi:e}");
    }
}

#[test]
fn gpu_rejected_push_leaves_state_unchanged() {
    let Some(dev) = gpu("gpu_rejected_push_leaves_state_unchanged") else {
        return;
    };
    let s = dev.stream();
    let (batch, classes) = (4, 50);
    let good = prob_stack(2, batch, classes, 9);
    let per = batch * classes;
    let mut state = McSummaryState::new(&dev, batch, classes).unwrap();
    state.push(s, &dev.upload(&good[..per]).unwrap()).unwrap();
    for (k, bad_value) in [(17usize, f32::NAN), (3, -1e-30), (199, f32::INFINITY)] {
        let mut bad = good[per..].to_vec();
        bad[k] = bad_value;
        state.push(s, &dev.upload(&bad).unwrap()).unwrap();
    }
    // -0.0 is accepted
    let mut neg_zero = good[per..].to_vec();
    neg_zero[5] = -0.0;
    state.push(s, &dev.upload(&neg_zero).unwrap()).unwrap();
    let c = state.counters(s).unwrap();
    assert_eq!((c.accepted, c.rejected, c.first_invalid), (2, 3, Some(17)));
    assert_eq!(invalid_name(state.check(s)), "probs");
    let mut reference = McSummary::new(batch, classes).unwrap();
    reference.push(&good[..per]).unwrap();
    reference.push(&neg_zero).unwrap();
    let mut out = McOutputs::new(&dev, batch, classes).unwrap();
    state.finish(s, &mut out).unwrap();
    assert_within(
        &McStats32::download(&dev, &state, &out).unwrap(),
        &reference.finish().unwrap(),
        "after rejected pushes",
    );
    // a rejected stack
    let mut stack = prob_stack(3, batch, classes, 11);
    stack[2 * per + 7] = f32::NAN;
    let d = dev.upload(&stack).unwrap();
    let mut state2 = McSummaryState::new(&dev, batch, classes).unwrap();
    state2.push_stack(s, &d, 3).unwrap();
    let c = state2.counters(s).unwrap();
    assert_eq!(
        (c.accepted, c.rejected, c.first_invalid),
        (0, 1, Some((2 * per + 7) as u64))
    );
    assert!(dev.download(state2.mean()).unwrap().iter().all(|&v| v == 0.0));
    // finish with no accepted sample: NaN
    state2.finish(s, &mut out).unwrap();
    assert!(dev
        .download(&out.predictive_entropy)
        .unwrap()
        .iter()
        .all(|v| v.is_nan()));
}

#[test]
fn gpu_invalid_arguments() {
    let Some(dev) = gpu("gpu_invalid_arguments") else {
        return;
    };
    let s = dev.stream();
    let mc = McDropout::new(0.5, 3).unwrap();
    let x = dev.upload(&[1.0f32; 40]).unwrap();
    let empty = dev.zeros::<f32>(0).unwrap();
    let mut y = dev.upload(&vec![7.0f32; 120]).unwrap();
    let mut y_bad = dev.upload(&vec![7.0f32; 119]).unwrap();
    let mut m = dev.upload(&[9u32; 6]).unwrap();
    let mut m_bad = dev.upload(&[9u32; 5]).unwrap();
    let st = PhiloxState::new(1, 1);
    assert_eq!(invalid_name(mc.forward(s, st, &empty, &mut y, &mut m)), "x");
    assert_eq!(invalid_name(mc.forward(s, st, &x, &mut y_bad, &mut m)), "y");
    assert_eq!(invalid_name(mc.forward(s, st, &x, &mut y, &mut m_bad)), "masks");
    assert_eq!(invalid_name(mc.forward_maskless(s, st, &x, &mut y_bad)), "y");
    let far = mc.with_element_offset(u64::MAX - 10);
    assert_eq!(
        invalid_name(far.forward(s, st, &x, &mut y, &mut m)),
        "element_offset"
    );
    assert!(dev.download(&y).unwrap().iter().all(|&v| v == 7.0));
    assert!(dev.download(&m).unwrap().iter().all(|&v| v == 9));

    assert_eq!(invalid_name(McSummaryState::new(&dev, 0, 3)), "batch");
    assert_eq!(invalid_name(McSummaryState::new(&dev, 3, 0)), "classes");
    assert_eq!(invalid_name(McSummaryState::new(&dev, usize::MAX, 2)), "classes");
    // B * C fits usize but not a device buffer's byte count: cudarc's unchecked len * 4 would
    // wrap to a 4-byte allocation of "length" 2^62 + 1 (release) or panic (debug).
    assert_eq!(
        invalid_name(McSummaryState::new(&dev, (1 << 62) + 1, 1)),
        "classes"
    );
    assert_eq!(invalid_name(McOutputs::new(&dev, 1, (1 << 62) + 1)), "classes");
    assert_eq!(invalid_name(dev.zeros::<f32>((1 << 62) + 1)), "len");
    let mut state = McSummaryState::new(&dev, 2, 3).unwrap();
    let mut out = McOutputs::new(&dev, 2, 3).unwrap();
    assert_eq!(invalid_name(state.finish(s, &mut out)), "samples");
    let probs = dev.upload(&[0.5f32; 5]).unwrap();
    assert_eq!(invalid_name(state.push(s, &probs)), "probs");
    let stack = dev.upload(&[0.5f32; 12]).unwrap();
    assert_eq!(invalid_name(state.push_stack(s, &stack, 3)), "probs");
    assert_eq!(invalid_name(state.push_stack(s, &stack, 0)), "samples");
    assert_eq!(invalid_name(summarize(&dev, &stack, 3, 2, 3)), "probs");
    assert_eq!(state.pushed(), 0);
    let c = state.counters(s).unwrap();
    assert_eq!((c.accepted, c.rejected), (0, 0));
    let mut other = McOutputs::new(&dev, 2, 4).unwrap();
    state.push(s, &stack.slice(0..6)).unwrap();
    assert_eq!(invalid_name(state.finish(s, &mut other)), "out");
    // The output buffers are public fields: a replaced one of another length is rejected (the
    // kernel would write B * C and B values past its end), and nothing is written.
    let mut resized = McOutputs::new(&dev, 2, 3).unwrap();
    resized.predictive_entropy = dev.upload(&[7.0f32]).unwrap();
    resized.mutual_information = dev.upload(&[7.0f32; 2]).unwrap();
    assert_eq!(invalid_name(state.finish(s, &mut resized)), "out");
    assert_eq!(dev.download(&resized.mutual_information).unwrap(), [7.0; 2]);
    resized.predictive_entropy = dev.upload(&[7.0f32; 2]).unwrap();
    resized.variance = dev.upload(&[7.0f32; 5]).unwrap();
    assert_eq!(invalid_name(state.finish(s, &mut resized)), "out");
    assert_eq!(dev.download(&resized.variance).unwrap(), [7.0; 5]);
}

// ---- without a GPU ----

#[test]
fn validation_names_without_gpu() {
    assert_eq!(invalid_name(McDropout::new(0.5, 0)), "replicas");
    assert_eq!(invalid_name(McDropout::new(1.5, 2)), "p");
    assert_eq!(invalid_name(McDropout::new(f64::NAN, 2)), "p");
    let mc = McDropout::new(0.25, 4).unwrap();
    assert_eq!((mc.replicas(), mc.masks_words(33)), (4, 8));
}

/// The kernels' `f32` arithmetic, modelled on the CPU in the kernels' order (per-value Welford
/// with single roundings; per-thread ascending sums of `x ln x` over classes `tid + 256 k`, then
/// the block's fixed tree: shuffle-down within each warp, then over the warps' sums), with the
/// CPU's `ln` for `logf`.
struct F32Model {
    classes: usize,
    samples: usize,
    mean: Vec<f32>,
    m2: Vec<f32>,
    expected: Vec<f32>,
}

fn xlogx(v: f32) -> f32 {
    if v > 0.0 {
        v * v.ln()
    } else {
        0.0
    }
}

fn warp_tree(mut v: [f32; 32]) -> f32 {
    let mut s = 16;
    while s > 0 {
        for lane in 0..32 - s {
            v[lane] += v[lane + s];
        }
        s >>= 1;
    }
    v[0]
}

/// `-sum x ln x` of a row in the kernels' order.
fn row_entropy(row: &[f32]) -> f32 {
    let mut per_thread = [0.0f32; 256];
    for (t, h) in per_thread.iter_mut().enumerate() {
        let mut c = t;
        while c < row.len() {
            *h -= xlogx(row[c]);
            c += 256;
        }
    }
    let mut warps = [0.0f32; 32];
    for w in 0..8 {
        warps[w] = warp_tree(per_thread[32 * w..32 * w + 32].try_into().unwrap());
    }
    warp_tree(warps)
}

impl F32Model {
    fn new(batch: usize, classes: usize) -> Self {
        F32Model {
            classes,
            samples: 0,
            mean: vec![0.0; batch * classes],
            m2: vec![0.0; batch * classes],
            expected: vec![0.0; batch],
        }
    }
    fn push(&mut self, probs: &[f32]) {
        self.samples += 1;
        let k = self.samples as f32;
        for (i, &v) in probs.iter().enumerate() {
            let d = v - self.mean[i];
            self.mean[i] += d / k;
            self.m2[i] += d * (v - self.mean[i]);
        }
        for (b, row) in probs.chunks_exact(self.classes).enumerate() {
            let h = row_entropy(row);
            self.expected[b] += (h - self.expected[b]) / k;
        }
    }
    fn finish(&self) -> McStats32 {
        let t = self.samples as f32;
        let predictive: Vec<f32> = self.mean.chunks_exact(self.classes).map(row_entropy).collect();
        McStats32 {
            mean: self.mean.clone(),
            variance: self.m2.iter().map(|&q| q / t).collect(),
            mutual_information: predictive
                .iter()
                .zip(&self.expected)
                .map(|(&h, &e)| (h - e).max(0.0))
                .collect(),
            predictive_entropy: predictive,
            expected_entropy: self.expected.clone(),
        }
    }
}

#[test]
fn f32_model_of_the_kernels_meets_the_tolerance() {
    for (i, &(samples, batch, classes)) in [
        (1usize, 2usize, 1usize),
        (3, 4, 2),
        (16, 8, 10),
        (16, 6, 1000),
        (40, 3, 257),
        (8, 2, 5000),
    ]
    .iter()
    .enumerate()
    {
        let stack = prob_stack(samples, batch, classes, 1000 + i as u64);
        let want = reference::summarize(&stack, samples, batch, classes).unwrap();
        let mut model = F32Model::new(batch, classes);
        for sample in stack.chunks_exact(batch * classes) {
            model.push(sample);
        }
        assert_within(
            &model.finish(),
            &want,
            &format!("model T={samples} B={batch} C={classes}"),
        );
    }
}
