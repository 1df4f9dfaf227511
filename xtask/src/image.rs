//! The OCI image: built with podman from deploy/container/Containerfile (`FROM scratch` and the
//! static binary), saved as an archive `podman load` and `docker load` take, and checked the
//! way a cluster runs it: with the DaemonSet's security context under `podman run`, and as the
//! DaemonSet's own pod template under `podman kube play`.
//!
//! Two quirks of this machine kind, applied to every podman call: `--runtime runc` (crun fails
//! on hybrid cgroups) and `CONTAINERS_CONF` pointing at a file without default ulimits (the
//! sandbox cannot raise nofile/nproc).
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Result, harness, output, sh};

/// What `build` made.
pub struct Image {
    /// `localhost/tcpstate:VERSION`.
    pub reference: String,
    /// `target/dist/tcpstate-VERSION-image.tar` (docker-archive: read by `podman load` and
    /// `docker load`).
    pub archive: PathBuf,
    pub version: String,
    /// Where the containers.conf of this machine kind's quirks is.
    pub conf: PathBuf,
}

/// The files the Containerfile copies, from the repository root (the binary comes from dist).
const CONTEXT: &[&str] = &[
    "deploy/tcpstate.toml",
    "README.md",
    "LICENSE-MIT",
    "LICENSE-APACHE",
];

/// podman with this machine kind's settings.
pub fn podman(conf: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf).args(["--runtime", "runc"]);
    cmd
}

pub fn build(root: &Path, dist: &Path, binary: &Path, version: &str) -> Result<Image> {
    let context = dist.join("image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).map_err(|e| format!("{}: {e}", context.display()))?;
    let copy = |from: &Path, name: &str| {
        std::fs::copy(from, context.join(name))
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", from.display()))
    };
    copy(binary, "tcpstate")?;
    for file in CONTEXT {
        copy(&root.join(file), file.rsplit('/').next().unwrap_or(file))?;
    }
    let conf = dist.join("containers.conf");
    std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n")
        .map_err(|e| format!("{}: {e}", conf.display()))?;
    let reference = format!("localhost/tcpstate:{version}");
    let revision = output(
        Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "HEAD"]),
    )
    .unwrap_or_else(|_| "unknown".into());
    let created = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?;
    let id = |conf: &Path| {
        output(podman(conf).args(["image", "inspect", "--format", "{{.Id}}", &reference])).ok()
    };
    let previous = id(&conf);
    sh(podman(&conf)
        .args([
            "build",
            "--quiet",
            "--format",
            "oci",
            "--layers=false",
            "-f",
        ])
        .arg(root.join("deploy/container/Containerfile"))
        .args(["--build-arg", &format!("VERSION={version}")])
        .args(["--build-arg", &format!("REVISION={revision}")])
        .args(["--build-arg", &format!("CREATED={created}")])
        .args(["-t", &reference])
        .arg(&context))?;
    // The previous build of this tag would stay behind untagged: remove it.
    if let Some(old) = previous.filter(|old| Some(old) != id(&conf).as_ref()) {
        let _ = podman(&conf).args(["rmi", &old]).output();
    }
    let archive = dist.join(format!("tcpstate-{version}-image.tar"));
    let _ = std::fs::remove_file(&archive);
    sh(podman(&conf)
        .args(["save", "--quiet", "--format", "docker-archive", "-o"])
        .arg(&archive)
        .arg(&reference))?;
    Ok(Image {
        reference,
        archive,
        version: version.to_string(),
        conf,
    })
}

/// The image's release checks; returns how many passed.
pub fn check(image: &Image, root: &Path) -> Result<u64> {
    loads_with_its_labels(image)?;
    runs_with_the_daemonset_context(image, root)?;
    crate::kube::plays_the_daemonset(image, root)?;
    Ok(3)
}

/// The archive loads into an empty store, and the loaded image has the OCI labels, the
/// entrypoint, the default command and the port; its manifest.json has what `docker load`
/// reads.
fn loads_with_its_labels(image: &Image) -> Result {
    let _ = podman(&image.conf)
        .args(["rmi", "--force", &image.reference])
        .output();
    sh(podman(&image.conf)
        .args(["load", "--quiet", "-i"])
        .arg(&image.archive))?;
    let inspect = |format: &str| {
        output(podman(&image.conf).args(["image", "inspect", "--format", format, &image.reference]))
    };
    let want = [
        (
            "{{index .Labels \"org.opencontainers.image.version\"}}",
            image.version.clone(),
        ),
        (
            "{{index .Labels \"org.opencontainers.image.licenses\"}}",
            "MIT OR Apache-2.0".to_string(),
        ),
        (
            "{{json .Config.Entrypoint}}",
            "[\"/usr/bin/tcpstate\"]".into(),
        ),
        ("{{json .Config.Cmd}}", "[\"agent\"]".into()),
        ("{{json .Config.ExposedPorts}}", "{\"10610/tcp\":{}}".into()),
    ];
    for (format, expected) in want {
        let got = inspect(format)?;
        if got != expected {
            return Err(format!(
                "the loaded image's {format} is `{got}`, not `{expected}`"
            ));
        }
    }
    // `docker load` reads manifest.json: the config, the tag and the layers, all in the tar.
    let listing = output(Command::new("tar").arg("-tf").arg(&image.archive))?;
    let manifest = output(
        Command::new("tar")
            .arg("-xOf")
            .arg(&image.archive)
            .arg("manifest.json"),
    )?;
    for key in ["\"Config\"", "\"RepoTags\"", "\"Layers\""] {
        if !manifest.contains(key) {
            return Err(format!(
                "the archive's manifest.json has no {key}: {manifest}"
            ));
        }
    }
    let named: Vec<&str> = manifest
        .split('"')
        .filter(|s| s.ends_with(".tar") || s.ends_with(".json"))
        .collect();
    if named.is_empty() || named.iter().any(|n| !listing.lines().any(|l| l == *n)) {
        return Err(format!(
            "manifest.json names files the archive lacks: {manifest}\n{listing}"
        ));
    }
    Ok(())
}

/// The capabilities the rendered DaemonSet adds (it drops all others), so that the check
/// cannot drift from the manifest. Reads `add: [A, B]` and the block form kustomize writes.
pub fn daemonset_capabilities(rendered: &str) -> Result<Vec<String>> {
    let lines: Vec<&str> = rendered.lines().map(str::trim).collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("add:"))
        .ok_or("the rendered DaemonSet adds no capabilities")?;
    let inline = lines[at].trim_start_matches("add:").trim();
    let caps: Vec<String> = if inline.is_empty() {
        lines[at + 1..]
            .iter()
            .map_while(|l| l.strip_prefix("- "))
            .map(|c| c.trim_matches('"').to_string())
            .collect()
    } else {
        inline
            .trim_matches(['[', ']'])
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    if caps.is_empty() {
        return Err(format!("cannot read the capabilities from `{}`", lines[at]));
    }
    Ok(caps)
}

/// A container removed on drop, whatever happened.
struct Container<'a> {
    name: String,
    conf: &'a Path,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = podman(self.conf)
            .args(["rm", "--force", &self.name])
            .output();
    }
}

/// `podman run` with the DaemonSet's security context: root's uid with every capability
/// dropped but the DaemonSet's, no privilege escalation, a read-only root, the host's PIDs,
/// tracefs read-only, the config mounted read-only at /etc/tcpstate, a directory for the API
/// socket. The network is the host's (the DaemonSet uses the pod's; the eBPF program sees the
/// whole host either way) so that the check can reach /metrics. Then a CLOSE_WAIT leak made on
/// the host must show in /metrics on its port.
fn runs_with_the_daemonset_context(image: &Image, root: &Path) -> Result {
    let rendered = crate::kube::render(root)?;
    let caps = daemonset_capabilities(&rendered)?.join(",");
    let scratch = std::env::temp_dir().join(format!("tcpstate-image-{}", std::process::id()));
    let run_dir = scratch.join("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let listen = "127.0.0.1:10693";
    let container = Container {
        name: format!("tcpstate-release-check-{}", std::process::id()),
        conf: &image.conf,
    };
    let _ = podman(&image.conf)
        .args(["rm", "--force", &container.name])
        .output();
    sh(podman(&image.conf)
        .args(["run", "--detach", "--name", &container.name])
        .args(["--user", "0:0", "--cap-drop", "ALL", "--cap-add", &caps])
        .args(["--security-opt", "no-new-privileges", "--read-only"])
        .args(["--pid", "host", "--network", "host"])
        .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
        .arg("-v")
        .arg(format!(
            "{}:/etc/tcpstate:ro",
            root.join("deploy/kubernetes").display()
        ))
        .arg("-v")
        .arg(format!("{}:/run/tcpstate", run_dir.display()))
        .arg(&image.reference)
        .args([
            "agent",
            "--config",
            "/etc/tcpstate/tcpstate.toml",
            "--listen",
            listen,
        ]))?;
    let result = ready_then_leak(image, &container.name, listen, &run_dir);
    drop(container);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// An HTTP GET with curl: the status and the body.
pub fn http_get(prefix: &[&str], url: &str) -> Result<(u16, String)> {
    let mut cmd = Command::new(prefix.first().copied().unwrap_or("curl"));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg("curl");
    }
    let out = cmd
        .args([
            "--silent",
            "--max-time",
            "5",
            "--write-out",
            "\n%{http_code}",
            url,
        ])
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// Waits for `/readyz` 200, makes a CLOSE_WAIT leak on a port of its own, and waits for
/// `tcpstate_connections{port,role="server",state="close_wait"}` to say 1. Also asks the agent
/// through the API socket it made in the mounted directory.
fn ready_then_leak(image: &Image, name: &str, listen: &str, run_dir: &Path) -> Result {
    let logs = || {
        podman(&image.conf)
            .args(["logs", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(30), || {
        Ok(http_get(&[], &format!("http://{listen}/readyz"))?.0 == 200)
    })
    .map_err(|e| format!("the image under the DaemonSet's context: {e}\n{}", logs()))?;
    let (port, _held) = leak_is_counted(listen, Duration::from_secs(15))?;
    let port_text = port.to_string();
    let socket = run_dir.join("tcpstate.sock");
    let conns = output(
        Command::new(crate::root().join("target/dist/tcpstate"))
            .args([
                "conns",
                "--state",
                "close_wait",
                "--port",
                &port_text,
                "--socket",
            ])
            .arg(&socket),
    )?;
    if !conns.contains(&format!(":{port}")) {
        return Err(format!(
            "`tcpstate conns` through the container's socket does not list port {port}:\n{conns}"
        ));
    }
    Ok(())
}

/// Makes a CLOSE_WAIT leak on a port of its own (the client closes, the server never does) and
/// waits up to `timeout` for the agent at `listen` to count it:
/// `tcpstate_connections{port,role="server",state="close_wait"} 1`. Returns the port and the
/// server's end, which holds the leak open while the caller keeps it.
pub fn leak_is_counted(listen: &str, timeout: Duration) -> Result<(u16, TcpStream)> {
    let server = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = server.local_addr().map_err(|e| e.to_string())?.port();
    let client = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let (held, _) = server.accept().map_err(|e| e.to_string())?;
    drop(client);
    let port_text = port.to_string();
    let want = [
        ("port", port_text.as_str()),
        ("role", "server"),
        ("state", "close_wait"),
    ];
    wait_for(timeout, || {
        let (_, text) = http_get(&[], &format!("http://{listen}/metrics"))?;
        Ok(harness::value(&text, "tcpstate_connections", &want) == Some(1.0))
    })
    .map_err(|e| format!("the CLOSE_WAIT leak on port {port} never showed in /metrics: {e}"))?;
    Ok((port, held))
}

/// Polls `ready` every 200 ms until it says true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not yet");
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!("not within {timeout:?} ({last})"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
