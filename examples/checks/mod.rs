//! Self-checks of the CPU reference, shared by the tour and the fuzz entry (each includes this
//! directory with `#[path]`): for each family, its contract re-derived here (the formulas written
//! out again, not calls into the reference) and compared with what `dropfuse::reference` returns.
//! The tour runs them on fixed shapes and prints one row per check; the fuzz entry runs them on
//! random cases and reports the failures. A family is one module: add its file and a `pub mod`
//! line below.

pub mod bias_dropout_residual;
pub mod head;
pub mod importance;
pub mod mc_dropout;
pub mod multi_sample;
pub mod routing;
pub mod skip;
pub mod structured;

use std::fmt::Debug;

use dropfuse::Element;

/// At most this many differing indices are named per comparison.
const SHOW: usize = 4;

/// Named checks: what was checked and, when it failed, how.
#[derive(Debug, Default)]
pub struct Checks {
    rows: Vec<(String, Option<String>)>,
    /// Put before the names of the checks that follow (see [`Checks::prefix`]).
    prefix: String,
}

impl Checks {
    pub fn new() -> Self {
        Checks::default()
    }

    /// Names the checks that follow `prefix: what` (an empty prefix: just `what`), to tell apart
    /// the same checks run on other inputs.
    pub fn prefix(&mut self, prefix: impl Into<String>) {
        self.prefix = prefix.into();
    }

    /// One check: `failure` is `None` when it passed.
    pub fn push(&mut self, what: impl Into<String>, failure: Option<String>) {
        let what = what.into();
        let what = if self.prefix.is_empty() {
            what
        } else {
            format!("{}: {what}", self.prefix)
        };
        self.rows.push((what, failure));
    }

    /// One check that passed iff `ok` (its description says it all).
    pub fn check(&mut self, what: impl Into<String>, ok: bool) {
        self.push(what, (!ok).then(String::new));
    }

    /// One check that passed iff `ok`; `detail` says how it failed.
    pub fn expect(&mut self, what: impl Into<String>, ok: bool, detail: impl FnOnce() -> String) {
        self.push(what, (!ok).then(detail));
    }

    /// Elements equal bit for bit, except that a NaN matches any NaN (payloads are not part of
    /// any contract).
    pub fn bits<T: Element>(&mut self, what: impl Into<String>, got: &[T], want: &[T]) {
        self.push(what, bit_diff(got, want));
    }

    /// Words (indices, counts, flags) equal.
    pub fn words<W: PartialEq + Debug>(&mut self, what: impl Into<String>, got: &[W], want: &[W]) {
        self.push(what, word_diff(got, want));
    }

    /// Every check, in order.
    pub fn rows(&self) -> &[(String, Option<String>)] {
        &self.rows
    }

    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.rows.iter().all(|(_, f)| f.is_none())
    }

    /// `check: failure` for each failed check.
    pub fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter_map(|(what, f)| f.as_ref().map(|f| format!("{what}: {f}")))
            .collect()
    }
}

/// `err <= bound`, false when either is NaN (so that a NaN error fails a check).
pub fn within(err: f64, bound: f64) -> bool {
    err <= bound
}

/// Whether two elements are the same: equal bits, or both NaN.
pub fn same_element<T: Element>(a: T, b: T) -> bool {
    a.to_bits_u32() == b.to_bits_u32() || (a.to_f32().is_nan() && b.to_f32().is_nan())
}

/// `None` when `got` and `want` are the same elements (a NaN matching any NaN), else the count
/// and the first differing indices.
pub fn bit_diff<T: Element>(got: &[T], want: &[T]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} elements, want {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| !same_element(got[i], want[i]))
        .collect();
    if bad.is_empty() {
        return None;
    }
    let shown: Vec<String> = bad
        .iter()
        .take(SHOW)
        .map(|&i| {
            format!(
                "[{i}] got {:#x} want {:#x}",
                got[i].to_bits_u32(),
                want[i].to_bits_u32()
            )
        })
        .collect();
    Some(format!("{} differ: {}", bad.len(), shown.join(", ")))
}

/// `None` when `got == want`, else the count and the first differing indices.
pub fn word_diff<W: PartialEq + Debug>(got: &[W], want: &[W]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} entries, want {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if bad.is_empty() {
        return None;
    }
    let shown: Vec<String> = bad
        .iter()
        .take(SHOW)
        .map(|&i| format!("[{i}] got {:?} want {:?}", got[i], want[i]))
        .collect();
    Some(format!("{} differ: {}", bad.len(), shown.join(", ")))
}

/// The sum of `terms` in the fixed order of `dropfuse::reference::skip` point 4, written out:
/// sequential partial sums from `+0` of consecutive chunks of `chunk` terms, then the partials
/// added sequentially from `+0`; every add is one `f32` add.
pub fn chunk_sum(terms: &[f32], chunk: usize) -> f32 {
    let mut total = 0.0f32;
    let mut start = 0;
    while start < terms.len() {
        let end = (start + chunk).min(terms.len());
        let mut partial = 0.0f32;
        for &t in &terms[start..end] {
            partial += t;
        }
        total += partial;
        start = end;
    }
    total
}
