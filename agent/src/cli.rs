//! Command-line types.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::alerts::Thresholds;
use crate::config::{self, AgentConfig};

#[derive(Debug, Parser)]
#[command(
    name = "tcpstate",
    version,
    about = "Watch every TCP state transition and find connections stuck in CLOSE_WAIT or FIN_WAIT_2",
    long_about = "tcpstate follows every TCP state transition on this host with an eBPF program on \
the tracepoint sock:inet_sock_set_state, keeps a live table of connections per service port, and \
exports it as Prometheus metrics.",
    after_help = "Examples:\n  sudo tcpstate agent\n  tcpstate ports\n  tcpstate conns --port 8080 --lingering\n  tcpstate watch --state close_wait\n  curl -s localhost:10610/metrics | grep close_wait"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the eBPF program and serve metrics until SIGINT/SIGTERM.
    #[command(
        after_help = "Needs root, or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH (tracefs is root's).\nOptional: CAP_SYS_ADMIN to mount a missing tracefs and to dump other network namespaces,\nCAP_SYS_PTRACE to name sockets' owners in other users' processes.\ndeploy/systemd/tcpstate.service grants exactly these.\n\nExamples:\n  sudo tcpstate agent --listen 127.0.0.1:10610\n  tcpstate agent --check-config --config /etc/tcpstate/tcpstate.toml"
    )]
    Agent(AgentArgs),
    /// Per service port and role: connections per state, lingering, oldest lingering age.
    #[command(
        after_help = "Sorted by lingering connections, then by total.\n\nExample:\n  tcpstate ports\n  tcpstate ports --json | jq '.[] | select(.lingering > 0)'"
    )]
    Ports(ClientArgs),
    /// The connections: addresses, state, age in state, role, owner.
    #[command(
        after_help = "Ages marked > are lower bounds (the socket existed before the agent saw it change).\n\nExample:\n  tcpstate conns --port 8080 --state close_wait\n  tcpstate conns --lingering --json"
    )]
    Conns(ConnsArgs),
    /// Live transitions, one line each, with the time spent in the state left.
    #[command(
        after_help = "Runs until interrupted. A watch that cannot keep up is disconnected by the agent.\n\nExample:\n  tcpstate watch --port 8080\n  tcpstate watch --state close_wait --json"
    )]
    Watch(WatchArgs),
    /// The agent: version, uptime, kernel, event rate, losses, tracked sockets.
    #[command(after_help = "Example:\n  tcpstate status")]
    Status(ClientArgs),
}

/// Flags every client command takes.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The agent's API socket.
    #[arg(long, value_name = "PATH", default_value = crate::api::DEFAULT_SOCKET, env = "TCPSTATE_SOCKET")]
    pub socket: PathBuf,
    /// Machine-readable output (stable field names).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only connections of this service port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only connections in this state (close_wait, CLOSE_WAIT, fin_wait2, ...).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only this role.
    #[arg(long, value_parser = ["server", "client"])]
    pub role: Option<String>,
    /// Only lingering connections.
    #[arg(long)]
    pub lingering: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only transitions where either end uses this port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only transitions into or out of this state.
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML config file; every flag has a key of the same name with `_` (flags win)
    /// [default: /etc/tcpstate/tcpstate.toml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Validate the configuration (file and flags), print it, and exit.
    #[arg(long)]
    pub check_config: bool,

    /// Address and port of the HTTP server (/metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = config::DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Distinct service ports tracked per role; further ports are counted under port="other".
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_PORTS,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_ports: u32,

    /// Size of the kernel-to-agent ring buffer: a power of two, e.g. 4MiB.
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_ring)]
    pub ring_size: u32,

    /// Sockets whose state-entry time the eBPF program remembers (an LRU map).
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_SOCKETS,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_sockets: u32,

    /// Time in CLOSE_WAIT or FIN_WAIT2 after which a connection is lingering (sets both;
    /// default 60s, like net.ipv4.tcp_fin_timeout). E.g. 500ms, 30s, 5m.
    #[arg(long, value_name = "DURATION", value_parser = parse_linger_after)]
    pub linger_after: Option<Duration>,

    /// Linger threshold for CLOSE_WAIT only (overrides --linger-after).
    #[arg(long, value_name = "DURATION", value_parser = parse_close_wait)]
    pub close_wait_after: Option<Duration>,

    /// Linger threshold for FIN_WAIT2 only (overrides --linger-after).
    #[arg(long, value_name = "DURATION", value_parser = parse_fin_wait2)]
    pub fin_wait2_after: Option<Duration>,

    /// Split every per-port metric by network namespace (adds a `netns` label with the
    /// namespace inode), e.g. for containers that listen on the same port.
    #[arg(long)]
    pub per_netns: bool,

    /// Lingering events logged one by one per detection interval; beyond, one summary line per
    /// port with the count.
    #[arg(long, value_name = "N", default_value_t = crate::alerts::DEFAULT_LOG_CAP)]
    pub linger_log_cap: usize,

    /// How often the table is repaired from a sock_diag dump of every namespace (which also
    /// counts TIME_WAIT and orphaned FIN_WAIT2 sockets). Transitions the kernel reports lost bring
    /// the next one forward (no sooner than a quarter of this, 1 s to 5 s, after the last).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_reconcile)]
    pub reconcile_interval: Duration,

    /// A service port that has held no socket and seen no transition for this long gives its
    /// slot back: its series disappear (counters restart from 0 if it returns).
    #[arg(long, value_name = "DURATION", default_value = config::DEFAULT_PORT_RETIRE_TEXT,
          value_parser = parse_retire)]
    pub port_retire_after: Duration,

    /// Service ports per role with duration histograms of their own (the first to need one);
    /// the others' durations are observed under port="other".
    #[arg(long, value_name = "N", default_value_t = crate::table::DEFAULT_HISTOGRAM_PORTS as u32,
          value_parser = clap::value_parser!(u32).range(0..=65536))]
    pub histogram_ports: u32,

    /// States whose time is observed in tcpstate_state_duration_seconds, comma-separated
    /// (empty: none).
    #[arg(long, value_name = "STATES", default_value = config::DEFAULT_DURATION_STATES_TEXT,
          value_parser = parse_duration_states)]
    pub duration_states: crate::table::StateSet,

    /// The local API's Unix socket (directory 0750, socket 0660, group `tcpstate` if it exists).
    #[arg(long, value_name = "PATH", default_value = crate::api::DEFAULT_SOCKET, env = "TCPSTATE_SOCKET")]
    pub socket: PathBuf,

    /// tracefs mount point [default: /sys/kernel/tracing, mounted if missing].
    #[arg(long, value_name = "PATH")]
    pub tracefs: Option<PathBuf>,

    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive.
    #[arg(
        long,
        value_name = "FILTER",
        default_value = "info",
        env = "TCPSTATE_LOG"
    )]
    pub log_level: String,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_linger_after(s: &str) -> Result<Duration, String> {
    config::parse_duration("--linger-after", s).map_err(|e| e.to_string())
}

fn parse_close_wait(s: &str) -> Result<Duration, String> {
    config::parse_duration("--close-wait-after", s).map_err(|e| e.to_string())
}

fn parse_fin_wait2(s: &str) -> Result<Duration, String> {
    config::parse_duration("--fin-wait2-after", s).map_err(|e| e.to_string())
}

fn parse_reconcile(s: &str) -> Result<Duration, String> {
    config::parse_duration("--reconcile-interval", s).map_err(|e| e.to_string())
}

fn parse_retire(s: &str) -> Result<Duration, String> {
    config::parse_duration("--port-retire-after", s).map_err(|e| e.to_string())
}

fn parse_duration_states(s: &str) -> Result<crate::table::StateSet, String> {
    config::parse_states("--duration-states", s).map_err(|e| e.to_string())
}

fn parse_ring(s: &str) -> Result<u32, String> {
    config::parse_ring_size(s).map_err(|e| e.to_string())
}

impl AgentArgs {
    pub fn config(&self) -> AgentConfig {
        AgentConfig {
            listen: self.listen,
            max_ports: self.max_ports,
            ring_bytes: self.ring_size,
            max_sockets: self.max_sockets,
            tracefs: self.tracefs.clone(),
            drain_interval: config::DRAIN_INTERVAL,
            reconcile_interval: self.reconcile_interval,
            linger_log_cap: self.linger_log_cap,
            per_netns: self.per_netns,
            socket: self.socket.clone(),
            port_retire_after: self.port_retire_after,
            histogram_ports: self.histogram_ports,
            duration_states: self.duration_states,
            thresholds: {
                let base = Thresholds::default();
                let both = self.linger_after;
                Thresholds {
                    close_wait: self.close_wait_after.or(both).unwrap_or(base.close_wait),
                    fin_wait2: self.fin_wait2_after.or(both).unwrap_or(base.fin_wait2),
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_help_names_every_capability_the_agent_checks() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("agent")
            .unwrap()
            .render_long_help()
            .to_string();
        for cap in [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_DAC_READ_SEARCH",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
        ] {
            assert!(help.contains(cap), "`tcpstate agent --help` omits {cap}");
        }
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["tcpstate", "agent"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("agent")
        };
        let c = a.config();
        assert_eq!(c.listen, "0.0.0.0:10610".parse().unwrap());
        assert_eq!(c.max_ports, 512);
        assert_eq!(c.ring_bytes, 4 << 20);
        assert_eq!(c.wakeup_bytes(), 1 << 20);
        assert_eq!(c.thresholds, Thresholds::default());
    }

    #[test]
    fn linger_after_sets_both_and_per_state_flags_override() {
        let cli = Cli::try_parse_from([
            "tcpstate",
            "agent",
            "--linger-after",
            "500ms",
            "--fin-wait2-after",
            "5m",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("agent")
        };
        let t = a.config().thresholds;
        assert_eq!(t.close_wait, Duration::from_millis(500));
        assert_eq!(t.fin_wait2, Duration::from_secs(300));
    }

    #[test]
    fn bad_flags_are_rejected_with_their_name() {
        for args in [
            vec!["tcpstate", "agent", "--ring-size", "3MiB"],
            vec!["tcpstate", "agent", "--max-ports", "0"],
            vec!["tcpstate", "agent", "--listen", "nowhere"],
            vec!["tcpstate", "agent", "--bogus"],
            vec!["tcpstate", "agent", "--linger-after", "0s"],
            vec!["tcpstate", "agent", "--close-wait-after", "later"],
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let flag = args[2];
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
