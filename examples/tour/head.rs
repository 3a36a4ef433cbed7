//! The multi-sample dropout head in the tour (`dropfuse::multi_sample::MultiSampleHead`, cuBLAS
//! GEMMs): the forward (`K` masked copies and masks bit for bit, the loss and the averaged logits
//! within the documented bounds, the valid-row count) and the backward (`dh`, `dW`, `db` in `f32`
//! within the documented bounds) against `dropfuse::reference::multi_sample::head`. Without
//! libcublas it prints a SKIPPED line instead of its rows.

use dropfuse::cudarc::driver::{DevicePtr, DevicePtrMut};
use dropfuse::half::{bf16, f16};
use dropfuse::multi_sample::{check_cublas, MultiSampleHead};
use dropfuse::reference::multi_sample::{masked_copies, HeadConfig, DEFAULT_IGNORE_INDEX};
use dropfuse::{Device, Element, Generator, PhiloxState};

use crate::checks::head::{self as check, head_bounds, HeadGot, HeadInputs};
use crate::checks::multi_sample::{sample_masks, widen};
use crate::checks::Checks;
use crate::{
    counter_mismatches, download, element_mismatches, print_check_header, print_checks, push_rows, time_copy,
    time_ms, BoxResult, Family, Row, Scale,
};

pub const FAMILY: Family = Family { describe, gpu, cpu };

/// Drop probability and label smoothing.
const P: f64 = 0.1;
const EPS: f64 = 0.1;

/// `K` samples of `B x D` features, `C` classes.
#[derive(Debug, Clone, Copy)]
struct Shape {
    k: usize,
    b: usize,
    d: usize,
    c: usize,
}

/// The benchmark is K = 8, B = 1024, D = 2048, C = 1000; the `f64` reference costs
/// `O(K B D C)`, so the tour keeps K and scales the rest to B = 256, D = 512, C = 200.
const FULL: Shape = Shape {
    k: 8,
    b: 256,
    d: 512,
    c: 200,
};
const SMALL: Shape = Shape {
    k: 3,
    b: 10,
    d: 24,
    c: 9,
};

fn shape(scale: Scale) -> Shape {
    match scale {
        Scale::Full => FULL,
        Scale::Small => SMALL,
    }
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "K = {}, B x D = {} x {}, C = {}, p = {P}, smoothing {EPS}, every 9th row ignored, a bias, \
             f32 gradients",
            self.k, self.b, self.d, self.c
        )
    }

    /// Labels `37 i mod C`, every ninth row ignored.
    fn labels(&self) -> Vec<i64> {
        (0..self.b)
            .map(|i| {
                if i % 9 == 4 {
                    DEFAULT_IGNORE_INDEX
                } else {
                    (37 * i % self.c) as i64
                }
            })
            .collect()
    }

    fn config(&self) -> HeadConfig {
        HeadConfig {
            label_smoothing: EPS,
            ..HeadConfig::new(self.k, P)
        }
    }
}

fn describe(scale: Scale) -> Vec<String> {
    vec![format!("multi-sample head: {}", shape(scale).label())]
}

fn gpu(dev: &Device, scale: Scale, rng: &mut Generator, rows: &mut Vec<Row>) -> BoxResult<()> {
    let s = shape(scale);
    if let Err(e) = check_cublas() {
        println!("SKIPPED: multi_sample_head_forward / _backward (f16, bf16, f32): {e}");
        return Ok(());
    }
    gpu_dtype::<f16>(dev, s, rng.next_streams(s.k as u64), 91, rows)?;
    gpu_dtype::<bf16>(dev, s, rng.next_streams(s.k as u64), 92, rows)?;
    gpu_dtype::<f32>(dev, s, rng.next_streams(s.k as u64), 93, rows)
}

fn gpu_dtype<T: Element>(
    dev: &Device,
    shape: Shape,
    state: PhiloxState,
    seed: u64,
    rows: &mut Vec<Row>,
) -> BoxResult<()> {
    let Shape { k, b, d, c } = shape;
    let size = T::DTYPE.size() as u64;
    let cfg = shape.config();
    let inp = HeadInputs::<T>::new(b, d, c, true, shape.labels(), seed);
    let want = inp.reference(&cfg, state)?;
    let head = MultiSampleHead::from_config(&cfg, true)?;
    let mut ws = head.workspace::<T>(dev, b, d, c)?;
    let h = dev.upload(&inp.h)?;
    let w = dev.upload(&inp.w)?;
    let bias = dev.upload(inp.bias.as_deref().unwrap_or(&[]))?;
    let bias_ref: Option<&dyn DevicePtr<T>> = Some(&bias);
    let labels = dev.upload(&inp.labels)?;

    head.forward(&mut ws, state, &h, &w, bias_ref, &labels)?;
    let n_valid = ws.check_labels()?;
    let samples = masked_copies(&inp.h, k, P, state)?;
    let copies_bad = element_mismatches(
        &download(dev, &ws.copies().expect("training mode"))?,
        &samples.copies.concat(),
    ) + counter_mismatches(
        &dev.download(&ws.masks().expect("training mode"))?,
        &sample_masks(k, P, state, b * d)?,
    );
    let loss = f64::from(ws.read_loss()?);
    let mut mean = dev.zeros::<f32>(b * c)?;
    ws.mean_logits(&mut mean)?;

    let mut dh = dev.zeros::<f32>(b * d)?;
    let mut dw = dev.zeros::<f32>(c * d)?;
    let mut db = dev.zeros::<f32>(c)?;
    head.backward(
        &mut ws,
        &h,
        &w,
        &mut dh,
        &mut dw,
        Some(&mut db as &mut dyn DevicePtrMut<f32>),
        1.0,
    )?;
    let got = HeadGot {
        loss,
        mean_logits: widen(&dev.download(&mean)?),
        dh: widen(&dev.download(&dh)?),
        dw: widen(&dev.download(&dw)?),
        db: Some(widen(&dev.download(&db)?)),
    };
    let valid = inp.labels.iter().filter(|&&y| y != DEFAULT_IGNORE_INDEX).count();
    let slack = check::head_slack(&inp, &cfg, state)?;
    let (fwd, bwd) = head_bounds(&got, &want, T::DTYPE, valid == 0 || c == 1, Some(&slack));
    for f in fwd.iter().chain(&bwd) {
        println!("multi_sample_head {}: {f}", T::DTYPE);
    }
    let fwd_bad = copies_bad + fwd.len() + usize::from(n_valid as usize != valid);
    let bwd_bad = bwd.len();

    // Minimal bytes: the forward reads h, W, b and the labels; the backward writes dh, dW, db
    // (f32) and reads W. Both are GEMM-bound: GB/s is for comparison between runs only.
    let hs = (b * d) as u64 * size;
    let ws_bytes = (c * d) as u64 * size;
    let fwd_bytes = hs + ws_bytes + c as u64 * size + 8 * b as u64;
    let bwd_bytes = 4 * (b * d + c * d + c) as u64 + ws_bytes;
    let copy_ms = time_copy(dev, &h)?;
    let fwd_ms = time_ms(dev, || head.forward(&mut ws, state, &h, &w, bias_ref, &labels))?;
    let bwd_ms = time_ms(dev, || {
        head.backward(
            &mut ws,
            &h,
            &w,
            &mut dh,
            &mut dw,
            Some(&mut db as &mut dyn DevicePtrMut<f32>),
            1.0,
        )
    })?;
    let table = [
        ("multi_sample_head_forward", fwd_bad, fwd_ms, fwd_bytes),
        ("multi_sample_head_backward", bwd_bad, bwd_ms, bwd_bytes),
    ];
    push_rows(rows, T::DTYPE.name(), k * b * d, (copy_ms, 2 * hs), table);
    Ok(())
}

fn cpu(scale: Scale, rng: &mut Generator) -> BoxResult<bool> {
    let s = shape(scale);
    println!("CPU reference: multi-sample head: {}\n", s.label());
    print_check_header();
    let mut ok = cpu_dtype::<f16>(s, rng.next_streams(s.k as u64), 91, true)?;
    ok &= cpu_dtype::<bf16>(s, rng.next_streams(s.k as u64), 92, true)?;
    ok &= cpu_dtype::<f32>(s, PhiloxState::new(93, u64::MAX), 93, true)?;
    ok &= cpu_dtype::<f32>(s, rng.next(), 94, false)?;
    Ok(ok)
}

/// The head reference's self-checks for dtype `T`, training mode or evaluation mode.
fn cpu_dtype<T: Element>(shape: Shape, state: PhiloxState, seed: u64, train: bool) -> BoxResult<bool> {
    let Shape { b, d, c, .. } = shape;
    let cfg = HeadConfig {
        train,
        ..shape.config()
    };
    let inp = HeadInputs::<T>::new(b, d, c, true, shape.labels(), seed);
    let mut checks = Checks::new();
    check::check_head(&mut checks, &inp, &cfg, state)?;
    Ok(print_checks(T::DTYPE.name(), b * d, &checks))
}
