//! A real Prometheus for the alert tests: the project's rule file, scraping one agent.
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

/// A Prometheus server of the test's own, on a loopback port, scraping the agent every second
/// and evaluating the project's rule file with every `for:` cut to one second.
pub struct Prometheus {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    pub fn start(target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("tcpstate-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules_src = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/prometheus/tcpstate-alerts.yml"
        ))
        .unwrap();
        let rules: String = rules_src
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("for: ") {
                    let indent = &l[..l.len() - l.trim_start().len()];
                    format!("{indent}for: 1s\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(rules.contains("for: 1s") && !rules.contains("for: 5m"));
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: tcpstate\n    static_configs:\n      - targets: ['{target}']\n",
                dir.join("rules.yml").display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; `cargo xtask setup` installs it)");
        let p = Prometheus { child, addr, dir };
        eventually(Duration::from_secs(30), || {
            ureq::get(&format!("http://{}/-/ready", p.addr))
                .call()
                .map(|_| ())
                .map_err(|e| format!("prometheus not ready: {e}"))
        });
        p
    }

    /// Alerts named `name` with label port=`port`, with their state.
    pub fn alerts(&self, name: &str, port: u16) -> Vec<String> {
        self.alert_labels(name, port, "state")
    }

    /// The `field` of the alerts named `name` with label port=`port`: `state`, or a label.
    pub fn alert_labels(&self, name: &str, port: u16, field: &str) -> Vec<String> {
        let mut resp = match ureq::get(&format!("http://{}/api/v1/alerts", self.addr)).call() {
            Ok(r) => r,
            Err(_) => return vec![],
        };
        let body: serde_json::Value =
            serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        body["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| {
                a["labels"]["alertname"] == name
                    && a["labels"]["port"].as_str() == Some(port.to_string().as_str())
            })
            .map(|a| {
                let v = if field == "state" {
                    &a["state"]
                } else {
                    &a["labels"][field]
                };
                v.as_str().unwrap_or("").to_string()
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
