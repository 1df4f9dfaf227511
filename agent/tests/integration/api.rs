//! The local API and the `tcpstate` CLI against a real agent. Needs root; fails (never skips)
//! without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

pub(crate) fn socket_path(tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("tcpstate-api-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("api.sock").display().to_string()
}

pub(crate) fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tcpstate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

pub(crate) fn cli_json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = cli(args);
    assert_eq!(code, 0, "tcpstate {args:?}: {err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("tcpstate {args:?} printed no JSON ({e}): {out}"))
}

#[test]
fn conns_ports_and_watch_answer_from_the_live_table() {
    let _area = require_root("api");
    let ns = Netns::new("api");
    let sock = socket_path("live");
    // A transition the kernel skips (counted as a recursion miss) is repaired by the next
    // reconciliation, so one runs within the waits below.
    let agent = AgentProc::start(&[
        "--socket",
        &sock,
        "--linger-after",
        "1s",
        "--reconcile-interval",
        "2s",
    ]);
    let port = 7701u16;
    let (_listener, _servers) = ns.enter(|| leak_close_wait(port, 4));

    check_conns(&agent, &sock, port);
    check_ports(&agent, &sock, port);
    let seen = watch_fresh_connection(&ns, &sock, 7702);
    let client: Vec<_> = seen
        .iter()
        .filter(|s| s.0 == "client")
        .map(|s| (s.1.as_str(), s.2.as_str()))
        .collect();
    let server: Vec<_> = seen
        .iter()
        .filter(|s| s.0 == "server" && s.1 != "close")
        .map(|s| (s.1.as_str(), s.2.as_str()))
        .collect();
    assert_eq!(
        client,
        [
            ("close", "syn_sent"),
            ("syn_sent", "established"),
            ("established", "fin_wait1"),
            ("fin_wait1", "fin_wait2"),
            ("fin_wait2", "close")
        ],
        "{seen:?}"
    );
    assert_eq!(
        server,
        [
            ("listen", "syn_recv"),
            ("syn_recv", "established"),
            ("established", "close_wait"),
            ("close_wait", "last_ack"),
            ("last_ack", "close")
        ],
        "{seen:?}"
    );

    let status = cli_json(&["status", "--socket", &sock, "--json"]);
    assert_eq!(status["api_version"], 1);
    assert!(status["events_total"].as_u64().unwrap() > 0);
    assert!(status["reconciliations"].as_u64().unwrap() >= 1);
    assert_eq!(status["ring_buffer_bytes"], 4 << 20);
}

/// `conns`: exactly the leaked sockets on `port`, with state, role and owner; after a second
/// they linger, and `--lingering` finds them.
fn check_conns(agent: &AgentProc, sock: &str, port: u16) {
    let p = port.to_string();
    let conns = eventually(Duration::from_secs(5), || {
        let v = cli_json(&[
            "conns",
            "--socket",
            sock,
            "--port",
            &p,
            "--state",
            "CLOSE_WAIT",
            "--json",
        ]);
        let rows = v.as_array().unwrap().clone();
        let with_owner = rows
            .iter()
            .filter(|r| r["owners"][0]["pid"] == std::process::id())
            .count();
        if rows.len() == 4 && with_owner == 4 {
            Ok(rows)
        } else {
            Err(format!(
                "{} rows, {with_owner} with our pid: {rows:#?}; {}",
                rows.len(),
                agent.loss_context()
            ))
        }
    });
    for r in &conns {
        assert_eq!(r["state"], "close_wait");
        assert_eq!(r["role"], "server");
        assert_eq!(r["service_port"], port);
        assert!(r["local"].as_str().unwrap().ends_with(&format!(":{port}")));
        assert_ne!(r["inode"], 0);
    }
    // They linger after a second: --lingering finds them.
    eventually(Duration::from_secs(4), || {
        let v = cli_json(&[
            "conns",
            "--socket",
            sock,
            "--port",
            &p,
            "--lingering",
            "--json",
        ]);
        match v.as_array().unwrap().len() {
            4 => Ok(()),
            n => Err(format!("{n} lingering")),
        }
    });
}

/// `ports` agrees with the metrics, and its human table lists the port.
fn check_ports(agent: &AgentProc, sock: &str, port: u16) {
    let p = port.to_string();
    let v = cli_json(&["ports", "--socket", sock, "--json"]);
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == p.as_str() && r["role"] == "server")
        .cloned()
        .unwrap_or_else(|| panic!("no server row for {port}: {v:#}"));
    let text = agent.metrics();
    for (state, n) in row["states"].as_object().unwrap() {
        let m = value(
            &text,
            "tcpstate_connections",
            &[
                ("port", p.as_str()),
                ("role", "server"),
                ("state", state.as_str()),
            ],
        );
        assert_eq!(m, n.as_f64(), "{state}");
    }
    let lingering = value(
        &text,
        "tcpstate_lingering_connections",
        &[
            ("port", p.as_str()),
            ("role", "server"),
            ("state", "close_wait"),
        ],
    );
    assert_eq!(row["lingering"].as_f64(), lingering);
    assert_eq!(row["lingering"], 4);
    assert!(row["oldest_lingering_seconds"].as_f64().unwrap() > 1.0);
    // The human table lists the port with its lingering count.
    let (code, human, _) = cli(&["ports", "--socket", sock]);
    assert_eq!(code, 0);
    assert!(human.starts_with("PORT  "), "{human}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with(&format!("{port} ")) && l.contains("server")),
        "{human}"
    );
}

/// `watch --port WPORT --json` while a fresh connection on `wport` opens and closes (client
/// first): (who, from, to) of each transition, in order.
fn watch_fresh_connection(ns: &Netns, sock: &str, wport: u16) -> Vec<(String, String, String)> {
    let mut watch = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args([
            "watch",
            "--socket",
            sock,
            "--port",
            &wport.to_string(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says on stderr when the subscription is live (or exits, and the line is empty).
    let mut said = String::new();
    BufReader::new(watch.stderr.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert!(said.contains("watching"), "tcpstate watch said: {said}");
    ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", wport)).unwrap();
        let (client, mut server) = connect_pair(&listener);
        drop(client);
        let mut b = [0u8; 1];
        assert_eq!(server.read(&mut b).unwrap(), 0);
    });
    // Read on a thread, so that a missing event fails at the deadline instead of blocking.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen: Vec<(String, String, String)> = Vec::new();
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while seen.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        // The listener's own transitions are not the connection's.
        if e["to"] == "listen" || (e["from"] == "listen" && e["to"] == "close") {
            continue;
        }
        let who = if e["local"].as_str().unwrap().ends_with(&format!(":{wport}")) {
            "server"
        } else {
            "client"
        };
        seen.push((
            who.into(),
            e["from"].as_str().unwrap().into(),
            e["to"].as_str().unwrap().into(),
        ));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    seen
}

#[test]
fn bad_requests_get_an_error_and_the_agent_keeps_answering() {
    let _area = require_root("api");
    let sock = socket_path("bad");
    let _agent = AgentProc::start(&["--socket", &sock]);
    let ask = |payload: &[u8]| -> (String, String) {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(payload).unwrap();
        let mut r = BufReader::new(s);
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        (first, rest)
    };
    let (reply, rest) = ask(b"this is not json\n");
    assert!(
        reply.contains("\"ok\":false") && reply.contains("malformed request"),
        "{reply}"
    );
    assert_eq!(rest, "", "the connection is closed after an error");

    let (reply, _) = ask(b"{\"v\":9,\"cmd\":\"ports\"}\n");
    assert!(reply.contains("version mismatch"), "{reply}");

    let (reply, _) = ask(b"{\"v\":1,\"cmd\":\"conns\",\"state\":\"sleepy\"}\n");
    assert!(reply.contains("unknown state"), "{reply}");

    let big = vec![b'{'; 70_000];
    let (reply, _) = ask(&big);
    assert!(reply.contains("larger than 65536 bytes"), "{reply}");

    // Half a request: the agent waits a while, says why, and closes; others are served meanwhile.
    let started = Instant::now();
    let half = std::thread::spawn({
        let sock = sock.clone();
        move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"{\"v\":1,\"cmd\":").unwrap();
            let mut out = String::new();
            BufReader::new(s).read_line(&mut out).unwrap();
            out
        }
    });
    let (code, out, err) = cli(&["status", "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version:"), "{out}");
    assert!(
        started.elapsed() < patience(Duration::from_secs(2)),
        "status waited on the half request"
    );
    let reply = half.join().unwrap();
    assert!(reply.contains("incomplete request"), "{reply}");

    // Many requests on one connection, one reply each.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n{\"v\":1,\"cmd\":\"ports\"}\n")
        .unwrap();
    let mut r = BufReader::new(s);
    for want in ["\"status\"", "\"ports\""] {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(
            line.contains("\"ok\":true") && line.contains(want),
            "{line}"
        );
    }
}

#[test]
fn a_watch_that_cannot_keep_up_is_disconnected_with_a_reason() {
    let _area = require_root("api");
    let ns = Netns::new("slow");
    let sock = socket_path("slow");
    let agent = AgentProc::start(&["--socket", &sock]);
    let s = UnixStream::connect(&sock).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"{\"v\":1,\"cmd\":\"watch\"}\n").unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    assert!(first.contains("\"ok\":true"), "{first}");
    // Read nothing while 25,000 transitions happen: far more than a watcher may fall behind.
    ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", 7703)).unwrap();
        for _ in 0..2_500 {
            let (c, s) = connect_pair(&listener);
            drop(c);
            drop(s);
        }
    });
    // The event path did not wait for us: every transition was counted.
    let text = agent.metrics();
    assert_eq!(
        value(&text, "tcpstate_events_lost_total", &[("stage", "agent")]),
        Some(0.0)
    );
    // Reading again, the backlog comes, then the reason, then the end.
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut last = String::new();
    let mut events = 0;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.contains("\"event\"") {
                    events += 1;
                }
                last = line;
            }
            Err(e) => panic!("the agent neither sent the reason nor closed: {e}"),
        }
    }
    assert!(
        last.contains("\"ok\":false") && last.contains("could not keep up"),
        "{last}"
    );
    assert!(
        events < 25_000,
        "{events} events arrived: it was not cut off"
    );
}

#[test]
fn watchers_see_every_transition_through_reconciliations() {
    let _area = require_root("api");
    let ns = Netns::new("wrec");
    let sock = socket_path("wrec");
    // Reconciliations every 200 ms while the churn runs: each one drains the pending batches.
    let agent = AgentProc::start(&["--socket", &sock, "--reconcile-interval", "200ms"]);
    let port = 7704u16;
    let connections = 3_000usize;
    // Every connection makes ten transitions on this port (client CLOSE -> SYN_SENT ->
    // ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 -> CLOSE, server LISTEN -> SYN_RECV -> ESTABLISHED
    // -> CLOSE_WAIT -> LAST_ACK -> CLOSE), and the listener two.
    let expected = connections * 10 + 2;
    let s = UnixStream::connect(&sock).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(format!("{{\"v\":1,\"cmd\":\"watch\",\"port\":{port}}}\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    assert!(first.contains("\"ok\":true"), "{first}");
    // Under TCG a reconciliation can hold the table task for seconds: the quiet time that ends
    // the watch stretches with the patience.
    r.get_ref()
        .set_read_timeout(Some(patience(Duration::from_secs(3))))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut events = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return events,
                Ok(_) if line.contains("\"event\"") => events += 1,
                Ok(_) => panic!("the watch ended: {line}"),
            }
        }
    });
    let lost_before = kernel_losses(&agent.metrics());
    let runs_before = value(&agent.metrics(), "tcpstate_reconciliations_total", &[]).unwrap();
    ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let mut b = [0u8; 1];
        for _ in 0..connections {
            let (client, mut server) = connect_pair(&listener);
            drop(client);
            assert_eq!(server.read(&mut b).unwrap(), 0);
        }
    });
    // The reader stops 3 s (times the patience) after the last event.
    let events = reader.join().unwrap();
    let text = agent.metrics();
    let lost = kernel_losses(&text) - lost_before;
    let runs = value(&text, "tcpstate_reconciliations_total", &[]).unwrap() - runs_before;
    assert!(
        runs >= 2.0,
        "only {runs} reconciliations ran during the churn"
    );
    // Transitions the kernel did not deliver (counted, host-wide) are the only excuse.
    assert!(
        events <= expected && events as f64 + lost >= expected as f64,
        "watch saw {events} of {expected} transitions ({lost} lost in the kernel, {runs} reconciliations)\n{}",
        agent.loss_context()
    );
}

fn kernel_losses(text: &str) -> f64 {
    value(text, "tcpstate_events_lost_total", &[("stage", "kernel")]).unwrap_or(0.0)
}
