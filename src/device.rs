//! A CUDA device handle: a cudarc context (the device's primary context, shared with the CUDA
//! runtime the launchers use) and a stream.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use crate::error::{Error, Result};

/// A GPU and the stream dropfuse's calls are enqueued on.
///
/// `Device::new` never panics for lack of a GPU: without an NVIDIA driver it returns
/// [`Error::NoDriver`], without a usable device [`Error::NoDevice`].
#[derive(Debug, Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Device {
    /// Opens GPU `ordinal` (its primary context) with a new non-blocking stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics when libcuda cannot be loaded: ask first.
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = match CudaContext::device_count() {
            Ok(c) => c.max(0) as usize,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => {
                return Err(Error::NoDevice {
                    ordinal,
                    reason: Error::driver("cuInit", e).to_string(),
                })
            }
        };
        if ordinal >= count {
            return Err(Error::NoDevice {
                ordinal,
                reason: format!("the driver reports {count} CUDA device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::driver("cuDevicePrimaryCtxRetain", e))?;
        let stream = ctx.new_stream().map_err(|e| Error::driver("cuStreamCreate", e))?;
        Ok(Device { ctx, stream })
    }

    /// Wraps a stream the caller already owns (its context is the stream's).
    pub fn from_stream(stream: Arc<CudaStream>) -> Self {
        Device {
            ctx: stream.context().clone(),
            stream,
        }
    }

    /// The number of CUDA devices; 0 without a driver or GPU (never panics).
    pub fn count() -> usize {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return 0;
        }
        CudaContext::device_count()
            .map(|c| c.max(0) as usize)
            .unwrap_or(0)
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream calls are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| Error::driver("cuDeviceGetName", e))
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx
            .compute_capability()
            .map_err(|e| Error::driver("cuDeviceGetAttribute", e))
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> Result<usize> {
        self.ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|v| v as usize)
            .map_err(|e| Error::driver("cuDeviceGetAttribute", e))
    }

    /// Blocks until everything enqueued on the stream has finished; reports asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::driver("cuStreamSynchronize", e))
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| Error::driver("cuMemcpyHtoD", e))
    }

    /// Copies device memory back to a new host vector (synchronizes the stream).
    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(src)
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))
    }

    /// A zero-filled device buffer of `len` elements (`len` error when its byte size is over
    /// `isize::MAX`, see [`check_device_len`]).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        check_device_len::<T>("len", len)?;
        self.stream
            .alloc_zeros(len)
            .map_err(|e| Error::driver("cuMemAlloc", e))
    }
}

/// Checks that a device buffer of `len` elements of `T` has a byte size that fits (`len *
/// size_of::<T>() <= isize::MAX`, as for host allocations); `name` is the argument that set `len`.
///
/// cudarc's allocations compute `len * size_of::<T>()` without a check: a product that wraps
/// would allocate a few bytes for a slice of length `len`, which kernels validated against `len`
/// would then overrun. Every allocation of a size that comes from an argument runs this first
/// (here without a device, for tests).
#[doc(hidden)]
pub fn check_device_len<T>(name: &'static str, len: usize) -> Result<()> {
    if crate::alloc::fits::<T>(len) {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!(
                "a buffer of at most isize::MAX bytes (at most {} elements of {} bytes)",
                isize::MAX as usize / std::mem::size_of::<T>().max(1),
                std::mem::size_of::<T>()
            ),
            format!("{len} elements"),
        ))
    }
}
