//! `cargo xtask test-kernels`: the agent's tests on the kernels fleets run, Debian's 5.10
//! (bullseye), 6.1 (bookworm) and 6.12 (trixie), generic `amd64` flavor.
//!
//! Each kernel comes from the Debian archive (the newest `linux-image-*-amd64-unsigned` of its
//! release, checked against the archive's SHA-256) and is unpacked once into
//! `~/.cache/tcpstate/kernels/RELEASE/`; its modules are linked at `/lib/modules/VERSION`, where
//! virtme-ng looks for them. virtme-ng boots it under qemu's TCG (nested KVM fails on this
//! machine kind) over this machine's root file system, read-only but for throwaway overlays
//! (/etc, /usr, /var, /tmp, ...), so installing a package inside is safe. A directory of
//! `target/test-kernels/` is shared writable to carry the log and the exit status out.
//!
//! Inside each: the integration tests and the unit tests, all of them but the two areas that read
//! only files (`deploy::`, `layers::`, which the host run covers); on one of them also the .deb's
//! install check (`deb_vm`).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{BuildEnv, Result, output, root, sh};

/// Debian release, kernel series.
pub const KERNELS: &[(&str, &str)] = &[
    ("bullseye", "5.10"),
    ("bookworm", "6.1"),
    ("trixie", "6.12"),
];
/// `cargo xtask test` (CI) runs [`FOCUSED`] on each kernel, to stay within CI's 30 minutes with
/// room to spare; `cargo xtask test-kernels` runs everything everywhere.
/// The integration tests of attach, layouts (with the unit tests, which all run), ss agreement
/// for both roles and families, lingering, seeding, live TIME_WAIT, how connections end (the
/// states each kernel passes through) and the capability set.
const FOCUSED: &[&str] = &[
    "kernel::",
    "ground_truth::close_wait_leaked_before_start_is_seeded_at_once_with_its_owner",
    "ground_truth::two_namespaces_on_the_same_port_are_counted_apart_with_per_netns",
    "ground_truth::time_wait_is_counted_as_the_kernel_makes_it_within_a_second_of_ss",
    "linger::a_close_wait_leak_is_detected_ages_and_clears",
    "linger::a_fin_wait2_held_open_by_shutdown_is_detected_and_clears",
    "doctor::resets_and_orderly_closes_are_told_apart_and_resets_found",
    "doctor::connects_to_a_closed_port_are_failed_connects",
    "capabilities::",
];
/// The kernel the .deb's install check runs on: the host's own distribution's.
const DEB_KERNEL: &str = "bookworm";
const ARCHIVE: &str = "http://deb.debian.org/debian";

/// One unpacked kernel.
struct Kernel {
    /// `6.1.0-50-amd64`, as `uname -r` says.
    release: String,
    /// The Debian package version, `6.1.176-1`.
    version: String,
    vmlinuz: PathBuf,
}

fn cache() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/tcpstate/kernels")
}

/// The newest generic amd64 image package of `series` in `codename`'s Packages index:
/// (package file path, SHA-256, version).
fn newest_package(codename: &str, series: &str) -> Result<(String, String, String)> {
    let index = output(Command::new("sh").arg("-c").arg(format!(
        "curl --fail --silent --show-error --location {ARCHIVE}/dists/{codename}/main/binary-amd64/Packages.xz | xz -dc"
    )))?;
    let mut best: Option<(String, String, String)> = None;
    for stanza in index.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::to_string)
        };
        let Some(package) = field("Package: ") else {
            continue;
        };
        let Some(abi) = package
            .strip_prefix("linux-image-")
            .and_then(|p| p.strip_suffix("-amd64-unsigned"))
        else {
            continue;
        };
        // `5.10.0-32` or `6.12.117+deb13`; not the cloud or rt flavors.
        if !abi.starts_with(&format!("{series}.")) || abi.contains("cloud") || abi.contains("-rt") {
            continue;
        }
        let (Some(file), Some(sha), Some(version)) =
            (field("Filename: "), field("SHA256: "), field("Version: "))
        else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some((_, _, v)) => Command::new("dpkg")
                .args(["--compare-versions", &version, "gt", v])
                .status()
                .is_ok_and(|s| s.success()),
        };
        if newer {
            best = Some((file, sha, version));
        }
    }
    best.ok_or_else(|| format!("no linux-image-{series}.*-amd64-unsigned in {codename}'s index"))
}

/// The kernel of `codename`, from the cache or downloaded and unpacked into it.
fn fetch(codename: &str, series: &str) -> Result<Kernel> {
    let dir = cache().join(codename);
    let stamp = dir.join("kernel");
    if let Ok(text) = std::fs::read_to_string(&stamp)
        && let Some((release, version)) = text.trim().split_once(' ')
    {
        let vmlinuz = dir.join(format!("root/boot/vmlinuz-{release}"));
        if vmlinuz.is_file() {
            link_modules(&dir, release)?;
            return Ok(Kernel {
                release: release.into(),
                version: version.into(),
                vmlinuz,
            });
        }
    }
    let (file, sha, version) = newest_package(codename, series)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let deb = dir.join("kernel.deb");
    sh(Command::new("curl")
        .args(["--fail", "--silent", "--show-error", "--location", "-o"])
        .arg(&deb)
        .arg(format!("{ARCHIVE}/{file}")))?;
    let sum = output(Command::new("sha256sum").arg(&deb))?;
    if sum.split_whitespace().next() != Some(sha.as_str()) {
        return Err(format!("{file}: SHA-256 {sum} is not the archive's {sha}"));
    }
    sh(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")))?;
    let _ = std::fs::remove_file(&deb);
    let boot = dir.join("root/boot");
    let release = std::fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .ok_or_else(|| format!("{file} has no boot/vmlinuz-*"))?;
    link_modules(&dir, &release)?;
    std::fs::write(&stamp, format!("{release} {version}\n"))
        .map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(Kernel {
        vmlinuz: boot.join(format!("vmlinuz-{release}")),
        release,
        version,
    })
}

/// virtme-ng loads the guest's modules from `/lib/modules/RELEASE` of the shared root: a link
/// to the cached ones (left alone if the machine has that kernel installed for real), indexed by
/// depmod once.
fn link_modules(dir: &Path, release: &str) -> Result {
    // bookworm and older ship them under /lib; trixie (merged /usr) under /usr/lib.
    let modules = ["root/lib/modules", "root/usr/lib/modules"]
        .iter()
        .map(|d| dir.join(d).join(release))
        .find(|m| m.is_dir())
        .ok_or_else(|| format!("{}: no lib/modules/{release}", dir.display()))?;
    let link = Path::new("/lib/modules").join(release);
    match std::fs::symlink_metadata(&link) {
        Ok(m) if !m.file_type().is_symlink() => return Ok(()),
        Ok(_) if std::fs::read_link(&link).is_ok_and(|t| t == modules) => {}
        _ => {
            let _ = std::fs::remove_file(&link);
            std::fs::create_dir_all("/lib/modules").map_err(|e| format!("/lib/modules: {e}"))?;
            std::os::unix::fs::symlink(&modules, &link)
                .map_err(|e| format!("{}: {e}", link.display()))?;
        }
    }
    if !modules.join("modules.dep").is_file() {
        sh(Command::new("depmod").arg(release))?;
    }
    Ok(())
}

/// Runs `body` (shell) as root inside `kernel`; returns its exit status and its output.
fn run_inside(kernel: &Kernel, name: &str, body: &str) -> Result<(i32, String)> {
    let out = root().join("target/test-kernels").join(name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let script = out.join("run.sh");
    let (log, rc) = (out.join("log"), out.join("rc"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             export PATH='{path}' HOME=/root\n\
             # TCG runs everything several times slower: the tests' deadlines stretch.\n\
             export TCPSTATE_TEST_PATIENCE=4\n\
             # virtme-ng binds a file over /etc/shadow, which useradd must replace.\n\
             umount /etc/shadow 2>/dev/null\n\
             ulimit -n 65536\n\
             cd '{agent}'\n\
             ( {body} ) > '{log}' 2>&1\n\
             echo $? > '{rc}'\n",
            path = std::env::var("PATH").unwrap_or_default(),
            agent = root().join("agent").display(),
            log = log.display(),
            rc = rc.display(),
        ),
    )
    .map_err(|e| format!("{}: {e}", script.display()))?;
    sh(Command::new("chmod").arg("+x").arg(&script))?;
    let console = Command::new("timeout")
        .arg("1200")
        .args([
            "vng",
            "--disable-kvm",
            "--memory",
            "4G",
            "--cpus",
            "2",
            "--run",
        ])
        .arg(&kernel.vmlinuz)
        .arg("--rwdir")
        .arg(&out)
        .arg("--exec")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run vng (virtme-ng): {e}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    match std::fs::read_to_string(&rc)
        .ok()
        .and_then(|r| r.trim().parse().ok())
    {
        Some(code) => Ok((code, text)),
        None => Err(format!(
            "the {} VM never finished its script ({}):\n{}\n{}",
            kernel.release,
            console.status,
            String::from_utf8_lossy(&console.stderr),
            text
        )),
    }
}

/// One kernel's figures for the summary table.
pub struct Outcome {
    pub codename: &'static str,
    pub release: String,
    pub version: String,
    /// The test script's exit status.
    pub code: i32,
    pub passed: u64,
    pub failed: u64,
    pub seconds: u64,
    pub deb: Option<bool>,
}

/// The test executables cargo built for the agent (unit tests and the integration crate).
fn test_binaries(benv: &BuildEnv) -> Result<Vec<PathBuf>> {
    let json = output(benv.apply(Command::new("cargo").current_dir(root()).args([
        "test",
        "--release",
        "-p",
        "tcpstate",
        "--lib",
        "--test",
        "integration",
        "--no-run",
        "--message-format=json",
    ])))?;
    let found: Vec<PathBuf> = json
        .lines()
        .filter_map(|l| l.split("\"executable\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(PathBuf::from)
        // Test executables live in deps/; the `tcpstate` binary itself is listed too.
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("deps")))
        .collect();
    if found.len() != 2 {
        return Err(format!(
            "expected the lib and integration test binaries, found {found:?}"
        ));
    }
    Ok(found)
}

/// `cargo test`'s counts in `log`.
fn counts(log: &str) -> (u64, u64) {
    log.lines()
        .filter_map(crate::test_result_counts)
        .fold((0, 0), |(p, f), (dp, df)| (p + dp, f + df))
}

/// Boots each kernel, runs the tests inside (all of them with `everything`, else [`FOCUSED`])
/// and the .deb's check on [`DEB_KERNEL`]; prints a
/// table; fails if anything failed anywhere.
pub fn test_kernels(
    benv: &BuildEnv,
    deb: Option<&Path>,
    only: &[String],
    everything: bool,
) -> Result<Vec<Outcome>> {
    for name in only {
        if !KERNELS.iter().any(|(c, s)| c == name || s == name) {
            return Err(format!(
                "unknown kernel `{name}`: one of bullseye (5.10), bookworm (6.1), trixie (6.12)"
            ));
        }
    }
    let binaries = test_binaries(benv)?;
    // A hung test must not hang the VM: 15 minutes per binary at most. The unit tests run
    // whole everywhere (a few seconds); the integration tests whole or [`FOCUSED`].
    let script = |focused: bool| {
        let tests = binaries
            .iter()
            .map(|b| {
                let integration = b
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("integration-"));
                let filters = if focused && integration {
                    FOCUSED.join(" ")
                } else {
                    "--skip deploy:: --skip layers::".to_string()
                };
                format!("timeout 900 '{}' --test-threads=2 {filters}", b.display())
            })
            .collect::<Vec<_>>()
            .join("; s=$((s+$?)) ; ");
        format!("s=0; {tests}; s=$((s+$?)); exit $s")
    };
    let mut kernels = Vec::new();
    for (codename, series) in KERNELS
        .iter()
        .filter(|(c, s)| only.is_empty() || only.iter().any(|o| o == c || o == s))
    {
        kernels.push((*codename, fetch(codename, series)?));
    }
    // One VM at a time: qemu's TCG keeps both cores busy (three side by side took 11 minutes
    // instead of 9, and stretched the tests' waits past their deadlines).
    let results: Vec<Result<Outcome>> = kernels
        .iter()
        .map(|(codename, kernel)| {
            let focused = !everything;
            one_kernel(codename, kernel, &script(focused), deb)
        })
        .collect();
    let mut outcomes = Vec::new();
    let mut problems = Vec::new();
    for result in results {
        match result {
            Ok(o) => {
                if o.code != 0 || o.passed == 0 {
                    problems.push(format!(
                        "{} ({}): tests exited {}, {} failed",
                        o.release, o.codename, o.code, o.failed
                    ));
                }
                if o.deb == Some(false) {
                    problems.push(format!("the .deb's check in {} failed", o.release));
                }
                outcomes.push(o);
            }
            Err(e) => problems.push(e),
        }
    }
    print_table(&outcomes);
    if problems.is_empty() {
        Ok(outcomes)
    } else {
        Err(problems.join("; "))
    }
}

/// The tests inside `kernel`, then on [`DEB_KERNEL`] the .deb's check in a second VM.
fn one_kernel(
    codename: &'static str,
    kernel: &Kernel,
    script: &str,
    deb: Option<&Path>,
) -> Result<Outcome> {
    let started = Instant::now();
    eprintln!("xtask: booting {} ({codename}) under TCG", kernel.release);
    let tests = run_inside(kernel, codename, script);
    let deb_ok = deb
        .filter(|_| codename == DEB_KERNEL)
        .map(|deb| deb_check(kernel, codename, deb));
    let (code, log) = tests?;
    println!("{log}");
    let (passed, failed) = counts(&log);
    Ok(Outcome {
        codename,
        release: kernel.release.clone(),
        version: kernel.version.clone(),
        code,
        passed,
        failed,
        seconds: started.elapsed().as_secs(),
        deb: deb_ok.transpose()?,
    })
}

/// The .deb's install check (`xtask deb-check-inside`) inside `kernel`: whether it passed.
fn deb_check(kernel: &Kernel, codename: &str, deb: &Path) -> Result<bool> {
    let xtask = std::env::current_exe().map_err(|e| e.to_string())?;
    let (code, log) = run_inside(
        kernel,
        &format!("{codename}-deb"),
        &format!("'{}' deb-check-inside '{}'", xtask.display(), deb.display()),
    )?;
    println!("{log}");
    Ok(code == 0)
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "| kernel | Debian | package | tests passed | failed | .deb install check | seconds |"
    );
    println!("|---|---|---|---|---|---|---|");
    for o in outcomes {
        let deb = match o.deb {
            Some(true) => "passed",
            Some(false) => "FAILED",
            None => "-",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            o.release, o.codename, o.version, o.passed, o.failed, deb, o.seconds
        );
    }
}
