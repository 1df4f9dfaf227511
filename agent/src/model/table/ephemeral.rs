//! Ephemeral ports in use per destination. A client's `connect()` needs a local port that no
//! other socket of the same source address uses toward the same destination address and port,
//! `TIME_WAIT` included: toward one destination at most the size of `ip_local_port_range` can
//! exist at once, and then `connect()` fails with `EADDRNOTAVAIL`. Counted from the live
//! client connections of the table and the timewait sockets, against the range
//! of the socket's own network namespace.
use std::ops::RangeInclusive;

use rustc_hash::FxHashMap;

use super::{Endpoint, PortKey, Role, Table};

/// Ports whose busiest destination holds less than this share of its range have no ephemeral
/// series: every client port would otherwise cost two series for a number far from any limit
/// (the alert fires at 80%, the doctor warns at 50%).
pub(crate) const EXPORT_SHARE: f64 = 0.1;

/// How many destinations the API lists, the most used first.
pub(crate) const TOP_DESTINATIONS: usize = 10;

/// The local ports in use toward one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DestUse {
    /// The client port key (the destination's port, or `other` beyond the budget).
    pub(crate) key: PortKey,
    /// The namespace, as the table keys it (0 when events do not carry it).
    pub(crate) netns: u32,
    pub(crate) remote: Endpoint,
    /// Sockets toward it with a local port in the ephemeral range.
    pub(crate) in_use: u64,
    /// Ports in the namespace's `ip_local_port_range`.
    pub(crate) range: u64,
}

impl DestUse {
    /// The share of the range in use.
    pub(crate) fn share(&self) -> f64 {
        self.in_use as f64 / self.range.max(1) as f64
    }

    fn rank(a: &DestUse, b: &DestUse) -> std::cmp::Ordering {
        b.share()
            .total_cmp(&a.share())
            .then(b.in_use.cmp(&a.in_use))
            .then((a.key, a.netns, a.remote).cmp(&(b.key, b.netns, b.remote)))
    }
}

/// Ephemeral port use at an instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct EphemeralUse {
    /// Per client port key, its most used destination (the highest share), sorted by key.
    pub(crate) by_port: Vec<DestUse>,
    /// The most used destinations over all ports, at most [`TOP_DESTINATIONS`].
    pub(crate) top: Vec<DestUse>,
}

/// Destinations of the timewait sockets: (key, namespace, remote) -> count.
pub(super) type TimewaitDests = FxHashMap<(PortKey, u32, Endpoint), u64>;

fn size(r: &RangeInclusive<u16>) -> u64 {
    (u64::from(*r.end()) + 1).saturating_sub(u64::from(*r.start()))
}

impl Table {
    /// Each namespace's `ip_local_port_range`, as the last dump read them.
    pub(crate) fn set_ephemeral_ranges(
        &mut self,
        ranges: impl IntoIterator<Item = (u32, RangeInclusive<u16>)>,
    ) {
        self.ranges = ranges.into_iter().collect();
    }

    /// The range of a namespace (as the table keys it), else the agent's own.
    pub(super) fn range_of(&self, ns: u32) -> &RangeInclusive<u16> {
        self.ranges.get(&ns).unwrap_or(&self.ephemeral)
    }

    /// The destination a timewait socket holds an ephemeral port toward, when it is a client's
    /// with a local port in its namespace's range.
    pub(super) fn timewait_dest(
        &self,
        role: Role,
        netns: u32,
        local: Endpoint,
        remote: Endpoint,
    ) -> Option<(u32, Endpoint)> {
        let ns = self.ns(netns);
        (role == Role::Client && self.range_of(ns).contains(&local.port())).then_some((ns, remote))
    }

    /// Ephemeral ports in use per destination, now.
    pub(crate) fn ephemeral_use(&self) -> EphemeralUse {
        let mut per = self.tw.dests().clone();
        for c in self.conns.values() {
            if c.role != Role::Client || c.local.port() == 0 || c.remote.port() == 0 {
                continue;
            }
            let ns = self.ns(c.netns);
            if self.range_of(ns).contains(&c.local.port()) {
                *per.entry((c.key, ns, c.remote)).or_default() += 1;
            }
        }
        let all: Vec<DestUse> = per
            .into_iter()
            .map(|((key, netns, remote), in_use)| DestUse {
                key,
                netns,
                remote,
                in_use,
                range: size(self.range_of(netns)),
            })
            .collect();
        let mut by_port: FxHashMap<PortKey, DestUse> = FxHashMap::default();
        for d in &all {
            let best = by_port.entry(d.key).or_insert(*d);
            if DestUse::rank(d, best).is_lt() {
                *best = *d;
            }
        }
        let mut by_port: Vec<DestUse> = by_port.into_values().collect();
        by_port.sort_by_key(|d| d.key);
        let mut top = all;
        top.sort_by(DestUse::rank);
        top.truncate(TOP_DESTINATIONS);
        EphemeralUse { by_port, top }
    }
}
