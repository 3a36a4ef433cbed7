//! Compute skipping on the GPU vs the CPU reference (`dropfuse::reference::skip`), bit for bit:
//! the stochastic-depth residual (forward in place and out of place, backward with and without the
//! bias gradient) and per-sample compaction (slots and count, gather, scatter, scatter-add and
//! their backward kernels), over dtypes, batch sizes (B = 1 included), row lengths (odd, vector
//! multiples, over 2^16), bias periods, keep patterns (all, none, random), keep modes (per sample,
//! one device flag, one host flag), scales (0, 1, 1/(1-p), arbitrary), views that break 16-byte
//! alignment, capacities above and below the count, and invalid arguments. Guard elements around
//! every output view must stay untouched. Without a GPU every GPU test prints a SKIPPED line; the
//! few tests that need no GPU run everywhere.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use std::sync::Arc;

use common::data::{splitmix, sprinkled};
use common::guard::{dl, same_bits, upload_at, GUARD};
use common::{gpu, invalid_name, ok, run_cases};
use dropfuse::cudarc::driver::CudaStream;
use dropfuse::reference::skip as reference;
use dropfuse::reference::skip::{Compaction, SampleKeep};
use dropfuse::skip::{self, Keep, SampleSlots, SLOT_NONE};
use dropfuse::{Device, Element};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Values in [-8, 8) with a sprinkle of infinities, NaN, -0 and subnormal-range values.
fn values<T: Element>(n: usize, seed: u64) -> Vec<T> {
    sprinkled(n, seed, 8.0, 211, &[f32::INFINITY, f32::NAN, -0.0, 1e-40])
}

/// The view `[off, off + len)` of `buf` equals `want`, and every other element is `fill`.
fn check_view<T: Element>(
    buf: &[T],
    off: usize,
    want: &[T],
    fill: T,
    what: &str,
) -> Result<(), TestCaseError> {
    same_bits(&buf[off..off + want.len()], want, what)?;
    let outside = buf[..off].iter().chain(&buf[off + want.len()..]);
    prop_assert!(
        outside.into_iter().all(|v| v.to_bits_u32() == fill.to_bits_u32()),
        "{}: guard elements written",
        what
    );
    Ok(())
}

fn keep_pattern(batch: usize, kind: u8, seed: u64) -> Vec<bool> {
    let mut s = seed;
    (0..batch)
        .map(|_| match kind {
            0 => true,
            1 => false,
            _ => splitmix(&mut s) % 3 != 0,
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Stochastic depth

#[derive(Debug, Clone)]
struct DepthCase {
    batch: usize,
    row_len: usize,
    /// Bias period P (a divisor of row_len), or none.
    bias: Option<usize>,
    /// 0 all kept, 1 none kept, 2 random.
    keep_kind: u8,
    /// 0 per sample (device), 1 one device flag, 2 one host flag.
    keep_mode: u8,
    scale: f32,
    offs: [usize; 4],
    seed: u64,
}

fn row_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..=40,
        3 => (1usize..=40).prop_map(|k| 8 * k),
        1 => prop::sample::select(vec![4096usize, 65_544, 65_536 + 3, 100_000]),
    ]
}

fn scale() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        Just(1.0f32),
        (0.0f64..0.99).prop_map(|p| reference::depth_scale(p, true).unwrap()),
        0.0f32..1e3,
    ]
}

fn depth_case() -> impl Strategy<Value = DepthCase> {
    (
        prop_oneof![3 => 1usize..=6, 1 => Just(1usize), 1 => 7usize..=33],
        row_len(),
        any::<Option<u16>>(),
        0u8..3,
        0u8..3,
        scale(),
        prop::array::uniform4(prop_oneof![3 => Just(0usize), 1 => 1usize..9]),
        any::<u64>(),
    )
        .prop_filter("keep the large rows to small batches", |c| c.0 * c.1 <= 400_000)
        .prop_map(
            |(batch, row_len, bias, keep_kind, keep_mode, scale, offs, seed)| {
                // A divisor of row_len from the random pick: P = gcd-free choice among divisors.
                let bias = bias.map(|b| {
                    let divs: Vec<usize> = (1..=row_len).filter(|d| row_len % d == 0).collect();
                    divs[b as usize % divs.len()]
                });
                DepthCase {
                    batch,
                    row_len,
                    bias,
                    keep_kind,
                    keep_mode,
                    scale,
                    offs,
                    seed,
                }
            },
        )
}

fn check_depth<T: Element>(dev: &Device, c: &DepthCase) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let n = c.batch * c.row_len;
    let x = values::<T>(n, c.seed);
    let f = values::<T>(n, c.seed ^ 1);
    let bias = c.bias.map(|p| values::<T>(p, c.seed ^ 2));
    let dy = values::<T>(n, c.seed ^ 3);
    let flags = keep_pattern(c.batch, c.keep_kind, c.seed ^ 4);
    let host_keep = match c.keep_mode {
        0 => SampleKeep::PerSample(&flags),
        _ => SampleKeep::Batch(flags[0]),
    };
    let want = ok(
        reference::stochastic_depth(&x, &f, bias.as_deref(), c.row_len, host_keep, c.scale),
        "reference forward",
    )?;
    let want_grads = ok(
        reference::stochastic_depth_backward(&dy, c.row_len, host_keep, c.scale, c.bias),
        "reference backward",
    )?;

    let fill = T::from_f32(-12345.0);
    let kd = ok(dev.upload(&skip::keep_flags(&flags)), "upload")?;
    let kd1 = ok(dev.upload(&skip::keep_flags(&flags[..1])), "upload")?;
    let keep = match c.keep_mode {
        0 => Keep::PerSample(&kd),
        1 => Keep::BatchOnDevice(&kd1),
        _ => Keep::Batch(flags[0]),
    };
    let [ox, of, ob, oy] = c.offs;
    let fd = upload_at(dev, of, &f, fill, GUARD)?;
    let bd = match &bias {
        Some(b) => Some(upload_at(dev, ob, b, fill, GUARD)?),
        None => None,
    };
    let bview = bd.as_ref().map(|b| b.slice(ob..ob + b.len() - ob - GUARD));
    let bias_arg = bview
        .as_ref()
        .map(|v| v as &dyn dropfuse::cudarc::driver::DevicePtr<T>);

    // In place.
    let mut xd = upload_at(dev, ox, &x, fill, GUARD)?;
    ok(
        skip::stochastic_depth_in_place(
            s,
            &mut xd.slice_mut(ox..ox + n),
            &fd.slice(of..of + n),
            bias_arg,
            c.row_len,
            keep,
            c.scale,
        ),
        "stochastic_depth_in_place",
    )?;
    check_view(&dl(dev, &xd)?, ox, &want, fill, "in-place forward")?;

    // Out of place: the residual is untouched.
    let xd = upload_at(dev, ox, &x, fill, GUARD)?;
    let mut yd = upload_at(dev, oy, &vec![fill; n], fill, GUARD)?;
    ok(
        skip::stochastic_depth(
            s,
            &xd.slice(ox..ox + n),
            &fd.slice(of..of + n),
            bias_arg,
            c.row_len,
            keep,
            c.scale,
            &mut yd.slice_mut(oy..oy + n),
        ),
        "stochastic_depth",
    )?;
    check_view(&dl(dev, &yd)?, oy, &want, fill, "out-of-place forward")?;
    check_view(
        &dl(dev, &xd)?,
        ox,
        &x,
        fill,
        "residual after out-of-place forward",
    )?;

    // Backward.
    let dyd = upload_at(dev, oy, &dy, fill, GUARD)?;
    let mut dbd = upload_at(dev, of, &vec![fill; n], fill, GUARD)?;
    match c.bias {
        None => ok(
            skip::stochastic_depth_backward(
                s,
                &dyd.slice(oy..oy + n),
                c.row_len,
                keep,
                c.scale,
                &mut dbd.slice_mut(of..of + n),
            ),
            "stochastic_depth_backward",
        )?,
        Some(p) => {
            let ws_len = ok(
                skip::stochastic_depth_workspace_len(c.batch, c.row_len, p),
                "workspace_len",
            )?;
            let mut ws = ok(dev.upload(&vec![f32::NAN; ws_len]), "upload")?;
            let mut dbias = upload_at(dev, ob, &vec![fill; p], fill, GUARD)?;
            ok(
                skip::stochastic_depth_backward_bias(
                    s,
                    &dyd.slice(oy..oy + n),
                    c.row_len,
                    keep,
                    c.scale,
                    &mut dbd.slice_mut(of..of + n),
                    &mut dbias.slice_mut(ob..ob + p),
                    &mut ws,
                ),
                "stochastic_depth_backward_bias",
            )?;
            let want_bias = want_grads.d_bias.clone().expect("reference d_bias");
            check_view(&dl(dev, &dbias)?, ob, &want_bias, fill, "d_bias")?;
        }
    }
    check_view(&dl(dev, &dbd)?, of, &want_grads.d_branch, fill, "d_branch")?;
    Ok(())
}

fn run_depth<T: Element>(test: &str) {
    run_cases(test, 24, depth_case(), |dev, c| check_depth::<T>(dev, &c));
}

#[test]
fn gpu_stochastic_depth_matches_reference_f32() {
    run_depth::<f32>("gpu_stochastic_depth_matches_reference_f32");
}

#[test]
fn gpu_stochastic_depth_matches_reference_f16() {
    run_depth::<f16>("gpu_stochastic_depth_matches_reference_f16");
}

#[test]
fn gpu_stochastic_depth_matches_reference_bf16() {
    run_depth::<bf16>("gpu_stochastic_depth_matches_reference_bf16");
}

/// Fixed edge cases: B = 1, rows of one element, rows over 2^16, P = 1 and P = R, p = 0 and 1
/// (scale 1 and 0), all kept / none kept, in every keep mode and dtype.
#[test]
fn gpu_stochastic_depth_edge_cases() {
    let Some(dev) = gpu("gpu_stochastic_depth_edge_cases") else {
        return;
    };
    let shapes: &[(usize, usize, Option<usize>)] = &[
        (1, 1, None),
        (1, 1, Some(1)),
        (1, 8, Some(8)),
        (3, 7, Some(7)),
        (2, 65_544, Some(1)),
        (2, 65_544, Some(65_544)),
        (1, 70_000, Some(8)),
        (5, 24, Some(3)),
        (300, 16, Some(16)), // more than one 256-term chunk per bias element
        (1100, 8, Some(2)),
    ];
    let mut i = 0u64;
    for &(batch, row_len, bias) in shapes {
        for scale in [0.0f32, 1.0, reference::depth_scale(0.2, true).unwrap()] {
            for keep_kind in 0..3u8 {
                {
                    i += 1;
                    let keep_mode = (i % 3) as u8;
                    let c = DepthCase {
                        batch,
                        row_len,
                        bias,
                        keep_kind,
                        keep_mode,
                        scale,
                        offs: [(i % 3) as usize, 0, (i % 2) as usize, (i % 5) as usize],
                        seed: i,
                    };
                    check_depth::<f32>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                    check_depth::<f16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                    check_depth::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                }
            }
        }
    }
}

/// Tensors of more vectors than one grid-stride step of the row kernels (on the emulated device:
/// 192 blocks x 256 threads x 2 vectors), on the vector path with bias positions in scalar mode
/// (P % V != 0, or a misaligned bias view): each thread's bias position then advances by the
/// stride in elements. The other cases are too small for any thread to take a second step.
#[test]
fn gpu_stochastic_depth_grid_stride_wraps() {
    let Some(dev) = gpu("gpu_stochastic_depth_grid_stride_wraps") else {
        return;
    };
    for (i, (bias, offs)) in [(5usize, [0usize; 4]), (8, [0, 0, 1, 0])].into_iter().enumerate() {
        let c = DepthCase {
            batch: 14,
            row_len: 60_000,
            bias: Some(bias),
            keep_kind: 2,
            keep_mode: 0,
            scale: 1.25,
            offs,
            seed: 31 + i as u64,
        };
        check_depth::<f32>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        check_depth::<f16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// The bias gradient is the same bits on every run (fixed reduction order), and the reference's
/// bits: P = 512 (2 partials of 256 terms per bias element) and P = 128 (8 partials, whose
/// combination order shows in the bits: 2 partials add alike in either order, and a combine in
/// descending chunk order passed every test).
#[test]
fn gpu_stochastic_depth_bias_gradient_is_reproducible() {
    let Some(dev) = gpu("gpu_stochastic_depth_bias_gradient_is_reproducible") else {
        return;
    };
    for p in [512usize, 128] {
        check_bias_gradient_bits(&dev, p);
    }
}

fn check_bias_gradient_bits(dev: &Device, p: usize) {
    let s = dev.stream();
    let (batch, row_len) = (64usize, 4096usize);
    let dy = values::<f32>(batch * row_len, 9)
        .into_iter()
        .map(|v| if v.is_finite() { v } else { 1.0 })
        .collect::<Vec<_>>();
    let flags = keep_pattern(batch, 2, 10);
    let dyd = dev.upload(&dy).unwrap();
    let kd = dev.upload(&skip::keep_flags(&flags)).unwrap();
    let mut ws = dev
        .zeros::<f32>(skip::stochastic_depth_workspace_len(batch, row_len, p).unwrap())
        .unwrap();
    let mut db = dev.zeros::<f32>(batch * row_len).unwrap();
    let mut first = None;
    for _ in 0..5 {
        let mut dbias = dev.zeros::<f32>(p).unwrap();
        skip::stochastic_depth_backward_bias(
            s,
            &dyd,
            row_len,
            Keep::PerSample(&kd),
            1.25,
            &mut db,
            &mut dbias,
            &mut ws,
        )
        .unwrap();
        let got: Vec<u32> = dev
            .download(&dbias)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(&got, f, "d_bias differs between runs"),
        }
    }
    let want =
        reference::stochastic_depth_backward(&dy, row_len, SampleKeep::PerSample(&flags), 1.25, Some(p))
            .unwrap()
            .d_bias
            .unwrap();
    let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
    assert_eq!(first.unwrap(), want, "P {p}: d_bias vs reference");
}

// ------------------------------------------------------------------------------------------------
// Compaction

#[derive(Debug, Clone)]
struct CompactCase {
    batch: usize,
    row_len: usize,
    keep_kind: u8,
    /// Extra rows of the compact buffers beyond the count.
    extra: usize,
    scale: f32,
    offs: [usize; 3],
    seed: u64,
}

fn compact_case() -> impl Strategy<Value = CompactCase> {
    (
        prop_oneof![3 => 1usize..=9, 1 => Just(1usize), 1 => 10usize..=70],
        row_len(),
        0u8..3,
        prop_oneof![2 => Just(0usize), 1 => 1usize..4],
        scale(),
        prop::array::uniform3(prop_oneof![3 => Just(0usize), 1 => 1usize..9]),
        any::<u64>(),
    )
        .prop_filter("keep the large rows to small batches", |c| c.0 * c.1 <= 300_000)
        .prop_map(
            |(batch, row_len, keep_kind, extra, scale, offs, seed)| CompactCase {
                batch,
                row_len,
                keep_kind,
                extra,
                scale,
                offs,
                seed,
            },
        )
}

fn slots_of(dev: &Device, flags: &[bool]) -> Result<SampleSlots, TestCaseError> {
    let kd = ok(dev.upload(&skip::keep_flags(flags)), "upload")?;
    ok(
        SampleSlots::from_keep(dev.stream(), &kd),
        "SampleSlots::from_keep",
    )
}

fn check_compact<T: Element>(dev: &Device, c: &CompactCase) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let r = c.row_len;
    let n = c.batch * r;
    let flags = keep_pattern(c.batch, c.keep_kind, c.seed);
    let comp = ok(Compaction::new(&flags), "Compaction::new")?;
    let count = comp.count();
    let cap = count + c.extra;
    let cn = cap * r;
    let x = values::<T>(n, c.seed ^ 1);
    let dy = values::<T>(n, c.seed ^ 2);
    let cdata = values::<T>(cn, c.seed ^ 3);
    let fill = T::from_f32(-4321.0);
    let [ox, oc, oy] = c.offs;

    let slots = slots_of(dev, &flags)?;
    let (got_slots, got_count) = ok(slots.download(s), "download slots")?;
    prop_assert_eq!(got_count, count, "count");
    prop_assert_eq!(&got_slots[..], comp.slots(), "slots");
    prop_assert_eq!(ok(slots.count(s), "count")?, count);

    // gather: rows < count are the reference's, rows >= count untouched.
    let want_gather = ok(reference::gather_samples(&x, r, &flags), "reference gather")?;
    let xd = upload_at(dev, ox, &x, fill, GUARD)?;
    let mut cd = upload_at(dev, oc, &vec![fill; cn], fill, GUARD)?;
    ok(
        skip::gather_samples(
            s,
            &slots,
            &xd.slice(ox..ox + n),
            r,
            &mut cd.slice_mut(oc..oc + cn),
        ),
        "gather_samples",
    )?;
    let mut want_c = vec![fill; cn];
    want_c[..count * r].copy_from_slice(&want_gather);
    check_view(&dl(dev, &cd)?, oc, &want_c, fill, "gather")?;
    let mut cd2 = upload_at(dev, oc, &vec![fill; cn], fill, GUARD)?;
    let got = ok(
        skip::gather_samples_checked(
            s,
            &slots,
            &xd.slice(ox..ox + n),
            r,
            &mut cd2.slice_mut(oc..oc + cn),
        ),
        "gather_samples_checked",
    )?;
    prop_assert_eq!(got, count);
    check_view(&dl(dev, &cd2)?, oc, &want_c, fill, "gather_checked")?;

    // scatter, out of place and in place.
    let want_scatter = ok(
        reference::scatter_samples(&x, &cdata, r, &flags),
        "reference scatter",
    )?;
    let cdd = upload_at(dev, oc, &cdata, fill, GUARD)?;
    let mut yd = upload_at(dev, oy, &vec![fill; n], fill, GUARD)?;
    ok(
        skip::scatter_samples(
            s,
            &slots,
            &xd.slice(ox..ox + n),
            &cdd.slice(oc..oc + cn),
            r,
            &mut yd.slice_mut(oy..oy + n),
        ),
        "scatter_samples",
    )?;
    check_view(&dl(dev, &yd)?, oy, &want_scatter, fill, "scatter")?;
    let mut xi = upload_at(dev, ox, &x, fill, GUARD)?;
    ok(
        skip::scatter_samples_in_place(
            s,
            &slots,
            &mut xi.slice_mut(ox..ox + n),
            &cdd.slice(oc..oc + cn),
            r,
        ),
        "scatter_samples_in_place",
    )?;
    check_view(&dl(dev, &xi)?, ox, &want_scatter, fill, "scatter in place")?;

    // scatter backward.
    let (want_dx, want_dc) = ok(
        reference::scatter_samples_backward(&dy, r, &flags),
        "reference scatter bwd",
    )?;
    let dyd = upload_at(dev, oy, &dy, fill, GUARD)?;
    let mut dxd = upload_at(dev, ox, &vec![fill; n], fill, GUARD)?;
    let mut dcd = upload_at(dev, oc, &vec![fill; cn], fill, GUARD)?;
    ok(
        skip::scatter_samples_backward(
            s,
            &slots,
            &dyd.slice(oy..oy + n),
            r,
            &mut dxd.slice_mut(ox..ox + n),
            &mut dcd.slice_mut(oc..oc + cn),
        ),
        "scatter_samples_backward",
    )?;
    check_view(&dl(dev, &dxd)?, ox, &want_dx, fill, "scatter bwd d_x")?;
    let mut want_c = vec![fill; cn];
    want_c[..count * r].copy_from_slice(&want_dc);
    check_view(&dl(dev, &dcd)?, oc, &want_c, fill, "scatter bwd d_compact")?;

    // scatter-add (in place) and its backward.
    let mut want_sa = x.clone();
    ok(
        reference::scatter_add_samples(&mut want_sa, &cdata, r, &flags, c.scale),
        "reference scatter_add",
    )?;
    let mut xa = upload_at(dev, ox, &x, fill, GUARD)?;
    ok(
        skip::scatter_add_samples(
            s,
            &slots,
            &mut xa.slice_mut(ox..ox + n),
            &cdd.slice(oc..oc + cn),
            r,
            c.scale,
        ),
        "scatter_add_samples",
    )?;
    check_view(&dl(dev, &xa)?, ox, &want_sa, fill, "scatter_add")?;
    let want_sab = ok(
        reference::scatter_add_samples_backward(&dy, r, &flags, c.scale),
        "reference scatter_add bwd",
    )?;
    let mut dcd = upload_at(dev, oc, &vec![fill; cn], fill, GUARD)?;
    ok(
        skip::scatter_add_samples_backward(
            s,
            &slots,
            &dyd.slice(oy..oy + n),
            r,
            c.scale,
            &mut dcd.slice_mut(oc..oc + cn),
        ),
        "scatter_add_samples_backward",
    )?;
    let mut want_c = vec![fill; cn];
    want_c[..count * r].copy_from_slice(&want_sab);
    check_view(&dl(dev, &dcd)?, oc, &want_c, fill, "scatter_add bwd")?;

    // gather backward: accumulates into d_x.
    let mut want_gb = dy.clone();
    ok(
        reference::gather_samples_backward(&cdata, r, &flags, &mut want_gb),
        "reference gather bwd",
    )?;
    let mut dx2 = upload_at(dev, ox, &dy, fill, GUARD)?;
    ok(
        skip::gather_samples_backward(
            s,
            &slots,
            &cdd.slice(oc..oc + cn),
            r,
            &mut dx2.slice_mut(ox..ox + n),
        ),
        "gather_samples_backward",
    )?;
    check_view(&dl(dev, &dx2)?, ox, &want_gb, fill, "gather bwd")?;
    Ok(())
}

fn run_compact<T: Element>(test: &str) {
    run_cases(test, 24, compact_case(), |dev, c| check_compact::<T>(dev, &c));
}

#[test]
fn gpu_compaction_matches_reference_f32() {
    run_compact::<f32>("gpu_compaction_matches_reference_f32");
}

#[test]
fn gpu_compaction_matches_reference_f16() {
    run_compact::<f16>("gpu_compaction_matches_reference_f16");
}

#[test]
fn gpu_compaction_matches_reference_bf16() {
    run_compact::<bf16>("gpu_compaction_matches_reference_bf16");
}

/// Edge cases: B = 1 kept and skipped, all kept, none kept (count 0 with an empty compact buffer),
/// rows of one element and over 2^16.
#[test]
fn gpu_compaction_edge_cases() {
    let Some(dev) = gpu("gpu_compaction_edge_cases") else {
        return;
    };
    let mut i = 0u64;
    for (batch, row_len) in [
        (1usize, 1usize),
        (1, 8),
        (4, 3),
        (2, 65_544),
        (3, 65_539),
        (40, 16),
    ] {
        for keep_kind in 0..3u8 {
            for extra in [0usize, 2] {
                i += 1;
                let c = CompactCase {
                    batch,
                    row_len,
                    keep_kind,
                    extra,
                    scale: [0.0f32, 1.0, 1.25][(i % 3) as usize],
                    offs: [(i % 2) as usize, (i % 3) as usize, 0],
                    seed: i,
                };
                check_compact::<f32>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                check_compact::<f16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                check_compact::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            }
        }
    }
}

/// Slots of batches spanning many scan tiles (4096 flags each) and up to 2^20 samples, random and
/// periodic patterns: the device scan equals the reference's.
#[test]
fn gpu_slots_of_large_batches() {
    let Some(dev) = gpu("gpu_slots_of_large_batches") else {
        return;
    };
    let s = dev.stream();
    for (batch, kind) in [
        (4096usize, 2u8),
        (4097, 2),
        (3 * 4096 + 7, 2),
        (100_000, 0),
        (100_001, 1),
        (1 << 20, 2),
    ] {
        let flags = keep_pattern(batch, kind, batch as u64);
        let want = Compaction::new(&flags).unwrap();
        let kd = dev.upload(&skip::keep_flags(&flags)).unwrap();
        let mut slots = SampleSlots::new(s, batch).unwrap();
        // Recompute on the same buffers with other flags first: compute overwrites everything.
        let other = dev.upload(&skip::keep_flags(&keep_pattern(batch, 2, 7))).unwrap();
        slots.compute(s, &other).unwrap();
        slots.compute(s, &kd).unwrap();
        let (got, count) = slots.download(s).unwrap();
        assert_eq!(count, want.count(), "count of {batch}");
        assert!(got == want.slots(), "slots of {batch}");
        assert!(got.iter().flatten().all(|&v| v != SLOT_NONE));
    }
}

/// A capacity below the count: the unchecked kernels write no compact row at or beyond the
/// capacity and leave overflowing samples alone; the count stays the true one, so the host check
/// and the checked gather raise `capacity` (the latter writing nothing).
#[test]
fn gpu_compaction_capacity_below_count() {
    let Some(dev) = gpu("gpu_compaction_capacity_below_count") else {
        return;
    };
    let s = dev.stream();
    let (batch, r) = (7usize, 12usize);
    let flags = vec![true, false, true, true, false, true, true]; // count 5
    let slots = slots_of(&dev, &flags).unwrap();
    let cap = 3usize;
    let x = values::<f32>(batch * r, 1);
    let fill = -99.0f32;
    let xd = dev.upload(&x).unwrap();
    // gather into 3 rows + 2 guard rows (a view of 3 rows).
    let mut cd = dev.upload(&vec![fill; (cap + 2) * r]).unwrap();
    skip::gather_samples(s, &slots, &xd, r, &mut cd.slice_mut(0..cap * r)).unwrap();
    let got = dev.download(&cd).unwrap();
    let want_rows = reference::gather_samples(&x, r, &flags).unwrap();
    assert_eq!(
        common::bits(&got[..cap * r]),
        common::bits(&want_rows[..cap * r]),
        "rows below the capacity"
    );
    assert!(
        got[cap * r..].iter().all(|&v| v == fill),
        "no row at or beyond the capacity"
    );
    assert_eq!(invalid_name(slots.check_capacity(s, cap)), "capacity");
    assert_eq!(slots.check_capacity(s, 5).unwrap(), 5);
    let mut cd2 = dev.upload(&vec![fill; cap * r]).unwrap();
    assert_eq!(
        invalid_name(skip::gather_samples_checked(s, &slots, &xd, r, &mut cd2)),
        "capacity"
    );
    assert!(
        dev.download(&cd2).unwrap().iter().all(|&v| v == fill),
        "written despite the error"
    );
    // scatter in place with a 3-row compact buffer: samples of slot >= 3 (samples 5 and 6) keep x.
    let cdata = values::<f32>(cap * r, 2);
    let cdd = dev.upload(&cdata).unwrap();
    let mut xi = dev.upload(&x).unwrap();
    skip::scatter_samples_in_place(s, &slots, &mut xi, &cdd, r).unwrap();
    // Compared as bits: `values` sprinkles NaN, and x (seed 1) holds one at element 16, in the
    // skipped sample 1, which `assert_eq!` on f32 would call different from itself.
    let got = common::bits(&dev.download(&xi).unwrap());
    let (x_bits, c_bits) = (common::bits(&x), common::bits(&cdata));
    for b in 0..batch {
        let row = &got[b * r..(b + 1) * r];
        match flags[b].then(|| [0usize, 0, 1, 2, 0, 3, 4][b]) {
            Some(slot) if slot < cap => {
                assert_eq!(row, &c_bits[slot * r..(slot + 1) * r], "sample {b}")
            }
            _ => assert_eq!(row, &x_bits[b * r..(b + 1) * r], "sample {b} untouched"),
        }
    }
}

/// Invalid arguments: typed errors naming the argument, nothing written.
#[test]
fn gpu_skip_invalid_arguments_write_nothing() {
    let Some(dev) = gpu("gpu_skip_invalid_arguments_write_nothing") else {
        return;
    };
    let s: &Arc<CudaStream> = dev.stream();
    let (b, r) = (3usize, 8usize);
    let n = b * r;
    let fill = vec![7.0f32; n];
    let mut res = dev.upload(&fill).unwrap();
    let br = dev.upload(&vec![1.0f32; n]).unwrap();
    let br_short = dev.upload(&vec![1.0f32; n - 1]).unwrap();
    let bias3 = dev.upload(&[1.0f32; 3]).unwrap();
    let k3 = dev.upload(&[1u8, 0, 1]).unwrap();
    let k2 = dev.upload(&[1u8, 0]).unwrap();
    let pk = Keep::PerSample(&k3);
    let e = |r: dropfuse::Result<()>| invalid_name(r);
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s, &mut res, &br, None, 0, pk, 1.0
        )),
        "row_len"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s, &mut res, &br, None, 5, pk, 1.0
        )),
        "residual"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s,
            &mut res.slice_mut(0..0),
            &br,
            None,
            r,
            pk,
            1.0
        )),
        "residual"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s, &mut res, &br_short, None, r, pk, 1.0
        )),
        "branch"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s,
            &mut res,
            &br,
            Some(&bias3),
            r,
            pk,
            1.0
        )),
        "bias"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s,
            &mut res,
            &br,
            Some(&bias3.slice(0..0)),
            r,
            pk,
            1.0
        )),
        "bias"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s,
            &mut res,
            &br,
            None,
            r,
            Keep::PerSample(&k2),
            1.0
        )),
        "keep"
    );
    assert_eq!(
        e(skip::stochastic_depth_in_place(
            s,
            &mut res,
            &br,
            None,
            r,
            Keep::BatchOnDevice(&k3),
            1.0
        )),
        "keep"
    );
    for bad in [f32::NAN, -1.0, f32::INFINITY] {
        assert_eq!(
            e(skip::stochastic_depth_in_place(
                s, &mut res, &br, None, r, pk, bad
            )),
            "scale"
        );
    }
    let mut out_short = dev.upload(&vec![0.0f32; n - 8]).unwrap();
    assert_eq!(
        e(skip::stochastic_depth(
            s,
            &res,
            &br,
            None,
            r,
            pk,
            1.0,
            &mut out_short
        )),
        "out"
    );
    let mut db = dev.upload(&fill).unwrap();
    let mut db_short = dev.upload(&vec![7.0f32; n - 1]).unwrap();
    assert_eq!(
        e(skip::stochastic_depth_backward(s, &br_short, r, pk, 1.0, &mut db)),
        "d_out"
    );
    assert_eq!(
        e(skip::stochastic_depth_backward(s, &br, r, pk, 1.0, &mut db_short)),
        "d_branch"
    );
    let mut dbias = dev.upload(&[7.0f32; 4]).unwrap();
    let mut dbias3 = dev.upload(&[7.0f32; 3]).unwrap();
    let ws_len = skip::stochastic_depth_workspace_len(b, r, 4).unwrap();
    let mut ws_short = dev.upload(&vec![7.0f32; ws_len - 1]).unwrap();
    let mut ws = dev.upload(&vec![7.0f32; ws_len]).unwrap();
    assert_eq!(
        e(skip::stochastic_depth_backward_bias(
            s,
            &br,
            r,
            pk,
            1.0,
            &mut db,
            &mut dbias3,
            &mut ws
        )),
        "bias"
    );
    assert_eq!(
        e(skip::stochastic_depth_backward_bias(
            s,
            &br,
            r,
            pk,
            1.0,
            &mut db,
            &mut dbias,
            &mut ws_short
        )),
        "workspace"
    );
    assert_eq!(
        dev.download(&res).unwrap(),
        fill,
        "residual written despite an error"
    );
    assert_eq!(
        dev.download(&db).unwrap(),
        fill,
        "d_branch written despite an error"
    );
    assert_eq!(dev.download(&dbias).unwrap(), [7.0f32; 4]);
    assert_eq!(dev.download(&ws).unwrap(), vec![7.0f32; ws_len]);

    // Compaction.
    assert_eq!(invalid_name(SampleSlots::new(s, 0)), "keep");
    let mut slots = SampleSlots::from_keep(s, &k3).unwrap();
    assert_eq!(invalid_name(slots.compute(s, &k2)), "keep");
    let x = dev.upload(&fill).unwrap();
    let mut c = dev.upload(&vec![7.0f32; 2 * r]).unwrap();
    let mut c_odd = dev.upload(&vec![7.0f32; 2 * r + 1]).unwrap();
    assert_eq!(e(skip::gather_samples(s, &slots, &x, 0, &mut c)), "row_len");
    assert_eq!(e(skip::gather_samples(s, &slots, &br_short, r, &mut c)), "x");
    assert_eq!(e(skip::gather_samples(s, &slots, &x, r, &mut c_odd)), "out");
    assert_eq!(
        invalid_name(skip::gather_samples_checked(s, &slots, &x, r, &mut c_odd)),
        "out"
    );
    let mut y = dev.upload(&fill).unwrap();
    let mut y_short = dev.upload(&vec![7.0f32; n - 1]).unwrap();
    assert_eq!(
        e(skip::scatter_samples(s, &slots, &x, &c_odd, r, &mut y)),
        "compact"
    );
    assert_eq!(
        e(skip::scatter_samples(s, &slots, &x, &c, r, &mut y_short)),
        "out"
    );
    assert_eq!(
        e(skip::scatter_samples_backward(
            s,
            &slots,
            &x,
            r,
            &mut y_short,
            &mut c
        )),
        "d_x"
    );
    assert_eq!(
        e(skip::scatter_samples_backward(
            s, &slots, &x, r, &mut y, &mut c_odd
        )),
        "d_compact"
    );
    assert_eq!(
        e(skip::scatter_samples_backward(
            s, &slots, &br_short, r, &mut y, &mut c
        )),
        "d_out"
    );
    assert_eq!(
        e(skip::scatter_add_samples(s, &slots, &mut y, &c, r, -1.0)),
        "scale"
    );
    assert_eq!(
        e(skip::scatter_add_samples(s, &slots, &mut y_short, &c, r, 1.0)),
        "x"
    );
    assert_eq!(
        e(skip::scatter_add_samples_backward(
            s,
            &slots,
            &x,
            r,
            f32::NAN,
            &mut c
        )),
        "scale"
    );
    assert_eq!(
        e(skip::scatter_add_samples_backward(
            s, &slots, &x, r, 1.0, &mut c_odd
        )),
        "d_compact"
    );
    assert_eq!(
        e(skip::gather_samples_backward(s, &slots, &c_odd, r, &mut y)),
        "d_compact"
    );
    assert_eq!(
        e(skip::gather_samples_backward(s, &slots, &c, r, &mut y_short)),
        "d_x"
    );
    assert_eq!(dev.download(&c).unwrap(), vec![7.0f32; 2 * r]);
    assert_eq!(dev.download(&c_odd).unwrap(), vec![7.0f32; 2 * r + 1]);
    assert_eq!(dev.download(&y).unwrap(), fill);
    assert_eq!(dev.download(&y_short).unwrap(), vec![7.0f32; n - 1]);
}

/// More than 2^32 elements (bf16, 3 rows of 1 431 655 768 = 2^32 + 8 elements in all, about 8 GiB
/// per tensor): 64-bit indexing in the stochastic-depth kernel (with a bias of period 8) and in
/// gather / scatter-add. Windows at the start of every row, in the dropped row, and at the end of
/// the tensor (across element 2^32) are checked against the reference.
#[test]
fn gpu_skip_huge_tensor_over_2_pow_32() {
    let test = "gpu_skip_huge_tensor_over_2_pow_32";
    let Some(dev) = gpu(test) else {
        return;
    };
    let (batch, r) = (3usize, 1_431_655_768usize);
    let n = batch * r;
    assert!(n > 1 << 32);
    let (free, _) = dev.context().mem_get_info().unwrap();
    let need = 2 * n * 2 + 2 * r * 2 + (1 << 30);
    if free < need {
        common::skip(test, &format!("needs {need} bytes of GPU memory, {free} free"));
        return;
    }
    let s = dev.stream();
    const PLANE: usize = 1 << 20;
    let finite = |v: bf16| if v.to_f32().is_finite() { v } else { bf16::ONE };
    let px: Vec<bf16> = values::<bf16>(PLANE, 11).into_iter().map(finite).collect();
    let pf: Vec<bf16> = values::<bf16>(PLANE, 12).into_iter().map(finite).collect();
    let fill_pattern = |pattern: &[bf16]| {
        let pd = dev.upload(pattern).unwrap();
        let mut t = dev.zeros::<bf16>(n).unwrap();
        let mut at = 0;
        while at < n {
            let len = PLANE.min(n - at);
            s.memcpy_dtod(&pd.slice(0..len), &mut t.slice_mut(at..at + len))
                .unwrap();
            at += len;
        }
        t
    };
    let mut x = fill_pattern(&px);
    let f = fill_pattern(&pf);
    let bias: Vec<bf16> = values::<bf16>(8, 13).into_iter().map(finite).collect();
    let bd = dev.upload(&bias).unwrap();
    let flags = [true, false, true];
    let kd = dev.upload(&skip::keep_flags(&flags)).unwrap();
    let scale = reference::depth_scale(0.3, true).unwrap();
    skip::stochastic_depth_in_place(s, &mut x, &f, Some(&bd), r, Keep::PerSample(&kd), scale).unwrap();
    drop(f);
    let w = 4096usize;
    let elem = |pattern: &[bf16], i: usize| pattern[i % PLANE];
    let want_at = |i: usize| {
        let (b, j) = (i / r, i % r);
        if flags[b] {
            let t = elem(&pf, i).to_f32() + bias[j % 8].to_f32();
            bf16::from_f32(elem(&px, i).to_f32() + scale * t)
        } else {
            elem(&px, i)
        }
    };
    let windows = [0, r, r + r / 2, 2 * r, n - w];
    for &start in &windows {
        let got = dev.download(&x.slice(start..start + w)).unwrap();
        for (k, g) in got.iter().enumerate() {
            let want = want_at(start + k);
            assert_eq!(g.to_bits(), want.to_bits(), "forward element {}", start + k);
        }
    }
    // gather the two kept samples, then scatter-add them back with scale 0.5.
    let slots = SampleSlots::from_keep(s, &kd).unwrap();
    let mut compact = dev.zeros::<bf16>(2 * r).unwrap();
    skip::gather_samples(s, &slots, &x, r, &mut compact).unwrap();
    for &(crow, start) in &[(0usize, 0usize), (1, 2 * r), (1, n - w)] {
        let off = crow * r + (start - if crow == 0 { 0 } else { 2 * r });
        let got = dev.download(&compact.slice(off..off + w)).unwrap();
        let want = dev.download(&x.slice(start..start + w)).unwrap();
        assert_eq!(got, want, "gathered window at {start}");
    }
    let before = dev.download(&x.slice(n - w..n)).unwrap();
    skip::scatter_add_samples(s, &slots, &mut x, &compact, r, 0.5).unwrap();
    let after = dev.download(&x.slice(n - w..n)).unwrap();
    for (k, (a, b)) in after.iter().zip(&before).enumerate() {
        let want = bf16::from_f32(b.to_f32() + 0.5 * b.to_f32());
        assert_eq!(a.to_bits(), want.to_bits(), "scatter-add element {}", n - w + k);
    }
}

// ------------------------------------------------------------------------------------------------
// Without a GPU

#[test]
fn header_constants_match_the_reference() {
    assert_eq!(
        dropfuse::ffi::DROPFUSE_D_BIAS_CHUNK as usize,
        reference::D_BIAS_CHUNK
    );
    assert_eq!(skip::D_BIAS_CHUNK, 256);
    assert_eq!(SLOT_NONE, u32::MAX);
}

#[test]
fn workspace_len_is_one_partial_per_chunk_and_bias_element() {
    assert_eq!(
        skip::stochastic_depth_workspace_len(16, 4096 * 4096, 4096).unwrap(),
        256 * 4096
    );
    assert_eq!(skip::stochastic_depth_workspace_len(1, 8, 8).unwrap(), 8);
    assert_eq!(skip::stochastic_depth_workspace_len(300, 16, 16).unwrap(), 2 * 16);
    assert_eq!(skip::stochastic_depth_workspace_len(1, 1 << 20, 1).unwrap(), 4096);
    assert_eq!(skip::stochastic_depth_workspace_len(3, 10, 5).unwrap(), 5);
    assert_eq!(
        invalid_name(skip::stochastic_depth_workspace_len(3, 0, 1)),
        "row_len"
    );
    assert_eq!(
        invalid_name(skip::stochastic_depth_workspace_len(3, 10, 3)),
        "bias"
    );
    assert_eq!(
        invalid_name(skip::stochastic_depth_workspace_len(3, 10, 0)),
        "bias"
    );
}

#[test]
fn keep_flags_and_capacity_check() {
    assert_eq!(skip::keep_flags(&[true, false, true]), vec![1u8, 0, 1]);
    assert!(skip::keep_flags(&[]).is_empty());
    assert!(skip::check_capacity(3, 3).is_ok());
    assert!(skip::check_capacity(0, 0).is_ok());
    assert_eq!(invalid_name(skip::check_capacity(4, 3)), "capacity");
    // The reference raises the same error for the same buffer.
    let keep = [true, true, false, true];
    let mut out = vec![0.0f32; 2 * 3];
    assert_eq!(
        invalid_name(reference::gather_samples_into(&[0.0f32; 12], 3, &keep, &mut out)),
        "capacity"
    );
}
