//! `cargo xtask dist`: the artifacts a fleet installs, in `target/dist/`.
//!
//! - `tcpstate`: one static x86_64 binary (musl: no dynamic libraries, and the API socket's group
//!   lookup reads /etc/group itself, where a static glibc would need NSS modules at run time);
//! - `tcpstate-VERSION-x86_64-linux.tar.gz`: that binary with the systemd unit, the example
//!   config and the README.
//!
//! `cargo xtask test` builds them and runs [`check`] on what it built.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{BuildEnv, Result, harness, output, root, sh};

/// The target of the static binary.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// What `dist` wrote.
pub struct Artifacts {
    pub binary: PathBuf,
    pub tarball: PathBuf,
    pub version: String,
}

/// The workspace version, from the root manifest.
fn version(root: &Path) -> Result<String> {
    let manifest =
        std::fs::read_to_string(root.join("Cargo.toml")).map_err(|e| format!("Cargo.toml: {e}"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_string)
        .ok_or_else(|| "no `version = \"...\"` in Cargo.toml".into())
}

/// Builds the static binary and the tarball.
pub fn build(benv: &BuildEnv) -> Result<Artifacts> {
    let root = root();
    let version = version(&root)?;
    sh(benv.apply(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--target",
        MUSL,
        "-p",
        "tcpstate",
        "--bin",
        "tcpstate",
    ])))?;
    let dist = root.join("target/dist");
    let name = format!("tcpstate-{version}");
    let stage = dist.join(&name);
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(|e| format!("{}: {e}", stage.display()))?;
    let binary = dist.join("tcpstate");
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
    };
    copy(
        &root.join(format!("target/{MUSL}/release/tcpstate")),
        &binary,
    )?;
    copy(&binary, &stage.join("tcpstate"))?;
    copy(
        &root.join("deploy/systemd/tcpstate.service"),
        &stage.join("tcpstate.service"),
    )?;
    copy(
        &root.join("deploy/tcpstate.toml"),
        &stage.join("tcpstate.toml"),
    )?;
    copy(&root.join("README.md"), &stage.join("README.md"))?;
    let tarball = dist.join(format!("{name}-x86_64-linux.tar.gz"));
    sh(Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dist)
        .arg(&name))?;
    eprintln!(
        "xtask: wrote {} and {}",
        binary.display(),
        tarball.display()
    );
    Ok(Artifacts {
        binary,
        tarball,
        version,
    })
}

/// The release checks of the binary and the tarball; returns how many passed (all, or an
/// error naming the one that failed).
pub fn check(a: &Artifacts) -> Result<u64> {
    // No dynamic libraries: glibc's ldd says "not a dynamic executable" for a static binary.
    let ldd = Command::new("ldd")
        .arg(&a.binary)
        .output()
        .map_err(|e| format!("cannot run ldd: {e}"))?;
    let said =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    if !(said.contains("not a dynamic executable") || said.contains("statically linked")) {
        return Err(format!(
            "{} is not static: ldd says {said}",
            a.binary.display()
        ));
    }
    let shown = output(Command::new(&a.binary).arg("--version"))?;
    if shown != format!("tcpstate {}", a.version) {
        return Err(format!("`tcpstate --version` says `{shown}`"));
    }
    let listed = output(Command::new("tar").arg("-tzf").arg(&a.tarball))?;
    for file in ["tcpstate", "tcpstate.service", "tcpstate.toml", "README.md"] {
        let want = format!("tcpstate-{}/{file}", a.version);
        if !listed.lines().any(|l| l == want) {
            return Err(format!("{} lacks {want}: {listed}", a.tarball.display()));
        }
    }
    group_lookup(&a.binary)?;
    Ok(4)
}

/// The static agent gives its API socket to the `tcpstate` group, as the dynamic one does: the
/// lookup works without NSS. Creates the group for the check when the host has none.
fn group_lookup(binary: &Path) -> Result {
    let exists = |g: &str| {
        Command::new("getent")
            .args(["group", g])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let created = !exists("tcpstate");
    if created {
        sh(Command::new("groupadd").args(["--system", "tcpstate"]))?;
    }
    struct Cleanup(bool, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.1);
            if self.0 {
                let _ = Command::new("groupdel").arg("tcpstate").status();
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("tcpstate-dist-{}", std::process::id()));
    let _cleanup = Cleanup(created, dir.clone());
    let socket = dir.join("api.sock");
    let socket_arg = socket.display().to_string();
    let agent = harness::Agent::start(
        binary,
        "127.0.0.1:10691",
        &["--socket", &socket_arg, "--log-level", "warn"],
        Stdio::inherit(),
        harness::Ready::Seeded,
        Duration::from_secs(20),
    )?;
    let gid = output(Command::new("stat").args(["-c", "%G"]).arg(&socket))?;
    let status = output(Command::new(binary).args(["status", "--socket", &socket_arg]))?;
    drop(agent);
    if gid != "tcpstate" {
        return Err(format!(
            "the static agent's API socket belongs to group `{gid}`, not tcpstate"
        ));
    }
    if !status.contains("version:") {
        return Err(format!(
            "`tcpstate status` through the socket said: {status}"
        ));
    }
    Ok(())
}
