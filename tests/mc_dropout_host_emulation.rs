//! Runs `kernels/mc_dropout.cu` on the CPU (no GPU needed): builds
//! `tests/host_emu/mc_dropout_emu.cpp` (the real launchers and kernels on the fiber-per-thread CUDA
//! emulator of `tests/host_emu/cuda_fiber_emu.h`: barriers, shuffles and ballots honoured, random
//! thread and block orders, few SMs, short grids and at most 3 blocks for the per-row summary
//! kernels, so every loop wraps) and runs it: replicas bit for bit (outputs and masks, every dtype,
//! tails, element offsets, misaligned views, host and device Philox states with wrapping replica
//! streams) against a plain model of the contract; summaries after every push bit for bit against
//! an f32 model of the documented order and, finished, within `f32_tolerance` of an f64 model of the
//! reference; exact counters for accepted and rejected pushes (a rejected push changes no state
//! bit); invalid arguments rejected without any launch or write. Without a C++ compiler or the CUDA
//! headers it prints a SKIPPED line. `DROPFUSE_EMU_SCALE` multiplies the number of random cases.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn mc_dropout_kernels_match_the_contract_on_a_host_emulation() {
    let test = "mc_dropout_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run(test, "mc_dropout_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
