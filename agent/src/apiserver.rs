//! The local API server: a Unix socket (directory 0750, socket 0660, group `tcpstate` when it
//! exists) speaking [`crate::api`]. A bad request gets an error reply and its connection is
//! closed; nothing a client does reaches the event path (a `watch` that cannot keep up is
//! dropped with a reason).
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashSet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use crate::api::{self, Command, ConnRow, EventRow, OwnerRow, PortRow, Reply, Status};
use crate::decode::Transition;
use crate::http::{AppState, View};
use crate::owner;
use crate::reader::ReaderStats;
use tcpstate_common::TcpState;

/// How long a client may take to send a whole request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The group that may use the socket, when it exists.
pub const GROUP: &str = "tcpstate";

/// Filter of a `conns` request, resolved.
#[derive(Clone, Debug, Default)]
pub struct ConnFilter {
    pub port: Option<u16>,
    pub state: Option<TcpState>,
    pub role: Option<String>,
    pub lingering: bool,
}

/// What the server needs from the rest of the agent.
#[derive(Clone)]
pub struct ApiState {
    pub app: AppState,
    pub watch: broadcast::Sender<Transition>,
    pub started: Instant,
    /// Events per second over the last seconds, kept by the daemon's sampler.
    pub rate: Arc<std::sync::Mutex<f64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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

pub use crate::config::parse_state;

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
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
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
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    state: ApiState,
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

async fn handle(stream: UnixStream, state: ApiState, shutdown: watch::Receiver<bool>) {
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
        // A state filter that names no state ends the conversation like any bad request.
        let filter_state = match &request.command {
            Command::Watch { state: Some(s), .. } | Command::Conns { state: Some(s), .. } => {
                match parse_state(s) {
                    Some(st) => Some(st),
                    None => {
                        let e = Reply::error(format!("unknown state `{s}`"));
                        let _ = write.write_all(e.line().as_bytes()).await;
                        return;
                    }
                }
            }
            _ => None,
        };
        let reply = match request.command {
            Command::Watch { port, .. } => {
                stream_watch(&mut write, &state, port, filter_state, shutdown).await;
                return;
            }
            Command::Ports => ports(&state).await,
            Command::Status => status(&state).await,
            Command::Conns {
                port,
                role,
                lingering,
                ..
            } => {
                let filter = ConnFilter {
                    port,
                    state: filter_state,
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

async fn view(state: &ApiState) -> Option<View> {
    state.app.table.view().await
}

/// The `ports` rows of a view, sorted by lingering, then by total, both descending.
pub fn port_rows(view: &View) -> Vec<PortRow> {
    let mut rows: Vec<PortRow> = view
        .table
        .ports
        .iter()
        .map(|(role, key, stats)| {
            let states: std::collections::BTreeMap<String, u64> = TcpState::ALL
                .iter()
                .filter(|s| stats.current[s.index()] > 0)
                .map(|s| (s.label().to_string(), stats.current[s.index()]))
                .collect();
            let mut row = PortRow {
                port: key.label(),
                role: role.label().to_string(),
                netns: key.netns(),
                total: states.values().sum(),
                states,
                ..PortRow::default()
            };
            for ((r, k, st), agg) in &view.linger.current {
                if r == role && k == key && agg.count > 0 {
                    match st {
                        TcpState::CloseWait => row.lingering_close_wait += agg.count,
                        _ => row.lingering_fin_wait2 += agg.count,
                    }
                    row.lingering += agg.count;
                    let age = view.now_ns.saturating_sub(agg.oldest_since_ns) as f64 / 1e9;
                    row.oldest_lingering_seconds = row.oldest_lingering_seconds.max(age);
                }
            }
            row
        })
        .filter(|r| r.total > 0 || r.lingering > 0)
        .collect();
    rows.sort_by(|a, b| {
        b.lingering
            .cmp(&a.lingering)
            .then(b.total.cmp(&a.total))
            .then(a.port.cmp(&b.port))
            .then(a.role.cmp(&b.role))
    });
    rows
}

async fn ports(state: &ApiState) -> Reply {
    match view(state).await {
        Some(v) => Reply {
            ports: Some(port_rows(&v)),
            ..Reply::ok()
        },
        None => Reply::error("the agent is shutting down"),
    }
}

async fn conns(state: &ApiState, filter: ConnFilter) -> Reply {
    let Some(mut rows) = state.app.table.conns(filter).await else {
        return Reply::error("the agent is shutting down");
    };
    // Sockets opened since the last reconciliation have no inode yet: ask sock_diag, in just
    // the namespaces concerned, off the async threads.
    let unknown: FxHashSet<u32> = rows
        .iter()
        .filter(|r| r.inode == 0)
        .map(|r| r.netns)
        .collect();
    if !unknown.is_empty()
        && let Ok(found) = tokio::task::spawn_blocking(move || inodes_by_tuple(&unknown)).await
    {
        for r in &mut rows {
            if r.inode == 0
                && let Some(inode) = found.get(&(r.netns, r.local.clone(), r.remote.clone()))
            {
                r.inode = *inode;
            }
        }
    }
    // Owners, off the async threads: one /proc pass for every inode asked about.
    let inodes: FxHashSet<u32> = rows.iter().map(|r| r.inode).filter(|i| *i != 0).collect();
    if !inodes.is_empty()
        && let Ok(found) =
            tokio::task::spawn_blocking(move || owner::scan(Path::new("/proc"), &inodes)).await
    {
        for r in &mut rows {
            if let Some(owners) = found.get(&r.inode) {
                r.owners = owners
                    .iter()
                    .map(|o| OwnerRow {
                        pid: o.pid,
                        command: o.comm.clone(),
                        cgroup: o.cgroup.clone(),
                        container: o.container.clone(),
                    })
                    .collect();
            }
        }
    }
    Reply {
        conns: Some(rows),
        ..Reply::ok()
    }
}

/// Inodes of the full sockets of some namespaces (0: the agent's own), by (netns, local, remote).
fn inodes_by_tuple(
    namespaces: &FxHashSet<u32>,
) -> rustc_hash::FxHashMap<(u32, String, String), u32> {
    let mut out = rustc_hash::FxHashMap::default();
    for (ino, path) in crate::sockdiag::namespaces(Path::new("/proc")) {
        let wanted =
            namespaces.contains(&ino) || (namespaces.contains(&0) && path.ends_with("self/ns/net"));
        if !wanted {
            continue;
        }
        let tag = if namespaces.contains(&ino) { ino } else { 0 };
        if let Ok(sockets) = crate::sockdiag::dump_namespace(ino, &path) {
            for d in sockets.into_iter().filter(|d| d.inode != 0) {
                out.insert((tag, d.local.to_string(), d.remote.to_string()), d.inode);
            }
        }
    }
    out
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_default()
}

async fn status(state: &ApiState) -> Reply {
    let Some(v) = view(state).await else {
        return Reply::error("the agent is shutting down");
    };
    let stats: &ReaderStats = &state.app.reader;
    let (lost_kernel, _) = state.app.kernel_losses();
    let r = v.table.reconcile;
    Reply {
        status: Some(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: api::API_VERSION,
            uptime_seconds: state.started.elapsed().as_secs_f64(),
            kernel: kernel_release(),
            events_total: stats.events.load(Ordering::Relaxed),
            events_per_second: state.rate.lock().map(|r| *r).unwrap_or(0.0),
            events_lost_kernel: lost_kernel,
            events_lost_agent: stats.lost_agent.load(Ordering::Relaxed),
            tracked_sockets: v.table.tracked_sockets as u64,
            lingering: v.linger.current.iter().map(|(_, a)| a.count).sum(),
            ring_buffer_bytes: state.app.ring_bytes,
            reconciliations: r.runs,
            last_reconcile_seconds_ago: (r.runs > 0)
                .then(|| v.now_ns.saturating_sub(r.last_ns) as f64 / 1e9),
        }),
        ..Reply::ok()
    }
}

/// Wall clock milliseconds of a CLOCK_MONOTONIC timestamp.
fn wall_ms(ts_ns: u64) -> u64 {
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let now_mono = crate::daemon::monotonic_ns();
    now_wall.saturating_sub(now_mono.saturating_sub(ts_ns)) / 1_000_000
}

pub fn event_row(t: &Transition) -> EventRow {
    EventRow {
        time_ms: wall_ms(t.ts_ns),
        from: t.old.label().to_string(),
        to: t.new.label().to_string(),
        local: t.local.to_string(),
        remote: t.remote.to_string(),
        spent_seconds: t.prev_state_ns.map(|ns| ns as f64 / 1e9),
        netns: t.netns,
        pid: t.pid,
    }
}

async fn stream_watch(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    state: &ApiState,
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
                    event: Some(event_row(&t)),
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

/// Builds `conns` rows from the table (the owners are filled in by the server).
pub fn conn_rows(table: &crate::table::Table, filter: &ConnFilter, now_ns: u64) -> Vec<ConnRow> {
    let mut rows: Vec<ConnRow> = table
        .conns()
        .filter(|(_, c)| filter.port.is_none_or(|p| c.service_port == p))
        .filter(|(_, c)| filter.state.is_none_or(|s| c.state == s))
        .filter(|(_, c)| filter.role.as_deref().is_none_or(|r| c.role.label() == r))
        .filter(|(_, c)| !filter.lingering || c.lingering)
        .map(|(_, c)| ConnRow {
            local: c.local.to_string(),
            remote: c.remote.to_string(),
            state: c.state.label().to_string(),
            age_seconds: now_ns.saturating_sub(c.since_ns) as f64 / 1e9,
            age_is_lower_bound: c.seeded,
            role: c.role.label().to_string(),
            service_port: c.service_port,
            netns: c.netns,
            lingering: c.lingering,
            inode: c.inode,
            owners: Vec::new(),
            opened_by_pid: c.pid,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.lingering
            .cmp(&a.lingering)
            .then(b.age_seconds.total_cmp(&a.age_seconds))
            .then(a.local.cmp(&b.local))
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_by_label_or_name() {
        assert_eq!(parse_state("close_wait"), Some(TcpState::CloseWait));
        assert_eq!(parse_state("CLOSE-WAIT"), Some(TcpState::CloseWait));
        assert_eq!(parse_state("FIN_WAIT_2"), Some(TcpState::FinWait2));
        assert_eq!(parse_state("estab"), Some(TcpState::Established));
        assert_eq!(parse_state("napping"), None);
    }

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
