//! Checks, before anything is loaded, that the agent holds what it needs, so that a missing
//! privilege is one clear line rather than an EPERM from deep inside a syscall.
use caps::{CapSet, Capability};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum PrivilegeError {
    #[error(
        "missing capability {0} (needed to {1}): run tcpstate as root, or grant CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH (systemd: AmbientCapabilities=, see deploy/systemd/tcpstate.service)"
    )]
    Missing(&'static str, &'static str),
    #[error("cannot read this process's capabilities: {0}")]
    Unreadable(String),
}

/// What the agent needs, measured on Linux 6.18 as a non-root user (`cargo xtask test` checks
/// it): CAP_BPF to load the program and create its maps, CAP_PERFMON to attach it to the
/// tracepoint, and, unless running as uid 0 (tracefs is root's, mode 0700), CAP_DAC_READ_SEARCH
/// to read the tracepoint's format and id from tracefs. CAP_SYS_ADMIN would stand in for the
/// first two, but the agent asks for the precise ones so that a unit granting too much is not
/// needed and a unit granting too little fails here, by name.
///
/// One exception, measured on Debian's 5.10, 6.1 and 6.12 kernels (`cargo xtask test-kernels`):
/// Debian and Ubuntu patch the kernel so that `kernel.perf_event_paranoid` = 3, their default,
/// refuses `perf_event_open` to anyone without CAP_SYS_ADMIN, CAP_PERFMON or not. There,
/// attaching needs CAP_SYS_ADMIN.
pub(crate) fn check() -> Result<(), PrivilegeError> {
    let has = |c| {
        caps::has_cap(None, CapSet::Effective, c)
            .map_err(|e| PrivilegeError::Unreadable(e.to_string()))
    };
    for (cap, name, why) in required(nix::unistd::geteuid().is_root(), perf_event_paranoid()) {
        if !has(cap)? {
            return Err(PrivilegeError::Missing(name, why));
        }
    }
    Ok(())
}

/// `kernel.perf_event_paranoid`; None where it cannot be read.
fn perf_event_paranoid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The capabilities required for uid 0 or not, and a `kernel.perf_event_paranoid` level.
fn required(is_root: bool, paranoid: Option<i32>) -> Vec<(Capability, &'static str, &'static str)> {
    let mut required = vec![
        (Capability::CAP_BPF, "CAP_BPF", "load the eBPF program"),
        (
            Capability::CAP_PERFMON,
            "CAP_PERFMON",
            "attach it to the tracepoint",
        ),
    ];
    if !is_root {
        required.push((
            Capability::CAP_DAC_READ_SEARCH,
            "CAP_DAC_READ_SEARCH",
            "read the tracepoint's format in tracefs",
        ));
    }
    if paranoid.is_some_and(|p| p > 2) {
        required.push((
            Capability::CAP_SYS_ADMIN,
            "CAP_SYS_ADMIN",
            "attach to the tracepoint while kernel.perf_event_paranoid is above 2, as Debian and Ubuntu kernels set it; or lower it: `sysctl kernel.perf_event_paranoid=2`",
        ));
    }
    required
}

/// Capabilities without which the agent works, but sees less: returned as (name, what is lost).
pub(crate) fn missing_optional() -> Vec<(&'static str, &'static str)> {
    [
        (
            Capability::CAP_SYS_ADMIN,
            "CAP_SYS_ADMIN",
            "sock_diag dumps of other network namespaces (containers) are skipped",
        ),
        (
            Capability::CAP_SYS_PTRACE,
            "CAP_SYS_PTRACE",
            "owners of other users' sockets cannot be found (/proc/PID/fd)",
        ),
    ]
    .into_iter()
    .filter(|(cap, _, _)| !caps::has_cap(None, CapSet::Effective, *cap).unwrap_or(false))
    .map(|(_, name, lost)| (name, lost))
    .collect()
}

/// Raises RLIMIT_MEMLOCK for kernels before 5.11, which charge BPF maps against it. Failing is
/// normal (no CAP_SYS_RESOURCE) and harmless on newer kernels, which charge the memory cgroup.
pub(crate) fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (not needed on Linux >= 5.11)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(is_root: bool, paranoid: Option<i32>) -> Vec<&'static str> {
        required(is_root, paranoid)
            .into_iter()
            .map(|(_, n, _)| n)
            .collect()
    }

    #[test]
    fn sys_admin_is_required_only_above_paranoid_2() {
        assert_eq!(names(true, Some(2)), ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(names(true, None), ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(
            names(false, Some(-1)),
            ["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"]
        );
        assert_eq!(
            names(false, Some(3)),
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_DAC_READ_SEARCH",
                "CAP_SYS_ADMIN"
            ]
        );
        assert_eq!(
            names(true, Some(4)),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"]
        );
    }
}
