//! The pipeline's own figures: events lost in the kernel, and the event rate.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::kernel::probe::{Drops, RecursionMisses};
use crate::kernel::ring::ReaderStats;

/// The kernel's counts of transitions the agent never saw.
#[derive(Clone)]
pub(crate) struct KernelLosses {
    drops: Arc<Mutex<Drops>>,
    recursion: Arc<RecursionMisses>,
}

/// Events lost in the kernel at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Lost {
    /// The ring was full (the program's per-CPU counter) or the kernel skipped the program.
    pub(crate) total: u64,
    /// Of `total`, the runs the kernel skipped (recursion misses).
    pub(crate) recursion: u64,
}

impl KernelLosses {
    pub(crate) fn new(drops: Drops, recursion: RecursionMisses) -> KernelLosses {
        KernelLosses {
            drops: Arc::new(Mutex::new(drops)),
            recursion: Arc::new(recursion),
        }
    }

    pub(crate) fn read(&self) -> Lost {
        let ring_full = match self.drops.lock().map(|d| d.total()) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the kernel drop counter failed");
                0
            }
            Err(_) => 0,
        };
        let recursion = self.recursion.read();
        Lost {
            total: ring_full + recursion,
            recursion,
        }
    }
}

/// Keeps `out` at the events per second over the last five seconds, for `tcpstate status`.
pub(crate) async fn sample_rate(
    stats: Arc<ReaderStats>,
    out: Arc<Mutex<f64>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut samples = std::collections::VecDeque::from([(Instant::now(), 0u64)]);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        samples.push_back((Instant::now(), stats.load().events));
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
}
