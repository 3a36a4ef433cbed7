//! cuBLAS through cudarc: the presence check ([`check_cublas`]) and a handle ([`Blas`]).

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The cuBLAS functions dropfuse calls (all present since cuBLAS 11).
const SYMBOLS: [&str; 6] = [
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasSetMathMode",
    "cublasGemmEx",
];

/// Bytes of the workspace each handle gets (NVIDIA's recommendation for Hopper and newer; enough
/// for every GEMM of the head, and what makes the GEMMs CUDA-graph capturable).
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// The shared-library names tried, in order (cudarc's list for the crate's CUDA version).
pub fn cublas_library_names() -> Vec<String> {
    cudarc::get_lib_name_candidates("cublas")
}

/// The presence check, once per process: `Err(reason)` when cuBLAS cannot be used.
fn probe() -> &'static std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        // SAFETY: only dlopens the candidate names (and closes them again).
        if !unsafe { sys::is_culib_present() } {
            return Err(format!("none of {:?} could be loaded", cublas_library_names()));
        }
        // SAFETY: a candidate loads (checked above), so culib() finds one and does not panic.
        let lib = unsafe { sys::culib() };
        for name in SYMBOLS {
            // SAFETY: only looks the symbol up; it is never called through this pointer.
            if let Err(e) = unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) } {
                return Err(format!("the loaded libcublas lacks {name} ({e})"));
            }
        }
        Ok(())
    })
}

/// Whether cuBLAS can be loaded and has every function dropfuse calls (never panics).
pub fn cublas_available() -> bool {
    probe().is_ok()
}

/// `Ok` when cuBLAS can be used, otherwise [`Error::NoCublas`] saying why (never panics).
///
/// cuBLAS is loaded at run time through cudarc (like libcuda), for the head's GEMMs.
/// cudarc's `dynamic-loading` opens libcublas lazily and *panics* when it is missing (in
/// `culib()`, so also in `CudaBlas::new` and in every `cublas*` call). Everything here asks first:
/// [`check_cublas`] tries the library names cudarc tries ([`cublas_library_names`]) and looks up
/// every function dropfuse calls, and maps a failure to [`Error::NoCublas`]. Nothing else in the
/// crate touches cuBLAS, so without it only the multi-sample head is unavailable.
///
/// The names come from `cudarc::get_lib_name_candidates("cublas")`; with the `cuda-13000` feature
/// they are, in order: `libcublas.so`, `libcublas64.so`, `libcublas64_13.so`, `libcublas64_130.so`,
/// `libcublas64_130_0.so`, `libcublas64_130_0.so`, `libcublas64_10.so`, `libcublas64_11.so`,
/// `libcublas64_12.so`, `libcublas64_130_0.so`, `libcublas64_9.so`, **`libcublas.so.13`**,
/// `libcublas.so.12`, `libcublas.so.11`, `libcublas.so.10`, `libcublas.so.9`, `libcublas.so.1`
/// (the first one that loads wins). A CUDA 13 toolkit's `lib64/libcublas.so` or the pip wheel
/// `nvidia-cublas` (13.x: `site-packages/nvidia/cu13/lib/libcublas.so.13`, next to the
/// `libcublasLt.so.13` it needs) on `LD_LIBRARY_PATH` both work. A CUDA 12 `libcublas.so.12` also
/// loads (the few functions used here have the same ABI) but needs a driver that runs CUDA 12.
pub fn check_cublas() -> Result<()> {
    probe().clone().map_err(|reason| Error::NoCublas { reason })
}

pub(crate) fn cublas_error(op: &'static str, status: sys::cublasStatus_t) -> Error {
    Error::Cuda {
        code: status as i32,
        name: format!("{status:?}"),
        message: "cuBLAS call failed".to_string(),
        op,
    }
}

fn check(op: &'static str, status: sys::cublasStatus_t) -> Result<()> {
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(cublas_error(op, status))
    }
}

pub(crate) fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// One GEMM in cuBLAS's column-major terms: `C (m x n) = op(A) (m x k) . op(B) (k x n)`, `op`
/// transposing when `trans_*`; element `(i, j)` of a column-major matrix with leading dimension
/// `ld` is at `i + j * ld`, so a row-major `R x C` matrix is a column-major `C x R` one with
/// `ld = C`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDesc {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// One GEMM call as the crate makes it: `C = alpha * op(A) op(B) + beta * C` ([`GemmDesc`]) with
/// operands of type `ab` (A and B) and C of type `out` (`ab` or `f32`); `beta = 0` ignores C's
/// previous contents (cuBLAS does not read C then), `beta = 1` adds to them.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmCall {
    pub desc: GemmDesc,
    pub alpha: f32,
    pub beta: f32,
    pub ab: DType,
    pub out: DType,
}

/// Every argument of one `cublasGemmEx` call but the handle and the three pointers, exactly as
/// [`Blas::gemm`] passes them ([`GemmCall::gemm_ex_args`]): a pure function of the call, so a host
/// test can run cuBLAS's documented semantics on the very values the GPU gets. `alpha` and `beta`
/// are read through host pointers (the handle's default `CUBLAS_POINTER_MODE_HOST`) as `f32`, the
/// scale type of both compute types used.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmExArgs {
    pub transa: sys::cublasOperation_t,
    pub transb: sys::cublasOperation_t,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    pub a_type: sys::cudaDataType,
    pub lda: i32,
    pub b_type: sys::cudaDataType,
    pub ldb: i32,
    pub beta: f32,
    pub c_type: sys::cudaDataType,
    pub ldc: i32,
    pub compute: sys::cublasComputeType_t,
    pub algo: sys::cublasGemmAlgo_t,
}

impl GemmCall {
    /// The `cublasGemmEx` arguments of this call: `f32` accumulation, `CUBLAS_COMPUTE_32F`, or
    /// `CUBLAS_COMPUTE_32F_PEDANTIC` for `f32` operands (rules out TF32 and other
    /// reduced-precision paths); `gemm` error when a dimension does not fit cuBLAS's `i32`
    /// (the workspace's checks keep every dimension of the head within it).
    pub fn gemm_ex_args(&self) -> Result<GemmExArgs> {
        let g = &self.desc;
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let dim = |v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::invalid("gemm", "GEMM dimensions up to i32::MAX (cuBLAS's int)", v))
        };
        let compute = if self.ab == DType::F32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        Ok(GemmExArgs {
            transa: op(g.trans_a),
            transb: op(g.trans_b),
            m: dim(g.m)?,
            n: dim(g.n)?,
            k: dim(g.k)?,
            alpha: self.alpha,
            a_type: data_type(self.ab),
            lda: dim(g.lda)?,
            b_type: data_type(self.ab),
            ldb: dim(g.ldb)?,
            beta: self.beta,
            c_type: data_type(self.out),
            ldc: dim(g.ldc)?,
            compute,
            algo: sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        })
    }
}

/// A cuBLAS handle bound to a device's stream, with its own workspace
/// ([`CUBLAS_WORKSPACE_BYTES`]) and the default math mode (no TF32: f32 GEMMs run in full f32)
/// with reduced-precision reductions disallowed (split-K partials of f16/bf16 outputs are summed
/// in f32, not in the output type).
#[derive(Debug)]
pub struct Blas {
    handle: sys::cublasHandle_t,
    stream: Arc<CudaStream>,
    // Freed after the handle (fields drop after Drop::drop).
    _workspace: CudaSlice<u8>,
}

// SAFETY: the handle is used only through `&mut self` or by one thread at a time (the head's
// workspace holds it behind `&mut`); cuBLAS handles may move between threads.
unsafe impl Send for Blas {}

impl Blas {
    /// A handle on `dev`'s stream: [`Error::NoCublas`] without cuBLAS (checked before any call).
    pub fn new(dev: &Device) -> Result<Self> {
        check_cublas()?;
        let stream = dev.stream().clone();
        let mut workspace = dev.zeros::<u8>(CUBLAS_WORKSPACE_BYTES)?;
        let wp = {
            let (wp, _g) = workspace.device_ptr_mut(&stream);
            wp
        };
        crate::dropout::bind(&stream)?;
        let mut handle: sys::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: cuBLAS is present with these symbols (probe); the context is current.
        check("cublasCreate_v2", unsafe { sys::cublasCreate_v2(&mut handle) })?;
        // From here on Drop destroys the handle; the workspace it points to is freed after it.
        let blas = Blas {
            handle,
            stream: stream.clone(),
            _workspace: workspace,
        };
        // SAFETY: a live handle; the stream and the workspace belong to the current context and
        // the workspace lives as long as the handle (same struct).
        unsafe {
            check(
                "cublasSetStream_v2",
                sys::cublasSetStream_v2(handle, stream.cu_stream() as sys::cudaStream_t),
            )?;
            check(
                "cublasSetWorkspace_v2",
                sys::cublasSetWorkspace_v2(handle, wp as *mut c_void, CUBLAS_WORKSPACE_BYTES),
            )?;
            // CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION (0 | 16: the
            // flag's own value). With the default alone, cuBLAS may reduce split-K partials of a
            // GEMM with f16/bf16 C (dW in T, evaluation dh in T) in the output type, i.e. round
            // each partial sum to T: that breaks the documented contract (f32 accumulation, the
            // output rounded once to T). f32-output GEMMs are unaffected.
            check(
                "cublasSetMathMode",
                sys::cublasSetMathMode(
                    handle,
                    sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
                ),
            )?;
        }
        Ok(blas)
    }

    /// The stream the handle enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `C = alpha * op(A) op(B) + beta * C` in cuBLAS's column-major terms: one `cublasGemmEx`
    /// with the arguments [`GemmCall::gemm_ex_args`] computes.
    ///
    /// # Safety
    /// The pointers are device memory of the handle's context, large enough for the shapes and
    /// leading dimensions given, `c` distinct from `a` and `b`; the context is current.
    pub(crate) unsafe fn gemm(&mut self, call: &GemmCall, a: u64, b: u64, c: u64) -> Result<()> {
        let x = call.gemm_ex_args()?;
        let status = sys::cublasGemmEx(
            self.handle,
            x.transa,
            x.transb,
            x.m,
            x.n,
            x.k,
            &x.alpha as *const f32 as *const c_void,
            a as *const c_void,
            x.a_type,
            x.lda,
            b as *const c_void,
            x.b_type,
            x.ldb,
            &x.beta as *const f32 as *const c_void,
            c as *mut c_void,
            x.c_type,
            x.ldc,
            x.compute,
            x.algo,
        );
        check("cublasGemmEx", status)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        if !handle.is_null() {
            let _ = crate::dropout::bind(&self.stream);
            // SAFETY: a handle this struct created and nobody else owns; errors cannot be reported
            // from drop and a failed destroy leaks only the handle.
            unsafe {
                let _ = sys::cublasDestroy_v2(handle);
            }
        }
    }
}
