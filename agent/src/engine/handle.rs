//! The table task's mailbox and what the servers share. Below both the task and the servers,
//! so that neither imports the other.
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};

use super::stats::KernelLosses;
use crate::kernel::ring::ReaderStats;
use crate::kernel::sockdiag::HostDump;
use crate::model::event::Transition;
use crate::model::query::{ConnFilter, Conns, View};

/// What other tasks may ask of the table task.
pub(crate) enum Request {
    /// A view of the aggregates; `ephemeral`: with ephemeral port use per destination, which
    /// only `/metrics` and `doctor` read and which walks every client connection.
    View {
        reply: oneshot::Sender<View>,
        ephemeral: bool,
    },
    /// The connections matching a filter (for the API's `conns`).
    Conns {
        filter: ConnFilter,
        reply: oneshot::Sender<Conns>,
    },
    /// A sock_diag dump of every namespace, started at `started_ns`, to reconcile with: a full
    /// one (every state; corrects the table), or a light one (timewait sockets, listeners and
    /// lingering states only; counts and names, corrects nothing).
    Reconcile {
        dump: HostDump,
        started_ns: u64,
        fin_timeout: Duration,
        full: bool,
    },
}

/// Asks the table task for views. `None` when the task is gone (the agent is stopping).
#[derive(Clone)]
pub(crate) struct TableHandle(pub mpsc::Sender<Request>);

impl TableHandle {
    pub(crate) async fn conns(&self, filter: ConnFilter) -> Option<Conns> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Request::Conns { filter, reply: tx })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Everything, ephemeral port use included (a walk of the client connections).
    pub(crate) async fn view(&self) -> Option<View> {
        self.view_of(true).await
    }

    /// The counts, without ephemeral port use (`ports`, `status`).
    pub(crate) async fn counts(&self) -> Option<View> {
        self.view_of(false).await
    }

    async fn view_of(&self, ephemeral: bool) -> Option<View> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Request::View {
                reply: tx,
                ephemeral,
            })
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// What the HTTP and API servers read: the table task's handle and the pipeline's counters.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) table: TableHandle,
    pub(crate) reader: Arc<ReaderStats>,
    pub(crate) losses: KernelLosses,
    pub(crate) ring_bytes: u64,
    /// Set once the program is attached and the first sock_diag dump seeded the table.
    pub(crate) ready: Arc<AtomicBool>,
    /// Every transition, for `watch` subscribers.
    pub(crate) watch: broadcast::Sender<Transition>,
    /// Events per second over the last seconds, kept by [`super::stats::sample_rate`].
    pub(crate) rate: Arc<Mutex<f64>>,
    pub(crate) started: Instant,
}
