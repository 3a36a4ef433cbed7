//! Token routing, `dropfuse::reference::skip` points 7-11: the selections (per-sequence top-k and
//! the global budget) and the row operations (gather, gated scatter-add, their backward).

use dropfuse::reference::skip::{self as reference, Capacity, Routing, ValidTokens, D_GATE_CHUNK};
use dropfuse::Element;

use super::{bit_diff, chunk_sum, Checks};

/// How the tokens are selected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Select {
    /// Per-sequence top-k (point 8).
    TopK(Capacity),
    /// The global budget, a kept fraction of the batch (point 9).
    Global(f64),
}

impl Select {
    /// The reference's routing, and for a global budget its threshold.
    pub fn route(
        &self,
        scores: &[f32],
        seq_len: usize,
        valid: ValidTokens<'_>,
    ) -> dropfuse::Result<(Routing, Option<f32>)> {
        match *self {
            Select::TopK(c) => Ok((reference::route_top_k(scores, seq_len, valid, c)?, None)),
            Select::Global(q) => reference::route_global(scores, seq_len, valid, q),
        }
    }
}

/// Whether a token of score `a` at index `u` ranks before one of score `b` at index `v` (point 7),
/// written with float comparisons instead of the reference's `score_key`: a NaN ranks below every
/// number (`-inf` included) and all NaNs are equal, `-0 == +0`, equal scores go to the lower index.
pub fn ranks_before(a: f32, u: usize, b: f32, v: usize) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (false, false) if a != b => a > b,
        (false, true) => true,
        (true, false) => false,
        _ => u < v,
    }
}

/// The `B * S` flags of the real tokens.
pub fn valid_flags(valid: ValidTokens<'_>, batch: usize, seq_len: usize) -> Vec<bool> {
    match valid {
        ValidTokens::All => vec![true; batch * seq_len],
        ValidTokens::Mask(m) => m.to_vec(),
        ValidTokens::Lengths(lens) => (0..batch * seq_len)
            .map(|i| i % seq_len < lens[i / seq_len])
            .collect(),
    }
}

/// `(compact row, flat token index b * S + t)` of every selected token of a routing.
pub fn pairs(r: &Routing) -> Vec<(usize, usize)> {
    pairs_of(r.offsets(), r.indices(), r.seq_len())
}

/// [`pairs`] from offsets and indices (ranges clamped to the index list, so that a malformed
/// routing cannot panic here).
pub fn pairs_of(offsets: &[u32], indices: &[u32], seq_len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(indices.len());
    for b in 0..offsets.len().saturating_sub(1) {
        let hi = (offsets[b + 1] as usize).min(indices.len());
        for (row, &t) in indices.iter().enumerate().take(hi).skip(offsets[b] as usize) {
            out.push((row, b * seq_len + t as usize));
        }
    }
    out
}

/// The number of tokens a sequence (or the batch) of `valid` real tokens selects: `round(c * V)`
/// (half away from zero, in `f64`), `min(k, V)`, or `round(q * V)` for the global budget.
fn selected_count(select: Select, valid: usize) -> usize {
    let fraction = |c: f64| ((c * valid as f64).round() as usize).min(valid);
    match select {
        Select::TopK(Capacity::Fraction(c)) => fraction(c),
        Select::TopK(Capacity::Tokens(k)) => k.min(valid),
        Select::Global(q) => fraction(q),
    }
}

/// A threshold as the routing reports it: `+0` for a zero, NaN for a NaN.
fn canonical(s: f32) -> f32 {
    if s == 0.0 {
        0.0
    } else {
        s
    }
}

/// Runs the reference selection on `B x S` scores and checks it ([`check_routing`]). Returns the
/// routing.
pub fn check_selection(
    checks: &mut Checks,
    scores: &[f32],
    seq_len: usize,
    valid: ValidTokens<'_>,
    select: Select,
) -> dropfuse::Result<Routing> {
    let (r, threshold) = select.route(scores, seq_len, valid)?;
    check_routing(
        checks,
        scores,
        seq_len,
        valid,
        select,
        (r.offsets(), r.indices()),
        threshold,
    );
    Ok(r)
}

/// A selection (offsets, indices and, for the global budget, the threshold) against points 7-9:
/// the offsets and indices are well formed and name real tokens, each sequence (top-k) or the
/// batch (global) selects the re-derived count, the last selected token ranks before the first
/// unselected real one, and the global threshold is the last selected score.
pub fn check_routing(
    checks: &mut Checks,
    scores: &[f32],
    seq_len: usize,
    valid: ValidTokens<'_>,
    select: Select,
    (offsets, indices): (&[u32], &[u32]),
    threshold: Option<f32>,
) {
    let batch = scores.len() / seq_len;
    let flags = valid_flags(valid, batch, seq_len);

    let mut shape = None;
    if offsets.len() != batch + 1 || offsets[0] != 0 || offsets[batch] as usize != indices.len() {
        shape = Some(format!(
            "{} offsets from {:?} to {:?} for {batch} sequences and {} indices",
            offsets.len(),
            offsets.first(),
            offsets.last(),
            indices.len()
        ));
    }
    for b in 0..batch {
        if shape.is_some() {
            break;
        }
        let (lo, hi) = (offsets[b] as usize, offsets[b + 1] as usize);
        if lo > hi {
            shape = Some(format!("offsets[{b}] = {lo} > offsets[{}] = {hi}", b + 1));
        } else if !indices[lo..hi].windows(2).all(|w| w[0] < w[1]) {
            shape = Some(format!("sequence {b}: indices not ascending"));
        } else if let Some(&t) = indices[lo..hi]
            .iter()
            .find(|&&t| t as usize >= seq_len || !flags[b * seq_len + t as usize])
        {
            shape = Some(format!("sequence {b}: token {t} is not a real token"));
        }
    }
    let well_formed = shape.is_none();
    checks.push("offsets 0.., indices ascending, real tokens only", shape);
    if !well_formed {
        return;
    }

    let mut selected = vec![false; batch * seq_len];
    for (_, flat) in pairs_of(offsets, indices, seq_len) {
        selected[flat] = true;
    }
    // Groups of competing tokens: each sequence for top-k, the whole batch for the global budget
    // (flat indices order the tokens of a sequence like their indices within it).
    let groups: Vec<std::ops::Range<usize>> = match select {
        Select::TopK(_) => (0..batch).map(|b| b * seq_len..(b + 1) * seq_len).collect(),
        Select::Global(_) => std::iter::once(0..batch * seq_len).collect(),
    };
    let mut count_bad = None;
    let mut rank_bad = None;
    let mut last_selected = None;
    for (g, range) in groups.iter().enumerate() {
        let real = range.clone().filter(|&i| flags[i]).count();
        let got = range.clone().filter(|&i| selected[i]).count();
        let want = selected_count(select, real);
        if got != want && count_bad.is_none() {
            count_bad = Some(format!(
                "group {g}: {got} selected of {real} real tokens, want {want}"
            ));
        }
        let (mut worst, mut best) = (None::<usize>, None::<usize>);
        for i in range.clone().filter(|&i| flags[i]) {
            if selected[i] {
                if worst.map_or(true, |w| ranks_before(scores[w], w, scores[i], i)) {
                    worst = Some(i);
                }
            } else if best.map_or(true, |u| ranks_before(scores[i], i, scores[u], u)) {
                best = Some(i);
            }
        }
        if let (Some(w), Some(u)) = (worst, best) {
            if !ranks_before(scores[w], w, scores[u], u) && rank_bad.is_none() {
                rank_bad = Some(format!(
                    "group {g}: selected token {w} (score {}) ranks after unselected {u} (score {})",
                    scores[w], scores[u]
                ));
            }
        }
        last_selected = worst;
    }
    let rule = match select {
        Select::TopK(Capacity::Fraction(c)) => format!("round({c} * V_b) per sequence"),
        Select::TopK(Capacity::Tokens(k)) => format!("min({k}, V_b) per sequence"),
        Select::Global(q) => format!("round({q} * V) in the batch"),
    };
    checks.push(format!("count: {rule}"), count_bad);
    checks.push("selected rank before unselected (ties: lower index)", rank_bad);
    if let Select::Global(_) = select {
        let want = last_selected.map(|w| canonical(scores[w]));
        let same = match (threshold, want) {
            (None, None) => true,
            (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            _ => false,
        };
        checks.expect("threshold: the last selected score", same, || {
            format!("got {threshold:?}, want {want:?}")
        });
    }
}

/// Gather (point 10): compact row `r` is a bit copy of the row of its token; into a pre-sized
/// buffer, the rows past the total are untouched and the total is returned.
pub fn check_gather<T: Element>(
    checks: &mut Checks,
    x: &[T],
    hidden: usize,
    r: &Routing,
) -> dropfuse::Result<()> {
    let h = hidden;
    let got = reference::gather_tokens(x, h, r)?;
    let mut want = vec![T::default(); r.total() * h];
    for (row, flat) in pairs(r) {
        want[row * h..(row + 1) * h].copy_from_slice(&x[flat * h..(flat + 1) * h]);
    }
    checks.bits("gather: compact row == its token's row", &got, &want);
    let spare = T::from_f32(-7.0);
    let mut buf = vec![spare; (r.total() + 2) * h];
    let total = reference::gather_tokens_into(x, h, r, &mut buf)?;
    want.resize((r.total() + 2) * h, spare);
    let failure = if total != r.total() {
        Some(format!("returned {total}, want {}", r.total()))
    } else {
        bit_diff(&buf, &want)
    };
    checks.push("gather_tokens_into: 2 spare rows untouched", failure);
    Ok(())
}

/// Gated scatter-add (point 10): `res = round_T(f32(res) + g * f32(branch[r]))` for the selected
/// tokens (two `f32` roundings), every other token untouched. `branch` may have spare rows.
pub fn check_scatter_add<T: Element>(
    checks: &mut Checks,
    x: &[T],
    hidden: usize,
    r: &Routing,
    branch: &[T],
    gate: &[f32],
) -> dropfuse::Result<()> {
    let h = hidden;
    let mut got = x.to_vec();
    reference::scatter_add_tokens(&mut got, h, r, branch, gate)?;
    let mut want = x.to_vec();
    for (row, flat) in pairs(r) {
        let g = gate[flat];
        for j in 0..h {
            let i = flat * h + j;
            let u = g * branch[row * h + j].to_f32();
            want[i] = T::from_f32(x[i].to_f32() + u);
        }
    }
    checks.bits(
        "scatter-add: round(res + g * branch), rest untouched",
        &got,
        &want,
    );
    Ok(())
}

/// Backward of the gated scatter-add (point 11): `d_branch[r] = round_T(g * f32(d_out[token]))`;
/// `d_gate[token]` the chunked sum (chunks of `D_GATE_CHUNK`) of the `f32` products
/// `d_out[token][j] * branch[r][j]`, `+0` for unselected tokens.
pub fn check_scatter_add_backward<T: Element>(
    checks: &mut Checks,
    d_out: &[T],
    hidden: usize,
    r: &Routing,
    branch: &[T],
    gate: &[f32],
) -> dropfuse::Result<()> {
    let h = hidden;
    let got = reference::scatter_add_tokens_backward(d_out, h, r, branch, gate)?;
    let mut d_branch = vec![T::default(); r.total() * h];
    let mut d_gate = vec![0.0f32; r.batch() * r.seq_len()];
    for (row, flat) in pairs(r) {
        let g = gate[flat];
        let terms: Vec<f32> = (0..h)
            .map(|j| d_out[flat * h + j].to_f32() * branch[row * h + j].to_f32())
            .collect();
        for j in 0..h {
            d_branch[row * h + j] = T::from_f32(g * d_out[flat * h + j].to_f32());
        }
        d_gate[flat] = chunk_sum(&terms, D_GATE_CHUNK);
    }
    checks.bits(
        "scatter-add backward: d_branch = round(g * d_out)",
        &got.d_branch,
        &d_branch,
    );
    checks.bits(
        format!("d_gate: chunked ({D_GATE_CHUNK}) dot product, +0 unselected"),
        &got.d_gate,
        &d_gate,
    );
    Ok(())
}

/// Backward of the gather (point 11): `d_x[token] = round_T(f32(d_x[token]) + f32(d_c[r]))` for
/// the selected tokens, the other rows untouched. `d_c` may have spare rows.
pub fn check_gather_backward<T: Element>(
    checks: &mut Checks,
    d_c: &[T],
    hidden: usize,
    r: &Routing,
    d_x: &[T],
) -> dropfuse::Result<()> {
    let h = hidden;
    let mut got = d_x.to_vec();
    reference::gather_tokens_backward(d_c, h, r, &mut got)?;
    let mut want = d_x.to_vec();
    for (row, flat) in pairs(r) {
        for j in 0..h {
            let i = flat * h + j;
            want[i] = T::from_f32(d_x[i].to_f32() + d_c[row * h + j].to_f32());
        }
    }
    checks.bits("gather backward: d_x += d_compact, rest untouched", &got, &want);
    Ok(())
}
