// Dropout: bit-packed mask generation, forward (with or without a stored mask) and backward.
//
// Work split: a "chunk" is V consecutive elements (one 16-byte vector: V = 8 for f16/bf16, 4 for
// f32); G = 32 / V consecutive lanes of a warp cover one 32-bit mask word. For f16/bf16 each lane
// stores its chunk's mask byte; for f32 the G lanes' nibbles are OR-ed with shuffles and one lane
// stores the word: coalesced, each byte written once, no atomics. Warps grid-stride over the whole
// words of the tensor; the last n % 32 elements (a partial word) are done by warp 0 of block 0 with
// one ballot. All indices are 64-bit. The Philox work (one 32-bit word per element) costs about as
// much SM time as moving f16 data takes, so every instruction per element counts: Philox's
// lane-independent first rounds are precomputed (common/philox.cuh), scaling is branch-free with
// packed rounding, and the launch shape is tuned for overlap (BENCHMARKS.md).
#include <stdint.h>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kThreads = 256;
// Tuning knobs (defaults chosen by measurement on an H200, see BENCHMARKS.md); overridable with
// DROPFUSE_NVCC_FLAGS="-DDROPFUSE_UNROLL_2B=..." for experiments.
#ifndef DROPFUSE_UNROLL_2B  // chunks per lane per loop iteration, f16/bf16
#define DROPFUSE_UNROLL_2B 2
#endif
#ifndef DROPFUSE_UNROLL_4B  // chunks per lane per loop iteration, f32
#define DROPFUSE_UNROLL_4B 2
#endif
#ifndef DROPFUSE_UNROLL_APPLY  // the same for applying a stored mask (no Philox), any dtype; 0: as above
#define DROPFUSE_UNROLL_APPLY 4
#endif
#ifndef DROPFUSE_MASK_BYTES  // f16/bf16: each lane stores its mask byte (no shuffles)
#define DROPFUSE_MASK_BYTES 1
#endif
#ifndef DROPFUSE_MIN_BLOCKS  // resident blocks per SM the register budget must allow
#define DROPFUSE_MIN_BLOCKS 4
#endif
#ifndef DROPFUSE_MIN_BLOCKS_ALIGNED  // the same for Philox kernels whose chunks start a Philox block
#define DROPFUSE_MIN_BLOCKS_ALIGNED 6
#endif
#ifndef DROPFUSE_PREFETCH  // 1: load the next grid-stride iteration's data before computing this one's
#define DROPFUSE_PREFETCH 0
#endif
// Grid size: waves x SMs x resident blocks, grid-stride beyond (waves_for below; DROPFUSE_WAVES
// in common/launch.cuh overrides it for tuning builds).

constexpr unsigned kFullWarp = 0xffffffffu;

// Every launch goes through `launch_kernel`: the host emulation (tests/host_emu/cuda_fiber_emu.h)
// defines it (and runs the kernels on the CPU) before including this file.
#ifndef DROPFUSE_HOST_EMULATION
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

enum class Mode {
  ForwardMask,    // y = dropout(x), write the bit mask
  ForwardNoMask,  // y = dropout(x); also the mask-free backward
  ApplyMask,      // y = x * scale where the stored mask bit is set (backward from a mask)
};

// Chunks per lane per iteration, all loaded before any is used (loads in flight per lane).
template <typename T, Mode M>
__host__ __device__ constexpr int unroll() {
  if (M == Mode::ApplyMask && DROPFUSE_UNROLL_APPLY > 0) return DROPFUSE_UNROLL_APPLY;
  return sizeof(T) == 4 ? DROPFUSE_UNROLL_4B : DROPFUSE_UNROLL_2B;
}

// Register budget: kernels specialised for block-aligned launches (element offset a multiple of 4,
// so each chunk's words are whole Philox blocks) need fewer registers and run more warps per SM,
// which hides more of the memory latency behind the Philox work (measured, BENCHMARKS.md).
template <Mode M, bool kBlockAligned>
constexpr int min_blocks() {
  return M != Mode::ApplyMask && kBlockAligned ? DROPFUSE_MIN_BLOCKS_ALIGNED : DROPFUSE_MIN_BLOCKS;
}

template <typename T>
__device__ __forceinline__ T scaled_or_zero(T v, bool keep, float scale) {
  return keep ? Elem<T>::from_f32(__fmul_rn(Elem<T>::to_f32(v), scale)) : Elem<T>::from_f32(0.0f);
}

// out[j] = bit j of `bits` ? x[j] * scale (rounded once to T) : +0. Branch-free: every product is
// computed and dropped ones are selected away, and 16-bit results are rounded two at a time.
template <typename T, int V>
__device__ __forceinline__ void scale_kept(const T (&x)[V], uint32_t bits, float scale, T (&out)[V]) {
  float f[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float s = __fmul_rn(Elem<T>::to_f32(x[j]), scale);
    f[j] = (bits >> j) & 1u ? s : 0.0f;
  }
  Elem<T>::from_f32(f, out);
}

// What the kernels need of dropfuse_dropout_params, prepared on the host.
struct Params {
  PhiloxStream philox;  // host-prepared; unused when dev.state is set
  DeviceState dev;      // graph-safe launches: {seed, offset} in device memory, plus dev.add
  uint64_t element_offset;
  KeepTest keep;
  float scale;
};

Params prepare(const dropfuse_dropout_params &p) {
  return {philox_stream(p.seed, p.offset, p.element_offset), DeviceState{p.philox_dev, p.offset},
          p.element_offset, keep_test(p.threshold), p.scale};
}

template <typename T, bool VEC, Mode M, bool kBlockAligned>
__device__ __forceinline__ void dropout_body(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in,
                                             uint64_t n, const Params &p, const PhiloxStream &philox);

// kDev: the Philox stream comes from device memory (graph-safe launches). The host-prepared
// stream stays a kernel parameter otherwise, read as constant operands.
template <typename T, bool VEC, Mode M, bool kBlockAligned, bool kDev>
__global__ void __launch_bounds__(kThreads, min_blocks<M, kBlockAligned>())
    dropout_kernel(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, uint64_t n,
                   const __grid_constant__ Params p) {
  if constexpr (kDev) {
    const PhiloxStream philox = device_stream(p.dev, p.element_offset);
    dropout_body<T, VEC, M, kBlockAligned>(x, y, mask_out, mask_in, n, p, philox);
  } else {
    dropout_body<T, VEC, M, kBlockAligned>(x, y, mask_out, mask_in, n, p, p.philox);
  }
}

template <typename T, bool VEC, Mode M, bool kBlockAligned>
__device__ __forceinline__ void dropout_body(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in,
                                             uint64_t n, const Params &p, const PhiloxStream &philox) {
  constexpr int V = VecWidth<T>::value;
  constexpr int G = 32 / V;
  constexpr int kUnroll = unroll<T, M>();
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t words = n >> 5;  // whole mask words
  const uint64_t chunks = words * G;

  const uint64_t step = warps * (32 * kUnroll);
  // Loads of the kUnroll chunks of the iteration at `b` (those below `chunks`), all issued before
  // any is used, so each lane has kUnroll vectors in flight.
  auto load = [&](uint64_t b, T (&v)[kUnroll][V], uint32_t (&stored)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t c = b + u * 32 + lane;
      if (c < chunks) {
        load_elems<T, V, VEC>(x + c * V, v[u]);
        if constexpr (M == Mode::ApplyMask) stored[u] = __ldg(mask_in + (c * V >> 5));
      }
    }
  };
  T v[kUnroll][V];
  uint32_t stored[kUnroll];
  if (DROPFUSE_PREFETCH) load(warp * (32 * kUnroll), v, stored);
  for (uint64_t base = warp * (32 * kUnroll); base < chunks; base += step) {
    if (!DROPFUSE_PREFETCH) load(base, v, stored);
    // Prefetch: the next iteration's loads are in flight while this one computes.
    T next_v[kUnroll][V];
    uint32_t next_stored[kUnroll];
    if (DROPFUSE_PREFETCH) load(base + step, next_v, next_stored);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t c = base + u * 32 + lane;
      const bool active = c < chunks;
      uint32_t bits = 0;  // bit j: element c*V + j kept
      if (active) {
        if constexpr (M == Mode::ApplyMask) {
          bits = (stored[u] >> ((lane % G) * V)) & ((1u << V) - 1u);
        } else {
          uint32_t w[V];
          element_words<V, kBlockAligned>(philox, p.element_offset + c * V, w);
#pragma unroll
          for (int j = 0; j < V; ++j) bits |= static_cast<uint32_t>(keep_word(w[j], p.keep)) << j;
        }
        T out[V];
        scale_kept(v[u], bits, p.scale, out);
        store_elems<T, V, VEC>(y + c * V, out);
      }
      if constexpr (M == Mode::ForwardMask && V == 8 && DROPFUSE_MASK_BYTES) {
        // 8 elements per chunk: the chunk's bits are byte c of the (little-endian) mask words.
        if (active) reinterpret_cast<uint8_t *>(mask_out)[c] = static_cast<uint8_t>(bits);
      } else if constexpr (M == Mode::ForwardMask) {
        // Lane l holds the V bits at position (l % G) * V of word c*V/32; OR the G pieces together.
        uint32_t word = bits << ((lane % G) * V);
#pragma unroll
        for (int s = 1; s < G; s <<= 1) word |= __shfl_xor_sync(kFullWarp, word, s);
        if (active && lane % G == 0) mask_out[c * V >> 5] = word;
      }
    }
    if (DROPFUSE_PREFETCH) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) v[u][j] = next_v[u][j];
        stored[u] = next_stored[u];
      }
    }
  }

  // The partial last word: n % 32 elements, one per lane of warp 0 of block 0.
  if (blockIdx.x == 0 && threadIdx.x < 32 && (n & 31u) != 0) {
    const uint64_t i = (words << 5) + lane;
    const bool active = i < n;
    bool keep = false;
    if (active) {
      if constexpr (M == Mode::ApplyMask) {
        keep = (__ldg(mask_in + words) >> lane) & 1u;
      } else {
        keep = keep_word(element_word(philox, p.element_offset + i), p.keep);
      }
      y[i] = scaled_or_zero(x[i], keep, p.scale);
    }
    if constexpr (M == Mode::ForwardMask) {
      const uint32_t word = __ballot_sync(kFullWarp, keep);
      if (lane == 0) mask_out[words] = word;
    }
  }
}

// Mask only: one thread per 32-bit word.
__device__ __forceinline__ void mask_body(uint32_t *mask, uint64_t n, const Params &p, const PhiloxStream &philox);

template <bool kDev>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(uint32_t *mask, uint64_t n, const __grid_constant__ Params p) {
  if constexpr (kDev) {
    const PhiloxStream philox = device_stream(p.dev, p.element_offset);
    mask_body(mask, n, p, philox);
  } else {
    mask_body(mask, n, p, p.philox);
  }
}

__device__ __forceinline__ void mask_body(uint32_t *mask, uint64_t n, const Params &p, const PhiloxStream &philox) {
  const uint64_t words = (n + 31) >> 5;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t w = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
       w += stride) {
    const uint64_t first = w << 5;
    uint32_t bits = 0;
    if (first + 32 <= n) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t r[8];
        element_words<8, false>(philox, p.element_offset + first + 8 * q, r);
#pragma unroll
        for (int j = 0; j < 8; ++j) bits |= static_cast<uint32_t>(keep_word(r[j], p.keep)) << (8 * q + j);
      }
    } else {
      for (uint64_t i = first; i < n; ++i) {
        const uint32_t r = element_word(philox, p.element_offset + i);
        bits |= static_cast<uint32_t>(keep_word(r, p.keep)) << (i - first);
      }
    }
    mask[w] = bits;
  }
}

// Waves of blocks in the grid. Measured on an H200 (BENCHMARKS.md, tuning run 2): kernels bound by
// memory alone (f32, applying a stored mask) run best with many blocks (32 waves); the f16/bf16
// Philox kernels, which alternate between compute and memory, need fewer, more so for smaller
// tensors (2^26 elements: 12 waves 0.931 of copy, 16 waves 0.911, 32 waves 0.895; 2^30: 32 waves best).
template <typename T, Mode M>
int waves_for(uint64_t n) {
  if (sizeof(T) == 4 || M == Mode::ApplyMask) return 32;
  if (n <= (uint64_t{1} << 27)) return 12;
  if (n <= (uint64_t{1} << 28)) return 16;
  return 32;
}

template <typename T, bool VEC, Mode M, bool kBlockAligned>
cudaError_t launch_typed(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, uint64_t n,
                         const dropfuse_dropout_params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const uint64_t chunks = (n >> 5) * (32 / V);
  const uint64_t per_block = static_cast<uint64_t>(kThreads) * unroll<T, M>();
  // Applying a stored mask uses no randomness: one instantiation.
  const bool dev = M != Mode::ApplyMask && p.philox_dev != nullptr;
  auto kernel = dev ? dropout_kernel<T, VEC, M, kBlockAligned, M != Mode::ApplyMask>
                    : dropout_kernel<T, VEC, M, kBlockAligned, false>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (chunks + per_block - 1) / per_block, &grid, waves_for<T, M>(n));
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, x, y, mask_out, mask_in, n, prepare(p));
}

// Picks the instantiation: 16-byte vectors when both data pointers allow them, and for the Philox
// modes with vectors, the block-aligned kernel when the element offset is a multiple of 4 (any
// offset of a whole tensor, and of shards cut at multiples of 4). Other launches take the general
// kernel, which handles any alignment and offset.
template <typename T, Mode M>
cudaError_t launch_aligned_or_not(const void *x, void *y, uint32_t *mask_out, const uint32_t *mask_in,
                                  uint64_t n, const dropfuse_dropout_params &p, cudaStream_t stream) {
  const T *xt = static_cast<const T *>(x);
  T *yt = static_cast<T *>(y);
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0;
  if (!aligned) return launch_typed<T, false, M, false>(xt, yt, mask_out, mask_in, n, p, stream);
  if constexpr (M != Mode::ApplyMask) {
    if ((p.element_offset & 3u) == 0) return launch_typed<T, true, M, true>(xt, yt, mask_out, mask_in, n, p, stream);
  }
  return launch_typed<T, true, M, false>(xt, yt, mask_out, mask_in, n, p, stream);
}

template <Mode M>
cudaError_t launch_dtype(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask_out,
                         const uint32_t *mask_in, uint64_t n, const dropfuse_dropout_params &p,
                         cudaStream_t stream) {
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_aligned_or_not<float, M>(x, y, mask_out, mask_in, n, p, stream);
    case DROPFUSE_F16:
      return launch_aligned_or_not<__half, M>(x, y, mask_out, mask_in, n, p, stream);
    case DROPFUSE_BF16:
      return launch_aligned_or_not<__nv_bfloat16, M>(x, y, mask_out, mask_in, n, p, stream);
  }
  return cudaErrorInvalidValue;
}

bool misaligned_mask(const uint32_t *mask) { return (reinterpret_cast<uintptr_t>(mask) & 3u) != 0; }

// A device Philox state must be 8-byte aligned (null: the host values apply).
bool bad_device_state(const dropfuse_dropout_params &p) {
  return (reinterpret_cast<uintptr_t>(p.philox_dev) & 7u) != 0;
}

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_dropout_mask(uint32_t *mask, uint64_t n, const dropfuse_dropout_params *params,
                                     dropfuse_stream_t stream) {
  if (n == 0) return cudaSuccess;
  if (mask == nullptr || params == nullptr || misaligned_mask(mask) || bad_device_state(*params))
    return cudaErrorInvalidValue;
  const uint64_t words = (n + 31) >> 5;
  auto kernel = params->philox_dev != nullptr ? mask_kernel<true> : mask_kernel<false>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (words + kThreads - 1) / kThreads, &grid);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, mask, n, prepare(*params));
}

extern "C" int dropfuse_dropout_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask,
                                        uint64_t n, const dropfuse_dropout_params *params,
                                        dropfuse_stream_t stream) {
  if (n == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr || params == nullptr || bad_device_state(*params)) return cudaErrorInvalidValue;
  if (mask != nullptr) {
    if (misaligned_mask(mask)) return cudaErrorInvalidValue;
    return launch_dtype<Mode::ForwardMask>(dtype, x, y, mask, nullptr, n, *params, stream);
  }
  return launch_dtype<Mode::ForwardNoMask>(dtype, x, y, nullptr, nullptr, n, *params, stream);
}

extern "C" int dropfuse_dropout_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                         uint64_t n, float scale, dropfuse_stream_t stream) {
  if (n == 0) return cudaSuccess;
  if (dy == nullptr || dx == nullptr || mask == nullptr || misaligned_mask(mask)) return cudaErrorInvalidValue;
  dropfuse_dropout_params p{};
  p.scale = scale;
  return launch_dtype<Mode::ApplyMask>(dtype, dy, dx, nullptr, mask, n, p, stream);
}
