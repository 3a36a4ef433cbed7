//! Attention-importance benchmarks (criterion, `harness = false`), plus summary lines in the schema
//! of `benches/dropout.rs` and `benches/peers/importance_torch.py` (same kernel names, `n`, shape).
//!
//! Shape: hidden states 16 x 4096 x 4096 (tokens = 65536, H = 4096); bf16, f16 and f32.
//! `n = tokens * H`, `s` the element size.
//!
//! | kernel              | what                                                   | bytes moved            |
//! |---------------------|--------------------------------------------------------|------------------------|
//! | `copy`              | device copy of the input (the bandwidth baseline)      | `2·n·s`                |
//! | `importance`        | per-token cosine of input and output, layer sum/count  | `2·n·s` (reads both)   |
//! | `importance_masked` | the same with a padding mask (every token real)        | `2·n·s + tokens`       |
//!
//! Each row: median over 20 event-timed windows of 10 back-to-back launches (after 5 warm-up
//! launches), accumulating into one layer (no host read in between). `copy_fraction` is the row's
//! bandwidth over the copy's of the same dtype in the same run. The targets (bf16):
//! >= 0.85 of the copy bandwidth and >= 10x faster than `F.cosine_similarity` in fp32 (peer).
//!
//! Environment: `DROPFUSE_BENCH_JSON`, `DROPFUSE_COMMIT`, `DROPFUSE_BENCH_TOKENS` (log2 of the
//! token count, default 16). Without a CUDA device this prints a SKIPPED line and registers
//! nothing.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaEvent, CudaSlice};
use dropfuse::half::{bf16, f16};
use dropfuse::importance::ImportanceAccumulator;
use dropfuse::{Device, Element, Error};

mod common;
use common::{env_log2, gbps, json_escape, json_num, Output};

const H: usize = 4096;
const LAUNCHES: u64 = 10;
const REPEATS: usize = 20;
const WARMUP: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Copy,
    Importance,
    ImportanceMasked,
}

impl Kernel {
    const ALL: [Kernel; 3] = [Kernel::Copy, Kernel::Importance, Kernel::ImportanceMasked];

    fn name(self) -> &'static str {
        match self {
            Kernel::Copy => "copy",
            Kernel::Importance => "importance",
            Kernel::ImportanceMasked => "importance_masked",
        }
    }
}

struct Bench<T: Element> {
    dev: Device,
    tokens: usize,
    input: CudaSlice<T>,
    output: CudaSlice<T>,
    copy_dst: CudaSlice<T>,
    mask: CudaSlice<u8>,
    acc: ImportanceAccumulator,
    start: CudaEvent,
    end: CudaEvent,
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, tokens: usize) -> Result<Self, Error> {
        let n = tokens * H;
        let stream = dev.stream();
        let driver = |call| move |e| Error::driver(call, e);
        const PATTERN: usize = 1 << 20;
        let pa: Vec<T> = (0..PATTERN.min(n))
            .map(|i| T::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let pb: Vec<T> = (0..PATTERN.min(n))
            .map(|i| T::from_f32((i % 241) as f32 * 0.01 - 1.2))
            .collect();
        let fill = |pat: &[T]| -> Result<CudaSlice<T>, Error> {
            let pat = dev.upload(pat)?;
            let mut d = dev.zeros::<T>(n)?;
            for start in (0..n).step_by(pat.len()) {
                let len = pat.len().min(n - start);
                stream
                    .memcpy_dtod(&pat.slice(..len), &mut d.slice_mut(start..start + len))
                    .map_err(driver("cuMemcpyDtoDAsync"))?;
            }
            Ok(d)
        };
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = dev.context();
        let b = Bench {
            dev: dev.clone(),
            tokens,
            input: fill(&pa)?,
            output: fill(&pb)?,
            copy_dst: dev.zeros(n)?,
            mask: dev.upload(&vec![1u8; tokens])?,
            acc: ImportanceAccumulator::new(dev, 1)?,
            start: ctx.new_event(flags).map_err(driver("cuEventCreate"))?,
            end: ctx.new_event(flags).map_err(driver("cuEventCreate"))?,
        };
        b.dev.synchronize()?;
        Ok(b)
    }

    fn n(&self) -> usize {
        self.input.len()
    }

    fn bytes(&self, k: Kernel) -> u64 {
        let data = 2 * self.n() as u64 * T::DTYPE.size() as u64;
        match k {
            Kernel::Copy | Kernel::Importance => data,
            Kernel::ImportanceMasked => data + self.tokens as u64,
        }
    }

    fn launch(&mut self, k: Kernel) -> Result<(), Error> {
        match k {
            Kernel::Copy => self
                .dev
                .stream()
                .memcpy_dtod(&self.input, &mut self.copy_dst)
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
            Kernel::Importance => self.acc.add(0, H, &self.input, &self.output, None),
            Kernel::ImportanceMasked => self.acc.add(0, H, &self.input, &self.output, Some(&self.mask)),
        }
    }

    fn time(&mut self, k: Kernel, launches: u64) -> Result<Duration, Error> {
        let stream = self.dev.stream().clone();
        let rec = |e| Error::driver("cuEventRecord", e);
        self.start.record(&stream).map_err(rec)?;
        for _ in 0..launches {
            self.launch(k)?;
        }
        self.end.record(&stream).map_err(rec)?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| Error::driver("cuEventElapsedTime", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    fn median_ms(&mut self, k: Kernel) -> Result<f64, Error> {
        self.time(k, WARMUP)?;
        let mut ms = (0..REPEATS)
            .map(|_| Ok(self.time(k, LAUNCHES)?.as_secs_f64() * 1e3 / LAUNCHES as f64))
            .collect::<Result<Vec<f64>, Error>>()?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[REPEATS / 2])
    }

    fn row(&self, out: &mut Output, k: Kernel, ms: f64, copy_ms: f64) {
        let bytes = self.bytes(k);
        let copy_bytes = self.bytes(Kernel::Copy);
        let frac = gbps(bytes, ms) / gbps(copy_bytes, copy_ms);
        let dtype = T::DTYPE.name();
        let shape = format!("{}x{H}", self.tokens);
        let text = format!(
            "DROPFUSE_BENCH method=burst kernel={} dtype={dtype} n={} shape={shape} ms={ms:.5} bytes={bytes} \
             gbps={:.1} copy_ms={copy_ms:.5} copy_gbps={:.1} copy_fraction={frac:.3}",
            k.name(),
            self.n(),
            gbps(bytes, ms),
            gbps(copy_bytes, copy_ms),
        );
        let m = &out.meta;
        let json = format!(
            "{{\"impl\":\"{}\",\"kernel\":\"{}\",\"dtype\":\"{dtype}\",\"n\":{},\"shape\":\"{shape}\",\
             \"method\":\"burst\",\"launches\":{LAUNCHES},\"repeats\":{REPEATS},\"ms\":{},\"bytes\":{bytes},\
             \"gbps\":{},\"copy_ms\":{},\"copy_gbps\":{},\"copy_fraction\":{},\"gpu\":\"{}\",\"date\":\"{}\",\
             \"commit\":\"{}\",\"side\":\"dropfuse\"}}",
            if k == Kernel::Copy { "copy" } else { "dropfuse" },
            k.name(),
            self.n(),
            json_num(ms, 7),
            json_num(gbps(bytes, ms), 3),
            json_num(copy_ms, 7),
            json_num(gbps(copy_bytes, copy_ms), 3),
            json_num(frac, 5),
            json_escape(&m.gpu),
            m.date,
            json_escape(&m.commit),
        );
        out.emit(&text, &json);
    }
}

fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output, tokens: usize) {
    let dtype = T::DTYPE.name();
    let mut b = Bench::<T>::new(dev, tokens).unwrap_or_else(|e| panic!("{dtype}: setup: {e}"));
    let copy_ms = b
        .median_ms(Kernel::Copy)
        .unwrap_or_else(|e| panic!("{dtype} copy: {e}"));
    for k in Kernel::ALL {
        let ms = if k == Kernel::Copy {
            copy_ms
        } else {
            b.median_ms(k)
                .unwrap_or_else(|e| panic!("{dtype} {}: {e}", k.name()))
        };
        b.row(out, k, ms, copy_ms);
    }
    let mut group = c.benchmark_group(format!("importance/{dtype}/{tokens}x{H}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000));
    for k in Kernel::ALL {
        group.throughput(Throughput::Bytes(b.bytes(k)));
        group.bench_function(k.name(), |bencher| {
            bencher.iter_custom(|iters| {
                b.time(k, iters)
                    .unwrap_or_else(|e| panic!("{dtype} {}: {e}", k.name()))
            })
        });
    }
    group.finish();
}

fn importance_benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: importance benches: no CUDA device ({e})");
            return;
        }
    };
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone (see dropout.rs).
    unsafe { dev.context().disable_event_tracking() };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    let tokens = 1usize << env_log2("DROPFUSE_BENCH_TOKENS", 16, 0..=20);
    println!("importance benches on {gpu}: {tokens} tokens x {H}");
    let mut out = Output::new(gpu);
    bench_dtype::<bf16>(c, &dev, &mut out, tokens);
    bench_dtype::<f16>(c, &dev, &mut out, tokens);
    bench_dtype::<f32>(c, &dev, &mut out, tokens);
}

criterion_group!(benches, importance_benches);
criterion_main!(benches);
