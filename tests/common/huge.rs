//! Helpers of the tests over 2^32 elements (`huge`) and of their small twins, which run the same
//! case function on a small shape (on the emulated device too) so that the probe indices and
//! expected values are exercised without a GPU: the device-memory check, the test tensor and the
//! index windows to check.

use std::ops::Range;

use dropfuse::cudarc::driver::CudaSlice;
use dropfuse::Device;
use half::f16;

/// 2^32: the index boundary the `huge` tests probe around.
pub const TWO_POW_32: usize = 1 << 32;

/// Whether GPU `dev` has `need` bytes free; otherwise a SKIPPED line for `test`.
pub fn enough_memory(dev: &Device, test: &str, need: usize) -> bool {
    let (free, _) = dev.context().mem_get_info().unwrap();
    if free < need {
        super::skip(test, &format!("needs {need} bytes of GPU memory, {free} free"));
        return false;
    }
    true
}

/// Period of [`value`]: a prime, so an element read or written a multiple of 2^32 (or of any
/// power of two) away from its index holds another value.
const PERIOD: usize = 251;

/// The test value of element `i`: `(i % 251) / 4 - 31`, exact in f16 (0 at `i % 251 == 124`).
pub fn value(i: usize) -> f16 {
    f16::from_f32((i % PERIOD) as f32 * 0.25 - 31.0)
}

/// `n` f16 elements `x[i] = value(i)`: one chunk (a multiple of the period, at most 64 MiB)
/// uploaded, then copied along the tensor on the device.
pub fn value_tensor(dev: &Device, n: usize) -> CudaSlice<f16> {
    let chunk = (PERIOD << 17).min(n.next_multiple_of(PERIOD));
    let host: Vec<f16> = (0..chunk).map(value).collect();
    let src = dev.upload(&host).unwrap();
    let mut x = dev.zeros::<f16>(n).unwrap();
    let mut at = 0;
    while at < n {
        let len = chunk.min(n - at);
        dev.stream()
            .memcpy_dtod(&src.slice(0..len), &mut x.slice_mut(at..at + len))
            .unwrap();
        at += len;
    }
    x
}

/// The multiples of `wrap` in `1..n` (the 2^32 boundaries in a huge test).
pub fn wraps(n: usize, wrap: usize) -> Vec<usize> {
    (1..).map(|k| k * wrap).take_while(|&b| b < n).collect()
}

/// The indices of `0..n` to check: `half` either side of 0, of `n`, of each multiple of `wrap` and
/// of each of `points`, merged into sorted disjoint ranges.
pub fn windows(n: usize, wrap: usize, half: usize, points: &[usize]) -> Vec<Range<usize>> {
    let mut centres = vec![0, n];
    centres.extend(wraps(n, wrap));
    centres.extend(points.iter().copied().filter(|&c| c <= n));
    let mut ranges: Vec<Range<usize>> = centres
        .iter()
        .map(|&c| c.saturating_sub(half)..(c + half).min(n))
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The multiples of each of `periods` (row, plane or sample lengths) on either side of each
/// multiple of `wrap` in `1..n`, and the first and last of them: the structure's boundaries
/// nearest to the index boundaries.
pub fn boundaries_near_wraps(n: usize, wrap: usize, periods: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    for &q in periods {
        out.extend([q, (n - 1) / q * q]);
        for b in wraps(n, wrap) {
            out.extend([b / q * q, (b / q + 1) * q]);
        }
    }
    out.retain(|&c| c < n);
    out
}
