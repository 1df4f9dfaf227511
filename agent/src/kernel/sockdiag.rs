//! NETLINK_SOCK_DIAG dumps (what `ss` uses): every TCP socket of a network namespace, IPv4 and
//! IPv6, all states, timewait sockets included. The ground truth for sockets that existed before
//! the agent started, for `TIME_WAIT` and orphaned `FIN_WAIT_2` (which the tracepoint never
//! shows), and for repairing the table after lost events.
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, Timer},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};
use tcpstate_common::TcpState;
use thiserror::Error;

use super::procfs;
use crate::model::event::KernelSocket;

#[derive(Debug, Error)]
pub(crate) enum SockDiagError {
    #[error("sock_diag {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("sock_diag reply could not be decoded: {0}")]
    Decode(String),
    #[error("sock_diag: the kernel answered with error {0}")]
    Kernel(i32),
    #[error(
        "cannot enter network namespace {path}: {source}; the agent needs CAP_SYS_ADMIN for it"
    )]
    Setns { path: String, source: nix::Error },
}

/// Which sockets a dump asks for: all, or only those in some states (the kernel filters, so a
/// light dump costs what the sockets it returns cost, plus a walk of the socket hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum States {
    All,
    Only(&'static [TcpState]),
}

impl States {
    fn flags(self) -> StateFlags {
        match self {
            States::All => StateFlags::all(),
            // A timewait socket matches on its substate (TIME_WAIT or FIN_WAIT2).
            States::Only(states) => StateFlags::from_bits_truncate(
                states.iter().fold(0, |m, s| m | (1u32 << (*s as u8))),
            ),
        }
    }
}

/// Dumps the TCP sockets of the calling thread's network namespace in `states`, tagging them
/// `netns`.
pub(crate) fn dump_here(netns: u32, states: States) -> Result<Vec<KernelSocket>, SockDiagError> {
    let io = |what| move |source| SockDiagError::Io { what, source };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(io("socket"))?;
    socket.bind_auto().map_err(io("bind"))?;
    socket.connect(&NlAddr::new(0, 0)).map_err(io("connect"))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: states.flags(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf[..]);
        socket.send(&buf[..], 0).map_err(io("send"))?;
        read_dump(&socket, netns, &mut out)?;
    }
    Ok(out)
}

/// Offset of `idiag_expires` in a netlink message carrying a `struct inet_diag_msg`: 16 bytes
/// of `nlmsghdr`, then family, state, timer, retrans (4), `inet_diag_sockid` (48). The crate
/// reports a timewait timer without its time left, which the age of an orphaned FIN_WAIT2
/// socket needs, so it is read here.
const EXPIRES_AT: usize = 16 + 4 + 48;

fn read_dump(
    socket: &Socket,
    netns: u32,
    out: &mut Vec<KernelSocket>,
) -> Result<(), SockDiagError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(|source| SockDiagError::Io {
                what: "recv",
                source,
            })?;
        let mut offset = 0;
        while offset < size {
            let bytes = &buf[offset..size];
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                .map_err(|e| SockDiagError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(SockDiagError::Kernel(e.code.map_or(0, |c| c.get())));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    if let Ok(state) = TcpState::try_from(h.state) {
                        let raw_expires = bytes
                            .get(EXPIRES_AT..EXPIRES_AT + 4)
                            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
                        let timer_left = match &h.timer {
                            Some(Timer::TimeWait) => {
                                raw_expires.map(|ms| Duration::from_millis(ms.into()))
                            }
                            Some(Timer::Retransmit(d, _))
                            | Some(Timer::KeepAlive(d))
                            | Some(Timer::Probe(d)) => Some(*d),
                            None => None,
                        };
                        out.push(KernelSocket {
                            netns,
                            state,
                            local: SocketAddr::new(
                                h.socket_id.source_address,
                                h.socket_id.source_port,
                            ),
                            remote: SocketAddr::new(
                                h.socket_id.destination_address,
                                h.socket_id.destination_port,
                            ),
                            inode: h.inode,
                            timewait: matches!(h.timer, Some(Timer::TimeWait)),
                            timer_left,
                        });
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// The network namespace inode of a `/proc/PID/ns/net`-like path.
pub fn netns_inode(path: &Path) -> std::io::Result<u32> {
    Ok(std::fs::metadata(path)?.ino() as u32)
}

/// Every network namespace on the host, by inode, with a path that enters it: the named ones
/// (`/run/netns/*`, which `ip netns` and CNI plugins create, possibly with no process inside)
/// first, since they stay; then the namespaces of all processes (`/proc/*/ns/net`). A process
/// that exits takes its path with it, so a namespace keeps every path found, to try in turn:
/// a short-lived process (an `ss` run by `ip netns exec`) must not make a whole namespace look
/// unreadable, and its sockets gone.
pub(crate) fn namespaces(proc: &Path) -> BTreeMap<u32, Vec<PathBuf>> {
    let mut found: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    let mut add = |path: PathBuf| {
        if let Ok(ino) = netns_inode(&path) {
            found.entry(ino).or_default().push(path);
        }
    };
    add(proc.join("self/ns/net"));
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                add(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(proc) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                add(e.path().join("ns/net"));
            }
        }
    }
    found
}

/// Dumps one namespace from a thread of its own (setns changes only the calling thread).
pub(crate) fn dump_namespace(
    netns: u32,
    paths: &[PathBuf],
) -> Result<Vec<KernelSocket>, SockDiagError> {
    in_namespace(netns, paths, || dump_here(netns, States::All))
}

/// One namespace's sockets and its `ip_local_port_range` (sysctls under `/proc/sys/net` are
/// those of the reading thread's namespace).
pub(crate) fn dump_namespace_with_range(
    netns: u32,
    paths: &[PathBuf],
    states: States,
) -> Result<(Vec<KernelSocket>, RangeInclusive<u16>), SockDiagError> {
    in_namespace(netns, paths, || {
        Ok((dump_here(netns, states)?, procfs::ephemeral_range()))
    })
}

/// Runs `f` in namespace `netns` (entered through the first of `paths` that still opens) on a
/// thread of its own.
fn in_namespace<T: Send>(
    netns: u32,
    paths: &[PathBuf],
    f: impl FnOnce() -> Result<T, SockDiagError> + Send,
) -> Result<T, SockDiagError> {
    // Our own namespace needs no setns (nor the CAP_SYS_ADMIN it takes).
    if netns_inode(Path::new("/proc/thread-self/ns/net")).ok() == Some(netns) {
        return f();
    }
    // The first path that still opens onto this namespace (a pid may have been reused).
    let opened = paths.iter().find_map(|p| {
        let file = File::open(p).ok()?;
        (file.metadata().ok()?.ino() as u32 == netns).then(|| (p.clone(), file))
    });
    let Some((path, file)) = opened else {
        return Err(SockDiagError::Io {
            what: "opening the namespace",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                SockDiagError::Setns {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(SockDiagError::Decode("dump thread panicked".into())))
    })
}

/// A dump of every namespace. Namespaces that cannot be entered are skipped and reported.
#[derive(Debug, Default)]
pub(crate) struct HostDump {
    pub(crate) sockets: Vec<KernelSocket>,
    pub(crate) namespaces: usize,
    pub(crate) failed: Vec<(u32, String)>,
    /// Each dumped namespace's `ip_local_port_range`.
    pub(crate) ephemeral: BTreeMap<u32, RangeInclusive<u16>>,
}

pub(crate) fn dump_host(proc: &Path, states: States) -> HostDump {
    let mut dump = HostDump::default();
    for (netns, paths) in namespaces(proc) {
        match dump_namespace_with_range(netns, &paths, states) {
            Ok((mut s, range)) => {
                dump.namespaces += 1;
                dump.sockets.append(&mut s);
                dump.ephemeral.insert(netns, range);
            }
            Err(e) => dump.failed.push((netns, e.to_string())),
        }
    }
    dump
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_light_dump_asks_for_its_states_only() {
        use TcpState::*;
        let f = States::Only(&[TimeWait, Listen]).flags();
        assert_eq!(f.bits(), (1 << 6) | (1 << 10));
        assert_eq!(States::All.flags(), StateFlags::all());
    }

    #[test]
    fn the_expires_offset_matches_the_kernel_struct() {
        // struct inet_diag_sockid: sport, dport (2+2), src[4], dst[4] (u32 each), if, cookie[2].
        assert_eq!(2 + 2 + 16 + 16 + 4 + 8, 48);
        assert_eq!(EXPIRES_AT, 68);
    }
}
