//! Runs `kernels/importance.cu` on the CPU (no GPU needed): builds
//! `tests/host_emu/importance_emu.cpp` (the real launcher and kernels on the fiber-per-thread CUDA
//! emulator of `tests/host_emu/cuda_fiber_emu.h`: barriers and warp shuffles honoured, random
//! thread interleavings, few SMs so that the tile and finalize loops wrap) and runs it: every
//! similarity bit for bit against a simulation of the documented f32 algorithm and within the
//! documented bound of the f64 reference, padding NaN, guards, exact counts, sums within the bound
//! and bit-identical across runs with other grids and interleavings, accumulation onto existing
//! layer values. Also the emulator's own self-test of its poisoning (`tests/host_emu/poison_emu.cpp`).
//! Without a C++ compiler or the CUDA headers it prints a SKIPPED line.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn importance_kernels_match_the_contract_on_a_host_emulation() {
    let test = "importance_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run(test, "importance_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}

/// The emulator's poisoning (`tests/host_emu/poison_emu.cpp`): static `__shared__` variables (of
/// plain and template kernels) and the dynamic shared memory hold the block's poison byte at its
/// start, uninitialised locals the `-ftrivial-auto-var-init=pattern` bytes (when the compiler has
/// the flag).
#[test]
fn emulator_poisons_uninitialised_shared_memory_and_locals() {
    let test = "emulator_poisons_uninitialised_shared_memory_and_locals";
    if let Some(out) = build::build_and_run(test, "poison_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
