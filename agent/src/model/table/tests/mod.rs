//! Unit tests of the table, by concern, with the helpers they share.
pub(super) use super::reconcile::{Corrections, SYNTHETIC_LIMIT};
pub(super) use super::stats::BUCKETS;
use super::*;
pub(super) use crate::model::event::KernelSocket;
pub(super) use crate::model::state::STATES;
pub(super) use crate::testing::tr;
pub(super) use TcpState::*;

mod apply;
mod budget;
mod ephemeral;
mod properties;
mod reconcile;
mod timewait;

pub(super) const SOCK_A: u64 = 0xffff_0000_0000_1000;
pub(super) const SOCK_B: u64 = 0xffff_0000_0000_2000;

pub(super) fn table() -> Table {
    Table::new(512, DEFAULT_EPHEMERAL)
}

pub(super) fn current(t: &Table, role: Role, port: u16, state: TcpState) -> u64 {
    t.stats(role, PortKey::Port(port))
        .map_or(0, |s| s.current[state.index()])
}

/// The client side of a connection to port 80 that the client closes first.
pub(super) fn client_lifecycle(t: &mut Table, sock: u64) {
    let c = "10.0.0.1:40000";
    let s = "10.0.0.2:80";
    t.apply(&tr(sock, 1_000, Close, SynSent, "10.0.0.1:0", s));
    t.apply(&tr(sock, 2_000, SynSent, Established, c, s).with_prev(1_000));
    t.apply(&tr(sock, 300_002_000, Established, FinWait1, c, s).with_prev(300_000_000));
    t.apply(&tr(sock, 300_003_000, FinWait1, FinWait2, c, s).with_prev(1_000));
    t.apply(&tr(sock, 300_004_000, FinWait2, Close, c, s).with_prev(1_000));
}

pub(super) fn diag(state: TcpState, local: &str, remote: &str) -> KernelSocket {
    KernelSocket {
        netns: 4026531840,
        state,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        inode: 1000,
        timewait: false,
        timer_left: None,
    }
}

pub(super) const FIN: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) const SEC: u64 = 1_000_000_000;

pub(super) fn timewait(local: &str, remote: &str) -> KernelSocket {
    let mut d = diag(TimeWait, local, remote);
    d.timewait = true;
    d
}
