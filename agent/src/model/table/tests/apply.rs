//! Events: opens, lifecycles, losses, first sightings.
use super::*;

#[test]
fn active_open_is_a_client_of_the_remote_port() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    assert_eq!(current(&t, Role::Client, 80, SynSent), 1);
    t.apply(&tr(
        SOCK_A,
        2,
        SynSent,
        Established,
        "10.0.0.1:40000",
        "10.0.0.2:80",
    ));
    assert_eq!(current(&t, Role::Client, 80, SynSent), 0);
    assert_eq!(current(&t, Role::Client, 80, Established), 1);
    let c = t.get(SOCK_A).unwrap();
    assert_eq!(c.local.addr(), "10.0.0.1:40000".parse().unwrap());
    assert_eq!((c.role, c.service_port, c.pid), (Role::Client, 80, 7));
}

#[test]
fn passive_open_is_a_server_of_the_local_port_and_leaves_the_listener_alone() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1, Close, Listen, "0.0.0.0:8080", "0.0.0.0:0"));
    t.apply(&tr(
        SOCK_B,
        2,
        Listen,
        SynRecv,
        "10.0.0.2:8080",
        "10.0.0.1:0",
    ));
    assert_eq!(current(&t, Role::Server, 8080, Listen), 1);
    assert_eq!(current(&t, Role::Server, 8080, SynRecv), 1);
    t.apply(&tr(
        SOCK_B,
        3,
        SynRecv,
        Established,
        "10.0.0.2:8080",
        "10.0.0.1:40000",
    ));
    t.apply(&tr(
        SOCK_B,
        4,
        Established,
        CloseWait,
        "10.0.0.2:8080",
        "10.0.0.1:40000",
    ));
    assert_eq!(current(&t, Role::Server, 8080, CloseWait), 1);
    assert_eq!(current(&t, Role::Server, 8080, Listen), 1);
    assert_eq!(t.get(SOCK_B).unwrap().remote.port(), 40000);
    assert_eq!(t.len(), 2);
}

#[test]
fn a_full_lifecycle_counts_transitions_durations_and_lifetime() {
    let mut t = table();
    client_lifecycle(&mut t, SOCK_A);
    assert!(t.is_empty());
    let s = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert_eq!(s.current, [0; STATES]);
    assert_eq!(s.transitions[Close.index()][SynSent.index()], 1);
    assert_eq!(s.transitions[Established.index()][FinWait1.index()], 1);
    assert_eq!(s.transitions[FinWait2.index()][Close.index()], 1);
    let est = &s.state_durations[Established.index()];
    assert_eq!(est.count, 1);
    assert!((est.sum_seconds - 0.3).abs() < 1e-9);
    // 0.3 s lands in the 1 s bucket (index 5), not the 0.25 s one.
    assert_eq!(est.buckets[4], 0);
    assert_eq!(est.buckets[5], 1);
    assert_eq!(s.lifetimes.count, 1);
    assert!((s.lifetimes.sum_seconds - 0.300_003).abs() < 1e-9);
}

#[test]
fn skaddr_reuse_after_close_starts_a_new_connection() {
    let mut t = table();
    client_lifecycle(&mut t, SOCK_A);
    client_lifecycle(&mut t, SOCK_A);
    let s = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert_eq!(s.lifetimes.count, 2);
    assert_eq!(t.counters().stale_replaced, 0);
    assert_eq!(t.counters().state_mismatches, 0);
}

#[test]
fn skaddr_reuse_with_a_lost_close_replaces_the_stale_entry() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    t.apply(&tr(
        SOCK_A,
        2,
        SynSent,
        Established,
        "10.0.0.1:40000",
        "10.0.0.2:80",
    ));
    // Its -> CLOSE was lost; the address is reused by a passive open on another port.
    t.apply(&tr(SOCK_A, 3, Listen, SynRecv, "10.0.0.1:22", "10.0.0.9:0"));
    assert_eq!(current(&t, Role::Client, 80, Established), 0);
    assert_eq!(current(&t, Role::Server, 22, SynRecv), 1);
    assert_eq!(t.counters().stale_replaced, 1);
    assert_eq!(t.len(), 1);
}

#[test]
fn a_lost_event_is_counted_and_the_table_follows_the_kernel() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    // SYN_SENT -> ESTABLISHED lost.
    t.apply(&tr(
        SOCK_A,
        3,
        Established,
        FinWait1,
        "10.0.0.1:40000",
        "10.0.0.2:80",
    ));
    assert_eq!(t.counters().state_mismatches, 1);
    assert_eq!(current(&t, Role::Client, 80, SynSent), 0);
    assert_eq!(current(&t, Role::Client, 80, FinWait1), 1);
}

#[test]
fn out_of_order_first_sightings_infer_the_role() {
    let mut t = table();
    // A server socket accepted before the agent started, seen first at CLOSE_WAIT.
    t.apply(
        &tr(
            SOCK_A,
            5,
            Established,
            CloseWait,
            "10.0.0.2:8080",
            "10.0.0.1:45000",
        )
        .with_prev(0),
    );
    assert_eq!(current(&t, Role::Server, 8080, CloseWait), 1);
    // A client socket seen first when it closes: counted as a transition, not tracked.
    t.apply(&tr(
        SOCK_B,
        6,
        FinWait2,
        Close,
        "10.0.0.1:50000",
        "10.0.0.3:443",
    ));
    assert_eq!(t.len(), 1);
    let s = t.stats(Role::Client, PortKey::Port(443)).unwrap();
    assert_eq!(s.transitions[FinWait2.index()][Close.index()], 1);
    assert_eq!(s.current, [0; STATES]);
    assert_eq!(t.counters().first_seen_midlife, 2);
    // A listening port seen later makes its sockets servers even in the ephemeral range.
    t.apply(&tr(0x3000, 7, Close, Listen, "0.0.0.0:40001", "0.0.0.0:0"));
    t.apply(&tr(
        0x4000,
        8,
        Established,
        CloseWait,
        "10.0.0.2:40001",
        "10.0.0.1:50001",
    ));
    assert_eq!(current(&t, Role::Server, 40001, CloseWait), 1);
}

#[test]
fn the_mid_life_sighting_without_an_open_has_no_lifetime() {
    let mut t = table();
    t.apply(&tr(
        SOCK_A,
        5,
        Established,
        FinWait1,
        "10.0.0.1:45000",
        "10.0.0.2:80",
    ));
    t.apply(&tr(
        SOCK_A,
        6,
        FinWait1,
        FinWait2,
        "10.0.0.1:45000",
        "10.0.0.2:80",
    ));
    t.apply(&tr(
        SOCK_A,
        9,
        FinWait2,
        Close,
        "10.0.0.1:45000",
        "10.0.0.2:80",
    ));
    let s = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert_eq!(s.lifetimes.count, 0);
    // Our own clock fills in the FIN_WAIT2 duration the program did not report.
    assert_eq!(s.state_durations[FinWait2.index()].count, 1);
    assert!(t.is_empty());
}

#[test]
fn a_self_transition_counts_but_keeps_the_state_and_its_age() {
    let mut t = table();
    let (c, s) = ("10.0.0.1:40000", "10.0.0.2:80");
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", s));
    t.apply(&tr(SOCK_A, 2, SynSent, Established, c, s));
    t.apply(&tr(SOCK_A, 3, Established, FinWait1, c, s));
    t.apply(&tr(SOCK_A, 4, FinWait1, FinWait2, c, s));
    // The application closes the half-closed socket: FIN_WAIT2 -> FIN_WAIT2.
    t.apply(&tr(SOCK_A, 9, FinWait2, FinWait2, c, s).with_prev(5));
    let conn = t.get(SOCK_A).unwrap();
    assert_eq!((conn.state, conn.since_ns), (FinWait2, 4));
    let st = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert_eq!(st.transitions[FinWait2.index()][FinWait2.index()], 1);
    assert_eq!(st.current[FinWait2.index()], 1);
    assert_eq!(st.state_durations[FinWait2.index()].count, 0);
    assert_eq!(t.counters().state_mismatches, 0);
    t.apply(&tr(SOCK_A, 10, FinWait2, Close, c, s).with_prev(6));
    let st = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert_eq!(st.state_durations[FinWait2.index()].count, 1);
    assert!(t.is_empty());
}

#[test]
fn listeners_count_as_listen_and_leave_cleanly() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1, Close, Listen, "[::]:443", "[::]:0"));
    assert_eq!(current(&t, Role::Server, 443, Listen), 1);
    t.apply(&tr(
        SOCK_A,
        2_000_000_000,
        Listen,
        Close,
        "[::]:443",
        "[::]:0",
    ));
    assert_eq!(current(&t, Role::Server, 443, Listen), 0);
    let s = t.stats(Role::Server, PortKey::Port(443)).unwrap();
    assert_eq!(s.lifetimes.count, 0, "a listener is not a connection");
    assert!(t.is_empty());
}

#[test]
fn ports_beyond_the_limit_go_to_other() {
    let mut t = Table::new(2, DEFAULT_EPHEMERAL);
    for (i, port) in [80u16, 443, 8080, 9000].iter().enumerate() {
        t.apply(&tr(
            i as u64 + 1,
            1,
            Close,
            SynSent,
            "10.0.0.1:0",
            &format!("10.0.0.2:{port}"),
        ));
    }
    assert_eq!(current(&t, Role::Client, 80, SynSent), 1);
    assert_eq!(current(&t, Role::Client, 443, SynSent), 1);
    assert_eq!(
        t.stats(Role::Client, PortKey::Other).unwrap().current[SynSent.index()],
        2
    );
    // The limit is per role: a server port is still tracked.
    t.apply(&tr(99, 1, Close, Listen, "0.0.0.0:9000", "0.0.0.0:0"));
    assert_eq!(current(&t, Role::Server, 9000, Listen), 1);
    // Leaving works for connections counted under other.
    t.apply(&tr(3, 2, SynSent, Close, "10.0.0.1:0", "10.0.0.2:8080"));
    assert_eq!(
        t.stats(Role::Client, PortKey::Other).unwrap().current[SynSent.index()],
        1
    );
}
