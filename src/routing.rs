//! Token routing on the GPU (Mixture-of-Depths, GateSkip): per-sequence top-k and global-budget
//! selection from gate scores, the gather of the selected tokens, the gated scatter-add back into
//! the residual stream, and the backward kernels (including the gate's gradient).
//!
//! ```no_run
//! use dropfuse::routing::{self, Capacity, TokenRouting, Valid};
//! use dropfuse::Device;
//! use half::bf16;
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let s = dev.stream();
//! let (batch, seq_len, hidden) = (4, 1024, 512);
//! let scores = dev.upload(&vec![0.5f32; batch * seq_len])?; // router logits
//! let gate = dev.upload(&vec![1.0f32; batch * seq_len])?; // e.g. the router weights
//! let mut x = dev.zeros::<bf16>(batch * seq_len * hidden)?; // the residual stream
//! // Sized by a host-side bound: no device read is needed to allocate.
//! let cap = routing::max_selected_top_k(batch, seq_len, Capacity::Fraction(0.5))?;
//! let mut r = TokenRouting::new(s, batch, seq_len, cap)?;
//! r.top_k(s, &scores, Valid::All, Capacity::Fraction(0.5))?;
//! let mut compact = dev.zeros::<bf16>(cap * hidden)?;
//! routing::gather_tokens(s, &r, hidden, &x, &mut compact)?;
//! // ... run the block on `compact` (r.offsets() are its cu_seqlens) ...
//! routing::scatter_add_tokens(s, &r, hidden, &mut x, &compact, &gate)?;
//! # Ok(()) }
//! ```
//!
//! The contract is the CPU reference's, [`crate::reference::skip`] points 1, 4 and 7-12, bit for
//! bit: the same selected tokens (the total order of point 7: larger key first, ties to the lower
//! index), the same offsets and ascending indices, bit copies for gathers, `round_T(f32(res) +
//! g * f32(branch))` with two `f32` roundings for the scatter-add, the gate gradient as the chunked
//! sum of point 4 ([`D_GATE_CHUNK`] = 32).
//!
//! Device-side differences from the reference, all forced by "no host synchronisation":
//! * A [`TokenRouting`] holds device buffers sized once: offsets (`B + 1`), indices (a
//!   `capacity` chosen by the caller, e.g. [`max_selected_top_k`] or [`max_selected_global`],
//!   which need no device read) and a small work buffer. A selection never writes an index at or
//!   beyond the capacity and still reports the true count in `offsets[B]`;
//!   [`TokenRouting::check_capacity`] (one device read) raises the reference's `capacity` error.
//! * The row kernels read the count on the device and touch only compact rows below
//!   `min(count, capacity, rows of the compact buffer)`; a compact buffer with fewer rows than the
//!   count is not an error the launch can see (the reference's `capacity` / `branch` /
//!   `d_compact` errors): check it with [`TokenRouting::check_capacity`] when it is not sized by a
//!   bound.
//! * Device lengths above `S` are read as `S` (the reference rejects them as `lengths`; a kernel
//!   cannot without a host read). The length of the lengths buffer itself is checked.
//!
//! Every other argument is validated before anything is written, with the names of the
//! reference's point 12 (`seq_len`, `hidden`, `scores`, `mask`, `lengths`, `capacity`,
//! `keep_fraction`, `x`, `out`, `residual`, `branch`, `gate`, `d_out`, `d_x`, `d_compact`), plus
//! `batch` (0, or `B * S > 2^32 - 1`), `d_branch`, `d_gate` (the GPU's output buffers) and
//! `routing` (buffers of another context, or a threshold asked of a routing that is not a
//! global-budget selection).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::checks::{check_len, check_rows, compact_rows};
use crate::dropout::{after, bind, check_stream};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::reference::skip::Routing;

pub use crate::reference::skip::{Capacity, D_GATE_CHUNK};

/// Which tokens of a `B x S` batch are real, on the device (padding tokens are never selected).
#[derive(Clone, Copy)]
pub enum Valid<'a> {
    /// Every token is real.
    All,
    /// `B * S` flags, row-major: `true` for a real token (a PyTorch `bool` tensor's bytes).
    Mask(&'a dyn DevicePtr<bool>),
    /// `B` lengths: tokens `0 .. min(len_b, S) - 1` of sequence `b` are real.
    Lengths(&'a dyn DevicePtr<u32>),
}

/// What the routing's buffers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selection {
    /// Nothing yet (a total of 0) or an uploaded routing.
    Other,
    TopK,
    Global,
}

/// A token routing on the device: `B + 1` offsets (`offsets[b]` is the first compact row of
/// sequence `b`, `offsets[B]` the total: the `cu_seqlens` of the packed selected tokens) and the
/// selected token indices, ascending within each sequence, in a buffer of `capacity` entries.
/// Allocated once per shape and refilled by [`TokenRouting::top_k`] / [`TokenRouting::global`].
pub struct TokenRouting {
    batch: usize,
    seq_len: usize,
    capacity: usize,
    offsets: CudaSlice<u32>,
    /// `max(capacity, 1)` entries (cudarc buffers are never empty).
    indices: CudaSlice<u32>,
    work: CudaSlice<u32>,
    selection: Selection,
}

impl std::fmt::Debug for TokenRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRouting")
            .field("batch", &self.batch)
            .field("seq_len", &self.seq_len)
            .field("capacity", &self.capacity)
            .field("selection", &self.selection)
            .finish()
    }
}

/// `B` and `S` of a routing: both `>= 1`, `B * S <= 2^32 - 1` (token indices are `u32`).
fn check_shape(batch: usize, seq_len: usize) -> Result<usize> {
    if seq_len == 0 {
        return Err(Error::invalid("seq_len", "at least 1", 0));
    }
    if batch == 0 {
        return Err(Error::invalid("batch", "at least 1 sequence", 0));
    }
    match batch.checked_mul(seq_len) {
        Some(n) if n <= u32::MAX as usize => Ok(n),
        _ => Err(Error::invalid(
            "batch",
            "at most 2^32 - 1 tokens (B x S)",
            format!("{batch} x {seq_len}"),
        )),
    }
}

fn check_fraction(name: &'static str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(name, "a fraction in [0, 1]", v))
    }
}

/// An upper bound of the tokens [`TokenRouting::top_k`] selects in any `B x S` batch (every token
/// valid): `B * min(k, S)`, or `B * round(c * S)`; no device read needed.
///
/// Errors: `seq_len`, `batch`, `capacity`.
pub fn max_selected_top_k(batch: usize, seq_len: usize, capacity: Capacity) -> Result<usize> {
    check_shape(batch, seq_len)?;
    if let Capacity::Fraction(c) = capacity {
        check_fraction("capacity", c)?;
    }
    Ok(batch * capacity.tokens(seq_len))
}

/// An upper bound of the tokens [`TokenRouting::global`] selects in any `B x S` batch:
/// `round(q * B * S)` (rounding is monotone in the valid count).
///
/// Errors: `seq_len`, `batch`, `keep_fraction`.
pub fn max_selected_global(batch: usize, seq_len: usize, keep_fraction: f64) -> Result<usize> {
    let n = check_shape(batch, seq_len)?;
    check_fraction("keep_fraction", keep_fraction)?;
    Ok(((keep_fraction * n as f64).round() as usize).min(n))
}

/// The threshold score of a global selection from its key (the inverse of
/// [`score_key`](crate::reference::skip::score_key) on canonical scores): `None` for `0xFFFFFFFF`
/// (nothing selected), NaN for key 0, `+0` for a zero.
pub fn threshold_of_key(key: u32) -> Option<f32> {
    if key == u32::MAX {
        None
    } else if key == 0 {
        Some(f32::NAN)
    } else if key & 0x8000_0000 != 0 {
        Some(f32::from_bits(key & 0x7FFF_FFFF))
    } else {
        Some(f32::from_bits(!key))
    }
}

/// Raw pointers of the valid tokens and the guards keeping their buffers ordered on the stream.
type ValidPtrs<'a> = (CUdeviceptr, CUdeviceptr, Option<SyncOnDrop<'a>>);

impl TokenRouting {
    /// Device buffers for routing a `batch x seq_len` batch into at most `capacity` compact rows
    /// (offsets zeroed: a total of 0 until a selection runs).
    ///
    /// Errors: `seq_len`, `batch`, `capacity` (an index buffer over `isize::MAX` bytes).
    pub fn new(stream: &Arc<CudaStream>, batch: usize, seq_len: usize, capacity: usize) -> Result<Self> {
        check_shape(batch, seq_len)?;
        crate::device::check_device_len::<u32>("capacity", capacity)?;
        let work = ffi::DROPFUSE_ROUTING_WORK_PER_SEQUENCE as usize * batch
            + ffi::DROPFUSE_ROUTING_WORK_FIXED as usize;
        let alloc = |n: usize| {
            stream
                .alloc_zeros::<u32>(n)
                .map_err(|e| Error::driver("cuMemAlloc", e))
        };
        Ok(TokenRouting {
            batch,
            seq_len,
            capacity,
            offsets: alloc(batch + 1)?,
            indices: alloc(capacity.max(1))?,
            work: alloc(work)?,
            selection: Selection::Other,
        })
    }

    /// A device copy of a host routing (e.g. the reference's), into `capacity` index entries.
    ///
    /// Errors: `seq_len`, `batch`, `capacity` (below the routing's total).
    pub fn upload(stream: &Arc<CudaStream>, routing: &Routing, capacity: usize) -> Result<Self> {
        check_shape(routing.batch(), routing.seq_len())?;
        if capacity < routing.total() {
            return Err(Error::invalid(
                "capacity",
                format!("at least {} index entries (the total)", routing.total()),
                capacity,
            ));
        }
        let mut r = Self::new(stream, routing.batch(), routing.seq_len(), capacity)?;
        let copy = |e| Error::driver("cuMemcpyHtoD", e);
        stream
            .memcpy_htod(routing.offsets(), &mut r.offsets)
            .map_err(copy)?;
        if routing.total() > 0 {
            stream
                .memcpy_htod(routing.indices(), &mut r.indices.slice_mut(0..routing.total()))
                .map_err(copy)?;
        }
        Ok(r)
    }

    /// `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// `S`.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    /// Index entries: no selection writes beyond them.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// `B + 1` offsets (`u32`): sequence `b`'s compact rows are `offsets[b] .. offsets[b + 1]`.
    pub fn offsets(&self) -> &CudaSlice<u32> {
        &self.offsets
    }
    /// The index buffer (`max(capacity, 1)` entries; the first `min(total, capacity)` are
    /// meaningful): selected token indices within their sequences.
    pub fn indices(&self) -> &CudaSlice<u32> {
        &self.indices
    }

    fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// Per-sequence top-k (Mixture-of-Depths; reference
    /// [`route_top_k`](crate::reference::skip::route_top_k)): in every sequence the `k_b` best
    /// valid tokens by key, ties to the lower index.
    ///
    /// Errors: `scores`, `mask`, `lengths`, `capacity` (a fraction outside `[0, 1]`), `routing`;
    /// nothing is written on error.
    pub fn top_k<S: DevicePtr<f32>>(
        &mut self,
        stream: &CudaStream,
        scores: &S,
        valid: Valid<'_>,
        capacity: Capacity,
    ) -> Result<()> {
        self.check_selection(stream, scores, valid)?;
        let (kind, fraction, tokens) = match capacity {
            Capacity::Fraction(c) => {
                check_fraction("capacity", c)?;
                (ffi::DROPFUSE_CAPACITY_FRACTION, c, 0u64)
            }
            Capacity::Tokens(k) => (ffi::DROPFUSE_CAPACITY_TOKENS, 0.0, k as u64),
        };
        bind(stream)?;
        let (sp, _gs) = scores.device_ptr(stream);
        let (mp, lp, _gv) = valid_ptrs(valid, stream);
        let (raw, guards) = self.raw_mut(stream);
        // SAFETY: validated: scores holds B * S f32, the mask B * S bytes or the lengths B u32,
        // the routing's buffers B + 1 offsets, `capacity` indices and the work words, all of the
        // stream's context; the guards keep them alive and ordered on `stream`.
        let status = unsafe {
            ffi::dropfuse_route_top_k(
                sp as *const f32,
                mp as *const u8,
                lp as *const u32,
                kind,
                fraction,
                tokens,
                &raw,
                stream.cu_stream() as ffi::dropfuse_stream_t,
            )
        };
        drop(guards);
        ffi::check(status, "dropfuse_route_top_k")?;
        after(stream)?;
        self.selection = Selection::TopK;
        Ok(())
    }

    /// Global budget (GateSkip; reference [`route_global`](crate::reference::skip::route_global)):
    /// the `round(keep_fraction * V)` best of the `V` valid tokens of the batch, ties to the lower
    /// flat index. The threshold is then available from [`TokenRouting::threshold`].
    ///
    /// Errors: `scores`, `mask`, `lengths`, `keep_fraction`, `routing`; nothing is written on
    /// error.
    pub fn global<S: DevicePtr<f32>>(
        &mut self,
        stream: &CudaStream,
        scores: &S,
        valid: Valid<'_>,
        keep_fraction: f64,
    ) -> Result<()> {
        self.check_selection(stream, scores, valid)?;
        check_fraction("keep_fraction", keep_fraction)?;
        bind(stream)?;
        let (sp, _gs) = scores.device_ptr(stream);
        let (mp, lp, _gv) = valid_ptrs(valid, stream);
        let (raw, guards) = self.raw_mut(stream);
        // SAFETY: as in `top_k`.
        let status = unsafe {
            ffi::dropfuse_route_global(
                sp as *const f32,
                mp as *const u8,
                lp as *const u32,
                keep_fraction,
                &raw,
                stream.cu_stream() as ffi::dropfuse_stream_t,
            )
        };
        drop(guards);
        ffi::check(status, "dropfuse_route_global")?;
        after(stream)?;
        self.selection = Selection::Global;
        Ok(())
    }

    /// Validates the scores and the valid tokens of a selection, and every buffer's context.
    fn check_selection<S: DevicePtr<f32>>(
        &self,
        stream: &CudaStream,
        scores: &S,
        valid: Valid<'_>,
    ) -> Result<()> {
        check_len("scores", scores.len(), self.tokens(), "B x S of the routing")?;
        match valid {
            Valid::All => {}
            Valid::Mask(m) => check_len("mask", m.len(), self.tokens(), "one flag per token, B x S")?,
            Valid::Lengths(l) => check_len("lengths", l.len(), self.batch, "one length per sequence")?,
        }
        check_stream(stream, scores.stream(), "scores")?;
        match valid {
            Valid::All => {}
            Valid::Mask(m) => check_stream(stream, m.stream(), "mask")?,
            Valid::Lengths(l) => check_stream(stream, l.stream(), "lengths")?,
        }
        self.check_context(stream)
    }

    fn check_context(&self, stream: &CudaStream) -> Result<()> {
        check_stream(stream, self.offsets.stream(), "routing")
    }

    /// The launch descriptor with writable buffers (a selection).
    fn raw_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (ffi::dropfuse_routing, [SyncOnDrop<'a>; 3]) {
        let (batch, seq_len, capacity) = (self.batch as u64, self.seq_len as u64, self.capacity as u64);
        let (op, go) = self.offsets.device_ptr_mut(stream);
        let (ip, gi) = self.indices.device_ptr_mut(stream);
        let (wp, gw) = self.work.device_ptr_mut(stream);
        let raw = ffi::dropfuse_routing {
            batch,
            seq_len,
            offsets: op as *mut u32,
            indices: ip as *mut u32,
            capacity,
            work: wp as *mut u32,
        };
        (raw, [go, gi, gw])
    }

    /// The launch descriptor for the row kernels (read only; no work buffer).
    fn raw<'a>(&'a self, stream: &'a CudaStream) -> (ffi::dropfuse_routing, [SyncOnDrop<'a>; 2]) {
        let (op, go) = self.offsets.device_ptr(stream);
        let (ip, gi) = self.indices.device_ptr(stream);
        let raw = ffi::dropfuse_routing {
            batch: self.batch as u64,
            seq_len: self.seq_len as u64,
            offsets: op as *mut u32,
            indices: ip as *mut u32,
            capacity: self.capacity as u64,
            work: std::ptr::null_mut(),
        };
        (raw, [go, gi])
    }

    /// The total number of selected tokens, `offsets[B]` (one device read: waits for `stream`).
    pub fn total(&self, stream: &Arc<CudaStream>) -> Result<usize> {
        let v = stream
            .clone_dtoh(&self.offsets.slice(self.batch..self.batch + 1))
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        Ok(v[0] as usize)
    }

    /// The total, or the reference's `capacity` error when it exceeds the index capacity or
    /// `rows` (the rows of a compact buffer; pass `usize::MAX` to check the indices alone).
    /// One device read.
    pub fn check_capacity(&self, stream: &Arc<CudaStream>, rows: usize) -> Result<usize> {
        let total = self.total(stream)?;
        let room = self.capacity.min(rows);
        if total > room {
            return Err(Error::invalid(
                "capacity",
                format!("a buffer of at least {total} rows (capacity >= count)"),
                format!("{room} rows"),
            ));
        }
        Ok(total)
    }

    /// The offsets and the first `min(total, capacity)` indices, on the host (waits for `stream`).
    pub fn download(&self, stream: &Arc<CudaStream>) -> Result<(Vec<u32>, Vec<u32>)> {
        let dl = |e| Error::driver("cuMemcpyDtoH", e);
        let offsets = stream.clone_dtoh(&self.offsets).map_err(dl)?;
        let n = (offsets[self.batch] as usize).min(self.capacity);
        let indices = if n == 0 {
            Vec::new()
        } else {
            stream.clone_dtoh(&self.indices.slice(0..n)).map_err(dl)?
        };
        Ok((offsets, indices))
    }

    /// The threshold of the last [`TokenRouting::global`] selection: the score of the last
    /// selected token (canonical: `+0` for a zero, NaN for a NaN), `None` when nothing is selected
    /// (one device read).
    ///
    /// Errors: `routing` when the routing does not hold a global-budget selection.
    pub fn threshold(&self, stream: &Arc<CudaStream>) -> Result<Option<f32>> {
        if self.selection != Selection::Global {
            return Err(Error::invalid(
                "routing",
                "a global-budget selection (TokenRouting::global)",
                "another routing",
            ));
        }
        let at = ffi::DROPFUSE_ROUTING_WORK_PER_SEQUENCE as usize * self.batch
            + ffi::DROPFUSE_ROUTING_THRESHOLD_WORD as usize;
        let v = stream
            .clone_dtoh(&self.work.slice(at..at + 1))
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        Ok(threshold_of_key(v[0]))
    }
}

fn valid_ptrs<'a>(valid: Valid<'a>, stream: &'a CudaStream) -> ValidPtrs<'a> {
    match valid {
        Valid::All => (0, 0, None),
        Valid::Mask(m) => {
            let (p, g) = m.device_ptr(stream);
            (p, 0, Some(g))
        }
        Valid::Lengths(l) => {
            let (p, g) = l.device_ptr(stream);
            (0, p, Some(g))
        }
    }
}

/// Validates `hidden` and a `B x S x hidden` tensor named `name` of `routing`.
fn check_tokens(name: &'static str, len: usize, hidden: usize, routing: &TokenRouting) -> Result<()> {
    if hidden == 0 {
        return Err(Error::invalid("hidden", "at least 1", 0));
    }
    check_rows(name, len, routing.tokens(), hidden, "B x S x hidden")
}

fn check_gate(name: &'static str, len: usize, routing: &TokenRouting) -> Result<()> {
    check_len(name, len, routing.tokens(), "one gate per token, B x S")
}

/// The selected tokens' rows of `x` (`B x S x hidden`) into `out`, compact row `r` a bit copy of
/// the row of its token. `out` holds any whole number of rows: rows at or beyond
/// `min(total, capacity, rows of out)` are never written.
///
/// Errors: `hidden`, `x`, `out` (not whole rows), `routing`; nothing is written on error.
pub fn gather_tokens<T: Element, X: DevicePtr<T>, O: DevicePtrMut<T>>(
    stream: &CudaStream,
    routing: &TokenRouting,
    hidden: usize,
    x: &X,
    out: &mut O,
) -> Result<()> {
    check_tokens("x", x.len(), hidden, routing)?;
    let rows = compact_rows("out", out.len(), hidden)?;
    check_stream(stream, x.stream(), "x")?;
    check_stream(stream, out.stream(), "out")?;
    routing.check_context(stream)?;
    bind(stream)?;
    let (xp, _gx) = x.device_ptr(stream);
    let (op, _go) = out.device_ptr_mut(stream);
    let (raw, _gr) = routing.raw(stream);
    // SAFETY: validated lengths and contexts; x and out are distinct cudarc buffers (a shared and
    // a mutable borrow cannot overlap); the guards keep every buffer alive and ordered.
    let status = unsafe {
        ffi::dropfuse_gather_tokens(
            crate::dropout::raw::dtype(T::DTYPE),
            &raw,
            hidden as u64,
            xp as *const c_void,
            op as *mut c_void,
            rows as u64,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        )
    };
    ffi::check(status, "dropfuse_gather_tokens")?;
    after(stream)
}

/// Gated scatter-add in place on the residual stream: for the token of compact row `r` with gate
/// `g = gate[b * S + t]`, `residual[token] = round_T(f32(residual[token]) + g * f32(branch[r]))`
/// (two `f32` roundings). Unselected and padding tokens are untouched.
///
/// Errors: `hidden`, `residual`, `branch` (not whole rows), `gate`, `routing`; nothing is written
/// on error.
pub fn scatter_add_tokens<T: Element, R: DevicePtrMut<T>, B: DevicePtr<T>, G: DevicePtr<f32>>(
    stream: &CudaStream,
    routing: &TokenRouting,
    hidden: usize,
    residual: &mut R,
    branch: &B,
    gate: &G,
) -> Result<()> {
    check_tokens("residual", residual.len(), hidden, routing)?;
    let rows = compact_rows("branch", branch.len(), hidden)?;
    check_gate("gate", gate.len(), routing)?;
    check_stream(stream, residual.stream(), "residual")?;
    check_stream(stream, branch.stream(), "branch")?;
    check_stream(stream, gate.stream(), "gate")?;
    routing.check_context(stream)?;
    bind(stream)?;
    let (rp, _gres) = residual.device_ptr_mut(stream);
    let (bp, _gb) = branch.device_ptr(stream);
    let (gp, _gg) = gate.device_ptr(stream);
    let (raw, _gr) = routing.raw(stream);
    // SAFETY: as in `gather_tokens`; residual is distinct from branch and gate (a mutable borrow).
    let status = unsafe {
        ffi::dropfuse_scatter_add_tokens(
            crate::dropout::raw::dtype(T::DTYPE),
            &raw,
            hidden as u64,
            rp as *mut c_void,
            bp as *const c_void,
            rows as u64,
            gp as *const f32,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        )
    };
    ffi::check(status, "dropfuse_scatter_add_tokens")?;
    after(stream)
}

/// Backward of [`scatter_add_tokens`] (the residual's gradient is `d_out` itself):
/// `d_branch[r] = round_T(g * f32(d_out[token]))` and `d_gate` (`B x S`): for a selected token
/// the chunked sum (chunk [`D_GATE_CHUNK`]) of `f32(d_out[token][j]) * f32(branch[r][j])`, `+0`
/// for the others. Compact rows up to `min(total, capacity, rows of branch, rows of d_branch)`.
///
/// Errors: `hidden`, `d_out`, `branch`, `gate`, `d_branch` (not whole rows), `d_gate` (not one
/// per token), `routing`; nothing is written on error.
#[allow(clippy::too_many_arguments)]
pub fn scatter_add_tokens_backward<
    T: Element,
    DY: DevicePtr<T>,
    B: DevicePtr<T>,
    G: DevicePtr<f32>,
    DB: DevicePtrMut<T>,
    DG: DevicePtrMut<f32>,
>(
    stream: &CudaStream,
    routing: &TokenRouting,
    hidden: usize,
    d_out: &DY,
    branch: &B,
    gate: &G,
    d_branch: &mut DB,
    d_gate: &mut DG,
) -> Result<()> {
    check_tokens("d_out", d_out.len(), hidden, routing)?;
    let rows = compact_rows("branch", branch.len(), hidden)?;
    check_gate("gate", gate.len(), routing)?;
    let rows = rows.min(compact_rows("d_branch", d_branch.len(), hidden)?);
    check_gate("d_gate", d_gate.len(), routing)?;
    for (name, s) in [
        ("d_out", d_out.stream()),
        ("branch", branch.stream()),
        ("gate", gate.stream()),
        ("d_branch", d_branch.stream()),
        ("d_gate", d_gate.stream()),
    ] {
        check_stream(stream, s, name)?;
    }
    routing.check_context(stream)?;
    bind(stream)?;
    let (yp, _gy) = d_out.device_ptr(stream);
    let (bp, _gb) = branch.device_ptr(stream);
    let (gp, _gg) = gate.device_ptr(stream);
    let (dbp, _gdb) = d_branch.device_ptr_mut(stream);
    let (dgp, _gdg) = d_gate.device_ptr_mut(stream);
    let (raw, _gr) = routing.raw(stream);
    // SAFETY: as in `gather_tokens`; the outputs are mutable borrows, distinct from the inputs.
    let status = unsafe {
        ffi::dropfuse_scatter_add_tokens_backward(
            crate::dropout::raw::dtype(T::DTYPE),
            &raw,
            hidden as u64,
            yp as *const c_void,
            bp as *const c_void,
            gp as *const f32,
            dbp as *mut c_void,
            rows as u64,
            dgp as *mut f32,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        )
    };
    ffi::check(status, "dropfuse_scatter_add_tokens_backward")?;
    after(stream)
}

/// Backward of [`gather_tokens`], accumulated in place into the input's gradient:
/// `d_x[token] = round_T(f32(d_x[token]) + f32(d_compact[r]))` for selected tokens, the others
/// untouched.
///
/// Errors: `hidden`, `d_x`, `d_compact` (not whole rows), `routing`; nothing is written on error.
pub fn gather_tokens_backward<T: Element, DC: DevicePtr<T>, DX: DevicePtrMut<T>>(
    stream: &CudaStream,
    routing: &TokenRouting,
    hidden: usize,
    d_compact: &DC,
    d_x: &mut DX,
) -> Result<()> {
    check_tokens("d_x", d_x.len(), hidden, routing)?;
    let rows = compact_rows("d_compact", d_compact.len(), hidden)?;
    check_stream(stream, d_x.stream(), "d_x")?;
    check_stream(stream, d_compact.stream(), "d_compact")?;
    routing.check_context(stream)?;
    bind(stream)?;
    let (cp, _gc) = d_compact.device_ptr(stream);
    let (xp, _gx) = d_x.device_ptr_mut(stream);
    let (raw, _gr) = routing.raw(stream);
    // SAFETY: as in `gather_tokens`.
    let status = unsafe {
        ffi::dropfuse_gather_tokens_backward(
            crate::dropout::raw::dtype(T::DTYPE),
            &raw,
            hidden as u64,
            cp as *const c_void,
            rows as u64,
            xp as *mut c_void,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        )
    };
    ffi::check(status, "dropfuse_gather_tokens_backward")?;
    after(stream)
}
