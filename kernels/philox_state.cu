// Device-resident Philox state for CUDA-graph-safe randomness (kernels/dropfuse.h).
#include <cuda_runtime.h>
#include <stdint.h>

#include "dropfuse.h"

namespace {

// One thread: a kernel node, so it can be captured into a graph between the random launches.
__global__ void __launch_bounds__(1) philox_advance_kernel(uint64_t *state, uint64_t streams) { state[1] += streams; }

}  // namespace

// The launch (`launch_kernel`): the host emulation (tests/host_emu/cuda_fiber_emu.h) defines it
// (and runs the kernel on the CPU) before including this file.
#ifndef DROPFUSE_HOST_EMULATION
namespace dropfuse {
namespace {
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<A &&>(args)...);
  return cudaGetLastError();
}
}  // namespace
}  // namespace dropfuse
#endif

extern "C" int dropfuse_philox_advance(uint64_t *philox_dev, uint64_t streams, dropfuse_stream_t stream) {
  if (philox_dev == nullptr || (reinterpret_cast<uintptr_t>(philox_dev) & 7u) != 0) return cudaErrorInvalidValue;
  if (streams == 0) return cudaSuccess;
  return dropfuse::launch_kernel(philox_advance_kernel, 1, 1, 0, stream, philox_dev, streams);
}
