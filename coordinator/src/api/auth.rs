//! Who may call the API, and what each caller may do.
//!
//! Every `/v1` route, and the reference page's `POST /demo/grant`, takes
//! `Authorization: Bearer <credential>`: an API key (`hf_live_…`, see
//! [`crate::keys`]) or the bootstrap admin token (`HOLDFAST_ADMIN_TOKEN`,
//! admin scope). [`authenticate`] runs before the handler, in this order:
//!
//! 1. the credential: missing, malformed, unknown, with a wrong secret,
//!    revoked or expired → `401` (one answer for the first four, so a failed
//!    attempt learns nothing; a revoked or expired key is told so, since its
//!    sender proved it holds the key);
//! 2. the key's rate ([`super::rate`]) → `429` with `Retry-After`;
//! 3. the scope the route's method needs (given where the route is made,
//!    in [`super::router`], and in its OpenAPI `security`) → `403`.
//!
//! The handler then checks the account it is about to touch with
//! [`Caller::may_use`] (→ `403`), before the ledger is asked anything: the
//! answer is the same whether the account exists or not. Resources found by
//! id (batches, reservations) are checked with [`Caller::owned`]: for a key
//! limited to some accounts, one of another account and one that does not
//! exist get the same `403`.
//!
//! Secrets are compared in constant time ([`token::matches`],
//! [`token::same_secret`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;
use super::rate::Limiter;
use super::ApiState;
use crate::keys::{token, Accounts, Credentials, KeyStore, Keyring, Scope, Verdict};

/// Every credential check of one process: the admin token, the keys, the rates.
pub struct Access {
    admin_token: Option<Arc<str>>,
    /// The API keys, behind their cache.
    pub keyring: Keyring,
    limiter: Option<Limiter>,
}

impl Access {
    /// `admin_token` (empty is none), keys from `store` cached for
    /// `cache_ttl`, `rate` requests a second per key in bursts of `burst`
    /// (`rate` 0: no limit).
    pub fn new(
        admin_token: Option<&str>,
        store: KeyStore,
        cache_ttl: Duration,
        rate: u32,
        burst: u32,
    ) -> Self {
        Self {
            admin_token: admin_token.filter(|t| !t.is_empty()).map(Arc::from),
            keyring: Keyring::new(store, cache_ttl),
            limiter: Limiter::new(rate, burst),
        }
    }

    /// Who sent `headers`, or the `401` (or `503`, when the keys cannot be read).
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Caller, Problem> {
        let Some(given) = bearer(headers) else {
            return Err(unauthorized(
                "send an API key as `Authorization: Bearer hf_live_…` (see docs/security.md)",
            ));
        };
        if let Some(admin) = &self.admin_token {
            if token::same_secret(given, admin) {
                return Ok(Caller(Who::AdminToken));
            }
        }
        match self.keyring.check(given).await? {
            Verdict::Valid(creds) => Ok(Caller(Who::Key(creds))),
            Verdict::Unknown => Err(unauthorized("the bearer token is not a valid API key")),
            Verdict::Revoked => Err(unauthorized(
                "this API key was revoked; ask an administrator for a new one",
            )),
            Verdict::Expired(at) => Err(unauthorized(format!(
                "this API key expired at {at}; ask an administrator for a new one"
            ))),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
}

#[derive(Clone, Debug)]
enum Who {
    /// `HOLDFAST_ADMIN_TOKEN`: admin, every account.
    AdminToken,
    /// An API key in force.
    Key(Arc<Credentials>),
}

/// Who sent a request, once the credential checked out. Handlers take it as
/// an argument (it is put in place by [`authenticate`]).
#[derive(Clone, Debug)]
pub struct Caller(Who);

impl Caller {
    /// The caller's scope.
    pub fn scope(&self) -> Scope {
        match &self.0 {
            Who::AdminToken => Scope::Admin,
            Who::Key(k) => k.scope,
        }
    }

    /// The key's id; `None` for the admin token.
    pub fn key_id(&self) -> Option<&str> {
        match &self.0 {
            Who::AdminToken => None,
            Who::Key(k) => Some(&k.id),
        }
    }

    fn accounts(&self) -> &Accounts {
        match &self.0 {
            Who::AdminToken => &Accounts::All,
            Who::Key(k) => &k.accounts,
        }
    }

    /// What the caller's requests are counted under: its key's id, or the
    /// admin token's name (no key id has a `-`).
    fn limit_key(&self) -> &str {
        self.key_id().unwrap_or("admin-token")
    }

    /// Whether the caller may use every account.
    pub fn every_account(&self) -> bool {
        matches!(self.accounts(), Accounts::All)
    }

    /// `Ok` if the caller may use `account`; else the `403`, the same
    /// whether the account exists or not (nothing is looked up).
    pub fn may_use(&self, account: &str) -> Result<(), Problem> {
        if self.accounts().covers(account) {
            return Ok(());
        }
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "account-not-allowed",
            "Account not allowed",
            format!("this API key may not use account `{account}`"),
        ))
    }

    /// A resource of some account looked up by id (`what` `id`: "batch
    /// b-1"): `found` if the caller may use its account; else the `403`. For a
    /// key limited to some accounts a missing resource (`Ok(None)`) is the
    /// same `403`, so that ids of other accounts cannot be probed; for
    /// others it is `missing`.
    pub fn owned<T>(
        &self,
        what: &str,
        id: &str,
        found: Option<T>,
        account: impl Fn(&T) -> &str,
        missing: impl FnOnce() -> Problem,
    ) -> Result<T, Problem> {
        let refused = || {
            Problem::new(
                StatusCode::FORBIDDEN,
                "account-not-allowed",
                "Account not allowed",
                format!(
                    "this API key may not use {what} `{id}`: it belongs to an account the key \
                     does not cover, or does not exist"
                ),
            )
        };
        match found {
            Some(t) if self.accounts().covers(account(&t)) => Ok(t),
            Some(_) => Err(refused()),
            None if self.every_account() => Err(missing()),
            None => Err(refused()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        // Only a route behind `authenticate` has one; anything else is refused.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| unauthorized("this route takes no credential"))
    }
}

/// Middleware of an authenticated route, whose handler needs `needed`: the
/// credential (401), the key's rate (429), the scope (403); then the
/// handler, with the [`Caller`].
/// Put on each method of a route (`MethodRouter::route_layer`), so that a
/// method the route does not have stays a 405 and each method has its scope.
pub async fn authenticate(
    State((s, needed)): State<(ApiState, Scope)>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = match s.access.caller(req.headers()).await {
        Ok(caller) => caller,
        Err(problem) => return problem.into_response(),
    };
    if let Some(limiter) = &s.access.limiter {
        if let Err(wait) = limiter.check(caller.limit_key()) {
            return limiter.refusal(wait);
        }
    }
    if !caller.scope().allows(needed) {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        return Problem::new(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            "Insufficient scope",
            format!(
                "a {} key may not {} {route}: it needs the {needed} scope",
                caller.scope(),
                req.method()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The name of the bearer scheme in the OpenAPI document.
pub const SCHEME: &str = "api_key";

/// Declares the `api_key` bearer scheme. Each operation behind
/// [`authenticate`] names it in its `security`, with the scope it needs as
/// the requirement's role (OpenAPI 3.1).
pub struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("hf_live_<id>_<secret>")
                    .description(Some(
                        "An API key (`holdfast key create`, or POST /v1/keys), or the \
                         bootstrap admin token HOLDFAST_ADMIN_TOKEN (admin scope). The \
                         requirement names the scope the operation needs: reader, producer \
                         or admin (each includes the ones before).",
                    ))
                    .build(),
            ),
        );
    }
}

/// Adds the answers of [`authenticate`] to every operation that names the
/// `api_key` scheme: `401` (with `WWW-Authenticate`), `429` (with
/// `Retry-After`) and `403` (merged into a documented `403`'s description).
pub struct AuthResponses;

impl utoipa::Modify for AuthResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Type};
        const FORBIDDEN: &str =
            "The key's scope or accounts do not cover this request (the same answer whether \
             the account exists or not)";
        let problem = |description: &str| {
            ResponseBuilder::new().description(description).content(
                super::problem::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
        };
        let string = || utoipa::openapi::ObjectBuilder::new().schema_type(Type::String);
        let integer = || {
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
        };
        for op in super::operations(openapi) {
            let secured = op.security.as_ref().is_some_and(|reqs| {
                reqs.iter().any(|r| {
                    serde_json::to_value(r)
                        .ok()
                        .is_some_and(|v| v.get(SCHEME).is_some())
                })
            });
            if !secured {
                continue;
            }
            let responses = &mut op.responses.responses;
            responses.insert(
                "401".into(),
                problem("Missing, unknown, revoked or expired API key")
                    .header(
                        "WWW-Authenticate",
                        HeaderBuilder::new()
                            .schema(string())
                            .description(Some("Bearer realm=\"holdfast\""))
                            .build(),
                    )
                    .build()
                    .into(),
            );
            responses.insert(
                "429".into(),
                problem("This key sent more than HOLDFAST_HTTP_KEY_RATE requests a second (in bursts of HOLDFAST_HTTP_KEY_BURST)")
                    .header(
                        "Retry-After",
                        HeaderBuilder::new()
                            .schema(integer())
                            .description(Some("Seconds to wait before sending again"))
                            .build(),
                    )
                    .build()
                    .into(),
            );
            match responses.get_mut("403") {
                Some(RefOr::T(documented)) => {
                    documented.description = format!("{FORBIDDEN}; or {}", documented.description);
                }
                Some(RefOr::Ref(_)) => {}
                None => {
                    responses.insert("403".into(), problem(FORBIDDEN).build().into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer(&headers("Bearer s3cret")), Some("s3cret"));
        assert_eq!(bearer(&headers("bearer  s3cret ")), Some("s3cret"));
        assert_eq!(bearer(&headers("Basic s3cret")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    fn key(accounts: Accounts) -> Caller {
        Caller(Who::Key(Arc::new(Credentials {
            id: "abcdefghijkl".into(),
            hash: vec![0; 32],
            scope: Scope::Producer,
            accounts,
            expires_at: None,
            revoked_at: None,
        })))
    }

    #[test]
    fn a_limited_key_gets_one_answer_for_other_and_missing_resources() {
        let acme = key(Accounts::Only(vec!["acme".into()]));
        let missing = || Problem::status(StatusCode::NOT_FOUND, "no such batch");
        let of = |a: &'static str| Some(a);
        assert!(acme.may_use("acme").is_ok());
        assert_eq!(
            acme.may_use("other").unwrap_err(),
            acme.may_use("other").unwrap_err()
        );
        assert_eq!(acme.may_use("other").unwrap_err().status, 403);
        assert!(acme.owned("batch", "b", of("acme"), |a| a, missing).is_ok());
        let other = acme
            .owned("batch", "b", of("other"), |a| a, missing)
            .unwrap_err();
        let absent = acme
            .owned("batch", "b", None::<&str>, |a| a, missing)
            .unwrap_err();
        assert_eq!(other, absent);
        assert_eq!(other.status, 403);
        let every = key(Accounts::All);
        let absent = every
            .owned("batch", "b", None::<&str>, |a| a, missing)
            .unwrap_err();
        assert_eq!(absent.status, 404);
        assert!(Caller(Who::AdminToken).may_use("anything").is_ok());
    }
}
