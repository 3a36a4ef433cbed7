// DropBlock: seed bitmap, dilation and kept-count in one bit-packed mask kernel, then one
// memory-bound pass applying the mask with the scale computed on the device from the counts.
//
// Mask kernel: one thread block per (mask plane, tile of output slabs). A plane is viewed as A slabs
// of B rows of W units: (A, B) = (D, H) for 3D and (H, 1) for 2D, so a tile needs the seeds of its
// own slabs and of the bA - 1 slabs before them. In shared memory, one bit per unit, rows padded to
// whole 32-bit words:
//   1. seed bits of the tile's valid seed positions (Philox words of their global seed indices);
//   2. horizontal dilation: bit w of a row is set iff a seed lies in [w - bW + 1, w];
//   3. dilation across the B rows of a slab (3D), then across slabs: the dropped bitmap;
//   4. the keep bits are gathered into the element-indexed mask words (plain stores inside the
//      tile's element range, atomicAnd/atomicOr on the two words it shares with its neighbours) and
//      counted: one atomic add per block into the sample's and the tensor's counters.
// 2D maps of at most 128 x 128 units (the usual CNN stages) take a leaner mask kernel: one warp per
// plane, its rows in one or two 64-bit words, warp barriers only (`drop_block_rows_kernel`).
// Apply kernel: like dropout's backward from a mask, with the scale of each element's sample
// computed from the counters (f64 division rounded once to f32, 0 when nothing is kept).
#include <stdint.h>

#include <type_traits>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kMaskThreads = 128;
// Tuning knob, not yet measured or GPU-tested (default off): a leaner mask kernel, with no 64-bit
// divisions per job and thread when a plane is one tile, the sample index computed by the one
// thread that needs it, and one test of a Philox block's four words against the threshold (the
// range checks and the seed's coordinates only on a hit, a fraction ~4 gamma of the blocks).
#ifndef DROPFUSE_DROP_BLOCK_LEAN
#define DROPFUSE_DROP_BLOCK_LEAN 0
#endif
#if DROPFUSE_DROP_BLOCK_LEAN  // 40 registers, 12 blocks per SM, as the default kernel
#define DROPFUSE_MASK_BOUNDS __launch_bounds__(kMaskThreads, 12)
#else
#define DROPFUSE_MASK_BOUNDS __launch_bounds__(kMaskThreads)
#endif
// The warp-per-plane kernel for 2D maps of at most kRowsMax x 128 units; 0 sends them to the
// tiled kernel (for comparisons: scripts/variants.sh).
#ifndef DROPFUSE_DROP_BLOCK_ROWS
#define DROPFUSE_DROP_BLOCK_ROWS 1
#endif
// Blocks per SM the rows kernel is compiled for: 12 caps it at 40 registers (48 warps per SM) with
// no spill on sm_80/sm_90; 16 (32 registers) spills in the device-state instantiation.
#ifndef DROPFUSE_DROP_BLOCK_ROWS_BLOCKS
#define DROPFUSE_DROP_BLOCK_ROWS_BLOCKS 12
#endif
// Tuning knob, not yet measured (default 0): the rows kernel first asks L2 to fetch the first N MB
// of x (prefetch.global.L2, normal eviction priority: evict_last lines would outlive their one
// use), so that HBM, idle while the kernel computes Philox words, brings in part of what the apply
// kernel reads next. Useful values are below the L2 size (50 MB on an H100/H200).
#ifndef DROPFUSE_DROP_BLOCK_PREFETCH_MB
#define DROPFUSE_DROP_BLOCK_PREFETCH_MB 0
#endif
constexpr int kRowsWarps = 4;      // warps (planes in flight) per block
constexpr uint32_t kRowsMax = 128;  // rows of a plane (and units of a row: two 64-bit words)
constexpr int kApplyThreads = 256;
constexpr int kApplyUnroll = 4;  // chunks in flight per lane, as dropout's backward

// The dynamic shared memory of a kernel, and every launch (`launch_kernel`): the host emulation
// (tests/host_emu/cuda_fiber_emu.h) defines both (and runs the kernels on the CPU) before including
// this file.
#ifndef DROPFUSE_HOST_EMULATION
#define DROPFUSE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

// Everything the mask kernel needs, prepared on the host.
struct Geometry {
  PhiloxStream philox;    // host-prepared; unused when dev.state is set
  DeviceState dev;        // graph-safe launches: {seed, offset} in device memory, plus dev.add
  uint64_t samples;       // n: stats[n] counts the whole tensor
  uint64_t c;             // channels
  uint64_t planes;        // mask planes: n * c, or n with shared channels
  uint64_t spatial;       // units of a plane
  uint64_t valid;         // seed positions of a plane
  uint64_t numel;         // elements of the tensor
  uint64_t jobs;          // planes * tiles
  uint32_t A, B, W, Wk;   // slabs, rows per slab, units per row, words per row
  uint32_t bA, bB, bW;    // block extents
  uint32_t vA, vB, vW;    // valid (seed) extents
  uint32_t tile, tiles;   // output slabs per tile, tiles per plane
  uint32_t cap_rows;      // rows of each shared-memory bitmap
  uint32_t threshold;     // seed drawn iff all || word < threshold
  uint32_t magic_w;       // ceil(2^32 / W) for W >= 2: p / W == __umulhi(p, magic_w) for p < 2^26
  const char *prefetch;   // rows kernel: bytes [prefetch, prefetch + prefetch_bytes) into L2, or null
  uint64_t prefetch_bytes;
  bool all;
  bool shared;
  bool narrow;            // rows of at most 64 units: the kNarrow kernel
};

// Bits [pos, pos + 32) of a bit row of `words` 32-bit words; bits outside the row read as 0.
__device__ __forceinline__ uint32_t extract32(const uint32_t *row, int words, int pos) {
  const int lo_idx = pos >= 0 ? pos >> 5 : -((31 - pos) >> 5);
  const uint32_t sh = static_cast<uint32_t>(pos - lo_idx * 32);
  const uint32_t lo = lo_idx >= 0 && lo_idx < words ? row[lo_idx] : 0u;
  const uint32_t hi = lo_idx + 1 >= 0 && lo_idx + 1 < words ? row[lo_idx + 1] : 0u;
  return __funnelshift_r(lo, hi, sh);
}

// The same for a row of at most 64 units held in one 64-bit word.
__device__ __forceinline__ uint32_t extract32(const uint64_t *row, int, int pos) {
  return static_cast<uint32_t>(pos >= 0 ? row[0] >> pos : row[0] << -pos);
}

__device__ __forceinline__ uint32_t low_bits(uint32_t len) { return len >= 32 ? ~0u : (1u << len) - 1u; }

// The keep bits of tile units [p, p_end) (at most 32, rows of W units, p at unit w of row r), placed
// from bit `shift` up: keep_bits(r, w) gives bits w, w + 1, ... of row r's keep bitmap.
template <typename KeepBits>
__device__ __forceinline__ uint32_t gather_bits(uint32_t p, uint32_t p_end, uint32_t r, uint32_t w, uint32_t shift,
                                                uint32_t W, KeepBits keep_bits) {
  uint32_t bits = 0;
  while (p < p_end) {
    const uint32_t len = min(W - w, p_end - p);
    bits |= (keep_bits(r, w) & low_bits(len)) << shift;
    shift += len;
    p += len;
    ++r;
    w = 0;
  }
  return bits;
}

// Stores the `range` bits of mask word wd: a plain store when the word is all ours, else atomics
// that touch only our bits (the rest belongs to a neighbouring tile or plane).
__device__ __forceinline__ void store_mask_bits(uint32_t *mask, uint64_t wd, uint32_t bits, uint32_t range) {
  if (range == ~0u) {
    mask[wd] = bits;
  } else {
    atomicAnd(&mask[wd], bits | ~range);
    atomicOr(&mask[wd], bits);
  }
}

// Rows are bit arrays of W units in shared memory: one 64-bit word when W <= 64 (kNarrow: whole-row
// shifts), else ceil(W / 32) 32-bit words.
// kDev: the Philox stream comes from device memory (graph-safe launches).
template <bool kNarrow, bool kDev>
__global__ void DROPFUSE_MASK_BOUNDS
    drop_block_mask_kernel(uint32_t *mask, unsigned long long *stats, const __grid_constant__ Geometry g) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(g.dev, 0);
  const PhiloxStream &philox = kDev ? dev_philox : g.philox;
  using Word = typename std::conditional<kNarrow, uint64_t, uint32_t>::type;
  DROPFUSE_DYNAMIC_SHARED(uint64_t, smem_raw);
  __shared__ unsigned long long block_kept;
  __shared__ int any_seed;
  const uint32_t Wk = kNarrow ? 1u : g.Wk;  // words per row
  Word *const bufA = reinterpret_cast<Word *>(smem_raw);
  Word *const bufB = bufA + g.cap_rows * Wk;
  const unsigned tid = threadIdx.x;

  for (uint64_t job = blockIdx.x; job < g.jobs; job += gridDim.x) {
    const bool one_tile = DROPFUSE_DROP_BLOCK_LEAN && g.tiles == 1;
    const uint64_t q = one_tile ? job : job / g.tiles;
    const uint32_t tile = one_tile ? 0u : static_cast<uint32_t>(job % g.tiles);
    const uint32_t a0 = tile * g.tile;
    const uint32_t a1 = min(a0 + g.tile, g.A);
    // Seed slabs the tile depends on: [s0, s1).
    const uint32_t s0 = a0 + 1 > g.bA ? a0 + 1 - g.bA : 0u;
    const uint32_t s1 = min(a1, g.vA);
    const uint32_t seed_rows = s1 > s0 ? (s1 - s0) * g.B : 0u;
    const uint32_t out_rows = (a1 - a0) * g.B;
    const uint32_t zero_words = max(seed_rows, out_rows) * Wk;

    for (uint32_t i = tid; i < zero_words; i += blockDim.x) bufA[i] = 0;
    if (tid == 0) {
      block_kept = 0;
      any_seed = 0;
    }
    __syncthreads();

    // 1. Seeds: global seed indices [i0, i1) are this tile's seed slabs, in order.
    const uint64_t per_slab = static_cast<uint64_t>(g.vB) * g.vW;
    const uint64_t i0 = q * g.valid + s0 * per_slab;
    const uint64_t i1 = i0 + (s1 > s0 ? (s1 - s0) * per_slab : 0u);
    if (i1 > i0 && (g.all || g.threshold != 0)) {
      bool drawn_any = false;
      for (uint64_t blk = (i0 >> 2) + tid; blk <= ((i1 - 1) >> 2); blk += blockDim.x) {
        // Blocks below 2^32 (seed indices below 2^34) take Philox's fast path (common/philox.cuh).
        const uint4 r = hi32(blk) == philox.hi ? philox_fast(philox, static_cast<uint64_t>(kPhiloxM0) * lo32(blk))
                                               : philox_block(philox, blk);
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
        if (DROPFUSE_DROP_BLOCK_LEAN && !g.all && min(min(r.x, r.y), min(r.z, r.w)) >= g.threshold) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint64_t idx = blk * 4 + j;
          if (idx >= i0 && idx < i1 && (g.all || words[j] < g.threshold)) {
            // Rare (a fraction gamma of the positions): the divisions stay off the common path.
            const uint64_t local = idx - i0;
            const uint32_t uw = static_cast<uint32_t>(local % g.vW);
            const uint64_t rest = local / g.vW;
            const uint32_t ub = static_cast<uint32_t>(rest % g.vB);
            const uint32_t ua = static_cast<uint32_t>(rest / g.vB);
            const uint32_t row = ua * g.B + ub;
            if constexpr (kNarrow) {
#ifdef __CUDA_ARCH__
              atomicOr(reinterpret_cast<unsigned long long *>(&bufA[row]), 1ull << uw);
#else  // host C++: the words are uint64_t, not unsigned long long (no type punning)
              __atomic_fetch_or(&bufA[row], uint64_t{1} << uw, __ATOMIC_RELAXED);
#endif
            } else {
              atomicOr(&bufA[row * Wk + (uw >> 5)], 1u << (uw & 31));
            }
            drawn_any = true;
          }
        }
      }
      if (drawn_any) any_seed = 1;  // benign race: every writer stores 1
    }
    __syncthreads();

    // 2.-3. Dilation; `dropped` ends up holding out_rows rows (all zero when no seed was drawn).
    const Word *dropped = bufA;
    if (any_seed) {
      // 2. Horizontal: bit w of a row is set iff a seed lies in [w - bW + 1, w].
      for (uint32_t i = tid; i < seed_rows * Wk; i += blockDim.x) {
        if constexpr (kNarrow) {
          // Shifts by 0 .. bW-1 OR-ed in log2(bW) steps: d covers [0, len), then [0, 2 len).
          uint64_t d = bufA[i];
          uint32_t len = 1;
          for (; 2 * len <= g.bW; len *= 2) d |= d << len;
          if (len < g.bW) d |= d << (g.bW - len);
          bufB[i] = d;
        } else {
          const uint32_t row = i / Wk, k = i % Wk;
          const uint32_t *src = bufA + row * Wk;
          uint32_t acc = 0;
          for (uint32_t t = 0; t < g.bW; ++t) acc |= extract32(src, Wk, static_cast<int>(k * 32) - static_cast<int>(t));
          bufB[i] = acc;
        }
      }
      __syncthreads();
      const Word *hv = bufB;  // rows dilated within their slab
      Word *free_buf = bufA;
      if (g.B > 1) {
        // 3a. Within a slab: row h gathers seed rows [h - bB + 1, h] of the valid rows [0, vB).
        for (uint32_t i = tid; i < seed_rows * Wk; i += blockDim.x) {
          const uint32_t row = i / Wk, k = i % Wk;
          const uint32_t slab = row / g.B, h = row % g.B;
          const uint32_t lo = h + 1 > g.bB ? h + 1 - g.bB : 0u;
          const uint32_t hi = min(h + 1, g.vB);
          Word acc = 0;
          for (uint32_t u = lo; u < hi; ++u) acc |= bufB[(slab * g.B + u) * Wk + k];
          bufA[i] = acc;
        }
        __syncthreads();
        hv = bufA;
        free_buf = bufB;
      }
      // 3b. Across slabs: output slab a gathers seed slabs [a - bA + 1, a] within [s0, s1).
      for (uint32_t i = tid; i < out_rows * Wk; i += blockDim.x) {
        const uint32_t row = i / Wk, k = i % Wk;
        const uint32_t a = a0 + row / g.B, h = row % g.B;
        const uint32_t lo = max(s0, a + 1 > g.bA ? a + 1 - g.bA : 0u);
        const uint32_t hi = min(a + 1, s1);
        Word acc = 0;
        for (uint32_t u = lo; u < hi; ++u) acc |= hv[((u - s0) * g.B + h) * Wk + k];
        free_buf[i] = acc;
      }
      __syncthreads();
      dropped = free_buf;
    }

    // 4. Keep bits into the mask words of each channel that uses this plane, and the count.
#if !DROPFUSE_DROP_BLOCK_LEAN
    const uint64_t sample = g.shared ? q : q / g.c;
#endif
    const uint64_t copies = g.shared ? g.c : 1;
    const uint32_t tile_units = out_rows * g.W;  // < 2^32: bounded by the shared-memory budget
    unsigned long long kept = 0;
    for (uint64_t copy = 0; copy < copies; ++copy) {
      const uint64_t plane_elem = (g.shared ? q * g.c + copy : q) * g.spatial;
      const uint64_t e0 = plane_elem + static_cast<uint64_t>(a0) * g.B * g.W;
      const uint64_t e1 = e0 + tile_units;
      // The block holding the tensor's last element also writes the zero padding of its last word.
      const uint64_t end = e1 == g.numel ? (g.numel + 31) & ~uint64_t{31} : e1;
      const uint64_t w_first = e0 >> 5, w_last = (end - 1) >> 5;
      for (uint64_t wd = w_first + tid; wd <= w_last; wd += blockDim.x) {
        const uint64_t lo = max(wd * 32, e0), hi = min(wd * 32 + 32, end);
        // Tile-local unit positions [p, p_end) of this word's data bits, row by row.
        const uint32_t p = static_cast<uint32_t>(lo - e0);
        const uint32_t p_end = static_cast<uint32_t>(min(hi, e1) - e0);
        const uint32_t bits =
            gather_bits(p, p_end, p / g.W, p % g.W, static_cast<uint32_t>(lo - wd * 32), g.W,
                        [&](uint32_t r, uint32_t w) { return ~extract32(dropped + r * Wk, Wk, static_cast<int>(w)); });
        if (copy == 0) kept += __popc(bits);
        store_mask_bits(mask, wd, bits, low_bits(static_cast<uint32_t>(hi - lo)) << (lo - wd * 32));
      }
    }
    // Count: warp sums, then one shared and one global atomic per block per counter.
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) kept += __shfl_xor_sync(0xffffffffu, kept, s);
    if ((tid & 31u) == 0 && kept != 0) atomicAdd(&block_kept, kept);
    __syncthreads();
    if (tid == 0 && block_kept != 0) {
#if DROPFUSE_DROP_BLOCK_LEAN
      const uint64_t sample = g.shared ? q : q / g.c;
#endif
      const unsigned long long total = block_kept * copies;
      atomicAdd(&stats[sample], total);
      atomicAdd(&stats[g.samples], total);
    }
    __syncthreads();  // the shared bitmaps and counters are reused by the next job
  }
}

// Whether a launch takes drop_block_rows_kernel: 2D (one row per slab) with planes of at most
// kRowsMax rows of at most kRowsMax units.
__host__ __device__ inline bool rows_kernel_fits(const Geometry &g) {
  return DROPFUSE_DROP_BLOCK_ROWS && g.B == 1 && g.W <= kRowsMax && g.A <= kRowsMax;
}

// Rows of kWords 64-bit words (bit w of a row: bit w % 64 of word w / 64).
// d |= d << s for 0 < s <= 64 (shifts of one word stay below 64: s <= bW / 2 <= 32).
template <int kWords>
__device__ __forceinline__ void row_or_shifted(uint64_t (&d)[kWords], uint32_t s) {
  if constexpr (kWords == 1) {
    d[0] |= d[0] << s;
  } else {
    static_assert(kWords == 2, "rows of at most 128 units");
    if (s >= 64) {
      d[1] |= d[0];  // s == 64
    } else {
      d[1] |= d[1] << s | d[0] >> (64 - s);
      d[0] |= d[0] << s;
    }
  }
}

// Bits w .. w + 31 of a row (bits past its last word read as 0).
template <int kWords>
__device__ __forceinline__ uint32_t row_bits32(const uint64_t *row, uint32_t w) {
  if constexpr (kWords == 1) {
    return static_cast<uint32_t>(row[0] >> w);
  } else {
    return static_cast<uint32_t>(w >= 64 ? row[1] >> (w - 64) : row[0] >> w | (w == 0 ? 0 : row[1] << (64 - w)));
  }
}

// One warp per mask plane of a 2D map (A rows of W units, kWords = ceil(W / 64) words per row), so
// the phases are separated by warp barriers, not block barriers: the tiled kernel above separates
// small phases by five __syncthreads, and its H200 timings (BENCHMARKS.md, 2026-11-28) showed it
// bound by the latency of those dependent phases. Per plane:
//   1. seed rows: the lanes take the plane's Philox blocks in turn; a block whose four words all
//      miss the threshold (all but ~4 gamma of them) costs one comparison;
//   2. each lane builds whole output rows: the OR of the seed rows [h - bA + 1, h], dilated
//      horizontally (a unit is dropped iff a seed lies in [w - bW + 1, w]), complemented;
//   3. the lanes take the plane's mask words in turn (as the tiled kernel's step 4), count the kept
//      bits, and lane 0 adds the plane's count to its sample's counter; each warp adds its planes'
//      total to the tensor's counter once, at the end.
template <int kWords, bool kDev>
__global__ void __launch_bounds__(kRowsWarps * 32, DROPFUSE_DROP_BLOCK_ROWS_BLOCKS)
    drop_block_rows_kernel(uint32_t *mask, unsigned long long *stats, const __grid_constant__ Geometry g) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(g.dev, 0);
  const PhiloxStream &philox = kDev ? dev_philox : g.philox;
  __shared__ uint64_t seed_rows[kRowsWarps][kRowsMax * kWords];
  __shared__ uint64_t keep_rows[kRowsWarps][kRowsMax * kWords];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  uint64_t *const seeds = seed_rows[warp];
  uint64_t *const keep = keep_rows[warp];
  const uint32_t H = g.A, W = g.W, vH = g.vA, vW = g.vW, valid = static_cast<uint32_t>(g.valid);
  uint64_t row_mask[kWords];  // the W bits of a row
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    const uint32_t lo = 64 * i;
    row_mask[i] = W >= lo + 64 ? ~uint64_t{0} : W <= lo ? 0 : (uint64_t{1} << (W - lo)) - 1u;
  }
  const bool draws = g.all || g.threshold != 0;
  const uint64_t copies = g.shared ? g.c : 1;
  unsigned long long warp_total = 0;  // kept units of this warp's planes (lane 0)
#if defined(__CUDA_ARCH__) && DROPFUSE_DROP_BLOCK_PREFETCH_MB > 0
  if (g.prefetch != nullptr) {  // 128-byte lines, spread over the grid's lanes
    const uint32_t lines = static_cast<uint32_t>(g.prefetch_bytes >> 7);  // the knob's MB: < 2^32
    for (uint32_t l = blockIdx.x * blockDim.x + threadIdx.x; l < lines; l += gridDim.x * blockDim.x)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(g.prefetch + (static_cast<uint64_t>(l) << 7)));
  }
#endif

  for (uint64_t q = static_cast<uint64_t>(blockIdx.x) * kRowsWarps + warp; q < g.planes;
       q += static_cast<uint64_t>(gridDim.x) * kRowsWarps) {
    // 1. Seeds: global seed indices [i0, i0 + valid), in Philox blocks [b0, b0 + blocks).
    for (uint32_t i = lane; i < vH * kWords; i += 32) seeds[i] = 0;
    __syncwarp();
    bool hit = false;
    if (draws) {
      const uint64_t i0 = q * valid;
      const uint64_t b0 = i0 >> 2;
      const uint32_t blocks = static_cast<uint32_t>(((i0 + valid - 1) >> 2) - b0 + 1);
      for (uint32_t t = lane; t < blocks; t += 32) {
        const uint64_t blk = b0 + t;
        // Blocks below 2^32 (seed indices below 2^34) take Philox's fast path (common/philox.cuh).
        const uint4 r = hi32(blk) == philox.hi ? philox_fast(philox, static_cast<uint64_t>(kPhiloxM0) * lo32(blk))
                                               : philox_block(philox, blk);
        if (!g.all && min(min(r.x, r.y), min(r.z, r.w)) >= g.threshold) continue;
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint64_t idx = blk * 4 + j;
          if (idx >= i0 && idx < i0 + valid && (g.all || words[j] < g.threshold)) {
            const uint32_t local = static_cast<uint32_t>(idx - i0);
            const uint32_t row = local / vW, col = local % vW;  // rare: a fraction gamma of the positions
#ifdef __CUDA_ARCH__
            atomicOr(reinterpret_cast<unsigned long long *>(&seeds[row * kWords + col / 64]), 1ull << (col % 64));
#else  // host C++: the words are uint64_t, not unsigned long long (no type punning)
            __atomic_fetch_or(&seeds[row * kWords + col / 64], uint64_t{1} << (col % 64), __ATOMIC_RELAXED);
#endif
            hit = true;
          }
        }
      }
    }
    __syncwarp();  // orders the seed bits before the reads (a vote alone does not order memory)
    const bool any_seed = __any_sync(0xffffffffu, hit);
    // 2. Keep rows.
    for (uint32_t h = lane; h < H; h += 32) {
      uint64_t d[kWords] = {};
      if (any_seed) {
        const uint32_t lo = h + 1 > g.bA ? h + 1 - g.bA : 0u, hi = min(h + 1, vH);
        for (uint32_t u = lo; u < hi; ++u) {
#pragma unroll
          for (int i = 0; i < kWords; ++i) d[i] |= seeds[u * kWords + i];
        }
        // Shifts by 0 .. bW-1 OR-ed in log2(bW) steps: d covers [0, len), then [0, 2 len).
        uint32_t len = 1;
        for (; 2 * len <= g.bW; len *= 2) row_or_shifted(d, len);
        if (len < g.bW) row_or_shifted(d, g.bW - len);
      }
#pragma unroll
      for (int i = 0; i < kWords; ++i) keep[h * kWords + i] = ~d[i] & row_mask[i];
    }
    __syncwarp();

    // 3. Mask words of each channel that uses this plane, and the count.
    unsigned long long kept = 0;
    for (uint64_t copy = 0; copy < copies; ++copy) {
      const uint64_t e0 = (g.shared ? q * g.c + copy : q) * g.spatial;
      const uint64_t e1 = e0 + g.spatial;
      // The warp holding the tensor's last element also writes the zero padding of its last word.
      const uint64_t end = e1 == g.numel ? (g.numel + 31) & ~uint64_t{31} : e1;
      const uint64_t w_first = e0 >> 5, w_last = (end - 1) >> 5;
      for (uint64_t wd = w_first + lane; wd <= w_last; wd += 32) {
        const uint64_t lo = max(wd * 32, e0), hi = min(wd * 32 + 32, end);
        // Plane positions [p, p_end) of this word's data bits, row by row.
        const uint32_t p = static_cast<uint32_t>(lo - e0);
        const uint32_t p_end = static_cast<uint32_t>(min(hi, e1) - e0);
        const uint32_t r = W >= 2 ? __umulhi(p, g.magic_w) : p;  // p < 2^14
        const uint32_t bits =
            gather_bits(p, p_end, r, p - r * W, static_cast<uint32_t>(lo - wd * 32), W,
                        [&](uint32_t r, uint32_t w) { return row_bits32<kWords>(keep + r * kWords, w); });
        if (copy == 0) kept += __popc(bits);
        store_mask_bits(mask, wd, bits, low_bits(static_cast<uint32_t>(hi - lo)) << (lo - wd * 32));
      }
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) kept += __shfl_xor_sync(0xffffffffu, kept, s);
    if (lane == 0 && kept != 0) {
      const uint64_t sample = g.shared ? q : (q >> 32) == 0 && (g.c >> 32) == 0
                                                 ? static_cast<uint32_t>(q) / static_cast<uint32_t>(g.c)
                                                 : q / g.c;
      atomicAdd(&stats[sample], kept * copies);
      warp_total += kept * copies;
    }
    __syncwarp();  // the rows are reused by the warp's next plane
  }
  if (lane == 0 && warp_total != 0) atomicAdd(&stats[g.samples], warp_total);
}

// scale = total / kept in f64, rounded once to f32; 0 when nothing is kept.
__device__ __forceinline__ float scale_of(uint64_t total, unsigned long long kept) {
  return kept == 0 ? 0.0f : __double2float_rn(__ull2double_rn(total) / __ull2double_rn(kept));
}

struct ApplyParams {
  uint64_t numel;
  uint64_t sample_elems;
  uint64_t samples;
  int normalize;
};

// The scale of sample n (per-sample mode) or of every element (the others).
__device__ __forceinline__ float sample_scale(const unsigned long long *stats, const ApplyParams &p, uint64_t n) {
  switch (p.normalize) {
    case DROPFUSE_NORMALIZE_GLOBAL:
      return scale_of(p.numel, stats[p.samples]);
    case DROPFUSE_NORMALIZE_PER_SAMPLE:
      return scale_of(p.sample_elems, stats[n]);
    default:
      return 1.0f;
  }
}

template <typename T>
__device__ __forceinline__ T apply_one(T v, bool keep, float scale) {
  return keep ? Elem<T>::from_f32(__fmul_rn(Elem<T>::to_f32(v), scale)) : Elem<T>::from_f32(0.0f);
}

// kPerSample: scales change along the tensor (per-sample mode); otherwise one scale for all.
template <typename T, bool VEC, bool kPerSample>
__global__ void __launch_bounds__(kApplyThreads)
    drop_block_apply_kernel(const T *x, T *y, const uint32_t *mask, const unsigned long long *stats,
                            const __grid_constant__ ApplyParams p) {
  constexpr int V = VecWidth<T>::value;
  // The scale of the sample [lo, hi) seen last (per-sample mode), or of everything.
  uint64_t lo = 0, hi = kPerSample ? 0 : ~uint64_t{0};
  float scale = kPerSample ? 0.0f : sample_scale(stats, p, 0);
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t chunks = p.numel / V;

  for (uint64_t base = warp * (32 * kApplyUnroll); base < chunks; base += warps * (32 * kApplyUnroll)) {
    T v[kApplyUnroll][V];
    // Zeroed, so that inactive slots do not carry the last iteration's words: left undefined,
    // they stayed alive across the loop and the 16-bit per-sample kernels spilled them, with a
    // local store and load every iteration (ptxas -v: 8 bytes; sm_90 misaligned, sm_80 aligned).
    // Since each .cu is compiled on its own (no --device-c), ptxas keeps one 32-bit value of those
    // per-sample kernels in local memory again, at 80 registers (scripts/kernel_audit.py allows it).
    uint32_t stored[kApplyUnroll] = {};
#pragma unroll
    for (int u = 0; u < kApplyUnroll; ++u) {
      const uint64_t c = base + u * 32 + lane;
      if (c < chunks) {
        load_elems<T, V, VEC>(x + c * V, v[u]);
        stored[u] = __ldg(mask + (c * V >> 5));
      }
    }
#pragma unroll
    for (int u = 0; u < kApplyUnroll; ++u) {
      const uint64_t c = base + u * 32 + lane;
      if (c >= chunks) continue;
      const uint64_t e0 = c * V;
      const uint32_t bits = (stored[u] >> (e0 & 31u)) & ((1u << V) - 1u);  // V divides 32
      T out[V];
      if (!kPerSample || (e0 >= lo && e0 + V <= hi)) {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = apply_one(v[u][j], (bits >> j) & 1u, scale);
      } else if constexpr (kPerSample) {  // a new sample begins: element by element
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const uint64_t e = e0 + j;
          if (e < lo || e >= hi) {
            const uint64_t n = e / p.sample_elems;
            lo = n * p.sample_elems;
            hi = lo + p.sample_elems;
            scale = sample_scale(stats, p, n);
          }
          out[j] = apply_one(v[u][j], (bits >> j) & 1u, scale);
        }
      }
      store_elems<T, V, VEC>(y + c * V, out);
    }
  }
  // The last numel % V elements.
  if (blockIdx.x == 0) {
    for (uint64_t e = chunks * V + threadIdx.x; e < p.numel; e += blockDim.x) {
      const uint64_t n = e / p.sample_elems;
      const bool keep = (__ldg(mask + (e >> 5)) >> (e & 31u)) & 1u;
      y[e] = apply_one(x[e], keep, sample_scale(stats, p, n));
    }
  }
}

// Host side --------------------------------------------------------------------------------------

bool valid_params(const dropfuse_drop_block_params &p) {
  if (p.n == 0 || p.c == 0 || p.d == 0 || p.h == 0 || p.w == 0) return false;
  if (p.block_d == 0 || p.block_d > p.d || p.block_h == 0 || p.block_h > p.h || p.block_w == 0 || p.block_w > p.w)
    return false;
  if (p.d > 1u << 30 || p.h > 1u << 30 || p.w > 1u << 30) return false;  // 32-bit unit coordinates
  if (p.threshold > (uint64_t{1} << 32)) return false;
  return p.normalize == DROPFUSE_NORMALIZE_GLOBAL || p.normalize == DROPFUSE_NORMALIZE_PER_SAMPLE ||
         p.normalize == DROPFUSE_NORMALIZE_OFF;
}

// The geometry of a launch; false when one slab and its seed slabs do not fit in shared memory.
bool make_geometry(const dropfuse_drop_block_params &p, int sms, Geometry *g, size_t *smem) {
  const bool three_d = p.d > 1;
  g->philox = philox_stream(p.seed, p.offset, 0);
  g->dev = DeviceState{p.philox_dev, p.offset};
  g->samples = p.n;
  g->c = p.c;
  g->planes = p.shared_channels ? p.n : p.n * p.c;
  g->spatial = p.d * p.h * p.w;
  g->numel = p.n * p.c * g->spatial;
  g->A = static_cast<uint32_t>(three_d ? p.d : p.h);
  g->B = static_cast<uint32_t>(three_d ? p.h : 1);
  g->W = static_cast<uint32_t>(p.w);
  g->Wk = (g->W + 31) / 32;
  g->bA = static_cast<uint32_t>(three_d ? p.block_d : p.block_h);
  g->bB = static_cast<uint32_t>(three_d ? p.block_h : 1);
  g->bW = static_cast<uint32_t>(p.block_w);
  g->vA = g->A - g->bA + 1;
  g->vB = g->B - g->bB + 1;
  g->vW = g->W - g->bW + 1;
  g->valid = static_cast<uint64_t>(g->vA) * g->vB * g->vW;
  // Shared memory: two bitmaps of cap_rows rows; a row is 8 bytes in the narrow kernel (W <= 64),
  // 4 * Wk bytes otherwise.
  g->narrow = g->W <= 64 && 2 * 8 * static_cast<uint64_t>(g->bA) * g->B <= DROPFUSE_DROP_BLOCK_SMEM;
  const uint64_t row_bytes = g->narrow ? 8 : 4 * static_cast<uint64_t>(g->Wk);
  const uint64_t budget_rows = DROPFUSE_DROP_BLOCK_SMEM / (2 * row_bytes);
  if (static_cast<uint64_t>(g->bA) * g->B > budget_rows) return false;
  uint64_t tile = budget_rows / g->B - (g->bA - 1);  // >= 1 output slabs per block
  // Few, large planes: smaller tiles so that every SM gets several blocks.
  const uint64_t want_jobs = 4 * static_cast<uint64_t>(sms);
  if (g->planes * ((g->A + tile - 1) / tile) < want_jobs) {
    const uint64_t tiles_wanted = (want_jobs + g->planes - 1) / g->planes;
    const uint64_t small = (g->A + tiles_wanted - 1) / tiles_wanted;
    tile = small < tile ? (small > 0 ? small : 1) : tile;
  }
  g->tile = static_cast<uint32_t>(tile < g->A ? tile : g->A);
  g->tiles = (g->A + g->tile - 1) / g->tile;
  g->cap_rows = (g->tile + g->bA - 1) * g->B;
  g->jobs = g->planes * g->tiles;
  g->all = p.threshold > 0xffffffffull;
  g->threshold = static_cast<uint32_t>(g->all ? 0xffffffffull : p.threshold);
  g->shared = p.shared_channels != 0;
  g->prefetch = nullptr;
  g->prefetch_bytes = 0;
  g->magic_w = g->W >= 2 ? static_cast<uint32_t>(((uint64_t{1} << 32) + g->W - 1) / g->W) : 0u;
  *smem = 2 * static_cast<size_t>(g->cap_rows) * row_bytes;
  return true;
}

template <typename T, bool VEC, bool kPerSample>
cudaError_t apply_grid(const void *x, void *y, const uint32_t *mask, const unsigned long long *stats,
                       const ApplyParams &ap, uint64_t wanted, cudaStream_t stream) {
  auto kernel = drop_block_apply_kernel<T, VEC, kPerSample>;
  unsigned grid = 0;
  const cudaError_t err = wave_grid(kernel, kApplyThreads, wanted, &grid, 32);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kApplyThreads, 0, stream, static_cast<const T *>(x), static_cast<T *>(y), mask,
                       stats, ap);
}

template <typename T>
cudaError_t launch_apply(const void *x, void *y, const uint32_t *mask, const uint64_t *stats,
                         const dropfuse_drop_block_params &p, cudaStream_t stream) {
  ApplyParams ap;
  ap.samples = p.n;
  ap.sample_elems = p.c * p.d * p.h * p.w;
  ap.numel = p.n * ap.sample_elems;
  ap.normalize = p.normalize;
  constexpr int V = VecWidth<T>::value;
  const uint64_t chunks = ap.numel / V;
  const uint64_t per_block = static_cast<uint64_t>(kApplyThreads) * kApplyUnroll;
  const uint64_t wanted = (chunks + per_block - 1) / per_block;
  const auto *st = reinterpret_cast<const unsigned long long *>(stats);
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0;
  if (ap.normalize == DROPFUSE_NORMALIZE_PER_SAMPLE) {
    return aligned ? apply_grid<T, true, true>(x, y, mask, st, ap, wanted, stream)
                   : apply_grid<T, false, true>(x, y, mask, st, ap, wanted, stream);
  }
  return aligned ? apply_grid<T, true, false>(x, y, mask, st, ap, wanted, stream)
                 : apply_grid<T, false, false>(x, y, mask, st, ap, wanted, stream);
}

cudaError_t launch_apply_dtype(dropfuse_dtype dtype, const void *x, void *y, const uint32_t *mask,
                               const uint64_t *stats, const dropfuse_drop_block_params &p, cudaStream_t stream) {
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_apply<float>(x, y, mask, stats, p, stream);
    case DROPFUSE_F16:
      return launch_apply<__half>(x, y, mask, stats, p, stream);
    case DROPFUSE_BF16:
      return launch_apply<__nv_bfloat16>(x, y, mask, stats, p, stream);
  }
  return cudaErrorInvalidValue;
}

bool misaligned4(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 3u) != 0; }
bool misaligned8(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 7u) != 0; }

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_drop_block_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask,
                                           uint64_t *stats, const dropfuse_drop_block_params *params,
                                           dropfuse_stream_t stream) {
  if (params == nullptr || mask == nullptr || stats == nullptr || misaligned4(mask) || misaligned8(stats) ||
      misaligned8(params->philox_dev))
    return cudaErrorInvalidValue;
  if ((x == nullptr) != (y == nullptr)) return cudaErrorInvalidValue;
  if (dtype != DROPFUSE_F32 && dtype != DROPFUSE_F16 && dtype != DROPFUSE_BF16) return cudaErrorInvalidValue;
  const dropfuse_drop_block_params &p = *params;
  if (!valid_params(p)) return cudaErrorInvalidValue;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  Geometry g;
  size_t smem = 0;
  if (!make_geometry(p, sms, &g, &smem)) return cudaErrorInvalidValue;
  const bool dev = p.philox_dev != nullptr;
  if (rows_kernel_fits(g)) {
    auto rows = g.W <= 64 ? (dev ? drop_block_rows_kernel<1, true> : drop_block_rows_kernel<1, false>)
                          : (dev ? drop_block_rows_kernel<2, true> : drop_block_rows_kernel<2, false>);
    err = cudaMemsetAsync(stats, 0, (p.n + 1) * sizeof(uint64_t), stream);
    if (err != cudaSuccess) return err;
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, rows, kRowsWarps * 32, 0);
    if (err != cudaSuccess) return err;
#if DROPFUSE_DROP_BLOCK_PREFETCH_MB > 0
    if (x != nullptr) {
      const uint64_t bytes = g.numel * (dtype == DROPFUSE_F32 ? 4 : 2);
      const uint64_t want = static_cast<uint64_t>(DROPFUSE_DROP_BLOCK_PREFETCH_MB) << 20;
      g.prefetch = static_cast<const char *>(x);
      g.prefetch_bytes = bytes < want ? bytes : want;
    }
#endif
    // One wave: each warp takes planes until none is left, and adds its total to the counter once.
    const uint64_t wanted = (g.planes + kRowsWarps - 1) / kRowsWarps;
    const uint64_t cap = static_cast<uint64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    const unsigned grid = static_cast<unsigned>(wanted < cap ? wanted : cap);
    err = launch_kernel(rows, grid, kRowsWarps * 32, 0, static_cast<cudaStream_t>(stream), mask,
                        reinterpret_cast<unsigned long long *>(stats), g);
    if (err != cudaSuccess || x == nullptr) return err;
    return launch_apply_dtype(dtype, x, y, mask, stats, p, static_cast<cudaStream_t>(stream));
  }
  auto kernel = g.narrow ? (dev ? drop_block_mask_kernel<true, true> : drop_block_mask_kernel<true, false>)
                         : (dev ? drop_block_mask_kernel<false, true> : drop_block_mask_kernel<false, false>);
  // Static plus dynamic shared memory above the default 48 KB needs the opt-in (the kernel's own
  // 16 static bytes made exactly 48 KB of bitmaps fail). The limit is raised once to the device's
  // maximum less the static part, never lowered, so concurrent callers cannot undo each other.
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) {
    int device = 0, optin = 0;
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
      return err;
    const int limit = optin - static_cast<int>(attr.sharedSizeBytes);
    if (limit < 0 || smem > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
    if (err != cudaSuccess) return err;
  }
  err = cudaMemsetAsync(stats, 0, (p.n + 1) * sizeof(uint64_t), stream);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMaskThreads, smem);
  if (err != cudaSuccess) return err;
  const uint64_t cap = static_cast<uint64_t>(sms) * (per_sm > 0 ? per_sm : 1) * 16;
  const unsigned grid = static_cast<unsigned>(g.jobs < cap ? g.jobs : cap);
  err = launch_kernel(kernel, grid, kMaskThreads, smem, static_cast<cudaStream_t>(stream), mask,
                      reinterpret_cast<unsigned long long *>(stats), g);
  if (err != cudaSuccess || x == nullptr) return err;
  return launch_apply_dtype(dtype, x, y, mask, stats, p, static_cast<cudaStream_t>(stream));
}

extern "C" int dropfuse_drop_block_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                            const uint64_t *stats, const dropfuse_drop_block_params *params,
                                            dropfuse_stream_t stream) {
  if (params == nullptr || dy == nullptr || dx == nullptr || mask == nullptr || stats == nullptr ||
      misaligned4(mask) || misaligned8(stats))
    return cudaErrorInvalidValue;
  if (!valid_params(*params)) return cudaErrorInvalidValue;
  return launch_apply_dtype(dtype, dy, dx, mask, stats, *params, static_cast<cudaStream_t>(stream));
}
