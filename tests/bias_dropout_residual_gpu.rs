//! GPU vs CPU reference, bit for bit: the fused bias + dropout + residual add (forward with and
//! without a mask, in place on the residual, backward from a mask and mask-free with and without
//! the bias gradient) over dtypes, row lengths (multiples of 8 and not), random shapes, p in
//! {0, 1, random, 0.99999}, bias on and off, element offsets, misaligned views (data and bias);
//! invalid arguments; a tensor over 2^32 elements (`huge`). Without a GPU every test prints a
//! SKIPPED line and returns.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::{splitmix, unit_of};
use common::guard::{dl, expect_region_nan, padded, sentinel, Bits, MASK_SENTINEL};
use common::{gpu, ok, run_cases};
use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad, DBIAS_CHUNK};
use dropfuse::cudarc::driver::CudaContext;
use dropfuse::dropout::mask_words;
use dropfuse::reference::bias_dropout_residual as reference;
use dropfuse::reference::philox4x32_10;
use dropfuse::{Device, PhiloxState};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Finite values: mostly uniform in [-8, 8), some arbitrary finite bit patterns (huge ones make
/// infinities and NaNs in sums, which must match too), some -0.
fn values<T: Bits>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| loop {
            let r = splitmix(&mut s);
            let v = match r % 8 {
                0 => T::from_bits_u32((r >> 16) as u32),
                1 => T::from_f32(-0.0),
                _ => T::from_f32(unit_of(r) * 16.0 - 8.0),
            };
            if v.to_f32().is_finite() {
                break v;
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    rows: usize,
    h: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
    bias: bool,
    /// View offsets (elements / words) into larger buffers: they break 16-byte alignment.
    x_off: usize,
    r_off: usize,
    b_off: usize,
    y_off: usize,
    m_off: usize,
    /// Extra workspace floats beyond the minimum.
    ws_extra: usize,
    data_seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let h = prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 4, 7, 8, 9, 12, 16, 31, 33, 64, 100, 1000, 1024, 4096, 4100]),
        2 => 1usize..=300,
    ];
    let rows = prop_oneof![
        3 => 1usize..=40,
        2 => prop::sample::select(vec![255usize, 256, 257, 511, 513, 1000]),
        1 => 1usize..=3000,
    ];
    let p = prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(0.99999),
        Just(0.5),
        0.0f64..=1.0,
        prop::sample::select(vec![0.1, 0.25, 0.9]),
    ];
    let element_offset = prop_oneof![
        Just(0u64),
        0u64..5000,
        any::<u64>(),
        // just below a multiple of 2^34: the launch leaves the Philox fast path mid-way
        (1u64..(1 << 30), 0u64..600_000).prop_map(|(k, d)| (k << 34) - d),
    ];
    (
        (
            h,
            rows,
            p,
            any::<u64>(),
            any::<u64>(),
            element_offset,
            any::<bool>(),
        ),
        (
            0usize..9,
            0usize..9,
            0usize..9,
            0usize..9,
            0usize..3,
            0usize..40,
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (h, rows, p, seed, offset, eo, bias),
                (x_off, r_off, b_off, y_off, m_off, ws_extra, data_seed),
            )| {
                // keep the cases small enough for the CPU reference
                let rows = rows.min((1 << 20) / h).max(1);
                let n = (rows * h) as u64;
                Case {
                    rows,
                    h,
                    p,
                    state: PhiloxState::new(seed, offset),
                    element_offset: eo.min(u64::MAX - n),
                    bias,
                    x_off,
                    r_off,
                    b_off,
                    y_off,
                    m_off,
                    ws_extra,
                    data_seed,
                }
            },
        )
}

fn check_case<T: Bits>(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let (rows, h) = (c.rows, c.h);
    let n = rows * h;
    let words = mask_words(n);
    let op = ok(BiasDropoutResidual::new(c.p, h), "new")?.with_element_offset(c.element_offset);
    let x = values::<T>(n, c.data_seed);
    let r = values::<T>(n, c.data_seed ^ 1);
    let b = values::<T>(h, c.data_seed ^ 2);
    let dy = values::<T>(n, c.data_seed ^ 3);
    let bias_host = c.bias.then_some(&b[..]);
    let (want_y, want_mask) = ok(
        reference::forward(&x, &r, bias_host, h, c.p, c.state, c.element_offset),
        "reference forward",
    )?;
    let want_grads = ok(
        reference::backward_from_mask(&dy, h, &want_mask, c.p, c.bias),
        "reference backward",
    )?;

    let xd = ok(padded(dev, c.x_off, Some(&x), n, sentinel::<T>()), "upload")?;
    let rd = ok(padded(dev, c.r_off, Some(&r), n, sentinel::<T>()), "upload")?;
    let bd = ok(padded(dev, c.b_off, Some(&b), h, sentinel::<T>()), "upload")?;
    let dyd = ok(padded(dev, c.x_off, Some(&dy), n, sentinel::<T>()), "upload")?;
    let xv = xd.slice(c.x_off..c.x_off + n);
    let rv = rd.slice(c.r_off..c.r_off + n);
    let bv = bd.slice(c.b_off..c.b_off + h);
    let dyv = dyd.slice(c.x_off..c.x_off + n);
    let bias: Option<&dyn dropfuse::cudarc::driver::DevicePtr<T>> = if c.bias { Some(&bv) } else { None };

    // forward with mask, out of place
    let mut y = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
    let mut m = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        op.forward(
            s,
            c.state,
            &xv,
            &rv,
            bias,
            &mut y.slice_mut(c.y_off..c.y_off + n),
            &mut m.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward",
    )?;
    expect_region_nan(&dl(dev, &m)?, c.m_off, &want_mask, MASK_SENTINEL, "forward mask")?;
    expect_region_nan(&dl(dev, &y)?, c.y_off, &want_y, sentinel::<T>(), "forward y")?;

    // forward without mask
    let mut y2 = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
    ok(
        op.forward_maskless(
            s,
            c.state,
            &xv,
            &rv,
            bias,
            &mut y2.slice_mut(c.y_off..c.y_off + n),
        ),
        "forward_maskless",
    )?;
    expect_region_nan(
        &dl(dev, &y2)?,
        c.y_off,
        &want_y,
        sentinel::<T>(),
        "forward_maskless y",
    )?;

    // in place on the residual (y == residual), with and without a mask
    let mut z = ok(padded(dev, c.r_off, Some(&r), n, sentinel::<T>()), "upload")?;
    let mut m2 = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        op.forward_inplace(
            s,
            c.state,
            &xv,
            bias,
            &mut z.slice_mut(c.r_off..c.r_off + n),
            &mut m2.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward_inplace",
    )?;
    expect_region_nan(
        &dl(dev, &z)?,
        c.r_off,
        &want_y,
        sentinel::<T>(),
        "forward_inplace residual",
    )?;
    expect_region_nan(
        &dl(dev, &m2)?,
        c.m_off,
        &want_mask,
        MASK_SENTINEL,
        "forward_inplace mask",
    )?;
    let mut z2 = ok(padded(dev, c.r_off, Some(&r), n, sentinel::<T>()), "upload")?;
    ok(
        op.forward_maskless_inplace(s, c.state, &xv, bias, &mut z2.slice_mut(c.r_off..c.r_off + n)),
        "forward_maskless_inplace",
    )?;
    expect_region_nan(
        &dl(dev, &z2)?,
        c.r_off,
        &want_y,
        sentinel::<T>(),
        "forward_maskless_inplace residual",
    )?;

    // backward from the reference mask, and mask-free, out of place and in place
    let md = ok(
        padded(dev, c.m_off, Some(&want_mask), words, MASK_SENTINEL),
        "upload",
    )?;
    let mv = md.slice(c.m_off..c.m_off + words);
    let ws_len = op.workspace_len(rows) + c.ws_extra;
    let db_sentinel = sentinel::<T>();
    for variant in 0..4 {
        let mut ws = ok(dev.upload(&vec![f32::NAN; ws_len]), "alloc")?;
        let mut db = ok(padded(dev, c.b_off, None, h, db_sentinel), "alloc")?;
        let mut dbv = db.slice_mut(c.b_off..c.b_off + h);
        let grad = c.bias.then_some(BiasGrad {
            dbias: &mut dbv,
            workspace: &mut ws,
        });
        let what = [
            "backward",
            "backward_maskless",
            "backward_inplace",
            "backward_maskless_inplace",
        ][variant];
        let dx_host = if variant < 2 {
            let mut dx = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
            let mut dxv = dx.slice_mut(c.y_off..c.y_off + n);
            if variant == 0 {
                ok(op.backward(s, &mv, &dyv, &mut dxv, grad), what)?;
            } else {
                ok(op.backward_maskless(s, c.state, &dyv, &mut dxv, grad), what)?;
            }
            (dl(dev, &dx)?, c.y_off)
        } else {
            let mut g = ok(padded(dev, c.x_off, Some(&dy), n, sentinel::<T>()), "upload")?;
            let mut gv = g.slice_mut(c.x_off..c.x_off + n);
            if variant == 2 {
                ok(op.backward_inplace(s, &mv, &mut gv, grad), what)?;
            } else {
                ok(op.backward_maskless_inplace(s, c.state, &mut gv, grad), what)?;
            }
            (dl(dev, &g)?, c.x_off)
        };
        expect_region_nan(
            &dx_host.0,
            dx_host.1,
            &want_grads.dx,
            sentinel::<T>(),
            &format!("{what} dx"),
        )?;
        let db_host = dl(dev, &db)?;
        match &want_grads.dbias {
            Some(want) => expect_region_nan(&db_host, c.b_off, want, db_sentinel, &format!("{what} dbias"))?,
            None => expect_region_nan(
                &db_host,
                c.b_off,
                &vec![db_sentinel; h],
                db_sentinel,
                "dbias untouched",
            )?,
        }
    }
    Ok(())
}

fn run_property<T: Bits>(test: &str) {
    run_cases(test, 24, case(), |dev, c| check_case::<T>(dev, &c));
}

#[test]
fn gpu_matches_reference_f32() {
    run_property::<f32>("gpu_matches_reference_f32");
}

#[test]
fn gpu_matches_reference_f16() {
    run_property::<f16>("gpu_matches_reference_f16");
}

#[test]
fn gpu_matches_reference_bf16() {
    run_property::<bf16>("gpu_matches_reference_bf16");
}

/// Fixed edge cases: every row length 1..=40 with a few row counts (incl. several 256-row
/// chunks), p in {0, 1, random, 0.99999}, bias on and off, misaligned and aligned, every dtype.
#[test]
fn gpu_matches_reference_edge_shapes() {
    let Some(dev) = gpu("gpu_matches_reference_edge_shapes") else {
        return;
    };
    for h in 1..=40usize {
        let c = Case {
            rows: [1, 7, 300, 513][h % 4],
            h,
            p: [0.0, 1.0, 0.37, 0.99999][(h / 4) % 4],
            state: PhiloxState::new(h as u64 * 7919, h as u64),
            element_offset: (h % 5) as u64,
            bias: h % 3 != 0,
            x_off: h % 2,
            r_off: 0,
            b_off: (h / 2) % 3,
            y_off: (h / 3) % 2,
            m_off: h % 3,
            ws_extra: h % 4,
            data_seed: h as u64,
        };
        check_case::<f32>(&dev, &c).unwrap();
        check_case::<f16>(&dev, &c).unwrap();
        check_case::<bf16>(&dev, &c).unwrap();
    }
}

/// The benchmark's row length with many chunks (and a column tile that is not a power of 2 of
/// vectors): bf16 4096 x 1025 rows and f32 4104 x 700 rows, aligned, bias on.
#[test]
fn gpu_matches_reference_wide_rows() {
    let Some(dev) = gpu("gpu_matches_reference_wide_rows") else {
        return;
    };
    for (h, rows) in [(4096usize, 1025usize), (4104, 700), (12_288, 40)] {
        let c = Case {
            rows,
            h,
            p: 0.1,
            state: PhiloxState::new(42, 7),
            element_offset: 0,
            bias: true,
            x_off: 0,
            r_off: 0,
            b_off: 0,
            y_off: 0,
            m_off: 0,
            ws_extra: 0,
            data_seed: 99,
        };
        check_case::<bf16>(&dev, &c).unwrap();
        check_case::<f32>(&dev, &c).unwrap();
    }
}

/// Bad arguments are rejected with the right name and nothing is written.
#[test]
fn gpu_invalid_arguments_write_nothing() {
    let Some(dev) = gpu("gpu_invalid_arguments_write_nothing") else {
        return;
    };
    let s = dev.stream();
    let (rows, h) = (10usize, 16usize);
    let n = rows * h;
    let op = BiasDropoutResidual::new(0.5, h).unwrap();
    let st = PhiloxState::new(1, 1);
    let x = dev.upload(&vec![1.0f32; n]).unwrap();
    let r = dev.upload(&vec![2.0f32; n]).unwrap();
    let b = dev.upload(&vec![0.5f32; h]).unwrap();
    let b_short = dev.upload(&vec![0.5f32; h - 1]).unwrap();
    let fill = vec![7.0f32; n];
    let mut y = dev.upload(&fill).unwrap();
    let mut short = dev.upload(&fill[..n - 1]).unwrap();
    let mut m = dev.upload(&vec![MASK_SENTINEL; mask_words(n)]).unwrap();
    let mut m_long = dev.upload(&vec![MASK_SENTINEL; mask_words(n) + 1]).unwrap();
    let mut db = dev.upload(&vec![7.0f32; h]).unwrap();
    let mut db_short = dev.upload(&vec![7.0f32; h - 1]).unwrap();
    let mut ws = dev.upload(&vec![7.0f32; op.workspace_len(rows)]).unwrap();
    let mut ws_short = dev.upload(&vec![7.0f32; op.workspace_len(rows) - 1]).unwrap();
    let arg = |e: dropfuse::Error| {
        e.argument()
            .unwrap_or_else(|| panic!("not InvalidArgument: {e:?}"))
    };

    assert_eq!(arg(BiasDropoutResidual::new(0.5, 0).unwrap_err()), "row_len");
    assert_eq!(
        arg(BiasDropoutResidual::new(0.5, (1 << 31) + 1).unwrap_err()),
        "row_len"
    );
    assert_eq!(arg(BiasDropoutResidual::new(1.5, 4).unwrap_err()), "p");
    let op7 = BiasDropoutResidual::new(0.5, 7).unwrap();
    assert_eq!(
        arg(op7.forward(s, st, &x, &r, None, &mut y, &mut m).unwrap_err()),
        "x"
    );
    assert_eq!(
        arg(op
            .forward(s, st, &x.slice(0..0), &r, None, &mut y, &mut m)
            .unwrap_err()),
        "x"
    );
    assert_eq!(
        arg(op
            .forward(s, st, &x, &r.slice(0..n - h), None, &mut y, &mut m)
            .unwrap_err()),
        "residual"
    );
    assert_eq!(
        arg(op.forward(s, st, &x, &r, None, &mut short, &mut m).unwrap_err()),
        "y"
    );
    assert_eq!(
        arg(op
            .forward(s, st, &x, &r, Some(&b_short), &mut y, &mut m)
            .unwrap_err()),
        "bias"
    );
    assert_eq!(
        arg(op
            .forward(s, st, &x, &r, Some(&b), &mut y, &mut m_long)
            .unwrap_err()),
        "mask"
    );
    let far = op.with_element_offset(u64::MAX - 50);
    assert_eq!(
        arg(far.forward(s, st, &x, &r, Some(&b), &mut y, &mut m).unwrap_err()),
        "element_offset"
    );
    assert_eq!(
        arg(op
            .forward_inplace(s, st, &x, Some(&b), &mut short, &mut m)
            .unwrap_err()),
        "residual"
    );
    assert_eq!(
        arg(op.backward(s, &m_long, &x, &mut y, None).unwrap_err()),
        "mask"
    );
    assert_eq!(arg(op.backward(s, &m, &x, &mut short, None).unwrap_err()), "dx");
    assert_eq!(
        arg(op7.backward_maskless(s, st, &x, &mut y, None).unwrap_err()),
        "dy"
    );
    let g = BiasGrad {
        dbias: &mut db_short,
        workspace: &mut ws,
    };
    assert_eq!(arg(op.backward(s, &m, &x, &mut y, Some(g)).unwrap_err()), "dbias");
    let g = BiasGrad {
        dbias: &mut db,
        workspace: &mut ws_short,
    };
    assert_eq!(
        arg(op.backward_maskless(s, st, &x, &mut y, Some(g)).unwrap_err()),
        "workspace"
    );

    // Memory of another context.
    let other = CudaContext::new_non_primary(0, 0).unwrap();
    let other_stream = other.default_stream();
    let b_other = other_stream.clone_htod(&vec![1.0f32; h]).unwrap();
    let mut ws_other = other_stream
        .clone_htod(&vec![7.0f32; op.workspace_len(rows)])
        .unwrap();
    dev.context().bind_to_thread().unwrap();
    assert_eq!(
        arg(op
            .forward(s, st, &x, &r, Some(&b_other), &mut y, &mut m)
            .unwrap_err()),
        "bias"
    );
    let g = BiasGrad {
        dbias: &mut db,
        workspace: &mut ws_other,
    };
    assert_eq!(
        arg(op.backward(s, &m, &x, &mut y, Some(g)).unwrap_err()),
        "workspace"
    );

    assert_eq!(dev.download(&y).unwrap(), fill, "y written despite the error");
    assert_eq!(
        dev.download(&short).unwrap(),
        fill[..n - 1],
        "short written despite the error"
    );
    assert!(dev.download(&m).unwrap().iter().all(|&w| w == MASK_SENTINEL));
    assert!(dev.download(&m_long).unwrap().iter().all(|&w| w == MASK_SENTINEL));
    assert!(dev.download(&db).unwrap().iter().all(|&v| v == 7.0));
    assert!(dev.download(&ws).unwrap().iter().all(|&v| v == 7.0));
}

/// bf16, 2^20 + 1 rows of 4096 (2^32 + 4096 elements): 64-bit indexing end to end. Forward with
/// a mask and bias, then backward from that mask with dbias (dy = x). The whole mask is checked
/// against Philox (on all host cores), every y and dx element against the mask, every dbias
/// element against the fixed-order chunked sum.
#[test]
fn gpu_huge_tensor_over_2_pow_32() {
    let test = "gpu_huge_tensor_over_2_pow_32";
    let Some(dev) = gpu(test) else {
        return;
    };
    let h: usize = 4096;
    let rows: usize = (1 << 20) + 1;
    let n = rows * h;
    let (free, _) = dev.context().mem_get_info().unwrap();
    let need = 3 * n * 2 + mask_words(n) * 4 + (1 << 30);
    if free < need {
        common::skip(test, &format!("needs {need} bytes of GPU memory, {free} free"));
        return;
    }
    let s = dev.stream();
    let p = 0.3;
    let op = BiasDropoutResidual::new(p, h).unwrap();
    let state = PhiloxState::new(0x0123_4567_89ab_cdef, 99);
    // x[i] = px[i % P], r[i] = pr[i % P]; P is a multiple of h, so columns line up.
    const P: usize = 1 << 24;
    let px: Vec<bf16> = (0..P)
        .map(|i| bf16::from_f32(((i % 2039) as f32 - 1019.0) / 64.0))
        .collect();
    let pr: Vec<bf16> = (0..P)
        .map(|i| bf16::from_f32(((i % 1021) as f32 - 510.0) / 16.0))
        .collect();
    let bh: Vec<bf16> = (0..h)
        .map(|j| bf16::from_f32((j % 97) as f32 / 32.0 - 1.5))
        .collect();
    let fill = |pat: &[bf16]| {
        let mut d = dev.zeros::<bf16>(n).unwrap();
        let mut at = 0;
        while at < n {
            let len = P.min(n - at);
            s.memcpy_htod(&pat[..len], &mut d.slice_mut(at..at + len))
                .unwrap();
            at += len;
        }
        d
    };
    let x = fill(&px);
    let mut y = fill(&pr);
    let b = dev.upload(&bh).unwrap();
    let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
    op.forward_inplace(s, state, &x, Some(&b), &mut y, &mut m)
        .unwrap();
    let mask = dev.download(&m).unwrap();
    let yh = dev.download(&y).unwrap();
    // backward from the mask into y's buffer, dy = x
    let mut db = dev.zeros::<bf16>(h).unwrap();
    let mut ws = dev.zeros::<f32>(op.workspace_len(rows)).unwrap();
    op.backward(
        s,
        &m,
        &x,
        &mut y,
        Some(BiasGrad {
            dbias: &mut db,
            workspace: &mut ws,
        }),
    )
    .unwrap();
    let dxh = dev.download(&y).unwrap();
    let dbh = dev.download(&db).unwrap();
    drop((x, y, m, ws));

    let threshold = dropfuse::reference::dropout::drop_threshold(p).unwrap();
    let scale = op.dropout().scale();
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(4);
    let per = mask.len().div_ceil(threads);
    let key = [state.seed as u32, (state.seed >> 32) as u32];
    let kept: usize = std::thread::scope(|sc| {
        let handles: Vec<_> = mask
            .chunks(per)
            .enumerate()
            .map(|(t, part)| {
                let (yh, dxh, px, pr, bh) = (&yh, &dxh, &px, &pr, &bh);
                sc.spawn(move || {
                    let mut kept = 0usize;
                    for (k, &got) in part.iter().enumerate() {
                        let w = t * per + k;
                        let mut want = 0u32;
                        for q in 0..8 {
                            let blk = (w * 8 + q) as u64;
                            let words = philox4x32_10(
                                [
                                    blk as u32,
                                    (blk >> 32) as u32,
                                    state.offset as u32,
                                    (state.offset >> 32) as u32,
                                ],
                                key,
                            );
                            for (e, &word) in words.iter().enumerate() {
                                let j = 4 * q + e;
                                if w * 32 + j < n && u64::from(word) >= threshold {
                                    want |= 1 << j;
                                }
                            }
                        }
                        assert_eq!(got, want, "mask word {w}");
                        kept += want.count_ones() as usize;
                        for j in 0..32 {
                            let i = w * 32 + j;
                            if i >= n {
                                break;
                            }
                            let keep = (want >> j) & 1 == 1;
                            let xv = px[i % P].to_f32();
                            let t = xv + bh[i % h].to_f32();
                            let u = if keep { scale * t } else { 0.0 };
                            let yw = bf16::from_f32(pr[i % P].to_f32() + u);
                            assert_eq!(yh[i].to_bits(), yw.to_bits(), "y[{i}]");
                            let dxw = bf16::from_f32(if keep { scale * xv } else { 0.0 });
                            assert_eq!(dxh[i].to_bits(), dxw.to_bits(), "dx[{i}]");
                        }
                    }
                    kept
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let rate = kept as f64 / n as f64;
    let sigma = (p * (1.0 - p) / n as f64).sqrt();
    assert!((rate - (1.0 - p)).abs() < 6.0 * sigma, "keep rate {rate}");

    // dbias: the chunked sum of the terms (dx before rounding), columns split over threads.
    let cols_per = h.div_ceil(threads);
    std::thread::scope(|sc| {
        for t in 0..threads {
            let (mask, px, dbh) = (&mask, &px, &dbh);
            sc.spawn(move || {
                let (lo, hi) = (t * cols_per, ((t + 1) * cols_per).min(h));
                for (j, got) in dbh.iter().enumerate().take(hi).skip(lo) {
                    let mut total = 0.0f32;
                    for c in 0..rows.div_ceil(DBIAS_CHUNK) {
                        let mut acc = 0.0f32;
                        for r in c * DBIAS_CHUNK..rows.min((c + 1) * DBIAS_CHUNK) {
                            let i = r * h + j;
                            if (mask[i / 32] >> (i % 32)) & 1 == 1 {
                                acc += scale * px[i % P].to_f32();
                            }
                        }
                        total += acc;
                    }
                    assert_eq!(got.to_bits(), bf16::from_f32(total).to_bits(), "dbias[{j}]");
                }
            });
        }
    });
}

/// Runs without a GPU: the configuration's validation, derived values and workspace size.
#[test]
fn config_validation_and_workspace_len_without_a_gpu() {
    let arg = |e: dropfuse::Error| {
        e.argument()
            .unwrap_or_else(|| panic!("not InvalidArgument: {e:?}"))
    };
    assert_eq!(arg(BiasDropoutResidual::new(0.1, 0).unwrap_err()), "row_len");
    assert_eq!(
        arg(BiasDropoutResidual::new(0.1, (1 << 31) + 1).unwrap_err()),
        "row_len"
    );
    assert_eq!(arg(BiasDropoutResidual::new(f64::NAN, 8).unwrap_err()), "p");
    assert_eq!(arg(BiasDropoutResidual::new(-0.5, 8).unwrap_err()), "p");
    let op = BiasDropoutResidual::new(0.25, 4096)
        .unwrap()
        .with_element_offset(12);
    assert_eq!(op.row_len(), 4096);
    assert_eq!(op.dropout().element_offset(), 12);
    let want = dropfuse::reference::dropout::drop_threshold(0.25).unwrap();
    assert_eq!(op.dropout().threshold(), want);
    assert_eq!(
        op.dropout().scale(),
        dropfuse::reference::dropout::keep_scale(0.25).unwrap()
    );
    assert_eq!(DBIAS_CHUNK, reference::D_BIAS_CHUNK);
    assert_eq!(op.workspace_len(1), 4096);
    assert_eq!(op.workspace_len(256), 4096);
    assert_eq!(op.workspace_len(257), 2 * 4096);
    assert_eq!(op.workspace_len(65_536), 256 * 4096);
    assert_eq!(
        BiasDropoutResidual::new(0.0, 1 << 31)
            .unwrap()
            .workspace_len(usize::MAX),
        usize::MAX,
        "saturates instead of overflowing"
    );
}
