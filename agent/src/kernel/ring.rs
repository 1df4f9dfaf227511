//! Drains the ring buffer without blocking, decodes each record and hands batches to the table
//! task. It never waits on the table: a full queue drops the batch and counts it.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::decode::decode;
use crate::model::event::Transition;

/// Largest batch handed to the table at once.
pub(crate) const MAX_BATCH: usize = 4096;

/// A run of transitions in ring order.
pub type Batch = Vec<Transition>;

/// Counters the reader keeps; read by the metrics endpoint without locking.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Records read from the ring.
    pub(crate) events: AtomicU64,
    /// Decoded transitions dropped because the table task's queue was full.
    pub(crate) lost_agent: AtomicU64,
    /// Records that did not decode.
    pub(crate) decode_errors: AtomicU64,
}

/// The reader's counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderCounts {
    pub events: u64,
    pub lost_agent: u64,
    pub decode_errors: u64,
}

impl ReaderStats {
    pub fn load(&self) -> ReaderCounts {
        ReaderCounts {
            events: self.events.load(Ordering::Relaxed),
            lost_agent: self.lost_agent.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
        }
    }
}

/// The longest pause between drains while the ring stays empty.
pub(crate) const IDLE_DRAIN: Duration = Duration::from_millis(160);

/// Reads until `shutdown` turns true or the table task goes away.
///
/// The program wakes us only when a quarter of the ring is waiting (a wakeup per event costs
/// more than the event), so we also drain every `drain_every`. While the ring stays empty the
/// pause doubles, up to [`IDLE_DRAIN`]: an idle host should not wake the agent 100 times a
/// second, and the first events after a pause wait at most that long (a burst wakes the reader
/// at once, at a quarter of the ring).
pub async fn run(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<Batch>,
    stats: Arc<ReaderStats>,
    drain_every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // `AsyncFd` (and with it the ring) is dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut pause = drain_every;
    let mut reader = Drainer {
        tx,
        stats,
        batch: Vec::with_capacity(MAX_BATCH),
        decode_error_reported: false,
    };
    loop {
        let read = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let read = reader.drain(guard.get_inner_mut());
                guard.clear_ready();
                read
            }
            _ = tokio::time::sleep(pause) => reader.drain(fd.get_mut()),
            _ = shutdown.changed() => {
                // Hand over what is already in the ring before stopping.
                reader.drain(fd.get_mut());
                return Ok(());
            }
        };
        match read {
            None => return Ok(()),
            Some(0) => pause = (pause * 2).min(IDLE_DRAIN.max(drain_every)),
            Some(_) => pause = drain_every,
        }
    }
}

struct Drainer {
    tx: mpsc::Sender<Batch>,
    stats: Arc<ReaderStats>,
    batch: Batch,
    decode_error_reported: bool,
}

impl Drainer {
    /// Drains everything waiting: how many records, `None` once the table task is gone.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Option<u64> {
        let mut read = 0u64;
        while let Some(item) = ring.next() {
            read += 1;
            match decode(&item) {
                Ok(t) => self.batch.push(t),
                Err(e) => {
                    self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    if !self.decode_error_reported {
                        self.decode_error_reported = true;
                        tracing::warn!(error = %e, "undecodable event (further ones are only counted)");
                    }
                }
            }
            drop(item);
            if self.batch.len() >= MAX_BATCH && !self.send() {
                return None;
            }
        }
        self.stats.events.fetch_add(read, Ordering::Relaxed);
        (self.batch.is_empty() || self.send()).then_some(read)
    }

    fn send(&mut self) -> bool {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(MAX_BATCH));
        match self.tx.try_send(batch) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(lost)) => {
                self.stats
                    .lost_agent
                    .fetch_add(lost.len() as u64, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}
