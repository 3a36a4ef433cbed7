//! Randomness handed to the kernels: a `(seed, offset)` pair and a generator that hands them out.
//!
//! The mask contract (README, `kernels/dropfuse.h`): the random word of element `e` (its global index:
//! `element_offset + i` for element `i` of a slice) is word `e % 4` of
//! `Philox4x32-10(counter = [lo(e/4), hi(e/4), lo(offset), hi(offset)], key = [lo(seed), hi(seed)])`.
//! So `offset` selects an independent stream of 2^64 Philox blocks (2^66 elements) and one call
//! consumes one offset; a [`Generator`] advances it so calls never reuse random numbers.

/// The randomness of one kernel call: Philox key (`seed`) and stream (`offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PhiloxState {
    /// Philox key (both 32-bit key words).
    pub seed: u64,
    /// Philox stream: counter words 2 and 3. Each call uses one stream.
    pub offset: u64,
}

impl PhiloxState {
    /// A state from a seed and a stream offset.
    pub const fn new(seed: u64, offset: u64) -> Self {
        PhiloxState { seed, offset }
    }
}

/// Hands out [`PhiloxState`]s: a fixed seed and an offset that advances by what each call consumed.
///
/// Successive calls never reuse random numbers: each `next()` gets a fresh offset (stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generator {
    seed: u64,
    offset: u64,
}

impl Generator {
    /// A generator for `seed`, starting at offset 0.
    pub const fn new(seed: u64) -> Self {
        Generator { seed, offset: 0 }
    }
    /// A generator resumed at a given offset (e.g. from a checkpoint).
    pub const fn with_offset(seed: u64, offset: u64) -> Self {
        Generator { seed, offset }
    }
    /// The seed.
    pub const fn seed(&self) -> u64 {
        self.seed
    }
    /// The offset the next call will get (save it to checkpoint the generator).
    pub const fn offset(&self) -> u64 {
        self.offset
    }
    /// The state for one call (one stream); advances the offset by one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> PhiloxState {
        self.next_streams(1)
    }
    /// The first of `streams` consecutive streams (for a call that uses several, e.g. one per
    /// sample); advances the offset by `streams`. Offsets wrap around after 2^64 streams.
    pub fn next_streams(&mut self, streams: u64) -> PhiloxState {
        let state = PhiloxState::new(self.seed, self.offset);
        self.offset = self.offset.wrapping_add(streams);
        state
    }
}
