//! Randomized differential fuzzing: every kernel on GPU 0 (dropout, DropBlock, token routing,
//! stochastic depth and sample compaction, multi-sample dropout and weighted cross-entropy,
//! structured dropout, Monte-Carlo dropout, fused bias + dropout + residual, attention importance,
//! the multi-sample head, graph-safe randomness) against the CPU reference.
//!
//! ```text
//! cargo run --release --example fuzz -- [--seconds S] [--seed U64] [--max-n N] [--case CASE]
//! ```
//!
//! * `--seconds S` (default 30): draw and check random cases until `S` seconds have elapsed.
//! * `--seed U64` (default: from the clock, printed at the start): the seed of the case generator
//!   (a `rand::rngs::StdRng`); the same seed draws the same cases.
//! * `--max-n N` (default 2^20): the largest tensor length drawn (every `n` is in `1..=N`; for the
//!   shaped families, the largest tensor of a case has at most `N` elements).
//! * `--case CASE`: rerun exactly one case, given as the reproducer string a mismatch prints,
//!   e.g. `dtype=f16,kernel=forward,n=33,p=0.5,seed=1,offset=2,eo=3,xo=1,yo=2,mo=0,data=9`, or for
//!   DropBlock `dtype=bf16,kernel=drop_block_forward,shape=2x3x7x33,block=4,p=0.5,gamma=1.0,
//!   shared=false,norm=global,seed=1,offset=2,xo=1,yo=2,mo=0,so=1,data=9`, or for the later
//!   families e.g. `dtype=f16,kernel=routing_scatter_add,shape=2x33x40,sel=fraction:0.5,pad=all,
//!   scores=ties,src=select,cap=1,rows=-1,xo=1,yo=2,data=3` (one line, no spaces). Every kernel
//!   takes exactly its keys (`Kernel::keys`), each once.
//!
//! Each case picks a dtype (f16, bf16, f32) and a family (dropout in 4 of 24 cases, each of the
//! ten other families in 2 of 24). A dropout case picks a kernel (`mask`, `forward`, `forward_maskless`,
//! `forward_inplace`, `forward_maskless_inplace`, `backward` (from the mask), `backward_maskless`,
//! `backward_inplace`, `backward_maskless_inplace`), a length `n` (many tiny ones, values near
//! multiples of 32 and 8, medium ones, now and then one near `N`), a drop probability `p` (0, 1, near
//! 0 and 1, thresholds that are powers of 2 or halfway between integers, random), a Philox seed and
//! offset (including 0 and `u64::MAX`), an element offset (including values that straddle 2^32 and
//! 2^34 and the largest one allowed, `u64::MAX - n`), view offsets 0..7 (elements) and 0..3 (mask
//! words) into larger buffers so the pointers are not 16-byte aligned, and a data seed for the
//! inputs (uniform values, arbitrary bit patterns, NaN, ±Inf, -0, subnormals, extremes).
//!
//! DropBlock cases (kernels `drop_block_mask`, `drop_block_forward`, `drop_block_forward_inplace`,
//! `drop_block_backward` (from a stored mask and stats), `drop_block_backward_inplace`) draw a 2D
//! `[N, C, H, W]` or 3D `[N, C, D, H, W]` shape (`shape=NxCxHxW`, mostly small, now and then medium;
//! maps smaller than, equal to and one more than the block, 1x1 maps, rows of 31/32/33 and 63/64/65
//! units; at most `N` elements, and the kernel's shared-memory limit always holds), a block size
//! 1..=9 (`block`), `p` (0, 1, near 1, common, random), a gamma scale (`gamma`: 1, 0, random, large
//! enough that every seed is drawn), channel sharing (`shared`), the normalisation (`norm`:
//! `global`, `per_sample`, `off`), the Philox seed and offset, view offsets (`xo`, `yo`: elements,
//! `mo`: mask words, `so`: `u64` counters) and the data seed. They have no `n` (the shape's element
//! count) and no `eo` (DropBlock has no element offset). The mask, the `N + 1` kept counters and the
//! outputs are compared with `dropfuse::reference::drop_block`, with the same guard checks.
//!
//! The later families, one module each in `examples/fuzz/` whose documentation lists its kernels
//! and keys, are drawn and checked the same way (sentinel-filled buffers, misaligned views, guard
//! slots, inputs unchanged):
//! * token routing (`routing.rs`): `routing_top_k`, `routing_global`, `routing_gather`,
//!   `routing_scatter_add`, `routing_scatter_add_backward`, `routing_gather_backward`; batches of
//!   sequences of 1 to 5000 tokens, every selection rule, padding by masks or lengths (also above
//!   `S`), scores with ties, NaN, `±0` and infinities, index capacities and compact buffers above
//!   and below the selected total, the GPU's routing or the reference's uploaded;
//! * stochastic depth and sample compaction (`skip.rs`): `stochastic_depth`,
//!   `stochastic_depth_in_place`, `stochastic_depth_backward` (with or without the bias
//!   gradient), `sample_slots`, `gather_samples`, `gather_samples_checked`, `scatter_samples`,
//!   `scatter_samples_in_place`, `scatter_samples_backward`, `scatter_add_samples`,
//!   `scatter_add_samples_backward`, `gather_samples_backward`; per-sample, batch and device batch
//!   decisions with any non-zero flag byte for a kept sample, biases of every divisor of the row,
//!   rows over 2^16 elements, compact buffers above and below the kept count;
//! * multi-sample dropout (`multi_sample.rs`): `multi_sample_copies`, `multi_sample_copies_masks`,
//!   `multi_sample_reduce`, `multi_sample_reduce_maskless`, `multi_sample_mean` (bit for bit
//!   against the reference's copies and masks and the documented `f32` formulas, any output type),
//!   `weighted_ce`, `weighted_ce_loss` (within the bounds `dropfuse::multi_sample` documents
//!   against the `f64` reference; bad labels must write nothing and be named by `check_labels`);
//! * structured dropout (`structured.rs`): `structured_mask`, `structured_forward`,
//!   `structured_forward_maskless`, `structured_forward_inplace`,
//!   `structured_forward_maskless_inplace`, `structured_backward`, `structured_backward_maskless`,
//!   `structured_backward_inplace`, `structured_backward_maskless_inplace`; channel, locked,
//!   embedding-row and any shared-axes layouts of rank 1 to 10 (layouts of more than 8 groups
//!   must be rejected as `axes`), decision offsets up to the largest allowed, decision masks and
//!   outputs bit for bit;
//! * Monte-Carlo dropout (`mc_dropout.rs`): `mc_replicas`, `mc_replicas_maskless` (bit for bit,
//!   element offsets, streams wrapping around 2^64), `mc_summaries` (single checked pushes),
//!   `mc_summaries_stack`, `mc_summaries_unchecked` (softmax, near one-hot, one-hot, identical
//!   samples, and one invalid value: the push rejected and counted, the others summarized) within
//!   `reference::mc_dropout::f32_tolerance`, counters exact;
//! * fused bias + dropout + residual (`bias_dropout_residual.rs`): `bdr_forward`,
//!   `bdr_forward_maskless`, `bdr_forward_inplace`, `bdr_forward_maskless_inplace`,
//!   `bdr_backward`, `bdr_backward_maskless`, `bdr_backward_inplace`,
//!   `bdr_backward_maskless_inplace`, with and without a bias, rows across the 256-row chunks of
//!   the bias gradient, bit for bit (`dbias` included);
//! * attention importance (`importance.rs`): `importance`, `importance_similarities` (no mask, all
//!   real, some padding, all padding; one to three adds into one layer of three), the layer's
//!   count exact, its sum and the similarities within `reference::importance`'s bounds;
//! * the multi-sample head (`head.rs`, cuBLAS): `multi_sample_head` (training and evaluation mode,
//!   bias or not, smoothing, ignored and bad labels, gradients in f32 or the input type), copies
//!   and masks bit for bit, loss, averaged logits and gradients within the documented bounds. On a
//!   GPU without libcublas these cases are skipped: a `fuzz: SKIPPED: multi_sample_head cases`
//!   line at the start and the number skipped before the last line (they are not in `cases`);
//! * graph-safe randomness (`graph.rs`): `dropout_device_philox` (dropout forward through a
//!   `DevicePhilox` at `offset`, stream `+ add`, against the host state `{seed, offset + add}` and
//!   the reference, bit for bit; the state unchanged), `dropout_device_philox_advance` (`advance`
//!   by `add`, then the mask-free forward at the device offset; the state read back).
//!
//! The kernel runs on views into sentinel-filled buffers with guard slots after the view; the
//! mask words and every output element are compared bit for bit with `dropfuse::reference`, the
//! slots outside the view must still hold the sentinel, and inputs (data, stored masks) must be
//! unchanged. One exception to "bit for bit": where the reference gives a NaN, any NaN is
//! accepted (the GPU's NaN payloads are canonical, the CPU's carry the input's payload).
//!
//! A mismatching case prints `MISMATCH --case <string>` and the first differing indices
//! (`[i]` is element `i` of the view, `guard[i]` a slot outside it: negative before, `>= n` after);
//! the run goes on until the time is up and then exits with status 1. A failed call (an error from
//! dropfuse) counts the same; after a CUDA error the run stops at once, the context may be unusable.
//! The last line is `FUZZ cases=C mismatches=M seconds=S seed=SEED mode=gpu|cpu-reference`
//! (`mismatches` counts failing cases).
//!
//! Without a GPU (`Device::new(0)` fails) it says so and, for the same time, runs randomized
//! self-checks of the CPU reference instead, on the same random cases: the mask against the
//! Philox contract re-derived here, forward against the element-wise contract and against
//! `apply_mask` of its mask, backward from the mask against the mask-free backward, the shard
//! property at a random split point, and the keep rate within a loose (8 sigma) bound. For
//! DropBlock: the seed threshold from the contract's formula, the drawn seeds against the Philox
//! words re-derived here, the mask against blocks painted independently (a unit is dropped iff a
//! drawn seed of its plane covers it, counted with prefix sums), counts, scales of each
//! normalisation, forward and backward arithmetic, and the keep rate within a tail bound
//! (Freedman's inequality, exceeded with probability below 1e-12) of its exact expectation. For the
//! later families: the contracts re-derived in `examples/checks/` (shared with the tour), on the
//! case's inputs: selections (counts, rank order with ties to the lower index, the threshold,
//! the host bounds), row operations, the stochastic-depth arithmetic and chunked bias gradient,
//! slots and compaction round trips, masked copies, the mean's formula within its rounding bound,
//! the cross-entropy's formulas, finite differences and zero row sums, bad labels rejected;
//! structured decision indices (also through the safe API's collapsed groups, and its rejection of
//! more than 8 groups), decision masks, arithmetic and shards; replicas on the streams
//! `offset + t`; the summaries against two-pass formulas, rejected pushes; the bias + dropout +
//! residual steps and chunked bias gradient; the cosine similarity and an `f32` model of the
//! kernel within its bound; the head's logits, gradients, finite differences; and for the
//! graph-safe kernels the dropout self-checks at the host state `{seed, offset + add}`.
//!
//! A new family is one module in `examples/fuzz/` (its `Op`s, `Spec`, `draw` and `run`) and a
//! line in each of `Kernel`, `Kernel::all`, `Kernel::keys`, `Kernel::name`, `Spec`,
//! `Spec::numel`, `Case::value`, `Case::from_str`, `draw_case` and `run_on`.

use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dropfuse::cudarc::driver::DeviceRepr;
use dropfuse::drop_block::{stats_len, DropBlock, Normalize};
use dropfuse::dropout::mask_words;
use dropfuse::ffi::DROPFUSE_DROP_BLOCK_SMEM;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::drop_block as block_ref;
use dropfuse::reference::dropout as reference;
use dropfuse::reference::philox4x32_10;
use dropfuse::{DType, Device, Dropout, Element, Error, PhiloxState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// The reference self-checks shared with the tour (each example uses part of them).
#[allow(dead_code)]
#[path = "checks/mod.rs"]
mod checks;
// The families after dropout and DropBlock, one module each (`examples/fuzz/*.rs`): their
// kernels ([`Kernel`]), case keys ([`Spec`]), draws, GPU runs and CPU self-checks.
#[path = "fuzz/bias_dropout_residual.rs"]
mod bias_dropout_residual;
#[path = "fuzz/graph.rs"]
mod graph;
#[path = "fuzz/head.rs"]
mod head;
#[path = "fuzz/importance.rs"]
mod importance;
#[path = "fuzz/labels.rs"]
mod labels;
#[path = "fuzz/mc_dropout.rs"]
mod mc_dropout;
#[path = "fuzz/multi_sample.rs"]
mod multi_sample;
#[path = "fuzz/routing.rs"]
mod routing;
#[path = "fuzz/skip.rs"]
mod skip;
#[path = "fuzz/structured.rs"]
mod structured;

type BoxError = Box<dyn std::error::Error>;

const USAGE: &str =
    "usage: cargo run --release --example fuzz -- [--seconds S (30)] [--seed U64 (from the clock)] \
     [--max-n N (1048576)] [--case CASE]";

/// Guard slots after every view.
const GUARD: usize = 5;
/// What the mask buffers hold outside the view.
const MASK_SENTINEL: u32 = 0xDEAD_BEEF;
/// What DropBlock's stats buffers hold outside the view.
const STATS_SENTINEL: u64 = 0xFEED_FACE_CAFE_BEEF;
/// DropBlock cases: at most this many elements, unless `--max-n` is smaller (1 in 10 cases).
const BLOCK_MEDIUM_N: usize = 1 << 17;
/// DropBlock cases: at most this many elements otherwise.
const BLOCK_SMALL_N: usize = 1 << 12;
/// DropBlock cases: at most this many block units painted by the CPU reference (expected), so a
/// case with every seed drawn stays quick.
const BLOCK_PAINT_BUDGET: f64 = (1u64 << 20) as f64;
/// At most this many differing indices are printed per buffer.
const SHOW: usize = 4;
/// 2^32 as f64.
const TWO_POW_32: f64 = 4_294_967_296.0;

// ------------------------------------------------------------ config ----

/// What one run does.
#[derive(Debug, Clone)]
struct Config {
    /// Run until this many seconds have elapsed (ignored with `case`).
    seconds: f64,
    /// Seed of the case generator.
    seed: u64,
    /// Largest tensor length drawn.
    max_n: usize,
    /// Run only this case.
    case: Option<Case>,
}

/// What one run found.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    cases: u64,
    /// Cases with a mismatch or a failed call.
    mismatches: u64,
    seconds: f64,
    seed: u64,
    /// Whether the cases ran on the GPU (else: CPU-reference self-checks).
    gpu: bool,
    /// Cases drawn but not run: the multi-sample head's on a GPU without cuBLAS (not in `cases`).
    skipped: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FUZZ cases={} mismatches={} seconds={:.1} seed={} mode={}",
            self.cases,
            self.mismatches,
            self.seconds,
            self.seed,
            if self.gpu { "gpu" } else { "cpu-reference" }
        )
    }
}

/// Parses the command line (without the program name); `Ok(None)` for `--help`.
fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Config>, String> {
    let mut cfg = Config {
        seconds: 30.0,
        seed: clock_seed(),
        max_n: 1 << 20,
        case: None,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: expected {what}, got {value:?}");
        match flag.as_str() {
            "--seconds" => {
                cfg.seconds = value.parse().map_err(|_| bad("a number of seconds"))?;
                if !(cfg.seconds.is_finite() && cfg.seconds >= 0.0) {
                    return Err(bad("a number of seconds >= 0"));
                }
            }
            "--seed" => cfg.seed = value.parse().map_err(|_| bad("an unsigned 64-bit integer"))?,
            "--max-n" => {
                cfg.max_n = value.parse().map_err(|_| bad("a length >= 1"))?;
                if cfg.max_n == 0 {
                    return Err(bad("a length >= 1"));
                }
            }
            "--case" => cfg.case = Some(value.parse().map_err(|e| format!("--case: {e}"))?),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(cfg))
}

fn clock_seed() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

// -------------------------------------------------------------- cases ----

/// The kernels: methods of `Dropout`, of `DropBlock` for the `DropBlock*` ones, and the
/// operations of the later families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Mask,
    Forward,
    ForwardMaskless,
    ForwardInplace,
    ForwardMasklessInplace,
    Backward,
    BackwardMaskless,
    BackwardInplace,
    BackwardMasklessInplace,
    DropBlockMask,
    DropBlockForward,
    DropBlockForwardInplace,
    DropBlockBackward,
    DropBlockBackwardInplace,
    /// The later families: an operation of the family's module (`examples/fuzz/*.rs`).
    Routing(routing::Op),
    Skip(skip::Op),
    MultiSample(multi_sample::Op),
    Structured(structured::Op),
    McDropout(mc_dropout::Op),
    Bdr(bias_dropout_residual::Op),
    Importance(importance::Op),
    Head(head::Op),
    Graph(graph::Op),
}

/// The keys of a dropout case, in the order of its string.
const DROPOUT_KEYS: [&str; 11] = [
    "dtype", "kernel", "n", "p", "seed", "offset", "eo", "xo", "yo", "mo", "data",
];
/// The keys of a DropBlock case.
const BLOCK_KEYS: [&str; 15] = [
    "dtype", "kernel", "shape", "block", "p", "gamma", "shared", "norm", "seed", "offset", "xo", "yo", "mo",
    "so", "data",
];

impl Kernel {
    const DROPOUT: [Kernel; 9] = [
        Kernel::Mask,
        Kernel::Forward,
        Kernel::ForwardMaskless,
        Kernel::ForwardInplace,
        Kernel::ForwardMasklessInplace,
        Kernel::Backward,
        Kernel::BackwardMaskless,
        Kernel::BackwardInplace,
        Kernel::BackwardMasklessInplace,
    ];
    const DROP_BLOCK: [Kernel; 5] = [
        Kernel::DropBlockMask,
        Kernel::DropBlockForward,
        Kernel::DropBlockForwardInplace,
        Kernel::DropBlockBackward,
        Kernel::DropBlockBackwardInplace,
    ];

    /// Every kernel, family after family.
    fn all() -> impl Iterator<Item = Kernel> {
        Kernel::DROPOUT
            .into_iter()
            .chain(Kernel::DROP_BLOCK)
            .chain(routing::Op::ALL.map(Kernel::Routing))
            .chain(skip::Op::ALL.map(Kernel::Skip))
            .chain(multi_sample::Op::ALL.map(Kernel::MultiSample))
            .chain(structured::Op::ALL.map(Kernel::Structured))
            .chain(mc_dropout::Op::ALL.map(Kernel::McDropout))
            .chain(bias_dropout_residual::Op::ALL.map(Kernel::Bdr))
            .chain(importance::Op::ALL.map(Kernel::Importance))
            .chain(head::Op::ALL.map(Kernel::Head))
            .chain(graph::Op::ALL.map(Kernel::Graph))
    }

    /// The keys of a case of this kernel, in the order of its string.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Kernel::Routing(op) => op.keys(),
            Kernel::Skip(op) => op.keys(),
            Kernel::MultiSample(op) => op.keys(),
            Kernel::Structured(op) => op.keys(),
            Kernel::McDropout(op) => op.keys(),
            Kernel::Bdr(op) => op.keys(),
            Kernel::Importance(op) => op.keys(),
            Kernel::Head(op) => op.keys(),
            Kernel::Graph(op) => op.keys(),
            k if k.is_drop_block() => &BLOCK_KEYS,
            _ => &DROPOUT_KEYS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Routing(op) => op.name(),
            Kernel::Skip(op) => op.name(),
            Kernel::MultiSample(op) => op.name(),
            Kernel::Structured(op) => op.name(),
            Kernel::McDropout(op) => op.name(),
            Kernel::Bdr(op) => op.name(),
            Kernel::Importance(op) => op.name(),
            Kernel::Head(op) => op.name(),
            Kernel::Graph(op) => op.name(),
            Kernel::Mask => "mask",
            Kernel::Forward => "forward",
            Kernel::ForwardMaskless => "forward_maskless",
            Kernel::ForwardInplace => "forward_inplace",
            Kernel::ForwardMasklessInplace => "forward_maskless_inplace",
            Kernel::Backward => "backward",
            Kernel::BackwardMaskless => "backward_maskless",
            Kernel::BackwardInplace => "backward_inplace",
            Kernel::BackwardMasklessInplace => "backward_maskless_inplace",
            Kernel::DropBlockMask => "drop_block_mask",
            Kernel::DropBlockForward => "drop_block_forward",
            Kernel::DropBlockForwardInplace => "drop_block_forward_inplace",
            Kernel::DropBlockBackward => "drop_block_backward",
            Kernel::DropBlockBackwardInplace => "drop_block_backward_inplace",
        }
    }
    /// Writes a mask (and, for DropBlock, the stats).
    fn writes_mask(self) -> bool {
        matches!(
            self,
            Kernel::Mask
                | Kernel::Forward
                | Kernel::ForwardInplace
                | Kernel::DropBlockMask
                | Kernel::DropBlockForward
                | Kernel::DropBlockForwardInplace
        )
    }
    /// Reads a stored mask (and, for DropBlock, the stats).
    fn reads_mask(self) -> bool {
        matches!(
            self,
            Kernel::Backward
                | Kernel::BackwardInplace
                | Kernel::DropBlockBackward
                | Kernel::DropBlockBackwardInplace
        )
    }
    fn in_place(self) -> bool {
        matches!(
            self,
            Kernel::ForwardInplace
                | Kernel::ForwardMasklessInplace
                | Kernel::BackwardInplace
                | Kernel::BackwardMasklessInplace
                | Kernel::DropBlockForwardInplace
                | Kernel::DropBlockBackwardInplace
        )
    }
    /// A method of `DropBlock` (the case carries a [`BlockSpec`]).
    fn is_drop_block(self) -> bool {
        matches!(
            self,
            Kernel::DropBlockMask
                | Kernel::DropBlockForward
                | Kernel::DropBlockForwardInplace
                | Kernel::DropBlockBackward
                | Kernel::DropBlockBackwardInplace
        )
    }
}

/// The DropBlock part of a case: shape and configuration (the drop probability is `Case::p`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct BlockSpec {
    /// `[N, C, H, W]` (`rank` 4) or `[N, C, D, H, W]` (`rank` 5) in the first `rank` entries, 0 after them.
    dims: [usize; 5],
    rank: usize,
    block_size: usize,
    gamma_scale: f64,
    shared: bool,
    normalize: Normalize,
    /// View offset of the stats (`u64` counters) into a larger buffer.
    so: usize,
}

impl BlockSpec {
    fn shape(&self) -> &[usize] {
        &self.dims[..self.rank]
    }
    fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    fn cfg(&self, p: f64) -> dropfuse::Result<DropBlock> {
        Ok(DropBlock::new(p, self.block_size)?
            .with_gamma_scale(self.gamma_scale)?
            .with_shared_channels(self.shared)
            .with_normalize(self.normalize))
    }
    /// The value of one of its keys in a case string.
    fn value(&self, key: &str) -> String {
        match key {
            "shape" => dims_text(self.shape()),
            "block" => self.block_size.to_string(),
            // `{:?}` of an f64 is the shortest string that parses back to the same bits.
            "gamma" => format!("{:?}", self.gamma_scale),
            "shared" => self.shared.to_string(),
            "norm" => normalize_name(self.normalize).to_string(),
            "so" => self.so.to_string(),
            _ => unreachable!("DropBlock cases have no key {key}"),
        }
    }
    fn parse(f: &Fields<'_>) -> Result<Self, String> {
        let dims = parse_dims("shape", f.get("shape")?, &[4, 5])?;
        let mut padded = [0usize; 5];
        padded[..dims.len()].copy_from_slice(&dims);
        let spec = BlockSpec {
            dims: padded,
            rank: dims.len(),
            block_size: f.num("block")?,
            gamma_scale: f.num("gamma")?,
            shared: f.num("shared")?,
            normalize: match f.get("norm")? {
                "global" => Normalize::Global,
                "per_sample" => Normalize::PerSample,
                "off" => Normalize::Off,
                other => return Err(format!("norm: expected global, per_sample or off, got {other:?}")),
            },
            so: f.num("so")?,
        };
        if spec.block_size == 0 {
            return Err("block: must be >= 1".into());
        }
        if !(spec.gamma_scale.is_finite() && spec.gamma_scale >= 0.0) {
            return Err(format!(
                "gamma: must be finite and >= 0, got {}",
                spec.gamma_scale
            ));
        }
        if spec.so > 1024 {
            return Err("so: view offsets must be <= 1024".into());
        }
        Ok(spec)
    }
}

fn normalize_name(n: Normalize) -> &'static str {
    match n {
        Normalize::Global => "global",
        Normalize::PerSample => "per_sample",
        Normalize::Off => "off",
    }
}

/// Shared memory the DropBlock mask kernel needs for `shape` (`kernels/dropfuse.h`); shapes above
/// `DROPFUSE_DROP_BLOCK_SMEM` are rejected by the API and never drawn.
fn smem_need(shape: &[usize], block_size: usize) -> u64 {
    let (d, h, w) = match *shape {
        [_, _, h, w] => (1, h, w),
        [_, _, d, h, w] => (d, h, w),
        _ => return u64::MAX,
    };
    let (block_a, rows) = if d > 1 {
        (block_size.min(d), h)
    } else {
        (block_size.min(h), 1)
    };
    8 * block_a as u64 * rows as u64 * w.div_ceil(32) as u64
}

/// The `key=value` pairs of a case string, each key at most once.
struct Fields<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Fields<'a> {
    fn parse(s: &'a str) -> Result<Self, String> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for pair in s.trim().split(',') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {pair:?}"))?;
            let key = key.trim();
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(format!("key {key:?} given twice"));
            }
            pairs.push((key, value.trim()));
        }
        Ok(Fields { pairs })
    }
    fn get(&self, key: &str) -> Result<&'a str, String> {
        self.pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("missing key {key:?}"))
    }
    fn num<T: FromStr>(&self, key: &str) -> Result<T, String> {
        let v = self.get(key)?;
        v.parse().map_err(|_| format!("{key}: cannot parse {v:?}"))
    }
}

/// `f32`, `f16` or `bf16`.
fn parse_dtype(key: &str, v: &str) -> Result<DType, String> {
    match v {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("{key}: expected f32, f16 or bf16, got {other:?}")),
    }
}

/// A shape `AxBx...`: one of the `ranks`, no zero extent, a product that fits `usize`.
fn parse_dims(key: &str, text: &str, ranks: &[usize]) -> Result<Vec<usize>, String> {
    let dims: Vec<usize> = text
        .split('x')
        .map(|d| d.parse().map_err(|_| format!("{key}: cannot parse {d:?}")))
        .collect::<Result<_, _>>()?;
    if !ranks.contains(&dims.len()) || dims.contains(&0) {
        return Err(format!(
            "{key}: expected {ranks:?} extents without zeros, got {text:?}"
        ));
    }
    if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
        return Err(format!("{key}: {text:?} has too many elements"));
    }
    Ok(dims)
}

/// `AxBx...`.
fn dims_text(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    dims.join("x")
}

/// The part of a case beyond the common fields: its family, shape and parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spec {
    /// Dropout: the common fields say it all.
    Dropout,
    Block(BlockSpec),
    Routing(routing::Spec),
    Skip(skip::Spec),
    MultiSample(multi_sample::Spec),
    Structured(structured::Spec),
    McDropout(mc_dropout::Spec),
    Bdr(bias_dropout_residual::Spec),
    Importance(importance::Spec),
    Head(head::Spec),
    Graph(graph::Spec),
}

impl Spec {
    /// The element count of a shaped family (dropout's `n` is a key of its own).
    fn numel(&self) -> usize {
        match self {
            Spec::Dropout => 0,
            Spec::Block(b) => b.numel(),
            Spec::Routing(s) => s.numel(),
            Spec::Skip(s) => s.numel(),
            Spec::MultiSample(s) => s.numel(),
            Spec::Structured(s) => s.numel(),
            Spec::McDropout(s) => s.numel(),
            Spec::Bdr(s) => s.numel(),
            Spec::Importance(s) => s.numel(),
            Spec::Head(s) => s.numel(),
            Spec::Graph(s) => s.numel(),
        }
    }
}

/// One fuzz case: everything needed to rerun it exactly (`Display` and `FromStr` round-trip).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Case {
    dtype: DType,
    kernel: Kernel,
    n: usize,
    p: f64,
    /// Philox seed and offset.
    seed: u64,
    offset: u64,
    /// Element offset (global index of element 0).
    eo: u64,
    /// View offsets into the larger buffers: input / in-place data, output data (elements), masks
    /// (words).
    xo: usize,
    yo: usize,
    mo: usize,
    /// Seed of the input values.
    data: u64,
    /// The family's part. The common fields a kernel's [`Kernel::keys`] do not list are 0, and
    /// `n` is the shape's element count where `n` is not a key.
    spec: Spec,
}

impl Case {
    /// A case of `kernel` with the common fields 0 (`n` the element count of `spec`).
    fn of(dtype: DType, kernel: Kernel, spec: Spec) -> Case {
        Case {
            dtype,
            kernel,
            n: spec.numel(),
            p: 0.0,
            seed: 0,
            offset: 0,
            eo: 0,
            xo: 0,
            yo: 0,
            mo: 0,
            data: 0,
            spec,
        }
    }
    fn state(&self) -> PhiloxState {
        PhiloxState::new(self.seed, self.offset)
    }
    #[cfg(test)]
    fn block(&self) -> Option<&BlockSpec> {
        match &self.spec {
            Spec::Block(b) => Some(b),
            _ => None,
        }
    }
    /// The value of `key` in the case string.
    fn value(&self, key: &str) -> String {
        match key {
            "dtype" => self.dtype.name().to_string(),
            "kernel" => self.kernel.name().to_string(),
            "n" => self.n.to_string(),
            // `{:?}` of an f64 is the shortest string that parses back to the same bits.
            "p" => format!("{:?}", self.p),
            "seed" => self.seed.to_string(),
            "offset" => self.offset.to_string(),
            "eo" => self.eo.to_string(),
            "xo" => self.xo.to_string(),
            "yo" => self.yo.to_string(),
            "mo" => self.mo.to_string(),
            "data" => self.data.to_string(),
            _ => match &self.spec {
                Spec::Dropout => unreachable!("dropout cases have no key {key}"),
                Spec::Block(b) => b.value(key),
                Spec::Routing(s) => s.value(key),
                Spec::Skip(s) => s.value(key),
                Spec::MultiSample(s) => s.value(key),
                Spec::Structured(s) => s.value(key),
                Spec::McDropout(s) => s.value(key),
                Spec::Bdr(s) => s.value(key),
                Spec::Importance(s) => s.value(key),
                Spec::Head(s) => s.value(key),
                Spec::Graph(s) => s.value(key),
            },
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self
            .kernel
            .keys()
            .iter()
            .map(|&k| format!("{k}={}", self.value(k)))
            .collect();
        f.write_str(&pairs.join(","))
    }
}

impl FromStr for Case {
    type Err = String;

    /// `key=value` pairs separated by commas, every key of the kernel's family exactly once and
    /// no other (the `Display` form, [`Kernel::keys`]): dropout kernels take `n` and `eo`,
    /// DropBlock kernels `shape`, `block`, `gamma`, `shared`, `norm` and `so` instead, the later
    /// families the keys of their modules.
    fn from_str(s: &str) -> Result<Self, String> {
        let f = Fields::parse(s)?;
        let kernel_name = f.get("kernel")?;
        let kernel = Kernel::all()
            .find(|k| k.name() == kernel_name)
            .ok_or_else(|| format!("kernel: unknown kernel {kernel_name:?}"))?;
        let keys = kernel.keys();
        if let Some((k, _)) = f.pairs.iter().find(|(k, _)| !keys.contains(k)) {
            return Err(format!(
                "key {k:?} does not apply to kernel {kernel_name} (its keys: {})",
                keys.join(",")
            ));
        }
        for key in keys {
            f.get(key)?;
        }
        let dtype = parse_dtype("dtype", f.get("dtype")?)?;
        let spec = match kernel {
            Kernel::Routing(op) => Spec::Routing(routing::Spec::parse(op, &f)?),
            Kernel::Skip(op) => Spec::Skip(skip::Spec::parse(op, &f)?),
            Kernel::MultiSample(op) => Spec::MultiSample(multi_sample::Spec::parse(op, &f)?),
            Kernel::Structured(op) => Spec::Structured(structured::Spec::parse(op, &f)?),
            Kernel::McDropout(op) => Spec::McDropout(mc_dropout::Spec::parse(op, &f)?),
            Kernel::Bdr(op) => Spec::Bdr(bias_dropout_residual::Spec::parse(op, &f)?),
            Kernel::Importance(op) => Spec::Importance(importance::Spec::parse(op, &f)?),
            Kernel::Head(op) => Spec::Head(head::Spec::parse(op, &f)?),
            Kernel::Graph(op) => Spec::Graph(graph::Spec::parse(op, &f)?),
            k if k.is_drop_block() => Spec::Block(BlockSpec::parse(&f)?),
            _ => Spec::Dropout,
        };
        let has = |key: &str| keys.contains(&key);
        fn or_zero<T: FromStr + Default>(f: &Fields<'_>, has: bool, key: &str) -> Result<T, String> {
            if has {
                f.num(key)
            } else {
                Ok(T::default())
            }
        }
        let case = Case {
            dtype,
            kernel,
            n: if has("n") { f.num("n")? } else { spec.numel() },
            p: or_zero(&f, has("p"), "p")?,
            seed: or_zero(&f, has("seed"), "seed")?,
            offset: or_zero(&f, has("offset"), "offset")?,
            eo: or_zero(&f, has("eo"), "eo")?,
            xo: or_zero(&f, has("xo"), "xo")?,
            yo: or_zero(&f, has("yo"), "yo")?,
            mo: or_zero(&f, has("mo"), "mo")?,
            data: f.num("data")?,
            spec,
        };
        if case.n == 0 {
            return Err("n: must be >= 1".into());
        }
        if !(0.0..=1.0).contains(&case.p) {
            return Err(format!("p: must be in [0, 1], got {}", case.p));
        }
        if case.eo.checked_add(case.n as u64).is_none() {
            return Err("eo: eo + n must be <= 2^64 - 1".into());
        }
        if case.xo > 1024 || case.yo > 1024 || case.mo > 1024 {
            return Err("xo, yo, mo: view offsets must be <= 1024".into());
        }
        Ok(case)
    }
}

/// A length in `1..=max_n`: many tiny, many near multiples of 32 and 8, log-uniform medium ones,
/// and now and then one in the top half of the range.
fn draw_n(rng: &mut StdRng, max_n: usize) -> usize {
    let r = rng.random_range(0..100u32);
    let n = if r < 35 || max_n <= 300 {
        rng.random_range(1..=300usize)
    } else if r < 55 {
        let m = if rng.random_bool(0.5) { 32 } else { 8 };
        let k = rng.random_range(1..=512usize);
        (k * m).saturating_add_signed(rng.random_range(-2..=2i64) as isize)
    } else if r < 93 {
        let (lo, hi) = (301f64.ln(), (max_n as f64).ln());
        rng.random_range(lo..=hi).exp() as usize
    } else {
        rng.random_range(max_n / 2..=max_n)
    };
    n.clamp(1, max_n)
}

/// A drop probability: 0, 1, near 0 and 1, thresholds at, next to and halfway between powers of
/// 2, halfway between integers (round half away from zero), common values, uniform.
fn draw_p(rng: &mut StdRng) -> f64 {
    let pick = |rng: &mut StdRng, v: &[f64]| v[rng.random_range(0..v.len())];
    match rng.random_range(0..12u32) {
        0 => 0.0,
        1 => 1.0,
        2 => rng.random_range(0.0..1e-6),
        3 => 1.0 - rng.random_range(0.0..1e-6),
        4 => pick(
            rng,
            &[1e-10, 0.5 / TWO_POW_32, 1.0 / TWO_POW_32, 1.5 / TWO_POW_32, 1e-9],
        ),
        5 => pick(
            rng,
            &[
                1.0 - 1.0 / TWO_POW_32,
                1.0 - 0.5 / TWO_POW_32,
                1.0 - 1.5 / TWO_POW_32,
                1.0 - 1e-9,
                0.999_999,
            ],
        ),
        // threshold = 2^k exactly
        6 => (1u64 << rng.random_range(0..=32u32)) as f64 / TWO_POW_32,
        // threshold = 2^k +- 1
        7 => {
            let t = (1u64 << rng.random_range(1..=32u32)) as f64 + pick(rng, &[-1.0, 1.0]);
            (t / TWO_POW_32).min(1.0)
        }
        // threshold halfway between two integers
        8 => (rng.random_range(0..1u64 << 32) as f64 + 0.5) / TWO_POW_32,
        9 => pick(rng, &[0.1, 0.25, 0.5, 0.75, 0.9]),
        _ => rng.random::<f64>(),
    }
}

/// A Philox seed or offset: 0, `u64::MAX`, small, around 2^32, near the top, random.
fn draw_u64(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..8u32) {
        0 => 0,
        1 => u64::MAX,
        2 => rng.random_range(0..1000),
        3 => (1u64 << 32).wrapping_add_signed(rng.random_range(-3..=3i64)),
        4 => u64::MAX - rng.random_range(0..1000),
        _ => rng.random(),
    }
}

/// The element limit of a shaped case: `max_n`, and at most `mostly` in 9 of 10 cases, else at
/// most `rarely`.
fn draw_size_limit(rng: &mut StdRng, max_n: usize, mostly: usize, rarely: usize) -> usize {
    max_n.min(if rng.random_range(0..10u32) == 0 {
        rarely
    } else {
        mostly
    })
}

/// An element offset with `eo + n <= u64::MAX`: 0, small, the largest allowed and just below it,
/// views straddling 2^k (the 32-bit halves of the element and block indices roll over), random.
fn draw_element_offset(rng: &mut StdRng, n: usize) -> u64 {
    let top = u64::MAX - n as u64;
    let eo = match rng.random_range(0..10u32) {
        0 | 1 => 0,
        2 => rng.random_range(0..5000),
        3 => top,
        4 => top.saturating_sub(rng.random_range(0..67)),
        5 | 6 => {
            let boundary = 1u64 << rng.random_range(31..=63u32);
            boundary.wrapping_sub(rng.random_range(0..=n as u64 + 40))
        }
        _ => rng.random(),
    };
    eo.min(top)
}

/// A spatial extent of a DropBlock map for block size `block`: 1, at most the block, the block and
/// its neighbours, rows of 31/32/33 and 63/64/65 units, small, medium, and (`wide`) long rows.
fn draw_extent(rng: &mut StdRng, block: usize, wide: bool) -> usize {
    let pick = |rng: &mut StdRng, v: &[usize]| v[rng.random_range(0..v.len())];
    match rng.random_range(0..14u32) {
        0 => 1,
        1 => rng.random_range(1..=block),
        2 | 3 => (block + rng.random_range(0..=2usize)).saturating_sub(1).max(1),
        4 | 5 => pick(rng, &[31, 32, 33]),
        6 => pick(rng, &[63, 64, 65]),
        7 => rng.random_range(13..=70),
        8 if wide => rng.random_range(71..=600),
        _ => rng.random_range(1..=12),
    }
}

/// A DropBlock shape and configuration, and its drop probability: at most `max_n` elements (and
/// mostly at most [`BLOCK_SMALL_N`]), within the kernel's shared memory and the reference's
/// painting budget.
fn draw_block_spec(rng: &mut StdRng, max_n: usize) -> (BlockSpec, f64) {
    let pick = |rng: &mut StdRng, v: &[f64]| v[rng.random_range(0..v.len())];
    loop {
        let block_size = rng.random_range(1..=9usize);
        let rank = if rng.random_bool(0.6) { 4 } else { 5 };
        let medium = rng.random_range(0..10u32) == 0;
        let limit = max_n.min(if medium { BLOCK_MEDIUM_N } else { BLOCK_SMALL_N });
        let mut dims = [0usize; 5];
        dims[0] = if rng.random_range(0..4u32) == 0 {
            rng.random_range(1..=8)
        } else {
            rng.random_range(1..=3)
        };
        dims[1] = if rng.random_range(0..4u32) == 0 {
            rng.random_range(1..=16)
        } else {
            rng.random_range(1..=4)
        };
        for d in &mut dims[2..rank] {
            *d = draw_extent(rng, block_size, medium && rank == 4);
        }
        let p = match rng.random_range(0..8u32) {
            0 => 0.0,
            1 => 1.0,
            2 => 1.0 - rng.random_range(0.0..1e-6),
            3 => pick(rng, &[0.05, 0.1, 0.2, 0.5, 0.9, 0.999]),
            4 => draw_p(rng),
            _ => rng.random::<f64>(),
        };
        let spec = BlockSpec {
            dims,
            rank,
            block_size,
            gamma_scale: match rng.random_range(0..20u32) {
                0..=9 => 1.0,
                10 => 0.0,
                11 | 12 => pick(rng, &[0.5, 2.0, 50.0]),
                // gamma >= 1 whenever p > 0: every seed is drawn, every unit dropped.
                13 => 1e9,
                _ => rng.random_range(0.0..4.0),
            },
            shared: rng.random_bool(0.3),
            normalize: [Normalize::Global, Normalize::PerSample, Normalize::Off][rng.random_range(0..3)],
            so: rng.random_range(0..4),
        };
        // Shrink to the budgets: halve N or C while they exceed 1, then the longest spatial axis.
        let mut spec = spec;
        loop {
            let g = BlockGrid::new(&spec);
            let seed_rate = g.seed_probability(g.threshold(spec.gamma_scale, p));
            let paints = g.planes as f64 * g.valid as f64 * seed_rate * g.vol() as f64;
            if spec.numel() <= limit && paints <= BLOCK_PAINT_BUDGET {
                break;
            }
            let a = if spec.dims[0] * spec.dims[1] > 1 {
                if spec.dims[0] >= spec.dims[1] {
                    0
                } else {
                    1
                }
            } else {
                (2..rank).max_by_key(|&a| spec.dims[a]).unwrap_or(2)
            };
            spec.dims[a] = spec.dims[a].div_ceil(2);
        }
        if smem_need(spec.shape(), block_size) <= u64::from(DROPFUSE_DROP_BLOCK_SMEM) {
            return (spec, p);
        }
    }
}

/// A random case: a dtype, a family (dropout 4 in 24, each of the ten others 2 in 24), one of
/// its kernels and the rest as the family draws it.
fn draw_case(rng: &mut StdRng, max_n: usize) -> Case {
    let dtype = [DType::F16, DType::BF16, DType::F32][rng.random_range(0..3)];
    let pick = |rng: &mut StdRng, ops: &[Kernel]| ops[rng.random_range(0..ops.len())];
    let family = rng.random_range(0..24u32);
    match family {
        0..=3 => {}
        4 | 5 => {
            let kernel = pick(rng, &Kernel::DROP_BLOCK);
            let (spec, p) = draw_block_spec(rng, max_n);
            return Case {
                p,
                seed: draw_u64(rng),
                offset: draw_u64(rng),
                xo: rng.random_range(0..8),
                yo: rng.random_range(0..8),
                mo: rng.random_range(0..4),
                data: rng.random(),
                ..Case::of(dtype, kernel, Spec::Block(spec))
            };
        }
        6 | 7 => return routing::draw(rng, dtype, max_n),
        8 | 9 => return skip::draw(rng, dtype, max_n),
        10 | 11 => return multi_sample::draw(rng, dtype, max_n),
        12 | 13 => return structured::draw(rng, dtype, max_n),
        14 | 15 => return mc_dropout::draw(rng, dtype, max_n),
        16 | 17 => return bias_dropout_residual::draw(rng, dtype, max_n),
        18 | 19 => return importance::draw(rng, dtype, max_n),
        20 | 21 => return head::draw(rng, dtype, max_n),
        _ => return graph::draw(rng, dtype, max_n),
    }
    let kernel = pick(rng, &Kernel::DROPOUT);
    let n = draw_n(rng, max_n);
    let p = draw_p(rng);
    let seed = draw_u64(rng);
    let offset = draw_u64(rng);
    let eo = draw_element_offset(rng, n);
    Case {
        n,
        p,
        seed,
        offset,
        eo,
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        mo: rng.random_range(0..4),
        data: rng.random(),
        ..Case::of(dtype, kernel, Spec::Dropout)
    }
}

// ------------------------------------------------------------- values ----

/// Element types the fuzzer feeds: built from raw bits.
trait FuzzElement: Element + Word {
    /// Width in bits.
    const BITS: u32;
    /// NaNs (quiet, signalling, negative), ±Inf, -0, +0, subnormals, extremes, 1.
    const SPECIALS: &'static [u32];
    fn from_bits(bits: u32) -> Self;
}

impl FuzzElement for f32 {
    const BITS: u32 = 32;
    const SPECIALS: &'static [u32] = &[
        0x7fc0_0000,
        0x7f80_0001,
        0xffc0_0000,
        0x7f80_0000,
        0xff80_0000,
        0x8000_0000,
        0,
        1,
        0x007f_ffff,
        0x8000_0001,
        0x0080_0000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x3f80_0000,
    ];
    fn from_bits(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}
impl FuzzElement for f16 {
    const BITS: u32 = 16;
    const SPECIALS: &'static [u32] = &[
        0x7e00, 0x7c01, 0xfe00, 0x7c00, 0xfc00, 0x8000, 0, 1, 0x03ff, 0x8001, 0x0400, 0x7bff, 0xfbff, 0x3c00,
    ];
    fn from_bits(bits: u32) -> Self {
        f16::from_bits(bits as u16)
    }
}
impl FuzzElement for bf16 {
    const BITS: u32 = 16;
    const SPECIALS: &'static [u32] = &[
        0x7fc0, 0x7f81, 0xffc0, 0x7f80, 0xff80, 0x8000, 0, 1, 0x007f, 0x8001, 0x0080, 0x7f7f, 0xff7f, 0x3f80,
    ];
    fn from_bits(bits: u32) -> Self {
        bf16::from_bits(bits as u16)
    }
}

/// The inputs of a case: half uniform in [-8, 8), 30 % arbitrary bit patterns (NaN and Inf
/// included), 20 % special values.
fn values<T: FuzzElement>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let r = rng.random_range(0..10u32);
            if r < 5 {
                T::from_f32(rng.random_range(-8.0f32..8.0))
            } else if r < 8 {
                T::from_bits(rng.random::<u32>() >> (32 - T::BITS))
            } else {
                T::from_bits(T::SPECIALS[rng.random_range(0..T::SPECIALS.len())])
            }
        })
        .collect()
}

/// The fill outside the views of data buffers.
fn sentinel<T: Element>() -> T {
    T::from_f32(-12345.0)
}

// --------------------------------------------------------- comparison ----

/// Anything compared bit for bit: elements, mask words and DropBlock's counters.
trait Word: DeviceRepr + Copy {
    fn bits(self) -> u64;
    fn is_nan(self) -> bool;
}
impl Word for u32 {
    fn bits(self) -> u64 {
        u64::from(self)
    }
    fn is_nan(self) -> bool {
        false
    }
}
impl Word for u64 {
    fn bits(self) -> u64 {
        self
    }
    fn is_nan(self) -> bool {
        false
    }
}
macro_rules! element_word {
    ($($t:ty),*) => {$(
        impl Word for $t {
            fn bits(self) -> u64 {
                u64::from(self.to_bits_u32())
            }
            fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }
        }
    )*};
}
element_word!(f32, f16, bf16);

/// An out-of-place call's output (`want` at view offset `off`, sentinels around it) and its input
/// buffer, which must be unchanged (`x_host` uploaded as it is).
fn compare_out_of_place<T: FuzzElement>(
    k: &str,
    dev: &Device,
    (y, off, want): (&dropfuse::cudarc::driver::CudaSlice<T>, usize, &[T]),
    (x, x_host): (&dropfuse::cudarc::driver::CudaSlice<T>, &[T]),
    bad: &mut Vec<String>,
) -> dropfuse::Result<()> {
    compare(
        &format!("{k} output"),
        &dev.download(y)?,
        off,
        want,
        sentinel::<T>(),
        true,
        bad,
    );
    compare(
        &format!("{k} input (must be unchanged)"),
        &dev.download(x)?,
        0,
        x_host,
        x_host[0],
        false,
        bad,
    );
    Ok(())
}

/// Compares a whole buffer `got` with `want` at `off..off + want.len()` and `fill` everywhere
/// else; appends one line naming the first differing indices to `out` if anything differs. With
/// `nan_equal`, a NaN inside the view matches any NaN.
fn compare<W: Word>(
    what: &str,
    got: &[W],
    off: usize,
    want: &[W],
    fill: W,
    nan_equal: bool,
    out: &mut Vec<String>,
) {
    let mut count = 0usize;
    let mut shown = Vec::new();
    for (i, &g) in got.iter().enumerate() {
        let inside = i >= off && i - off < want.len();
        let w = if inside { want[i - off] } else { fill };
        if g.bits() == w.bits() || (inside && nan_equal && g.is_nan() && w.is_nan()) {
            continue;
        }
        count += 1;
        if shown.len() < SHOW {
            let place = if inside {
                format!("[{}]", i - off)
            } else {
                format!("guard[{}]", i as i64 - off as i64)
            };
            shown.push(format!("{place} got {:#x} want {:#x}", g.bits(), w.bits()));
        }
    }
    if got.len() < off + want.len() {
        out.push(format!(
            "{what}: buffer of {} holds no view of {} at {off}",
            got.len(),
            want.len()
        ));
    } else if count > 0 {
        out.push(format!("{what}: {count} differ: {}", shown.join(", ")));
    }
}

/// `off` fill values, `data`, then `GUARD` fill values.
fn padded<T: Copy>(off: usize, data: &[T], fill: T) -> Vec<T> {
    let mut v = vec![fill; off + data.len() + GUARD];
    v[off..off + data.len()].copy_from_slice(data);
    v
}

// ---------------------------------------------------------------- GPU ----

/// Runs `c` on the GPU and compares everything it wrote (and must not have written) with the
/// reference. Returns the differences (empty: the case passed).
fn gpu_case<T: FuzzElement>(dev: &Device, c: &Case) -> dropfuse::Result<Vec<String>> {
    let s = dev.stream();
    let (n, words) = (c.n, mask_words(c.n));
    let state = c.state();
    let drop = Dropout::new(c.p)?.with_element_offset(c.eo);
    let x: Vec<T> = values(n, c.data);
    let want_mask = reference::mask(c.p, state, c.eo, n)?;
    let want_y: Vec<T> = match c.kernel {
        Kernel::Mask => Vec::new(),
        Kernel::Forward
        | Kernel::ForwardMaskless
        | Kernel::ForwardInplace
        | Kernel::ForwardMasklessInplace => reference::forward(&x, c.p, state, c.eo)?.0,
        Kernel::Backward | Kernel::BackwardInplace => reference::backward_from_mask(&x, &want_mask, c.p)?,
        Kernel::BackwardMaskless | Kernel::BackwardMasklessInplace => {
            reference::backward(&x, c.p, state, c.eo)?
        }
        other => unreachable!("{} is not a dropout kernel", other.name()),
    };

    let x_host = padded(c.xo, &x, sentinel::<T>());
    let mask_in_host = padded(c.mo, &want_mask, MASK_SENTINEL);
    let mut xb = dev.upload(&x_host)?;
    let mb = dev.upload(&mask_in_host)?;
    let mut yb = dev.upload(&vec![sentinel::<T>(); c.yo + n + GUARD])?;
    let mut mout = dev.upload(&vec![MASK_SENTINEL; c.mo + words + GUARD])?;
    let (xr, yr, mr) = (c.xo..c.xo + n, c.yo..c.yo + n, c.mo..c.mo + words);

    match c.kernel {
        Kernel::Mask => drop.mask(s, state, n, &mut mout.slice_mut(mr))?,
        Kernel::Forward => drop.forward(
            s,
            state,
            &xb.slice(xr),
            &mut yb.slice_mut(yr),
            &mut mout.slice_mut(mr),
        )?,
        Kernel::ForwardMaskless => drop.forward_maskless(s, state, &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Kernel::ForwardInplace => {
            drop.forward_inplace(s, state, &mut xb.slice_mut(xr), &mut mout.slice_mut(mr))?
        }
        Kernel::ForwardMasklessInplace => drop.forward_maskless_inplace(s, state, &mut xb.slice_mut(xr))?,
        Kernel::Backward => drop.backward(s, &mb.slice(mr), &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Kernel::BackwardMaskless => drop.backward_maskless(s, state, &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Kernel::BackwardInplace => drop.backward_inplace(s, &mb.slice(mr), &mut xb.slice_mut(xr))?,
        Kernel::BackwardMasklessInplace => drop.backward_maskless_inplace(s, state, &mut xb.slice_mut(xr))?,
        other => unreachable!("{} is not a dropout kernel", other.name()),
    }
    dev.synchronize()?;

    let k = c.kernel.name();
    let mut bad = Vec::new();
    if c.kernel.writes_mask() {
        compare(
            &format!("{k} mask"),
            &dev.download(&mout)?,
            c.mo,
            &want_mask,
            MASK_SENTINEL,
            false,
            &mut bad,
        );
    }
    if c.kernel.reads_mask() {
        compare(
            &format!("{k} input mask (must be unchanged)"),
            &dev.download(&mb)?,
            0,
            &mask_in_host,
            0,
            false,
            &mut bad,
        );
    }
    if c.kernel.in_place() {
        compare(
            &format!("{k} data (in place)"),
            &dev.download(&xb)?,
            c.xo,
            &want_y,
            sentinel::<T>(),
            true,
            &mut bad,
        );
    } else if c.kernel != Kernel::Mask {
        compare_out_of_place(k, dev, (&yb, c.yo, &want_y), (&xb, &x_host), &mut bad)?;
    }
    Ok(bad)
}

/// Runs DropBlock case `c` (shape and configuration `b`) on the GPU and compares everything it
/// wrote (and must not have written) with the reference. Returns the differences.
fn gpu_block_case<T: FuzzElement>(dev: &Device, c: &Case, b: &BlockSpec) -> dropfuse::Result<Vec<String>> {
    let s = dev.stream();
    let shape = b.shape();
    let (n, words, counters) = (c.n, mask_words(c.n), stats_len(shape)?);
    let state = c.state();
    let cfg = b.cfg(c.p)?;
    // x, and dy for the backward kernels.
    let x: Vec<T> = values(n, c.data);
    let want = block_ref::forward(&cfg, shape, &x, state)?;
    let mut want_stats = want.counts.clone();
    want_stats.push(want.counts.iter().sum());
    let want_y: Vec<T> = match c.kernel {
        Kernel::DropBlockMask => Vec::new(),
        Kernel::DropBlockForward | Kernel::DropBlockForwardInplace => want.y.clone(),
        _ => block_ref::backward(shape, &x, &want.mask, &want.scales)?,
    };

    let x_host = padded(c.xo, &x, sentinel::<T>());
    let mask_in_host = padded(c.mo, &want.mask, MASK_SENTINEL);
    let stats_in_host = padded(b.so, &want_stats, STATS_SENTINEL);
    let mut xb = dev.upload(&x_host)?;
    let mb = dev.upload(&mask_in_host)?;
    let sb = dev.upload(&stats_in_host)?;
    let mut yb = dev.upload(&vec![sentinel::<T>(); c.yo + n + GUARD])?;
    let mut mout = dev.upload(&vec![MASK_SENTINEL; c.mo + words + GUARD])?;
    let mut sout = dev.upload(&vec![STATS_SENTINEL; b.so + counters + GUARD])?;
    let (xr, yr) = (c.xo..c.xo + n, c.yo..c.yo + n);
    let (mr, sr) = (c.mo..c.mo + words, b.so..b.so + counters);

    match c.kernel {
        Kernel::DropBlockMask => {
            cfg.mask(s, state, shape, &mut mout.slice_mut(mr), &mut sout.slice_mut(sr))?
        }
        Kernel::DropBlockForward => cfg.forward(
            s,
            state,
            shape,
            &xb.slice(xr),
            &mut yb.slice_mut(yr),
            &mut mout.slice_mut(mr),
            &mut sout.slice_mut(sr),
        )?,
        Kernel::DropBlockForwardInplace => cfg.forward_inplace(
            s,
            state,
            shape,
            &mut xb.slice_mut(xr),
            &mut mout.slice_mut(mr),
            &mut sout.slice_mut(sr),
        )?,
        Kernel::DropBlockBackward => cfg.backward(
            s,
            shape,
            &mb.slice(mr),
            &sb.slice(sr),
            &xb.slice(xr),
            &mut yb.slice_mut(yr),
        )?,
        Kernel::DropBlockBackwardInplace => {
            cfg.backward_inplace(s, shape, &mb.slice(mr), &sb.slice(sr), &mut xb.slice_mut(xr))?
        }
        other => unreachable!("{} is not a DropBlock kernel", other.name()),
    }
    dev.synchronize()?;

    let k = c.kernel.name();
    let mut bad = Vec::new();
    if c.kernel.writes_mask() {
        compare(
            &format!("{k} mask"),
            &dev.download(&mout)?,
            c.mo,
            &want.mask,
            MASK_SENTINEL,
            false,
            &mut bad,
        );
        compare(
            &format!("{k} stats (kept per sample, total)"),
            &dev.download(&sout)?,
            b.so,
            &want_stats,
            STATS_SENTINEL,
            false,
            &mut bad,
        );
    }
    if c.kernel.reads_mask() {
        compare(
            &format!("{k} input mask (must be unchanged)"),
            &dev.download(&mb)?,
            0,
            &mask_in_host,
            0,
            false,
            &mut bad,
        );
        compare(
            &format!("{k} input stats (must be unchanged)"),
            &dev.download(&sb)?,
            0,
            &stats_in_host,
            0,
            false,
            &mut bad,
        );
    }
    if c.kernel.in_place() {
        compare(
            &format!("{k} data (in place)"),
            &dev.download(&xb)?,
            c.xo,
            &want_y,
            sentinel::<T>(),
            true,
            &mut bad,
        );
    } else {
        // The mask kernel writes no data: its output buffer must still be all sentinel.
        compare_out_of_place(k, dev, (&yb, c.yo, &want_y), (&xb, &x_host), &mut bad)?;
    }
    Ok(bad)
}

// ---------------------------------------------------------------- CPU ----

/// Word `e & 3` of Philox block `e >> 2` of stream `state`: the mask contract, written out here
/// independently of `reference::philox::element_word`. Caches the last block.
fn contract_word(state: PhiloxState, e: u64, cache: &mut Option<(u64, [u32; 4])>) -> u32 {
    let block = e >> 2;
    let words = match *cache {
        Some((b, w)) if b == block => w,
        _ => {
            let counter = [
                block as u32,
                (block >> 32) as u32,
                state.offset as u32,
                (state.offset >> 32) as u32,
            ];
            let w = philox4x32_10(counter, [state.seed as u32, (state.seed >> 32) as u32]);
            *cache = Some((block, w));
            w
        }
    };
    words[(e & 3) as usize]
}

fn bit(mask: &[u32], i: usize) -> bool {
    (mask[i / 32] >> (i % 32)) & 1 == 1
}

/// Randomized self-checks of the CPU reference on case `c` (no GPU); returns the failures.
fn cpu_case<T: FuzzElement>(c: &Case) -> dropfuse::Result<Vec<String>> {
    let (n, p, eo, state) = (c.n, c.p, c.eo, c.state());
    let x: Vec<T> = values(n, c.data);
    let mut bad = Vec::new();

    // Threshold and scale: the contract's formulas, the reference and the safe API agree.
    let threshold = (p * TWO_POW_32).round() as u64;
    let scale = if p == 1.0 { 0.0 } else { (1.0 / (1.0 - p)) as f32 };
    let api = Dropout::new(p)?;
    if reference::drop_threshold(p)? != threshold || api.threshold() != threshold {
        bad.push(format!(
            "threshold: contract {threshold}, reference {}, Dropout {}",
            reference::drop_threshold(p)?,
            api.threshold()
        ));
    }
    if reference::keep_scale(p)?.to_bits() != scale.to_bits() || api.scale().to_bits() != scale.to_bits() {
        bad.push(format!(
            "scale: contract {scale}, reference {}, Dropout {}",
            reference::keep_scale(p)?,
            api.scale()
        ));
    }

    // The mask against the Philox contract, bit by bit; unused high bits 0.
    let mask = reference::mask(p, state, eo, n)?;
    let mut want_mask = vec![0u32; mask_words(n)];
    let mut cache = None;
    for i in 0..n {
        if u64::from(contract_word(state, eo + i as u64, &mut cache)) >= threshold {
            want_mask[i / 32] |= 1 << (i % 32);
        }
    }
    compare(
        "mask vs the Philox contract",
        &mask,
        0,
        &want_mask,
        0,
        false,
        &mut bad,
    );

    // Forward: its mask is mask(); y is kept ? round(x * scale) : +0, and apply_mask of that mask.
    let (y, fwd_mask) = reference::forward(&x, p, state, eo)?;
    compare(
        "forward's mask vs mask()",
        &fwd_mask,
        0,
        &mask,
        0,
        false,
        &mut bad,
    );
    let want_y: Vec<T> = (0..n)
        .map(|i| {
            if bit(&want_mask, i) {
                T::from_f32(x[i].to_f32() * scale)
            } else {
                T::from_bits(0)
            }
        })
        .collect();
    compare(
        "forward y vs kept ? x * scale : +0",
        &y,
        0,
        &want_y,
        sentinel::<T>(),
        true,
        &mut bad,
    );
    compare(
        "forward y vs apply_mask",
        &reference::apply_mask(&x, &mask, scale)?,
        0,
        &y,
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Backward from the mask == mask-free backward == forward's arithmetic on dy.
    let dx_mask = reference::backward_from_mask(&x, &fwd_mask, p)?;
    let dx_free = reference::backward(&x, p, state, eo)?;
    compare(
        "backward_from_mask vs backward (mask-free)",
        &dx_mask,
        0,
        &dx_free,
        sentinel::<T>(),
        true,
        &mut bad,
    );
    compare(
        "backward (mask-free) vs forward y",
        &dx_free,
        0,
        &y,
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Shards: split at k; each part with its element offset equals the matching part of the whole.
    let k = (c.data % n as u64) as usize;
    if k > 0 {
        let head = reference::mask(p, state, eo, k)?;
        let mut want: Vec<u32> = mask[..mask_words(k)].to_vec();
        if k % 32 != 0 {
            *want.last_mut().unwrap() &= (1u32 << (k % 32)) - 1;
        }
        compare(
            &format!("shard [0, {k}) mask"),
            &head,
            0,
            &want,
            0,
            false,
            &mut bad,
        );
    }
    let tail = reference::mask(p, state, eo + k as u64, n - k)?;
    let mut want_tail = vec![0u32; mask_words(n - k)];
    for i in 0..n - k {
        if bit(&mask, k + i) {
            want_tail[i / 32] |= 1 << (i % 32);
        }
    }
    compare(
        &format!("shard [{k}, {n}) mask"),
        &tail,
        0,
        &want_tail,
        0,
        false,
        &mut bad,
    );
    let (tail_y, _) = reference::forward(&x[k..], p, state, eo + k as u64)?;
    compare(
        &format!("shard [{k}, {n}) forward y"),
        &tail_y,
        0,
        &y[k..],
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Keep rate: within 8 sigma (+ 8) of n * (1 - threshold / 2^32); exact at the ends.
    let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
    let q = 1.0 - threshold as f64 / TWO_POW_32;
    let expected = n as f64 * q;
    let slack = 8.0 * (n as f64 * q * (1.0 - q)).sqrt() + 8.0;
    if (kept as f64 - expected).abs() > slack
        || (threshold == 0 && kept != n as u64)
        || (threshold == 1 << 32 && kept != 0)
    {
        bad.push(format!(
            "keep rate: {kept} of {n} kept, expected {expected:.1} +- {slack:.1}"
        ));
    }
    Ok(bad)
}

/// The fuzzer's own view of a DropBlock shape, from the contract in `dropfuse::drop_block` (not
/// from the reference): a 2D map `[H, W]` is the 3D map `[1, H, W]`.
struct BlockGrid {
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
    shared: bool,
    /// Mask planes: `N`, shared by the channels, or `N * C`.
    planes: usize,
}

impl BlockGrid {
    fn new(spec: &BlockSpec) -> BlockGrid {
        let shape = spec.shape();
        let dims = if shape.len() == 4 {
            [1, shape[2], shape[3]]
        } else {
            [shape[2], shape[3], shape[4]]
        };
        let b = dims.map(|d| spec.block_size.min(d));
        let v = [0, 1, 2].map(|a| dims[a] - b[a] + 1);
        BlockGrid {
            n: shape[0],
            c: shape[1],
            dims,
            b,
            v,
            spatial: dims.iter().product(),
            valid: v.iter().product(),
            shared: spec.shared,
            planes: if spec.shared {
                shape[0]
            } else {
                shape[0] * shape[1]
            },
        }
    }

    fn vol(&self) -> usize {
        self.b.iter().product()
    }

    /// `round(min(gamma, 1) * 2^32)` with `gamma = gamma_scale * p * spatial / (vol * valid)`.
    fn threshold(&self, gamma_scale: f64, p: f64) -> u64 {
        let gamma = gamma_scale * p * self.spatial as f64 / (self.vol() as f64 * self.valid as f64);
        (gamma.min(1.0) * TWO_POW_32).round() as u64
    }

    /// The probability that a seed is drawn (its word is below `threshold`).
    fn seed_probability(&self, threshold: u64) -> f64 {
        (threshold as f64 / TWO_POW_32).min(1.0)
    }

    /// Position `[d, h, w]` of unit `u` (row-major over the map).
    fn position(&self, u: usize) -> [usize; 3] {
        let (h, w) = (self.dims[1], self.dims[2]);
        [u / (h * w), u / w % h, u % w]
    }

    /// Per axis, the inclusive range of seed positions whose block covers coordinate `s`.
    fn seed_range(&self, a: usize, s: usize) -> (usize, usize) {
        ((s + 1).saturating_sub(self.b[a]), s.min(self.v[a] - 1))
    }

    /// The keep mask of the drawn seeds `seeds` (`planes * valid` flags): an element is dropped
    /// iff a drawn seed of its plane covers its unit, counted with a 3D prefix sum of the seeds.
    fn mask(&self, seeds: &[bool]) -> Vec<u32> {
        let [v0, v1, v2] = self.v;
        let at = |i: usize, j: usize, k: usize| (i * (v1 + 1) + j) * (v2 + 1) + k;
        let mut sum = vec![0i64; (v0 + 1) * (v1 + 1) * (v2 + 1)];
        let mut dropped = vec![false; self.planes * self.spatial];
        for q in 0..self.planes {
            for i in 0..v0 {
                for j in 0..v1 {
                    for k in 0..v2 {
                        let drawn = i64::from(seeds[q * self.valid + (i * v1 + j) * v2 + k]);
                        sum[at(i + 1, j + 1, k + 1)] = drawn
                            + sum[at(i, j + 1, k + 1)]
                            + sum[at(i + 1, j, k + 1)]
                            + sum[at(i + 1, j + 1, k)]
                            - sum[at(i, j, k + 1)]
                            - sum[at(i, j + 1, k)]
                            - sum[at(i + 1, j, k)]
                            + sum[at(i, j, k)];
                    }
                }
            }
            for u in 0..self.spatial {
                let s = self.position(u);
                let [(l0, h0), (l1, h1), (l2, h2)] = [0, 1, 2].map(|a| self.seed_range(a, s[a]));
                let (h0, h1, h2) = (h0 + 1, h1 + 1, h2 + 1);
                let in_window =
                    sum[at(h0, h1, h2)] - sum[at(l0, h1, h2)] - sum[at(h0, l1, h2)] - sum[at(h0, h1, l2)]
                        + sum[at(l0, l1, h2)]
                        + sum[at(l0, h1, l2)]
                        + sum[at(h0, l1, l2)]
                        - sum[at(l0, l1, l2)];
                dropped[q * self.spatial + u] = in_window > 0;
            }
        }
        let numel = self.n * self.c * self.spatial;
        let mut mask = vec![0u32; mask_words(numel)];
        for e in 0..numel {
            let (plane_nc, u) = (e / self.spatial, e % self.spatial);
            let q = if self.shared { plane_nc / self.c } else { plane_nc };
            if !dropped[q * self.spatial + u] {
                mask[e / 32] |= 1 << (e % 32);
            }
        }
        mask
    }

    /// The expected number of kept elements when each seed is drawn with probability `q`, and a
    /// deviation from it that is exceeded with probability below 1e-12 (see [`tail_bound`]): one
    /// seed changes at most a block volume of units, in `C` channels when they share the mask.
    fn expected_kept(&self, q: f64) -> (f64, f64) {
        let mut mean = 0.0;
        for u in 0..self.spatial {
            let s = self.position(u);
            let cover: usize = (0..3)
                .map(|a| {
                    let (lo, hi) = self.seed_range(a, s[a]);
                    hi - lo + 1
                })
                .product();
            mean += (1.0 - q).powi(cover as i32);
        }
        let reach = (self.vol() * if self.shared { self.c } else { 1 }) as f64;
        let seeds = self.planes as f64 * self.valid as f64;
        ((self.n * self.c) as f64 * mean, tail_bound(seeds, q, reach))
    }
}

/// A deviation `t` with `P(|f - E f| >= t) < 1e-12` for a function `f` of `m` independent seeds,
/// each drawn with probability `q` and changing `f` by at most `c`: Freedman's inequality for the
/// Doob martingale of `f` (increments at most `c`, conditional variances at most `q (1 - q) c^2`):
/// `P(|f - E f| >= t) <= 2 exp(-t^2 / (2 (V + c t / 3)))` with `V = m q (1 - q) c^2`. A
/// Chebyshev-style "k sigma" bound is not enough: with a single rare seed deciding a whole small
/// map it is exceeded far too often over millions of cases.
fn tail_bound(m: f64, q: f64, c: f64) -> f64 {
    let l = (2.0 / 1e-12f64).ln();
    let v = m * q * (1.0 - q) * c * c;
    let a = c * l / 3.0;
    a + (a * a + 2.0 * l * v).sqrt()
}

/// What the reference says about one DropBlock case: the input of [`check_block`] (the tests
/// break it on purpose to show the checks catch it).
#[derive(Debug, Clone)]
struct BlockOutputs<T> {
    threshold: u64,
    seeds: Vec<bool>,
    /// `reference::drop_block::mask`.
    mask: Vec<u32>,
    fwd: block_ref::Forward<T>,
    /// `reference::drop_block::backward` with `dy = x` from the forward's mask and scales.
    dx: Vec<T>,
}

impl<T: Element> BlockOutputs<T> {
    fn of(cfg: &DropBlock, shape: &[usize], x: &[T], state: PhiloxState) -> dropfuse::Result<Self> {
        let fwd = block_ref::forward(cfg, shape, x, state)?;
        let dx = block_ref::backward(shape, x, &fwd.mask, &fwd.scales)?;
        Ok(BlockOutputs {
            threshold: block_ref::seed_threshold(cfg, &shape[2..]),
            seeds: block_ref::seeds(cfg, shape, state)?,
            mask: block_ref::mask(cfg, shape, state)?,
            fwd,
            dx,
        })
    }
}

/// Checks the reference's outputs `r` for DropBlock case `c` (spec `b`, input `x`) against the
/// contract re-derived here; returns the failures.
fn check_block<T: FuzzElement>(c: &Case, b: &BlockSpec, x: &[T], r: &BlockOutputs<T>) -> Vec<String> {
    let g = BlockGrid::new(b);
    let numel = c.n;
    let state = c.state();
    let mut bad = Vec::new();

    // Seed threshold: the contract's formula.
    let threshold = g.threshold(b.gamma_scale, c.p);
    if r.threshold != threshold {
        bad.push(format!(
            "seed threshold: contract {threshold}, reference {}",
            r.threshold
        ));
    }

    // Seeds: seed i is drawn iff its Philox word (re-derived here) is below the threshold.
    let mut cache = None;
    let seeds: Vec<bool> = (0..g.planes * g.valid)
        .map(|i| u64::from(contract_word(state, i as u64, &mut cache)) < threshold)
        .collect();
    if r.seeds.len() != seeds.len() {
        bad.push(format!(
            "seeds: {} flags, want planes * valid = {}",
            r.seeds.len(),
            seeds.len()
        ));
    } else if let Some(i) = (0..seeds.len()).find(|&i| r.seeds[i] != seeds[i]) {
        let differ = (0..seeds.len()).filter(|&i| r.seeds[i] != seeds[i]).count();
        bad.push(format!(
            "seeds vs the Philox contract: {differ} differ, first [{i}] got {} want {}",
            r.seeds[i], seeds[i]
        ));
    }

    // Blocks: dropped iff covered by a drawn seed of the plane.
    let want_mask = g.mask(&seeds);
    compare(
        "mask() vs blocks of the contract's seeds",
        &r.mask,
        0,
        &want_mask,
        0,
        false,
        &mut bad,
    );
    compare(
        "forward's mask vs blocks of the contract's seeds",
        &r.fwd.mask,
        0,
        &want_mask,
        0,
        false,
        &mut bad,
    );

    // Counts per sample and the scales of the normalisation.
    let per_sample = numel / g.n;
    let counts: Vec<u64> = (0..g.n)
        .map(|s| {
            (s * per_sample..(s + 1) * per_sample)
                .filter(|&e| bit(&want_mask, e))
                .count() as u64
        })
        .collect();
    compare("counts", &r.fwd.counts, 0, &counts, 0, false, &mut bad);
    let total: u64 = counts.iter().sum();
    let ratio = |num: usize, kept: u64| {
        if kept == 0 {
            0.0
        } else {
            (num as f64 / kept as f64) as f32
        }
    };
    let scales: Vec<f32> = match b.normalize {
        Normalize::Global => vec![ratio(numel, total); g.n],
        Normalize::PerSample => counts.iter().map(|&k| ratio(per_sample, k)).collect(),
        Normalize::Off => vec![1.0; g.n],
    };
    compare("scales", &r.fwd.scales, 0, &scales, -1.0, false, &mut bad);

    // Forward and backward (dy = x): kept ? round(v * scale_n) : +0.
    let want_y: Vec<T> = (0..numel)
        .map(|e| {
            if bit(&want_mask, e) {
                T::from_f32(x[e].to_f32() * scales[e / per_sample])
            } else {
                T::from_bits(0)
            }
        })
        .collect();
    compare(
        "forward y vs kept ? x * scale : +0",
        &r.fwd.y,
        0,
        &want_y,
        sentinel::<T>(),
        true,
        &mut bad,
    );
    compare(
        "backward dx vs kept ? dy * scale : +0",
        &r.dx,
        0,
        &want_y,
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Keep rate: within a 1e-12 tail bound (+ 1) of the exact expectation; exact at the ends.
    let kept: u64 = r.mask.iter().map(|w| u64::from(w.count_ones())).sum();
    let q = g.seed_probability(threshold);
    let (expected, bound) = g.expected_kept(q);
    let slack = bound + 1.0;
    if (kept as f64 - expected).abs() > slack
        || (threshold == 0 && kept != numel as u64)
        || (threshold >= 1 << 32 && kept != 0)
    {
        bad.push(format!(
            "keep rate: {kept} of {numel} kept, expected {expected:.1} +- {slack:.1}"
        ));
    }
    bad
}

/// Self-checks of the DropBlock reference on case `c` (no GPU); returns the failures.
fn cpu_block_case<T: FuzzElement>(c: &Case, b: &BlockSpec) -> dropfuse::Result<Vec<String>> {
    let x: Vec<T> = values(c.n, c.data);
    let r = BlockOutputs::of(&b.cfg(c.p)?, b.shape(), &x, c.state())?;
    Ok(check_block(c, b, &x, &r))
}

// --------------------------------------------------------------- run ----

enum Backend {
    Gpu(Device),
    Cpu,
}

fn run_case(backend: &Backend, c: &Case) -> dropfuse::Result<Vec<String>> {
    match (backend, c.dtype) {
        (Backend::Gpu(dev), DType::F32) => run_on::<f32>(Some(dev), c),
        (Backend::Gpu(dev), DType::F16) => run_on::<f16>(Some(dev), c),
        (Backend::Gpu(dev), DType::BF16) => run_on::<bf16>(Some(dev), c),
        (Backend::Cpu, DType::F32) => run_on::<f32>(None, c),
        (Backend::Cpu, DType::F16) => run_on::<f16>(None, c),
        (Backend::Cpu, DType::BF16) => run_on::<bf16>(None, c),
    }
}

/// Case `c` for element type `T`: on the GPU `dev`, or the reference self-checks without one.
fn run_on<T: FuzzElement>(dev: Option<&Device>, c: &Case) -> dropfuse::Result<Vec<String>> {
    match (dev, &c.spec, c.kernel) {
        (Some(dev), Spec::Dropout, _) => gpu_case::<T>(dev, c),
        (Some(dev), Spec::Block(b), _) => gpu_block_case::<T>(dev, c, b),
        (None, Spec::Dropout, _) => cpu_case::<T>(c),
        (None, Spec::Block(b), _) => cpu_block_case::<T>(c, b),
        (dev, Spec::Routing(s), Kernel::Routing(op)) => routing::run::<T>(dev, c, op, s),
        (dev, Spec::Skip(s), Kernel::Skip(op)) => skip::run::<T>(dev, c, op, s),
        (dev, Spec::MultiSample(s), Kernel::MultiSample(op)) => multi_sample::run::<T>(dev, c, op, s),
        (dev, Spec::Structured(s), Kernel::Structured(op)) => structured::run::<T>(dev, c, op, s),
        (dev, Spec::McDropout(s), Kernel::McDropout(op)) => mc_dropout::run::<T>(dev, c, op, s),
        (dev, Spec::Bdr(s), Kernel::Bdr(op)) => bias_dropout_residual::run::<T>(dev, c, op, s),
        (dev, Spec::Importance(s), Kernel::Importance(op)) => importance::run::<T>(dev, c, op, s),
        (dev, Spec::Head(s), Kernel::Head(op)) => head::run::<T>(dev, c, op, s),
        (dev, Spec::Graph(s), Kernel::Graph(op)) => graph::run::<T>(dev, c, op, s),
        _ => unreachable!("the spec of case {c} is not its kernel's family"),
    }
}

/// Runs the fuzzer as `cfg` says, printing mismatches as they are found and the summary line at
/// the end. `Err` only when the GPU cannot be queried; mismatches are in the summary.
fn run(cfg: &Config) -> Result<Summary, BoxError> {
    let start = Instant::now();
    let backend = match Device::new(0) {
        Ok(dev) => {
            let (major, minor) = dev.compute_capability()?;
            println!(
                "fuzz: GPU 0: {} (sm_{major}{minor}); comparing every kernel with the CPU reference",
                dev.name()?
            );
            Backend::Gpu(dev)
        }
        Err(e) => {
            println!("fuzz: no CUDA device ({e}).");
            println!("fuzz: running CPU-reference self-checks instead (no GPU kernel is tested).");
            Backend::Cpu
        }
    };
    // The multi-sample head needs cuBLAS: on a GPU without it, its cases are skipped (and counted).
    let head_skip = match &backend {
        Backend::Gpu(_) => dropfuse::multi_sample::check_cublas()
            .err()
            .map(|e| e.to_string()),
        Backend::Cpu => None,
    };
    if let Some(why) = &head_skip {
        println!("fuzz: SKIPPED: multi_sample_head cases ({why})");
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (mut cases, mut mismatches, mut skipped, mut drawn) = (0u64, 0u64, 0u64, 0u64);
    let mut next_progress = Duration::from_secs(10);
    match &cfg.case {
        Some(c) => println!("fuzz: rerunning one case: {c}"),
        None => println!(
            "fuzz: seed={} seconds={} max_n={} (rerun the same cases with --seed {})",
            cfg.seed, cfg.seconds, cfg.max_n, cfg.seed
        ),
    }
    let limit = Duration::from_secs_f64(cfg.seconds);
    loop {
        let case = match &cfg.case {
            Some(c) if drawn == 0 => *c,
            Some(_) => break,
            None if start.elapsed() >= limit => break,
            None => draw_case(&mut rng, cfg.max_n),
        };
        drawn += 1;
        if head_skip.is_some() && matches!(case.kernel, Kernel::Head(_)) {
            skipped += 1;
            continue;
        }
        cases += 1;
        let (failures, fatal) = match run_case(&backend, &case) {
            Ok(f) => (f, false),
            Err(e) => {
                let fatal = matches!(e, Error::Cuda { .. });
                (vec![format!("call failed: {e}")], fatal)
            }
        };
        if !failures.is_empty() {
            mismatches += 1;
            println!("MISMATCH --case {case}");
            for f in &failures {
                println!("  {f}");
            }
        }
        if fatal {
            println!("fuzz: stopping after a CUDA error (the context may be unusable)");
            break;
        }
        if cfg.case.is_none() && start.elapsed() >= next_progress {
            println!(
                "fuzz: {:.0} s, {cases} cases, {mismatches} mismatches",
                start.elapsed().as_secs_f64()
            );
            next_progress += Duration::from_secs(10);
        }
    }
    let summary = Summary {
        cases,
        mismatches,
        seconds: start.elapsed().as_secs_f64(),
        seed: cfg.seed,
        gpu: matches!(backend, Backend::Gpu(_)),
        skipped,
    };
    if skipped > 0 {
        println!("fuzz: SKIPPED: {skipped} multi_sample_head cases (no cuBLAS)");
    }
    println!("{summary}");
    Ok(summary)
}

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fuzz: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(s) if s.mismatches == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fuzz: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// The real entry for 2 seconds at small sizes: GPU cases with a GPU, else the CPU-reference
    /// self-checks. No mismatch allowed.
    #[test]
    fn fuzz_two_seconds_without_mismatch() {
        let cfg = Config {
            seconds: 2.0,
            seed: 20261128,
            max_n: 1 << 12,
            case: None,
        };
        let s = run(&cfg).expect("fuzz run");
        assert!(s.cases > 0, "no case ran: {s}");
        assert_eq!(s.mismatches, 0, "{s}");
        assert_eq!(s.seed, cfg.seed);
    }

    /// `--case` reruns exactly one case, here one at the edge of everything.
    #[test]
    fn one_case_reruns() {
        let case = format!(
            "dtype=f16,kernel=backward_inplace,n=37,p=0.5,seed={m},offset={m},eo={},xo=7,yo=3,mo=3,data=5",
            u64::MAX - 37,
            m = u64::MAX
        );
        let cfg = parse_args(args(&format!("--case {case}"))).unwrap().unwrap();
        let s = run(&cfg).expect("fuzz run");
        assert_eq!((s.cases, s.mismatches), (1, 0), "{s}");
    }

    /// `--case` reruns a DropBlock case: 3D, map depth below the block, rows of 33 units, shared
    /// channels, the extreme Philox stream, every view offset misaligned.
    #[test]
    fn one_drop_block_case_reruns() {
        let case = format!(
            "dtype=bf16,kernel=drop_block_backward_inplace,shape=2x3x4x33x5,block=6,p=0.999,gamma=2.5,\
             shared=true,norm=per_sample,seed={m},offset={m},xo=7,yo=3,mo=3,so=2,data=5",
            m = u64::MAX
        );
        let cfg = parse_args(args(&format!("--case {case}"))).unwrap().unwrap();
        let c = cfg.case.unwrap();
        assert_eq!(
            (c.n, c.eo, c.block().unwrap().shape()),
            (2 * 3 * 4 * 33 * 5, 0, &[2, 3, 4, 33, 5][..])
        );
        assert_eq!(c.to_string(), case);
        let s = run(&cfg).expect("fuzz run");
        assert_eq!((s.cases, s.mismatches), (1, 0), "{s}");
    }

    #[test]
    fn case_strings_round_trip() {
        let mut rng = StdRng::seed_from_u64(1);
        // Cases per family: dropout, DropBlock, routing, skip, multi-sample, structured, MC dropout,
        // bias + dropout + residual, importance, head, graph-safe randomness.
        let mut families = [0usize; 11];
        let mut kernels = std::collections::HashSet::new();
        for _ in 0..5000 {
            let c = draw_case(&mut rng, 1 << 20);
            assert!((1..=1 << 20).contains(&c.n), "{c}");
            assert!(c.eo.checked_add(c.n as u64).is_some(), "{c}");
            assert_eq!(c.block().is_some(), c.kernel.is_drop_block(), "{c}");
            kernels.insert(c.kernel.name());
            families[match (&c.spec, c.kernel) {
                (Spec::Dropout, k) => {
                    assert!(Kernel::DROPOUT.contains(&k), "{c}");
                    0
                }
                (Spec::Block(_), _) => 1,
                (Spec::Routing(_), Kernel::Routing(_)) => 2,
                (Spec::Skip(_), Kernel::Skip(_)) => 3,
                (Spec::MultiSample(_), Kernel::MultiSample(_)) => 4,
                (Spec::Structured(_), Kernel::Structured(_)) => 5,
                (Spec::McDropout(_), Kernel::McDropout(_)) => 6,
                (Spec::Bdr(_), Kernel::Bdr(_)) => 7,
                (Spec::Importance(_), Kernel::Importance(_)) => 8,
                (Spec::Head(_), Kernel::Head(_)) => 9,
                (Spec::Graph(_), Kernel::Graph(_)) => 10,
                _ => panic!("spec and kernel of different families: {c}"),
            }] += 1;
            if let Some(b) = c.block() {
                assert_eq!((c.n, c.eo), (b.numel(), 0), "{c}");
                assert!(c.n <= BLOCK_MEDIUM_N && (1..=9).contains(&b.block_size), "{c}");
                assert!(
                    smem_need(b.shape(), b.block_size) <= u64::from(DROPFUSE_DROP_BLOCK_SMEM),
                    "{c}"
                );
                b.cfg(c.p).unwrap_or_else(|e| panic!("{c}: {e}"));
            }
            let back: Case = c.to_string().parse().unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(back, c);
            assert_eq!(back.p.to_bits(), c.p.to_bits());
        }
        // 4 in 24 for dropout, 2 in 24 for each other family: about 833 and 417.
        assert!(
            families[0] > 700 && families[1..].iter().all(|&f| f > 330),
            "{families:?}"
        );
        assert_eq!(kernels.len(), Kernel::all().count(), "every kernel drawn");
        // Small limits hold for DropBlock shapes too.
        for _ in 0..500 {
            let c = draw_case(&mut rng, 40);
            assert!((1..=40).contains(&c.n), "{c}");
        }
    }

    /// DropBlock case strings: every key of the family exactly once, none of the other family's,
    /// valid values.
    #[test]
    fn bad_drop_block_cases_are_rejected() {
        let ok = "dtype=f32,kernel=drop_block_mask,shape=1x1x1x1,block=1,p=0,gamma=1,shared=false,\
                  norm=global,seed=0,offset=0,xo=0,yo=0,mo=0,so=0,data=0";
        let c: Case = ok.parse().unwrap();
        assert_eq!((c.n, c.block().unwrap().rank), (1, 4));
        for (from, to) in [
            ("shape=1x1x1x1", "shape=1x1x1"),
            ("shape=1x1x1x1", "shape=1x1x1x1x1x1"),
            ("shape=1x1x1x1", "shape=1x0x1x1"),
            ("shape=1x1x1x1", "shape=1x1x1xa"),
            ("block=1", "block=0"),
            ("gamma=1", "gamma=-1"),
            ("gamma=1", "gamma=inf"),
            ("shared=false", "shared=2"),
            ("norm=global", "norm=batch"),
            ("p=0", "p=1.01"),
            ("so=0", "so=2000"),
            ("so=0,", ""),
            ("data=0", "data=0,n=1"),
            ("data=0", "data=0,eo=0"),
            ("kernel=drop_block_mask", "kernel=drop_block"),
        ] {
            let bad = ok.replacen(from, to, 1);
            assert_ne!(bad, ok);
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
        // Dropout kernels take none of the DropBlock keys.
        let dropout = "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0";
        for extra in [
            "shape=1x1x1x1",
            "block=1",
            "gamma=1",
            "shared=true",
            "norm=off",
            "so=0",
        ] {
            let bad = format!("{dropout},{extra}");
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
    }

    /// The DropBlock self-check passes the reference and catches deliberately broken variants of
    /// it: wrong seeds, blocks shifted or one unit short, channels shared or not as asked, another
    /// Philox stream, wrong counts, scales, outputs or gradients, another normalisation.
    #[test]
    fn drop_block_self_check_catches_a_broken_reference() {
        let c: Case = "dtype=f32,kernel=drop_block_forward,shape=2x3x9x10,block=3,p=0.5,gamma=1.0,\
                       shared=false,norm=per_sample,seed=7,offset=1,xo=0,yo=0,mo=0,so=0,data=3"
            .parse()
            .unwrap();
        let b = *c.block().unwrap();
        let x: Vec<f32> = values(c.n, c.data);
        let with = |spec: BlockSpec, state: PhiloxState| {
            BlockOutputs::of(&spec.cfg(c.p).unwrap(), spec.shape(), &x, state).unwrap()
        };
        let good = with(b, c.state());
        assert_eq!(check_block(&c, &b, &x, &good), Vec::<String>::new());
        // Every sample has dropped and kept units, so every variant below changes something.
        let per_sample = (c.n / 2) as u64;
        assert!(
            good.fwd.counts.iter().all(|&k| 0 < k && k < per_sample),
            "{:?}",
            good.fwd.counts
        );

        let mut broken: Vec<(&str, BlockOutputs<f32>)> = vec![
            (
                "blocks one unit short",
                with(BlockSpec { block_size: 2, ..b }, c.state()),
            ),
            (
                "channels shared",
                with(BlockSpec { shared: true, ..b }, c.state()),
            ),
            (
                "global normalisation",
                with(
                    BlockSpec {
                        normalize: Normalize::Global,
                        ..b
                    },
                    c.state(),
                ),
            ),
            (
                "next Philox offset",
                with(b, PhiloxState::new(c.seed, c.offset + 1)),
            ),
        ];
        let mut v = good.clone();
        let first = v.seeds.iter().position(|&s| s).unwrap();
        v.seeds[first] = false;
        broken.push(("a drawn seed missing", v));
        // Every block one unit to the right: unit w takes the keep bit of unit w - 1.
        let mut v = good.clone();
        let w = 10;
        let mut shifted = vec![0u32; v.mask.len()];
        for e in 0..c.n {
            if e % w == 0 || bit(&v.mask, e - 1) {
                shifted[e / 32] |= 1 << (e % 32);
            }
        }
        v.mask = shifted.clone();
        v.fwd.mask = shifted;
        broken.push(("blocks shifted by one unit", v));
        let mut v = good.clone();
        v.fwd.mask[0] ^= 1 << 5;
        broken.push(("a forward mask bit flipped", v));
        let mut v = good.clone();
        v.fwd.counts[1] += 1;
        broken.push(("a count off by one", v));
        let mut v = good.clone();
        v.fwd.scales[0] = f32::from_bits(v.fwd.scales[0].to_bits() + 1);
        broken.push(("a scale one ulp off", v));
        let mut v = good.clone();
        let kept = (0..c.n)
            .find(|&e| bit(&v.mask, e) && v.fwd.y[e].is_finite())
            .unwrap();
        v.fwd.y[kept] = f32::from_bits(v.fwd.y[kept].to_bits() ^ 1);
        broken.push(("a kept output one ulp off", v));
        let mut v = good.clone();
        let dropped = (0..c.n).find(|&e| !bit(&v.mask, e)).unwrap();
        v.dx[dropped] = -0.0;
        broken.push(("a dropped gradient -0", v));

        for (what, r) in &broken {
            let failures = check_block(&c, &b, &x, r);
            assert!(!failures.is_empty(), "not caught: {what}");
        }
    }

    /// One case string of every later family's kernels reruns (on the GPU, or the CPU
    /// self-checks) without a mismatch and prints back the same string.
    #[test]
    fn family_cases_rerun() {
        let m = u64::MAX;
        for case in [
            "dtype=bf16,kernel=routing_top_k,shape=3x37,sel=tokens:40,pad=lengths,scores=ties,cap=-1,xo=3,yo=1,data=5"
                .to_string(),
            "dtype=f32,kernel=routing_global,shape=2x50,sel=global:0.3,pad=mask,scores=special,cap=bound,xo=0,yo=7,data=9"
                .to_string(),
            "dtype=f16,kernel=routing_scatter_add_backward,shape=2x33x40,sel=fraction:0.5,pad=all,scores=random,\
             src=select,cap=1,rows=-1,xo=1,yo=2,data=3"
                .to_string(),
            "dtype=f32,kernel=routing_gather_backward,shape=3x9x8,sel=tokens:4,pad=none,scores=equal,src=upload,\
             cap=0,rows=2,xo=0,yo=0,data=4"
                .to_string(),
            "dtype=bf16,kernel=stochastic_depth_backward,shape=5x24,bias=6,keep=random,mode=batch_device,scale=1.3333334,\
             xo=1,yo=2,co=3,data=6"
                .to_string(),
            "dtype=f16,kernel=scatter_samples,shape=7x13,keep=random,cap=-2,xo=5,yo=3,co=1,data=7".to_string(),
            "dtype=f32,kernel=sample_slots,shape=4100x1,keep=random,data=8".to_string(),
            format!(
                "dtype=bf16,kernel=multi_sample_reduce,n=37,k=5,p=0.5,seed={m},offset={m},out=f16,xo=1,yo=2,mo=3,data=9"
            ),
            "dtype=f16,kernel=multi_sample_mean,n=9,k=3,out=f32,xo=1,yo=0,data=10".to_string(),
            "dtype=f32,kernel=weighted_ce,shape=3x5x7,eps=0.1,labels=bad,ii=0,weights=random,gap=0,out=f32,xo=2,yo=1,\
             data=11"
                .to_string(),
            "dtype=bf16,kernel=weighted_ce_loss,shape=2x4x1,eps=1.0,labels=some,ii=-100,weights=uniform,gap=9,xo=0,\
             data=12"
                .to_string(),
            // Confidently classified rows (the label's gradient is -(1 - p_y), tiny).
            "dtype=f32,kernel=weighted_ce,shape=2x6x37,eps=0.0,labels=all,ii=-100,weights=random,gap=20,out=f32,xo=1,\
             yo=3,data=13"
                .to_string(),
            "dtype=bf16,kernel=weighted_ce,shape=3x4x64,eps=0.1,labels=some,ii=-100,weights=uniform,gap=14,out=f32,\
             xo=0,yo=0,data=14"
                .to_string(),
        ] {
            let cfg = parse_args(args(&format!("--case {case}"))).unwrap_or_else(|e| panic!("{case}: {e}")).unwrap();
            assert_eq!(cfg.case.unwrap().to_string(), case);
            let s = run(&cfg).expect("fuzz run");
            assert_eq!((s.cases, s.mismatches), (1, 0), "{case}: {s}");
        }
    }

    /// The later families' case strings: each kernel's keys exactly, valid values.
    #[test]
    fn bad_family_cases_are_rejected() {
        let routing =
            "dtype=f32,kernel=routing_gather,shape=2x3x4,sel=tokens:2,pad=all,scores=ties,src=select,cap=0,\
                       rows=0,xo=0,yo=0,data=0";
        let skip = "dtype=f32,kernel=stochastic_depth,shape=2x6,bias=3,keep=all,mode=batch,scale=1.0,xo=0,yo=0,co=0,\
                    data=0";
        let multi =
            "dtype=f16,kernel=weighted_ce,shape=2x3x4,eps=0.0,labels=all,ii=-100,weights=uniform,gap=0,out=f16,\
                     xo=0,yo=0,data=0";
        for ok in [routing, skip, multi] {
            let c: Case = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(c.to_string(), ok);
        }
        for (ok, from, to) in [
            (routing, "shape=2x3x4", "shape=2x3"),
            (routing, "sel=tokens:2", "sel=global:1.5"),
            (routing, "sel=tokens:2", "sel=top:2"),
            (routing, "pad=all", "pad=some"),
            (routing, "src=select", "src=gpu"),
            (routing, "cap=0", "cap=many"),
            (routing, "rows=0,", ""),
            (routing, "data=0", "data=0,p=0.5"),
            (routing, "kernel=routing_gather", "kernel=routing_top_k"),
            (skip, "bias=3", "bias=4"),
            (skip, "scale=1.0", "scale=-1.0"),
            (skip, "scale=1.0", "scale=inf"),
            (skip, "mode=batch", "mode=all"),
            (skip, "keep=all", "keep=half"),
            (skip, "data=0", "data=0,cap=1"),
            (skip, "kernel=stochastic_depth", "kernel=sample_slots"),
            (multi, "out=f16", "out=bf16"),
            (multi, "shape=2x3x4", "shape=0x3x4"),
            (multi, "shape=2x3x4", "shape=129x3x4"),
            (multi, "eps=0.0", "eps=1.5"),
            (multi, "labels=all", "labels=none"),
            (multi, "weights=uniform", "weights=equal"),
            (multi, "gap=0", "gap=31"),
            (multi, "gap=0", "gap=-1"),
            (multi, "data=0", "data=0,n=4"),
        ] {
            let bad = ok.replacen(from, to, 1);
            assert_ne!(bad, ok);
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
        for bad in [
            "dtype=f32,kernel=multi_sample_copies,n=4,k=0,p=0.5,seed=0,offset=0,xo=0,yo=0,data=0",
            "dtype=f32,kernel=multi_sample_copies,n=4,k=129,p=0.5,seed=0,offset=0,xo=0,yo=0,data=0",
            "dtype=f32,kernel=multi_sample_copies,n=0,k=1,p=0.5,seed=0,offset=0,xo=0,yo=0,data=0",
            "dtype=f32,kernel=multi_sample_copies,n=4,k=1,p=1.5,seed=0,offset=0,xo=0,yo=0,data=0",
            "dtype=f32,kernel=multi_sample_copies,n=4,k=1,p=0.5,seed=0,offset=0,xo=0,yo=0,mo=0,data=0",
            "dtype=bf16,kernel=multi_sample_mean,n=4,k=2,out=f16,xo=0,yo=0,data=0",
        ] {
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
    }

    /// The routing self-check catches broken selections: a worse token selected instead of a
    /// better one, one token too many or too few, a padding token, indices out of order, offsets
    /// that do not add up, a wrong threshold.
    #[test]
    fn routing_self_check_catches_a_broken_selection() {
        use checks::routing::{check_routing, ranks_before, Select};
        use dropfuse::reference::skip::{route_global, route_top_k, Capacity, ValidTokens};

        // NaN below -inf, -0 == +0, ties to the lower index.
        assert!(ranks_before(f32::NEG_INFINITY, 5, f32::NAN, 0));
        assert!(!ranks_before(f32::NAN, 0, f32::NEG_INFINITY, 5));
        assert!(ranks_before(-0.0, 1, 0.0, 2) && !ranks_before(0.0, 2, -0.0, 1));
        assert!(ranks_before(f32::NAN, 1, -f32::NAN, 2));
        assert!(ranks_before(2.0, 9, 1.0, 0));

        let scores = [0.5f32, 3.0, -1.0, 3.0, 0.0, 2.0, f32::NAN, 1.0, 7.0, -2.0];
        let lens = [4usize, 5];
        let valid = ValidTokens::Lengths(&lens);
        let top = Select::TopK(Capacity::Tokens(2));
        let r = route_top_k(&scores, 5, valid, Capacity::Tokens(2)).unwrap();
        // Sequence 0: tokens 1 and 3 (3.0, 3.0); sequence 1: tokens 3 and 0 (7.0, 2.0).
        assert_eq!(
            (r.offsets(), r.indices()),
            (&[0u32, 2, 4][..], &[1u32, 3, 0, 3][..])
        );
        let failures = |select, offsets: &[u32], indices: &[u32], threshold| {
            let mut c = checks::Checks::new();
            check_routing(&mut c, &scores, 5, valid, select, (offsets, indices), threshold);
            c.failures()
        };
        assert_eq!(
            failures(top, r.offsets(), r.indices(), None),
            Vec::<String>::new()
        );
        let broken: [(&str, &[u32], &[u32]); 7] = [
            ("a worse token in sequence 0", &[0, 2, 4], &[0, 1, 0, 3]),
            ("a worse token in sequence 1", &[0, 2, 4], &[1, 3, 3, 4]),
            ("a padding token", &[0, 2, 4], &[1, 4, 0, 3]),
            ("indices out of order", &[0, 2, 4], &[3, 1, 0, 3]),
            ("one too few", &[0, 1, 3], &[1, 0, 3]),
            ("one too many", &[0, 3, 5], &[1, 2, 3, 0, 3]),
            ("offsets past the indices", &[0, 2, 5], &[1, 3, 0, 3]),
        ];
        for (what, offsets, indices) in broken {
            assert!(
                !failures(top, offsets, indices, None).is_empty(),
                "not caught: {what}"
            );
        }
        // Equal scores go to the lower index: sequence 0 with k = 1 selects token 1, not 3.
        let one = Select::TopK(Capacity::Tokens(1));
        let r1 = route_top_k(&scores, 5, valid, Capacity::Tokens(1)).unwrap();
        assert_eq!(r1.indices(), &[1, 3]);
        assert_eq!(
            failures(one, r1.offsets(), r1.indices(), None),
            Vec::<String>::new()
        );
        assert!(
            !failures(one, &[0, 1, 2], &[3, 3], None).is_empty(),
            "not caught: the tie to the higher index"
        );

        let mask = [true, true, false, true, true, true, true, true, false, true];
        let valid = ValidTokens::Mask(&mask);
        let (g, threshold) = route_global(&scores, 5, valid, 0.5).unwrap();
        let global = Select::Global(0.5);
        let gfail = |offsets: &[u32], indices: &[u32], threshold| {
            let mut c = checks::Checks::new();
            check_routing(&mut c, &scores, 5, valid, global, (offsets, indices), threshold);
            c.failures()
        };
        assert_eq!(gfail(g.offsets(), g.indices(), threshold), Vec::<String>::new());
        assert!(
            !gfail(g.offsets(), g.indices(), Some(0.25)).is_empty(),
            "a wrong threshold"
        );
        assert!(!gfail(g.offsets(), g.indices(), None).is_empty(), "no threshold");
        // The same count, one selected token swapped for a worse real one.
        let mut worse = g.indices().to_vec();
        let (b, _) = (0..2)
            .map(|b| (b, g.offsets()[b]))
            .find(|&(b, o)| g.offsets()[b + 1] > o)
            .unwrap();
        let lo = g.offsets()[b] as usize;
        let unselected = (0..5u32)
            .find(|t| mask[b * 5 + *t as usize] && !g.sequence(b).unwrap().contains(t))
            .unwrap();
        worse[lo] = unselected;
        worse[lo..g.offsets()[b + 1] as usize].sort_unstable();
        assert!(
            !gfail(g.offsets(), &worse, threshold).is_empty(),
            "a worse token in the batch"
        );
    }

    /// The order of the chunked sums and the `f32` formulas of the reduction and the mean: `+0`
    /// start, dropped terms skipped (a NaN there does not propagate), one rounding at the end.
    #[test]
    fn shared_formulas_are_the_documented_ones() {
        use checks::multi_sample::{mean_model, reduce_model};
        use dropfuse::reference::skip::chunked_sum;
        // 2^24 + 1 + 1 sequentially is 2^24 (each 1 is lost); 1 + 1 in a chunk of 2, then 2^24,
        // is 2^24 + 2.
        let terms = [16_777_216.0f32, 1.0, 1.0, 0.0];
        assert_eq!(checks::chunk_sum(&terms, 4), 16_777_216.0);
        assert_eq!(checks::chunk_sum(&terms, 1), 16_777_216.0);
        let chunked = checks::chunk_sum(&[1.0, 1.0, 16_777_216.0], 2);
        assert_eq!(chunked, 16_777_218.0);
        for chunk in [1, 2, 3, 32, 256] {
            let t: Vec<f32> = values(1000, chunk as u64);
            let (a, b) = (checks::chunk_sum(&t, chunk), chunked_sum(&t, chunk).unwrap());
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "chunk {chunk}"
            );
        }
        assert_eq!(checks::chunk_sum(&[-0.0], 32).to_bits(), 0, "+0 start");

        // Two samples of 3 elements: masks 0b011 and 0b110.
        let grads = [-0.0f32, 2.0, f32::NAN, 1.0, -0.0, 4.0];
        let dh: Vec<f32> = reduce_model(&grads, &[0b011, 0b110], 0.5, 3);
        assert_eq!(
            dh.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            [0, 1f32.to_bits(), 2f32.to_bits()]
        );
        let z = [1.0f32, -0.0, 3.0, 2.0, -0.0, 4.0];
        let mean: Vec<f16> = mean_model(&z, 2, 3);
        assert_eq!(mean, [f16::from_f32(1.5), f16::from_f32(0.0), f16::from_f32(3.5)]);
        assert_eq!(mean[1].to_bits(), 0);
    }

    /// The cross-entropy bounds reject a loss or a gradient just outside them and a non-zero
    /// gradient on an ignored row.
    #[test]
    fn cross_entropy_bounds_catch_errors() {
        use checks::multi_sample::{widen, CeProblem, GRAD_TOL_16, LOSS_TOL};
        let p = CeProblem {
            k: 2,
            b: 3,
            c: 4,
            weights: vec![0.25, 0.75],
            labels: vec![1, -100, 3],
            ignore_index: -100,
            label_smoothing: 0.1,
        };
        let z: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let want = p.reference(&widen(&z)).unwrap();
        let (loss, dz) = (want.0, want.1.clone());
        assert!(p.within_bounds(loss, Some(&dz), &want, DType::F32).is_empty());
        assert!(!p
            .within_bounds(loss * (1.0 + 2.0 * LOSS_TOL), Some(&dz), &want, DType::F32)
            .is_empty());
        let scaled: Vec<f64> = dz.iter().map(|v| v * (1.0 + 2.0 * GRAD_TOL_16)).collect();
        assert!(p.within_bounds(loss, Some(&scaled), &want, DType::F16).len() == 1);
        let mut ignored = dz.clone();
        ignored[4] = 1e-30; // row 1 of set 0 is ignored
        assert!(!p
            .within_bounds(loss, Some(&ignored), &want, DType::F32)
            .is_empty());
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(parse_args(args("--seconds")).is_err());
        assert!(parse_args(args("--seconds -1")).is_err());
        assert!(parse_args(args("--max-n 0")).is_err());
        assert!(parse_args(args("--bogus 1")).is_err());
        assert!(parse_args(args("--help")).unwrap().is_none());
        let cfg = parse_args(args("--seconds 3 --seed 5 --max-n 100"))
            .unwrap()
            .unwrap();
        assert_eq!((cfg.seconds, cfg.seed, cfg.max_n, cfg.case), (3.0, 5, 100, None));
        let ok = "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0";
        assert!(ok.parse::<Case>().is_ok());
        for bad in [
            "dtype=f64,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=0,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=1,p=1.5,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=2,p=0,seed=0,offset=0,eo=18446744073709551615,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0",
            "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0,n=1",
        ] {
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
    }

    /// The comparison catches a wrong element, a written guard slot and NaN vs a number, and
    /// accepts any NaN for a NaN only where asked.
    #[test]
    fn compare_catches_differences() {
        let want = [1.0f32, 2.0, f32::NAN];
        let fill = -1.0f32;
        let good = padded(2, &want, fill);
        let mut out = Vec::new();
        compare("t", &good, 2, &want, fill, true, &mut out);
        assert!(out.is_empty(), "{out:?}");

        let mut other_nan = good.clone();
        other_nan[4] = f32::from_bits(0x7fff_ffff);
        compare("t", &other_nan, 2, &want, fill, true, &mut out);
        assert!(out.is_empty(), "{out:?}");
        compare("t", &other_nan, 2, &want, fill, false, &mut out);
        assert_eq!(out.len(), 1);

        for (i, v) in [(2, 1.5f32), (4, 0.0), (1, 7.0), (5, 7.0)] {
            let mut g = good.clone();
            g[i] = v;
            let mut out = Vec::new();
            compare("t", &g, 2, &want, fill, true, &mut out);
            assert_eq!(out.len(), 1, "slot {i}");
        }
    }

    /// One case string of every kernel of the families added last reruns (on the GPU, or the CPU
    /// self-checks) without a mismatch and prints back the same string; head cases may be skipped
    /// on a GPU without cuBLAS (never here).
    #[test]
    fn more_family_cases_rerun() {
        let m = u64::MAX;
        for case in [
            "dtype=f16,kernel=structured_forward,shape=2x3x33x5,layout=channel,p=0.5,seed=1,offset=2,do=0,xo=1,yo=2,mo=3,\
             data=4"
                .to_string(),
            format!(
                "dtype=bf16,kernel=structured_backward_maskless_inplace,shape=4x7x9,layout=locked:1,p=0.25,seed={m},\
                 offset={m},do={},xo=7,yo=0,mo=0,data=5",
                m - 36
            ),
            "dtype=f32,kernel=structured_mask,shape=37x24,layout=rows,p=0.9,seed=3,offset=4,do=4294967290,xo=0,yo=5,mo=2,\
             data=6"
                .to_string(),
            "dtype=f16,kernel=structured_backward,shape=5x33,layout=axes:-,p=0.5,seed=5,offset=6,do=7,xo=2,yo=3,mo=1,data=7"
                .to_string(),
            "dtype=f32,kernel=structured_forward_inplace,shape=2x2x2x2x2x2x2x2x2,layout=axes:1.3.5.7,p=0.5,seed=1,\
             offset=1,do=0,xo=0,yo=0,mo=0,data=8"
                .to_string(),
            "dtype=bf16,kernel=structured_forward_maskless,shape=3x1x4x1x2,layout=axes:0.2,p=0.3,seed=8,offset=9,do=0,xo=3,\
             yo=4,mo=0,data=9"
                .to_string(),
            format!("dtype=f16,kernel=mc_replicas,n=37,r=3,p=0.5,seed={m},offset={m},eo=5,xo=1,yo=2,mo=3,data=10"),
            "dtype=bf16,kernel=mc_replicas_maskless,n=4099,r=2,p=0.1,seed=1,offset=2,eo=4294967295,xo=0,yo=7,data=11"
                .to_string(),
            "dtype=f32,kernel=mc_summaries,shape=3x4x5,probs=bad,xo=2,data=12".to_string(),
            "dtype=f32,kernel=mc_summaries_stack,shape=1x2x1000,probs=onehot,xo=0,data=13".to_string(),
            "dtype=f32,kernel=mc_summaries_stack,shape=2x3x4,probs=bad,xo=1,data=14".to_string(),
            "dtype=f32,kernel=mc_summaries_unchecked,shape=4x3x7,probs=identical,xo=1,data=15".to_string(),
            "dtype=bf16,kernel=bdr_backward,shape=300x7,bias=true,p=0.1,seed=1,offset=2,eo=3,xo=1,yo=2,mo=3,bo=4,data=16"
                .to_string(),
            format!(
                "dtype=f16,kernel=bdr_forward_inplace,shape=3x33,bias=false,p=0.75,seed=2,offset={m},eo={},xo=0,yo=1,\
                 mo=2,bo=0,data=17",
                m - 99
            ),
            "dtype=f32,kernel=bdr_backward_maskless_inplace,shape=513x3,bias=true,p=1.0,seed=3,offset=4,eo=0,xo=5,yo=0,\
             mo=0,bo=3,data=18"
                .to_string(),
            "dtype=f16,kernel=importance_similarities,shape=65x40,mask=some,layer=2,adds=2,xo=1,yo=2,mo=3,data=19"
                .to_string(),
            "dtype=f32,kernel=importance,shape=3x1,mask=padding,layer=0,adds=1,xo=0,yo=0,mo=0,data=20".to_string(),
            "dtype=bf16,kernel=importance,shape=130x9,mask=real,layer=1,adds=3,xo=7,yo=6,mo=5,data=21".to_string(),
            format!(
                "dtype=f16,kernel=multi_sample_head,shape=3x5x7x4,p=0.5,seed=1,offset={m},eps=0.1,labels=some,ii=-100,\
                 bias=true,train=true,grad=f16,data=22"
            ),
            "dtype=bf16,kernel=multi_sample_head,shape=1x4x3x1,p=0.0,seed=2,offset=3,eps=1.0,labels=bad,ii=0,\
             bias=false,train=false,grad=f32,data=23"
                .to_string(),
            "dtype=f32,kernel=multi_sample_head,shape=2x6x9x5,p=1.0,seed=4,offset=5,eps=0.0,labels=ignored,ii=-1,\
             bias=true,train=true,grad=f32,data=24"
                .to_string(),
            format!("dtype=f32,kernel=dropout_device_philox,n=100,p=0.3,seed=5,offset={m},add=3,eo=0,xo=1,yo=2,mo=1,data=25"),
            format!(
                "dtype=f16,kernel=dropout_device_philox_advance,n=33,p=0.5,seed=6,offset=7,add={m},eo={},xo=0,yo=0,\
                 mo=0,data=26",
                m - 33
            ),
        ] {
            let cfg = parse_args(args(&format!("--case {case}"))).unwrap_or_else(|e| panic!("{case}: {e}")).unwrap();
            assert_eq!(cfg.case.unwrap().to_string(), case);
            let s = run(&cfg).expect("fuzz run");
            assert_eq!((s.cases + s.skipped, s.mismatches), (1, 0), "{case}: {s}");
            if s.skipped > 0 {
                assert!(s.gpu && case.contains("kernel=multi_sample_head"), "{case}: {s}");
            }
        }
    }

    /// The new families' case strings: each kernel's keys exactly, valid values.
    #[test]
    fn more_bad_family_cases_are_rejected() {
        let structured =
            "dtype=f32,kernel=structured_forward,shape=2x3x4,layout=channel,p=0.5,seed=0,offset=0,do=0,xo=0,yo=0,mo=0,data=0";
        let mc = "dtype=f16,kernel=mc_replicas,n=4,r=2,p=0.5,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0";
        let summaries = "dtype=f32,kernel=mc_summaries,shape=2x3x4,probs=softmax,xo=0,data=0";
        let bdr = "dtype=f32,kernel=bdr_forward,shape=2x3,bias=true,p=0.5,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,bo=0,data=0";
        let importance =
            "dtype=f32,kernel=importance,shape=2x3,mask=none,layer=0,adds=1,xo=0,yo=0,mo=0,data=0";
        let head =
            "dtype=f16,kernel=multi_sample_head,shape=2x3x4x5,p=0.5,seed=0,offset=0,eps=0.0,labels=all,\
                    ii=-100,bias=true,train=true,grad=f32,data=0";
        let graph = "dtype=f32,kernel=dropout_device_philox,n=4,p=0.5,seed=0,offset=0,add=1,eo=0,xo=0,yo=0,mo=0,data=0";
        for ok in [structured, mc, summaries, bdr, importance, head, graph] {
            let c: Case = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(c.to_string(), ok);
        }
        let m = u64::MAX;
        for (ok, from, to) in [
            (structured, "layout=channel", "layout=rows"),
            (structured, "layout=channel", "layout=locked:3"),
            (structured, "layout=channel", "layout=axes:1.1"),
            (structured, "layout=channel", "layout=axes:"),
            (structured, "layout=channel", "layout=lock:0"),
            (structured, "shape=2x3x4", "shape=2x3x4x1x1x1x1x1x1x1x1"),
            (structured, "do=0", &format!("do={}", m - 5)),
            (structured, "data=0", "data=0,n=24"),
            (mc, "r=2", "r=0"),
            (mc, "mo=0,", ""),
            (mc, "kernel=mc_replicas", "kernel=mc_replicas_maskless"),
            (summaries, "dtype=f32", "dtype=f16"),
            (summaries, "probs=softmax", "probs=uniform"),
            (summaries, "shape=2x3x4", "shape=2x3"),
            (
                summaries,
                "kernel=mc_summaries,shape=2x3x4,probs=softmax",
                "kernel=mc_summaries_unchecked,shape=2x3x4,probs=bad",
            ),
            (bdr, "bias=true", "bias=yes"),
            (bdr, "bo=0", "bo=2000"),
            (bdr, "shape=2x3", "shape=6"),
            (importance, "mask=none", "mask=all"),
            (importance, "layer=0", "layer=3"),
            (importance, "adds=1", "adds=0"),
            (importance, "adds=1", "adds=4"),
            (head, "grad=f32", "grad=bf16"),
            (head, "shape=2x3x4x5", "shape=129x3x4x5"),
            (head, "shape=2x3x4x5", "shape=2x3x4"),
            (head, "eps=0.0", "eps=-0.1"),
            (head, "labels=all", "labels=most"),
            (head, "train=true", "train=1"),
            (graph, "add=1,", ""),
            (graph, "add=1", "add=-1"),
        ] {
            let bad = ok.replacen(from, to, 1);
            assert_ne!(bad, ok);
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
    }

    /// The helpers that judge the GPU's outputs and the contract formulas of the new families
    /// catch errors: structured decision indices and the safe API's groups, a wrong mask handed
    /// to the bias + dropout + residual backward, summaries just outside their tolerance, the
    /// head's bounds, the importance kernel model.
    #[test]
    fn new_checks_catch_errors() {
        use checks::head::{head_bounds, HeadGot};
        use checks::mc_dropout::{outside_tolerance, softmax_stack};
        use checks::structured::{check_api_layout, decision_indices, group_decision_indices, Kind};
        use dropfuse::mc_dropout::McStats32;
        use dropfuse::reference::mc_dropout::{f32_tolerance, summarize};
        use dropfuse::reference::multi_sample::HeadForward;

        // Decision indices: channel [2, 3, 4] is e / 4, locked on axis 0 of [3, 2, 2] is e % 4,
        // channels-last [2, 2, 2, 3] sharing axes 1 and 2 is (e / 12) * 3 + e % 3.
        let ch = decision_indices(&[2, 3, 4], &Kind::Channel.shared(3));
        assert_eq!(ch, (0..24).map(|e| e / 4).collect::<Vec<_>>());
        let locked = decision_indices(&[3, 2, 2], &Kind::Locked(0).shared(3));
        assert_eq!(locked, (0..12).map(|e| e % 4).collect::<Vec<_>>());
        let cl = decision_indices(&[2, 2, 2, 3], &Kind::Axes(vec![1, 2]).shared(4));
        assert_eq!(cl, (0..24).map(|e| (e / 12) * 3 + e % 3).collect::<Vec<_>>());
        assert_eq!(group_decision_indices(&[(2, false), (4, true), (3, false)]), cl);
        let mut c = checks::Checks::new();
        assert!(check_api_layout(&mut c, &Kind::Axes(vec![1, 2]), &[2, 2, 2, 3], 0.5, &cl).is_some());
        assert!(c.ok(), "{:?}", c.failures());
        let mut wrong = cl.clone();
        wrong.swap(0, 1);
        let mut c = checks::Checks::new();
        check_api_layout(&mut c, &Kind::Axes(vec![1, 2]), &[2, 2, 2, 3], 0.5, &wrong);
        assert!(!c.ok(), "a wrong decision index not caught");

        // A mask that is not the forward's: the mask-free backward disagrees.
        let dy: Vec<f32> = (1..=12).map(|i| i as f32).collect();
        let state = PhiloxState::new(1, 2);
        let good = reference::mask(0.5, state, 0, 12).unwrap();
        let mut c = checks::Checks::new();
        checks::bias_dropout_residual::check_backward(&mut c, &dy, 4, &good, 0.5, state, 0, true).unwrap();
        assert!(c.ok(), "{:?}", c.failures());
        let mut c = checks::Checks::new();
        checks::bias_dropout_residual::check_backward(&mut c, &dy, 4, &[good[0] ^ 1], 0.5, state, 0, true)
            .unwrap();
        assert!(!c.ok(), "a wrong mask not caught");

        // Summaries: exact values pass, one value 2 tolerances off is one failure.
        let probs = softmax_stack(3, 2, 5, 4.0, 1);
        let want = summarize(&probs, 3, 2, 5).unwrap();
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let mut got = McStats32 {
            mean: f32s(&want.mean),
            variance: f32s(&want.variance),
            predictive_entropy: f32s(&want.predictive_entropy),
            expected_entropy: f32s(&want.expected_entropy),
            mutual_information: f32s(&want.mutual_information),
        };
        assert_eq!(outside_tolerance(&got, &want).0, 0);
        got.variance[3] += 2.0 * f32_tolerance(3, 5).variance as f32;
        got.mutual_information[1] = f32::NAN;
        assert_eq!(outside_tolerance(&got, &want).0, 2);

        // Head bounds: the loss, a gradient, the zero-gradient rule.
        let want = HeadForward {
            loss: 2.0,
            mean_logits: vec![1.0, -1.0],
            dh: vec![0.5, 0.25],
            dw: vec![0.125, 1.0],
            db: Some(vec![0.5]),
        };
        let got = HeadGot {
            loss: want.loss,
            mean_logits: want.mean_logits.clone(),
            dh: want.dh.clone(),
            dw: want.dw.clone(),
            db: want.db.clone(),
        };
        assert_eq!(
            head_bounds(&got, &want, DType::F32, false, None),
            (vec![], vec![])
        );
        let off_loss = HeadGot {
            loss: 2.0 * (1.0 + 3e-5),
            ..got.clone()
        };
        assert_eq!(head_bounds(&off_loss, &want, DType::F32, false, None).0.len(), 1);
        let off_dh = HeadGot {
            dh: vec![0.5 * (1.0 + 2e-5), 0.25],
            ..got.clone()
        };
        assert_eq!(head_bounds(&off_dh, &want, DType::F32, false, None).1.len(), 1);
        assert!(head_bounds(&off_dh, &want, DType::BF16, false, None).1.is_empty());
        assert!(!head_bounds(&got, &want, DType::F32, true, None).1.is_empty());

        // The importance kernel model: a row against itself is 1, orthogonal rows 0, a zero row 0.
        use checks::importance::kernel_model;
        let a: Vec<f32> = (0..300).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        assert!((kernel_model(&a, &a) - 1.0).abs() <= 2.0 * f32::EPSILON);
        let (e0, e1) = ([1.0f32, 0.0, 0.0], [0.0f32, 2.0, 0.0]);
        assert_eq!(kernel_model(&e0, &e1), 0.0);
        assert_eq!(kernel_model(&a, &vec![0.0; 300]), 0.0);
    }
}
