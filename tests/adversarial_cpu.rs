//! Adversarial arguments to the public API that needs no GPU (size helpers, the CPU reference,
//! the host plans): sizes whose products overflow `usize`, sizes no allocator can serve, huge
//! offsets. Every call must return a typed `InvalidArgument` (or its documented value) and never
//! panic or abort. Tests run in debug builds, so an unchecked overflow panics here.

mod common;

use common::invalid_name;
use dropfuse::drop_block::{stats_len, DropBlock};
use dropfuse::layer_plan::{EarlyExit, ExitCurriculum, LayerDrop, LayerRemap, Parity, RateRule};
use dropfuse::layer_plan::{SimilarityAccumulator, Stage};
use dropfuse::multi_sample::{masks_len, MultiSampleHead, WeightedCrossEntropy};
use dropfuse::reference::multi_sample::HeadConfig;
use dropfuse::reference::{dropout, mc_dropout, multi_sample, structured};
use dropfuse::skip::stochastic_depth_workspace_len;
use dropfuse::{DType, PhiloxState};

const S: PhiloxState = PhiloxState::new(1, 2);

// ---------------------------------------------------------------------------------------------
// Size helpers of the GPU API (pure functions)

#[test]
fn drop_block_stats_len_of_a_huge_batch_is_an_error() {
    // N + 1 overflowed usize (debug: a panic; release: 0, a length a 0-word buffer would pass).
    assert_eq!(invalid_name(stats_len(&[usize::MAX, 1, 1, 1])), "shape");
    assert_eq!(invalid_name(stats_len(&[usize::MAX, 1, 1, 1, 1])), "shape");
    assert_eq!(stats_len(&[usize::MAX - 1, 1, 1, 1]).unwrap(), usize::MAX);
}

#[test]
fn multi_sample_size_helpers_saturate() {
    // No buffer has usize::MAX elements, so a saturated length fails every length check.
    assert_eq!(masks_len(usize::MAX, 64), usize::MAX);
    assert_eq!(masks_len(64, usize::MAX), usize::MAX);
    assert_eq!(masks_len(3, usize::MAX), 3 << 59);
    assert_eq!(masks_len(2, 64), 4);
    assert_eq!(WeightedCrossEntropy::scratch_len(usize::MAX, 2), usize::MAX);
    assert_eq!(WeightedCrossEntropy::scratch_len(2, usize::MAX), usize::MAX);
    assert_eq!(WeightedCrossEntropy::scratch_len(3, 5), 2 + 8);
    // samples * min(b, 2^15) overflowed usize.
    assert_eq!(MultiSampleHead::logits_grad_scale(usize::MAX, 2), 2f32.powi(64));
    assert_eq!(
        MultiSampleHead::logits_grad_scale(usize::MAX, 1 << 20),
        2f32.powi(78)
    );
    assert_eq!(MultiSampleHead::logits_grad_scale(0, 0), 1.0);
    assert_eq!(MultiSampleHead::logits_grad_scale(8, 100), 512.0);
}

#[test]
fn head_gemm_plan_of_a_huge_batch_is_a_gemm_error() {
    // samples * b overflowed usize; the plan's GEMMs must then be rejected, not wrapped.
    let head = MultiSampleHead::new(8, 0.5).unwrap();
    let plan = head.gemm_plan(usize::MAX, 4, 3, DType::F32, DType::F32, DType::F32, 1.0);
    assert_eq!(invalid_name(plan.logits.gemm_ex_args()), "gemm");
    assert_eq!(invalid_name(plan.dh.gemm_ex_args()), "gemm");
    assert_eq!(invalid_name(plan.dw.gemm_ex_args()), "gemm");
}

#[test]
fn stochastic_depth_workspace_len_overflow_is_an_error() {
    // batch * (row_len / bias_len) overflowed.
    assert_eq!(
        invalid_name(stochastic_depth_workspace_len(usize::MAX, 2, 1)),
        "batch"
    );
    // ceil(terms / 256) * bias_len overflowed.
    assert_eq!(
        invalid_name(stochastic_depth_workspace_len(1 << 40, 1 << 40, 1 << 40)),
        "batch"
    );
    assert_eq!(stochastic_depth_workspace_len(3, 512, 2).unwrap(), 3 * 2);
    assert_eq!(stochastic_depth_workspace_len(0, 4, 4).unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// CPU reference: sizes that cannot be allocated are errors, not a capacity-overflow panic or an
// allocation-failure abort

#[test]
fn reference_dropout_mask_of_an_absurd_length_is_an_error() {
    assert_eq!(invalid_name(dropout::mask(0.5, S, 0, usize::MAX)), "n");
}

#[test]
fn reference_structured_absurd_layouts_are_errors() {
    // One decision for usize::MAX elements: the expanded mask cannot be allocated.
    let all_shared = structured::Layout::shared_axes(&[usize::MAX], &[0]).unwrap();
    assert_eq!(invalid_name(structured::element_mask(&all_shared, &[1])), "shape");
    // usize::MAX decisions: the decision mask cannot be allocated.
    let plain = structured::Layout::shared_axes(&[usize::MAX], &[]).unwrap();
    assert_eq!(invalid_name(structured::mask(&plain, 0.5, S, 0)), "shape");
}

#[test]
fn reference_drop_block_absurd_shapes_are_errors() {
    let cfg = DropBlock::new(0.1, 1).unwrap();
    // 2^63 elements: more bytes than a Vec may hold (capacity overflow).
    let huge = [1, 1, 1usize << 32, 1 << 31];
    assert_eq!(
        invalid_name(dropfuse::reference::drop_block::seeds(&cfg, &huge, S)),
        "shape"
    );
    assert_eq!(
        invalid_name(dropfuse::reference::drop_block::keep(&cfg, &huge, S)),
        "shape"
    );
    assert_eq!(
        invalid_name(dropfuse::reference::drop_block::mask(&cfg, &huge, S)),
        "shape"
    );
    // 2^62 elements: representable, but no allocator serves it (an abort before).
    let big = [1, 1, 1usize << 31, 1 << 31];
    assert_eq!(
        invalid_name(dropfuse::reference::drop_block::keep(&cfg, &big, S)),
        "shape"
    );
}

#[test]
fn reference_drop_block_plane_dropped_validates() {
    use dropfuse::reference::drop_block::plane_dropped;
    let cfg = DropBlock::new(0.1, 3).unwrap();
    // Products of the dims overflowed (a debug panic).
    assert_eq!(
        invalid_name(plane_dropped(&cfg, &[usize::MAX, usize::MAX], 0, S)),
        "dims"
    );
    assert_eq!(invalid_name(plane_dropped(&cfg, &[0, 4], 0, S)), "dims");
    // q * valid overflowed u64.
    assert_eq!(invalid_name(plane_dropped(&cfg, &[8, 8], u64::MAX, S)), "q");
    // The last plane whose seed indices fit u64: valid = 36 seeds per plane.
    let q = u64::MAX / 36 - 1;
    assert_eq!(plane_dropped(&cfg, &[8, 8], q, S).unwrap().len(), 64);
}

#[test]
fn reference_mc_dropout_absurd_sizes_are_errors() {
    let x = [1.0f32, 2.0];
    // R * n = usize::MAX - 1 fits usize, but not a Vec (capacity overflow before).
    assert_eq!(
        invalid_name(mc_dropout::replicated_forward(&x, usize::MAX / 2, 0.5, S, 0)),
        "replicas"
    );
    assert_eq!(
        invalid_name(mc_dropout::replicated_mask(1, 1 << 62, 0.5, S, 0)),
        "replicas"
    );
    assert_eq!(
        invalid_name(mc_dropout::replicated_mask(usize::MAX, 1, 0.5, S, 0)),
        "replicas"
    );
    // B * C f64 that no Vec can hold.
    assert_eq!(invalid_name(mc_dropout::McSummary::new(1 << 62, 1)), "classes");
    // A stack whose length cannot match is rejected as `probs` before B * C is allocated.
    assert_eq!(
        invalid_name(mc_dropout::summarize(&[0.5; 4], 1, 1 << 40, 1)),
        "probs"
    );
}

#[test]
fn reference_multi_sample_absurd_k_is_an_error() {
    let h = [1.0f32; 4];
    assert_eq!(
        invalid_name(multi_sample::masked_copies(&h, usize::MAX, 0.5, S)),
        "k"
    );
    let w = [0.5f32; 4];
    let cfg = HeadConfig::new(usize::MAX, 0.5);
    assert_eq!(
        invalid_name(multi_sample::head(&h, 2, &w, 2, None, &[0, 1], &cfg, S)),
        "k"
    );
}

// ---------------------------------------------------------------------------------------------
// Layer plans: layer counts and batches whose per-layer vectors cannot be allocated

#[test]
fn layer_plans_with_absurd_layer_counts_are_errors() {
    for rule in [
        RateRule::Uniform { p: 0.1 },
        RateRule::Linear { p_max: 0.1 },
        RateRule::Exponential { p_max: 0.1 },
        RateRule::PerStage(vec![Stage {
            layers: usize::MAX,
            p: 0.1,
        }]),
    ] {
        assert_eq!(
            invalid_name(LayerDrop::new(usize::MAX, rule.clone())),
            "layers",
            "{rule:?}"
        );
    }
    assert_eq!(invalid_name(SimilarityAccumulator::new(usize::MAX)), "layers");
    assert_eq!(
        invalid_name(LayerRemap::keep_every_other(usize::MAX, Parity::Even, true)),
        "layers"
    );
    // old_to_new() allocates one entry per layer: L must fit a Vec.
    assert_eq!(invalid_name(LayerRemap::from_kept(usize::MAX, &[])), "layers");
    // plan() allocates one weight per exit.
    assert_eq!(
        invalid_name(EarlyExit::new(usize::MAX, ExitCurriculum::All, 1.0)),
        "layers"
    );
    // Large but sane counts still work.
    assert_eq!(LayerRemap::from_kept(1 << 40, &[3, 7]).unwrap().kept_len(), 2);
    let ee = EarlyExit::new(1 << 40, ExitCurriculum::All, 1.0).unwrap();
    assert!(ee.enabled(0, (1 << 40) - 1));
}

#[test]
fn sample_plan_of_an_absurd_batch_is_an_error() {
    let d = LayerDrop::new(1, RateRule::Uniform { p: 0.5 }).unwrap();
    // layers * batch = usize::MAX fits usize, but not a Vec<bool>.
    assert_eq!(invalid_name(d.sample_plan(1, 2, usize::MAX)), "batch");
    assert_eq!(invalid_name(d.sample_plan(1, 2, 1 << 62)), "batch");
}

// ---------------------------------------------------------------------------------------------
// Schedules

#[test]
fn unvalidated_linear_schedule_never_panics() {
    use dropfuse::drop_block::linear_schedule;
    // f64::clamp panicked on NaN bounds (both ends NaN).
    assert!(linear_schedule(f64::NAN, f64::NAN, 10, 3).is_nan());
    assert!(linear_schedule(f64::NAN, 0.5, 10, 3).is_nan());
    assert!(linear_schedule(f64::NEG_INFINITY, f64::INFINITY, 10, 3).is_nan());
    assert_eq!(linear_schedule(f64::NAN, 0.5, 10, 10), 0.5);
    assert_eq!(linear_schedule(0.0, 0.5, 10, 4), 0.2);
    assert_eq!(linear_schedule(0.5, 0.0, 0, 0), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Device buffer sizes (the check every device allocation of an argument-given size runs first;
// the GPU tests call the allocating constructors themselves)

#[test]
fn device_buffer_byte_sizes_must_fit() {
    use dropfuse::device::check_device_len;
    // cudarc computes len * size_of::<T>() unchecked: (2^62 + 1) * 4 wraps to 4 bytes.
    assert_eq!(invalid_name(check_device_len::<f32>("len", (1 << 62) + 1)), "len");
    assert_eq!(
        invalid_name(check_device_len::<f32>("classes", 1 << 61)),
        "classes"
    );
    assert_eq!(
        invalid_name(check_device_len::<u64>("layers", usize::MAX)),
        "layers"
    );
    assert!(check_device_len::<f32>("len", (1 << 61) - 1).is_ok());
    assert!(check_device_len::<u8>("len", isize::MAX as usize).is_ok());
    assert!(check_device_len::<f64>("len", 0).is_ok());
}
