//! DropBlock (Ghiasi et al. 2018): drops contiguous `block_size`-sized regions of each feature map
//! instead of independent units, for 2D (`[N, C, H, W]`) and 3D (`[N, C, D, H, W]`) tensors.
//!
//! The contract (what the CPU reference [`crate::reference::drop_block`] implements and the GPU
//! kernels match bit for bit):
//!
//! 1. **Blocks.** Per spatial axis `a` of size `S_a`, the block extent is `b_a = min(block_size, S_a)`
//!    and seeds may only be drawn at the `v_a = S_a - b_a + 1` positions where a whole block fits
//!    (the "valid region", as in the original TensorFlow code and torchvision).
//! 2. **Seed rate.** `gamma = gamma_scale * p * spatial / (block volume * valid-region volume)`,
//!    computed in `f64` in that order; the seed threshold is `round(min(gamma, 1) * 2^32)`.
//! 3. **Seeds.** A mask plane is one `(sample, channel)` feature map, or one sample when channels
//!    share the mask ([`DropBlock::shared_channels`], timm's coupled-channel mode). The seed at valid
//!    position `u` of plane `q` has the global index `i = q * valid + lin(u)` (row-major over the
//!    valid region) and is drawn iff the dropout contract's Philox word of element `i`, for the
//!    call's `(seed, offset)`, is below the seed threshold: one decision per seed position.
//! 4. **Blocks around seeds.** A drawn seed `u` drops the units `s` with `u_a <= s_a < u_a + b_a` on
//!    every axis: the seed is the block's first corner, so an odd block is centred on `u + b / 2` and
//!    an even block extends `b / 2` units before its centre `u + b / 2` and `b / 2 - 1` after it.
//!    The drop mask is the union of all blocks.
//! 5. **Mask.** One keep bit per element of `x`, packed like dropout masks
//!    ([`crate::dropout::mask_words`]): bit `j` of word `w` is element `32 w + j`.
//! 6. **Scale** (computed on the device from the kept counts, no host synchronisation):
//!    [`Normalize::Global`] `numel / kept` over the whole tensor (timm, torchvision),
//!    [`Normalize::PerSample`] `(C * spatial) / kept_n`, [`Normalize::Off`] `1`; computed in `f64`,
//!    rounded once to `f32`; with `Global` or `PerSample`, `0` when nothing is kept (the output is
//!    then all zero).
//! 7. **Output.** `y = keep ? x * scale : +0`, one `f32` multiply and one rounding, exactly like
//!    dropout; backward `dx = keep ? dy * scale : +0` from the stored mask and scales.
//!
//! Unlike dropout, `p` is a target rate, not a guarantee: `p = 1` drops everything only when the
//! block covers whole axes (gamma reaches 1), and overlapping blocks make the dropped fraction a
//! little lower than `p` (the reference's tests quantify it).

use crate::error::{Error, Result};

/// How the kept units are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalize {
    /// `numel / kept` over the whole tensor (timm and torchvision).
    #[default]
    Global,
    /// `(C * spatial) / kept_n` for each sample `n`.
    PerSample,
    /// No rescaling: kept units pass unchanged.
    Off,
}

/// A validated DropBlock configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropBlock {
    p: f64,
    block_size: usize,
    gamma_scale: f64,
    shared_channels: bool,
    normalize: Normalize,
}

impl DropBlock {
    /// Drop probability `p` (finite, in `[0, 1]`) and block size (>= 1) per spatial axis; gamma
    /// scale 1, one mask per channel, global normalisation.
    pub fn new(p: f64, block_size: usize) -> Result<Self> {
        if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
            return Err(Error::invalid("p", "a drop probability in [0, 1]", p));
        }
        if block_size == 0 {
            return Err(Error::invalid("block_size", "at least 1", block_size));
        }
        Ok(DropBlock {
            p,
            block_size,
            gamma_scale: 1.0,
            shared_channels: false,
            normalize: Normalize::Global,
        })
    }

    /// Multiplies the seed rate (timm's `gamma_scale`); finite and `>= 0`.
    pub fn with_gamma_scale(mut self, gamma_scale: f64) -> Result<Self> {
        if !(gamma_scale.is_finite() && gamma_scale >= 0.0) {
            return Err(Error::invalid("gamma_scale", "a finite value >= 0", gamma_scale));
        }
        self.gamma_scale = gamma_scale;
        Ok(self)
    }

    /// One mask per sample shared by all its channels (timm's coupled-channel mode) when `true`.
    pub fn with_shared_channels(mut self, shared: bool) -> Self {
        self.shared_channels = shared;
        self
    }

    /// The rescaling of kept units.
    pub fn with_normalize(mut self, normalize: Normalize) -> Self {
        self.normalize = normalize;
        self
    }

    pub fn p(&self) -> f64 {
        self.p
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn gamma_scale(&self) -> f64 {
        self.gamma_scale
    }
    pub fn shared_channels(&self) -> bool {
        self.shared_channels
    }
    pub fn normalize(&self) -> Normalize {
        self.normalize
    }
}

/// The usual DropBlock schedule: `p` ramped linearly from `start` to `end` over `steps` steps,
/// then held at `end`: exactly `end` from step `steps` on, and never outside
/// `[min(start, end), max(start, end)]` (so a ramp of valid probabilities stays valid despite
/// rounding). The same ramp as [`crate::schedule::Schedule::linear`], which validates its
/// probabilities and also has early, late and constant schedules. Unvalidated, but never panics:
/// NaN or infinite ends give NaN ramp values.
pub fn linear_schedule(start: f64, end: f64, steps: u64, step: u64) -> f64 {
    crate::schedule::ramp(start, end, steps, step)
}

// ------------------------------------------------------------------------------------------------
// GPU API

use std::ffi::c_void;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::dropout::{after, bind, check_mask_len, check_same_len, check_stream};
use crate::dtype::{DType, Element};
use crate::ffi;
use crate::rng::{PhiloxState, Randomness, Source};

/// Shared memory the mask kernel may use per thread block (`DROPFUSE_DROP_BLOCK_SMEM`).
const SMEM_BYTES: u64 = ffi::DROPFUSE_DROP_BLOCK_SMEM as u64;

/// A validated DropBlock tensor shape: `[N, C, H, W]` or `[N, C, D, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    n: u64,
    c: u64,
    /// `[D, H, W]`, `D = 1` for 2D.
    s: [u64; 3],
    numel: usize,
}

impl Shape {
    fn new(shape: &[usize]) -> Result<Self> {
        let bad = |expected: &str| Error::invalid("shape", expected, format!("{shape:?}"));
        let (n, c, s) = match *shape {
            [n, c, h, w] => (n, c, [1, h, w]),
            [n, c, d, h, w] => (n, c, [d, h, w]),
            _ => return Err(bad("[N, C, H, W] or [N, C, D, H, W]")),
        };
        if n == 0 || c == 0 || s.contains(&0) {
            return Err(bad("no zero dimension (an empty tensor)"));
        }
        if s.iter().any(|&d| d > 1 << 30) {
            return Err(bad("spatial dimensions of at most 2^30"));
        }
        let numel = s
            .iter()
            .fold(n.checked_mul(c), |acc, &d| acc.and_then(|a| a.checked_mul(d)))
            .ok_or_else(|| bad("a number of elements that fits in usize"))?;
        Ok(Shape {
            n: n as u64,
            c: c as u64,
            s: s.map(|d| d as u64),
            numel,
        })
    }

    /// `N + 1`, the stats' length (`shape` error when it overflows `usize`).
    fn stats_len(&self, shape: &[usize]) -> Result<usize> {
        (self.n as usize).checked_add(1).ok_or_else(|| {
            Error::invalid(
                "shape",
                "N + 1 stats counters that fit in usize",
                format!("{shape:?}"),
            )
        })
    }
}

/// Length of the `stats` buffer of a call on `shape`: one `u64` per sample (kept elements of the
/// sample) and one for the whole tensor.
///
/// Errors: `shape` (as the calls check it, or `N + 1` over `usize`).
pub fn stats_len(shape: &[usize]) -> Result<usize> {
    Shape::new(shape)?.stats_len(shape)
}

impl DropBlock {
    /// Block extent per spatial axis `[D, H, W]` (1 along D for 2D).
    fn extents(&self, s: &Shape) -> [u64; 3] {
        let b = self.block_size as u64;
        let mut e = s.s.map(|d| b.min(d));
        if s.s[0] == 1 {
            e[0] = 1;
        }
        e
    }

    /// The seed threshold for this shape (contract point 2).
    fn threshold(&self, s: &Shape) -> u64 {
        let e = self.extents(s);
        let spatial: u64 = s.s.iter().product();
        let vol: u64 = e.iter().product();
        let valid: u64 = s.s.iter().zip(e).map(|(&d, b)| d - b + 1).product();
        let gamma = self.gamma_scale * self.p * spatial as f64 / (vol as f64 * valid as f64);
        (gamma.min(1.0) * 4_294_967_296.0).round() as u64
    }

    /// Launch parameters; rejects shapes whose mask rows exceed the kernel's shared memory.
    fn params(&self, shape: &[usize], rng: PhiloxState) -> Result<(Shape, ffi::dropfuse_drop_block_params)> {
        let s = Shape::new(shape)?;
        let e = self.extents(&s);
        // One output slab plus the seed slabs before it, two bitmaps (kernels/dropfuse.h).
        let (block_a, rows) = if s.s[0] > 1 { (e[0], s.s[1]) } else { (e[1], 1) };
        let need = 8 * block_a * rows * s.s[2].div_ceil(32);
        if need > SMEM_BYTES {
            return Err(Error::invalid(
                "shape",
                format!(
                    "a feature map whose block of rows fits the mask kernel's shared memory \
                     ({need} bytes needed, {SMEM_BYTES} available)"
                ),
                format!("{shape:?} with block_size {}", self.block_size),
            ));
        }
        let p = ffi::dropfuse_drop_block_params {
            seed: rng.seed,
            offset: rng.offset,
            philox_dev: std::ptr::null(),
            n: s.n,
            c: s.c,
            d: s.s[0],
            h: s.s[1],
            w: s.s[2],
            block_d: e[0],
            block_h: e[1],
            block_w: e[2],
            threshold: self.threshold(&s),
            shared_channels: self.shared_channels as i32,
            normalize: match self.normalize {
                Normalize::Global => ffi::dropfuse_normalize::DROPFUSE_NORMALIZE_GLOBAL,
                Normalize::PerSample => ffi::dropfuse_normalize::DROPFUSE_NORMALIZE_PER_SAMPLE,
                Normalize::Off => ffi::dropfuse_normalize::DROPFUSE_NORMALIZE_OFF,
            },
        };
        Ok((s, p))
    }

    /// Validates a call: the shape (and shared-memory fit), every data buffer's length (`numel`),
    /// the mask's and the stats' lengths, then every buffer's context; binds the stream's context.
    fn validate(
        &self,
        stream: &CudaStream,
        shape: &[usize],
        rng: &Source<'_>,
        data: &[(&'static str, usize, &CudaStream)],
        mask: (usize, &CudaStream),
        stats: (usize, &CudaStream),
    ) -> Result<ffi::dropfuse_drop_block_params> {
        let host = match rng {
            Source::Host(h) => *h,
            Source::Device(_) => PhiloxState::new(0, 0), // filled in by `with_rng`
        };
        let (s, p) = self.params(shape, host)?;
        for &(name, len, _) in data {
            check_same_len(len, s.numel, name)?;
        }
        check_mask_len(mask.0, s.numel)?;
        check_stats_len(stats.0, s.stats_len(shape)?)?;
        for &(name, _, buf) in data {
            check_stream(stream, buf, name)?;
        }
        check_stream(stream, mask.1, "mask")?;
        check_stream(stream, stats.1, "stats")?;
        rng.check(stream)?;
        bind(stream)?;
        Ok(p)
    }

    /// `y = x * keep * scale`, the bit mask (`mask_words(numel)` words) and `stats`
    /// ([`stats_len`] counters: kept elements per sample, then in total). The scale is computed on
    /// the device from the counters: nothing waits for the host.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<
        T: Element,
        X: DevicePtr<T>,
        Y: DevicePtrMut<T>,
        M: DevicePtrMut<u32>,
        S: DevicePtrMut<u64>,
        R: Randomness,
    >(
        &self,
        stream: &CudaStream,
        rng: R,
        shape: &[usize],
        x: &X,
        y: &mut Y,
        mask: &mut M,
        stats: &mut S,
    ) -> Result<()> {
        let rng = rng.source();
        let p = self.validate(
            stream,
            shape,
            &rng,
            &[("x", x.len(), x.stream()), ("y", y.len(), y.stream())],
            (mask.len(), mask.stream()),
            (stats.len(), stats.stream()),
        )?;
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (mp, _gm) = mask.device_ptr_mut(stream);
        let (sp, _gs) = stats.device_ptr_mut(stream);
        let (p, _gr) = with_rng(p, &rng, stream);
        // SAFETY: validated; x and y are distinct cudarc buffers (a shared and a mutable borrow
        // cannot alias); the guards keep every buffer alive and ordered on `stream`.
        unsafe { launch_forward(T::DTYPE, xp, yp, mp, sp, &p, stream) }
    }

    /// In place: `x = x * keep * scale`, with the mask and stats as [`DropBlock::forward`].
    pub fn forward_inplace<
        T: Element,
        X: DevicePtrMut<T>,
        M: DevicePtrMut<u32>,
        S: DevicePtrMut<u64>,
        R: Randomness,
    >(
        &self,
        stream: &CudaStream,
        rng: R,
        shape: &[usize],
        x: &mut X,
        mask: &mut M,
        stats: &mut S,
    ) -> Result<()> {
        let rng = rng.source();
        let p = self.validate(
            stream,
            shape,
            &rng,
            &[("x", x.len(), x.stream())],
            (mask.len(), mask.stream()),
            (stats.len(), stats.stream()),
        )?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (mp, _gm) = mask.device_ptr_mut(stream);
        let (sp, _gs) = stats.device_ptr_mut(stream);
        let (p, _gr) = with_rng(p, &rng, stream);
        // SAFETY: as in `forward`; x is input and output (each element is read, then written, by
        // the same thread).
        unsafe { launch_forward(T::DTYPE, xp, xp, mp, sp, &p, stream) }
    }

    /// Only the mask and the stats (no data): e.g. to inspect or reuse a mask.
    pub fn mask<M: DevicePtrMut<u32>, S: DevicePtrMut<u64>, R: Randomness>(
        &self,
        stream: &CudaStream,
        rng: R,
        shape: &[usize],
        mask: &mut M,
        stats: &mut S,
    ) -> Result<()> {
        let rng = rng.source();
        let p = self.validate(
            stream,
            shape,
            &rng,
            &[],
            (mask.len(), mask.stream()),
            (stats.len(), stats.stream()),
        )?;
        let (mp, _gm) = mask.device_ptr_mut(stream);
        let (sp, _gs) = stats.device_ptr_mut(stream);
        let (p, _gr) = with_rng(p, &rng, stream);
        // SAFETY: as in `forward`; null x and y ask the launcher for the mask and stats only.
        unsafe { launch_forward(DType::F32, 0, 0, mp, sp, &p, stream) }
    }

    /// `dx = dy * keep * scale` from the forward's mask and stats (same shape and configuration).
    pub fn backward<
        T: Element,
        M: DevicePtr<u32>,
        S: DevicePtr<u64>,
        DY: DevicePtr<T>,
        DX: DevicePtrMut<T>,
    >(
        &self,
        stream: &CudaStream,
        shape: &[usize],
        mask: &M,
        stats: &S,
        dy: &DY,
        dx: &mut DX,
    ) -> Result<()> {
        let p = self.validate(
            stream,
            shape,
            &Source::Host(PhiloxState::new(0, 0)),
            &[("dy", dy.len(), dy.stream()), ("dx", dx.len(), dx.stream())],
            (mask.len(), mask.stream()),
            (stats.len(), stats.stream()),
        )?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (sp, _gs) = stats.device_ptr(stream);
        let (dyp, _gdy) = dy.device_ptr(stream);
        let (dxp, _gdx) = dx.device_ptr_mut(stream);
        // SAFETY: as in `forward`.
        unsafe { launch_backward(T::DTYPE, dyp, dxp, mp, sp, &p, stream) }
    }

    /// In place backward: `g = g * keep * scale`.
    pub fn backward_inplace<T: Element, M: DevicePtr<u32>, S: DevicePtr<u64>, G: DevicePtrMut<T>>(
        &self,
        stream: &CudaStream,
        shape: &[usize],
        mask: &M,
        stats: &S,
        grad: &mut G,
    ) -> Result<()> {
        let p = self.validate(
            stream,
            shape,
            &Source::Host(PhiloxState::new(0, 0)),
            &[("grad", grad.len(), grad.stream())],
            (mask.len(), mask.stream()),
            (stats.len(), stats.stream()),
        )?;
        let (mp, _gm) = mask.device_ptr(stream);
        let (sp, _gs) = stats.device_ptr(stream);
        let (gp, _gg) = grad.device_ptr_mut(stream);
        // SAFETY: as in `forward_inplace`.
        unsafe { launch_backward(T::DTYPE, gp, gp, mp, sp, &p, stream) }
    }
}

/// The params with the call's randomness: a device Philox state's pointer (and the guard that
/// keeps it ordered on `stream` until the launch is enqueued), or the host values already in `p`.
fn with_rng<'s>(
    mut p: ffi::dropfuse_drop_block_params,
    rng: &'s Source<'_>,
    stream: &'s CudaStream,
) -> (
    ffi::dropfuse_drop_block_params,
    Option<cudarc::driver::SyncOnDrop<'s>>,
) {
    let (seed, offset, dev, guard) = rng.bind(stream);
    p.seed = seed;
    p.offset = offset;
    p.philox_dev = dev;
    (p, guard)
}

/// The forward launcher on validated device pointers (`x == y == 0`: mask and stats only).
///
/// # Safety
/// The pointers are valid device memory of the stream's context of the lengths `p` implies, and
/// stay alive until the work enqueued on `stream` has run.
unsafe fn launch_forward(
    dtype: DType,
    x: CUdeviceptr,
    y: CUdeviceptr,
    mask: CUdeviceptr,
    stats: CUdeviceptr,
    p: &ffi::dropfuse_drop_block_params,
    stream: &CudaStream,
) -> Result<()> {
    let status = ffi::dropfuse_drop_block_forward(
        crate::dropout::raw::dtype(dtype),
        x as *const c_void,
        y as *mut c_void,
        mask as *mut u32,
        stats as *mut u64,
        p,
        stream.cu_stream() as ffi::dropfuse_stream_t,
    );
    ffi::check(status, "dropfuse_drop_block_forward")?;
    after(stream)
}

/// The backward launcher on validated device pointers.
///
/// # Safety
/// As [`launch_forward`].
unsafe fn launch_backward(
    dtype: DType,
    dy: CUdeviceptr,
    dx: CUdeviceptr,
    mask: CUdeviceptr,
    stats: CUdeviceptr,
    p: &ffi::dropfuse_drop_block_params,
    stream: &CudaStream,
) -> Result<()> {
    let status = ffi::dropfuse_drop_block_backward(
        crate::dropout::raw::dtype(dtype),
        dy as *const c_void,
        dx as *mut c_void,
        mask as *const u32,
        stats as *const u64,
        p,
        stream.cu_stream() as ffi::dropfuse_stream_t,
    );
    ffi::check(status, "dropfuse_drop_block_backward")?;
    after(stream)
}

fn check_stats_len(got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            "stats",
            format!("{want} u64 counters (N + 1)"),
            format!("{got}"),
        ));
    }
    Ok(())
}
