//! Multi-sample dropout (Inoue 2019) and weighted cross-entropy on the GPU: the kernels of the
//! head, each usable on its own.
//!
//! The contract is the CPU reference's, [`crate::reference::multi_sample`]:
//!
//! * [`MultiSample::copies`]: the `K` masked copies `h_k` (`K x n`, `n = B * D`) of the features in
//!   one launch that reads `h` once. Sample `k` is the dropout contract on the Philox stream
//!   `offset + k` (wrapping) over the `n` elements (element offset 0), bit for bit
//!   [`reference::multi_sample::masked_copies`](crate::reference::multi_sample::masked_copies);
//!   optionally the `K` bit masks, sample `k`'s `mask_words(n)` words at `k * mask_words(n)`.
//!   The state is any [`Randomness`]: a [`PhiloxState`] fixed at launch, or a
//!   [`DevicePhilox`](crate::DevicePhilox) (`&state` or `state.at(add)`) read when the kernel runs
//!   (CUDA graphs, [`crate::rng`]): sample `k` then uses `device offset + add + k`, so a captured
//!   graph advances the state by `K` per replay.
//! * [`MultiSample::reduce`]: `dh = sum_k keep_k * grad_k * scale` over `K` per-sample gradients
//!   (`K x n`, `f32` or the feature type), in `f32`, `k` ascending (each product rounded, then
//!   added), from stored masks or with the masks regenerated ([`MultiSample::reduce_maskless`]).
//! * [`WeightedCrossEntropy`]: `loss = sum_k w_k * mean_i CE_i(z_k)` over `K` logit sets
//!   (`K x B x C`) sharing `B` labels, and the logits' gradient
//!   `dz_k = w_k * (softmax(z_k) - t) / n_valid` in the same pass (point 5 of the contract).
//!   `n_valid` is counted on the device; the loss is deterministic (row partials, fixed-order
//!   combine). Multi-sample dropout uses `w_k = 1 / K`; LayerSkip's early-exit loss uses its exit
//!   weights.
//! * [`mean_logits`]: `sum_k z_k / K` (the averaged logits, for metrics).
//! * [`MultiSampleHead`]: the whole head (masked copies, the logits GEMM through cuBLAS, the
//!   weighted cross-entropy, and the backward GEMMs and reductions); see its module docs. cuBLAS
//!   is loaded at run time; without it [`check_cublas`] and the head report
//!   [`crate::Error::NoCublas`] and everything else here works.
//!
//! Every call validates lengths, parameters and contexts first and returns
//! [`Error::InvalidArgument`] (named like the reference's arguments) without writing anything.
//! Label *values* live on the device and are checked there: a label neither in `[0, C)` nor the
//! ignore index makes [`WeightedCrossEntropy`] write nothing (neither loss nor gradient), and
//! [`check_labels`] (which synchronizes) turns the device's verdict into the same typed error the
//! reference returns (`labels`, naming the first bad row).
//!
//! Error bounds against the `f64` reference (the documented tolerances the GPU tests use), for
//! logits of magnitude up to about 10: the loss within `1e-5 * max(1, |loss|)` for every dtype
//! (the logits are widened exactly and everything is computed in `f32`); the gradient's relative
//! error norm `||dz - ref|| / ||ref||` below `1e-5` when written in `f32`, below `1e-2` in
//! `f16`/`bf16` (one rounding to the type: `2^-11` and `2^-8` relative) for gradients in the
//! type's normal range; an element below it rounds to a multiple of the smallest subnormal (an
//! absolute error up to `2^-25` in `f16`), so the bound is then `1e-2 ||ref||` plus `2^-25` for
//! each such element, in norm
//! (confidently classified rows written in `f16` can lie there entirely: scale them up with
//! [`WeightedCrossEntropy::with_grad_scale`]). This holds on confidently
//! classified rows too: the label's element `p_y - t_y` is computed as `(1 - t_y) - (1 - p_y)`
//! with `1 - p_y` summed from the other classes, where `exp(z_y - lse) - t_y` would lose its digits
//! to the rounding of `lse` (without label smoothing, every `f32` element is then within `1e-5` of
//! its own magnitude). With label smoothing, rows near the smoothed optimum (`softmax` close to
//! the targets, which training with smoothing approaches) are a cancellation `p_c - t_c` that no
//! `f32` kernel keeps relative digits of: `p_c` itself carries the rounding of `lse`, of `z_c - lse`
//! and of `expf`, relative to `p_c`, whatever `p_c - t_c`. There the bound is the relative one
//! plus, per element, `(|lse| + |z_c - lse| + C / 16 + 16) 2^-24 (w_k / n_valid) (p_c + t_c)` (the
//! label's element with `1 - p_y` for `p_y` and the row's largest such factor), in norm:
//! `||dz - ref|| <= 1e-5 ||ref|| + ||slack||` (at the optimum itself `ref` is of the order of the
//! logits' own rounding, and the plain relative error norm reaches 65 on the host emulation).
//! [`MultiSample::reduce`] is exact with respect to its `f32` formula (bit for bit).
//!
//! ```no_run
//! use dropfuse::multi_sample::{check_labels, MultiSample, WeightedCrossEntropy};
//! use dropfuse::{Device, Generator};
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let (k, b, d, c) = (8, 4, 16, 10);
//! let h = dev.upload(&vec![half::f16::from_f32(0.5); b * d])?;
//! let ms = MultiSample::new(k, 0.5)?;
//! let mut copies = dev.zeros::<half::f16>(k * b * d)?;
//! let state = Generator::new(7).next_streams(k as u64);
//! ms.copies(dev.stream(), state, &h, &mut copies)?;
//! // ... logits z (K x B x C) from the copies ...
//! let z = dev.zeros::<half::f16>(k * b * c)?;
//! let labels = dev.upload(&vec![3i64; b])?;
//! let ce = WeightedCrossEntropy::uniform(k)?.with_label_smoothing(0.1)?;
//! let mut loss = dev.zeros::<f32>(1)?;
//! let mut dz = dev.zeros::<f32>(k * b * c)?;
//! let mut scratch = dev.zeros::<u64>(WeightedCrossEntropy::scratch_len(k, b))?;
//! ce.forward(dev.stream(), &z, b, c, &labels, &mut loss, &mut dz, &mut scratch)?;
//! let n_valid = check_labels(dev.stream(), &scratch, c, ce.ignore_index())?; // synchronizes
//! # let _ = n_valid; Ok(()) }
//! ```

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use crate::checks::check_len;
use crate::dropout::{after, bind, check_stream, mask_words, raw::dtype as ffi_dtype, Dropout};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ffi;
use crate::rng::{PhiloxState, Randomness, Source};

pub use crate::reference::multi_sample::{sample_state, DEFAULT_IGNORE_INDEX, WEIGHT_SUM_TOLERANCE};

mod blas;
mod head;

pub use blas::{
    check_cublas, cublas_available, cublas_library_names, Blas, GemmCall, GemmDesc, GemmExArgs,
    CUBLAS_WORKSPACE_BYTES,
};
pub use head::{head_batch, head_bias, head_gemms, HeadGemmPlan, HeadGemms, HeadWorkspace, MultiSampleHead};

/// The most samples one call takes (`DROPFUSE_MULTI_SAMPLE_MAX_K`).
pub const MAX_K: usize = ffi::DROPFUSE_MULTI_SAMPLE_MAX_K as usize;

/// The most logit sets [`WeightedCrossEntropy`] takes (`DROPFUSE_WEIGHTED_CE_MAX_K`).
pub const MAX_LOSS_SETS: usize = ffi::DROPFUSE_WEIGHTED_CE_MAX_K as usize;

/// `u32` words of the `K` masks of `n` elements: `k * ceil(n / 32)`, saturating at `usize::MAX`
/// (no buffer has that many words, so every length check then fails).
pub const fn masks_len(k: usize, n: usize) -> usize {
    match k.checked_mul(mask_words(n)) {
        Some(words) => words,
        None => usize::MAX,
    }
}

fn check_k(k: usize, max: usize) -> Result<()> {
    if k == 0 || k > max {
        return Err(Error::invalid("k", format!("1 ..= {max} samples"), k));
    }
    Ok(())
}

/// `a * b`, or an invalid-argument error named `name` when it overflows.
fn product(name: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(name, "a size that fits in usize", format!("{a} * {b}")))
}

// ------------------------------------------------------------------------------------------------
// Masked copies and the dh reduction

/// `K` dropout samples at drop probability `p` (validated: `k` in `1 ..= MAX_K`, `p` in `[0, 1]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiSample {
    k: usize,
    drop: Dropout,
}

impl MultiSample {
    pub fn new(k: usize, p: f64) -> Result<Self> {
        check_k(k, MAX_K)?;
        Ok(MultiSample {
            k,
            drop: Dropout::new(p)?,
        })
    }

    /// Samples `K`.
    pub fn k(&self) -> usize {
        self.k
    }
    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.drop.p()
    }
    /// The multiplier of kept elements.
    pub fn scale(&self) -> f32 {
        self.drop.scale()
    }

    /// Checks `state`'s context (error `rng`), then binds it: the launch params and the guard
    /// that keeps a device Philox state ordered on `stream` until the launch is enqueued (both
    /// launchers').
    fn bind_params<'s>(
        &self,
        state: &'s Source<'_>,
        stream: &'s CudaStream,
    ) -> Result<(ffi::dropfuse_multi_sample_params, Option<SyncOnDrop<'s>>)> {
        state.check(stream)?;
        let (seed, offset, philox_dev, guard) = state.bind(stream);
        let params = ffi::dropfuse_multi_sample_params {
            seed,
            offset,
            k: self.k as u64,
            threshold: self.drop.threshold(),
            scale: self.drop.scale(),
            philox_dev,
        };
        Ok((params, guard))
    }

    /// The `K` masked copies of `h` (`n` elements) into `copies` (`K * n`), sample `k` on the
    /// stream `offset + k` of `state`.
    pub fn copies<T: Element, H: DevicePtr<T>, C: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        state: R,
        h: &H,
        copies: &mut C,
    ) -> Result<()> {
        let n = self.check_copies(stream, h, copies)?;
        bind(stream)?;
        let (hp, _gh) = h.device_ptr(stream);
        let (cp, _gc) = copies.device_ptr_mut(stream);
        // SAFETY: lengths and contexts validated; h and copies are distinct buffers.
        unsafe { self.launch_copies::<T>(stream, state.source(), hp, cp, 0, n) }
    }

    /// [`copies`](Self::copies) and the `K` bit masks (`masks_len(K, n)` words).
    pub fn copies_with_masks<
        T: Element,
        H: DevicePtr<T>,
        C: DevicePtrMut<T>,
        M: DevicePtrMut<u32>,
        R: Randomness,
    >(
        &self,
        stream: &CudaStream,
        state: R,
        h: &H,
        copies: &mut C,
        masks: &mut M,
    ) -> Result<()> {
        let n = self.check_copies(stream, h, copies)?;
        self.check_masks(stream, masks, n)?;
        bind(stream)?;
        let (hp, _gh) = h.device_ptr(stream);
        let (cp, _gc) = copies.device_ptr_mut(stream);
        let (mp, _gm) = masks.device_ptr_mut(stream);
        // SAFETY: as in `copies`; masks is a third distinct buffer.
        unsafe { self.launch_copies::<T>(stream, state.source(), hp, cp, mp, n) }
    }

    fn check_copies<T, H: DeviceSlice<T>, C: DeviceSlice<T>>(
        &self,
        stream: &CudaStream,
        h: &H,
        copies: &C,
    ) -> Result<usize> {
        let n = h.len();
        if n == 0 {
            return Err(Error::invalid("h", "a non-empty tensor", "0 elements"));
        }
        check_len("copies", copies.len(), product("copies", self.k, n)?, "K * n")?;
        check_stream(stream, h.stream(), "h")?;
        check_stream(stream, copies.stream(), "copies")?;
        Ok(n)
    }

    /// The `K` bit masks of `n` elements (`masks_len(K, n)` words, on the stream's context): the
    /// same check in [`copies_with_masks`](Self::copies_with_masks) and [`reduce`](Self::reduce),
    /// after their other buffers'.
    fn check_masks<M: DeviceSlice<u32>>(&self, stream: &CudaStream, masks: &M, n: usize) -> Result<()> {
        check_len(
            "masks",
            masks.len(),
            masks_len(self.k, n),
            "K * ceil(n / 32) words",
        )?;
        check_stream(stream, masks.stream(), "masks")
    }

    /// Checks the state's context (a device state's guard lives until the launch is enqueued).
    ///
    /// # Safety
    /// Validated pointers of the stream's context, kept alive by the caller's guards.
    unsafe fn launch_copies<T: Element>(
        &self,
        stream: &CudaStream,
        state: Source<'_>,
        h: CUdeviceptr,
        copies: CUdeviceptr,
        masks: CUdeviceptr,
        n: usize,
    ) -> Result<()> {
        let (params, _gr) = self.bind_params(&state, stream)?;
        let status = ffi::dropfuse_multi_sample_copies(
            ffi_dtype(T::DTYPE),
            h as *const c_void,
            copies as *mut c_void,
            masks as *mut u32,
            n as u64,
            &params,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_multi_sample_copies")?;
        after(stream)
    }

    /// `dh = sum_k keep_k * grads_k * scale` (`grads`: `K * n`, `dh`: `n`) from the masks
    /// [`copies_with_masks`](Self::copies_with_masks) wrote. `G` and `O` are any element types.
    pub fn reduce<G: Element, O: Element, M: DevicePtr<u32>, GS: DevicePtr<G>, D: DevicePtrMut<O>>(
        &self,
        stream: &CudaStream,
        masks: &M,
        grads: &GS,
        dh: &mut D,
    ) -> Result<()> {
        let n = self.check_reduce(stream, grads, dh)?;
        self.check_masks(stream, masks, n)?;
        bind(stream)?;
        let (mp, _gm) = masks.device_ptr(stream);
        let (gp, _gg) = grads.device_ptr(stream);
        let (dp, _gd) = dh.device_ptr_mut(stream);
        // SAFETY: lengths and contexts validated; dh is distinct from the inputs.
        unsafe { self.launch_reduce::<G, O>(stream, Source::Host(PhiloxState::new(0, 0)), mp, gp, dp, n) }
    }

    /// [`reduce`](Self::reduce) with the masks regenerated from the forward's `state`.
    pub fn reduce_maskless<G: Element, O: Element, GS: DevicePtr<G>, D: DevicePtrMut<O>, R: Randomness>(
        &self,
        stream: &CudaStream,
        state: R,
        grads: &GS,
        dh: &mut D,
    ) -> Result<()> {
        let n = self.check_reduce(stream, grads, dh)?;
        bind(stream)?;
        let (gp, _gg) = grads.device_ptr(stream);
        let (dp, _gd) = dh.device_ptr_mut(stream);
        // SAFETY: as in `reduce`.
        unsafe { self.launch_reduce::<G, O>(stream, state.source(), 0, gp, dp, n) }
    }

    fn check_reduce<G, O, GS: DeviceSlice<G>, D: DeviceSlice<O>>(
        &self,
        stream: &CudaStream,
        grads: &GS,
        dh: &D,
    ) -> Result<usize> {
        let n = dh.len();
        if n == 0 {
            return Err(Error::invalid("dh", "a non-empty tensor", "0 elements"));
        }
        check_len(
            "grads",
            grads.len(),
            product("grads", self.k, n)?,
            "K * n, n = dh's length",
        )?;
        check_stream(stream, grads.stream(), "grads")?;
        check_stream(stream, dh.stream(), "dh")?;
        Ok(n)
    }

    /// As [`Self::launch_copies`].
    ///
    /// # Safety
    /// As [`Self::launch_copies`].
    unsafe fn launch_reduce<G: Element, O: Element>(
        &self,
        stream: &CudaStream,
        state: Source<'_>,
        masks: CUdeviceptr,
        grads: CUdeviceptr,
        dh: CUdeviceptr,
        n: usize,
    ) -> Result<()> {
        let (params, _gr) = self.bind_params(&state, stream)?;
        let status = ffi::dropfuse_multi_sample_reduce(
            ffi_dtype(G::DTYPE),
            grads as *const c_void,
            ffi_dtype(O::DTYPE),
            dh as *mut c_void,
            masks as *const u32,
            n as u64,
            &params,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_multi_sample_reduce")?;
        after(stream)
    }
}

/// The averaged logits `mean = sum_k z_k * (1 / K)` (`logits`: `K * n`, `mean`: `n`), summed in
/// `f32` with `k` ascending; `O` is `T` or `f32`.
pub fn mean_logits<T: Element, O: Element, Z: DevicePtr<T>, M: DevicePtrMut<O>>(
    stream: &CudaStream,
    k: usize,
    logits: &Z,
    mean: &mut M,
) -> Result<()> {
    check_k(k, usize::MAX)?;
    let n = mean.len();
    if n == 0 {
        return Err(Error::invalid("mean", "a non-empty tensor", "0 elements"));
    }
    check_len(
        "logits",
        logits.len(),
        product("logits", k, n)?,
        "K * n, n = mean's length",
    )?;
    check_out_dtype::<T, O>("mean")?;
    check_stream(stream, logits.stream(), "logits")?;
    check_stream(stream, mean.stream(), "mean")?;
    bind(stream)?;
    let (zp, _gz) = logits.device_ptr(stream);
    let (mp, _gm) = mean.device_ptr_mut(stream);
    // SAFETY: lengths and contexts validated; distinct buffers.
    let status = unsafe {
        ffi::dropfuse_multi_sample_mean(
            ffi_dtype(T::DTYPE),
            zp as *const c_void,
            ffi_dtype(O::DTYPE),
            mp as *mut c_void,
            k as u64,
            n as u64,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        )
    };
    ffi::check(status, "dropfuse_multi_sample_mean")?;
    after(stream)
}

/// An output of type `O` for inputs of type `T` must be `T` or `f32`.
fn check_out_dtype<T: Element, O: Element>(name: &'static str) -> Result<()> {
    if O::DTYPE != T::DTYPE && O::DTYPE != DType::F32 {
        return Err(Error::invalid(
            name,
            format!("elements of the input's type ({}) or f32", T::DTYPE),
            O::DTYPE,
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Weighted cross-entropy

/// Weighted cross-entropy over `K` logit sets that share their labels (contract point 5): loss
/// weights `w_k` (finite, `>= 0`, summing to 1 within [`WEIGHT_SUM_TOLERANCE`]), label smoothing
/// `eps` in `[0, 1]` (PyTorch's definition) and an ignore index (default
/// [`DEFAULT_IGNORE_INDEX`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedCrossEntropy {
    weights: Vec<f64>,
    label_smoothing: f64,
    ignore_index: i64,
    grad_scale: f32,
}

impl WeightedCrossEntropy {
    /// The weights `w_k`, one per logit set (`1 ..= MAX_LOSS_SETS` of them).
    pub fn new(weights: &[f64]) -> Result<Self> {
        if weights.is_empty() || weights.len() > MAX_LOSS_SETS {
            return Err(Error::invalid(
                "weights",
                format!("1 ..= {MAX_LOSS_SETS} weights (K)"),
                format!("{} weights", weights.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(Error::invalid("weights", "finite weights >= 0", w));
        }
        let sum: f64 = weights.iter().sum();
        if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
            return Err(Error::invalid(
                "weights",
                format!("weights summing to 1 (within {WEIGHT_SUM_TOLERANCE:e})"),
                format!("a sum of {sum}"),
            ));
        }
        Ok(WeightedCrossEntropy {
            weights: weights.to_vec(),
            label_smoothing: 0.0,
            ignore_index: DEFAULT_IGNORE_INDEX,
            grad_scale: 1.0,
        })
    }

    /// `K` equal weights `1 / K` (multi-sample dropout).
    pub fn uniform(k: usize) -> Result<Self> {
        check_k(k, MAX_LOSS_SETS)?;
        Self::new(&vec![1.0 / k as f64; k])
    }

    /// Label smoothing `eps`, finite and in `[0, 1]`.
    pub fn with_label_smoothing(mut self, eps: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::invalid("label_smoothing", "a finite value in [0, 1]", eps));
        }
        self.label_smoothing = eps;
        Ok(self)
    }

    /// Labels equal to `ignore_index` are ignored (even when in `[0, C)`).
    pub fn with_ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Multiplies the gradient by `scale` (finite, `> 0`; default 1), like a loss scale: the
    /// coefficient `w_k / n_valid` is computed in `f32` (`n_valid` converted to `f32`, exact up to
    /// 2^24 valid rows, the quotient rounded) and then multiplied by `scale` (rounded again), so a power of two scales the gradient exactly (barring overflow) and keeps small
    /// gradients out of the f16 subnormal range. The loss is not scaled.
    pub fn with_grad_scale(mut self, scale: f32) -> Result<Self> {
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(Error::invalid("grad_scale", "a finite scale > 0", scale));
        }
        self.grad_scale = scale;
        Ok(self)
    }

    /// The gradient's multiplier (1 unless [`with_grad_scale`](Self::with_grad_scale)).
    pub fn grad_scale(&self) -> f32 {
        self.grad_scale
    }

    /// Logit sets `K`.
    pub fn k(&self) -> usize {
        self.weights.len()
    }
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
    }
    pub fn ignore_index(&self) -> i64 {
        self.ignore_index
    }

    /// `u64` words of the scratch buffer for `K` sets of `B` rows: 2 (`n_valid` and the first bad
    /// row, see [`check_labels`]) plus the `K * B` `f32` row partials; `usize::MAX` (no buffer's
    /// length) when `K * B` overflows `usize`.
    pub fn scratch_len(k: usize, b: usize) -> usize {
        k.checked_mul(b).map_or(usize::MAX, |kb| 2 + kb.div_ceil(2))
    }

    pub(crate) fn params(&self, b: usize, c: usize) -> ffi::dropfuse_weighted_ce_params {
        let mut weights = [0.0f32; MAX_LOSS_SETS];
        for (w, &v) in weights.iter_mut().zip(&self.weights) {
            *w = v as f32;
        }
        ffi::dropfuse_weighted_ce_params {
            k: self.k() as u64,
            b: b as u64,
            c: c as u64,
            ignore_index: self.ignore_index,
            label_smoothing: self.label_smoothing as f32,
            weights,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check<T, Z: DeviceSlice<T>, L: DeviceSlice<i64>, O: DeviceSlice<f32>, S: DeviceSlice<u64>>(
        &self,
        stream: &CudaStream,
        logits: &Z,
        b: usize,
        c: usize,
        labels: &L,
        loss: &O,
        scratch: &S,
    ) -> Result<usize> {
        let n = product("logits", self.k(), b).and_then(|kb| product("logits", kb, c))?;
        if b == 0 || c == 0 || logits.len() != n {
            return Err(Error::invalid(
                "logits",
                format!(
                    "K * B * C values with K = {}, B = {b} >= 1, C = {c} >= 1",
                    self.k()
                ),
                format!("{} values", logits.len()),
            ));
        }
        if labels.len() != b {
            return Err(Error::invalid(
                "labels",
                format!("{b} labels (B)"),
                format!("{} labels", labels.len()),
            ));
        }
        check_len("loss", loss.len(), 1, "one f32")?;
        check_len(
            "scratch",
            scratch.len(),
            Self::scratch_len(self.k(), b),
            "WeightedCrossEntropy::scratch_len(K, B) u64 words",
        )?;
        check_stream(stream, logits.stream(), "logits")?;
        check_stream(stream, labels.stream(), "labels")?;
        check_stream(stream, loss.stream(), "loss")?;
        check_stream(stream, scratch.stream(), "scratch")?;
        Ok(n)
    }

    /// The loss (one `f32` in `loss`) and the logits' gradient `grad` (`K * B * C`, of the logits'
    /// type or `f32`; any type for `f32` logits) in one pass over `logits` (`K * B * C`, set `k` at `k * B * C`). A bad label
    /// writes nothing; see [`check_labels`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward<
        T: Element,
        G: Element,
        Z: DevicePtr<T>,
        L: DevicePtr<i64>,
        O: DevicePtrMut<f32>,
        D: DevicePtrMut<G>,
        S: DevicePtrMut<u64>,
    >(
        &self,
        stream: &CudaStream,
        logits: &Z,
        b: usize,
        c: usize,
        labels: &L,
        loss: &mut O,
        grad: &mut D,
        scratch: &mut S,
    ) -> Result<()> {
        let n = self.check(stream, logits, b, c, labels, loss, scratch)?;
        check_len("grad", grad.len(), n, "K * B * C, the logits' length")?;
        if T::DTYPE != DType::F32 {
            check_out_dtype::<T, G>("grad")?;
        }
        check_stream(stream, grad.stream(), "grad")?;
        bind(stream)?;
        let (zp, _gz) = logits.device_ptr(stream);
        let (lp, _gl) = labels.device_ptr(stream);
        let (op, _go) = loss.device_ptr_mut(stream);
        let (dp, _gd) = grad.device_ptr_mut(stream);
        let (sp, _gs) = scratch.device_ptr_mut(stream);
        // SAFETY: lengths, dtypes and contexts validated; the outputs are distinct buffers.
        unsafe { self.launch(stream, T::DTYPE, G::DTYPE, zp, lp, op, dp, sp, b, c) }
    }

    /// The loss only (no gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn loss<
        T: Element,
        Z: DevicePtr<T>,
        L: DevicePtr<i64>,
        O: DevicePtrMut<f32>,
        S: DevicePtrMut<u64>,
    >(
        &self,
        stream: &CudaStream,
        logits: &Z,
        b: usize,
        c: usize,
        labels: &L,
        loss: &mut O,
        scratch: &mut S,
    ) -> Result<()> {
        self.check(stream, logits, b, c, labels, loss, scratch)?;
        bind(stream)?;
        let (zp, _gz) = logits.device_ptr(stream);
        let (lp, _gl) = labels.device_ptr(stream);
        let (op, _go) = loss.device_ptr_mut(stream);
        let (sp, _gs) = scratch.device_ptr_mut(stream);
        // SAFETY: as in `forward`, with no gradient.
        unsafe { self.launch(stream, T::DTYPE, DType::F32, zp, lp, op, 0, sp, b, c) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        stream: &CudaStream,
        dtype: DType,
        grad_dtype: DType,
        logits: CUdeviceptr,
        labels: CUdeviceptr,
        loss: CUdeviceptr,
        grad: CUdeviceptr,
        scratch: CUdeviceptr,
        b: usize,
        c: usize,
    ) -> Result<()> {
        let params = self.params(b, c);
        let status = ffi::dropfuse_weighted_ce_scaled(
            ffi_dtype(dtype),
            logits as *const c_void,
            labels as *const i64,
            loss as *mut f32,
            ffi_dtype(grad_dtype),
            grad as *mut c_void,
            scratch as *mut c_void,
            &params,
            self.grad_scale,
            0,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_weighted_ce_scaled")?;
        after(stream)
    }
}

/// Reads the label verdict of the last [`WeightedCrossEntropy`] call on `scratch` (synchronizes
/// the stream): `n_valid` (the non-ignored rows), or the reference's `labels` error naming the
/// first row whose label is neither in `[0, C)` nor `ignore_index` (that call wrote nothing).
pub fn check_labels<S: DevicePtr<u64>>(
    stream: &Arc<CudaStream>,
    scratch: &S,
    c: usize,
    ignore_index: i64,
) -> Result<u64> {
    if scratch.len() < 2 {
        return Err(Error::invalid(
            "scratch",
            "at least 2 u64 words",
            format!("{} words", scratch.len()),
        ));
    }
    check_stream(stream, scratch.stream(), "scratch")?;
    let stats = stream
        .clone_dtoh(scratch)
        .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
    if stats[1] != u64::MAX {
        return Err(Error::invalid(
            "labels",
            format!("labels in [0, {c}) or the ignore index {ignore_index}"),
            format!("a label out of range at row {}", stats[1]),
        ));
    }
    Ok(stats[0])
}
