/*
 * dropfuse: C declarations of the CUDA kernel launchers. Rust's FFI (src/ffi.rs) is generated from
 * this header by bindgen at build time.
 *
 * Conventions
 *   - Every launcher enqueues its work on `stream` and returns a cudaError_t as int: 0 on success,
 *     otherwise the error of the launch (or cudaErrorInvalidValue = 1 for a null pointer, a bad dtype
 *     or a misaligned mask). Launchers never synchronize.
 *   - The caller's current CUDA context must own `stream` and the memory (the Rust layer binds it).
 *   - n == 0 is a no-op returning 0. Sizes and indices are 64-bit: tensors over 2^32 elements work.
 *   - Data pointers may have any element alignment: 16-byte vector loads/stores are used when every
 *     data pointer is 16-byte aligned, a scalar path otherwise. Masks must be 4-byte aligned.
 *   - Out-of-place calls require non-overlapping input and output; in-place calls pass the same
 *     pointer for both (each element is read and then written by the same thread).
 *
 * The mask contract (shared with the CPU reference, src/reference/)
 *   Philox4x32-10 with the cuRAND constants: multipliers 0xD2511F53, 0xCD9E8D57; key increments
 *   0x9E3779B9, 0xBB67AE85. Element e (its global index: element_offset + i for element i of the
 *   slice being processed) gets the 32-bit word
 *       word(e) = Philox4x32-10(counter = {lo(e/4), hi(e/4), lo(offset), hi(offset)},
 *                               key     = {lo(seed), hi(seed)})[e % 4]
 *   and is kept iff word(e) >= threshold, with threshold = round(p * 2^32) in [0, 2^32]
 *   (so p = 0 keeps everything and p = 1 drops everything). A kept element becomes
 *   round_to_T(float(x) * scale) with one f32 multiply and one round-to-nearest-even narrowing;
 *   a dropped element becomes +0. scale = float(1 / (1 - p)) (0 for p = 1).
 *   The decision depends only on (seed, offset, e): not on the GPU, the grid or the block shape.
 *   Bit-packed masks: bit j of 32-bit word w is slice element 32w + j; unused bits of the last word
 *   are written as 0. A mask holds ceil(n / 32) words.
 */
#ifndef DROPFUSE_H
#define DROPFUSE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Opaque CUDA stream; the same type as cudaStream_t and CUstream. */
typedef struct CUstream_st *dropfuse_stream_t;

/* Element type codes. */
typedef enum dropfuse_dtype {
  DROPFUSE_F32 = 0,
  DROPFUSE_F16 = 1,
  DROPFUSE_BF16 = 2,
} dropfuse_dtype;

/* Parameters of one dropout call (see the mask contract above). */
typedef struct dropfuse_dropout_params {
  uint64_t seed;           /* Philox key */
  uint64_t offset;         /* Philox stream: counter words 2 and 3 */
  uint64_t element_offset; /* global index of element 0 of this slice (tensor-parallel shards) */
  uint64_t threshold;      /* drop iff word < threshold; 0 ..= 2^32 */
  float scale;             /* multiplier of kept elements */
} dropfuse_dropout_params;

/* Writes the bit-packed keep mask of n elements: ceil(n/32) words. */
int dropfuse_dropout_mask(uint32_t *mask, uint64_t n, const dropfuse_dropout_params *params,
                          dropfuse_stream_t stream);

/* y = dropout(x). Writes the bit mask too when `mask` is not null (ceil(n/32) words); with a null
 * mask the backward regenerates the decisions from the same params. x == y is allowed (in place).
 * Also the mask-free backward: dx = dropfuse_dropout_forward(dy) with the forward's params. */
int dropfuse_dropout_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask,
                             uint64_t n, const dropfuse_dropout_params *params,
                             dropfuse_stream_t stream);

/* dx = dy * scale where the mask bit is set, +0 elsewhere (backward from a stored mask).
 * dy == dx is allowed (in place). */
int dropfuse_dropout_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                              uint64_t n, float scale, dropfuse_stream_t stream);

/* ---- DropBlock (the contract: src/drop_block.rs) ----
 * A 2D tensor [N, C, H, W] is passed as 3D with D = 1 and block_d = 1. */
typedef enum dropfuse_normalize {
  DROPFUSE_NORMALIZE_GLOBAL = 0,     /* scale = numel / kept (whole tensor) */
  DROPFUSE_NORMALIZE_PER_SAMPLE = 1, /* scale_n = C*D*H*W / kept_n */
  DROPFUSE_NORMALIZE_OFF = 2,        /* scale = 1 */
} dropfuse_normalize;

typedef struct dropfuse_drop_block_params {
  uint64_t seed;        /* Philox key */
  uint64_t offset;      /* Philox stream */
  uint64_t n, c;        /* samples, channels */
  uint64_t d, h, w;     /* spatial extents (D = 1 for 2D) */
  uint64_t block_d, block_h, block_w; /* block extents, each already min(block_size, extent) */
  uint64_t threshold;   /* a seed is drawn iff its word < threshold; 0 ..= 2^32 */
  int shared_channels;  /* nonzero: one mask plane per sample, shared by its channels */
  dropfuse_normalize normalize;
} dropfuse_drop_block_params;

/* Bytes of shared memory the mask kernel may use per block; a shape is supported iff
 * 8 * block_a * rows * ceil(w / 32) <= this, with (block_a, rows) = (block_d, h) when d > 1 and
 * (block_h, 1) otherwise (one output slab of a plane and the seed slabs it depends on). */
#define DROPFUSE_DROP_BLOCK_SMEM 49152

/* Writes the keep mask (ceil(numel/32) words) and stats (n + 1 u64: kept elements of each sample,
 * then of the whole tensor; zeroed by the call). Then, when x is not null, y = x * keep * scale
 * with the scale of params->normalize computed on the device from stats (no host synchronisation).
 * x == y is allowed (in place). */
int dropfuse_drop_block_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask,
                                uint64_t *stats, const dropfuse_drop_block_params *params,
                                dropfuse_stream_t stream);

/* dx = dy * keep * scale from a stored mask and the forward's stats (same params: shape and
 * normalize). dy == dx is allowed. */
int dropfuse_drop_block_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                 const uint64_t *stats, const dropfuse_drop_block_params *params,
                                 dropfuse_stream_t stream);

/* ---- Fused bias + dropout + residual add (the contract: src/reference/bias_dropout_residual.rs) ----
 * y = residual + dropout(x + bias) on rows x row_len elements (row-major), the bias (row_len
 * elements, may be null) broadcast over rows. Keep decisions, scale and mask are dropout's above
 * (params as for dropfuse_dropout_forward; element i of the slice is global element
 * element_offset + i). Per element, in f32 without FMA contraction: t = x + bias[i % row_len]
 * (no add without a bias), u = keep ? scale * t : +0, y = round(residual + u).
 * 1 <= row_len <= 2^31 (cudaErrorInvalidValue otherwise); rows == 0 is a no-op. */

/* Rows per partial sum of the bias gradient (the contract's fixed reduction order). */
#define DROPFUSE_BDR_DBIAS_CHUNK 256

/* Writes y and, when `mask` is not null, the bit mask (ceil(n/32) words, exactly dropout's).
 * y may equal residual or x (in place). */
int dropfuse_bias_dropout_residual_forward(dropfuse_dtype dtype, const void *x, const void *residual,
                                           const void *bias, void *y, uint32_t *mask, uint64_t rows,
                                           uint64_t row_len, const dropfuse_dropout_params *params,
                                           dropfuse_stream_t stream);

/* dx = keep ? round(scale * dy) : +0, with the keep bits from `mask` or, when it is null,
 * regenerated from params (the forward's). When `dbias` is not null (row_len elements) it also
 * writes dbias[j] = round(sum over rows of the f32 terms keep ? scale * dy : +0) in the contract's
 * order, using `workspace`: ceil(rows / DROPFUSE_BDR_DBIAS_CHUNK) * row_len floats (4-byte
 * aligned, not overlapping anything else; its contents are scratch). dy == dx is allowed. Without
 * dbias this is dropout's backward (the workspace is not used). */
int dropfuse_bias_dropout_residual_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                            void *dbias, float *workspace, uint64_t rows, uint64_t row_len,
                                            const dropfuse_dropout_params *params, dropfuse_stream_t stream);

/* ---- Attention-layer importance (the contract and the f32 tolerance: src/reference/importance.rs) ----
 * Per-token cosine similarity of a layer's input and output hidden states (tokens x hidden,
 * row-major), PyTorch 2.x semantics: dot / (max(|a|, 1e-8) * max(|b|, 1e-8)), f32 accumulation
 * without FMA contraction, one warp per token. The similarities of the real tokens (mask byte
 * != 0; a null mask: every token) are summed in f64 in a fixed order and added to *layer_sum, their
 * number to *layer_count: several batches accumulate on the device without host reads.
 * Deterministic (the order depends on the shape only). hidden == 0 is cudaErrorInvalidValue. */

/* Tokens per tile of the fixed-order sum. */
#define DROPFUSE_IMPORTANCE_TILE 64

/* tile_sums and tile_counts: workspace of ceil(tokens / DROPFUSE_IMPORTANCE_TILE) entries each
 * (8-byte aligned, scratch). similarities (optional, may be null): one f32 per token, written with
 * the token's similarity, NaN for padding tokens. layer_sum / layer_count: read and updated. */
int dropfuse_importance_accumulate(dropfuse_dtype dtype, const void *input, const void *output, const uint8_t *mask,
                                   float *similarities, uint64_t tokens, uint64_t hidden, double *tile_sums,
                                   uint64_t *tile_counts, double *layer_sum, uint64_t *layer_count,
                                   dropfuse_stream_t stream);

/* Name and description of a status returned by the launchers (cudaGetErrorName/String). */
const char *dropfuse_error_name(int status);
const char *dropfuse_error_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* DROPFUSE_H */
