//! `tcpstate doctor`'s findings: what the counts say is wrong, where, who holds it, why, and
//! what to do. Pure: the API server hands in a view of the table and the connections it needs,
//! then names the owners of the inodes and pids each finding carries.
use std::net::IpAddr;

use rustc_hash::FxHashMap;
use tcpstate_common::TcpState;

use super::query::View;
use super::table::{Conn, DestUse, PortKey, Role};
use super::teardown::Teardown;

#[cfg(test)]
mod tests;
mod words;

/// A lingering `CLOSE_WAIT` or held `FIN_WAIT2` becomes critical at this many connections on
/// one port: the same line as the `TcpstateCloseWaitPileUp` alert; each holds a file
/// descriptor, and a leak that size is growing with traffic.
pub(crate) const LINGERING_CRITICAL: u64 = 100;
/// Orphaned `FIN_WAIT2` sockets on one port worth a finding. A few are normal (peers that take
/// a moment to close); the kernel reaps each after `tcp_fin_timeout`, so this many at once
/// means peers that keep not closing.
pub(crate) const ORPHANS_WARNING: u64 = 10;
/// Share of `ip_local_port_range` toward one destination: a warning at half (room for one more
/// burst), critical at the `TcpstateEphemeralPortsExhausting` alert's 80%.
pub(crate) const EPHEMERAL_WARNING: f64 = 0.5;
pub(crate) const EPHEMERAL_CRITICAL: f64 = 0.8;
/// Resets on a port worth a finding: at least this many, and at least this share of its closes.
/// A reset now and then is normal (a client killed, a timeout); one close in ten is not.
pub(crate) const RESETS_MIN: u64 = 10;
pub(crate) const RESETS_SHARE: f64 = 0.1;
/// Failed connects worth a finding: at least this many, and this share of the attempts.
pub(crate) const FAILURES_MIN: u64 = 5;
pub(crate) const FAILURES_SHARE: f64 = 0.1;
/// Peers named per finding.
pub(crate) const TOP_PEERS: usize = 5;

/// How bad a finding is. Ordered: the most severe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Severity {
    Critical,
    Warning,
}

impl Severity {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
    }
}

/// What was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    CloseWaitLeak,
    FinWait2Held,
    FinWait2Orphaned,
    EphemeralPortsExhausting,
    Resets,
    ConnectFailures,
}

impl Kind {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Kind::CloseWaitLeak => "close_wait_leak",
            Kind::FinWait2Held => "fin_wait2_held",
            Kind::FinWait2Orphaned => "fin_wait2_orphaned",
            Kind::EphemeralPortsExhausting => "ephemeral_ports_exhausting",
            Kind::Resets => "resets",
            Kind::ConnectFailures => "connect_failures",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Finding {
    pub(crate) severity: Severity,
    pub(crate) kind: Kind,
    pub(crate) role: Role,
    pub(crate) key: PortKey,
    /// The namespaces of the sockets concerned, when known.
    pub(crate) netns: Vec<u32>,
    /// How many sockets (or closes, or failed connects).
    pub(crate) count: u64,
    /// Time in state of the oldest, in seconds.
    pub(crate) oldest_seconds: Option<f64>,
    /// Of the closes, the attempts or the port range.
    pub(crate) share: Option<f64>,
    /// The destination whose ports run out.
    pub(crate) destination: Option<DestUse>,
    /// The peers most concerned, with their counts.
    pub(crate) peers: Vec<(IpAddr, u64)>,
    /// Sockets whose holders are the owners (the serve layer resolves them).
    pub(crate) inodes: Vec<u32>,
    /// Processes that opened the connections concerned.
    pub(crate) pids: Vec<u32>,
    /// The symptom with its numbers.
    pub(crate) what: String,
    pub(crate) why: &'static str,
    pub(crate) fix: &'static str,
}

/// What the doctor looks at.
pub(crate) struct Evidence<'a> {
    pub(crate) view: &'a View,
    /// The connections past their linger threshold (CLOSE_WAIT, held FIN_WAIT2).
    pub(crate) lingering: &'a [Conn],
    /// Listening sockets: their holders own a server port's findings.
    pub(crate) listeners: &'a [Conn],
}

/// Every finding, the most severe first, then the largest.
pub(crate) fn diagnose(e: &Evidence) -> Vec<Finding> {
    let mut out = lingering(e);
    out.extend(orphans(e));
    out.extend(ephemeral(e));
    out.extend(teardown(e));
    out.sort_by(|a, b| {
        (a.severity, b.count, a.kind, a.role, a.key)
            .cmp(&(b.severity, a.count, b.kind, b.role, b.key))
    });
    out
}

impl Finding {
    fn new(kind: Kind, severity: Severity, role: Role, key: PortKey, count: u64) -> Finding {
        let (why, fix) = words::why_and_fix(kind, role);
        Finding {
            severity,
            kind,
            role,
            key,
            netns: key.netns().into_iter().collect(),
            count,
            oldest_seconds: None,
            share: None,
            destination: None,
            peers: Vec::new(),
            inodes: Vec::new(),
            pids: Vec::new(),
            what: String::new(),
            why,
            fix,
        }
    }

    /// The listener of a server port owns its findings.
    fn owned_by_listener(mut self, e: &Evidence) -> Finding {
        if self.role == Role::Server {
            self.inodes = e
                .listeners
                .iter()
                .filter(|l| l.key == self.key && l.inode != 0)
                .map(|l| l.inode)
                .collect();
        }
        self
    }
}

/// Lingering CLOSE_WAIT and held FIN_WAIT2, per (role, port, state).
fn lingering(e: &Evidence) -> Vec<Finding> {
    let mut groups: FxHashMap<(Role, PortKey, TcpState), Vec<&Conn>> = FxHashMap::default();
    for c in e.lingering {
        groups.entry((c.role, c.key, c.state)).or_default().push(c);
    }
    let threshold = |s| e.view.thresholds.for_state(s).unwrap_or_default();
    groups
        .into_iter()
        .filter_map(|((role, key, state), conns)| {
            let kind = match state {
                TcpState::CloseWait => Kind::CloseWaitLeak,
                TcpState::FinWait2 => Kind::FinWait2Held,
                _ => return None,
            };
            let n = conns.len() as u64;
            let severity = if n >= LINGERING_CRITICAL {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let mut f = Finding::new(kind, severity, role, key, n);
            let oldest = conns
                .iter()
                .map(|c| c.since_ns)
                .min()
                .unwrap_or(e.view.now_ns);
            let age = e.view.now_ns.saturating_sub(oldest) as f64 / 1e9;
            f.oldest_seconds = Some(age);
            f.netns = distinct(conns.iter().map(|c| c.netns));
            f.peers = top_peers(conns.iter().map(|c| c.remote.ip));
            f.inodes = conns.iter().map(|c| c.inode).filter(|i| *i != 0).collect();
            f.pids = distinct(conns.iter().map(|c| c.pid).filter(|p| *p != 0));
            f.what = words::lingering(
                n,
                state,
                threshold(state),
                age,
                conns.iter().any(|c| c.seeded),
            );
            Some(f)
        })
        .collect()
}

/// Many orphaned FIN_WAIT2 sockets on a port.
fn orphans(e: &Evidence) -> Vec<Finding> {
    e.view
        .table
        .orphans
        .iter()
        .filter(|(_, _, n, _)| *n >= ORPHANS_WARNING)
        .map(|&(role, key, n, oldest)| {
            let mut f = Finding::new(Kind::FinWait2Orphaned, Severity::Warning, role, key, n);
            let age = e.view.now_ns.saturating_sub(oldest) as f64 / 1e9;
            f.oldest_seconds = Some(age);
            f.what = words::orphans(n, age);
            f.owned_by_listener(e)
        })
        .collect()
}

/// Destinations whose ephemeral ports run out.
fn ephemeral(e: &Evidence) -> Vec<Finding> {
    e.view
        .table
        .ephemeral
        .by_port
        .iter()
        .filter(|d| d.share() >= EPHEMERAL_WARNING)
        .map(|d| {
            let severity = if d.share() >= EPHEMERAL_CRITICAL {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let kind = Kind::EphemeralPortsExhausting;
            let mut f = Finding::new(kind, severity, Role::Client, d.key, d.in_use);
            f.share = Some(d.share());
            f.destination = Some(*d);
            f.netns = vec![d.netns].into_iter().filter(|n| *n != 0).collect();
            f.peers = vec![(d.remote.ip, d.in_use)];
            f.what = words::ephemeral(d);
            // TIME_WAIT sockets have no holder: name who connected last on the port.
            let opener = e
                .view
                .table
                .ports
                .iter()
                .find(|(r, k, _)| (*r, *k) == (Role::Client, d.key));
            f.pids = opener
                .map(|(_, _, s)| s.last_open_pid)
                .into_iter()
                .filter(|p| *p != 0)
                .collect();
            f
        })
        .collect()
}

/// Ports with many resets or failed connects.
fn teardown(e: &Evidence) -> Vec<Finding> {
    let mut out = Vec::new();
    for (role, key, stats) in &e.view.table.ports {
        let td = Teardown::of(stats);
        // Over how long the port has been counted, for a rate (unknown for `other`).
        let counted = (stats.counted_since_ns != 0)
            .then(|| e.view.now_ns.saturating_sub(stats.counted_since_ns) as f64 / 1e9);
        let resets = td.resets();
        let share = resets as f64 / td.closed().max(1) as f64;
        if resets >= RESETS_MIN && share >= RESETS_SHARE {
            let mut f = Finding::new(Kind::Resets, Severity::Warning, *role, *key, resets);
            f.share = Some(share);
            f.pids = distinct([stats.last_abort_pid].into_iter().filter(|p| *p != 0));
            f.what = words::resets(resets, td.closed(), share) + &words::rate(resets, counted);
            out.push(f.owned_by_listener(e));
        }
        let failed = td.connect_failures;
        let share = failed as f64 / td.opens.max(failed).max(1) as f64;
        if failed >= FAILURES_MIN && share >= FAILURES_SHARE {
            let kind = Kind::ConnectFailures;
            let mut f = Finding::new(kind, Severity::Warning, *role, *key, failed);
            f.share = Some(share);
            f.pids = distinct([stats.last_abort_pid].into_iter().filter(|p| *p != 0));
            f.what = words::failures(failed, td.opens.max(failed), share, *role)
                + &words::rate(failed, counted);
            out.push(f.owned_by_listener(e));
        }
    }
    out
}

/// The distinct values, in order of first appearance.
fn distinct(it: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for v in it {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// The most frequent addresses, at most [`TOP_PEERS`].
fn top_peers(it: impl Iterator<Item = IpAddr>) -> Vec<(IpAddr, u64)> {
    let mut counts: FxHashMap<IpAddr, u64> = FxHashMap::default();
    for ip in it {
        *counts.entry(ip).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(TOP_PEERS);
    v
}
