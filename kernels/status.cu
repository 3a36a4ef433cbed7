// Status codes of the launchers are cudaError_t values; these name and describe them.
#include <cuda_runtime.h>

#include "dropfuse.h"

extern "C" const char *dropfuse_error_name(int status) {
  return cudaGetErrorName(static_cast<cudaError_t>(status));
}

extern "C" const char *dropfuse_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}
