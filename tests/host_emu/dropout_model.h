// Plain models for the host emulations of the dropout-like kernels (structured_emu.cpp,
// mc_dropout_emu.cpp): the mask contract of kernels/dropfuse.h written out from scratch (an
// independent Philox4x32-10, checked against Random123's known answers by philox_kat_ok), element
// conversions, buffers with poisoned guards, random inputs and the CHECK counters. Include after
// the kernel file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

inline std::mt19937_64 rng(20251128);
static uint64_t rnd(uint64_t n) { return n ? rng() % n : 0; }

inline int failures = 0, checks = 0;
#define CHECK(c, ...)                               \
  do {                                              \
    ++checks;                                       \
    if (!(c)) {                                     \
      if (failures++ < 40) {                        \
        printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        printf(__VA_ARGS__);                        \
        printf("\n");                               \
      }                                             \
    }                                               \
  } while (0)

// ---- the contract, plainly ----

// Philox4x32-10 (Random123), written out.
static void philox(const uint32_t ctr[4], uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// The random word of global index e in stream (seed, offset).
static uint32_t word_of(uint64_t seed, uint64_t offset, uint64_t e) {
  const uint64_t b = e / 4;
  const uint32_t ctr[4] = {(uint32_t)b, (uint32_t)(b >> 32), (uint32_t)offset, (uint32_t)(offset >> 32)};
  uint32_t out[4];
  philox(ctr, seed, out);
  return out[e % 4];
}

static bool kept(uint64_t seed, uint64_t offset, uint64_t e, uint64_t threshold) {
  return (uint64_t)word_of(seed, offset, e) >= threshold;
}

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

template <typename T> static uint32_t bits(T v) {
  uint32_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> static T from_bits(uint32_t b) {
  T v;
  memcpy(static_cast<void *>(&v), &b, sizeof(T));
  return v;
}

// Element e's value: kept ? T(float(x) * scale) (one f32 multiply, one rounding) : +0.
template <typename T> static uint32_t model_value(T x, bool keep, float scale) {
  if (!keep) return 0;
  volatile float prod = Ty<T>::to(x) * scale;  // one rounded f32 product
  return bits(Ty<T>::from(prod));
}

// ---- buffers with guards ----

constexpr size_t kGuard = 8;  // elements / words before and after each region

template <typename T> struct Buf {
  std::vector<unsigned char> raw;
  T *base;  // 64-byte aligned, kGuard + off elements before p
  T *p;
  size_t n, off;
  Buf(size_t n_, size_t off_) : raw((n_ + off_ + 2 * kGuard) * sizeof(T) + 128), n(n_), off(off_) {
    uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63);
    base = reinterpret_cast<T *>(a);
    p = base + kGuard + off;
  }
  size_t total() const { return n + off + 2 * kGuard; }
};

constexpr uint32_t kPoisonWord = 0xDEADBEEFu;
template <typename T> static T poison() { return from_bits<T>(sizeof(T) == 4 ? 0x7FBADBADu : 0x7DBBu); }

template <typename T> static void fill_poison(Buf<T> &b) {
  for (size_t i = 0; i < b.total(); ++i) b.base[i] = poison<T>();
}
static void fill_poison(Buf<uint32_t> &b) {
  for (size_t i = 0; i < b.total(); ++i) b.base[i] = kPoisonWord;
}

// Guards (everything outside p[0..n)) still poisoned.
template <typename T> static bool guards_ok(const Buf<T> &b, uint32_t poison_bits) {
  for (size_t i = 0; i < b.total(); ++i) {
    const bool inside = i >= kGuard + b.off && i < kGuard + b.off + b.n;
    if (!inside && bits(b.base[i]) != poison_bits) return false;
  }
  return true;
}

// Inputs: finite values, specials (NaN, infinities, -0, subnormals) and arbitrary bit patterns.
template <typename T> static T random_value() {
  switch (rnd(8)) {
    case 0: {
      const float sp[] = {NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-40f, -3e-39f, 65504.0f, 3.0e38f};
      return Ty<T>::from(sp[rnd(9)]);
    }
    case 1: return from_bits<T>((uint32_t)rng() & (sizeof(T) == 4 ? 0xFFFFFFFFu : 0xFFFFu));
    default: return Ty<T>::from((float)((int64_t)rnd(4001) - 2000) / 64.0f);
  }
}


// Random123's known answers for the Philox above.
static bool philox_kat_ok() {
  const uint32_t c0[4] = {0, 0, 0, 0}, c1[4] = {~0u, ~0u, ~0u, ~0u};
  const uint32_t c2[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u};
  uint32_t a[4], b[4], c[4];
  philox(c0, 0, a);
  philox(c1, ~uint64_t(0), b);
  philox(c2, 0x299f31d0a4093822ull, c);
  return a[0] == 0x6627e8d5u && a[1] == 0xe169c58du && a[2] == 0xbc57ac4cu && a[3] == 0x9b00dbd8u &&
         b[0] == 0x408f276du && b[1] == 0x41c83b0eu && b[2] == 0xa20bc7c6u && b[3] == 0x6d5451fdu &&
         c[0] == 0xd16cfe09u && c[1] == 0x94fdccebu && c[2] == 0x5001e420u && c[3] == 0x24126ea1u;
}
