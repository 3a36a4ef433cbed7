//! DropBlock on the GPU vs the CPU reference, bit for bit: masks, per-sample counts, outputs and
//! gradients over random 2D and 3D shapes, block sizes (larger than the map, equal, odd, even),
//! probabilities (0, near 1, 1), gamma scales, channel sharing, normalisation modes and dtypes,
//! with views that break 16-byte alignment. Without a GPU every test prints a SKIPPED line.
//!
//! `DROPFUSE_PROPTEST_CASES` raises the number of random cases per property (default 24).

mod common;

use common::data::sprinkled;
use common::guard::{dl, same_bits, upload_at, MASK_SENTINEL};
use common::huge;
use common::{gpu, ok, run_cases};
use dropfuse::drop_block::{stats_len, DropBlock, Normalize};
use dropfuse::dropout::mask_words;
use dropfuse::reference::drop_block as reference;
use dropfuse::{Device, Element, PhiloxState};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const GUARD: usize = 3;
const STATS_SENTINEL: u64 = 0xFEED_FACE_CAFE_BEEF;

/// Values in [-8, 8) with a sprinkle of infinities and NaN (dropped ones must become +0).
fn values<T: Element>(n: usize, seed: u64) -> Vec<T> {
    sprinkled(n, seed, 8.0, 97, &[f32::INFINITY, f32::NAN])
}

#[derive(Debug, Clone)]
struct Case {
    shape: Vec<usize>,
    block: usize,
    p: f64,
    gamma_scale: f64,
    shared: bool,
    normalize: Normalize,
    state: PhiloxState,
    /// View offsets in elements into larger buffers (break 16-byte alignment when nonzero).
    x_off: usize,
    y_off: usize,
    data_seed: u64,
}

impl Case {
    fn cfg(&self) -> DropBlock {
        DropBlock::new(self.p, self.block)
            .unwrap()
            .with_gamma_scale(self.gamma_scale)
            .unwrap()
            .with_shared_channels(self.shared)
            .with_normalize(self.normalize)
    }
}

fn case() -> impl Strategy<Value = Case> {
    let dim = prop_oneof![3 => 1usize..=12, 2 => 12usize..=70, 1 => prop::sample::select(vec![31usize, 32, 33, 63, 64, 65])];
    let shape = prop_oneof![
        (1usize..=3, 1usize..=4, dim.clone(), dim.clone()).prop_map(|(n, c, h, w)| vec![n, c, h, w]),
        (1usize..=2, 1usize..=3, 1usize..=9, dim.clone(), dim)
            .prop_map(|(n, c, d, h, w)| vec![n, c, d, h, w]),
    ];
    let p = prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(0.1),
        Just(0.5),
        Just(0.999),
        0.0f64..=1.0
    ];
    let gamma_scale = prop_oneof![3 => Just(1.0), 1 => 0.0f64..4.0, 1 => Just(50.0)];
    let normalize = prop::sample::select(vec![Normalize::Global, Normalize::PerSample, Normalize::Off]);
    (
        shape,
        1usize..=9,
        p,
        gamma_scale,
        any::<bool>(),
        normalize,
        (any::<u64>(), any::<u64>()),
        (0usize..9, 0usize..9),
        any::<u64>(),
    )
        .prop_map(
            |(shape, block, p, gamma_scale, shared, normalize, (seed, offset), (x_off, y_off), data_seed)| {
                Case {
                    shape,
                    block,
                    p,
                    gamma_scale,
                    shared,
                    normalize,
                    state: PhiloxState::new(seed, offset),
                    x_off,
                    y_off,
                    data_seed,
                }
            },
        )
}

fn check_case<T: Element>(dev: &Device, c: &Case) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let cfg = c.cfg();
    let numel: usize = c.shape.iter().product();
    let n = c.shape[0];
    let x = values::<T>(numel, c.data_seed);
    let dy = values::<T>(numel, !c.data_seed);
    let want = ok(
        reference::forward(&cfg, &c.shape, &x, c.state),
        "reference forward",
    )?;
    let want_dx = ok(
        reference::backward(&c.shape, &dy, &want.mask, &want.scales),
        "reference backward",
    )?;

    let sentinel = T::from_f32(-12345.0);
    let xd = upload_at(dev, c.x_off, &x, sentinel, GUARD)?;
    let mut yd = upload_at(dev, c.y_off, &vec![sentinel; numel], sentinel, GUARD)?;
    let mut md = ok(
        dev.upload(&vec![MASK_SENTINEL; mask_words(numel) + GUARD]),
        "upload",
    )?;
    let mut sd = ok(dev.upload(&vec![STATS_SENTINEL; n + 1 + GUARD]), "upload")?;
    let words = mask_words(numel);
    ok(
        cfg.forward(
            s,
            c.state,
            &c.shape,
            &xd.slice(c.x_off..c.x_off + numel),
            &mut yd.slice_mut(c.y_off..c.y_off + numel),
            &mut md.slice_mut(0..words),
            &mut sd.slice_mut(0..n + 1),
        ),
        "forward",
    )?;
    let mask = dl(dev, &md)?;
    prop_assert_eq!(&mask[..words], &want.mask[..], "mask");
    prop_assert!(
        mask[words..].iter().all(|&w| w == MASK_SENTINEL),
        "mask guard written"
    );
    let stats = dl(dev, &sd)?;
    prop_assert_eq!(&stats[..n], &want.counts[..], "per-sample counts");
    prop_assert_eq!(stats[n], want.counts.iter().sum::<u64>(), "total count");
    prop_assert!(
        stats[n + 1..].iter().all(|&w| w == STATS_SENTINEL),
        "stats guard written"
    );
    let y = dl(dev, &yd)?;
    same_bits(&y[c.y_off..c.y_off + numel], &want.y, "y")?;
    prop_assert!(
        y[..c.y_off]
            .iter()
            .chain(&y[c.y_off + numel..])
            .all(|v| v.to_bits_u32() == sentinel.to_bits_u32()),
        "y guard written"
    );

    // Backward from the GPU's own mask and stats.
    let dyd = upload_at(dev, c.y_off, &dy, sentinel, GUARD)?;
    let mut dxd = upload_at(dev, c.x_off, &vec![sentinel; numel], sentinel, GUARD)?;
    ok(
        cfg.backward(
            s,
            &c.shape,
            &md.slice(0..words),
            &sd.slice(0..n + 1),
            &dyd.slice(c.y_off..c.y_off + numel),
            &mut dxd.slice_mut(c.x_off..c.x_off + numel),
        ),
        "backward",
    )?;
    let dx = dl(dev, &dxd)?;
    same_bits(&dx[c.x_off..c.x_off + numel], &want_dx, "dx")?;

    // In place: the same output and mask.
    let mut xi = upload_at(dev, c.x_off, &x, sentinel, GUARD)?;
    let mut mi = ok(dev.zeros::<u32>(words), "zeros")?;
    let mut si = ok(dev.zeros::<u64>(n + 1), "zeros")?;
    ok(
        cfg.forward_inplace(
            s,
            c.state,
            &c.shape,
            &mut xi.slice_mut(c.x_off..c.x_off + numel),
            &mut mi,
            &mut si,
        ),
        "forward_inplace",
    )?;
    same_bits(&dl(dev, &xi)?[c.x_off..c.x_off + numel], &want.y, "in-place y")?;
    prop_assert_eq!(dl(dev, &mi)?, want.mask.clone(), "in-place mask");
    Ok(())
}

fn run_property<T: Element>(test: &str) {
    run_cases(test, 24, case(), |dev, c| check_case::<T>(dev, &c));
}

#[test]
fn gpu_drop_block_matches_reference_f32() {
    run_property::<f32>("gpu_drop_block_matches_reference_f32");
}

#[test]
fn gpu_drop_block_matches_reference_f16() {
    run_property::<f16>("gpu_drop_block_matches_reference_f16");
}

#[test]
fn gpu_drop_block_matches_reference_bf16() {
    run_property::<bf16>("gpu_drop_block_matches_reference_bf16");
}

fn fixed(shape: &[usize], block: usize, p: f64, shared: bool, normalize: Normalize, seed: u64) -> Case {
    Case {
        shape: shape.to_vec(),
        block,
        p,
        gamma_scale: 1.0,
        shared,
        normalize,
        state: PhiloxState::new(seed, seed / 3),
        x_off: (seed % 3) as usize,
        y_off: 0,
        data_seed: seed,
    }
}

/// Edge shapes: 1x1 maps, maps smaller than and equal to the block, even blocks, rows of exactly
/// 32 units and one more, maps whose rows or slabs do not fit one tile of the mask kernel (several
/// thread blocks per plane), and many tiny planes sharing mask words.
#[test]
fn gpu_drop_block_edge_shapes() {
    let Some(dev) = gpu("gpu_drop_block_edge_shapes") else {
        return;
    };
    let shapes: &[(&[usize], usize)] = &[
        (&[3, 5, 1, 1], 7),
        (&[2, 3, 7, 7], 7),
        (&[2, 3, 5, 6], 9),
        (&[2, 2, 8, 8], 4),
        (&[1, 3, 32, 32], 2),
        (&[1, 2, 33, 33], 6),
        (&[7, 13, 3, 5], 2),
        (&[1, 1, 1, 1, 1], 3),
        (&[2, 2, 4, 4, 4], 4),
        (&[1, 2, 5, 9, 40], 3),
        (&[2, 3, 64, 64], 7),   // 2D: warp-per-plane mask kernel, rows of one 64-bit word
        (&[1, 2, 128, 128], 7), // 2D: its largest map, rows of two words
        (&[2, 3, 64, 1], 3),    // 2D: one unit per row
        (&[1, 2, 129, 64], 5),  // 2D: one row too many for it (the tiled kernel)
        (&[1, 2, 30, 129], 5),  // 2D: one unit per row too many for it
        (&[1, 1, 2500, 64], 7), // 2D: narrow rows, more rows than one tile holds
        (&[1, 1, 2500, 70], 7), // 2D: more rows than one tile holds
        (&[1, 1, 40, 300, 64], 5), // 3D: more slabs than one tile holds
        (&[2, 3, 2, 700, 33], 7),
    ];
    for (i, &(shape, block)) in shapes.iter().enumerate() {
        for (j, &p) in [0.0, 0.2, 0.9, 1.0].iter().enumerate() {
            let normalize = [Normalize::Global, Normalize::PerSample, Normalize::Off][(i + j) % 3];
            let c = fixed(shape, block, p, (i + j) % 2 == 1, normalize, (i * 10 + j) as u64);
            check_case::<f32>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            check_case::<f16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            check_case::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
    }
}

/// Shapes whose mask kernel asks for exactly 48 KB of bitmaps (found in the host emulation, for
/// 108 and 132 SMs): with the kernel's static shared memory that is over the default limit, so the
/// launcher must opt in (it did not: the launch failed with cudaErrorInvalidValue).
#[test]
fn gpu_drop_block_full_shared_memory() {
    let Some(dev) = gpu("gpu_drop_block_full_shared_memory") else {
        return;
    };
    for (i, shape) in [&[32usize, 16, 1024, 256][..], &[8, 64, 64, 64, 64][..]]
        .iter()
        .enumerate()
    {
        let c = fixed(shape, 7, 0.1, false, Normalize::Global, 90 + i as u64);
        check_case::<f16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// Invalid arguments are typed errors and nothing is written.
#[test]
fn gpu_drop_block_invalid_arguments_write_nothing() {
    let Some(dev) = gpu("gpu_drop_block_invalid_arguments_write_nothing") else {
        return;
    };
    let s = dev.stream();
    let cfg = DropBlock::new(0.5, 3).unwrap();
    let state = PhiloxState::new(1, 2);
    let shape = [2usize, 3, 4, 5];
    let numel = 120;
    let x = dev.upload(&vec![1.0f32; numel]).unwrap();
    let fill = vec![7.0f32; numel];
    let mut y = dev.upload(&fill).unwrap();
    let mut m = dev.upload(&[MASK_SENTINEL; 4]).unwrap();
    let mut m_short = dev.upload(&[MASK_SENTINEL; 3]).unwrap();
    let mut st = dev.upload(&[STATS_SENTINEL; 3]).unwrap();
    let mut st_long = dev.upload(&[STATS_SENTINEL; 4]).unwrap();
    let arg = |e: dropfuse::Error| {
        e.argument()
            .unwrap_or_else(|| panic!("not InvalidArgument: {e:?}"))
    };
    assert_eq!(stats_len(&shape).unwrap(), 3);
    assert_eq!(
        arg(cfg
            .forward(s, state, &[2, 3, 4], &x, &mut y, &mut m, &mut st)
            .unwrap_err()),
        "shape"
    );
    assert_eq!(
        arg(cfg
            .forward(s, state, &[2, 3, 0, 5], &x, &mut y, &mut m, &mut st)
            .unwrap_err()),
        "shape"
    );
    assert_eq!(
        arg(cfg
            .forward(s, state, &[2, 3, 4, 6], &x, &mut y, &mut m, &mut st)
            .unwrap_err()),
        "x"
    );
    assert_eq!(
        arg(cfg
            .forward(s, state, &shape, &x, &mut y.slice_mut(0..119), &mut m, &mut st)
            .unwrap_err()),
        "y"
    );
    assert_eq!(
        arg(cfg
            .forward(s, state, &shape, &x, &mut y, &mut m_short, &mut st)
            .unwrap_err()),
        "mask"
    );
    assert_eq!(
        arg(cfg
            .forward(s, state, &shape, &x, &mut y, &mut m, &mut st_long)
            .unwrap_err()),
        "stats"
    );
    assert_eq!(
        arg(cfg.backward(s, &shape, &m, &st_long, &x, &mut y).unwrap_err()),
        "stats"
    );
    assert_eq!(
        arg(cfg.backward(s, &shape, &m_short, &st, &x, &mut y).unwrap_err()),
        "mask"
    );
    // A 3D map whose block of rows does not fit the mask kernel's shared memory.
    let wide = [1usize, 1, 8, 64, 4096];
    assert_eq!(
        arg(DropBlock::new(0.1, 8)
            .unwrap()
            .mask(s, state, &wide, &mut m, &mut st)
            .unwrap_err()),
        "shape"
    );
    assert_eq!(dev.download(&y).unwrap(), fill, "y written despite the error");
    assert_eq!(dev.download(&m).unwrap(), [MASK_SENTINEL; 4]);
    assert_eq!(dev.download(&st).unwrap(), [STATS_SENTINEL; 3]);
    assert_eq!(dev.download(&st_long).unwrap(), [STATS_SENTINEL; 4]);
}

/// A tensor of more than 2^32 elements ([65537, 1, 256, 256] f16, 4 295 032 832 elements): 64-bit
/// indexing in the tiled mask kernel and the apply kernel.
#[test]
fn gpu_drop_block_huge_tensor_over_2_pow_32() {
    huge_case("gpu_drop_block_huge_tensor_over_2_pow_32", [65_537, 1, 256, 256]);
}

/// The same through the warp-per-plane mask kernel (2D maps of at most 128 x 128): 60 x 60 planes,
/// so planes share mask words with their neighbours, beyond 2^32 elements too
/// ([1193047, 1, 60, 60] f16, 4 294 969 200 elements).
#[test]
fn gpu_drop_block_huge_tensor_over_2_pow_32_small_maps() {
    huge_case(
        "gpu_drop_block_huge_tensor_over_2_pow_32_small_maps",
        [1_193_047, 1, 60, 60],
    );
}

/// DropBlock with per-sample normalisation over 2^32 elements: [`per_sample_case`] on
/// [397 800, 3, 61, 59] f16 in place (4 295 046 600 elements, about 9.1 GB with the mask). Samples
/// of 10 797 elements (odd): the one holding element 2^32 straddles it, and most samples begin
/// inside a 16-byte vector and a mask word.
#[test]
fn gpu_drop_block_per_sample_huge() {
    let test = "gpu_drop_block_per_sample_huge";
    let Some(dev) = gpu(test) else {
        return;
    };
    let shape = [397_800, 3, 61, 59];
    assert!(shape.iter().product::<usize>() > huge::TWO_POW_32);
    per_sample_case(&dev, test, shape, huge::TWO_POW_32);
}

/// [`per_sample_case`] on [9, 3, 23, 21] (samples of 1449 elements), probing the samples around
/// the multiples of 4096.
#[test]
fn gpu_drop_block_per_sample_probe_twin() {
    let test = "gpu_drop_block_per_sample_probe_twin";
    let Some(dev) = gpu(test) else {
        return;
    };
    per_sample_case(&dev, test, [9, 3, 23, 21], 4096);
}

/// The per-sample instantiation of the apply kernel (kernels/drop_block.cu
/// `drop_block_apply_kernel<T, VEC, true>`: the scale changes at each sample boundary, element by
/// element where a vector straddles one), f16 `x[i] = value(i)` in place: forward, then backward
/// from its mask and stats (the same scales once more). The tensor's counter equals the sum of the
/// samples'; the first two and last two samples and those around each multiple of `wrap` elements
/// are checked whole against the reference's per-plane oracle and per-sample scale: counter, mask
/// bits, and elements after each pass; their scales must differ. Skipped (a SKIPPED line) when the
/// GPU lacks the memory.
fn per_sample_case(dev: &Device, test: &str, shape: [usize; 4], wrap: usize) {
    let [samples, c, h, w] = shape;
    let per_sample = c * h * w;
    let numel = samples * per_sample;
    let need = numel * 2 + mask_words(numel) * 4 + (1 << 30);
    if !huge::enough_memory(dev, test, need) {
        return;
    }
    let s = dev.stream();
    let cfg = DropBlock::new(0.2, 7)
        .unwrap()
        .with_normalize(Normalize::PerSample);
    let state = PhiloxState::new(0xb10c_5a3e, 9);
    let mut probe = vec![0, 1, samples - 2, samples - 1];
    for b in huge::wraps(numel, wrap) {
        probe.extend([(b - 1) / per_sample, b / per_sample, b / per_sample + 1]);
    }
    probe.retain(|&n| n < samples);
    probe.sort_unstable();
    probe.dedup();
    // The reference per probed sample: its units' dropped flags (plane after plane), kept count
    // and scale.
    let oracle: Vec<(usize, Vec<bool>, u64, f32)> = probe
        .iter()
        .map(|&n| {
            let mut dropped = Vec::with_capacity(per_sample);
            for ch in 0..c {
                let q = (n * c + ch) as u64;
                dropped.extend(reference::plane_dropped(&cfg, &shape[2..], q, state).unwrap());
            }
            let kept = dropped.iter().filter(|&&d| !d).count() as u64;
            let scale = reference::scales(&cfg, &[1, c, h, w], &[kept]).unwrap()[0];
            (n, dropped, kept, scale)
        })
        .collect();
    // Per-sample scales that differ between the probed samples (and are not all 1).
    assert!(
        oracle.iter().any(|o| o.3 != oracle[0].3) && oracle.iter().any(|o| o.3 != 1.0),
        "{test}: the probed samples' scales {:?} do not differ",
        oracle.iter().map(|o| o.3).collect::<Vec<_>>()
    );

    let mut x = huge::value_tensor(dev, numel);
    let mut m = dev.zeros::<u32>(mask_words(numel)).unwrap();
    let mut st = dev.zeros::<u64>(stats_len(&shape).unwrap()).unwrap();
    cfg.forward_inplace(s, state, &shape, &mut x, &mut m, &mut st)
        .unwrap();
    let stats = dev.download(&st).unwrap();
    assert_eq!(
        stats[samples],
        stats[..samples].iter().sum::<u64>(),
        "{test}: total counter"
    );
    for (n, dropped, kept, _) in &oracle {
        assert_eq!(stats[*n], *kept, "{test}: counter of sample {n}");
        let e0 = n * per_sample;
        let words = dev
            .download(&m.slice(e0 / 32..(e0 + per_sample).div_ceil(32)))
            .unwrap();
        for (u, &d) in dropped.iter().enumerate() {
            let bit = e0 % 32 + u;
            let bit = (words[bit / 32] >> (bit % 32)) & 1 == 1;
            assert_eq!(bit, !d, "{test}: mask bit of unit {u} of sample {n}");
        }
    }
    for pass in 1..=2 {
        if pass == 2 {
            cfg.backward_inplace(s, &shape, &m, &st, &mut x).unwrap();
        }
        for (n, dropped, _, scale) in &oracle {
            let e0 = n * per_sample;
            let got = dev.download(&x.slice(e0..e0 + per_sample)).unwrap();
            for (u, (&d, g)) in dropped.iter().zip(got).enumerate() {
                let mut want = huge::value(e0 + u);
                for _ in 0..pass {
                    want = if d {
                        f16::ZERO
                    } else {
                        f16::from_f32(want.to_f32() * scale)
                    };
                }
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{test}: pass {pass}, unit {u} of sample {n} (dropped {d}, scale {scale})"
                );
            }
        }
    }
}

/// Planes are independent, so the first, middle and last samples (including those whose mask
/// words and elements lie beyond 2^32) are checked against the reference's per-plane oracle, and
/// the tensor's counter against the sum of the samples'.
fn huge_case(test: &str, shape: [usize; 4]) {
    let Some(dev) = gpu(test) else {
        return;
    };
    let plane = shape[2] * shape[3];
    let numel: usize = shape.iter().product();
    assert!(numel > 1 << 32);
    let (free, _) = dev.context().mem_get_info().unwrap();
    let need = 2 * numel * 2 + mask_words(numel) * 4 + (1 << 30);
    if free < need {
        common::skip(test, &format!("needs {need} bytes of GPU memory, {free} free"));
        return;
    }
    let s = dev.stream();
    let cfg = DropBlock::new(0.2, 7).unwrap();
    let state = PhiloxState::new(0xfeed_beef, 3);
    // x: the same plane pattern in every sample, copied on the device by doubling the filled part.
    let pattern = values::<f16>(plane, 77)
        .into_iter()
        .map(|v| {
            if v.to_f32().is_finite() {
                v
            } else {
                f16::from_f32(1.0)
            }
        })
        .collect::<Vec<_>>();
    let mut x = dev.zeros::<f16>(numel).unwrap();
    s.memcpy_htod(&pattern, &mut x.slice_mut(..plane)).unwrap();
    let mut filled = plane;
    while filled < numel {
        let len = filled.min(numel - filled);
        let (head, mut tail) = x.split_at_mut(filled);
        s.memcpy_dtod(&head.slice(..len), &mut tail.slice_mut(..len))
            .unwrap();
        filled += len;
    }
    let mut y = dev.zeros::<f16>(numel).unwrap();
    let mut m = dev.zeros::<u32>(mask_words(numel)).unwrap();
    let mut st = dev.zeros::<u64>(stats_len(&shape).unwrap()).unwrap();
    cfg.forward(s, state, &shape, &x, &mut y, &mut m, &mut st)
        .unwrap();
    drop(x);
    let stats = dev.download(&st).unwrap();
    let samples = shape[0];
    assert_eq!(
        stats[samples],
        stats[..samples].iter().sum::<u64>(),
        "total counter"
    );
    let scale = (numel as f64 / stats[samples] as f64) as f32;
    for n in [0, 1, samples / 2, samples - 2, samples - 1] {
        let dropped = reference::plane_dropped(&cfg, &shape[2..], n as u64, state).unwrap();
        let kept = dropped.iter().filter(|&&d| !d).count() as u64;
        assert_eq!(stats[n], kept, "count of sample {n}");
        // The mask words holding plane n's bits (its first and last may be shared).
        let (e0, e1) = (n * plane, (n + 1) * plane);
        let words = dev.download(&m.slice(e0 / 32..e1.div_ceil(32))).unwrap();
        let yh = dev.download(&y.slice(e0..e1)).unwrap();
        for (u, &d) in dropped.iter().enumerate() {
            let bit = e0 % 32 + u;
            let bit = (words[bit / 32] >> (bit % 32)) & 1 == 1;
            assert_eq!(bit, !d, "mask bit of unit {u} of sample {n}");
            let want = if d {
                f16::ZERO
            } else {
                f16::from_f32(pattern[u].to_f32() * scale)
            };
            assert_eq!(yh[u].to_bits(), want.to_bits(), "y of unit {u} of sample {n}");
        }
    }
}
