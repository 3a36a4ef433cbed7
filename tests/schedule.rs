//! Drop-probability schedules: known values, the ramp's end points and range, early and late
//! dropout's switch steps, DropBlock's `linear_schedule` being the same ramp, and validation.

mod common;
use common::invalid_name;

use dropfuse::drop_block::linear_schedule;
use dropfuse::schedule::Schedule;
use dropfuse::Dropout;
use proptest::prelude::*;

#[test]
fn known_values() {
    let c = Schedule::constant(0.3).unwrap();
    assert_eq!((c.p(0), c.p(u64::MAX)), (0.3, 0.3));

    let l = Schedule::linear(0.0, 0.2, 4).unwrap();
    assert_eq!(
        [l.p(0), l.p(1), l.p(2), l.p(4), l.p(99)],
        [0.0, 0.05, 0.1, 0.2, 0.2]
    );
    assert_eq!(
        Schedule::linear(0.5, 0.1, 0).unwrap().p(0),
        0.1,
        "no steps: the end value"
    );

    let e = Schedule::early(0.1, 10).unwrap();
    assert_eq!([e.p(0), e.p(9), e.p(10), e.p(u64::MAX)], [0.1, 0.1, 0.0, 0.0]);
    assert_eq!(Schedule::early(0.1, 0).unwrap().p(0), 0.0, "no early phase");

    let d = Schedule::early_linear(0.4, 4).unwrap();
    // The ramp's formula in f64 (0.4 - 0.1 is 0.30000000000000004), then exactly 0.
    for k in 0..4u64 {
        assert_eq!(d.p(k), 0.4 + (0.0 - 0.4) * (k as f64) / 4.0, "step {k}");
    }
    assert!((d.p(1) - 0.3).abs() < 1e-15 && (d.p(3) - 0.1).abs() < 1e-15);
    assert_eq!([d.p(4), d.p(5)], [0.0, 0.0]);

    let t = Schedule::late(0.25, 3).unwrap();
    assert_eq!([t.p(0), t.p(2), t.p(3), t.p(u64::MAX)], [0.0, 0.0, 0.25, 0.25]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ramp_properties(start in 0.0f64..=1.0, end in 0.0f64..=1.0, steps in 1u64..1_000_000, step in any::<u64>()) {
        let s = Schedule::linear(start, end, steps).unwrap();
        let k = step % (steps + 1);
        let (lo, hi) = (start.min(end), start.max(end));
        prop_assert_eq!(s.p(0), start);
        prop_assert_eq!(s.p(steps).to_bits(), end.to_bits());
        prop_assert_eq!(s.p(step.max(steps)).to_bits(), end.to_bits());
        prop_assert!(s.p(k) >= lo && s.p(k) <= hi);
        if k < steps {
            let (now, next) = (s.p(k), s.p(k + 1));
            let monotone = if start <= end { now <= next } else { now >= next };
            prop_assert!(monotone, "p({}) = {} then {}", k, now, next);
        }
        // DropBlock's ramp is the same function, and every value is a valid dropout probability.
        prop_assert_eq!(linear_schedule(start, end, steps, k).to_bits(), s.p(k).to_bits());
        prop_assert!(Dropout::new(s.p(k)).is_ok());
    }

    #[test]
    fn early_and_late_switch_once(p in 0.0f64..=1.0, at in 0u64..1000, step in 0u64..2000) {
        let e = Schedule::early(p, at).unwrap().p(step);
        let l = Schedule::late(p, at).unwrap().p(step);
        prop_assert_eq!(e, if step < at { p } else { 0.0 });
        prop_assert_eq!(l, if step < at { 0.0 } else { p });
    }
}

/// The ramp is clamped to `[min(start, end), max(start, end)]`: with `steps = 2^64 - 1` the step
/// `2^64 - 2` converts to the same `f64` (2^64), so the formula is `start + fl(end - start)`, which
/// rounds past the end: `0.03 + (0.29 - 0.03)` is `0.29000000000000004` and `0.08 + (0.01 - 0.08)`
/// is `0.009999999999999995` (both computed below). The documented range holds: exactly `end`.
#[test]
fn ramp_is_clamped_where_rounding_overshoots() {
    let (steps, step) = (u64::MAX, u64::MAX - 1);
    for (start, end) in [(0.03, 0.29), (0.08, 0.01), (0.11, 0.04)] {
        let raw = start + (end - start) * (step as f64) / (steps as f64);
        let (lo, hi) = (f64::min(start, end), f64::max(start, end));
        assert!(raw < lo || raw > hi, "{start} -> {end}: the formula gives {raw}");
        let s = Schedule::linear(start, end, steps).unwrap();
        assert_eq!(s.p(step), end, "{start} -> {end} at step 2^64 - 2");
        assert_eq!(linear_schedule(start, end, steps, step), end);
    }
    let d = Schedule::early_linear(0.08, steps).unwrap();
    assert_eq!(d.p(step), 0.0);
}

#[test]
fn invalid_probabilities_are_named() {
    for bad in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
        assert_eq!(invalid_name(Schedule::constant(bad)), "p");
        assert_eq!(invalid_name(Schedule::linear(bad, 0.1, 3)), "start");
        assert_eq!(invalid_name(Schedule::linear(0.1, bad, 3)), "end");
        assert_eq!(invalid_name(Schedule::early(bad, 3)), "p");
        assert_eq!(invalid_name(Schedule::early_linear(bad, 3)), "p");
        assert_eq!(invalid_name(Schedule::late(bad, 3)), "p");
    }
}
