//! Events: one transition at a time, in ring buffer order.
use tcpstate_common::TcpState;

use super::conn::digest;
use super::stats::{MATTERS, Observe};
use super::{Conn, PortKey, Role, Table, Tuple, complete, depart, role_of};
use crate::model::ending::CloseHow;
use crate::model::event::Transition;

/// Sockets closed by their owner in `FIN_WAIT2` whose `-> CLOSE` has not come: it follows at
/// once (or at `tcp_fin_timeout`), so more than this means closes are being lost; the dumps
/// correct the counts.
const ORPHANED_LIMIT: usize = 4096;

impl Table {
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
            && let Some(mut stale) = self.conns.remove(&t.sock)
        {
            self.counters.stale_replaced += 1;
            self.forget(&stale);
            // Its close was lost; it is gone all the same.
            depart(
                &mut self.departures,
                t.sock,
                &mut stale,
                TcpState::Close,
                t.ts_ns,
            );
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
    pub(super) fn apply_known(&mut self, t: &Transition) {
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
            // duration, no new entry time, and a lingering socket goes on lingering. Its owner
            // let it go: its timewait socket will be an orphan's.
            if t.new == TcpState::FinWait2 {
                if self.orphaned.len() >= ORPHANED_LIMIT {
                    self.orphaned.clear();
                }
                self.orphaned.insert(t.sock);
            }
            return;
        }
        // Only sockets already lingering pay for this, once.
        depart(&mut self.departures, t.sock, conn, t.new, t.ts_ns);
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
            let aborted =
                matches!(CloseHow::of(t.old), Some(CloseHow::Reset)) || t.old == TcpState::SynSent;
            if aborted && conn.pid != 0 {
                stats.last_abort_pid = conn.pid;
            }
            if conn.opened_ns != 0 && !conn.listener {
                let life = Observe::Lifetime(t.ts_ns.saturating_sub(conn.opened_ns));
                fold[1] = self.durations.observe(stats, role, key, life);
            }
            let conn = self.conns.remove(&t.sock).expect("present");
            if conn.listener {
                self.unlisten(conn.netns, conn.local.port());
            }
            let tuple = self.tuple(conn.netns, conn.local, conn.remote);
            self.recent_closes.record(&tuple, t.ts_ns);
            let orphan = self.orphaned.remove(&t.sock);
            if matches!(t.old, TcpState::FinWait2 | TcpState::Closing) {
                self.enter_timewait(&conn, orphan, t.ts_ns);
            }
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
                self.tw.reused(digest(&tuple));
            }
        }
        for what in fold.into_iter().flatten() {
            self.observe_other(role, key, what);
        }
    }

    /// The first transition of a socket not in the table: an open, or a mid-life sighting.
    pub(super) fn apply_new(&mut self, t: &Transition, open: Option<(Role, u16, bool)>) {
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
        if open.is_some() && role == Role::Client && t.pid != 0 {
            stats.last_open_pid = t.pid;
        }
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
            self.tw.reused(digest(&tuple));
        }
        self.conns.insert(t.sock, conn);
    }

    /// Observes a duration of a port without histograms of its own into its role's `other`.
    pub(super) fn observe_other(&mut self, role: Role, key: PortKey, what: Observe) {
        let other = self.stats.entry((role, key.other())).or_default();
        what.record_in(other);
    }

    /// A dump that ran while a socket opened may have added it already, before the socket's own
    /// events reached the table: the seeded copy goes.
    pub(super) fn drop_seeded_twin(&mut self, tuple: &Tuple) {
        if self.seeded_by_tuple.is_empty() {
            return;
        }
        if let Some(dup) = self.take_seeded(tuple) {
            let dup = self.conns.remove(&dup).expect("indexed");
            self.forget(&dup);
        }
    }
}
