//! Attention-layer importance on the GPU ("What Matters in Transformers? Not All Attention is
//! Needed"): the per-token cosine similarity between an attention layer's input and output hidden
//! states, accumulated per layer over calibration batches on the device, then handed to the
//! host-side [`AttentionDropPlan`](crate::layer_plan::AttentionDropPlan) in one read.
//!
//! ```no_run
//! use dropfuse::importance::ImportanceAccumulator;
//! use dropfuse::layer_plan::AttentionDropPlan;
//! use dropfuse::Device;
//! use half::bf16;
//! # fn main() -> dropfuse::Result<()> {
//! let dev = Device::new(0)?;
//! let (layers, tokens, hidden) = (32, 8 * 2048, 4096);
//! let mut acc = ImportanceAccumulator::new(&dev, layers)?;
//! // For every calibration batch and attention layer l, with that layer's input and output
//! // hidden states (B x S x H) still on the GPU, and the padding mask (1 = real token):
//! let x_in = dev.upload(&vec![bf16::from_f32(1.0); tokens * hidden])?;
//! let x_out = dev.upload(&vec![bf16::from_f32(0.5); tokens * hidden])?;
//! let mask = dev.upload(&vec![1u8; tokens])?;
//! acc.add(0, hidden, &x_in, &x_out, Some(&mask))?; // no host synchronisation
//! // ... all layers, all batches; then one read:
//! # for l in 1..layers { acc.add(l, hidden, &x_in, &x_out, None)?; }
//! let sims = acc.to_similarity_accumulator()?;
//! let plan = AttentionDropPlan::from_accumulator(&sims, 8)?; // drop the 8 most redundant
//! println!("importance: {:?}, KV slots: {:?}", plan.importance(), plan.kv_slots());
//! # Ok(()) }
//! ```
//!
//! The contract, and the tolerance of the `f32` kernel against the `f64` reference, are those of
//! [`crate::reference::importance`]: `cos = a . b / (max(|a|, 1e-8) max(|b|, 1e-8))` per token
//! (PyTorch 2.x's `F.cosine_similarity`), the real tokens' similarities summed in `f64` in a fixed
//! order (deterministic, GPU to GPU) into a per-layer `(sum, count)`; importance is
//! `1 - sum / count`. Every call validates its arguments first and returns
//! [`Error::InvalidArgument`] without launching or changing anything when they are wrong.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::device::Device;
use crate::dropout::{after, bind, check_stream, opt_ptr, opt_ptr_mut};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::layer_plan::SimilarityAccumulator;

/// Tokens per tile of the fixed-order sum (the workspace has one entry per tile).
pub const TILE: usize = ffi::DROPFUSE_IMPORTANCE_TILE as usize;

/// Per-layer similarity sums and token counts on the device, for `layers` attention layers, and
/// the scratch space of the fixed-order reduction (grown on demand, stream-ordered).
#[derive(Debug)]
pub struct ImportanceAccumulator {
    stream: Arc<CudaStream>,
    sums: CudaSlice<f64>,
    counts: CudaSlice<u64>,
    tile_sums: CudaSlice<f64>,
    tile_counts: CudaSlice<u64>,
}

impl ImportanceAccumulator {
    /// An empty accumulator for `layers >= 1` attention layers on `dev`'s stream (error `layers`,
    /// also for more layers than an `f64` device buffer holds).
    pub fn new(dev: &Device, layers: usize) -> Result<Self> {
        if layers == 0 {
            return Err(Error::invalid("layers", "at least 1 attention layer", 0));
        }
        crate::device::check_device_len::<f64>("layers", layers)?;
        let stream = dev.stream().clone();
        let alloc = |e| Error::driver("cuMemAlloc", e);
        Ok(ImportanceAccumulator {
            sums: stream.alloc_zeros(layers).map_err(alloc)?,
            counts: stream.alloc_zeros(layers).map_err(alloc)?,
            tile_sums: stream.alloc_zeros(1).map_err(alloc)?,
            tile_counts: stream.alloc_zeros(1).map_err(alloc)?,
            stream,
        })
    }

    /// Number of attention layers.
    pub fn layers(&self) -> usize {
        self.sums.len()
    }

    /// The stream the accumulator's work is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Adds one batch of attention layer `layer`: `input` and `output` are its hidden states,
    /// `tokens x hidden` row-major (e.g. `B x S x H`); `mask` (optional) has one byte per token,
    /// non-zero for a real token (padding tokens are not read or counted). Enqueued on the
    /// accumulator's stream; nothing is read back.
    ///
    /// Errors: `layer`, `hidden`, `input`, `output`, `mask` (length or context).
    pub fn add<T: Element, I: DevicePtr<T>, O: DevicePtr<T>>(
        &mut self,
        layer: usize,
        hidden: usize,
        input: &I,
        output: &O,
        mask: Option<&dyn DevicePtr<u8>>,
    ) -> Result<()> {
        self.add_impl(layer, hidden, input, output, mask, None)
    }

    /// [`add`](Self::add), also writing every token's similarity into `similarities` (one `f32`
    /// per token; NaN for padding tokens).
    ///
    /// Errors: as [`add`](Self::add), and `similarities` (length or context).
    pub fn add_with_similarities<T: Element, I: DevicePtr<T>, O: DevicePtr<T>>(
        &mut self,
        layer: usize,
        hidden: usize,
        input: &I,
        output: &O,
        mask: Option<&dyn DevicePtr<u8>>,
        similarities: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        self.add_impl(layer, hidden, input, output, mask, Some(similarities))
    }

    fn add_impl<T: Element, I: DevicePtr<T>, O: DevicePtr<T>>(
        &mut self,
        layer: usize,
        hidden: usize,
        input: &I,
        output: &O,
        mask: Option<&dyn DevicePtr<u8>>,
        similarities: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        // Validation: every argument before anything happens.
        if layer >= self.layers() {
            return Err(Error::invalid(
                "layer",
                format!("an attention layer index < {}", self.layers()),
                layer,
            ));
        }
        if hidden == 0 {
            return Err(Error::invalid("hidden", "at least 1", 0));
        }
        let n = input.len();
        if n == 0 || n % hidden != 0 {
            return Err(Error::invalid(
                "input",
                format!("a non-empty whole number of rows of {hidden} elements"),
                format!("{n} elements"),
            ));
        }
        let tokens = n / hidden;
        if output.len() != n {
            return Err(Error::invalid(
                "output",
                format!("{n} elements (the input's length)"),
                format!("{} elements", output.len()),
            ));
        }
        let per_token = |name: &'static str, len: usize| {
            if len == tokens {
                Ok(())
            } else {
                Err(Error::invalid(
                    name,
                    format!("{tokens} entries (one per token)"),
                    len,
                ))
            }
        };
        if let Some(m) = mask {
            per_token("mask", m.len())?;
        }
        if let Some(s) = similarities.as_deref() {
            per_token("similarities", s.len())?;
        }
        let stream = self.stream.clone();
        check_stream(&stream, input.stream(), "input")?;
        check_stream(&stream, output.stream(), "output")?;
        if let Some(m) = mask {
            check_stream(&stream, m.stream(), "mask")?;
        }
        if let Some(s) = similarities.as_deref() {
            check_stream(&stream, s.stream(), "similarities")?;
        }
        bind(&stream)?;

        // Scratch: one entry per tile, grown (stream-ordered) when this batch needs more.
        let tiles = tokens.div_ceil(TILE);
        if self.tile_sums.len() < tiles {
            let alloc = |e| Error::driver("cuMemAlloc", e);
            self.tile_sums = stream.alloc_zeros(tiles).map_err(alloc)?;
            self.tile_counts = stream.alloc_zeros(tiles).map_err(alloc)?;
        }

        let (ip, _gi) = input.device_ptr(&stream);
        let (op, _go) = output.device_ptr(&stream);
        let (mp, _gm) = opt_ptr(mask, &stream);
        let (sp, _gs) = opt_ptr_mut(similarities, &stream);
        let (ts, _gts) = self.tile_sums.device_ptr_mut(&stream);
        let (tc, _gtc) = self.tile_counts.device_ptr_mut(&stream);
        let (ls, _gls) = self.sums.device_ptr_mut(&stream);
        let (lc, _glc) = self.counts.device_ptr_mut(&stream);
        // SAFETY: every buffer was validated (lengths, contexts) and is kept alive and ordered on
        // `stream` by its guard until after the launch is enqueued; `layer < layers` keeps the
        // layer's entries in bounds; the scratch holds >= ceil(tokens / TILE) entries; the only
        // written buffers (similarities, scratch, sums, counts) are distinct mutable borrows.
        let status = unsafe {
            ffi::dropfuse_importance_accumulate(
                crate::dropout::raw::dtype(T::DTYPE),
                ip as *const c_void,
                op as *const c_void,
                mp as *const u8,
                sp as *mut f32,
                tokens as u64,
                hidden as u64,
                ts as *mut f64,
                tc as *mut u64,
                (ls as *mut f64).add(layer),
                (lc as *mut u64).add(layer),
                stream.cu_stream() as ffi::dropfuse_stream_t,
            )
        };
        ffi::check(status, "dropfuse_importance_accumulate")?;
        after(&stream)
    }

    /// Zeroes every layer's sum and count (stream-ordered).
    pub fn reset(&mut self) -> Result<()> {
        let s = self.stream.clone();
        s.memset_zeros(&mut self.sums)
            .map_err(|e| Error::driver("cuMemsetD8Async", e))?;
        s.memset_zeros(&mut self.counts)
            .map_err(|e| Error::driver("cuMemsetD8Async", e))
    }

    /// Every layer's similarity sum and token count (one read: synchronizes the stream).
    pub fn download(&self) -> Result<(Vec<f64>, Vec<u64>)> {
        let dl = |e| Error::driver("cuMemcpyDtoH", e);
        let sums = self.stream.clone_dtoh(&self.sums).map_err(dl)?;
        let counts = self.stream.clone_dtoh(&self.counts).map_err(dl)?;
        Ok((sums, counts))
    }

    /// Adds every layer's `(sum, count)` to `acc` (the host plan's accumulator), skipping layers
    /// without tokens: after it `acc` holds what it would hold had each batch been added to it on
    /// the host. One read.
    ///
    /// Errors: `accumulator` (another number of layers), `similarity_sum` (a non-finite sum:
    /// NaN or infinite input values), `tokens` (count overflow); `acc` is unchanged on error.
    pub fn add_to(&self, acc: &mut SimilarityAccumulator) -> Result<()> {
        if acc.layers() != self.layers() {
            return Err(Error::invalid(
                "accumulator",
                format!("{} attention layers", self.layers()),
                acc.layers(),
            ));
        }
        let (sums, counts) = self.download()?;
        for (l, (&s, &c)) in sums.iter().zip(&counts).enumerate() {
            if c == 0 {
                continue;
            }
            if !s.is_finite() {
                return Err(Error::invalid("similarity_sum", "a finite value", s));
            }
            if acc.tokens()[l].checked_add(c).is_none() {
                return Err(Error::invalid("tokens", "a total token count < 2^64", c));
            }
        }
        for (l, (&s, &c)) in sums.iter().zip(&counts).enumerate() {
            if c > 0 {
                acc.add(l, s, c)?;
            }
        }
        Ok(())
    }

    /// A new host [`SimilarityAccumulator`] holding this one's sums and counts (one read):
    /// `AttentionDropPlan::from_accumulator` takes it directly.
    ///
    /// Errors: `similarity_sum` (a non-finite sum).
    pub fn to_similarity_accumulator(&self) -> Result<SimilarityAccumulator> {
        let mut acc = SimilarityAccumulator::new(self.layers())?;
        self.add_to(&mut acc)?;
        Ok(acc)
    }

    /// Every layer's importance `1 - sum / count` (`None` for a layer without tokens). One read.
    pub fn importance(&self) -> Result<Vec<Option<f64>>> {
        let (sums, counts) = self.download()?;
        Ok(sums
            .iter()
            .zip(&counts)
            .map(|(&s, &c)| (c > 0).then(|| 1.0 - s / c as f64))
            .collect())
    }
}
