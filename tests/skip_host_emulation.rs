//! Runs the thread bodies of `kernels/skip.cu` on the CPU (no GPU needed): builds
//! `tests/host_emu/skip_emu.cu` with nvcc and runs it. The program emulates every thread of
//! grids of several sizes over random shapes, alignments, bias periods, keep patterns and
//! capacities, and compares the outputs bit for bit with plain loops written from the contract.
//! Without nvcc (`NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH` or the project's `.cuda/`) it prints a
//! SKIPPED line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(root.join(".cuda/site/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

#[test]
fn skip_kernel_thread_bodies_match_the_contract_on_the_host() {
    let test = "skip_kernel_thread_bodies_match_the_contract_on_the_host";
    let Some(nvcc) = find_nvcc() else {
        common::skip(test, "no nvcc found");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skip_emu");
    let cuda = nvcc.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-std=c++17")
        .arg("-O1")
        .arg("-arch=sm_80")
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-cudart")
        .arg("static")
        .arg("-o")
        .arg(&out)
        .arg(root.join("tests/host_emu/skip_emu.cu"));
    for lib in ["lib64", "lib", "targets/x86_64-linux/lib"] {
        let d = cuda.join(lib);
        if d.is_dir() {
            cmd.arg("-L").arg(d);
        }
    }
    let built = cmd.output().expect("running nvcc");
    assert!(
        built.status.success(),
        "nvcc failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&out).output().expect("running the emulation");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "emulation failed:\n{stdout}");
    assert!(stdout.contains("failures: 0"), "{stdout}");
}
