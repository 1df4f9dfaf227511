//! The live connection table and the per-port aggregates. Pure: no I/O, no clocks, no async.
//! One task owns it (`engine::table_task`) and feeds it transitions
//! ([`crate::model::event::Transition`]) in ring buffer order.
//!
//! A connection is one kernel socket (`skaddr`) from its open to `-> CLOSE`:
//! - `CLOSE -> SYN_SENT` is an active open (`connect()`): a `client` connection whose service
//!   port is the remote port. The local port is still 0 in that event.
//! - `LISTEN -> SYN_RECV` is a passive open: the kernel clones the listener into a new socket,
//!   so the event's old state is the listener's. A `server` connection whose service port is the
//!   local port. Older kernels report the remote port as 0 there; 6.18 carries the whole tuple.
//! - `CLOSE -> LISTEN` is a listening socket, `server` on its own port.
//!
//! Sockets first seen without their open (mid-life events, sock_diag dumps) get their role from
//! one rule, [`role_of`].
//!
//! The 4-tuple is trusted from `-> ESTABLISHED` on (later events overwrite it). `skaddr` values
//! are reused after free, so an entry is forgotten at `-> CLOSE`, and an open transition for an
//! address still in the table replaces the stale entry.
//!
//! ## What a port costs
//!
//! Each (service port, role) with its own series holds a slot of the port budget
//! (`max_ports` per role). A slot is given back when the port has held no socket and seen no
//! transition for the retirement time ([`Table::retire_idle`]); its series then disappear. When
//! the budget is full, a port that matters (a listener, an opening or established connection)
//! takes the slot of a port that holds no connection at all (only `TIME_WAIT`/orphans counted
//! from a dump, or nothing); ports with live connections are never evicted. Duration
//! histograms are kept per port only for the first `histogram_ports` ports per role to need
//! one, and only for the states in `duration_states`; the rest are observed into the role's
//! `other` histograms at once, so that every exported counter only grows.
//!
//! The code is split by concern: [`conn`] (what one socket is and the role rule), [`stats`]
//! (per-port aggregates, histograms and the port budget), [`apply`] (events) and
//! [`reconcile`] (sock_diag dumps: plan, then correct).
use std::ops::RangeInclusive;

use rustc_hash::FxHashMap;
use tcpstate_common::TcpState;

mod apply;
pub(crate) mod conn;
pub(crate) mod ephemeral;
pub(crate) mod reconcile;
pub(crate) mod stats;
#[cfg(test)]
mod tests;
pub(crate) mod timewait;

pub use conn::DEFAULT_EPHEMERAL;
pub(crate) use conn::{Conn, Endpoint, PortKey, Role, role_of};
use conn::{Tuple, complete};
use reconcile::RecentCloses;
pub(crate) use reconcile::ReconcileTotals;
pub(crate) use stats::DEFAULT_HISTOGRAM_PORTS;
use stats::Durations;
pub(crate) use stats::{BUCKETS_SECONDS, BudgetFull, Hist, PortStats};

use super::state::{DEFAULT_DURATION_STATES, StateSet};
pub(crate) use ephemeral::{DestUse, EphemeralUse};
use timewait::Timewaits;

/// An orphaned `FIN_WAIT2` (timewait) socket: counted, not tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Orphan {
    pub(crate) role: Role,
    pub(crate) key: PortKey,
    /// CLOCK_MONOTONIC ns when it entered `FIN_WAIT2`.
    pub(crate) since_ns: u64,
}

/// A lingering socket left its state: how, and what it was.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Departure {
    pub(crate) sock: u64,
    /// The connection as it was while lingering.
    pub(crate) conn: Conn,
    /// The state it went to (`CLOSE` when it is gone).
    pub(crate) to: TcpState,
    pub(crate) ts_ns: u64,
}

/// Counters of how the table had to cope with what it was fed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableCounters {
    /// Transitions applied.
    pub(crate) applied: u64,
    /// Open transitions for a socket address still in the table: its `-> CLOSE` was lost.
    pub(crate) stale_replaced: u64,
    /// Transitions whose old state disagreed with the table: events were lost in between.
    pub(crate) state_mismatches: u64,
    /// Sockets first seen in the middle of their life (opened before the agent started, or
    /// their open was lost); their role is inferred.
    pub(crate) first_seen_midlife: u64,
    /// Ports that gave their slot back after being idle.
    pub(crate) ports_retired: u64,
    /// Ports without connections whose slot went to a port that matters.
    pub(crate) ports_evicted: u64,
}

/// A consistent copy of the aggregates, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Sorted by (role, port). `current` includes the timewait sockets.
    pub(crate) ports: Vec<(Role, PortKey, PortStats)>,
    pub(crate) tracked_sockets: usize,
    pub(crate) counters: TableCounters,
    pub(crate) reconcile: ReconcileTotals,
    /// Ports with a slot, per role (`other` not included), and the budget.
    pub(crate) ports_tracked: [usize; 2],
    pub(crate) max_ports: usize,
    /// Orphaned FIN_WAIT2 sockets per (role, port): count, oldest entry time.
    pub(crate) orphans: Vec<(Role, PortKey, u64, u64)>,
    pub(crate) ephemeral: EphemeralUse,
}

/// The connection table.
pub struct Table {
    conns: FxHashMap<u64, Conn>,
    stats: FxHashMap<(Role, PortKey), Box<PortStats>>,
    /// Ports holding a slot, per role.
    slots: [usize; 2],
    max_ports: usize,
    durations: Durations,
    /// Aggregate per network namespace (`--per-netns`).
    per_netns: bool,
    /// Events carry the socket's namespace (the BTF offsets were found): match on it.
    netns_in_events: bool,
    overflow_reported: [bool; 2],
    /// Budgets found full since the table task last asked.
    budget_full: Vec<BudgetFull>,
    /// When the last search for an evictable port of each role found none (event time).
    evict_failed_ns: [Option<u64>; 2],
    /// (namespace, local port) with a listening socket, and how many.
    listening: FxHashMap<(u32, u16), u32>,
    /// `net.ipv4.ip_local_port_range`, to infer the role of sockets first seen mid-life.
    ephemeral: RangeInclusive<u16>,
    /// Each namespace's range, from the last dump (else `ephemeral`).
    ranges: FxHashMap<u32, RangeInclusive<u16>>,
    counters: TableCounters,
    departures: Vec<Departure>,
    /// Seeded sockets by 4-tuple, to adopt them when their real socket's events arrive.
    seeded_by_tuple: FxHashMap<Tuple, Vec<u64>>,
    next_synthetic: u64,
    recent_closes: RecentCloses,
    /// Timewait sockets, from the events that made them and from dumps.
    tw: Timewaits,
    /// Sockets their owner closed in `FIN_WAIT2`: their `-> CLOSE` makes an orphan's timewait
    /// socket.
    orphaned: rustc_hash::FxHashSet<u64>,
    /// `tcp_fin_timeout`: how long an orphan's timewait socket lives.
    fin_timeout_ns: u64,
    reconcile: ReconcileTotals,
}

impl Table {
    /// A table tracking at most `max_ports` distinct service ports per role.
    pub fn new(max_ports: usize, ephemeral: RangeInclusive<u16>) -> Self {
        Table {
            conns: FxHashMap::default(),
            stats: FxHashMap::default(),
            slots: [0; 2],
            max_ports,
            durations: Durations {
                slots: [0; 2],
                max_ports: DEFAULT_HISTOGRAM_PORTS,
                states: DEFAULT_DURATION_STATES,
            },
            per_netns: false,
            netns_in_events: false,
            overflow_reported: [false; 2],
            budget_full: Vec::new(),
            evict_failed_ns: [None; 2],
            listening: FxHashMap::default(),
            ephemeral,
            ranges: FxHashMap::default(),
            counters: TableCounters::default(),
            departures: Vec::new(),
            seeded_by_tuple: FxHashMap::default(),
            next_synthetic: 1,
            recent_closes: RecentCloses::default(),
            tw: Timewaits::default(),
            orphaned: rustc_hash::FxHashSet::default(),
            fin_timeout_ns: 60_000_000_000,
            reconcile: ReconcileTotals::default(),
        }
    }

    /// Aggregates per network namespace (metrics get a `netns` label).
    pub(crate) fn per_netns(mut self, on: bool) -> Self {
        self.per_netns = on;
        self
    }

    /// Whether events carry the socket's namespace, so that sock_diag sockets are matched on it.
    pub(crate) fn netns_in_events(mut self, on: bool) -> Self {
        self.netns_in_events = on;
        self
    }

    /// Ports per role with duration histograms of their own.
    pub(crate) fn histogram_ports(mut self, n: usize) -> Self {
        self.durations.max_ports = n;
        self
    }

    /// The states whose durations are observed.
    pub(crate) fn duration_states(mut self, states: StateSet) -> Self {
        self.durations.states = states;
        self
    }

    /// The namespace as the table keys it: 0 when events do not carry it.
    fn ns(&self, netns: u32) -> u32 {
        if self.netns_in_events { netns } else { 0 }
    }

    fn tuple(&self, netns: u32, local: impl Into<Endpoint>, remote: impl Into<Endpoint>) -> Tuple {
        Tuple {
            netns: self.ns(netns),
            local: local.into(),
            remote: remote.into(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn get(&self, sock: u64) -> Option<&Conn> {
        self.conns.get(&sock)
    }

    pub(crate) fn conns(&self) -> impl Iterator<Item = (&u64, &Conn)> {
        self.conns.iter()
    }

    /// Mutable access for the linger detector (it sets [`Conn::lingering`]).
    pub(crate) fn conns_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Conn)> {
        self.conns.iter_mut()
    }

    /// Port budgets found full since the last call (once per role), for the log.
    pub(crate) fn take_budget_full(&mut self) -> Vec<BudgetFull> {
        std::mem::take(&mut self.budget_full)
    }

    /// How lingering sockets left their state since the last call.
    pub(crate) fn take_departures(&mut self) -> Vec<Departure> {
        std::mem::take(&mut self.departures)
    }

    #[cfg(test)]
    pub(crate) fn counters(&self) -> TableCounters {
        self.counters
    }

    #[cfg(test)]
    pub(crate) fn stats(&self, role: Role, key: PortKey) -> Option<&PortStats> {
        self.stats.get(&(role, key)).map(|b| &**b)
    }

    /// Counts a crossing of the linger threshold on a port (`which` indexes
    /// [`crate::model::linger::LINGER_STATES`]).
    pub(crate) fn count_lingering(&mut self, role: Role, key: PortKey, which: usize) {
        if let Some(s) = self.stats.get_mut(&(role, key)) {
            s.lingering_detected[which] += 1;
        }
    }

    /// A consistent copy of the aggregates; ephemeral port use is left empty (it walks every
    /// client connection: [`Table::ephemeral_use`], for the views that show it).
    pub fn snapshot(&self) -> Snapshot {
        let mut ports: Vec<_> = self
            .stats
            .iter()
            .map(|(&(role, key), stats)| (role, key, (**stats).clone()))
            .collect();
        for (role, key, stats) in ports.iter_mut() {
            if let Some([tw, fw2]) = self.tw.of(*role, *key) {
                stats.current[TcpState::TimeWait.index()] += tw;
                stats.current[TcpState::FinWait2.index()] += fw2;
            }
        }
        ports.sort_by_key(|(role, key, _)| (*role, *key));
        let mut orphans: FxHashMap<(Role, PortKey), (u64, u64)> = FxHashMap::default();
        for o in &self.tw.orphans() {
            let slot = orphans.entry((o.role, o.key)).or_insert((0, u64::MAX));
            slot.0 += 1;
            slot.1 = slot.1.min(o.since_ns);
        }
        let mut orphans: Vec<_> = orphans
            .into_iter()
            .map(|((role, key), (n, oldest))| (role, key, n, oldest))
            .collect();
        orphans.sort();
        Snapshot {
            ports,
            tracked_sockets: self.conns.len(),
            counters: self.counters,
            reconcile: self.reconcile,
            ports_tracked: self.slots,
            max_ports: self.max_ports,
            orphans,
            ephemeral: EphemeralUse::default(),
        }
    }

    /// Removes a connection's contribution to the current counts.
    fn forget(&mut self, conn: &Conn) {
        if let Some(stats) = self.stats.get_mut(&(conn.role, conn.key)) {
            stats.remove(conn.state, conn.seeded);
        }
        if conn.listener {
            self.unlisten(conn.netns, conn.local.port());
        }
    }

    /// Orphaned FIN_WAIT2 (timewait) sockets.
    pub(crate) fn orphans(&self) -> Vec<Orphan> {
        self.tw.orphans()
    }

    /// Forgets the timewait sockets whose timer ran out, as the kernel does.
    pub(crate) fn expire_timewait(&mut self, now_ns: u64) {
        self.tw.expire(now_ns);
    }

    pub(crate) fn reconcile_totals(&self) -> ReconcileTotals {
        self.reconcile
    }

    fn unlisten(&mut self, netns: u32, port: u16) {
        let key = (self.ns(netns), port);
        if let Some(n) = self.listening.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.listening.remove(&key);
            }
        }
    }
}

/// Records how a lingering connection left its state, and ends its lingering: the one place a
/// departure is written, whether an event, a lost close or a dump ended it.
fn depart(departures: &mut Vec<Departure>, sock: u64, conn: &mut Conn, to: TcpState, ts_ns: u64) {
    if conn.lingering {
        departures.push(Departure {
            sock,
            conn: conn.clone(),
            to,
            ts_ns,
        });
        conn.lingering = false;
    }
}
