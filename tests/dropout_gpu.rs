//! GPU vs CPU reference, bit for bit: masks and outputs of every dropout kernel, over random
//! lengths, probabilities, seeds, offsets, element offsets, misaligned views and all dtypes.
//! Without a GPU every test prints a SKIPPED line and returns.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::finite_values;
use common::guard::{dl, expect_region, padded, sentinel, Bits, MASK_SENTINEL};
use common::huge::{self, TWO_POW_32};
use common::{gpu, ok, run_cases};
use dropfuse::cudarc::driver::CudaContext;
use dropfuse::dropout::mask_words;
use dropfuse::reference::dropout as reference;
use dropfuse::{Device, DevicePhilox, Dropout, Error, PhiloxState};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    p: f64,
    state: PhiloxState,
    element_offset: u64,
    /// View offsets (elements / mask words) into larger buffers: they break 16-byte alignment.
    x_off: usize,
    y_off: usize,
    m_off: usize,
    data_seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let n = prop_oneof![
        3 => 1usize..=300,
        3 => 300usize..=8192,
        1 => 8192usize..=1_100_000,
        2 => prop::sample::select(vec![
            1usize, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025,
            2047, 2049, 8 * 1024 + 4, 65_536 * 3 + 17,
        ]),
    ];
    let p = prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(1e-9),
        Just(0.5),
        Just(0.999_999),
        0.0f64..=1.0,
        prop::sample::select(vec![0.1, 0.25, 0.9, 0.99999]),
    ];
    let element_offset = prop_oneof![
        Just(0u64),
        0u64..5000,
        any::<u64>(),
        (u64::MAX - 3_000_000)..=u64::MAX,
        // just below a multiple of 2^34: the launch crosses from one high Philox counter word
        // (block >> 32) to the next, leaving the kernels' fast path mid-launch
        (1u64..(1 << 30), 0u64..1_200_000).prop_map(|(k, d)| (k << 34) - d),
    ];
    (
        n,
        p,
        any::<u64>(),
        any::<u64>(),
        element_offset,
        0usize..9,
        0usize..9,
        0usize..3,
        any::<u64>(),
    )
        .prop_map(|(n, p, seed, offset, eo, x_off, y_off, m_off, data_seed)| Case {
            n,
            p,
            state: PhiloxState::new(seed, offset),
            // keep element_offset + n within u64
            element_offset: eo.min(u64::MAX - n as u64),
            x_off,
            y_off,
            m_off,
            data_seed,
        })
}

fn check_case<T: Bits>(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let n = c.n;
    let words = mask_words(n);
    let drop = ok(Dropout::new(c.p), "Dropout::new")?.with_element_offset(c.element_offset);
    let x = finite_values::<T>(n, c.data_seed);
    let (want_y, want_mask) = ok(
        reference::forward(&x, c.p, c.state, c.element_offset),
        "reference",
    )?;
    let want_dx = ok(reference::backward_from_mask(&x, &want_mask, c.p), "reference")?;

    let xd = ok(padded(dev, c.x_off, Some(&x), n, sentinel::<T>()), "upload")?;
    let xv = xd.slice(c.x_off..c.x_off + n);

    // forward with mask
    let mut y = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
    let mut m = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        drop.forward(
            s,
            c.state,
            &xv,
            &mut y.slice_mut(c.y_off..c.y_off + n),
            &mut m.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward",
    )?;
    expect_region(&dl(dev, &m)?, c.m_off, &want_mask, MASK_SENTINEL, "forward mask")?;
    expect_region(&dl(dev, &y)?, c.y_off, &want_y, sentinel::<T>(), "forward y")?;

    // mask only
    let mut m2 = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        drop.mask(s, c.state, n, &mut m2.slice_mut(c.m_off..c.m_off + words)),
        "mask",
    )?;
    expect_region(&dl(dev, &m2)?, c.m_off, &want_mask, MASK_SENTINEL, "mask only")?;

    // forward without mask
    let mut y2 = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
    ok(
        drop.forward_maskless(s, c.state, &xv, &mut y2.slice_mut(c.y_off..c.y_off + n)),
        "forward_maskless",
    )?;
    expect_region(
        &dl(dev, &y2)?,
        c.y_off,
        &want_y,
        sentinel::<T>(),
        "forward_maskless y",
    )?;

    // backward from the reference mask (dy = x), and mask-free
    let md = ok(
        padded(dev, c.m_off, Some(&want_mask), words, MASK_SENTINEL),
        "upload",
    )?;
    let mv = md.slice(c.m_off..c.m_off + words);
    let mut dx = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
    ok(
        drop.backward(s, &mv, &xv, &mut dx.slice_mut(c.y_off..c.y_off + n)),
        "backward",
    )?;
    expect_region(&dl(dev, &dx)?, c.y_off, &want_dx, sentinel::<T>(), "backward dx")?;
    let mut dx2 = ok(padded(dev, c.y_off, None, n, sentinel::<T>()), "alloc")?;
    ok(
        drop.backward_maskless(s, c.state, &xv, &mut dx2.slice_mut(c.y_off..c.y_off + n)),
        "backward_maskless",
    )?;
    let want_dx2 = ok(
        reference::backward(&x, c.p, c.state, c.element_offset),
        "reference",
    )?;
    expect_region(
        &dl(dev, &dx2)?,
        c.y_off,
        &want_dx2,
        sentinel::<T>(),
        "backward_maskless dx",
    )?;

    // in place: forward with mask, then backward from that mask, on the same buffer
    let mut z = ok(padded(dev, c.x_off, Some(&x), n, sentinel::<T>()), "upload")?;
    let mut m3 = ok(padded(dev, c.m_off, None, words, MASK_SENTINEL), "alloc")?;
    ok(
        drop.forward_inplace(
            s,
            c.state,
            &mut z.slice_mut(c.x_off..c.x_off + n),
            &mut m3.slice_mut(c.m_off..c.m_off + words),
        ),
        "forward_inplace",
    )?;
    expect_region(
        &dl(dev, &z)?,
        c.x_off,
        &want_y,
        sentinel::<T>(),
        "forward_inplace x",
    )?;
    expect_region(
        &dl(dev, &m3)?,
        c.m_off,
        &want_mask,
        MASK_SENTINEL,
        "forward_inplace mask",
    )?;
    let mut g = ok(padded(dev, c.x_off, Some(&x), n, sentinel::<T>()), "upload")?;
    ok(
        drop.backward_inplace(s, &mv, &mut g.slice_mut(c.x_off..c.x_off + n)),
        "backward_inplace",
    )?;
    expect_region(
        &dl(dev, &g)?,
        c.x_off,
        &want_dx,
        sentinel::<T>(),
        "backward_inplace grad",
    )?;
    let mut g2 = ok(padded(dev, c.x_off, Some(&x), n, sentinel::<T>()), "upload")?;
    ok(
        drop.forward_maskless_inplace(s, c.state, &mut g2.slice_mut(c.x_off..c.x_off + n)),
        "maskless_inplace",
    )?;
    expect_region(
        &dl(dev, &g2)?,
        c.x_off,
        &want_y,
        sentinel::<T>(),
        "forward_maskless_inplace x",
    )?;
    let mut g3 = ok(padded(dev, c.x_off, Some(&x), n, sentinel::<T>()), "upload")?;
    ok(
        drop.backward_maskless_inplace(s, c.state, &mut g3.slice_mut(c.x_off..c.x_off + n)),
        "backward_maskless_inplace",
    )?;
    expect_region(
        &dl(dev, &g3)?,
        c.x_off,
        &want_dx2,
        sentinel::<T>(),
        "backward_maskless_inplace grad",
    )?;
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

/// Fixed edge cases on top of the random ones: every length 1..=300 once, for every dtype.
#[test]
fn gpu_matches_reference_every_small_length() {
    let Some(dev) = gpu("gpu_matches_reference_every_small_length") else {
        return;
    };
    for n in 1..=300usize {
        let c = Case {
            n,
            p: [0.0, 0.3, 0.5, 1.0][n % 4],
            state: PhiloxState::new(n as u64 * 7919, n as u64),
            element_offset: (n % 5) as u64,
            x_off: n % 9,
            y_off: (n / 9) % 9,
            m_off: n % 3,
            data_seed: n as u64,
        };
        check_case::<f32>(&dev, &c).unwrap();
        check_case::<f16>(&dev, &c).unwrap();
        check_case::<bf16>(&dev, &c).unwrap();
    }
}

/// Infinities and NaN: kept ones stay non-finite (NaN stays NaN), dropped ones become +0.
#[test]
fn gpu_non_finite_inputs() {
    let Some(dev) = gpu("gpu_non_finite_inputs") else {
        return;
    };
    let n = 4099;
    let x: Vec<f32> = (0..n)
        .map(|i| [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0][i % 4])
        .collect();
    let drop = Dropout::new(0.5).unwrap();
    let state = PhiloxState::new(3, 4);
    let xd = dev.upload(&x).unwrap();
    let mut y = dev.zeros::<f32>(n).unwrap();
    let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
    drop.forward(dev.stream(), state, &xd, &mut y, &mut m).unwrap();
    let (want, want_mask) = reference::forward(&x, 0.5, state, 0).unwrap();
    assert_eq!(dev.download(&m).unwrap(), want_mask);
    for (i, (g, w)) in dev.download(&y).unwrap().iter().zip(&want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "element {i}: {g} vs {w}"
        );
    }
}

/// The shard property on the GPU: the mask of a slice with element_offset a equals bits a.. of the
/// whole tensor's mask.
#[test]
fn gpu_shards_equal_the_whole() {
    let Some(dev) = gpu("gpu_shards_equal_the_whole") else {
        return;
    };
    let n = 100_003usize;
    let state = PhiloxState::new(11, 12);
    let whole = Dropout::new(0.37).unwrap();
    let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
    whole.mask(dev.stream(), state, n, &mut m).unwrap();
    let whole_mask = dev.download(&m).unwrap();
    for (a, len) in [
        (0usize, 1000usize),
        (1, 31),
        (37, 5000),
        (4096, 4096),
        (99_000, 1003),
    ] {
        let shard = whole.with_element_offset(a as u64);
        let mut ms = dev.zeros::<u32>(mask_words(len)).unwrap();
        shard.mask(dev.stream(), state, len, &mut ms).unwrap();
        let got = dev.download(&ms).unwrap();
        for i in 0..len {
            let bit = |m: &[u32], j: usize| (m[j / 32] >> (j % 32)) & 1;
            assert_eq!(bit(&got, i), bit(&whole_mask, a + i), "shard at {a}, element {i}");
        }
    }
}

/// Bad arguments are rejected with the right variant and nothing is written.
#[test]
fn gpu_invalid_arguments_write_nothing() {
    let Some(dev) = gpu("gpu_invalid_arguments_write_nothing") else {
        return;
    };
    let s = dev.stream();
    let drop = Dropout::new(0.5).unwrap();
    let state = PhiloxState::new(1, 1);
    let x = dev.upload(&vec![1.0f32; 100]).unwrap();
    let fill = vec![7.0f32; 100];
    let mut y = dev.upload(&fill).unwrap();
    let mut short = dev.upload(&fill[..99]).unwrap();
    let mut m = dev.upload(&[MASK_SENTINEL; 4]).unwrap();
    let mut m_long = dev.upload(&[MASK_SENTINEL; 5]).unwrap();
    let arg = |e: Error| {
        e.argument()
            .unwrap_or_else(|| panic!("not InvalidArgument: {e:?}"))
    };

    assert_eq!(
        arg(drop.forward(s, state, &x, &mut short, &mut m).unwrap_err()),
        "y"
    );
    assert_eq!(
        arg(drop.forward(s, state, &x, &mut y, &mut m_long).unwrap_err()),
        "mask"
    );
    assert_eq!(
        arg(drop
            .forward(s, state, &x.slice(0..0), &mut y.slice_mut(0..0), &mut m)
            .unwrap_err()),
        "x"
    );
    assert_eq!(arg(drop.mask(s, state, 100, &mut m_long).unwrap_err()), "mask");
    assert_eq!(arg(drop.backward(s, &m_long, &x, &mut y).unwrap_err()), "mask");
    assert_eq!(arg(drop.backward(s, &m, &x, &mut short).unwrap_err()), "dx");
    let far = drop.with_element_offset(u64::MAX - 50);
    assert_eq!(
        arg(far.forward(s, state, &x, &mut y, &mut m).unwrap_err()),
        "element_offset"
    );

    // Memory of another context (a second, non-primary context on the same GPU).
    let other = CudaContext::new_non_primary(0, 0).unwrap();
    let other_stream = other.default_stream();
    let x_other = other_stream.clone_htod(&vec![1.0f32; 100]).unwrap();
    dev.context().bind_to_thread().unwrap();
    assert_eq!(
        arg(drop.forward(s, state, &x_other, &mut y, &mut m).unwrap_err()),
        "x"
    );

    assert_eq!(dev.download(&y).unwrap(), fill, "y written despite the error");
    assert_eq!(
        dev.download(&short).unwrap(),
        fill[..99],
        "short y written despite the error"
    );
    assert_eq!(
        dev.download(&m).unwrap(),
        [MASK_SENTINEL; 4],
        "mask written despite the error"
    );
    assert_eq!(
        dev.download(&m_long).unwrap(),
        [MASK_SENTINEL; 5],
        "mask written despite the error"
    );
}

/// A tensor of 2^32 + 37 f16 elements: 64-bit indexing end to end. The whole mask is checked
/// against the reference (on all host cores), and every output element against the mask.
#[test]
fn gpu_huge_tensor_over_2_pow_32() {
    let Some(dev) = gpu("gpu_huge_tensor_over_2_pow_32") else {
        return;
    };
    let n: usize = (1usize << 32) + 37;
    let (free, _) = dev.context().mem_get_info().unwrap();
    let need = 2 * n * 2 + mask_words(n) * 4 + (1 << 30);
    if free < need {
        common::skip(
            "gpu_huge_tensor_over_2_pow_32",
            &format!("needs {need} bytes of GPU memory, {free} free"),
        );
        return;
    }
    let s = dev.stream();
    let p = 0.3;
    let dropout = Dropout::new(p).unwrap();
    let state = PhiloxState::new(0x0123_4567_89ab_cdef, 99);
    // x[i] = pattern[i % P]: filled by repeated uploads of one pattern chunk.
    const P: usize = 1 << 24;
    let pattern: Vec<f16> = (0..P)
        .map(|i| f16::from_f32(((i % 2047) as f32 - 1023.0) / 64.0))
        .collect();
    let mut x = dev.zeros::<f16>(n).unwrap();
    let mut at = 0;
    while at < n {
        let len = P.min(n - at);
        s.memcpy_htod(&pattern[..len], &mut x.slice_mut(at..at + len))
            .unwrap();
        at += len;
    }
    let mut y = dev.zeros::<f16>(n).unwrap();
    let mut m = dev.zeros::<u32>(mask_words(n)).unwrap();
    dropout.forward(s, state, &x, &mut y, &mut m).unwrap();
    drop(x);
    let mask = dev.download(&m).unwrap();
    let yh = dev.download(&y).unwrap();

    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(4);
    let per = mask.len().div_ceil(threads);
    let scale = dropout.scale();
    let threshold = dropout.threshold();
    let kept: usize = std::thread::scope(|sc| {
        let handles: Vec<_> = mask
            .chunks(per)
            .enumerate()
            .map(|(t, part)| {
                let (yh, pattern) = (&yh, &pattern);
                sc.spawn(move || {
                    let mut kept = 0usize;
                    for (k, &got) in part.iter().enumerate() {
                        let w = t * per + k;
                        let mut want = 0u32;
                        for j in 0..32 {
                            let i = w * 32 + j;
                            if i >= n {
                                break;
                            }
                            let keep = reference::keep(state, i as u64, threshold);
                            want |= (keep as u32) << j;
                            let v = if keep {
                                f16::from_f32(pattern[i % P].to_f32() * scale)
                            } else {
                                f16::ZERO
                            };
                            assert_eq!(yh[i].to_bits(), v.to_bits(), "y[{i}]");
                        }
                        assert_eq!(got, want, "mask word {w}");
                        kept += want.count_ones() as usize;
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
}

/// The mask-only launcher (`Dropout::mask`, kernels/dropout.cu `mask_kernel`) on 2^32 + 37
/// elements (the last word partial): [`mask_only_case`], 512 MiB of device memory.
#[test]
fn gpu_mask_only_huge_over_2_pow_32() {
    mask_only_case("gpu_mask_only_huge_over_2_pow_32", TWO_POW_32 + 37, TWO_POW_32);
}

/// [`mask_only_case`] on 3 * 1024 + 37 elements, probing around the multiples of 1024: the huge
/// test's own logic, small enough for the emulated device.
#[test]
fn gpu_mask_only_probe_twin() {
    mask_only_case("gpu_mask_only_probe_twin", 3 * 1024 + 37, 1024);
}

/// `Dropout::mask` of `n` elements twice: a host Philox state with element offset 0, then a device
/// state (the kernel's other instantiation) with element offset 2^32 - 6 (no multiple of 4; global
/// indices up to 2^33). Each time the mask words around each multiple of `wrap` elements and at
/// both ends equal the reference's, and the kept count of the whole mask is within 6 sigma.
fn mask_only_case(test: &str, n: usize, wrap: usize) {
    let Some(dev) = gpu(test) else {
        return;
    };
    let words = mask_words(n);
    if !huge::enough_memory(&dev, test, words * 4 + (1 << 30)) {
        return;
    }
    assert_eq!(wrap % 32, 0, "wrap: whole mask words");
    let s = dev.stream();
    let p = 0.3;
    let state = PhiloxState::new(0x9e37_79b9_7f4a_7c15, 11);
    let device_state = DevicePhilox::new(s, state).unwrap();
    let mut m = dev.zeros::<u32>(words).unwrap();
    for element_offset in [0, (1u64 << 32) - 6] {
        let drop = Dropout::new(p).unwrap().with_element_offset(element_offset);
        if element_offset == 0 {
            drop.mask(s, state, n, &mut m).unwrap();
        } else {
            drop.mask(s, &device_state, n, &mut m).unwrap();
        }
        let got = dev.download(&m).unwrap();
        for r in huge::windows(words, wrap / 32, 4, &[]) {
            let first = r.start * 32;
            let len = (r.end * 32).min(n) - first;
            let want = reference::mask(p, state, element_offset + first as u64, len).unwrap();
            assert_eq!(
                got[r.clone()],
                want,
                "mask words {r:?} (element offset {element_offset})"
            );
        }
        let kept: u64 = got.iter().map(|w| u64::from(w.count_ones())).sum();
        let q = 1.0 - drop.threshold() as f64 / 4_294_967_296.0;
        common::assert_binomial(
            kept,
            n as u64,
            q,
            &format!("kept (element offset {element_offset})"),
        );
    }
}

/// The threshold `round(p * 2^32)` and the scale `1 / (1 - p)` (f64, rounded once to f32) at
/// their rounding edges, which random p almost never reach: for elements with known words w, p on
/// the exact boundaries w / 2^32 (kept: w >= threshold), (w + 0.5) / 2^32 (rounds up: dropped) and
/// (w + 1) / 2^32 (dropped); and p = 0.15, 0.45, 0.6, 0.9, whose scales computed in f32 would differ
/// by an ulp. Masks and outputs against the reference, every dtype.
#[test]
fn gpu_threshold_and_scale_rounding_edges() {
    let Some(dev) = gpu("gpu_threshold_and_scale_rounding_edges") else {
        return;
    };
    let state = PhiloxState::new(0x5eed, 77);
    let two32 = 4_294_967_296.0f64;
    let mut ps = vec![0.15, 0.45, 0.6, 0.9];
    for e in [0u64, 5, 31, 32, 100] {
        let w = dropfuse::reference::philox::element_word(state, e) as f64;
        ps.extend([w / two32, (w + 0.5) / two32, (w + 1.0) / two32]);
    }
    for (k, &p) in ps.iter().enumerate() {
        let c = Case {
            n: 1000,
            p,
            state,
            element_offset: 0,
            x_off: k % 2,
            y_off: 0,
            m_off: 0,
            data_seed: k as u64,
        };
        check_case::<f32>(&dev, &c).unwrap_or_else(|e| panic!("p = {p}: {e}"));
        check_case::<f16>(&dev, &c).unwrap_or_else(|e| panic!("p = {p}: {e}"));
        check_case::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("p = {p}: {e}"));
    }
}

/// The emulated device (`DROPFUSE_HOST_EMULATION=1` only) poisons what a GPU leaves undefined: the
/// kernel library's self-test (`tests/host_emu/poison_emu.cpp`, linked like the kernels) reads
/// static and dynamic shared memory and locals before any write and finds the poison.
#[cfg(dropfuse_host_emulation)]
#[test]
fn emulated_device_poisons_uninitialised_shared_memory_and_locals() {
    extern "C" {
        fn dropfuse_emu_poison_selftest() -> i32;
    }
    // SAFETY: a host function of the emulated device's kernel library, no arguments.
    let failures = unsafe { dropfuse_emu_poison_selftest() };
    assert_eq!(
        failures, 0,
        "the emulator's poisoning self-test failed (its output above)"
    );
}
