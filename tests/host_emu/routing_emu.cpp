// Host emulation of kernels/routing.cu (built and run by tests/routing_host_emulation.rs): the real
// launchers and kernels, every CUDA thread a fiber (tests/host_emu/cuda_fiber_emu.h: barriers and
// warp intrinsics as rendezvous, threads in a random order between them), on an emulated device
// with few SMs, few blocks per sequence kernel (grid-stride loops over sequences wrap) and a
// random shared-memory opt-in limit (both top-k paths: keys in shared memory and re-read). The
// outputs are compared with plain loops written from the contract (src/reference/skip.rs points
// 1, 4, 7-12): offsets, indices (none written at or beyond the capacity), the global threshold,
// gathers, gated scatter-adds and both backward kernels for f32 / f16 / bf16 and misaligned views,
// and guard words around every output. Work buffers start poisoned (nothing may rely on zeroes).
#define DROPFUSE_ROUTING_MAX_SEQUENCE_BLOCKS 3u
#include "cuda_fiber_emu.h"
// clang-format off
#include "routing.cu"
// clang-format on

#include "emu_common.h"

using namespace model;

constexpr uint32_t kPoison = 0xDEADBEEFu;
constexpr size_t kGuard = 4;  // guard elements / words around every output

// ---- the contract ----

static uint32_t ref_key(float s) {
  if (std::isnan(s)) return 0;
  uint32_t w;
  memcpy(&w, &s, 4);
  if (s == 0.0f) w = 0;
  return (w & 0x80000000u) ? ~w : (w | 0x80000000u);
}

struct Batch {
  uint64_t B, S;
  std::vector<float> scores;
  int pad;                       // 0 none, 1 mask, 2 lengths
  std::vector<uint8_t> mask;     // B * S
  std::vector<uint32_t> lengths; // B (may exceed S: read as S)
  bool valid(uint64_t b, uint64_t t) const {
    if (pad == 1) return mask[b * S + t] != 0;
    if (pad == 2) return t < std::min<uint64_t>(lengths[b], S);
    return true;
  }
};

struct Sel {
  std::vector<uint32_t> offsets, indices;
  uint32_t threshold_key = 0xFFFFFFFFu;
};

static uint64_t ref_round(double c, uint64_t v) { return std::min<uint64_t>((uint64_t)std::round(c * (double)v), v); }

static void rank_sort(std::vector<uint64_t> &c, const std::vector<uint32_t> &key) {
  std::sort(c.begin(), c.end(), [&](uint64_t u, uint64_t v) { return key[u] != key[v] ? key[u] > key[v] : u < v; });
}

static Sel ref_topk(const Batch &x, uint32_t kind, double frac, uint64_t tokens) {
  std::vector<uint32_t> key(x.B * x.S);
  for (uint64_t i = 0; i < key.size(); ++i) key[i] = ref_key(x.scores[i]);
  Sel s;
  s.offsets.push_back(0);
  for (uint64_t b = 0; b < x.B; ++b) {
    std::vector<uint64_t> c;
    for (uint64_t t = 0; t < x.S; ++t)
      if (x.valid(b, t)) c.push_back(b * x.S + t);
    const uint64_t k = kind == DROPFUSE_CAPACITY_FRACTION ? ref_round(frac, c.size()) : std::min<uint64_t>(tokens, c.size());
    rank_sort(c, key);
    c.resize(k);
    std::sort(c.begin(), c.end());
    for (uint64_t i : c) s.indices.push_back((uint32_t)(i - b * x.S));
    s.offsets.push_back((uint32_t)s.indices.size());
  }
  return s;
}

static Sel ref_global(const Batch &x, double q) {
  std::vector<uint32_t> key(x.B * x.S);
  for (uint64_t i = 0; i < key.size(); ++i) key[i] = ref_key(x.scores[i]);
  std::vector<uint64_t> c;
  for (uint64_t b = 0; b < x.B; ++b)
    for (uint64_t t = 0; t < x.S; ++t)
      if (x.valid(b, t)) c.push_back(b * x.S + t);
  const uint64_t n = ref_round(q, c.size());
  rank_sort(c, key);
  Sel s;
  if (n > 0) s.threshold_key = key[c[n - 1]];
  c.resize(n);
  std::sort(c.begin(), c.end());
  s.offsets.assign(x.B + 1, 0);
  std::vector<std::vector<uint32_t>> lists(x.B);
  for (uint64_t i : c) lists[i / x.S].push_back((uint32_t)(i % x.S));
  for (uint64_t b = 0; b < x.B; ++b) {
    s.indices.insert(s.indices.end(), lists[b].begin(), lists[b].end());
    s.offsets[b + 1] = (uint32_t)s.indices.size();
  }
  return s;
}

// ---- random inputs ----

static float special() {
  static const uint32_t bits[] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0x80000000u, 0x00000000u, 0x7F800000u,
                                  0xFF800000u, 0x3F800000u, 0xBF800000u, 0x00800000u, 0x80800000u, 0x00000001u,
                                  0x80000001u, 0x7F7FFFFFu, 0xFF7FFFFFu};
  float f;
  memcpy(&f, &bits[rnd(sizeof(bits) / 4)], 4);
  return f;
}

static Batch make_batch(uint64_t B, uint64_t S) {
  Batch x;
  x.B = B;
  x.S = S;
  const int mode = (int)rnd(6);
  const float few[] = {-1.0f, 0.0f, -0.0f, 0.5f, 2.0f};
  x.scores.resize(B * S);
  for (auto &v : x.scores) {
    switch (mode) {
      case 0: v = (float)(unit() * 8 - 4); break;
      case 1: v = few[rnd(5)]; break;
      case 2: v = special(); break;
      case 3: v = 0.25f; break;
      case 4: v = rnd(10) == 0 ? NAN : (float)(unit() - 0.5); break;
      default: {  // keys that share their top bytes: every radix pass matters
        const uint32_t w = 0x3F800000u | (uint32_t)(rnd(4) << 16) | (uint32_t)rnd(3) << 8 | (uint32_t)rnd(3);
        memcpy(&v, &w, 4);
      }
    }
  }
  x.pad = (int)rnd(3);
  if (x.pad == 1) {
    const double d = rnd(4) == 0 ? 0.0 : unit();
    x.mask.resize(B * S);
    for (auto &m : x.mask) m = unit() < d ? (uint8_t)(1 + rnd(255)) : 0;
  } else if (x.pad == 2) {
    x.lengths.resize(B);
    for (auto &l : x.lengths) l = rnd(5) == 0 ? 0xFFFFFFFFu : (uint32_t)rnd(S + 3);
  }
  return x;
}

static void random_device(uint64_t S) {
  emu::g.sms = 1 + (int)rnd(3);
  emu::g.blocks_per_sm = 1 + (int)rnd(2);
  emu::g.max_dynamic.clear();
  // Shared memory for the keys of sequences up to about 2S tokens, or a large device.
  emu::g.smem_optin = rnd(2) ? 232448 : emu::g.static_smem + (int)(4 * rnd(2 * S + 2));
}

// ---- selection ----

static const uint8_t *mask_ptr(const Batch &x) { return x.pad == 1 ? x.mask.data() : nullptr; }
static const uint32_t *len_ptr(const Batch &x) { return x.pad == 2 ? x.lengths.data() : nullptr; }

static void compare(const char *what, const Batch &x, const Sel &want, const std::vector<uint32_t> &offsets,
                    const std::vector<uint32_t> &indices, uint64_t capacity) {
  for (uint64_t b = 0; b <= x.B; ++b)
    CHECK(offsets[b] == want.offsets[b], "%s B=%lu S=%lu: offsets[%lu] = %u, want %u", what, x.B, x.S, b, offsets[b],
          want.offsets[b]);
  for (size_t i = x.B + 1; i < offsets.size(); ++i) CHECK(offsets[i] == kPoison, "%s: offsets guard written", what);
  const uint64_t n = std::min<uint64_t>(want.indices.size(), capacity);
  for (uint64_t i = 0; i < n; ++i)
    CHECK(indices[i] == want.indices[i], "%s B=%lu S=%lu: indices[%lu] = %u, want %u", what, x.B, x.S, i, indices[i],
          want.indices[i]);
  for (uint64_t i = n; i < indices.size(); ++i)
    CHECK(indices[i] == kPoison, "%s B=%lu S=%lu cap=%lu: index %lu written beyond the count or capacity", what, x.B,
          x.S, capacity, i);
}

static uint64_t room(uint64_t total, uint64_t bound) {
  switch (rnd(3)) {
    case 0: return bound;
    case 1: return total;
    default: return total - std::min<uint64_t>(total, 1 + total / 3);
  }
}

static void test_selection(uint64_t B, uint64_t S) {
  Batch x = make_batch(B, S);
  random_device(S);
  std::vector<uint32_t> work(4 * B + DROPFUSE_ROUTING_WORK_FIXED, 0xABABABABu);
  // top-k
  uint32_t kind;
  double frac = 0;
  uint64_t tokens = 0;
  if (rnd(2)) {
    kind = DROPFUSE_CAPACITY_TOKENS;
    const uint64_t opts[] = {0, 1, rnd(S + 2), S, S + 5, ~0ull};
    tokens = opts[rnd(6)];
  } else {
    kind = DROPFUSE_CAPACITY_FRACTION;
    const double opts[] = {0.0, 1.0, 0.5, unit()};
    frac = opts[rnd(4)];
  }
  const Sel want = ref_topk(x, kind, frac, tokens);
  const uint64_t bound = kind == DROPFUSE_CAPACITY_TOKENS ? B * std::min(tokens, S) : B * ref_round(frac, S);
  uint64_t cap = room(want.indices.size(), bound);
  std::vector<uint32_t> offsets(B + 1 + kGuard, kPoison), indices(cap + kGuard, kPoison);
  dropfuse_routing r{B, S, offsets.data(), indices.data(), cap, work.data()};
  int st = dropfuse_route_top_k(x.scores.data(), mask_ptr(x), len_ptr(x), kind, frac, tokens, &r, nullptr);
  CHECK(st == 0, "top-k B=%lu S=%lu optin=%d: status %d", B, S, emu::g.smem_optin, st);
  if (st == 0) compare("top-k", x, want, offsets, indices, cap);

  // global budget, on the same work buffer (no stale state)
  const double qs[] = {0.0, 1.0, 0.5, unit(), 0.999};
  const double q = qs[rnd(5)];
  const Sel gw = ref_global(x, q);
  cap = room(gw.indices.size(), ref_round(q, B * S));
  offsets.assign(B + 1 + kGuard, kPoison);
  indices.assign(cap + kGuard, kPoison);
  r = dropfuse_routing{B, S, offsets.data(), indices.data(), cap, work.data()};
  st = dropfuse_route_global(x.scores.data(), mask_ptr(x), len_ptr(x), q, &r, nullptr);
  CHECK(st == 0, "global B=%lu S=%lu: status %d", B, S, st);
  if (st == 0) {
    compare("global", x, gw, offsets, indices, cap);
    const uint32_t th = work[4 * B + DROPFUSE_ROUTING_THRESHOLD_WORD];
    CHECK(th == gw.threshold_key, "global B=%lu S=%lu q=%g: threshold key %#x, want %#x", B, S, q, th,
          gw.threshold_key);
  }
}

// ---- rows ----

template <typename T> static void test_rows() {
  const uint64_t B = 1 + rnd(rnd(4) == 0 ? 1100 : 5), S = 1 + rnd(B > 100 ? 3 : 40);
  constexpr uint64_t V = VecWidth<T>::value;
  const uint64_t H = rnd(2) ? V * (1 + rnd(12)) : 1 + rnd(rnd(5) == 0 ? 300 : 40);
  Batch x = make_batch(B, S);
  random_device(S);
  const Sel sel = rnd(2) ? ref_global(x, unit()) : ref_topk(x, DROPFUSE_CAPACITY_TOKENS, 0, rnd(S + 2));
  const uint64_t total = sel.indices.size();
  const int64_t deltas[] = {0, 0, 1, 3, -1, -3};
  const uint64_t cap = (uint64_t)std::max<int64_t>(0, (int64_t)total + deltas[rnd(6)]);
  const uint64_t rows = (uint64_t)std::max<int64_t>(0, (int64_t)total + deltas[rnd(6)]);
  const uint64_t limit = std::min({total, cap, rows});
  std::vector<uint32_t> offsets = sel.offsets;
  std::vector<uint32_t> indices(std::max<uint64_t>(cap, 1), kPoison);
  std::copy(sel.indices.begin(), sel.indices.begin() + std::min(total, cap), indices.begin());
  dropfuse_routing r{B, S, offsets.data(), indices.data(), cap, nullptr};
  // (compact row, flat token) pairs
  std::vector<std::pair<uint64_t, uint64_t>> pairs;
  for (uint64_t b = 0; b < B; ++b)
    for (uint64_t i = sel.offsets[b]; i < sel.offsets[b + 1]; ++i) pairs.push_back({i, b * S + sel.indices[i]});
  const uint64_t N = B * S * H;
  const T sentinel = Ty<T>::from(-12345.0f);
  auto offs = [] { return rnd(3) == 0 ? 0 : rnd(5); };
  const char *ty = sizeof(T) == 4 ? "f32" : (std::is_same<T, __half>::value ? "f16" : "bf16");

  Buf<T> xin(N, offs(), sentinel, kGuard);
  for (uint64_t i = 0; i < N; ++i) xin.p[i] = plain_value<T>();
  // gather
  {
    Buf<T> out(rows * H, offs(), sentinel, kGuard);
    int st = dropfuse_gather_tokens(Ty<T>::code, &r, H, xin.p, out.p, rows, nullptr);
    CHECK(st == 0, "gather %s: status %d", ty, st);
    bool okk = out.guards(sentinel);
    for (auto [row, tok] : pairs)
      for (uint64_t j = 0; j < H; ++j) {
        const T want = row < limit ? xin.p[tok * H + j] : sentinel;
        if (row < rows && !same(out.p[row * H + j], want)) okk = false;
      }
    for (uint64_t row = total; row < rows; ++row)
      for (uint64_t j = 0; j < H; ++j)
        if (bits(out.p[row * H + j]) != bits(sentinel)) okk = false;
    CHECK(okk, "gather %s B=%lu S=%lu H=%lu cap=%lu rows=%lu total=%lu", ty, B, S, H, cap, rows, total);
  }
  // gated scatter-add, in place
  std::vector<float> gate(B * S);
  for (auto &g : gate) g = rnd(7) == 0 ? (rnd(2) ? 0.0f : -0.0f) : (float)(unit() * 2 - 1);
  Buf<T> branch(rows * H, offs(), sentinel, kGuard);
  for (uint64_t i = 0; i < rows * H; ++i) branch.p[i] = plain_value<T>();
  {
    Buf<T> res(N, offs(), sentinel, kGuard);
    for (uint64_t i = 0; i < N; ++i) res.p[i] = xin.p[i];
    int st = dropfuse_scatter_add_tokens(Ty<T>::code, &r, H, res.p, branch.p, rows, gate.data(), nullptr);
    CHECK(st == 0, "scatter-add %s: status %d", ty, st);
    std::vector<T> want(xin.p, xin.p + N);
    for (auto [row, tok] : pairs)
      if (row < limit)
        for (uint64_t j = 0; j < H; ++j) {
          const float u = gate[tok] * Ty<T>::to(branch.p[row * H + j]);
          want[tok * H + j] = Ty<T>::from(Ty<T>::to(want[tok * H + j]) + u);
        }
    bool okk = res.guards(sentinel);
    for (uint64_t i = 0; i < N; ++i) okk = okk && same(res.p[i], want[i]);
    CHECK(okk, "scatter-add %s B=%lu S=%lu H=%lu cap=%lu rows=%lu total=%lu", ty, B, S, H, cap, rows, total);
  }
  // backward of the scatter-add
  {
    Buf<T> dy(N, offs(), sentinel, kGuard);
    for (uint64_t i = 0; i < N; ++i) dy.p[i] = plain_value<T>();
    Buf<T> db(rows * H, offs(), sentinel, kGuard);
    Buf<float> dg(B * S, 0, -777.0f, kGuard);
    int st = dropfuse_scatter_add_tokens_backward(Ty<T>::code, &r, H, dy.p, branch.p, gate.data(), db.p, rows, dg.p,
                                                  nullptr);
    CHECK(st == 0, "backward %s: status %d", ty, st);
    std::vector<T> want_db(rows * H, sentinel);
    std::vector<float> want_dg(B * S, 0.0f);
    for (auto [row, tok] : pairs)
      if (row < limit) {
        float sum = 0.0f;
        for (uint64_t c = 0; c * 32 < H; ++c) {
          float part = 0.0f;
          for (uint64_t j = c * 32; j < std::min<uint64_t>(H, c * 32 + 32); ++j) {
            const float y = Ty<T>::to(dy.p[tok * H + j]);
            want_db[row * H + j] = Ty<T>::from(gate[tok] * y);
            part = part + y * Ty<T>::to(branch.p[row * H + j]);
          }
          sum = sum + part;
        }
        want_dg[tok] = sum;
      }
    bool okk = db.guards(sentinel) && dg.guards(-777.0f);
    for (uint64_t i = 0; i < rows * H; ++i) okk = okk && same(db.p[i], want_db[i]);
    CHECK(okk, "d_branch %s B=%lu S=%lu H=%lu cap=%lu rows=%lu total=%lu", ty, B, S, H, cap, rows, total);
    okk = true;
    for (uint64_t i = 0; i < B * S; ++i) okk = okk && same(dg.p[i], want_dg[i]);
    CHECK(okk, "d_gate %s B=%lu S=%lu H=%lu cap=%lu rows=%lu total=%lu", ty, B, S, H, cap, rows, total);
  }
  // backward of the gather, accumulated
  {
    Buf<T> dx(N, offs(), sentinel, kGuard);
    for (uint64_t i = 0; i < N; ++i) dx.p[i] = plain_value<T>();
    std::vector<T> want(dx.p, dx.p + N);
    int st = dropfuse_gather_tokens_backward(Ty<T>::code, &r, H, branch.p, rows, dx.p, nullptr);
    CHECK(st == 0, "gather backward %s: status %d", ty, st);
    for (auto [row, tok] : pairs)
      if (row < limit)
        for (uint64_t j = 0; j < H; ++j)
          want[tok * H + j] = Ty<T>::from(Ty<T>::to(want[tok * H + j]) + Ty<T>::to(branch.p[row * H + j]));
    bool okk = dx.guards(sentinel);
    for (uint64_t i = 0; i < N; ++i) okk = okk && same(dx.p[i], want[i]);
    CHECK(okk, "d_x %s B=%lu S=%lu H=%lu cap=%lu rows=%lu total=%lu", ty, B, S, H, cap, rows, total);
  }
}

int main(int argc, char **argv) {
  seed_rng(2024);
  const int scale = argc > 1 ? atoi(argv[1]) : 1;
  for (int i = 0; i < 150 * scale; ++i) {
    const uint64_t B = 1 + rnd(rnd(3) == 0 ? 9 : 4);
    const uint64_t S = 1 + rnd(rnd(4) == 0 ? 3000 : 70);
    test_selection(B, S);
  }
  // more than 1024 sequences (the offsets scan carries across chunks of the one block)
  test_selection(1100 + rnd(100), 1 + rnd(3));
  test_selection(2100, 2);
  // keys in shared memory close to the 48 KB default limit (static + dynamic > 48 KB needs the
  // opt-in), and a long sequence re-read from global memory
  emu::g.static_smem = 4096;
  for (uint64_t S : {11000ull, 11265ull, 12288ull, 13000ull}) {
    Batch x = make_batch(1, S);
    x.pad = 0;
    emu::g.max_dynamic.clear();
    emu::g.smem_optin = 232448;
    std::vector<uint32_t> work(4 + DROPFUSE_ROUTING_WORK_FIXED, 0xABABABABu);
    std::vector<uint32_t> offsets(2 + kGuard, kPoison), indices(S + kGuard, kPoison);
    dropfuse_routing r{1, S, offsets.data(), indices.data(), S, work.data()};
    const int st = dropfuse_route_top_k(x.scores.data(), nullptr, nullptr, DROPFUSE_CAPACITY_FRACTION, 0.3, 0, &r,
                                        nullptr);
    CHECK(st == 0, "top-k S=%lu (keys of %lu bytes in shared memory): status %d", S, 4 * S, st);
    if (st == 0) compare("top-k long", x, ref_topk(x, DROPFUSE_CAPACITY_FRACTION, 0.3, 0), offsets, indices, S);
  }
  for (int i = 0; i < 60 * scale; ++i) {
    test_rows<float>();
    test_rows<__half>();
    test_rows<__nv_bfloat16>();
  }
  return report();
}
