//! CUDA-graph-safe randomness (issue 7, section 4): random kernels that read `(seed, offset)` from
//! a [`DevicePhilox`] draw exactly what the same call with the host state draws, and a captured
//! CUDA graph that advances the device offset replays with fresh numbers: replay `k` equals the
//! eager call at offset `o + k * streams`, bit for bit, for every family of random kernels
//! (dropout, DropBlock, structured dropout, MC-dropout replicas, multi-sample dropout, bias +
//! dropout + residual) and the multi-sample dropout head's whole training step (its cuBLAS GEMMs
//! included). Without a GPU (or without libcublas, for the head) every GPU test prints a SKIPPED
//! line; the launchers' rejection of a misaligned device state runs without one.

mod common;

use std::cell::RefCell;
use std::sync::{Mutex, MutexGuard};

use common::gpu;
use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad};
use dropfuse::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::drop_block::{stats_len, DropBlock};
use dropfuse::dropout::mask_words;
use dropfuse::mc_dropout::McDropout;
use dropfuse::multi_sample::{masks_len, HeadWorkspace, MultiSample, MultiSampleHead};
use dropfuse::rng::{DevicePhilox, Randomness};
use dropfuse::structured::StructuredDropout;
use dropfuse::{ffi, Device, Dropout, PhiloxState};
use half::f16;

/// The GPU tests of this binary run one at a time, each holding this lock for its whole body
/// (declared before the device and the buffers, so they are freed before it is released): a
/// capture in `CU_STREAM_CAPTURE_MODE_GLOBAL` makes potentially unsafe calls (allocations,
/// synchronous copies) of every thread fail, and such a call invalidates the capture.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the others still run.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn values(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0)
        })
        .collect()
}

fn bits(v: &[f16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Eager dropout with the host state `state`: (y, mask).
fn eager_dropout(
    dev: &Device,
    drop: &Dropout,
    state: PhiloxState,
    x: &CudaSlice<f16>,
) -> (Vec<u16>, Vec<u32>) {
    let n = x.len();
    let mut y = dev.zeros::<f16>(n).unwrap();
    let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
    drop.forward(dev.stream(), state, x, &mut y, &mut m).unwrap();
    (bits(&dev.download(&y).unwrap()), dev.download(&m).unwrap())
}

#[test]
fn gpu_device_state_equals_host_state() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_device_state_equals_host_state") else {
        return;
    };
    // Lengths with tails, offsets that are and are not multiples of 4 (both kernel variants).
    for (n, element_offset) in [
        (1usize, 0u64),
        (1000, 3),
        (1 << 20, 0),
        ((1 << 20) + 13, 5),
        (77_777, 1 << 36),
    ] {
        let x = dev.upload(&values(n, n as u64)).unwrap();
        let drop = Dropout::new(0.3).unwrap().with_element_offset(element_offset);
        for (seed, offset, add) in [(7u64, 0u64, 0u64), (u64::MAX, u64::MAX, 1), (42, 1 << 40, 17)] {
            let host = PhiloxState::new(seed, offset.wrapping_add(add));
            let state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, offset)).unwrap();
            let (want_y, want_m) = eager_dropout(&dev, &drop, host, &x);

            let mut y = dev.zeros::<f16>(n).unwrap();
            let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
            drop.forward(dev.stream(), state.at(add), &x, &mut y, &mut m)
                .unwrap();
            assert_eq!(
                bits(&dev.download(&y).unwrap()),
                want_y,
                "forward y, n {n}, add {add}"
            );
            assert_eq!(
                dev.download(&m).unwrap(),
                want_m,
                "forward mask, n {n}, add {add}"
            );

            let mut m2 = dev.zeros::<u32>(mask_words(n)).unwrap();
            drop.mask(dev.stream(), state.at(add), n, &mut m2).unwrap();
            assert_eq!(
                dev.download(&m2).unwrap(),
                want_m,
                "mask kernel, n {n}, add {add}"
            );

            let mut y2 = dev.zeros::<f16>(n).unwrap();
            drop.forward_maskless(dev.stream(), state.at(add), &x, &mut y2)
                .unwrap();
            assert_eq!(
                bits(&dev.download(&y2).unwrap()),
                want_y,
                "mask-free, n {n}, add {add}"
            );
        }
    }
}

#[test]
fn gpu_advance_and_set() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_advance_and_set") else {
        return;
    };
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(5, u64::MAX - 1)).unwrap();
    state.advance(dev.stream(), 3).unwrap();
    assert_eq!(
        state.get(dev.stream()).unwrap(),
        PhiloxState::new(5, 1),
        "wrapping advance"
    );
    state.advance(dev.stream(), 0).unwrap();
    assert_eq!(state.get(dev.stream()).unwrap(), PhiloxState::new(5, 1));
    state.set(dev.stream(), PhiloxState::new(9, 10)).unwrap();
    assert_eq!(state.get(dev.stream()).unwrap(), PhiloxState::new(9, 10));
}

/// Captures `body` (which must read `state`) followed by `state.advance(streams)` into a graph,
/// replays it `replays` times and returns what `read` sees after each replay.
fn replay<R>(
    dev: &Device,
    state: &mut DevicePhilox,
    streams: u64,
    replays: usize,
    mut body: impl FnMut(&DevicePhilox),
    mut read: impl FnMut() -> R,
) -> Vec<R> {
    let stream = dev.stream().clone();
    // One eager call first, as PyTorch advises before capturing: first calls load modules, cache
    // launch parameters and set kernel attributes, none of which this test is about. The body
    // only reads the state (the advance is captured below), and its outputs are overwritten.
    body(state);
    dev.synchronize().unwrap();
    // cudarc's cross-stream event tracking is not needed (one stream) and not capturable.
    unsafe { dev.context().disable_event_tracking() };
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        .unwrap();
    body(state);
    state.advance(&stream, streams).unwrap();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    let mut out = Vec::new();
    for _ in 0..replays {
        graph.launch().unwrap();
        dev.synchronize().unwrap();
        out.push(read());
    }
    drop(graph);
    unsafe { dev.context().enable_event_tracking() };
    out
}

#[test]
fn gpu_graph_replay_k_equals_eager_offset_k() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_graph_replay_k_equals_eager_offset_k") else {
        return;
    };
    let n = (1 << 16) + 5;
    let (seed, o) = (1234u64, 100u64);
    let x = dev.upload(&values(n, 9)).unwrap();
    let drop = Dropout::new(0.25).unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    let y = std::cell::RefCell::new(dev.zeros::<f16>(n).unwrap());
    let m = std::cell::RefCell::new(dev.zeros::<u32>(mask_words(n)).unwrap());
    let got = replay(
        &dev,
        &mut state,
        1,
        4,
        |s| {
            drop.forward(dev.stream(), s, &x, &mut *y.borrow_mut(), &mut *m.borrow_mut())
                .unwrap()
        },
        || {
            (
                bits(&dev.download(&*y.borrow()).unwrap()),
                dev.download(&*m.borrow()).unwrap(),
            )
        },
    );
    let mut distinct = std::collections::HashSet::new();
    for (k, (gy, gm)) in got.iter().enumerate() {
        let (wy, wm) = eager_dropout(&dev, &drop, PhiloxState::new(seed, o + k as u64), &x);
        assert_eq!(gy, &wy, "replay {k}: y");
        assert_eq!(gm, &wm, "replay {k}: mask");
        distinct.insert(gm.clone());
    }
    assert_eq!(distinct.len(), got.len(), "every replay draws a fresh mask");
    assert_eq!(state.get(dev.stream()).unwrap(), PhiloxState::new(seed, o + 4));
}

#[test]
fn gpu_graph_replay_drop_block() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_graph_replay_drop_block") else {
        return;
    };
    let shape = [2usize, 3, 17, 19];
    let numel: usize = shape.iter().product();
    let (seed, o) = (77u64, 5u64);
    let db = DropBlock::new(0.2, 3).unwrap();
    let x = dev.upload(&values(numel, 3)).unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    let y = std::cell::RefCell::new(dev.zeros::<f16>(numel).unwrap());
    let m = std::cell::RefCell::new(dev.zeros::<u32>(mask_words(numel)).unwrap());
    let st = std::cell::RefCell::new(dev.zeros::<u64>(stats_len(&shape).unwrap()).unwrap());
    // Two DropBlock layers per replay: streams `o` and `o + 1`; the graph advances by 2.
    let y2 = std::cell::RefCell::new(dev.zeros::<f16>(numel).unwrap());
    let got = replay(
        &dev,
        &mut state,
        2,
        3,
        |s| {
            db.forward(
                dev.stream(),
                s.at(0),
                &shape,
                &x,
                &mut *y.borrow_mut(),
                &mut *m.borrow_mut(),
                &mut *st.borrow_mut(),
            )
            .unwrap();
            db.forward(
                dev.stream(),
                s.at(1),
                &shape,
                &x,
                &mut *y2.borrow_mut(),
                &mut *m.borrow_mut(),
                &mut *st.borrow_mut(),
            )
            .unwrap();
        },
        || {
            (
                bits(&dev.download(&*y.borrow()).unwrap()),
                bits(&dev.download(&*y2.borrow()).unwrap()),
            )
        },
    );
    for (k, (g1, g2)) in got.iter().enumerate() {
        for (layer, g) in [(0u64, g1), (1, g2)] {
            let mut wy = dev.zeros::<f16>(numel).unwrap();
            let mut wm = dev.zeros::<u32>(mask_words(numel)).unwrap();
            let mut ws = dev.zeros::<u64>(stats_len(&shape).unwrap()).unwrap();
            let host = PhiloxState::new(seed, o + 2 * k as u64 + layer);
            db.forward(dev.stream(), host, &shape, &x, &mut wy, &mut wm, &mut ws)
                .unwrap();
            assert_eq!(g, &bits(&dev.download(&wy).unwrap()), "replay {k}, layer {layer}");
        }
    }
    assert_ne!(got[0].0, got[1].0, "replays draw fresh masks");
}

// ---- the other random families: device state == host state, and graph replays ----

/// `(seed, state offset, add)` triples: plain, `add != 0`, and offsets at and near `2^64` whose
/// streams (`offset + add`, and `+ t` / `+ k` for the multi-stream launches) wrap around.
const STATES: [(u64, u64, u64); 5] = [
    (7, 0, 0),
    (42, 1 << 40, 17),
    (u64::MAX, u64::MAX, 1),
    (3, u64::MAX - 2, 5),
    (11, u64::MAX - 1, 0),
];

fn dl(dev: &Device, s: &CudaSlice<f16>) -> Vec<u16> {
    bits(&dev.download(s).unwrap())
}

#[test]
fn gpu_structured_device_state_equals_host_state() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_structured_device_state_equals_host_state") else {
        return;
    };
    // Every path: planes (odd and 16-byte planes), locked (vector and scalar rows, and an
    // unaligned decision offset, which takes the general kernel), general, plain dropout.
    let layouts: [(&[usize], &[usize], u64); 8] = [
        (&[4, 6, 37], &[2], 0),
        (&[2, 33, 16, 16], &[2, 3], 3),
        (&[7, 5, 64], &[0], 0),
        (&[7, 5, 13], &[0], 4),
        (&[7, 5, 64], &[0], 3),
        (&[3, 8, 8, 11], &[1, 2], 0),
        (&[5, 3000], &[0, 1], 1),
        (&[5, 301], &[], 5),
    ];
    for (li, &(shape, shared, d_off)) in layouts.iter().enumerate() {
        let sd = StructuredDropout::shared_axes(shape, shared, 0.3)
            .unwrap()
            .with_decision_offset(d_off)
            .unwrap();
        let n = sd.numel();
        let x = dev.upload(&values(n, li as u64)).unwrap();
        for (seed, offset, add) in STATES {
            let what = format!("shape {shape:?}, shared {shared:?}, offset {offset}, add {add}");
            let host = PhiloxState::new(seed, offset.wrapping_add(add));
            let state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, offset)).unwrap();
            let mut wy = dev.zeros::<f16>(n).unwrap();
            let mut wm = dev.zeros::<u32>(sd.mask_words()).unwrap();
            sd.forward(dev.stream(), host, &x, &mut wy, &mut wm).unwrap();
            let (want_y, want_m) = (dl(&dev, &wy), dev.download(&wm).unwrap());

            let mut y = dev.zeros::<f16>(n).unwrap();
            let mut m = dev.zeros::<u32>(sd.mask_words()).unwrap();
            sd.forward(dev.stream(), state.at(add), &x, &mut y, &mut m)
                .unwrap();
            assert_eq!(dl(&dev, &y), want_y, "forward y, {what}");
            assert_eq!(dev.download(&m).unwrap(), want_m, "forward mask, {what}");

            let mut m2 = dev.zeros::<u32>(sd.mask_words()).unwrap();
            sd.mask(dev.stream(), state.at(add), &mut m2).unwrap();
            assert_eq!(dev.download(&m2).unwrap(), want_m, "mask, {what}");

            let mut y2 = dev.zeros::<f16>(n).unwrap();
            sd.forward_maskless(dev.stream(), state.at(add), &x, &mut y2)
                .unwrap();
            assert_eq!(dl(&dev, &y2), want_y, "mask-free forward, {what}");

            let mut g = dev.upload(&values(n, li as u64)).unwrap();
            sd.backward_maskless_inplace(dev.stream(), state.at(add), &mut g)
                .unwrap();
            assert_eq!(dl(&dev, &g), want_y, "mask-free backward in place, {what}");
        }
    }
}

#[test]
fn gpu_mc_dropout_device_state_equals_host_state() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_mc_dropout_device_state_equals_host_state") else {
        return;
    };
    // n * 2 bytes a multiple of 16 (vector kernel) or not, element offsets that are and are not
    // multiples of 4, tails.
    for (n, element_offset) in [(1000usize, 0u64), (1003, 3), (4096, 1 << 36), (77, 2)] {
        let mc = McDropout::new(0.3, 3)
            .unwrap()
            .with_element_offset(element_offset);
        let x = dev.upload(&values(n, n as u64)).unwrap();
        for (seed, offset, add) in STATES {
            let what = format!("n {n}, element offset {element_offset}, offset {offset}, add {add}");
            let host = PhiloxState::new(seed, offset.wrapping_add(add));
            let state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, offset)).unwrap();
            let mut wy = dev.zeros::<f16>(3 * n).unwrap();
            let mut wm = dev.zeros::<u32>(mc.masks_words(n)).unwrap();
            mc.forward(dev.stream(), host, &x, &mut wy, &mut wm).unwrap();
            let (want_y, want_m) = (dl(&dev, &wy), dev.download(&wm).unwrap());

            let mut y = dev.zeros::<f16>(3 * n).unwrap();
            let mut m = dev.zeros::<u32>(mc.masks_words(n)).unwrap();
            mc.forward(dev.stream(), state.at(add), &x, &mut y, &mut m)
                .unwrap();
            assert_eq!(dl(&dev, &y), want_y, "replicas, {what}");
            assert_eq!(dev.download(&m).unwrap(), want_m, "masks, {what}");

            let mut y2 = dev.zeros::<f16>(3 * n).unwrap();
            mc.forward_maskless(dev.stream(), state.at(add), &x, &mut y2)
                .unwrap();
            assert_eq!(dl(&dev, &y2), want_y, "mask-free replicas, {what}");
        }
    }
}

#[test]
fn gpu_multi_sample_device_state_equals_host_state() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_multi_sample_device_state_equals_host_state") else {
        return;
    };
    let k = 5;
    let ms = MultiSample::new(k, 0.4).unwrap();
    // n a multiple of 8 (vector kernels) or not (scalar kernels and tails).
    for n in [1024usize, 1005, 13] {
        let h = dev.upload(&values(n, n as u64)).unwrap();
        let grads = dev.upload(&values(k * n, 5)).unwrap();
        for (seed, offset, add) in STATES {
            let what = format!("n {n}, offset {offset}, add {add}");
            let host = PhiloxState::new(seed, offset.wrapping_add(add));
            let state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, offset)).unwrap();
            let mut wc = dev.zeros::<f16>(k * n).unwrap();
            let mut wm = dev.zeros::<u32>(masks_len(k, n)).unwrap();
            ms.copies_with_masks(dev.stream(), host, &h, &mut wc, &mut wm)
                .unwrap();
            let mut wd = dev.zeros::<f32>(n).unwrap();
            ms.reduce_maskless(dev.stream(), host, &grads, &mut wd).unwrap();
            let (want_c, want_m, want_d) = (
                dl(&dev, &wc),
                dev.download(&wm).unwrap(),
                dev.download(&wd).unwrap(),
            );

            let mut c = dev.zeros::<f16>(k * n).unwrap();
            let mut m = dev.zeros::<u32>(masks_len(k, n)).unwrap();
            ms.copies_with_masks(dev.stream(), state.at(add), &h, &mut c, &mut m)
                .unwrap();
            assert_eq!(dl(&dev, &c), want_c, "copies, {what}");
            assert_eq!(dev.download(&m).unwrap(), want_m, "masks, {what}");

            let mut c2 = dev.zeros::<f16>(k * n).unwrap();
            ms.copies(dev.stream(), state.at(add), &h, &mut c2).unwrap();
            assert_eq!(dl(&dev, &c2), want_c, "copies without masks, {what}");

            let mut d = dev.zeros::<f32>(n).unwrap();
            ms.reduce_maskless(dev.stream(), state.at(add), &grads, &mut d)
                .unwrap();
            let got: Vec<u32> = dev.download(&d).unwrap().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = want_d.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "mask-free reduce, {what}");
        }
    }
}

#[test]
fn gpu_bias_dropout_residual_device_state_equals_host_state() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_bias_dropout_residual_device_state_equals_host_state") else {
        return;
    };
    // (rows, H, element offset, data offset): the block-aligned and general vector kernels with
    // vector and scalar bias, and misaligned data (the scalar kernel).
    for (rows, h, element_offset, off) in [
        (64usize, 256usize, 0u64, 0usize),
        (33, 100, 3, 0),
        (7, 13, 1, 0),
        (9, 40, 0, 1),
    ] {
        let n = rows * h;
        let op = BiasDropoutResidual::new(0.2, h)
            .unwrap()
            .with_element_offset(element_offset);
        let xs = dev.upload(&values(n + 1, 1)).unwrap();
        let rs = dev.upload(&values(n + 1, 2)).unwrap();
        let dys = dev.upload(&values(n + 1, 3)).unwrap();
        let (x, r, dy) = (
            xs.slice(off..off + n),
            rs.slice(off..off + n),
            dys.slice(off..off + n),
        );
        let b = dev.upload(&values(h, 4)).unwrap();
        let ws = op.workspace_len(rows);
        for (seed, offset, add) in STATES {
            let what = format!("rows {rows}, H {h}, element offset {element_offset}, data offset {off}, offset {offset}, add {add}");
            let host = PhiloxState::new(seed, offset.wrapping_add(add));
            let state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, offset)).unwrap();
            // Forward with bias and mask, then the mask-free backward with and without dbias.
            let mut wy = dev.zeros::<f16>(n).unwrap();
            let mut wm = dev.zeros::<u32>(mask_words(n)).unwrap();
            op.forward(dev.stream(), host, &x, &r, Some(&b), &mut wy, &mut wm)
                .unwrap();
            let mut wdx = dev.zeros::<f16>(n).unwrap();
            let mut wdb = dev.zeros::<f16>(h).unwrap();
            let mut wws = dev.zeros::<f32>(ws).unwrap();
            op.backward_maskless(
                dev.stream(),
                host,
                &dy,
                &mut wdx,
                Some(BiasGrad {
                    dbias: &mut wdb,
                    workspace: &mut wws,
                }),
            )
            .unwrap();
            let mut wdx2 = dev.zeros::<f16>(n).unwrap();
            op.backward_maskless(dev.stream(), host, &dy, &mut wdx2, None)
                .unwrap();
            let want_y = dl(&dev, &wy);
            let want_m = dev.download(&wm).unwrap();
            let want_dx = dl(&dev, &wdx);
            let want_db = dl(&dev, &wdb);
            assert_eq!(dl(&dev, &wdx2), want_dx, "host dx with and without dbias, {what}");

            let mut y = dev.zeros::<f16>(n).unwrap();
            let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
            op.forward(dev.stream(), state.at(add), &x, &r, Some(&b), &mut y, &mut m)
                .unwrap();
            assert_eq!(dl(&dev, &y), want_y, "forward y, {what}");
            assert_eq!(dev.download(&m).unwrap(), want_m, "forward mask, {what}");

            let mut y2 = dev.upload(&dev.download(&r).unwrap()).unwrap();
            op.forward_maskless_inplace(dev.stream(), state.at(add), &x, Some(&b), &mut y2)
                .unwrap();
            assert_eq!(dl(&dev, &y2), want_y, "mask-free forward in place, {what}");

            let mut dx = dev.zeros::<f16>(n).unwrap();
            let mut db = dev.zeros::<f16>(h).unwrap();
            let mut wsp = dev.zeros::<f32>(ws).unwrap();
            op.backward_maskless(
                dev.stream(),
                state.at(add),
                &dy,
                &mut dx,
                Some(BiasGrad {
                    dbias: &mut db,
                    workspace: &mut wsp,
                }),
            )
            .unwrap();
            assert_eq!(dl(&dev, &dx), want_dx, "mask-free backward dx, {what}");
            assert_eq!(dl(&dev, &db), want_db, "mask-free backward dbias, {what}");

            let mut dx2 = dev.zeros::<f16>(n).unwrap();
            op.backward_maskless(dev.stream(), state.at(add), &dy, &mut dx2, None)
                .unwrap();
            assert_eq!(
                dl(&dev, &dx2),
                want_dx,
                "mask-free backward without dbias, {what}"
            );
        }
    }
}

#[test]
fn gpu_graph_replay_structured() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_graph_replay_structured") else {
        return;
    };
    let shape = [4usize, 24, 9, 9]; // Dropout2d: one decision per (sample, channel)
    let (seed, o) = (21u64, u64::MAX - 1); // the replays' streams wrap around 2^64
    let sd = StructuredDropout::channel(&shape, 0.5).unwrap();
    let n = sd.numel();
    let x = dev.upload(&values(n, 8)).unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    let y = RefCell::new(dev.zeros::<f16>(n).unwrap());
    let m = RefCell::new(dev.zeros::<u32>(sd.mask_words()).unwrap());
    let got = replay(
        &dev,
        &mut state,
        1,
        4,
        |s| {
            sd.forward(dev.stream(), s, &x, &mut *y.borrow_mut(), &mut *m.borrow_mut())
                .unwrap()
        },
        || (dl(&dev, &y.borrow()), dev.download(&*m.borrow()).unwrap()),
    );
    let mut distinct = std::collections::HashSet::new();
    for (k, (gy, gm)) in got.iter().enumerate() {
        let mut wy = dev.zeros::<f16>(n).unwrap();
        let mut wm = dev.zeros::<u32>(sd.mask_words()).unwrap();
        let host = PhiloxState::new(seed, o.wrapping_add(k as u64));
        sd.forward(dev.stream(), host, &x, &mut wy, &mut wm).unwrap();
        assert_eq!(gy, &dl(&dev, &wy), "replay {k}: y");
        assert_eq!(gm, &dev.download(&wm).unwrap(), "replay {k}: mask");
        distinct.insert(gm.clone());
    }
    assert_eq!(distinct.len(), got.len(), "every replay draws fresh decisions");
    assert_eq!(
        state.get(dev.stream()).unwrap(),
        PhiloxState::new(seed, o.wrapping_add(4))
    );
}

#[test]
fn gpu_graph_replay_mc_dropout() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_graph_replay_mc_dropout") else {
        return;
    };
    let (n, r) = (4096usize + 7, 4usize);
    let (seed, o) = (99u64, 1000u64);
    let mc = McDropout::new(0.25, r).unwrap();
    let x = dev.upload(&values(n, 12)).unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    let y = RefCell::new(dev.zeros::<f16>(r * n).unwrap());
    // One launch draws R streams: the graph advances the state by R.
    let got = replay(
        &dev,
        &mut state,
        r as u64,
        3,
        |s| {
            mc.forward_maskless(dev.stream(), s, &x, &mut *y.borrow_mut())
                .unwrap()
        },
        || dl(&dev, &y.borrow()),
    );
    for (k, g) in got.iter().enumerate() {
        let mut wy = dev.zeros::<f16>(r * n).unwrap();
        let host = PhiloxState::new(seed, o + (k * r) as u64);
        mc.forward_maskless(dev.stream(), host, &x, &mut wy).unwrap();
        assert_eq!(g, &dl(&dev, &wy), "replay {k}");
    }
    assert_ne!(got[0], got[1], "replays draw fresh replicas");
    assert_eq!(
        state.get(dev.stream()).unwrap(),
        PhiloxState::new(seed, o + 3 * r as u64)
    );
}

#[test]
fn gpu_graph_replay_multi_sample() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_graph_replay_multi_sample") else {
        return;
    };
    let (k, n) = (4usize, 2048usize + 3);
    let (seed, o) = (5u64, 77u64);
    let ms = MultiSample::new(k, 0.5).unwrap();
    let h = dev.upload(&values(n, 13)).unwrap();
    let grads = dev.upload(&values(k * n, 14)).unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    let c = RefCell::new(dev.zeros::<f16>(k * n).unwrap());
    let m = RefCell::new(dev.zeros::<u32>(masks_len(k, n)).unwrap());
    let d = RefCell::new(dev.zeros::<f32>(n).unwrap());
    // The forward copies and the mask-free backward in one graph, on the same K streams; the
    // graph advances the state by K.
    let got = replay(
        &dev,
        &mut state,
        k as u64,
        3,
        |s| {
            ms.copies_with_masks(dev.stream(), s, &h, &mut *c.borrow_mut(), &mut *m.borrow_mut())
                .unwrap();
            ms.reduce_maskless(dev.stream(), s, &grads, &mut *d.borrow_mut())
                .unwrap();
        },
        || {
            (
                dl(&dev, &c.borrow()),
                dev.download(&*m.borrow()).unwrap(),
                dev.download(&*d.borrow())
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<u32>>(),
            )
        },
    );
    for (r, (gc, gm, gd)) in got.iter().enumerate() {
        let host = PhiloxState::new(seed, o + (r * k) as u64);
        let mut wc = dev.zeros::<f16>(k * n).unwrap();
        let mut wm = dev.zeros::<u32>(masks_len(k, n)).unwrap();
        ms.copies_with_masks(dev.stream(), host, &h, &mut wc, &mut wm)
            .unwrap();
        let mut wd = dev.zeros::<f32>(n).unwrap();
        ms.reduce_maskless(dev.stream(), host, &grads, &mut wd).unwrap();
        assert_eq!(gc, &dl(&dev, &wc), "replay {r}: copies");
        assert_eq!(gm, &dev.download(&wm).unwrap(), "replay {r}: masks");
        let wd: Vec<u32> = dev.download(&wd).unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(gd, &wd, "replay {r}: dh");
    }
    assert_ne!(got[0].1, got[1].1, "replays draw fresh masks");
}

#[test]
fn gpu_graph_replay_bias_dropout_residual() {
    let _serial = serial();
    let Some(dev) = gpu("gpu_graph_replay_bias_dropout_residual") else {
        return;
    };
    let (rows, h) = (48usize, 160usize);
    let n = rows * h;
    let (seed, o) = (8u64, 3u64);
    let op = BiasDropoutResidual::new(0.3, h).unwrap();
    let x = dev.upload(&values(n, 15)).unwrap();
    let r = dev.upload(&values(n, 16)).unwrap();
    let b = dev.upload(&values(h, 17)).unwrap();
    let dy = dev.upload(&values(n, 18)).unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    let y = RefCell::new(dev.zeros::<f16>(n).unwrap());
    let dx = RefCell::new(dev.zeros::<f16>(n).unwrap());
    let db = RefCell::new(dev.zeros::<f16>(h).unwrap());
    let ws = RefCell::new(dev.zeros::<f32>(op.workspace_len(rows)).unwrap());
    // Forward and mask-free backward (with dbias) of one layer, on the same stream.
    let got = replay(
        &dev,
        &mut state,
        1,
        3,
        |s| {
            op.forward_maskless(dev.stream(), s.at(0), &x, &r, Some(&b), &mut *y.borrow_mut())
                .unwrap();
            let (mut dbm, mut wsm) = (db.borrow_mut(), ws.borrow_mut());
            op.backward_maskless(
                dev.stream(),
                s.at(0),
                &dy,
                &mut *dx.borrow_mut(),
                Some(BiasGrad {
                    dbias: &mut *dbm,
                    workspace: &mut *wsm,
                }),
            )
            .unwrap();
        },
        || {
            (
                dl(&dev, &y.borrow()),
                dl(&dev, &dx.borrow()),
                dl(&dev, &db.borrow()),
            )
        },
    );
    for (k, (gy, gdx, gdb)) in got.iter().enumerate() {
        let host = PhiloxState::new(seed, o + k as u64);
        let mut wy = dev.zeros::<f16>(n).unwrap();
        op.forward_maskless(dev.stream(), host, &x, &r, Some(&b), &mut wy)
            .unwrap();
        let mut wdx = dev.zeros::<f16>(n).unwrap();
        let mut wdb = dev.zeros::<f16>(h).unwrap();
        let mut wws = dev.zeros::<f32>(op.workspace_len(rows)).unwrap();
        op.backward_maskless(
            dev.stream(),
            host,
            &dy,
            &mut wdx,
            Some(BiasGrad {
                dbias: &mut wdb,
                workspace: &mut wws,
            }),
        )
        .unwrap();
        assert_eq!(gy, &dl(&dev, &wy), "replay {k}: y");
        assert_eq!(gdx, &dl(&dev, &wdx), "replay {k}: dx");
        assert_eq!(gdb, &dl(&dev, &wdb), "replay {k}: dbias");
    }
    assert_ne!(got[0].0, got[1].0, "replays draw fresh masks");
}

// ---- the multi-sample dropout head (masked copies, cuBLAS GEMMs, cross-entropy, backward) ----

/// One head with its workspace, inputs and gradients: a forward + backward step and what it wrote.
struct HeadRun {
    head: MultiSampleHead,
    ws: HeadWorkspace<f16>,
    h: CudaSlice<f16>,
    w: CudaSlice<f16>,
    bias: CudaSlice<f16>,
    labels: CudaSlice<i64>,
    dh: CudaSlice<f32>,
    dw: CudaSlice<f32>,
    db: CudaSlice<f32>,
}

impl HeadRun {
    fn new(dev: &Device, head: MultiSampleHead, (b, d, c): (usize, usize, usize)) -> Self {
        // Weights small enough for logits of a few units (h is in [-8, 8)).
        let w: Vec<f16> = values(c * d, 31)
            .iter()
            .map(|x| f16::from_f32(x.to_f32() / 64.0))
            .collect();
        let labels: Vec<i64> = (0..b as i64)
            .map(|i| if i % 5 == 2 { -100 } else { (i * 7) % c as i64 })
            .collect();
        HeadRun {
            head,
            ws: head.workspace::<f16>(dev, b, d, c).unwrap(),
            h: dev.upload(&values(b * d, 30)).unwrap(),
            w: dev.upload(&w).unwrap(),
            bias: dev.upload(&values(c, 32)).unwrap(),
            labels: dev.upload(&labels).unwrap(),
            dh: dev.zeros::<f32>(b * d).unwrap(),
            dw: dev.zeros::<f32>(c * d).unwrap(),
            db: dev.zeros::<f32>(c).unwrap(),
        }
    }

    /// Forward with `state`, then the backward (which reads the stored masks, not the state).
    fn step<R: Randomness>(&mut self, state: R) {
        self.head
            .forward(
                &mut self.ws,
                state,
                &self.h,
                &self.w,
                Some(&self.bias),
                &self.labels,
            )
            .unwrap();
        self.head
            .backward(
                &mut self.ws,
                &self.h,
                &self.w,
                &mut self.dh,
                &mut self.dw,
                Some(&mut self.db),
                1.0,
            )
            .unwrap();
    }

    /// Every output as bits: loss, masks, copies, logits, scaled dz, dh, dW, db.
    fn read(&self, dev: &Device) -> Vec<(&'static str, Vec<u32>)> {
        let f32s = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let f16s = |v: Vec<f16>| v.iter().map(|x| u32::from(x.to_bits())).collect::<Vec<u32>>();
        let mut out = vec![("loss", vec![self.ws.read_loss().unwrap().to_bits()])];
        if let (Some(m), Some(cp)) = (self.ws.masks(), self.ws.copies()) {
            out.push(("masks", dev.download(&m).unwrap()));
            out.push(("copies", f16s(dev.download(&cp).unwrap())));
        }
        out.push(("logits", f32s(dev.download(&self.ws.logits()).unwrap())));
        out.push(("dz", f16s(dev.download(&self.ws.scaled_logits_grad()).unwrap())));
        out.push(("dh", f32s(dev.download(&self.dh).unwrap())));
        out.push(("dw", f32s(dev.download(&self.dw).unwrap())));
        out.push(("db", f32s(dev.download(&self.db).unwrap())));
        out
    }
}

fn assert_same(got: &[(&str, Vec<u32>)], want: &[(&str, Vec<u32>)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for ((name, g), (_, w)) in got.iter().zip(want) {
        assert!(g == w, "{what}: {name} differs");
    }
}

#[test]
fn gpu_multi_sample_head_device_state_equals_host_state() {
    let _serial = serial();
    let Some(dev) = common::gpu_with_cublas("gpu_multi_sample_head_device_state_equals_host_state") else {
        return;
    };
    // n = B * D = 240 (a multiple of 8: vector copies) and 6 * 13 = 78 (scalar copies, tails).
    for (b, d, c) in [(6usize, 40usize, 11usize), (6, 13, 5)] {
        for train in [true, false] {
            let head = MultiSampleHead::new(3, 0.4)
                .unwrap()
                .with_label_smoothing(0.1)
                .unwrap()
                .with_train(train);
            // One workspace (one cuBLAS handle) for both runs of a case.
            let mut run = HeadRun::new(&dev, head, (b, d, c));
            for (seed, offset, add) in STATES {
                let what = format!("B {b}, D {d}, C {c}, train {train}, offset {offset}, add {add}");
                run.step(PhiloxState::new(seed, offset.wrapping_add(add)));
                let want = run.read(&dev);
                let state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, offset)).unwrap();
                run.step(state.at(add));
                assert_same(&run.read(&dev), &want, &format!("state.at(add), {what}"));
                if add == 0 {
                    run.step(&state);
                    assert_same(&run.read(&dev), &want, &format!("&state, {what}"));
                }
            }
        }
    }
}

#[test]
fn gpu_graph_replay_multi_sample_head() {
    let _serial = serial();
    let Some(dev) = common::gpu_with_cublas("gpu_graph_replay_multi_sample_head") else {
        return;
    };
    let k = 4usize;
    // The replays' streams o + r * K wrap around 2^64.
    let (seed, o) = (17u64, u64::MAX - 5);
    let head = MultiSampleHead::new(k, 0.3)
        .unwrap()
        .with_label_smoothing(0.1)
        .unwrap();
    let run = RefCell::new(HeadRun::new(&dev, head, (16, 64, 10)));
    // Warm-up outside the capture: cuBLAS loads its kernels and picks its algorithms on a first
    // call. During the capture it allocates nothing (the handle has its own workspace, set with
    // cublasSetWorkspace), so the GEMMs are captured along with the dropfuse kernels.
    run.borrow_mut().step(PhiloxState::new(seed, 0));
    dev.synchronize().unwrap();
    let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(seed, o)).unwrap();
    // The whole training step (copies, bias, logits GEMM, cross-entropy, dh GEMM + masked
    // reduction, dW GEMM, db) in one graph, which then advances the state by K.
    let got = replay(
        &dev,
        &mut state,
        k as u64,
        3,
        |s| run.borrow_mut().step(s),
        || run.borrow().read(&dev),
    );
    for (r, g) in got.iter().enumerate() {
        run.borrow_mut()
            .step(PhiloxState::new(seed, o.wrapping_add((r * k) as u64)));
        assert_same(g, &run.borrow().read(&dev), &format!("replay {r}"));
    }
    let masks = |r: usize| &got[r].iter().find(|(n, _)| *n == "masks").unwrap().1;
    assert_ne!(masks(0), masks(1), "replays draw fresh masks");
    assert_ne!(got[0][0], got[1][0], "and give another loss");
    assert_eq!(
        state.get(dev.stream()).unwrap(),
        PhiloxState::new(seed, o.wrapping_add(3 * k as u64))
    );
}

/// Every launcher that takes a device Philox state rejects a misaligned one with
/// cudaErrorInvalidValue before any CUDA call (so this runs without a GPU; the data pointers are
/// never dereferenced).
#[test]
fn launchers_reject_a_misaligned_device_state() {
    const INVALID_VALUE: i32 = 1;
    let fake = 0x10000usize;
    let (data, mask) = (fake as *mut std::ffi::c_void, fake as *mut u32);
    let f16t = ffi::dropfuse_dtype::DROPFUSE_F16;
    let null = std::ptr::null_mut();
    // [4 non-shared, 8 shared]: 4 planes of 8 elements (the planes path).
    let mut layout = ffi::dropfuse_structured_layout {
        groups: 2,
        numel: 32,
        decisions: 4,
        ..Default::default()
    };
    layout.extent[0] = 4;
    layout.extent[1] = 8;
    layout.decision_stride[0] = 1;
    for misalign in [1usize, 4, 7] {
        let dev_state = (fake + misalign) as *const u64;
        let dp = ffi::dropfuse_dropout_params {
            seed: 1,
            offset: 2,
            element_offset: 0,
            threshold: 1 << 31,
            scale: 2.0,
            philox_dev: dev_state,
        };
        let mp = ffi::dropfuse_multi_sample_params {
            seed: 1,
            offset: 2,
            k: 2,
            threshold: 1 << 31,
            scale: 2.0,
            philox_dev: dev_state,
        };
        // SAFETY: every launcher returns before using a pointer or calling CUDA.
        let statuses = unsafe {
            [
                (
                    "structured mask",
                    ffi::dropfuse_structured_mask(mask, &layout, &dp, null),
                ),
                (
                    "structured forward",
                    ffi::dropfuse_structured_forward(f16t, data, data, mask, &layout, &dp, null),
                ),
                (
                    "mc dropout",
                    ffi::dropfuse_mc_dropout_forward(f16t, data, data, mask, 64, 2, &dp, null),
                ),
                (
                    "multi-sample copies",
                    ffi::dropfuse_multi_sample_copies(f16t, data, data, mask, 64, &mp, null),
                ),
                (
                    "multi-sample reduce",
                    ffi::dropfuse_multi_sample_reduce(
                        f16t,
                        data,
                        f16t,
                        data,
                        std::ptr::null(),
                        64,
                        &mp,
                        null,
                    ),
                ),
                (
                    "bias dropout residual forward",
                    ffi::dropfuse_bias_dropout_residual_forward(
                        f16t, data, data, data, data, mask, 2, 8, &dp, null,
                    ),
                ),
                (
                    "bias dropout residual backward",
                    ffi::dropfuse_bias_dropout_residual_backward(
                        f16t,
                        data,
                        data,
                        std::ptr::null(),
                        data,
                        fake as *mut f32,
                        2,
                        8,
                        &dp,
                        null,
                    ),
                ),
            ]
        };
        for (what, status) in statuses {
            assert_eq!(status, INVALID_VALUE, "{what}, misaligned by {misalign}");
        }
    }
}
