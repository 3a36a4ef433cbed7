//! Dropout kernel benchmarks (criterion, `harness = false`), plus summary lines of our own.
//!
//! Kernels timed, and the bytes each launch on `n` elements of `size` bytes moves (the throughput):
//!
//! | kernel              | bytes moved                                                   |
//! |---------------------|---------------------------------------------------------------|
//! | `copy`              | device-to-device copy of x: `2·n·size` (the bandwidth baseline) |
//! | `mask`              | write the mask: `4·ceil(n/32)` (~n/8)                          |
//! | `forward_mask`      | read x + write y + write mask: `2·n·size + 4·ceil(n/32)`       |
//! | `forward_maskless`  | read x + write y: `2·n·size`                                   |
//! | `backward_mask`     | read dy + write dx + read mask: `2·n·size + 4·ceil(n/32)`      |
//! | `backward_maskless` | read dy + write dx: `2·n·size`                                 |
//!
//! Every measurement is taken with CUDA events around back-to-back launches on the device's single
//! stream, so host-side overhead only matters when it is longer than a kernel (small sizes).
//!
//! Two kinds of summary are printed, from this file's own event timing (median over repeats of a
//! number of launches each), independent of criterion's filter (`--bench __none__` prints only them):
//!
//! - `method=burst`: f16, bf16 and f32 at `n = 2^DROPFUSE_BENCH_N`, every kernel, the copy first;
//!   20 repeats of 10 launches. After each dtype's lines, criterion times the same kernels
//!   (`iter_custom`, group `dropout/<dtype>/n=<n>`).
//! - `method=sweep`: f16 and f32 at every `n = 2^k`, `k = 12..=30`: `copy`, `forward_mask`,
//!   `forward_maskless`, `backward_mask`; per size the launch count makes one timed window about
//!   2 ms of GPU work (10 to 20000 launches), 7 repeats. The buffers are allocated once per dtype
//!   at the largest size and smaller sizes run on prefixes.
//!
//! One line per kernel, dtype and size:
//!
//! ```text
//! DROPFUSE_BENCH method=burst kernel=forward_mask dtype=f16 n=268435456 ms=0.28500 bytes=1107296256 gbps=3885.3 copy_ms=0.27000 copy_gbps=3976.5 copy_fraction=0.977
//! ```
//!
//! `copy_fraction` is the kernel's bandwidth over the copy's, at the same dtype and size, measured
//! in the same run. With `DROPFUSE_BENCH_JSON` the same rows are appended as JSON lines, in the
//! schema shared with the PyTorch peer (`benches/peers/`):
//!
//! ```text
//! {"impl":"dropfuse","kernel":"forward_mask","dtype":"f16","n":268435456,"p":0.1,"method":"burst",
//!  "launches":10,"repeats":20,"ms":0.285,"bytes":1107296256,"gbps":3885.3,"copy_ms":0.27,
//!  "copy_gbps":3976.5,"copy_fraction":0.977,"gpu":"NVIDIA H200","date":"2026-11-28",
//!  "commit":"unknown","side":"dropfuse"}
//! ```
//!
//! (one line each; copy rows have `"impl":"copy","kernel":"copy"`; `date` is UTC).
//!
//! Environment:
//! - `DROPFUSE_BENCH_N`: log2 of the burst element count (default 28).
//! - `DROPFUSE_BENCH_JSON`: a file to which the rows are appended as JSON lines.
//! - `DROPFUSE_BENCH_SWEEP`: `0` skips the size sweep.
//! - `DROPFUSE_BENCH_SWEEP_MAX`: log2 of the sweep's largest size (default 30, at least 12).
//! - `DROPFUSE_COMMIT`: the `commit` field of the JSON rows (default `unknown`).
//!
//! Without a CUDA device this prints `SKIPPED: dropout benches: no CUDA device (...)` and registers
//! no benchmark, so `cargo bench` still succeeds on GPU-less machines.

use std::time::Duration;

mod common;
use common::{burst_rows, env_log2, filled, register, rows_against_copy, Burst, Output, Row, Timer};

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::{Device, Dropout, Element, Error, Generator};

/// Default log2 of the burst element count.
const DEFAULT_LOG2_N: u32 = 28;
/// Drop probability used throughout (the kernels' speed does not depend on it).
const P: f64 = 0.1;
/// Sweep sizes: `2^SWEEP_MIN_LOG2 ..= 2^SWEEP_MAX_LOG2` elements (the top from the environment).
const SWEEP_MIN_LOG2: u32 = 12;
const SWEEP_MAX_LOG2: u32 = 30;
/// Sweep timing: launches of the quick per-call estimate, target GPU time of one timed window,
/// bounds of the launch count, repeats.
const SWEEP_PROBE_LAUNCHES: u64 = 10;
const SWEEP_WINDOW_MS: f64 = 2.0;
const SWEEP_MIN_LAUNCHES: u64 = 10;
const SWEEP_MAX_LAUNCHES: u64 = 20_000;
const SWEEP_REPEATS: usize = 7;

/// The kernels benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Copy,
    Mask,
    ForwardMask,
    ForwardMaskless,
    BackwardMask,
    BackwardMaskless,
}

impl Kernel {
    /// Burst order: the copy (the baseline of the others) first.
    const ALL: [Kernel; 6] = [
        Kernel::Copy,
        Kernel::Mask,
        Kernel::ForwardMask,
        Kernel::ForwardMaskless,
        Kernel::BackwardMask,
        Kernel::BackwardMaskless,
    ];
    /// The sweep's kernels, the copy first.
    const SWEEP: [Kernel; 4] = [
        Kernel::Copy,
        Kernel::ForwardMask,
        Kernel::ForwardMaskless,
        Kernel::BackwardMask,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Copy => "copy",
            Kernel::Mask => "mask",
            Kernel::ForwardMask => "forward_mask",
            Kernel::ForwardMaskless => "forward_maskless",
            Kernel::BackwardMask => "backward_mask",
            Kernel::BackwardMaskless => "backward_maskless",
        }
    }

    /// Bytes one launch reads plus writes, for `n` elements of `size` bytes each.
    fn bytes(self, n: usize, size: usize) -> u64 {
        let data = 2 * n as u64 * size as u64; // read n elements + write n elements
        let mask = mask_words(n) as u64 * 4; // the bit mask, ~n/8 bytes
        match self {
            Kernel::Mask => mask,
            Kernel::ForwardMask | Kernel::BackwardMask => data + mask,
            Kernel::ForwardMaskless | Kernel::BackwardMaskless | Kernel::Copy => data,
        }
    }
}

/// Device buffers of one dtype, sized for the largest `n` timed; smaller sizes use prefixes.
struct Bench<T: Element> {
    dev: Device,
    drop: Dropout,
    rng: Generator,
    /// Forward input (also the backward's `dy`, and the copy's source).
    x: CudaSlice<T>,
    /// Forward output.
    y: CudaSlice<T>,
    /// Backward output (also the copy's destination).
    dx: CudaSlice<T>,
    /// The bit mask (written by `mask` / `forward_mask`, read by `backward_mask`).
    mask: CudaSlice<u32>,
    timer: Timer,
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, n: usize) -> Result<Self, Error> {
        // Values do not change the kernels' speed; a cheap varied pattern avoids all-zero data.
        let x = filled(dev, n, |i| (i % 251) as f32 * 0.01 - 1.25)?;
        let mut bench = Bench {
            dev: dev.clone(),
            drop: Dropout::new(P)?,
            rng: Generator::new(0x5eed),
            x,
            y: dev.zeros(n)?,
            dx: dev.zeros(n)?,
            mask: dev.zeros(mask_words(n))?,
            timer: Timer::new(dev)?,
        };
        // A valid mask for `backward_mask`, and everything touched once.
        bench.launch((Kernel::ForwardMask, n))?;
        bench.dev.synchronize()?;
        Ok(bench)
    }

    /// The largest `n` this bench can time.
    fn capacity(&self) -> usize {
        self.x.len()
    }
}

impl<T: Element> Burst for Bench<T> {
    /// A kernel on the first `n` elements.
    type Kernel = (Kernel, usize);

    fn timer(&self) -> &Timer {
        &self.timer
    }

    /// Enqueues one launch of `kernel` on the first `n` elements (no synchronization). Kept lean:
    /// the prefix views are a few words on the stack, the rest is the safe API's own checks.
    fn launch(&mut self, (kernel, n): (Kernel, usize)) -> Result<(), Error> {
        let stream = self.dev.stream();
        let x = self.x.slice(..n);
        let words = mask_words(n);
        match kernel {
            Kernel::Copy => stream
                .memcpy_dtod(&x, &mut self.dx.slice_mut(..n))
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
            // A fresh Philox stream per call, as in training.
            Kernel::Mask => self
                .drop
                .mask(stream, self.rng.next(), n, &mut self.mask.slice_mut(..words)),
            Kernel::ForwardMask => self.drop.forward(
                stream,
                self.rng.next(),
                &x,
                &mut self.y.slice_mut(..n),
                &mut self.mask.slice_mut(..words),
            ),
            Kernel::ForwardMaskless => {
                self.drop
                    .forward_maskless(stream, self.rng.next(), &x, &mut self.y.slice_mut(..n))
            }
            Kernel::BackwardMask => {
                self.drop
                    .backward(stream, &self.mask.slice(..words), &x, &mut self.dx.slice_mut(..n))
            }
            Kernel::BackwardMaskless => {
                self.drop
                    .backward_maskless(stream, self.rng.next(), &x, &mut self.dx.slice_mut(..n))
            }
        }
    }

    fn row(&self, (kernel, n): (Kernel, usize)) -> Row {
        Row::new(
            kernel.name(),
            T::DTYPE.name(),
            n,
            kernel.bytes(n, T::DTYPE.size()),
        )
        .param("p", P)
    }
}

/// A sweep row: warm-up, then `SWEEP_REPEATS` timings of a launch count that makes one timed window
/// about `SWEEP_WINDOW_MS` of GPU work, estimated first.
fn sweep_row<T: Element>(bench: &mut Bench<T>, k: (Kernel, usize)) -> Result<Row, Error> {
    bench.warm_up(k)?;
    // A quick estimate, then one window at the count it suggests to refine it: a few launches
    // overstate the per-call time by the latency of the first one.
    let mut launches = SWEEP_PROBE_LAUNCHES;
    for _ in 0..2 {
        let estimate = bench.ms_per_launch(k, launches)?;
        launches = ((SWEEP_WINDOW_MS / estimate).ceil() as u64).clamp(SWEEP_MIN_LAUNCHES, SWEEP_MAX_LAUNCHES);
    }
    let ms = bench.median_ms(k, launches, SWEEP_REPEATS)?;
    Ok(bench.row(k).timed("sweep", launches, SWEEP_REPEATS, ms))
}

/// Burst rows, then one criterion group, for dtype `T` at `n` elements.
fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output, n: usize) {
    let dtype = T::DTYPE.name();
    let mut bench = Bench::<T>::new(dev, n).unwrap_or_else(|e| panic!("{dtype}: setting up n = {n}: {e}"));
    let kernels = Kernel::ALL.map(|k| (k, n));
    burst_rows(
        out,
        &mut bench,
        &format!("{dtype} burst"),
        (Kernel::Copy, n),
        &kernels,
    );

    let mut group = c.benchmark_group(format!("dropout/{dtype}/n={n}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    register(&mut group, &mut bench, &kernels);
    group.finish();
    // `bench` (several GiB at f32) is freed here, before the next dtype allocates.
}

/// Sweep rows for dtype `T`, every `2^k` elements, `k = SWEEP_MIN_LOG2..=max_log2`.
fn sweep_dtype<T: Element>(dev: &Device, out: &mut Output, max_log2: u32) {
    let dtype = T::DTYPE.name();
    let max_n = 1usize << max_log2;
    let mut bench =
        Bench::<T>::new(dev, max_n).unwrap_or_else(|e| panic!("{dtype}: setting up n = {max_n}: {e}"));
    debug_assert_eq!(bench.capacity(), max_n);
    for log2 in SWEEP_MIN_LOG2..=max_log2 {
        let n = 1usize << log2;
        let what = format!("{dtype} sweep at n = {n}");
        let kernels = Kernel::SWEEP.map(|k| (k, n));
        rows_against_copy(out, &mut bench, &what, (Kernel::Copy, n), &kernels, sweep_row);
    }
}

fn dropout_benches(c: &mut Criterion) {
    // SAFETY: all buffers are allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("dropout") }) else {
        return;
    };
    let n = 1usize << env_log2("DROPFUSE_BENCH_N", DEFAULT_LOG2_N, 5..=33);
    let sweep = std::env::var("DROPFUSE_BENCH_SWEEP").map_or(true, |v| v.trim() != "0");
    let sweep_max = env_log2("DROPFUSE_BENCH_SWEEP_MAX", SWEEP_MAX_LOG2, SWEEP_MIN_LOG2..=33);
    println!("dropout benches on {}: n = {n} elements, p = {P}", out.meta.gpu);
    bench_dtype::<f16>(c, &dev, &mut out, n);
    bench_dtype::<bf16>(c, &dev, &mut out, n);
    bench_dtype::<f32>(c, &dev, &mut out, n);
    if sweep {
        println!("dropout size sweep: n = 2^{SWEEP_MIN_LOG2} ..= 2^{sweep_max}, f16 and f32");
        sweep_dtype::<f16>(&dev, &mut out, sweep_max);
        sweep_dtype::<f32>(&dev, &mut out, sweep_max);
    }
}

criterion_group!(benches, dropout_benches);
criterion_main!(benches);
