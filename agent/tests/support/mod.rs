//! Shared helpers of the kernel tests: root check, network namespaces, the real agent binary,
//! `ss`, metrics parsing, polling.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Fails (never skips) when not root: these tests load eBPF programs and create namespaces.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for network namespaces): run `cargo xtask test` as root"
        );
    }
}

/// A network namespace of the test's own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("tcpst-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns { name }
    }

    /// Runs `f` on a thread inside the namespace. Sockets created there stay in it.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// `ss -tan` in the namespace.
    pub fn ss(&self) -> Vec<SsRow> {
        let out = run(Command::new("ip").args(["netns", "exec", &self.name, "ss", "-tanH"]));
        out.lines().filter_map(SsRow::parse).collect()
    }

    /// Per (role, state) counts from `ss` for a service port: local port = server, peer = client.
    pub fn ss_counts(&self, port: u16) -> BTreeMap<(String, String), u64> {
        let mut m = BTreeMap::new();
        for row in self.ss() {
            let role = if row.local_port == port {
                "server"
            } else if row.peer_port == port {
                "client"
            } else {
                continue;
            };
            *m.entry((role.to_string(), row.state.clone())).or_default() += 1;
        }
        m
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[derive(Debug, Clone)]
pub struct SsRow {
    /// As a metric label: `close_wait`.
    pub state: String,
    pub local_port: u16,
    pub peer_port: u16,
}

impl SsRow {
    fn parse(line: &str) -> Option<SsRow> {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 {
            return None;
        }
        let state = match cols[0] {
            "ESTAB" => "established",
            "SYN-SENT" => "syn_sent",
            "SYN-RECV" => "syn_recv",
            "FIN-WAIT-1" => "fin_wait1",
            "FIN-WAIT-2" => "fin_wait2",
            "TIME-WAIT" => "time_wait",
            "CLOSE" | "UNCONN" => "close",
            "CLOSE-WAIT" => "close_wait",
            "LAST-ACK" => "last_ack",
            "LISTEN" => "listen",
            "CLOSING" => "closing",
            other => panic!("ss printed an unknown state {other}"),
        };
        let port = |s: &str| s.rsplit(':').next().and_then(|p| p.parse().ok());
        Some(SsRow {
            state: state.to_string(),
            local_port: port(cols[3])?,
            peer_port: port(cols[4]).unwrap_or(0),
        })
    }
}

/// Runs a command and returns its stdout; panics with its stderr if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A free port on 127.0.0.1 of the root namespace, for the agent's HTTP server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `tcpstate agent` (JSON logs kept in a file), killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub addr: String,
    log_path: std::path::PathBuf,
}

impl AgentProc {
    pub fn start(extra: &[&str]) -> AgentProc {
        let addr = format!("127.0.0.1:{}", free_port());
        let log_path = std::env::temp_dir().join(format!(
            "tcpstate-agent-{}-{}.log",
            std::process::id(),
            addr.rsplit(':').next().unwrap()
        ));
        let log = File::create(&log_path).expect("agent log file");
        // Each agent its own API socket, unless the test names one.
        let socket = log_path
            .with_extension("d")
            .join("api.sock")
            .display()
            .to_string();
        let own_socket: Vec<&str> = if extra.contains(&"--socket") {
            vec![]
        } else {
            vec!["--socket", &socket]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
            .args([
                "agent",
                "--listen",
                &addr,
                "--log-level",
                "info",
                "--log-format",
                "json",
            ])
            .args(&own_socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tcpstate agent");
        let mut agent = AgentProc {
            child,
            addr,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!(
                    "the agent exited during start ({status}): {}",
                    agent.log_text()
                );
            }
            if agent.try_metrics().is_ok() {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not serve /metrics within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent's JSON log records so far.
    pub fn log_records(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn try_metrics(&self) -> Result<String, String> {
        let mut resp = ureq::get(&format!("http://{}/metrics", self.addr))
            .call()
            .map_err(|e| e.to_string())?;
        resp.body_mut().read_to_string().map_err(|e| e.to_string())
    }

    pub fn metrics(&self) -> String {
        self.try_metrics().expect("scrape /metrics")
    }

    /// What the agent counted of lost events and repairs, for failure messages: a transition
    /// the kernel skipped the program for (another BPF program running on that CPU when an
    /// interrupt arrived) shows as a recursion miss, and the next reconciliation repairs it.
    pub fn loss_context(&self) -> String {
        let text = self.try_metrics().unwrap_or_default();
        text.lines()
            .filter(|l| {
                [
                    "tcpstate_events_total",
                    "tcpstate_events_lost_total",
                    "tcpstate_program_recursion_misses_total",
                    "tcpstate_reconcile_corrections_total",
                ]
                .iter()
                .any(|m| l.starts_with(m))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Sends `signal`, waits for the exit, returns the status and everything it logged.
    pub fn stop_with(mut self, signal: nix::sys::signal::Signal) -> (ExitStatus, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within 10 s of {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
        let _ = std::fs::remove_dir_all(self.log_path.with_extension("d"));
    }
}

/// Parses `name{labels} value` lines into (labels, value).
pub fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((l, v)) = rest.split_once("} ") else {
                continue;
            };
            (l, v)
        } else if let Some(v) = rest.strip_prefix(' ') {
            ("", v)
        } else {
            continue;
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label pair");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.push((map, value.trim().parse().expect("sample value")));
    }
    out
}

/// The value of the one sample of `name` whose labels include `want`.
pub fn value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
}

/// Non-zero `tcpstate_connections` per (role, state) for a port.
pub fn agent_counts(text: &str, port: u16) -> BTreeMap<(String, String), u64> {
    let port = port.to_string();
    samples(text, "tcpstate_connections")
        .into_iter()
        .filter(|(l, v)| l["port"] == port && *v > 0.0)
        .map(|(l, v)| ((l["role"].clone(), l["state"].clone()), v as u64))
        .collect()
}

/// A connected pair on `listener`: (client, server).
pub fn connect_pair(
    listener: &std::net::TcpListener,
) -> (std::net::TcpStream, std::net::TcpStream) {
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// A server on 127.0.0.1:`port` that leaks: its clients close, it never does. Returns the
/// listener and the server sockets, in CLOSE_WAIT once the clients' FINs arrive.
pub fn leak_close_wait(port: u16, n: usize) -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let servers = (0..n)
        .map(|_| {
            let (client, server) = connect_pair(&listener);
            drop(client);
            server
        })
        .collect();
    (listener, servers)
}

/// Polls `f` until it returns Ok or `timeout` passes; then panics with the last error.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("not within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
