//! Randomness handed to the kernels: a `(seed, offset)` pair and a generator that hands them out.
//!
//! The mask contract (README, `kernels/dropfuse.h`): the random word of element `e` (its global index:
//! `element_offset + i` for element `i` of a slice) is word `e % 4` of
//! `Philox4x32-10(counter = [lo(e/4), hi(e/4), lo(offset), hi(offset)], key = [lo(seed), hi(seed)])`.
//! So `offset` selects an independent stream of 2^64 Philox blocks (2^66 elements) and one call
//! consumes one offset; a [`Generator`] advances it so calls never reuse random numbers.
//!
//! **CUDA graphs.** A launch captured into a CUDA graph keeps the kernel arguments it was captured
//! with, so a host [`PhiloxState`] would replay the same mask forever. A [`DevicePhilox`] keeps
//! `{seed, offset}` in device memory instead: random kernels given one (any [`Randomness`]) read it
//! when they run, with `offset = device offset + add` ([`DevicePhilox::at`]). Advance the device
//! offset between replays with [`DevicePhilox::advance`], which is itself a kernel launch and can be
//! captured at the end of the graph: replay `k` of a graph captured at device offset `o` then draws
//! exactly what an eager call with the host state `{seed, o + k * streams}` draws.
//!
//! Capture with cudarc's event tracking off (`unsafe { dev.context().disable_event_tracking() }`
//! before `begin_capture`, back on after the capture, as `tests/graph_gpu.rs` does): a [`Device`]'s
//! context is in cudarc's multi-stream mode, where every buffer use waits on the events its earlier
//! uses recorded; an event recorded before the capture cannot be waited on in a capturing stream
//! (CUDA invalidates the capture).
//!
//! [`Device`]: crate::Device

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::error::{Error, Result};
use crate::ffi;

/// The randomness of one kernel call: Philox key (`seed`) and stream (`offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PhiloxState {
    /// Philox key (both 32-bit key words).
    pub seed: u64,
    /// Philox stream: counter words 2 and 3. Each call uses one stream.
    pub offset: u64,
}

impl PhiloxState {
    /// A state from a seed and a stream offset.
    pub const fn new(seed: u64, offset: u64) -> Self {
        PhiloxState { seed, offset }
    }
}

/// Hands out [`PhiloxState`]s: a fixed seed and an offset that advances by what each call consumed.
///
/// Successive calls never reuse random numbers: each `next()` gets a fresh offset (stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generator {
    seed: u64,
    offset: u64,
}

impl Generator {
    /// A generator for `seed`, starting at offset 0.
    pub const fn new(seed: u64) -> Self {
        Generator { seed, offset: 0 }
    }
    /// A generator resumed at a given offset (e.g. from a checkpoint).
    pub const fn with_offset(seed: u64, offset: u64) -> Self {
        Generator { seed, offset }
    }
    /// The seed.
    pub const fn seed(&self) -> u64 {
        self.seed
    }
    /// The offset the next call will get (save it to checkpoint the generator).
    pub const fn offset(&self) -> u64 {
        self.offset
    }
    /// The state for one call (one stream); advances the offset by one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> PhiloxState {
        self.next_streams(1)
    }
    /// The first of `streams` consecutive streams (for a call that uses several, e.g. one per
    /// sample); advances the offset by `streams`. Offsets wrap around after 2^64 streams.
    pub fn next_streams(&mut self, streams: u64) -> PhiloxState {
        let state = PhiloxState::new(self.seed, self.offset);
        self.offset = self.offset.wrapping_add(streams);
        state
    }
}

/// `{seed, offset}` in device memory: the graph-safe source of randomness (module docs).
#[derive(Debug)]
pub struct DevicePhilox {
    buf: CudaSlice<u64>,
}

impl DevicePhilox {
    /// Allocates the state on `stream`'s context and sets it to `state` (enqueued on `stream`).
    pub fn new(stream: &Arc<CudaStream>, state: PhiloxState) -> Result<Self> {
        let buf = stream
            .clone_htod(&[state.seed, state.offset])
            .map_err(|e| Error::driver("cuMemcpyHtoD", e))?;
        Ok(DevicePhilox { buf })
    }

    /// Overwrites the state (a host-to-device copy enqueued on `stream`).
    pub fn set(&mut self, stream: &Arc<CudaStream>, state: PhiloxState) -> Result<()> {
        crate::dropout::check_stream(stream, self.buf.stream(), "rng")?;
        stream
            .memcpy_htod(&[state.seed, state.offset], &mut self.buf)
            .map_err(|e| Error::driver("cuMemcpyHtoD", e))
    }

    /// Reads the state back (synchronizes `stream`).
    pub fn get(&self, stream: &Arc<CudaStream>) -> Result<PhiloxState> {
        crate::dropout::check_stream(stream, self.buf.stream(), "rng")?;
        let v = stream
            .clone_dtoh(&self.buf)
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        Ok(PhiloxState::new(v[0], v[1]))
    }

    /// Enqueues `offset += streams` (wrapping) on `stream`: one tiny kernel, capturable into a CUDA
    /// graph so that every replay advances the state.
    pub fn advance(&mut self, stream: &CudaStream, streams: u64) -> Result<()> {
        crate::dropout::check_stream(stream, self.buf.stream(), "rng")?;
        crate::dropout::bind(stream)?;
        let (p, _guard) = self.buf.device_ptr_mut(stream);
        // SAFETY: `p` is this state's two u64 on the stream's context (checked above), 8-aligned.
        let status = unsafe {
            ffi::dropfuse_philox_advance(
                p as *mut u64,
                streams,
                stream.cu_stream() as ffi::dropfuse_stream_t,
            )
        };
        ffi::check(status, "dropfuse_philox_advance")?;
        crate::dropout::after(stream)
    }

    /// The stream `offset + add` of this state, for a call that must not share numbers with
    /// another call reading the same state (e.g. two dropout layers in one graph: `at(0)`, `at(1)`,
    /// then `advance(2)`).
    pub fn at(&self, add: u64) -> DeviceStream<'_> {
        DeviceStream { state: self, add }
    }

    /// The device buffer: `[seed, offset]`.
    pub fn buffer(&self) -> &CudaSlice<u64> {
        &self.buf
    }
}

/// Stream `add` of a [`DevicePhilox`]: `{seed, offset + add}` as the kernel reads it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceStream<'a> {
    state: &'a DevicePhilox,
    add: u64,
}

/// Where a random kernel call takes its `(seed, offset)` from: a [`PhiloxState`] fixed at launch,
/// or a [`DevicePhilox`] (`&state` or `state.at(add)`) read when the kernel runs.
pub trait Randomness {
    /// The source, for the launchers.
    fn source(&self) -> Source<'_>;
}

/// The two sources of [`Randomness`].
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Fixed at launch.
    Host(PhiloxState),
    /// Read from device memory when the kernel runs.
    Device(DeviceStream<'a>),
}

impl Randomness for PhiloxState {
    fn source(&self) -> Source<'_> {
        Source::Host(*self)
    }
}

impl Randomness for &DevicePhilox {
    fn source(&self) -> Source<'_> {
        Source::Device(DeviceStream { state: self, add: 0 })
    }
}

impl Randomness for DeviceStream<'_> {
    fn source(&self) -> Source<'_> {
        Source::Device(*self)
    }
}

impl Source<'_> {
    /// Checks that a device state lives on `stream`'s context (`rng` otherwise).
    pub(crate) fn check(&self, stream: &CudaStream) -> Result<()> {
        match self {
            Source::Host(_) => Ok(()),
            Source::Device(d) => crate::dropout::check_stream(stream, d.state.buf.stream(), "rng"),
        }
    }

    /// The params fields `(seed, offset, philox_dev)` and, for a device state, the guard that
    /// must outlive the launch.
    pub(crate) fn bind<'s>(
        &'s self,
        stream: &'s CudaStream,
    ) -> (u64, u64, *const u64, Option<SyncOnDrop<'s>>) {
        match self {
            Source::Host(s) => (s.seed, s.offset, std::ptr::null(), None),
            Source::Device(d) => {
                let (p, guard): (CUdeviceptr, _) = d.state.buf.device_ptr(stream);
                (0, d.add, p as *const u64, Some(guard))
            }
        }
    }
}
