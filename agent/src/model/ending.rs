//! How a connection ended, read from the state it left for `CLOSE`.
//!
//! The tracepoint shows full sockets only, so a connection's last transition says how it ended
//! (`net/ipv4/tcp_input.c`, `tcp.c`, `tcp_minisocks.c`):
//! - `FIN_WAIT2 -> CLOSE`: this side sent its FIN first and the peer's FIN came (the socket
//!   becomes a timewait socket), or the orphan moved to the timewait table: `local_first`.
//! - `LAST_ACK -> CLOSE`: the peer's FIN came first and ours was acknowledged: `remote_first`.
//! - `CLOSING -> CLOSE`: both FINs crossed: `simultaneous`.
//! - `ESTABLISHED`, `CLOSE_WAIT` or `FIN_WAIT1 -> CLOSE`: no orderly exchange of FINs; an RST
//!   was sent (`SO_LINGER` 0, `close()` with unread data) or received (a crashed or
//!   impatient peer, a middlebox), or the retransmissions of an orphan ran out: `reset`.
//! - `SYN_SENT -> CLOSE`: a `connect()` that failed (refused, unreachable, timed out) or was
//!   given up. `SYN_RECV -> CLOSE`: a server socket that never finished its handshake; the
//!   kernel shows only the rare full socket here (TCP Fast Open, a child dropped at birth): a
//!   handshake that never completes lives in a request socket, which the tracepoint does not see.
//!
//! A reset received in `FIN_WAIT2` or `LAST_ACK` looks like the orderly end there; the kernel's
//! event does not tell them apart.
use tcpstate_common::TcpState;

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum CloseHow {
    LocalFirst,
    RemoteFirst,
    Simultaneous,
    Reset,
}

impl CloseHow {
    pub(crate) const ALL: [CloseHow; 4] = [
        CloseHow::LocalFirst,
        CloseHow::RemoteFirst,
        CloseHow::Simultaneous,
        CloseHow::Reset,
    ];

    pub(crate) const fn label(self) -> &'static str {
        match self {
            CloseHow::LocalFirst => "local_first",
            CloseHow::RemoteFirst => "remote_first",
            CloseHow::Simultaneous => "simultaneous",
            CloseHow::Reset => "reset",
        }
    }

    /// How a connection that left `old` for `CLOSE` ended; `None` for a listener or a socket
    /// that never connected.
    pub(crate) const fn of(old: TcpState) -> Option<CloseHow> {
        use TcpState::*;
        match old {
            FinWait2 => Some(CloseHow::LocalFirst),
            LastAck => Some(CloseHow::RemoteFirst),
            Closing => Some(CloseHow::Simultaneous),
            Established | CloseWait | FinWait1 => Some(CloseHow::Reset),
            _ => None,
        }
    }
}
