//! Philox4x32-10 known-answer tests (Random123 `kat_vectors`) and the element-to-word mapping.

use dropfuse::reference::philox::{element_word, PHILOX_M4X32_0, PHILOX_M4X32_1, PHILOX_W32_0, PHILOX_W32_1};
use dropfuse::reference::philox4x32_10;
use dropfuse::PhiloxState;

#[test]
fn constants_are_the_random123_ones() {
    assert_eq!(PHILOX_M4X32_0, 0xD251_1F53);
    assert_eq!(PHILOX_M4X32_1, 0xCD9E_8D57);
    assert_eq!(PHILOX_W32_0, 0x9E37_79B9);
    assert_eq!(PHILOX_W32_1, 0xBB67_AE85);
}

#[test]
fn kat_zero() {
    assert_eq!(
        philox4x32_10([0, 0, 0, 0], [0, 0]),
        [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
    );
}

#[test]
fn kat_all_ones() {
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
    );
}

#[test]
fn kat_pi() {
    assert_eq!(
        philox4x32_10(
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0]
        ),
        [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
    );
}

/// Element `e` is word `e & 3` of block `e >> 2`; block in counter words 0-1, offset in 2-3,
/// seed in the key. States and elements use both 32-bit halves so a swapped half would fail.
#[test]
fn element_word_mapping() {
    let states = [
        PhiloxState::new(0, 0),
        PhiloxState::new(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
        PhiloxState::new(u64::MAX, 1),
        PhiloxState::new(42, u64::MAX),
    ];
    let elements = [
        0u64,
        1,
        2,
        3,
        4,
        7,
        1_000_003,
        (1u64 << 34) + 5,
        0x1234_5678_9abc_def1,
        u64::MAX - 3,
        u64::MAX,
    ];
    for &s in &states {
        for &e in &elements {
            let block = e >> 2;
            let words = philox4x32_10(
                [
                    block as u32,
                    (block >> 32) as u32,
                    s.offset as u32,
                    (s.offset >> 32) as u32,
                ],
                [s.seed as u32, (s.seed >> 32) as u32],
            );
            assert_eq!(
                element_word(s, e),
                words[(e & 3) as usize],
                "state {s:?}, element {e}"
            );
        }
    }
}

/// Element 0..4 of seed 0, offset 0 are exactly the zero KAT block (pins the word order).
#[test]
fn element_word_of_zero_state_is_zero_kat() {
    let s = PhiloxState::new(0, 0);
    let words: Vec<u32> = (0..4).map(|e| element_word(s, e)).collect();
    assert_eq!(words, [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
}
