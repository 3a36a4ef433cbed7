//! GPU attention importance vs the f64 CPU reference, within the documented f32 bounds: per-token
//! similarities and per-layer sums (counts exact) over dtypes, row lengths (multiples of 8 and
//! not, rows over 2^16 elements), row magnitudes from 2^-130 to 2^125 (f32 squares that underflow
//! or overflow), misaligned views, padding masks, zero rows, several batches and
//! layers accumulated without host reads, determinism, the hand-over to the host plan, invalid
//! arguments. Without a GPU every test prints a SKIPPED line and returns.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::{splitmix, sprinkled, unit};
use common::guard::upload_at;
use common::{gpu, ok, run_cases};
use dropfuse::cudarc::driver::{CudaContext, DevicePtr};
use dropfuse::importance::ImportanceAccumulator;
use dropfuse::layer_plan::{AttentionDropPlan, SimilarityAccumulator};
use dropfuse::reference::importance as reference;
use dropfuse::{Device, Element};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Hidden-state-like values: uniform in [-4, 4), some exact zeros.
fn values<T: Element>(n: usize, seed: u64) -> Vec<T> {
    sprinkled(n, seed, 4.0, 16, &[0.0])
}

/// An output correlated with the input (similarity near 1, the interesting regime): `a + noise`.
fn correlated<T: Element>(a: &[T], seed: u64, noise: f32) -> Vec<T> {
    let mut s = seed;
    a.iter()
        .map(|x| T::from_f32(x.to_f32() + noise * (unit(&mut s) - 0.5)))
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    tokens: usize,
    hidden: usize,
    /// Element offsets of the views (break 16-byte alignment).
    a_off: usize,
    b_off: usize,
    /// Padding percentage (0: no mask at all).
    pad: u64,
    /// 0: independent rows, 1: correlated, 2: some zero rows.
    kind: u8,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let hidden = prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 7, 8, 9, 16, 31, 64, 100, 255, 256, 1000, 4096, 4100]),
        2 => 1usize..=2000,
    ];
    let tokens = prop_oneof![3 => 1usize..=70, 1 => 64usize..=700];
    (
        hidden,
        tokens,
        0usize..9,
        0usize..9,
        prop_oneof![Just(0u64), 1u64..100],
        0u8..3,
        any::<u64>(),
    )
        .prop_map(|(hidden, tokens, a_off, b_off, pad, kind, seed)| Case {
            tokens: tokens.min((1 << 20) / hidden).max(1),
            hidden,
            a_off,
            b_off,
            pad,
            kind,
            seed,
        })
}

fn inputs<T: Element>(c: &Case) -> (Vec<T>, Vec<T>, Option<Vec<bool>>) {
    let n = c.tokens * c.hidden;
    let a = values::<T>(n, c.seed);
    let mut b = match c.kind {
        1 => correlated(&a, c.seed ^ 7, 0.3),
        _ => values::<T>(n, c.seed ^ 7),
    };
    let mut a = a;
    if c.kind == 2 {
        for t in (0..c.tokens).filter(|t| t % 3 == 0) {
            a[t * c.hidden..(t + 1) * c.hidden].fill(T::from_f32(0.0));
        }
        for t in (0..c.tokens).filter(|t| t % 5 == 0) {
            b[t * c.hidden..(t + 1) * c.hidden].fill(T::from_f32(-0.0));
        }
    }
    let mask = (c.pad > 0).then(|| {
        let mut s = c.seed ^ 99;
        (0..c.tokens).map(|_| splitmix(&mut s) % 100 >= c.pad).collect()
    });
    (a, b, mask)
}

fn check_case<T: Element>(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let (tokens, h) = (c.tokens, c.hidden);
    let (a, b, mask) = inputs::<T>(c);
    let want = ok(
        reference::token_similarities(&a, &b, h, mask.as_deref()),
        "reference",
    )?;
    let (want_sum, want_count) = ok(
        reference::batch_similarity(&a, &b, h, mask.as_deref()),
        "reference",
    )?;

    let ad = upload_at(dev, c.a_off, &a, T::from_f32(f32::NAN), 3)?;
    let bd = upload_at(dev, c.b_off, &b, T::from_f32(f32::NAN), 3)?;
    let av = ad.slice(c.a_off..c.a_off + a.len());
    let bv = bd.slice(c.b_off..c.b_off + b.len());
    let md = match &mask {
        Some(m) => Some(ok(
            dev.upload(&m.iter().map(|&v| v as u8 * 7).collect::<Vec<u8>>()),
            "upload",
        )?),
        None => None,
    };
    let mv: Option<&dyn DevicePtr<u8>> = md.as_ref().map(|m| m as &dyn DevicePtr<u8>);
    // Three guard entries after the similarities: nothing may be written there.
    let mut sims = ok(dev.upload(&vec![-7.0f32; tokens + 3]), "upload")?;

    // Layer 1 gets the batch twice (once with per-token output), layer 0 once, layer 2 nothing.
    let mut acc = ok(ImportanceAccumulator::new(dev, 3), "new")?;
    ok(
        acc.add_with_similarities(1, h, &av, &bv, mv, &mut sims.slice_mut(..tokens)),
        "add_with_similarities",
    )?;
    ok(acc.add(0, h, &av, &bv, mv), "add")?;
    ok(acc.add(1, h, &av, &bv, mv), "add")?;
    let (sums, counts) = ok(acc.download(), "download")?;
    let mut got = ok(dev.download(&sims), "download")?;
    prop_assert!(
        got[tokens..].iter().all(|&v| v == -7.0),
        "similarity guards written"
    );
    got.truncate(tokens);

    let tol = reference::f32_token_tolerance(h);
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        match w {
            None => prop_assert!(g.is_nan(), "token {t}: padding must be NaN, got {g}"),
            Some(w) => {
                let err = (f64::from(*g) - w).abs();
                prop_assert!(err <= tol, "token {t}: gpu {g} vs reference {w}: {err} > {tol}");
                let zero_row = |v: &[T]| v[t * h..(t + 1) * h].iter().all(|x| x.to_f32() == 0.0);
                if zero_row(&a) || zero_row(&b) {
                    prop_assert_eq!(*g, 0.0, "token {}: a zero row's similarity is exactly 0", t);
                }
            }
        }
    }
    prop_assert_eq!(counts.clone(), vec![want_count, 2 * want_count, 0]);
    let stol = reference::f32_sum_tolerance(want_count, h);
    prop_assert!(
        (sums[0] - want_sum).abs() <= stol,
        "sum {} vs {}",
        sums[0],
        want_sum
    );
    // Deterministic: the second identical batch adds exactly the same value.
    prop_assert_eq!(sums[1].to_bits(), (sums[0] + sums[0]).to_bits());
    prop_assert_eq!(sums[2].to_bits(), 0.0f64.to_bits());

    // Hand-over to the host plan: what the reference accumulation gives, within the bound.
    let host = ok(acc.to_similarity_accumulator(), "to_similarity_accumulator")?;
    let mut want_acc = SimilarityAccumulator::new(3).unwrap();
    for layer in [1, 0, 1] {
        ok(
            reference::accumulate(&mut want_acc, layer, &a, &b, h, mask.as_deref()),
            "accumulate",
        )?;
    }
    prop_assert_eq!(host.tokens(), want_acc.tokens());
    for l in 0..3 {
        prop_assert!((host.sums()[l] - want_acc.sums()[l]).abs() <= 2.0 * stol);
    }
    Ok(())
}

fn run_property<T: Element>(test: &str) {
    run_cases(test, 24, case(), |dev, c| check_case::<T>(dev, &c));
}

#[test]
fn gpu_within_bounds_f32() {
    run_property::<f32>("gpu_within_bounds_f32");
}

#[test]
fn gpu_within_bounds_f16() {
    run_property::<f16>("gpu_within_bounds_f16");
}

#[test]
fn gpu_within_bounds_bf16() {
    run_property::<bf16>("gpu_within_bounds_bf16");
}

/// Fixed edge cases: every hidden size 1..=40 (misaligned half the time), zero rows, padding.
#[test]
fn gpu_edge_shapes() {
    let Some(dev) = gpu("gpu_edge_shapes") else { return };
    for hidden in 1..=40usize {
        let c = Case {
            tokens: [1, 63, 64, 65, 130][hidden % 5],
            hidden,
            a_off: hidden % 2,
            b_off: (hidden / 2) % 3,
            pad: [0, 30][hidden % 2],
            kind: (hidden % 3) as u8,
            seed: hidden as u64,
        };
        check_case::<f32>(&dev, &c).unwrap();
        check_case::<f16>(&dev, &c).unwrap();
        check_case::<bf16>(&dev, &c).unwrap();
    }
}

/// Rows over 2^16 elements, and the benchmark's hidden size with a whole number of tiles.
#[test]
fn gpu_long_rows() {
    let Some(dev) = gpu("gpu_long_rows") else { return };
    for (tokens, hidden, kind) in [(3usize, 70_001usize, 1u8), (5, 65_536, 0), (256, 4096, 1)] {
        let c = Case {
            tokens,
            hidden,
            a_off: 0,
            b_off: 0,
            pad: 0,
            kind,
            seed: hidden as u64,
        };
        check_case::<bf16>(&dev, &c).unwrap();
        check_case::<f32>(&dev, &c).unwrap();
    }
}

/// More tiles than the grid has blocks (the tile loop wraps: 16 waves of at most 8 blocks per SM
/// on 132 SMs is below 18750 tiles) and more than the finalize kernel's 256 threads.
#[test]
fn gpu_more_tiles_than_blocks() {
    let Some(dev) = gpu("gpu_more_tiles_than_blocks") else {
        return;
    };
    for (tokens, hidden, pad) in [(1_200_000usize, 2usize, 0u64), (20_000, 8, 20)] {
        let c = Case {
            tokens,
            hidden,
            a_off: 0,
            b_off: 1,
            pad,
            kind: 1,
            seed: tokens as u64,
        };
        check_case::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// Rows of every magnitude a bf16 / f32 hidden state can hold: each row of the input and of the
/// output scaled by its own power of two, from 2^-130 (squares and products in f32's subnormals or
/// below) to 2^125 (squares far beyond f32's range: rows whose sum of squares passes 2^120 are
/// summed again scaled by 2^-90). Every similarity within the documented bound of the f64
/// reference, which an f32 sum of squares alone misses (0 or NaN) from about 2^60 / sqrt(H) on.
/// 2^-30, 2^-27 and 2^-24 give norms from about 1e-9 to 1e-6 for every H drawn, on both sides of
/// the eps clamp (1e-8): an eps of 1e-6 or 1e-9 passed every other test.
fn check_magnitudes<T: Element>(dev: &Device, tokens: usize, h: usize, seed: u64) {
    const EXPS: [i32; 13] = [0, 0, -130, -100, -60, -30, -27, -24, 40, 58, 62, 100, 125];
    let mut s = seed;
    let (mut a, mut b) = (Vec::with_capacity(tokens * h), Vec::with_capacity(tokens * h));
    for t in 0..tokens {
        let ea = EXPS[(splitmix(&mut s) % EXPS.len() as u64) as usize];
        let eb = if t % 3 == 0 {
            EXPS[(splitmix(&mut s) % EXPS.len() as u64) as usize]
        } else {
            ea
        };
        let (sa, sb) = (2f64.powi(ea), 2f64.powi(eb));
        for _ in 0..h {
            let x = unit(&mut s) * 8.0 - 4.0;
            let y = if t % 2 == 0 {
                x + 0.3 * (unit(&mut s) - 0.5)
            } else {
                unit(&mut s) * 8.0 - 4.0
            };
            a.push(T::from_f32((f64::from(x) * sa) as f32));
            b.push(T::from_f32((f64::from(y) * sb) as f32));
        }
    }
    let want = reference::token_similarities(&a, &b, h, None).unwrap();
    let (want_sum, _) = reference::batch_similarity(&a, &b, h, None).unwrap();
    let ad = dev.upload(&a).unwrap();
    let bd = dev.upload(&b).unwrap();
    let mut sims = dev.upload(&vec![-7.0f32; tokens]).unwrap();
    let mut acc = ImportanceAccumulator::new(dev, 1).unwrap();
    acc.add_with_similarities(0, h, &ad, &bd, None, &mut sims)
        .unwrap();
    let got = dev.download(&sims).unwrap();
    let tol = reference::f32_token_tolerance(h);
    for (t, (&g, w)) in got.iter().zip(&want).enumerate() {
        let w = w.unwrap();
        assert!(
            (f64::from(g) - w).abs() <= tol,
            "{} H {h} token {t}: gpu {g} vs reference {w}",
            T::DTYPE
        );
    }
    let (sums, counts) = acc.download().unwrap();
    assert_eq!(counts, vec![tokens as u64]);
    assert!((sums[0] - want_sum).abs() <= reference::f32_sum_tolerance(tokens as u64, h));
}

#[test]
fn gpu_large_and_tiny_magnitudes() {
    let Some(dev) = gpu("gpu_large_and_tiny_magnitudes") else {
        return;
    };
    for (i, h) in [1usize, 4, 25, 256, 343, 4096].into_iter().enumerate() {
        check_magnitudes::<f32>(&dev, 200, h, 1 + i as u64);
        check_magnitudes::<bf16>(&dev, 200, h, 11 + i as u64);
    }
}

/// Hidden states of more than 2^32 elements (65540 tokens x 65536, bf16, 8.6 GB each): the rows
/// beyond element 2^32 are read where they are (zero rows everywhere else, similarity 0).
#[test]
fn gpu_importance_huge_rows_beyond_2_pow_32() {
    let test = "gpu_importance_huge_rows_beyond_2_pow_32";
    let Some(dev) = gpu(test) else { return };
    let (tokens, h) = (65_540usize, 65_536usize);
    let numel = tokens * h;
    assert!(numel > 1 << 32);
    let (free, _) = dev.context().mem_get_info().unwrap();
    let need = numel * 4 + (1 << 30);
    if free < need {
        common::skip(test, &format!("needs {need} bytes of GPU memory, {free} free"));
        return;
    }
    let s = dev.stream();
    let mut a = dev.zeros::<bf16>(numel).unwrap();
    let mut b = dev.zeros::<bf16>(numel).unwrap();
    let rows = [1usize, 65_535, 65_536, 65_539];
    let mut host_rows = Vec::new();
    for (i, &t) in rows.iter().enumerate() {
        let x = values::<bf16>(h, 10 + i as u64);
        let y = correlated(&x, 20 + i as u64, 1.0 + i as f32);
        s.memcpy_htod(&x, &mut a.slice_mut(t * h..(t + 1) * h)).unwrap();
        s.memcpy_htod(&y, &mut b.slice_mut(t * h..(t + 1) * h)).unwrap();
        host_rows.push(reference::cosine(&x, &y));
    }
    let mut sims = dev.upload(&vec![-7.0f32; tokens]).unwrap();
    let mut acc = ImportanceAccumulator::new(&dev, 1).unwrap();
    acc.add_with_similarities(0, h, &a, &b, None, &mut sims).unwrap();
    let got = dev.download(&sims).unwrap();
    let tol = reference::f32_token_tolerance(h);
    for (t, &g) in got.iter().enumerate() {
        match rows.iter().position(|&r| r == t) {
            Some(i) => assert!(
                (f64::from(g) - host_rows[i]).abs() <= tol,
                "token {t}: {g} vs {}",
                host_rows[i]
            ),
            None => assert_eq!(g, 0.0, "token {t}: a zero row"),
        }
    }
    let (sums, counts) = acc.download().unwrap();
    assert_eq!(counts, vec![tokens as u64]);
    let want: f64 = host_rows.iter().sum();
    assert!((sums[0] - want).abs() <= reference::f32_sum_tolerance(tokens as u64, h));
}

/// Every token padding: nothing is counted, and the host hand-over skips the layer.
#[test]
fn gpu_all_padding_adds_nothing() {
    let Some(dev) = gpu("gpu_all_padding_adds_nothing") else {
        return;
    };
    let (tokens, h) = (100usize, 64usize);
    let a = dev.upload(&values::<bf16>(tokens * h, 1)).unwrap();
    let mask = dev.upload(&vec![0u8; tokens]).unwrap();
    let mut acc = ImportanceAccumulator::new(&dev, 2).unwrap();
    acc.add(0, h, &a, &a, Some(&mask)).unwrap();
    acc.add(1, h, &a, &a, None).unwrap();
    let (sums, counts) = acc.download().unwrap();
    assert_eq!(counts, vec![0, tokens as u64]);
    assert_eq!(sums[0].to_bits(), 0.0f64.to_bits());
    assert!((sums[1] - tokens as f64).abs() <= reference::f32_sum_tolerance(tokens as u64, h));
    let host = acc.to_similarity_accumulator().unwrap();
    assert_eq!(host.tokens(), &[0, tokens as u64]);
    assert_eq!(host.mean(0), None);
    let imp = acc.importance().unwrap();
    assert_eq!(imp[0], None);
    assert!(imp[1].unwrap().abs() < 1e-5);
    acc.reset().unwrap();
    assert_eq!(acc.download().unwrap(), (vec![0.0, 0.0], vec![0, 0]));
}

/// Three layers of known redundancy accumulated over batches of growing size (the scratch grows),
/// then the drop plan: the identity layer is dropped first.
#[test]
fn gpu_drop_plan_from_the_device_accumulator() {
    let Some(dev) = gpu("gpu_drop_plan_from_the_device_accumulator") else {
        return;
    };
    let h = 512;
    let mut acc = ImportanceAccumulator::new(&dev, 3).unwrap();
    for (batch, tokens) in [10usize, 1000, 300].into_iter().enumerate() {
        let x = values::<bf16>(tokens * h, batch as u64);
        let outs = [
            values::<bf16>(tokens * h, 100 + batch as u64),
            x.clone(),
            correlated(&x, 200 + batch as u64, 0.5),
        ];
        let xd = dev.upload(&x).unwrap();
        for (layer, out) in outs.iter().enumerate() {
            let od = dev.upload(out).unwrap();
            acc.add(layer, h, &xd, &od, None).unwrap();
        }
    }
    let sims = acc.to_similarity_accumulator().unwrap();
    assert_eq!(sims.tokens(), &[1310, 1310, 1310]);
    let plan = AttentionDropPlan::from_accumulator(&sims, 2).unwrap();
    assert_eq!(plan.drop_order()[..2], [1, 2]);
    assert_eq!(plan.kept(), &[0]);
    assert!(plan.importance()[1].abs() <= reference::f32_token_tolerance(h));
}

/// Bad arguments are rejected with the right name and nothing changes.
#[test]
fn gpu_invalid_arguments_change_nothing() {
    let Some(dev) = gpu("gpu_invalid_arguments_change_nothing") else {
        return;
    };
    let (tokens, h) = (10usize, 16usize);
    let a = dev.upload(&values::<f32>(tokens * h, 3)).unwrap();
    let mask = dev.upload(&vec![1u8; tokens]).unwrap();
    let short_mask = dev.upload(&vec![1u8; tokens - 1]).unwrap();
    let mut sims = dev.upload(&vec![5.0f32; tokens]).unwrap();
    let mut short_sims = dev.upload(&vec![5.0f32; tokens + 1]).unwrap();
    // layers * 8 bytes wraps (cudarc does not check): an 8-byte buffer for 2^61 + 1 layers.
    match ImportanceAccumulator::new(&dev, (1 << 61) + 1) {
        Err(dropfuse::Error::InvalidArgument { name, .. }) => assert_eq!(name, "layers"),
        other => panic!("expected a `layers` error, got {other:?}"),
    }
    let mut acc = ImportanceAccumulator::new(&dev, 2).unwrap();
    acc.add(0, h, &a, &a, None).unwrap();
    let before = acc.download().unwrap();
    let arg = |e: dropfuse::Error| {
        e.argument()
            .unwrap_or_else(|| panic!("not InvalidArgument: {e:?}"))
    };

    assert_eq!(arg(ImportanceAccumulator::new(&dev, 0).unwrap_err()), "layers");
    assert_eq!(arg(acc.add(2, h, &a, &a, None).unwrap_err()), "layer");
    assert_eq!(arg(acc.add(0, 0, &a, &a, None).unwrap_err()), "hidden");
    assert_eq!(arg(acc.add(0, 7, &a, &a, None).unwrap_err()), "input");
    assert_eq!(
        arg(acc.add(0, h, &a.slice(0..0), &a.slice(0..0), None).unwrap_err()),
        "input"
    );
    assert_eq!(
        arg(acc.add(0, h, &a, &a.slice(0..h * 9), None).unwrap_err()),
        "output"
    );
    assert_eq!(arg(acc.add(0, h, &a, &a, Some(&short_mask)).unwrap_err()), "mask");
    assert_eq!(
        arg(acc
            .add_with_similarities(0, h, &a, &a, Some(&mask), &mut short_sims)
            .unwrap_err()),
        "similarities"
    );
    let other = CudaContext::new_non_primary(0, 0).unwrap();
    let b_other = other
        .default_stream()
        .clone_htod(&values::<f32>(tokens * h, 4))
        .unwrap();
    dev.context().bind_to_thread().unwrap();
    assert_eq!(arg(acc.add(0, h, &a, &b_other, None).unwrap_err()), "output");
    let mut wrong = SimilarityAccumulator::new(3).unwrap();
    assert_eq!(arg(acc.add_to(&mut wrong).unwrap_err()), "accumulator");
    assert_eq!(wrong, SimilarityAccumulator::new(3).unwrap());

    assert_eq!(
        acc.download().unwrap(),
        before,
        "the accumulator changed despite the errors"
    );
    assert!(dev.download(&sims).unwrap().iter().all(|&v| v == 5.0));
    assert!(dev.download(&short_sims).unwrap().iter().all(|&v| v == 5.0));
    // A valid call still works afterwards.
    acc.add_with_similarities(1, h, &a, &a, Some(&mask), &mut sims)
        .unwrap();
    assert!(dev
        .download(&sims)
        .unwrap()
        .iter()
        .all(|&v| (v - 1.0).abs() <= 1e-5));
}
