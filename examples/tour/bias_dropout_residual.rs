//! Fused bias + dropout + residual in the tour (`dropfuse::bias_dropout_residual`, rows `bdr_*`):
//! `y = residual + dropout(x + bias)` with the mask, mask-free and in place on the residual, then
//! the backward (`dx` and the bias gradient) from the mask and mask-free, every output (`dbias`
//! included) and mask bit for bit against `dropfuse::reference::bias_dropout_residual`.

use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad};
use dropfuse::cudarc::driver::{CudaSlice, DevicePtr};
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::bias_dropout_residual as reference;
use dropfuse::{Device, Element, Generator, PhiloxState};

use crate::checks::bias_dropout_residual as check;
use crate::checks::Checks;
use crate::{
    download, element_mismatches, mask_mismatches, print_check_header, print_checks, push_rows, random_input,
    time_copy, time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// Drop probability.
const P: f64 = 0.1;

/// `rows x H`, a bias of `H`.
#[derive(Debug, Clone, Copy)]
struct Shape {
    rows: usize,
    h: usize,
}

/// The shape is 16 x 4096 x 4096 (bf16); 16 x 256 x 4096 (16 M elements, 16 chunks of the
/// bias gradient) keeps the CPU reference quick.
const FULL: Shape = Shape { rows: 4096, h: 4096 };
/// Two chunks of the bias gradient, the second partial.
const SMALL: Shape = Shape { rows: 300, h: 40 };

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "rows x H = {} x {}, a bias of {}, p = {P}",
            self.rows, self.h, self.h
        )
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!(
        "bias + dropout + residual (bdr): {}",
        shape(scale).label()
    )]
}

fn gpu(dev: &Device, scale: Scale, rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    gpu_dtype::<f16>(dev, s, rng.next(), 71, rows)?;
    gpu_dtype::<bf16>(dev, s, rng.next(), 72, rows)?;
    gpu_dtype::<f32>(dev, s, rng.next(), 73, rows)
}

fn gpu_dtype<T: Element>(
    dev: &Device,
    shape: Shape,
    state: PhiloxState,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let st = dev.stream();
    let (r, h) = (shape.rows, shape.h);
    let n = r * h;
    let size = T::DTYPE.size() as u64;
    let op = BiasDropoutResidual::new(P, h)?;
    let x_host: Vec<T> = random_input(n, seed);
    let r_host: Vec<T> = random_input(n, seed ^ 0x5e);
    let b_host: Vec<T> = random_input(h, seed ^ 0xb1);
    let dy_host: Vec<T> = random_input(n, seed ^ 0xd1);
    let (want_y, want_mask) = reference::forward(&x_host, &r_host, Some(&b_host), h, P, state, 0)?;
    let want = reference::backward_from_mask(&dy_host, h, &want_mask, P, true)?;
    let want_db = want.dbias.as_deref().unwrap_or(&[]);

    let x = dev.upload(&x_host)?;
    let res = dev.upload(&r_host)?;
    let bias = dev.upload(&b_host)?;
    let dy = dev.upload(&dy_host)?;
    let bias_ref: Option<&dyn DevicePtr<T>> = Some(&bias);
    let mut y = dev.zeros::<T>(n)?;
    let mut mask = dev.zeros::<u32>(mask_words(n))?;
    op.forward(st, state, &x, &res, bias_ref, &mut y, &mut mask)?;
    let fwd_bad =
        element_mismatches(&download(dev, &y)?, &want_y) + mask_mismatches(&dev.download(&mask)?, &want_mask);
    let mut y2 = dev.zeros::<T>(n)?;
    op.forward_maskless(st, state, &x, &res, bias_ref, &mut y2)?;
    let ml_bad = element_mismatches(&download(dev, &y2)?, &want_y);
    let mut ri = dev.upload(&r_host)?;
    let mut m2 = dev.zeros::<u32>(mask_words(n))?;
    op.forward_inplace(st, state, &x, bias_ref, &mut ri, &mut m2)?;
    let ip_bad =
        element_mismatches(&download(dev, &ri)?, &want_y) + mask_mismatches(&dev.download(&m2)?, &want_mask);

    let mut dx = dev.zeros::<T>(n)?;
    let mut db = dev.zeros::<T>(h)?;
    let mut ws = dev.zeros::<f32>(op.workspace_len(r))?;
    op.backward(st, &mask, &dy, &mut dx, Some(grad(&mut db, &mut ws)))?;
    let bwd_bad = element_mismatches(&download(dev, &dx)?, &want.dx)
        + element_mismatches(&download(dev, &db)?, want_db);
    let mut dx2 = dev.zeros::<T>(n)?;
    let mut db2 = dev.zeros::<T>(h)?;
    op.backward_maskless(st, state, &dy, &mut dx2, Some(grad(&mut db2, &mut ws)))?;
    let bml_bad = element_mismatches(&download(dev, &dx2)?, &want.dx)
        + element_mismatches(&download(dev, &db2)?, want_db);

    // Bytes as the bench counts them (W: the dbias workspace floats, written and read).
    let (ns, hs) = (n as u64 * size, h as u64 * size);
    let mbytes = 4 * mask_words(n) as u64;
    let wbytes = 8 * op.workspace_len(r) as u64;
    let copy_ms = time_copy(dev, &x)?;
    let fwd_ms = time_ms(dev, || {
        op.forward(st, state, &x, &res, bias_ref, &mut y, &mut mask)
    })?;
    let ml_ms = time_ms(dev, || {
        op.forward_maskless(st, state, &x, &res, bias_ref, &mut y2)
    })?;
    let ip_ms = time_ms(dev, || {
        op.forward_inplace(st, state, &x, bias_ref, &mut ri, &mut m2)
    })?;
    let bwd_ms = time_ms(dev, || {
        op.backward(st, &mask, &dy, &mut dx, Some(grad(&mut db, &mut ws)))
    })?;
    let bml_ms = time_ms(dev, || {
        op.backward_maskless(st, state, &dy, &mut dx2, Some(grad(&mut db2, &mut ws)))
    })?;
    let table = [
        ("bdr_forward", fwd_bad, fwd_ms, 3 * ns + hs + mbytes),
        ("bdr_forward_maskless", ml_bad, ml_ms, 3 * ns + hs),
        ("bdr_forward_inplace", ip_bad, ip_ms, 3 * ns + hs + mbytes),
        ("bdr_backward", bwd_bad, bwd_ms, 2 * ns + mbytes + wbytes + hs),
        ("bdr_backward_maskless", bml_bad, bml_ms, 2 * ns + wbytes + hs),
    ];
    push_rows(rows, T::DTYPE.name(), n, (copy_ms, 2 * ns), table);
    Ok(())
}

/// The bias gradient and its workspace.
fn grad<'a, T: Element>(db: &'a mut CudaSlice<T>, ws: &'a mut CudaSlice<f32>) -> BiasGrad<'a, T> {
    BiasGrad {
        dbias: db,
        workspace: ws,
    }
}

fn cpu(scale: Scale, rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!("CPU reference: bias + dropout + residual: {}\n", s.label());
    print_check_header();
    let mut ok = cpu_dtype::<f16>(s, rng.next(), 71, 0)?;
    ok &= cpu_dtype::<bf16>(s, rng.next(), 72, 1 << 33)?;
    ok &= cpu_dtype::<f32>(s, rng.next(), 73, u64::MAX - (s.rows * s.h) as u64)?;
    Ok(ok)
}

/// The reference's self-checks for dtype `T` at element offset `eo`; prints one row each.
fn cpu_dtype<T: Element>(shape: Shape, state: PhiloxState, seed: u64, eo: u64) -> BoxResult<bool> {
    let (r, h) = (shape.rows, shape.h);
    let n = r * h;
    let x: Vec<T> = random_input(n, seed);
    let res: Vec<T> = random_input(n, seed ^ 0x5e);
    let b: Vec<T> = random_input(h, seed ^ 0xb1);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let mut checks = Checks::new();
    checks.prefix(format!("element offset {eo}, bias"));
    let (_, mask) = check::check_forward(&mut checks, &x, &res, Some(&b), h, P, state, eo)?;
    check::check_backward(&mut checks, &dy, h, &mask, P, state, eo, true)?;
    checks.prefix(format!("element offset {eo}, no bias"));
    let (_, mask) = check::check_forward(&mut checks, &x, &res, None, h, P, state, eo)?;
    check::check_backward(&mut checks, &dy, h, &mask, P, state, eo, false)?;
    Ok(print_checks(T::DTYPE.name(), n, &checks))
}
