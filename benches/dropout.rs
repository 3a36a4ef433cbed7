//! Dropout kernel benchmarks (criterion, `harness = false`).
//!
//! For f16, bf16 and f32 at `n = 2^DROPFUSE_BENCH_N` elements (default 2^28) this times:
//!
//! | kernel              | bytes moved (throughput)            |
//! |---------------------|-------------------------------------|
//! | `mask`              | mask (`ceil(n/32)` words, ~n/8)     |
//! | `forward_mask`      | read x + write y + write mask       |
//! | `forward_maskless`  | read x + write y                    |
//! | `backward_mask`     | read dy + write dx + read mask      |
//! | `backward_maskless` | read dy + write dx                  |
//! | `copy`              | device-to-device copy of x: 2·n·size (the bandwidth baseline) |
//!
//! Every measurement is taken with CUDA events around back-to-back launches on the device's
//! stream (`iter_custom`), so host-side overhead only matters if it is longer than a kernel.
//!
//! Besides criterion's report, one greppable summary line per kernel is printed to stdout, from
//! this file's own event timing (median over `REPEATS` timings of `LAUNCHES` launches each):
//!
//! ```text
//! DROPFUSE_BENCH kernel=forward_mask dtype=f16 n=268435456 ms=0.2850 bytes=1107296256 gbps=3885.3 copy_ms=0.2700 copy_gbps=3976.5 copy_fraction=0.977
//! ```
//!
//! `copy_fraction` is the kernel's bandwidth over the copy's, measured in the same run.
//!
//! Environment:
//! - `DROPFUSE_BENCH_N`: log2 of the element count (default 28).
//! - `DROPFUSE_BENCH_JSON`: a file to which the summary lines are appended as JSON lines.
//!
//! Without a CUDA device this prints `SKIPPED: dropout benches: no CUDA device (...)` and registers
//! no benchmark, so `cargo bench` still succeeds on GPU-less machines.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaSlice, CudaStream};
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::{Device, Dropout, Element, Error, Generator};

/// Default log2 of the element count.
const DEFAULT_LOG2_N: u32 = 28;
/// Drop probability used throughout (the kernels' speed does not depend on it).
const P: f64 = 0.1;
/// Summary timing: launches per event-timed repeat, repeats (the median is reported), warm-up.
const LAUNCHES: u32 = 10;
const REPEATS: usize = 20;
const WARMUP_LAUNCHES: u32 = 5;

/// The kernels benchmarked, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Mask,
    ForwardMask,
    ForwardMaskless,
    BackwardMask,
    BackwardMaskless,
    Copy,
}

impl Kernel {
    const ALL: [Kernel; 6] = [
        Kernel::Copy,
        Kernel::Mask,
        Kernel::ForwardMask,
        Kernel::ForwardMaskless,
        Kernel::BackwardMask,
        Kernel::BackwardMaskless,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Mask => "mask",
            Kernel::ForwardMask => "forward_mask",
            Kernel::ForwardMaskless => "forward_maskless",
            Kernel::BackwardMask => "backward_mask",
            Kernel::BackwardMaskless => "backward_maskless",
            Kernel::Copy => "copy",
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

/// Device buffers of one dtype and the state the launches need.
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
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, n: usize) -> Result<Self, Error> {
        // Values do not change the kernels' speed; a cheap varied pattern avoids all-zero data.
        let host: Vec<T> = (0..n)
            .map(|i| T::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let x = dev.upload(&host)?;
        drop(host);
        let mut bench = Bench {
            dev: dev.clone(),
            drop: Dropout::new(P)?,
            rng: Generator::new(0x5eed),
            x,
            y: dev.zeros(n)?,
            dx: dev.zeros(n)?,
            mask: dev.zeros(mask_words(n))?,
        };
        // A valid mask for `backward_mask`, and everything touched once.
        bench.launch(Kernel::ForwardMask)?;
        bench.dev.synchronize()?;
        Ok(bench)
    }

    fn n(&self) -> usize {
        self.x.len()
    }

    /// Enqueues one launch of `kernel` (no synchronization).
    fn launch(&mut self, kernel: Kernel) -> Result<(), Error> {
        let stream = self.dev.stream();
        // A fresh Philox stream per call, as in training.
        let state = self.rng.next();
        match kernel {
            Kernel::Mask => self.drop.mask(stream, state, self.x.len(), &mut self.mask),
            Kernel::ForwardMask => self
                .drop
                .forward(stream, state, &self.x, &mut self.y, &mut self.mask),
            Kernel::ForwardMaskless => self.drop.forward_maskless(stream, state, &self.x, &mut self.y),
            Kernel::BackwardMask => self.drop.backward(stream, &self.mask, &self.x, &mut self.dx),
            Kernel::BackwardMaskless => self.drop.backward_maskless(stream, state, &self.x, &mut self.dx),
            Kernel::Copy => stream
                .memcpy_dtod(&self.x, &mut self.dx)
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
        }
    }

    /// GPU time of `launches` back-to-back launches of `kernel`, measured with CUDA events.
    fn time(&mut self, kernel: Kernel, launches: u64) -> Result<Duration, Error> {
        let stream: Arc<CudaStream> = self.dev.stream().clone();
        // `None` would create events with timing disabled.
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream
            .record_event(flags)
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        for _ in 0..launches {
            self.launch(kernel)?;
        }
        let end = stream
            .record_event(flags)
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        // elapsed_ms waits for both events.
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| Error::driver("cuEventElapsedTime", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    /// Median milliseconds per launch: `REPEATS` event timings of `LAUNCHES` launches, after warm-up.
    fn median_ms(&mut self, kernel: Kernel) -> Result<f64, Error> {
        self.time(kernel, u64::from(WARMUP_LAUNCHES))?;
        let mut ms: Vec<f64> = (0..REPEATS)
            .map(|_| Ok(self.time(kernel, u64::from(LAUNCHES))?.as_secs_f64() * 1e3 / f64::from(LAUNCHES)))
            .collect::<Result<_, Error>>()?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }
}

/// `n` from `DROPFUSE_BENCH_N` (log2), default 2^28.
fn element_count() -> usize {
    let log2 = match std::env::var("DROPFUSE_BENCH_N") {
        Ok(s) => match s.trim().parse::<u32>() {
            Ok(v) if (5..=33).contains(&v) => v,
            _ => {
                eprintln!("DROPFUSE_BENCH_N={s:?} is not a log2 size in 5..=33: using {DEFAULT_LOG2_N}");
                DEFAULT_LOG2_N
            }
        },
        Err(_) => DEFAULT_LOG2_N,
    };
    1usize << log2
}

/// One summary line's numbers.
struct Summary {
    kernel: Kernel,
    dtype: &'static str,
    n: usize,
    ms: f64,
    bytes: u64,
    copy_ms: f64,
    copy_bytes: u64,
}

impl Summary {
    /// GB/s (10^9 bytes per second) of `bytes` moved in `ms`.
    fn gbps(bytes: u64, ms: f64) -> f64 {
        bytes as f64 / ms / 1e6
    }

    fn copy_fraction(&self) -> f64 {
        Self::gbps(self.bytes, self.ms) / Self::gbps(self.copy_bytes, self.copy_ms)
    }

    /// The greppable stdout line.
    fn line(&self) -> String {
        format!(
            "DROPFUSE_BENCH kernel={} dtype={} n={} ms={:.4} bytes={} gbps={:.1} copy_ms={:.4} copy_gbps={:.1} \
             copy_fraction={:.3}",
            self.kernel.name(),
            self.dtype,
            self.n,
            self.ms,
            self.bytes,
            Self::gbps(self.bytes, self.ms),
            self.copy_ms,
            Self::gbps(self.copy_bytes, self.copy_ms),
            self.copy_fraction(),
        )
    }

    /// The same as a JSON object (one line).
    fn json(&self, gpu: &str, unix_time: u64) -> String {
        format!(
            "{{\"kernel\":\"{}\",\"dtype\":\"{}\",\"n\":{},\"ms\":{:.6},\"bytes\":{},\"gbps\":{:.3},\
             \"copy_ms\":{:.6},\"copy_gbps\":{:.3},\"copy_fraction\":{:.5},\"gpu\":\"{}\",\"unix_time\":{}}}",
            self.kernel.name(),
            self.dtype,
            self.n,
            self.ms,
            self.bytes,
            Self::gbps(self.bytes, self.ms),
            self.copy_ms,
            Self::gbps(self.copy_bytes, self.copy_ms),
            self.copy_fraction(),
            json_escape(gpu),
            unix_time,
        )
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Prints (and appends to `DROPFUSE_BENCH_JSON`) one summary line per kernel of dtype `T`.
fn summarize<T: Element>(bench: &mut Bench<T>, gpu: &str) -> Result<(), Error> {
    let (n, size, dtype) = (bench.n(), T::DTYPE.size(), T::DTYPE.name());
    let copy_ms = bench.median_ms(Kernel::Copy)?;
    let copy_bytes = Kernel::Copy.bytes(n, size);
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut json = std::env::var_os("DROPFUSE_BENCH_JSON").and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| eprintln!("cannot open DROPFUSE_BENCH_JSON={path:?}: {e}"))
            .ok()
    });
    for kernel in Kernel::ALL {
        let ms = if kernel == Kernel::Copy {
            copy_ms
        } else {
            bench.median_ms(kernel)?
        };
        let s = Summary {
            kernel,
            dtype,
            n,
            ms,
            bytes: kernel.bytes(n, size),
            copy_ms,
            copy_bytes,
        };
        println!("{}", s.line());
        if let Some(file) = json.as_mut() {
            if let Err(e) = writeln!(file, "{}", s.json(gpu, unix_time)) {
                eprintln!("cannot write DROPFUSE_BENCH_JSON: {e}");
            }
        }
    }
    Ok(())
}

/// The summary lines, then one criterion group per dtype.
fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, gpu: &str, n: usize) {
    let dtype = T::DTYPE.name();
    let mut bench = Bench::<T>::new(dev, n).unwrap_or_else(|e| panic!("{dtype}: setting up n = {n}: {e}"));
    summarize(&mut bench, gpu).unwrap_or_else(|e| panic!("{dtype}: summary timing: {e}"));

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
                    .time(kernel, iters)
                    .unwrap_or_else(|e| panic!("{dtype} {}: {e}", kernel.name()))
            })
        });
    }
    group.finish();
    // `bench` (several GiB at f32) is freed here, before the next dtype allocates.
}

fn dropout_benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: dropout benches: no CUDA device ({e})");
            return;
        }
    };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    let n = element_count();
    println!("dropout benches on {gpu}: n = {n} elements, p = {P}");
    bench_dtype::<f16>(c, &dev, &gpu, n);
    bench_dtype::<bf16>(c, &dev, &gpu, n);
    bench_dtype::<f32>(c, &dev, &gpu, n);
}

criterion_group!(benches, dropout_benches);
criterion_main!(benches);
