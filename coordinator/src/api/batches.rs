//! Batches over HTTP: submit a request (decided in-process exactly as the
//! coordinator decides one from the queue), follow it, cancel it.
//!
//! `POST /v1/batches` validates first: input the intake rejects is answered
//! 422 at once, touching neither the ledger nor the broker (the caller has
//! the answer, so nothing is parked). A valid request goes through
//! [`Decider::handle`]: reserve, publish the decision event, dispatch the jobs.
//! If RabbitMQ fails after the decision was recorded, the answer is 503 and
//! the same request sent again replays the decision and resumes the dispatch
//! (a reconciler also re-dispatches it after the grace period).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use holdfast_common::events::ReplyTo;
use holdfast_common::ledger::{BatchState, BatchView};
use holdfast_common::messages::{BatchFigures, BatchRequest, Decision};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::{JsonBody, PathId};
use super::problem::Problem;
use super::ApiState;
use crate::decide::{Decider, HandleError, Outcome};
use crate::intake;

/// Submit a batch request; the answer is its decision.
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    request_body(content = BatchRequest, content_type = "application/json"),
    security(("api_key" = ["producer"])),
    responses(
        (status = 201, description = "Granted: the hold is taken and the jobs are dispatched", body = Decision,
            headers(("Location" = String, description = "/v1/batches/{batch_id}"))),
        (status = 200, description = "Insufficient (nothing held, nothing runs), or a granted decision replayed for the same batch_id and body", body = Decision),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Rejected: `errors` names each field (unknown account, batch_id reused with another body, unusable reservation, invalid input)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger or RabbitMQ unavailable; send the same request again", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn submit(
    State(s): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Response {
    let request = match intake::parse(&body, &s.config.limits) {
        Ok(request) => request,
        Err(r) => return Problem::rejected(StatusCode::UNPROCESSABLE_ENTITY, *r).into_response(),
    };
    if let Err(refused) = caller.may_use(&request.account_id) {
        return refused.into_response();
    }
    let publisher = match s.broker.publisher().await {
        Ok(p) => p,
        Err(e) => return Problem::broker(&e).into_response(),
    };
    let decider = Decider::new(s.ledger.clone(), (*s.config).clone(), publisher);
    match decider.handle(&body, &ReplyTo::default()).await {
        Ok(Outcome::Decided {
            decision, replayed, ..
        }) => match *decision {
            d @ Decision::Granted(_) => {
                let location = format!("/v1/batches/{}", d.batch_id().unwrap_or_default());
                let status = if replayed {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                };
                (status, [(header::LOCATION, location)], Json(d)).into_response()
            }
            d @ Decision::Insufficient(_) => (StatusCode::OK, Json(d)).into_response(),
            Decision::Rejected(r) => {
                Problem::rejected(StatusCode::UNPROCESSABLE_ENTITY, r).into_response()
            }
        },
        Ok(Outcome::Rejected(r)) => {
            Problem::rejected(StatusCode::UNPROCESSABLE_ENTITY, *r).into_response()
        }
        Err(HandleError::Ledger(e)) => Problem::from(e).into_response(),
        Err(HandleError::Broker(e)) => {
            s.broker.forget().await;
            tracing::warn!(error = %e, "batch request over HTTP: RabbitMQ failed");
            Problem::broker(&e).into_response()
        }
    }
}

/// One batch: decision, state, hold, figures, and every item with its reason.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "batches",
    params(("id" = String, Path, description = "The batch_id")),
    security(("api_key" = ["reader"])),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown batch", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<ApiState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<BatchView>, Problem> {
    let found = s.ledger.batch(&id).await?;
    let batch = caller.owned(
        "batch",
        &id,
        found,
        |b| &b.account_id,
        || unknown_batch(&id),
    )?;
    Ok(Json(batch))
}

fn unknown_batch(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "unknown-batch",
        "Unknown batch",
        format!("unknown batch `{id}`"),
    )
    .with_batch(id)
}

/// What a cancel did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CancelResponse {
    /// The batch cancelled.
    pub batch_id: String,
    /// `cancelling` (items still running finish; the rest is released when
    /// they have) or `cancelled` (closed now).
    pub state: BatchState,
    /// The final figures, when the batch closed at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<BatchFigures>,
}

/// Cancel a running batch: nothing new starts, running items finish and are
/// captured, everything else is released.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/cancel",
    tag = "batches",
    params(("id" = String, Path, description = "The batch_id")),
    security(("api_key" = ["producer"])),
    responses(
        (status = 200, description = "Cancelled and closed now: the final figures", body = CancelResponse),
        (status = 202, description = "Cancelling: running items finish, then the hold closes", body = CancelResponse),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown batch", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The batch already finished, or was denied", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(s): State<ApiState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Response, Problem> {
    if !caller.every_account() {
        let account = s.ledger.batch_account(&id).await?;
        caller.owned("batch", &id, account, |a| a, || unknown_batch(&id))?;
    }
    let cancelled = match s.ledger.cancel_batch(&id).await {
        Err(holdfast_common::ledger::LedgerError::NotFound(_)) => return Err(unknown_batch(&id)),
        other => other?,
    };
    let Some(closed) = cancelled.closed else {
        let body = CancelResponse {
            batch_id: cancelled.batch_id,
            state: cancelled.state,
            figures: None,
        };
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    };
    // Closed here rather than by a worker: its completed event was written to
    // the outbox with the close, and this process's relay publishes it.
    let body = CancelResponse {
        batch_id: closed.batch_id,
        state: closed.state,
        figures: Some(closed.figures),
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}
