//! Compiles kernels/*.cu with nvcc (through the `cc` crate), each file into a static library of
//! `extern "C"` launchers linked with the static CUDA runtime, and generates the Rust FFI from
//! kernels/dropfuse.h with bindgen into OUT_DIR.
//!
//! Environment:
//! - `NVCC`: path of nvcc. Otherwise `CUDA_HOME`/`CUDA_PATH` (`bin/nvcc`), then `PATH`, then the
//!   project-local toolchain that `scripts/setup-cuda.sh` installs in `.cuda/`.
//! - `DROPFUSE_CUDA_ARCHS`: comma-separated targets, e.g. `sm_80,sm_90,compute_90` (the default):
//!   `sm_XY` is machine code for that GPU, `compute_XY` is PTX that newer GPUs JIT-compile.
//! - `DROPFUSE_NVCC_FLAGS`: extra nvcc flags (whitespace-separated), e.g. the kernels' `-D` tuning knobs.
//! - `DOCS_RS`: skip nvcc (documentation builds without CUDA).
//! - `DROPFUSE_HOST_EMULATION=1`: the emulated-device build for machines without a GPU (see
//!   [`host_emulation`] and `scripts/emu-gpu-tests.sh`): the kernels are compiled by the host C++
//!   compiler onto the fiber emulator of `tests/host_emu/cuda_fiber_emu.h`, and stand-ins for
//!   libcuda and libcublas are built next to them and found first by the package's test, example
//!   and bench executables. Never for production use: it is a test device, orders of magnitude
//!   slower than a GPU.

use std::env;
use std::path::{Path, PathBuf};

const DEFAULT_ARCHS: &str = "sm_80,sm_90,compute_90";
const SETUP_HINT: &str =
    "run `bash scripts/setup-cuda.sh` (installs the pinned CUDA 13.0 compiler wheels into .cuda/ \
     and libclang), or set NVCC / CUDA_HOME to an existing CUDA toolkit";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = manifest.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "DROPFUSE_CUDA_ARCHS",
        "DOCS_RS",
        "LIBCLANG_PATH",
        "NVCC_PREPEND_FLAGS",
        "NVCC_APPEND_FLAGS",
        "NVCC_CCBIN",
        "DROPFUSE_NVCC_FLAGS",
        "DROPFUSE_HOST_EMULATION",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // The project-local toolchain's marker, when there is one: a rerun-if-changed path that does
    // not exist makes cargo rerun this script (and nvcc) on every build, as it did for builds
    // with NVCC / CUDA_HOME and no .cuda/ (those variables are tracked above).
    if manifest.join(".cuda/.installed").exists() {
        println!("cargo:rerun-if-changed=.cuda/.installed");
    }
    println!("cargo::rustc-check-cfg=cfg(dropfuse_host_emulation)");

    let mut sources = Vec::new();
    collect(&kernels, &mut sources);
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let cu: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();

    generate_bindings(&kernels.join("dropfuse.h"), &out.join("bindings.rs"));

    if env::var_os("DOCS_RS").is_some() {
        println!("cargo:warning=DOCS_RS is set: CUDA kernels are not compiled (documentation build)");
        return;
    }

    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| {
        fail(&format!(
            "no CUDA compiler (nvcc) found in NVCC, CUDA_HOME, CUDA_PATH, PATH or .cuda/: {SETUP_HINT}"
        ))
    });
    let bin = nvcc.parent().unwrap().to_path_buf();
    let root = bin.parent().unwrap().to_path_buf();

    if env::var("DROPFUSE_HOST_EMULATION").is_ok_and(|v| !v.is_empty() && v != "0") {
        host_emulation(&manifest, &out, &root.join("include"), &cu);
        return;
    }

    // cc runs `nvcc` from PATH (or $NVCC): put the chosen one first.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(env::split_paths(&path));
    env::set_var("PATH", env::join_paths(dirs).unwrap());

    let archs = env::var("DROPFUSE_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let gencode =
        parse_archs(&archs).unwrap_or_else(|e| fail(&format!("DROPFUSE_CUDA_ARCHS={archs:?}: {e}")));

    // One cc build (one static library) per .cu file: with more than one file in a build, cc
    // passes --device-c (relocatable device code), which changes register allocation (spills in
    // the sm_80 dropout and cross-entropy kernels, scripts/kernel-audit.sh) and is not needed: no
    // kernel calls device code of another file. The builds run in parallel threads.
    let extra: Vec<String> = env::var("DROPFUSE_NVCC_FLAGS")
        .map(|e| e.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let results: Vec<(String, Result<(), cc::Error>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cu
            .iter()
            .map(|f| {
                let (kernels, gencode, extra) = (&kernels, &gencode, &extra);
                scope.spawn(move || {
                    let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
                    let mut build = cc::Build::new();
                    build
                        .cuda(true)
                        .cudart("static")
                        // cc adds -G (device debug: slow kernels) in debug profiles; kernels are
                        // always optimized.
                        .debug(false)
                        .opt_level(3)
                        .std("c++17")
                        .include(kernels)
                        .flag("-O3")
                        .flag("-lineinfo")
                        .flag("-Xcompiler=-fPIC")
                        .warnings(false);
                    for g in gencode {
                        build.flag("-gencode").flag(g);
                    }
                    // Extra nvcc flags, e.g. -D tuning knobs of the kernels.
                    for x in extra {
                        build.flag(x);
                    }
                    build.file(f);
                    let r = build.try_compile(&format!("dropfuse_kernels_{stem}"));
                    (stem, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (stem, r) in results {
        if let Err(e) = r {
            fail(&format!(
                "nvcc ({}) failed to compile kernels/{stem}.cu: {e}",
                nvcc.display()
            ));
        }
    }

    // The static CUDA runtime: toolkits keep it in lib64/ (or targets/<arch>/lib), the wheels in lib/.
    for dir in [
        root.join("lib64"),
        root.join("lib"),
        root.join("targets/x86_64-linux/lib"),
    ] {
        if dir.join("libcudart_static.a").exists() {
            println!("cargo:rustc-link-search=native={}", dir.display());
        }
    }
    for lib in ["dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}

/// The emulated-device build: every `kernels/*.cu` compiled as C++ with the fiber emulator
/// (`-include cuda_fiber_emu_2d.h`, the 1-D and 2-D launches: the launchers run their kernels on the host, each CUDA thread a
/// fiber) into the same static library, and `libcuda.so` / `libcublas.so` stand-ins
/// (`tests/host_emu/fake_libcuda.cpp`, `fake_libcublas.cpp`: host memory behind guard pages,
/// synchronous streams) in `OUT_DIR/emulated-device`, which the package's executables search
/// first (DT_RPATH). The crate is built with `cfg(dropfuse_host_emulation)`.
fn host_emulation(manifest: &Path, out: &Path, cuda_include: &Path, cu: &[&PathBuf]) {
    let emu = manifest.join("tests/host_emu");
    println!("cargo:rerun-if-changed={}", emu.display());
    println!("cargo:rustc-cfg=dropfuse_host_emulation");
    println!(
        "cargo:warning=DROPFUSE_HOST_EMULATION is set: kernels run on the host emulator (a test \
         device, not for production)"
    );
    if !cuda_include.join("cuda_runtime.h").exists() {
        fail(&format!(
            "the host emulation needs the CUDA headers, not found in {}: {SETUP_HINT}",
            cuda_include.display()
        ));
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .include(manifest.join("kernels"))
        .include(&emu)
        .include(cuda_include)
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas")
        .flag("-include")
        .flag("cuda_fiber_emu_2d.h")
        // The sources are .cu: compile them as C++.
        .flag("-x")
        .flag("c++")
        .warnings(false);
    // Uninitialised locals (registers on a GPU) hold a recognisable pattern, not a stale stack
    // value (the compilers that have the flag; tests/host_emu/poison_emu.cpp checks it).
    if build
        .is_flag_supported("-ftrivial-auto-var-init=pattern")
        .unwrap_or(false)
    {
        build
            .flag("-ftrivial-auto-var-init=pattern")
            .define("DROPFUSE_EMU_AUTO_VAR_INIT", "1");
    }
    for f in cu {
        build.file(f);
    }
    // The emulator's poisoning self-test (`dropfuse_emu_poison_selftest`, run by
    // tests/dropout_gpu.rs on this build), linked like the kernels.
    build
        .define("DROPFUSE_EMU_NO_MAIN", "1")
        .file(emu.join("poison_emu.cpp"));
    if let Err(e) = build.try_compile("dropfuse_kernels") {
        fail(&format!("the host emulation build of kernels/ failed: {e}"));
    }

    let dir = out.join("emulated-device");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", dir.display())));
    let cxx = env::var_os("CXX").unwrap_or_else(|| "c++".into());
    for (src, lib) in [
        ("fake_libcuda.cpp", "libcuda.so"),
        ("fake_libcublas.cpp", "libcublas.so"),
    ] {
        let status = std::process::Command::new(&cxx)
            .args(["-shared", "-fPIC", "-O2", "-std=c++17", "-ffp-contract=off", "-o"])
            .arg(dir.join(lib))
            .arg("-I")
            .arg(cuda_include)
            .arg(emu.join(src))
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run the C++ compiler {cxx:?}: {e}")));
        if !status.success() {
            fail(&format!(
                "the host emulation build of tests/host_emu/{src} failed"
            ));
        }
    }
    // DT_RPATH (not RUNPATH): searched before LD_LIBRARY_PATH and the system's libcuda.
    println!(
        "cargo:rustc-link-arg=-Wl,--disable-new-dtags,-rpath,{}",
        dir.display()
    );
    for lib in ["dl", "pthread"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("\nerror: dropfuse build: {msg}\n");
    panic!("dropfuse build: {msg}");
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", dir.display())));
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "cu" || e == "cuh" || e == "h") {
            out.push(p);
        }
    }
}

fn executable(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if executable(&p) {
            return Some(p);
        }
        // A bare name: look it up on PATH below.
        if let Some(found) = which(&p) {
            return Some(found);
        }
        fail(&format!("NVCC={} does not exist: {SETUP_HINT}", p.display()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if executable(&p) {
                return Some(p);
            }
        }
    }
    if let Some(p) = which(Path::new("nvcc")) {
        return Some(p);
    }
    let local = manifest.join(".cuda/site/nvidia/cu13/bin/nvcc");
    executable(&local).then_some(local)
}

fn which(name: &Path) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| executable(p))
}

/// `sm_80,sm_90,compute_90` -> nvcc `-gencode` values.
fn parse_archs(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (kind, num) = item
            .split_once('_')
            .ok_or_else(|| format!("`{item}` is not of the form sm_XY or compute_XY"))?;
        if num.is_empty()
            || !num.chars().next().unwrap().is_ascii_digit()
            || !num.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!("`{item}`: expected digits after `{kind}_`"));
        }
        match kind {
            "sm" => out.push(format!("arch=compute_{num},code=sm_{num}")),
            "compute" => out.push(format!("arch=compute_{num},code=compute_{num}")),
            _ => return Err(format!("`{item}`: expected sm_XY or compute_XY")),
        }
    }
    if out.is_empty() {
        return Err("the list is empty".into());
    }
    Ok(out)
}

fn generate_bindings(header: &Path, dest: &Path) {
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_function("dropfuse_.*")
        .allowlist_type("dropfuse_.*")
        .allowlist_var("DROPFUSE_.*")
        .rustified_enum("dropfuse_dtype")
        .rustified_enum("dropfuse_normalize")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate()
        .unwrap_or_else(|e| {
            fail(&format!(
                "bindgen could not process {}: {e}. bindgen needs libclang: {SETUP_HINT}",
                header.display()
            ))
        });
    bindings
        .write_to_file(dest)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", dest.display())));
}
