include!("link_torch.rs");

/// Headers the CUDA parts of the shim include, directly or through c10/cuda. The PyPI torch
/// wheel ships the runtime API headers but not `crt/`, which come with `nvidia-cuda-crt`.
const CUDA_HEADERS: &[&str] = &[
    "cuda_runtime_api.h",
    "cuda_runtime.h",
    "crt/host_defines.h",
    "crt/host_config.h",
    "cuda.h",
    "nvrtc.h",
];

/// Compiles `csrc/aten_shim.cpp` (ATen calls tch does not expose) against the libtorch headers
/// of the build; with a CUDA libtorch (`libc10_cuda.so` next to it) the CUDA parts (streams,
/// graphs, the fused kernels) are compiled in against the CUDA headers of the PyPI wheels
/// (`nvidia/cu13/include`) or `$CUDA_HOME/include`. A CUDA libtorch without those headers is a
/// build error: the engine would build, link CUDA, and silently lose its CUDA graphs and kernels.
fn build_shim() {
    println!("cargo:rerun-if-changed=csrc/aten_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/flux_kernels.cu.inc");
    println!("cargo:rerun-if-changed=csrc/sdxl_kernels.cu.inc");
    println!("cargo:rerun-if-changed=csrc/sdxl_ops.cpp.inc");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Some(lib) = torch_lib_dir() else {
        panic!("ditfleet-engine: libtorch not found (set LIBTORCH or put a python3 with torch on PATH)");
    };
    let root = lib.parent().expect("torch/lib has a parent").to_path_buf();
    let include = root.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/aten_shim.cpp");
    let candidates: Vec<std::path::PathBuf> = [
        std::env::var("CUDA_HOME")
            .ok()
            .map(|h| std::path::PathBuf::from(h).join("include")),
        root.parent().map(|sp| sp.join("nvidia/cu13/include")),
        root.parent().map(|sp| sp.join("nvidia/cuda_runtime/include")),
        Some(std::path::PathBuf::from("/usr/local/cuda/include")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let missing = |dir: &std::path::Path| -> Vec<&str> {
        CUDA_HEADERS
            .iter()
            .copied()
            .filter(|h| !dir.join(h).exists())
            .collect()
    };
    let cuda = lib.join("libc10_cuda.so").exists();
    if cuda {
        let Some(dir) = candidates.iter().find(|d| missing(d).is_empty()) else {
            let looked: Vec<String> = candidates
                .iter()
                .map(|d| format!("  {}: missing {}", d.display(), missing(d).join(", ")))
                .collect();
            panic!(
                "ditfleet-engine: {} is a CUDA build of libtorch but no directory has every CUDA \
                 header the engine's shim needs ({}):\n{}\nInstall the headers into the torch \
                 venv with `pip install nvidia-cuda-crt==13.0.88` (scripts/setup.sh does; the \
                 torch wheel lacks crt/), or point CUDA_HOME at a CUDA 13 toolkit. Building \
                 without them would silently drop the engine's CUDA graphs and kernels.",
                lib.display(),
                CUDA_HEADERS.join(", "),
                looked.join("\n")
            );
        };
        build.include(dir).define("DTF_WITH_CUDA", None);
    }
    build.compile("ditfleet_aten_shim");
    if cuda {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn main() {
    link_torch();
    build_shim();
}
