//! What the kernel tells the model: transitions (from the ring buffer) and sockets (from
//! sock_diag dumps). Plain data; the `kernel` layer builds them.
use std::net::SocketAddr;
use std::time::Duration;

use tcpstate_common::TcpState;

/// One TCP state transition of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds at the transition.
    pub ts_ns: u64,
    /// The kernel socket address (`skaddr`): identifies the socket while it lives.
    pub sock: u64,
    /// Time spent in `old`, when the program saw the socket enter it.
    pub prev_state_ns: Option<u64>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    /// Network namespace inode, 0 when unknown.
    pub netns: u32,
    /// Thread group current at the transition (the owner only for connect/close/shutdown).
    pub pid: u32,
}

/// One TCP socket as a sock_diag dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelSocket {
    /// Network namespace inode.
    pub(crate) netns: u32,
    pub(crate) state: TcpState,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// Socket inode (0 for timewait and orphaned sockets): the key to its owner in /proc.
    pub(crate) inode: u32,
    /// A timewait mini-socket: `TIME_WAIT`, or `FIN_WAIT2` substate of an orphaned socket.
    pub(crate) timewait: bool,
    /// Time left on the socket's timer, when it has one.
    pub(crate) timer_left: Option<Duration>,
}
