//! Multi-sample dropout benchmarks (criterion, `harness = false`), plus summary lines in the schema
//! of `benches/drop_block.rs` and `benches/peers/multi_sample_torch.py` (same kernel names).
//!
//! | kernel                        | shape                           | bytes moved                          |
//! |-------------------------------|---------------------------------|--------------------------------------|
//! | `copy`                        | each row's main tensor          | read + write it (the baseline)       |
//! | `weighted_ce_fwd_bwd`         | K=8, B=1024, C=1000 logits      | read z + write dz (+ labels)         |
//! | `multi_sample_copies`         | K=8 copies of B=1024 x D=2048   | read h + write K copies + K masks    |
//! | `multi_sample_reduce`         | K=8, B x D, grads in T          | read K grads + K masks + write dh    |
//! | `head_fwd_bwd`                | K=8, B=1024, D=2048, C=1000     | read h, W, b + write dh, dW, db      |
//! | `head_gemms`                  | the head's three GEMMs alone    | as `head_fwd_bwd`                    |
//!
//! f16 and bf16, p = 0.1, label smoothing 0.1, every label valid. `weighted_ce_fwd_bwd` is the whole
//! loss-averaging step (labels scan, row kernel, combine: three launches); its peer is
//! `torch.stack(...)` of K `F.cross_entropy` calls, forward and backward (eager and torch.compile).
//! `head_fwd_bwd` is [`MultiSampleHead`]'s forward (K masked copies, broadcast bias, the logits
//! GEMM, weighted CE) and backward (dh_all GEMM, masked reduction, dW GEMM, db column sums) with a
//! bias, gradients in T; its peer is the PyTorch loop of K dropout + linear + cross-entropy calls,
//! forward and backward (eager and torch.compile; same kernel name, shape string and bytes). Its
//! row also carries `gflop` (the three GEMMs: 6 K B D C = 100.7 GFLOP), `tflops` (gflop / ms),
//! and `gemm_ms` / `gemm_tflops` from the `head_gemms` row, which times the three GEMMs alone on
//! the same buffers (cuBLAS, f32 accumulation). The head rows need libcublas: without it they
//! print a SKIPPED line and the other rows still run. Each row: median over
//! 20 event-timed windows of 10 back-to-back calls (after 5 warm-up calls). `copy_fraction` is the
//! row's bandwidth over a device copy of the row's main tensor (dz for the loss, the copies for the
//! copies kernel, the grads for the reduction) timed in the same run.
//! Environment: `DROPFUSE_BENCH_JSON` (append rows as JSON lines), `DROPFUSE_COMMIT`.
//! Without a CUDA device this prints a SKIPPED line and registers nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::half::{bf16, f16};
use dropfuse::multi_sample::{masks_len, HeadWorkspace, MultiSample, MultiSampleHead, WeightedCrossEntropy};
use dropfuse::{Device, Element, Error, Generator};

mod common;
use common::{burst_rows, json_num, Burst, Output, Row, Timer};

const P: f64 = 0.1;
const EPS: f64 = 0.1;
const K: usize = 8;
const B: usize = 1024;
const D: usize = 2048;
const C: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    CopyLogits,
    WeightedCe,
    CopyCopies,
    Copies,
    Reduce,
    HeadFwdBwd,
    HeadGemms,
}

/// The three GEMMs of the head: 6 K B D C FLOPs, in GFLOP.
const HEAD_GFLOP: f64 = 6.0 * (K * B * D * C) as f64 / 1e9;

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::CopyLogits | Kernel::CopyCopies => "copy",
            Kernel::WeightedCe => "weighted_ce_fwd_bwd",
            Kernel::Copies => "multi_sample_copies",
            Kernel::Reduce => "multi_sample_reduce",
            Kernel::HeadFwdBwd => "head_fwd_bwd",
            Kernel::HeadGemms => "head_gemms",
        }
    }
    /// The shape string of the row.
    fn shape(self) -> String {
        match self {
            Kernel::CopyLogits | Kernel::WeightedCe => format!("{K}x{B}x{C}"),
            Kernel::CopyCopies | Kernel::Copies | Kernel::Reduce => format!("{K}x{B}x{D}"),
            Kernel::HeadFwdBwd | Kernel::HeadGemms => format!("K{K}xB{B}xD{D}xC{C}"),
        }
    }
}

struct Bench<T: Element> {
    dev: Device,
    rng: Generator,
    ms: MultiSample,
    ce: WeightedCrossEntropy,
    z: CudaSlice<T>,
    dz: CudaSlice<T>,
    labels: CudaSlice<i64>,
    loss: CudaSlice<f32>,
    scratch: CudaSlice<u64>,
    h: CudaSlice<T>,
    copies: CudaSlice<T>,
    copies2: CudaSlice<T>,
    masks: CudaSlice<u32>,
    dh: CudaSlice<T>,
    head: Option<HeadBench<T>>,
    timer: Timer,
}

/// The head's configuration, workspace, weight, bias and gradients (`None` without cuBLAS).
struct HeadBench<T: Element> {
    head: MultiSampleHead,
    ws: HeadWorkspace<T>,
    w: CudaSlice<T>,
    bias: CudaSlice<T>,
    dh: CudaSlice<T>,
    dw: CudaSlice<T>,
    db: CudaSlice<T>,
}

impl<T: Element> HeadBench<T> {
    fn new(dev: &Device) -> Result<Self, Error> {
        let head = MultiSampleHead::new(K, P)?.with_label_smoothing(EPS)?;
        let ws = head.workspace::<T>(dev, B, D, C)?;
        // W ~ U(-1, 1) / sqrt(D): logits of a few units.
        let scale = 1.0 / (D as f32).sqrt();
        let w: Vec<T> = (0..C * D)
            .map(|i| T::from_f32((((i * 7919) % 2001) as f32 / 1000.0 - 1.0) * scale))
            .collect();
        Ok(HeadBench {
            head,
            ws,
            w: dev.upload(&w)?,
            bias: dev.zeros(C)?,
            dh: dev.zeros(B * D)?,
            dw: dev.zeros(C * D)?,
            db: dev.zeros(C)?,
        })
    }
}

impl<T: Element> Bench<T> {
    fn new(dev: &Device) -> Result<Self, Error> {
        let z: Vec<T> = (0..K * B * C)
            .map(|i| T::from_f32((i % 97) as f32 * 0.05 - 2.4))
            .collect();
        let h: Vec<T> = (0..B * D)
            .map(|i| T::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let labels: Vec<i64> = (0..B as i64).map(|i| (i * 37) % C as i64).collect();
        Ok(Bench {
            dev: dev.clone(),
            rng: Generator::new(0x5a3),
            ms: MultiSample::new(K, P)?,
            ce: WeightedCrossEntropy::uniform(K)?.with_label_smoothing(EPS)?,
            z: dev.upload(&z)?,
            dz: dev.zeros(K * B * C)?,
            labels: dev.upload(&labels)?,
            loss: dev.zeros(1)?,
            scratch: dev.zeros(WeightedCrossEntropy::scratch_len(K, B))?,
            h: dev.upload(&h)?,
            copies: dev.zeros(K * B * D)?,
            copies2: dev.zeros(K * B * D)?,
            masks: dev.zeros(masks_len(K, B * D))?,
            dh: dev.zeros(B * D)?,
            head: match HeadBench::new(dev) {
                Ok(h) => Some(h),
                Err(e) => {
                    println!("SKIPPED: multi_sample head benches ({}): {e}", T::DTYPE);
                    None
                }
            },
            timer: Timer::new(dev)?,
        })
    }

    fn bytes(&self, k: Kernel) -> u64 {
        let t = T::DTYPE.size() as u64;
        let logits = (K * B * C) as u64 * t;
        let copies = (K * B * D) as u64 * t;
        let masks = 4 * masks_len(K, B * D) as u64;
        match k {
            Kernel::CopyLogits => 2 * logits,
            Kernel::WeightedCe => 2 * logits + 8 * B as u64,
            Kernel::CopyCopies => 2 * copies,
            Kernel::Copies => (B * D) as u64 * t + copies + masks,
            Kernel::Reduce => copies + masks + (B * D) as u64 * t,
            // As the peer counts them: read h, W, b and write dh, dW, db.
            Kernel::HeadFwdBwd | Kernel::HeadGemms => 2 * (B * D + C * D + C) as u64 * t,
        }
    }

    /// The head rows: no copy baseline; GFLOP and TFLOP/s of the three GEMMs.
    fn head_row(&self, out: &mut Output, k: Kernel, ms: f64, gemm_ms: f64) {
        let tflops = HEAD_GFLOP / ms;
        let gemm_tflops = HEAD_GFLOP / gemm_ms;
        let row = self
            .row(k)
            .burst(ms)
            .note("gflop", format!("{HEAD_GFLOP:.3}"))
            .note("tflops", format!("{tflops:.1}"))
            .note("gemm_ms", format!("{gemm_ms:.5}"))
            .note("gemm_tflops", format!("{gemm_tflops:.1}"))
            .extra("gflop", json_num(HEAD_GFLOP, 3))
            .extra("tflops", json_num(tflops, 3))
            .extra("gemm_ms", json_num(gemm_ms, 7))
            .extra("gemm_tflops", json_num(gemm_tflops, 3));
        out.row(&row);
    }
}

impl<T: Element> Burst for Bench<T> {
    type Kernel = Kernel;

    fn timer(&self) -> &Timer {
        &self.timer
    }

    fn launch(&mut self, k: Kernel) -> Result<(), Error> {
        let s = self.dev.stream();
        let dtod = |e| Error::driver("cuMemcpyDtoDAsync", e);
        match k {
            Kernel::CopyLogits => s.memcpy_dtod(&self.z, &mut self.dz).map_err(dtod),
            Kernel::CopyCopies => s.memcpy_dtod(&self.copies, &mut self.copies2).map_err(dtod),
            Kernel::WeightedCe => self.ce.forward(
                s,
                &self.z,
                B,
                C,
                &self.labels,
                &mut self.loss,
                &mut self.dz,
                &mut self.scratch,
            ),
            Kernel::Copies => {
                let state = self.rng.next_streams(K as u64);
                self.ms
                    .copies_with_masks(s, state, &self.h, &mut self.copies, &mut self.masks)
            }
            // grads = the copies: the values do not change the speed.
            Kernel::Reduce => self.ms.reduce(s, &self.masks, &self.copies, &mut self.dh),
            Kernel::HeadFwdBwd => {
                let state = self.rng.next_streams(K as u64);
                let hb = self.head.as_mut().expect("head rows run only with cuBLAS");
                hb.head
                    .forward(&mut hb.ws, state, &self.h, &hb.w, Some(&hb.bias), &self.labels)?;
                hb.head.backward(
                    &mut hb.ws,
                    &self.h,
                    &hb.w,
                    &mut hb.dh,
                    &mut hb.dw,
                    Some(&mut hb.db),
                    1.0,
                )
            }
            Kernel::HeadGemms => {
                let hb = self.head.as_mut().expect("head rows run only with cuBLAS");
                hb.head.gemms_only(&mut hb.ws, &hb.w, &mut hb.dw)
            }
        }
    }

    fn row(&self, k: Kernel) -> Row {
        let n = match k {
            Kernel::CopyLogits | Kernel::WeightedCe => K * B * C,
            _ => K * B * D,
        };
        Row::new(k.name(), T::DTYPE.name(), n, self.bytes(k))
            .shape(k.shape())
            .param("k", K)
            .param("p", P)
            .param("label_smoothing", EPS)
    }
}

fn bench_dtype<T: Element>(c: &mut Criterion, dev: &Device, out: &mut Output) {
    let dtype = T::DTYPE.name();
    let mut b = Bench::<T>::new(dev).unwrap_or_else(|e| panic!("multi_sample {dtype}: setup: {e}"));
    // Copies before the reduction: it reads the masks the copies kernel wrote.
    let pairs = [
        (Kernel::CopyLogits, &[Kernel::WeightedCe][..]),
        (Kernel::CopyCopies, &[Kernel::Copies, Kernel::Reduce][..]),
    ];
    for (copy, kernels) in pairs {
        burst_rows(out, &mut b, dtype, copy, kernels);
    }
    if b.head.is_some() {
        // The GEMMs alone first (they read the copies and dz the full call then rewrites).
        b.launch(Kernel::HeadFwdBwd)
            .unwrap_or_else(|e| panic!("{dtype} head: {e}"));
        let gemm_ms = b
            .burst_ms(Kernel::HeadGemms)
            .unwrap_or_else(|e| panic!("{dtype} head GEMMs: {e}"));
        let ms = b
            .burst_ms(Kernel::HeadFwdBwd)
            .unwrap_or_else(|e| panic!("{dtype} head: {e}"));
        b.head_row(out, Kernel::HeadGemms, gemm_ms, gemm_ms);
        b.head_row(out, Kernel::HeadFwdBwd, ms, gemm_ms);
    }
    let mut kernels = vec![Kernel::WeightedCe, Kernel::Copies, Kernel::Reduce];
    if b.head.is_some() {
        kernels.push(Kernel::HeadFwdBwd);
    }
    common::group(c, format!("multi_sample/{dtype}"), &mut b, &kernels);
}

fn multi_sample_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("multi_sample") }) else {
        return;
    };
    println!(
        "multi_sample benches on {}: K = {K}, B = {B}, D = {D}, C = {C}, p = {P}, eps = {EPS}",
        out.meta.gpu
    );
    bench_dtype::<f16>(c, &dev, &mut out);
    bench_dtype::<bf16>(c, &dev, &mut out);
}

criterion_group!(benches, multi_sample_benches);
criterion_main!(benches);
