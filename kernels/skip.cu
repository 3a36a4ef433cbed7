// Compute skipping: the fused stochastic-depth residual (forward, backward with the bias gradient in
// the fixed chunked order) and per-sample compaction (slots by an exclusive scan, gather, scatter,
// scatter-add and their backward kernels). The contract: src/reference/skip.rs, points 1-6 and 12.
//
// Work split of the row kernels (everything but the scan and the bias gradient): the B x R tensor
// is a sequence of "chunks" of V elements (one 16-byte vector: V = 8 for f16/bf16, 4 for f32, when
// every data pointer is 16-byte aligned and R % V == 0; otherwise V = 1, the scalar path), rows of
// R / V chunks. Threads grid-stride over the chunks, kUnroll of them per iteration (all loads
// issued before any store). A thread keeps each chunk's (row, chunk in row, bias position) and
// advances them by the grid stride with one carry, so the loop does no division (one per item at
// the start). A row's keep decision (flag or slot) is read once per chunk (an L1 hit, uniform over
// a warp almost everywhere); a dropped row is neither loaded nor, in place, stored, so a dropped
// sample never reads its branch. All indices are 64-bit.
//
// Every launch goes through `launch_kernel`: the host emulation (tests/host_emu/cuda_fiber_emu.h,
// tests/host_emu/skip_emu.cpp) defines it, and runs these very kernels and launchers on the CPU.
#include <stdint.h>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

#define DF_HD __device__ __forceinline__

#ifndef DROPFUSE_HOST_EMULATION
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
#endif

constexpr int kThreads = 256;
// Tuning knobs (DROPFUSE_NVCC_FLAGS="-DDROPFUSE_SKIP_UNROLL=..."); defaults chosen from the
// dropout apply kernel's measurements (a memory-bound stream of 16-byte vectors), not measured here.
#ifndef DROPFUSE_SKIP_UNROLL  // chunks per thread per grid-stride iteration
#define DROPFUSE_SKIP_UNROLL 2
#endif
#ifndef DROPFUSE_SKIP_WAVES  // grid size in waves of resident blocks (common/launch.cuh)
#define DROPFUSE_SKIP_WAVES 32
#endif
constexpr int kUnroll = DROPFUSE_SKIP_UNROLL;
constexpr uint32_t kSlotNone = DROPFUSE_SLOT_NONE;
constexpr uint64_t kChunk = DROPFUSE_D_BIAS_CHUNK;

// ---- host + device element helpers ----------------------------------------------------------

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  DF_HD static float to(float v) { return v; }
  DF_HD static float from(float v) { return v; }
};
template <>
struct Conv<__half> {
  DF_HD static float to(__half v) { return __half2float(v); }
  DF_HD static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  DF_HD static float to(__nv_bfloat16 v) { return Elem<__nv_bfloat16>::to_f32(v); }
  DF_HD static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// One f32 operation, rounded to nearest even: never contracted into an FMA (contract point 1).
DF_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
DF_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }

// Rounds V f32 values to T (pairs of 16-bit values with one packed conversion on the device).
template <typename T, int V>
DF_HD void round_to(const float (&f)[V], T (&out)[V]) {
  if constexpr (V % 2 == 0) {
    Elem<T>::from_f32(f, out);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = Conv<T>::from(f[j]);
  }
}

template <typename T, int V>
DF_HD void zeros(T (&out)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = Conv<T>::from(0.0f);
}

// V elements: one 16-byte access when VEC (the pointer is 16-byte aligned), V scalar ones otherwise.
template <typename T, int V, bool VEC>
DF_HD void load_v(const T *p, T (&out)[V]) {
  if constexpr (VEC) {
    static_assert(V * sizeof(T) == 16, "vector access is 16 bytes");
#ifdef __CUDA_ARCH__
    const uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = e[j];
#else  // host C++: memcpy, no type punning (as kernels/common/vec.cuh)
    host_vec_check(p);
    memcpy(out, p, 16);
#endif
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = p[j];
  }
}

template <typename T, int V, bool VEC>
DF_HD void store_v(T *p, const T (&in)[V]) {
  if constexpr (VEC) {
    static_assert(V * sizeof(T) == 16, "vector access is 16 bytes");
#ifdef __CUDA_ARCH__
    uint4 raw;
    T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = in[j];
    *reinterpret_cast<uint4 *>(p) = raw;
#else  // host C++: memcpy, no type punning (as kernels/common/vec.cuh)
    host_vec_check(p);
    memcpy(p, in, 16);
#endif
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = in[j];
  }
}

template <typename P>
DF_HD P load_ro(const P *p) {
  return __ldg(p);
}

// ---- row kernels ----------------------------------------------------------------------------

enum class Op {
  Depth,            // y[b] = x[b] + s * (f[b] + bias) for kept b (flags); dropped: copy unless in place
  Grad,             // y[b] = kept ? s * x[b] : +0 (flags)
  ScatterAdd,       // y[b] = x[b] + s * c[slot(b)] for kept b (slots); skipped: copy unless in place
  Gather,           // y[slot(b)] = x[b] (bit copy)
  Scatter,          // y[b] = kept ? c[slot(b)] : x[b] (bit copies; skipped: nothing in place)
  ScatterBackward,  // y2[slot(b)] = x[b]; y[b] = kept ? +0 : x[b] (skipped: nothing in place)
  CompactGrad,      // y[slot(b)] = s * x[b]
};

__host__ __device__ constexpr bool uses_slots(Op op) { return op != Op::Depth && op != Op::Grad; }

// What a chunk's row does.
enum State : int { kSkipped = 0, kKept = 1, kOverflow = 2, kIdle = 3 };

template <typename T>
struct RowArgs {
  const T *x;      // primary input: residual, d_out, the full batch x
  const T *src;    // secondary input: branch, compact rows
  T *y;            // output: residual out, d_branch, out / d_x, or compact rows (Gather, CompactGrad)
  T *y2;           // second output: the compact rows of ScatterBackward
  const T *bias;   // Depth only; P elements
  const uint8_t *flags;  // flag of row b: flags[b * flag_stride]; null: `all`
  const uint32_t *slots; // slot of row b, or kSlotNone
  uint64_t flag_stride;
  uint64_t capacity;     // rows of the compact buffer: slots >= capacity are left alone
  uint64_t row_len;
  float scale;
  int all;               // flags == null: nonzero = every row kept
  int in_place;          // y == x
};

// The grid-stride walk over (row, chunk in row), prepared on the host.
struct Walk {
  uint64_t total;        // rows * rc
  uint64_t rc;           // chunks per row
  uint64_t threads;      // threads of the grid: distance between a thread's unrolled items
  uint64_t step_b, step_r;  // the stride (threads * kUnroll) as (rows, chunks)
  uint64_t bias_period;  // bias positions: P / V chunks (vector bias) or P elements (scalar bias)
  uint64_t bias_step;    // bias position advance per stride
};

// BIAS: 0 none, 1 vector loads (P % V == 0, bias aligned), 2 scalar loads with wrap-around.
template <typename T, bool VEC, int BIAS>
Walk make_walk(uint64_t rows, uint64_t row_len, uint64_t bias_len, uint64_t threads) {
  constexpr uint64_t V = VEC ? VecWidth<T>::value : 1;
  Walk w{};
  w.rc = row_len / V;
  w.total = rows * w.rc;
  w.threads = threads;
  const uint64_t stride = threads * kUnroll;
  w.step_b = stride / w.rc;
  w.step_r = stride % w.rc;
  if (BIAS == 1) {
    w.bias_period = bias_len / V;
    w.bias_step = w.step_r % w.bias_period;
  } else if (BIAS == 2) {
    w.bias_period = bias_len;
    w.bias_step = (w.step_r * V) % bias_len;  // step_r * V < row_len: no overflow
  } else {
    w.bias_period = 1;
    w.bias_step = 0;
  }
  return w;
}

template <Op OP, typename T>
DF_HD int select_row(const RowArgs<T> &a, uint64_t b, uint64_t &row) {
  if constexpr (uses_slots(OP)) {
    const uint32_t s = load_ro(a.slots + b);
    row = s;
    if (s == kSlotNone) return kSkipped;
    return s < a.capacity ? kKept : kOverflow;
  } else {
    row = b;
    const bool kept = a.flags == nullptr ? a.all != 0 : load_ro(a.flags + b * a.flag_stride) != 0;
    return kept ? kKept : kSkipped;
  }
}

// One thread of a row kernel: thread `tid` of a grid of `w.threads`.
template <typename T, bool VEC, Op OP, int BIAS>
DF_HD void rows_thread(const RowArgs<T> &a, const Walk &w, uint64_t tid) {
  constexpr int V = VEC ? VecWidth<T>::value : 1;
  constexpr int U = kUnroll;
  const uint64_t R = a.row_len;
  uint64_t c[U], b[U], r[U], k[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    c[u] = tid + static_cast<uint64_t>(u) * w.threads;
    b[u] = c[u] / w.rc;
    r[u] = c[u] - b[u] * w.rc;
    k[u] = BIAS == 1 ? r[u] % w.bias_period : BIAS == 2 ? (r[u] * V) % w.bias_period : 0;
  }
  while (c[0] < w.total) {
    T xv[U][V], sv[U][V];
    int state[U];
    uint64_t row[U];
    // Phase 1: every load of the iteration.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      state[u] = kIdle;
      row[u] = 0;
      if (c[u] >= w.total) continue;
      state[u] = select_row<OP>(a, b[u], row[u]);
      const uint64_t j = r[u] * V;
      const bool kept = state[u] == kKept;
      const bool copy_skipped = state[u] == kSkipped && !a.in_place;
      if constexpr (OP == Op::Depth || OP == Op::ScatterAdd) {
        if (kept || copy_skipped) load_v<T, V, VEC>(a.x + b[u] * R + j, xv[u]);
        if (kept) load_v<T, V, VEC>(a.src + row[u] * R + j, sv[u]);
      } else if constexpr (OP == Op::Scatter) {
        if (copy_skipped) load_v<T, V, VEC>(a.x + b[u] * R + j, xv[u]);
        if (kept) load_v<T, V, VEC>(a.src + row[u] * R + j, sv[u]);
      } else if constexpr (OP == Op::ScatterBackward) {
        if (kept || copy_skipped) load_v<T, V, VEC>(a.x + b[u] * R + j, xv[u]);
      } else {  // Grad, Gather, CompactGrad
        if (kept) load_v<T, V, VEC>(a.x + b[u] * R + j, xv[u]);
      }
    }
    // Phase 2: compute and store.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (state[u] == kIdle || state[u] == kOverflow) continue;
      const uint64_t j = r[u] * V;
      const bool kept = state[u] == kKept;
      const bool copy_skipped = state[u] == kSkipped && !a.in_place;
      T *yb = a.y + b[u] * R + j;  // row b of y (not for Gather / CompactGrad)
      if constexpr (OP == Op::Depth || OP == Op::ScatterAdd) {
        if (kept) {
          float bf[V];
          if constexpr (BIAS == 1) {
            T bv[V];
            load_v<T, V, VEC>(a.bias + k[u] * V, bv);
#pragma unroll
            for (int e = 0; e < V; ++e) bf[e] = Conv<T>::to(bv[e]);
          } else if constexpr (BIAS == 2) {
            uint64_t kk = k[u];
#pragma unroll
            for (int e = 0; e < V; ++e) {
              bf[e] = Conv<T>::to(a.bias[kk]);
              if (++kk == w.bias_period) kk = 0;
            }
          }
          float f[V];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            float t = Conv<T>::to(sv[u][e]);
            if constexpr (BIAS != 0) t = add_rn(t, bf[e]);
            f[e] = add_rn(Conv<T>::to(xv[u][e]), mul_rn(a.scale, t));
          }
          T out[V];
          round_to(f, out);
          store_v<T, V, VEC>(yb, out);
        } else if (copy_skipped) {
          store_v<T, V, VEC>(yb, xv[u]);
        }
      } else if constexpr (OP == Op::Grad || OP == Op::CompactGrad) {
        T out[V];
        if (kept) {
          float f[V];
#pragma unroll
          for (int e = 0; e < V; ++e) f[e] = mul_rn(a.scale, Conv<T>::to(xv[u][e]));
          round_to(f, out);
        } else {
          zeros(out);
        }
        if constexpr (OP == Op::Grad) {
          store_v<T, V, VEC>(yb, out);  // dropped rows: +0
        } else if (kept) {
          store_v<T, V, VEC>(a.y + row[u] * R + j, out);
        }
      } else if constexpr (OP == Op::Gather) {
        if (kept) store_v<T, V, VEC>(a.y + row[u] * R + j, xv[u]);
      } else if constexpr (OP == Op::Scatter) {
        if (kept) {
          store_v<T, V, VEC>(yb, sv[u]);
        } else if (copy_skipped) {
          store_v<T, V, VEC>(yb, xv[u]);
        }
      } else if constexpr (OP == Op::ScatterBackward) {
        if (kept) {
          store_v<T, V, VEC>(a.y2 + row[u] * R + j, xv[u]);
          T z[V];
          zeros(z);
          store_v<T, V, VEC>(yb, z);
        } else if (copy_skipped) {
          store_v<T, V, VEC>(yb, xv[u]);
        }
      }
    }
    // Advance every item by the stride: one carry from chunks into rows.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      c[u] += w.threads * U;
      b[u] += w.step_b;
      r[u] += w.step_r;
      if (r[u] >= w.rc) {
        r[u] -= w.rc;
        ++b[u];
      }
      if constexpr (BIAS != 0) {
        k[u] += w.bias_step;
        if (k[u] >= w.bias_period) k[u] -= w.bias_period;
      }
    }
  }
}

template <typename T, bool VEC, Op OP, int BIAS>
__global__ void __launch_bounds__(kThreads) rows_kernel(const __grid_constant__ RowArgs<T> a,
                                                        const __grid_constant__ Walk w) {
  rows_thread<T, VEC, OP, BIAS>(a, w, static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, bool VEC, Op OP, int BIAS>
cudaError_t launch_rows(const RowArgs<T> &a, uint64_t rows, uint64_t bias_len, cudaStream_t stream) {
  constexpr uint64_t V = VEC ? VecWidth<T>::value : 1;
  const uint64_t total = rows * (a.row_len / V);
  const uint64_t per_block = static_cast<uint64_t>(kThreads) * kUnroll;
  auto kernel = rows_kernel<T, VEC, OP, BIAS>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (total + per_block - 1) / per_block, &grid, DROPFUSE_SKIP_WAVES);
  if (err != cudaSuccess) return err;
  const Walk w = make_walk<T, VEC, BIAS>(rows, a.row_len, bias_len, static_cast<uint64_t>(grid) * kThreads);
  return launch_kernel(kernel, grid, kThreads, 0, stream, a, w);
}

// Picks the vector path when every pointer the op touches is 16-byte aligned and rows are whole
// vectors, and for Depth the bias mode.
template <typename T, Op OP>
cudaError_t dispatch_rows(const RowArgs<T> &a, uint64_t rows, uint64_t bias_len, cudaStream_t stream) {
  constexpr uint64_t V = VecWidth<T>::value;
  const void *ptrs[] = {a.x, a.src, a.y, a.y2};
  bool vec = a.row_len % V == 0;
  for (const void *p : ptrs) vec = vec && (p == nullptr || aligned16(p));
  if constexpr (OP == Op::Depth) {
    if (a.bias != nullptr) {
      if (vec && bias_len % V == 0 && aligned16(a.bias)) return launch_rows<T, true, OP, 1>(a, rows, bias_len, stream);
      if (vec) return launch_rows<T, true, OP, 2>(a, rows, bias_len, stream);
      return launch_rows<T, false, OP, 2>(a, rows, bias_len, stream);
    }
  }
  if (vec) return launch_rows<T, true, OP, 0>(a, rows, bias_len, stream);
  return launch_rows<T, false, OP, 0>(a, rows, bias_len, stream);
}

// ---- bias gradient: partial sums per (chunk, group of W bias elements), then one pass --------

template <typename T>
struct BiasArgs {
  const T *dy;
  T *d_branch;
  float *partials;  // [chunks][P]
  const uint8_t *flags;
  uint64_t flag_stride;
  uint64_t rows;    // B
  uint64_t reps;    // R / P: terms per row and bias element
  uint64_t terms;   // M = B * reps
  uint64_t bias_len;  // P
  uint64_t groups;    // P / W
  uint64_t items;     // chunks * groups
  float scale;
  int all;
};

template <typename T>
DF_HD bool row_kept(const BiasArgs<T> &a, uint64_t b) {
  return a.flags == nullptr ? a.all != 0 : load_ro(a.flags + b * a.flag_stride) != 0;
}

// Item t: terms m = c * kChunk .. of bias elements g * W .. g * W + W - 1, where term m of bias
// element k is element m * P + k of d_out (row m / reps). Also writes d_branch of those elements.
template <typename T, int W, bool VEC>
DF_HD void bias_partials_item(const BiasArgs<T> &a, uint64_t t) {
  const uint64_t c = t / a.groups;
  const uint64_t g = t - c * a.groups;
  const uint64_t m0 = c * kChunk;
  const uint64_t m1 = m0 + kChunk < a.terms ? m0 + kChunk : a.terms;
  uint64_t b = m0 / a.reps;
  uint64_t q = m0 - b * a.reps;
  bool kept = row_kept(a, b);
  float acc[W];
#pragma unroll
  for (int w = 0; w < W; ++w) acc[w] = 0.0f;
  for (uint64_t m = m0; m < m1; ++m) {
    const uint64_t off = m * a.bias_len + g * W;
    T out[W];
    if (kept) {
      T v[W];
      load_v<T, W, VEC>(a.dy + off, v);
      float f[W];
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float d = Conv<T>::to(v[w]);
        acc[w] = add_rn(acc[w], d);
        f[w] = mul_rn(a.scale, d);
      }
      round_to(f, out);
    } else {
      zeros(out);
    }
    store_v<T, W, VEC>(a.d_branch + off, out);
    if (++q == a.reps) {
      q = 0;
      ++b;
      if (b < a.rows) kept = row_kept(a, b);
    }
  }
#pragma unroll
  for (int w = 0; w < W; ++w) a.partials[c * a.bias_len + g * W + w] = acc[w];
}

template <typename T, int W, bool VEC>
__global__ void __launch_bounds__(kThreads) bias_partials_kernel(const __grid_constant__ BiasArgs<T> a) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < a.items; t += stride) {
    bias_partials_item<T, W, VEC>(a, t);
  }
}

// d_bias[k] = round_T(scale * (+0 + partial_0 + partial_1 + ...)), partials in ascending order.
template <typename T>
DF_HD void bias_combine_item(const float *partials, T *d_bias, uint64_t bias_len, uint64_t chunks, float scale,
                             uint64_t k) {
  float total = 0.0f;
  for (uint64_t c = 0; c < chunks; ++c) total = add_rn(total, partials[c * bias_len + k]);
  d_bias[k] = Conv<T>::from(mul_rn(scale, total));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bias_combine_kernel(const float *partials, T *d_bias, uint64_t bias_len, uint64_t chunks, float scale) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t k = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < bias_len; k += stride) {
    bias_combine_item(partials, d_bias, bias_len, chunks, scale, k);
  }
}

uint64_t bias_chunks(uint64_t rows, uint64_t row_len, uint64_t bias_len) {
  const uint64_t terms = rows * (row_len / bias_len);
  return (terms + kChunk - 1) / kChunk;
}

template <typename T, int W, bool VEC>
cudaError_t launch_bias_partials(const BiasArgs<T> &a, cudaStream_t stream) {
  auto kernel = bias_partials_kernel<T, W, VEC>;
  unsigned grid = 0;
  cudaError_t err = wave_grid(kernel, kThreads, (a.items + kThreads - 1) / kThreads, &grid);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, kThreads, 0, stream, a);
}

template <typename T>
cudaError_t bias_backward(const T *dy, T *d_branch, T *d_bias, float *workspace, uint64_t rows,
                          uint64_t row_len, uint64_t bias_len, const dropfuse_sample_keep &keep, float scale,
                          cudaStream_t stream) {
  constexpr uint64_t V = VecWidth<T>::value;
  const bool groups_of_v = bias_len % V == 0;
  BiasArgs<T> a{};
  a.dy = dy;
  a.d_branch = d_branch;
  a.partials = workspace;
  a.flags = keep.flags;
  a.flag_stride = keep.stride;
  a.all = keep.all;
  a.rows = rows;
  a.reps = row_len / bias_len;
  a.terms = rows * a.reps;
  a.bias_len = bias_len;
  a.groups = groups_of_v ? bias_len / V : bias_len;
  const uint64_t chunks = bias_chunks(rows, row_len, bias_len);
  a.items = chunks * a.groups;
  a.scale = scale;
  cudaError_t err;
  if (groups_of_v && aligned16(dy) && aligned16(d_branch)) {
    err = launch_bias_partials<T, static_cast<int>(V), true>(a, stream);
  } else if (groups_of_v) {
    err = launch_bias_partials<T, static_cast<int>(V), false>(a, stream);
  } else {
    err = launch_bias_partials<T, 1, false>(a, stream);
  }
  if (err != cudaSuccess) return err;
  unsigned grid = 0;
  err = wave_grid(bias_combine_kernel<T>, kThreads, (bias_len + kThreads - 1) / kThreads, &grid);
  if (err != cudaSuccess) return err;
  return launch_kernel(bias_combine_kernel<T>, grid, kThreads, 0, stream, static_cast<const float *>(workspace), d_bias,
                       bias_len, chunks, scale);
}

// ---- slots: one block scans the flags tile after tile ---------------------------------------

constexpr int kScanThreads = 1024;
constexpr int kScanItems = 4;
constexpr unsigned kFullWarp = 0xffffffffu;

__global__ void __launch_bounds__(kScanThreads)
    slots_kernel(const uint8_t *keep, uint64_t n, uint32_t *slots, uint32_t *count) {
  __shared__ uint32_t warp_incl[kScanThreads / 32];  // inclusive prefix of the tile's warp totals
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  constexpr uint64_t kTile = static_cast<uint64_t>(kScanThreads) * kScanItems;
  uint32_t carry = 0;  // kept samples before the tile (the same in every thread)
  for (uint64_t base = 0; base < n; base += kTile) {
    const uint64_t first = base + static_cast<uint64_t>(threadIdx.x) * kScanItems;
    uint32_t f[kScanItems];
    uint32_t local = 0;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const uint64_t idx = first + i;
      f[i] = idx < n && keep[idx] != 0 ? 1u : 0u;
      local += f[i];
    }
    uint32_t incl = local;  // inclusive scan over the warp's threads
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const uint32_t v = __shfl_up_sync(kFullWarp, incl, d);
      if (lane >= static_cast<unsigned>(d)) incl += v;
    }
    if (lane == 31) warp_incl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      uint32_t t = warp_incl[lane];
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const uint32_t v = __shfl_up_sync(kFullWarp, t, d);
        if (lane >= static_cast<unsigned>(d)) t += v;
      }
      warp_incl[lane] = t;
    }
    __syncthreads();
    uint32_t excl = carry + (warp > 0 ? warp_incl[warp - 1] : 0u) + (incl - local);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const uint64_t idx = first + i;
      if (idx < n) slots[idx] = f[i] ? excl : kSlotNone;
      excl += f[i];
    }
    carry += warp_incl[kScanThreads / 32 - 1];
    __syncthreads();  // warp_incl is rewritten by the next tile
  }
  if (threadIdx.x == 0) *count = carry;
}

// ---- dtype dispatch -------------------------------------------------------------------------

template <Op OP, typename F>
cudaError_t with_dtype(dropfuse_dtype dtype, F &&f) {
  switch (dtype) {
    case DROPFUSE_F32:
      return f(float{});
    case DROPFUSE_F16:
      return f(__half{});
    case DROPFUSE_BF16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <Op OP>
cudaError_t run_rows(dropfuse_dtype dtype, const void *x, const void *src, void *y, void *y2, const void *bias,
                     const dropfuse_sample_keep *keep, const uint32_t *slots, uint64_t rows, uint64_t row_len,
                     uint64_t bias_len, uint64_t capacity, float scale, cudaStream_t stream) {
  return with_dtype<OP>(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    RowArgs<T> a{};
    a.x = static_cast<const T *>(x);
    a.src = static_cast<const T *>(src);
    a.y = static_cast<T *>(y);
    a.y2 = static_cast<T *>(y2);
    a.bias = static_cast<const T *>(bias);
    if (keep != nullptr) {
      a.flags = keep->flags;
      a.flag_stride = keep->stride;
      a.all = keep->all;
    }
    a.slots = slots;
    a.capacity = capacity;
    a.row_len = row_len;
    a.scale = scale;
    a.in_place = x == y;
    return dispatch_rows<T, OP>(a, rows, bias_len, stream);
  });
}

bool misaligned4(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 3u) != 0; }

// Checked before the early returns of calls that have nothing to do (a bad dtype is an error
// whatever the keep flags or the capacity).
bool bad_dtype(dropfuse_dtype d) { return d != DROPFUSE_F32 && d != DROPFUSE_F16 && d != DROPFUSE_BF16; }

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

// ---- stochastic depth ---------------------------------------------------------------------------

extern "C" int dropfuse_stochastic_depth_forward(dropfuse_dtype dtype, const void *residual, const void *branch,
                                                 const void *bias, void *out, uint64_t batch, uint64_t row_len,
                                                 uint64_t bias_len, const dropfuse_sample_keep *keep, float scale,
                                                 dropfuse_stream_t stream) {
  if (batch == 0 || row_len == 0) return cudaSuccess;
  if (residual == nullptr || branch == nullptr || out == nullptr || keep == nullptr) return cudaErrorInvalidValue;
  if (bias != nullptr && (bias_len == 0 || row_len % bias_len != 0)) return cudaErrorInvalidValue;
  if (bad_dtype(dtype)) return cudaErrorInvalidValue;
  if (keep->flags == nullptr && keep->all == 0 && residual == out) return cudaSuccess;  // nothing kept, in place
  return run_rows<Op::Depth>(dtype, residual, branch, out, nullptr, bias, keep, nullptr, batch, row_len,
                             bias != nullptr ? bias_len : 0, 0, scale, stream);
}

extern "C" uint64_t dropfuse_stochastic_depth_workspace(uint64_t batch, uint64_t row_len, uint64_t bias_len) {
  if (batch == 0 || row_len == 0 || bias_len == 0 || row_len % bias_len != 0) return 0;
  return bias_chunks(batch, row_len, bias_len) * bias_len;
}

extern "C" int dropfuse_stochastic_depth_backward(dropfuse_dtype dtype, const void *d_out, void *d_branch,
                                                  void *d_bias, float *workspace, uint64_t batch, uint64_t row_len,
                                                  uint64_t bias_len, const dropfuse_sample_keep *keep, float scale,
                                                  dropfuse_stream_t stream) {
  if (batch == 0 || row_len == 0) return cudaSuccess;
  if (d_out == nullptr || d_branch == nullptr || keep == nullptr) return cudaErrorInvalidValue;
  if (d_bias == nullptr) {
    return run_rows<Op::Grad>(dtype, d_out, nullptr, d_branch, nullptr, nullptr, keep, nullptr, batch, row_len, 0,
                              0, scale, stream);
  }
  if (workspace == nullptr || misaligned4(workspace) || bias_len == 0 || row_len % bias_len != 0) {
    return cudaErrorInvalidValue;
  }
  return with_dtype<Op::Grad>(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    return bias_backward<T>(static_cast<const T *>(d_out), static_cast<T *>(d_branch), static_cast<T *>(d_bias),
                            workspace, batch, row_len, bias_len, *keep, scale, stream);
  });
}

// ---- per-sample compaction ----------------------------------------------------------------------

extern "C" int dropfuse_compact_slots(const uint8_t *keep, uint64_t batch, uint32_t *slots, uint32_t *count,
                                      dropfuse_stream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (keep == nullptr || slots == nullptr || count == nullptr || misaligned4(slots) || misaligned4(count)) {
    return cudaErrorInvalidValue;
  }
  if (batch > 0xffffffffull) return cudaErrorInvalidValue;
  return launch_kernel(slots_kernel, 1, kScanThreads, 0, stream, keep, batch, slots, count);
}

namespace {
// Common checks of the compaction launchers: 0 = go, 1 = nothing to do, else an error.
int compact_checks(dropfuse_dtype dtype, const void *full_in, const void *full_out, const void *compact,
                   const uint32_t *slots, uint64_t batch, uint64_t row_len, uint64_t capacity) {
  if (batch == 0 || row_len == 0) return 1;
  if (full_in == nullptr || full_out == nullptr || slots == nullptr || misaligned4(slots)) return -1;
  if (bad_dtype(dtype)) return -1;
  if (compact == nullptr && capacity != 0) return -1;
  return 0;
}
}  // namespace

#define DF_COMPACT_CHECKS(in, out, compact)                                                  \
  do {                                                                                       \
    const int c_ = compact_checks(dtype, in, out, compact, slots, batch, row_len, capacity); \
    if (c_ == 1) return cudaSuccess;                                                         \
    if (c_ != 0) return cudaErrorInvalidValue;                                               \
  } while (0)

extern "C" int dropfuse_gather_samples(dropfuse_dtype dtype, const void *x, void *compact, const uint32_t *slots,
                                       uint64_t batch, uint64_t row_len, uint64_t capacity,
                                       dropfuse_stream_t stream) {
  DF_COMPACT_CHECKS(x, x, compact);
  if (capacity == 0) return cudaSuccess;
  return run_rows<Op::Gather>(dtype, x, nullptr, compact, nullptr, nullptr, nullptr, slots, batch, row_len, 0,
                              capacity, 1.0f, stream);
}

extern "C" int dropfuse_scatter_samples(dropfuse_dtype dtype, const void *x, const void *compact, void *out,
                                        const uint32_t *slots, uint64_t batch, uint64_t row_len, uint64_t capacity,
                                        dropfuse_stream_t stream) {
  DF_COMPACT_CHECKS(x, out, compact);
  return run_rows<Op::Scatter>(dtype, x, compact, out, nullptr, nullptr, nullptr, slots, batch, row_len, 0, capacity,
                               1.0f, stream);
}

extern "C" int dropfuse_scatter_samples_backward(dropfuse_dtype dtype, const void *d_out, void *d_x, void *d_compact,
                                                 const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                                 uint64_t capacity, dropfuse_stream_t stream) {
  DF_COMPACT_CHECKS(d_out, d_x, d_compact);
  return run_rows<Op::ScatterBackward>(dtype, d_out, nullptr, d_x, d_compact, nullptr, nullptr, slots, batch,
                                       row_len, 0, capacity, 1.0f, stream);
}

extern "C" int dropfuse_scatter_add_samples(dropfuse_dtype dtype, const void *x, const void *compact, void *out,
                                            const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                            uint64_t capacity, float scale, dropfuse_stream_t stream) {
  DF_COMPACT_CHECKS(x, out, compact);
  return run_rows<Op::ScatterAdd>(dtype, x, compact, out, nullptr, nullptr, nullptr, slots, batch, row_len, 0,
                                  capacity, scale, stream);
}

extern "C" int dropfuse_scatter_add_samples_backward(dropfuse_dtype dtype, const void *d_out, void *d_compact,
                                                     const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                                     uint64_t capacity, float scale, dropfuse_stream_t stream) {
  DF_COMPACT_CHECKS(d_out, d_out, d_compact);
  if (capacity == 0) return cudaSuccess;
  return run_rows<Op::CompactGrad>(dtype, d_out, nullptr, d_compact, nullptr, nullptr, nullptr, slots, batch,
                                   row_len, 0, capacity, scale, stream);
}

extern "C" int dropfuse_gather_samples_backward(dropfuse_dtype dtype, const void *d_compact, void *d_x,
                                                const uint32_t *slots, uint64_t batch, uint64_t row_len,
                                                uint64_t capacity, dropfuse_stream_t stream) {
  DF_COMPACT_CHECKS(d_x, d_x, d_compact);
  if (capacity == 0) return cudaSuccess;
  // d_x += d_compact[slot]: the scatter-add in place with scale 1 (1 * t == t exactly, so
  // round_T(d_x + 1 * d_c) is round_T(d_x + d_c), contract point 6).
  return run_rows<Op::ScatterAdd>(dtype, d_x, d_compact, d_x, nullptr, nullptr, nullptr, slots, batch, row_len, 0,
                                  capacity, 1.0f, stream);
}
