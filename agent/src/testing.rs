//! Test support shared by the unit tests, the integration tests and the benches: the one way
//! to write a [`Transition`] by hand. Not part of the agent's interface.
use tcpstate_common::TcpState;

use crate::model::event::Transition;

/// A transition of socket `sock` at `ts_ns` between two `ip:port` ends, opened by pid 7, in
/// namespace 0, with no time in the old state.
pub fn tr(
    sock: u64,
    ts_ns: u64,
    old: TcpState,
    new: TcpState,
    local: &str,
    remote: &str,
) -> Transition {
    Transition {
        ts_ns,
        sock,
        prev_state_ns: None,
        local: local.parse().expect("local is ip:port"),
        remote: remote.parse().expect("remote is ip:port"),
        old,
        new,
        netns: 0,
        pid: 7,
    }
}

impl Transition {
    /// The same transition, after `ns` in the old state.
    pub fn with_prev(mut self, ns: u64) -> Transition {
        self.prev_state_ns = Some(ns);
        self
    }

    /// The same transition, with the task `pid` current.
    pub fn with_pid(mut self, pid: u32) -> Transition {
        self.pid = pid;
        self
    }
}
