//! Token-routing benchmarks (criterion, `harness = false`), plus summary lines in the schema of
//! `benches/drop_block.rs` and `benches/peers/routing_torch.py` (same kernel names and `n`).
//!
//! bf16 residual stream `B x S x H` = 16 x 4096 x 4096, f32 scores and gates `B x S`, k = S / 2
//! per sequence (total T = B * S / 2 = 32768 compact rows), global keep fraction 0.5.
//!
//! | kernel                  | what runs                                      | bytes counted                          |
//! |-------------------------|------------------------------------------------|----------------------------------------|
//! | `copy`                  | device copy of x                               | read x + write y: `2 * 2 B S H`        |
//! | `routing_top_k_select`  | per-sequence top-k, k = S / 2                  | read scores + write indices: `4 B S + 4 T` |
//! | `routing_global_select` | global budget, q = 0.5                         | read scores + write indices: `4 B S + 4 T` |
//! | `routing_gather`        | compact = x[selected]                          | `2 * 2 T H`                            |
//! | `routing_scatter_add`   | x[selected] += g * compact                     | `3 * 2 T H + 4 T`                      |
//! | `routing_forward`       | top-k select + gather + gated scatter-add      | the sum of the three rows above        |
//!
//! (`routing_forward` is the "selection at k = L/2 + gather + gated scatter-add", with the
//! block between gather and scatter-add the identity: branch = compact.) Bytes are the minimal
//! traffic; the selection kernels read the scores several times (radix passes), which is not
//! counted. Each row: median over 20 event-timed windows of 10 back-to-back calls (after 5 warm-up
//! calls). `copy_fraction` is the row's bandwidth over the copy's in the same run.
//! Environment: `DROPFUSE_BENCH_JSON` (append rows as JSON lines), `DROPFUSE_COMMIT`.
//! Without a CUDA device this prints a SKIPPED line and registers nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::half::bf16;
use dropfuse::routing::{self, Capacity, TokenRouting, Valid};
use dropfuse::{Device, Error};

mod common;
use common::{burst_rows, Burst, Row, Timer};

const B: usize = 16;
const S: usize = 4096;
const H: usize = 4096;
const KEEP: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Copy,
    TopKSelect,
    GlobalSelect,
    Gather,
    ScatterAdd,
    Forward,
}

const KERNELS: [Kernel; 6] = [
    Kernel::Copy,
    Kernel::TopKSelect,
    Kernel::GlobalSelect,
    Kernel::Gather,
    Kernel::ScatterAdd,
    Kernel::Forward,
];

struct Bench {
    dev: Device,
    x: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    compact: CudaSlice<bf16>,
    scores: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    top_k: TokenRouting,
    global: TokenRouting,
    total: usize,
    timer: Timer,
}

impl Bench {
    fn new(dev: &Device) -> Result<Self, Error> {
        let s = dev.stream();
        let numel = B * S * H;
        // x: a repeating pattern (the values do not change the speed).
        let row: Vec<bf16> = (0..H)
            .map(|i| bf16::from_f32((i % 251) as f32 * 0.01 - 1.25))
            .collect();
        let rowd = dev.upload(&row)?;
        let mut x = dev.zeros::<bf16>(numel)?;
        for t in 0..B * S {
            s.memcpy_dtod(&rowd, &mut x.slice_mut(t * H..(t + 1) * H))
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e))?;
        }
        // Distinct-ish scores (a hash of the token index) and small gates.
        let scores: Vec<f32> = (0..B * S)
            .map(|i| ((i as u32).wrapping_mul(0x9E37_79B9) >> 8) as f32 / (1u32 << 24) as f32)
            .collect();
        let gate = vec![1.0f32 / 1024.0; B * S];
        let k = Capacity::Tokens(S / 2);
        let cap = routing::max_selected_top_k(B, S, k)?;
        let mut top_k = TokenRouting::new(s, B, S, cap)?;
        let global = TokenRouting::new(s, B, S, routing::max_selected_global(B, S, KEEP)?)?;
        let scores = dev.upload(&scores)?;
        top_k.top_k(s, &scores, Valid::All, k)?;
        let total = top_k.total(s)?;
        Ok(Bench {
            dev: dev.clone(),
            y: dev.zeros(numel)?,
            compact: dev.zeros(cap * H)?,
            gate: dev.upload(&gate)?,
            x,
            scores,
            top_k,
            global,
            total,
            timer: Timer::new(dev)?,
        })
    }

    fn name(k: Kernel) -> &'static str {
        match k {
            Kernel::Copy => "copy",
            Kernel::TopKSelect => "routing_top_k_select",
            Kernel::GlobalSelect => "routing_global_select",
            Kernel::Gather => "routing_gather",
            Kernel::ScatterAdd => "routing_scatter_add",
            Kernel::Forward => "routing_forward",
        }
    }

    fn bytes(&self, k: Kernel) -> u64 {
        let t = self.total as u64;
        let (bs, h) = ((B * S) as u64, H as u64);
        let select = 4 * bs + 4 * t;
        let gather = 2 * 2 * t * h;
        let scatter = 3 * 2 * t * h + 4 * t;
        match k {
            Kernel::Copy => 2 * 2 * bs * h,
            Kernel::TopKSelect | Kernel::GlobalSelect => select,
            Kernel::Gather => gather,
            Kernel::ScatterAdd => scatter,
            Kernel::Forward => select + gather + scatter,
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
        let cap = Capacity::Tokens(S / 2);
        match k {
            Kernel::Copy => s
                .memcpy_dtod(&self.x, &mut self.y)
                .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e)),
            Kernel::TopKSelect => self.top_k.top_k(s, &self.scores, Valid::All, cap),
            Kernel::GlobalSelect => self.global.global(s, &self.scores, Valid::All, KEEP),
            Kernel::Gather => routing::gather_tokens(s, &self.top_k, H, &self.x, &mut self.compact),
            Kernel::ScatterAdd => {
                routing::scatter_add_tokens(s, &self.top_k, H, &mut self.x, &self.compact, &self.gate)
            }
            Kernel::Forward => {
                self.top_k.top_k(s, &self.scores, Valid::All, cap)?;
                routing::gather_tokens(s, &self.top_k, H, &self.x, &mut self.compact)?;
                routing::scatter_add_tokens(s, &self.top_k, H, &mut self.x, &self.compact, &self.gate)
            }
        }
    }

    fn row(&self, k: Kernel) -> Row {
        Row::new(Self::name(k), "bf16", B * S * H, self.bytes(k))
            .shape(format!("{B}x{S}x{H}"))
            .param("k", S / 2)
            .param("keep_fraction", KEEP)
            .param("selected", self.total)
            .note("selected", self.total)
    }
}

fn routing_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("routing") }) else {
        return;
    };
    println!(
        "routing benches on {}: bf16 {B} x {S} x {H}, k = {}, keep fraction {KEEP}",
        out.meta.gpu,
        S / 2
    );
    let mut b = Bench::new(&dev).unwrap_or_else(|e| panic!("routing: setup: {e}"));
    burst_rows(&mut out, &mut b, "routing", Kernel::Copy, &KERNELS);
    common::group(c, "routing/bf16".to_string(), &mut b, &KERNELS);
}

criterion_group!(benches, routing_benches);
criterion_main!(benches);
