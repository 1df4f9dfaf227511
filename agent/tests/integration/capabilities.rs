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
    line.split_whitespace().map(str::to_string).collect()
}

/// Runs the agent as nobody with `caps` (setpriv's +cap_name form) for a few seconds.
/// Returns its exit code (None if it was still running and got stopped) and its log.
fn run_with(caps: &[String], dir: &std::path::Path) -> (Option<i32>, String, bool) {
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!(
        "-all{}",
        list.iter().map(|c| format!(",{c}")).collect::<String>()
    );
    let port = free_port();
    let mut child = Command::new("setpriv")
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
        .expect("setpriv (util-linux)");
    // Serving metrics with events counted means it works.
    let deadline = Instant::now() + Duration::from_secs(8);
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
    for optional in ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"] {
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
