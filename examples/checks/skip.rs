//! Stochastic depth and per-sample compaction, `dropfuse::reference::skip` points 2-6.

use dropfuse::reference::skip::{self as reference, Compaction, SampleKeep, D_BIAS_CHUNK};
use dropfuse::Element;

use super::{bit_diff, chunk_sum, Checks};

/// The per-sample flags of `keep` for a batch of `batch`.
pub fn keep_flags(keep: SampleKeep<'_>, batch: usize) -> Vec<bool> {
    match keep {
        SampleKeep::Batch(k) => vec![k; batch],
        SampleKeep::PerSample(f) => f.to_vec(),
    }
}

/// The slot of every sample: the number of kept samples before it, `None` when skipped.
fn slots_of(keep: &[bool]) -> Vec<Option<u32>> {
    let mut next = 0u32;
    keep.iter()
        .map(|&k| {
            k.then(|| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

/// Rows `rows` (ascending) of `x`, rows of `row_len`.
fn rows_of<T: Element>(x: &[T], row_len: usize, rows: impl Iterator<Item = usize>) -> Vec<T> {
    rows.flat_map(|b| x[b * row_len..(b + 1) * row_len].iter().copied())
        .collect()
}

/// The kept samples, ascending.
fn kept_samples(keep: &[bool]) -> impl Iterator<Item = usize> + '_ {
    (0..keep.len()).filter(|&b| keep[b])
}

/// Stochastic-depth forward (point 2), out of place and in place: kept rows
/// `round_T(f32(x) + s * (f32(f) + f32(bias[j % P])))` (each step one `f32` operation, no add
/// without a bias), dropped rows `x` bit for bit.
pub fn check_depth<T: Element>(
    checks: &mut Checks,
    x: &[T],
    f: &[T],
    bias: Option<&[T]>,
    row_len: usize,
    keep: SampleKeep<'_>,
    scale: f32,
) -> dropfuse::Result<()> {
    let got = reference::stochastic_depth(x, f, bias, row_len, keep, scale)?;
    let kept = keep_flags(keep, x.len() / row_len);
    let want: Vec<T> = (0..x.len())
        .map(|i| {
            if !kept[i / row_len] {
                return x[i];
            }
            let t = match bias {
                Some(bias) => f[i].to_f32() + bias[(i % row_len) % bias.len()].to_f32(),
                None => f[i].to_f32(),
            };
            let u = scale * t;
            T::from_f32(x[i].to_f32() + u)
        })
        .collect();
    checks.bits("forward: kept round(x + s * (f + bias)), dropped x", &got, &want);
    let mut in_place = x.to_vec();
    reference::stochastic_depth_in_place(&mut in_place, f, bias, row_len, keep, scale)?;
    checks.bits("forward in place == out of place", &in_place, &got);
    Ok(())
}

/// Stochastic-depth backward (points 3 and 4): `d_branch = round_T(s * f32(d_out))` for kept rows,
/// `+0` for dropped ones; `d_bias[k] = round_T(s * S_k)` with `S_k` the chunked sum (chunks of
/// `D_BIAS_CHUNK`) of the terms `m = b * (R / P) + q`: `d_out[b][q * P + k]` of kept rows, `+0` of
/// dropped ones.
pub fn check_depth_backward<T: Element>(
    checks: &mut Checks,
    d_out: &[T],
    row_len: usize,
    keep: SampleKeep<'_>,
    scale: f32,
    bias_len: Option<usize>,
) -> dropfuse::Result<()> {
    let got = reference::stochastic_depth_backward(d_out, row_len, keep, scale, bias_len)?;
    let batch = d_out.len() / row_len;
    let kept = keep_flags(keep, batch);
    let d_branch: Vec<T> = (0..d_out.len())
        .map(|i| {
            if kept[i / row_len] {
                T::from_f32(scale * d_out[i].to_f32())
            } else {
                T::from_f32(0.0)
            }
        })
        .collect();
    checks.bits(
        "backward: d_branch = kept ? round(s * d_out) : +0",
        &got.d_branch,
        &d_branch,
    );
    if let Some(p) = bias_len {
        let reps = row_len / p;
        let d_bias: Vec<T> = (0..p)
            .map(|k| {
                let terms: Vec<f32> = (0..batch * reps)
                    .map(|m| {
                        let (b, q) = (m / reps, m % reps);
                        if kept[b] {
                            d_out[b * row_len + q * p + k].to_f32()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                T::from_f32(scale * chunk_sum(&terms, D_BIAS_CHUNK))
            })
            .collect();
        let failure = match &got.d_bias {
            Some(g) => bit_diff(g, &d_bias),
            None => Some("no d_bias".into()),
        };
        checks.push(
            format!("d_bias: round(s * chunked ({D_BIAS_CHUNK}) sum of kept d_out)"),
            failure,
        );
    } else if got.d_bias.is_some() {
        checks.push("no d_bias without a bias", Some("a d_bias".into()));
    }
    Ok(())
}

/// The compaction (point 5): slots are the exclusive prefix sum of the kept flags, the count and
/// the kept samples follow. Returns the reference's compaction.
pub fn check_slots(checks: &mut Checks, keep: &[bool]) -> dropfuse::Result<Compaction> {
    let c = Compaction::new(keep)?;
    let slots = slots_of(keep);
    let indices: Vec<u32> = kept_samples(keep).map(|b| b as u32).collect();
    let failure = super::word_diff(c.slots(), &slots).or_else(|| {
        (c.count() != indices.len() || c.indices() != indices).then(|| {
            format!(
                "count {} indices {:?}, want {} {:?}",
                c.count(),
                c.indices(),
                indices.len(),
                indices
            )
        })
    });
    checks.push("slots: exclusive prefix sum of the kept flags", failure);
    Ok(c)
}

/// Gather (point 6): the kept rows in ascending order; into a pre-sized buffer the spare row is
/// untouched and the count is returned.
pub fn check_gather<T: Element>(
    checks: &mut Checks,
    x: &[T],
    row_len: usize,
    keep: &[bool],
) -> dropfuse::Result<()> {
    let got = reference::gather_samples(x, row_len, keep)?;
    let mut want = rows_of(x, row_len, kept_samples(keep));
    checks.bits("gather: compact[slot(b)] = x[b]", &got, &want);
    let count = want.len() / row_len;
    let spare = T::from_f32(-7.0);
    let mut buf = vec![spare; (count + 1) * row_len];
    let n = reference::gather_samples_into(x, row_len, keep, &mut buf)?;
    want.resize((count + 1) * row_len, spare);
    let failure = if n != count {
        Some(format!("returned {n}, want {count}"))
    } else {
        bit_diff(&buf, &want)
    };
    checks.push("gather_samples_into: spare row untouched", failure);
    Ok(())
}

/// Scatter (point 6, the layer replaced): `out[b] = compact[slot(b)]` for kept samples, `x[b]` for
/// skipped ones; scattering the gather of `x` gives `x` back.
pub fn check_scatter<T: Element>(
    checks: &mut Checks,
    x: &[T],
    compact: &[T],
    row_len: usize,
    keep: &[bool],
) -> dropfuse::Result<()> {
    let got = reference::scatter_samples(x, compact, row_len, keep)?;
    let slots = slots_of(keep);
    let want: Vec<T> = (0..x.len())
        .map(|i| match slots[i / row_len] {
            Some(s) => compact[s as usize * row_len + i % row_len],
            None => x[i],
        })
        .collect();
    checks.bits("scatter: kept compact[slot(b)], skipped x[b]", &got, &want);
    let gathered = rows_of(x, row_len, kept_samples(keep));
    let back = reference::scatter_samples(x, &gathered, row_len, keep)?;
    checks.bits("scatter(x, gather(x)) == x", &back, x);
    Ok(())
}

/// Backward of the scatter (point 6): `d_x` is `+0` for kept samples and `d_out` for skipped ones,
/// `d_compact` the gather of `d_out`.
pub fn check_scatter_backward<T: Element>(
    checks: &mut Checks,
    d_out: &[T],
    row_len: usize,
    keep: &[bool],
) -> dropfuse::Result<()> {
    let (d_x, d_c) = reference::scatter_samples_backward(d_out, row_len, keep)?;
    let want_dx: Vec<T> = (0..d_out.len())
        .map(|i| {
            if keep[i / row_len] {
                T::from_f32(0.0)
            } else {
                d_out[i]
            }
        })
        .collect();
    checks.bits("scatter backward: d_x = kept ? +0 : d_out", &d_x, &want_dx);
    checks.bits(
        "scatter backward: d_compact = gather(d_out)",
        &d_c,
        &rows_of(d_out, row_len, kept_samples(keep)),
    );
    Ok(())
}

/// Residual scatter-add (point 6): `x[b] = round_T(f32(x[b]) + s * f32(compact[slot(b)]))` for
/// kept samples, skipped rows untouched; with `compact` the gather of `f` (plus a spare row) it is
/// the stochastic-depth forward without a bias, bit for bit.
pub fn check_scatter_add<T: Element>(
    checks: &mut Checks,
    x: &[T],
    f: &[T],
    row_len: usize,
    keep: &[bool],
    scale: f32,
) -> dropfuse::Result<()> {
    let mut compact = rows_of(f, row_len, kept_samples(keep));
    compact.resize(compact.len() + row_len, T::from_f32(3.0));
    let mut got = x.to_vec();
    reference::scatter_add_samples(&mut got, &compact, row_len, keep, scale)?;
    let slots = slots_of(keep);
    let want: Vec<T> = (0..x.len())
        .map(|i| match slots[i / row_len] {
            Some(s) => {
                let u = scale * compact[s as usize * row_len + i % row_len].to_f32();
                T::from_f32(x[i].to_f32() + u)
            }
            None => x[i],
        })
        .collect();
    checks.bits("scatter-add: kept round(x + s * compact), skipped x", &got, &want);
    let depth = reference::stochastic_depth(x, f, None, row_len, SampleKeep::PerSample(keep), scale)?;
    checks.bits(
        "scatter-add(x, gather(f)) == stochastic depth(x, f)",
        &got,
        &depth,
    );
    Ok(())
}

/// Backward of the scatter-add (point 6): `d_compact[slot(b)] = round_T(s * f32(d_out[b]))`, the
/// gather of the stochastic-depth backward's `d_branch`.
pub fn check_scatter_add_backward<T: Element>(
    checks: &mut Checks,
    d_out: &[T],
    row_len: usize,
    keep: &[bool],
    scale: f32,
) -> dropfuse::Result<()> {
    let got = reference::scatter_add_samples_backward(d_out, row_len, keep, scale)?;
    let want: Vec<T> = rows_of(d_out, row_len, kept_samples(keep))
        .into_iter()
        .map(|v| T::from_f32(scale * v.to_f32()))
        .collect();
    checks.bits("scatter-add backward: round(s * d_out) of kept rows", &got, &want);
    let depth =
        reference::stochastic_depth_backward(d_out, row_len, SampleKeep::PerSample(keep), scale, None)?;
    checks.bits(
        "scatter-add backward == gather(depth backward d_branch)",
        &got,
        &rows_of(&depth.d_branch, row_len, kept_samples(keep)),
    );
    Ok(())
}

/// Backward of the gather (point 6): `d_x[b] = round_T(f32(d_x[b]) + f32(d_c[slot(b)]))` for kept
/// samples, skipped rows untouched. `d_c` may have spare rows.
pub fn check_gather_backward<T: Element>(
    checks: &mut Checks,
    d_c: &[T],
    row_len: usize,
    keep: &[bool],
    d_x: &[T],
) -> dropfuse::Result<()> {
    let mut got = d_x.to_vec();
    reference::gather_samples_backward(d_c, row_len, keep, &mut got)?;
    let slots = slots_of(keep);
    let want: Vec<T> = (0..d_x.len())
        .map(|i| match slots[i / row_len] {
            Some(s) => T::from_f32(d_x[i].to_f32() + d_c[s as usize * row_len + i % row_len].to_f32()),
            None => d_x[i],
        })
        .collect();
    checks.bits("gather backward: d_x += d_compact of kept rows", &got, &want);
    Ok(())
}
