//! Structured dropout on the CPU: channel (spatial) dropout, locked (variational) dropout and
//! embedding-row dropout, the oracle of the structured-mask kernels.
//!
//! All three drop whole groups of elements with one decision per group; they are one operation
//! over a [`Layout`] that says which axes of a tensor share a decision. Plain and slow on purpose:
//! every element's decision is found by decomposing its index. The contract:
//!
//! 1. **Layout.** A row-major (C-contiguous) tensor of shape `[D_0, ..., D_{r-1}]` (`r >= 1`,
//!    every `D_k >= 1`, the element count fits `usize`) and a set of *shared* axes. The decision
//!    tensor is the shape with every shared axis removed (its extent taken as 1); it has
//!    `decisions = prod_{k not shared} D_k` entries (1 if every axis is shared).
//! 2. **Decision index.** Element `x[i_0, ..., i_{r-1}]` follows decision
//!    `d = sum_{k not shared} i_k * prod_{j > k, j not shared} D_j`: the row-major linear index of
//!    the element's position with the shared axes removed ([`Layout::decision_of`]). The three
//!    structured dropouts are:
//!    * **Channel / spatial dropout** (`Dropout1d/2d/3d`; [`Layout::channel`]): shape
//!      `[N, C, *spatial]` (`r >= 2`, any number of spatial axes, NCHW order), axes `2..r` shared:
//!      one decision per `(n, c)`, `d = n * C + c = e / S` for element `e` with
//!      `S = prod spatial` (`S = 1` without spatial axes, which is plain dropout).
//!    * **Locked (variational) dropout** ([`Layout::locked`]): any shape and one locked axis `a`
//!      (`0 <= a < r`): the mask is shared along `a`, e.g. RNN activations `(T, B, H)` with `a = 0`
//!      get a `(1, B, H)` mask, `d = b * H + h`, the same for every time step (AWD-LSTM).
//!    * **Embedding-row dropout** ([`Layout::embedding_rows`]): a weight `[V, E]`, axis 1 shared:
//!      one decision per row, `d = v`; the row is zeroed or scaled by `1 / (1 - p)`, as in
//!      AWD-LSTM's `embedded_dropout`. It is `locked([V, E], 1)`.
//!
//!    [`Layout::shared_axes`] builds any other set (e.g. channels-last `[N, H, W, C]` channel
//!    dropout shares axes 1 and 2). An axis of extent 1 changes nothing whether shared or not: a
//!    layout whose shared axes all have extent 1 is plain dropout, element by element.
//! 3. **Decisions** are the dropout contract's ([`crate::reference`] points 2 to 4) applied to
//!    decision indices instead of element indices: decision `d` uses global index
//!    `decision_offset + d`, with `(seed, offset)` from the [`PhiloxState`], and is kept iff
//!    `word(decision_offset + d) >= drop_threshold(p)` ([`dropout::keep`]). `decision_offset`
//!    plays the role of dropout's `element_offset`: a shard of whole decision rows (samples
//!    `n0..` of a channel-dropout batch, with `decision_offset = n0 * C`; rows `v0..` of a
//!    vocabulary-parallel embedding, with `decision_offset = v0`) gets the bits of the whole
//!    tensor.
//! 4. **Mask.** The bit-packed mask holds one bit per **decision**, not per element:
//!    `ceil(decisions / 32)` `u32` words, bit `j` of word `w` is decision `32 * w + j`, unused high
//!    bits of the last word 0. It is exactly
//!    [`dropout::mask(p, state, decision_offset, decisions)`](dropout::mask) ([`mask`]).
//!    [`element_mask`] expands it to the per-element layout of dropout's masks (bit `e` = bit
//!    `decision_of(e)`), so a structured forward equals
//!    [`dropout::apply_mask`] with the expanded mask.
//! 5. **Arithmetic** is dropout's (point 6): element `e` of `y` is
//!    `T::from_f32(x[e].to_f32() * keep_scale(p))` if its decision is kept, else `+0` (even for
//!    NaN or infinite `x`). The scale is [`dropout::keep_scale`], `f32(1 / (1 - p))`, `0` at
//!    `p = 1`. For `f32`, [`half::f16`] and [`half::bf16`].
//! 6. **Operations.** [`forward`] returns `(y, mask)`; [`backward_from_mask`] applies a stored
//!    decision mask to `dy`; [`backward`] regenerates it from Philox and equals the forward's
//!    arithmetic with the same `(p, state, decision_offset)`; [`apply_mask`] is the shared core
//!    with any scale.
//! 7. **Validation**, before any work, as [`Error::InvalidArgument`] named: `shape` (rank 0, a zero
//!    extent, an element count over `usize`; rank below 2 for [`Layout::channel`], rank other than
//!    2 for [`Layout::embedding_rows`]; a mask of the layout, [`mask`]'s or [`element_mask`]'s,
//!    that cannot be allocated), `axis` (locked axis `>= r`), `axes` (a shared axis `>= r` or
//!    repeated), `x` / `dy` (length other than the layout's element count), `mask` (length other
//!    than `ceil(decisions / 32)`), `p` (not finite in `[0, 1]`) and `decision_offset`
//!    (`decision_offset + decisions` overflows `u64`).

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::dropout::{self, drop_threshold, keep_scale, mask_bit, mask_words};
use crate::rng::PhiloxState;

/// Bits per mask word.
const MASK_BITS: usize = 32;

/// Which axes of a tensor share one dropout decision (contract points 1 and 2): a validated shape,
/// its shared axes and the decision strides derived from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The tensor's shape, row-major.
    shape: Vec<usize>,
    /// `shared[k]`: axis `k` shares one decision along its extent.
    shared: Vec<bool>,
    /// `decision_strides[k]`: `prod_{j > k, j not shared} D_j`, or 0 for a shared axis.
    decision_strides: Vec<usize>,
    /// `prod D_k`.
    numel: usize,
    /// `prod_{k not shared} D_k`.
    decisions: usize,
}

impl Layout {
    /// The general layout: `shape` (rank >= 1, every extent >= 1) with the axes in `axes` shared
    /// (each `< rank`, no repeats; may be empty, which is plain dropout, or every axis, which is
    /// one decision for the whole tensor).
    pub fn shared_axes(shape: &[usize], axes: &[usize]) -> Result<Layout> {
        let numel = check_shape(shape)?;
        let mut shared = vec![false; shape.len()];
        for &a in axes {
            if a >= shape.len() {
                return Err(Error::invalid(
                    "axes",
                    format!("axes < rank {}", shape.len()),
                    format!("{axes:?}"),
                ));
            }
            if shared[a] {
                return Err(Error::invalid(
                    "axes",
                    "distinct axes",
                    format!("{axes:?} (axis {a} repeated)"),
                ));
            }
            shared[a] = true;
        }
        let mut decision_strides = vec![0usize; shape.len()];
        let mut stride = 1usize;
        for k in (0..shape.len()).rev() {
            if !shared[k] {
                decision_strides[k] = stride;
                // Divides numel, so it cannot overflow.
                stride *= shape[k];
            }
        }
        Ok(Layout {
            shape: shape.to_vec(),
            shared,
            decision_strides,
            numel,
            decisions: stride,
        })
    }

    /// Channel (spatial) dropout, `Dropout1d/2d/3d`: `shape = [N, C, *spatial]` (rank >= 2), one
    /// decision per `(n, c)`, decision index `n * C + c`.
    pub fn channel(shape: &[usize]) -> Result<Layout> {
        if shape.len() < 2 {
            return Err(Error::invalid(
                "shape",
                "[N, C, *spatial] (at least 2 dims)",
                format!("{shape:?} ({} dims)", shape.len()),
            ));
        }
        let spatial: Vec<usize> = (2..shape.len()).collect();
        Layout::shared_axes(shape, &spatial)
    }

    /// Locked (variational) dropout: one mask shared along `axis` (e.g. time, axis 0 of
    /// `(T, B, H)`); the decision index is the row-major index over the other axes.
    pub fn locked(shape: &[usize], axis: usize) -> Result<Layout> {
        check_shape(shape)?;
        if axis >= shape.len() {
            return Err(Error::invalid(
                "axis",
                format!("an axis < rank {} of {shape:?}", shape.len()),
                axis,
            ));
        }
        Layout::shared_axes(shape, &[axis])
    }

    /// Embedding-row dropout of a weight `shape = [V, E]`: one decision per row `v` (decision
    /// index `v`); `locked(shape, 1)`.
    pub fn embedding_rows(shape: &[usize]) -> Result<Layout> {
        if shape.len() != 2 {
            return Err(Error::invalid(
                "shape",
                "[V, E] (2 dims)",
                format!("{shape:?} ({} dims)", shape.len()),
            ));
        }
        Layout::shared_axes(shape, &[1])
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Whether axis `k` is shared (one decision along it).
    ///
    /// # Panics
    /// If `k >= rank`.
    pub fn is_shared(&self, k: usize) -> bool {
        self.shared[k]
    }

    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Decisions (mask bits): the product of the extents of the axes that are not shared.
    pub fn decisions(&self) -> usize {
        self.decisions
    }

    /// Mask words: `ceil(decisions / 32)`.
    pub fn mask_words(&self) -> usize {
        mask_words(self.decisions)
    }

    /// The decision index of row-major element `e` (contract point 2).
    ///
    /// # Panics
    /// If `e >= numel`.
    pub fn decision_of(&self, e: usize) -> usize {
        assert!(
            e < self.numel,
            "element {e} out of range ({} elements)",
            self.numel
        );
        let mut rest = e;
        let mut d = 0;
        for k in (0..self.shape.len()).rev() {
            let i = rest % self.shape[k];
            rest /= self.shape[k];
            d += i * self.decision_strides[k];
        }
        d
    }
}

/// Checks a shape: rank >= 1, every extent >= 1, the element count fits `usize`; returns it.
fn check_shape(shape: &[usize]) -> Result<usize> {
    if shape.is_empty() {
        return Err(Error::invalid("shape", "at least 1 dim", "[] (0 dims)"));
    }
    if shape.contains(&0) {
        return Err(Error::invalid("shape", "every dim >= 1", format!("{shape:?}")));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::invalid(
                "shape",
                "a number of elements that fits in usize",
                format!("{shape:?}"),
            )
        })
}

/// Rejects data whose length is not the layout's element count; `name` is `x` or `dy`.
fn check_len(name: &'static str, len: usize, layout: &Layout) -> Result<()> {
    if len == layout.numel {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("{} elements (shape {:?})", layout.numel, layout.shape),
            format!("{len} elements"),
        ))
    }
}

/// Rejects a decision mask that is not exactly `ceil(decisions / 32)` words.
fn check_mask_len(mask: &[u32], layout: &Layout) -> Result<()> {
    let expected = layout.mask_words();
    if mask.len() == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            "mask",
            format!("{expected} words (ceil({} decisions / 32))", layout.decisions),
            format!("{} words", mask.len()),
        ))
    }
}

/// Rejects a `decision_offset` with `decision_offset + decisions` over `u64`.
fn check_decision_offset(decision_offset: u64, layout: &Layout) -> Result<()> {
    match decision_offset.checked_add(layout.decisions as u64) {
        Some(_) => Ok(()),
        None => Err(Error::invalid(
            "decision_offset",
            format!(
                "decision_offset + decisions <= 2^64 - 1 (decisions = {})",
                layout.decisions
            ),
            decision_offset,
        )),
    }
}

/// The bit-packed decision mask (contract points 3 and 4): `ceil(decisions / 32)` words, bit `d`
/// is decision `d`, kept iff `word(decision_offset + d) >= drop_threshold(p)`; exactly
/// `dropout::mask(p, state, decision_offset, decisions)`.
pub fn mask(layout: &Layout, p: f64, state: PhiloxState, decision_offset: u64) -> Result<Vec<u32>> {
    drop_threshold(p)?;
    check_decision_offset(decision_offset, layout)?;
    dropout::mask_sized(p, state, decision_offset, layout.decisions, "shape")
}

/// The decision mask expanded to one bit per element (dropout's mask layout, `ceil(numel / 32)`
/// words): bit `e` is bit `decision_of(e)` of `mask`.
pub fn element_mask(layout: &Layout, mask: &[u32]) -> Result<Vec<u32>> {
    check_mask_len(mask, layout)?;
    let mut words = crate::alloc::filled("shape", mask_words(layout.numel), 0u32)?;
    for e in 0..layout.numel {
        if mask_bit(mask, layout.decision_of(e)) {
            words[e / MASK_BITS] |= 1 << (e % MASK_BITS);
        }
    }
    Ok(words)
}

/// The element-wise core: element `e` becomes `T::from_f32(v.to_f32() * scale)` if decision
/// `decision_of(e)` is kept, else `+0`; `name` is the data's argument name.
fn apply<T: Element>(
    name: &'static str,
    v: &[T],
    layout: &Layout,
    mask: &[u32],
    scale: f32,
) -> Result<Vec<T>> {
    check_len(name, v.len(), layout)?;
    check_mask_len(mask, layout)?;
    let out = v
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            if mask_bit(mask, layout.decision_of(e)) {
                T::from_f32(v.to_f32() * scale)
            } else {
                T::from_f32(0.0)
            }
        })
        .collect();
    Ok(out)
}

/// `x` with a decision mask applied (contract point 5): every element follows its decision, kept
/// ones scaled by `scale` (one `f32` multiply, one round-to-nearest-even), dropped ones `+0`.
pub fn apply_mask<T: Element>(x: &[T], layout: &Layout, mask: &[u32], scale: f32) -> Result<Vec<T>> {
    apply("x", x, layout, mask, scale)
}

/// Structured dropout forward: `(y, mask)` for `x` of the layout's shape; `mask` is the decision
/// mask ([`mask`]), `y` is [`apply_mask`] with [`keep_scale`].
pub fn forward<T: Element>(
    x: &[T],
    layout: &Layout,
    p: f64,
    state: PhiloxState,
    decision_offset: u64,
) -> Result<(Vec<T>, Vec<u32>)> {
    check_len("x", x.len(), layout)?;
    let m = mask(layout, p, state, decision_offset)?;
    let y = apply("x", x, layout, &m, keep_scale(p)?)?;
    Ok((y, m))
}

/// Structured dropout backward from a stored decision mask: `dx_e = kept(decision_of(e)) ? dy_e *
/// scale : +0`.
pub fn backward_from_mask<T: Element>(dy: &[T], layout: &Layout, mask: &[u32], p: f64) -> Result<Vec<T>> {
    check_len("dy", dy.len(), layout)?;
    check_mask_len(mask, layout)?;
    let scale = keep_scale(p)?;
    apply("dy", dy, layout, mask, scale)
}

/// Structured dropout backward without a stored mask: regenerates the decision mask from Philox,
/// so with the forward's `(p, state, decision_offset)` it equals [`backward_from_mask`] with the
/// forward's mask.
pub fn backward<T: Element>(
    dy: &[T],
    layout: &Layout,
    p: f64,
    state: PhiloxState,
    decision_offset: u64,
) -> Result<Vec<T>> {
    check_len("dy", dy.len(), layout)?;
    let m = mask(layout, p, state, decision_offset)?;
    apply("dy", dy, layout, &m, keep_scale(p)?)
}
