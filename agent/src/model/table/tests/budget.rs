//! Per-port aggregates and the port budget: namespaces, histograms, retirement, eviction.
use super::*;

#[test]
fn per_netns_keeps_namespaces_apart_and_bounds_ports_per_pair() {
    let mut t = Table::new(2, DEFAULT_EPHEMERAL)
        .per_netns(true)
        .netns_in_events(true);
    let mut open = |sock, netns, port: u16| {
        let mut e = tr(
            sock,
            1,
            Close,
            Listen,
            &format!("0.0.0.0:{port}"),
            "0.0.0.0:0",
        );
        e.netns = netns;
        t.apply(&e);
    };
    open(1, 100, 8080);
    open(2, 200, 8080);
    open(3, 200, 9090);
    let keys: Vec<_> = t.snapshot().ports.iter().map(|(_, k, _)| *k).collect();
    assert_eq!(
        keys,
        vec![
            PortKey::NsPort(100, 8080),
            PortKey::NsPort(200, 8080),
            PortKey::NsOther(200)
        ],
        "two (namespace, port) pairs tracked, the third under other"
    );
    assert_eq!(PortKey::NsPort(100, 8080).label(), "8080");
    assert_eq!(PortKey::NsOther(7).netns(), Some(7));
    assert_eq!(PortKey::Port(1).netns(), None);
}

#[test]
fn histogram_buckets_are_inclusive_upper_bounds() {
    let mut h = Hist::default();
    h.observe_ns(100_000); // exactly 100 µs
    h.observe_ns(100_001);
    h.observe_ns(7_200_000_000_000); // 2 h: only +Inf
    assert_eq!(h.buckets[0], 1);
    assert_eq!(h.buckets[1], 1);
    assert_eq!(h.count, 3);
    let c = h.cumulative();
    assert_eq!(c[0], 1);
    assert_eq!(c[BUCKETS - 1], 2);
}

#[test]
fn snapshot_is_sorted_and_complete() {
    let mut t = table();
    t.apply(&tr(1, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:443"));
    t.apply(&tr(2, 1, Close, Listen, "0.0.0.0:22", "0.0.0.0:0"));
    t.apply(&tr(3, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    let s = t.snapshot();
    let keys: Vec<_> = s.ports.iter().map(|(r, k, _)| (*r, *k)).collect();
    assert_eq!(
        keys,
        vec![
            (Role::Server, PortKey::Port(22)),
            (Role::Client, PortKey::Port(80)),
            (Role::Client, PortKey::Port(443)),
        ]
    );
    assert_eq!(s.tracked_sockets, 3);
    assert_eq!(s.counters.applied, 3);
}

#[test]
fn idle_ports_give_their_slot_back_and_busy_ones_keep_it() {
    let mut t = Table::new(2, DEFAULT_EPHEMERAL);
    client_lifecycle(&mut t, SOCK_A); // port 80, closed at ~0.3 s
    t.apply(&tr(SOCK_B, SEC, Close, Listen, "0.0.0.0:22", "0.0.0.0:0"));
    let idle = 300 * SEC;
    assert_eq!(t.retire_idle(200 * SEC, idle), 0, "not idle long enough");
    assert_eq!(t.retire_idle(301 * SEC, idle), 1, "80 retires");
    assert!(t.stats(Role::Client, PortKey::Port(80)).is_none());
    // The listener holds a socket: it stays whatever the time.
    assert_eq!(t.retire_idle(10_000 * SEC, idle), 0);
    assert_eq!(current(&t, Role::Server, 22, Listen), 1);
    assert_eq!(t.counters().ports_retired, 1);
    // The slot is free again, and the port's counters start from zero.
    t.apply(&tr(
        3,
        10_001 * SEC,
        Close,
        SynSent,
        "10.0.0.1:0",
        "10.0.0.2:80",
    ));
    let s = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert_eq!(s.transitions[Close.index()][SynSent.index()], 1);
    assert_eq!(t.snapshot().ports_tracked, [1, 1]);
    // Timewait sockets hold a port too, until the kernel's timer (60 s) runs out.
    let mut t = Table::new(2, DEFAULT_EPHEMERAL);
    t.reconcile(
        &[timewait("10.0.0.1:8080", "10.0.0.2:40000")],
        SEC,
        SEC,
        FIN,
    );
    let idle = 30 * SEC;
    assert_eq!(t.retire_idle(60 * SEC, idle), 0);
    assert_eq!(t.retire_idle(61 * SEC, idle), 1);
}

#[test]
fn ports_that_matter_take_the_slots_of_ports_without_connections() {
    let mut t = Table::new(2, DEFAULT_EPHEMERAL);
    // Two server ports known only from TIME_WAIT sockets fill the budget.
    t.reconcile(
        &[
            timewait("10.0.0.1:7001", "10.0.0.2:40000"),
            timewait("10.0.0.1:7002", "10.0.0.2:40001"),
        ],
        SEC,
        SEC,
        FIN,
    );
    assert_eq!(t.snapshot().ports_tracked[Role::Server as usize], 2);
    // A third port with only TIME_WAIT does not push them out.
    t.reconcile(
        &[
            timewait("10.0.0.1:7001", "10.0.0.2:40000"),
            timewait("10.0.0.1:7002", "10.0.0.2:40001"),
            timewait("10.0.0.1:7003", "10.0.0.2:40002"),
        ],
        2 * SEC,
        2 * SEC,
        FIN,
    );
    assert!(t.stats(Role::Server, PortKey::Other).is_some());
    assert!(t.stats(Role::Server, PortKey::Port(7003)).is_none());
    // A listener does: it takes the least recently active one's slot.
    t.apply(&tr(1, 3 * SEC, Close, Listen, "0.0.0.0:443", "0.0.0.0:0"));
    assert_eq!(current(&t, Role::Server, 443, Listen), 1);
    assert_eq!(t.counters().ports_evicted, 1);
    let snap = t.snapshot();
    let tw_total: u64 = snap
        .ports
        .iter()
        .map(|(_, _, s)| s.current[TimeWait.index()])
        .sum();
    assert_eq!(
        tw_total, 3,
        "the evicted port's TIME_WAIT moved to other, none lost"
    );
    // A port with an established connection is never evicted: a further listener goes
    // to other once only such ports are left.
    t.apply(&tr(
        2,
        4 * SEC,
        Listen,
        SynRecv,
        "10.0.0.1:443",
        "10.0.0.9:50000",
    ));
    t.apply(&tr(
        2,
        4 * SEC,
        SynRecv,
        Established,
        "10.0.0.1:443",
        "10.0.0.9:50000",
    ));
    t.apply(&tr(3, 6 * SEC, Close, Listen, "0.0.0.0:8443", "0.0.0.0:0"));
    assert_eq!(
        current(&t, Role::Server, 8443, Listen),
        1,
        "took the TIME_WAIT port's slot"
    );
    t.apply(&tr(4, 8 * SEC, Close, Listen, "0.0.0.0:9443", "0.0.0.0:0"));
    assert!(t.stats(Role::Server, PortKey::Port(9443)).is_none());
    assert_eq!(current(&t, Role::Server, 443, Established), 1);
    assert_eq!(current(&t, Role::Server, 8443, Listen), 1);
    assert_eq!(
        t.stats(Role::Server, PortKey::Other).unwrap().current[Listen.index()],
        1
    );
}

#[test]
fn histograms_are_per_port_for_the_first_ports_then_folded_into_other() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL)
        .histogram_ports(1)
        .duration_states(StateSet::of(&[SynSent]));
    for (sock, port) in [(1u64, 80u16), (2, 443), (3, 8080)] {
        let remote = format!("10.0.0.2:{port}");
        t.apply(&tr(sock, 0, Close, SynSent, "10.0.0.1:0", &remote));
        t.apply(&tr(sock, 1_000, SynSent, Established, "10.0.0.1:40000", &remote).with_prev(1_000));
        // ESTABLISHED is not a duration state: not observed anywhere.
        t.apply(
            &tr(
                sock,
                2_000,
                Established,
                FinWait1,
                "10.0.0.1:40000",
                &remote,
            )
            .with_prev(1_000),
        );
    }
    let own = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    assert!(own.histograms);
    assert_eq!(own.state_durations[SynSent.index()].count, 1);
    assert_eq!(own.state_durations[Established.index()].count, 0);
    for port in [443, 8080] {
        let s = t.stats(Role::Client, PortKey::Port(port)).unwrap();
        assert!(!s.histograms);
        assert_eq!(s.state_durations[SynSent.index()].count, 0);
        // Its gauges and transitions stay its own.
        assert_eq!(s.current[FinWait1.index()], 1);
    }
    let other = t.stats(Role::Client, PortKey::Other).unwrap();
    assert_eq!(other.state_durations[SynSent.index()].count, 2);
    assert_eq!(
        other.current, [0; STATES],
        "other holds no socket of its own"
    );
}

#[test]
fn seen_states_are_remembered_until_the_port_retires() {
    let mut t = table();
    client_lifecycle(&mut t, SOCK_A);
    let s = t.stats(Role::Client, PortKey::Port(80)).unwrap();
    let seen: Vec<_> = s.seen.states().collect();
    // FIN_WAIT2 -> CLOSE left a TIME_WAIT socket behind.
    assert_eq!(
        seen,
        vec![Established, SynSent, FinWait1, FinWait2, TimeWait]
    );
    let mut timewait = [0; STATES];
    timewait[TimeWait.index()] = 1;
    assert_eq!(t.snapshot().ports[0].2.current, timewait);
    assert_eq!(s.current, [0; STATES]);
}

#[test]
fn a_connection_stays_small() {
    // Held once per socket of the host: 100,000 connections on loopback are 200,000.
    assert!(
        std::mem::size_of::<Conn>() <= 88,
        "{}",
        std::mem::size_of::<Conn>()
    );
}
