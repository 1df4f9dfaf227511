//! The local API's protocol: one JSON request per line, one JSON reply per line (a `watch`
//! streams one event per line). Versioned: every message carries `v`; an agent and a CLI of
//! different versions refuse each other with a message that says so.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub(crate) use crate::model::state::parse_state;
pub use crate::model::table::conn::Role;
pub use tcpstate_common::TcpState;

/// The protocol version this build speaks.
pub const API_VERSION: u32 = 1;
/// Largest request line accepted, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/run/tcpstate/tcpstate.sock";

/// A request: `{"v":1,"cmd":"conns","port":8080,"lingering":true}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Per service port and role: counts per state, lingering, oldest lingering age.
    Ports,
    /// The connections, filtered.
    Conns {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// A state label (`close_wait`) or name (`CLOSE_WAIT`); an unknown one is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<StateName>,
        /// `server` or `client`; anything else is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<Role>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        lingering: bool,
    },
    /// Live transitions until the client goes away.
    Watch {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<StateName>,
    },
    /// The agent's own health.
    Status,
    /// Findings, the most severe first, and the destinations using the most ephemeral ports.
    Doctor {
        /// Only findings about this service port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
}

/// A TCP state on the wire: written as its label (`close_wait`); read from a label or a name
/// (`CLOSE_WAIT`, `CLOSE-WAIT`, `estab`). An unknown state fails the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateName(pub TcpState);

impl std::str::FromStr for StateName {
    type Err = String;

    fn from_str(s: &str) -> Result<StateName, String> {
        parse_state(s).map(StateName).ok_or_else(|| {
            format!("unknown state `{s}`: use a name like established, close_wait or fin_wait2")
        })
    }
}

impl Serialize for StateName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.label())
    }
}

impl<'de> Deserialize<'de> for StateName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StateName, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A reply, or one event of a watch. Exactly one of the payload fields is set when `ok`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortRow>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conns: Option<Vec<ConnRow>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doctor: Option<DoctorReport>,
}

impl Reply {
    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            v: API_VERSION,
            ok: false,
            error: Some(message.into()),
            ..Reply::default()
        }
    }

    pub fn ok() -> Reply {
        Reply {
            v: API_VERSION,
            ok: true,
            ..Reply::default()
        }
    }

    /// The reply as one line, newline included.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("replies always serialise");
        s.push('\n');
        s
    }
}

/// One (service port, role) row of `ports`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortRow {
    /// The port number, or `other`.
    pub port: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// Sockets per state label, states with none left out.
    pub states: BTreeMap<String, u64>,
    pub total: u64,
    /// Lingering in CLOSE_WAIT and FIN_WAIT2 together.
    pub lingering: u64,
    pub lingering_close_wait: u64,
    pub lingering_fin_wait2: u64,
    /// Time in state of the oldest lingering connection, 0 when none.
    pub oldest_lingering_seconds: f64,
    /// Connections that ended since the port got its slot, and of those, by a reset.
    #[serde(default)]
    pub closes: u64,
    #[serde(default)]
    pub resets: u64,
    /// Failed connects (clients: SYN_SENT -> CLOSE) since the port got its slot.
    #[serde(default)]
    pub connect_failures: u64,
}

/// A process holding a socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRow {
    pub pid: u32,
    pub command: String,
    /// The process's cgroup path.
    #[serde(default)]
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// One connection of `conns`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnRow {
    pub local: String,
    pub remote: String,
    /// State label: `close_wait`.
    pub state: String,
    pub age_seconds: f64,
    /// Known from a sock_diag dump: the age is a lower bound.
    pub age_is_lower_bound: bool,
    pub role: String,
    pub service_port: u16,
    pub netns: u32,
    pub lingering: bool,
    /// Socket inode, 0 until a sock_diag dump matched it.
    pub inode: u32,
    /// Processes holding the socket (empty when unknown).
    pub owners: Vec<OwnerRow>,
    /// The pid that connected it (client sockets), 0 when unknown.
    pub opened_by_pid: u32,
}

/// One transition of `watch`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    /// Wall clock, milliseconds since the epoch.
    pub time_ms: u64,
    pub from: String,
    pub to: String,
    pub local: String,
    pub remote: String,
    /// Seconds spent in `from`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_seconds: Option<f64>,
    pub netns: u32,
    /// The process that made the transition (connect, listen, close, shutdown); 0 for
    /// transitions the kernel makes on its own (in softirq: a packet arrived).
    pub pid: u32,
}

/// `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub api_version: u32,
    pub uptime_seconds: f64,
    pub kernel: String,
    pub events_total: u64,
    /// Over the last few seconds.
    pub events_per_second: f64,
    pub events_lost_kernel: u64,
    pub events_lost_agent: u64,
    pub tracked_sockets: u64,
    pub lingering: u64,
    pub ring_buffer_bytes: u64,
    pub reconciliations: u64,
    /// Seconds since the last sock_diag reconciliation, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile_seconds_ago: Option<f64>,
}

/// `doctor`: what is wrong, the most severe first. Field names are stable.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DoctorReport {
    pub findings: Vec<FindingRow>,
    /// The destinations with the most ephemeral ports in use, the highest share first.
    pub destinations: Vec<DestinationRow>,
    /// Connections in the agent's table when it looked.
    pub tracked_sockets: u64,
}

/// One finding of `doctor`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FindingRow {
    /// `critical` or `warning`.
    pub severity: String,
    /// `close_wait_leak`, `fin_wait2_held`, `fin_wait2_orphaned`, `ephemeral_ports_exhausting`,
    /// `resets` or `connect_failures`.
    pub kind: String,
    /// The service port, or `other`.
    pub port: String,
    pub role: String,
    /// Network namespaces of the sockets concerned, when known.
    pub netns: Vec<u32>,
    /// Sockets, resets or failed connects.
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_seconds: Option<f64>,
    /// Of the closes, the connects or the port range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    /// For ephemeral port exhaustion: the destination and the size of the range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_size: Option<u64>,
    /// The peer addresses most concerned.
    pub peers: Vec<PeerRow>,
    /// Processes holding the sockets, or the listener of a server port.
    pub owners: Vec<OwnerRow>,
    /// Processes that opened the connections concerned (clients), when no holder is known.
    pub opened_by: Vec<OwnerRow>,
    pub what: String,
    pub why: String,
    pub fix: String,
}

/// A peer address and how many of a finding's sockets it has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub address: String,
    pub count: u64,
}

/// Ephemeral ports in use toward one destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRow {
    pub destination: String,
    /// The client port key: the destination's port, or `other`.
    pub port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub in_use: u64,
    pub range_size: u64,
    pub share: f64,
}

/// Why a request line was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    TooLarge,
    Malformed(String),
    Version(u32),
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRequest::TooLarge => write!(f, "request larger than {MAX_REQUEST} bytes"),
            BadRequest::Malformed(e) => write!(
                f,
                "malformed request ({e}): send one JSON object per line, e.g. {{\"v\":{API_VERSION},\"cmd\":\"ports\"}}"
            ),
            BadRequest::Version(v) => write!(
                f,
                "version mismatch: this agent speaks API v{API_VERSION}, the request is v{v}; use the tcpstate CLI of the same release"
            ),
        }
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    if line.len() > MAX_REQUEST {
        return Err(BadRequest::TooLarge);
    }
    // Check the version first, so a newer client's unknown command reads as a version problem.
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| BadRequest::Malformed(e.to_string()))?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(API_VERSION) => {}
        Some(v) => return Err(BadRequest::Version(v as u32)),
        None => return Err(BadRequest::Malformed("no \"v\" field".into())),
    }
    serde_json::from_value(value).map_err(|e| BadRequest::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = parse_request(
            br#"{"v":1,"cmd":"conns","port":8080,"state":"close_wait","lingering":true}"#,
        )
        .unwrap();
        assert_eq!(
            r.command,
            Command::Conns {
                port: Some(8080),
                state: Some(StateName(TcpState::CloseWait)),
                role: None,
                lingering: true
            }
        );
        // Names as ss and the kernel write them are read too; roles are typed.
        let r = parse_request(br#"{"v":1,"cmd":"conns","state":"CLOSE-WAIT","role":"client"}"#)
            .unwrap();
        assert_eq!(
            r.command,
            Command::Conns {
                port: None,
                state: Some(StateName(TcpState::CloseWait)),
                role: Some(Role::Client),
                lingering: false
            }
        );
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_request(back.as_bytes()).unwrap(), r);
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"ports"}"#).unwrap().command,
            Command::Ports
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"status"}"#).unwrap().command,
            Command::Status
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"doctor","port":8080}"#)
                .unwrap()
                .command,
            Command::Doctor { port: Some(8080) }
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"doctor"}"#).unwrap().command,
            Command::Doctor { port: None }
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(matches!(
            parse_request(b"hello"),
            Err(BadRequest::Malformed(_))
        ));
        assert!(matches!(
            parse_request(br#"{"cmd":"ports"}"#),
            Err(BadRequest::Malformed(_))
        ));
        assert!(matches!(
            parse_request(br#"{"v":1,"cmd":"reboot"}"#),
            Err(BadRequest::Malformed(_))
        ));
        assert!(matches!(
            parse_request(br#"{"v":1,"cmd":"conns","port":70000}"#),
            Err(BadRequest::Malformed(_))
        ));
        assert_eq!(
            parse_request(br#"{"v":2,"cmd":"ports"}"#),
            Err(BadRequest::Version(2))
        );
        assert_eq!(
            parse_request(&vec![b' '; MAX_REQUEST + 1]),
            Err(BadRequest::TooLarge)
        );
        assert!(BadRequest::Version(2).to_string().contains("v1"));
        // A filter that names no state or role is refused, not matched against nothing.
        let e = parse_request(br#"{"v":1,"cmd":"conns","state":"napping"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown state `napping`"), "{e}");
        let e = parse_request(br#"{"v":1,"cmd":"conns","role":"servant"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown role `servant`"), "{e}");
        let e = parse_request(br#"{"v":1,"cmd":"watch","state":"napping"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown state"), "{e}");
    }

    #[test]
    fn replies_leave_out_what_they_do_not_carry() {
        let line = Reply::error("nope").line();
        assert_eq!(line, "{\"v\":1,\"ok\":false,\"error\":\"nope\"}\n");
        let back: Reply = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(back.error.as_deref(), Some("nope"));
    }
}
