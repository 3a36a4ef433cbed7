//! Dropout on the CPU: thresholds, scales, bit-packed masks, forward and backward.
//!
//! Every function validates its arguments first and returns [`Error::InvalidArgument`] instead of
//! panicking, with the same argument names the GPU launchers use.

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::philox::element_word;
use crate::rng::PhiloxState;

/// 2^32: the number of possible random words, as an `f64` (exact).
const TWO_POW_32: f64 = 4_294_967_296.0;

/// Bits per mask word.
const MASK_BITS: usize = 32;

/// Checks that `p` is a probability: finite and in `[0, 1]` (NaN fails every comparison).
fn check_p(p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::invalid("p", "a probability in [0, 1]", p))
    }
}

/// Rejects empty data; `name` is the argument's name (`x` or `dy`).
fn check_non_empty(name: &'static str, n: usize) -> Result<()> {
    if n == 0 {
        Err(Error::invalid(name, "a non-empty tensor", "0 elements"))
    } else {
        Ok(())
    }
}

/// Rejects a slice whose global indices `element_offset + n` would overflow `u64`.
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

/// Number of `u32` mask words for `n` elements: `ceil(n / 32)`.
pub fn mask_words(n: usize) -> usize {
    n.div_ceil(MASK_BITS)
}

/// Rejects a mask that is not exactly `ceil(n / 32)` words long.
fn check_mask_len(mask: &[u32], n: usize) -> Result<()> {
    let expected = mask_words(n);
    if mask.len() == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            "mask",
            format!("{expected} words (ceil({n} / 32))"),
            format!("{} words", mask.len()),
        ))
    }
}

/// The keep threshold for drop probability `p`: `round(p * 2^32)`, in `[0, 2^32]`.
///
/// An element is kept iff its random word (as `u64`) is `>= threshold`, so `p = 0` keeps all and
/// `p = 1` (threshold 2^32) drops all. `p * 2^32` is exact in `f64`; `round` is half away from zero.
pub fn drop_threshold(p: f64) -> Result<u64> {
    check_p(p)?;
    Ok((p * TWO_POW_32).round() as u64)
}

/// The scale applied to kept elements: `1 / (1 - p)` computed in `f64`, rounded once to `f32`.
///
/// For `p = 1` nothing is kept and the scale is `0.0` rather than infinity.
pub fn keep_scale(p: f64) -> Result<f32> {
    check_p(p)?;
    if p == 1.0 {
        Ok(0.0)
    } else {
        Ok((1.0 / (1.0 - p)) as f32)
    }
}

/// Whether global element `element` is kept: its random word is `>= threshold`.
pub fn keep(state: PhiloxState, element: u64, threshold: u64) -> bool {
    u64::from(element_word(state, element)) >= threshold
}

/// Bit `i` of a bit-packed mask: bit `i % 32` of word `i / 32`.
///
/// # Panics
/// If `i / 32` is out of range for `mask`.
pub fn mask_bit(mask: &[u32], i: usize) -> bool {
    (mask[i / MASK_BITS] >> (i % MASK_BITS)) & 1 == 1
}

/// The bit-packed keep mask of `n` elements whose first has global index `element_offset`.
///
/// `ceil(n / 32)` words; bit `j` of word `w` is the keep decision of element
/// `element_offset + 32 * w + j`; unused high bits of the last word are 0. Because decisions depend
/// only on global indices, the mask of a slice equals the matching bits of the whole tensor's mask.
///
/// Errors: `p`, `n` (0, or a mask that cannot be allocated), `element_offset`.
pub fn mask(p: f64, state: PhiloxState, element_offset: u64, n: usize) -> Result<Vec<u32>> {
    mask_sized(p, state, element_offset, n, "n")
}

/// [`mask`], an allocation failure of the words reported as `size_name` (the caller's argument
/// that set `n`).
pub(crate) fn mask_sized(
    p: f64,
    state: PhiloxState,
    element_offset: u64,
    n: usize,
    size_name: &'static str,
) -> Result<Vec<u32>> {
    check_p(p)?;
    check_non_empty("n", n)?;
    check_element_range(element_offset, n)?;
    let threshold = drop_threshold(p)?;
    let mut words = crate::alloc::filled(size_name, mask_words(n), 0u32)?;
    for i in 0..n {
        if keep(state, element_offset + i as u64, threshold) {
            words[i / MASK_BITS] |= 1 << (i % MASK_BITS);
        }
    }
    Ok(words)
}

/// `x` with the mask applied: kept elements become `T::from_f32(x.to_f32() * scale)` (one `f32`
/// multiply, one round-to-nearest-even), dropped ones `+0` (even when `x` is NaN or infinite).
///
/// The shared core of [`forward`], [`backward`] and [`backward_from_mask`].
pub fn apply_mask<T: Element>(x: &[T], mask: &[u32], scale: f32) -> Result<Vec<T>> {
    check_non_empty("x", x.len())?;
    check_mask_len(mask, x.len())?;
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if mask_bit(mask, i) {
                T::from_f32(v.to_f32() * scale)
            } else {
                T::from_f32(0.0)
            }
        })
        .collect();
    Ok(y)
}

/// Dropout forward: returns `(y, mask)` for `x`, whose first element has global index
/// `element_offset`. `y` is [`apply_mask`] of `x` with [`mask`] and [`keep_scale`].
pub fn forward<T: Element>(
    x: &[T],
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> Result<(Vec<T>, Vec<u32>)> {
    check_non_empty("x", x.len())?;
    let m = mask(p, state, element_offset, x.len())?;
    let y = apply_mask(x, &m, keep_scale(p)?)?;
    Ok((y, m))
}

/// Dropout backward from a stored mask: `dx_i = bit_i ? dy_i * scale : +0`.
///
/// `mask` must be exactly `ceil(dy.len() / 32)` words.
pub fn backward_from_mask<T: Element>(dy: &[T], mask: &[u32], p: f64) -> Result<Vec<T>> {
    check_non_empty("dy", dy.len())?;
    check_mask_len(mask, dy.len())?;
    let scale = keep_scale(p)?;
    apply_mask(dy, mask, scale)
}

/// Dropout backward without a stored mask: regenerates it from Philox, so with the forward's
/// `(p, state, element_offset)` it equals [`backward_from_mask`] with the forward's mask.
pub fn backward<T: Element>(dy: &[T], p: f64, state: PhiloxState, element_offset: u64) -> Result<Vec<T>> {
    check_non_empty("dy", dy.len())?;
    let m = mask(p, state, element_offset, dy.len())?;
    apply_mask(dy, &m, keep_scale(p)?)
}
