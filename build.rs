//! Links against the torch that tch was built with and records its `lib/` folder as
//! the binary's rpath, so `target/release/dtta` runs without `LD_LIBRARY_PATH`.
//! `LIBTORCH` is the venv's `torch` package folder (see the Makefile).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        // --enable-new-dtags gives RUNPATH, which dlopen() from the binary also honours
        // (libtorch_cuda is loaded that way at start).
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        println!("cargo:rustc-env=DTTA_LIBTORCH_LIB={}", lib.display());
    }
}
