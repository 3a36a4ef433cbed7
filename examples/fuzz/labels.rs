//! The `labels` key of the cross-entropy cases (`multi_sample.rs`) and the head cases (`head.rs`):
//! which labels are ignored or bad, its text, its draw, and the labels a case draws from it.

use rand::rngs::StdRng;
use rand::Rng;

/// Which labels are ignored or bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    All,
    Some,
    Ignored,
    Bad,
}

const LABELS: [(Labels, &str); 4] = [
    (Labels::All, "all"),
    (Labels::Some, "some"),
    (Labels::Ignored, "ignored"),
    (Labels::Bad, "bad"),
];

impl Labels {
    /// `all`, `ignored` and `bad` in 1 of 5 cases each, `some` in 2 of 5.
    pub fn draw(rng: &mut StdRng) -> Self {
        [
            Labels::All,
            Labels::Some,
            Labels::Some,
            Labels::Ignored,
            Labels::Bad,
        ][rng.random_range(0..5)]
    }

    /// The value of the `labels` key.
    pub fn name(self) -> &'static str {
        LABELS.iter().find(|(l, _)| *l == self).map_or("?", |(_, n)| *n)
    }

    /// The `labels` key's value `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        LABELS
            .iter()
            .find(|(_, n)| *n == text)
            .map(|(l, _)| *l)
            .ok_or_else(|| format!("labels: expected all, some, ignored or bad, got {text:?}"))
    }
}

/// `b` labels of `c` classes and the ignore index `ii`, as `labels` says, drawn from `rng`; and,
/// for [`Labels::Bad`], the first of the one to three rows given a label neither in `[0, C)` nor
/// `ii`.
pub fn draw_rows(rng: &mut StdRng, labels: Labels, b: usize, c: usize, ii: i64) -> (Vec<i64>, Option<usize>) {
    let mut rows: Vec<i64> = (0..b)
        .map(|_| {
            let ignored = match labels {
                Labels::All => false,
                Labels::Some | Labels::Bad => rng.random_range(0..3u32) == 0,
                Labels::Ignored => true,
            };
            // A class other than the ignore index (which may be a class), if there is one.
            let y = rng.random_range(0..c as i64);
            match (ignored, y == ii) {
                (true, _) => ii,
                (false, true) if c > 1 => (y + 1) % c as i64,
                // One class that is the ignore index: the row is ignored.
                (false, _) => y,
            }
        })
        .collect();
    let mut first_bad = None;
    if labels == Labels::Bad {
        let bad_values = [c as i64, c as i64 + 5, -1, -2, i64::MAX, i64::MIN];
        for _ in 0..rng.random_range(1..=3u32) {
            let row = rng.random_range(0..b);
            rows[row] = bad_values
                .into_iter()
                .filter(|&v| v != ii)
                .nth(rng.random_range(0..5))
                .unwrap_or(i64::MAX);
            first_bad = Some(first_bad.map_or(row, |f: usize| f.min(row)));
        }
    }
    (rows, first_bad)
}
