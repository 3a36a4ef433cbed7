// The contract model shared by the host emulation programs of the randomised kernels (dropout and
// DropBlock through graph_state_emu.cpp, structured, MC dropout, multi-sample, bias + dropout +
// residual): the mask contract of kernels/dropfuse.h written from its text, independent of
// kernels/common/philox.cuh. Philox4x32-10 with the cuRAND / Random123 constants (checked against
// Random123's known-answer vectors, the ones of tests/philox_kat.rs, by philox_kat_ok), the word
// of element e of stream (seed, offset), the keep test against a threshold in [0, 2^32], packed
// masks, drop probabilities as the launchers take them, and the value of a kept or dropped element.
// Include after cuda_fiber_emu.h and the kernel files; brings in emu_common.h.
#pragma once
#include "emu_common.h"

namespace model {

// ---- Philox4x32-10 ----

// Ten rounds on the counter ctr with the key {low, high} half of `key` (the stream's seed).
inline void philox(const uint32_t ctr[4], uint64_t key, uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
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

// Random123's known answers (kat_vectors; tests/philox_kat.rs checks the crate's Philox on the same).
inline bool philox_kat_ok() {
  const uint32_t zero[4] = {0, 0, 0, 0}, ones[4] = {~0u, ~0u, ~0u, ~0u};
  const uint32_t pi[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u};
  uint32_t a[4], b[4], c[4];
  philox(zero, 0, a);
  philox(ones, ~uint64_t{0}, b);
  philox(pi, 0x299f31d0a4093822ull, c);  // key {0xa4093822, 0x299f31d0}
  return a[0] == 0x6627e8d5u && a[1] == 0xe169c58du && a[2] == 0xbc57ac4cu && a[3] == 0x9b00dbd8u &&
         b[0] == 0x408f276du && b[1] == 0x41c83b0eu && b[2] == 0xa20bc7c6u && b[3] == 0x6d5451fdu &&
         c[0] == 0xd16cfe09u && c[1] == 0x94fdccebu && c[2] == 0x5001e420u && c[3] == 0x24126ea1u;
}

// ---- the words of a stream ----

// Block b of stream (seed, offset): counter {b low, b high, offset low, offset high}, key seed.
inline void philox_block(uint64_t seed, uint64_t offset, uint64_t b, uint32_t out[4]) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), static_cast<uint32_t>(offset),
                           static_cast<uint32_t>(offset >> 32)};
  philox(ctr, seed, out);
}

// Element e's word: word e % 4 of block e / 4.
inline uint32_t word_of(uint64_t seed, uint64_t offset, uint64_t e) {
  uint32_t out[4];
  philox_block(seed, offset, e >> 2, out);
  return out[e & 3];
}

// word_of for one stream, caching the last block (sequential reads).
struct Words {
  uint64_t seed, offset;
  uint64_t cached = ~uint64_t{0};
  bool valid = false;
  uint32_t w[4];
  Words(uint64_t s, uint64_t o) : seed(s), offset(o) {}
  uint32_t operator()(uint64_t e) {
    const uint64_t b = e >> 2;
    if (!valid || b != cached) {
      philox_block(seed, offset, b, w);
      cached = b;
      valid = true;
    }
    return w[e & 3];
  }
};

// ---- keep test and masks ----

// threshold in [0, 2^32]: an element is kept iff its word >= threshold (0 keeps everything, 2^32
// drops everything). DropBlock's block seeds are the elements this drops.
inline bool kept(uint32_t word, uint64_t threshold) { return uint64_t{word} >= threshold; }
inline bool kept(uint64_t seed, uint64_t offset, uint64_t e, uint64_t threshold) {
  return kept(word_of(seed, offset, e), threshold);
}

// The mask of n elements at element offset eo: ceil(n / 32) words, bit i of word i / 32 element
// eo + i's keep flag, unused bits 0.
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

// A dropout element's bits: kept ? T(float(x) * scale) (one f32 multiply, one rounding) : +0.
template <typename T> uint32_t model_value(T x, bool keep, float scale) {
  if (!keep) return 0;
  volatile float prod = Ty<T>::to(x) * scale;  // one rounded f32 product
  return bits(Ty<T>::from(prod));
}

}  // namespace model
