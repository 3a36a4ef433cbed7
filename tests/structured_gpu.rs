//! Structured dropout on the GPU vs the CPU reference, bit for bit: decision masks and outputs of
//! every operation (forward with and without a mask, in place, mask only, backward from the mask
//! and mask-free) over channel 1d/2d/3d, locked on every axis, embedding rows, arbitrary shared-axes
//! sets and extent-1 axes, every dtype, p in {0, 1, 0.99999, ...}, decision offsets (aligned to
//! Philox blocks or not) and misaligned views. Plus validation (partly without a GPU) and a tensor
//! over 2^32 elements (`huge`). Without a GPU the GPU tests print a SKIPPED line and return.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::finite_values;
use common::guard::{expect_region, padded, same_or_both_nan, Bits, MASK_SENTINEL};
use common::huge::{self, TWO_POW_32};
use common::{bits, gpu, invalid_name, ok, run_cases};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::reference::dropout::mask_bit;
use dropfuse::reference::structured as reference;
use dropfuse::structured::{groups, Layout, StructuredDropout, MAX_GROUPS};
use dropfuse::{Device, Element, PhiloxState};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Debug, Clone)]
struct Case {
    shape: Vec<usize>,
    shared: Vec<usize>,
    p: f64,
    state: PhiloxState,
    decision_offset: u64,
    /// View offsets (elements / mask words) into larger buffers: they break 16-byte alignment.
    x_off: usize,
    y_off: usize,
    m_off: usize,
    data_seed: u64,
}

/// Named layouts (channel 1d/2d/3d, locked on each axis, embedding rows) and random shared sets,
/// with extents that hit every kernel path (planes, locked, general, plain dropout) and their
/// partial vectors and words.
fn layout_strategy() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    let dim = prop_oneof![3 => 1usize..=9, 2 => 10usize..=70, 1 => Just(1usize), 1 => 100usize..=700];
    let named =
        (0usize..7, prop::collection::vec(dim.clone(), 2..=5), 0usize..5).prop_map(|(kind, mut shape, a)| {
            match kind {
                // channel 1d, 2d, 3d: [N, C, *spatial]
                0..=2 => {
                    shape.truncate(3 + kind);
                    while shape.len() < 3 + kind {
                        shape.push(3);
                    }
                    let shared = (2..shape.len()).collect();
                    (shape, shared)
                }
                // locked on axis a
                3 | 4 => {
                    shape.truncate(3);
                    while shape.len() < 3 {
                        shape.push(5);
                    }
                    let a = a % shape.len();
                    (shape, vec![a])
                }
                // embedding rows [V, E]
                5 => (vec![shape[0] * 3 + 1, shape[1] + 16], vec![1]),
                // locked on time of (T, B, H) with H a multiple of 8 (the vector path); `shape`
                // may have only 2 extents
                _ => (
                    vec![shape[0], shape[1], 8 * shape.get(2).copied().unwrap_or(3)],
                    vec![0],
                ),
            }
        });
    let random = prop::collection::vec((prop_oneof![1usize..=6, 7usize..=40], any::<bool>()), 1..=6)
        .prop_map(|axes| {
            let shape: Vec<usize> = axes.iter().map(|a| a.0).collect();
            let shared = axes
                .iter()
                .enumerate()
                .filter(|(_, a)| a.1)
                .map(|(k, _)| k)
                .collect();
            (shape, shared)
        });
    // At most 300k elements: halve the largest extent until the tensor fits.
    prop_oneof![3 => named, 2 => random].prop_map(|(mut shape, shared)| {
        while shape.iter().product::<usize>() > 300_000 {
            let k = (0..shape.len()).max_by_key(|&k| shape[k]).unwrap();
            shape[k] = shape[k].div_ceil(2);
        }
        (shape, shared)
    })
}

fn case() -> impl Strategy<Value = Case> {
    let p = prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(0.5),
        Just(0.99999),
        0.0f64..=1.0,
        prop::sample::select(vec![0.1, 0.25, 0.9]),
    ];
    let decision_offset = prop_oneof![
        Just(0u64),
        0u64..5000,
        (0u64..1 << 20).prop_map(|k| 4 * k),
        any::<u64>(),
        (1u64..(1 << 30), 0u64..100_000).prop_map(|(k, d)| (k << 34) - d),
    ];
    (
        layout_strategy(),
        p,
        any::<u64>(),
        any::<u64>(),
        decision_offset,
        0usize..9,
        0usize..9,
        0usize..3,
        any::<u64>(),
    )
        .prop_map(
            |((shape, shared), p, seed, offset, d_off, x_off, y_off, m_off, data_seed)| {
                let decisions: usize = shape
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| !shared.contains(k))
                    .map(|(_, &d)| d)
                    .product();
                Case {
                    shape,
                    shared,
                    p,
                    state: PhiloxState::new(seed, offset),
                    decision_offset: d_off.min(u64::MAX - decisions as u64),
                    x_off,
                    y_off,
                    m_off,
                    data_seed,
                }
            },
        )
}

fn check_case<T: Bits>(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let layout = ok(Layout::shared_axes(&c.shape, &c.shared), "layout")?;
    let drop = ok(StructuredDropout::new(layout.clone(), c.p), "new")?;
    let drop = ok(drop.with_decision_offset(c.decision_offset), "decision_offset")?;
    let n = layout.numel();
    let words = layout.mask_words();
    let s = dev.stream();
    let x: Vec<T> = finite_values(n, c.data_seed);
    let (want_y, want_m) = ok(
        reference::forward(&x, &layout, c.p, c.state, c.decision_offset),
        "reference forward",
    )?;
    let want_y = bits(&want_y);
    let sent = T::from_f32(-12345.0);
    let sent_bits = sent.to_bits_u32();
    let dl = |b: &CudaSlice<T>| dev.download(b).map(|v| bits(&v));
    let dlm = |b: &CudaSlice<u32>| dev.download(b);

    let xd = ok(padded(dev, c.x_off, Some(&x), n, sent), "upload")?;
    let xv = xd.slice(c.x_off..c.x_off + n);

    // forward with mask
    let mut y = ok(padded(dev, c.y_off, None, n, sent), "alloc")?;
    let mut m = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        drop.forward(
            s,
            c.state,
            &xv,
            &mut y.slice_mut(c.y_off..c.y_off + n),
            &mut m.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward",
    )?;
    expect_region(&ok(dl(&y), "dl")?, c.y_off, &want_y, sent_bits, "forward y")?;
    expect_region(
        &ok(dlm(&m), "dl")?,
        c.m_off,
        &want_m,
        MASK_SENTINEL,
        "forward mask",
    )?;

    // mask only
    let mut m2 = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        drop.mask(s, c.state, &mut m2.slice_mut(c.m_off..c.m_off + words)),
        "mask",
    )?;
    expect_region(&ok(dlm(&m2), "dl")?, c.m_off, &want_m, MASK_SENTINEL, "mask only")?;

    // mask-free forward
    let mut y2 = ok(padded(dev, c.y_off, None, n, sent), "alloc")?;
    ok(
        drop.forward_maskless(s, c.state, &xv, &mut y2.slice_mut(c.y_off..c.y_off + n)),
        "forward_maskless",
    )?;
    expect_region(
        &ok(dl(&y2), "dl")?,
        c.y_off,
        &want_y,
        sent_bits,
        "forward_maskless y",
    )?;

    // backward from the mask (x plays dy) and mask-free backward
    let want_dx = bits(&ok(
        reference::backward_from_mask(&x, &layout, &want_m, c.p),
        "reference backward",
    )?);
    let md = ok(
        padded(dev, c.m_off, Some(&want_m), words, MASK_SENTINEL),
        "upload",
    )?;
    let mv = md.slice(c.m_off..c.m_off + words);
    let mut dx = ok(padded(dev, c.y_off, None, n, sent), "alloc")?;
    ok(
        drop.backward(s, &mv, &xv, &mut dx.slice_mut(c.y_off..c.y_off + n)),
        "backward",
    )?;
    expect_region(&ok(dl(&dx), "dl")?, c.y_off, &want_dx, sent_bits, "backward dx")?;
    let want_dx2 = bits(&ok(
        reference::backward(&x, &layout, c.p, c.state, c.decision_offset),
        "reference backward",
    )?);
    let mut dx2 = ok(padded(dev, c.y_off, None, n, sent), "alloc")?;
    ok(
        drop.backward_maskless(s, c.state, &xv, &mut dx2.slice_mut(c.y_off..c.y_off + n)),
        "backward_maskless",
    )?;
    expect_region(
        &ok(dl(&dx2), "dl")?,
        c.y_off,
        &want_dx2,
        sent_bits,
        "backward_maskless dx",
    )?;

    // in place: forward with mask, forward mask-free, backward from the mask, backward mask-free
    let mut z = ok(padded(dev, c.x_off, Some(&x), n, sent), "upload")?;
    let mut m3 = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        drop.forward_inplace(
            s,
            c.state,
            &mut z.slice_mut(c.x_off..c.x_off + n),
            &mut m3.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward_inplace",
    )?;
    expect_region(&ok(dl(&z), "dl")?, c.x_off, &want_y, sent_bits, "forward_inplace")?;
    expect_region(
        &ok(dlm(&m3), "dl")?,
        c.m_off,
        &want_m,
        MASK_SENTINEL,
        "forward_inplace mask",
    )?;
    let mut z2 = ok(padded(dev, c.x_off, Some(&x), n, sent), "upload")?;
    ok(
        drop.forward_maskless_inplace(s, c.state, &mut z2.slice_mut(c.x_off..c.x_off + n)),
        "forward_maskless_inplace",
    )?;
    expect_region(
        &ok(dl(&z2), "dl")?,
        c.x_off,
        &want_y,
        sent_bits,
        "forward_maskless_inplace",
    )?;
    let mut g = ok(padded(dev, c.x_off, Some(&x), n, sent), "upload")?;
    ok(
        drop.backward_inplace(s, &mv, &mut g.slice_mut(c.x_off..c.x_off + n)),
        "backward_inplace",
    )?;
    expect_region(
        &ok(dl(&g), "dl")?,
        c.x_off,
        &want_dx,
        sent_bits,
        "backward_inplace",
    )?;
    let mut g2 = ok(padded(dev, c.x_off, Some(&x), n, sent), "upload")?;
    ok(
        drop.backward_maskless_inplace(s, c.state, &mut g2.slice_mut(c.x_off..c.x_off + n)),
        "backward_maskless_inplace",
    )?;
    expect_region(
        &ok(dl(&g2), "dl")?,
        c.x_off,
        &want_dx2,
        sent_bits,
        "backward_maskless_inplace",
    )?;
    Ok(())
}

fn run_property<T: Bits>(test: &str) {
    run_cases(test, 24, case(), |dev, c| check_case::<T>(dev, &c));
}

#[test]
fn gpu_matches_reference_f32() {
    run_property::<f32>("gpu_matches_reference_f32");
}

#[test]
fn gpu_matches_reference_f16() {
    run_property::<f16>("gpu_matches_reference_f16");
}

#[test]
fn gpu_matches_reference_bf16() {
    run_property::<bf16>("gpu_matches_reference_bf16");
}

/// The named layouts at fixed shapes, every dtype, a few p and offsets (deterministic coverage of
/// every kernel path: planes with aligned and unaligned planes, locked vector and scalar, general).
#[test]
fn gpu_named_layouts() {
    let Some(dev) = gpu("gpu_named_layouts") else {
        return;
    };
    let layouts: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![4, 6, 37], vec![2]),                        // Dropout1d, odd planes
        (vec![3, 5, 7, 9], vec![2, 3]),                   // Dropout2d, odd planes
        (vec![2, 33, 16, 16], vec![2, 3]),                // Dropout2d, 16-byte planes
        (vec![2, 3, 4, 5, 6], vec![2, 3, 4]),             // Dropout3d
        (vec![7, 5, 64], vec![0]),                        // locked on time, vector rows
        (vec![7, 5, 13], vec![0]),                        // locked on time, scalar rows
        (vec![7, 5, 13], vec![1]),                        // locked on batch (general)
        (vec![7, 5, 13], vec![2]),                        // locked on features
        (vec![1001, 40], vec![1]),                        // embedding rows
        (vec![3, 8, 8, 11], vec![1, 2]),                  // channels-last channel dropout (general)
        (vec![1, 1, 50, 1], vec![0, 1, 3]),               // shared axes of extent 1 only: plain dropout
        (vec![1, 7, 1, 9], vec![2]),                      // extent-1 shared axis: plain dropout
        (vec![5, 3000], vec![0, 1]),                      // one decision for the whole tensor
        (vec![2, 3, 2, 3, 2, 3, 2, 3], vec![1, 3, 5, 7]), // eight groups
    ];
    for (li, (shape, shared)) in layouts.iter().enumerate() {
        for (pi, &p) in [0.0, 0.3, 0.99999, 1.0].iter().enumerate() {
            // 2: not a multiple of 4 but even (the locked kernel needs whole Philox blocks)
            for &d_off in &[0u64, 4, 3, 2] {
                let c = Case {
                    shape: shape.clone(),
                    shared: shared.clone(),
                    p,
                    state: PhiloxState::new(li as u64 * 31 + 5, pi as u64),
                    decision_offset: d_off,
                    x_off: (li + pi) % 3,
                    y_off: (li + pi) % 3,
                    m_off: 0,
                    data_seed: li as u64,
                };
                for r in [
                    check_case::<f32>(&dev, &c),
                    check_case::<f16>(&dev, &c),
                    check_case::<bf16>(
                        &dev,
                        &Case {
                            x_off: 0,
                            y_off: 1,
                            ..c.clone()
                        },
                    ),
                ] {
                    r.unwrap_or_else(|e| panic!("{c:?}: {e}"));
                }
            }
        }
    }
}

/// Every element of a kept plane is scaled and every element of a dropped plane is +0, even for
/// NaN and infinite inputs (a dropped plane is never read).
#[test]
fn gpu_non_finite_inputs() {
    let Some(dev) = gpu("gpu_non_finite_inputs") else {
        return;
    };
    let shape = [4, 16, 8, 8];
    let layout = Layout::channel(&shape).unwrap();
    let n = layout.numel();
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1.0];
    let x: Vec<f16> = (0..n)
        .map(|i| f16::from_f32(specials[i % specials.len()]))
        .collect();
    let state = PhiloxState::new(9, 1);
    let drop = StructuredDropout::new(layout.clone(), 0.5).unwrap();
    let (want, want_m) = reference::forward(&x, &layout, 0.5, state, 0).unwrap();
    let xd = dev.upload(&x).unwrap();
    let mut y = dev.zeros::<f16>(n).unwrap();
    let mut m = dev.zeros::<u32>(layout.mask_words()).unwrap();
    drop.forward(dev.stream(), state, &xd, &mut y, &mut m).unwrap();
    assert_eq!(dev.download(&m).unwrap(), want_m);
    // Bit for bit, except that a kept NaN may be any NaN (the GPU's conversions give 0x7FFF).
    for (i, (g, w)) in dev.download(&y).unwrap().iter().zip(&want).enumerate() {
        assert!(
            same_or_both_nan(*g, *w),
            "element {i}: {:#06x}, reference {:#06x}",
            g.to_bits(),
            w.to_bits()
        );
    }
    let dropped = (0..layout.decisions()).filter(|&d| !mask_bit(&want_m, d)).count();
    assert!(
        dropped > 0 && dropped < layout.decisions(),
        "both kinds of planes occur"
    );
}

/// Invalid arguments: typed errors naming the argument, nothing written.
#[test]
fn gpu_invalid_arguments() {
    let Some(dev) = gpu("gpu_invalid_arguments") else {
        return;
    };
    let s = dev.stream();
    let drop = StructuredDropout::channel(&[2, 3, 4, 4], 0.5).unwrap();
    let n = drop.numel();
    let st = PhiloxState::new(1, 2);
    let x = dev.upload(&vec![f32::from_f32(1.0); n]).unwrap();
    let short = dev.upload(&vec![1.0f32; n - 1]).unwrap();
    let mut y = dev.upload(&vec![7.0f32; n]).unwrap();
    let mut m = dev.upload(&vec![MASK_SENTINEL; drop.mask_words()]).unwrap();
    let mut bad_m = dev.upload(&vec![MASK_SENTINEL; drop.mask_words() + 1]).unwrap();
    let mut y_short = dev.upload(&vec![7.0f32; n - 1]).unwrap();
    assert_eq!(invalid_name(drop.forward(s, st, &short, &mut y, &mut m)), "x");
    assert_eq!(invalid_name(drop.forward(s, st, &x, &mut y_short, &mut m)), "y");
    assert_eq!(invalid_name(drop.forward(s, st, &x, &mut y, &mut bad_m)), "mask");
    assert_eq!(invalid_name(drop.forward_maskless(s, st, &short, &mut y)), "x");
    assert_eq!(invalid_name(drop.mask(s, st, &mut bad_m)), "mask");
    assert_eq!(invalid_name(drop.backward(s, &bad_m, &x, &mut y)), "mask");
    assert_eq!(invalid_name(drop.backward(s, &m, &short, &mut y)), "dy");
    assert_eq!(invalid_name(drop.backward(s, &m, &x, &mut y_short)), "dx");
    assert_eq!(
        invalid_name(drop.backward_maskless(s, st, &x, &mut y_short)),
        "dx"
    );
    let mut g_short = dev.upload(&vec![7.0f32; n - 1]).unwrap();
    assert_eq!(invalid_name(drop.backward_inplace(s, &m, &mut g_short)), "grad");
    assert_eq!(
        invalid_name(drop.forward_inplace(s, st, &mut y_short, &mut m)),
        "x"
    );
    // nothing written
    assert!(dev.download(&y).unwrap().iter().all(|&v| v == 7.0));
    assert!(dev.download(&m).unwrap().iter().all(|&w| w == MASK_SENTINEL));
    assert!(dev.download(&bad_m).unwrap().iter().all(|&w| w == MASK_SENTINEL));
    assert!(dev.download(&y_short).unwrap().iter().all(|&v| v == 7.0));
}

/// Channel dropout of a tensor over 2^32 elements (f16, about 12.9 GB, in place): the decision
/// mask equals the reference's and samples of every plane (around each 2^32 boundary, the plane
/// edges) are scaled or zero as their plane's decision says.
#[test]
fn gpu_channel_dropout_huge() {
    let Some(dev) = gpu("gpu_channel_dropout_huge") else {
        return;
    };
    let s_len = (1usize << 31) + 5; // odd plane length: unaligned plane starts
    let shape = [3, 1, s_len];
    let layout = Layout::channel(&shape).unwrap();
    let n = layout.numel();
    assert!(n > 1 << 32);
    let p = 0.5;
    let drop = StructuredDropout::new(layout.clone(), p).unwrap();
    if !huge::enough_memory(&dev, "gpu_channel_dropout_huge", n * 2 + (1 << 30)) {
        return;
    }
    let scale = drop.scale();
    let mut x = huge::value_tensor(&dev, n);
    let value = huge::value;
    // Find a state that keeps some plane and drops another (3 decisions).
    let mut state = PhiloxState::new(77, 0);
    let want_m = loop {
        let m = reference::mask(&layout, p, state, 0).unwrap();
        if m[0] != 0 && m[0] != 0b111 {
            break m;
        }
        state.offset += 1;
    };
    let mut m = dev.zeros::<u32>(1).unwrap();
    drop.forward_inplace(dev.stream(), state, &mut x, &mut m).unwrap();
    assert_eq!(dev.download(&m).unwrap(), want_m);
    let mut probes = vec![
        0,
        1,
        7,
        8,
        s_len - 1,
        s_len,
        s_len + 1,
        2 * s_len - 1,
        2 * s_len,
        n - 9,
        n - 1,
    ];
    for b in [1usize << 32, 2 << 32, 3 << 32, 4 << 32, 5 << 32, 6 << 32] {
        if b + 8 < n {
            probes.extend([b - 8, b - 1, b, b + 7]);
        }
    }
    for &i in &probes {
        let got = dev.download(&x.slice(i..i + 1)).unwrap()[0];
        let plane = i / s_len;
        let want = if mask_bit(&want_m, plane) {
            f16::from_f32(value(i).to_f32() * scale)
        } else {
            f16::from_f32(0.0)
        };
        assert_eq!(got.to_bits(), want.to_bits(), "element {i} (plane {plane})");
    }
}

/// Locked (variational) dropout through the locked kernel (kernels/structured.cu `locked_kernel`):
/// [`locked_case`] on two tensors over 2^32 f16 elements, about 8.6 GB each (in place, one at a
/// time). B * H = 65 544 is a multiple of the f16 vector (the 16-byte path); 65 553 is odd (the
/// element-wise path).
#[test]
fn gpu_locked_dropout_huge() {
    let test = "gpu_locked_dropout_huge";
    let Some(dev) = gpu(test) else {
        return;
    };
    for shape in [[65_537, 2, 32_772], [65_537, 3, 21_851]] {
        assert!(shape.iter().product::<usize>() > TWO_POW_32);
        locked_case(&dev, test, shape, TWO_POW_32);
    }
}

/// [`locked_case`] on small tensors (both paths), probing around the multiples of 512 and 256.
#[test]
fn gpu_locked_dropout_probe_twin() {
    let test = "gpu_locked_dropout_probe_twin";
    let Some(dev) = gpu(test) else {
        return;
    };
    locked_case(&dev, test, [37, 2, 24], 512);
    locked_case(&dev, test, [37, 3, 7], 256);
}

/// `StructuredDropout::locked` of `[T, B, H]` along axis 0: the groups `[(T, shared), (B * H,
/// not shared)]` that the launcher sends to the locked kernel (decision offset 0, a multiple of 4);
/// [`structured_passes`], probing the row boundaries nearest to each multiple of `wrap`.
fn locked_case(dev: &Device, test: &str, shape: [usize; 3], wrap: usize) {
    let drop = StructuredDropout::locked(&shape, 0, 0.3).unwrap();
    let row = shape[1] * shape[2];
    assert_eq!(
        groups(drop.layout()),
        [(shape[0], true), (row, false)],
        "the locked kernel's layout"
    );
    structured_passes(dev, test, &drop, wrap, &[row]);
}

/// A layout of three groups through the general kernel (kernels/structured.cu `general_kernel`):
/// [`general_case`] on [1025, 4097, 1023] f16 (4 296 011 775 elements, about 8.6 GB in place; odd,
/// so the last 7 take the kernel's tail), 1 048 575 decisions.
#[test]
fn gpu_general_layout_huge() {
    let test = "gpu_general_layout_huge";
    let Some(dev) = gpu(test) else {
        return;
    };
    let shape = [1025, 4097, 1023];
    assert!(shape.iter().product::<usize>() > TWO_POW_32);
    general_case(&dev, test, shape, TWO_POW_32);
}

/// [`general_case`] on [5, 37, 11] (2035 elements), probing around the multiples of 512.
#[test]
fn gpu_general_layout_probe_twin() {
    let test = "gpu_general_layout_probe_twin";
    let Some(dev) = gpu(test) else {
        return;
    };
    general_case(&dev, test, [5, 37, 11], 512);
}

/// `StructuredDropout::locked` of `[T, B, H]` along the middle axis, groups `[(T, not shared), (B,
/// shared), (H, not shared)]`: the general kernel (the forward with a mask is the dropout mask
/// kernel on the decisions, then the general kernel applying it), decision offset 5 (no multiple
/// of 4); [`structured_passes`], probing the row and plane boundaries nearest to each multiple of
/// `wrap`.
fn general_case(dev: &Device, test: &str, shape: [usize; 3], wrap: usize) {
    let drop = StructuredDropout::locked(&shape, 1, 0.3)
        .unwrap()
        .with_decision_offset(5)
        .unwrap();
    assert_eq!(
        groups(drop.layout()),
        [(shape[0], false), (shape[1], true), (shape[2], false)],
        "a general kernel's layout"
    );
    structured_passes(dev, test, &drop, wrap, &[shape[2], shape[1] * shape[2]]);
}

/// Embedding-row dropout, which the launcher sends to the planes kernel (kernels/structured.cu
/// `planes_kernel`, [planes, shared plane] as channel dropout) but with a million short planes
/// rather than a few long ones: [`embedding_rows_case`] on [1 048 577, 4097] f16 (4 296 019 969
/// elements, about 8.6 GB in place; odd rows, so most rows begin inside a 16-byte vector; 32 769
/// mask words, the last of 1 bit).
#[test]
fn gpu_embedding_rows_huge() {
    let test = "gpu_embedding_rows_huge";
    let Some(dev) = gpu(test) else {
        return;
    };
    let shape = [1_048_577, 4097];
    assert!(shape.iter().product::<usize>() > TWO_POW_32);
    embedding_rows_case(&dev, test, shape, TWO_POW_32);
}

/// [`embedding_rows_case`] on [75, 33] (2475 elements), probing around the multiples of 512.
#[test]
fn gpu_embedding_rows_probe_twin() {
    let test = "gpu_embedding_rows_probe_twin";
    let Some(dev) = gpu(test) else {
        return;
    };
    embedding_rows_case(&dev, test, [75, 33], 512);
}

/// `StructuredDropout::embedding_rows` of `[V, E]`, groups `[(V, not shared), (E, shared)]`;
/// [`structured_passes`], probing the row boundaries nearest to each multiple of `wrap`.
fn embedding_rows_case(dev: &Device, test: &str, shape: [usize; 2], wrap: usize) {
    let drop = StructuredDropout::embedding_rows(&shape, 0.3).unwrap();
    assert_eq!(
        groups(drop.layout()),
        [(shape[0], false), (shape[1], true)],
        "the planes kernel's layout"
    );
    structured_passes(dev, test, &drop, wrap, &[shape[1]]);
}

/// `drop` on f16 `x[i] = value(i)` in place, three passes that each apply the same decisions
/// once more: forward with the mask, backward from the mask, mask-free backward. The whole
/// decision mask equals the reference's; after each pass the elements within 40 of 0, of the end,
/// of each multiple of `wrap` and of the multiples of `periods` nearest to those are kept ones
/// scaled once per pass (rounded each time) or +0, as their decision in the reference mask says.
/// Skipped (a SKIPPED line) when the GPU lacks the memory: `numel` f16, the mask and 1 GiB.
fn structured_passes(dev: &Device, test: &str, drop: &StructuredDropout, wrap: usize, periods: &[usize]) {
    let n = drop.numel();
    if !huge::enough_memory(dev, test, n * 2 + drop.mask_words() * 4 + (1 << 30)) {
        return;
    }
    let s = dev.stream();
    let layout = drop.layout();
    let state = PhiloxState::new(0x5151_2323_7777_abcd, 42);
    let want_m = reference::mask(layout, drop.p(), state, drop.decision_offset()).unwrap();
    let kept: usize = want_m.iter().map(|w| w.count_ones() as usize).sum();
    assert!(
        kept > 0 && kept < drop.decisions(),
        "{kept} of {} decisions kept: want both kinds",
        drop.decisions()
    );
    let scale = drop.scale();
    let windows = huge::windows(n, wrap, 40, &huge::boundaries_near_wraps(n, wrap, periods));
    let mut x = huge::value_tensor(dev, n);
    let mut m = dev.zeros::<u32>(drop.mask_words()).unwrap();
    for pass in 1..=3 {
        match pass {
            1 => drop.forward_inplace(s, state, &mut x, &mut m).unwrap(),
            2 => drop.backward_inplace(s, &m, &mut x).unwrap(),
            _ => drop.backward_maskless_inplace(s, state, &mut x).unwrap(),
        }
        if pass == 1 {
            assert_eq!(dev.download(&m).unwrap(), want_m, "{test}: decision mask");
        }
        for r in &windows {
            let got = dev.download(&x.slice(r.clone())).unwrap();
            for (i, g) in r.clone().zip(got) {
                let d = layout.decision_of(i);
                let keep = mask_bit(&want_m, d);
                let mut want = huge::value(i);
                for _ in 0..pass {
                    want = if keep {
                        f16::from_f32(want.to_f32() * scale)
                    } else {
                        f16::ZERO
                    };
                }
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{test}: pass {pass}, element {i} (decision {d}, kept {keep}) of shape {:?}",
                    layout.shape()
                );
            }
        }
    }
}

// ---- without a GPU ----

/// `gpu_non_finite_inputs` compares kept NaN with `same_or_both_nan`: the reference's kept NaN
/// (payload kept) differs bitwise from what the GPU writes (0x7FFF), so an exact comparison fails.
#[test]
fn kept_nan_comparison_accepts_the_gpu_canonical_nan() {
    let gpu_f16 = f16::from_bits(0x7FFF);
    let want_f16 = f16::from_f32(f16::from_f32(f32::NAN).to_f32() * 2.0);
    assert_ne!(gpu_f16.to_bits(), want_f16.to_bits());
    assert!(same_or_both_nan(gpu_f16, want_f16));
    let gpu_bf16 = bf16::from_bits(0x7FFF);
    let want_bf16 = bf16::from_f32(f32::from_bits(0x7FC0_0001) * 2.0);
    assert_ne!(gpu_bf16.to_bits(), want_bf16.to_bits());
    assert!(same_or_both_nan(gpu_bf16, want_bf16));
    // Everything else is bitwise: -0 is not +0, a NaN is not infinity.
    assert!(!same_or_both_nan(f16::from_bits(0x8000), f16::from_bits(0)));
    assert!(!same_or_both_nan(gpu_f16, f16::INFINITY));
    assert!(!same_or_both_nan(f32::INFINITY, f32::NAN));
    assert!(same_or_both_nan(1.5f32, 1.5f32));
}

#[test]
fn groups_collapse_layouts() {
    let g = |shape: &[usize], axes: &[usize]| groups(&Layout::shared_axes(shape, axes).unwrap());
    assert_eq!(
        g(&[64, 256, 56, 56], &[2, 3]),
        vec![(64 * 256, false), (56 * 56, true)]
    );
    assert_eq!(g(&[512, 64, 1024], &[0]), vec![(512, true), (64 * 1024, false)]);
    assert_eq!(g(&[50257, 1024], &[1]), vec![(50257, false), (1024, true)]);
    assert_eq!(g(&[2, 1, 3], &[1]), vec![(6, false)]);
    assert_eq!(g(&[1, 1], &[0]), vec![(1, false)]);
    assert_eq!(g(&[4, 5, 6], &[0, 1, 2]), vec![(120, true)]);
    assert_eq!(
        g(&[3, 4, 5, 6], &[1, 2]),
        vec![(3, false), (20, true), (6, false)]
    );
}

#[test]
fn validation_names_without_gpu() {
    assert_eq!(invalid_name(StructuredDropout::channel(&[4], 0.1)), "shape");
    assert_eq!(invalid_name(StructuredDropout::channel(&[4, 0, 3], 0.1)), "shape");
    assert_eq!(invalid_name(StructuredDropout::locked(&[4, 5], 2, 0.1)), "axis");
    assert_eq!(
        invalid_name(StructuredDropout::embedding_rows(&[4, 5, 6], 0.1)),
        "shape"
    );
    assert_eq!(
        invalid_name(StructuredDropout::shared_axes(&[4, 5], &[0, 0], 0.1)),
        "axes"
    );
    assert_eq!(
        invalid_name(StructuredDropout::shared_axes(&[4, 5], &[2], 0.1)),
        "axes"
    );
    assert_eq!(invalid_name(StructuredDropout::channel(&[4, 5], 1.5)), "p");
    assert_eq!(invalid_name(StructuredDropout::channel(&[4, 5], f64::NAN)), "p");
    let d = StructuredDropout::channel(&[4, 5, 3], 0.1).unwrap();
    assert_eq!(d.decisions(), 20);
    assert_eq!(d.mask_words(), 1);
    assert_eq!(
        invalid_name(d.clone().with_decision_offset(u64::MAX - 19)),
        "decision_offset"
    );
    assert_eq!(
        d.with_decision_offset(u64::MAX - 20).unwrap().decision_offset(),
        u64::MAX - 20
    );
    // Nine alternating groups: more than the kernels take.
    let shape = [2usize; 9];
    assert_eq!(
        invalid_name(StructuredDropout::shared_axes(&shape, &[1, 3, 5, 7], 0.1)),
        "axes"
    );
    let ok = StructuredDropout::shared_axes(&shape[..8], &[1, 3, 5, 7], 0.1).unwrap();
    assert_eq!(groups(ok.layout()).len(), MAX_GROUPS);
}
