//! Structured dropout on the GPU: channel (spatial, `Dropout1d/2d/3d`), locked (variational) and
//! embedding-row dropout, and any other set of shared axes: one decision per group of elements.
//!
//! The contract is the CPU reference's ([`crate::reference::structured`], matched bit for bit):
//! the decisions are the dropout contract on *decision* indices (`decision_offset + d`), the mask
//! holds one bit per decision (`ceil(decisions / 32)` words), kept elements are
//! `T::from_f32(x * scale)`, dropped ones `+0`.
//!
//! ```no_run
//! use dropfuse::structured::StructuredDropout;
//! use dropfuse::{Device, Generator};
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let shape = [64, 256, 56, 56];
//! let drop = StructuredDropout::channel(&shape, 0.1)?; // Dropout2d
//! let n = drop.numel();
//! let x = dev.upload(&vec![half::f16::from_f32(1.0); n])?;
//! let mut y = dev.zeros::<half::f16>(n)?;
//! let mut mask = dev.zeros::<u32>(drop.mask_words())?; // one bit per (sample, channel)
//! let mut rng = Generator::new(42);
//! let state = rng.next();
//! drop.forward(dev.stream(), state, &x, &mut y, &mut mask)?;
//! let mut dx = dev.zeros::<half::f16>(n)?;
//! drop.backward(dev.stream(), &mask, &y, &mut dx)?; // or backward_maskless with `state`
//! # Ok(()) }
//! ```
//!
//! The random calls take any [`Randomness`]: a [`PhiloxState`](crate::PhiloxState) fixed at launch,
//! or a [`DevicePhilox`](crate::DevicePhilox) (`&state` or `state.at(add)`) that the kernels read
//! when they run, so that a captured CUDA graph draws fresh decisions on each replay
//! ([`crate::rng`]).
//!
//! Every call validates its arguments first ([`Error::InvalidArgument`] named as in the reference:
//! `shape`, `axis`, `axes`, `p`, `decision_offset`, `x`, `y`, `dy`, `dx`, `grad`, `mask`) and
//! writes nothing when they are wrong. The kernels take the layout collapsed into at most
//! [`MAX_GROUPS`] alternating shared / non-shared groups of axes ([`groups`]); a layout that needs
//! more is rejected as `axes`.

use std::ffi::c_void;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::dropout::{after, bind, check_stream, opt_ptr_mut, Dropout};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::rng::{Randomness, Source};

pub use crate::reference::structured::Layout;

/// Most alternating groups of axes the kernels take (`DROPFUSE_STRUCTURED_MAX_GROUPS`).
pub const MAX_GROUPS: usize = ffi::DROPFUSE_STRUCTURED_MAX_GROUPS as usize;

/// The layout collapsed as the kernels see it, outermost first: `(extent, shared)` groups of
/// consecutive axes, extent-1 axes removed and neighbours of the same kind merged, so kinds
/// alternate. A tensor of one element is `[(1, false)]`.
pub fn groups(layout: &Layout) -> Vec<(usize, bool)> {
    let mut out: Vec<(usize, bool)> = Vec::new();
    for (k, &d) in layout.shape().iter().enumerate() {
        if d == 1 {
            continue;
        }
        let shared = layout.is_shared(k);
        match out.last_mut() {
            Some((e, s)) if *s == shared => *e *= d,
            _ => out.push((d, shared)),
        }
    }
    if out.is_empty() {
        out.push((1, false));
    }
    out
}

/// A validated structured dropout: the layout, `p` (threshold and scale as [`Dropout`]) and the
/// decision offset.
#[derive(Debug, Clone)]
pub struct StructuredDropout {
    layout: Layout,
    desc: ffi::dropfuse_structured_layout,
    drop: Dropout,
    decision_offset: u64,
}

impl StructuredDropout {
    /// Structured dropout of `layout` with drop probability `p` (finite, in `[0, 1]`).
    pub fn new(layout: Layout, p: f64) -> Result<Self> {
        let g = groups(&layout);
        if g.len() > MAX_GROUPS {
            return Err(Error::invalid(
                "axes",
                format!("shared axes that collapse into at most {MAX_GROUPS} alternating groups"),
                format!("{} groups for shape {:?}", g.len(), layout.shape()),
            ));
        }
        let drop = Dropout::new(p)?;
        let mut desc = ffi::dropfuse_structured_layout {
            groups: g.len() as u32,
            numel: layout.numel() as u64,
            decisions: layout.decisions() as u64,
            ..Default::default()
        };
        let mut stride = 1u64;
        for (k, &(e, shared)) in g.iter().enumerate().rev() {
            desc.extent[k] = e as u64;
            if !shared {
                desc.decision_stride[k] = stride;
                stride *= e as u64;
            }
        }
        Ok(StructuredDropout {
            layout,
            desc,
            drop,
            decision_offset: 0,
        })
    }

    /// Channel (spatial) dropout of `[N, C, *spatial]`: one decision per `(n, c)`.
    pub fn channel(shape: &[usize], p: f64) -> Result<Self> {
        Self::new(Layout::channel(shape)?, p)
    }

    /// Locked (variational) dropout: one mask shared along `axis` (e.g. time, axis 0 of `(T, B, H)`).
    pub fn locked(shape: &[usize], axis: usize, p: f64) -> Result<Self> {
        Self::new(Layout::locked(shape, axis)?, p)
    }

    /// Embedding-row dropout of a weight `[V, E]`: one decision per row.
    pub fn embedding_rows(shape: &[usize], p: f64) -> Result<Self> {
        Self::new(Layout::embedding_rows(shape)?, p)
    }

    /// Any set of shared axes.
    pub fn shared_axes(shape: &[usize], axes: &[usize], p: f64) -> Result<Self> {
        Self::new(Layout::shared_axes(shape, axes)?, p)
    }

    /// The same dropout for a shard whose decision 0 is decision `decision_offset` of the whole
    /// tensor (e.g. `n0 * C` for samples `n0..` of a channel-dropout batch);
    /// `decision_offset + decisions` must fit `u64`.
    pub fn with_decision_offset(mut self, decision_offset: u64) -> Result<Self> {
        if decision_offset.checked_add(self.desc.decisions).is_none() {
            return Err(Error::invalid(
                "decision_offset",
                format!(
                    "decision_offset + decisions <= 2^64 - 1 (decisions = {})",
                    self.desc.decisions
                ),
                decision_offset,
            ));
        }
        self.decision_offset = decision_offset;
        Ok(self)
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.drop.p()
    }
    /// The multiplier of kept elements, `f32(1 / (1 - p))` (0 at `p = 1`).
    pub fn scale(&self) -> f32 {
        self.drop.scale()
    }
    /// Decisions whose word is below this are dropped (`0 ..= 2^32`).
    pub fn threshold(&self) -> u64 {
        self.drop.threshold()
    }
    /// Global index of decision 0.
    pub fn decision_offset(&self) -> u64 {
        self.decision_offset
    }
    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }
    /// Decisions (mask bits).
    pub fn decisions(&self) -> usize {
        self.layout.decisions()
    }
    /// Words of the decision mask: `ceil(decisions / 32)`.
    pub fn mask_words(&self) -> usize {
        self.layout.mask_words()
    }

    /// Lengths (data buffers: `numel`; the mask: `mask_words`), then contexts; binds the stream.
    fn validate(
        &self,
        stream: &CudaStream,
        data: &[(&'static str, usize, &CudaStream)],
        mask: Option<(usize, &CudaStream)>,
    ) -> Result<()> {
        for &(name, len, _) in data {
            if len != self.numel() {
                return Err(Error::invalid(
                    name,
                    format!("{} elements (shape {:?})", self.numel(), self.layout.shape()),
                    format!("{len} elements"),
                ));
            }
        }
        if let Some((len, _)) = mask {
            if len != self.mask_words() {
                return Err(Error::invalid(
                    "mask",
                    format!(
                        "{} words (ceil({} decisions / 32))",
                        self.mask_words(),
                        self.decisions()
                    ),
                    format!("{len} words"),
                ));
            }
        }
        for &(name, _, s) in data {
            check_stream(stream, s, name)?;
        }
        if let Some((_, s)) = mask {
            check_stream(stream, s, "mask")?;
        }
        bind(stream)
    }

    // ---- safe API on cudarc slices and views ----

    /// Writes the decision mask (`mask_words()` words).
    pub fn mask<M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        mask: &mut M,
    ) -> Result<()> {
        let rng = rng.source();
        self.validate(stream, &[], Some((mask.len(), mask.stream())))?;
        rng.check(stream)?;
        let (mp, _gm) = mask.device_ptr_mut(stream);
        let (seed, offset, dev, _gr) = rng.bind(stream);
        let params = self.drop.launch_params(self.decision_offset, (seed, offset, dev));
        // SAFETY: the mask holds mask_words() words of the stream's context (validated), as does a
        // device Philox state; the guards keep them alive and ordered on `stream`.
        let status = unsafe {
            ffi::dropfuse_structured_mask(
                mp as *mut u32,
                &self.desc,
                &params,
                stream.cu_stream() as ffi::dropfuse_stream_t,
            )
        };
        ffi::check(status, "dropfuse_structured_mask")?;
        after(stream)
    }

    /// `y = dropout(x)` and the decision mask.
    pub fn forward<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &X,
        y: &mut Y,
        mask: &mut M,
    ) -> Result<()> {
        self.forward_out(stream, rng, ("x", x), ("y", y), Some(mask))
    }

    /// `y = dropout(x)` without storing the mask: the backward regenerates it from `rng`.
    pub fn forward_maskless<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &X,
        y: &mut Y,
    ) -> Result<()> {
        self.forward_out(stream, rng, ("x", x), ("y", y), None)
    }

    /// In place: `x = dropout(x)`, and the decision mask.
    pub fn forward_inplace<T: Element, X: DevicePtrMut<T>, M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &mut X,
        mask: &mut M,
    ) -> Result<()> {
        self.forward_in_place(stream, rng, ("x", x), Some(mask))
    }

    /// In place, no mask stored.
    pub fn forward_maskless_inplace<T: Element, X: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &mut X,
    ) -> Result<()> {
        self.forward_in_place(stream, rng, ("x", x), None)
    }

    /// Backward from a stored decision mask: `dx = dy * scale` where the element's decision is
    /// kept, `+0` elsewhere.
    pub fn backward<T: Element, M: DevicePtr<u32>, DY: DevicePtr<T>, DX: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        mask: &M,
        dy: &DY,
        dx: &mut DX,
    ) -> Result<()> {
        self.validate(
            stream,
            &[("dy", dy.len(), dy.stream()), ("dx", dx.len(), dx.stream())],
            Some((mask.len(), mask.stream())),
        )?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (dyp, _gdy) = dy.device_ptr(stream);
        let (dxp, _gdx) = dx.device_ptr_mut(stream);
        // SAFETY: validated; dy and dx are distinct cudarc buffers (a shared and a mutable borrow).
        unsafe { self.launch_backward::<T>(stream, mp, dyp, dxp) }
    }

    /// Backward regenerating the decisions from the forward's `rng`: the forward's arithmetic on `dy`.
    pub fn backward_maskless<T: Element, DY: DevicePtr<T>, DX: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        dy: &DY,
        dx: &mut DX,
    ) -> Result<()> {
        self.forward_out(stream, rng, ("dy", dy), ("dx", dx), None)
    }

    /// In place backward from a stored mask.
    pub fn backward_inplace<T: Element, M: DevicePtr<u32>, G: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        mask: &M,
        grad: &mut G,
    ) -> Result<()> {
        self.validate(
            stream,
            &[("grad", grad.len(), grad.stream())],
            Some((mask.len(), mask.stream())),
        )?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (gp, _gg) = grad.device_ptr_mut(stream);
        // SAFETY: validated; in place (each element is read, then written, by the same thread).
        unsafe { self.launch_backward::<T>(stream, mp, gp, gp) }
    }

    /// In place backward regenerating the decisions from `rng`.
    pub fn backward_maskless_inplace<T: Element, G: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        grad: &mut G,
    ) -> Result<()> {
        self.forward_in_place(stream, rng, ("grad", grad), None)
    }

    /// The forward kernel out of place, with or without the mask: [`Self::forward`],
    /// [`Self::forward_maskless`] and [`Self::backward_maskless`] (the forward's arithmetic on
    /// `dy`), whose buffers are named as their arguments (`x`/`y` or `dy`/`dx`).
    fn forward_out<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        (x_name, x): (&'static str, &X),
        (y_name, y): (&'static str, &mut Y),
        mask: Option<&mut dyn DevicePtrMut<u32>>,
    ) -> Result<()> {
        self.validate(
            stream,
            &[(x_name, x.len(), x.stream()), (y_name, y.len(), y.stream())],
            mask.as_deref().map(|m| (m.len(), &**m.stream())),
        )?;
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (mp, _gm) = opt_ptr_mut(mask, stream);
        // SAFETY: validated; x and y are distinct cudarc buffers (a shared and a mutable borrow),
        // the mask (if any) a third.
        unsafe { self.launch_forward::<T>(stream, rng.source(), xp, yp, mp) }
    }

    /// The forward kernel in place, with or without the mask: [`Self::forward_inplace`],
    /// [`Self::forward_maskless_inplace`] and [`Self::backward_maskless_inplace`] (`x` or `grad`).
    fn forward_in_place<T: Element, X: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        (x_name, x): (&'static str, &mut X),
        mask: Option<&mut dyn DevicePtrMut<u32>>,
    ) -> Result<()> {
        self.validate(
            stream,
            &[(x_name, x.len(), x.stream())],
            mask.as_deref().map(|m| (m.len(), &**m.stream())),
        )?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (mp, _gm) = opt_ptr_mut(mask, stream);
        // SAFETY: validated; in place (each element is read, then written, by the same thread).
        unsafe { self.launch_forward::<T>(stream, rng.source(), xp, xp, mp) }
    }

    /// Checks `rng`'s context (the device state's guard lives until the launch is enqueued).
    ///
    /// # Safety
    /// Validated pointers of the stream's context, kept alive by the caller's guards; `y` equals
    /// `x` or does not overlap it; `mask` is 0 (none) or `mask_words()` words.
    unsafe fn launch_forward<T: Element>(
        &self,
        stream: &CudaStream,
        rng: Source<'_>,
        x: CUdeviceptr,
        y: CUdeviceptr,
        mask: CUdeviceptr,
    ) -> Result<()> {
        let (params, _gr) = self.drop.bind_params(self.decision_offset, &rng, stream)?;
        let status = ffi::dropfuse_structured_forward(
            crate::dropout::raw::dtype(T::DTYPE),
            x as *const c_void,
            y as *mut c_void,
            if mask == 0 {
                std::ptr::null_mut()
            } else {
                mask as *mut u32
            },
            &self.desc,
            &params,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_structured_forward")?;
        after(stream)
    }

    /// # Safety
    /// As [`Self::launch_forward`], with a mask.
    unsafe fn launch_backward<T: Element>(
        &self,
        stream: &CudaStream,
        mask: CUdeviceptr,
        dy: CUdeviceptr,
        dx: CUdeviceptr,
    ) -> Result<()> {
        let status = ffi::dropfuse_structured_backward(
            crate::dropout::raw::dtype(T::DTYPE),
            dy as *const c_void,
            dx as *mut c_void,
            mask as *const u32,
            &self.desc,
            self.drop.scale(),
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_structured_backward")?;
        after(stream)
    }
}
