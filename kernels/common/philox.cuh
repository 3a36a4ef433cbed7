// The only GPU copy of the mask contract (kernels/dropfuse.h): Philox4x32-10 and the mapping
// from a global element index to its 32-bit random word.
#pragma once
#include <stdint.h>

namespace dropfuse {

// The key schedule of one seed: the key of each of the 10 rounds. Computed once on the host and
// passed as a kernel argument, so rounds read their keys as constant operands instead of
// recomputing the bumps (integer adds would compete with the multiplies Philox is bound by).
// Graph-safe launches (the seed and offset read from device memory) compute it on the device.
struct PhiloxKey {
  uint32_t k0[10], k1[10];
};

__host__ __device__ inline PhiloxKey philox_key(uint64_t seed) {
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

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;

__device__ __forceinline__ uint32_t lo32(uint64_t v) { return static_cast<uint32_t>(v); }
__device__ __forceinline__ uint32_t hi32(uint64_t v) { return static_cast<uint32_t>(v >> 32); }

// Philox rounds `first` .. 9 of Random123's Philox4x32-10 (cuRAND constants) on state c.
template <int first>
__device__ __forceinline__ uint4 philox_rounds(uint4 c, const PhiloxKey &k) {
#pragma unroll
  for (int round = first; round < 10; ++round) {
    // one 32x32 -> 64 multiply each (IMAD.WIDE)
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c.z;
    c = make_uint4(hi32(p1) ^ c.y ^ k.k0[round], lo32(p1), hi32(p0) ^ c.w ^ k.k1[round], lo32(p0));
  }
  return c;
}

// One launch's Philox stream: the seed's round keys, the stream offset (counter words 2 and 3) and
// the parts of rounds 1 and 2 that do not depend on the low counter word when the high counter
// word (block >> 32) is `hi`. Every block below 2^32 (elements below 2^34) shares hi = 0, so most
// launches run the fast path: 18 of a block's 20 products are left (round 1's M1 product and round
// 2's M0 product are per launch), and the round-1 M0 products of a chunk's blocks are one multiply
// plus 64-bit adds. Measured on an H200 together with branch-free scaling: 7% faster f16 forward.
struct PhiloxStream {
  PhiloxKey key;
  uint32_t off_lo, off_hi;
  uint32_t hi;  // high counter word of the fast path
  uint32_t r1_z, r2_x, r2_z, r2_w;  // see philox_fast
};

__host__ __device__ inline uint64_t host_mul(uint32_t a, uint32_t b) { return static_cast<uint64_t>(a) * b; }

__host__ __device__ inline PhiloxStream philox_stream(uint64_t seed, uint64_t offset, uint64_t first_element) {
  PhiloxStream s;
  s.key = philox_key(seed);
  s.off_lo = static_cast<uint32_t>(offset);
  s.off_hi = static_cast<uint32_t>(offset >> 32);
  s.hi = static_cast<uint32_t>((first_element >> 2) >> 32);
  // Round 1 on (lo, hi, off_lo, off_hi): x1 and y1 are independent of lo.
  const uint64_t u1 = host_mul(kPhiloxM1, s.off_lo);
  const uint32_t x1 = static_cast<uint32_t>(u1 >> 32) ^ s.hi ^ s.key.k0[0];
  const uint32_t y1 = static_cast<uint32_t>(u1);
  // Round 2: the M0 product is of x1, so independent of lo too.
  const uint64_t u2 = host_mul(kPhiloxM0, x1);
  s.r1_z = s.off_hi ^ s.key.k1[0];
  s.r2_x = y1 ^ s.key.k0[1];
  s.r2_z = static_cast<uint32_t>(u2 >> 32) ^ s.key.k1[1];
  s.r2_w = static_cast<uint32_t>(u2);
  return s;
}

// Philox4x32-10 of counter (block, offset), any block.
__device__ __forceinline__ uint4 philox_block(const PhiloxStream &s, uint64_t block) {
  return philox_rounds<0>(make_uint4(lo32(block), hi32(block), s.off_lo, s.off_hi), s.key);
}

// The same for a block whose high word is s.hi, given p0 = M0 * lo32(block) (round 1's product).
__device__ __forceinline__ uint4 philox_fast(const PhiloxStream &s, uint64_t p0) {
  const uint32_t z1 = hi32(p0) ^ s.r1_z;  // round 1: (x1, y1, z1, lo32(p0))
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * z1;  // round 2
  return philox_rounds<2>(make_uint4(hi32(p1) ^ s.r2_x, lo32(p1), s.r2_z ^ lo32(p0), s.r2_w), s.key);
}

__device__ __forceinline__ uint32_t uint4_get(uint4 v, unsigned i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Word of one element (tails: one Philox call per element).
__device__ __forceinline__ uint32_t element_word(const PhiloxStream &s, uint64_t e) {
  return uint4_get(philox_block(s, e >> 2), static_cast<unsigned>(e & 3));
}

// Words of V consecutive elements e .. e+V-1 (V a multiple of 4): V/4 Philox calls when e is a
// multiple of 4, one more otherwise. `e % 4` is the same for every chunk of a launch, so the branch
// is uniform; kBlockAligned (the caller guarantees e % 4 == 0) drops the other branch, which frees
// the registers of the extra block; all array indices are compile-time constants (the words stay in registers). When all
// blocks share the stream's high word (the usual case, uniform across a warp), round 1's product of
// block b + j is M0 * lo(b) + j * M0: one multiply per chunk, 64-bit adds for the rest.
template <int V, bool kBlockAligned>
__device__ __forceinline__ void element_words(const PhiloxStream &s, uint64_t e, uint32_t (&w)[V]) {
  static_assert(V % 4 == 0, "V must be a multiple of 4");
  constexpr int kBlocks = V / 4 + (kBlockAligned ? 0 : 1);  // at most
  const uint64_t block = e >> 2;
  const unsigned shift = kBlockAligned ? 0u : static_cast<unsigned>(e & 3);
  const int blocks = V / 4 + (shift != 0);
  uint32_t r[4 * kBlocks];
  const bool fast = hi32(block) == s.hi && lo32(block) <= 0xffffffffu - kBlocks;
  if (fast) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * lo32(block);
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      if (j < V / 4 || blocks > V / 4) {
        const uint4 q = philox_fast(s, p0 + static_cast<uint64_t>(kPhiloxM0) * j);
        r[4 * j] = q.x, r[4 * j + 1] = q.y, r[4 * j + 2] = q.z, r[4 * j + 3] = q.w;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlocks; ++j) {
      if (j < V / 4 || blocks > V / 4) {
        const uint4 q = philox_block(s, block + j);
        r[4 * j] = q.x, r[4 * j + 1] = q.y, r[4 * j + 2] = q.z, r[4 * j + 3] = q.w;
      }
    }
  }
  if (shift == 0) {
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = r[j];
  } else {
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

// CUDA-graph-safe randomness (kernels/dropfuse.h): a launch whose `philox_dev` is not null takes
// its seed and offset from device memory when it runs, so a captured graph replays with whatever
// the buffer holds then. `add` is the launch's stream within the device state (offset + add).
struct DeviceState {
  const uint64_t *state;  // {seed, offset}; null: the host values apply
  uint64_t add;
};

// The stream of a graph-safe launch, computed per thread from the device state (cheap next to the
// work of one thread; the host path keeps its precomputed, constant-operand stream).
__device__ __forceinline__ PhiloxStream device_stream(DeviceState d, uint64_t first_element) {
  return philox_stream(__ldg(d.state), __ldg(d.state + 1) + d.add, first_element);
}

// The stream of `offset` with the key and fast-path high word of `base`: philox_stream's
// offset-dependent part, on the device, for launches that use consecutive streams (MC-dropout
// replicas, multi-sample dropout) from one key schedule.
__device__ __forceinline__ PhiloxStream philox_restream(const PhiloxStream &base, uint64_t offset) {
  PhiloxStream s = base;
  s.off_lo = lo32(offset);
  s.off_hi = hi32(offset);
  const uint64_t u1 = static_cast<uint64_t>(kPhiloxM1) * s.off_lo;
  const uint32_t x1 = hi32(u1) ^ s.hi ^ s.key.k0[0];
  const uint32_t y1 = lo32(u1);
  const uint64_t u2 = static_cast<uint64_t>(kPhiloxM0) * x1;
  s.r1_z = s.off_hi ^ s.key.k1[0];
  s.r2_x = y1 ^ s.key.k0[1];
  s.r2_z = hi32(u2) ^ s.key.k1[1];
  s.r2_w = lo32(u2);
  return s;
}

}  // namespace dropfuse
