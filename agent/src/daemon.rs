//! Wiring of the agent: privileges, tracefs, program, reader, table, HTTP, and shutdown.
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, watch};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::alerts::{self, Detector};
use crate::bpf::{self, BpfError};
use crate::config::{self, AgentConfig};
use crate::http::{AppState, Request, TableHandle, View};
use crate::metrics;
use crate::owner::{self, Owner};
use crate::privileges::{self, PrivilegeError};
use crate::reader::{self, Batch, ReaderStats};
use crate::sockdiag;
use crate::table::Table;
use crate::tracefs::{self, TracefsError};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("cannot listen on {addr}: {source}; pass --listen with a free address and port")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] crate::apiserver::ApiError),
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

/// Runs the agent until SIGINT or SIGTERM; returns once the program is detached.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Io {
            what: "installing the SIGTERM handler",
            source,
        })?;
    let agent = start(cfg).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
    agent.stop().await;
    Ok(())
}

/// A running agent.
pub struct Agent {
    pub addr: std::net::SocketAddr,
    pub table: TableHandle,
    pub reader_stats: Arc<ReaderStats>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    probe: bpf::Probe,
}

/// Starts every part of the agent and returns once the program is attached and the HTTP
/// server listens.
pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
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
    let api_listener = crate::apiserver::bind(&cfg.socket)?;
    let tracefs = tracefs::locate(cfg.tracefs.as_deref())?;
    let layout = tracefs::read_layout(&tracefs)?;
    tracing::debug!(?layout, tracefs = %tracefs.display(), "tracepoint layout");
    let netns = match crate::btf::Btf::from_file(std::path::Path::new(crate::btf::VMLINUX))
        .and_then(|btf| crate::btf::netns_offsets(&btf))
    {
        Ok(off) => Some(off),
        Err(e) => {
            tracing::warn!(error = %e, "no socket namespace offsets from BTF: events carry netns 0 and --per-netns cannot split them");
            None
        }
    };
    let loaded = bpf::load(
        layout,
        &bpf::Options {
            ring_bytes: cfg.ring_bytes,
            max_sockets: cfg.max_sockets,
            wakeup_bytes: cfg.wakeup_bytes(),
            netns,
        },
    )?;
    tracing::info!(
        listen = %addr,
        ring_bytes = cfg.ring_bytes,
        max_ports = cfg.max_ports,
        close_wait_after = ?cfg.thresholds.close_wait,
        fin_wait2_after = ?cfg.thresholds.fin_wait2,
        "attached to sock:inet_sock_set_state"
    );
    let variant = env!("TCPSTATE_BENCH_VARIANT");
    if !variant.is_empty() {
        tracing::warn!(
            variant,
            "benchmark-only build: the eBPF program leaves out part of its work; \
             rebuild without TCPSTATE_BENCH_VARIANT"
        );
    }

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // aya-log records from the program: the logger must be kept alive and polled.
    // SAFETY: the logger owns the log ring's fd, open and unchanged until the `AsyncFd` drops it.
    let mut logger = unsafe { AsyncFd::register(loaded.logger) }.map_err(|e| AgentError::Io {
        what: "polling the eBPF log map",
        source: e.into(),
    })?;
    let mut stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                guard = logger.readable_mut() => match guard {
                    Ok(mut g) => {
                        g.get_inner_mut().flush();
                        g.clear_ready();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "eBPF log map failed");
                        return;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }));

    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_QUEUE);
    let reader_stats = Arc::new(ReaderStats::default());
    let stats = reader_stats.clone();
    let stop = shutdown_rx.clone();
    let drain = cfg.drain_interval;
    let events = loaded.events;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = reader::run(events, batch_tx, stats, drain, stop).await {
            tracing::error!(error = %e, "ring buffer reader failed");
        }
    }));

    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (req_tx, req_rx) = mpsc::channel::<Request>(16);
    let table = Table::new(cfg.max_ports as usize, config::ephemeral_range())
        .per_netns(cfg.per_netns && netns.is_some())
        .netns_in_events(netns.is_some())
        .histogram_ports(cfg.histogram_ports as usize)
        .duration_states(cfg.duration_states);
    let detector = Detector::new(cfg.thresholds);
    let (alert_tx, alert_rx) = mpsc::channel(64);
    let (watch_tx, _) = broadcast::channel(WATCH_QUEUE);
    tasks.push(tokio::spawn(own_table(TableTask {
        table,
        detector,
        batches: batch_rx,
        requests: req_rx,
        alert_tx,
        log_cap: cfg.linger_log_cap,
        watch_tx: watch_tx.clone(),
        ready: ready.clone(),
        port_retire_ns: cfg.port_retire_after.as_nanos() as u64,
    })));
    tasks.push(tokio::spawn(log_alerts(alert_rx)));

    let handle = TableHandle(req_tx.clone());
    let state = AppState {
        table: handle.clone(),
        reader: reader_stats.clone(),
        drops: Arc::new(Mutex::new(loaded.drops)),
        recursion: Arc::new(loaded.recursion),
        registry: metrics::process_registry(),
        ring_bytes: u64::from(cfg.ring_bytes),
        ready: ready.clone(),
    };
    let losses = state.clone();
    tasks.push(tokio::spawn(reconcile_every(
        cfg.reconcile_interval,
        move || losses.kernel_losses().0,
        req_tx,
        shutdown_rx.clone(),
    )));
    // Events per second over the last five seconds, for `tcpstate status`.
    let rate = Arc::new(Mutex::new(0.0f64));
    let (stats, out, mut stop) = (reader_stats.clone(), rate.clone(), shutdown_rx.clone());
    tasks.push(tokio::spawn(async move {
        let mut samples = std::collections::VecDeque::from([(std::time::Instant::now(), 0u64)]);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            samples.push_back((std::time::Instant::now(), stats.load().0));
            if samples.len() > 6 {
                samples.pop_front();
            }
            let ((t0, e0), (t1, e1)) = (samples[0], samples[samples.len() - 1]);
            let secs = (t1 - t0).as_secs_f64();
            if secs > 0.0
                && let Ok(mut r) = out.lock()
            {
                *r = (e1 - e0) as f64 / secs;
            }
        }
    }));

    let api_state = crate::apiserver::ApiState {
        app: state.clone(),
        watch: watch_tx,
        started: std::time::Instant::now(),
        rate,
    };
    let stop = shutdown_rx.clone();
    let socket = cfg.socket.clone();
    tasks.push(tokio::spawn(async move {
        crate::apiserver::serve(api_listener, socket, api_state, stop).await;
    }));

    let stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, state, stop).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));

    Ok(Agent {
        addr,
        table: handle,
        reader_stats,
        shutdown,
        tasks,
        probe: loaded.probe,
    })
}

impl Agent {
    /// Stops every task, then detaches the program.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
        drop(self.probe);
        tracing::info!("detached; bye");
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so of every event.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The one task that owns the table and the linger detector: applies batches in order, runs
/// the detector on its timer, answers requests. Nothing else touches them.
/// Everything the table task owns or talks to.
struct TableTask {
    table: Table,
    detector: Detector,
    batches: mpsc::Receiver<Batch>,
    requests: mpsc::Receiver<Request>,
    alert_tx: mpsc::Sender<Vec<alerts::LogRecord>>,
    log_cap: usize,
    watch_tx: broadcast::Sender<crate::decode::Transition>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// A port idle this long gives its slot back.
    port_retire_ns: u64,
}

/// Applies a batch to the table and hands every transition to the watchers: the one path by
/// which transitions enter the table, so that watchers see all of them.
fn apply_batch(
    table: &mut Table,
    watch_tx: &broadcast::Sender<crate::decode::Transition>,
    batch: &Batch,
) {
    batch.iter().for_each(|t| table.apply(t));
    // Only while someone watches: a broadcast send never blocks, and a watcher that falls
    // behind loses its place, not ours.
    if watch_tx.receiver_count() > 0 {
        for t in batch.iter() {
            let _ = watch_tx.send(*t);
        }
    }
}

async fn own_table(task: TableTask) {
    let TableTask {
        mut table,
        mut detector,
        mut batches,
        mut requests,
        alert_tx,
        log_cap,
        watch_tx,
        ready,
        port_retire_ns,
    } = task;
    let mut tick = tokio::time::interval(detector.thresholds().check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = batches.recv() => match batch {
                Some(batch) => apply_batch(&mut table, &watch_tx, &batch),
                // The reader is gone: the agent is stopping.
                None => break,
            },
            _ = tick.tick() => {
                let now = monotonic_ns();
                let retired = table.retire_idle(now, port_retire_ns);
                if retired > 0 {
                    tracing::debug!(retired, "idle ports gave their slots back");
                }
                let happenings = detector.tick(&mut table, now);
                if !happenings.is_empty() {
                    // Logging (and the owner lookup behind it) happens off this task.
                    let records = alerts::plan_logs(happenings, log_cap);
                    if alert_tx.try_send(records).is_err() {
                        tracing::warn!("alert log queue full: lingering events of one interval not logged");
                    }
                }
            }
            Some(request) = requests.recv() => match request {
                Request::View(reply) => {
                    let now = monotonic_ns();
                    let _ = reply.send(View {
                        table: table.snapshot(),
                        linger: detector.snapshot(table.orphans(), now),
                        thresholds: detector.thresholds(),
                        now_ns: now,
                    });
                }
                Request::Conns { filter, reply } => {
                    let _ = reply.send(crate::apiserver::conn_rows(&table, &filter, monotonic_ns()));
                }
                Request::Reconcile { dump, started_ns, fin_timeout } => {
                    // Events already read belong before the dump's result.
                    while let Ok(batch) = batches.try_recv() {
                        apply_batch(&mut table, &watch_tx, &batch);
                    }
                    let c = table.reconcile(&dump.sockets, started_ns, monotonic_ns(), fin_timeout);
                    let runs = table.reconcile_totals().runs;
                    ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    let total = c.stale + c.missing + c.state;
                    if runs == 1 {
                        tracing::info!(
                            sockets = dump.sockets.len(),
                            namespaces = dump.namespaces,
                            seeded = c.missing,
                            "seeded the connection table from sock_diag"
                        );
                    } else if total > 0 {
                        tracing::info!(
                            stale = c.stale,
                            missing = c.missing,
                            state = c.state,
                            "reconciliation corrected the table (events were lost or raced)"
                        );
                    }
                    for (netns, error) in &dump.failed {
                        tracing::debug!(netns, %error, "namespace not dumped");
                    }
                }
            },
        }
    }
    // Settle what left since the last tick, then report what still lingers.
    let now = monotonic_ns();
    let mut last = detector.tick(&mut table, now);
    last.retain(|h| matches!(h, alerts::Happening::Left { .. }));
    last.extend(detector.shutdown(now));
    let _ = alert_tx.send(alerts::plan_logs(last, log_cap)).await;
}

/// Logs lingering events, naming the processes that hold each socket. The /proc scan runs on a
/// blocking thread, for the inodes of new crossings only, cached per inode.
async fn log_alerts(mut records: mpsc::Receiver<Vec<alerts::LogRecord>>) {
    let mut cache: FxHashMap<u32, Vec<Owner>> = FxHashMap::default();
    while let Some(batch) = records.recv().await {
        let wanted: FxHashSet<u32> = alerts::wanted_owners(&batch)
            .into_iter()
            .filter(|i| !cache.contains_key(i))
            .collect();
        if !wanted.is_empty() {
            let found = tokio::task::spawn_blocking(move || {
                let found = owner::scan(std::path::Path::new("/proc"), &wanted);
                (wanted, found)
            })
            .await;
            if let Ok((wanted, mut found)) = found {
                if cache.len() > 100_000 {
                    cache.clear();
                }
                for inode in wanted {
                    cache.insert(inode, found.remove(&inode).unwrap_or_default());
                }
            }
        }
        alerts::emit(&batch, &cache);
    }
}

/// The shortest time between a reconciliation and one brought forward by a kernel loss: a
/// quarter of the interval, between 1 s and 5 s. Under sustained loss (a ring too small for the
/// load) dumps stay bounded instead of adding to the overload.
pub fn early_reconcile_gap(interval: std::time::Duration) -> std::time::Duration {
    (interval / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(5),
    )
}

/// Dumps every namespace's sockets now (seeding), then every `interval`, and hands each dump
/// to the table task. When the kernel reports lost transitions (`kernel_losses` grows: the ring
/// was full, or the kernel skipped the program), the next dump is brought forward, no sooner
/// than `early_reconcile_gap` after the last, so the table is repaired in seconds.
async fn reconcile_every(
    interval: std::time::Duration,
    kernel_losses: impl Fn() -> u64,
    table: mpsc::Sender<Request>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gap = early_reconcile_gap(interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(std::time::Duration::from_secs(1));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut repaired = kernel_losses();
    let mut last = tokio::time::Instant::now();
    loop {
        // The losses so far: this dump repairs them.
        let lost = tokio::select! {
            _ = tick.tick() => kernel_losses(),
            _ = poll.tick() => {
                let lost = kernel_losses();
                if lost <= repaired || last.elapsed() < gap {
                    continue;
                }
                tracing::info!(
                    lost = lost - repaired,
                    "the kernel lost transitions; reconciling now instead of in up to {interval:?}"
                );
                tick.reset();
                lost
            }
            _ = shutdown.changed() => return,
        };
        repaired = lost;
        last = tokio::time::Instant::now();
        let started_ns = monotonic_ns();
        let Ok((dump, fin_timeout)) = tokio::task::spawn_blocking(|| {
            (
                sockdiag::dump_host(std::path::Path::new("/proc")),
                sockdiag::fin_timeout(),
            )
        })
        .await
        else {
            continue;
        };
        if dump.namespaces == 0 {
            tracing::warn!(failed = ?dump.failed, "sock_diag dump failed in every namespace");
            continue;
        }
        let request = Request::Reconcile {
            dump,
            started_ns,
            fin_timeout,
        };
        if table.send(request).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tcpstate_common::TcpState;

    /// Batches queued behind a reconciliation request are drained by it: every one of their
    /// transitions must still reach the watchers.
    #[tokio::test]
    async fn watchers_get_the_transitions_a_reconciliation_drains() {
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_QUEUE);
        let (req_tx, req_rx) = mpsc::channel::<Request>(16);
        let (alert_tx, _alert_rx) = mpsc::channel(64);
        let (watch_tx, mut watch_rx) = broadcast::channel(WATCH_QUEUE);
        // The request comes first and 20 batches wait behind it: whichever the task picks
        // first, a reconciliation finds batches queued unless the coin falls 20 times alike.
        let mut sent = 0;
        req_tx
            .send(Request::Reconcile {
                dump: sockdiag::HostDump::default(),
                started_ns: 0,
                fin_timeout: Duration::from_secs(60),
            })
            .await
            .unwrap();
        for b in 0..20u64 {
            let batch: Batch = (0..50u64)
                .map(|i| crate::decode::Transition {
                    ts_ns: 1 + b * 50 + i,
                    sock: 0xffff_0000_0000_0000 + b * 50 + i,
                    prev_state_ns: None,
                    local: "127.0.0.1:0".parse().unwrap(),
                    remote: "127.0.0.1:80".parse().unwrap(),
                    old: TcpState::Close,
                    new: TcpState::SynSent,
                    netns: 0,
                    pid: 1,
                })
                .collect();
            sent += batch.len();
            batch_tx.send(batch).await.unwrap();
        }
        drop(batch_tx);
        let task = tokio::spawn(own_table(TableTask {
            table: Table::new(16, crate::table::DEFAULT_EPHEMERAL),
            detector: Detector::new(alerts::Thresholds::default()),
            batches: batch_rx,
            requests: req_rx,
            alert_tx,
            log_cap: 20,
            watch_tx,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            port_retire_ns: u64::MAX,
        }));
        let mut seen = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), watch_rx.recv()).await {
            seen += 1;
        }
        let _ = task.await;
        assert_eq!(seen, sent, "watchers saw {seen} of {sent} transitions");
    }

    #[test]
    fn an_early_reconciliation_waits_a_quarter_interval_between_one_and_five_seconds() {
        let s = Duration::from_secs;
        assert_eq!(early_reconcile_gap(s(15)), Duration::from_millis(3750));
        assert_eq!(early_reconcile_gap(s(2)), s(1));
        assert_eq!(early_reconcile_gap(Duration::from_millis(100)), s(1));
        assert_eq!(early_reconcile_gap(s(3600)), s(5));
    }
}
