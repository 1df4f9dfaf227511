//! `cargo xtask setup`: installs what the build, the tests and the release checks need, once.
//! Every step checks before it installs.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BuildEnv, Result, dist, have, is_root, output, sh};

/// Debian packages the tests, the agent and the release checks use: `ss` and `ip` (iproute2),
/// `promtool` and `prometheus` (prometheus), `setpriv` (util-linux); for the image, podman with
/// runc (crun fails on this machine kind's hybrid cgroups) and catatonit (the pause container of
/// `podman kube play`); for the kernel VMs, qemu, `depmod`
/// (kmod) and the busybox virtme-ng's initramfs needs, `xz` and `curl` to fetch the kernels.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ss", "iproute2"),
    ("ip", "iproute2"),
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("setpriv", "util-linux"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("catatonit", "catatonit"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
    ("busybox", "busybox-static"),
    ("xz", "xz-utils"),
    ("curl", "curl"),
];

/// cargo-deb, which builds the .deb (`cargo xtask dist`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// virtme-ng, which boots the other kernels over this machine's root (`cargo xtask test-kernels`).
const VIRTME_NG_VERSION: &str = "1.42";

/// The bpf-linker release built against the eBPF toolchain's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs what is missing: rust-src for the eBPF toolchain, bpf-linker built against that
/// toolchain's LLVM, and the Debian packages the tests use.
pub fn setup() -> Result<BuildEnv> {
    let mut benv = BuildEnv::default();

    // The eBPF crate needs `-Z build-std=core`: nightly, or stable with RUSTC_BOOTSTRAP=1.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let toolchain = if toolchains.lines().any(|l| l.starts_with("nightly")) {
        "nightly"
    } else {
        eprintln!(
            "xtask: no nightly toolchain: building the eBPF crate with stable and RUSTC_BOOTSTRAP=1"
        );
        benv.vars
            .push(("TCPSTATE_EBPF_TOOLCHAIN".into(), "stable".into()));
        benv.vars.push(("RUSTC_BOOTSTRAP".into(), "1".into()));
        "stable"
    };
    benv.toolchain = toolchain.to_string();
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }

    ensure_bpf_linker(toolchain, &sysroot)?;

    // The static release binary (`cargo xtask dist`).
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t == dist::MUSL) {
        sh(Command::new("rustup").args(["target", "add", dist::MUSL]))?;
    }

    ensure_tools()?;
    Ok(benv)
}

/// The tools the tests and release checks call: kubernetes-validate, cargo-deb, virtme-ng and
/// the [`DEBIAN_PACKAGES`].
fn ensure_tools() -> Result {
    // The manifest checks validate offline against the Kubernetes schemas.
    if !have("kubernetes-validate") {
        pip_install("kubernetes-validate==1.37.0")?;
    }
    cargo_install("deb", "cargo-deb", CARGO_DEB_VERSION)?;
    if !output(Command::new("vng").arg("--version")).is_ok_and(|v| v.contains(VIRTME_NG_VERSION)) {
        pip_install(&format!("virtme-ng=={VIRTME_NG_VERSION}"))?;
    }

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            return Err(format!(
                "missing Debian packages {missing:?}: run `cargo xtask setup` as root, or `apt-get install {}`",
                missing.join(" ")
            ));
        }
        let mut pkgs = missing.clone();
        pkgs.dedup();
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Installs a PyPI package (`name==version`) with the machine's python3.
fn pip_install(spec: &str) -> Result {
    sh(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        spec,
    ]))
}

/// Installs `package@version` from crates.io unless `cargo SUBCOMMAND --version` already names
/// that version.
pub fn cargo_install(subcommand: &str, package: &str, version: &str) -> Result {
    if output(Command::new("cargo").args([subcommand, "--version"]))
        .is_ok_and(|v| v.contains(version))
    {
        return Ok(());
    }
    sh(Command::new("cargo").args(["install", "--locked", &format!("{package}@{version}")]))
}

/// bpf-linker must link against the same LLVM the eBPF toolchain's rustc uses; the only LLVM of
/// that version here is the toolchain's own `libLLVM`, so point `LLVM_PREFIX` at it.
fn ensure_bpf_linker(toolchain: &str, sysroot: &Path) -> Result {
    // It links libLLVM dynamically from the toolchain's lib dir, which `rustup run` puts on the
    // loader path (as it does when aya-build runs the eBPF build), so check it the same way.
    if let Ok(v) =
        output(Command::new("rustup").args(["run", toolchain, "bpf-linker", "--version"]))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    let verbose = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .ok_or("cannot read the LLVM version from `rustc -vV`")?
        .to_string();
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .map_err(|e| format!("cannot list {}: {e}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("libLLVM.so."))
                .unwrap_or(false)
        })
        .ok_or_else(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let home = env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".cache/tcpstate/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))
        .map_err(|e| format!("{}: {e}", prefix.display()))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    sh(Command::new("cargo")
        .args([
            "install",
            "--force",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}
