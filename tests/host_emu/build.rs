//! Builds a host emulation program (`tests/host_emu/*.cpp`: CUDA kernels on the fiber-per-thread
//! emulator of `cuda_fiber_emu.h`) with the host C++ compiler against the CUDA headers, and runs it.
//! Shared by the `*_host_emulation` tests (included with `#[path]`).
//!
//! [`build_and_run_sanitized`] builds with UndefinedBehaviorSanitizer
//! (`-fsanitize=undefined -fno-sanitize-recover=all`) when the compiler has its runtime: a
//! misaligned 16-byte vector access (`uint4` needs 16-byte alignment: a "misaligned address" fault
//! on a GPU; those of kernels/common/vec.cuh trap in every build), an out-of-range shift or a
//! signed overflow in a kernel then aborts the emulation. Without the runtime it builds and runs
//! without it (a note in the output).
//!
//! Every build uses `-ftrivial-auto-var-init=pattern` when the compiler has it (and then defines
//! `DROPFUSE_EMU_AUTO_VAR_INIT`): an uninitialised local (a register on a GPU) holds a recognisable
//! pattern (0xFE bytes with g++) instead of a stale stack value.

// Each test uses one of the two entry points.
#![allow(dead_code)]

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

fn find_cxx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CXX") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    let path = std::env::var_os("PATH")?;
    ["c++", "g++", "clang++"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Uninitialised locals get a pattern (the module docs).
const AUTO_VAR_INIT: &str = "-ftrivial-auto-var-init=pattern";

/// Whether `cxx` accepts `flag` (it preprocesses an empty C++ file with it).
fn supports(cxx: &Path, flag: &str) -> bool {
    Command::new(cxx)
        .args([flag, "-x", "c++", "-E", "-o", "/dev/null", "/dev/null"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds `tests/host_emu/<source>` with the host compiler and runs it; `None` (after a SKIPPED
/// line) without a compiler or the CUDA headers.
pub fn build_and_run(test: &str, source: &str) -> Option<String> {
    build_and_run_with(test, source, false)
}

/// [`build_and_run`] under UBSan when the compiler can (the module docs).
pub fn build_and_run_sanitized(test: &str, source: &str) -> Option<String> {
    build_and_run_with(test, source, true)
}

fn build_and_run_with(test: &str, source: &str, ubsan: bool) -> Option<String> {
    let Some(cxx) = find_cxx() else {
        crate::common::skip(test, "no host C++ compiler found");
        return None;
    };
    let include = find_nvcc()
        .and_then(|n| n.parent().and_then(Path::parent).map(|d| d.join("include")))
        .filter(|d| d.join("cuda_fp16.h").is_file());
    let Some(include) = include else {
        crate::common::skip(test, "no CUDA headers found (next to nvcc)");
        return None;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let auto_var_init = supports(&cxx, AUTO_VAR_INIT);
    let name = source.replace('.', "_") + if ubsan { "_ubsan" } else { "" };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let build = |sanitize: bool| {
        let mut cmd = Command::new(&cxx);
        cmd.args(["-std=c++17", "-O2", "-ffp-contract=off", "-Wno-unknown-pragmas"]);
        if sanitize {
            cmd.args(["-fsanitize=undefined", "-fno-sanitize-recover=all"]);
        }
        if auto_var_init {
            cmd.args([AUTO_VAR_INIT, "-DDROPFUSE_EMU_AUTO_VAR_INIT=1"]);
        }
        cmd.arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(root.join("kernels"))
            .arg("-I")
            .arg(root.join("tests/host_emu"))
            .arg("-o")
            .arg(&out)
            .arg(root.join("tests/host_emu").join(source))
            .output()
            .expect("running the C++ compiler")
    };
    let mut note = String::new();
    let mut built = build(ubsan);
    if ubsan && !built.status.success() {
        note = format!("note: built without UBSan ({} failed with it)\n", cxx.display());
        built = build(false);
    }
    assert!(
        built.status.success(),
        "{} failed:\n{}",
        cxx.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    let scale = std::env::var("DROPFUSE_EMU_SCALE").unwrap_or_else(|_| "1".into());
    let run = Command::new(&out)
        .arg(scale)
        .output()
        .expect("running the emulation");
    let stdout = note + &String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "emulation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    Some(stdout)
}
