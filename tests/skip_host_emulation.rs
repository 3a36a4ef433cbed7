//! Runs `kernels/skip.cu` on the CPU (no GPU needed): builds `tests/host_emu/skip_emu.cpp` (the
//! real launchers and kernels on a fiber-per-thread CUDA emulator that honours barriers and warp
//! shuffles, `tests/host_emu/cuda_fiber_emu.h`) with the host C++ compiler against the CUDA
//! headers, and runs it: the slot scan (one block of 1024 threads, warp-shuffle scans, batches up
//! to a few 10^4 samples across tile boundaries), the stochastic-depth forward and backward (every
//! keep mode, bias periods, in place, the chunked bias gradient through the workspace) and every
//! compaction operation with capacities above, at and below the count, for f32 / f16 / bf16 and
//! misaligned views, compared bit for bit with loops written from the contract; guard elements
//! around every output, and page-protected rows that the contract says are never read or written.
//! Without a C++ compiler or the CUDA headers (found next to nvcc: `NVCC`, `CUDA_HOME`/`CUDA_PATH`,
//! `PATH` or the project's `.cuda/`) it prints a SKIPPED line. `DROPFUSE_EMU_SCALE` multiplies the
//! number of random cases.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn skip_kernels_match_the_contract_on_a_host_emulation() {
    let test = "skip_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run(test, "skip_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
