// Host emulation of kernels/mc_dropout.cu (built and run by tests/mc_dropout_host_emulation.rs): the
// real launchers and kernels on the fiber-per-thread emulator (tests/host_emu/cuda_fiber_emu.h:
// warp shuffles, ballots and barriers as rendezvous, threads and blocks in random orders) on
// emulated devices with 1-4 SMs, grids of 1, 2 or 32 waves and at most 3 blocks for the per-row
// summary kernels (DROPFUSE_MC_MAX_ROW_BLOCKS), so every grid-stride loop wraps.
//   * Replicas: random n (tails of every length, n * sizeof(T) a multiple of 16 or not), R, dtypes,
//     thresholds, scales, element offsets (multiples of 4 or not, across 2^34 and near 2^64),
//     misaligned views, with and without masks, host and device Philox states (replica t's stream
//     offset + t wrapping around 2^64), bit for bit against a plain model of the contract
//     (src/reference/mc_dropout.rs points 1-2; the Philox of contract_model.h), guards around y
//     and the masks.
//   * Summaries: random B x C (C <= 2048 in registers, larger through memory; B beyond the row
//     grid), sequences of checked and unchecked pushes of stacks, invalid values (NaN, infinities,
//     negatives; -0 accepted): after every push the state equals, bit for bit, a sequential f32
//     model of the documented order (Welford per value, per-thread ascending class sums, the
//     block's fixed shuffle-down tree) with the same logf, and the counters are exact (rejected
//     pushes leave every state bit unchanged); the finished summaries equal that model bit for bit
//     and lie within f32_tolerance (point 7) of an f64 model of the reference (points 4-6); no
//     accepted sample gives NaN. Guards around every state and output buffer.
//   * Invalid arguments: status 1, nothing launched, nothing written.
#include <stdint.h>
static int emu_waves = 32;  // waves of the occupancy-capped grids (common/launch.cuh)
#define DROPFUSE_WAVES emu_waves
#define DROPFUSE_MC_MAX_ROW_BLOCKS 3u
#include "cuda_fiber_emu.h"
// clang-format off
#include "mc_dropout.cu"
// clang-format on

#include <set>
#include <string>

#include "contract_model.h"

using namespace model;

static void random_device() {
  emu::g.sms = 1 + (int)rnd(4);
  emu::g.blocks_per_sm = 1 + (int)rnd(3);
  const int w[] = {1, 1, 2, 32};
  emu_waves = w[rnd(4)];
}

// ---- replicas ----

// A variant: -1 random, else forced (vec: every pointer 16-byte aligned and n * sizeof(T) a
// multiple of 16, or not; aligned: element offset a multiple of 4, or not).
struct Force {
  int vec = -1, masks = -1, aligned = -1, dev = -1;
};

template <typename T> static void replica_case(uint64_t n, uint64_t R, Force f = Force{}) {
  constexpr uint64_t V = 16 / sizeof(T);
  if (f.vec == 1) n = (n + V - 1) / V * V;
  if (f.vec == 0 && n % V == 0) n += 1;
  random_device();
  const uint64_t seed = rng();
  uint64_t offset = rnd(3) == 0 ? ~uint64_t(0) - rnd(2 * R) : rng();  // replica streams wrap around 2^64
  uint64_t eo;
  switch (rnd(6)) {
    case 0: eo = 0; break;
    case 1: eo = rnd(1000); break;
    case 2: eo = 4 * rnd(1 << 20); break;
    case 3: eo = ((1 + rnd(1 << 20)) << 34) - rnd(5000); break;
    case 4: eo = ~uint64_t(0) - n - rnd(5); break;
    default: eo = rng() >> rnd(64); break;
  }
  if (eo > ~uint64_t(0) - n) eo = ~uint64_t(0) - n;
  if (f.aligned == 1) eo &= ~uint64_t(3);
  if (f.aligned == 0 && eo % 4 == 0) eo = eo == 0 ? 1 : eo - 1;
  uint64_t thr;
  switch (rnd(6)) {
    case 0: thr = 0; break;
    case 1: thr = uint64_t(1) << 32; break;
    case 2: thr = 0xFFFFFFFFull; break;
    default: thr = rnd((uint64_t(1) << 32) + 1); break;
  }
  const float scale = rnd(3) == 0 ? 0.0f : (float)(rnd(4000) + 1) / 512.0f;
  const bool dev = f.dev >= 0 ? f.dev == 1 : rnd(2), with_masks = f.masks >= 0 ? f.masks == 1 : rnd(3) != 0;
  const uint64_t add = rnd(3) == 0 ? ~uint64_t(0) - rnd(3) : rng();
  const uint64_t W = (n + 31) / 32;
  const size_t xoff = f.vec == 1 || rnd(3) ? 0 : rnd(9), yoff = f.vec == 1 || rnd(3) ? xoff : rnd(9), moff = rnd(3);
  char what[400];
  snprintf(what, sizeof what,
           "%s n=%llu R=%llu eo=%#llx offset=%#llx thr=%#llx scale=%g dev=%d masks=%d xoff=%zu yoff=%zu moff=%zu "
           "sms=%d bps=%d waves=%d",
           Ty<T>::name, (unsigned long long)n, (unsigned long long)R, (unsigned long long)eo,
           (unsigned long long)offset, (unsigned long long)thr, scale, (int)dev, (int)with_masks, xoff, yoff, moff,
           emu::g.sms, emu::g.blocks_per_sm, emu_waves);

  std::vector<T> x(n);
  for (auto &v : x) v = random_value<T>();
  Buf<T> xb(n, xoff), yb(R * n, yoff);
  Buf<uint32_t> mb(R * W, moff);
  fill_poison(xb);
  memcpy(xb.p, x.data(), n * sizeof(T));
  fill_poison(yb);
  fill_poison(mb);
  uint64_t state[2] = {seed, offset - add};
  dropfuse_dropout_params p;
  memset(&p, 0, sizeof p);
  p.element_offset = eo;
  p.threshold = thr;
  p.scale = scale;
  if (dev) {
    p.seed = 0x5EED5EED5EED5EEDull;  // ignored with a device state
    p.offset = add;
    p.philox_dev = state;
  } else {
    p.seed = seed;
    p.offset = offset;
  }
  const int st = dropfuse_mc_dropout_forward(Ty<T>::code, xb.p, yb.p, with_masks ? mb.p : nullptr, n, R, &p, nullptr);
  CHECK(st == 0, "%s: status %d", what, st);
  bool y_ok = true, m_ok = true;
  for (uint64_t t = 0; t < R && (y_ok || m_ok); ++t) {
    std::vector<uint32_t> m(W, 0);
    for (uint64_t i = 0; i < n; ++i) {
      const bool k = kept(seed, offset + t, eo + i, thr);  // offset + t wraps
      m[i / 32] |= (uint32_t)k << (i % 32);
      const uint32_t want = model_value(x[i], k, scale);
      if (y_ok && bits(yb.p[t * n + i]) != want) {
        CHECK(false, "%s: replica %llu element %llu = %#x, want %#x", what, (unsigned long long)t,
              (unsigned long long)i, bits(yb.p[t * n + i]), want);
        y_ok = false;
      }
    }
    if (with_masks)
      for (uint64_t w = 0; w < W; ++w)
        if (m_ok && mb.p[t * W + w] != m[w]) {
          CHECK(false, "%s: replica %llu mask word %llu = %#x, want %#x", what, (unsigned long long)t,
                (unsigned long long)w, mb.p[t * W + w], m[w]);
          m_ok = false;
        }
  }
  CHECK(y_ok && m_ok, "%s: replicas or masks differ", what);
  CHECK(guards_ok(yb, bits(poison<T>())), "%s: wrote outside y", what);
  CHECK(guards_ok(mb, kPoisonWord) && (with_masks || mb.p[0] == kPoisonWord), "%s: wrote outside the masks", what);
  CHECK(guards_ok(xb, bits(poison<T>())) && memcmp(xb.p, x.data(), n * sizeof(T)) == 0, "%s: x changed", what);
}

// ---- summaries ----

static float xlogx32(float v) { return v > 0.0f ? v * logf(v) : 0.0f; }

// The kernels' block sum: thread t holds v[t] (256 threads); shuffle-down trees in each warp, then
// warp 0 over the 8 warp sums (lanes 8..31 adding +0).
static float block_tree(const float (&v)[256]) {
  float warp_sums[32] = {};
  for (int w = 0; w < 8; ++w) {
    float a[32];
    for (int l = 0; l < 32; ++l) a[l] = v[32 * w + l];
    for (int s = 16; s > 0; s >>= 1)
      for (int l = 0; l + s < 32; ++l) a[l] = a[l] + a[l + s];  // lane l reads lane l + s before it changes
    warp_sums[w] = a[0];
  }
  for (int s = 16; s > 0; s >>= 1)
    for (int l = 0; l + s < 32; ++l) warp_sums[l] = warp_sums[l] + warp_sums[l + s];
  return warp_sums[0];
}

// -sum x ln x of a row in the kernels' f32 order (thread t: classes t, t + 256, ... ascending).
static float row_entropy32(const float *row, uint64_t C) {
  float h[256];
  for (uint64_t t = 0; t < 256; ++t) {
    h[t] = 0.0f;
    for (uint64_t c = t; c < C; c += 256) h[t] = h[t] - xlogx32(row[c]);
  }
  return block_tree(h);
}

struct Model32 {
  uint64_t B, C, accepted = 0, rejected = 0, first_bad = 0;
  std::vector<float> mean, m2, e;
  Model32(uint64_t b, uint64_t c) : B(b), C(c), mean(b * c, 0.0f), m2(b * c, 0.0f), e(b, 0.0f) {}
  void push(const float *probs, uint64_t samples, bool check) {
    const uint64_t total = samples * B * C;
    if (check)
      for (uint64_t i = 0; i < total; ++i)
        if (!(probs[i] >= 0.0f && probs[i] <= FLT_MAX)) {
          ++rejected;
          if (first_bad == 0) first_bad = i + 1;
          return;
        }
    for (uint64_t t = 0; t < samples; ++t) {
      const float kf = (float)(accepted + t + 1);
      for (uint64_t b = 0; b < B; ++b) {
        const float *row = probs + (t * B + b) * C;
        for (uint64_t c = 0; c < C; ++c) {
          const float v = row[c];
          float &m = mean[b * C + c], &q = m2[b * C + c];
          const float d = v - m;
          m = m + d / kf;
          q = q + d * (v - m);
        }
        const float h = row_entropy32(row, C);
        e[b] = e[b] + (h - e[b]) / kf;
      }
    }
    accepted += samples;
  }
};

struct Model64 {
  uint64_t B, C, samples = 0;
  std::vector<double> mean, m2, e;
  Model64(uint64_t b, uint64_t c) : B(b), C(c), mean(b * c, 0.0), m2(b * c, 0.0), e(b, 0.0) {}
  static double entropy(const double *q, uint64_t C) {
    double h = 0.0;
    for (uint64_t c = 0; c < C; ++c)
      if (q[c] > 0.0) h -= q[c] * std::log(q[c]);
    return h;
  }
  void push(const float *probs) {  // one valid sample
    ++samples;
    const double k = (double)samples;
    for (uint64_t i = 0; i < B * C; ++i) {
      const double x = probs[i], d = x - mean[i];
      mean[i] += d / k;
      m2[i] += d * (x - mean[i]);
    }
    std::vector<double> row(C);
    for (uint64_t b = 0; b < B; ++b) {
      for (uint64_t c = 0; c < C; ++c) row[c] = probs[b * C + c];
      e[b] += (entropy(row.data(), C) - e[b]) / k;
    }
  }
};

// Probability rows: softmax of random logits (some peaked), some with exact zeros or -0, one-hot.
static void prob_rows(float *out, uint64_t rows, uint64_t C) {
  std::vector<float> l(C);
  for (uint64_t r = 0; r < rows; ++r) {
    float *row = out + r * C;
    const int kind = (int)rnd(6);
    if (kind == 5) {
      for (uint64_t c = 0; c < C; ++c) row[c] = 0.0f;
      row[rnd(C)] = 1.0f;
      continue;
    }
    const float temp = kind == 0 ? 0.05f : 2.0f;
    float mx = -1e30f;
    for (auto &v : l) v = (float)((rng() >> 40) * (1.0 / 16777216.0)) * 8.0f / temp, mx = std::max(mx, v);
    float sum = 0.0f;
    for (uint64_t c = 0; c < C; ++c) sum += (l[c] = std::exp(l[c] - mx));
    for (uint64_t c = 0; c < C; ++c) {
      row[c] = l[c] / sum;
      if (kind == 3 && c % 3 == 1) row[c] = 0.0f;
      if (kind == 4 && c % 5 == 2) row[c] = -0.0f;
    }
  }
}

struct Ctl {  // the control words with guards
  std::vector<unsigned long long> raw = std::vector<unsigned long long>(DROPFUSE_MC_CTL_WORDS + 8, 0xDEADull);
  Ctl() {
    for (int i = 0; i < DROPFUSE_MC_CTL_WORDS; ++i) raw[4 + i] = 0;
  }
  unsigned long long *p() { return raw.data() + 4; }
  bool guards() const {
    for (int i = 0; i < 4; ++i)
      if (raw[i] != 0xDEADull || raw[4 + DROPFUSE_MC_CTL_WORDS + i] != 0xDEADull) return false;
    return true;
  }
};

static bool same_bits(const float *a, const std::vector<float> &b) {
  for (size_t i = 0; i < b.size(); ++i)
    if (bits(a[i]) != bits(b[i])) return false;
  return true;
}

static void zero_inside(Buf<float> &b) {
  fill_poison(b);
  for (size_t i = 0; i < b.n; ++i) b.p[i] = 0.0f;
}

static double worst_ratio[5];  // largest error / tolerance seen, per summary

static void summary_case(uint64_t B, uint64_t C, int pushes) {
  char what[200];
  snprintf(what, sizeof what, "summaries B=%llu C=%llu", (unsigned long long)B, (unsigned long long)C);
  Buf<float> mean(B * C, rnd(3)), m2(B * C, rnd(3)), ent(B, rnd(3));
  zero_inside(mean);
  zero_inside(m2);
  zero_inside(ent);
  Ctl ctl;
  dropfuse_mc_state st{mean.p, m2.p, ent.p, ctl.p(), B, C};
  Model32 m32(B, C);
  Model64 m64(B, C);
  const uint32_t pf = bits(poison<float>());
  for (int k = 0; k < pushes; ++k) {
    random_device();
    const uint64_t samples = 1 + rnd(rnd(4) == 0 ? 5 : 2);
    const bool check = rnd(4) != 0;
    std::vector<float> probs(samples * B * C);
    prob_rows(probs.data(), samples * B, C);
    if (check && rnd(3) == 0) {  // invalid values: the push is rejected
      const float bad[] = {NAN, INFINITY, -INFINITY, -1e-30f, -1.0f, -NAN};
      const int count = 1 + (int)rnd(3);
      for (int i = 0; i < count; ++i) probs[rnd(probs.size())] = bad[rnd(6)];
    }
    Buf<float> pb(probs.size(), rnd(2));
    fill_poison(pb);
    memcpy(pb.p, probs.data(), probs.size() * 4);
    const int status = dropfuse_mc_summary_push(pb.p, samples, check ? 1 : 0, &st, nullptr);
    CHECK(status == 0, "%s: push status %d", what, status);
    const uint64_t before = m32.accepted;
    m32.push(probs.data(), samples, check);
    if (m32.accepted != before)
      for (uint64_t t = 0; t < samples; ++t) m64.push(probs.data() + t * B * C);
    CHECK(ctl.p()[0] == m32.accepted && ctl.p()[1] == m32.rejected && ctl.p()[2] == m32.first_bad &&
              ctl.p()[3] == 0 && ctl.p()[4] == 0 && ctl.guards(),
          "%s push %d (samples %llu, check %d): ctl %llu %llu %llu %llu %llu, want %llu %llu %llu 0 0", what, k,
          (unsigned long long)samples, (int)check, ctl.p()[0], ctl.p()[1], ctl.p()[2], ctl.p()[3], ctl.p()[4],
          (unsigned long long)m32.accepted, (unsigned long long)m32.rejected, (unsigned long long)m32.first_bad);
    CHECK(same_bits(mean.p, m32.mean) && same_bits(m2.p, m32.m2) && same_bits(ent.p, m32.e),
          "%s push %d: state differs from the f32 model of the documented order", what, k);
    CHECK(guards_ok(mean, pf) && guards_ok(m2, pf) && guards_ok(ent, pf), "%s: push wrote outside the state", what);
    CHECK(guards_ok(pb, pf) && memcmp(pb.p, probs.data(), probs.size() * 4) == 0, "%s: push changed probs", what);
  }
  // finish
  random_device();
  Buf<float> var(B * C, rnd(3)), pred(B, rnd(3)), mi(B, rnd(3));
  fill_poison(var);
  fill_poison(pred);
  fill_poison(mi);
  const int status = dropfuse_mc_summary_finish(&st, var.p, pred.p, mi.p, nullptr);
  CHECK(status == 0, "%s: finish status %d", what, status);
  CHECK(guards_ok(var, pf) && guards_ok(pred, pf) && guards_ok(mi, pf), "%s: finish wrote outside", what);
  if (m32.accepted == 0) {
    bool nan = true;
    for (uint64_t i = 0; i < B * C; ++i) nan = nan && std::isnan(var.p[i]);
    for (uint64_t b = 0; b < B; ++b) nan = nan && std::isnan(pred.p[b]) && std::isnan(mi.p[b]);
    CHECK(nan, "%s: no accepted sample, outputs not NaN", what);
    return;
  }
  const float tf = (float)m32.accepted;
  bool exact = true;
  for (uint64_t i = 0; i < B * C; ++i) exact = exact && bits(var.p[i]) == bits(m32.m2[i] / tf);
  for (uint64_t b = 0; b < B; ++b) {
    const float h = row_entropy32(m32.mean.data() + b * C, C), d = h - m32.e[b];
    exact = exact && bits(pred.p[b]) == bits(h) && bits(mi.p[b]) == bits(d > 0.0f ? d : 0.0f);
  }
  CHECK(exact, "%s: finished summaries differ from the f32 model", what);
  // Within the documented tolerance of the f64 reference (contract point 7).
  const double u = 1.0 / 16777216.0, T = (double)m64.samples, Cd = (double)C, L = std::log(Cd) + 1.0;
  const double tm = (2 * T + 4) * u, tv = (4 * T + 8) * u, tp = (8 * T + Cd + 8) * u * L, te = (T + Cd + 8) * u * L;
  double worst[5] = {0, 0, 0, 0, 0};
  for (uint64_t i = 0; i < B * C; ++i) {
    worst[0] = std::max(worst[0], std::fabs(mean.p[i] - m64.mean[i]) / tm);
    worst[1] = std::max(worst[1], std::fabs(var.p[i] - m64.m2[i] / T) / tv);
  }
  for (uint64_t b = 0; b < B; ++b) {
    const double hp = Model64::entropy(m64.mean.data() + b * C, C);
    worst[2] = std::max(worst[2], std::fabs(pred.p[b] - hp) / tp);
    worst[3] = std::max(worst[3], std::fabs(ent.p[b] - m64.e[b]) / te);
    worst[4] = std::max(worst[4], std::fabs(mi.p[b] - std::max(0.0, hp - m64.e[b])) / (tp + te));
  }
  const char *names[] = {"mean", "variance", "predictive entropy", "expected entropy", "mutual information"};
  for (int i = 0; i < 5; ++i) worst_ratio[i] = std::max(worst_ratio[i], worst[i]);
  for (int i = 0; i < 5; ++i)
    CHECK(worst[i] <= 1.0, "%s T=%llu: %s error %.3g x the tolerance", what, (unsigned long long)m64.samples, names[i],
          worst[i]);
}

// ---- invalid arguments ----

static void invalid_arguments() {
  const uint64_t launches = emu::g.launches;
  Buf<float> x(64, 0), y(128, 0), probs(12, 0), mean(6, 0), m2(6, 0), ent(2, 0), out(8, 0);
  Buf<uint32_t> masks(4, 0);
  for (Buf<float> *b : {&x, &y, &probs, &mean, &m2, &ent, &out}) fill_poison(*b);
  fill_poison(masks);
  dropfuse_dropout_params p;
  memset(&p, 0, sizeof p);
  p.threshold = 1u << 31;
  p.scale = 2.0f;
  CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, nullptr, y.p, masks.p, 64, 2, &p, nullptr) == 1, "null x");
  CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, x.p, nullptr, masks.p, 64, 2, &p, nullptr) == 1, "null y");
  CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, x.p, y.p, masks.p, 64, 2, nullptr, nullptr) == 1, "null params");
  CHECK(dropfuse_mc_dropout_forward((dropfuse_dtype)5, x.p, y.p, masks.p, 64, 2, &p, nullptr) == 1, "bad dtype");
  uint32_t *odd = reinterpret_cast<uint32_t *>(reinterpret_cast<char *>(masks.p) + 1);
  CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, x.p, y.p, odd, 64, 2, &p, nullptr) == 1, "misaligned masks");
  uint64_t state[3] = {1, 2, 3};
  for (int mis : {1, 4, 7}) {
    dropfuse_dropout_params q = p;
    q.philox_dev = reinterpret_cast<const uint64_t *>(reinterpret_cast<char *>(state) + mis);
    CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, x.p, y.p, masks.p, 64, 2, &q, nullptr) == 1, "misaligned state");
  }
  CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, nullptr, nullptr, nullptr, 0, 2, nullptr, nullptr) == 0, "n = 0");
  CHECK(dropfuse_mc_dropout_forward(DROPFUSE_F32, nullptr, nullptr, nullptr, 64, 0, nullptr, nullptr) == 0, "R = 0");
  Ctl ctl;
  dropfuse_mc_state st{mean.p, m2.p, ent.p, ctl.p(), 2, 3};
  auto bad_state = [&](const char *what, auto edit) {
    dropfuse_mc_state s = st;
    edit(s);
    CHECK(dropfuse_mc_summary_push(probs.p, 2, 1, &s, nullptr) == 1, "push, state %s", what);
    CHECK(dropfuse_mc_summary_finish(&s, out.p, out.p + 6, out.p + 7, nullptr) == 1, "finish, state %s", what);
  };
  bad_state("mean null", [](dropfuse_mc_state &s) { s.mean = nullptr; });
  bad_state("m2 null", [](dropfuse_mc_state &s) { s.m2 = nullptr; });
  bad_state("entropy null", [](dropfuse_mc_state &s) { s.expected_entropy = nullptr; });
  bad_state("ctl null", [](dropfuse_mc_state &s) { s.ctl = nullptr; });
  for (int mis : {1, 4, 7}) {  // 64-bit atomics on ctl: 8-byte alignment
    dropfuse_mc_state s = st;
    s.ctl = reinterpret_cast<unsigned long long *>(reinterpret_cast<char *>(st.ctl) + mis);
    CHECK(dropfuse_mc_summary_push(probs.p, 2, 1, &s, nullptr) == 1, "push, ctl misaligned by %d", mis);
    CHECK(dropfuse_mc_summary_finish(&s, out.p, out.p + 6, out.p + 7, nullptr) == 1, "finish, ctl misaligned by %d",
          mis);
  }
  bad_state("batch 0", [](dropfuse_mc_state &s) { s.batch = 0; });
  bad_state("classes 0", [](dropfuse_mc_state &s) { s.classes = 0; });
  bad_state("B * C overflow", [](dropfuse_mc_state &s) { s.batch = uint64_t(1) << 40, s.classes = uint64_t(1) << 30; });
  CHECK(dropfuse_mc_summary_push(nullptr, 2, 1, &st, nullptr) == 1, "push, null probs");
  CHECK(dropfuse_mc_summary_push(probs.p, 2, 1, nullptr, nullptr) == 1, "push, null state");
  CHECK(dropfuse_mc_summary_push(probs.p, ~uint64_t(0) / 5, 1, &st, nullptr) == 1, "push, samples * B * C overflow");
  CHECK(dropfuse_mc_summary_push(nullptr, 0, 1, nullptr, nullptr) == 0, "push, samples 0");
  CHECK(dropfuse_mc_summary_finish(&st, nullptr, out.p, out.p, nullptr) == 1, "finish, null variance");
  CHECK(dropfuse_mc_summary_finish(&st, out.p, nullptr, out.p, nullptr) == 1, "finish, null predictive");
  CHECK(dropfuse_mc_summary_finish(&st, out.p, out.p, nullptr, nullptr) == 1, "finish, null mutual information");
  CHECK(emu::g.launches == launches, "an invalid call launched work");
  const uint32_t pf = bits(poison<float>());
  bool untouched = guards_ok(y, pf) && guards_ok(out, pf) && guards_ok(mean, pf) && guards_ok(masks, kPoisonWord);
  for (size_t i = 0; i < y.n; ++i) untouched = untouched && bits(y.p[i]) == pf;
  for (size_t i = 0; i < out.n; ++i) untouched = untouched && bits(out.p[i]) == pf;
  for (size_t i = 0; i < mean.n; ++i) untouched = untouched && bits(mean.p[i]) == pf;
  for (size_t i = 0; i < masks.n; ++i) untouched = untouched && masks.p[i] == kPoisonWord;
  for (int i = 0; i < DROPFUSE_MC_CTL_WORDS; ++i) untouched = untouched && ctl.p()[i] == 0;
  CHECK(untouched, "an invalid call wrote something");
}

// ---- coverage ----

static std::vector<std::pair<const void *, std::string>> expected;
template <typename T, bool VEC, bool kMask, bool kAligned, bool kDev> static void expect1() {
  char label[100];
  snprintf(label, sizeof label, "%s replicas vec=%d masks=%d aligned=%d dev=%d", Ty<T>::name, VEC, kMask, kAligned,
           kDev);
  expected.push_back({reinterpret_cast<const void *>(&replicas_kernel<T, VEC, kMask, kAligned, kDev>), label});
}
template <typename T> static void expect_kernels() {
  expect1<T, false, false, false, false>(), expect1<T, false, false, false, true>();
  expect1<T, false, false, true, false>(), expect1<T, false, false, true, true>();
  expect1<T, false, true, false, false>(), expect1<T, false, true, false, true>();
  expect1<T, false, true, true, false>(), expect1<T, false, true, true, true>();
  expect1<T, true, false, false, false>(), expect1<T, true, false, false, true>();
  expect1<T, true, false, true, false>(), expect1<T, true, false, true, true>();
  expect1<T, true, true, false, false>(), expect1<T, true, true, false, true>();
  expect1<T, true, true, true, false>(), expect1<T, true, true, true, true>();
}

template <typename T> static void random_replicas(uint64_t max_n) {
  uint64_t n;
  switch (rnd(5)) {
    case 0: n = 1 + rnd(100); break;
    case 1: n = 32 * (1 + rnd(40)); break;            // whole words, no tail
    case 2: n = 8 * (1 + rnd(max_n / 8)); break;      // vectors (f16/bf16)
    default: n = 1 + rnd(max_n); break;
  }
  replica_case<T>(n, 1 + rnd(6));
}

int main(int argc, char **argv) {
  seed_rng(20251128);
  const int scale = argc > 1 ? atoi(argv[1]) : 1;
  if (argc > 2) rng.seed(strtoull(argv[2], nullptr, 0)), emu::g.rng.seed(strtoull(argv[2], nullptr, 0));  // explore
  CHECK(philox_kat_ok(), "the model's Philox differs from Random123's known answers");
  expect_kernels<float>();
  expect_kernels<__half>();
  expect_kernels<__nv_bfloat16>();
  expected.push_back({reinterpret_cast<const void *>(&validate_kernel), "validate"});
  expected.push_back({reinterpret_cast<const void *>(&push_kernel<true>), "push (registers)"});
  expected.push_back({reinterpret_cast<const void *>(&push_kernel<false>), "push (memory)"});
  expected.push_back({reinterpret_cast<const void *>(&finish_kernel), "finish"});
  invalid_arguments();
  // Every kernel variant, forced, with random sizes and the rest random.
  for (int v = 0; v < 2; ++v)
    for (int m = 0; m < 2; ++m)
      for (int a = 0; a < 2; ++a)
        for (int d = 0; d < 2; ++d) {
          const Force f{v, m, a, d};
          replica_case<float>(1 + rnd(3000), 1 + rnd(4), f);
          replica_case<__half>(1 + rnd(3000), 1 + rnd(4), f);
          replica_case<__nv_bfloat16>(1 + rnd(3000), 1 + rnd(4), f);
        }
  for (uint64_t n : {1, 7, 31, 32, 33, 63, 64, 65, 96, 100, 1024, 1031})
    for (uint64_t R : {1, 3}) {
      replica_case<float>(n, R);
      replica_case<__half>(n, R);
      replica_case<__nv_bfloat16>(n, R);
    }
  for (int i = 0; i < 80 * scale; ++i) {
    random_replicas<float>(6000);
    random_replicas<__half>(6000);
    random_replicas<__nv_bfloat16>(6000);
  }
  for (int i = 0; i < 2 * scale; ++i) {  // large, small grids: the chunk loop wraps many times
    replica_case<float>(60000 + rnd(100), 2);
    replica_case<__half>(120000 + rnd(100), 2);
  }
  for (uint64_t C : {1, 2, 10, 255, 256, 257, 1000, 2047, 2048, 2049, 3001})
    summary_case(1 + rnd(C > 1000 ? 4 : 9), C, 6 + (int)rnd(4));
  for (int i = 0; i < 12 * scale; ++i) summary_case(1 + rnd(12), 1 + rnd(rnd(4) == 0 ? 5000 : 300), 3 + (int)rnd(8));
  // Bounded extra cases until every replica instantiation has run.
  auto missing = [] {
    std::vector<std::string> m;
    for (auto &k : expected)
      if (emu::g.launched[k.first] == 0) m.push_back(k.second);
    return m;
  };
  int extra = 0;
  for (; extra < 300 && !missing().empty(); ++extra) {
    random_replicas<float>(600);
    random_replicas<__half>(600);
    random_replicas<__nv_bfloat16>(600);
  }
  for (const std::string &k : missing()) CHECK(false, "kernel never launched: %s", k.c_str());
  uint64_t fewest = ~uint64_t(0);
  for (auto &k : expected) fewest = std::min<uint64_t>(fewest, emu::g.launched[k.first]);
  printf("kernel instantiations: %zu, each launched at least %llu times (%d extra rounds for coverage)\n",
         expected.size(), (unsigned long long)fewest, extra);
  printf("largest error / tolerance: mean %.3f, variance %.3f, predictive entropy %.3f, expected entropy %.3f, "
         "mutual information %.3f\n",
         worst_ratio[0], worst_ratio[1], worst_ratio[2], worst_ratio[3], worst_ratio[4]);
  return report();
}
