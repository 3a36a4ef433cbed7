//! Layer-skipping plans, computed on the host: which layers a training step drops (LayerDrop,
//! stochastic depth, LayerSkip's layer dropout), which early-exit losses it trains (LayerSkip's
//! curricula), which layers a pruned model keeps at inference, and which attention layers an
//! attention-drop model removes (with compact KV-cache slots for the rest).
//!
//! Every plan is a pure function of its arguments. Random plans depend only on `(seed, step)`
//! through the dropout Philox contract of [`crate::reference`], so every rank of a data-parallel
//! job, a resumed run and a future GPU kernel compute the same plan without communicating. The
//! contract:
//!
//! 1. **Layers.** A model has `L >= 1` layers numbered `l = 0 .. L - 1` from the input; the last
//!    layer is `L - 1`. All rates are `f64`, computed exactly in the order written here.
//!
//! 2. **Per-layer rates** ([`RateRule`], [`LayerDrop::base_rates`]). Every `p` given must be
//!    finite and in `[0, 1]`.
//!    * [`RateRule::Uniform`] `{ p }`: `p_l = p` (fairseq LayerDrop, Fan et al. 2019).
//!    * [`RateRule::Linear`] `{ p_max }`: `p_l = p_max * (l / (L - 1))`, the ratio computed first,
//!      so `p_0 = 0` and `p_{L-1} = p_max` exactly (stochastic depth's linear decay, Huang et al.
//!      2016, written like torchvision's and timm's `linspace(0, p_max, L)`). `L = 1`: `p_0 = p_max`.
//!    * [`RateRule::Exponential`] `{ p_max }`: LayerSkip's `D(l)` (Elhoushi et al. 2024),
//!      `p_l = p_max * (exp2(l / (L - 1)) - 1)`, the ratio computed first and the result clamped to
//!      `[0, p_max]` (a no-op in exact arithmetic); `p_0 = 0` and `p_{L-1} = p_max` exactly (the
//!      last layer's value is set, not computed). `L = 1`: `p_0 = p_max`, as for `Linear` (the only
//!      layer is the last one).
//!    * [`RateRule::PerStage`]: a list of [`Stage`]`{ layers: n_k, p: p_k }`; stage `k` covers the
//!      `n_k` consecutive layers after the previous stages, and `p_l = p_k` there. Every `n_k >= 1`
//!      and `sum n_k == L`.
//!
//! 3. **Time curriculum** ([`TimeCurriculum`]). The rate of layer `l` at step `t` is
//!    `p_{l,t} = c(t) * p_l` (one `f64` multiply), with `c(t)` in `[0, 1]`:
//!    * `Constant`: `c(t) = 1`.
//!    * `LinearWarmup { steps: T }`: `c(t) = t / T` for `t < T` (both converted to `f64`, one
//!      division), exactly `1` for `t >= T` and for `T = 0`.
//!    * `Exponential { steps: T }`: LayerSkip's `S(t)` for pretraining from scratch, which we read
//!      as `S(t) = e^(t ln 2 / T) - 1` over `T` steps: `c(t) = exp2(t / T) - 1` for `t < T`
//!      (clamped to `[0, 1]`), exactly `1` for `t >= T` and for `T = 0`. So `c(0) = 0`, `c`
//!      grows to 1 at step `T` and stays there.
//!
//! 4. **Protected layers** ([`LayerDrop::with_protected`]). fairseq's `LayerDropModuleList` draws
//!    every layer independently and guarantees nothing (all layers may be dropped in one step); so
//!    do these plans by default. A protected layer (e.g. the last, under an early-exit head) has
//!    effective rate `p_{l,t} = 0`: threshold 0, scale 1, always kept. Protection changes no element
//!    index of any other layer.
//!
//! 5. **Drawing a plan** ([`LayerDrop::plan`], [`LayerDrop::sample_plan`]). The plan of training
//!    step `t` with seed `s` uses [`PhiloxState`]`{ seed: s, offset: t }` and the dropout contract:
//!    `threshold_l = round(p_{l,t} * 2^32)` ([`drop_threshold`]) and element `e` is kept iff
//!    `word(e) >= threshold_l` ([`keep`]).
//!    * **Batch-wide** (fairseq LayerDrop: one decision per layer per step): layer `l` is element
//!      `e = l`.
//!    * **Per sample** (stochastic depth's row mode, torchtune's `LayerDropout`), batch size
//!      `B >= 1`: sample `b` of layer `l` is element `e = l * B + b`, layer-major, so one layer's
//!      decisions for the whole batch are contiguous. With `B = 1` it equals the batch-wide plan.
//!    * **Scale** of layer `l`: [`keep_scale`]`(p_{l,t})`, i.e. `(1 / (1 - p_{l,t})) as f32`
//!      computed in `f64`, `0` when `p_{l,t} = 1`. Stochastic depth (`scale_by_keep`, torchvision
//!      and timm) multiplies a kept residual branch by it; fairseq LayerDrop applies no scale (ignore
//!      it).
//!    * Convenience: [`LayerDropPlan::kept_layers`] (ascending) and
//!      [`SampleDropPlan::kept_samples`] (per layer, ascending sample indices: what a per-sample
//!      compaction gathers).
//!
//!    `(seed, offset)` pairs are shared with every other dropfuse kernel: give plans a seed of their
//!    own so that a plan's words are not also some tensor's dropout words.
//!
//! 6. **LayerSkip early-exit loss** ([`EarlyExit`], [`ExitCurriculum`]). Our reading of Elhoushi
//!    et al. 2024 (sec. 4.2): the loss at step `t` is `sum_l w(t, l) * CE(exit l)`, with a binary
//!    curriculum `C(t, l)` and
//!    `w(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i)`, where `e(l) = e_scale * l (l + 1) / 2`
//!    (`= e_scale * sum_{i=0}^{l} i`) for `l < L - 1` and `e(L - 1) = (L - 1) + e_scale * (L - 2)
//!    (L - 1) / 2`; the sums are in ascending `l`. The last exit is always enabled (`C(t, L-1) = 1`),
//!    so the denominator is `>= L - 1 > 0` for `L >= 2` and the weights are `>= 0` and sum to 1;
//!    for `L = 1` the only exit has weight 1. An enabled exit can weigh 0: exit 0 always
//!    (`e(0) = 0`), and every exit but the last when `e_scale = 0`. Curricula (`L - 1` is always
//!    enabled in addition):
//!    * `All`: every exit enabled.
//!    * `Rotational { period: R }` (`C_rot,R`, `R >= 1`): exit `l` enabled iff
//!      `l mod R == t mod R`; the plan is periodic in `t` with period `R`.
//!    * `Gradual { steps: T }` (`C_grad`): exit `l` enabled iff `L * t >= (L - l) * T` (exact
//!      integer arithmetic): exits switch on from the last towards the first, exit `l` at step
//!      `ceil((L - l) T / L)`, exit 0 at step `T`, all from step `T` on (and from step 0 when
//!      `T = 0`); monotone in `t`. The paper enables one more layer every `T_train / (2L)`
//!      iterations, all by half of training (torchtune's `GradualEarlyExitCurriculum` rule
//!      `t / T_train >= 0.5 (L - l) / L`): pass `T = T_train / 2` for that.
//!
//! 7. **Inference pruning** ([`LayerRemap`]). A remap is a strictly ascending list of kept layers
//!    out of `L`; kept layer `kept[j]` runs as compact layer `j` (`new -> old` is `kept[j]`,
//!    `old -> new` is its position, `None` for dropped layers). [`LayerRemap::keep_every_other`]
//!    keeps the layers of one [`Parity`] (`Even`: 0, 2, 4, ...; `Odd`: 1, 3, 5, ...) and, with
//!    `keep_last`, also layer `L - 1`. [`LayerRemap::from_kept`] takes any strictly ascending,
//!    in-range list. An empty kept set is valid (e.g. every attention layer dropped).
//!
//! 8. **Attention-layer drop** ([`AttentionDropPlan`], "What Matters in Transformers? Not All
//!    Attention is Needed", He et al. 2024). Input: one mean similarity per attention layer (the
//!    cosine similarity of an attention block's input and output, averaged over calibration
//!    tokens, e.g. with a [`SimilarityAccumulator`]); every value finite. Importance is
//!    `1 - similarity`. The `n` layers with the highest similarity are dropped (`n <= layers`);
//!    equal similarities (compared as numbers, `-0.0 == 0.0`) drop the higher layer index first.
//!    The kept attention layers, in ascending layer order, get KV-cache slots `0 .. kept - 1` (a
//!    [`LayerRemap`]).
//!
//! 9. **Validation.** Every invalid argument is an [`Error::InvalidArgument`] naming it (`layers`,
//!    `p`, `p_max`, `stages`, `protected`, `batch`, `period`, `e_scale`, `kept`, `similarities`,
//!    `n_drop`, `layer`, `similarity_sum`, `tokens`, ...); nothing here panics. A layer count or
//!    batch whose per-layer (per-sample) vectors cannot be allocated is a `layers` (`batch`) error.

use std::cmp::Ordering;

use crate::error::{Error, Result};
use crate::reference::dropout::{drop_threshold, keep, keep_scale};
use crate::rng::PhiloxState;

/// Checks that `p` is a probability: finite and in `[0, 1]` (NaN fails the comparison).
fn check_p(name: &'static str, p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::invalid(name, "a probability in [0, 1]", p))
    }
}

/// Rejects `L = 0`.
fn check_layers(layers: usize) -> Result<()> {
    if layers == 0 {
        Err(Error::invalid("layers", "at least 1 layer", 0))
    } else {
        Ok(())
    }
}

/// Rejects an `L` whose `L` entries of `T` (a per-layer vector an infallible method builds later)
/// could not be held by any `Vec` (over `isize::MAX` bytes: a capacity-overflow panic).
fn check_map_len<T>(layers: usize) -> Result<()> {
    if crate::alloc::fits::<T>(layers) {
        Ok(())
    } else {
        Err(Error::invalid(
            "layers",
            format!(
                "at most isize::MAX / {} layers (one {}-byte entry per layer)",
                std::mem::size_of::<T>(),
                std::mem::size_of::<T>()
            ),
            layers,
        ))
    }
}

// ------------------------------------------------------------------------------------------------
// Rates

/// One stage of [`RateRule::PerStage`]: `layers` consecutive layers with drop rate `p`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    /// Number of consecutive layers in the stage (`>= 1`).
    pub layers: usize,
    /// Their drop rate (finite, in `[0, 1]`).
    pub p: f64,
}

/// How the base drop rate `p_l` depends on the depth `l` (contract item 2).
#[derive(Debug, Clone, PartialEq)]
pub enum RateRule {
    /// `p_l = p` for every layer.
    Uniform { p: f64 },
    /// `p_l = p_max * (l / (L - 1))`; `p_max` for `L = 1` (stochastic depth).
    Linear { p_max: f64 },
    /// `p_l = p_max * (2^(l / (L - 1)) - 1)`; `p_max` for `L = 1` (LayerSkip).
    Exponential { p_max: f64 },
    /// Consecutive stages, their layer counts summing to `L`.
    PerStage(Vec<Stage>),
}

/// The factor `c(t)` in `[0, 1]` multiplying every rate at step `t` (contract item 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeCurriculum {
    /// `c(t) = 1`.
    #[default]
    Constant,
    /// `c(t) = min(t / steps, 1)`; `1` when `steps = 0`.
    LinearWarmup { steps: u64 },
    /// LayerSkip's `c(t) = 2^(t / steps) - 1` for `t < steps`, then `1`; `1` when `steps = 0`.
    Exponential { steps: u64 },
}

impl TimeCurriculum {
    /// `c(step)`, in `[0, 1]`; exactly 1 from the end of the ramp on.
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            TimeCurriculum::Constant => 1.0,
            TimeCurriculum::LinearWarmup { steps } => {
                if step >= steps {
                    1.0
                } else {
                    (step as f64 / steps as f64).clamp(0.0, 1.0)
                }
            }
            TimeCurriculum::Exponential { steps } => {
                if step >= steps {
                    1.0
                } else {
                    ((step as f64 / steps as f64).exp2() - 1.0).clamp(0.0, 1.0)
                }
            }
        }
    }
}

/// A validated layer-drop configuration: `L`, the rate rule, the time curriculum and the
/// protected layers. Draws [`LayerDropPlan`]s and [`SampleDropPlan`]s (contract items 2 to 5).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDrop {
    rule: RateRule,
    curriculum: TimeCurriculum,
    /// `p_l` for every layer (before the curriculum and protection).
    base: Vec<f64>,
    protected: Vec<bool>,
}

impl LayerDrop {
    /// `layers >= 1` layers with the given rule; constant curriculum, no protected layer.
    ///
    /// Errors: `layers` (0, or more layers than their rates can be allocated for), `p` (Uniform),
    /// `p_max` (Linear, Exponential), `stages` (empty list, a stage of 0 layers, a bad `p`, counts
    /// not summing to `layers`).
    pub fn new(layers: usize, rule: RateRule) -> Result<Self> {
        check_layers(layers)?;
        let base = base_rates(layers, &rule)?;
        Ok(LayerDrop {
            rule,
            curriculum: TimeCurriculum::Constant,
            base,
            protected: crate::alloc::filled("layers", layers, false)?,
        })
    }

    /// Multiplies the rates by `curriculum.factor(step)`.
    pub fn with_curriculum(mut self, curriculum: TimeCurriculum) -> Self {
        self.curriculum = curriculum;
        self
    }

    /// Protects `layers` (in addition to those already protected): they are always kept.
    /// Any order, duplicates allowed; every index must be `< L` (error `protected`).
    pub fn with_protected(mut self, layers: &[usize]) -> Result<Self> {
        let n = self.layers();
        if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
            return Err(Error::invalid("protected", format!("layer indices < {n}"), bad));
        }
        for &l in layers {
            self.protected[l] = true;
        }
        Ok(self)
    }

    /// Protects the last layer `L - 1`.
    pub fn with_last_protected(mut self) -> Self {
        let last = self.layers() - 1;
        self.protected[last] = true;
        self
    }

    /// `L`.
    pub fn layers(&self) -> usize {
        self.base.len()
    }
    pub fn rule(&self) -> &RateRule {
        &self.rule
    }
    pub fn curriculum(&self) -> TimeCurriculum {
        self.curriculum
    }
    /// Whether each layer is protected.
    pub fn protected(&self) -> &[bool] {
        &self.protected
    }

    /// The base rates `p_l` (item 2), before the curriculum and protection.
    pub fn base_rates(&self) -> &[f64] {
        &self.base
    }

    /// The effective rates at `step`: `c(step) * p_l`, and 0 for protected layers.
    pub fn rates(&self, step: u64) -> Vec<f64> {
        let c = self.curriculum.factor(step);
        self.base
            .iter()
            .zip(&self.protected)
            .map(|(&p, &prot)| if prot { 0.0 } else { c * p })
            .collect()
    }

    /// Rates, thresholds and scales at `step`.
    fn decision_params(&self, step: u64) -> (Vec<f64>, Vec<u64>, Vec<f32>) {
        let rates = self.rates(step);
        // Rates are validated probabilities times a factor in [0, 1], hence probabilities.
        let thresholds = rates
            .iter()
            .map(|&p| drop_threshold(p).expect("layer rates are probabilities"))
            .collect();
        let scales = rates
            .iter()
            .map(|&p| keep_scale(p).expect("layer rates are probabilities"))
            .collect();
        (rates, thresholds, scales)
    }

    /// The batch-wide plan of step `step` (one decision per layer: layer `l` is element `l` of
    /// `PhiloxState { seed, offset: step }`).
    pub fn plan(&self, seed: u64, step: u64) -> LayerDropPlan {
        let state = PhiloxState::new(seed, step);
        let (rates, thresholds, scales) = self.decision_params(step);
        let keep_flags = thresholds
            .iter()
            .enumerate()
            .map(|(l, &th)| keep(state, l as u64, th))
            .collect();
        LayerDropPlan {
            state,
            rates,
            thresholds,
            scales,
            keep: keep_flags,
        }
    }

    /// The per-sample plan of step `step` for a batch of `batch >= 1` samples: sample `b` of layer
    /// `l` is element `l * batch + b` of `PhiloxState { seed, offset: step }`.
    ///
    /// Errors: `batch` (0, or `L * batch` not representable in `usize` / `u64`, or more flags than
    /// can be allocated).
    pub fn sample_plan(&self, seed: u64, step: u64, batch: usize) -> Result<SampleDropPlan> {
        if batch == 0 {
            return Err(Error::invalid("batch", "at least 1 sample", 0));
        }
        let layers = self.layers();
        let total = layers
            .checked_mul(batch)
            .filter(|&n| u64::try_from(n).is_ok())
            .ok_or_else(|| {
                Error::invalid(
                    "batch",
                    format!("layers * batch representable (layers = {layers})"),
                    batch,
                )
            })?;
        let state = PhiloxState::new(seed, step);
        let (rates, thresholds, scales) = self.decision_params(step);
        let mut keep_flags = crate::alloc::with_capacity("batch", total)?;
        for (l, &th) in thresholds.iter().enumerate() {
            let first = (l * batch) as u64;
            keep_flags.extend((0..batch as u64).map(|b| keep(state, first + b, th)));
        }
        Ok(SampleDropPlan {
            state,
            batch,
            rates,
            thresholds,
            scales,
            keep: keep_flags,
        })
    }
}

/// `p_l` for every layer (contract item 2), validating the rule.
fn base_rates(layers: usize, rule: &RateRule) -> Result<Vec<f64>> {
    let last = layers - 1;
    match rule {
        RateRule::Uniform { p } => {
            check_p("p", *p)?;
            crate::alloc::filled("layers", layers, *p)
        }
        RateRule::Linear { p_max } => {
            check_p("p_max", *p_max)?;
            if layers == 1 {
                return Ok(vec![*p_max]);
            }
            let mut rates = crate::alloc::with_capacity("layers", layers)?;
            rates.extend((0..layers).map(|l| p_max * (l as f64 / last as f64)));
            Ok(rates)
        }
        RateRule::Exponential { p_max } => {
            check_p("p_max", *p_max)?;
            if layers == 1 {
                return Ok(vec![*p_max]);
            }
            let mut rates = crate::alloc::with_capacity("layers", layers)?;
            rates.extend((0..layers).map(|l| {
                if l == last {
                    *p_max
                } else {
                    (p_max * ((l as f64 / last as f64).exp2() - 1.0)).clamp(0.0, *p_max)
                }
            }));
            Ok(rates)
        }
        RateRule::PerStage(stages) => {
            if stages.is_empty() {
                return Err(Error::invalid("stages", "at least one stage", "none"));
            }
            let mut total = 0usize;
            for (k, stage) in stages.iter().enumerate() {
                if stage.layers == 0 {
                    return Err(Error::invalid(
                        "stages",
                        "every stage with at least 1 layer",
                        format!("stage {k} with 0 layers"),
                    ));
                }
                if !(0.0..=1.0).contains(&stage.p) {
                    return Err(Error::invalid(
                        "stages",
                        "every stage's p a probability in [0, 1]",
                        format!("stage {k} with p = {}", stage.p),
                    ));
                }
                total = match total.checked_add(stage.layers) {
                    Some(t) if t <= layers => t,
                    _ => {
                        return Err(Error::invalid(
                            "stages",
                            format!("stage layer counts summing to {layers}"),
                            "more layers",
                        ))
                    }
                };
            }
            if total != layers {
                return Err(Error::invalid(
                    "stages",
                    format!("stage layer counts summing to {layers}"),
                    total,
                ));
            }
            let mut rates = crate::alloc::with_capacity("layers", layers)?;
            for stage in stages {
                rates.extend(std::iter::repeat(stage.p).take(stage.layers));
            }
            Ok(rates)
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Plans

/// A batch-wide layer-drop plan: one keep decision per layer (contract item 5).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDropPlan {
    state: PhiloxState,
    rates: Vec<f64>,
    thresholds: Vec<u64>,
    scales: Vec<f32>,
    keep: Vec<bool>,
}

impl LayerDropPlan {
    /// `PhiloxState { seed, offset: step }` the plan was drawn with.
    pub fn state(&self) -> PhiloxState {
        self.state
    }
    /// `L`.
    pub fn layers(&self) -> usize {
        self.keep.len()
    }
    /// Effective rates `p_{l,t}` (0 for protected layers).
    pub fn rates(&self) -> &[f64] {
        &self.rates
    }
    /// `round(p_{l,t} * 2^32)` per layer.
    pub fn thresholds(&self) -> &[u64] {
        &self.thresholds
    }
    /// `(1 / (1 - p_{l,t})) as f32` per layer, 0 where `p_{l,t} = 1`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Keep flag per layer.
    pub fn keep(&self) -> &[bool] {
        &self.keep
    }
    /// Kept layer indices, ascending.
    pub fn kept_layers(&self) -> Vec<usize> {
        (0..self.layers()).filter(|&l| self.keep[l]).collect()
    }
    /// Dropped layer indices, ascending.
    pub fn dropped_layers(&self) -> Vec<usize> {
        (0..self.layers()).filter(|&l| !self.keep[l]).collect()
    }
    /// The kept layers as a compact [`LayerRemap`].
    pub fn remap(&self) -> LayerRemap {
        LayerRemap {
            layers: self.layers(),
            kept: self.kept_layers(),
        }
    }
}

/// A per-sample layer-drop plan: one keep decision per (layer, sample), layer-major
/// (contract item 5).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleDropPlan {
    state: PhiloxState,
    batch: usize,
    rates: Vec<f64>,
    thresholds: Vec<u64>,
    scales: Vec<f32>,
    keep: Vec<bool>,
}

impl SampleDropPlan {
    /// `PhiloxState { seed, offset: step }` the plan was drawn with.
    pub fn state(&self) -> PhiloxState {
        self.state
    }
    /// `L`.
    pub fn layers(&self) -> usize {
        self.rates.len()
    }
    /// `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Effective rates `p_{l,t}` (0 for protected layers).
    pub fn rates(&self) -> &[f64] {
        &self.rates
    }
    /// `round(p_{l,t} * 2^32)` per layer.
    pub fn thresholds(&self) -> &[u64] {
        &self.thresholds
    }
    /// `(1 / (1 - p_{l,t})) as f32` per layer, 0 where `p_{l,t} = 1`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// All `L * B` keep flags; flag `l * B + b` is sample `b` of layer `l`.
    pub fn keep(&self) -> &[bool] {
        &self.keep
    }
    /// The `B` keep flags of layer `l`, or `None` when `l >= L`.
    pub fn layer_keep(&self, l: usize) -> Option<&[bool]> {
        self.keep.chunks_exact(self.batch).nth(l)
    }
    /// For every layer, its kept sample indices in ascending order.
    pub fn kept_samples(&self) -> Vec<Vec<usize>> {
        self.keep
            .chunks_exact(self.batch)
            .map(|row| (0..self.batch).filter(|&b| row[b]).collect())
            .collect()
    }
    /// For every layer, how many samples it keeps.
    pub fn kept_counts(&self) -> Vec<usize> {
        self.keep
            .chunks_exact(self.batch)
            .map(|row| row.iter().filter(|&&k| k).count())
            .collect()
    }
}

// ------------------------------------------------------------------------------------------------
// LayerSkip early exit

/// Which early exits a LayerSkip step trains (contract item 6); the last exit is always enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCurriculum {
    /// Every exit.
    All,
    /// `C_rot,R`: exit `l` iff `l mod period == t mod period` (`period >= 1`).
    Rotational { period: u64 },
    /// `C_grad`: exit `l` iff `L * t >= (L - l) * steps`; all exits from step `steps` on.
    Gradual { steps: u64 },
}

/// A validated LayerSkip early-exit loss configuration (contract item 6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyExit {
    layers: usize,
    curriculum: ExitCurriculum,
    e_scale: f64,
}

impl EarlyExit {
    /// `layers >= 1` exits (one after every layer), a curriculum and `e_scale` (finite, `>= 0`).
    ///
    /// Errors: `layers` (0, or more exits than a plan's `L` weights can hold: over `isize::MAX`
    /// bytes), `period` (a rotational period of 0), `e_scale`.
    pub fn new(layers: usize, curriculum: ExitCurriculum, e_scale: f64) -> Result<Self> {
        check_layers(layers)?;
        check_map_len::<f64>(layers)?;
        if let ExitCurriculum::Rotational { period: 0 } = curriculum {
            return Err(Error::invalid("period", "at least 1", 0));
        }
        if !(e_scale.is_finite() && e_scale >= 0.0) {
            return Err(Error::invalid("e_scale", "a finite value >= 0", e_scale));
        }
        Ok(EarlyExit {
            layers,
            curriculum,
            e_scale,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }
    pub fn curriculum(&self) -> ExitCurriculum {
        self.curriculum
    }
    pub fn e_scale(&self) -> f64 {
        self.e_scale
    }

    /// Whether exit `l` is enabled at `step` (`C(t, l)`, with the last exit forced on); `false`
    /// for `l >= L`.
    pub fn enabled(&self, step: u64, l: usize) -> bool {
        let last = self.layers - 1;
        if l > last {
            return false;
        }
        if l == last {
            return true;
        }
        match self.curriculum {
            ExitCurriculum::All => true,
            ExitCurriculum::Rotational { period } => (l as u64) % period == step % period,
            ExitCurriculum::Gradual { steps } => {
                let n = self.layers as u128;
                n * u128::from(step) >= (n - l as u128) * u128::from(steps)
            }
        }
    }

    /// The un-normalised scale `e(l)` (`0` for `l >= L`).
    pub fn exit_scale(&self, l: usize) -> f64 {
        let last = self.layers - 1;
        let tri = |k: usize| (k as u128 * (k as u128 + 1) / 2) as f64;
        match l.cmp(&last) {
            Ordering::Less => self.e_scale * tri(l),
            Ordering::Equal => {
                if last == 0 {
                    0.0
                } else {
                    last as f64 + self.e_scale * tri(last - 1)
                }
            }
            Ordering::Greater => 0.0,
        }
    }

    /// The plan of step `step`: enabled exits and their loss weights.
    pub fn plan(&self, step: u64) -> EarlyExitPlan {
        let enabled: Vec<bool> = (0..self.layers).map(|l| self.enabled(step, l)).collect();
        let weights = if self.layers == 1 {
            vec![1.0]
        } else {
            let raw: Vec<f64> = (0..self.layers)
                .map(|l| if enabled[l] { self.exit_scale(l) } else { 0.0 })
                .collect();
            let total: f64 = raw.iter().sum();
            raw.iter().map(|&e| e / total).collect()
        };
        EarlyExitPlan { enabled, weights }
    }
}

/// One step of a LayerSkip early-exit curriculum: enabled exits and their loss weights.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyExitPlan {
    enabled: Vec<bool>,
    weights: Vec<f64>,
}

impl EarlyExitPlan {
    /// Whether each exit's loss is computed (the last always is).
    pub fn enabled(&self) -> &[bool] {
        &self.enabled
    }
    /// Enabled exit indices, ascending.
    pub fn enabled_exits(&self) -> Vec<usize> {
        (0..self.enabled.len()).filter(|&l| self.enabled[l]).collect()
    }
    /// The weight `w(t, l)` of every exit: `>= 0`, 0 for disabled exits, summing to 1.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
}

// ------------------------------------------------------------------------------------------------
// Pruning remaps

/// Which layers [`LayerRemap::keep_every_other`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// Layers 0, 2, 4, ...
    Even,
    /// Layers 1, 3, 5, ...
    Odd,
}

/// A set of kept layers out of `L` and its compaction: kept layer `kept[j]` becomes layer (or
/// KV-cache slot) `j` (contract item 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRemap {
    layers: usize,
    kept: Vec<usize>,
}

impl LayerRemap {
    /// Keeps the layers of `parity`, plus layer `L - 1` when `keep_last`.
    ///
    /// Errors: `layers` (0, or more layers than the remap's maps can be allocated for).
    pub fn keep_every_other(layers: usize, parity: Parity, keep_last: bool) -> Result<Self> {
        check_layers(layers)?;
        check_map_len::<Option<usize>>(layers)?;
        let first = match parity {
            Parity::Even => 0,
            Parity::Odd => 1,
        };
        // At most ceil(L / 2) kept by parity, plus the last layer.
        let mut kept = crate::alloc::with_capacity("layers", layers.div_ceil(2) + 1)?;
        kept.extend((first..layers).step_by(2));
        if keep_last && kept.last() != Some(&(layers - 1)) {
            kept.push(layers - 1);
        }
        Ok(LayerRemap { layers, kept })
    }

    /// Keeps exactly `kept`, a strictly ascending (sorted, no duplicates) list of indices `< L`.
    ///
    /// Errors: `layers` (0, or more layers than [`old_to_new`](Self::old_to_new)'s `L` entries
    /// can hold: over `isize::MAX` bytes), `kept`.
    pub fn from_kept(layers: usize, kept: &[usize]) -> Result<Self> {
        check_layers(layers)?;
        check_map_len::<Option<usize>>(layers)?;
        if let Some(&bad) = kept.iter().find(|&&l| l >= layers) {
            return Err(Error::invalid("kept", format!("layer indices < {layers}"), bad));
        }
        if let Some(w) = kept.windows(2).find(|w| w[0] >= w[1]) {
            return Err(Error::invalid(
                "kept",
                "strictly ascending layer indices (sorted, no duplicates)",
                format!("{} followed by {}", w[0], w[1]),
            ));
        }
        Ok(LayerRemap {
            layers,
            kept: kept.to_vec(),
        })
    }

    /// `L`, the number of original layers.
    pub fn layers(&self) -> usize {
        self.layers
    }
    /// The kept original indices, ascending: `new -> old`.
    pub fn kept(&self) -> &[usize] {
        &self.kept
    }
    /// Number of kept layers (compact indices are `0 .. kept_len()`).
    pub fn kept_len(&self) -> usize {
        self.kept.len()
    }
    /// The compact index of original layer `old`; `None` when it is dropped or `>= L`.
    pub fn new_index(&self, old: usize) -> Option<usize> {
        self.kept.binary_search(&old).ok()
    }
    /// The original index of compact layer `new`; `None` when `new >= kept_len()`.
    pub fn old_index(&self, new: usize) -> Option<usize> {
        self.kept.get(new).copied()
    }
    /// `old -> new` for every original layer.
    pub fn old_to_new(&self) -> Vec<Option<usize>> {
        let mut map = vec![None; self.layers];
        for (new, &old) in self.kept.iter().enumerate() {
            map[old] = Some(new);
        }
        map
    }
}

// ------------------------------------------------------------------------------------------------
// Attention drop

/// Accumulates per-layer attention similarities over calibration batches: for each layer, the sum
/// of its token similarities and the number of tokens; the mean is `sum / tokens` (`f64` sums in
/// the order added).
#[derive(Debug, Clone, PartialEq)]
pub struct SimilarityAccumulator {
    sums: Vec<f64>,
    tokens: Vec<u64>,
}

impl SimilarityAccumulator {
    /// An empty accumulator for `layers >= 1` attention layers (error `layers`, also when they
    /// cannot be allocated).
    pub fn new(layers: usize) -> Result<Self> {
        check_layers(layers)?;
        Ok(SimilarityAccumulator {
            sums: crate::alloc::filled("layers", layers, 0.0)?,
            tokens: crate::alloc::filled("layers", layers, 0)?,
        })
    }

    /// Adds one batch of layer `layer`: the sum of its `tokens` token similarities.
    ///
    /// Errors: `layer` (`>= layers`), `similarity_sum` (not finite), `tokens` (0, or the count
    /// overflows `u64`). Nothing changes on error.
    pub fn add(&mut self, layer: usize, similarity_sum: f64, tokens: u64) -> Result<()> {
        if layer >= self.sums.len() {
            return Err(Error::invalid(
                "layer",
                format!("an attention layer index < {}", self.sums.len()),
                layer,
            ));
        }
        if !similarity_sum.is_finite() {
            return Err(Error::invalid("similarity_sum", "a finite value", similarity_sum));
        }
        if tokens == 0 {
            return Err(Error::invalid("tokens", "at least 1 token", 0));
        }
        let count = self.tokens[layer]
            .checked_add(tokens)
            .ok_or_else(|| Error::invalid("tokens", "a total token count < 2^64", tokens))?;
        self.sums[layer] += similarity_sum;
        self.tokens[layer] = count;
        Ok(())
    }

    /// Adds one batch for every layer: `similarity_sums[i]` over `tokens[i]` tokens of layer `i`.
    /// Both slices have one entry per layer; all are validated before anything is added.
    ///
    /// Errors: `similarity_sums` (wrong length, not finite), `tokens` (wrong length, 0, overflow).
    pub fn add_batch(&mut self, similarity_sums: &[f64], tokens: &[u64]) -> Result<()> {
        let n = self.sums.len();
        if similarity_sums.len() != n {
            return Err(Error::invalid(
                "similarity_sums",
                format!("{n} values (one per attention layer)"),
                similarity_sums.len(),
            ));
        }
        if tokens.len() != n {
            return Err(Error::invalid(
                "tokens",
                format!("{n} counts (one per attention layer)"),
                tokens.len(),
            ));
        }
        if let Some(&bad) = similarity_sums.iter().find(|s| !s.is_finite()) {
            return Err(Error::invalid("similarity_sums", "finite values", bad));
        }
        for (&have, &add) in self.tokens.iter().zip(tokens) {
            if add == 0 {
                return Err(Error::invalid("tokens", "at least 1 token per layer", 0));
            }
            if have.checked_add(add).is_none() {
                return Err(Error::invalid("tokens", "a total token count < 2^64", add));
            }
        }
        for i in 0..n {
            self.sums[i] += similarity_sums[i];
            self.tokens[i] += tokens[i];
        }
        Ok(())
    }

    /// Number of attention layers.
    pub fn layers(&self) -> usize {
        self.sums.len()
    }
    /// Token count per layer.
    pub fn tokens(&self) -> &[u64] {
        &self.tokens
    }
    /// Similarity sum per layer.
    pub fn sums(&self) -> &[f64] {
        &self.sums
    }
    /// The mean similarity of `layer`; `None` when it has no tokens yet or `layer >= layers`.
    pub fn mean(&self, layer: usize) -> Option<f64> {
        match self.tokens.get(layer) {
            Some(&t) if t > 0 => Some(self.sums[layer] / t as f64),
            _ => None,
        }
    }
    /// Every layer's mean similarity; `None` until every layer has at least one token.
    pub fn means(&self) -> Option<Vec<f64>> {
        (0..self.layers()).map(|l| self.mean(l)).collect()
    }
}

/// Drops the `n` most redundant attention layers (highest similarity) and assigns compact
/// KV-cache slots to the others (contract item 8).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionDropPlan {
    similarities: Vec<f64>,
    order: Vec<usize>,
    n_drop: usize,
    dropped: Vec<usize>,
    remap: LayerRemap,
}

impl AttentionDropPlan {
    /// From one mean similarity per attention layer (non-empty, all finite), dropping `n_drop`
    /// layers (`<= similarities.len()`).
    ///
    /// Errors: `similarities` (empty, not finite), `n_drop`.
    pub fn new(similarities: &[f64], n_drop: usize) -> Result<Self> {
        if similarities.is_empty() {
            return Err(Error::invalid(
                "similarities",
                "one similarity per attention layer (at least 1)",
                "none",
            ));
        }
        if let Some(&bad) = similarities.iter().find(|s| !s.is_finite()) {
            return Err(Error::invalid("similarities", "finite values", bad));
        }
        let layers = similarities.len();
        if n_drop > layers {
            return Err(Error::invalid(
                "n_drop",
                format!("at most the number of attention layers ({layers})"),
                n_drop,
            ));
        }
        let mut order: Vec<usize> = (0..layers).collect();
        // Highest similarity first; ties: higher layer index first. Values are finite, so
        // partial_cmp always answers (and treats -0.0 == 0.0).
        order.sort_by(|&a, &b| {
            similarities[b]
                .partial_cmp(&similarities[a])
                .unwrap_or(Ordering::Equal)
                .then(b.cmp(&a))
        });
        let mut dropped = order[..n_drop].to_vec();
        dropped.sort_unstable();
        let kept: Vec<usize> = (0..layers)
            .filter(|l| dropped.binary_search(l).is_err())
            .collect();
        Ok(AttentionDropPlan {
            similarities: similarities.to_vec(),
            order,
            n_drop,
            dropped,
            remap: LayerRemap { layers, kept },
        })
    }

    /// From an accumulator's means (errors: `accumulator` when a layer has no tokens yet, plus
    /// those of [`AttentionDropPlan::new`]).
    pub fn from_accumulator(acc: &SimilarityAccumulator, n_drop: usize) -> Result<Self> {
        let means = acc.means().ok_or_else(|| {
            Error::invalid(
                "accumulator",
                "at least one token for every attention layer",
                "a layer with 0 tokens",
            )
        })?;
        Self::new(&means, n_drop)
    }

    /// Number of attention layers.
    pub fn layers(&self) -> usize {
        self.similarities.len()
    }
    /// The input similarities.
    pub fn similarities(&self) -> &[f64] {
        &self.similarities
    }
    /// `1 - similarity` per layer.
    pub fn importance(&self) -> Vec<f64> {
        self.similarities.iter().map(|&s| 1.0 - s).collect()
    }
    /// Every layer in drop order (highest similarity first, ties: higher index first); the first
    /// `n_drop` are dropped.
    pub fn drop_order(&self) -> &[usize] {
        &self.order
    }
    /// `n`.
    pub fn n_drop(&self) -> usize {
        self.n_drop
    }
    /// Dropped attention layers, ascending.
    pub fn dropped(&self) -> &[usize] {
        &self.dropped
    }
    /// Kept attention layers, ascending (KV slot `j` belongs to `kept()[j]`).
    pub fn kept(&self) -> &[usize] {
        self.remap.kept()
    }
    /// The KV-cache slot of attention layer `layer`; `None` when dropped or out of range.
    pub fn kv_slot(&self, layer: usize) -> Option<usize> {
        self.remap.new_index(layer)
    }
    /// The KV-cache slot of every attention layer.
    pub fn kv_slots(&self) -> Vec<Option<usize>> {
        self.remap.old_to_new()
    }
    /// Number of KV-cache slots (kept attention layers).
    pub fn kv_slot_count(&self) -> usize {
        self.remap.kept_len()
    }
    /// The kept layers as a [`LayerRemap`] (compact index = KV slot).
    pub fn remap(&self) -> &LayerRemap {
        &self.remap
    }
}
