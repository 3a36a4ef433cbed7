//! Shared test helpers: the GPU (or a visible SKIPPED line), the proptest case count and runner,
//! error and bit-pattern conversions; test data in [`data`], guarded device buffers in [`guard`],
//! the helpers of the tests over 2^32 elements and their small twins in [`huge`].
//! Each test binary compiles its own copy and uses only some of it, hence `allow(dead_code)`.
#![allow(dead_code)]

pub mod data;
pub mod guard;
pub mod huge;

use std::io::Write;

use dropfuse::{Device, Element, Error};
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

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

/// GPU 0 and a loadable cuBLAS (the multi-sample head's GEMMs), or `None` after a SKIPPED line.
pub fn gpu_with_cublas(test: &str) -> Option<Device> {
    let dev = gpu(test)?;
    match dropfuse::multi_sample::check_cublas() {
        Ok(()) => Some(dev),
        Err(e) => {
            skip(test, &e.to_string());
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

/// The proptest configuration of these tests: `cases(default)` cases, no failure persistence.
pub fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs the property `check` on GPU 0 over [`config`]`(default)` random cases of `strategy`
/// (SKIPPED without a GPU); a failure panics with the test name and the minimal failing case.
pub fn run_cases<S: Strategy>(
    test: &str,
    default: u32,
    strategy: S,
    check: impl Fn(&Device, S::Value) -> Result<(), TestCaseError>,
) {
    let Some(dev) = gpu(test) else { return };
    let mut runner = TestRunner::new(config(default));
    if let Err(e) = runner.run(&strategy, |c| check(&dev, c)) {
        panic!("{test}: {e}");
    }
}

/// A library result as a proptest result; the failure names `what`.
pub fn ok<V>(r: dropfuse::Result<V>, what: &str) -> Result<V, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
}

/// A library error as a proptest failure.
pub fn tcerr(e: Error) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// The raw bits of every element, zero-extended (for bit-exact comparisons).
pub fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|e| e.to_bits_u32()).collect()
}

/// Every element widened (exactly) to `f64`.
pub fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// `|got - want| / |want|` (Euclidean norms); the absolute norm `|got - want|` when `want` is 0.
pub fn rel_err_norm(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// `|a - b| <= tol * max(1, |a|, |b|)`.
pub fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    let scale = a.abs().max(b.abs()).max(1.0);
    assert!(
        (a - b).abs() <= tol * scale,
        "{what}: {a} vs {b} (tolerance {tol})"
    );
}

/// Slices equal within [`assert_close`].
pub fn assert_all_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert_close(x, y, tol, &format!("{what}[{i}]"));
    }
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
