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

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaEvent, CudaSlice};
use dropfuse::drop_block::{stats_len, DropBlock};
use dropfuse::dropout::mask_words;
use dropfuse::half::f16;
use dropfuse::{Device, Error, Generator};

mod common;
use common::{gbps, json_escape, json_num, Output};

const P: f64 = 0.1;
const LAUNCHES: u64 = 10;
const REPEATS: usize = 20;
const WARMUP: u64 = 5;

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
    start: CudaEvent,
    end: CudaEvent,
}

impl Bench {
    fn new(dev: &Device, name: &'static str, shape: &[usize], block_size: usize) -> Result<Self, Error> {
        let numel: usize = shape.iter().product();
        let host: Vec<f16> = (0..numel)
            .map(|i| f16::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |e| Error::driver("cuEventCreate", e);
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
            start: dev.context().new_event(flags).map_err(ev)?,
            end: dev.context().new_event(flags).map_err(ev)?,
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

    fn row(&mut self, out: &mut Output, k: Kernel, ms: f64, copy_ms: f64) {
        let bytes = self.bytes(k);
        let copy_bytes = self.bytes(Kernel::Copy);
        let frac = gbps(bytes, ms) / gbps(copy_bytes, copy_ms);
        let kernel = self.kernel_name(k);
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let text = format!(
            "DROPFUSE_BENCH method=burst kernel={kernel} dtype=f16 n={} shape={shape} ms={ms:.5} bytes={bytes} \
             gbps={:.1} copy_ms={copy_ms:.5} copy_gbps={:.1} copy_fraction={frac:.3}",
            self.numel(),
            gbps(bytes, ms),
            gbps(copy_bytes, copy_ms),
        );
        let m = &out.meta;
        let json = format!(
            "{{\"impl\":\"{}\",\"kernel\":\"{kernel}\",\"dtype\":\"f16\",\"n\":{},\"shape\":\"{shape}\",\
             \"block_size\":{},\"p\":{P},\"method\":\"burst\",\"launches\":{LAUNCHES},\"repeats\":{REPEATS},\
             \"ms\":{},\"bytes\":{bytes},\"gbps\":{},\"copy_ms\":{},\"copy_gbps\":{},\"copy_fraction\":{},\
             \"gpu\":\"{}\",\"date\":\"{}\",\"commit\":\"{}\",\"side\":\"dropfuse\"}}",
            if k == Kernel::Copy { "copy" } else { "dropfuse" },
            self.numel(),
            self.block.block_size(),
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
    let copy_ms = b
        .median_ms(Kernel::Copy)
        .unwrap_or_else(|e| panic!("{name} copy: {e}"));
    for &k in kernels {
        let ms = if k == Kernel::Copy {
            copy_ms
        } else {
            b.median_ms(k).unwrap_or_else(|e| panic!("{name} {k:?}: {e}"))
        };
        b.row(out, k, ms, copy_ms);
    }
    let mut group = c.benchmark_group(format!("drop_block/{name}/f16"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000));
    for &k in kernels {
        group.throughput(Throughput::Bytes(b.bytes(k)));
        group.bench_function(b.kernel_name(k), |bencher| {
            bencher.iter_custom(|iters| b.time(k, iters).unwrap_or_else(|e| panic!("{name} {k:?}: {e}")))
        });
    }
    group.finish();
}

fn drop_block_benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: drop_block benches: no CUDA device ({e})");
            return;
        }
    };
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone (see dropout.rs).
    unsafe { dev.context().disable_event_tracking() };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    println!("drop_block benches on {gpu}: p = {P}");
    let mut out = Output::new(gpu);
    bench_shape(c, &dev, &mut out, "drop_block_2d", &[64, 256, 56, 56], 7);
    bench_shape(c, &dev, &mut out, "drop_block_3d", &[8, 64, 16, 56, 56], 5);
}

criterion_group!(benches, drop_block_benches);
criterion_main!(benches);
