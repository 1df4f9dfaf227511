//! Loading, attaching and owning the eBPF program and its maps. With [`super::ring`] (which
//! reads the event ring), the only code that uses aya.
use std::os::fd::AsFd;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use tcpstate_common::{
    CONFIG_GLOBAL, Config, DROPS_MAP, EVENTS_MAP, Layout, PROGRAM_NAME, SOCK_STATE_MAP,
    TRACEPOINT_CATEGORY, TRACEPOINT_NAME,
};
use thiserror::Error;

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstate-ebpf"));

/// Load-time settings.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Ring buffer size in bytes: a power of two, a multiple of the page size.
    pub ring_bytes: u32,
    /// Capacity of the per-socket state-entry map.
    pub max_sockets: u32,
    /// Wake the reader once this many bytes wait in the ring.
    pub wakeup_bytes: u32,
    /// Where a socket's network namespace is, from BTF; None: events carry netns 0.
    pub netns: Option<super::btf::NetnsOffsets>,
}

#[derive(Debug, Error)]
pub enum BpfError {
    #[error(
        "permission denied while {what}: run as root, or grant CAP_BPF and CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    Permission { what: &'static str },
    #[error(
        "permission denied while {what}: Linux {release} (before 5.11) charges eBPF maps to RLIMIT_MEMLOCK, which is {limit} here: raise it (systemd: LimitMEMLOCK=infinity, as the shipped unit does; podman/docker: --ulimit memlock=-1) or grant CAP_SYS_RESOURCE"
    )]
    Memlock {
        what: &'static str,
        release: String,
        limit: String,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: &'static str, detail: String },
    #[error("the eBPF object has no {0}: the build is broken, rebuild with `cargo xtask run`")]
    Missing(&'static str),
}

impl BpfError {
    fn from_error(what: &'static str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut detail = err.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
            {
                return permission(what);
            }
            if !detail.contains(&e.to_string()) {
                detail = format!("{detail}: {e}");
            }
            cur = e.source();
        }
        BpfError::Failed { what, detail }
    }
}

/// EPERM: on kernels before 5.11 with a finite RLIMIT_MEMLOCK (the agent could not raise it),
/// the map memory is the likelier cause, and the fix differs.
fn permission(what: &'static str) -> BpfError {
    let release = super::procfs::kernel_release();
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        .map(|(soft, _)| soft)
        .unwrap_or(libc::RLIM_INFINITY);
    if charges_memlock(&release) && limit != libc::RLIM_INFINITY {
        return BpfError::Memlock {
            what,
            release,
            limit: format!("{} KiB", limit / 1024),
        };
    }
    BpfError::Permission { what }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK rather than to the memory cgroup.
fn charges_memlock(release: &str) -> bool {
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) < (5, 11)
}

/// The loaded and attached program. Dropping it detaches the program.
pub struct Probe {
    _ebpf: Ebpf,
}

/// Reads the program's `recursion_misses` from its fd's fdinfo.
///
/// The kernel skips a tracing program when it fires while another BPF program runs on the same
/// CPU (for example, a softirq handling a packet interrupts a program): the transition is lost
/// before the program could count it, and only this counter knows. aya's program info does not
/// expose it.
pub struct RecursionMisses {
    fdinfo: std::path::PathBuf,
}

impl RecursionMisses {
    /// Whether the kernel counts skipped runs at all (`recursion_misses` in fdinfo, Linux 5.12
    /// and later). Before, a skipped run is a silent loss.
    pub fn counted(&self) -> bool {
        std::fs::read_to_string(&self.fdinfo)
            .is_ok_and(|t| t.lines().any(|l| l.starts_with("recursion_misses:")))
    }

    pub fn read(&self) -> u64 {
        std::fs::read_to_string(&self.fdinfo)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("recursion_misses:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Everything `load` hands out: the program, its event ring, its drop counter and its logger.
pub struct Loaded {
    pub probe: Probe,
    pub events: RingBuf<MapData>,
    pub drops: Drops,
    pub recursion: RecursionMisses,
    /// aya-log records from the program. Must stay alive (dropping it closes the log map) and be
    /// polled; see `engine::ebpf_log`.
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
}

/// The program's per-CPU count of events it could not reserve ring space for.
pub struct Drops(PerCpuArray<MapData, u64>);

impl Drops {
    /// Sum over all CPUs.
    pub fn total(&self) -> Result<u64, BpfError> {
        let values = self
            .0
            .get(&0, 0)
            .map_err(|e| BpfError::from_error("reading the drop counter", &e))?;
        Ok(values.iter().sum())
    }
}

/// Loads the program with `layout` and `opts`, attaches it to `sock:inet_sock_set_state`.
pub fn load(layout: Layout, opts: &Options) -> Result<Loaded, BpfError> {
    let config = Config {
        layout,
        wakeup_bytes: opts.wakeup_bytes,
        sock_net: opts.netns.map_or(0, |n| n.net),
        net_inum: opts.netns.map_or(0, |n| n.inum),
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(CONFIG_GLOBAL, &config, true)
        .map_max_entries(EVENTS_MAP, opts.ring_bytes)
        .map_max_entries(SOCK_STATE_MAP, opts.max_sockets)
        .load(EBPF_OBJECT)
        .map_err(|e| BpfError::from_error("loading the eBPF object", &e))?;
    // Before the program is loaded: the logger owns the log map's fd.
    let logger = aya_log::EbpfLogger::init(&mut ebpf)
        .map_err(|e| BpfError::from_error("opening the eBPF log map", &e))?;
    let program: &mut TracePoint = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(BpfError::Missing("tracepoint program"))?
        .try_into()
        .map_err(|e| BpfError::from_error("finding the tracepoint program", &e))?;
    program
        .load()
        .map_err(|e| BpfError::from_error("loading the tracepoint program (verifier)", &e))?;
    program
        .attach(TRACEPOINT_CATEGORY, TRACEPOINT_NAME)
        .map_err(|e| BpfError::from_error("attaching to sock:inet_sock_set_state", &e))?;
    use std::os::fd::AsRawFd;
    let prog_fd = program
        .fd()
        .map_err(|e| BpfError::from_error("finding the program's fd", &e))?
        .as_fd()
        .as_raw_fd();
    let recursion = RecursionMisses {
        fdinfo: format!("/proc/self/fdinfo/{prog_fd}").into(),
    };
    let events = ebpf
        .take_map(EVENTS_MAP)
        .ok_or(BpfError::Missing("EVENTS map"))?;
    let events = RingBuf::try_from(events)
        .map_err(|e| BpfError::from_error("opening the event ring buffer", &e))?;
    let drops = ebpf
        .take_map(DROPS_MAP)
        .ok_or(BpfError::Missing("DROPS map"))?;
    let drops = PerCpuArray::try_from(drops)
        .map_err(|e| BpfError::from_error("opening the drop counter", &e))?;
    tracing::debug!(
        ring_fd = ?events.as_fd(),
        ring_bytes = opts.ring_bytes,
        max_sockets = opts.max_sockets,
        "eBPF program attached"
    );
    Ok(Loaded {
        probe: Probe { _ebpf: ebpf },
        events,
        drops: Drops(drops),
        recursion,
        logger,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn memlock_is_charged_before_5_11() {
        assert!(super::charges_memlock("5.10.0-32-amd64"));
        assert!(super::charges_memlock("4.19.0"));
        assert!(!super::charges_memlock("5.11.0"));
        assert!(!super::charges_memlock("6.1.0-50-amd64"));
        assert!(!super::charges_memlock("6.12.117+deb13-amd64"));
    }
}
