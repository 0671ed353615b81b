//! The HTTP API role: preview, soft holds (reservations), batches, accounts,
//! health, readiness and metrics. JSON in and out.
//!
//! Conventions, for every endpoint:
//! - errors are RFC 9457 problem documents (`application/problem+json`):
//!   `type`, `title`, `status`, `detail`, and `errors` (field, reason) for
//!   invalid input — the framework's own rejections included (see [`problem`]);
//! - input is never a 5xx: bad JSON, wrong types, unknown ids are 4xx; only
//!   an unavailable ledger or broker, or a request over the request timeout,
//!   is 503 (retry);
//! - request bodies are limited to `HOLDFAST_MAX_MESSAGE_BYTES` (413), URLs
//!   and header blocks to `HOLDFAST_HTTP_MAX_URL_BYTES` (414) and
//!   `HOLDFAST_HTTP_MAX_HEADER_BYTES` (431);
//! - each API key may send `HOLDFAST_HTTP_KEY_RATE` requests a second (in
//!   bursts of `HOLDFAST_HTTP_KEY_BURST`), then 429 with `Retry-After`
//!   ([`rate`]); at most `HOLDFAST_HTTP_MAX_CONNECTIONS` connections are open
//!   at once ([`server`]);
//! - slow clients are cut off: a request head must arrive within
//!   `HOLDFAST_HTTP_HEADER_TIMEOUT_SECS` (else the connection is closed), a
//!   body may pause for at most `HOLDFAST_HTTP_BODY_TIMEOUT_SECS` (408), a
//!   whole request may take `HOLDFAST_HTTP_REQUEST_TIMEOUT_SECS` (503);
//! - every `/v1` route takes `Authorization: Bearer <API key>` (or the
//!   bootstrap admin token): 401 without a valid one, 403 when the key's
//!   scope or accounts do not cover the request (see [`auth`]); health,
//!   readiness, metrics, the OpenAPI document and the `/demo` page are open;
//! - a handler that panics is answered 500, logged and counted;
//! - the OpenAPI 3 document, generated from these handlers, is at `/openapi.json`.
//!
//! Modules: [`preview`], [`reservations`], [`batches`], [`accounts`],
//! [`allowances`], [`keys`] hold the handlers; [`body`] reads requests; [`auth`]
//! checks credentials, scopes and accounts;
//! [`broker`] is the lazily reconnecting publisher batch requests need;
//! [`server`] accepts connections and [`guard`] wraps every request in the
//! limits, timeouts and panic handling above.

pub mod accounts;
pub mod allowances;
pub mod auth;
pub mod batches;
mod body;
pub mod bounds;
pub mod broker;
pub mod demo_page;
mod guard;
mod heads;
pub mod keys;
pub mod preview;
pub mod problem;
mod rate;
pub mod reservations;
pub mod server;
pub mod spenders;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use clap::Args;
use holdfast_common::ledger::Ledger;
use holdfast_common::supervise::Heartbeat;
use holdfast_common::topology::BrokerNode;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::{OpenApi, ToSchema};

use auth::{Access, ApiKeyScheme, AuthResponses};
pub use broker::Broker;
use guard::GuardResponses;
pub use problem::Problem;
pub use server::ServerLimits;

use crate::config::CoordinatorConfig;

/// Settings of the HTTP API role.
#[derive(Args, Clone)]
#[command(next_help_heading = "HTTP API")]
pub struct ApiSettings {
    /// A bearer token with the admin scope, besides the API keys: the
    /// credential to create the first keys with. Unset: only API keys are
    /// accepted. Prefer the environment variable: flags show in process lists.
    #[arg(long, env = "HOLDFAST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the admin token (e.g. a Docker secret); replaces
    /// --admin-token.
    #[arg(
        long,
        env = "HOLDFAST_ADMIN_TOKEN_FILE",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// Seconds what the database says about an API key is believed: a key
    /// revoked by another process is refused here at most this much later.
    /// 0: every request reads its key from the database.
    #[arg(long, env = "HOLDFAST_API_KEY_CACHE_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=300))]
    pub api_key_cache_secs: u64,

    /// Requests a second each API key (and the admin token) may send to
    /// this process on average; more are answered 429 with Retry-After.
    /// 0: no limit.
    #[arg(long, env = "HOLDFAST_HTTP_KEY_RATE", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub http_key_rate: u32,

    /// Requests an API key may send at once, above its rate, before the
    /// rate applies (a burst).
    #[arg(long, env = "HOLDFAST_HTTP_KEY_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_key_burst: u32,

    /// Most HTTP connections open at once; further clients wait in the
    /// listen queue until one closes.
    #[arg(long, env = "HOLDFAST_HTTP_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections: u32,

    /// Let the reference page at `/demo` add credits (`POST /demo/grant`)
    /// with a producer key of the account, without the admin scope. For
    /// demonstrations only: every producer key can then grant credits to its
    /// accounts.
    #[arg(long, env = "HOLDFAST_DEMO_GRANTS", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub demo_grants: bool,

    /// Seconds a client has to send a whole request head (request line and
    /// headers); then, and after as long idle between two requests, the
    /// connection is closed without an answer.
    #[arg(long, env = "HOLDFAST_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_header_timeout_secs: u64,

    /// Seconds a request body may pause before the request is answered 408.
    #[arg(long, env = "HOLDFAST_HTTP_BODY_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_body_timeout_secs: u64,

    /// Seconds a whole request (body and handling) may take before it is
    /// answered 503; also how long a shutdown waits for requests in flight.
    #[arg(long, env = "HOLDFAST_HTTP_REQUEST_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_request_timeout_secs: u64,

    /// Longest URL (path and query) in bytes; longer ones are answered 414.
    #[arg(long, env = "HOLDFAST_HTTP_MAX_URL_BYTES", default_value_t = 8 * 1024,
          value_parser = clap::value_parser!(u32).range(256..=server::HYPER_MAX_URL_BYTES as i64))]
    pub http_max_url_bytes: u32,

    /// Largest header block in bytes (each field counted as `name: value`
    /// and a line end); larger ones are answered 431.
    #[arg(long, env = "HOLDFAST_HTTP_MAX_HEADER_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=64 * 1024))]
    pub http_max_header_bytes: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        let limits = ServerLimits::default();
        Self {
            admin_token: None,
            admin_token_file: None,
            api_key_cache_secs: 10,
            http_key_rate: 50,
            http_key_burst: 100,
            http_max_connections: limits.max_connections as u32,
            demo_grants: false,
            http_header_timeout_secs: limits.header_timeout.as_secs(),
            http_body_timeout_secs: limits.body_timeout.as_secs(),
            http_request_timeout_secs: limits.request_timeout.as_secs(),
            http_max_url_bytes: limits.max_url_bytes as u32,
            http_max_header_bytes: limits.max_header_bytes as u32,
        }
    }
}

impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("admin_token_file", &self.admin_token_file)
            .field("api_key_cache_secs", &self.api_key_cache_secs)
            .field("http_key_rate", &self.http_key_rate)
            .field("http_key_burst", &self.http_key_burst)
            .field("demo_grants", &self.demo_grants)
            .field("server_limits", &self.server_limits())
            .finish()
    }
}

impl ApiSettings {
    /// Read the admin token from `admin_token_file`, if one is given. Call
    /// once, after parsing the command line.
    pub fn load_secret_files(&mut self) -> Result<(), holdfast_common::config::SecretError> {
        if let Some(path) = &self.admin_token_file {
            self.admin_token = Some(holdfast_common::config::read_secret(path)?);
        }
        Ok(())
    }

    /// The limits and timeouts of the HTTP server.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            body_timeout: Duration::from_secs(self.http_body_timeout_secs),
            request_timeout: Duration::from_secs(self.http_request_timeout_secs),
            max_url_bytes: self.http_max_url_bytes as usize,
            max_header_bytes: self.http_max_header_bytes as usize,
            max_connections: self.http_max_connections as usize,
        }
    }
}

/// Shared state of the handlers. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// The credit ledger.
    pub ledger: Ledger,
    /// Rendered at `/metrics`.
    pub metrics: PrometheusHandle,
    /// How batch requests are decided and dispatched (as by the coordinator role).
    pub config: Arc<CoordinatorConfig>,
    /// The credentials: the admin token and the API keys.
    pub access: Arc<Access>,
    /// RabbitMQ, connected on first use.
    pub broker: Arc<Broker>,
    /// Whether the reference page may add credits (`HOLDFAST_DEMO_GRANTS=1`).
    pub demo_grants: bool,
    /// The sweeps of a reconciler running in this process, and their
    /// interval: `/readyz` fails when the last one that ran to its end is
    /// older than [`STALE_SWEEPS`] intervals.
    pub sweeps: Option<(Heartbeat, Duration)>,
    /// `/openapi.json`, rendered once with this process's limits.
    pub openapi: Arc<str>,
    /// Limits and timeouts of the HTTP server.
    pub server: ServerLimits,
}

/// How many sweep intervals may pass without a complete sweep before a
/// process running a reconciler is not ready.
pub const STALE_SWEEPS: u32 = 3;

impl ApiState {
    /// State for a ledger and a coordinator configuration; the broker connects on first use.
    pub fn new(
        ledger: Ledger,
        metrics: PrometheusHandle,
        config: CoordinatorConfig,
        settings: &ApiSettings,
    ) -> Self {
        let broker = Broker::new(
            config.amqp_url.clone(),
            config.names.clone(),
            config.queues.clone(),
        );
        // Strings, numbers and maps always serialise.
        let openapi = openapi_document(&config)
            .to_pretty_json()
            .unwrap_or_default();
        Self {
            access: Arc::new(Access::new(
                settings.admin_token.as_deref(),
                crate::keys::KeyStore::new(ledger.pool().clone()),
                Duration::from_secs(settings.api_key_cache_secs),
                settings.http_key_rate,
                settings.http_key_burst,
            )),
            ledger,
            metrics,
            config: Arc::new(config),
            broker: Arc::new(broker),
            demo_grants: settings.demo_grants,
            sweeps: None,
            openapi: openapi.into(),
            server: settings.server_limits(),
        }
    }

    /// Let `/readyz` watch the sweeps of this process's reconciler, if it runs one.
    pub fn watching_sweeps(mut self, sweeps: Option<(Heartbeat, Duration)>) -> Self {
        self.sweeps = sweeps;
        self
    }
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Holdfast",
        description = "Credit quotas for Generate All batches: price the batch, take one hold, run only what was granted. Every error is application/problem+json."
    ),
    paths(
        preview::preview,
        reservations::create,
        reservations::show,
        reservations::cancel,
        batches::submit,
        batches::show,
        batches::cancel,
        accounts::show,
        accounts::grant,
        accounts::void,
        allowances::create,
        allowances::change,
        allowances::stop,
        spenders::put,
        spenders::show,
        spenders::list,
        spenders::delete,
        keys::create,
        keys::list,
        keys::show,
        keys::revoke,
        healthz,
        ready,
        metrics,
    ),
    components(schemas(Problem)),
    modifiers(&ApiKeyScheme, &AuthResponses, &GuardResponses),
    tags(
        (name = "preview", description = "What a batch costs and what fits; holds nothing"),
        (name = "reservations", description = "Soft holds with a TTL"),
        (name = "batches", description = "Submit, follow and cancel batches"),
        (name = "accounts", description = "Balances, holds, grants, allowances and spenders"),
        (name = "keys", description = "API keys (admin): create, list, revoke"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

/// Every operation of a document (the methods this API serves).
pub(crate) fn operations(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
    })
}

/// The OpenAPI document with the bounds this process enforces (see [`bounds`]).
pub fn openapi_document(config: &CoordinatorConfig) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let bounds = bounds::Bounds {
        limits: config.limits.clone(),
        max_ttl_secs: config.settings.max_reservation_ttl_secs,
    };
    utoipa::Modify::modify(&bounds, &mut doc);
    doc
}

/// The routes: the open ones, and those behind [`auth::authenticate`], each
/// method with the scope it needs (the same as its OpenAPI `security`).
pub fn router(state: ApiState) -> Router {
    use crate::keys::Scope::{Admin, Producer, Reader};
    let limit = state.config.limits.max_message_bytes;
    let needs = |scope| middleware::from_fn_with_state((state.clone(), scope), auth::authenticate);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/demo", get(demo_page::page))
        .route("/demo/demo.css", get(demo_page::css))
        .route("/demo/demo.js", get(demo_page::js))
        .route(
            "/demo/grant",
            post(demo_page::grant).route_layer(needs(Producer)),
        )
        .route(
            "/v1/preview",
            post(preview::preview).route_layer(needs(Producer)),
        )
        .route(
            "/v1/reservations",
            post(reservations::create).route_layer(needs(Producer)),
        )
        .route(
            "/v1/reservations/{id}",
            get(reservations::show)
                .route_layer(needs(Reader))
                .merge(delete(reservations::cancel).route_layer(needs(Producer))),
        )
        .route(
            "/v1/batches",
            post(batches::submit).route_layer(needs(Producer)),
        )
        .route(
            "/v1/batches/{id}",
            get(batches::show).route_layer(needs(Reader)),
        )
        .route(
            "/v1/batches/{id}/cancel",
            post(batches::cancel).route_layer(needs(Producer)),
        )
        .route(
            "/v1/accounts/{id}",
            get(accounts::show).route_layer(needs(Reader)),
        )
        .route(
            "/v1/accounts/{id}/grants",
            post(accounts::grant).route_layer(needs(Admin)),
        )
        .route(
            "/v1/accounts/{id}/grants/{grant_id}",
            delete(accounts::void).route_layer(needs(Admin)),
        )
        .route(
            "/v1/accounts/{id}/allowances",
            post(allowances::create).route_layer(needs(Admin)),
        )
        .route(
            "/v1/accounts/{id}/allowances/{allowance_id}",
            put(allowances::change)
                .delete(allowances::stop)
                .route_layer(needs(Admin)),
        )
        .route(
            "/v1/accounts/{id}/spenders",
            get(spenders::list).route_layer(needs(Admin)),
        )
        .route(
            "/v1/accounts/{id}/spenders/{spender_id}",
            put(spenders::put)
                .get(spenders::show)
                .delete(spenders::delete)
                .route_layer(needs(Admin)),
        )
        .route(
            "/v1/keys",
            post(keys::create).get(keys::list).route_layer(needs(Admin)),
        )
        .route(
            "/v1/keys/{id}",
            get(keys::show)
                .delete(keys::revoke)
                .route_layer(needs(Admin)),
        )
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(problem::problem_responses))
        .with_state(state)
}

async fn openapi(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.openapi.to_string(),
    )
        .into_response()
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = String, content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok"
}

/// Whether each dependency answers, and this process's reconciler sweeps.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// PostgreSQL answers.
    pub postgres: bool,
    /// RabbitMQ accepts a connection.
    pub rabbitmq: bool,
    /// The RabbitMQ node that answered this probe: the first of the
    /// configured list that accepts a connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerNode>,
    /// The node each RabbitMQ connection of this process is on (or was on
    /// last), by connection name (`<role>/<namespace>`).
    pub broker_connections: std::collections::BTreeMap<String, BrokerNode>,
    /// Seconds since this process's reconciler last finished a sweep; absent
    /// when the process runs no reconciler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sweep_secs: Option<f64>,
}

/// Readiness: PostgreSQL and RabbitMQ both answer, and a reconciler running
/// in this process finished a sweep within the last three intervals.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency does not answer, or this process's reconciler stopped sweeping", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn ready(State(s): State<ApiState>) -> Response {
    let (postgres, broker) = tokio::join!(
        s.ledger.ping(),
        holdfast_common::topology::ping_node(&s.config.amqp_url)
    );
    let rabbitmq = broker.is_some();
    let sweep = s.sweeps.as_ref().map(|(beat, interval)| {
        let age = beat.age();
        (age, age <= *interval * STALE_SWEEPS)
    });
    let sweeping = sweep.is_none_or(|(_, fresh)| fresh);
    if postgres && rabbitmq && sweeping {
        return Json(Readiness {
            postgres,
            rabbitmq,
            broker,
            broker_connections: holdfast_common::topology::current_nodes()
                .into_iter()
                .collect(),
            last_sweep_secs: sweep.map(|(age, _)| age.as_secs_f64()),
        })
        .into_response();
    }
    let state = |up: bool| if up { "answers" } else { "does not answer" };
    let mut detail = format!(
        "not ready: PostgreSQL {}, RabbitMQ {}",
        state(postgres),
        state(rabbitmq)
    );
    if let Some((age, false)) = sweep {
        detail.push_str(&format!(
            ", the reconciler's last complete sweep was {:.1} s ago (more than {STALE_SWEEPS} intervals)",
            age.as_secs_f64()
        ));
    }
    Problem::status(StatusCode::SERVICE_UNAVAILABLE, detail).into_response()
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Serve on `addr` until `shutdown`.
pub async fn serve(
    state: ApiState,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(state, listener, shutdown).await
}

/// Serve on a bound listener until `shutdown`, then close the broker link.
pub async fn serve_on(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    let broker = state.broker.clone();
    let limits = state.server;
    server::serve(router(state), listener, limits, shutdown).await;
    broker.close().await;
    Ok(())
}
