//! Drop-probability schedules over training steps, one type for every stochastic regularizer of
//! the crate (dropout, DropBlock's ramp, layer drop): constant, a linear ramp, and Liu et al.'s
//! early and late dropout ("Dropout Reduces Underfitting", 2023).
//!
//! A [`Schedule`] is validated once (every probability finite and in `[0, 1]`) and then maps a step
//! to a probability with [`Schedule::p`], which is always in `[0, 1]` (so it can go straight into
//! [`crate::Dropout::new`] or [`crate::drop_block::DropBlock::new`]):
//!
//! | schedule | `p(step)` |
//! | --- | --- |
//! | [`Schedule::constant`]`(p)` | `p` |
//! | [`Schedule::linear`]`(start, end, T)` | `start + (end - start) * step / T` for `step < T` (clamped to the ramp's range), exactly `end` from step `T` on (`T = 0`: `end`) |
//! | [`Schedule::early`]`(p, T)` | `p` for `step < T`, then `0` (early dropout) |
//! | [`Schedule::early_linear`]`(p, T)` | `p` decreasing linearly to `0` over the first `T` steps, then `0`: the linear ramp from `p` to `0` |
//! | [`Schedule::late`]`(p, S)` | `0` for `step < S`, then `p` (late dropout) |
//!
//! All arithmetic is `f64` in the order written (the ramp's multiply before its division).

use crate::error::{Error, Result};

/// A validated drop-probability schedule; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Constant { p: f64 },
    Linear { start: f64, end: f64, steps: u64 },
    Early { p: f64, steps: u64 },
    Late { p: f64, start: u64 },
}

fn check_p(name: &'static str, p: f64) -> Result<f64> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(Error::invalid(name, "a probability in [0, 1]", p))
    }
}

/// The linear ramp: `end` exactly from step `steps` on, never outside the ramp's range.
///
/// Also [`crate::drop_block::linear_schedule`], which does not validate `start` and `end`: never
/// panics (`f64::clamp` does when both ends are NaN); a NaN ramp value stays NaN.
pub(crate) fn ramp(start: f64, end: f64, steps: u64, step: u64) -> f64 {
    if step >= steps {
        return end;
    }
    let p = start + (end - start) * (step as f64) / (steps as f64);
    let (lo, hi) = (start.min(end), start.max(end));
    if p < lo {
        lo
    } else if p > hi {
        hi
    } else {
        p
    }
}

impl Schedule {
    /// The same `p` at every step.
    pub fn constant(p: f64) -> Result<Self> {
        Ok(Schedule {
            kind: Kind::Constant { p: check_p("p", p)? },
        })
    }

    /// From `start` to `end` linearly over `steps` steps, then `end`.
    pub fn linear(start: f64, end: f64, steps: u64) -> Result<Self> {
        Ok(Schedule {
            kind: Kind::Linear {
                start: check_p("start", start)?,
                end: check_p("end", end)?,
                steps,
            },
        })
    }

    /// Early dropout: `p` for the first `steps` steps, then 0.
    pub fn early(p: f64, steps: u64) -> Result<Self> {
        Ok(Schedule {
            kind: Kind::Early {
                p: check_p("p", p)?,
                steps,
            },
        })
    }

    /// Early dropout with a linear decay: from `p` down to 0 over the first `steps` steps.
    pub fn early_linear(p: f64, steps: u64) -> Result<Self> {
        Self::linear(p, 0.0, steps).map_err(|e| match e {
            Error::InvalidArgument { expected, got, .. } => Error::InvalidArgument {
                name: "p",
                expected,
                got,
            },
            other => other,
        })
    }

    /// Late dropout: 0 before step `start`, then `p`.
    pub fn late(p: f64, start: u64) -> Result<Self> {
        Ok(Schedule {
            kind: Kind::Late {
                p: check_p("p", p)?,
                start,
            },
        })
    }

    /// The drop probability at `step`, in `[0, 1]`.
    pub fn p(&self, step: u64) -> f64 {
        match self.kind {
            Kind::Constant { p } => p,
            Kind::Linear { start, end, steps } => ramp(start, end, steps, step),
            Kind::Early { p, steps } => {
                if step < steps {
                    p
                } else {
                    0.0
                }
            }
            Kind::Late { p, start } => {
                if step < start {
                    0.0
                } else {
                    p
                }
            }
        }
    }
}
