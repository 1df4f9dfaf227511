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
        bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
        macros::{map, tracepoint},
        maps::{LruHashMap, PerCpuArray, RingBuf},
        programs::TracePointContext,
    };
    use aya_log_ebpf::error;
    use tcpstate_common::{AF_INET, AF_INET6, Config, Event, IPPROTO_TCP, TcpState};

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
    #[map]
    static SOCK_STATE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(131_072, 0);

    /// Events lost because the ring buffer was full: only the program can know, so it counts
    /// them here, per CPU (no atomics on the hot path). The agent sums the slots.
    #[map]
    static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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

    /// Reads a `T` at `offset` of the tracepoint record. The offset comes from a global, so it
    /// is not a constant the verifier accepts for a direct context load: read through the helper.
    #[inline(always)]
    fn field<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i64> {
        // SAFETY: the helper checks the address; offsets come from the format file.
        unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|e| e as i64)
    }

    #[inline(always)]
    fn try_tcpstate(ctx: &TracePointContext) -> Result<(), i64> {
        // SAFETY: CONFIG is a read-only global written only by the loader.
        let cfg = unsafe { core::ptr::read_volatile(&CONFIG) };
        let l = cfg.layout;

        let protocol = if l.protocol_size == 1 {
            u16::from(field::<u8>(ctx, l.protocol)?)
        } else {
            field::<u16>(ctx, l.protocol)?
        };
        if protocol != IPPROTO_TCP {
            return Ok(());
        }

        let skaddr = field::<u64>(ctx, l.skaddr)?;
        let oldstate = field::<i32>(ctx, l.oldstate)?;
        let newstate = field::<i32>(ctx, l.newstate)?;
        let family = field::<u16>(ctx, l.family)?;

        let mut ev = Event {
            ts_ns: 0,
            skaddr,
            prev_state_ns: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            netns: 0,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            sport: field::<u16>(ctx, l.sport)?,
            dport: field::<u16>(ctx, l.dport)?,
            family,
            oldstate: oldstate as u8,
            newstate: newstate as u8,
        };
        if family == AF_INET {
            let s = field::<[u8; 4]>(ctx, l.saddr)?;
            let d = field::<[u8; 4]>(ctx, l.daddr)?;
            ev.saddr[..4].copy_from_slice(&s);
            ev.daddr[..4].copy_from_slice(&d);
        } else if family == AF_INET6 {
            ev.saddr = field::<[u8; 16]>(ctx, l.saddr_v6)?;
            ev.daddr = field::<[u8; 16]>(ctx, l.daddr_v6)?;
        }

        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        ev.ts_ns = now;
        // SAFETY: the value is copied out at once; a concurrent update can only make it stale.
        if let Some(entered) = unsafe { SOCK_STATE.get(&skaddr) } {
            ev.prev_state_ns = now.saturating_sub(*entered);
        }
        if newstate == TcpState::Close as i32 {
            // The socket is gone; its address will be reused.
            let _ = SOCK_STATE.remove(&skaddr);
        } else {
            let _ = SOCK_STATE.insert(&skaddr, &now, 0);
        }

        // Wake the reader only when enough is waiting; below that it drains on a short timer.
        let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= u64::from(cfg.wakeup_bytes) {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        } as u64;
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                entry.write(ev);
                entry.submit(flags);
            }
            None => {
                if let Some(slot) = DROPS.get_ptr_mut(0) {
                    // SAFETY: per-CPU slot, no other writer while this program runs here.
                    unsafe { *slot += 1 };
                }
            }
        }
        Ok(())
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
