// Device-resident Philox state for CUDA-graph-safe randomness (kernels/dropfuse.h).
#include <cuda_runtime.h>
#include <stdint.h>

#include "dropfuse.h"

namespace {

// One thread: a kernel node, so it can be captured into a graph between the random launches.
__global__ void philox_advance_kernel(uint64_t *state, uint64_t streams) { state[1] += streams; }

}  // namespace

extern "C" int dropfuse_philox_advance(uint64_t *philox_dev, uint64_t streams, dropfuse_stream_t stream) {
  if (philox_dev == nullptr || (reinterpret_cast<uintptr_t>(philox_dev) & 7u) != 0) return cudaErrorInvalidValue;
  if (streams == 0) return cudaSuccess;
  philox_advance_kernel<<<1, 1, 0, stream>>>(philox_dev, streams);
  return cudaGetLastError();
}
