//! Shared helpers of the kernel tests: root check, network namespaces, the real agent binary,
//! `ss`, metrics parsing, polling.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Command, ExitStatus, Stdio};

pub(crate) use crate::harness::{self, samples, value};

mod prometheus;
pub use prometheus::Prometheus;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Fails (never skips) when not root: these tests load eBPF programs and create namespaces.
/// Returns the test's hold on its area (see [`Area`]): keep it for the whole test.
pub fn require_root(area: &'static str) -> Area {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for network namespaces): run `cargo xtask test` as root"
        );
    }
    Area::enter(area)
}

/// Which area's tests run now, and how many of them.
static AREA: (Mutex<(Option<&'static str>, usize)>, Condvar) =
    (Mutex::new((None, 0)), Condvar::new());

/// A test's hold on its area. Tests of one area run side by side, as they always did; tests of
/// different areas never overlap. Every agent sees the sockets of every namespace, so one
/// area's load (1,200 lingering sockets, say) would otherwise spill into another's assertions
/// (its log cap, its ports).
pub struct Area;

impl Area {
    fn enter(area: &'static str) -> Area {
        let (lock, turn) = &AREA;
        let mut now = lock.lock().unwrap_or_else(|e| e.into_inner());
        while now.0.is_some_and(|a| a != area) {
            now = turn.wait(now).unwrap_or_else(|e| e.into_inner());
        }
        now.0 = Some(area);
        now.1 += 1;
        Area
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        let (lock, turn) = &AREA;
        let mut now = lock.lock().unwrap_or_else(|e| e.into_inner());
        now.1 -= 1;
        if now.1 == 0 {
            now.0 = None;
            turn.notify_all();
        }
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
    agent: harness::Agent,
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
        let mut args = vec!["--log-level", "info", "--log-format", "json"];
        if !extra.contains(&"--socket") {
            args.extend(["--socket", &socket]);
        }
        args.extend(extra);
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tcpstate"));
        let started = harness::Agent::start(
            bin,
            &addr,
            &args,
            Stdio::from(log),
            harness::Ready::Serving,
            patience(Duration::from_secs(20)),
        );
        match started {
            Ok(agent) => AgentProc {
                agent,
                addr,
                log_path,
            },
            Err(e) => panic!(
                "{e}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    }

    /// Sends the agent a signal (`kill -NAME`).
    pub fn signal(&self, name: &str) -> Result<(), String> {
        self.agent.signal(name)
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

    /// Waits until `/readyz` says the first sock_diag dump seeded the table.
    pub fn wait_seeded(&mut self) {
        let waited = self
            .agent
            .wait(harness::Ready::Seeded, patience(Duration::from_secs(20)));
        waited.unwrap_or_else(|e| panic!("{e}: {}", self.log_text()));
    }

    pub fn try_metrics(&self) -> Result<String, String> {
        self.agent.metrics()
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
        let name = signal.as_str().trim_start_matches("SIG");
        self.agent.signal(name).unwrap();
        let status = self
            .agent
            .wait_exit(patience(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e} of {signal}"));
        (status, self.log_text())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log_path);
        let _ = std::fs::remove_dir_all(self.log_path.with_extension("d"));
    }
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

/// How much longer than on a real machine the waits may take: `TCPSTATE_TEST_PATIENCE` (a whole
/// factor, default 1). `cargo xtask test-kernels` sets it inside its VMs, where qemu's TCG runs
/// everything several times slower. Only deadlines stretch: a test that passes returns as soon as
/// its condition holds.
pub fn patience(d: Duration) -> Duration {
    let factor = std::env::var("TCPSTATE_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}

/// Polls `f` until it returns Ok or `timeout` (times [`patience`]) passes; then panics with the
/// last error.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let timeout = patience(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("not within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Sockets a scenario holds open, so their states stay put until the test drops them.
pub struct Held {
    _listener: std::net::TcpListener,
    _streams: Vec<std::net::TcpStream>,
}

/// On one port: 3 pairs ESTABLISHED; 2 where the client shut down its write side (client
/// FIN_WAIT2, server CLOSE_WAIT: a server that never closes after EOF); 2 the other way round
/// (server FIN_WAIT2, client CLOSE_WAIT). Nothing is orphaned, so nothing becomes a timewait
/// socket the tracepoint cannot see.
pub fn mixed_states(ip: &str, port: u16) -> Held {
    let listener = std::net::TcpListener::bind((ip, port)).unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let (c, s) = connect_pair(&listener);
        streams.extend([c, s]);
    }
    for _ in 0..2 {
        let (c, s) = connect_pair(&listener);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        streams.extend([c, s]);
    }
    for _ in 0..2 {
        let (c, s) = connect_pair(&listener);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        streams.extend([c, s]);
    }
    Held {
        _listener: listener,
        _streams: streams,
    }
}

/// Client closes first; the server reads EOF and closes.
pub fn close_client_first(ip: &str, port: u16) {
    let listener = std::net::TcpListener::bind((ip, port)).unwrap();
    let (client, mut server) = connect_pair(&listener);
    drop(client);
    let mut buf = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut server, &mut buf).unwrap(),
        0,
        "the server reads EOF"
    );
    drop(server);
    // Give the last ACK time to arrive before the listener goes.
    std::thread::sleep(Duration::from_millis(50));
}
