// A stand-in for cuBLAS (libcublas.so) for the emulated-device build (see fake_libcuda.cpp): the
// six functions the multi-sample head calls (src/multi_sample/blas.rs), on host memory.
//
// cublasGemmEx follows cuBLAS's column-major contract: C (m x n, leading dimension ldc) =
// alpha * op(A) (m x k) * op(B) (k x n) + beta * C, with op = N or T, A/B/C each f32, f16 or bf16
// and f32 compute (CUBLAS_COMPUTE_32F or _PEDANTIC), alpha and beta host f32 scalars. The dot
// products accumulate in f32 in index order: a worse rounding than cuBLAS's blocked sums for
// long k, so a test tolerance that holds here is not loose on a GPU. beta == 0 ignores C's old
// contents (NaN included), as cuBLAS does. Arguments cuBLAS rejects are rejected with
// CUBLAS_STATUS_INVALID_VALUE; the handle must have a stream and a workspace set (the head sets
// both; an unset one is reported as CUBLAS_STATUS_NOT_INITIALIZED, stricter than cuBLAS). A GEMM
// on a stream that the stand-in libcuda is capturing is recorded into its graph
// (`dropfuse_emu_record`), like the emulated kernel launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <dlfcn.h>
#include <stdint.h>

#include <functional>

#include <cmath>
#include <cstdlib>

namespace {

constexpr int kSuccess = 0;
constexpr int kNotInitialized = 1;
constexpr int kInvalidValue = 7;
constexpr int kNotSupported = 15;

constexpr int kR32F = 0, kR16F = 2, kR16BF = 14;
constexpr int kCompute32F = 68, kCompute32FPedantic = 69;

struct Handle {
  void *stream = nullptr;
  bool stream_set = false;
  bool workspace_set = false;
  int math_mode = 0;
};

float load(const void *p, int type, size_t i) {
  switch (type) {
    case kR32F: return static_cast<const float *>(p)[i];
    case kR16F: return __half2float(static_cast<const __half *>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
  }
}

void store(void *p, int type, size_t i, float v) {
  switch (type) {
    case kR32F: static_cast<float *>(p)[i] = v; break;
    case kR16F: static_cast<__half *>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v);
  }
}

bool known_type(int t) { return t == kR32F || t == kR16F || t == kR16BF; }

// Records `op` into the graph the stand-in libcuda is capturing on `stream` (see
// fake_libcuda.cpp), or runs it now.
void enqueue(void *stream, std::function<void()> op) {
  using RecordFn = int (*)(void *, void (*)(void *), void *, void (*)(void *));
  static RecordFn rec = nullptr;
  if (rec == nullptr) {
    if (void *h = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD))
      rec = reinterpret_cast<RecordFn>(dlsym(h, "dropfuse_emu_record"));
  }
  if (stream != nullptr && rec != nullptr) {
    auto *heap = new std::function<void()>(op);
    if (rec(
            stream, [](void *c) { (*static_cast<std::function<void()> *>(c))(); }, heap,
            [](void *c) { delete static_cast<std::function<void()> *>(c); }))
      return;
    delete heap;
  }
  op();
}

}  // namespace

extern "C" {

int cublasCreate_v2(void **handle) {
  if (!handle) return kInvalidValue;
  *handle = new Handle;
  return kSuccess;
}
int cublasDestroy_v2(void *handle) {
  if (!handle) return kNotInitialized;
  delete static_cast<Handle *>(handle);
  return kSuccess;
}
int cublasSetStream_v2(void *handle, void *stream) {
  if (!handle) return kNotInitialized;
  static_cast<Handle *>(handle)->stream_set = true;
  static_cast<Handle *>(handle)->stream = stream;
  return kSuccess;
}
int cublasSetWorkspace_v2(void *handle, void *ws, size_t bytes) {
  if (!handle) return kNotInitialized;
  if (bytes > 0 && ws == nullptr) return kInvalidValue;
  static_cast<Handle *>(handle)->workspace_set = true;
  return kSuccess;
}
int cublasSetMathMode(void *handle, int mode) {
  if (!handle) return kNotInitialized;
  static_cast<Handle *>(handle)->math_mode = mode;
  return kSuccess;
}

int cublasGemmEx(void *handle, int transa, int transb, int m, int n, int k, const void *alpha, const void *A,
                 int a_type, int lda, const void *B, int b_type, int ldb, const void *beta, void *C, int c_type,
                 int ldc, int compute, int /*algo*/) {
  Handle *h = static_cast<Handle *>(handle);
  if (!h || !h->stream_set || !h->workspace_set) return kNotInitialized;
  if ((transa != 0 && transa != 1) || (transb != 0 && transb != 1)) return kInvalidValue;
  if (m < 0 || n < 0 || k < 0) return kInvalidValue;
  if (!known_type(a_type) || !known_type(b_type) || !known_type(c_type)) return kNotSupported;
  if (compute != kCompute32F && compute != kCompute32FPedantic) return kNotSupported;
  // Leading dimensions as cuBLAS checks them: at least the stored rows of each matrix.
  const int a_rows = transa == 0 ? m : k, b_rows = transb == 0 ? k : n;
  if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1))
    return kInvalidValue;
  if (!alpha || !beta) return kInvalidValue;
  if (m == 0 || n == 0) return kSuccess;
  // Host pointer mode: the scalars are read at the call, the matrices when the GEMM runs.
  const float al = *static_cast<const float *>(alpha), be = *static_cast<const float *>(beta);
  enqueue(h->stream, [=] {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int p = 0; p < k; ++p) {
        const size_t ai = transa == 0 ? size_t(p) * lda + i : size_t(i) * lda + p;
        const size_t bi = transb == 0 ? size_t(j) * ldb + p : size_t(p) * ldb + j;
        acc += load(A, a_type, ai) * load(B, b_type, bi);
      }
      const size_t ci = size_t(j) * ldc + i;
      float out = al * acc;
      if (be != 0.0f) out += be * load(C, c_type, ci);
      store(C, c_type, ci, out);
    }
  }
  });
  return kSuccess;
}

}  // extern "C"
