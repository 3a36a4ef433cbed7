//! Structured dropout cases (`dropfuse::structured` against `dropfuse::reference::structured`,
//! bit for bit: decision masks and outputs).
//!
//! Kernels: `structured_mask`, `structured_forward`, `structured_forward_maskless`,
//! `structured_forward_inplace`, `structured_forward_maskless_inplace`, `structured_backward`
//! (from a stored decision mask), `structured_backward_maskless`, `structured_backward_inplace`,
//! `structured_backward_maskless_inplace`. Keys besides `dtype`, `kernel`, `p`, `seed`, `offset`
//! and `data`:
//!
//! * `shape`: `D0xD1x...`, rank 1 to 10 (extents of 1, around the block widths 32 and 64, long
//!   rows; ranks 9 and 10 with alternating shared axes exceed the kernels' 8 groups);
//! * `layout`: `channel` (`[N, C, *spatial]`, rank >= 2), `locked:A` (axis `A` shared), `rows`
//!   (embedding rows, rank 2) or `axes:A.B...` (any set, `axes:-` for none), built through the
//!   matching constructor of `StructuredDropout` and of `reference::structured::Layout`; a layout
//!   that collapses into more than `structured::MAX_GROUPS` groups must be rejected as `axes`
//!   before anything runs (the case checks that instead);
//! * `do`: the decision offset (`do + decisions <= 2^64 - 1`; 0, small, around 2^32, the largest);
//! * `xo`, `yo`, `mo`: view offsets of the input / in-place data, of the output, of the masks.
//!
//! Without a GPU the case checks the safe API's host side (its groups give the contract's
//! decision indices; its rejection of too many groups) and runs the reference through
//! `examples/checks/structured.rs`.

use dropfuse::dropout::mask_words;
use dropfuse::reference::structured as reference;
use dropfuse::structured::{groups, MAX_GROUPS};
use dropfuse::Device;
use rand::rngs::StdRng;
use rand::Rng;

use crate::checks::structured::{self as check, Kind};
use crate::checks::Checks;
use crate::{
    compare, compare_out_of_place, dims_text, draw_p, draw_size_limit, draw_u64, padded, parse_dims,
    sentinel, values, Case, Fields, FuzzElement, Kernel, Spec as CaseSpec, MASK_SENTINEL,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Mask,
    Forward,
    ForwardMaskless,
    ForwardInplace,
    ForwardMasklessInplace,
    Backward,
    BackwardMaskless,
    BackwardInplace,
    BackwardMasklessInplace,
}

const KEYS: [&str; 12] = [
    "dtype", "kernel", "shape", "layout", "p", "seed", "offset", "do", "xo", "yo", "mo", "data",
];

/// The largest rank drawn or parsed.
const MAX_RANK: usize = 10;

impl Op {
    pub const ALL: [Op; 9] = [
        Op::Mask,
        Op::Forward,
        Op::ForwardMaskless,
        Op::ForwardInplace,
        Op::ForwardMasklessInplace,
        Op::Backward,
        Op::BackwardMaskless,
        Op::BackwardInplace,
        Op::BackwardMasklessInplace,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::Mask => "structured_mask",
            Op::Forward => "structured_forward",
            Op::ForwardMaskless => "structured_forward_maskless",
            Op::ForwardInplace => "structured_forward_inplace",
            Op::ForwardMasklessInplace => "structured_forward_maskless_inplace",
            Op::Backward => "structured_backward",
            Op::BackwardMaskless => "structured_backward_maskless",
            Op::BackwardInplace => "structured_backward_inplace",
            Op::BackwardMasklessInplace => "structured_backward_maskless_inplace",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        &KEYS
    }
    fn writes_mask(self) -> bool {
        matches!(self, Op::Mask | Op::Forward | Op::ForwardInplace)
    }
    fn reads_mask(self) -> bool {
        matches!(self, Op::Backward | Op::BackwardInplace)
    }
    fn in_place(self) -> bool {
        matches!(
            self,
            Op::ForwardInplace
                | Op::ForwardMasklessInplace
                | Op::BackwardInplace
                | Op::BackwardMasklessInplace
        )
    }
}

/// The layout constructor of a case (`Copy`, unlike `checks::structured::Kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKey {
    Channel,
    Locked(usize),
    Rows,
    /// Bit `k`: axis `k` shared.
    Axes(u16),
}

impl LayoutKey {
    fn kind(self) -> Kind {
        match self {
            LayoutKey::Channel => Kind::Channel,
            LayoutKey::Locked(a) => Kind::Locked(a),
            LayoutKey::Rows => Kind::Rows,
            LayoutKey::Axes(bits) => Kind::Axes((0..16).filter(|k| bits >> k & 1 == 1).collect()),
        }
    }

    fn text(self) -> String {
        match self {
            LayoutKey::Channel => "channel".into(),
            LayoutKey::Locked(a) => format!("locked:{a}"),
            LayoutKey::Rows => "rows".into(),
            LayoutKey::Axes(0) => "axes:-".into(),
            LayoutKey::Axes(bits) => {
                let axes: Vec<String> = (0..16)
                    .filter(|k| bits >> k & 1 == 1)
                    .map(|k| k.to_string())
                    .collect();
                format!("axes:{}", axes.join("."))
            }
        }
    }

    fn parse(text: &str) -> Result<LayoutKey, String> {
        let bad = || {
            format!("layout: expected channel, rows, locked:A or axes:A.B... (axes:- for none), got {text:?}")
        };
        Ok(match text {
            "channel" => LayoutKey::Channel,
            "rows" => LayoutKey::Rows,
            "axes:-" => LayoutKey::Axes(0),
            _ => {
                if let Some(a) = text.strip_prefix("locked:") {
                    LayoutKey::Locked(a.parse().map_err(|_| bad())?)
                } else if let Some(list) = text.strip_prefix("axes:") {
                    let mut bits = 0u16;
                    for a in list.split('.') {
                        let a: u32 = a.parse().map_err(|_| bad())?;
                        if a >= MAX_RANK as u32 || bits >> a & 1 == 1 {
                            return Err(format!(
                                "layout: axes must be distinct and < {MAX_RANK}, got {text:?}"
                            ));
                        }
                        bits |= 1 << a;
                    }
                    LayoutKey::Axes(bits)
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

/// The structured part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    dims: [usize; MAX_RANK],
    rank: usize,
    layout: LayoutKey,
    decision_offset: u64,
}

impl Spec {
    fn shape(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "shape" => dims_text(self.shape()),
            "layout" => self.layout.text(),
            "do" => self.decision_offset.to_string(),
            _ => unreachable!("structured cases have no key {key}"),
        }
    }

    pub fn parse(_op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let ranks: Vec<usize> = (1..=MAX_RANK).collect();
        let shape = parse_dims("shape", f.get("shape")?, &ranks)?;
        let layout = LayoutKey::parse(f.get("layout")?)?;
        let mut dims = [0usize; MAX_RANK];
        dims[..shape.len()].copy_from_slice(&shape);
        let spec = Spec {
            dims,
            rank: shape.len(),
            layout,
            decision_offset: f.num("do")?,
        };
        let l = layout
            .kind()
            .layout(&shape)
            .map_err(|e| format!("layout: {} for shape {shape:?}: {e}", layout.text()))?;
        if spec.decision_offset.checked_add(l.decisions() as u64).is_none() {
            return Err(format!(
                "do: do + decisions ({}) must be <= 2^64 - 1",
                l.decisions()
            ));
        }
        Ok(spec)
    }
}

// ------------------------------------------------------------------------------------------ draw

/// An extent: 1, small, around 32 and 64, medium, now and then long.
fn draw_extent(rng: &mut StdRng) -> usize {
    match rng.random_range(0..12u32) {
        0 | 1 => 1,
        2..=5 => rng.random_range(2..=8),
        6 => rng.random_range(31..=33),
        7 => rng.random_range(63..=65),
        8 => rng.random_range(100..=700),
        _ => rng.random_range(9..=40),
    }
}

/// A structured case: ranks 1 to 5 (1 in 12: 9 or 10, alternating shared axes of extent 2 or 3,
/// more groups than the kernels take), at most `max_n` elements and mostly at most 2^13.
pub fn draw(rng: &mut StdRng, dtype: dropfuse::DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let limit = draw_size_limit(rng, max_n, 1 << 13, 1 << 17);
    let (mut shape, layout) = if rng.random_range(0..12u32) == 0 {
        let rank = rng.random_range(9..=MAX_RANK);
        let shape: Vec<usize> = (0..rank).map(|_| rng.random_range(2..=3)).collect();
        let first = rng.random_range(0..2u16);
        let bits = (0..rank as u16)
            .filter(|k| k % 2 == first)
            .fold(0u16, |b, k| b | 1 << k);
        (shape, LayoutKey::Axes(bits))
    } else {
        let rank = rng.random_range(1..=5usize);
        let shape: Vec<usize> = (0..rank).map(|_| draw_extent(rng)).collect();
        let layout = match rng.random_range(0..4u32) {
            0 if rank >= 2 => LayoutKey::Channel,
            1 if rank == 2 => LayoutKey::Rows,
            1 | 2 => LayoutKey::Locked(rng.random_range(0..rank)),
            _ => LayoutKey::Axes(rng.random_range(0..1u16 << rank)),
        };
        (shape, layout)
    };
    // Shrink to the limit: halve the largest extent.
    while shape.iter().product::<usize>() > limit {
        let a = (0..shape.len()).max_by_key(|&a| shape[a]).unwrap_or(0);
        shape[a] = shape[a].div_ceil(2);
    }
    let decisions = layout
        .kind()
        .layout(&shape)
        .map(|l| l.decisions() as u64)
        .expect("drawn layouts are valid");
    let top = u64::MAX - decisions;
    let decision_offset = match rng.random_range(0..8u32) {
        0..=3 => 0,
        4 => rng.random_range(0..5000),
        5 => (1u64 << 32).saturating_sub(rng.random_range(0..=decisions + 40)),
        6 => top,
        _ => rng.random_range(0..=top),
    }
    .min(top);
    let mut dims = [0usize; MAX_RANK];
    dims[..shape.len()].copy_from_slice(&shape);
    let spec = Spec {
        dims,
        rank: shape.len(),
        layout,
        decision_offset,
    };
    Case {
        p: draw_p(rng),
        seed: draw_u64(rng),
        offset: draw_u64(rng),
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        mo: rng.random_range(0..4),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Structured(op), CaseSpec::Structured(spec))
    }
}

// ------------------------------------------------------------------------------------------- run

/// Case `c` (operation `op`, structured part `s`) for element type `T`: on the GPU `dev`, or the
/// host-side and reference self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let kind = s.layout.kind();
    let shape = s.shape();
    let layout = kind.layout(shape)?;
    let g = groups(&layout);
    let Some(dev) = dev else {
        let mut checks = Checks::new();
        let want = check::decision_indices(shape, &kind.shared(shape.len()));
        check::check_api_layout(&mut checks, &kind, shape, c.p, &want);
        let x: Vec<T> = values(c.n, c.data);
        let dy: Vec<T> = values(c.n, c.data ^ 0xd1);
        check::check_structured(
            &mut checks,
            &kind,
            shape,
            &x,
            &dy,
            c.p,
            c.state(),
            s.decision_offset,
        )?;
        return Ok(checks.failures());
    };
    let name = op.name();
    let drop = match kind.api(shape, c.p) {
        Ok(d) => d.with_decision_offset(s.decision_offset)?,
        Err(e) => {
            let axes = matches!(&e, dropfuse::Error::InvalidArgument { name: "axes", .. });
            return Ok(if g.len() > MAX_GROUPS && axes {
                Vec::new()
            } else {
                vec![format!("{name}: {} groups rejected: {e}", g.len())]
            });
        }
    };
    if g.len() > MAX_GROUPS {
        return Ok(vec![format!(
            "{name}: {} groups accepted (at most {MAX_GROUPS})",
            g.len()
        )]);
    }

    let st = dev.stream();
    let (n, words) = (c.n, mask_words(layout.decisions()));
    let state = c.state();
    let fill = sentinel::<T>();
    let x: Vec<T> = values(n, c.data);
    let want_mask = reference::mask(&layout, c.p, state, s.decision_offset)?;
    let want_y: Vec<T> = match op {
        Op::Mask => Vec::new(),
        Op::Forward | Op::ForwardMaskless | Op::ForwardInplace | Op::ForwardMasklessInplace => {
            reference::forward(&x, &layout, c.p, state, s.decision_offset)?.0
        }
        Op::Backward | Op::BackwardInplace => reference::backward_from_mask(&x, &layout, &want_mask, c.p)?,
        Op::BackwardMaskless | Op::BackwardMasklessInplace => {
            reference::backward(&x, &layout, c.p, state, s.decision_offset)?
        }
    };
    let x_host = padded(c.xo, &x, fill);
    let mask_in_host = padded(c.mo, &want_mask, MASK_SENTINEL);
    let mut xb = dev.upload(&x_host)?;
    let mb = dev.upload(&mask_in_host)?;
    let mut yb = dev.upload(&padded(c.yo, &vec![fill; n], fill))?;
    let mut mout = dev.upload(&padded(c.mo, &vec![MASK_SENTINEL; words], MASK_SENTINEL))?;
    let (xr, yr, mr) = (c.xo..c.xo + n, c.yo..c.yo + n, c.mo..c.mo + words);
    match op {
        Op::Mask => drop.mask(st, state, &mut mout.slice_mut(mr))?,
        Op::Forward => drop.forward(
            st,
            state,
            &xb.slice(xr),
            &mut yb.slice_mut(yr),
            &mut mout.slice_mut(mr),
        )?,
        Op::ForwardMaskless => drop.forward_maskless(st, state, &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Op::ForwardInplace => {
            drop.forward_inplace(st, state, &mut xb.slice_mut(xr), &mut mout.slice_mut(mr))?
        }
        Op::ForwardMasklessInplace => drop.forward_maskless_inplace(st, state, &mut xb.slice_mut(xr))?,
        Op::Backward => drop.backward(st, &mb.slice(mr), &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Op::BackwardMaskless => drop.backward_maskless(st, state, &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Op::BackwardInplace => drop.backward_inplace(st, &mb.slice(mr), &mut xb.slice_mut(xr))?,
        Op::BackwardMasklessInplace => drop.backward_maskless_inplace(st, state, &mut xb.slice_mut(xr))?,
    }
    dev.synchronize()?;

    let mut bad = Vec::new();
    // A kernel without a mask output must leave the mask buffer alone.
    let mask_want: &[u32] = if op.writes_mask() { &want_mask } else { &[] };
    compare(
        &format!("{name} mask"),
        &dev.download(&mout)?,
        c.mo,
        mask_want,
        MASK_SENTINEL,
        false,
        &mut bad,
    );
    if op.reads_mask() {
        compare(
            &format!("{name} input mask (must be unchanged)"),
            &dev.download(&mb)?,
            0,
            &mask_in_host,
            0,
            false,
            &mut bad,
        );
    }
    if op.in_place() {
        compare(
            &format!("{name} data (in place)"),
            &dev.download(&xb)?,
            c.xo,
            &want_y,
            fill,
            true,
            &mut bad,
        );
    } else {
        compare_out_of_place(name, dev, (&yb, c.yo, &want_y), (&xb, &x_host), &mut bad)?;
    }
    Ok(bad)
}
