//! Multi-sample dropout head cases (`dropfuse::multi_sample::MultiSampleHead`, cuBLAS, against
//! `dropfuse::reference::multi_sample::head`): the copies and masks bit for bit, the loss, the
//! averaged logits and the gradients within the documented bounds. On a GPU without libcublas the
//! fuzz run skips these cases and says so (a SKIPPED line).
//!
//! Kernel: `multi_sample_head` (forward, the valid-row count, the averaged logits, backward).
//! Keys besides `dtype`, `kernel` and `data`:
//!
//! * `shape`: `KxBxDxC` (`K` samples, `B` rows, `D` features, `C` classes);
//! * `p`, `seed`, `offset`: the dropout (sample `k` on the stream `offset + k`);
//! * `eps` (label smoothing), `labels` (`all` valid, `some` ignored, `ignored`: every row, `bad`:
//!   one to three labels neither in `[0, C)` nor the ignore index, so `check_labels` must name the
//!   first and the backward must write zero gradients), `ii` (the ignore index);
//! * `bias` (`true` / `false`), `train` (`false`: evaluation mode, one pass on `h`);
//! * `grad`: the gradients' type, `f32` or the `dtype` (then scaled by a power of two into the
//!   normal range, as the head documents for f16).
//!
//! Not drawn: `p=1` with `bias=false`, `train=true` and `eps=1.0` (every logit 0 and a smoothing
//! of 1: the exact gradients are 0 and both sides hold rounding noise, which the documented
//! relative error norms cannot compare).
//!
//! Without a GPU the case runs `examples/checks/head.rs` (or the reference's rejection of the bad
//! labels).

use dropfuse::cudarc::driver::{DevicePtr, DevicePtrMut};
use dropfuse::multi_sample::{MultiSampleHead, MAX_K};
use dropfuse::reference::dropout as dropout_ref;
use dropfuse::reference::multi_sample::{masked_copies, sample_state, HeadConfig, DEFAULT_IGNORE_INDEX};
use dropfuse::{DType, Device, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::head::{self as check, head_bounds, pow2_grad_scale, HeadGot, HeadInputs};
use crate::checks::multi_sample::widen;
use crate::checks::Checks;
use crate::labels::{draw_rows, Labels};
use crate::{
    dims_text, draw_p, draw_u64, parse_dims, parse_dtype, Case, Fields, FuzzElement, Kernel, Spec as CaseSpec,
};

/// The kernel of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Head,
}

const KEYS: [&str; 13] = [
    "dtype", "kernel", "shape", "p", "seed", "offset", "eps", "labels", "ii", "bias", "train", "grad", "data",
];

impl Op {
    pub const ALL: [Op; 1] = [Op::Head];
    pub fn name(self) -> &'static str {
        "multi_sample_head"
    }
    pub fn keys(self) -> &'static [&'static str] {
        &KEYS
    }
}

/// The head part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    k: usize,
    b: usize,
    d: usize,
    c: usize,
    eps: f64,
    labels: Labels,
    ignore_index: i64,
    bias: bool,
    train: bool,
    grad: DType,
}

impl Spec {
    pub fn numel(&self) -> usize {
        self.b * self.d
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "shape" => dims_text(&[self.k, self.b, self.d, self.c]),
            // `{:?}` of an f64 is the shortest string that parses back to the same bits.
            "eps" => format!("{:?}", self.eps),
            "labels" => self.labels.name().to_string(),
            "ii" => self.ignore_index.to_string(),
            "bias" => self.bias.to_string(),
            "train" => self.train.to_string(),
            "grad" => self.grad.name().to_string(),
            _ => unreachable!("head cases have no key {key}"),
        }
    }

    pub fn parse(_op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let dims = parse_dims("shape", f.get("shape")?, &[4])?;
        if dims[0] > MAX_K {
            return Err(format!("shape: at most {MAX_K} samples"));
        }
        let dtype = parse_dtype("dtype", f.get("dtype")?)?;
        let grad = parse_dtype("grad", f.get("grad")?)?;
        if grad != dtype && grad != DType::F32 {
            return Err(format!("grad: must be the dtype {dtype} or f32, got {grad}"));
        }
        let eps: f64 = f.num("eps")?;
        if !(0.0..=1.0).contains(&eps) {
            return Err(format!("eps: must be in [0, 1], got {eps}"));
        }
        Ok(Spec {
            k: dims[0],
            b: dims[1],
            d: dims[2],
            c: dims[3],
            eps,
            labels: Labels::parse(f.get("labels")?)?,
            ignore_index: f.num("ii")?,
            bias: f.num("bias")?,
            train: f.num("train")?,
            grad,
        })
    }

    fn config(&self, p: f64) -> HeadConfig {
        HeadConfig {
            k: self.k,
            p,
            label_smoothing: self.eps,
            ignore_index: self.ignore_index,
            train: self.train,
        }
    }
}

/// A head case: `K` up to 8 (now and then 16), up to 24 rows of up to 130 features and 100
/// classes, `K B D C <= 2^16` (the `f64` reference and its finite differences stay quick), the
/// largest tensor at most `max_n` elements.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let mut k = if rng.random_range(0..5u32) == 0 {
        16
    } else {
        rng.random_range(1..=8)
    };
    let mut b = if rng.random_range(0..4u32) == 0 {
        1
    } else {
        rng.random_range(2..=24)
    };
    let mut d = match rng.random_range(0..5u32) {
        0 => 1,
        1 => rng.random_range(2..=8),
        2 => 64,
        _ => rng.random_range(9..=130),
    };
    let mut c = match rng.random_range(0..5u32) {
        0 => 1,
        1 | 2 => rng.random_range(2..=20),
        _ => rng.random_range(21..=100),
    };
    let fits = |k: usize, b: usize, d: usize, c: usize| {
        k * b * d * c <= 1 << 16 && k * b * d.max(c) <= max_n && c * d <= max_n
    };
    while !fits(k, b, d, c) {
        if d >= c && d > 1 {
            d = d.div_ceil(2);
        } else if c > 1 {
            c = c.div_ceil(2);
        } else if b > 1 {
            b = b.div_ceil(2);
        } else {
            k = k.div_ceil(2);
        }
    }
    let spec = Spec {
        k,
        b,
        d,
        c,
        eps: match rng.random_range(0..4u32) {
            0 => 0.0,
            1 => 0.1,
            2 => 1.0,
            _ => rng.random::<f64>(),
        },
        labels: Labels::draw(rng),
        ignore_index: [DEFAULT_IGNORE_INDEX, DEFAULT_IGNORE_INDEX, 0, -1][rng.random_range(0..4)],
        bias: rng.random_bool(0.6),
        train: rng.random_range(0..4u32) != 0,
        grad: if rng.random_bool(0.5) { DType::F32 } else { dtype },
    };
    let p = match rng.random_range(0..5u32) {
        0 => 0.0,
        1 => 1.0,
        _ => draw_p(rng),
    };
    // p = 1 without a bias makes every logit 0, and smoothing 1 then makes the exact gradient 0:
    // both sides hold rounding noise, which relative error norms cannot compare.
    let spec = if p == 1.0 && !spec.bias && spec.train && spec.eps == 1.0 {
        Spec { eps: 0.5, ..spec }
    } else {
        spec
    };
    Case {
        p,
        seed: draw_u64(rng),
        offset: draw_u64(rng),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Head(Op::Head), CaseSpec::Head(spec))
    }
}

/// The labels of a case (from the data seed) and, for `labels=bad`, the first bad row.
fn labels_of(c: &Case, s: &Spec) -> (Vec<i64>, Option<usize>) {
    let mut rng = StdRng::seed_from_u64(c.data ^ 0x1abe);
    draw_rows(&mut rng, s.labels, s.b, s.c, s.ignore_index)
}

/// Whether `e` is the `labels` error naming row `row`.
fn names_row(e: &Error, row: usize) -> bool {
    matches!(e, Error::InvalidArgument { name: "labels", got, .. } if got.ends_with(&format!(" row {row}")))
}

/// Case `c` (part `s`) for element type `T`: on the GPU `dev` (with cuBLAS), or the reference
/// self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    _op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let (labels, first_bad) = labels_of(c, s);
    let inp = HeadInputs::<T>::new(s.b, s.d, s.c, s.bias, labels, c.data);
    let cfg = s.config(c.p);
    match (dev, s.grad) {
        (Some(dev), DType::F32) => gpu_head::<T, f32>(dev, c, s, &inp, &cfg, first_bad),
        (Some(dev), _) => gpu_head::<T, T>(dev, c, s, &inp, &cfg, first_bad),
        (None, _) => {
            if let Some(row) = first_bad {
                return Ok(match inp.reference(&cfg, c.state()) {
                    Err(e) if names_row(&e, row) => Vec::new(),
                    other => vec![format!(
                        "bad labels: the reference gave {:?}, want the labels error naming row {row}",
                        other.map(|r| r.loss)
                    )],
                });
            }
            let mut checks = Checks::new();
            check::check_head(&mut checks, &inp, &cfg, c.state())?;
            Ok(checks.failures())
        }
    }
}

fn gpu_head<T: FuzzElement, G: FuzzElement>(
    dev: &Device,
    c: &Case,
    s: &Spec,
    inp: &HeadInputs<T>,
    cfg: &HeadConfig,
    first_bad: Option<usize>,
) -> dropfuse::Result<Vec<String>> {
    let name = "multi_sample_head";
    let (b, d, cl) = (s.b, s.d, s.c);
    let head = MultiSampleHead::from_config(cfg, s.bias)?;
    let mut ws = head.workspace::<T>(dev, b, d, cl)?;
    let h = dev.upload(&inp.h)?;
    let w = dev.upload(&inp.w)?;
    let bias = inp.bias.as_ref().map(|x| dev.upload(x)).transpose()?;
    let labels = dev.upload(&inp.labels)?;
    head.forward(
        &mut ws,
        c.state(),
        &h,
        &w,
        bias.as_ref().map(|x| x as &dyn DevicePtr<T>),
        &labels,
    )?;
    let verdict = ws.check_labels();
    let mut bad = Vec::new();

    // Copies and masks, bit for bit (training mode).
    if s.train {
        let n = b * d;
        let want = masked_copies(&inp.h, s.k, c.p, c.state())?;
        let copies: Vec<T> = dev.download(&ws.copies().expect("training mode"))?;
        let masks = dev.download(&ws.masks().expect("training mode"))?;
        let words = n.div_ceil(32);
        for k in 0..s.k {
            if let Some(diff) = crate::checks::bit_diff(&copies[k * n..(k + 1) * n], &want.copies[k]) {
                bad.push(format!("{name}: copy {k}: {diff}"));
            }
            let m = dropout_ref::mask(c.p, sample_state(c.state(), k as u64), 0, n)?;
            if masks[k * words..(k + 1) * words] != m[..] {
                bad.push(format!("{name}: mask {k} differs"));
            }
        }
    } else if ws.copies().is_some() || ws.masks().is_some() {
        bad.push(format!("{name}: copies or masks in evaluation mode"));
    }

    let gzero = G::from_f32(12345.5);
    let mut dh = dev.upload(&vec![gzero; b * d])?;
    let mut dw = dev.upload(&vec![gzero; cl * d])?;
    let mut db = s.bias.then(|| dev.upload(&vec![gzero; cl])).transpose()?;

    if let Some(row) = first_bad {
        if !verdict.as_ref().is_err_and(|e| names_row(e, row)) {
            bad.push(format!(
                "{name}: check_labels gave {verdict:?}, want the labels error naming row {row}"
            ));
        }
        // The forward wrote a zero dz: the backward writes zero gradients.
        head.backward(
            &mut ws,
            &h,
            &w,
            &mut dh,
            &mut dw,
            db.as_mut().map(|x| x as &mut dyn DevicePtrMut<G>),
            1.0,
        )?;
        let zero = |v: Vec<G>| v.iter().all(|g| g.to_f32() == 0.0);
        let db_zero = match &db {
            Some(x) => zero(dev.download(x)?),
            None => true,
        };
        if !(zero(dev.download(&dh)?) && zero(dev.download(&dw)?) && db_zero) {
            bad.push(format!("{name}: bad labels: the gradients are not all 0"));
        }
        return Ok(bad);
    }

    let want = inp.reference(cfg, c.state())?;
    let valid = inp.labels.iter().filter(|&&y| y != s.ignore_index).count();
    match verdict {
        Ok(v) if v as usize == valid => {}
        other => bad.push(format!(
            "{name}: check_labels gave {other:?}, want {valid} valid rows"
        )),
    }
    let loss = f64::from(ws.read_loss()?);
    let mut mean = dev.zeros::<f32>(b * cl)?;
    ws.mean_logits(&mut mean)?;
    let gs = if G::DTYPE == DType::F32 {
        1.0
    } else {
        pow2_grad_scale(&want)
    };
    head.backward(
        &mut ws,
        &h,
        &w,
        &mut dh,
        &mut dw,
        db.as_mut().map(|x| x as &mut dyn DevicePtrMut<G>),
        gs,
    )?;
    let unscale = |v: Vec<G>| {
        widen(&v)
            .into_iter()
            .map(|x| x / f64::from(gs))
            .collect::<Vec<f64>>()
    };
    let got = HeadGot {
        loss,
        mean_logits: widen(&dev.download(&mean)?),
        dh: unscale(dev.download(&dh)?),
        dw: unscale(dev.download(&dw)?),
        db: db.as_ref().map(|x| dev.download(x)).transpose()?.map(unscale),
    };
    let slack = check::head_slack(inp, cfg, c.state())?;
    let (fwd, bwd) = head_bounds(&got, &want, T::DTYPE, valid == 0 || cl == 1, Some(&slack));
    bad.extend(fwd.into_iter().chain(bwd).map(|f| format!("{name}: {f}")));
    Ok(bad)
}
