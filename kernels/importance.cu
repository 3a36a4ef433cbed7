// Attention-layer importance: per-token cosine similarity between a layer's input and output
// hidden states (tokens x hidden), summed over the real tokens into a per-layer (f64 sum, u64
// count) on the device. The contract and the f32 tolerance: src/reference/importance.rs.
//
// Stage 1 (rows_kernel): a block of 8 warps takes a tile of 64 tokens (8 per warp, grid-stride
// over tiles). One warp per token row: lane l sums a_i * b_i, a_i^2 and b_i^2 in f32 over chunks
// l, l + 32, ... of V consecutive elements (16-byte loads, DROPFUSE_IMPORTANCE_UNROLL chunks of
// both rows in flight per lane), then a 5-level butterfly gives every lane the row's sums, and
// cos = dot / (max(sqrt(|a|^2), eps) * max(sqrt(|b|^2), eps)) (PyTorch 2.x, eps = 1e-8), all
// without FMA contraction; a row whose sum of squares passes 2^120 (f32 overflow of the squares:
// elements from about 2^64 / sqrt(H) on) is summed again scaled by 2^-90 (row_cosine). Padding
// tokens (mask byte 0) are not read. One thread then adds the tile's similarities in ascending
// token order in f64 and writes the tile's sum and count.
// Stage 2 (finalize_kernel, one block of 256 threads): thread t adds tiles t, t + 256, ... in
// f64, a fixed tree adds the 256 results, and thread 0 adds the total to the layer's sum and
// count. Every order depends on the shape only: results are deterministic, run to run and GPU to
// GPU, and several batches accumulate without any host read.
#include <stdint.h>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = DROPFUSE_IMPORTANCE_TILE;  // tokens per tile
constexpr int kRowsPerWarp = kTile / kWarps;
static_assert(kTile % kWarps == 0, "whole rows per warp");
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kEps = 1e-8f;
constexpr int kFinalThreads = 256;

// Every launch (`launch_kernel`): the host emulation (tests/host_emu/cuda_fiber_emu.h) defines it
// before including this file.
#ifndef DROPFUSE_HOST_EMULATION
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

// Tuning knobs (not measured yet): 16-byte chunks per lane and row loaded before any is used
// (default: 16 elements of each row on sm_90, i.e. 2 chunks of f16/bf16 and 4 of f32, where 32
// elements spill at 64 registers; one chunk on older GPUs, where more spill at 80 registers with
// the crate's relocatable device code), and the resident blocks per SM the register budget must
// allow (3: 80 registers, 24 warps per SM; 4 blocks spill on sm_80).
#ifndef DROPFUSE_IMPORTANCE_UNROLL
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DROPFUSE_IMPORTANCE_UNROLL 1
#else
#define DROPFUSE_IMPORTANCE_UNROLL static_cast<int>(sizeof(T))
#endif
#endif
#ifndef DROPFUSE_IMPORTANCE_MIN_BLOCKS
#define DROPFUSE_IMPORTANCE_MIN_BLOCKS 3
#endif

// The three running sums of one lane.
struct Sums {
  float dot, aa, bb;
};

__device__ __forceinline__ void add_pair(Sums &s, float x, float y) {
  s.dot = __fadd_rn(s.dot, __fmul_rn(x, y));
  s.aa = __fadd_rn(s.aa, __fmul_rn(x, x));
  s.bb = __fadd_rn(s.bb, __fmul_rn(y, y));
}

// Rows whose f32 sum of squares exceeds kBig (elements beyond about 2^60 / sqrt(H), or non-finite)
// are summed again with their elements multiplied by kDown (a power of two): see row_cosine.
constexpr float kBig = 0x1p120f;
constexpr float kDown = 0x1p-90f;

// The three sums of a row pair after the butterfly (a warp-wide call: every lane returns the same
// sums). kScaled: every element of a is first multiplied by sa and every element of b by sb.
template <typename T, bool VEC, bool kScaled>
__device__ __forceinline__ Sums row_sums(const T *a, const T *b, uint64_t hidden, unsigned lane, float sa, float sb) {
  constexpr int V = VecWidth<T>::value;
  constexpr int U = DROPFUSE_IMPORTANCE_UNROLL;
  const uint64_t chunks = (hidden + V - 1) / V;
  Sums s{0.0f, 0.0f, 0.0f};
  for (uint64_t c0 = lane; c0 < chunks; c0 += 32 * U) {
    T va[U][V], vb[U][V];
    // All loads of the U chunks first (chunks c0, c0 + 32, ...), then the sums in that order.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint64_t c = c0 + 32 * u;
      if (c < chunks) {
        if constexpr (VEC) {
          load_elems<T, V, true>(a + c * V, va[u]);
          load_elems<T, V, true>(b + c * V, vb[u]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const uint64_t i = c * V + j;
            va[u][j] = i < hidden ? a[i] : Elem<T>::from_f32(0.0f);
            vb[u][j] = i < hidden ? b[i] : Elem<T>::from_f32(0.0f);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint64_t c = c0 + 32 * u;
      if (c < chunks) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          // Elements past the row end (only without VEC) are skipped, not added as zeros, so the
          // roundings are exactly the reference's simulation.
          if (VEC || c * V + j < hidden) {
            float x = Elem<T>::to_f32(va[u][j]), y = Elem<T>::to_f32(vb[u][j]);
            if constexpr (kScaled) {
              x = __fmul_rn(x, sa);
              y = __fmul_rn(y, sb);
            }
            add_pair(s, x, y);
          }
        }
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s.dot = __fadd_rn(s.dot, __shfl_xor_sync(kFullWarp, s.dot, off));
    s.aa = __fadd_rn(s.aa, __shfl_xor_sync(kFullWarp, s.aa, off));
    s.bb = __fadd_rn(s.bb, __shfl_xor_sync(kFullWarp, s.bb, off));
  }
  return s;
}

// The similarity of row `row` (a warp-wide call: every lane returns the same value).
//
// A sum of squares above kBig = 2^120 (or NaN) means the row's f32 squares may have overflowed
// (|x| from about 2^60 / sqrt(H) on: large-but-finite bf16 / f32 hidden states): that row is then
// summed again with its elements times kDown = 2^-90, exact for every element that does not land in
// f32's subnormals (those are below 2^-36 while the row's norm is above 2^60: their rounding is
// negligible), and the eps clamp scaled alike, max(|s x|, s eps) = s max(|x|, eps), so that
// dot'/(max(|a'|, sa eps) max(|b'|, sb eps)) is the same similarity without overflow. The branch is
// warp-uniform (every lane holds the same sums) and taken only by such rows (and rows holding an
// infinity or a NaN, whose similarity stays NaN); the other rows' arithmetic is unchanged.
template <typename T, bool VEC>
__device__ __forceinline__ float row_cosine(const T *a, const T *b, uint64_t hidden, unsigned lane) {
  Sums s = row_sums<T, VEC, false>(a, b, hidden, lane, 1.0f, 1.0f);
  float ea = kEps, eb = kEps;
  if (!(s.aa <= kBig && s.bb <= kBig)) {
    const float sa = s.aa <= kBig ? 1.0f : kDown;
    const float sb = s.bb <= kBig ? 1.0f : kDown;
    s = row_sums<T, VEC, true>(a, b, hidden, lane, sa, sb);
    ea = __fmul_rn(kEps, sa);
    eb = __fmul_rn(kEps, sb);
  }
  const float na = fmaxf(__fsqrt_rn(s.aa), ea);
  const float nb = fmaxf(__fsqrt_rn(s.bb), eb);
  return __fdiv_rn(s.dot, __fmul_rn(na, nb));
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads, DROPFUSE_IMPORTANCE_MIN_BLOCKS)
    rows_kernel(const T *a, const T *b, const uint8_t *mask, float *sims, uint64_t tokens, uint64_t hidden,
                double *tile_sums, uint64_t *tile_counts) {
  __shared__ float cos_s[kTile];
  __shared__ bool valid_s[kTile];
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  const uint64_t tiles = (tokens + kTile - 1) / kTile;
  for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#pragma unroll 1
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int slot = warp * kRowsPerWarp + i;
      const uint64_t row = tile * kTile + slot;
      // Warp-uniform: every lane reads the same mask byte.
      const bool valid = row < tokens && (mask == nullptr || mask[row] != 0);
      float cos = 0.0f;
      if (valid) cos = row_cosine<T, VEC>(a + row * hidden, b + row * hidden, hidden, lane);
      if (lane == 0) {
        cos_s[slot] = cos;
        valid_s[slot] = valid;
        if (sims != nullptr && row < tokens) sims[row] = valid ? cos : __int_as_float(0x7fc00000);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double sum = 0.0;
      uint64_t count = 0;
      for (int k = 0; k < kTile; ++k) {
        if (valid_s[k]) {
          sum += static_cast<double>(cos_s[k]);
          ++count;
        }
      }
      tile_sums[tile] = sum;
      tile_counts[tile] = count;
    }
    __syncthreads();  // the shared arrays are reused by the next tile
  }
}

__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const double *tile_sums, const uint64_t *tile_counts, uint64_t tiles, double *layer_sum,
                    uint64_t *layer_count) {
  __shared__ double sum_s[kFinalThreads];
  __shared__ uint64_t count_s[kFinalThreads];
  const unsigned t = threadIdx.x;
  double sum = 0.0;
  uint64_t count = 0;
  for (uint64_t k = t; k < tiles; k += kFinalThreads) {
    sum += tile_sums[k];
    count += tile_counts[k];
  }
  sum_s[t] = sum;
  count_s[t] = count;
  __syncthreads();
#pragma unroll
  for (int s = kFinalThreads / 2; s > 0; s >>= 1) {
    if (t < static_cast<unsigned>(s)) {
      sum_s[t] += sum_s[t + s];
      count_s[t] += count_s[t + s];
    }
    __syncthreads();
  }
  if (t == 0) {
    *layer_sum += sum_s[0];
    *layer_count += count_s[0];
  }
}

template <typename T>
cudaError_t launch(const void *input, const void *output, const uint8_t *mask, float *sims, uint64_t tokens,
                   uint64_t hidden, double *tile_sums, uint64_t *tile_counts, double *layer_sum,
                   uint64_t *layer_count, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const T *a = static_cast<const T *>(input);
  const T *b = static_cast<const T *>(output);
  const bool vec = ((reinterpret_cast<uintptr_t>(input) | reinterpret_cast<uintptr_t>(output)) & 15u) == 0 &&
                   hidden % V == 0;
  const uint64_t tiles = (tokens + kTile - 1) / kTile;
  unsigned grid = 0;
  cudaError_t err;
  if (vec) {
    err = wave_grid(rows_kernel<T, true>, kThreads, tiles, &grid);
    if (err != cudaSuccess) return err;
    err = launch_kernel(rows_kernel<T, true>, grid, kThreads, 0, stream, a, b, mask, sims, tokens, hidden, tile_sums,
                        tile_counts);
  } else {
    err = wave_grid(rows_kernel<T, false>, kThreads, tiles, &grid);
    if (err != cudaSuccess) return err;
    err = launch_kernel(rows_kernel<T, false>, grid, kThreads, 0, stream, a, b, mask, sims, tokens, hidden, tile_sums,
                        tile_counts);
  }
  if (err != cudaSuccess) return err;
  return launch_kernel(finalize_kernel, 1, kFinalThreads, 0, stream, tile_sums, tile_counts, tiles, layer_sum,
                       layer_count);
}

bool misaligned(const void *p, uintptr_t align) { return (reinterpret_cast<uintptr_t>(p) & (align - 1)) != 0; }

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_importance_accumulate(dropfuse_dtype dtype, const void *input, const void *output,
                                              const uint8_t *mask, float *similarities, uint64_t tokens,
                                              uint64_t hidden, double *tile_sums, uint64_t *tile_counts,
                                              double *layer_sum, uint64_t *layer_count,
                                              dropfuse_stream_t stream) {
  if (hidden == 0) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (input == nullptr || output == nullptr || tile_sums == nullptr || tile_counts == nullptr ||
      layer_sum == nullptr || layer_count == nullptr)
    return cudaErrorInvalidValue;
  if (misaligned(tile_sums, 8) || misaligned(tile_counts, 8) || misaligned(layer_sum, 8) ||
      misaligned(layer_count, 8) || (similarities != nullptr && misaligned(similarities, 4)))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DROPFUSE_F32:
      return launch<float>(input, output, mask, similarities, tokens, hidden, tile_sums, tile_counts, layer_sum,
                           layer_count, stream);
    case DROPFUSE_F16:
      return launch<__half>(input, output, mask, similarities, tokens, hidden, tile_sums, tile_counts, layer_sum,
                            layer_count, stream);
    case DROPFUSE_BF16:
      return launch<__nv_bfloat16>(input, output, mask, similarities, tokens, hidden, tile_sums, tile_counts,
                                   layer_sum, layer_count, stream);
  }
  return cudaErrorInvalidValue;
}
