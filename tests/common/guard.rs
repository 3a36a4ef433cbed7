//! Guarded device buffers: views at an offset into larger buffers filled with a sentinel (they
//! break 16-byte alignment, and the guard slots around them catch writes outside the view or on an
//! error), and the bit-pattern comparisons that check them.

use dropfuse::cudarc::driver::{CudaSlice, DeviceRepr};
use dropfuse::{Device, Element};
use half::{bf16, f16};
use proptest::prop_assert_eq;
use proptest::test_runner::TestCaseError;

use super::ok;

/// Guard slots after the view in [`padded`] buffers.
pub const GUARD: usize = 5;

/// The fill of mask-word buffers.
pub const MASK_SENTINEL: u32 = 0xDEAD_BEEF;

/// The fill of element buffers.
pub fn sentinel<T: Element>() -> T {
    T::from_f32(-12345.0)
}

/// Element types built from raw bits (test data covering the whole finite range, subnormals too).
pub trait Bits: Element + Word {
    fn from_bits_u32(bits: u32) -> Self;
}
impl Bits for f32 {
    fn from_bits_u32(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}
impl Bits for f16 {
    fn from_bits_u32(bits: u32) -> Self {
        f16::from_bits(bits as u16)
    }
}
impl Bits for bf16 {
    fn from_bits_u32(bits: u32) -> Self {
        bf16::from_bits(bits as u16)
    }
}

/// Anything compared in device buffers: elements and mask words.
pub trait Word: DeviceRepr + Copy + std::fmt::Debug {
    /// The raw bits, zero-extended.
    fn bits(self) -> u32;
    /// Whether an element is a NaN (never for mask words).
    fn is_nan(self) -> bool;
}
macro_rules! element_word {
    ($($t:ty),*) => {$(
        impl Word for $t {
            fn bits(self) -> u32 {
                self.to_bits_u32()
            }
            fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }
        }
    )*};
}
element_word!(f32, f16, bf16);
impl Word for u32 {
    fn bits(self) -> u32 {
        self
    }
    fn is_nan(self) -> bool {
        false
    }
}

/// Downloads `s` (a failure is a proptest failure).
pub fn dl<T: DeviceRepr>(dev: &Device, s: &CudaSlice<T>) -> Result<Vec<T>, TestCaseError> {
    dev.download(s)
        .map_err(|e| TestCaseError::fail(format!("download: {e}")))
}

/// A device buffer of `off + n + GUARD` elements: `fill` everywhere, `data` at `off..off+n`.
pub fn padded<T: DeviceRepr + Copy>(
    dev: &Device,
    off: usize,
    data: Option<&[T]>,
    n: usize,
    fill: T,
) -> dropfuse::Result<CudaSlice<T>> {
    let mut host = vec![fill; off + n + GUARD];
    if let Some(d) = data {
        host[off..off + n].copy_from_slice(d);
    }
    dev.upload(&host)
}

/// `data` at element `off` of a device buffer of `off + data.len() + guard` elements filled with
/// `fill`.
pub fn upload_at<T: DeviceRepr + Copy>(
    dev: &Device,
    off: usize,
    data: &[T],
    fill: T,
    guard: usize,
) -> Result<CudaSlice<T>, TestCaseError> {
    let mut host = vec![fill; off + data.len() + guard];
    host[off..off + data.len()].copy_from_slice(data);
    ok(dev.upload(&host), "upload")
}

/// `got` equals `fill` outside `off..off+n` and `want` inside it, bit for bit.
pub fn expect_region<T: Word>(
    got: &[T],
    off: usize,
    want: &[T],
    fill: T,
    what: &str,
) -> Result<(), TestCaseError> {
    region(got, off, want, fill, what, false)
}

/// [`expect_region`], except that NaN equals NaN (payloads are not part of the contract).
pub fn expect_region_nan<T: Word>(
    got: &[T],
    off: usize,
    want: &[T],
    fill: T,
    what: &str,
) -> Result<(), TestCaseError> {
    region(got, off, want, fill, what, true)
}

fn region<T: Word>(
    got: &[T],
    off: usize,
    want: &[T],
    fill: T,
    what: &str,
    nan_eq: bool,
) -> Result<(), TestCaseError> {
    for (i, g) in got.iter().enumerate() {
        let inside = i >= off && i < off + want.len();
        let w = if inside { want[i - off] } else { fill };
        if g.bits() != w.bits() && !(nan_eq && g.is_nan() && w.is_nan()) {
            let place = if inside {
                format!("element {}", i - off)
            } else {
                format!("guard slot {i} (outside the view)")
            };
            return Err(TestCaseError::fail(format!(
                "{what}: {place}: got bits {:#x}, want {:#x}",
                g.bits(),
                w.bits()
            )));
        }
    }
    Ok(())
}

/// Bitwise equality, except that any NaN matches any NaN: the contracts say a kept NaN stays NaN,
/// and CUDA's f32 -> f16 / bf16 conversions give the canonical NaN 0x7FFF where the `half` crate
/// (the reference) keeps the payload (0x7E00 for an f16 quiet NaN).
pub fn same_or_both_nan<T: Element>(got: T, want: T) -> bool {
    got.to_bits_u32() == want.to_bits_u32() || (got.to_f32().is_nan() && want.to_f32().is_nan())
}

/// Equal lengths and every element [`same_or_both_nan`].
pub fn same_bits<T: Element>(got: &[T], want: &[T], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: length", what);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !same_or_both_nan(*g, *w) {
            return Err(TestCaseError::fail(format!(
                "{what}: element {i}: got bits {:#x}, want {:#x}",
                g.to_bits_u32(),
                w.to_bits_u32()
            )));
        }
    }
    Ok(())
}
