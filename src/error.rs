//! The crate's one error type.

use std::fmt;

/// Everything that can go wrong in dropfuse. Validation errors are returned before any memory is
/// written or any kernel is launched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument failed validation: which one, what was expected, what was given.
    #[error("invalid argument `{name}`: expected {expected}, got {got}")]
    InvalidArgument {
        name: &'static str,
        expected: String,
        got: String,
    },
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error(
        "the NVIDIA driver library (libcuda.so) was not found: this machine has no NVIDIA driver \
         (dropfuse's default CUDA 13.0 build needs driver 580 or newer)"
    )]
    NoDriver,
    /// The driver is present but the requested device is not usable.
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice { ordinal: usize, reason: String },
    /// The cuBLAS library (libcublas, loaded at run time) could not be loaded or lacks a function
    /// dropfuse calls. Only the multi-sample head needs it; every other kernel works without it.
    #[error(
        "cuBLAS is not available ({reason}): the multi-sample head's GEMMs need libcublas from CUDA \
         13 (libcublas.so.13), e.g. `pip install nvidia-cublas` and its site-packages/nvidia/cu13/lib \
         directory on LD_LIBRARY_PATH, or a CUDA 13 toolkit's lib64 on LD_LIBRARY_PATH"
    )]
    NoCublas {
        /// What failed: no candidate library name loaded, or a missing function.
        reason: String,
    },
    /// A CUDA runtime or driver call, a cuBLAS call, or a kernel launch, failed.
    #[error("CUDA error {code} ({name}) in {op}: {message}")]
    Cuda {
        /// `cudaError_t` for the runtime (kernel launchers), `CUresult` for the driver,
        /// `cublasStatus_t` for cuBLAS.
        code: i32,
        name: String,
        message: String,
        /// The operation that failed, e.g. `dropfuse_dropout_forward` or `cuMemcpy`.
        op: &'static str,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(name: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            name,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// Converts a cudarc driver error, keeping the driver's own name and message.
    pub fn driver(op: &'static str, err: cudarc::driver::DriverError) -> Self {
        let name = err
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("CUresult {}", err.0 as i32));
        let message = err
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown driver error".to_string());
        Error::Cuda {
            code: err.0 as i32,
            name,
            message,
            op,
        }
    }

    /// The name of the argument when this is an [`Error::InvalidArgument`].
    pub fn argument(&self) -> Option<&'static str> {
        match self {
            Error::InvalidArgument { name, .. } => Some(name),
            _ => None,
        }
    }
}
