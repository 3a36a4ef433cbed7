// Host emulation of kernels/multi_sample.cu and kernels/multi_sample_head.cu (built and run by
// tests/multi_sample_host_emulation.rs): the real launchers and kernels on the fiber-per-thread
// emulator (tests/host_emu/cuda_fiber_emu.h, 2-D launches through cuda_fiber_emu_2d.h) on an
// emulated device with few SMs (grid-stride loops wrap), compared with plain C++ models written
// from the contracts (kernels/dropfuse.h, src/reference/multi_sample.rs):
//   * copies: K masked copies and their masks bit for bit (every K in 1..=128, p = 0, 1, random,
//     extreme thresholds, stream offsets wrapping at 2^64 and crossing 2^32, n % 8 and n % 32
//     tails, misaligned views, graph-safe device state with add != 0), guards around every output;
//   * reduce: dh bit for bit against the documented f32 formula (stored and regenerated masks,
//     host and device state, every (grad, out) dtype pair, misaligned views, any scale);
//   * mean: bit for bit;
//   * weighted cross-entropy: the label scan (n_valid, first bad row) exactly; the loss and the
//     gradient within the documented bounds of an f64 model; ignored rows' gradient +0; all rows
//     ignored (loss 0, gradient 0); bad labels (nothing written, or zeros with
//     zero_grad_on_bad_label); loss only; grad_scale exact for powers of two; loss and gradient
//     bit-identical across grids and thread interleavings (the fixed-order combine);
//   * the head's bias broadcast and deterministic column sums bit for bit against their
//     documented order;
//   * the launchers' argument checks (nothing written on error).
#include "cuda_fiber_emu.h"
#include "cuda_fiber_emu_2d.h"
// clang-format off
#include "multi_sample.cu"
#include "multi_sample_head.cu"
// clang-format on
#include "contract_model.h"

using namespace model;

static int scale_arg = 1;

// ================================ copies ================================

template <typename T> static void copies_case(uint64_t n, uint64_t K, bool with_masks, bool dev) {
  const Drop d = random_drop();
  const uint64_t seed = rnd64();
  const uint64_t offset = random_offset(K);
  const uint64_t words = (n + 31) / 32;
  Buf<T> h(n, random_mis<T>()), copies(K * n, random_mis<T>());
  Buf<uint32_t> masks(with_masks ? K * words : 0, 0);
  for (uint64_t i = 0; i < n; ++i) h[i] = Ty<T>::from(value(4.0f, true));
  const std::vector<unsigned char> h_before = h.bytes();
  // Device state {seed, base offset}: sample k uses state[1] + params.offset + k.
  uint64_t state[2] = {seed, 0};
  dropfuse_multi_sample_params p{};
  p.k = K;
  p.threshold = d.threshold;
  p.scale = d.scale;
  uint64_t stream0 = offset;  // the stream of sample 0
  if (dev) {
    const uint64_t add = coin(3) ? 0 : rnd64();
    state[1] = offset - add;  // wrapping: state[1] + add == offset
    p.seed = ~seed;           // ignored with a device state
    p.offset = add;
    p.philox_dev = state;
  } else {
    p.seed = seed;
    p.offset = offset;
  }
  random_one_sm_device();
  const int st = dropfuse_multi_sample_copies(Ty<T>::code, h.p, copies.p, with_masks ? masks.p : nullptr, n, &p,
                                              nullptr);
  CHECK(st == 0, "copies: status %d", st);
  bool ok_copy = true, ok_mask = true;
  for (uint64_t k = 0; k < K && (ok_copy || ok_mask); ++k) {
    const std::vector<uint32_t> m = mask_of(seed, stream0 + k, 0, n, d.threshold);
    for (uint64_t e = 0; e < n; ++e) {
      const T want = bit(m, e) ? Ty<T>::from(Ty<T>::to(h[e]) * d.scale) : Ty<T>::from(0.0f);
      if (!same(copies[k * n + e], want)) {
        if (ok_copy)
          printf("  %s n=%lu K=%lu dev=%d: copy %lu element %lu: got %#x want %#x\n", Ty<T>::name, n, K, dev, k, e,
                 bits(copies[k * n + e]), bits(want));
        ok_copy = false;
        break;
      }
    }
    if (with_masks)
      for (uint64_t w = 0; w < words; ++w)
        if (masks[k * words + w] != m[w]) {
          if (ok_mask)
            printf("  %s n=%lu K=%lu: mask %lu word %lu: got %#x want %#x\n", Ty<T>::name, n, K, k, w,
                   masks[k * words + w], m[w]);
          ok_mask = false;
          break;
        }
  }
  CHECK(ok_copy, "copies %s n=%lu K=%lu thr=%lu dev=%d mis=%d/%d: copies differ from the contract", Ty<T>::name, n, K,
        d.threshold, dev, (int)((uintptr_t)h.p & 15), (int)((uintptr_t)copies.p & 15));
  CHECK(ok_mask, "copies %s n=%lu K=%lu thr=%lu dev=%d: masks differ from the contract", Ty<T>::name, n, K,
        d.threshold, dev);
  CHECK(h.guards() && copies.guards() && masks.guards(), "copies %s n=%lu K=%lu: a guard was written", Ty<T>::name,
        n, K);
  CHECK(h.bytes() == h_before, "copies: h was modified");
  CHECK(state[0] == seed && state[1] == (dev ? offset - p.offset : 0), "copies: the device state was modified");
}

// ================================ reduce ================================

template <typename G, typename O> static void reduce_case(uint64_t n, uint64_t K, int source) {
  // source: 0 stored masks, 1 regenerated from host params, 2 regenerated from a device state.
  const Drop d = random_drop();
  const float scale = coin(2) ? d.scale : static_cast<float>(unit() * 3);
  const uint64_t seed = rnd64(), offset = random_offset(K);
  const uint64_t words = (n + 31) / 32;
  Buf<G> grads(K * n, random_mis<G>());
  Buf<O> dh(n, random_mis<O>());
  Buf<uint32_t> masks(source == 0 ? K * words : 0, 0);
  for (uint64_t i = 0; i < K * n; ++i) grads[i] = Ty<G>::from(value(3.0f, true));
  std::vector<std::vector<uint32_t>> m(K);
  for (uint64_t k = 0; k < K; ++k) {
    m[k] = mask_of(seed, offset + k, 0, n, d.threshold);
    if (source == 0) {
      for (uint64_t w = 0; w < words; ++w) masks[k * words + w] = m[k][w];
      // The copies write the unused bits of the last word as 0; set them here: the reduce must
      // read only the bits of its n elements.
      if (n % 32 != 0) masks[k * words + words - 1] |= ~0u << (n % 32);
    }
  }
  uint64_t state[2] = {seed, 0};
  dropfuse_multi_sample_params p{};
  p.k = K;
  p.threshold = d.threshold;
  p.scale = scale;
  if (source == 2) {
    const uint64_t add = rnd64();
    state[1] = offset - add;
    p.seed = rnd64();
    p.offset = add;
    p.philox_dev = state;
  } else {
    p.seed = source == 1 ? seed : rnd64();  // stored masks: the stream is not used
    p.offset = source == 1 ? offset : rnd64();
  }
  random_one_sm_device();
  const int st = dropfuse_multi_sample_reduce(Ty<G>::code, grads.p, Ty<O>::code, dh.p,
                                              source == 0 ? masks.p : nullptr, n, &p, nullptr);
  CHECK(st == 0, "reduce: status %d", st);
  bool ok = true;
  for (uint64_t e = 0; e < n && ok; ++e) {
    float acc = 0.0f;
    for (uint64_t k = 0; k < K; ++k)
      if (bit(m[k], e)) acc = acc + Ty<G>::to(grads[k * n + e]) * scale;
    const O want = Ty<O>::from(acc);
    if (!same(dh[e], want)) {
      printf("  reduce %s->%s n=%lu K=%lu source=%d: element %lu got %#x want %#x\n", Ty<G>::name, Ty<O>::name, n,
             K, source, e, bits(dh[e]), bits(want));
      ok = false;
    }
  }
  CHECK(ok, "reduce %s->%s n=%lu K=%lu source=%d: dh differs from the contract", Ty<G>::name, Ty<O>::name, n, K,
        source);
  CHECK(grads.guards() && dh.guards() && masks.guards(), "reduce: a guard was written");
}

// ================================ mean ================================

template <typename T, typename O> static void mean_case(uint64_t n, uint64_t K) {
  Buf<T> z(K * n, random_mis<T>());
  Buf<O> mean(n, random_mis<O>());
  for (uint64_t i = 0; i < K * n; ++i) z[i] = Ty<T>::from(value(10.0f, true));
  random_one_sm_device();
  const int st = dropfuse_multi_sample_mean(Ty<T>::code, z.p, Ty<O>::code, mean.p, K, n, nullptr);
  CHECK(st == 0, "mean: status %d", st);
  const float inv_k = static_cast<float>(1.0 / static_cast<double>(K));
  bool ok = true;
  for (uint64_t e = 0; e < n && ok; ++e) {
    float acc = 0.0f;
    for (uint64_t k = 0; k < K; ++k) acc = acc + Ty<T>::to(z[k * n + e]);
    const O want = Ty<O>::from(acc * inv_k);
    if (!same(mean[e], want)) ok = false;
  }
  CHECK(ok, "mean %s->%s n=%lu K=%lu: differs from the contract", Ty<T>::name, Ty<O>::name, n, K);
  CHECK(z.guards() && mean.guards(), "mean: a guard was written");
}

// ================================ weighted cross-entropy ================================

struct CeModel {
  uint64_t n_valid = 0, bad = ~uint64_t{0};
  double loss = 0;
  std::vector<double> grad;  // K * B * C, without grad_scale
  std::vector<double> row_coef;  // per (k, i): |w_k| / n_valid (the gradient's scale)
};

template <typename T>
static CeModel ce_model(const Buf<T> &z, uint64_t K, uint64_t B, uint64_t C, const std::vector<double> &w,
                        const std::vector<int64_t> &labels, int64_t ignore, double eps) {
  CeModel m;
  for (uint64_t i = 0; i < B; ++i) {
    const int64_t y = labels[i];
    if (y == ignore) continue;
    if (y >= 0 && static_cast<uint64_t>(y) < C) {
      ++m.n_valid;
    } else if (m.bad == ~uint64_t{0}) {
      m.bad = i;
    }
  }
  m.grad.assign(K * B * C, 0.0);
  m.row_coef.assign(K * B, 0.0);
  if (m.bad != ~uint64_t{0} || m.n_valid == 0) return m;
  const double nv = static_cast<double>(m.n_valid);
  for (uint64_t k = 0; k < K; ++k) {
    double total = 0;
    for (uint64_t i = 0; i < B; ++i) {
      const int64_t y = labels[i];
      if (y == ignore) continue;
      const uint64_t base = (k * B + i) * C;
      double mx = -INFINITY, sum = 0;
      for (uint64_t c = 0; c < C; ++c) mx = std::max(mx, (double)Ty<T>::to(z[base + c]));
      double se = 0;
      for (uint64_t c = 0; c < C; ++c) {
        se += std::exp((double)Ty<T>::to(z[base + c]) - mx);
        sum += Ty<T>::to(z[base + c]);
      }
      const double lse = mx + std::log(se);
      total += (1 - eps) * (lse - Ty<T>::to(z[base + y])) + eps * (lse - sum / C);
      const double off = eps / C, on = 1 - eps * (C - 1) / C;
      double others = 0;  // 1 - p_y, as the sum of the other probabilities (no cancellation)
      for (uint64_t c = 0; c < C; ++c) {
        const double pc = std::exp((double)Ty<T>::to(z[base + c]) - lse);
        m.grad[base + c] = w[k] * (pc - (c == (uint64_t)y ? on : off)) / nv;
        if (c != (uint64_t)y) others += pc;
      }
      m.grad[base + y] = w[k] * ((1 - on) - others) / nv;
      m.row_coef[k * B + i] = w[k] / nv;
    }
    m.loss += w[k] * (total / nv);
  }
  return m;
}

template <typename T, typename G> struct CeRun {
  int status;
  float loss;
  std::vector<unsigned char> grad;
  uint64_t stats[2];
};

template <typename T, typename G>
static void ce_case(uint64_t K, uint64_t B, uint64_t C, int label_kind) {
  // label_kind: 0 normal (some ignored), 1 all ignored, 2 bad labels, 3 no ignored rows
  const bool with_grad = !coin(6);
  const bool zero_on_bad = coin(2);
  const double eps = coin(3) ? 0.0 : (coin(4) ? 1.0 : unit());
  const float grad_scale = coin(2) ? 1.0f : (coin(2) ? std::ldexp(1.0f, (int)rnd(20) - 5) : (float)(0.1 + unit() * 100));
  int64_t ignore;
  switch (rnd(4)) {
    case 0: ignore = -100; break;
    case 1: ignore = (int64_t)rnd(C); break;  // an ignore index inside [0, C)
    case 2: ignore = -(int64_t)rnd64() - 1; break;
    default: ignore = INT64_MAX - (int64_t)rnd(3); break;
  }
  std::vector<double> w(K);
  double ws = 0;
  for (auto &x : w) ws += (x = coin(5) ? 0.0 : unit() + 0.01);
  if (ws == 0) w[0] = ws = 1;
  for (auto &x : w) x /= ws;
  std::vector<int64_t> labels(B);
  const double p_ignore = label_kind == 3 ? 0.0 : unit() * 0.6;
  for (auto &y : labels) y = unit() < p_ignore || label_kind == 1 ? ignore : (int64_t)rnd(C);
  if (label_kind == 2) {
    const uint64_t nbad = 1 + rnd(3);
    for (uint64_t j = 0; j < nbad; ++j) {
      int64_t bad;
      switch (rnd(4)) {
        case 0: bad = (int64_t)C; break;
        case 1: bad = -1; break;
        case 2: bad = INT64_MIN; break;
        default: bad = (int64_t)C + (int64_t)rnd(1000); break;
      }
      if (bad != ignore) labels[rnd(B)] = bad;
    }
  }
  Buf<T> z(K * B * C, random_mis<T>());
  // -inf logits: scattered, or whole masked class ranges (chunks of 8 that are all -inf).
  const int neg_inf = coin(10) ? 1 : coin(10) ? 2 : 0;
  const uint64_t masked_from = rnd(C);
  for (uint64_t i = 0; i < K * B * C; ++i) {
    float v = static_cast<float>((unit() * 2 - 1) * 10);
    if ((neg_inf == 1 && coin(3)) || (neg_inf == 2 && i % C >= masked_from)) v = -INFINITY;
    z[i] = Ty<T>::from(v);
  }
  if (neg_inf) {
    // Keep each row's label logit finite (the contract's bounds need a finite lse).
    for (uint64_t r = 0; r < K * B; ++r) {
      const int64_t y = labels[r % B];
      const uint64_t c = y >= 0 && (uint64_t)y < C ? (uint64_t)y : 0;
      z[r * C + c] = Ty<T>::from(1.0f);
    }
  }
  Buf<int64_t> lab(B, 0);
  for (uint64_t i = 0; i < B; ++i) lab[i] = labels[i];
  const CeModel m = ce_model(z, K, B, C, w, labels, ignore, eps);
  dropfuse_weighted_ce_params params{};
  params.k = K, params.b = B, params.c = C;
  params.ignore_index = ignore;
  params.label_smoothing = static_cast<float>(eps);
  for (uint64_t k = 0; k < K; ++k) params.weights[k] = static_cast<float>(w[k]);
  // Unused weights hold garbage: the kernels must read only the first K.
  for (uint64_t k = K; k < DROPFUSE_WEIGHTED_CE_MAX_K; ++k) params.weights[k] = NAN;
  const size_t gmis = random_mis<G>();

  auto run = [&](float gs) {
    CeRun<T, G> r;
    Buf<G> grad(with_grad ? K * B * C : 0, gmis);
    Buf<float> loss(1, 0);
    loss[0] = -12345.0f;
    const uint64_t scratch_bytes = dropfuse_weighted_ce_scratch_bytes(K, B);
    Buf<uint64_t> scratch((scratch_bytes + 7) / 8, 0);
    random_one_sm_device();
    r.status = dropfuse_weighted_ce_scaled(Ty<T>::code, z.p, lab.p, loss.p, Ty<G>::code,
                                           with_grad ? grad.p : nullptr, scratch.p, &params, gs, zero_on_bad, nullptr);
    r.loss = loss[0];
    r.grad = grad.bytes();
    r.stats[0] = scratch[0];
    r.stats[1] = scratch[1];
    CHECK(grad.guards() && loss.guards() && scratch.guards() && lab.guards() && z.guards(),
          "ce: a guard was written (K=%lu B=%lu C=%lu)", K, B, C);
    return r;
  };
  const CeRun<T, G> r = run(grad_scale);
  CHECK(r.status == 0, "ce: status %d", r.status);
  const char *tn = Ty<T>::name, *gn = Ty<G>::name;
  CHECK(r.stats[0] == m.n_valid || m.bad != ~uint64_t{0}, "ce %s K=%lu B=%lu C=%lu: n_valid %lu, want %lu", tn, K, B, C,
        r.stats[0], m.n_valid);
  CHECK(r.stats[1] == m.bad, "ce %s K=%lu B=%lu C=%lu: first bad row %lu, want %lu", tn, K, B, C, r.stats[1], m.bad);
  const G *g = reinterpret_cast<const G *>(r.grad.data());
  if (m.bad != ~uint64_t{0}) {
    CHECK(fbits(r.loss) == fbits(-12345.0f), "ce: a bad label wrote the loss");
    if (with_grad) {
      bool ok = true;
      for (uint64_t i = 0; i < K * B * C; ++i)
        ok = ok && bits(g[i]) == (zero_on_bad ? 0u : 0xA5A5A5A5u >> (32 - 8 * sizeof(G)));
      CHECK(ok, "ce %s->%s: a bad label wrote the gradient (zero_on_bad=%d: want %s)", tn, gn, zero_on_bad,
            zero_on_bad ? "zeros" : "untouched");
    }
    return;
  }
  // The loss within the documented bound.
  const bool ref_finite = std::isfinite(m.loss);
  if (ref_finite) {
    const double tol = 1e-5 * std::max(1.0, std::fabs(m.loss));
    CHECK(std::fabs((double)r.loss - m.loss) <= tol, "ce %s K=%lu B=%lu C=%lu eps=%g: loss %.9g, want %.12g (tol %.3g)",
          tn, K, B, C, eps, r.loss, m.loss, tol);
  } else {
    CHECK(!std::isfinite(r.loss), "ce: loss %.9g, the model's is not finite (%g)", r.loss, m.loss);
  }
  if (m.n_valid == 0) CHECK(fbits(r.loss) == 0, "ce: all rows ignored: loss %.9g, want +0", r.loss);
  if (with_grad) {
    // Element bound: |g - S ref| <= 1e-5 S coef (f32), + 2^-8 |S ref| and the type's smallest
    // normal for f16 / bf16 (one rounding); ignored rows exactly +0.
    const bool narrow = sizeof(G) == 2;
    const double rel = std::is_same<G, __half>::value ? 1.0 / 2048 : 1.0 / 256;
    const double tiny = std::is_same<G, __half>::value ? 3.0e-8 : 1e-38;  // half f16's subnormal step
    double num = 0, den = 0;
    bool elem_ok = true, ignored_ok = true;
    for (uint64_t r2 = 0; r2 < K * B; ++r2) {
      const bool ignored = labels[r2 % B] == ignore || m.n_valid == 0;
      for (uint64_t c = 0; c < C; ++c) {
        const uint64_t i = r2 * C + c;
        const double got = Ty<G>::to(g[i]);
        if (ignored) {
          ignored_ok = ignored_ok && bits(g[i]) == 0;
          continue;
        }
        const double want = m.grad[i] * grad_scale;
        num += (got - want) * (got - want);
        den += want * want;
        const double tol = 1e-5 * m.row_coef[r2] * grad_scale + (narrow ? rel * std::fabs(want) + tiny : 0.0);
        if (!(std::fabs(got - want) <= tol)) {
          if (elem_ok)
            printf("  ce %s->%s K=%lu B=%lu C=%lu: grad[%lu] = %.9g, want %.9g (tol %.3g)\n", tn, gn, K, B, C, i, got,
                   want, tol);
          elem_ok = false;
        }
      }
    }
    CHECK(ignored_ok, "ce %s->%s: an ignored row's gradient is not +0", tn, gn);
    CHECK(elem_ok, "ce %s->%s K=%lu B=%lu C=%lu eps=%g scale=%g: a gradient element beyond its bound", tn, gn, K, B, C,
          eps, grad_scale);
    if (den > 0) {
      const double bound = narrow ? 1e-2 : 1e-5;
      CHECK(std::sqrt(num / den) < bound, "ce %s->%s: gradient relative error norm %.3g", tn, gn, std::sqrt(num / den));
    }
  }
  // Determinism: another grid and interleaving give the same bits.
  if (coin(2)) {
    const CeRun<T, G> again = run(grad_scale);
    CHECK(fbits(again.loss) == fbits(r.loss), "ce: the loss differs between runs (%.9g, %.9g)", r.loss, again.loss);
    CHECK(again.grad == r.grad, "ce: the gradient differs between runs");
  }
  // A power of two scales the f32 gradient exactly; the loss is not scaled.
  if (with_grad && std::is_same<G, float>::value && grad_scale != 1.0f && fbits(grad_scale) % (1u << 23) == 0) {
    const CeRun<T, G> one = run(1.0f);
    const float *a = reinterpret_cast<const float *>(one.grad.data());
    const float *b = reinterpret_cast<const float *>(r.grad.data());
    bool ok = true;
    for (uint64_t i = 0; i < K * B * C; ++i) {
      const float scaled = a[i] * grad_scale;
      if (std::fabs(a[i]) > 1e-30f && std::fabs(scaled) < 1e30f && fbits(scaled) != fbits(b[i])) ok = false;
    }
    CHECK(ok, "ce: a power-of-two grad_scale does not scale the gradient exactly");
    CHECK(fbits(one.loss) == fbits(r.loss), "ce: grad_scale changed the loss");
  }
}

// The loss and the gradient must not depend on where the gradient goes: loss only, an aligned
// gradient and a misaligned one give the same bits (one algorithm per C, whatever the alignment).
template <typename T, typename G> static void ce_alignment_case(uint64_t K, uint64_t B, uint64_t C) {
  dropfuse_weighted_ce_params params{};
  params.k = K, params.b = B, params.c = C;
  params.ignore_index = -100;
  params.label_smoothing = 0.1f;
  for (uint64_t k = 0; k < K; ++k) params.weights[k] = 1.0f / K;
  Buf<T> z(K * B * C, 0);
  for (uint64_t i = 0; i < K * B * C; ++i) z[i] = Ty<T>::from(static_cast<float>((unit() * 2 - 1) * 10));
  Buf<int64_t> lab(B, 0);
  for (uint64_t i = 0; i < B; ++i) lab[i] = coin(4) ? -100 : (int64_t)rnd(C);
  float losses[3];
  std::vector<std::vector<unsigned char>> grads;
  for (int v = 0; v < 3; ++v) {
    // 0: loss only, 1: aligned gradient, 2: gradient one element off a 16-byte boundary
    Buf<G> grad(v == 0 ? 0 : K * B * C, v == 2 ? 1 : 0);
    Buf<float> loss(1, 0);
    Buf<uint64_t> scratch((dropfuse_weighted_ce_scratch_bytes(K, B) + 7) / 8, 0);
    random_one_sm_device();
    const int st = dropfuse_weighted_ce(Ty<T>::code, z.p, lab.p, loss.p, Ty<G>::code, v == 0 ? nullptr : grad.p,
                                        scratch.p, &params, nullptr);
    CHECK(st == 0, "ce alignment: status %d", st);
    losses[v] = loss[0];
    if (v > 0) grads.push_back(grad.bytes());
  }
  CHECK(fbits(losses[0]) == fbits(losses[1]) && fbits(losses[1]) == fbits(losses[2]),
        "ce %s->%s C=%lu: the loss depends on the gradient buffer (loss only %.9g, aligned %.9g, misaligned %.9g)",
        Ty<T>::name, Ty<G>::name, C, losses[0], losses[1], losses[2]);
  CHECK(grads[0] == grads[1], "ce %s->%s C=%lu: the gradient depends on its alignment", Ty<T>::name, Ty<G>::name,
        C);
}

// Confidently classified rows (the label's logit `gap` above every other): the label's gradient
// p_y - t_on is a small difference of numbers near 1. Every f32 gradient element must be within
// 1e-5 of its own magnitude (eps = 0: no element is a cancellation), not only of the row's scale:
// p_y - 1 computed as exp(z_y - lse) - 1 loses its digits to the rounding of lse (|lse| ~ 10, an
// ulp of 1e-6) once 1 - p_y is below about 1e-4, which the kernel avoids by writing -sum of the
// other classes' probabilities instead.
template <typename T> static void ce_confident_case(uint64_t K, uint64_t B, uint64_t C, double gap) {
  dropfuse_weighted_ce_params params{};
  params.k = K, params.b = B, params.c = C;
  params.ignore_index = -100;
  params.label_smoothing = 0.0f;
  std::vector<double> w(K, 1.0 / K);
  for (uint64_t k = 0; k < K; ++k) params.weights[k] = static_cast<float>(w[k]);
  std::vector<int64_t> labels(B);
  for (auto &y : labels) y = (int64_t)rnd(C);
  Buf<T> z(K * B * C, random_mis<T>());
  for (uint64_t r = 0; r < K * B; ++r) {
    const uint64_t y = (uint64_t)labels[r % B];
    const float top = static_cast<float>(unit() * 8 + 2);  // lse in [2, 10] (its ulp up to 1e-6)
    for (uint64_t c = 0; c < C; ++c) {
      z[r * C + c] = Ty<T>::from(c == y ? top : static_cast<float>(top - gap - unit() * 4));
    }
  }
  Buf<int64_t> lab(B, 0);
  for (uint64_t i = 0; i < B; ++i) lab[i] = labels[i];
  const CeModel m = ce_model(z, K, B, C, w, labels, -100, 0.0);
  Buf<float> grad(K * B * C, random_mis<float>());
  Buf<float> loss(1, 0);
  Buf<uint64_t> scratch((dropfuse_weighted_ce_scratch_bytes(K, B) + 7) / 8, 0);
  random_one_sm_device();
  const int st = dropfuse_weighted_ce(Ty<T>::code, z.p, lab.p, loss.p, DROPFUSE_F32, grad.p, scratch.p, &params,
                                      nullptr);
  CHECK(st == 0, "ce confident: status %d", st);
  CHECK(grad.guards() && loss.guards() && scratch.guards(), "ce confident: a guard was written");
  double worst = 0, num = 0, den = 0;
  uint64_t worst_i = 0;
  for (uint64_t i = 0; i < K * B * C; ++i) {
    const double want = m.grad[i], got = grad[i];
    const double e = std::fabs(got - want) / std::max(std::fabs(want), 1e-30);
    num += (got - want) * (got - want);
    den += want * want;
    if (e > worst) worst = e, worst_i = i;
  }
  CHECK(worst <= 1e-5, "ce confident %s K=%lu B=%lu C=%lu gap=%.1f: grad[%lu] = %.9g, want %.9g (relative error %.3g)",
        Ty<T>::name, K, B, C, gap, worst_i, (double)grad[worst_i], m.grad[worst_i], worst);
  CHECK(den == 0 || std::sqrt(num / den) <= 1e-5, "ce confident %s C=%lu gap=%.1f: relative error norm %.3g",
        Ty<T>::name, C, gap, std::sqrt(num / den));
}

// ================================ head kernels ================================

template <typename T> static void bias_rows_case(uint64_t rows, uint64_t c) {
  Buf<T> bias(c, random_mis<T>());
  Buf<float> out(rows * c, 0);
  for (uint64_t j = 0; j < c; ++j) bias[j] = Ty<T>::from(value(5.0f, true));
  random_one_sm_device();
  const int st = dropfuse_multi_sample_bias_rows(Ty<T>::code, bias.p, out.p, rows, c, nullptr);
  CHECK(st == 0, "bias_rows: status %d", st);
  bool ok = true;
  for (uint64_t r = 0; r < rows && ok; ++r)
    for (uint64_t j = 0; j < c; ++j) ok = ok && same(out[r * c + j], Ty<T>::to(bias[j]));
  CHECK(ok, "bias_rows %s rows=%lu c=%lu: differs", Ty<T>::name, rows, c);
  CHECK(out.guards() && bias.guards(), "bias_rows: a guard was written");
}

template <typename T, typename O> static void colsum_case(uint64_t rows, uint64_t c) {
  Buf<T> x(rows * c, random_mis<T>());
  for (uint64_t i = 0; i < rows * c; ++i) x[i] = Ty<T>::from(value(2.0f, coin(4)));
  const float scale = coin(2) ? 1.0f : static_cast<float>(unit() * 4);
  const uint64_t floats = dropfuse_column_sums_scratch_floats(rows, c);
  const uint64_t chunks = (rows + DROPFUSE_COLSUM_CHUNK - 1) / DROPFUSE_COLSUM_CHUNK;
  CHECK(floats == chunks * c, "column sums: scratch size %lu", floats);
  Buf<float> scratch(floats, 0);
  Buf<O> out(c, random_mis<O>());
  random_one_sm_device();
  const int st = dropfuse_column_sums(Ty<T>::code, x.p, rows, c, scratch.p, Ty<O>::code, out.p, scale, nullptr);
  CHECK(st == 0, "column sums: status %d", st);
  bool ok = true;
  for (uint64_t j = 0; j < c && ok; ++j) {
    float s = 0.0f;
    for (uint64_t ch = 0; ch < chunks; ++ch) {
      const uint64_t r0 = ch * DROPFUSE_COLSUM_CHUNK, r1 = std::min<uint64_t>(rows, r0 + DROPFUSE_COLSUM_CHUNK);
      float lane[4];
      for (int l = 0; l < 4; ++l) {
        lane[l] = 0.0f;
        for (uint64_t r = r0 + l; r < r1; r += 4) lane[l] = lane[l] + Ty<T>::to(x[r * c + j]);
      }
      const float part = ((lane[0] + lane[1]) + lane[2]) + lane[3];
      s = s + part;
    }
    const O want = Ty<O>::from(s * scale);
    if (!same(out[j], want)) {
      printf("  colsum %s->%s rows=%lu c=%lu: column %lu got %#x want %#x\n", Ty<T>::name, Ty<O>::name, rows, c, j,
             bits(out[j]), bits(want));
      ok = false;
    }
  }
  CHECK(ok, "column sums %s->%s rows=%lu c=%lu: differ from the documented order", Ty<T>::name, Ty<O>::name, rows, c);
  CHECK(out.guards() && scratch.guards() && x.guards(), "column sums: a guard was written");
}

// ================================ argument checks ================================

static void argument_checks() {
  float h[64] = {}, copies[64 * 4] = {};
  uint32_t masks[16] = {};
  alignas(16) uint64_t state[3] = {1, 2, 3};
  dropfuse_multi_sample_params p{};
  p.k = 2;
  p.threshold = 1u << 31;
  p.scale = 2.0f;
  const uint64_t launches = emu::g.launches;
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, h, copies, masks, 64, nullptr, nullptr) == cudaErrorInvalidValue,
        "copies: null params");
  p.k = DROPFUSE_MULTI_SAMPLE_MAX_K + 1;
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, h, copies, masks, 64, &p, nullptr) == cudaErrorInvalidValue,
        "copies: K > max");
  p.k = 2;
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, h, copies, reinterpret_cast<uint32_t *>(
                                         reinterpret_cast<char *>(masks) + 2), 64, &p, nullptr) == cudaErrorInvalidValue,
        "copies: misaligned masks");
  p.philox_dev = reinterpret_cast<const uint64_t *>(reinterpret_cast<const char *>(state) + 4);
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, h, copies, masks, 64, &p, nullptr) == cudaErrorInvalidValue,
        "copies: misaligned device state");
  CHECK(dropfuse_multi_sample_reduce(DROPFUSE_F32, copies, DROPFUSE_F32, h, nullptr, 64, &p, nullptr) ==
            cudaErrorInvalidValue,
        "reduce: misaligned device state");
  p.philox_dev = nullptr;
  CHECK(dropfuse_multi_sample_copies(static_cast<dropfuse_dtype>(7), h, copies, masks, 64, &p, nullptr) ==
            cudaErrorInvalidValue,
        "copies: bad dtype");
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, nullptr, copies, masks, 64, &p, nullptr) == cudaErrorInvalidValue,
        "copies: null h");
  CHECK(dropfuse_multi_sample_reduce(DROPFUSE_F32, copies, static_cast<dropfuse_dtype>(5), h, nullptr, 64, &p,
                                     nullptr) == cudaErrorInvalidValue,
        "reduce: bad out dtype");
  CHECK(dropfuse_multi_sample_mean(DROPFUSE_F16, copies, DROPFUSE_BF16, h, 2, 32, nullptr) == cudaErrorInvalidValue,
        "mean: out dtype neither the input's nor f32");
  // n == 0 or k == 0: no-ops.
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, nullptr, nullptr, nullptr, 0, &p, nullptr) == 0, "copies: n = 0");
  p.k = 0;
  CHECK(dropfuse_multi_sample_copies(DROPFUSE_F32, nullptr, nullptr, nullptr, 64, &p, nullptr) == 0, "copies: k = 0");
  CHECK(dropfuse_multi_sample_mean(DROPFUSE_F32, nullptr, DROPFUSE_F32, nullptr, 0, 5, nullptr) == 0, "mean: k = 0");
  // Weighted cross-entropy.
  dropfuse_weighted_ce_params q{};
  q.k = 1, q.b = 2, q.c = 3, q.ignore_index = -100;
  q.weights[0] = 1.0f;
  alignas(16) int64_t labels[2] = {0, 1};
  alignas(16) uint64_t scratch[8] = {};
  float loss = 0, grad[6] = {};
  for (float gs : {0.0f, -1.0f, INFINITY, NAN})
    CHECK(dropfuse_weighted_ce_scaled(DROPFUSE_F32, h, labels, &loss, DROPFUSE_F32, grad, scratch, &q, gs, 0,
                                      nullptr) == cudaErrorInvalidValue,
          "ce: grad_scale %g accepted", gs);
  q.k = DROPFUSE_WEIGHTED_CE_MAX_K + 1;
  CHECK(dropfuse_weighted_ce(DROPFUSE_F32, h, labels, &loss, DROPFUSE_F32, grad, scratch, &q, nullptr) ==
            cudaErrorInvalidValue,
        "ce: K > max");
  q.k = 1;
  CHECK(dropfuse_weighted_ce(DROPFUSE_F32, h, labels, &loss, DROPFUSE_F32, grad,
                             reinterpret_cast<char *>(scratch) + 4, &q, nullptr) == cudaErrorInvalidValue,
        "ce: misaligned scratch");
  CHECK(dropfuse_weighted_ce(DROPFUSE_F32, h, reinterpret_cast<const int64_t *>(reinterpret_cast<char *>(labels) + 4),
                             &loss, DROPFUSE_F32, grad, scratch, &q, nullptr) == cudaErrorInvalidValue,
        "ce: misaligned labels");
  CHECK(dropfuse_weighted_ce(DROPFUSE_F16, h, labels, &loss, DROPFUSE_BF16, grad, scratch, &q, nullptr) ==
            cudaErrorInvalidValue,
        "ce: f16 logits with a bf16 gradient");
  CHECK(dropfuse_weighted_ce(DROPFUSE_F32, h, labels, &loss, DROPFUSE_F32, grad, scratch, nullptr, nullptr) ==
            cudaErrorInvalidValue,
        "ce: null params");
  CHECK(emu::g.launches == launches, "a rejected call launched a kernel");
  CHECK(dropfuse_multi_sample_bias_rows(DROPFUSE_F32, h, reinterpret_cast<float *>(reinterpret_cast<char *>(grad) + 2),
                                        2, 3, nullptr) == cudaErrorInvalidValue,
        "bias_rows: misaligned out");
  CHECK(dropfuse_column_sums(DROPFUSE_F32, h, 2, 3, reinterpret_cast<float *>(reinterpret_cast<char *>(grad) + 2),
                             DROPFUSE_F32, grad, 1.0f, nullptr) == cudaErrorInvalidValue,
        "column sums: misaligned scratch");
  CHECK(emu::g.launches == launches, "a rejected call launched a kernel");
}

// ================================ driver ================================

template <typename T> static void random_copies() {
  const uint64_t K = coin(6) ? 1 + rnd(128) : 1 + rnd(6);
  uint64_t n;
  switch (rnd(5)) {
    case 0: n = 1 + rnd(8); break;                 // below one chunk
    case 1: n = 8 * (1 + rnd(12)); break;          // whole chunks, n % 32 in {0, 8, 16, 24}
    case 2: n = 1 + rnd(300); break;
    default: n = 1 + rnd(K > 16 ? 200 : 3000); break;
  }
  copies_case<T>(n, K, !coin(4), coin(3));
}

template <typename G, typename O> static void random_reduce() {
  const uint64_t K = coin(6) ? 1 + rnd(128) : 1 + rnd(6);
  const uint64_t n = coin(3) ? 1 + rnd(40) : 1 + rnd(K > 16 ? 200 : 3000);
  reduce_case<G, O>(n, K, (int)rnd(3));
}

template <typename T> static void random_ce_t() {
  const uint64_t K = coin(8) ? 1 + rnd(128) : 1 + rnd(4);
  const uint64_t B = coin(8) ? 1 + rnd(K > 8 ? 300 : 1500) : 1 + rnd(40);
  uint64_t C = coin(2) ? 8 * (1 + rnd(40)) : 1 + rnd(200);
  while (K * B * C > 60000) C = 1 + C / 2;
  const int kind = coin(8) ? 1 : coin(6) ? 2 : coin(4) ? 3 : 0;
  switch (rnd(4)) {
    case 0: ce_case<T, float>(K, B, C, kind); break;
    case 1: ce_case<T, T>(K, B, C, kind); break;
    default:
      if (std::is_same<T, float>::value) {
        if (coin(2)) ce_case<T, __half>(K, B, C, kind);
        else ce_case<T, __nv_bfloat16>(K, B, C, kind);
      } else {
        ce_case<T, T>(K, B, C, kind);
      }
  }
}

template <typename T> static void random_head() {
  const uint64_t rows = coin(3) ? 1 + rnd(20) : 1 + rnd(1300);
  const uint64_t c = coin(3) ? 1 + rnd(8) : 1 + rnd(150);
  if (rows * c > 120000) return;
  bias_rows_case<T>(rows, c);
  switch (rnd(3)) {
    case 0: colsum_case<T, float>(rows, c); break;
    case 1: colsum_case<T, __half>(rows, c); break;
    default: colsum_case<T, __nv_bfloat16>(rows, c); break;
  }
}

int main(int argc, char **argv) {
  scale_arg = argc > 1 ? std::max(1, atoi(argv[1])) : 1;
  seed_rng(20250101);
  if (!philox_kat_ok()) {
    printf("the Philox model fails its known-answer test\nfailures: 1\n");
    return 1;
  }
  random_one_sm_device();
  argument_checks();
  for (int i = 0; i < 12 * scale_arg; ++i) {
    random_copies<float>();
    random_copies<__half>();
    random_copies<__nv_bfloat16>();
  }
  // Grids smaller than the work (8 waves of 1-4 blocks of 256 threads: 2048-8192 chunks): the
  // grid-stride loops wrap.
  copies_case<float>(70000 + rnd(9), 2, true, false);
  copies_case<__half>(3 * 8192 * 8 + 8 * rnd(100), 1, true, true);
  reduce_case<__nv_bfloat16, float>(70001, 2, 0);
  reduce_case<float, float>(65536 + 8 * rnd(100), 2, 1 + (int)rnd(2));
  mean_case<__half, float>(69999, 2);
  // Every K up to the maximum, small n (the per-sample parameters all used).
  for (uint64_t K : {31ul, 64ul, 127ul, 128ul}) copies_case<__half>(13 + rnd(40), K, true, coin(2));
  for (int i = 0; i < 8 * scale_arg; ++i) {
    random_reduce<float, float>();
    random_reduce<__half, float>();
    random_reduce<__nv_bfloat16, __nv_bfloat16>();
    random_reduce<float, __half>();
    random_reduce<__half, __nv_bfloat16>();
    random_reduce<float, __nv_bfloat16>();
  }
  reduce_case<float, float>(37, 128, 0);
  reduce_case<__half, __half>(200, 128, 2);
  for (int i = 0; i < 6 * scale_arg; ++i) {
    mean_case<float, float>(1 + rnd(600), 1 + rnd(8));
    mean_case<__half, __half>(1 + rnd(600), 1 + rnd(8));
    mean_case<__nv_bfloat16, float>(1 + rnd(600), 1 + rnd(8));
  }
  for (int i = 0; i < 10 * scale_arg; ++i) {
    random_ce_t<float>();
    random_ce_t<__half>();
    random_ce_t<__nv_bfloat16>();
  }
  // Rows beyond the 1024 label threads and the combine's threads; K = 128.
  ce_case<float, float>(1, 2500, 3, 0);
  ce_case<__half, float>(128, 9, 8, 0);
  ce_case<float, float>(3, 5, 1, 0);  // C = 1: loss and gradient 0
  ce_alignment_case<float, float>(2, 7, 64);
  // Confident rows, gaps from 4 to 20 (1 - p_y from 1e-2 down to 1e-9), chunked and not.
  for (double gap : {4.0, 9.0, 12.0, 16.0, 20.0}) {
    ce_confident_case<float>(2, 9, 2, gap);
    ce_confident_case<float>(1, 5, 64, gap);
    ce_confident_case<__half>(1, 4, 37, gap);
    ce_confident_case<__nv_bfloat16>(2, 3, 1000, gap);
  }
  ce_alignment_case<__half, __half>(3, 5, 200);
  ce_alignment_case<float, __nv_bfloat16>(1, 9, 16);
  ce_alignment_case<__nv_bfloat16, float>(2, 4, 37);  // C % 8 != 0: one path anyway
  for (int i = 0; i < 6 * scale_arg; ++i) {
    random_head<float>();
    random_head<__half>();
    random_head<__nv_bfloat16>();
  }
  colsum_case<float, float>(1100, 70);  // several chunks and column tiles
  return report();
}
