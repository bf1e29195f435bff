include!("link_torch.rs");

/// Compiles `csrc/aten_shim.cpp` (ATen calls tch does not expose) against the libtorch headers
/// of the build; with CUDA headers present (the PyPI torch wheel's `nvidia/cu13/include`, or
/// `$CUDA_HOME/include`) the CUDA parts (streams, graphs) are compiled in too.
fn build_shim() {
    println!("cargo:rerun-if-changed=csrc/aten_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/flux_kernels.cu.inc");
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
    let cuda_include = [
        std::env::var("CUDA_HOME")
            .ok()
            .map(|h| std::path::PathBuf::from(h).join("include")),
        root.parent().map(|sp| sp.join("nvidia/cu13/include")),
        root.parent().map(|sp| sp.join("nvidia/cuda_runtime/include")),
        Some(std::path::PathBuf::from("/usr/local/cuda/include")),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.join("cuda_runtime_api.h").exists());
    let cuda = cuda_include.is_some() && lib.join("libc10_cuda.so").exists();
    if let (true, Some(dir)) = (cuda, cuda_include) {
        build.include(dir).define("DTF_WITH_CUDA", None);
    } else {
        println!(
            "cargo:warning=ditfleet-engine: no CUDA headers or libc10_cuda; CUDA graphs are not built in"
        );
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
