//! Stochastic depth and per-sample compaction in the tour (`dropfuse::skip`): the fused residual
//! with a per-feature bias, a quarter of the samples dropped (in place, out of place, backward
//! with the bias gradient), then the device slots, gather, scatter, scatter-add and their
//! backward kernels.

use dropfuse::cudarc::driver::DevicePtr;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::skip::{self as reference, Compaction, SampleKeep};
use dropfuse::skip::{self as kernels, Keep, SampleSlots};
use dropfuse::{Device, Element, Generator};

use crate::checks::skip as check;
use crate::checks::Checks;
use crate::{
    counter_mismatches, download, element_mismatches, print_check_header, print_checks, push_rows,
    random_input, time_copy, time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// `batch` samples of `row_len` elements, a bias of `bias` elements (a divisor of `row_len`), the
/// dropped samples.
#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    row_len: usize,
    bias: usize,
    dropped: &'static [usize],
}

/// The benchmark shape is 16 x 4096 x 4096 (bf16); 16 x 256 x 4096 (16 M elements)
/// keeps the CPU reference quick. Bias per feature (4096), samples 3, 7, 11, 15 dropped.
const FULL: Shape = Shape {
    batch: 16,
    row_len: 256 * 4096,
    bias: 4096,
    dropped: &[3, 7, 11, 15],
};
const SMALL: Shape = Shape {
    batch: 6,
    row_len: 3 * 136,
    bias: 136,
    dropped: &[1, 4],
};

/// The drop probability the scale comes from: `1 / (1 - p)`.
const P: f64 = 0.25;

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

impl Shape {
    fn keep(&self) -> Vec<bool> {
        (0..self.batch).map(|b| !self.dropped.contains(&b)).collect()
    }
    fn label(&self) -> String {
        format!(
            "B x R = {} x {}, bias of {}, samples {:?} dropped, p = {P}",
            self.batch, self.row_len, self.bias, self.dropped
        )
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!(
        "stochastic depth / sample compaction: {}",
        shape(scale).label()
    )]
}

fn gpu(dev: &Device, scale: Scale, _rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    gpu_dtype::<f16>(dev, s, 31, rows)?;
    gpu_dtype::<bf16>(dev, s, 32, rows)?;
    gpu_dtype::<f32>(dev, s, 33, rows)
}

fn gpu_dtype<T: Element>(dev: &Device, shape: Shape, seed: u64, rows: &mut Vec<Row>) -> BoxResult<()> {
    let (batch, r, p) = (shape.batch, shape.row_len, shape.bias);
    let n = batch * r;
    let size = T::DTYPE.size() as u64;
    let s = dev.stream();
    let scale = reference::depth_scale(P, true)?;
    let keep = shape.keep();
    let comp = Compaction::new(&keep)?;
    let count = comp.count();

    let x: Vec<T> = random_input(n, seed);
    let f: Vec<T> = random_input(n, seed ^ 0xf1);
    let bias: Vec<T> = random_input(p, seed ^ 0xb1);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    let compact: Vec<T> = random_input(count * r, seed ^ 0xc1);
    let d_x: Vec<T> = random_input(n, seed ^ 0xd2);

    // The oracle (plain CPU code).
    let per_sample = SampleKeep::PerSample(&keep);
    let want_fwd = reference::stochastic_depth(&x, &f, Some(&bias), r, per_sample, scale)?;
    let want_bwd = reference::stochastic_depth_backward(&dy, r, per_sample, scale, Some(p))?;
    let want_bias = want_bwd.d_bias.clone().expect("a bias gradient");
    let want_gather = reference::gather_samples(&x, r, &keep)?;
    let want_scatter = reference::scatter_samples(&x, &compact, r, &keep)?;
    let (want_sdx, want_sdc) = reference::scatter_samples_backward(&dy, r, &keep)?;
    let mut want_sa = x.clone();
    reference::scatter_add_samples(&mut want_sa, &compact, r, &keep, scale)?;
    let want_sab = reference::scatter_add_samples_backward(&dy, r, &keep, scale)?;
    let mut want_gb = d_x.clone();
    reference::gather_samples_backward(&compact, r, &keep, &mut want_gb)?;

    let xd = dev.upload(&x)?;
    let fd = dev.upload(&f)?;
    let bd = dev.upload(&bias)?;
    let dyd = dev.upload(&dy)?;
    let cd = dev.upload(&compact)?;
    let keep_d = dev.upload(&kernels::keep_flags(&keep))?;
    let bias_arg = Some(&bd as &dyn DevicePtr<T>);
    let keep_arg = Keep::PerSample(&keep_d);

    // Correctness: run each kernel once, download, compare.
    let mut res = dev.upload(&x)?;
    kernels::stochastic_depth_in_place(s, &mut res, &fd, bias_arg, r, keep_arg, scale)?;
    let fwd_bad = element_mismatches(&download(dev, &res)?, &want_fwd);

    let mut y = dev.zeros::<T>(n)?;
    kernels::stochastic_depth(s, &xd, &fd, bias_arg, r, keep_arg, scale, &mut y)?;
    let out_bad = element_mismatches(&download(dev, &y)?, &want_fwd);

    let mut d_branch = dev.zeros::<T>(n)?;
    let mut d_bias = dev.zeros::<T>(p)?;
    let mut ws = dev.zeros::<f32>(kernels::stochastic_depth_workspace_len(batch, r, p)?)?;
    kernels::stochastic_depth_backward_bias(
        s,
        &dyd,
        r,
        keep_arg,
        scale,
        &mut d_branch,
        &mut d_bias,
        &mut ws,
    )?;
    let bwd_bad = element_mismatches(&download(dev, &d_branch)?, &want_bwd.d_branch)
        + element_mismatches(&download(dev, &d_bias)?, &want_bias);

    let mut slots = SampleSlots::new(s, batch)?;
    slots.compute(s, &keep_d)?;
    let (got_slots, got_count) = slots.download(s)?;
    let slots_bad = counter_mismatches(&got_slots, comp.slots()) + usize::from(got_count != count);

    let mut c_out = dev.zeros::<T>(count * r)?;
    kernels::gather_samples(s, &slots, &xd, r, &mut c_out)?;
    let gather_bad = element_mismatches(&download(dev, &c_out)?, &want_gather);

    let mut out = dev.zeros::<T>(n)?;
    kernels::scatter_samples(s, &slots, &xd, &cd, r, &mut out)?;
    let scatter_bad = element_mismatches(&download(dev, &out)?, &want_scatter);

    let mut sdx = dev.zeros::<T>(n)?;
    let mut sdc = dev.zeros::<T>(count * r)?;
    kernels::scatter_samples_backward(s, &slots, &dyd, r, &mut sdx, &mut sdc)?;
    let scatter_bwd_bad = element_mismatches(&download(dev, &sdx)?, &want_sdx)
        + element_mismatches(&download(dev, &sdc)?, &want_sdc);

    let mut xa = dev.upload(&x)?;
    kernels::scatter_add_samples(s, &slots, &mut xa, &cd, r, scale)?;
    let sa_bad = element_mismatches(&download(dev, &xa)?, &want_sa);

    let mut sab = dev.zeros::<T>(count * r)?;
    kernels::scatter_add_samples_backward(s, &slots, &dyd, r, scale, &mut sab)?;
    let sab_bad = element_mismatches(&download(dev, &sab)?, &want_sab);

    let mut gb = dev.upload(&d_x)?;
    kernels::gather_samples_backward(s, &slots, &cd, r, &mut gb)?;
    let gb_bad = element_mismatches(&download(dev, &gb)?, &want_gb);

    // Timing, against a device copy of x. Bytes: rows of R elements read and written (kept rows
    // `k`, all rows `b`), the bias, the flags and slots.
    let row = r as u64 * size;
    let (k, b) = (count as u64, batch as u64);
    let bias_bytes = p as u64 * size;
    let copy_ms = time_copy(dev, &xd)?;
    let fwd_ms = time_ms(dev, || {
        kernels::stochastic_depth_in_place(s, &mut res, &fd, bias_arg, r, keep_arg, scale)
    })?;
    let out_ms = time_ms(dev, || {
        kernels::stochastic_depth(s, &xd, &fd, bias_arg, r, keep_arg, scale, &mut y)
    })?;
    let bwd_ms = time_ms(dev, || {
        kernels::stochastic_depth_backward_bias(
            s,
            &dyd,
            r,
            keep_arg,
            scale,
            &mut d_branch,
            &mut d_bias,
            &mut ws,
        )
    })?;
    let slots_ms = time_ms(dev, || slots.compute(s, &keep_d))?;
    let gather_ms = time_ms(dev, || kernels::gather_samples(s, &slots, &xd, r, &mut c_out))?;
    let scatter_ms = time_ms(dev, || kernels::scatter_samples(s, &slots, &xd, &cd, r, &mut out))?;
    let scatter_bwd_ms = time_ms(dev, || {
        kernels::scatter_samples_backward(s, &slots, &dyd, r, &mut sdx, &mut sdc)
    })?;
    let sa_ms = time_ms(dev, || {
        kernels::scatter_add_samples(s, &slots, &mut xa, &cd, r, scale)
    })?;
    let sab_ms = time_ms(dev, || {
        kernels::scatter_add_samples_backward(s, &slots, &dyd, r, scale, &mut sab)
    })?;
    let gb_ms = time_ms(dev, || {
        kernels::gather_samples_backward(s, &slots, &cd, r, &mut gb)
    })?;

    let table = [
        (
            "stochastic_depth_in_place",
            fwd_bad,
            fwd_ms,
            3 * k * row + bias_bytes + b,
        ),
        (
            "stochastic_depth",
            out_bad,
            out_ms,
            (3 * k + 2 * (b - k)) * row + bias_bytes + b,
        ),
        (
            "stochastic_depth_backward_bias",
            bwd_bad,
            bwd_ms,
            (k + b) * row + bias_bytes + b,
        ),
        ("sample_slots", slots_bad, slots_ms, b + 4 * (b + 1)),
        ("sample_gather", gather_bad, gather_ms, 2 * k * row),
        ("sample_scatter", scatter_bad, scatter_ms, 2 * b * row),
        (
            "sample_scatter_backward",
            scatter_bwd_bad,
            scatter_bwd_ms,
            (3 * k + 2 * (b - k)) * row,
        ),
        ("sample_scatter_add", sa_bad, sa_ms, 3 * k * row),
        ("sample_scatter_add_backward", sab_bad, sab_ms, 2 * k * row),
        ("sample_gather_backward", gb_bad, gb_ms, 3 * k * row),
    ];
    push_rows(rows, T::DTYPE.name(), n, (copy_ms, 2 * n as u64 * size), table);
    Ok(())
}

fn cpu(scale: Scale, _rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!(
        "CPU reference: stochastic depth / sample compaction: {}\n",
        s.label()
    );
    print_check_header();
    let mut ok = cpu_dtype::<f16>(s, 31)?;
    ok &= cpu_dtype::<bf16>(s, 32)?;
    ok &= cpu_dtype::<f32>(s, 33)?;
    Ok(ok)
}

/// The stochastic-depth and compaction references' self-checks for dtype `T`; prints one row each.
fn cpu_dtype<T: Element>(shape: Shape, seed: u64) -> BoxResult<bool> {
    let (batch, r, p) = (shape.batch, shape.row_len, shape.bias);
    let n = batch * r;
    let scale = reference::depth_scale(P, true)?;
    let keep = shape.keep();
    let count = keep.iter().filter(|&&k| k).count();
    let x: Vec<T> = random_input(n, seed);
    let f: Vec<T> = random_input(n, seed ^ 0xf1);
    let bias: Vec<T> = random_input(p, seed ^ 0xb1);
    let dy: Vec<T> = random_input(n, seed ^ 0xd1);
    // One spare compact row: inputs may have more rows than the count.
    let compact: Vec<T> = random_input((count + 1) * r, seed ^ 0xc1);
    let d_x: Vec<T> = random_input(n, seed ^ 0xd2);

    let mut checks = Checks::new();
    let per_sample = SampleKeep::PerSample(&keep);
    checks.prefix("per sample, bias");
    check::check_depth(&mut checks, &x, &f, Some(&bias), r, per_sample, scale)?;
    check::check_depth_backward(&mut checks, &dy, r, per_sample, scale, Some(p))?;
    checks.prefix("batch kept, no bias, s = 1");
    check::check_depth(&mut checks, &x, &f, None, r, SampleKeep::Batch(true), 1.0)?;
    checks.prefix("");
    check::check_slots(&mut checks, &keep)?;
    check::check_gather(&mut checks, &x, r, &keep)?;
    check::check_scatter(&mut checks, &x, &compact, r, &keep)?;
    check::check_scatter_backward(&mut checks, &dy, r, &keep)?;
    check::check_scatter_add(&mut checks, &x, &f, r, &keep, scale)?;
    check::check_scatter_add_backward(&mut checks, &dy, r, &keep, scale)?;
    check::check_gather_backward(&mut checks, &compact, r, &keep, &d_x)?;
    Ok(print_checks(T::DTYPE.name(), n, &checks))
}
