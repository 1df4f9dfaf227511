//! Checks, before anything is loaded, that the agent holds what it needs, so that a missing
//! privilege is one clear line rather than an EPERM from deep inside a syscall.
use caps::{CapSet, Capability};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrivilegeError {
    #[error(
        "missing capability {0}: run tcpstate as root, or grant CAP_BPF and CAP_PERFMON (systemd: AmbientCapabilities=CAP_BPF CAP_PERFMON)"
    )]
    Missing(&'static str),
    #[error("cannot read this process's capabilities: {0}")]
    Unreadable(String),
}

/// The capabilities loading and attaching a tracepoint program needs on Linux >= 5.8:
/// CAP_BPF (maps, program load) and CAP_PERFMON (tracing programs, attaching to tracepoints).
/// CAP_SYS_ADMIN stands in for both.
pub fn check() -> Result<(), PrivilegeError> {
    let has = |c| {
        caps::has_cap(None, CapSet::Effective, c)
            .map_err(|e| PrivilegeError::Unreadable(e.to_string()))
    };
    if has(Capability::CAP_SYS_ADMIN)? {
        return Ok(());
    }
    for (cap, name) in [
        (Capability::CAP_BPF, "CAP_BPF"),
        (Capability::CAP_PERFMON, "CAP_PERFMON"),
    ] {
        if !has(cap)? {
            return Err(PrivilegeError::Missing(name));
        }
    }
    Ok(())
}

/// Raises RLIMIT_MEMLOCK for kernels before 5.11, which charge BPF maps against it. Failing is
/// normal (no CAP_SYS_RESOURCE) and harmless on newer kernels, which charge the memory cgroup.
pub fn raise_memlock() {
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
