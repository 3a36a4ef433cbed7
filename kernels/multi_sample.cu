// Multi-sample dropout (the contract: src/reference/multi_sample.rs) and weighted cross-entropy.
//
// Kernels:
//   - labels_kernel: one CTA scans the B labels: n_valid (labels != ignore index) and the first row
//     whose label is neither in [0, C) nor the ignore index, into the scratch's two u64 (no host read).
//   - ce_kernel: one warp per (k, row), grid-stride: pass 1 reads the row once (online max and sum
//     of exp, sum of z), pass 2 re-reads it (L1/L2) and writes dz = w_k * (softmax - t) / n_valid
//     (the label's element as (1 - t_y) - sum of the other classes' softmax: no cancellation);
//     lane 0 writes the row's cross-entropy to the scratch. Nothing is written when a label is bad.
//     The arithmetic depends on C alone (chunks of 8 when C % 8 == 0), never on the alignment of
//     the logits or the gradient, so the loss and the gradient are the same bits for any views.
//   - combine_kernel: one CTA sums the K * B row partials in a fixed order (per-thread strided sums
//     in f64, then a fixed tree), loss = sum_k w_k * sum_i CE_ki / n_valid, rounded once to f32.
//   - copies_kernel: reads each 8-element chunk of h once and writes it K times (sample k on Philox
//     stream offset + k), optionally the K bit masks (one byte per chunk and sample).
//   - reduce_kernel: dh = sum_k keep_k * grad_k * scale, ascending k, in f32, masks stored or
//     regenerated.
//   Both take the K streams' offset-dependent parts precomputed on the host, or, for graph-safe
//   launches (philox_dev), read the seed and the base offset from device memory once per thread
//   and derive sample k's stream (philox_dev[1] + params.offset + k) on the device.
//   - mean_kernel: sum_k z_k / K in f32, ascending k (the averaged logits).
// All indices are 64-bit; every launch is checked; nothing synchronizes.
#include <float.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 1024;  // labels and combine kernels: one CTA
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kChunk = 8;  // elements per lane and step (one mask byte)
constexpr uint64_t kNoBadRow = ~uint64_t{0};

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

// ---- 8-element chunks as f32, one or two 16-byte accesses when VEC ----

template <typename T, bool VEC>
__device__ __forceinline__ void load8(const T *p, float (&f)[kChunk]) {
  constexpr int V = VecWidth<T>::value;
  if constexpr (VEC) {
#pragma unroll
    for (int h = 0; h < kChunk / V; ++h) {
      T v[V];
      load_elems<T, V, true>(p + h * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) f[h * V + j] = Elem<T>::to_f32(v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) f[j] = Elem<T>::to_f32(p[j]);
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store8(T *p, const float (&f)[kChunk]) {
  constexpr int V = VecWidth<T>::value;
  T v[kChunk];
  Elem<T>::from_f32(f, v);
  if constexpr (VEC) {
#pragma unroll
    for (int h = 0; h < kChunk / V; ++h) {
      T part[V];
#pragma unroll
      for (int j = 0; j < V; ++j) part[j] = v[h * V + j];
      store_elems<T, V, true>(p + h * V, part);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) p[j] = v[j];
  }
}

__host__ __device__ __forceinline__ bool host_aligned16(const void *p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ================================ weighted cross-entropy ================================

struct CeParams {
  uint64_t k, b, c;
  int64_t ignore_index;
  float eps;        // label smoothing
  float t_on;       // target of the label: 1 - eps * (C - 1) / C (f64, rounded once)
  float t_off;      // target of the other classes: eps / C
  float one_minus_t_on;  // eps * (C - 1) / C (f64, rounded once)
  float inv_c;      // 1 / C (f64, rounded once)
  float grad_scale; // multiplies the gradient (1: the plain gradient)
  bool zero_on_bad; // a bad label zeroes the gradient instead of leaving it untouched
  float weights[DROPFUSE_WEIGHTED_CE_MAX_K];
};

static_assert(sizeof(CeParams) + 5 * sizeof(void *) <= 4096, "cross-entropy kernel parameters above 4 KB");

// stats[0] = n_valid, stats[1] = first bad row or kNoBadRow.
__global__ void __launch_bounds__(kReduceThreads)
    labels_kernel(const int64_t *labels, uint64_t b, uint64_t c, int64_t ignore_index, uint64_t *stats) {
  __shared__ uint64_t s_valid[kReduceThreads / 32], s_bad[kReduceThreads / 32];
  uint64_t valid = 0, bad = kNoBadRow;
  for (uint64_t i = threadIdx.x; i < b; i += blockDim.x) {
    const int64_t y = labels[i];
    if (y == ignore_index) continue;
    if (y >= 0 && static_cast<uint64_t>(y) < c) {
      ++valid;
    } else if (bad == kNoBadRow) {
      bad = i;  // rows ascend per thread: the first is the smallest
    }
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) {
    valid += __shfl_xor_sync(kFullWarp, valid, s);
    const uint64_t o = __shfl_xor_sync(kFullWarp, bad, s);
    bad = o < bad ? o : bad;
  }
  const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
  if (lane == 0) s_valid[warp] = valid, s_bad[warp] = bad;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t v = 0, m = kNoBadRow;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) {
      v += s_valid[w];
      m = s_bad[w] < m ? s_bad[w] : m;
    }
    stats[0] = v;
    stats[1] = m;
  }
}

// Online (max, sum of exp) merge; an empty side has m = -inf, s = 0.
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  const float a = m == mm ? s : s * expf(m - mm);
  const float b = m2 == mm ? s2 : s2 * expf(m2 - mm);
  m = mm;
  s = a + b;
}

// Tuning knobs (not measured yet; the defaults are the largest unroll that fits 4 blocks of 256
// threads per SM without spills: 64 registers): chunks per lane in flight, and resident blocks per
// SM the register budget must allow.
#ifndef DROPFUSE_CE_UNROLL
#define DROPFUSE_CE_UNROLL 2
#endif
#ifndef DROPFUSE_CE_MIN_BLOCKS
#define DROPFUSE_CE_MIN_BLOCKS 4
#endif

// kChunked (C % 8 == 0): lanes take 8-element chunks (chunk max and sum of exp, then merged);
// otherwise single elements. VEC (kChunked, logits and gradient 16-byte aligned) only selects the
// width of the memory accesses: the arithmetic, hence the loss and the gradient bits, depend on C
// alone, not on where the gradient goes (loss only, aligned or misaligned views).
template <typename T, typename G, bool kChunked, bool VEC>
__global__ void __launch_bounds__(kThreads, DROPFUSE_CE_MIN_BLOCKS)
    ce_kernel(const T *z, const int64_t *labels, G *dz, float *partial, const uint64_t *stats,
              const __grid_constant__ CeParams p) {
  if (stats[1] != kNoBadRow) {
    // A bad label: write nothing, or (zero_on_bad) only zeros into the gradient.
    if (p.zero_on_bad && dz != nullptr) {
      const uint64_t total = p.k * p.b * p.c;
      const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
      for (uint64_t e = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        dz[e] = Elem<G>::from_f32(0.0f);
      }
    }
    return;
  }
  const uint64_t n_valid = stats[0];
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t rows = p.k * p.b;
  const uint64_t C = p.c;
  static_assert(kChunked || !VEC, "vector accesses need whole chunks");
  const uint64_t chunks = kChunked ? C / kChunk : 0;
  constexpr int kUnroll = DROPFUSE_CE_UNROLL;
  for (uint64_t r = warp; r < rows; r += warps) {
    const uint64_t k = r / p.b;
    const uint64_t i = r - k * p.b;
    const int64_t y = labels[i];
    const T *zr = z + r * C;
    G *dr = dz == nullptr ? nullptr : dz + r * C;
    if (y == p.ignore_index || n_valid == 0) {
      if (lane == 0) partial[r] = 0.0f;
      if (dr != nullptr) {
        const float zero[kChunk] = {};
        if constexpr (kChunked) {
          for (uint64_t c = lane; c < chunks; c += 32) store8<G, VEC>(dr + c * kChunk, zero);
        } else {
          for (uint64_t j = lane; j < C; j += 32) dr[j] = Elem<G>::from_f32(0.0f);
        }
      }
      continue;
    }
    // Pass 1: max, sum of exp(z - max), sum of z.
    float m = -INFINITY, s = 0.0f, sum = 0.0f;
    if constexpr (kChunked) {
      for (uint64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
        float f[kUnroll][kChunk];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint64_t c = c0 + 32 * u;
          if (c < chunks) load8<T, VEC>(zr + c * kChunk, f[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (c0 + 32 * u < chunks) {
            float cm = f[u][0];
#pragma unroll
            for (int j = 1; j < kChunk; ++j) cm = fmaxf(cm, f[u][j]);
            float cs = 0.0f;
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              cs = __fadd_rn(cs, expf(f[u][j] - cm));
              sum = __fadd_rn(sum, f[u][j]);
            }
            if (cm == -INFINITY) cs = 0.0f;  // a chunk of -inf logits (masked classes) adds nothing
            lse_merge(m, s, cm, cs);
          }
        }
      }
    } else {
      for (uint64_t j = lane; j < C; j += 32) {
        const float v = Elem<T>::to_f32(zr[j]);
        lse_merge(m, s, v, 1.0f);
        sum = __fadd_rn(sum, v);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFullWarp, m, o);
      const float s2 = __shfl_xor_sync(kFullWarp, s, o);
      lse_merge(m, s, m2, s2);
      sum = __fadd_rn(sum, __shfl_xor_sync(kFullWarp, sum, o));
    }
    const float lse = __fadd_rn(m, logf(s));
    if (lane == 0) {
      const float zy = Elem<T>::to_f32(zr[y]);
      const float mean = __fmul_rn(sum, p.inv_c);
      partial[r] = __fadd_rn(__fmul_rn(1.0f - p.eps, lse - zy), __fmul_rn(p.eps, lse - mean));
    }
    if (dr == nullptr) continue;
    // Pass 2: dz = (exp(z - lse) - t) * w_k / n_valid (the label's element rewritten below).
    // grad_scale = 1 leaves the gradient bit for bit as without it; a power of two scales it exactly.
    const float coef = __fmul_rn(__fdiv_rn(p.weights[k], static_cast<float>(n_valid)), p.grad_scale);
    float others = 0.0f;  // sum of this lane's exp(z_j - lse), j != y
    if constexpr (kChunked) {
      for (uint64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
        float f[kUnroll][kChunk];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint64_t c = c0 + 32 * u;
          if (c < chunks) load8<T, VEC>(zr + c * kChunk, f[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint64_t c = c0 + 32 * u;
          if (c < chunks) {
            float g[kChunk];
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              const bool is_y = static_cast<int64_t>(c * kChunk + j) == y;
              const float e = expf(f[u][j] - lse);
              if (!is_y) others = __fadd_rn(others, e);
              g[j] = __fmul_rn(e - (is_y ? p.t_on : p.t_off), coef);
            }
            store8<G, VEC>(dr + c * kChunk, g);
          }
        }
      }
    } else {
      for (uint64_t j = lane; j < C; j += 32) {
        const bool is_y = static_cast<int64_t>(j) == y;
        const float e = expf(Elem<T>::to_f32(zr[j]) - lse);
        if (!is_y) others = __fadd_rn(others, e);
        dr[j] = Elem<G>::from_f32(__fmul_rn(e - (is_y ? p.t_on : p.t_off), coef));
      }
    }
    // The label's element again, as (1 - t_on) - (1 - p_y) with 1 - p_y the sum of the other
    // classes' probabilities: exp(z_y - lse) - t_on loses the digits of 1 - p_y to the rounding of
    // lse (an ulp of 1e-6 at |lse| ~ 10) on confidently classified rows. The xor tree gives every
    // lane the same sum; the lane that wrote the element rewrites it (program order).
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) others = __fadd_rn(others, __shfl_xor_sync(kFullWarp, others, o));
    const uint64_t y_lane = (kChunked ? static_cast<uint64_t>(y) / kChunk : static_cast<uint64_t>(y)) % 32;
    if (lane == y_lane) dr[y] = Elem<G>::from_f32(__fmul_rn(p.one_minus_t_on - others, coef));
  }
}

// loss = sum_k w_k * (sum_i CE_ki) / n_valid: each thread sums a fixed strided set in f64, then a
// fixed tree; the result does not depend on scheduling.
__global__ void __launch_bounds__(kReduceThreads)
    combine_kernel(const float *partial, const uint64_t *stats, float *loss, const __grid_constant__ CeParams p) {
  __shared__ double s_sum[kReduceThreads];
  if (stats[1] != kNoBadRow) return;
  const uint64_t n_valid = stats[0];
  double acc = 0.0;
  if (n_valid != 0) {
    const uint64_t rows = p.k * p.b;
    for (uint64_t r = threadIdx.x; r < rows; r += blockDim.x) {
      acc += static_cast<double>(p.weights[r / p.b]) * static_cast<double>(partial[r]);
    }
  }
  s_sum[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) s_sum[threadIdx.x] += s_sum[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = n_valid == 0 ? 0.0f : static_cast<float>(s_sum[0] / static_cast<double>(n_valid));
}

template <typename T, typename G, bool kChunked, bool VEC>
cudaError_t launch_ce(const void *logits, const int64_t *labels, void *grad, float *partial,
                      const uint64_t *stats, const CeParams &p, cudaStream_t stream) {
  auto kernel = ce_kernel<T, G, kChunked, VEC>;
  const uint64_t rows = p.k * p.b;
  const uint64_t warps_per_block = kThreads / 32;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (rows + warps_per_block - 1) / warps_per_block, &grid, 4);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, static_cast<const T *>(logits), labels,
                       static_cast<G *>(grad), partial, stats, p);
}

template <typename T, typename G>
cudaError_t launch_ce_vec(const void *logits, const int64_t *labels, void *grad, float *partial,
                          const uint64_t *stats, const CeParams &p, cudaStream_t stream) {
  if (p.c % kChunk != 0) return launch_ce<T, G, false, false>(logits, labels, grad, partial, stats, p, stream);
  const bool vec = host_aligned16(logits) && (grad == nullptr || host_aligned16(grad));
  if (vec) return launch_ce<T, G, true, true>(logits, labels, grad, partial, stats, p, stream);
  return launch_ce<T, G, true, false>(logits, labels, grad, partial, stats, p, stream);
}

// The gradient in T or f32; f32 logits (a GEMM's f32 output) also give f16 or bf16 gradients.
template <typename T>
cudaError_t launch_ce_grad(dropfuse_dtype grad_dtype, const void *logits, const int64_t *labels, void *grad,
                           float *partial, const uint64_t *stats, const CeParams &p, cudaStream_t stream) {
  if (grad_dtype == DROPFUSE_F32) return launch_ce_vec<T, float>(logits, labels, grad, partial, stats, p, stream);
  if constexpr (std::is_same<T, float>::value) {
    if (grad_dtype == DROPFUSE_F16) return launch_ce_vec<float, __half>(logits, labels, grad, partial, stats, p, stream);
    return launch_ce_vec<float, __nv_bfloat16>(logits, labels, grad, partial, stats, p, stream);
  } else {
    return launch_ce_vec<T, T>(logits, labels, grad, partial, stats, p, stream);
  }
}

// ================================ masked copies and dh ================================

// The parts of a PhiloxStream that depend on the stream offset (philox_stream in common/philox.cuh).
struct OffsetPart {
  uint32_t off_lo, off_hi, r1_z, r2_x, r2_z, r2_w;
};

struct SampleParams {
  PhiloxStream base;  // offset + 0; key and high word shared by every sample
  OffsetPart part[DROPFUSE_MULTI_SAMPLE_MAX_K];  // unused when dev.state is set
  uint64_t k;
  KeepTest keep;
  float scale;
  DeviceState dev;  // graph-safe launches: {seed, offset} in device memory, plus dev.add
};

// The per-sample stream parts make the parameters grow with DROPFUSE_MULTI_SAMPLE_MAX_K (24 bytes
// each); with the kernels' pointer and size arguments they must fit the classic 4 KB kernel
// parameter limit (raising the maximum K needs another layout, e.g. the parts in device memory).
static_assert(sizeof(SampleParams) + 4 * sizeof(uint64_t) <= 4096, "multi-sample kernel parameters above 4 KB");

SampleParams prepare_samples(const dropfuse_multi_sample_params &p) {
  SampleParams s{};
  s.dev = DeviceState{p.philox_dev, p.offset};
  s.base = philox_stream(p.seed, p.offset, 0);
  for (uint64_t k = 0; p.philox_dev == nullptr && k < p.k; ++k) {
    const PhiloxStream st = philox_stream(p.seed, p.offset + k, 0);  // wrapping, as the contract says
    s.part[k] = {st.off_lo, st.off_hi, st.r1_z, st.r2_x, st.r2_z, st.r2_w};
  }
  s.k = p.k;
  s.keep = keep_test(p.threshold);
  s.scale = p.scale;
  return s;
}

__device__ __forceinline__ PhiloxStream sample_stream(const SampleParams &p, uint64_t k) {
  PhiloxStream s = p.base;
  const OffsetPart &q = p.part[k];
  s.off_lo = q.off_lo, s.off_hi = q.off_hi, s.r1_z = q.r1_z;
  s.r2_x = q.r2_x, s.r2_z = q.r2_z, s.r2_w = q.r2_w;
  return s;
}

// The streams of a launch's samples: the host-prepared parts of SampleParams, or (kDev) the seed
// and sample 0's offset read from device memory once, at kernel start, each sample's stream
// derived from them on the device.
template <bool kDev>
struct SampleStreams {
  PhiloxStream base;  // kDev only
  uint64_t offset;    // kDev only: sample 0's offset

  __device__ __forceinline__ explicit SampleStreams(const SampleParams &p) {
    if constexpr (kDev) {
      offset = __ldg(p.dev.state + 1) + p.dev.add;
      base = philox_stream(__ldg(p.dev.state), offset, 0);
    }
  }

  __device__ __forceinline__ PhiloxStream operator()(const SampleParams &p, uint64_t k) const {
    if constexpr (kDev) {
      return philox_restream(base, offset + k);  // wrapping, as the contract says
    } else {
      return sample_stream(p, k);
    }
  }
};

// Keep bits of elements e .. e+7 (e a multiple of 8) of sample k.
template <bool kDev>
__device__ __forceinline__ uint32_t chunk_bits(const SampleParams &p, const SampleStreams<kDev> &streams, uint64_t k,
                                               uint64_t e) {
  uint32_t w[kChunk];
  element_words<kChunk, true>(streams(p, k), e, w);
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) bits |= static_cast<uint32_t>(keep_word(w[j], p.keep)) << j;
  return bits;
}

template <bool kDev>
__device__ __forceinline__ bool element_kept(const SampleParams &p, const SampleStreams<kDev> &streams, uint64_t k,
                                             uint64_t e) {
  return keep_word(element_word(streams(p, k), e), p.keep);
}

// copies[k * n + e] = keep ? h[e] * scale : +0; masks[k * words + e / 32] bit e % 32.
// kDev: graph-safe launch (SampleStreams).
template <typename T, bool VEC, bool kDev>
__global__ void __launch_bounds__(kThreads)
    copies_kernel(const T *h, T *copies, uint32_t *masks, uint64_t n, const __grid_constant__ SampleParams p) {
  const SampleStreams<kDev> streams(p);
  const uint64_t chunks = n / kChunk;
  const uint64_t words = (n + 31) >> 5;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    float x[kChunk];
    load8<T, VEC>(h + c * kChunk, x);
    for (uint64_t k = 0; k < p.k; ++k) {
      const uint32_t bits = chunk_bits(p, streams, k, c * kChunk);
      float f[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) f[j] = (bits >> j) & 1u ? __fmul_rn(x[j], p.scale) : 0.0f;
      store8<T, VEC>(copies + k * n + c * kChunk, f);
      if (masks != nullptr) reinterpret_cast<uint8_t *>(masks + k * words)[c] = static_cast<uint8_t>(bits);
    }
  }
  // The last n % 8 elements (one partial mask byte per sample): block 0, one thread per sample.
  const uint64_t tail = n - chunks * kChunk;
  if (blockIdx.x == 0 && tail != 0) {
    for (uint64_t k = threadIdx.x; k < p.k; k += blockDim.x) {
      uint32_t bits = 0;
      for (uint64_t j = 0; j < tail; ++j) {
        const uint64_t e = chunks * kChunk + j;
        const bool kept = element_kept(p, streams, k, e);
        bits |= static_cast<uint32_t>(kept) << j;
        copies[k * n + e] = kept ? Elem<T>::from_f32(__fmul_rn(Elem<T>::to_f32(h[e]), p.scale)) : Elem<T>::from_f32(0.0f);
      }
      if (masks != nullptr) {
        uint8_t *bytes = reinterpret_cast<uint8_t *>(masks + k * words);
        bytes[chunks] = static_cast<uint8_t>(bits);
        // Zero the rest of the last word (its unused bytes): bytes chunks+1 .. 4*words-1.
        for (uint64_t b = chunks + 1; b < 4 * words; ++b) bytes[b] = 0;
      }
    }
  }
  // n % 32 in 1..=24 with n % 8 == 0: the unused whole bytes of each sample's last word.
  if (masks != nullptr && tail == 0 && blockIdx.x == 0 && (chunks & 3u) != 0) {
    for (uint64_t k = threadIdx.x; k < p.k; k += blockDim.x) {
      uint8_t *bytes = reinterpret_cast<uint8_t *>(masks + k * words);
      for (uint64_t b = chunks; b < 4 * words; ++b) bytes[b] = 0;
    }
  }
}

// dh[e] = sum_k keep_k(e) ? grad[k * n + e] * scale : 0, ascending k, f32 (each product rounded,
// then added: acc = acc + g * scale, no FMA).
// kDev: graph-safe launch (SampleStreams; regenerated masks only).
template <typename G, typename O, bool VEC, bool kStored, bool kDev>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const G *grad, O *dh, const uint32_t *masks, uint64_t n, const __grid_constant__ SampleParams p) {
  const SampleStreams<kDev> streams(p);
  const uint64_t chunks = n / kChunk;
  const uint64_t words = (n + 31) >> 5;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    float acc[kChunk] = {};
    for (uint64_t k = 0; k < p.k; ++k) {
      uint32_t bits;
      if constexpr (kStored) {
        bits = reinterpret_cast<const uint8_t *>(masks + k * words)[c];
      } else {
        bits = chunk_bits(p, streams, k, c * kChunk);
      }
      float g[kChunk];
      load8<G, VEC>(grad + k * n + c * kChunk, g);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if ((bits >> j) & 1u) acc[j] = __fadd_rn(acc[j], __fmul_rn(g[j], p.scale));
      }
    }
    store8<O, VEC>(dh + c * kChunk, acc);
  }
  const uint64_t tail = n - chunks * kChunk;
  if (blockIdx.x == 0 && threadIdx.x < tail) {
    const uint64_t e = chunks * kChunk + threadIdx.x;
    float acc = 0.0f;
    for (uint64_t k = 0; k < p.k; ++k) {
      bool kept;
      if constexpr (kStored) {
        kept = (masks[k * words + (e >> 5)] >> (e & 31u)) & 1u;
      } else {
        kept = element_kept(p, streams, k, e);
      }
      if (kept) acc = __fadd_rn(acc, __fmul_rn(Elem<G>::to_f32(grad[k * n + e]), p.scale));
    }
    dh[e] = Elem<O>::from_f32(acc);
  }
}

// mean[e] = (sum_k z[k * n + e]) * (1 / K), ascending k, f32 (1 / K rounded once to f32).
template <typename T, typename O, bool VEC>
__global__ void __launch_bounds__(kThreads) mean_kernel(const T *z, O *mean, uint64_t k_count, float inv_k, uint64_t n) {
  const uint64_t chunks = n / kChunk;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    float acc[kChunk] = {};
#pragma unroll 1
    for (uint64_t k = 0; k < k_count; ++k) {
      float f[kChunk];
      load8<T, VEC>(z + k * n + c * kChunk, f);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) acc[j] = __fadd_rn(acc[j], f[j]);
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) acc[j] = __fmul_rn(acc[j], inv_k);
    store8<O, VEC>(mean + c * kChunk, acc);
  }
  const uint64_t tail = n - chunks * kChunk;
  if (blockIdx.x == 0 && threadIdx.x < tail) {
    const uint64_t e = chunks * kChunk + threadIdx.x;
    float acc = 0.0f;
    for (uint64_t k = 0; k < k_count; ++k) acc = __fadd_rn(acc, Elem<T>::to_f32(z[k * n + e]));
    mean[e] = Elem<O>::from_f32(__fmul_rn(acc, inv_k));
  }
}

// Grid for a chunk kernel over n elements (at least one block, for the tails).
template <typename Kernel>
cudaError_t chunk_grid(Kernel kernel, uint64_t n, unsigned *grid) {
  const uint64_t chunks = n / kChunk;
  return wave_grid(kernel, kThreads, (chunks + kThreads - 1) / kThreads, grid, 8);
}

template <typename T>
cudaError_t launch_copies(const void *h, void *copies, uint32_t *masks, uint64_t n, const SampleParams &p,
                          cudaStream_t stream) {
  const bool vec = n % kChunk == 0 && host_aligned16(h) && host_aligned16(copies);
  const bool dev = p.dev.state != nullptr;
  auto kernel = vec ? (dev ? copies_kernel<T, true, true> : copies_kernel<T, true, false>)
                    : (dev ? copies_kernel<T, false, true> : copies_kernel<T, false, false>);
  unsigned grid = 0;
  const cudaError_t err = chunk_grid(kernel, n, &grid);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, static_cast<const T *>(h), static_cast<T *>(copies), masks,
                       n, p);
}

template <typename G, typename O, bool VEC>
cudaError_t launch_reduce3(const void *grad, void *dh, const uint32_t *masks, uint64_t n, const SampleParams &p,
                           cudaStream_t stream) {
  unsigned grid = 0;
  cudaError_t err;
  if (masks != nullptr) {
    auto kernel = reduce_kernel<G, O, VEC, true, false>;
    err = chunk_grid(kernel, n, &grid);
    if (err != cudaSuccess) return err;
    err = launch_kernel(kernel, grid, kThreads, 0, stream, static_cast<const G *>(grad), static_cast<O *>(dh), masks, n,
                        p);
  } else {
    auto kernel = p.dev.state != nullptr ? reduce_kernel<G, O, VEC, false, true> : reduce_kernel<G, O, VEC, false, false>;
    err = chunk_grid(kernel, n, &grid);
    if (err != cudaSuccess) return err;
    err = launch_kernel(kernel, grid, kThreads, 0, stream, static_cast<const G *>(grad), static_cast<O *>(dh), masks, n,
                        p);
  }
  return err;
}

template <typename G, typename O>
cudaError_t launch_reduce2(const void *grad, void *dh, const uint32_t *masks, uint64_t n, const SampleParams &p,
                           cudaStream_t stream) {
  const bool vec = n % kChunk == 0 && host_aligned16(grad) && host_aligned16(dh);
  if (vec) return launch_reduce3<G, O, true>(grad, dh, masks, n, p, stream);
  return launch_reduce3<G, O, false>(grad, dh, masks, n, p, stream);
}

template <typename G>
cudaError_t launch_reduce1(dropfuse_dtype out, const void *grad, void *dh, const uint32_t *masks, uint64_t n,
                           const SampleParams &p, cudaStream_t stream) {
  switch (out) {
    case DROPFUSE_F32:
      return launch_reduce2<G, float>(grad, dh, masks, n, p, stream);
    case DROPFUSE_F16:
      return launch_reduce2<G, __half>(grad, dh, masks, n, p, stream);
    case DROPFUSE_BF16:
      return launch_reduce2<G, __nv_bfloat16>(grad, dh, masks, n, p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename O>
cudaError_t launch_mean2(const void *z, void *mean, uint64_t k, uint64_t n, cudaStream_t stream) {
  const bool vec = n % kChunk == 0 && host_aligned16(z) && host_aligned16(mean);
  unsigned grid = 0;
  cudaError_t err;
  if (vec) {
    err = chunk_grid(mean_kernel<T, O, true>, n, &grid);
    if (err != cudaSuccess) return err;
    err = launch_kernel(mean_kernel<T, O, true>, grid, kThreads, 0, stream, static_cast<const T *>(z),
                        static_cast<O *>(mean), k, static_cast<float>(1.0 / static_cast<double>(k)), n);
  } else {
    err = chunk_grid(mean_kernel<T, O, false>, n, &grid);
    if (err != cudaSuccess) return err;
    err = launch_kernel(mean_kernel<T, O, false>, grid, kThreads, 0, stream, static_cast<const T *>(z),
                        static_cast<O *>(mean), k, static_cast<float>(1.0 / static_cast<double>(k)), n);
  }
  return err;
}

template <typename T>
cudaError_t launch_mean1(dropfuse_dtype out, const void *z, void *mean, uint64_t k, uint64_t n, cudaStream_t stream) {
  if (out == DROPFUSE_F32) return launch_mean2<T, float>(z, mean, k, n, stream);
  return launch_mean2<T, T>(z, mean, k, n, stream);
}

bool valid_dtype(dropfuse_dtype d) { return d == DROPFUSE_F32 || d == DROPFUSE_F16 || d == DROPFUSE_BF16; }

bool misaligned4(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 3u) != 0; }

// A device Philox state must be 8-byte aligned (null: the host values apply).
bool misaligned8(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 7u) != 0; }

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" uint64_t dropfuse_weighted_ce_scratch_bytes(uint64_t k, uint64_t b) { return 16 + 4 * k * b; }

extern "C" int dropfuse_weighted_ce(dropfuse_dtype dtype, const void *logits, const int64_t *labels, float *loss,
                                    dropfuse_dtype grad_dtype, void *grad, void *scratch,
                                    const dropfuse_weighted_ce_params *params, dropfuse_stream_t stream) {
  return dropfuse_weighted_ce_scaled(dtype, logits, labels, loss, grad_dtype, grad, scratch, params, 1.0f, 0, stream);
}

extern "C" int dropfuse_weighted_ce_scaled(dropfuse_dtype dtype, const void *logits, const int64_t *labels,
                                           float *loss, dropfuse_dtype grad_dtype, void *grad, void *scratch,
                                           const dropfuse_weighted_ce_params *params, float grad_scale,
                                           int zero_grad_on_bad_label, dropfuse_stream_t stream) {
  if (params == nullptr || !(grad_scale > 0.0f && grad_scale <= FLT_MAX)) return cudaErrorInvalidValue;
  const dropfuse_weighted_ce_params &q = *params;
  if (q.k == 0 || q.b == 0 || q.c == 0) return cudaSuccess;
  if (logits == nullptr || labels == nullptr || loss == nullptr || scratch == nullptr) return cudaErrorInvalidValue;
  if (q.k > DROPFUSE_WEIGHTED_CE_MAX_K || !valid_dtype(dtype) || misaligned4(loss) ||
      (reinterpret_cast<uintptr_t>(scratch) & 7u) != 0 || (reinterpret_cast<uintptr_t>(labels) & 7u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (grad != nullptr && (!valid_dtype(grad_dtype) ||
                          (grad_dtype != DROPFUSE_F32 && grad_dtype != dtype && dtype != DROPFUSE_F32))) {
    return cudaErrorInvalidValue;
  }
  CeParams p{};
  p.k = q.k, p.b = q.b, p.c = q.c;
  p.ignore_index = q.ignore_index;
  const double eps = q.label_smoothing, c = static_cast<double>(q.c);
  p.eps = static_cast<float>(eps);
  p.t_on = static_cast<float>(1.0 - eps * (c - 1.0) / c);
  p.t_off = static_cast<float>(eps / c);
  p.one_minus_t_on = static_cast<float>(eps * (c - 1.0) / c);
  p.inv_c = static_cast<float>(1.0 / c);
  p.grad_scale = grad_scale;
  p.zero_on_bad = zero_grad_on_bad_label != 0;
  for (uint64_t k = 0; k < q.k; ++k) p.weights[k] = q.weights[k];
  uint64_t *stats = static_cast<uint64_t *>(scratch);
  float *partial = reinterpret_cast<float *>(stats + 2);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  cudaError_t err = launch_kernel(labels_kernel, 1, kReduceThreads, 0, s, labels, q.b, q.c, q.ignore_index, stats);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DROPFUSE_F32:
      err = launch_ce_grad<float>(grad_dtype, logits, labels, grad, partial, stats, p, s);
      break;
    case DROPFUSE_F16:
      err = launch_ce_grad<__half>(grad_dtype, logits, labels, grad, partial, stats, p, s);
      break;
    case DROPFUSE_BF16:
      err = launch_ce_grad<__nv_bfloat16>(grad_dtype, logits, labels, grad, partial, stats, p, s);
      break;
  }
  if (err != cudaSuccess) return err;
  return launch_kernel(combine_kernel, 1, kReduceThreads, 0, s, partial, stats, loss, p);
}

extern "C" int dropfuse_multi_sample_copies(dropfuse_dtype dtype, const void *h, void *copies, uint32_t *masks,
                                            uint64_t n, const dropfuse_multi_sample_params *params,
                                            dropfuse_stream_t stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  if (n == 0 || params->k == 0) return cudaSuccess;
  if (h == nullptr || copies == nullptr || params->k > DROPFUSE_MULTI_SAMPLE_MAX_K || !valid_dtype(dtype) ||
      (masks != nullptr && misaligned4(masks)) || misaligned8(params->philox_dev)) {
    return cudaErrorInvalidValue;
  }
  const SampleParams p = prepare_samples(*params);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_copies<float>(h, copies, masks, n, p, s);
    case DROPFUSE_F16:
      return launch_copies<__half>(h, copies, masks, n, p, s);
    case DROPFUSE_BF16:
      return launch_copies<__nv_bfloat16>(h, copies, masks, n, p, s);
  }
  return cudaErrorInvalidValue;
}

extern "C" int dropfuse_multi_sample_reduce(dropfuse_dtype grad_dtype, const void *grads, dropfuse_dtype out_dtype,
                                            void *dh, const uint32_t *masks, uint64_t n,
                                            const dropfuse_multi_sample_params *params, dropfuse_stream_t stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  if (n == 0 || params->k == 0) return cudaSuccess;
  if (grads == nullptr || dh == nullptr || params->k > DROPFUSE_MULTI_SAMPLE_MAX_K || !valid_dtype(grad_dtype) ||
      !valid_dtype(out_dtype) || (masks != nullptr && misaligned4(masks)) || misaligned8(params->philox_dev)) {
    return cudaErrorInvalidValue;
  }
  const SampleParams p = prepare_samples(*params);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (grad_dtype) {
    case DROPFUSE_F32:
      return launch_reduce1<float>(out_dtype, grads, dh, masks, n, p, s);
    case DROPFUSE_F16:
      return launch_reduce1<__half>(out_dtype, grads, dh, masks, n, p, s);
    case DROPFUSE_BF16:
      return launch_reduce1<__nv_bfloat16>(out_dtype, grads, dh, masks, n, p, s);
  }
  return cudaErrorInvalidValue;
}

extern "C" int dropfuse_multi_sample_mean(dropfuse_dtype dtype, const void *logits, dropfuse_dtype out_dtype,
                                          void *mean, uint64_t k, uint64_t n, dropfuse_stream_t stream) {
  if (n == 0 || k == 0) return cudaSuccess;
  if (logits == nullptr || mean == nullptr || !valid_dtype(dtype) ||
      (out_dtype != DROPFUSE_F32 && out_dtype != dtype)) {
    return cudaErrorInvalidValue;
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_mean1<float>(out_dtype, logits, mean, k, n, s);
    case DROPFUSE_F16:
      return launch_mean1<__half>(out_dtype, logits, mean, k, n, s);
    case DROPFUSE_BF16:
      return launch_mean1<__nv_bfloat16>(out_dtype, logits, mean, k, n, s);
  }
  return cudaErrorInvalidValue;
}
