//! Fused bias + dropout + residual benchmarks (criterion, `harness = false`), plus summary lines in
//! the schema of `benches/dropout.rs` and `benches/peers/bias_dropout_residual_torch.py` (same
//! kernel names, `n` and shape).
//!
//! Shape: 16 x 4096 x 4096 (rows = 65536, H = 4096), p = 0.1, with a bias; bf16, f16 and f32.
//! `n = rows * H`, `s` the element size, `W = ceil(rows / 256) * H` the dbias workspace floats.
//!
//! | kernel (`bias_dropout_residual_` + ...) | what                                          | bytes moved                          |
//! |---------------------|-----------------------------------------------|--------------------------------------|
//! | `copy`              | device copy of x (the bandwidth baseline)     | `2·n·s`                              |
//! | `forward_mask`      | y = r + dropout(x + b), write the bit mask    | `3·n·s + H·s + 4·ceil(n/32)`         |
//! | `forward_maskless`  | the same, no mask                             | `3·n·s + H·s`                        |
//! | `backward_mask`     | dx and dbias from the mask                    | `2·n·s + 4·ceil(n/32) + 8·W + H·s`   |
//! | `backward_maskless` | dx and dbias, keep bits regenerated           | `2·n·s + 8·W + H·s`                  |
//!
//! Each row: median over 20 event-timed windows of 10 back-to-back launches (after 5 warm-up
//! launches), a fresh Philox stream per forward. `copy_fraction` is the row's bandwidth over the
//! copy's of the same dtype and n in the same run. The targets (bf16): forward >= 0.85 of
//! the copy bandwidth and >= 2.3x faster than `torch.compile` of `r + F.dropout(x + b)`.
//!
//! Environment: `DROPFUSE_BENCH_JSON` (append rows as JSON lines), `DROPFUSE_COMMIT`,
//! `DROPFUSE_BENCH_ROWS` (log2 of the row count, default 16). Without a CUDA device this prints a
//! SKIPPED line and registers nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::{Device, Element, Error, Generator};

mod common;
use common::{burst_rows, env_log2, filled, Burst, Output, Row, Timer};

const P: f64 = 0.1;
const H: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Copy,
    ForwardMask,
    ForwardMaskless,
    BackwardMask,
    BackwardMaskless,
}

impl Kernel {
    const ALL: [Kernel; 5] = [
        Kernel::Copy,
        Kernel::ForwardMask,
        Kernel::ForwardMaskless,
        Kernel::BackwardMask,
        Kernel::BackwardMaskless,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Copy => "copy",
            Kernel::ForwardMask => "bias_dropout_residual_forward_mask",
            Kernel::ForwardMaskless => "bias_dropout_residual_forward_maskless",
            Kernel::BackwardMask => "bias_dropout_residual_backward_mask",
            Kernel::BackwardMaskless => "bias_dropout_residual_backward_maskless",
        }
    }
}

struct Bench<T: Element> {
    dev: Device,
    op: BiasDropoutResidual,
    rng: Generator,
    rows: usize,
    /// Forward input (also the backward's dy and the copy's source).
    x: CudaSlice<T>,
    residual: CudaSlice<T>,
    bias: CudaSlice<T>,
    /// Forward output, backward dx, copy destination.
    y: CudaSlice<T>,
    mask: CudaSlice<u32>,
    dbias: CudaSlice<T>,
    workspace: CudaSlice<f32>,
    timer: Timer,
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, rows: usize) -> Result<Self, Error> {
        let n = rows * H;
        let op = BiasDropoutResidual::new(P, H)?;
        // A varied pattern copied over the inputs (values do not change speed).
        let value = |i: usize| (i % 251) as f32 * 0.01 - 1.25;
        let mut b = Bench {
            dev: dev.clone(),
            op,
            rng: Generator::new(0xb1a5),
            rows,
            x: filled(dev, n, value)?,
            residual: filled(dev, n, value)?,
            bias: dev.upload(
                &(0..H)
                    .map(|j| T::from_f32(j as f32 / H as f32))
                    .collect::<Vec<_>>(),
            )?,
            y: dev.zeros(n)?,
            mask: dev.zeros(mask_words(n))?,
            dbias: dev.zeros(H)?,
            workspace: dev.zeros(op.workspace_len(rows))?,
            timer: Timer::new(dev)?,
        };
        b.launch(Kernel::ForwardMask)?; // a valid mask for the backward
        b.dev.synchronize()?;
        Ok(b)
    }

    fn n(&self) -> usize {
        self.x.len()
    }

    fn bytes(&self, k: Kernel) -> u64 {
        let s = T::DTYPE.size() as u64;
        let n = self.n() as u64;
        let mask = 4 * mask_words(self.n()) as u64;
        let ws = 8 * self.op.workspace_len(self.rows) as u64;
        let bias = H as u64 * s;
        match k {
            Kernel::Copy => 2 * n * s,
            Kernel::ForwardMask => 3 * n * s + bias + mask,
            Kernel::ForwardMaskless => 3 * n * s + bias,
            Kernel::BackwardMask => 2 * n * s + mask + ws + bias,
            Kernel::BackwardMaskless => 2 * n * s + ws + bias,
        }
    }
}

impl<T: Element> Burst for Bench<T> {
    type Kernel = Kernel;

    fn timer(&self) -> &Timer {
        &self.timer
    }

    fn launch(&mut self, k: Kernel) -> Result<(), Error> {
        let s = self.dev.stream();
        let grad = BiasGrad {
            dbias: &mut self.dbias,
            workspace: &mut self.workspace,
        };
        match k {
            Kernel::Copy => s
                .memcpy_dtod(&self.x, &mut self.y)
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
            Kernel::ForwardMask => self.op.forward(
                s,
                self.rng.next(),
                &self.x,
                &self.residual,
                Some(&self.bias),
                &mut self.y,
                &mut self.mask,
            ),
            Kernel::ForwardMaskless => self.op.forward_maskless(
                s,
                self.rng.next(),
                &self.x,
                &self.residual,
                Some(&self.bias),
                &mut self.y,
            ),
            Kernel::BackwardMask => self.op.backward(s, &self.mask, &self.x, &mut self.y, Some(grad)),
            Kernel::BackwardMaskless => {
                self.op
                    .backward_maskless(s, self.rng.next(), &self.x, &mut self.y, Some(grad))
            }
        }
    }

    fn row(&self, k: Kernel) -> Row {
        Row::new(k.name(), T::DTYPE.name(), self.n(), self.bytes(k))
            .shape(format!("{}x{H}", self.rows))
            .param("bias", true)
            .param("p", P)
    }
}

fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output, rows: usize) {
    let dtype = T::DTYPE.name();
    let mut b = Bench::<T>::new(dev, rows).unwrap_or_else(|e| panic!("{dtype}: setup: {e}"));
    burst_rows(out, &mut b, dtype, Kernel::Copy, &Kernel::ALL);
    common::group(
        c,
        format!("bias_dropout_residual/{dtype}/{rows}x{H}"),
        &mut b,
        &Kernel::ALL,
    );
}

fn bias_dropout_residual_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("bias_dropout_residual") }) else {
        return;
    };
    let rows = 1usize << env_log2("DROPFUSE_BENCH_ROWS", 16, 0..=20);
    println!(
        "bias_dropout_residual benches on {}: {rows} x {H}, p = {P}, with bias",
        out.meta.gpu
    );
    bench_dtype::<bf16>(c, &dev, &mut out, rows);
    bench_dtype::<f16>(c, &dev, &mut out, rows);
    bench_dtype::<f32>(c, &dev, &mut out, rows);
}

criterion_group!(benches, bias_dropout_residual_benches);
criterion_main!(benches);
