//! Repair from the ground truth: sock_diag dumps of every namespace, handed to the table task.
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::handle::Request;
use crate::clock::monotonic_ns;
use crate::kernel::{procfs, sockdiag};

/// The shortest time between a reconciliation and one brought forward by a kernel loss: a
/// quarter of the interval, between 1 s and 5 s. Under sustained loss (a ring too small for the
/// load) dumps stay bounded instead of adding to the overload.
pub(crate) fn early_reconcile_gap(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Dumps every namespace's sockets now (seeding), then every `interval`, and hands each dump
/// to the table task. When the kernel reports lost transitions (`kernel_losses` grows: the ring
/// was full, or the kernel skipped the program), the next dump is brought forward, no sooner
/// than `early_reconcile_gap` after the last, so the table is repaired in seconds.
pub(crate) async fn run(
    interval: Duration,
    kernel_losses: impl Fn() -> u64,
    table: mpsc::Sender<Request>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gap = early_reconcile_gap(interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(Duration::from_secs(1));
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
        let Some(request) = dump().await else {
            continue;
        };
        if table.send(request).await.is_err() {
            return;
        }
    }
}

/// One dump of every namespace, off the async threads; `None` when no namespace could be dumped.
async fn dump() -> Option<Request> {
    let started_ns = monotonic_ns();
    let (dump, fin_timeout) = tokio::task::spawn_blocking(|| {
        (
            sockdiag::dump_host(std::path::Path::new("/proc")),
            procfs::fin_timeout(),
        )
    })
    .await
    .ok()?;
    if dump.namespaces == 0 {
        tracing::warn!(failed = ?dump.failed, "sock_diag dump failed in every namespace");
        return None;
    }
    Some(Request::Reconcile {
        dump,
        started_ns,
        fin_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_early_reconciliation_waits_a_quarter_interval_between_one_and_five_seconds() {
        let s = Duration::from_secs;
        assert_eq!(early_reconcile_gap(s(15)), Duration::from_millis(3750));
        assert_eq!(early_reconcile_gap(s(2)), s(1));
        assert_eq!(early_reconcile_gap(Duration::from_millis(100)), s(1));
        assert_eq!(early_reconcile_gap(s(3600)), s(5));
    }
}
