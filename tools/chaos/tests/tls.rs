//! TLS against real servers: the harness's own PostgreSQL and RabbitMQ,
//! serving TLS only with a certificate for `localhost` from a throwaway CA.
//!
//! - a chaos scenario (real role processes and producers) runs end to end
//!   over `amqps://…?cacertfile=` and `sslmode=verify-full`;
//! - the same certificate reached by another name (`127.0.0.1`) is refused
//!   by `verify-full` and by `amqps://`, and accepted by `verify-ca`;
//! - a certificate from another CA is refused by both, at once (no retries);
//! - plain connections are refused, so the above really went over TLS.
//!
//! Needs the `holdfast` binary beside the test (`cargo build --bin
//! holdfast`; the workspace's test build makes it).

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast_chaos::services::certs::Authority;
use holdfast_chaos::services::ServiceSettings;
use holdfast_chaos::{ChaosArgs, Services};
use holdfast_common::database;
use holdfast_common::topology::{self, BrokerError, Endpoint};

/// Ports apart from `make chaos`'s (5433, 5673, 25673), which may run at the same time.
fn settings() -> ServiceSettings {
    ServiceSettings {
        pg_port: 5436,
        amqp_port: 5676,
        dist_port: 25676,
        node: "holdfast-tls-test@localhost".into(),
        tls: true,
    }
}

#[tokio::test]
async fn verify_full_and_amqps_work_end_to_end_and_refuse_what_they_must() {
    let mut services = Services::start(&settings())
        .await
        .expect("start TLS services");
    let outcome = checks(&mut services).await;
    services.shutdown().await;
    outcome.unwrap();
}

async fn checks(services: &mut Services) -> anyhow::Result<()> {
    let ca = services.tls.as_ref().expect("TLS files").ca.clone();
    let log_dir = std::env::temp_dir().join(format!("holdfast-tls-test-{}", std::process::id()));
    end_to_end(services, &log_dir).await?;
    let _ = std::fs::remove_dir_all(&log_dir);

    let wrong_ca = log_dir.with_extension("wrong-ca.pem");
    std::fs::write(&wrong_ca, Authority::new("Another throwaway CA")?.pem())?;
    let outcome = async {
        postgres_checks(services.pg.port, &ca, &wrong_ca).await?;
        rabbitmq_checks(services.rabbit.port, &ca, &wrong_ca).await
    }
    .await;
    let _ = std::fs::remove_file(&wrong_ca);
    outcome
}

/// Role processes, producers and crash faults, all over TLS.
async fn end_to_end(services: &mut Services, log_dir: &Path) -> anyhow::Result<()> {
    assert!(services.pg.url("x").contains("sslmode=verify-full"));
    assert!(services.rabbit.url().starts_with("amqps://"));
    let args = ChaosArgs {
        services: settings(),
        only: vec!["worker-kill-before-capture".into()],
        list: false,
        log_dir: log_dir.to_owned(),
        settle_timeout: 120,
    };
    let report = holdfast_chaos::run_on(services, &args).await?;
    holdfast_chaos::print(&report);
    anyhow::ensure!(report.passed, "the scenario failed over TLS");
    let row = &report.rows[0];
    anyhow::ensure!(
        row.counts.batches > 0 && row.counts.items > 0,
        "nothing ran: {:?}",
        row.counts
    );
    Ok(())
}

fn pg_url(host: &str, port: u16, ssl: &str) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?{ssl}")
}

async fn select_one(url: &str) -> Result<i32, database::DatabaseError> {
    let client = database::connect(url).await?;
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

async fn postgres_checks(port: u16, ca: &Path, wrong_ca: &Path) -> anyhow::Result<()> {
    let ca = ca.display();
    // The name on the certificate, chain and name checked: accepted.
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert_eq!(select_one(&pg_url("localhost", port, &full)).await?, 1);
    // And TLS is in use: the server says so for this very connection.
    let client = database::connect(&pg_url("localhost", port, &full)).await?;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    assert!(ssl, "the verify-full connection is not encrypted");

    // Another name for the same server: verify-full refuses, naming the
    // host, the mode and why; verify-ca (chain only) accepts.
    let e = select_one(&pg_url("127.0.0.1", port, &full))
        .await
        .expect_err("verify-full accepted a certificate for another name")
        .to_string();
    eprintln!("refused as expected: {e}");
    for needle in ["127.0.0.1", "sslmode=verify-full", "not valid for name"] {
        assert!(e.contains(needle), "`{needle}` missing from: {e}");
    }
    let chain_only = format!("sslmode=verify-ca&sslrootcert={ca}");
    assert_eq!(
        select_one(&pg_url("127.0.0.1", port, &chain_only)).await?,
        1
    );
    // libpq's require with a CA file is verify-ca; without one, nothing is checked.
    let require_ca = format!("sslmode=require&sslrootcert={ca}");
    assert_eq!(
        select_one(&pg_url("127.0.0.1", port, &require_ca)).await?,
        1
    );
    assert_eq!(
        select_one(&pg_url("127.0.0.1", port, "sslmode=require")).await?,
        1
    );

    // A certificate from another CA: refused by every checking mode.
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = pg_url(
            "localhost",
            port,
            &format!("sslmode={mode}&sslrootcert={}", wrong_ca.display()),
        );
        let e = select_one(&url)
            .await
            .expect_err("a certificate of another CA was accepted")
            .to_string();
        eprintln!("refused as expected: {e}");
        for needle in ["localhost", &format!("sslmode={mode}"), "UnknownIssuer"] {
            assert!(e.contains(needle), "`{needle}` missing from: {e}");
        }
    }

    // The listener takes TLS only: a plain connection is turned away.
    let e = select_one(&format!("postgres://postgres@localhost:{port}/postgres"))
        .await
        .expect_err("a plain connection was accepted")
        .to_string();
    eprintln!("refused as expected: {e}");
    assert!(e.contains("no encryption"), "{e}");

    // The command line reports the same, and exits non-zero.
    let wrong = pg_url(
        "localhost",
        port,
        &format!("sslmode=verify-full&sslrootcert={}", wrong_ca.display()),
    );
    let out = tokio::process::Command::new(holdfast_harness::processes::holdfast_exe()?)
        .arg("migrate")
        .env("HOLDFAST_DATABASE_URL", &wrong)
        .env_remove("HOLDFAST_DATABASE_URL_FILE")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "migrate succeeded with a wrong CA");
    assert!(
        stderr.contains("sslmode=verify-full") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    Ok(())
}

async fn rabbitmq_checks(port: u16, ca: &Path, wrong_ca: &Path) -> anyhow::Result<()> {
    let url = |host: &str, ca: &Path| {
        format!(
            "amqps://guest:guest@{host}:{port}/%2f?cacertfile={}",
            ca.display()
        )
    };
    let open = |url: String| async move {
        let endpoint = Endpoint::parse(&url)?;
        tokio::time::timeout(
            Duration::from_secs(20),
            endpoint.connect(Default::default()),
        )
        .await
        .map_err(|_| BrokerError::Closed)?
    };

    let conn = open(url("localhost", ca)).await?;
    assert!(conn.status().connected());
    topology::close(&conn, "checked").await;

    // The certificate is for localhost, not for 127.0.0.1.
    let e = open(url("127.0.0.1", ca))
        .await
        .expect_err("amqps accepted a certificate for another name");
    assert!(matches!(e, BrokerError::Tls { .. }), "{e:?}");
    let e = e.to_string();
    eprintln!("refused as expected: {e}");
    for needle in ["127.0.0.1", "host name", "not valid for name"] {
        assert!(e.contains(needle), "`{needle}` missing from: {e}");
    }

    // Another CA: refused, and `connect` gives up at once instead of
    // retrying for a minute as it does while a broker is away.
    let started = Instant::now();
    let e = topology::connect(&url("localhost", wrong_ca), "tls-test")
        .await
        .expect_err("amqps accepted a certificate of another CA");
    assert!(started.elapsed() < Duration::from_secs(5), "{e}");
    let e = e.to_string();
    eprintln!("refused as expected: {e}");
    for needle in ["localhost", "wrong-ca.pem", "UnknownIssuer"] {
        assert!(e.contains(needle), "`{needle}` missing from: {e}");
    }

    // The listener takes TLS only.
    let plain = open(format!("amqp://guest:guest@localhost:{port}/%2f")).await;
    let e = plain.expect_err("a plain AMQP connection was accepted");
    eprintln!("refused as expected: {e}");
    Ok(())
}
