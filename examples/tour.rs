//! A tour of dropfuse: every kernel on the GPU, checked against the CPU reference (bit for bit;
//! the weighted cross-entropy, the MC-dropout summaries, attention importance and the multi-sample
//! head within their documented bounds), with event-timed bandwidth next to a device-to-device
//! copy of the same bytes.
//!
//! ```text
//! cargo run --release --example tour
//! ```
//!
//! With a GPU: for f16, bf16 and f32 at n = 2^24 + 37 elements it runs mask generation, forward
//! (with and without a stored mask) and backward (from the mask and mask-free), compares every
//! mask bit and output element with `dropfuse::reference::dropout`, and prints a table
//! `kernel | dtype | n | match | ms | GB/s | of copy`. Then DropBlock (p = 0.1, global
//! normalisation, one mask per channel) on a 2D map `8 x 64 x 56 x 56` (block 7) and a 3D volume
//! `2 x 16 x 8 x 28 x 28` (block 5), for each dtype: `mask`, `forward`, `forward_inplace`,
//! `backward` and `backward_inplace`, each compared with `dropfuse::reference::drop_block` (mask
//! bits, the `N + 1` kept counters, every output element), in rows of the same table, with a copy
//! of the same x as baseline for each shape and dtype. Bytes moved: x + y (dy + dx) + mask bits,
//! like the dropout rows (the `N + 1` counters are left out).
//!
//! Then the later families (`FAMILIES`, one module each in `examples/tour/`), for each dtype
//! after a copy of the shape's main tensor (`copy`, the baseline of the rows that follow it), in
//! the issues' benchmark shapes scaled down where the CPU reference would be slow:
//! * token routing, `B x S x H = 8 x 2048 x 1024` (`routing.rs`): `routing_top_k_select` (half of
//!   each sequence's real tokens, padding by lengths, scores with many ties: offsets and indices),
//!   `routing_global_select` (half of the batch's real tokens, a padding mask: routing and
//!   threshold), `routing_gather`, `routing_scatter_add`, `routing_scatter_add_backward`
//!   (`d_branch` and `d_gate`) and `routing_gather_backward` through the top-k routing;
//! * stochastic depth and sample compaction, `B x R = 16 x 256 * 4096`, a bias of 4096, samples 3,
//!   7, 11, 15 dropped, p = 0.25 (`skip.rs`): `stochastic_depth_in_place`, `stochastic_depth` (out
//!   of place), `stochastic_depth_backward_bias` (`d_branch` and the reproducible `d_bias`),
//!   `sample_slots`, `sample_gather`, `sample_scatter`, `sample_scatter_backward`,
//!   `sample_scatter_add`, `sample_scatter_add_backward`, `sample_gather_backward`;
//! * multi-sample dropout, K = 8, B = 1024, D = 2048, C = 1000, p = 0.1 (`multi_sample.rs`):
//!   `multi_sample_copies` (copies and masks), `multi_sample_reduce` (stored masks) and
//!   `multi_sample_reduce_maskless` bit for bit against their `f32` formulas, then on the logits
//!   `multi_sample_mean` (bit for bit), `weighted_ce_fwd_bwd` and `weighted_ce_loss` (label
//!   smoothing 0.1, every ninth row ignored) within the bounds documented in
//!   `dropfuse::multi_sample` (a row counts one mismatch per bound exceeded, or a wrong valid-row
//!   count, or a loss-only call not equal to the full call's loss);
//! * structured dropout (`structured.rs`, bit for bit, decision masks included): channel dropout
//!   `16 x 256 x 56 x 56` (the issue's `64 x 256 x 56 x 56` scaled down) with every kernel,
//!   `channel_2d_mask`, `_forward`, `_forward_maskless`, `_forward_inplace`, `_backward`,
//!   `_backward_maskless`; then `_forward` and `_backward` of `locked` (`128 x 64 x 1024` locked
//!   on axis 0, decision offset 12345), `embedding_rows` (`50257 x 256`) and `channels_last`
//!   (`16 x 56 x 56 x 256`, axes 1 and 2 shared);
//! * Monte-Carlo dropout (`mc_dropout.rs`): `mc_replicas_forward` (replicas and masks) and
//!   `mc_replicas_forward_maskless`, R = 16 replicas of `256 x 4096`, bit for bit; then on a
//!   `16 x 1024 x 1000` stack of softmax probabilities (f32) `mc_summaries` (checked stack push +
//!   finish), `mc_summaries_unchecked` and `mc_summaries_single_pushes` (T pushes + finish), every
//!   summary within `reference::mc_dropout::f32_tolerance` (a row counts the values out of bounds,
//!   and a wrong accepted / rejected count);
//! * fused bias + dropout + residual (`bias_dropout_residual.rs`), `rows x H = 4096 x 4096` (the
//!   issue's `16 x 4096 x 4096` scaled down), a bias: `bdr_forward`, `bdr_forward_maskless`,
//!   `bdr_forward_inplace`, `bdr_backward` and `bdr_backward_maskless` (`dx` and `dbias`), bit for
//!   bit;
//! * attention importance (`importance.rs`), `4096 x 4096` hidden states into layer 1 of 3:
//!   `importance`, `importance_masked` (every fourth token padding) and `importance_similarities`
//!   (every token's similarity), the layer's count exact, its sum within
//!   `reference::importance::f32_sum_tolerance`, each similarity within `f32_token_tolerance`,
//!   padding NaN, the other layers untouched;
//! * the multi-sample head (`head.rs`, cuBLAS), K = 8, `B x D = 256 x 512`, C = 200 (the issue's
//!   1024 x 2048 x 1000 scaled down: the `f64` reference is `O(K B D C)`), p = 0.1, smoothing 0.1,
//!   every ninth row ignored, a bias: `multi_sample_head_forward` (copies and masks bit for bit,
//!   loss and averaged logits within the documented bounds, the valid-row count) and
//!   `multi_sample_head_backward` (`dh`, `dW`, `db` in f32 within the bounds). Both are GEMM-bound:
//!   their GB/s count the minimal bytes only. Without libcublas (`multi_sample::check_cublas`) the
//!   tour prints `SKIPPED: multi_sample_head_forward / _backward ...` instead of their rows;
//! * graph-safe randomness (`graph.rs`), n as for dropout: `dropout_forward_device_philox`
//!   (dropout forward reading a `DevicePhilox` at offset 2^64 - 2 through `at(5)`, so the stream
//!   wraps to 3, against the host-state call and the reference, bit for bit, and the device state
//!   unchanged) and `dropout_maskless_after_advance` (after `advance(3)`, the mask-free forward
//!   with the device offset itself against the reference, and the advanced state read back).
//!
//! Bytes moved are the minimal traffic, as in the benches. The exit code is 1 if anything
//! mismatches. A NaN matches any NaN (payloads are not part of the contracts).
//!
//! Without a GPU it says so and runs the CPU reference alone on 2^16 + 37 elements, printing the
//! reference's own consistency checks (keep rate, backward from the mask == mask-free backward, ...),
//! then the DropBlock reference's on `4 x 8 x 28 x 28` (block 7) and `2 x 4 x 8 x 16 x 16` (block 5):
//! seeds drawn from Philox, dropped units == units covered by a drawn seed's block, keep rate,
//! counts, scales, forward and backward arithmetic; then each family's on its small shapes,
//! through the contracts re-derived in `examples/checks/` (shared with the fuzz entry): selections
//! (counts, rank order with ties to the lower index, the threshold), row operations, the
//! stochastic-depth arithmetic and the chunked bias gradient, slots, compaction round trips,
//! masked copies, the reduction's and mean's formulas, the cross-entropy's formulas, finite
//! differences and zero row sums, structured decision indices (also from the safe API's collapsed
//! groups, and its rejection of layouts of more than 8 groups), decision masks, arithmetic and
//! shards, replicas on the streams `offset + t`, the summaries against two-pass formulas and
//! rejected pushes, the bias + dropout + residual steps and the chunked bias gradient, the cosine
//! similarity and an `f32` model of the kernel within its bound, the head's logits, gradients
//! and finite differences. The graph-safe row has no CPU part (the device state lives on the GPU).
//!
//! `cargo test --example tour` runs the same entry point: on a GPU at 2^16 + 37 elements and the
//! small DropBlock and family shapes (to keep the debug-build reference fast), without one the CPU
//! reference exactly as above.
//!
//! A new family is one module in `examples/tour/` exporting a `Family` (its header lines, GPU
//! rows and CPU checks) and one entry in `FAMILIES`.

use std::process::ExitCode;

use dropfuse::cudarc::driver::sys::CUevent_flags;
use dropfuse::cudarc::driver::{CudaSlice, DevicePtr};
use dropfuse::drop_block::{stats_len, DropBlock};
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::drop_block as block_ref;
use dropfuse::reference::dropout as reference;
use dropfuse::reference::philox::element_word;
use dropfuse::{Device, Dropout, Element, Error, Generator, PhiloxState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// The reference self-checks shared with the fuzz entry (each example uses part of them).
#[allow(dead_code)]
#[path = "checks/mod.rs"]
mod checks;
// The families after dropout and DropBlock, one module each (`examples/tour/*.rs`), listed in
// [`FAMILIES`].
#[path = "tour/bias_dropout_residual.rs"]
mod bias_dropout_residual;
#[path = "tour/graph.rs"]
mod graph;
#[path = "tour/head.rs"]
mod head;
#[path = "tour/importance.rs"]
mod importance;
#[path = "tour/mc_dropout.rs"]
mod mc_dropout;
#[path = "tour/multi_sample.rs"]
mod multi_sample;
#[path = "tour/routing.rs"]
mod routing;
#[path = "tour/skip.rs"]
mod skip;
#[path = "tour/structured.rs"]
mod structured;

use checks::Checks;

/// Drop probability of the tour.
const P: f64 = 0.1;
/// GPU size: not a multiple of 32, so the last mask word is partial.
const GPU_N: usize = (1 << 24) + 37;
/// CPU-only size.
const CPU_N: usize = (1 << 16) + 37;
/// Timed launches per kernel (after one warm-up launch); the mean is reported.
const TIMED_LAUNCHES: u32 = 10;

/// A DropBlock shape of the tour.
#[derive(Debug, Clone, Copy)]
struct BlockShape {
    /// Prefix of the kernel names in the table: `drop_block_2d` or `drop_block_3d`.
    name: &'static str,
    /// `[N, C, H, W]` or `[N, C, D, H, W]`.
    shape: &'static [usize],
    block: usize,
}

impl BlockShape {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// DropBlock on the GPU: an ImageNet-like 2D map with the paper's block 7 and a 3D volume, small
/// enough (1.6 M and 0.2 M elements) for the CPU reference to check them in well under a second.
const GPU_BLOCKS: [BlockShape; 2] = [
    BlockShape {
        name: "drop_block_2d",
        shape: &[8, 64, 56, 56],
        block: 7,
    },
    BlockShape {
        name: "drop_block_3d",
        shape: &[2, 16, 8, 28, 28],
        block: 5,
    },
];

/// DropBlock on the CPU alone, and on the GPU under `cargo test` (debug-build reference).
const SMALL_BLOCKS: [BlockShape; 2] = [
    BlockShape {
        name: "drop_block_2d",
        shape: &[4, 8, 28, 28],
        block: 7,
    },
    BlockShape {
        name: "drop_block_3d",
        shape: &[2, 4, 8, 16, 16],
        block: 5,
    },
];

/// Which shapes the families of [`FAMILIES`] use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// The GPU tour's shapes (the issues' benchmark shapes, scaled down where the CPU reference
    /// would be slow).
    Full,
    /// Small shapes: the CPU reference alone, and the GPU under `cargo test` (debug build).
    Small,
}

/// A kernel family of the tour after dropout and DropBlock: one module, one entry of
/// [`FAMILIES`].
struct Family {
    /// The shapes and parameters, one header line each.
    describe: fn(Scale) -> Vec<String>,
    /// Runs every kernel of the family on the GPU, checks it against the CPU reference and times
    /// it: for each shape and dtype a copy baseline and one row per kernel.
    gpu: fn(&Device, Scale, &mut Generator, &mut Vec<Row>) -> BoxResult<()>,
    /// The CPU reference's self-checks (on the small shapes), printed; `false` if one failed.
    cpu: fn(Scale, &mut Generator) -> BoxResult<bool>,
}

/// The families after dropout and DropBlock, in the order of the table.
const FAMILIES: [Family; 9] = [
    routing::FAMILY,
    skip::FAMILY,
    multi_sample::FAMILY,
    structured::FAMILY,
    mc_dropout::FAMILY,
    bias_dropout_residual::FAMILY,
    importance::FAMILY,
    head::FAMILY,
    graph::FAMILY,
];

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    // The host-emulation build (DROPFUSE_HOST_EMULATION) runs the kernels on the CPU: the small
    // shapes of the example test, and its timings mean nothing.
    let result = if dropfuse::HOST_EMULATION {
        println!("Host-emulation build: small shapes; the timings below mean nothing.");
        tour((1 << 16) + 37, CPU_N, &SMALL_BLOCKS, Scale::Small)
    } else {
        tour(GPU_N, CPU_N, &GPU_BLOCKS, Scale::Full)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The tour: every dropout kernel on GPU 0 at `gpu_n` elements, DropBlock on `gpu_blocks` and
/// the [`FAMILIES`] on their `scale` shapes, or without a GPU the CPU reference at `cpu_n` (at
/// least 6000), on [`SMALL_BLOCKS`] and on the families' small shapes. `Ok(false)` if anything
/// mismatches or a check fails.
fn tour(gpu_n: usize, cpu_n: usize, gpu_blocks: &[BlockShape], scale: Scale) -> BoxResult<bool> {
    match Device::new(0) {
        Ok(dev) => gpu_tour(&dev, gpu_n, gpu_blocks, scale),
        Err(e) => {
            println!("No CUDA device found ({e}): running the CPU reference only.");
            cpu_tour(cpu_n, &SMALL_BLOCKS)
        }
    }
}

/// Deterministic inputs spanning many magnitudes (including f16 subnormals and f16 overflow to
/// infinity), both signs; never NaN.
fn random_input<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mantissa: f32 = rng.random_range(1.0..2.0);
            let exponent: i32 = rng.random_range(-30..=15);
            let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
            T::from_f32(sign * mantissa * 2f32.powi(exponent))
        })
        .collect()
}

/// Number of elements whose bits differ; a NaN matches any NaN (NaN payloads are not part of the
/// contract: infinities of opposite signs in the inputs of the later families can meet).
fn element_mismatches<T: Element>(got: &[T], want: &[T]) -> usize {
    if got.len() != want.len() {
        return got.len().max(want.len());
    }
    got.iter()
        .zip(want)
        .filter(|(a, b)| !checks::same_element(**a, **b))
        .count()
}

/// Number of mask bits that differ (including the unused high bits of the last word).
fn mask_mismatches(got: &[u32], want: &[u32]) -> usize {
    if got.len() != want.len() {
        return 32 * got.len().max(want.len());
    }
    got.iter()
        .zip(want)
        .map(|(a, b)| (a ^ b).count_ones() as usize)
        .sum()
}

/// Number of words that differ (DropBlock's kept counters, routing offsets and indices, slots).
fn counter_mismatches<W: PartialEq>(got: &[W], want: &[W]) -> usize {
    if got.len() != want.len() {
        return got.len().max(want.len());
    }
    got.iter().zip(want).filter(|(a, b)| a != b).count()
}

/// DropBlock's `stats` as the kernels write them: the per-sample kept counts, then their sum.
fn stats_of(counts: &[u64]) -> Vec<u64> {
    let mut stats = counts.to_vec();
    stats.push(counts.iter().sum());
    stats
}

fn match_text(mismatches: usize) -> String {
    if mismatches == 0 {
        "yes".to_string()
    } else {
        format!("{mismatches} mismatches")
    }
}

// ---------------------------------------------------------------- GPU ----

/// One row of the GPU table.
struct Row {
    kernel: String,
    dtype: &'static str,
    n: usize,
    mismatches: usize,
    ms: f64,
    bytes: u64,
    copy_ms: f64,
    copy_bytes: u64,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.ms / 1e6
    }
    fn copy_fraction(&self) -> f64 {
        self.gbps() / (self.copy_bytes as f64 / self.copy_ms / 1e6)
    }
}

/// Mean milliseconds per launch of `launch`, timed with CUDA events around `TIMED_LAUNCHES`
/// back-to-back launches after one warm-up launch.
fn time_ms(dev: &Device, mut launch: impl FnMut() -> dropfuse::Result<()>) -> BoxResult<f64> {
    launch()?;
    let stream = dev.stream();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT); // `None` disables timing
    let start = stream.record_event(flags)?;
    for _ in 0..TIMED_LAUNCHES {
        launch()?;
    }
    let end = stream.record_event(flags)?;
    let ms = start.elapsed_ms(&end)?; // waits for both events
    dev.synchronize()?; // reports asynchronous launch errors, if any
    Ok(f64::from(ms) / f64::from(TIMED_LAUNCHES))
}

fn download<T: Element, S: DevicePtr<T>>(dev: &Device, s: &S) -> dropfuse::Result<Vec<T>> {
    dev.download(s)
}

/// Mean milliseconds of a device-to-device copy of `x`: the baseline of a shape and dtype.
fn time_copy<T: Element>(dev: &Device, x: &CudaSlice<T>) -> BoxResult<f64> {
    let mut dst: CudaSlice<T> = dev.zeros(x.len())?;
    time_ms(dev, || {
        dev.stream()
            .memcpy_dtod(x, &mut dst)
            .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e))
    })
}

/// The rows of one shape and dtype: the copy baseline (`copy_ms` for `copy_bytes`) as a `copy`
/// row, then one row per `(kernel, mismatches, ms, bytes)`.
fn push_rows<K: Into<String>>(
    rows: &mut Vec<Row>,
    dtype: &'static str,
    n: usize,
    (copy_ms, copy_bytes): (f64, u64),
    kernels: impl IntoIterator<Item = (K, usize, f64, u64)>,
) {
    let copy = std::iter::once(("copy".to_string(), 0, copy_ms, copy_bytes));
    let kernels = kernels
        .into_iter()
        .map(|(k, bad, ms, bytes)| (k.into(), bad, ms, bytes));
    for (kernel, mismatches, ms, bytes) in copy.chain(kernels) {
        rows.push(Row {
            kernel,
            dtype,
            n,
            mismatches,
            ms,
            bytes,
            copy_ms,
            copy_bytes,
        });
    }
}

/// Runs and checks every kernel for dtype `T`; appends one row per kernel.
fn gpu_dtype<T: Element>(
    dev: &Device,
    n: usize,
    rng: &mut Generator,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let size = T::DTYPE.size() as u64;
    let dtype = T::DTYPE.name();
    let stream = dev.stream();
    let drop = Dropout::new(P)?;
    let state: PhiloxState = rng.next();

    let x_host: Vec<T> = random_input(n, seed);
    let dy_host: Vec<T> = random_input(n, seed ^ 0xd1);
    let x = dev.upload(&x_host)?;
    let dy = dev.upload(&dy_host)?;
    let mut y = dev.zeros::<T>(n)?;
    let mut dx = dev.zeros::<T>(n)?;
    let mut mask = dev.zeros::<u32>(mask_words(n))?;
    let mut mask2 = dev.zeros::<u32>(mask_words(n))?;

    // The oracle (plain CPU code).
    let ref_mask = reference::mask(P, state, 0, n)?;
    let (ref_y, ref_fwd_mask) = reference::forward(&x_host, P, state, 0)?;
    let ref_dx_from_mask = reference::backward_from_mask(&dy_host, &ref_mask, P)?;
    let ref_dx = reference::backward(&dy_host, P, state, 0)?;

    // Correctness: run each kernel once, download, compare.
    drop.mask(stream, state, n, &mut mask2)?;
    let mask_bad = mask_mismatches(&dev.download(&mask2)?, &ref_mask);

    drop.forward(stream, state, &x, &mut y, &mut mask)?;
    let fwd_bad = element_mismatches(&download(dev, &y)?, &ref_y)
        + mask_mismatches(&dev.download(&mask)?, &ref_fwd_mask);

    let mut y2 = dev.zeros::<T>(n)?;
    drop.forward_maskless(stream, state, &x, &mut y2)?;
    let fwd_ml_bad = element_mismatches(&download(dev, &y2)?, &ref_y);
    std::mem::drop(y2);

    // `mask` now holds the forward's mask (checked above).
    drop.backward(stream, &mask, &dy, &mut dx)?;
    let bwd_bad = element_mismatches(&download(dev, &dx)?, &ref_dx_from_mask);

    let mut dx2 = dev.zeros::<T>(n)?;
    drop.backward_maskless(stream, state, &dy, &mut dx2)?;
    let bwd_ml_bad = element_mismatches(&download(dev, &dx2)?, &ref_dx);
    std::mem::drop(dx2);

    // Timing, with a device-to-device copy of the input (read n + write n elements) as baseline.
    let data = 2 * n as u64 * size;
    let mask_bytes = mask_words(n) as u64 * 4;
    let copy_ms = time_copy(dev, &x)?;
    let mask_ms = time_ms(dev, || drop.mask(stream, state, n, &mut mask2))?;
    let fwd_ms = time_ms(dev, || drop.forward(stream, state, &x, &mut y, &mut mask))?;
    let fwd_ml_ms = time_ms(dev, || drop.forward_maskless(stream, state, &x, &mut y))?;
    let bwd_ms = time_ms(dev, || drop.backward(stream, &mask, &dy, &mut dx))?;
    let bwd_ml_ms = time_ms(dev, || drop.backward_maskless(stream, state, &dy, &mut dx))?;

    let table = [
        ("mask", mask_bad, mask_ms, mask_bytes),
        ("forward_mask", fwd_bad, fwd_ms, data + mask_bytes),
        ("forward_maskless", fwd_ml_bad, fwd_ml_ms, data),
        ("backward_mask", bwd_bad, bwd_ms, data + mask_bytes),
        ("backward_maskless", bwd_ml_bad, bwd_ml_ms, data),
    ];
    push_rows(rows, dtype, n, (copy_ms, data), table);
    Ok(())
}

/// Runs and checks DropBlock (`mask`, `forward`, `forward_inplace`, `backward`,
/// `backward_inplace`) on `bs` for dtype `T`; appends a copy baseline of the same `x` and one row
/// per kernel.
fn gpu_drop_block<T: Element>(
    dev: &Device,
    bs: &BlockShape,
    rng: &mut Generator,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let (shape, n) = (bs.shape, bs.numel());
    let size = T::DTYPE.size() as u64;
    let dtype = T::DTYPE.name();
    let stream = dev.stream();
    let cfg = DropBlock::new(P, bs.block)?;
    let state: PhiloxState = rng.next();

    let x_host: Vec<T> = random_input(n, seed);
    let dy_host: Vec<T> = random_input(n, seed ^ 0xd1);

    // The oracle (plain CPU code): y, mask, counts and scales; dx from that mask and those scales.
    let want = block_ref::forward(&cfg, shape, &x_host, state)?;
    let want_dx = block_ref::backward(shape, &dy_host, &want.mask, &want.scales)?;
    let want_stats = stats_of(&want.counts);

    let x = dev.upload(&x_host)?;
    let dy = dev.upload(&dy_host)?;
    let mut y = dev.zeros::<T>(n)?;
    let mut dx = dev.zeros::<T>(n)?;
    let mut mask = dev.zeros::<u32>(mask_words(n))?;
    let mut mask2 = dev.zeros::<u32>(mask_words(n))?;
    let mut stats = dev.zeros::<u64>(stats_len(shape)?)?;
    let mut stats2 = dev.zeros::<u64>(stats_len(shape)?)?;

    // Correctness: run each kernel once, download, compare.
    cfg.mask(stream, state, shape, &mut mask2, &mut stats2)?;
    let mask_bad = mask_mismatches(&dev.download(&mask2)?, &want.mask)
        + counter_mismatches(&dev.download(&stats2)?, &want_stats);

    cfg.forward(stream, state, shape, &x, &mut y, &mut mask, &mut stats)?;
    let fwd_bad = element_mismatches(&download(dev, &y)?, &want.y)
        + mask_mismatches(&dev.download(&mask)?, &want.mask)
        + counter_mismatches(&dev.download(&stats)?, &want_stats);

    let mut xi = dev.upload(&x_host)?;
    cfg.forward_inplace(stream, state, shape, &mut xi, &mut mask2, &mut stats2)?;
    let fwd_ip_bad = element_mismatches(&download(dev, &xi)?, &want.y)
        + mask_mismatches(&dev.download(&mask2)?, &want.mask)
        + counter_mismatches(&dev.download(&stats2)?, &want_stats);

    // `mask` and `stats` now hold the forward's (checked above).
    cfg.backward(stream, shape, &mask, &stats, &dy, &mut dx)?;
    let bwd_bad = element_mismatches(&download(dev, &dx)?, &want_dx);

    let mut gi = dev.upload(&dy_host)?;
    cfg.backward_inplace(stream, shape, &mask, &stats, &mut gi)?;
    let bwd_ip_bad = element_mismatches(&download(dev, &gi)?, &want_dx);

    // Timing, with a device-to-device copy of x (read n + write n elements) as baseline.
    let data = 2 * n as u64 * size;
    let mask_bytes = mask_words(n) as u64 * 4;
    let copy_ms = time_copy(dev, &x)?;
    let mask_ms = time_ms(dev, || cfg.mask(stream, state, shape, &mut mask2, &mut stats2))?;
    let fwd_ms = time_ms(dev, || {
        cfg.forward(stream, state, shape, &x, &mut y, &mut mask, &mut stats)
    })?;
    let fwd_ip_ms = time_ms(dev, || {
        cfg.forward_inplace(stream, state, shape, &mut xi, &mut mask2, &mut stats2)
    })?;
    let bwd_ms = time_ms(dev, || cfg.backward(stream, shape, &mask, &stats, &dy, &mut dx))?;
    let bwd_ip_ms = time_ms(dev, || {
        cfg.backward_inplace(stream, shape, &mask, &stats, &mut gi)
    })?;

    let table = [
        ("mask", mask_bad, mask_ms, mask_bytes),
        ("forward", fwd_bad, fwd_ms, data + mask_bytes),
        ("forward_inplace", fwd_ip_bad, fwd_ip_ms, data + mask_bytes),
        ("backward", bwd_bad, bwd_ms, data + mask_bytes),
        ("backward_inplace", bwd_ip_bad, bwd_ip_ms, data + mask_bytes),
    ];
    let table = table.map(|(kernel, bad, ms, bytes)| (format!("{}_{kernel}", bs.name), bad, ms, bytes));
    push_rows(rows, dtype, n, (copy_ms, data), table);
    Ok(())
}

fn gpu_tour(dev: &Device, n: usize, blocks: &[BlockShape], scale: Scale) -> BoxResult<bool> {
    let name = dev.name()?;
    let (major, minor) = dev.compute_capability()?;
    println!(
        "GPU 0: {name} (sm_{major}{minor}, {} SMs); dropout p = {P}, n = {n}",
        dev.sm_count()?
    );
    for bs in blocks {
        println!(
            "{}: DropBlock p = {P}, block {}, shape {:?} (n = {})",
            bs.name,
            bs.block,
            bs.shape,
            bs.numel()
        );
    }
    for family in &FAMILIES {
        for line in (family.describe)(scale) {
            println!("{line}");
        }
    }
    println!("checking every mask bit, counter and output element against the CPU reference...\n");

    let mut rng = Generator::new(2024);
    let mut rows = Vec::new();
    gpu_dtype::<f16>(dev, n, &mut rng, 1, &mut rows)?;
    gpu_dtype::<bf16>(dev, n, &mut rng, 2, &mut rows)?;
    gpu_dtype::<f32>(dev, n, &mut rng, 3, &mut rows)?;
    for bs in blocks {
        gpu_drop_block::<f16>(dev, bs, &mut rng, 4, &mut rows)?;
        gpu_drop_block::<bf16>(dev, bs, &mut rng, 5, &mut rows)?;
        gpu_drop_block::<f32>(dev, bs, &mut rng, 6, &mut rows)?;
    }
    for family in &FAMILIES {
        (family.gpu)(dev, scale, &mut rng, &mut rows)?;
    }

    println!(
        "{:<30} {:<5} {:>9} {:<16} {:>9} {:>9} {:>8}",
        "kernel", "dtype", "n", "match", "ms", "GB/s", "of copy"
    );
    println!("{}", "-".repeat(92));
    for r in &rows {
        let matched = if r.kernel == "copy" {
            "(baseline)".to_string()
        } else {
            match_text(r.mismatches)
        };
        println!(
            "{:<30} {:<5} {:>9} {:<16} {:>9.4} {:>9.1} {:>7.1}%",
            r.kernel,
            r.dtype,
            r.n,
            matched,
            r.ms,
            r.gbps(),
            100.0 * r.copy_fraction()
        );
    }
    let bad: usize = rows.iter().map(|r| r.mismatches).sum();
    println!();
    if bad == 0 {
        println!(
            "all kernels match the CPU reference bit for bit (the weighted cross-entropy, MC summaries, \
             importance and the head within their documented bounds)"
        );
        Ok(true)
    } else {
        println!("MISMATCH: {bad} elements/bits/counters differ from the CPU reference (or bounds exceeded)");
        Ok(false)
    }
}

// ---------------------------------------------------------------- CPU ----

/// Prints one row per check (`dtype n check ok|FAILED`, a failed check's details below it);
/// `false` if one failed.
fn print_checks(dtype: &str, n: usize, checks: &Checks) -> bool {
    for (check, failure) in checks.rows() {
        let result = if failure.is_none() { "ok" } else { "FAILED" };
        println!("{dtype:<5} {n:>7}  {check:<62} {result}");
        if let Some(f) = failure.as_ref().filter(|f| !f.is_empty()) {
            println!("               {f}");
        }
    }
    checks.ok()
}

/// The table header of the CPU checks.
fn print_check_header() {
    println!("{:<5} {:>7}  {:<62} result", "dtype", "n", "check");
    println!("{}", "-".repeat(84));
}

/// The reference's own consistency checks for dtype `T`; prints one row each.
fn cpu_dtype<T: Element>(n: usize, seed: u64, state: PhiloxState) -> BoxResult<bool> {
    let dtype = T::DTYPE.name();
    let x: Vec<T> = random_input(n, seed);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let scale = reference::keep_scale(P)?;

    let mask = reference::mask(P, state, 0, n)?;
    let (y, fwd_mask) = reference::forward(&x, P, state, 0)?;
    let dx_from_mask = reference::backward_from_mask(&dy, &fwd_mask, P)?;
    let dx = reference::backward(&dy, P, state, 0)?;

    let mut checks = Checks::new();

    // Keep rate within 5 standard deviations of 1 - p.
    let kept: usize = mask.iter().map(|w| w.count_ones() as usize).sum();
    let rate = kept as f64 / n as f64;
    let sigma = (P * (1.0 - P) / n as f64).sqrt();
    checks.check(
        format!("keep rate {rate:.4} vs 1 - p = {:.4} (+-5 sigma)", 1.0 - P),
        (rate - (1.0 - P)).abs() <= 5.0 * sigma,
    );

    // Mask shape: ceil(n / 32) words, unused high bits of the last word zero.
    let used = n % 32;
    let tail_ok = used == 0 || mask[mask.len() - 1] >> used == 0;
    checks.check(
        format!("mask has ceil(n/32) = {} words, unused bits 0", mask_words(n)),
        mask.len() == mask_words(n) && tail_ok,
    );

    checks.check(
        "forward's mask == mask()".to_string(),
        mask_mismatches(&fwd_mask, &mask) == 0,
    );

    // y: kept elements are x * scale rounded once, dropped ones +0.
    let y_bad = (0..n)
        .filter(|&i| {
            let want = if reference::mask_bit(&mask, i) {
                T::from_f32(x[i].to_f32() * scale)
            } else {
                T::from_f32(0.0)
            };
            y[i].to_bits_u32() != want.to_bits_u32()
        })
        .count();
    checks.check("forward y == kept ? x * scale : +0".to_string(), y_bad == 0);

    checks.check(
        "backward_from_mask == backward (mask-free)".to_string(),
        element_mismatches(&dx_from_mask, &dx) == 0,
    );

    // Shards: the mask of [a, a + m) with element_offset = a equals bits a..a+m of the whole mask.
    let (a, m) = (1000, 5000);
    let shard = reference::mask(P, state, a as u64, m)?;
    let shard_ok = (0..m).all(|i| reference::mask_bit(&shard, i) == reference::mask_bit(&mask, a + i));
    checks.check(
        format!("shard mask [{a}, {}) == slice of the whole mask", a + m),
        shard_ok,
    );

    // A different Philox stream gives a different mask.
    let other = reference::mask(P, PhiloxState::new(state.seed, state.offset + 1), 0, n)?;
    checks.check("next offset gives a different mask".to_string(), other != mask);

    Ok(print_checks(dtype, n, &checks))
}

/// The tour's own view of a DropBlock shape, written from the contract in `dropfuse::drop_block`
/// (not from the reference): a 2D map `[H, W]` is the 3D map `[1, H, W]`, one mask plane per
/// `(sample, channel)`.
struct Grid {
    n: usize,
    c: usize,
    /// Spatial extents `[D, H, W]`.
    dims: [usize; 3],
    /// Block extents `min(block_size, S_a)`.
    b: [usize; 3],
    /// Valid (seed) extents `S_a - b_a + 1`.
    v: [usize; 3],
    spatial: usize,
    valid: usize,
}

impl Grid {
    fn new(shape: &[usize], block: usize) -> Grid {
        let dims = match *shape {
            [_, _, h, w] => [1, h, w],
            [_, _, d, h, w] => [d, h, w],
            _ => panic!("not a DropBlock shape: {shape:?}"),
        };
        let b = dims.map(|d| block.min(d));
        let v = [0, 1, 2].map(|a| dims[a] - b[a] + 1);
        Grid {
            n: shape[0],
            c: shape[1],
            dims,
            b,
            v,
            spatial: dims.iter().product(),
            valid: v.iter().product(),
        }
    }

    fn numel(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// `round(min(gamma, 1) * 2^32)`, `gamma = p * spatial / (block volume * valid volume)`.
    fn threshold(&self, p: f64) -> u64 {
        let vol: usize = self.b.iter().product();
        let gamma_scale = 1.0; // the tour uses DropBlock::new's default
        let gamma = gamma_scale * p * self.spatial as f64 / (vol as f64 * self.valid as f64);
        (gamma.min(1.0) * 4_294_967_296.0).round() as u64
    }

    /// Spatial position `[d, h, w]` of element `e`, and its plane.
    fn unit(&self, e: usize) -> ([usize; 3], usize) {
        let s = e % self.spatial;
        let (h, w) = (self.dims[1], self.dims[2]);
        ([s / (h * w), s / w % h, s % w], e / self.spatial)
    }

    /// Per axis, the inclusive range of seed positions whose block covers unit coordinate `s`.
    fn seed_range(&self, a: usize, s: usize) -> (usize, usize) {
        ((s + 1).saturating_sub(self.b[a]), s.min(self.v[a] - 1))
    }

    /// Whether a drawn seed of its plane covers element `e` (brute force over the window).
    fn covered(&self, seeds: &[bool], e: usize) -> bool {
        let (s, q) = self.unit(e);
        let r = [0, 1, 2].map(|a| self.seed_range(a, s[a]));
        (r[0].0..=r[0].1).any(|i| {
            (r[1].0..=r[1].1).any(|j| {
                (r[2].0..=r[2].1).any(|k| seeds[q * self.valid + (i * self.v[1] + j) * self.v[2] + k])
            })
        })
    }

    /// The expected number of kept elements when each seed is drawn with probability
    /// `q = threshold / 2^32`, and a deviation from it exceeded with probability below 1e-12:
    /// Freedman's inequality for the Doob martingale over the independent seeds, each of which
    /// changes at most a block volume `c` of kept elements (conditional variance at most
    /// `q (1 - q) c^2`), so `P(|kept - E kept| >= t) <= 2 exp(-t^2 / (2 (V + c t / 3)))`.
    fn expected_kept(&self, threshold: u64) -> (f64, f64) {
        let q = (threshold as f64 / 4_294_967_296.0).min(1.0);
        let mut mean = 0.0;
        for e in 0..self.spatial {
            let (s, _) = self.unit(e);
            let cover: usize = (0..3)
                .map(|a| {
                    let (lo, hi) = self.seed_range(a, s[a]);
                    hi - lo + 1
                })
                .product();
            mean += (1.0 - q).powi(cover as i32);
        }
        let planes = (self.n * self.c) as f64;
        let vol: usize = self.b.iter().product();
        let c = vol as f64;
        let v = planes * self.valid as f64 * q * (1.0 - q) * c * c;
        let l = (2.0 / 1e-12f64).ln();
        let bound = c * l / 3.0 + ((c * l / 3.0).powi(2) + 2.0 * l * v).sqrt();
        (planes * mean, bound)
    }
}

/// The DropBlock reference's consistency checks on `bs` for dtype `T`; prints one row each.
fn cpu_drop_block<T: Element>(bs: &BlockShape, seed: u64, state: PhiloxState) -> BoxResult<bool> {
    let (shape, n) = (bs.shape, bs.numel());
    let dtype = T::DTYPE.name();
    let cfg = DropBlock::new(P, bs.block)?;
    let g = Grid::new(shape, bs.block);
    let x: Vec<T> = random_input(n, seed);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);

    let seeds = block_ref::seeds(&cfg, shape, state)?;
    let mask = block_ref::mask(&cfg, shape, state)?;
    let fwd = block_ref::forward(&cfg, shape, &x, state)?;
    let dx = block_ref::backward(shape, &dy, &fwd.mask, &fwd.scales)?;

    let mut checks = Checks::new();

    // Seeds: seed i is drawn iff the Philox word of element i is below the threshold.
    let threshold = g.threshold(P);
    let drawn = seeds.iter().filter(|&&s| s).count();
    let seeds_ok = block_ref::seed_threshold(&cfg, &shape[2..]) == threshold
        && seeds.len() == g.n * g.c * g.valid
        && seeds
            .iter()
            .enumerate()
            .all(|(i, &s)| s == (u64::from(element_word(state, i as u64)) < threshold));
    checks.check(
        format!("{drawn} seeds: drawn iff Philox word < {threshold}"),
        seeds_ok,
    );

    // Blocks: an element is dropped iff a drawn seed of its plane covers it.
    let cover_ok = g.numel() == n && (0..n).all(|e| reference::mask_bit(&mask, e) != g.covered(&seeds, e));
    checks.check("dropped == covered by a drawn seed's block".to_string(), cover_ok);

    // Keep rate within a 1e-12 tail bound of its expectation.
    let kept: u64 = fwd.counts.iter().sum();
    let (mean, bound) = g.expected_kept(threshold);
    checks.check(
        format!(
            "keep rate {:.4} vs expected {:.4} +- {:.4}",
            kept as f64 / n as f64,
            mean / n as f64,
            bound / n as f64
        ),
        (kept as f64 - mean).abs() <= bound + 1.0,
    );

    // Mask shape: ceil(numel / 32) words, unused high bits of the last word zero.
    let used = n % 32;
    let tail_ok = used == 0 || mask[mask.len() - 1] >> used == 0;
    checks.check(
        format!("mask has ceil(n/32) = {} words, unused bits 0", mask_words(n)),
        mask.len() == mask_words(n) && tail_ok,
    );
    checks.check(
        "forward's mask == mask()".to_string(),
        mask_mismatches(&fwd.mask, &mask) == 0,
    );

    // Counts: kept mask bits of each sample; scales: numel / kept (global normalisation).
    let per_sample = n / g.n;
    let counts_ok = fwd.counts.len() == g.n
        && (0..g.n).all(|s| {
            let k = (s * per_sample..(s + 1) * per_sample)
                .filter(|&e| reference::mask_bit(&mask, e))
                .count();
            fwd.counts[s] == k as u64
        });
    let scale = if kept == 0 {
        0.0
    } else {
        (n as f64 / kept as f64) as f32
    };
    let scales_ok = fwd.scales.len() == g.n && fwd.scales.iter().all(|s| s.to_bits() == scale.to_bits());
    checks.check(
        format!("counts per sample, scale numel/kept = {scale:.5}"),
        counts_ok && scales_ok,
    );

    // y and dx: kept elements are v * scale rounded once, dropped ones +0.
    let apply = |v: &[T], out: &[T]| {
        (0..n)
            .filter(|&i| {
                let want = if reference::mask_bit(&mask, i) {
                    T::from_f32(v[i].to_f32() * scale)
                } else {
                    T::from_f32(0.0)
                };
                out[i].to_bits_u32() != want.to_bits_u32()
            })
            .count()
    };
    checks.check(
        "forward y == kept ? x * scale : +0".to_string(),
        apply(&x, &fwd.y) == 0,
    );
    checks.check(
        "backward dx == kept ? dy * scale : +0".to_string(),
        apply(&dy, &dx) == 0,
    );

    // A different Philox stream gives a different mask.
    let other = block_ref::mask(&cfg, shape, PhiloxState::new(state.seed, state.offset + 1))?;
    checks.check("next offset gives a different mask".to_string(), other != mask);

    Ok(print_checks(dtype, n, &checks))
}

fn cpu_tour(n: usize, blocks: &[BlockShape]) -> BoxResult<bool> {
    println!("CPU reference: dropout p = {P}, n = {n}\n");
    print_check_header();
    let mut rng = Generator::new(2024);
    let mut ok = cpu_dtype::<f16>(n, 1, rng.next())?;
    ok &= cpu_dtype::<bf16>(n, 2, rng.next())?;
    ok &= cpu_dtype::<f32>(n, 3, rng.next())?;
    for bs in blocks {
        println!();
        println!(
            "CPU reference: {}: DropBlock p = {P}, block {}, shape {:?}\n",
            bs.name, bs.block, bs.shape
        );
        print_check_header();
        ok &= cpu_drop_block::<f16>(bs, 4, rng.next())?;
        ok &= cpu_drop_block::<bf16>(bs, 5, rng.next())?;
        ok &= cpu_drop_block::<f32>(bs, 6, rng.next())?;
    }
    for family in &FAMILIES {
        println!();
        ok &= (family.cpu)(Scale::Small, &mut rng)?;
    }
    println!();
    println!(
        "{}",
        if ok {
            "the CPU reference is self-consistent"
        } else {
            "FAILED: the CPU reference is inconsistent"
        }
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    /// The tour's own entry point and checks: without a GPU the CPU reference at its normal size,
    /// with one every kernel at 2^16 + 37 elements and DropBlock on the small shapes (the
    /// debug-build reference stays fast).
    #[test]
    fn tour_matches_the_reference() {
        let ok = super::tour(
            (1 << 16) + 37,
            super::CPU_N,
            &super::SMALL_BLOCKS,
            super::Scale::Small,
        )
        .expect("tour failed");
        assert!(ok, "the tour found a mismatch or a failed check");
    }
}
