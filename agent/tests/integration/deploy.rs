//! The deployment files: Prometheus rules, their unit tests, and the runbook they point at.

use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
    said
}

#[test]
fn the_alert_rules_are_valid() {
    let said = promtool(&["check", "rules", "tcpstate-alerts.yml"]);
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");
}

#[test]
fn the_alert_rule_unit_tests_pass() {
    let said = promtool(&["test", "rules", "tests/tcpstate-alerts.test.yml"]);
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn every_alert_has_its_fields_and_a_runbook_section() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/tcpstate-alerts.yml")).unwrap();
    let runbook = std::fs::read_to_string(deploy().join("prometheus/RUNBOOK.md")).unwrap();
    let anchors: Vec<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase().replace(' ', "-"))
        .collect();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(
        alerts,
        [
            "TcpstateCloseWaitLingering",
            "TcpstateCloseWaitPileUp",
            "TcpstateFinWait2Lingering",
            "TcpstateEphemeralPortsExhausting",
            "TcpstateEventsLost",
            "TcpstateAgentDown"
        ]
    );
    let urls: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(urls.len(), alerts.len(), "one runbook_url per alert");
    for (alert, url) in alerts.iter().zip(urls) {
        let anchor = url.trim_matches('"').rsplit('#').next().unwrap();
        assert_eq!(anchor, alert.to_lowercase(), "{alert}: runbook_url {url}");
        assert!(
            anchors.iter().any(|a| a == anchor),
            "RUNBOOK.md has no section for {alert}"
        );
    }
    for field in ["for: ", "severity: ", "summary: ", "description: "] {
        let n = rules
            .lines()
            .filter(|l| l.trim().starts_with(field))
            .count();
        assert_eq!(n, alerts.len(), "every alert needs `{field}`");
    }
}

fn render_kustomization() -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(deploy().join("kubernetes"))
        .output()
        .expect("kubectl (it ships with this machine image; it renders kustomizations offline)");
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_kustomization_renders_every_resource() {
    let text = render_kustomization();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "DaemonSet",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    // The DaemonSet keeps to the measured capabilities instead of running privileged.
    assert!(text.contains("privileged: false"));
    assert!(text.contains("readOnlyRootFilesystem: true"));
    assert!(text.contains("- operator: Exists"), "tolerates every taint");
    for cap in [
        "BPF",
        "PERFMON",
        "DAC_READ_SEARCH",
        "SYS_ADMIN",
        "SYS_PTRACE",
    ] {
        assert!(text.contains(&format!("- {cap}")), "{cap}");
    }
    assert!(text.contains("path: /healthz") && text.contains("path: /readyz"));
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let rendered = render_kustomization();
    let file = std::env::temp_dir().join(format!("tcpstate-rendered-{}.yaml", std::process::id()));
    std::fs::write(&file, &rendered).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["-k", "1.32.0", "--strict"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (PyPI; `cargo xtask setup` installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{said}");
    for resource in [
        "namespace/tcpstate",
        "serviceaccount/tcpstate",
        "service/tcpstate",
        "daemonset/tcpstate",
    ] {
        assert!(
            said.contains(&format!("passed for resource {resource}")),
            "{resource}: {said}"
        );
    }
    assert!(
        said.contains("passed for resource configmap/tcpstate-config-"),
        "{said}"
    );
    // The Prometheus Operator's kinds have no schema there: check what they must hold.
    let monitor = std::fs::read_to_string(deploy().join("kubernetes/servicemonitor.yaml")).unwrap();
    assert!(monitor.contains("apiVersion: monitoring.coreos.com/v1"));
    assert!(
        monitor.contains("- port: metrics"),
        "scrapes the Service's named port"
    );
}

#[test]
fn the_prometheus_rule_is_the_rule_file() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/tcpstate-alerts.yml")).unwrap();
    let crd = std::fs::read_to_string(deploy().join("kubernetes/prometheusrule.yaml")).unwrap();
    let groups: String = rules
        .lines()
        .skip_while(|l| !l.starts_with("groups:"))
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    let spec = crd.split_once("\nspec:\n").map(|(_, s)| s).expect("a spec");
    assert_eq!(
        spec, groups,
        "deploy/kubernetes/prometheusrule.yaml drifted from the rule file: run `cargo xtask gen-rules`"
    );
    assert!(crd.contains("kind: PrometheusRule"));
}

fn check_config(text: &str) -> (i32, String) {
    let file = std::env::temp_dir().join(format!(
        "tcpstate-cfg-{}-{}.toml",
        std::process::id(),
        text.len()
    ));
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["agent", "--check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_shipped_configs_pass_check_config() {
    for file in ["kubernetes/tcpstate.toml", "tcpstate.toml"] {
        let text = std::fs::read_to_string(deploy().join(file)).unwrap();
        let (code, said) = check_config(&text);
        assert_eq!(code, 0, "{file}: {said}");
        assert!(said.contains("configuration OK"), "{said}");
    }
    // The ConfigMap carries exactly that file.
    let rendered = render_kustomization();
    assert!(rendered.contains("tcpstate.toml: |"), "{rendered}");
    assert!(rendered.contains("per_netns = true"));
}

#[test]
fn each_kind_of_config_error_names_the_key_and_exits_2() {
    for (text, key, line) in [
        ("max_ports = 64\nsurprise = 1\n", "surprise", 2),
        ("max_ports = \"many\"\n", "max_ports", 1),
        ("linger_after = \"0s\"\n", "linger_after", 1),
        ("\n\nmax_ports = 70000\n", "max_ports", 3),
        ("ring_size = \"3MiB\"\n", "ring_size", 1),
        ("listen = 42\n", "listen", 1),
    ] {
        let (code, said) = check_config(text);
        assert_eq!(code, 2, "{text}: {said}");
        assert!(
            said.contains(&format!(":{line}: key `{key}`")),
            "{text}: {said}"
        );
        assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args([
            "agent",
            "--check-config",
            "--config",
            "/nonexistent/tcpstate.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tcpstate.toml does not exist")
    );
}

/// Metric names in a PromQL expression: identifiers of the agent's families.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let word = &tail[..end];
        if word.starts_with("tcpstate_") || word.starts_with("process_") {
            out.push(word.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_queries_only_metrics_the_agent_exports() {
    let _area = crate::support::require_root("deploy");
    let text = std::fs::read_to_string(deploy().join("grafana/tcpstate.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs: Vec<String> = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");

    // A real scrape, with a connection closed so the histograms have series, and one left in
    // CLOSE_WAIT past the threshold so the lingering families have theirs.
    let agent = crate::support::AgentProc::start(&[
        "--linger-after",
        "200ms",
        "--reconcile-interval",
        "1s",
    ]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    drop(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
    drop(listener.accept().unwrap());
    let _leak = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_leaked, _) = listener.accept().unwrap();
    drop(_leak);
    // A failed connect, and one connection held open in a namespace whose port range has 4
    // ports, so that failures and ephemeral port use have series.
    let refused = listener.local_addr().unwrap().port();
    let ns = crate::support::Netns::new("dash");
    let range = "net.ipv4.ip_local_port_range=40000 40003";
    crate::support::run(
        std::process::Command::new("ip").args(["netns", "exec", &ns.name, "sysctl", "-qw", range]),
    );
    let _held = ns.enter(|| {
        assert!(std::net::TcpStream::connect(("127.0.0.1", refused)).is_err());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = l.accept().unwrap();
        (l, c, s)
    });
    let scrape = crate::support::eventually(std::time::Duration::from_secs(20), || {
        let t = agent.metrics();
        if t.contains("tcpstate_connection_duration_seconds_bucket")
            && t.contains("tcpstate_lingering_connections{")
            && t.contains("tcpstate_ephemeral_ports_in_use{")
            && t.contains("tcpstate_connect_failures_total{")
            && t.contains("tcpstate_closes_total{")
        {
            Ok(t)
        } else {
            Err("no lifetime or lingering connection yet".into())
        }
    });
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut used = 0;
    for e in &exprs {
        for name in metric_names(e) {
            used += 1;
            assert!(
                exported.contains(name.as_str()),
                "the dashboard uses {name}, which the agent does not export ({e})"
            );
        }
    }
    assert!(used >= 12, "the dashboard names {used} metrics");
}

/// The image's exposed port is the agent's default and the DaemonSet's container port. (The
/// image itself is built, loaded, run and played from the DaemonSet in `cargo xtask test`'s
/// release checks: xtask/src/image.rs.)
#[test]
fn the_containerfile_exposes_the_port_of_the_agent_and_the_daemonset() {
    let containerfile =
        std::fs::read_to_string(deploy().join("container/Containerfile")).expect("Containerfile");
    let port = tcpstate::config::DEFAULT_LISTEN.rsplit(':').next().unwrap();
    assert!(
        containerfile.lines().any(|l| l == format!("EXPOSE {port}")),
        "the Containerfile does not EXPOSE {port}"
    );
    assert!(containerfile.lines().any(|l| l == "FROM scratch"));
    assert!(containerfile.contains("ENTRYPOINT [\"/usr/bin/tcpstate\"]"));
    let daemonset = std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).unwrap();
    assert!(
        daemonset.contains(&format!("containerPort: {port}")),
        "the DaemonSet's containerPort is not {port}"
    );
}
