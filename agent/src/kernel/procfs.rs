//! What the agent reads from /proc: the sysctls it follows (`tcp_fin_timeout`,
//! `ip_local_port_range`), the kernel release, and who holds a socket: socket inode (from sock_diag) -> `/proc/PID/fd` links -> pid, command,
//! cgroup and container id. A scan reads every process's fd table, so it runs off the event path
//! (a blocking thread), for the inodes asked about only, and results are cached per inode.
use std::path::Path;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub(crate) comm: String,
    /// The process's cgroup v2 path (or the first v1 line), as in `/proc/PID/cgroup`.
    pub(crate) cgroup: String,
    /// A container id parsed from the cgroup path (docker, containerd, CRI-O, podman).
    pub(crate) container: Option<String>,
}

/// Finds the processes holding each of `inodes`.
pub fn scan(proc: &Path, inodes: &FxHashSet<u32>) -> FxHashMap<u32, Vec<Owner>> {
    let mut out: FxHashMap<u32, Vec<Owner>> = FxHashMap::default();
    if inodes.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir(proc) else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue; // gone, or not ours to read
        };
        let mut held: Vec<u32> = Vec::new();
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(&target.to_string_lossy())
                && inodes.contains(&inode)
                && !held.contains(&inode)
            {
                held.push(inode);
            }
        }
        if held.is_empty() {
            continue;
        }
        let owner = describe(proc, pid);
        for inode in held {
            out.entry(inode).or_default().push(owner.clone());
        }
    }
    out
}

/// `socket:[12345]` -> 12345.
pub fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The process `pid` as an owner: its command, cgroup and container (empty when it is gone).
pub(crate) fn describe(proc: &Path, pid: u32) -> Owner {
    let dir = proc.join(pid.to_string());
    let comm = std::fs::read_to_string(dir.join("comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cgroup_file = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
    let cgroup = cgroup_path(&cgroup_file).to_string();
    Owner {
        pid,
        comm,
        container: container_id(&cgroup),
        cgroup,
    }
}

/// The unified (`0::`) path of `/proc/PID/cgroup`, else the first line's path.
pub(crate) fn cgroup_path(file: &str) -> &str {
    file.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| file.lines().next().and_then(|l| l.splitn(3, ':').nth(2)))
        .unwrap_or("")
        .trim()
}

/// The container id in a cgroup path: the last 64-hex-digit component, with the runtime's
/// prefix and `.scope` suffix stripped (`docker-ID.scope`, `cri-containerd-ID.scope`,
/// `crio-ID.scope`, `libpod-ID.scope`, `/docker/ID`, `/kubepods/.../ID`).
pub(crate) fn container_id(cgroup: &str) -> Option<String> {
    cgroup.rsplit('/').find_map(|part| {
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let id = part.rsplit(['-', ':']).next().unwrap_or(part);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

/// `net.ipv4.tcp_fin_timeout` of the calling thread's namespace, in seconds (default 60).
pub(crate) fn fin_timeout() -> Duration {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// `net.ipv4.ip_local_port_range`, falling back to the kernel default.
pub(crate) fn ephemeral_range() -> std::ops::RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some(it.next()??..=it.next()??)
        })
        .unwrap_or(crate::model::table::DEFAULT_EPHEMERAL)
}

/// The running kernel's release (`uname -r`).
pub(crate) fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_range_is_sane() {
        let r = ephemeral_range();
        assert!(r.start() <= r.end());
    }

    const ID: &str = "3f9c2d4e5b6a7980c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192";

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn container_ids_of_the_usual_runtimes() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods/besteffort/pod1234/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/docker/{ID}"),
            format!("/kubepods.slice/crio-{ID}.scope"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-3.scope"),
            None
        );
        assert_eq!(container_id(""), None);
    }

    #[test]
    fn cgroup_v2_and_v1_files() {
        assert_eq!(
            cgroup_path("0::/system.slice/sshd.service\n"),
            "/system.slice/sshd.service"
        );
        assert_eq!(
            cgroup_path("12:pids:/docker/abc\n11:memory:/docker/abc\n"),
            "/docker/abc"
        );
    }

    #[test]
    fn finds_this_process_as_the_owner_of_its_socket() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = socket_inode(&link.to_string_lossy()).unwrap();
        let found = scan(Path::new("/proc"), &[inode].into_iter().collect());
        let owners = &found[&inode];
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].pid, std::process::id());
        assert!(!owners[0].comm.is_empty());
    }
}
