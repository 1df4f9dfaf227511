//! `cargo xtask bench`'s busy-host scenario: what the exposition and the agent's memory cost on
//! a host a fleet would run.
//!
//! In a network namespace of its own, with the agent already running: 400 server ports holding
//! 100,000 established loopback connections (so every port has seen transitions on both roles),
//! opened in two halves; after the first half (100,000 sockets), a second agent measures what
//! it costs while nothing changes, from its seeding to its next full dump. Then a burst of 30,000 connections that the server closes first (30,000 `TIME_WAIT` sockets
//! on one server port, whose listener then exits), then a `CLOSE_WAIT` leak on a new port. Once
//! a reconciliation has counted the `TIME_WAIT` sockets: the series in `/metrics`, its size and
//! scrape time, and the agent's RSS per tracked socket.
//!
//! One process may hold 20,000 descriptors here (no CAP_SYS_RESOURCE to raise it), so the
//! connections are held by 16 processes of 6,250 connections (12,500 descriptors) each.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Result;
use crate::bench::{Agent, metric, num};
use crate::harness::value;

const NETNS: &str = "tcpstate-busy";
/// 400 service ports, 7000..7399.
const FIRST_PORT: u16 = 7000;
const PORTS: u16 = 400;
const HOLDERS: u16 = 16;
const CONNS_PER_PORT: u32 = 250;
const BURST_PORT: u16 = 7500;
const BURST: u32 = 30_000;
const LEAK_PORT: u16 = 7600;
const LEAK: u32 = 100;
/// The target of the fleet-safe metrics issue.
const MAX_SERIES: usize = 5_000;
const MAX_RSS_MIB: f64 = 64.0;

pub fn run(agent_bin: &std::path::Path, agent_args: &[String]) -> Result {
    let _ = Command::new("ip")
        .args(["netns", "del", NETNS])
        .stderr(Stdio::null())
        .status();
    crate::sh(Command::new("ip").args(["netns", "add", NETNS]))?;
    let _cleanup = Netns;
    crate::sh(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;

    let agent = Agent::start(agent_bin, agent_args)?;
    let rss_start = agent.status_kib("VmRSS:")?;
    // Half the connections (100,000 sockets) for the idle measurement, then the rest.
    let mut holders = hold(0..HOLDERS / 2)?;
    let idle = idle(agent_bin, agent_args)?;
    holders.extend(hold(HOLDERS / 2..HOLDERS)?);
    let (leak, live) = burst_and_leak(&agent)?;
    // A reconciliation that started after the burst has corrected its TIME_WAIT count.
    let runs = metric(&agent.metrics()?, "tcpstate_reconciliations_total");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&agent.metrics()?, "tcpstate_reconciliations_total") < runs + 1 {
        if Instant::now() > deadline {
            return Err("no reconciliation within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let figures = measure(&agent, rss_start)?;
    for h in holders {
        h.finish()?;
    }
    leak.finish()?;
    agent.stop()?;
    figures.report();
    println!(
        "| burst port TIME_WAIT {:.0} ms after the burst, before any dump (ss) | {} ({}) | equal |",
        live.after_ms, live.agent, live.ss
    );
    idle.report();
    Ok(())
}

/// Where the idle agent listens: a second agent beside the scenario's.
const IDLE_LISTEN: &str = "127.0.0.1:10691";
const IDLE_SOCKET: &str = "/tmp/tcpstate-bench-idle.sock";
const IDLE_TARGET: f64 = 0.3;
const SCRAPE_EVERY_S: u64 = 15;

/// What an agent costs while nothing changes.
struct Idle {
    cpu_per_min: f64,
    window_s: f64,
    dumps: u64,
    full: u64,
}

/// The CPU of an agent started on the held connections, while nothing changes: from just after
/// its seeding (a full dump) to just after its next full dump, so that the window holds every
/// kind of dump in the proportion its settings give (with the defaults: 19 light dumps and one
/// full one in 5 minutes). An agent without light dumps (every dump full) is measured over its
/// next four dumps.
fn idle(agent_bin: &std::path::Path, agent_args: &[String]) -> Result<Idle> {
    let mut args = agent_args.to_vec();
    args.extend(["--socket".to_string(), IDLE_SOCKET.to_string()]);
    let agent = Agent::start_at(agent_bin, IDLE_LISTEN, &args)?;
    let counts = |text: &str| {
        let full = value(text, "tcpstate_full_reconciliations_total", &[]);
        let all = metric(text, "tcpstate_reconciliations_total");
        (full.map(|f| f as u64), all)
    };
    let (full0, all0) = counts(&agent.metrics()?);
    let (cpu0, t0) = (agent.cpu_seconds()?, Instant::now());
    eprintln!(
        "bench: idle agent seeded; waiting for its next {} (up to 6 minutes)",
        if full0.is_some() {
            "full dump"
        } else {
            "four dumps"
        }
    );
    let deadline = t0 + Duration::from_secs(400);
    let (full1, all1) = loop {
        // Scraped as often as Prometheus would (a scrape costs the agent a few ms).
        std::thread::sleep(Duration::from_secs(SCRAPE_EVERY_S));
        let (full, all) = counts(&agent.metrics()?);
        let done = match (full0, full) {
            (Some(f0), Some(f)) => f > f0,
            _ => all >= all0 + 4,
        };
        if done {
            break (full, all);
        }
        if Instant::now() > deadline {
            return Err("idle: no full dump within 400 s".into());
        }
    };
    let (cpu1, window) = (agent.cpu_seconds()?, t0.elapsed().as_secs_f64());
    agent.stop()?;
    Ok(Idle {
        cpu_per_min: (cpu1 - cpu0) / window * 60.0,
        window_s: window,
        dumps: all1 - all0,
        full: full1.zip(full0).map_or(all1 - all0, |(a, b)| a - b),
    })
}

impl Idle {
    fn report(&self) {
        println!();
        println!(
            "## idle: {} established loopback connections ({} sockets) held, nothing changing",
            u32::from(PORTS / 2) * CONNS_PER_PORT,
            u32::from(PORTS) * CONNS_PER_PORT
        );
        println!();
        println!("| measure | value | target |");
        println!("|---|---|---|");
        println!(
            "| agent CPU per minute | {:.3} CPU-s | <= {IDLE_TARGET} |",
            self.cpu_per_min
        );
        println!(
            "| window: from a full dump to the next | {:.0} s, {} dumps ({} full), /metrics scraped every {SCRAPE_EVERY_S} s | |",
            self.window_s, self.dumps, self.full
        );
    }
}

/// Opens the connections of holders `which` in the namespace.
fn hold(which: std::ops::Range<u16>) -> Result<Vec<Holder>> {
    // 400 ports x 250 connections, opened while the agent runs.
    let started = Instant::now();
    let per_holder = PORTS / HOLDERS;
    let mut holders = Vec::new();
    for h in which.clone() {
        let first = FIRST_PORT + h * per_holder;
        holders.push(Holder::spawn(&[
            "hold",
            &first.to_string(),
            &per_holder.to_string(),
            &CONNS_PER_PORT.to_string(),
        ])?);
    }
    for h in &mut holders {
        h.wait_ready()?;
    }
    eprintln!(
        "bench: busy host: {} more connections on {} ports held ({:.1} s)",
        u32::from(which.len() as u16 * per_holder) * CONNS_PER_PORT,
        which.len() as u16 * per_holder,
        started.elapsed().as_secs_f64()
    );
    Ok(holders)
}

/// The burst and the leak.
fn burst_and_leak(agent: &Agent) -> Result<(Holder, Live)> {
    // The burst: the server closes first, so TIME_WAIT stays on the server's side; then its
    // listener exits.
    let burst = crate::output(
        Command::new("ip")
            .args(["netns", "exec", NETNS])
            .arg(std::env::current_exe().map_err(|e| e.to_string())?)
            .args([
                "busy-worker",
                "burst",
                &BURST_PORT.to_string(),
                &BURST.to_string(),
            ]),
    )?;
    let ended = Instant::now();
    // What the agent says right after the burst, before any dump could have counted it.
    let text = agent.metrics()?;
    let after_ms = ended.elapsed().as_secs_f64() * 1e3;
    let live = Live {
        agent: burst_time_wait(&text),
        ss: ss_burst_time_wait()?,
        after_ms,
    };
    eprintln!("bench: busy host: burst of {BURST} server-first connections ({burst} s)");
    // A CLOSE_WAIT leak on a new port: the clients close, the server never does.
    let mut leak = Holder::spawn(&["leak", &LEAK_PORT.to_string(), &LEAK.to_string()])?;
    leak.wait_ready()?;
    Ok((leak, live))
}

/// The agent's TIME_WAIT count on the burst port right after the burst, and ss's.
struct Live {
    agent: String,
    ss: usize,
    after_ms: f64,
}

fn burst_time_wait(text: &str) -> String {
    value(
        text,
        "tcpstate_connections",
        &[
            ("port", &BURST_PORT.to_string()),
            ("role", "server"),
            ("state", "time_wait"),
        ],
    )
    .map_or("none".to_string(), |v| v.to_string())
}

fn ss_burst_time_wait() -> Result<usize> {
    Ok(crate::output(Command::new("ip").args([
        "netns",
        "exec",
        NETNS,
        "ss",
        "-Htan",
        "state",
        "time-wait",
        &format!("sport = :{BURST_PORT}"),
    ]))?
    .lines()
    .count())
}

/// What the scenario measures.
struct Figures {
    text: String,
    scrape_ms: Vec<f64>,
    ss_time_wait: usize,
    rss_start: u64,
    rss: u64,
    hwm: u64,
    cpu: f64,
}

fn measure(agent: &Agent, rss_start: u64) -> Result<Figures> {
    let mut scrape_ms = Vec::new();
    let mut text = String::new();
    for _ in 0..5 {
        let t = Instant::now();
        text = agent.metrics()?;
        scrape_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let ss_time_wait = ss_burst_time_wait()?;
    if std::env::var_os("TCPSTATE_BENCH_SMAPS").is_some() {
        agent.print_smaps();
    }
    Ok(Figures {
        text,
        scrape_ms,
        ss_time_wait,
        rss_start,
        rss: agent.status_kib("VmRSS:")?,
        hwm: agent.status_kib("VmHWM:")?,
        cpu: agent.cpu_seconds()?,
    })
}

impl Figures {
    /// Series per family, histogram parts counted with their family.
    fn families(&self) -> Vec<(&str, usize)> {
        let mut families: std::collections::BTreeMap<&str, usize> = Default::default();
        for l in self.text.lines().filter(|l| l.starts_with("tcpstate_")) {
            let name = l.split(['{', ' ']).next().unwrap_or(l);
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            *families.entry(name).or_default() += 1;
        }
        let mut families: Vec<_> = families.into_iter().collect();
        families.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        families
    }

    fn report(&self) {
        let text = &self.text;
        let series = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        let own_series = text.lines().filter(|l| l.starts_with("tcpstate_")).count();
        let leak_line = format!(
            "tcpstate_connections{{port=\"{LEAK_PORT}\",role=\"server\",state=\"close_wait\"}} {LEAK}"
        );
        let burst_tw = burst_time_wait(text);
        let other = text
            .lines()
            .filter(|l| l.starts_with("tcpstate_connections{port=\"other\""))
            .count();
        let tracked = metric(text, "tcpstate_tracked_sockets");
        let mib = |kib: u64| kib as f64 / 1024.0;
        let per_socket =
            (self.rss.saturating_sub(self.rss_start) * 1024) as f64 / tracked.max(1) as f64;
        println!();
        println!(
            "## busy host: {PORTS} ports, {} established connections, a burst of {BURST} server-first connections, a CLOSE_WAIT leak",
            u32::from(PORTS) * CONNS_PER_PORT
        );
        println!();
        println!("| measure | value | target |");
        println!("|---|---|---|");
        println!("| series in /metrics | {series} ({own_series} tcpstate_*) | <= {MAX_SERIES} |");
        println!(
            "| /metrics size | {:.0} KiB | |",
            text.len() as f64 / 1024.0
        );
        println!(
            "| scrape time (median of 5) | {:.1} ms | |",
            crate::bench::median(&self.scrape_ms)
        );
        let own = if text.contains(&leak_line) {
            "yes"
        } else {
            "NO"
        };
        println!("| the leak's port has its own series | {own} | yes |");
        println!(
            "| burst port TIME_WAIT, server role (ss) | {burst_tw} ({}) | |",
            self.ss_time_wait
        );
        println!("| port=\"other\" connection series | {other} | |");
        println!("| sockets in the table | {tracked} | |");
        println!(
            "| agent RSS at the end (at start) | {:.1} MiB ({:.1} MiB) | <= {MAX_RSS_MIB} MiB |",
            mib(self.rss),
            mib(self.rss_start)
        );
        println!("| agent peak RSS | {:.1} MiB | |", mib(self.hwm));
        println!("| RSS per tracked socket (growth / sockets) | {per_socket:.0} bytes | |");
        println!("| agent CPU, whole scenario | {:.2} s | |", self.cpu);
        println!();
        println!("| family | series |");
        println!("|---|---|");
        for (name, n) in self.families().iter().filter(|(_, n)| *n > 2) {
            println!("| `{name}` | {n} |");
        }
    }
}

/// A process in the namespace that holds connections until its standard input closes.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Holder {
    fn spawn(args: &[&str]) -> Result<Holder> {
        let xtask = std::env::current_exe().map_err(|e| e.to_string())?;
        // Each holder takes the hard descriptor limit (20,000 here; raising it needs
        // CAP_SYS_RESOURCE).
        let mut child = Command::new("ip")
            .args(["netns", "exec", NETNS, "sh", "-c"])
            .arg("ulimit -n \"$(ulimit -Hn)\" && exec \"$0\" busy-worker \"$@\"")
            .arg(xtask)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a busy-host worker: {e}"))?;
        let stdin = child.stdin.take();
        Ok(Holder { child, stdin })
    }

    fn wait_ready(&mut self) -> Result {
        let out = self.child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() == "ready" {
            Ok(())
        } else {
            Err(format!("a busy-host worker failed: `{}`", line.trim()))
        }
    }

    fn finish(mut self) -> Result {
        drop(self.stdin.take());
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("a busy-host worker exited with {status}"))
        }
    }
}

/// `xtask busy-worker hold FIRST_PORT PORTS CONNS | burst PORT N | leak PORT N`, inside the
/// namespace.
pub fn worker(args: &[String]) -> Result {
    let what = args.first().map(String::as_str).unwrap_or("");
    let n = |i: usize, name: &str| num(args.get(i), name);
    match what {
        "hold" => {
            let (first, ports, conns) = (n(1, "FIRST_PORT")?, n(2, "PORTS")?, n(3, "CONNS")?);
            let mut held = Vec::new();
            for port in first..first + ports {
                let listener = TcpListener::bind(("127.0.0.1", port as u16))
                    .map_err(|e| format!("bind {port}: {e}"))?;
                for _ in 0..conns {
                    let c = TcpStream::connect(("127.0.0.1", port as u16))
                        .map_err(|e| format!("connect {port}: {e}"))?;
                    let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
                    held.push((c, s));
                }
                // The listener stays: these are live services.
                std::mem::forget(listener);
            }
            hold_until_stdin_closes()
        }
        "burst" => {
            let (port, count) = (n(1, "PORT")?, n(2, "N")?);
            let listener = TcpListener::bind(("127.0.0.1", port as u16))
                .map_err(|e| format!("bind {port}: {e}"))?;
            let start = Instant::now();
            let mut buf = [0u8; 1];
            for _ in 0..count {
                let mut c = TcpStream::connect(("127.0.0.1", port as u16))
                    .map_err(|e| format!("connect: {e}"))?;
                let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
                // The server closes first; the client reads EOF and closes after it.
                drop(s);
                let _ = c.read(&mut buf);
                drop(c);
            }
            println!("{:.1}", start.elapsed().as_secs_f64());
            Ok(())
        }
        "leak" => {
            let (port, count) = (n(1, "PORT")?, n(2, "N")?);
            let listener = TcpListener::bind(("127.0.0.1", port as u16))
                .map_err(|e| format!("bind {port}: {e}"))?;
            let mut servers = Vec::new();
            for _ in 0..count {
                let c = TcpStream::connect(("127.0.0.1", port as u16))
                    .map_err(|e| format!("connect: {e}"))?;
                let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
                drop(c);
                servers.push(s);
            }
            hold_until_stdin_closes()
        }
        other => Err(format!("busy-worker: unknown task `{other}`")),
    }
}

fn hold_until_stdin_closes() -> Result {
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

struct Netns;
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}
