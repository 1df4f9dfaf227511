//! `cargo xtask bench`: loopback churn without and with the agent attached.
//!
//! One thread connects, accepts, and closes (client first, server after reading EOF), about ten
//! transitions per connection: client CLOSE->SYN_SENT->ESTABLISHED->FIN_WAIT1->FIN_WAIT2->CLOSE,
//! server LISTEN->SYN_RECV->ESTABLISHED->CLOSE_WAIT->LAST_ACK->CLOSE. It runs in a network
//! namespace of its own so its TIME_WAIT sockets and port range touch nothing else. Rounds
//! without and with the agent are interleaved; the report gives the median throughput ratio,
//! the agent's CPU seconds per million transitions, losses, and peak RSS.
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, harness, output, sh};

const NETNS: &str = "tcpstate-bench";
const CHURN_PORT: u16 = 7900;
pub(crate) const AGENT_LISTEN: &str = "127.0.0.1:10690";
pub(crate) const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

const HELP: &str =
    "usage: cargo xtask bench [--scenario churn|busy|all] [--connections N] [--rounds R]
                         [--breakdown [--variants LIST]] [-- AGENT_ARGS...]

  --scenario S     churn: throughput with and without the agent, agent CPU, losses;
                   busy: a busy host (400 ports, 100,000 connections, a burst of 30,000
                   server-first connections, a CLOSE_WAIT leak): series in /metrics, scrape
                   time and size, agent RSS; and the agent's CPU while those connections sit
                   idle, from a full dump to the next (5 minutes with the defaults);
                   all (default): both
  --connections N  connections per round (default 50000, ten transitions each)
  --rounds R       rounds of each kind, interleaved (default 15)
  --breakdown      also rebuild the eBPF program once per variant, each with one part left
                   out (everything, all but the record copy, the map, the clock, the ring
                   buffer) or done another way (per-CPU LRU lists, a preallocated hash, no
                   backlog query), and measure each, also side by side with the real one on
                   the same churns (kernel bpf_stats, paired): what
                   every part costs, and the program's run time against the empty program's
                   (the floor) in the same run. Rebuilds the real agent at the end.
  --variants LIST  with --breakdown, only these variants (comma-separated; `empty` is always
                   measured, as the floor)
  AGENT_ARGS       extra flags for `tcpstate agent`, e.g. -- --ring-size 1MiB

  TCPSTATE_BENCH_AGENT=PATH measures another build of the agent (e.g. an older one).
  TCPSTATE_BENCH_SMAPS=1 prints the agent's largest memory mappings at the end of the busy
  scenario (where its RSS is).
";

/// Rebuilds `target/release/tcpstate` with the program variant given, or as the environment
/// says (the real program, unless `TCPSTATE_BENCH_VARIANT` is set there).
pub type Rebuild<'a> = &'a dyn Fn(Option<&str>) -> Result;

pub fn main(root: &Path, args: &[String], rebuild: Rebuild) -> Result {
    let mut connections = 50_000u64;
    let mut rounds = 15usize;
    let mut breakdown = false;
    let mut only: Option<Vec<String>> = None;
    let mut scenario = "all".to_string();
    let mut agent_args: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connections" => connections = num(it.next(), "--connections")?,
            "--rounds" => rounds = num(it.next(), "--rounds")? as usize,
            "--breakdown" => breakdown = true,
            "--variants" => {
                let list = it.next().ok_or("--variants needs a list")?;
                for v in list.split(',') {
                    if !crate::breakdown::VARIANTS
                        .iter()
                        .any(|(name, _)| *name == v)
                    {
                        return Err(format!("bench: no variant `{v}`\n{HELP}"));
                    }
                }
                only = Some(list.split(',').map(String::from).collect::<Vec<_>>());
            }
            "--scenario" => match it.next().map(String::as_str) {
                Some(s @ ("churn" | "busy" | "all")) => scenario = s.to_string(),
                other => {
                    return Err(format!(
                        "bench: --scenario takes churn, busy or all, not {other:?}\n{HELP}"
                    ));
                }
            },
            "--" => agent_args.extend(it.by_ref().cloned()),
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            other => return Err(format!("bench: unknown argument `{other}`\n{HELP}")),
        }
    }
    if !crate::is_root() {
        return Err(
            "the benchmark loads the agent and creates a network namespace: run it as root".into(),
        );
    }
    let bench = Bench {
        xtask: std::env::current_exe().map_err(|e| e.to_string())?,
        agent_bin: std::env::var_os("TCPSTATE_BENCH_AGENT")
            .map_or_else(|| root.join("target/release/tcpstate"), Into::into),
        agent_args,
        connections,
    };
    if scenario != "busy" {
        let breakdown = breakdown.then(|| {
            crate::breakdown::VARIANTS
                .iter()
                .filter(|(name, _)| {
                    *name == "empty" || only.as_ref().is_none_or(|o| o.iter().any(|v| v == name))
                })
                .copied()
                .collect::<Vec<_>>()
        });
        churn_scenario(&bench, connections, rounds, breakdown, rebuild)?;
    }
    if scenario != "churn" {
        crate::busy::run(&bench.agent_bin, &bench.agent_args)?;
    }
    Ok(())
}

fn churn_scenario(
    bench: &Bench,
    connections: u64,
    rounds: usize,
    breakdown: Option<Vec<(&str, &str)>>,
    rebuild: Rebuild,
) -> Result {
    let _ = Command::new("ip")
        .args(["netns", "del", NETNS])
        .stderr(Stdio::null())
        .status();
    sh(Command::new("ip").args(["netns", "add", NETNS]))?;
    let _cleanup = NetnsGuard;
    sh(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
    // A wide port range, and almost no TIME_WAIT sockets: tens of thousands of them make
    // connect() slow and its speed swing with tcp_tw_reuse timing (a port is reusable only a
    // second after its last use), which biases whichever rounds start sooner after the last.
    // The transitions are the same (FIN_WAIT2 -> CLOSE still fires); only the invisible
    // timewait mini-socket is not kept.
    sh(Command::new("ip").args([
        "netns",
        "exec",
        NETNS,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_max_tw_buckets=256",
    ]))?;

    // Warm up caches, the namespace's port space and the page cache of the binaries.
    bench.churn(connections / 4)?;

    let m = bench.measure(rounds)?;
    report_churn(&m, connections, rounds);
    if let Some(variants) = breakdown {
        crate::breakdown::report(bench, &m, rounds, &variants, rebuild)?;
    }
    Ok(())
}

/// The churn figures of the real program.
fn report_churn(m: &Measurement, connections: u64, rounds: usize) {
    let expected = connections * rounds as u64 * 10;
    let transitions = m.events.max(1);
    println!("## churn benchmark: {connections} connections x {rounds} rounds per side");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| throughput without agent (median) | {:.0} conn/s |",
        median(&m.without)
    );
    println!(
        "| throughput with agent (median) | {:.0} conn/s |",
        median(&m.with)
    );
    println!(
        "| throughput ratio with/without (median of rounds) | {:.3} (rounds: {}) |",
        m.ratio(),
        m.spread()
    );
    println!(
        "| transitions seen / expected | {} / {expected} ({:.0} per second at the median) |",
        m.events,
        median(&m.with) * 10.0
    );
    println!(
        "| agent CPU per million transitions | {:.3} s |",
        m.cpu_s / transitions as f64 * 1e6
    );
    println!(
        "| eBPF program run time per transition (kernel bpf_stats) | {:.0} ns |",
        m.program_ns
    );
    println!(
        "| events lost in the kernel (ring full) | {} |",
        m.lost_kernel
    );
    println!("| events lost in the agent | {} |", m.lost_agent);
    println!(
        "| agent peak RSS | {:.1} MiB |",
        m.peak_rss_kib as f64 / 1024.0
    );
}

pub(crate) struct Bench {
    pub(crate) xtask: std::path::PathBuf,
    pub(crate) agent_bin: std::path::PathBuf,
    pub(crate) agent_args: Vec<String>,
    pub(crate) connections: u64,
}

/// What `rounds` interleaved rounds without and with the agent measured.
#[derive(Default)]
pub(crate) struct Measurement {
    without: Vec<f64>,
    with: Vec<f64>,
    cpu_s: f64,
    events: u64,
    lost_kernel: u64,
    lost_agent: u64,
    peak_rss_kib: u64,
    /// Mean run time of the program per transition, from an extra round with bpf_stats on.
    pub(crate) program_ns: f64,
}

impl Measurement {
    fn ratios(&self) -> Vec<f64> {
        self.with
            .iter()
            .zip(&self.without)
            .map(|(w, wo)| w / wo)
            .collect()
    }

    /// The median over rounds of with/without.
    pub(crate) fn ratio(&self) -> f64 {
        median(&self.ratios())
    }

    /// The lowest and highest round's ratio: on a shared VM rounds swing by several percent.
    pub(crate) fn spread(&self) -> String {
        let r = self.ratios();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.2}–{hi:.2}")
    }
}

impl Bench {
    /// Runs the churn worker for `n` connections in the namespace; returns the seconds taken.
    pub(crate) fn churn(&self, n: u64) -> Result<f64> {
        let out = output(
            Command::new("ip")
                .args(["netns", "exec", NETNS])
                .arg(&self.xtask)
                .args(["churn-worker", &n.to_string(), &CHURN_PORT.to_string()]),
        )?;
        out.trim()
            .parse::<f64>()
            .map_err(|_| format!("churn worker said `{out}`"))
    }

    pub(crate) fn measure(&self, rounds: usize) -> Result<Measurement> {
        let connections = self.connections;
        let mut m = Measurement::default();
        for round in 0..rounds {
            let secs = self.churn(connections)?;
            m.without.push(connections as f64 / secs);

            let agent = Agent::start(&self.agent_bin, &self.agent_args)?;
            let before = agent.metrics()?;
            let cpu0 = agent.cpu_seconds()?;
            let secs = self.churn(connections)?;
            // Let the reader's drain timer take the tail of the ring.
            std::thread::sleep(Duration::from_millis(300));
            let cpu1 = agent.cpu_seconds()?;
            let after = agent.metrics()?;
            m.peak_rss_kib = m.peak_rss_kib.max(agent.peak_rss_kib()?);
            agent.stop()?;
            m.with.push(connections as f64 / secs);
            m.cpu_s += cpu1 - cpu0;
            m.events +=
                metric(&after, "tcpstate_events_total") - metric(&before, "tcpstate_events_total");
            let lost = |stage| {
                harness::value(&after, "tcpstate_events_lost_total", &[("stage", stage)])
                    .unwrap_or(0.0) as u64
            };
            m.lost_kernel += lost("kernel");
            m.lost_agent += lost("agent");
            eprintln!(
                "bench: round {}: without {:.0} conn/s, with {:.0} conn/s",
                round + 1,
                m.without[round],
                m.with[round]
            );
        }

        // One more, untimed round with the kernel's accounting of the program's run time on:
        // the accounting adds two clock reads per run, so it stays off while throughput is
        // measured.
        let stats_was = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
        let _restore = RestoreFile(BPF_STATS, stats_was.trim().to_string());
        std::fs::write(BPF_STATS, "1").map_err(|e| format!("{BPF_STATS}: {e}"))?;
        let agent = Agent::start(&self.agent_bin, &self.agent_args)?;
        self.churn(connections)?;
        let (ns, runs) = agent.program_run_time();
        agent.stop()?;
        m.program_ns = ns as f64 / runs.max(1) as f64;
        Ok(m)
    }
}

/// `xtask churn-worker N PORT`: runs N connections on 127.0.0.1:PORT, prints seconds taken.
pub fn worker(args: &[String]) -> Result {
    let n: u64 = num(args.first(), "N")?;
    let port: u16 = num(args.get(1), "PORT")? as u16;
    let listener =
        TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("bind {port}: {e}"))?;
    let start = Instant::now();
    let mut buf = [0u8; 1];
    for _ in 0..n {
        let client =
            TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        let (mut server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        drop(client);
        // Wait for the client's FIN so the server goes CLOSE_WAIT -> LAST_ACK.
        let _ = server.read(&mut buf);
        drop(server);
    }
    println!("{}", start.elapsed().as_secs_f64());
    Ok(())
}

pub(crate) struct RestoreFile(pub(crate) &'static str, pub(crate) String);
impl Drop for RestoreFile {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, &self.1);
    }
}

struct NetnsGuard;
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}

/// The agent under measurement: the shared harness, plus what only benchmarks read.
pub(crate) struct Agent(harness::Agent);

impl Agent {
    /// Starts the agent and waits until it is ready (attached, and the first sock_diag dump
    /// seeded the table): the rounds measure its steady state, not its start.
    pub(crate) fn start(bin: &Path, extra: &[String]) -> Result<Agent> {
        Agent::start_at(bin, AGENT_LISTEN, extra)
    }

    /// Starts one at `listen` (a second agent also needs a `--socket` of its own).
    pub(crate) fn start_at(bin: &Path, listen: &str, extra: &[String]) -> Result<Agent> {
        let mut args = vec!["--log-level", "warn"];
        args.extend(extra.iter().map(String::as_str));
        harness::Agent::start(
            bin,
            listen,
            &args,
            Stdio::inherit(),
            harness::Ready::Seeded,
            Duration::from_secs(15),
        )
        .map(Agent)
    }

    pub(crate) fn metrics(&self) -> Result<String> {
        self.0.metrics()
    }

    pub(crate) fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.pid()))
            .map_err(|e| e.to_string())?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
        let hz: f64 = output(Command::new("getconf").arg("CLK_TCK"))?
            .parse()
            .unwrap_or(100.0);
        Ok(ticks / hz)
    }

    /// Run time and run count of the agent's eBPF program, from its fd's fdinfo.
    pub(crate) fn program_run_time(&self) -> (u64, u64) {
        let dir = format!("/proc/{}/fdinfo", self.0.pid());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return (0, 0);
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(ns), Some(runs)) = (get("run_time_ns:"), get("run_cnt:")) {
                return (ns, runs);
            }
        }
        (0, 0)
    }

    fn peak_rss_kib(&self) -> Result<u64> {
        self.status_kib("VmHWM:")
    }

    /// The agent's 15 largest mappings by RSS, to stderr.
    pub(crate) fn print_smaps(&self) {
        let text =
            std::fs::read_to_string(format!("/proc/{}/smaps", self.0.pid())).unwrap_or_default();
        let mut cur = String::new();
        let mut rows = Vec::new();
        for l in text.lines() {
            if l.contains('-') && !l.starts_with(|c: char| c.is_ascii_uppercase()) {
                cur = l.to_string();
            } else if let Some(v) = l.strip_prefix("Rss:") {
                let kib: u64 = v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                rows.push((kib, cur.clone()));
            }
        }
        rows.sort();
        for r in rows.iter().rev().take(15) {
            eprintln!("{:>8} KiB {}", r.0, r.1);
        }
    }

    /// A KiB figure of /proc/PID/status, e.g. `VmRSS:`.
    pub(crate) fn status_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.pid()))
            .map_err(|e| e.to_string())?;
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    pub(crate) fn stop(mut self) -> Result {
        self.0.signal("TERM")?;
        let status = self.0.wait_exit(Duration::from_secs(10))?;
        if !status.success() {
            return Err(format!("the agent exited with {status} on SIGTERM"));
        }
        Ok(())
    }
}

/// The value of an unlabelled series; 0 when absent.
pub(crate) fn metric(text: &str, name: &str) -> u64 {
    harness::value(text, name, &[]).unwrap_or(0.0) as u64
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

pub(crate) fn num(v: Option<&String>, what: &str) -> Result<u64> {
    v.ok_or_else(|| format!("{what} needs a number"))?
        .parse()
        .map_err(|_| format!("{what} needs a number"))
}
