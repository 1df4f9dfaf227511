//! Builds the eBPF program (`ebpf/`) for the bpf target with the nightly toolchain and leaves the
//! object in `OUT_DIR/tcpstate-ebpf`, where `src/kernel/probe.rs` embeds it.
//!
//! `TCPSTATE_EBPF_TOOLCHAIN` names another rustup toolchain (for example `stable` together with
//! `RUSTC_BOOTSTRAP=1`, on a machine without nightly). `cargo xtask setup` installs what is needed.
use std::process::Command;

fn main() -> anyhow::Result<()> {
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let ebpf_dir = format!("{manifest_dir}/../ebpf");
    // aya-build watches the eBPF crate; the contract it shares with us lives in common/.
    println!("cargo:rerun-if-changed={manifest_dir}/../common/src");
    println!("cargo:rerun-if-env-changed=TCPSTATE_EBPF_TOOLCHAIN");
    // Benchmark-only builds of the program with one part left out (`cargo xtask bench
    // --breakdown`); the eBPF crate reads the variable with `option_env!`.
    println!("cargo:rerun-if-env-changed=TCPSTATE_BENCH_VARIANT");
    let variant = std::env::var("TCPSTATE_BENCH_VARIANT").unwrap_or_default();
    const VARIANTS: &[&str] = &[
        "",
        "empty",
        "copy",
        "no-map",
        "no-clock",
        "no-ring",
        "no-common-lru",
        "hash",
        "no-query",
    ];
    if !VARIANTS.contains(&variant.as_str()) {
        anyhow::bail!(
            "TCPSTATE_BENCH_VARIANT={variant}: not one of {}",
            VARIANTS[1..].join(", ")
        );
    }
    if !variant.is_empty() {
        println!(
            "cargo:warning=benchmark-only build: the eBPF program leaves out `{variant}` \
             (TCPSTATE_BENCH_VARIANT); unset it for a real agent"
        );
    }
    println!("cargo:rustc-env=TCPSTATE_BENCH_VARIANT={variant}");
    let toolchain = std::env::var("TCPSTATE_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain.as_deref() {
        None | Some("") | Some("nightly") => aya_build::Toolchain::Nightly,
        Some(other) => aya_build::Toolchain::Custom(other),
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tcpstate-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        toolchain,
    )?;

    // Revision for tcpstate_build_info; "unknown" outside a git checkout.
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=TCPSTATE_REVISION={revision}");
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=TCPSTATE_RUSTC={rustc}");
    Ok(())
}
