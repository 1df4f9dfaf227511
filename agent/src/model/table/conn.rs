//! What one socket is: its ends, its role and service port, and the key it is counted under.
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use rustc_hash::FxHasher;
use tcpstate_common::TcpState;

/// Both ports known (a listener has no remote port).
pub(super) fn complete(c: &Conn) -> bool {
    c.local.port() != 0 && (c.remote.port() != 0 || c.listener)
}

/// Which end of the connection this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Accepted (passive open) or listening: the service port is the local port.
    Server,
    /// Connected (active open): the service port is the remote port.
    Client,
}

impl Role {
    pub(crate) const ALL: [Role; 2] = [Role::Server, Role::Client];

    pub const fn label(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }

    pub(super) const fn idx(self) -> usize {
        self as usize
    }
}

/// A role that is neither `server` nor `client`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}`: use server or client")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s.trim().to_ascii_lowercase().as_str() {
            "server" => Ok(Role::Server),
            "client" => Ok(Role::Client),
            _ => Err(UnknownRole(s.to_string())),
        }
    }
}

/// A service port, or the bucket for ports beyond the cardinality limit; with `--per-netns`,
/// qualified by the network namespace inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum PortKey {
    Port(u16),
    Other,
    NsPort(u32, u16),
    NsOther(u32),
}

impl PortKey {
    /// Label value: the number, or `other`.
    pub(crate) fn label(self) -> String {
        match self {
            PortKey::Port(p) | PortKey::NsPort(_, p) => p.to_string(),
            PortKey::Other | PortKey::NsOther(_) => "other".to_string(),
        }
    }

    /// The namespace, when aggregates are per namespace.
    pub(crate) fn netns(self) -> Option<u32> {
        match self {
            PortKey::NsPort(n, _) | PortKey::NsOther(n) => Some(n),
            _ => None,
        }
    }

    /// The `other` bucket of the same namespace.
    pub(super) fn other(self) -> PortKey {
        match self {
            PortKey::NsPort(n, _) | PortKey::NsOther(n) => PortKey::NsOther(n),
            _ => PortKey::Other,
        }
    }

    pub(super) fn is_other(self) -> bool {
        matches!(self, PortKey::Other | PortKey::NsOther(_))
    }
}

/// A socket address in 20 bytes instead of `SocketAddr`'s 32: events and dumps build theirs
/// with flow info and scope id 0, so nothing is lost.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Endpoint {
    pub(crate) ip: IpAddr,
    port: u16,
}

impl Endpoint {
    pub(crate) fn port(self) -> u16 {
        self.port
    }

    pub(crate) fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// One live socket (88 bytes: it is held once per socket of the host).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Conn {
    pub(crate) local: Endpoint,
    pub(crate) remote: Endpoint,
    /// CLOCK_MONOTONIC ns when it entered `state`.
    pub(crate) since_ns: u64,
    /// When it was opened, if the agent saw the open (0: it did not).
    pub(crate) opened_ns: u64,
    /// Where it is counted (the service port, or `other` beyond the limit).
    pub(crate) key: PortKey,
    pub(crate) netns: u32,
    /// The task that opened it (meaningful for active opens only), 0 when unknown.
    pub(crate) pid: u32,
    /// Socket inode from sock_diag (0 until a dump matched it): the key to its owner.
    pub(crate) inode: u32,
    /// The service port (local for servers, remote for clients).
    pub(crate) service_port: u16,
    pub(crate) role: Role,
    pub(crate) state: TcpState,
    pub(crate) listener: bool,
    /// Set by the linger detector once the socket stayed too long in its state; the table then
    /// reports how it leaves (see [`super::Table::take_departures`]).
    pub(crate) lingering: bool,
    /// Known from a sock_diag dump, not from its transitions: `since_ns` is when the agent first
    /// saw it in this state, a lower bound of its time there.
    pub(crate) seeded: bool,
}

/// A socket's 4-tuple in its network namespace; the namespace is 0 when events do not carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Tuple {
    pub(super) netns: u32,
    pub(super) local: Endpoint,
    pub(super) remote: Endpoint,
}

/// A 64-bit digest of a tuple: what reconciliation sorts and remembers, instead of the
/// 68-byte tuple (matches are confirmed on the whole tuple).
pub(super) fn digest(t: &Tuple) -> u64 {
    let mut h = FxHasher::default();
    t.hash(&mut h);
    h.finish()
}

/// Role and service port of a socket first seen without its open (a mid-life event or a
/// sock_diag dump), by one rule: a local port with a listener in the socket's namespace makes
/// it a server; otherwise the end in the ephemeral range (`ip_local_port_range`) is the
/// client's; otherwise the lower port is the service.
pub(crate) fn role_of(
    local_listens: bool,
    local: u16,
    remote: u16,
    ephemeral: &RangeInclusive<u16>,
) -> (Role, u16) {
    let eph = |p| ephemeral.contains(&p);
    let server = if local_listens {
        true
    } else if eph(local) != eph(remote) {
        // Exactly one end is ephemeral: that one is the client.
        eph(remote)
    } else {
        // No better clue: the lower port is the service.
        local <= remote
    };
    if server {
        (Role::Server, local)
    } else {
        (Role::Client, remote)
    }
}

/// The kernel's default `net.ipv4.ip_local_port_range`.
pub const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;
