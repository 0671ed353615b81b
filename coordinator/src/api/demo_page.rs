//! The reference page at `/demo`: a "Generate All" screen for ten demo items
//! that previews the cost (with the preview's `breakdown`: one line per grant
//! the batch would draw from, and its `expiry_notice`), submits the batch,
//! follows its progress, and, when the credits are short, offers the
//! decision's choices in a dialog.
//!
//! Plain HTML, CSS and JavaScript, embedded in the binary; no build step.
//! The page itself is open; it calls the `/v1` endpoints with an API key
//! the person gives it (typed in, or in the address's fragment,
//! `/demo#key=hf_live_…`, which browsers never send to the server), kept in
//! the tab's session storage. A producer key limited to the demo account is
//! all it needs. Its "Add credits" button calls `POST /demo/grant`, which
//! grants credits to an account the key may use without the admin scope, so
//! it is enabled only when `HOLDFAST_DEMO_GRANTS=1`; otherwise it answers
//! 403. The admin token never reaches the page.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::accounts::AccountView;
use super::auth::Caller;
use super::body::{self, JsonBody};
use super::problem::Problem;
use super::ApiState;

const PAGE_HTML: &str = include_str!("../../assets/demo/index.html");
const PAGE_CSS: &str = include_str!("../../assets/demo/demo.css");
const PAGE_JS: &str = include_str!("../../assets/demo/demo.js");

/// Most credits one demo grant may add.
pub const MAX_DEMO_GRANT: i64 = 100_000;

/// The page. Tells the script whether the "Add credits" button may work.
pub async fn page(State(s): State<ApiState>) -> Response {
    let grants = if s.demo_grants { "on" } else { "off" };
    let html = PAGE_HTML.replace("{{DEMO_GRANTS}}", grants);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        html,
    )
        .into_response()
}

/// The page's style sheet.
pub async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE_CSS,
    )
        .into_response()
}

/// The page's script.
pub async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE_JS,
    )
        .into_response()
}

struct DemoGrant {
    account_id: String,
    amount: i64,
}

fn parse_demo_grant(body: &[u8]) -> Result<DemoGrant, Problem> {
    let obj = body::object(body)?;
    let mut errors = Vec::new();
    let mut bad = |field: &str, reason: String| {
        errors.push(holdfast_common::messages::FieldError {
            field: field.into(),
            reason,
        })
    };
    let account_id = match obj.get("account_id") {
        Some(Value::String(id))
            if !id.is_empty() && id.chars().count() <= 128 && !id.chars().any(char::is_control) =>
        {
            id.clone()
        }
        None | Some(Value::Null) => {
            bad("account_id", "is required".into());
            String::new()
        }
        Some(_) => {
            bad(
                "account_id",
                "must be a string of 1 to 128 characters without control characters".into(),
            );
            String::new()
        }
    };
    let amount = match obj.get("amount") {
        None | Some(Value::Null) => {
            bad("amount", "is required".into());
            0
        }
        Some(v) => match v.as_i64() {
            Some(a) if (1..=MAX_DEMO_GRANT).contains(&a) => a,
            _ => {
                bad(
                    "amount",
                    format!(
                        "must be a whole number of credits from 1 to {MAX_DEMO_GRANT}, got {v}"
                    ),
                );
                0
            }
        },
    };
    if errors.is_empty() {
        Ok(DemoGrant { account_id, amount })
    } else {
        Err(Problem::invalid(StatusCode::BAD_REQUEST, errors))
    }
}

/// `POST /demo/grant {account_id, amount}`: add credits to an account from
/// the reference page, with a producer key that may use the account. Only
/// when `HOLDFAST_DEMO_GRANTS=1`; 403 otherwise.
pub async fn grant(
    State(s): State<ApiState>,
    caller: Caller,
    body: Result<JsonBody, Problem>,
) -> Result<Json<AccountView>, Problem> {
    if !s.demo_grants {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "demo-grants-disabled",
            "Demo grants disabled",
            "the reference page cannot add credits: set HOLDFAST_DEMO_GRANTS=1 on the server",
        ));
    }
    let JsonBody(body) = body?;
    let g = parse_demo_grant(&body)?;
    caller.may_use(&g.account_id)?;
    s.ledger
        .grant(
            &g.account_id,
            g.amount,
            Some("demo page: add credits"),
            true,
        )
        .await?;
    Ok(Json(super::accounts::view(&s, &g.account_id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_grant() {
        let g = parse_demo_grant(br#"{"account_id":"demo-studio","amount":25}"#).unwrap();
        assert_eq!(g.account_id, "demo-studio");
        assert_eq!(g.amount, 25);
    }

    #[test]
    fn refuses_bad_amounts_and_ids() {
        for body in [
            r#"{"account_id":"a","amount":0}"#,
            r#"{"account_id":"a","amount":-3}"#,
            r#"{"account_id":"a","amount":1.5}"#,
            r#"{"account_id":"a","amount":100001}"#,
            r#"{"account_id":"","amount":5}"#,
            r#"{"account_id":7,"amount":5}"#,
            r#"{"amount":5}"#,
        ] {
            assert!(parse_demo_grant(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn the_page_links_its_assets() {
        assert!(PAGE_HTML.contains("/demo/demo.css"));
        assert!(PAGE_HTML.contains("/demo/demo.js"));
        assert!(PAGE_HTML.contains("{{DEMO_GRANTS}}"));
    }
}
