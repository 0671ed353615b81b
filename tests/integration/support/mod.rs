//! The test fleet: each test gets its own PostgreSQL database (created from
//! the migrations) and its own AMQP namespace, so tests run in parallel with
//! no shared state. Everything is removed again when the fleet is dropped,
//! even when the test panics.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use holdfast::fleet::{Fleet, FleetSettings, Roles};
use holdfast::producer::Producer;
use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::{BatchView, Ledger, ReserveInput};
use holdfast_common::messages::{BatchRequest, Decision, Event};
use holdfast_common::topology::{self, Names};
use holdfast_coordinator::keys::{Accounts, KeySpec, KeyStore, Scope};
use holdfast_worker::Generator;
use lapin::options::BasicGetOptions;
use serde_json::{json, Value};

pub const WAIT: Duration = Duration::from_secs(30);

/// The `holdfast` binary with none of the test process's `HOLDFAST_*`
/// variables: the child sees only the settings its test gives it, whatever
/// the shell that runs the tests exports. Cargo names the binary only to the
/// tests of the package that builds it; the tool crates that share this
/// module would find `holdfast` on the PATH.
pub fn holdfast_command() -> tokio::process::Command {
    let exe = option_env!("CARGO_BIN_EXE_holdfast").unwrap_or("holdfast");
    let mut command = tokio::process::Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"HOLDFAST_") {
            command.env_remove(name);
        }
    }
    command
}

/// Connections for a fresh, uniquely named database and namespace.
pub fn unique_connections() -> Connections {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let base = std::env::var("HOLDFAST_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    Connections {
        database_url: format!("{base}/hf_test_{}", &id[..16]),
        amqp_url: std::env::var("HOLDFAST_TEST_AMQP")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        namespace: format!("hf-test-{}", &id[..16]),
        db_pool_size: 8,
        ..Default::default()
    }
}

/// Settings that make a test fast: quick sweeps, short grace periods.
pub fn fast_settings() -> FleetSettings {
    let mut s = FleetSettings {
        http_addr: holdfast::fleet::HttpAddr(None),
        audit_every: 0,
        ..Default::default()
    };
    s.reconciler.sweep_interval_ms = 200;
    s.reconciler.dispatch_grace_secs = 2;
    s.worker.generator_retry_ms = 10;
    s.worker.progress_interval_ms = 100;
    s.worker.shutdown_timeout_secs = 5;
    s.coordinator.coordinator_consumers = 2;
    s
}

/// Removes the database and the queues of a test, whatever happens.
pub struct Cleanup {
    pub conn: Connections,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let conn = self.conn.clone();
        // Drop cannot await: clean up on a runtime of our own, on another thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let endpoint = topology::Endpoint::parse(&conn.amqp_url);
                if let Ok(c) = match endpoint {
                    Ok(e) => e.connect(Default::default()).await,
                    Err(e) => Err(e),
                } {
                    if let Ok(ch) = c.create_channel().await {
                        let _ = topology::delete(&ch, &Names::new(conn.namespace.clone())).await;
                        topology::close_channel(&ch, "cleanup").await;
                    }
                    topology::close(&c, "cleanup").await;
                }
                let _ = database::drop_database(&conn.database_url).await;
            });
        })
        .join();
    }
}

/// A database, a namespace, optionally a running fleet, and a producer.
pub struct TestFleet {
    pub conn: Connections,
    pub settings: FleetSettings,
    pub ledger: Ledger,
    pub names: Names,
    pub fleets: Vec<Fleet>,
    pub producer: Producer,
    _cleanup: Cleanup,
}

impl TestFleet {
    /// Every role, the simulate generator, fast settings.
    pub async fn start() -> Self {
        Self::start_with(fast_settings(), Roles::NO_API, None).await
    }

    /// Fresh database and namespace; start `roles` (none is fine) with `generator` or the configured one.
    pub async fn start_with(
        settings: FleetSettings,
        roles: Roles,
        generator: Option<Arc<dyn Generator>>,
    ) -> Self {
        if std::env::var_os("HOLDFAST_LOG").is_some() {
            holdfast_common::telemetry::init_logging(false);
        }
        // Crash points are for the processes a test starts, never the test itself.
        holdfast_common::faults::disable();
        let conn = unique_connections();
        let cleanup = Cleanup { conn: conn.clone() };
        database::migrate(&conn.database_url)
            .await
            .expect("migrate the test database");
        let names = Names::new(conn.namespace.clone());
        let ledger = Ledger::new(database::pool(&conn.database_url, 4).unwrap());
        let producer = Producer::connect(&conn.amqp_url, &names, &settings.queues)
            .await
            .expect("producer connects");
        let mut fleet = Self {
            conn,
            settings,
            ledger,
            names,
            fleets: Vec::new(),
            producer,
            _cleanup: cleanup,
        };
        if roles.coordinator || roles.worker || roles.reconciler || roles.api {
            fleet.start_roles(roles, generator).await;
        }
        fleet
    }

    /// Start (more) roles in this process.
    pub async fn start_roles(&mut self, roles: Roles, generator: Option<Arc<dyn Generator>>) {
        let generator = match generator {
            Some(g) => g,
            None => holdfast_worker::build_generator(&self.settings.generator).unwrap(),
        };
        let fleet = Fleet::start_with(&self.conn, &self.settings, roles, generator)
            .await
            .expect("fleet starts");
        self.fleets.push(fleet);
    }

    /// Stop the in-process roles (graceful: in-flight items finish).
    pub async fn stop_roles(&mut self) {
        for f in self.fleets.drain(..) {
            f.stop().await;
        }
    }

    /// A new API key on this test's database, as `holdfast key create`
    /// makes one: `scope`, limited to `accounts` (none: every account).
    pub async fn api_key(&self, scope: Scope, accounts: &[&str]) -> String {
        let accounts = if accounts.is_empty() {
            Accounts::All
        } else {
            Accounts::Only(accounts.iter().map(|a| a.to_string()).collect())
        };
        let spec = KeySpec {
            scope,
            accounts,
            expires_at: None,
            name: Some("test".into()),
        };
        KeyStore::new(self.ledger.pool().clone())
            .create(&spec)
            .await
            .expect("create an API key")
            .key
    }

    pub async fn grant(&self, account: &str, amount: i64) {
        self.ledger
            .grant(account, amount, Some("test"), true)
            .await
            .expect("grant");
    }

    pub async fn available(&self, account: &str) -> i64 {
        self.ledger
            .account(account)
            .await
            .expect("account")
            .available
    }

    /// Publish raw bytes as a request and return its decision.
    pub async fn submit_raw(&mut self, body: &[u8]) -> Decision {
        let corr = uuid::Uuid::new_v4().to_string();
        self.producer
            .submit(body, &corr, WAIT)
            .await
            .expect("a decision")
    }

    /// Publish a request (its batch_id is the correlation id) and return its decision.
    pub async fn submit(&mut self, request: &Value) -> Decision {
        let corr = request["batch_id"].as_str().unwrap_or("none").to_string();
        self.producer
            .submit(request.to_string().as_bytes(), &corr, WAIT)
            .await
            .expect("a decision")
    }

    /// The `completed` event for a request submitted with [`submit`].
    pub async fn completed(&mut self, batch_id: &str) -> Event {
        self.producer
            .completed_for(batch_id, WAIT)
            .await
            .expect("a completed event")
    }

    /// Poll the ledger until the batch is closed.
    pub async fn wait_closed(&self, batch_id: &str) -> BatchView {
        eventually(&format!("batch {batch_id} closes"), || async {
            let b = self.ledger.batch(batch_id).await.unwrap()?;
            matches!(
                b.state.as_str(),
                "completed" | "expired" | "cancelled" | "denied"
            )
            .then_some(b)
        })
        .await
    }

    /// Assert the audit finds nothing.
    pub async fn assert_exact(&self) {
        let drift = self.ledger.audit().await.expect("audit runs");
        assert!(drift.is_empty(), "ledger drift: {drift:#?}");
    }

    /// Messages parked in `<ns>.<queue>.dead`, with their `x-holdfast-reason` (or x-death reason).
    pub async fn dead_letters(&self, queue: &str) -> Vec<(Vec<u8>, String)> {
        let conn = lapin::Connection::connect(&self.conn.amqp_url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let name = format!("{}.{queue}.dead", self.names.namespace);
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(name.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let headers = m.delivery.properties.headers().clone().unwrap_or_default();
            let reason = match headers.inner().get("x-holdfast-reason") {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                _ => match headers.inner().get("x-first-death-reason") {
                    Some(lapin::types::AMQPValue::LongString(s)) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    _ => String::new(),
                },
            };
            out.push((m.delivery.data.clone(), reason));
        }
        topology::close(&conn, "bye").await;
        out
    }

    /// Take `n` jobs off the jobs queue and publish each of them `times` times
    /// (duplicate deliveries, as after a crash or a redelivery).
    pub async fn requeue_jobs(&self, n: usize, times: usize) {
        let conn = lapin::Connection::connect(&self.conn.amqp_url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut jobs = Vec::new();
        while jobs.len() < n {
            let job = eventually(
                &format!("job {} of {n} arrives", jobs.len() + 1),
                || async {
                    ch.basic_get(self.names.jobs().into(), BasicGetOptions { no_ack: true })
                        .await
                        .unwrap()
                        .map(|m| m.delivery.data.clone())
                },
            )
            .await;
            jobs.push(job);
        }
        for body in &jobs {
            for _ in 0..times {
                ch.basic_publish(
                    "".into(),
                    self.names.jobs().into(),
                    lapin::options::BasicPublishOptions::default(),
                    body,
                    Default::default(),
                )
                .await
                .unwrap();
            }
        }
        topology::close(&conn, "bye").await;
    }

    /// A reconciler of this namespace for a test to drive with
    /// `sweep_once`, on a connection of its own (keep it while sweeping).
    pub async fn reconciler(
        &self,
    ) -> (
        lapin::Connection,
        holdfast_coordinator::reconcile::Reconciler,
    ) {
        self.reconciler_on(self.ledger.clone()).await
    }

    /// Like [`TestFleet::reconciler`], on `ledger` (a pool of its own, as
    /// another reconciler process would have).
    pub async fn reconciler_on(
        &self,
        ledger: Ledger,
    ) -> (
        lapin::Connection,
        holdfast_coordinator::reconcile::Reconciler,
    ) {
        let amqp = topology::connect(&self.conn.amqp_url, "test-reconciler")
            .await
            .expect("RabbitMQ answers");
        let channel = amqp.create_channel().await.unwrap();
        topology::declare(&channel, &self.names, &self.settings.queues)
            .await
            .unwrap();
        topology::close_channel(&channel, "declared").await;
        let config = holdfast_coordinator::config::ReconcilerConfig {
            amqp_url: self.conn.amqp_url.clone(),
            names: self.names.clone(),
            queues: self.settings.queues.clone(),
            settings: self.settings.reconciler.clone(),
            coordinator: self.settings.coordinator.clone(),
            audit_every: 1,
            heartbeat: Default::default(),
        };
        let publisher = topology::Publisher::new(&amqp).await.unwrap();
        let reconciler =
            holdfast_coordinator::reconcile::Reconciler::new(ledger, publisher, config);
        (amqp, reconciler)
    }

    /// The next job on the jobs queue, unacknowledged, taken on `channel`
    /// (keep it open until the job is acknowledged).
    pub async fn next_job(&self, channel: &lapin::Channel) -> lapin::message::Delivery {
        eventually("a job on the jobs queue", || async {
            channel
                .basic_get(self.names.jobs().into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
                .map(|m| m.delivery)
        })
        .await
    }

    /// Another ledger on this test's database, with a pool of its own.
    pub fn another_ledger(&self) -> Ledger {
        Ledger::new(database::pool(&self.conn.database_url, 4).unwrap())
    }

    pub async fn stop(mut self) {
        self.stop_roles().await;
    }
}

/// Ask `check` every 50 ms until it answers `Some`, and return that; fail
/// the test, naming `what`, if it has not after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the counter `holdfast_task_panics_total{role,task}` in this process.
pub fn task_panics(role: &str, task: &str) -> f64 {
    let wanted = format!("holdfast_task_panics_total{{role=\"{role}\",task=\"{task}\"}}");
    holdfast_common::telemetry::metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A request of `n` items costing `cost` each, ids `i0..`, with an optional simulate payload.
pub fn request(batch_id: &str, account: &str, n: usize, cost: i64) -> Value {
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": cost}))
        .collect();
    json!({"batch_id": batch_id, "account_id": account, "items": items})
}

/// What a coordinator passes the ledger for `req`, with test timings.
pub fn reserve_input(
    req: &BatchRequest,
    execution_timeout: Duration,
    dispatch_grace: Duration,
) -> ReserveInput<'_> {
    ReserveInput {
        request: req,
        reply_to: None,
        correlation_id: None,
        execution_timeout,
        dispatch_grace,
        chunk_size: 10,
    }
}

pub fn granted(d: &Decision) -> &holdfast_common::messages::Granted {
    match d {
        Decision::Granted(g) => g,
        other => panic!("expected granted, got {other:#?}"),
    }
}

pub fn insufficient(d: &Decision) -> &holdfast_common::messages::Insufficient {
    match d {
        Decision::Insufficient(i) => i,
        other => panic!("expected insufficient, got {other:#?}"),
    }
}

pub fn rejected(d: &Decision) -> &holdfast_common::messages::Rejected {
    match d {
        Decision::Rejected(r) => r,
        other => panic!("expected rejected, got {other:#?}"),
    }
}
