// The only GPU copy of the mask contract (kernels/dropfuse.h): Philox4x32-10 and the mapping
// from a global element index to its 32-bit random word.
#pragma once
#include <stdint.h>

namespace dropfuse {

// The key schedule of one seed: the key of each of the 10 rounds. Computed once on the host and
// passed as a kernel argument, so rounds read their keys as constant operands instead of
// recomputing the bumps (integer adds would compete with the multiplies Philox is bound by).
struct PhiloxKey {
  uint32_t k0[10], k1[10];
};

inline PhiloxKey philox_key(uint64_t seed) {
  PhiloxKey k;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    k.k0[round] = k0;
    k.k1[round] = k1;
    k0 += 0x9E3779B9u;  // key bump between rounds (wrapping)
    k1 += 0xBB67AE85u;
  }
  return k;
}

// Philox4x32-10 (Random123) with the cuRAND constants.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, const PhiloxKey &k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    // one 32x32 -> 64 multiply each (IMAD.WIDE)
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c.z;
    const uint32_t lo0 = static_cast<uint32_t>(p0), hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1), hi1 = static_cast<uint32_t>(p1 >> 32);
    c = make_uint4(hi1 ^ c.y ^ k.k0[round], lo1, hi0 ^ c.w ^ k.k1[round], lo0);
  }
  return c;
}

// The four words of Philox block `block` (elements 4*block .. 4*block+3) in stream `offset`.
__device__ __forceinline__ uint4 philox_block(const PhiloxKey &key, uint64_t offset, uint64_t block) {
  const uint4 ctr = make_uint4(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                               static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  return philox4x32_10(ctr, key);
}

__device__ __forceinline__ uint32_t uint4_get(uint4 v, unsigned i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Word of one element (tails: one Philox call per element).
__device__ __forceinline__ uint32_t element_word(const PhiloxKey &key, uint64_t offset, uint64_t e) {
  return uint4_get(philox_block(key, offset, e >> 2), static_cast<unsigned>(e & 3));
}

// Words of V consecutive elements e .. e+V-1 (V a multiple of 4): V/4 Philox calls when e is a
// multiple of 4, one more otherwise. `e % 4` is the same for every chunk of a launch, so the branch
// is uniform; all array indices are compile-time constants (the words stay in registers).
template <int V>
__device__ __forceinline__ void element_words(const PhiloxKey &key, uint64_t offset, uint64_t e,
                                              uint32_t (&w)[V]) {
  static_assert(V % 4 == 0, "V must be a multiple of 4");
  const uint64_t block = e >> 2;
  const unsigned shift = static_cast<unsigned>(e & 3);
  uint32_t r[V + 4];
#pragma unroll
  for (int j = 0; j < V / 4; ++j) {
    const uint4 q = philox_block(key, offset, block + j);
    r[4 * j] = q.x;
    r[4 * j + 1] = q.y;
    r[4 * j + 2] = q.z;
    r[4 * j + 3] = q.w;
  }
  if (shift == 0) {
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = r[j];
  } else {
    const uint4 q = philox_block(key, offset, block + V / 4);
    r[V] = q.x;
    r[V + 1] = q.y;
    r[V + 2] = q.z;
    r[V + 3] = q.w;
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = shift == 1 ? r[j + 1] : shift == 2 ? r[j + 2] : r[j + 3];
  }
}

// The keep test of one launch: word >= threshold with threshold in [0, 2^32], done in 32 bits:
// threshold 2^32 (p = 1) is the uniform flag `none`.
struct KeepTest {
  uint32_t threshold;
  bool none;
};

inline KeepTest keep_test(uint64_t threshold) {
  return {static_cast<uint32_t>(threshold > 0xffffffffull ? 0xffffffffull : threshold),
          threshold > 0xffffffffull};
}

__device__ __forceinline__ bool keep_word(uint32_t word, KeepTest t) { return !t.none && word >= t.threshold; }

}  // namespace dropfuse
