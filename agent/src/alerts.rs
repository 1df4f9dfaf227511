//! Lingering connections: sockets that stayed in `CLOSE_WAIT` or `FIN_WAIT_2` longer than that
//! state's threshold.
//!
//! `CLOSE_WAIT` means the peer closed and the local application has read EOF (or never reads)
//! but has not called `close()`: a healthy application closes within milliseconds, so a minute
//! there is a leak. `FIN_WAIT_2` means we closed our side and the peer has not closed its own;
//! `net.ipv4.tcp_fin_timeout` (60 s by default) is how long the kernel itself gives an orphaned
//! socket in that state. Hence the default threshold of 60 s for both.
//!
//! The [`Detector`] runs on a timer over the connection table (nothing per event), keeps the
//! current lingering set, and turns crossings and departures into log records, capped per
//! interval with a summary per port beyond the cap. Pure: the daemon does the logging.
use std::time::Duration;

use rustc_hash::FxHashMap;
use tcpstate_common::TcpState;

use crate::owner::Owner;
use crate::table::{Conn, Departure, PortKey, Role, Table};

/// The states a connection can linger in.
pub const LINGER_STATES: [TcpState; 2] = [TcpState::CloseWait, TcpState::FinWait2];

/// Thresholds per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub close_wait: Duration,
    pub fin_wait2: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            close_wait: Duration::from_secs(60),
            fin_wait2: Duration::from_secs(60),
        }
    }
}

impl Thresholds {
    pub fn for_state(&self, state: TcpState) -> Option<Duration> {
        match state {
            TcpState::CloseWait => Some(self.close_wait),
            TcpState::FinWait2 => Some(self.fin_wait2),
            _ => None,
        }
    }

    /// How often to look: a quarter of the smaller threshold, between 100 ms and 5 s.
    pub fn check_interval(&self) -> Duration {
        (self.close_wait.min(self.fin_wait2) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// One lingering socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Lingering {
    pub sock: u64,
    pub conn: Conn,
    /// When the detector first saw it past its threshold.
    pub detected_ns: u64,
}

/// How a lingering socket stopped lingering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `CLOSE_WAIT -> LAST_ACK`: the application finally called `close()`.
    ClosedByApplication,
    /// `CLOSE_WAIT -> CLOSE` directly: aborted, a reset was sent or received.
    Reset,
    /// `FIN_WAIT2 -> CLOSE`: the peer finished its close, or the socket was reset or timed out.
    Closed,
    /// Some other state (not expected of TCP; reported rather than hidden).
    StateChanged(TcpState),
    /// The agent is stopping while the socket still lingers.
    StillOpenAtShutdown,
}

impl Ending {
    pub fn of(from: TcpState, to: TcpState) -> Ending {
        match (from, to) {
            (TcpState::CloseWait, TcpState::LastAck) => Ending::ClosedByApplication,
            (TcpState::CloseWait, TcpState::Close) => Ending::Reset,
            (TcpState::FinWait2, TcpState::Close) => Ending::Closed,
            (_, other) => Ending::StateChanged(other),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Ending::ClosedByApplication => "closed_by_application",
            Ending::Reset => "reset",
            Ending::Closed => "closed",
            Ending::StateChanged(_) => "state_changed",
            Ending::StillOpenAtShutdown => "still_open_at_shutdown",
        }
    }
}

/// A connection crossed its threshold, or left while lingering.
#[derive(Clone, Debug, PartialEq)]
pub enum Happening {
    Crossed {
        entry: Lingering,
        age: Duration,
    },
    Left {
        entry: Lingering,
        ending: Ending,
        /// The state it went to (`CLOSE` when gone; its own state at shutdown).
        to: TcpState,
        /// Total time in the lingering state.
        age: Duration,
    },
}

impl Happening {
    fn key(&self) -> (Role, PortKey, TcpState, bool) {
        let (e, crossed) = match self {
            Happening::Crossed { entry, .. } => (entry, true),
            Happening::Left { entry, .. } => (entry, false),
        };
        (e.conn.role, e.conn.key, e.conn.state, crossed)
    }
}

/// What the daemon should log for one interval.
#[derive(Clone, Debug, PartialEq)]
pub enum LogRecord {
    /// One line for one socket (`warn` when crossed, `info` when left).
    One(Happening),
    /// One line for the sockets beyond the cap, per (port, role, state, crossed or left).
    Summary {
        role: Role,
        port: PortKey,
        state: TcpState,
        crossed: bool,
        count: usize,
    },
}

/// Individual lines per interval before the rest is summarised per port.
pub const DEFAULT_LOG_CAP: usize = 20;

/// Turns an interval's happenings into at most `cap` individual lines plus one summary line per
/// (port, role, state, kind) for the rest. On a host with 10,000 leaked sockets the log stays
/// readable.
pub fn plan_logs(happenings: Vec<Happening>, cap: usize) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let mut rest: Vec<((Role, PortKey, TcpState, bool), usize)> = Vec::new();
    for (i, h) in happenings.into_iter().enumerate() {
        if i < cap {
            out.push(LogRecord::One(h));
            continue;
        }
        let k = h.key();
        match rest.iter_mut().find(|(key, _)| *key == k) {
            Some((_, n)) => *n += 1,
            None => rest.push((k, 1)),
        }
    }
    out.extend(
        rest.into_iter()
            .map(|((role, port, state, crossed), count)| LogRecord::Summary {
                role,
                port,
                state,
                crossed,
                count,
            }),
    );
    out
}

/// Aggregate of the lingering set for one (role, port, state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LingerAgg {
    pub count: u64,
    /// Entry time (CLOCK_MONOTONIC ns) of the oldest lingering socket.
    pub oldest_since_ns: u64,
}

/// Lingering set and counters, for the metrics and the CLI.
#[derive(Clone, Debug, Default)]
pub struct LingerSnapshot {
    /// Sorted by (role, port, state).
    pub current: Vec<((Role, PortKey, TcpState), LingerAgg)>,
    pub entries: Vec<Lingering>,
}

/// The linger detector.
pub struct Detector {
    thresholds: Thresholds,
    set: FxHashMap<u64, Lingering>,
}

impl Detector {
    pub fn new(thresholds: Thresholds) -> Self {
        Detector {
            thresholds,
            set: FxHashMap::default(),
        }
    }

    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// One pass at `now_ns` (CLOCK_MONOTONIC): settles departures the table recorded since the
    /// last pass, then finds sockets that crossed their threshold.
    pub fn tick(&mut self, table: &mut Table, now_ns: u64) -> Vec<Happening> {
        let mut out = Vec::new();
        for Departure {
            sock,
            conn,
            to,
            ts_ns,
        } in table.take_departures()
        {
            if let Some(entry) = self.set.remove(&sock) {
                out.push(Happening::Left {
                    age: Duration::from_nanos(ts_ns.saturating_sub(conn.since_ns)),
                    ending: Ending::of(conn.state, to),
                    to,
                    entry: Lingering { conn, ..entry },
                });
            }
        }
        for (&sock, conn) in table.conns_mut() {
            if conn.lingering {
                continue;
            }
            let Some(threshold) = self.thresholds.for_state(conn.state) else {
                continue;
            };
            let age = now_ns.saturating_sub(conn.since_ns);
            if age <= threshold.as_nanos() as u64 {
                continue;
            }
            conn.lingering = true;
            let entry = Lingering {
                sock,
                conn: conn.clone(),
                detected_ns: now_ns,
            };
            self.set.insert(sock, entry.clone());
            out.push(Happening::Crossed {
                entry,
                age: Duration::from_nanos(age),
            });
        }
        // Counted on the port's aggregate, so that the counter retires with the port.
        for h in &out {
            if let Happening::Crossed { entry, .. } = h
                && let Some(which) = LINGER_STATES.iter().position(|s| *s == entry.conn.state)
            {
                table.count_lingering(entry.conn.role, entry.conn.key, which);
            }
        }
        out
    }

    /// Everything still lingering, as the agent stops.
    pub fn shutdown(&mut self, now_ns: u64) -> Vec<Happening> {
        let mut out: Vec<_> = self
            .set
            .drain()
            .map(|(_, entry)| Happening::Left {
                age: Duration::from_nanos(now_ns.saturating_sub(entry.conn.since_ns)),
                ending: Ending::StillOpenAtShutdown,
                to: entry.conn.state,
                entry,
            })
            .collect();
        out.sort_by_key(|h| h.key());
        out
    }

    /// The lingering set, plus the orphaned FIN_WAIT2 (timewait) sockets of the last dump that
    /// are past the threshold at `now_ns`: the kernel owns those, they are counted, not listed.
    pub fn snapshot(&self, orphans: &[(Role, PortKey, u64)], now_ns: u64) -> LingerSnapshot {
        let mut current: FxHashMap<(Role, PortKey, TcpState), LingerAgg> = FxHashMap::default();
        let mut add = |key, since: u64| {
            let agg = current.entry(key).or_insert(LingerAgg {
                count: 0,
                oldest_since_ns: u64::MAX,
            });
            agg.count += 1;
            agg.oldest_since_ns = agg.oldest_since_ns.min(since);
        };
        for e in self.set.values() {
            add((e.conn.role, e.conn.key, e.conn.state), e.conn.since_ns);
        }
        let fw2 = self.thresholds.fin_wait2.as_nanos() as u64;
        for &(role, key, since) in orphans {
            if now_ns.saturating_sub(since) > fw2 {
                add((role, key, TcpState::FinWait2), since);
            }
        }
        let mut current: Vec<_> = current.into_iter().collect();
        current.sort_by_key(|(k, _)| *k);
        let mut entries: Vec<_> = self.set.values().cloned().collect();
        entries.sort_by_key(|e| e.conn.since_ns);
        LingerSnapshot { current, entries }
    }
}

/// The inodes whose owners the crossings in `records` would like to name.
pub fn wanted_owners(records: &[LogRecord]) -> Vec<u32> {
    records
        .iter()
        .filter_map(|r| match r {
            LogRecord::One(Happening::Crossed { entry, .. }) if entry.conn.inode != 0 => {
                Some(entry.conn.inode)
            }
            _ => None,
        })
        .collect()
}

/// Emits log records through `tracing`: crossings at `warn` with the best owner information
/// available (the processes holding the socket's inode, else the pid that connected it),
/// departures at `info`.
pub fn emit(records: &[LogRecord], owners: &FxHashMap<u32, Vec<Owner>>) {
    for r in records {
        match r {
            LogRecord::One(Happening::Crossed { entry, age }) => {
                let c = &entry.conn;
                let owner = owners.get(&c.inode).and_then(|o| o.first());
                let owner_pid = owner.map_or(c.pid, |o| o.pid);
                let owner_comm = owner.map_or("", |o| o.comm.as_str());
                let container = owner.and_then(|o| o.container.as_deref()).unwrap_or("");
                tracing::warn!(
                    state = c.state.name(),
                    age_s = age.as_secs_f64(),
                    age_is_lower_bound = c.seeded,
                    local = %c.local,
                    remote = %c.remote,
                    role = c.role.label(),
                    port = c.service_port,
                    netns = c.netns,
                    inode = c.inode,
                    owner_pid,
                    owner_comm,
                    owner_container = container,
                    owners = owners.get(&c.inode).map_or(0, Vec::len),
                    "connection lingering in {}",
                    c.state.name()
                );
            }
            LogRecord::One(Happening::Left {
                entry,
                ending,
                to,
                age,
            }) => {
                let c = &entry.conn;
                tracing::info!(
                    state = c.state.name(),
                    ended = ending.label(),
                    to = to.name(),
                    age_s = age.as_secs_f64(),
                    local = %c.local,
                    remote = %c.remote,
                    role = c.role.label(),
                    port = c.service_port,
                    netns = c.netns,
                    owner_pid = c.pid,
                    "lingering connection left {}",
                    c.state.name()
                );
            }
            LogRecord::Summary {
                role,
                port,
                state,
                crossed,
                count,
            } => {
                if *crossed {
                    tracing::warn!(
                        state = state.name(),
                        role = role.label(),
                        port = %port.label(),
                        count,
                        "{count} more connections lingering in {} (not listed one by one)",
                        state.name()
                    );
                } else {
                    tracing::info!(
                        state = state.name(),
                        role = role.label(),
                        port = %port.label(),
                        count,
                        "{count} more lingering connections left {}",
                        state.name()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Transition;
    use crate::table::DEFAULT_EPHEMERAL;
    use TcpState::*;

    const S: u64 = 1_000_000_000;

    fn tr(sock: u64, ts: u64, old: TcpState, new: TcpState, port: u16) -> Transition {
        Transition {
            ts_ns: ts,
            sock,
            prev_state_ns: None,
            local: format!("10.0.0.2:{port}").parse().unwrap(),
            remote: format!("10.0.0.1:{}", 40000 + sock as u16).parse().unwrap(),
            old,
            new,
            netns: 0,
            pid: 0,
        }
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
                (Role::Server, PortKey::Port(8080), CloseWait),
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
            (Role::Client, PortKey::Port(443), 100 * S),
            (Role::Client, PortKey::Port(443), 95 * S),
            (Role::Client, PortKey::Port(443), 108 * S),
        ];
        let snap = d.snapshot(&orphans, 110 * S);
        assert_eq!(
            snap.current,
            vec![(
                (Role::Client, PortKey::Port(443), FinWait2),
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
}
