//! Runs `kernels/routing.cu` on the CPU (no GPU needed): builds `tests/host_emu/routing_emu.cpp`
//! (the real launchers and kernels on a fiber-per-thread CUDA emulator that honours barriers and
//! warp rendezvous, `tests/host_emu/cuda_fiber_emu.h`) with the host C++ compiler against the CUDA
//! headers, and runs it: random selections (top-k and global budget, every padding form, special
//! scores, capacities below the count) and row kernels (gather, gated scatter-add, both backward
//! kernels; f32 / f16 / bf16; misaligned views) compared bit for bit with loops written from the
//! contract, with guard words around every output. Without a C++ compiler or the CUDA headers
//! (found next to nvcc: `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH` or the project's `.cuda/`) it
//! prints a SKIPPED line. `DROPFUSE_EMU_SCALE` multiplies the number of random cases.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn routing_kernels_match_the_contract_on_a_host_emulation() {
    let test = "routing_kernels_match_the_contract_on_a_host_emulation";
    if let Some(out) = build::build_and_run(test, "routing_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
