//! Starting roles in one process. `holdfast run` starts them all; the single
//! role commands start one; tests start a fleet per test on their own
//! database and namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use holdfast_common::config::{Connections, Limits, QueueSettings};
use holdfast_common::database;
use holdfast_common::ledger::Ledger;
use holdfast_common::supervise::Heartbeat;
use holdfast_common::telemetry;
use holdfast_common::topology::{self, Names};
use holdfast_coordinator::api::{self, ApiSettings, ApiState};
use holdfast_coordinator::config::{
    CoordinatorConfig, CoordinatorSettings, ReconcilerConfig, ReconcilerSettings,
};
use holdfast_coordinator::{reconcile, requests};
use holdfast_worker::config::{WorkerConfig, WorkerSettings};
use holdfast_worker::consume;
use holdfast_worker::{Generator, GeneratorSettings};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Every setting of every role.
#[derive(Args, Clone, Debug, Default)]
pub struct FleetSettings {
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub queues: QueueSettings,
    #[command(flatten)]
    pub coordinator: CoordinatorSettings,
    #[command(flatten)]
    pub reconciler: ReconcilerSettings,
    #[command(flatten)]
    pub worker: WorkerSettings,
    #[command(flatten)]
    pub generator: GeneratorSettings,
    #[command(flatten)]
    pub api: ApiSettings,
    /// Address of the HTTP API (health, metrics, views), or `off`.
    #[arg(
        long,
        env = "HOLDFAST_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        help_heading = "HTTP API"
    )]
    pub http_addr: HttpAddr,
    /// Audit the ledger every this many reconciler sweeps (0: never).
    #[arg(
        long,
        env = "HOLDFAST_AUDIT_EVERY",
        default_value_t = 12,
        help_heading = "Reconciler"
    )]
    pub audit_every: u64,
    /// How often the outbox relay looks for events to publish, in ms, besides
    /// being woken by this process's own commits (the safety net for rows
    /// other processes left behind).
    #[arg(long, env = "HOLDFAST_OUTBOX_POLL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub outbox_poll_ms: u64,
    /// Run no outbox relay in this process (events wait in the outbox for
    /// another process's relay). Only a process that runs a coordinator
    /// relays at all. For tests and fault drills.
    #[arg(long, env = "HOLDFAST_OUTBOX_RELAY_OFF", default_value_t = false)]
    pub outbox_relay_off: bool,
}

/// Where the HTTP API listens; `off` for nowhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpAddr(pub Option<SocketAddr>);

impl std::str::FromStr for HttpAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "off" | "none" => Ok(HttpAddr(None)),
            a => a.parse().map(|a| HttpAddr(Some(a))).map_err(|e| {
                format!("`{a}` is not an address like 127.0.0.1:8080 (or `off`): {e}")
            }),
        }
    }
}

/// Which roles a process runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Roles {
    pub coordinator: bool,
    pub worker: bool,
    pub reconciler: bool,
    pub api: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        coordinator: true,
        worker: true,
        reconciler: true,
        api: true,
    };
    /// Every role but the HTTP API.
    pub const NO_API: Roles = Roles {
        coordinator: true,
        worker: true,
        reconciler: true,
        api: false,
    };
    /// The coordinator alone: requests are decided, jobs wait in the queue.
    pub const COORDINATOR: Roles = Roles {
        coordinator: true,
        worker: false,
        reconciler: false,
        api: false,
    };
}

/// A running set of roles; stop it with [`Fleet::stop`].
pub struct Fleet {
    shutdown: CancellationToken,
    tasks: TaskTracker,
    pub ledger: Ledger,
    pub names: Names,
    http_addr: Option<SocketAddr>,
}

/// How the coordinator role (and the HTTP API, which decides batch requests too) decides.
fn coordinator_config(
    conn: &Connections,
    settings: &FleetSettings,
    names: &Names,
) -> CoordinatorConfig {
    CoordinatorConfig {
        amqp_url: conn.amqp_url.clone(),
        names: names.clone(),
        queues: settings.queues.clone(),
        limits: settings.limits.clone(),
        settings: settings.coordinator.clone(),
        dispatch_grace: settings.reconciler.dispatch_grace(),
    }
}

/// How long [`declare_first`] may hold up the start.
const DECLARE_FIRST_TIMEOUT: Duration = Duration::from_secs(5);

/// Declare the topology once, on a connection of its own, before the roles
/// start. Every role's session declares it again, which is harmless once the
/// queues run; but when several connections declare a new quorum queue at the
/// same instant, RabbitMQ 3.10 may answer one of them before the queue's
/// process has started, and a consume on that connection then crashes its
/// channel (541 INTERNAL_ERROR; the role reconnects, with an ERROR in the
/// log). A broker that cannot be reached here is not an error: the roles wait
/// for it themselves.
async fn declare_first(conn: &Connections, settings: &FleetSettings, names: &Names) {
    let declare = async {
        let name = format!("holdfast-setup/{}", names.namespace);
        let connection = topology::connect(&conn.amqp_url, &name).await?;
        let declared = async {
            let channel = connection.create_channel().await?;
            let declared = topology::declare(&channel, names, &settings.queues).await;
            // Closed, not dropped: lapin closes a dropped channel in the
            // background, and logs an ERROR if its connection closes meanwhile.
            topology::close_channel(&channel, "declared").await;
            declared
        }
        .await;
        topology::close(&connection, "declared").await;
        declared
    };
    match tokio::time::timeout(DECLARE_FIRST_TIMEOUT, declare).await {
        Ok(Ok(())) => tracing::debug!(namespace = %names.namespace, "topology declared"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "topology not declared before the roles start; they declare it when they connect")
        }
        Err(_) => tracing::warn!(
            timeout = ?DECLARE_FIRST_TIMEOUT,
            "topology not declared before the roles start (RabbitMQ did not answer in time); they declare it when they connect"
        ),
    }
}

impl Fleet {
    /// Start `roles` with the built-in generator of `settings`.
    pub async fn start(
        conn: &Connections,
        settings: &FleetSettings,
        roles: Roles,
    ) -> anyhow::Result<Fleet> {
        let generator = holdfast_worker::build_generator(&settings.generator)?;
        Self::start_with(conn, settings, roles, generator).await
    }

    /// Start `roles`, the workers running `generator`.
    pub async fn start_with(
        conn: &Connections,
        settings: &FleetSettings,
        roles: Roles,
        generator: Arc<dyn Generator>,
    ) -> anyhow::Result<Fleet> {
        let pool = database::pool(&conn.database_url, conn.db_pool_size)?;
        let ledger = Ledger::new(pool).with_dispatch_grace(settings.reconciler.dispatch_grace());
        let names = Names::new(conn.namespace.clone());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        if roles.coordinator || roles.worker || roles.reconciler {
            declare_first(conn, settings, &names).await;
        }
        if roles.coordinator {
            let config = coordinator_config(conn, settings, &names);
            tasks.spawn(requests::run(ledger.clone(), config, shutdown.clone()));
        }
        if roles.worker {
            let config = WorkerConfig {
                amqp_url: conn.amqp_url.clone(),
                names: names.clone(),
                queues: settings.queues.clone(),
                settings: settings.worker.clone(),
            };
            tasks.spawn(consume::run(
                ledger.clone(),
                config,
                generator,
                shutdown.clone(),
            ));
        }
        // The reconciler's sweeps, watched by this process's `/readyz`.
        let heartbeat = Heartbeat::new();
        if roles.reconciler {
            let config = ReconcilerConfig {
                amqp_url: conn.amqp_url.clone(),
                names: names.clone(),
                queues: settings.queues.clone(),
                settings: settings.reconciler.clone(),
                coordinator: settings.coordinator.clone(),
                audit_every: settings.audit_every,
                heartbeat: heartbeat.clone(),
            };
            tasks.spawn(reconcile::run(ledger.clone(), config, shutdown.clone()));
        }
        let mut http_addr = None;
        if let (true, HttpAddr(Some(addr))) = (roles.api, settings.http_addr) {
            let state = ApiState::new(
                ledger.clone(),
                telemetry::metrics(),
                coordinator_config(conn, settings, &names),
                &settings.api,
            )
            .watching_sweeps(
                roles
                    .reconciler
                    .then(|| (heartbeat.clone(), settings.reconciler.sweep_interval())),
            );
            let listener = tokio::net::TcpListener::bind(addr).await?;
            http_addr = Some(listener.local_addr()?);
            let token = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = api::serve_on(state, listener, token).await {
                    tracing::error!(error = format!("{e:#}"), "HTTP API stopped");
                }
            });
        }
        // The outbox relay: every role writes events (decisions, progress,
        // completions) to the outbox; processes that run a coordinator publish
        // them. Only a coordinator's broker user may write to the default
        // exchange (a completed summary goes to its producer's reply queue,
        // which only that exchange reaches); a worker's or reconciler's may
        // not, or it could reach the requests queue by name.
        if roles.coordinator && !settings.outbox_relay_off {
            tasks.spawn(holdfast_common::outbox::relay::run(
                ledger.clone(),
                conn.amqp_url.clone(),
                names.clone(),
                // 0 (a `Default` of the settings): the flag's default.
                Duration::from_millis(match settings.outbox_poll_ms {
                    0 => 500,
                    ms => ms.max(10),
                }),
                shutdown.clone(),
            ));
        }
        tasks.close();
        Ok(Fleet {
            shutdown,
            tasks,
            ledger,
            names,
            http_addr,
        })
    }

    /// Where the HTTP API listens (the bound address: port 0 becomes the real
    /// port), or `None` when this fleet runs no API.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// A token that stops the fleet when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Wait until every role has stopped (after the token is cancelled).
    pub async fn wait(&self) {
        self.tasks.wait().await
    }

    /// Stop every role: consumers stop, in-flight items finish and are acked.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }
}
