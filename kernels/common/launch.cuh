// Host-side helpers shared by the launchers: SM count, occupancy-capped grid sizes, status codes.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>

namespace dropfuse {

constexpr int kMaxDevices = 64;

// Multiprocessor count of the current device, cached per device ordinal.
inline cudaError_t sm_count(int *out) {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return cudaSuccess;
    }
  }
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(sms, std::memory_order_relaxed);
  *out = sms;
  return cudaSuccess;
}

// A grid of at most `waves` full waves (SMs x resident blocks per SM) and at least one block;
// kernels grid-stride over the rest. `blocks_wanted` is what covering the work once takes.
// DROPFUSE_WAVES, when defined (tuning builds), overrides every caller's choice.
template <typename Kernel>
inline cudaError_t wave_grid(Kernel kernel, int threads, uint64_t blocks_wanted, unsigned *grid,
                             int waves = 16) {
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
#ifdef DROPFUSE_WAVES
  waves = DROPFUSE_WAVES;
#endif
  const uint64_t wave =
      static_cast<uint64_t>(std::max(waves, 1)) * static_cast<uint64_t>(sms) * static_cast<uint64_t>(std::max(per_sm, 1));
  *grid = static_cast<unsigned>(std::max<uint64_t>(1, std::min(blocks_wanted, wave)));
  return cudaSuccess;
}

}  // namespace dropfuse
