//! Start, run and stop the agent: the only module that uses every layer. It checks privileges,
//! loads the program ([`crate::kernel`]), starts the tasks that own running state
//! ([`crate::engine`]) and both servers ([`crate::serve`]), and stops them in order.
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::{broadcast, mpsc, watch};
use tracing_subscriber::EnvFilter;

use crate::config::AgentConfig;
use crate::config::flags::LogFormat;
use crate::engine::handle::{Shared, TableHandle};
use crate::engine::stats::KernelLosses;
use crate::engine::table_task::TableTask;
use crate::engine::{alert_log, ebpf_log, reconcile_task, stats};
use crate::kernel::btf::{self, Btf, NetnsOffsets};
use crate::kernel::privileges::{self, PrivilegeError};
use crate::kernel::probe::{self, BpfError, Loaded};
use crate::kernel::ring::{self, Batch, ReaderStats};
use crate::kernel::{procfs, tracefs};
use crate::model::linger::Detector;
use crate::model::table::Table;
use crate::serve::api::server::{self as api_server, ApiError};
use crate::serve::{http, metrics};

#[derive(Debug, Error)]
pub(crate) enum AgentError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("cannot listen on {addr}: {source}; pass --listen with a free address and port")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Queue depth, in batches, between the reader and the table task.
const BATCH_QUEUE: usize = 64;
/// Transitions a `watch` subscriber may fall behind before it is dropped.
const WATCH_QUEUE: usize = 16_384;

/// Installs the logger, tunes the allocator, and runs the agent on its own runtime until
/// SIGINT or SIGTERM. The exit code says how it ended.
pub fn main(cfg: AgentConfig, log_level: &str, log_format: LogFormat) -> ExitCode {
    let filter = match EnvFilter::try_new(log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "tcpstate: --log-level `{log_level}` is not a valid filter ({e}): use error, warn, info, debug or trace"
            );
            return ExitCode::from(2);
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    crate::memory::tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcpstate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpstate: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM; returns once the program is detached.
pub(crate) async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    // Both handlers are installed before anything starts: a signal that arrives while the agent
    // starts (once /metrics answers, a supervisor may well send one) waits for the clean
    // shutdown below instead of killing the process with the program attached.
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |kind, what| signal(kind).map_err(|source| AgentError::Io { what, source });
    let mut sigterm = handler(SignalKind::terminate(), "installing the SIGTERM handler")?;
    let mut sigint = handler(SignalKind::interrupt(), "installing the SIGINT handler")?;
    let agent = start(cfg).await?;
    tokio::select! {
        _ = sigint.recv() => tracing::info!("SIGINT received, shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
    agent.stop().await;
    Ok(())
}

/// A running agent.
pub(crate) struct Agent {
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    probe: probe::Probe,
}

/// Starts every part of the agent and returns once the program is attached and both servers
/// listen.
pub(crate) async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
    privileges::check()?;
    for (cap, lost) in privileges::missing_optional() {
        tracing::warn!(capability = cap, "without {cap}: {lost}");
    }
    privileges::raise_memlock();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AgentError::Io {
        what: "reading the listening address",
        source,
    })?;
    let api_listener = api_server::bind(&cfg.socket)?;
    let (loaded, netns) = load_program(&cfg)?;
    tracing::info!(
        listen = %addr,
        ring_bytes = cfg.ring_bytes,
        max_ports = cfg.max_ports,
        close_wait_after = ?cfg.thresholds.close_wait,
        fin_wait2_after = ?cfg.thresholds.fin_wait2,
        "attached to sock:inet_sock_set_state"
    );
    let (shutdown, stop) = watch::channel(false);
    let Loaded {
        probe,
        events,
        drops,
        recursion,
        logger,
    } = loaded;
    let logger = ebpf_log::register(logger).map_err(|source| AgentError::Io {
        what: "polling the eBPF log map",
        source,
    })?;
    let mut tasks = vec![tokio::spawn(ebpf_log::run(logger, stop.clone()))];
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_QUEUE);
    let reader = Arc::new(ReaderStats::default());
    let (stats, drain, stop_reader) = (reader.clone(), cfg.drain_interval, stop.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = ring::run(events, batch_tx, stats, drain, stop_reader).await {
            tracing::error!(error = %e, "ring buffer reader failed");
        }
    }));
    let mut cfg = cfg;
    if !recursion.counted() && cfg.full_reconcile_interval > cfg.reconcile_interval {
        // Light dumps trust the events whenever no loss is reported; here some cannot be.
        tracing::info!(
            "this kernel does not count the program runs it skips (recursion_misses, Linux 5.12 and later): every dump is a full one, every {:?}",
            cfg.reconcile_interval
        );
        cfg.full_reconcile_interval = cfg.reconcile_interval;
    }
    let losses = KernelLosses::new(drops, recursion);
    let (shared, engine) = spawn_engine(&cfg, netns, batch_rx, reader, losses, &stop);
    tasks.extend(engine);
    tasks.extend(serve(cfg, listener, api_listener, shared, &stop));
    Ok(Agent {
        shutdown,
        tasks,
        probe,
    })
}

/// Spawns the tasks that own running state: the table task, the alert log, the reconciler and
/// the rate sampler. Returns what the servers share and the tasks.
fn spawn_engine(
    cfg: &AgentConfig,
    netns: Option<NetnsOffsets>,
    batches: mpsc::Receiver<Batch>,
    reader: Arc<ReaderStats>,
    losses: KernelLosses,
    stop: &watch::Receiver<bool>,
) -> (Shared, Vec<tokio::task::JoinHandle<()>>) {
    let (req_tx, req_rx) = mpsc::channel(16);
    let (alert_tx, alert_rx) = mpsc::channel(64);
    let shared = Shared {
        table: TableHandle(req_tx.clone()),
        reader,
        losses,
        ring_bytes: u64::from(cfg.ring_bytes),
        ready: Arc::new(AtomicBool::new(false)),
        watch: broadcast::channel(WATCH_QUEUE).0,
        rate: Arc::new(Mutex::new(0.0)),
        started: std::time::Instant::now(),
    };
    let table_task = TableTask {
        table: table(cfg, netns),
        detector: Detector::new(cfg.thresholds),
        batches,
        requests: req_rx,
        alert_tx,
        log_cap: cfg.linger_log_cap,
        watch_tx: shared.watch.clone(),
        ready: shared.ready.clone(),
        port_retire_ns: cfg.port_retire_after.as_nanos() as u64,
    };
    let losses = shared.losses.clone();
    let activity = shared.reader.clone();
    let agent_losses = shared.reader.clone();
    let (rate_in, rate_out) = (shared.reader.clone(), shared.rate.clone());
    let tasks = vec![
        tokio::spawn(table_task.run()),
        tokio::spawn(alert_log::run(alert_rx)),
        tokio::spawn(reconcile_task::run(
            cfg.reconcile_interval,
            cfg.full_reconcile_interval,
            // A batch the table task could not take is a loss too: the table missed it.
            move || losses.read().total + agent_losses.load().lost_agent,
            move || activity.load().events,
            req_tx,
            stop.clone(),
        )),
        tokio::spawn(stats::sample_rate(rate_in, rate_out, stop.clone())),
    ];
    (shared, tasks)
}

/// Reads the tracepoint's layout and the namespace offsets, loads and attaches the program.
fn load_program(cfg: &AgentConfig) -> Result<(Loaded, Option<NetnsOffsets>), AgentError> {
    let tracefs = tracefs::locate(cfg.tracefs.as_deref())?;
    let layout = tracefs::read_layout(&tracefs)?;
    tracing::debug!(?layout, tracefs = %tracefs.display(), "tracepoint layout");
    let netns = match Btf::from_file(std::path::Path::new(btf::VMLINUX))
        .and_then(|btf| btf::netns_offsets(&btf))
    {
        Ok(off) => Some(off),
        Err(e) => {
            tracing::warn!(error = %e, "no socket namespace offsets from BTF: events carry netns 0 and --per-netns cannot split them");
            None
        }
    };
    let loaded = probe::load(
        layout,
        &probe::Options {
            ring_bytes: cfg.ring_bytes,
            max_sockets: cfg.max_sockets,
            wakeup_bytes: cfg.wakeup_bytes(),
            netns,
        },
    )?;
    let variant = env!("TCPSTATE_BENCH_VARIANT");
    if !variant.is_empty() {
        tracing::warn!(
            variant,
            "benchmark-only build: the eBPF program leaves out part of its work; \
             rebuild without TCPSTATE_BENCH_VARIANT"
        );
    }
    Ok((loaded, netns))
}

/// The connection table as the configuration and the kernel's capabilities want it.
fn table(cfg: &AgentConfig, netns: Option<NetnsOffsets>) -> Table {
    Table::new(cfg.max_ports as usize, procfs::ephemeral_range())
        .per_netns(cfg.per_netns && netns.is_some())
        .netns_in_events(netns.is_some())
        .histogram_ports(cfg.histogram_ports as usize)
        .duration_states(cfg.duration_states)
}

/// Spawns the API server and the HTTP server.
fn serve(
    cfg: AgentConfig,
    listener: tokio::net::TcpListener,
    api_listener: tokio::net::UnixListener,
    shared: Shared,
    stop: &watch::Receiver<bool>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let http_state = http::HttpState {
        shared: shared.clone(),
        registry: metrics::process_registry(),
    };
    let stop_api = stop.clone();
    let api = tokio::spawn(async move {
        api_server::serve(api_listener, cfg.socket, shared, stop_api).await;
    });
    let stop_http = stop.clone();
    let web = tokio::spawn(async move {
        if let Err(e) = http::serve(listener, http_state, stop_http).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    [api, web]
}

impl Agent {
    /// Stops every task, then detaches the program.
    pub(crate) async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
        drop(self.probe);
        tracing::info!("detached; bye");
    }
}
