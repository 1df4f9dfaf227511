//! The agent's flags (`tcpstate agent ...`), turned into an [`AgentConfig`].
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::config::{self, AgentConfig};
use crate::model::linger::Thresholds;
use crate::model::state::StateSet;

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
    pub(crate) config: Option<PathBuf>,

    /// Validate the configuration (file and flags), print it, and exit.
    #[arg(long)]
    pub check_config: bool,

    /// Address and port of the HTTP server (/metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = config::DEFAULT_LISTEN)]
    pub(crate) listen: SocketAddr,

    /// Distinct service ports tracked per role; further ports are counted under port="other".
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_PORTS,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) max_ports: u32,

    /// Size of the kernel-to-agent ring buffer: a power of two, e.g. 4MiB.
    #[arg(long, value_name = "BYTES", default_value = config::DEFAULT_RING_SIZE_TEXT, value_parser = parse_ring)]
    pub(crate) ring_size: u32,

    /// Sockets whose state-entry time the eBPF program remembers (an LRU map).
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_SOCKETS,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub(crate) max_sockets: u32,

    /// Time in CLOSE_WAIT or FIN_WAIT2 after which a connection is lingering (sets both;
    /// default 60s, like net.ipv4.tcp_fin_timeout). E.g. 500ms, 30s, 5m.
    #[arg(long, value_name = "DURATION", value_parser = parse_linger_after)]
    pub(crate) linger_after: Option<Duration>,

    /// Linger threshold for CLOSE_WAIT only (overrides --linger-after).
    #[arg(long, value_name = "DURATION", value_parser = parse_close_wait)]
    pub(crate) close_wait_after: Option<Duration>,

    /// Linger threshold for FIN_WAIT2 only (overrides --linger-after).
    #[arg(long, value_name = "DURATION", value_parser = parse_fin_wait2)]
    pub(crate) fin_wait2_after: Option<Duration>,

    /// Split every per-port metric by network namespace (adds a `netns` label with the
    /// namespace inode), e.g. for containers that listen on the same port.
    #[arg(long)]
    pub(crate) per_netns: bool,

    /// Lingering events logged one by one per detection interval; beyond, one summary line per
    /// port with the count.
    #[arg(long, value_name = "N", default_value_t = crate::model::linger::DEFAULT_LOG_CAP)]
    pub(crate) linger_log_cap: usize,

    /// How often a sock_diag dump of every namespace corrects the TIME_WAIT and orphaned
    /// FIN_WAIT2 counts (counted live as the kernel makes them) and names the owners of
    /// lingering sockets. Transitions the kernel reports lost bring a full dump forward (no
    /// sooner than a quarter of this, 1 s to 5 s, after the last).
    #[arg(long, value_name = "DURATION", default_value = config::DEFAULT_RECONCILE_TEXT, value_parser = parse_reconcile)]
    pub(crate) reconcile_interval: Duration,

    /// How often the dump is a full one, of every socket, that repairs the whole table (besides
    /// the one at start and those after a loss). At or below --reconcile-interval every dump
    /// is full.
    #[arg(long, value_name = "DURATION", default_value = config::DEFAULT_FULL_RECONCILE_TEXT, value_parser = parse_full_reconcile)]
    pub(crate) full_reconcile_interval: Duration,

    /// A service port that has held no socket and seen no transition for this long gives its
    /// slot back: its series disappear (counters restart from 0 if it returns).
    #[arg(long, value_name = "DURATION", default_value = config::DEFAULT_PORT_RETIRE_TEXT,
          value_parser = parse_retire)]
    pub(crate) port_retire_after: Duration,

    /// Service ports per role with duration histograms of their own (the first to need one);
    /// the others' durations are observed under port="other".
    #[arg(long, value_name = "N", default_value_t = crate::model::table::DEFAULT_HISTOGRAM_PORTS as u32,
          value_parser = clap::value_parser!(u32).range(0..=65536))]
    pub(crate) histogram_ports: u32,

    /// States whose time is observed in tcpstate_state_duration_seconds, comma-separated
    /// (empty: none).
    #[arg(long, value_name = "STATES", default_value = config::DEFAULT_DURATION_STATES_TEXT,
          value_parser = parse_duration_states)]
    pub(crate) duration_states: StateSet,

    /// The local API's Unix socket (directory 0750, socket 0660, group `tcpstate` if it exists).
    #[arg(long, value_name = "PATH", default_value = crate::serve::api::protocol::DEFAULT_SOCKET, env = "TCPSTATE_SOCKET")]
    pub(crate) socket: PathBuf,

    /// tracefs mount point [default: /sys/kernel/tracing, mounted if missing].
    #[arg(long, value_name = "PATH")]
    pub(crate) tracefs: Option<PathBuf>,

    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive.
    #[arg(
        long,
        value_name = "FILTER",
        default_value = "info",
        env = "TCPSTATE_LOG"
    )]
    pub(crate) log_level: String,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
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

fn parse_full_reconcile(s: &str) -> Result<Duration, String> {
    config::parse_duration("--full-reconcile-interval", s).map_err(|e| e.to_string())
}

fn parse_retire(s: &str) -> Result<Duration, String> {
    config::parse_duration("--port-retire-after", s).map_err(|e| e.to_string())
}

fn parse_duration_states(s: &str) -> Result<StateSet, String> {
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
            full_reconcile_interval: self.full_reconcile_interval,
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
