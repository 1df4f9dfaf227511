//! `cargo xtask dist`: the artifacts a fleet installs, in `target/dist/`.
//!
//! - `tcpstate`: one static x86_64 binary (musl: no dynamic libraries, and the API socket's group
//!   lookup reads /etc/group itself, where a static glibc would need NSS modules at run time);
//! - `tcpstate-VERSION-x86_64-linux.tar.gz`: that binary with the systemd unit, the example
//!   config, the README and the licenses;
//! - `tcpstate_VERSION_amd64.deb` (cargo-deb; see `[package.metadata.deb]` in agent/Cargo.toml);
//! - `tcpstate-VERSION-image.tar`: the image of deploy/container/Containerfile (see `image`).
//!
//! `cargo xtask test` builds them and runs [`check`] and the image's checks on what it built; the
//! .deb is installed and purged inside a kernel VM (`kernels`).
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
    pub deb: PathBuf,
    pub image: crate::image::Image,
    pub version: String,
}

/// The files of the tarball besides the binary, from the repository root.
const TARBALL_FILES: &[(&str, &str)] = &[
    ("deploy/systemd/tcpstate.service", "tcpstate.service"),
    ("deploy/tcpstate.toml", "tcpstate.toml"),
    ("README.md", "README.md"),
    ("LICENSE-MIT", "LICENSE-MIT"),
    ("LICENSE-APACHE", "LICENSE-APACHE"),
];

fn copy(from: &Path, to: &Path) -> Result {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
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
    std::fs::create_dir_all(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;
    let binary = dist.join("tcpstate");
    copy(
        &root.join(format!("target/{MUSL}/release/tcpstate")),
        &binary,
    )?;
    // No symbols: 5 MiB instead of 7 (the eBPF object is data, untouched).
    sh(Command::new("strip").arg(&binary))?;
    let tarball = tarball(&root, &dist, &binary, &version)?;
    let deb = deb(&root, &dist, &version)?;
    let image = crate::image::build(&root, &dist, &binary, &version)?;
    eprintln!(
        "xtask: wrote {}, {}, {} and {}",
        binary.display(),
        tarball.display(),
        deb.display(),
        image.archive.display()
    );
    Ok(Artifacts {
        binary,
        tarball,
        deb,
        image,
        version,
    })
}

/// `tcpstate-VERSION-x86_64-linux.tar.gz`: one folder with the binary and [`TARBALL_FILES`].
fn tarball(root: &Path, dist: &Path, binary: &Path, version: &str) -> Result<PathBuf> {
    let name = format!("tcpstate-{version}");
    let stage = dist.join(&name);
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(|e| format!("{}: {e}", stage.display()))?;
    copy(binary, &stage.join("tcpstate"))?;
    for (from, to) in TARBALL_FILES {
        copy(&root.join(from), &stage.join(to))?;
    }
    let tarball = dist.join(format!("{name}-x86_64-linux.tar.gz"));
    sh(Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(dist)
        .arg(&name))?;
    Ok(tarball)
}

/// `tcpstate_VERSION_amd64.deb`, by cargo-deb from the static binary. The package's unit is the
/// repository's with the binary where the package puts it (/usr/bin, not /usr/local/bin).
fn deb(root: &Path, dist: &Path, version: &str) -> Result<PathBuf> {
    let units = dist.join("deb-unit");
    std::fs::create_dir_all(&units).map_err(|e| format!("{}: {e}", units.display()))?;
    let unit = std::fs::read_to_string(root.join("deploy/systemd/tcpstate.service"))
        .map_err(|e| format!("deploy/systemd/tcpstate.service: {e}"))?;
    const LOCAL: &str = "ExecStart=/usr/local/bin/tcpstate ";
    if !unit.contains(LOCAL) {
        return Err(format!("deploy/systemd/tcpstate.service has no `{LOCAL}`"));
    }
    let packaged = unit.replace(LOCAL, "ExecStart=/usr/bin/tcpstate ");
    std::fs::write(units.join("tcpstate.service"), packaged)
        .map_err(|e| format!("{}: {e}", units.display()))?;
    let deb = dist.join(format!("tcpstate_{version}_amd64.deb"));
    let _ = std::fs::remove_file(&deb);
    sh(Command::new("cargo")
        .current_dir(root)
        .args(["deb", "-p", "tcpstate", "--no-build", "--target", MUSL])
        .arg("--output")
        .arg(&deb))?;
    Ok(deb)
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
    for file in std::iter::once("tcpstate").chain(TARBALL_FILES.iter().map(|(_, to)| *to)) {
        let want = format!("tcpstate-{}/{file}", a.version);
        if !listed.lines().any(|l| l == want) {
            return Err(format!("{} lacks {want}: {listed}", a.tarball.display()));
        }
    }
    group_lookup(&a.binary)?;
    deb_contents(a)?;
    Ok(5)
}

/// What the .deb holds, read without installing it (the install runs in a kernel VM):
/// its version, the binary, the unit pointing at it, the config as a conffile, the licenses,
/// the maintainer scripts that make and remove the user.
fn deb_contents(a: &Artifacts) -> Result {
    let deb = a.deb.display().to_string();
    let field = |name: &str| output(Command::new("dpkg-deb").args(["-f", &deb, name]));
    if field("Version")? != a.version || field("Architecture")? != "amd64" {
        return Err(format!(
            "{deb}: version or architecture is not {} amd64",
            a.version
        ));
    }
    let files = output(Command::new("dpkg-deb").args(["-c", &deb]))?;
    for want in [
        "./usr/bin/tcpstate",
        "./usr/lib/systemd/system/tcpstate.service",
        "./etc/tcpstate/tcpstate.toml",
        "./usr/share/doc/tcpstate/copyright",
        "./usr/share/doc/tcpstate/LICENSE-MIT",
        "./usr/share/doc/tcpstate/LICENSE-APACHE",
    ] {
        if !files.lines().any(|l| l.ends_with(want)) {
            return Err(format!("{deb} lacks {want}:\n{files}"));
        }
    }
    let control = std::env::temp_dir().join(format!("tcpstate-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&control);
    sh(Command::new("dpkg-deb").args(["-e", &deb]).arg(&control))?;
    let read = |f: &str| std::fs::read_to_string(control.join(f)).unwrap_or_default();
    let (conffiles, postinst, postrm) = (read("conffiles"), read("postinst"), read("postrm"));
    let _ = std::fs::remove_dir_all(&control);
    if conffiles.trim() != "/etc/tcpstate/tcpstate.toml" {
        return Err(format!("{deb}: conffiles are `{conffiles}`"));
    }
    if !postinst.contains("useradd --system") || !postrm.contains("userdel tcpstate") {
        return Err(format!(
            "{deb}: postinst/postrm do not make and remove the user"
        ));
    }
    Ok(())
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
