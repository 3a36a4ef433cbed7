//! Stochastic-depth and per-sample compaction cases (`dropfuse::skip` against
//! `dropfuse::reference::skip` points 2-6).
//!
//! Kernels: `stochastic_depth` (out of place), `stochastic_depth_in_place`,
//! `stochastic_depth_backward` (with `bias=P` the bias gradient too, through a NaN-filled
//! workspace of the documented length), `sample_slots` (the device scan, recomputed over other
//! flags first), `gather_samples`, `gather_samples_checked`, `scatter_samples`,
//! `scatter_samples_in_place`, `scatter_samples_backward`, `scatter_add_samples`,
//! `scatter_add_samples_backward` and `gather_samples_backward`. Keys besides `dtype`, `kernel`
//! and `data`:
//!
//! * `shape`: `BxR` (`R` is 1 and unused for `sample_slots`);
//! * `keep`: `all`, `none` or `random` (a random density); a kept sample's device flag is any
//!   non-zero byte (1, 2, 0x80 or 0xFF), a dropped one's 0;
//! * stochastic depth only: `bias` (`P` dividing `R`, or 0 for none), `mode` (`per_sample`:
//!   device flags; `batch`: one host flag, sample 0's; `batch_device`: one device flag);
//! * `scale` (finite, `>= 0`): stochastic depth and the scatter-add kernels;
//! * compaction only: `cap`, the compact buffers' rows as the count plus a delta: a kept sample
//!   whose slot is at or beyond them is left entirely alone (none of its rows read or written),
//!   and `gather_samples_checked` must fail with `capacity` and write nothing;
//! * `xo`, `yo`, `co`: view offsets of the residual / `x` / `d_out` (and in-place data), of the
//!   outputs, of the branch / bias / compact buffers.
//!
//! Without a GPU the case runs the kernel's reference through the contract re-derived in
//! `examples/checks/skip.rs`.

use dropfuse::cudarc::driver::DevicePtr;
use dropfuse::reference::skip::{self as reference, Compaction, SampleKeep};
use dropfuse::skip::{self as kernels, Keep, SampleSlots};
use dropfuse::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checks::skip as check;
use crate::checks::Checks;
use crate::{
    compare, dims_text, padded, parse_dims, sentinel, values, Case, Fields, FuzzElement, Kernel,
    Spec as CaseSpec,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Forward,
    ForwardInPlace,
    Backward,
    Slots,
    Gather,
    GatherChecked,
    Scatter,
    ScatterInPlace,
    ScatterBackward,
    ScatterAdd,
    ScatterAddBackward,
    GatherBackward,
}

const DEPTH_KEYS: [&str; 11] = [
    "dtype", "kernel", "shape", "bias", "keep", "mode", "scale", "xo", "yo", "co", "data",
];
const SLOTS_KEYS: [&str; 5] = ["dtype", "kernel", "shape", "keep", "data"];
const COMPACT_KEYS: [&str; 9] = [
    "dtype", "kernel", "shape", "keep", "cap", "xo", "yo", "co", "data",
];
const SCALED_COMPACT_KEYS: [&str; 10] = [
    "dtype", "kernel", "shape", "keep", "cap", "scale", "xo", "yo", "co", "data",
];

impl Op {
    pub const ALL: [Op; 12] = [
        Op::Forward,
        Op::ForwardInPlace,
        Op::Backward,
        Op::Slots,
        Op::Gather,
        Op::GatherChecked,
        Op::Scatter,
        Op::ScatterInPlace,
        Op::ScatterBackward,
        Op::ScatterAdd,
        Op::ScatterAddBackward,
        Op::GatherBackward,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::Forward => "stochastic_depth",
            Op::ForwardInPlace => "stochastic_depth_in_place",
            Op::Backward => "stochastic_depth_backward",
            Op::Slots => "sample_slots",
            Op::Gather => "gather_samples",
            Op::GatherChecked => "gather_samples_checked",
            Op::Scatter => "scatter_samples",
            Op::ScatterInPlace => "scatter_samples_in_place",
            Op::ScatterBackward => "scatter_samples_backward",
            Op::ScatterAdd => "scatter_add_samples",
            Op::ScatterAddBackward => "scatter_add_samples_backward",
            Op::GatherBackward => "gather_samples_backward",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Op::Forward | Op::ForwardInPlace | Op::Backward => &DEPTH_KEYS,
            Op::Slots => &SLOTS_KEYS,
            Op::ScatterAdd | Op::ScatterAddBackward => &SCALED_COMPACT_KEYS,
            _ => &COMPACT_KEYS,
        }
    }
    fn is_depth(self) -> bool {
        matches!(self, Op::Forward | Op::ForwardInPlace | Op::Backward)
    }
}

/// Which samples are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepKind {
    All,
    None,
    Random,
}

/// How stochastic depth is told the decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    PerSample,
    Batch,
    BatchDevice,
}

const KEEPS: [(KeepKind, &str); 3] = [
    (KeepKind::All, "all"),
    (KeepKind::None, "none"),
    (KeepKind::Random, "random"),
];
const MODES: [(Mode, &str); 3] = [
    (Mode::PerSample, "per_sample"),
    (Mode::Batch, "batch"),
    (Mode::BatchDevice, "batch_device"),
];

fn name_of<V: PartialEq + Copy>(table: &[(V, &'static str)], v: V) -> &'static str {
    table
        .iter()
        .find(|(x, _)| *x == v)
        .map(|(_, n)| *n)
        .expect("a named value")
}

fn parse_name<V: Copy>(table: &[(V, &'static str)], key: &str, text: &str) -> Result<V, String> {
    table
        .iter()
        .find(|(_, n)| *n == text)
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(_, n)| *n).collect();
            format!("{key}: expected one of {}, got {text:?}", names.join(", "))
        })
}

/// The skip part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    batch: usize,
    row_len: usize,
    /// Bias elements, 0 for none (stochastic depth).
    bias: usize,
    keep: KeepKind,
    mode: Mode,
    scale: f32,
    /// Compact rows: the count plus this.
    cap: i64,
    /// View offset of the branch, bias and compact buffers.
    co: usize,
}

impl Spec {
    pub fn numel(&self) -> usize {
        self.batch * self.row_len
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "shape" => dims_text(&[self.batch, self.row_len]),
            "bias" => self.bias.to_string(),
            "keep" => name_of(&KEEPS, self.keep).to_string(),
            "mode" => name_of(&MODES, self.mode).to_string(),
            // `{:?}` of an f32 is the shortest string that parses back to the same bits.
            "scale" => format!("{:?}", self.scale),
            "cap" => self.cap.to_string(),
            "co" => self.co.to_string(),
            _ => unreachable!("skip cases have no key {key}"),
        }
    }

    pub fn parse(op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let keys = op.keys();
        let dims = parse_dims("shape", f.get("shape")?, &[2])?;
        if u32::try_from(dims[0]).is_err() {
            return Err("shape: at most 2^32 - 1 samples".into());
        }
        let spec = Spec {
            batch: dims[0],
            row_len: dims[1],
            bias: if keys.contains(&"bias") { f.num("bias")? } else { 0 },
            keep: parse_name(&KEEPS, "keep", f.get("keep")?)?,
            mode: if keys.contains(&"mode") {
                parse_name(&MODES, "mode", f.get("mode")?)?
            } else {
                Mode::PerSample
            },
            scale: if keys.contains(&"scale") {
                f.num("scale")?
            } else {
                1.0
            },
            cap: if keys.contains(&"cap") { f.num("cap")? } else { 0 },
            co: if keys.contains(&"co") { f.num("co")? } else { 0 },
        };
        if spec.bias > 0 && spec.row_len % spec.bias != 0 {
            return Err(format!(
                "bias: {} does not divide the row length {}",
                spec.bias, spec.row_len
            ));
        }
        if !(spec.scale.is_finite() && spec.scale >= 0.0) {
            return Err(format!("scale: must be finite and >= 0, got {}", spec.scale));
        }
        if spec.co > 1024 {
            return Err("co: view offsets must be <= 1024".into());
        }
        Ok(spec)
    }
}

// ------------------------------------------------------------------------------------------ draw

/// A skip case of at most `max_n` elements: mostly small batches, rows of up to 40 elements or
/// multiples of 8, now and then long rows (over 2^16); slots of batches over several scan tiles.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let r = rng.random_range(0..10u32);
    let mut batch = if op == Op::Slots {
        match r {
            0..=4 => rng.random_range(1..=100),
            5..=8 => rng.random_range(4090..=4100),
            _ => rng.random_range(10_000..=20_000),
        }
    } else {
        match r {
            0..=5 => rng.random_range(1..=6),
            6 | 7 => 1,
            _ => rng.random_range(7..=40),
        }
    };
    let mut row_len = match (op, rng.random_range(0..7u32)) {
        (Op::Slots, _) => 1,
        (_, 0..=2) => rng.random_range(1..=40),
        (_, 3..=5) => 8 * rng.random_range(1..=40),
        _ => [4096, 65_544, 65_539, 100_000][rng.random_range(0..4)],
    };
    while batch * row_len > max_n {
        if row_len >= batch {
            row_len = row_len.div_ceil(2);
        } else {
            batch = batch.div_ceil(2);
        }
    }
    let bias = if op.is_depth() && rng.random_bool(0.5) {
        let divisors: Vec<usize> = (1..=row_len).filter(|d| row_len % d == 0).take(64).collect();
        divisors[rng.random_range(0..divisors.len())]
    } else {
        0
    };
    let scale = match rng.random_range(0..6u32) {
        0 => 0.0,
        1 => 1.0,
        2 | 3 => reference::depth_scale(rng.random_range(0.0..0.99), true).expect("a probability"),
        4 => rng.random_range(0.0f32..1e3),
        _ => 3.0e38,
    };
    let uses = |key: &str| op.keys().contains(&key);
    let spec = Spec {
        batch,
        row_len,
        bias,
        keep: [
            KeepKind::All,
            KeepKind::All,
            KeepKind::None,
            KeepKind::Random,
            KeepKind::Random,
            KeepKind::Random,
        ][rng.random_range(0..6)],
        mode: if uses("mode") {
            [
                Mode::PerSample,
                Mode::PerSample,
                Mode::PerSample,
                Mode::Batch,
                Mode::BatchDevice,
            ][rng.random_range(0..5)]
        } else {
            Mode::PerSample
        },
        scale: if uses("scale") { scale } else { 1.0 },
        cap: if uses("cap") {
            match rng.random_range(0..8u32) {
                0..=3 => 0,
                4 | 5 => rng.random_range(1..=3),
                _ => -rng.random_range(1..=3),
            }
        } else {
            0
        },
        co: if uses("co") { rng.random_range(0..8) } else { 0 },
    };
    let offset = |rng: &mut StdRng, key: &str| if uses(key) { rng.random_range(0..8) } else { 0 };
    Case {
        xo: offset(rng, "xo"),
        yo: offset(rng, "yo"),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Skip(op), CaseSpec::Skip(spec))
    }
}

// ---------------------------------------------------------------------------------------- inputs

/// The keep flags of case `c` and their device bytes (any non-zero byte for a kept sample).
fn flags(c: &Case, s: &Spec) -> (Vec<bool>, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(c.data ^ 0xf1a9);
    let density = rng.random::<f64>();
    let flags: Vec<bool> = (0..s.batch)
        .map(|_| match s.keep {
            KeepKind::All => true,
            KeepKind::None => false,
            KeepKind::Random => rng.random_bool(density),
        })
        .collect();
    let bytes = flags
        .iter()
        .map(|&k| {
            if k {
                [1, 1, 1, 2, 0x80, 0xFF][rng.random_range(0..6)]
            } else {
                0
            }
        })
        .collect();
    (flags, bytes)
}

/// `total + delta`, at least 0.
fn plus(total: usize, delta: i64) -> usize {
    (total as i64).saturating_add(delta).max(0) as usize
}

// ------------------------------------------------------------------------------------------- run

/// Case `c` (operation `op`, skip part `s`) for element type `T`: on the GPU `dev`, or the
/// reference self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    match dev {
        Some(dev) if op.is_depth() => gpu_depth::<T>(dev, c, op, s),
        Some(dev) => gpu_compact::<T>(dev, c, op, s),
        None => cpu::<T>(c, op, s),
    }
}

/// The stochastic-depth kernels on the GPU against the reference.
fn gpu_depth<T: FuzzElement>(dev: &Device, c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (r, n, p) = (s.row_len, s.numel(), s.bias);
    let (xo, yo, co) = (c.xo, c.yo, s.co);
    let fill = sentinel::<T>();
    let (flags, bytes) = flags(c, s);
    let host_keep = match s.mode {
        Mode::PerSample => SampleKeep::PerSample(&flags),
        Mode::Batch | Mode::BatchDevice => SampleKeep::Batch(flags[0]),
    };
    let x: Vec<T> = values(n, c.data ^ 1);
    let f: Vec<T> = values(n, c.data ^ 2);
    let bias: Vec<T> = values(p, c.data ^ 3);
    let bias_host = (p > 0).then_some(&bias[..]);
    let flags_d = dev.upload(&bytes)?;
    let one_d = dev.upload(&bytes[..1])?;
    let keep = match s.mode {
        Mode::PerSample => Keep::PerSample(&flags_d),
        Mode::Batch => Keep::Batch(flags[0]),
        Mode::BatchDevice => Keep::BatchOnDevice(&one_d),
    };
    let xb_host = padded(xo, &x, fill);
    let fb_host = padded(co, &f, fill);
    let bb_host = padded(co, &bias, fill);
    let mut xb = dev.upload(&xb_host)?;
    let fb = dev.upload(&fb_host)?;
    let bb = dev.upload(&bb_host)?;
    let bview = bb.slice(co..co + p);
    let bias_arg = (p > 0).then_some(&bview as &dyn DevicePtr<T>);
    let k = op.name();
    let mut bad = Vec::new();
    match op {
        Op::Forward | Op::ForwardInPlace => {
            let want = reference::stochastic_depth(&x, &f, bias_host, r, host_keep, s.scale)?;
            if op == Op::Forward {
                let mut yb = dev.upload(&padded(yo, &vec![fill; n], fill))?;
                kernels::stochastic_depth(
                    st,
                    &xb.slice(xo..xo + n),
                    &fb.slice(co..co + n),
                    bias_arg,
                    r,
                    keep,
                    s.scale,
                    &mut yb.slice_mut(yo..yo + n),
                )?;
                compare(
                    &format!("{k} out"),
                    &dev.download(&yb)?,
                    yo,
                    &want,
                    fill,
                    true,
                    &mut bad,
                );
                compare(
                    &format!("{k} residual (must be unchanged)"),
                    &dev.download(&xb)?,
                    0,
                    &xb_host,
                    fill,
                    false,
                    &mut bad,
                );
            } else {
                kernels::stochastic_depth_in_place(
                    st,
                    &mut xb.slice_mut(xo..xo + n),
                    &fb.slice(co..co + n),
                    bias_arg,
                    r,
                    keep,
                    s.scale,
                )?;
                compare(
                    &format!("{k} residual"),
                    &dev.download(&xb)?,
                    xo,
                    &want,
                    fill,
                    true,
                    &mut bad,
                );
            }
            compare(
                &format!("{k} branch (must be unchanged)"),
                &dev.download(&fb)?,
                0,
                &fb_host,
                fill,
                false,
                &mut bad,
            );
            compare(
                &format!("{k} bias (must be unchanged)"),
                &dev.download(&bb)?,
                0,
                &bb_host,
                fill,
                false,
                &mut bad,
            );
        }
        Op::Backward => {
            let bias_len = (p > 0).then_some(p);
            let want = reference::stochastic_depth_backward(&x, r, host_keep, s.scale, bias_len)?;
            let mut db = dev.upload(&padded(yo, &vec![fill; n], fill))?;
            let dy = xb.slice(xo..xo + n);
            if p == 0 {
                kernels::stochastic_depth_backward(st, &dy, r, keep, s.scale, &mut db.slice_mut(yo..yo + n))?;
            } else {
                let ws_len = kernels::stochastic_depth_workspace_len(s.batch, r, p)?;
                let mut ws = dev.upload(&vec![f32::NAN; ws_len])?;
                let mut dbias = dev.upload(&padded(co, &vec![fill; p], fill))?;
                kernels::stochastic_depth_backward_bias(
                    st,
                    &dy,
                    r,
                    keep,
                    s.scale,
                    &mut db.slice_mut(yo..yo + n),
                    &mut dbias.slice_mut(co..co + p),
                    &mut ws,
                )?;
                let want_bias = want.d_bias.clone().unwrap_or_default();
                compare(
                    &format!("{k} d_bias"),
                    &dev.download(&dbias)?,
                    co,
                    &want_bias,
                    fill,
                    true,
                    &mut bad,
                );
            }
            compare(
                &format!("{k} d_branch"),
                &dev.download(&db)?,
                yo,
                &want.d_branch,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{k} d_out (must be unchanged)"),
                &dev.download(&xb)?,
                0,
                &xb_host,
                fill,
                false,
                &mut bad,
            );
        }
        _ => unreachable!("{k} is not a stochastic-depth kernel"),
    }
    Ok(bad)
}

/// The slots and the compaction kernels on the GPU against the reference, kept samples whose
/// slot is at or beyond the compact buffers' rows left alone.
fn gpu_compact<T: FuzzElement>(dev: &Device, c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let st = dev.stream();
    let (r, n) = (s.row_len, s.numel());
    let (xo, yo, co) = (c.xo, c.yo, s.co);
    let fill = sentinel::<T>();
    let (flags, bytes) = flags(c, s);
    let comp = Compaction::new(&flags)?;
    let count = comp.count();
    let flags_d = dev.upload(&bytes)?;
    let k = op.name();
    let mut bad = Vec::new();
    if op == Op::Slots {
        // Computed over other flags first: compute overwrites everything.
        let mut slots = SampleSlots::new(st, s.batch)?;
        let other: Vec<u8> = bytes.iter().map(|&b| u8::from(b == 0)).collect();
        slots.compute(st, &dev.upload(&other)?)?;
        slots.compute(st, &flags_d)?;
        let (got, got_count) = slots.download(st)?;
        compare(
            &format!("{k} slots"),
            &slot_words(&got),
            0,
            &slot_words(comp.slots()),
            0,
            false,
            &mut bad,
        );
        if got_count != count || slots.count(st)? != count {
            bad.push(format!("{k} count: {got_count}, want {count}"));
        }
        return Ok(bad);
    }
    let slots = SampleSlots::from_keep(st, &flags_d)?;
    let capacity = plus(count, s.cap);
    let cn = capacity * r;
    // Compact inputs of `max(count, capacity)` rows: the reference reads `count`, the GPU
    // `capacity`.
    let crows = count.max(capacity);
    let fits = count.min(capacity);
    // Kept samples whose slot is at or beyond the capacity: none of their rows is touched.
    let overflow: Vec<usize> = (0..s.batch)
        .filter(|&b| comp.slot(b).is_some_and(|slot| slot >= capacity))
        .collect();
    let keep_overflow = |want: &mut [T], before: &[T]| {
        for &b in &overflow {
            want[b * r..(b + 1) * r].copy_from_slice(&before[b * r..(b + 1) * r]);
        }
    };
    // A compact output: the first `min(count, capacity)` rows of `full`, the others untouched.
    let compact_out = |full: &[T]| {
        let mut v = vec![fill; cn];
        v[..fits * r].copy_from_slice(&full[..fits * r]);
        v
    };
    let unwritten = vec![fill; n];
    let x: Vec<T> = values(n, c.data ^ 1);
    let cdata: Vec<T> = values(crows * r, c.data ^ 2);
    let x_host = padded(xo, &x, fill);
    let c_host = padded(co, &cdata[..cn], fill);
    let mut xb = dev.upload(&x_host)?;
    let cb = dev.upload(&c_host)?;
    let empty_c = padded(co, &vec![fill; cn], fill);
    let mut cout = dev.upload(&empty_c)?;
    let mut yb = dev.upload(&padded(yo, &unwritten, fill))?;
    let (xr, yr, cr) = (xo..xo + n, yo..yo + n, co..co + cn);
    // Whether the kernel only reads the full input (the compact input is only ever read).
    let mut x_read_only = true;
    match op {
        Op::Gather | Op::GatherChecked => {
            let want = compact_out(&reference::gather_samples(&x, r, &flags)?);
            if op == Op::Gather {
                kernels::gather_samples(st, &slots, &xb.slice(xr), r, &mut cout.slice_mut(cr))?;
                compare(
                    &format!("{k} compact"),
                    &dev.download(&cout)?,
                    co,
                    &want,
                    fill,
                    true,
                    &mut bad,
                );
            } else {
                match kernels::gather_samples_checked(st, &slots, &xb.slice(xr), r, &mut cout.slice_mut(cr)) {
                    Ok(got) if count <= capacity && got == count => compare(
                        &format!("{k} compact"),
                        &dev.download(&cout)?,
                        co,
                        &want,
                        fill,
                        true,
                        &mut bad,
                    ),
                    Err(ref e) if count > capacity && e.argument() == Some("capacity") => compare(
                        &format!("{k} compact (nothing written on error)"),
                        &dev.download(&cout)?,
                        0,
                        &empty_c,
                        fill,
                        false,
                        &mut bad,
                    ),
                    other => bad.push(format!(
                        "{k}: {other:?} for a count of {count} and {capacity} rows"
                    )),
                }
            }
        }
        Op::Scatter | Op::ScatterInPlace => {
            let mut want = reference::scatter_samples(&x, &cdata, r, &flags)?;
            if op == Op::Scatter {
                keep_overflow(&mut want, &unwritten);
                kernels::scatter_samples(st, &slots, &xb.slice(xr), &cb.slice(cr), r, &mut yb.slice_mut(yr))?;
                compare(
                    &format!("{k} out"),
                    &dev.download(&yb)?,
                    yo,
                    &want,
                    fill,
                    true,
                    &mut bad,
                );
            } else {
                keep_overflow(&mut want, &x);
                x_read_only = false;
                kernels::scatter_samples_in_place(
                    st,
                    &slots,
                    &mut xb.slice_mut(xr.clone()),
                    &cb.slice(cr),
                    r,
                )?;
                compare(
                    &format!("{k} x"),
                    &dev.download(&xb)?,
                    xo,
                    &want,
                    fill,
                    true,
                    &mut bad,
                );
            }
        }
        Op::ScatterBackward => {
            let (mut want_dx, want_dc) = reference::scatter_samples_backward(&x, r, &flags)?;
            keep_overflow(&mut want_dx, &unwritten);
            kernels::scatter_samples_backward(
                st,
                &slots,
                &xb.slice(xr),
                r,
                &mut yb.slice_mut(yr),
                &mut cout.slice_mut(cr),
            )?;
            compare(
                &format!("{k} d_x"),
                &dev.download(&yb)?,
                yo,
                &want_dx,
                fill,
                true,
                &mut bad,
            );
            let want_dc = compact_out(&want_dc);
            compare(
                &format!("{k} d_compact"),
                &dev.download(&cout)?,
                co,
                &want_dc,
                fill,
                true,
                &mut bad,
            );
        }
        Op::ScatterAdd => {
            let mut want = x.clone();
            reference::scatter_add_samples(&mut want, &cdata, r, &flags, s.scale)?;
            keep_overflow(&mut want, &x);
            x_read_only = false;
            kernels::scatter_add_samples(
                st,
                &slots,
                &mut xb.slice_mut(xr.clone()),
                &cb.slice(cr),
                r,
                s.scale,
            )?;
            compare(
                &format!("{k} x"),
                &dev.download(&xb)?,
                xo,
                &want,
                fill,
                true,
                &mut bad,
            );
        }
        Op::ScatterAddBackward => {
            let want = compact_out(&reference::scatter_add_samples_backward(&x, r, &flags, s.scale)?);
            kernels::scatter_add_samples_backward(
                st,
                &slots,
                &xb.slice(xr),
                r,
                s.scale,
                &mut cout.slice_mut(cr),
            )?;
            compare(
                &format!("{k} d_compact"),
                &dev.download(&cout)?,
                co,
                &want,
                fill,
                true,
                &mut bad,
            );
        }
        Op::GatherBackward => {
            let mut want = x.clone();
            reference::gather_samples_backward(&cdata, r, &flags, &mut want)?;
            keep_overflow(&mut want, &x);
            x_read_only = false;
            kernels::gather_samples_backward(st, &slots, &cb.slice(cr), r, &mut xb.slice_mut(xr.clone()))?;
            compare(
                &format!("{k} d_x"),
                &dev.download(&xb)?,
                xo,
                &want,
                fill,
                true,
                &mut bad,
            );
        }
        Op::Forward | Op::ForwardInPlace | Op::Backward | Op::Slots => {
            unreachable!("{k} is not a compaction kernel")
        }
    }
    if x_read_only {
        compare(
            &format!("{k} full input (must be unchanged)"),
            &dev.download(&xb)?,
            0,
            &x_host,
            fill,
            false,
            &mut bad,
        );
    }
    compare(
        &format!("{k} compact input (must be unchanged)"),
        &dev.download(&cb)?,
        0,
        &c_host,
        fill,
        false,
        &mut bad,
    );
    Ok(bad)
}

/// Slots as words: [`kernels::SLOT_NONE`] for a skipped sample.
fn slot_words(slots: &[Option<u32>]) -> Vec<u32> {
    slots.iter().map(|s| s.unwrap_or(kernels::SLOT_NONE)).collect()
}

/// The reference on case `c` against the contract re-derived in `examples/checks/skip.rs`.
fn cpu<T: FuzzElement>(c: &Case, op: Op, s: &Spec) -> dropfuse::Result<Vec<String>> {
    let (r, n, p) = (s.row_len, s.numel(), s.bias);
    let (flags, _) = flags(c, s);
    let count = flags.iter().filter(|&&k| k).count();
    let host_keep = match s.mode {
        Mode::PerSample => SampleKeep::PerSample(&flags),
        Mode::Batch | Mode::BatchDevice => SampleKeep::Batch(flags[0]),
    };
    let x: Vec<T> = values(n, c.data ^ 1);
    // Compact inputs: at least the count, with the spare rows of the case.
    let cdata: Vec<T> = values(plus(count, s.cap).max(count) * r, c.data ^ 2);
    let mut checks = Checks::new();
    match op {
        Op::Forward | Op::ForwardInPlace => {
            let f: Vec<T> = values(n, c.data ^ 2);
            let bias: Vec<T> = values(p, c.data ^ 3);
            check::check_depth(
                &mut checks,
                &x,
                &f,
                (p > 0).then_some(&bias[..]),
                r,
                host_keep,
                s.scale,
            )?;
        }
        Op::Backward => {
            check::check_depth_backward(&mut checks, &x, r, host_keep, s.scale, (p > 0).then_some(p))?
        }
        Op::Slots => {
            check::check_slots(&mut checks, &flags)?;
        }
        Op::Gather | Op::GatherChecked => check::check_gather(&mut checks, &x, r, &flags)?,
        Op::Scatter | Op::ScatterInPlace => check::check_scatter(&mut checks, &x, &cdata, r, &flags)?,
        Op::ScatterBackward => check::check_scatter_backward(&mut checks, &x, r, &flags)?,
        Op::ScatterAdd => {
            let f: Vec<T> = values(n, c.data ^ 2);
            check::check_scatter_add(&mut checks, &x, &f, r, &flags, s.scale)?;
        }
        Op::ScatterAddBackward => check::check_scatter_add_backward(&mut checks, &x, r, &flags, s.scale)?,
        Op::GatherBackward => {
            check::check_gather_backward(&mut checks, &cdata, r, &flags, &values::<T>(n, c.data ^ 4))?
        }
    }
    Ok(checks.failures())
}
