//! Repair from the ground truth: sock_diag dumps of every namespace, handed to the table task.
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::handle::Request;
use crate::clock::monotonic_ns;
use crate::kernel::sockdiag::States;
use crate::kernel::{procfs, sockdiag};
use crate::model::table::reconcile::LIGHT_STATES;

/// The shortest time between a reconciliation and one brought forward by a kernel loss: a
/// quarter of the interval, between 1 s and 5 s. Under sustained loss (a ring too small for the
/// load) dumps stay bounded instead of adding to the overload.
pub(crate) fn early_reconcile_gap(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Dumps every namespace's sockets now (seeding), then every `interval`, and hands each dump
/// to the table task. When transitions are lost (`kernel_losses` grows: the ring was full, the
/// kernel skipped the program, or the table task could not take a batch), the next dump is
/// brought forward, no sooner than `early_reconcile_gap` after the last, so the table is
/// repaired in seconds.
///
/// Events keep the table right while nothing is lost, so only the seeding, a dump after a loss,
/// and one every `full_interval` are full; the others are light (what events cannot see: the
/// timewait sockets; and the inodes of lingering sockets). A light dump still walks every
/// socket of the host in the kernel, once per namespace, so it is skipped when no transition
/// arrived (`activity` did not move) since the last dump: an idle host has nothing to correct,
/// and its timewait sockets expire on their own timers.
pub(crate) async fn run(
    interval: Duration,
    full_interval: Duration,
    kernel_losses: impl Fn() -> u64,
    activity: impl Fn() -> u64,
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
    let mut last_full: Option<tokio::time::Instant> = None;
    let mut seen = activity();
    loop {
        // The losses so far: this dump repairs them.
        let (lost, early) = tokio::select! {
            _ = tick.tick() => (kernel_losses(), false),
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
                (lost, true)
            }
            _ = shutdown.changed() => return,
        };
        let since_full = last_full.map(|at| at.elapsed());
        let full = full_due(
            since_full,
            early || lost > repaired,
            interval,
            full_interval,
        );
        let now_seen = activity();
        if !full && now_seen == seen {
            tracing::trace!("no transition since the last dump: nothing to correct");
            continue;
        }
        seen = now_seen;
        repaired = lost;
        last = tokio::time::Instant::now();
        let Some(request) = dump(full).await else {
            continue;
        };
        if full {
            last_full = Some(last);
        }
        if table.send(request).await.is_err() {
            return;
        }
    }
}

/// Whether a dump must be full: the first (seeding), one after a loss, or one due by
/// `full_interval` (within half a regular interval, so that a full interval that is a
/// multiple of the regular one is kept to, not overshot by one).
fn full_due(
    since_full: Option<Duration>,
    lost: bool,
    interval: Duration,
    full_interval: Duration,
) -> bool {
    lost || since_full.is_none_or(|d| d + interval / 2 >= full_interval)
}

/// One dump of every namespace, off the async threads; `None` when no namespace could be dumped.
async fn dump(full: bool) -> Option<Request> {
    let started_ns = monotonic_ns();
    let states = if full {
        States::All
    } else {
        States::Only(&LIGHT_STATES)
    };
    let (dump, fin_timeout) = tokio::task::spawn_blocking(move || {
        (
            sockdiag::dump_host(std::path::Path::new("/proc"), states),
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
        full,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_are_full_at_start_after_a_loss_and_every_full_interval() {
        let s = Duration::from_secs;
        let (i, f) = (s(15), s(300));
        assert!(full_due(None, false, i, f), "seeding");
        assert!(!full_due(Some(s(15)), false, i, f));
        assert!(full_due(Some(s(15)), true, i, f), "after a loss");
        assert!(!full_due(Some(s(285)), false, i, f));
        assert!(full_due(Some(s(300)), false, i, f));
        // Ticks run late by a few ms: the 20th tick is still the full one.
        assert!(full_due(Some(Duration::from_millis(299_990)), false, i, f));
        // A full interval at or below the regular one: every dump is full.
        assert!(full_due(Some(s(2)), false, s(2), s(1)));
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
