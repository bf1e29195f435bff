// Shared by the build scripts of every package whose binaries link libtorch (`include!`d).
//
// 1. Keeps `libtorch_cuda.so` linked: the linker's `--as-needed` otherwise drops it because no
//    symbol is referenced directly, and then CUDA is silently unavailable on a GPU machine.
// 2. Adds an rpath to the libtorch the build used (the repo's `.venv` by default), so binaries and
//    test executables run here without LD_LIBRARY_PATH. On the GPU machines LD_LIBRARY_PATH points
//    at the machine's own torch and takes precedence over this RUNPATH.

fn torch_lib_dir() -> Option<std::path::PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(std::path::PathBuf::from(dir).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn link_torch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    if let Some(dir) = torch_lib_dir() {
        if dir.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
