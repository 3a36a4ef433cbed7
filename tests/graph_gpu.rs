//! CUDA-graph-safe randomness (issue 7, section 4): random kernels that read `(seed, offset)` from
//! a [`DevicePhilox`] draw exactly what the same call with the host state draws, and a captured
//! CUDA graph that advances the device offset replays with fresh numbers: replay `k` equals the
//! eager call at offset `o + k`, bit for bit. Without a GPU every test prints a SKIPPED line.

mod common;

use common::gpu;
use dropfuse::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::drop_block::{stats_len, DropBlock};
use dropfuse::dropout::mask_words;
use dropfuse::rng::DevicePhilox;
use dropfuse::{Device, Dropout, PhiloxState};
use half::f16;

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
