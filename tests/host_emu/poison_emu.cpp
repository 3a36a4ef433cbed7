// Self-test of the emulator's poisoning (cuda_fiber_emu.h): what a GPU leaves undefined must not
// read as a harmless value here. A kernel that reads its static __shared__ variables (a plain
// kernel and a function template's instantiations, whose statics g++ would not put in a named
// section) or its dynamic shared memory before any thread wrote them sees the running block's
// poison byte (emu::g.poison, 0xFF, 0x00 and 0xA5 in turn), never zero at every block nor the
// previous block's values; an uninitialised local holds -ftrivial-auto-var-init's pattern when the
// build passes it (DROPFUSE_EMU_AUTO_VAR_INIT). Two builds run it: the stand-alone program
// (tests/importance_host_emulation.rs, tests/host_emu/build.rs) and the emulated-device build's
// kernel library (build.rs; `dropfuse_emu_poison_selftest`, called by tests/dropout_gpu.rs there),
// where it is compiled like kernels/*.cu (DROPFUSE_EMU_NO_MAIN: no main).
#include "cuda_fiber_emu.h"

#include <cstdio>
#include <set>

namespace dropfuse {
namespace {

constexpr unsigned kGrid = 6, kBlock = 64;

int checks = 0, failures = 0;
#define CHECK(cond, ...)                       \
  do {                                         \
    ++checks;                                  \
    if (!(cond)) {                             \
      ++failures;                              \
      printf("poison self-test FAILED: ");     \
      printf(__VA_ARGS__);                     \
      printf("\n");                            \
    }                                          \
  } while (0)

// Thread 0 records the block's static word before anyone writes it, then every thread marks it.
__global__ void static_word_kernel(uint32_t *seen, unsigned char *pattern) {
  __shared__ uint32_t word;
  if (threadIdx.x == 0) {
    seen[blockIdx.x] = word;
    pattern[blockIdx.x] = emu::g.poison;
  }
  __syncthreads();
  word = 0x12345678u;
}

// The same through a function template (several instantiations): each thread reads its element
// of a static array, then writes it.
template <typename T, int N>
__global__ void static_array_kernel(T *seen, unsigned char *pattern) {
  __shared__ T arr[N];
  if (threadIdx.x == 0) pattern[blockIdx.x] = emu::g.poison;
  for (unsigned i = threadIdx.x; i < N; i += blockDim.x) seen[blockIdx.x * N + i] = arr[i];
  __syncthreads();
  for (unsigned i = threadIdx.x; i < N; i += blockDim.x) arr[i] = T(1);
}

// The dynamic shared memory (smem bytes), read before any write.
__global__ void dynamic_kernel(unsigned char *seen, unsigned char *pattern, unsigned smem) {
  DROPFUSE_DYNAMIC_SHARED(unsigned char, dyn);
  if (threadIdx.x == 0) pattern[blockIdx.x] = emu::g.poison;
  for (unsigned i = threadIdx.x; i < smem; i += blockDim.x) seen[blockIdx.x * smem + i] = dyn[i];
  __syncthreads();
  for (unsigned i = threadIdx.x; i < smem; i += blockDim.x) dyn[i] = 0x3C;
}

// An uninitialised local array (registers on a GPU), copied out byte by byte.
constexpr unsigned kLocal = 24;
__global__ void local_kernel(unsigned char *seen) {
  unsigned char local[kLocal];
  memcpy(seen + (blockIdx.x * blockDim.x + threadIdx.x) * kLocal, local, kLocal);
}

template <typename T>
bool all_bytes(const T &v, unsigned char b) {
  unsigned char bytes[sizeof(T)];
  memcpy(bytes, &v, sizeof(T));
  for (unsigned char x : bytes)
    if (x != b) return false;
  return true;
}

template <typename T, int N>
void check_array(const char *name) {
  std::vector<T> seen(kGrid * N);
  std::vector<unsigned char> pattern(kGrid);
  CHECK(emu::launch(static_array_kernel<T, N>, kGrid, kBlock, 0, seen.data(), pattern.data()) == cudaSuccess,
        "%s launch", name);
  for (unsigned b = 0; b < kGrid; ++b)
    for (int i = 0; i < N; ++i)
      CHECK(all_bytes(seen[b * N + i], pattern[b]), "%s: block %u element %d not poisoned with 0x%02X", name, b, i,
            pattern[b]);
}

}  // namespace
}  // namespace dropfuse

extern "C" int dropfuse_emu_poison_selftest(void) {
  using namespace dropfuse;
  std::lock_guard<std::recursive_mutex> lock(emu::mu);  // consecutive blocks: every poison byte
  checks = failures = 0;
  std::set<unsigned char> used;
  for (int launch = 0; launch < 2; ++launch) {
    std::vector<uint32_t> word(kGrid);
    std::vector<unsigned char> pattern(kGrid);
    CHECK(emu::launch(static_word_kernel, kGrid, kBlock, 0, word.data(), pattern.data()) == cudaSuccess,
          "static word launch");
    for (unsigned b = 0; b < kGrid; ++b) {
      used.insert(pattern[b]);
      CHECK(all_bytes(word[b], pattern[b]), "static word: block %u read 0x%08X, want 0x%02X bytes", b, word[b],
            pattern[b]);
    }
    check_array<float, 8>("float[8] (template)");
    check_array<uint64_t, 130>("uint64_t[130] (template)");
    const unsigned smem = 200;
    std::vector<unsigned char> dyn(kGrid * smem);
    CHECK(emu::launch(dynamic_kernel, kGrid, kBlock, smem, dyn.data(), pattern.data(), smem) == cudaSuccess,
          "dynamic launch");
    for (unsigned b = 0; b < kGrid; ++b)
      for (unsigned i = 0; i < smem; ++i)
        CHECK(dyn[b * smem + i] == pattern[b], "dynamic: block %u byte %u is 0x%02X, want 0x%02X", b, i,
              dyn[b * smem + i], pattern[b]);
  }
  CHECK(used.count(0xFF) && used.count(0x00) && used.count(0xA5), "the blocks did not get every poison byte");
#ifdef DROPFUSE_EMU_AUTO_VAR_INIT
#ifdef __clang__
  const unsigned char local_pattern = 0xAA;
#else
  const unsigned char local_pattern = 0xFE;
#endif
  std::vector<unsigned char> local(kGrid * kBlock * kLocal);
  CHECK(emu::launch(local_kernel, kGrid, kBlock, 0, local.data()) == cudaSuccess, "local launch");
  size_t bad = 0;
  for (unsigned char x : local) bad += x != local_pattern;
  CHECK(bad == 0, "locals: %zu of %zu bytes are not the pattern 0x%02X", bad, local.size(), local_pattern);
#else
  printf("note: uninitialised locals not checked (built without -ftrivial-auto-var-init=pattern)\n");
#endif
  printf("poison self-test: checks: %d, failures: %d\n", checks, failures);
  fflush(stdout);
  return failures;
}

#ifndef DROPFUSE_EMU_NO_MAIN
int main() { return dropfuse_emu_poison_selftest() == 0 ? 0 : 1; }
#endif
