//! Compute skipping on the CPU: the fused stochastic-depth residual, per-sample compaction and
//! token routing (Mixture-of-Depths, GateSkip), forward and backward: the oracle of the skipping
//! kernels.
//!
//! Plain and slow on purpose: every element is a loop iteration, every selection is a sort. Every
//! output is defined bit for bit, including the two reductions (their order is part of the
//! contract, point 4), so a kernel is compared with these functions exactly. The contract:
//!
//! 1. **Arithmetic.** Element types are `f32`, `f16` and `bf16` ([`Element`]). Values are widened
//!    exactly to `f32`; every step written below is one `f32` operation rounded to nearest even;
//!    the result is rounded once back to `T` (round-to-nearest-even). A multiply followed by an add
//!    is two roundings, never a fused multiply-add: kernels use `__fmul_rn` / `__fadd_rn` so that
//!    nvcc does not contract them. Values that are moved rather than computed (dropped samples,
//!    skipped tokens, gathered rows) are bit copies. NaN results compare as NaN: their payload is
//!    not part of the contract (the GPU produces its canonical NaN). Index outputs are `u32`, the
//!    format of the device buffers.
//!
//! 2. **Stochastic depth, forward** ([`stochastic_depth_in_place`], [`stochastic_depth`]). Inputs:
//!    the residual `x` and the branch output `f` (`B x R`, row-major, `T`, `B, R >= 1`), an
//!    optional bias `bias` of `P` elements (`P >= 1` dividing `R`; element `j` of a row uses
//!    `bias[j % P]`, so `P = R` is one bias per element and `P = H` is a per-feature bias of a
//!    `B x S x H` sample), keep flags ([`SampleKeep`]: one per sample, e.g.
//!    [`SampleDropPlan::layer_keep`](crate::layer_plan::SampleDropPlan::layer_keep), or one for the
//!    whole batch, e.g. [`LayerDropPlan::keep`](crate::layer_plan::LayerDropPlan::keep)) and a scale
//!    `s` (finite, `>= 0`; [`depth_scale`]: `(1 / (1 - p)) as f32` computed in `f64`, `0` for
//!    `p = 1`, or `1` without `scale_by_keep`; the plans' `scales()` are the same numbers). Element
//!    `j` of sample `b`, in place on the residual:
//!    * `b` dropped: `out = x`, bit for bit (also NaN, infinities and `-0`);
//!    * `b` kept: `t = f32(f) + f32(bias[j % P])` (one add; without a bias `t = f32(f)` and no add
//!      happens), `u = s * t`, `o = f32(x) + u`, `out = round_T(o)`.
//!
//! 3. **Stochastic depth, backward** ([`stochastic_depth_backward`], from `d_out`). The residual's
//!    gradient is `d_out` itself (the identity: nothing is computed or written). The branch's:
//!    `d_f = round_T(s * f32(d_out))` for kept samples, `+0` for dropped ones. The bias's (when the
//!    forward had one): `d_bias[k] = round_T(s * S_k)`, where `S_k` is the chunked sum (point 4)
//!    with chunk [`D_BIAS_CHUNK`] of the `B * R / P` terms `m = b * (R / P) + q` (element
//!    `j = q * P + k` of row `b`, i.e. rows ascending, then positions ascending): the term is
//!    `f32(d_out[b][j])` for a kept row and `+0` for a dropped one.
//!
//! 4. **Reduction order** ([`chunked_sum`]). The sum of terms `t_0 .. t_{n-1}` with chunk `C`:
//!    chunk `c` holds terms `c * C .. min((c + 1) * C, n) - 1`; its partial is `+0 + t_{cC} + ...`
//!    added sequentially in ascending order; the sum is `+0 + partial_0 + partial_1 + ...`,
//!    sequentially in ascending chunk order (`+0` for `n = 0`). Every add is one `f32` add. A sum
//!    started at `+0` is never `-0`, so adding a `+0` term changes nothing: a kernel may skip the
//!    terms of dropped rows or add them. On a GPU each partial is one thread's loop (threads over
//!    bias elements or chunks) and the partials are combined by one thread, so the order is fixed
//!    and results are reproducible run to run. `C` is [`D_BIAS_CHUNK`] (256) for the bias gradient
//!    and [`D_GATE_CHUNK`] (32) for the gate gradient.
//!
//! 5. **Per-sample compaction** ([`Compaction`]). From keep flags (`B >= 1` samples), the kept
//!    samples in ascending order get consecutive slots: `slot(b)` is the number of kept samples
//!    before `b` (an exclusive prefix sum), `count` the number of kept samples. A kernel computes
//!    the slots and the count on the device; the host needs at most one read of the count to size
//!    the compact batch, or none: the gathers write into a pre-sized buffer of any capacity
//!    `>= count` rows ([`gather_samples_into`], [`gather_tokens_into`]), and every function that
//!    reads a compact buffer accepts one with more rows than the count (a capacity of e.g. `B`,
//!    or the count of a host-side [`SampleDropPlan`](crate::layer_plan::SampleDropPlan), known
//!    without any device read). A capacity below the count is an error (`capacity`); a kernel
//!    that only learns the count on the device writes no row with `slot >= capacity` and reports
//!    the true count, so that the host check of that count raises the same error.
//!
//! 6. **Compaction operations** (`R >= 1` elements per sample; compact buffers are rows of `R`;
//!    rows at or beyond `count` are never read and never written):
//!    * [`gather_samples`] / [`gather_samples_into`]: `c[slot(b)] = x[b]` for kept `b` (bit copy).
//!    * [`scatter_samples`] (the layer replaced, LayerDrop): `out[b] = c[slot(b)]` for kept
//!      samples, `x[b]` for skipped ones, bit copies: a skipped sample is the identity. Its backward
//!      [`scatter_samples_backward`]: `d_c = gather(d_out)`, `d_x[b] = +0` for kept and `d_out[b]`
//!      for skipped samples.
//!    * [`scatter_add_samples`] (a residual branch, stochastic depth): in place on `x`,
//!      `x[b] = round_T(f32(x[b]) + s * f32(c[slot(b)]))` for kept samples (point 2 without a bias,
//!      bit for bit), skipped rows untouched. Its backward [`scatter_add_samples_backward`]:
//!      `d_c[slot(b)] = round_T(s * f32(d_out[b]))`; `d_x = d_out` (the identity).
//!    * [`gather_samples_backward`]: accumulates `d_x[b] = round_T(f32(d_x[b]) + f32(d_c[slot(b)]))`
//!      into the input's gradient (kept samples; skipped rows untouched), since the gathered input
//!      usually also feeds the identity path. For a plain transpose pass zeros (`-0` entries of
//!      `d_c` become `+0`). With [`scatter_samples`] the whole input gradient is simply
//!      `scatter_samples(d_out, d_c_in)`.
//!
//! 7. **Token order** ([`score_key`]). Routing ranks tokens by `f32` gate scores (`B x S`,
//!    row-major) through the `u32` key `score_key(s)`: `-0` is read as `+0`, every NaN is `0`
//!    (below every number, `-inf` included, and all NaNs equal), and otherwise the IEEE bits `w`
//!    map to `!w` for negative and `w | 2^31` for positive values, which orders keys like the
//!    numbers. Token `u` ranks before token `v` iff `key(u) > key(v)`, or the keys are equal and
//!    `u` has the lower index (the token index within a sequence for point 8, the flat index
//!    `b * S + t` for point 9). This is a total order: equal scores go to the lower index, on the
//!    GPU (a radix select on the keys) as on the CPU. Padding tokens are never ranked or selected:
//!    valid tokens are given by a mask (`true` = real token) or by per-sequence lengths (tokens
//!    `0 .. len_b - 1`), [`ValidTokens`].
//!
//! 8. **Per-sequence top-k** ([`route_top_k`], Mixture-of-Depths). With `V_b` valid tokens in
//!    sequence `b`, it selects `k_b` of them: [`Capacity::Fraction`]`(c)` (finite, in `[0, 1]`)
//!    gives `k_b = round(c * V_b)`, the product in `f64` and rounded half away from zero (like the
//!    dropout threshold; so `0.1 * 30` is 3, `0.5 * 5` is 3, and a short sequence can select
//!    none); [`Capacity::Tokens`]`(k)` gives `k_b = min(k, V_b)`. The selected tokens are the first
//!    `k_b` valid tokens of the sequence in the order of point 7. Output ([`Routing`]): per-sequence
//!    counts, offsets (`B + 1` entries, an exclusive prefix sum starting at 0: the `cu_seqlens` of a
//!    packed variable-length batch) and the selected token indices, ascending within each
//!    sequence, sequences one after another; compact row `offsets[b] + i` is the `i`-th selected
//!    token of sequence `b`. Any `S` with `B * S <= 2^32 - 1` (long sequences: 32k tokens and more).
//!
//! 9. **Global budget** ([`route_global`], GateSkip). With `V` valid tokens in the whole batch and
//!    a kept fraction `q` (finite, in `[0, 1]`), it selects exactly `n = round(q * V)` tokens (same
//!    rounding as point 8): the first `n` valid tokens of the batch in the order of point 7 with
//!    flat indices. The threshold is the score of the last selected token (canonical: `+0` for a
//!    zero, NaN for a NaN; none when `n = 0`); equivalently every token whose key is above the
//!    threshold's is selected, and of the tokens whose key equals it, the lowest flat indices until
//!    `n` are selected. This is the `1 - q` quantile with ties resolved by index, so GPU and CPU
//!    select the same set. The output is a [`Routing`] like point 8's.
//!
//! 10. **Token gather and gated scatter-add** (`H >= 1` elements per token, `x` of `B x S x H`,
//!     compact buffers of rows of `H` holding at least the selected count):
//!     * [`gather_tokens`] / [`gather_tokens_into`]: compact row `r` is a bit copy of the row of
//!       its token.
//!     * [`scatter_add_tokens`]: in place on the residual stream, for the token `(b, t)` of compact
//!       row `r`, with its gate `g = gate[b * S + t]` (`f32`, `B x S`, passed by the caller: the raw
//!       router weight for Mixture-of-Depths, a sigmoid for GateSkip; never transformed here):
//!       `u = g * f32(branch[r][j])`, `o = f32(res[b][t][j]) + u`, `res[b][t][j] = round_T(o)`.
//!       Unselected and padding tokens are untouched (bit for bit). Unfused code rounding
//!       `g * branch` to `T` first can differ in the last bit.
//!
//! 11. **Token backward** ([`scatter_add_tokens_backward`], [`gather_tokens_backward`]). The
//!     residual's gradient is `d_out` itself (the identity). For compact row `r` of token
//!     `(b, t)`: `d_branch[r][j] = round_T(g * f32(d_out[b][t][j]))`, and the gate gradient
//!     `d_gate[b * S + t]` is the chunked sum (point 4, chunk [`D_GATE_CHUNK`]) over
//!     `j = 0 .. H - 1` of the products `f32(d_out[b][t][j]) * f32(branch[r][j])` (each one `f32`
//!     multiply); `d_gate` is `+0` for unselected tokens. The gather's backward accumulates like
//!     point 6's: `d_x[b][t] = round_T(f32(d_x[b][t]) + f32(d_c[r]))`, unselected rows untouched.
//!
//! 12. **Validation.** Every argument is checked before anything is computed or written, as an
//!     [`Error::InvalidArgument`] naming it: `row_len`, `hidden`, `seq_len` (0); `residual`, `x`,
//!     `d_out`, `d_x`, `scores` (empty, not a whole number of rows, or a length that does not match
//!     the other arguments); `branch` (not the residual's length; as a compact buffer: not whole
//!     rows or fewer rows than the selected count), `compact`, `d_compact` (the same); `bias` (0
//!     elements or not dividing `R`); `keep` (no sample, or not one flag per sample); `scale`
//!     (NaN, infinite, negative); `mask`, `lengths` (wrong length, a length above `S`); `gate` (not
//!     one per token); `capacity` (a fraction outside `[0, 1]`, or an output buffer with fewer rows
//!     than the count); `out` (not a whole number of rows); `keep_fraction` (outside `[0, 1]`);
//!     `chunk` (0). Scores, gates and data may be non-finite: they are not rejected, they propagate
//!     (a kernel cannot check them without a host read).

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::dropout::keep_scale;

/// Terms per partial sum in the bias gradient of the stochastic-depth residual (contract point 4).
pub const D_BIAS_CHUNK: usize = 256;

/// Terms per partial sum in the gate gradient of the token scatter-add (contract point 4).
pub const D_GATE_CHUNK: usize = 32;

// ------------------------------------------------------------------------------------------------
// Validation helpers

/// Rejects a zero row length; `name` is the argument (`row_len`, `hidden`, `seq_len`).
fn check_row_len(name: &'static str, row_len: usize) -> Result<()> {
    if row_len == 0 {
        Err(Error::invalid(name, "at least 1", 0))
    } else {
        Ok(())
    }
}

/// The number of rows of a non-empty tensor made of whole rows of `row_len` elements.
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

/// Rejects a slice whose length is not `expected` elements.
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

/// `rows * row_len`, or an error naming `name` when it does not fit `usize`.
fn elements(name: &'static str, rows: usize, row_len: usize) -> Result<usize> {
    rows.checked_mul(row_len)
        .ok_or_else(|| Error::invalid(name, "a number of elements that fits in usize", "an overflow"))
}

/// A compact input (`name`) of whole rows of `row_len`, holding at least `count` rows.
fn check_compact_input(name: &'static str, len: usize, row_len: usize, count: usize) -> Result<()> {
    if len % row_len != 0 {
        return Err(Error::invalid(
            name,
            format!("a whole number of rows of {row_len} elements"),
            format!("{len} elements"),
        ));
    }
    if len / row_len < count {
        return Err(Error::invalid(
            name,
            format!("at least {count} rows (the selected count)"),
            format!("{} rows", len / row_len),
        ));
    }
    Ok(())
}

/// A pre-sized output buffer: whole rows (`out`) and a capacity of at least `count` rows
/// (`capacity`).
fn check_out(len: usize, row_len: usize, count: usize) -> Result<()> {
    if len % row_len != 0 {
        return Err(Error::invalid(
            "out",
            format!("a whole number of rows of {row_len} elements"),
            format!("{len} elements"),
        ));
    }
    if len / row_len < count {
        return Err(Error::invalid(
            "capacity",
            format!("a buffer of at least {count} rows (capacity >= count)"),
            format!("{} rows", len / row_len),
        ));
    }
    Ok(())
}

/// A scale: finite and `>= 0`.
fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() && scale >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid("scale", "a finite value >= 0", scale))
    }
}

/// A fraction: finite and in `[0, 1]` (NaN fails the comparison).
fn check_fraction(name: &'static str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(name, "a fraction in [0, 1]", v))
    }
}

/// A bias of `len >= 1` elements dividing the row length.
fn check_bias(len: usize, row_len: usize) -> Result<()> {
    if len == 0 || row_len % len != 0 {
        Err(Error::invalid(
            "bias",
            format!("a non-zero number of elements dividing the row length {row_len}"),
            format!("{len} elements"),
        ))
    } else {
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Reduction order

/// The chunked sum of contract point 4, without validation (`chunk >= 1`).
fn sum_chunks(terms: &[f32], chunk: usize) -> f32 {
    let mut total = 0.0f32;
    for part in terms.chunks(chunk) {
        let mut acc = 0.0f32;
        for &t in part {
            acc += t;
        }
        total += acc;
    }
    total
}

/// The sum of `terms` in the fixed order of contract point 4: sequential partial sums (from `+0`)
/// of consecutive chunks of `chunk` terms, then the partials summed sequentially (from `+0`) in
/// ascending order; every add is one `f32` add. `+0` for no terms.
///
/// Errors: `chunk` (0).
pub fn chunked_sum(terms: &[f32], chunk: usize) -> Result<f32> {
    if chunk == 0 {
        return Err(Error::invalid("chunk", "at least 1 term per chunk", 0));
    }
    Ok(sum_chunks(terms, chunk))
}

// ------------------------------------------------------------------------------------------------
// Stochastic depth

/// Which samples of a batch keep their residual branch (contract point 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKeep<'a> {
    /// One decision for the whole batch (batch mode, fairseq LayerDrop).
    Batch(bool),
    /// One decision per sample (stochastic depth's row mode): exactly `B` flags.
    PerSample(&'a [bool]),
}

impl SampleKeep<'_> {
    /// The `batch` per-sample flags; error `keep` when per-sample flags are not `batch` long.
    fn flags(&self, batch: usize) -> Result<Vec<bool>> {
        match *self {
            SampleKeep::Batch(k) => Ok(vec![k; batch]),
            SampleKeep::PerSample(flags) => {
                if flags.len() == batch {
                    Ok(flags.to_vec())
                } else {
                    Err(Error::invalid(
                        "keep",
                        format!("{batch} flags (one per sample)"),
                        format!("{} flags", flags.len()),
                    ))
                }
            }
        }
    }
}

/// The stochastic-depth scale for drop probability `p`: with `scale_by_keep`,
/// [`keep_scale`]`(p)` (`(1 / (1 - p)) as f32` computed in `f64`, `0` for `p = 1`); without it, `1`.
///
/// Errors: `p` (not a probability in `[0, 1]`; checked in both modes).
pub fn depth_scale(p: f64, scale_by_keep: bool) -> Result<f32> {
    let s = keep_scale(p)?;
    Ok(if scale_by_keep { s } else { 1.0 })
}

/// Fused stochastic-depth residual in place (contract point 2): for kept samples,
/// `residual = round_T(f32(residual) + scale * (f32(branch) + f32(bias[j % P])))` with each
/// operation rounded to `f32`; dropped samples are left untouched.
///
/// `residual` and `branch` are `B x row_len`; `bias` has `P` elements, `P` dividing `row_len`.
///
/// Errors: `row_len`, `residual`, `branch`, `bias`, `keep`, `scale`; nothing is written on error.
pub fn stochastic_depth_in_place<T: Element>(
    residual: &mut [T],
    branch: &[T],
    bias: Option<&[T]>,
    row_len: usize,
    keep: SampleKeep<'_>,
    scale: f32,
) -> Result<()> {
    check_row_len("row_len", row_len)?;
    let batch = count_rows("residual", residual.len(), row_len)?;
    check_len("branch", branch.len(), residual.len(), "the residual's shape")?;
    if let Some(bias) = bias {
        check_bias(bias.len(), row_len)?;
    }
    let flags = keep.flags(batch)?;
    check_scale(scale)?;
    for (b, _) in flags.iter().enumerate().filter(|(_, &k)| k) {
        for j in 0..row_len {
            let i = b * row_len + j;
            let t = match bias {
                Some(bias) => branch[i].to_f32() + bias[j % bias.len()].to_f32(),
                None => branch[i].to_f32(),
            };
            let u = scale * t;
            residual[i] = T::from_f32(residual[i].to_f32() + u);
        }
    }
    Ok(())
}

/// [`stochastic_depth_in_place`] on a copy of `residual`, returned.
pub fn stochastic_depth<T: Element>(
    residual: &[T],
    branch: &[T],
    bias: Option<&[T]>,
    row_len: usize,
    keep: SampleKeep<'_>,
    scale: f32,
) -> Result<Vec<T>> {
    let mut out = residual.to_vec();
    stochastic_depth_in_place(&mut out, branch, bias, row_len, keep, scale)?;
    Ok(out)
}

/// Gradients of the stochastic-depth residual (the residual's own gradient is `d_out`).
#[derive(Debug, Clone, PartialEq)]
pub struct DepthGrads<T> {
    /// `B x R`: `round_T(scale * f32(d_out))` for kept samples, `+0` for dropped ones.
    pub d_branch: Vec<T>,
    /// `P` elements, when the forward had a bias (contract point 3).
    pub d_bias: Option<Vec<T>>,
}

/// Backward of the stochastic-depth residual (contract point 3): `d_branch` and, when
/// `bias_len` is `Some(P)` (the forward's bias length), `d_bias`. The residual's gradient is `d_out`.
///
/// Errors: `row_len`, `d_out`, `bias`, `keep`, `scale`.
pub fn stochastic_depth_backward<T: Element>(
    d_out: &[T],
    row_len: usize,
    keep: SampleKeep<'_>,
    scale: f32,
    bias_len: Option<usize>,
) -> Result<DepthGrads<T>> {
    check_row_len("row_len", row_len)?;
    let batch = count_rows("d_out", d_out.len(), row_len)?;
    if let Some(p) = bias_len {
        check_bias(p, row_len)?;
    }
    let flags = keep.flags(batch)?;
    check_scale(scale)?;
    let d_branch = d_out
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            if flags[i / row_len] {
                T::from_f32(scale * g.to_f32())
            } else {
                T::from_f32(0.0)
            }
        })
        .collect();
    let d_bias = bias_len.map(|p| {
        let reps = row_len / p;
        let mut terms = vec![0.0f32; batch * reps];
        (0..p)
            .map(|k| {
                for (m, term) in terms.iter_mut().enumerate() {
                    let (b, q) = (m / reps, m % reps);
                    *term = if flags[b] {
                        d_out[b * row_len + q * p + k].to_f32()
                    } else {
                        0.0
                    };
                }
                T::from_f32(scale * sum_chunks(&terms, D_BIAS_CHUNK))
            })
            .collect()
    });
    Ok(DepthGrads { d_branch, d_bias })
}

// ------------------------------------------------------------------------------------------------
// Per-sample compaction

/// The compaction of a batch by its keep flags (contract point 5): kept samples in ascending
/// order, their slots and their count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    slots: Vec<Option<u32>>,
    indices: Vec<u32>,
}

impl Compaction {
    /// From one keep flag per sample (`1 <= B <= 2^32 - 1`).
    ///
    /// Errors: `keep`.
    pub fn new(keep: &[bool]) -> Result<Self> {
        if keep.is_empty() {
            return Err(Error::invalid("keep", "at least 1 sample", "0 flags"));
        }
        if u32::try_from(keep.len()).is_err() {
            return Err(Error::invalid("keep", "at most 2^32 - 1 samples", keep.len()));
        }
        let mut slots = Vec::with_capacity(keep.len());
        let mut indices = Vec::new();
        for (b, &k) in keep.iter().enumerate() {
            if k {
                slots.push(Some(indices.len() as u32));
                indices.push(b as u32);
            } else {
                slots.push(None);
            }
        }
        Ok(Compaction { slots, indices })
    }
    /// `B`.
    pub fn batch(&self) -> usize {
        self.slots.len()
    }
    /// The number of kept samples (rows of the compact batch).
    pub fn count(&self) -> usize {
        self.indices.len()
    }
    /// The kept samples, ascending: compact row `i` is sample `indices()[i]`.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
    /// Every sample's slot: the number of kept samples before it, `None` when skipped.
    pub fn slots(&self) -> &[Option<u32>] {
        &self.slots
    }
    /// The slot of sample `b`; `None` when skipped or `b >= B`.
    pub fn slot(&self, b: usize) -> Option<usize> {
        self.slots.get(b).copied().flatten().map(|s| s as usize)
    }
    /// `(sample, slot)` of every kept sample, ascending.
    fn pairs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.indices.iter().enumerate().map(|(s, &b)| (b as usize, s))
    }
}

/// Validates `row_len`, the keep flags and a `B x row_len` tensor named `name`.
fn compaction_for(name: &'static str, len: usize, row_len: usize, keep: &[bool]) -> Result<Compaction> {
    check_row_len("row_len", row_len)?;
    let c = Compaction::new(keep)?;
    let expected = elements(name, keep.len(), row_len)?;
    check_len(name, len, expected, "B x row_len, one row per keep flag")?;
    Ok(c)
}

/// Copies row `src_row` of `src` into row `dst_row` of `dst` (rows of `row_len`).
fn copy_row<T: Copy>(dst: &mut [T], dst_row: usize, src: &[T], src_row: usize, row_len: usize) {
    dst[dst_row * row_len..(dst_row + 1) * row_len]
        .copy_from_slice(&src[src_row * row_len..(src_row + 1) * row_len]);
}

/// The kept samples of `x` (`B x row_len`), in ascending order: `count x row_len` (contract point 6).
///
/// Errors: `row_len`, `keep`, `x`.
pub fn gather_samples<T: Element>(x: &[T], row_len: usize, keep: &[bool]) -> Result<Vec<T>> {
    let c = compaction_for("x", x.len(), row_len, keep)?;
    let mut out = vec![T::default(); c.count() * row_len];
    for (b, s) in c.pairs() {
        copy_row(&mut out, s, x, b, row_len);
    }
    Ok(out)
}

/// [`gather_samples`] into a pre-sized buffer of `capacity = out.len() / row_len >= count` rows;
/// rows `count ..` are left untouched. Returns the count.
///
/// Errors: `row_len`, `keep`, `x`, `out` (not whole rows), `capacity` (fewer rows than the count);
/// nothing is written on error.
pub fn gather_samples_into<T: Element>(
    x: &[T],
    row_len: usize,
    keep: &[bool],
    out: &mut [T],
) -> Result<usize> {
    let c = compaction_for("x", x.len(), row_len, keep)?;
    check_out(out.len(), row_len, c.count())?;
    for (b, s) in c.pairs() {
        copy_row(out, s, x, b, row_len);
    }
    Ok(c.count())
}

/// Scatters a compact result back (contract point 6, the layer replaced): `out[b]` is
/// `compact[slot(b)]` for kept samples and `x[b]` for skipped ones (bit copies). `compact` may
/// have more than `count` rows (a pre-sized buffer); the extra rows are ignored.
///
/// Errors: `row_len`, `keep`, `x`, `compact`.
pub fn scatter_samples<T: Element>(x: &[T], compact: &[T], row_len: usize, keep: &[bool]) -> Result<Vec<T>> {
    let c = compaction_for("x", x.len(), row_len, keep)?;
    check_compact_input("compact", compact.len(), row_len, c.count())?;
    let mut out = x.to_vec();
    for (b, s) in c.pairs() {
        copy_row(&mut out, b, compact, s, row_len);
    }
    Ok(out)
}

/// Backward of [`scatter_samples`]: `(d_x, d_compact)` with `d_x[b] = +0` for kept samples and
/// `d_out[b]` for skipped ones, and `d_compact = gather_samples(d_out)` (`count` rows).
///
/// Errors: `row_len`, `keep`, `d_out`.
pub fn scatter_samples_backward<T: Element>(
    d_out: &[T],
    row_len: usize,
    keep: &[bool],
) -> Result<(Vec<T>, Vec<T>)> {
    let c = compaction_for("d_out", d_out.len(), row_len, keep)?;
    let mut d_x = d_out.to_vec();
    let mut d_compact = vec![T::default(); c.count() * row_len];
    for (b, s) in c.pairs() {
        copy_row(&mut d_compact, s, d_out, b, row_len);
        d_x[b * row_len..(b + 1) * row_len].fill(T::from_f32(0.0));
    }
    Ok((d_x, d_compact))
}

/// Residual scatter-add in place (contract point 6, stochastic depth on a compact branch): for
/// kept samples `x[b] = round_T(f32(x[b]) + scale * f32(compact[slot(b)]))`, skipped rows
/// untouched. `compact` may have more than `count` rows.
///
/// Errors: `row_len`, `keep`, `x`, `compact`, `scale`; nothing is written on error.
pub fn scatter_add_samples<T: Element>(
    x: &mut [T],
    compact: &[T],
    row_len: usize,
    keep: &[bool],
    scale: f32,
) -> Result<()> {
    let c = compaction_for("x", x.len(), row_len, keep)?;
    check_compact_input("compact", compact.len(), row_len, c.count())?;
    check_scale(scale)?;
    for (b, s) in c.pairs() {
        for j in 0..row_len {
            let u = scale * compact[s * row_len + j].to_f32();
            let i = b * row_len + j;
            x[i] = T::from_f32(x[i].to_f32() + u);
        }
    }
    Ok(())
}

/// Backward of [`scatter_add_samples`]: the compact branch gradient,
/// `d_compact[slot(b)] = round_T(scale * f32(d_out[b]))` (`count` rows). The residual's gradient
/// is `d_out` (the identity).
///
/// Errors: `row_len`, `keep`, `d_out`, `scale`.
pub fn scatter_add_samples_backward<T: Element>(
    d_out: &[T],
    row_len: usize,
    keep: &[bool],
    scale: f32,
) -> Result<Vec<T>> {
    let c = compaction_for("d_out", d_out.len(), row_len, keep)?;
    check_scale(scale)?;
    let mut d_compact = vec![T::default(); c.count() * row_len];
    for (b, s) in c.pairs() {
        for j in 0..row_len {
            d_compact[s * row_len + j] = T::from_f32(scale * d_out[b * row_len + j].to_f32());
        }
    }
    Ok(d_compact)
}

/// Backward of [`gather_samples`], accumulated into the input's gradient in place:
/// `d_x[b] = round_T(f32(d_x[b]) + f32(d_compact[slot(b)]))` for kept samples, skipped rows
/// untouched. `d_compact` may have more than `count` rows.
///
/// Errors: `row_len`, `keep`, `d_x`, `d_compact`; nothing is written on error.
pub fn gather_samples_backward<T: Element>(
    d_compact: &[T],
    row_len: usize,
    keep: &[bool],
    d_x: &mut [T],
) -> Result<()> {
    let c = compaction_for("d_x", d_x.len(), row_len, keep)?;
    check_compact_input("d_compact", d_compact.len(), row_len, c.count())?;
    for (b, s) in c.pairs() {
        for j in 0..row_len {
            let i = b * row_len + j;
            d_x[i] = T::from_f32(d_x[i].to_f32() + d_compact[s * row_len + j].to_f32());
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Token routing

/// The `u32` ranking key of a gate score (contract point 7): larger keys rank first. `-0` and `+0`
/// have the same key; every NaN has key `0`, below every number (`-inf` included).
pub fn score_key(s: f32) -> u32 {
    if s.is_nan() {
        return 0;
    }
    let w = if s == 0.0 { 0 } else { s.to_bits() };
    if w & 0x8000_0000 != 0 {
        !w
    } else {
        w | 0x8000_0000
    }
}

/// A score as the routing sees it: `+0` for a zero, the canonical NaN for a NaN.
fn canonical_score(s: f32) -> f32 {
    if s.is_nan() {
        f32::NAN
    } else if s == 0.0 {
        0.0
    } else {
        s
    }
}

/// Which tokens of a `B x S` batch are real (the others are padding, never selected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidTokens<'a> {
    /// Every token is real.
    All,
    /// `B * S` flags, row-major: `true` for a real token, `false` for padding.
    Mask(&'a [bool]),
    /// `B` lengths (each `<= S`): tokens `0 .. len_b - 1` of sequence `b` are real.
    Lengths(&'a [usize]),
}

impl ValidTokens<'_> {
    /// The `batch * seq_len` validity flags.
    fn flags(&self, batch: usize, seq_len: usize) -> Result<Vec<bool>> {
        match *self {
            ValidTokens::All => Ok(vec![true; batch * seq_len]),
            ValidTokens::Mask(m) => {
                check_len("mask", m.len(), batch * seq_len, "one flag per token, B x S")?;
                Ok(m.to_vec())
            }
            ValidTokens::Lengths(lens) => {
                if lens.len() != batch {
                    return Err(Error::invalid(
                        "lengths",
                        format!("{batch} lengths (one per sequence)"),
                        format!("{} lengths", lens.len()),
                    ));
                }
                if let Some(&bad) = lens.iter().find(|&&l| l > seq_len) {
                    return Err(Error::invalid(
                        "lengths",
                        format!("lengths <= the sequence length {seq_len}"),
                        bad,
                    ));
                }
                Ok(lens
                    .iter()
                    .flat_map(|&l| (0..seq_len).map(move |t| t < l))
                    .collect())
            }
        }
    }
}

/// How many tokens per sequence [`route_top_k`] selects (contract point 8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// `round(c * V_b)` of the `V_b` valid tokens (`c` finite, in `[0, 1]`; product in `f64`,
    /// rounded half away from zero).
    Fraction(f64),
    /// `min(k, V_b)`.
    Tokens(usize),
}

impl Capacity {
    /// `k_b` for a sequence of `valid` real tokens (`c` is not validated here: the routing
    /// functions check it; a NaN gives 0). Never more than `valid`.
    pub fn tokens(&self, valid: usize) -> usize {
        match *self {
            Capacity::Fraction(c) => ((c * valid as f64).round() as usize).min(valid),
            Capacity::Tokens(k) => k.min(valid),
        }
    }
}

/// The tokens selected in a `B x S` batch (contract point 8): per-sequence offsets (`B + 1`,
/// starting at 0) and the selected token indices, ascending within each sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    batch: usize,
    seq_len: usize,
    offsets: Vec<u32>,
    indices: Vec<u32>,
}

impl Routing {
    /// From the ascending selected tokens of every sequence.
    fn from_lists(seq_len: usize, lists: &[Vec<u32>]) -> Self {
        let mut offsets = Vec::with_capacity(lists.len() + 1);
        offsets.push(0u32);
        let mut indices = Vec::new();
        for list in lists {
            indices.extend_from_slice(list);
            offsets.push(indices.len() as u32);
        }
        Routing {
            batch: lists.len(),
            seq_len,
            offsets,
            indices,
        }
    }
    /// `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// `S`.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    /// `B + 1` offsets: sequence `b`'s compact rows are `offsets[b] .. offsets[b + 1]`.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }
    /// The selected token indices (within their sequences), sequence after sequence, ascending
    /// within each.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
    /// The total number of selected tokens (compact rows).
    pub fn total(&self) -> usize {
        self.indices.len()
    }
    /// Selected tokens per sequence.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect()
    }
    /// The selected tokens of sequence `b`, ascending; `None` when `b >= B`.
    pub fn sequence(&self, b: usize) -> Option<&[u32]> {
        if b >= self.batch {
            return None;
        }
        Some(&self.indices[self.offsets[b] as usize..self.offsets[b + 1] as usize])
    }
    /// The compact row of token `t` of sequence `b`; `None` when it is not selected.
    pub fn slot(&self, b: usize, t: usize) -> Option<usize> {
        let seq = self.sequence(b)?;
        let t = u32::try_from(t).ok()?;
        seq.binary_search(&t).ok().map(|i| self.offsets[b] as usize + i)
    }
    /// `B * S` flags: whether each token is selected.
    pub fn selected_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.batch * self.seq_len];
        for (_, flat) in self.pairs() {
            m[flat] = true;
        }
        m
    }
    /// `(compact row, flat token index b * S + t)` of every selected token, in compact order.
    fn pairs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.batch).flat_map(move |b| {
            let lo = self.offsets[b] as usize;
            let hi = self.offsets[b + 1] as usize;
            (lo..hi).map(move |r| (r, b * self.seq_len + self.indices[r] as usize))
        })
    }
}

/// Validates the scores (`B x S`, `B * S <= 2^32 - 1`) and the valid tokens; returns `B`, the
/// validity flags and the keys.
fn routing_inputs(
    scores: &[f32],
    seq_len: usize,
    valid: ValidTokens<'_>,
) -> Result<(usize, Vec<bool>, Vec<u32>)> {
    check_row_len("seq_len", seq_len)?;
    let batch = count_rows("scores", scores.len(), seq_len)?;
    if u32::try_from(scores.len()).is_err() {
        return Err(Error::invalid(
            "scores",
            "at most 2^32 - 1 tokens (B x S)",
            scores.len(),
        ));
    }
    let flags = valid.flags(batch, seq_len)?;
    let keys = scores.iter().map(|&s| score_key(s)).collect();
    Ok((batch, flags, keys))
}

/// Sorts token indices into rank order: key descending, then index ascending (contract point 7).
fn rank_sort(tokens: &mut [usize], key: impl Fn(usize) -> u32) {
    tokens.sort_by(|&u, &v| key(v).cmp(&key(u)).then(u.cmp(&v)));
}

/// Per-sequence top-k routing (contract point 8, Mixture-of-Depths): in every sequence of the
/// `B x S` scores, the `k_b` best valid tokens by [`score_key`], ties to the lower index.
///
/// Errors: `seq_len`, `scores`, `mask`, `lengths`, `capacity`.
pub fn route_top_k(
    scores: &[f32],
    seq_len: usize,
    valid: ValidTokens<'_>,
    capacity: Capacity,
) -> Result<Routing> {
    let (batch, flags, keys) = routing_inputs(scores, seq_len, valid)?;
    if let Capacity::Fraction(c) = capacity {
        check_fraction("capacity", c)?;
    }
    let lists: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            let base = b * seq_len;
            let mut cand: Vec<usize> = (0..seq_len).filter(|&t| flags[base + t]).collect();
            let k = capacity.tokens(cand.len());
            rank_sort(&mut cand, |t| keys[base + t]);
            cand.truncate(k);
            cand.sort_unstable();
            cand.into_iter().map(|t| t as u32).collect()
        })
        .collect();
    Ok(Routing::from_lists(seq_len, &lists))
}

/// Global-budget routing (contract point 9, GateSkip): the `round(keep_fraction * V)` best valid
/// tokens of the whole batch by [`score_key`], ties to the lower flat index. Returns the routing
/// and the threshold (the score of the last selected token, canonical; `None` when none is).
///
/// Errors: `seq_len`, `scores`, `mask`, `lengths`, `keep_fraction`.
pub fn route_global(
    scores: &[f32],
    seq_len: usize,
    valid: ValidTokens<'_>,
    keep_fraction: f64,
) -> Result<(Routing, Option<f32>)> {
    let (batch, flags, keys) = routing_inputs(scores, seq_len, valid)?;
    check_fraction("keep_fraction", keep_fraction)?;
    let mut cand: Vec<usize> = (0..scores.len()).filter(|&i| flags[i]).collect();
    let n = ((keep_fraction * cand.len() as f64).round() as usize).min(cand.len());
    rank_sort(&mut cand, |i| keys[i]);
    let threshold = n.checked_sub(1).map(|last| canonical_score(scores[cand[last]]));
    cand.truncate(n);
    cand.sort_unstable();
    let mut lists = vec![Vec::new(); batch];
    for i in cand {
        lists[i / seq_len].push((i % seq_len) as u32);
    }
    Ok((Routing::from_lists(seq_len, &lists), threshold))
}

/// Validates `hidden` and a `B x S x hidden` tensor named `name` against `routing`.
fn check_tokens(name: &'static str, len: usize, hidden: usize, routing: &Routing) -> Result<()> {
    check_row_len("hidden", hidden)?;
    let tokens = routing.batch * routing.seq_len;
    let expected = elements(name, tokens, hidden)?;
    check_len(name, len, expected, "B x S x hidden")
}

/// The rows of the selected tokens of `x` (`B x S x hidden`), in compact order: `total x hidden`
/// (contract point 10).
///
/// Errors: `hidden`, `x`.
pub fn gather_tokens<T: Element>(x: &[T], hidden: usize, routing: &Routing) -> Result<Vec<T>> {
    check_tokens("x", x.len(), hidden, routing)?;
    let mut out = vec![T::default(); routing.total() * hidden];
    for (r, flat) in routing.pairs() {
        copy_row(&mut out, r, x, flat, hidden);
    }
    Ok(out)
}

/// [`gather_tokens`] into a pre-sized buffer of `out.len() / hidden >= total` rows; rows
/// `total ..` are left untouched. Returns the total.
///
/// Errors: `hidden`, `x`, `out`, `capacity`; nothing is written on error.
pub fn gather_tokens_into<T: Element>(
    x: &[T],
    hidden: usize,
    routing: &Routing,
    out: &mut [T],
) -> Result<usize> {
    check_tokens("x", x.len(), hidden, routing)?;
    check_out(out.len(), hidden, routing.total())?;
    for (r, flat) in routing.pairs() {
        copy_row(out, r, x, flat, hidden);
    }
    Ok(routing.total())
}

/// Gated scatter-add in place (contract point 10): for the token of compact row `r` with gate
/// `g`, `residual[token][j] = round_T(f32(residual[token][j]) + g * f32(branch[r][j]))` (two `f32`
/// roundings, then one to `T`). `branch` may have more than `total` rows; `gate` is `B x S`.
///
/// Errors: `hidden`, `residual`, `branch`, `gate`; nothing is written on error.
pub fn scatter_add_tokens<T: Element>(
    residual: &mut [T],
    hidden: usize,
    routing: &Routing,
    branch: &[T],
    gate: &[f32],
) -> Result<()> {
    check_tokens("residual", residual.len(), hidden, routing)?;
    check_compact_input("branch", branch.len(), hidden, routing.total())?;
    check_len(
        "gate",
        gate.len(),
        routing.batch * routing.seq_len,
        "one gate per token, B x S",
    )?;
    for (r, flat) in routing.pairs() {
        let g = gate[flat];
        for j in 0..hidden {
            let u = g * branch[r * hidden + j].to_f32();
            let i = flat * hidden + j;
            residual[i] = T::from_f32(residual[i].to_f32() + u);
        }
    }
    Ok(())
}

/// Gradients of the gated scatter-add (the residual's own gradient is `d_out`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenGrads<T> {
    /// `total x hidden`: `round_T(g * f32(d_out[token]))` per compact row.
    pub d_branch: Vec<T>,
    /// `B x S`: the chunked dot product of `d_out[token]` and `branch[r]` for selected tokens,
    /// `+0` for the others (contract point 11).
    pub d_gate: Vec<f32>,
}

/// Backward of [`scatter_add_tokens`] (contract point 11): the compact branch gradient and the
/// gate gradient.
///
/// Errors: `hidden`, `d_out`, `branch`, `gate`.
pub fn scatter_add_tokens_backward<T: Element>(
    d_out: &[T],
    hidden: usize,
    routing: &Routing,
    branch: &[T],
    gate: &[f32],
) -> Result<TokenGrads<T>> {
    check_tokens("d_out", d_out.len(), hidden, routing)?;
    check_compact_input("branch", branch.len(), hidden, routing.total())?;
    check_len(
        "gate",
        gate.len(),
        routing.batch * routing.seq_len,
        "one gate per token, B x S",
    )?;
    let mut d_branch = vec![T::default(); routing.total() * hidden];
    let mut d_gate = vec![0.0f32; routing.batch * routing.seq_len];
    let mut terms = vec![0.0f32; hidden];
    for (r, flat) in routing.pairs() {
        let g = gate[flat];
        for j in 0..hidden {
            let dy = d_out[flat * hidden + j].to_f32();
            d_branch[r * hidden + j] = T::from_f32(g * dy);
            terms[j] = dy * branch[r * hidden + j].to_f32();
        }
        d_gate[flat] = sum_chunks(&terms, D_GATE_CHUNK);
    }
    Ok(TokenGrads { d_branch, d_gate })
}

/// Backward of [`gather_tokens`], accumulated into the input's gradient in place:
/// `d_x[token] = round_T(f32(d_x[token]) + f32(d_compact[r]))` for selected tokens, the others
/// untouched. `d_compact` may have more than `total` rows.
///
/// Errors: `hidden`, `d_x`, `d_compact`; nothing is written on error.
pub fn gather_tokens_backward<T: Element>(
    d_compact: &[T],
    hidden: usize,
    routing: &Routing,
    d_x: &mut [T],
) -> Result<()> {
    check_tokens("d_x", d_x.len(), hidden, routing)?;
    check_compact_input("d_compact", d_compact.len(), hidden, routing.total())?;
    for (r, flat) in routing.pairs() {
        for j in 0..hidden {
            let i = flat * hidden + j;
            d_x[i] = T::from_f32(d_x[i].to_f32() + d_compact[r * hidden + j].to_f32());
        }
    }
    Ok(())
}
