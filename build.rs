//! Links against the torch that tch was built with and records its `lib/` folder as
//! the binary's rpath, so `target/release/dtta` runs without `LD_LIBRARY_PATH`.
//! Also builds the small C++ shims (`src/tta/autocast.cpp`, `src/model/buffers.cpp`)
//! against the same headers.
//! `LIBTORCH` is the venv's `torch` package folder (see the Makefile).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=src/tta/autocast.cpp");
    println!("cargo:rerun-if-changed=src/model/buffers.cpp");
    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH must point at the venv's torch folder (run via make)");
    let root = std::path::Path::new(&libtorch);
    let lib = root.join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    // The binary's RUNPATH, which dlopen() from the binary also honours (libtorch_cuda is
    // loaded that way at start).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    cc::Build::new()
        .cpp(true)
        .file("src/tta/autocast.cpp")
        .file("src/model/buffers.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .compile("dtta_autocast");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
