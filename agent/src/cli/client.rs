//! The `tcpstate` CLI's side of the local API: connect, send a request, read replies.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;

use crate::serve::api::protocol::{self as api, Command, Reply, Request};

#[derive(Debug, Error)]
pub(crate) enum ClientError {
    #[error(
        "no agent socket at {0}: is `tcpstate agent` running? Start it (sudo tcpstate agent) or pass --socket PATH"
    )]
    NoSocket(String),
    #[error(
        "permission denied on {0}: run as root, or add your user to the `tcpstate` group (usermod -aG tcpstate $USER) and log in again"
    )]
    Permission(String),
    #[error("the agent is not running (nobody answers on {0}): start it with sudo tcpstate agent")]
    Refused(String),
    #[error("talking to the agent on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the agent sent a reply this CLI cannot read ({0}): use the tcpstate CLI of the same release as the agent"
    )]
    Garbled(String),
    #[error("the agent says: {0}")]
    Agent(String),
}

/// A connection to the agent.
pub(crate) struct Client {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub(crate) fn connect(path: &Path) -> Result<Client, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClientError::NoSocket(shown.clone()),
            std::io::ErrorKind::PermissionDenied => ClientError::Permission(shown.clone()),
            std::io::ErrorKind::ConnectionRefused => ClientError::Refused(shown.clone()),
            _ => ClientError::Io {
                path: shown.clone(),
                source: e,
            },
        })?;
        let writer = stream.try_clone().map_err(|source| ClientError::Io {
            path: shown.clone(),
            source,
        })?;
        Ok(Client {
            path: shown,
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub(crate) fn send(&mut self, command: Command) -> Result<(), ClientError> {
        let mut line = serde_json::to_string(&Request {
            v: api::API_VERSION,
            command,
        })
        .expect("requests serialise");
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.io(source))
    }

    /// The next reply line; Ok(None) when the agent closed the connection.
    pub(crate) fn next_reply(&mut self) -> Result<Option<Reply>, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| self.io(source))?;
        if n == 0 {
            return Ok(None);
        }
        let reply: Reply =
            serde_json::from_str(line.trim()).map_err(|e| ClientError::Garbled(e.to_string()))?;
        if reply.v != api::API_VERSION {
            return Err(ClientError::Garbled(format!(
                "API v{} from the agent, v{} here",
                reply.v,
                api::API_VERSION
            )));
        }
        if !reply.ok {
            return Err(ClientError::Agent(reply.error.unwrap_or_default()));
        }
        Ok(Some(reply))
    }

    /// One request, one reply.
    pub(crate) fn ask(&mut self, command: Command) -> Result<Reply, ClientError> {
        self.send(command)?;
        self.next_reply()?
            .ok_or_else(|| ClientError::Agent("the agent closed the connection".into()))
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }
}
