//! The HTTP server: `/metrics`, `/healthz`, `/readyz` and a landing page.
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use prometheus::Registry;
use tokio::sync::watch;

use super::metrics::{self, Sources};
use crate::engine::handle::Shared;

/// What the HTTP handlers need: the pipeline, and the registry of the process metrics.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) shared: Shared,
    pub(crate) registry: Registry,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(landing))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves until `shutdown` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|&stop| stop).await;
        })
        .await
}

async fn readyz(State(s): State<HttpState>) -> Response {
    if s.shared.ready.load(std::sync::atomic::Ordering::Relaxed) {
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

async fn metrics_handler(State(s): State<HttpState>) -> Response {
    let Some(view) = s.shared.table.view().await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down\n",
        )
            .into_response();
    };
    let reader = s.shared.reader.load();
    let lost = s.shared.losses.read();
    let sources = Sources {
        view,
        recursion_misses: lost.recursion,
        events: reader.events,
        lost_kernel: lost.total,
        lost_agent: reader.lost_agent,
        decode_errors: reader.decode_errors,
        ring_bytes: s.shared.ring_bytes,
    };
    let registry = s.registry.clone();
    let rendered = tokio::task::spawn_blocking(move || metrics::render(&registry, &sources)).await;
    scrape_response(
        rendered
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
    )
}

/// The exposition, or a 500 that says why (and a log line): a scrape that failed must never
/// look like an agent with nothing to report.
fn scrape_response(rendered: Result<String, String>) -> Response {
    match rendered {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering the metrics failed: {e}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_scrape_is_a_500_that_says_why() {
        let r = scrape_response(Err("a task panicked".into()));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let ok = scrape_response(Ok("tcpstate_events_total 1\n".into()));
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }
}
