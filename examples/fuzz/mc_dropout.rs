//! Monte-Carlo dropout cases (`dropfuse::mc_dropout` against `dropfuse::reference::mc_dropout`):
//! the replicas bit for bit, the summaries within `f32_tolerance`.
//!
//! Kernels: `mc_replicas` (the `R` replicas and their masks), `mc_replicas_maskless`,
//! `mc_summaries` (`T` checked pushes of one sample each, then `finish`), `mc_summaries_stack`
//! (one checked push of the `T x B x C` stack) and `mc_summaries_unchecked` (the stack without
//! the value check). Keys besides `dtype`, `kernel` and `data`:
//!
//! * replicas: `n` (elements of `x`), `r` (replicas), `p`, `seed`, `offset`, `eo` (element
//!   offset), `xo`, `yo` and (`mc_replicas`) `mo`: view offsets of `x`, of the replicas, of the
//!   masks;
//! * summaries (`dtype` is `f32`): `shape` (`TxBxC`), `probs` (`softmax`; `sharp`: softmax of
//!   logits up to 40, many values near 0; `onehot`: exact 0 and 1; `identical`: one sample
//!   repeated; `bad` (checked kernels only): one value of one sample NaN, infinite or negative, so
//!   that push (the whole stack for `mc_summaries_stack`) is rejected and counted, the others
//!   summarized; nothing accepted leaves NaN outputs), `xo` (view offset of the stack).
//!
//! Every accepted summary is compared with the reference of the accepted samples within
//! `reference::mc_dropout::f32_tolerance`, the counters (accepted, rejected, first invalid
//! index) exactly. Without a GPU the case runs `examples/checks/mc_dropout.rs` (or, for `bad`,
//! the reference's rejection of the bad push and the summary of the others).

use dropfuse::mc_dropout::{McCounters, McDropout, McOutputs, McStats32, McSummaryState};
use dropfuse::reference::mc_dropout::{self as reference, McSummary};
use dropfuse::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::mc_dropout::{self as check, outside_tolerance, softmax_stack};
use crate::checks::Checks;
use crate::{
    compare, dims_text, draw_element_offset, draw_p, draw_u64, padded, parse_dims, sentinel, values, Case,
    Fields, FuzzElement, Kernel, Spec as CaseSpec, MASK_SENTINEL,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Replicas,
    ReplicasMaskless,
    Summaries,
    SummariesStack,
    SummariesUnchecked,
}

const REPLICA_KEYS: [&str; 12] = [
    "dtype", "kernel", "n", "r", "p", "seed", "offset", "eo", "xo", "yo", "mo", "data",
];
const REPLICA_MASKLESS_KEYS: [&str; 11] = [
    "dtype", "kernel", "n", "r", "p", "seed", "offset", "eo", "xo", "yo", "data",
];
const SUMMARY_KEYS: [&str; 6] = ["dtype", "kernel", "shape", "probs", "xo", "data"];

impl Op {
    pub const ALL: [Op; 5] = [
        Op::Replicas,
        Op::ReplicasMaskless,
        Op::Summaries,
        Op::SummariesStack,
        Op::SummariesUnchecked,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::Replicas => "mc_replicas",
            Op::ReplicasMaskless => "mc_replicas_maskless",
            Op::Summaries => "mc_summaries",
            Op::SummariesStack => "mc_summaries_stack",
            Op::SummariesUnchecked => "mc_summaries_unchecked",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Op::Replicas => &REPLICA_KEYS,
            Op::ReplicasMaskless => &REPLICA_MASKLESS_KEYS,
            _ => &SUMMARY_KEYS,
        }
    }
    fn is_summary(self) -> bool {
        matches!(self, Op::Summaries | Op::SummariesStack | Op::SummariesUnchecked)
    }
}

/// The probabilities of a summary case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probs {
    Softmax,
    Sharp,
    OneHot,
    Identical,
    Bad,
}

const PROBS: [(Probs, &str); 5] = [
    (Probs::Softmax, "softmax"),
    (Probs::Sharp, "sharp"),
    (Probs::OneHot, "onehot"),
    (Probs::Identical, "identical"),
    (Probs::Bad, "bad"),
];

/// The MC-dropout part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// Replicas `R` (replica kernels).
    r: usize,
    /// Summaries: `T x B x C` (0 for the replica kernels).
    t: usize,
    b: usize,
    c: usize,
    probs: Probs,
}

impl Spec {
    /// The stack of a summary case (the replica cases' `n` is a key).
    pub fn numel(&self) -> usize {
        self.t * self.b * self.c
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "r" => self.r.to_string(),
            "shape" => dims_text(&[self.t, self.b, self.c]),
            "probs" => PROBS
                .iter()
                .find(|(p, _)| *p == self.probs)
                .map_or("?", |(_, n)| *n)
                .to_string(),
            _ => unreachable!("MC-dropout cases have no key {key}"),
        }
    }

    pub fn parse(op: Op, f: &Fields<'_>) -> Result<Self, String> {
        if !op.is_summary() {
            let r: usize = f.num("r")?;
            if !(1..=1024).contains(&r) {
                return Err(format!("r: expected 1 ..= 1024 replicas, got {r}"));
            }
            return Ok(Spec {
                r,
                t: 0,
                b: 0,
                c: 0,
                probs: Probs::Softmax,
            });
        }
        if f.get("dtype")? != "f32" {
            return Err("dtype: the summaries take f32 probabilities".into());
        }
        let dims = parse_dims("shape", f.get("shape")?, &[3])?;
        let text = f.get("probs")?;
        let probs = PROBS
            .iter()
            .find(|(_, n)| *n == text)
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                format!("probs: expected softmax, sharp, onehot, identical or bad, got {text:?}")
            })?;
        if probs == Probs::Bad && op == Op::SummariesUnchecked {
            return Err("probs: bad values are for the checked kernels only".into());
        }
        Ok(Spec {
            r: 0,
            t: dims[0],
            b: dims[1],
            c: dims[2],
            probs,
        })
    }
}

// ------------------------------------------------------------------------------------------ draw

/// An MC-dropout case: replicas of `R` mostly up to 8 (now and then up to 40) of short, medium or
/// 4096 / 4099 elements; summaries of `T` up to 20 samples of up to 40 rows of 1 to 1100
/// classes; at most `max_n` elements in the largest tensor.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let data = rng.random();
    let xo = rng.random_range(0..8);
    if op.is_summary() {
        let mut t = if rng.random_bool(0.2) {
            1
        } else {
            rng.random_range(2..=20)
        };
        let mut b = rng.random_range(1..=40);
        let mut c = match rng.random_range(0..6u32) {
            0 => 1,
            1 | 2 => rng.random_range(2..=40),
            3 | 4 => rng.random_range(41..=400),
            _ => rng.random_range(900..=1100),
        };
        let limit = max_n.min(1 << 16);
        while t * b * c > limit {
            if c > 1 {
                c = c.div_ceil(2);
            } else if b > 1 {
                b = b.div_ceil(2);
            } else {
                t = t.div_ceil(2);
            }
        }
        let mut probs = PROBS[rng.random_range(0..PROBS.len())].0;
        if probs == Probs::Bad && op == Op::SummariesUnchecked {
            probs = Probs::Softmax;
        }
        let spec = Spec { r: 0, t, b, c, probs };
        return Case {
            xo,
            data,
            ..Case::of(DType::F32, Kernel::McDropout(op), CaseSpec::McDropout(spec))
        };
    }
    let mut r = if rng.random_range(0..5u32) == 0 {
        rng.random_range(9..=40)
    } else {
        rng.random_range(1..=8)
    };
    let mut n = match rng.random_range(0..10u32) {
        0..=3 => rng.random_range(1..=40),
        4..=7 => rng.random_range(41..=3000),
        8 => 4096,
        _ => 4099,
    };
    while r * n > max_n {
        if n >= r {
            n = n.div_ceil(2);
        } else {
            r = r.div_ceil(2);
        }
    }
    Case {
        n,
        p: draw_p(rng),
        seed: draw_u64(rng),
        offset: draw_u64(rng),
        eo: draw_element_offset(rng, n),
        xo,
        yo: rng.random_range(0..8),
        mo: if op == Op::Replicas {
            rng.random_range(0..4)
        } else {
            0
        },
        data,
        ..Case::of(
            dtype,
            Kernel::McDropout(op),
            CaseSpec::McDropout(Spec {
                r,
                t: 0,
                b: 0,
                c: 0,
                probs: Probs::Softmax,
            }),
        )
    }
}

// ---------------------------------------------------------------------------------------- inputs

/// The `T x B x C` stack of a summary case and, for `bad`, the sample and index of its one invalid
/// value.
fn stack(c: &Case, s: &Spec) -> (Vec<f32>, Option<(usize, usize)>) {
    let (t, b, cl) = (s.t, s.b, s.c);
    let per = b * cl;
    let mut rng = StdRng::seed_from_u64(c.data ^ 0x5eed);
    let mut probs = match s.probs {
        Probs::Softmax | Probs::Bad => softmax_stack(t, b, cl, 4.0, c.data),
        Probs::Sharp => softmax_stack(t, b, cl, 40.0, c.data),
        Probs::Identical => softmax_stack(1, b, cl, 4.0, c.data).repeat(t),
        Probs::OneHot => {
            let mut v = vec![0.0f32; t * per];
            for row in 0..t * b {
                v[row * cl + rng.random_range(0..cl)] = 1.0;
            }
            v
        }
    };
    if s.probs != Probs::Bad {
        return (probs, None);
    }
    let (sample, i) = (rng.random_range(0..t), rng.random_range(0..per));
    probs[sample * per + i] =
        [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, -1e-40][rng.random_range(0..5)];
    (probs, Some((sample, i)))
}

// ------------------------------------------------------------------------------------------- run

/// Case `c` (operation `op`, MC part `s`) for element type `T`: on the GPU `dev`, or the reference
/// self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    match (dev, op.is_summary()) {
        (Some(dev), false) => gpu_replicas::<T>(dev, c, op, s),
        (Some(dev), true) => gpu_summaries(dev, c, op, s),
        (None, false) => {
            let mut checks = Checks::new();
            check::check_replicas(&mut checks, &values::<T>(c.n, c.data), s.r, c.p, c.state(), c.eo)?;
            Ok(checks.failures())
        }
        (None, true) => cpu_summaries(c, op, s),
    }
}

fn gpu_replicas<T: FuzzElement>(dev: &Device, c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (n, r) = (c.n, s.r);
    let mc = McDropout::new(c.p, r)?.with_element_offset(c.eo);
    let fill = sentinel::<T>();
    let x: Vec<T> = values(n, c.data);
    let (want_y, want_m) = reference::replicated_forward(&x, r, c.p, c.state(), c.eo)?;
    let x_host = padded(c.xo, &x, fill);
    let xb = dev.upload(&x_host)?;
    let mut yb = dev.upload(&padded(c.yo, &vec![fill; r * n], fill))?;
    let words = mc.masks_words(n);
    let mut mb = dev.upload(&padded(c.mo, &vec![MASK_SENTINEL; words], MASK_SENTINEL))?;
    let xv = xb.slice(c.xo..c.xo + n);
    let mut yv = yb.slice_mut(c.yo..c.yo + r * n);
    if op == Op::Replicas {
        mc.forward(st, c.state(), &xv, &mut yv, &mut mb.slice_mut(c.mo..c.mo + words))?;
    } else {
        mc.forward_maskless(st, c.state(), &xv, &mut yv)?;
    }
    let name = op.name();
    let mut bad = Vec::new();
    compare(
        &format!("{name} replicas"),
        &dev.download(&yb)?,
        c.yo,
        &want_y,
        fill,
        true,
        &mut bad,
    );
    let mask_want: &[u32] = if op == Op::Replicas { &want_m } else { &[] };
    compare(
        &format!("{name} masks"),
        &dev.download(&mb)?,
        c.mo,
        mask_want,
        MASK_SENTINEL,
        false,
        &mut bad,
    );
    compare(
        &format!("{name} x (must be unchanged)"),
        &dev.download(&xb)?,
        0,
        &x_host,
        fill,
        false,
        &mut bad,
    );
    Ok(bad)
}

/// The samples the kernel accepts and the counters it must report.
fn expected(op: Op, s: &Spec, bad_at: Option<(usize, usize)>) -> (Vec<usize>, McCounters) {
    let per = s.b * s.c;
    match bad_at {
        None => (
            (0..s.t).collect(),
            McCounters {
                accepted: s.t as u64,
                rejected: 0,
                first_invalid: None,
            },
        ),
        Some((sample, i)) if op == Op::Summaries => (
            (0..s.t).filter(|&t| t != sample).collect(),
            McCounters {
                accepted: s.t as u64 - 1,
                rejected: 1,
                first_invalid: Some(i as u64),
            },
        ),
        Some((sample, i)) => (
            Vec::new(),
            McCounters {
                accepted: 0,
                rejected: 1,
                first_invalid: Some((sample * per + i) as u64),
            },
        ),
    }
}

fn gpu_summaries(dev: &Device, c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (t, b, cl) = (s.t, s.b, s.c);
    let per = b * cl;
    let (probs, bad_at) = stack(c, s);
    let fill = sentinel::<f32>();
    let host = padded(c.xo, &probs, fill);
    let pb = dev.upload(&host)?;
    let mut state = McSummaryState::new(dev, b, cl)?;
    match op {
        Op::Summaries => {
            for k in 0..t {
                let o = c.xo + k * per;
                state.push(st, &pb.slice(o..o + per))?;
            }
        }
        Op::SummariesStack => state.push_stack(st, &pb.slice(c.xo..c.xo + t * per), t)?,
        _ => state.push_stack_unchecked(st, &pb.slice(c.xo..c.xo + t * per), t)?,
    }
    let mut out = McOutputs::new(dev, b, cl)?;
    state.finish(st, &mut out)?;
    let got = McStats32::download(dev, &state, &out)?;
    let counters = state.counters(st)?;
    let name = op.name();
    let mut bad = Vec::new();
    let (accepted, want_counters) = expected(op, s, bad_at);
    if counters != want_counters {
        bad.push(format!("{name}: counters {counters:?}, want {want_counters:?}"));
    }
    if state.check(st).is_ok() != (want_counters.rejected == 0) {
        bad.push(format!("{name}: check() disagrees with {want_counters:?}"));
    }
    if accepted.is_empty() {
        // Every push rejected: the state unchanged (zeros), the outputs NaN.
        let zeros = got.mean.iter().chain(&got.expected_entropy).all(|&v| v == 0.0);
        let nans = got
            .variance
            .iter()
            .chain(&got.predictive_entropy)
            .chain(&got.mutual_information)
            .all(|v| v.is_nan());
        if !(zeros && nans) {
            bad.push(format!(
                "{name}: nothing accepted: want a zero state and NaN outputs"
            ));
        }
    } else {
        let kept: Vec<f32> = accepted
            .iter()
            .flat_map(|&k| probs[k * per..(k + 1) * per].iter().copied())
            .collect();
        let want = reference::summarize(&kept, accepted.len(), b, cl)?;
        bad.extend(
            outside_tolerance(&got, &want)
                .1
                .into_iter()
                .map(|f| format!("{name}: {f}")),
        );
    }
    compare(
        &format!("{name} probs (must be unchanged)"),
        &dev.download(&pb)?,
        0,
        &host,
        fill,
        false,
        &mut bad,
    );
    Ok(bad)
}

fn cpu_summaries(c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let (t, b, cl) = (s.t, s.b, s.c);
    let per = b * cl;
    let (probs, bad_at) = stack(c, s);
    let Some((sample, _)) = bad_at else {
        let mut checks = Checks::new();
        check::check_summaries(&mut checks, &probs, t, b, cl)?;
        return Ok(checks.failures());
    };
    // The bad push is rejected (`probs`) and changes nothing; the others are summarized.
    let mut bad = Vec::new();
    let is_probs = |e: &dropfuse::Error| matches!(e, dropfuse::Error::InvalidArgument { name: "probs", .. });
    if !reference::summarize(&probs, t, b, cl).is_err_and(|e| is_probs(&e)) {
        bad.push("summarize accepted a stack with an invalid value".to_string());
    }
    let mut one = McSummary::new(b, cl)?;
    let mut kept = Vec::new();
    for k in 0..t {
        let sample_probs = &probs[k * per..(k + 1) * per];
        let before = one.clone();
        match one.push(sample_probs) {
            Err(e) if k == sample && is_probs(&e) && one == before => {}
            Ok(()) if k != sample => kept.extend_from_slice(sample_probs),
            other => bad.push(format!("{}: push {k} gave {other:?}", op.name())),
        }
    }
    if kept.is_empty() {
        if one.finish().is_ok() {
            bad.push("finish without an accepted sample succeeded".to_string());
        }
    } else if one.finish()? != reference::summarize(&kept, t - 1, b, cl)? {
        bad.push("the summary of the accepted pushes != summarize of them".to_string());
    }
    Ok(bad)
}
