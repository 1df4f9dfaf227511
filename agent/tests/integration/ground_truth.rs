//! sock_diag ground truth against the real kernel: seeding at start, timewait sockets, repair
//! after lost events, owners. Needs root; fails (never skips) without it.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::support::*;

fn gauge(text: &str, name: &str, port: u16, role: &str, state: &str) -> Option<f64> {
    let p = port.to_string();
    value(
        text,
        name,
        &[("port", p.as_str()), ("role", role), ("state", state)],
    )
}

fn ss_count(ns: &Netns, port: u16, role: &str, state: &str) -> u64 {
    ns.ss_counts(port)
        .get(&(role.to_string(), state.to_string()))
        .copied()
        .unwrap_or(0)
}

#[test]
fn close_wait_leaked_before_start_is_seeded_at_once_with_its_owner() {
    let _area = require_root("ground_truth");
    let ns = Netns::new("seed");
    let port = 7601u16;
    // The leak exists before the agent.
    let (_listener, _servers) = ns.enter(|| leak_close_wait(port, 20));
    eventually(Duration::from_secs(2), || {
        match ss_count(&ns, port, "server", "close_wait") {
            20 => Ok(()),
            n => Err(format!("ss shows {n} in CLOSE_WAIT")),
        }
    });

    // Other tests' sockets may cross in the same pass: list every one.
    let agent = AgentProc::start(&["--linger-after", "500ms", "--linger-log-cap", "100000"]);
    let started = Instant::now();
    let text = eventually(Duration::from_secs(1), || {
        let text = agent.metrics();
        match gauge(&text, "tcpstate_connections", port, "server", "close_wait") {
            Some(20.0) => Ok(text),
            other => Err(format!("close_wait {other:?}")),
        }
    });
    assert!(started.elapsed() < patience(Duration::from_secs(1)));
    // Seeded counts are per role and state, host-wide (other tests' sockets included).
    let seeded = value(
        &text,
        "tcpstate_seeded_connections",
        &[("role", "server"), ("state", "close_wait")],
    );
    assert!(
        seeded.is_some_and(|n| n >= 20.0),
        "flagged as seeded (their age is a lower bound): {seeded:?}"
    );
    assert_eq!(
        gauge(&text, "tcpstate_connections", port, "server", "listen"),
        Some(1.0)
    );

    // Past the threshold (counted from the agent's start), each warning names the owner.
    let warned = eventually(Duration::from_secs(5), || {
        let w: Vec<_> = agent
            .log_records()
            .into_iter()
            .filter(|r| {
                r["fields"]["message"] == "connection lingering in CLOSE_WAIT"
                    && r["fields"]["port"] == port
            })
            .collect();
        if w.len() == 20 {
            Ok(w)
        } else {
            Err(format!("{} warnings", w.len()))
        }
    });
    for w in &warned {
        let f = &w["fields"];
        assert_eq!(f["owner_pid"], std::process::id(), "{w}");
        assert_eq!(f["age_is_lower_bound"], true, "{w}");
        assert_ne!(f["inode"], 0, "{w}");
        assert!(!f["owner_comm"].as_str().unwrap().is_empty(), "{w}");
    }
}

/// 4 orphaned FIN_WAIT2 client sockets on `fw_port` (the client closes, the server keeps its
/// end and never closes), and 100 TIME_WAIT client sockets on `tw_port` (the client closes
/// first, then the server). Returns what must stay open.
fn orphans_and_time_wait(fw_port: u16, tw_port: u16) -> (TcpListener, Vec<TcpStream>, TcpListener) {
    let fw_listener = TcpListener::bind(("127.0.0.1", fw_port)).unwrap();
    let fw_servers: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (client, server) = connect_pair(&fw_listener);
            drop(client);
            server
        })
        .collect();
    let tw_listener = TcpListener::bind(("127.0.0.1", tw_port)).unwrap();
    let mut buf = [0u8; 1];
    for _ in 0..100 {
        let (client, mut server) = connect_pair(&tw_listener);
        drop(client);
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        drop(server);
    }
    (fw_listener, fw_servers, tw_listener)
}

#[test]
fn orphaned_fin_wait2_and_time_wait_are_counted_from_the_dump() {
    let _area = require_root("ground_truth");
    let ns = Netns::new("tw");
    let agent = AgentProc::start(&["--reconcile-interval", "500ms"]);
    let (fw_port, tw_port) = (7602u16, 7603u16);
    let _held = ns.enter(|| orphans_and_time_wait(fw_port, tw_port));

    eventually(Duration::from_secs(5), || {
        let text = agent.metrics();
        let fw = gauge(
            &text,
            "tcpstate_connections",
            fw_port,
            "client",
            "fin_wait2",
        );
        let tw = gauge(
            &text,
            "tcpstate_connections",
            tw_port,
            "client",
            "time_wait",
        );
        let (ss_fw, ss_tw) = (
            ss_count(&ns, fw_port, "client", "fin_wait2"),
            ss_count(&ns, tw_port, "client", "time_wait"),
        );
        if ss_fw != 4 || ss_tw != 100 {
            return Err(format!("ss: {ss_fw} FIN-WAIT-2, {ss_tw} TIME-WAIT"));
        }
        if fw == Some(ss_fw as f64) && tw == Some(ss_tw as f64) {
            Ok(())
        } else {
            Err(format!(
                "tcpstate: fin_wait2 {fw:?} (ss {ss_fw}), time_wait {tw:?} (ss {ss_tw})"
            ))
        }
    });
    // The server ends of the orphans are full sockets in CLOSE_WAIT, seen by the tracepoint.
    let text = agent.metrics();
    assert_eq!(
        gauge(
            &text,
            "tcpstate_connections",
            fw_port,
            "server",
            "close_wait"
        ),
        Some(4.0)
    );
    assert_eq!(
        gauge(
            &text,
            "tcpstate_connections",
            tw_port,
            "server",
            "time_wait"
        ),
        None,
        "the server side never held TIME_WAIT here: no series"
    );
}

#[test]
fn after_forced_loss_one_reconciliation_restores_the_counts() {
    let _area = require_root("ground_truth");
    let ns = Netns::new("loss");
    // A ring of one page (about 50 events) drained every 10 ms cannot take a burst.
    let agent = AgentProc::start(&["--ring-size", "4096", "--reconcile-interval", "2s"]);
    let port = 7604u16;
    let _held = stalled_burst(&agent, &ns, port);

    let ss_now = || ns.ss_counts(port);
    eventually(Duration::from_secs(6), || {
        let ours = agent_counts(&agent.metrics(), port);
        let ss = ss_now();
        if ours == ss {
            Ok(())
        } else {
            Err(format!("tcpstate {ours:?}\n      ss {ss:?}"))
        }
    });
    let text = agent.metrics();
    let corrected: f64 = ["stale", "missing", "state"]
        .iter()
        .filter_map(|k| {
            value(
                &text,
                "tcpstate_reconcile_corrections_total",
                &[("kind", k)],
            )
        })
        .sum();
    assert!(corrected > 0.0, "the repair is counted");
}

/// 600 connections at once on `port`: a third ESTABLISHED, a third half-closed by the client,
/// a third by the server. Far more events than a one-page ring holds.
fn burst(port: u16) -> (TcpListener, Vec<std::net::TcpStream>) {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut held = Vec::new();
    for i in 0..600 {
        let (c, s) = connect_pair(&listener);
        match i % 3 {
            0 => {}
            1 => c.shutdown(Shutdown::Write).unwrap(),
            _ => s.shutdown(Shutdown::Write).unwrap(),
        }
        held.extend([c, s]);
    }
    (listener, held)
}

/// A [`burst`] while the agent is stopped (SIGSTOP), so that its reader cannot keep up however
/// slow the machine (under qemu's TCG a 10 ms drain outpaces the burst): the one-page ring must
/// overflow, and the kernel counts the loss.
fn stalled_burst(
    agent: &AgentProc,
    ns: &Netns,
    port: u16,
) -> (TcpListener, Vec<std::net::TcpStream>) {
    agent.signal("STOP").unwrap();
    let held = ns.enter(|| burst(port));
    agent.signal("CONT").unwrap();
    eventually(Duration::from_secs(5), || {
        let lost = value(
            &agent.metrics(),
            "tcpstate_events_lost_total",
            &[("stage", "kernel")],
        )
        .unwrap_or(0.0);
        if lost > 0.0 {
            Ok(())
        } else {
            Err("the burst did not overflow the ring: 0 lost".to_string())
        }
    });
    held
}

#[test]
fn a_kernel_loss_brings_the_next_reconciliation_forward() {
    let _area = require_root("ground_truth");
    let ns = Netns::new("early");
    // An hour between reconciliations: only the early one can repair the loss in time.
    let agent = AgentProc::start(&["--ring-size", "4096", "--reconcile-interval", "1h"]);
    let port = 7605u16;
    let _held = stalled_burst(&agent, &ns, port);

    // Seeding ran at start; the early dump follows at most 5 s after it (plus the 1 s poll).
    eventually(Duration::from_secs(12), || {
        let ours = agent_counts(&agent.metrics(), port);
        let ss = ns.ss_counts(port);
        if ours == ss {
            Ok(())
        } else {
            Err(format!("tcpstate {ours:?}\n      ss {ss:?}"))
        }
    });
    let early = agent
        .log_records()
        .into_iter()
        .filter(|r| {
            r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the kernel lost transitions; reconciling now"))
        })
        .count();
    assert!(early >= 1, "the early reconciliation is logged");
}

/// Counts of `tcpstate_connections` for one port and one namespace (the `netns` label).
fn counts_in(
    text: &str,
    port: u16,
    netns: u32,
) -> std::collections::BTreeMap<(String, String), u64> {
    let (port, netns) = (port.to_string(), netns.to_string());
    samples(text, "tcpstate_connections")
        .into_iter()
        .filter(|(l, v)| l["port"] == port && l.get("netns") == Some(&netns) && *v > 0.0)
        .map(|(l, v)| ((l["role"].clone(), l["state"].clone()), v as u64))
        .collect()
}

#[test]
fn two_namespaces_on_the_same_port_are_counted_apart_with_per_netns() {
    let _area = require_root("ground_truth");
    let (a, b) = (Netns::new("nsa"), Netns::new("nsb"));
    let inode = |ns: &Netns| {
        tcpstate::kernel::sockdiag::netns_inode(std::path::Path::new(&format!(
            "/run/netns/{}",
            ns.name
        )))
        .unwrap()
    };
    let agent = AgentProc::start(&["--per-netns", "--reconcile-interval", "1s"]);
    let port = 7608u16;
    let leak = |n: usize| {
        move || {
            let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
            let mut held = Vec::new();
            for _ in 0..n {
                let (client, server) = connect_pair(&listener);
                client.shutdown(Shutdown::Write).unwrap();
                held.extend([client, server]);
            }
            let (c, s) = connect_pair(&listener);
            held.extend([c, s]);
            (listener, held)
        }
    };
    let _held_a = a.enter(leak(2));
    let _held_b = b.enter(leak(5));
    for (ns, leaked) in [(&a, 2u64), (&b, 5u64)] {
        let id = inode(ns);
        eventually(Duration::from_secs(4), || {
            let ours = counts_in(&agent.metrics(), port, id);
            let ss = ns.ss_counts(port);
            if ss.get(&("server".into(), "close_wait".into())) != Some(&leaked) {
                return Err(format!("{}: ss {ss:?}", ns.name));
            }
            if ours == ss {
                Ok(())
            } else {
                Err(format!("{}: tcpstate {ours:?}, ss {ss:?}", ns.name))
            }
        });
    }
    // Without the label there would be one series per port; with it, none lacks the namespace.
    let text = agent.metrics();
    assert!(
        samples(&text, "tcpstate_connections")
            .iter()
            .filter(|(l, _)| l["port"] == port.to_string())
            .all(|(l, _)| l.contains_key("netns"))
    );
}

#[test]
fn a_burst_whose_server_closed_first_leaves_room_for_a_new_service() {
    let _area = require_root("ground_truth");
    let ns = Netns::new("burst");
    let (burst_port, new_port) = (7606u16, 7607u16);
    // A server that closes first leaves TIME_WAIT on its own side: 1,000 sockets whose peers
    // are 1,000 ephemeral ports, more than the default budget of 512 ports per role.
    ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", burst_port)).unwrap();
        let mut buf = [0u8; 1];
        for _ in 0..1_000 {
            let (mut client, server) = connect_pair(&listener);
            drop(server);
            assert_eq!(client.read(&mut buf).unwrap(), 0);
        }
        // The listener exits with the burst.
    });
    let tw = ss_count(&ns, burst_port, "server", "time_wait");
    assert!(tw >= 500, "the burst left only {tw} TIME_WAIT sockets");

    let mut agent = AgentProc::start(&[]);
    // The burst's TIME_WAIT sockets are counted by the first dump: wait for it, or the new
    // service's events can be scraped before it is applied.
    agent.wait_seeded();
    // A new service, after the agent started.
    let (_listener, _pairs) = ns.enter(|| {
        let listener = TcpListener::bind(("127.0.0.1", new_port)).unwrap();
        let pairs: Vec<_> = (0..5).map(|_| connect_pair(&listener)).collect();
        (listener, pairs)
    });
    let text = eventually(Duration::from_secs(5), || {
        let text = agent.metrics();
        let counts = (
            gauge(
                &text,
                "tcpstate_connections",
                new_port,
                "server",
                "established",
            ),
            gauge(
                &text,
                "tcpstate_connections",
                new_port,
                "client",
                "established",
            ),
        );
        match counts {
            (Some(5.0), Some(5.0)) => Ok(text),
            other => Err(format!(
                "new service (server, client) established: {other:?}"
            )),
        }
    });
    // The burst's TIME_WAIT sockets are the burst port's server side, as ss says, not clients
    // of the peers' ephemeral ports.
    let agent_tw = gauge(
        &text,
        "tcpstate_connections",
        burst_port,
        "server",
        "time_wait",
    );
    let ss_tw = ss_count(&ns, burst_port, "server", "time_wait");
    assert!(
        agent_tw.is_some_and(|n| (n - ss_tw as f64).abs() <= 5.0),
        "burst port TIME_WAIT: agent {agent_tw:?}, ss {ss_tw}"
    );
    let client_ports = value(&text, "tcpstate_tracked_ports", &[("role", "client")]).unwrap();
    assert!(
        client_ports < 100.0,
        "{client_ports} client ports tracked: the burst's peers were taken for services"
    );
    assert!(
        !text.contains("tcpstate_connections{port=\"other\",role=\"client\""),
        "client connections were folded into other"
    );
}

/// `n` connections on `port` that close one after the other: the client first (its side keeps
/// the TIME_WAIT socket), or the server first (the server's side does).
fn short_connections(port: u16, n: usize, client_first: bool) -> TcpListener {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 1];
    for _ in 0..n {
        let (mut client, mut server) = connect_pair(&listener);
        let (first, second) = if client_first {
            (client, &mut server)
        } else {
            (server, &mut client)
        };
        drop(first);
        // The second closes after reading the first's FIN: an orderly close.
        assert_eq!(second.read(&mut buf).unwrap(), 0);
    }
    listener
}

#[test]
fn time_wait_is_counted_as_the_kernel_makes_it_within_a_second_of_ss() {
    let _area = require_root("ground_truth");
    let ns = Netns::new("livetw");
    // An hour between dumps: only the transitions can count these in time.
    let mut agent = AgentProc::start(&["--reconcile-interval", "1h"]);
    agent.wait_seeded();
    let (client_port, server_port) = (7608u16, 7609u16);
    let _listeners = ns.enter(|| {
        (
            short_connections(client_port, 300, true),
            short_connections(server_port, 200, false),
        )
    });
    let burst_end = Instant::now();
    let expected = [
        (client_port, "client", 300u64),
        (server_port, "server", 200u64),
    ];
    for (port, role, n) in expected {
        assert_eq!(
            ss_count(&ns, port, role, "time_wait"),
            n,
            "ss, {role} {port}"
        );
    }
    // Within a second of the burst (scaled for slow emulated kernels), what ss shows.
    eventually(Duration::from_secs(1), || {
        let text = agent.metrics();
        for (port, role, n) in expected {
            let ours = gauge(&text, "tcpstate_connections", port, role, "time_wait");
            if ours != Some(n as f64) {
                return Err(format!("{role} {port}: tcpstate {ours:?}, ss {n}"));
            }
        }
        Ok(())
    });
    eprintln!(
        "TIME_WAIT counted {:?} after the burst",
        burst_end.elapsed()
    );
    let text = agent.metrics();
    assert_eq!(
        value(&text, "tcpstate_reconciliations_total", &[]),
        Some(1.0),
        "only the seeding dump ran: the events counted them"
    );
    // No TIME_WAIT on the sides that closed second.
    assert_eq!(
        gauge(
            &text,
            "tcpstate_connections",
            client_port,
            "server",
            "time_wait"
        ),
        None
    );
    assert_eq!(
        gauge(
            &text,
            "tcpstate_connections",
            server_port,
            "client",
            "time_wait"
        ),
        None
    );
}
