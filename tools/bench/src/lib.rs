//! `holdfast bench`: measure Holdfast against the ceilings of the same machine,
//! in one run, side by side.
//!
//! The roles run as real child processes (`holdfast coordinator`, `worker`,
//! `reconciler`) on a fresh database and namespace, so each role's peak RSS is
//! its own. The ceilings are measured with the same settings the roles use:
//! the broker with Holdfast's confirm window and prefetch on a quorum queue
//! declared like the jobs queue; PostgreSQL with one-statement `UPDATE`s of
//! one hot row from as many clients as the coordinator has consumers.

pub mod cpu;
mod naive;

use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use holdfast_common::config::{Connections, CoordinatorSettings, QueueSettings};
use holdfast_common::database;
use holdfast_common::ledger::{Ledger, ReserveInput};
use holdfast_common::messages::{BatchRequest, ItemJob};
use holdfast_common::topology::{self, json_properties, Names, Publisher};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer};
use serde::Serialize;
use serde_json::json;

use crate::cpu::CpuMeter;
use holdfast::producer::Producer;
use holdfast_harness::processes::RoleProcess;

/// What to measure and how much.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Messages for the broker ceiling.
    #[arg(long, default_value_t = 20_000)]
    pub broker_messages: usize,
    /// Seconds of hot-row UPDATEs for the PostgreSQL ceiling.
    #[arg(long, default_value_t = 3)]
    pub pg_seconds: u64,
    /// Small (10-item) batches for the end-to-end run on one hot account.
    #[arg(long, default_value_t = 500)]
    pub small_batches: usize,
    /// Items of the large batch.
    #[arg(long, default_value_t = 10_000)]
    pub large_batch: usize,
    /// Requests for the decision-rate runs.
    #[arg(long, default_value_t = 2_000)]
    pub decisions: usize,
    /// Items run at each batch size of the growth measurement (so every size
    /// is timed over the same work).
    #[arg(long, default_value_t = 10_000)]
    pub growth_items: usize,
    /// Seconds of the half-load latency run.
    #[arg(long, default_value_t = 5)]
    pub latency_seconds: u64,
    /// Keep the bench database afterwards (for a look at it).
    #[arg(long)]
    pub keep: bool,
}

/// One run's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub broker_ceiling_msgs_per_s: f64,
    pub pg_hot_row_updates_per_s: f64,
    pub pg_clients: usize,
    pub e2e_small_batches_items_per_s: f64,
    pub e2e_large_batch_items_per_s: f64,
    pub decisions_hot_account_per_s: f64,
    pub decisions_many_accounts_per_s: f64,
    pub ledger_decisions_hot_account_per_s: f64,
    pub ledger_decisions_many_accounts_per_s: f64,
    pub ledger_group: usize,
    pub decision_latency_ms_p50: f64,
    pub decision_latency_ms_p99: f64,
    pub latency_rate_per_s: f64,
    /// The broker alone at the same rate: a request on a quorum queue, a
    /// consumer that answers at once, the answer on the reply queue.
    pub broker_round_trip_ms_p50: f64,
    pub broker_round_trip_ms_p99: f64,
    /// The same offered rate with the workers running the granted jobs meanwhile.
    pub decision_latency_busy_ms_p50: f64,
    pub decision_latency_busy_ms_p99: f64,
    pub per_item_us_by_batch_size: Vec<(usize, f64)>,
    pub peak_rss_mib: Vec<(String, f64)>,
    pub naive_items_per_s: f64,
    pub naive_batches_half_done: usize,
    pub naive_batches: usize,
    pub holdfast_batches_half_done: usize,
    pub ratio_e2e_to_broker: f64,
    pub ratio_decisions_to_hot_row: f64,
    pub ratio_ledger_decisions_to_hot_row: f64,
    /// Where the CPU went in the end-to-end phases.
    pub cpu: Vec<crate::cpu::CpuSplit>,
}

fn job_body() -> Vec<u8> {
    serde_json::to_vec(&ItemJob {
        batch_id: "bench-batch-000001".into(),
        item_id: "item-000001".into(),
        account_id: "bench-account".into(),
        reserved: 12,
        payload: json!({"prompt": "a product photo of a red bicycle on a white background"}),
        attempt: 1,
    })
    .expect("serialises")
}

fn quorum_queue_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
    t
}

/// Declare `queue` as a durable quorum queue with a delivery limit, like the jobs queue.
pub(crate) async fn declare_quorum(ch: &Channel, queue: &str) -> lapin::Result<()> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_queue_args(),
    )
    .await?;
    Ok(())
}

/// Close `consumers` (the connection holding a queue's consumers), then delete
/// `queue` over a connection of its own. In this order on purpose: RabbitMQ
/// 3.10 crashes a channel that cancels a consumer of a quorum queue already
/// deleted, and closes its connection with 541 INTERNAL_ERROR (the cancel a
/// dropped consumer sends can arrive after the delete).
pub(crate) async fn delete_after(
    consumers: lapin::Connection,
    url: &str,
    queue: &str,
) -> anyhow::Result<()> {
    topology::close(&consumers, "bench").await;
    let conn = topology::connect(url, "holdfast-bench-cleanup").await?;
    let ch = conn.create_channel().await?;
    let deleted = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    // The channel is closed before its connection, not dropped: lapin closes a
    // dropped channel in the background and logs an ERROR if the connection
    // closes meanwhile.
    topology::close_channel(&ch, "bench").await;
    topology::close(&conn, "bench").await;
    deleted?;
    Ok(())
}

/// Consume `queue` on `ch`, at most `prefetch` deliveries unacknowledged.
pub(crate) async fn consume(ch: &Channel, queue: &str, prefetch: u16) -> lapin::Result<Consumer> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Raw persistent, confirmed publishing and acked consuming on a quorum queue.
async fn broker_ceiling(
    url: &str,
    ns: &str,
    n: usize,
    window: usize,
    prefetch: u16,
) -> anyhow::Result<f64> {
    let queue = format!("{ns}.bench-raw");
    let conn = topology::connect(url, "holdfast-bench-publisher").await?;
    let ch = conn.create_channel().await?;
    declare_quorum(&ch, &queue).await?;
    let consumer_conn = topology::connect(url, "holdfast-bench-consumer").await?;
    let cch = consumer_conn.create_channel().await?;
    let mut consumer = consume(&cch, &queue, prefetch).await?;
    let body = job_body();
    let publisher = Publisher::new(&conn).await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let Some(Ok(d)) = consumer.next().await else {
                break;
            };
            d.acker.ack(BasicAckOptions::default()).await?;
            got += 1;
        }
        anyhow::Ok(got)
    });
    for chunk in (0..n).collect::<Vec<_>>().chunks(window) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for _ in chunk {
            confirms.push(
                publisher
                    .publish("", &queue, &body, json_properties())
                    .await?,
            );
        }
        for c in confirms {
            Publisher::confirmed(c, &queue).await?;
        }
    }
    let got = consume.await??;
    let secs = started.elapsed().as_secs_f64();
    // The consumer goes before its queue (see `delete_after`).
    topology::close(&consumer_conn, "bench").await;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    topology::close(&conn, "bench").await;
    anyhow::ensure!(got == n, "broker ceiling: consumed {got} of {n}");
    Ok(n as f64 / secs)
}

/// One-statement UPDATE transactions of one hot row from `clients` connections.
async fn pg_ceiling(url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let pool = database::pool(url, clients)?;
    {
        let c = pool.get().await?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_hot (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO bench_hot VALUES (1, 0) ON CONFLICT DO NOTHING;",
        )
        .await?;
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let c = pool.get().await?;
            let stmt = c
                .prepare("UPDATE bench_hot SET n = n + 1 WHERE id = 1")
                .await?;
            let mut done = 0u64;
            while Instant::now() < until {
                c.execute(&stmt, &[]).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / seconds as f64)
}

/// Reservation decisions in the ledger alone: `clients` tasks (as many as
/// the coordinator has consumers) each decide groups of `group` 10-item
/// requests per transaction (the coordinator's prefetch), `n` in all, with
/// the same entry point the coordinator uses. `accounts` spreads them.
async fn ledger_decisions(
    ledger: &Ledger,
    prefix: &str,
    accounts: &[String],
    n: usize,
    clients: usize,
    group: usize,
) -> anyhow::Result<f64> {
    let requests: Vec<BatchRequest> = (0..n)
        .map(|i| {
            let body = request(
                &format!("{prefix}{i}"),
                &accounts[i % accounts.len()],
                10,
                1,
            );
            serde_json::from_slice(&body).expect("a valid request")
        })
        .collect();
    let requests = std::sync::Arc::new(requests);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (ledger, requests, next) = (ledger.clone(), requests.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(group, std::sync::atomic::Ordering::Relaxed);
                if from >= requests.len() {
                    return anyhow::Ok(());
                }
                let to = (from + group).min(requests.len());
                let inputs: Vec<ReserveInput> = requests[from..to]
                    .iter()
                    .map(|request| ReserveInput {
                        request,
                        reply_to: None,
                        correlation_id: None,
                        execution_timeout: Duration::from_secs(3600),
                        dispatch_grace: Duration::from_secs(3600),
                        chunk_size: 10,
                    })
                    .collect();
                for r in ledger.reserve_many(&inputs).await {
                    anyhow::ensure!(r.is_ok_and(|r| !r.replayed), "a bench decision failed");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// [`ledger_decisions`] on one hot account, then over 100 accounts, in a
/// database of their own (`<bench database>_ledger`, removed afterwards): the
/// batches they grant are never dispatched, and must not reach the fleet.
async fn ledger_decision_rates(
    conn: &Connections,
    n: usize,
    clients: usize,
    group: usize,
) -> anyhow::Result<(f64, f64)> {
    let url = format!("{}_ledger", conn.database_url);
    database::drop_database(&url).await?;
    database::migrate(&url).await?;
    let ledger = Ledger::new(database::pool(&url, clients)?);
    let hot = vec!["hot".to_string()];
    let many: Vec<String> = (0..100).map(|a| format!("acct-{a}")).collect();
    for a in hot.iter().chain(&many) {
        ledger.grant(a, 1_000_000_000, Some("bench"), true).await?;
    }
    let rates = (
        ledger_decisions(&ledger, "lh-", &hot, n, clients, group).await?,
        ledger_decisions(&ledger, "lm-", &many, n, clients, group).await?,
    );
    let drift = ledger.audit().await?;
    anyhow::ensure!(drift.is_empty(), "ledger bench: audit drift {drift:?}");
    drop(ledger);
    database::drop_database(&url).await?;
    Ok(rates)
}

/// The roles as child processes of this binary.
struct Children {
    roles: Vec<RoleProcess>,
}

impl Children {
    fn start(conn: &Connections) -> anyhow::Result<Self> {
        // Every role with the settings it ships with.
        let roles = ["coordinator", "worker", "reconciler"]
            .into_iter()
            .map(|role| RoleProcess::spawn(conn, role, role, &[], None))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { roles })
    }

    /// Pause or resume a role (`STOP` / `CONT`), to measure the others alone.
    async fn signal(&self, role: &str, signal: &str) -> anyhow::Result<()> {
        for p in self.roles.iter().filter(|p| p.role == role) {
            p.signal(signal).await?;
        }
        Ok(())
    }

    /// (pid, role) of each role process, for [`CpuMeter`].
    fn pids(&self) -> Vec<(u32, String)> {
        self.roles
            .iter()
            .filter_map(|p| Some((p.pid()?, p.role.clone())))
            .collect()
    }

    fn peak_rss_mib(&self) -> Vec<(String, f64)> {
        self.roles
            .iter()
            .filter_map(|p| Some((p.role.clone(), p.peak_rss_mib()?)))
            .collect()
    }

    async fn stop(mut self) {
        for p in &mut self.roles {
            p.terminate(Duration::from_secs(10)).await;
        }
    }
}

fn request(batch_id: &str, account: &str, n: usize, cost: i64) -> Vec<u8> {
    let items: Vec<_> = (0..n)
        .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": cost}))
        .collect();
    json!({"batch_id": batch_id, "account_id": account, "items": items})
        .to_string()
        .into_bytes()
}

async fn count(ledger: &Ledger, sql: &str, prefix: &str) -> anyhow::Result<i64> {
    let c = ledger.pool().get().await?;
    Ok(c.query_one(sql, &[&format!("{prefix}%")]).await?.get(0))
}

/// Wait until every batch whose id starts with `prefix` is closed (or denied); returns when.
async fn wait_closed(ledger: &Ledger, prefix: &str, expected: i64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let closed = count(
            ledger,
            "SELECT count(*) FROM batches WHERE id LIKE $1 AND state IN ('completed', 'denied', 'expired', 'cancelled')",
            prefix,
        )
        .await?;
        if closed >= expected {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{prefix}: {closed} of {expected} closed after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_decided(ledger: &Ledger, prefix: &str, expected: i64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if count(
            ledger,
            "SELECT count(*) FROM batches WHERE id LIKE $1",
            prefix,
        )
        .await?
            >= expected
        {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{prefix}: not all decided after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publish `bodies` as fast as confirms allow (windows of 500), from one producer.
async fn publish_all(producer: &Producer, bodies: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    producer.send_many(bodies, 500).await
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Run every measurement. `conn` names the services; the bench uses its own
/// database (`<name>_bench`) and namespace, both removed afterwards.
pub async fn run(conn: &Connections, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let mut conn = conn.clone();
    conn.database_url = format!("{}_bench", conn.database_url);
    conn.namespace = format!("{}-bench-{}", conn.namespace, std::process::id());
    database::drop_database(&conn.database_url).await?;
    database::migrate(&conn.database_url).await?;
    let names = Names::new(conn.namespace.clone());
    let queues = QueueSettings::default();
    let coordinator = CoordinatorSettings::default();
    let prefetch = holdfast::fleet::FleetSettings::default()
        .worker
        .worker_prefetch;
    let mut r = BenchReport {
        machine: format!("{} cores, {}", num_cpus(), os_release()),
        pg_clients: coordinator.coordinator_consumers,
        ..Default::default()
    };

    eprintln!("bench: broker ceiling ({} messages)", args.broker_messages);
    let cpu = CpuMeter::start(vec![]);
    r.broker_ceiling_msgs_per_s = broker_ceiling(
        &conn.amqp_url,
        &conn.namespace,
        args.broker_messages,
        coordinator.confirm_window,
        prefetch,
    )
    .await?;
    r.cpu.push(cpu.stop(&format!(
        "broker ceiling, {} messages",
        args.broker_messages
    )));
    eprintln!(
        "bench: PostgreSQL hot-row ceiling ({} s, {} clients)",
        args.pg_seconds, r.pg_clients
    );
    r.pg_hot_row_updates_per_s =
        pg_ceiling(&conn.database_url, r.pg_clients, args.pg_seconds).await?;

    let ledger = Ledger::new(database::pool(&conn.database_url, 4)?);
    ledger
        .grant("hot", 1_000_000_000, Some("bench"), true)
        .await?;
    eprintln!(
        "bench: ledger decisions ({} requests, {} clients, {} per transaction)",
        args.decisions * 5,
        r.pg_clients,
        coordinator.coordinator_prefetch
    );
    r.ledger_group = usize::from(coordinator.coordinator_prefetch);
    (
        r.ledger_decisions_hot_account_per_s,
        r.ledger_decisions_many_accounts_per_s,
    ) = ledger_decision_rates(&conn, args.decisions * 5, r.pg_clients, r.ledger_group).await?;
    // The producer declares the topology before the role processes start, so
    // that they do not race each other to create its quorum queues.
    let producer = Producer::connect(&conn.amqp_url, &names, &queues).await?;
    let children = Children::start(&conn)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Warm up: a few batches through the whole fleet.
    let warm: Vec<_> = (0..20)
        .map(|i| {
            (
                format!("warm-{i}"),
                request(&format!("warm-{i}"), "hot", 10, 1),
            )
        })
        .collect();
    publish_all(&producer, &warm).await?;
    wait_closed(&ledger, "warm-", 20).await?;

    eprintln!(
        "bench: end to end, {} batches of 10 items on one account",
        args.small_batches
    );
    let small: Vec<_> = (0..args.small_batches)
        .map(|i| {
            (
                format!("small-{i}"),
                request(&format!("small-{i}"), "hot", 10, 1),
            )
        })
        .collect();
    let cpu = CpuMeter::start(children.pids());
    let started = Instant::now();
    publish_all(&producer, &small).await?;
    let done = wait_closed(&ledger, "small-", small.len() as i64).await?;
    r.cpu
        .push(cpu.stop(&format!("{} items in 10-item batches", small.len() * 10)));
    r.e2e_small_batches_items_per_s = (small.len() * 10) as f64 / (done - started).as_secs_f64();

    eprintln!("bench: end to end, one batch of {} items", args.large_batch);
    let cpu = CpuMeter::start(children.pids());
    let started = Instant::now();
    publish_all(
        &producer,
        &[(
            "large-0".into(),
            request("large-0", "hot", args.large_batch, 1),
        )],
    )
    .await?;
    let done = wait_closed(&ledger, "large-", 1).await?;
    r.cpu
        .push(cpu.stop(&format!("{} items in one batch", args.large_batch)));
    r.e2e_large_batch_items_per_s = args.large_batch as f64 / (done - started).as_secs_f64();

    eprintln!("bench: time per item by batch size");
    for (k, size) in [10usize, 100, 1_000, 10_000].into_iter().enumerate() {
        let prefix = format!("growth{k}-");
        // The same number of items at every size: a size timed over less
        // work would be timed mostly on the pipeline filling and draining.
        let n = (args.growth_items / size).max(1);
        let bodies: Vec<_> = (0..n)
            .map(|i| {
                (
                    format!("{prefix}{i}"),
                    request(&format!("{prefix}{i}"), "hot", size, 1),
                )
            })
            .collect();
        let started = Instant::now();
        publish_all(&producer, &bodies).await?;
        let done = wait_closed(&ledger, &prefix, n as i64).await?;
        r.per_item_us_by_batch_size.push((
            size,
            (done - started).as_secs_f64() * 1e6 / (n * size) as f64,
        ));
    }

    // Decisions alone: the worker paused, so jobs wait in the queue.
    children.signal("worker", "STOP").await?;
    eprintln!(
        "bench: decisions on one hot account ({} requests)",
        args.decisions
    );
    let bodies: Vec<_> = (0..args.decisions)
        .map(|i| (format!("dh-{i}"), request(&format!("dh-{i}"), "hot", 1, 1)))
        .collect();
    let started = Instant::now();
    publish_all(&producer, &bodies).await?;
    let done = wait_decided(&ledger, "dh-", bodies.len() as i64).await?;
    r.decisions_hot_account_per_s = bodies.len() as f64 / (done - started).as_secs_f64();
    eprintln!("bench: decisions over 100 accounts");
    for a in 0..100 {
        ledger
            .grant(&format!("acct-{a}"), 1_000_000, None, true)
            .await?;
    }
    let bodies: Vec<_> = (0..args.decisions)
        .map(|i| {
            (
                format!("dm-{i}"),
                request(&format!("dm-{i}"), &format!("acct-{}", i % 100), 1, 1),
            )
        })
        .collect();
    let started = Instant::now();
    publish_all(&producer, &bodies).await?;
    let done = wait_decided(&ledger, "dm-", bodies.len() as i64).await?;
    r.decisions_many_accounts_per_s = bodies.len() as f64 / (done - started).as_secs_f64();
    // Latency at half the rate just measured, under the same conditions
    // (workers paused), then again with the workers running the jobs.
    eprintln!("bench: decision latency at half load");
    r.latency_rate_per_s = (r.decisions_hot_account_per_s / 2.0).max(1.0);
    (r.decision_latency_ms_p50, r.decision_latency_ms_p99) = latency(
        &conn,
        &names,
        &queues,
        &names.requests(),
        "lat-",
        r.latency_rate_per_s,
        args.latency_seconds,
    )
    .await?;
    eprintln!("bench: the broker's own round trip at the same rate");
    (r.broker_round_trip_ms_p50, r.broker_round_trip_ms_p99) = broker_round_trip(
        &conn,
        &names,
        &queues,
        r.latency_rate_per_s,
        args.latency_seconds,
        coordinator.coordinator_prefetch,
    )
    .await?;
    children.signal("worker", "CONT").await?;
    wait_closed(&ledger, "dm-", args.decisions as i64).await?;
    eprintln!("bench: decision latency at half load, workers running");
    (
        r.decision_latency_busy_ms_p50,
        r.decision_latency_busy_ms_p99,
    ) = latency(
        &conn,
        &names,
        &queues,
        &names.requests(),
        "latbusy-",
        r.latency_rate_per_s,
        args.latency_seconds,
    )
    .await?;

    r.peak_rss_mib = children.peak_rss_mib();
    children.stop().await;
    producer.close().await;

    eprintln!("bench: naive per-item quota baseline");
    let naive = crate::naive::run(&conn, 40, 10, 5, r.pg_clients).await?;
    r.naive_items_per_s = naive.items_per_s;
    r.naive_batches_half_done = naive.half_done;
    r.naive_batches = naive.batches;
    r.holdfast_batches_half_done = count(
        &ledger,
        "SELECT count(*) FROM batches WHERE id LIKE $1 AND state = 'completed' AND succeeded <> run_count",
        "",
    )
    .await? as usize;

    r.ratio_e2e_to_broker = r.e2e_small_batches_items_per_s / r.broker_ceiling_msgs_per_s;
    r.ratio_decisions_to_hot_row = r.decisions_hot_account_per_s / r.pg_hot_row_updates_per_s;
    r.ratio_ledger_decisions_to_hot_row =
        r.ledger_decisions_hot_account_per_s / r.pg_hot_row_updates_per_s;
    let c = lapin::Connection::connect(&conn.amqp_url, Default::default()).await?;
    let ch = c.create_channel().await?;
    let deleted = topology::delete(&ch, &names).await;
    topology::close_channel(&ch, "bench").await;
    topology::close(&c, "bench").await;
    deleted?;
    // The pool goes first: dropping the database ends its connections, which
    // deadpool would log as errors.
    drop(ledger);
    if !args.keep {
        database::drop_database(&conn.database_url).await?;
    }
    Ok(r)
}

/// The floor under decision latency: requests at `rate` on a quorum queue
/// declared like the requests queue, one consumer (with the coordinator's
/// prefetch) that answers each at once to its `reply_to` and acks it, timed
/// like [`latency`]. No PostgreSQL, no decision: the broker's part alone.
async fn broker_round_trip(
    conn: &Connections,
    names: &Names,
    queues: &QueueSettings,
    rate: f64,
    seconds: u64,
    prefetch: u16,
) -> anyhow::Result<(f64, f64)> {
    let queue = format!("{}.bench-echo", conn.namespace);
    let amqp = topology::connect(&conn.amqp_url, "holdfast-bench-echo").await?;
    let ch = amqp.create_channel().await?;
    declare_quorum(&ch, &queue).await?;
    let mut deliveries = consume(&ch, &queue, prefetch).await?;
    let tag = deliveries.tag();
    let publisher = Publisher::new(&amqp).await?;
    let mut echo = tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let to = holdfast_common::events::ReplyTo::of(&d.properties);
            let mut props = json_properties();
            if let Some(c) = to.correlation_id {
                props = props.with_correlation_id(c.into());
            }
            let _confirm = publisher
                .publish("", to.queue.as_deref().unwrap_or_default(), &d.data, props)
                .await?;
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok(())
    });
    let measured = latency(conn, names, queues, &queue, "echo-", rate, seconds).await;
    // The echo stops when its consumer is cancelled (its stream ends).
    let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
    if tokio::time::timeout(Duration::from_secs(5), &mut echo)
        .await
        .is_err()
    {
        echo.abort();
    }
    delete_after(amqp, &conn.amqp_url, &queue).await?;
    measured
}

/// Send requests at `rate` per second for `seconds` and time each decision,
/// from its publish to the arrival of its decision on the reply queue (read
/// concurrently, so a reply is timed when it arrives, not when looked at).
async fn latency(
    conn: &Connections,
    names: &Names,
    queues: &QueueSettings,
    queue: &str,
    prefix: &str,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<(f64, f64)> {
    let amqp = topology::connect(&conn.amqp_url, "holdfast-bench-latency").await?;
    let ch = amqp.create_channel().await?;
    topology::declare(&ch, names, queues).await?;
    let reply = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reply_queue = reply.name().to_string();
    let mut replies = ch
        .basic_consume(
            reply_queue.clone().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let n = (rate * seconds as f64) as usize;
    let arrived = tokio::spawn(async move {
        let mut at = std::collections::HashMap::with_capacity(n);
        while at.len() < n {
            match tokio::time::timeout(Duration::from_secs(60), replies.next()).await {
                Ok(Some(Ok(d))) => {
                    let id = d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    // The first answer per request is its decision (a summary may follow).
                    at.entry(id).or_insert_with(Instant::now);
                }
                _ => break,
            }
        }
        at
    });
    let publisher = Publisher::new(&amqp).await?;
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut sent = Vec::with_capacity(n);
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + gap * i as u32).await;
        let id = format!("{prefix}{i}");
        let props = json_properties()
            .with_reply_to(reply_queue.clone().into())
            .with_correlation_id(id.clone().into());
        let at = Instant::now();
        // Not waiting for the confirm here keeps the offered rate steady.
        let _confirm = publisher
            .publish("", queue, &request(&id, "hot", 1, 1), props)
            .await?;
        sent.push((id, at));
    }
    let arrived = arrived.await?;
    topology::close(&amqp, "bench").await;
    let mut ms: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            arrived
                .get(id)
                .map(|got| got.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(
        ms.len() == n,
        "latency: {} of {n} decisions arrived",
        ms.len()
    );
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn os_release() -> String {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB RAM", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    mem
}

/// Print the report as a table.
pub fn print(r: &BenchReport) {
    println!("Holdfast bench on {}", r.machine);
    println!("  {:<52} {:>12}", "measure", "value");
    let rows: Vec<(String, String)> = vec![
        (
            "broker ceiling (quorum, confirms, acked) msg/s".into(),
            format!("{:.0}", r.broker_ceiling_msgs_per_s),
        ),
        (
            format!("PostgreSQL hot-row UPDATE tx/s ({} clients)", r.pg_clients),
            format!("{:.0}", r.pg_hot_row_updates_per_s),
        ),
        (
            "end to end, 10-item batches, one account, items/s".into(),
            format!("{:.0}", r.e2e_small_batches_items_per_s),
        ),
        (
            "end to end, one large batch, items/s".into(),
            format!("{:.0}", r.e2e_large_batch_items_per_s),
        ),
        (
            "decisions/s, one hot account".into(),
            format!("{:.0}", r.decisions_hot_account_per_s),
        ),
        (
            "decisions/s, 100 accounts".into(),
            format!("{:.0}", r.decisions_many_accounts_per_s),
        ),
        (
            format!(
                "ledger decisions/s, one hot account ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_hot_account_per_s),
        ),
        (
            format!(
                "ledger decisions/s, 100 accounts ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_many_accounts_per_s),
        ),
        (
            format!("decision latency p50 ms at {:.0}/s", r.latency_rate_per_s),
            format!("{:.1}", r.decision_latency_ms_p50),
        ),
        (
            format!("decision latency p99 ms at {:.0}/s", r.latency_rate_per_s),
            format!("{:.1}", r.decision_latency_ms_p99),
        ),
        (
            format!(
                "  the broker alone (echo), p50 / p99 ms at {:.0}/s",
                r.latency_rate_per_s
            ),
            format!(
                "{:.1} / {:.1}",
                r.broker_round_trip_ms_p50, r.broker_round_trip_ms_p99
            ),
        ),
        (
            format!(
                "  same, workers running the jobs: p50 ms at {:.0}/s",
                r.latency_rate_per_s
            ),
            format!("{:.1}", r.decision_latency_busy_ms_p50),
        ),
        (
            format!(
                "  same, workers running the jobs: p99 ms at {:.0}/s",
                r.latency_rate_per_s
            ),
            format!("{:.1}", r.decision_latency_busy_ms_p99),
        ),
        (
            "naive per-item quota, items/s".into(),
            format!("{:.0}", r.naive_items_per_s),
        ),
        (
            "naive: batches left half done".into(),
            format!("{} of {}", r.naive_batches_half_done, r.naive_batches),
        ),
        (
            "holdfast: batches left half done".into(),
            format!("{}", r.holdfast_batches_half_done),
        ),
        (
            "ratio end to end / broker ceiling".into(),
            format!("{:.2}", r.ratio_e2e_to_broker),
        ),
        (
            "ratio decisions / hot-row ceiling".into(),
            format!("{:.2}", r.ratio_decisions_to_hot_row),
        ),
        (
            "ratio ledger decisions / hot-row ceiling".into(),
            format!("{:.2}", r.ratio_ledger_decisions_to_hot_row),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<52} {v:>12}");
    }
    for (size, us) in &r.per_item_us_by_batch_size {
        println!(
            "  {:<52} {:>12.1}",
            format!("time per item (µs), batches of {size}"),
            us
        );
    }
    for (role, mib) in &r.peak_rss_mib {
        println!("  {:<52} {:>12.1}", format!("peak RSS MiB, {role}"), mib);
    }
    for split in &r.cpu {
        println!(
            "CPU seconds, {} ({:.1} s wall, {} cores):",
            split.phase,
            split.wall_seconds,
            num_cpus()
        );
        for (component, seconds) in &split.cpu_seconds {
            println!("  {component:<52} {seconds:>12.2}");
        }
    }
}
