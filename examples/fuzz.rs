//! Randomized differential fuzzing: every dropout kernel on GPU 0 against the CPU reference.
//!
//! ```text
//! cargo run --release --example fuzz -- [--seconds S] [--seed U64] [--max-n N] [--case CASE]
//! ```
//!
//! * `--seconds S` (default 30): draw and check random cases until `S` seconds have elapsed.
//! * `--seed U64` (default: from the clock, printed at the start): the seed of the case generator
//!   (a `rand::rngs::StdRng`); the same seed draws the same cases.
//! * `--max-n N` (default 2^20): the largest tensor length drawn (every `n` is in `1..=N`).
//! * `--case CASE`: rerun exactly one case, given as the reproducer string a mismatch prints,
//!   e.g. `dtype=f16,kernel=forward,n=33,p=0.5,seed=1,offset=2,eo=3,xo=1,yo=2,mo=0,data=9`.
//!
//! Each case picks a dtype (f16, bf16, f32), a kernel (`mask`, `forward`, `forward_maskless`,
//! `forward_inplace`, `forward_maskless_inplace`, `backward` (from the mask), `backward_maskless`,
//! `backward_inplace`, `backward_maskless_inplace`), a length `n` (many tiny ones, values near
//! multiples of 32 and 8, medium ones, now and then one near `N`), a drop probability `p` (0, 1, near
//! 0 and 1, thresholds that are powers of 2 or halfway between integers, random), a Philox seed and
//! offset (including 0 and `u64::MAX`), an element offset (including values that straddle 2^32 and
//! 2^34 and the largest one allowed, `u64::MAX - n`), view offsets 0..7 (elements) and 0..3 (mask
//! words) into larger buffers so the pointers are not 16-byte aligned, and a data seed for the
//! inputs (uniform values, arbitrary bit patterns, NaN, ±Inf, -0, subnormals, extremes).
//!
//! The kernel runs on views into sentinel-filled buffers with guard slots after the view; the
//! mask words and every output element are compared bit for bit with `dropfuse::reference`, the
//! slots outside the view must still hold the sentinel, and inputs (data, stored masks) must be
//! unchanged. One exception to "bit for bit": where the reference gives a NaN, any NaN is
//! accepted (the GPU's NaN payloads are canonical, the CPU's carry the input's payload).
//!
//! A mismatching case prints `MISMATCH --case <string>` and the first differing indices
//! (`[i]` is element `i` of the view, `guard[i]` a slot outside it: negative before, `>= n` after);
//! the run goes on until the time is up and then exits with status 1. A failed call (an error from
//! dropfuse) counts the same; after a CUDA error the run stops at once, the context may be unusable.
//! The last line is `FUZZ cases=C mismatches=M seconds=S seed=SEED mode=gpu|cpu-reference`
//! (`mismatches` counts failing cases).
//!
//! Without a GPU (`Device::new(0)` fails) it says so and, for the same time, runs randomized
//! self-checks of the CPU reference instead, on the same random cases: the mask against the
//! Philox contract re-derived here, forward against the element-wise contract and against
//! `apply_mask` of its mask, backward from the mask against the mask-free backward, the shard
//! property at a random split point, and the keep rate within a loose (8 sigma) bound.

use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dropfuse::cudarc::driver::DeviceRepr;
use dropfuse::dropout::mask_words;
use dropfuse::half::{bf16, f16};
use dropfuse::reference::dropout as reference;
use dropfuse::reference::philox4x32_10;
use dropfuse::{DType, Device, Dropout, Element, Error, PhiloxState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type BoxError = Box<dyn std::error::Error>;

const USAGE: &str =
    "usage: cargo run --release --example fuzz -- [--seconds S (30)] [--seed U64 (from the clock)] \
     [--max-n N (1048576)] [--case CASE]";

/// Guard slots after every view.
const GUARD: usize = 5;
/// What the mask buffers hold outside the view.
const MASK_SENTINEL: u32 = 0xDEAD_BEEF;
/// At most this many differing indices are printed per buffer.
const SHOW: usize = 4;
/// 2^32 as f64.
const TWO_POW_32: f64 = 4_294_967_296.0;

// ------------------------------------------------------------ config ----

/// What one run does.
#[derive(Debug, Clone)]
struct Config {
    /// Run until this many seconds have elapsed (ignored with `case`).
    seconds: f64,
    /// Seed of the case generator.
    seed: u64,
    /// Largest tensor length drawn.
    max_n: usize,
    /// Run only this case.
    case: Option<Case>,
}

/// What one run found.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    cases: u64,
    /// Cases with a mismatch or a failed call.
    mismatches: u64,
    seconds: f64,
    seed: u64,
    /// Whether the cases ran on the GPU (else: CPU-reference self-checks).
    gpu: bool,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FUZZ cases={} mismatches={} seconds={:.1} seed={} mode={}",
            self.cases,
            self.mismatches,
            self.seconds,
            self.seed,
            if self.gpu { "gpu" } else { "cpu-reference" }
        )
    }
}

/// Parses the command line (without the program name); `Ok(None)` for `--help`.
fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Config>, String> {
    let mut cfg = Config {
        seconds: 30.0,
        seed: clock_seed(),
        max_n: 1 << 20,
        case: None,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: expected {what}, got {value:?}");
        match flag.as_str() {
            "--seconds" => {
                cfg.seconds = value.parse().map_err(|_| bad("a number of seconds"))?;
                if !(cfg.seconds.is_finite() && cfg.seconds >= 0.0) {
                    return Err(bad("a number of seconds >= 0"));
                }
            }
            "--seed" => cfg.seed = value.parse().map_err(|_| bad("an unsigned 64-bit integer"))?,
            "--max-n" => {
                cfg.max_n = value.parse().map_err(|_| bad("a length >= 1"))?;
                if cfg.max_n == 0 {
                    return Err(bad("a length >= 1"));
                }
            }
            "--case" => cfg.case = Some(value.parse().map_err(|e| format!("--case: {e}"))?),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(cfg))
}

fn clock_seed() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

// -------------------------------------------------------------- cases ----

/// The kernels (methods of `Dropout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Mask,
    Forward,
    ForwardMaskless,
    ForwardInplace,
    ForwardMasklessInplace,
    Backward,
    BackwardMaskless,
    BackwardInplace,
    BackwardMasklessInplace,
}

impl Kernel {
    const ALL: [Kernel; 9] = [
        Kernel::Mask,
        Kernel::Forward,
        Kernel::ForwardMaskless,
        Kernel::ForwardInplace,
        Kernel::ForwardMasklessInplace,
        Kernel::Backward,
        Kernel::BackwardMaskless,
        Kernel::BackwardInplace,
        Kernel::BackwardMasklessInplace,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Mask => "mask",
            Kernel::Forward => "forward",
            Kernel::ForwardMaskless => "forward_maskless",
            Kernel::ForwardInplace => "forward_inplace",
            Kernel::ForwardMasklessInplace => "forward_maskless_inplace",
            Kernel::Backward => "backward",
            Kernel::BackwardMaskless => "backward_maskless",
            Kernel::BackwardInplace => "backward_inplace",
            Kernel::BackwardMasklessInplace => "backward_maskless_inplace",
        }
    }
    fn writes_mask(self) -> bool {
        matches!(self, Kernel::Mask | Kernel::Forward | Kernel::ForwardInplace)
    }
    fn reads_mask(self) -> bool {
        matches!(self, Kernel::Backward | Kernel::BackwardInplace)
    }
    fn in_place(self) -> bool {
        matches!(
            self,
            Kernel::ForwardInplace
                | Kernel::ForwardMasklessInplace
                | Kernel::BackwardInplace
                | Kernel::BackwardMasklessInplace
        )
    }
}

/// One fuzz case: everything needed to rerun it exactly (`Display` and `FromStr` round-trip).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Case {
    dtype: DType,
    kernel: Kernel,
    n: usize,
    p: f64,
    /// Philox seed and offset.
    seed: u64,
    offset: u64,
    /// Element offset (global index of element 0).
    eo: u64,
    /// View offsets into the larger buffers: input / in-place data, output data (elements), masks
    /// (words).
    xo: usize,
    yo: usize,
    mo: usize,
    /// Seed of the input values.
    data: u64,
}

impl Case {
    fn state(&self) -> PhiloxState {
        PhiloxState::new(self.seed, self.offset)
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:?}` of an f64 is the shortest string that parses back to the same bits.
        write!(
            f,
            "dtype={},kernel={},n={},p={:?},seed={},offset={},eo={},xo={},yo={},mo={},data={}",
            self.dtype.name(),
            self.kernel.name(),
            self.n,
            self.p,
            self.seed,
            self.offset,
            self.eo,
            self.xo,
            self.yo,
            self.mo,
            self.data
        )
    }
}

impl FromStr for Case {
    type Err = String;

    /// `key=value` pairs separated by commas, every key exactly once (the `Display` form).
    fn from_str(s: &str) -> Result<Self, String> {
        const KEYS: [&str; 11] = [
            "dtype", "kernel", "n", "p", "seed", "offset", "eo", "xo", "yo", "mo", "data",
        ];
        let mut values: [Option<&str>; 11] = [None; 11];
        for pair in s.trim().split(',') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {pair:?}"))?;
            let k = KEYS
                .iter()
                .position(|&k| k == key.trim())
                .ok_or_else(|| format!("unknown key {key:?} (keys: {})", KEYS.join(",")))?;
            if values[k].replace(value.trim()).is_some() {
                return Err(format!("key {key:?} given twice"));
            }
        }
        let get = |k: usize| values[k].ok_or_else(|| format!("missing key {:?}", KEYS[k]));
        fn num<T: FromStr>(key: &str, v: &str) -> Result<T, String> {
            v.parse().map_err(|_| format!("{key}: cannot parse {v:?}"))
        }
        let dtype = match get(0)? {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => return Err(format!("dtype: expected f32, f16 or bf16, got {other:?}")),
        };
        let kernel_name = get(1)?;
        let kernel = Kernel::ALL
            .into_iter()
            .find(|k| k.name() == kernel_name)
            .ok_or_else(|| format!("kernel: unknown kernel {kernel_name:?}"))?;
        let case = Case {
            dtype,
            kernel,
            n: num("n", get(2)?)?,
            p: num("p", get(3)?)?,
            seed: num("seed", get(4)?)?,
            offset: num("offset", get(5)?)?,
            eo: num("eo", get(6)?)?,
            xo: num("xo", get(7)?)?,
            yo: num("yo", get(8)?)?,
            mo: num("mo", get(9)?)?,
            data: num("data", get(10)?)?,
        };
        if case.n == 0 {
            return Err("n: must be >= 1".into());
        }
        if !(0.0..=1.0).contains(&case.p) {
            return Err(format!("p: must be in [0, 1], got {}", case.p));
        }
        if case.eo.checked_add(case.n as u64).is_none() {
            return Err("eo: eo + n must be <= 2^64 - 1".into());
        }
        if case.xo > 1024 || case.yo > 1024 || case.mo > 1024 {
            return Err("xo, yo, mo: view offsets must be <= 1024".into());
        }
        Ok(case)
    }
}

/// A length in `1..=max_n`: many tiny, many near multiples of 32 and 8, log-uniform medium ones,
/// and now and then one in the top half of the range.
fn draw_n(rng: &mut StdRng, max_n: usize) -> usize {
    let r = rng.random_range(0..100u32);
    let n = if r < 35 || max_n <= 300 {
        rng.random_range(1..=300usize)
    } else if r < 55 {
        let m = if rng.random_bool(0.5) { 32 } else { 8 };
        let k = rng.random_range(1..=512usize);
        (k * m).saturating_add_signed(rng.random_range(-2..=2i64) as isize)
    } else if r < 93 {
        let (lo, hi) = (301f64.ln(), (max_n as f64).ln());
        rng.random_range(lo..=hi).exp() as usize
    } else {
        rng.random_range(max_n / 2..=max_n)
    };
    n.clamp(1, max_n)
}

/// A drop probability: 0, 1, near 0 and 1, thresholds at, next to and halfway between powers of
/// 2, halfway between integers (round half away from zero), common values, uniform.
fn draw_p(rng: &mut StdRng) -> f64 {
    let pick = |rng: &mut StdRng, v: &[f64]| v[rng.random_range(0..v.len())];
    match rng.random_range(0..12u32) {
        0 => 0.0,
        1 => 1.0,
        2 => rng.random_range(0.0..1e-6),
        3 => 1.0 - rng.random_range(0.0..1e-6),
        4 => pick(
            rng,
            &[1e-10, 0.5 / TWO_POW_32, 1.0 / TWO_POW_32, 1.5 / TWO_POW_32, 1e-9],
        ),
        5 => pick(
            rng,
            &[
                1.0 - 1.0 / TWO_POW_32,
                1.0 - 0.5 / TWO_POW_32,
                1.0 - 1.5 / TWO_POW_32,
                1.0 - 1e-9,
                0.999_999,
            ],
        ),
        // threshold = 2^k exactly
        6 => (1u64 << rng.random_range(0..=32u32)) as f64 / TWO_POW_32,
        // threshold = 2^k +- 1
        7 => {
            let t = (1u64 << rng.random_range(1..=32u32)) as f64 + pick(rng, &[-1.0, 1.0]);
            (t / TWO_POW_32).min(1.0)
        }
        // threshold halfway between two integers
        8 => (rng.random_range(0..1u64 << 32) as f64 + 0.5) / TWO_POW_32,
        9 => pick(rng, &[0.1, 0.25, 0.5, 0.75, 0.9]),
        _ => rng.random::<f64>(),
    }
}

/// A Philox seed or offset: 0, `u64::MAX`, small, around 2^32, near the top, random.
fn draw_u64(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..8u32) {
        0 => 0,
        1 => u64::MAX,
        2 => rng.random_range(0..1000),
        3 => (1u64 << 32).wrapping_add_signed(rng.random_range(-3..=3i64)),
        4 => u64::MAX - rng.random_range(0..1000),
        _ => rng.random(),
    }
}

/// An element offset with `eo + n <= u64::MAX`: 0, small, the largest allowed and just below it,
/// views straddling 2^k (the 32-bit halves of the element and block indices roll over), random.
fn draw_element_offset(rng: &mut StdRng, n: usize) -> u64 {
    let top = u64::MAX - n as u64;
    let eo = match rng.random_range(0..10u32) {
        0 | 1 => 0,
        2 => rng.random_range(0..5000),
        3 => top,
        4 => top.saturating_sub(rng.random_range(0..67)),
        5 | 6 => {
            let boundary = 1u64 << rng.random_range(31..=63u32);
            boundary.wrapping_sub(rng.random_range(0..=n as u64 + 40))
        }
        _ => rng.random(),
    };
    eo.min(top)
}

fn draw_case(rng: &mut StdRng, max_n: usize) -> Case {
    let dtype = [DType::F16, DType::BF16, DType::F32][rng.random_range(0..3)];
    let kernel = Kernel::ALL[rng.random_range(0..Kernel::ALL.len())];
    let n = draw_n(rng, max_n);
    let p = draw_p(rng);
    let seed = draw_u64(rng);
    let offset = draw_u64(rng);
    let eo = draw_element_offset(rng, n);
    Case {
        dtype,
        kernel,
        n,
        p,
        seed,
        offset,
        eo,
        xo: rng.random_range(0..8),
        yo: rng.random_range(0..8),
        mo: rng.random_range(0..4),
        data: rng.random(),
    }
}

// ------------------------------------------------------------- values ----

/// Element types the fuzzer feeds: built from raw bits.
trait FuzzElement: Element + Word {
    /// Width in bits.
    const BITS: u32;
    /// NaNs (quiet, signalling, negative), ±Inf, -0, +0, subnormals, extremes, 1.
    const SPECIALS: &'static [u32];
    fn from_bits(bits: u32) -> Self;
}

impl FuzzElement for f32 {
    const BITS: u32 = 32;
    const SPECIALS: &'static [u32] = &[
        0x7fc0_0000,
        0x7f80_0001,
        0xffc0_0000,
        0x7f80_0000,
        0xff80_0000,
        0x8000_0000,
        0,
        1,
        0x007f_ffff,
        0x8000_0001,
        0x0080_0000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x3f80_0000,
    ];
    fn from_bits(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}
impl FuzzElement for f16 {
    const BITS: u32 = 16;
    const SPECIALS: &'static [u32] = &[
        0x7e00, 0x7c01, 0xfe00, 0x7c00, 0xfc00, 0x8000, 0, 1, 0x03ff, 0x8001, 0x0400, 0x7bff, 0xfbff, 0x3c00,
    ];
    fn from_bits(bits: u32) -> Self {
        f16::from_bits(bits as u16)
    }
}
impl FuzzElement for bf16 {
    const BITS: u32 = 16;
    const SPECIALS: &'static [u32] = &[
        0x7fc0, 0x7f81, 0xffc0, 0x7f80, 0xff80, 0x8000, 0, 1, 0x007f, 0x8001, 0x0080, 0x7f7f, 0xff7f, 0x3f80,
    ];
    fn from_bits(bits: u32) -> Self {
        bf16::from_bits(bits as u16)
    }
}

/// The inputs of a case: half uniform in [-8, 8), 30 % arbitrary bit patterns (NaN and Inf
/// included), 20 % special values.
fn values<T: FuzzElement>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let r = rng.random_range(0..10u32);
            if r < 5 {
                T::from_f32(rng.random_range(-8.0f32..8.0))
            } else if r < 8 {
                T::from_bits(rng.random::<u32>() >> (32 - T::BITS))
            } else {
                T::from_bits(T::SPECIALS[rng.random_range(0..T::SPECIALS.len())])
            }
        })
        .collect()
}

/// The fill outside the views of data buffers.
fn sentinel<T: Element>() -> T {
    T::from_f32(-12345.0)
}

// --------------------------------------------------------- comparison ----

/// Anything compared bit for bit: elements and mask words.
trait Word: DeviceRepr + Copy {
    fn bits(self) -> u32;
    fn is_nan(self) -> bool;
}
impl Word for u32 {
    fn bits(self) -> u32 {
        self
    }
    fn is_nan(self) -> bool {
        false
    }
}
macro_rules! element_word {
    ($($t:ty),*) => {$(
        impl Word for $t {
            fn bits(self) -> u32 {
                self.to_bits_u32()
            }
            fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }
        }
    )*};
}
element_word!(f32, f16, bf16);

/// Compares a whole buffer `got` with `want` at `off..off + want.len()` and `fill` everywhere
/// else; appends one line naming the first differing indices to `out` if anything differs. With
/// `nan_equal`, a NaN inside the view matches any NaN.
fn compare<W: Word>(
    what: &str,
    got: &[W],
    off: usize,
    want: &[W],
    fill: W,
    nan_equal: bool,
    out: &mut Vec<String>,
) {
    let mut count = 0usize;
    let mut shown = Vec::new();
    for (i, &g) in got.iter().enumerate() {
        let inside = i >= off && i - off < want.len();
        let w = if inside { want[i - off] } else { fill };
        if g.bits() == w.bits() || (inside && nan_equal && g.is_nan() && w.is_nan()) {
            continue;
        }
        count += 1;
        if shown.len() < SHOW {
            let place = if inside {
                format!("[{}]", i - off)
            } else {
                format!("guard[{}]", i as i64 - off as i64)
            };
            shown.push(format!("{place} got {:#x} want {:#x}", g.bits(), w.bits()));
        }
    }
    if got.len() < off + want.len() {
        out.push(format!(
            "{what}: buffer of {} holds no view of {} at {off}",
            got.len(),
            want.len()
        ));
    } else if count > 0 {
        out.push(format!("{what}: {count} differ: {}", shown.join(", ")));
    }
}

/// `off` fill values, `data`, then `GUARD` fill values.
fn padded<T: Copy>(off: usize, data: &[T], fill: T) -> Vec<T> {
    let mut v = vec![fill; off + data.len() + GUARD];
    v[off..off + data.len()].copy_from_slice(data);
    v
}

// ---------------------------------------------------------------- GPU ----

/// Runs `c` on the GPU and compares everything it wrote (and must not have written) with the
/// reference. Returns the differences (empty: the case passed).
fn gpu_case<T: FuzzElement>(dev: &Device, c: &Case) -> dropfuse::Result<Vec<String>> {
    let s = dev.stream();
    let (n, words) = (c.n, mask_words(c.n));
    let state = c.state();
    let drop = Dropout::new(c.p)?.with_element_offset(c.eo);
    let x: Vec<T> = values(n, c.data);
    let want_mask = reference::mask(c.p, state, c.eo, n)?;
    let want_y: Vec<T> = match c.kernel {
        Kernel::Mask => Vec::new(),
        Kernel::Forward
        | Kernel::ForwardMaskless
        | Kernel::ForwardInplace
        | Kernel::ForwardMasklessInplace => reference::forward(&x, c.p, state, c.eo)?.0,
        Kernel::Backward | Kernel::BackwardInplace => reference::backward_from_mask(&x, &want_mask, c.p)?,
        Kernel::BackwardMaskless | Kernel::BackwardMasklessInplace => {
            reference::backward(&x, c.p, state, c.eo)?
        }
    };

    let x_host = padded(c.xo, &x, sentinel::<T>());
    let mask_in_host = padded(c.mo, &want_mask, MASK_SENTINEL);
    let mut xb = dev.upload(&x_host)?;
    let mb = dev.upload(&mask_in_host)?;
    let mut yb = dev.upload(&vec![sentinel::<T>(); c.yo + n + GUARD])?;
    let mut mout = dev.upload(&vec![MASK_SENTINEL; c.mo + words + GUARD])?;
    let (xr, yr, mr) = (c.xo..c.xo + n, c.yo..c.yo + n, c.mo..c.mo + words);

    match c.kernel {
        Kernel::Mask => drop.mask(s, state, n, &mut mout.slice_mut(mr))?,
        Kernel::Forward => drop.forward(
            s,
            state,
            &xb.slice(xr),
            &mut yb.slice_mut(yr),
            &mut mout.slice_mut(mr),
        )?,
        Kernel::ForwardMaskless => drop.forward_maskless(s, state, &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Kernel::ForwardInplace => {
            drop.forward_inplace(s, state, &mut xb.slice_mut(xr), &mut mout.slice_mut(mr))?
        }
        Kernel::ForwardMasklessInplace => drop.forward_maskless_inplace(s, state, &mut xb.slice_mut(xr))?,
        Kernel::Backward => drop.backward(s, &mb.slice(mr), &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Kernel::BackwardMaskless => drop.backward_maskless(s, state, &xb.slice(xr), &mut yb.slice_mut(yr))?,
        Kernel::BackwardInplace => drop.backward_inplace(s, &mb.slice(mr), &mut xb.slice_mut(xr))?,
        Kernel::BackwardMasklessInplace => drop.backward_maskless_inplace(s, state, &mut xb.slice_mut(xr))?,
    }
    dev.synchronize()?;

    let k = c.kernel.name();
    let mut bad = Vec::new();
    if c.kernel.writes_mask() {
        compare(
            &format!("{k} mask"),
            &dev.download(&mout)?,
            c.mo,
            &want_mask,
            MASK_SENTINEL,
            false,
            &mut bad,
        );
    }
    if c.kernel.reads_mask() {
        compare(
            &format!("{k} input mask (must be unchanged)"),
            &dev.download(&mb)?,
            0,
            &mask_in_host,
            0,
            false,
            &mut bad,
        );
    }
    if c.kernel.in_place() {
        compare(
            &format!("{k} data (in place)"),
            &dev.download(&xb)?,
            c.xo,
            &want_y,
            sentinel::<T>(),
            true,
            &mut bad,
        );
    } else if c.kernel != Kernel::Mask {
        compare(
            &format!("{k} output"),
            &dev.download(&yb)?,
            c.yo,
            &want_y,
            sentinel::<T>(),
            true,
            &mut bad,
        );
        compare(
            &format!("{k} input (must be unchanged)"),
            &dev.download(&xb)?,
            0,
            &x_host,
            x_host[0],
            false,
            &mut bad,
        );
    }
    Ok(bad)
}

// ---------------------------------------------------------------- CPU ----

/// Word `e & 3` of Philox block `e >> 2` of stream `state`: the mask contract, written out here
/// independently of `reference::philox::element_word`. Caches the last block.
fn contract_word(state: PhiloxState, e: u64, cache: &mut Option<(u64, [u32; 4])>) -> u32 {
    let block = e >> 2;
    let words = match *cache {
        Some((b, w)) if b == block => w,
        _ => {
            let counter = [
                block as u32,
                (block >> 32) as u32,
                state.offset as u32,
                (state.offset >> 32) as u32,
            ];
            let w = philox4x32_10(counter, [state.seed as u32, (state.seed >> 32) as u32]);
            *cache = Some((block, w));
            w
        }
    };
    words[(e & 3) as usize]
}

fn bit(mask: &[u32], i: usize) -> bool {
    (mask[i / 32] >> (i % 32)) & 1 == 1
}

/// Randomized self-checks of the CPU reference on case `c` (no GPU); returns the failures.
fn cpu_case<T: FuzzElement>(c: &Case) -> dropfuse::Result<Vec<String>> {
    let (n, p, eo, state) = (c.n, c.p, c.eo, c.state());
    let x: Vec<T> = values(n, c.data);
    let mut bad = Vec::new();

    // Threshold and scale: the contract's formulas, the reference and the safe API agree.
    let threshold = (p * TWO_POW_32).round() as u64;
    let scale = if p == 1.0 { 0.0 } else { (1.0 / (1.0 - p)) as f32 };
    let api = Dropout::new(p)?;
    if reference::drop_threshold(p)? != threshold || api.threshold() != threshold {
        bad.push(format!(
            "threshold: contract {threshold}, reference {}, Dropout {}",
            reference::drop_threshold(p)?,
            api.threshold()
        ));
    }
    if reference::keep_scale(p)?.to_bits() != scale.to_bits() || api.scale().to_bits() != scale.to_bits() {
        bad.push(format!(
            "scale: contract {scale}, reference {}, Dropout {}",
            reference::keep_scale(p)?,
            api.scale()
        ));
    }

    // The mask against the Philox contract, bit by bit; unused high bits 0.
    let mask = reference::mask(p, state, eo, n)?;
    let mut want_mask = vec![0u32; mask_words(n)];
    let mut cache = None;
    for i in 0..n {
        if u64::from(contract_word(state, eo + i as u64, &mut cache)) >= threshold {
            want_mask[i / 32] |= 1 << (i % 32);
        }
    }
    compare(
        "mask vs the Philox contract",
        &mask,
        0,
        &want_mask,
        0,
        false,
        &mut bad,
    );

    // Forward: its mask is mask(); y is kept ? round(x * scale) : +0, and apply_mask of that mask.
    let (y, fwd_mask) = reference::forward(&x, p, state, eo)?;
    compare(
        "forward's mask vs mask()",
        &fwd_mask,
        0,
        &mask,
        0,
        false,
        &mut bad,
    );
    let want_y: Vec<T> = (0..n)
        .map(|i| {
            if bit(&want_mask, i) {
                T::from_f32(x[i].to_f32() * scale)
            } else {
                T::from_bits(0)
            }
        })
        .collect();
    compare(
        "forward y vs kept ? x * scale : +0",
        &y,
        0,
        &want_y,
        sentinel::<T>(),
        true,
        &mut bad,
    );
    compare(
        "forward y vs apply_mask",
        &reference::apply_mask(&x, &mask, scale)?,
        0,
        &y,
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Backward from the mask == mask-free backward == forward's arithmetic on dy.
    let dx_mask = reference::backward_from_mask(&x, &fwd_mask, p)?;
    let dx_free = reference::backward(&x, p, state, eo)?;
    compare(
        "backward_from_mask vs backward (mask-free)",
        &dx_mask,
        0,
        &dx_free,
        sentinel::<T>(),
        true,
        &mut bad,
    );
    compare(
        "backward (mask-free) vs forward y",
        &dx_free,
        0,
        &y,
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Shards: split at k; each part with its element offset equals the matching part of the whole.
    let k = (c.data % n as u64) as usize;
    if k > 0 {
        let head = reference::mask(p, state, eo, k)?;
        let mut want: Vec<u32> = mask[..mask_words(k)].to_vec();
        if k % 32 != 0 {
            *want.last_mut().unwrap() &= (1u32 << (k % 32)) - 1;
        }
        compare(
            &format!("shard [0, {k}) mask"),
            &head,
            0,
            &want,
            0,
            false,
            &mut bad,
        );
    }
    let tail = reference::mask(p, state, eo + k as u64, n - k)?;
    let mut want_tail = vec![0u32; mask_words(n - k)];
    for i in 0..n - k {
        if bit(&mask, k + i) {
            want_tail[i / 32] |= 1 << (i % 32);
        }
    }
    compare(
        &format!("shard [{k}, {n}) mask"),
        &tail,
        0,
        &want_tail,
        0,
        false,
        &mut bad,
    );
    let (tail_y, _) = reference::forward(&x[k..], p, state, eo + k as u64)?;
    compare(
        &format!("shard [{k}, {n}) forward y"),
        &tail_y,
        0,
        &y[k..],
        sentinel::<T>(),
        true,
        &mut bad,
    );

    // Keep rate: within 8 sigma (+ 8) of n * (1 - threshold / 2^32); exact at the ends.
    let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
    let q = 1.0 - threshold as f64 / TWO_POW_32;
    let expected = n as f64 * q;
    let slack = 8.0 * (n as f64 * q * (1.0 - q)).sqrt() + 8.0;
    if (kept as f64 - expected).abs() > slack
        || (threshold == 0 && kept != n as u64)
        || (threshold == 1 << 32 && kept != 0)
    {
        bad.push(format!(
            "keep rate: {kept} of {n} kept, expected {expected:.1} +- {slack:.1}"
        ));
    }
    Ok(bad)
}

// --------------------------------------------------------------- run ----

enum Backend {
    Gpu(Device),
    Cpu,
}

fn run_case(backend: &Backend, c: &Case) -> dropfuse::Result<Vec<String>> {
    match (backend, c.dtype) {
        (Backend::Gpu(dev), DType::F32) => gpu_case::<f32>(dev, c),
        (Backend::Gpu(dev), DType::F16) => gpu_case::<f16>(dev, c),
        (Backend::Gpu(dev), DType::BF16) => gpu_case::<bf16>(dev, c),
        (Backend::Cpu, DType::F32) => cpu_case::<f32>(c),
        (Backend::Cpu, DType::F16) => cpu_case::<f16>(c),
        (Backend::Cpu, DType::BF16) => cpu_case::<bf16>(c),
    }
}

/// Runs the fuzzer as `cfg` says, printing mismatches as they are found and the summary line at
/// the end. `Err` only when the GPU cannot be queried; mismatches are in the summary.
fn run(cfg: &Config) -> Result<Summary, BoxError> {
    let start = Instant::now();
    let backend = match Device::new(0) {
        Ok(dev) => {
            let (major, minor) = dev.compute_capability()?;
            println!(
                "fuzz: GPU 0: {} (sm_{major}{minor}); comparing every kernel with the CPU reference",
                dev.name()?
            );
            Backend::Gpu(dev)
        }
        Err(e) => {
            println!("fuzz: no CUDA device ({e}).");
            println!("fuzz: running CPU-reference self-checks instead (no GPU kernel is tested).");
            Backend::Cpu
        }
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (mut cases, mut mismatches) = (0u64, 0u64);
    let mut next_progress = Duration::from_secs(10);
    match &cfg.case {
        Some(c) => println!("fuzz: rerunning one case: {c}"),
        None => println!(
            "fuzz: seed={} seconds={} max_n={} (rerun the same cases with --seed {})",
            cfg.seed, cfg.seconds, cfg.max_n, cfg.seed
        ),
    }
    let limit = Duration::from_secs_f64(cfg.seconds);
    loop {
        let case = match &cfg.case {
            Some(c) if cases == 0 => *c,
            Some(_) => break,
            None if start.elapsed() >= limit => break,
            None => draw_case(&mut rng, cfg.max_n),
        };
        cases += 1;
        let (failures, fatal) = match run_case(&backend, &case) {
            Ok(f) => (f, false),
            Err(e) => {
                let fatal = matches!(e, Error::Cuda { .. });
                (vec![format!("call failed: {e}")], fatal)
            }
        };
        if !failures.is_empty() {
            mismatches += 1;
            println!("MISMATCH --case {case}");
            for f in &failures {
                println!("  {f}");
            }
        }
        if fatal {
            println!("fuzz: stopping after a CUDA error (the context may be unusable)");
            break;
        }
        if cfg.case.is_none() && start.elapsed() >= next_progress {
            println!(
                "fuzz: {:.0} s, {cases} cases, {mismatches} mismatches",
                start.elapsed().as_secs_f64()
            );
            next_progress += Duration::from_secs(10);
        }
    }
    let summary = Summary {
        cases,
        mismatches,
        seconds: start.elapsed().as_secs_f64(),
        seed: cfg.seed,
        gpu: matches!(backend, Backend::Gpu(_)),
    };
    println!("{summary}");
    Ok(summary)
}

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fuzz: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(s) if s.mismatches == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fuzz: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// The real entry for 2 seconds at small sizes: GPU cases with a GPU, else the CPU-reference
    /// self-checks. No mismatch allowed.
    #[test]
    fn fuzz_two_seconds_without_mismatch() {
        let cfg = Config {
            seconds: 2.0,
            seed: 20261128,
            max_n: 1 << 12,
            case: None,
        };
        let s = run(&cfg).expect("fuzz run");
        assert!(s.cases > 0, "no case ran: {s}");
        assert_eq!(s.mismatches, 0, "{s}");
        assert_eq!(s.seed, cfg.seed);
    }

    /// `--case` reruns exactly one case, here one at the edge of everything.
    #[test]
    fn one_case_reruns() {
        let case = format!(
            "dtype=f16,kernel=backward_inplace,n=37,p=0.5,seed={m},offset={m},eo={},xo=7,yo=3,mo=3,data=5",
            u64::MAX - 37,
            m = u64::MAX
        );
        let cfg = parse_args(args(&format!("--case {case}"))).unwrap().unwrap();
        let s = run(&cfg).expect("fuzz run");
        assert_eq!((s.cases, s.mismatches), (1, 0), "{s}");
    }

    #[test]
    fn case_strings_round_trip() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..5000 {
            let c = draw_case(&mut rng, 1 << 20);
            assert!((1..=1 << 20).contains(&c.n), "{c}");
            assert!(c.eo.checked_add(c.n as u64).is_some(), "{c}");
            let back: Case = c.to_string().parse().unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(back, c);
            assert_eq!(back.p.to_bits(), c.p.to_bits());
        }
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(parse_args(args("--seconds")).is_err());
        assert!(parse_args(args("--seconds -1")).is_err());
        assert!(parse_args(args("--max-n 0")).is_err());
        assert!(parse_args(args("--bogus 1")).is_err());
        assert!(parse_args(args("--help")).unwrap().is_none());
        let cfg = parse_args(args("--seconds 3 --seed 5 --max-n 100"))
            .unwrap()
            .unwrap();
        assert_eq!((cfg.seconds, cfg.seed, cfg.max_n, cfg.case), (3.0, 5, 100, None));
        let ok = "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0";
        assert!(ok.parse::<Case>().is_ok());
        for bad in [
            "dtype=f64,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=0,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=1,p=1.5,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=2,p=0,seed=0,offset=0,eo=18446744073709551615,xo=0,yo=0,mo=0,data=0",
            "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0",
            "dtype=f32,kernel=mask,n=1,p=0,seed=0,offset=0,eo=0,xo=0,yo=0,mo=0,data=0,n=1",
        ] {
            assert!(bad.parse::<Case>().is_err(), "{bad}");
        }
    }

    /// The comparison catches a wrong element, a written guard slot and NaN vs a number, and
    /// accepts any NaN for a NaN only where asked.
    #[test]
    fn compare_catches_differences() {
        let want = [1.0f32, 2.0, f32::NAN];
        let fill = -1.0f32;
        let good = padded(2, &want, fill);
        let mut out = Vec::new();
        compare("t", &good, 2, &want, fill, true, &mut out);
        assert!(out.is_empty(), "{out:?}");

        let mut other_nan = good.clone();
        other_nan[4] = f32::from_bits(0x7fff_ffff);
        compare("t", &other_nan, 2, &want, fill, true, &mut out);
        assert!(out.is_empty(), "{out:?}");
        compare("t", &other_nan, 2, &want, fill, false, &mut out);
        assert_eq!(out.len(), 1);

        for (i, v) in [(2, 1.5f32), (4, 0.0), (1, 7.0), (5, 7.0)] {
            let mut g = good.clone();
            g[i] = v;
            let mut out = Vec::new();
            compare("t", &g, 2, &want, fill, true, &mut out);
            assert_eq!(out.len(), 1, "slot {i}");
        }
    }
}
