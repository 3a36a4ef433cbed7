// The common preamble of the host emulation programs (tests/host_emu/*_emu.cpp): the CHECK counters,
// the deterministic random source, element conversions and bit comparisons, random inputs, and
// buffers with guards around a view at a chosen element misalignment. Include after
// cuda_fiber_emu.h and the kernel files (directly or through contract_model.h, the contract model
// of the randomised kernels). Everything is in namespace `model`; the programs say
// `using namespace model;`.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>

namespace model {

// ---- checks ----

inline int failures = 0;
inline long checks = 0;
// Counts a check; prints the first 40 failures (the message: printf arguments).
#define CHECK(c, ...)                               \
  do {                                              \
    ++model::checks;                                \
    if (!(c)) {                                     \
      if (model::failures++ < 40) {                 \
        printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        printf(__VA_ARGS__);                        \
        printf("\n");                               \
        fflush(stdout);                             \
      }                                             \
    }                                               \
  } while (0)

// ---- random source ----

// One generator per program, seeded by seed_rng() at the start of main.
inline std::mt19937_64 rng;
inline uint64_t rnd(uint64_t n) { return n ? rng() % n : 0; }
inline uint64_t rnd64() { return rng(); }
inline double unit() { return (rng() >> 11) * (1.0 / 9007199254740992.0); }
inline bool coin(unsigned one_in) { return rnd(one_in) == 0; }

// Seeds the generator with the program's seed, or with DROPFUSE_EMU_SEED when set (to reproduce
// or vary the random cases); the seed is printed either way.
inline void seed_rng(uint64_t program_seed) {
  const char *e = getenv("DROPFUSE_EMU_SEED");
  const uint64_t seed = e ? strtoull(e, nullptr, 0) : program_seed;
  rng.seed(seed);
  printf("seed: %llu\n", (unsigned long long)seed);
}

// ---- element types ----

template <typename T> struct Ty;
template <> struct Ty<float> {
  static float to(float v) { return v; }
  static float from(float v) { return v; }
  static constexpr dropfuse_dtype code = DROPFUSE_F32;
  static constexpr const char *name = "f32";
};
template <> struct Ty<__half> {
  static float to(__half v) { return __half2float(v); }
  static __half from(float v) { return __float2half_rn(v); }
  static constexpr dropfuse_dtype code = DROPFUSE_F16;
  static constexpr const char *name = "f16";
};
template <> struct Ty<__nv_bfloat16> {
  static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static constexpr dropfuse_dtype code = DROPFUSE_BF16;
  static constexpr const char *name = "bf16";
};

// The bits of a value of 1, 2, 4 or 8 bytes (zero-extended), and back.
template <typename T> using Bits = std::conditional_t<(sizeof(T) <= 4), uint32_t, uint64_t>;
template <typename T> Bits<T> bits(T v) {
  static_assert(sizeof(T) <= 8, "bits of a scalar");
  Bits<T> b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> T from_bits(uint64_t b) {
  static_assert(sizeof(T) <= 8, "bits of a scalar");
  T v;
  memcpy(static_cast<void *>(&v), &b, sizeof(T));  // little-endian: the low bytes
  return v;
}
inline uint32_t fbits(float f) { return bits(f); }
inline uint64_t dbits(double f) { return bits(f); }
// A value whose every byte is `byte`.
template <typename T> T bytes_of(unsigned char byte) {
  T v;
  memset(static_cast<void *>(&v), byte, sizeof(T));
  return v;
}

// Computed values: equal bits, or both NaN (NaN payloads are not part of any contract).
template <typename T> bool same(T a, T b) {
  return bits(a) == bits(b) || (std::isnan(Ty<T>::to(a)) && std::isnan(Ty<T>::to(b)));
}

// ---- random inputs ----

// Finite values, specials (NaN, infinities, -0, subnormals) and arbitrary bit patterns.
template <typename T> T random_value() {
  switch (rnd(8)) {
    case 0: {
      const float sp[] = {NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-40f, -3e-39f, 65504.0f, 3.0e38f};
      return Ty<T>::from(sp[rnd(9)]);
    }
    case 1: return from_bits<T>((uint32_t)rng() & (sizeof(T) == 4 ? 0xFFFFFFFFu : 0xFFFFu));
    default: return Ty<T>::from((float)((int64_t)rnd(4001) - 2000) / 64.0f);
  }
}

// Uniform in [-8, 8), or (one in 20) +infinity, NaN or -0.
template <typename T> T plain_value() {
  switch (rnd(60)) {
    case 0: return Ty<T>::from(INFINITY);
    case 1: return Ty<T>::from(NAN);
    case 2: return Ty<T>::from(-0.0f);
    default: return Ty<T>::from((float)(unit() * 16 - 8));
  }
}

// A value mostly in [-amp, amp], sometimes a special one.
inline float value(float amp, bool specials) {
  if (specials && coin(16)) {
    static const uint32_t special_bits[] = {0x7FC00000u, 0xFF800000u, 0x7F800000u, 0x80000000u, 0x00000000u,
                                            0x00000001u, 0x80800000u, 0x7F7FFFFFu, 0x477FE000u /* 65504 */};
    return from_bits<float>(special_bits[rnd(sizeof(special_bits) / 4)]);
  }
  if (coin(12)) return 0.0f;
  return static_cast<float>((unit() * 2 - 1) * amp);
}

// Element misalignment of a view: mostly 16-byte aligned (the vector paths), sometimes not.
template <typename T> size_t random_mis() { return coin(3) ? rnd(16 / sizeof(T)) : 0; }

// ---- buffers with guards ----

// A view p[0..n) of T, `off` elements past `guard` guard elements after a 64-byte boundary (off = 0:
// the view is 16-byte aligned), inside an allocation whose every other byte is a guard: guards()
// checks that none of them changed. Constructed as Buf(n, off): guard bytes 0x5C and view bytes
// 0xA5 (an unwritten view is visible); Buf(n, off, fill[, guard]): guards and view `fill`.
// fill(v) refills everything, view included.
template <typename T> struct Buf {
  static constexpr size_t kGuard = 64 / sizeof(T);  // default guard elements: 64 bytes
  std::vector<unsigned char> raw;
  T *p = nullptr;
  size_t n = 0, off = 0;
  T guard_value{};
  Buf() = default;
  Buf(size_t count, size_t mis) { init(count, mis); }
  Buf(size_t count, size_t mis, T fill_value, size_t guard = kGuard) {
    init(count, mis, fill_value, fill_value, guard);
  }
  void init(size_t count, size_t mis) { init(count, mis, bytes_of<T>(0x5C), bytes_of<T>(0xA5), kGuard); }
  void init(size_t count, size_t mis, T guard_v, T view_v, size_t guard) {
    n = count;
    off = mis;
    // 64 bytes of slack for the alignment: the guards after the view get what is left of it
    raw.assign((count + mis + 2 * guard) * sizeof(T) + 64, 0);
    if (reinterpret_cast<uintptr_t>(raw.data()) % alignof(T) != 0) {
      printf("EMULATION ERROR: a buffer allocation is not aligned for its elements\n");
      abort();
    }
    const uintptr_t base = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63);
    p = reinterpret_cast<T *>(base) + guard + mis;
    fill(guard_v);
    for (size_t i = 0; i < n; ++i) p[i] = view_v;
  }
  // Every element of the allocation, guards and view, becomes v (the guards' value from now on).
  void fill(T v) {
    guard_value = v;
    for (size_t i = 0; i < slots(); ++i) memcpy(raw.data() + i * sizeof(T), &v, sizeof(T));
  }
  // Every element outside the view still holds v / the guard value.
  bool guards(T v) const {
    const size_t front = reinterpret_cast<const unsigned char *>(p) - raw.data();
    for (size_t i = 0; i < slots(); ++i) {
      const size_t at = i * sizeof(T);
      if (at >= front && at < front + n * sizeof(T)) continue;
      if (memcmp(raw.data() + at, &v, sizeof(T)) != 0) return false;
    }
    return true;
  }
  bool guards() const { return guards(guard_value); }
  size_t slots() const { return raw.size() / sizeof(T); }
  T &operator[](size_t i) { return p[i]; }
  const T &operator[](size_t i) const { return p[i]; }
  std::vector<T> copy() const { return std::vector<T>(p, p + n); }
  std::vector<unsigned char> bytes() const {
    return std::vector<unsigned char>(reinterpret_cast<const unsigned char *>(p),
                                      reinterpret_cast<const unsigned char *>(p) + n * sizeof(T));
  }
  // The same view contents, bit for bit.
  bool operator==(const Buf &o) const { return n == o.n && memcmp(p, o.p, n * sizeof(T)) == 0; }
};

// Poisoned buffers: every element (guards and view) a value no kernel writes.
constexpr uint32_t kPoisonWord = 0xDEADBEEFu;
template <typename T> T poison() { return from_bits<T>(sizeof(T) == 4 ? 0x7FBADBADu : 0x7DBBu); }
template <typename T> void fill_poison(Buf<T> &b) { b.fill(poison<T>()); }
inline void fill_poison(Buf<uint32_t> &b) { b.fill(kPoisonWord); }
// Guards (everything outside p[0..n)) still hold poison_bits.
template <typename T> bool guards_ok(const Buf<T> &b, uint32_t poison_bits) {
  return b.guards(from_bits<T>(poison_bits));
}

// The emulated device of the multi-sample and bias + dropout + residual programs: one SM
// (launch.cuh caches the first SM count it reads, so set before the first launch), 1-4 blocks per
// SM: small grids, so that grid-stride loops wrap.
inline void random_one_sm_device() {
  emu::g.sms = 1;
  emu::g.blocks_per_sm = 1 + static_cast<int>(rnd(4));
}

// The last line of every program (the tests look for "failures: 0"); returns main's status.
inline int report() {
  printf("launches: %lu, checks: %ld, failures: %d\n", (unsigned long)emu::g.launches, checks, failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace model
