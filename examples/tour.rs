//! A tour of dropfuse: every dropout kernel on the GPU, checked bit for bit against the CPU
//! reference, with event-timed bandwidth next to a device-to-device copy of the same bytes.
//!
//! ```text
//! cargo run --release --example tour
//! ```
//!
//! With a GPU: for f16, bf16 and f32 at n = 2^24 + 37 elements it runs mask generation, forward
//! (with and without a stored mask) and backward (from the mask and mask-free), compares every
//! mask bit and output element with `dropfuse::reference::dropout`, and prints a table
//! `kernel | dtype | n | match | ms | GB/s | of copy`. The exit code is 1 if anything mismatches.
//!
//! Without a GPU it says so and runs the CPU reference alone on 2^16 + 37 elements, printing the
//! reference's own consistency checks (keep rate, backward from the mask == mask-free backward, ...).
//!
//! `cargo test --example tour` runs the same entry point: on a GPU at 2^16 + 37 elements (to keep the
//! debug-build reference fast), without one the CPU reference exactly as above.

use std::process::ExitCode;

use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaSlice, DevicePtr};
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout as reference;
use dropfuse::{Device, Dropout, Element, Error, Generator, PhiloxState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Drop probability of the tour.
const P: f64 = 0.1;
/// GPU size: not a multiple of 32, so the last mask word is partial.
const GPU_N: usize = (1 << 24) + 37;
/// CPU-only size.
const CPU_N: usize = (1 << 16) + 37;
/// Timed launches per kernel (after one warm-up launch); the mean is reported.
const TIMED_LAUNCHES: u32 = 10;

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match tour(GPU_N, CPU_N) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The tour: every kernel on GPU 0 at `gpu_n` elements, or without a GPU the CPU reference at
/// `cpu_n` (at least 6000). `Ok(false)` if anything mismatches or a check fails.
fn tour(gpu_n: usize, cpu_n: usize) -> BoxResult<bool> {
    match Device::new(0) {
        Ok(dev) => gpu_tour(&dev, gpu_n),
        Err(e) => {
            println!("No CUDA device found ({e}): running the CPU reference only.");
            cpu_tour(cpu_n)
        }
    }
}

/// Deterministic inputs spanning many magnitudes (including f16 subnormals and f16 overflow to
/// infinity), both signs; never NaN.
fn random_input<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mantissa: f32 = rng.random_range(1.0..2.0);
            let exponent: i32 = rng.random_range(-30..=15);
            let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
            T::from_f32(sign * mantissa * 2f32.powi(exponent))
        })
        .collect()
}

/// Number of elements whose bits differ.
fn element_mismatches<T: Element>(got: &[T], want: &[T]) -> usize {
    if got.len() != want.len() {
        return got.len().max(want.len());
    }
    got.iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits_u32() != b.to_bits_u32())
        .count()
}

/// Number of mask bits that differ (including the unused high bits of the last word).
fn mask_mismatches(got: &[u32], want: &[u32]) -> usize {
    if got.len() != want.len() {
        return 32 * got.len().max(want.len());
    }
    got.iter()
        .zip(want)
        .map(|(a, b)| (a ^ b).count_ones() as usize)
        .sum()
}

fn match_text(mismatches: usize) -> String {
    if mismatches == 0 {
        "yes".to_string()
    } else {
        format!("{mismatches} mismatches")
    }
}

// ---------------------------------------------------------------- GPU ----

/// One row of the GPU table.
struct Row {
    kernel: &'static str,
    dtype: &'static str,
    n: usize,
    mismatches: usize,
    ms: f64,
    bytes: u64,
    copy_ms: f64,
    copy_bytes: u64,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.ms / 1e6
    }
    fn copy_fraction(&self) -> f64 {
        self.gbps() / (self.copy_bytes as f64 / self.copy_ms / 1e6)
    }
}

/// Mean milliseconds per launch of `launch`, timed with CUDA events around `TIMED_LAUNCHES`
/// back-to-back launches after one warm-up launch.
fn time_ms(dev: &Device, mut launch: impl FnMut() -> dropfuse::Result<()>) -> BoxResult<f64> {
    launch()?;
    let stream = dev.stream();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT); // `None` disables timing
    let start = stream.record_event(flags)?;
    for _ in 0..TIMED_LAUNCHES {
        launch()?;
    }
    let end = stream.record_event(flags)?;
    let ms = start.elapsed_ms(&end)?; // waits for both events
    dev.synchronize()?; // reports asynchronous launch errors, if any
    Ok(f64::from(ms) / f64::from(TIMED_LAUNCHES))
}

fn download<T: Element, S: DevicePtr<T>>(dev: &Device, s: &S) -> dropfuse::Result<Vec<T>> {
    dev.download(s)
}

/// Runs and checks every kernel for dtype `T`; appends one row per kernel.
fn gpu_dtype<T: Element>(
    dev: &Device,
    n: usize,
    rng: &mut Generator,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let size = T::DTYPE.size() as u64;
    let dtype = T::DTYPE.name();
    let stream = dev.stream();
    let drop = Dropout::new(P)?;
    let state: PhiloxState = rng.next();

    let x_host: Vec<T> = random_input(n, seed);
    let dy_host: Vec<T> = random_input(n, seed ^ 0xd1);
    let x = dev.upload(&x_host)?;
    let dy = dev.upload(&dy_host)?;
    let mut y = dev.zeros::<T>(n)?;
    let mut dx = dev.zeros::<T>(n)?;
    let mut mask = dev.zeros::<u32>(mask_words(n))?;
    let mut mask2 = dev.zeros::<u32>(mask_words(n))?;

    // The oracle (plain CPU code).
    let ref_mask = reference::mask(P, state, 0, n)?;
    let (ref_y, ref_fwd_mask) = reference::forward(&x_host, P, state, 0)?;
    let ref_dx_from_mask = reference::backward_from_mask(&dy_host, &ref_mask, P)?;
    let ref_dx = reference::backward(&dy_host, P, state, 0)?;

    // Correctness: run each kernel once, download, compare.
    drop.mask(stream, state, n, &mut mask2)?;
    let mask_bad = mask_mismatches(&dev.download(&mask2)?, &ref_mask);

    drop.forward(stream, state, &x, &mut y, &mut mask)?;
    let fwd_bad = element_mismatches(&download(dev, &y)?, &ref_y)
        + mask_mismatches(&dev.download(&mask)?, &ref_fwd_mask);

    let mut y2 = dev.zeros::<T>(n)?;
    drop.forward_maskless(stream, state, &x, &mut y2)?;
    let fwd_ml_bad = element_mismatches(&download(dev, &y2)?, &ref_y);
    std::mem::drop(y2);

    // `mask` now holds the forward's mask (checked above).
    drop.backward(stream, &mask, &dy, &mut dx)?;
    let bwd_bad = element_mismatches(&download(dev, &dx)?, &ref_dx_from_mask);

    let mut dx2 = dev.zeros::<T>(n)?;
    drop.backward_maskless(stream, state, &dy, &mut dx2)?;
    let bwd_ml_bad = element_mismatches(&download(dev, &dx2)?, &ref_dx);
    std::mem::drop(dx2);

    // Timing, with a device-to-device copy of the input (read n + write n elements) as baseline.
    let data = 2 * n as u64 * size;
    let mask_bytes = mask_words(n) as u64 * 4;
    let mut copy_dst: CudaSlice<T> = dev.zeros(n)?;
    let copy_ms = time_ms(dev, || {
        stream
            .memcpy_dtod(&x, &mut copy_dst)
            .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e))
    })?;
    std::mem::drop(copy_dst);
    let mask_ms = time_ms(dev, || drop.mask(stream, state, n, &mut mask2))?;
    let fwd_ms = time_ms(dev, || drop.forward(stream, state, &x, &mut y, &mut mask))?;
    let fwd_ml_ms = time_ms(dev, || drop.forward_maskless(stream, state, &x, &mut y))?;
    let bwd_ms = time_ms(dev, || drop.backward(stream, &mask, &dy, &mut dx))?;
    let bwd_ml_ms = time_ms(dev, || drop.backward_maskless(stream, state, &dy, &mut dx))?;

    let table = [
        ("copy", 0, copy_ms, data),
        ("mask", mask_bad, mask_ms, mask_bytes),
        ("forward_mask", fwd_bad, fwd_ms, data + mask_bytes),
        ("forward_maskless", fwd_ml_bad, fwd_ml_ms, data),
        ("backward_mask", bwd_bad, bwd_ms, data + mask_bytes),
        ("backward_maskless", bwd_ml_bad, bwd_ml_ms, data),
    ];
    for (kernel, mismatches, ms, bytes) in table {
        rows.push(Row {
            kernel,
            dtype,
            n,
            mismatches,
            ms,
            bytes,
            copy_ms,
            copy_bytes: data,
        });
    }
    Ok(())
}

fn gpu_tour(dev: &Device, n: usize) -> BoxResult<bool> {
    let name = dev.name()?;
    let (major, minor) = dev.compute_capability()?;
    println!(
        "GPU 0: {name} (sm_{major}{minor}, {} SMs); dropout p = {P}, n = {n}",
        dev.sm_count()?
    );
    println!("checking every mask bit and output element against the CPU reference...\n");

    let mut rng = Generator::new(2024);
    let mut rows = Vec::new();
    gpu_dtype::<f16>(dev, n, &mut rng, 1, &mut rows)?;
    gpu_dtype::<bf16>(dev, n, &mut rng, 2, &mut rows)?;
    gpu_dtype::<f32>(dev, n, &mut rng, 3, &mut rows)?;

    println!(
        "{:<18} {:<5} {:>9} {:<16} {:>9} {:>9} {:>8}",
        "kernel", "dtype", "n", "match", "ms", "GB/s", "of copy"
    );
    println!("{}", "-".repeat(80));
    for r in &rows {
        let matched = if r.kernel == "copy" {
            "(baseline)".to_string()
        } else {
            match_text(r.mismatches)
        };
        println!(
            "{:<18} {:<5} {:>9} {:<16} {:>9.4} {:>9.1} {:>7.1}%",
            r.kernel,
            r.dtype,
            r.n,
            matched,
            r.ms,
            r.gbps(),
            100.0 * r.copy_fraction()
        );
    }
    let bad: usize = rows.iter().map(|r| r.mismatches).sum();
    println!();
    if bad == 0 {
        println!("all kernels match the CPU reference bit for bit");
        Ok(true)
    } else {
        println!("MISMATCH: {bad} elements/bits differ from the CPU reference");
        Ok(false)
    }
}

// ---------------------------------------------------------------- CPU ----

/// The reference's own consistency checks for dtype `T`; prints one row each.
fn cpu_dtype<T: Element>(n: usize, seed: u64, state: PhiloxState) -> BoxResult<bool> {
    let dtype = T::DTYPE.name();
    let x: Vec<T> = random_input(n, seed);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let scale = reference::keep_scale(P)?;

    let mask = reference::mask(P, state, 0, n)?;
    let (y, fwd_mask) = reference::forward(&x, P, state, 0)?;
    let dx_from_mask = reference::backward_from_mask(&dy, &fwd_mask, P)?;
    let dx = reference::backward(&dy, P, state, 0)?;

    let mut checks: Vec<(String, bool)> = Vec::new();

    // Keep rate within 5 standard deviations of 1 - p.
    let kept: usize = mask.iter().map(|w| w.count_ones() as usize).sum();
    let rate = kept as f64 / n as f64;
    let sigma = (P * (1.0 - P) / n as f64).sqrt();
    checks.push((
        format!("keep rate {rate:.4} vs 1 - p = {:.4} (+-5 sigma)", 1.0 - P),
        (rate - (1.0 - P)).abs() <= 5.0 * sigma,
    ));

    // Mask shape: ceil(n / 32) words, unused high bits of the last word zero.
    let used = n % 32;
    let tail_ok = used == 0 || mask[mask.len() - 1] >> used == 0;
    checks.push((
        format!("mask has ceil(n/32) = {} words, unused bits 0", mask_words(n)),
        mask.len() == mask_words(n) && tail_ok,
    ));

    checks.push((
        "forward's mask == mask()".to_string(),
        mask_mismatches(&fwd_mask, &mask) == 0,
    ));

    // y: kept elements are x * scale rounded once, dropped ones +0.
    let y_bad = (0..n)
        .filter(|&i| {
            let want = if reference::mask_bit(&mask, i) {
                T::from_f32(x[i].to_f32() * scale)
            } else {
                T::from_f32(0.0)
            };
            y[i].to_bits_u32() != want.to_bits_u32()
        })
        .count();
    checks.push(("forward y == kept ? x * scale : +0".to_string(), y_bad == 0));

    checks.push((
        "backward_from_mask == backward (mask-free)".to_string(),
        element_mismatches(&dx_from_mask, &dx) == 0,
    ));

    // Shards: the mask of [a, a + m) with element_offset = a equals bits a..a+m of the whole mask.
    let (a, m) = (1000, 5000);
    let shard = reference::mask(P, state, a as u64, m)?;
    let shard_ok = (0..m).all(|i| reference::mask_bit(&shard, i) == reference::mask_bit(&mask, a + i));
    checks.push((
        format!("shard mask [{a}, {}) == slice of the whole mask", a + m),
        shard_ok,
    ));

    // A different Philox stream gives a different mask.
    let other = reference::mask(P, PhiloxState::new(state.seed, state.offset + 1), 0, n)?;
    checks.push(("next offset gives a different mask".to_string(), other != mask));

    let mut all = true;
    for (check, ok) in checks {
        all &= ok;
        println!(
            "{dtype:<5} {n:>7}  {check:<52} {}",
            if ok { "ok" } else { "FAILED" }
        );
    }
    Ok(all)
}

fn cpu_tour(n: usize) -> BoxResult<bool> {
    println!("CPU reference: dropout p = {P}, n = {n}\n");
    println!("{:<5} {:>7}  {:<52} result", "dtype", "n", "check");
    println!("{}", "-".repeat(74));
    let mut rng = Generator::new(2024);
    let mut ok = cpu_dtype::<f16>(n, 1, rng.next())?;
    ok &= cpu_dtype::<bf16>(n, 2, rng.next())?;
    ok &= cpu_dtype::<f32>(n, 3, rng.next())?;
    println!();
    println!(
        "{}",
        if ok {
            "the CPU reference is self-consistent"
        } else {
            "FAILED: the CPU reference is inconsistent"
        }
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    /// The tour's own entry point and checks: without a GPU the CPU reference at its normal size,
    /// with one every kernel at 2^16 + 37 elements (the debug-build reference stays fast).
    #[test]
    fn tour_matches_the_reference() {
        let ok = super::tour((1 << 16) + 37, super::CPU_N).expect("tour failed");
        assert!(ok, "the tour found a mismatch or a failed check");
    }
}
