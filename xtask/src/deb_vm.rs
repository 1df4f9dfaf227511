//! `xtask deb-check-inside DEB`: the .deb's install check, run by `test-kernels` inside a kernel
//! VM, whose overlay root is thrown away afterwards (installing there touches nothing of the
//! machine's). Refuses to run anywhere else.
//!
//! It installs the package, has systemd verify the installed unit, finds the user and group the
//! postinst made, runs the installed agent as that user with exactly the unit's capabilities
//! (setpriv, as systemd would), sees a CLOSE_WAIT leak counted on its port, removes the package
//! (the edited conffile and the user stay), purges it, and finds nothing left.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::image::{http_get, leak_is_counted, wait_for};
use crate::{Result, output, sh};

const UNIT: &str = "/usr/lib/systemd/system/tcpstate.service";
const CONFIG: &str = "/etc/tcpstate/tcpstate.toml";
const LISTEN: &str = "127.0.0.1:10694";

fn exists(kind: &str, name: &str) -> bool {
    Command::new("getent")
        .args([kind, name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn main(args: &[String]) -> Result {
    let [deb] = args else {
        return Err("usage: xtask deb-check-inside DEB".into());
    };
    // The VM's hostname, set by virtme-ng: never on the real machine.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if host.trim() != "virtme-ng" {
        return Err(
            "deb-check-inside installs packages: it runs only inside a virtme-ng VM".into(),
        );
    }
    // Start clean: the overlay shows the machine's /etc, which may have the user already.
    let _ = Command::new("userdel").arg("tcpstate").status();
    let _ = Command::new("groupdel").arg("tcpstate").status();
    sh(Command::new("dpkg").args(["-i", deb]))?;
    sh(Command::new("systemd-analyze").args(["verify", UNIT]))?;
    // Enabled at install (cargo-deb's deb-systemd-helper fragment), started where systemd runs.
    let wants = "/etc/systemd/system/multi-user.target.wants/tcpstate.service";
    if !Path::new(wants).exists() {
        return Err(format!("the postinst did not enable the unit: no {wants}"));
    }
    let user = output(Command::new("getent").args(["passwd", "tcpstate"]))?;
    let group = output(Command::new("getent").args(["group", "tcpstate"]))?;
    if !user.ends_with(":/nonexistent:/usr/sbin/nologin") || group.is_empty() {
        return Err(format!("the postinst made `{user}` and `{group}`"));
    }
    let system_uid = user.split(':').nth(2).and_then(|u| u.parse::<u32>().ok());
    if system_uid.is_none_or(|u| u >= 1000) {
        return Err(format!("tcpstate is not a system user: {user}"));
    }
    counts_a_leak_as_the_unit_runs_it()?;
    removes_then_purges(deb)
}

/// The unit's `AmbientCapabilities=`, as setpriv's `-all,+bpf,...`.
fn unit_capabilities() -> Result<String> {
    let unit = std::fs::read_to_string(UNIT).map_err(|e| format!("{UNIT}: {e}"))?;
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .ok_or("the installed unit has no AmbientCapabilities=")?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_default();
    if !exec.starts_with("/usr/bin/tcpstate agent") {
        return Err(format!(
            "the installed unit runs `{exec}`, not /usr/bin/tcpstate"
        ));
    }
    Ok(caps
        .split_whitespace()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .fold("-all".to_string(), |s, c| s + &c))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `/usr/bin/tcpstate agent --config /etc/tcpstate/tcpstate.toml` as tcpstate:tcpstate
/// with the unit's capabilities and `NoNewPrivileges`, its runtime directory made as systemd's
/// `RuntimeDirectory=` would, and waits for a CLOSE_WAIT leak to be counted on its port.
fn counts_a_leak_as_the_unit_runs_it() -> Result {
    let set = unit_capabilities()?;
    sh(Command::new("install").args([
        "-d",
        "-o",
        "tcpstate",
        "-g",
        "tcpstate",
        "-m",
        "0750",
        "/run/tcpstate",
    ]))?;
    let agent = Killed(
        Command::new("setpriv")
            .args([
                "--reuid=tcpstate",
                "--regid=tcpstate",
                "--init-groups",
                "--no-new-privs",
            ])
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg(format!("--bounding-set={set}"))
            .args([
                "--",
                "/usr/bin/tcpstate",
                "agent",
                "--config",
                CONFIG,
                "--listen",
                LISTEN,
            ])
            .spawn()
            .map_err(|e| format!("cannot run prlimit and setpriv: {e}"))?,
    );
    wait_for(Duration::from_secs(60), || {
        Ok(http_get(&[], &format!("http://{LISTEN}/readyz"))?.0 == 200)
    })
    .map_err(|e| format!("the installed agent, run as tcpstate: {e}"))?;
    let (port, _held) = leak_is_counted(LISTEN, Duration::from_secs(20))
        .map_err(|e| format!("the installed agent, run as tcpstate: {e}"))?;
    let socket = output(Command::new("stat").args(["-c", "%U:%G", "/run/tcpstate/tcpstate.sock"]))?;
    if socket != "tcpstate:tcpstate" {
        return Err(format!("the API socket belongs to {socket}"));
    }
    drop(agent);
    eprintln!("deb-check-inside: the agent ran as tcpstate and counted the leak on port {port}");
    Ok(())
}

/// `dpkg -r` keeps the edited conffile and the user; `dpkg --purge` leaves nothing.
fn removes_then_purges(deb: &str) -> Result {
    let files = output(Command::new("dpkg-deb").args(["-c", deb]))?;
    std::fs::write(
        CONFIG,
        "# edited by the operator\nlisten = \"127.0.0.1:10694\"\n",
    )
    .map_err(|e| format!("{CONFIG}: {e}"))?;
    sh(Command::new("dpkg").args(["-r", "tcpstate"]))?;
    if !std::fs::read_to_string(CONFIG).is_ok_and(|c| c.contains("edited by the operator")) {
        return Err("`dpkg -r` did not keep the edited conffile".into());
    }
    if Path::new("/usr/bin/tcpstate").exists() || !exists("passwd", "tcpstate") {
        return Err("`dpkg -r` left the binary or removed the user".into());
    }
    sh(Command::new("dpkg").args(["--purge", "tcpstate"]))?;
    let mut left: Vec<String> = files
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_string())
        .filter(|p| p.contains("tcpstate") && Path::new(p).exists())
        .collect();
    for path in [
        "/etc/tcpstate",
        "/etc/systemd/system/multi-user.target.wants/tcpstate.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/tcpstate.service.dsh-also",
    ] {
        if Path::new(path).exists() {
            left.push(path.to_string());
        }
    }
    for (kind, name) in [("passwd", "tcpstate"), ("group", "tcpstate")] {
        if exists(kind, name) {
            left.push(format!("the {kind} entry {name}"));
        }
    }
    if Command::new("dpkg")
        .args(["-s", "tcpstate"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        left.push("dpkg's record of tcpstate".into());
    }
    if !left.is_empty() {
        return Err(format!("`dpkg --purge` left {left:?}"));
    }
    eprintln!("deb-check-inside: installed, verified, ran, removed and purged cleanly");
    Ok(())
}
