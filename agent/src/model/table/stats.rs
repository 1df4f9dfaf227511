//! Per-port aggregates: counts, transitions, histograms; and the port budget that bounds them.
use tcpstate_common::TcpState;

use super::{PortKey, Role, Table};
use crate::model::state::{STATES, StateSet};

/// The port budget of a role was found full for the first time: this port and the next ones
/// are counted under `other`. The table task logs it (the model does no I/O).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BudgetFull {
    pub(crate) role: Role,
    pub(crate) max_ports: usize,
    pub(crate) port: u16,
}

/// Ports per role with duration histograms of their own, by default.
pub(crate) const DEFAULT_HISTOGRAM_PORTS: usize = 8;

/// States that make a port worth a slot: it listens, or has connections opening or open.
pub(super) const MATTERS: StateSet = StateSet::of(&[
    TcpState::Listen,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
]);

/// Histogram bucket upper bounds in seconds: 100 µs to 1 h, about a decade apart, with 0.25 s
/// (a slow connect or accept) and 60 s (the default linger threshold and `tcp_fin_timeout`).
pub(crate) const BUCKETS_SECONDS: [f64; BUCKETS] = [
    0.0001, 0.001, 0.01, 0.1, 0.25, 1.0, 10.0, 60.0, 300.0, 3600.0,
];
pub(crate) const BUCKETS: usize = 10;
const BUCKETS_NS: [u64; BUCKETS] = {
    let mut out = [0u64; BUCKETS];
    let mut i = 0;
    while i < BUCKETS {
        out[i] = (BUCKETS_SECONDS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A fixed-bucket histogram of durations. Counts are per bucket (not cumulative); the `+Inf`
/// bucket is `count`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Hist {
    pub(crate) buckets: [u64; BUCKETS],
    pub(crate) count: u64,
    pub(crate) sum_seconds: f64,
}

impl Hist {
    pub(crate) fn observe_ns(&mut self, ns: u64) {
        let i = BUCKETS_NS.partition_point(|&bound| bound < ns);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.count += 1;
        self.sum_seconds += ns as f64 / 1e9;
    }

    /// Cumulative counts per bucket, as Prometheus wants them.
    pub(crate) fn cumulative(&self) -> [u64; BUCKETS] {
        let mut out = self.buckets;
        for i in 1..out.len() {
            out[i] += out[i - 1];
        }
        out
    }
}

/// Everything counted for one (service port, role).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PortStats {
    /// Connections currently in each state.
    pub(crate) current: [u64; STATES],
    /// The states this port has held since it got its slot: their gauges are exported, 0
    /// included, until the port retires.
    pub(crate) seen: StateSet,
    /// Transitions `[from][to]`.
    pub(crate) transitions: [[u64; STATES]; STATES],
    /// Whether the histograms below are this port's own (else they stay empty and its
    /// durations go to the role's `other`, whose histograms are always on).
    pub(crate) histograms: bool,
    /// Time spent in each state, observed when the state is left.
    pub(crate) state_durations: [Hist; STATES],
    /// Whole connection lifetimes, open to `CLOSE` (listeners excluded; only connections whose
    /// open the agent saw).
    pub(crate) lifetimes: Hist,
    /// Of `current`, those seeded from a sock_diag dump whose time in state is a lower bound.
    pub(crate) seeded: [u64; STATES],
    /// Connections that crossed the linger threshold, per [`crate::model::linger::LINGER_STATES`].
    pub(crate) lingering_detected: [u64; 2],
    /// CLOCK_MONOTONIC ns of the last transition or dump that found a socket on this port.
    pub(crate) last_active_ns: u64,
    /// The pid that opened the last client connection of this port to end in a reset or a
    /// failed connect (0: none, or unknown).
    pub(crate) last_abort_pid: u32,
    /// The pid that opened the last client connection of this port (0: none, or unknown).
    pub(crate) last_open_pid: u32,
    /// CLOCK_MONOTONIC ns when the port got its slot: its counters count from then (0: unknown,
    /// for `other`).
    pub(crate) counted_since_ns: u64,
}

impl PortStats {
    pub(super) fn add(&mut self, state: TcpState, seeded: bool) {
        self.current[state.index()] += 1;
        self.seen.insert(state);
        if seeded {
            self.seeded[state.index()] += 1;
        }
    }

    pub(super) fn remove(&mut self, state: TcpState, seeded: bool) {
        let slot = &mut self.current[state.index()];
        *slot = slot.saturating_sub(1);
        if seeded {
            let slot = &mut self.seeded[state.index()];
            *slot = slot.saturating_sub(1);
        }
    }

    pub(super) fn holds_nothing(&self) -> bool {
        self.current.iter().all(|&n| n == 0)
    }
}

/// A state's duration or a lifetime, in ns.
pub(super) enum Observe {
    State(TcpState, u64),
    Lifetime(u64),
}

impl Observe {
    pub(super) fn record_in(self, stats: &mut PortStats) {
        match self {
            Observe::State(state, ns) => stats.state_durations[state.index()].observe_ns(ns),
            Observe::Lifetime(ns) => stats.lifetimes.observe_ns(ns),
        }
    }
}

/// Which durations are observed, and which ports have histograms of their own.
pub(super) struct Durations {
    /// Ports with histograms of their own, per role.
    pub(super) slots: [usize; 2],
    pub(super) max_ports: usize,
    pub(super) states: StateSet,
}

impl Durations {
    /// Observes into the port's own histograms when it has (or can get) them; otherwise
    /// returns the observation, for its role's `other`. States outside `states` are dropped.
    pub(super) fn observe(
        &mut self,
        stats: &mut PortStats,
        role: Role,
        key: PortKey,
        what: Observe,
    ) -> Option<Observe> {
        if let Observe::State(state, _) = what
            && !self.states.contains(state)
        {
            return None;
        }
        if !stats.histograms && !key.is_other() {
            if self.slots[role.idx()] >= self.max_ports {
                return Some(what);
            }
            stats.histograms = true;
            self.slots[role.idx()] += 1;
        }
        what.record_in(stats);
        None
    }
}

/// After a search for an evictable port found none, the next waits this long (event time), so
/// that a full budget costs nothing per event.
const EVICT_RETRY_NS: u64 = 1_000_000_000;

impl Table {
    /// Gives back the slots of ports that hold no socket (timewait ones included, until
    /// they expire) and have seen no transition for `idle_ns`: their series disappear, and their
    /// counters start again from zero if they come back. `other` retires the same way.
    /// Returns how many retired.
    pub(crate) fn retire_idle(&mut self, now_ns: u64, idle_ns: u64) -> usize {
        self.tw.expire(now_ns);
        let idle: Vec<(Role, PortKey)> = self
            .stats
            .iter()
            .filter(|(k, s)| {
                s.holds_nothing()
                    && !self.tw.holds(k.0, k.1)
                    && now_ns.saturating_sub(s.last_active_ns) >= idle_ns
            })
            .map(|(k, _)| *k)
            .collect();
        for &(role, key) in &idle {
            self.remove_port(role, key);
        }
        self.counters.ports_retired += idle.len() as u64;
        if !idle.is_empty() {
            self.evict_failed_ns = [None; 2];
        }
        idle.len()
    }

    /// Drops a port's aggregate and gives its slots back.
    pub(super) fn remove_port(&mut self, role: Role, key: PortKey) {
        if let Some(s) = self.stats.remove(&(role, key))
            && !key.is_other()
        {
            self.slots[role.idx()] -= 1;
            if s.histograms {
                self.durations.slots[role.idx()] -= 1;
            }
        }
    }

    /// The aggregate key for a service port, bounded to `max_ports` distinct ports per role.
    /// A port that `matters` may take the slot of a port that holds no connection.
    pub(super) fn port_key(
        &mut self,
        role: Role,
        netns: u32,
        port: u16,
        matters: bool,
        now_ns: u64,
    ) -> PortKey {
        let key = if self.per_netns {
            PortKey::NsPort(netns, port)
        } else {
            PortKey::Port(port)
        };
        if self.stats.contains_key(&(role, key)) {
            return key;
        }
        if self.slots[role.idx()] >= self.max_ports && !(matters && self.evict_one(role, now_ns)) {
            if !self.overflow_reported[role.idx()] {
                self.overflow_reported[role.idx()] = true;
                self.budget_full.push(BudgetFull {
                    role,
                    max_ports: self.max_ports,
                    port,
                });
            }
            return key.other();
        }
        self.slots[role.idx()] += 1;
        self.stats.insert(
            (role, key),
            Box::new(PortStats {
                counted_since_ns: now_ns.max(1),
                ..PortStats::default()
            }),
        );
        key
    }

    /// Frees the slot of the least recently active port of `role` that holds no connection
    /// (its timewait counts move to `other`); false when every port holds one.
    pub(super) fn evict_one(&mut self, role: Role, now_ns: u64) -> bool {
        if self.evict_failed_ns[role.idx()]
            .is_some_and(|at| now_ns.saturating_sub(at) < EVICT_RETRY_NS)
        {
            return false;
        }
        let victim = self
            .stats
            .iter()
            .filter(|((r, k), s)| *r == role && !k.is_other() && s.holds_nothing())
            .min_by_key(|(_, s)| s.last_active_ns)
            .map(|(k, _)| *k);
        let Some((role, key)) = victim else {
            self.evict_failed_ns[role.idx()] = Some(now_ns);
            return false;
        };
        self.remove_port(role, key);
        self.counters.ports_evicted += 1;
        if self.tw.holds(role, key) {
            let other = self.stats.entry((role, key.other())).or_default();
            other.seen.insert(TcpState::TimeWait);
            other.seen.insert(TcpState::FinWait2);
            self.tw.rekey(role, key, key.other());
        }
        true
    }
}
