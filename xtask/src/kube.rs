//! The DaemonSet's pod template under `podman kube play`: podman 4.3 plays Pods and Deployments,
//! not DaemonSets, so the template that `kubectl kustomize deploy/kubernetes` renders is wrapped
//! as a Pod, unchanged but for what a DaemonSet-less host needs:
//!
//! - the Pod's `metadata.name` (a template has none);
//! - the API socket's hostPath `/run/tcpstate` points at a scratch directory, so that the check
//!   never touches the socket of an agent already running on the machine.
//!
//! What podman 4.3 ignores of the template (it runs it anyway): `serviceAccountName`,
//! `automountServiceAccountToken`, `priorityClassName`, `tolerations` (scheduling and API access
//! have no meaning on one host), and the readiness probe (4.3 turns only the liveness probe into a
//! health check). The check therefore asks `/readyz` itself, inside the pod's network namespace.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::image::{Image, daemonset_capabilities, http_get, podman, wait_for};
use crate::{Result, output};

/// The Pod's name, and the name podman gives its one container.
const POD: &str = "tcpstate-release-check";
const CONTAINER: &str = "tcpstate-release-check-tcpstate";

/// `kubectl kustomize deploy/kubernetes`.
pub fn render(root: &Path) -> Result<String> {
    output(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(root.join("deploy/kubernetes")),
    )
}

/// The rendered document of `kind`.
fn document<'a>(rendered: &'a str, kind: &str) -> Result<&'a str> {
    rendered
        .split("\n---\n")
        .find(|d| d.lines().any(|l| l == format!("kind: {kind}")))
        .ok_or_else(|| format!("the rendered manifests have no {kind}"))
}

/// The DaemonSet's `spec.template` as a Pod named [`POD`], its `/run/tcpstate` hostPath moved to
/// `run_dir`.
pub fn pod_of(daemonset: &str, run_dir: &Path) -> Result<String> {
    let lines: Vec<&str> = daemonset.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "  template:")
        .ok_or("the DaemonSet has no spec.template")?;
    let mut pod = String::from("apiVersion: v1\nkind: Pod\n");
    for line in lines[at + 1..]
        .iter()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
    {
        let line = &line[line.len().min(4)..];
        pod.push_str(line);
        pod.push('\n');
        if line == "metadata:" {
            pod.push_str(&format!("  name: {POD}\n"));
        }
    }
    let socket_dir = "path: /run/tcpstate\n";
    if !pod.contains(socket_dir) {
        return Err("the pod template has no hostPath /run/tcpstate".into());
    }
    Ok(pod.replace(socket_dir, &format!("path: {}\n", run_dir.display())))
}

/// The pod, removed on drop.
struct Played<'a> {
    conf: &'a Path,
}

impl Drop for Played<'_> {
    fn drop(&mut self) {
        let _ = podman(self.conf)
            .args(["pod", "rm", "--force", POD])
            .output();
    }
}

/// Plays the wrapped pod template with the generated ConfigMap, and checks that the container
/// runs with the template's capabilities and read-only root and that `/readyz` turns 200.
pub fn plays_the_daemonset(image: &Image, root: &Path) -> Result {
    let rendered = render(root)?;
    let scratch = std::env::temp_dir().join(format!("tcpstate-kube-{}", std::process::id()));
    let run_dir = scratch.join("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let pod_file = scratch.join("pod.yaml");
    let map_file = scratch.join("configmap.yaml");
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(
        &pod_file,
        &pod_of(document(&rendered, "DaemonSet")?, &run_dir)?,
    )?;
    write(&map_file, document(&rendered, "ConfigMap")?)?;
    let _ = podman(&image.conf)
        .args(["pod", "rm", "--force", POD])
        .output();
    let played = Played { conf: &image.conf };
    let result = output(
        podman(&image.conf)
            .args(["kube", "play", "--configmap"])
            .arg(&map_file)
            .arg(&pod_file),
    )
    .and_then(|_| ready_in_the_pod(image, &rendered));
    let logs = podman(&image.conf).args(["logs", CONTAINER]).output();
    drop(played);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map_err(|e| {
        let logs = logs
            .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            .unwrap_or_default();
        format!("the DaemonSet's pod template under `podman kube play`: {e}\n{logs}")
    })
}

fn ready_in_the_pod(image: &Image, rendered: &str) -> Result {
    let inspect =
        |format: &str| output(podman(&image.conf).args(["inspect", "--format", format, CONTAINER]));
    let mut want: Vec<String> = daemonset_capabilities(rendered)?
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    want.sort();
    let got = inspect("{{range .EffectiveCaps}}{{.}} {{end}}")?;
    let mut got: Vec<String> = got.split_whitespace().map(str::to_string).collect();
    got.sort();
    if got != want {
        return Err(format!(
            "the container's capabilities are {got:?}, the template's {want:?}"
        ));
    }
    if inspect("{{.HostConfig.ReadonlyRootfs}}")? != "true" {
        return Err("the container's root file system is writable".into());
    }
    let pid = inspect("{{.State.Pid}}")?;
    let netns = ["nsenter", "--target", pid.as_str(), "--net"];
    wait_for(Duration::from_secs(30), || {
        Ok(http_get(&netns, "http://127.0.0.1:10610/readyz")?.0 == 200)
    })
}
