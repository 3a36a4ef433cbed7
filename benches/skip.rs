//! Compute-skipping benchmarks (criterion, `harness = false`), plus summary lines in the schema of
//! `benches/dropout.rs` and `benches/peers/skip_torch.py` (same kernel names, `n` and bytes).
//!
//! bf16, B = 16 samples of 4096 x 4096 elements (`n` = 2^28, 512 MiB per tensor):
//!
//! | kernel                      | what is timed                                     | bytes counted                              |
//! |-----------------------------|---------------------------------------------------|--------------------------------------------|
//! | `copy`                      | device copy of x (the baseline)                   | read x + write y                           |
//! | `stochastic_depth_forward`  | in place, every sample kept, scale 1/(1-p)        | read residual + read branch + write residual |
//! | `stochastic_depth_forward_p25` | in place, 4 of 16 samples dropped (fixed flags) | the same for the 12 kept samples only      |
//! | `stochastic_depth_backward` | d_branch from d_out, 4 of 16 dropped              | read d_out of kept + write d_branch (all)  |
//! | `sample_compaction`         | slots + gather the 12 kept samples + scatter back out of place (`out = x` for dropped, compact rows for kept; the layer in between does nothing) | gather: read + write 12 rows; scatter: read + write 16 rows |
//!
//! p = 0.25 (scale 4/3). Each row: median over 20 event-timed windows of 10 back-to-back calls
//! (after 5 warm-up calls). `copy_fraction` is the row's bandwidth over a device copy of x timed in
//! the same run; the acceptance target of the fused residual is >= 0.85 (issue 6).
//! Environment: `DROPFUSE_BENCH_JSON` (append rows as JSON lines), `DROPFUSE_COMMIT`.
//! Without a CUDA device this prints a SKIPPED line and registers nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::half::bf16;
use dropfuse::skip::{self, Keep, SampleSlots};
use dropfuse::{Device, Error};

mod common;
use common::{burst_rows, Burst, Row, Timer};

const BATCH: usize = 16;
const ROW: usize = 4096 * 4096;
const P: f64 = 0.25;
/// Samples 3, 7, 11 and 15 are dropped in the `_p25`, backward and compaction rows.
const DROPPED: [usize; 4] = [3, 7, 11, 15];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Copy,
    Forward,
    ForwardP25,
    Backward,
    Compaction,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Copy => "copy",
            Kernel::Forward => "stochastic_depth_forward",
            Kernel::ForwardP25 => "stochastic_depth_forward_p25",
            Kernel::Backward => "stochastic_depth_backward",
            Kernel::Compaction => "sample_compaction",
        }
    }
}

struct Bench {
    dev: Device,
    scale: f32,
    x: CudaSlice<bf16>,
    f: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    compact: CudaSlice<bf16>,
    all: CudaSlice<u8>,
    some: CudaSlice<u8>,
    slots: SampleSlots,
    timer: Timer,
}

fn kept() -> usize {
    BATCH - DROPPED.len()
}

impl Bench {
    fn new(dev: &Device) -> Result<Self, Error> {
        let n = BATCH * ROW;
        let host: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let keep: Vec<bool> = (0..BATCH).map(|b| !DROPPED.contains(&b)).collect();
        let some = dev.upload(&skip::keep_flags(&keep))?;
        let slots = SampleSlots::from_keep(dev.stream(), &some)?;
        Ok(Bench {
            dev: dev.clone(),
            scale: dropfuse::reference::skip::depth_scale(P, true)?,
            f: dev.upload(&host)?,
            x: dev.upload(&host)?,
            y: dev.zeros(n)?,
            compact: dev.zeros(kept() * ROW)?,
            all: dev.upload(&[1u8; BATCH])?,
            some,
            slots,
            timer: Timer::new(dev)?,
        })
    }

    fn bytes(&self, k: Kernel) -> u64 {
        let row = (ROW * 2) as u64;
        let (b, kept) = (BATCH as u64, kept() as u64);
        match k {
            Kernel::Copy => 2 * b * row,
            Kernel::Forward => 3 * b * row,
            Kernel::ForwardP25 => 3 * kept * row,
            Kernel::Backward => kept * row + b * row,
            Kernel::Compaction => 2 * kept * row + 2 * b * row,
        }
    }
}

impl Burst for Bench {
    type Kernel = Kernel;

    fn timer(&self) -> &Timer {
        &self.timer
    }

    fn launch(&mut self, k: Kernel) -> Result<(), Error> {
        let s = self.dev.stream().clone();
        match k {
            Kernel::Copy => s
                .memcpy_dtod(&self.x, &mut self.y)
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
            // The residual grows by scale * branch every call; the values do not change the speed.
            Kernel::Forward => skip::stochastic_depth_in_place(
                &s,
                &mut self.x,
                &self.f,
                None,
                ROW,
                Keep::PerSample(&self.all),
                self.scale,
            ),
            Kernel::ForwardP25 => skip::stochastic_depth_in_place(
                &s,
                &mut self.x,
                &self.f,
                None,
                ROW,
                Keep::PerSample(&self.some),
                self.scale,
            ),
            Kernel::Backward => skip::stochastic_depth_backward(
                &s,
                &self.f,
                ROW,
                Keep::PerSample(&self.some),
                self.scale,
                &mut self.y,
            ),
            Kernel::Compaction => {
                self.slots.compute(&s, &self.some)?;
                skip::gather_samples(&s, &self.slots, &self.x, ROW, &mut self.compact)?;
                skip::scatter_samples(&s, &self.slots, &self.x, &self.compact, ROW, &mut self.y)
            }
        }
    }

    fn row(&self, k: Kernel) -> Row {
        Row::new(k.name(), "bf16", BATCH * ROW, self.bytes(k))
            .shape(format!("{BATCH}x4096x4096"))
            .param("p", P)
            .param(
                "kept_samples",
                if k == Kernel::Forward || k == Kernel::Copy {
                    BATCH
                } else {
                    kept()
                },
            )
    }
}

fn skip_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("skip") }) else {
        return;
    };
    println!(
        "skip benches on {}: bf16, {BATCH} x 4096 x 4096, p = {P}",
        out.meta.gpu
    );
    let mut b = Bench::new(&dev).unwrap_or_else(|e| panic!("skip benches: setup: {e}"));
    let kernels = [
        Kernel::Copy,
        Kernel::Forward,
        Kernel::ForwardP25,
        Kernel::Backward,
        Kernel::Compaction,
    ];
    burst_rows(&mut out, &mut b, "skip", Kernel::Copy, &kernels);
    common::group(c, "skip/bf16".to_string(), &mut b, &kernels);
}

criterion_group!(benches, skip_benches);
criterion_main!(benches);
