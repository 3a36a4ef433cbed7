// Fused bias + dropout + residual add: y = residual + dropout(x + bias), forward (bit mask or
// mask-free) and backward (dx, and dbias reduced over rows in a fixed order). The contract is
// src/reference/bias_dropout_residual.rs; the keep decisions and the mask are dropout's
// (kernels/dropfuse.h), so this file uses Philox exactly like kernels/dropout.cu.
//
// Forward: the flat grid-stride kernel of dropout.cu (a chunk is one 16-byte vector of V elements,
// G = 32 / V lanes cover one mask word, the partial last word is done by warp 0 of block 0), with
// a second input stream (the residual) and the bias. The bias is indexed by the column
// (element index mod H), which each lane tracks incrementally in 32-bit arithmetic (one 64-bit
// modulo per thread at the start): with H % V == 0 and an aligned bias the chunk's bias is one
// 16-byte load (from L1: the bias is small and shared by every row), otherwise V scalar loads.
//
// Backward with a bias: one pass over dy in a column-tiled kernel. Thread (column vector cv,
// row chunk k) walks the 256 rows of chunk k in ascending order (DROPFUSE_BDR_BWD_ROWS rows of
// loads in flight), writes dx and keeps one f32 partial per column; the partials go to a
// workspace of ceil(rows / 256) x H floats, and a second kernel adds them per column in chunk
// order and rounds once: the reduction order of the contract, deterministic. Without a bias the
// backward is plain dropout's (the dropout launchers are called).
//
// Graph-safe launches (params->philox_dev, kernels/dropfuse.h) take kernel variants (kDev) that
// compute the Philox stream from device memory once per thread at kernel start; the host path keeps
// its host-prepared stream as a __grid_constant__ parameter, as dropout.cu does.
#include <stdint.h>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kThreads = 256;
// Tuning knobs (not measured yet; overridable with DROPFUSE_NVCC_FLAGS="-D...=..."):
#ifndef DROPFUSE_BDR_UNROLL  // forward: chunks per lane per loop iteration (loads in flight)
#define DROPFUSE_BDR_UNROLL 2
#endif
#ifndef DROPFUSE_BDR_MIN_BLOCKS  // forward: resident blocks per SM the register budget must allow
#define DROPFUSE_BDR_MIN_BLOCKS 4
#endif
#ifndef DROPFUSE_BDR_MIN_BLOCKS_GENERAL  // the same for the kernels that handle any element offset
#define DROPFUSE_BDR_MIN_BLOCKS_GENERAL 2   // or misaligned data (one more Philox block per chunk)
#endif
#ifndef DROPFUSE_BDR_BWD_ROWS  // backward: rows of dy loaded ahead per thread
#define DROPFUSE_BDR_BWD_ROWS 4
#endif
#ifndef DROPFUSE_BDR_BWD_THREADS  // backward: threads per block
#define DROPFUSE_BDR_BWD_THREADS 128
#endif

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr uint64_t kChunkRows = DROPFUSE_BDR_DBIAS_CHUNK;  // rows per dbias partial (the contract's 256)

// Every launch (`launch_kernel`, 1-D and 2-D grids): the host emulation
// (tests/host_emu/cuda_fiber_emu.h and cuda_fiber_emu_2d.h) defines both before including this file.
#ifndef DROPFUSE_HOST_EMULATION
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

enum class Mode {
  ForwardMask,    // y = r + dropout(x + b), write the bit mask
  ForwardNoMask,  // the same without a mask
};

enum class Bias {
  None,     // no bias
  Vector,   // H % V == 0 and a 16-byte aligned bias: one vector load per chunk
  Scalar,   // V scalar loads per chunk, wrapping at the row end
  Runtime,  // the scalar (misaligned data) kernel: bias may be null, scalar loads
};

// What the kernels need, prepared on the host.
struct Params {
  PhiloxStream philox;  // host-prepared; unused when dev.state is set
  DeviceState dev;      // graph-safe launches: {seed, offset} in device memory, plus dev.add
  uint64_t element_offset;
  KeepTest keep;
  float scale;
  uint32_t h;          // row length (the bias period), 1 ..= 2^31
  uint32_t lane_step;  // (32 * V) % h: column advance from one unroll slot to the next
  uint32_t iter_step;  // (grid-stride step in elements) % h: column advance per loop iteration
};

Params prepare(const dropfuse_dropout_params &p, uint64_t h) {
  Params q{};
  q.philox = philox_stream(p.seed, p.offset, p.element_offset);
  q.dev = DeviceState{p.philox_dev, p.offset};
  q.element_offset = p.element_offset;
  q.keep = keep_test(p.threshold);
  q.scale = p.scale;
  q.h = static_cast<uint32_t>(h);
  return q;
}

// col + step mod h, for col, step < h <= 2^31 (so the sum fits 32 bits).
__device__ __forceinline__ uint32_t advance(uint32_t col, uint32_t step, uint32_t h) {
  col += step;
  return col >= h ? col - h : col;
}

// t[j] += bias[(col + j) mod h], one f32 add each (the bias of V consecutive elements starting at
// column col).
template <typename T, int V, Bias B>
__device__ __forceinline__ void add_bias(float (&t)[V], const T *bias, uint32_t col, uint32_t h) {
  if constexpr (B == Bias::Vector) {
#ifdef __CUDA_ARCH__
    const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(bias + col));
    const T *b = reinterpret_cast<const T *>(&raw);
#else  // host C++: memcpy, no type punning (as kernels/common/vec.cuh)
    static_assert(V * sizeof(T) == 16, "vector access is 16 bytes");
    T b[V];
    host_vec_check(bias + col);
    memcpy(b, bias + col, 16);
#endif
#pragma unroll
    for (int j = 0; j < V; ++j) t[j] = __fadd_rn(t[j], Elem<T>::to_f32(b[j]));
  } else if constexpr (B == Bias::Scalar || B == Bias::Runtime) {
    uint32_t k = col;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      t[j] = __fadd_rn(t[j], Elem<T>::to_f32(__ldg(bias + k)));
      k = k + 1 == h ? 0 : k + 1;
    }
  }
}

// o[j] = r[j] + (bit j ? scale * t[j] : +0), rounded once to T (contract point 3). Every product
// is computed and dropped ones are selected away, so non-finite dropped values do not leak.
template <typename T, int V>
__device__ __forceinline__ void residual_out(const float (&t)[V], const T (&r)[V], uint32_t bits, float scale,
                                             T (&out)[V]) {
  float o[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float s = __fmul_rn(scale, t[j]);
    const float u = (bits >> j) & 1u ? s : 0.0f;
    o[j] = __fadd_rn(Elem<T>::to_f32(r[j]), u);
  }
  Elem<T>::from_f32(o, out);
}

// Register budget: 4 blocks (64 registers) for the block-aligned 16-bit kernels (whole tensors and
// shards cut at multiples of 4), 3 (80 registers) for the block-aligned f32 ones (the masked f32
// kernels with a bias spill at 64 on sm_80), 2 (up to 128 registers) for the general ones, which
// hold one more Philox block per chunk and spill at 64 and at 80 registers (ptxas -v).
template <typename T, bool kBlockAligned>
constexpr int min_blocks() {
  return !kBlockAligned ? DROPFUSE_BDR_MIN_BLOCKS_GENERAL
                        : sizeof(T) == 4 && DROPFUSE_BDR_MIN_BLOCKS > 3 ? 3 : DROPFUSE_BDR_MIN_BLOCKS;
}

// kDev: the Philox stream comes from device memory (graph-safe launches).
template <typename T, bool VEC, Mode M, bool kBlockAligned, Bias B, bool kDev>
__global__ void __launch_bounds__(kThreads, min_blocks<T, kBlockAligned>())
    forward_kernel(const T *x, const T *r, const T *bias, T *y, uint32_t *mask_out, uint64_t n,
                   const __grid_constant__ Params p) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(p.dev, p.element_offset);
  const PhiloxStream &philox = kDev ? dev_philox : p.philox;
  constexpr int V = VecWidth<T>::value;
  constexpr int G = 32 / V;
  constexpr int kUnroll = DROPFUSE_BDR_UNROLL;
  constexpr bool kBias = B != Bias::None;
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t words = n >> 5;  // whole mask words
  const uint64_t chunks = words * G;
  const uint64_t step = warps * (32 * kUnroll);
  const bool has_bias = B == Bias::Runtime ? bias != nullptr : kBias;

  // Column of this lane's first chunk of the current iteration.
  uint32_t col0 = 0;
  if (has_bias) col0 = static_cast<uint32_t>(((warp * (32 * kUnroll) + lane) * V) % p.h);

  for (uint64_t base = warp * (32 * kUnroll); base < chunks; base += step) {
    T xv[kUnroll][V], rv[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t c = base + u * 32 + lane;
      if (c < chunks) {
        load_elems<T, V, VEC>(x + c * V, xv[u]);
        load_elems<T, V, VEC>(r + c * V, rv[u]);
      }
    }
    uint32_t col = col0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t c = base + u * 32 + lane;
      const bool active = c < chunks;
      uint32_t bits = 0;  // bit j: element c*V + j kept
      if (active) {
        uint32_t w[V];
        element_words<V, kBlockAligned>(philox, p.element_offset + c * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) bits |= static_cast<uint32_t>(keep_word(w[j], p.keep)) << j;
        float t[V];
#pragma unroll
        for (int j = 0; j < V; ++j) t[j] = Elem<T>::to_f32(xv[u][j]);
        if (has_bias) add_bias<T, V, B>(t, bias, col, p.h);
        T out[V];
        residual_out(t, rv[u], bits, p.scale, out);
        store_elems<T, V, VEC>(y + c * V, out);
      }
      if constexpr (M == Mode::ForwardMask && V == 8) {
        // 8 elements per chunk: the chunk's bits are byte c of the (little-endian) mask words.
        if (active) reinterpret_cast<uint8_t *>(mask_out)[c] = static_cast<uint8_t>(bits);
      } else if constexpr (M == Mode::ForwardMask) {
        // Lane l holds the V bits at position (l % G) * V of word c*V/32; OR the G pieces together.
        uint32_t word = bits << ((lane % G) * V);
#pragma unroll
        for (int s = 1; s < G; s <<= 1) word |= __shfl_xor_sync(kFullWarp, word, s);
        if (active && lane % G == 0) mask_out[c * V >> 5] = word;
      }
      if (has_bias) col = advance(col, p.lane_step, p.h);
    }
    if (has_bias) col0 = advance(col0, p.iter_step, p.h);
  }

  // The partial last word: n % 32 elements, one per lane of warp 0 of block 0.
  if (blockIdx.x == 0 && threadIdx.x < 32 && (n & 31u) != 0) {
    const uint64_t i = (words << 5) + lane;
    const bool active = i < n;
    bool keep = false;
    if (active) {
      keep = keep_word(element_word(philox, p.element_offset + i), p.keep);
      float t[1] = {Elem<T>::to_f32(x[i])};
      if (has_bias) t[0] = __fadd_rn(t[0], Elem<T>::to_f32(bias[i % p.h]));
      const float s = __fmul_rn(p.scale, t[0]);
      y[i] = Elem<T>::from_f32(__fadd_rn(Elem<T>::to_f32(r[i]), keep ? s : 0.0f));
    }
    if constexpr (M == Mode::ForwardMask) {
      const uint32_t word = __ballot_sync(kFullWarp, keep);
      if (lane == 0) mask_out[words] = word;
    }
  }
}

// Waves of blocks in the grid (as dropout.cu's waves_for; this kernel moves 1.5x dropout's bytes
// per random word, so it is more memory-bound: not tuned yet).
template <typename T>
int waves_for(uint64_t n) {
  if (sizeof(T) == 4) return 32;
  if (n <= (uint64_t{1} << 27)) return 12;
  if (n <= (uint64_t{1} << 28)) return 16;
  return 32;
}

template <typename T, bool VEC, Mode M, bool kBlockAligned, Bias B>
cudaError_t launch_forward_typed(const T *x, const T *r, const T *bias, T *y, uint32_t *mask, uint64_t n,
                                 Params p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  constexpr int kUnroll = DROPFUSE_BDR_UNROLL;
  const uint64_t chunks = (n >> 5) * (32 / V);
  const uint64_t per_block = static_cast<uint64_t>(kThreads) * kUnroll;
  auto kernel = p.dev.state != nullptr ? forward_kernel<T, VEC, M, kBlockAligned, B, true>
                                       : forward_kernel<T, VEC, M, kBlockAligned, B, false>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (chunks + per_block - 1) / per_block, &grid, waves_for<T>(n));
  if (err != cudaSuccess) return err;
  const uint64_t step_elems = static_cast<uint64_t>(grid) * kThreads * kUnroll * V;
  p.lane_step = static_cast<uint32_t>((32u * V) % p.h);
  p.iter_step = static_cast<uint32_t>(step_elems % p.h);
  return launch_kernel(kernel, grid, kThreads, 0, stream, x, r, bias, y, mask, n, p);
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Picks the instantiation: 16-byte vectors when x, r and y allow them (then the block-aligned
// Philox kernel when the element offset is a multiple of 4, and the bias mode), the scalar kernel
// otherwise.
template <typename T, Mode M>
cudaError_t launch_forward(const void *x, const void *r, const void *bias, void *y, uint32_t *mask, uint64_t n,
                           const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const T *xt = static_cast<const T *>(x);
  const T *rt = static_cast<const T *>(r);
  const T *bt = static_cast<const T *>(bias);
  T *yt = static_cast<T *>(y);
  if (!(aligned16(x) && aligned16(r) && aligned16(y))) {
    return launch_forward_typed<T, false, M, false, Bias::Runtime>(xt, rt, bt, yt, mask, n, p, stream);
  }
  const bool block_aligned = (p.element_offset & 3u) == 0;
  if (bias == nullptr) {
    return block_aligned ? launch_forward_typed<T, true, M, true, Bias::None>(xt, rt, bt, yt, mask, n, p, stream)
                         : launch_forward_typed<T, true, M, false, Bias::None>(xt, rt, bt, yt, mask, n, p, stream);
  }
  if (aligned16(bias) && p.h % V == 0) {
    return block_aligned ? launch_forward_typed<T, true, M, true, Bias::Vector>(xt, rt, bt, yt, mask, n, p, stream)
                         : launch_forward_typed<T, true, M, false, Bias::Vector>(xt, rt, bt, yt, mask, n, p, stream);
  }
  return block_aligned ? launch_forward_typed<T, true, M, true, Bias::Scalar>(xt, rt, bt, yt, mask, n, p, stream)
                       : launch_forward_typed<T, true, M, false, Bias::Scalar>(xt, rt, bt, yt, mask, n, p, stream);
}

template <Mode M>
cudaError_t forward_dtype(dropfuse_dtype dtype, const void *x, const void *r, const void *bias, void *y,
                          uint32_t *mask, uint64_t n, const Params &p, cudaStream_t stream) {
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_forward<float, M>(x, r, bias, y, mask, n, p, stream);
    case DROPFUSE_F16:
      return launch_forward<__half, M>(x, r, bias, y, mask, n, p, stream);
    case DROPFUSE_BF16:
      return launch_forward<__nv_bfloat16, M>(x, r, bias, y, mask, n, p, stream);
  }
  return cudaErrorInvalidValue;
}

// ---- backward with dbias ----

// Keep bits of the `count` (<= V <= 8) slice elements f .. f + count - 1 from the bit mask; bits at
// and above `count` are unspecified. Reads the next word only when the elements cross into it.
__device__ __forceinline__ uint32_t mask_bits(const uint32_t *mask, uint64_t f, int count) {
  const uint64_t w = f >> 5;
  const unsigned s = static_cast<unsigned>(f & 31u);
  uint32_t bits = __ldg(mask + w) >> s;
  if (s + count > 32) bits |= __ldg(mask + w + 1) << (32 - s);
  return bits;
}

// kDev: the Philox stream comes from device memory (graph-safe launches regenerating the mask).
template <typename T, bool VEC, bool kFromMask, bool kBlockAligned, bool kDev>
__global__ void __launch_bounds__(DROPFUSE_BDR_BWD_THREADS)
    backward_kernel(const T *dy, T *dx, const uint32_t *mask, float *partials, uint64_t rows,
                    const __grid_constant__ Params p) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(p.dev, p.element_offset);
  const PhiloxStream &philox = kDev ? dev_philox : p.philox;
  constexpr int V = VecWidth<T>::value;
  constexpr int R = DROPFUSE_BDR_BWD_ROWS;
  const uint32_t h = p.h;
  const uint32_t cvs = (h + V - 1) / V;  // column vectors
  const uint32_t cv = blockIdx.x * blockDim.x + threadIdx.x;
  if (cv >= cvs) return;  // no warp-wide operations below
  const uint32_t j0 = cv * V;
  const int nv = h - j0 < static_cast<uint32_t>(V) ? static_cast<int>(h - j0) : V;  // columns of this thread
  const uint64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  const uint64_t chunk_step = static_cast<uint64_t>(gridDim.y) * blockDim.y;

  for (uint64_t k = static_cast<uint64_t>(blockIdx.y) * blockDim.y + threadIdx.y; k < chunks; k += chunk_step) {
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.0f;
    const uint64_t r0 = k * kChunkRows;
    const uint64_t r1 = rows - r0 < kChunkRows ? rows : r0 + kChunkRows;
    for (uint64_t rb = r0; rb < r1; rb += R) {
      T v[R][V];
      uint32_t stored[R];
      // All R rows' loads first (rows ascending), then the arithmetic in row order.
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (rb + q < r1) {
          const uint64_t f = (rb + q) * h + j0;
          if constexpr (VEC) {
            load_elems<T, V, true>(dy + f, v[q]);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) v[q][j] = j < nv ? dy[f + j] : Elem<T>::from_f32(0.0f);
          }
          if constexpr (kFromMask) stored[q] = mask_bits(mask, f, nv);
        }
      }
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (rb + q < r1) {
          const uint64_t f = (rb + q) * h + j0;
          uint32_t bits = 0;
          if constexpr (kFromMask) {
            bits = stored[q];
          } else {
            uint32_t w[V];
            element_words<V, kBlockAligned>(philox, p.element_offset + f, w);
#pragma unroll
            for (int j = 0; j < V; ++j) bits |= static_cast<uint32_t>(keep_word(w[j], p.keep)) << j;
          }
          float g[V];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float s = __fmul_rn(p.scale, Elem<T>::to_f32(v[q][j]));
            g[j] = (bits >> j) & 1u ? s : 0.0f;
            acc[j] = __fadd_rn(acc[j], g[j]);
          }
          T out[V];
          Elem<T>::from_f32(g, out);
          if constexpr (VEC) {
            store_elems<T, V, true>(dx + f, out);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j)
              if (j < nv) dx[f + j] = out[j];
          }
        }
      }
    }
    float *part = partials + k * h + j0;
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < nv) part[j] = acc[j];
  }
}

// dbias[j] = round_T(+0 + partials[0][j] + partials[1][j] + ...), chunks ascending: one thread per
// column (loads unrolled, adds in order).
template <typename T>
__global__ void __launch_bounds__(256)
    dbias_combine_kernel(const float *partials, T *dbias, uint64_t chunks, uint32_t h) {
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < h; j += gridDim.x * blockDim.x) {
    float acc = 0.0f;
#pragma unroll 8
    for (uint64_t k = 0; k < chunks; ++k) acc = __fadd_rn(acc, __ldg(partials + k * h + j));
    dbias[j] = Elem<T>::from_f32(acc);
  }
}

template <typename T, bool VEC, bool kFromMask, bool kBlockAligned>
cudaError_t launch_backward_typed(const T *dy, T *dx, const uint32_t *mask, T *dbias, float *workspace,
                                  uint64_t rows, const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  constexpr unsigned kBwd = DROPFUSE_BDR_BWD_THREADS;
  const uint32_t cvs = (p.h + V - 1) / V;
  const uint64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  // Block shape: up to kBwd threads across columns (a multiple of 32), the rest across chunks.
  unsigned tx = kBwd;
  while (tx > 32 && tx / 2 >= cvs) tx /= 2;
  const unsigned ty = kBwd / tx;
  const dim3 block(tx, ty);
  const uint64_t gx = (cvs + tx - 1) / tx;
  const uint64_t gy = (chunks + ty - 1) / ty;
  if (gx > 0x7fffffffu) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy < 65535 ? gy : 65535));
  // Applying a stored mask uses no randomness: one instantiation.
  auto kernel = !kFromMask && p.dev.state != nullptr ? backward_kernel<T, VEC, kFromMask, kBlockAligned, !kFromMask>
                                                     : backward_kernel<T, VEC, kFromMask, kBlockAligned, false>;
  cudaError_t err = launch_kernel(kernel, grid, block, 0, stream, dy, dx, mask, workspace, rows, p);
  if (err != cudaSuccess) return err;
  unsigned cgrid = 0;
  err = wave_grid(dbias_combine_kernel<T>, 256, (p.h + 255) / 256, &cgrid, 1);
  if (err != cudaSuccess) return err;
  return launch_kernel(dbias_combine_kernel<T>, cgrid, 256, 0, stream, workspace, dbias, chunks, p.h);
}

template <typename T>
cudaError_t launch_backward(const void *dy, void *dx, const uint32_t *mask, void *dbias, float *workspace,
                            uint64_t rows, const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const T *dyt = static_cast<const T *>(dy);
  T *dxt = static_cast<T *>(dx);
  T *bt = static_cast<T *>(dbias);
  const bool vec = aligned16(dy) && aligned16(dx) && p.h % V == 0;
  if (mask != nullptr) {
    return vec ? launch_backward_typed<T, true, true, false>(dyt, dxt, mask, bt, workspace, rows, p, stream)
               : launch_backward_typed<T, false, true, false>(dyt, dxt, mask, bt, workspace, rows, p, stream);
  }
  if (!vec) return launch_backward_typed<T, false, false, false>(dyt, dxt, mask, bt, workspace, rows, p, stream);
  // Every row's first element is block-aligned when the offset and H are multiples of 4.
  if ((p.element_offset & 3u) == 0 && (p.h & 3u) == 0) {
    return launch_backward_typed<T, true, false, true>(dyt, dxt, mask, bt, workspace, rows, p, stream);
  }
  return launch_backward_typed<T, true, false, false>(dyt, dxt, mask, bt, workspace, rows, p, stream);
}

// The launchers' shared checks: 1 <= row_len <= 2^31 and rows * row_len fits 64 bits.
bool bad_shape(uint64_t rows, uint64_t row_len) {
  return row_len == 0 || row_len > (uint64_t{1} << 31) || rows > UINT64_MAX / row_len;
}

bool misaligned_mask(const uint32_t *mask) { return (reinterpret_cast<uintptr_t>(mask) & 3u) != 0; }

// A device Philox state must be 8-byte aligned (null: the host values apply).
bool bad_device_state(const dropfuse_dropout_params &p) {
  return (reinterpret_cast<uintptr_t>(p.philox_dev) & 7u) != 0;
}

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_bias_dropout_residual_forward(dropfuse_dtype dtype, const void *x, const void *residual,
                                                      const void *bias, void *y, uint32_t *mask, uint64_t rows,
                                                      uint64_t row_len, const dropfuse_dropout_params *params,
                                                      dropfuse_stream_t stream) {
  if (params == nullptr || bad_shape(rows, row_len)) return cudaErrorInvalidValue;
  const uint64_t n = rows * row_len;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || residual == nullptr || y == nullptr || bad_device_state(*params)) return cudaErrorInvalidValue;
  const Params p = prepare(*params, row_len);
  if (mask != nullptr) {
    if (misaligned_mask(mask)) return cudaErrorInvalidValue;
    return forward_dtype<Mode::ForwardMask>(dtype, x, residual, bias, y, mask, n, p, stream);
  }
  return forward_dtype<Mode::ForwardNoMask>(dtype, x, residual, bias, y, nullptr, n, p, stream);
}

extern "C" int dropfuse_bias_dropout_residual_backward(dropfuse_dtype dtype, const void *dy, void *dx,
                                                       const uint32_t *mask, void *dbias, float *workspace,
                                                       uint64_t rows, uint64_t row_len,
                                                       const dropfuse_dropout_params *params,
                                                       dropfuse_stream_t stream) {
  if (params == nullptr || bad_shape(rows, row_len)) return cudaErrorInvalidValue;
  const uint64_t n = rows * row_len;
  if (n == 0) return cudaSuccess;
  if (dy == nullptr || dx == nullptr || bad_device_state(*params)) return cudaErrorInvalidValue;
  if (mask != nullptr && misaligned_mask(mask)) return cudaErrorInvalidValue;
  if (dbias == nullptr) {
    // dx alone is dropout's backward (contract point 4).
    if (mask != nullptr) return dropfuse_dropout_backward(dtype, dy, dx, mask, n, params->scale, stream);
    return dropfuse_dropout_forward(dtype, dy, dx, nullptr, n, params, stream);
  }
  if (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 3u) != 0) return cudaErrorInvalidValue;
  const Params p = prepare(*params, row_len);
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_backward<float>(dy, dx, mask, dbias, workspace, rows, p, stream);
    case DROPFUSE_F16:
      return launch_backward<__half>(dy, dx, mask, dbias, workspace, rows, p, stream);
    case DROPFUSE_BF16:
      return launch_backward<__nv_bfloat16>(dy, dx, mask, dbias, workspace, rows, p, stream);
  }
  return cudaErrorInvalidValue;
}
