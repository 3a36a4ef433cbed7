//! Deterministic test data: the splitmix64 and LCG generators and the value generators shared by
//! several test files. Each generator draws the same values for the same seed on every platform.

use dropfuse::Element;

use super::guard::Bits;

/// splitmix64: advances `state` and returns the next 64 random bits.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 24 bits of `r` as a float uniform in `[0, 1)` (exact in f32).
pub fn unit_of(r: u64) -> f32 {
    (r >> 40) as f32 / (1u64 << 24) as f32
}

/// The next splitmix64 draw as a float uniform in `[0, 1)`.
pub fn unit(s: &mut u64) -> f32 {
    unit_of(splitmix(s))
}

/// Finite values: half of them uniform in [-8, 8), half arbitrary finite bit patterns (the whole
/// finite range, subnormals too).
pub fn finite_values<T: Bits>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| loop {
            let r = splitmix(&mut s);
            let v = if r & 1 == 0 {
                T::from_f32(unit_of(r) * 16.0 - 8.0)
            } else {
                T::from_bits_u32((r >> 16) as u32)
            };
            if v.to_f32().is_finite() {
                break v;
            }
        })
        .collect()
}

/// Values uniform in [-amp, amp).
pub fn uniform_values<T: Element>(n: usize, amp: f32, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| T::from_f32((unit(&mut s) * 2.0 - 1.0) * amp))
        .collect()
}

/// Values uniform in [-half, half) with a sprinkle of special values: a draw `r` with
/// `r % modulus == i < specials.len()` gives `specials[i]` (so each special comes with probability
/// `1 / modulus`).
pub fn sprinkled<T: Element>(n: usize, seed: u64, half: f32, modulus: u64, specials: &[f32]) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            let r = splitmix(&mut s);
            match specials.get((r % modulus) as usize) {
                Some(&v) => T::from_f32(v),
                None => T::from_f32(unit_of(r) * (2.0 * half) - half),
            }
        })
        .collect()
}

/// A small deterministic generator (64-bit LCG, high bits); test files add their own draws with
/// an `impl Lcg` block of their own.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next 31 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    /// Uniform in `0..n` (up to the modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
