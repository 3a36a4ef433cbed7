//! # dropfuse
//!
//! Hand-written, fused CUDA kernels for stochastic regularization (dropout and its relatives), with
//! a plain CPU reference that every element-wise kernel matches bit for bit (reductions: within
//! documented bounds).
//!
//! * [`Device`]: a CUDA context and stream; creating one on a machine without an NVIDIA driver or
//!   GPU returns an [`Error`], nothing panics.
//! * [`dropout`]: bit-packed mask generation, forward (with or without a stored mask), backward,
//!   in-place variants, on cudarc slices and views, plus an `unsafe` raw-pointer layer.
//! * [`bias_dropout_residual`]: fused `y = residual + dropout(x + bias)` (bias broadcast over
//!   rows), forward with or without a mask, in place on the residual stream, backward with a
//!   deterministic bias gradient.
//! * [`drop_block`]: DropBlock 2D/3D (block dropout): bit-packed mask with the kept counts and the
//!   scale computed on the device, forward, backward, in place.
//! * [`multi_sample`]: multi-sample dropout (K masked copies in one launch, the masked gradient
//!   reduction), weighted cross-entropy over K logit sets with the logits' gradient in one pass, and
//!   the whole head with its GEMMs ([`multi_sample::MultiSampleHead`]; cuBLAS, loaded at run time).
//! * [`structured`]: structured dropout (channel/spatial `Dropout1d/2d/3d`, locked/variational,
//!   embedding-row dropout, any set of shared axes): one decision per group, decision masks.
//! * [`mc_dropout`]: Monte-Carlo dropout: `R` replicas in one launch, streaming predictive summaries
//!   (mean, variance, entropies, BALD) kept on the device.
//! * [`importance`]: attention-layer importance: fused per-token cosine similarity of a layer's
//!   input and output hidden states, accumulated per layer on the device for
//!   [`layer_plan::AttentionDropPlan`].
//! * [`layer_plan`]: deterministic host-side layer-skipping plans (LayerDrop, stochastic depth,
//!   LayerSkip rates and early-exit curricula, pruning remaps, attention-layer drop with KV slots).
//! * [`skip`]: compute skipping on the GPU: the fused stochastic-depth residual (forward, backward
//!   with a reproducible bias gradient) and per-sample compaction (device slots, gather, scatter,
//!   scatter-add and their backward kernels, pre-sized buffers without host synchronisation).
//! * [`reference`](mod@reference): the CPU oracle (Philox4x32-10 and every kernel, written plainly).
//! * [`routing`]: token routing (Mixture-of-Depths, GateSkip): per-sequence top-k and global-budget
//!   selection by a radix select on the device, token gather, gated scatter-add, backward kernels.
//! * [`rng`]: the `(seed, offset)` pair every random kernel takes, a [`Generator`], and
//!   [`DevicePhilox`], the device-resident state that makes random kernels CUDA-graph safe.
//! * [`schedule`]: drop-probability schedules over training steps (constant, linear ramp, early and
//!   late dropout).
//!
//! Getting started: [`Device::new`] opens a GPU. Every kernel call takes the stream to enqueue on
//! ([`Device::stream`], or your own through [`Device::from_stream`]), validates its arguments
//! first ([`Error::InvalidArgument`], nothing written) and returns without waiting (the few calls
//! that read a value back say so); [`Device::download`] and [`Device::synchronize`] wait, and
//! report a fault of a running kernel as [`Error::Cuda`]. The README has a complete example.
//!
//! The mask contract every random kernel follows is written out in [`reference`](mod@reference)
//! (points 1-8), in the README and in `kernels/dropfuse.h`.

mod alloc;
pub mod bias_dropout_residual;
mod checks;
pub mod device;
pub mod drop_block;
pub mod dropout;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod importance;
pub mod layer_plan;
pub mod mc_dropout;
pub mod multi_sample;
pub mod reference;
pub mod rng;
pub mod routing;
pub mod schedule;
pub mod skip;
pub mod structured;

/// Whether this build runs its kernels on the host emulator instead of a GPU (`DROPFUSE_HOST_EMULATION=1`
/// at build time: a test device for machines without a GPU, see build.rs). Timings of such a build
/// mean nothing.
#[doc(hidden)]
pub const HOST_EMULATION: bool = cfg!(dropfuse_host_emulation);

pub use device::Device;
pub use dropout::Dropout;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use rng::{DevicePhilox, Generator, PhiloxState};

/// Re-exported so users need not depend on the same versions themselves.
pub use cudarc;
pub use half;

// Compiles the README's Rust example as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
