// Monte-Carlo dropout (the contract: src/reference/mc_dropout.rs, kernels/dropfuse.h):
//   - replicated forward: R dropout replicas of a batch in one launch. Each lane loads its chunk of
//     x once and writes it R times, replica t drawing its words from stream offset + t (the
//     offset-dependent parts of the Philox stream are recomputed per replica on the device), so x
//     is read from memory once. Graph-safe launches (philox_dev) read the seed and the base offset
//     from device memory once per thread at kernel start: replica t uses philox_dev[1] +
//     params.offset + t;
//   - streaming predictive summaries in f32: a push kernel (one block per row) updating the
//     per-(b, c) Welford mean / M2 and the row's running mean of sample entropies, optionally after
//     a validation pass; a finish kernel for the variance, the predictive entropy and BALD.
// Arithmetic with explicit _rn intrinsics (no FMA contraction), in the order point 7 of the
// reference assumes: Welford per value, per-sample entropies summed per thread in ascending class
// order and then over the block in a fixed tree, logf.
#include <float.h>
#include <stdint.h>

#include <algorithm>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullWarp = 0xffffffffu;

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

// Most blocks of the per-row summary kernels (they grid-stride over the rows beyond it). A macro so
// that the host emulation (tests/host_emu/mc_dropout_emu.cpp) can make the row loops wrap.
#ifndef DROPFUSE_MC_MAX_ROW_BLOCKS
#define DROPFUSE_MC_MAX_ROW_BLOCKS (1u << 20)
#endif

// ------------------------------------------------------------------------------------------------
// Replicated forward.

struct ReplicaParams {
  PhiloxStream philox;  // replica 0's stream (host-prepared; unused when dev.state is set)
  DeviceState dev;      // graph-safe launches: {seed, offset} in device memory, plus dev.add
  uint64_t offset;      // replica 0's offset
  uint64_t element_offset;
  KeepTest keep;
  float scale;
};

// kDev: the seed and replica 0's offset come from device memory (graph-safe launches), read once
// per thread; the host path keeps its host-prepared stream as a kernel parameter.
template <typename T, bool VEC, bool kMask, bool kBlockAligned, bool kDev>
__global__ void __launch_bounds__(kThreads)
    replicas_kernel(const T *x, T *y, uint32_t *masks, uint64_t n, uint64_t replicas,
                    const __grid_constant__ ReplicaParams p) {
  PhiloxStream dev_base;
  uint64_t dev_offset = 0;
  if constexpr (kDev) {
    dev_offset = __ldg(p.dev.state + 1) + p.dev.add;
    dev_base = philox_stream(__ldg(p.dev.state), dev_offset, p.element_offset);
  }
  // Replica t's stream.
  auto replica_stream = [&](uint64_t t) {
    if constexpr (kDev) {
      return philox_restream(dev_base, dev_offset + t);
    } else {
      return philox_restream(p.philox, p.offset + t);
    }
  };
  constexpr int V = VecWidth<T>::value;
  constexpr int G = 32 / V;
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t words = n >> 5;
  const uint64_t mask_words = (n + 31) >> 5;
  const uint64_t chunks = words * G;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t base = static_cast<uint64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u); base < chunks;
       base += stride) {
    const uint64_t c = base + lane;
    const bool active = c < chunks;
    T v[V];
    if (active) load_elems<T, V, VEC>(x + c * V, v);
    for (uint64_t t = 0; t < replicas; ++t) {
      const PhiloxStream s = replica_stream(t);
      uint32_t bits = 0;
      if (active) {
        uint32_t w[V];
        element_words<V, kBlockAligned>(s, p.element_offset + c * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) bits |= static_cast<uint32_t>(keep_word(w[j], p.keep)) << j;
        float f[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float sc = __fmul_rn(Elem<T>::to_f32(v[j]), p.scale);
          f[j] = (bits >> j) & 1u ? sc : 0.0f;
        }
        T out[V];
        Elem<T>::from_f32(f, out);
        store_elems<T, V, VEC>(y + t * n + c * V, out);
      }
      if constexpr (kMask) {
        uint32_t *m = masks + t * mask_words;
        if constexpr (V == 8) {
          if (active) reinterpret_cast<uint8_t *>(m)[c] = static_cast<uint8_t>(bits);
        } else {
          uint32_t word = bits << ((lane % G) * V);
#pragma unroll
          for (int sh = 1; sh < G; sh <<= 1) word |= __shfl_xor_sync(kFullWarp, word, sh);
          if (active && lane % G == 0) m[c * V >> 5] = word;
        }
      }
    }
  }
  // The partial last word of every replica: warp 0 of block 0.
  if (blockIdx.x == 0 && threadIdx.x < 32 && (n & 31u) != 0) {
    const uint64_t i = (words << 5) + lane;
    const bool active = i < n;
    for (uint64_t t = 0; t < replicas; ++t) {
      const PhiloxStream s = replica_stream(t);
      bool keep = false;
      if (active) {
        keep = keep_word(element_word(s, p.element_offset + i), p.keep);
        const float sc = __fmul_rn(Elem<T>::to_f32(x[i]), p.scale);
        y[t * n + i] = Elem<T>::from_f32(keep ? sc : 0.0f);
      }
      if constexpr (kMask) {
        const uint32_t word = __ballot_sync(kFullWarp, keep);
        if (lane == 0) masks[t * mask_words + words] = word;
      }
    }
  }
}

template <typename T, bool VEC, bool kMask, bool kBlockAligned>
cudaError_t launch_replicas_typed(const T *x, T *y, uint32_t *masks, uint64_t n, uint64_t replicas,
                                  const ReplicaParams &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  auto kernel = p.dev.state != nullptr ? replicas_kernel<T, VEC, kMask, kBlockAligned, true>
                                       : replicas_kernel<T, VEC, kMask, kBlockAligned, false>;
  const uint64_t chunks = (n >> 5) * (32 / V);
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, std::max<uint64_t>(1, (chunks + kThreads - 1) / kThreads), &grid, 32);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, x, y, masks, n, replicas, p);
}

template <typename T, bool kMask>
cudaError_t launch_replicas_mask(const void *x, void *y, uint32_t *masks, uint64_t n, uint64_t replicas,
                                 const ReplicaParams &p, cudaStream_t stream) {
  const T *xt = static_cast<const T *>(x);
  T *yt = static_cast<T *>(y);
  // Vectors need every replica's rows aligned: y + t * n.
  const bool vec = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0 &&
                   (n * sizeof(T)) % 16 == 0;
  const bool aligned = (p.element_offset & 3u) == 0;
  if (vec) {
    return aligned ? launch_replicas_typed<T, true, kMask, true>(xt, yt, masks, n, replicas, p, stream)
                   : launch_replicas_typed<T, true, kMask, false>(xt, yt, masks, n, replicas, p, stream);
  }
  return aligned ? launch_replicas_typed<T, false, kMask, true>(xt, yt, masks, n, replicas, p, stream)
                 : launch_replicas_typed<T, false, kMask, false>(xt, yt, masks, n, replicas, p, stream);
}

template <typename T>
cudaError_t launch_replicas(const void *x, void *y, uint32_t *masks, uint64_t n, uint64_t replicas,
                            const ReplicaParams &p, cudaStream_t stream) {
  return masks != nullptr ? launch_replicas_mask<T, true>(x, y, masks, n, replicas, p, stream)
                          : launch_replicas_mask<T, false>(x, y, masks, n, replicas, p, stream);
}

// ------------------------------------------------------------------------------------------------
// Summaries.

// Classes a thread keeps in registers across the samples of one push (C <= kThreads * kPerThread);
// larger C reads and writes the state once per sample.
constexpr int kPerThread = 8;
// Control words (kernels/dropfuse.h).
enum : int { kAccepted = 0, kRejected = 1, kFirstBad = 2, kPending = 3, kDone = 4 };

__device__ __forceinline__ float xlogx(float v) { return v > 0.0f ? __fmul_rn(v, logf(v)) : 0.0f; }

// Sum of one value per thread over the block, in a fixed order (warp trees, then warp 0 over the
// warps' sums); every thread gets the result. `scratch` holds kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v = __fadd_rn(v, __shfl_down_sync(kFullWarp, v, s));
  __syncthreads();  // scratch reuse across calls
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kThreads / 32 ? scratch[lane] : 0.0f;
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) w = __fadd_rn(w, __shfl_down_sync(kFullWarp, w, s));
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

__global__ void __launch_bounds__(kThreads)
    validate_kernel(const float *probs, uint64_t total, unsigned long long *ctl) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const float v = probs[i];
    // NaN fails both comparisons; -0.0 passes.
    if (!(v >= 0.0f && v <= FLT_MAX)) atomicMax(ctl + kPending, static_cast<unsigned long long>(total - i));
  }
}

template <bool kRegisters>
__global__ void __launch_bounds__(kThreads)
    push_kernel(const float *probs, uint64_t samples, const dropfuse_mc_state st) {
  __shared__ float scratch[kThreads / 32];
  volatile unsigned long long *vctl = st.ctl;
  const bool rejected = vctl[kPending] != 0;
  const unsigned long long accepted = vctl[kAccepted];
  const uint64_t b_count = st.batch, c_count = st.classes;
  if (!rejected) {
    for (uint64_t b = blockIdx.x; b < b_count; b += gridDim.x) {
      float *mean = st.mean + b * c_count;
      float *m2 = st.m2 + b * c_count;
      float m[kPerThread], q[kPerThread];
      if constexpr (kRegisters) {
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          const uint64_t c = threadIdx.x + static_cast<uint64_t>(k) * kThreads;
          if (c < c_count) {
            m[k] = mean[c];
            q[k] = m2[c];
          }
        }
      }
      float e = st.expected_entropy[b];
      for (uint64_t t = 0; t < samples; ++t) {
        const float kf = static_cast<float>(accepted + t + 1);
        const float *row = probs + (t * b_count + b) * c_count;
        float h = 0.0f;
        if constexpr (kRegisters) {
#pragma unroll
          for (int k = 0; k < kPerThread; ++k) {
            const uint64_t c = threadIdx.x + static_cast<uint64_t>(k) * kThreads;
            if (c < c_count) {
              const float v = __ldg(row + c);
              const float d = __fsub_rn(v, m[k]);
              m[k] = __fadd_rn(m[k], __fdiv_rn(d, kf));
              q[k] = __fadd_rn(q[k], __fmul_rn(d, __fsub_rn(v, m[k])));
              h = __fsub_rn(h, xlogx(v));
            }
          }
        } else {
          for (uint64_t c = threadIdx.x; c < c_count; c += kThreads) {
            const float v = __ldg(row + c);
            float mc = mean[c];
            const float d = __fsub_rn(v, mc);
            mc = __fadd_rn(mc, __fdiv_rn(d, kf));
            m2[c] = __fadd_rn(m2[c], __fmul_rn(d, __fsub_rn(v, mc)));
            mean[c] = mc;
            h = __fsub_rn(h, xlogx(v));
          }
        }
        const float hrow = block_sum(h, scratch);
        e = __fadd_rn(e, __fdiv_rn(__fsub_rn(hrow, e), kf));
      }
      if constexpr (kRegisters) {
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          const uint64_t c = threadIdx.x + static_cast<uint64_t>(k) * kThreads;
          if (c < c_count) {
            mean[c] = m[k];
            m2[c] = q[k];
          }
        }
      }
      if (threadIdx.x == 0) st.expected_entropy[b] = e;
    }
  }
  // The last block to finish settles the push: count it (accepted or rejected), reset the scratch.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done = atomicAdd(st.ctl + kDone, 1ull);
    if (done == gridDim.x - 1) {
      __threadfence();
      const unsigned long long pending = vctl[kPending];
      if (pending != 0) {
        const unsigned long long total = samples * b_count * c_count;
        vctl[kRejected] = vctl[kRejected] + 1;
        if (vctl[kFirstBad] == 0) vctl[kFirstBad] = total - pending + 1;
      } else {
        vctl[kAccepted] = accepted + samples;
      }
      vctl[kPending] = 0;
      vctl[kDone] = 0;
      __threadfence();
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    finish_kernel(const dropfuse_mc_state st, float *variance, float *predictive, float *mutual) {
  __shared__ float scratch[kThreads / 32];
  const unsigned long long samples = st.ctl[kAccepted];
  const float tf = samples == 0 ? __int_as_float(0x7fc00000) : static_cast<float>(samples);
  const uint64_t b_count = st.batch, c_count = st.classes;
  for (uint64_t b = blockIdx.x; b < b_count; b += gridDim.x) {
    float h = 0.0f;
    for (uint64_t c = threadIdx.x; c < c_count; c += kThreads) {
      const uint64_t i = b * c_count + c;
      variance[i] = __fdiv_rn(st.m2[i], tf);
      h = __fsub_rn(h, xlogx(st.mean[i]));
    }
    const float hrow = block_sum(h, scratch);
    if (threadIdx.x == 0) {
      const float nan = __int_as_float(0x7fc00000);
      const float mi = __fsub_rn(hrow, st.expected_entropy[b]);
      predictive[b] = samples == 0 ? nan : hrow;
      mutual[b] = samples == 0 ? nan : (mi > 0.0f ? mi : 0.0f);
    }
  }
}

unsigned row_grid(uint64_t rows) { return static_cast<unsigned>(std::min<uint64_t>(rows, DROPFUSE_MC_MAX_ROW_BLOCKS)); }

// ctl must be 8-byte aligned: the push kernel updates ctl[kDone] and the validation ctl[kPending]
// with 64-bit atomics, which fault (cudaErrorMisalignedAddress, a sticky error that ends the
// context) on a misaligned word; the launchers reject it up front, as the other launchers do for
// the words they update atomically (drop_block's stats, importance's layer sums).
bool valid_state(const dropfuse_mc_state *st) {
  return st != nullptr && st->mean != nullptr && st->m2 != nullptr && st->expected_entropy != nullptr &&
         st->ctl != nullptr && (reinterpret_cast<uintptr_t>(st->ctl) & 7u) == 0 && st->batch > 0 &&
         st->classes > 0 && st->batch <= UINT64_MAX / st->classes;
}

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_mc_dropout_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *masks, uint64_t n,
                                           uint64_t replicas, const dropfuse_dropout_params *params,
                                           dropfuse_stream_t stream) {
  if (n == 0 || replicas == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr || params == nullptr) return cudaErrorInvalidValue;
  if (masks != nullptr && (reinterpret_cast<uintptr_t>(masks) & 3u) != 0) return cudaErrorInvalidValue;
  // A device Philox state must be 8-byte aligned (null: the host values apply).
  if ((reinterpret_cast<uintptr_t>(params->philox_dev) & 7u) != 0) return cudaErrorInvalidValue;
  const ReplicaParams p{philox_stream(params->seed, params->offset, params->element_offset),
                        DeviceState{params->philox_dev, params->offset},
                        params->offset,
                        params->element_offset,
                        keep_test(params->threshold),
                        params->scale};
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_replicas<float>(x, y, masks, n, replicas, p, stream);
    case DROPFUSE_F16:
      return launch_replicas<__half>(x, y, masks, n, replicas, p, stream);
    case DROPFUSE_BF16:
      return launch_replicas<__nv_bfloat16>(x, y, masks, n, replicas, p, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" int dropfuse_mc_summary_push(const float *probs, uint64_t samples, int check,
                                        const dropfuse_mc_state *state, dropfuse_stream_t stream) {
  if (samples == 0) return cudaSuccess;
  if (probs == nullptr || !valid_state(state)) return cudaErrorInvalidValue;
  const dropfuse_mc_state st = *state;
  const uint64_t per = st.batch * st.classes;
  if (samples > UINT64_MAX / per) return cudaErrorInvalidValue;
  if (check) {
    const uint64_t total = samples * per;
    unsigned grid = 0;
    cudaError_t err = wave_grid(validate_kernel, kThreads, (total + kThreads - 1) / kThreads, &grid, 8);
    if (err != cudaSuccess) return err;
    err = launch_kernel(validate_kernel, grid, kThreads, 0, stream, probs, total, st.ctl);
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = row_grid(st.batch);
  if (st.classes <= static_cast<uint64_t>(kThreads) * kPerThread)
    return launch_kernel(push_kernel<true>, grid, kThreads, 0, stream, probs, samples, st);
  return launch_kernel(push_kernel<false>, grid, kThreads, 0, stream, probs, samples, st);
}

extern "C" int dropfuse_mc_summary_finish(const dropfuse_mc_state *state, float *variance, float *predictive_entropy,
                                          float *mutual_information, dropfuse_stream_t stream) {
  if (!valid_state(state) || variance == nullptr || predictive_entropy == nullptr || mutual_information == nullptr)
    return cudaErrorInvalidValue;
  return launch_kernel(finish_kernel, row_grid(state->batch), kThreads, 0, stream, *state, variance,
                       predictive_entropy, mutual_information);
}
