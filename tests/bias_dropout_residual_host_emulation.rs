//! Runs `kernels/bias_dropout_residual.cu` on the CPU (no GPU needed): builds
//! `tests/host_emu/bias_dropout_residual_emu.cpp` (the real launchers and kernels on the
//! fiber-per-thread CUDA emulator of `tests/host_emu/cuda_fiber_emu.h`, the backward's 2-D grid
//! through `cuda_fiber_emu_2d.h`; few SMs so that the grid-stride loops wrap) with the host C++
//! compiler against the CUDA headers, and runs it: the forward (y and mask) and the backward (dx
//! and the chunked-order dbias) bit for bit against plain loops written from the contract, over
//! every kernel variant (vector / scalar / no bias, misaligned data, block-aligned and general
//! element offsets incl. offsets crossing 2^34 and near 2^64, host and device Philox state), p = 0,
//! 1, random, in place, stored masks with set unused bits, a NaN-poisoned workspace; the delegation
//! to dropout's launchers without dbias; the launchers' argument checks. Without a C++ compiler or
//! the CUDA headers it prints a SKIPPED line. Built with UndefinedBehaviorSanitizer when the
//! compiler has it: a misaligned 16-byte vector access (a GPU fault) aborts the run.
//! `DROPFUSE_EMU_SCALE` multiplies the random cases, `DROPFUSE_EMU_SEED` reseeds them.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn bias_dropout_residual_kernels_match_the_contract_on_a_host_emulation() {
    let test = "bias_dropout_residual_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run_sanitized(test, "bias_dropout_residual_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
