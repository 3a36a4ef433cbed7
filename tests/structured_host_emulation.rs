//! Runs `kernels/structured.cu` on the CPU (no GPU needed): builds
//! `tests/host_emu/structured_emu.cpp` (the real launchers and kernels on the fiber-per-thread CUDA
//! emulator of `tests/host_emu/cuda_fiber_emu.h`: warp ballots and shuffles honoured, random thread
//! and block orders, few SMs and short grids so every grid-stride loop wraps) with the host C++
//! compiler against the CUDA headers, and runs it: random layouts (channel, locked, embedding rows,
//! any shared set; collapsed or one group per axis), every dtype, thresholds, scales, decision
//! offsets (unaligned, across 2^34, near 2^64), misaligned views, in place, host and device Philox
//! states, compared bit for bit (outputs and decision masks, guards around both) with a plain model
//! of the contract; invalid arguments rejected without any launch or write; every kernel
//! instantiation run. The plain-dropout layouts go to host stand-ins of the dropout launchers
//! (kernels/dropout.cu is not emulated). Without a C++ compiler or the CUDA headers it prints a
//! SKIPPED line. `DROPFUSE_EMU_SCALE` multiplies the number of random cases.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn structured_kernels_match_the_contract_on_a_host_emulation() {
    let test = "structured_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run(test, "structured_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
