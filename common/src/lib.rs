//! The kernel/user contract of tcpstate.
//!
//! Everything here is shared verbatim between the eBPF program (`ebpf/`, built for
//! `bpfel-unknown-none`) and the userspace agent. Structs are `#[repr(C)]` with explicit
//! padding so that both sides agree on every byte; there is no `bool` and states travel as `u8`.
#![no_std]

/// Name of the ring buffer that carries [`Event`]s to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the LRU hash `skaddr -> SockState` (state entry time, network namespace).
pub const SOCK_STATE_MAP: &str = "SOCK_STATE";
/// Name of the per-CPU array (one `u64` slot) counting events dropped because the ring was full.
pub const DROPS_MAP: &str = "DROPS";
/// Name of the read-only global holding the [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the tracepoint program.
pub const PROGRAM_NAME: &str = "tcpstate";
/// Tracepoint category and name the program attaches to.
pub const TRACEPOINT_CATEGORY: &str = "sock";
pub const TRACEPOINT_NAME: &str = "inet_sock_set_state";

/// `IPPROTO_TCP`; MPTCP (262) and SCTP (132) fire the same tracepoint.
pub const IPPROTO_TCP: u16 = 6;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Byte offsets of the fields of `sock:inet_sock_set_state` inside the tracepoint record.
///
/// They are read at start from `/sys/kernel/tracing/events/sock/inet_sock_set_state/format`
/// because the layout is not stable: `protocol` was a `__u8` before Linux 5.6 (moving every
/// address field), and some distribution kernels add common fields that shift everything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    /// Size in bytes of `protocol`: 1 before Linux 5.6, 2 since.
    pub protocol_size: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Start of the span holding every field above; the program reads it with one helper call.
    pub span_start: u16,
    /// Length of that span, at most [`MAX_SPAN`].
    pub span_len: u16,
}

/// Largest span of the record the program copies at once (its stack buffer).
pub const MAX_SPAN: usize = 128;

impl Layout {
    /// All zero; the program's compiled-in value, always overridden by the agent before load.
    pub const ZERO: Layout = Layout {
        skaddr: 0,
        oldstate: 0,
        newstate: 0,
        sport: 0,
        dport: 0,
        family: 0,
        protocol: 0,
        protocol_size: 0,
        saddr: 0,
        daddr: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        span_start: 0,
        span_len: 0,
    };
}

/// Settings the agent hands to the program before load (a `.rodata` global).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub layout: Layout,
    /// Wake the reader only once this many bytes are waiting in the ring; below that the
    /// agent drains on its own timer. A per-event wakeup costs more than the event itself.
    pub wakeup_bytes: u32,
    /// Offset of the `struct net *` in `struct sock` (`__sk_common.skc_net.net`), from BTF;
    /// 0 when unknown: events then carry netns 0.
    pub sock_net: u16,
    /// Offset of `ns.inum` in `struct net`, from BTF.
    pub net_inum: u16,
}

/// Value of the per-socket map: when the socket entered its state, and its network namespace
/// (read once, at the socket's first event).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub entered_ns: u64,
    pub netns: u32,
    pub _pad: u32,
}

impl Config {
    pub const ZERO: Config = Config {
        layout: Layout::ZERO,
        wakeup_bytes: 0,
        sock_net: 0,
        net_inum: 0,
    };
}

/// One TCP state transition, as sent through the ring buffer. 72 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` at the transition (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The kernel's `struct sock *`: unique while the socket lives, reused after it is freed.
    pub skaddr: u64,
    /// Nanoseconds spent in `oldstate`; 0 when unknown (the socket entered it before the program
    /// was attached, or its map entry was evicted).
    pub prev_state_ns: u64,
    /// Local address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    /// Remote address, laid out as `saddr`.
    pub daddr: [u8; 16],
    /// Network namespace inode; 0 when unknown.
    pub netns: u32,
    /// Thread group id current at the transition, read only for transitions that run in the
    /// owner's context (connect, listen, close, shutdown: opens, `-> FIN_WAIT1`,
    /// `-> LAST_ACK`, `-> CLOSE`); 0 for the others, which run in softirq.
    pub pid: u32,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
}

/// Size of [`Event`] on the wire.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();
const _: () = assert!(EVENT_SIZE == 72);
const _: () = assert!(core::mem::size_of::<Config>() == 36);
const _: () = assert!(core::mem::size_of::<SockState>() == 16);

/// TCP states as `include/net/tcp_states.h` numbers them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// The eleven states a full socket can be in, in kernel order (`NEW_SYN_RECV` is a request
    /// socket state and never appears on a full socket).
    pub const ALL: [TcpState; 11] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
    ];

    /// Label value, spelled as node_exporter's tcpstat collector writes it.
    pub const fn label(self) -> &'static str {
        match self {
            TcpState::Established => "established",
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::FinWait1 => "fin_wait1",
            TcpState::FinWait2 => "fin_wait2",
            TcpState::TimeWait => "time_wait",
            TcpState::Close => "close",
            TcpState::CloseWait => "close_wait",
            TcpState::LastAck => "last_ack",
            TcpState::Listen => "listen",
            TcpState::Closing => "closing",
            TcpState::NewSynRecv => "new_syn_recv",
        }
    }

    /// Name as `ss` and the kernel write it, for people: `CLOSE_WAIT`.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// Dense index 0..12 for array-backed tables.
    pub const fn index(self) -> usize {
        self as usize - 1
    }
}

/// The number the kernel used is not a TCP state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidState(pub u8);

impl TryFrom<u8> for TcpState {
    type Error = InvalidState;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Ok(match v {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            12 => TcpState::NewSynRecv,
            other => return Err(InvalidState(other)),
        })
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are `#[repr(C)]`, made only of integers and integer arrays, with no
    // implicit padding (asserted by the size checks above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::Layout {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::SockState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_index_densely() {
        for (i, s) in TcpState::ALL.iter().enumerate() {
            assert_eq!(TcpState::try_from(*s as u8), Ok(*s));
            assert_eq!(s.index(), i);
        }
        assert_eq!(TcpState::try_from(0), Err(InvalidState(0)));
        assert_eq!(TcpState::try_from(13), Err(InvalidState(13)));
        assert_eq!(TcpState::CloseWait.label(), "close_wait");
        assert_eq!(TcpState::FinWait2.name(), "FIN_WAIT2");
    }
}
