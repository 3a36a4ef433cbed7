//! Fused bias + dropout + residual add on the CPU: `y = residual + dropout(x + bias)`, forward and
//! backward, the oracle of `kernels/bias_dropout_residual.cu` (the fusion transformer stacks run
//! after their attention and MLP blocks).
//!
//! Every output is defined bit for bit, including the bias gradient's reduction (point 4), so a
//! kernel is compared with these functions exactly. The contract:
//!
//! 1. **Shapes.** `x`, `residual` and `y` are `rows x H` row-major (`H = row_len >= 1`,
//!    `H <= 2^31`, `rows >= 1`; any `n = rows * H` elements viewed as whole rows), element type
//!    `T` (`f32`, [`half::f16`], [`half::bf16`]). The optional `bias` has exactly `H` elements and
//!    is broadcast over the rows: element `(r, j)` uses `bias[j]`. Element `i = r * H + j` of the
//!    slice is the dropout contract's global element `element_offset + i`.
//!
//! 2. **Keep decisions and mask.** Exactly dropout's ([`crate::reference`] points 2 to 5): element
//!    `i` is kept iff [`dropout::keep`]`(state, element_offset + i, drop_threshold(p))`, the scale
//!    is [`keep_scale`]`(p)` (`0` for `p = 1`), and the bit-packed mask is
//!    [`dropout::mask`]`(p, state, element_offset, n)`: `ceil(n / 32)` words over the flat index,
//!    rows do not start new words. A mask written by the fused forward can be used by
//!    [`dropout`]'s backward and vice versa.
//!
//! 3. **Forward arithmetic.** Values are widened exactly to `f32`; every step below is one `f32`
//!    operation rounded to nearest even, never a fused multiply-add (kernels use `__fadd_rn` /
//!    `__fmul_rn`); the result is rounded once to `T`:
//!    * `t = f32(x) + f32(bias[j])` (one add; without a bias `t = f32(x)` and no add happens),
//!    * kept: `u = scale * t`; dropped: `u = +0` (a select, not a multiply: a NaN or infinite
//!      `t` of a dropped element does not leak into `y`),
//!    * `o = f32(residual) + u`, `y = round_T(o)`.
//!
//!    Dropped elements take the same add as kept ones (`o = f32(residual) + 0`), which is what
//!    unfused `residual + dropout(x + bias)` computes: `y` equals `residual` bit for bit, except
//!    that a `-0` residual becomes `+0` (IEEE `-0 + +0 = +0`) and a NaN stays a NaN (payload not
//!    part of the contract, as everywhere in the crate). Consequences: `p = 0` gives
//!    `round_T(f32(r) + (f32(x) + f32(b)))` exactly (scale `1`, `1 * t = t`); `p = 1` gives
//!    `residual` (with `-0 -> +0`). A bias of all `-0` equals no bias (`v + -0 = v` for every `v`).
//!    Unfused code in `f16` / `bf16` rounds `x + b` and the dropout to `T` in between and can
//!    differ in the last bit.
//!
//! 4. **Backward.** The residual's gradient is `dy` itself (the identity: nothing is computed).
//!    With the forward's keep decisions (its stored mask, or regenerated from the same
//!    `(p, state, element_offset)`), every element has the `f32` term
//!    `g = keep ? scale * f32(dy) : +0` (one multiply). Then
//!    * `dx = round_T(g)`: bit for bit dropout's backward ([`dropout::backward_from_mask`]),
//!    * `dbias[j] = round_T(S_j)` (when the forward had a bias), where `S_j` is the chunked sum
//!      ([`skip::chunked_sum`], [`skip`] point 4) with chunk [`D_BIAS_CHUNK`] (256) of the `rows`
//!      terms `g(0, j), g(1, j), ...` in ascending row order: chunk `c` holds rows
//!      `256 c .. min(256 (c + 1), rows) - 1`, its partial is `+0 + g(256 c, j) + ...`
//!      sequentially, and `S_j = +0 + partial_0 + partial_1 + ...` sequentially; one rounding to
//!      `T` at the end. Dropped elements contribute `+0`, which changes no sum started at `+0`.
//!      On a GPU each `(column, chunk)` partial is one thread's loop over its 256 rows, written to
//!      a workspace of `ceil(rows / 256) * H` `f32`, and one thread per column adds the partials
//!      in chunk order: deterministic, run to run and GPU to GPU.
//!
//! 5. **Validation**, before anything is computed, as [`Error::InvalidArgument`] named: `row_len`
//!    (0 or above 2^31), `x` / `dy` (empty or not a whole number of rows), `residual` (not `x`'s
//!    length), `bias` (not `H` elements), `mask` (not `ceil(n / 32)` words), `p` (not a
//!    probability), `element_offset` (`element_offset + n` overflows `u64`).

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::dropout::{self, keep_scale, mask_bit, mask_words};
use crate::reference::skip;
use crate::rng::PhiloxState;

/// Rows per partial sum of the bias gradient (contract point 4); the same chunk as the
/// stochastic-depth residual's ([`skip::D_BIAS_CHUNK`]).
pub const D_BIAS_CHUNK: usize = skip::D_BIAS_CHUNK;

/// The largest row length (`2^31`): kernels index columns with 32-bit integers.
pub const MAX_ROW_LEN: usize = 1 << 31;

/// Rejects a row length of 0 or above [`MAX_ROW_LEN`].
fn check_row_len(row_len: usize) -> Result<()> {
    if row_len == 0 || row_len > MAX_ROW_LEN {
        Err(Error::invalid("row_len", "a row length in 1 ..= 2^31", row_len))
    } else {
        Ok(())
    }
}

/// The number of rows of a non-empty tensor `name` of whole rows.
fn count_rows(name: &'static str, len: usize, row_len: usize) -> Result<usize> {
    if len == 0 || len % row_len != 0 {
        Err(Error::invalid(
            name,
            format!("a non-empty whole number of rows of {row_len} elements"),
            format!("{len} elements"),
        ))
    } else {
        Ok(len / row_len)
    }
}

fn check_len(name: &'static str, len: usize, expected: usize, what: &str) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("{expected} elements ({what})"),
            format!("{len} elements"),
        ))
    }
}

fn check_mask(mask: &[u32], n: usize) -> Result<()> {
    let want = mask_words(n);
    if mask.len() == want {
        Ok(())
    } else {
        Err(Error::invalid(
            "mask",
            format!("{want} words (ceil({n} / 32))"),
            format!("{} words", mask.len()),
        ))
    }
}

fn check_element_range(element_offset: u64, n: usize) -> Result<()> {
    match element_offset.checked_add(n as u64) {
        Some(_) => Ok(()),
        None => Err(Error::invalid(
            "element_offset",
            format!("element_offset + n <= 2^64 - 1 (n = {n})"),
            element_offset,
        )),
    }
}

/// Validates the forward's data arguments (points 1 and 5); returns `n`.
fn check_forward<T: Element>(x: &[T], residual: &[T], bias: Option<&[T]>, row_len: usize) -> Result<usize> {
    check_row_len(row_len)?;
    count_rows("x", x.len(), row_len)?;
    check_len("residual", residual.len(), x.len(), "x's length")?;
    if let Some(b) = bias {
        check_len("bias", b.len(), row_len, "one per column, H")?;
    }
    Ok(x.len())
}

/// The forward of one element (contract point 3).
fn element<T: Element>(x: T, r: T, b: Option<T>, keep: bool, scale: f32) -> T {
    let u = if keep {
        let t = match b {
            Some(b) => x.to_f32() + b.to_f32(),
            None => x.to_f32(),
        };
        scale * t
    } else {
        0.0
    };
    T::from_f32(r.to_f32() + u)
}

/// `y = residual + dropout(x + bias)` with a given mask and scale (contract point 3): the shared
/// core of [`forward`] and [`forward_in_place`].
///
/// Errors: `row_len`, `x`, `residual`, `bias`, `mask`.
pub fn apply_mask<T: Element>(
    x: &[T],
    residual: &[T],
    bias: Option<&[T]>,
    row_len: usize,
    mask: &[u32],
    scale: f32,
) -> Result<Vec<T>> {
    let mut y = residual.to_vec();
    apply_mask_in_place(x, &mut y, bias, row_len, mask, scale)?;
    Ok(y)
}

/// [`apply_mask`] in place on the residual.
fn apply_mask_in_place<T: Element>(
    x: &[T],
    residual: &mut [T],
    bias: Option<&[T]>,
    row_len: usize,
    mask: &[u32],
    scale: f32,
) -> Result<()> {
    let n = check_forward(x, residual, bias, row_len)?;
    check_mask(mask, n)?;
    for (i, (r, &xv)) in residual.iter_mut().zip(x).enumerate() {
        let b = bias.map(|b| b[i % row_len]);
        *r = element(xv, *r, b, mask_bit(mask, i), scale);
    }
    Ok(())
}

/// Forward: returns `(y, mask)` (contract points 2 and 3). `x` and `residual` are `rows x row_len`,
/// `bias` has `row_len` elements; element `i` has global index `element_offset + i`.
///
/// Errors: `row_len`, `x`, `residual`, `bias`, `p`, `element_offset`.
pub fn forward<T: Element>(
    x: &[T],
    residual: &[T],
    bias: Option<&[T]>,
    row_len: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> Result<(Vec<T>, Vec<u32>)> {
    let mut y = residual.to_vec();
    let mask = forward_in_place(x, &mut y, bias, row_len, p, state, element_offset)?;
    Ok((y, mask))
}

/// Forward in place on the residual (`residual = residual + dropout(x + bias)`); returns the mask.
///
/// Errors: as [`forward`]; nothing is written on error.
pub fn forward_in_place<T: Element>(
    x: &[T],
    residual: &mut [T],
    bias: Option<&[T]>,
    row_len: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> Result<Vec<u32>> {
    let n = check_forward(x, residual, bias, row_len)?;
    let scale = keep_scale(p)?;
    check_element_range(element_offset, n)?;
    let mask = dropout::mask(p, state, element_offset, n)?;
    apply_mask_in_place(x, residual, bias, row_len, &mask, scale)?;
    Ok(mask)
}

/// Gradients of the fused op (the residual's own gradient is `dy`).
#[derive(Debug, Clone, PartialEq)]
pub struct Grads<T> {
    /// `rows x H`: `round_T(scale * f32(dy))` where kept, `+0` where dropped.
    pub dx: Vec<T>,
    /// `H` elements when asked for (the forward had a bias): contract point 4.
    pub dbias: Option<Vec<T>>,
}

/// The `f32` term `g` of every element (contract point 4).
fn terms<T: Element>(dy: &[T], mask: &[u32], scale: f32) -> Vec<f32> {
    dy.iter()
        .enumerate()
        .map(|(i, &g)| {
            if mask_bit(mask, i) {
                scale * g.to_f32()
            } else {
                0.0
            }
        })
        .collect()
}

/// The `(column, chunk)` partial sums of the bias gradient, `ceil(rows / 256) x H` row-major
/// (chunk-major), as a kernel's workspace holds them after its first pass (contract point 4).
///
/// Errors: `row_len`, `dy`, `mask`, `p`.
pub fn dbias_partials<T: Element>(dy: &[T], row_len: usize, mask: &[u32], p: f64) -> Result<Vec<f32>> {
    check_row_len(row_len)?;
    let rows = count_rows("dy", dy.len(), row_len)?;
    check_mask(mask, dy.len())?;
    let scale = keep_scale(p)?;
    let g = terms(dy, mask, scale);
    let chunks = rows.div_ceil(D_BIAS_CHUNK);
    let mut partials = vec![0.0f32; chunks * row_len];
    for c in 0..chunks {
        for r in c * D_BIAS_CHUNK..rows.min((c + 1) * D_BIAS_CHUNK) {
            for j in 0..row_len {
                partials[c * row_len + j] += g[r * row_len + j];
            }
        }
    }
    Ok(partials)
}

/// Backward from a stored mask (contract point 4): `dx`, and `dbias` when `with_bias`.
///
/// Errors: `row_len`, `dy`, `mask`, `p`.
pub fn backward_from_mask<T: Element>(
    dy: &[T],
    row_len: usize,
    mask: &[u32],
    p: f64,
    with_bias: bool,
) -> Result<Grads<T>> {
    check_row_len(row_len)?;
    let rows = count_rows("dy", dy.len(), row_len)?;
    check_mask(mask, dy.len())?;
    let scale = keep_scale(p)?;
    let g = terms(dy, mask, scale);
    let dx = g.iter().map(|&v| T::from_f32(v)).collect();
    let dbias = if with_bias {
        let mut column = vec![0.0f32; rows];
        let mut out = Vec::with_capacity(row_len);
        for j in 0..row_len {
            for (r, c) in column.iter_mut().enumerate() {
                *c = g[r * row_len + j];
            }
            out.push(T::from_f32(skip::chunked_sum(&column, D_BIAS_CHUNK)?));
        }
        Some(out)
    } else {
        None
    };
    Ok(Grads { dx, dbias })
}

/// Backward regenerating the keep decisions from the forward's `(p, state, element_offset)`: equal
/// to [`backward_from_mask`] with the forward's mask.
///
/// Errors: `row_len`, `dy`, `p`, `element_offset`.
pub fn backward<T: Element>(
    dy: &[T],
    row_len: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
    with_bias: bool,
) -> Result<Grads<T>> {
    check_row_len(row_len)?;
    count_rows("dy", dy.len(), row_len)?;
    keep_scale(p)?;
    check_element_range(element_offset, dy.len())?;
    let mask = dropout::mask(p, state, element_offset, dy.len())?;
    backward_from_mask(dy, row_len, &mask, p, with_bias)
}
