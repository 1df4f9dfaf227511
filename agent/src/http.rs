//! The HTTP server: `/metrics`, `/healthz` and a landing page.
use std::sync::{Arc, Mutex};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use prometheus::Registry;
use tokio::sync::{mpsc, oneshot, watch};

use crate::alerts::{LingerSnapshot, Thresholds};
use crate::bpf::Drops;
use crate::metrics::{self, Sources};
use crate::reader::ReaderStats;
use crate::table::Snapshot;

/// A consistent view of the table task's state at one instant.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub table: Snapshot,
    pub linger: LingerSnapshot,
    pub thresholds: Thresholds,
    /// CLOCK_MONOTONIC ns when the view was taken (ages are computed against it).
    pub now_ns: u64,
}

/// What other tasks may ask of the table task.
pub enum Request {
    View(oneshot::Sender<View>),
    /// The connections matching a filter (for the API's `conns`).
    Conns {
        filter: crate::apiserver::ConnFilter,
        reply: oneshot::Sender<Vec<crate::api::ConnRow>>,
    },
    /// A sock_diag dump of every namespace, started at `started_ns`, to reconcile with.
    Reconcile {
        dump: crate::sockdiag::HostDump,
        started_ns: u64,
        fin_timeout: std::time::Duration,
    },
}

/// Asks the table task for views.
#[derive(Clone)]
pub struct TableHandle(pub mpsc::Sender<Request>);

impl TableHandle {
    pub async fn conns(
        &self,
        filter: crate::apiserver::ConnFilter,
    ) -> Option<Vec<crate::api::ConnRow>> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Request::Conns { filter, reply: tx })
            .await
            .ok()?;
        rx.await.ok()
    }

    pub async fn view(&self) -> Option<View> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Request::View(tx)).await.ok()?;
        rx.await.ok()
    }
}

#[derive(Clone)]
pub struct AppState {
    pub table: TableHandle,
    pub reader: Arc<ReaderStats>,
    pub drops: Arc<Mutex<Drops>>,
    pub recursion: Arc<crate::bpf::RecursionMisses>,
    pub registry: Registry,
    pub ring_bytes: u64,
    /// Set once the program is attached and the first sock_diag dump seeded the table.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// Events lost in the kernel: the ring was full (the program's per-CPU counter) or the kernel
    /// skipped the program (recursion misses); and, of those, the recursion misses.
    pub fn kernel_losses(&self) -> (u64, u64) {
        let ring_full = match self.drops.lock().map(|d| d.total()) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the kernel drop counter failed");
                0
            }
            Err(_) => 0,
        };
        let recursion = self.recursion.read();
        (ring_full + recursion, recursion)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(landing))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|&stop| stop).await;
        })
        .await
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.ready.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first sock_diag dump\n",
        )
            .into_response()
    }
}

async fn landing() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><html><head><title>tcpstate</title></head><body>",
        "<h1>tcpstate ",
        env!("CARGO_PKG_VERSION"),
        "</h1><p>TCP state transitions per service port.</p>",
        "<ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li><li><a href=\"/readyz\">/readyz</a></li></ul>",
        "</body></html>\n"
    ))
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    let Some(view) = s.table.view().await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down\n",
        )
            .into_response();
    };
    let (events, lost_agent, decode_errors) = s.reader.load();
    let (lost_kernel, recursion_misses) = s.kernel_losses();
    let sources = Sources {
        view,
        recursion_misses,
        events,
        lost_kernel,
        lost_agent,
        decode_errors,
        ring_bytes: s.ring_bytes,
    };
    let registry = s.registry.clone();
    let body = tokio::task::spawn_blocking(move || metrics::render(&registry, &sources))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
