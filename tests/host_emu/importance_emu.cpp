// Host emulation of kernels/importance.cu (built and run by tests/importance_host_emulation.rs): the
// real launcher and kernels on the fiber-per-thread emulator (tests/host_emu/cuda_fiber_emu.h) on
// emulated devices with few SMs (the tile loop and the finalize loop over more than 256 tiles
// wrap). Checked for random shapes, dtypes, misaligned views, masks and row magnitudes (bf16 / f32
// rows scaled by powers of two from 2^-130 to 2^125: squares that underflow, or overflow f32):
//   * every similarity bit for bit against a sequential simulation of the documented f32
//     algorithm (src/reference/importance.rs point 4: lane sums over chunks of V elements, lanes
//     interleaved, a 5-level butterfly, the rows beyond 2^120 summed again scaled by 2^-90, sqrt,
//     max with 1e-8f, one multiply, one divide), and
//     within the documented bound (H / 16 + 32) 2^-24 of the f64 reference (point 2);
//   * padding similarities NaN, nothing written outside the similarities (guards);
//   * the layer's count exactly, its sum within the bound, and bit-identical sums on every run
//     (different grids and thread interleavings): the fixed-order claim;
//   * accumulation onto the existing layer values.
#include "cuda_fiber_emu.h"
// clang-format off
#include "importance.cu"
// clang-format on

#include "emu_common.h"

using namespace model;

// The documented f32 algorithm, sequentially: the three sums (a's elements times sa, b's times sb),
// lane by lane, then the butterfly.
template <typename T> static void sums(const T *a, const T *b, uint64_t H, float sa, float sb, float &d, float &x2,
                                       float &y2) {
  constexpr uint64_t V = 16 / sizeof(T);
  const uint64_t chunks = (H + V - 1) / V;
  float dot[32], aa[32], bb[32];
  for (int l = 0; l < 32; ++l) {
    dot[l] = aa[l] = bb[l] = 0.0f;
    for (uint64_t c = l; c < chunks; c += 32)
      for (uint64_t j = c * V; j < std::min(H, c * V + V); ++j) {
        const float x = Ty<T>::to(a[j]) * sa, y = Ty<T>::to(b[j]) * sb;
        dot[l] = dot[l] + x * y;
        aa[l] = aa[l] + x * x;
        bb[l] = bb[l] + y * y;
      }
  }
  for (int off = 16; off > 0; off >>= 1) {
    float d2[32], a2[32], b2[32];
    for (int l = 0; l < 32; ++l) {
      d2[l] = dot[l] + dot[l ^ off];
      a2[l] = aa[l] + aa[l ^ off];
      b2[l] = bb[l] + bb[l ^ off];
    }
    for (int l = 0; l < 32; ++l) dot[l] = d2[l], aa[l] = a2[l], bb[l] = b2[l];
  }
  d = dot[0], x2 = aa[0], y2 = bb[0];
}

// A sum of squares above 2^120 (or NaN): that row's sums again with its elements times 2^-90, and
// the eps clamp times 2^-90 (src/reference/importance.rs point 4).
template <typename T> static float simulate(const T *a, const T *b, uint64_t H) {
  const float big = std::ldexp(1.0f, 120), down = std::ldexp(1.0f, -90);
  float d, x2, y2, ea = 1e-8f, eb = 1e-8f;
  sums(a, b, H, 1.0f, 1.0f, d, x2, y2);
  if (!(x2 <= big && y2 <= big)) {
    const float sa = x2 <= big ? 1.0f : down, sb = y2 <= big ? 1.0f : down;
    sums(a, b, H, sa, sb, d, x2, y2);
    ea = 1e-8f * sa, eb = 1e-8f * sb;
  }
  const float na = std::max(std::sqrt(x2), ea), nb = std::max(std::sqrt(y2), eb);
  return d / (na * nb);
}

template <typename T> static double cosine64(const T *a, const T *b, uint64_t H) {
  double d = 0, x2 = 0, y2 = 0;
  for (uint64_t j = 0; j < H; ++j) {
    const double x = Ty<T>::to(a[j]), y = Ty<T>::to(b[j]);
    d += x * y;
    x2 += x * x;
    y2 += y * y;
  }
  return d / (std::max(std::sqrt(x2), 1e-8) * std::max(std::sqrt(y2), 1e-8));
}

template <typename T> static void test_case(uint64_t tokens, uint64_t H) {
  const char *ty = sizeof(T) == 4 ? "f32" : (std::is_same<T, __half>::value ? "f16" : "bf16");
  Buf<T> a(tokens * H, rnd(3) ? 0 : rnd(8)), b(tokens * H, rnd(3) ? 0 : rnd(8));
  const int kind = (int)rnd(3);
  // Magnitudes: in a third of the bf16 / f32 cases (f16's range is +-65504), each row of a and of b
  // is scaled by its own power of two, from f32's subnormals (squares and products that underflow)
  // to 2^125 (squares far beyond f32's range: every finite input is in the domain).
  const bool extreme = !std::is_same<T, __half>::value && rnd(3) == 0;
  static const int kExps[] = {0, 0, -130, -100, -60, 40, 58, 62, 100, 125};
  for (uint64_t t = 0; t < tokens; ++t) {
    const int ea = extreme ? kExps[rnd(10)] : 0, eb = extreme ? (rnd(3) ? ea : kExps[rnd(10)]) : 0;
    for (uint64_t i = t * H; i < (t + 1) * H; ++i) {
      const float x = rnd(16) == 0 ? 0.0f : (float)(unit() * 8 - 4);
      const float y = kind == 1 ? x + 0.3f * (float)(unit() - 0.5) : (float)(unit() * 8 - 4);
      a.p[i] = Ty<T>::from(std::ldexp(x, ea));
      b.p[i] = Ty<T>::from(std::ldexp(y, eb));
    }
  }
  if (kind == 2)
    for (uint64_t t = 0; t < tokens; ++t) {
      if (t % 3 == 0)
        for (uint64_t j = 0; j < H; ++j) a.p[t * H + j] = Ty<T>::from(0.0f);
      if (t % 5 == 0)
        for (uint64_t j = 0; j < H; ++j) b.p[t * H + j] = Ty<T>::from(-0.0f);
    }
  std::vector<uint8_t> mask;
  const bool masked = rnd(2);
  if (masked) {
    const double d = rnd(5) == 0 ? 0.0 : unit();
    mask.resize(tokens);
    for (auto &m : mask) m = unit() < d ? (uint8_t)(1 + rnd(255)) : 0;
  }
  const uint64_t tiles = (tokens + DROPFUSE_IMPORTANCE_TILE - 1) / DROPFUSE_IMPORTANCE_TILE;
  double first_sum = 0;
  for (int run = 0; run < 2; ++run) {
    emu::g.sms = 1 + (int)rnd(3);
    emu::g.blocks_per_sm = 1 + (int)rnd(4);
    std::vector<float> sims(tokens + 8, -7.0f);
    std::vector<double> tile_sums(tiles + 2, 1e300);
    std::vector<uint64_t> tile_counts(tiles + 2, 99);
    double layer_sum[3] = {5.0, 0.25, 5.0};
    uint64_t layer_count[3] = {7, 3, 7};
    const int st = dropfuse_importance_accumulate(Ty<T>::code, a.p, b.p, masked ? mask.data() : nullptr,
                                                  sims.data() + 4, tokens, H, tile_sums.data(), tile_counts.data(),
                                                  layer_sum + 1, layer_count + 1, nullptr);
    CHECK(st == 0, "status %d", st);
    if (st != 0) return;
    double want_sum = 0;
    uint64_t want_count = 0;
    bool sims_ok = true, bound_ok = true, zero_ok = true;
    const double tol = (H / 16.0 + 32.0) / 16777216.0;
    for (uint64_t t = 0; t < tokens; ++t) {
      const float got = sims[4 + t];
      if (masked && mask[t] == 0) {
        sims_ok = sims_ok && std::isnan(got);
        continue;
      }
      const float sim = simulate(a.p + t * H, b.p + t * H, H);
      if (fbits(got) != fbits(sim) && !(std::isnan(got) && std::isnan(sim))) {
        if (sims_ok) printf("  token %lu: kernel %.9g (%#x), simulation %.9g (%#x)\n", t, got, fbits(got), sim, fbits(sim));
        sims_ok = false;
      }
      const double ref = cosine64(a.p + t * H, b.p + t * H, H);
      if (!(std::fabs((double)got - ref) <= tol)) bound_ok = false;
      bool za = true, zb = true;
      for (uint64_t j = 0; j < H; ++j) {
        za = za && Ty<T>::to(a.p[t * H + j]) == 0.0f;
        zb = zb && Ty<T>::to(b.p[t * H + j]) == 0.0f;
      }
      if ((za || zb) && got != 0.0f) zero_ok = false;
      want_sum += ref;
      ++want_count;
    }
    for (int i = 0; i < 4; ++i) CHECK(sims[i] == -7.0f && sims[4 + tokens + i] == -7.0f, "%s: similarity guards", ty);
    CHECK(sims_ok, "%s tokens=%lu H=%lu: similarities differ from the documented f32 algorithm", ty, tokens, H);
    CHECK(bound_ok, "%s tokens=%lu H=%lu: a similarity beyond the bound", ty, tokens, H);
    CHECK(zero_ok, "%s tokens=%lu H=%lu: a zero row's similarity is not 0", ty, tokens, H);
    CHECK(layer_count[1] == 3 + want_count && layer_count[0] == 7 && layer_count[2] == 7, "%s: counts %lu, want %lu",
          ty, layer_count[1], 3 + want_count);
    const double added = layer_sum[1] - 0.25;
    const double stol = want_count * tol + (double)want_count * want_count * 1.2e-16 + 1e-15;
    CHECK(std::fabs(added - want_sum) <= stol, "%s tokens=%lu H=%lu: sum %.17g, want %.17g", ty, tokens, H, added,
          want_sum);
    CHECK(layer_sum[0] == 5.0 && layer_sum[2] == 5.0, "%s: neighbouring layers written", ty);
    CHECK(tile_sums[tiles] == 1e300 && tile_counts[tiles] == 99, "%s: workspace written beyond its tiles", ty);
    if (run == 0) {
      first_sum = layer_sum[1];
    } else {
      CHECK(dbits(first_sum) == dbits(layer_sum[1]), "%s tokens=%lu H=%lu: sums differ between runs (%.17g, %.17g)",
            ty, tokens, H, first_sum, layer_sum[1]);
    }
  }
}

template <typename T> static void random_case() {
  const uint64_t H = rnd(3) == 0 ? 1 + rnd(40) : (rnd(2) ? 8 * (1 + rnd(40)) : 1 + rnd(1200));
  const uint64_t tokens = 1 + rnd(rnd(4) == 0 ? 400 : 70);
  test_case<T>(tokens, H);
}

int main(int argc, char **argv) {
  seed_rng(77);
  const int scale = argc > 1 ? atoi(argv[1]) : 1;
  for (int i = 0; i < 25 * scale; ++i) {
    random_case<float>();
    random_case<__half>();
    random_case<__nv_bfloat16>();
  }
  // More tiles than blocks, and more than the 256 finalize threads: both loops wrap.
  test_case<__nv_bfloat16>(16500 + rnd(64), 2);
  test_case<float>(17000, 4);
  return report();
}
