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

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaEvent, CudaSlice};
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::{Device, Element, Error, Generator};

mod common;
use common::{env_log2, gbps, json_escape, json_num, Output};

const P: f64 = 0.1;
const H: usize = 4096;
const LAUNCHES: u64 = 10;
const REPEATS: usize = 20;
const WARMUP: u64 = 5;

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
    start: CudaEvent,
    end: CudaEvent,
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device, rows: usize) -> Result<Self, Error> {
        let n = rows * H;
        let op = BiasDropoutResidual::new(P, H)?;
        let stream = dev.stream();
        let driver = |call| move |e| Error::driver(call, e);
        // A varied pattern uploaded once and copied over the inputs (values do not change speed).
        const PATTERN: usize = 1 << 20;
        let pattern: Vec<T> = (0..PATTERN.min(n))
            .map(|i| T::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let pattern = dev.upload(&pattern)?;
        let filled = |d: &mut CudaSlice<T>| -> Result<(), Error> {
            for start in (0..n).step_by(pattern.len()) {
                let len = pattern.len().min(n - start);
                stream
                    .memcpy_dtod(&pattern.slice(..len), &mut d.slice_mut(start..start + len))
                    .map_err(driver("cuMemcpyDtoDAsync"))?;
            }
            Ok(())
        };
        let mut x = dev.zeros::<T>(n)?;
        filled(&mut x)?;
        let mut residual = dev.zeros::<T>(n)?;
        filled(&mut residual)?;
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = dev.context();
        let mut b = Bench {
            dev: dev.clone(),
            op,
            rng: Generator::new(0xb1a5),
            rows,
            x,
            residual,
            bias: dev.upload(
                &(0..H)
                    .map(|j| T::from_f32(j as f32 / H as f32))
                    .collect::<Vec<_>>(),
            )?,
            y: dev.zeros(n)?,
            mask: dev.zeros(mask_words(n))?,
            dbias: dev.zeros(H)?,
            workspace: dev.zeros(op.workspace_len(rows))?,
            start: ctx.new_event(flags).map_err(driver("cuEventCreate"))?,
            end: ctx.new_event(flags).map_err(driver("cuEventCreate"))?,
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
        let shape = format!("{}x{H}", self.rows);
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
             \"bias\":true,\"p\":{P},\"method\":\"burst\",\"launches\":{LAUNCHES},\"repeats\":{REPEATS},\
             \"ms\":{},\"bytes\":{bytes},\"gbps\":{},\"copy_ms\":{},\"copy_gbps\":{},\"copy_fraction\":{},\
             \"gpu\":\"{}\",\"date\":\"{}\",\"commit\":\"{}\",\"side\":\"dropfuse\"}}",
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

fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output, rows: usize) {
    let dtype = T::DTYPE.name();
    let mut b = Bench::<T>::new(dev, rows).unwrap_or_else(|e| panic!("{dtype}: setup: {e}"));
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
    let mut group = c.benchmark_group(format!("bias_dropout_residual/{dtype}/{rows}x{H}"));
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

fn bias_dropout_residual_benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: bias_dropout_residual benches: no CUDA device ({e})");
            return;
        }
    };
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone (see dropout.rs).
    unsafe { dev.context().disable_event_tracking() };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    let rows = 1usize << env_log2("DROPFUSE_BENCH_ROWS", 16, 0..=20);
    println!("bias_dropout_residual benches on {gpu}: {rows} x {H}, p = {P}, with bias");
    let mut out = Output::new(gpu);
    bench_dtype::<bf16>(c, &dev, &mut out, rows);
    bench_dtype::<f16>(c, &dev, &mut out, rows);
    bench_dtype::<f32>(c, &dev, &mut out, rows);
}

criterion_group!(benches, bias_dropout_residual_benches);
criterion_main!(benches);
