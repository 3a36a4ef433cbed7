//! # dropfuse
//!
//! Hand-written, fused CUDA kernels for stochastic regularization (dropout and its relatives), with
//! a plain CPU reference that every kernel is compared against bit for bit.
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
//! * [`importance`]: attention-layer importance: fused per-token cosine similarity of a layer's
//!   input and output hidden states, accumulated per layer on the device for
//!   [`layer_plan::AttentionDropPlan`].
//! * [`layer_plan`]: deterministic host-side layer-skipping plans (LayerDrop, stochastic depth,
//!   LayerSkip rates and early-exit curricula, pruning remaps, attention-layer drop with KV slots).
//! * [`reference`](mod@reference): the CPU oracle (Philox4x32-10 and every kernel, written plainly).
//! * [`rng`]: the `(seed, offset)` pair every random kernel takes, and a [`Generator`].
//! * [`schedule`]: drop-probability schedules over training steps (constant, linear ramp, early and
//!   late dropout).
//!
//! The mask contract is documented in the README and in `kernels/dropfuse.h`.

pub mod bias_dropout_residual;
pub mod device;
pub mod drop_block;
pub mod dropout;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod importance;
pub mod layer_plan;
pub mod reference;
pub mod rng;
pub mod schedule;

pub use device::Device;
pub use dropout::Dropout;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use rng::{Generator, PhiloxState};

/// Re-exported so users need not depend on the same versions themselves.
pub use cudarc;
pub use half;

// Compiles the README's Rust example as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
