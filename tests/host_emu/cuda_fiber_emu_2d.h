// 2-D grids and blocks on the fiber-per-thread emulator of cuda_fiber_emu.h, and the few device
// intrinsic macro it does not define (__grid_constant__), for kernel files that launch 2-D grids
// through a `launch_kernel(kernel, dim3 grid, dim3 block, smem, stream, args...)` overload
// (kernels/multi_sample_head.cu, kernels/bias_dropout_residual.cu).
//
// A 2-D launch runs as the 1-D launch of gx * gy blocks of bx * by threads (cuda_fiber_emu.h's
// scheduler, barriers and warp rendezvous unchanged); the kernel sees threadIdx, blockIdx,
// blockDim and gridDim through macros that decompose the linear indices the way CUDA linearises
// them (x fastest): thread i of a block is (i % bx, i / bx), so warp w is threads 32w .. 32w + 31
// of the linear order, as on a GPU. Include this header after cuda_fiber_emu.h and before the
// kernel file; code included earlier (the emulator itself) keeps the plain 1-D variables.
#pragma once
#include "cuda_fiber_emu.h"

namespace emu2d {

inline bool active = false;  // a 2-D launch is running
inline dim3 grid, block;

inline uint3 thread_index() {
  if (!active) return ::threadIdx;
  const unsigned i = ::threadIdx.x;
  return uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
}
inline uint3 block_index() {
  if (!active) return ::blockIdx;
  const unsigned b = ::blockIdx.x;
  return uint3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
}
inline dim3 block_dim() { return active ? block : ::blockDim; }
inline dim3 grid_dim() { return active ? grid : ::gridDim; }

}  // namespace emu2d

namespace dropfuse {
// The driver's limits: grid.y and grid.z up to 65535, at most 1024 threads and block.z <= 64.
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || block.x == 0 ||
      block.y == 0 || block.z == 0 || block.z > 64 ||
      static_cast<uint64_t>(block.x) * block.y * block.z > 1024) {
    return cudaErrorInvalidConfiguration;
  }
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (blocks > 0xFFFFFFFFull) emu::fatal("2-D grid too large to emulate");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // copied for a deferred launch
  const auto op = [=]() {  // named, not a temporary: see cudaMemsetAsync in cuda_fiber_emu.h
    std::lock_guard<std::recursive_mutex> lock(emu::mu);  // `active` is shared with other launches
    emu2d::active = true;
    emu2d::grid = grid;
    emu2d::block = block;
    const cudaError_t err = std::apply(
        [&](const auto &...a) {
          return emu::launch(kernel, static_cast<unsigned>(blocks), block.x * block.y * block.z, smem, a...);
        },
        params);
    emu2d::active = false;
    return err;
  };
  return emu::enqueue(stream, op);
}
}  // namespace dropfuse

#undef __grid_constant__
#define __grid_constant__
#define threadIdx (emu2d::thread_index())
#define blockIdx (emu2d::block_index())
#define blockDim (emu2d::block_dim())
#define gridDim (emu2d::grid_dim())
