//! The CPU reference ("oracle"): a plain, slow model of every dropfuse kernel, bit-exact for the
//! element-wise ones (masks, dropout outputs, gathers, plans).
//!
//! The CUDA kernels are tested by comparing their outputs with these functions: bit for bit where
//! the arithmetic is element-wise, within documented bounds where they reduce in floating point
//! in an order the contract does not fix (cross-entropy, MC-dropout summaries, importance sums).
//! You can do the same with your own kernels. The contract:
//!
//! 1. **Generator.** Philox4x32-10 with the Random123 / cuRAND constants
//!    ([`philox4x32_10`]). One round maps counter `c` and key `k` to
//!    `[hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]`, where `(hi0, lo0)` is the 64-bit
//!    product `0xD2511F53 * c[0]` and `(hi1, lo1)` is `0xCD9E8D57 * c[2]`. Ten rounds; before
//!    rounds 2 to 10 the key is bumped: `k[0] += 0x9E3779B9`, `k[1] += 0xBB67AE85` (wrapping).
//!
//! 2. **Random word of an element.** Element `e` is a *global* index: element `i` of a slice
//!    whose first element has index `element_offset` is `e = element_offset + i`. With
//!    [`PhiloxState`](crate::PhiloxState) `{ seed, offset }`, its word is
//!
//!    ```text
//!    word(e) = philox4x32_10([lo32(e >> 2), hi32(e >> 2), lo32(offset), hi32(offset)],
//!                            [lo32(seed), hi32(seed)])[e & 3]
//!    ```
//!
//!    ([`philox::element_word`]). One Philox call yields the words of four consecutive elements.
//!
//! 3. **Threshold.** A drop probability `p` must be finite and in `[0, 1]`; anything else (NaN,
//!    negative, above 1, infinite) is rejected with an invalid-argument error named `p`. The
//!    threshold is `round(p * 2^32)` computed in `f64` (the multiply is exact, `round` is half
//!    away from zero), a value in `[0, 2^32]` ([`dropout::drop_threshold`]). Element `e` is
//!    **kept iff `word(e) as u64 >= threshold`** ([`dropout::keep`]): `p = 0` keeps everything,
//!    `p = 1` (threshold 2^32) drops everything.
//!
//! 4. **Scale.** Kept elements are multiplied by `(1 / (1 - p)) as f32`, computed in `f64` and
//!    rounded once to `f32`; for `p = 1` the scale is `0.0` ([`dropout::keep_scale`]).
//!
//! 5. **Mask.** The mask of `n` elements is `ceil(n / 32)` `u32` words; bit `j` of word `w` is the
//!    keep decision of slice element `32 * w + j`, and the unused high bits of the last word are
//!    0 ([`dropout::mask`]). Because decisions depend only on global indices, the mask of a slice
//!    `[a, a + m)` computed with `element_offset = a` equals bits `a .. a + m` of the whole
//!    tensor's mask: shards of one tensor can be processed independently.
//!
//! 6. **Arithmetic.** Values are widened exactly to `f32`, multiplied once by the scale in `f32`,
//!    and rounded once back to the element type with round-to-nearest-even. Dropped elements are
//!    `+0.0`, even when the input is NaN or infinite ([`dropout::apply_mask`]).
//!
//! 7. **Operations.** [`dropout::forward`] returns `(y, mask)`; [`dropout::backward_from_mask`]
//!    applies a stored mask to `dy`; [`dropout::backward`] regenerates the mask from Philox and
//!    gives the same result as the forward with the same `(p, state, element_offset)`.
//!
//! 8. **Validation.** Empty data (`x` or `dy`; `n` for [`dropout::mask`]), a mask whose length
//!    is not exactly `ceil(n / 32)` (`mask`), and an `element_offset + n` that overflows `u64`
//!    (`element_offset`) are invalid-argument errors, returned before any work is done. Throughout
//!    the reference, an output whose size comes from an argument (a length, a shape, a count) and
//!    cannot be allocated is an invalid-argument error naming that argument (e.g. `n` for
//!    [`dropout::mask`]), not a panic or an abort.
//!
//! 9. **DropBlock.** [`drop_block`] implements the block-dropout contract of
//!    [`crate::drop_block`]: seeds drawn with the same Philox words (seed `i` is drawn iff
//!    `word(i) < threshold`), blocks painted around them, bit-packed masks like dropout's, per-sample
//!    kept counts and scales, forward and backward.
//!
//! 10. **Multi-sample dropout.** [`multi_sample`] is the `f64` oracle of the multi-sample dropout
//!     head (Inoue 2019): `K` dropout copies of the features (sample `k` on stream `offset + k`),
//!     one shared linear classifier, label-smoothed cross-entropy averaged over the samples (or any
//!     weights), and the gradients of `h`, `W` and `b`. Its masked copies are bit-exact like
//!     dropout's; its logits, loss and gradients are `f64` values that kernels match within a
//!     tolerance.
//!
//! 11. **Structured masks.** [`structured`] drops whole groups with one decision each: channel
//!     (spatial) dropout (decision `n * C + c` of `[N, C, *spatial]`), locked (variational) dropout
//!     (the mask shared along one axis) and embedding-row dropout (decision `v` of `[V, E]`).
//!     Decision `d` is dropout's element `decision_offset + d`; the bit-packed mask has one bit per
//!     decision; every element follows its decision with dropout's arithmetic.
//!
//! 12. **Monte-Carlo dropout.** [`mc_dropout`]: `R` replicas of a batch (replica `t` is dropout on
//!     stream `offset + t`), and a one-pass accumulator of predictive summaries over `T` sampled
//!     probability tensors (Welford mean and population variance, predictive and expected entropy,
//!     mutual information / BALD) in `f64`, with the tolerances an `f32` kernel must meet.
//!
//! 13. **Compute skipping.** [`skip`] is the oracle of the skipping kernels: the fused
//!     stochastic-depth residual `out = residual + keep_b * scale * (branch + bias)` (in place, per
//!     sample or batch-wide, dropped samples bit-identical) and its backward; per-sample compaction
//!     (kept samples gathered in ascending order into a buffer of any capacity `>= count`,
//!     scattered back as a copy or a residual add, backward); token routing (Mixture-of-Depths
//!     per-sequence top-k and GateSkip's global budget over one total order on the scores, ties to
//!     the lower index, NaN last, padding never selected; gather, gated scatter-add, backward with
//!     the gate's gradient). All bit-exact, its two reductions in a fixed chunked order.
//!
//! 14. **Fused bias + dropout + residual.** [`bias_dropout_residual`]:
//!     `y = residual + dropout(x + bias)` with dropout's keep decisions and mask over the flat
//!     index, the bias broadcast over rows, one `f32` add / multiply / add and one rounding; the
//!     backward's `dx` is dropout's, `dbias` a chunked sum over rows in a fixed order. Bit-exact.
//!
//! 15. **Attention-layer importance.** [`importance`]: the per-token cosine similarity of a
//!     layer's input and output hidden states (PyTorch 2.x's `cosine_similarity`, `eps = 1e-8`),
//!     in `f64`, summed over real tokens into the per-layer `(sum, count)` that
//!     [`SimilarityAccumulator`](crate::layer_plan::SimilarityAccumulator) takes; the `f32`
//!     kernel's first-order tolerance.

pub mod bias_dropout_residual;
pub mod drop_block;
pub mod dropout;
pub mod importance;
pub mod mc_dropout;
pub mod multi_sample;
pub mod philox;
pub mod skip;
pub mod structured;

pub use philox::philox4x32_10;
