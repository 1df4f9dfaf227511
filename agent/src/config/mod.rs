//! Validated agent settings and the parsers for their human forms.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub mod file;
pub mod flags;

use crate::model::linger::Thresholds;
use crate::model::state::{StateSet, parse_state};

/// The default `--listen`: all interfaces, on a port outside the Prometheus exporter range
/// (9100-9999, fully allocated) that no common service uses.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:10610";
pub(crate) const DEFAULT_MAX_PORTS: u32 = 512;
/// The default `--ring-size`: 4 MiB holds about 52,000 events, at the churn benchmark's peak
/// rate more than 100 ms of headroom over the 10 ms drain interval (see the README's benchmark
/// section).
pub(crate) const DEFAULT_RING_SIZE_TEXT: &str = "4MiB";
pub(crate) const DEFAULT_MAX_SOCKETS: u32 = 131_072;
pub(crate) const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// The default `--reconcile-interval`.
pub(crate) const DEFAULT_RECONCILE_TEXT: &str = "15s";
/// The default `--full-reconcile-interval`: a safety net under the events (which keep the table
/// right unless the kernel reports a loss, and a loss brings a full dump forward anyway). One
/// full dump costs about 0.5 CPU-s per 100,000 sockets.
pub(crate) const DEFAULT_FULL_RECONCILE_TEXT: &str = "5m";
/// A port retires after this long without a socket or a transition (`--port-retire-after`):
/// longer than a scrape interval (so the drop to 0 is scraped) and than TIME_WAIT (60 s),
/// short enough that a burst of one-off ports frees its slots within minutes.
pub(crate) const DEFAULT_PORT_RETIRE_TEXT: &str = "5m";
pub(crate) const DEFAULT_DURATION_STATES_TEXT: &str =
    "syn_sent,syn_recv,established,close_wait,fin_wait2,last_ack";

/// Everything `tcpstate agent` needs, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) max_ports: u32,
    pub(crate) ring_bytes: u32,
    pub(crate) max_sockets: u32,
    pub(crate) tracefs: Option<PathBuf>,
    pub(crate) drain_interval: Duration,
    /// When a connection in CLOSE_WAIT or FIN_WAIT2 counts as lingering.
    pub(crate) thresholds: Thresholds,
    /// How often a sock_diag dump counts timewait sockets (a light dump).
    pub(crate) reconcile_interval: Duration,
    /// How often the dump is a full one that repairs the whole table.
    pub(crate) full_reconcile_interval: Duration,
    /// Lingering events logged one by one per interval.
    pub(crate) linger_log_cap: usize,
    /// Aggregate per network namespace.
    pub(crate) per_netns: bool,
    /// The local API's Unix socket.
    pub(crate) socket: PathBuf,
    /// A port without sockets or transitions for this long gives its slot back.
    pub(crate) port_retire_after: Duration,
    /// Ports per role with duration histograms of their own.
    pub(crate) histogram_ports: u32,
    /// States whose durations are observed.
    pub(crate) duration_states: StateSet,
}

impl AgentConfig {
    /// Bytes waiting in the ring before the program wakes the reader.
    pub(crate) fn wakeup_bytes(&self) -> u32 {
        self.ring_bytes / 4
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum ConfigError {
    #[error("{key}: `{value}` is not a size: write bytes or use KiB/MiB/GiB, e.g. 4MiB")]
    Size { key: &'static str, value: String },
    #[error("{key}: `{value}` is not a duration ({reason}): write e.g. 500ms, 30s, 5m")]
    Duration {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("{key}: {value} bytes is not a power of two of at least 4096 and at most 1GiB")]
    RingSize { key: &'static str, value: u64 },
    #[error(
        "{key}: `{value}` is not a TCP state: use names like established, close_wait, fin_wait2, separated by commas"
    )]
    State { key: &'static str, value: String },
}

/// Parses a comma-separated list of states (`syn_sent,established`); empty means none.
pub(crate) fn parse_states(key: &'static str, text: &str) -> Result<StateSet, ConfigError> {
    let mut set = StateSet::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let state = parse_state(part).ok_or_else(|| ConfigError::State {
            key,
            value: part.to_string(),
        })?;
        set.insert(state);
    }
    Ok(set)
}

/// Parses a byte size: `4194304`, `4096KiB`, `4MiB`, `4M`, `1GiB`.
pub(crate) fn parse_bytes(key: &'static str, text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size {
        key,
        value: text.to_string(),
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Parses and checks a ring buffer size: the kernel wants a power of two, page-aligned.
pub(crate) fn parse_ring_size(text: &str) -> Result<u32, ConfigError> {
    const KEY: &str = "--ring-size";
    let bytes = parse_bytes(KEY, text)?;
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(ConfigError::RingSize {
            key: KEY,
            value: bytes,
        });
    }
    Ok(bytes as u32)
}

/// Parses a human duration (`500ms`, `30s`, `5m`, `1h`); zero is refused.
pub(crate) fn parse_duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| ConfigError::Duration {
        key,
        value: text.to_string(),
        reason: e.to_string(),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Duration {
            key,
            value: text.to_string(),
            reason: "must be longer than zero".into(),
        });
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpstate_common::TcpState;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("k", "4096"), Ok(4096));
        assert_eq!(parse_bytes("k", "4KiB"), Ok(4096));
        assert_eq!(parse_bytes("k", "4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("k", "4M"), Ok(4 << 20));
        assert_eq!(parse_bytes("k", "1GiB"), Ok(1 << 30));
        assert!(matches!(
            parse_bytes("k", "4 parsecs"),
            Err(ConfigError::Size { .. })
        ));
        assert!(matches!(
            parse_bytes("k", ""),
            Err(ConfigError::Size { .. })
        ));
        assert!(matches!(
            parse_bytes("k", "99999999999999999999G"),
            Err(ConfigError::Size { .. })
        ));
    }

    #[test]
    fn ring_sizes_must_be_page_multiples_and_powers_of_two() {
        assert_eq!(parse_ring_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        let e = parse_ring_size("3MiB").unwrap_err();
        assert!(e.to_string().contains("--ring-size"), "{e}");
        assert!(parse_ring_size("2048").is_err());
        assert!(parse_ring_size("2GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("k", "500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("k", "30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("k", "5m"), Ok(Duration::from_secs(300)));
        let e = parse_duration("--linger-after", "0s").unwrap_err();
        assert!(e.to_string().contains("--linger-after"), "{e}");
        assert!(e.to_string().contains("longer than zero"), "{e}");
        assert!(parse_duration("k", "soon").is_err());
        assert!(parse_duration("k", "").is_err());
    }

    #[test]
    fn state_lists() {
        let set = parse_states("k", "syn_sent, CLOSE-WAIT,fin_wait_2").unwrap();
        let got: Vec<_> = set.states().collect();
        assert_eq!(
            got,
            vec![TcpState::SynSent, TcpState::FinWait2, TcpState::CloseWait]
        );
        assert_eq!(parse_states("k", "").unwrap(), StateSet::default());
        let e = parse_states("--duration-states", "established,napping").unwrap_err();
        assert!(e.to_string().contains("`napping`"), "{e}");
        assert!(e.to_string().contains("--duration-states"), "{e}");
        assert_eq!(
            parse_states("k", DEFAULT_DURATION_STATES_TEXT).unwrap(),
            crate::model::state::DEFAULT_DURATION_STATES
        );
    }
}
