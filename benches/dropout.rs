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
use common::{env_log2, gbps, json_escape, json_num, Meta, Output};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaEvent, CudaSlice};
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::{Device, Dropout, Element, Error, Generator};

/// Default log2 of the burst element count.
const DEFAULT_LOG2_N: u32 = 28;
/// Drop probability used throughout (the kernels' speed does not depend on it).
const P: f64 = 0.1;
/// Burst timing: launches per event-timed repeat, repeats (the median is reported).
const BURST_LAUNCHES: u64 = 10;
const BURST_REPEATS: usize = 20;
/// Launches before any timing of a kernel and size (clocks, caches, first-launch costs).
const WARMUP_LAUNCHES: u64 = 5;
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
/// Elements of the value pattern uploaded once and copied over the inputs.
const PATTERN_LEN: usize = 1 << 20;

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

    /// The JSON `impl` field: who provides the kernel.
    fn implementation(self) -> &'static str {
        match self {
            Kernel::Copy => "copy",
            _ => "dropfuse",
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

/// How a row was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Burst,
    Sweep,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Burst => "burst",
            Method::Sweep => "sweep",
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
    /// Timing events, created once (with timing enabled) and re-recorded.
    start: CudaEvent,
    end: CudaEvent,
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, n: usize) -> Result<Self, Error> {
        let stream = dev.stream();
        let driver = |call| move |e| Error::driver(call, e);
        // Values do not change the kernels' speed; a cheap varied pattern avoids all-zero data.
        // It is uploaded once and copied over x, so no host buffer of n elements is needed.
        let pattern: Vec<T> = (0..PATTERN_LEN.min(n))
            .map(|i| T::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let pattern = dev.upload(&pattern)?;
        let mut x = dev.zeros::<T>(n)?;
        for start in (0..n).step_by(pattern.len()) {
            let len = pattern.len().min(n - start);
            stream
                .memcpy_dtod(&pattern.slice(..len), &mut x.slice_mut(start..start + len))
                .map_err(driver("cuMemcpyDtoDAsync"))?;
        }
        // `None` would create events with timing disabled.
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = dev.context();
        let mut bench = Bench {
            dev: dev.clone(),
            drop: Dropout::new(P)?,
            rng: Generator::new(0x5eed),
            x,
            y: dev.zeros(n)?,
            dx: dev.zeros(n)?,
            mask: dev.zeros(mask_words(n))?,
            start: ctx.new_event(flags).map_err(driver("cuEventCreate"))?,
            end: ctx.new_event(flags).map_err(driver("cuEventCreate"))?,
        };
        // A valid mask for `backward_mask`, and everything touched once.
        bench.launch(Kernel::ForwardMask, n)?;
        bench.dev.synchronize()?;
        drop(pattern);
        Ok(bench)
    }

    /// The largest `n` this bench can time.
    fn capacity(&self) -> usize {
        self.x.len()
    }

    /// Enqueues one launch of `kernel` on the first `n` elements (no synchronization). Kept lean:
    /// the prefix views are a few words on the stack, the rest is the safe API's own checks.
    fn launch(&mut self, kernel: Kernel, n: usize) -> Result<(), Error> {
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

    /// GPU time of `launches` back-to-back launches of `kernel` on `n` elements (CUDA events).
    fn time(&mut self, kernel: Kernel, n: usize, launches: u64) -> Result<Duration, Error> {
        let stream = self.dev.stream().clone();
        self.start
            .record(&stream)
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        for _ in 0..launches {
            self.launch(kernel, n)?;
        }
        self.end
            .record(&stream)
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        // elapsed_ms waits for both events.
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| Error::driver("cuEventElapsedTime", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    /// Milliseconds per launch of `launches` launches.
    fn ms_per_launch(&mut self, kernel: Kernel, n: usize, launches: u64) -> Result<f64, Error> {
        Ok(self.time(kernel, n, launches)?.as_secs_f64() * 1e3 / launches as f64)
    }

    /// Median milliseconds per launch over `repeats` timings of `launches` launches (no warm-up).
    fn median_ms(&mut self, kernel: Kernel, n: usize, launches: u64, repeats: usize) -> Result<f64, Error> {
        let mut ms: Vec<f64> = (0..repeats)
            .map(|_| self.ms_per_launch(kernel, n, launches))
            .collect::<Result<_, Error>>()?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    fn warm_up(&mut self, kernel: Kernel, n: usize) -> Result<(), Error> {
        self.time(kernel, n, WARMUP_LAUNCHES).map(drop)
    }

    /// One row: warm-up, then `repeats` timings of `launches` launches (for `None`, of a count that
    /// makes one timed window about `SWEEP_WINDOW_MS` of GPU work, estimated first).
    fn measure(
        &mut self,
        kernel: Kernel,
        n: usize,
        method: Method,
        launches: Option<u64>,
        repeats: usize,
        copy: Option<(f64, u64)>,
    ) -> Result<Row, Error> {
        self.warm_up(kernel, n)?;
        let launches = match launches {
            Some(l) => l,
            None => {
                // A quick estimate, then one window at the count it suggests to refine it: a few
                // launches overstate the per-call time by the latency of the first one.
                let mut launches = SWEEP_PROBE_LAUNCHES;
                for _ in 0..2 {
                    let estimate = self.ms_per_launch(kernel, n, launches)?;
                    launches = ((SWEEP_WINDOW_MS / estimate).ceil() as u64)
                        .clamp(SWEEP_MIN_LAUNCHES, SWEEP_MAX_LAUNCHES);
                }
                launches
            }
        };
        let ms = self.median_ms(kernel, n, launches, repeats)?;
        let bytes = kernel.bytes(n, T::DTYPE.size());
        // The copy row is its own baseline.
        let (copy_ms, copy_bytes) = copy.unwrap_or((ms, bytes));
        Ok(Row {
            kernel,
            dtype: T::DTYPE.name(),
            n,
            method,
            launches,
            repeats,
            ms,
            bytes,
            copy_ms,
            copy_bytes,
        })
    }

    /// Times the copy, then every other kernel of `kernels` against it, on `n` elements.
    fn rows(
        &mut self,
        kernels: &[Kernel],
        n: usize,
        method: Method,
        launches: Option<u64>,
        repeats: usize,
        out: &mut Output,
    ) -> Result<(), Error> {
        let copy = self.measure(Kernel::Copy, n, method, launches, repeats, None)?;
        let baseline = Some((copy.ms, copy.bytes));
        out.emit(&copy.text(), &copy.json(&out.meta));
        for &kernel in kernels.iter().filter(|&&k| k != Kernel::Copy) {
            let row = self.measure(kernel, n, method, launches, repeats, baseline)?;
            out.emit(&row.text(), &row.json(&out.meta));
        }
        Ok(())
    }
}

/// One measured kernel at one dtype and size: rendered as a text line and as a JSON line.
struct Row {
    kernel: Kernel,
    dtype: &'static str,
    n: usize,
    method: Method,
    launches: u64,
    repeats: usize,
    /// Median milliseconds per launch.
    ms: f64,
    bytes: u64,
    /// The copy's, at the same dtype and size.
    copy_ms: f64,
    copy_bytes: u64,
}

impl Row {
    fn gbps(&self) -> f64 {
        gbps(self.bytes, self.ms)
    }

    fn copy_gbps(&self) -> f64 {
        gbps(self.copy_bytes, self.copy_ms)
    }

    fn copy_fraction(&self) -> f64 {
        self.gbps() / self.copy_gbps()
    }

    /// The greppable stdout line.
    fn text(&self) -> String {
        format!(
            "DROPFUSE_BENCH method={} kernel={} dtype={} n={} ms={:.5} bytes={} gbps={:.1} copy_ms={:.5} \
             copy_gbps={:.1} copy_fraction={:.3}",
            self.method.name(),
            self.kernel.name(),
            self.dtype,
            self.n,
            self.ms,
            self.bytes,
            self.gbps(),
            self.copy_ms,
            self.copy_gbps(),
            self.copy_fraction(),
        )
    }

    /// The same as one JSON line, in the schema shared with the PyTorch peer.
    fn json(&self, meta: &Meta) -> String {
        format!(
            "{{\"impl\":\"{}\",\"kernel\":\"{}\",\"dtype\":\"{}\",\"n\":{},\"p\":{},\"method\":\"{}\",\
             \"launches\":{},\"repeats\":{},\"ms\":{},\"bytes\":{},\"gbps\":{},\"copy_ms\":{},\
             \"copy_gbps\":{},\"copy_fraction\":{},\"gpu\":\"{}\",\"date\":\"{}\",\"commit\":\"{}\",\
             \"side\":\"dropfuse\"}}",
            self.kernel.implementation(),
            self.kernel.name(),
            self.dtype,
            self.n,
            P,
            self.method.name(),
            self.launches,
            self.repeats,
            json_num(self.ms, 7),
            self.bytes,
            json_num(self.gbps(), 3),
            json_num(self.copy_ms, 7),
            json_num(self.copy_gbps(), 3),
            json_num(self.copy_fraction(), 5),
            json_escape(&meta.gpu),
            meta.date,
            json_escape(&meta.commit),
        )
    }
}

/// Burst rows, then one criterion group, for dtype `T` at `n` elements.
fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output, n: usize) {
    let dtype = T::DTYPE.name();
    let mut bench = Bench::<T>::new(dev, n).unwrap_or_else(|e| panic!("{dtype}: setting up n = {n}: {e}"));
    bench
        .rows(
            &Kernel::ALL,
            n,
            Method::Burst,
            Some(BURST_LAUNCHES),
            BURST_REPEATS,
            out,
        )
        .unwrap_or_else(|e| panic!("{dtype}: burst timing: {e}"));

    let mut group = c.benchmark_group(format!("dropout/{dtype}/n={n}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    for kernel in Kernel::ALL {
        group.throughput(Throughput::Bytes(kernel.bytes(n, T::DTYPE.size())));
        group.bench_function(kernel.name(), |b| {
            b.iter_custom(|iters| {
                bench
                    .time(kernel, n, iters)
                    .unwrap_or_else(|e| panic!("{dtype} {}: {e}", kernel.name()))
            })
        });
    }
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
        bench
            .rows(&Kernel::SWEEP, n, Method::Sweep, None, SWEEP_REPEATS, out)
            .unwrap_or_else(|e| panic!("{dtype}: sweep timing at n = {n}: {e}"));
    }
}

fn dropout_benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: dropout benches: no CUDA device ({e})");
            return;
        }
    };
    // cudarc tracks every buffer's reads and writes with CUDA events once a context has a
    // non-default stream (as `Device::new` creates): each safe call then adds a
    // cuStreamWaitEvent per buffer before the launch and a cuEventRecord per buffer after it
    // (forward with a mask: 5 waits, 3 records, each with a context check), host time that
    // dominates small kernels' launch rate. Everything here runs on the one stream, in order, so
    // that tracking protects nothing. It only applies to buffers allocated after this call.
    // SAFETY: all buffers are allocated, used and freed on `dev.stream()` alone.
    unsafe { dev.context().disable_event_tracking() };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    let n = 1usize << env_log2("DROPFUSE_BENCH_N", DEFAULT_LOG2_N, 5..=33);
    let sweep = std::env::var("DROPFUSE_BENCH_SWEEP").map_or(true, |v| v.trim() != "0");
    let sweep_max = env_log2("DROPFUSE_BENCH_SWEEP_MAX", SWEEP_MAX_LOG2, SWEEP_MIN_LOG2..=33);
    println!("dropout benches on {gpu}: n = {n} elements, p = {P}");
    let mut out = Output::new(gpu);
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
