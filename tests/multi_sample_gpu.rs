//! Multi-sample dropout and weighted cross-entropy on the GPU vs the CPU reference:
//! the K masked copies and their masks bit for bit (random n incl. n % 8 != 0, K in 1..=16, p incl.
//! 0 and 1, offsets that wrap), the dh reduction and the averaged logits bit for bit against their
//! f32 formulas, the weighted cross-entropy within the documented per-dtype bounds against the f64
//! reference (random K, B incl. 1, C incl. 1, smoothing, ignored rows incl. all, weights,
//! dtypes, misaligned views), invalid arguments (typed errors, nothing written) and bad labels
//! (nothing written, `check_labels` names the row). Without a GPU every GPU test prints a SKIPPED
//! line; the validation that needs no device runs everywhere.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::{splitmix, uniform_values as values};
use common::guard::{upload_at, MASK_SENTINEL};
use common::{bits, cases, gpu, invalid_name, rel_err_norm, tcerr, widen};
use dropfuse::dropout::mask_words;
use dropfuse::multi_sample::{
    check_labels, masks_len, mean_logits, MultiSample, WeightedCrossEntropy, MAX_K,
};
use dropfuse::reference::dropout as ref_dropout;
use dropfuse::reference::multi_sample::{
    masked_copies, sample_state, weighted_cross_entropy, DEFAULT_IGNORE_INDEX,
};
use dropfuse::{DType, Device, Element, PhiloxState};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const SENTINEL_F32: f32 = 12345.5;

// ---------------------------------------------------------------------------------------------
// Masked copies and masks: bit for bit

#[derive(Debug, Clone)]
struct CopiesCase {
    n: usize,
    k: usize,
    p: f64,
    state: PhiloxState,
    h_off: usize,
    seed: u64,
}

fn copies_case() -> impl Strategy<Value = CopiesCase> {
    let n = prop_oneof![1usize..=40, 40usize..=3000, Just(4096), Just(4099)];
    let p = prop_oneof![Just(0.0), Just(1.0), Just(0.1), Just(0.5), 0.0f64..=1.0];
    let offset = prop_oneof![any::<u64>(), (0u64..16).prop_map(|d| u64::MAX - d)];
    (n, 1usize..=16, p, any::<u64>(), offset, 0usize..5, any::<u64>()).prop_map(
        |(n, k, p, seed, offset, h_off, s)| CopiesCase {
            n,
            k,
            p,
            state: PhiloxState::new(seed, offset),
            h_off,
            seed: s,
        },
    )
}

fn run_copies<T: Element>(dev: &Device, c: &CopiesCase) -> Result<(), TestCaseError> {
    let h: Vec<T> = values(c.n, 4.0, c.seed);
    let want = masked_copies(&h, c.k, c.p, c.state).unwrap();
    let ms = MultiSample::new(c.k, c.p).unwrap();
    let s = dev.stream();
    let hd = upload_at(dev, c.h_off, &h, T::from_f32(7.0), 3)?;
    let hv = hd.slice(c.h_off..c.h_off + c.n);
    let total = c.k * c.n;
    let mut copies = upload_at(dev, 0, &vec![T::from_f32(-3.0); total], T::from_f32(-3.0), 3)?;
    let words = mask_words(c.n);
    let mut masks = upload_at(
        dev,
        0,
        &vec![MASK_SENTINEL; masks_len(c.k, c.n)],
        MASK_SENTINEL,
        3,
    )?;
    {
        let mut cv = copies.slice_mut(0..total);
        let mut mv = masks.slice_mut(0..c.k * words);
        ms.copies_with_masks(s, c.state, &hv, &mut cv, &mut mv)
            .map_err(tcerr)?;
    }
    let got = dev.download(&copies).unwrap();
    let got_masks = dev.download(&masks).unwrap();
    for k in 0..c.k {
        let g = &got[k * c.n..(k + 1) * c.n];
        prop_assert_eq!(bits(g), bits(&want.copies[k]), "copy {} of {:?}", k, c);
        let m = ref_dropout::mask(c.p, sample_state(c.state, k as u64), 0, c.n).unwrap();
        prop_assert_eq!(
            &got_masks[k * words..(k + 1) * words],
            &m[..],
            "mask {} of {:?}",
            k,
            c
        );
        for (e, &kept) in want.keep[k].iter().enumerate() {
            prop_assert_eq!(ref_dropout::mask_bit(&m, e), kept);
        }
    }
    // Guards past the end untouched.
    prop_assert!(got[total..].iter().all(|v| v.to_f32() == -3.0));
    prop_assert!(got_masks[c.k * words..].iter().all(|&w| w == MASK_SENTINEL));
    // The mask-free launch writes the same copies.
    let mut copies2 = dev.zeros::<T>(total).unwrap();
    ms.copies(s, c.state, &hv, &mut copies2).map_err(tcerr)?;
    let got2 = dev.download(&copies2).unwrap();
    prop_assert_eq!(bits(&got2), bits(&got[..total]));
    Ok(())
}

#[test]
fn copies_and_masks_match_reference() {
    let Some(dev) = gpu("copies_and_masks_match_reference") else {
        return;
    };
    let mut runner = TestRunner::new(Config::with_cases(cases(24)));
    runner
        .run(&(copies_case(), 0usize..3), |(c, t)| match t {
            0 => run_copies::<f32>(&dev, &c),
            1 => run_copies::<f16>(&dev, &c),
            _ => run_copies::<bf16>(&dev, &c),
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// dh reduction and averaged logits: bit for bit against their f32 formulas

/// `dh[e] = sum_k keep_k(e) ? g_k[e] * scale : 0` in f32 (product rounded, then added).
fn reduce_model<G: Element, O: Element>(grads: &[G], keep: &[Vec<bool>], scale: f32, n: usize) -> Vec<O> {
    (0..n)
        .map(|e| {
            let mut acc = 0.0f32;
            for (k, kp) in keep.iter().enumerate() {
                if kp[e] {
                    acc += grads[k * n + e].to_f32() * scale;
                }
            }
            O::from_f32(acc)
        })
        .collect()
}

fn run_reduce<G: Element, O: Element>(dev: &Device, c: &CopiesCase) -> Result<(), TestCaseError> {
    let ms = MultiSample::new(c.k, c.p).unwrap();
    let s = dev.stream();
    let h: Vec<f32> = vec![1.0; c.n];
    let samples = masked_copies(&h, c.k, c.p, c.state).unwrap();
    let grads: Vec<G> = values(c.k * c.n, 3.0, c.seed ^ 0x5eed);
    let want: Vec<O> = reduce_model(&grads, &samples.keep, ms.scale(), c.n);

    // Masks from the copies kernel.
    let hd = dev.upload(&h).unwrap();
    let mut copies = dev.zeros::<f32>(c.k * c.n).unwrap();
    let mut masks = dev.zeros::<u32>(masks_len(c.k, c.n)).unwrap();
    ms.copies_with_masks(s, c.state, &hd, &mut copies, &mut masks)
        .map_err(tcerr)?;

    let gd = upload_at(dev, c.h_off, &grads, G::from_f32(9.0), 3)?;
    let gv = gd.slice(c.h_off..c.h_off + c.k * c.n);
    let mut dh = upload_at(dev, 0, &vec![O::from_f32(5.0); c.n], O::from_f32(5.0), 3)?;
    {
        let mut dv = dh.slice_mut(0..c.n);
        ms.reduce(s, &masks, &gv, &mut dv).map_err(tcerr)?;
    }
    let got = dev.download(&dh).unwrap();
    prop_assert_eq!(bits(&got[..c.n]), bits(&want), "stored masks {:?}", c);
    prop_assert!(got[c.n..].iter().all(|v| v.to_f32() == 5.0));

    let mut dh2 = dev.zeros::<O>(c.n).unwrap();
    ms.reduce_maskless(s, c.state, &gv, &mut dh2).map_err(tcerr)?;
    prop_assert_eq!(
        bits(&dev.download(&dh2).unwrap()),
        bits(&want),
        "regenerated masks {:?}",
        c
    );
    Ok(())
}

#[test]
fn reduce_matches_f32_formula() {
    let Some(dev) = gpu("reduce_matches_f32_formula") else {
        return;
    };
    let mut runner = TestRunner::new(Config::with_cases(cases(24)));
    runner
        .run(&(copies_case(), 0usize..6), |(c, t)| match t {
            0 => run_reduce::<f32, f32>(&dev, &c),
            1 => run_reduce::<f32, f16>(&dev, &c),
            2 => run_reduce::<f16, f16>(&dev, &c),
            3 => run_reduce::<bf16, f32>(&dev, &c),
            4 => run_reduce::<f32, bf16>(&dev, &c),
            _ => run_reduce::<bf16, bf16>(&dev, &c),
        })
        .unwrap();
}

fn run_mean<T: Element, O: Element>(dev: &Device, k: usize, n: usize, seed: u64) {
    let z: Vec<T> = values(k * n, 10.0, seed);
    let inv = (1.0 / k as f64) as f32;
    let want: Vec<O> = (0..n)
        .map(|e| {
            let mut acc = 0.0f32;
            for s in 0..k {
                acc += z[s * n + e].to_f32();
            }
            O::from_f32(acc * inv)
        })
        .collect();
    let zd = dev.upload(&z).unwrap();
    let mut md = dev.zeros::<O>(n).unwrap();
    mean_logits(dev.stream(), k, &zd, &mut md).unwrap();
    assert_eq!(bits(&dev.download(&md).unwrap()), bits(&want), "k {k} n {n}");
}

#[test]
fn mean_logits_matches_f32_formula() {
    let Some(dev) = gpu("mean_logits_matches_f32_formula") else {
        return;
    };
    for (k, n, seed) in [(1, 1, 1u64), (3, 7, 2), (8, 1000, 3), (16, 4099, 4), (5, 8, 5)] {
        run_mean::<f32, f32>(&dev, k, n, seed);
        run_mean::<f16, f16>(&dev, k, n, seed);
        run_mean::<bf16, f32>(&dev, k, n, seed);
    }
}

/// The copies, the dh reduction and the averaged logits written into output views that break
/// 16-byte alignment while every input is aligned and n is a multiple of 8: the launchers must
/// take the scalar paths (the other tests misalign only the inputs), bit for bit the reference,
/// guards untouched.
fn misaligned_outputs<T: Element>(dev: &Device, off: usize) {
    let (k, n, p) = (3usize, 64usize, 0.3);
    let state = PhiloxState::new(11 + off as u64, 5);
    let ms = MultiSample::new(k, p).unwrap();
    let s = dev.stream();
    let fill = T::from_f32(-3.0);
    let guards_kept = |got: &[T], len: usize| {
        got[..off]
            .iter()
            .chain(&got[off + len..])
            .all(|v| v.to_f32() == -3.0)
    };

    let h: Vec<T> = values(n, 4.0, off as u64);
    let want = masked_copies(&h, k, p, state).unwrap();
    let hd = dev.upload(&h).unwrap();
    let mut cd = upload_at(dev, off, &vec![fill; k * n], fill, 3).unwrap();
    ms.copies(s, state, &hd, &mut cd.slice_mut(off..off + k * n))
        .unwrap();
    let got = dev.download(&cd).unwrap();
    for (i, w) in want.copies.iter().enumerate() {
        let g = &got[off + i * n..off + (i + 1) * n];
        assert_eq!(bits(g), bits(w), "copy {i} at offset {off}");
    }
    assert!(guards_kept(&got[..], k * n), "copies: guards written");

    let grads: Vec<T> = values(k * n, 3.0, 77 + off as u64);
    let gd = dev.upload(&grads).unwrap();
    let want_dh: Vec<T> = reduce_model(&grads, &want.keep, ms.scale(), n);
    let mut dd = upload_at(dev, off, &vec![fill; n], fill, 3).unwrap();
    ms.reduce_maskless(s, state, &gd, &mut dd.slice_mut(off..off + n))
        .unwrap();
    let got = dev.download(&dd).unwrap();
    assert_eq!(bits(&got[off..off + n]), bits(&want_dh), "dh at offset {off}");
    assert!(guards_kept(&got[..], n), "dh: guards written");

    let inv = (1.0 / k as f64) as f32;
    let want_mean: Vec<T> = (0..n)
        .map(|e| T::from_f32((0..k).fold(0.0f32, |a, i| a + grads[i * n + e].to_f32()) * inv))
        .collect();
    let mut md = upload_at(dev, off, &vec![fill; n], fill, 3).unwrap();
    mean_logits(s, k, &gd, &mut md.slice_mut(off..off + n)).unwrap();
    let got = dev.download(&md).unwrap();
    assert_eq!(bits(&got[off..off + n]), bits(&want_mean), "mean at offset {off}");
    assert!(guards_kept(&got[..], n), "mean: guards written");
}

#[test]
fn misaligned_outputs_match_reference() {
    let Some(dev) = gpu("misaligned_outputs_match_reference") else {
        return;
    };
    for off in 1..4 {
        misaligned_outputs::<f32>(&dev, off);
        misaligned_outputs::<f16>(&dev, off);
        misaligned_outputs::<bf16>(&dev, off);
    }
}

// ---------------------------------------------------------------------------------------------
// Weighted cross-entropy vs the f64 reference

/// The documented bounds: loss within LOSS_TOL * max(1, |loss|) for every dtype; gradient relative
/// error norm within GRAD_TOL_F32 (f32 gradient) or GRAD_TOL_16 (f16/bf16 gradient).
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL_F32: f64 = 1e-5;
const GRAD_TOL_16: f64 = 1e-2;

#[derive(Debug, Clone)]
struct CeCase {
    k: usize,
    b: usize,
    c: usize,
    eps: f64,
    /// 0: no row ignored, 1: some, 2: all.
    ignore: u8,
    uniform: bool,
    ignore_index: i64,
    z_off: usize,
    seed: u64,
    /// `with_grad_scale`: 1 (the default) in about a third of the cases, else a power of two up
    /// to 2^15 or any value in [1, 300] (so that an f16 gradient, at most `w_k / n_valid <= 1`
    /// in magnitude before the scale, cannot overflow).
    grad_scale: f32,
}

fn ce_case() -> impl Strategy<Value = CeCase> {
    let c = prop_oneof![Just(1usize), 2usize..=40, 40usize..=400, Just(1000), Just(1001)];
    let b = prop_oneof![Just(1usize), 1usize..=48];
    let eps = prop_oneof![Just(0.0), Just(0.1), Just(1.0), 0.0f64..=1.0];
    let ignore = prop_oneof![3 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)];
    let ignore_index = prop_oneof![Just(DEFAULT_IGNORE_INDEX), Just(0i64), Just(-1i64)];
    let grad_scale = prop_oneof![
        2 => Just(1.0f32),
        2 => (1i32..=15).prop_map(|e| 2f32.powi(e)),
        2 => 1.0f32..=300.0,
    ];
    (
        1usize..=16,
        b,
        c,
        eps,
        ignore,
        any::<bool>(),
        ignore_index,
        0usize..5,
        any::<u64>(),
        grad_scale,
    )
        .prop_map(
            |(k, b, c, eps, ignore, uniform, ignore_index, z_off, seed, grad_scale)| CeCase {
                k,
                b,
                c,
                eps,
                ignore,
                uniform,
                ignore_index,
                z_off,
                seed,
                grad_scale,
            },
        )
}

fn ce_inputs(c: &CeCase) -> (Vec<f64>, Vec<i64>) {
    let mut s = c.seed;
    let weights = if c.uniform {
        vec![1.0 / c.k as f64; c.k]
    } else {
        let raw: Vec<f64> = (0..c.k).map(|_| (splitmix(&mut s) % 1000) as f64 + 1.0).collect();
        let sum: f64 = raw.iter().sum();
        raw.iter().map(|w| w / sum).collect()
    };
    let labels = (0..c.b)
        .map(|_| {
            let r = splitmix(&mut s);
            let ignored = match c.ignore {
                0 => false,
                1 => r % 3 == 0,
                _ => true,
            };
            if ignored {
                c.ignore_index
            } else {
                // A class other than the ignore index (which may be a class: 0).
                let y = ((r >> 8) % c.c as u64) as i64;
                if y == c.ignore_index {
                    if c.c > 1 {
                        (y + 1) % c.c as i64
                    } else {
                        c.ignore_index
                    }
                } else {
                    y
                }
            }
        })
        .collect();
    (weights, labels)
}

fn run_ce<T: Element, G: Element>(dev: &Device, c: &CeCase) -> Result<(), TestCaseError> {
    let (weights, labels) = ce_inputs(c);
    let n = c.k * c.b * c.c;
    let z: Vec<T> = values(n, 8.0, c.seed ^ 0xce);
    let (want_loss, want_dz) = weighted_cross_entropy(
        &widen(&z),
        c.k,
        c.b,
        c.c,
        &weights,
        &labels,
        c.ignore_index,
        c.eps,
    )
    .unwrap();
    // with_grad_scale multiplies the gradient (its f32 coefficient `w_k / n_valid` rounded, then
    // times the scale, rounded again: 2^-24 relative, far inside the bounds) and not the loss.
    let want_dz: Vec<f64> = want_dz.iter().map(|v| v * f64::from(c.grad_scale)).collect();
    let ce = WeightedCrossEntropy::new(&weights)
        .unwrap()
        .with_label_smoothing(c.eps)
        .unwrap()
        .with_ignore_index(c.ignore_index)
        .with_grad_scale(c.grad_scale)
        .unwrap();
    let s = dev.stream();
    let zd = upload_at(dev, c.z_off, &z, T::from_f32(1e4), 3)?;
    let zv = zd.slice(c.z_off..c.z_off + n);
    let ld = dev.upload(&labels).unwrap();
    let mut loss = dev.upload(&[SENTINEL_F32]).unwrap();
    let mut dz = upload_at(dev, c.z_off, &vec![G::from_f32(-7.0); n], G::from_f32(-7.0), 3)?;
    let mut scratch = dev
        .zeros::<u64>(WeightedCrossEntropy::scratch_len(c.k, c.b))
        .unwrap();
    {
        let mut dv = dz.slice_mut(c.z_off..c.z_off + n);
        ce.forward(s, &zv, c.b, c.c, &ld, &mut loss, &mut dv, &mut scratch)
            .map_err(tcerr)?;
    }
    let n_valid = check_labels(s, &scratch, c.c, c.ignore_index).map_err(tcerr)?;
    prop_assert_eq!(
        n_valid as usize,
        labels.iter().filter(|&&y| y != c.ignore_index).count()
    );
    let got_loss = f64::from(dev.download(&loss).unwrap()[0]);
    prop_assert!(
        (got_loss - want_loss).abs() <= LOSS_TOL * want_loss.abs().max(1.0),
        "loss {} vs {} in {:?}",
        got_loss,
        want_loss,
        c
    );
    let got = dev.download(&dz).unwrap();
    let got_dz = widen(&got[c.z_off..c.z_off + n]);
    let tol = if G::DTYPE == DType::F32 {
        GRAD_TOL_F32
    } else {
        GRAD_TOL_16
    };
    if n_valid == 0 {
        prop_assert!(
            got_loss == 0.0 && got_dz.iter().all(|&v| v == 0.0),
            "all ignored: zeros"
        );
    } else {
        let err = rel_err_norm(&got_dz, &want_dz);
        prop_assert!(err <= tol, "dz relative error {} > {} in {:?}", err, tol, c);
    }
    // Ignored rows exactly 0; guards untouched.
    for s_ in 0..c.k {
        for (i, &y) in labels.iter().enumerate() {
            if y == c.ignore_index {
                let base = (s_ * c.b + i) * c.c;
                prop_assert!(got_dz[base..base + c.c].iter().all(|&v| v == 0.0));
            }
        }
    }
    prop_assert!(got[..c.z_off]
        .iter()
        .chain(&got[c.z_off + n..])
        .all(|v| v.to_f32() == -7.0));

    // The loss-only launch gives the same loss.
    let mut loss2 = dev.zeros::<f32>(1).unwrap();
    ce.loss(s, &zv, c.b, c.c, &ld, &mut loss2, &mut scratch)
        .map_err(tcerr)?;
    prop_assert_eq!(
        dev.download(&loss2).unwrap()[0].to_bits(),
        (got_loss as f32).to_bits()
    );
    Ok(())
}

#[test]
fn weighted_cross_entropy_matches_reference() {
    let Some(dev) = gpu("weighted_cross_entropy_matches_reference") else {
        return;
    };
    let mut runner = TestRunner::new(Config::with_cases(cases(24)));
    runner
        .run(&(ce_case(), 0usize..6), |(c, t)| match t {
            0 => run_ce::<f32, f32>(&dev, &c),
            1 => run_ce::<f16, f16>(&dev, &c),
            2 => run_ce::<f16, f32>(&dev, &c),
            3 => run_ce::<bf16, bf16>(&dev, &c),
            4 => run_ce::<bf16, f32>(&dev, &c),
            _ => run_ce::<f32, f32>(&dev, &CeCase { c: 1000, ..c }),
        })
        .unwrap();
}

#[test]
fn weighted_cross_entropy_benchmark_shape() {
    let Some(dev) = gpu("weighted_cross_entropy_benchmark_shape") else {
        return;
    };
    let c = CeCase {
        k: 8,
        b: 1024,
        c: 1000,
        eps: 0.1,
        ignore: 1,
        uniform: true,
        ignore_index: DEFAULT_IGNORE_INDEX,
        z_off: 0,
        seed: 42,
        grad_scale: 1.0,
    };
    run_ce::<f16, f16>(&dev, &c).unwrap();
    run_ce::<bf16, f32>(&dev, &c).unwrap();
}

/// `with_grad_scale(2^e)` multiplies every f32 gradient element by exactly `2^e` (the coefficient
/// `w_k / n_valid` is rounded to f32 first, then scaled: a power of two adds no rounding) and
/// leaves the loss's bits alone; `2^e` is checked both ways (e = 5, 13, -6) so that a kernel
/// ignoring the scale, squaring it or applying it to the loss fails. A scale that is not a power
/// of two (3) rounds the coefficient once more: within 2^-23 relative of the unscaled gradient
/// times 3.
#[test]
fn weighted_cross_entropy_grad_scale_is_exact() {
    let Some(dev) = gpu("weighted_cross_entropy_grad_scale_is_exact") else {
        return;
    };
    let (k, b, c) = (3, 7, 64);
    let z: Vec<f32> = values(k * b * c, 8.0, 31);
    let labels: Vec<i64> = (0..b as i64)
        .map(|i| {
            if i == 4 {
                DEFAULT_IGNORE_INDEX
            } else {
                (i * 11) % c as i64
            }
        })
        .collect();
    let s = dev.stream();
    let zd = dev.upload(&z).unwrap();
    let ld = dev.upload(&labels).unwrap();
    let run = |scale: f32| {
        let ce = WeightedCrossEntropy::new(&[0.5, 0.25, 0.25])
            .unwrap()
            .with_label_smoothing(0.1)
            .unwrap()
            .with_grad_scale(scale)
            .unwrap();
        assert_eq!(ce.grad_scale(), scale);
        let mut loss = dev.zeros::<f32>(1).unwrap();
        let mut dz = dev.zeros::<f32>(k * b * c).unwrap();
        let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b)).unwrap();
        ce.forward(s, &zd, b, c, &ld, &mut loss, &mut dz, &mut scratch)
            .unwrap();
        (dev.download(&loss).unwrap()[0], dev.download(&dz).unwrap())
    };
    let (loss1, dz1) = run(1.0);
    assert!(dz1.iter().any(|&v| v != 0.0));
    for e in [5, 13, -6] {
        let scale = 2f32.powi(e);
        let (loss, dz) = run(scale);
        assert_eq!(
            loss.to_bits(),
            loss1.to_bits(),
            "grad scale 2^{e} changed the loss"
        );
        for (i, (&g, &g1)) in dz.iter().zip(&dz1).enumerate() {
            assert_eq!(
                g.to_bits(),
                (g1 * scale).to_bits(),
                "grad scale 2^{e}: dz[{i}] = {g:e}, want {:e}",
                g1 * scale
            );
        }
    }
    let (loss, dz) = run(3.0);
    assert_eq!(loss.to_bits(), loss1.to_bits(), "grad scale 3 changed the loss");
    for (i, (&g, &g1)) in dz.iter().zip(&dz1).enumerate() {
        let want = 3.0 * f64::from(g1);
        assert!(
            (f64::from(g) - want).abs() <= 2f64.powi(-23) * want.abs(),
            "grad scale 3: dz[{i}] = {g:e}, want {want:e}"
        );
    }
}

/// The f32 gradient `ce.forward` writes for logits `z` (`K x B x C`, `K` = `ce`'s) and `labels`.
fn ce_f32_gradient<T: Element>(
    dev: &Device,
    ce: &WeightedCrossEntropy,
    z: &[T],
    labels: &[i64],
    c: usize,
) -> Vec<f32> {
    let b = labels.len();
    let k = z.len() / (b * c);
    let zd = dev.upload(z).unwrap();
    let ld = dev.upload(labels).unwrap();
    let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b)).unwrap();
    let mut loss = dev.zeros::<f32>(1).unwrap();
    let mut dz = dev.zeros::<f32>(z.len()).unwrap();
    ce.forward(dev.stream(), &zd, b, c, &ld, &mut loss, &mut dz, &mut scratch)
        .unwrap();
    dev.download(&dz).unwrap()
}

/// Confidently classified rows (the label's logit 4 to 20 above the others, no smoothing): every
/// f32 gradient element within 1e-5 of its own magnitude, the label's `p_y - 1` included, which
/// `exp(z_y - lse) - 1` gets wrong by up to 100% there (the host emulation shows it).
fn run_ce_confident<T: Element>(dev: &Device, k: usize, b: usize, c: usize, gap: f32, seed: u64) {
    let mut state = seed;
    let labels: Vec<i64> = (0..b).map(|_| (splitmix(&mut state) % c as u64) as i64).collect();
    let noise: Vec<f32> = values(k * b * c, 1.0, seed);
    let z: Vec<T> = (0..k * b * c)
        .map(|e| {
            let (row, cls) = (e / c, e % c);
            let top = 6.0 + 4.0 * noise[row * c];
            let v = if cls as i64 == labels[row % b] {
                top
            } else {
                top - gap - 2.0 * (noise[e] + 1.0)
            };
            T::from_f32(v)
        })
        .collect();
    let weights = vec![1.0 / k as f64; k];
    let (_, want) =
        weighted_cross_entropy(&widen(&z), k, b, c, &weights, &labels, DEFAULT_IGNORE_INDEX, 0.0).unwrap();
    let got = ce_f32_gradient(dev, &WeightedCrossEntropy::uniform(k).unwrap(), &z, &labels, c);
    for (e, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= 1e-5 * w.abs(),
            "{} K {k} B {b} C {c} gap {gap}: dz[{e}] = {g:e}, want {w:e}",
            T::DTYPE
        );
    }
}

#[test]
fn weighted_cross_entropy_confident_rows() {
    let Some(dev) = gpu("weighted_cross_entropy_confident_rows") else {
        return;
    };
    for (i, gap) in [4.0f32, 9.0, 12.0, 16.0, 20.0].into_iter().enumerate() {
        let seed = 77 + i as u64;
        run_ce_confident::<f32>(&dev, 2, 9, 2, gap, seed);
        run_ce_confident::<f32>(&dev, 1, 5, 64, gap, seed);
        run_ce_confident::<f16>(&dev, 1, 4, 37, gap, seed);
        run_ce_confident::<bf16>(&dev, 2, 3, 1000, gap, seed);
    }
}

/// Rows at and near the label-smoothed optimum (`softmax = t`: the label's logit `ln(t_on / t_off)`
/// above the others, plus `delta`), where `dz = p - t` is a cancellation: the documented bound is
/// the relative error norm plus, per element, the rounding of `p` that does not shrink with
/// `p - t`, `(|lse| + |z_c - lse| + C / 16 + 16) 2^-24 (w_k / n_valid) (p_c + t_c)` (the label's
/// element with `1 - p_y` for `p_y`). The plain relative norm fails there: on the host emulation of
/// these cases (f32 logits, C up to 50000) relative error norms up to 65 at `delta = 0`, where
/// `||ref||` is of the order of the logits' rounding, and at most 1/64 of this bound.
fn run_ce_smoothed_optimum(dev: &Device, k: usize, b: usize, c: usize, eps: f64, delta: f64, seed: u64) {
    let mut state = seed;
    let labels: Vec<i64> = (0..b).map(|_| (splitmix(&mut state) % c as u64) as i64).collect();
    let (t_on, t_off) = (1.0 - eps * (c - 1) as f64 / c as f64, eps / c as f64);
    let gap = (t_on / t_off).ln() + delta;
    let mut z = Vec::with_capacity(k * b * c);
    for row in 0..k * b {
        let y = labels[row % b] as usize;
        let top = (splitmix(&mut state) % 9) as f64 - 4.0;
        z.extend((0..c).map(|cls| (if cls == y { top + gap } else { top }) as f32));
    }
    let weights = vec![1.0 / k as f64; k];
    let zw = widen(&z);
    let (_, want) =
        weighted_cross_entropy(&zw, k, b, c, &weights, &labels, DEFAULT_IGNORE_INDEX, eps).unwrap();
    let ce = WeightedCrossEntropy::uniform(k)
        .unwrap()
        .with_label_smoothing(eps)
        .unwrap();
    let got = ce_f32_gradient(dev, &ce, &z, &labels, c);
    let u = 1.0 / 16_777_216.0;
    let coef = 1.0 / (k * b) as f64;
    let mut slack = vec![0.0f64; k * b * c];
    for (row, zr) in zw.chunks(c).enumerate() {
        let y = labels[row % b] as usize;
        let m = zr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + zr.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let gamma = |x: f64| (lse.abs() + (x - lse).abs() + c as f64 / 16.0 + 16.0) * u * coef;
        let p = |x: f64| (x - lse).exp();
        let others: f64 = (0..c).filter(|&j| j != y).map(|j| p(zr[j])).sum();
        let worst = zr.iter().map(|&v| gamma(v)).fold(0.0, f64::max);
        for j in 0..c {
            slack[row * c + j] = if j == y {
                worst * (others + t_on)
            } else {
                gamma(zr[j]) * (p(zr[j]) + t_off)
            };
        }
    }
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let err = norm(&mut got.iter().zip(&want).map(|(&g, &w)| f64::from(g) - w));
    let bound = 1e-5 * norm(&mut want.iter().copied()) + norm(&mut slack.iter().copied());
    assert!(
        err <= bound,
        "K {k} B {b} C {c} eps {eps} delta {delta}: error norm {err:e} > {bound:e}"
    );
}

#[test]
fn weighted_cross_entropy_smoothed_optimum() {
    let Some(dev) = gpu("weighted_cross_entropy_smoothed_optimum") else {
        return;
    };
    for (i, delta) in [0.0, 1e-4, 1e-2, -1e-2].into_iter().enumerate() {
        let seed = 5 + i as u64;
        run_ce_smoothed_optimum(&dev, 2, 9, 10, 0.1, delta, seed);
        run_ce_smoothed_optimum(&dev, 1, 5, 64, 0.1, delta, seed);
        run_ce_smoothed_optimum(&dev, 1, 4, 2, 0.2, delta, seed);
        run_ce_smoothed_optimum(&dev, 2, 3, 1000, 0.05, delta, seed);
    }
}

/// The loss and the gradient do not depend on where the gradient goes: loss only, an aligned
/// gradient and one a single element off a 16-byte boundary give the same bits (the chunked
/// arithmetic is chosen by C alone; it used to need the gradient aligned too).
fn run_ce_alignment<T: Element, G: Element>(dev: &Device, k: usize, b: usize, c: usize) {
    let s = dev.stream();
    let z: Vec<T> = values(k * b * c, 8.0, 21);
    let labels: Vec<i64> = (0..b as i64)
        .map(|i| {
            if i % 5 == 3 {
                DEFAULT_IGNORE_INDEX
            } else {
                (i * 7) % c as i64
            }
        })
        .collect();
    let ce = WeightedCrossEntropy::uniform(k)
        .unwrap()
        .with_label_smoothing(0.1)
        .unwrap();
    let zd = dev.upload(&z).unwrap();
    let ld = dev.upload(&labels).unwrap();
    let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b)).unwrap();
    let mut loss = dev.zeros::<f32>(1).unwrap();
    ce.loss(s, &zd, b, c, &ld, &mut loss, &mut scratch).unwrap();
    let loss_only = dev.download(&loss).unwrap()[0].to_bits();
    let mut runs = Vec::new();
    for off in [0usize, 1] {
        let mut dz = dev.zeros::<G>(k * b * c + 1).unwrap();
        let mut loss = dev.zeros::<f32>(1).unwrap();
        {
            let mut dv = dz.slice_mut(off..off + k * b * c);
            ce.forward(s, &zd, b, c, &ld, &mut loss, &mut dv, &mut scratch)
                .unwrap();
        }
        let g = dev.download(&dz).unwrap();
        runs.push((
            dev.download(&loss).unwrap()[0].to_bits(),
            bits(&g[off..off + k * b * c]),
        ));
    }
    let what = format!("{} -> {}, K {k} B {b} C {c}", T::DTYPE, G::DTYPE);
    assert_eq!(
        runs[0].0, loss_only,
        "loss with an aligned gradient vs loss only, {what}"
    );
    assert_eq!(
        runs[1].0, loss_only,
        "loss with a misaligned gradient vs loss only, {what}"
    );
    assert!(
        runs[0].1 == runs[1].1,
        "gradient bits depend on its alignment, {what}"
    );
}

#[test]
fn weighted_cross_entropy_does_not_depend_on_gradient_alignment() {
    let Some(dev) = gpu("weighted_cross_entropy_does_not_depend_on_gradient_alignment") else {
        return;
    };
    run_ce_alignment::<f32, f32>(&dev, 2, 33, 64);
    run_ce_alignment::<f16, f16>(&dev, 3, 17, 200);
    run_ce_alignment::<f32, bf16>(&dev, 1, 9, 1000);
    run_ce_alignment::<bf16, f32>(&dev, 2, 5, 37);
}

#[test]
fn weighted_cross_entropy_is_deterministic() {
    let Some(dev) = gpu("weighted_cross_entropy_is_deterministic") else {
        return;
    };
    let (k, b, c) = (8, 1024, 1000);
    let z: Vec<f16> = values(k * b * c, 8.0, 9);
    let labels: Vec<i64> = (0..b as i64).map(|i| (i * 7) % c as i64).collect();
    let ce = WeightedCrossEntropy::uniform(k).unwrap();
    let s = dev.stream();
    let zd = dev.upload(&z).unwrap();
    let ld = dev.upload(&labels).unwrap();
    let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b)).unwrap();
    let mut first = None;
    for _ in 0..5 {
        let mut loss = dev.zeros::<f32>(1).unwrap();
        let mut dz = dev.zeros::<f16>(k * b * c).unwrap();
        ce.forward(s, &zd, b, c, &ld, &mut loss, &mut dz, &mut scratch)
            .unwrap();
        let got = (
            dev.download(&loss).unwrap()[0].to_bits(),
            bits(&dev.download(&dz).unwrap()),
        );
        match &first {
            None => first = Some(got),
            Some(f) => assert!(*f == got, "run-to-run difference"),
        }
    }
}

#[test]
fn bad_labels_write_nothing() {
    let Some(dev) = gpu("bad_labels_write_nothing") else {
        return;
    };
    let (k, b, c) = (3, 5, 7);
    let s = dev.stream();
    let z: Vec<f32> = values(k * b * c, 2.0, 3);
    let zd = dev.upload(&z).unwrap();
    let ce = WeightedCrossEntropy::uniform(k).unwrap();
    for (bad_row, bad) in [(2usize, 7i64), (0, -1), (4, i64::MAX), (3, i64::MIN)] {
        let mut labels = vec![1i64, DEFAULT_IGNORE_INDEX, 6, 0, 2];
        labels[bad_row] = bad;
        let ld = dev.upload(&labels).unwrap();
        let mut loss = dev.upload(&[SENTINEL_F32]).unwrap();
        let mut dz = dev.upload(&vec![SENTINEL_F32; k * b * c]).unwrap();
        let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b)).unwrap();
        ce.forward(s, &zd, b, c, &ld, &mut loss, &mut dz, &mut scratch)
            .unwrap();
        let err = check_labels(s, &scratch, c, DEFAULT_IGNORE_INDEX);
        assert_eq!(invalid_name(err.clone()), "labels");
        assert!(err.unwrap_err().to_string().contains(&format!("row {bad_row}")));
        assert_eq!(dev.download(&loss).unwrap(), vec![SENTINEL_F32]);
        assert!(dev.download(&dz).unwrap().iter().all(|&v| v == SENTINEL_F32));
        // The reference rejects the same labels with the same name.
        let wz: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
        let w = vec![1.0 / k as f64; k];
        assert_eq!(
            invalid_name(weighted_cross_entropy(
                &wz,
                k,
                b,
                c,
                &w,
                &labels,
                DEFAULT_IGNORE_INDEX,
                0.0
            )),
            "labels"
        );
    }
}

#[test]
fn invalid_arguments_write_nothing() {
    let Some(dev) = gpu("invalid_arguments_write_nothing") else {
        return;
    };
    let s = dev.stream();
    let (k, b, c) = (2, 3, 4);
    let n = k * b * c;
    let z = dev.upload(&vec![0.5f32; n]).unwrap();
    let z16 = dev.upload(&vec![f16::from_f32(0.5); n]).unwrap();
    let labels = dev.upload(&[0i64, 1, 2]).unwrap();
    let mut loss = dev.upload(&[SENTINEL_F32]).unwrap();
    let mut dz = dev.upload(&vec![SENTINEL_F32; n]).unwrap();
    let mut dz_bf = dev.zeros::<bf16>(n).unwrap();
    let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b)).unwrap();
    let ce = WeightedCrossEntropy::uniform(k).unwrap();
    let short = dev.upload(&vec![0.5f32; n - 1]).unwrap();
    assert_eq!(
        invalid_name(ce.forward(s, &short, b, c, &labels, &mut loss, &mut dz, &mut scratch)),
        "logits"
    );
    assert_eq!(
        invalid_name(ce.forward(s, &z, 0, c, &labels, &mut loss, &mut dz, &mut scratch)),
        "logits"
    );
    assert_eq!(
        invalid_name(ce.forward(s, &z, b, 0, &labels, &mut loss, &mut dz, &mut scratch)),
        "logits"
    );
    let l2 = dev.upload(&[0i64, 1]).unwrap();
    assert_eq!(
        invalid_name(ce.forward(s, &z, b, c, &l2, &mut loss, &mut dz, &mut scratch)),
        "labels"
    );
    let mut dz_short = dev.zeros::<f32>(n - 1).unwrap();
    assert_eq!(
        invalid_name(ce.forward(s, &z, b, c, &labels, &mut loss, &mut dz_short, &mut scratch)),
        "grad"
    );
    assert_eq!(
        invalid_name(ce.forward(s, &z16, b, c, &labels, &mut loss, &mut dz_bf, &mut scratch)),
        "grad"
    );
    let mut small = dev.zeros::<u64>(2).unwrap();
    assert_eq!(
        invalid_name(ce.forward(s, &z, b, c, &labels, &mut loss, &mut dz, &mut small)),
        "scratch"
    );
    let mut loss2 = dev.zeros::<f32>(2).unwrap();
    assert_eq!(
        invalid_name(ce.forward(s, &z, b, c, &labels, &mut loss2, &mut dz, &mut scratch)),
        "loss"
    );
    assert_eq!(dev.download(&loss).unwrap(), vec![SENTINEL_F32]);
    assert!(dev.download(&dz).unwrap().iter().all(|&v| v == SENTINEL_F32));

    let ms = MultiSample::new(k, 0.5).unwrap();
    let h = dev.upload(&[1.0f32; 10]).unwrap();
    let mut copies = dev.upload(&vec![SENTINEL_F32; k * 10]).unwrap();
    let masks = dev.upload(&vec![MASK_SENTINEL; masks_len(k, 10)]).unwrap();
    let st = PhiloxState::new(1, 2);
    let mut short_copies = dev.zeros::<f32>(k * 10 - 1).unwrap();
    assert_eq!(invalid_name(ms.copies(s, st, &h, &mut short_copies)), "copies");
    let mut short_masks = dev.zeros::<u32>(masks_len(k, 10) + 1).unwrap();
    assert_eq!(
        invalid_name(ms.copies_with_masks(s, st, &h, &mut copies, &mut short_masks)),
        "masks"
    );
    let empty = dev.zeros::<f32>(1).unwrap();
    assert_eq!(
        invalid_name(ms.copies(s, st, &empty.slice(0..0), &mut copies)),
        "h"
    );
    assert!(dev.download(&copies).unwrap().iter().all(|&v| v == SENTINEL_F32));
    assert!(dev.download(&masks).unwrap().iter().all(|&v| v == MASK_SENTINEL));

    let mut dh = dev.upload(&[SENTINEL_F32; 10]).unwrap();
    let grads = dev.zeros::<f32>(k * 10 + 1).unwrap();
    assert_eq!(invalid_name(ms.reduce(s, &masks, &grads, &mut dh)), "grads");
    assert_eq!(invalid_name(ms.reduce_maskless(s, st, &grads, &mut dh)), "grads");
    let grads = dev.zeros::<f32>(k * 10).unwrap();
    assert_eq!(invalid_name(ms.reduce(s, &short_masks, &grads, &mut dh)), "masks");
    assert!(dev.download(&dh).unwrap().iter().all(|&v| v == SENTINEL_F32));
    let mut mean = dev.upload(&[SENTINEL_F32; 10]).unwrap();
    assert_eq!(
        invalid_name(mean_logits(s, k, &grads.slice(0..k * 10 - 1), &mut mean)),
        "logits"
    );
    assert_eq!(invalid_name(mean_logits(s, 0, &grads, &mut mean)), "k");
    let mut mean16 = dev.zeros::<f16>(10).unwrap();
    let gb = dev.zeros::<bf16>(k * 10).unwrap();
    assert_eq!(invalid_name(mean_logits(s, k, &gb, &mut mean16)), "mean");
    assert!(dev.download(&mean).unwrap().iter().all(|&v| v == SENTINEL_F32));
}

/// Over 2^32 elements in the copies (K = 2 samples of n = 2^31 + 13 f16 elements: 6 GiB of copies),
/// spot-checked against the reference words at the ends and around element 2^31 of each sample.
#[test]
fn copies_and_reduce_huge() {
    let Some(dev) = gpu("copies_and_reduce_huge") else {
        return;
    };
    let (k, n) = (2usize, (1usize << 31) + 13);
    let ms = MultiSample::new(k, 0.25).unwrap();
    let st = PhiloxState::new(0xabc, u64::MAX);
    let h = dev.upload(&vec![f16::from_f32(1.5); n]).unwrap();
    let mut copies = dev.zeros::<f16>(k * n).unwrap();
    let mut masks = dev.zeros::<u32>(masks_len(k, n)).unwrap();
    ms.copies_with_masks(dev.stream(), st, &h, &mut copies, &mut masks)
        .unwrap();
    let mut dh = dev.zeros::<f32>(n).unwrap();
    ms.reduce(dev.stream(), &masks, &copies, &mut dh).unwrap();
    let got_copies = dev.download(&copies).unwrap();
    let got_dh = dev.download(&dh).unwrap();
    let threshold = ref_dropout::drop_threshold(0.25).unwrap();
    let scale = ms.scale();
    let kept_value = f16::from_f32(1.5 * scale);
    let spots: Vec<usize> = (0..40).chain((1usize << 31) - 20..n).collect();
    for &e in &spots {
        let mut want_dh = 0.0f32;
        for s in 0..k {
            let kept = ref_dropout::keep(sample_state(st, s as u64), e as u64, threshold);
            let want = if kept { kept_value } else { f16::from_f32(0.0) };
            assert_eq!(
                got_copies[s * n + e].to_bits(),
                want.to_bits(),
                "sample {s} element {e}"
            );
            if kept {
                want_dh += kept_value.to_f32() * scale;
            }
        }
        assert_eq!(got_dh[e].to_bits(), want_dh.to_bits(), "dh element {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Validation that needs no device

#[test]
fn configuration_validation_without_device() {
    assert_eq!(invalid_name(MultiSample::new(0, 0.5)), "k");
    assert_eq!(invalid_name(MultiSample::new(MAX_K + 1, 0.5)), "k");
    assert_eq!(invalid_name(MultiSample::new(2, 1.5)), "p");
    assert_eq!(invalid_name(MultiSample::new(2, f64::NAN)), "p");
    assert!(MultiSample::new(MAX_K, 1.0).is_ok());
    assert_eq!(MultiSample::new(4, 1.0).unwrap().scale(), 0.0);
    assert_eq!(invalid_name(WeightedCrossEntropy::uniform(0)), "k");
    assert_eq!(invalid_name(WeightedCrossEntropy::new(&[])), "weights");
    assert_eq!(invalid_name(WeightedCrossEntropy::new(&[0.5, 0.6])), "weights");
    assert_eq!(invalid_name(WeightedCrossEntropy::new(&[1.5, -0.5])), "weights");
    assert_eq!(
        invalid_name(WeightedCrossEntropy::new(&[f64::NAN, 1.0])),
        "weights"
    );
    assert_eq!(
        invalid_name(
            WeightedCrossEntropy::uniform(2)
                .unwrap()
                .with_label_smoothing(1.01)
        ),
        "label_smoothing"
    );
    assert_eq!(
        invalid_name(
            WeightedCrossEntropy::uniform(2)
                .unwrap()
                .with_label_smoothing(f64::NAN)
        ),
        "label_smoothing"
    );
    let ce = WeightedCrossEntropy::new(&[0.25, 0.75])
        .unwrap()
        .with_ignore_index(-1);
    assert_eq!((ce.k(), ce.ignore_index()), (2, -1));
    assert!(
        WeightedCrossEntropy::uniform(3).is_ok(),
        "1/3 + 1/3 + 1/3 is within the tolerance"
    );
    // The scratch holds the two u64 words and K * B f32 partials.
    assert_eq!(WeightedCrossEntropy::scratch_len(8, 1024), 2 + 4096);
    assert_eq!(WeightedCrossEntropy::scratch_len(3, 3), 2 + 5);
    assert_eq!(masks_len(3, 33), 6);
}
