// Host emulation of the graph-safe randomness of kernels/dropout.cu, kernels/drop_block.cu and
// kernels/philox_state.cu (built and run by tests/graph_state_host_emulation.rs): the real
// launchers and kernels, every CUDA thread a fiber (tests/host_emu/cuda_fiber_emu.h), on an
// emulated device of one SM and a grid of at most one wave (DROPFUSE_WAVES 1), so that the
// grid-stride loops wrap. Every case runs twice, once with the seed and offset given on the host
// (the path verified bit for bit on a GPU) and once with them in a device state {seed, offset}
// (philox_dev: the kDev kernels, offset = state[1] + params.offset, wrapping at 2^64), and the two
// must agree bit for bit: outputs, masks and DropBlock's counts. Both are also compared with
// plain loops written from the contract (kernels/dropfuse.h: Philox4x32-10 per element; the
// DropBlock reference, src/reference/drop_block.rs). Cases: f32 / f16 / bf16, tails (n % 32,
// n % V), element offsets that are not multiples of 4 and that cross 2^34 (the high counter word
// changes inside a launch), device offsets that wrap at 2^64, misaligned views, in place; then
// dropfuse_philox_advance (wrapping, streams 0, bad pointers) and a captured-graph replay pattern.
// DropBlock's cases cover both of its mask kernels (the warp-per-plane kernel of 2D maps up to
// 128 x 128, with rows of one or two 64-bit words, and the tiled kernel of the others; the run
// checks that each took its share of the cases).
#define DROPFUSE_WAVES 1
#include "cuda_fiber_emu.h"
// clang-format off
#include "dropout.cu"
#include "drop_block.cu"
#include "philox_state.cu"
// clang-format on

#include "contract_model.h"

using namespace model;

namespace t {

// A device state {seed, offset} at an 8-byte aligned address (with guards).
struct State {
  uint64_t raw[4];
  uint64_t *p() { return raw + 1; }
  State(uint64_t seed, uint64_t offset) : raw{0x5A5A5A5A5A5A5A5Aull, seed, offset, 0xA5A5A5A5A5A5A5A5ull} {}
  bool intact(uint64_t seed, uint64_t offset) const {
    return raw[0] == 0x5A5A5A5A5A5A5A5Aull && raw[1] == seed && raw[2] == offset && raw[3] == 0xA5A5A5A5A5A5A5A5ull;
  }
};

// (device offset, params.offset) pairs: random, and sums that wrap at 2^64.
std::pair<uint64_t, uint64_t> offsets() {
  switch (rnd(5)) {
    case 0: return {~0ull - rnd(4), 1 + rnd(9)};            // wraps
    case 1: return {rnd(9), ~0ull - rnd(4)};                // wraps the other way
    case 2: return {(uint64_t)rng(), 0};                    // the device offset alone
    case 3: return {0x00000000FFFFFFFFull, 1};              // carry into the high counter word
    default: return {(uint64_t)rng(), (uint64_t)rnd(1000)};
  }
}

uint64_t element_offset() {
  switch (rnd(6)) {
    case 0: return 0;
    case 1: return 4 * rnd(1u << 20);
    case 2: return 4 * rnd(1u << 20) + 1 + rnd(3);  // not a multiple of 4
    case 3: return (1ull << 34) - 1 - rnd(6000);    // crosses 2^34: the high counter word changes
    case 4: return (1ull << 63) + rnd(1000);
    default: return (uint64_t)rng() >> 2;
  }
}

uint64_t threshold() {
  switch (rnd(7)) {
    case 0: return 0;               // keeps everything
    case 1: return 1ull << 32;      // drops everything
    case 2: return 1;
    case 3: return 0xFFFFFFFFull;
    default: return (uint64_t)std::llround(unit() * 4294967296.0);
  }
}

// ---- dropout: host state vs device state ----------------------------------------------------------

enum class DMode { Mask, Forward, ForwardMask };

template <typename T> void test_dropout() {
  constexpr uint64_t V = VecWidth<T>::value;
  uint64_t n;
  switch (rnd(5)) {
    case 0: n = 1 + rnd(40); break;
    case 1: n = 32 * (1 + rnd(300)); break;
    case 2: n = V * (1 + rnd(2000)); break;
    default: n = 1 + rnd(20000);
  }
  emu::g.blocks_per_sm = 1 + (int)rnd(3);
  const DMode mode = (DMode)rnd(3);
  const uint64_t seed = rng();
  const auto [dev_off, add] = offsets();
  const uint64_t host_off = dev_off + add;  // wrapping
  dropfuse_dropout_params p{};
  p.element_offset = element_offset();
  p.threshold = threshold();
  p.scale = p.threshold >= (1ull << 32) ? 0.0f : (float)(4294967296.0 / (4294967296.0 - (double)p.threshold));
  const bool in_place = rnd(3) == 0;
  const size_t xo = rnd(3) == 0 ? 1 + rnd(V - 1) : 0;
  const size_t yo = in_place ? xo : (rnd(4) == 0 ? 1 + rnd(3) : 0);
  const uint64_t words = (n + 31) / 32;
  const T sentinel = Ty<T>::from(-4321.0f);
  Buf<T> x(n, xo, sentinel);
  for (uint64_t i = 0; i < n; ++i) x.p[i] = plain_value<T>();
  const std::vector<T> x0(x.p, x.p + n);

  auto run = [&](bool dev, Buf<T> &y, Buf<uint32_t> &mask, State &st) {
    dropfuse_dropout_params q = p;
    if (dev) {
      q.seed = rng();  // ignored with a device state
      q.offset = add;
      q.philox_dev = st.p();
    } else {
      q.seed = seed;
      q.offset = host_off;
    }
    if (in_place)
      for (uint64_t i = 0; i < n; ++i) y.p[i] = x0[i];
    const T *xin = in_place ? y.p : x.p;
    switch (mode) {
      case DMode::Mask: return dropfuse_dropout_mask(mask.p, n, &q, nullptr);
      case DMode::Forward: return dropfuse_dropout_forward(Ty<T>::code, xin, y.p, nullptr, n, &q, nullptr);
      default: return dropfuse_dropout_forward(Ty<T>::code, xin, y.p, mask.p, n, &q, nullptr);
    }
  };
  Buf<T> yh(n, yo, sentinel), yd(n, yo, sentinel);
  Buf<uint32_t> mh(words, 0, 0xDEADBEEFu), md(words, 0, 0xDEADBEEFu);
  State sh(1, 2), sd(seed, dev_off);
  const uint64_t l0 = emu::g.launches;
  const int s1 = run(false, yh, mh, sh), s2 = run(true, yd, md, sd);
  CHECK(s1 == 0 && s2 == 0 && emu::g.launches == l0 + 2, "dropout status %d / %d", s1, s2);
  CHECK(sd.intact(seed, dev_off), "the dropout kernels changed the device state");
  const bool writes_y = mode != DMode::Mask, writes_mask = mode != DMode::Forward;
  char what[256];
  snprintf(what, sizeof what,
           "dropout %s mode %d n=%lu element_offset=%#lx threshold=%#lx dev_off=%#lx add=%#lx xo=%zu yo=%zu "
           "in_place=%d",
           Ty<T>::name, (int)mode, n, p.element_offset, p.threshold, dev_off, add, xo, yo, in_place);
  CHECK(yh.guards() && yd.guards() && mh.guards() && md.guards() && x.guards(), "%s: guards", what);
  if (writes_y) CHECK(yh == yd, "%s: y differs between the host and the device state", what);
  if (writes_mask) CHECK(mh == md, "%s: mask differs between the host and the device state", what);
  // Both against the contract.
  bool ok_mask = true, ok_y = true;
  uint64_t bad = ~0ull;
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t e = p.element_offset + i;
    const bool keep = kept(seed, host_off, e, p.threshold);
    if (writes_mask && (((mh.p[i / 32] >> (i % 32)) & 1u) != 0) != keep) ok_mask = false;
    if (writes_y) {
      const T want = keep ? Ty<T>::from(Ty<T>::to(x0[i]) * p.scale) : Ty<T>::from(0.0f);
      if (!same(yh.p[i], want)) {
        ok_y = false;
        if (bad == ~0ull) bad = i;
      }
    }
  }
  if (writes_mask && n % 32 != 0) ok_mask = ok_mask && (mh.p[words - 1] >> (n % 32)) == 0;
  CHECK(ok_mask, "%s: mask vs the contract", what);
  CHECK(ok_y, "%s: y vs the contract (first bad %ld)", what, (long)bad);
}

// ---- DropBlock: host state vs device state ----------------------------------------------------------

struct DB {
  dropfuse_drop_block_params p;
  uint64_t numel() const { return p.n * p.c * p.d * p.h * p.w; }
};

// The contract: keep flags of every element (src/reference/drop_block.rs).
std::vector<uint8_t> ref_keep(const dropfuse_drop_block_params &p, uint64_t seed, uint64_t off) {
  const uint64_t D = p.d, H = p.h, W = p.w, bd = p.block_d, bh = p.block_h, bw = p.block_w;
  const uint64_t vD = D - bd + 1, vH = H - bh + 1, vW = W - bw + 1, valid = vD * vH * vW, spatial = D * H * W;
  const uint64_t planes = p.shared_channels ? p.n : p.n * p.c;
  std::vector<uint8_t> dropped(planes * spatial, 0);
  for (uint64_t q = 0; q < planes; ++q)
    for (uint64_t l = 0; l < valid; ++l) {
      const uint64_t i = q * valid + l;
      if (kept(seed, off, i, p.threshold)) continue;  // a block seed: an element the mask drops
      const uint64_t ud = l / (vH * vW), uh = (l / vW) % vH, uw = l % vW;
      for (uint64_t a = ud; a < ud + bd; ++a)
        for (uint64_t b = uh; b < uh + bh; ++b)
          for (uint64_t c = uw; c < uw + bw; ++c) dropped[q * spatial + (a * H + b) * W + c] = 1;
    }
  std::vector<uint8_t> keep(p.n * p.c * spatial);
  for (uint64_t n = 0; n < p.n; ++n)
    for (uint64_t c = 0; c < p.c; ++c) {
      const uint64_t q = p.shared_channels ? n : n * p.c + c;
      for (uint64_t s = 0; s < spatial; ++s) keep[(n * p.c + c) * spatial + s] = !dropped[q * spatial + s];
    }
  return keep;
}

float ref_scale(uint64_t total, uint64_t kept) {
  return kept == 0 ? 0.0f : (float)((double)total / (double)kept);
}

// Cases per DropBlock mask kernel: the warp-per-plane rows kernel (rows of one / two 64-bit words)
// and the tiled one.
int rows_cases = 0, rows2_cases = 0, tiled_cases = 0;

template <typename T> void test_drop_block() {
  DB g{};
  dropfuse_drop_block_params &p = g.p;
  const bool three_d = rnd(3) == 0;
  // Tall 2D maps: both sides of the rows kernel's 128-row limit (kRowsMax).
  const bool tall = !three_d && rnd(4) == 0;
  p.n = 1 + rnd(3);
  p.c = 1 + rnd(three_d || tall ? 3 : 8);
  p.d = three_d ? 1 + rnd(6) : 1;
  p.h = tall ? 120 + rnd(16) : 1 + rnd(three_d ? 9 : 24);
  // Rows of one or two 64-bit words in the rows kernel, and both sides of its 128-unit limit.
  p.w = rnd(3) != 0 ? 1 + rnd(64) : rnd(2) == 0 ? 65 + rnd(64) : 120 + rnd(16);
  // Mostly the usual small blocks; sometimes up to the whole map.
  const uint64_t bs = rnd(5) == 0 ? 1 + rnd(140) : 1 + rnd(7);
  p.block_d = three_d ? std::min(bs, p.d) : 1;
  p.block_h = std::min(bs, p.h);
  p.block_w = std::min(bs, p.w);
  if (!three_d && rnd(10) == 0) {  // rows of two words dilated by 64 and more (128: a shift by 64)
    p.w = 128;
    p.block_w = rnd(2) == 0 ? 128 : 65 + rnd(63);
  }
  p.threshold = rnd(5) == 0 ? threshold() : (uint64_t)std::llround(unit() * 0.2 * 4294967296.0);
  p.shared_channels = (int)rnd(2);
  p.normalize = (dropfuse_normalize)rnd(3);
  emu::g.blocks_per_sm = 1 + (int)rnd(2);
  const uint64_t numel = g.numel(), words = (numel + 31) / 32;
  const uint64_t seed = rng();
  const auto [dev_off, add] = offsets();
  const uint64_t host_off = dev_off + add;
  const bool with_x = rnd(4) != 0, in_place = with_x && rnd(3) == 0;
  const size_t xo = rnd(3) == 0 ? 1 : 0, yo = in_place ? xo : (rnd(3) == 0 ? 1 : 0);
  const T sentinel = Ty<T>::from(-4321.0f);
  Buf<T> x(numel, xo, sentinel);
  for (uint64_t i = 0; i < numel; ++i) x.p[i] = plain_value<T>();
  const std::vector<T> x0(x.p, x.p + numel);

  auto run = [&](bool dev, Buf<T> &y, Buf<uint32_t> &mask, Buf<uint64_t> &stats, State &st) {
    dropfuse_drop_block_params q = p;
    if (dev) {
      q.seed = rng();
      q.offset = add;
      q.philox_dev = st.p();
    } else {
      q.seed = seed;
      q.offset = host_off;
    }
    if (in_place)
      for (uint64_t i = 0; i < numel; ++i) y.p[i] = x0[i];
    const T *xin = in_place ? y.p : x.p;
    return dropfuse_drop_block_forward(Ty<T>::code, with_x ? xin : nullptr, with_x ? y.p : nullptr, mask.p, stats.p, &q,
                                       nullptr);
  };
  Buf<T> yh(numel, yo, sentinel), yd(numel, yo, sentinel);
  Buf<uint32_t> mh(words, 0, 0xDEADBEEFu), md(words, 0, 0xDEADBEEFu);
  Buf<uint64_t> sth(p.n + 1, 0, 0xABABABABABABABABull), std_(p.n + 1, 0, 0xABABABABABABABABull);
  for (uint64_t i = 0; i <= p.n; ++i) sth.p[i] = std_.p[i] = 0xCDCDCDCDull;  // zeroed by the call
  State sh(1, 2), sd(seed, dev_off);
  {  // which mask kernel the launcher takes
    dropfuse::Geometry geo;
    size_t smem = 0;
    if (dropfuse::make_geometry(p, emu::g.sms, &geo, &smem))
      ++(!dropfuse::rows_kernel_fits(geo) ? tiled_cases : geo.W > 64 ? rows2_cases : rows_cases);
  }
  const int s1 = run(false, yh, mh, sth, sh), s2 = run(true, yd, md, std_, sd);
  char what[256];
  snprintf(what, sizeof what,
           "drop_block %s n=%lu c=%lu d=%lu h=%lu w=%lu block=%lu/%lu/%lu threshold=%#lx shared=%d normalize=%d "
           "dev_off=%#lx add=%#lx x=%d in_place=%d",
           Ty<T>::name, p.n, p.c, p.d, p.h, p.w, p.block_d, p.block_h, p.block_w, p.threshold, p.shared_channels,
           (int)p.normalize, dev_off, add, with_x, in_place);
  CHECK(s1 == 0 && s2 == 0, "%s: status %d / %d", what, s1, s2);
  CHECK(sd.intact(seed, dev_off), "%s: the kernels changed the device state", what);
  CHECK(yh.guards() && yd.guards() && mh.guards() && md.guards() && sth.guards() && std_.guards(), "%s: guards", what);
  CHECK(mh == md, "%s: mask differs between the host and the device state", what);
  CHECK(sth == std_, "%s: stats differ between the host and the device state", what);
  if (with_x) CHECK(yh == yd, "%s: y differs between the host and the device state", what);
  // Both against the contract.
  const std::vector<uint8_t> keep = ref_keep(p, seed, host_off);
  const uint64_t per_sample = numel / p.n;
  std::vector<uint64_t> kept(p.n + 1, 0);
  bool ok_mask = true;
  for (uint64_t e = 0; e < numel; ++e) {
    if ((((mh.p[e / 32] >> (e % 32)) & 1u) != 0) != (keep[e] != 0)) ok_mask = false;
    kept[e / per_sample] += keep[e];
    kept[p.n] += keep[e];
  }
  if (numel % 32 != 0) ok_mask = ok_mask && (mh.p[words - 1] >> (numel % 32)) == 0;
  CHECK(ok_mask, "%s: mask vs the contract", what);
  bool ok_stats = true;
  for (uint64_t i = 0; i <= p.n; ++i) ok_stats = ok_stats && sth.p[i] == kept[i];
  CHECK(ok_stats, "%s: stats vs the contract", what);
  if (with_x) {
    bool ok_y = true;
    for (uint64_t e = 0; e < numel; ++e) {
      const uint64_t s = e / per_sample;
      const float scale = p.normalize == DROPFUSE_NORMALIZE_GLOBAL ? ref_scale(numel, kept[p.n])
                          : p.normalize == DROPFUSE_NORMALIZE_PER_SAMPLE ? ref_scale(per_sample, kept[s])
                                                                          : 1.0f;
      const T want = keep[e] ? Ty<T>::from(Ty<T>::to(x0[e]) * scale) : Ty<T>::from(0.0f);
      ok_y = ok_y && same(yh.p[e], want);
    }
    CHECK(ok_y, "%s: y vs the contract", what);
  }
}

// ---- the device state itself ------------------------------------------------------------------------

void test_philox_advance() {
  const int bad = cudaErrorInvalidValue;
  for (int i = 0; i < 8; ++i) {
    const uint64_t seed = rng(), off = i < 3 ? ~0ull - rnd(3) : rng();
    const uint64_t k = i == 0 ? 1 : i == 1 ? ~0ull : 1 + rnd(1000);
    State s(seed, off);
    const int st = dropfuse_philox_advance(s.p(), k, nullptr);
    CHECK(st == 0 && s.intact(seed, off + k), "philox_advance by %#lx from %#lx: status %d, offset %#lx", k, off, st,
          s.raw[2]);
  }
  State s(5, 7);
  const uint64_t l0 = emu::g.launches;
  CHECK(dropfuse_philox_advance(s.p(), 0, nullptr) == 0 && s.intact(5, 7), "philox_advance by 0");
  CHECK(dropfuse_philox_advance(nullptr, 1, nullptr) == bad, "philox_advance: null state");
  CHECK(dropfuse_philox_advance(reinterpret_cast<uint64_t *>(reinterpret_cast<char *>(s.p()) + 4), 1, nullptr) == bad,
        "philox_advance: misaligned state");
  CHECK(emu::g.launches == l0 && s.intact(5, 7), "philox_advance: a launch for 0 streams or a bad state");
  // Misaligned device states are refused by the random launchers, before anything runs.
  std::vector<float> x(64, 1.0f), y(64, 2.0f);
  std::vector<uint32_t> mask(2, 0xDEADBEEFu);
  std::vector<uint64_t> stats(2, 9);
  dropfuse_dropout_params dp{};
  dp.philox_dev = reinterpret_cast<const uint64_t *>(reinterpret_cast<char *>(s.p()) + 4);
  CHECK(dropfuse_dropout_forward(DROPFUSE_F32, x.data(), y.data(), mask.data(), 64, &dp, nullptr) == bad,
        "dropout: misaligned device state");
  CHECK(dropfuse_dropout_mask(mask.data(), 64, &dp, nullptr) == bad, "dropout mask: misaligned device state");
  dropfuse_drop_block_params bp{};
  bp.n = bp.c = bp.d = 1;
  bp.h = bp.w = 8;
  bp.block_d = bp.block_h = bp.block_w = 1;
  bp.philox_dev = dp.philox_dev;
  CHECK(dropfuse_drop_block_forward(DROPFUSE_F32, x.data(), y.data(), mask.data(), stats.data(), &bp, nullptr) == bad,
        "drop_block: misaligned device state");
  CHECK(emu::g.launches == l0 && y[0] == 2.0f && mask[0] == 0xDEADBEEFu && stats[0] == 9,
        "a refused call launched or wrote something");

  // A captured graph's pattern: [advance, dropout with the device state] replayed three times
  // draws the streams off + k + add, off + 2k + add, ... (each equal to a host-state launch).
  const uint64_t seed = rng(), off = ~0ull - 1, k = 1, add = 3;
  State g(seed, off);
  const uint64_t n = 3000;
  std::vector<float> in(n), out(n), want(n);
  for (auto &v : in) v = (float)unit();
  for (int replay = 1; replay <= 3; ++replay) {
    CHECK(dropfuse_philox_advance(g.p(), k, nullptr) == 0, "replay %d: advance", replay);
    dropfuse_dropout_params q{};
    q.offset = add;
    q.threshold = 1ull << 31;
    q.scale = 2.0f;
    q.philox_dev = g.p();
    CHECK(dropfuse_dropout_forward(DROPFUSE_F32, in.data(), out.data(), nullptr, n, &q, nullptr) == 0,
          "replay %d: dropout", replay);
    q.philox_dev = nullptr;
    q.seed = seed;
    q.offset = off + replay * k + add;
    CHECK(dropfuse_dropout_forward(DROPFUSE_F32, in.data(), want.data(), nullptr, n, &q, nullptr) == 0,
          "replay %d: host dropout", replay);
    CHECK(memcmp(out.data(), want.data(), n * 4) == 0, "replay %d: device-state stream differs", replay);
  }
}

}  // namespace t

int main(int argc, char **argv) {
  using namespace t;
  seed_rng(77);
  const int scale = argc > 1 ? atoi(argv[1]) : 1;
  CHECK(philox_kat_ok(), "the model's Philox differs from Random123's known answers");
  emu::g.sms = 1;  // cached by the launchers at the first launch
  test_philox_advance();
  for (int i = 0; i < 80 * scale; ++i) {
    test_dropout<float>();
    test_dropout<__half>();
    test_dropout<__nv_bfloat16>();
  }
  for (int i = 0; i < 40 * scale; ++i) {
    test_drop_block<float>();
    test_drop_block<__half>();
    test_drop_block<__nv_bfloat16>();
  }
  printf("DropBlock cases: %d + %d rows kernel (one / two words per row), %d tiled kernel\n", rows_cases, rows2_cases,
         tiled_cases);
  CHECK(rows_cases >= 20 * scale && rows2_cases >= 10 * scale && tiled_cases >= 20 * scale,
        "DropBlock: both mask kernels ran, the rows kernel with both row widths");
  return report();
}
