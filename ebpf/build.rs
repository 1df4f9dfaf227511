//! Rebuild the eBPF object when bpf-linker changes (a new LLVM can change the code it emits).
fn main() {
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
