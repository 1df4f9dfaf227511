//! The agent as an operator runs it: its exposition passes promtool, it stops cleanly on a
//! signal, refuses bad input and missing privileges with one clear line, and gives an idle
//! port's slot back. Needs root; fails (never skips) without it.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_metrics_pass_promtool() {
    let _area = require_root("kernel");
    let ns = Netns::new("prom");
    let agent = AgentProc::start(&[]);
    let _held = ns.enter(|| mixed_states("127.0.0.1", 7401));
    ns.enter(|| close_client_first("127.0.0.1", 7402));
    let text = eventually(Duration::from_secs(5), || {
        let text = agent.metrics();
        if value(
            &text,
            "tcpstate_connection_duration_seconds_count",
            &[("port", "7402")],
        )
        .is_some()
        {
            Ok(text)
        } else {
            Err("no closed connection on port 7402 yet".into())
        }
    });
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed: {said}"
    );
    assert!(said.trim().is_empty(), "promtool warns: {said}");
    for family in [
        "tcpstate_connections",
        "tcpstate_transitions_total",
        "tcpstate_state_duration_seconds",
        "tcpstate_connection_duration_seconds",
        "tcpstate_events_total",
        "tcpstate_events_lost_total",
        "tcpstate_decode_errors_total",
        "tcpstate_tracked_sockets",
        "tcpstate_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    assert!(value(&text, "tcpstate_events_total", &[]).unwrap() > 0.0);
}

#[test]
fn sigint_and_sigterm_detach_and_exit_zero() {
    let _area = require_root("kernel");
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let agent = AgentProc::start(&[]);
        let (status, log) = agent.stop_with(signal);
        assert!(status.success(), "{signal}: exit status {status}");
        assert!(log.contains("detached"), "{signal}: {log}");
    }
}

/// Runs the agent binary with `args`, expecting it to fail at start.
fn failing_start(prefix: &[&str], args: &[&str]) -> (i32, String) {
    let bin = env!("CARGO_BIN_EXE_tcpstate");
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tcpstate");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_input_gets_one_clear_line_and_a_nonzero_exit() {
    let _area = require_root("kernel");
    let listen = format!("127.0.0.1:{}", free_port());

    let (code, err) = failing_start(&[], &["agent", "--ring-size", "3MiB"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--ring-size") && err.contains("power of two"),
        "{err}"
    );

    let (code, err) = failing_start(
        &[],
        &["agent", "--listen", &listen, "--tracefs", "/nonexistent"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("/nonexistent") && err.contains("--tracefs"),
        "{err}"
    );

    // A tracefs without the tracepoint: a kernel that lacks it.
    let fake = std::env::temp_dir().join(format!("tcpstate-fake-tracefs-{}", std::process::id()));
    std::fs::create_dir_all(fake.join("events/sock")).unwrap();
    let (code, err) = failing_start(
        &[],
        &[
            "agent",
            "--listen",
            &listen,
            "--tracefs",
            fake.to_str().unwrap(),
        ],
    );
    std::fs::remove_dir_all(&fake).unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no tracepoint sock:inet_sock_set_state"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // The listen address is taken.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let (code, err) = failing_start(&[], &["agent", "--listen", &addr.to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot listen") && err.contains("--listen"),
        "{err}"
    );
}

#[test]
fn without_privileges_the_agent_names_the_missing_capability() {
    let _area = require_root("kernel");
    // A copy any user can run, whatever the permissions of the checkout.
    let dir = std::env::temp_dir().join(format!("tcpstate-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("tcpstate");
    std::fs::copy(env!("CARGO_BIN_EXE_tcpstate"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(&bin)
        .args(["agent", "--listen", &listen])
        .output()
        .expect("setpriv (util-linux)");
    std::fs::remove_dir_all(&dir).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing capability CAP_BPF"), "{err}");
    assert!(err.contains("run tcpstate as root"), "{err}");
}

#[test]
fn an_idle_port_gives_its_slot_back_and_returns_from_zero() {
    let _area = require_root("kernel");
    let ns = Netns::new("retire");
    // A 1 s linger threshold makes the table task look every 250 ms.
    let agent = AgentProc::start(&["--port-retire-after", "2s", "--linger-after", "1s"]);
    let port = 7302u16;
    let p = port.to_string();
    let one_connection = || {
        ns.enter(|| {
            let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
            let (client, mut server) = connect_pair(&listener);
            drop(client);
            let mut buf = [0u8; 1];
            assert_eq!(server.read(&mut buf).unwrap(), 0);
        })
    };
    let accepted = |text: &str| {
        value(
            text,
            "tcpstate_transitions_total",
            &[
                ("port", &p),
                ("role", "server"),
                ("from", "listen"),
                ("to", "syn_recv"),
            ],
        )
    };
    one_connection();
    eventually(Duration::from_secs(5), || {
        match accepted(&agent.metrics()) {
            Some(1.0) => Ok(()),
            other => Err(format!("accepted {other:?}")),
        }
    });
    // The server side ends in CLOSE (the client holds the TIME_WAIT): nothing holds the
    // server role's port, so its series go once it has been idle for 2 s.
    let text = eventually(Duration::from_secs(10), || {
        let text = agent.metrics();
        match accepted(&text) {
            None => Ok(text),
            Some(n) => Err(format!("still exported: {n}")),
        }
    });
    assert!(
        !text.contains(&format!("port=\"{p}\",role=\"server\"")),
        "every series of the retired port goes"
    );
    let freed = value(
        &text,
        "tcpstate_port_slots_freed_total",
        &[("reason", "idle")],
    );
    assert!(freed.is_some_and(|n| n >= 1.0), "{freed:?}");
    // It comes back, counting from zero.
    one_connection();
    eventually(Duration::from_secs(5), || {
        match accepted(&agent.metrics()) {
            Some(1.0) => Ok(()),
            other => Err(format!("accepted after return {other:?}")),
        }
    });
}
