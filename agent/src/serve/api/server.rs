//! The local API server: a Unix socket (directory 0750, socket 0660, group `tcpstate` when it
//! exists) speaking [`super::protocol`]. A bad request gets an error reply and its connection is
//! closed; nothing a client does reaches the event path (a `watch` that cannot keep up is
//! dropped with a reason).
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustc_hash::FxHashSet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use super::owners::{fill_inodes, owners_of};
use super::protocol::{self as api, Command, Reply, Status, TcpState};
use super::{protocol, rows};
use crate::engine::handle::Shared;
use crate::kernel::procfs;
use crate::model::query::ConnFilter;

/// How long a client may take to send a whole request line.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The group that may use the socket, when it exists.
pub(crate) const GROUP: &str = "tcpstate";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("cannot create the API socket directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} exists and is not a socket: the agent will not remove it; pass --socket with another path"
    )]
    NotASocket { path: String },
    #[error(
        "another agent answers on the API socket {path}: stop it, or pass --socket with another path"
    )]
    InUse { path: String },
    #[error("cannot listen on the API socket {path}: {source}; pass --socket with another path")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// Removes a socket file left by an agent that died (nobody answers on it). Anything else at
/// `path` is the user's: a regular file, a directory or a live agent's socket is refused and
/// left as it is.
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Bind {
                path: shown,
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket { path: shown });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ApiError::InUse { path: shown });
    }
    std::fs::remove_file(path).map_err(|source| ApiError::Bind {
        path: shown,
        source,
    })
}

/// Creates the directory and socket with their modes and group, and returns the listener.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let shown = path.display().to_string();
    let group = nix::unistd::Group::from_name(GROUP).ok().flatten();
    // The directory gets 0750 and the group only when the agent creates it: an existing one
    // (systemd's RuntimeDirectory=, a volume, or /tmp) keeps the mode its owner gave it.
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        if let Some(g) = &group {
            let _ = nix::unistd::chown(dir, None, Some(g.gid));
        }
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: shown.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    if let Some(g) = &group {
        let _ = nix::unistd::chown(path, None, Some(g.gid));
    }
    Ok(listener)
}

/// Serves until `shutdown` turns true, then removes the socket.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    state: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move { handle(stream, state, stop).await });
                }
                Err(e) => tracing::warn!(error = %e, "API accept failed"),
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads one request line: at most MAX_REQUEST bytes, within REQUEST_TIMEOUT.
async fn read_request<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut limited = (&mut *r).take(api::MAX_REQUEST as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
        Err(_) => Err(format!(
            "incomplete request: no newline within {}s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("read error: {e}")),
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) if line.last() != Some(&b'\n') => {
            if line.len() > api::MAX_REQUEST {
                Err(api::BadRequest::TooLarge.to_string())
            } else {
                Err("incomplete request: the connection closed before a newline".into())
            }
        }
        Ok(Ok(_)) => {
            line.pop();
            Ok(Some(line))
        }
    }
}

async fn handle(stream: UnixStream, state: Shared, shutdown: watch::Receiver<bool>) {
    if let Ok(cred) = stream.peer_cred() {
        tracing::debug!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "API client connected");
    }
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let line = match read_request(&mut read).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                let _ = write.write_all(Reply::error(e).line().as_bytes()).await;
                return;
            }
        };
        let request = match api::parse_request(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ = write
                    .write_all(Reply::error(e.to_string()).line().as_bytes())
                    .await;
                return;
            }
        };
        let reply = match request.command {
            Command::Watch { port, state: st } => {
                let st = st.map(|s| s.0);
                stream_watch(&mut write, &state, port, st, shutdown).await;
                return;
            }
            Command::Ports => ports(&state).await,
            Command::Doctor { port } => super::doctor::doctor(&state, port).await,
            Command::Status => status(&state).await,
            Command::Conns {
                port,
                state: st,
                role,
                lingering,
            } => {
                let filter = ConnFilter {
                    port,
                    state: st.map(|s| s.0),
                    role,
                    lingering,
                };
                conns(&state, filter).await
            }
        };
        if write.write_all(reply.line().as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn ports(state: &Shared) -> Reply {
    match state.table.counts().await {
        Some(v) => Reply {
            ports: Some(rows::port_rows(&v)),
            ..Reply::ok()
        },
        None => Reply::error("the agent is shutting down"),
    }
}

async fn conns(state: &Shared, filter: ConnFilter) -> Reply {
    let Some(mut answer) = state.table.conns(filter).await else {
        return Reply::error("the agent is shutting down");
    };
    fill_inodes(&mut answer.conns).await;
    let mut conns = rows::conn_rows(&answer);
    let inodes: FxHashSet<u32> = conns.iter().map(|r| r.inode).filter(|i| *i != 0).collect();
    let found = owners_of(inodes).await;
    for r in &mut conns {
        if let Some(owners) = found.get(&r.inode) {
            r.owners = rows::owner_rows(owners);
        }
    }
    Reply {
        conns: Some(conns),
        ..Reply::ok()
    }
}

async fn status(state: &Shared) -> Reply {
    let Some(v) = state.table.counts().await else {
        return Reply::error("the agent is shutting down");
    };
    let reader = state.reader.load();
    let r = v.table.reconcile;
    Reply {
        status: Some(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: protocol::API_VERSION,
            uptime_seconds: state.started.elapsed().as_secs_f64(),
            kernel: procfs::kernel_release(),
            events_total: reader.events,
            events_per_second: state.rate.lock().map(|r| *r).unwrap_or(0.0),
            events_lost_kernel: state.losses.read().total,
            events_lost_agent: reader.lost_agent,
            tracked_sockets: v.table.tracked_sockets as u64,
            lingering: v.linger.current.iter().map(|(_, a)| a.count).sum(),
            ring_buffer_bytes: state.ring_bytes,
            reconciliations: r.runs,
            last_reconcile_seconds_ago: (r.runs > 0)
                .then(|| v.now_ns.saturating_sub(r.last_ns) as f64 / 1e9),
        }),
        ..Reply::ok()
    }
}

async fn stream_watch(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    state: &Shared,
    port: Option<u16>,
    st: Option<TcpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rx = state.watch.subscribe();
    // Tell the client it is subscribed, so it can start what it wants to watch.
    if write
        .write_all(Reply::ok().line().as_bytes())
        .await
        .is_err()
    {
        return;
    }
    loop {
        let t = tokio::select! {
            r = rx.recv() => r,
            _ = shutdown.changed() => {
                let _ = write.write_all(Reply::error("the agent is shutting down").line().as_bytes()).await;
                return;
            }
        };
        match t {
            Ok(t) => {
                if port.is_some_and(|p| t.local.port() != p && t.remote.port() != p) {
                    continue;
                }
                if st.is_some_and(|s| t.old != s && t.new != s) {
                    continue;
                }
                let reply = Reply {
                    event: Some(rows::event_row(&t)),
                    ..Reply::ok()
                };
                if write.write_all(reply.line().as_bytes()).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let _ = write
                    .write_all(
                        Reply::error(format!(
                            "disconnected: this watch could not keep up and {n} transitions were dropped for it; filter with --port or --state"
                        ))
                        .line()
                        .as_bytes(),
                    )
                    .await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_sets_modes_on_what_it_creates_only() {
        let base = std::env::temp_dir().join(format!("tcpstate-bind-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        // An existing directory keeps its mode.
        let _l = bind(&base.join("a.sock")).unwrap();
        assert_eq!(
            std::fs::metadata(&base).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let sock_mode = std::fs::metadata(base.join("a.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(sock_mode & 0o777, 0o660);
        // A directory it creates gets 0750.
        let _l2 = bind(&base.join("new/b.sock")).unwrap();
        assert_eq!(
            std::fs::metadata(base.join("new"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o750
        );
        // A stale socket file (nobody listening) is replaced.
        drop(_l);
        assert!(bind(&base.join("a.sock")).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn bind_refuses_what_is_not_a_stale_socket_and_leaves_it() {
        let base = std::env::temp_dir().join(format!("tcpstate-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        // A regular file given by mistake survives, byte for byte.
        let file = base.join("notes.txt");
        std::fs::write(&file, "precious").unwrap();
        let e = bind(&file).unwrap_err();
        assert!(matches!(e, ApiError::NotASocket { .. }), "{e}");
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert!(e.to_string().contains("--socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        // So does a directory.
        let dir = base.join("dir");
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(bind(&dir), Err(ApiError::NotASocket { .. })));
        assert!(dir.is_dir());
        // A live agent's socket is not stolen.
        let live = base.join("live.sock");
        let _l = bind(&live).unwrap();
        assert!(matches!(bind(&live), Err(ApiError::InUse { .. })));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn request_lines_are_bounded_in_size_and_time() {
        let mut ok = BufReader::new(&b"{\"v\":1}\nrest"[..]);
        assert_eq!(read_request(&mut ok).await, Ok(Some(b"{\"v\":1}".to_vec())));
        let big = vec![b'x'; api::MAX_REQUEST + 10];
        let mut r = BufReader::new(&big[..]);
        assert!(
            read_request(&mut r)
                .await
                .unwrap_err()
                .contains("larger than")
        );
        let mut half = BufReader::new(&b"{\"v\":1"[..]);
        assert!(
            read_request(&mut half)
                .await
                .unwrap_err()
                .contains("before a newline")
        );
        let mut empty = BufReader::new(&b""[..]);
        assert_eq!(read_request(&mut empty).await, Ok(None));
    }
}
