//! `POST /v1/preview`: what a batch would cost, what the account has, and
//! what fits — before anyone clicks. Validated with the batch request rules
//! ([`intake::parse_preview`]) and priced with the same function as the
//! decision ([`pricing::preview`]), so the preview and the later decision agree.
//! Holds nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use holdfast_common::ledger::LedgerError;
use holdfast_common::messages::{FieldError, ItemRequest, Mode, Preview};
use holdfast_common::pricing;
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::JsonBody;
use super::problem::Problem;
use super::ApiState;
use crate::intake;

/// A batch to price: `items` as in a batch request, or `count` items of `cost` each.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the body for the OpenAPI document; the intake parses it.
pub enum PreviewRequest {
    /// The items, as a batch request carries them.
    Items {
        /// The account whose credits are counted.
        #[schema(example = "acme")]
        account_id: String,
        /// The items (ids unique, costs positive).
        #[schema(min_items = 1)]
        items: Vec<ItemRequest>,
        /// How much may run when the credits do not cover everything (default `all_or_nothing`).
        mode: Option<Mode>,
        /// With `mode: selected` (and only then): the items to run.
        #[schema(min_items = 1)]
        item_ids: Option<Vec<String>>,
        /// The spender the batch would be charged to: priced against the
        /// account and every spender from it up to its root.
        spender_id: Option<String>,
    },
    /// `count` items (ids `item-1` … `item-N`) of `cost` each.
    Count {
        /// The account whose credits are counted.
        #[schema(example = "acme")]
        account_id: String,
        /// How many items (at most `HOLDFAST_MAX_ITEMS`, 10,000 by default).
        #[schema(minimum = 1)]
        count: u64,
        /// The estimated cost of each.
        #[schema(minimum = 1)]
        cost: i64,
        /// How much may run when the credits do not cover everything (default `all_or_nothing`).
        mode: Option<Mode>,
        /// With `mode: selected` (and only then): the items to run, by generated id.
        #[schema(min_items = 1)]
        item_ids: Option<Vec<String>>,
        /// The spender the batch would be charged to: priced against the
        /// account and every spender from it up to its root.
        spender_id: Option<String>,
    },
}

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
