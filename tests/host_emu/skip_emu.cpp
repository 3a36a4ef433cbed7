// Host emulation of kernels/skip.cu (built and run by tests/skip_host_emulation.rs): the real
// launchers and kernels, every CUDA thread a fiber (tests/host_emu/cuda_fiber_emu.h: barriers and
// warp shuffles as rendezvous, threads in a random order between them), on an emulated device with
// few SMs and a grid of at most one wave (DROPFUSE_WAVES 1), so that every grid-stride loop wraps.
// Compared bit for bit with plain loops written from the contract (src/reference/skip.rs points
// 1-6): the slot scan of dropfuse_compact_slots (one block of 1024 threads, warp-shuffle scans,
// batches of up to a few 10^4 samples, tile boundaries), the stochastic-depth forward (every keep
// mode, bias periods, in place) and backward (with the chunked bias gradient through the
// workspace), and every compaction operation with capacities above, at and below the count; f32 /
// f16 / bf16, misaligned views (scalar paths) and row lengths that are no whole vectors. Guard
// elements around every output, poisoned outputs and workspace, and page-protected rows that the
// contract says are never read or written (dropped samples' branch / d_out, rows of samples whose
// slot is beyond the capacity): touching one ends the program with an error.
#define DROPFUSE_WAVES 1
#include "cuda_fiber_emu.h"
// clang-format off
#include "skip.cu"
// clang-format on

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include "emu_common.h"

using namespace model;

namespace t {

constexpr uint32_t kNone = 0xffffffffu;

// Moved values: bit copies.
template <typename T> bool copy_of(T a, T b) { return bits(a) == bits(b); }

// Special values in about one element of 10 (infinities, NaN, -0, values that overflow when
// scaled); none when `finite` (sums of many terms, whose order matters only while finite).
template <typename T> T val(bool finite = false) {
  if (finite) return Ty<T>::from((float)((unit() * 16 - 8) * std::ldexp(1.0, (int)rnd(20) - 10)));
  switch (rnd(50)) {
    case 0: return Ty<T>::from(INFINITY);
    case 1: return Ty<T>::from(-INFINITY);
    case 2: return Ty<T>::from(NAN);
    case 3: return Ty<T>::from(-0.0f);
    case 4: return Ty<T>::from(sizeof(T) == 2 ? 65000.0f : 3e38f);  // overflows when scaled
    default: return Ty<T>::from((float)(unit() * 16 - 8));
  }
}
template <typename T> void fill_vals(T *p, size_t n, bool finite = false) {
  for (size_t i = 0; i < n; ++i) p[i] = val<T>(finite);
}

size_t offs() { return rnd(3) == 0 ? 1 + rnd(7) : 0; }

// The emulated device: blocks per SM vary per case (the SM count is cached by the launchers).
void random_device() { emu::g.blocks_per_sm = 1 + (int)rnd(rnd(4) == 0 ? 16 : 4); }

// ---- protected rows: a row the contract says is never read or written --------------------------

void on_segv(int) {
  static const char msg[] =
      "EMULATION ERROR: a kernel touched a protected row (never read or written by the contract)\n";
  ssize_t r = write(1, msg, sizeof msg - 1);
  (void)r;
  _exit(3);
}

// `rows` rows of exactly one page each (page aligned, so 16-byte aligned).
struct Pages {
  size_t page, rows;
  unsigned char *base;
  Pages(size_t rows_) : page((size_t)sysconf(_SC_PAGESIZE)), rows(rows_) {
    base = static_cast<unsigned char *>(
        mmap(nullptr, page * (rows + 2), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) emu::fatal("mmap");
    base += page;  // a protected page before and after
    mprotect(base - page, page, PROT_NONE);
    mprotect(base + rows * page, page, PROT_NONE);
  }
  ~Pages() { munmap(base - page, page * (rows + 2)); }
  template <typename T> T *row(size_t r) { return reinterpret_cast<T *>(base + r * page); }
  void protect(size_t r) { mprotect(base + r * page, page, PROT_NONE); }
};

// ---- the contract -------------------------------------------------------------------------------

struct KeepArg {
  int mode;  // 0 per sample (stride 1), 1 strided flags (stride 3), 2 batch flag on the device, 3 host
  std::vector<uint8_t> flags;
  int all;
  dropfuse_sample_keep k;
  bool kept(uint64_t b) const {
    switch (mode) {
      case 0: return flags[b] != 0;
      case 1: return flags[3 * b] != 0;
      case 2: return flags[0] != 0;
      default: return all != 0;
    }
  }
};

KeepArg make_keep(uint64_t B) {
  KeepArg a;
  a.mode = (int)rnd(4);
  const double density = rnd(5) == 0 ? (double)rnd(2) : unit();
  a.flags.resize(a.mode == 1 ? 3 * B : B);
  for (auto &f : a.flags) f = unit() < density ? (uint8_t)(1 + rnd(255)) : 0;
  a.all = (int)rnd(2) * (int)(1 + rnd(5));
  a.k.flags = a.mode == 3 ? nullptr : a.flags.data();
  a.k.stride = a.mode == 0 ? 1 : a.mode == 1 ? 3 : 0;
  a.k.all = a.mode == 3 ? a.all : 0;
  return a;
}

float random_scale() {
  switch (rnd(5)) {
    case 0: return 0.0f;
    case 1: return 1.0f;
    case 2: return (float)(1.0 / (1.0 - 0.1 * (double)(1 + rnd(9))));
    default: return (float)(unit() * 4);
  }
}

uint64_t random_row_len(uint64_t V) {
  switch (rnd(4)) {
    case 0: return 1 + rnd(12);
    case 1: return 1 + rnd(rnd(4) == 0 ? 600 : 70);
    default: return V * (1 + rnd(rnd(4) == 0 ? 64 : 12));
  }
}

uint64_t random_batch() {
  switch (rnd(6)) {
    case 0: return 1;
    case 1: return 1 + rnd(300);
    default: return 1 + rnd(12);
  }
}

std::vector<uint64_t> divisors(uint64_t n) {
  std::vector<uint64_t> d;
  for (uint64_t i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

// ---- stochastic depth ---------------------------------------------------------------------------

template <typename T> void test_depth_forward() {
  constexpr uint64_t V = VecWidth<T>::value;
  const uint64_t B = random_batch(), R = random_row_len(V);
  const uint64_t N = B * R;
  random_device();
  const std::vector<uint64_t> ds = divisors(R);
  const bool has_bias = rnd(3) != 0;
  const uint64_t P = rnd(3) == 0 ? R : ds[rnd(ds.size())];
  const bool in_place = rnd(2);
  const KeepArg keep = make_keep(B);
  const float s = random_scale();
  const T sentinel = Ty<T>::from(-12345.0f);
  Buf<T> x(N, offs(), sentinel), f(N, offs(), sentinel), bias(P, rnd(3) == 0 ? 0 : offs(), sentinel);
  fill_vals(x.p, N);
  fill_vals(f.p, N);
  fill_vals(bias.p, P);
  Buf<T> out(N, offs(), sentinel);
  const std::vector<T> x0 = x.copy();
  T *y = in_place ? x.p : out.p;
  const int st = dropfuse_stochastic_depth_forward(Ty<T>::code, x.p, f.p, has_bias ? bias.p : nullptr, y, B, R,
                                                   has_bias ? P : 0, &keep.k, s, nullptr);
  CHECK(st == 0, "depth forward %s: status %d", Ty<T>::name, st);
  bool ok = x.guards() && out.guards() && f.guards();
  uint64_t bad = ~0ull;
  for (uint64_t b = 0; b < B; ++b)
    for (uint64_t j = 0; j < R; ++j) {
      const uint64_t i = b * R + j;
      bool good;
      if (keep.kept(b)) {
        float tt = Ty<T>::to(f.p[i]);
        if (has_bias) tt = tt + Ty<T>::to(bias.p[j % P]);
        const float u = s * tt;
        good = same(y[i], Ty<T>::from(Ty<T>::to(x0[i]) + u));
      } else {
        good = copy_of(y[i], x0[i]);
      }
      if (!good && bad == ~0ull) bad = i;
      ok = ok && good;
    }
  if (!in_place)
    for (uint64_t i = 0; i < N; ++i) ok = ok && copy_of(x.p[i], x0[i]);
  CHECK(ok, "depth forward %s B=%lu R=%lu bias=%d P=%lu in_place=%d keep=%d scale=%g: first bad %ld", Ty<T>::name, B,
        R, has_bias, P, in_place, keep.mode, s, (long)bad);
}

// d_bias[k] = round(s * S_k), S_k the chunked sum (chunk 256) of the kept rows' terms.
template <typename T>
std::vector<T> ref_d_bias(const std::vector<T> &dy, uint64_t B, uint64_t R, uint64_t P, const KeepArg &keep, float s) {
  const uint64_t reps = R / P, M = B * reps;
  std::vector<T> out(P);
  for (uint64_t k = 0; k < P; ++k) {
    float total = 0.0f;
    for (uint64_t c0 = 0; c0 < M; c0 += 256) {
      float part = 0.0f;
      for (uint64_t m = c0; m < std::min<uint64_t>(c0 + 256, M); ++m) {
        const uint64_t b = m / reps, q = m % reps;
        part = part + (keep.kept(b) ? Ty<T>::to(dy[b * R + q * P + k]) : 0.0f);
      }
      total = total + part;
    }
    out[k] = Ty<T>::from(s * total);
  }
  return out;
}

template <typename T> void test_depth_backward() {
  constexpr uint64_t V = VecWidth<T>::value;
  uint64_t B = random_batch(), R = random_row_len(V);
  const std::vector<uint64_t> ds = divisors(R);
  uint64_t P = rnd(3) == 0 ? R : ds[rnd(ds.size())];
  if (rnd(4) == 0) {  // many chunks of 256 terms
    P = rnd(2) ? 1 : V;
    R = P * (1 + rnd(8));
    B = 100 + rnd(400);
  }
  const uint64_t N = B * R;
  random_device();
  const bool with_bias = rnd(4) != 0;
  const bool in_place = rnd(3) == 0;
  const KeepArg keep = make_keep(B);
  const float s = random_scale();
  const T sentinel = Ty<T>::from(-12345.0f);
  Buf<T> dy(N, offs(), sentinel), db(N, offs(), sentinel), dbias(P, offs(), sentinel);
  fill_vals(dy.p, N, rnd(4) != 0);
  const std::vector<T> dy0 = dy.copy();
  T *d_branch = in_place ? dy.p : db.p;
  const uint64_t ws_len = dropfuse_stochastic_depth_workspace(B, R, P);
  CHECK(ws_len == (B * (R / P) + 255) / 256 * P, "workspace length B=%lu R=%lu P=%lu: %lu", B, R, P, ws_len);
  Buf<float> ws(ws_len, rnd(2) ? 0 : 1 + rnd(3), -7.0f);
  for (uint64_t i = 0; i < ws_len; ++i) ws.p[i] = NAN;  // poisoned: every partial must be written
  const int st = dropfuse_stochastic_depth_backward(Ty<T>::code, dy.p, d_branch, with_bias ? dbias.p : nullptr,
                                                    with_bias ? ws.p : nullptr, B, R, with_bias ? P : 0, &keep.k, s,
                                                    nullptr);
  CHECK(st == 0, "depth backward %s: status %d", Ty<T>::name, st);
  bool ok = dy.guards() && db.guards() && ws.guards();
  uint64_t bad = ~0ull;
  for (uint64_t i = 0; i < N; ++i) {
    const T want = keep.kept(i / R) ? Ty<T>::from(s * Ty<T>::to(dy0[i])) : Ty<T>::from(0.0f);
    const bool good = same(d_branch[i], want) && std::signbit(Ty<T>::to(d_branch[i])) == std::signbit(Ty<T>::to(want));
    if (!good && bad == ~0ull) bad = i;
    ok = ok && good;
  }
  if (!in_place)
    for (uint64_t i = 0; i < N; ++i) ok = ok && copy_of(dy.p[i], dy0[i]);
  CHECK(ok, "d_branch %s B=%lu R=%lu in_place=%d keep=%d scale=%g: first bad %ld", Ty<T>::name, B, R, in_place,
        keep.mode, s, (long)bad);
  if (with_bias) {
    const std::vector<T> want = ref_d_bias(dy0, B, R, P, keep, s);
    bool okb = dbias.guards();
    for (uint64_t k = 0; k < P; ++k) okb = okb && same(dbias.p[k], want[k]);
    CHECK(okb, "d_bias %s B=%lu R=%lu P=%lu keep=%d scale=%g", Ty<T>::name, B, R, P, keep.mode, s);
  } else {
    bool untouched = ws.guards() && dbias.guards();
    for (uint64_t i = 0; i < ws_len; ++i) untouched = untouched && std::isnan(ws.p[i]);
    CHECK(untouched, "depth backward without a bias wrote the workspace or d_bias");
  }
}

// ---- slots --------------------------------------------------------------------------------------

// The launcher's slots of `keep` (B bytes) against the exclusive scan; returns the slots.
std::vector<uint32_t> run_slots(const std::vector<uint8_t> &keep, uint32_t *count_out) {
  const uint64_t B = keep.size();
  std::vector<uint32_t> slots(B + 8, 0xDEADBEEFu), count(9, 0xDEADBEEFu);
  const int st = dropfuse_compact_slots(keep.data(), B, slots.data(), count.data() + 4, nullptr);
  CHECK(st == 0, "slots B=%lu: status %d", B, st);
  uint32_t c = 0;
  bool ok = true;
  uint64_t bad = ~0ull;
  for (uint64_t b = 0; b < B; ++b) {
    const uint32_t want = keep[b] ? c++ : kNone;
    if (slots[b] != want && bad == ~0ull) bad = b;
    ok = ok && slots[b] == want;
  }
  for (uint64_t b = B; b < B + 8; ++b) ok = ok && slots[b] == 0xDEADBEEFu;
  CHECK(ok, "slots B=%lu: first bad %ld (%u)", B, (long)bad, bad == ~0ull ? 0u : slots[bad]);
  CHECK(count[4] == c, "count B=%lu: %u, want %u", B, count[4], c);
  bool guards = true;
  for (int i = 0; i < 9; ++i) guards = guards && (i == 4 || count[i] == 0xDEADBEEFu);
  CHECK(guards, "count guards B=%lu", B);
  if (count_out) *count_out = c;
  slots.resize(B);
  return slots;
}

std::vector<uint8_t> random_flags(uint64_t B) {
  std::vector<uint8_t> k(B);
  const int mode = (int)rnd(5);
  const double d = unit();
  for (uint64_t b = 0; b < B; ++b) {
    switch (mode) {
      case 0: k[b] = 0; break;
      case 1: k[b] = (uint8_t)(1 + rnd(255)); break;
      case 2: k[b] = (b / (1 + B / 7)) % 2 ? 1 : 0; break;  // long runs
      default: k[b] = unit() < d ? (uint8_t)(1 + rnd(255)) : 0;
    }
  }
  return k;
}

void test_slots() {
  for (uint64_t B : {1ull, 2ull, 31ull, 32ull, 33ull, 127ull, 128ull, 129ull, 1000ull})
    run_slots(random_flags(B), nullptr);
  for (int i = 0; i < 6; ++i) run_slots(random_flags(1 + rnd(9000)), nullptr);
  // Tile boundaries (4096 flags per tile) and a few 10^4 samples.
  for (uint64_t B : {4095ull, 4096ull, 4097ull, 8192ull, 8193ull, 20000ull + rnd(20000)})
    run_slots(random_flags(B), nullptr);
  std::vector<uint8_t> all(33000, 1);
  run_slots(all, nullptr);
}

// ---- compaction ---------------------------------------------------------------------------------

enum class C { Gather, Scatter, ScatterBackward, ScatterAdd, ScatterAddBackward, GatherBackward };
const char *cname(C op) {
  switch (op) {
    case C::Gather: return "gather";
    case C::Scatter: return "scatter";
    case C::ScatterBackward: return "scatter backward";
    case C::ScatterAdd: return "scatter-add";
    case C::ScatterAddBackward: return "scatter-add backward";
    default: return "gather backward";
  }
}

// Runs `op` on full rows `x`/`out` and compact rows `c` (cap rows), slots from the launcher.
template <typename T>
int launch(C op, const T *x, T *out, T *c, const uint32_t *slots, uint64_t B, uint64_t R, uint64_t cap, float s) {
  const dropfuse_dtype dt = Ty<T>::code;
  switch (op) {
    case C::Gather: return dropfuse_gather_samples(dt, x, c, slots, B, R, cap, nullptr);
    case C::Scatter: return dropfuse_scatter_samples(dt, x, c, out, slots, B, R, cap, nullptr);
    case C::ScatterBackward: return dropfuse_scatter_samples_backward(dt, x, out, c, slots, B, R, cap, nullptr);
    case C::ScatterAdd: return dropfuse_scatter_add_samples(dt, x, c, out, slots, B, R, cap, s, nullptr);
    case C::ScatterAddBackward: return dropfuse_scatter_add_samples_backward(dt, x, c, slots, B, R, cap, s, nullptr);
    default: return dropfuse_gather_samples_backward(dt, c, out, slots, B, R, cap, nullptr);
  }
}

// The contract on the host: updates want_out (full rows) and want_c (compact rows).
template <typename T>
void model(C op, const std::vector<T> &x, std::vector<T> &want_out, std::vector<T> &want_c,
           const std::vector<uint32_t> &slots, uint64_t R, uint64_t cap, float s, bool in_place) {
  const uint64_t B = slots.size();
  for (uint64_t b = 0; b < B; ++b) {
    const uint32_t sl = slots[b];
    const bool skipped = sl == kNone, kept = !skipped && sl < cap;
    for (uint64_t j = 0; j < R; ++j) {
      const uint64_t i = b * R + j, ci = (uint64_t)sl * R + j;
      switch (op) {
        case C::Gather:
          if (kept) want_c[ci] = x[i];
          break;
        case C::Scatter:
          if (kept) want_out[i] = want_c[ci];
          else if (skipped && !in_place) want_out[i] = x[i];
          break;
        case C::ScatterBackward:
          if (kept) {
            want_c[ci] = x[i];
            want_out[i] = Ty<T>::from(0.0f);
          } else if (skipped && !in_place) {
            want_out[i] = x[i];
          }
          break;
        case C::ScatterAdd:
          if (kept) want_out[i] = Ty<T>::from(Ty<T>::to(x[i]) + s * Ty<T>::to(want_c[ci]));
          else if (skipped && !in_place) want_out[i] = x[i];
          break;
        case C::ScatterAddBackward:
          if (kept) want_c[ci] = Ty<T>::from(s * Ty<T>::to(x[i]));
          break;
        case C::GatherBackward:
          if (kept) want_out[i] = Ty<T>::from(Ty<T>::to(want_out[i]) + Ty<T>::to(want_c[ci]));
          break;
      }
    }
  }
}

bool reads_full_out(C op) { return op == C::GatherBackward; }
bool has_full_out(C op) { return op != C::Gather && op != C::ScatterAddBackward; }
bool may_be_in_place(C op) { return op == C::Scatter || op == C::ScatterBackward || op == C::ScatterAdd; }

uint64_t random_capacity(uint32_t count, uint64_t B) {
  switch (rnd(7)) {
    case 0: return 0;
    case 1: return B;
    case 2: return count + 1 + rnd(3);
    case 3: return count > 0 ? rnd(count) : 0;  // below the count
    case 4: return count > 0 ? count - 1 : 0;
    default: return count;
  }
}

template <typename T> void test_compact(C op) {
  constexpr uint64_t V = VecWidth<T>::value;
  const uint64_t B = rnd(8) == 0 ? 2000 + rnd(6000) : random_batch();
  const uint64_t R = B > 1000 ? 1 + rnd(2 * V) : random_row_len(V);
  const uint64_t N = B * R;
  random_device();
  uint32_t count = 0;
  const std::vector<uint32_t> slots = run_slots(random_flags(B), &count);
  const uint64_t cap = random_capacity(count, B);
  const bool in_place = may_be_in_place(op) && rnd(2);
  const float s = random_scale();
  const T sentinel = Ty<T>::from(-12345.0f);
  Buf<T> x(N, offs(), sentinel), out(N, offs(), sentinel), c(cap * R, offs(), sentinel);
  fill_vals(x.p, N);
  if (reads_full_out(op)) fill_vals(out.p, N);
  // Compact rows: inputs hold values, outputs hold values too (rows nobody maps to must keep them).
  fill_vals(c.p, cap * R);
  const std::vector<T> x0 = x.copy(), c0 = c.copy();
  T *full_out = in_place ? x.p : out.p;
  std::vector<T> want_out = in_place ? x0 : out.copy(), want_c = c0;
  // Slots in a misaligned copy now and then (4-byte aligned, as the launchers require).
  std::vector<uint32_t> slot_buf(B + 3);
  const size_t so = rnd(2) * (1 + rnd(2));
  std::copy(slots.begin(), slots.end(), slot_buf.begin() + so);
  const T *xin = op == C::GatherBackward ? nullptr : x.p;
  const int st = launch<T>(op, xin, full_out, cap ? c.p : (rnd(2) ? nullptr : c.p), slot_buf.data() + so, B, R, cap, s);
  CHECK(st == 0, "%s %s: status %d", cname(op), Ty<T>::name, st);
  model(op, x0, want_out, want_c, slots, R, cap, s, in_place);
  bool ok = x.guards() && out.guards() && c.guards();
  const bool computed = op == C::ScatterAdd || op == C::ScatterAddBackward || op == C::GatherBackward;
  uint64_t bad_full = ~0ull, bad_c = ~0ull;
  if (has_full_out(op))
    for (uint64_t i = 0; i < N; ++i) {
      const bool good = computed ? same(full_out[i], want_out[i]) : copy_of(full_out[i], want_out[i]);
      if (!good && bad_full == ~0ull) bad_full = i;
      ok = ok && good;
    }
  if (!in_place && op != C::GatherBackward)
    for (uint64_t i = 0; i < N; ++i) ok = ok && copy_of(x.p[i], x0[i]);
  for (uint64_t i = 0; i < cap * R; ++i) {
    const bool good = computed ? same(c.p[i], want_c[i]) : copy_of(c.p[i], want_c[i]);
    if (!good && bad_c == ~0ull) bad_c = i;
    ok = ok && good;
  }
  CHECK(ok, "%s %s B=%lu R=%lu count=%u cap=%lu in_place=%d scale=%g: first bad full %ld, compact %ld", cname(op),
        Ty<T>::name, B, R, count, cap, in_place, s, (long)bad_full, (long)bad_c);
}

// ---- rows that must not be touched ----------------------------------------------------------------

// Dropped samples' branch (forward) and d_out (backward) rows are protected pages; so are the
// residual rows of dropped samples in place (neither read nor written). The scalar path: an output
// one element off its 16-byte alignment (the protected rows stay page-aligned).
template <typename T> void test_untouched_depth(bool scalar_path) {
  const uint64_t R = 4096 / sizeof(T);
  const uint64_t B = 5 + rnd(4);
  std::vector<uint8_t> flags(B);
  for (auto &f : flags) f = rnd(2) ? 1 : 0;
  flags[0] = 0;
  flags[1] = 1;
  const dropfuse_sample_keep k{flags.data(), 1, 0};
  random_device();
  const T sentinel = Ty<T>::from(-12345.0f);
  {
    Pages res(B), br(B);
    for (uint64_t b = 0; b < B; ++b) {
      fill_vals(res.row<T>(b), R);
      fill_vals(br.row<T>(b), R);
    }
    Buf<T> bias(R, 0, sentinel), out(B * R, 1, sentinel);
    fill_vals(bias.p, R);
    for (uint64_t b = 0; b < B; ++b)
      if (!flags[b]) {
        br.protect(b);
        if (!scalar_path) res.protect(b);
      }
    T *y = scalar_path ? out.p : res.row<T>(0);
    const int st = dropfuse_stochastic_depth_forward(Ty<T>::code, res.row<T>(0), br.row<T>(0), bias.p, y, B, R, R,
                                                     &k, 1.5f, nullptr);
    CHECK(st == 0 && out.guards(), "depth forward with protected rows: status %d", st);
  }
  {
    Pages dy(B);
    for (uint64_t b = 0; b < B; ++b) fill_vals(dy.row<T>(b), R);
    for (uint64_t b = 0; b < B; ++b)
      if (!flags[b]) dy.protect(b);
    Buf<T> db(B * R, scalar_path ? 1 : 0, sentinel), dbias(R, 0, sentinel);
    std::vector<float> ws(dropfuse_stochastic_depth_workspace(B, R, R));
    int st = dropfuse_stochastic_depth_backward(Ty<T>::code, dy.row<T>(0), db.p, dbias.p, ws.data(), B, R, R, &k, 2.0f,
                                                nullptr);
    CHECK(st == 0, "depth backward with protected rows: status %d", st);
    st = dropfuse_stochastic_depth_backward(Ty<T>::code, dy.row<T>(0), db.p, nullptr, nullptr, B, R, 0, &k, 2.0f,
                                            nullptr);
    CHECK(st == 0 && db.guards() && dbias.guards(), "depth backward (no bias) with protected rows: status %d", st);
  }
}

// Samples whose slot is at or beyond the capacity: their full rows (input and output) are
// protected pages. The scalar path: a compact buffer one element off its 16-byte alignment.
template <typename T> void test_untouched_compact(C op, bool scalar_path) {
  const uint64_t R = 4096 / sizeof(T);
  const uint64_t B = 6 + rnd(4);
  std::vector<uint8_t> flags(B);
  for (auto &f : flags) f = rnd(4) ? 1 : 0;
  flags[B - 1] = flags[B - 2] = 1;
  uint32_t count = 0;
  random_device();
  const std::vector<uint32_t> slots = run_slots(flags, &count);
  const uint64_t cap = count - 1 - rnd(count - 1);  // at least one sample overflows, cap >= 1
  Pages x(B), out(B);
  Buf<T> c(cap * R, scalar_path ? 1 : 0, Ty<T>::from(-12345.0f));
  for (uint64_t b = 0; b < B; ++b) {
    fill_vals(x.row<T>(b), R);
    fill_vals(out.row<T>(b), R);
  }
  fill_vals(c.p, cap * R);
  for (uint64_t b = 0; b < B; ++b)
    if (slots[b] != kNone && slots[b] >= cap) {
      x.protect(b);
      out.protect(b);
    }
  const int st = launch<T>(op, x.row<T>(0), out.row<T>(0), c.p, slots.data(), B, R, cap, 1.25f);
  CHECK(st == 0 && c.guards(), "%s with protected rows: status %d", cname(op), st);
}

// ---- argument checks: an error, and nothing launched or written ---------------------------------

void test_invalid() {
  const uint64_t before = emu::g.launches;
  std::vector<uint8_t> keep(8, 1);
  std::vector<uint32_t> slots(16, 0);
  std::vector<float> a(64, 1.0f), b(64, 1.0f), ws(64, 0.0f);
  const dropfuse_sample_keep k{keep.data(), 1, 0};
  const int bad = cudaErrorInvalidValue;
  auto mis = [](void *p) { return reinterpret_cast<uint32_t *>(reinterpret_cast<char *>(p) + 2); };
  CHECK(dropfuse_compact_slots(nullptr, 8, slots.data(), slots.data() + 8, nullptr) == bad, "slots: null keep");
  CHECK(dropfuse_compact_slots(keep.data(), 8, mis(slots.data()), slots.data() + 8, nullptr) == bad,
        "slots: misaligned");
  CHECK(dropfuse_compact_slots(keep.data(), 8, slots.data(), mis(slots.data() + 8), nullptr) == bad,
        "count: misaligned");
  CHECK(dropfuse_compact_slots(keep.data(), 1ull << 32, slots.data(), slots.data() + 8, nullptr) == bad,
        "slots: batch of 2^32");
  CHECK(dropfuse_compact_slots(nullptr, 0, nullptr, nullptr, nullptr) == 0, "slots: batch 0 is a no-op");
  CHECK(dropfuse_stochastic_depth_forward(DROPFUSE_F32, a.data(), b.data(), a.data(), a.data(), 2, 8, 3, &k, 1.0f,
                                          nullptr) == bad,
        "depth: bias not dividing");
  CHECK(dropfuse_stochastic_depth_forward(DROPFUSE_F32, a.data(), nullptr, nullptr, a.data(), 2, 8, 0, &k, 1.0f,
                                          nullptr) == bad,
        "depth: null branch");
  CHECK(dropfuse_stochastic_depth_forward(DROPFUSE_F32, a.data(), b.data(), nullptr, a.data(), 2, 8, 0, nullptr, 1.0f,
                                          nullptr) == bad,
        "depth: null keep");
  CHECK(dropfuse_stochastic_depth_forward((dropfuse_dtype)7, a.data(), b.data(), nullptr, b.data(), 2, 8, 0, &k, 1.0f,
                                          nullptr) == bad,
        "depth: bad dtype");
  const dropfuse_sample_keep none{nullptr, 0, 0};
  CHECK(dropfuse_stochastic_depth_forward((dropfuse_dtype)7, a.data(), b.data(), nullptr, a.data(), 2, 8, 0, &none,
                                          1.0f, nullptr) == bad,
        "depth: bad dtype (nothing kept, in place)");
  CHECK(dropfuse_stochastic_depth_backward(DROPFUSE_F32, a.data(), b.data(), b.data(), nullptr, 2, 8, 8, &k, 1.0f,
                                           nullptr) == bad,
        "depth backward: null workspace");
  CHECK(dropfuse_stochastic_depth_backward(DROPFUSE_F32, a.data(), b.data(), b.data(), (float *)mis(ws.data()), 2, 8,
                                           8, &k, 1.0f, nullptr) == bad,
        "depth backward: misaligned workspace");
  CHECK(dropfuse_stochastic_depth_backward(DROPFUSE_F32, a.data(), b.data(), b.data(), ws.data(), 2, 8, 3, &k, 1.0f,
                                           nullptr) == bad,
        "depth backward: bias not dividing");
  CHECK(dropfuse_stochastic_depth_backward((dropfuse_dtype)7, a.data(), b.data(), nullptr, nullptr, 2, 8, 0, &k, 1.0f,
                                           nullptr) == bad,
        "depth backward: bad dtype");
  CHECK(dropfuse_gather_samples(DROPFUSE_F32, a.data(), nullptr, slots.data(), 2, 8, 1, nullptr) == bad,
        "gather: null compact with capacity 1");
  CHECK(dropfuse_gather_samples((dropfuse_dtype)7, a.data(), nullptr, slots.data(), 2, 8, 0, nullptr) == bad,
        "gather: bad dtype (capacity 0)");
  CHECK(dropfuse_scatter_samples(DROPFUSE_F32, a.data(), b.data(), a.data(), mis(slots.data()), 2, 8, 2, nullptr) ==
            bad,
        "scatter: misaligned slots");
  CHECK(dropfuse_scatter_add_samples(DROPFUSE_F32, a.data(), b.data(), nullptr, slots.data(), 2, 8, 2, 1.0f,
                                     nullptr) == bad,
        "scatter-add: null out");
  CHECK(dropfuse_scatter_add_samples_backward((dropfuse_dtype)7, a.data(), nullptr, slots.data(), 2, 8, 0, 1.0f,
                                              nullptr) == bad,
        "scatter-add backward: bad dtype (capacity 0)");
  CHECK(dropfuse_gather_samples_backward((dropfuse_dtype)7, nullptr, a.data(), slots.data(), 2, 8, 0, nullptr) == bad,
        "gather backward: bad dtype (capacity 0)");
  CHECK(dropfuse_scatter_samples_backward(DROPFUSE_F32, a.data(), b.data(), nullptr, slots.data(), 2, 8, 3,
                                          nullptr) == bad,
        "scatter backward: null compact");
  CHECK(dropfuse_stochastic_depth_workspace(4, 8, 3) == 0 && dropfuse_stochastic_depth_workspace(4, 8, 0) == 0 &&
            dropfuse_stochastic_depth_workspace(0, 8, 8) == 0,
        "workspace of invalid sizes");
  CHECK(emu::g.launches == before, "an invalid call launched a kernel");
  bool untouched = true;
  for (float v : a) untouched = untouched && v == 1.0f;
  for (float v : b) untouched = untouched && v == 1.0f;
  CHECK(untouched, "an invalid call wrote data");
}

}  // namespace t

int main(int argc, char **argv) {
  using namespace t;
  seed_rng(6);
  const int scale = argc > 1 ? atoi(argv[1]) : 1;
  signal(SIGSEGV, on_segv);
  emu::g.sms = 1 + (int)rnd(3);  // cached by the launchers at the first launch
  test_invalid();
  test_slots();
  for (int i = 0; i < 40 * scale; ++i) {
    test_depth_forward<float>();
    test_depth_forward<__half>();
    test_depth_forward<__nv_bfloat16>();
    test_depth_backward<float>();
    test_depth_backward<__half>();
    test_depth_backward<__nv_bfloat16>();
  }
  const C ops[] = {C::Gather, C::Scatter, C::ScatterBackward, C::ScatterAdd, C::ScatterAddBackward, C::GatherBackward};
  for (int i = 0; i < 12 * scale; ++i)
    for (C op : ops) {
      test_compact<float>(op);
      test_compact<__half>(op);
      test_compact<__nv_bfloat16>(op);
    }
  for (bool scalar : {false, true}) {
    test_untouched_depth<float>(scalar);
    test_untouched_depth<__nv_bfloat16>(scalar);
    for (C op : ops) {
      test_untouched_compact<float>(op, scalar);
      test_untouched_compact<__half>(op, scalar);
    }
  }
  return report();
}
