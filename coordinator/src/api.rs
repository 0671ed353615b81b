//! The HTTP API role: health, readiness, metrics, and read-only views of
//! accounts and batches.

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use holdfast_common::ledger::{Ledger, LedgerError};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    pub ledger: Ledger,
    pub metrics: PrometheusHandle,
    pub amqp_url: String,
}

/// The routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/accounts/{id}", get(account))
        .route("/v1/batches/{id}", get(batch))
        .with_state(state)
}

/// A problem document (RFC 9457).
fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn ledger_problem(e: LedgerError) -> Response {
    match e {
        LedgerError::UnknownAccount(a) => {
            problem(StatusCode::NOT_FOUND, format!("unknown account `{a}`"))
        }
        LedgerError::Invalid(why) => problem(StatusCode::BAD_REQUEST, why),
        e if e.is_transient() => problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        e => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn ready(State(s): State<ApiState>) -> Response {
    let db = s.ledger.ping().await;
    let amqp = holdfast_common::topology::ping(&s.amqp_url).await;
    let status = if db && amqp {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"postgres": db, "rabbitmq": amqp}))).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn account(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.ledger.account(&id).await {
        Ok(a) => Json(a).into_response(),
        Err(e) => ledger_problem(e),
    }
}

async fn batch(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.ledger.batch(&id).await {
        Ok(Some(b)) => Json(b).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("unknown batch `{id}`")),
        Err(e) => ledger_problem(e),
    }
}

/// Serve on `addr` until `shutdown`.
pub async fn serve(
    state: ApiState,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(state, listener, shutdown).await
}

/// Serve on a bound listener until `shutdown`.
pub async fn serve_on(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
