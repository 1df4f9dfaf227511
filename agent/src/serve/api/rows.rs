//! The API's rows, built from what the table task answers: typed values in, protocol rows out.
use std::net::SocketAddr;
use std::path::Path;

use rustc_hash::{FxHashMap, FxHashSet};

use super::protocol::{ConnRow, EventRow, OwnerRow, PortRow, TcpState};
use crate::clock::wall_ms;
use crate::kernel::procfs::Owner;
use crate::kernel::sockdiag;
use crate::model::event::Transition;
use crate::model::linger::{LINGER_STATES, LingerKey};
use crate::model::query::{Conns, View};
use crate::model::table::Conn;
use crate::model::teardown::Teardown;

/// The `ports` rows of a view, sorted by lingering, then by total, both descending.
pub(crate) fn port_rows(view: &View) -> Vec<PortRow> {
    let linger = view.linger.by_key();
    let mut rows: Vec<PortRow> = view
        .table
        .ports
        .iter()
        .map(|(role, key, stats)| {
            let states: std::collections::BTreeMap<String, u64> = TcpState::ALL
                .iter()
                .filter(|s| stats.current[s.index()] > 0)
                .map(|s| (s.label().to_string(), stats.current[s.index()]))
                .collect();
            let td = Teardown::of(stats);
            let mut row = PortRow {
                closes: td.closed(),
                resets: td.resets(),
                connect_failures: td.connect_failures,
                port: key.label(),
                role: role.label().to_string(),
                netns: key.netns(),
                total: states.values().sum(),
                states,
                ..PortRow::default()
            };
            for state in LINGER_STATES {
                let (role, key) = (*role, *key);
                let Some(agg) = linger.get(&LingerKey { role, key, state }) else {
                    continue;
                };
                if agg.count == 0 {
                    continue;
                }
                match state {
                    TcpState::CloseWait => row.lingering_close_wait += agg.count,
                    _ => row.lingering_fin_wait2 += agg.count,
                }
                row.lingering += agg.count;
                let age = view.now_ns.saturating_sub(agg.oldest_since_ns) as f64 / 1e9;
                row.oldest_lingering_seconds = row.oldest_lingering_seconds.max(age);
            }
            row
        })
        .filter(|r| r.total > 0 || r.lingering > 0 || r.resets > 0 || r.connect_failures > 0)
        .collect();
    rows.sort_by(|a, b| {
        b.lingering
            .cmp(&a.lingering)
            .then(b.total.cmp(&a.total))
            .then(a.port.cmp(&b.port))
            .then(a.role.cmp(&b.role))
    });
    rows
}

/// The `conns` rows: lingering first, then the oldest in state first.
pub(crate) fn conn_rows(answer: &Conns) -> Vec<ConnRow> {
    let mut rows: Vec<ConnRow> = answer
        .conns
        .iter()
        .map(|c| conn_row(c, answer.now_ns))
        .collect();
    rows.sort_by(|a, b| {
        b.lingering
            .cmp(&a.lingering)
            .then(b.age_seconds.total_cmp(&a.age_seconds))
            .then(a.local.cmp(&b.local))
    });
    rows
}

fn conn_row(c: &Conn, now_ns: u64) -> ConnRow {
    ConnRow {
        local: c.local.to_string(),
        remote: c.remote.to_string(),
        state: c.state.label().to_string(),
        age_seconds: now_ns.saturating_sub(c.since_ns) as f64 / 1e9,
        age_is_lower_bound: c.seeded,
        role: c.role.label().to_string(),
        service_port: c.service_port,
        netns: c.netns,
        lingering: c.lingering,
        inode: c.inode,
        owners: Vec::new(),
        opened_by_pid: c.pid,
    }
}

/// The processes holding a socket, as rows.
pub(crate) fn owner_rows(owners: &[Owner]) -> Vec<OwnerRow> {
    owners
        .iter()
        .map(|o| OwnerRow {
            pid: o.pid,
            command: o.comm.clone(),
            cgroup: o.cgroup.clone(),
            container: o.container.clone(),
        })
        .collect()
}

/// A socket's tuple in its namespace, as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SocketTuple {
    pub(crate) netns: u32,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
}

/// Inodes of the full sockets of some namespaces (0: the agent's own), by tuple. Blocking.
pub(crate) fn inodes_by_tuple(namespaces: &FxHashSet<u32>) -> FxHashMap<SocketTuple, u32> {
    let mut out = FxHashMap::default();
    for (ino, paths) in sockdiag::namespaces(Path::new("/proc")) {
        let own = paths.iter().any(|p| p.ends_with("self/ns/net"));
        let wanted = namespaces.contains(&ino) || (namespaces.contains(&0) && own);
        if !wanted {
            continue;
        }
        let netns = if namespaces.contains(&ino) { ino } else { 0 };
        if let Ok(sockets) = sockdiag::dump_namespace(ino, &paths) {
            for d in sockets.into_iter().filter(|d| d.inode != 0) {
                let (local, remote) = (d.local, d.remote);
                out.insert(
                    SocketTuple {
                        netns,
                        local,
                        remote,
                    },
                    d.inode,
                );
            }
        }
    }
    out
}

/// One transition of `watch`.
pub(crate) fn event_row(t: &Transition) -> EventRow {
    EventRow {
        time_ms: wall_ms(t.ts_ns),
        from: t.old.label().to_string(),
        to: t.new.label().to_string(),
        local: t.local.to_string(),
        remote: t.remote.to_string(),
        spent_seconds: t.prev_state_ns.map(|ns| ns as f64 / 1e9),
        netns: t.netns,
        pid: t.pid,
    }
}
