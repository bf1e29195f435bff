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
    println!("cargo:rerun-if-changed=csrc/dtf_guarded.h");
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
    let mut cuda_include: Option<std::path::PathBuf> = None;
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
        cuda_include = Some(dir.clone());
    }
    build.compile("ditfleet_aten_shim");
    build_fp8_attention(&root, &include, cuda.then_some(cuda_include).flatten());
    if cuda {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// Compiles `csrc/cudnn_fp8_attention.cpp` (cuDNN's FP8 attention through the cudnn-frontend
/// graph API). The frontend is header-only and loads cuDNN at run time (libtorch_cuda has it
/// loaded), so only its headers and cuDNN's are needed here: from the `nvidia-cudnn-frontend` and
/// `nvidia-cudnn-cu13` wheels in the torch venv (scripts/setup.sh installs both), or
/// `$CUDNN_FRONTEND_INCLUDE`. Without them the op is compiled as a stub that says why, and the
/// FP8 precision runs its attention in bf16.
fn build_fp8_attention(
    root: &std::path::Path,
    torch_include: &std::path::Path,
    cuda: Option<std::path::PathBuf>,
) {
    println!("cargo:rerun-if-changed=csrc/cudnn_fp8_attention.cpp");
    println!("cargo:rerun-if-env-changed=CUDNN_FRONTEND_INCLUDE");
    let site = root.parent().map(|p| p.to_path_buf());
    let frontend = std::env::var("CUDNN_FRONTEND_INCLUDE")
        .ok()
        .map(std::path::PathBuf::from)
        .or_else(|| site.as_ref().map(|s| s.join("include")))
        .filter(|d| d.join("cudnn_frontend.h").exists());
    let cudnn = site
        .as_ref()
        .map(|s| s.join("nvidia/cudnn/include"))
        .filter(|d| d.join("cudnn.h").exists());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/cudnn_fp8_attention.cpp");
    match (cuda, frontend, cudnn) {
        (Some(cuda), Some(frontend), Some(cudnn)) => {
            build
                .include(cuda)
                .include(frontend)
                .include(cudnn)
                .define("DTF_WITH_CUDA", None)
                .define("DTF_WITH_CUDNN_FE", None)
                .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
                .define("CUDNN_FRONTEND_SKIP_JSON_LIB", None);
        }
        (Some(_), frontend, cudnn) => {
            println!(
                "cargo:warning=ditfleet-engine: FP8 attention not built: {}{}(pip install \
                 nvidia-cudnn-frontend into the torch venv, or set CUDNN_FRONTEND_INCLUDE)",
                if frontend.is_none() {
                    "no cudnn_frontend.h "
                } else {
                    ""
                },
                if cudnn.is_none() { "no cudnn.h " } else { "" },
            );
        }
        (None, _, _) => {}
    }
    build.compile("ditfleet_fp8_attention");
}

fn main() {
    link_torch();
    build_shim();
}
