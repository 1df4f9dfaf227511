//! The systemd unit's capability set, measured: the agent works as an unprivileged user with
//! exactly that set, and names the capability when a required one is dropped. Needs root (to
//! switch users with setpriv); fails (never skips) without it.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The set in `AmbientCapabilities=` of the shipped unit.
fn unit_caps() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/tcpstate.service"
    ))
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit sets AmbientCapabilities");
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    assert_eq!(line, bounding, "ambient and bounding sets agree");
    assert!(
        unit.lines().any(|l| l == "LimitMEMLOCK=infinity"),
        "the unit lifts RLIMIT_MEMLOCK (kernels before 5.11 charge maps to it)"
    );
    line.split_whitespace().map(str::to_string).collect()
}

/// Runs the agent as nobody with `caps` (setpriv's +cap_name form) for a few seconds.
/// Returns its exit code (None if it was still running and got stopped) and its log.
fn run_with(caps: &[String], dir: &std::path::Path) -> (Option<i32>, String, bool) {
    // The unit's LimitMEMLOCK=infinity, which only kernels before 5.11 need (they charge the
    // maps to RLIMIT_MEMLOCK, and the agent cannot raise it without CAP_SYS_RESOURCE). Newer
    // ones leave the limit alone: this sandbox cannot raise it either.
    run_with_memlock(caps, dir, before_5_11().then_some("unlimited"))
}

/// Whether the running kernel charges eBPF maps to RLIMIT_MEMLOCK (before 5.11).
fn before_5_11() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (version.next().unwrap(), version.next().unwrap()) < (5, 11)
}

/// [`run_with`], with RLIMIT_MEMLOCK set to `memlock` (prlimit's form: `unlimited`, or bytes)
/// or left as it is.
fn run_with_memlock(
    caps: &[String],
    dir: &std::path::Path,
    memlock: Option<&str>,
) -> (Option<i32>, String, bool) {
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!(
        "-all{}",
        list.iter().map(|c| format!(",{c}")).collect::<String>()
    );
    let port = free_port();
    let mut command = match memlock {
        Some(m) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--memlock={m}:{m}")).args(["--", "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    let mut child = command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg("--")
        .arg(dir.join("tcpstate"))
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--socket")
        .arg(dir.join("run/api.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit and setpriv (util-linux)");
    // Serving metrics with events counted means it works.
    let deadline = Instant::now() + patience(Duration::from_secs(8));
    let mut works = false;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if let Ok(mut r) = ureq::get(&format!("http://127.0.0.1:{port}/readyz")).call() {
            let _ = r.body_mut().read_to_string();
            // Make a transition of our own and see it counted.
            let _ = std::net::TcpStream::connect(format!("127.0.0.1:{port}"));
            std::thread::sleep(Duration::from_millis(200));
            let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .unwrap_or_default();
            works = value(&text, "tcpstate_events_total", &[]).is_some_and(|v| v > 0.0);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let code = match child.try_wait().unwrap() {
        Some(status) => status.code(),
        None => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let status = child.wait().unwrap();
            assert!(status.success(), "SIGTERM: {status}");
            None
        }
    };
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    (code, log, works)
}

#[test]
fn the_unit_capability_set_is_enough_and_each_required_one_is_named_when_missing() {
    let _area = require_root("capabilities");
    let caps = unit_caps();
    assert_eq!(
        caps,
        [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_DAC_READ_SEARCH",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE"
        ]
    );
    let dir = std::env::temp_dir().join(format!("tcpstate-caps-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("run")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_tcpstate"), dir.join("tcpstate")).unwrap();
    nix::unistd::chown(&dir.join("run"), Some(65534.into()), Some(65534.into())).unwrap();

    let (code, log, works) = run_with(&caps, &dir);
    assert_eq!(code, None, "it keeps running with the unit's set: {log}");
    assert!(works, "events flow with the unit's set: {log}");
    assert!(
        !log.contains("without CAP_"),
        "no capability missing: {log}"
    );

    for required in ["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != required).cloned().collect();
        let (code, log, _) = run_with(&fewer, &dir);
        assert_eq!(code, Some(1), "without {required}: {log}");
        assert!(
            log.contains(&format!("missing capability {required}")),
            "without {required}: {log}"
        );
        assert_eq!(log.trim().lines().count(), 1, "one line: {log}");
    }
    let optional = kernel_specific_requirements(&caps, &dir);
    for &optional in optional {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != optional).cloned().collect();
        let (code, log, works) = run_with(&fewer, &dir);
        assert_eq!(code, None, "without {optional} it still runs: {log}");
        assert!(works, "without {optional} events still flow: {log}");
        assert!(
            log.contains(&format!("without {optional}")),
            "the loss is named: {log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What some kernels require beyond the unit's measured set, checked where the running kernel
/// is one of them; returns the capabilities that stay optional here.
fn kernel_specific_requirements(caps: &[String], dir: &std::path::Path) -> &'static [&'static str] {
    // Debian's and Ubuntu's kernels refuse perf_event_open without CAP_SYS_ADMIN at
    // kernel.perf_event_paranoid = 3 (their default): there it is required too, and named.
    let paranoid: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .expect("/proc/sys/kernel/perf_event_paranoid")
        .trim()
        .parse()
        .unwrap();
    if paranoid > 2 {
        let fewer: Vec<String> = caps
            .iter()
            .filter(|c| *c != "CAP_SYS_ADMIN")
            .cloned()
            .collect();
        let (code, log, _) = run_with(&fewer, dir);
        assert_eq!(
            code,
            Some(1),
            "paranoid {paranoid}, without CAP_SYS_ADMIN: {log}"
        );
        assert!(
            log.contains("missing capability CAP_SYS_ADMIN")
                && log.contains("kernel.perf_event_paranoid"),
            "paranoid {paranoid}, without CAP_SYS_ADMIN: {log}"
        );
    }
    // Kernels before 5.11 charge the maps to RLIMIT_MEMLOCK: at 64 KiB the load fails, and the
    // message names the limit and the fix rather than a capability.
    if before_5_11() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let (code, log, _) = run_with_memlock(caps, dir, Some("65536"));
        assert_eq!(
            code,
            Some(1),
            "Linux {release} with 64 KiB of memlock: {log}"
        );
        assert!(
            log.contains("RLIMIT_MEMLOCK") && log.contains("LimitMEMLOCK=infinity"),
            "Linux {release} with 64 KiB of memlock: {log}"
        );
    }
    if paranoid > 2 {
        &["CAP_SYS_PTRACE"]
    } else {
        &["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
    }
}
