// Structured dropout: channel (spatial), locked (variational) and embedding-row dropout, one
// decision per group of elements (the contract: src/reference/structured.rs, kernels/dropfuse.h).
//
// The launcher normalises the layout (extent-1 groups removed, adjacent groups of the same kind
// merged) and picks one of four paths:
//   - every group non-shared: plain dropout (decision = element), the dropout launchers themselves;
//   - planes [P non-shared, S shared] or [S shared] (channel dropout, embedding rows, one decision
//     for the whole tensor): decision = plane index. Warps take (plane, segment) work items; the
//     lanes of a warp draw the 32 decisions of the plane's mask word, so the warp that takes the
//     first segment of a plane 32k writes mask word k (no atomics, one launch), and a dropped
//     plane is written as zeros without reading x;
//   - locked along the outer axis [T shared, H non-shared] ((T, B, H) locked on time): each thread
//     draws V consecutive decisions once (one Philox block per 4 decisions) and applies them to
//     its chunk of every row of a slice of T;
//   - anything else (at most DROPFUSE_STRUCTURED_MAX_GROUPS groups): a general kernel that
//     decomposes each chunk's first element over the groups and steps the decision index along
//     the chunk, drawing one Philox block per 4 consecutive decisions (mask-free) or reading the
//     decision mask; with a mask the forward is the dropout mask kernel on the decisions followed by
//     the mask-apply kernel.
// All indices are 64-bit. Vector (16-byte) accesses when aligned, scalar otherwise.
// Graph-safe launches (params->philox_dev, kernels/dropfuse.h): the dropout launchers honour it
// themselves; the kernels here have variants (kDev) that compute the Philox stream from device
// memory once per thread at kernel start, while the host path keeps its host-prepared stream as a
// __grid_constant__ parameter (as dropout.cu does). Applying a stored mask draws nothing: one
// instantiation.
#include <stdint.h>

#include <algorithm>

#include "common/launch.cuh"
#include "common/philox.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGroups = DROPFUSE_STRUCTURED_MAX_GROUPS;
constexpr unsigned kFullWarp = 0xffffffffu;
// Vectors per lane in flight in the streaming loops.
constexpr int kUnroll = 4;
// Rows per thread per iteration in the locked kernel.
constexpr int kRowUnroll = 4;

// Every launch (`launch_kernel`): the host emulation (tests/host_emu/cuda_fiber_emu.h) defines it
// before including this file.
#ifndef DROPFUSE_HOST_EMULATION
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

enum class Mode {
  ForwardMask,    // y = dropout(x), write the decision mask
  ForwardNoMask,  // y = dropout(x); also the mask-free backward
  ApplyMask,      // y = x * scale where the stored decision bit is set
};

struct Params {
  PhiloxStream philox;  // host-prepared; unused when dev.state is set
  DeviceState dev;      // graph-safe launches: {seed, offset} in device memory, plus dev.add
  uint64_t decision_offset;
  KeepTest keep;
  float scale;
};

Params prepare(const dropfuse_dropout_params &p) {
  return {philox_stream(p.seed, p.offset, p.element_offset), DeviceState{p.philox_dev, p.offset}, p.element_offset,
          keep_test(p.threshold), p.scale};
}

// The normalised layout, innermost group first (constant indices in the unrolled loops).
struct Groups {
  uint32_t n;
  uint64_t ext[kMaxGroups];
  uint64_t ds[kMaxGroups];  // decision stride, 0 for a shared group
};

__device__ __forceinline__ uint64_t umin(uint64_t a, uint64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ T scaled(T v, float scale) {
  return Elem<T>::from_f32(__fmul_rn(Elem<T>::to_f32(v), scale));
}

template <typename T>
__device__ __forceinline__ T scaled_or_zero(T v, bool keep, float scale) {
  return keep ? scaled(v, scale) : Elem<T>::from_f32(0.0f);
}

// out[j] = bit j of `bits` ? x[j] * scale : +0, 16-bit results rounded in pairs.
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

template <typename T>
__device__ __forceinline__ uint4 scale_vec(uint4 raw, float scale) {
  constexpr int V = VecWidth<T>::value;
#ifdef __CUDA_ARCH__
  const T *e = reinterpret_cast<const T *>(&raw);
#else  // host C++: memcpy, no type punning (as kernels/common/vec.cuh)
  T e[V];
  memcpy(static_cast<void *>(e), &raw, 16);
#endif
  float f[V];
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = __fmul_rn(Elem<T>::to_f32(e[j]), scale);
  T out[V];
  Elem<T>::from_f32(f, out);
  uint4 r;
#ifdef __CUDA_ARCH__
  T *o = reinterpret_cast<T *>(&r);
#pragma unroll
  for (int j = 0; j < V; ++j) o[j] = out[j];
#else
  memcpy(&r, out, 16);
#endif
  return r;
}

// Vector i of the 16-byte aligned p (a uint4 view of T elements): the device code loads and
// stores it as a uint4; host C++ copies the bytes (memcpy, no type punning, as vec.cuh).
__device__ __forceinline__ uint4 vec_load(const uint4 *p, uint64_t i) {
#ifdef __CUDA_ARCH__
  return p[i];
#else
  uint4 r;
  host_vec_check(p + i);
  memcpy(&r, p + i, 16);
  return r;
#endif
}

__device__ __forceinline__ void vec_store(uint4 *p, uint64_t i, uint4 v) {
#ifdef __CUDA_ARCH__
  p[i] = v;
#else
  host_vec_check(p + i);
  memcpy(p + i, &v, 16);
#endif
}

// ------------------------------------------------------------------------------------------------
// Planes: [P planes of S elements], decision = plane.

// kDev: the Philox stream comes from device memory (graph-safe launches).
template <typename T, Mode M, bool kDev>
__global__ void __launch_bounds__(kThreads)
    planes_kernel(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, uint64_t planes, uint64_t s,
                  uint64_t parts, uint64_t seg, const __grid_constant__ Params p) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(p.dev, p.decision_offset);
  const PhiloxStream &philox = kDev ? dev_philox : p.philox;
  constexpr int V = VecWidth<T>::value;
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t items = planes * parts;
  for (uint64_t item = warp; item < items; item += warps) {
    const uint64_t q = item / parts;
    const uint64_t part = item - q * parts;
    // The decision word holding plane q: lane j draws decision (q & ~31) + j.
    uint32_t word;
    if constexpr (M == Mode::ApplyMask) {
      word = __ldg(mask_in + (q >> 5));
    } else {
      const uint64_t d = (q & ~uint64_t{31}) + lane;
      const bool k = d < planes && keep_word(element_word(philox, p.decision_offset + d), p.keep);
      word = __ballot_sync(kFullWarp, k);
      if constexpr (M == Mode::ForwardMask) {
        if (part == 0 && (q & 31u) == 0 && lane == 0) mask_out[q >> 5] = word;
      }
    }
    const bool keep = (word >> (q & 31u)) & 1u;

    const uint64_t s0 = part * seg;
    const uint64_t len = umin(seg, s - s0);
    const T *xs = x + q * s + s0;
    T *ys = y + q * s + s0;
    const uintptr_t ya = reinterpret_cast<uintptr_t>(ys);
    const uintptr_t xa = reinterpret_cast<uintptr_t>(xs);
    // Vector body iff x and y are equally misaligned (always when the tensor and S suit 16 bytes).
    const bool vec = !keep || ((xa ^ ya) & 15u) == 0;
    if (vec) {
      const uint64_t head = umin(len, ((16u - (ya & 15u)) & 15u) / sizeof(T));
      const uint64_t nvec = (len - head) / V;
      const uint64_t tail0 = head + nvec * V;
      // Head and tail: fewer than V elements each.
      if (lane < head) ys[lane] = keep ? scaled(xs[lane], p.scale) : Elem<T>::from_f32(0.0f);
      if (tail0 + lane < len) ys[tail0 + lane] = keep ? scaled(xs[tail0 + lane], p.scale) : Elem<T>::from_f32(0.0f);
      uint4 *yv = reinterpret_cast<uint4 *>(ys + head);
      if (keep) {
        const uint4 *xv = reinterpret_cast<const uint4 *>(xs + head);
        for (uint64_t b = lane; b < nvec; b += 32 * kUnroll) {
          uint4 r[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (b + u * 32 < nvec) r[u] = vec_load(xv, b + u * 32);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (b + u * 32 < nvec) vec_store(yv, b + u * 32, scale_vec<T>(r[u], p.scale));
        }
      } else {
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        for (uint64_t b = lane; b < nvec; b += 32) vec_store(yv, b, zero);
      }
    } else {
      for (uint64_t i = lane; i < len; i += 32) ys[i] = scaled(xs[i], p.scale);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Locked along the outer axis: [T rows of H], decision = e % H.

template <typename T, bool VEC, Mode M, bool kBlockAligned, bool kDev>
// (Two resident blocks per SM as the register budget: with the default, ptxas for sm_80 kept 64
// registers and spilled 8 bytes in some instantiations.)
__global__ void __launch_bounds__(kThreads, 2)
    locked_kernel(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, uint64_t rows, uint64_t h,
                  uint64_t rows_per_slice, const __grid_constant__ Params p) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(p.dev, p.decision_offset);
  const PhiloxStream &philox = kDev ? dev_philox : p.philox;
  constexpr int V = VecWidth<T>::value;
  constexpr int G = 32 / V;
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t chunks = (h + V - 1) / V;
  const uint64_t r0 = static_cast<uint64_t>(blockIdx.y) * rows_per_slice;
  const uint64_t r1 = umin(rows, r0 + rows_per_slice);
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  // Warps iterate together (the mask word is assembled with shuffles).
  for (uint64_t wbase = static_cast<uint64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u); wbase < chunks;
       wbase += stride) {
    const uint64_t c = wbase + lane;
    const bool active = c < chunks;
    const uint64_t d0 = c * V;
    const int width = active ? static_cast<int>(umin(V, h - d0)) : 0;
    uint32_t bits = 0;
    if (active) {
      if constexpr (M == Mode::ApplyMask) {
        bits = (__ldg(mask_in + (d0 >> 5)) >> (d0 & 31u)) & ((1u << V) - 1u);
      } else {
        // A partial last chunk draws the words past h too (harmless; masked off below).
        uint32_t w[V];
        element_words<V, kBlockAligned>(philox, p.decision_offset + d0, w);
#pragma unroll
        for (int j = 0; j < V; ++j) bits |= static_cast<uint32_t>(keep_word(w[j], p.keep)) << j;
      }
      if (width < V) bits &= (1u << width) - 1u;
    }
    if constexpr (M == Mode::ForwardMask) {
      if (blockIdx.y == 0) {
        uint32_t word = bits << ((lane % G) * V);
#pragma unroll
        for (int sh = 1; sh < G; sh <<= 1) word |= __shfl_xor_sync(kFullWarp, word, sh);
        if (active && lane % G == 0) mask_out[d0 >> 5] = word;
      }
    }
    if (!active) continue;
    if (VEC && width == V) {
      for (uint64_t r = r0; r < r1; r += kRowUnroll) {
        T v[kRowUnroll][V];
        if (bits != 0) {
#pragma unroll
          for (int u = 0; u < kRowUnroll; ++u)
            if (r + u < r1) load_elems<T, V, VEC>(x + (r + u) * h + d0, v[u]);
        } else {
#pragma unroll
          for (int u = 0; u < kRowUnroll; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j) v[u][j] = Elem<T>::from_f32(0.0f);
        }
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) {
          if (r + u < r1) {
            T out[V];
            scale_kept(v[u], bits, p.scale, out);
            // Addressed as 16-byte vectors (here h % V == 0 and d0 % V == 0: the index is exact):
            // through `y + (r + u) * h + d0` the compiler lost the alignment and split each
            // 16-byte store into four 4-byte ones (STG.E), while the loads stayed LDG.E.128.
            store_elems<T, V, VEC>(reinterpret_cast<T *>(reinterpret_cast<uint4 *>(y) + ((r + u) * h + d0) / V), out);
          }
        }
      }
    } else {
      for (uint64_t r = r0; r < r1; ++r) {
        for (int j = 0; j < width; ++j) {
          const uint64_t e = r * h + d0 + j;
          y[e] = scaled_or_zero(x[e], (bits >> j) & 1u, p.scale);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// General: any layout of at most kMaxGroups groups.

// Decision indices of elements e .. e + count - 1 (count <= V): decompose e, then step.
template <int V>
__device__ __forceinline__ void decisions_of(const Groups &g, uint64_t e, int count, uint64_t (&d)[V]) {
  uint64_t idx[kMaxGroups];
  uint64_t rest = e, dd = 0;
#pragma unroll
  for (int k = 0; k < kMaxGroups; ++k) {
    if (k < static_cast<int>(g.n)) {
      const uint64_t q = rest / g.ext[k];
      idx[k] = rest - q * g.ext[k];
      rest = q;
      dd += idx[k] * g.ds[k];
    }
  }
  d[0] = dd;
#pragma unroll
  for (int j = 1; j < V; ++j) {
    if (j < count) {
      // Increment the innermost index with carries.
      bool carry = true;
#pragma unroll
      for (int k = 0; k < kMaxGroups; ++k) {
        if (carry && k < static_cast<int>(g.n)) {
          if (idx[k] + 1 < g.ext[k]) {
            idx[k] += 1;
            dd += g.ds[k];
            carry = false;
          } else {
            dd -= idx[k] * g.ds[k];
            idx[k] = 0;
          }
        }
      }
      d[j] = dd;
    }
  }
}

// Keep bits of decisions d[0..count), drawing one Philox block per distinct block of 4 indices in
// a row (consecutive decisions share blocks) or reading the stored mask.
template <int V, Mode M>
__device__ __forceinline__ uint32_t keep_bits(const uint64_t (&d)[V], int count, const uint32_t *mask_in,
                                              const Params &p, const PhiloxStream &philox) {
  uint32_t bits = 0;
  if constexpr (M == Mode::ApplyMask) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < count) bits |= ((__ldg(mask_in + (d[j] >> 5)) >> (d[j] & 31u)) & 1u) << j;
  } else {
    uint64_t cached = ~uint64_t{0};
    uint4 block = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < count) {
        const uint64_t gi = p.decision_offset + d[j];
        if ((gi >> 2) != cached) {
          cached = gi >> 2;
          block = philox_block(philox, cached);
        }
        bits |= static_cast<uint32_t>(keep_word(uint4_get(block, static_cast<unsigned>(gi & 3)), p.keep)) << j;
      }
    }
  }
  return bits;
}

template <typename T, bool VEC, Mode M, bool kDev>
__global__ void __launch_bounds__(kThreads)
    general_kernel(const T *x, T *y, const uint32_t *mask_in, uint64_t n, const __grid_constant__ Groups g,
                   const __grid_constant__ Params p) {
  PhiloxStream dev_philox;
  if constexpr (kDev) dev_philox = device_stream(p.dev, p.decision_offset);
  const PhiloxStream &philox = kDev ? dev_philox : p.philox;
  constexpr int V = VecWidth<T>::value;
  const uint64_t chunks = n / V;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    T v[V];
    load_elems<T, V, VEC>(x + c * V, v);
    uint64_t d[V];
    decisions_of<V>(g, c * V, V, d);
    const uint32_t bits = keep_bits<V, M>(d, V, mask_in, p, philox);
    T out[V];
    scale_kept(v, bits, p.scale, out);
    store_elems<T, V, VEC>(y + c * V, out);
  }
  // The last n % V elements.
  if (blockIdx.x == 0 && threadIdx.x < n % V) {
    const uint64_t e = chunks * V + threadIdx.x;
    uint64_t d[V];
    decisions_of<V>(g, e, 1, d);
    const uint32_t bits = keep_bits<V, M>(d, 1, mask_in, p, philox);
    y[e] = scaled_or_zero(x[e], bits & 1u, p.scale);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

enum class Path { Dropout, Planes, Locked, General };

struct Plan {
  Path path;
  Groups inner;     // innermost first
  uint64_t outer;   // planes (Planes) or rows (Locked)
  uint64_t inner_n; // plane size S (Planes) or row length H (Locked)
};

// Validates and normalises a layout; false when it is inconsistent.
bool plan_layout(const dropfuse_structured_layout &l, Plan *out) {
  if (l.groups < 1 || l.groups > kMaxGroups) return false;
  uint64_t numel = 1, decisions = 1;
  // Check the decision strides (innermost first) and the products.
  for (int k = static_cast<int>(l.groups) - 1; k >= 0; --k) {
    const uint64_t e = l.extent[k];
    if (e == 0) return false;
    if (numel > UINT64_MAX / e) return false;
    numel *= e;
    if (l.decision_stride[k] != 0) {
      if (l.decision_stride[k] != decisions) return false;
      decisions *= e;  // divides numel: no overflow
    }
  }
  if (numel != l.numel || decisions != l.decisions) return false;
  // Normalise (innermost first): drop extent-1 groups, merge neighbours of the same kind.
  Groups g{};
  bool shared_kind[kMaxGroups] = {};
  g.n = 0;
  for (int k = static_cast<int>(l.groups) - 1; k >= 0; --k) {
    const uint64_t e = l.extent[k];
    if (e == 1) continue;
    const bool shared = l.decision_stride[k] == 0;
    if (g.n > 0 && shared_kind[g.n - 1] == shared) {
      g.ext[g.n - 1] *= e;
    } else {
      g.ext[g.n] = e;
      shared_kind[g.n] = shared;
      ++g.n;
    }
  }
  uint64_t stride = 1;
  bool any_shared = false;
  for (uint32_t k = 0; k < g.n; ++k) {
    if (shared_kind[k]) {
      g.ds[k] = 0;
      any_shared = true;
    } else {
      g.ds[k] = stride;
      stride *= g.ext[k];
    }
  }
  if (g.n == 0) {  // every extent 1: one element, one decision
    g.n = 1;
    g.ext[0] = 1;
    g.ds[0] = 1;
  }
  Plan plan{};
  plan.inner = g;
  if (!any_shared) {
    plan.path = Path::Dropout;
  } else if (shared_kind[0] && (g.n == 1 || (g.n == 2 && !shared_kind[1]))) {
    plan.path = Path::Planes;
    plan.inner_n = g.ext[0];
    plan.outer = g.n == 2 ? g.ext[1] : 1;
  } else if (g.n == 2 && !shared_kind[0] && shared_kind[1]) {
    plan.path = Path::Locked;
    plan.inner_n = g.ext[0];
    plan.outer = g.ext[1];
  } else {
    plan.path = Path::General;
  }
  *out = plan;
  return true;
}

// Resident warps of the whole GPU for a kernel (for sizing work items).
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, uint64_t *blocks) {
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  *blocks = static_cast<uint64_t>(std::max(sms, 1)) * static_cast<uint64_t>(std::max(per_sm, 1));
  return cudaSuccess;
}

template <typename T, Mode M>
cudaError_t launch_planes(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, const Plan &plan,
                          const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  auto kernel = p.dev.state != nullptr ? planes_kernel<T, M, M != Mode::ApplyMask> : planes_kernel<T, M, false>;
  uint64_t resident = 0;
  cudaError_t err = resident_blocks(kernel, &resident);
  if (err != cudaSuccess) return err;
  const uint64_t warp_slots = resident * (kThreads / 32);
  const uint64_t planes = plan.outer, s = plan.inner_n;
  // Segments of at least 2 KiB (4 vectors per lane), enough items for 4 per resident warp.
  const uint64_t min_seg = std::max<uint64_t>(2048 / sizeof(T), V);
  const uint64_t max_parts = std::max<uint64_t>(1, s / min_seg);
  const uint64_t want = 4 * warp_slots;
  const uint64_t parts = std::min(max_parts, std::max<uint64_t>(1, (want + planes - 1) / planes));
  uint64_t seg = (s + parts - 1) / parts;
  seg = (seg + V - 1) / V * V;
  const uint64_t used_parts = (s + seg - 1) / seg;
  const uint64_t items = planes * used_parts;
  const uint64_t warps_per_block = kThreads / 32;
  unsigned grid = 0;
  err = wave_grid(kernel, kThreads, (items + warps_per_block - 1) / warps_per_block, &grid, 32);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, x, y, mask_out, mask_in, planes, s, used_parts, seg, p);
}

template <typename T, bool VEC, Mode M, bool kBlockAligned>
cudaError_t launch_locked_typed(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, const Plan &plan,
                                const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  auto kernel = p.dev.state != nullptr ? locked_kernel<T, VEC, M, kBlockAligned, M != Mode::ApplyMask>
                                       : locked_kernel<T, VEC, M, kBlockAligned, false>;
  uint64_t resident = 0;
  cudaError_t err = resident_blocks(kernel, &resident);
  if (err != cudaSuccess) return err;
  const uint64_t rows = plan.outer, h = plan.inner_n;
  const uint64_t chunks = (h + V - 1) / V;
  const uint64_t gx = std::min<uint64_t>((chunks + kThreads - 1) / kThreads, 1u << 30);
  // Enough slices of rows for 4 waves, at least kRowUnroll rows per slice where possible.
  const uint64_t want = 4 * resident;
  uint64_t slices = std::max<uint64_t>(1, (want + gx - 1) / gx);
  slices = std::min<uint64_t>(slices, std::max<uint64_t>(1, rows / kRowUnroll));
  slices = std::min<uint64_t>(slices, 65535);
  const uint64_t per = (rows + slices - 1) / slices;
  const uint64_t gy = (rows + per - 1) / per;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return launch_kernel(kernel, grid, kThreads, 0, stream, x, y, mask_out, mask_in, rows, h, per, p);
}

// Only for decision offsets that are multiples of 4 (each chunk's decisions are whole Philox
// blocks); other offsets take the general kernel.
template <typename T, Mode M>
cudaError_t launch_locked(const T *x, T *y, uint32_t *mask_out, const uint32_t *mask_in, const Plan &plan,
                          const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0 &&
                   plan.inner_n % V == 0;
  return vec ? launch_locked_typed<T, true, M, true>(x, y, mask_out, mask_in, plan, p, stream)
             : launch_locked_typed<T, false, M, true>(x, y, mask_out, mask_in, plan, p, stream);
}

template <typename T, bool VEC, Mode M>
cudaError_t launch_general_typed(const T *x, T *y, const uint32_t *mask_in, uint64_t n, const Plan &plan,
                                 const Params &p, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  auto kernel = p.dev.state != nullptr ? general_kernel<T, VEC, M, M != Mode::ApplyMask>
                                       : general_kernel<T, VEC, M, false>;
  const uint64_t chunks = std::max<uint64_t>(1, n / V);
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (chunks + kThreads - 1) / kThreads, &grid, 32);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, x, y, mask_in, n, plan.inner, p);
}

template <typename T, Mode M>
cudaError_t launch_general(const T *x, T *y, const uint32_t *mask_in, uint64_t n, const Plan &plan, const Params &p,
                           cudaStream_t stream) {
  const bool vec = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0;
  return vec ? launch_general_typed<T, true, M>(x, y, mask_in, n, plan, p, stream)
             : launch_general_typed<T, false, M>(x, y, mask_in, n, plan, p, stream);
}

// Forward (with or without a mask) and apply-mask on a planned, non-dropout layout.
template <typename T>
cudaError_t launch_typed(const void *xv, void *yv, uint32_t *mask_out, const uint32_t *mask_in, Mode mode,
                         const dropfuse_structured_layout &l, const Plan &plan, const dropfuse_dropout_params &dp,
                         cudaStream_t stream) {
  const T *x = static_cast<const T *>(xv);
  T *y = static_cast<T *>(yv);
  const Params p = prepare(dp);
  switch (plan.path) {
    case Path::Planes:
      if (mode == Mode::ForwardMask) return launch_planes<T, Mode::ForwardMask>(x, y, mask_out, nullptr, plan, p, stream);
      if (mode == Mode::ForwardNoMask) return launch_planes<T, Mode::ForwardNoMask>(x, y, nullptr, nullptr, plan, p, stream);
      return launch_planes<T, Mode::ApplyMask>(x, y, nullptr, mask_in, plan, p, stream);
    case Path::Locked:
      if ((dp.element_offset & 3u) != 0 && mode != Mode::ApplyMask) break;  // the general kernel
      if (mode == Mode::ForwardMask) return launch_locked<T, Mode::ForwardMask>(x, y, mask_out, nullptr, plan, p, stream);
      if (mode == Mode::ForwardNoMask) return launch_locked<T, Mode::ForwardNoMask>(x, y, nullptr, nullptr, plan, p, stream);
      return launch_locked<T, Mode::ApplyMask>(x, y, nullptr, mask_in, plan, p, stream);
    default:
      break;
  }
  // General layouts (and locked ones with an unaligned decision offset).
  if (mode == Mode::ForwardMask) {
    // The decision mask, then the data from it (stream order).
    const int st = dropfuse_dropout_mask(mask_out, l.decisions, &dp, stream);
    if (st != cudaSuccess) return static_cast<cudaError_t>(st);
    return launch_general<T, Mode::ApplyMask>(x, y, mask_out, l.numel, plan, p, stream);
  }
  if (mode == Mode::ForwardNoMask) return launch_general<T, Mode::ForwardNoMask>(x, y, nullptr, l.numel, plan, p, stream);
  return launch_general<T, Mode::ApplyMask>(x, y, mask_in, l.numel, plan, p, stream);
}

cudaError_t launch_dtype(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask_out, const uint32_t *mask_in,
                         Mode mode, const dropfuse_structured_layout &l, const Plan &plan,
                         const dropfuse_dropout_params &p, cudaStream_t stream) {
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_typed<float>(x, y, mask_out, mask_in, mode, l, plan, p, stream);
    case DROPFUSE_F16:
      return launch_typed<__half>(x, y, mask_out, mask_in, mode, l, plan, p, stream);
    case DROPFUSE_BF16:
      return launch_typed<__nv_bfloat16>(x, y, mask_out, mask_in, mode, l, plan, p, stream);
  }
  return cudaErrorInvalidValue;
}

bool misaligned_mask(const uint32_t *mask) { return (reinterpret_cast<uintptr_t>(mask) & 3u) != 0; }

// A device Philox state must be 8-byte aligned (null: the host values apply).
bool bad_device_state(const dropfuse_dropout_params &p) {
  return (reinterpret_cast<uintptr_t>(p.philox_dev) & 7u) != 0;
}

bool valid_dtype(dropfuse_dtype dtype) {
  return dtype == DROPFUSE_F32 || dtype == DROPFUSE_F16 || dtype == DROPFUSE_BF16;
}

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_structured_mask(uint32_t *mask, const dropfuse_structured_layout *layout,
                                        const dropfuse_dropout_params *params, dropfuse_stream_t stream) {
  if (layout == nullptr || params == nullptr) return cudaErrorInvalidValue;
  if (layout->numel == 0) return cudaSuccess;
  Plan plan;
  if (!plan_layout(*layout, &plan) || mask == nullptr || misaligned_mask(mask) || bad_device_state(*params))
    return cudaErrorInvalidValue;
  return dropfuse_dropout_mask(mask, layout->decisions, params, stream);
}

extern "C" int dropfuse_structured_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask,
                                           const dropfuse_structured_layout *layout,
                                           const dropfuse_dropout_params *params, dropfuse_stream_t stream) {
  if (layout == nullptr || params == nullptr) return cudaErrorInvalidValue;
  if (layout->numel == 0) return cudaSuccess;
  Plan plan;
  if (!plan_layout(*layout, &plan) || x == nullptr || y == nullptr || !valid_dtype(dtype) || bad_device_state(*params))
    return cudaErrorInvalidValue;
  if (mask != nullptr && misaligned_mask(mask)) return cudaErrorInvalidValue;
  if (plan.path == Path::Dropout) return dropfuse_dropout_forward(dtype, x, y, mask, layout->numel, params, stream);
  return launch_dtype(dtype, x, y, mask, nullptr, mask != nullptr ? Mode::ForwardMask : Mode::ForwardNoMask, *layout,
                      plan, *params, stream);
}

extern "C" int dropfuse_structured_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                            const dropfuse_structured_layout *layout, float scale,
                                            dropfuse_stream_t stream) {
  if (layout == nullptr) return cudaErrorInvalidValue;
  if (layout->numel == 0) return cudaSuccess;
  Plan plan;
  if (!plan_layout(*layout, &plan) || dy == nullptr || dx == nullptr || mask == nullptr || misaligned_mask(mask) ||
      !valid_dtype(dtype))
    return cudaErrorInvalidValue;
  if (plan.path == Path::Dropout) return dropfuse_dropout_backward(dtype, dy, dx, mask, layout->numel, scale, stream);
  dropfuse_dropout_params p{};
  p.scale = scale;
  return launch_dtype(dtype, dy, dx, nullptr, mask, Mode::ApplyMask, *layout, plan, p, stream);
}
