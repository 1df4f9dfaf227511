//! `tcpstate doctor` and the teardown metrics against the real kernel: each finding provoked for
//! real in a namespace of its own and recognised with its port and owner pid.
//! Needs root; fails (never skips) without it.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::api::{cli, socket_path};
use crate::support::*;

/// `tcpstate doctor --port PORT --json`: exit status and report.
fn doctor(sock: &str, port: u16) -> (i32, serde_json::Value) {
    let port = port.to_string();
    let (code, out, err) = cli(&["doctor", "--socket", sock, "--port", &port, "--json"]);
    let report = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {out} {err}"));
    (code, report)
}

/// Waits for the finding of `kind` and `role` on `port` about `count` sockets (or closes, or
/// connects); returns it with doctor's exit status.
fn finding(sock: &str, port: u16, kind: &str, role: &str, count: u64) -> (i32, serde_json::Value) {
    eventually(Duration::from_secs(20), || {
        let (code, report) = doctor(sock, port);
        report["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["kind"] == kind && f["role"] == role && f["count"] == count)
            .map(|f| (code, f.clone()))
            .ok_or_else(|| {
                format!("no {kind} finding of {count} for {role} port {port}: {report:#}")
            })
    })
}

/// The pids a finding names: holders and openers.
fn pids(f: &serde_json::Value) -> Vec<u64> {
    ["owners", "opened_by"]
        .iter()
        .flat_map(|k| f[k].as_array().cloned().unwrap_or_default())
        .filter_map(|o| o["pid"].as_u64())
        .collect()
}

fn me() -> u64 {
    u64::from(std::process::id())
}

#[test]
fn a_server_leaking_close_wait_is_found_with_its_port_and_owner() {
    let _area = require_root("doctor");
    let ns = Netns::new("dcw");
    let sock = socket_path("dcw");
    let _agent = AgentProc::start(&["--socket", &sock, "--linger-after", "1s"]);
    let port = 7611u16;
    let _held = ns.enter(|| leak_close_wait(port, 3));
    let (code, f) = finding(&sock, port, "close_wait_leak", "server", 3);
    assert_eq!(f["severity"], "warning");
    assert!(f["oldest_seconds"].as_f64().unwrap() > 1.0, "{f:#}");
    assert_eq!(f["peers"][0]["address"], "127.0.0.1", "{f:#}");
    assert!(
        pids(&f).contains(&me()),
        "the test process holds them: {f:#}"
    );
    assert!(f["why"].as_str().unwrap().contains("close()"), "{f:#}");
    assert_eq!(code, 1, "warnings exit 1");
}

#[test]
fn a_client_half_closed_toward_a_peer_that_never_closes_holds_fin_wait2() {
    let _area = require_root("doctor");
    let ns = Netns::new("dfh");
    let sock = socket_path("dfh");
    let _agent = AgentProc::start(&["--socket", &sock, "--linger-after", "1s"]);
    let port = 7612u16;
    let _held = ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let pairs: Vec<(TcpStream, TcpStream)> = (0..2)
            .map(|_| {
                let (c, s) = connect_pair(&listener);
                c.shutdown(Shutdown::Write).unwrap();
                (c, s)
            })
            .collect();
        (listener, pairs)
    });
    let (_, f) = finding(&sock, port, "fin_wait2_held", "client", 2);
    assert!(pids(&f).contains(&me()), "{f:#}");
    // The server side of the same connections is a CLOSE_WAIT leak.
    let (_, f) = finding(&sock, port, "close_wait_leak", "server", 2);
    assert!(pids(&f).contains(&me()), "{f:#}");
}

#[test]
fn servers_closing_first_toward_clients_that_never_close_leave_orphans() {
    let _area = require_root("doctor");
    let ns = Netns::new("dfo");
    let sock = socket_path("dfo");
    let _agent = AgentProc::start(&["--socket", &sock, "--reconcile-interval", "500ms"]);
    let port = 7613u16;
    let _held = ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let clients: Vec<TcpStream> = (0..12)
            .map(|_| {
                let (c, s) = connect_pair(&listener);
                drop(s); // the server closes first; the client never does
                c
            })
            .collect();
        (listener, clients)
    });
    let (_, f) = finding(&sock, port, "fin_wait2_orphaned", "server", 12);
    assert!(pids(&f).contains(&me()), "the listener's holder: {f:#}");
    assert!(
        f["why"].as_str().unwrap().contains("tcp_fin_timeout"),
        "{f:#}"
    );
}

/// Clients toward 127.0.0.1:`port` in `ns` that close first (the server reads EOF, then
/// closes), one at a time, until `connect()` fails; returns the error and how many connected.
fn exhaust(ns: &Netns, port: u16) -> (std::io::Error, usize) {
    ns.enter(|| {
        let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let server = std::thread::spawn(move || {
            for s in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(mut s) = s {
                    let _ = s.read(&mut [0u8; 16]); // EOF: the client closed first
                }
            }
        });
        let mut connected = 0;
        let err = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(mut c) => {
                    connected += 1;
                    // Close first, then wait for the server's close: the client's end goes to
                    // TIME_WAIT, and no connection is left half-open for the server to reset.
                    c.shutdown(Shutdown::Write).unwrap();
                    let _ = c.read(&mut [0u8; 16]);
                }
                Err(e) => break e,
            }
            assert!(connected < 10_000, "connect() never failed");
        };
        // Wake the server through another destination, whose ports are all free.
        stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.2", port));
        server.join().unwrap();
        (err, connected)
    })
}

/// Sockets toward 127.0.0.1:`port` in the namespace with a local port in 40000..=40199.
fn ss_toward(ns: &Netns, port: u16) -> usize {
    let out = run(Command::new("ip").args(["netns", "exec", &ns.name, "ss", "-tanH"]));
    out.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f
                .get(3)
                .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
            f.get(4) == Some(&format!("127.0.0.1:{port}").as_str())
                && local_port.is_some_and(|p| (40000..=40199).contains(&p))
        })
        .count()
}

#[test]
fn a_time_wait_pile_up_exhausts_a_narrow_port_range_and_is_found_and_alerted() {
    let _area = require_root("doctor");
    let ns = Netns::new("dtw");
    for sysctl in [
        "net.ipv4.ip_local_port_range=40000 40199",
        "net.ipv4.tcp_tw_reuse=0",
    ] {
        run(Command::new("ip").args(["netns", "exec", &ns.name, "sysctl", "-qw", sysctl]));
    }
    let sock = socket_path("dtw");
    let agent = AgentProc::start(&["--socket", &sock, "--reconcile-interval", "500ms"]);
    let prom = Prometheus::start(&agent.addr);
    let port = 7614u16;
    let (err, connected) = exhaust(&ns, port);
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EADDRNOTAVAIL),
        "{err} after {connected}"
    );

    let p = port.to_string();
    let (in_use, ss) = eventually(Duration::from_secs(20), || {
        let text = agent.metrics();
        let in_use = value(&text, "tcpstate_ephemeral_ports_in_use", &[("port", &p)]);
        let range = value(&text, "tcpstate_ephemeral_port_range_size", &[("port", &p)]);
        let ss = ss_toward(&ns, port);
        match (in_use, range) {
            (Some(n), Some(200.0)) if n as usize == ss => Ok((n, ss)),
            _ => Err(format!("in use {in_use:?} of {range:?}, ss shows {ss}")),
        }
    });
    // connect() gave up with the range held toward the destination, in TIME_WAIT for 60 s.
    let listing = run(Command::new("ip").args(["netns", "exec", &ns.name, "ss", "-tanH"]));
    assert!(
        ss > 160,
        "the range is used up: ss shows {ss} of 200 ({in_use}); {connected} connected:\n{listing}"
    );

    let (code, f) = finding(
        &sock,
        port,
        "ephemeral_ports_exhausting",
        "client",
        ss as u64,
    );
    assert_eq!(f["severity"], "critical", "{f:#}");
    assert_eq!(f["destination"], format!("127.0.0.1:{port}"), "{f:#}");
    assert_eq!(f["range_size"], 200, "{f:#}");
    assert!(
        pids(&f).contains(&me()),
        "the process that connected: {f:#}"
    );
    assert_eq!(code, 2, "critical findings exit 2");

    eventually(Duration::from_secs(40), || {
        let states = prom.alerts("TcpstateEphemeralPortsExhausting", port);
        if states.iter().any(|s| s == "firing") {
            Ok(())
        } else {
            Err(format!(
                "TcpstateEphemeralPortsExhausting for {port}: {states:?}"
            ))
        }
    });
}

/// Sets SO_LINGER with a zero timeout: `close()` then sends an RST.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &linger).unwrap();
}

fn closes(text: &str, port: u16, role: &str, how: &str) -> Option<f64> {
    let p = port.to_string();
    let l = [("port", p.as_str()), ("role", role), ("how", how)];
    value(text, "tcpstate_closes_total", &l)
}

#[test]
fn resets_and_orderly_closes_are_told_apart_and_resets_found() {
    let _area = require_root("doctor");
    let ns = Netns::new("drs");
    let sock = socket_path("drs");
    let agent = AgentProc::start(&["--socket", &sock]);
    let (reset_port, orderly_port) = (7615u16, 7616u16);
    let _listener = ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", reset_port)).unwrap();
        let servers: Vec<TcpStream> = (0..12)
            .map(|_| {
                let (c, s) = connect_pair(&listener);
                reset_on_close(&c);
                drop(c);
                s
            })
            .collect();
        // Let the RSTs arrive before the servers go.
        std::thread::sleep(Duration::from_millis(100));
        drop(servers);
        close_client_first("127.0.0.1", orderly_port);
        listener
    });
    eventually(Duration::from_secs(10), || {
        let text = agent.metrics();
        let got = [
            closes(&text, reset_port, "client", "reset"),
            closes(&text, reset_port, "server", "reset"),
            closes(&text, orderly_port, "client", "local_first"),
            closes(&text, orderly_port, "server", "remote_first"),
        ];
        let want = [Some(12.0), Some(12.0), Some(1.0), Some(1.0)];
        (got == want).then_some(()).ok_or(format!("{got:?}"))
    });
    let text = agent.metrics();
    assert_eq!(closes(&text, orderly_port, "client", "reset"), None);
    let (_, f) = finding(&sock, reset_port, "resets", "client", 12);
    assert_eq!(
        (f["count"].as_u64(), f["share"].as_f64()),
        (Some(12), Some(1.0)),
        "{f:#}"
    );
    assert!(pids(&f).contains(&me()), "the client that reset: {f:#}");
    let fix = f["fix"].as_str().unwrap();
    assert!(
        fix.contains(&format!("`tcpstate watch --port {reset_port}`")),
        "{fix}"
    );
    let (_, f) = finding(&sock, reset_port, "resets", "server", 12);
    assert!(pids(&f).contains(&me()), "the listener's holder: {f:#}");
}

#[test]
fn connects_to_a_closed_port_are_failed_connects() {
    let _area = require_root("doctor");
    let ns = Netns::new("dcf");
    let sock = socket_path("dcf");
    let agent = AgentProc::start(&["--socket", &sock]);
    let port = 7617u16;
    ns.enter(|| {
        for _ in 0..6 {
            let e = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        }
    });
    let p = port.to_string();
    eventually(Duration::from_secs(10), || {
        let text = agent.metrics();
        let l = [("port", p.as_str()), ("role", "client")];
        let n = value(&text, "tcpstate_connect_failures_total", &l);
        (n == Some(6.0)).then_some(()).ok_or(format!("{n:?}"))
    });
    let (_, f) = finding(&sock, port, "connect_failures", "client", 6);
    assert!(pids(&f).contains(&me()), "{f:#}");
}

#[test]
fn a_quiet_port_is_healthy() {
    let _area = require_root("doctor");
    let ns = Netns::new("dq");
    let sock = socket_path("dq");
    let _agent = AgentProc::start(&["--socket", &sock, "--linger-after", "1s"]);
    let port = 7618u16;
    let _held = ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let pairs: Vec<_> = (0..5).map(|_| connect_pair(&listener)).collect();
        (listener, pairs)
    });
    // The agent has seen them, and they stay established past the linger threshold.
    eventually(Duration::from_secs(10), || {
        let (_, out, _) = cli(&["ports", "--socket", &sock, "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let seen = rows.as_array().into_iter().flatten().any(|r| {
            r["port"].as_str() == Some(port.to_string().as_str()) && r["states"]["established"] == 5
        });
        seen.then_some(()).ok_or(out)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (code, out, err) = cli(&["doctor", "--socket", &sock, "--port", &port.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("healthy: no findings ("), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn doctor_without_an_agent_says_so_and_exits_3() {
    let (code, out, err) = cli(&["doctor", "--socket", "/nonexistent/tcpstate.sock"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("/nonexistent/tcpstate.sock"), "{err}");
}

/// A listener on 127.0.0.1:`port` whose accept queue holds one connection (backlog 0).
fn tiny_backlog_listener(port: u16) -> TcpListener {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, socket,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, port),
    )
    .unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    TcpListener::from(fd)
}

#[test]
fn handshakes_a_full_listener_drops_are_invisible_on_the_server_side() {
    let _area = require_root("doctor");
    let ns = Netns::new("dbk");
    let agent = AgentProc::start(&[]);
    let port = 7619u16;
    let nstat = |ns: &Netns| {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &ns.name,
            "nstat",
            "-az",
            "TcpExtListenOverflows",
        ]));
        out.lines()
            .find_map(|l| l.strip_prefix("TcpExtListenOverflows"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = nstat(&ns);
    let (_listener, _first, failed) = ns.enter(|| {
        let listener = tiny_backlog_listener(port);
        let addr = listener.local_addr().unwrap();
        // The first fills the accept queue; the kernel drops the next ones' SYNs, and those
        // connects time out in SYN_SENT.
        let first = TcpStream::connect(addr).unwrap();
        let failed = (0..2)
            .filter(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err())
            .count();
        (listener, first, failed)
    });
    assert_eq!(failed, 2, "the full queue dropped both SYNs");
    assert!(nstat(&ns) >= before + 2, "the kernel counted the overflows");
    let p = port.to_string();
    eventually(Duration::from_secs(10), || {
        let text = agent.metrics();
        let client = [("port", p.as_str()), ("role", "client")];
        let failures = value(&text, "tcpstate_connect_failures_total", &client);
        let server_opens = value(
            &text,
            "tcpstate_transitions_total",
            &[
                ("port", &p),
                ("role", "server"),
                ("from", "listen"),
                ("to", "syn_recv"),
            ],
        );
        let server = [("port", p.as_str()), ("role", "server")];
        let server_failures = value(&text, "tcpstate_connect_failures_total", &server);
        let got = (failures, server_opens, server_failures);
        // The clients saw their connects fail; the server side shows the one handshake that
        // completed, and nothing of the two it dropped.
        (got == (Some(2.0), Some(1.0), None))
            .then_some(())
            .ok_or(format!("{got:?}"))
    });
}
