// Host emulation of kernels/bias_dropout_residual.cu (built and run by
// tests/bias_dropout_residual_host_emulation.rs): the real launchers and kernels on the
// fiber-per-thread emulator (tests/host_emu/cuda_fiber_emu.h; the backward's 2-D grid through
// cuda_fiber_emu_2d.h) on an emulated device with few SMs (the grid-stride loops wrap), compared
// bit for bit with plain C++ loops written from the contract (src/reference/bias_dropout_residual.rs
// points 1-4, kernels/dropfuse.h):
//   * forward: y and the bit mask for f32 / f16 / bf16, every kernel variant (vector bias, scalar
//     bias, no bias, misaligned data; block-aligned and general element offsets; host and device
//     Philox state with add != 0), p = 0, 1, random and extreme thresholds, element offsets
//     crossing 2^34 (the Philox fast path's high word) and near 2^64, n % 32 tails, in place on the
//     residual or on x, non-finite values of dropped elements, -0 residuals; guards around y and
//     the mask, inputs unmodified;
//   * backward with a bias gradient: dx and dbias (the contract's 256-row chunked order) from a
//     stored mask (its unused bits set: never read) or regenerated (host and device state), in
//     place, misaligned views, row lengths that are not multiples of the vector width, more chunks
//     than one, a workspace poisoned with NaN and larger than needed;
//   * backward without a bias gradient: the dropout launchers it delegates to (stubs here that
//     apply dropout's contract to the arguments they receive);
//   * the launchers' argument checks (nothing launched on error).
#include "cuda_fiber_emu.h"
#include "cuda_fiber_emu_2d.h"

// clang-format off
#include "bias_dropout_residual.cu"
// clang-format on
#include "contract_model.h"

using namespace model;

// Stubs of kernels/dropout.cu's launchers (declared in dropfuse.h; bias_dropout_residual.cu calls
// them for the backward without dbias): dropout's contract on the host, with the arguments given.

static int stub_calls = 0;

template <typename T> static void stub_apply(const void *src, void *dst, uint64_t n, float scale,
                                             const std::vector<uint32_t> &mask) {
  const T *s = static_cast<const T *>(src);
  T *d = static_cast<T *>(dst);
  for (uint64_t i = 0; i < n; ++i) d[i] = bit(mask, i) ? Ty<T>::from(Ty<T>::to(s[i]) * scale) : Ty<T>::from(0.0f);
}
static int stub_dispatch(dropfuse_dtype dtype, const void *src, void *dst, uint64_t n, float scale,
                         const std::vector<uint32_t> &mask) {
  switch (dtype) {
    case DROPFUSE_F32: stub_apply<float>(src, dst, n, scale, mask); return 0;
    case DROPFUSE_F16: stub_apply<__half>(src, dst, n, scale, mask); return 0;
    case DROPFUSE_BF16: stub_apply<__nv_bfloat16>(src, dst, n, scale, mask); return 0;
  }
  return cudaErrorInvalidValue;
}
extern "C" int dropfuse_dropout_backward(dropfuse_dtype dtype, const void *dy, void *dx, const uint32_t *mask,
                                         uint64_t n, float scale, dropfuse_stream_t) {
  ++stub_calls;
  if (n == 0) return 0;
  if (dy == nullptr || dx == nullptr || mask == nullptr) return cudaErrorInvalidValue;
  const std::vector<uint32_t> m(mask, mask + (n + 31) / 32);
  return stub_dispatch(dtype, dy, dx, n, scale, m);
}
extern "C" int dropfuse_dropout_forward(dropfuse_dtype dtype, const void *x, void *y, uint32_t *mask, uint64_t n,
                                        const dropfuse_dropout_params *p, dropfuse_stream_t) {
  ++stub_calls;
  if (p == nullptr) return cudaErrorInvalidValue;
  if (n == 0) return 0;
  if (x == nullptr || y == nullptr || (reinterpret_cast<uintptr_t>(p->philox_dev) & 7u) != 0) return cudaErrorInvalidValue;
  const uint64_t seed = p->philox_dev ? p->philox_dev[0] : p->seed;
  const uint64_t offset = p->philox_dev ? p->philox_dev[1] + p->offset : p->offset;
  const std::vector<uint32_t> m = mask_of(seed, offset, p->element_offset, n, p->threshold);
  if (mask != nullptr) std::copy(m.begin(), m.end(), mask);
  return stub_dispatch(dtype, x, y, n, p->scale, m);
}

// A random element offset: 0, small, unaligned, crossing 2^34 (the Philox fast path's high word)
// or near 2^64 (element_offset + n must not overflow).
static uint64_t random_element_offset(uint64_t n) {
  switch (rnd(6)) {
    case 0: return 0;
    case 1: return rnd(9);
    case 2: return (uint64_t{1} << 34) - rnd(n + 8);
    case 3: return (~uint64_t{0} - n) - rnd(64);
    case 4: return rnd64() >> 1;
    default: return 4 * rnd(1000);
  }
}

struct Rng {
  uint64_t seed, offset;   // the effective stream
  uint64_t state[2];       // the device state, when dev
  bool dev;
  void fill(dropfuse_dropout_params &p) {
    if (dev) {
      const uint64_t add = coin(3) ? 0 : rnd64();
      state[0] = seed;
      state[1] = offset - add;  // wrapping: state[1] + add == offset
      p.seed = ~seed;           // ignored with a device state
      p.offset = add;
      p.philox_dev = state;
    } else {
      p.seed = seed;
      p.offset = offset;
      p.philox_dev = nullptr;
    }
  }
};
static Rng random_rng(bool dev) { return Rng{rnd64(), random_offset(1), {0, 0}, dev}; }

// ================================ forward ================================

template <typename T> static void forward_case(uint64_t rows, uint64_t H) {
  const uint64_t n = rows * H;
  const Drop d = random_drop();
  const uint64_t eo = random_element_offset(n);
  Rng r = random_rng(coin(3));
  const bool with_bias = !coin(4), with_mask = !coin(3);
  const int inplace = coin(3) ? (int)rnd(2) + 1 : 0;  // 1: y == residual, 2: y == x
  // Mostly aligned data (the vector kernels), sometimes not; the bias aligned or not.
  const bool misaligned = coin(4);
  Buf<T> x(n, misaligned ? random_mis<T>() : 0), res(n, misaligned ? random_mis<T>() : 0);
  Buf<T> bias(with_bias ? H : 0, coin(3) ? rnd(16 / sizeof(T)) : 0);
  Buf<T> yb(inplace ? 0 : n, misaligned ? random_mis<T>() : 0);
  Buf<uint32_t> mask(with_mask ? (n + 31) / 32 : 0, 0);
  const bool specials = coin(3);
  for (uint64_t i = 0; i < n; ++i) {
    x[i] = Ty<T>::from(value(4.0f, specials));
    res[i] = Ty<T>::from(coin(10) ? -0.0f : value(4.0f, specials));
  }
  for (uint64_t j = 0; j < bias.n; ++j) bias[j] = Ty<T>::from(coin(8) ? -0.0f : value(2.0f, specials));
  const std::vector<T> x0(x.p, x.p + n), r0(res.p, res.p + n);
  const std::vector<unsigned char> bias0 = bias.bytes();
  T *y = inplace == 1 ? res.p : inplace == 2 ? x.p : yb.p;
  dropfuse_dropout_params p{};
  p.element_offset = eo;
  p.threshold = d.threshold;
  p.scale = d.scale;
  r.fill(p);
  random_one_sm_device();
  const int st = dropfuse_bias_dropout_residual_forward(Ty<T>::code, x.p, res.p, with_bias ? bias.p : nullptr, y,
                                                        with_mask ? mask.p : nullptr, rows, H, &p, nullptr);
  CHECK(st == 0, "forward: status %d", st);
  const std::vector<uint32_t> m = mask_of(r.seed, r.offset, eo, n, d.threshold);
  bool ok = true;
  for (uint64_t i = 0; i < n; ++i) {
    float u = 0.0f;
    if (bit(m, i)) {
      float t = Ty<T>::to(x0[i]);
      if (with_bias) t = t + Ty<T>::to(bias[i % H]);
      u = d.scale * t;
    }
    const T want = Ty<T>::from(Ty<T>::to(r0[i]) + u);
    if (!same(y[i], want)) {
      if (ok)
        printf("  forward %s rows=%lu H=%lu eo=%lu: element %lu got %#x want %#x (x %#x r %#x kept %d)\n", Ty<T>::name,
               rows, H, eo, i, bits(y[i]), bits(want), bits(x0[i]), bits(r0[i]), (int)bit(m, i));
      ok = false;
    }
  }
  CHECK(ok, "forward %s rows=%lu H=%lu eo=%lu thr=%lu bias=%d mask=%d inplace=%d dev=%d mis=%d/%d/%d/%d: y differs", Ty<T>::name, rows, H,
        eo, d.threshold, with_bias, with_mask, inplace, r.dev, (int)((uintptr_t)x.p & 15), (int)((uintptr_t)res.p & 15),
        (int)((uintptr_t)y & 15), (int)((uintptr_t)bias.p & 15));
  if (with_mask) {
    bool mok = true;
    for (size_t w = 0; w < m.size(); ++w) mok = mok && mask[w] == m[w];
    CHECK(mok, "forward %s rows=%lu H=%lu eo=%lu dev=%d: mask differs", Ty<T>::name, rows, H, eo, r.dev);
  }
  if (inplace != 2) CHECK(std::equal(x0.begin(), x0.end(), x.p, [](T a, T b) { return bits(a) == bits(b); }), "forward: x modified");
  if (inplace != 1) CHECK(std::equal(r0.begin(), r0.end(), res.p, [](T a, T b) { return bits(a) == bits(b); }), "forward: residual modified");
  CHECK(bias.bytes() == bias0, "forward: bias modified");
  CHECK(x.guards() && res.guards() && bias.guards() && yb.guards() && mask.guards(),
        "forward %s rows=%lu H=%lu eo=%lu bias=%d mask=%d inplace=%d dev=%d: a guard was written (x %d, residual %d, "
        "bias %d, y %d, mask %d)",
        Ty<T>::name, rows, H, eo, with_bias, with_mask, inplace, r.dev, x.guards(), res.guards(), bias.guards(),
        yb.guards(), mask.guards());
}

// ================================ backward ================================

template <typename T> static void backward_case(uint64_t rows, uint64_t H, int source, bool with_dbias) {
  // source: 0 stored mask, 1 regenerated (host state), 2 regenerated (device state)
  const uint64_t n = rows * H;
  const Drop d = random_drop();
  const uint64_t eo = random_element_offset(n);
  Rng r = random_rng(source == 2);
  const bool inplace = coin(3);
  const bool misaligned = coin(4);
  Buf<T> dy(n, misaligned ? random_mis<T>() : 0), dxb(inplace ? 0 : n, misaligned ? random_mis<T>() : 0);
  Buf<T> dbias(with_dbias ? H : 0, random_mis<T>());
  const uint64_t chunks = (rows + DROPFUSE_BDR_DBIAS_CHUNK - 1) / DROPFUSE_BDR_DBIAS_CHUNK;
  Buf<float> ws(with_dbias ? chunks * H + rnd(40) : 0, 0);
  for (size_t i = 0; i < ws.n; ++i) ws[i] = NAN;
  const bool specials = coin(3);
  for (uint64_t i = 0; i < n; ++i) dy[i] = Ty<T>::from(value(3.0f, specials));
  const std::vector<T> dy0(dy.p, dy.p + n);
  const std::vector<uint32_t> m = mask_of(r.seed, r.offset, eo, n, d.threshold);
  Buf<uint32_t> mask(source == 0 ? m.size() : 0, 0);
  if (source == 0) {
    for (size_t w = 0; w < m.size(); ++w) mask[w] = m[w];
    if (n % 32 != 0) mask[m.size() - 1] |= ~0u << (n % 32);  // unused bits: must not be read
  }
  T *dx = inplace ? dy.p : dxb.p;
  dropfuse_dropout_params p{};
  p.element_offset = eo;
  p.threshold = d.threshold;
  p.scale = d.scale;
  if (source == 0) {
    p.seed = rnd64(), p.offset = rnd64();  // a stored mask: the stream is not used
  } else {
    r.fill(p);
  }
  random_one_sm_device();
  const int calls = stub_calls;
  const int st = dropfuse_bias_dropout_residual_backward(Ty<T>::code, dy.p, dx, source == 0 ? mask.p : nullptr,
                                                         with_dbias ? dbias.p : nullptr, with_dbias ? ws.p : nullptr,
                                                         rows, H, &p, nullptr);
  CHECK(st == 0, "backward: status %d", st);
  CHECK(stub_calls == calls + (with_dbias ? 0 : 1), "backward: %d dropout launcher calls", stub_calls - calls);
  bool ok = true;
  for (uint64_t i = 0; i < n && ok; ++i) {
    const T want = bit(m, i) ? Ty<T>::from(d.scale * Ty<T>::to(dy0[i])) : Ty<T>::from(0.0f);
    if (!same(dx[i], want)) {
      printf("  backward %s rows=%lu H=%lu: dx[%lu] got %#x want %#x\n", Ty<T>::name, rows, H, i, bits(dx[i]),
             bits(want));
      ok = false;
    }
  }
  CHECK(ok, "backward %s rows=%lu H=%lu eo=%lu source=%d dbias=%d inplace=%d: dx differs", Ty<T>::name, rows, H, eo,
        source, with_dbias, inplace);
  if (with_dbias) {
    bool bok = true;
    for (uint64_t j = 0; j < H && bok; ++j) {
      float s = 0.0f;
      for (uint64_t c = 0; c < chunks; ++c) {
        float part = 0.0f;
        for (uint64_t rr = c * DROPFUSE_BDR_DBIAS_CHUNK; rr < std::min<uint64_t>(rows, (c + 1) * DROPFUSE_BDR_DBIAS_CHUNK);
             ++rr) {
          const uint64_t i = rr * H + j;
          part = part + (bit(m, i) ? d.scale * Ty<T>::to(dy0[i]) : 0.0f);
        }
        s = s + part;
      }
      const T want = Ty<T>::from(s);
      if (!same(dbias[j], want)) {
        printf("  backward %s rows=%lu H=%lu: dbias[%lu] got %#x want %#x\n", Ty<T>::name, rows, H, j,
               bits(dbias[j]), bits(want));
        bok = false;
      }
    }
    CHECK(bok, "backward %s rows=%lu H=%lu eo=%lu source=%d inplace=%d: dbias differs from the contract's order",
          Ty<T>::name, rows, H, eo, source, inplace);
  }
  if (!inplace) CHECK(std::equal(dy0.begin(), dy0.end(), dy.p, [](T a, T b) { return bits(a) == bits(b); }), "backward: dy modified");
  CHECK(dy.guards() && dxb.guards() && dbias.guards() && ws.guards() && mask.guards(),
        "backward %s rows=%lu H=%lu: a guard was written", Ty<T>::name, rows, H);
  if (with_dbias) {
    bool beyond = true;
    for (size_t i = chunks * H; i < ws.n; ++i) beyond = beyond && std::isnan(ws[i]);
    CHECK(beyond, "backward: the workspace was written beyond ceil(rows / 256) * H floats");
  }
}

// ================================ argument checks ================================

static void argument_checks() {
  float x[64] = {}, r[64] = {}, y[64] = {}, ws[64] = {};
  uint32_t mask[4] = {};
  alignas(16) uint64_t state[3] = {1, 2, 3};
  dropfuse_dropout_params p{};
  p.threshold = 1u << 31;
  p.scale = 2.0f;
  const uint64_t launches = emu::g.launches;
  const int calls = stub_calls;
  auto fwd = [&](uint64_t rows, uint64_t H, uint32_t *m, const dropfuse_dropout_params *pp) {
    return dropfuse_bias_dropout_residual_forward(DROPFUSE_F32, x, r, nullptr, y, m, rows, H, pp, nullptr);
  };
  auto bwd = [&](uint64_t rows, uint64_t H, const uint32_t *m, void *db, float *w, const dropfuse_dropout_params *pp) {
    return dropfuse_bias_dropout_residual_backward(DROPFUSE_F32, x, y, m, db, w, rows, H, pp, nullptr);
  };
  CHECK(fwd(2, 0, mask, &p) == cudaErrorInvalidValue, "forward: row_len 0");
  CHECK(fwd(1, (uint64_t{1} << 31) + 1, mask, &p) == cudaErrorInvalidValue, "forward: row_len > 2^31");
  CHECK(fwd(uint64_t{1} << 34, uint64_t{1} << 31, mask, &p) == cudaErrorInvalidValue, "forward: rows * H overflows");
  CHECK(fwd(2, 8, mask, nullptr) == cudaErrorInvalidValue, "forward: null params");
  CHECK(fwd(2, 8, reinterpret_cast<uint32_t *>(reinterpret_cast<char *>(mask) + 1), &p) == cudaErrorInvalidValue,
        "forward: misaligned mask");
  p.philox_dev = reinterpret_cast<const uint64_t *>(reinterpret_cast<const char *>(state) + 4);
  CHECK(fwd(2, 8, mask, &p) == cudaErrorInvalidValue, "forward: misaligned device state");
  CHECK(bwd(2, 8, nullptr, y, ws, &p) == cudaErrorInvalidValue, "backward: misaligned device state");
  CHECK(bwd(2, 8, nullptr, nullptr, nullptr, &p) == cudaErrorInvalidValue,
        "backward without dbias: misaligned device state");
  p.philox_dev = nullptr;
  CHECK(dropfuse_bias_dropout_residual_forward(DROPFUSE_F32, nullptr, r, nullptr, y, mask, 2, 8, &p, nullptr) ==
            cudaErrorInvalidValue,
        "forward: null x");
  CHECK(dropfuse_bias_dropout_residual_forward(static_cast<dropfuse_dtype>(3), x, r, nullptr, y, mask, 2, 8, &p,
                                               nullptr) == cudaErrorInvalidValue,
        "forward: bad dtype");
  CHECK(bwd(2, 8, nullptr, y, nullptr, &p) == cudaErrorInvalidValue, "backward: dbias without a workspace");
  CHECK(bwd(2, 8, nullptr, y, reinterpret_cast<float *>(reinterpret_cast<char *>(ws) + 2), &p) == cudaErrorInvalidValue,
        "backward: misaligned workspace");
  CHECK(bwd(2, 8, reinterpret_cast<const uint32_t *>(reinterpret_cast<const char *>(mask) + 2), y, ws, &p) ==
            cudaErrorInvalidValue,
        "backward: misaligned mask");
  CHECK(dropfuse_bias_dropout_residual_backward(static_cast<dropfuse_dtype>(9), x, y, nullptr, y, ws, 2, 8, &p,
                                                nullptr) == cudaErrorInvalidValue,
        "backward: bad dtype");
  CHECK(bwd(2, 0, nullptr, y, ws, &p) == cudaErrorInvalidValue, "backward: row_len 0");
  CHECK(emu::g.launches == launches && stub_calls == calls, "a rejected call launched a kernel");
  // rows == 0: a no-op, nothing validated beyond the shape.
  CHECK(fwd(0, 8, nullptr, &p) == 0, "forward: rows = 0");
  CHECK(dropfuse_bias_dropout_residual_backward(DROPFUSE_F32, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8, &p,
                                                nullptr) == 0,
        "backward: rows = 0");
  CHECK(emu::g.launches == launches && stub_calls == calls, "a no-op launched a kernel");
}

// ================================ driver ================================

template <typename T> static void random_forward() {
  constexpr uint64_t V = 16 / sizeof(T);
  uint64_t H;
  switch (rnd(4)) {
    case 0: H = V * (1 + rnd(40)); break;  // the vector bias
    case 1: H = 1 + rnd(7); break;
    case 2: H = 1 + rnd(300); break;
    default: H = 32 * (1 + rnd(8)); break;
  }
  // Mostly small; sometimes more chunks than the grid covers at once (12-32 waves of 1-4 blocks of
  // 512 chunks of V elements): the grid-stride loop and its bias column tracking wrap.
  const uint64_t target = coin(5) ? 400000 : 5000;
  const uint64_t rows = 1 + rnd(std::max<uint64_t>(2, target / H));
  forward_case<T>(rows, H);
}

template <typename T> static void random_backward() {
  constexpr uint64_t V = 16 / sizeof(T);
  const uint64_t H = coin(2) ? V * (1 + rnd(30)) : 1 + rnd(90);
  const uint64_t rows = coin(3) ? 1 + rnd(40) : 1 + rnd(std::max<uint64_t>(2, 30000 / H));
  backward_case<T>(rows, H, (int)rnd(3), !coin(5));
}

int main(int argc, char **argv) {
  const int scale = argc > 1 ? std::max(1, atoi(argv[1])) : 1;
  seed_rng(20250101);
  if (!philox_kat_ok()) {
    printf("the Philox model fails its known-answer test\nfailures: 1\n");
    return 1;
  }
  random_one_sm_device();
  argument_checks();
  for (int i = 0; i < 25 * scale; ++i) {
    random_forward<float>();
    random_forward<__half>();
    random_forward<__nv_bfloat16>();
  }
  for (int i = 0; i < 15 * scale; ++i) {
    random_backward<float>();
    random_backward<__half>();
    random_backward<__nv_bfloat16>();
  }
  // Wrapping grid-stride loops with bias columns that do not divide the step.
  forward_case<__half>(1000 + rnd(100), 227);
  forward_case<float>(600 + rnd(100), 333);
  forward_case<__nv_bfloat16>(30000, 8);
  // More than one 256-row chunk, columns beyond one block's threads, H not a multiple of V.
  backward_case<__half>(700, 300, 1, true);
  backward_case<float>(530, 7, 0, true);
  backward_case<__nv_bfloat16>(300, 1, 2, true);
  return report();
}
