//! Shared test helpers: the GPU (or a visible SKIPPED line) and the proptest case count.
#![allow(dead_code)]

use std::io::Write;

use dropfuse::{Device, Error};

/// Prints a SKIPPED line that `cargo test` shows even for passing tests.
pub fn skip(test: &str, why: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "SKIPPED: {test}: {why}");
}

/// GPU 0, or `None` after printing a SKIPPED line that `cargo test` shows (written to the real
/// stdout, not the captured one).
pub fn gpu(test: &str) -> Option<Device> {
    match Device::new(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            skip(test, &format!("no CUDA device ({e})"));
            None
        }
    }
}

/// Proptest cases per property: `DROPFUSE_PROPTEST_CASES` (default `default`); raise it for
/// fuzzing runs on a GPU host.
pub fn cases(default: u32) -> u32 {
    std::env::var("DROPFUSE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The argument name of an `InvalidArgument` error (panics on success or on another error kind).
pub fn invalid_name<T: std::fmt::Debug>(r: dropfuse::Result<T>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// `|count - n q| <= 6 sigma` for a Binomial(n, q) count.
pub fn assert_binomial(count: u64, n: u64, q: f64, what: &str) {
    let mean = n as f64 * q;
    let sigma = (n as f64 * q * (1.0 - q)).sqrt();
    let dev = (count as f64 - mean).abs();
    assert!(
        dev <= 6.0 * sigma,
        "{what}: {count} of {n}, expected {mean:.1} +- 6 * {sigma:.1} (off by {dev:.1})"
    );
}
