//! `POST /v1/preview`: what a batch would cost, what the account has, and
//! what fits — before anyone clicks. Validated with the batch request rules
//! ([`intake::parse_preview`]) and priced with the same function as the
//! decision ([`pricing::preview`]), so the preview and the later decision agree.
//! Holds nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use holdfast_common::ledger::LedgerError;
use holdfast_common::messages::{FieldError, Preview, PreviewRequest};
use holdfast_common::pricing;

use super::auth::Caller;
use super::body::JsonBody;
use super::problem::Problem;
use super::ApiState;
use crate::intake;

/// Price a batch against the account's available credits.
#[utoipa::path(
    post,
    path = "/v1/preview",
    tag = "preview",
    request_body(content = PreviewRequest, content_type = "application/json"),
    security(("api_key" = ["producer"])),
    responses(
        (status = 200, description = "The price, what fits, and the sentence to show", body = Preview),
        (status = 400, description = "Invalid request; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown account", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Ledger unavailable; retry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn preview(
    State(s): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Preview>, Problem> {
    let request = intake::parse_preview(&body, &s.config.limits)
        .map_err(|r| Problem::rejected(StatusCode::BAD_REQUEST, *r))?;
    caller.may_use(&request.account_id)?;
    let pots = s.ledger.pots(&request.account_id).await?;
    let spenders = s
        .ledger
        .spender_levels(&request.account_id, request.spender_id.as_deref())
        .await
        .map_err(|e| match e {
            e @ LedgerError::UnknownSpender { .. } => Problem::invalid(
                StatusCode::BAD_REQUEST,
                vec![FieldError {
                    field: "spender_id".into(),
                    reason: e.to_string(),
                }],
            ),
            e => e.into(),
        })?;
    Ok(Json(pricing::preview(
        &request,
        &pots,
        &spenders,
        s.config.settings.sequential_chunk,
        s.config.settings.execution_timeout(),
    )))
}
