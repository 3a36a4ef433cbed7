//! The multi-sample dropout head: [`MultiSampleHead`] (configuration, forward, backward) and
//! [`HeadWorkspace`] (its buffers and cuBLAS handle).
//!
//! * **Randomness and CUDA graphs.** The forward takes any [`Randomness`]: a host
//!   [`PhiloxState`](crate::PhiloxState), or a [`DevicePhilox`](crate::DevicePhilox) read by the
//!   copies kernel when it runs (sample `k` on `device offset + add + k`), so a training step
//!   captured into a CUDA graph (forward, backward, then [`DevicePhilox::advance`]`(K)`) draws fresh
//!   masks on every replay: replay `r` of a graph captured at device offset `o` equals the eager
//!   step with the host state `{seed, o + r * K}`, bit for bit. The backward reads the masks the
//!   forward stored, never the state. The GEMMs are capturable: each handle has its own cuBLAS
//!   workspace, so cuBLAS allocates nothing while a stream is captured (run the step once eagerly
//!   before capturing it, as for any cuBLAS work). Capture with cudarc's event tracking off
//!   (`unsafe { dev.context().disable_event_tracking() }` before `begin_capture`, back on after the
//!   capture; `tests/graph_gpu.rs` does so): with it on, every buffer use waits on an event recorded
//!   before the capture, which CUDA rejects in a capturing stream (the capture is invalidated). A
//!   graph keeps the batch it was captured with; the workspace's recorded batch is host state that
//!   a replay does not change.
//! * **Batch size.** A workspace is allocated for a capacity `B_max` and serves any batch
//!   `1 ..= B_max` ([`HeadWorkspace`]'s docs); the backward and the readers use the last forward's
//!   `B` ([`HeadWorkspace::batch`]).
//!
//! [`DevicePhilox::advance`]: crate::DevicePhilox::advance

use std::ffi::c_void;

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::blas::{Blas, GemmCall, GemmDesc};
use super::{check_k, check_out_dtype, masks_len, MAX_K};
use crate::checks::check_len;
use crate::device::Device;
use crate::dropout::{after, bind, check_stream, raw::dtype as ffi_dtype, Dropout};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ffi;
use crate::reference::multi_sample::{HeadConfig, DEFAULT_IGNORE_INDEX};
use crate::rng::Randomness;

/// cuBLAS's dimensions are `i32`.
const MAX_DIM: usize = i32::MAX as usize;

/// The head's three GEMMs for `rows` stacked rows (`K * B` in training mode, `B` in evaluation
/// mode), `D` features and `C` classes, all matrices row-major:
/// * `logits`: A = `W` (`C x D`), B = `h_all` (`rows x D`), C = `z` (`rows x C`): `z = h_all W^T`;
/// * `dh`: A = `W`, B = `dz` (`rows x C`), C = `dh_all` (`rows x D`): `dh_all = dz W`;
/// * `dw`: A = `h_all`, B = `dz`, C = `dW` (`C x D`): `dW = dz^T h_all`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadGemms {
    pub logits: GemmDesc,
    pub dh: GemmDesc,
    pub dw: GemmDesc,
}

#[doc(hidden)]
pub fn head_gemms(rows: usize, d: usize, c: usize) -> HeadGemms {
    let g = |trans_a, trans_b, m, n, k, lda, ldb, ldc| GemmDesc {
        trans_a,
        trans_b,
        m,
        n,
        k,
        lda,
        ldb,
        ldc,
    };
    HeadGemms {
        // z^T (C x rows) = W (C x D: W^T stored, transposed) . h_all^T (D x rows).
        logits: g(true, false, c, rows, d, d, d, c),
        // dh_all^T (D x rows) = W^T (D x C, as stored) . dz^T (C x rows).
        dh: g(false, false, d, rows, c, d, c, d),
        // dW^T (D x C) = h_all^T (D x rows) . dz (rows x C: dz^T stored, transposed).
        dw: g(false, true, d, c, rows, d, c, d),
    }
}

/// The head's three GEMM calls ([`head_gemms`] with their scalars and types) for a batch of `b`
/// rows, element type `t`, `dh` of type `gh` and `dW` of type `gw` (each `t` or `f32`) and the
/// backward's `grad_scale`: what [`MultiSampleHead::forward`] and [`MultiSampleHead::backward`]
/// pass to cuBLAS, as a pure function (for the host check of the plan).
/// * `logits`: `z = h_all W^T + beta z` in `f32`, `beta = 1` with a bias (`z` holds the broadcast
///   bias), 0 without;
/// * `dh`: training mode `dh_all = (S dz) W` in `f32` (`alpha = 1`: the masked reduction applies
///   `keep * scale * grad_scale / S`), evaluation mode `dh = (grad_scale / S) (S dz) W` in `gh`;
/// * `dw`: `dW = (grad_scale / S) (S dz)^T h_all` in `gw`;
///
/// with `S` = [`MultiSampleHead::logits_grad_scale`]`(samples, b)`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadGemmPlan {
    pub logits: GemmCall,
    pub dh: GemmCall,
    pub dw: GemmCall,
}

/// The multi-sample dropout head on the GPU: `K` dropout samples of the features through one
/// shared linear classifier, the averaged cross-entropy, and the backward, in a few launches. This
/// value is the configuration (`K` samples at drop probability `p`, label smoothing, ignore index,
/// bias on or off, training or evaluation mode; validated, `Copy`); the buffers live in a
/// [`HeadWorkspace`].
///
/// The contract is the `f64` reference's, [`crate::reference::multi_sample::head`] (points 1-7 of
/// its module docs): features `h` (`B x D`, row-major, element type `T`), weight `W` (`C x D`),
/// optional bias `b` (`C`), labels `y` (`B` `i64`, with the ignore index), sample `k` on the Philox
/// stream `offset + k`. Evaluation mode: `K = 1`, no dropout, `h` itself.
///
/// The state is any [`Randomness`]: a host [`PhiloxState`](crate::PhiloxState) or a
/// [`DevicePhilox`](crate::DevicePhilox) (`&state`: stream `device offset + k` for sample `k`;
/// `state.at(add)`: `device offset + add + k`) that the copies kernel reads when it runs, for
/// CUDA graphs (module docs of [`crate::rng`]): a graph holding the forward (and the backward)
/// and then `DevicePhilox::advance(K)` replays with fresh masks. A workspace of capacity `B_max`
/// runs any batch `B <= B_max` ([`HeadWorkspace`]).
///
/// **Forward** ([`MultiSampleHead::forward`]), with the `K` copies stacked as one `(K*B) x D`
/// matrix `h_all` (copy `k` at rows `k*B ..`):
/// 1. the `K` masked copies and their bit masks in one launch ([`MultiSample`](super::MultiSample); bit for bit the
///    reference's copies; skipped in evaluation mode, where `h_all = h`);
/// 2. with a bias, one launch broadcasting `b` into the `f32` logits buffer (`K*B` rows);
/// 3. **one** `cublasGemmEx`: `z = h_all W^T (+ z)` (`(K*B) x C`, `f32`; `beta = 1` adds the
///    broadcast bias once, after the dot product, as the reference does). `W` is shared by the `K`
///    samples, so this one GEMM over `K*B` rows is exactly the strided-batched GEMM with a weight
///    stride of 0, with a larger `n` for cuBLAS to tile;
/// 4. the weighted cross-entropy kernel ([`WeightedCrossEntropy`](super::WeightedCrossEntropy)'s) with `w_k = 1/K` on the `f32`
///    logits: the loss (one `f32` in the workspace) and `dz` in `T`, written **scaled** by the
///    power of two [`MultiSampleHead::logits_grad_scale`] `S` (about `K * B`), so that `dz` (about
///    `(softmax - t) / (K * n_valid)`) is stored near 1 instead of in the f16 subnormal range.
///
/// The averaged logits `sum_k z_k / K` (`B x C`, `f32`) are one more launch on demand
/// ([`HeadWorkspace::mean_logits`]). No host synchronisation; [`HeadWorkspace::read_loss`] and
/// [`HeadWorkspace::check_labels`] synchronise.
///
/// **Backward** ([`MultiSampleHead::backward`]), every gradient multiplied by `grad_scale` (1 for
/// the plain gradient; a loss scale otherwise; a power of two keeps the scaling exact), with
/// `a = grad_scale / S`:
/// 1. **one** GEMM `dh_all = dz W` (`(K*B) x D`, written in `f32` to the workspace: no f16 range
///    issue and one rounding less), then the masked reduction kernel
///    `dh = sum_k keep_k * dh_k * (scale * a)` ([`MultiSample::reduce`](super::MultiSample::reduce)'s kernel, stored masks); in
///    evaluation mode one GEMM `dh = a * dz W` straight into `dh`;
/// 2. **one** GEMM over the `K*B` rows: `dW = a * dz^T h_all` (`C x D`);
/// 3. with a bias, `db = a * (column sums of dz over the K*B rows)`: a small deterministic kernel
///    (chunks of 256 rows in a fixed order, two launches).
///
/// GEMMs take `T` operands and accumulate in `f32` (`CUBLAS_COMPUTE_32F`; for `f32` inputs
/// `CUBLAS_COMPUTE_32F_PEDANTIC` and the default math mode: no TF32, whatever
/// `NVIDIA_TF32_OVERRIDE` says; reduced-precision reductions disallowed, so split-K partials of an
/// f16/bf16 output are summed in `f32` and the output is rounded once). Outputs: loss and logits in `f32`; `dh`, `dW`, `db` in `T` or `f32`
/// (the output buffers' types; `f32` recommended for f16 without a loss scale, since the
/// gradients of a mean over many rows are tiny). cuBLAS is bitwise reproducible run to run on the
/// same GPU model, cuBLAS version and handle setup (each workspace owns its handle and cuBLAS
/// workspace), not across GPU models or versions; the kernels are deterministic everywhere.
///
/// **Error bounds** against the `f64` reference, for logits up to about 10 in magnitude (the
/// bounds the GPU tests use): the loss within `2e-5 * max(1, |loss|)` and the averaged logits'
/// relative error norm `||got - ref|| / ||ref||` below `1e-5` for every dtype (`T` products are
/// exact in `f32`, the logits are never rounded to `T`); the gradients' relative error norms below
/// `1e-5` for `f32` and below `1e-2` for `f16`/`bf16` (`dz` is rounded once to `T` for the backward
/// GEMMs, the outputs once more when they are in `T`; f16 outputs must be scaled into f16's normal
/// range by `grad_scale`). Each of these relative bounds comes with the rounding errors that do not
/// shrink with the result: `||got - ref|| <= tol ||ref|| + ||slack||`, the slack being the
/// propagated absolute error of each `dz` element (the cross-entropy's, including its
/// smoothed-optimum term; `dz`'s rounding to `T` and f16 underflow; the `f32` sums it enters,
/// first order, any order) through `|W|`, `|h|` and the column sums, and for the averaged logits
/// `(D + K + 3) 2^-24` times the sums of the products' magnitudes. It matters only where a result
/// is a cancellation: `db`, a column sum over rows of `p - t` that nearly cancel; `dh` with
/// `B = 1` or `D = 1`; confidently classified rows; rows at the smoothed optimum
/// (tests/multi_sample_head_gpu.rs, `within` and `slack`, checks a bound of this form).
///
/// **Labels** are checked on the device: a label neither in `[0, C)` nor the ignore index makes
/// the forward write no loss and zeros into `dz` (workspace), so a backward then writes zero
/// gradients; [`HeadWorkspace::check_labels`] (synchronises) returns the reference's `labels`
/// error naming the first bad row. Every other argument is validated before anything runs
/// ([`Error::InvalidArgument`](crate::Error::InvalidArgument), nothing written).
///
/// ```no_run
/// use dropfuse::multi_sample::MultiSampleHead;
/// use dropfuse::{Device, DevicePhilox, Generator, PhiloxState};
/// use half::f16;
/// # fn main() -> dropfuse::Result<()> {
/// let dev = Device::new(0)?;
/// let (k, b, d, c) = (8, 32, 64, 10);
/// let head = MultiSampleHead::new(k, 0.5)?.with_label_smoothing(0.1)?;
/// let mut ws = head.workspace::<f16>(&dev, b, d, c)?; // Error::NoCublas without libcublas
/// let h = dev.upload(&vec![f16::from_f32(0.5); b * d])?;
/// let w = dev.upload(&vec![f16::from_f32(0.01); c * d])?;
/// let bias = dev.zeros::<f16>(c)?;
/// let labels = dev.upload(&vec![3i64; b])?;
/// let mut rng = Generator::new(7);
/// head.forward(&mut ws, rng.next_streams(k as u64), &h, &w, Some(&bias), &labels)?;
/// let (mut dh, mut dw, mut db) = (dev.zeros::<f32>(b * d)?, dev.zeros::<f32>(c * d)?, dev.zeros::<f32>(c)?);
/// head.backward(&mut ws, &h, &w, &mut dh, &mut dw, Some(&mut db), 1.0)?;
/// let loss = ws.read_loss()?; // synchronises
///
/// // Graph-safe randomness: (seed, offset) read from device memory when the kernel runs, and a
/// // smaller batch (8 rows) on the same workspace (capacity b = 32).
/// let mut state = DevicePhilox::new(dev.stream(), PhiloxState::new(7, 100))?;
/// let (h8, labels8) = (dev.upload(&vec![f16::from_f32(0.5); 8 * d])?, dev.upload(&[3i64; 8])?);
/// head.forward(&mut ws, &state, &h8, &w, Some(&bias), &labels8)?;
/// state.advance(dev.stream(), k as u64)?; // the next step's masks; the backward uses stored ones
/// let mut dh8 = dev.zeros::<f32>(8 * d)?;
/// head.backward(&mut ws, &h8, &w, &mut dh8, &mut dw, Some(&mut db), 1.0)?;
/// assert_eq!((ws.batch(), ws.capacity()), (8, b));
/// # let _ = loss; Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiSampleHead {
    k: usize,
    drop: Dropout,
    label_smoothing: f64,
    ignore_index: i64,
    bias: bool,
    train: bool,
}

impl MultiSampleHead {
    /// `K` samples (`1 ..= MAX_K`) at drop probability `p` (`[0, 1]`): training mode, with a bias,
    /// no label smoothing, ignore index -100.
    pub fn new(k: usize, p: f64) -> Result<Self> {
        check_k(k, MAX_K)?;
        Ok(MultiSampleHead {
            k,
            drop: Dropout::new(p)?,
            label_smoothing: 0.0,
            ignore_index: DEFAULT_IGNORE_INDEX,
            bias: true,
            train: true,
        })
    }

    /// The reference's configuration ([`HeadConfig`]) and whether there is a bias.
    pub fn from_config(cfg: &HeadConfig, bias: bool) -> Result<Self> {
        Ok(MultiSampleHead::new(cfg.k, cfg.p)?
            .with_label_smoothing(cfg.label_smoothing)?
            .with_ignore_index(cfg.ignore_index)
            .with_bias(bias)
            .with_train(cfg.train))
    }

    /// The reference's configuration of this head.
    pub fn config(&self) -> HeadConfig {
        HeadConfig {
            k: self.k,
            p: self.drop.p(),
            label_smoothing: self.label_smoothing,
            ignore_index: self.ignore_index,
            train: self.train,
        }
    }

    /// Label smoothing `eps`, finite and in `[0, 1]` (PyTorch's definition).
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

    /// With or without the bias `b`.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Training mode (`true`: `K` dropout samples) or evaluation mode (`false`: one pass on `h`).
    pub fn with_train(mut self, train: bool) -> Self {
        self.train = train;
        self
    }

    /// `K` as configured.
    pub fn k(&self) -> usize {
        self.k
    }
    /// The samples a forward runs: `K` in training mode, 1 in evaluation mode.
    pub fn samples(&self) -> usize {
        if self.train {
            self.k
        } else {
            1
        }
    }
    pub fn p(&self) -> f64 {
        self.drop.p()
    }
    /// The multiplier of kept elements in training mode.
    pub fn keep_scale(&self) -> f32 {
        self.drop.scale()
    }
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
    }
    pub fn ignore_index(&self) -> i64 {
        self.ignore_index
    }
    pub fn has_bias(&self) -> bool {
        self.bias
    }
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// The power of two `S` the forward stores `dz` multiplied by (for `samples` logit sets of `b`
    /// rows): the largest power of two `<= samples * min(b, 2^15)`. Then
    /// `|S dz| <= min(b, 2^15) / n_valid <= 2^15` (below f16's maximum) and, with every row valid,
    /// `S dz` is about `softmax - t`, well inside f16's normal range.
    pub fn logits_grad_scale(samples: usize, b: usize) -> f32 {
        // In u128: no overflow for any arguments; 2^e (e < 79) built from its exponent bits.
        let m = samples.max(1) as u128 * b.clamp(1, 1 << 15) as u128;
        f32::from_bits((m.ilog2() + 127) << 23)
    }

    /// The GEMM calls of a forward + backward of this head on a batch of `b` rows ([`HeadGemmPlan`]).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_plan(
        &self,
        b: usize,
        d: usize,
        c: usize,
        t: DType,
        gh: DType,
        gw: DType,
        grad_scale: f32,
    ) -> HeadGemmPlan {
        let samples = self.samples();
        // Saturating: a batch whose rows overflow usize gets dimensions `gemm_ex_args` rejects.
        let g = head_gemms(samples.saturating_mul(b), d, c);
        let alpha = grad_scale / Self::logits_grad_scale(samples, b);
        let call = |desc, alpha, beta, out| GemmCall {
            desc,
            alpha,
            beta,
            ab: t,
            out,
        };
        HeadGemmPlan {
            logits: call(g.logits, 1.0, if self.bias { 1.0 } else { 0.0 }, DType::F32),
            dh: if self.train {
                call(g.dh, 1.0, 0.0, DType::F32)
            } else {
                call(g.dh, alpha, 0.0, gh)
            },
            dw: call(g.dw, alpha, 0.0, gw),
        }
    }

    /// Allocates the buffers and the cuBLAS handle of a head of up to `b` rows (the workspace's
    /// capacity: every forward on it may take any batch `B` in `1 ..= b`), `D` features and `C`
    /// classes for element type `T` on `dev`'s stream: [`Error::NoCublas`] without cuBLAS,
    /// `b`/`d`/`c` errors for zero sizes or sizes cuBLAS cannot take (`K * b`, `D`, `C` up to
    /// `i32::MAX`).
    pub fn workspace<T: Element>(
        &self,
        dev: &Device,
        b: usize,
        d: usize,
        c: usize,
    ) -> Result<HeadWorkspace<T>> {
        let k = self.samples();
        for (name, v, max) in [("b", b, MAX_DIM / k), ("d", d, MAX_DIM), ("c", c, MAX_DIM)] {
            if v == 0 || v > max {
                return Err(Error::invalid(
                    name,
                    format!("1 ..= {max} (cuBLAS dimensions are i32)"),
                    v,
                ));
            }
        }
        let rows = k * b;
        let n = super::product("h", b, d)?;
        let kn = super::product("h", k, n)?;
        let logits = super::product("c", rows, c)?;
        let blas = Blas::new(dev)?;
        let (copies, masks, dh_all) = if self.train {
            (
                Some(dev.zeros::<T>(kn)?),
                Some(dev.zeros::<u32>(masks_len(k, n))?),
                Some(dev.zeros::<f32>(kn)?),
            )
        } else {
            (None, None, None)
        };
        // SAFETY: a pure function of its arguments.
        let colsum_len = unsafe { ffi::dropfuse_column_sums_scratch_floats(rows as u64, c as u64) } as usize;
        Ok(HeadWorkspace {
            dev: dev.clone(),
            blas,
            k,
            capacity: b,
            b,
            d,
            c,
            train: self.train,
            copies,
            masks,
            dh_all,
            z: dev.zeros::<f32>(logits)?,
            dz: dev.zeros::<T>(logits)?,
            scratch: dev.zeros::<u64>(super::WeightedCrossEntropy::scratch_len(k, b))?,
            colsum: dev.zeros::<f32>(colsum_len)?,
            loss: dev.zeros::<f32>(1)?,
            filled_by: None,
        })
    }

    fn ce_params(&self, b: usize, c: usize) -> ffi::dropfuse_weighted_ce_params {
        let k = self.samples();
        let mut weights = [0.0f32; super::MAX_LOSS_SETS];
        for w in weights.iter_mut().take(k) {
            *w = (1.0 / k as f64) as f32;
        }
        ffi::dropfuse_weighted_ce_params {
            k: k as u64,
            b: b as u64,
            c: c as u64,
            ignore_index: self.ignore_index,
            label_smoothing: self.label_smoothing as f32,
            weights,
        }
    }

    /// The copies' / reduction's launch params for `(seed, offset, philox_dev)` as
    /// [`Source::bind`](crate::rng::Source) gives them (`(0, 0, null)` for the backward's
    /// reduction, which reads the stored masks and no randomness).
    fn sample_params(
        &self,
        (seed, offset, philox_dev): (u64, u64, *const u64),
        scale: f32,
    ) -> ffi::dropfuse_multi_sample_params {
        ffi::dropfuse_multi_sample_params {
            seed,
            offset,
            k: self.k as u64,
            threshold: self.drop.threshold(),
            scale,
            philox_dev,
        }
    }

    /// The forward (see the module docs): masked copies (training mode, sample `k` on the stream
    /// `offset + k` of `state`), logits, loss and the scaled `dz` into `ws`. `h`: `B * D`,
    /// `weight`: `C * D`, `bias`: `C` values exactly when the head has a bias, `labels`: `B`, for
    /// any batch `B` in `1 ..= ws.capacity()` (taken from `h`; see [`HeadWorkspace`]).
    ///
    /// `state` is any [`Randomness`]: a [`PhiloxState`](crate::PhiloxState) fixed at launch, or a
    /// [`DevicePhilox`](crate::DevicePhilox) (`&state` or `state.at(add)`, on the workspace's
    /// context: `rng` otherwise) read by the copies kernel when it runs, so that a captured CUDA
    /// graph draws fresh masks on every replay (module docs). Evaluation mode reads no randomness
    /// (the state is validated only).
    pub fn forward<T: Element, H: DevicePtr<T>, W: DevicePtr<T>, L: DevicePtr<i64>, R: Randomness>(
        &self,
        ws: &mut HeadWorkspace<T>,
        state: R,
        h: &H,
        weight: &W,
        bias: Option<&dyn DevicePtr<T>>,
        labels: &L,
    ) -> Result<()> {
        ws.check_head(self)?;
        let (k, d, c) = (ws.k, ws.d, ws.c);
        let b = head_batch(d, ws.capacity, h.len(), labels.len())?;
        let rows = k * b;
        let stream = ws.dev.stream().clone();
        check_len("weight", weight.len(), c * d, "C * D")?;
        head_bias(self.bias, c, bias.map(|x| x.len()))?;
        check_stream(&stream, h.stream(), "h")?;
        check_stream(&stream, weight.stream(), "weight")?;
        if let Some(x) = bias {
            check_stream(&stream, x.stream(), "bias")?;
        }
        check_stream(&stream, labels.stream(), "labels")?;
        let source = state.source();
        source.check(&stream)?;
        bind(&stream)?;
        ws.filled_by = None;

        let cu = stream.cu_stream() as ffi::dropfuse_stream_t;
        let (hp, _gh) = h.device_ptr(&stream);
        let (wp, _gw) = weight.device_ptr(&stream);
        let (lp, _gl) = labels.device_ptr(&stream);
        let bias_ptr = bias.map(|x| x.device_ptr(&stream));
        let (zp, _gz) = ws.z.device_ptr_mut(&stream);
        let (dzp, _gdz) = ws.dz.device_ptr_mut(&stream);
        let (sp, _gs) = ws.scratch.device_ptr_mut(&stream);
        let (lossp, _gloss) = ws.loss.device_ptr_mut(&stream);
        let copies = match (ws.copies.as_mut(), ws.masks.as_mut()) {
            (Some(cp), Some(mk)) => Some((cp.device_ptr_mut(&stream), mk.device_ptr_mut(&stream))),
            _ => None,
        };
        // SAFETY: every length, dtype and context was validated above; the workspace buffers are
        // distinct from the inputs and from each other; the sizes fit cuBLAS's i32 (workspace).
        unsafe {
            let src = match &copies {
                Some(((cp, _), (mp, _))) => {
                    let (seed, offset, dev, _gr) = source.bind(&stream);
                    let params = self.sample_params((seed, offset, dev), self.drop.scale());
                    let st = ffi::dropfuse_multi_sample_copies(
                        ffi_dtype(T::DTYPE),
                        hp as *const c_void,
                        *cp as *mut c_void,
                        *mp as *mut u32,
                        (b * d) as u64,
                        &params,
                        cu,
                    );
                    ffi::check(st, "dropfuse_multi_sample_copies")?;
                    *cp
                }
                None => hp,
            };
            // The logits GEMM has beta = 1 exactly when the head has a bias (head_bias checked
            // that `bias` is given then), adding to the broadcast bias.
            if let Some((bp, _)) = &bias_ptr {
                let st = ffi::dropfuse_multi_sample_bias_rows(
                    ffi_dtype(T::DTYPE),
                    *bp as *const c_void,
                    zp as *mut f32,
                    rows as u64,
                    c as u64,
                    cu,
                );
                ffi::check(st, "dropfuse_multi_sample_bias_rows")?;
            }
            let plan = self.gemm_plan(b, d, c, T::DTYPE, T::DTYPE, T::DTYPE, 1.0);
            ws.blas.gemm(&plan.logits, wp, src, zp)?;
            let params = self.ce_params(b, c);
            let st = ffi::dropfuse_weighted_ce_scaled(
                ffi_dtype(DType::F32),
                zp as *const c_void,
                lp as *const i64,
                lossp as *mut f32,
                ffi_dtype(T::DTYPE),
                dzp as *mut c_void,
                sp as *mut c_void,
                &params,
                Self::logits_grad_scale(k, b),
                1,
                cu,
            );
            ffi::check(st, "dropfuse_weighted_ce_scaled")?;
        }
        after(&stream)?;
        // Recorded only once every launch succeeded, with `filled_by`.
        ws.b = b;
        ws.filled_by = Some(*self);
        Ok(())
    }

    /// The backward of the last [`forward`](Self::forward) on `ws` (by this head), for that
    /// forward's batch `B` ([`HeadWorkspace::batch`]): `dh` (`B * D`, `GH` = `T` or `f32`), `dw`
    /// (`C * D`) and, exactly when the head has a bias, `db` (`C`; both `GW` = `T` or `f32`), each
    /// multiplied by `grad_scale` (finite, `> 0`). `h` and `weight` are the forward's (`h` is read
    /// in evaluation mode only; training mode uses the stored copies).
    ///
    /// The backward takes no randomness: it applies the `K` masks the forward stored in `ws`, so
    /// it is right whatever happened to the forward's state since (a [`DevicePhilox`] advanced
    /// between the forward and the backward, as a captured training step does, is never read
    /// again).
    ///
    /// [`DevicePhilox`]: crate::DevicePhilox
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T, GH, GW, H, W, DH, DW>(
        &self,
        ws: &mut HeadWorkspace<T>,
        h: &H,
        weight: &W,
        dh: &mut DH,
        dw: &mut DW,
        db: Option<&mut dyn DevicePtrMut<GW>>,
        grad_scale: f32,
    ) -> Result<()>
    where
        T: Element,
        GH: Element,
        GW: Element,
        H: DevicePtr<T>,
        W: DevicePtr<T>,
        DH: DevicePtrMut<GH>,
        DW: DevicePtrMut<GW>,
    {
        ws.check_head(self)?;
        if ws.filled_by != Some(*self) {
            return Err(Error::invalid(
                "workspace",
                "a workspace this head's forward has filled",
                "a workspace without this head's forward",
            ));
        }
        if !(grad_scale > 0.0 && grad_scale.is_finite()) {
            return Err(Error::invalid("grad_scale", "a finite scale > 0", grad_scale));
        }
        // B is the last forward's batch (at most the workspace's capacity).
        let (k, b, d, c) = (ws.k, ws.b, ws.d, ws.c);
        let rows = k * b;
        let stream = ws.dev.stream().clone();
        check_len("h", h.len(), b * d, "B * D, B = the forward's batch")?;
        check_len("weight", weight.len(), c * d, "C * D")?;
        check_len("dh", dh.len(), b * d, "B * D, B = the forward's batch")?;
        check_len("dw", dw.len(), c * d, "C * D")?;
        match (&db, self.bias) {
            (None, true) => {
                return Err(Error::invalid(
                    "db",
                    format!("{c} values (C): the head has a bias"),
                    "none",
                ))
            }
            (Some(x), false) => {
                return Err(Error::invalid(
                    "db",
                    "none: the head has no bias",
                    format!("{} values", x.len()),
                ))
            }
            (Some(x), true) => check_len("db", x.len(), c, "C")?,
            (None, false) => {}
        }
        check_out_dtype::<T, GH>("dh")?;
        check_out_dtype::<T, GW>("dw")?;
        check_stream(&stream, h.stream(), "h")?;
        check_stream(&stream, weight.stream(), "weight")?;
        check_stream(&stream, dh.stream(), "dh")?;
        check_stream(&stream, dw.stream(), "dw")?;
        if let Some(x) = &db {
            check_stream(&stream, x.stream(), "db")?;
        }
        bind(&stream)?;

        let alpha = grad_scale / Self::logits_grad_scale(k, b);
        let cu = stream.cu_stream() as ffi::dropfuse_stream_t;
        let (hp, _gh) = h.device_ptr(&stream);
        let (wp, _gw) = weight.device_ptr(&stream);
        let (dhp, _gdh) = dh.device_ptr_mut(&stream);
        let (dwp, _gdw) = dw.device_ptr_mut(&stream);
        let db_ptr = db.map(|x| x.device_ptr_mut(&stream));
        let (dzp, _gdz) = ws.dz.device_ptr(&stream);
        let (csp, _gcs) = ws.colsum.device_ptr_mut(&stream);
        let train = match (ws.copies.as_ref(), ws.masks.as_ref(), ws.dh_all.as_mut()) {
            (Some(cp), Some(mk), Some(da)) => Some((
                cp.device_ptr(&stream),
                mk.device_ptr(&stream),
                da.device_ptr_mut(&stream),
            )),
            _ => None,
        };
        // SAFETY: lengths, dtypes and contexts validated above; outputs distinct from the inputs
        // and the workspace; sizes fit cuBLAS's i32 (checked when the workspace was made).
        unsafe {
            let plan = self.gemm_plan(b, d, c, T::DTYPE, GH::DTYPE, GW::DTYPE, grad_scale);
            let src = match &train {
                Some(((cp, _), (mp, _), (dap, _))) => {
                    // dh_all = (S dz) W in f32; the reduction applies keep * scale * a.
                    ws.blas.gemm(&plan.dh, wp, dzp, *dap)?;
                    let params = self.sample_params((0, 0, std::ptr::null()), self.drop.scale() * alpha);
                    let st = ffi::dropfuse_multi_sample_reduce(
                        ffi_dtype(DType::F32),
                        *dap as *const c_void,
                        ffi_dtype(GH::DTYPE),
                        dhp as *mut c_void,
                        *mp as *const u32,
                        (b * d) as u64,
                        &params,
                        cu,
                    );
                    ffi::check(st, "dropfuse_multi_sample_reduce")?;
                    *cp
                }
                None => {
                    // Evaluation mode (rows = B): dh = a (S dz) W straight into dh.
                    ws.blas.gemm(&plan.dh, wp, dzp, dhp)?;
                    hp
                }
            };
            ws.blas.gemm(&plan.dw, src, dzp, dwp)?;
            if let Some((dbp, _)) = &db_ptr {
                let st = ffi::dropfuse_column_sums(
                    ffi_dtype(T::DTYPE),
                    dzp as *const c_void,
                    rows as u64,
                    c as u64,
                    csp as *mut f32,
                    ffi_dtype(GW::DTYPE),
                    *dbp as *mut c_void,
                    alpha,
                    cu,
                );
                ffi::check(st, "dropfuse_column_sums")?;
            }
        }
        after(&stream)
    }

    /// The three GEMMs of a training-mode forward+backward alone (logits without bias, `dh_all`,
    /// `dW` in `T`), on the workspace's buffers: for the benchmark's TFLOP/s (`6 K B D C` FLOPs).
    #[doc(hidden)]
    pub fn gemms_only<T: Element, W: DevicePtr<T>, DW: DevicePtrMut<T>>(
        &self,
        ws: &mut HeadWorkspace<T>,
        weight: &W,
        dw: &mut DW,
    ) -> Result<()> {
        ws.check_head(self)?;
        let (k, b, d, c) = (ws.k, ws.b, ws.d, ws.c);
        let rows = k * b;
        check_len("weight", weight.len(), c * d, "C * D")?;
        check_len("dw", dw.len(), c * d, "C * D")?;
        let stream = ws.dev.stream().clone();
        check_stream(&stream, weight.stream(), "weight")?;
        check_stream(&stream, dw.stream(), "dw")?;
        let (Some(cp), Some(da)) = (ws.copies.as_ref(), ws.dh_all.as_mut()) else {
            return Err(Error::invalid(
                "workspace",
                "a training-mode workspace",
                "evaluation mode",
            ));
        };
        bind(&stream)?;
        let (wp, _gw) = weight.device_ptr(&stream);
        let (dwp, _gdw) = dw.device_ptr_mut(&stream);
        let (cpp, _gc) = cp.device_ptr(&stream);
        let (dap, _gd) = da.device_ptr_mut(&stream);
        let (zp, _gz) = ws.z.device_ptr_mut(&stream);
        let (dzp, _gdz) = ws.dz.device_ptr(&stream);
        // SAFETY: as in forward and backward.
        unsafe {
            let g = head_gemms(rows, d, c);
            let call = |desc, out| GemmCall {
                desc,
                alpha: 1.0,
                beta: 0.0,
                ab: T::DTYPE,
                out,
            };
            ws.blas.gemm(&call(g.logits, DType::F32), wp, cpp, zp)?;
            ws.blas.gemm(&call(g.dh, DType::F32), wp, dzp, dap)?;
            ws.blas.gemm(&call(g.dw, T::DTYPE), cpp, dzp, dwp)?;
        }
        after(&stream)
    }
}

/// The batch `B` of a forward on a workspace of capacity `capacity` with `D = d` features, from
/// the lengths of `h` (`B * D`) and `labels` (`B`): `h` errors unless `h_len` is `B * D` for some
/// `B` in `1 ..= capacity`, then `labels` errors unless `labels_len == B`. The validation
/// [`MultiSampleHead::forward`] runs first (here without a device, for tests).
#[doc(hidden)]
pub fn head_batch(d: usize, capacity: usize, h_len: usize, labels_len: usize) -> Result<usize> {
    let b = h_len.checked_div(d).unwrap_or(0);
    if b == 0 || b > capacity || h_len % d != 0 {
        return Err(Error::invalid(
            "h",
            format!("B * D elements with D = {d} and B in 1 ..= {capacity} (the workspace's capacity)"),
            format!("{h_len} elements"),
        ));
    }
    if labels_len != b {
        return Err(Error::invalid(
            "labels",
            format!("{b} labels (B, h's rows)"),
            format!("{labels_len} labels"),
        ));
    }
    Ok(b)
}

/// The bias check of [`MultiSampleHead::forward`] for `C = c` classes: `len` (the bias' length,
/// `None` without one) must be `Some(c)` when the head has a bias and `None` otherwise (`bias`
/// error; here without a device, for tests).
#[doc(hidden)]
pub fn head_bias(has_bias: bool, c: usize, len: Option<usize>) -> Result<()> {
    match (len, has_bias) {
        (None, true) => Err(Error::invalid(
            "bias",
            format!("{c} values (C): the head has a bias"),
            "none",
        )),
        (Some(n), false) => Err(Error::invalid(
            "bias",
            "none: the head has no bias",
            format!("{n} values"),
        )),
        (Some(n), true) if n != c => Err(Error::invalid(
            "bias",
            format!("{c} values (C)"),
            format!("{n} values"),
        )),
        _ => Ok(()),
    }
}

/// The buffers and the cuBLAS handle of a [`MultiSampleHead`] for up to `capacity` rows, `D`
/// features, `C` classes and element type `T`, on one device stream
/// ([`MultiSampleHead::workspace`]).
///
/// **Batch size.** A workspace allocated for a capacity `B_max` serves every batch
/// `B in 1 ..= B_max` (same head, `D`, `C` and `T`): each [`MultiSampleHead::forward`] takes `B`
/// from `h` (`B * D` values; `labels` must hold `B`) and records it; the
/// [`backward`](MultiSampleHead::backward), [`read_loss`](Self::read_loss),
/// [`check_labels`](Self::check_labels), [`mean_logits`](Self::mean_logits) and the buffer views
/// below then refer to that last forward's `B` ([`batch`](Self::batch)). The buffers of a batch
/// are the leading part of the capacity's buffers, laid out exactly as in a workspace allocated for
/// `B`, and the launches and GEMMs are the same (same sizes, same handle setup), so the results are
/// bit for bit those of a fresh workspace of capacity `B` (on the same GPU model and cuBLAS
/// version; the GPU tests check it). A batch above the capacity is an `h` error (nothing written).
///
/// Holds: the `K` masked copies (`K * B * D` of `T`) and their masks (training mode), the logits
/// `z` (`K * B * C` `f32`), the scaled logits' gradient `S dz` (`K * B * C` of `T`), `dh_all`
/// (`K * B * D` `f32`, training mode), the loss, the cross-entropy scratch and the bias-gradient
/// partials (all sized for `B = capacity`), and a cuBLAS handle with its 32 MiB workspace.
#[derive(Debug)]
pub struct HeadWorkspace<T: Element> {
    dev: Device,
    blas: Blas,
    k: usize,
    /// The most rows a forward may take (what the buffers are sized for).
    capacity: usize,
    /// The rows of the last forward (`capacity` before any forward).
    b: usize,
    d: usize,
    c: usize,
    train: bool,
    copies: Option<CudaSlice<T>>,
    masks: Option<CudaSlice<u32>>,
    dh_all: Option<CudaSlice<f32>>,
    z: CudaSlice<f32>,
    dz: CudaSlice<T>,
    scratch: CudaSlice<u64>,
    colsum: CudaSlice<f32>,
    loss: CudaSlice<f32>,
    filled_by: Option<MultiSampleHead>,
}

impl<T: Element> HeadWorkspace<T> {
    fn check_head(&self, head: &MultiSampleHead) -> Result<()> {
        if head.samples() != self.k || head.is_train() != self.train {
            return Err(Error::invalid(
                "workspace",
                format!(
                    "a workspace for {} sample(s), train = {}",
                    head.samples(),
                    head.is_train()
                ),
                format!("one for {} sample(s), train = {}", self.k, self.train),
            ));
        }
        Ok(())
    }

    /// `(samples, B, D, C)` with `B` the last forward's batch ([`batch`](Self::batch)): the
    /// shapes the backward and the buffer views refer to. The capacity is
    /// [`capacity`](Self::capacity).
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.k, self.b, self.d, self.c)
    }
    /// The batch `B` of the last forward (the capacity before any forward).
    pub fn batch(&self) -> usize {
        self.b
    }
    /// The most rows a forward may take: the `b` the workspace was allocated for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// The device the workspace lives on.
    pub fn device(&self) -> &Device {
        &self.dev
    }
    /// The loss of the last forward (one `f32`; untouched by a forward with a bad label).
    pub fn loss(&self) -> &CudaSlice<f32> {
        &self.loss
    }
    /// The logits of the last forward, `K x B x C` `f32` (bias included).
    pub fn logits(&self) -> CudaView<'_, f32> {
        self.z.slice(..self.k * self.b * self.c)
    }
    /// The logits' gradient of the last forward times [`MultiSampleHead::logits_grad_scale`],
    /// `K x B x C` of `T`.
    pub fn scaled_logits_grad(&self) -> CudaView<'_, T> {
        self.dz.slice(..self.k * self.b * self.c)
    }
    /// The `K` masked copies of the last forward (`K x B x D`), training mode only.
    pub fn copies(&self) -> Option<CudaView<'_, T>> {
        let n = self.k * self.b * self.d;
        self.copies.as_ref().map(|x| x.slice(..n))
    }
    /// The `K` bit masks of the last forward ([`masks_len`]`(K, B * D)` words), training mode
    /// only.
    pub fn masks(&self) -> Option<CudaView<'_, u32>> {
        let n = masks_len(self.k, self.b * self.d);
        self.masks.as_ref().map(|x| x.slice(..n))
    }
    /// The cuBLAS handle.
    pub fn blas(&self) -> &Blas {
        &self.blas
    }

    /// Reads the loss of the last forward (synchronises the stream).
    pub fn read_loss(&self) -> Result<f32> {
        let v = self
            .dev
            .stream()
            .clone_dtoh(&self.loss)
            .map_err(|e| Error::driver("cuMemcpyDtoH", e))?;
        Ok(v[0])
    }

    /// The label verdict of the last forward (synchronises): `n_valid`, or the reference's
    /// `labels` error naming the first bad row (that forward wrote no loss and a zero `dz`).
    pub fn check_labels(&self) -> Result<u64> {
        let Some(head) = self.filled_by else {
            return Err(Error::invalid(
                "workspace",
                "a workspace a forward has filled",
                "an empty one",
            ));
        };
        // The verdict is the scratch's first two words (n_valid, first bad row), whatever B.
        super::check_labels(
            self.dev.stream(),
            &self.scratch.slice(..2),
            self.c,
            head.ignore_index(),
        )
    }

    /// The averaged logits `sum_k z_k / K` of the last forward into `mean` (`B * C` `f32`, `B` that
    /// forward's batch), one launch ([`super::mean_logits`]).
    pub fn mean_logits<M: DevicePtrMut<f32>>(&self, mean: &mut M) -> Result<()> {
        if self.filled_by.is_none() {
            return Err(Error::invalid(
                "workspace",
                "a workspace a forward has filled",
                "an empty one",
            ));
        }
        check_len(
            "mean",
            mean.len(),
            self.b * self.c,
            "B * C, B = the forward's batch",
        )?;
        super::mean_logits(self.dev.stream(), self.k, &self.logits(), mean)
    }
}
