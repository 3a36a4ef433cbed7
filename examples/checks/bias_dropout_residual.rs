//! Fused bias + dropout + residual, `dropfuse::reference::bias_dropout_residual`: the forward's
//! `f32` steps (point 3), the mask as dropout's (point 2), the backward's `dx` and the bias
//! gradient in its fixed chunked order (point 4), the mask-free backward and the in-place forward.

use dropfuse::reference::bias_dropout_residual::{self as reference, Grads, D_BIAS_CHUNK};
use dropfuse::reference::dropout as dropout_ref;
use dropfuse::reference::philox::element_word;
use dropfuse::{Element, PhiloxState};

use super::{bit_diff, chunk_sum, word_diff, Checks};

fn bit(mask: &[u32], i: usize) -> bool {
    (mask[i / 32] >> (i % 32)) & 1 == 1
}

/// `f32(1 / (1 - p))`, 0 at `p = 1`.
fn scale_of(p: f64) -> f32 {
    if p == 1.0 {
        0.0
    } else {
        (1.0 / (1.0 - p)) as f32
    }
}

/// The forward (points 2 and 3) on `rows x row_len` inputs: the mask against the Philox words
/// (`word(element_offset + i) >= round(p 2^32)`), `y = round(f32(r) + (kept ? scale * (f32(x) +
/// f32(b)) : +0))` step by step, the in-place forward equal to it, and (with a bias) a bias of
/// `-0` equal to none. Returns the reference's `(y, mask)`.
#[allow(clippy::too_many_arguments)]
pub fn check_forward<T: Element>(
    checks: &mut Checks,
    x: &[T],
    residual: &[T],
    bias: Option<&[T]>,
    row_len: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
) -> dropfuse::Result<(Vec<T>, Vec<u32>)> {
    let (y, mask) = reference::forward(x, residual, bias, row_len, p, state, element_offset)?;
    let n = x.len();
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let mut want_mask = vec![0u32; n.div_ceil(32)];
    for i in 0..n {
        if u64::from(element_word(state, element_offset + i as u64)) >= threshold {
            want_mask[i / 32] |= 1 << (i % 32);
        }
    }
    checks.push(
        "mask: kept iff word(element_offset + i) >= threshold",
        word_diff(&mask, &want_mask),
    );
    let scale = scale_of(p);
    let want_y: Vec<T> = (0..n)
        .map(|i| {
            let t = match bias {
                Some(b) => x[i].to_f32() + b[i % row_len].to_f32(),
                None => x[i].to_f32(),
            };
            let u = if bit(&want_mask, i) { scale * t } else { 0.0 };
            T::from_f32(residual[i].to_f32() + u)
        })
        .collect();
    checks.push(
        "y = round(r + (kept ? scale * (x + b) : +0)), f32 steps",
        bit_diff(&y, &want_y),
    );
    let mut r = residual.to_vec();
    let m2 = reference::forward_in_place(x, &mut r, bias, row_len, p, state, element_offset)?;
    checks.expect(
        "in place on the residual == out of place",
        bit_diff(&r, &y).is_none() && m2 == mask,
        || bit_diff(&r, &y).unwrap_or_else(|| "masks differ".into()),
    );
    if bias.is_some() {
        let zeros = vec![T::from_f32(-0.0); row_len];
        let (y_neg0, _) = reference::forward(x, residual, Some(&zeros), row_len, p, state, element_offset)?;
        let (y_none, _) = reference::forward(x, residual, None, row_len, p, state, element_offset)?;
        checks.push("a bias of -0 == no bias", bit_diff(&y_neg0, &y_none));
    }
    Ok((y, mask))
}

/// The backward (point 4) from the forward's `mask`: `dx = kept ? round(scale * dy) : +0` (dropout's
/// backward), `dbias[j] = round(S_j)` with `S_j` the chunked sum (256 rows a chunk, `+0` starts,
/// ascending) of the column's `f32` terms, the partials chunk by chunk, and the mask-free backward
/// equal to it. Returns the reference's gradients.
#[allow(clippy::too_many_arguments)]
pub fn check_backward<T: Element>(
    checks: &mut Checks,
    dy: &[T],
    row_len: usize,
    mask: &[u32],
    p: f64,
    state: PhiloxState,
    element_offset: u64,
    with_bias: bool,
) -> dropfuse::Result<Grads<T>> {
    let g = reference::backward_from_mask(dy, row_len, mask, p, with_bias)?;
    let n = dy.len();
    let rows = n / row_len;
    let scale = scale_of(p);
    let terms: Vec<f32> = (0..n)
        .map(|i| if bit(mask, i) { scale * dy[i].to_f32() } else { 0.0 })
        .collect();
    let want_dx: Vec<T> = terms.iter().map(|&t| T::from_f32(t)).collect();
    checks.push("dx = kept ? round(scale * dy) : +0", bit_diff(&g.dx, &want_dx));
    checks.push(
        "dx == dropout's backward_from_mask",
        bit_diff(&g.dx, &dropout_ref::backward_from_mask(dy, mask, p)?),
    );
    if with_bias {
        let want_db: Vec<T> = (0..row_len)
            .map(|j| {
                let column: Vec<f32> = (0..rows).map(|r| terms[r * row_len + j]).collect();
                T::from_f32(chunk_sum(&column, D_BIAS_CHUNK))
            })
            .collect();
        match &g.dbias {
            Some(db) => checks.push(
                "dbias = round(chunked column sums, 256 rows a chunk)",
                bit_diff(db, &want_db),
            ),
            None => checks.push("dbias", Some("missing".into())),
        }
        let partials = reference::dbias_partials(dy, row_len, mask, p)?;
        let chunks = rows.div_ceil(D_BIAS_CHUNK);
        let want_partials: Vec<f32> = (0..chunks * row_len)
            .map(|k| {
                let (c, j) = (k / row_len, k % row_len);
                let mut s = 0.0f32;
                for r in c * D_BIAS_CHUNK..rows.min((c + 1) * D_BIAS_CHUNK) {
                    s += terms[r * row_len + j];
                }
                s
            })
            .collect();
        checks.push(
            "dbias partials: chunk c, column j, sequential",
            bit_diff(&partials, &want_partials),
        );
    } else {
        checks.check("no dbias without a bias", g.dbias.is_none());
    }
    let ml = reference::backward(dy, row_len, p, state, element_offset, with_bias)?;
    let db_diff = match (&ml.dbias, &g.dbias) {
        (Some(a), Some(b)) => bit_diff(a, b),
        (None, None) => None,
        _ => Some("dbias present in one only".into()),
    };
    checks.push(
        "mask-free backward == backward from the mask",
        bit_diff(&ml.dx, &g.dx).or(db_diff),
    );
    Ok(g)
}
