//! sock_diag dumps: seeding, repair, races, timewait sockets, dump roles.
use super::*;

#[test]
fn seeding_adds_every_full_socket_with_its_role_and_marks_it() {
    let mut t = table();
    let dump = [
        diag(Listen, "0.0.0.0:8080", "0.0.0.0:0"),
        diag(CloseWait, "10.0.0.2:8080", "10.0.0.1:40000"),
        diag(Established, "10.0.0.2:45000", "10.0.0.3:5432"),
        diag(SynSent, "10.0.0.2:45001", "10.0.0.3:5432"),
    ];
    let c = t.reconcile(&dump, 100, 100, FIN);
    assert_eq!(
        c,
        Corrections {
            stale: 0,
            missing: 3,
            state: 0
        },
        "SYN_SENT is left to events"
    );
    assert_eq!(current(&t, Role::Server, 8080, CloseWait), 1);
    assert_eq!(current(&t, Role::Server, 8080, Listen), 1);
    assert_eq!(current(&t, Role::Client, 5432, Established), 1);
    let s = t.stats(Role::Server, PortKey::Port(8080)).unwrap();
    assert_eq!(s.seeded[CloseWait.index()], 1);
    let seeded: Vec<_> = t.conns().filter(|(_, c)| c.seeded).collect();
    assert_eq!(seeded.len(), 3);
    assert!(
        seeded
            .iter()
            .all(|(sock, c)| **sock < SYNTHETIC_LIMIT && c.since_ns == 100 && c.inode == 1000)
    );
}

#[test]
fn a_seeded_socket_is_adopted_by_its_first_event_and_its_age_becomes_exact() {
    let mut t = table();
    let dump = [
        diag(Listen, "0.0.0.0:8080", "0.0.0.0:0"),
        diag(CloseWait, "10.0.0.2:8080", "10.0.0.1:40000"),
    ];
    t.reconcile(&dump, 100, 100, FIN);
    t.apply(&tr(
        SOCK_A,
        500,
        CloseWait,
        LastAck,
        "10.0.0.2:8080",
        "10.0.0.1:40000",
    ));
    assert_eq!(
        t.len(),
        2,
        "the same socket (and the listener), not a third one"
    );
    let c = t.get(SOCK_A).unwrap();
    assert_eq!(
        (c.state, c.seeded, c.since_ns, c.inode),
        (LastAck, false, 500, 1000)
    );
    let s = t.stats(Role::Server, PortKey::Port(8080)).unwrap();
    assert_eq!(s.current[CloseWait.index()], 0);
    assert_eq!(s.seeded[CloseWait.index()], 0);
    assert_eq!(s.seeded[Listen.index()], 1);
    assert_eq!(t.counters().first_seen_midlife, 0);
}

#[test]
fn reconciliation_drops_adds_and_restates_what_events_missed() {
    let mut t = table();
    // Known to the table: one gone from the kernel (its close was lost), one whose
    // ESTABLISHED -> CLOSE_WAIT was lost.
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    t.apply(&tr(
        SOCK_A,
        2,
        SynSent,
        Established,
        "10.0.0.1:40000",
        "10.0.0.2:80",
    ));
    t.apply(&tr(SOCK_B, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    t.apply(&tr(
        SOCK_B,
        2,
        SynSent,
        Established,
        "10.0.0.1:40001",
        "10.0.0.2:80",
    ));
    let dump = [
        diag(CloseWait, "10.0.0.1:40001", "10.0.0.2:80"),
        // Opened while events were lost.
        diag(Established, "10.0.0.1:40002", "10.0.0.2:80"),
    ];
    let c = t.reconcile(&dump, 10, 20, FIN);
    assert_eq!(
        c,
        Corrections {
            stale: 1,
            missing: 1,
            state: 1
        }
    );
    assert_eq!(current(&t, Role::Client, 80, Established), 1);
    assert_eq!(current(&t, Role::Client, 80, CloseWait), 1);
    assert_eq!(t.len(), 2);
    assert_eq!(t.get(SOCK_B).unwrap().inode, 1000);
    assert_eq!(t.reconcile_totals().corrections, c);
    // A second pass over the same kernel state finds nothing to do.
    assert_eq!(t.reconcile(&dump, 30, 40, FIN), Corrections::default());
}

#[test]
fn events_that_race_the_dump_win() {
    let mut t = table();
    // Changed after the dump started (since 15 >= 10): the dump may predate it.
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    t.apply(&tr(
        SOCK_A,
        15,
        SynSent,
        Established,
        "10.0.0.1:40000",
        "10.0.0.2:80",
    ));
    // Closed while the dump ran: it must not come back from the dump.
    t.apply(&tr(SOCK_B, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    t.apply(&tr(
        SOCK_B,
        2,
        SynSent,
        Established,
        "10.0.0.1:40001",
        "10.0.0.2:80",
    ));
    t.apply(&tr(
        SOCK_B,
        12,
        Established,
        Close,
        "10.0.0.1:40001",
        "10.0.0.2:80",
    ));
    let dump = [diag(Established, "10.0.0.1:40001", "10.0.0.2:80")];
    assert_eq!(t.reconcile(&dump, 10, 20, FIN), Corrections::default());
    assert_eq!(t.len(), 1);
    assert!(t.get(SOCK_A).is_some());
}

#[test]
fn a_half_built_socket_whose_next_event_was_lost_is_repaired() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    // Still connecting: kept.
    let dump = [diag(SynSent, "10.0.0.1:40000", "10.0.0.2:80")];
    assert_eq!(t.reconcile(&dump, 10, 20, FIN), Corrections::default());
    // Its SYN_SENT -> ESTABLISHED was lost: the half-built entry goes, the real one comes.
    let dump = [diag(Established, "10.0.0.1:40000", "10.0.0.2:80")];
    let c = t.reconcile(&dump, 30, 40, FIN);
    assert_eq!(
        c,
        Corrections {
            stale: 1,
            missing: 1,
            state: 0
        }
    );
    assert_eq!(current(&t, Role::Client, 80, SynSent), 0);
    assert_eq!(current(&t, Role::Client, 80, Established), 1);
}

#[test]
fn a_dump_that_saw_a_socket_open_does_not_count_it_twice() {
    let mut t = table();
    // The dump saw the connection before its events reached the table.
    t.reconcile(
        &[diag(Established, "10.0.0.1:40000", "10.0.0.2:80")],
        10,
        20,
        FIN,
    );
    t.apply(&tr(SOCK_A, 5, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
    t.apply(&tr(
        SOCK_A,
        6,
        SynSent,
        Established,
        "10.0.0.1:40000",
        "10.0.0.2:80",
    ));
    assert_eq!(t.len(), 1);
    assert_eq!(current(&t, Role::Client, 80, Established), 1);
    assert_eq!(
        t.stats(Role::Client, PortKey::Port(80)).unwrap().seeded,
        [0; STATES]
    );
}

#[test]
fn an_open_that_carries_its_whole_tuple_replaces_its_seeded_twin() {
    let mut t = table();
    let dump = [
        diag(Listen, "[::1]:7102", "[::]:0"),
        diag(Established, "[::1]:7102", "[::1]:49486"),
    ];
    // The dump's result reaches the table before the events of the same moment.
    t.reconcile(&dump, 10, 20, FIN);
    t.apply(&tr(SOCK_A, 11, Close, Listen, "[::1]:7102", "[::]:0"));
    t.apply(&tr(
        SOCK_B,
        12,
        Listen,
        SynRecv,
        "[::1]:7102",
        "[::1]:49486",
    ));
    t.apply(&tr(
        SOCK_B,
        13,
        SynRecv,
        Established,
        "[::1]:7102",
        "[::1]:49486",
    ));
    assert_eq!(t.len(), 2);
    assert_eq!(current(&t, Role::Server, 7102, Listen), 1);
    assert_eq!(current(&t, Role::Server, 7102, Established), 1);
    assert_eq!(
        t.stats(Role::Server, PortKey::Port(7102)).unwrap().seeded,
        [0; STATES]
    );
}

#[test]
fn timewait_sockets_are_counted_per_port_and_orphans_aged_from_their_timer() {
    let mut t = table();
    let mut tw = diag(TimeWait, "10.0.0.1:40000", "10.0.0.2:80");
    tw.timewait = true;
    let mut fw = diag(FinWait2, "10.0.0.1:40001", "10.0.0.2:80");
    fw.timewait = true;
    fw.timer_left = Some(std::time::Duration::from_secs(45));
    let s = 1_000_000_000u64;
    t.reconcile(&[tw.clone(), tw, fw], 100 * s, 100 * s, FIN);
    let snap = t.snapshot();
    let (_, _, stats) = &snap.ports[0];
    assert_eq!(stats.current[TimeWait.index()], 2);
    assert_eq!(stats.current[FinWait2.index()], 1);
    assert_eq!(t.len(), 0, "timewait sockets are not tracked one by one");
    // 60 s timeout, 45 s left: it entered FIN_WAIT2 15 s ago.
    assert_eq!(
        t.orphans(),
        &[Orphan {
            role: Role::Client,
            key: PortKey::Port(80),
            since_ns: 85 * s
        }]
    );
    // The next dump replaces them.
    t.reconcile(&[], 200 * s, 200 * s, FIN);
    assert_eq!(t.snapshot().ports[0].2.current, [0; STATES]);
    assert!(t.orphans().is_empty());
}

#[test]
fn dumped_sockets_get_their_role_by_the_same_rule_as_events() {
    // The burst: the server on 8080 closed first, so its 30,000 TIME_WAIT sockets
    // outlive the listener, which is gone when the agent starts.
    let mut t = Table::new(4, DEFAULT_EPHEMERAL);
    let burst: Vec<KernelSocket> = (0..3_000u16)
        .map(|i| timewait("127.0.0.1:8080", &format!("127.0.0.1:{}", 33_000 + i)))
        .collect();
    t.reconcile(&burst, SEC, SEC, FIN);
    let snap = t.snapshot();
    let keys: Vec<_> = snap.ports.iter().map(|(r, k, _)| (*r, *k)).collect();
    assert_eq!(
        keys,
        vec![(Role::Server, PortKey::Port(8080))],
        "one port, not 3,000"
    );
    assert_eq!(snap.ports[0].2.current[TimeWait.index()], 3_000);
    // A new service later gets its own series for both roles.
    t.apply(&tr(1, 2 * SEC, Close, Listen, "0.0.0.0:9443", "0.0.0.0:0"));
    t.apply(&tr(
        2,
        2 * SEC,
        Close,
        SynSent,
        "127.0.0.1:0",
        "127.0.0.1:9443",
    ));
    assert_eq!(current(&t, Role::Server, 9443, Listen), 1);
    assert_eq!(current(&t, Role::Client, 9443, SynSent), 1);
    // Both ends ephemeral or neither: the lower port is the service; a listener wins.
    assert_eq!(
        role_of(false, 40_000, 50_000, &DEFAULT_EPHEMERAL),
        (Role::Server, 40_000)
    );
    assert_eq!(
        role_of(false, 5432, 80, &DEFAULT_EPHEMERAL),
        (Role::Client, 80)
    );
    assert_eq!(
        role_of(true, 40_000, 80, &DEFAULT_EPHEMERAL),
        (Role::Server, 40_000)
    );
    assert_eq!(
        role_of(false, 40_000, 80, &DEFAULT_EPHEMERAL),
        (Role::Client, 80)
    );
}
