// A small CUDA execution emulator for the host (no GPU): every thread of a block is a fiber
// (ucontext) on one OS thread; __syncthreads and the warp intrinsics are rendezvous points, so the
// emulation honours barrier semantics: between two sync points a thread runs alone, the threads of
// a block run in a RANDOM order each round (a read of shared memory that another thread writes
// without a barrier in between sees either value, as on a GPU), a barrier releases only when every
// thread of the block reached it (reached by some threads after others exited: reported), and a
// warp intrinsic with the full mask needs all 32 lanes at the same intrinsic (divergence: reported).
// Blocks run one after the other, in a random order (a kernel may not assume that block 0 runs
// first, nor that the block that finishes last has the highest index), over 1D, 2D or 3D grids;
// `__shared__` variables are function statics (one block at a time: faithful). What a GPU leaves
// undefined is poisoned: before every block, its static `__shared__` variables and its dynamic
// shared memory are filled with the next byte of 0xFF, 0x00, 0xA5 (kPoison: never the previous
// block's values, never zero at every block), and the builds pass -ftrivial-auto-var-init=pattern
// when the compiler has it (an uninitialised local holds 0xFE bytes with g++); poison_emu.cpp
// checks both. Atomics and fences are plain (blocks never overlap).
//
// Used by tests/host_emu/*_emu.cpp (routing, importance, skip, graph-safe randomness, structured,
// MC dropout), compiled with a plain host C++ compiler (-ffp-contract=off: the __fmul_rn /
// __fadd_rn stand-ins round each operation) against the CUDA headers (half / bfloat16 conversions, runtime types). The CUDA
// runtime calls the launchers make are stubs below (an emulated device: few SMs, so grid-stride
// loops wrap; the launchers cache the SM count of their first launch), and launches go through
// `launch_kernel`, which the kernel files define with <<<>>> unless DROPFUSE_HOST_EMULATION is set.
// Not emulated: concurrency between blocks (they run one after the other, so inter-block races and
// atomics' contention are not exercised), texture/read-only caches, and the 16-byte accesses'
// atomicity (a uint4 load or store is a plain copy here).
#pragma once
#define DROPFUSE_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <vector>

using std::isnan;

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// A static `__shared__` variable is a function static placed where launch() can find it and poison
// it before every block: GCC's `noinit` attribute (section .noinit; the section attribute is not
// used: g++ drops it on the statics of function templates, GCC bug 70435), otherwise a section
// named emu_shared. See poison_shared().
#if defined(__has_attribute) && __has_attribute(noinit)
#define __shared__ static __attribute__((noinit))
#else
#define __shared__ static __attribute__((section("emu_shared")))
#endif
#define __launch_bounds__(...)
#define __grid_constant__
#define DROPFUSE_DYNAMIC_SHARED(type, name) type *name = reinterpret_cast<type *>(emu::g.dyn_smem.data())

namespace emu {

[[noreturn]] inline void fatal(const char *what) {
  fprintf(stderr, "EMULATION ERROR: %s\n", what);
  printf("EMULATION ERROR: %s\n", what);
  fflush(stdout);
  abort();
}

enum State { kRun, kBar, kWarp, kDone };
enum WarpOp { kShflUp = 1, kShflDown, kShflIdx, kShflXor, kBallot };

// Context switches: a fiber starts through its ucontext (makecontext gives it its stack), every
// later switch is a _setjmp / _longjmp pair, which unlike swapcontext does not save and restore
// the signal mask (two system calls per switch: most of the emulation's time). Declared here
// under their glibc symbol names so that _FORTIFY_SOURCE's __longjmp_chk, which rejects a jump to
// another stack, is not used.
extern "C" int emu_setjmp(jmp_buf) __asm__("_setjmp") __attribute__((returns_twice));
extern "C" [[noreturn]] void emu_longjmp(jmp_buf, int) __asm__("_longjmp");

struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started;
  State state;
  int op;
  uint64_t val;
  int arg;
  uint64_t result;
};

struct Global {
  // The emulated device.
  int sms = 3;
  int blocks_per_sm = 2;
  int smem_optin = 232448;
  unsigned max_grid_x = 0x7FFFFFFFu;
  // The launchers cache the SM count per device ordinal (common/launch.cuh): cudaGetDevice reports
  // `sms` as the ordinal, so a test that changes `sms` between launches gets a fresh cache entry.
  std::map<const void *, int> max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  int static_smem = 4096;                  // reported sharedSizeBytes (an upper bound)
  // The running block.
  std::vector<Fiber> fibers;
  std::vector<char *> stacks;
  ucontext_t sched;
  jmp_buf sched_jb;
  int cur = 0;
  const std::function<void()> *body = nullptr;
  std::vector<unsigned char> dyn_smem;
  std::mt19937_64 rng{42};
  uint64_t launches = 0;
  // Poisoning: every block starts with its static and dynamic shared memory filled with
  // kPoison[blocks % 3] (`poison`: the running block's byte); `shared_spans`: per kernel, the
  // static __shared__ sections of the object that holds it (poison_shared()).
  uint64_t blocks = 0;
  unsigned char poison = 0;
  std::map<const void *, std::vector<std::pair<unsigned char *, size_t>>> shared_spans;
  std::map<const void *, uint64_t> launched;  // launches per kernel (coverage checks)
  const void *last_kernel = nullptr;
  dim3 last_grid;
  unsigned last_block = 0;
  cudaError_t sticky = cudaSuccess;
};
inline Global g;
// Held by every launch and every change of a kernel attribute: host threads that launch at the
// same time (the crate's own tests in the emulated-device build, see build.rs) run one kernel
// after the other, as the emulator's single scheduler needs.
inline std::recursive_mutex mu;

}  // namespace emu

// The built-in variables: the scheduler sets threadIdx before resuming a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

constexpr size_t kStack = 64 * 1024;

inline void entry() {
  (*g.body)();
  g.fibers[g.cur].state = kDone;
  emu_longjmp(g.sched_jb, 1);  // back to resume(); this stack is never used again
}

inline void yield() {
  if (emu_setjmp(g.fibers[g.cur].jb) == 0) emu_longjmp(g.sched_jb, 1);
}

// Runs fiber `i` until it yields or finishes (the scheduler's side of a switch).
__attribute__((noinline)) inline void resume(unsigned i) {
  Fiber &f = g.fibers[i];
  if (emu_setjmp(g.sched_jb) != 0) return;
  if (!f.started) {
    f.started = true;
    swapcontext(&g.sched, &f.ctx);  // does not return: the fiber comes back through sched_jb
    fatal("a fiber returned through its ucontext");
  }
  emu_longjmp(f.jb, 1);
}

inline void resolve_warp(int w) {
  Fiber *f = &g.fibers[w * 32];
  const int op = f[0].op;
  for (int l = 0; l < 32; ++l)
    if (f[l].op != op) fatal("lanes of a warp at different warp intrinsics (divergence)");
  for (int l = 0; l < 32; ++l) {
    uint64_t r = 0;
    switch (op) {
      case kShflUp: r = l >= f[l].arg ? f[l - f[l].arg].val : f[l].val; break;
      case kShflDown: r = l + f[l].arg < 32 ? f[l + f[l].arg].val : f[l].val; break;
      case kShflIdx: r = f[f[l].arg & 31].val; break;
      case kShflXor: r = f[(l ^ f[l].arg) & 31].val; break;
      case kBallot: {
        uint64_t b = 0;
        for (int j = 0; j < 32; ++j) b |= (f[j].val ? 1ull : 0ull) << j;
        r = b;
        break;
      }
      default: fatal("unknown warp op");
    }
    f[l].result = r;
  }
  for (int l = 0; l < 32; ++l) f[l].state = kRun;
}

// Runs one block: every thread to completion, honouring barriers and warp rendezvous. Each step
// runs one runnable thread up to its next sync point; a warp intrinsic completes as soon as its 32
// lanes are there (other threads may still be anywhere before their next barrier), a barrier as
// soon as every thread of the block is there. Which thread runs next: half of the blocks pick a
// random runnable warp, the others run the warps in a random priority order (a warp runs ahead of
// the others as far as it can: the usual shape of a missing-barrier race); the lane is random.
// A block size that is not a multiple of 32 ends in a partial warp, which must not reach a warp
// intrinsic (every one here takes the full mask).
inline void run_block(unsigned threads) {
  while (g.stacks.size() < threads) g.stacks.push_back(static_cast<char *>(malloc(kStack)));
  g.fibers.assign(threads, Fiber{});
  const unsigned warps = (threads + 31) / 32;
  std::vector<std::vector<unsigned>> runnable(warps);
  std::vector<unsigned> at_warp(warps, 0), priority(warps);
  for (unsigned w = 0; w < warps; ++w) priority[w] = w;
  std::shuffle(priority.begin(), priority.end(), g.rng);
  const bool by_priority = g.rng() % 2 == 0;
  size_t live = threads;
  ucontext_t base;  // one getcontext (a system call) per block, copied into every fiber
  getcontext(&base);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber &f = g.fibers[i];
    f.ctx = base;
    f.ctx.uc_stack.ss_sp = g.stacks[i];
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &g.sched;
    makecontext(&f.ctx, entry, 0);
    f.state = kRun;
    runnable[i / 32].push_back(i);
  }
  unsigned bar = 0, done = 0;
  std::vector<unsigned> nonempty;
  while (live > 0) {
    unsigned w = 0;
    if (by_priority) {
      for (unsigned p : priority)
        if (!runnable[p].empty()) {
          w = p;
          break;
        }
    } else {
      nonempty.clear();
      for (unsigned p = 0; p < warps; ++p)
        if (!runnable[p].empty()) nonempty.push_back(p);
      w = nonempty[g.rng() % nonempty.size()];
    }
    std::vector<unsigned> &list = runnable[w];
    const size_t k = g.rng() % list.size();
    const unsigned i = list[k];
    list[k] = list.back();
    list.pop_back();
    --live;
    g.cur = static_cast<int>(i);
    threadIdx = uint3{i, 0, 0};
    resume(i);
    switch (g.fibers[i].state) {
      case kDone: ++done; break;
      case kBar: ++bar; break;
      case kWarp:
        if (threads - w * 32 < 32) fatal("a warp intrinsic (full mask) in a partial warp");
        if (++at_warp[w] == 32) {
          at_warp[w] = 0;
          resolve_warp(static_cast<int>(w));
          for (unsigned l = 0; l < 32; ++l) list.push_back(w * 32 + l);
          live += 32;
        }
        break;
      default: fatal("a thread stopped without reaching a sync point");
    }
    if (bar > 0 && bar + done == threads) {
      if (done > 0) fatal("__syncthreads reached by some threads after others exited");
      bar = 0;
      for (unsigned j = 0; j < threads; ++j) {
        g.fibers[j].state = kRun;
        runnable[j / 32].push_back(j);
      }
      live += threads;
    }
  }
  if (done != threads) {
    for (unsigned w = 0; w < warps; ++w)
      if (at_warp[w] > 0) fatal("a warp intrinsic (full mask) reached by only some lanes of a warp");
    fatal("deadlock (threads at a barrier while others wait at a warp intrinsic)");
  }
}

inline uint64_t warp_op(int op, uint64_t v, int arg) {
  Fiber &f = g.fibers[g.cur];
  f.op = op;
  f.val = v;
  f.arg = arg;
  f.state = kWarp;
  yield();
  return g.fibers[g.cur].result;
}

// The bytes the shared memory holds at the start of a block, one per block in turn: all ones (a
// NaN, -1, the largest count), zero (what a static holds at the first launch without poisoning)
// and 0xA5 (a finite float, a negative integer, an invalid bool: UBSan reports its load). A read
// of shared memory that no thread of the block wrote sees one of them, never the previous block's
// values; one that is harmless with one pattern is caught with another.
constexpr unsigned char kPoison[3] = {0xFF, 0x00, 0xA5};

// The static __shared__ variables of the executable or shared library holding `code` (a kernel):
// its sections .noinit, .noinit.* and emu_shared (see the __shared__ macro), read from its ELF
// section headers (each loaded object has its own, found by the address of its code).
inline std::vector<std::pair<unsigned char *, size_t>> shared_sections(const void *code) {
  struct Find {
    uintptr_t addr, bias = 0;
    std::string path;
  } f{reinterpret_cast<uintptr_t>(code)};
  dl_iterate_phdr(
      [](dl_phdr_info *info, size_t, void *data) -> int {
        Find &f = *static_cast<Find *>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr) &ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && f.addr >= lo && f.addr - lo < ph.p_memsz) {
            f.bias = info->dlpi_addr;
            f.path = info->dlpi_name != nullptr && info->dlpi_name[0] != 0 ? info->dlpi_name : "/proc/self/exe";
            return 1;
          }
        }
        return 0;
      },
      &f);
  if (f.path.empty()) fatal("poisoning: no loaded object holds the kernel");
  FILE *file = fopen(f.path.c_str(), "rb");
  if (file == nullptr) fatal("poisoning: cannot open the kernel's object file");
  auto read = [&](void *dst, size_t n, uint64_t at) {
    if (fseek(file, static_cast<long>(at), SEEK_SET) != 0 || fread(dst, 1, n, file) != n)
      fatal("poisoning: cannot read the kernel's ELF section headers");
  };
  ElfW(Ehdr) eh;
  read(&eh, sizeof eh, 0);
  if (memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_shentsize != sizeof(ElfW(Shdr)))
    fatal("poisoning: the kernel's object file is not a native ELF file");
  std::vector<ElfW(Shdr)> sh(1);
  read(sh.data(), sizeof(ElfW(Shdr)), eh.e_shoff);
  const size_t count = eh.e_shnum != 0 ? eh.e_shnum : sh[0].sh_size;  // SHN_UNDEF holds a large count
  const size_t names_index = eh.e_shstrndx != SHN_XINDEX ? eh.e_shstrndx : sh[0].sh_link;
  sh.resize(count);
  read(sh.data(), count * sizeof(ElfW(Shdr)), eh.e_shoff);
  if (names_index >= count) fatal("poisoning: no section name table");
  std::string names(sh[names_index].sh_size, '\0');
  read(names.data(), names.size(), sh[names_index].sh_offset);
  fclose(file);
  std::vector<std::pair<unsigned char *, size_t>> spans;
  for (const ElfW(Shdr) &s : sh) {
    if ((s.sh_flags & SHF_ALLOC) == 0 || s.sh_size == 0 || s.sh_name >= names.size()) continue;
    const char *name = names.c_str() + s.sh_name;
    if (strcmp(name, ".noinit") == 0 || strncmp(name, ".noinit.", 8) == 0 || strcmp(name, "emu_shared") == 0)
      spans.emplace_back(reinterpret_cast<unsigned char *>(f.bias + s.sh_addr), static_cast<size_t>(s.sh_size));
  }
  return spans;
}

// Before a block: its static __shared__ variables (those of every kernel of the kernel's object:
// blocks run one at a time) and its dynamic shared memory get the next poison byte.
inline void poison_shared(const void *kernel, size_t smem) {
  auto it = g.shared_spans.find(kernel);
  if (it == g.shared_spans.end()) it = g.shared_spans.emplace(kernel, shared_sections(kernel)).first;
  g.poison = kPoison[g.blocks++ % 3];
  for (const auto &[p, n] : it->second) memset(p, g.poison, n);
  g.dyn_smem.assign(smem + 16, g.poison);
}

// A launch: checks the configuration like the driver, then runs every block (in a random order).
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, unsigned block, size_t smem, A &&...args) {
  std::lock_guard<std::recursive_mutex> lock(mu);
  if (g.sticky != cudaSuccess) return g.sticky;
  if (grid.x == 0 || grid.x > g.max_grid_x || grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535 ||
      block == 0 || block > 1024)
    return cudaErrorInvalidConfiguration;
  auto it = g.max_dynamic.find(reinterpret_cast<const void *>(kernel));
  const int max_dyn = it == g.max_dynamic.end() ? 48 * 1024 - g.static_smem : it->second;
  if (smem > static_cast<size_t>(max_dyn)) return cudaErrorInvalidValue;  // what the runtime reports
  ++g.launches;
  ++g.launched[reinterpret_cast<const void *>(kernel)];
  g.last_kernel = reinterpret_cast<const void *>(kernel);
  g.last_grid = grid;
  g.last_block = block;
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  g.body = &body;
  gridDim = grid;
  blockDim = dim3(block, 1, 1);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), g.rng);
  for (const uint64_t b : order) {
    poison_shared(reinterpret_cast<const void *>(kernel), smem);
    blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / grid.x / grid.y)};
    run_block(block);
  }
  g.body = nullptr;
  return cudaSuccess;
}

}  // namespace emu

// ---- device intrinsics ----
inline void __syncthreads() {
  emu::g.fibers[emu::g.cur].state = emu::kBar;
  emu::yield();
}
inline void __threadfence() {}

template <typename T>
inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T emu_from(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  if (mask != 0xFFFFFFFFu) emu::fatal("partial shuffle masks are not emulated");
  return emu_from<T>(emu::warp_op(emu::kShflUp, emu_bits(v), static_cast<int>(delta)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  if (mask != 0xFFFFFFFFu) emu::fatal("partial shuffle masks are not emulated");
  return emu_from<T>(emu::warp_op(emu::kShflDown, emu_bits(v), static_cast<int>(delta)));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  if (mask != 0xFFFFFFFFu) emu::fatal("partial shuffle masks are not emulated");
  return emu_from<T>(emu::warp_op(emu::kShflIdx, emu_bits(v), src));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m) {
  if (mask != 0xFFFFFFFFu) emu::fatal("partial shuffle masks are not emulated");
  return emu_from<T>(emu::warp_op(emu::kShflXor, emu_bits(v), m));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xFFFFFFFFu) emu::fatal("partial ballot masks are not emulated");
  return static_cast<unsigned>(emu::warp_op(emu::kBallot, pred ? 1 : 0, 0));
}
// A warp barrier: a rendezvous of the 32 lanes, like the other warp intrinsics.
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  if (mask != 0xFFFFFFFFu) emu::fatal("partial __syncwarp masks are not emulated");
  emu::warp_op(emu::kBallot, 0, 0);
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t)a * b >> 32); }
// Read-only loads: plain loads (the emulation has no texture path).
template <typename T>
inline T __ldg(const T *p) {
  return *p;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned atomicAdd(unsigned *p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicOr(unsigned *p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline unsigned long long atomicOr(unsigned long long *p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicAnd(unsigned *p, unsigned v) {
  const unsigned old = *p;
  *p = old & v;
  return old;
}
// Bits 32 + (sh & 31) .. (sh & 31) of hi:lo.
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  return static_cast<unsigned>((((uint64_t)hi << 32) | lo) >> (sh & 31));
}
inline unsigned atomicMax(unsigned *p, unsigned v) {
  const unsigned old = *p;
  *p = std::max(old, v);
  return old;
}
inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = std::max(old, v);
  return old;
}
// Each one operation rounded to nearest (the file is compiled with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }  // round to nearest even
inline double __ull2double_rn(unsigned long long a) { return static_cast<double>(a); }
inline unsigned __float_as_uint(float f) { return emu_bits(f) & 0xFFFFFFFFu; }
inline float __int_as_float(int i) { return emu_from<float>(static_cast<uint32_t>(i)); }
inline float __uint_as_float(unsigned i) { return emu_from<float>(i); }
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ---- runtime stubs (the emulated device) ----
extern "C" {
inline cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g.sticky;
  emu::g.sticky = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError(void) { return emu::g.sticky; }
// The names and descriptions kernels/status.cu hands to the Rust side (the codes the launchers and
// the emulation return; any other is reported by number on the Rust side's message anyway).
inline const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown (emulated runtime: unnamed code)";
  }
}
inline const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error (emulated runtime)";
  }
}
inline cudaError_t cudaGetDevice(int *d) {
  *d = emu::g.sms;  // one ordinal per emulated SM count (see Global::sms)
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = emu::g.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::g.smem_optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *n, const void *, int, size_t) {
  *n = emu::g.blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *n, const void *, int, size_t,
                                                                          unsigned) {
  *n = emu::g.blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t stream);
}
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T *kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::recursive_mutex> lock(emu::mu);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value + emu::g.static_smem > emu::g.smem_optin) return cudaErrorInvalidValue;
  emu::g.max_dynamic[reinterpret_cast<const void *>(kernel)] = value;
  return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, T *kernel) {
  std::lock_guard<std::recursive_mutex> lock(emu::mu);
  memset(a, 0, sizeof(*a));
  a->sharedSizeBytes = static_cast<size_t>(emu::g.static_smem);
  auto it = emu::g.max_dynamic.find(reinterpret_cast<const void *>(kernel));
  a->maxDynamicSharedSizeBytes = it == emu::g.max_dynamic.end() ? 48 * 1024 - emu::g.static_smem : it->second;
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

namespace emu {
// Stream capture, in the emulated-device build (build.rs): the stand-in libcuda
// (tests/host_emu/fake_libcuda.cpp) records an operation enqueued on a stream it is capturing
// into its graph. `enqueue` hands it over through that library's `dropfuse_emu_record`, found in
// the already loaded libcuda (none in the stand-alone emulation programs: everything runs now).
using RecordFn = int (*)(void *, void (*)(void *), void *, void (*)(void *));
inline RecordFn recorder() {
  static RecordFn found = nullptr;
  if (found == nullptr) {
    if (void *h = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD))
      found = reinterpret_cast<RecordFn>(dlsym(h, "dropfuse_emu_record"));
  }
  return found;
}
// Runs `op` (returning a cudaError_t) now, or records it when `stream` is being captured; a
// recorded operation that fails when its graph is launched aborts the emulation.
template <typename F>
cudaError_t enqueue(cudaStream_t stream, F op) {
  if (stream != nullptr) {
    if (RecordFn rec = recorder()) {
      auto *heap = new F(std::move(op));
      auto run = [](void *c) {
        const cudaError_t err = (*static_cast<F *>(c))();
        if (err != cudaSuccess) {
          fprintf(stderr, "emulated runtime: error %d\n", static_cast<int>(err));
          fatal("an operation recorded in a graph (kernel launch, memset) failed at replay");
        }
      };
      auto destroy = [](void *c) { delete static_cast<F *>(c); };
      if (rec(stream, run, heap, destroy)) return cudaSuccess;
      const cudaError_t err = (*heap)();  // not capturing: run it now
      delete heap;
      return err;
    }
  }
  return op();
}
}  // namespace emu

// The closures handed to enqueue are named variables, never temporaries: with
// -ftrivial-auto-var-init (tests/host_emu/build.rs, build.rs), g++ 12.2 clears the padding of a
// by-copy lambda temporary at wrong offsets (those of a member after an array, less the array's
// size), zeroing live bytes of the captured kernel parameters (multi_sample.cu's SampleParams).
inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t stream) {
  const auto op = [=]() {
    memset(p, v, n);
    return cudaSuccess;
  };
  return emu::enqueue(stream, op);
}

namespace dropfuse {
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, unsigned block, size_t smem, cudaStream_t stream,
                          A &&...args) {
  // The arguments are copied (converted to the kernel's parameter types) for a deferred launch.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const auto op = [=]() {  // named: see cudaMemsetAsync
    return std::apply([&](const auto &...a) { return emu::launch(kernel, grid, block, smem, a...); }, params);
  };
  return emu::enqueue(stream, op);
}
}  // namespace dropfuse
