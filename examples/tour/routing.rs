//! Token routing in the tour (`dropfuse::routing`): per-sequence top-k (capacity fraction 0.5 of
//! the real tokens, padding by lengths) and the global budget (half of the real tokens of the
//! batch, padding by a mask) on gate scores with many ties, then the gather, the gated scatter-add
//! and their backward on a `B x S x H` residual stream through the top-k routing.

use dropfuse::half::{bf16, f16};
use dropfuse::reference::skip::{self as reference, Capacity, ValidTokens};
use dropfuse::routing::{self as kernels, TokenRouting, Valid};
use dropfuse::{Device, Element, Generator};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::routing::{self as check, Select};
use crate::checks::Checks;
use crate::{
    counter_mismatches, download, element_mismatches, print_check_header, print_checks, push_rows,
    random_input, time_copy, time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// A residual stream of `batch` sequences of `seq_len` tokens of `hidden` elements.
#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    seq_len: usize,
    hidden: usize,
}

/// The benchmark shape is 16 x 4096 x 4096; a quarter of the sequences and of the hidden
/// size keeps the CPU reference quick (16 M elements).
const FULL: Shape = Shape {
    batch: 8,
    seq_len: 2048,
    hidden: 1024,
};
const SMALL: Shape = Shape {
    batch: 3,
    seq_len: 200,
    hidden: 40,
};

/// Per-sequence top-k: this fraction of each sequence's real tokens.
const TOP_K: Capacity = Capacity::Fraction(0.5);
/// Global budget: this fraction of the batch's real tokens.
const KEEP: f64 = 0.5;

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

fn describe(scale: Scale) -> Vec<String> {
    let s = shape(scale);
    vec![format!(
        "routing: B x S x H = {} x {} x {}, top-k {TOP_K:?} of the real tokens (lengths), global \
         budget {KEEP} (padding mask), gather / gated scatter-add / backward through the top-k",
        s.batch, s.seq_len, s.hidden
    )]
}

/// Gate scores with many ties (4096 distinct values), in `[-32, 32)`.
fn scores(tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..tokens)
        .map(|_| rng.random_range(0..4096u32) as f32 / 64.0 - 32.0)
        .collect()
}

/// Sequence `b` has `S - (b * 131) % (S / 2)` real tokens (sequence 0 none padded).
fn lengths(s: Shape) -> Vec<usize> {
    (0..s.batch)
        .map(|b| s.seq_len - (b * 131) % (s.seq_len / 2).max(1))
        .collect()
}

/// Every seventh token is padding.
fn padding_mask(tokens: usize) -> Vec<bool> {
    (0..tokens).map(|i| i % 7 != 3).collect()
}

/// Gates in `[0, 1)`, like router weights.
fn gates(tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..tokens).map(|_| rng.random::<f32>()).collect()
}

/// Offsets and indices that differ from the reference routing's.
fn routing_mismatches(got: &(Vec<u32>, Vec<u32>), want: &reference::Routing) -> usize {
    counter_mismatches(&got.0, want.offsets()) + counter_mismatches(&got.1, want.indices())
}

fn gpu(dev: &Device, scale: Scale, _rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    gpu_dtype::<f16>(dev, s, 21, rows)?;
    gpu_dtype::<bf16>(dev, s, 22, rows)?;
    gpu_dtype::<f32>(dev, s, 23, rows)
}

fn gpu_dtype<T: Element>(dev: &Device, shape: Shape, seed: u64, rows: &mut Vec<Row>) -> BoxResult<()> {
    let Shape {
        batch,
        seq_len,
        hidden: h,
    } = shape;
    let (tokens, n) = (batch * seq_len, batch * seq_len * h);
    let size = T::DTYPE.size() as u64;
    let s = dev.stream();

    let sc = scores(tokens, seed);
    let lens = lengths(shape);
    let mask = padding_mask(tokens);
    let gate = gates(tokens, seed ^ 0x6a);
    // The compact buffers hold the host bound of the top-k selection (no count read needed).
    let cap = kernels::max_selected_top_k(batch, seq_len, TOP_K)?;
    let x: Vec<T> = random_input(n, seed);
    let branch: Vec<T> = random_input(cap * h, seed ^ 0xb1);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let d_c: Vec<T> = random_input(cap * h, seed ^ 0xdc);
    let d_x: Vec<T> = random_input(n, seed ^ 0xd2);

    // The oracle (plain CPU code).
    let top = reference::route_top_k(&sc, seq_len, ValidTokens::Lengths(&lens), TOP_K)?;
    let (global, threshold) = reference::route_global(&sc, seq_len, ValidTokens::Mask(&mask), KEEP)?;
    let total = top.total();
    let want_c = reference::gather_tokens(&x, h, &top)?;
    let mut want_res = x.clone();
    reference::scatter_add_tokens(&mut want_res, h, &top, &branch, &gate)?;
    let want_grads = reference::scatter_add_tokens_backward(&dy, h, &top, &branch, &gate)?;
    let mut want_dx = d_x.clone();
    reference::gather_tokens_backward(&d_c, h, &top, &mut want_dx)?;

    let sd = dev.upload(&sc)?;
    let lens_d = dev.upload(&lens.iter().map(|&l| l as u32).collect::<Vec<u32>>())?;
    let mask_d = dev.upload(&mask)?;
    let gate_d = dev.upload(&gate)?;
    let xd = dev.upload(&x)?;
    let branch_d = dev.upload(&branch)?;
    let dyd = dev.upload(&dy)?;
    let d_cd = dev.upload(&d_c)?;

    // Correctness: run each kernel once, download, compare.
    let mut r = TokenRouting::new(s, batch, seq_len, cap)?;
    r.top_k(s, &sd, Valid::Lengths(&lens_d), TOP_K)?;
    let top_bad = routing_mismatches(&r.download(s)?, &top);

    let mut g = TokenRouting::new(
        s,
        batch,
        seq_len,
        kernels::max_selected_global(batch, seq_len, KEEP)?,
    )?;
    g.global(s, &sd, Valid::Mask(&mask_d), KEEP)?;
    let got_threshold = g.threshold(s)?;
    let same_threshold = match (got_threshold, threshold) {
        (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
        (a, b) => a.is_none() && b.is_none(),
    };
    let global_bad = routing_mismatches(&g.download(s)?, &global) + usize::from(!same_threshold);

    let mut compact = dev.zeros::<T>(cap * h)?;
    kernels::gather_tokens(s, &r, h, &xd, &mut compact)?;
    let gather_bad = element_mismatches(&download(dev, &compact)?[..total * h], &want_c);

    let mut res = dev.upload(&x)?;
    kernels::scatter_add_tokens(s, &r, h, &mut res, &branch_d, &gate_d)?;
    let scatter_bad = element_mismatches(&download(dev, &res)?, &want_res);

    let mut d_branch = dev.zeros::<T>(cap * h)?;
    let mut d_gate = dev.zeros::<f32>(tokens)?;
    kernels::scatter_add_tokens_backward(s, &r, h, &dyd, &branch_d, &gate_d, &mut d_branch, &mut d_gate)?;
    let backward_bad = element_mismatches(&download(dev, &d_branch)?[..total * h], &want_grads.d_branch)
        + element_mismatches(&download(dev, &d_gate)?, &want_grads.d_gate);

    let mut dxd = dev.upload(&d_x)?;
    kernels::gather_tokens_backward(s, &r, h, &d_cd, &mut dxd)?;
    let gather_bwd_bad = element_mismatches(&download(dev, &dxd)?, &want_dx);

    // Timing, against a device copy of x. Bytes: scores, (valid flags,) indices written; rows
    // read and written; gates read, gate gradients written.
    let t = total as u64;
    let rows_bytes = t * h as u64 * size;
    let select = 4 * tokens as u64 + 4 * t;
    let copy_ms = time_copy(dev, &xd)?;
    let top_ms = time_ms(dev, || r.top_k(s, &sd, Valid::Lengths(&lens_d), TOP_K))?;
    let global_ms = time_ms(dev, || g.global(s, &sd, Valid::Mask(&mask_d), KEEP))?;
    let gather_ms = time_ms(dev, || kernels::gather_tokens(s, &r, h, &xd, &mut compact))?;
    let scatter_ms = time_ms(dev, || {
        kernels::scatter_add_tokens(s, &r, h, &mut res, &branch_d, &gate_d)
    })?;
    let backward_ms = time_ms(dev, || {
        kernels::scatter_add_tokens_backward(s, &r, h, &dyd, &branch_d, &gate_d, &mut d_branch, &mut d_gate)
    })?;
    let gather_bwd_ms = time_ms(dev, || kernels::gather_tokens_backward(s, &r, h, &d_cd, &mut dxd))?;

    let table = [
        ("routing_top_k_select", top_bad, top_ms, select),
        (
            "routing_global_select",
            global_bad,
            global_ms,
            select + tokens as u64,
        ),
        ("routing_gather", gather_bad, gather_ms, 2 * rows_bytes),
        (
            "routing_scatter_add",
            scatter_bad,
            scatter_ms,
            3 * rows_bytes + 4 * t,
        ),
        (
            "routing_scatter_add_backward",
            backward_bad,
            backward_ms,
            3 * rows_bytes + 4 * t + 4 * tokens as u64,
        ),
        (
            "routing_gather_backward",
            gather_bwd_bad,
            gather_bwd_ms,
            3 * rows_bytes,
        ),
    ];
    push_rows(rows, T::DTYPE.name(), n, (copy_ms, 2 * n as u64 * size), table);
    Ok(())
}

fn cpu(scale: Scale, _rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!(
        "CPU reference: routing: B x S x H = {} x {} x {}, top-k {TOP_K:?} (lengths), top-k S / 3 \
         tokens (special scores), global budget {KEEP} (mask)\n",
        s.batch, s.seq_len, s.hidden
    );
    print_check_header();
    let mut ok = cpu_dtype::<f16>(s, 21)?;
    ok &= cpu_dtype::<bf16>(s, 22)?;
    ok &= cpu_dtype::<f32>(s, 23)?;
    Ok(ok)
}

/// Scores full of special values: NaN, `-0`, `+0`, infinities, subnormals, ties.
fn special_scores(tokens: usize, seed: u64) -> Vec<f32> {
    let specials = [
        f32::NAN,
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0,
        -1.0,
        f32::from_bits(1),
        f32::MAX,
        -f32::NAN,
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..tokens)
        .map(|_| specials[rng.random_range(0..specials.len())])
        .collect()
}

/// The routing reference's self-checks for dtype `T`; prints one row each.
fn cpu_dtype<T: Element>(shape: Shape, seed: u64) -> BoxResult<bool> {
    let Shape {
        batch,
        seq_len,
        hidden: h,
    } = shape;
    let (tokens, n) = (batch * seq_len, batch * seq_len * h);
    let sc = scores(tokens, seed);
    let lens = lengths(shape);
    let mask = padding_mask(tokens);
    let gate = gates(tokens, seed ^ 0x6a);
    let x: Vec<T> = random_input(n, seed);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let d_x: Vec<T> = random_input(n, seed ^ 0xd2);

    let mut checks = Checks::new();
    checks.prefix("top-k");
    let top = check::check_selection(
        &mut checks,
        &sc,
        seq_len,
        ValidTokens::Lengths(&lens),
        Select::TopK(TOP_K),
    )?;
    checks.prefix("top-k specials");
    check::check_selection(
        &mut checks,
        &special_scores(tokens, seed ^ 0x5c),
        seq_len,
        ValidTokens::All,
        Select::TopK(Capacity::Tokens(seq_len / 3)),
    )?;
    checks.prefix("global");
    check::check_selection(
        &mut checks,
        &sc,
        seq_len,
        ValidTokens::Mask(&mask),
        Select::Global(KEEP),
    )?;
    // One spare compact row: inputs may have more rows than the total.
    let rows = top.total() + 1;
    let branch: Vec<T> = random_input(rows * h, seed ^ 0xb1);
    let d_c: Vec<T> = random_input(rows * h, seed ^ 0xdc);
    checks.prefix("");
    check::check_gather(&mut checks, &x, h, &top)?;
    check::check_scatter_add(&mut checks, &x, h, &top, &branch, &gate)?;
    check::check_scatter_add_backward(&mut checks, &dy, h, &top, &branch, &gate)?;
    check::check_gather_backward(&mut checks, &d_c, h, &top, &d_x)?;
    Ok(print_checks(T::DTYPE.name(), n, &checks))
}
