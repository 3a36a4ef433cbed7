//! Runs `kernels/multi_sample.cu` and `kernels/multi_sample_head.cu` on the CPU (no GPU needed):
//! builds `tests/host_emu/multi_sample_emu.cpp` (the real launchers and kernels on the
//! fiber-per-thread CUDA emulator of `tests/host_emu/cuda_fiber_emu.h`, 2-D launches through
//! `cuda_fiber_emu_2d.h`: barriers and warp shuffles honoured, random thread interleavings, few
//! SMs so that grid-stride loops wrap) with the host C++ compiler against the CUDA headers, and
//! runs it: the K masked copies and masks, the dh reduction and the averaged logits bit for bit
//! against plain models of the contract (K up to 128, p = 0 / 1 / random, offsets wrapping at
//! 2^64, tails, misaligned views, host and device Philox state); the weighted cross-entropy's label
//! scan exactly and its loss and gradient within the documented bounds of an f64 model (ignored,
//! all-ignored and bad labels, loss only, grad_scale, determinism across grids; on confidently
//! classified rows every f32 gradient element within 1e-5 of its own magnitude); the head's bias
//! broadcast and column sums bit for bit; the launchers' argument checks. Without a C++ compiler or
//! the CUDA headers it prints a SKIPPED line. Built with UndefinedBehaviorSanitizer when the
//! compiler has it: a misaligned 16-byte vector access (a GPU fault) aborts the run.
//! `DROPFUSE_EMU_SCALE` multiplies the random cases, `DROPFUSE_EMU_SEED` reseeds them.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn multi_sample_kernels_match_the_contract_on_a_host_emulation() {
    let test = "multi_sample_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run_sanitized(test, "multi_sample_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
