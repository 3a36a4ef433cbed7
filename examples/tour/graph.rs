//! Graph-safe randomness in the tour (`dropfuse::rng::DevicePhilox`): dropout forward reading
//! `{seed, offset}` from device memory (`state.at(add)`, the offset wrapping around 2^64) against
//! the same call with the host state `{seed, offset + add}` and against
//! `dropfuse::reference::dropout`, bit for bit (mask and output); then the mask-free forward after
//! `DevicePhilox::advance`, against the host state it advanced to.

use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout as reference;
use dropfuse::rng::DevicePhilox;
use dropfuse::{Device, Dropout, Element, Generator, PhiloxState};

use crate::{
    download, element_mismatches, mask_mismatches, push_rows, random_input, time_copy, time_ms, BoxResult,
    Family, Row, Scale, CPU_N, GPU_N, P,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// The stream added to the device offset, which is set so that `offset + ADD` wraps.
const ADD: u64 = 5;
/// What `advance` adds before the mask-free call.
const ADVANCE: u64 = 3;

fn n(scale: Scale) -> usize {
    match scale {
        Scale::Full => GPU_N,
        Scale::Small => (1 << 16) + 37,
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!(
        "graph-safe randomness: dropout p = {P}, n = {}, a DevicePhilox at offset 2^64 - 2, stream + {ADD}, \
         then advanced by {ADVANCE}",
        n(scale)
    )]
}

fn gpu(dev: &Device, scale: Scale, rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let n = n(scale);
    gpu_dtype::<f16>(dev, n, rng.next().seed ^ 1, 101, rows)?;
    gpu_dtype::<bf16>(dev, n, rng.next().seed ^ 2, 102, rows)?;
    gpu_dtype::<f32>(dev, n, rng.next().seed ^ 3, 103, rows)
}

fn gpu_dtype<T: Element>(dev: &Device, n: usize, seed: u64, data: u64, rows: &mut Vec<Row>) -> BoxResult<()> {
    let st = dev.stream();
    let size = T::DTYPE.size() as u64;
    let drop = Dropout::new(P)?;
    let start = PhiloxState::new(seed, u64::MAX - 1);
    let host = PhiloxState::new(seed, start.offset.wrapping_add(ADD));
    let x_host: Vec<T> = random_input(n, data);
    let (want_y, want_m) = reference::forward(&x_host, P, host, 0)?;
    let x = dev.upload(&x_host)?;

    // The device state against the host state and the reference.
    let mut state = DevicePhilox::new(st, start)?;
    let mut y = dev.zeros::<T>(n)?;
    let mut m = dev.zeros::<u32>(mask_words(n))?;
    drop.forward(st, state.at(ADD), &x, &mut y, &mut m)?;
    let (got_y, got_m) = (download(dev, &y)?, dev.download(&m)?);
    let mut yh = dev.zeros::<T>(n)?;
    let mut mh = dev.zeros::<u32>(mask_words(n))?;
    drop.forward(st, host, &x, &mut yh, &mut mh)?;
    let dev_bad = element_mismatches(&got_y, &download(dev, &yh)?)
        + mask_mismatches(&got_m, &dev.download(&mh)?)
        + element_mismatches(&got_y, &want_y)
        + mask_mismatches(&got_m, &want_m)
        + usize::from(state.get(st)? != start);

    // advance, then the device offset itself (add 0).
    state.advance(st, ADVANCE)?;
    let advanced = PhiloxState::new(seed, start.offset.wrapping_add(ADVANCE));
    let (want_y2, _) = reference::forward(&x_host, P, advanced, 0)?;
    let mut y2 = dev.zeros::<T>(n)?;
    drop.forward_maskless(st, &state, &x, &mut y2)?;
    let adv_bad =
        element_mismatches(&download(dev, &y2)?, &want_y2) + usize::from(state.get(st)? != advanced);

    let data_bytes = 2 * n as u64 * size;
    let mbytes = 4 * mask_words(n) as u64;
    let copy_ms = time_copy(dev, &x)?;
    let fwd_ms = time_ms(dev, || drop.forward(st, state.at(ADD), &x, &mut y, &mut m))?;
    let ml_ms = time_ms(dev, || drop.forward_maskless(st, &state, &x, &mut y2))?;
    let table = [
        (
            "dropout_forward_device_philox",
            dev_bad,
            fwd_ms,
            data_bytes + mbytes,
        ),
        ("dropout_maskless_after_advance", adv_bad, ml_ms, data_bytes),
    ];
    push_rows(rows, T::DTYPE.name(), n, (copy_ms, data_bytes), table);
    Ok(())
}

fn cpu(_scale: Scale, _rng: &mut Generator) -> BoxResult<bool> {
    println!(
        "CPU reference: graph-safe randomness: nothing of its own to check without a GPU (a DevicePhilox \
         lives in device memory; the device state's result is the dropout reference at n = {CPU_N} with \
         the host state {{seed, offset + add}}, checked above)"
    );
    Ok(true)
}
