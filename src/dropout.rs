//! Dropout: bit-packed mask generation, forward and backward, out of place and in place.
//!
//! ```no_run
//! use dropfuse::{Device, Dropout, Generator};
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let x = dev.upload(&vec![half::f16::from_f32(1.0); 1 << 20])?;
//! let mut y = dev.zeros::<half::f16>(1 << 20)?;
//! let mut mask = dev.zeros::<u32>(dropfuse::dropout::mask_words(1 << 20))?;
//! let mut rng = Generator::new(42);
//! let drop = Dropout::new(0.1)?;
//! let state = rng.next();
//! drop.forward(dev.stream(), state, &x, &mut y, &mut mask)?;
//! let mut dx = dev.zeros::<half::f16>(1 << 20)?;
//! drop.backward(dev.stream(), &mask, &y, &mut dx)?; // or backward_maskless with `state`
//! # Ok(()) }
//! ```
//!
//! Every call validates its arguments first (lengths, contexts, offsets) and returns
//! [`Error::InvalidArgument`] without writing anything when they are wrong. The keep decisions
//! follow the mask contract of the README: element `element_offset + i` is kept iff its Philox word
//! is `>= threshold`; kept elements are multiplied by `scale` in f32 and rounded once.

use std::ffi::c_void;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::rng::{PhiloxState, Randomness, Source};

/// Number of 32-bit words of the bit mask of `n` elements: `ceil(n / 32)`.
pub const fn mask_words(n: usize) -> usize {
    n.div_ceil(32)
}

/// A validated dropout configuration: drop probability `p`, the derived keep threshold and scale,
/// and the global index of the first element (for shards of a larger tensor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f64,
    threshold: u64,
    scale: f32,
    element_offset: u64,
}

impl Dropout {
    /// `p` must be finite and in `[0, 1]`. The threshold is `round(p * 2^32)` (an element is
    /// dropped iff its word is below it, so the drop probability is `threshold / 2^32`), the scale
    /// `1 / (1 - p)` computed in f64 and rounded to f32 (0 when `p == 1`).
    pub fn new(p: f64) -> Result<Self> {
        if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
            return Err(Error::invalid("p", "a drop probability in [0, 1]", p));
        }
        // p * 2^32 is exact in f64; round() is half away from zero.
        let threshold = (p * 4_294_967_296.0).round() as u64;
        let scale = if p == 1.0 { 0.0 } else { (1.0 / (1.0 - p)) as f32 };
        Ok(Dropout {
            p,
            threshold,
            scale,
            element_offset: 0,
        })
    }

    /// The same dropout for a slice whose first element is element `element_offset` of the whole
    /// tensor: its masks equal the matching part of the whole tensor's mask (tensor parallelism).
    pub fn with_element_offset(mut self, element_offset: u64) -> Self {
        self.element_offset = element_offset;
        self
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
    /// Elements whose 32-bit word is below this are dropped (`0 ..= 2^32`).
    pub fn threshold(&self) -> u64 {
        self.threshold
    }
    /// The multiplier of kept elements.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Global index of element 0 of the slices this dropout is applied to.
    pub fn element_offset(&self) -> u64 {
        self.element_offset
    }

    fn params(&self, rng: raw::RawRng) -> ffi::dropfuse_dropout_params {
        let bound = match rng {
            raw::RawRng::Host(s) => (s.seed, s.offset, std::ptr::null()),
            raw::RawRng::Device { state, add } => (0, add, state),
        };
        self.launch_params(self.element_offset, bound)
    }

    /// The launchers' dropout params: this dropout's threshold and scale, the first element's
    /// global index `element_offset` (the caller's: structured dropout counts decisions instead),
    /// and `(seed, offset, philox_dev)` as [`Source::bind`] gives them. One builder for every
    /// module whose kernels take `dropfuse_dropout_params`.
    pub(crate) fn launch_params(
        &self,
        element_offset: u64,
        (seed, offset, philox_dev): (u64, u64, *const u64),
    ) -> ffi::dropfuse_dropout_params {
        ffi::dropfuse_dropout_params {
            seed,
            offset,
            element_offset,
            threshold: self.threshold,
            scale: self.scale,
            philox_dev,
        }
    }

    /// Checks `rng`'s context (error `rng`), then binds it: [`Dropout::launch_params`] and the
    /// guard that keeps a device Philox state ordered on `stream` until the launch is enqueued.
    pub(crate) fn bind_params<'s>(
        &self,
        element_offset: u64,
        rng: &'s Source<'_>,
        stream: &'s CudaStream,
    ) -> Result<(ffi::dropfuse_dropout_params, Option<SyncOnDrop<'s>>)> {
        rng.check(stream)?;
        let (seed, offset, dev, guard) = rng.bind(stream);
        Ok((self.launch_params(element_offset, (seed, offset, dev)), guard))
    }

    fn check_len(&self, n: usize, name: &'static str) -> Result<()> {
        if n == 0 {
            return Err(Error::invalid(name, "a non-empty tensor", "0 elements"));
        }
        if self.element_offset.checked_add(n as u64).is_none() {
            return Err(Error::invalid(
                "element_offset",
                format!("element_offset + n <= 2^64 - 1 (n = {n})"),
                self.element_offset,
            ));
        }
        Ok(())
    }

    // ---- safe API on cudarc slices and views ----

    /// Writes the bit mask of `n` elements into `mask` (exactly `mask_words(n)` words).
    pub fn mask<M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        n: usize,
        mask: &mut M,
    ) -> Result<()> {
        let rng = rng.source();
        self.validate(stream, n, "n", &[Buf::mask(mask)])?;
        rng.check(stream)?;
        let (m, _gm) = mask.device_ptr_mut(stream);
        let (seed, offset, dev, _gr) = rng.bind(stream);
        let raw_rng = raw::RawRng::from_parts(seed, offset, dev);
        // SAFETY: `mask` holds mask_words(n) u32 words on the stream's context (validated), as
        // does a device Philox state.
        unsafe { raw::mask(self, raw_rng, m as *mut u32, n, stream.cu_stream()) }?;
        after(stream)
    }

    /// `y = dropout(x)` and the bit mask (`mask_words(x.len())` words).
    pub fn forward<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &X,
        y: &mut Y,
        mask: &mut M,
    ) -> Result<()> {
        let n = x.len();
        self.validate(
            stream,
            n,
            "x",
            &[Buf::data("x", x), Buf::data("y", y), Buf::mask(mask)],
        )?;
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (mp, _gm) = mask.device_ptr_mut(stream);
        self.launch_forward::<T>(stream, rng.source(), xp, yp, mp, n)
    }

    /// `y = dropout(x)` without storing a mask: the backward regenerates it from `rng`.
    pub fn forward_maskless<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &X,
        y: &mut Y,
    ) -> Result<()> {
        let n = x.len();
        self.validate(stream, n, "x", &[Buf::data("x", x), Buf::data("y", y)])?;
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        self.launch_forward::<T>(stream, rng.source(), xp, yp, NO_MASK, n)
    }

    /// In place: `x = dropout(x)`, and the bit mask.
    pub fn forward_inplace<T: Element, X: DevicePtrMut<T>, M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &mut X,
        mask: &mut M,
    ) -> Result<()> {
        let n = x.len();
        self.validate(stream, n, "x", &[Buf::data("x", x), Buf::mask(mask)])?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (mp, _gm) = mask.device_ptr_mut(stream);
        self.launch_forward::<T>(stream, rng.source(), xp, xp, mp, n)
    }

    /// In place, no mask stored.
    pub fn forward_maskless_inplace<T: Element, X: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &mut X,
    ) -> Result<()> {
        let n = x.len();
        self.validate(stream, n, "x", &[Buf::data("x", x)])?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        self.launch_forward::<T>(stream, rng.source(), xp, xp, NO_MASK, n)
    }

    /// Backward from a stored mask: `dx = dy * scale` where the mask bit is set, 0 elsewhere.
    pub fn backward<T: Element, M: DevicePtr<u32>, DY: DevicePtr<T>, DX: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        mask: &M,
        dy: &DY,
        dx: &mut DX,
    ) -> Result<()> {
        let n = dy.len();
        self.validate(
            stream,
            n,
            "dy",
            &[Buf::data("dy", dy), Buf::data("dx", dx), Buf::mask(mask)],
        )?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (dyp, _gdy) = dy.device_ptr(stream);
        let (dxp, _gdx) = dx.device_ptr_mut(stream);
        self.launch_backward::<T>(stream, mp, dyp, dxp, n)
    }

    /// Backward regenerating the mask from the forward's `rng` (and this dropout's element offset).
    pub fn backward_maskless<T: Element, DY: DevicePtr<T>, DX: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        dy: &DY,
        dx: &mut DX,
    ) -> Result<()> {
        // The mask-free backward is the forward's arithmetic applied to dy.
        self.forward_maskless(stream, rng, dy, dx)
    }

    /// In place backward from a stored mask: `g = g * scale` where the bit is set, 0 elsewhere.
    pub fn backward_inplace<T: Element, M: DevicePtr<u32>, G: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        mask: &M,
        grad: &mut G,
    ) -> Result<()> {
        let n = grad.len();
        self.validate(stream, n, "grad", &[Buf::data("grad", grad), Buf::mask(mask)])?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (gp, _gg) = grad.device_ptr_mut(stream);
        self.launch_backward::<T>(stream, mp, gp, gp, n)
    }

    /// In place backward regenerating the mask from `rng`.
    pub fn backward_maskless_inplace<T: Element, G: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        grad: &mut G,
    ) -> Result<()> {
        self.forward_maskless_inplace(stream, rng, grad)
    }

    /// Validates a call on `n` elements: `n` itself (reported as `first`), every buffer's length,
    /// then every buffer's context; then binds the stream's context for the launcher.
    fn validate(&self, stream: &CudaStream, n: usize, first: &'static str, bufs: &[Buf<'_>]) -> Result<()> {
        self.check_len(n, first)?;
        for b in bufs {
            if b.is_mask {
                check_mask_len(b.len, n)?;
            } else {
                check_same_len(b.len, n, b.name)?;
            }
        }
        for b in bufs {
            check_stream(stream, b.stream, b.name)?;
        }
        bind(stream)
    }

    /// The forward launch on validated pointers (kept alive by the caller's guards); `y` may equal
    /// `x` (in place); `mask` is [`NO_MASK`] for the mask-free modes.
    fn launch_forward<T: Element>(
        &self,
        stream: &CudaStream,
        rng: Source<'_>,
        x: CUdeviceptr,
        y: CUdeviceptr,
        mask: CUdeviceptr,
        n: usize,
    ) -> Result<()> {
        rng.check(stream)?;
        let mask = if mask == NO_MASK {
            std::ptr::null_mut()
        } else {
            mask as *mut u32
        };
        let (seed, offset, dev, _gr) = rng.bind(stream);
        let raw_rng = raw::RawRng::from_parts(seed, offset, dev);
        // SAFETY: lengths and contexts were validated (a device Philox state's too); x and y are
        // one buffer (in place) or two distinct cudarc buffers (a shared and a mutable borrow
        // cannot overlap).
        unsafe {
            raw::forward::<T>(
                self,
                raw_rng,
                x as *const T,
                y as *mut T,
                mask,
                n,
                stream.cu_stream(),
            )
        }?;
        after(stream)
    }

    /// The backward-from-mask launch on validated pointers; `dx` may equal `dy` (in place).
    fn launch_backward<T: Element>(
        &self,
        stream: &CudaStream,
        mask: CUdeviceptr,
        dy: CUdeviceptr,
        dx: CUdeviceptr,
        n: usize,
    ) -> Result<()> {
        // SAFETY: as in `launch_forward`.
        unsafe {
            raw::backward::<T>(
                self,
                mask as *const u32,
                dy as *const T,
                dx as *mut T,
                n,
                stream.cu_stream(),
            )
        }?;
        after(stream)
    }
}

/// No mask pointer (the mask-free modes).
const NO_MASK: CUdeviceptr = 0;

/// One buffer of a call, as validation sees it.
struct Buf<'a> {
    name: &'static str,
    len: usize,
    stream: &'a CudaStream,
    is_mask: bool,
}

impl<'a> Buf<'a> {
    fn data<T, S: DeviceSlice<T>>(name: &'static str, s: &'a S) -> Self {
        Buf {
            name,
            len: s.len(),
            stream: s.stream(),
            is_mask: false,
        }
    }
    fn mask<S: DeviceSlice<u32>>(s: &'a S) -> Self {
        Buf {
            name: "mask",
            len: s.len(),
            stream: s.stream(),
            is_mask: true,
        }
    }
}

pub(crate) fn check_same_len(got: usize, n: usize, name: &'static str) -> Result<()> {
    if got != n {
        return Err(Error::invalid(
            name,
            format!("{n} elements (the input's length)"),
            format!("{got} elements"),
        ));
    }
    Ok(())
}

pub(crate) fn check_mask_len(got: usize, n: usize) -> Result<()> {
    let want = mask_words(n);
    if got != want {
        return Err(Error::invalid(
            "mask",
            format!("{want} u32 words (ceil({n} / 32))"),
            format!("{got} words"),
        ));
    }
    Ok(())
}

/// Memory must belong to the context of the stream the call is enqueued on.
pub(crate) fn check_stream(stream: &CudaStream, buf: &CudaStream, name: &'static str) -> Result<()> {
    let (want, got) = (stream.context(), buf.context());
    if want != got {
        return Err(Error::invalid(
            name,
            format!("memory of the stream's context (device {})", want.ordinal()),
            format!("memory of another context (device {})", got.ordinal()),
        ));
    }
    Ok(())
}

/// The device pointer of an optional input (0 without one) and its guard, which keeps the buffer
/// ordered on `stream` until the launch is enqueued: the optional bias, mask or validity buffers
/// of several modules.
pub(crate) fn opt_ptr<'a, T>(
    buf: Option<&'a dyn DevicePtr<T>>,
    stream: &'a CudaStream,
) -> (CUdeviceptr, Option<SyncOnDrop<'a>>) {
    match buf {
        Some(b) => {
            let (p, g) = b.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// [`opt_ptr`] for an optional output.
pub(crate) fn opt_ptr_mut<'a, T>(
    buf: Option<&'a mut (dyn DevicePtrMut<T> + '_)>,
    stream: &'a CudaStream,
) -> (CUdeviceptr, Option<SyncOnDrop<'a>>) {
    match buf {
        Some(b) => {
            let (p, g) = b.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// The launchers use the CUDA runtime, which launches into the thread's current context.
pub(crate) fn bind(stream: &CudaStream) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| Error::driver("cuCtxSetCurrent", e))
}

/// Reports an error cudarc recorded while ordering the buffers' events around the launch.
pub(crate) fn after(stream: &CudaStream) -> Result<()> {
    stream
        .context()
        .check_err()
        .map_err(|e| Error::driver("cuEventRecord", e))
}

/// The raw-pointer layer, for frameworks that own their device memory.
///
/// Arguments are validated as far as pointers allow (non-empty, non-null, offsets); the rest is the
/// caller's contract, stated in each function's Safety section. Work is enqueued on `stream`, which
/// must belong to the calling thread's current CUDA context (as must the memory).
pub mod raw {
    use super::*;
    use cudarc::driver::sys::CUstream;

    /// Where a raw call takes `(seed, offset)` from: fixed at launch, or a device Philox state
    /// (`state` points to `{seed, offset}`, two `u64` of device memory of the current context,
    /// 8-byte aligned, read when the kernel runs, with `offset + add`; see [`crate::rng`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RawRng {
        /// Fixed at launch.
        Host(PhiloxState),
        /// Read from device memory when the kernel runs.
        Device { state: *const u64, add: u64 },
    }

    impl From<PhiloxState> for RawRng {
        fn from(s: PhiloxState) -> Self {
            RawRng::Host(s)
        }
    }

    impl RawRng {
        pub(crate) fn from_parts(seed: u64, offset: u64, dev: *const u64) -> Self {
            if dev.is_null() {
                RawRng::Host(PhiloxState::new(seed, offset))
            } else {
                RawRng::Device {
                    state: dev,
                    add: offset,
                }
            }
        }

        fn check(&self) -> Result<()> {
            if let RawRng::Device { state, .. } = self {
                if (*state as usize) % 8 != 0 {
                    return Err(Error::invalid(
                        "rng",
                        "an 8-byte aligned device Philox state",
                        format!("{:p}", state),
                    ));
                }
            }
            Ok(())
        }
    }

    fn nonnull<P>(p: *const P, name: &'static str) -> Result<()> {
        if p.is_null() {
            return Err(Error::invalid(name, "a non-null device pointer", "null"));
        }
        Ok(())
    }

    /// Writes the bit mask of `n` elements (`mask_words(n)` words) for `rng`.
    ///
    /// # Safety
    /// `mask` points to `mask_words(n)` writable, 4-byte aligned `u32` of device memory of the
    /// current context; `stream` is a valid stream of that context.
    pub unsafe fn mask(
        drop: &Dropout,
        rng: impl Into<RawRng>,
        mask: *mut u32,
        n: usize,
        stream: CUstream,
    ) -> Result<()> {
        drop.check_len(n, "n")?;
        nonnull(mask, "mask")?;
        let rng = rng.into();
        rng.check()?;
        let params = drop.params(rng);
        let status = ffi::dropfuse_dropout_mask(mask, n as u64, &params, stream as ffi::dropfuse_stream_t);
        ffi::check(status, "dropfuse_dropout_mask")
    }

    /// `y = dropout(x)`; writes the bit mask when `mask` is not null. Also the mask-free backward
    /// (pass `dy`, `dx` and the forward's `rng`).
    ///
    /// # Safety
    /// `x` and `y` point to `n` elements of device memory of the current context, either the same
    /// pointer (in place) or non-overlapping; `mask` is null or points to `mask_words(n)` writable
    /// `u32` not overlapping them; `stream` is a valid stream of that context.
    pub unsafe fn forward<T: Element>(
        drop: &Dropout,
        rng: impl Into<RawRng>,
        x: *const T,
        y: *mut T,
        mask: *mut u32,
        n: usize,
        stream: CUstream,
    ) -> Result<()> {
        drop.check_len(n, "x")?;
        nonnull(x, "x")?;
        nonnull(y, "y")?;
        let rng = rng.into();
        rng.check()?;
        let params = drop.params(rng);
        let status = ffi::dropfuse_dropout_forward(
            dtype(T::DTYPE),
            x as *const c_void,
            y as *mut c_void,
            mask,
            n as u64,
            &params,
            stream as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_dropout_forward")
    }

    /// `dx = dy * scale` where the mask bit is set, 0 elsewhere.
    ///
    /// # Safety
    /// `dy` and `dx` point to `n` elements of device memory of the current context, the same
    /// pointer or non-overlapping; `mask` points to `mask_words(n)` `u32`; `stream` is valid.
    pub unsafe fn backward<T: Element>(
        drop: &Dropout,
        mask: *const u32,
        dy: *const T,
        dx: *mut T,
        n: usize,
        stream: CUstream,
    ) -> Result<()> {
        drop.check_len(n, "dy")?;
        nonnull(mask, "mask")?;
        nonnull(dy, "dy")?;
        nonnull(dx, "dx")?;
        let status = ffi::dropfuse_dropout_backward(
            dtype(T::DTYPE),
            dy as *const c_void,
            dx as *mut c_void,
            mask,
            n as u64,
            drop.scale,
            stream as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_dropout_backward")
    }

    pub(crate) fn dtype(d: crate::DType) -> ffi::dropfuse_dtype {
        match d {
            crate::DType::F32 => ffi::dropfuse_dtype::DROPFUSE_F32,
            crate::DType::F16 => ffi::dropfuse_dtype::DROPFUSE_F16,
            crate::DType::BF16 => ffi::dropfuse_dtype::DROPFUSE_BF16,
        }
    }
}
