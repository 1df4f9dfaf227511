//! The live connection table and the per-port aggregates. Pure: no I/O, no clocks, no async.
//! One task owns it (see `daemon`) and feeds it [`Transition`]s in ring buffer order.
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
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use rustc_hash::{FxHashMap, FxHashSet, FxHasher};
use tcpstate_common::TcpState;

use crate::decode::Transition;
use crate::sockdiag::DiagSocket;

/// Both ports known (a listener has no remote port).
fn complete(c: &Conn) -> bool {
    c.local.port() != 0 && (c.remote.port() != 0 || c.listener)
}

/// Number of state slots (`TcpState::index` is 0..12).
pub const STATES: usize = 12;

/// A set of states, one bit per [`TcpState::index`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSet(u16);

/// As `--check-config` shows it: `["syn_sent", "established"]`.
impl std::fmt::Debug for StateSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.states().map(|s| s.label()))
            .finish()
    }
}

impl StateSet {
    pub const fn of(states: &[TcpState]) -> StateSet {
        let mut bits = 0u16;
        let mut i = 0;
        while i < states.len() {
            bits |= 1 << states[i].index();
            i += 1;
        }
        StateSet(bits)
    }

    pub fn contains(self, s: TcpState) -> bool {
        self.0 & (1 << s.index()) != 0
    }

    pub fn insert(&mut self, s: TcpState) {
        self.0 |= 1 << s.index();
    }

    pub fn states(self) -> impl Iterator<Item = TcpState> {
        TcpState::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

/// The states whose durations get histograms by default: connect (`syn_sent`), accept
/// (`syn_recv`), the connection's useful life (`established`), and the ends operators chase
/// (`close_wait`, `fin_wait2`, `last_ack`).
pub const DEFAULT_DURATION_STATES: StateSet = StateSet::of(&[
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::CloseWait,
    TcpState::FinWait2,
    TcpState::LastAck,
]);

/// Ports per role with duration histograms of their own, by default.
pub const DEFAULT_HISTOGRAM_PORTS: usize = 8;

/// States that make a port worth a slot: it listens, or has connections opening or open.
const MATTERS: StateSet = StateSet::of(&[
    TcpState::Listen,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
]);

/// Which end of the connection this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Accepted (passive open) or listening: the service port is the local port.
    Server,
    /// Connected (active open): the service port is the remote port.
    Client,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Server, Role::Client];

    pub const fn label(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }

    const fn idx(self) -> usize {
        self as usize
    }
}

/// A service port, or the bucket for ports beyond the cardinality limit; with `--per-netns`,
/// qualified by the network namespace inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortKey {
    Port(u16),
    Other,
    NsPort(u32, u16),
    NsOther(u32),
}

impl PortKey {
    /// Label value: the number, or `other`.
    pub fn label(self) -> String {
        match self {
            PortKey::Port(p) | PortKey::NsPort(_, p) => p.to_string(),
            PortKey::Other | PortKey::NsOther(_) => "other".to_string(),
        }
    }

    /// The namespace, when aggregates are per namespace.
    pub fn netns(self) -> Option<u32> {
        match self {
            PortKey::NsPort(n, _) | PortKey::NsOther(n) => Some(n),
            _ => None,
        }
    }

    /// The `other` bucket of the same namespace.
    fn other(self) -> PortKey {
        match self {
            PortKey::NsPort(n, _) | PortKey::NsOther(n) => PortKey::NsOther(n),
            _ => PortKey::Other,
        }
    }

    fn is_other(self) -> bool {
        matches!(self, PortKey::Other | PortKey::NsOther(_))
    }
}

/// Histogram bucket upper bounds in seconds: 100 µs to 1 h, about a decade apart, with 0.25 s
/// (a slow connect or accept) and 60 s (the default linger threshold and `tcp_fin_timeout`).
pub const BUCKETS_SECONDS: [f64; BUCKETS] = [
    0.0001, 0.001, 0.01, 0.1, 0.25, 1.0, 10.0, 60.0, 300.0, 3600.0,
];
pub const BUCKETS: usize = 10;
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
pub struct Hist {
    pub buckets: [u64; BUCKETS],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Hist {
    pub fn observe_ns(&mut self, ns: u64) {
        let i = BUCKETS_NS.partition_point(|&bound| bound < ns);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.count += 1;
        self.sum_seconds += ns as f64 / 1e9;
    }

    /// Cumulative counts per bucket, as Prometheus wants them.
    pub fn cumulative(&self) -> [u64; BUCKETS] {
        let mut out = self.buckets;
        for i in 1..out.len() {
            out[i] += out[i - 1];
        }
        out
    }
}

/// Everything counted for one (service port, role).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortStats {
    /// Connections currently in each state.
    pub current: [u64; STATES],
    /// The states this port has held since it got its slot: their gauges are exported, 0
    /// included, until the port retires.
    pub seen: StateSet,
    /// Transitions `[from][to]`.
    pub transitions: [[u64; STATES]; STATES],
    /// Whether the histograms below are this port's own (else they stay empty and its
    /// durations go to the role's `other`, whose histograms are always on).
    pub histograms: bool,
    /// Time spent in each state, observed when the state is left.
    pub state_durations: [Hist; STATES],
    /// Whole connection lifetimes, open to `CLOSE` (listeners excluded; only connections whose
    /// open the agent saw).
    pub lifetimes: Hist,
    /// Of `current`, those seeded from a sock_diag dump whose time in state is a lower bound.
    pub seeded: [u64; STATES],
    /// Connections that crossed the linger threshold, per [`crate::alerts::LINGER_STATES`].
    pub lingering_detected: [u64; 2],
    /// CLOCK_MONOTONIC ns of the last transition or dump that found a socket on this port.
    pub last_active_ns: u64,
}

impl PortStats {
    fn add(&mut self, state: TcpState, seeded: bool) {
        self.current[state.index()] += 1;
        self.seen.insert(state);
        if seeded {
            self.seeded[state.index()] += 1;
        }
    }

    fn remove(&mut self, state: TcpState, seeded: bool) {
        let slot = &mut self.current[state.index()];
        *slot = slot.saturating_sub(1);
        if seeded {
            let slot = &mut self.seeded[state.index()];
            *slot = slot.saturating_sub(1);
        }
    }

    fn holds_nothing(&self) -> bool {
        self.current.iter().all(|&n| n == 0)
    }
}

/// A socket address in 20 bytes instead of `SocketAddr`'s 32: events and dumps build theirs
/// with flow info and scope id 0, so nothing is lost.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    port: u16,
}

impl Endpoint {
    pub fn port(self) -> u16 {
        self.port
    }

    pub fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// One live socket (88 bytes: it is held once per socket of the host).
#[derive(Clone, Debug, PartialEq)]
pub struct Conn {
    pub local: Endpoint,
    pub remote: Endpoint,
    /// CLOCK_MONOTONIC ns when it entered `state`.
    pub since_ns: u64,
    /// When it was opened, if the agent saw the open (0: it did not).
    pub opened_ns: u64,
    /// Where it is counted (the service port, or `other` beyond the limit).
    pub key: PortKey,
    pub netns: u32,
    /// The task that opened it (meaningful for active opens only), 0 when unknown.
    pub pid: u32,
    /// Socket inode from sock_diag (0 until a dump matched it): the key to its owner.
    pub inode: u32,
    /// The service port (local for servers, remote for clients).
    pub service_port: u16,
    pub role: Role,
    pub state: TcpState,
    pub listener: bool,
    /// Set by the linger detector once the socket stayed too long in its state; the table then
    /// reports how it leaves (see [`Table::take_departures`]).
    pub lingering: bool,
    /// Known from a sock_diag dump, not from its transitions: `since_ns` is when the agent first
    /// saw it in this state, a lower bound of its time there.
    pub seeded: bool,
}

/// What one reconciliation corrected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Corrections {
    /// In the table, gone from the kernel: dropped.
    pub stale: u64,
    /// In the kernel, missing from the table: added.
    pub missing: u64,
    /// In both, in different states: the kernel's state taken.
    pub state: u64,
}

/// Totals over every reconciliation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileTotals {
    pub runs: u64,
    pub corrections: Corrections,
    /// CLOCK_MONOTONIC ns of the last one, 0 before the first.
    pub last_ns: u64,
}

/// Synthetic keys for sockets known only from sock_diag start at 1; kernel addresses live in the
/// top half of the address space, so the two never meet.
const SYNTHETIC_LIMIT: u64 = 1 << 47;

/// Closes remembered for reconciliation: a socket that closed while a dump ran must not come
/// back from that dump.
const RECENT_CLOSES: usize = 65_536;

/// After a search for an evictable port found none, the next waits this long (event time), so
/// that a full budget costs nothing per event.
const EVICT_RETRY_NS: u64 = 1_000_000_000;

/// (network namespace, local, remote); the namespace is 0 when events do not carry it.
type Tuple = (u32, Endpoint, Endpoint);

/// A 64-bit digest of a tuple: what reconciliation sorts and remembers, instead of the
/// 68-byte tuple (matches are confirmed on the whole tuple).
fn digest(t: &Tuple) -> u64 {
    let mut h = FxHasher::default();
    t.hash(&mut h);
    h.finish()
}

/// Role and service port of a socket first seen without its open (a mid-life event or a
/// sock_diag dump), by one rule: a local port with a listener in the socket's namespace makes
/// it a server; otherwise the end in the ephemeral range (`ip_local_port_range`) is the
/// client's; otherwise the lower port is the service.
pub fn role_of(
    local_listens: bool,
    local: u16,
    remote: u16,
    ephemeral: &RangeInclusive<u16>,
) -> (Role, u16) {
    let eph = |p| ephemeral.contains(&p);
    let server = if local_listens {
        true
    } else if eph(local) != eph(remote) {
        // Exactly one end is ephemeral: that one is the client.
        eph(remote)
    } else {
        // No better clue: the lower port is the service.
        local <= remote
    };
    if server {
        (Role::Server, local)
    } else {
        (Role::Client, remote)
    }
}

/// A lingering socket left its state: how, and what it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Departure {
    pub sock: u64,
    /// The connection as it was while lingering.
    pub conn: Conn,
    /// The state it went to (`CLOSE` when it is gone).
    pub to: TcpState,
    pub ts_ns: u64,
}

/// Counters of how the table had to cope with what it was fed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounters {
    /// Transitions applied.
    pub applied: u64,
    /// Open transitions for a socket address still in the table: its `-> CLOSE` was lost.
    pub stale_replaced: u64,
    /// Transitions whose old state disagreed with the table: events were lost in between.
    pub state_mismatches: u64,
    /// Sockets first seen in the middle of their life (opened before the agent started, or
    /// their open was lost); their role is inferred.
    pub first_seen_midlife: u64,
    /// Ports that gave their slot back after being idle.
    pub ports_retired: u64,
    /// Ports without connections whose slot went to a port that matters.
    pub ports_evicted: u64,
}

/// A consistent copy of the aggregates, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Sorted by (role, port). `current` includes the timewait sockets of the last dump.
    pub ports: Vec<(Role, PortKey, PortStats)>,
    pub tracked_sockets: usize,
    pub counters: TableCounters,
    pub reconcile: ReconcileTotals,
    /// Ports with a slot, per role (`other` not included), and the budget.
    pub ports_tracked: [usize; 2],
    pub max_ports: usize,
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
    /// When the last search for an evictable port of each role found none (event time).
    evict_failed_ns: [Option<u64>; 2],
    /// (namespace, local port) with a listening socket, and how many.
    listening: FxHashMap<(u32, u16), u32>,
    /// `net.ipv4.ip_local_port_range`, to infer the role of sockets first seen mid-life.
    ephemeral: RangeInclusive<u16>,
    counters: TableCounters,
    departures: Vec<Departure>,
    /// Seeded sockets by 4-tuple, to adopt them when their real socket's events arrive.
    seeded_by_tuple: FxHashMap<Tuple, Vec<u64>>,
    next_synthetic: u64,
    /// Digests of the tuples of recent closes, with when.
    recent_closes: std::collections::VecDeque<(u64, u64)>,
    /// Timewait sockets from the last dump, per (role, port): `[TIME_WAIT, FIN_WAIT2]`.
    timewait: FxHashMap<(Role, PortKey), [u64; 2]>,
    /// Orphaned FIN_WAIT2 (timewait) sockets from the last dump: when they entered the state.
    orphans: Vec<(Role, PortKey, u64)>,
    reconcile: ReconcileTotals,
}

/// The kernel's default `net.ipv4.ip_local_port_range`.
pub const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

/// A state's duration or a lifetime, in ns.
enum Observe {
    State(TcpState, u64),
    Lifetime(u64),
}

impl Observe {
    fn record_in(self, stats: &mut PortStats) {
        match self {
            Observe::State(state, ns) => stats.state_durations[state.index()].observe_ns(ns),
            Observe::Lifetime(ns) => stats.lifetimes.observe_ns(ns),
        }
    }
}

/// Which durations are observed, and which ports have histograms of their own.
struct Durations {
    /// Ports with histograms of their own, per role.
    slots: [usize; 2],
    max_ports: usize,
    states: StateSet,
}

impl Durations {
    /// Observes into the port's own histograms when it has (or can get) them; otherwise
    /// returns the observation, for its role's `other`. States outside `states` are dropped.
    fn observe(
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
            evict_failed_ns: [None; 2],
            listening: FxHashMap::default(),
            ephemeral,
            counters: TableCounters::default(),
            departures: Vec::new(),
            seeded_by_tuple: FxHashMap::default(),
            next_synthetic: 1,
            recent_closes: std::collections::VecDeque::new(),
            timewait: FxHashMap::default(),
            orphans: Vec::new(),
            reconcile: ReconcileTotals::default(),
        }
    }

    /// Aggregates per network namespace (metrics get a `netns` label).
    pub fn per_netns(mut self, on: bool) -> Self {
        self.per_netns = on;
        self
    }

    /// Whether events carry the socket's namespace, so that sock_diag sockets are matched on it.
    pub fn netns_in_events(mut self, on: bool) -> Self {
        self.netns_in_events = on;
        self
    }

    /// Ports per role with duration histograms of their own.
    pub fn histogram_ports(mut self, n: usize) -> Self {
        self.durations.max_ports = n;
        self
    }

    /// The states whose durations are observed.
    pub fn duration_states(mut self, states: StateSet) -> Self {
        self.durations.states = states;
        self
    }

    /// The namespace as the table keys it: 0 when events do not carry it.
    fn ns(&self, netns: u32) -> u32 {
        if self.netns_in_events { netns } else { 0 }
    }

    fn tuple(&self, netns: u32, local: impl Into<Endpoint>, remote: impl Into<Endpoint>) -> Tuple {
        (self.ns(netns), local.into(), remote.into())
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, sock: u64) -> Option<&Conn> {
        self.conns.get(&sock)
    }

    pub fn conns(&self) -> impl Iterator<Item = (&u64, &Conn)> {
        self.conns.iter()
    }

    /// Mutable access for the linger detector (it sets [`Conn::lingering`]).
    pub fn conns_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Conn)> {
        self.conns.iter_mut()
    }

    /// How lingering sockets left their state since the last call.
    pub fn take_departures(&mut self) -> Vec<Departure> {
        std::mem::take(&mut self.departures)
    }

    pub fn counters(&self) -> TableCounters {
        self.counters
    }

    pub fn stats(&self, role: Role, key: PortKey) -> Option<&PortStats> {
        self.stats.get(&(role, key)).map(|b| &**b)
    }

    /// Counts a crossing of the linger threshold on a port (`which` indexes
    /// [`crate::alerts::LINGER_STATES`]).
    pub fn count_lingering(&mut self, role: Role, key: PortKey, which: usize) {
        if let Some(s) = self.stats.get_mut(&(role, key)) {
            s.lingering_detected[which] += 1;
        }
    }

    /// Applies one transition.
    pub fn apply(&mut self, t: &Transition) {
        use TcpState::*;
        self.counters.applied += 1;
        let open = match (t.old, t.new) {
            (Close, SynSent) => Some((Role::Client, t.remote.port(), false)),
            (Listen, SynRecv) => Some((Role::Server, t.local.port(), false)),
            (Close, Listen) => Some((Role::Server, t.local.port(), true)),
            _ => None,
        };
        if open.is_some()
            && let Some(stale) = self.conns.remove(&t.sock)
        {
            self.counters.stale_replaced += 1;
            self.forget(&stale);
            if stale.lingering {
                // Its close was lost; it is gone all the same.
                self.departures.push(Departure {
                    sock: t.sock,
                    conn: stale,
                    to: TcpState::Close,
                    ts_ns: t.ts_ns,
                });
            }
        }

        if open.is_none() && !self.seeded_by_tuple.is_empty() && !self.conns.contains_key(&t.sock) {
            // A socket known from sock_diag shows itself: it is the same socket.
            let tuple = self.tuple(t.netns, t.local, t.remote);
            if let Some(synthetic) = self.take_seeded(&tuple) {
                let conn = self.conns.remove(&synthetic).expect("indexed");
                self.conns.insert(t.sock, conn);
            }
        }

        if self.conns.contains_key(&t.sock) {
            self.apply_known(t);
        } else {
            self.apply_new(t, open);
        }
    }

    /// A transition of a socket in the table. One lookup of the port's aggregate per
    /// transition: a duration for a port without histograms of its own goes to `other` after.
    fn apply_known(&mut self, t: &Transition) {
        let conn = self.conns.get_mut(&t.sock).expect("checked");
        let (role, key) = (conn.role, conn.key);
        let stats = self
            .stats
            .get_mut(&(role, key))
            .expect("every tracked connection has its aggregate");
        stats.last_active_ns = stats.last_active_ns.max(t.ts_ns);
        stats.transitions[t.old.index()][t.new.index()] += 1;
        if conn.state != t.old {
            self.counters.state_mismatches += 1;
        }
        if t.old == t.new && conn.state == t.new {
            // A self-transition: close() of a socket already in FIN_WAIT2 sets the state
            // again. A transition the kernel made, but the socket stays where it was: no
            // duration, no new entry time, and a lingering socket goes on lingering.
            return;
        }
        if conn.lingering {
            // Only sockets already lingering pay for this, once.
            self.departures.push(Departure {
                sock: t.sock,
                conn: conn.clone(),
                to: t.new,
                ts_ns: t.ts_ns,
            });
            conn.lingering = false;
        }
        // From here on the time in state is exact.
        stats.remove(conn.state, conn.seeded);
        conn.seeded = false;
        // The program's own clock is authoritative; fall back to ours if its entry was
        // evicted, but only when we know the socket was in that state.
        let spent = t
            .prev_state_ns
            .or_else(|| (conn.state == t.old).then(|| t.ts_ns.saturating_sub(conn.since_ns)));
        let mut fold = [None, None];
        if let Some(ns) = spent {
            fold[0] = self
                .durations
                .observe(stats, role, key, Observe::State(t.old, ns));
        }
        if t.new == TcpState::Close {
            if conn.opened_ns != 0 && !conn.listener {
                let life = Observe::Lifetime(t.ts_ns.saturating_sub(conn.opened_ns));
                fold[1] = self.durations.observe(stats, role, key, life);
            }
            let conn = self.conns.remove(&t.sock).expect("present");
            if conn.listener {
                self.unlisten(conn.netns, conn.local.port());
            }
            if self.recent_closes.len() == RECENT_CLOSES {
                self.recent_closes.pop_front();
            }
            let tuple = self.tuple(conn.netns, conn.local, conn.remote);
            self.recent_closes.push_back((digest(&tuple), t.ts_ns));
        } else {
            stats.add(t.new, false);
            conn.state = t.new;
            conn.since_ns = t.ts_ns;
            // Half-built tuples (port 0) appear in the open events; keep what we know.
            let was_complete = complete(conn);
            if t.local.port() != 0 {
                conn.local = t.local.into();
            }
            if t.remote.port() != 0 {
                conn.remote = t.remote.into();
            }
            if !was_complete && complete(conn) {
                let (netns, local, remote) = (conn.netns, conn.local, conn.remote);
                let tuple = self.tuple(netns, local, remote);
                self.drop_seeded_twin(&tuple);
            }
        }
        for what in fold.into_iter().flatten() {
            self.observe_other(role, key, what);
        }
    }

    /// The first transition of a socket not in the table: an open, or a mid-life sighting.
    fn apply_new(&mut self, t: &Transition, open: Option<(Role, u16, bool)>) {
        let (role, service_port, listener) = match open {
            Some(o) => o,
            None => {
                self.counters.first_seen_midlife += 1;
                let listens = self
                    .listening
                    .contains_key(&(self.ns(t.netns), t.local.port()));
                let (role, port) = role_of(
                    listens || t.new == TcpState::Listen,
                    t.local.port(),
                    t.remote.port(),
                    &self.ephemeral,
                );
                (role, port, t.new == TcpState::Listen)
            }
        };
        let matters = MATTERS.contains(t.new);
        let key = self.port_key(role, t.netns, service_port, matters, t.ts_ns);
        let stats = self.stats.entry((role, key)).or_default();
        stats.last_active_ns = stats.last_active_ns.max(t.ts_ns);
        stats.transitions[t.old.index()][t.new.index()] += 1;
        let mut fold = None;
        if open.is_none()
            && let Some(ns) = t.prev_state_ns
        {
            fold = self
                .durations
                .observe(stats, role, key, Observe::State(t.old, ns));
        }
        if t.new != TcpState::Close {
            stats.add(t.new, false);
        }
        if let Some(what) = fold {
            self.observe_other(role, key, what);
        }
        if t.new == TcpState::Close {
            return;
        }
        if listener {
            *self
                .listening
                .entry((self.ns(t.netns), t.local.port()))
                .or_default() += 1;
        }
        let conn = Conn {
            local: t.local.into(),
            remote: t.remote.into(),
            role,
            service_port,
            key,
            state: t.new,
            since_ns: t.ts_ns,
            opened_ns: if open.is_some() { t.ts_ns.max(1) } else { 0 },
            listener,
            netns: t.netns,
            pid: if role == Role::Client { t.pid } else { 0 },
            lingering: false,
            seeded: false,
            inode: 0,
        };
        // Some opens carry the whole tuple already (a listener; on recent kernels an accepted
        // socket's LISTEN -> SYN_RECV too).
        if complete(&conn) {
            let tuple = self.tuple(conn.netns, conn.local, conn.remote);
            self.drop_seeded_twin(&tuple);
        }
        self.conns.insert(t.sock, conn);
    }

    /// Observes a duration of a port without histograms of its own into its role's `other`.
    fn observe_other(&mut self, role: Role, key: PortKey, what: Observe) {
        let other = self.stats.entry((role, key.other())).or_default();
        what.record_in(other);
    }

    /// A dump that ran while a socket opened may have added it already, before the socket's own
    /// events reached the table: the seeded copy goes.
    fn drop_seeded_twin(&mut self, tuple: &Tuple) {
        if self.seeded_by_tuple.is_empty() {
            return;
        }
        if let Some(dup) = self.take_seeded(tuple) {
            let dup = self.conns.remove(&dup).expect("indexed");
            self.forget(&dup);
        }
    }

    /// A consistent copy of the aggregates.
    pub fn snapshot(&self) -> Snapshot {
        let mut ports: Vec<_> = self
            .stats
            .iter()
            .map(|(&(role, key), stats)| (role, key, (**stats).clone()))
            .collect();
        for (role, key, stats) in ports.iter_mut() {
            if let Some([tw, fw2]) = self.timewait.get(&(*role, *key)) {
                stats.current[TcpState::TimeWait.index()] += tw;
                stats.current[TcpState::FinWait2.index()] += fw2;
            }
        }
        ports.sort_by_key(|(role, key, _)| (*role, *key));
        Snapshot {
            ports,
            tracked_sockets: self.conns.len(),
            counters: self.counters,
            reconcile: self.reconcile,
            ports_tracked: self.slots,
            max_ports: self.max_ports,
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

    /// Orphaned FIN_WAIT2 sockets of the last dump: (role, port, entered state at).
    pub fn orphans(&self) -> &[(Role, PortKey, u64)] {
        &self.orphans
    }

    pub fn reconcile_totals(&self) -> ReconcileTotals {
        self.reconcile
    }

    /// Gives back the slots of ports that hold no socket (timewait ones from the last dump
    /// included) and have seen no transition for `idle_ns`: their series disappear, and their
    /// counters start again from zero if they come back. `other` retires the same way.
    /// Returns how many retired.
    pub fn retire_idle(&mut self, now_ns: u64, idle_ns: u64) -> usize {
        let idle: Vec<(Role, PortKey)> = self
            .stats
            .iter()
            .filter(|(k, s)| {
                s.holds_nothing()
                    && !self.timewait.contains_key(k)
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
    fn remove_port(&mut self, role: Role, key: PortKey) {
        if let Some(s) = self.stats.remove(&(role, key))
            && !key.is_other()
        {
            self.slots[role.idx()] -= 1;
            if s.histograms {
                self.durations.slots[role.idx()] -= 1;
            }
        }
    }

    /// Repairs the table from a sock_diag dump of every namespace that started at `started_ns`
    /// (CLOCK_MONOTONIC) and is applied at `now_ns`. Sockets are matched by 4-tuple (sock_diag
    /// reports a cookie, not the kernel address events carry). Only entries unchanged since the
    /// dump started are corrected, and a socket that closed while it ran is not brought back:
    /// events racing the dump win. With an empty table this is the seeding at start.
    pub fn reconcile(
        &mut self,
        dump: &[DiagSocket],
        started_ns: u64,
        now_ns: u64,
        fin_timeout: std::time::Duration,
    ) -> Corrections {
        let listening: FxHashSet<(u32, u16)> = dump
            .iter()
            .filter(|d| d.state == TcpState::Listen)
            .map(|d| (d.netns, d.local.port()))
            .collect();
        let plan = self.plan(dump, started_ns);
        let c = self.correct(dump, plan, &listening, now_ns);
        self.count_timewait(dump, &listening, now_ns, fin_timeout);
        self.reconcile.runs += 1;
        self.reconcile.last_ns = now_ns;
        self.reconcile.corrections.stale += c.stale;
        self.reconcile.corrections.missing += c.missing;
        self.reconcile.corrections.state += c.state;
        c
    }

    /// What a dump says must change: sockets to drop, to restate, and dump entries to add.
    /// Both sides are sorted by tuple digest and merged, so the only memory this takes is two
    /// flat arrays of digests, whatever the number of sockets.
    fn plan(&self, dump: &[DiagSocket], started_ns: u64) -> Plan {
        use TcpState::*;
        let closed_during: FxHashSet<u64> = self
            .recent_closes
            .iter()
            .filter(|(_, ts)| *ts >= started_ns)
            .map(|(d, _)| *d)
            .collect();
        // Sockets still opening have half a tuple in their events (the local port of a connect
        // or the remote port of an accept is 0): match them on the half that is known.
        let connecting: FxHashSet<SocketAddr> = dump
            .iter()
            .filter(|d| d.state == SynSent)
            .map(|d| d.remote)
            .collect();
        let accepting: FxHashSet<SocketAddr> = dump
            .iter()
            .filter(|d| d.state == SynRecv)
            .map(|d| d.local)
            .collect();

        let mut plan = Plan::default();
        // (digest, index in the dump)
        let mut theirs: Vec<(u64, u32)> = dump
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.timewait)
            .map(|(i, d)| (digest(&self.tuple(d.netns, d.local, d.remote)), i as u32))
            .collect();
        theirs.sort_unstable();
        // (digest, entry time, socket)
        let mut mine: Vec<(u64, u64, u64)> = Vec::with_capacity(self.conns.len());
        for (&sock, conn) in &self.conns {
            if complete(conn) {
                let tuple = self.tuple(conn.netns, conn.local, conn.remote);
                mine.push((digest(&tuple), conn.since_ns, sock));
            } else if conn.since_ns < started_ns {
                // Its next event was lost, or it is gone.
                let alive = match conn.state {
                    SynSent => connecting.contains(&conn.remote.addr()),
                    SynRecv => accepting.contains(&conn.local.addr()),
                    _ => false,
                };
                if !alive {
                    plan.drop.push(sock);
                }
            }
        }
        mine.sort_unstable();

        let (mut i, mut j) = (0, 0);
        while i < mine.len() || j < theirs.len() {
            let di = mine.get(i).map_or(u64::MAX, |m| m.0);
            let dj = theirs.get(j).map_or(u64::MAX, |t| t.0);
            let d = di.min(dj);
            let i_end = i + mine[i..].iter().take_while(|m| m.0 == d).count();
            let j_end = j + theirs[j..].iter().take_while(|t| t.0 == d).count();
            self.plan_group(
                dump,
                &mine[i..i_end],
                &theirs[j..j_end],
                started_ns,
                closed_during.contains(&d),
                &mut plan,
            );
            (i, j) = (i_end, j_end);
        }
        plan
    }

    /// One digest's sockets of both sides (almost always one each, or one alone): pairs them
    /// by whole tuple, the table's oldest first.
    fn plan_group(
        &self,
        dump: &[DiagSocket],
        mine: &[(u64, u64, u64)],
        theirs: &[(u64, u32)],
        started_ns: u64,
        closed_during: bool,
        plan: &mut Plan,
    ) {
        // Almost every group has one socket a side: no allocation for those.
        let (mut few, mut many) = ([false; 8], Vec::new());
        let taken: &mut [bool] = if theirs.len() <= few.len() {
            &mut few[..theirs.len()]
        } else {
            many.resize(theirs.len(), false);
            &mut many
        };
        for &(_, since, sock) in mine {
            let conn = &self.conns[&sock];
            let found = theirs.iter().enumerate().position(|(n, (_, k))| {
                let k = &dump[*k as usize];
                !taken[n]
                    && self.tuple(k.netns, k.local, k.remote)
                        == self.tuple(conn.netns, conn.local, conn.remote)
            });
            match found {
                Some(n) => {
                    taken[n] = true;
                    let k = theirs[n].1;
                    plan.matched.push((sock, k));
                    if conn.state != dump[k as usize].state && since < started_ns {
                        plan.restate.push((sock, dump[k as usize].state));
                    }
                }
                None if since < started_ns => plan.drop.push(sock),
                None => {}
            }
        }
        if closed_during {
            return;
        }
        for (n, &(_, k)) in theirs.iter().enumerate() {
            let state = dump[k as usize].state;
            if !taken[n] && !matches!(state, TcpState::SynSent | TcpState::SynRecv) {
                plan.add.push(k);
            }
        }
    }

    /// Carries out a plan; returns what it corrected.
    fn correct(
        &mut self,
        dump: &[DiagSocket],
        plan: Plan,
        listening: &FxHashSet<(u32, u16)>,
        now_ns: u64,
    ) -> Corrections {
        let mut c = Corrections::default();
        for (sock, k) in plan.matched {
            let k = &dump[k as usize];
            if let Some(conn) = self.conns.get_mut(&sock) {
                conn.inode = k.inode;
                if conn.netns == 0 {
                    conn.netns = k.netns;
                }
            }
        }
        for sock in plan.drop {
            let conn = self.conns.remove(&sock).expect("listed");
            self.forget(&conn);
            let tuple = self.tuple(conn.netns, conn.local, conn.remote);
            if let Some(v) = self.seeded_by_tuple.get_mut(&tuple) {
                v.retain(|s| *s != sock);
            }
            if conn.lingering {
                self.departures.push(Departure {
                    sock,
                    conn,
                    to: TcpState::Close,
                    ts_ns: now_ns,
                });
            }
            c.stale += 1;
        }
        for (sock, state) in plan.restate {
            let conn = self.conns.get_mut(&sock).expect("listed");
            let stats = self
                .stats
                .get_mut(&(conn.role, conn.key))
                .expect("aggregate");
            stats.remove(conn.state, conn.seeded);
            if conn.lingering {
                self.departures.push(Departure {
                    sock,
                    conn: conn.clone(),
                    to: state,
                    ts_ns: now_ns,
                });
                conn.lingering = false;
            }
            conn.state = state;
            conn.since_ns = now_ns;
            conn.seeded = true;
            stats.add(state, true);
            stats.last_active_ns = stats.last_active_ns.max(now_ns);
            c.state += 1;
        }
        for k in plan.add {
            self.add_seeded(&dump[k as usize], listening, now_ns);
            c.missing += 1;
        }
        c
    }

    /// Timewait sockets: counted per port from the dump, never tracked one by one.
    fn count_timewait(
        &mut self,
        dump: &[DiagSocket],
        listening: &FxHashSet<(u32, u16)>,
        now_ns: u64,
        fin_timeout: std::time::Duration,
    ) {
        use TcpState::*;
        self.timewait.clear();
        self.orphans.clear();
        for d in dump.iter().filter(|d| d.timewait) {
            let (role, port) = self.dump_role(d, listening);
            let key = self.port_key(role, d.netns, port, false, now_ns);
            let stats = self.stats.entry((role, key)).or_default();
            stats.seen.insert(d.state);
            stats.last_active_ns = stats.last_active_ns.max(now_ns);
            let slot = self.timewait.entry((role, key)).or_default();
            match d.state {
                TimeWait => slot[0] += 1,
                FinWait2 => {
                    slot[1] += 1;
                    // The kernel arms an orphaned FIN_WAIT2 socket's timer with
                    // tcp_fin_timeout when it enters the state: what is spent is the age.
                    let left = d.timer_left.unwrap_or_default();
                    let age = fin_timeout.saturating_sub(left).as_nanos() as u64;
                    self.orphans.push((role, key, now_ns.saturating_sub(age)));
                }
                _ => {}
            }
        }
    }

    fn dump_role(&self, d: &DiagSocket, listening: &FxHashSet<(u32, u16)>) -> (Role, u16) {
        let listens = d.state == TcpState::Listen || listening.contains(&(d.netns, d.local.port()));
        role_of(listens, d.local.port(), d.remote.port(), &self.ephemeral)
    }

    fn add_seeded(&mut self, d: &DiagSocket, listening: &FxHashSet<(u32, u16)>, now_ns: u64) {
        let (role, service_port) = self.dump_role(d, listening);
        let key = self.port_key(
            role,
            d.netns,
            service_port,
            MATTERS.contains(d.state),
            now_ns,
        );
        let stats = self.stats.entry((role, key)).or_default();
        stats.add(d.state, true);
        stats.last_active_ns = stats.last_active_ns.max(now_ns);
        let listener = d.state == TcpState::Listen;
        if listener {
            *self
                .listening
                .entry((self.ns(d.netns), d.local.port()))
                .or_default() += 1;
        }
        // Never over an entry in use (kernel addresses cannot be below SYNTHETIC_LIMIT, but a
        // synthetic key that wrapped around could still be taken).
        let mut sock = self.next_synthetic;
        while sock == 0 || self.conns.contains_key(&sock) {
            sock = (sock + 1) % SYNTHETIC_LIMIT;
        }
        self.next_synthetic = (sock + 1) % SYNTHETIC_LIMIT;
        self.conns.insert(
            sock,
            Conn {
                local: d.local.into(),
                remote: d.remote.into(),
                role,
                service_port,
                key,
                state: d.state,
                since_ns: now_ns,
                opened_ns: 0,
                listener,
                netns: d.netns,
                pid: 0,
                lingering: false,
                seeded: true,
                inode: d.inode,
            },
        );
        let tuple = self.tuple(d.netns, d.local, d.remote);
        self.seeded_by_tuple.entry(tuple).or_default().push(sock);
    }

    /// Takes one seeded socket with this 4-tuple out of the index.
    fn take_seeded(&mut self, tuple: &Tuple) -> Option<u64> {
        let v = self.seeded_by_tuple.get_mut(tuple)?;
        let sock = v.pop();
        if v.is_empty() {
            self.seeded_by_tuple.remove(tuple);
        }
        sock.filter(|s| self.conns.contains_key(s))
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

    /// The aggregate key for a service port, bounded to `max_ports` distinct ports per role.
    /// A port that `matters` may take the slot of a port that holds no connection.
    fn port_key(
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
                tracing::warn!(
                    role = role.label(),
                    max_ports = self.max_ports,
                    port,
                    "port limit reached: further {} ports are counted under port=\"other\" (raise --max-ports to track more)",
                    role.label()
                );
            }
            return key.other();
        }
        self.slots[role.idx()] += 1;
        self.stats.insert((role, key), Box::default());
        key
    }

    /// Frees the slot of the least recently active port of `role` that holds no connection
    /// (its timewait counts move to `other`); false when every port holds one.
    fn evict_one(&mut self, role: Role, now_ns: u64) -> bool {
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
        if let Some([tw, fw2]) = self.timewait.remove(&(role, key)) {
            let other = self.stats.entry((role, key.other())).or_default();
            other.seen.insert(TcpState::TimeWait);
            other.seen.insert(TcpState::FinWait2);
            let slot = self.timewait.entry((role, key.other())).or_default();
            slot[0] += tw;
            slot[1] += fw2;
            for o in self
                .orphans
                .iter_mut()
                .filter(|o| (o.0, o.1) == (role, key))
            {
                o.1 = key.other();
            }
        }
        true
    }
}

/// What a reconciliation will change.
#[derive(Default)]
struct Plan {
    /// (socket, index in the dump): the same socket on both sides.
    matched: Vec<(u64, u32)>,
    drop: Vec<u64>,
    restate: Vec<(u64, TcpState)>,
    /// Indexes in the dump.
    add: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    const SOCK_A: u64 = 0xffff_0000_0000_1000;
    const SOCK_B: u64 = 0xffff_0000_0000_2000;

    fn tr(
        sock: u64,
        ts: u64,
        old: TcpState,
        new: TcpState,
        local: &str,
        remote: &str,
    ) -> Transition {
        Transition {
            ts_ns: ts,
            sock,
            prev_state_ns: None,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            old,
            new,
            netns: 0,
            pid: 7,
        }
    }

    fn with_prev(mut t: Transition, ns: u64) -> Transition {
        t.prev_state_ns = Some(ns);
        t
    }

    fn table() -> Table {
        Table::new(512, DEFAULT_EPHEMERAL)
    }

    fn current(t: &Table, role: Role, port: u16, state: TcpState) -> u64 {
        t.stats(role, PortKey::Port(port))
            .map_or(0, |s| s.current[state.index()])
    }

    /// The client side of a connection to port 80 that the client closes first.
    fn client_lifecycle(t: &mut Table, sock: u64) {
        let c = "10.0.0.1:40000";
        let s = "10.0.0.2:80";
        t.apply(&tr(sock, 1_000, Close, SynSent, "10.0.0.1:0", s));
        t.apply(&with_prev(
            tr(sock, 2_000, SynSent, Established, c, s),
            1_000,
        ));
        t.apply(&with_prev(
            tr(sock, 300_002_000, Established, FinWait1, c, s),
            300_000_000,
        ));
        t.apply(&with_prev(
            tr(sock, 300_003_000, FinWait1, FinWait2, c, s),
            1_000,
        ));
        t.apply(&with_prev(
            tr(sock, 300_004_000, FinWait2, Close, c, s),
            1_000,
        ));
    }

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
        t.apply(&with_prev(
            tr(
                SOCK_A,
                5,
                Established,
                CloseWait,
                "10.0.0.2:8080",
                "10.0.0.1:45000",
            ),
            0,
        ));
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
        t.apply(&with_prev(tr(SOCK_A, 9, FinWait2, FinWait2, c, s), 5));
        let conn = t.get(SOCK_A).unwrap();
        assert_eq!((conn.state, conn.since_ns), (FinWait2, 4));
        let st = t.stats(Role::Client, PortKey::Port(80)).unwrap();
        assert_eq!(st.transitions[FinWait2.index()][FinWait2.index()], 1);
        assert_eq!(st.current[FinWait2.index()], 1);
        assert_eq!(st.state_durations[FinWait2.index()].count, 0);
        assert_eq!(t.counters().state_mismatches, 0);
        t.apply(&with_prev(tr(SOCK_A, 10, FinWait2, Close, c, s), 6));
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

    fn diag(state: TcpState, local: &str, remote: &str) -> DiagSocket {
        DiagSocket {
            netns: 4026531840,
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode: 1000,
            uid: 0,
            timewait: false,
            timer_left: None,
        }
    }

    const FIN: std::time::Duration = std::time::Duration::from_secs(60);

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
        assert_eq!(t.orphans(), &[(Role::Client, PortKey::Port(80), 85 * s)]);
        // The next dump replaces them.
        t.reconcile(&[], 200 * s, 200 * s, FIN);
        assert_eq!(t.snapshot().ports[0].2.current, [0; STATES]);
        assert!(t.orphans().is_empty());
    }

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

    const SEC: u64 = 1_000_000_000;

    fn timewait(local: &str, remote: &str) -> DiagSocket {
        let mut d = diag(TimeWait, local, remote);
        d.timewait = true;
        d
    }

    #[test]
    fn dumped_sockets_get_their_role_by_the_same_rule_as_events() {
        // The burst: the server on 8080 closed first, so its 30,000 TIME_WAIT sockets
        // outlive the listener, which is gone when the agent starts.
        let mut t = Table::new(4, DEFAULT_EPHEMERAL);
        let burst: Vec<DiagSocket> = (0..3_000u16)
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
        // Timewait sockets of the last dump hold a port too.
        let mut t = Table::new(2, DEFAULT_EPHEMERAL);
        t.reconcile(
            &[timewait("10.0.0.1:8080", "10.0.0.2:40000")],
            SEC,
            SEC,
            FIN,
        );
        assert_eq!(t.retire_idle(1_000 * SEC, idle), 0);
        t.reconcile(&[], 1_000 * SEC, 1_000 * SEC, FIN);
        assert_eq!(t.retire_idle(1_000 * SEC + idle, idle), 1);
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
            t.apply(&with_prev(
                tr(sock, 1_000, SynSent, Established, "10.0.0.1:40000", &remote),
                1_000,
            ));
            // ESTABLISHED is not a duration state: not observed anywhere.
            t.apply(&with_prev(
                tr(
                    sock,
                    2_000,
                    Established,
                    FinWait1,
                    "10.0.0.1:40000",
                    &remote,
                ),
                1_000,
            ));
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
        assert_eq!(seen, vec![Established, SynSent, FinWait1, FinWait2]);
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Apply(u64, TcpState, TcpState, u16, u16),
            Dump(Vec<(TcpState, u16, u16, bool)>),
            Retire(u64),
        }

        fn state() -> impl Strategy<Value = TcpState> {
            prop::sample::select(TcpState::ALL.to_vec())
        }

        fn port() -> impl Strategy<Value = u16> {
            prop::sample::select(vec![0u16, 22, 80, 8080, 40_000, 40_001, 50_000])
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                // A handful of kernel addresses, so that they are reused.
                6 => (0u64..5, state(), state(), port(), port())
                    .prop_map(|(s, o, n, l, r)| Op::Apply(SOCK_A + s * 0x100, o, n, l, r)),
                1 => prop::collection::vec((state(), port(), port(), any::<bool>()), 0..6)
                    .prop_map(Op::Dump),
                1 => (0u64..400).prop_map(Op::Retire),
            ]
        }

        /// `current` and `seeded` of every port equal the sockets the table holds there.
        fn check(t: &Table) -> Result<(), TestCaseError> {
            let mut want: FxHashMap<(Role, PortKey), ([u64; STATES], [u64; STATES])> =
                FxHashMap::default();
            for c in t.conns.values() {
                let e = want.entry((c.role, c.key)).or_default();
                e.0[c.state.index()] += 1;
                if c.seeded {
                    e.1[c.state.index()] += 1;
                }
                prop_assert!(
                    t.stats.contains_key(&(c.role, c.key)),
                    "no aggregate for {c:?}"
                );
            }
            for (k, s) in &t.stats {
                let (cur, seeded) = want.get(k).copied().unwrap_or_default();
                prop_assert_eq!(s.current, cur, "current of {:?}", k);
                prop_assert_eq!(s.seeded, seeded, "seeded of {:?}", k);
            }
            let slots = t.stats.keys().filter(|(_, k)| !k.is_other()).count();
            prop_assert_eq!(slots, t.slots[0] + t.slots[1]);
            prop_assert!(t.slots.iter().all(|&n| n <= t.max_ports));
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]
            #[test]
            fn counts_always_equal_the_sockets_held(ops in prop::collection::vec(op(), 1..60)) {
                let mut t = Table::new(3, DEFAULT_EPHEMERAL);
                let mut now = 0u64;
                for op in ops {
                    now += SEC;
                    match op {
                        Op::Apply(sock, old, new, l, r) => {
                            let mut e = tr(sock, now, old, new, "10.0.0.1:0", "10.0.0.2:0");
                            e.local.set_port(l);
                            e.remote.set_port(r);
                            t.apply(&e);
                        }
                        Op::Dump(socks) => {
                            let dump: Vec<DiagSocket> = socks
                                .into_iter()
                                .map(|(st, l, r, tw)| {
                                    let mut d = diag(st, "10.0.0.1:0", "10.0.0.2:0");
                                    d.netns = 0;
                                    d.local.set_port(l);
                                    d.remote.set_port(r);
                                    d.timewait = tw && matches!(st, TimeWait | FinWait2);
                                    d
                                })
                                .collect();
                            t.reconcile(&dump, now - SEC / 2, now, FIN);
                        }
                        Op::Retire(idle) => {
                            t.retire_idle(now, idle * SEC);
                        }
                    }
                    check(&t)?;
                }
            }
        }
    }
}
