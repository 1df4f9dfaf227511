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
//! interval with a summary per port beyond the cap. Pure: `engine::alert_log` does the logging.
use std::time::Duration;

use rustc_hash::FxHashMap;
use tcpstate_common::TcpState;

use super::table::{Conn, Departure, Orphan, PortKey, Role, Table};

/// The states a connection can linger in.
pub(crate) const LINGER_STATES: [TcpState; 2] = [TcpState::CloseWait, TcpState::FinWait2];

/// Thresholds per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub(crate) close_wait: Duration,
    pub(crate) fin_wait2: Duration,
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
    pub(crate) fn for_state(&self, state: TcpState) -> Option<Duration> {
        match state {
            TcpState::CloseWait => Some(self.close_wait),
            TcpState::FinWait2 => Some(self.fin_wait2),
            _ => None,
        }
    }

    /// How often to look: a quarter of the smaller threshold, between 100 ms and 5 s.
    pub(crate) fn check_interval(&self) -> Duration {
        (self.close_wait.min(self.fin_wait2) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// One lingering socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Lingering {
    pub(crate) sock: u64,
    pub(crate) conn: Conn,
    /// When the detector first saw it past its threshold.
    pub(crate) detected_ns: u64,
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
    pub(crate) fn of(from: TcpState, to: TcpState) -> Ending {
        match (from, to) {
            (TcpState::CloseWait, TcpState::LastAck) => Ending::ClosedByApplication,
            (TcpState::CloseWait, TcpState::Close) => Ending::Reset,
            (TcpState::FinWait2, TcpState::Close) => Ending::Closed,
            (_, other) => Ending::StateChanged(other),
        }
    }

    pub(crate) fn label(self) -> &'static str {
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
    /// Where it is counted, and whether it is a crossing (else a departure).
    fn key(&self) -> (LingerKey, bool) {
        let (e, crossed) = match self {
            Happening::Crossed { entry, .. } => (entry, true),
            Happening::Left { entry, .. } => (entry, false),
        };
        let (role, key, state) = (e.conn.role, e.conn.key, e.conn.state);
        (LingerKey { role, key, state }, crossed)
    }
}

/// What `engine::alert_log` should log for one interval.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum LogRecord {
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
pub(crate) const DEFAULT_LOG_CAP: usize = 20;

/// Turns an interval's happenings into at most `cap` individual lines plus one summary line per
/// (port, role, state, kind) for the rest. On a host with 10,000 leaked sockets the log stays
/// readable.
pub(crate) fn plan_logs(happenings: Vec<Happening>, cap: usize) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let mut rest: Vec<((LingerKey, bool), usize)> = Vec::new();
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
            .map(|((k, crossed), count)| LogRecord::Summary {
                role: k.role,
                port: k.key,
                state: k.state,
                crossed,
                count,
            }),
    );
    out
}

/// Aggregate of the lingering set for one (role, port, state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LingerAgg {
    pub(crate) count: u64,
    /// Entry time (CLOCK_MONOTONIC ns) of the oldest lingering socket.
    pub(crate) oldest_since_ns: u64,
}

/// Where lingering connections are counted: a port of a role, and the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LingerKey {
    pub(crate) role: Role,
    pub(crate) key: PortKey,
    pub(crate) state: TcpState,
}

/// Lingering set and counters, for the metrics and the CLI.
#[derive(Clone, Debug, Default)]
pub(crate) struct LingerSnapshot {
    /// Per (role, port, state), sorted.
    pub(crate) current: Vec<(LingerKey, LingerAgg)>,
}

impl LingerSnapshot {
    /// The aggregates by key, for lookups per port.
    pub(crate) fn by_key(&self) -> FxHashMap<LingerKey, LingerAgg> {
        self.current.iter().copied().collect()
    }
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

    pub(crate) fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
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
    pub(crate) fn shutdown(&mut self, now_ns: u64) -> Vec<Happening> {
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

    /// The lingering set, plus the orphaned FIN_WAIT2 (timewait) sockets that
    /// are past the threshold at `now_ns`: the kernel owns those, they are counted, not listed.
    pub(crate) fn snapshot(&self, orphans: &[Orphan], now_ns: u64) -> LingerSnapshot {
        let mut current: FxHashMap<LingerKey, LingerAgg> = FxHashMap::default();
        let mut add = |key, since: u64| {
            let agg = current.entry(key).or_insert(LingerAgg {
                count: 0,
                oldest_since_ns: u64::MAX,
            });
            agg.count += 1;
            agg.oldest_since_ns = agg.oldest_since_ns.min(since);
        };
        for e in self.set.values() {
            let (role, key, state) = (e.conn.role, e.conn.key, e.conn.state);
            add(LingerKey { role, key, state }, e.conn.since_ns);
        }
        let fw2 = self.thresholds.fin_wait2.as_nanos() as u64;
        for o in orphans {
            if now_ns.saturating_sub(o.since_ns) > fw2 {
                let state = TcpState::FinWait2;
                let (role, key) = (o.role, o.key);
                add(LingerKey { role, key, state }, o.since_ns);
            }
        }
        let mut current: Vec<_> = current.into_iter().collect();
        current.sort_by_key(|(k, _)| *k);
        LingerSnapshot { current }
    }
}

/// The inodes whose owners the crossings in `records` would like to name.
pub(crate) fn wanted_owners(records: &[LogRecord]) -> Vec<u32> {
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

#[cfg(test)]
mod tests;
