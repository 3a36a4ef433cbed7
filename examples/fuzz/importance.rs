//! Attention-importance cases (`dropfuse::importance::ImportanceAccumulator` against
//! `dropfuse::reference::importance`, within its documented bounds).
//!
//! Kernels: `importance` (`add`) and `importance_similarities` (`add_with_similarities`: every
//! token's similarity too, NaN for padding). Keys besides `dtype`, `kernel` and `data`:
//!
//! * `shape`: `TOKENSxH` (tokens around the 64-token tiles, `H` from 1 to 4096);
//! * `mask`: `none`, `real` (a mask, every token real: bytes 1 to 255), `some` (about a third
//!   padding), `padding` (every token padding: nothing counted);
//! * `layer`: the layer (of 3) the batch goes to; `adds`: how often the batch is added (1 to 3);
//! * `xo`, `yo`, `mo`: view offsets of the input, of the output hidden states, of the mask bytes
//!   and the similarities.
//!
//! The hidden states are `checks::importance::hidden_states` (magnitudes 2^-20 to 2^10,
//! similarities over `[-1, 1]`, equal rows, zero rows): inside the documented range. The layer's
//! count must be exact, its sum within `adds * f32_sum_tolerance`, each similarity within
//! `f32_token_tolerance`, the other layers `(0, 0)`, and the accumulator's host hand-over
//! (`to_similarity_accumulator`) the same sums and counts. Without a GPU the case runs
//! `examples/checks/importance.rs`.

use dropfuse::cudarc::driver::DevicePtr;
use dropfuse::importance::ImportanceAccumulator;
use dropfuse::reference::importance::{self as reference, f32_sum_tolerance, f32_token_tolerance};
use dropfuse::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::importance::{self as check, hidden_states};
use crate::checks::{within, Checks};
use crate::{
    compare, dims_text, draw_size_limit, padded, parse_dims, sentinel, Case, Fields, FuzzElement, Kernel,
    Spec as CaseSpec,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Importance,
    Similarities,
}

const KEYS: [&str; 10] = [
    "dtype", "kernel", "shape", "mask", "layer", "adds", "xo", "yo", "mo", "data",
];

/// Layers of the accumulator.
const LAYERS: usize = 3;
/// What the mask buffer holds outside the view.
const MASK_FILL: u8 = 0xAB;

impl Op {
    pub const ALL: [Op; 2] = [Op::Importance, Op::Similarities];
    pub fn name(self) -> &'static str {
        match self {
            Op::Importance => "importance",
            Op::Similarities => "importance_similarities",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        &KEYS
    }
}

/// Which tokens are padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    None,
    Real,
    Some,
    Padding,
}

const MASKS: [(MaskKind, &str); 4] = [
    (MaskKind::None, "none"),
    (MaskKind::Real, "real"),
    (MaskKind::Some, "some"),
    (MaskKind::Padding, "padding"),
];

/// The importance part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    tokens: usize,
    hidden: usize,
    mask: MaskKind,
    layer: usize,
    adds: usize,
}

impl Spec {
    pub fn numel(&self) -> usize {
        self.tokens * self.hidden
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "shape" => dims_text(&[self.tokens, self.hidden]),
            "mask" => MASKS
                .iter()
                .find(|(m, _)| *m == self.mask)
                .map_or("?", |(_, n)| *n)
                .to_string(),
            "layer" => self.layer.to_string(),
            "adds" => self.adds.to_string(),
            _ => unreachable!("importance cases have no key {key}"),
        }
    }

    pub fn parse(_op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let dims = parse_dims("shape", f.get("shape")?, &[2])?;
        let text = f.get("mask")?;
        let spec = Spec {
            tokens: dims[0],
            hidden: dims[1],
            mask: MASKS
                .iter()
                .find(|(_, n)| *n == text)
                .map(|(m, _)| *m)
                .ok_or_else(|| format!("mask: expected none, real, some or padding, got {text:?}"))?,
            layer: f.num("layer")?,
            adds: f.num("adds")?,
        };
        if spec.layer >= LAYERS {
            return Err(format!("layer: expected 0 ..= {}", LAYERS - 1));
        }
        if !(1..=3).contains(&spec.adds) {
            return Err("adds: expected 1 ..= 3".into());
        }
        Ok(spec)
    }
}

/// A case: `H` of 1, small, no multiple of the vector width, medium, 4096; tokens around the
/// 64-token tiles; at most `max_n` elements and mostly at most 2^14.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let limit = draw_size_limit(rng, max_n, 1 << 14, 1 << 17);
    let mut hidden = match rng.random_range(0..10u32) {
        0 => 1,
        1..=3 => rng.random_range(2..=40),
        4 => 4096,
        5 => rng.random_range(250..=1100),
        _ => rng.random_range(41..=250),
    };
    let mut tokens = match rng.random_range(0..8u32) {
        0 => rng.random_range(1..=3),
        1 | 2 => rng.random_range(4..=62),
        3 => rng.random_range(63..=65),
        4 => rng.random_range(127..=129),
        _ => rng.random_range(130..=1000),
    };
    while tokens * hidden > limit {
        if hidden >= tokens || tokens == 1 {
            hidden = hidden.div_ceil(2);
        } else {
            tokens = tokens.div_ceil(2);
        }
    }
    let spec = Spec {
        tokens,
        hidden,
        mask: [
            MaskKind::None,
            MaskKind::Real,
            MaskKind::Some,
            MaskKind::Some,
            MaskKind::Padding,
        ][rng.random_range(0..5)],
        layer: rng.random_range(0..LAYERS),
        adds: rng.random_range(1..=3),
    };
    Case {
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        mo: rng.random_range(0..8),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Importance(op), CaseSpec::Importance(spec))
    }
}

/// The mask bytes (`None` for `mask=none`) and the real-token flags.
fn mask_of(c: &Case, s: &Spec) -> (Option<Vec<u8>>, Option<Vec<bool>>) {
    let mut rng = StdRng::seed_from_u64(c.data ^ 0x3a5c);
    let real: Vec<bool> = (0..s.tokens)
        .map(|_| match s.mask {
            MaskKind::None | MaskKind::Real => true,
            MaskKind::Some => rng.random_range(0..3u32) != 0,
            MaskKind::Padding => false,
        })
        .collect();
    if s.mask == MaskKind::None {
        return (None, None);
    }
    let bytes = real
        .iter()
        .map(|&r| if r { rng.random_range(1..=255u8) } else { 0 })
        .collect();
    (Some(bytes), Some(real))
}

/// Case `c` (operation `op`, part `s`) for element type `T`: on the GPU `dev`, or the reference
/// self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let (tokens, hidden) = (s.tokens, s.hidden);
    let n = tokens * hidden;
    let (a, b) = hidden_states::<T>(tokens, hidden, c.data);
    let (bytes, real) = mask_of(c, s);
    let Some(dev) = dev else {
        let mut checks = Checks::new();
        check::check_importance(&mut checks, &a, &b, hidden, real.as_deref())?;
        return Ok(checks.failures());
    };
    let name = op.name();
    let fill = sentinel::<T>();
    let a_host = padded(c.xo, &a, fill);
    let b_host = padded(c.yo, &b, fill);
    let ab = dev.upload(&a_host)?;
    let bb = dev.upload(&b_host)?;
    let m_host = bytes.as_ref().map(|m| padded(c.mo, m, MASK_FILL));
    let mb = m_host.as_ref().map(|m| dev.upload(m)).transpose()?;
    let mv = mb.as_ref().map(|m| m.slice(c.mo..c.mo + tokens));
    let mask_ref: Option<&dyn DevicePtr<u8>> = mv.as_ref().map(|v| v as &dyn DevicePtr<u8>);
    let sfill = sentinel::<f32>();
    let mut sb = dev.upload(&padded(c.mo, &vec![sfill; tokens], sfill))?;
    let (av, bv) = (ab.slice(c.xo..c.xo + n), bb.slice(c.yo..c.yo + n));
    let mut acc = ImportanceAccumulator::new(dev, LAYERS)?;
    for _ in 0..s.adds {
        match op {
            Op::Importance => acc.add(s.layer, hidden, &av, &bv, mask_ref)?,
            Op::Similarities => acc.add_with_similarities(
                s.layer,
                hidden,
                &av,
                &bv,
                mask_ref,
                &mut sb.slice_mut(c.mo..c.mo + tokens),
            )?,
        }
    }
    let (sums, counts) = acc.download()?;
    let (want_sum, want_count) = reference::batch_similarity(&a, &b, hidden, real.as_deref())?;
    let k = s.adds as u64;
    let mut bad = Vec::new();
    for l in 0..LAYERS {
        let (ws, wc) = if l == s.layer {
            (k as f64 * want_sum, k * want_count)
        } else {
            (0.0, 0)
        };
        let tol = k as f64 * f32_sum_tolerance(want_count, hidden) + 1e-12 * ws.abs();
        // Written so that a NaN fails.
        if counts[l] != wc || !within((sums[l] - ws).abs(), tol) {
            bad.push(format!(
                "{name} layer {l}: sum {} count {}, want {ws} +- {tol:e} and {wc}",
                sums[l], counts[l]
            ));
        }
    }
    match acc.to_similarity_accumulator() {
        Ok(host) if host.tokens() == counts.as_slice() && host.sums() == sums.as_slice() => {}
        other => bad.push(format!("{name}: to_similarity_accumulator gave {other:?}")),
    }
    let got_sims = dev.download(&sb)?;
    if op == Op::Similarities {
        let want = reference::token_similarities(&a, &b, hidden, real.as_deref())?;
        let tol = f32_token_tolerance(hidden);
        let out: Vec<usize> = (0..tokens)
            .filter(|&t| {
                let g = got_sims[c.mo + t];
                match want[t] {
                    Some(w) => !within((f64::from(g) - w).abs(), tol),
                    None => !g.is_nan(),
                }
            })
            .collect();
        if let Some(&t) = out.first() {
            bad.push(format!(
                "{name}: {} similarities outside +-{tol:e} (padding: NaN), first token {t}: {} vs {:?}",
                out.len(),
                got_sims[c.mo + t],
                want[t]
            ));
        }
        let mut guards = got_sims[..c.mo].to_vec();
        guards.extend_from_slice(&got_sims[c.mo + tokens..]);
        compare(
            &format!("{name} similarities outside the view"),
            &guards,
            0,
            &[],
            sfill,
            false,
            &mut bad,
        );
    } else {
        compare(
            &format!("{name} similarities (none written)"),
            &got_sims,
            c.mo,
            &[],
            sfill,
            false,
            &mut bad,
        );
    }
    compare(
        &format!("{name} input (must be unchanged)"),
        &dev.download(&ab)?,
        0,
        &a_host,
        fill,
        false,
        &mut bad,
    );
    compare(
        &format!("{name} output (must be unchanged)"),
        &dev.download(&bb)?,
        0,
        &b_host,
        fill,
        false,
        &mut bad,
    );
    if let (Some(mb), Some(m_host)) = (&mb, &m_host) {
        if dev.download(mb)? != *m_host {
            bad.push(format!("{name}: the mask changed"));
        }
    }
    Ok(bad)
}
