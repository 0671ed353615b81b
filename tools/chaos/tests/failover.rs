//! A multi-host URL on a primary and its standby (the harness's own
//! throwaway clusters): the standby, listed first, is skipped; a primary made
//! read-only in place answers SQLSTATE 25006, and the ledger drops its pooled
//! connections to it and carries the write to the standby once promoted.

use std::time::Duration;

use holdfast_chaos::services::Postgres;
use holdfast_common::database;
use holdfast_common::ledger::Ledger;

/// Ports apart from `make chaos`'s (5433–5435) and the TLS test's (5436).
const PRIMARY: u16 = 5447;
const STANDBY: u16 = 5448;

#[tokio::test]
async fn a_standby_is_skipped_and_a_read_only_primary_is_left_for_the_promoted_one() {
    let root = std::env::temp_dir().join(format!("holdfast-failover-test-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let primary = Postgres::create(&root.join("primary"), PRIMARY, None)
        .await
        .expect("start the primary");
    let standby = Postgres::standby_of(&primary, &root.join("standby"), STANDBY)
        .await
        .expect("start the standby");
    primary
        .require_sync_standby()
        .await
        .expect("the standby becomes synchronous");

    // The standby first: every connection meets a read-only server first.
    let url = format!(
        "postgresql://postgres@127.0.0.1:{STANDBY},127.0.0.1:{PRIMARY}/failover_test?target_session_attrs=read-write"
    );
    database::migrate(&url)
        .await
        .expect("migrate past the standby");
    let ledger = Ledger::new(database::pool(&url, 2).unwrap());
    ledger
        .grant("acct-ha", 100, Some("test"), true)
        .await
        .expect("grant on the primary");
    assert_eq!(
        database::connected_to().as_deref(),
        Some(format!("127.0.0.1:{PRIMARY} (primary)").as_str())
    );

    // The primary turns read-only under its open connections (as a primary
    // being demoted in place), and the standby is promoted.
    let admin = database::connect(&primary.url("postgres")).await.unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    standby.promote().await.expect("promote the standby");

    // The pooled connection to the old primary answers 25006; the ledger
    // retries on a new connection, which finds the promoted standby.
    let account = ledger
        .grant("acct-ha", 50, Some("test"), false)
        .await
        .expect("the grant reaches the promoted standby");
    assert_eq!(
        account.available, 150,
        "the synchronous standby had the first grant"
    );
    assert_eq!(
        database::connected_to().as_deref(),
        Some(format!("127.0.0.1:{STANDBY} (primary)").as_str())
    );
    assert!(ledger.audit().await.expect("audit").is_empty());

    drop(ledger);
    drop(standby);
    drop(primary);
    let _ = std::fs::remove_dir_all(&root);
}
