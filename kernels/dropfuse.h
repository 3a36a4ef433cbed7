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
 *
 * CUDA-graph-safe randomness
 *   Every random launcher's params carry `philox_dev`. When it is null, (seed, offset) are the
 *   params' values, fixed at launch (and frozen into a captured CUDA graph). When it points to two
 *   uint64_t {seed, offset} in device memory (8-byte aligned, on the launch's context), the kernel
 *   reads them when it runs and uses seed = philox_dev[0], offset = philox_dev[1] + params.offset
 *   (wrapping; params.offset then selects a stream relative to the device offset and params.seed is
 *   ignored). A graph captured once therefore draws fresh numbers on each replay when the device
 *   offset is advanced between replays, e.g. by dropfuse_philox_advance captured into the graph.
 *   Launches that draw several consecutive streams apply the rule to each: replica t of
 *   dropfuse_mc_dropout_forward uses philox_dev[1] + params.offset + t, sample k of the multi-sample
 *   launchers philox_dev[1] + params.offset + k. Every launcher that draws random numbers honours
 *   philox_dev: dropout (mask, forward), DropBlock (forward), structured dropout (mask, forward),
 *   MC-dropout replicas, multi-sample dropout (copies, mask-free reduce) and bias + dropout +
 *   residual (forward, mask-free backward); a misaligned philox_dev is cudaErrorInvalidValue.
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
  const uint64_t *philox_dev; /* null, or {seed, offset} in device memory (graph-safe, see above) */
} dropfuse_dropout_params;

/* Adds `streams` to the offset of a device Philox state {seed, offset} (wrapping), on `stream`:
 * one tiny kernel, capturable into a CUDA graph so that each replay advances the state. */
int dropfuse_philox_advance(uint64_t *philox_dev, uint64_t streams, dropfuse_stream_t stream);

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
  const uint64_t *philox_dev; /* null, or {seed, offset} in device memory (graph-safe, see above) */
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

/* ---- Token routing (Mixture-of-Depths, GateSkip) ----
 * The contract: src/reference/skip.rs, points 7-12 (src/routing.rs). Scores are f32, B x S
 * row-major; a token ranks before another iff its key is larger, or the keys are equal and its index
 * (within the sequence for top-k, flat b * S + t for the global budget) is lower; key(NaN) = 0 is the
 * lowest, -0 ranks as +0. Valid tokens: a byte mask (B x S, nonzero = real token), or B u32 lengths
 * (tokens t < min(length, S) are real), or neither (every token is real); not both.
 * Selection writes offsets (B + 1 u32: offsets[b] is the first compact row of sequence b,
 * offsets[B] the total) and the selected token indices (ascending within each sequence) into
 * `indices`, never at or beyond `capacity`: a caller that sized `indices` by an upper bound reads
 * offsets[B] once (or never) and compares. Every kernel reads the count from the device: no host
 * synchronisation anywhere. Compact buffers are rows of `hidden` elements; the row kernels touch
 * rows r < min(offsets[B], capacity, the rows passed). */
#define DROPFUSE_CAPACITY_FRACTION 0 /* k_b = round(fraction * V_b), f64, half away from zero */
#define DROPFUSE_CAPACITY_TOKENS 1   /* k_b = min(tokens, V_b) */
/* Work buffer of a selection: DROPFUSE_ROUTING_WORK_PER_SEQUENCE * B + DROPFUSE_ROUTING_WORK_FIXED
 * u32 words (scratch between the selection's kernels). After dropfuse_route_global, word
 * DROPFUSE_ROUTING_WORK_PER_SEQUENCE * B + DROPFUSE_ROUTING_THRESHOLD_WORD holds the key of the
 * threshold (the last selected token's), 0xFFFFFFFF when nothing is selected. */
#define DROPFUSE_ROUTING_WORK_PER_SEQUENCE 4
#define DROPFUSE_ROUTING_STATE_WORDS 16
#define DROPFUSE_ROUTING_WORK_FIXED (1024 + DROPFUSE_ROUTING_STATE_WORDS)
#define DROPFUSE_ROUTING_THRESHOLD_WORD (1024 + 2)

typedef struct dropfuse_routing {
  uint64_t batch;    /* B >= 1 */
  uint64_t seq_len;  /* S >= 1, B * S <= 2^32 - 1 */
  uint32_t *offsets; /* B + 1 entries (4-byte aligned, as every u32/f32 buffer here) */
  uint32_t *indices; /* `capacity` entries (may be null when capacity is 0) */
  uint64_t capacity;
  uint32_t *work;    /* the work buffer (selection only; the row kernels ignore it) */
} dropfuse_routing;

/* Per-sequence top-k (Mixture-of-Depths): capacity_kind DROPFUSE_CAPACITY_FRACTION (fraction in
 * [0, 1]) or DROPFUSE_CAPACITY_TOKENS (tokens). One block per sequence (radix select on the keys). */
int dropfuse_route_top_k(const float *scores, const uint8_t *mask, const uint32_t *lengths,
                         uint32_t capacity_kind, double fraction, uint64_t tokens,
                         const dropfuse_routing *routing, dropfuse_stream_t stream);

/* Global budget (GateSkip): the round(keep_fraction * V) best of the V valid tokens of the batch. */
int dropfuse_route_global(const float *scores, const uint8_t *mask, const uint32_t *lengths,
                          double keep_fraction, const dropfuse_routing *routing,
                          dropfuse_stream_t stream);

/* out[r] = x[token of r] (bit copies of rows of `hidden`); out has out_rows rows. */
int dropfuse_gather_tokens(dropfuse_dtype dtype, const dropfuse_routing *routing, uint64_t hidden,
                           const void *x, void *out, uint64_t out_rows, dropfuse_stream_t stream);

/* In place: residual[token] = round_T(f32(residual[token]) + g * f32(branch[r])), g = gate[token]
 * (f32, B x S); two f32 roundings, no FMA. branch has branch_rows rows and must not overlap. */
int dropfuse_scatter_add_tokens(dropfuse_dtype dtype, const dropfuse_routing *routing, uint64_t hidden,
                                void *residual, const void *branch, uint64_t branch_rows,
                                const float *gate, dropfuse_stream_t stream);

/* d_branch[r] = round_T(g * f32(d_out[token])); d_gate (B x S, f32) = +0, then for each selected
 * token the chunked sum (32 terms per chunk, contract point 4) of f32(d_out[token][j]) *
 * f32(branch[r][j]). branch and d_branch have `rows` rows. */
int dropfuse_scatter_add_tokens_backward(dropfuse_dtype dtype, const dropfuse_routing *routing,
                                         uint64_t hidden, const void *d_out, const void *branch,
                                         const float *gate, void *d_branch, uint64_t rows,
                                         float *d_gate, dropfuse_stream_t stream);

/* In place: d_x[token] = round_T(f32(d_x[token]) + f32(d_compact[r])); d_compact has `rows` rows. */
int dropfuse_gather_tokens_backward(dropfuse_dtype dtype, const dropfuse_routing *routing,
                                    uint64_t hidden, const void *d_compact, uint64_t rows, void *d_x,
                                    dropfuse_stream_t stream);

/* ---- Compute skipping: stochastic depth and per-sample compaction ----
 * The contract: src/reference/skip.rs, points 1-6 (bit for bit). Tensors are `batch` rows of
 * `row_len` elements (one row per sample), row-major. Keep flags are bytes on the device, 0 =
 * dropped, anything else = kept; nothing here reads device memory on the host or synchronizes. */

/* Terms per partial sum of the bias gradient (contract point 4). */
#define DROPFUSE_D_BIAS_CHUNK 256
/* The slot of a skipped sample. */
#define DROPFUSE_SLOT_NONE 0xffffffffu

/* Which samples keep their branch: sample b is kept iff flags[b * stride] != 0 (stride 1: one flag
 * per sample; stride 0: flags[0] decides for the whole batch, read on the device, so a captured
 * CUDA graph can be replayed with new flags); with flags == NULL, `all` decides on the host
 * (nonzero: every sample kept). */
typedef struct dropfuse_sample_keep {
  const uint8_t *flags;
  uint64_t stride;
  int all;
} dropfuse_sample_keep;

/* Stochastic-depth residual: for kept samples out = round_T(x + scale * (branch + bias[j % P])),
 * each step one f32 operation (no FMA); dropped samples: out = x bit for bit, and their branch is
 * never read. bias is NULL or P = bias_len elements, P dividing row_len. out == residual is
 * allowed (in place: dropped rows are then not touched at all). */
int dropfuse_stochastic_depth_forward(dropfuse_dtype dtype, const void *residual, const void *branch,
                                      const void *bias, void *out, uint64_t batch, uint64_t row_len,
                                      uint64_t bias_len, const dropfuse_sample_keep *keep, float scale,
                                      dropfuse_stream_t stream);

/* f32 elements of the bias-gradient workspace: ceil(batch * (row_len / bias_len) / 256) * bias_len
 * (one partial sum per chunk of 256 terms and bias element); 0 for invalid sizes. */
uint64_t dropfuse_stochastic_depth_workspace(uint64_t batch, uint64_t row_len, uint64_t bias_len);

/* Backward: d_branch = round_T(scale * d_out) for kept samples, +0 for dropped ones (d_out of a
 * dropped sample is not read; d_branch == d_out is allowed). With d_bias not NULL (bias_len
 * elements), also d_bias[k] = round_T(scale * S_k), S_k the chunked sum of contract point 4:
 * kernel 1 writes each chunk's partial sum into `workspace`
 * (dropfuse_stochastic_depth_workspace(...) f32, 4-byte aligned, overwritten), kernel 2 adds the
 * partials of each bias element in ascending chunk order. The residual's gradient is d_out. */
int dropfuse_stochastic_depth_backward(dropfuse_dtype dtype, const void *d_out, void *d_branch, void *d_bias,
                                       float *workspace, uint64_t batch, uint64_t row_len, uint64_t bias_len,
                                       const dropfuse_sample_keep *keep, float scale, dropfuse_stream_t stream);

/* Slots of a compaction (contract point 5): slots[b] = number of kept samples before b for a kept
 * sample, DROPFUSE_SLOT_NONE for a skipped one; *count = number of kept samples. keep: batch bytes
 * (0 = skipped); batch <= 2^32 - 1; slots and count 4-byte aligned. One thread block scans the
 * flags tile by tile (4096 per tile). */
int dropfuse_compact_slots(const uint8_t *keep, uint64_t batch, uint32_t *slots, uint32_t *count,
                           dropfuse_stream_t stream);

/* Compaction operations (contract point 6) on a full batch (`batch` rows) and a compact buffer of
 * `capacity` rows, with the slots of dropfuse_compact_slots. A kept sample whose slot is
 * >= capacity (the count exceeds the capacity: the caller's check of *count fails) is left alone:
 * none of its rows, full or compact, is read or written. Rows of the compact buffer that no
 * sample maps to are never touched. The compact pointer may be NULL when capacity == 0. */

/* compact[slot(b)] = x[b] for kept samples (bit copies). */
int dropfuse_gather_samples(dropfuse_dtype dtype, const void *x, void *compact, const uint32_t *slots,
                            uint64_t batch, uint64_t row_len, uint64_t capacity, dropfuse_stream_t stream);
/* out[b] = compact[slot(b)] for kept samples, x[b] for skipped ones (bit copies); out == x allowed
 * (skipped rows are then not touched). */
int dropfuse_scatter_samples(dropfuse_dtype dtype, const void *x, const void *compact, void *out,
                             const uint32_t *slots, uint64_t batch, uint64_t row_len, uint64_t capacity,
                             dropfuse_stream_t stream);
/* d_compact[slot(b)] = d_out[b] and d_x[b] = +0 for kept samples, d_x[b] = d_out[b] for skipped
 * ones; d_x == d_out allowed. */
int dropfuse_scatter_samples_backward(dropfuse_dtype dtype, const void *d_out, void *d_x, void *d_compact,
                                      const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                      uint64_t capacity, dropfuse_stream_t stream);
/* out[b] = round_T(x[b] + scale * compact[slot(b)]) for kept samples, x[b] for skipped ones;
 * out == x allowed (in place). */
int dropfuse_scatter_add_samples(dropfuse_dtype dtype, const void *x, const void *compact, void *out,
                                 const uint32_t *slots, uint64_t batch, uint64_t row_len, uint64_t capacity,
                                 float scale, dropfuse_stream_t stream);
/* d_compact[slot(b)] = round_T(scale * d_out[b]) for kept samples. */
int dropfuse_scatter_add_samples_backward(dropfuse_dtype dtype, const void *d_out, void *d_compact,
                                          const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                          uint64_t capacity, float scale, dropfuse_stream_t stream);
/* d_x[b] = round_T(d_x[b] + d_compact[slot(b)]) for kept samples (accumulates; skipped rows untouched). */
int dropfuse_gather_samples_backward(dropfuse_dtype dtype, const void *d_compact, void *d_x,
                                     const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                     uint64_t capacity, dropfuse_stream_t stream);

/* ---- Multi-sample dropout and weighted cross-entropy (the contract: src/reference/multi_sample.rs) ----
 * Sample k (0 <= k < K) of a multi-sample dropout uses the dropout contract above with the stream
 * offset + k (wrapping; philox_dev[1] + offset + k with a device state) over the n = B * D elements
 * of h (element offset 0). */
#define DROPFUSE_MULTI_SAMPLE_MAX_K 128
#define DROPFUSE_WEIGHTED_CE_MAX_K 128

typedef struct dropfuse_multi_sample_params {
  uint64_t seed;      /* Philox key */
  uint64_t offset;    /* stream of sample 0; sample k uses offset + k */
  uint64_t k;         /* samples, 1 ..= DROPFUSE_MULTI_SAMPLE_MAX_K */
  uint64_t threshold; /* drop iff word < threshold; 0 ..= 2^32 */
  float scale;        /* multiplier of kept elements */
  const uint64_t *philox_dev; /* null, or {seed, offset} in device memory (graph-safe, see above):
                                 sample k then uses philox_dev[1] + offset + k */
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

/* ---- Structured dropout (the contract: src/reference/structured.rs) ----
 * Channel (Dropout1d/2d/3d), locked (variational) and embedding-row dropout: the axes of a
 * row-major tensor are either shared (one decision along the axis) or not. The host collapses the
 * shape into at most DROPFUSE_STRUCTURED_MAX_GROUPS groups of consecutive axes, alternating between
 * shared and non-shared (extent-1 axes removed, adjacent axes of the same kind merged). Element e
 * follows decision d(e) = sum over non-shared groups g of i_g * decision_stride[g], with i_g the
 * element's index in group g; decisions use the mask contract above on index
 * params->element_offset + d (element_offset is the *decision* offset here). The mask holds one bit
 * per decision: ceil(decisions / 32) words, exactly dropfuse_dropout_mask(decisions) with the same
 * params. Kept elements become round_to_T(float(x) * scale), dropped ones +0. */
#define DROPFUSE_STRUCTURED_MAX_GROUPS 8

typedef struct dropfuse_structured_layout {
  uint32_t groups;                                          /* 1 ..= DROPFUSE_STRUCTURED_MAX_GROUPS */
  uint64_t extent[DROPFUSE_STRUCTURED_MAX_GROUPS];          /* group extents (>= 1), outermost first */
  uint64_t decision_stride[DROPFUSE_STRUCTURED_MAX_GROUPS]; /* 0 for a shared group */
  uint64_t numel;                                           /* product of the extents */
  uint64_t decisions;                                       /* product of the non-shared extents */
} dropfuse_structured_layout;

/* Writes the decision mask: ceil(layout->decisions / 32) words. */
int dropfuse_structured_mask(uint32_t *mask, const dropfuse_structured_layout *layout,
                             const dropfuse_dropout_params *params, dropfuse_stream_t stream);

/* y = structured dropout of x (numel elements); writes the decision mask too when `mask` is not
 * null. x == y is allowed (in place). Also the mask-free backward (pass dy, dx and the forward's
 * params). Channel-like layouts (one decision per contiguous plane) write dropped planes without
 * reading x. */
int dropfuse_structured_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask,
                                const dropfuse_structured_layout *layout,
                                const dropfuse_dropout_params *params, dropfuse_stream_t stream);

/* dx = dy * scale where the element's decision bit is set in `mask`, +0 elsewhere. dy == dx is
 * allowed (in place). */
int dropfuse_structured_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                 const dropfuse_structured_layout *layout, float scale,
                                 dropfuse_stream_t stream);

/* ---- Monte-Carlo dropout (the contract: src/reference/mc_dropout.rs) ----
 * Replicas: y is R x n, replica t is dropout of x with offset params->offset + t (wrapping;
 * params->philox_dev[1] + params->offset + t with a device state) and the same element_offset;
 * masks (optional) are R masks of ceil(n / 32) words each, concatenated. */
int dropfuse_mc_dropout_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *masks,
                                uint64_t n, uint64_t replicas, const dropfuse_dropout_params *params,
                                dropfuse_stream_t stream);

/* Streaming predictive summaries of B x C f32 probabilities, in f32 on the device.
 * state: mean[B*C], m2[B*C] (Welford), expected_entropy[B] (running mean of the per-sample row
 * entropies), all zero initially, and ctl[DROPFUSE_MC_CTL_WORDS] (zero initially, 8-byte aligned):
 *   ctl[0] accepted samples, ctl[1] rejected pushes, ctl[2] 1 + index of the first invalid value of
 *   the first rejected push (0: none), ctl[3] the push in flight's first invalid index + 1 (scratch),
 *   ctl[4] blocks done (scratch). */
#define DROPFUSE_MC_CTL_WORDS 5

typedef struct dropfuse_mc_state {
  float *mean;
  float *m2;
  float *expected_entropy;
  unsigned long long *ctl;
  uint64_t batch, classes;
} dropfuse_mc_state;

/* Pushes `samples` (>= 1) samples stored one after the other in probs (samples x B x C), in order,
 * reading them once. With `check` nonzero a validation pass reads them first: if any value is NaN,
 * infinite or negative, the push leaves mean, m2, expected_entropy and ctl[0] unchanged and is
 * counted in ctl[1] (and ctl[2]); no host synchronisation either way. */
int dropfuse_mc_summary_push(const float *probs, uint64_t samples, int check, const dropfuse_mc_state *state,
                             dropfuse_stream_t stream);

/* The summaries of the accepted samples (T = ctl[0], read on the device): variance[B*C] = m2 / T,
 * predictive_entropy[B] = H[mean], mutual_information[B] = max(0, predictive - expected); with
 * T = 0 every output is NaN. The mean and the expected entropy are the state's own buffers. */
int dropfuse_mc_summary_finish(const dropfuse_mc_state *state, float *variance, float *predictive_entropy,
                               float *mutual_information, dropfuse_stream_t stream);

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

/* ---- Multi-sample dropout head (src/multi_sample/head.rs: K masked copies, cuBLAS GEMMs, these) ----
 * dropfuse_weighted_ce with two more arguments: grad_scale (finite, > 0) multiplies the gradient
 * (coefficient (w_k / n_valid) * grad_scale in f32: n_valid converted to f32, exact up to 2^24 valid
 * rows, then the quotient and the product each rounded to f32; a power of two scales the gradient
 * exactly, 1 gives dropfuse_weighted_ce's gradient bit for bit), and
 * zero_grad_on_bad_label != 0 makes a bad label write zeros into grad (the loss is still not
 * written) instead of leaving grad untouched. grad_dtype may be any dtype when dtype is F32 (f32
 * logits from a GEMM, the gradient in the GEMM's input type); otherwise dtype or F32. */
int dropfuse_weighted_ce_scaled(dropfuse_dtype dtype, const void *logits, const int64_t *labels, float *loss,
                                dropfuse_dtype grad_dtype, void *grad, void *scratch,
                                const dropfuse_weighted_ce_params *params, float grad_scale,
                                int zero_grad_on_bad_label, dropfuse_stream_t stream);

/* out[r * c + j] = float(bias[j]) for r < rows, j < c (out: f32, 4-byte aligned): the broadcast bias
 * a GEMM then adds with beta = 1. */
int dropfuse_multi_sample_bias_rows(dropfuse_dtype dtype, const void *bias, float *out, uint64_t rows, uint64_t c,
                                    dropfuse_stream_t stream);

/* Rows per chunk of dropfuse_column_sums (part of its fixed summation order). */
#define DROPFUSE_COLSUM_CHUNK 256

/* f32 values of the scratch of dropfuse_column_sums: ceil(rows / DROPFUSE_COLSUM_CHUNK) * c. */
uint64_t dropfuse_column_sums_scratch_floats(uint64_t rows, uint64_t c);

/* out[j] = round_out((sum over r < rows of x[r * c + j]) * scale) for j < c (x: rows x c, row-major),
 * in f32 and deterministic: each chunk of DROPFUSE_COLSUM_CHUNK rows is summed by 4 lanes (lane l:
 * rows l, l + 4, ... of the chunk, ascending), the lanes added in order 0..3, then the chunks added in
 * ascending order; the sum is multiplied by scale and rounded once. Two launches. */
int dropfuse_column_sums(dropfuse_dtype dtype, const void *x, uint64_t rows, uint64_t c, float *scratch,
                         dropfuse_dtype out_dtype, void *out, float scale, dropfuse_stream_t stream);

/* Name and description of a status returned by the launchers (cudaGetErrorName/String). */
const char *dropfuse_error_name(int status);
const char *dropfuse_error_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* DROPFUSE_H */
