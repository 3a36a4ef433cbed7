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

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::half::{bf16, f16};
use dropfuse::importance::ImportanceAccumulator;
use dropfuse::{Device, Element, Error};

mod common;
use common::{burst_rows, env_log2, filled, Burst, Output, Row, Timer};

const H: usize = 4096;

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
    timer: Timer,
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, tokens: usize) -> Result<Self, Error> {
        let n = tokens * H;
        let b = Bench {
            dev: dev.clone(),
            tokens,
            input: filled(dev, n, |i| (i % 251) as f32 * 0.01 - 1.25)?,
            output: filled(dev, n, |i| (i % 241) as f32 * 0.01 - 1.2)?,
            copy_dst: dev.zeros(n)?,
            mask: dev.upload(&vec![1u8; tokens])?,
            acc: ImportanceAccumulator::new(dev, 1)?,
            timer: Timer::new(dev)?,
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
}

impl<T: Element> Burst for Bench<T> {
    type Kernel = Kernel;

    fn timer(&self) -> &Timer {
        &self.timer
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

    fn row(&self, k: Kernel) -> Row {
        Row::new(k.name(), T::DTYPE.name(), self.n(), self.bytes(k)).shape(format!("{}x{H}", self.tokens))
    }
}

fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output, tokens: usize) {
    let dtype = T::DTYPE.name();
    let mut b = Bench::<T>::new(dev, tokens).unwrap_or_else(|e| panic!("{dtype}: setup: {e}"));
    burst_rows(out, &mut b, dtype, Kernel::Copy, &Kernel::ALL);
    common::group(
        c,
        format!("importance/{dtype}/{tokens}x{H}"),
        &mut b,
        &Kernel::ALL,
    );
}

fn importance_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("importance") }) else {
        return;
    };
    let tokens = 1usize << env_log2("DROPFUSE_BENCH_TOKENS", 16, 0..=20);
    println!("importance benches on {}: {tokens} tokens x {H}", out.meta.gpu);
    bench_dtype::<bf16>(c, &dev, &mut out, tokens);
    bench_dtype::<f16>(c, &dev, &mut out, tokens);
    bench_dtype::<f32>(c, &dev, &mut out, tokens);
}

criterion_group!(benches, importance_benches);
criterion_main!(benches);
