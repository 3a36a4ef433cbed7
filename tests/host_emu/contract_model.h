// Plain C++ models shared by the host emulation programs of multi-sample dropout and bias +
// dropout + residual (multi_sample_emu.cpp, bias_dropout_residual_emu.cpp): the mask contract of
// kernels/dropfuse.h written from its text (Philox4x32-10 with the cuRAND constants, checked
// against Random123's known-answer vectors at start-up, independent of kernels/common/philox.cuh),
// element conversions, a deterministic random source, a CHECK macro, and buffers with guard
// bytes around a view at a chosen element misalignment.
#pragma once
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
inline int failures = 0, checks = 0;
#define CHECK(c, ...)                                 \
  do {                                                \
    ++model::checks;                                  \
    if (!(c)) {                                       \
      if (model::failures++ < 40) {                   \
        printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
        printf(__VA_ARGS__);                          \
        printf("\n");                                 \
        fflush(stdout);                               \
      }                                               \
    }                                                 \
  } while (0)

// ---- random source ----
inline std::mt19937_64 rng(20250101);
inline uint64_t rnd(uint64_t n) { return n ? rng() % n : 0; }
inline uint64_t rnd64() { return rng(); }
inline double unit() { return (rng() >> 11) * (1.0 / 9007199254740992.0); }
inline bool coin(unsigned one_in) { return rnd(one_in) == 0; }

// ---- Philox4x32-10 and the mask contract ----
inline void philox(const uint32_t in[4], uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c0 = in[0], c1 = in[1], c2 = in[2], c3 = in[3];
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0;
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n1 = static_cast<uint32_t>(p1);
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    const uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

inline bool philox_self_test() {
  const uint32_t z[4] = {0, 0, 0, 0}, ones[4] = {~0u, ~0u, ~0u, ~0u};
  const uint32_t pi[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u};
  uint32_t o[4];
  philox(z, 0, 0, o);
  bool ok = o[0] == 0x6627e8d5u && o[1] == 0xe169c58du && o[2] == 0xbc57ac4cu && o[3] == 0x9b00dbd8u;
  philox(ones, ~0u, ~0u, o);
  ok = ok && o[0] == 0x408f276du && o[1] == 0x41c83b0eu && o[2] == 0xa20bc7c6u && o[3] == 0x6d5451fdu;
  philox(pi, 0xa4093822u, 0x299f31d0u, o);
  ok = ok && o[0] == 0xd16cfe09u && o[1] == 0x94fdccebu && o[2] == 0x5001e420u && o[3] == 0x24126ea1u;
  return ok;
}

// word(e) of stream (seed, offset), a small cache of the last block.
struct Words {
  uint64_t seed, offset;
  uint64_t cached = ~uint64_t{0};
  bool valid = false;
  uint32_t w[4];
  Words(uint64_t s, uint64_t o) : seed(s), offset(o) {}
  uint32_t operator()(uint64_t e) {
    const uint64_t b = e >> 2;
    if (!valid || b != cached) {
      const uint32_t in[4] = {static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), static_cast<uint32_t>(offset),
                              static_cast<uint32_t>(offset >> 32)};
      philox(in, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), w);
      cached = b;
      valid = true;
    }
    return w[e & 3];
  }
};

// threshold in [0, 2^32]: kept iff word >= threshold.
inline bool kept(uint32_t word, uint64_t threshold) { return uint64_t{word} >= threshold; }

// The mask of n slice elements at element offset eo: ceil(n / 32) words, unused bits 0.
inline std::vector<uint32_t> mask_of(uint64_t seed, uint64_t offset, uint64_t eo, uint64_t n, uint64_t threshold) {
  std::vector<uint32_t> m((n + 31) / 32, 0);
  Words w(seed, offset);
  for (uint64_t i = 0; i < n; ++i)
    if (kept(w(eo + i), threshold)) m[i >> 5] |= 1u << (i & 31);
  return m;
}
inline bool bit(const std::vector<uint32_t> &m, uint64_t i) { return (m[i >> 5] >> (i & 31)) & 1u; }

// A drop probability as the launchers take it: threshold round(p 2^32), scale float(1 / (1 - p)).
struct Drop {
  double p;
  uint64_t threshold;
  float scale;
};
inline Drop drop_of(double p) {
  Drop d;
  d.p = p;
  d.threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  d.scale = p == 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - p));
  return d;
}
inline Drop random_drop() {
  switch (rnd(6)) {
    case 0: return drop_of(0.0);
    case 1: return drop_of(1.0);
    case 2: {  // extreme thresholds: 1 and 2^32 - 1
      Drop d = drop_of(0.5);
      d.threshold = coin(2) ? 1 : 0xFFFFFFFFull;
      return d;
    }
    default: return drop_of(unit() * 0.95);
  }
}

// An offset of a stream: small, random, or near 2^64 (so that offset + k wraps).
inline uint64_t random_offset(uint64_t span) {
  switch (rnd(4)) {
    case 0: return rnd(1000);
    case 1: return ~uint64_t{0} - rnd(span + 2);
    case 2: return (uint64_t{1} << 32) - rnd(span + 2);  // crosses into the high offset word
    default: return rnd64();
  }
}

// DROPFUSE_EMU_SEED (optional) reseeds the random cases; the seed is printed either way.
inline void seed_from_env() {
  const char *e = getenv("DROPFUSE_EMU_SEED");
  const uint64_t seed = e ? strtoull(e, nullptr, 0) : 20250101;
  rng.seed(seed);
  printf("seed: %llu\n", (unsigned long long)seed);
}

// ---- element types ----
template <typename T> struct Conv;
template <> struct Conv<float> {
  static float to(float v) { return v; }
  static float from(float v) { return v; }
  static constexpr dropfuse_dtype code = DROPFUSE_F32;
  static constexpr const char *name = "f32";
};
template <> struct Conv<__half> {
  static float to(__half v) { return __half2float(v); }
  static __half from(float v) { return __float2half_rn(v); }
  static constexpr dropfuse_dtype code = DROPFUSE_F16;
  static constexpr const char *name = "f16";
};
template <> struct Conv<__nv_bfloat16> {
  static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static constexpr dropfuse_dtype code = DROPFUSE_BF16;
  static constexpr const char *name = "bf16";
};

inline uint32_t fbits(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
}
inline uint64_t dbits(double f) {
  uint64_t b;
  memcpy(&b, &f, 8);
  return b;
}
template <typename T> uint32_t tbits(T v) {
  uint32_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
// Equal bit for bit, or both NaN (NaN payloads are not part of any contract).
template <typename T> bool same(T a, T b) {
  return tbits(a) == tbits(b) || (std::isnan(Conv<T>::to(a)) && std::isnan(Conv<T>::to(b)));
}

// A random value: mostly in [-amp, amp], sometimes a special one.
inline float value(float amp, bool specials) {
  if (specials && coin(16)) {
    static const uint32_t bits[] = {0x7FC00000u, 0xFF800000u, 0x7F800000u, 0x80000000u, 0x00000000u,
                                    0x00000001u, 0x80800000u, 0x7F7FFFFFu, 0x477FE000u /* 65504 */};
    float f;
    memcpy(&f, &bits[rnd(sizeof(bits) / 4)], 4);
    return f;
  }
  if (coin(12)) return 0.0f;
  return static_cast<float>((unit() * 2 - 1) * amp);
}

// A view of n elements of T, `mis` elements past a 64-byte boundary, with guard bytes on both
// sides (checked by intact()). The view starts poisoned (0xA5 bytes) unless filled.
template <typename T> struct Buf {
  static constexpr size_t kGuard = 64;
  std::vector<unsigned char> raw;
  T *p = nullptr;
  size_t n = 0, front = 0;
  Buf() = default;
  Buf(size_t count, size_t mis) { init(count, mis); }
  void init(size_t count, size_t mis) {
    n = count;
    raw.assign(count * sizeof(T) + 2 * kGuard + 128 + mis * sizeof(T), 0x5C);
    const uintptr_t base = (reinterpret_cast<uintptr_t>(raw.data()) + kGuard + 63) & ~uintptr_t(63);
    p = reinterpret_cast<T *>(base) + mis;
    front = reinterpret_cast<unsigned char *>(p) - raw.data();
    memset(p, 0xA5, count * sizeof(T));
  }
  bool intact() const {
    for (size_t i = 0; i < front; ++i)
      if (raw[i] != 0x5C) return false;
    for (size_t i = front + n * sizeof(T); i < raw.size(); ++i)
      if (raw[i] != 0x5C) return false;
    return true;
  }
  T &operator[](size_t i) { return p[i]; }
  const T &operator[](size_t i) const { return p[i]; }
  std::vector<unsigned char> bytes() const {
    return std::vector<unsigned char>(reinterpret_cast<const unsigned char *>(p),
                                      reinterpret_cast<const unsigned char *>(p) + n * sizeof(T));
  }
};

// Element misalignment of a view: mostly 16-byte aligned (the vector paths), sometimes not.
template <typename T> size_t random_mis() { return coin(3) ? rnd(16 / sizeof(T)) : 0; }

// The emulated device: one SM (launch.cuh caches the first SM count it reads, so set before the
// first launch), 1-4 blocks per SM: small grids, so that grid-stride loops wrap.
inline void random_device() {
  emu::g.sms = 1;
  emu::g.blocks_per_sm = 1 + static_cast<int>(rnd(4));
}

}  // namespace model
