//! Compute skipping on the GPU: the fused stochastic-depth residual and per-sample compaction
//! (issue 6, sections 2 and 3).
//!
//! The contract is the CPU reference's, [`crate::reference::skip`], points 1-6 and 12, and the
//! kernels match it bit for bit:
//!
//! * [`stochastic_depth_in_place`] / [`stochastic_depth`]: `out = round_T(x + s * (f + bias[j % P]))`
//!   for kept samples (every step one `f32` operation, never an FMA), `out = x` bit for bit for
//!   dropped ones, whose branch is never read. [`stochastic_depth_backward`] writes
//!   `d_branch = round_T(s * d_out)` (`+0` for dropped samples) and
//!   [`stochastic_depth_backward_bias`] also `d_bias`, summed in the fixed chunked order of point 4
//!   ([`D_BIAS_CHUNK`] terms per partial sum; partials in a caller-provided workspace of
//!   [`stochastic_depth_workspace_len`] `f32`, then added in ascending order): reproducible run to
//!   run and equal to the reference. The residual's gradient is `d_out` itself.
//! * Keep decisions ([`Keep`]) are one flag for the batch (on the host, or on the device so that a
//!   captured CUDA graph can be replayed with new decisions) or one `u8` flag per sample on the
//!   device (`0` = dropped), e.g. a [`SampleDropPlan`](crate::layer_plan::SampleDropPlan)'s
//!   `layer_keep(l)` uploaded with [`keep_flags`].
//! * Per-sample compaction: [`SampleSlots`] holds the slots and the count of a batch's kept samples,
//!   computed on the device by an exclusive scan of the flags ([`SampleSlots::compute`]). The
//!   gathers write into a pre-sized compact buffer whose capacity (its rows) may exceed the count
//!   (e.g. `B`, or the count of a host-side plan), so no host synchronisation is needed; a kept
//!   sample whose slot is `>= capacity` is left entirely alone (none of its rows is read or
//!   written) and the true count stays in [`SampleSlots`]: [`SampleSlots::check_capacity`] (one
//!   device read) then raises the reference's `capacity` error, and [`gather_samples_checked`]
//!   reads the count first, so that nothing is written on that error.
//!
//! Validation follows point 12 with the same argument names (`row_len`, `residual`, `branch`,
//! `bias`, `keep`, `scale`, `x`, `out`, `compact`, `d_out`, `d_x`, `d_compact`, `capacity`), plus
//! the GPU-only `d_branch`, `d_bias`, `workspace` and `slots`, and each buffer's context; every
//! check runs before anything is launched or written.
//!
//! ```no_run
//! use dropfuse::skip::{self, Keep, SampleSlots};
//! use dropfuse::Device;
//! use half::bf16;
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let s = dev.stream();
//! let (batch, row_len) = (4usize, 1024usize);
//! let mut residual = dev.zeros::<bf16>(batch * row_len)?;
//! let branch = dev.zeros::<bf16>(batch * row_len)?;
//! let keep = dev.upload(&skip::keep_flags(&[true, false, true, true]))?;
//! let scale = dropfuse::reference::skip::depth_scale(0.25, true)?;
//! skip::stochastic_depth_in_place(s, &mut residual, &branch, None, row_len, Keep::PerSample(&keep), scale)?;
//!
//! // Run a layer on the kept samples only: compact, compute, scatter back.
//! let slots = SampleSlots::from_keep(s, &keep)?;
//! let mut compact = dev.zeros::<bf16>(batch * row_len)?; // capacity B: no count read needed
//! skip::gather_samples(s, &slots, &residual, row_len, &mut compact)?;
//! // ... the layer writes its output into `compact` ...
//! skip::scatter_add_samples(s, &slots, &mut residual, &compact, row_len, scale)?;
//! # Ok(()) }
//! ```

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use crate::checks::{check_len, check_rows, compact_rows};
use crate::dropout::{after, bind, check_stream};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;

pub use crate::reference::skip::D_BIAS_CHUNK;

/// The slot of a skipped sample in [`SampleSlots::slots`].
pub const SLOT_NONE: u32 = ffi::DROPFUSE_SLOT_NONE;

/// Keep flags as the kernels read them: `1` for kept, `0` for dropped samples.
pub fn keep_flags(keep: &[bool]) -> Vec<u8> {
    keep.iter().map(|&k| u8::from(k)).collect()
}

/// Which samples keep their residual branch (contract point 2).
#[derive(Clone, Copy)]
pub enum Keep<'a> {
    /// One decision for the whole batch, known on the host (fairseq LayerDrop's batch mode).
    Batch(bool),
    /// One decision for the whole batch read on the device from one `u8` (`0` = dropped), so that
    /// a captured CUDA graph replays with whatever the buffer holds.
    BatchOnDevice(&'a dyn DevicePtr<u8>),
    /// One `u8` flag per sample on the device (`0` = dropped; stochastic depth's row mode).
    PerSample(&'a dyn DevicePtr<u8>),
}

impl std::fmt::Debug for Keep<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::Batch(k) => write!(f, "Batch({k})"),
            Keep::BatchOnDevice(b) => write!(f, "BatchOnDevice({} flag(s))", b.len()),
            Keep::PerSample(b) => write!(f, "PerSample({} flags)", b.len()),
        }
    }
}

impl Keep<'_> {
    /// Error `keep` unless the flags fit a batch of `batch` samples.
    fn check(&self, batch: usize) -> Result<()> {
        match *self {
            Keep::Batch(_) => Ok(()),
            Keep::BatchOnDevice(f) if f.len() != 1 => Err(Error::invalid(
                "keep",
                "1 flag (one decision for the batch)",
                format!("{} flags", f.len()),
            )),
            Keep::PerSample(f) if f.len() != batch => Err(Error::invalid(
                "keep",
                format!("{batch} flags (one per sample)"),
                format!("{} flags", f.len()),
            )),
            _ => Ok(()),
        }
    }

    fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        match *self {
            Keep::Batch(_) => Ok(()),
            Keep::BatchOnDevice(f) | Keep::PerSample(f) => check_stream(stream, f.stream(), "keep"),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Validation (the reference's names and order)

fn check_row_len(row_len: usize) -> Result<()> {
    if row_len == 0 {
        Err(Error::invalid("row_len", "at least 1", 0))
    } else {
        Ok(())
    }
}

/// Rows of a non-empty tensor of whole rows.
fn count_rows(name: &'static str, len: usize, row_len: usize) -> Result<usize> {
    if len == 0 || len % row_len != 0 {
        Err(Error::invalid(
            name,
            format!("a non-empty whole number of rows of {row_len} elements"),
            format!("{len} elements"),
        ))
    } else {
        Ok(len / row_len)
    }
}

fn check_bias(len: usize, row_len: usize) -> Result<()> {
    if len == 0 || row_len % len != 0 {
        Err(Error::invalid(
            "bias",
            format!("a non-zero number of elements dividing the row length {row_len}"),
            format!("{len} elements"),
        ))
    } else {
        Ok(())
    }
}

fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() && scale >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid("scale", "a finite value >= 0", scale))
    }
}

/// The capacity check of contract point 5: error `capacity` when `capacity < count`.
pub fn check_capacity(count: usize, capacity: usize) -> Result<()> {
    if capacity < count {
        Err(Error::invalid(
            "capacity",
            format!("a buffer of at least {count} rows (capacity >= count)"),
            format!("{capacity} rows"),
        ))
    } else {
        Ok(())
    }
}

fn dtype<T: Element>() -> ffi::dropfuse_dtype {
    crate::dropout::raw::dtype(T::DTYPE)
}

fn cu(stream: &CudaStream) -> ffi::dropfuse_stream_t {
    stream.cu_stream() as ffi::dropfuse_stream_t
}

/// The keep argument of the launchers, with the guard that keeps a device flag buffer ordered on
/// `stream` (dropped after the launch).
fn keep_arg<'a>(
    keep: &Keep<'a>,
    stream: &'a CudaStream,
) -> (ffi::dropfuse_sample_keep, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match *keep {
        Keep::Batch(k) => (
            ffi::dropfuse_sample_keep {
                flags: std::ptr::null(),
                stride: 0,
                all: i32::from(k),
            },
            None,
        ),
        Keep::BatchOnDevice(f) | Keep::PerSample(f) => {
            let (p, guard) = f.device_ptr(stream);
            let stride = u64::from(matches!(keep, Keep::PerSample(_)));
            (
                ffi::dropfuse_sample_keep {
                    flags: p as *const u8,
                    stride,
                    all: 0,
                },
                Some(guard),
            )
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Stochastic depth

/// Validates a forward call; returns `B`.
#[allow(clippy::too_many_arguments)]
fn validate_depth(
    stream: &CudaStream,
    residual: (usize, &CudaStream),
    branch: (usize, &CudaStream),
    bias: Option<(usize, &CudaStream)>,
    out: Option<(usize, &CudaStream)>,
    row_len: usize,
    keep: &Keep<'_>,
    scale: f32,
) -> Result<usize> {
    check_row_len(row_len)?;
    let batch = count_rows("residual", residual.0, row_len)?;
    check_len("branch", branch.0, residual.0, "the residual's shape")?;
    if let Some((len, _)) = bias {
        check_bias(len, row_len)?;
    }
    keep.check(batch)?;
    check_scale(scale)?;
    if let Some((len, _)) = out {
        check_len("out", len, residual.0, "the residual's shape")?;
    }
    check_stream(stream, residual.1, "residual")?;
    check_stream(stream, branch.1, "branch")?;
    if let Some((_, s)) = bias {
        check_stream(stream, s, "bias")?;
    }
    keep.check_stream(stream)?;
    if let Some((_, s)) = out {
        check_stream(stream, s, "out")?;
    }
    bind(stream)?;
    Ok(batch)
}

/// Fused stochastic-depth residual in place (contract point 2): for kept samples
/// `residual = round_T(residual + scale * (branch + bias[j % P]))` (each step one `f32` operation);
/// dropped samples are not touched and their branch is not read. `residual` and `branch` are
/// `B x row_len`; `bias` (optional) has `P` elements, `P` dividing `row_len`.
///
/// Errors: `row_len`, `residual`, `branch`, `bias`, `keep`, `scale`, or a buffer of another
/// context; nothing is written on error.
pub fn stochastic_depth_in_place<T: Element, R: DevicePtrMut<T>, F: DevicePtr<T>>(
    stream: &CudaStream,
    residual: &mut R,
    branch: &F,
    bias: Option<&dyn DevicePtr<T>>,
    row_len: usize,
    keep: Keep<'_>,
    scale: f32,
) -> Result<()> {
    let batch = validate_depth(
        stream,
        (residual.len(), residual.stream()),
        (branch.len(), branch.stream()),
        bias.map(|b| (b.len(), &**b.stream())),
        None,
        row_len,
        &keep,
        scale,
    )?;
    let (rp, _gr) = residual.device_ptr_mut(stream);
    let (fp, _gf) = branch.device_ptr(stream);
    // SAFETY: validated lengths and contexts; residual is input and output (each element is read
    // and then written by the same thread); branch and bias are other buffers (a shared and a
    // mutable borrow cannot alias); the guards keep every buffer alive and ordered on `stream`.
    unsafe { launch_forward::<T>(stream, rp, fp, bias, rp, batch, row_len, &keep, scale) }
}

/// [`stochastic_depth_in_place`] out of place: `out = residual + ...` for kept samples and a copy
/// of the residual for dropped ones (whose branch is not read).
///
/// Errors: as [`stochastic_depth_in_place`], and `out` (not the residual's length).
#[allow(clippy::too_many_arguments)]
pub fn stochastic_depth<T: Element, R: DevicePtr<T>, F: DevicePtr<T>, O: DevicePtrMut<T>>(
    stream: &CudaStream,
    residual: &R,
    branch: &F,
    bias: Option<&dyn DevicePtr<T>>,
    row_len: usize,
    keep: Keep<'_>,
    scale: f32,
    out: &mut O,
) -> Result<()> {
    let batch = validate_depth(
        stream,
        (residual.len(), residual.stream()),
        (branch.len(), branch.stream()),
        bias.map(|b| (b.len(), &**b.stream())),
        Some((out.len(), out.stream())),
        row_len,
        &keep,
        scale,
    )?;
    let (rp, _gr) = residual.device_ptr(stream);
    let (fp, _gf) = branch.device_ptr(stream);
    let (op, _go) = out.device_ptr_mut(stream);
    // SAFETY: as in `stochastic_depth_in_place`; `out` is a mutable borrow, so it overlaps none
    // of the inputs.
    unsafe { launch_forward::<T>(stream, rp, fp, bias, op, batch, row_len, &keep, scale) }
}

/// The forward launch shared by [`stochastic_depth_in_place`] (`out == residual`) and
/// [`stochastic_depth`], on validated pointers.
///
/// # Safety
/// The arguments passed validation; `residual`, `branch` and `out` are device pointers of the
/// stream's context kept alive by the caller's guards, `out` is `residual` or overlaps nothing.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_forward<T: Element>(
    stream: &CudaStream,
    residual: CUdeviceptr,
    branch: CUdeviceptr,
    bias: Option<&dyn DevicePtr<T>>,
    out: CUdeviceptr,
    batch: usize,
    row_len: usize,
    keep: &Keep<'_>,
    scale: f32,
) -> Result<()> {
    let bias_guard = bias.map(|b| b.device_ptr(stream));
    let (bp, bias_len) = match (&bias_guard, bias) {
        (Some((p, _)), Some(b)) => (*p, b.len()),
        _ => (0, 0),
    };
    let (k, _gk) = keep_arg(keep, stream);
    let status = ffi::dropfuse_stochastic_depth_forward(
        dtype::<T>(),
        residual as *const c_void,
        branch as *const c_void,
        bp as *const c_void,
        out as *mut c_void,
        batch as u64,
        row_len as u64,
        bias_len as u64,
        &k,
        scale,
        cu(stream),
    );
    ffi::check(status, "dropfuse_stochastic_depth_forward")?;
    after(stream)
}

/// `f32` elements of the workspace of [`stochastic_depth_backward_bias`] for a `batch x row_len`
/// gradient and a bias of `bias_len` elements: one partial sum per bias element and chunk of
/// [`D_BIAS_CHUNK`] terms, `ceil(batch * (row_len / bias_len) / 256) * bias_len` (about
/// `batch * row_len / 256`).
///
/// Errors: `row_len`, `bias`, `batch` (a length over `usize`).
pub fn stochastic_depth_workspace_len(batch: usize, row_len: usize, bias_len: usize) -> Result<usize> {
    check_row_len(row_len)?;
    check_bias(bias_len, row_len)?;
    batch
        .checked_mul(row_len / bias_len)
        .and_then(|terms| terms.div_ceil(D_BIAS_CHUNK).checked_mul(bias_len))
        .ok_or_else(|| {
            Error::invalid(
                "batch",
                format!("a workspace length that fits in usize (row_len {row_len}, bias {bias_len})"),
                batch,
            )
        })
}

/// Validates a backward call; returns `B`.
fn validate_backward(
    stream: &CudaStream,
    d_out: (usize, &CudaStream),
    d_branch: (usize, &CudaStream),
    bias: Option<(usize, &CudaStream, usize, &CudaStream)>,
    row_len: usize,
    keep: &Keep<'_>,
    scale: f32,
) -> Result<usize> {
    check_row_len(row_len)?;
    let batch = count_rows("d_out", d_out.0, row_len)?;
    if let Some((len, ..)) = bias {
        check_bias(len, row_len)?;
    }
    keep.check(batch)?;
    check_scale(scale)?;
    check_len("d_branch", d_branch.0, d_out.0, "d_out's shape")?;
    if let Some((p, _, ws, _)) = bias {
        let want = stochastic_depth_workspace_len(batch, row_len, p)?;
        if ws < want {
            return Err(Error::invalid(
                "workspace",
                format!("at least {want} f32 (stochastic_depth_workspace_len)"),
                format!("{ws} f32"),
            ));
        }
    }
    check_stream(stream, d_out.1, "d_out")?;
    check_stream(stream, d_branch.1, "d_branch")?;
    if let Some((_, bs, _, ws)) = bias {
        check_stream(stream, bs, "d_bias")?;
        check_stream(stream, ws, "workspace")?;
    }
    keep.check_stream(stream)?;
    bind(stream)?;
    Ok(batch)
}

/// Backward of the stochastic-depth residual without a bias (contract point 3):
/// `d_branch = round_T(scale * d_out)` for kept samples, `+0` for dropped ones (whose `d_out` is
/// not read). The residual's gradient is `d_out` itself.
///
/// Errors: `row_len`, `d_out`, `keep`, `scale`, `d_branch` (not `d_out`'s length); nothing is
/// written on error.
pub fn stochastic_depth_backward<T: Element, D: DevicePtr<T>, DB: DevicePtrMut<T>>(
    stream: &CudaStream,
    d_out: &D,
    row_len: usize,
    keep: Keep<'_>,
    scale: f32,
    d_branch: &mut DB,
) -> Result<()> {
    let batch = validate_backward(
        stream,
        (d_out.len(), d_out.stream()),
        (d_branch.len(), d_branch.stream()),
        None,
        row_len,
        &keep,
        scale,
    )?;
    let (dp, _gd) = d_out.device_ptr(stream);
    let (bp, _gb) = d_branch.device_ptr_mut(stream);
    // SAFETY: validated lengths and contexts; d_branch is a mutable borrow, distinct from d_out;
    // no bias gradient (null d_bias and workspace, bias length 0).
    unsafe { launch_backward::<T>(stream, dp, bp, 0, 0, batch, row_len, 0, &keep, scale) }
}

/// [`stochastic_depth_backward`] and the bias gradient (contract points 3 and 4):
/// `d_bias[k] = round_T(scale * S_k)` with `S_k` the chunked sum over the kept rows' `d_out`
/// elements of bias element `k` (`P = d_bias.len()`, the forward's bias length). `workspace`
/// holds at least [`stochastic_depth_workspace_len`] `f32` (overwritten; keep one per stream and
/// shape for CUDA graphs). Reproducible: the same bits every run, equal to the reference.
///
/// Errors: `row_len`, `d_out`, `bias` (`d_bias`'s length: 0 or not dividing `row_len`), `keep`,
/// `scale`, `d_branch`, `workspace` (too short); nothing is written on error.
#[allow(clippy::too_many_arguments)]
pub fn stochastic_depth_backward_bias<
    T: Element,
    D: DevicePtr<T>,
    DB: DevicePtrMut<T>,
    DBias: DevicePtrMut<T>,
    W: DevicePtrMut<f32>,
>(
    stream: &CudaStream,
    d_out: &D,
    row_len: usize,
    keep: Keep<'_>,
    scale: f32,
    d_branch: &mut DB,
    d_bias: &mut DBias,
    workspace: &mut W,
) -> Result<()> {
    let batch = validate_backward(
        stream,
        (d_out.len(), d_out.stream()),
        (d_branch.len(), d_branch.stream()),
        Some((d_bias.len(), d_bias.stream(), workspace.len(), workspace.stream())),
        row_len,
        &keep,
        scale,
    )?;
    let bias_len = d_bias.len();
    let (dp, _gd) = d_out.device_ptr(stream);
    let (bp, _gb) = d_branch.device_ptr_mut(stream);
    let (biasp, _gbias) = d_bias.device_ptr_mut(stream);
    let (wp, _gw) = workspace.device_ptr_mut(stream);
    // SAFETY: validated lengths (workspace included) and contexts; the outputs are mutable
    // borrows, distinct from each other and from d_out; cudarc allocations are 4-byte aligned.
    unsafe { launch_backward::<T>(stream, dp, bp, biasp, wp, batch, row_len, bias_len, &keep, scale) }
}

/// The backward launch shared by [`stochastic_depth_backward`] (`d_bias == workspace == 0`,
/// `bias_len == 0`: no bias gradient) and [`stochastic_depth_backward_bias`], on validated
/// pointers.
///
/// # Safety
/// The arguments passed validation; the pointers are device memory of the stream's context kept
/// alive by the caller's guards (or 0 as above); the outputs overlap neither each other nor
/// `d_out`.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_backward<T: Element>(
    stream: &CudaStream,
    d_out: CUdeviceptr,
    d_branch: CUdeviceptr,
    d_bias: CUdeviceptr,
    workspace: CUdeviceptr,
    batch: usize,
    row_len: usize,
    bias_len: usize,
    keep: &Keep<'_>,
    scale: f32,
) -> Result<()> {
    let (k, _gk) = keep_arg(keep, stream);
    let status = ffi::dropfuse_stochastic_depth_backward(
        dtype::<T>(),
        d_out as *const c_void,
        d_branch as *mut c_void,
        d_bias as *mut c_void,
        workspace as *mut f32,
        batch as u64,
        row_len as u64,
        bias_len as u64,
        &k,
        scale,
        cu(stream),
    );
    ffi::check(status, "dropfuse_stochastic_depth_backward")?;
    after(stream)
}

// ------------------------------------------------------------------------------------------------
// Per-sample compaction

/// The compaction of a batch on the device (contract point 5): `B` slots (`u32`: the number of
/// kept samples before a kept sample, [`SLOT_NONE`] for a skipped one) and the count, written by
/// [`SampleSlots::compute`] without any host synchronisation. Allocate once, recompute every step
/// (CUDA-graph friendly).
#[derive(Debug)]
pub struct SampleSlots {
    /// `B` slots, then the count.
    buf: CudaSlice<u32>,
    batch: usize,
}

impl SampleSlots {
    /// Slots for a batch of `batch` samples (`1 ..= 2^32 - 1`), every sample skipped until
    /// [`SampleSlots::compute`] runs.
    ///
    /// Errors: `keep` (0 samples or more than `2^32 - 1`).
    pub fn new(stream: &Arc<CudaStream>, batch: usize) -> Result<Self> {
        check_batch(batch)?;
        let mut init = vec![SLOT_NONE; batch + 1];
        init[batch] = 0;
        let buf = stream
            .clone_htod(&init)
            .map_err(|e| Error::driver("cuMemcpyHtoD", e))?;
        Ok(SampleSlots { buf, batch })
    }

    /// [`SampleSlots::new`] for `keep.len()` samples, then [`SampleSlots::compute`].
    pub fn from_keep<K: DevicePtr<u8>>(stream: &Arc<CudaStream>, keep: &K) -> Result<Self> {
        let mut s = SampleSlots::new(stream, keep.len())?;
        s.compute(stream, keep)?;
        Ok(s)
    }

    /// Computes the slots and the count of `keep` (one `u8` per sample, `0` = skipped) on the
    /// device: one launch, no synchronisation.
    ///
    /// Errors: `keep` (not one flag per sample), or a buffer of another context.
    pub fn compute<K: DevicePtr<u8>>(&mut self, stream: &CudaStream, keep: &K) -> Result<()> {
        if keep.len() != self.batch {
            return Err(Error::invalid(
                "keep",
                format!("{} flags (one per sample)", self.batch),
                format!("{} flags", keep.len()),
            ));
        }
        check_stream(stream, keep.stream(), "keep")?;
        check_stream(stream, self.buf.stream(), "slots")?;
        bind(stream)?;
        let batch = self.batch;
        let (kp, _gk) = keep.device_ptr(stream);
        let (sp, _gs) = self.buf.device_ptr_mut(stream);
        let slots = sp as *mut u32;
        // SAFETY: keep holds `batch` bytes and the buffer batch + 1 u32 (4-byte aligned), both of
        // the stream's context; the guards order them on `stream`.
        let status = unsafe {
            ffi::dropfuse_compact_slots(kp as *const u8, batch as u64, slots, slots.add(batch), cu(stream))
        };
        ffi::check(status, "dropfuse_compact_slots")?;
        after(stream)
    }

    /// `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The `B` slots on the device.
    pub fn slots(&self) -> CudaView<'_, u32> {
        self.buf.slice(0..self.batch)
    }

    /// The count on the device (one `u32`).
    pub fn count_view(&self) -> CudaView<'_, u32> {
        self.buf.slice(self.batch..self.batch + 1)
    }

    /// The number of kept samples: one device read (synchronizes with `stream`).
    pub fn count(&self, stream: &Arc<CudaStream>) -> Result<usize> {
        let mut c = [0u32; 1];
        stream
            .memcpy_dtoh(&self.count_view(), &mut c)
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        stream
            .synchronize()
            .map_err(|e| Error::driver("cuStreamSynchronize", e))?;
        Ok(c[0] as usize)
    }

    /// Reads the count (one device read) and returns it, or the `capacity` error when it exceeds
    /// `capacity` rows: the host check of contract point 5.
    pub fn check_capacity(&self, stream: &Arc<CudaStream>, capacity: usize) -> Result<usize> {
        let count = self.count(stream)?;
        check_capacity(count, capacity)?;
        Ok(count)
    }

    /// Slots and count on the host (for tests and debugging; synchronizes): `None` for skipped
    /// samples, like [`crate::reference::skip::Compaction::slots`].
    pub fn download(&self, stream: &Arc<CudaStream>) -> Result<(Vec<Option<u32>>, usize)> {
        let v = stream
            .clone_dtoh(&self.buf)
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        let slots = v[..self.batch]
            .iter()
            .map(|&s| (s != SLOT_NONE).then_some(s))
            .collect();
        Ok((slots, v[self.batch] as usize))
    }
}

fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::invalid("keep", "at least 1 sample", "0 flags"));
    }
    if u32::try_from(batch).is_err() {
        return Err(Error::invalid("keep", "at most 2^32 - 1 samples", batch));
    }
    Ok(())
}

/// The launchers of the compaction operations.
#[derive(Clone, Copy)]
enum CompactOp {
    Gather,
    Scatter,
    ScatterBackward,
    ScatterAdd,
    ScatterAddBackward,
    GatherBackward,
}

/// Validated pointers of one compaction call.
struct CompactCall {
    full_in: CUdeviceptr,
    full_out: CUdeviceptr,
    compact_in: CUdeviceptr,
    compact_out: CUdeviceptr,
    row_len: usize,
    capacity: usize,
    scale: f32,
}

impl CompactCall {
    /// A call on rows of `row_len` elements and `capacity` compact rows, scale 1, no pointers
    /// (the operation sets the ones it uses).
    fn rows(row_len: usize, capacity: usize) -> Self {
        Self {
            full_in: 0,
            full_out: 0,
            compact_in: 0,
            compact_out: 0,
            row_len,
            capacity,
            scale: 1.0,
        }
    }
}

fn launch_compact<T: Element>(
    stream: &CudaStream,
    slots: &SampleSlots,
    op: CompactOp,
    c: &CompactCall,
) -> Result<()> {
    let (sp, _gs) = slots.buf.device_ptr(stream);
    let (b, r, cap) = (slots.batch as u64, c.row_len as u64, c.capacity as u64);
    let (dt, st) = (dtype::<T>(), cu(stream));
    let sl = sp as *const u32;
    // SAFETY: the caller validated every length (full tensors of B x row_len, compact buffers of
    // `capacity` whole rows) and context; kernels never touch a compact row at or beyond
    // `capacity`; output buffers are mutable borrows distinct from the inputs (or the same buffer
    // for the in-place calls, which the launchers allow); the caller's guards and `_gs` keep the
    // buffers alive and ordered on `stream`.
    let (status, name) = unsafe {
        match op {
            CompactOp::Gather => (
                ffi::dropfuse_gather_samples(dt, c.full_in as _, c.compact_out as _, sl, b, r, cap, st),
                "dropfuse_gather_samples",
            ),
            CompactOp::Scatter => (
                ffi::dropfuse_scatter_samples(
                    dt,
                    c.full_in as _,
                    c.compact_in as _,
                    c.full_out as _,
                    sl,
                    b,
                    r,
                    cap,
                    st,
                ),
                "dropfuse_scatter_samples",
            ),
            CompactOp::ScatterBackward => (
                ffi::dropfuse_scatter_samples_backward(
                    dt,
                    c.full_in as _,
                    c.full_out as _,
                    c.compact_out as _,
                    sl,
                    b,
                    r,
                    cap,
                    st,
                ),
                "dropfuse_scatter_samples_backward",
            ),
            CompactOp::ScatterAdd => (
                ffi::dropfuse_scatter_add_samples(
                    dt,
                    c.full_in as _,
                    c.compact_in as _,
                    c.full_out as _,
                    sl,
                    b,
                    r,
                    cap,
                    c.scale,
                    st,
                ),
                "dropfuse_scatter_add_samples",
            ),
            CompactOp::ScatterAddBackward => (
                ffi::dropfuse_scatter_add_samples_backward(
                    dt,
                    c.full_in as _,
                    c.compact_out as _,
                    sl,
                    b,
                    r,
                    cap,
                    c.scale,
                    st,
                ),
                "dropfuse_scatter_add_samples_backward",
            ),
            CompactOp::GatherBackward => (
                ffi::dropfuse_gather_samples_backward(
                    dt,
                    c.compact_in as _,
                    c.full_out as _,
                    sl,
                    b,
                    r,
                    cap,
                    st,
                ),
                "dropfuse_gather_samples_backward",
            ),
        }
    };
    ffi::check(status, name)?;
    after(stream)
}

/// Validates `row_len` and a full `B x row_len` tensor named `name` against `slots`.
fn check_full(name: &'static str, len: usize, row_len: usize, slots: &SampleSlots) -> Result<()> {
    check_row_len(row_len)?;
    check_rows(name, len, slots.batch, row_len, "B x row_len, one row per sample")
}

fn check_slots_stream(stream: &CudaStream, slots: &SampleSlots) -> Result<()> {
    check_stream(stream, slots.buf.stream(), "slots")
}

/// The context checks of a compaction call: its buffers in order, then `slots`; then binds the
/// stream's context.
fn check_streams(
    stream: &CudaStream,
    slots: &SampleSlots,
    bufs: &[(&Arc<CudaStream>, &'static str)],
) -> Result<()> {
    for &(buf, name) in bufs {
        check_stream(stream, buf, name)?;
    }
    check_slots_stream(stream, slots)?;
    bind(stream)
}

/// Gathers the kept samples of `x` (`B x row_len`) into `out`, a compact buffer of any whole
/// number of rows (its capacity): `out[slot(b)] = x[b]` (bit copies, contract point 6). No host
/// synchronisation; rows of `out` that no sample maps to are untouched, and a sample whose slot
/// is `>= capacity` is not copied (check the count with [`SampleSlots::check_capacity`], or use
/// [`gather_samples_checked`]).
///
/// Errors: `row_len`, `x`, `out` (not whole rows), or a buffer of another context.
pub fn gather_samples<T: Element, X: DevicePtr<T>, O: DevicePtrMut<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    x: &X,
    row_len: usize,
    out: &mut O,
) -> Result<()> {
    check_full("x", x.len(), row_len, slots)?;
    let capacity = compact_rows("out", out.len(), row_len)?;
    gather_validated(stream, slots, x, row_len, out, capacity)
}

fn gather_validated<T: Element, X: DevicePtr<T>, O: DevicePtrMut<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    x: &X,
    row_len: usize,
    out: &mut O,
    capacity: usize,
) -> Result<()> {
    let bufs = [(x.stream(), "x"), (out.stream(), "out")];
    check_streams(stream, slots, &bufs)?;
    let (xp, _gx) = x.device_ptr(stream);
    let (op, _go) = out.device_ptr_mut(stream);
    let call = CompactCall {
        full_in: xp,
        compact_out: op,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::Gather, &call)
}

/// [`gather_samples`] after one read of the count: error `capacity` (nothing written) when `out`
/// has fewer rows than the count; returns the count (the reference's
/// [`gather_samples_into`](crate::reference::skip::gather_samples_into)).
///
/// Errors: `row_len`, `x`, `out`, `capacity`.
pub fn gather_samples_checked<T: Element, X: DevicePtr<T>, O: DevicePtrMut<T>>(
    stream: &Arc<CudaStream>,
    slots: &SampleSlots,
    x: &X,
    row_len: usize,
    out: &mut O,
) -> Result<usize> {
    check_full("x", x.len(), row_len, slots)?;
    let capacity = compact_rows("out", out.len(), row_len)?;
    check_slots_stream(stream, slots)?;
    let count = slots.check_capacity(stream, capacity)?;
    gather_validated(stream, slots, x, row_len, out, capacity)?;
    Ok(count)
}

/// Scatters a compact result back, out of place (contract point 6, the layer replaced):
/// `out[b] = compact[slot(b)]` for kept samples, `x[b]` for skipped ones (bit copies). `compact`
/// may have any number of whole rows (a pre-sized buffer).
///
/// Errors: `row_len`, `x`, `compact`, `out` (not `x`'s length), or a buffer of another context.
pub fn scatter_samples<T: Element, X: DevicePtr<T>, C: DevicePtr<T>, O: DevicePtrMut<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    x: &X,
    compact: &C,
    row_len: usize,
    out: &mut O,
) -> Result<()> {
    check_full("x", x.len(), row_len, slots)?;
    let capacity = compact_rows("compact", compact.len(), row_len)?;
    check_len("out", out.len(), x.len(), "x's shape")?;
    let bufs = [
        (x.stream(), "x"),
        (compact.stream(), "compact"),
        (out.stream(), "out"),
    ];
    check_streams(stream, slots, &bufs)?;
    let (xp, _gx) = x.device_ptr(stream);
    let (cp, _gc) = compact.device_ptr(stream);
    let (op, _go) = out.device_ptr_mut(stream);
    let call = CompactCall {
        full_in: xp,
        full_out: op,
        compact_in: cp,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::Scatter, &call)
}

/// [`scatter_samples`] in place on `x` (PyTorch's `index_copy_`): kept samples' rows are replaced
/// by their compact rows, skipped rows are not touched.
///
/// Errors: `row_len`, `x`, `compact`, or a buffer of another context.
pub fn scatter_samples_in_place<T: Element, X: DevicePtrMut<T>, C: DevicePtr<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    x: &mut X,
    compact: &C,
    row_len: usize,
) -> Result<()> {
    check_full("x", x.len(), row_len, slots)?;
    let capacity = compact_rows("compact", compact.len(), row_len)?;
    let bufs = [(x.stream(), "x"), (compact.stream(), "compact")];
    check_streams(stream, slots, &bufs)?;
    let (xp, _gx) = x.device_ptr_mut(stream);
    let (cp, _gc) = compact.device_ptr(stream);
    let call = CompactCall {
        full_in: xp,
        full_out: xp,
        compact_in: cp,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::Scatter, &call)
}

/// Backward of [`scatter_samples`]: `d_compact[slot(b)] = d_out[b]`, and `d_x[b] = +0` for kept
/// samples, `d_out[b]` for skipped ones. `d_compact` is a pre-sized buffer of any whole number of
/// rows (rows no sample maps to are untouched).
///
/// Errors: `row_len`, `d_out`, `d_x` (not `d_out`'s length), `d_compact` (not whole rows), or a
/// buffer of another context.
pub fn scatter_samples_backward<T: Element, D: DevicePtr<T>, DX: DevicePtrMut<T>, DC: DevicePtrMut<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    d_out: &D,
    row_len: usize,
    d_x: &mut DX,
    d_compact: &mut DC,
) -> Result<()> {
    check_full("d_out", d_out.len(), row_len, slots)?;
    check_len("d_x", d_x.len(), d_out.len(), "d_out's shape")?;
    let capacity = compact_rows("d_compact", d_compact.len(), row_len)?;
    let bufs = [
        (d_out.stream(), "d_out"),
        (d_x.stream(), "d_x"),
        (d_compact.stream(), "d_compact"),
    ];
    check_streams(stream, slots, &bufs)?;
    let (dp, _gd) = d_out.device_ptr(stream);
    let (xp, _gx) = d_x.device_ptr_mut(stream);
    let (cp, _gc) = d_compact.device_ptr_mut(stream);
    let call = CompactCall {
        full_in: dp,
        full_out: xp,
        compact_out: cp,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::ScatterBackward, &call)
}

/// Residual scatter-add in place (contract point 6, stochastic depth on a compact branch): for
/// kept samples `x[b] = round_T(x[b] + scale * compact[slot(b)])` (two `f32` roundings, then one
/// to `T`); skipped rows are not touched. `compact` may have any number of whole rows.
///
/// Errors: `row_len`, `x`, `compact`, `scale`, or a buffer of another context; nothing is written
/// on error.
pub fn scatter_add_samples<T: Element, X: DevicePtrMut<T>, C: DevicePtr<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    x: &mut X,
    compact: &C,
    row_len: usize,
    scale: f32,
) -> Result<()> {
    check_full("x", x.len(), row_len, slots)?;
    let capacity = compact_rows("compact", compact.len(), row_len)?;
    check_scale(scale)?;
    let bufs = [(x.stream(), "x"), (compact.stream(), "compact")];
    check_streams(stream, slots, &bufs)?;
    let (xp, _gx) = x.device_ptr_mut(stream);
    let (cp, _gc) = compact.device_ptr(stream);
    let call = CompactCall {
        full_in: xp,
        full_out: xp,
        compact_in: cp,
        scale,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::ScatterAdd, &call)
}

/// Backward of [`scatter_add_samples`]: `d_compact[slot(b)] = round_T(scale * d_out[b])` into a
/// pre-sized buffer (rows no sample maps to are untouched). The residual's gradient is `d_out`.
///
/// Errors: `row_len`, `d_out`, `scale`, `d_compact` (not whole rows), or a buffer of another
/// context.
pub fn scatter_add_samples_backward<T: Element, D: DevicePtr<T>, DC: DevicePtrMut<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    d_out: &D,
    row_len: usize,
    scale: f32,
    d_compact: &mut DC,
) -> Result<()> {
    check_full("d_out", d_out.len(), row_len, slots)?;
    check_scale(scale)?;
    let capacity = compact_rows("d_compact", d_compact.len(), row_len)?;
    let bufs = [(d_out.stream(), "d_out"), (d_compact.stream(), "d_compact")];
    check_streams(stream, slots, &bufs)?;
    let (dp, _gd) = d_out.device_ptr(stream);
    let (cp, _gc) = d_compact.device_ptr_mut(stream);
    let call = CompactCall {
        full_in: dp,
        compact_out: cp,
        scale,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::ScatterAddBackward, &call)
}

/// Backward of [`gather_samples`], accumulated in place into the input's gradient:
/// `d_x[b] = round_T(d_x[b] + d_compact[slot(b)])` for kept samples, skipped rows untouched.
/// `d_compact` may have any number of whole rows.
///
/// Errors: `row_len`, `d_x`, `d_compact`, or a buffer of another context; nothing is written on
/// error.
pub fn gather_samples_backward<T: Element, DC: DevicePtr<T>, DX: DevicePtrMut<T>>(
    stream: &CudaStream,
    slots: &SampleSlots,
    d_compact: &DC,
    row_len: usize,
    d_x: &mut DX,
) -> Result<()> {
    check_full("d_x", d_x.len(), row_len, slots)?;
    let capacity = compact_rows("d_compact", d_compact.len(), row_len)?;
    let bufs = [(d_x.stream(), "d_x"), (d_compact.stream(), "d_compact")];
    check_streams(stream, slots, &bufs)?;
    let (cp, _gc) = d_compact.device_ptr(stream);
    let (xp, _gx) = d_x.device_ptr_mut(stream);
    let call = CompactCall {
        full_in: xp,
        full_out: xp,
        compact_in: cp,
        ..CompactCall::rows(row_len, capacity)
    };
    launch_compact::<T>(stream, slots, CompactOp::GatherBackward, &call)
}
