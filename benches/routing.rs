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

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaEvent, CudaSlice};
use dropfuse::half::bf16;
use dropfuse::routing::{self, Capacity, TokenRouting, Valid};
use dropfuse::{Device, Error};

mod common;
use common::{gbps, json_escape, json_num, Output};

const B: usize = 16;
const S: usize = 4096;
const H: usize = 4096;
const KEEP: f64 = 0.5;
const LAUNCHES: u64 = 10;
const REPEATS: usize = 20;
const WARMUP: u64 = 5;

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
    start: CudaEvent,
    end: CudaEvent,
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
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |e| Error::driver("cuEventCreate", e);
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
            start: dev.context().new_event(flags).map_err(ev)?,
            end: dev.context().new_event(flags).map_err(ev)?,
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
        let kernel = Self::name(k);
        let n = B * S * H;
        let shape = format!("{B}x{S}x{H}");
        let text = format!(
            "DROPFUSE_BENCH method=burst kernel={kernel} dtype=bf16 n={n} shape={shape} ms={ms:.5} bytes={bytes} \
             gbps={:.1} copy_ms={copy_ms:.5} copy_gbps={:.1} copy_fraction={frac:.3} selected={}",
            gbps(bytes, ms),
            gbps(copy_bytes, copy_ms),
            self.total,
        );
        let m = &out.meta;
        let json = format!(
            "{{\"impl\":\"{}\",\"kernel\":\"{kernel}\",\"dtype\":\"bf16\",\"n\":{n},\"shape\":\"{shape}\",\
             \"k\":{},\"keep_fraction\":{KEEP},\"selected\":{},\"method\":\"burst\",\"launches\":{LAUNCHES},\
             \"repeats\":{REPEATS},\"ms\":{},\"bytes\":{bytes},\"gbps\":{},\"copy_ms\":{},\"copy_gbps\":{},\
             \"copy_fraction\":{},\"gpu\":\"{}\",\"date\":\"{}\",\"commit\":\"{}\",\"side\":\"dropfuse\"}}",
            if k == Kernel::Copy { "copy" } else { "dropfuse" },
            S / 2,
            self.total,
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

fn routing_benches(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("SKIPPED: routing benches: no CUDA device ({e})");
            return;
        }
    };
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone (see dropout.rs).
    unsafe { dev.context().disable_event_tracking() };
    let gpu = dev.name().unwrap_or_else(|_| "unknown GPU".to_string());
    println!(
        "routing benches on {gpu}: bf16 {B} x {S} x {H}, k = {}, keep fraction {KEEP}",
        S / 2
    );
    let mut out = Output::new(gpu);
    let mut b = Bench::new(&dev).unwrap_or_else(|e| panic!("routing: setup: {e}"));
    let copy_ms = b
        .median_ms(Kernel::Copy)
        .unwrap_or_else(|e| panic!("routing copy: {e}"));
    for k in KERNELS {
        let ms = if k == Kernel::Copy {
            copy_ms
        } else {
            b.median_ms(k).unwrap_or_else(|e| panic!("routing {k:?}: {e}"))
        };
        b.row(&mut out, k, ms, copy_ms);
    }
    let mut group = c.benchmark_group("routing/bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000));
    for k in KERNELS {
        group.throughput(Throughput::Bytes(b.bytes(k)));
        group.bench_function(Bench::name(k), |bencher| {
            bencher.iter_custom(|iters| b.time(k, iters).unwrap_or_else(|e| panic!("routing {k:?}: {e}")))
        });
    }
    group.finish();
}

criterion_group!(benches, routing_benches);
criterion_main!(benches);
