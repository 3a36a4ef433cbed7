// The small kernels around the multi-sample dropout head's GEMMs (src/multi_sample/head.rs):
//   - bias_rows_kernel: out[r * C + j] = float(bias[j]) for every row r: the broadcast bias the
//     logits GEMM adds with beta = 1 (so z = h_k W^T + b with the bias added once, in f32).
//   - colsum_partial_kernel / colsum_finish_kernel: out[j] = round_O((sum over rows of x[r][j]) *
//     scale), the bias gradient db = sum over the K * B rows of dz. Deterministic: chunks of
//     DROPFUSE_COLSUM_CHUNK rows, each summed by 4 row lanes (rows ascending, f32), the lanes
//     combined in a fixed order, then the chunk partials summed in ascending chunk order; the
//     result depends only on (rows, C, the data), not on the GPU or the grid.
// All indices are 64-bit; every launch is checked; nothing synchronizes.
#include <stdint.h>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "dropfuse.h"

namespace dropfuse {
namespace {

constexpr int kBiasThreads = 256;
constexpr int kColTile = 64;   // columns per block (threadIdx.x)
constexpr int kRowLanes = 4;   // row lanes per block (threadIdx.y)
constexpr unsigned kMaxGridY = 65535;

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

template <typename T>
__global__ void __launch_bounds__(kBiasThreads) bias_rows_kernel(const T *bias, float *out, uint64_t rows, uint64_t c) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t j = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < c; j += stride) {
    const float v = Elem<T>::to_f32(bias[j]);
    for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) out[r * c + j] = v;
  }
}

template <typename T>
cudaError_t launch_bias_rows(const void *bias, float *out, uint64_t rows, uint64_t c, cudaStream_t stream) {
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const uint64_t col_blocks = (c + kBiasThreads - 1) / kBiasThreads;
  const unsigned gx = static_cast<unsigned>(col_blocks < (1u << 30) ? col_blocks : (1u << 30));
  // About 8 waves of blocks in all; every block writes whole rows' worth of its columns.
  uint64_t gy = (8ull * static_cast<uint64_t>(sms) * 8ull + gx - 1) / gx;
  if (gy > rows) gy = rows;
  if (gy > kMaxGridY) gy = kMaxGridY;
  if (gy == 0) gy = 1;
  return launch_kernel(bias_rows_kernel<T>, dim3(gx, static_cast<unsigned>(gy)), dim3(kBiasThreads), 0, stream,
                       static_cast<const T *>(bias), out, rows, c);
}

// partial[chunk * C + j] = sum of x[r][j] over the chunk's rows: lane y sums rows r0 + y, r0 + y + 4, ...
// ascending (f32, each value added in turn), then ((l0 + l1) + l2) + l3.
template <typename T>
__global__ void __launch_bounds__(kColTile *kRowLanes)
    colsum_partial_kernel(const T *x, uint64_t rows, uint64_t c, float *partial) {
  __shared__ float s_lane[kRowLanes][kColTile];
  const uint64_t chunks = (rows + DROPFUSE_COLSUM_CHUNK - 1) / DROPFUSE_COLSUM_CHUNK;
  const uint64_t tiles = (c + kColTile - 1) / kColTile;
  for (uint64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const uint64_t r0 = chunk * DROPFUSE_COLSUM_CHUNK;
    const uint64_t r1 = r0 + DROPFUSE_COLSUM_CHUNK < rows ? r0 + DROPFUSE_COLSUM_CHUNK : rows;
    for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const uint64_t j = tile * kColTile + threadIdx.x;
      float acc = 0.0f;
      if (j < c) {
        for (uint64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) acc = __fadd_rn(acc, Elem<T>::to_f32(x[r * c + j]));
      }
      s_lane[threadIdx.y][threadIdx.x] = acc;
      __syncthreads();
      if (threadIdx.y == 0 && j < c) {
        float s = s_lane[0][threadIdx.x];
#pragma unroll
        for (int l = 1; l < kRowLanes; ++l) s = __fadd_rn(s, s_lane[l][threadIdx.x]);
        partial[chunk * c + j] = s;
      }
      __syncthreads();
    }
  }
}

// out[j] = round_O((sum over chunks ascending of partial[chunk * C + j]) * scale).
template <typename O>
__global__ void __launch_bounds__(kBiasThreads)
    colsum_finish_kernel(const float *partial, uint64_t chunks, uint64_t c, float scale, O *out) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t j = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < c; j += stride) {
    float s = 0.0f;
    for (uint64_t k = 0; k < chunks; ++k) s = __fadd_rn(s, partial[k * c + j]);
    out[j] = Elem<O>::from_f32(__fmul_rn(s, scale));
  }
}

template <typename T, typename O>
cudaError_t launch_colsum(const void *x, uint64_t rows, uint64_t c, float *partial, void *out, float scale,
                          cudaStream_t stream) {
  const uint64_t chunks = (rows + DROPFUSE_COLSUM_CHUNK - 1) / DROPFUSE_COLSUM_CHUNK;
  const uint64_t tiles = (c + kColTile - 1) / kColTile;
  const unsigned gx = static_cast<unsigned>(tiles < (1u << 30) ? tiles : (1u << 30));
  const unsigned gy = static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY);
  cudaError_t err = launch_kernel(colsum_partial_kernel<T>, dim3(gx, gy), dim3(kColTile, kRowLanes), 0, stream,
                                  static_cast<const T *>(x), rows, c, partial);
  if (err != cudaSuccess) return err;
  unsigned grid = 0;
  err = wave_grid(colsum_finish_kernel<O>, kBiasThreads, (c + kBiasThreads - 1) / kBiasThreads, &grid, 4);
  if (err != cudaSuccess) return err;
  return launch_kernel(colsum_finish_kernel<O>, grid, kBiasThreads, 0, stream, partial, chunks, c, scale,
                       static_cast<O *>(out));
}

template <typename T>
cudaError_t launch_colsum1(dropfuse_dtype out_dtype, const void *x, uint64_t rows, uint64_t c, float *partial,
                           void *out, float scale, cudaStream_t stream) {
  switch (out_dtype) {
    case DROPFUSE_F32:
      return launch_colsum<T, float>(x, rows, c, partial, out, scale, stream);
    case DROPFUSE_F16:
      return launch_colsum<T, __half>(x, rows, c, partial, out, scale, stream);
    case DROPFUSE_BF16:
      return launch_colsum<T, __nv_bfloat16>(x, rows, c, partial, out, scale, stream);
  }
  return cudaErrorInvalidValue;
}

bool head_valid_dtype(dropfuse_dtype d) { return d == DROPFUSE_F32 || d == DROPFUSE_F16 || d == DROPFUSE_BF16; }

}  // namespace
}  // namespace dropfuse

using namespace dropfuse;

extern "C" int dropfuse_multi_sample_bias_rows(dropfuse_dtype dtype, const void *bias, float *out, uint64_t rows,
                                               uint64_t c, dropfuse_stream_t stream) {
  if (rows == 0 || c == 0) return cudaSuccess;
  if (bias == nullptr || out == nullptr || !head_valid_dtype(dtype) || (reinterpret_cast<uintptr_t>(out) & 3u) != 0) {
    return cudaErrorInvalidValue;
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_bias_rows<float>(bias, out, rows, c, s);
    case DROPFUSE_F16:
      return launch_bias_rows<__half>(bias, out, rows, c, s);
    case DROPFUSE_BF16:
      return launch_bias_rows<__nv_bfloat16>(bias, out, rows, c, s);
  }
  return cudaErrorInvalidValue;
}

extern "C" uint64_t dropfuse_column_sums_scratch_floats(uint64_t rows, uint64_t c) {
  return (rows + DROPFUSE_COLSUM_CHUNK - 1) / DROPFUSE_COLSUM_CHUNK * c;
}

extern "C" int dropfuse_column_sums(dropfuse_dtype dtype, const void *x, uint64_t rows, uint64_t c, float *scratch,
                                    dropfuse_dtype out_dtype, void *out, float scale, dropfuse_stream_t stream) {
  if (rows == 0 || c == 0) return cudaSuccess;
  if (x == nullptr || scratch == nullptr || out == nullptr || !head_valid_dtype(dtype) ||
      !head_valid_dtype(out_dtype) || (reinterpret_cast<uintptr_t>(scratch) & 3u) != 0) {
    return cudaErrorInvalidValue;
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DROPFUSE_F32:
      return launch_colsum1<float>(out_dtype, x, rows, c, scratch, out, scale, s);
    case DROPFUSE_F16:
      return launch_colsum1<__half>(out_dtype, x, rows, c, scratch, out, scale, s);
    case DROPFUSE_BF16:
      return launch_colsum1<__nv_bfloat16>(out_dtype, x, rows, c, scratch, out, scale, s);
  }
  return cudaErrorInvalidValue;
}
