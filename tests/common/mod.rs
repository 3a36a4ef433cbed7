//! Shared test helpers: the GPU (or a visible SKIPPED line) and the proptest case count.
#![allow(dead_code)]

use std::io::Write;

use dropfuse::Device;

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
