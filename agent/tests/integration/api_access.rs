//! Who may use the local API: the socket's modes and group, the CLI's advice when the agent
//! is not there, and a socket path that is not a socket. Needs root; fails (never skips)
//! without it.
use std::process::Command;

use crate::api::{cli, socket_path};
use crate::support::*;

/// Users and groups a test made, removed on drop.
struct Cleanup(Vec<String>, bool);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("userdel").arg(u).status();
        }
        if self.1 {
            let _ = Command::new("groupdel").arg("tcpstate").status();
        }
    }
}

/// A group `tcpstate` (unless it exists), a member of it and a stranger, for this test.
fn users_for_the_socket(member: &str, stranger: &str) -> Cleanup {
    // A group `tcpstate`, a member and a stranger, created for this test.
    let created_group = Command::new("getent")
        .args(["group", "tcpstate"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true);
    if created_group {
        run(Command::new("groupadd").args(["--system", "tcpstate"]));
    }
    for (user, groups) in [(member, "tcpstate"), (stranger, "")] {
        let mut c = Command::new("useradd");
        c.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ]);
        if !groups.is_empty() {
            c.args(["--groups", groups]);
        }
        run(c.arg(user));
    }
    Cleanup(
        vec![member.to_string(), stranger.to_string()],
        created_group,
    )
}

#[test]
fn the_socket_admits_root_and_the_group_and_refuses_others() {
    let _area = require_root("api");
    let member = format!("tcpst-m{}", std::process::id() % 100_000);
    let stranger = format!("tcpst-s{}", std::process::id() % 100_000);
    let _cleanup = users_for_the_socket(&member, &stranger);

    let sock = socket_path("perm");
    let _agent = AgentProc::start(&["--socket", &sock]);
    let meta = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let dir = std::fs::metadata(std::path::Path::new(&sock).parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o750);
    // A directory the agent did not create keeps its mode (here /tmp, which must stay 1777).
    let tmp = std::fs::metadata(std::env::temp_dir()).unwrap();
    assert_eq!(
        tmp.permissions().mode() & 0o7777,
        0o1777,
        "the agent changed /tmp"
    );
    let gid = nix::unistd::Group::from_name("tcpstate")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    assert_eq!((meta.gid(), dir.gid()), (gid, gid));

    // A copy of the binary anyone can execute, whatever the permissions of the checkout.
    let bindir = std::env::temp_dir().join(format!("tcpstate-api-bin-{}", std::process::id()));
    std::fs::create_dir_all(&bindir).unwrap();
    std::fs::set_permissions(&bindir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bindir.join("tcpstate");
    std::fs::copy(env!("CARGO_BIN_EXE_tcpstate"), &bin).unwrap();
    let as_user = |user: &str| {
        let out = Command::new("setpriv")
            .args(["--reuid", user, "--regid", user, "--init-groups", "--"])
            .arg(&bin)
            .args(["status", "--socket", &sock])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = as_user(&member);
    assert_eq!(code, Some(0), "a member of tcpstate: {err}");
    assert!(out.contains("version:"), "{out}");
    let (code, _, err) = as_user(&stranger);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("tcpstate` group"),
        "{err}"
    );
    let (code, out, _) = cli(&["status", "--socket", &sock]);
    assert_eq!(code, 0);
    assert!(out.contains("version:"));
    let _ = std::fs::remove_dir_all(&bindir);
}

#[test]
fn the_cli_says_what_to_do_when_the_agent_is_not_there() {
    // No root needed for this one, but the suite runs as root anyway.
    let (code, _, err) = cli(&["ports", "--socket", "/nonexistent/tcpstate.sock"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no agent socket at /nonexistent/tcpstate.sock")
            && err.contains("tcpstate agent"),
        "{err}"
    );
    // A socket file nobody listens on.
    let dir = std::env::temp_dir().join(format!("tcpstate-api-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (code, _, err) = cli(&["status", "--socket", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let (code, out, _) = cli(&["conns", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Example:") && out.contains("--lingering"),
        "{out}"
    );
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let _area = require_root("api");
    let dir = std::env::temp_dir().join(format!("tcpstate-notsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("important.conf");
    std::fs::write(&file, "keep me\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = cli(&[
        "agent",
        "--listen",
        &listen,
        "--socket",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is not a socket") && err.contains("--socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
