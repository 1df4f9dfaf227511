//! The doctor's words: the symptom with its numbers, the cause and the fix, per kind of finding.
//! The teardown facts are Linux's (`net/ipv4/tcp.c`, `tcp_input.c`, `tcp_minisocks.c`).
use std::time::Duration;

use tcpstate_common::TcpState;

use super::Kind;
use crate::model::table::{DestUse, Role};

/// A duration as people read it: `42 s`, `5 min 3 s`, `2 h 10 min`.
pub(crate) fn age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(super) fn lingering(
    n: u64,
    state: TcpState,
    threshold: Duration,
    oldest: f64,
    lower_bound: bool,
) -> String {
    let name = match state {
        TcpState::CloseWait => "CLOSE_WAIT",
        _ => "FIN_WAIT_2 (held open by a process)",
    };
    format!(
        "{} in {name} for longer than {}; the oldest for {}{}",
        plural(n, "connection", "connections"),
        age(threshold.as_secs_f64()),
        if lower_bound { "at least " } else { "" },
        age(oldest),
    )
}

pub(super) fn orphans(n: u64, oldest: f64) -> String {
    format!(
        "{} orphaned in FIN_WAIT_2 (closed by their process, the peer never closed its half); the oldest for {}",
        plural(n, "socket", "sockets"),
        age(oldest),
    )
}

pub(super) fn ephemeral(d: &DestUse) -> String {
    format!(
        "{} of {} local ports ({}) in use toward {}, TIME_WAIT included",
        d.in_use,
        d.range,
        percent(d.share()),
        d.remote,
    )
}

/// `; 2.0 a minute over the 5 min 0 s the port has been counted`, when that time is known.
pub(super) fn rate(n: u64, over_seconds: Option<f64>) -> String {
    match over_seconds {
        Some(secs) if secs >= 1.0 => format!(
            "; {:.1} a minute over the {} the port has been counted",
            n as f64 * 60.0 / secs,
            age(secs)
        ),
        _ => String::new(),
    }
}

pub(super) fn resets(resets: u64, closed: u64, share: f64) -> String {
    format!(
        "{resets} of {} ended by a reset ({}), without the FIN exchange",
        plural(closed, "connection", "connections"),
        percent(share),
    )
}

pub(super) fn failures(failed: u64, attempts: u64, share: f64, role: Role) -> String {
    match role {
        Role::Client => format!(
            "{failed} of {} failed (SYN_SENT -> CLOSE, {}): refused, unreachable or timed out",
            plural(attempts, "connect", "connects"),
            percent(share),
        ),
        Role::Server => format!(
            "{failed} of {} never completed (SYN_RECV -> CLOSE, {})",
            plural(attempts, "accepted handshake", "accepted handshakes"),
            percent(share),
        ),
    }
}

/// The cause and the fix of a kind of finding, for a role.
pub(super) fn why_and_fix(kind: Kind, role: Role) -> (&'static str, &'static str) {
    match (kind, role) {
        (Kind::CloseWaitLeak, _) => (
            "the peer closed its side (sent FIN) and the process holding the socket has not called close() or shutdown(): it never read to EOF, or read EOF and forgot to close, often on an error path. The kernel never times CLOSE_WAIT out; each one holds a file descriptor until the process closes it or exits.",
            "fix the application: close the socket once a read returns EOF (0 bytes), on every error path too, and set read timeouts so a silent peer cannot hold it forever. Restarting the process frees them, but they come back.",
        ),
        (Kind::FinWait2Held, _) => (
            "this side shut down its half (shutdown(SHUT_WR)) and keeps the socket, and the peer never sends its FIN: a peer that forgets close(), or a protocol it does not finish. A socket still held by a process stays in FIN_WAIT_2 for as long as it is held; tcp_fin_timeout only applies once it is closed.",
            "fix the peer so that it closes after reading EOF; on this side, close() the socket after a deadline instead of waiting for the peer's FIN forever.",
        ),
        (Kind::FinWait2Orphaned, Role::Server) => (
            "the server closed first and its clients never close their half: clients that vanish, or hold the connection and never close it; or the server closes first without reading the request to EOF. Each orphan waits net.ipv4.tcp_fin_timeout (60 s by default) before the kernel reaps it.",
            "look at the peers: fix clients that never close, or let them close first where the protocol allows. A lower net.ipv4.tcp_fin_timeout bounds how long each orphan stays.",
        ),
        (Kind::FinWait2Orphaned, Role::Client) => (
            "this client closed first and the servers it talks to never close their half: a peer that forgets close(). Each orphan waits net.ipv4.tcp_fin_timeout (60 s by default) before the kernel reaps it.",
            "fix the server so that it closes after reading EOF; a lower net.ipv4.tcp_fin_timeout bounds how long each orphan stays.",
        ),
        (Kind::EphemeralPortsExhausting, _) => (
            "each connection to this destination takes a local port from ip_local_port_range, and the side that closes first keeps it in TIME_WAIT for 60 s (TCP_TIMEWAIT_LEN, fixed in the kernel). Many short connections closed by this client use the range up; then connect() fails with EADDRNOTAVAIL (\"cannot assign requested address\").",
            "reuse connections (keep-alive, a connection pool); let the server close first where the protocol allows; set net.ipv4.tcp_tw_reuse=1 on this client; widen net.ipv4.ip_local_port_range. Do not use SO_LINGER with a zero timeout to skip TIME_WAIT: it resets the connection and loses unsent data.",
        ),
        (Kind::Resets, _) => (
            "ESTABLISHED (or CLOSE_WAIT, FIN_WAIT_1) -> CLOSE without the FIN states is an abortive close: an RST sent (SO_LINGER with a zero timeout, close() with unread data) or received (a crashed or restarted peer, a middlebox or load balancer timing the connection out). Data in flight is lost.",
            "find who resets: `tcpstate watch --port PORT` shows each transition with its peer. Read requests to the end before closing, do not set SO_LINGER 0, and align idle timeouts with the load balancers in between.",
        ),
        (Kind::ConnectFailures, Role::Client) => (
            "connect() ended in SYN_SENT -> CLOSE: the destination refused (nothing listens, RST), is unreachable, or did not answer before the SYN retries ran out (net.ipv4.tcp_syn_retries).",
            "check that the service is up and listening on that port and reachable from here (firewall, routes, DNS pointing at the right address); `tcpstate watch --port PORT` shows the destinations.",
        ),
        (Kind::ConnectFailures, Role::Server) => (
            "accepted handshakes that ended in SYN_RECV -> CLOSE before they were established. The kernel shows only full sockets here: handshakes that never complete (SYN floods, clients gone after the SYN) live in request sockets the tracepoint does not see; look at ListenOverflows and ListenDrops in `nstat` for those.",
            "check the accept backlog (somaxconn, the listen() backlog) and the application's accept rate.",
        ),
    }
}
