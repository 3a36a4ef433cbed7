//! Structured and Monte-Carlo dropout benchmarks (criterion, `harness = false`), plus summary lines
//! in the schema of `benches/dropout.rs` and `benches/peers/structured_torch.py` (same kernel names
//! and `n`).
//!
//! | kernel                        | shape / dtype                     | bytes moved                              |
//! |-------------------------------|-----------------------------------|------------------------------------------|
//! | `copy`                        | each case's data (x, or y for MC) | read + write (the baseline)              |
//! | `channel_2d_mask`             | 64 x 256 x 56 x 56 f16            | write mask `4·ceil(N·C/32)`              |
//! | `channel_2d_forward`          | 64 x 256 x 56 x 56 f16            | read x + write y + write mask            |
//! | `channel_2d_forward_maskless` | 64 x 256 x 56 x 56 f16            | read x + write y                         |
//! | `channel_2d_backward`         | 64 x 256 x 56 x 56 f16            | read dy + write dx + read mask           |
//! | `locked_forward(_maskless)`   | (T, B, H) = 512 x 64 x 1024 f16, locked on T | read x + write y (+ mask)     |
//! | `locked_backward`             | the same                          | read dy + write dx + read mask           |
//! | `embedding_rows_forward`      | 50257 x 1024 f16, one decision per row | read x + write y + write mask       |
//! | `mc_replicas_forward(_maskless)` | R = 16 replicas of 256 x 4096 f16 | read x + write R·n (+ R masks)      |
//! | `mc_summaries`                | T = 16, B = 1024, C = 1000 f32 stack, checked push + finish | see below |
//! | `mc_summaries_unchecked`      | the same without the value check  | see below                                |
//!
//! Bytes are nominal, like the other benches: a dropped channel or row is written without being
//! read, so the channel and embedding kernels move fewer bytes than counted (about `1 - p` of the
//! reads). `mc_summaries` counts reading the stack (`4·T·B·C`; the checked push reads it twice and
//! is counted once), the state's mean and M2 read and written (`16·B·C`), and the finish (read
//! mean and M2, write the variance, `12·B·C`). p = 0.1 everywhere. Each row: median over 20
//! event-timed windows of 10 back-to-back launches (after 5 warm-up launches), with a fresh Philox
//! stream per forward. `copy_fraction` is the row's bandwidth over a device copy of the case's data
//! timed in the same run. Environment: `DROPFUSE_BENCH_JSON` (append rows as JSON lines),
//! `DROPFUSE_COMMIT`. Without a CUDA device this prints a SKIPPED line and registers nothing.

use criterion::{criterion_group, criterion_main, Criterion};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::dropout::mask_words;
use dropfuse::half::f16;
use dropfuse::mc_dropout::{McDropout, McOutputs, McSummaryState};
use dropfuse::structured::StructuredDropout;
use dropfuse::{Error, Generator};

mod common;
use common::{burst_rows, Burst, Output, Row, Timer};

const P: f64 = 0.1;

type Launch<'a> = Box<dyn FnMut() -> Result<(), Error> + 'a>;

/// One case: its rows and their launches, the copy first.
struct Case<'a> {
    timer: &'a Timer,
    rows: Vec<(Row, Launch<'a>)>,
}

impl Burst for Case<'_> {
    /// The index of a row.
    type Kernel = usize;

    fn timer(&self) -> &Timer {
        self.timer
    }

    fn launch(&mut self, i: usize) -> Result<(), Error> {
        (self.rows[i].1)()
    }

    fn row(&self, i: usize) -> Row {
        self.rows[i].0.clone()
    }
}

/// A row of a case of shape `shape`.
fn case_row(kernel: &'static str, dtype: &'static str, n: usize, shape: &str, bytes: u64) -> Row {
    Row::new(kernel, dtype, n, bytes).shape(shape).param("p", P)
}

/// Times the copy of `data` elements, then every (row, launch) pair; emits the rows and registers
/// them with criterion under `group`.
#[allow(clippy::too_many_arguments)]
fn run_case<T: dropfuse::cudarc::driver::DeviceRepr + dropfuse::cudarc::driver::ValidAsZeroBits>(
    c: &mut Criterion,
    timer: &Timer,
    out: &mut Output,
    group: &str,
    shape: &str,
    dtype: &'static str,
    data: usize,
    rows: Vec<(Row, Launch<'_>)>,
) {
    let dev = &timer.dev;
    let src = dev
        .zeros::<T>(data)
        .unwrap_or_else(|e| panic!("{group}: copy buffers: {e}"));
    let mut dst = dev
        .zeros::<T>(data)
        .unwrap_or_else(|e| panic!("{group}: copy buffers: {e}"));
    let copy_bytes = 2 * (data * std::mem::size_of::<T>()) as u64;
    let copy: Launch<'_> = Box::new(|| {
        dev.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e))
    });
    let mut case = Case {
        timer,
        rows: vec![(case_row("copy", dtype, data, shape, copy_bytes), copy)],
    };
    case.rows.extend(rows);
    let kernels: Vec<usize> = (1..case.rows.len()).collect();
    burst_rows(out, &mut case, group, 0, &kernels);
    common::group(c, group.to_string(), &mut case, &kernels);
}

fn label(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

fn ramp(n: usize) -> Vec<f16> {
    (0..n)
        .map(|i| f16::from_f32((i % 251) as f32 * 0.01 - 1.25))
        .collect()
}

/// Channel, locked and embedding-row dropout (f16).
fn structured_case(
    c: &mut Criterion,
    timer: &Timer,
    out: &mut Output,
    name: &'static str,
    drop: StructuredDropout,
) {
    let dev = &timer.dev;
    let n = drop.numel();
    let shape = label(drop.layout().shape());
    let x: CudaSlice<f16> = dev.upload(&ramp(n)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let y = std::cell::RefCell::new(dev.zeros::<f16>(n).unwrap_or_else(|e| panic!("{name}: {e}")));
    let mask = std::cell::RefCell::new(
        dev.zeros::<u32>(drop.mask_words())
            .unwrap_or_else(|e| panic!("{name}: {e}")),
    );
    let rng = std::cell::RefCell::new(Generator::new(0x5eed));
    let data = 2 * (n * 2) as u64;
    let mbytes = 4 * drop.mask_words() as u64;
    let s = dev.stream();
    let row = |kernel: &'static str, bytes: u64| case_row(kernel, "f16", n, &shape, bytes);
    let kernels: [&'static str; 4] = match name {
        "channel_2d" => [
            "channel_2d_mask",
            "channel_2d_forward",
            "channel_2d_forward_maskless",
            "channel_2d_backward",
        ],
        "locked" => ["", "locked_forward", "locked_forward_maskless", "locked_backward"],
        _ => [
            "",
            "embedding_rows_forward",
            "embedding_rows_forward_maskless",
            "embedding_rows_backward",
        ],
    };
    let mut rows: Vec<(Row, Launch<'_>)> = Vec::new();
    if !kernels[0].is_empty() {
        rows.push((
            row(kernels[0], mbytes),
            Box::new(|| drop.mask(s, rng.borrow_mut().next(), &mut *mask.borrow_mut())),
        ));
    }
    rows.push((
        row(kernels[1], data + mbytes),
        Box::new(|| {
            drop.forward(
                s,
                rng.borrow_mut().next(),
                &x,
                &mut *y.borrow_mut(),
                &mut *mask.borrow_mut(),
            )
        }),
    ));
    rows.push((
        row(kernels[2], data),
        Box::new(|| drop.forward_maskless(s, rng.borrow_mut().next(), &x, &mut *y.borrow_mut())),
    ));
    // dy = x: the values do not change the speed.
    rows.push((
        row(kernels[3], data + mbytes),
        Box::new(|| drop.backward(s, &*mask.borrow(), &x, &mut *y.borrow_mut())),
    ));
    run_case::<f16>(
        c,
        timer,
        out,
        &format!("structured/{name}/f16"),
        &shape,
        "f16",
        n,
        rows,
    );
}

fn mc_replicas_case(c: &mut Criterion, timer: &Timer, out: &mut Output) {
    let dev = &timer.dev;
    let (replicas, batch, features) = (16usize, 256usize, 4096usize);
    let n = batch * features;
    let shape = format!("{replicas}x{batch}x{features}");
    let mc = McDropout::new(P, replicas).unwrap();
    let x = dev
        .upload(&ramp(n))
        .unwrap_or_else(|e| panic!("mc replicas: {e}"));
    let y = std::cell::RefCell::new(dev.zeros::<f16>(replicas * n).unwrap());
    let masks = std::cell::RefCell::new(dev.zeros::<u32>(replicas * mask_words(n)).unwrap());
    let rng = std::cell::RefCell::new(Generator::new(0x3c));
    let s = dev.stream();
    let bytes = (n * 2 + replicas * n * 2) as u64;
    let mbytes = 4 * (replicas * mask_words(n)) as u64;
    let row = |kernel: &'static str, bytes: u64| case_row(kernel, "f16", replicas * n, &shape, bytes);
    let rows: Vec<(Row, Launch<'_>)> = vec![
        (
            row("mc_replicas_forward_maskless", bytes),
            Box::new(|| {
                mc.forward_maskless(
                    s,
                    rng.borrow_mut().next_streams(replicas as u64),
                    &x,
                    &mut *y.borrow_mut(),
                )
            }),
        ),
        (
            row("mc_replicas_forward", bytes + mbytes),
            Box::new(|| {
                mc.forward(
                    s,
                    rng.borrow_mut().next_streams(replicas as u64),
                    &x,
                    &mut *y.borrow_mut(),
                    &mut *masks.borrow_mut(),
                )
            }),
        ),
    ];
    // The copy baseline moves the replicas' size.
    run_case::<f16>(
        c,
        timer,
        out,
        "mc_dropout/replicas/f16",
        &shape,
        "f16",
        replicas * n,
        rows,
    );
}

fn mc_summaries_case(c: &mut Criterion, timer: &Timer, out: &mut Output) {
    let dev = &timer.dev;
    let (samples, batch, classes) = (16usize, 1024usize, 1000usize);
    let per = batch * classes;
    let shape = format!("{samples}x{batch}x{classes}");
    let host: Vec<f32> = (0..samples * per)
        .map(|i| ((i % 997) as f32 + 1.0) / (997.0 * 500.0))
        .collect();
    let stack = dev.upload(&host).unwrap_or_else(|e| panic!("mc summaries: {e}"));
    let state = std::cell::RefCell::new(McSummaryState::new(dev, batch, classes).unwrap());
    let outputs = std::cell::RefCell::new(McOutputs::new(dev, batch, classes).unwrap());
    let s = dev.stream();
    let bytes = (4 * samples * per + 16 * per + 12 * per) as u64;
    let row = |kernel: &'static str| case_row(kernel, "f32", samples * per, &shape, bytes);
    let rows: Vec<(Row, Launch<'_>)> = vec![
        (
            row("mc_summaries"),
            Box::new(|| {
                let mut st = state.borrow_mut();
                st.push_stack(s, &stack, samples)?;
                st.finish(s, &mut outputs.borrow_mut())
            }),
        ),
        (
            row("mc_summaries_unchecked"),
            Box::new(|| {
                let mut st = state.borrow_mut();
                st.push_stack_unchecked(s, &stack, samples)?;
                st.finish(s, &mut outputs.borrow_mut())
            }),
        ),
    ];
    run_case::<f32>(
        c,
        timer,
        out,
        "mc_dropout/summaries/f32",
        &shape,
        "f32",
        samples * per,
        rows,
    );
}

fn structured_benches(c: &mut Criterion) {
    // SAFETY: every buffer is allocated, used and freed on `dev.stream()` alone.
    let Some((dev, mut out)) = (unsafe { common::device("structured") }) else {
        return;
    };
    println!("structured benches on {}: p = {P}", out.meta.gpu);
    let timer = Timer::new(&dev).unwrap_or_else(|e| panic!("events: {e}"));
    structured_case(
        c,
        &timer,
        &mut out,
        "channel_2d",
        StructuredDropout::channel(&[64, 256, 56, 56], P).unwrap(),
    );
    structured_case(
        c,
        &timer,
        &mut out,
        "locked",
        StructuredDropout::locked(&[512, 64, 1024], 0, P).unwrap(),
    );
    structured_case(
        c,
        &timer,
        &mut out,
        "embedding_rows",
        StructuredDropout::embedding_rows(&[50257, 1024], P).unwrap(),
    );
    mc_replicas_case(c, &timer, &mut out);
    mc_summaries_case(c, &timer, &mut out);
}

criterion_group!(benches, structured_benches);
criterion_main!(benches);
