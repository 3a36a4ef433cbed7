//! Structured dropout, `dropfuse::reference::structured`: the decision index re-derived from the
//! shape and the shared axes (and from the kernels' collapsed groups, `structured::groups`), the
//! decisions as the dropout contract on decision indices, the element-wise arithmetic, the
//! backward, and shards by decision offset.

use dropfuse::reference::dropout as dropout_ref;
use dropfuse::reference::philox::element_word;
use dropfuse::reference::structured::{self as reference, Layout};
use dropfuse::structured::{groups, StructuredDropout, MAX_GROUPS};
use dropfuse::{Element, PhiloxState};

use super::{bit_diff, word_diff, Checks};

/// How a layout is built: the constructors of `Layout` (and of `StructuredDropout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `[N, C, *spatial]`, the spatial axes shared.
    Channel,
    /// One locked (shared) axis.
    Locked(usize),
    /// `[V, E]`, one decision per row.
    Rows,
    /// Any set of shared axes.
    Axes(Vec<usize>),
}

impl Kind {
    /// The layout of `shape`, through the reference's constructor of this kind.
    pub fn layout(&self, shape: &[usize]) -> dropfuse::Result<Layout> {
        match self {
            Kind::Channel => Layout::channel(shape),
            Kind::Locked(a) => Layout::locked(shape, *a),
            Kind::Rows => Layout::embedding_rows(shape),
            Kind::Axes(axes) => Layout::shared_axes(shape, axes),
        }
    }

    /// The safe API's dropout of `shape`, through its constructor of this kind.
    pub fn api(&self, shape: &[usize], p: f64) -> dropfuse::Result<StructuredDropout> {
        match self {
            Kind::Channel => StructuredDropout::channel(shape, p),
            Kind::Locked(a) => StructuredDropout::locked(shape, *a, p),
            Kind::Rows => StructuredDropout::embedding_rows(shape, p),
            Kind::Axes(axes) => StructuredDropout::shared_axes(shape, axes, p),
        }
    }

    /// The shared axes of a shape of rank `rank`, as the contract defines the kind.
    pub fn shared(&self, rank: usize) -> Vec<bool> {
        (0..rank)
            .map(|k| match self {
                Kind::Channel => k >= 2,
                Kind::Locked(a) => k == *a,
                Kind::Rows => k == 1,
                Kind::Axes(axes) => axes.contains(&k),
            })
            .collect()
    }
}

/// The decision index of every element, written out from the contract (point 2):
/// `d = sum_{k not shared} i_k * prod_{j > k, j not shared} D_j`.
pub fn decision_indices(shape: &[usize], shared: &[bool]) -> Vec<usize> {
    let axes: Vec<(usize, bool)> = shape.iter().copied().zip(shared.iter().copied()).collect();
    group_decision_indices(&axes)
}

/// The decision index of every element of consecutive axes or groups `(extent, shared)`
/// (outermost first): the row-major index over the non-shared ones. With the collapsed groups of
/// `structured::groups` this is the kernels' view of the layout.
pub fn group_decision_indices(groups: &[(usize, bool)]) -> Vec<usize> {
    let numel: usize = groups.iter().map(|g| g.0).product();
    (0..numel)
        .map(|e| {
            let mut rest = e;
            let mut d = 0usize;
            let mut stride = 1usize;
            for &(extent, shared) in groups.iter().rev() {
                let i = rest % extent;
                rest /= extent;
                if !shared {
                    d += i * stride;
                    stride *= extent;
                }
            }
            d
        })
        .collect()
}

/// The decision mask written out: bit `d` set iff `word(decision_offset + d) >= round(p 2^32)`.
pub fn contract_mask(p: f64, state: PhiloxState, decision_offset: u64, decisions: usize) -> Vec<u32> {
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let mut mask = vec![0u32; decisions.div_ceil(32)];
    for d in 0..decisions {
        if u64::from(element_word(state, decision_offset + d as u64)) >= threshold {
            mask[d / 32] |= 1 << (d % 32);
        }
    }
    mask
}

fn bit(mask: &[u32], d: usize) -> bool {
    (mask[d / 32] >> (d % 32)) & 1 == 1
}

/// The safe API's host side (runs without a GPU): its constructor of `kind` accepts exactly the
/// layouts of at most `MAX_GROUPS` collapsed groups (else an `axes` error), and its groups give
/// the contract's decision indices. `want` are those indices. Returns the API's dropout, if any.
pub fn check_api_layout(
    checks: &mut Checks,
    kind: &Kind,
    shape: &[usize],
    p: f64,
    want: &[usize],
) -> Option<StructuredDropout> {
    let layout = match kind.layout(shape) {
        Ok(l) => l,
        Err(e) => {
            checks.push("reference layout", Some(e.to_string()));
            return None;
        }
    };
    let g = groups(&layout);
    match kind.api(shape, p) {
        Ok(api) => {
            checks.expect(
                format!("API layout: {} <= {MAX_GROUPS} groups", g.len()),
                g.len() <= MAX_GROUPS && api.layout() == &layout,
                || format!("{} groups accepted", g.len()),
            );
            checks.push(
                "API groups give the decision indices",
                word_diff(&group_decision_indices(&g), want),
            );
            Some(api)
        }
        Err(e) => {
            let named_axes = matches!(&e, dropfuse::Error::InvalidArgument { name: "axes", .. });
            checks.expect(
                format!("API rejects {} > {MAX_GROUPS} groups as axes", g.len()),
                g.len() > MAX_GROUPS && named_axes,
                || format!("{} groups: {e}", g.len()),
            );
            None
        }
    }
}

/// Points 1 to 6 on `x` / `dy` of `shape` (`kind`): decision indices, the decision mask against
/// the Philox contract and `dropout::mask`, the forward's arithmetic and its equality with dropout's
/// `apply_mask` of the expanded mask, both backwards, and (when axis 0 is not shared and `D_0 > 1`)
/// a shard of the leading rows by decision offset. Returns the reference's `(y, mask)`.
#[allow(clippy::too_many_arguments)]
pub fn check_structured<T: Element>(
    checks: &mut Checks,
    kind: &Kind,
    shape: &[usize],
    x: &[T],
    dy: &[T],
    p: f64,
    state: PhiloxState,
    decision_offset: u64,
) -> dropfuse::Result<(Vec<T>, Vec<u32>)> {
    let layout = kind.layout(shape)?;
    let shared = kind.shared(shape.len());
    let want_d = decision_indices(shape, &shared);
    let decisions: usize = (0..shape.len())
        .filter(|&k| !shared[k])
        .map(|k| shape[k])
        .product();
    let got_d: Vec<usize> = (0..layout.numel()).map(|e| layout.decision_of(e)).collect();
    checks.expect(
        format!("{decisions} decisions, ceil(decisions / 32) mask words"),
        layout.decisions() == decisions && layout.mask_words() == decisions.div_ceil(32),
        || format!("{} decisions, {} words", layout.decisions(), layout.mask_words()),
    );
    checks.push(
        "decision_of: row-major index without the shared axes",
        word_diff(&got_d, &want_d),
    );

    let mask = reference::mask(&layout, p, state, decision_offset)?;
    let want_mask = contract_mask(p, state, decision_offset, decisions);
    checks.push(
        "mask: bit d kept iff word(decision_offset + d) >= threshold",
        word_diff(&mask, &want_mask),
    );
    checks.push(
        "mask == dropout::mask over the decisions",
        word_diff(&mask, &dropout_ref::mask(p, state, decision_offset, decisions)?),
    );

    let scale = if p == 1.0 { 0.0 } else { (1.0 / (1.0 - p)) as f32 };
    let apply = |v: &[T]| -> Vec<T> {
        (0..v.len())
            .map(|e| {
                if bit(&want_mask, want_d[e]) {
                    T::from_f32(v[e].to_f32() * scale)
                } else {
                    T::from_f32(0.0)
                }
            })
            .collect()
    };
    let (y, fwd_mask) = reference::forward(x, &layout, p, state, decision_offset)?;
    checks.push("forward's mask == mask", word_diff(&fwd_mask, &mask));
    checks.push(
        "y = kept(decision) ? round(x * scale) : +0",
        bit_diff(&y, &apply(x)),
    );
    let emask = reference::element_mask(&layout, &mask)?;
    checks.push(
        "y == dropout::apply_mask with the expanded mask",
        bit_diff(&y, &dropout_ref::apply_mask(x, &emask, scale)?),
    );
    let dx_mask = reference::backward_from_mask(dy, &layout, &mask, p)?;
    let dx = reference::backward(dy, &layout, p, state, decision_offset)?;
    checks.push(
        "backward_from_mask = the forward's arithmetic on dy",
        bit_diff(&dx_mask, &apply(dy)),
    );
    checks.push(
        "backward (mask-free) == backward_from_mask",
        bit_diff(&dx, &dx_mask),
    );

    if !shared[0] && shape[0] > 1 {
        // Rows 1.. of axis 0 are a shard whose decision 0 is decision decisions / D_0.
        let per_row = decisions / shape[0];
        let row = x.len() / shape[0];
        let mut sub = shape.to_vec();
        sub[0] -= 1;
        let shard = kind.layout(&sub)?;
        let (ys, _) = reference::forward(&x[row..], &shard, p, state, decision_offset + per_row as u64)?;
        checks.push(
            "shard of rows 1.. at decision_offset + decisions / D_0 == slice",
            bit_diff(&ys, &y[row..]),
        );
    }
    Ok((y, mask))
}
