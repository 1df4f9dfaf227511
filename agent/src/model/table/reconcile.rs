//! sock_diag dumps: what events cannot see (sockets older than the agent, timewait sockets,
//! repair after a loss). A dump is planned (both sides sorted by tuple digest and merged), then
//! applied.
use std::net::SocketAddr;

use rustc_hash::FxHashSet;
use tcpstate_common::TcpState;

use super::conn::digest;
use super::stats::MATTERS;
use super::{Conn, Role, Table, Tuple, complete, depart, role_of};
use crate::model::event::KernelSocket;

/// What one reconciliation corrected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Corrections {
    /// In the table, gone from the kernel: dropped.
    pub(crate) stale: u64,
    /// In the kernel, missing from the table: added.
    pub(crate) missing: u64,
    /// In both, in different states: the kernel's state taken.
    pub(crate) state: u64,
}

/// Totals over every reconciliation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReconcileTotals {
    /// Every dump, light or full.
    pub(crate) runs: u64,
    /// Full dumps: every state, with corrections.
    pub(crate) full_runs: u64,
    pub(crate) corrections: Corrections,
    /// CLOCK_MONOTONIC ns of the last one, 0 before the first.
    pub(crate) last_ns: u64,
}

/// (namespace, port) of the dump's listeners: they make a socket on their port a server's.
fn listening(dump: &[KernelSocket]) -> FxHashSet<(u32, u16)> {
    dump.iter()
        .filter(|d| d.state == TcpState::Listen)
        .map(|d| (d.netns, d.local.port()))
        .collect()
}

/// What a light dump asks the kernel for: timewait sockets (`TIME_WAIT`, and orphans in the
/// `FIN_WAIT2` substate), listeners (they tell a timewait socket's role), and the states whose
/// sockets linger (their inodes name their owners).
pub(crate) const LIGHT_STATES: [TcpState; 4] = [
    TcpState::TimeWait,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::Listen,
];

/// Synthetic keys for sockets known only from sock_diag start at 1; kernel addresses live in the
/// top half of the address space, so the two never meet.
pub(super) const SYNTHETIC_LIMIT: u64 = 1 << 47;

/// Closes remembered for reconciliation: a socket that closed while a dump ran must not come
/// back from that dump.
const RECENT_CLOSES: usize = 65_536;

/// The digests of the tuples of the last closes, with when they closed.
#[derive(Default)]
pub(super) struct RecentCloses(std::collections::VecDeque<(u64, u64)>);

impl RecentCloses {
    pub(super) fn record(&mut self, tuple: &Tuple, ts_ns: u64) {
        if self.0.len() == RECENT_CLOSES {
            self.0.pop_front();
        }
        self.0.push_back((digest(tuple), ts_ns));
    }

    /// Digests of the tuples closed at or after `ns`.
    pub(super) fn since(&self, ns: u64) -> FxHashSet<u64> {
        self.0
            .iter()
            .filter(|(_, ts)| *ts >= ns)
            .map(|(d, _)| *d)
            .collect()
    }
}

/// A socket of the table, as reconciliation sorts them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Mine {
    digest: u64,
    since_ns: u64,
    sock: u64,
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

impl Table {
    /// Repairs the table from a sock_diag dump of every namespace that started at `started_ns`
    /// (CLOCK_MONOTONIC) and is applied at `now_ns`. Sockets are matched by 4-tuple (sock_diag
    /// reports a cookie, not the kernel address events carry). Only entries unchanged since the
    /// dump started are corrected, and a socket that closed while it ran is not brought back:
    /// events racing the dump win. With an empty table this is the seeding at start.
    pub(crate) fn reconcile(
        &mut self,
        dump: &[KernelSocket],
        started_ns: u64,
        now_ns: u64,
        fin_timeout: std::time::Duration,
    ) -> Corrections {
        let listening = listening(dump);
        let plan = self.plan(dump, started_ns);
        let c = self.correct(dump, plan, &listening, now_ns);
        self.count_timewait(dump, &listening, started_ns, now_ns, fin_timeout);
        self.reconcile.runs += 1;
        self.reconcile.full_runs += 1;
        self.reconcile.last_ns = now_ns;
        self.reconcile.corrections.stale += c.stale;
        self.reconcile.corrections.missing += c.missing;
        self.reconcile.corrections.state += c.state;
        c
    }

    /// A light reconciliation, from a dump of only [`LIGHT_STATES`]: counts the timewait
    /// sockets and gives the table's `CLOSE_WAIT` and `FIN_WAIT2` sockets their inodes (the key to
    /// their owners). It corrects nothing: events keep the table right unless the kernel reports
    /// a loss, and then a full dump follows.
    pub(crate) fn refresh(
        &mut self,
        dump: &[KernelSocket],
        started_ns: u64,
        now_ns: u64,
        fin_timeout: std::time::Duration,
    ) {
        use TcpState::*;
        let listening = listening(dump);
        let inodes: rustc_hash::FxHashMap<Tuple, u32> = dump
            .iter()
            .filter(|d| !d.timewait && d.inode != 0 && matches!(d.state, CloseWait | FinWait2))
            .map(|d| (self.tuple(d.netns, d.local, d.remote), d.inode))
            .collect();
        if !inodes.is_empty() {
            let keyed = self.netns_in_events;
            let ns = |n| if keyed { n } else { 0 };
            for conn in self.conns.values_mut() {
                if conn.inode == 0 && matches!(conn.state, CloseWait | FinWait2) {
                    let tuple = Tuple {
                        netns: ns(conn.netns),
                        local: conn.local,
                        remote: conn.remote,
                    };
                    if let Some(&inode) = inodes.get(&tuple) {
                        conn.inode = inode;
                    }
                }
            }
        }
        self.count_timewait(dump, &listening, started_ns, now_ns, fin_timeout);
        self.reconcile.runs += 1;
        self.reconcile.last_ns = now_ns;
    }

    /// What a dump says must change: sockets to drop, to restate, and dump entries to add.
    /// Both sides are sorted by tuple digest and merged, so the only memory this takes is two
    /// flat arrays of digests, whatever the number of sockets.
    fn plan(&self, dump: &[KernelSocket], started_ns: u64) -> Plan {
        use TcpState::*;
        let closed_during = self.recent_closes.since(started_ns);
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
        let mut mine: Vec<Mine> = Vec::with_capacity(self.conns.len());
        for (&sock, conn) in &self.conns {
            if complete(conn) {
                let tuple = self.tuple(conn.netns, conn.local, conn.remote);
                mine.push(Mine {
                    digest: digest(&tuple),
                    since_ns: conn.since_ns,
                    sock,
                });
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
            let di = mine.get(i).map_or(u64::MAX, |m| m.digest);
            let dj = theirs.get(j).map_or(u64::MAX, |t| t.0);
            let d = di.min(dj);
            let i_end = i + mine[i..].iter().take_while(|m| m.digest == d).count();
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
        dump: &[KernelSocket],
        mine: &[Mine],
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
        for &Mine {
            since_ns: since,
            sock,
            ..
        } in mine
        {
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
        dump: &[KernelSocket],
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
            let mut conn = self.conns.remove(&sock).expect("listed");
            self.forget(&conn);
            let tuple = self.tuple(conn.netns, conn.local, conn.remote);
            if let Some(v) = self.seeded_by_tuple.get_mut(&tuple) {
                v.retain(|s| *s != sock);
            }
            depart(
                &mut self.departures,
                sock,
                &mut conn,
                TcpState::Close,
                now_ns,
            );
            c.stale += 1;
        }
        for (sock, state) in plan.restate {
            let conn = self.conns.get_mut(&sock).expect("listed");
            let stats = self
                .stats
                .get_mut(&(conn.role, conn.key))
                .expect("aggregate");
            stats.remove(conn.state, conn.seeded);
            depart(&mut self.departures, sock, conn, state, now_ns);
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

    /// Timewait sockets: counted per port, never tracked one by one. The dump's replace what
    /// events announced, except those made after the dump started that it did not see.
    pub(super) fn count_timewait(
        &mut self,
        dump: &[KernelSocket],
        listening: &FxHashSet<(u32, u16)>,
        started_ns: u64,
        now_ns: u64,
        fin_timeout: std::time::Duration,
    ) {
        self.fin_timeout_ns = fin_timeout.as_nanos() as u64;
        let mut found = Vec::new();
        for d in dump.iter().filter(|d| d.timewait) {
            let (role, port) = self.dump_role(d, listening);
            let key = self.port_key(role, d.netns, port, false, now_ns);
            let stats = self.stats.entry((role, key)).or_default();
            stats.seen.insert(d.state);
            stats.last_active_ns = stats.last_active_ns.max(now_ns);
            let orphan = d.state == TcpState::FinWait2;
            // The kernel arms the timer for the whole life when the socket enters the state:
            // what is spent is the age.
            let life = self.timewait_life(orphan);
            let left = d.timer_left.map_or(life, |l| l.as_nanos() as u64);
            let (local, remote) = (d.local.into(), d.remote.into());
            found.push(super::timewait::Tw {
                role,
                key,
                orphan,
                since_ns: now_ns.saturating_sub(life.saturating_sub(left)),
                expires_ns: now_ns + left,
                digest: digest(&self.tuple(d.netns, d.local, d.remote)),
                dest: self.timewait_dest(role, d.netns, local, remote),
            });
        }
        self.tw.replace(found, started_ns);
    }

    pub(super) fn dump_role(
        &self,
        d: &KernelSocket,
        listening: &FxHashSet<(u32, u16)>,
    ) -> (Role, u16) {
        let listens = d.state == TcpState::Listen || listening.contains(&(d.netns, d.local.port()));
        role_of(listens, d.local.port(), d.remote.port(), &self.ephemeral)
    }

    pub(super) fn add_seeded(
        &mut self,
        d: &KernelSocket,
        listening: &FxHashSet<(u32, u16)>,
        now_ns: u64,
    ) {
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
    pub(super) fn take_seeded(&mut self, tuple: &Tuple) -> Option<u64> {
        let v = self.seeded_by_tuple.get_mut(tuple)?;
        let sock = v.pop();
        if v.is_empty() {
            self.seeded_by_tuple.remove(tuple);
        }
        sock.filter(|s| self.conns.contains_key(s))
    }
}
