//! What the servers ask of the table task, and the answers: a [`View`] of the aggregates (for
//! `/metrics`, `ports` and `status`) and the connections matching a [`ConnFilter`] (for
//! `conns`). Pure: the table task runs these on the table it owns.
use tcpstate_common::TcpState;

use super::linger::{Detector, LingerSnapshot, Thresholds};
use super::table::{Conn, Role, Snapshot, Table};

/// A consistent view of the table task's state at one instant.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    pub(crate) table: Snapshot,
    pub(crate) linger: LingerSnapshot,
    pub(crate) thresholds: Thresholds,
    /// CLOCK_MONOTONIC ns when the view was taken (ages are computed against it).
    pub(crate) now_ns: u64,
}

impl View {
    /// `ephemeral`: with ephemeral port use (a walk of every client connection).
    pub(crate) fn of(table: &Table, detector: &Detector, now_ns: u64, ephemeral: bool) -> View {
        let mut snapshot = table.snapshot();
        if ephemeral {
            snapshot.ephemeral = table.ephemeral_use();
        }
        View {
            table: snapshot,
            linger: detector.snapshot(&table.orphans(), now_ns),
            thresholds: detector.thresholds(),
            now_ns,
        }
    }
}

/// Which connections a `conns` request wants; every field typed, so that a filter that names
/// no state or role is refused where it is parsed, never silently matching nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnFilter {
    /// The service port.
    pub(crate) port: Option<u16>,
    pub(crate) state: Option<TcpState>,
    pub(crate) role: Option<Role>,
    /// Only connections past their state's linger threshold.
    pub(crate) lingering: bool,
}

impl ConnFilter {
    pub(crate) fn matches(&self, c: &Conn) -> bool {
        self.port.is_none_or(|p| c.service_port == p)
            && self.state.is_none_or(|s| c.state == s)
            && self.role.is_none_or(|r| c.role == r)
            && (!self.lingering || c.lingering)
    }
}

/// The connections matching a filter, at an instant.
#[derive(Clone, Debug, Default)]
pub(crate) struct Conns {
    pub(crate) conns: Vec<Conn>,
    /// CLOCK_MONOTONIC ns of the answer (ages are computed against it).
    pub(crate) now_ns: u64,
}

impl Conns {
    pub(crate) fn of(table: &Table, filter: &ConnFilter, now_ns: u64) -> Conns {
        let conns = table
            .conns()
            .map(|(_, c)| c)
            .filter(|c| filter.matches(c))
            .cloned()
            .collect();
        Conns { conns, now_ns }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::table::DEFAULT_EPHEMERAL;
    use crate::testing::tr;
    use TcpState::*;

    #[test]
    fn a_filter_matches_on_every_field_it_names() {
        let mut t = Table::new(16, DEFAULT_EPHEMERAL);
        t.apply(&tr(1, 1, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80"));
        t.apply(&tr(
            2,
            1,
            Listen,
            SynRecv,
            "10.0.0.1:8080",
            "10.0.0.3:40000",
        ));
        let ports = |f: ConnFilter| -> Vec<u16> {
            let mut v: Vec<u16> = Conns::of(&t, &f, 2)
                .conns
                .iter()
                .map(|c| c.service_port)
                .collect();
            v.sort();
            v
        };
        assert_eq!(ports(ConnFilter::default()), [80, 8080]);
        let client = ConnFilter {
            role: Some(Role::Client),
            ..ConnFilter::default()
        };
        assert_eq!(ports(client), [80]);
        let syn_recv = ConnFilter {
            state: Some(SynRecv),
            ..ConnFilter::default()
        };
        assert_eq!(ports(syn_recv), [8080]);
        let port = ConnFilter {
            port: Some(8080),
            role: Some(Role::Client),
            ..ConnFilter::default()
        };
        assert!(ports(port).is_empty());
        let lingering = ConnFilter {
            lingering: true,
            ..ConnFilter::default()
        };
        assert!(ports(lingering).is_empty());
    }
}
