//! Runs the graph-safe randomness of `kernels/dropout.cu`, `kernels/drop_block.cu` and
//! `kernels/philox_state.cu` on the CPU (no GPU needed): builds `tests/host_emu/graph_state_emu.cpp`
//! (the real launchers and kernels on the fiber-per-thread CUDA emulator of
//! `tests/host_emu/cuda_fiber_emu.h`) with the host C++ compiler against the CUDA headers, and runs
//! it. Every dropout (mask, forward with and without a mask) and DropBlock (mask, counts, output)
//! case runs with the seed and offset on the host and with them in a device state (`philox_dev`,
//! the kernels' `kDev` instantiations), and the two must agree bit for bit; both are compared with
//! the contract (Philox4x32-10 per element, the DropBlock reference; both DropBlock mask kernels,
//! warp-per-plane and tiled) as well: f32 / f16 / bf16, tails, element offsets that are not
//! multiples of 4 or cross 2^34, device offsets that wrap at 2^64, misaligned views, in place,
//! grid-stride loops that wrap. Then `dropfuse_philox_advance` (wrapping, 0 streams, bad pointers)
//! and a captured graph's advance-then-launch pattern. Built with UBSan where the compiler has it
//! (the mask kernels' 64-bit shifts: a shift by 64 aborts the run). Without a C++ compiler or the
//! CUDA headers (found next to nvcc) it prints a SKIPPED line.
//! `DROPFUSE_EMU_SCALE` multiplies the number of random cases.

mod common;

#[path = "host_emu/build.rs"]
mod build;

#[test]
fn device_philox_state_matches_the_host_state_on_a_host_emulation() {
    let test = "device_philox_state_matches_the_host_state_on_a_host_emulation";
    if let Some(out) = build::build_and_run_sanitized(test, "graph_state_emu.cpp") {
        assert!(out.contains("failures: 0"), "{out}");
    }
}
