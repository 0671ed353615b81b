//! A multi-host database URL: tokio-postgres tries the hosts in order and
//! keeps the first that accepts writes, for migrations and the pool alike.

use crate::support::*;

use holdfast_common::database;
use holdfast_common::ledger::Ledger;

/// A port on 127.0.0.1 where nothing listens (bound, then let go).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

#[tokio::test]
async fn a_host_that_is_down_is_skipped_for_the_next_one() {
    let mut conn = unique_connections();
    let config: tokio_postgres::Config = conn.database_url.parse().expect("the test URL parses");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        other => panic!("the test database is on a TCP host, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().expect("a database name").to_string();
    let closed = closed_port();
    conn.database_url = format!(
        "postgresql://postgres@127.0.0.1:{closed},{host}:{port}/{db}?target_session_attrs=read-write"
    );
    let _cleanup = Cleanup { conn: conn.clone() };

    assert_eq!(
        database::describe(&conn.database_url),
        format!("127.0.0.1:{closed},{host}:{port}/{db}")
    );
    let report = database::migrate(&conn.database_url)
        .await
        .expect("migrate through the multi-host URL");
    assert!(report.created_database);
    assert!(!report.applied.is_empty());

    let ledger = Ledger::new(
        database::connect_pool(&conn.database_url, 2)
            .await
            .expect("a pool on the multi-host URL"),
    );
    ledger
        .grant("acct-multi-host", 500, Some("test"), true)
        .await
        .expect("grant through the multi-host URL");
    assert_eq!(
        ledger.account("acct-multi-host").await.unwrap().available,
        500
    );
    assert!(ledger.audit().await.expect("audit runs").is_empty());
    let server = database::connected_to().expect("the pool logged its server");
    assert!(
        server.ends_with(&format!(":{port} (primary)")),
        "connected to {server}"
    );
}

#[tokio::test]
async fn no_host_that_answers_is_a_clear_error() {
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/hf_nowhere?target_session_attrs=read-write",
        closed_port(),
        closed_port()
    );
    let e = database::migrate(&url).await.expect_err("nothing listens");
    let message = e.to_string();
    assert!(
        message.contains("cannot connect to PostgreSQL at 127.0.0.1:"),
        "{message}"
    );
}
