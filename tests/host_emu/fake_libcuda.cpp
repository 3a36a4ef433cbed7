// A stand-in for the CUDA driver library (libcuda.so) for the emulated-device build
// (`DROPFUSE_HOST_EMULATION=1`, see build.rs and scripts/emu-gpu-tests.sh): the crate's GPU tests
// then run on the host, the kernels on the fiber emulator of cuda_fiber_emu.h.
//
// It implements the driver calls cudarc makes for what dropfuse and its tests use: one device,
// its primary context, streams and events (everything is synchronous: a launch or copy has
// finished when its call returns), device memory (host memory, so that a CUdeviceptr is a host
// address the emulated kernels dereference) and copies, and stream capture into graphs: while a
// stream is being captured, its asynchronous copies and memsets, and the kernel launches and
// cuBLAS GEMMs enqueued on it (the emulated runtime and fake_libcublas.cpp hand them over through
// `dropfuse_emu_record`), are recorded instead of run; cuGraphLaunch runs the recorded operations
// in order. As in CU_STREAM_CAPTURE_MODE_GLOBAL, a synchronous call (synchronize, a
// non-asynchronous copy or allocation) during a capture fails with
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the capture
// (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED at its end), and so does an allocation on the capturing
// stream (real graphs would add a memory node; dropfuse never allocates inside a capture).
//
// Device memory is checked more strictly than on a GPU:
// - every allocation sits between two inaccessible pages: a kernel that reads or writes past
//   either end of a buffer (up to the 256-byte rounding of its size at the end) faults (SIGSEGV)
//   instead of silently touching a neighbour;
// - fresh allocations are filled with 0xFF bytes (a NaN in every float type), so output that a
//   kernel should have written but did not is visible;
// - copies and memsets must lie inside one live allocation (CUDA_ERROR_INVALID_VALUE otherwise),
//   frees must name a live allocation.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;

namespace {

constexpr CUresult kSuccess = 0;
constexpr CUresult kInvalidValue = 1;
constexpr CUresult kOutOfMemory = 2;
constexpr CUresult kNoDevice = 100;
constexpr CUresult kInvalidDevice = 101;
constexpr CUresult kNotSupported = 801;
constexpr CUresult kCaptureUnsupported = 900;
constexpr CUresult kCaptureInvalidated = 901;

// Emulated device attributes. The SM count matches the kernels' emulated runtime
// (cuda_fiber_emu.h, Global::sms), so that sizes the Rust side derives from it agree with the
// launchers' grids.
constexpr int kSms = 3;

struct Allocation {
  void *map;       // the mmap'ed region, guard pages included
  size_t map_len;  // its length
  size_t size;     // the bytes asked for
};

std::mutex mu;
std::map<uintptr_t, Allocation> allocs;  // by device address (the first usable byte)
int ctx_token;                           // its address is the primary context's handle

// A recorded operation: runs `fn(ctx)`; frees `ctx` with `destroy` when the last graph holding it
// goes.
struct Op {
  void (*fn)(void *);
  void *ctx;
  void (*destroy)(void *);
  Op(void (*f)(void *), void *c, void (*d)(void *)) : fn(f), ctx(c), destroy(d) {}
  Op(const Op &) = delete;  // one owner of `ctx`
  Op &operator=(const Op &) = delete;
  ~Op() {
    if (destroy) destroy(ctx);
  }
};
struct Graph {
  std::vector<std::shared_ptr<Op>> ops;
};
struct Stream {
  Graph *capture = nullptr;  // the graph being captured, or null
  bool invalidated = false;
};
std::map<Stream *, bool> streams;  // live streams
int capturing = 0;                 // streams being captured (a synchronous call then invalidates them)

size_t page() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

CUresult allocate(CUdeviceptr *out, size_t size) {
  if (out == nullptr) return kInvalidValue;
  const size_t usable = (size + 255) / 256 * 256 + (size == 0 ? 256 : 0);
  const size_t pages = (usable + page() - 1) / page();
  const size_t map_len = (pages + 2) * page();
  void *m = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return kOutOfMemory;
  char *body = static_cast<char *>(m) + page();
  if (mprotect(body, pages * page(), PROT_READ | PROT_WRITE) != 0) {
    munmap(m, map_len);
    return kOutOfMemory;
  }
  // The buffer ends where the trailing guard page starts (up to the 256-byte rounding).
  char *base = body + pages * page() - usable;
  memset(base, 0xFF, usable);
  std::lock_guard<std::mutex> lock(mu);
  allocs[reinterpret_cast<uintptr_t>(base)] = Allocation{m, map_len, size};
  *out = reinterpret_cast<uintptr_t>(base);
  return kSuccess;
}

CUresult release(CUdeviceptr p) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = allocs.find(static_cast<uintptr_t>(p));
  if (it == allocs.end()) return kInvalidValue;
  munmap(it->second.map, it->second.map_len);
  allocs.erase(it);
  return kSuccess;
}

// Whether [p, p + n) lies inside one live allocation.
bool inside(CUdeviceptr p, size_t n) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = allocs.upper_bound(static_cast<uintptr_t>(p));
  if (it == allocs.begin()) return false;
  --it;
  const uintptr_t lo = it->first, hi = it->first + it->second.size;
  return p >= lo && p <= hi && n <= hi - p;
}

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

struct Event {
  double ms = 0;
};

template <typename T>
CUresult fill(CUdeviceptr p, T v, size_t n) {
  if (!inside(p, n * sizeof(T))) return kInvalidValue;
  T *d = reinterpret_cast<T *>(p);
  for (size_t i = 0; i < n; ++i) d[i] = v;
  return kSuccess;
}

// A synchronous call: an error during a capture (which it invalidates).
bool sync_forbidden() {
  std::lock_guard<std::mutex> lock(mu);
  if (capturing == 0) return false;
  for (auto &st : streams)
    if (st.first->capture) st.first->invalidated = true;
  return true;
}

// Records `op` when `stream` is being captured (true), else false (the caller runs it now).
bool record(void *stream, std::function<CUresult()> op) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(stream));
  if (it == streams.end() || it->first->capture == nullptr) return false;
  auto *f = new std::function<CUresult()>(std::move(op));
  it->first->capture->ops.push_back(std::make_shared<Op>(
      [](void *c) {
        if ((*static_cast<std::function<CUresult()> *>(c))() != kSuccess) {
          fprintf(stderr, "emulated driver: a recorded copy or memset failed at graph launch\n");
          abort();
        }
      },
      f, [](void *c) { delete static_cast<std::function<CUresult()> *>(c); }));
  return true;
}

// Runs `op` now, or records it when `stream` is being captured.
CUresult enqueue(void *stream, std::function<CUresult()> op) {
  if (record(stream, op)) return kSuccess;
  return op();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return kSuccess; }
CUresult cuDriverGetVersion(int *v) {
  if (!v) return kInvalidValue;
  *v = 13000;
  return kSuccess;
}
CUresult cuDeviceGetCount(int *n) {
  if (!n) return kInvalidValue;
  *n = 1;
  return kSuccess;
}
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  if (!d) return kInvalidValue;
  if (ordinal != 0) return kInvalidDevice;
  *d = 0;
  return kSuccess;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
  if (d != 0) return kInvalidDevice;
  if (!name || len <= 0) return kInvalidValue;
  strncpy(name, "dropfuse host emulation", static_cast<size_t>(len) - 1);
  name[len - 1] = 0;
  return kSuccess;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
  if (d != 0) return kInvalidDevice;
  *bytes = size_t(16) << 30;
  return kSuccess;
}
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
  *free_bytes = size_t(8) << 30;
  *total = size_t(16) << 30;
  return kSuccess;
}
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  if (d != 0) return kInvalidDevice;
  if (!v) return kInvalidValue;
  switch (attr) {
    case 1: *v = 1024; break;             // MAX_THREADS_PER_BLOCK
    case 2: *v = 1024; break;             // MAX_BLOCK_DIM_X
    case 3: case 4: *v = 1024; break;     // MAX_BLOCK_DIM_Y/Z (Z is 64 on GPUs; unused)
    case 5: *v = 0x7FFFFFFF; break;       // MAX_GRID_DIM_X
    case 6: case 7: *v = 65535; break;    // MAX_GRID_DIM_Y/Z
    case 8: *v = 48 * 1024; break;        // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;              // WARP_SIZE
    case 16: *v = kSms; break;            // MULTIPROCESSOR_COUNT
    case 75: *v = 9; break;               // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = 0; break;               // COMPUTE_CAPABILITY_MINOR
    case 97: *v = 232448; break;          // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 115: *v = 1; break;              // MEMORY_POOLS_SUPPORTED
    default: *v = 0;
  }
  return kSuccess;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) {
  if (d != 0) return kInvalidDevice;
  *ctx = &ctx_token;
  return kSuccess;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return kSuccess; }
CUresult cuDevicePrimaryCtxRelease(CUdevice) { return kSuccess; }
// Other contexts (tests of mismatched contexts): distinct handles, nothing behind them.
CUresult cuCtxCreate_v4(void **ctx, void *, unsigned, CUdevice d) {
  if (d != 0) return kInvalidDevice;
  *ctx = new int(0);
  return kSuccess;
}
CUresult cuCtxCreate_v3(void **ctx, void *, int, unsigned, CUdevice d) { return cuCtxCreate_v4(ctx, nullptr, 0, d); }
CUresult cuCtxCreate_v2(void **ctx, unsigned, CUdevice d) { return cuCtxCreate_v4(ctx, nullptr, 0, d); }
CUresult cuCtxDestroy_v2(void *ctx) {
  if (ctx != &ctx_token) delete static_cast<int *>(ctx);
  return kSuccess;
}
CUresult cuCtxSetCurrent(void *) { return kSuccess; }
CUresult cuCtxGetCurrent(void **ctx) {
  *ctx = &ctx_token;
  return kSuccess;
}
CUresult cuCtxGetDevice(CUdevice *d) {
  *d = 0;
  return kSuccess;
}
CUresult cuCtxSynchronize() { return sync_forbidden() ? kCaptureUnsupported : kSuccess; }

CUresult cuStreamCreate(void **s, unsigned) {
  std::lock_guard<std::mutex> lock(mu);
  Stream *st = new Stream;
  streams[st] = true;
  *s = st;
  return kSuccess;
}
CUresult cuStreamCreateWithPriority(void **s, unsigned flags, int) { return cuStreamCreate(s, flags); }
CUresult cuStreamDestroy_v2(void *s) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(s));
  if (it == streams.end()) return kInvalidValue;
  if (it->first->capture) {
    --capturing;
    delete it->first->capture;
  }
  delete it->first;
  streams.erase(it);
  return kSuccess;
}
CUresult cuStreamSynchronize(void *) { return sync_forbidden() ? kCaptureUnsupported : kSuccess; }
CUresult cuStreamQuery(void *) { return sync_forbidden() ? kCaptureUnsupported : kSuccess; }
CUresult cuStreamWaitEvent(void *, void *, unsigned) { return kSuccess; }
CUresult cuStreamIsCapturing(void *s, int *status) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(s));
  const bool active = it != streams.end() && it->first->capture != nullptr;
  // CU_STREAM_CAPTURE_STATUS_NONE, _ACTIVE, _INVALIDATED
  *status = !active ? 0 : it->first->invalidated ? 2 : 1;
  return kSuccess;
}
CUresult cuStreamBeginCapture_v2(void *s, int) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(s));
  if (it == streams.end()) return kNotSupported;  // the legacy default stream cannot be captured
  if (it->first->capture) return kCaptureUnsupported;
  it->first->capture = new Graph;
  it->first->invalidated = false;
  ++capturing;
  return kSuccess;
}
CUresult cuStreamEndCapture(void *s, void **graph) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(s));
  if (it == streams.end() || it->first->capture == nullptr) return kInvalidValue;
  Graph *g = it->first->capture;
  it->first->capture = nullptr;
  --capturing;
  if (it->first->invalidated) {
    delete g;
    *graph = nullptr;
    return kCaptureInvalidated;
  }
  *graph = g;
  return kSuccess;
}
CUresult cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long) {
  if (!graph) return kInvalidValue;
  *exec = new Graph(*static_cast<Graph *>(graph));  // shares the recorded operations
  return kSuccess;
}
CUresult cuGraphLaunch(void *exec, void *stream) {
  if (!exec) return kInvalidValue;
  Graph *g = static_cast<Graph *>(exec);
  // A graph launched into a capturing stream would be a child graph: not needed, not emulated.
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = streams.find(static_cast<Stream *>(stream));
    if (it != streams.end() && it->first->capture) return kNotSupported;
  }
  for (auto &op : g->ops) op->fn(op->ctx);
  return kSuccess;
}
CUresult cuGraphUpload(void *exec, void *) { return exec ? kSuccess : kInvalidValue; }
CUresult cuGraphExecDestroy(void *exec) {
  delete static_cast<Graph *>(exec);
  return kSuccess;
}
CUresult cuGraphDestroy(void *graph) {
  delete static_cast<Graph *>(graph);
  return kSuccess;
}

// The hook of the emulated runtime (cuda_fiber_emu.h) and of fake_libcublas.cpp: records
// `fn(ctx)` into the graph `stream` is capturing and returns 1 (the graph then owns `ctx` and
// frees it with `destroy`), or returns 0 when `stream` is not being captured (the caller runs it).
int dropfuse_emu_record(void *stream, void (*fn)(void *), void *ctx, void (*destroy)(void *)) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(stream));
  if (it == streams.end() || it->first->capture == nullptr) return 0;
  it->first->capture->ops.push_back(std::make_shared<Op>(fn, ctx, destroy));
  return 1;
}
CUresult cuLaunchHostFunc(void *, void (*fn)(void *), void *data) {
  fn(data);
  return kSuccess;
}

CUresult cuEventCreate(void **e, unsigned) {
  *e = new Event;
  return kSuccess;
}
CUresult cuEventRecord(void *e, void *) {
  static_cast<Event *>(e)->ms = now_ms();
  return kSuccess;
}
CUresult cuEventSynchronize(void *) { return sync_forbidden() ? kCaptureUnsupported : kSuccess; }
CUresult cuEventQuery(void *) { return kSuccess; }
CUresult cuEventDestroy_v2(void *e) {
  delete static_cast<Event *>(e);
  return kSuccess;
}
CUresult cuEventElapsedTime(float *ms, void *a, void *b) {
  *ms = static_cast<float>(static_cast<Event *>(b)->ms - static_cast<Event *>(a)->ms);
  return kSuccess;
}
CUresult cuEventElapsedTime_v2(float *ms, void *a, void *b) { return cuEventElapsedTime(ms, a, b); }

bool capturing_stream(void *stream) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = streams.find(static_cast<Stream *>(stream));
  if (it == streams.end() || it->first->capture == nullptr) return false;
  it->first->invalidated = true;
  return true;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return sync_forbidden() ? kCaptureUnsupported : allocate(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, void *s) {
  return capturing_stream(s) ? kCaptureUnsupported : allocate(p, n);
}
CUresult cuMemFree_v2(CUdeviceptr p) { return sync_forbidden() ? kCaptureUnsupported : release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void *s) { return capturing_stream(s) ? kCaptureUnsupported : release(p); }

CUresult cuMemHostAlloc(void **p, size_t n, unsigned) {
  *p = malloc(n == 0 ? 1 : n);
  return *p ? kSuccess : kOutOfMemory;
}
CUresult cuMemAllocHost_v2(void **p, size_t n) { return cuMemHostAlloc(p, n, 0); }
CUresult cuMemFreeHost(void *p) {
  free(p);
  return kSuccess;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
  if (sync_forbidden()) return kCaptureUnsupported;
  if (!inside(dst, n)) return kInvalidValue;
  if (n) memcpy(reinterpret_cast<void *>(dst), src, n);
  return kSuccess;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) {
  if (!inside(dst, n)) return kInvalidValue;
  return enqueue(s, [=] {
    if (n) memcpy(reinterpret_cast<void *>(dst), src, n);
    return kSuccess;
  });
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
  if (sync_forbidden()) return kCaptureUnsupported;
  if (!inside(src, n)) return kInvalidValue;
  if (n) memcpy(dst, reinterpret_cast<const void *>(src), n);
  return kSuccess;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *s) {
  if (!inside(src, n)) return kInvalidValue;
  return enqueue(s, [=] {
    if (n) memcpy(dst, reinterpret_cast<const void *>(src), n);
    return kSuccess;
  });
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  if (sync_forbidden()) return kCaptureUnsupported;
  if (!inside(dst, n) || !inside(src, n)) return kInvalidValue;
  if (n) memmove(reinterpret_cast<void *>(dst), reinterpret_cast<const void *>(src), n);
  return kSuccess;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void *s) {
  if (!inside(dst, n) || !inside(src, n)) return kInvalidValue;
  return enqueue(s, [=] {
    if (n) memmove(reinterpret_cast<void *>(dst), reinterpret_cast<const void *>(src), n);
    return kSuccess;
  });
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
  return sync_forbidden() ? kCaptureUnsupported : fill<unsigned char>(p, v, n);
}
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void *s) {
  if (!inside(p, n)) return kInvalidValue;
  return enqueue(s, [=] { return fill<unsigned char>(p, v, n); });
}
CUresult cuMemsetD16_v2(CUdeviceptr p, unsigned short v, size_t n) {
  return sync_forbidden() ? kCaptureUnsupported : fill<unsigned short>(p, v, n);
}
CUresult cuMemsetD16Async(CUdeviceptr p, unsigned short v, size_t n, void *s) {
  if (!inside(p, 2 * n)) return kInvalidValue;
  return enqueue(s, [=] { return fill<unsigned short>(p, v, n); });
}
CUresult cuMemsetD32_v2(CUdeviceptr p, unsigned v, size_t n) {
  return sync_forbidden() ? kCaptureUnsupported : fill<unsigned>(p, v, n);
}
CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, void *s) {
  if (!inside(p, 4 * n)) return kInvalidValue;
  return enqueue(s, [=] { return fill<unsigned>(p, v, n); });
}

CUresult cuGetErrorName(CUresult e, const char **s) {
  switch (e) {
    case kSuccess: *s = "CUDA_SUCCESS"; break;
    case kInvalidValue: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case kOutOfMemory: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case kNoDevice: *s = "CUDA_ERROR_NO_DEVICE"; break;
    case kInvalidDevice: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case kNotSupported: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case kCaptureUnsupported: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
    case kCaptureInvalidated: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN";
  }
  return kSuccess;
}
CUresult cuGetErrorString(CUresult e, const char **s) {
  switch (e) {
    case kSuccess: *s = "no error"; break;
    case kInvalidValue: *s = "invalid argument (emulated driver: outside any live allocation?)"; break;
    case kOutOfMemory: *s = "out of memory"; break;
    case kNoDevice: *s = "no CUDA-capable device is detected"; break;
    case kInvalidDevice: *s = "invalid device ordinal"; break;
    case kNotSupported: *s = "operation not supported by the emulated driver"; break;
    case kCaptureUnsupported: *s = "operation not permitted when stream is capturing"; break;
    case kCaptureInvalidated: *s = "operation failed due to a previous error during capture"; break;
    default: *s = "unknown error";
  }
  return kSuccess;
}

}  // extern "C"
