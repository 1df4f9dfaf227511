//! Timewait sockets (`TIME_WAIT`, and orphaned `FIN_WAIT2` moved to the timewait table): the
//! tracepoint never shows them, only the full socket they replace going `-> CLOSE`. So each is
//! known either from that transition (live) or from a dump (the correction, every
//! `--reconcile-interval`). They are counted per port and expire when the kernel's timer does,
//! never tracked as connections.
//!
//! From the transition, a full socket leaving `FIN_WAIT2` or `CLOSING` for `CLOSE` became a
//! timewait socket: `TIME_WAIT`, unless its owner closed it in `FIN_WAIT2` (an orphan; the
//! kernel's self-transition `FIN_WAIT2 -> FIN_WAIT2` says so). What a transition cannot tell,
//! the next dump corrects: a reset received in `FIN_WAIT2` (no timewait socket); an orphan
//! whose owner closed it in `FIN_WAIT1` (counted `TIME_WAIT` until the dump: the kernel moves
//! it to the timewait table as `FIN_WAIT2`, and to `TIME_WAIT` when the peer's `FIN` arrives,
//! which no tracepoint shows either); a full timewait table (`tcp_max_tw_buckets`).
use rustc_hash::{FxHashMap, FxHashSet};

use tcpstate_common::TcpState;

use super::conn::digest;
use super::ephemeral::TimewaitDests;
use super::{Conn, Endpoint, Orphan, PortKey, Role, Table};

/// How long the kernel keeps a `TIME_WAIT` socket (`TCP_TIMEWAIT_LEN`, fixed at 60 s).
pub(crate) const TIME_WAIT_NS: u64 = 60_000_000_000;

/// One timewait socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tw {
    pub(super) role: Role,
    pub(super) key: PortKey,
    /// The `FIN_WAIT2` substate: an orphan whose peer has not closed.
    pub(super) orphan: bool,
    /// CLOCK_MONOTONIC ns when it entered its state.
    pub(super) since_ns: u64,
    pub(super) expires_ns: u64,
    /// Digest of its tuple: a dump and the live count must not count one socket twice.
    pub(super) digest: u64,
    /// A client's destination (namespace as the table keys it, remote end), when its local
    /// port is ephemeral: it holds that port.
    pub(super) dest: Option<(u32, Endpoint)>,
}

/// Every timewait socket known, by tuple digest, with counts kept as they come and go.
#[derive(Default)]
pub(super) struct Timewaits {
    by_digest: FxHashMap<u64, Vec<Tw>>,
    /// Per (role, port): `[TIME_WAIT, FIN_WAIT2]`.
    counts: FxHashMap<(Role, PortKey), [u64; 2]>,
    dests: TimewaitDests,
    /// The earliest expiry (`u64::MAX` when there is none).
    next_expiry_ns: u64,
}

impl Timewaits {
    fn count(&mut self, tw: &Tw, up: bool) {
        let slot = self.counts.entry((tw.role, tw.key)).or_default();
        let n = &mut slot[usize::from(tw.orphan)];
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        if *slot == [0, 0] {
            self.counts.remove(&(tw.role, tw.key));
        }
        if let Some((ns, remote)) = tw.dest {
            let d = self.dests.entry((tw.key, ns, remote)).or_default();
            *d = if up { *d + 1 } else { d.saturating_sub(1) };
            if *d == 0 {
                self.dests.remove(&(tw.key, ns, remote));
            }
        }
    }

    fn all(&self) -> impl Iterator<Item = &Tw> {
        self.by_digest.values().flatten()
    }

    /// A timewait socket the kernel just made.
    pub(super) fn add(&mut self, tw: Tw) {
        self.count(&tw, true);
        self.next_expiry_ns = self.next_expiry_ns.min(tw.expires_ns);
        self.by_digest.entry(tw.digest).or_default().push(tw);
    }

    /// A full socket took this tuple: the kernel let the timewait socket that held it go (a
    /// SYN for the same 4-tuple, `tcp_tw_reuse`). No tracepoint shows it; the new socket does.
    pub(super) fn reused(&mut self, digest: u64) {
        let Some(v) = self.by_digest.get_mut(&digest) else {
            return;
        };
        let tw = v.remove(0);
        if v.is_empty() {
            self.by_digest.remove(&digest);
        }
        self.count(&tw, false);
    }

    /// Forgets the sockets whose timer ran out by `now_ns`, as the kernel does.
    pub(super) fn expire(&mut self, now_ns: u64) {
        if self.by_digest.is_empty() || now_ns < self.next_expiry_ns {
            return;
        }
        let mut gone = Vec::new();
        self.by_digest.retain(|_, v| {
            v.retain(|t| {
                let expired = t.expires_ns <= now_ns;
                if expired {
                    gone.push(*t);
                }
                !expired
            });
            !v.is_empty()
        });
        for t in &gone {
            self.count(t, false);
        }
        self.next_expiry_ns = self.all().map(|t| t.expires_ns).min().unwrap_or(u64::MAX);
    }

    /// A dump that started at `started_ns` found `dumped`: they replace what was known, except
    /// the sockets made after the dump started that it did not see.
    pub(super) fn replace(&mut self, dumped: Vec<Tw>, started_ns: u64) {
        let seen: FxHashSet<u64> = dumped.iter().map(|t| t.digest).collect();
        let newer: Vec<Tw> = self
            .all()
            .filter(|t| t.since_ns >= started_ns && !seen.contains(&t.digest))
            .copied()
            .collect();
        self.by_digest.clear();
        self.counts.clear();
        self.dests.clear();
        self.next_expiry_ns = u64::MAX;
        for t in dumped.into_iter().chain(newer) {
            self.add(t);
        }
    }

    /// `[TIME_WAIT, FIN_WAIT2]` of a port.
    pub(super) fn of(&self, role: Role, key: PortKey) -> Option<[u64; 2]> {
        self.counts.get(&(role, key)).copied()
    }

    pub(super) fn holds(&self, role: Role, key: PortKey) -> bool {
        self.counts.contains_key(&(role, key))
    }

    /// A port lost its slot: its timewait sockets count under `other`.
    pub(super) fn rekey(&mut self, role: Role, from: PortKey, to: PortKey) {
        if !self.holds(role, from) {
            return;
        }
        let moved: Vec<Tw> = self
            .all()
            .filter(|t| (t.role, t.key) == (role, from))
            .copied()
            .collect();
        for t in &moved {
            self.count(t, false);
        }
        for t in self
            .by_digest
            .values_mut()
            .flatten()
            .filter(|t| (t.role, t.key) == (role, from))
        {
            t.key = to;
        }
        for mut t in moved {
            t.key = to;
            self.count(&t, true);
        }
    }

    /// Client timewait sockets per destination.
    pub(super) fn dests(&self) -> &TimewaitDests {
        &self.dests
    }

    /// The orphaned `FIN_WAIT2` sockets.
    pub(super) fn orphans(&self) -> Vec<Orphan> {
        self.all()
            .filter(|t| t.orphan)
            .map(|t| Orphan {
                role: t.role,
                key: t.key,
                since_ns: t.since_ns,
            })
            .collect()
    }
}

impl Table {
    /// How long the kernel keeps a timewait socket: `tcp_fin_timeout` for an orphan's.
    pub(super) fn timewait_life(&self, orphan: bool) -> u64 {
        if orphan {
            self.fin_timeout_ns
        } else {
            TIME_WAIT_NS
        }
    }

    /// `conn` closed into a timewait socket of the same port: counted now, expired when the
    /// kernel's timer runs out.
    pub(super) fn enter_timewait(&mut self, conn: &Conn, orphan: bool, ts_ns: u64) {
        let (role, key) = (conn.role, conn.key);
        if let Some(stats) = self.stats.get_mut(&(role, key)) {
            stats.seen.insert(if orphan {
                TcpState::FinWait2
            } else {
                TcpState::TimeWait
            });
        }
        let life = self.timewait_life(orphan);
        self.tw.add(Tw {
            role,
            key,
            orphan,
            since_ns: ts_ns,
            expires_ns: ts_ns + life,
            digest: digest(&self.tuple(conn.netns, conn.local, conn.remote)),
            dest: self.timewait_dest(role, conn.netns, conn.local, conn.remote),
        });
    }
}
