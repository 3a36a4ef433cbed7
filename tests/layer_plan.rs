//! Tests of the layer-skipping plans: rate formulas, curricula, Philox decisions against the
//! dropout reference, statistics, LayerSkip early-exit curricula, pruning remaps, attention drop
//! and validation.

mod common;

use common::{assert_binomial, cases, invalid_name};
use dropfuse::layer_plan::{
    AttentionDropPlan, EarlyExit, ExitCurriculum, LayerDrop, LayerRemap, Parity, RateRule,
    SimilarityAccumulator, Stage, TimeCurriculum,
};
use dropfuse::reference::dropout::{drop_threshold, keep, keep_scale};
use dropfuse::PhiloxState;
use proptest::prelude::*;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

// ---------------------------------------------------------------------------------------------
// Rates

#[test]
fn uniform_and_linear_rates() {
    let d = LayerDrop::new(4, RateRule::Uniform { p: 0.3 }).unwrap();
    assert_eq!(d.base_rates(), &[0.3; 4]);

    let d = LayerDrop::new(5, RateRule::Linear { p_max: 0.4 }).unwrap();
    let r = d.base_rates();
    assert_eq!(r[0], 0.0);
    assert_eq!(r[4], 0.4);
    for (l, &p) in r.iter().enumerate() {
        assert!(close(p, 0.1 * l as f64, 1e-15), "layer {l}: {p}");
    }
    // p_l = p_max * (l / (L - 1)), ratio first.
    let d = LayerDrop::new(7, RateRule::Linear { p_max: 0.7 }).unwrap();
    for (l, &p) in d.base_rates().iter().enumerate() {
        assert_eq!(p.to_bits(), (0.7 * (l as f64 / 6.0)).to_bits());
    }
    // One layer: it is the last one.
    let d = LayerDrop::new(1, RateRule::Linear { p_max: 0.25 }).unwrap();
    assert_eq!(d.base_rates(), &[0.25]);
}

#[test]
fn layerskip_exponential_rates() {
    for layers in [2usize, 3, 8, 32, 80] {
        for p_max in [0.0, 0.1, 0.2, 0.5, 1.0] {
            let d = LayerDrop::new(layers, RateRule::Exponential { p_max }).unwrap();
            let r = d.base_rates();
            assert_eq!(r[0], 0.0, "L = {layers}");
            assert_eq!(r[layers - 1], p_max, "L = {layers}");
            for l in 0..layers {
                let want = p_max * ((l as f64 / (layers - 1) as f64).exp2() - 1.0);
                assert!(close(r[l], want, 1e-15), "L = {layers}, l = {l}");
                assert!((0.0..=p_max).contains(&r[l]));
                if l > 0 {
                    assert!(r[l] >= r[l - 1], "not monotone at {l}");
                }
            }
        }
    }
    let d = LayerDrop::new(3, RateRule::Exponential { p_max: 0.5 }).unwrap();
    assert!(close(d.base_rates()[1], 0.5 * (2f64.sqrt() - 1.0), 1e-16));
    let d = LayerDrop::new(1, RateRule::Exponential { p_max: 0.3 }).unwrap();
    assert_eq!(d.base_rates(), &[0.3]);
}

#[test]
fn per_stage_boundaries() {
    let stages = vec![
        Stage { layers: 2, p: 0.1 },
        Stage { layers: 3, p: 0.2 },
        Stage { layers: 1, p: 0.5 },
    ];
    let d = LayerDrop::new(6, RateRule::PerStage(stages)).unwrap();
    assert_eq!(d.base_rates(), &[0.1, 0.1, 0.2, 0.2, 0.2, 0.5]);
    let one = LayerDrop::new(3, RateRule::PerStage(vec![Stage { layers: 3, p: 1.0 }])).unwrap();
    assert_eq!(one.base_rates(), &[1.0; 3]);
}

#[test]
fn time_curricula() {
    assert_eq!(TimeCurriculum::Constant.factor(0), 1.0);
    assert_eq!(TimeCurriculum::Constant.factor(u64::MAX), 1.0);
    let w = TimeCurriculum::LinearWarmup { steps: 100 };
    assert_eq!(w.factor(0), 0.0);
    assert_eq!(w.factor(25), 0.25);
    assert_eq!(w.factor(50), 0.5);
    assert_eq!(w.factor(100), 1.0);
    assert_eq!(w.factor(u64::MAX), 1.0);
    assert_eq!(TimeCurriculum::LinearWarmup { steps: 0 }.factor(0), 1.0);
    let e = TimeCurriculum::Exponential { steps: 1000 };
    assert_eq!(e.factor(0), 0.0);
    assert!(close(e.factor(500), 2f64.sqrt() - 1.0, 1e-15));
    assert_eq!(e.factor(1000), 1.0);
    assert_eq!(e.factor(5000), 1.0);
    assert_eq!(TimeCurriculum::Exponential { steps: 0 }.factor(0), 1.0);
    for c in [w, e] {
        let mut prev = 0.0;
        for t in 0..1100 {
            let f = c.factor(t);
            assert!((0.0..=1.0).contains(&f) && f >= prev, "{c:?} at {t}");
            prev = f;
        }
    }
    // Rates at a step: c(t) * p_l, and 0 for protected layers.
    let d = LayerDrop::new(5, RateRule::Exponential { p_max: 0.4 })
        .unwrap()
        .with_curriculum(w)
        .with_protected(&[2])
        .unwrap();
    for t in [0u64, 10, 33, 100, 200] {
        let r = d.rates(t);
        for (l, (&got, &base)) in r.iter().zip(d.base_rates()).enumerate() {
            let want = if l == 2 { 0.0 } else { w.factor(t) * base };
            assert_eq!(got.to_bits(), want.to_bits(), "step {t}, layer {l}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plans against the dropout reference

fn rule_strategy() -> impl Strategy<Value = RateRule> {
    prop_oneof![
        (0.0f64..=1.0).prop_map(|p| RateRule::Uniform { p }),
        (0.0f64..=1.0).prop_map(|p_max| RateRule::Linear { p_max }),
        (0.0f64..=1.0).prop_map(|p_max| RateRule::Exponential { p_max }),
    ]
}

fn curriculum_strategy() -> impl Strategy<Value = TimeCurriculum> {
    prop_oneof![
        Just(TimeCurriculum::Constant),
        (0u64..2000).prop_map(|steps| TimeCurriculum::LinearWarmup { steps }),
        (0u64..2000).prop_map(|steps| TimeCurriculum::Exponential { steps }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(128)))]

    #[test]
    fn plans_match_reference_keep(
        layers in 1usize..40,
        batch in 1usize..20,
        rule in rule_strategy(),
        curriculum in curriculum_strategy(),
        protected in prop::collection::vec(0usize..40, 0..3),
        seed in any::<u64>(),
        step in prop_oneof![0u64..3000, any::<u64>()],
    ) {
        let protected: Vec<usize> = protected.into_iter().filter(|&l| l < layers).collect();
        let d = LayerDrop::new(layers, rule)
            .unwrap()
            .with_curriculum(curriculum)
            .with_protected(&protected)
            .unwrap();
        let state = PhiloxState::new(seed, step);
        let rates = d.rates(step);
        let plan = d.plan(seed, step);
        let sp = d.sample_plan(seed, step, batch).unwrap();
        prop_assert_eq!(plan.state(), state);
        prop_assert_eq!(sp.state(), state);
        prop_assert_eq!(plan.rates(), &rates[..]);
        prop_assert_eq!(sp.rates(), &rates[..]);
        prop_assert_eq!(sp.keep().len(), layers * batch);
        for (l, &p) in rates.iter().enumerate() {
            let th = drop_threshold(p).unwrap();
            let scale = keep_scale(p).unwrap();
            prop_assert_eq!(plan.thresholds()[l], th);
            prop_assert_eq!(sp.thresholds()[l], th);
            prop_assert_eq!(plan.scales()[l].to_bits(), scale.to_bits());
            prop_assert_eq!(sp.scales()[l].to_bits(), scale.to_bits());
            prop_assert_eq!(plan.keep()[l], keep(state, l as u64, th), "layer {}", l);
            if protected.contains(&l) {
                prop_assert!(plan.keep()[l]);
                prop_assert_eq!(p, 0.0);
            }
            for b in 0..batch {
                let e = (l * batch + b) as u64;
                prop_assert_eq!(sp.keep()[l * batch + b], keep(state, e, th), "l {} b {}", l, b);
            }
        }
        // B = 1 is the batch-wide plan.
        let one = d.sample_plan(seed, step, 1).unwrap();
        prop_assert_eq!(one.keep(), plan.keep());
        // Determinism.
        prop_assert_eq!(&d.plan(seed, step), &plan);
        prop_assert_eq!(&d.sample_plan(seed, step, batch).unwrap(), &sp);
    }

    #[test]
    fn per_sample_views_consistent(
        layers in 1usize..16,
        batch in 1usize..40,
        p in 0.0f64..=1.0,
        seed in any::<u64>(),
        step in any::<u64>(),
    ) {
        let d = LayerDrop::new(layers, RateRule::Linear { p_max: p }).unwrap();
        let sp = d.sample_plan(seed, step, batch).unwrap();
        let kept = sp.kept_samples();
        let counts = sp.kept_counts();
        prop_assert_eq!(kept.len(), layers);
        prop_assert!(sp.layer_keep(layers).is_none());
        for l in 0..layers {
            let row = sp.layer_keep(l).unwrap();
            prop_assert_eq!(row, &sp.keep()[l * batch..(l + 1) * batch]);
            prop_assert!(kept[l].windows(2).all(|w| w[0] < w[1]), "not ascending");
            let want: Vec<usize> = (0..batch).filter(|&b| row[b]).collect();
            prop_assert_eq!(&kept[l], &want);
            prop_assert_eq!(counts[l], want.len());
        }
        let plan = d.plan(seed, step);
        let kl = plan.kept_layers();
        let dl = plan.dropped_layers();
        prop_assert_eq!(kl.len() + dl.len(), layers);
        prop_assert!(kl.iter().all(|&l| plan.keep()[l]) && dl.iter().all(|&l| !plan.keep()[l]));
        prop_assert!(kl.windows(2).all(|w| w[0] < w[1]));
        prop_assert_eq!(plan.remap().kept().to_vec(), kl);
    }
}

#[test]
fn p_zero_keeps_all_and_p_one_drops_all_but_protected() {
    let keep_all = LayerDrop::new(12, RateRule::Uniform { p: 0.0 }).unwrap();
    let drop_all = LayerDrop::new(12, RateRule::Uniform { p: 1.0 })
        .unwrap()
        .with_protected(&[3, 3, 0])
        .unwrap()
        .with_last_protected();
    for step in 0..200u64 {
        let a = keep_all.plan(9, step);
        assert!(a.keep().iter().all(|&k| k));
        assert!(a.scales().iter().all(|&s| s == 1.0));
        let b = drop_all.plan(9, step);
        assert_eq!(b.kept_layers(), vec![0, 3, 11], "step {step}");
        for l in 0..12 {
            let want = if [0, 3, 11].contains(&l) { 1.0 } else { 0.0 };
            assert_eq!(b.scales()[l], want);
        }
        let s = drop_all.sample_plan(9, step, 5).unwrap();
        assert_eq!(s.kept_counts(), vec![5, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert!(keep_all
            .sample_plan(9, step, 5)
            .unwrap()
            .keep()
            .iter()
            .all(|&k| k));
    }
    // Curriculum at its start: LayerSkip's exponential c(0) = 0 keeps everything.
    let d = LayerDrop::new(8, RateRule::Uniform { p: 1.0 })
        .unwrap()
        .with_curriculum(TimeCurriculum::Exponential { steps: 100 });
    assert!(d.plan(1, 0).keep().iter().all(|&k| k));
    assert!(d.plan(1, 100).keep().iter().all(|&k| !k));
}

#[test]
fn drop_frequencies_match_rates() {
    let steps = 3000u64;
    let d = LayerDrop::new(8, RateRule::Exponential { p_max: 0.6 })
        .unwrap()
        .with_last_protected();
    let rates = d.rates(0);
    let mut dropped = [0u64; 8];
    for step in 0..steps {
        for (l, &k) in d.plan(0x5eed, step).keep().iter().enumerate() {
            dropped[l] += u64::from(!k);
        }
    }
    for l in 0..8 {
        assert_binomial(dropped[l], steps, rates[l], &format!("batch-wide layer {l}"));
    }
    assert_eq!(dropped[7], 0);

    let d = LayerDrop::new(6, RateRule::Linear { p_max: 0.5 }).unwrap();
    let rates = d.rates(0);
    let (steps, batch) = (400u64, 16usize);
    let mut dropped = [0u64; 6];
    for step in 0..steps {
        let sp = d.sample_plan(77, step, batch).unwrap();
        for (l, c) in sp.kept_counts().iter().enumerate() {
            dropped[l] += (batch - c) as u64;
        }
    }
    for l in 0..6 {
        assert_binomial(
            dropped[l],
            steps * batch as u64,
            rates[l],
            &format!("per-sample layer {l}"),
        );
    }
}

#[test]
fn different_steps_and_seeds_differ() {
    let d = LayerDrop::new(64, RateRule::Uniform { p: 0.5 }).unwrap();
    let (mut diff_step, mut diff_seed, mut n) = (0u64, 0u64, 0u64);
    for step in 0..300u64 {
        let a = d.plan(1, step);
        let b = d.plan(1, step + 1);
        let c = d.plan(2, step);
        for l in 0..64 {
            diff_step += u64::from(a.keep()[l] != b.keep()[l]);
            diff_seed += u64::from(a.keep()[l] != c.keep()[l]);
        }
        n += 64;
    }
    // Independent plans disagree on a layer with probability 2 p (1 - p) = 1/2.
    assert_binomial(diff_step, n, 0.5, "step t vs t + 1");
    assert_binomial(diff_seed, n, 0.5, "seed 1 vs 2");
}

// ---------------------------------------------------------------------------------------------
// LayerSkip early exit

#[test]
fn early_exit_weights_known_values() {
    // e = [0, 1, 3, 3 + 3] with e_scale = 1, L = 4.
    let ee = EarlyExit::new(4, ExitCurriculum::All, 1.0).unwrap();
    assert_eq!(
        (0..4).map(|l| ee.exit_scale(l)).collect::<Vec<_>>(),
        vec![0.0, 1.0, 3.0, 6.0]
    );
    assert_eq!(ee.plan(0).weights(), &[0.0, 0.1, 0.3, 0.6]);
    // e_scale = 0.5: e = [0, 0.5, 1.5, 3 + 1.5].
    let ee = EarlyExit::new(4, ExitCurriculum::All, 0.5).unwrap();
    assert_eq!(ee.plan(3).weights(), &[0.0, 0.5 / 6.5, 1.5 / 6.5, 4.5 / 6.5]);
    // e_scale = 0: only the last exit weighs.
    let ee = EarlyExit::new(5, ExitCurriculum::All, 0.0).unwrap();
    assert_eq!(ee.plan(0).weights(), &[0.0, 0.0, 0.0, 0.0, 1.0]);
    assert_eq!(ee.plan(0).enabled_exits(), vec![0, 1, 2, 3, 4]);
    // One layer.
    let ee = EarlyExit::new(1, ExitCurriculum::Rotational { period: 3 }, 2.0).unwrap();
    for t in 0..5 {
        assert_eq!(ee.plan(t).weights(), &[1.0]);
        assert_eq!(ee.plan(t).enabled(), &[true]);
    }
}

#[test]
fn rotational_curriculum_known_values() {
    let ee = EarlyExit::new(7, ExitCurriculum::Rotational { period: 3 }, 1.0).unwrap();
    assert_eq!(ee.plan(0).enabled_exits(), vec![0, 3, 6]);
    assert_eq!(ee.plan(1).enabled_exits(), vec![1, 4, 6]);
    assert_eq!(ee.plan(2).enabled_exits(), vec![2, 5, 6]);
    assert_eq!(ee.plan(3).enabled_exits(), vec![0, 3, 6]);
    // Step 1: e(1) = 1, e(4) = 10, e(6) = 6 + 15 = 21.
    let w = ee.plan(1);
    let w = w.weights();
    assert_eq!(w[1], 1.0 / 32.0);
    assert_eq!(w[4], 10.0 / 32.0);
    assert_eq!(w[6], 21.0 / 32.0);
    let all = EarlyExit::new(5, ExitCurriculum::Rotational { period: 1 }, 1.0).unwrap();
    assert_eq!(all.plan(7).enabled_exits(), vec![0, 1, 2, 3, 4]);
    assert!(!ee.enabled(0, 7), "out-of-range exit");
}

#[test]
fn gradual_curriculum_known_values() {
    // L = 4, T = 100: exit l from step ceil((4 - l) * 100 / 4).
    let ee = EarlyExit::new(4, ExitCurriculum::Gradual { steps: 100 }, 1.0).unwrap();
    assert_eq!(ee.plan(0).enabled_exits(), vec![3]);
    assert_eq!(ee.plan(49).enabled_exits(), vec![3]);
    assert_eq!(ee.plan(50).enabled_exits(), vec![2, 3]);
    assert_eq!(ee.plan(74).enabled_exits(), vec![2, 3]);
    assert_eq!(ee.plan(75).enabled_exits(), vec![1, 2, 3]);
    assert_eq!(ee.plan(99).enabled_exits(), vec![1, 2, 3]);
    assert_eq!(ee.plan(100).enabled_exits(), vec![0, 1, 2, 3]);
    assert_eq!(ee.plan(u64::MAX).enabled_exits(), vec![0, 1, 2, 3]);
    // Non-divisible: L = 3, T = 10: exit 1 from ceil(20 / 3) = 7.
    let ee = EarlyExit::new(3, ExitCurriculum::Gradual { steps: 10 }, 1.0).unwrap();
    assert_eq!(ee.plan(6).enabled_exits(), vec![2]);
    assert_eq!(ee.plan(7).enabled_exits(), vec![1, 2]);
    let now = EarlyExit::new(3, ExitCurriculum::Gradual { steps: 0 }, 1.0).unwrap();
    assert_eq!(now.plan(0).enabled_exits(), vec![0, 1, 2]);
}

fn exit_curriculum_strategy() -> impl Strategy<Value = ExitCurriculum> {
    prop_oneof![
        Just(ExitCurriculum::All),
        (1u64..20).prop_map(|period| ExitCurriculum::Rotational { period }),
        (0u64..5000).prop_map(|steps| ExitCurriculum::Gradual { steps }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    #[test]
    fn early_exit_plan_invariants(
        layers in 1usize..100,
        curriculum in exit_curriculum_strategy(),
        e_scale in prop_oneof![Just(0.0), 0.0f64..10.0],
        step in prop_oneof![0u64..6000, any::<u64>()],
    ) {
        let ee = EarlyExit::new(layers, curriculum, e_scale).unwrap();
        let plan = ee.plan(step);
        let (en, w) = (plan.enabled(), plan.weights());
        prop_assert_eq!(en.len(), layers);
        prop_assert_eq!(w.len(), layers);
        prop_assert!(en[layers - 1], "last exit disabled");
        prop_assert!(w[layers - 1] > 0.0);
        let sum: f64 = w.iter().sum();
        prop_assert!((sum - 1.0).abs() <= 1e-12, "sum {}", sum);
        let denom: f64 = (0..layers).filter(|&l| en[l]).map(|l| ee.exit_scale(l)).sum();
        for l in 0..layers {
            prop_assert!(w[l] >= 0.0);
            prop_assert_eq!(en[l], ee.enabled(step, l));
            if !en[l] {
                prop_assert_eq!(w[l], 0.0);
            } else if layers > 1 {
                prop_assert_eq!(w[l].to_bits(), (ee.exit_scale(l) / denom).to_bits());
            }
        }
        match curriculum {
            ExitCurriculum::All => prop_assert!(en.iter().all(|&e| e)),
            ExitCurriculum::Rotational { period } => {
                prop_assert_eq!(&ee.plan(step.wrapping_add(period)), &plan);
                for (l, &e) in en.iter().enumerate().take(layers - 1) {
                    prop_assert_eq!(e, l as u64 % period == step % period);
                }
            }
            ExitCurriculum::Gradual { .. } => {
                // Monotone in t, and the enabled exits are a suffix.
                let next = ee.plan(step.saturating_add(1));
                for l in 0..layers {
                    prop_assert!(!en[l] || next.enabled()[l], "exit {} switched off", l);
                    if l > 0 {
                        prop_assert!(!en[l - 1] || en[l], "not a suffix at {}", l);
                    }
                }
            }
        }
    }
}

#[test]
fn gradual_monotone_over_whole_ramp() {
    let ee = EarlyExit::new(12, ExitCurriculum::Gradual { steps: 600 }, 1.0).unwrap();
    let mut prev = 0;
    for t in 0..=600 {
        let n = ee.plan(t).enabled_exits().len();
        assert!(n >= prev, "step {t}");
        prev = n;
    }
    assert_eq!(prev, 12);
}

// ---------------------------------------------------------------------------------------------
// Pruning remaps

#[test]
fn keep_every_other_known_values() {
    let k = |l, p, last| LayerRemap::keep_every_other(l, p, last).unwrap().kept().to_vec();
    assert_eq!(k(6, Parity::Even, false), vec![0, 2, 4]);
    assert_eq!(k(6, Parity::Even, true), vec![0, 2, 4, 5]);
    assert_eq!(k(6, Parity::Odd, false), vec![1, 3, 5]);
    assert_eq!(k(6, Parity::Odd, true), vec![1, 3, 5]);
    assert_eq!(k(5, Parity::Even, true), vec![0, 2, 4]);
    assert_eq!(k(5, Parity::Odd, true), vec![1, 3, 4]);
    assert_eq!(k(1, Parity::Even, false), vec![0]);
    assert_eq!(k(1, Parity::Odd, false), Vec::<usize>::new());
    assert_eq!(k(1, Parity::Odd, true), vec![0]);
    let r = LayerRemap::keep_every_other(6, Parity::Even, true).unwrap();
    assert_eq!(
        r.old_to_new(),
        vec![Some(0), None, Some(1), None, Some(2), Some(3)]
    );
    assert_eq!(r.new_index(5), Some(3));
    assert_eq!(r.new_index(6), None);
    assert_eq!(r.old_index(3), Some(5));
    assert_eq!(r.old_index(4), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    #[test]
    fn remaps_are_inverse_bijections(
        layers in 1usize..200,
        mask in prop::collection::vec(any::<bool>(), 200),
        parity in prop_oneof![Just(Parity::Even), Just(Parity::Odd)],
        keep_last in any::<bool>(),
    ) {
        let wanted: Vec<usize> = (0..layers).filter(|&l| mask[l]).collect();
        let every = LayerRemap::keep_every_other(layers, parity, keep_last).unwrap();
        let given = LayerRemap::from_kept(layers, &wanted).unwrap();
        prop_assert_eq!(given.kept(), &wanted[..]);
        for r in [every, given] {
            prop_assert_eq!(r.layers(), layers);
            let o2n = r.old_to_new();
            prop_assert_eq!(o2n.len(), layers);
            for new in 0..r.kept_len() {
                let old = r.old_index(new).unwrap();
                prop_assert_eq!(r.new_index(old), Some(new));
                prop_assert_eq!(o2n[old], Some(new));
            }
            for (old, &new) in o2n.iter().enumerate() {
                prop_assert_eq!(new, r.new_index(old));
                if let Some(new) = new {
                    prop_assert_eq!(r.old_index(new), Some(old));
                }
            }
            prop_assert_eq!(o2n.iter().flatten().count(), r.kept_len());
            prop_assert!(r.old_index(r.kept_len()).is_none());
            prop_assert!(r.kept().windows(2).all(|w| w[0] < w[1]));
        }
        let every = LayerRemap::keep_every_other(layers, parity, keep_last).unwrap();
        let first = if parity == Parity::Even { 0 } else { 1 };
        for l in 0..layers {
            let want = l % 2 == first || (keep_last && l == layers - 1);
            prop_assert_eq!(every.new_index(l).is_some(), want, "layer {}", l);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention drop

#[test]
fn attention_drop_known_values_and_ties() {
    // Layers 1, 3 and 5 tie at 0.9 (the highest); dropping 2 takes 5 then 3.
    let sims = [0.5, 0.9, 0.2, 0.9, 0.7, 0.9, -0.0, 0.0];
    let plan = AttentionDropPlan::new(&sims, 2).unwrap();
    assert_eq!(plan.dropped(), &[3, 5]);
    assert_eq!(plan.kept(), &[0, 1, 2, 4, 6, 7]);
    assert_eq!(plan.drop_order(), &[5, 3, 1, 4, 0, 2, 7, 6]);
    assert_eq!(
        plan.kv_slots(),
        vec![Some(0), Some(1), Some(2), None, Some(3), None, Some(4), Some(5)]
    );
    assert_eq!(plan.kv_slot_count(), 6);
    assert_eq!(plan.kv_slot(4), Some(3));
    assert_eq!(plan.kv_slot(8), None);
    assert_eq!(plan.importance()[2], 0.8);
    // -0.0 and 0.0 tie: the higher index (7) goes first.
    let plan = AttentionDropPlan::new(&sims, 7).unwrap();
    assert_eq!(plan.kept(), &[6]);
    let none = AttentionDropPlan::new(&sims, 0).unwrap();
    assert_eq!(none.kept(), &[0, 1, 2, 3, 4, 5, 6, 7]);
    let all = AttentionDropPlan::new(&sims, 8).unwrap();
    assert!(all.kept().is_empty() && all.kv_slots().iter().all(|s| s.is_none()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    #[test]
    fn attention_drop_drops_the_n_highest(
        sims in prop::collection::vec(prop_oneof![-1.0f64..=1.0, (0i32..4).prop_map(|k| k as f64 / 4.0)], 1..64),
        n in any::<prop::sample::Index>(),
    ) {
        let n = n.index(sims.len() + 1);
        let plan = AttentionDropPlan::new(&sims, n).unwrap();
        prop_assert_eq!(plan.dropped().len(), n);
        prop_assert_eq!(plan.kept().len(), sims.len() - n);
        prop_assert_eq!(plan.n_drop(), n);
        for &d in plan.dropped() {
            for &k in plan.kept() {
                // Dropped ones are more similar, or tie and have a higher index.
                prop_assert!(sims[d] > sims[k] || (sims[d] == sims[k] && d > k), "{} vs {}", d, k);
            }
        }
        for (slot, &l) in plan.kept().iter().enumerate() {
            prop_assert_eq!(plan.kv_slot(l), Some(slot));
        }
        for &l in plan.dropped() {
            prop_assert_eq!(plan.kv_slot(l), None);
        }
        prop_assert!(plan.kept().windows(2).all(|w| w[0] < w[1]));
        for (i, &imp) in plan.importance().iter().enumerate() {
            prop_assert_eq!(imp.to_bits(), (1.0 - sims[i]).to_bits());
        }
        let mut order = plan.drop_order().to_vec();
        let mut dropped = order[..n].to_vec();
        dropped.sort_unstable();
        prop_assert_eq!(&dropped[..], plan.dropped());
        order.sort_unstable();
        prop_assert_eq!(order, (0..sims.len()).collect::<Vec<_>>());
    }
}

#[test]
fn similarity_accumulator() {
    let mut acc = SimilarityAccumulator::new(3).unwrap();
    assert_eq!(acc.means(), None);
    acc.add_batch(&[9.0, 4.0, 1.0], &[10, 8, 4]).unwrap();
    assert_eq!(acc.means(), Some(vec![0.9, 0.5, 0.25]));
    acc.add(1, 2.0, 2).unwrap();
    acc.add(2, 3.0, 4).unwrap();
    assert_eq!(acc.tokens(), &[10, 10, 8]);
    assert_eq!(acc.sums(), &[9.0, 6.0, 4.0]);
    assert_eq!(acc.means(), Some(vec![0.9, 0.6, 0.5]));
    assert_eq!(acc.mean(3), None);
    let plan = AttentionDropPlan::from_accumulator(&acc, 1).unwrap();
    assert_eq!(plan.dropped(), &[0]);
    assert_eq!(plan.kv_slots(), vec![None, Some(0), Some(1)]);

    let mut partial = SimilarityAccumulator::new(2).unwrap();
    partial.add(0, 1.0, 1).unwrap();
    assert_eq!(partial.mean(0), Some(1.0));
    assert_eq!(partial.mean(1), None);
    assert_eq!(
        invalid_name(AttentionDropPlan::from_accumulator(&partial, 0)),
        "accumulator"
    );

    // Errors leave the accumulator unchanged.
    let before = acc.clone();
    assert_eq!(invalid_name(acc.add(3, 1.0, 1)), "layer");
    assert_eq!(invalid_name(acc.add(0, f64::NAN, 1)), "similarity_sum");
    assert_eq!(invalid_name(acc.add(0, f64::INFINITY, 1)), "similarity_sum");
    assert_eq!(invalid_name(acc.add(0, 1.0, 0)), "tokens");
    assert_eq!(invalid_name(acc.add(0, 1.0, u64::MAX)), "tokens");
    assert_eq!(
        invalid_name(acc.add_batch(&[1.0, 1.0], &[1, 1, 1])),
        "similarity_sums"
    );
    assert_eq!(invalid_name(acc.add_batch(&[1.0; 3], &[1, 1])), "tokens");
    assert_eq!(
        invalid_name(acc.add_batch(&[1.0, f64::NAN, 1.0], &[1; 3])),
        "similarity_sums"
    );
    assert_eq!(invalid_name(acc.add_batch(&[1.0; 3], &[1, 0, 1])), "tokens");
    assert_eq!(
        invalid_name(acc.add_batch(&[1.0; 3], &[1, 1, u64::MAX])),
        "tokens"
    );
    assert_eq!(acc, before);
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn invalid_arguments_are_typed_errors() {
    let bad_p = [
        f64::NAN,
        -0.1,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.0 + f64::EPSILON,
    ];
    for p in bad_p {
        assert_eq!(invalid_name(LayerDrop::new(4, RateRule::Uniform { p })), "p");
        assert_eq!(
            invalid_name(LayerDrop::new(4, RateRule::Linear { p_max: p })),
            "p_max"
        );
        assert_eq!(
            invalid_name(LayerDrop::new(4, RateRule::Exponential { p_max: p })),
            "p_max"
        );
        let stages = vec![Stage { layers: 2, p: 0.1 }, Stage { layers: 2, p }];
        assert_eq!(
            invalid_name(LayerDrop::new(4, RateRule::PerStage(stages))),
            "stages"
        );
    }
    assert_eq!(
        invalid_name(LayerDrop::new(0, RateRule::Uniform { p: 0.1 })),
        "layers"
    );
    let st =
        |v: &[(usize, f64)]| RateRule::PerStage(v.iter().map(|&(layers, p)| Stage { layers, p }).collect());
    assert_eq!(invalid_name(LayerDrop::new(4, st(&[]))), "stages");
    assert_eq!(
        invalid_name(LayerDrop::new(4, st(&[(2, 0.1), (1, 0.2)]))),
        "stages"
    );
    assert_eq!(
        invalid_name(LayerDrop::new(4, st(&[(2, 0.1), (3, 0.2)]))),
        "stages"
    );
    assert_eq!(
        invalid_name(LayerDrop::new(4, st(&[(4, 0.1), (0, 0.2)]))),
        "stages"
    );
    assert_eq!(
        invalid_name(LayerDrop::new(4, st(&[(2, 0.1), (usize::MAX, 0.2)]))),
        "stages"
    );
    let d = LayerDrop::new(4, RateRule::Uniform { p: 0.5 }).unwrap();
    assert_eq!(invalid_name(d.clone().with_protected(&[1, 4])), "protected");
    assert_eq!(invalid_name(d.sample_plan(1, 2, 0)), "batch");
    assert_eq!(invalid_name(d.sample_plan(1, 2, usize::MAX)), "batch");

    assert_eq!(
        invalid_name(EarlyExit::new(0, ExitCurriculum::All, 1.0)),
        "layers"
    );
    assert_eq!(
        invalid_name(EarlyExit::new(4, ExitCurriculum::Rotational { period: 0 }, 1.0)),
        "period"
    );
    for e in [f64::NAN, -1.0, f64::INFINITY] {
        assert_eq!(invalid_name(EarlyExit::new(4, ExitCurriculum::All, e)), "e_scale");
    }

    assert_eq!(
        invalid_name(LayerRemap::keep_every_other(0, Parity::Even, true)),
        "layers"
    );
    assert_eq!(invalid_name(LayerRemap::from_kept(0, &[])), "layers");
    assert_eq!(invalid_name(LayerRemap::from_kept(4, &[0, 4])), "kept");
    assert_eq!(invalid_name(LayerRemap::from_kept(4, &[2, 1])), "kept");
    assert_eq!(invalid_name(LayerRemap::from_kept(4, &[1, 1])), "kept");
    assert!(LayerRemap::from_kept(4, &[]).unwrap().kept().is_empty());

    assert_eq!(invalid_name(AttentionDropPlan::new(&[], 0)), "similarities");
    assert_eq!(
        invalid_name(AttentionDropPlan::new(&[0.1, f64::NAN], 0)),
        "similarities"
    );
    assert_eq!(
        invalid_name(AttentionDropPlan::new(&[0.1, f64::NEG_INFINITY], 0)),
        "similarities"
    );
    assert_eq!(invalid_name(AttentionDropPlan::new(&[0.1, 0.2], 3)), "n_drop");
    assert_eq!(invalid_name(SimilarityAccumulator::new(0)), "layers");
}
