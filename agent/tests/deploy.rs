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
    assert!(said.contains("SUCCESS: 5 rules found"), "{said}");
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
