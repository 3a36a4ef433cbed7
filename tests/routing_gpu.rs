//! Token routing on the GPU vs the CPU reference (`reference::skip`), bit for bit: selections
//! (offsets and ascending indices) for per-sequence top-k and the global budget, the global
//! threshold, token gathers, gated scatter-adds and both backward kernels, over random batch
//! shapes, hidden sizes, capacities (0, above S, fractions), score distributions (distinct, few
//! distinct values, NaN / -0 / infinities, all equal), padding (mask, lengths, none, everywhere),
//! dtypes, views that break 16-byte alignment, and index capacities or compact buffers smaller than
//! the selected count (rows beyond them are never written). Long sequences (> 32768 tokens, also
//! beyond the shared-memory path), rows of more than 2^16 elements, > 1024 sequences, invalid
//! arguments, and (named `huge`) a tensor of more than 2^32 elements.
//!
//! The first tests need no GPU (host-side bounds and threshold decoding); the others print a
//! SKIPPED line without one. `DROPFUSE_PROPTEST_CASES` raises the random cases per property
//! (default 24).

mod common;

use common::data::{splitmix, sprinkled, unit};
use common::guard::{dl, same_bits, upload_at};
use common::{config, gpu, invalid_name, ok, run_cases};
use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::reference::skip::{self as reference, score_key, Routing, ValidTokens};
use dropfuse::routing::{
    self, max_selected_global, max_selected_top_k, threshold_of_key, Capacity, TokenRouting, Valid,
};
use dropfuse::{Device, Element};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

const GUARD: usize = 3;

/// Gate scores: 0 distinct-ish random, 1 few distinct values (heavy ties), 2 special values
/// (NaN, -0, +0, infinities, subnormals), 3 all equal, 4 random with 10% NaN.
fn scores(n: usize, mode: u8, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let specials = [
        f32::NAN,
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::MAX,
        f32::MIN,
        -f32::NAN,
    ];
    (0..n)
        .map(|_| match mode {
            0 => unit(&mut s) * 8.0 - 4.0,
            1 => [-1.0, 0.0, 0.5, 2.0][(splitmix(&mut s) % 4) as usize],
            2 => specials[(splitmix(&mut s) % specials.len() as u64) as usize],
            3 => 0.25,
            _ => {
                if splitmix(&mut s) % 10 == 0 {
                    f32::NAN
                } else {
                    unit(&mut s) - 0.5
                }
            }
        })
        .collect()
}

/// Data values in [-8, 8) with a sprinkle of infinities, NaN and -0.
fn values<T: Element>(n: usize, seed: u64) -> Vec<T> {
    sprinkled(n, seed, 8.0, 101, &[f32::INFINITY, f32::NAN, -0.0])
}

/// Which tokens are real, in both forms: host (reference) and device.
#[derive(Debug, Clone)]
enum Pad {
    All,
    Mask(Vec<bool>),
    Lengths(Vec<usize>),
}

impl Pad {
    fn reference(&self) -> ValidTokens<'_> {
        match self {
            Pad::All => ValidTokens::All,
            Pad::Mask(m) => ValidTokens::Mask(m),
            Pad::Lengths(l) => ValidTokens::Lengths(l),
        }
    }
}

/// The device copies of a [`Pad`]; `valid()` borrows them.
enum DevPad {
    All,
    Mask(CudaSlice<bool>),
    Lengths(CudaSlice<u32>),
}

impl DevPad {
    fn new(dev: &Device, pad: &Pad) -> Self {
        match pad {
            Pad::All => DevPad::All,
            Pad::Mask(m) => DevPad::Mask(dev.upload(m).unwrap()),
            Pad::Lengths(l) => DevPad::Lengths(
                dev.upload(&l.iter().map(|&v| v as u32).collect::<Vec<_>>())
                    .unwrap(),
            ),
        }
    }
    fn valid(&self) -> Valid<'_> {
        match self {
            DevPad::All => Valid::All,
            DevPad::Mask(m) => Valid::Mask(m),
            DevPad::Lengths(l) => Valid::Lengths(l),
        }
    }
}

/// Padding of a `batch x seq_len` batch: kind 0 none, 1 a random mask of the given density, 2
/// random lengths (0 ..= S), 3 everything padding (a mask of false), 4 lengths of 0.
fn pad(kind: u8, batch: usize, seq_len: usize, density: f64, seed: u64) -> Pad {
    let mut s = seed;
    match kind {
        0 => Pad::All,
        1 => Pad::Mask(
            (0..batch * seq_len)
                .map(|_| (unit(&mut s) as f64) < density)
                .collect(),
        ),
        2 => Pad::Lengths(
            (0..batch)
                .map(|_| (splitmix(&mut s) % (seq_len as u64 + 1)) as usize)
                .collect(),
        ),
        3 => Pad::Mask(vec![false; batch * seq_len]),
        _ => Pad::Lengths(vec![0; batch]),
    }
}

/// The GPU routing against the reference's: offsets (the true counts) and the first
/// `min(total, capacity)` indices.
fn same_routing(dev: &Device, got: &TokenRouting, want: &Routing, what: &str) -> Result<(), TestCaseError> {
    let (offsets, indices) = ok(got.download(dev.stream()), "download routing")?;
    prop_assert_eq!(&offsets[..], want.offsets(), "{}: offsets", what);
    let n = want.total().min(got.capacity());
    prop_assert_eq!(&indices[..], &want.indices()[..n], "{}: indices", what);
    let checked = got.check_capacity(dev.stream(), usize::MAX);
    if want.total() > got.capacity() {
        prop_assert_eq!(invalid_name(checked), "capacity", "{}: capacity check", what);
    } else {
        prop_assert_eq!(ok(checked, "check_capacity")?, want.total(), "{}: total", what);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Host-side (no GPU)

#[test]
fn max_selected_bounds_every_reference_selection() {
    let mut runner = TestRunner::new(config(256));
    let strategy = (
        1usize..6,
        1usize..40,
        0u8..5,
        0u8..5,
        0usize..50,
        0.0f64..=1.0,
        any::<u64>(),
    );
    runner
        .run(&strategy, |(b, s, mode, kind, k, c, seed)| {
            let sc = scores(b * s, mode, seed);
            let p = pad(kind, b, s, 0.6, !seed);
            for cap in [Capacity::Tokens(k), Capacity::Fraction(c)] {
                let r = reference::route_top_k(&sc, s, p.reference(), cap).unwrap();
                let bound = max_selected_top_k(b, s, cap).unwrap();
                prop_assert!(r.total() <= bound);
                if matches!(p, Pad::All) {
                    prop_assert_eq!(r.total(), bound, "the bound is reached without padding");
                }
            }
            let (g, _) = reference::route_global(&sc, s, p.reference(), c).unwrap();
            let bound = max_selected_global(b, s, c).unwrap();
            prop_assert!(g.total() <= bound);
            if matches!(p, Pad::All) {
                prop_assert_eq!(g.total(), bound);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn threshold_of_key_inverts_the_score_key() {
    let mut specials = scores(0, 2, 0);
    specials.extend([
        f32::NAN,
        -f32::NAN,
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        1.5,
        -2.25,
    ]);
    specials.extend(scores(10_000, 0, 5));
    specials.extend((0..10_000u32).map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B9))));
    for s in specials {
        let back = threshold_of_key(score_key(s)).expect("a key of a score");
        if s.is_nan() {
            assert!(back.is_nan(), "{s:?}");
        } else if s == 0.0 {
            assert_eq!(back.to_bits(), 0, "zero is canonical +0");
        } else {
            assert_eq!(back.to_bits(), s.to_bits(), "{s:?}");
        }
    }
    assert_eq!(threshold_of_key(u32::MAX), None);
}

#[test]
fn host_bounds_validate_their_arguments() {
    assert_eq!(
        invalid_name(max_selected_top_k(1, 0, Capacity::Tokens(1))),
        "seq_len"
    );
    assert_eq!(
        invalid_name(max_selected_top_k(0, 4, Capacity::Tokens(1))),
        "batch"
    );
    assert_eq!(
        invalid_name(max_selected_top_k(1 << 17, 1 << 16, Capacity::Tokens(1))),
        "batch"
    );
    for c in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            invalid_name(max_selected_top_k(2, 4, Capacity::Fraction(c))),
            "capacity"
        );
        assert_eq!(invalid_name(max_selected_global(2, 4, c)), "keep_fraction");
    }
    assert_eq!(invalid_name(max_selected_global(0, 4, 0.5)), "batch");
    assert_eq!(max_selected_top_k(3, 10, Capacity::Tokens(20)).unwrap(), 30);
    assert_eq!(max_selected_top_k(3, 5, Capacity::Fraction(0.5)).unwrap(), 9);
    assert_eq!(max_selected_global(3, 5, 0.5).unwrap(), 8);
    assert_eq!(
        max_selected_global((1 << 16) - 1, 1 << 16, 1.0).unwrap(),
        u32::MAX as usize - 65535
    );
}

// ------------------------------------------------------------------------------------------------
// Selection

#[derive(Debug, Clone)]
struct SelCase {
    batch: usize,
    seq_len: usize,
    mode: u8,
    pad_kind: u8,
    density: f64,
    capacity: Capacity,
    keep_fraction: f64,
    /// 0: index capacity = the host bound; 1: the exact total; 2: below the total (truncated).
    room: u8,
    seed: u64,
}

fn sel_case() -> impl Strategy<Value = SelCase> {
    let seq = prop_oneof![4 => 1usize..=40, 2 => 40usize..=700, 1 => 700usize..=5000];
    let capacity = prop_oneof![
        Just(Capacity::Tokens(0)),
        (0usize..=64).prop_map(Capacity::Tokens),
        Just(Capacity::Tokens(usize::MAX)),
        Just(Capacity::Fraction(0.0)),
        Just(Capacity::Fraction(1.0)),
        Just(Capacity::Fraction(0.5)),
        (0.0f64..=1.0).prop_map(Capacity::Fraction),
    ];
    let q = prop_oneof![Just(0.0), Just(1.0), Just(0.5), 0.0f64..=1.0];
    (
        1usize..=5,
        seq,
        0u8..5,
        0u8..5,
        0.0f64..=1.0,
        capacity,
        q,
        0u8..3,
        any::<u64>(),
    )
        .prop_map(
            |(batch, seq_len, mode, pad_kind, density, capacity, keep_fraction, room, seed)| SelCase {
                batch,
                seq_len,
                mode,
                pad_kind,
                density,
                capacity,
                keep_fraction,
                room,
                seed,
            },
        )
}

fn room(c: u8, bound: usize, total: usize) -> usize {
    match c {
        0 => bound,
        1 => total,
        _ => total.saturating_sub(1 + total / 3),
    }
}

fn check_selection(dev: &Device, c: &SelCase) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let (b, n) = (c.batch, c.seq_len);
    let sc = scores(b * n, c.mode, c.seed);
    let p = pad(c.pad_kind, b, n, c.density, !c.seed);
    let sd = dev.upload(&sc).unwrap();
    let pd = DevPad::new(dev, &p);

    let want = ok(
        reference::route_top_k(&sc, n, p.reference(), c.capacity),
        "reference top-k",
    )?;
    let bound = ok(max_selected_top_k(b, n, c.capacity), "bound")?;
    let mut r = ok(
        TokenRouting::new(s, b, n, room(c.room, bound, want.total())),
        "new",
    )?;
    ok(r.top_k(s, &sd, pd.valid(), c.capacity), "top_k")?;
    same_routing(dev, &r, &want, "top-k")?;
    prop_assert_eq!(invalid_name(r.threshold(s)), "routing");

    let (want, threshold) = ok(
        reference::route_global(&sc, n, p.reference(), c.keep_fraction),
        "reference global",
    )?;
    let bound = ok(max_selected_global(b, n, c.keep_fraction), "bound")?;
    let mut g = ok(
        TokenRouting::new(s, b, n, room(c.room, bound, want.total())),
        "new",
    )?;
    ok(g.global(s, &sd, pd.valid(), c.keep_fraction), "global")?;
    same_routing(dev, &g, &want, "global")?;
    let got = ok(g.threshold(s), "threshold")?;
    prop_assert_eq!(
        got.map(|v| v.is_nan()),
        threshold.map(|v| v.is_nan()),
        "threshold"
    );
    if let (Some(x), Some(y)) = (got, threshold) {
        if !y.is_nan() {
            prop_assert_eq!(x.to_bits(), y.to_bits(), "threshold bits");
        }
    }
    // The same routing object refilled by the other selection (no stale state).
    ok(
        g.top_k(s, &sd, pd.valid(), Capacity::Tokens(n)),
        "top_k after global",
    )?;
    let all = ok(
        reference::route_top_k(&sc, n, p.reference(), Capacity::Tokens(n)),
        "reference",
    )?;
    same_routing(dev, &g, &all, "top-k after global")?;
    Ok(())
}

#[test]
fn gpu_routing_selection_matches_reference() {
    run_cases(
        "gpu_routing_selection_matches_reference",
        48,
        sel_case(),
        |dev, c| check_selection(dev, &c),
    );
}

fn fixed_sel(
    batch: usize,
    seq_len: usize,
    mode: u8,
    pad_kind: u8,
    capacity: Capacity,
    q: f64,
    seed: u64,
) -> SelCase {
    SelCase {
        batch,
        seq_len,
        mode,
        pad_kind,
        density: 0.7,
        capacity,
        keep_fraction: q,
        room: (seed % 3) as u8,
        seed,
    }
}

/// All or none selected, padding everywhere, one-row batches, one-token sequences, every score
/// special, more than 1024 sequences (the offsets scan carries across chunks), and sequences of
/// more than 32768 tokens: in shared memory (40000 keys, 160 KB) and beyond it (70000 and 2^20
/// tokens, keys re-read from global memory on each radix pass).
#[test]
fn gpu_routing_selection_edge_cases() {
    let Some(dev) = gpu("gpu_routing_selection_edge_cases") else {
        return;
    };
    let mut cases = Vec::new();
    for (i, &(b, s)) in [(1usize, 1usize), (1, 7), (3, 1), (2, 33), (3000, 7), (1100, 1)]
        .iter()
        .enumerate()
    {
        for mode in 0..5u8 {
            for pad_kind in 0..5u8 {
                for (j, cap) in [
                    Capacity::Tokens(0),
                    Capacity::Tokens(s + 3),
                    Capacity::Fraction(1.0),
                    Capacity::Fraction(0.5),
                    Capacity::Tokens(1),
                ]
                .into_iter()
                .enumerate()
                {
                    let q = [0.0, 1.0, 0.5, 0.3, 0.999][j];
                    cases.push(fixed_sel(b, s, mode, pad_kind, cap, q, (i * 100 + j) as u64));
                }
            }
        }
    }
    for &(b, s) in &[(2usize, 40_000usize), (1, 70_000), (3, 32_769)] {
        for mode in [0u8, 1, 4] {
            for pad_kind in [0u8, 1, 2] {
                cases.push(fixed_sel(
                    b,
                    s,
                    mode,
                    pad_kind,
                    Capacity::Tokens(s / 2),
                    0.5,
                    s as u64 + mode as u64,
                ));
                cases.push(fixed_sel(
                    b,
                    s,
                    mode,
                    pad_kind,
                    Capacity::Fraction(0.3),
                    0.125,
                    7 + pad_kind as u64,
                ));
            }
        }
    }
    // Keys of 48000 and 49152 bytes: static + dynamic shared memory above 48 KB needs the opt-in
    // (the launch failed before the launcher compared the keys with the kernel's current limit).
    for (b, s) in [(1usize, 12_000usize), (2, 12_288)] {
        for pad_kind in [0u8, 1] {
            cases.push(fixed_sel(
                b,
                s,
                0,
                pad_kind,
                Capacity::Fraction(0.3),
                0.25,
                21 + pad_kind as u64,
            ));
        }
    }
    cases.push(fixed_sel(1, 1 << 20, 1, 1, Capacity::Fraction(0.5), 0.5, 11));
    cases.push(fixed_sel(1, 1 << 20, 0, 0, Capacity::Tokens(12_345), 0.01, 12));
    for c in &cases {
        check_selection(&dev, c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// More sequences than the per-sequence kernels have blocks (2^20: each block then walks several
/// sequences, reusing its shared memory), and row kernels over more than 1024 sequences (the
/// offsets are searched in global memory rather than in a shared-memory copy).
#[test]
fn gpu_routing_more_sequences_than_blocks() {
    let Some(dev) = gpu("gpu_routing_more_sequences_than_blocks") else {
        return;
    };
    let b = (1usize << 20) + 3;
    // One case (the reference takes a while in a debug build): heavy ties, a padding mask.
    let c = fixed_sel(b, 3, 1, 1, Capacity::Tokens(1), 0.5, 1);
    check_selection(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    for (i, &(batch, seq_len, hidden)) in [(1100usize, 5usize, 8usize), (1500, 3, 7)].iter().enumerate() {
        for offs in [[0, 0, 0, 0], [1, 2, 3, 1]] {
            let c = fixed_rows(batch, seq_len, hidden, 2, offs, 40 + i as u64);
            check_rows::<f32>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            check_rows::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
    }
}

/// Device lengths above S are read as S (the reference rejects them; the kernel cannot check
/// them without a host read).
#[test]
fn gpu_routing_lengths_above_seq_len_are_clamped() {
    let Some(dev) = gpu("gpu_routing_lengths_above_seq_len_are_clamped") else {
        return;
    };
    let s = dev.stream();
    let (b, n) = (3, 9);
    let sc = scores(b * n, 1, 3);
    let lens_dev = dev.upload(&[4u32, 9, u32::MAX]).unwrap();
    let lens_ref = [4usize, 9, 9];
    let want = reference::route_top_k(&sc, n, ValidTokens::Lengths(&lens_ref), Capacity::Tokens(5)).unwrap();
    let mut r = TokenRouting::new(s, b, n, 15).unwrap();
    r.top_k(s, &sd(&dev, &sc), Valid::Lengths(&lens_dev), Capacity::Tokens(5))
        .unwrap();
    same_routing(&dev, &r, &want, "lengths").unwrap();
    let (want, _) = reference::route_global(&sc, n, ValidTokens::Lengths(&lens_ref), 0.4).unwrap();
    r.global(s, &sd(&dev, &sc), Valid::Lengths(&lens_dev), 0.4)
        .unwrap();
    same_routing(&dev, &r, &want, "lengths, global").unwrap();
}

/// -0 and +0 are one key: at a selection boundary made of both, the lowest indices win whatever
/// the sign (a key that kept the sign would rank every +0 before every -0). The random cases draw
/// such a boundary rarely; here every selection cuts through a run of signed zeros.
#[test]
fn gpu_routing_signed_zeros_tie() {
    let Some(dev) = gpu("gpu_routing_signed_zeros_tie") else {
        return;
    };
    let s = dev.stream();
    let n = 6;
    // Sequence 0: zeros after a 1.0; sequence 1: zeros only, -0 first.
    let sc = [
        1.0f32, -0.0, 0.0, -0.0, 0.0, -1.0, -0.0, -0.0, 0.0, -0.0, 0.0, 0.0,
    ];
    let scd = sd(&dev, &sc);
    let mut r = TokenRouting::new(s, 2, n, 2 * n).unwrap();
    for k in 1..=4 {
        let want = reference::route_top_k(&sc, n, ValidTokens::All, Capacity::Tokens(k)).unwrap();
        r.top_k(s, &scd, Valid::All, Capacity::Tokens(k)).unwrap();
        same_routing(&dev, &r, &want, &format!("top-{k}")).unwrap();
    }
    for q in [0.25, 0.5, 0.75] {
        let (want, threshold) = reference::route_global(&sc, n, ValidTokens::All, q).unwrap();
        r.global(s, &scd, Valid::All, q).unwrap();
        same_routing(&dev, &r, &want, &format!("global {q}")).unwrap();
        assert_eq!(
            r.threshold(s).unwrap().map(f32::to_bits),
            threshold.map(f32::to_bits),
            "threshold of global {q}"
        );
    }
}

/// Totals above an index capacity of 64 or 128 entries (index buffers of 256 and 512 bytes, which
/// end exactly at their allocation's end on the emulated device, where a guard page follows): the
/// selections write entries below the capacity only (an emission that also wrote entry
/// `capacity` passed every other test: the random capacities leave slack after the buffer's
/// end). On a GPU such a write lands in the allocation's padding: compute-sanitizer's memcheck
/// reports it.
#[test]
fn gpu_routing_truncated_index_buffer_ends_at_capacity() {
    let Some(dev) = gpu("gpu_routing_truncated_index_buffer_ends_at_capacity") else {
        return;
    };
    let s = dev.stream();
    let (b, n) = (3, 70);
    let sc = scores(b * n, 1, 17);
    let scd = sd(&dev, &sc);
    for cap in [64usize, 128] {
        let mut r = TokenRouting::new(s, b, n, cap).unwrap();
        // Totals 90, 150 and 210: above 64, around and above 128.
        for k in [30usize, 50, 70] {
            let want = reference::route_top_k(&sc, n, ValidTokens::All, Capacity::Tokens(k)).unwrap();
            r.top_k(s, &scd, Valid::All, Capacity::Tokens(k)).unwrap();
            same_routing(&dev, &r, &want, &format!("top-{k}, capacity {cap}")).unwrap();
        }
        for q in [0.5, 0.9] {
            let (want, _) = reference::route_global(&sc, n, ValidTokens::All, q).unwrap();
            r.global(s, &scd, Valid::All, q).unwrap();
            same_routing(&dev, &r, &want, &format!("global {q}, capacity {cap}")).unwrap();
        }
    }
}

/// A global selection whose whole budget is ties (every score equal, some padding) over 1500 and
/// 2100 sequences: the offsets kernel walks the sequences 1024 at a time and carries the ties
/// already granted from one step to the next, lowest flat index first. A cheap stand-in for
/// gpu_routing_more_sequences_than_blocks (minutes on the emulated device), which the quick set
/// leaves out: without it, a carry reset at each step of 1024 passed every test.
#[test]
fn gpu_routing_global_ties_across_more_than_1024_sequences() {
    let Some(dev) = gpu("gpu_routing_global_ties_across_more_than_1024_sequences") else {
        return;
    };
    let s = dev.stream();
    for (b, n) in [(1500usize, 3usize), (2100, 2)] {
        let sc = vec![0.25f32; b * n];
        let scd = sd(&dev, &sc);
        let lengths: Vec<usize> = (0..b).map(|i| (i * 7) % (n + 1)).collect();
        let p = Pad::Lengths(lengths);
        let pd = DevPad::new(&dev, &p);
        let mut r = TokenRouting::new(s, b, n, b * n).unwrap();
        for q in [0.3, 0.5, 0.8] {
            let (want, _) = reference::route_global(&sc, n, p.reference(), q).unwrap();
            r.global(s, &scd, pd.valid(), q).unwrap();
            same_routing(&dev, &r, &want, &format!("B {b}, global {q}")).unwrap();
        }
    }
}

/// Budgets `round(c * V)` whose product rounds differently in f32: 0.29 * 50 is 14.499... in f64
/// (14 tokens) but 14.5 in f32 (15), 0.58 * 25 likewise, 0.42 * 75 is 31.5 in f64 (32) but below
/// it in f32 (31). A budget computed in f32 passed every other test.
#[test]
fn gpu_routing_budget_product_in_f64() {
    let Some(dev) = gpu("gpu_routing_budget_product_in_f64") else {
        return;
    };
    let s = dev.stream();
    for (c, v) in [(0.29f64, 50usize), (0.58, 25), (0.42, 75)] {
        // Top-k: two sequences of S = 80 with V valid tokens each (lengths).
        let (b, n) = (2usize, 80usize);
        let sc = scores(b * n, 0, v as u64);
        let scd = sd(&dev, &sc);
        let p = Pad::Lengths(vec![v; b]);
        let pd = DevPad::new(&dev, &p);
        let mut r = TokenRouting::new(s, b, n, b * n).unwrap();
        let want = reference::route_top_k(&sc, n, p.reference(), Capacity::Fraction(c)).unwrap();
        r.top_k(s, &scd, pd.valid(), Capacity::Fraction(c)).unwrap();
        same_routing(&dev, &r, &want, &format!("top-k {c} of {v}")).unwrap();
        // Global: one sequence of V valid tokens.
        let sc1 = &sc[..v];
        let sc1d = sd(&dev, sc1);
        let mut g = TokenRouting::new(s, 1, v, v).unwrap();
        let (want, _) = reference::route_global(sc1, v, ValidTokens::All, c).unwrap();
        g.global(s, &sc1d, Valid::All, c).unwrap();
        same_routing(&dev, &g, &want, &format!("global {c} of {v}")).unwrap();
    }
}

fn sd(dev: &Device, v: &[f32]) -> CudaSlice<f32> {
    dev.upload(v).unwrap()
}

// ------------------------------------------------------------------------------------------------
// Rows

#[derive(Debug, Clone)]
struct RowCase {
    batch: usize,
    seq_len: usize,
    hidden: usize,
    k: usize,
    global: bool,
    keep_fraction: f64,
    pad_kind: u8,
    mode: u8,
    /// Routing from the GPU selection (false: uploaded from the reference).
    select_on_gpu: bool,
    /// Index capacity relative to the total: -1 below it, 0 equal, +n above.
    cap_delta: i64,
    /// Rows of the compact buffers relative to the total.
    rows_delta: i64,
    /// View offsets in elements (non-zero offsets break 16-byte alignment).
    offs: [usize; 4],
    seed: u64,
}

fn row_case() -> impl Strategy<Value = RowCase> {
    let hidden = prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 4, 7, 8, 16, 24, 31, 32, 33, 64, 100, 256]),
        1 => 1usize..=1100,
    ];
    let delta = prop_oneof![3 => Just(0i64), 2 => 1i64..=3, 1 => Just(-1i64), 1 => Just(-3i64)];
    (
        (1usize..=4, 1usize..=60, hidden),
        (0usize..=70, any::<bool>(), 0.0f64..=1.0, 0u8..3, 0u8..5),
        (any::<bool>(), delta.clone(), delta),
        (0usize..9, 0usize..9, 0usize..9, 0usize..9),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, seq_len, hidden),
                (k, global, keep_fraction, pad_kind, mode),
                (select_on_gpu, cap_delta, rows_delta),
                (a, b, c, d),
                seed,
            )| RowCase {
                batch,
                seq_len,
                hidden,
                k,
                global,
                keep_fraction,
                pad_kind,
                mode,
                select_on_gpu,
                cap_delta,
                rows_delta,
                offs: [a, b, c, d],
                seed,
            },
        )
}

fn plus(total: usize, delta: i64) -> usize {
    (total as i64 + delta).max(0) as usize
}

/// `(compact row, flat token)` of every selected token.
fn pairs(r: &Routing) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for b in 0..r.batch() {
        let lo = r.offsets()[b] as usize;
        for (i, &t) in r.sequence(b).unwrap().iter().enumerate() {
            out.push((lo + i, b * r.seq_len() + t as usize));
        }
    }
    out
}

fn check_rows<T: Element>(dev: &Device, c: &RowCase) -> Result<(), TestCaseError> {
    let s = dev.stream();
    let (b, n, h) = (c.batch, c.seq_len, c.hidden);
    let tokens = b * n;
    let sc = scores(tokens, c.mode, c.seed);
    let p = pad(c.pad_kind, b, n, 0.6, c.seed ^ 1);
    let want = if c.global {
        ok(
            reference::route_global(&sc, n, p.reference(), c.keep_fraction),
            "reference",
        )?
        .0
    } else {
        ok(
            reference::route_top_k(&sc, n, p.reference(), Capacity::Tokens(c.k)),
            "reference",
        )?
    };
    let total = want.total();
    let capacity = plus(total, c.cap_delta);
    let rows = plus(total, c.rows_delta);
    let limit = total.min(capacity).min(rows);
    let routing = if c.select_on_gpu {
        let mut r = ok(TokenRouting::new(s, b, n, capacity), "new")?;
        let pd = DevPad::new(dev, &p);
        let sd = dev.upload(&sc).unwrap();
        if c.global {
            ok(r.global(s, &sd, pd.valid(), c.keep_fraction), "global")?;
        } else {
            ok(r.top_k(s, &sd, pd.valid(), Capacity::Tokens(c.k)), "top_k")?;
        }
        r
    } else if capacity >= total {
        ok(TokenRouting::upload(s, &want, capacity), "upload")?
    } else {
        prop_assert_eq!(invalid_name(TokenRouting::upload(s, &want, capacity)), "capacity");
        return Ok(());
    };
    let pairs = pairs(&want);
    let sentinel = T::from_f32(-12345.0);
    let [o1, o2, o3, o4] = c.offs;

    // Gather into a sentinel-filled compact buffer of `rows` rows.
    let x = values::<T>(tokens * h, c.seed);
    let xd = upload_at(dev, o1, &x, sentinel, GUARD)?;
    let mut outd = upload_at(dev, o2, &vec![sentinel; rows * h], sentinel, GUARD)?;
    ok(
        routing::gather_tokens(
            s,
            &routing,
            h,
            &xd.slice(o1..o1 + tokens * h),
            &mut outd.slice_mut(o2..o2 + rows * h),
        ),
        "gather",
    )?;
    let full = ok(reference::gather_tokens(&x, h, &want), "reference gather")?;
    let mut expect = vec![sentinel; o2 + rows * h + GUARD];
    expect[o2..o2 + limit * h].copy_from_slice(&full[..limit * h]);
    same_bits(&dl(dev, &outd)?, &expect, "gather")?;

    // Gated scatter-add: branch of max(total, rows) rows on the host, `rows` of them on the GPU.
    let brows = total.max(rows);
    let branch = values::<T>(brows * h, c.seed ^ 2);
    let mut gs = c.seed ^ 3;
    let gate: Vec<f32> = (0..tokens)
        .map(|i| match i % 13 {
            0 => 0.0,
            1 => -0.0,
            2 => -1.5,
            _ => unit(&mut gs) * 2.0 - 1.0,
        })
        .collect();
    let mut res_want = x.clone();
    ok(
        reference::scatter_add_tokens(&mut res_want, h, &want, &branch, &gate),
        "reference scatter-add",
    )?;
    // Tokens of rows at or beyond the limit keep their value.
    for &(r, flat) in &pairs {
        if r >= limit {
            res_want[flat * h..(flat + 1) * h].copy_from_slice(&x[flat * h..(flat + 1) * h]);
        }
    }
    let mut resd = upload_at(dev, o1, &x, sentinel, GUARD)?;
    let bd = upload_at(dev, o3, &branch[..rows * h], sentinel, GUARD)?;
    let gd = dev.upload(&gate).unwrap();
    ok(
        routing::scatter_add_tokens(
            s,
            &routing,
            h,
            &mut resd.slice_mut(o1..o1 + tokens * h),
            &bd.slice(o3..o3 + rows * h),
            &gd,
        ),
        "scatter_add",
    )?;
    let got = dl(dev, &resd)?;
    same_bits(&got[o1..o1 + tokens * h], &res_want, "scatter-add")?;
    prop_assert!(got[..o1]
        .iter()
        .chain(&got[o1 + tokens * h..])
        .all(|v| v.to_bits_u32() == sentinel.to_bits_u32()));

    // Backward of the scatter-add.
    let dy = values::<T>(tokens * h, c.seed ^ 4);
    let grads = ok(
        reference::scatter_add_tokens_backward(&dy, h, &want, &branch, &gate),
        "reference backward",
    )?;
    let dyd = upload_at(dev, o4, &dy, sentinel, GUARD)?;
    let mut dbd = upload_at(dev, o2, &vec![sentinel; rows * h], sentinel, GUARD)?;
    let dg_fill = f32::from_bits(0xDEAD_BEEF);
    let mut dgd = dev.upload(&vec![dg_fill; tokens + GUARD]).unwrap();
    ok(
        routing::scatter_add_tokens_backward(
            s,
            &routing,
            h,
            &dyd.slice(o4..o4 + tokens * h),
            &bd.slice(o3..o3 + rows * h),
            &gd,
            &mut dbd.slice_mut(o2..o2 + rows * h),
            &mut dgd.slice_mut(..tokens),
        ),
        "scatter_add_backward",
    )?;
    let mut expect = vec![sentinel; o2 + rows * h + GUARD];
    expect[o2..o2 + limit * h].copy_from_slice(&grads.d_branch[..limit * h]);
    same_bits(&dl(dev, &dbd)?, &expect, "d_branch")?;
    let mut d_gate = grads.d_gate.clone();
    for &(r, flat) in &pairs {
        if r >= limit {
            d_gate[flat] = 0.0;
        }
    }
    d_gate.extend([dg_fill; GUARD]);
    same_bits(&dl(dev, &dgd)?, &d_gate, "d_gate (and the guard after it)")?;

    // Backward of the gather, accumulated into d_x.
    let d_c = values::<T>(brows * h, c.seed ^ 5);
    let d_x = values::<T>(tokens * h, c.seed ^ 6);
    let mut dx_want = d_x.clone();
    ok(
        reference::gather_tokens_backward(&d_c, h, &want, &mut dx_want),
        "reference gather backward",
    )?;
    for &(r, flat) in &pairs {
        if r >= limit {
            dx_want[flat * h..(flat + 1) * h].copy_from_slice(&d_x[flat * h..(flat + 1) * h]);
        }
    }
    let dcd = upload_at(dev, o3, &d_c[..rows * h], sentinel, GUARD)?;
    let mut dxd = upload_at(dev, o4, &d_x, sentinel, GUARD)?;
    ok(
        routing::gather_tokens_backward(
            s,
            &routing,
            h,
            &dcd.slice(o3..o3 + rows * h),
            &mut dxd.slice_mut(o4..o4 + tokens * h),
        ),
        "gather_backward",
    )?;
    let got = dl(dev, &dxd)?;
    same_bits(&got[o4..o4 + tokens * h], &dx_want, "d_x")?;
    prop_assert!(
        got[..o4]
            .iter()
            .chain(&got[o4 + tokens * h..])
            .all(|v| v.to_bits_u32() == sentinel.to_bits_u32()),
        "d_x: guard elements written"
    );

    // The capacity check sees what the kernels could not.
    let checked = routing.check_capacity(s, rows);
    if total > capacity.min(rows) {
        prop_assert_eq!(invalid_name(checked), "capacity");
    } else {
        prop_assert_eq!(ok(checked, "check_capacity")?, total);
    }
    Ok(())
}

fn run_rows<T: Element>(test: &str) {
    run_cases(test, 24, row_case(), |dev, c| check_rows::<T>(dev, &c));
}

#[test]
fn gpu_routing_rows_match_reference_f32() {
    run_rows::<f32>("gpu_routing_rows_match_reference_f32");
}

#[test]
fn gpu_routing_rows_match_reference_f16() {
    run_rows::<f16>("gpu_routing_rows_match_reference_f16");
}

#[test]
fn gpu_routing_rows_match_reference_bf16() {
    run_rows::<bf16>("gpu_routing_rows_match_reference_bf16");
}

fn fixed_rows(batch: usize, seq_len: usize, hidden: usize, k: usize, offs: [usize; 4], seed: u64) -> RowCase {
    RowCase {
        batch,
        seq_len,
        hidden,
        k,
        global: seed % 2 == 1,
        keep_fraction: 0.5,
        pad_kind: (seed % 3) as u8,
        mode: (seed % 5) as u8,
        select_on_gpu: true,
        cap_delta: 0,
        rows_delta: (seed % 3) as i64,
        offs,
        seed,
    }
}

/// Rows of more than 2^16 elements (vector and scalar paths; d_gate sums over 2000+ chunks),
/// one-token batches, and every token selected or none.
#[test]
fn gpu_routing_rows_edge_shapes() {
    let Some(dev) = gpu("gpu_routing_rows_edge_shapes") else {
        return;
    };
    let shapes = [
        (2usize, 3usize, 65_544usize, 2usize), // 2^16 + 8: vectors
        (2, 3, 70_001, 2),                     // odd: scalar
        (1, 1, 5, 1),
        (1, 1, 8, 0),
        (3, 5, 9, 5),
        (1, 64, 4096, 64),
        (2, 17, 24, 0),
    ];
    for (i, &(b, s, h, k)) in shapes.iter().enumerate() {
        for offs in [[0, 0, 0, 0], [1, 3, 5, 7]] {
            let c = fixed_rows(b, s, h, k, offs, i as u64 + 10 * offs[0] as u64);
            check_rows::<f32>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            check_rows::<f16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            check_rows::<bf16>(&dev, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Invalid arguments

/// Every invalid argument is a typed error naming it, and nothing is written.
#[test]
fn gpu_routing_invalid_arguments_write_nothing() {
    let Some(dev) = gpu("gpu_routing_invalid_arguments_write_nothing") else {
        return;
    };
    let s = dev.stream();
    let (b, n, h) = (2usize, 4usize, 3usize);
    assert_eq!(invalid_name(TokenRouting::new(s, b, 0, 4)), "seq_len");
    assert_eq!(invalid_name(TokenRouting::new(s, 0, n, 4)), "batch");
    assert_eq!(invalid_name(TokenRouting::new(s, 1 << 17, 1 << 16, 4)), "batch");
    // capacity * 4 bytes wraps (cudarc does not check): a 4-byte index buffer for 2^62 + 1
    // entries, overrun by the selection.
    assert_eq!(
        invalid_name(TokenRouting::new(s, b, n, (1 << 62) + 1)),
        "capacity"
    );

    let sc = dev.upload(&scores(b * n, 0, 1)).unwrap();
    let sc_short = dev.upload(&scores(b * n - 1, 0, 1)).unwrap();
    let mask_bad = dev.upload(&[true; 7]).unwrap();
    let lens_bad = dev.upload(&[1u32; 3]).unwrap();
    let mut r = TokenRouting::new(s, b, n, 8).unwrap();
    r.top_k(s, &sc, Valid::All, Capacity::Tokens(2)).unwrap();
    let before = r.download(s).unwrap();
    let tk = Capacity::Tokens(1);
    assert_eq!(invalid_name(r.top_k(s, &sc_short, Valid::All, tk)), "scores");
    assert_eq!(invalid_name(r.top_k(s, &sc, Valid::Mask(&mask_bad), tk)), "mask");
    assert_eq!(
        invalid_name(r.top_k(s, &sc, Valid::Lengths(&lens_bad), tk)),
        "lengths"
    );
    for c in [-0.5, 1.01, f64::NAN, f64::INFINITY] {
        assert_eq!(
            invalid_name(r.top_k(s, &sc, Valid::All, Capacity::Fraction(c))),
            "capacity"
        );
        assert_eq!(invalid_name(r.global(s, &sc, Valid::All, c)), "keep_fraction");
    }
    assert_eq!(invalid_name(r.global(s, &sc_short, Valid::All, 0.5)), "scores");
    assert_eq!(
        invalid_name(r.global(s, &sc, Valid::Lengths(&lens_bad), 0.5)),
        "lengths"
    );
    assert_eq!(r.download(s).unwrap(), before, "routing written despite an error");
    assert_eq!(invalid_name(r.threshold(s)), "routing");

    let fill = vec![7.0f32; b * n * h];
    let x = dev.upload(&fill).unwrap();
    let mut res = dev.upload(&fill).unwrap();
    let mut out = dev.upload(&vec![5.0f32; 8 * h]).unwrap();
    let mut out_bad = dev.upload(&vec![5.0f32; 8 * h - 1]).unwrap();
    let gate = dev.upload(&vec![1.0f32; b * n]).unwrap();
    let gate_bad = dev.upload(&vec![1.0f32; b * n + 1]).unwrap();
    let mut d_gate = dev.upload(&vec![9.0f32; b * n]).unwrap();
    let mut d_gate_bad = dev.upload(&vec![9.0f32; b * n - 1]).unwrap();
    let x_bad = dev.upload(&vec![7.0f32; b * n * h + 1]).unwrap();

    assert_eq!(
        invalid_name(routing::gather_tokens(s, &r, 0, &x, &mut out)),
        "hidden"
    );
    assert_eq!(
        invalid_name(routing::gather_tokens(s, &r, h, &x_bad, &mut out)),
        "x"
    );
    assert_eq!(
        invalid_name(routing::gather_tokens(s, &r, h, &x, &mut out_bad)),
        "out"
    );
    assert_eq!(
        invalid_name(routing::scatter_add_tokens(s, &r, 0, &mut res, &out, &gate)),
        "hidden"
    );
    assert_eq!(
        invalid_name(routing::scatter_add_tokens(
            s,
            &r,
            h,
            &mut res.slice_mut(1..),
            &out,
            &gate
        )),
        "residual"
    );
    assert_eq!(
        invalid_name(routing::scatter_add_tokens(s, &r, h, &mut res, &out_bad, &gate)),
        "branch"
    );
    assert_eq!(
        invalid_name(routing::scatter_add_tokens(s, &r, h, &mut res, &out, &gate_bad)),
        "gate"
    );
    let mut d_branch = dev.upload(&vec![3.0f32; 8 * h]).unwrap();
    let bw = |yd: &CudaSlice<f32>,
              br: &CudaSlice<f32>,
              g: &CudaSlice<f32>,
              db: &mut CudaSlice<f32>,
              dg: &mut CudaSlice<f32>| {
        routing::scatter_add_tokens_backward(s, &r, h, yd, br, g, db, dg)
    };
    assert_eq!(
        invalid_name(bw(&x_bad, &out, &gate, &mut d_branch, &mut d_gate)),
        "d_out"
    );
    assert_eq!(
        invalid_name(bw(&x, &out_bad, &gate, &mut d_branch, &mut d_gate)),
        "branch"
    );
    assert_eq!(
        invalid_name(bw(&x, &out, &gate_bad, &mut d_branch, &mut d_gate)),
        "gate"
    );
    assert_eq!(
        invalid_name(bw(&x, &out, &gate, &mut out_bad, &mut d_gate)),
        "d_branch"
    );
    assert_eq!(
        invalid_name(bw(&x, &out, &gate, &mut d_branch, &mut d_gate_bad)),
        "d_gate"
    );
    assert_eq!(
        invalid_name(routing::gather_tokens_backward(s, &r, 0, &out, &mut res)),
        "hidden"
    );
    assert_eq!(
        invalid_name(routing::gather_tokens_backward(
            s,
            &r,
            h,
            &out,
            &mut res.slice_mut(2..)
        )),
        "d_x"
    );
    assert_eq!(
        invalid_name(routing::gather_tokens_backward(s, &r, h, &out_bad, &mut res)),
        "d_compact"
    );

    assert_eq!(
        dev.download(&res).unwrap(),
        fill,
        "residual written despite an error"
    );
    assert_eq!(dev.download(&out).unwrap(), vec![5.0f32; 8 * h]);
    assert_eq!(dev.download(&out_bad).unwrap(), vec![5.0f32; 8 * h - 1]);
    assert_eq!(dev.download(&d_branch).unwrap(), vec![3.0f32; 8 * h]);
    assert_eq!(dev.download(&d_gate).unwrap(), vec![9.0f32; b * n]);

    // Upload: a capacity below the total.
    let host =
        reference::route_top_k(&scores(b * n, 0, 1), n, ValidTokens::All, Capacity::Tokens(3)).unwrap();
    assert_eq!(invalid_name(TokenRouting::upload(s, &host, 5)), "capacity");
}

// ------------------------------------------------------------------------------------------------
// Huge

/// A residual stream of more than 2^32 elements (1 x 65540 x 65536 bf16, 8.6 GB): the tokens at
/// the end of the sequence (elements beyond 2^32) are selected, gathered and scatter-added back.
#[test]
fn gpu_routing_huge_rows_beyond_2_pow_32() {
    let test = "gpu_routing_huge_rows_beyond_2_pow_32";
    let Some(dev) = gpu(test) else { return };
    let (b, n, h) = (1usize, 65_540usize, 65_536usize);
    let numel = b * n * h;
    assert!(numel > 1 << 32);
    let (free, _) = dev.context().mem_get_info().unwrap();
    let need = numel * 2 + (1 << 30);
    if free < need {
        common::skip(test, &format!("needs {need} bytes of GPU memory, {free} free"));
        return;
    }
    let s = dev.stream();
    // Strictly increasing scores: the top 6 are the last 6 tokens.
    let sc: Vec<f32> = (0..n).map(|t| t as f32).collect();
    let want = reference::route_top_k(&sc, n, ValidTokens::All, Capacity::Tokens(6)).unwrap();
    assert_eq!(want.indices(), &[65_534, 65_535, 65_536, 65_537, 65_538, 65_539]);
    let mut r = TokenRouting::new(s, b, n, 6).unwrap();
    r.top_k(s, &sd(&dev, &sc), Valid::All, Capacity::Tokens(6))
        .unwrap();
    same_routing(&dev, &r, &want, "huge").unwrap();
    // x: token t's row is filled with bf16(t % 251); written row by row for the selected tokens.
    let mut x = dev.zeros::<bf16>(numel).unwrap();
    for &t in want.indices() {
        let row = vec![bf16::from_f32((t % 251) as f32); h];
        s.memcpy_htod(&row, &mut x.slice_mut(t as usize * h..(t as usize + 1) * h))
            .unwrap();
    }
    let mut compact = dev.zeros::<bf16>(6 * h).unwrap();
    routing::gather_tokens(s, &r, h, &x, &mut compact).unwrap();
    let got = dev.download(&compact).unwrap();
    for (i, &t) in want.indices().iter().enumerate() {
        assert!(
            got[i * h..(i + 1) * h]
                .iter()
                .all(|v| v.to_f32() == (t % 251) as f32),
            "row {i}"
        );
    }
    let gate = dev.upload(&vec![0.5f32; n]).unwrap();
    routing::scatter_add_tokens(s, &r, h, &mut x, &compact, &gate).unwrap();
    for &t in want.indices() {
        let row = dev
            .download(&x.slice(t as usize * h..(t as usize + 1) * h))
            .unwrap();
        let v = (t % 251) as f32;
        let expect = bf16::from_f32(v + 0.5 * v);
        assert!(row.iter().all(|e| e.to_bits() == expect.to_bits()), "token {t}");
    }
    // An unselected row between them stays zero.
    let row = dev.download(&x.slice(65_533 * h..65_534 * h)).unwrap();
    assert!(row.iter().all(|e| e.to_bits() == 0));
}
