//! DropBlock on the CPU: seed threshold, drawn seeds, keep flags, bit-packed mask, per-sample counts
//! and scales, forward and backward, written straight from the contract in [`crate::drop_block`].
//!
//! Plain and slow on purpose: seeds and dropped units are boolean arrays, every block is painted
//! unit by unit, and nothing is fused. Every function that takes a shape validates its arguments
//! first and returns [`Error::InvalidArgument`] instead of panicking, with the argument names the
//! GPU launchers use (`shape`, `x`, `dy`, `mask`, `scales`; a shape whose flags cannot be
//! allocated is a `shape` error, not an abort).

use crate::drop_block::{DropBlock, Normalize};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::reference::dropout::{mask_bit, mask_words};
use crate::reference::philox::element_word;
use crate::rng::PhiloxState;

/// 2^32: the number of possible random words, as an `f64` (exact).
const TWO_POW_32: f64 = 4_294_967_296.0;

/// Bits per mask word.
const MASK_BITS: usize = 32;

/// A validated shape and everything derived from it (contract points 1 and 3).
struct Geometry {
    /// Samples `N`.
    n: usize,
    /// Channels `C`.
    c: usize,
    /// Spatial dims `S` (`[H, W]` or `[D, H, W]`).
    dims: Vec<usize>,
    /// `prod S_a`.
    spatial: usize,
    /// `prod v_a`.
    valid: usize,
    /// `N * C * spatial`.
    numel: usize,
    /// Mask planes: `N * C`, or `N` with shared channels.
    planes: usize,
}

impl Geometry {
    /// The plane of channel `c` of sample `n`.
    fn plane(&self, cfg: &DropBlock, n: usize, c: usize) -> usize {
        if cfg.shared_channels() {
            n
        } else {
            n * self.c + c
        }
    }
}

/// Checks `shape` (`[N, C, H, W]` or `[N, C, D, H, W]`, every dim >= 1, `numel` fits `usize`) and
/// derives the block geometry for `cfg`.
fn geometry(cfg: &DropBlock, shape: &[usize]) -> Result<Geometry> {
    if shape.len() != 4 && shape.len() != 5 {
        return Err(Error::invalid(
            "shape",
            "[N, C, H, W] or [N, C, D, H, W] (4 or 5 dims)",
            format!("{shape:?} ({} dims)", shape.len()),
        ));
    }
    if shape.contains(&0) {
        return Err(Error::invalid("shape", "every dim >= 1", format!("{shape:?}")));
    }
    let mut numel: usize = 1;
    for &d in shape {
        numel = match numel.checked_mul(d) {
            Some(v) => v,
            None => {
                return Err(Error::invalid(
                    "shape",
                    "a number of elements that fits in usize",
                    format!("{shape:?}"),
                ))
            }
        };
    }
    // Every product below divides numel, so none of them can overflow.
    let n = shape[0];
    let c = shape[1];
    let dims = shape[2..].to_vec();
    let valid = dims.iter().map(|&s| s - cfg.block_size().min(s) + 1).product();
    let spatial = dims.iter().product();
    let planes = if cfg.shared_channels() { n } else { n * c };
    Ok(Geometry {
        n,
        c,
        dims,
        spatial,
        valid,
        numel,
        planes,
    })
}

/// Rejects a slice whose length is not `expected`; `name` is the argument's name.
fn check_len(name: &'static str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("{expected} {what}"),
            format!("{len} {what}"),
        ))
    }
}

/// Row-major linear index of `pos` in a grid of extents `dims`.
fn linear(pos: &[usize], dims: &[usize]) -> usize {
    let mut lin = 0;
    for (&p, &d) in pos.iter().zip(dims) {
        lin = lin * d + p;
    }
    lin
}

/// The position with row-major linear index `lin` in a grid of extents `dims`.
fn unravel(mut lin: usize, dims: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; dims.len()];
    for a in (0..dims.len()).rev() {
        pos[a] = lin % dims[a];
        lin /= dims[a];
    }
    pos
}

/// The seed threshold for spatial dims `spatial` (`[H, W]` or `[D, H, W]`): contract point 2.
///
/// `gamma = gamma_scale * p * spatial / (vol * valid)` in `f64`, in exactly that order, and the
/// threshold is `round(min(gamma, 1) * 2^32)`, a value in `[0, 2^32]`. A seed is drawn iff its
/// Philox word is below the threshold.
///
/// The dims are expected to be `>= 1` (the shape-taking functions check this); this function does
/// not validate them and does not panic on any input (products saturate).
pub fn seed_threshold(cfg: &DropBlock, spatial: &[usize]) -> u64 {
    let mut spatial_n: u64 = 1;
    let mut vol: u64 = 1;
    let mut valid: u64 = 1;
    for &s in spatial {
        let b = cfg.block_size().min(s);
        let v = s - b + 1;
        spatial_n = spatial_n.saturating_mul(s as u64);
        vol = vol.saturating_mul(b as u64);
        valid = valid.saturating_mul(v as u64);
    }
    let gamma_scale = cfg.gamma_scale();
    let p = cfg.p();
    let gamma = gamma_scale * p * spatial_n as f64 / (vol as f64 * valid as f64);
    (gamma.min(1.0) * TWO_POW_32).round() as u64
}

/// The drawn-seed flags: `planes * valid` entries, entry `q * valid + lin(u)` for valid position
/// `u` of plane `q` (contract points 3 and 4). Seed `i` is drawn iff `element_word(state, i) <
/// threshold`.
pub fn seeds(cfg: &DropBlock, shape: &[usize], state: PhiloxState) -> Result<Vec<bool>> {
    let g = geometry(cfg, shape)?;
    let t = seed_threshold(cfg, &g.dims);
    let mut flags = crate::alloc::filled("shape", g.planes * g.valid, false)?;
    for q in 0..g.planes {
        for l in 0..g.valid {
            let i = q * g.valid + l;
            flags[i] = u64::from(element_word(state, i as u64)) < t;
        }
    }
    Ok(flags)
}

/// The dropped flags of the units of mask plane `q` (`spatial` entries, row-major over `dims`, the
/// spatial dims `[H, W]` or `[D, H, W]`): contract point 5. Each drawn seed `u` of the plane (seed
/// index `q * valid + lin(u)`) drops the units `u_a <= s_a < u_a + b_a`. Planes are independent,
/// so this is also the oracle for one plane of a tensor too large for [`keep`].
///
/// Errors: `dims` (a dim of 0, a product over `usize`, or a plane that cannot be allocated), `q`
/// (a seed index `q * valid + lin(u)` over `u64`).
pub fn plane_dropped(cfg: &DropBlock, dims: &[usize], q: u64, state: PhiloxState) -> Result<Vec<bool>> {
    let bad_dims = || {
        Error::invalid(
            "dims",
            "spatial dims >= 1 whose product fits in usize",
            format!("{dims:?}"),
        )
    };
    if dims.contains(&0) {
        return Err(bad_dims());
    }
    let spatial = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(bad_dims)?;
    // Every block extent and valid extent is at most its dim: these products divide spatial.
    let block: Vec<usize> = dims.iter().map(|&s| cfg.block_size().min(s)).collect();
    let valid_dims: Vec<usize> = dims.iter().zip(&block).map(|(&s, &b)| s - b + 1).collect();
    let valid: usize = valid_dims.iter().product();
    let block_volume: usize = block.iter().product();
    q.checked_mul(valid as u64)
        .and_then(|first| first.checked_add(valid as u64 - 1))
        .ok_or_else(|| {
            Error::invalid(
                "q",
                format!("a plane whose seed indices q * {valid} + lin(u) fit in u64"),
                q,
            )
        })?;
    let t = seed_threshold(cfg, dims);
    let mut dropped = crate::alloc::filled("dims", spatial, false)?;
    for l in 0..valid {
        let i = q * valid as u64 + l as u64;
        if u64::from(element_word(state, i)) >= t {
            continue;
        }
        let u = unravel(l, &valid_dims);
        for o in 0..block_volume {
            let delta = unravel(o, &block);
            let s: Vec<usize> = u.iter().zip(&delta).map(|(&ua, &da)| ua + da).collect();
            dropped[linear(&s, dims)] = true;
        }
    }
    Ok(dropped)
}

/// The keep flag of every element of `x` (`numel` entries, row-major like `x`): contract points 5
/// and 6. An element is kept iff its unit of its plane is not dropped ([`plane_dropped`]).
pub fn keep(cfg: &DropBlock, shape: &[usize], state: PhiloxState) -> Result<Vec<bool>> {
    let g = geometry(cfg, shape)?;
    // dropped[q * spatial + lin_S(s)]: unit s of plane q is covered by some drawn seed.
    let mut dropped = crate::alloc::with_capacity("shape", g.planes * g.spatial)?;
    for q in 0..g.planes {
        dropped.extend(plane_dropped(cfg, &g.dims, q as u64, state)?);
    }

    let mut flags = crate::alloc::filled("shape", g.numel, false)?;
    for n in 0..g.n {
        for c in 0..g.c {
            let q = g.plane(cfg, n, c);
            for s in 0..g.spatial {
                let e = (n * g.c + c) * g.spatial + s;
                flags[e] = !dropped[q * g.spatial + s];
            }
        }
    }
    Ok(flags)
}

/// Packs keep flags into mask words: bit `j` of word `w` is flag `32 w + j`, high bits 0.
fn pack(flags: &[bool]) -> Vec<u32> {
    let mut words = vec![0u32; mask_words(flags.len())];
    for (e, &k) in flags.iter().enumerate() {
        if k {
            words[e / MASK_BITS] |= 1 << (e % MASK_BITS);
        }
    }
    words
}

/// The bit-packed keep mask (contract point 6): `ceil(numel / 32)` words, bit `j` of word `w` is
/// the keep flag of element `32 w + j`, unused high bits of the last word 0.
pub fn mask(cfg: &DropBlock, shape: &[usize], state: PhiloxState) -> Result<Vec<u32>> {
    Ok(pack(&keep(cfg, shape, state)?))
}

/// The number of kept elements of each sample (`N` entries): contract point 7. `keep` must hold
/// `numel` flags (argument name `keep`).
pub fn counts(shape: &[usize], keep: &[bool]) -> Result<Vec<u64>> {
    // The block size does not matter for the element count.
    let cfg = DropBlock::new(0.0, 1)?;
    let g = geometry(&cfg, shape)?;
    check_len("keep", "flags", keep.len(), g.numel)?;
    let per_sample = g.c * g.spatial;
    let mut kept = vec![0u64; g.n];
    for (n, k) in kept.iter_mut().enumerate() {
        *k = keep[n * per_sample..(n + 1) * per_sample]
            .iter()
            .filter(|&&f| f)
            .count() as u64;
    }
    Ok(kept)
}

/// The per-sample scales (`N` entries): contract point 8. `counts` must hold `N` entries, each at
/// most `C * spatial` (argument name `counts`).
///
/// * [`Normalize::Global`] gives `numel / K` with `K = sum counts`, every entry the same, `0` if `K == 0`.
/// * [`Normalize::PerSample`] gives `(C * spatial) / kept_n`, `0` if `kept_n == 0`.
/// * [`Normalize::Off`] gives `1`.
///
/// Computed in `f64` and rounded once to `f32`.
pub fn scales(cfg: &DropBlock, shape: &[usize], counts: &[u64]) -> Result<Vec<f32>> {
    let g = geometry(cfg, shape)?;
    check_len("counts", "entries", counts.len(), g.n)?;
    let per_sample = g.c * g.spatial;
    if let Some(&bad) = counts.iter().find(|&&k| k > per_sample as u64) {
        return Err(Error::invalid(
            "counts",
            format!("at most C * spatial = {per_sample} per sample"),
            bad,
        ));
    }
    let out = match cfg.normalize() {
        Normalize::Global => {
            // Each count is at most C * spatial, so the sum is at most numel: no overflow.
            let total: u64 = counts.iter().sum();
            let s = if total == 0 {
                0.0
            } else {
                (g.numel as f64 / total as f64) as f32
            };
            vec![s; g.n]
        }
        Normalize::PerSample => counts
            .iter()
            .map(|&k| {
                if k == 0 {
                    0.0
                } else {
                    (per_sample as f64 / k as f64) as f32
                }
            })
            .collect(),
        Normalize::Off => vec![1.0; g.n],
    };
    Ok(out)
}

/// What [`forward`] returns: the output, the bit-packed keep mask, the kept count and the scale of
/// each sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward<T> {
    /// `y = keep ? x * scale_n : +0`.
    pub y: Vec<T>,
    /// `ceil(numel / 32)` mask words.
    pub mask: Vec<u32>,
    /// Kept elements per sample (`N` entries).
    pub counts: Vec<u64>,
    /// Scale per sample (`N` entries).
    pub scales: Vec<f32>,
}

/// DropBlock forward (contract point 9): `y[e] = keep[e] ? T::from_f32(x[e].to_f32() * s_n) : +0`,
/// with `n` the sample of element `e`; dropped elements are `+0` even for NaN or infinite `x`.
/// `x` must hold `numel` elements (argument name `x`).
pub fn forward<T: Element>(
    cfg: &DropBlock,
    shape: &[usize],
    x: &[T],
    state: PhiloxState,
) -> Result<Forward<T>> {
    let g = geometry(cfg, shape)?;
    check_len("x", "elements", x.len(), g.numel)?;
    let flags = keep(cfg, shape, state)?;
    let kept = counts(shape, &flags)?;
    let sc = scales(cfg, shape, &kept)?;
    let per_sample = g.c * g.spatial;
    let y = x
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            if flags[e] {
                T::from_f32(v.to_f32() * sc[e / per_sample])
            } else {
                T::from_f32(0.0)
            }
        })
        .collect();
    Ok(Forward {
        y,
        mask: pack(&flags),
        counts: kept,
        scales: sc,
    })
}

/// DropBlock backward from a stored mask and scales (contract point 10):
/// `dx[e] = bit e of mask ? T::from_f32(dy[e].to_f32() * s_n) : +0`.
///
/// `dy` must hold `numel` elements (`dy`), `mask` exactly `ceil(numel / 32)` words (`mask`) and
/// `scales` `N` entries (`scales`).
pub fn backward<T: Element>(shape: &[usize], dy: &[T], mask: &[u32], scales: &[f32]) -> Result<Vec<T>> {
    // The block size does not matter for the element layout.
    let cfg = DropBlock::new(0.0, 1)?;
    let g = geometry(&cfg, shape)?;
    check_len("dy", "elements", dy.len(), g.numel)?;
    check_len("mask", "words", mask.len(), mask_words(g.numel))?;
    check_len("scales", "entries", scales.len(), g.n)?;
    let per_sample = g.c * g.spatial;
    let dx = dy
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            if mask_bit(mask, e) {
                T::from_f32(v.to_f32() * scales[e / per_sample])
            } else {
                T::from_f32(0.0)
            }
        })
        .collect();
    Ok(dx)
}
