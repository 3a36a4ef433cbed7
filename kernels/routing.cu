// Token routing (Mixture-of-Depths, GateSkip): selection of tokens from f32 gate scores by a radix
// select on u32 keys, the token gather, the gated scatter-add into the residual stream and their
// backward kernels. The contract (bit for bit): src/reference/skip.rs, points 1, 4 and 7-12.
//
// Keys and order. key(s) = 0 for NaN; -0 is read as +0; otherwise the IEEE bits w become !w
// (negative) or w | 2^31 (positive), so keys order like the numbers. A valid key is at most
// 0xFF800000 (+inf): 0xFFFFFFFF never occurs and marks padding (kPad) or "nothing selected" (kNone).
// Token u ranks before v iff key(u) > key(v), or equal keys and u has the lower index.
//
// A selection is summarised per sequence b by (kth_b, ties_b): the sequence's selected tokens are
// its valid tokens with key > kth_b, plus its first ties_b valid tokens (ascending index) whose key
// equals kth_b. Both selections end with the same two kernels:
//   offsets: one block scans the per-sequence counts into offsets (B + 1 entries; the global
//            selection also splits its budget of ties between sequences here, lowest flat index
//            first);
//   emit:    one block per sequence scans its tokens in ascending order, counting (greater, equal)
//            pairs with one 64-bit block scan per chunk: the token at position p is selected with
//            rank gt_before + min(eq_before, ties_b), so indices come out ascending. No index is
//            written at or beyond the routing's capacity (the true count is still in the offsets).
//
// Per-sequence top-k (route_top_k): one block per sequence. It reads the sequence's keys once
// (into shared memory when they fit, otherwise they are recomputed from the scores on every pass),
// counting the valid tokens V_b and building the first 8-bit histogram in the same loop; then
// k_b = round(c * V_b) (f64, half away from zero) or min(k, V_b); then four 8-bit passes (one
// histogram each, shared-memory atomics) narrow the k_b-th key down digit by digit: kth_b is that
// key and ties_b the number of tokens equal to it still to take.
//
// Global budget (route_global): four multi-block histogram passes over the whole batch (block
// histograms in shared memory, added to one global histogram per pass; pass 0 also counts V). Each
// block of pass p replays the digit picks of passes 0 .. p-1 from the global histograms (warp 0,
// 256 bins per pass), so no separate "pick" kernel runs between passes. Then one block per sequence
// counts its tokens above and equal to the threshold key; the offsets kernel gives each sequence its
// share of the ties (lowest flat indices first).
//
// Rows: compact row r belongs to the sequence b with offsets[b] <= r < offsets[b + 1] (a binary
// search over the offsets, once per row, in a shared-memory copy of them for B <= 1024), token
// indices[r] of it. Row kernels give each row a group
// of 2^shift threads (up to 256, fewer for short rows) that moves it in 16-byte vectors when every
// data pointer and the row length in bytes allow, scalar elements otherwise. Only rows
// r < min(offsets[B], index capacity, rows of the compact buffer) are touched.
//
// Gate gradient: one block per row; thread i of a segment sums the 32 products of chunk i
// sequentially (from +0), thread 0 adds the segment's partials in ascending order to the row's total
// (from +0): exactly the chunked sum of contract point 4 with D_GATE_CHUNK = 32.
#include <math.h>
#include <stdint.h>

#include <algorithm>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr uint32_t kPad = 0xFFFFFFFFu;   // a padding token's key (above every valid key)
constexpr uint32_t kNone = 0xFFFFFFFFu;  // kth of a sequence that selects nothing
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kEmitItems = 4;     // consecutive tokens per thread in the emission scan
constexpr int kRowThreads = 256;  // threads per block of the row kernels
constexpr int kGateChunk = 32;    // D_GATE_CHUNK
constexpr int kHistThreads = 256;

// Blocks of the per-sequence kernels (grid-stride over the sequences beyond it). A macro so that
// the host emulation (tests/host_emu/routing_emu.cpp) can make the grid-stride loops wrap.
#ifndef DROPFUSE_ROUTING_MAX_SEQUENCE_BLOCKS
#define DROPFUSE_ROUTING_MAX_SEQUENCE_BLOCKS (1u << 20)
#endif

// The dynamic shared memory of a kernel, and every launch (`launch_kernel`): the host emulation
// (tests/host_emu/cuda_fiber_emu.h) defines both before including this file.
#ifndef DROPFUSE_HOST_EMULATION
#define DROPFUSE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

// Word offsets inside the work buffer (see dropfuse.h): kth, ties, count (or greater), equal: B
// words each; then 4 x 256 histogram words and the state words.
struct Work {
  uint32_t *kth, *ties, *count, *equal, *hist, *state;
};
enum State { kValidCount = 0, kBudget = 1, kThresholdKey = 2, kTieBudget = 3 };

Work carve(uint32_t *work, uint64_t batch) {
  Work w;
  w.kth = work;
  w.ties = work + batch;
  w.count = work + 2 * batch;
  w.equal = work + 3 * batch;
  w.hist = work + 4 * batch;
  w.state = work + 4 * batch + 1024;
  return w;
}

__device__ __forceinline__ uint32_t score_key(float s) {
  if (isnan(s)) return 0u;
  uint32_t w = __float_as_uint(s);
  if ((w & 0x7FFFFFFFu) == 0u) w = 0u;  // -0 is +0
  return (w & 0x80000000u) ? ~w : (w | 0x80000000u);
}

// Valid tokens: a byte mask (nonzero = real) or per-sequence lengths (clamped to S), or neither.
struct Valid {
  const uint8_t *mask;
  const uint32_t *lengths;
};

struct Seq {
  const float *scores;  // the sequence's S scores
  const uint8_t *mask;  // its S flags, or null
  uint64_t limit;       // tokens at or beyond it are padding (lengths), S otherwise
};

__device__ __forceinline__ Seq sequence(const float *scores, Valid v, uint64_t b, uint64_t S) {
  Seq q;
  q.scores = scores + b * S;
  q.mask = v.mask ? v.mask + b * S : nullptr;
  q.limit = v.lengths ? min(static_cast<uint64_t>(v.lengths[b]), S) : S;
  return q;
}

// The key of token t of a sequence, kPad for padding.
__device__ __forceinline__ uint32_t key_at(const Seq &q, uint64_t t) {
  if (t >= q.limit || (q.mask && q.mask[t] == 0)) return kPad;
  return score_key(q.scores[t]);
}

// k_b of contract point 8 (or n of point 9): round(c * V) in f64, half away from zero, or min(k, V).
__device__ __forceinline__ uint64_t budget(uint32_t kind, double fraction, uint64_t tokens, uint64_t valid) {
  const uint64_t k = kind == DROPFUSE_CAPACITY_FRACTION
                         ? static_cast<uint64_t>(round(__dmul_rn(fraction, static_cast<double>(valid))))
                         : tokens;
  return min(k, valid);
}

// ---- block-wide helpers (blockDim.x a multiple of 32, at most 1024) ----

// Exclusive prefix sum over the block's threads in thread order; `total` gets the block's sum.
// `ws` is 32 words of shared memory; the call ends with a barrier, so `ws` can be reused at once.
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long *ws,
                                                                   unsigned long long &total) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  unsigned long long x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(kFull, x, o);
    if (lane >= static_cast<unsigned>(o)) x += y;
  }
  if (lane == 31) ws[warp] = x;
  __syncthreads();
  if (warp == 0) {
    unsigned long long s = lane < warps ? ws[lane] : 0ull;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(kFull, s, o);
      if (lane >= static_cast<unsigned>(o)) s += y;
    }
    if (lane < warps) ws[lane] = s;
  }
  __syncthreads();
  const unsigned long long base = warp ? ws[warp - 1] : 0ull;
  total = ws[warps - 1];
  __syncthreads();
  return base + x - v;
}

__device__ __forceinline__ unsigned long long block_sum(unsigned long long v, unsigned long long *ws) {
  unsigned long long total;
  block_exclusive_scan(v, ws, total);
  return total;
}

// Warp-collective (all 32 lanes): in a 256-bin histogram of the candidates, the digit d holding
// the rem-th largest candidate (1-based); rem becomes its rank among the candidates of digit d.
// Lane l scans the bins 255 - 8l down to 248 - 8l.
__device__ __forceinline__ void pick_digit(const uint32_t *hist, uint32_t &rem, uint32_t &digit) {
  const unsigned lane = threadIdx.x & 31u;
  uint32_t c[8];
  uint32_t sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[255 - 8 * lane - j];
    sum += c[j];
  }
  uint32_t incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t y = __shfl_up_sync(kFull, incl, o);
    if (lane >= static_cast<unsigned>(o)) incl += y;
  }
  const uint32_t excl = incl - sum;
  const unsigned hit = __ballot_sync(kFull, excl < rem && rem <= incl);
  const int src = hit ? __ffs(hit) - 1 : 0;
  uint32_t d = 0, r = rem;
  if (static_cast<int>(lane) == src) {
    uint32_t above = excl;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (above + c[j] >= rem) {
        d = 255 - 8 * lane - j;
        r = rem - above;
        break;
      }
      above += c[j];
    }
  }
  digit = __shfl_sync(kFull, d, src);
  rem = __shfl_sync(kFull, r, src);
}

// ---- per-sequence top-k ----

struct TopK {
  const float *scores;
  Valid valid;
  uint64_t batch, seq_len;
  uint32_t kind;
  double fraction;
  uint64_t tokens;
  uint32_t *kth, *ties, *count;
};

template <bool kSmemKeys>
__global__ void __launch_bounds__(1024) topk_select_kernel(const TopK a) {
  DROPFUSE_DYNAMIC_SHARED(uint32_t, keys);  // S keys (kSmemKeys)
  __shared__ uint32_t hist[256];
  __shared__ unsigned long long ws[32];
  __shared__ uint32_t sh_digit, sh_rem;
  const uint64_t S = a.seq_len;
  for (uint64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    const Seq q = sequence(a.scores, a.valid, b, S);
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // One read of the sequence: keys, the valid count and the histogram of the top digit.
    unsigned long long valid = 0;
    for (uint64_t t = threadIdx.x; t < S; t += blockDim.x) {
      const uint32_t key = key_at(q, t);
      if (kSmemKeys) keys[t] = key;
      if (key != kPad) {
        ++valid;
        atomicAdd(&hist[key >> 24], 1u);
      }
    }
    const uint64_t V = block_sum(valid, ws);  // ends with a barrier: keys and hist are complete
    const uint64_t k = budget(a.kind, a.fraction, a.tokens, V);
    uint32_t kth, ties;
    if (k == 0) {
      kth = kNone;  // above every key: nothing selected
      ties = 0;
    } else if (k == V) {
      kth = 0;  // every valid key is >= 0, and every token equal to 0 is taken
      ties = 0xFFFFFFFFu;
    } else {
      uint32_t prefix = 0, pmask = 0, rem = static_cast<uint32_t>(k);
      for (int shift = 24;; shift -= 8) {
        if (threadIdx.x < 32) {
          uint32_t digit;
          pick_digit(hist, rem, digit);
          if (threadIdx.x == 0) {
            sh_digit = digit;
            sh_rem = rem;
          }
        }
        __syncthreads();
        prefix |= sh_digit << shift;
        pmask |= 0xFFu << shift;
        rem = sh_rem;
        if (shift == 0) break;
        __syncthreads();  // everyone has read sh_* and hist
        for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const int next = shift - 8;
        for (uint64_t t = threadIdx.x; t < S; t += blockDim.x) {
          const uint32_t key = kSmemKeys ? keys[t] : key_at(q, t);
          if (key != kPad && (key & pmask) == prefix) atomicAdd(&hist[(key >> next) & 0xFFu], 1u);
        }
        __syncthreads();
      }
      kth = prefix;
      ties = rem;
    }
    if (threadIdx.x == 0) {
      a.kth[b] = kth;
      a.ties[b] = ties;
      a.count[b] = static_cast<uint32_t>(k);
    }
    __syncthreads();  // before the next sequence reuses hist and keys
  }
}

// ---- global budget ----

struct Global {
  const float *scores;
  Valid valid;
  uint64_t batch, seq_len;
  double keep_fraction;
  Work w;
};

// Warp 0: the (prefix, mask, remaining) after the digit picks of passes 0 .. passes-1; false when
// the budget is 0 (nothing selected).
__device__ __forceinline__ bool replay(const Global &a, int passes, uint32_t &prefix, uint32_t &pmask, uint32_t &rem) {
  const uint64_t V = a.w.state[kValidCount];
  const uint64_t n = budget(DROPFUSE_CAPACITY_FRACTION, a.keep_fraction, 0, V);
  prefix = 0;
  pmask = 0;
  rem = static_cast<uint32_t>(n);
  if (n == 0) return false;
  for (int p = 0; p < passes; ++p) {
    uint32_t digit;
    pick_digit(a.w.hist + 256 * p, rem, digit);
    const int shift = 24 - 8 * p;
    prefix |= digit << shift;
    pmask |= 0xFFu << shift;
  }
  return true;
}

__global__ void __launch_bounds__(kHistThreads) global_hist_kernel(const Global a, int pass) {
  __shared__ uint32_t hist[256];
  __shared__ unsigned long long ws[32];
  __shared__ uint32_t sh_prefix, sh_mask;
  __shared__ int sh_go;
  for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
  if (threadIdx.x < 32) {
    uint32_t prefix = 0, pmask = 0, rem = 0;
    const bool go = pass == 0 || replay(a, pass, prefix, pmask, rem);
    if (threadIdx.x == 0) {
      sh_prefix = prefix;
      sh_mask = pmask;
      sh_go = go;
    }
  }
  __syncthreads();
  if (!sh_go) return;  // block-uniform
  const uint32_t prefix = sh_prefix, pmask = sh_mask;
  const int shift = 24 - 8 * pass;
  const uint64_t S = a.seq_len;
  const uint64_t n = a.batch * S;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // (b, t) of the flat index i, advanced without divisions in the loop.
  uint64_t b = first / S, t = first % S;
  const uint64_t sb = stride / S, st = stride % S;
  unsigned long long valid = 0;
  for (uint64_t i = first; i < n; i += stride) {
    bool real = a.valid.mask ? a.valid.mask[i] != 0 : true;
    if (a.valid.lengths) real = t < a.valid.lengths[b];
    if (real) {
      const uint32_t key = score_key(a.scores[i]);
      ++valid;
      if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
    }
    b += sb;
    t += st;
    if (t >= S) {
      t -= S;
      ++b;
    }
  }
  if (pass == 0) {
    const unsigned long long v = block_sum(valid, ws);
    if (threadIdx.x == 0 && v) atomicAdd(&a.w.state[kValidCount], static_cast<uint32_t>(v));
  } else {
    __syncthreads();
  }
  for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) {
    if (hist[i]) atomicAdd(&a.w.hist[256 * pass + i], hist[i]);
  }
}

// One block per sequence: its valid tokens above and equal to the threshold key.
__global__ void __launch_bounds__(1024) global_count_kernel(const Global a) {
  __shared__ unsigned long long ws[32];
  __shared__ uint32_t sh_kth, sh_rem;
  if (threadIdx.x < 32) {
    uint32_t prefix, pmask, rem;
    const bool any = replay(a, 4, prefix, pmask, rem);
    if (threadIdx.x == 0) {
      sh_kth = any ? prefix : kNone;
      sh_rem = any ? rem : 0;
      if (blockIdx.x == 0) {
        a.w.state[kBudget] = static_cast<uint32_t>(
            budget(DROPFUSE_CAPACITY_FRACTION, a.keep_fraction, 0, a.w.state[kValidCount]));
        a.w.state[kThresholdKey] = sh_kth;
        a.w.state[kTieBudget] = sh_rem;
      }
    }
  }
  __syncthreads();
  const uint32_t kth = sh_kth;
  const uint64_t S = a.seq_len;
  for (uint64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    unsigned long long gt = 0, eq = 0;
    if (kth != kNone) {
      const Seq q = sequence(a.scores, a.valid, b, S);
      for (uint64_t t = threadIdx.x; t < S; t += blockDim.x) {
        const uint32_t key = key_at(q, t);
        if (key == kPad) continue;
        gt += key > kth;
        eq += key == kth;
      }
    }
    // Both counts in one scan: each is at most S < 2^32.
    const unsigned long long both = block_sum((gt << 32) | eq, ws);
    if (threadIdx.x == 0) {
      a.w.count[b] = static_cast<uint32_t>(both >> 32);
      a.w.equal[b] = static_cast<uint32_t>(both & 0xFFFFFFFFull);
    }
  }
}

// ---- offsets and emission (both selections) ----

// One block: offsets[b] = sum of count_b before b, offsets[B] = the total. With `global`, count_b is
// the sequence's count above the threshold plus its share of the tie budget, lowest flat index
// first; ties[b] and kth[b] are written for the emission.
__global__ void __launch_bounds__(1024) offsets_kernel(uint64_t batch, Work w, uint32_t *offsets, bool global) {
  __shared__ unsigned long long ws[32];
  const uint32_t kth = global ? w.state[kThresholdKey] : 0;
  const unsigned long long tie_budget = global ? w.state[kTieBudget] : 0;
  unsigned long long carry = 0, carry_eq = 0;
  for (uint64_t start = 0; start < batch; start += blockDim.x) {
    const uint64_t b = start + threadIdx.x;
    unsigned long long c = 0, total;
    if (b < batch) c = w.count[b];
    if (global) {
      const unsigned long long e = b < batch ? w.equal[b] : 0;
      const unsigned long long before = carry_eq + block_exclusive_scan(e, ws, total);
      carry_eq += total;
      const unsigned long long left = tie_budget - min(tie_budget, before);
      const unsigned long long share = min(e, left);
      c += share;
      if (b < batch) {
        w.ties[b] = static_cast<uint32_t>(share);
        w.kth[b] = kth;
      }
    }
    const unsigned long long at = carry + block_exclusive_scan(c, ws, total);
    carry += total;
    if (b < batch) offsets[b] = static_cast<uint32_t>(at);
  }
  if (threadIdx.x == 0) offsets[batch] = static_cast<uint32_t>(carry);
}

struct Emit {
  const float *scores;
  Valid valid;
  uint64_t batch, seq_len;
  const uint32_t *kth, *ties, *offsets;
  uint32_t *indices;
  uint64_t capacity;
};

__global__ void __launch_bounds__(1024) emit_kernel(const Emit a) {
  __shared__ unsigned long long ws[32];
  const uint64_t S = a.seq_len;
  for (uint64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    const uint64_t lo = a.offsets[b];
    const uint64_t count = a.offsets[b + 1] - lo;  // block-uniform
    if (count == 0) continue;
    const uint32_t kth = a.kth[b];
    const unsigned long long ties = a.ties[b];
    const Seq q = sequence(a.scores, a.valid, b, S);
    unsigned long long carry_gt = 0, carry_eq = 0;
    const uint64_t step = static_cast<uint64_t>(blockDim.x) * kEmitItems;
    for (uint64_t start = 0; start < S; start += step) {
      const uint64_t t0 = start + static_cast<uint64_t>(threadIdx.x) * kEmitItems;
      uint32_t gt = 0, eq = 0;  // bit i: token t0 + i
#pragma unroll
      for (int i = 0; i < kEmitItems; ++i) {
        if (t0 + i < S) {
          const uint32_t key = key_at(q, t0 + i);
          if (key != kPad) {
            gt |= static_cast<uint32_t>(key > kth) << i;
            eq |= static_cast<uint32_t>(key == kth) << i;
          }
        }
      }
      const unsigned long long mine =
          (static_cast<unsigned long long>(__popc(gt)) << 32) | static_cast<unsigned long long>(__popc(eq));
      unsigned long long total;
      const unsigned long long before = block_exclusive_scan(mine, ws, total);
      unsigned long long g = carry_gt + (before >> 32), e = carry_eq + (before & 0xFFFFFFFFull);
#pragma unroll
      for (int i = 0; i < kEmitItems; ++i) {
        const bool is_gt = (gt >> i) & 1u, is_eq = (eq >> i) & 1u;
        if (is_gt || (is_eq && e < ties)) {
          const uint64_t r = lo + g + min(e, ties);
          if (r < a.capacity) a.indices[r] = static_cast<uint32_t>(t0 + i);
        }
        g += is_gt;
        e += is_eq;
      }
      carry_gt += total >> 32;
      carry_eq += total & 0xFFFFFFFFull;
      if (carry_gt + min(carry_eq, ties) >= count) break;  // block-uniform: all selected
    }
  }
}

// ---- rows ----

struct Rows {
  const uint32_t *offsets, *indices;
  uint64_t batch, seq_len, hidden;
  uint64_t rows;  // rows that may be touched: min(index capacity, compact rows)
};

// Offsets of batches up to this size are copied into shared memory by the row kernels, so that
// the binary search of each row costs shared-memory loads rather than dependent global ones.
constexpr unsigned kSmemOffsets = 1025;

// The block's view of the offsets: a shared-memory copy when they fit (all threads must call it).
__device__ __forceinline__ const uint32_t *block_offsets(const Rows &a, uint32_t *smem) {
  if (a.batch >= kSmemOffsets) return a.offsets;  // block-uniform
  for (unsigned i = threadIdx.x; i <= a.batch; i += blockDim.x) smem[i] = a.offsets[i];
  __syncthreads();
  return smem;
}

// The flat token index b * S + t of compact row r (< offsets[B]); S * B when the index is not a
// token of the sequence (never for a routing written by the selection kernels).
__device__ __forceinline__ uint64_t token_of(const Rows &a, const uint32_t *offsets, uint64_t r) {
  uint64_t lo = 0, hi = a.batch;  // offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    const uint64_t mid = (lo + hi) >> 1;
    if (offsets[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const uint64_t t = a.indices[r];
  return t < a.seq_len ? lo * a.seq_len + t : a.batch * a.seq_len;
}

__device__ __forceinline__ uint64_t rows_to_touch(const Rows &a, const uint32_t *offsets) {
  return min(static_cast<uint64_t>(offsets[a.batch]), a.rows);
}

template <typename T, int V>
__device__ __forceinline__ void narrow(const float (&f)[V], T (&out)[V]) {
  if constexpr (V % 2 == 0) {
    Elem<T>::from_f32(f, out);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = Elem<T>::from_f32(f[j]);
  }
}

enum class RowOp {
  Gather,          // out[r] = x[token]                          src = x,   dst = out
  ScatterAdd,      // res[token] = res[token] + g * branch[r]    src = branch, dst = residual
  GatherBackward,  // d_x[token] = d_x[token] + d_c[r]           src = d_c, dst = d_x
};

constexpr int kRowUnroll = 2;  // vectors in flight per thread and row

template <typename T, int V, bool VEC, RowOp OP>
__global__ void __launch_bounds__(kRowThreads) row_kernel(const T *src, T *dst, const float *gate, const Rows a,
                                                          unsigned shift) {
  __shared__ uint32_t smem_offsets[kSmemOffsets];
  const uint32_t *offsets = block_offsets(a, smem_offsets);
  const uint64_t total = rows_to_touch(a, offsets);
  const uint64_t H = a.hidden;
  const uint64_t vecs = H / V;
  const uint64_t tpr = 1ull << shift;
  const uint64_t lane = threadIdx.x & (tpr - 1);
  const uint64_t groups = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> shift;
  const uint64_t tokens = a.batch * a.seq_len;
  for (uint64_t r = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> shift; r < total;
       r += groups) {
    const uint64_t tok = token_of(a, offsets, r);
    if (tok >= tokens) continue;
    const T *s = OP == RowOp::Gather ? src + tok * H : src + r * H;
    T *d = OP == RowOp::Gather ? dst + r * H : dst + tok * H;
    const float g = OP == RowOp::ScatterAdd ? gate[tok] : 0.0f;
    for (uint64_t j0 = lane; j0 < vecs; j0 += kRowUnroll * tpr) {
      T sv[kRowUnroll][V], dv[kRowUnroll][V];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const uint64_t j = j0 + u * tpr;
        if (j < vecs) {
          load_elems<T, V, VEC>(s + j * V, sv[u]);
          if constexpr (OP != RowOp::Gather) load_elems<T, V, VEC>(d + j * V, dv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const uint64_t j = j0 + u * tpr;
        if (j >= vecs) continue;
        if constexpr (OP == RowOp::Gather) {
          store_elems<T, V, VEC>(d + j * V, sv[u]);
        } else {
          float f[V];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float add = OP == RowOp::ScatterAdd ? __fmul_rn(g, Elem<T>::to_f32(sv[u][e]))
                                                      : Elem<T>::to_f32(sv[u][e]);
            f[e] = __fadd_rn(Elem<T>::to_f32(dv[u][e]), add);
          }
          T out[V];
          narrow<T, V>(f, out);
          store_elems<T, V, VEC>(d + j * V, out);
        }
      }
    }
  }
}

// d_branch[r] = round_T(g * d_out[token]) and d_gate[token] = the chunked sum of
// d_out[token][j] * branch[r][j]; one block per row.
template <typename T, int V, bool VEC>
__global__ void __launch_bounds__(kRowThreads) scatter_backward_kernel(const T *d_out, const T *branch,
                                                                       const float *gate, T *d_branch,
                                                                       float *d_gate, const Rows a) {
  __shared__ float part[kRowThreads];
  __shared__ uint32_t smem_offsets[kSmemOffsets];
  const uint32_t *offsets = block_offsets(a, smem_offsets);
  const uint64_t total = rows_to_touch(a, offsets);
  const uint64_t H = a.hidden;
  const uint64_t chunks = (H + kGateChunk - 1) / kGateChunk;
  const uint64_t tokens = a.batch * a.seq_len;
  for (uint64_t r = blockIdx.x; r < total; r += gridDim.x) {
    const uint64_t tok = token_of(a, offsets, r);  // block-uniform
    if (tok >= tokens) continue;
    const T *dy = d_out + tok * H;
    const T *br = branch + r * H;
    T *db = d_branch + r * H;
    const float g = gate[tok];
    float sum = 0.0f;  // thread 0: the row's total
    for (uint64_t c0 = 0; c0 < chunks; c0 += blockDim.x) {
      const uint64_t c = c0 + threadIdx.x;
      float acc = 0.0f;
      if (c < chunks) {
        const uint64_t end = min(H, (c + 1) * kGateChunk);
        for (uint64_t j = c * kGateChunk; j < end; j += V) {
          T y[V], x[V];
          load_elems<T, V, VEC>(dy + j, y);
          load_elems<T, V, VEC>(br + j, x);
          float f[V];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float fy = Elem<T>::to_f32(y[e]);
            f[e] = __fmul_rn(g, fy);
            acc = __fadd_rn(acc, __fmul_rn(fy, Elem<T>::to_f32(x[e])));
          }
          T out[V];
          narrow<T, V>(f, out);
          store_elems<T, V, VEC>(db + j, out);
        }
      }
      part[threadIdx.x] = acc;
      __syncthreads();
      if (threadIdx.x == 0) {
        const uint64_t n = min(static_cast<uint64_t>(blockDim.x), chunks - c0);
        for (uint64_t i = 0; i < n; ++i) sum = __fadd_rn(sum, part[i]);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) d_gate[tok] = sum;
  }
}

// ---- host side ----

bool misaligned4(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 3u) != 0; }
bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

unsigned pow2_at_least(uint64_t n) {
  unsigned p = 1;
  while (p < n && p < (1u << 30)) p <<= 1;
  return p;
}

// Threads of a per-sequence block: about `per_thread` tokens each, 32 .. 1024.
unsigned sequence_threads(uint64_t S, uint64_t per_thread) {
  return std::min(1024u, std::max(32u, pow2_at_least((S + per_thread - 1) / per_thread)));
}

unsigned sequence_grid(uint64_t batch) {
  return static_cast<unsigned>(std::min<uint64_t>(batch, DROPFUSE_ROUTING_MAX_SEQUENCE_BLOCKS));
}

// A routing descriptor is usable: B, S >= 1, B * S <= 2^32 - 1, 4-byte aligned buffers.
cudaError_t check_routing(const dropfuse_routing *r, bool with_work) {
  if (r == nullptr || r->batch == 0 || r->seq_len == 0) return cudaErrorInvalidValue;
  if (r->seq_len > 0xFFFFFFFFull || r->batch > 0xFFFFFFFFull / r->seq_len) return cudaErrorInvalidValue;
  if (r->offsets == nullptr || misaligned4(r->offsets)) return cudaErrorInvalidValue;
  if (r->capacity > 0 && (r->indices == nullptr || misaligned4(r->indices))) return cudaErrorInvalidValue;
  if (with_work && (r->work == nullptr || misaligned4(r->work))) return cudaErrorInvalidValue;
  return cudaSuccess;
}

cudaError_t check_valid(const uint8_t *mask, const uint32_t *lengths) {
  if (mask != nullptr && lengths != nullptr) return cudaErrorInvalidValue;
  if (lengths != nullptr && misaligned4(lengths)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

cudaError_t emit(const float *scores, Valid valid, const dropfuse_routing &r, const Work &w, bool global,
                 cudaStream_t stream) {
  cudaError_t err = launch_kernel(offsets_kernel, 1, 1024, 0, stream, r.batch, w, r.offsets, global);
  if (err != cudaSuccess) return err;
  const Emit e{scores, valid, r.batch, r.seq_len, w.kth, w.ties, r.offsets, r.indices, r.capacity};
  return launch_kernel(emit_kernel, sequence_grid(r.batch), sequence_threads(r.seq_len, kEmitItems), 0, stream, e);
}

// The dynamic shared memory the top-k kernel may use for a sequence's keys on this device (the
// opt-in maximum less the kernel's static shared memory), and what a launch may use now: until
// cudaFuncSetAttribute raises it, 48 KB less the static shared memory (static + dynamic above
// 48 KB needs the opt-in, so keys of slightly under 48 KB need it too).
cudaError_t smem_limits(uint64_t *max_bytes, uint64_t *now_bytes) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, topk_select_kernel<true>);
  if (err != cudaSuccess) return err;
  const uint64_t fixed = attr.sharedSizeBytes;
  *max_bytes = static_cast<uint64_t>(optin) > fixed ? static_cast<uint64_t>(optin) - fixed : 0;
  *now_bytes = attr.maxDynamicSharedSizeBytes > 0 ? static_cast<uint64_t>(attr.maxDynamicSharedSizeBytes) : 0;
  return cudaSuccess;
}

template <typename T, int V, bool VEC, RowOp OP>
cudaError_t launch_rows(const void *src, void *dst, const float *gate, const Rows &a, cudaStream_t stream) {
  const uint64_t vecs = a.hidden / V;
  const unsigned tpr = std::min<unsigned>(kRowThreads, pow2_at_least((vecs + kRowUnroll - 1) / kRowUnroll));
  unsigned shift = 0;
  while ((1u << shift) < tpr) ++shift;
  const uint64_t per_block = kRowThreads / tpr;
  auto kernel = row_kernel<T, V, VEC, OP>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kRowThreads, (a.rows + per_block - 1) / per_block, &grid, 8);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kRowThreads, 0, stream, static_cast<const T *>(src), static_cast<T *>(dst), gate,
                       a, shift);
}

template <RowOp OP>
cudaError_t rows_dtype(dropfuse_dtype dtype, const void *src, void *dst, const float *gate, const Rows &a,
                       cudaStream_t stream) {
  const bool vec_ok = aligned16(src) && aligned16(dst);
  switch (dtype) {
    case DROPFUSE_F32:
      if (vec_ok && a.hidden % 4 == 0) return launch_rows<float, 4, true, OP>(src, dst, gate, a, stream);
      return launch_rows<float, 1, false, OP>(src, dst, gate, a, stream);
    case DROPFUSE_F16:
      if (vec_ok && a.hidden % 8 == 0) return launch_rows<__half, 8, true, OP>(src, dst, gate, a, stream);
      return launch_rows<__half, 1, false, OP>(src, dst, gate, a, stream);
    case DROPFUSE_BF16:
      if (vec_ok && a.hidden % 8 == 0) return launch_rows<__nv_bfloat16, 8, true, OP>(src, dst, gate, a, stream);
      return launch_rows<__nv_bfloat16, 1, false, OP>(src, dst, gate, a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int V, bool VEC>
cudaError_t launch_scatter_backward(const void *d_out, const void *branch, const float *gate, void *d_branch,
                                    float *d_gate, const Rows &a, cudaStream_t stream) {
  const uint64_t chunks = (a.hidden + kGateChunk - 1) / kGateChunk;
  const unsigned threads = std::min<unsigned>(kRowThreads, std::max(32u, pow2_at_least(chunks)));
  auto kernel = scatter_backward_kernel<T, V, VEC>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, threads, a.rows, &grid, 8);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, threads, 0, stream, static_cast<const T *>(d_out),
                       static_cast<const T *>(branch), gate, static_cast<T *>(d_branch), d_gate, a);
}

Rows rows_of(const dropfuse_routing &r, uint64_t hidden, uint64_t compact_rows) {
  return Rows{r.offsets, r.indices, r.batch, r.seq_len, hidden, std::min(r.capacity, compact_rows)};
}

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_route_top_k(const float *scores, const uint8_t *mask, const uint32_t *lengths,
                                    uint32_t capacity_kind, double fraction, uint64_t tokens,
                                    const dropfuse_routing *routing, dropfuse_stream_t stream) {
  cudaError_t err = check_routing(routing, true);
  if (err != cudaSuccess) return err;
  if (scores == nullptr || misaligned4(scores)) return cudaErrorInvalidValue;
  if ((err = check_valid(mask, lengths)) != cudaSuccess) return err;
  if (capacity_kind == DROPFUSE_CAPACITY_FRACTION) {
    if (!(fraction >= 0.0 && fraction <= 1.0)) return cudaErrorInvalidValue;
  } else if (capacity_kind != DROPFUSE_CAPACITY_TOKENS) {
    return cudaErrorInvalidValue;
  }
  const dropfuse_routing &r = *routing;
  const Work w = carve(r.work, r.batch);
  const Valid valid{mask, lengths};
  const TopK a{scores, valid, r.batch, r.seq_len, capacity_kind, fraction, tokens, w.kth, w.ties, w.count};
  uint64_t smem_max = 0, smem_now = 0;
  if ((err = smem_limits(&smem_max, &smem_now)) != cudaSuccess) return err;
  const unsigned threads = sequence_threads(r.seq_len, 4);
  const uint64_t key_bytes = r.seq_len * sizeof(uint32_t);
  if (key_bytes <= smem_max) {
    // Raised to the device's maximum (never lowered: concurrent callers all set the same value).
    if (key_bytes > smem_now) {
      err = cudaFuncSetAttribute(topk_select_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem_max));
      if (err != cudaSuccess) return err;
    }
    err = launch_kernel(topk_select_kernel<true>, sequence_grid(r.batch), threads, key_bytes, stream, a);
  } else {
    err = launch_kernel(topk_select_kernel<false>, sequence_grid(r.batch), threads, 0, stream, a);
  }
  if (err != cudaSuccess) return err;
  return emit(scores, valid, r, w, false, stream);
}

extern "C" int dropfuse_route_global(const float *scores, const uint8_t *mask, const uint32_t *lengths,
                                     double keep_fraction, const dropfuse_routing *routing,
                                     dropfuse_stream_t stream) {
  cudaError_t err = check_routing(routing, true);
  if (err != cudaSuccess) return err;
  if (scores == nullptr || misaligned4(scores)) return cudaErrorInvalidValue;
  if ((err = check_valid(mask, lengths)) != cudaSuccess) return err;
  if (!(keep_fraction >= 0.0 && keep_fraction <= 1.0)) return cudaErrorInvalidValue;
  const dropfuse_routing &r = *routing;
  const Work w = carve(r.work, r.batch);
  const Valid valid{mask, lengths};
  // The four histograms and the state words start at zero.
  err = cudaMemsetAsync(w.hist, 0, (1024 + DROPFUSE_ROUTING_STATE_WORDS) * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  const Global a{scores, valid, r.batch, r.seq_len, keep_fraction, w};
  const uint64_t n = r.batch * r.seq_len;
  unsigned grid = 0;
  if ((err = wave_grid(global_hist_kernel, kHistThreads, (n + kHistThreads * 8 - 1) / (kHistThreads * 8), &grid, 2)) !=
      cudaSuccess)
    return err;
  for (int pass = 0; pass < 4; ++pass) {
    if ((err = launch_kernel(global_hist_kernel, grid, kHistThreads, 0, stream, a, pass)) != cudaSuccess) return err;
  }
  err = launch_kernel(global_count_kernel, sequence_grid(r.batch), sequence_threads(r.seq_len, 4), 0, stream, a);
  if (err != cudaSuccess) return err;
  return emit(scores, valid, r, w, true, stream);
}

extern "C" int dropfuse_gather_tokens(dropfuse_dtype dtype, const dropfuse_routing *routing, uint64_t hidden,
                                      const void *x, void *out, uint64_t out_rows, dropfuse_stream_t stream) {
  if (hidden == 0 || out_rows == 0) return cudaSuccess;
  cudaError_t err = check_routing(routing, false);
  if (err != cudaSuccess) return err;
  if (x == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const Rows a = rows_of(*routing, hidden, out_rows);
  if (a.rows == 0) return cudaSuccess;
  return rows_dtype<RowOp::Gather>(dtype, x, out, nullptr, a, stream);
}

extern "C" int dropfuse_scatter_add_tokens(dropfuse_dtype dtype, const dropfuse_routing *routing, uint64_t hidden,
                                           void *residual, const void *branch, uint64_t branch_rows,
                                           const float *gate, dropfuse_stream_t stream) {
  if (hidden == 0 || branch_rows == 0) return cudaSuccess;
  cudaError_t err = check_routing(routing, false);
  if (err != cudaSuccess) return err;
  if (residual == nullptr || branch == nullptr || gate == nullptr || misaligned4(gate)) return cudaErrorInvalidValue;
  const Rows a = rows_of(*routing, hidden, branch_rows);
  if (a.rows == 0) return cudaSuccess;
  return rows_dtype<RowOp::ScatterAdd>(dtype, branch, residual, gate, a, stream);
}

extern "C" int dropfuse_scatter_add_tokens_backward(dropfuse_dtype dtype, const dropfuse_routing *routing,
                                                    uint64_t hidden, const void *d_out, const void *branch,
                                                    const float *gate, void *d_branch, uint64_t rows,
                                                    float *d_gate, dropfuse_stream_t stream) {
  if (hidden == 0) return cudaSuccess;
  cudaError_t err = check_routing(routing, false);
  if (err != cudaSuccess) return err;
  if (d_out == nullptr || branch == nullptr || gate == nullptr || d_branch == nullptr || d_gate == nullptr ||
      misaligned4(gate) || misaligned4(d_gate))
    return cudaErrorInvalidValue;
  const dropfuse_routing &r = *routing;
  // d_gate is +0 for every token the rows below do not cover.
  err = cudaMemsetAsync(d_gate, 0, r.batch * r.seq_len * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const Rows a = rows_of(r, hidden, rows);
  if (a.rows == 0) return cudaSuccess;
  const bool vec_ok = aligned16(d_out) && aligned16(branch) && aligned16(d_branch);
  switch (dtype) {
    case DROPFUSE_F32:
      if (vec_ok && hidden % 4 == 0)
        return launch_scatter_backward<float, 4, true>(d_out, branch, gate, d_branch, d_gate, a, stream);
      return launch_scatter_backward<float, 1, false>(d_out, branch, gate, d_branch, d_gate, a, stream);
    case DROPFUSE_F16:
      if (vec_ok && hidden % 8 == 0)
        return launch_scatter_backward<__half, 8, true>(d_out, branch, gate, d_branch, d_gate, a, stream);
      return launch_scatter_backward<__half, 1, false>(d_out, branch, gate, d_branch, d_gate, a, stream);
    case DROPFUSE_BF16:
      if (vec_ok && hidden % 8 == 0)
        return launch_scatter_backward<__nv_bfloat16, 8, true>(d_out, branch, gate, d_branch, d_gate, a, stream);
      return launch_scatter_backward<__nv_bfloat16, 1, false>(d_out, branch, gate, d_branch, d_gate, a, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" int dropfuse_gather_tokens_backward(dropfuse_dtype dtype, const dropfuse_routing *routing,
                                               uint64_t hidden, const void *d_compact, uint64_t rows, void *d_x,
                                               dropfuse_stream_t stream) {
  if (hidden == 0 || rows == 0) return cudaSuccess;
  cudaError_t err = check_routing(routing, false);
  if (err != cudaSuccess) return err;
  if (d_compact == nullptr || d_x == nullptr) return cudaErrorInvalidValue;
  const Rows a = rows_of(*routing, hidden, rows);
  if (a.rows == 0) return cudaSuccess;
  return rows_dtype<RowOp::GatherBackward>(dtype, d_compact, d_x, nullptr, a, stream);
}
