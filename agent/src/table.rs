//! The live connection table and the per-port aggregates. Pure: no I/O, no clocks, no async.
//! One task owns it (see `daemon`) and feeds it [`Transition`]s in ring buffer order.
//!
//! A connection is one kernel socket (`skaddr`) from its open to `-> CLOSE`:
//! - `CLOSE -> SYN_SENT` is an active open (`connect()`): a `client` connection whose service
//!   port is the remote port. The local port is still 0 in that event.
//! - `LISTEN -> SYN_RECV` is a passive open: the kernel clones the listener into a new socket,
//!   so the event's old state is the listener's. A `server` connection whose service port is the
//!   local port. The remote port is still 0 in that event.
//! - `CLOSE -> LISTEN` is a listening socket, `server` on its own port.
//!
//! The 4-tuple is trusted from `-> ESTABLISHED` on (later events overwrite it). `skaddr` values
//! are reused after free, so an entry is forgotten at `-> CLOSE`, and an open transition for an
//! address still in the table replaces the stale entry.
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use rustc_hash::{FxHashMap, FxHashSet};
use tcpstate_common::TcpState;

use crate::decode::Transition;

/// Number of state slots (`TcpState::index` is 0..12).
pub const STATES: usize = 12;

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

/// A service port, or the bucket for ports beyond the cardinality limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortKey {
    Port(u16),
    Other,
}

impl PortKey {
    /// Label value: the number, or `other`.
    pub fn label(self) -> String {
        match self {
            PortKey::Port(p) => p.to_string(),
            PortKey::Other => "other".to_string(),
        }
    }
}

/// Histogram bucket upper bounds in seconds: 100 µs to 1 h.
pub const BUCKETS_SECONDS: [f64; 18] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
    600.0, 1800.0, 3600.0,
];
const BUCKETS_NS: [u64; 18] = {
    let mut out = [0u64; 18];
    let mut i = 0;
    while i < 18 {
        out[i] = (BUCKETS_SECONDS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A fixed-bucket histogram of durations. Counts are per bucket (not cumulative); the `+Inf`
/// bucket is `count`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    pub buckets: [u64; 18],
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
    pub fn cumulative(&self) -> [u64; 18] {
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
    /// Transitions `[from][to]`.
    pub transitions: [[u64; STATES]; STATES],
    /// Time spent in each state, observed when the state is left.
    pub state_durations: [Hist; STATES],
    /// Whole connection lifetimes, open to `CLOSE` (listeners excluded; only connections whose
    /// open the agent saw).
    pub lifetimes: Hist,
}

/// One live socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
    /// The service port (local for servers, remote for clients).
    pub service_port: u16,
    /// Where it is counted (the service port, or `other` beyond the limit).
    pub key: PortKey,
    pub state: TcpState,
    /// CLOCK_MONOTONIC ns when it entered `state`.
    pub since_ns: u64,
    /// When it was opened, if the agent saw the open.
    pub opened_ns: Option<u64>,
    pub listener: bool,
    pub netns: u32,
    /// The task that opened it (meaningful for active opens only), 0 when unknown.
    pub pid: u32,
    /// Set by the linger detector once the socket stayed too long in its state; the table then
    /// reports how it leaves (see [`Table::take_departures`]).
    pub lingering: bool,
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
}

/// A consistent copy of the aggregates, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Sorted by (role, port).
    pub ports: Vec<(Role, PortKey, PortStats)>,
    pub tracked_sockets: usize,
    pub counters: TableCounters,
}

/// The connection table.
pub struct Table {
    conns: FxHashMap<u64, Conn>,
    stats: FxHashMap<(Role, PortKey), Box<PortStats>>,
    tracked_ports: [FxHashSet<u16>; 2],
    max_ports: usize,
    overflow_reported: [bool; 2],
    /// Local ports with a listening socket, and how many.
    listening: FxHashMap<u16, u32>,
    /// `net.ipv4.ip_local_port_range`, to infer the role of sockets first seen mid-life.
    ephemeral: RangeInclusive<u16>,
    counters: TableCounters,
    departures: Vec<Departure>,
}

/// The kernel's default `net.ipv4.ip_local_port_range`.
pub const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

impl Table {
    /// A table tracking at most `max_ports` distinct service ports per role.
    pub fn new(max_ports: usize, ephemeral: RangeInclusive<u16>) -> Self {
        Table {
            conns: FxHashMap::default(),
            stats: FxHashMap::default(),
            tracked_ports: [FxHashSet::default(), FxHashSet::default()],
            max_ports,
            overflow_reported: [false; 2],
            listening: FxHashMap::default(),
            ephemeral,
            counters: TableCounters::default(),
            departures: Vec::new(),
        }
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

        if let Some(conn) = self.conns.get_mut(&t.sock) {
            let stats = self
                .stats
                .get_mut(&(conn.role, conn.key))
                .expect("every tracked connection has its aggregate");
            if conn.state != t.old {
                self.counters.state_mismatches += 1;
            }
            if t.old == t.new && conn.state == t.new {
                // A self-transition: close() of a socket already in FIN_WAIT2 sets the state
                // again. A transition the kernel made, but the socket stays where it was: no
                // duration, no new entry time, and a lingering socket goes on lingering.
                stats.transitions[t.old.index()][t.new.index()] += 1;
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
            let slot = &mut stats.current[conn.state.index()];
            *slot = slot.saturating_sub(1);
            stats.transitions[t.old.index()][t.new.index()] += 1;
            // The program's own clock is authoritative; fall back to ours if its entry was
            // evicted, but only when we know the socket was in that state.
            let spent = t
                .prev_state_ns
                .or_else(|| (conn.state == t.old).then(|| t.ts_ns.saturating_sub(conn.since_ns)));
            if let Some(ns) = spent {
                stats.state_durations[t.old.index()].observe_ns(ns);
            }
            if t.new == Close {
                if let (Some(opened), false) = (conn.opened_ns, conn.listener) {
                    stats.lifetimes.observe_ns(t.ts_ns.saturating_sub(opened));
                }
                let conn = self.conns.remove(&t.sock).expect("present");
                if conn.listener {
                    self.unlisten(conn.local.port());
                }
                return;
            }
            stats.current[t.new.index()] += 1;
            conn.state = t.new;
            conn.since_ns = t.ts_ns;
            // Half-built tuples (port 0) appear in the open events; keep what we know.
            if t.local.port() != 0 {
                conn.local = t.local;
            }
            if t.remote.port() != 0 {
                conn.remote = t.remote;
            }
            return;
        }

        let (role, service_port, listener) = match open {
            Some(o) => o,
            None => {
                self.counters.first_seen_midlife += 1;
                let (role, port) = self.infer_role(t.local.port(), t.remote.port());
                (role, port, t.new == Listen)
            }
        };
        let key = self.port_key(role, service_port);
        let stats = self.stats.entry((role, key)).or_default();
        stats.transitions[t.old.index()][t.new.index()] += 1;
        if open.is_none()
            && let Some(ns) = t.prev_state_ns
        {
            stats.state_durations[t.old.index()].observe_ns(ns);
        }
        if t.new == Close {
            return;
        }
        stats.current[t.new.index()] += 1;
        if listener {
            *self.listening.entry(t.local.port()).or_default() += 1;
        }
        self.conns.insert(
            t.sock,
            Conn {
                local: t.local,
                remote: t.remote,
                role,
                service_port,
                key,
                state: t.new,
                since_ns: t.ts_ns,
                opened_ns: open.map(|_| t.ts_ns),
                listener,
                netns: t.netns,
                pid: if role == Role::Client { t.pid } else { 0 },
                lingering: false,
            },
        );
    }

    /// A consistent copy of the aggregates.
    pub fn snapshot(&self) -> Snapshot {
        let mut ports: Vec<_> = self
            .stats
            .iter()
            .map(|(&(role, key), stats)| (role, key, (**stats).clone()))
            .collect();
        ports.sort_by_key(|(role, key, _)| (*role, *key));
        Snapshot {
            ports,
            tracked_sockets: self.conns.len(),
            counters: self.counters,
        }
    }

    /// Removes a connection's contribution to the current counts.
    fn forget(&mut self, conn: &Conn) {
        if let Some(stats) = self.stats.get_mut(&(conn.role, conn.key)) {
            let slot = &mut stats.current[conn.state.index()];
            *slot = slot.saturating_sub(1);
        }
        if conn.listener {
            self.unlisten(conn.local.port());
        }
    }

    fn unlisten(&mut self, port: u16) {
        if let Some(n) = self.listening.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.listening.remove(&port);
            }
        }
    }

    /// Role and service port of a socket first seen mid-life: a local listening port makes it a
    /// server; otherwise the end in the ephemeral range is the client's.
    fn infer_role(&self, local: u16, remote: u16) -> (Role, u16) {
        let eph = |p| self.ephemeral.contains(&p);
        let server = if self.listening.contains_key(&local) {
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

    /// The aggregate key for a service port, bounded to `max_ports` distinct ports per role.
    fn port_key(&mut self, role: Role, port: u16) -> PortKey {
        let tracked = &mut self.tracked_ports[role.idx()];
        if tracked.contains(&port) {
            return PortKey::Port(port);
        }
        if tracked.len() < self.max_ports {
            tracked.insert(port);
            return PortKey::Port(port);
        }
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
        PortKey::Other
    }
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
        assert_eq!(c.local, "10.0.0.1:40000".parse().unwrap());
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
        // 0.3 s lands in the 0.5 s bucket (index 8), not the 0.25 s one.
        assert_eq!(est.buckets[7], 0);
        assert_eq!(est.buckets[8], 1);
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
        assert_eq!(c[17], 2);
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
}
