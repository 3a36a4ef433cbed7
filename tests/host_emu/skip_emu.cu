// Host emulation of the thread bodies of kernels/skip.cu (built and run by tests/skip_host_emulation.rs):
// every thread index of a grid runs one after the other on the CPU, for random shapes, alignments,
// bias periods, keep patterns, capacities and grid sizes, and the outputs are compared bit for bit
// with plain loops written from the contract (src/reference/skip.rs). It checks the launch
// arithmetic (grid-stride walk with carries, bias positions, vector/scalar paths, slots and
// capacity states, chunked bias sums); the device-only parts (warp scan of the slots, packed
// conversions) are left to the GPU tests.
#include "skip.cu"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
using namespace dropfuse;

static std::mt19937_64 rng(12345);
static uint64_t rnd(uint64_t n) { return rng() % n; }

template <typename T> float tof(T v) { return Conv<T>::to(v); }
template <typename T> T fromf(float v) { return Conv<T>::from(v); }
template <typename T> uint32_t bits(T v) { uint32_t b = 0; memcpy(&b, &v, sizeof(T)); return b; }

template <typename T> T* alloc(size_t n, size_t off) {
  void* p = aligned_alloc(64, (n + off + 16) * sizeof(T) + 64);
  return reinterpret_cast<T*>(p) + off;
}

template <typename T>
void fill(T* p, size_t n) { for (size_t i = 0; i < n; ++i) p[i] = fromf<T>((float)((int)rnd(2000) - 1000) / 37.0f); }

static int failures = 0;
#define CHECK(c, ...) do { if (!(c)) { if (failures++ < 20) { printf(__VA_ARGS__); printf("\n"); } } } while (0)

template <typename T, Op OP>
void run_rows_emu(const RowArgs<T>& a, uint64_t rows, uint64_t bias_len, uint64_t threads) {
  constexpr uint64_t V = VecWidth<T>::value;
  const void* ptrs[] = {a.x, a.src, a.y, a.y2};
  bool vec = a.row_len % V == 0;
  for (const void* p : ptrs) vec = vec && (p == nullptr || aligned16(p));
  auto go = [&](auto vecc, auto biasc) {
    constexpr bool VEC = decltype(vecc)::value;
    constexpr int BIAS = decltype(biasc)::value;
    Walk w = make_walk<T, VEC, BIAS>(rows, a.row_len, bias_len, threads);
    for (uint64_t t = 0; t < threads; ++t) rows_thread<T, VEC, OP, BIAS>(a, w, t);
  };
  using TT = std::true_type; using FF = std::false_type;
  using B0 = std::integral_constant<int, 0>; using B1 = std::integral_constant<int, 1>; using B2 = std::integral_constant<int, 2>;
  if (OP == Op::Depth && a.bias != nullptr) {
    if (vec && bias_len % V == 0 && aligned16(a.bias)) go(TT{}, B1{});
    else if (vec) go(TT{}, B2{});
    else go(FF{}, B2{});
  } else if (vec) go(TT{}, B0{}); else go(FF{}, B0{});
}

template <typename T>
void test_depth(int iter) {
  uint64_t rows = 1 + rnd(5);
  uint64_t V = VecWidth<T>::value;
  uint64_t row_len = rnd(3) == 0 ? 1 + rnd(40) : V * (1 + rnd(12));
  // bias length: a divisor of row_len
  std::vector<uint64_t> divs; for (uint64_t d = 1; d <= row_len; ++d) if (row_len % d == 0) divs.push_back(d);
  bool has_bias = rnd(2);
  uint64_t P = divs[rnd(divs.size())];
  size_t n = rows * row_len;
  size_t offx = rnd(3) == 0 ? rnd(3) : 0, offf = rnd(4) == 0 ? rnd(3) : 0, offb = rnd(4) == 0 ? 1 : 0;
  bool in_place = rnd(2);
  T* x = alloc<T>(n, offx); fill(x, n);
  T* f = alloc<T>(n, offf); fill(f, n);
  T* bias = alloc<T>(P, offb); fill(bias, P);
  T* y = in_place ? x : alloc<T>(n, 0);
  if (!in_place) for (size_t i = 0; i < n; ++i) y[i] = fromf<T>(-777.0f);
  std::vector<T> x0(x, x + n);
  std::vector<uint8_t> flags(rows); for (auto& k : flags) k = rnd(3) ? (uint8_t)(1 + rnd(200)) : 0;
  int mode = rnd(3);  // 0 per sample, 1 device batch flag, 2 host batch
  float scale = rnd(4) == 0 ? 0.0f : rnd(4) == 0 ? 1.0f : 1.0f / (1.0f - 0.1f * rnd(9));
  RowArgs<T> a{};
  a.x = x; a.src = f; a.y = y; a.bias = has_bias ? bias : nullptr; a.row_len = row_len; a.scale = scale; a.in_place = in_place;
  int host_all = rnd(2);
  if (mode == 0) { a.flags = flags.data(); a.flag_stride = 1; }
  else if (mode == 1) { a.flags = flags.data(); a.flag_stride = 0; }
  else { a.flags = nullptr; a.all = host_all; }
  uint64_t threads = std::vector<uint64_t>{1, 3, 37, 256, 1000}[rnd(5)];
  run_rows_emu<T, Op::Depth>(a, rows, has_bias ? P : 0, threads);
  for (uint64_t b = 0; b < rows; ++b) {
    bool kept = mode == 0 ? flags[b] != 0 : mode == 1 ? flags[0] != 0 : host_all != 0;
    for (uint64_t j = 0; j < row_len; ++j) {
      size_t i = b * row_len + j;
      T want;
      if (kept) {
        float t = tof(f[i]); if (has_bias) t = t + tof(bias[j % P]);
        float u = scale * t; want = fromf<T>(tof(x0[i]) + u);
      } else want = x0[i];
      CHECK(bits(y[i]) == bits(want), "depth iter %d b %lu j %lu: got %x want %x (rows %lu R %lu P %lu bias %d inplace %d thr %lu)", iter, b, j, bits(y[i]), bits(want), rows, row_len, P, has_bias, in_place, threads);
    }
  }
}

template <typename T, Op OP>
void test_compact(int iter) {
  uint64_t rows = 1 + rnd(9);
  uint64_t V = VecWidth<T>::value;
  uint64_t row_len = rnd(3) == 0 ? 1 + rnd(40) : V * (1 + rnd(12));
  size_t n = rows * row_len;
  std::vector<uint8_t> keep(rows); for (auto& k : keep) k = rnd(3) ? 1 : 0;
  std::vector<uint32_t> slots(rows); uint32_t cnt = 0;
  for (uint64_t b = 0; b < rows; ++b) slots[b] = keep[b] ? cnt++ : kSlotNone;
  uint64_t cap = rnd(3) == 0 ? rnd(cnt + 1) : cnt + rnd(3);
  size_t cn = (cap + 1) * row_len;  // one guard row
  bool in_place = rnd(2);
  if (OP == Op::Gather || OP == Op::CompactGrad) in_place = false;
  T* x = alloc<T>(n, rnd(4) == 0 ? 1 : 0); fill(x, n);
  T* c = alloc<T>(cn, rnd(4) == 0 ? 1 : 0); fill(c, cn);
  T* y = in_place ? x : alloc<T>(n, 0);
  if (!in_place) for (size_t i = 0; i < n; ++i) y[i] = fromf<T>(-777.0f);
  std::vector<T> x0(x, x + n), c0(c, c + cn);
  float scale = rnd(3) == 0 ? 1.0f : 0.37f * (1 + rnd(5));
  RowArgs<T> a{};
  a.slots = slots.data(); a.capacity = cap; a.row_len = row_len; a.scale = scale; a.in_place = in_place;
  a.x = x;
  if (OP == Op::Gather || OP == Op::CompactGrad) { a.y = c; }
  else if (OP == Op::ScatterBackward) { a.y = y; a.y2 = c; }
  else { a.src = c; a.y = y; }
  uint64_t threads = std::vector<uint64_t>{1, 3, 37, 256, 1000}[rnd(5)];
  run_rows_emu<T, OP>(a, rows, 0, threads);
  // expected
  std::vector<T> wy(n), wc(c0);
  for (size_t i = 0; i < n; ++i) wy[i] = in_place ? x0[i] : fromf<T>(-777.0f);
  for (uint64_t b = 0; b < rows; ++b) {
    uint32_t s = slots[b];
    bool kept = s != kSlotNone && s < cap, skipped = s == kSlotNone;
    for (uint64_t j = 0; j < row_len; ++j) {
      size_t i = b * row_len + j, ci = (size_t)s * row_len + j;
      switch (OP) {
        case Op::Gather: if (kept) wc[ci] = x0[i]; break;
        case Op::Scatter: if (kept) wy[i] = c0[ci]; else if (skipped) wy[i] = x0[i]; break;
        case Op::ScatterBackward: if (kept) { wc[ci] = x0[i]; wy[i] = fromf<T>(0.0f); } else if (skipped) wy[i] = x0[i]; break;
        case Op::ScatterAdd: if (kept) wy[i] = fromf<T>(tof(x0[i]) + scale * tof(c0[ci])); else if (skipped) wy[i] = x0[i]; break;
        case Op::CompactGrad: if (kept) wc[ci] = fromf<T>(scale * tof(x0[i])); break;
        default: break;
      }
    }
  }
  const bool full_out = OP != Op::Gather && OP != Op::CompactGrad;
  if (full_out) for (size_t i = 0; i < n; ++i) CHECK(bits(y[i]) == bits(wy[i]), "op %d iter %d y[%zu] got %x want %x (rows %lu R %lu cap %lu cnt %u inplace %d)", (int)OP, iter, i, bits(y[i]), bits(wy[i]), rows, row_len, cap, cnt, in_place);
  for (size_t i = 0; i < cn; ++i) CHECK(bits(c[i]) == bits(wc[i]), "op %d iter %d c[%zu] got %x want %x (rows %lu R %lu cap %lu cnt %u)", (int)OP, iter, i, bits(c[i]), bits(wc[i]), rows, row_len, cap, cnt);
}

template <typename T>
void test_grad(int iter) {
  uint64_t rows = 1 + rnd(6);
  uint64_t V = VecWidth<T>::value;
  uint64_t row_len = rnd(3) == 0 ? 1 + rnd(40) : V * (1 + rnd(12));
  std::vector<uint64_t> divs; for (uint64_t d = 1; d <= row_len; ++d) if (row_len % d == 0) divs.push_back(d);
  uint64_t P = divs[rnd(divs.size())];
  size_t n = rows * row_len;
  T* dy = alloc<T>(n, rnd(3) == 0 ? 1 : 0); fill(dy, n);
  T* db = alloc<T>(n, rnd(3) == 0 ? 1 : 0);
  std::vector<uint8_t> flags(rows); for (auto& k : flags) k = rnd(3) ? 1 : 0;
  float scale = 1.0f / (1.0f - 0.1f * rnd(9));
  uint64_t threads = std::vector<uint64_t>{1, 3, 37, 256}[rnd(4)];
  BiasArgs<T> a{};
  a.dy = dy; a.d_branch = db; a.flags = flags.data(); a.flag_stride = 1; a.rows = rows; a.reps = row_len / P; a.terms = rows * a.reps;
  a.bias_len = P; bool gv = P % V == 0; a.groups = gv ? P / V : P; uint64_t chunks = bias_chunks(rows, row_len, P); a.items = chunks * a.groups; a.scale = scale;
  std::vector<float> ws(chunks * P, 12345.0f); a.partials = ws.data();
  std::vector<T> dbias(P);
  for (uint64_t t = 0; t < a.items; ++t) {
    if (gv && aligned16(dy) && aligned16(db)) bias_partials_item<T, VecWidth<T>::value, true>(a, t);
    else if (gv) bias_partials_item<T, VecWidth<T>::value, false>(a, t);
    else bias_partials_item<T, 1, false>(a, t);
  }
  for (uint64_t k = 0; k < P; ++k) bias_combine_item(ws.data(), dbias.data(), P, chunks, scale, k);
  for (uint64_t i = 0; i < n; ++i) {
    T want = flags[i / row_len] ? fromf<T>(scale * tof(dy[i])) : fromf<T>(0.0f);
    CHECK(bits(db[i]) == bits(want), "grad iter %d d_branch[%lu]", iter, i);
  }
  uint64_t reps = row_len / P;
  for (uint64_t k = 0; k < P; ++k) {
    float total = 0;
    for (uint64_t c0 = 0; c0 < rows * reps; c0 += kChunk) {
      float acc = 0;
      for (uint64_t m = c0; m < std::min(c0 + kChunk, rows * reps); ++m) {
        uint64_t b = m / reps, q = m % reps;
        float t = flags[b] ? tof(dy[b * row_len + q * P + k]) : 0.0f;
        acc += t;
      }
      total += acc;
    }
    T want = fromf<T>(scale * total);
    CHECK(bits(dbias[k]) == bits(want), "grad iter %d d_bias[%lu] got %x want %x", iter, k, bits(dbias[k]), bits(want));
  }
}

int main() {
  for (int i = 0; i < 3000; ++i) {
    test_depth<float>(i); test_depth<__nv_bfloat16>(i); test_depth<__half>(i);
    test_compact<float, Op::Gather>(i); test_compact<__nv_bfloat16, Op::Gather>(i);
    test_compact<float, Op::Scatter>(i); test_compact<__nv_bfloat16, Op::Scatter>(i);
    test_compact<float, Op::ScatterBackward>(i); test_compact<__half, Op::ScatterBackward>(i);
    test_compact<float, Op::ScatterAdd>(i); test_compact<__nv_bfloat16, Op::ScatterAdd>(i);
    test_compact<float, Op::CompactGrad>(i); test_compact<__nv_bfloat16, Op::CompactGrad>(i);
    if (i % 10 == 0) { test_grad<float>(i); test_grad<__nv_bfloat16>(i); }
  }
  printf("failures: %d\n", failures);
  return failures != 0;
}
