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

/* ---- Multi-sample dropout and weighted cross-entropy (the contract: src/reference/multi_sample.rs) ----
 * Sample k (0 <= k < K) of a multi-sample dropout uses the dropout contract above with the stream
 * offset + k (wrapping) over the n = B * D elements of h (element offset 0). */
#define DROPFUSE_MULTI_SAMPLE_MAX_K 128
#define DROPFUSE_WEIGHTED_CE_MAX_K 128

typedef struct dropfuse_multi_sample_params {
  uint64_t seed;      /* Philox key */
  uint64_t offset;    /* stream of sample 0; sample k uses offset + k */
  uint64_t k;         /* samples, 1 ..= DROPFUSE_MULTI_SAMPLE_MAX_K */
  uint64_t threshold; /* drop iff word < threshold; 0 ..= 2^32 */
  float scale;        /* multiplier of kept elements */
} dropfuse_multi_sample_params;

/* copies[k * n + e] = dropout_k(h)[e] for the K samples, in one launch reading h once. When `masks`
 * is not null, writes sample k's bit mask (ceil(n/32) words) at masks + k * ceil(n/32). */
int dropfuse_multi_sample_copies(dropfuse_dtype dtype, const void *h, void *copies, uint32_t *masks,
                                 uint64_t n, const dropfuse_multi_sample_params *params,
                                 dropfuse_stream_t stream);

/* dh[e] = sum over k ascending of (keep_k(e) ? grads[k * n + e] * scale : 0), in f32 (each product
 * rounded, then added), rounded once to out_dtype. keep_k from the stored masks (laid out as
 * dropfuse_multi_sample_copies writes them) or, with a null `masks`, regenerated from params. */
int dropfuse_multi_sample_reduce(dropfuse_dtype grad_dtype, const void *grads, dropfuse_dtype out_dtype,
                                 void *dh, const uint32_t *masks, uint64_t n,
                                 const dropfuse_multi_sample_params *params, dropfuse_stream_t stream);

/* mean[e] = (sum over k ascending of logits[k * n + e]) * float(1 / k) in f32; out_dtype is dtype or F32. */
int dropfuse_multi_sample_mean(dropfuse_dtype dtype, const void *logits, dropfuse_dtype out_dtype,
                               void *mean, uint64_t k, uint64_t n, dropfuse_stream_t stream);

typedef struct dropfuse_weighted_ce_params {
  uint64_t k, b, c;        /* logit sets, rows, classes */
  int64_t ignore_index;    /* labels equal to this are ignored */
  float label_smoothing;   /* eps in [0, 1] */
  float weights[DROPFUSE_WEIGHTED_CE_MAX_K]; /* w_k, the first k used (validated by the caller) */
} dropfuse_weighted_ce_params;

/* Bytes of the scratch buffer of dropfuse_weighted_ce: 16 + 4 * k * b (8-byte aligned). */
uint64_t dropfuse_weighted_ce_scratch_bytes(uint64_t k, uint64_t b);

/* Weighted cross-entropy over K logit sets (K x B x C, dtype) sharing B labels (int64):
 *   loss = sum_k w_k * mean over non-ignored rows of CE(z_k[i], y_i)  (label smoothing eps),
 *   grad_k[i][c] = w_k * (softmax(z_k[i])[c] - t_i[c]) / n_valid, 0 on ignored rows,
 * with t_i[c] = 1 - eps * (C - 1) / C on the label and eps / C elsewhere. n_valid is counted on the
 * device; if it is 0 the loss and the gradient are 0. The loss (one f32) is deterministic: row
 * partials, then a fixed-order combine (no float atomics). grad (grad_dtype = dtype or F32) may be
 * null (loss only). After the call the scratch starts with two uint64: n_valid, and the first row
 * whose label is neither in [0, C) nor the ignore index (UINT64_MAX if none); when there is such a
 * row, neither loss nor grad is written. Three launches on `stream` (labels, rows, combine). */
int dropfuse_weighted_ce(dropfuse_dtype dtype, const void *logits, const int64_t *labels, float *loss,
                         dropfuse_dtype grad_dtype, void *grad, void *scratch,
                         const dropfuse_weighted_ce_params *params, dropfuse_stream_t stream);

/* Name and description of a status returned by the launchers (cudaGetErrorName/String). */
const char *dropfuse_error_name(int status);
const char *dropfuse_error_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* DROPFUSE_H */
