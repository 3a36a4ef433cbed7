// Host emulation of kernels/structured.cu (built and run by tests/structured_host_emulation.rs): the
// real launchers and kernels on the fiber-per-thread emulator (tests/host_emu/cuda_fiber_emu.h:
// warp ballots and shuffles as rendezvous, threads in a random order between them, blocks in a
// random order) on emulated devices with 1-4 SMs and grids of 1, 2 or 32 waves, so that every
// grid-stride loop wraps. Random layouts (rank 1-6, random shared axes; channel, locked and
// embedding-row layouts among them), passed both collapsed (as src/structured.rs builds them) and
// one group per axis (the launcher normalises), every dtype, random thresholds and scales, decision
// offsets near Philox block and 2^34 boundaries and near 2^64, misaligned views, in place and out of
// place, host and device Philox states (kDev), are compared bit for bit with a plain model of the
// contract (src/reference/structured.rs): an independent Philox4x32-10 (checked against Random123's
// known answers), each element's decision from its row-major index over the original shape, +0 for
// dropped elements whatever x holds. Guard words around every output; nothing written and nothing
// launched for invalid arguments. Every kernel instantiation must have run at least once.
//
// Not emulated: kernels/dropout.cu (its launches use <<<>>>). The layouts without an effective
// shared axis and the mask of the general path go to dropfuse_dropout_{mask,forward,backward}; here
// those are host stand-ins written from the same contract, so those paths check the structured
// launcher's dispatch and arguments, not the dropout kernels (tests/dropout_gpu.rs does).
#include <stdint.h>
static int emu_waves = 32;  // waves of the occupancy-capped grids (common/launch.cuh)
#define DROPFUSE_WAVES emu_waves
#include "cuda_fiber_emu.h"
// clang-format off
#include "structured.cu"
// clang-format on

#include <set>
#include <string>

#include "contract_model.h"

using namespace model;

struct Shape {
  std::vector<uint64_t> ext;
  std::vector<bool> shared;
  uint64_t numel() const {
    uint64_t n = 1;
    for (uint64_t e : ext) n *= e;
    return n;
  }
  uint64_t decisions() const {
    uint64_t n = 1;
    for (size_t k = 0; k < ext.size(); ++k)
      if (!shared[k]) n *= ext[k];
    return n;
  }
  // Row-major index of e over the axes that are not shared.
  uint64_t decision_of(uint64_t e) const {
    uint64_t d = 0, stride = 1;
    for (size_t k = ext.size(); k-- > 0;) {
      const uint64_t i = e % ext[k];
      e /= ext[k];
      if (!shared[k]) {
        d += i * stride;
        stride *= ext[k];
      }
    }
    return d;
  }
  std::string str() const {
    std::string s = "[";
    for (size_t k = 0; k < ext.size(); ++k) {
      s += std::to_string(ext[k]) + (shared[k] ? "s" : "");
      if (k + 1 < ext.size()) s += ",";
    }
    return s + "]";
  }
};

// The descriptor as src/structured.rs builds it: extent-1 axes dropped, neighbours of the same
// kind merged (outermost first); false when more than DROPFUSE_STRUCTURED_MAX_GROUPS groups.
static bool collapsed_desc(const Shape &s, dropfuse_structured_layout *l) {
  std::vector<std::pair<uint64_t, bool>> g;
  for (size_t k = 0; k < s.ext.size(); ++k) {
    if (s.ext[k] == 1) continue;
    if (!g.empty() && g.back().second == s.shared[k])
      g.back().first *= s.ext[k];
    else
      g.push_back({s.ext[k], s.shared[k]});
  }
  if (g.empty()) g.push_back({1, false});
  if (g.size() > DROPFUSE_STRUCTURED_MAX_GROUPS) return false;
  memset(l, 0, sizeof(*l));
  l->groups = (uint32_t)g.size();
  uint64_t stride = 1;
  for (size_t k = g.size(); k-- > 0;) {
    l->extent[k] = g[k].first;
    if (!g[k].second) {
      l->decision_stride[k] = stride;
      stride *= g[k].first;
    }
  }
  l->numel = s.numel();
  l->decisions = s.decisions();
  return true;
}

// One group per axis (extent-1 and same-kind neighbours kept): also valid for the launcher.
static bool axis_desc(const Shape &s, dropfuse_structured_layout *l) {
  if (s.ext.size() > DROPFUSE_STRUCTURED_MAX_GROUPS) return false;
  memset(l, 0, sizeof(*l));
  l->groups = (uint32_t)s.ext.size();
  uint64_t stride = 1;
  for (size_t k = s.ext.size(); k-- > 0;) {
    l->extent[k] = s.ext[k];
    if (!s.shared[k]) {
      l->decision_stride[k] = stride;
      stride *= s.ext[k];
    }
  }
  l->numel = s.numel();
  l->decisions = s.decisions();
  return true;
}

// ---- host stand-ins of the dropout launchers (kernels/dropout.cu is not emulated) ----

static int dropout_stub_calls = 0;

static void stream_of(const dropfuse_dropout_params *p, uint64_t *seed, uint64_t *offset) {
  if (p->philox_dev != nullptr) {
    *seed = p->philox_dev[0];
    *offset = p->philox_dev[1] + p->offset;
  } else {
    *seed = p->seed;
    *offset = p->offset;
  }
}

extern "C" int dropfuse_dropout_mask(uint32_t *mask, uint64_t n, const dropfuse_dropout_params *params,
                                     dropfuse_stream_t) {
  ++dropout_stub_calls;
  if (n == 0) return 0;
  if (mask == nullptr || params == nullptr || (reinterpret_cast<uintptr_t>(params->philox_dev) & 7u) != 0) return 1;
  uint64_t seed, offset;
  stream_of(params, &seed, &offset);
  for (uint64_t w = 0; w < (n + 31) / 32; ++w) {
    uint32_t m = 0;
    for (uint64_t j = 0; j < 32 && 32 * w + j < n; ++j)
      m |= (uint32_t)kept(seed, offset, params->element_offset + 32 * w + j, params->threshold) << j;
    mask[w] = m;
  }
  return 0;
}

template <typename T> static void stub_apply(const void *x, void *y, uint64_t n, const uint32_t *mask, float scale) {
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t v = model_value(static_cast<const T *>(x)[i], (mask[i / 32] >> (i % 32)) & 1u, scale);
    static_cast<T *>(y)[i] = from_bits<T>(v);
  }
}

static void stub_apply_dtype(dropfuse_dtype dt, const void *x, void *y, uint64_t n, const uint32_t *mask, float scale) {
  if (dt == DROPFUSE_F32) stub_apply<float>(x, y, n, mask, scale);
  if (dt == DROPFUSE_F16) stub_apply<__half>(x, y, n, mask, scale);
  if (dt == DROPFUSE_BF16) stub_apply<__nv_bfloat16>(x, y, n, mask, scale);
}

extern "C" int dropfuse_dropout_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask, uint64_t n,
                                        const dropfuse_dropout_params *params, dropfuse_stream_t s) {
  ++dropout_stub_calls;
  if (n == 0) return 0;
  std::vector<uint32_t> m((n + 31) / 32);
  int st = dropfuse_dropout_mask(m.data(), n, params, s);
  --dropout_stub_calls;
  if (st != 0 || x == nullptr || y == nullptr) return 1;
  stub_apply_dtype(dtype, x, y, n, m.data(), params->scale);
  if (mask != nullptr) memcpy(mask, m.data(), m.size() * 4);
  return 0;
}

extern "C" int dropfuse_dropout_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                         uint64_t n, float scale, dropfuse_stream_t) {
  ++dropout_stub_calls;
  if (n == 0) return 0;
  if (dy == nullptr || dx == nullptr || mask == nullptr) return 1;
  stub_apply_dtype(dtype, dy, dx, n, mask, scale);
  return 0;
}

// ---- the cases ----

struct Rand {
  uint64_t seed, offset, decision_offset, threshold;
  float scale;
  bool dev;         // device state
  uint64_t dev_add;  // params.offset with a device state
};

static Rand random_rand(uint64_t decisions) {
  Rand r;
  r.seed = rng();
  r.offset = rnd(3) == 0 ? ~uint64_t(0) - rnd(3) : rng();
  switch (rnd(6)) {
    case 0: r.decision_offset = 0; break;
    case 1: r.decision_offset = rnd(5000); break;
    case 2: r.decision_offset = 4 * rnd(1 << 20); break;
    case 3: r.decision_offset = ((1 + rnd(1 << 20)) << 34) - rnd(100000); break;  // across 2^34 blocks
    case 4: r.decision_offset = ~uint64_t(0) - decisions - rnd(9); break;         // near 2^64
    default: r.decision_offset = rng() >> rnd(64); break;
  }
  if (rnd(2) == 0) r.decision_offset &= ~uint64_t(3);  // half of them whole Philox blocks (the locked kernel)
  if (r.decision_offset > ~uint64_t(0) - decisions) r.decision_offset = ~uint64_t(0) - decisions;
  switch (rnd(7)) {
    case 0: r.threshold = 0; break;
    case 1: r.threshold = uint64_t(1) << 32; break;
    case 2: r.threshold = 0xFFFFFFFFull; break;
    case 3: r.threshold = 1; break;
    default: r.threshold = rnd((uint64_t(1) << 32) + 1); break;
  }
  const float scales[] = {1.0f, 2.0f, 1.25f, 0.0f, 1.1111112f, 3.0e38f, 1e-30f};
  r.scale = rnd(2) ? scales[rnd(7)] : (float)(1.0 + (rng() >> 11) * (1.0 / 9007199254740992.0) * 9.0);
  r.dev = rnd(2);
  r.dev_add = rnd(3) == 0 ? ~uint64_t(0) - rnd(4) : rng();
  return r;
}

// The launch params (and the device state they may point to).
struct LaunchParams {
  uint64_t state[2];
  dropfuse_dropout_params p;
  LaunchParams(const Rand &r) {
    memset(&p, 0, sizeof(p));
    p.element_offset = r.decision_offset;
    p.threshold = r.threshold;
    p.scale = r.scale;
    if (r.dev) {
      // {seed, offset - add}: the kernel reads offset - add + add.
      state[0] = r.seed;
      state[1] = r.offset - r.dev_add;
      p.seed = 0x5EED5EED5EED5EEDull;  // ignored with a device state
      p.offset = r.dev_add;
      p.philox_dev = state;
    } else {
      p.seed = r.seed;
      p.offset = r.offset;
      p.philox_dev = nullptr;
    }
  }
};

static void random_device() {
  emu::g.sms = 1 + (int)rnd(4);
  emu::g.blocks_per_sm = 1 + (int)rnd(3);
  const int w[] = {1, 1, 2, 32};
  emu_waves = w[rnd(4)];
}

static std::vector<uint32_t> model_mask(const Shape &s, const Rand &r) {
  const uint64_t d = s.decisions();
  std::vector<uint32_t> m((d + 31) / 32, 0);
  for (uint64_t i = 0; i < d; ++i)
    if (kept(r.seed, r.offset, r.decision_offset + i, r.threshold)) m[i / 32] |= 1u << (i % 32);
  return m;
}

template <typename T>
static std::vector<uint32_t> model_apply(const Shape &s, const std::vector<T> &x, const std::vector<uint32_t> &mask,
                                         float scale) {
  std::vector<uint32_t> y(x.size());
  for (uint64_t e = 0; e < x.size(); ++e) {
    const uint64_t d = s.decision_of(e);
    y[e] = model_value(x[e], (mask[d / 32] >> (d % 32)) & 1u, scale);
  }
  return y;
}

template <typename T> static bool same(const Buf<T> &b, const std::vector<uint32_t> &want, uint64_t *first_bad) {
  for (uint64_t i = 0; i < want.size(); ++i)
    if (bits(b.p[i]) != want[i]) {
      *first_bad = i;
      return false;
    }
  return true;
}

template <typename T> static void run_case(const Shape &s, bool per_axis) {
  dropfuse_structured_layout l;
  if (!(per_axis ? axis_desc(s, &l) : collapsed_desc(s, &l))) return;
  const uint64_t n = s.numel(), dec = s.decisions(), words = (dec + 31) / 32;
  const Rand r = random_rand(dec);
  const LaunchParams prm(r);
  const bool inplace = rnd(3) == 0;
  const size_t xoff = rnd(3) ? 0 : rnd(9), yoff = inplace ? xoff : (rnd(3) ? xoff : rnd(9)), moff = rnd(3);
  char what[512];
  snprintf(what, sizeof what,
           "%s %s %s%s dec_off=%#llx thr=%#llx scale=%g dev=%d inplace=%d xoff=%zu yoff=%zu sms=%d bps=%d waves=%d",
           Ty<T>::name, s.str().c_str(), per_axis ? "per-axis" : "collapsed", "", (unsigned long long)r.decision_offset,
           (unsigned long long)r.threshold, r.scale, (int)r.dev, (int)inplace, xoff, yoff, emu::g.sms,
           emu::g.blocks_per_sm, emu_waves);

  std::vector<T> x(n);
  for (auto &v : x) v = random_value<T>();
  const std::vector<uint32_t> want_m = model_mask(s, r);
  const std::vector<uint32_t> want_y = model_apply(s, x, want_m, r.scale);

  Buf<T> xb(n, xoff), yb(n, yoff);
  Buf<uint32_t> mb(words, moff);
  auto load_x = [&](Buf<T> &b) {
    fill_poison(b);
    memcpy(b.p, x.data(), n * sizeof(T));
  };
  const uint32_t pb = bits(poison<T>());
  uint64_t bad = 0;

  // forward with the mask
  for (int with_mask = 1; with_mask >= 0; --with_mask) {
    random_device();
    Buf<T> &out = inplace ? xb : yb;
    load_x(xb);
    if (!inplace) fill_poison(yb);
    fill_poison(mb);
    const int st = dropfuse_structured_forward(Ty<T>::code, xb.p, out.p, with_mask ? mb.p : nullptr, &l, &prm.p, nullptr);
    CHECK(st == 0, "%s: forward status %d", what, st);
    CHECK(same(out, want_y, &bad), "%s: forward%s y[%llu] = %#x, want %#x (decision %llu)", what,
          with_mask ? "" : " (no mask)", (unsigned long long)bad, bits(out.p[bad]), want_y[bad],
          (unsigned long long)s.decision_of(bad));
    CHECK(guards_ok(out, pb), "%s: forward wrote outside y", what);
    if (!inplace) CHECK(guards_ok(xb, pb) && memcmp(xb.p, x.data(), n * sizeof(T)) == 0, "%s: x changed", what);
    if (with_mask) {
      CHECK(same(mb, want_m, &bad), "%s: forward mask word %llu = %#x, want %#x", what, (unsigned long long)bad,
            mb.p[bad], want_m[bad]);
      CHECK(guards_ok(mb, kPoisonWord), "%s: forward wrote outside the mask", what);
    } else {
      CHECK(guards_ok(mb, kPoisonWord) && mb.p[0] == kPoisonWord, "%s: mask-free forward wrote a mask", what);
    }
  }

  // the mask alone
  {
    random_device();
    fill_poison(mb);
    const int st = dropfuse_structured_mask(mb.p, &l, &prm.p, nullptr);
    CHECK(st == 0, "%s: mask status %d", what, st);
    CHECK(same(mb, want_m, &bad), "%s: mask word %llu = %#x, want %#x", what, (unsigned long long)bad, mb.p[bad],
          want_m[bad]);
    CHECK(guards_ok(mb, kPoisonWord), "%s: mask wrote outside", what);
  }

  // backward from a random mask (garbage in the unused high bits of its last word), another scale
  {
    random_device();
    std::vector<uint32_t> m(words);
    const int density = (int)rnd(4);
    for (auto &w : m) w = density == 0 ? 0u : density == 1 ? ~0u : (uint32_t)rng();
    fill_poison(mb);
    memcpy(mb.p, m.data(), words * 4);
    const float scale = rnd(2) ? r.scale : (float)(rnd(1000) + 1) / 256.0f;
    const std::vector<uint32_t> want = model_apply(s, x, m, scale);
    Buf<T> &out = inplace ? xb : yb;
    load_x(xb);
    if (!inplace) fill_poison(yb);
    const int st = dropfuse_structured_backward(Ty<T>::code, xb.p, out.p, mb.p, &l, scale, nullptr);
    CHECK(st == 0, "%s: backward status %d", what, st);
    CHECK(same(out, want, &bad), "%s: backward dx[%llu] = %#x, want %#x", what, (unsigned long long)bad,
          bits(out.p[bad]), want[bad]);
    CHECK(guards_ok(out, pb), "%s: backward wrote outside dx", what);
    CHECK(memcmp(mb.p, m.data(), words * 4) == 0 && guards_ok(mb, kPoisonWord), "%s: backward changed the mask", what);
  }
}

// ---- invalid arguments: status 1, nothing written, nothing launched ----

static void invalid_arguments() {
  Shape s{{3, 5, 7}, {false, false, true}};
  dropfuse_structured_layout good;
  collapsed_desc(s, &good);
  Rand r = random_rand(s.decisions());
  r.dev = false;
  LaunchParams prm(r);
  Buf<float> x(s.numel(), 0), y(s.numel(), 0);
  Buf<uint32_t> m(1, 0);
  fill_poison(x);
  fill_poison(y);
  fill_poison(m);
  const uint64_t launches = emu::g.launches;
  const int stubs = dropout_stub_calls;
  auto bad_layout = [&](const char *what, auto edit) {
    dropfuse_structured_layout l = good;
    edit(l);
    CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, y.p, m.p, &l, &prm.p, nullptr) == 1, "layout %s: forward", what);
    CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, y.p, nullptr, &l, &prm.p, nullptr) == 1, "layout %s: maskless",
          what);
    CHECK(dropfuse_structured_mask(m.p, &l, &prm.p, nullptr) == 1, "layout %s: mask", what);
    CHECK(dropfuse_structured_backward(DROPFUSE_F32, x.p, y.p, m.p, &l, 2.0f, nullptr) == 1, "layout %s: backward", what);
  };
  bad_layout("groups 0", [](dropfuse_structured_layout &l) { l.groups = 0; });
  bad_layout("groups 9", [](dropfuse_structured_layout &l) { l.groups = DROPFUSE_STRUCTURED_MAX_GROUPS + 1; });
  bad_layout("numel", [](dropfuse_structured_layout &l) { l.numel += 1; });
  bad_layout("decisions", [](dropfuse_structured_layout &l) { l.decisions += 1; });
  bad_layout("zero extent", [](dropfuse_structured_layout &l) { l.extent[0] = 0; });
  bad_layout("stride", [](dropfuse_structured_layout &l) { l.decision_stride[0] = 2; });
  bad_layout("overflow", [](dropfuse_structured_layout &l) {
    l.extent[0] = uint64_t(1) << 40;
    l.extent[1] = uint64_t(1) << 30;
    l.decision_stride[0] = l.extent[1];
  });
  CHECK(dropfuse_structured_forward(DROPFUSE_F32, nullptr, y.p, m.p, &good, &prm.p, nullptr) == 1, "null x");
  CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, nullptr, m.p, &good, &prm.p, nullptr) == 1, "null y");
  CHECK(dropfuse_structured_forward((dropfuse_dtype)3, x.p, y.p, m.p, &good, &prm.p, nullptr) == 1, "bad dtype");
  CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, y.p, m.p, nullptr, &prm.p, nullptr) == 1, "null layout");
  CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, y.p, m.p, &good, nullptr, nullptr) == 1, "null params");
  uint32_t *odd = reinterpret_cast<uint32_t *>(reinterpret_cast<char *>(m.p) + 2);
  CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, y.p, odd, &good, &prm.p, nullptr) == 1, "misaligned mask");
  CHECK(dropfuse_structured_mask(odd, &good, &prm.p, nullptr) == 1, "misaligned mask (mask)");
  CHECK(dropfuse_structured_mask(nullptr, &good, &prm.p, nullptr) == 1, "null mask (mask)");
  CHECK(dropfuse_structured_backward(DROPFUSE_F32, x.p, y.p, odd, &good, 2.0f, nullptr) == 1, "misaligned mask (bwd)");
  CHECK(dropfuse_structured_backward(DROPFUSE_F32, x.p, y.p, nullptr, &good, 2.0f, nullptr) == 1, "null mask (bwd)");
  CHECK(dropfuse_structured_backward((dropfuse_dtype)9, x.p, y.p, m.p, &good, 2.0f, nullptr) == 1, "bad dtype (bwd)");
  uint64_t state[3] = {1, 2, 3};
  for (int mis : {1, 4, 7}) {
    LaunchParams q(r);
    q.p.philox_dev = reinterpret_cast<const uint64_t *>(reinterpret_cast<char *>(state) + mis);
    CHECK(dropfuse_structured_forward(DROPFUSE_F32, x.p, y.p, m.p, &good, &q.p, nullptr) == 1, "misaligned state %d",
          mis);
    CHECK(dropfuse_structured_mask(m.p, &good, &q.p, nullptr) == 1, "misaligned state %d (mask)", mis);
  }
  CHECK(emu::g.launches == launches && dropout_stub_calls == stubs, "an invalid call launched work");
  CHECK(guards_ok(y, bits(poison<float>())) && y.p[0] != y.p[0], "an invalid call wrote y");
  CHECK(guards_ok(m, kPoisonWord) && m.p[0] == kPoisonWord, "an invalid call wrote the mask");
  // numel == 0: a no-op before any check of the pointers.
  dropfuse_structured_layout empty = good;
  empty.numel = 0;
  CHECK(dropfuse_structured_forward(DROPFUSE_F32, nullptr, nullptr, nullptr, &empty, &prm.p, nullptr) == 0, "empty");
  CHECK(emu::g.launches == launches, "an empty call launched work");
}

// ---- coverage: every kernel instantiation ran ----

static std::vector<std::pair<const void *, std::string>> expected;
template <typename T> static void expect_kernels() {
  const std::string t = Ty<T>::name;
  using M = Mode;
#define K(label, ...) expected.push_back({reinterpret_cast<const void *>(&__VA_ARGS__), t + " " + label})
  K("planes fwd+mask", planes_kernel<T, M::ForwardMask, false>);
  K("planes fwd+mask dev", planes_kernel<T, M::ForwardMask, true>);
  K("planes fwd", planes_kernel<T, M::ForwardNoMask, false>);
  K("planes fwd dev", planes_kernel<T, M::ForwardNoMask, true>);
  K("planes apply", planes_kernel<T, M::ApplyMask, false>);
  K("locked vec fwd+mask", locked_kernel<T, true, M::ForwardMask, true, false>);
  K("locked vec fwd+mask dev", locked_kernel<T, true, M::ForwardMask, true, true>);
  K("locked vec fwd", locked_kernel<T, true, M::ForwardNoMask, true, false>);
  K("locked vec fwd dev", locked_kernel<T, true, M::ForwardNoMask, true, true>);
  K("locked vec apply", locked_kernel<T, true, M::ApplyMask, true, false>);
  K("locked scalar fwd+mask", locked_kernel<T, false, M::ForwardMask, true, false>);
  K("locked scalar fwd+mask dev", locked_kernel<T, false, M::ForwardMask, true, true>);
  K("locked scalar fwd", locked_kernel<T, false, M::ForwardNoMask, true, false>);
  K("locked scalar fwd dev", locked_kernel<T, false, M::ForwardNoMask, true, true>);
  K("locked scalar apply", locked_kernel<T, false, M::ApplyMask, true, false>);
  K("general vec fwd", general_kernel<T, true, M::ForwardNoMask, false>);
  K("general vec fwd dev", general_kernel<T, true, M::ForwardNoMask, true>);
  K("general vec apply", general_kernel<T, true, M::ApplyMask, false>);
  K("general scalar fwd", general_kernel<T, false, M::ForwardNoMask, false>);
  K("general scalar fwd dev", general_kernel<T, false, M::ForwardNoMask, true>);
  K("general scalar apply", general_kernel<T, false, M::ApplyMask, false>);
#undef K
}

// ---- shapes ----

static Shape random_shape(uint64_t max_numel) {
  Shape s;
  const int kind = (int)rnd(8);
  auto dim = [] {
    switch (rnd(6)) {
      case 0: return (uint64_t)1;
      case 1: return 1 + rnd(8);
      case 2: return 8 * (1 + rnd(8));
      case 3: return 30 + rnd(40);
      default: return 1 + rnd(20);
    }
  };
  if (kind == 0) {  // channel 1d/2d/3d [N, C, *spatial]
    const int sp = 1 + (int)rnd(3);
    s.ext = {dim(), dim()};
    s.shared = {false, false};
    for (int k = 0; k < sp; ++k) s.ext.push_back(dim()), s.shared.push_back(true);
  } else if (kind == 1) {  // locked on time (T, B, H)
    s.ext = {dim(), dim(), rnd(2) ? 8 * (1 + rnd(40)) : 1 + rnd(300)};
    s.shared = {true, false, false};
  } else if (kind == 2) {  // locked on another axis
    s.ext = {dim(), dim(), dim()};
    s.shared = {false, false, false};
    s.shared[rnd(3)] = true;
  } else if (kind == 3) {  // embedding rows [V, E]
    s.ext = {1 + rnd(300), 1 + rnd(200)};
    s.shared = {false, true};
  } else if (kind == 4) {  // big planes: segments split across warps
    s.ext = {1 + rnd(3), 1500 + rnd(6000)};
    s.shared = {false, true};
  } else {  // random axes and shared set
    const int rank = 1 + (int)rnd(6);
    for (int k = 0; k < rank; ++k) s.ext.push_back(dim()), s.shared.push_back(rnd(2));
  }
  while (s.numel() > max_numel) {
    size_t k = 0;
    for (size_t j = 1; j < s.ext.size(); ++j)
      if (s.ext[j] > s.ext[k]) k = j;
    s.ext[k] = (s.ext[k] + 1) / 2;
  }
  return s;
}

template <typename T> static void random_case(uint64_t max_numel) {
  const Shape s = random_shape(max_numel);
  run_case<T>(s, rnd(3) == 0);
}

int main(int argc, char **argv) {
  seed_rng(20251128);
  const int scale = argc > 1 ? atoi(argv[1]) : 1;
  if (argc > 2) rng.seed(strtoull(argv[2], nullptr, 0)), emu::g.rng.seed(strtoull(argv[2], nullptr, 0));  // explore
  CHECK(philox_kat_ok(), "the model's Philox differs from Random123's known answers");
  expect_kernels<float>();
  expect_kernels<__half>();
  expect_kernels<__nv_bfloat16>();
  invalid_arguments();
  // Named layouts (every path, partial vectors and words, extent-1 axes, eight groups).
  const std::vector<Shape> named = {
      {{4, 6, 37}, {false, false, true}},                                    // Dropout1d, odd planes
      {{2, 33, 16, 16}, {false, false, true, true}},                          // Dropout2d, 16-byte planes
      {{2, 3, 4, 5, 6}, {false, false, true, true, true}},                    // Dropout3d
      {{7, 5, 64}, {true, false, false}},                                     // locked on time, vector rows
      {{7, 5, 13}, {true, false, false}},                                     // locked on time, scalar rows
      {{9, 40, 1}, {true, false, false}},                                     // locked, H % 32 != 0 with V | H
      {{70, 3, 16}, {true, false, false}},                                    // locked, many rows
      {{7, 5, 13}, {false, true, false}},                                     // locked on batch (general)
      {{1001, 40}, {false, true}},                                            // embedding rows
      {{3, 8, 8, 11}, {false, true, true, false}},                            // channels-last (general)
      {{1, 1, 50, 1}, {true, true, false, true}},                             // plain dropout
      {{1, 7, 1, 9}, {false, false, true, false}},                            // extent-1 shared axis
      {{5, 3000}, {true, true}},                                              // one decision
      {{2, 3, 2, 3, 2, 3, 2, 3}, {false, true, false, true, false, true, false, true}},  // eight groups
      {{1}, {true}},                                                          // one element
      {{3, 1, 2100}, {false, false, true}},                                   // planes split in segments
      {{33, 7}, {false, true}},                                               // 33 planes: two mask words
  };
  for (int rep = 0; rep < 4 * scale; ++rep)
    for (const Shape &s : named)
      for (int per_axis = 0; per_axis < 2; ++per_axis) {
        run_case<float>(s, per_axis);
        run_case<__half>(s, per_axis);
        run_case<__nv_bfloat16>(s, per_axis);
      }
  for (int i = 0; i < 80 * scale; ++i) {
    random_case<float>(20000);
    random_case<__half>(20000);
    random_case<__nv_bfloat16>(20000);
  }
  // A few large tensors on small grids: the loops wrap many times.
  for (int i = 0; i < 2 * scale; ++i) {
    random_case<float>(200000);
    random_case<__half>(200000);
  }
  // More random cases until every instantiation has run (bounded).
  auto missing = [] {
    std::vector<std::string> m;
    for (auto &k : expected)
      if (emu::g.launched[k.first] == 0) m.push_back(k.second);
    return m;
  };
  int extra = 0;
  for (; extra < 300 && !missing().empty(); ++extra) {
    random_case<float>(5000);
    random_case<__half>(5000);
    random_case<__nv_bfloat16>(5000);
  }
  for (const std::string &k : missing()) CHECK(false, "kernel never launched: %s", k.c_str());
  uint64_t fewest = ~uint64_t(0);
  for (auto &k : expected) fewest = std::min<uint64_t>(fewest, emu::g.launched[k.first]);
  printf("kernel instantiations: %zu, each launched at least %llu times (%d extra rounds for coverage)\n",
         expected.size(), (unsigned long long)fewest, extra);
  std::set<const void *> mine;
  for (auto &k : expected) mine.insert(k.first);
  uint64_t ours = 0;
  for (auto &kv : emu::g.launched)
    if (mine.count(kv.first)) ours += kv.second;
  printf("launches: %lu (structured kernels %lu, dropout stand-in calls %d), checks: %ld, failures: %d\n",
         (unsigned long)emu::g.launches, (unsigned long)ours, dropout_stub_calls, checks, failures);
  return failures == 0 ? 0 : 1;
}
