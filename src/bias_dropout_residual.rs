//! Fused bias + dropout + residual add: `y = residual + dropout(x + bias)`, the fusion transformer
//! stacks run after their attention and MLP blocks, forward (with a bit mask or mask-free) and
//! backward (`dx` and the bias gradient; the residual's gradient is `dy` itself).
//!
//! ```no_run
//! use dropfuse::bias_dropout_residual::{BiasDropoutResidual, BiasGrad};
//! use dropfuse::{Device, Generator};
//! use half::bf16;
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let (rows, h) = (4096, 1024);
//! let x = dev.upload(&vec![bf16::from_f32(1.0); rows * h])?; // the block's output
//! let bias = dev.upload(&vec![bf16::from_f32(0.5); h])?;
//! let mut residual = dev.upload(&vec![bf16::from_f32(2.0); rows * h])?;
//! let mut mask = dev.zeros::<u32>(dropfuse::dropout::mask_words(rows * h))?;
//! let op = BiasDropoutResidual::new(0.1, h)?;
//! let state = Generator::new(7).next();
//! // residual += dropout(x + bias), in place, keeping the mask for the backward
//! op.forward_inplace(dev.stream(), state, &x, Some(&bias), &mut residual, &mut mask)?;
//! let dy = dev.upload(&vec![bf16::from_f32(1.0); rows * h])?;
//! let mut dx = dev.zeros::<bf16>(rows * h)?;
//! let mut dbias = dev.zeros::<bf16>(h)?;
//! let mut workspace = dev.zeros::<f32>(op.workspace_len(rows))?;
//! let grad = BiasGrad { dbias: &mut dbias, workspace: &mut workspace };
//! op.backward(dev.stream(), &mask, &dy, &mut dx, Some(grad))?;
//! # Ok(()) }
//! ```
//!
//! The contract (bit for bit; [`crate::reference::bias_dropout_residual`] is the oracle):
//! element `i` of the `rows x H` tensors is dropout's global element `element_offset + i`, kept
//! iff its Philox word is `>= threshold`, with dropout's scale and bit-packed mask (a mask written
//! here works with [`Dropout`]'s backward). In `f32` without fused multiply-adds:
//! `t = x + bias[i % H]` (no add without a bias), `u = keep ? scale * t : +0`,
//! `y = round(residual + u)`; so dropped elements are the residual (a `-0` residual becomes `+0`).
//! Backward: `dx = keep ? round(scale * dy) : +0`; `dbias[j]` sums the `f32` terms
//! `keep ? scale * dy : +0` over rows in 256-row chunks, in a fixed order (deterministic), and
//! rounds once.
//!
//! The random calls take any [`Randomness`]: a [`PhiloxState`] fixed at launch, or a
//! [`DevicePhilox`](crate::DevicePhilox) (`&state` or `state.at(add)`) read when the kernels run,
//! so that a captured CUDA graph draws fresh masks on each replay ([`crate::rng`]).
//!
//! Every call validates its arguments first (row length, lengths, contexts, offsets) and returns
//! [`Error::InvalidArgument`] without writing anything when they are wrong. The optional bias and
//! bias gradient are passed as trait objects (`Some(&bias)` with any cudarc slice or view), so
//! that `None` needs no type annotation.

use std::ffi::c_void;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use crate::dropout::{
    after, bind, check_mask_len, check_same_len, check_stream, opt_ptr, opt_ptr_mut, Dropout,
};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::rng::{PhiloxState, Randomness, Source};

/// Rows per partial sum of the bias gradient (the contract's reduction order).
pub const DBIAS_CHUNK: usize = ffi::DROPFUSE_BDR_DBIAS_CHUNK as usize;

/// The largest row length, `2^31`.
pub const MAX_ROW_LEN: usize = 1 << 31;

/// The bias gradient of a backward call and the scratch space its reduction needs.
pub struct BiasGrad<'a, T> {
    /// `H` elements, written.
    pub dbias: &'a mut dyn DevicePtrMut<T>,
    /// At least [`BiasDropoutResidual::workspace_len`]`(rows)` floats of scratch (contents
    /// overwritten; reusable across calls on the same stream).
    pub workspace: &'a mut dyn DevicePtrMut<f32>,
}

/// A validated configuration: the dropout (probability, threshold, scale, element offset) and the
/// row length `H` (the bias's length).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BiasDropoutResidual {
    drop: Dropout,
    row_len: usize,
}

impl BiasDropoutResidual {
    /// Drop probability `p` (finite, in `[0, 1]`) and row length `row_len` (`1 ..= 2^31`).
    pub fn new(p: f64, row_len: usize) -> Result<Self> {
        let drop = Dropout::new(p)?;
        if row_len == 0 || row_len > MAX_ROW_LEN {
            return Err(Error::invalid("row_len", "a row length in 1 ..= 2^31", row_len));
        }
        Ok(BiasDropoutResidual { drop, row_len })
    }

    /// The same op on a slice whose first element is element `element_offset` of the whole tensor
    /// (tensor parallelism): its masks equal the matching part of the whole tensor's mask.
    pub fn with_element_offset(mut self, element_offset: u64) -> Self {
        self.drop = self.drop.with_element_offset(element_offset);
        self
    }

    /// The dropout part: probability, threshold, scale and element offset.
    pub fn dropout(&self) -> &Dropout {
        &self.drop
    }
    /// `H`, the row length and the bias's length.
    pub fn row_len(&self) -> usize {
        self.row_len
    }
    /// Floats of workspace the bias gradient of `rows` rows needs: `ceil(rows / 256) * H`.
    pub fn workspace_len(&self, rows: usize) -> usize {
        rows.div_ceil(DBIAS_CHUNK).saturating_mul(self.row_len)
    }

    /// Rows of a tensor of `n` elements (`first` names it); checks the element offset.
    fn rows(&self, n: usize, first: &'static str) -> Result<usize> {
        if n == 0 || n % self.row_len != 0 {
            return Err(Error::invalid(
                first,
                format!("a non-empty whole number of rows of {} elements", self.row_len),
                format!("{n} elements"),
            ));
        }
        if self.drop.element_offset().checked_add(n as u64).is_none() {
            return Err(Error::invalid(
                "element_offset",
                format!("element_offset + n <= 2^64 - 1 (n = {n})"),
                self.drop.element_offset(),
            ));
        }
        Ok(n / self.row_len)
    }

    // ---- forward ----

    /// `y = residual + dropout(x + bias)` and the bit mask (`mask_words(x.len())` words).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<
        T: Element,
        X: DevicePtr<T>,
        R: DevicePtr<T>,
        Y: DevicePtrMut<T>,
        M: DevicePtrMut<u32>,
        Rng: Randomness,
    >(
        &self,
        stream: &CudaStream,
        rng: Rng,
        x: &X,
        residual: &R,
        bias: Option<&dyn DevicePtr<T>>,
        y: &mut Y,
        mask: &mut M,
    ) -> Result<()> {
        self.forward_out(stream, rng, x, residual, bias, y, Some(mask))
    }

    /// `y = residual + dropout(x + bias)` without a mask: the backward regenerates it from `rng`.
    pub fn forward_maskless<
        T: Element,
        X: DevicePtr<T>,
        R: DevicePtr<T>,
        Y: DevicePtrMut<T>,
        Rng: Randomness,
    >(
        &self,
        stream: &CudaStream,
        rng: Rng,
        x: &X,
        residual: &R,
        bias: Option<&dyn DevicePtr<T>>,
        y: &mut Y,
    ) -> Result<()> {
        self.forward_out(stream, rng, x, residual, bias, y, None)
    }

    /// In place on the residual stream: `residual += dropout(x + bias)`, and the bit mask.
    pub fn forward_inplace<
        T: Element,
        X: DevicePtr<T>,
        R: DevicePtrMut<T>,
        M: DevicePtrMut<u32>,
        Rng: Randomness,
    >(
        &self,
        stream: &CudaStream,
        rng: Rng,
        x: &X,
        bias: Option<&dyn DevicePtr<T>>,
        residual: &mut R,
        mask: &mut M,
    ) -> Result<()> {
        self.forward_in_place(stream, rng, x, bias, residual, Some(mask))
    }

    /// In place on the residual stream, no mask stored.
    pub fn forward_maskless_inplace<T: Element, X: DevicePtr<T>, R: DevicePtrMut<T>, Rng: Randomness>(
        &self,
        stream: &CudaStream,
        rng: Rng,
        x: &X,
        bias: Option<&dyn DevicePtr<T>>,
        residual: &mut R,
    ) -> Result<()> {
        self.forward_in_place(stream, rng, x, bias, residual, None)
    }

    /// [`Self::forward`] and [`Self::forward_maskless`]: the same validation and launch, the mask
    /// optional.
    #[allow(clippy::too_many_arguments)]
    fn forward_out<T: Element, X: DevicePtr<T>, R: DevicePtr<T>, Y: DevicePtrMut<T>, Rng: Randomness>(
        &self,
        stream: &CudaStream,
        rng: Rng,
        x: &X,
        residual: &R,
        bias: Option<&dyn DevicePtr<T>>,
        y: &mut Y,
        mask: Option<&mut dyn DevicePtrMut<u32>>,
    ) -> Result<()> {
        let rows = self.validate_forward(
            stream,
            x,
            bias,
            &[
                ("residual", residual.len(), residual.stream()),
                ("y", y.len(), y.stream()),
            ],
            mask.as_deref().map(|m| (m.len(), &**m.stream())),
        )?;
        let (xp, _gx) = x.device_ptr(stream);
        let (rp, _gr) = residual.device_ptr(stream);
        let (bp, _gb) = opt_ptr(bias, stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (mp, _gm) = opt_ptr_mut(mask, stream);
        // SAFETY: validated; y (and the mask, if any) are buffers distinct from x, residual and
        // bias (a mutable borrow cannot alias a shared one); the guards keep every buffer alive
        // and ordered on `stream`.
        unsafe { self.launch_forward::<T>(stream, rng.source(), xp, rp, bp, yp, mp, rows) }
    }

    /// [`Self::forward_inplace`] and [`Self::forward_maskless_inplace`]: the same validation and
    /// launch, the mask optional.
    fn forward_in_place<T: Element, X: DevicePtr<T>, R: DevicePtrMut<T>, Rng: Randomness>(
        &self,
        stream: &CudaStream,
        rng: Rng,
        x: &X,
        bias: Option<&dyn DevicePtr<T>>,
        residual: &mut R,
        mask: Option<&mut dyn DevicePtrMut<u32>>,
    ) -> Result<()> {
        let rows = self.validate_forward(
            stream,
            x,
            bias,
            &[("residual", residual.len(), residual.stream())],
            mask.as_deref().map(|m| (m.len(), &**m.stream())),
        )?;
        let (xp, _gx) = x.device_ptr(stream);
        let (bp, _gb) = opt_ptr(bias, stream);
        let (rp, _gr) = residual.device_ptr_mut(stream);
        let (mp, _gm) = opt_ptr_mut(mask, stream);
        // SAFETY: as in `forward_out`; the residual is input and output (each element is read,
        // then written, by the same thread).
        unsafe { self.launch_forward::<T>(stream, rng.source(), xp, rp, bp, rp, mp, rows) }
    }

    // ---- backward ----

    /// Backward from the forward's mask: `dx`, and the bias gradient when `bias_grad` is given.
    /// The residual's gradient is `dy` itself.
    pub fn backward<T: Element, M: DevicePtr<u32>, DY: DevicePtr<T>, DX: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        mask: &M,
        dy: &DY,
        dx: &mut DX,
        bias_grad: Option<BiasGrad<'_, T>>,
    ) -> Result<()> {
        let rows = self.validate_backward(
            stream,
            dy,
            &[("dx", dx.len(), dx.stream())],
            Some((mask.len(), mask.stream())),
            &bias_grad,
        )?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (dyp, _gdy) = dy.device_ptr(stream);
        let (dxp, _gdx) = dx.device_ptr_mut(stream);
        self.launch_backward_grad(
            stream,
            Source::Host(PhiloxState::new(0, 0)),
            mp,
            dyp,
            dxp,
            bias_grad,
            rows,
        )
    }

    /// Backward regenerating the keep decisions from the forward's `rng` (and element offset).
    pub fn backward_maskless<T: Element, DY: DevicePtr<T>, DX: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        dy: &DY,
        dx: &mut DX,
        bias_grad: Option<BiasGrad<'_, T>>,
    ) -> Result<()> {
        let rows = self.validate_backward(stream, dy, &[("dx", dx.len(), dx.stream())], None, &bias_grad)?;
        let (dyp, _gdy) = dy.device_ptr(stream);
        let (dxp, _gdx) = dx.device_ptr_mut(stream);
        self.launch_backward_grad(stream, rng.source(), NULL, dyp, dxp, bias_grad, rows)
    }

    /// In place backward from a mask: `grad` goes in as `dy` and comes out as `dx`.
    pub fn backward_inplace<T: Element, M: DevicePtr<u32>, G: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        mask: &M,
        grad: &mut G,
        bias_grad: Option<BiasGrad<'_, T>>,
    ) -> Result<()> {
        let rows =
            self.validate_backward(stream, &*grad, &[], Some((mask.len(), mask.stream())), &bias_grad)?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (gp, _gg) = grad.device_ptr_mut(stream);
        self.launch_backward_grad(
            stream,
            Source::Host(PhiloxState::new(0, 0)),
            mp,
            gp,
            gp,
            bias_grad,
            rows,
        )
    }

    /// In place backward regenerating the keep decisions from `rng`.
    pub fn backward_maskless_inplace<T: Element, G: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        grad: &mut G,
        bias_grad: Option<BiasGrad<'_, T>>,
    ) -> Result<()> {
        let rows = self.validate_backward(stream, &*grad, &[], None, &bias_grad)?;
        let (gp, _gg) = grad.device_ptr_mut(stream);
        self.launch_backward_grad(stream, rng.source(), NULL, gp, gp, bias_grad, rows)
    }

    // ---- validation and launches ----

    /// Validates a forward call: x (whole rows), the element offset, the bias's length, every
    /// other buffer's length, the mask's; then every context; binds the stream's context.
    fn validate_forward<T, X: DeviceSlice<T>>(
        &self,
        stream: &CudaStream,
        x: &X,
        bias: Option<&dyn DevicePtr<T>>,
        data: &[(&'static str, usize, &CudaStream)],
        mask: Option<(usize, &CudaStream)>,
    ) -> Result<usize> {
        let n = x.len();
        let rows = self.rows(n, "x")?;
        for &(name, len, _) in data {
            check_same_len(len, n, name)?;
        }
        if let Some(b) = bias {
            check_bias_len(b.len(), self.row_len, "bias")?;
        }
        if let Some((len, _)) = mask {
            check_mask_len(len, n)?;
        }
        check_stream(stream, x.stream(), "x")?;
        for &(name, _, s) in data {
            check_stream(stream, s, name)?;
        }
        if let Some(b) = bias {
            check_stream(stream, b.stream(), "bias")?;
        }
        if let Some((_, s)) = mask {
            check_stream(stream, s, "mask")?;
        }
        bind(stream)?;
        Ok(rows)
    }

    /// Validates a backward call: dy (whole rows), the element offset, dx's and the mask's lengths,
    /// dbias (`H`) and the workspace (`>= workspace_len(rows)`); then every context.
    fn validate_backward<T, DY: DeviceSlice<T> + ?Sized>(
        &self,
        stream: &CudaStream,
        dy: &DY,
        data: &[(&'static str, usize, &CudaStream)],
        mask: Option<(usize, &CudaStream)>,
        bias_grad: &Option<BiasGrad<'_, T>>,
    ) -> Result<usize> {
        let n = dy.len();
        let rows = self.rows(n, "dy")?;
        for &(name, len, _) in data {
            check_same_len(len, n, name)?;
        }
        if let Some((len, _)) = mask {
            check_mask_len(len, n)?;
        }
        if let Some(g) = bias_grad {
            check_bias_len(g.dbias.len(), self.row_len, "dbias")?;
            let want = self.workspace_len(rows);
            if g.workspace.len() < want {
                return Err(Error::invalid(
                    "workspace",
                    format!(
                        "at least {want} floats (ceil({rows} / {DBIAS_CHUNK}) * {})",
                        self.row_len
                    ),
                    format!("{} floats", g.workspace.len()),
                ));
            }
        }
        check_stream(stream, dy.stream(), "dy")?;
        for &(name, _, s) in data {
            check_stream(stream, s, name)?;
        }
        if let Some((_, s)) = mask {
            check_stream(stream, s, "mask")?;
        }
        if let Some(g) = bias_grad {
            check_stream(stream, g.dbias.stream(), "dbias")?;
            check_stream(stream, g.workspace.stream(), "workspace")?;
        }
        bind(stream)?;
        Ok(rows)
    }

    /// Checks `rng`'s context (the device state's guard lives until the launch is enqueued).
    ///
    /// # Safety
    /// Validated device pointers of the stream's context (`bias` and `mask` may be [`NULL`]),
    /// alive until the enqueued work has run; `y` is `residual` (in place) or does not overlap
    /// the inputs.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_forward<T: Element>(
        &self,
        stream: &CudaStream,
        rng: Source<'_>,
        x: CUdeviceptr,
        residual: CUdeviceptr,
        bias: CUdeviceptr,
        y: CUdeviceptr,
        mask: CUdeviceptr,
        rows: usize,
    ) -> Result<()> {
        let (params, _gr) = self.drop.bind_params(self.drop.element_offset(), &rng, stream)?;
        let status = ffi::dropfuse_bias_dropout_residual_forward(
            crate::dropout::raw::dtype(T::DTYPE),
            x as *const c_void,
            residual as *const c_void,
            bias as *const c_void,
            y as *mut c_void,
            mask as *mut u32,
            rows as u64,
            self.row_len as u64,
            &params,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_bias_dropout_residual_forward")?;
        after(stream)
    }

    /// Takes the bias gradient's pointers and `rng`'s (checked here; their guards live until the
    /// launch is enqueued) and launches the backward on validated pointers (`mask` may be
    /// [`NULL`]: regenerate).
    #[allow(clippy::too_many_arguments)]
    fn launch_backward_grad<T: Element>(
        &self,
        stream: &CudaStream,
        rng: Source<'_>,
        mask: CUdeviceptr,
        dy: CUdeviceptr,
        dx: CUdeviceptr,
        bias_grad: Option<BiasGrad<'_, T>>,
        rows: usize,
    ) -> Result<()> {
        let (params, _gr) = self.drop.bind_params(self.drop.element_offset(), &rng, stream)?;
        let launch = |dbias: CUdeviceptr, workspace: CUdeviceptr| {
            // SAFETY: every pointer was validated (lengths, contexts) by the caller and is kept
            // alive by its guard until after this call; dx is dy (in place) or a distinct buffer;
            // dbias and the workspace are distinct mutable borrows.
            let status = unsafe {
                ffi::dropfuse_bias_dropout_residual_backward(
                    crate::dropout::raw::dtype(T::DTYPE),
                    dy as *const c_void,
                    dx as *mut c_void,
                    mask as *const u32,
                    dbias as *mut c_void,
                    workspace as *mut f32,
                    rows as u64,
                    self.row_len as u64,
                    &params,
                    stream.cu_stream() as ffi::dropfuse_stream_t,
                )
            };
            ffi::check(status, "dropfuse_bias_dropout_residual_backward")
        };
        match bias_grad {
            Some(g) => {
                let (bp, _gb) = g.dbias.device_ptr_mut(stream);
                let (wp, _gw) = g.workspace.device_ptr_mut(stream);
                launch(bp, wp)?;
            }
            None => launch(NULL, NULL)?,
        }
        after(stream)
    }
}

/// No pointer (no bias, no mask, no bias gradient).
const NULL: CUdeviceptr = 0;

fn check_bias_len(got: usize, row_len: usize, name: &'static str) -> Result<()> {
    if got != row_len {
        return Err(Error::invalid(
            name,
            format!("{row_len} elements (the row length)"),
            format!("{got} elements"),
        ));
    }
    Ok(())
}
