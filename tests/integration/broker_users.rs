//! Per-role RabbitMQ users (scripts/rabbitmq-users.sh, `holdfast
//! amqp-permissions`) and account bindings (`HOLDFAST_AMQP_ACCOUNT_BINDINGS`),
//! against real broker users: each test creates its own (unique names) with
//! `rabbitmqctl` and deletes them afterwards.

use holdfast::fleet::{Fleet, Roles};
use holdfast::producer::Producer;
use holdfast_common::config::QueueSettings;
use holdfast_common::topology::{BrokerRole, Names};
use holdfast_coordinator::bindings::AccountBindings;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::support::*;

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (it comes with the rabbitmq-server package)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker user with `role`'s permissions on a namespace; deleted on drop.
struct BrokerUser {
    name: String,
    /// The test's AMQP URL with this user's credentials.
    url: String,
}

impl BrokerUser {
    fn create(role: BrokerRole, names: &Names, base_url: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("hf-test-{role:?}-{}", &id[..12]).to_lowercase();
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", "--", &name, &password]);
        let user = Self {
            url: with_credentials(base_url, &name, &password),
            name,
        };
        let p = names.permissions(role);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            "--",
            &user.name,
            &p.configure,
            &p.write,
            &p.read,
        ]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", "--", &self.name])
            .output();
    }
}

/// `url` with `user:password@` in place of its credentials.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("an AMQP URL");
    let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    format!("{scheme}://{user}:{password}@{host}")
}

/// A producer client of `user` that declares nothing (it has no configure
/// permission on the namespace: the coordinator declared it).
async fn producer_of(user: &BrokerUser, names: &Names) -> Producer {
    let queues = QueueSettings {
        declare: false,
        ..QueueSettings::default()
    };
    Producer::connect(&user.url, names, &queues)
        .await
        .expect("the producer user connects and declares its reply queue")
}

async fn connect(user: &BrokerUser) -> Connection {
    Connection::connect(&user.url, ConnectionProperties::default())
        .await
        .expect("the user logs in")
}

/// Publish one message with confirms on a fresh channel of `conn` and return
/// how the broker refused it (the channel's close, as lapin reports it).
async fn refused_publish(
    conn: &Connection,
    exchange: &str,
    key: &str,
    props: BasicProperties,
) -> String {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let published = async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            props,
        )
        .await?
        .await?;
        // A refusal closes the channel; the next call reports it.
        ch.basic_qos(1, Default::default()).await
    }
    .await;
    match published {
        Err(e) => e.to_string(),
        Ok(()) => panic!("publishing to `{exchange}` with key `{key}` was accepted"),
    }
}

async fn refused_consume(conn: &Connection, queue: &str) -> String {
    let ch = conn.create_channel().await.unwrap();
    match ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Err(e) => e.to_string(),
        Ok(_) => panic!("consuming `{queue}` was allowed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_user_publishes_requests_and_reads_its_answers_but_cannot_consume_jobs() {
    let fleet = TestFleet::start().await;
    let names = fleet.names.clone();
    let producer = BrokerUser::create(BrokerRole::Producer, &names, &fleet.conn.amqp_url);
    fleet.ledger.create_account("acme").await.unwrap();
    fleet.grant("acme", 1_000).await;

    let mut client = producer_of(&producer, &names).await;
    let d = client
        .submit(
            request("pu-1", "acme", 3, 10).to_string().as_bytes(),
            "pu-1",
            WAIT,
        )
        .await
        .expect("a decision");
    granted(&d);
    client.completed_for("pu-1", WAIT).await.expect("completed");

    let conn = connect(&producer).await;
    for queue in [names.jobs(), names.requests(), names.events()] {
        let why = refused_consume(&conn, &queue).await;
        assert!(why.contains("ACCESS_REFUSED"), "{queue}: {why}");
    }
    // The default exchange reaches every queue by name: producers may not write to it.
    let why = refused_publish(&conn, "", &names.jobs(), BasicProperties::default()).await;
    assert!(why.contains("ACCESS_REFUSED"), "{why}");
    let why = refused_publish(&conn, &names.events(), "x", BasicProperties::default()).await;
    assert!(why.contains("ACCESS_REFUSED"), "{why}");
    client.close().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_user_consumes_jobs_but_cannot_publish_or_consume_requests() {
    let fleet = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    let names = fleet.names.clone();
    let worker = BrokerUser::create(BrokerRole::Worker, &names, &fleet.conn.amqp_url);
    let conn = connect(&worker).await;

    let why = refused_publish(
        &conn,
        &names.intake(),
        "requests",
        BasicProperties::default(),
    )
    .await;
    assert!(why.contains("ACCESS_REFUSED"), "{why}");
    // Nor through the default exchange, which reaches every queue by name.
    for queue in [names.requests(), names.previews(), names.jobs()] {
        let why = refused_publish(&conn, "", &queue, BasicProperties::default()).await;
        assert!(why.contains("ACCESS_REFUSED"), "{queue}: {why}");
    }
    for queue in [names.requests(), names.previews()] {
        let why = refused_consume(&conn, &queue).await;
        assert!(why.contains("ACCESS_REFUSED"), "{queue}: {why}");
    }
    // What it may do: consume jobs.
    let ch = conn.create_channel().await.unwrap();
    ch.basic_consume(
        names.jobs().as_str().into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("a worker consumes jobs");
    holdfast_common::topology::close(&conn, "bye").await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_account_bindings_only_a_bound_validated_user_id_is_granted() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (bound_user, other_user) = (
        format!("hf-test-bound-{}", &id[..12]),
        format!("hf-test-other-{}", &id[..12]),
    );
    let mut settings = fast_settings();
    settings.coordinator.amqp_account_bindings =
        Some(AccountBindings::parse(&format!("{bound_user}:acme")).unwrap());
    let fleet = TestFleet::start_with(settings, Roles::NO_API, None).await;
    let names = fleet.names.clone();
    fleet.ledger.create_account("acme").await.unwrap();
    fleet.grant("acme", 1_000).await;

    let make = |name: &str| {
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", "--", name, &password]);
        let user = BrokerUser {
            name: name.to_string(),
            url: with_credentials(&fleet.conn.amqp_url, name, &password),
        };
        let p = names.permissions(BrokerRole::Producer);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            "--",
            name,
            &p.configure,
            &p.write,
            &p.read,
        ]);
        user
    };
    let (bound, other) = (make(&bound_user), make(&other_user));

    // Bound: granted.
    let mut client = producer_of(&bound, &names).await;
    let d = client
        .submit(
            request("bd-1", "acme", 2, 10).to_string().as_bytes(),
            "bd-1",
            WAIT,
        )
        .await
        .unwrap();
    granted(&d);

    // The same login without user_id: rejected, nothing held.
    client.set_user_id(None);
    let d = client
        .submit(
            request("bd-2", "acme", 2, 10).to_string().as_bytes(),
            "bd-2",
            WAIT,
        )
        .await
        .unwrap();
    let r = rejected(&d);
    assert_eq!(r.errors[0].field, "user_id", "{r:?}");
    assert!(r.errors[0].reason.starts_with("is required"), "{r:?}");

    // Another producer, validated by the broker but not bound to acme: rejected.
    let mut stranger = producer_of(&other, &names).await;
    let d = stranger
        .submit(
            request("bd-3", "acme", 2, 10).to_string().as_bytes(),
            "bd-3",
            WAIT,
        )
        .await
        .unwrap();
    let r = rejected(&d);
    assert_eq!(r.errors[0].field, "user_id", "{r:?}");
    assert_eq!(
        r.errors[0].reason,
        format!("user_id `{other_user}` is not bound to account_id `acme`")
    );
    assert_eq!(r.account_id.as_deref(), Some("acme"));
    assert!(fleet.ledger.batch("bd-2").await.unwrap().is_none());
    assert!(fleet.ledger.batch("bd-3").await.unwrap().is_none());

    // Claiming to be the bound user: the broker refuses the message itself.
    stranger.set_user_id(Some(bound_user.clone()));
    let err = stranger
        .submit(
            request("bd-4", "acme", 2, 10).to_string().as_bytes(),
            "bd-4",
            WAIT,
        )
        .await
        .expect_err("a user_id other than the login is refused");
    assert!(
        format!("{err:#}").contains("PRECONDITION_FAILED"),
        "{err:#}"
    );
    assert!(fleet.ledger.batch("bd-4").await.unwrap().is_none());

    // Only the granted batch holds or spent credits.
    let closed = fleet.wait_closed("bd-1").await;
    assert_eq!(closed.batch_id, "bd-1");
    fleet.assert_exact().await;
    client.close().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_creates_a_role_user_with_the_role_permissions_and_deletes_it() {
    let conn = unique_connections();
    let names = Names::new(conn.namespace.clone());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let user = format!("hf-test-script-{}", &id[..12]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-users.sh");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(script)
            .args(args)
            .env("HOLDFAST", env!("CARGO_BIN_EXE_holdfast"))
            .env("HOLDFAST_NAMESPACE", &names.namespace)
            .output()
            .expect("the script runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let _gone = BrokerUser {
        name: user.clone(),
        url: String::new(),
    };
    let said = run(&["create", "worker", &user, "pw-not-secret"]);
    assert!(said.contains(&format!("user {user} (worker)")), "{said}");
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_user_permissions", "--no-table-headers", &user])
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    let p = names.permissions(BrokerRole::Worker);
    assert_eq!(
        listed.trim_end(),
        format!("/\t{}\t{}\t{}", p.configure, p.write, p.read)
    );
    run(&["delete", &user]);
}

/// A least-privilege producer user may not bind a queue to the events
/// exchange (it carries every account's events): `submit --wait` says it
/// sees no progress, and still prints the summary from its reply queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_wait_as_a_producer_user_does_without_progress_events() {
    let fleet = TestFleet::start().await;
    let names = fleet.names.clone();
    let producer = BrokerUser::create(BrokerRole::Producer, &names, &fleet.conn.amqp_url);
    fleet.grant("acme", 1_000).await;
    let file = std::env::temp_dir().join(format!("{}-pw.json", names.namespace));
    std::fs::write(&file, request("pw-1", "acme", 3, 10).to_string()).unwrap();
    let out = holdfast_command()
        .args([
            "submit",
            file.to_str().unwrap(),
            "--wait",
            "--amqp-declare",
            "false",
        ])
        .env("HOLDFAST_DATABASE_URL", &fleet.conn.database_url)
        .env("HOLDFAST_AMQP_URL", &producer.url)
        .env("HOLDFAST_NAMESPACE", &names.namespace)
        .env("HOLDFAST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = names.events();
    assert!(
        text.contains(&format!(
            "batch pw-1: no progress events (cannot bind a queue to `{events}`: "
        )) && text.contains("ACCESS_REFUSED"),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("COMPLETED  batch pw-1: 3 succeeded")),
        "{text}"
    );
    let _ = std::fs::remove_file(&file);
    fleet.stop().await;
}

/// Every role as its own least-privilege broker user, as
/// scripts/rabbitmq-users.sh makes them, each in a fleet of its own: the
/// coordinator decides and relays the events and summaries, the worker runs
/// the jobs and dispatches a sequential batch's next chunks, the reconciler
/// sweeps; the producer hears the decisions and the summaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_does_its_work_as_its_own_broker_user() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let names = t.names.clone();
    let base = t.conn.amqp_url.clone();
    let coordinator = BrokerUser::create(BrokerRole::Coordinator, &names, &base);
    let worker = BrokerUser::create(BrokerRole::Worker, &names, &base);
    let reconciler = BrokerUser::create(BrokerRole::Reconciler, &names, &base);
    let producer = BrokerUser::create(BrokerRole::Producer, &names, &base);
    let generator = holdfast_worker::build_generator(&t.settings.generator).unwrap();
    let only = |f: fn(&mut Roles)| {
        let mut r = Roles::default();
        f(&mut r);
        r
    };
    for (user, roles, declare) in [
        (&coordinator, Roles::COORDINATOR, true),
        (&worker, only(|r| r.worker = true), false),
        (&reconciler, only(|r| r.reconciler = true), false),
    ] {
        let mut conn = t.conn.clone();
        conn.amqp_url = user.url.clone();
        let mut settings = t.settings.clone();
        settings.queues.declare = declare;
        let fleet = Fleet::start_with(&conn, &settings, roles, generator.clone())
            .await
            .unwrap_or_else(|e| panic!("{} starts: {e:#}", user.name));
        t.fleets.push(fleet);
    }
    t.ledger.create_account("acme").await.unwrap();
    t.grant("acme", 1_000).await;

    let mut client = producer_of(&producer, &names).await;
    // Three chunks of the default ten: the worker dispatches the later two.
    let mut seq = request("ru-seq", "acme", 25, 2);
    seq["mode"] = serde_json::json!("sequential");
    for (id, body) in [
        ("ru-plain", request("ru-plain", "acme", 5, 10)),
        ("ru-seq", seq),
    ] {
        let d = client
            .submit(body.to_string().as_bytes(), id, WAIT)
            .await
            .expect("a decision");
        granted(&d);
    }
    for id in ["ru-plain", "ru-seq"] {
        client
            .completed_for(id, WAIT)
            .await
            .unwrap_or_else(|e| panic!("the summary of {id}: {e:#}"));
        let closed = t.wait_closed(id).await;
        assert_eq!(closed.state, "completed", "{id}: {closed:?}");
    }
    let seq = t.wait_closed("ru-seq").await;
    assert_eq!(seq.figures.succeeded, 25, "every chunk ran: {seq:?}");
    t.assert_exact().await;
    client.close().await;
    t.stop().await;
}
