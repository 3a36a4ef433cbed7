//! Token-routing cases (`dropfuse::routing` against `dropfuse::reference::skip` points 7-11).
//!
//! Kernels: `routing_top_k` and `routing_global` (the selections: offsets, indices, the capacity
//! check and the global threshold), `routing_gather`, `routing_scatter_add`,
//! `routing_scatter_add_backward` (`d_branch` and `d_gate`) and `routing_gather_backward`. Keys
//! besides `dtype`, `kernel` and `data`:
//!
//! * `shape`: `BxS` for the selections, `BxSxH` for the row kernels;
//! * `sel`: `tokens:K` or `fraction:C` (per-sequence top-k), `global:Q` (global budget);
//! * `pad`: `all`, `mask` (random flags of a random density), `lengths` (random, up to `S + 2`:
//!   the device reads a length above `S` as `S`, the reference is given it clamped), `none` (every
//!   token padding);
//! * `scores`: `random` (any bit pattern, NaN and infinities included), `ties` (four values),
//!   `special` (NaN, `±0`, `±inf`, subnormals, extremes), `equal`, `uniform`;
//! * `cap`: the routing's index capacity, `bound` (the host bound `max_selected_*`) or the
//!   reference's total plus a delta (below the total: truncated indices, a `capacity` error from
//!   `check_capacity`);
//! * row kernels only: `src`, the routing used (`select`: the GPU's selection, compared first;
//!   `upload`: the reference's uploaded, which must fail with `capacity` below the total) and
//!   `rows`, the compact buffers' rows (the total plus a delta): rows at or beyond
//!   `min(total, capacity, rows)` are never written and their tokens are left alone;
//! * `xo`, `yo`: view offsets of the scores and of the mask / lengths (selections), of the
//!   `B x S x H` tensors and of the compact buffers (row kernels).
//!
//! Without a GPU the case runs the reference selection through the contract re-derived in
//! `examples/checks/routing.rs`, and for a row kernel its row operation.

use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::reference::skip::{self as reference, Capacity, Routing, ValidTokens};
use dropfuse::routing::{self as kernels, TokenRouting, Valid};
use dropfuse::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::routing::{self as check, Select};
use crate::checks::Checks;
use crate::{
    compare, dims_text, padded, parse_dims, sentinel, values, Case, Fields, FuzzElement, Kernel,
    Spec as CaseSpec,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    TopK,
    Global,
    Gather,
    ScatterAdd,
    ScatterAddBackward,
    GatherBackward,
}

const SELECT_KEYS: [&str; 10] = [
    "dtype", "kernel", "shape", "sel", "pad", "scores", "cap", "xo", "yo", "data",
];
const ROW_KEYS: [&str; 12] = [
    "dtype", "kernel", "shape", "sel", "pad", "scores", "src", "cap", "rows", "xo", "yo", "data",
];

impl Op {
    pub const ALL: [Op; 6] = [
        Op::TopK,
        Op::Global,
        Op::Gather,
        Op::ScatterAdd,
        Op::ScatterAddBackward,
        Op::GatherBackward,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::TopK => "routing_top_k",
            Op::Global => "routing_global",
            Op::Gather => "routing_gather",
            Op::ScatterAdd => "routing_scatter_add",
            Op::ScatterAddBackward => "routing_scatter_add_backward",
            Op::GatherBackward => "routing_gather_backward",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        if self.is_rows() {
            &ROW_KEYS
        } else {
            &SELECT_KEYS
        }
    }
    /// A row kernel (else a selection).
    fn is_rows(self) -> bool {
        !matches!(self, Op::TopK | Op::Global)
    }
}

/// Which tokens are padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pad {
    All,
    Mask,
    Lengths,
    None,
}

/// How the gate scores are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scores {
    Random,
    Ties,
    Special,
    Equal,
    Uniform,
}

/// The index capacity of the routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// `max_selected_top_k` / `max_selected_global`.
    Bound,
    /// The reference's total plus this (at least 0).
    Delta(i64),
}

/// The routing the row kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Select,
    Upload,
}

const PADS: [(Pad, &str); 4] = [
    (Pad::All, "all"),
    (Pad::Mask, "mask"),
    (Pad::Lengths, "lengths"),
    (Pad::None, "none"),
];
const SCORES: [(Scores, &str); 5] = [
    (Scores::Random, "random"),
    (Scores::Ties, "ties"),
    (Scores::Special, "special"),
    (Scores::Equal, "equal"),
    (Scores::Uniform, "uniform"),
];
const SRCS: [(Src, &str); 2] = [(Src::Select, "select"), (Src::Upload, "upload")];

fn name_of<V: PartialEq + Copy>(table: &[(V, &'static str)], v: V) -> &'static str {
    table
        .iter()
        .find(|(x, _)| *x == v)
        .map(|(_, n)| *n)
        .expect("a named value")
}

fn parse_name<V: Copy>(table: &[(V, &'static str)], key: &str, text: &str) -> Result<V, String> {
    table
        .iter()
        .find(|(_, n)| *n == text)
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(_, n)| *n).collect();
            format!("{key}: expected one of {}, got {text:?}", names.join(", "))
        })
}

/// The routing part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    batch: usize,
    seq_len: usize,
    /// 0 for the selections.
    hidden: usize,
    sel: Select,
    pad: Pad,
    scores: Scores,
    cap: Cap,
    /// Rows of the compact buffers: the total plus this (row kernels).
    rows: i64,
    src: Src,
}

/// `total + delta`, at least 0.
fn plus(total: usize, delta: i64) -> usize {
    (total as i64).saturating_add(delta).max(0) as usize
}

impl Spec {
    pub fn numel(&self) -> usize {
        self.batch * self.seq_len * self.hidden.max(1)
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "shape" if self.hidden == 0 => dims_text(&[self.batch, self.seq_len]),
            "shape" => dims_text(&[self.batch, self.seq_len, self.hidden]),
            // `{:?}` of an f64 is the shortest string that parses back to the same bits.
            "sel" => match self.sel {
                Select::TopK(Capacity::Tokens(k)) => format!("tokens:{k}"),
                Select::TopK(Capacity::Fraction(c)) => format!("fraction:{c:?}"),
                Select::Global(q) => format!("global:{q:?}"),
            },
            "pad" => name_of(&PADS, self.pad).to_string(),
            "scores" => name_of(&SCORES, self.scores).to_string(),
            "cap" => match self.cap {
                Cap::Bound => "bound".to_string(),
                Cap::Delta(d) => d.to_string(),
            },
            "rows" => self.rows.to_string(),
            "src" => name_of(&SRCS, self.src).to_string(),
            _ => unreachable!("routing cases have no key {key}"),
        }
    }

    pub fn parse(op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let dims = parse_dims("shape", f.get("shape")?, if op.is_rows() { &[3] } else { &[2] })?;
        if dims[0] * dims[1] > u32::MAX as usize {
            return Err("shape: at most 2^32 - 1 tokens".into());
        }
        let sel_text = f.get("sel")?;
        let (kind, amount) = sel_text
            .split_once(':')
            .ok_or_else(|| format!("sel: expected tokens:K, fraction:C or global:Q, got {sel_text:?}"))?;
        let fraction = |v: &str| -> Result<f64, String> {
            match v.parse::<f64>() {
                Ok(c) if (0.0..=1.0).contains(&c) => Ok(c),
                _ => Err(format!("sel: expected a fraction in [0, 1], got {v:?}")),
            }
        };
        let sel = match kind {
            "tokens" => Select::TopK(Capacity::Tokens(
                amount
                    .parse()
                    .map_err(|_| format!("sel: cannot parse {amount:?}"))?,
            )),
            "fraction" => Select::TopK(Capacity::Fraction(fraction(amount)?)),
            "global" => Select::Global(fraction(amount)?),
            other => return Err(format!("sel: unknown selection {other:?}")),
        };
        match (op, sel) {
            (Op::TopK, Select::Global(_)) | (Op::Global, Select::TopK(_)) => {
                return Err(format!("sel: {sel_text} is not a selection of {}", op.name()))
            }
            _ => {}
        }
        let cap = match f.get("cap")? {
            "bound" => Cap::Bound,
            d => Cap::Delta(
                d.parse()
                    .map_err(|_| format!("cap: expected bound or a delta, got {d:?}"))?,
            ),
        };
        let rows_op = op.is_rows();
        Ok(Spec {
            batch: dims[0],
            seq_len: dims[1],
            hidden: if rows_op { dims[2] } else { 0 },
            sel,
            pad: parse_name(&PADS, "pad", f.get("pad")?)?,
            scores: parse_name(&SCORES, "scores", f.get("scores")?)?,
            cap,
            rows: if rows_op { f.num("rows")? } else { 0 },
            src: if rows_op {
                parse_name(&SRCS, "src", f.get("src")?)?
            } else {
                Src::Select
            },
        })
    }

    fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// The index capacity for a selection of `total` tokens.
    fn capacity(&self, total: usize) -> dropfuse::Result<usize> {
        match (self.cap, self.sel) {
            (Cap::Bound, Select::TopK(c)) => kernels::max_selected_top_k(self.batch, self.seq_len, c),
            (Cap::Bound, Select::Global(q)) => kernels::max_selected_global(self.batch, self.seq_len, q),
            (Cap::Delta(d), _) => Ok(plus(total, d)),
        }
    }
}

// ------------------------------------------------------------------------------------------ draw

/// A fraction: 0, 1, a half, common values, uniform.
fn draw_fraction(rng: &mut StdRng) -> f64 {
    match rng.random_range(0..6u32) {
        0 => 0.0,
        1 => 1.0,
        2 => 0.5,
        3 => [0.1, 0.25, 0.75, 0.9, 1.0 / 3.0][rng.random_range(0..5)],
        _ => rng.random::<f64>(),
    }
}

/// A per-sequence top-k: `k` of 0, `S`, above `S`, random, or a fraction.
fn draw_top_k(rng: &mut StdRng, seq_len: usize) -> Select {
    if rng.random_bool(0.5) {
        return Select::TopK(Capacity::Fraction(draw_fraction(rng)));
    }
    Select::TopK(Capacity::Tokens(match rng.random_range(0..6u32) {
        0 => 0,
        1 => seq_len,
        2 => seq_len + rng.random_range(1..=5),
        _ => rng.random_range(0..=seq_len),
    }))
}

/// A delta: mostly 0, some above, some below.
fn draw_delta(rng: &mut StdRng) -> i64 {
    match rng.random_range(0..8u32) {
        0..=3 => 0,
        4 | 5 => rng.random_range(1..=3),
        _ => -rng.random_range(1..=3),
    }
}

/// A routing case of at most `max_n` elements (tokens for the selections): mostly short
/// sequences, some of hundreds and now and then thousands of tokens, hidden sizes around
/// multiples of 8 and 32 and up to 1100.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let mut dims = [
        if rng.random_range(0..4u32) == 0 {
            rng.random_range(1..=16)
        } else {
            rng.random_range(1..=4)
        },
        match rng.random_range(0..10u32) {
            0..=5 => rng.random_range(1..=64),
            6..=8 => rng.random_range(65..=600),
            _ => rng.random_range(601..=5000),
        },
        if !op.is_rows() {
            1
        } else if rng.random_bool(0.7) {
            [1, 2, 3, 4, 7, 8, 16, 24, 31, 32, 33, 64, 100, 256][rng.random_range(0..14)]
        } else {
            rng.random_range(1..=1100)
        },
    ];
    while dims.iter().product::<usize>() > max_n {
        let a = (0..3).max_by_key(|&a| dims[a]).unwrap_or(0);
        dims[a] = dims[a].div_ceil(2);
    }
    let sel = match op {
        Op::TopK => draw_top_k(rng, dims[1]),
        Op::Global => Select::Global(draw_fraction(rng)),
        _ if rng.random_bool(0.5) => draw_top_k(rng, dims[1]),
        _ => Select::Global(draw_fraction(rng)),
    };
    let spec = Spec {
        batch: dims[0],
        seq_len: dims[1],
        hidden: if op.is_rows() { dims[2] } else { 0 },
        sel,
        pad: [
            Pad::All,
            Pad::All,
            Pad::All,
            Pad::Mask,
            Pad::Mask,
            Pad::Lengths,
            Pad::Lengths,
            Pad::None,
        ][rng.random_range(0..8)],
        scores: [
            Scores::Random,
            Scores::Random,
            Scores::Ties,
            Scores::Ties,
            Scores::Special,
            Scores::Equal,
            Scores::Uniform,
        ][rng.random_range(0..7)],
        cap: if rng.random_bool(0.4) {
            Cap::Bound
        } else {
            Cap::Delta(draw_delta(rng))
        },
        rows: if op.is_rows() { draw_delta(rng) } else { 0 },
        src: if op.is_rows() && rng.random_bool(0.4) {
            Src::Upload
        } else {
            Src::Select
        },
    };
    Case {
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Routing(op), CaseSpec::Routing(spec))
    }
}

// ---------------------------------------------------------------------------------------- inputs

/// The real tokens of a case on the host: lengths as drawn (up to `S + 2`) and clamped to `S`
/// for the reference.
enum HostValid {
    All,
    Mask(Vec<bool>),
    Lengths(Vec<u32>, Vec<usize>),
}

impl HostValid {
    fn reference(&self) -> ValidTokens<'_> {
        match self {
            HostValid::All => ValidTokens::All,
            HostValid::Mask(m) => ValidTokens::Mask(m),
            HostValid::Lengths(_, clamped) => ValidTokens::Lengths(clamped),
        }
    }
}

/// The scores and the real tokens of case `c`.
fn inputs(c: &Case, s: &Spec) -> (Vec<f32>, HostValid) {
    let tokens = s.tokens();
    let mut rng = StdRng::seed_from_u64(c.data ^ 0x5c0e);
    let specials = [
        f32::NAN,
        -f32::NAN,
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::MAX,
        f32::MIN,
    ];
    let scores: Vec<f32> = match s.scores {
        Scores::Random => values(tokens, c.data),
        Scores::Ties => (0..tokens)
            .map(|_| [-1.0, 0.0, 0.5, 2.0][rng.random_range(0..4)])
            .collect(),
        Scores::Special => (0..tokens)
            .map(|_| specials[rng.random_range(0..specials.len())])
            .collect(),
        Scores::Equal => vec![0.25; tokens],
        Scores::Uniform => (0..tokens).map(|_| rng.random_range(-4.0f32..4.0)).collect(),
    };
    let valid = match s.pad {
        Pad::All => HostValid::All,
        Pad::Mask => {
            let density = rng.random::<f64>();
            HostValid::Mask((0..tokens).map(|_| rng.random_bool(density)).collect())
        }
        Pad::Lengths => {
            let raw: Vec<u32> = (0..s.batch)
                .map(|_| rng.random_range(0..=s.seq_len as u32 + 2))
                .collect();
            let clamped = raw.iter().map(|&l| (l as usize).min(s.seq_len)).collect();
            HostValid::Lengths(raw, clamped)
        }
        Pad::None => HostValid::Mask(vec![false; tokens]),
    };
    (scores, valid)
}

// ------------------------------------------------------------------------------------------- run

/// Case `c` (operation `op`, routing part `s`) for element type `T`: on the GPU `dev`, or the
/// reference self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    match dev {
        Some(dev) if op.is_rows() => gpu_rows::<T>(dev, c, op, s),
        Some(dev) => gpu_select(dev, c, s),
        None => cpu::<T>(c, op, s),
    }
}

/// The device copies of the real tokens, at view offset `off`.
enum DevValid {
    All,
    Mask(CudaSlice<bool>, usize),
    Lengths(CudaSlice<u32>, usize),
}

impl DevValid {
    fn new(dev: &Device, v: &HostValid, off: usize) -> dropfuse::Result<Self> {
        Ok(match v {
            HostValid::All => DevValid::All,
            HostValid::Mask(m) => DevValid::Mask(dev.upload(&padded(off, m, true))?, m.len()),
            HostValid::Lengths(raw, _) => {
                DevValid::Lengths(dev.upload(&padded(off, raw, u32::MAX))?, raw.len())
            }
        })
    }
    /// Calls `f` with the view (offset `off`) as a [`Valid`].
    fn with<R>(&self, off: usize, f: impl FnOnce(Valid<'_>) -> R) -> R {
        match self {
            DevValid::All => f(Valid::All),
            DevValid::Mask(b, len) => f(Valid::Mask(&b.slice(off..off + len))),
            DevValid::Lengths(b, len) => f(Valid::Lengths(&b.slice(off..off + len))),
        }
    }
}

/// Selects on the GPU into a routing of `capacity` index entries: the scores at view offset
/// `xo`, the mask or lengths at `yo`. Appends a difference if the scores changed.
fn select_on_gpu(
    dev: &Device,
    c: &Case,
    s: &Spec,
    (scores, valid): (&[f32], &HostValid),
    capacity: usize,
    bad: &mut Vec<String>,
) -> dropfuse::Result<TokenRouting> {
    let st = dev.stream();
    let fill = sentinel::<f32>();
    let host = padded(c.xo, scores, fill);
    let sd = dev.upload(&host)?;
    let dv = DevValid::new(dev, valid, c.yo)?;
    let mut r = TokenRouting::new(st, s.batch, s.seq_len, capacity)?;
    let view = sd.slice(c.xo..c.xo + scores.len());
    dv.with(c.yo, |v| match s.sel {
        Select::TopK(cap) => r.top_k(st, &view, v, cap),
        Select::Global(q) => r.global(st, &view, v, q),
    })?;
    compare(
        "scores (must be unchanged)",
        &dev.download(&sd)?,
        0,
        &host,
        fill,
        false,
        bad,
    );
    Ok(r)
}

/// The GPU routing against the reference's: the offsets (the true counts), the first
/// `min(total, capacity)` indices, and `check_capacity` (the total, or `capacity` beyond it).
fn compare_routing(
    dev: &Device,
    got: &TokenRouting,
    want: &Routing,
    bad: &mut Vec<String>,
) -> dropfuse::Result<()> {
    let st = dev.stream();
    let (offsets, indices) = got.download(st)?;
    compare("offsets", &offsets, 0, want.offsets(), 0, false, bad);
    let m = want.total().min(got.capacity());
    compare("indices", &indices, 0, &want.indices()[..m], 0, false, bad);
    let checked = got.check_capacity(st, usize::MAX);
    let fits = want.total() <= got.capacity();
    match checked {
        Ok(t) if fits && t == want.total() => {}
        Err(ref e) if !fits && e.argument() == Some("capacity") => {}
        other => bad.push(format!(
            "check_capacity: {other:?} for a total of {} and a capacity of {}",
            want.total(),
            got.capacity()
        )),
    }
    Ok(())
}

/// A selection kernel on the GPU against the reference: routing, capacity check, threshold.
fn gpu_select(dev: &Device, c: &Case, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let (scores, valid) = inputs(c, s);
    let (want, threshold) = s.sel.route(&scores, s.seq_len, valid.reference())?;
    let mut bad = Vec::new();
    let r = select_on_gpu(dev, c, s, (&scores, &valid), s.capacity(want.total())?, &mut bad)?;
    compare_routing(dev, &r, &want, &mut bad)?;
    if let Select::Global(_) = s.sel {
        let got = r.threshold(dev.stream())?;
        let same = match (got, threshold) {
            (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            (a, b) => a.is_none() && b.is_none(),
        };
        if !same {
            bad.push(format!("threshold: got {got:?}, want {threshold:?}"));
        }
    }
    Ok(bad)
}

/// A row kernel on the GPU (through the GPU's selection or the uploaded reference routing)
/// against the reference, with the rows at or beyond `min(total, capacity, rows)` left alone.
fn gpu_rows<T: FuzzElement>(dev: &Device, c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (scores, valid) = inputs(c, s);
    let (want, _) = s.sel.route(&scores, s.seq_len, valid.reference())?;
    let total = want.total();
    let capacity = s.capacity(total)?;
    let rows = plus(total, s.rows);
    let limit = total.min(capacity).min(rows);
    let mut bad = Vec::new();
    let routing = match s.src {
        Src::Select => {
            let r = select_on_gpu(dev, c, s, (&scores, &valid), capacity, &mut bad)?;
            compare_routing(dev, &r, &want, &mut bad)?;
            r
        }
        Src::Upload => match TokenRouting::upload(st, &want, capacity) {
            Ok(_) if capacity < total => {
                bad.push(format!(
                    "upload into {capacity} entries of a total of {total} succeeded"
                ));
                return Ok(bad);
            }
            Ok(r) => r,
            Err(e) if capacity < total && e.argument() == Some("capacity") => return Ok(bad),
            Err(e) => return Err(e),
        },
    };

    let (h, n, tokens) = (s.hidden, s.numel(), s.tokens());
    let (xo, yo) = (c.xo, c.yo);
    let fill = sentinel::<T>();
    // Inputs of `max(total, rows)` compact rows: the reference reads `total`, the GPU `rows`.
    let brows = total.max(rows);
    let late: Vec<usize> = check::pairs(&want)
        .into_iter()
        .filter(|&(r, _)| r >= limit)
        .map(|(_, flat)| flat)
        .collect();
    // The rows of the tokens of compact rows at or beyond the limit keep `before`.
    let keep_late = |want: &mut [T], before: &[T]| {
        for &flat in &late {
            want[flat * h..(flat + 1) * h].copy_from_slice(&before[flat * h..(flat + 1) * h]);
        }
    };
    // The first `limit` rows of `rows` from `full`, the others untouched.
    let compact_out = |full: &[T]| {
        let mut v = vec![fill; rows * h];
        v[..limit * h].copy_from_slice(&full[..limit * h]);
        v
    };
    let k = op.name();
    match op {
        Op::Gather => {
            let x: Vec<T> = values(n, c.data ^ 1);
            let xb = dev.upload(&padded(xo, &x, fill))?;
            let mut ob = dev.upload(&padded(yo, &vec![fill; rows * h], fill))?;
            kernels::gather_tokens(
                st,
                &routing,
                h,
                &xb.slice(xo..xo + n),
                &mut ob.slice_mut(yo..yo + rows * h),
            )?;
            let want_c = compact_out(&reference::gather_tokens(&x, h, &want)?);
            compare(
                &format!("{k} out"),
                &dev.download(&ob)?,
                yo,
                &want_c,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{k} x (must be unchanged)"),
                &dev.download(&xb)?,
                xo,
                &x,
                fill,
                false,
                &mut bad,
            );
        }
        Op::ScatterAdd => {
            let x: Vec<T> = values(n, c.data ^ 1);
            let branch: Vec<T> = values(brows * h, c.data ^ 2);
            let gate: Vec<f32> = values(tokens, c.data ^ 3);
            let mut want_res = x.clone();
            reference::scatter_add_tokens(&mut want_res, h, &want, &branch, &gate)?;
            keep_late(&mut want_res, &x);
            let mut rb = dev.upload(&padded(xo, &x, fill))?;
            let bb = dev.upload(&padded(yo, &branch[..rows * h], fill))?;
            let gb = dev.upload(&gate)?;
            kernels::scatter_add_tokens(
                st,
                &routing,
                h,
                &mut rb.slice_mut(xo..xo + n),
                &bb.slice(yo..yo + rows * h),
                &gb,
            )?;
            compare(
                &format!("{k} residual"),
                &dev.download(&rb)?,
                xo,
                &want_res,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{k} branch (must be unchanged)"),
                &dev.download(&bb)?,
                yo,
                &branch[..rows * h],
                fill,
                false,
                &mut bad,
            );
            compare(
                &format!("{k} gate (must be unchanged)"),
                &dev.download(&gb)?,
                0,
                &gate,
                0.0,
                false,
                &mut bad,
            );
        }
        Op::ScatterAddBackward => {
            let dy: Vec<T> = values(n, c.data ^ 1);
            let branch: Vec<T> = values(brows * h, c.data ^ 2);
            let gate: Vec<f32> = values(tokens, c.data ^ 3);
            let grads = reference::scatter_add_tokens_backward(&dy, h, &want, &branch, &gate)?;
            let mut want_gate = grads.d_gate.clone();
            for &flat in &late {
                want_gate[flat] = 0.0;
            }
            let gate_fill = f32::from_bits(0xDEAD_BEEF);
            let dyb = dev.upload(&padded(xo, &dy, fill))?;
            let bb = dev.upload(&padded(yo, &branch[..rows * h], fill))?;
            let gb = dev.upload(&gate)?;
            let mut dbb = dev.upload(&padded(yo, &vec![fill; rows * h], fill))?;
            let mut dgb = dev.upload(&padded(0, &vec![gate_fill; tokens], gate_fill))?;
            kernels::scatter_add_tokens_backward(
                st,
                &routing,
                h,
                &dyb.slice(xo..xo + n),
                &bb.slice(yo..yo + rows * h),
                &gb,
                &mut dbb.slice_mut(yo..yo + rows * h),
                &mut dgb.slice_mut(0..tokens),
            )?;
            let want_db = compact_out(&grads.d_branch);
            compare(
                &format!("{k} d_branch"),
                &dev.download(&dbb)?,
                yo,
                &want_db,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{k} d_gate"),
                &dev.download(&dgb)?,
                0,
                &want_gate,
                gate_fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{k} d_out (must be unchanged)"),
                &dev.download(&dyb)?,
                xo,
                &dy,
                fill,
                false,
                &mut bad,
            );
        }
        Op::GatherBackward => {
            let d_c: Vec<T> = values(brows * h, c.data ^ 2);
            let d_x: Vec<T> = values(n, c.data ^ 4);
            let mut want_dx = d_x.clone();
            reference::gather_tokens_backward(&d_c, h, &want, &mut want_dx)?;
            keep_late(&mut want_dx, &d_x);
            let dcb = dev.upload(&padded(yo, &d_c[..rows * h], fill))?;
            let mut dxb = dev.upload(&padded(xo, &d_x, fill))?;
            kernels::gather_tokens_backward(
                st,
                &routing,
                h,
                &dcb.slice(yo..yo + rows * h),
                &mut dxb.slice_mut(xo..xo + n),
            )?;
            compare(
                &format!("{k} d_x"),
                &dev.download(&dxb)?,
                xo,
                &want_dx,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{k} d_compact (must be unchanged)"),
                &dev.download(&dcb)?,
                yo,
                &d_c[..rows * h],
                fill,
                false,
                &mut bad,
            );
        }
        Op::TopK | Op::Global => unreachable!("{} is a selection", op.name()),
    }
    Ok(bad)
}

/// The reference on case `c` against the contract re-derived in `examples/checks/routing.rs`:
/// the selection (and the host bound of the capacity), and a row kernel's operation.
fn cpu<T: FuzzElement>(c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let (scores, valid) = inputs(c, s);
    let mut checks = Checks::new();
    let r = check::check_selection(&mut checks, &scores, s.seq_len, valid.reference(), s.sel)?;
    let total = r.total();
    if s.cap == Cap::Bound {
        let bound = s.capacity(total)?;
        checks.expect("max_selected_* bounds the total", bound >= total, || {
            format!("bound {bound} < total {total}")
        });
    }
    let (h, n, tokens) = (s.hidden, s.numel(), s.tokens());
    let brows = total.max(plus(total, s.rows));
    match op {
        Op::TopK | Op::Global => {}
        Op::Gather => check::check_gather(&mut checks, &values::<T>(n, c.data ^ 1), h, &r)?,
        Op::ScatterAdd => check::check_scatter_add(
            &mut checks,
            &values::<T>(n, c.data ^ 1),
            h,
            &r,
            &values::<T>(brows * h, c.data ^ 2),
            &values::<f32>(tokens, c.data ^ 3),
        )?,
        Op::ScatterAddBackward => check::check_scatter_add_backward(
            &mut checks,
            &values::<T>(n, c.data ^ 1),
            h,
            &r,
            &values::<T>(brows * h, c.data ^ 2),
            &values::<f32>(tokens, c.data ^ 3),
        )?,
        Op::GatherBackward => check::check_gather_backward(
            &mut checks,
            &values::<T>(brows * h, c.data ^ 2),
            h,
            &r,
            &values::<T>(n, c.data ^ 4),
        )?,
    }
    Ok(checks.failures())
}
