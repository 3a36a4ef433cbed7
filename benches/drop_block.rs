//! DropBlock benchmarks (criterion, `harness = false`), plus summary lines in the schema of
//! `benches/dropout.rs` and `benches/peers/drop_block_torch.py` (same kernel names and `n`).
//!
//! | kernel                   | shape (f16)        | block | bytes moved                          |
//! |--------------------------|--------------------|-------|--------------------------------------|
//! | `copy`                   | each shape         |       | read x + write y (the baseline)      |
//! | `drop_block_2d_mask`     | 64 x 256 x 56 x 56 | 7     | write mask: `4·ceil(numel/32)`       |
//! | `drop_block_2d_forward`  | 64 x 256 x 56 x 56 | 7     | read x + write y + write mask        |
//! | `drop_block_2d_backward` | 64 x 256 x 56 x 56 | 7     | read dy + write dx + read mask       |
//! | `drop_block_3d_forward`  | 8 x 64 x 16 x 56 x 56 | 5  | read x + write y + write mask        |
//!
//! p = 0.1, global normalisation, one mask per channel. Each row: median over 20 event-timed
//! windows of 10 back-to-back launches (after 5 warm-up launches), with a fresh Philox stream per
//! forward. `copy_fraction` is the row's bandwidth over a device copy of x timed in the same run.
//! Environment: `DROPFUSE_BENCH_JSON` (append rows as JSON lines), `DROPFUSE_COMMIT`.
//! Without a CUDA device this prints a SKIPPED line and registers nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::drop_block::{stats_len, DropBlock};
use dropfuse::dropout::mask_words;
use dropfuse::half::f16;
use dropfuse::{Device, Error, Generator};

mod common;
use common::{burst_rows, Burst, Output, Row, Timer};

const P: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Copy,
    Mask,
    Forward,
    Backward,
}

/// One benchmarked shape and its buffers.
struct Bench {
    dev: Device,
    name: &'static str,
    shape: Vec<usize>,
    block: DropBlock,
    rng: Generator,
    x: CudaSlice<f16>,
    y: CudaSlice<f16>,
    mask: CudaSlice<u32>,
    stats: CudaSlice<u64>,
    timer: Timer,
}

impl Bench {
    fn new(dev: &Device, name: &'static str, shape: &[usize], block_size: usize) -> Result<Self, Error> {
        let numel: usize = shape.iter().product();
        let host: Vec<f16> = (0..numel)
            .map(|i| f16::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        Ok(Bench {
            dev: dev.clone(),
            name,
            shape: shape.to_vec(),
            block: DropBlock::new(P, block_size)?,
            rng: Generator::new(0xb10c),
            x: dev.upload(&host)?,
            y: dev.zeros(numel)?,
            mask: dev.zeros(mask_words(numel))?,
            stats: dev.zeros(stats_len(shape)?)?,
            timer: Timer::new(dev)?,
        })
    }

    fn numel(&self) -> usize {
        self.x.len()
    }

    fn kernel_name(&self, k: Kernel) -> String {
        match k {
            Kernel::Copy => "copy".to_string(),
            Kernel::Mask => format!("{}_mask", self.name),
            Kernel::Forward => format!("{}_forward", self.name),
            Kernel::Backward => format!("{}_backward", self.name),
        }
    }

    fn bytes(&self, k: Kernel) -> u64 {
        let data = 2 * self.numel() as u64 * 2;
        let mask = 4 * mask_words(self.numel()) as u64;
        match k {
            Kernel::Copy => data,
            Kernel::Mask => mask,
            Kernel::Forward | Kernel::Backward => data + mask,
        }
    }
}

impl Burst for Bench {
    type Kernel = Kernel;

    fn timer(&self) -> &Timer {
        &self.timer
    }

    fn launch(&mut self, k: Kernel) -> Result<(), Error> {
        let s = self.dev.stream();
        match k {
            Kernel::Copy => s
                .memcpy_dtod(&self.x, &mut self.y)
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
            Kernel::Mask => self
                .block
                .mask(s, self.rng.next(), &self.shape, &mut self.mask, &mut self.stats),
            Kernel::Forward => self.block.forward(
                s,
                self.rng.next(),
                &self.shape,
                &self.x,
                &mut self.y,
                &mut self.mask,
                &mut self.stats,
            ),
            // dy = x: the values do not change the speed.
            Kernel::Backward => {
                self.block
                    .backward(s, &self.shape, &self.mask, &self.stats, &self.x, &mut self.y)
            }
        }
    }

    fn row(&self, k: Kernel) -> Row {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        Row::new(self.kernel_name(k), "f16", self.numel(), self.bytes(k))
            .shape(shape)
            .param("block_size", self.block.block_size())
            .param("p", P)
    }
}

fn bench_shape(
    c: &mut Criterion,
    dev: &Device,
    out: &mut Output,
    name: &'static str,
    shape: &[usize],
    block: usize,
) {
    let mut b = Bench::new(dev, name, shape, block).unwrap_or_else(|e| panic!("{name}: setup: {e}"));
    let kernels: &[Kernel] = if name.ends_with("2d") {
        &[Kernel::Copy, Kernel::Mask, Kernel::Forward, Kernel::Backward]
    } else {
        &[Kernel::Copy, Kernel::Forward]
    };
    burst_rows(out, &mut b, name, Kernel::Copy, kernels);
    common::group(c, format!("drop_block/{name}/f16"), &mut b, kernels);
}

fn drop_block_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("drop_block") }) else {
        return;
    };
    println!("drop_block benches on {}: p = {P}", out.meta.gpu);
    bench_shape(c, &dev, &mut out, "drop_block_2d", &[64, 256, 56, 56], 7);
    bench_shape(c, &dev, &mut out, "drop_block_3d", &[8, 64, 16, 56, 56], 5);
}

criterion_group!(benches, drop_block_benches);
criterion_main!(benches);
