//! Findings from transition sequences, as the table and the detector see them.
use tcpstate_common::TcpState::*;

use super::*;
use crate::model::linger::{Detector, Thresholds};
use crate::model::table::{DEFAULT_EPHEMERAL, Table};
use crate::testing::tr;

const SEC: u64 = 1_000_000_000;

/// The doctor's findings at `now_ns`, after the linger detector looked.
fn findings(t: &mut Table, now_ns: u64) -> Vec<Finding> {
    let mut d = Detector::new(Thresholds::default());
    d.tick(t, now_ns);
    let view = View::of(t, &d, now_ns, true);
    let conns: Vec<Conn> = t.conns().map(|(_, c)| c.clone()).collect();
    let lingering: Vec<Conn> = conns.iter().filter(|c| c.lingering).cloned().collect();
    let listeners: Vec<Conn> = conns.iter().filter(|c| c.listener).cloned().collect();
    diagnose(&Evidence {
        view: &view,
        lingering: &lingering,
        listeners: &listeners,
    })
}

/// Server connections on `port` from `peer`, `n` of them, left in `state` at time 1 s.
fn server_conns(t: &mut Table, first: u64, n: u64, port: u16, peer: &str, state: TcpState) {
    for i in 0..n {
        let sock = first + i;
        let (l, r) = (format!("10.0.0.1:{port}"), format!("{peer}:{}", 40000 + i));
        t.apply(&tr(sock, SEC, Listen, SynRecv, &l, &r));
        t.apply(&tr(sock, SEC, SynRecv, Established, &l, &r));
        if state != Established {
            t.apply(&tr(sock, SEC, Established, state, &l, &r));
        }
    }
}

/// Client connections to 10.0.0.2:`port` opened by `pid` that go through `path`.
fn client_conns(t: &mut Table, first: u64, n: u64, port: u16, pid: u32, path: &[TcpState]) {
    for i in 0..n {
        let sock = first + i;
        let (l, r) = (
            format!("10.0.0.1:{}", 40000 + i),
            format!("10.0.0.2:{port}"),
        );
        t.apply(&tr(sock, SEC, Close, SynSent, "10.0.0.1:0", &r).with_pid(pid));
        let mut old = SynSent;
        for &new in path {
            t.apply(&tr(sock, SEC, old, new, &l, &r));
            old = new;
        }
    }
}

#[test]
fn a_quiet_host_has_no_findings() {
    let mut t = Table::new(64, DEFAULT_EPHEMERAL);
    t.apply(&tr(1, SEC, Close, Listen, "0.0.0.0:8080", "0.0.0.0:0"));
    server_conns(&mut t, 10, 20, 8080, "10.0.0.5", Established);
    client_conns(&mut t, 100, 20, 5432, 42, &[Established]);
    // Orderly closes are not findings, however many.
    client_conns(
        &mut t,
        200,
        50,
        80,
        42,
        &[Established, FinWait1, FinWait2, Close],
    );
    assert_eq!(findings(&mut t, 3600 * SEC), []);
}

#[test]
fn a_close_wait_leak_names_its_port_peers_age_and_sockets() {
    let mut t = Table::new(64, DEFAULT_EPHEMERAL);
    server_conns(&mut t, 10, 3, 8080, "10.0.0.5", CloseWait);
    server_conns(&mut t, 20, 1, 8080, "10.0.0.6", CloseWait);
    // Young ones are not lingering yet.
    let f = findings(&mut t, 30 * SEC);
    assert_eq!(f, []);
    let f = findings(&mut t, 301 * SEC);
    assert_eq!(f.len(), 1, "{f:?}");
    let f = &f[0];
    assert_eq!(
        (f.kind, f.severity, f.role, f.key),
        (
            Kind::CloseWaitLeak,
            Severity::Warning,
            Role::Server,
            PortKey::Port(8080)
        )
    );
    assert_eq!(f.count, 4);
    assert_eq!(f.oldest_seconds, Some(300.0));
    let peers: Vec<(String, u64)> = f.peers.iter().map(|(ip, n)| (ip.to_string(), *n)).collect();
    assert_eq!(
        peers,
        [("10.0.0.5".to_string(), 3), ("10.0.0.6".to_string(), 1)]
    );
    assert_eq!(
        f.what,
        "4 connections in CLOSE_WAIT for longer than 1 min 0 s; the oldest for 5 min 0 s"
    );
    assert!(f.why.contains("never times CLOSE_WAIT out"));
}

#[test]
fn the_most_severe_come_first_and_a_big_leak_is_critical() {
    let mut t = Table::new(64, DEFAULT_EPHEMERAL);
    server_conns(&mut t, 1000, 2, 9000, "10.0.0.5", CloseWait);
    server_conns(&mut t, 10, LINGERING_CRITICAL, 8080, "10.0.0.5", CloseWait);
    client_conns(
        &mut t,
        5000,
        3,
        7000,
        42,
        &[Established, FinWait1, FinWait2],
    );
    let f = findings(&mut t, 100 * SEC);
    let got: Vec<(Kind, Severity, u64)> = f.iter().map(|f| (f.kind, f.severity, f.count)).collect();
    assert_eq!(
        got,
        [
            (Kind::CloseWaitLeak, Severity::Critical, LINGERING_CRITICAL),
            (Kind::FinWait2Held, Severity::Warning, 3),
            (Kind::CloseWaitLeak, Severity::Warning, 2),
        ]
    );
    assert_eq!(f[1].pids, [42], "the client that opened them");
}

#[test]
fn resets_and_failed_connects_need_a_count_and_a_share() {
    let mut t = Table::new(64, DEFAULT_EPHEMERAL);
    // Port 80: 10 resets of 10 closes. Port 81: 9 resets, too few. Port 82: 10 resets among
    // 200 orderly closes, too small a share.
    client_conns(&mut t, 100, RESETS_MIN, 80, 42, &[Established, Close]);
    client_conns(&mut t, 200, RESETS_MIN - 1, 81, 42, &[Established, Close]);
    client_conns(&mut t, 300, RESETS_MIN, 82, 42, &[Established, Close]);
    client_conns(
        &mut t,
        400,
        200,
        82,
        42,
        &[Established, CloseWait, LastAck, Close],
    );
    // Port 90: 5 failed connects of 5; port 91: 4.
    client_conns(&mut t, 1000, FAILURES_MIN, 90, 43, &[Close]);
    client_conns(&mut t, 2000, FAILURES_MIN - 1, 91, 43, &[Close]);
    let f = findings(&mut t, 301 * SEC);
    type Row = (Kind, PortKey, u64, Option<f64>, Vec<u32>);
    let got: Vec<Row> = f
        .iter()
        .map(|f| (f.kind, f.key, f.count, f.share, f.pids.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (Kind::Resets, PortKey::Port(80), 10, Some(1.0), vec![42]),
            (
                Kind::ConnectFailures,
                PortKey::Port(90),
                5,
                Some(1.0),
                vec![43]
            ),
        ]
    );
    assert_eq!(
        f[0].what,
        "10 of 10 connections ended by a reset (100%), without the FIN exchange; 2.0 a minute over the 5 min 0 s the port has been counted"
    );
    assert_eq!(
        f[1].what,
        "5 of 5 connects failed (SYN_SENT -> CLOSE, 100%): refused, unreachable or timed out; 1.0 a minute over the 5 min 0 s the port has been counted"
    );
}

#[test]
fn server_findings_are_owned_by_the_listener() {
    let mut t = Table::new(64, DEFAULT_EPHEMERAL);
    t.apply(&tr(1, SEC, Close, Listen, "0.0.0.0:8080", "0.0.0.0:0"));
    let dump = [crate::model::event::KernelSocket {
        netns: 0,
        state: Listen,
        local: "0.0.0.0:8080".parse().unwrap(),
        remote: "0.0.0.0:0".parse().unwrap(),
        inode: 777,
        timewait: false,
        timer_left: None,
    }];
    t.reconcile(&dump, 0, SEC, std::time::Duration::from_secs(60));
    server_conns(&mut t, 10, RESETS_MIN, 8080, "10.0.0.5", Established);
    for i in 0..RESETS_MIN {
        let (l, r) = (
            "10.0.0.1:8080".to_string(),
            format!("10.0.0.5:{}", 40000 + i),
        );
        t.apply(&tr(10 + i, 2 * SEC, Established, Close, &l, &r));
    }
    let f = findings(&mut t, 3 * SEC);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!((f[0].kind, f[0].role), (Kind::Resets, Role::Server));
    assert_eq!(f[0].inodes, [777]);
}

#[test]
fn ephemeral_use_is_a_warning_at_half_the_range_and_critical_at_eighty_percent() {
    let mut t = Table::new(64, DEFAULT_EPHEMERAL);
    t.set_ephemeral_ranges([(0, 40000..=40099)]);
    let timewait = |local: u16, remote: &str| crate::model::event::KernelSocket {
        netns: 0,
        state: TimeWait,
        local: format!("10.0.0.1:{local}").parse().unwrap(),
        remote: remote.parse().unwrap(),
        inode: 0,
        timewait: true,
        timer_left: None,
    };
    let mut dump: Vec<_> = (0..85)
        .map(|i| timewait(40000 + i, "10.0.0.2:443"))
        .collect();
    dump.extend((0..50).map(|i| timewait(40000 + i, "10.0.0.3:80")));
    dump.extend((0..49).map(|i| timewait(40000 + i, "10.0.0.4:81")));
    t.reconcile(&dump, 0, SEC, std::time::Duration::from_secs(60));
    let f = findings(&mut t, 2 * SEC);
    let got: Vec<(Severity, PortKey, u64)> =
        f.iter().map(|f| (f.severity, f.key, f.count)).collect();
    assert_eq!(
        got,
        [
            (Severity::Critical, PortKey::Port(443), 85),
            (Severity::Warning, PortKey::Port(80), 50)
        ]
    );
    assert_eq!(
        f[0].what,
        "85 of 100 local ports (85%) in use toward 10.0.0.2:443, TIME_WAIT included"
    );
    assert!(f[0].fix.contains("tcp_tw_reuse"));
}

#[test]
fn ages_read_as_people_write_them() {
    assert_eq!(words::age(0.4), "0 s");
    assert_eq!(words::age(59.6), "1 min 0 s");
    assert_eq!(words::age(303.0), "5 min 3 s");
    assert_eq!(words::age(7800.0), "2 h 10 min");
}
