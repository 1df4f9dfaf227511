//! The one task that owns the table and the linger detector: applies batches in order, runs
//! the detector on its timer, applies sock_diag dumps, answers requests. Nothing else touches
//! them, so nothing is locked.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{broadcast, mpsc};

use super::handle::Request;
use crate::clock::monotonic_ns;
use crate::kernel::ring::Batch;
use crate::kernel::sockdiag::HostDump;
use crate::model::event::Transition;
use crate::model::linger::{self, Detector, Happening, LogRecord};
use crate::model::query::{Conns, View};
use crate::model::table::Table;

/// Everything the table task owns or talks to.
pub(crate) struct TableTask {
    pub(crate) table: Table,
    pub(crate) detector: Detector,
    pub(crate) batches: mpsc::Receiver<Batch>,
    pub(crate) requests: mpsc::Receiver<Request>,
    pub(crate) alert_tx: mpsc::Sender<Vec<LogRecord>>,
    /// Lingering events logged one by one per interval.
    pub(crate) log_cap: usize,
    pub(crate) watch_tx: broadcast::Sender<Transition>,
    pub(crate) ready: Arc<AtomicBool>,
    /// A port idle this long gives its slot back.
    pub(crate) port_retire_ns: u64,
}

impl TableTask {
    /// Runs until the reader goes away (the agent is stopping), then reports what still lingers.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.detector.thresholds().check_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = self.batches.recv() => match batch {
                    Some(batch) => self.apply_batch(&batch),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
                Some(request) = self.requests.recv() => self.answer(request),
            }
        }
        // Settle what left since the last tick, then report what still lingers.
        let now = monotonic_ns();
        let mut last = self.detector.tick(&mut self.table, now);
        last.retain(|h| matches!(h, Happening::Left { .. }));
        last.extend(self.detector.shutdown(now));
        let _ = self
            .alert_tx
            .send(linger::plan_logs(last, self.log_cap))
            .await;
    }

    /// Applies a batch to the table and hands every transition to the watchers: the one path by
    /// which transitions enter the table, so that watchers see all of them.
    fn apply_batch(&mut self, batch: &Batch) {
        batch.iter().for_each(|t| self.table.apply(t));
        // Only while someone watches: a broadcast send never blocks, and a watcher that falls
        // behind loses its place, not ours.
        if self.watch_tx.receiver_count() > 0 {
            for t in batch {
                let _ = self.watch_tx.send(*t);
            }
        }
        for full in self.table.take_budget_full() {
            tracing::warn!(
                role = full.role.label(),
                max_ports = full.max_ports,
                port = full.port,
                "port limit reached: further {} ports are counted under port=\"other\" (raise --max-ports to track more)",
                full.role.label()
            );
        }
    }

    /// Retires idle ports and runs the linger detector; its findings are logged off this task.
    fn on_tick(&mut self) {
        let now = monotonic_ns();
        self.table.expire_timewait(now);
        let retired = self.table.retire_idle(now, self.port_retire_ns);
        if retired > 0 {
            tracing::debug!(retired, "idle ports gave their slots back");
        }
        let happenings = self.detector.tick(&mut self.table, now);
        if !happenings.is_empty() {
            // Logging (and the owner lookup behind it) happens off this task.
            let records = linger::plan_logs(happenings, self.log_cap);
            if self.alert_tx.try_send(records).is_err() {
                tracing::warn!("alert log queue full: lingering events of one interval not logged");
            }
        }
    }

    fn answer(&mut self, request: Request) {
        self.table.expire_timewait(monotonic_ns());
        match request {
            Request::View { reply, ephemeral } => {
                let now = monotonic_ns();
                let _ = reply.send(View::of(&self.table, &self.detector, now, ephemeral));
            }
            Request::Conns { filter, reply } => {
                let _ = reply.send(Conns::of(&self.table, &filter, monotonic_ns()));
            }
            Request::Reconcile {
                dump,
                started_ns,
                fin_timeout,
                full,
            } => {
                // Events already read belong before the dump's result.
                while let Ok(batch) = self.batches.try_recv() {
                    self.apply_batch(&batch);
                }
                self.table
                    .set_ephemeral_ranges(dump.ephemeral.iter().map(|(n, r)| (*n, r.clone())));
                if full {
                    self.reconcile(&dump, started_ns, fin_timeout);
                } else {
                    let now = monotonic_ns();
                    self.table
                        .refresh(&dump.sockets, started_ns, now, fin_timeout);
                }
            }
        }
    }

    fn reconcile(&mut self, dump: &HostDump, started_ns: u64, fin_timeout: std::time::Duration) {
        let c = self
            .table
            .reconcile(&dump.sockets, started_ns, monotonic_ns(), fin_timeout);
        let runs = self.table.reconcile_totals().runs;
        self.ready.store(true, Ordering::Relaxed);
        if runs == 1 {
            tracing::info!(
                sockets = dump.sockets.len(),
                namespaces = dump.namespaces,
                seeded = c.missing,
                "seeded the connection table from sock_diag"
            );
        } else if c.stale + c.missing + c.state > 0 {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linger::Thresholds;
    use crate::model::table::DEFAULT_EPHEMERAL;
    use crate::testing::tr;
    use std::time::Duration;
    use tcpstate_common::TcpState;

    /// Batches queued behind a reconciliation request are drained by it: every one of their
    /// transitions must still reach the watchers.
    #[tokio::test]
    async fn watchers_get_the_transitions_a_reconciliation_drains() {
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(64);
        let (req_tx, req_rx) = mpsc::channel::<Request>(16);
        let (alert_tx, _alert_rx) = mpsc::channel(64);
        let (watch_tx, mut watch_rx) = broadcast::channel(16_384);
        // The request comes first and 20 batches wait behind it: whichever the task picks
        // first, a reconciliation finds batches queued unless the coin falls 20 times alike.
        let mut sent = 0;
        req_tx
            .send(Request::Reconcile {
                dump: HostDump::default(),
                started_ns: 0,
                fin_timeout: Duration::from_secs(60),
                full: true,
            })
            .await
            .unwrap();
        for b in 0..20u64 {
            let batch: Batch = (0..50u64)
                .map(|i| {
                    let sock = 0xffff_0000_0000_0000 + b * 50 + i;
                    let (old, new) = (TcpState::Close, TcpState::SynSent);
                    tr(
                        sock,
                        1 + b * 50 + i,
                        old,
                        new,
                        "127.0.0.1:0",
                        "127.0.0.1:80",
                    )
                    .with_pid(1)
                })
                .collect();
            sent += batch.len();
            batch_tx.send(batch).await.unwrap();
        }
        drop(batch_tx);
        let task = tokio::spawn(
            TableTask {
                table: Table::new(16, DEFAULT_EPHEMERAL),
                detector: Detector::new(Thresholds::default()),
                batches: batch_rx,
                requests: req_rx,
                alert_tx,
                log_cap: 20,
                watch_tx,
                ready: Arc::new(AtomicBool::new(false)),
                port_retire_ns: u64::MAX,
            }
            .run(),
        );
        let mut seen = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), watch_rx.recv()).await {
            seen += 1;
        }
        let _ = task.await;
        assert_eq!(seen, sent, "watchers saw {seen} of {sent} transitions");
    }
}
