//! tcpstate's eBPF program: one event per TCP state transition.
//!
//! Attached to the tracepoint `sock:inet_sock_set_state`, which fires for every state change of a
//! full socket (IPv4 and IPv6, TCP, MPTCP and SCTP). For TCP it remembers, per socket, when the
//! socket entered its state, and sends one [`Event`] through the `EVENTS` ring buffer carrying the
//! time spent in the state it leaves.
//!
//! On the host this file compiles to an empty `main` so that the workspace builds everywhere; the
//! real object is built for `bpfel-unknown-none` by `agent/build.rs`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
            bpf_probe_read_kernel_buf,
        },
        macros::{map, tracepoint},
        maps::{LruHashMap, PerCpuArray, RingBuf},
        programs::TracePointContext,
    };
    use aya_log_ebpf::error;
    use tcpstate_common::{AF_INET6, Config, Event, IPPROTO_TCP, MAX_SPAN, SockState, TcpState};

    /// Offsets of the tracepoint's fields and the wakeup threshold. Overridden by the agent before
    /// load (aya's `EbpfLoader::override_global`) from
    /// `/sys/kernel/tracing/events/sock/inet_sock_set_state/format`: the layout is not stable
    /// across kernels (`protocol` grew from `__u8` to `__u16` in 5.6; some distributions add a
    /// common field), and Rust eBPF cannot emit CO-RE relocations.
    #[unsafe(no_mangle)]
    static CONFIG: Config = Config::ZERO;

    /// Events to userspace. The agent sets the size at load (`--ring-size`).
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

    /// `skaddr -> bpf_ktime_get_ns()` when the socket entered its current state. LRU so that
    /// sockets whose `-> CLOSE` we never see cannot fill it. The entry is deleted at `-> CLOSE`
    /// because the kernel reuses `struct sock` addresses after free.
    #[cfg(not(tcpstate_bench_hash))]
    #[map]
    static SOCK_STATE: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(
        131_072,
        if BENCH_NO_COMMON_LRU {
            BPF_F_NO_COMMON_LRU
        } else {
            0
        },
    );
    /// Benchmark only: a preallocated hash in place of the LRU (a full map refuses inserts).
    #[cfg(tcpstate_bench_hash)]
    #[map]
    static SOCK_STATE: aya_ebpf::maps::HashMap<u64, SockState> =
        aya_ebpf::maps::HashMap::with_max_entries(131_072, 0);

    /// Events lost because the ring buffer was full: only the program can know, so it counts
    /// them here, per CPU (no atomics on the hot path). The agent sums the slots.
    #[map]
    static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// Bytes past the wakeup threshold within which events still force a wakeup.
    const WAKEUP_WINDOW: u64 = 4096;

    /// Benchmark-only builds: `cargo xtask bench --breakdown` builds the program with
    /// `TCPSTATE_BENCH_VARIANT` set to leave one part out and measure what it costs. In every
    /// normal build the variable is unset, these are all `false`, and the branches compile away.
    const VARIANT: &str = match option_env!("TCPSTATE_BENCH_VARIANT") {
        Some(v) => v,
        None => "",
    };
    const fn variant(name: &str) -> bool {
        let (a, b) = (VARIANT.as_bytes(), name.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
    /// Returns at once: the cost of the tracepoint and of running any program on it.
    const BENCH_EMPTY: bool = variant("empty");
    /// Copies the record and filters on the protocol, nothing more.
    const BENCH_COPY_ONLY: bool = variant("copy");
    /// No per-socket map: no entry time, no namespace.
    const BENCH_NO_MAP: bool = variant("no-map");
    /// No clock read.
    const BENCH_NO_CLOCK: bool = variant("no-clock");
    /// Everything but the ring buffer: no event leaves the kernel.
    const BENCH_NO_RING: bool = variant("no-ring");
    /// Alternatives, each whole: per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`) instead of one
    /// shared list...
    const BENCH_NO_COMMON_LRU: bool = variant("no-common-lru");
    /// ...no query of the ring's backlog per event: the reader's 10 ms timer alone drains.
    const BENCH_NO_QUERY: bool = variant("no-query");
    const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

    #[tracepoint]
    pub fn tcpstate(ctx: TracePointContext) -> u32 {
        match try_tcpstate(&ctx) {
            Ok(()) => 0,
            Err(code) => {
                // Never on the per-event path: only when the kernel refuses a read of its own
                // tracepoint record, which means the layout handed to us is wrong.
                error!(
                    &ctx,
                    "tcpstate: reading the tracepoint record failed: {}", code
                );
                0
            }
        }
    }

    /// Reads a `T` at `offset` of the record, from the copy of its span that starts at `start`.
    /// The offsets come from the frozen `.rodata`, so the verifier sees constants and accepts the
    /// stack access; out-of-span offsets (impossible: the agent's parser checks) read as zero.
    #[inline(always)]
    fn field<T: Copy + Default>(span: &[u8; MAX_SPAN], start: u16, offset: u16) -> T {
        let at = offset.wrapping_sub(start) as usize;
        if at + core::mem::size_of::<T>() > MAX_SPAN {
            return T::default();
        }
        // SAFETY: in bounds (checked above); `T` is a plain integer type or byte array.
        unsafe { core::ptr::read_unaligned(span.as_ptr().add(at).cast::<T>()) }
    }

    /// The inode of the socket's network namespace: `sk->__sk_common.skc_net.net->ns.inum`, at
    /// offsets the agent read from BTF. 0 when they are unknown or a read fails.
    #[inline(always)]
    fn socket_netns(skaddr: u64, cfg: &Config) -> u32 {
        if cfg.sock_net == 0 {
            return 0;
        }
        // SAFETY: the helper checks the addresses; a bad one reads as an error, not a fault.
        unsafe {
            let net = match bpf_probe_read_kernel((skaddr + u64::from(cfg.sock_net)) as *const u64)
            {
                Ok(net) if net != 0 => net,
                _ => return 0,
            };
            bpf_probe_read_kernel((net + u64::from(cfg.net_inum)) as *const u32).unwrap_or(0)
        }
    }

    #[inline(always)]
    fn try_tcpstate(ctx: &TracePointContext) -> Result<(), i64> {
        if BENCH_EMPTY {
            return Ok(());
        }
        // SAFETY: CONFIG is a read-only global written only by the loader.
        let cfg = unsafe { core::ptr::read_volatile(&CONFIG) };
        let l = cfg.layout;

        // One helper call copies every field we need: ten separate reads cost more than the
        // rest of the program. The buffer is left uninitialised on purpose: BPF has no memset,
        // so zeroing it would call a byte loop that costs as much as the whole copy. The
        // verifier checks that we only read bytes the helper wrote (the offsets are constants
        // to it, from the frozen `.rodata`).
        let mut span = core::mem::MaybeUninit::<[u8; MAX_SPAN]>::uninit();
        let len = (l.span_len as usize).min(MAX_SPAN);
        // SAFETY: the helper checks the source and writes `len` bytes of our buffer.
        let span = unsafe {
            let buf = core::slice::from_raw_parts_mut(span.as_mut_ptr().cast::<u8>(), len);
            bpf_probe_read_kernel_buf(ctx.as_ptr().cast::<u8>().add(l.span_start as usize), buf)
                .map_err(|e| e as i64)?;
            &*span.as_ptr()
        };
        let s = l.span_start;

        let protocol = if l.protocol_size == 1 {
            u16::from(field::<u8>(span, s, l.protocol))
        } else {
            field::<u16>(span, s, l.protocol)
        };
        if protocol != IPPROTO_TCP || BENCH_COPY_ONLY {
            return Ok(());
        }
        let skaddr = field::<u64>(span, s, l.skaddr);
        let oldstate = field::<i32>(span, s, l.oldstate);
        let newstate = field::<i32>(span, s, l.newstate);

        let now = if BENCH_NO_CLOCK {
            0
        } else {
            // SAFETY: the helper has no preconditions.
            unsafe { bpf_ktime_get_ns() }
        };
        let mut prev_state_ns = 0;
        let netns;
        // An LRU insert of an existing key allocates a new node and frees the old one under the
        // LRU lock; overwriting the value in place is a plain store. So: insert on a socket's
        // first event only, update in place after, delete at CLOSE.
        let closing = newstate == TcpState::Close as i32;
        let found = if BENCH_NO_MAP {
            Err(())
        } else {
            Ok(SOCK_STATE.get_ptr_mut(&skaddr))
        };
        match found {
            Err(()) => netns = 0,
            Ok(Some(st)) => {
                // SAFETY: the pointer is into the map value, valid for this program run; a
                // concurrent transition of the same socket cannot happen (socket lock).
                unsafe {
                    prev_state_ns = now.saturating_sub((*st).entered_ns);
                    netns = (*st).netns;
                    // The kernel also reports self-transitions: close() of a socket already in
                    // FIN_WAIT2 sets FIN_WAIT2 again (tcp_close_state) before it becomes a
                    // timewait socket. The socket did not leave its state: keep the entry time.
                    if oldstate != newstate {
                        (*st).entered_ns = now;
                    }
                }
                if closing {
                    // The socket is gone; its address will be reused.
                    let _ = SOCK_STATE.remove(&skaddr);
                }
            }
            Ok(None) => {
                // First sight of this socket: read its namespace once and keep it.
                netns = socket_netns(skaddr, &cfg);
                if !closing {
                    let st = SockState {
                        entered_ns: now,
                        netns,
                        _pad: 0,
                    };
                    let _ = SOCK_STATE.insert(&skaddr, &st, 0);
                }
            }
        }

        // The reader drains on a short timer; a wakeup per event would cost more than the
        // event. Wake it early only as the backlog crosses the threshold (a window, since CPUs
        // race past the exact crossing): past it the reader is either already awake or stuck,
        // and waking it on every event would only slow the kernel when it is behind.
        if BENCH_NO_RING {
            return Ok(());
        }
        let waiting = if BENCH_NO_QUERY {
            0
        } else {
            EVENTS.query(BPF_RB_AVAIL_DATA as u64)
        };
        let threshold = u64::from(cfg.wakeup_bytes);
        let flags = if waiting >= threshold && waiting < threshold + WAKEUP_WINDOW {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        } as u64;

        let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
            if let Some(slot) = DROPS.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, no other writer while this program runs here.
                unsafe { *slot += 1 };
            }
            return Ok(());
        };
        // Written field by field into the ring: building the event on the stack and copying
        // it in would go through the same byte-loop memcpy.
        let e = entry.as_mut_ptr();
        let family = field::<u16>(span, s, l.family);
        // SAFETY: `e` points at a reserved, exclusively owned, properly aligned `Event`.
        unsafe {
            (*e).ts_ns = now;
            (*e).skaddr = skaddr;
            (*e).prev_state_ns = prev_state_ns;
            let (saddr, daddr) = (
                (*e).saddr.as_mut_ptr().cast::<u64>(),
                (*e).daddr.as_mut_ptr().cast::<u64>(),
            );
            if family == AF_INET6 {
                saddr.write_unaligned(field::<u64>(span, s, l.saddr_v6));
                saddr
                    .add(1)
                    .write_unaligned(field::<u64>(span, s, l.saddr_v6 + 8));
                daddr.write_unaligned(field::<u64>(span, s, l.daddr_v6));
                daddr
                    .add(1)
                    .write_unaligned(field::<u64>(span, s, l.daddr_v6 + 8));
            } else {
                saddr.write_unaligned(u64::from(field::<u32>(span, s, l.saddr)));
                saddr.add(1).write_unaligned(0);
                daddr.write_unaligned(u64::from(field::<u32>(span, s, l.daddr)));
                daddr.add(1).write_unaligned(0);
            }
            (*e).netns = netns;
            // The pid only where the owner runs: elsewhere (softirq) it would be whoever the
            // interrupt fell on, and the helper costs 5% of the program (measured side by side).
            (*e).pid = if owner_context(oldstate, newstate) {
                (bpf_get_current_pid_tgid() >> 32) as u32
            } else {
                0
            };
            (*e).sport = field::<u16>(span, s, l.sport);
            (*e).dport = field::<u16>(span, s, l.dport);
            (*e).family = family;
            (*e).oldstate = oldstate as u8;
            (*e).newstate = newstate as u8;
        }
        entry.submit(flags);
        Ok(())
    }

    /// Transitions made by a system call of the socket's owner: `connect()` (CLOSE -> SYN_SENT),
    /// `listen()`, `close()` or `shutdown()` (ESTABLISHED -> FIN_WAIT1, CLOSE_WAIT -> LAST_ACK),
    /// and `-> CLOSE`, which a close() with unread data or SO_LINGER 0 makes (a `-> CLOSE` in
    /// softirq gets a pid it should not; the agent reads the pid of opens only).
    #[inline(always)]
    fn owner_context(old: i32, new: i32) -> bool {
        old == TcpState::Close as i32
            || new == TcpState::Close as i32
            || new == TcpState::FinWait1 as i32
            || new == TcpState::LastAck as i32
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program in which a panic is reachable.
        unsafe { core::hint::unreachable_unchecked() }
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
