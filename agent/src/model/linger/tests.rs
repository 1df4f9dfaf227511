//! Unit tests of the linger detector.
use super::*;
use crate::model::event::Transition;
use crate::model::table::DEFAULT_EPHEMERAL;
use crate::testing;
use TcpState::*;

const S: u64 = 1_000_000_000;

/// A server-side transition on `port`, from a client port of its own.
fn tr(sock: u64, ts: u64, old: TcpState, new: TcpState, port: u16) -> Transition {
    let remote = format!("10.0.0.1:{}", 40000u16.wrapping_add(sock as u16));
    testing::tr(sock, ts, old, new, &format!("10.0.0.2:{port}"), &remote).with_pid(0)
}

/// A server socket on `port` that reached CLOSE_WAIT at `ts`.
fn close_wait(t: &mut Table, sock: u64, port: u16, ts: u64) {
    t.apply(&tr(sock, 0, Listen, SynRecv, port));
    t.apply(&tr(sock, 0, SynRecv, Established, port));
    t.apply(&tr(sock, ts, Established, CloseWait, port));
}

fn thresholds(secs: u64) -> Thresholds {
    Thresholds {
        close_wait: Duration::from_secs(secs),
        fin_wait2: Duration::from_secs(secs),
    }
}

#[test]
fn crosses_only_strictly_after_the_threshold_and_only_once() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(thresholds(60));
    close_wait(&mut t, 1, 8080, 10 * S);
    assert!(d.tick(&mut t, 70 * S - 1).is_empty(), "just below");
    assert!(
        d.tick(&mut t, 70 * S).is_empty(),
        "exactly at the threshold is not longer"
    );
    let h = d.tick(&mut t, 70 * S + 1);
    assert_eq!(h.len(), 1);
    let Happening::Crossed { entry, age } = &h[0] else {
        panic!("{h:?}")
    };
    assert_eq!(entry.conn.state, CloseWait);
    assert_eq!(entry.conn.role, Role::Server);
    assert_eq!(entry.conn.service_port, 8080);
    assert_eq!(*age, Duration::from_nanos(60 * S + 1));
    assert!(d.tick(&mut t, 80 * S).is_empty(), "reported once");
    assert_eq!(d.len(), 1);
    let snap = d.snapshot(&[], 0);
    assert_eq!(
        snap.current,
        vec![(
            LingerKey {
                role: Role::Server,
                key: PortKey::Port(8080),
                state: CloseWait
            },
            LingerAgg {
                count: 1,
                oldest_since_ns: 10 * S
            }
        )]
    );
    let port = t.stats(Role::Server, PortKey::Port(8080)).unwrap();
    assert_eq!(
        port.lingering_detected,
        [1, 0],
        "counted on the port's aggregate"
    );
}

#[test]
fn other_states_never_linger_and_thresholds_are_per_state() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(Thresholds {
        close_wait: Duration::from_secs(10),
        fin_wait2: Duration::from_secs(100),
    });
    t.apply(&tr(1, 0, Listen, SynRecv, 80));
    t.apply(&tr(1, 0, SynRecv, Established, 80));
    close_wait(&mut t, 2, 80, 0);
    t.apply(&tr(3, 0, Close, SynSent, 80));
    t.apply(&tr(3, 0, SynSent, Established, 80));
    t.apply(&tr(3, 0, Established, FinWait1, 80));
    t.apply(&tr(3, 0, FinWait1, FinWait2, 80));
    let h = d.tick(&mut t, 50 * S);
    assert_eq!(h.len(), 1, "only the CLOSE_WAIT one after 50 s: {h:?}");
    assert_eq!(d.tick(&mut t, 101 * S).len(), 1, "then the FIN_WAIT2 one");
    assert_eq!(d.len(), 2);
}

#[test]
fn departures_say_how_the_connection_ended() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(thresholds(1));
    close_wait(&mut t, 1, 80, 0);
    close_wait(&mut t, 2, 80, 0);
    assert_eq!(d.tick(&mut t, 2 * S).len(), 2);
    t.apply(&tr(1, 3 * S, CloseWait, LastAck, 80));
    t.apply(&tr(2, 4 * S, CloseWait, Close, 80));
    let mut h = d.tick(&mut t, 5 * S);
    h.sort_by_key(|h| match h {
        Happening::Left { entry, .. } => entry.sock,
        _ => 0,
    });
    let endings: Vec<_> = h
        .iter()
        .map(|h| match h {
            Happening::Left { ending, age, .. } => (*ending, age.as_secs()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        endings,
        vec![(Ending::ClosedByApplication, 3), (Ending::Reset, 4)]
    );
    assert!(d.is_empty());
    assert!(d.snapshot(&[], 0).current.is_empty());
    // Counted as detected for good.
    let port = t.stats(Role::Server, PortKey::Port(80)).unwrap();
    assert_eq!(port.lingering_detected, [2, 0]);
    // LAST_ACK is no lingering state: the first socket does not come back.
    assert!(d.tick(&mut t, 100 * S).is_empty());
}

#[test]
fn closing_a_lingering_fin_wait2_socket_is_no_departure_until_it_is_gone() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(thresholds(1));
    t.apply(&tr(9, 0, Close, SynSent, 80));
    t.apply(&tr(9, 0, SynSent, Established, 80));
    t.apply(&tr(9, 0, Established, FinWait1, 80));
    t.apply(&tr(9, 0, FinWait1, FinWait2, 80));
    assert_eq!(d.tick(&mut t, 2 * S).len(), 1);
    // close(): the kernel sets FIN_WAIT2 again, then hands the socket to timewait.
    t.apply(&tr(9, 3 * S, FinWait2, FinWait2, 80));
    assert!(d.tick(&mut t, 3 * S).is_empty(), "still lingering");
    assert_eq!(d.len(), 1);
    t.apply(&tr(9, 4 * S, FinWait2, Close, 80));
    let h = d.tick(&mut t, 5 * S);
    assert!(
        matches!(&h[..], [Happening::Left { ending: Ending::Closed, to: Close, age, .. }] if age.as_secs() == 4),
        "{h:?}"
    );
}

#[test]
fn shutdown_reports_what_still_lingers() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(thresholds(1));
    close_wait(&mut t, 1, 80, 0);
    d.tick(&mut t, 2 * S);
    let h = d.shutdown(3 * S);
    assert!(matches!(
        &h[..],
        [Happening::Left {
            ending: Ending::StillOpenAtShutdown,
            ..
        }]
    ));
    assert!(d.is_empty());
}

#[test]
fn a_hundred_thousand_sockets_are_all_found_and_the_log_stays_short() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(thresholds(60));
    for sock in 0..100_000u64 {
        close_wait(&mut t, sock + 1, 8000 + (sock % 3) as u16, 0);
    }
    let h = d.tick(&mut t, 61 * S);
    assert_eq!(h.len(), 100_000);
    let logs = plan_logs(h, DEFAULT_LOG_CAP);
    let ones = logs
        .iter()
        .filter(|r| matches!(r, LogRecord::One(_)))
        .count();
    let summaries: usize = logs
        .iter()
        .map(|r| match r {
            LogRecord::Summary { count, .. } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!(ones, DEFAULT_LOG_CAP);
    assert_eq!(logs.len(), DEFAULT_LOG_CAP + 3, "one summary per port");
    assert_eq!(ones + summaries, 100_000, "every socket is accounted for");
    let snap = d.snapshot(&[], 0);
    assert_eq!(
        snap.current.iter().map(|(_, a)| a.count).sum::<u64>(),
        100_000
    );
}

#[test]
fn the_log_plan_keeps_crossings_and_departures_apart() {
    let mut t = Table::new(16, DEFAULT_EPHEMERAL);
    let mut d = Detector::new(thresholds(1));
    for sock in 1..=5 {
        close_wait(&mut t, sock, 80, 0);
    }
    let crossed = d.tick(&mut t, 2 * S);
    for sock in 1..=5 {
        t.apply(&tr(sock, 3 * S, CloseWait, LastAck, 80));
    }
    let left = d.tick(&mut t, 4 * S);
    let logs = plan_logs(crossed.into_iter().chain(left).collect(), 2);
    assert_eq!(logs.len(), 4);
    assert!(matches!(
        logs[2],
        LogRecord::Summary {
            crossed: true,
            count: 3,
            ..
        }
    ));
    assert!(matches!(
        logs[3],
        LogRecord::Summary {
            crossed: false,
            count: 5,
            ..
        }
    ));
}

#[test]
fn orphaned_fin_wait2_past_the_threshold_count_as_lingering() {
    let d = Detector::new(thresholds(10));
    let orphans = [
        Orphan {
            role: Role::Client,
            key: PortKey::Port(443),
            since_ns: 100 * S,
        },
        Orphan {
            role: Role::Client,
            key: PortKey::Port(443),
            since_ns: 95 * S,
        },
        Orphan {
            role: Role::Client,
            key: PortKey::Port(443),
            since_ns: 108 * S,
        },
    ];
    let snap = d.snapshot(&orphans, 110 * S);
    assert_eq!(
        snap.current,
        vec![(
            LingerKey {
                role: Role::Client,
                key: PortKey::Port(443),
                state: FinWait2
            },
            LingerAgg {
                count: 1,
                oldest_since_ns: 95 * S
            }
        )],
        "only the one 15 s old is past 10 s"
    );
}

#[test]
fn the_check_interval_is_well_below_the_threshold() {
    assert_eq!(thresholds(60).check_interval(), Duration::from_secs(5));
    assert_eq!(thresholds(1).check_interval(), Duration::from_millis(250));
    let tiny = Thresholds {
        close_wait: Duration::from_millis(100),
        fin_wait2: Duration::from_secs(60),
    };
    assert_eq!(tiny.check_interval(), Duration::from_millis(100));
}
