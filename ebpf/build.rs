//! Rebuild the eBPF object when bpf-linker changes (a new LLVM can change the code it emits).
fn main() {
    // `cargo xtask bench --breakdown` measures a preallocated hash in place of the LRU: a map
    // of another type, so a cfg rather than a constant.
    println!("cargo:rustc-check-cfg=cfg(tcpstate_bench_hash)");
    println!("cargo:rerun-if-env-changed=TCPSTATE_BENCH_VARIANT");
    if std::env::var("TCPSTATE_BENCH_VARIANT").as_deref() == Ok("hash") {
        println!("cargo:rustc-cfg=tcpstate_bench_hash");
    }
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!(
            "cargo:warning=bpf-linker not found ({e}): run `cargo xtask setup` to install it"
        ),
    }
}
