//! Monte-Carlo dropout on the GPU: batch-replicated dropout (`R` masked replicas of a batch in one
//! launch) and streaming predictive summaries (mean, variance, predictive and expected entropy,
//! mutual information / BALD) of `T` sampled class-probability outputs, kept on the device.
//!
//! The contract is the CPU reference's ([`crate::reference::mc_dropout`]): replicas bit for bit
//! (replica `t` is dropout with stream `offset + t`; take the state from
//! [`Generator::next_streams(R)`](crate::Generator::next_streams)), summaries in `f32` within
//! [`f32_tolerance`](crate::reference::mc_dropout::f32_tolerance) of the `f64` reference.
//!
//! The replicas take any [`Randomness`]: a [`PhiloxState`](crate::PhiloxState) fixed at launch, or
//! a [`DevicePhilox`](crate::DevicePhilox) (`&state` or `state.at(add)`) read when the kernel runs
//! (CUDA graphs, [`crate::rng`]): replica `t` then uses the stream `device offset + add + t`, so a
//! captured graph advances the state by `R` per replay.
//!
//! ```no_run
//! use dropfuse::mc_dropout::{McDropout, McOutputs, McSummaryState};
//! use dropfuse::{Device, Generator};
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let (batch, features, replicas) = (256, 4096, 16);
//! let x = dev.upload(&vec![half::f16::from_f32(1.0); batch * features])?;
//! let mut y = dev.zeros::<half::f16>(replicas * batch * features)?;
//! let mc = McDropout::new(0.1, replicas)?;
//! let mut rng = Generator::new(7);
//! mc.forward_maskless(dev.stream(), rng.next_streams(replicas as u64), &x, &mut y)?;
//! // ... the model turns each replica into B x C probabilities; push them one by one:
//! let classes = 1000;
//! let mut summary = McSummaryState::new(&dev, batch, classes)?;
//! let probs = dev.zeros::<f32>(batch * classes)?;
//! summary.push(dev.stream(), &probs)?;
//! let mut out = McOutputs::new(&dev, batch, classes)?;
//! summary.finish(dev.stream(), &mut out)?;
//! summary.check(dev.stream())?; // synchronises: reports pushes rejected for invalid values
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::device::Device;
use crate::dropout::{after, bind, check_stream, mask_words, Dropout};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::rng::{Randomness, Source};

/// A validated batch-replicated dropout: `p`, the number of replicas `R` and the element offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct McDropout {
    drop: Dropout,
    replicas: usize,
}

impl McDropout {
    /// `p` finite in `[0, 1]`, `replicas >= 1`.
    pub fn new(p: f64, replicas: usize) -> Result<Self> {
        if replicas == 0 {
            return Err(Error::invalid("replicas", "at least 1 replica", 0));
        }
        Ok(McDropout {
            drop: Dropout::new(p)?,
            replicas,
        })
    }

    /// The same replicas for a slice whose element 0 is element `element_offset` of the batch.
    pub fn with_element_offset(mut self, element_offset: u64) -> Self {
        self.drop = self.drop.with_element_offset(element_offset);
        self
    }

    /// Replicas `R`.
    pub fn replicas(&self) -> usize {
        self.replicas
    }
    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.drop.p()
    }
    /// The multiplier of kept elements.
    pub fn scale(&self) -> f32 {
        self.drop.scale()
    }
    /// Global index of element 0 of `x`.
    pub fn element_offset(&self) -> u64 {
        self.drop.element_offset()
    }
    /// Words of the `R` concatenated masks of `n` elements: `R * ceil(n / 32)`.
    pub fn masks_words(&self, n: usize) -> usize {
        self.replicas.saturating_mul(mask_words(n))
    }

    /// Validation in the reference's order: `replicas` (`R * n` over `usize`), `x` (empty),
    /// `element_offset`; then `y` (`R * n`), `masks`, contexts.
    fn validate(
        &self,
        stream: &CudaStream,
        x: (usize, &CudaStream),
        y: (usize, &CudaStream),
        masks: Option<(usize, &CudaStream)>,
    ) -> Result<()> {
        let n = x.0;
        let total = self.replicas.checked_mul(n).ok_or_else(|| {
            Error::invalid(
                "replicas",
                format!("replicas * n that fits in usize (n = {n})"),
                self.replicas,
            )
        })?;
        if n == 0 {
            return Err(Error::invalid("x", "a non-empty tensor", "0 elements"));
        }
        if self.element_offset().checked_add(n as u64).is_none() {
            return Err(Error::invalid(
                "element_offset",
                format!("element_offset + n <= 2^64 - 1 (n = {n})"),
                self.element_offset(),
            ));
        }
        if y.0 != total {
            return Err(Error::invalid(
                "y",
                format!("{total} elements (replicas {} x n {n})", self.replicas),
                format!("{} elements", y.0),
            ));
        }
        if let Some((len, _)) = masks {
            let want = self.replicas * mask_words(n);
            if len != want {
                return Err(Error::invalid(
                    "masks",
                    format!("{want} words (replicas {} x ceil({n} / 32))", self.replicas),
                    format!("{len} words"),
                ));
            }
        }
        check_stream(stream, x.1, "x")?;
        check_stream(stream, y.1, "y")?;
        if let Some((_, s)) = masks {
            check_stream(stream, s, "masks")?;
        }
        bind(stream)
    }

    /// `y[t * n + i]` = replica `t` of dropout of `x` (stream `offset + t` of `rng`), and the `R` masks.
    pub fn forward<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, M: DevicePtrMut<u32>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &X,
        y: &mut Y,
        masks: &mut M,
    ) -> Result<()> {
        self.validate(
            stream,
            (x.len(), x.stream()),
            (y.len(), y.stream()),
            Some((masks.len(), masks.stream())),
        )?;
        let n = x.len();
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (mp, _gm) = masks.device_ptr_mut(stream);
        // SAFETY: validated lengths and contexts; x, y and masks are distinct cudarc buffers.
        unsafe { self.launch::<T>(stream, rng.source(), xp, yp, mp, n) }
    }

    /// The replicas without masks.
    pub fn forward_maskless<T: Element, X: DevicePtr<T>, Y: DevicePtrMut<T>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        x: &X,
        y: &mut Y,
    ) -> Result<()> {
        self.validate(stream, (x.len(), x.stream()), (y.len(), y.stream()), None)?;
        let n = x.len();
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        // SAFETY: as in `forward`.
        unsafe { self.launch::<T>(stream, rng.source(), xp, yp, 0, n) }
    }

    /// Checks `rng`'s context (the device state's guard lives until the launch is enqueued).
    ///
    /// # Safety
    /// Validated pointers of the stream's context kept alive by the caller's guards.
    unsafe fn launch<T: Element>(
        &self,
        stream: &CudaStream,
        rng: Source<'_>,
        x: u64,
        y: u64,
        masks: u64,
        n: usize,
    ) -> Result<()> {
        let (params, _gr) = self.drop.bind_params(self.drop.element_offset(), &rng, stream)?;
        let status = ffi::dropfuse_mc_dropout_forward(
            crate::dropout::raw::dtype(T::DTYPE),
            x as *const std::ffi::c_void,
            y as *mut std::ffi::c_void,
            if masks == 0 {
                std::ptr::null_mut()
            } else {
                masks as *mut u32
            },
            n as u64,
            self.replicas as u64,
            &params,
            stream.cu_stream() as ffi::dropfuse_stream_t,
        );
        ffi::check(status, "dropfuse_mc_dropout_forward")?;
        after(stream)
    }
}

/// Control words of a summary state (`DROPFUSE_MC_CTL_WORDS`).
const CTL_WORDS: usize = ffi::DROPFUSE_MC_CTL_WORDS as usize;

/// The device-side state of streaming MC-dropout summaries of `B x C` `f32` probabilities: the
/// Welford means and sums of squared deviations, the running mean of each row's sample entropies
/// and the sample counters, all in device memory (no host synchronisation per push).
#[derive(Debug)]
pub struct McSummaryState {
    batch: usize,
    classes: usize,
    pushes: usize,
    mean: CudaSlice<f32>,
    m2: CudaSlice<f32>,
    expected_entropy: CudaSlice<f32>,
    ctl: CudaSlice<u64>,
}

/// Rejects `batch` / `classes` of 0 and `batch * classes` over `usize` or over a device buffer's
/// largest size (`f32`); returns the product.
fn check_shape(batch: usize, classes: usize) -> Result<usize> {
    if batch == 0 {
        return Err(Error::invalid("batch", "at least 1 row", 0));
    }
    if classes == 0 {
        return Err(Error::invalid("classes", "at least 1 class", 0));
    }
    let n = batch.checked_mul(classes).ok_or_else(|| {
        Error::invalid(
            "classes",
            format!("batch * classes that fits in usize (batch = {batch})"),
            classes,
        )
    })?;
    crate::device::check_device_len::<f32>("classes", n)?;
    Ok(n)
}

/// Values of a stack of `samples` samples of `per` (`B * C`) values each: `samples` error when
/// there is none or the product overflows `usize` (the check of every push and of [`summarize`]).
fn stack_len(samples: usize, per: usize) -> Result<usize> {
    if samples == 0 {
        return Err(Error::invalid("samples", "at least 1 sample", 0));
    }
    samples.checked_mul(per).ok_or_else(|| {
        Error::invalid(
            "samples",
            format!("samples * batch * classes that fits in usize ({per} per sample)"),
            samples,
        )
    })
}

/// Rejects (as `out`) output buffers other than `B * C` variances, `B` predictive entropies and `B`
/// mutual informations: the finish kernel writes exactly that many values into each.
fn check_output_lens(batch: usize, classes: usize, [variance, predictive, mutual]: [usize; 3]) -> Result<()> {
    let want = [batch * classes, batch, batch];
    let got = [variance, predictive, mutual];
    if got != want {
        return Err(Error::invalid(
            "out",
            format!(
                "{} variances, {batch} predictive entropies and {batch} mutual informations",
                want[0]
            ),
            format!("{variance}, {predictive} and {mutual}"),
        ));
    }
    Ok(())
}

/// The counters of a summary state ([`McSummaryState::counters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McCounters {
    /// Samples accepted (pushed with valid values).
    pub accepted: u64,
    /// Pushes rejected for a NaN, infinite or negative value (each left the state unchanged).
    pub rejected: u64,
    /// Index (within its push's `samples x B x C` values) of the first invalid value of the first
    /// rejected push.
    pub first_invalid: Option<u64>,
}

impl McSummaryState {
    /// An empty state for `batch x classes` probabilities (both >= 1; `classes` error also when
    /// `batch * classes` overflows `usize` or an `f32` device buffer's largest size), on `dev`'s
    /// stream.
    pub fn new(dev: &Device, batch: usize, classes: usize) -> Result<Self> {
        let n = check_shape(batch, classes)?;
        Ok(McSummaryState {
            batch,
            classes,
            pushes: 0,
            mean: dev.zeros(n)?,
            m2: dev.zeros(n)?,
            expected_entropy: dev.zeros(batch)?,
            ctl: dev.zeros(CTL_WORDS)?,
        })
    }

    /// Rows `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Classes `C`.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// Samples pushed so far (accepted or not; [`McSummaryState::counters`] tells them apart).
    pub fn pushed(&self) -> usize {
        self.pushes
    }
    /// The Welford means, `B x C` (valid once a sample was accepted).
    pub fn mean(&self) -> &CudaSlice<f32> {
        &self.mean
    }
    /// The per-row expected entropies `E_t[H[p_t,b]]`, `B`.
    pub fn expected_entropy(&self) -> &CudaSlice<f32> {
        &self.expected_entropy
    }

    fn raw<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> (ffi::dropfuse_mc_state, [cudarc::driver::SyncOnDrop<'a>; 4]) {
        let (m, g0) = self.mean.device_ptr(stream);
        let (q, g1) = self.m2.device_ptr(stream);
        let (e, g2) = self.expected_entropy.device_ptr(stream);
        let (c, g3) = self.ctl.device_ptr(stream);
        (
            ffi::dropfuse_mc_state {
                mean: m as *mut f32,
                m2: q as *mut f32,
                expected_entropy: e as *mut f32,
                ctl: c as *mut u64 as *mut std::os::raw::c_ulonglong,
                batch: self.batch as u64,
                classes: self.classes as u64,
            },
            [g0, g1, g2, g3],
        )
    }

    fn check_own_streams(&self, stream: &CudaStream) -> Result<()> {
        check_stream(stream, self.mean.stream(), "state")
    }

    /// Pushes one sample `p_t` (`B x C` row-major). Values are checked on the device: a sample
    /// with a NaN, infinite or negative value leaves the state unchanged and is reported by
    /// [`McSummaryState::check`].
    pub fn push<P: DevicePtr<f32>>(&mut self, stream: &CudaStream, probs: &P) -> Result<()> {
        self.push_samples(stream, probs, 1, true)
    }

    /// [`McSummaryState::push`] without the value check (one read of the sample less): NaN,
    /// infinite or negative values then make the summaries meaningless.
    pub fn push_unchecked<P: DevicePtr<f32>>(&mut self, stream: &CudaStream, probs: &P) -> Result<()> {
        self.push_samples(stream, probs, 1, false)
    }

    /// Pushes a stored stack of `samples` samples (`samples x B x C`), in order, reading it once
    /// (twice with the value check; the whole stack is rejected if any value is invalid).
    pub fn push_stack<P: DevicePtr<f32>>(
        &mut self,
        stream: &CudaStream,
        probs: &P,
        samples: usize,
    ) -> Result<()> {
        self.push_samples(stream, probs, samples, true)
    }

    /// [`McSummaryState::push_stack`] without the value check.
    pub fn push_stack_unchecked<P: DevicePtr<f32>>(
        &mut self,
        stream: &CudaStream,
        probs: &P,
        samples: usize,
    ) -> Result<()> {
        self.push_samples(stream, probs, samples, false)
    }

    fn push_samples<P: DevicePtr<f32>>(
        &mut self,
        stream: &CudaStream,
        probs: &P,
        samples: usize,
        check: bool,
    ) -> Result<()> {
        let want = stack_len(samples, self.batch * self.classes)?;
        if probs.len() != want {
            let what = if samples == 1 {
                "B * C".to_string()
            } else {
                format!("{samples} x B x C")
            };
            return Err(Error::invalid(
                "probs",
                format!("{want} values ({what})"),
                format!("{} values", probs.len()),
            ));
        }
        check_stream(stream, probs.stream(), "probs")?;
        self.check_own_streams(stream)?;
        bind(stream)?;
        {
            let (pp, _gp) = probs.device_ptr(stream);
            let (m, _g0) = self.mean.device_ptr_mut(stream);
            let (q, _g1) = self.m2.device_ptr_mut(stream);
            let (e, _g2) = self.expected_entropy.device_ptr_mut(stream);
            let (c, _g3) = self.ctl.device_ptr_mut(stream);
            let st = ffi::dropfuse_mc_state {
                mean: m as *mut f32,
                m2: q as *mut f32,
                expected_entropy: e as *mut f32,
                ctl: c as *mut u64 as *mut std::os::raw::c_ulonglong,
                batch: self.batch as u64,
                classes: self.classes as u64,
            };
            // SAFETY: validated lengths and contexts; the guards keep every buffer alive and
            // ordered on `stream`; the state's buffers are distinct from `probs`.
            let status = unsafe {
                ffi::dropfuse_mc_summary_push(
                    pp as *const f32,
                    samples as u64,
                    i32::from(check),
                    &st,
                    stream.cu_stream() as ffi::dropfuse_stream_t,
                )
            };
            ffi::check(status, "dropfuse_mc_summary_push")?;
        }
        self.pushes += samples;
        after(stream)
    }

    /// Writes the summaries of the accepted samples into `out` (variance, predictive entropy,
    /// mutual information; the mean and expected entropy are [`McSummaryState::mean`] and
    /// [`McSummaryState::expected_entropy`]). `samples` error before any push; if every push was
    /// rejected the outputs are NaN.
    pub fn finish(&self, stream: &CudaStream, out: &mut McOutputs) -> Result<()> {
        if self.pushes == 0 {
            return Err(Error::invalid("samples", "at least one pushed sample", 0));
        }
        if out.batch != self.batch || out.classes != self.classes {
            return Err(Error::invalid(
                "out",
                format!("outputs for {} x {}", self.batch, self.classes),
                format!("outputs for {} x {}", out.batch, out.classes),
            ));
        }
        // The buffers are public fields: one may have been replaced since `McOutputs::new`.
        check_output_lens(
            self.batch,
            self.classes,
            [
                out.variance.len(),
                out.predictive_entropy.len(),
                out.mutual_information.len(),
            ],
        )?;
        check_stream(stream, out.variance.stream(), "out")?;
        check_stream(stream, out.predictive_entropy.stream(), "out")?;
        check_stream(stream, out.mutual_information.stream(), "out")?;
        self.check_own_streams(stream)?;
        bind(stream)?;
        {
            let (st, _guards) = self.raw(stream);
            let (v, _gv) = out.variance.device_ptr_mut(stream);
            let (h, _gh) = out.predictive_entropy.device_ptr_mut(stream);
            let (mi, _gmi) = out.mutual_information.device_ptr_mut(stream);
            // SAFETY: as in `push_samples`; the outputs hold B * C, B and B values (checked).
            let status = unsafe {
                ffi::dropfuse_mc_summary_finish(
                    &st,
                    v as *mut f32,
                    h as *mut f32,
                    mi as *mut f32,
                    stream.cu_stream() as ffi::dropfuse_stream_t,
                )
            };
            ffi::check(status, "dropfuse_mc_summary_finish")?;
        }
        after(stream)
    }

    /// The counters (synchronises with the stream to read them).
    pub fn counters(&self, stream: &std::sync::Arc<CudaStream>) -> Result<McCounters> {
        let ctl = stream
            .clone_dtoh(&self.ctl)
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        Ok(McCounters {
            accepted: ctl[0],
            rejected: ctl[1],
            first_invalid: ctl[2].checked_sub(1),
        })
    }

    /// `Err(InvalidArgument "probs")` if any push was rejected for an invalid value (synchronises).
    pub fn check(&self, stream: &std::sync::Arc<CudaStream>) -> Result<()> {
        let c = self.counters(stream)?;
        if c.rejected == 0 {
            return Ok(());
        }
        Err(Error::invalid(
            "probs",
            "finite values >= 0",
            format!(
                "{} rejected push(es); the first had an invalid value at index {}",
                c.rejected,
                c.first_invalid.unwrap_or(0)
            ),
        ))
    }
}

/// The device outputs of [`McSummaryState::finish`].
#[derive(Debug)]
pub struct McOutputs {
    batch: usize,
    classes: usize,
    /// Population variance per `(b, c)`, `B x C`.
    pub variance: CudaSlice<f32>,
    /// `H[mean_b]`, `B`.
    pub predictive_entropy: CudaSlice<f32>,
    /// BALD, `max(0, H[mean_b] - E_t[H[p_t,b]])`, `B`.
    pub mutual_information: CudaSlice<f32>,
}

impl McOutputs {
    /// Zeroed outputs for `batch x classes`.
    pub fn new(dev: &Device, batch: usize, classes: usize) -> Result<Self> {
        let n = check_shape(batch, classes)?;
        Ok(McOutputs {
            batch,
            classes,
            variance: dev.zeros(n)?,
            predictive_entropy: dev.zeros(batch)?,
            mutual_information: dev.zeros(batch)?,
        })
    }
}

/// Host copies of every summary, `f32` (for tests and inspection; synchronises).
#[derive(Debug, Clone, PartialEq)]
pub struct McStats32 {
    pub mean: Vec<f32>,
    pub variance: Vec<f32>,
    pub predictive_entropy: Vec<f32>,
    pub expected_entropy: Vec<f32>,
    pub mutual_information: Vec<f32>,
}

impl McStats32 {
    /// Downloads the state's and the outputs' buffers.
    pub fn download(dev: &Device, state: &McSummaryState, out: &McOutputs) -> Result<Self> {
        Ok(McStats32 {
            mean: dev.download(&state.mean)?,
            variance: dev.download(&out.variance)?,
            predictive_entropy: dev.download(&out.predictive_entropy)?,
            expected_entropy: dev.download(&state.expected_entropy)?,
            mutual_information: dev.download(&out.mutual_information)?,
        })
    }
}

/// The summaries of a stored `samples x B x C` stack on the device: a new state, one checked
/// [`McSummaryState::push_stack`], [`McSummaryState::finish`].
pub fn summarize<P: DevicePtr<f32>>(
    dev: &Device,
    probs: &P,
    samples: usize,
    batch: usize,
    classes: usize,
) -> Result<(McSummaryState, McOutputs)> {
    let want = stack_len(samples, check_shape(batch, classes)?)?;
    if probs.len() != want {
        return Err(Error::invalid(
            "probs",
            format!("{want} values (T * B * C)"),
            format!("{} values", probs.len()),
        ));
    }
    let mut state = McSummaryState::new(dev, batch, classes)?;
    let mut out = McOutputs::new(dev, batch, classes)?;
    state.push_stack(dev.stream(), probs, samples)?;
    state.finish(dev.stream(), &mut out)?;
    Ok((state, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `McOutputs`' buffers are public: `finish` must check each one's length, or a replaced,
    /// shorter buffer would be written past its end.
    #[test]
    fn finish_checks_every_output_length() {
        assert!(check_output_lens(3, 5, [15, 3, 3]).is_ok());
        for lens in [[14, 3, 3], [15, 2, 3], [15, 3, 1], [15, 3, 4], [3, 15, 3]] {
            match check_output_lens(3, 5, lens) {
                Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "out", "{lens:?}"),
                other => panic!("{lens:?}: {other:?}"),
            }
        }
    }
}
