//! Request guards: what every request passes before and around its handler.
//! Over-long URLs (414) and header blocks (431) are refused before routing;
//! a request that takes longer than the request timeout is answered 503; a
//! body that stops arriving is 408 (read by [`super::body`]); a handler that
//! panics is answered 500, counted and logged. Every answer is a
//! [`Problem`], like the handlers' own.

use std::any::Any;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use holdfast_common::telemetry::record;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use super::problem::Problem;
use super::server::ServerLimits;

/// `app` with every guard around it (the innermost, the body timeout, first).
pub fn protect(app: Router, limits: &ServerLimits) -> Router {
    app.layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(log_panics))
        .layer(middleware::from_fn_with_state(
            limits.request_timeout,
            deadline,
        ))
        .layer(middleware::from_fn_with_state(*limits, size_limits))
}

/// Refuse a URL or a header block over its limit before anything else reads it.
async fn size_limits(State(limits): State<ServerLimits>, req: Request, next: Next) -> Response {
    let url = url_len(req.uri());
    if url > limits.max_url_bytes {
        return Problem::status(
            StatusCode::URI_TOO_LONG,
            format!(
                "the URL is {url} bytes long; the limit is {} bytes",
                limits.max_url_bytes
            ),
        )
        .into_response();
    }
    let headers = header_len(req.headers());
    if headers > limits.max_header_bytes {
        return Problem::status(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request's header fields are {headers} bytes; the limit is {} bytes",
                limits.max_header_bytes
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// The request target's length as sent: path and query, and the scheme and
/// authority of an absolute-form target.
fn url_len(uri: &Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + "://".len());
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let path = uri.path_and_query().map_or(0, |p| p.as_str().len());
    scheme + authority + path
}

/// The header block's length as sent: `name: value` and a line end per field.
fn header_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len())
        .sum()
}

/// Answer 503 when the whole request (body, handler, ledger and broker work)
/// takes longer than the request timeout. The handler is cancelled: what it
/// committed stays committed, so the answer says the outcome is unknown.
async fn deadline(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "Request timed out",
            format!(
                "the request did not complete within {} s and was abandoned; it may or may not \
                 have taken effect: read the resource back, or send the same request again \
                 (batches are idempotent by batch_id)",
                timeout.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// Marks the 500 answered for a panic, for [`log_panics`]; carries its message.
#[derive(Clone)]
struct Panicked(String);

/// [`CatchPanicLayer`]'s answer to a handler panic: a 500 problem that says
/// nothing of the panic itself (it may quote internals), marked for the log.
fn panic_response(payload: Box<dyn Any + Send + 'static>) -> Response {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    };
    let mut response = Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal server error",
        "the server failed while answering this request and has logged the failure; read the \
         resource back before sending the request again",
    )
    .into_response();
    response.extensions_mut().insert(Panicked(message));
    response
}

/// Log a caught panic at ERROR with the method and path, and count it.
async fn log_panics(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut response = next.run(req).await;
    if let Some(Panicked(message)) = response.extensions_mut().remove::<Panicked>() {
        record::task_panic("api", "http");
        tracing::error!(%method, %path, panic = %message, "HTTP handler panicked; answered 500");
    }
    response
}

/// Adds the guards' answers to every operation of the OpenAPI document: 414
/// and 431 everywhere, 503 for the request timeout (added to the description
/// of a documented 503), and 408 where the operation takes a body.
pub struct GuardResponses;

impl utoipa::Modify for GuardResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        const TIMEOUT: &str = "not answered within HOLDFAST_HTTP_REQUEST_TIMEOUT_SECS";
        let problem = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    super::problem::PROBLEM_JSON,
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        for op in super::operations(openapi) {
            let responses = &mut op.responses.responses;
            responses.insert(
                "414".into(),
                problem("URL longer than HOLDFAST_HTTP_MAX_URL_BYTES").into(),
            );
            responses.insert(
                "431".into(),
                problem("Header fields larger than HOLDFAST_HTTP_MAX_HEADER_BYTES").into(),
            );
            match responses.get_mut("503") {
                Some(RefOr::T(documented)) => {
                    documented.description = format!("{}; or {TIMEOUT}", documented.description);
                }
                Some(RefOr::Ref(_)) => {}
                None => {
                    responses.insert("503".into(), problem(&format!("{TIMEOUT}; retry")).into());
                }
            }
            if op.request_body.is_some() {
                responses.insert(
                    "408".into(),
                    problem("The body paused longer than HOLDFAST_HTTP_BODY_TIMEOUT_SECS").into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn lengths_count_what_was_sent() {
        let uri: Uri = "/v1/batches/b-1?x=1".parse().unwrap();
        assert_eq!(url_len(&uri), "/v1/batches/b-1?x=1".len());
        let uri: Uri = "http://example.com:8080/a".parse().unwrap();
        assert_eq!(url_len(&uri), "http://example.com:8080/a".len());

        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("x"));
        headers.append("x-a", HeaderValue::from_static("12345"));
        assert_eq!(
            header_len(&headers),
            "host: x\r\n".len() + "x-a: 12345\r\n".len()
        );
    }
}
