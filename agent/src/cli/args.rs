//! The client commands' flags, typed: a state or role that does not exist is refused here.
use std::path::PathBuf;

use clap::Args;

use crate::serve::api::protocol::{DEFAULT_SOCKET, Role, StateName};

/// Flags every client command takes.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The agent's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "TCPSTATE_SOCKET")]
    pub(crate) socket: PathBuf,
    /// Machine-readable output (stable field names).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Only connections of this service port.
    #[arg(long, value_name = "PORT")]
    pub(crate) port: Option<u16>,
    /// Only connections in this state (close_wait, CLOSE_WAIT, fin_wait2, ...).
    #[arg(long, value_name = "STATE")]
    pub(crate) state: Option<StateName>,
    /// Only this role: server or client.
    #[arg(long, value_name = "ROLE")]
    pub(crate) role: Option<Role>,
    /// Only lingering connections.
    #[arg(long)]
    pub(crate) lingering: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Only transitions where either end uses this port.
    #[arg(long, value_name = "PORT")]
    pub(crate) port: Option<u16>,
    /// Only transitions into or out of this state.
    #[arg(long, value_name = "STATE")]
    pub(crate) state: Option<StateName>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Only findings about this service port.
    #[arg(long, value_name = "PORT")]
    pub(crate) port: Option<u16>,
}
