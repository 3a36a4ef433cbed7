//! Tests of the CPU DropBlock reference (`dropfuse::reference::drop_block`), CPU only: blocks are
//! exactly the union of the drawn seeds' blocks (checked against an independent brute force),
//! seeds, shared channels, the p = 0 / full-threshold limits, forward/backward values for every
//! dtype, counts and scales per normalisation mode, drop-rate statistics, validation, the linear
//! schedule and hand-computed known answers.

mod common;

use common::data::splitmix;
use common::{bits, cases, invalid_name};
use dropfuse::drop_block::{linear_schedule, DropBlock, Normalize};
use dropfuse::half::{bf16, f16};
use dropfuse::reference::drop_block::{
    backward, counts, forward, keep, mask, scales, seed_threshold, seeds, Forward,
};
use dropfuse::reference::dropout;
use dropfuse::reference::philox::element_word;
use dropfuse::{Element, Error, PhiloxState};
use proptest::prelude::*;

const TWO_POW_32: u64 = 1 << 32;

// ---------------------------------------------------------------------------------------------
// An independent model of the geometry, written with three fixed nested loops: a 2D map [H, W]
// is treated as the 3D map [1, H, W] (its extra axis has extent 1, block 1, one valid position,
// so linear indices and products are unchanged).

/// The test's own view of a shape and config.
#[derive(Debug, Clone)]
struct Geo {
    n: usize,
    c: usize,
    /// Spatial dims, padded to 3.
    dims: [usize; 3],
    /// Block extents `min(block_size, S_a)`.
    b: [usize; 3],
    /// Valid extents `S_a - b_a + 1`.
    v: [usize; 3],
    spatial: usize,
    valid: usize,
    planes: usize,
}

impl Geo {
    fn new(cfg: &DropBlock, shape: &[usize]) -> Geo {
        let dims = match shape.len() {
            4 => [1, shape[2], shape[3]],
            5 => [shape[2], shape[3], shape[4]],
            _ => panic!("bad test shape {shape:?}"),
        };
        let b = dims.map(|s| cfg.block_size().min(s));
        let v = [0, 1, 2].map(|a| dims[a] - b[a] + 1);
        let planes = if cfg.shared_channels() {
            shape[0]
        } else {
            shape[0] * shape[1]
        };
        Geo {
            n: shape[0],
            c: shape[1],
            dims,
            b,
            v,
            spatial: dims.iter().product(),
            valid: v.iter().product(),
            planes,
        }
    }

    fn numel(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// Row-major index of unit `s` in the map.
    fn unit(&self, s: [usize; 3]) -> usize {
        (s[0] * self.dims[1] + s[1]) * self.dims[2] + s[2]
    }

    /// Row-major index of seed position `u` in the valid region.
    fn seed_lin(&self, u: [usize; 3]) -> usize {
        (u[0] * self.v[1] + u[1]) * self.v[2] + u[2]
    }

    /// Element index of unit `s` of channel `c` of sample `n`.
    fn element(&self, n: usize, c: usize, s: [usize; 3]) -> usize {
        (n * self.c + c) * self.spatial + self.unit(s)
    }

    /// The plane of channel `c` of sample `n`.
    fn plane(&self, shared: bool, n: usize, c: usize) -> usize {
        if shared {
            n
        } else {
            n * self.c + c
        }
    }

    /// Every position of a grid with extents `e`.
    fn positions(e: [usize; 3]) -> Vec<[usize; 3]> {
        let mut out = Vec::new();
        for i in 0..e[0] {
            for j in 0..e[1] {
                for k in 0..e[2] {
                    out.push([i, j, k]);
                }
            }
        }
        out
    }
}

/// gamma exactly as written in the contract (point 2), from the test's own geometry.
fn spec_gamma(cfg: &DropBlock, g: &Geo) -> f64 {
    let vol: usize = g.b.iter().product();
    cfg.gamma_scale() * cfg.p() * g.spatial as f64 / (vol as f64 * g.valid as f64)
}

/// The seed threshold from the contract's formula, computed by the test.
fn spec_threshold(cfg: &DropBlock, g: &Geo) -> u64 {
    (spec_gamma(cfg, g).min(1.0) * 4294967296.0).round() as u64
}

/// Drawn-seed flags straight from Philox: `[q][lin(u)]`.
fn brute_seeds(cfg: &DropBlock, g: &Geo, state: PhiloxState) -> Vec<Vec<bool>> {
    let t = spec_threshold(cfg, g);
    (0..g.planes)
        .map(|q| {
            (0..g.valid)
                .map(|l| u64::from(element_word(state, (q * g.valid + l) as u64)) < t)
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Random cases

/// One random DropBlock call.
#[derive(Debug, Clone)]
struct Case {
    shape: Vec<usize>,
    p: f64,
    block: usize,
    gamma_scale: f64,
    shared: bool,
    normalize: Normalize,
    seed: u64,
    offset: u64,
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
    fn state(&self) -> PhiloxState {
        PhiloxState::new(self.seed, self.offset)
    }
    fn geo(&self) -> Geo {
        Geo::new(&self.cfg(), &self.shape)
    }
}

/// 2D `[N, C, H, W]` and 3D `[N, C, D, H, W]` shapes: N, C in 1..=3, spatial dims in 1..=12.
fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (1usize..=3, 1usize..=3, 1usize..=12, 1usize..=12).prop_map(|(n, c, h, w)| vec![n, c, h, w]),
        (1usize..=3, 1usize..=3, 1usize..=12, 1usize..=12, 1usize..=12)
            .prop_map(|(n, c, d, h, w)| vec![n, c, d, h, w]),
    ]
}

/// p: 0, small, 1/2, near 1, 1, or uniform.
fn p_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1e-3),
        Just(0.5),
        Just(0.999),
        Just(1.0),
        0.0f64..=1.0,
    ]
}

fn normalize_strategy() -> impl Strategy<Value = Normalize> {
    prop_oneof![
        Just(Normalize::Global),
        Just(Normalize::PerSample),
        Just(Normalize::Off),
    ]
}

/// Random cases; block sizes 1..=9 (odd and even; smaller than, equal to and larger than the
/// map), gamma_scale 1, 0 or uniform in [0, 4].
fn case_strategy() -> impl Strategy<Value = Case> {
    (
        shape_strategy(),
        p_strategy(),
        1usize..=9,
        prop_oneof![Just(1.0), Just(0.0), 0.0f64..=4.0],
        any::<bool>(),
        normalize_strategy(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(shape, p, block, gamma_scale, shared, normalize, seed, offset)| Case {
                shape,
                p,
                block,
                gamma_scale,
                shared,
                normalize,
                seed,
                offset,
            },
        )
}

/// `n` input values: specials (signed zeros, NaN, infinities, subnormals, extremes), arbitrary
/// bit patterns and ordinary values.
fn test_values(n: usize, mut state: u64) -> Vec<f32> {
    const SPECIALS: [f32; 14] = [
        0.0,
        -0.0,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        65504.0,
        1.0 + 1.0 / 512.0,
        1.0 + 1.0 / 64.0,
    ];
    (0..n)
        .map(|_| {
            let r = splitmix(&mut state);
            match r % 4 {
                0 => SPECIALS[(r >> 8) as usize % SPECIALS.len()],
                1 => f32::from_bits((r >> 32) as u32),
                _ => ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 20.0,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Blocks and seeds

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// A unit is dropped iff some drawn seed of its plane covers it: every dropped unit lies in a
    /// block of a drawn seed (searched over the seeds whose block can reach it), and every unit of
    /// every drawn seed's block is dropped.
    #[test]
    fn drops_are_exactly_the_union_of_drawn_blocks(case in case_strategy()) {
        let cfg = case.cfg();
        let g = case.geo();
        let drawn = brute_seeds(&cfg, &g, case.state());
        let k = keep(&cfg, &case.shape, case.state()).unwrap();
        prop_assert_eq!(k.len(), g.numel());
        for n in 0..g.n {
            for c in 0..g.c {
                let q = g.plane(case.shared, n, c);
                for s in Geo::positions(g.dims) {
                    // Seeds u with u_a <= s_a < u_a + b_a and u_a < v_a.
                    let mut covered = false;
                    for u0 in s[0].saturating_sub(g.b[0] - 1)..=s[0].min(g.v[0] - 1) {
                        for u1 in s[1].saturating_sub(g.b[1] - 1)..=s[1].min(g.v[1] - 1) {
                            for u2 in s[2].saturating_sub(g.b[2] - 1)..=s[2].min(g.v[2] - 1) {
                                covered |= drawn[q][g.seed_lin([u0, u1, u2])];
                            }
                        }
                    }
                    let e = g.element(n, c, s);
                    prop_assert_eq!(k[e], !covered, "element {} (n {}, c {}, unit {:?})", e, n, c, s);
                }
                for u in Geo::positions(g.v) {
                    if drawn[q][g.seed_lin(u)] {
                        for o in Geo::positions(g.b) {
                            let s = [u[0] + o[0], u[1] + o[1], u[2] + o[2]];
                            prop_assert!(!k[g.element(n, c, s)], "seed {:?} left unit {:?} kept", u, s);
                        }
                    }
                }
            }
        }
    }

    /// `seeds()` has one flag per valid position of every plane, each flag is "Philox word below
    /// the threshold", every drawn seed's block fits in the map, and the threshold is the spec's.
    #[test]
    fn seeds_are_valid_positions_below_the_threshold(case in case_strategy()) {
        let cfg = case.cfg();
        let g = case.geo();
        let t = seed_threshold(&cfg, &case.shape[2..]);
        prop_assert_eq!(t, spec_threshold(&cfg, &g));
        prop_assert!(t <= TWO_POW_32);
        let flags = seeds(&cfg, &case.shape, case.state()).unwrap();
        prop_assert_eq!(flags.len(), g.planes * g.valid);
        let drawn = brute_seeds(&cfg, &g, case.state());
        for (q, plane) in drawn.iter().enumerate() {
            for u in Geo::positions(g.v) {
                let l = g.seed_lin(u);
                let i = q * g.valid + l;
                prop_assert_eq!(flags[i], plane[l], "seed {}", i);
                prop_assert_eq!(flags[i], u64::from(element_word(case.state(), i as u64)) < t);
                if flags[i] {
                    for a in 0..3 {
                        prop_assert!(u[a] + g.b[a] <= g.dims[a], "seed {:?} block leaves the map", u);
                    }
                }
            }
        }
    }

    /// With shared channels every channel of a sample has the same keep flags, and they are the
    /// flags of the one-channel tensor's sample (plane q = n in both).
    #[test]
    fn shared_channels_share_masks(case in case_strategy()) {
        let cfg = case.cfg().with_shared_channels(true);
        let g = Geo::new(&cfg, &case.shape);
        let k = keep(&cfg, &case.shape, case.state()).unwrap();
        let mut one_channel = case.shape.clone();
        one_channel[1] = 1;
        let k1 = keep(&cfg.with_shared_channels(false), &one_channel, case.state()).unwrap();
        for n in 0..g.n {
            for c in 0..g.c {
                let a = &k[(n * g.c + c) * g.spatial..][..g.spatial];
                let b = &k1[n * g.spatial..][..g.spatial];
                prop_assert_eq!(a, b, "sample {} channel {}", n, c);
            }
        }
        prop_assert_eq!(seeds(&cfg, &case.shape, case.state()).unwrap().len(), g.n * g.valid);
    }
}

// ---------------------------------------------------------------------------------------------
// Limits: p = 0 and the full threshold

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(48)))]

    /// p = 0 (or gamma_scale = 0) gives threshold 0: no seed, everything kept, every scale exactly
    /// 1.0 in every mode, y = x * 1.0.
    #[test]
    fn p_zero_keeps_everything(mut case in case_strategy(), zero_gamma_scale in any::<bool>()) {
        if zero_gamma_scale {
            case.gamma_scale = 0.0;
        } else {
            case.p = 0.0;
        }
        let cfg = case.cfg();
        let g = case.geo();
        prop_assert_eq!(seed_threshold(&cfg, &case.shape[2..]), 0);
        prop_assert!(seeds(&cfg, &case.shape, case.state()).unwrap().iter().all(|&f| !f));
        prop_assert!(keep(&cfg, &case.shape, case.state()).unwrap().iter().all(|&f| f));
        let x = test_values(g.numel(), case.seed);
        let f = forward(&cfg, &case.shape, &x, case.state()).unwrap();
        prop_assert!(f.scales.iter().all(|s| s.to_bits() == 1.0f32.to_bits()), "{:?}", f.scales);
        prop_assert!(f.counts.iter().all(|&k| k == (g.c * g.spatial) as u64));
        // NaN payloads are not part of the contract: `v * 1.0` quiets a signaling NaN at run time,
        // and an optimised build folds it to `v` (release builds of this test failed on one).
        let canon = |v: f32| if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() };
        let expect: Vec<u32> = x.iter().map(|&v| canon(v * 1.0)).collect();
        let got: Vec<u32> = f.y.iter().map(|&v| canon(v)).collect();
        prop_assert_eq!(got, expect);
    }

    /// Why p = 1 does not drop everything: per axis, b (S - b + 1) - S = (b - 1)(S - b) >= 0, so
    /// vol * valid >= spatial and gamma <= gamma_scale * p, with equality iff every axis has
    /// b_a = 1 or b_a = S_a. So at p = 1, gamma_scale = 1 the threshold is 2^32 exactly in that
    /// case and strictly below otherwise (for these small maps the gap is far above 2^-33).
    #[test]
    fn threshold_is_full_only_when_gamma_reaches_one(case in case_strategy()) {
        let cfg = case.cfg();
        let g = case.geo();
        let t = seed_threshold(&cfg, &case.shape[2..]);
        // gamma <= gamma_scale * p, up to the roundings of the f64 expression (a few ulps)...
        let gamma = spec_gamma(&cfg, &g);
        let gp = case.gamma_scale * case.p;
        prop_assert!(gamma <= gp * (1.0 + 4.0 * f64::EPSILON), "gamma {} above {}", gamma, gp);
        // ...so the threshold is at most one step above round(gamma_scale * p * 2^32) (only at
        // an exact rounding tie).
        let bound = (gp.min(1.0) * 4294967296.0).round() as u64;
        prop_assert!(t <= bound + 1, "t {} above round(gamma_scale * p * 2^32) {}", t, bound);
        let full = DropBlock::new(1.0, case.block).unwrap();
        let t1 = seed_threshold(&full, &case.shape[2..]);
        let tight = (0..3).all(|a| g.b[a] == 1 || g.b[a] == g.dims[a]);
        prop_assert_eq!(t1 == TWO_POW_32, tight, "b {:?} dims {:?}: t {}", g.b, g.dims, t1);
    }

    /// At the full threshold (gamma >= 1) every seed is drawn; every unit is covered by at least one
    /// valid seed, so nothing is kept: y is all +0 (even for NaN/Inf inputs), counts 0, scales 0
    /// (Global, PerSample) or 1 (Off), and backward gives all +0 too.
    #[test]
    fn full_threshold_drops_everything(mut case in case_strategy()) {
        // gamma = gamma_scale * p * spatial / (vol * valid) >= 1 once gamma_scale * p >= vol * valid.
        case.p = 1.0;
        case.gamma_scale = 1e6;
        let cfg = case.cfg();
        let g = case.geo();
        prop_assert_eq!(seed_threshold(&cfg, &case.shape[2..]), TWO_POW_32);
        prop_assert!(seeds(&cfg, &case.shape, case.state()).unwrap().iter().all(|&f| f));
        let x: Vec<bf16> = test_values(g.numel(), case.offset).into_iter().map(bf16::from_f32).collect();
        let f = forward(&cfg, &case.shape, &x, case.state()).unwrap();
        prop_assert!(f.y.iter().all(|v| v.to_bits() == 0));
        prop_assert!(f.mask.iter().all(|&w| w == 0));
        prop_assert!(f.counts.iter().all(|&k| k == 0));
        let expect_scale = if case.normalize == Normalize::Off { 1.0f32 } else { 0.0 };
        prop_assert!(f.scales.iter().all(|s| s.to_bits() == expect_scale.to_bits()));
        let dx = backward(&case.shape, &x, &f.mask, &f.scales).unwrap();
        prop_assert!(dx.iter().all(|v| v.to_bits() == 0));
    }
}

// ---------------------------------------------------------------------------------------------
// Forward, backward, mask layout, counts and scales

/// Forward against the definition (points 6 to 10) for one dtype.
fn check_forward<T: Element>(case: &Case, x32: &[f32]) -> Result<(), TestCaseError> {
    let cfg = case.cfg();
    let g = case.geo();
    let x: Vec<T> = x32.iter().map(|&v| T::from_f32(v)).collect();
    let k = keep(&cfg, &case.shape, case.state()).unwrap();
    let Forward {
        y,
        mask: m,
        counts: kept,
        scales: sc,
    } = forward(&cfg, &case.shape, &x, case.state()).unwrap();

    // Mask: bit e is keep[e]; ceil(numel / 32) words; padding bits zero.
    prop_assert_eq!(m.len(), g.numel().div_ceil(32));
    prop_assert_eq!(&m, &mask(&cfg, &case.shape, case.state()).unwrap());
    for (e, &ke) in k.iter().enumerate() {
        prop_assert_eq!((m[e / 32] >> (e % 32)) & 1 == 1, ke, "mask bit {}", e);
    }
    let used = g.numel() - 32 * (m.len() - 1);
    if used < 32 {
        prop_assert_eq!(m[m.len() - 1] >> used, 0, "padding bits set");
    }

    // Counts and scales as the standalone functions give them.
    prop_assert_eq!(&kept, &counts(&case.shape, &k).unwrap());
    prop_assert_eq!(&sc, &scales(&cfg, &case.shape, &kept).unwrap());

    // y = keep ? x * s_n rounded once : +0.
    let per_sample = g.c * g.spatial;
    for e in 0..g.numel() {
        let expect = if k[e] {
            T::from_f32(x[e].to_f32() * sc[e / per_sample]).to_bits_u32()
        } else {
            0
        };
        prop_assert_eq!(y[e].to_bits_u32(), expect, "y[{}] for x {:?}", e, x[e]);
    }

    // Backward from the stored mask and scales, with dy = x, reproduces y.
    let dx = backward(&case.shape, &x, &m, &sc).unwrap();
    prop_assert_eq!(bits(&dx), bits(&y));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(48)))]

    #[test]
    fn forward_backward_match_definition(case in case_strategy(), data in any::<u64>()) {
        let x = test_values(case.geo().numel(), data);
        check_forward::<f32>(&case, &x)?;
        check_forward::<f16>(&case, &x)?;
        check_forward::<bf16>(&case, &x)?;
    }

    /// Counts are the kept elements per sample; scales follow the mode's formula (computed in f64,
    /// rounded once) for arbitrary valid counts, not only those of a real mask.
    #[test]
    fn counts_and_scales_arithmetic(
        case in case_strategy(),
        fractions in prop::collection::vec(0.0f64..=1.0, 3),
    ) {
        let cfg = case.cfg();
        let g = case.geo();
        let per_sample = g.c * g.spatial;
        let numel = g.numel();

        let k = keep(&cfg, &case.shape, case.state()).unwrap();
        let kept = counts(&case.shape, &k).unwrap();
        prop_assert_eq!(kept.len(), g.n);
        for n in 0..g.n {
            let manual = (0..per_sample).filter(|&i| k[n * per_sample + i]).count() as u64;
            prop_assert_eq!(kept[n], manual);
        }

        // Arbitrary counts in [0, C * spatial], zero included.
        let mut arbitrary: Vec<u64> = (0..g.n)
            .map(|n| (fractions[n] * per_sample as f64).round() as u64)
            .collect();
        if fractions[0] < 0.2 {
            arbitrary[0] = 0;
        }
        for cs in [kept, arbitrary] {
            let sc = scales(&cfg, &case.shape, &cs).unwrap();
            prop_assert_eq!(sc.len(), g.n);
            let total: u64 = cs.iter().sum();
            for n in 0..g.n {
                let expect = match case.normalize {
                    Normalize::Global if total == 0 => 0.0f32,
                    Normalize::Global => (numel as f64 / total as f64) as f32,
                    Normalize::PerSample if cs[n] == 0 => 0.0,
                    Normalize::PerSample => (per_sample as f64 / cs[n] as f64) as f32,
                    Normalize::Off => 1.0,
                };
                prop_assert_eq!(
                    sc[n].to_bits(), expect.to_bits(), "{:?} n {} counts {:?}", case.normalize, n, cs
                );
                // Never worse than one f32 rounding of the exact ratio.
                if expect != 0.0 && case.normalize != Normalize::Off {
                    let exact = if case.normalize == Normalize::Global {
                        numel as f64 / total as f64
                    } else {
                        per_sample as f64 / cs[n] as f64
                    };
                    prop_assert!((sc[n] as f64 - exact).abs() <= exact * f32::EPSILON as f64 / 2.0);
                }
            }
            if case.normalize == Normalize::Global {
                prop_assert!(sc.iter().all(|s| s.to_bits() == sc[0].to_bits()));
            }
        }
    }
}

#[test]
fn dropped_non_finite_inputs_become_positive_zero() {
    // Block 1 on 8 x 8 maps: gamma = p = 0.5, so plenty of both kept and dropped units.
    let cfg = DropBlock::new(0.5, 1).unwrap();
    let shape = [2, 3, 8, 8];
    let specials = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0];
    let x: Vec<f32> = specials.iter().copied().cycle().take(2 * 3 * 64).collect();
    let f = forward(&cfg, &shape, &x, PhiloxState::new(8, 8)).unwrap();
    let k = keep(&cfg, &shape, PhiloxState::new(8, 8)).unwrap();
    let dropped = k.iter().filter(|&&f| !f).count();
    assert!(dropped > 0 && dropped < x.len());
    for e in 0..x.len() {
        if k[e] {
            assert_eq!(f.y[e].is_nan(), x[e].is_nan());
            if !x[e].is_nan() {
                assert_eq!(f.y[e].to_bits(), (x[e] * f.scales[e / 192]).to_bits());
            }
        } else {
            assert_eq!(f.y[e].to_bits(), 0, "dropped {:?} must be +0", x[e]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Exact expected drop fraction and the variance of the dropped count of one plane, for seed
/// probability `g` on a 2D map `s x s` with block `b`.
///
/// Unit `s` is covered by the `m(s) = c(s_0) c(s_1)` seed positions of the set
/// `C(s) = {u : max(0, s_a - b + 1) <= u_a <= min(s_a, v - 1)}`; seeds are independent
/// Bernoulli(g), so `P(kept) = (1 - g)^m(s)` and, for two units,
/// `P(both kept) = (1 - g)^|C(s) u C(s')|`. Covariances vanish unless the units are within `b - 1`
/// of each other on both axes.
fn drop_moments(s: usize, b: usize, g: f64) -> (f64, f64) {
    let v = s - b + 1;
    let range = |x: usize| (x.saturating_sub(b - 1), x.min(v - 1));
    let len = |(lo, hi): (usize, usize)| (hi + 1).saturating_sub(lo);
    let overlap = |a: (usize, usize), c: (usize, usize)| len((a.0.max(c.0), a.1.min(c.1)));
    let q = 1.0 - g;
    let mut mean = 0.0;
    let mut var = 0.0;
    for i in 0..s {
        for j in 0..s {
            let mij = len(range(i)) * len(range(j));
            mean += 1.0 - q.powi(mij as i32);
            for k in i.saturating_sub(b - 1)..(i + b).min(s) {
                for l in j.saturating_sub(b - 1)..(j + b).min(s) {
                    let mkl = len(range(k)) * len(range(l));
                    let shared = overlap(range(i), range(k)) * overlap(range(j), range(l));
                    let union = (mij + mkl - shared) as i32;
                    var += q.powi(union) - q.powi((mij + mkl) as i32);
                }
            }
        }
    }
    (mean / (s * s) as f64, var)
}

/// The dropped fraction over 1024 independent 64 x 64 planes, block 3, p = 0.1.
///
/// gamma = p * 64^2 / (3^2 * 62^2) = 0.011839..., so the expected number of drawn seeds covering a
/// unit, averaged over the map, is g * sum_s m(s) / spatial = g * vol * valid / spatial = p
/// exactly (each seed covers vol units): that is what the gamma formula is built on. But a unit
/// covered by two seeds is dropped once, so P(drop) = 1 - (1 - g)^m(s) < g m(s): for interior units
/// (m = 9) 0.1016, at the borders (m < 9) less, and over the map 0.09554, about 4.5 % below p.
///
/// 1. Exact: the empirical fraction is within 6 sigma of that exact expectation, where sigma comes
///    from the exact variance of a plane's dropped count (about 8.7 times the binomial variance,
///    because units in a block are dropped together): sigma = 4.2e-4, i.e. 6 sigma = 2.7 % of the
///    mean.
/// 2. Approximate: the fraction is within 10 % of p (the 4.5 % bias plus the 2.7 % noise band).
#[test]
fn drop_fraction_matches_gamma() {
    const S: usize = 64;
    const B: usize = 3;
    const P: f64 = 0.1;
    const PLANES: usize = 1024;
    let cfg = DropBlock::new(P, B).unwrap();
    let shape = [16, PLANES / 16, S, S];
    let t = seed_threshold(&cfg, &shape[2..]);
    let g = t as f64 / TWO_POW_32 as f64;
    assert!((g - 0.011_839_519).abs() < 1e-9, "g {g}");

    let k = keep(&cfg, &shape, PhiloxState::new(0x5eed_b10c, 3)).unwrap();
    let units = (PLANES * S * S) as f64;
    let dropped = k.iter().filter(|&&f| !f).count() as f64;
    let fraction = dropped / units;

    let (mean, plane_var) = drop_moments(S, B, g);
    let sigma = (PLANES as f64 * plane_var).sqrt() / units;
    assert!((mean - 0.095_538).abs() < 1e-5, "mean {mean}");
    assert!(
        (fraction - mean).abs() <= 6.0 * sigma,
        "dropped fraction {fraction}, expected {mean} +- 6 * {sigma}"
    );
    assert!(
        (fraction - P).abs() <= 0.1 * P,
        "dropped fraction {fraction} not within 10 % of p = {P}"
    );
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn config_validation() {
    for p in [
        f64::NAN,
        -0.1,
        1.0 + f64::EPSILON,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert_eq!(invalid_name(DropBlock::new(p, 3)), "p", "p = {p}");
    }
    assert_eq!(invalid_name(DropBlock::new(0.5, 0)), "block_size");
    // p is checked before block_size.
    assert_eq!(invalid_name(DropBlock::new(2.0, 0)), "p");
    let cfg = DropBlock::new(0.5, 3).unwrap();
    for gs in [f64::NAN, -1e-300, -1.0, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(
            invalid_name(cfg.with_gamma_scale(gs)),
            "gamma_scale",
            "gamma_scale {gs}"
        );
    }
    for gs in [0.0, 1.0, 1e300] {
        assert_eq!(cfg.with_gamma_scale(gs).unwrap().gamma_scale(), gs);
    }
    assert!(DropBlock::new(0.0, 1).is_ok());
    assert!(DropBlock::new(1.0, usize::MAX).is_ok());
    let d = DropBlock::new(0.25, 7).unwrap();
    assert_eq!(
        (
            d.p(),
            d.block_size(),
            d.gamma_scale(),
            d.shared_channels(),
            d.normalize()
        ),
        (0.25, 7, 1.0, false, Normalize::Global)
    );
}

#[test]
fn bad_shapes_are_rejected_everywhere() {
    let cfg = DropBlock::new(0.3, 3).unwrap();
    let s = PhiloxState::new(1, 2);
    let x = [1.0f32; 16];
    let bad: &[&[usize]] = &[
        &[],
        &[16],
        &[1, 16],
        &[1, 1, 16],
        &[1, 1, 1, 1, 1, 16],
        &[0, 1, 4, 4],
        &[1, 0, 4, 4],
        &[1, 1, 0, 4],
        &[1, 1, 4, 0],
        &[1, 1, 0, 4, 4],
        &[1, 1, 4, 4, 0],
        &[usize::MAX, 2, 1, 1],
        &[1 << 40, 1 << 40, 1, 1, 1],
        &[usize::MAX, usize::MAX, usize::MAX, usize::MAX],
    ];
    for &shape in bad {
        assert_eq!(invalid_name(seeds(&cfg, shape, s)), "shape", "{shape:?}");
        assert_eq!(invalid_name(keep(&cfg, shape, s)), "shape", "{shape:?}");
        assert_eq!(invalid_name(mask(&cfg, shape, s)), "shape", "{shape:?}");
        assert_eq!(invalid_name(counts(shape, &[true; 16])), "shape", "{shape:?}");
        assert_eq!(invalid_name(scales(&cfg, shape, &[1])), "shape", "{shape:?}");
        // The shape is checked before the data.
        assert_eq!(invalid_name(forward(&cfg, shape, &x, s)), "shape", "{shape:?}");
        assert_eq!(invalid_name(backward(shape, &x, &[], &[])), "shape", "{shape:?}");
    }
    // seed_threshold does not validate, but never panics either.
    for &spatial in &[&[][..], &[0, 4], &[usize::MAX, usize::MAX, usize::MAX]] {
        assert!(seed_threshold(&cfg, spatial) <= TWO_POW_32);
    }
    match keep(&cfg, &[1, 1, 16], s) {
        Err(Error::InvalidArgument {
            name: "shape", got, ..
        }) => assert!(got.contains("3 dims"), "{got}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_lengths_are_rejected() {
    let cfg = DropBlock::new(0.3, 3).unwrap();
    let s = PhiloxState::new(1, 2);
    let shape = [2, 3, 5, 7]; // numel 210: 7 mask words, 2 scales
    let x = vec![f16::ONE; 210];
    for len in [0usize, 1, 209, 211, 420] {
        let bad = vec![f16::ONE; len];
        assert_eq!(invalid_name(forward(&cfg, &shape, &bad, s)), "x", "x len {len}");
        assert_eq!(
            invalid_name(backward(&shape, &bad, &[0; 7], &[1.0; 2])),
            "dy",
            "dy len {len}"
        );
        assert_eq!(
            invalid_name(counts(&shape, &vec![true; len])),
            "keep",
            "keep len {len}"
        );
    }
    for len in [0usize, 6, 8] {
        assert_eq!(
            invalid_name(backward(&shape, &x, &vec![0; len], &[1.0; 2])),
            "mask",
            "mask {len}"
        );
    }
    for len in [0usize, 1, 3, 6] {
        assert_eq!(
            invalid_name(backward(&shape, &x, &[0; 7], &vec![1.0; len])),
            "scales",
            "scales {len}"
        );
        assert_eq!(
            invalid_name(scales(&cfg, &shape, &vec![0; len])),
            "counts",
            "counts {len}"
        );
    }
    // A count above C * spatial (105) cannot come from a mask.
    assert_eq!(invalid_name(scales(&cfg, &shape, &[106, 0])), "counts");
    assert_eq!(
        invalid_name(scales(&cfg, &shape, &[u64::MAX, u64::MAX])),
        "counts"
    );
    assert!(scales(&cfg, &shape, &[105, 0]).is_ok());
    // dy, then mask, then scales.
    assert_eq!(invalid_name(backward(&shape, &x[1..], &[0; 6], &[1.0; 1])), "dy");
    assert_eq!(invalid_name(backward(&shape, &x, &[0; 6], &[1.0; 1])), "mask");
    assert!(backward(&shape, &x, &[0; 7], &[1.0; 2]).is_ok());
    // 3D: numel 2 * 1 * 3 * 3 * 4 = 72, 3 mask words.
    let shape3 = [2, 1, 3, 3, 4];
    let x3 = vec![bf16::ONE; 72];
    assert!(forward(&cfg, &shape3, &x3, s).is_ok());
    assert_eq!(invalid_name(forward(&cfg, &shape3, &x3[..71], s)), "x");
    assert_eq!(invalid_name(backward(&shape3, &x3, &[0; 2], &[1.0; 2])), "mask");
}

// ---------------------------------------------------------------------------------------------
// Schedule

#[test]
fn linear_schedule_fixed_values() {
    assert_eq!(linear_schedule(0.0, 0.1, 10, 0), 0.0);
    assert_eq!(linear_schedule(0.0, 0.2, 4, 1), 0.05);
    assert_eq!(linear_schedule(0.0, 0.2, 4, 2), 0.1);
    assert_eq!(linear_schedule(0.0, 0.5, 4, 4), 0.5);
    assert_eq!(linear_schedule(0.0, 0.5, 4, 5), 0.5);
    assert_eq!(linear_schedule(0.0, 0.5, 4, u64::MAX), 0.5);
    assert_eq!(linear_schedule(0.5, 0.0, 2, 1), 0.25);
    // steps == 0: end from the first step.
    for step in [0, 1, 1000, u64::MAX] {
        assert_eq!(linear_schedule(0.3, 0.7, 0, step), 0.7);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    /// The spec's formula bit for bit; p(0) = start exactly; monotone towards `end`; constant after
    /// `steps`; p(steps) equals `end` up to the rounding of `(end - start) * steps / steps` (a few
    /// ulps: it is not always exactly `end`).
    #[test]
    fn linear_schedule_properties(
        start in 0.0f64..=1.0,
        end in prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
        steps in prop_oneof![1u64..=10, 1u64..=100_000],
        step in any::<u64>(),
    ) {
        let p = |k: u64| linear_schedule(start, end, steps, k);
        let k = step % (steps + 1);
        // Before `steps`: the linear formula, clamped to the ramp's range; from `steps` on: `end`.
        let formula = (start + (end - start) * (k as f64) / (steps as f64)).clamp(start.min(end), start.max(end));
        if k < steps {
            prop_assert_eq!(p(k).to_bits(), formula.to_bits());
        }
        prop_assert!(p(k) >= start.min(end) && p(k) <= start.max(end));
        prop_assert_eq!(p(0), start);
        prop_assert_eq!(p(steps).to_bits(), end.to_bits());
        prop_assert_eq!(p(steps + 1 + step % 1000).to_bits(), p(steps).to_bits());
        prop_assert_eq!(p(step.max(steps)).to_bits(), p(steps).to_bits());
        if k < steps {
            if start <= end {
                prop_assert!(p(k) <= p(k + 1));
            } else {
                prop_assert!(p(k) >= p(k + 1));
            }
        }
        prop_assert_eq!(linear_schedule(start, end, 0, step), end);
    }
}

// ---------------------------------------------------------------------------------------------
// Known answers, computed by hand from the definition

/// The 4 seed words of `PhiloxState::new(seed, 0)`, hard-coded so the cases below are fixed.
fn assert_words(seed: u64, words: [u32; 4]) {
    for (i, &w) in words.iter().enumerate() {
        assert_eq!(
            element_word(PhiloxState::new(seed, 0), i as u64),
            w,
            "seed {seed} word {i}"
        );
    }
}

/// One 3 x 3 map, block 2: valid region 2 x 2 (seeds 0..4 at (0,0), (0,1), (1,0), (1,1)),
/// gamma = 0.5 * 9 / (4 * 4) = 0.28125 exactly, t = 0.28125 * 2^32 = 1207959552.
#[test]
fn known_answer_3x3_block_2() {
    let cfg = DropBlock::new(0.5, 2).unwrap();
    let shape = [1, 1, 3, 3];
    assert_eq!(seed_threshold(&cfg, &[3, 3]), 1_207_959_552);
    // (seed, its words, drawn seeds, keep mask as rows "KDD", kept count)
    type KnownCase = (u64, [u32; 4], [bool; 4], [&'static str; 3], u64);
    let cases: [KnownCase; 5] = [
        // No word below t: all kept.
        (
            0,
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            [false; 4],
            ["KKK", "KKK", "KKK"],
            9,
        ),
        // Seed (0,1) drops rows 0-1, cols 1-2.
        (
            3,
            [0xd1104d77, 0x1de847ce, 0xa7f2ec5a, 0xc3e627f9],
            [false, true, false, false],
            ["KDD", "KDD", "KKK"],
            5,
        ),
        // Seeds (1,0), (1,1) drop rows 1-2.
        (
            7,
            [0xf4607a2d, 0xc009f9dc, 0x1d3aba42, 0x15edac82],
            [false, false, true, true],
            ["KKK", "DDD", "DDD"],
            3,
        ),
        // Seeds (0,0), (1,1): two overlapping blocks, only the anti-diagonal corners survive.
        (
            12,
            [0x006b2eb7, 0x866e46d7, 0xd82baf5a, 0x1b8a77d2],
            [true, false, false, true],
            ["DDK", "DDD", "KDD"],
            2,
        ),
        // Seeds (0,1), (1,0), (1,1): only the top-left unit survives.
        (
            22,
            [0xe307abd6, 0x2fcfc6bf, 0x2679efcd, 0x1ea26b6f],
            [false, true, true, true],
            ["KDD", "DDD", "DDD"],
            1,
        ),
    ];
    for (seed, words, drawn, rows, kept) in cases {
        assert_words(seed, words);
        let state = PhiloxState::new(seed, 0);
        assert_eq!(seeds(&cfg, &shape, state).unwrap(), drawn.to_vec(), "seed {seed}");
        let expect: Vec<bool> = rows.concat().chars().map(|ch| ch == 'K').collect();
        assert_eq!(keep(&cfg, &shape, state).unwrap(), expect, "seed {seed}");
        let word = expect
            .iter()
            .enumerate()
            .fold(0u32, |w, (e, &k)| w | (u32::from(k) << e));
        assert_eq!(mask(&cfg, &shape, state).unwrap(), vec![word]);
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let f = forward(&cfg, &shape, &x, state).unwrap();
        assert_eq!(f.counts, vec![kept]);
        let scale = (9.0 / kept as f64) as f32;
        assert_eq!(f.scales, vec![scale]);
        let y: Vec<f32> = (0..9)
            .map(|e| if expect[e] { x[e] * scale } else { 0.0 })
            .collect();
        assert_eq!(bits(&f.y), bits(&y), "seed {seed}");
    }
    // Seed 3: scale 9 / 5 = 1.8, mask 0b1_1100_1001.
    let f = forward(&cfg, &shape, &[1.0f32; 9], PhiloxState::new(3, 0)).unwrap();
    assert_eq!(f.mask, vec![0x1c9]);
    assert_eq!(f.scales, vec![1.8f32]);
}

/// A 1 x 1 map: spatial = vol = valid = 1, gamma = p, one seed per plane with index q = element:
/// exactly dropout with the same p.
#[test]
fn known_answer_1x1_map_is_dropout() {
    for p in [0.0, 1e-3, 0.3, 0.5, 0.999, 1.0] {
        for block in [1, 2, 9] {
            let cfg = DropBlock::new(p, block).unwrap();
            assert_eq!(seed_threshold(&cfg, &[1, 1]), dropout::drop_threshold(p).unwrap());
            assert_eq!(
                seed_threshold(&cfg, &[1, 1, 1]),
                dropout::drop_threshold(p).unwrap()
            );
            for (shape, n) in [(&[3usize, 3, 1, 1][..], 9), (&[2, 7, 1, 1, 1][..], 14)] {
                let state = PhiloxState::new(0xfeed, p.to_bits());
                assert_eq!(
                    mask(&cfg, shape, state).unwrap(),
                    dropout::mask(p, state, 0, n).unwrap(),
                    "p {p} block {block} shape {shape:?}"
                );
            }
        }
    }
}

/// Block size 1 with a power-of-two map: gamma = p * 32 / (1 * 32) = p exactly, and seed index =
/// element index, so the mask is dropout's. (For other sizes `p * spatial / spatial` may differ
/// from p by an ulp, which can move the threshold at an exact rounding tie.)
#[test]
fn known_answer_block_1_is_dropout() {
    for p in [0.1, 0.5, 0.75] {
        let cfg = DropBlock::new(p, 1).unwrap();
        for shape in [&[2usize, 3, 4, 8][..], &[2, 2, 2, 4, 4][..]] {
            let n: usize = shape.iter().product();
            let state = PhiloxState::new(77, 5);
            assert_eq!(
                seed_threshold(&cfg, &shape[2..]),
                dropout::drop_threshold(p).unwrap()
            );
            assert_eq!(
                mask(&cfg, shape, state).unwrap(),
                dropout::mask(p, state, 0, n).unwrap()
            );
        }
    }
}

/// A block as large as (or larger than) the map: one valid position per plane (seed index q),
/// and it drops the whole plane. 3D [1, 1, 2, 2, 2], block 2, p = 0.3: gamma = 0.3 * 8 / (8 * 1) =
/// 0.3, t = round(0.3 * 2^32) = 1288490189.
#[test]
fn known_answer_block_covers_the_map() {
    let cfg = DropBlock::new(0.3, 2).unwrap();
    let shape = [1, 1, 2, 2, 2];
    assert_eq!(seed_threshold(&cfg, &[2, 2, 2]), 1_288_490_189);
    // Seed 0: word 0x6627e8d5 >= t, nothing drawn; seed 4: word 0x21e6f369 < t, all dropped.
    assert_words(0, [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
    assert_words(4, [0x21e6f369, 0xb5ff4857, 0xabb2f1eb, 0xf4e2bdc5]);
    let x = [2.5f32; 8];
    let f = forward(&cfg, &shape, &x, PhiloxState::new(0, 0)).unwrap();
    assert_eq!((f.mask, f.counts, f.scales), (vec![0xff], vec![8], vec![1.0]));
    assert_eq!(f.y, x.to_vec());
    let f = forward(&cfg, &shape, &x, PhiloxState::new(4, 0)).unwrap();
    assert_eq!((f.mask, f.counts, f.scales), (vec![0], vec![0], vec![0.0]));
    assert!(f.y.iter().all(|v| v.to_bits() == 0));

    // A map smaller than the block: [2, 1, 1, 3], block 5 -> b = (1, 3), one seed per plane;
    // gamma = 0.3 * 3 / (3 * 1), t = 1288490189 again. Seed 6: word 0 = 0x3e39ef63 < t drops
    // sample 0, word 1 = 0x75674f0c >= t keeps sample 1.
    let shape = [2, 1, 1, 3];
    assert_words(6, [0x3e39ef63, 0x75674f0c, 0x3d8b9480, 0x5183a4d7]);
    for (normalize, expect) in [
        (Normalize::Global, [2.0f32, 2.0]), // numel 6 / 3 kept
        (Normalize::PerSample, [0.0, 1.0]),
        (Normalize::Off, [1.0, 1.0]),
    ] {
        let cfg = DropBlock::new(0.3, 5).unwrap().with_normalize(normalize);
        assert_eq!(seed_threshold(&cfg, &[1, 3]), 1_288_490_189);
        let x = [1.0f32, -2.0, 3.0, f32::NAN, -5.0, 0.25];
        let f = forward(&cfg, &shape, &x, PhiloxState::new(6, 0)).unwrap();
        assert_eq!(f.mask, vec![0b111_000]);
        assert_eq!(f.counts, vec![0, 3]);
        assert_eq!(f.scales, expect.to_vec());
        let s = expect[1];
        assert_eq!(bits(&f.y[..3]), vec![0, 0, 0]);
        assert!(f.y[3].is_nan());
        assert_eq!(f.y[4..], [-5.0 * s, 0.25 * s]);
    }

    // Shared channels: [2, 3, 1, 3] with the same seed uses planes 0 and 1 for samples 0 and 1.
    let cfg = DropBlock::new(0.3, 5).unwrap().with_shared_channels(true);
    let k = keep(&cfg, &[2, 3, 1, 3], PhiloxState::new(6, 0)).unwrap();
    let expect: Vec<bool> = (0..18).map(|e| e >= 9).collect();
    assert_eq!(k, expect);
}

/// A seed whose word equals the threshold is not drawn (`<`, not `<=`). On a 1 x 1 map gamma is p
/// (times gamma_scale 1), and w / 2^32 is exact in f64, so p = w / 2^32 gives t = w exactly.
#[test]
fn seed_boundary_is_exclusive() {
    let state = PhiloxState::new(0xabc, 0xdef);
    let shape = [1, 5, 1, 1];
    for q in 0..5u64 {
        let w = u64::from(element_word(state, q));
        for (t, drawn) in [(w, false), (w + 1, true)] {
            let p = t as f64 / TWO_POW_32 as f64;
            let cfg = DropBlock::new(p, 3).unwrap();
            assert_eq!(seed_threshold(&cfg, &[1, 1]), t);
            assert_eq!(
                seeds(&cfg, &shape, state).unwrap()[q as usize],
                drawn,
                "plane {q}, t {t}"
            );
            assert_eq!(keep(&cfg, &shape, state).unwrap()[q as usize], !drawn);
        }
    }
}

/// gamma is evaluated exactly as `gamma_scale * p * spatial / (vol * valid)`: these p values sit
/// at a rounding tie of `gamma * 2^32` where the grouping `gamma_scale * p * (spatial / (vol *
/// valid))` lands one ulp away and rounds the threshold the other way (found by searching p values
/// near ties; the alternative thresholds are given for reference).
#[test]
fn gamma_evaluation_order_is_exact() {
    // (map, block, p bits, threshold in the spec's order, threshold with the other grouping)
    for (dims, block, p_bits, t, t_other) in [
        (
            [5usize, 7],
            3,
            0x3fcf_6281_87f6_db6du64,
            273_025_607u64,
            273_025_606u64,
        ),
        ([7, 7], 2, 0x3fd9_11d8_ae7d_6343, 572_483_309, 572_483_310),
    ] {
        let p = f64::from_bits(p_bits);
        let cfg = DropBlock::new(p, block).unwrap();
        assert_eq!(seed_threshold(&cfg, &dims), t, "dims {dims:?} p {p}");
        let b = dims.map(|s| block.min(s));
        let (spatial, vol) = ((dims[0] * dims[1]) as f64, (b[0] * b[1]) as f64);
        let valid = ((dims[0] - b[0] + 1) * (dims[1] - b[1] + 1)) as f64;
        let other = 1.0 * p * (spatial / (vol * valid));
        assert_eq!((other * 4294967296.0).round() as u64, t_other);
    }
}

/// The scales are computed in f64 and rounded once: for numel = 4097 * 4099 = 16793603 (not an
/// f32 value) and K = 1000003 kept, numel / K = 16.7935526... rounds to 0x41865932, while an
/// all-f32 computation (16793604 / 1000003) would give 0x41865933.
#[test]
fn scales_are_computed_in_f64() {
    let shape = [1, 1, 4097, 4099];
    for normalize in [Normalize::Global, Normalize::PerSample] {
        let cfg = DropBlock::new(0.1, 7).unwrap().with_normalize(normalize);
        let s = scales(&cfg, &shape, &[1_000_003]).unwrap();
        assert_eq!(s[0].to_bits(), 0x4186_5932, "{normalize:?}");
        assert_ne!((16_793_603.0f32 / 1_000_003.0f32).to_bits(), 0x4186_5932);
    }
}
