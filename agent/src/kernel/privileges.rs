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
pub(crate) fn check() -> Result<(), PrivilegeError> {
    let has = |c| {
        caps::has_cap(None, CapSet::Effective, c)
            .map_err(|e| PrivilegeError::Unreadable(e.to_string()))
    };
    let mut required = vec![
        (Capability::CAP_BPF, "CAP_BPF", "load the eBPF program"),
        (
            Capability::CAP_PERFMON,
            "CAP_PERFMON",
            "attach it to the tracepoint",
        ),
    ];
    if !nix::unistd::geteuid().is_root() {
        required.push((
            Capability::CAP_DAC_READ_SEARCH,
            "CAP_DAC_READ_SEARCH",
            "read the tracepoint's format in tracefs",
        ));
    }
    for (cap, name, why) in required {
        if !has(cap)? {
            return Err(PrivilegeError::Missing(name, why));
        }
    }
    Ok(())
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
