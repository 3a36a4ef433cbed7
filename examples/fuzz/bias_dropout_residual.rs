//! Fused bias + dropout + residual cases (`dropfuse::bias_dropout_residual` against
//! `dropfuse::reference::bias_dropout_residual`, bit for bit: masks, outputs, `dx` and `dbias`).
//!
//! Kernels: `bdr_forward` (`y = residual + dropout(x + bias)` and the mask), `bdr_forward_maskless`,
//! `bdr_forward_inplace` (on the residual, and the mask), `bdr_forward_maskless_inplace`,
//! `bdr_backward` (`dx` from a stored mask, and `dbias` through a NaN-filled workspace of the
//! documented length when the case has a bias), `bdr_backward_maskless`, `bdr_backward_inplace`,
//! `bdr_backward_maskless_inplace`. Keys besides `dtype`, `kernel`, `p`, `seed`, `offset` and
//! `data`:
//!
//! * `shape`: `ROWSxH` (rows around the 256-row chunks of the bias gradient, `H` from 1 to 4096);
//! * `bias`: `true` or `false` (the forward's bias; the backward's bias gradient);
//! * `eo`: the element offset (`eo + n <= 2^64 - 1`);
//! * `xo`, `yo`, `mo`, `bo`: view offsets of `x` / `dy` (and in-place gradients), of the residual,
//!   `y` and `dx`, of the masks, of the bias and `dbias`.
//!
//! Without a GPU the case runs the reference through `examples/checks/bias_dropout_residual.rs`.

use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad};
use dropfuse::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dropfuse::dropout::mask_words;
use dropfuse::reference::bias_dropout_residual as reference;
use dropfuse::reference::dropout as dropout_ref;
use dropfuse::{DType, Device};
use rand::rngs::StdRng;
use rand::Rng;

use crate::checks::bias_dropout_residual as check;
use crate::checks::Checks;
use crate::{
    compare, dims_text, draw_element_offset, draw_p, draw_size_limit, draw_u64, padded, parse_dims, sentinel,
    values, Case, Fields, FuzzElement, Kernel, Spec as CaseSpec, MASK_SENTINEL,
};

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Forward,
    ForwardMaskless,
    ForwardInplace,
    ForwardMasklessInplace,
    Backward,
    BackwardMaskless,
    BackwardInplace,
    BackwardMasklessInplace,
}

const KEYS: [&str; 13] = [
    "dtype", "kernel", "shape", "bias", "p", "seed", "offset", "eo", "xo", "yo", "mo", "bo", "data",
];

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Forward,
        Op::ForwardMaskless,
        Op::ForwardInplace,
        Op::ForwardMasklessInplace,
        Op::Backward,
        Op::BackwardMaskless,
        Op::BackwardInplace,
        Op::BackwardMasklessInplace,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::Forward => "bdr_forward",
            Op::ForwardMaskless => "bdr_forward_maskless",
            Op::ForwardInplace => "bdr_forward_inplace",
            Op::ForwardMasklessInplace => "bdr_forward_maskless_inplace",
            Op::Backward => "bdr_backward",
            Op::BackwardMaskless => "bdr_backward_maskless",
            Op::BackwardInplace => "bdr_backward_inplace",
            Op::BackwardMasklessInplace => "bdr_backward_maskless_inplace",
        }
    }
    pub fn keys(self) -> &'static [&'static str] {
        &KEYS
    }
    fn is_forward(self) -> bool {
        matches!(
            self,
            Op::Forward | Op::ForwardMaskless | Op::ForwardInplace | Op::ForwardMasklessInplace
        )
    }
}

/// The bias + dropout + residual part of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    rows: usize,
    h: usize,
    bias: bool,
    /// View offset of the bias and `dbias`.
    bo: usize,
}

impl Spec {
    pub fn numel(&self) -> usize {
        self.rows * self.h
    }

    pub fn value(&self, key: &str) -> String {
        match key {
            "shape" => dims_text(&[self.rows, self.h]),
            "bias" => self.bias.to_string(),
            "bo" => self.bo.to_string(),
            _ => unreachable!("bias + dropout + residual cases have no key {key}"),
        }
    }

    pub fn parse(_op: Op, f: &Fields<'_>) -> Result<Self, String> {
        let dims = parse_dims("shape", f.get("shape")?, &[2])?;
        let spec = Spec {
            rows: dims[0],
            h: dims[1],
            bias: f.num("bias")?,
            bo: f.num("bo")?,
        };
        if spec.h > reference::MAX_ROW_LEN {
            return Err("shape: H must be <= 2^31".into());
        }
        if spec.bo > 1024 {
            return Err("bo: view offsets must be <= 1024".into());
        }
        Ok(spec)
    }
}

/// A case: `H` of 1, small, around 32, medium, 4096; rows of 1, small, around the 256-row chunk,
/// several chunks; at most `max_n` elements and mostly at most 2^14.
pub fn draw(rng: &mut StdRng, dtype: DType, max_n: usize) -> Case {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let limit = draw_size_limit(rng, max_n, 1 << 14, 1 << 17);
    let mut h = match rng.random_range(0..10u32) {
        0 => 1,
        1..=3 => rng.random_range(2..=16),
        4 => rng.random_range(31..=33),
        5 => 4096,
        _ => rng.random_range(17..=700),
    };
    let mut rows = match rng.random_range(0..8u32) {
        0 => 1,
        1..=3 => rng.random_range(2..=20),
        4 | 5 => rng.random_range(255..=257),
        _ => rng.random_range(258..=800),
    };
    while rows * h > limit {
        if h >= rows || rows == 1 {
            h = h.div_ceil(2);
        } else {
            rows = rows.div_ceil(2);
        }
    }
    let spec = Spec {
        rows,
        h,
        bias: rng.random_bool(0.7),
        bo: rng.random_range(0..8),
    };
    let n = rows * h;
    Case {
        p: draw_p(rng),
        seed: draw_u64(rng),
        offset: draw_u64(rng),
        eo: draw_element_offset(rng, n),
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        mo: rng.random_range(0..4),
        data: rng.random(),
        ..Case::of(dtype, Kernel::Bdr(op), CaseSpec::Bdr(spec))
    }
}

/// Case `c` (operation `op`, part `s`) for element type `T`: on the GPU `dev`, or the reference
/// self-checks without one. Returns the failures.
pub fn run<T: FuzzElement>(
    dev: Option<&Device>,
    c: &Case,
    op: Op,
    s: &Spec,
) -> dropfuse::Result<Vec<String>> {
    let (n, h) = (c.n, s.h);
    let x: Vec<T> = values(n, c.data);
    let res: Vec<T> = values(n, c.data ^ 0x5e);
    let bias: Option<Vec<T>> = s.bias.then(|| values(h, c.data ^ 0xb1));
    let Some(dev) = dev else {
        let mut checks = Checks::new();
        let (_, mask) =
            check::check_forward(&mut checks, &x, &res, bias.as_deref(), h, c.p, c.state(), c.eo)?;
        check::check_backward(&mut checks, &x, h, &mask, c.p, c.state(), c.eo, s.bias)?;
        return Ok(checks.failures());
    };
    let st = dev.stream();
    let bdr = BiasDropoutResidual::new(c.p, h)?.with_element_offset(c.eo);
    let fill = sentinel::<T>();
    let words = mask_words(n);
    let name = op.name();
    let mut bad = Vec::new();
    let x_host = padded(c.xo, &x, fill);
    let mut xb = dev.upload(&x_host)?;
    let xr = c.xo..c.xo + n;
    let yr = c.yo..c.yo + n;
    let mr = c.mo..c.mo + words;
    let b_host = bias.as_ref().map(|b| padded(s.bo, b, fill));
    let bb = b_host.as_ref().map(|b| dev.upload(b)).transpose()?;
    let bv = bb.as_ref().map(|b| b.slice(s.bo..s.bo + h));
    let bias_ref: Option<&dyn DevicePtr<T>> = bv.as_ref().map(|v| v as &dyn DevicePtr<T>);
    let mut mout = dev.upload(&padded(c.mo, &vec![MASK_SENTINEL; words], MASK_SENTINEL))?;

    if op.is_forward() {
        let (want_y, want_mask) = reference::forward(&x, &res, bias.as_deref(), h, c.p, c.state(), c.eo)?;
        let r_host = padded(c.yo, &res, fill);
        let mut rb = dev.upload(&r_host)?;
        let mut yb = dev.upload(&padded(c.yo, &vec![fill; n], fill))?;
        let xv = xb.slice(xr.clone());
        match op {
            Op::Forward => bdr.forward(
                st,
                c.state(),
                &xv,
                &rb.slice(yr.clone()),
                bias_ref,
                &mut yb.slice_mut(yr.clone()),
                &mut mout.slice_mut(mr),
            )?,
            Op::ForwardMaskless => bdr.forward_maskless(
                st,
                c.state(),
                &xv,
                &rb.slice(yr.clone()),
                bias_ref,
                &mut yb.slice_mut(yr.clone()),
            )?,
            Op::ForwardInplace => bdr.forward_inplace(
                st,
                c.state(),
                &xv,
                bias_ref,
                &mut rb.slice_mut(yr.clone()),
                &mut mout.slice_mut(mr),
            )?,
            _ => bdr.forward_maskless_inplace(st, c.state(), &xv, bias_ref, &mut rb.slice_mut(yr.clone()))?,
        }
        let in_place = matches!(op, Op::ForwardInplace | Op::ForwardMasklessInplace);
        let (y_buf, r_want): (&CudaSlice<T>, &[T]) = if in_place { (&rb, &want_y) } else { (&yb, &res) };
        compare(
            &format!("{name} y"),
            &dev.download(y_buf)?,
            c.yo,
            &want_y,
            fill,
            true,
            &mut bad,
        );
        if !in_place {
            compare(
                &format!("{name} residual (must be unchanged)"),
                &dev.download(&rb)?,
                c.yo,
                r_want,
                fill,
                false,
                &mut bad,
            );
        }
        let mask_want: &[u32] = if matches!(op, Op::Forward | Op::ForwardInplace) {
            &want_mask
        } else {
            &[]
        };
        compare(
            &format!("{name} mask"),
            &dev.download(&mout)?,
            c.mo,
            mask_want,
            MASK_SENTINEL,
            false,
            &mut bad,
        );
    } else {
        // x is dy here.
        let want_mask = dropout_ref::mask(c.p, c.state(), c.eo, n)?;
        let want = reference::backward_from_mask(&x, h, &want_mask, c.p, s.bias)?;
        let mask_in_host = padded(c.mo, &want_mask, MASK_SENTINEL);
        let mb = dev.upload(&mask_in_host)?;
        let mut dxb = dev.upload(&padded(c.yo, &vec![fill; n], fill))?;
        let mut dbb = dev.upload(&padded(s.bo, &vec![fill; h], fill))?;
        let mut ws = dev.upload(&vec![f32::NAN; bdr.workspace_len(s.rows)])?;
        let mut dbv = dbb.slice_mut(s.bo..s.bo + h);
        let grad = s.bias.then_some(BiasGrad {
            dbias: &mut dbv as &mut dyn DevicePtrMut<T>,
            workspace: &mut ws as &mut dyn DevicePtrMut<f32>,
        });
        match op {
            Op::Backward => bdr.backward(st, &mb.slice(mr), &xb.slice(xr), &mut dxb.slice_mut(yr), grad)?,
            Op::BackwardMaskless => {
                bdr.backward_maskless(st, c.state(), &xb.slice(xr), &mut dxb.slice_mut(yr), grad)?
            }
            Op::BackwardInplace => bdr.backward_inplace(st, &mb.slice(mr), &mut xb.slice_mut(xr), grad)?,
            _ => bdr.backward_maskless_inplace(st, c.state(), &mut xb.slice_mut(xr), grad)?,
        }
        let in_place = matches!(op, Op::BackwardInplace | Op::BackwardMasklessInplace);
        if in_place {
            compare(
                &format!("{name} dx (in place)"),
                &dev.download(&xb)?,
                c.xo,
                &want.dx,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{name} dx buffer (unused)"),
                &dev.download(&dxb)?,
                c.yo,
                &[],
                fill,
                false,
                &mut bad,
            );
        } else {
            compare(
                &format!("{name} dx"),
                &dev.download(&dxb)?,
                c.yo,
                &want.dx,
                fill,
                true,
                &mut bad,
            );
            compare(
                &format!("{name} dy (must be unchanged)"),
                &dev.download(&xb)?,
                0,
                &x_host,
                fill,
                false,
                &mut bad,
            );
        }
        let db_want = want.dbias.as_deref().unwrap_or(&[]);
        compare(
            &format!("{name} dbias"),
            &dev.download(&dbb)?,
            s.bo,
            db_want,
            fill,
            true,
            &mut bad,
        );
        if matches!(op, Op::Backward | Op::BackwardInplace) {
            compare(
                &format!("{name} mask (must be unchanged)"),
                &dev.download(&mb)?,
                0,
                &mask_in_host,
                0,
                false,
                &mut bad,
            );
        }
        return Ok(bad);
    }
    if op.is_forward() {
        compare(
            &format!("{name} x (must be unchanged)"),
            &dev.download(&xb)?,
            0,
            &x_host,
            fill,
            false,
            &mut bad,
        );
        if let (Some(bb), Some(b_host)) = (&bb, &b_host) {
            compare(
                &format!("{name} bias (must be unchanged)"),
                &dev.download(bb)?,
                0,
                b_host,
                fill,
                false,
                &mut bad,
            );
        }
    }
    Ok(bad)
}
