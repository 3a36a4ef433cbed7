//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), with
//! the Random123 / cuRAND constants, and the mapping from a global element index to its word.
//!
//! Written for clarity, not speed: it is the oracle the CUDA kernels are compared with bit for bit.

use crate::rng::PhiloxState;

/// Round multiplier applied to counter word 0.
pub const PHILOX_M4X32_0: u32 = 0xD251_1F53;
/// Round multiplier applied to counter word 2.
pub const PHILOX_M4X32_1: u32 = 0xCD9E_8D57;
/// Weyl increment added to key word 0 between rounds (golden ratio).
pub const PHILOX_W32_0: u32 = 0x9E37_79B9;
/// Weyl increment added to key word 1 between rounds (sqrt(3) - 1).
pub const PHILOX_W32_1: u32 = 0xBB67_AE85;

/// Number of rounds: Philox4x32-**10**.
const ROUNDS: usize = 10;

/// The high and low 32 bits of the full 64-bit product `a * b`.
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let product = u64::from(a) * u64::from(b);
    ((product >> 32) as u32, product as u32)
}

/// One Philox round: two 32x32 -> 64 multiplies, then a word permutation mixed with the key.
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M4X32_0, c[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M4X32_1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32-10: the four random words of block `counter` under `key`.
///
/// Ten rounds; the key is bumped by the Weyl constants (wrapping) before rounds 2 to 10.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for r in 0..ROUNDS {
        if r > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W32_0);
            k[1] = k[1].wrapping_add(PHILOX_W32_1);
        }
        c = round(c, k);
    }
    c
}

/// The low 32 bits of `v`.
fn lo32(v: u64) -> u32 {
    v as u32
}

/// The high 32 bits of `v`.
fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}

/// The random word of global element `element` under `state`.
///
/// Element `e` uses word `e & 3` of block `e >> 2`; the block index fills counter words 0-1, the
/// stream `offset` counter words 2-3 and the `seed` the key, so every (seed, offset, element) has
/// its own word and a slice can be generated independently of the rest of its tensor.
pub fn element_word(state: PhiloxState, element: u64) -> u32 {
    let block = element >> 2;
    let counter = [lo32(block), hi32(block), lo32(state.offset), hi32(state.offset)];
    let key = [lo32(state.seed), hi32(state.seed)];
    philox4x32_10(counter, key)[(element & 3) as usize]
}
