//! Connecting to PostgreSQL: the pool, creating the database when it is
//! missing, and applying the embedded migrations. Every connection goes
//! through [`ssl::Target`], which gives the URL's `sslmode` and
//! `sslrootcert` libpq's meaning (plain, or TLS on rustls).

pub mod ssl;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub use ssl::{SslMode, Target};

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Why the database could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("invalid database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    /// `sslmode` or `sslrootcert` that cannot work as given.
    #[error("invalid database URL: {0}")]
    Ssl(String),
    /// The CA file named by `sslrootcert` cannot be used.
    #[error("PostgreSQL TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the database URL names no database")]
    NoDatabaseName,
    #[error(
        "cannot connect to PostgreSQL at {target}: {}{}",
        crate::ledger::pg_message(source),
        crate::tls::explain(source).map(|why| format!(" ({why})")).unwrap_or_default()
    )]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL refused a statement: {}", crate::ledger::pg_message(.0))]
    Statement(#[from] tokio_postgres::Error),
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] refinery::Error),
    #[error("building the connection pool failed: {0}")]
    Pool(String),
    /// The server answers, but the database in the URL does not exist
    /// (SQLSTATE 3D000): waiting will not help; `migrate` creates it.
    #[error("database `{name}` does not exist on {server}: run `holdfast migrate` to create it")]
    Missing { name: String, server: String },
}

/// `host:port/dbname` of a URL, with its `sslmode` and `sslrootcert` when
/// it names them, for messages: never the password.
pub fn describe(url: &str) -> String {
    match Target::parse(url) {
        Ok(target) => describe_target(&target),
        Err(_) => "<unparsable URL>".into(),
    }
}

fn describe_target(target: &Target) -> String {
    let cfg = &target.config;
    let place = format!("{}/{}", servers(cfg), cfg.get_dbname().unwrap_or(""));
    match target.describe_ssl() {
        ssl if ssl.is_empty() => place,
        ssl => format!("{place} ({ssl})"),
    }
}

/// Every `host:port` of a configuration, comma-separated, in the order
/// they are tried (a multi-host URL names several; the port list holds one
/// port for all of them or one each).
fn servers(cfg: &tokio_postgres::Config) -> String {
    let ports = cfg.get_ports();
    let port = |i: usize| match ports.len() {
        0 => 5432,
        1 => ports[0],
        _ => ports.get(i).copied().unwrap_or(5432),
    };
    let hosts = cfg.get_hosts();
    if hosts.is_empty() {
        return format!("localhost:{}", port(0));
    }
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            format!("{host}:{}", port(i))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connections opened before this instant are discarded when next taken
/// from any pool of this process (see [`note_error`]).
static STALE_BEFORE: Mutex<Option<Instant>> = Mutex::new(None);

/// The server this process's pools last connected to, and whether it was a
/// primary: `127.0.0.1:5432 (primary)`.
static CONNECTED_TO: Mutex<Option<String>> = Mutex::new(None);

/// True for the errors of a server that is no longer (or not yet) the
/// primary: SQLSTATE 25006 `read_only_sql_transaction` (a standby, or a
/// primary demoted in place), 57P01 `admin_shutdown`, 57P02
/// `crash_shutdown` and 57P03 `cannot_connect_now` (a server stopping,
/// crashing or still starting up).
pub fn is_failover_error(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code().map(|c| c.code()),
        Some("25006" | "57P01" | "57P02" | "57P03")
    )
}

/// Look at an error a statement returned: after a failover error
/// ([`is_failover_error`]) every pooled connection of this process opened
/// until now is discarded at its next checkout instead of being used again,
/// so that no pool keeps talking to a demoted host; new connections go to
/// whichever host the URL's `target_session_attrs` accepts. The ledger calls
/// this for every error it sees.
pub fn note_error(e: &tokio_postgres::Error) {
    if !is_failover_error(e) {
        return;
    }
    crate::telemetry::record::database_failover_error();
    let now = Instant::now();
    let mut stale = STALE_BEFORE.lock().unwrap_or_else(|p| p.into_inner());
    let first = stale.is_none_or(|at| now.duration_since(at) > Duration::from_secs(1));
    *stale = Some(now);
    drop(stale);
    if first {
        tracing::warn!(
            error = %crate::ledger::pg_message(e),
            "PostgreSQL server is stopping or read-only: dropping pooled connections, reconnecting to the primary"
        );
    }
}

/// True when a connection created at `created` predates the last failover error.
fn is_stale(created: Instant) -> bool {
    STALE_BEFORE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some_and(|at| created <= at)
}

/// `host:port (primary)` of the server this process's pools last connected
/// to, `None` before the first connection (for `/readyz` and logs).
pub fn connected_to() -> Option<String> {
    CONNECTED_TO
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Ask a new connection which server it reached, and log
/// `connected to PostgreSQL <host:port> (primary)` when that differs from
/// the last one this process logged (its first connection, and after each
/// failover).
async fn note_connected(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .simple_query(
            "SELECT coalesce(host(inet_server_addr()), 'local socket'), \
                    coalesce(inet_server_port(), 0), pg_is_in_recovery()",
        )
        .await?;
    let Some(row) = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) else {
        return Ok(());
    };
    let role = match row.get(2) {
        Some("t") => "standby, read-only",
        _ => "primary",
    };
    let server = format!(
        "{}:{} ({role})",
        row.get(0).unwrap_or("?"),
        row.get(1).unwrap_or("?")
    );
    let mut last = CONNECTED_TO.lock().unwrap_or_else(|p| p.into_inner());
    if last.as_deref() != Some(server.as_str()) {
        tracing::info!(server = %server, "connected to PostgreSQL {server}");
        crate::telemetry::record::database_server_changed();
        *last = Some(server);
    }
    Ok(())
}

/// One connection to `target`, with TLS as its `sslmode` says. Its
/// connection task ends when the client is dropped.
async fn connect_target(target: &Target) -> Result<tokio_postgres::Client, DatabaseError> {
    let failed = |source| DatabaseError::Connect {
        target: describe_target(target),
        source,
    };
    let client = match target.connector()? {
        None => {
            let (client, connection) = target.config.connect(NoTls).await.map_err(failed)?;
            drive(connection);
            client
        }
        Some(tls) => {
            let (client, connection) = target.config.connect(tls).await.map_err(failed)?;
            drive(connection);
            client
        }
    };
    Ok(client)
}

fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
}

/// One connection to the database of `url`, for tools and tests that need
/// a client of their own rather than a pool.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, DatabaseError> {
    connect_target(&Target::parse(url)?).await
}

/// The name of the database `target` names, and a client of the `postgres`
/// maintenance database of the same server.
async fn maintenance(target: &Target) -> Result<(String, tokio_postgres::Client), DatabaseError> {
    let name = target
        .config
        .get_dbname()
        .ok_or(DatabaseError::NoDatabaseName)?
        .to_owned();
    let mut admin = target.clone();
    admin.config.dbname("postgres");
    Ok((name, connect_target(&admin).await?))
}

/// Create the database named in `url` if it does not exist (connecting to the
/// `postgres` maintenance database of the same server). Safe to call concurrently.
pub async fn create_if_missing(url: &str) -> Result<bool, DatabaseError> {
    let (name, client) = maintenance(&Target::parse(url)?).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if exists {
        return Ok(false);
    }
    // CREATE DATABASE takes no parameters: quote the identifier ourselves.
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => Ok(true),
        // Another process created it between our check and our CREATE.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Drop the database named in `url` (tests use this to clean up).
pub async fn drop_database(url: &str) -> Result<(), DatabaseError> {
    let (name, client) = maintenance(&Target::parse(url)?).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// What `migrate` did.
#[derive(Debug)]
pub struct MigrationReport {
    pub created_database: bool,
    pub applied: Vec<String>,
}

/// Create the database if needed and apply every pending migration. Safe to
/// run twice and from several processes at once: an advisory lock serialises
/// the runners, and refinery skips what is already applied.
pub async fn migrate(url: &str) -> Result<MigrationReport, DatabaseError> {
    let created_database = create_if_missing(url).await?;
    let mut client = connect(url).await?;
    const MIGRATION_LOCK: i64 = 0x484f_4c44_4641_5354; // "HOLDFAST"
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = embedded::migrations::runner().run_async(&mut client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = result?;
    Ok(MigrationReport {
        created_database,
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect(),
    })
}

/// A connection pool for the ledger, with TLS as the URL's `sslmode` says
/// (the CA file is read once, here), whose first connection is opened at
/// once, so that a database that does not exist fails here, at once and
/// naming it ([`DatabaseError::Missing`]), rather than after the ledger's
/// retries as "temporarily unavailable". Any other failure to connect is left
/// to the ledger, which retries it (a server restarting comes back).
pub async fn connect_pool(url: &str, size: usize) -> Result<Pool, DatabaseError> {
    let pool = pool(url, size)?;
    match pool.get().await {
        Err(deadpool_postgres::PoolError::Backend(e))
            if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
        {
            let target = Target::parse(url)?;
            let cfg = &target.config;
            Err(DatabaseError::Missing {
                name: cfg.get_dbname().unwrap_or_default().to_string(),
                server: servers(cfg),
            })
        }
        // The connection goes back to the pool for the first query.
        _ => Ok(pool),
    }
}

/// A connection pool for the ledger (connections are opened on first use),
/// with TLS as the URL's `sslmode` says (the CA file is read once, here).
///
/// With a multi-host URL (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`)
/// tokio-postgres tries the hosts in order and keeps the first that accepts
/// writes. A connection is checked when taken from the pool: one that is
/// closed (its server died or restarted) or that predates a failover error
/// ([`note_error`]) is discarded and a new one opened; each new connection
/// logs which server it reached when that changed ([`connected_to`]).
pub fn pool(url: &str, size: usize) -> Result<Pool, DatabaseError> {
    let target = Target::parse(url)?;
    let config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match target.connector()? {
        None => Manager::from_config(target.config, NoTls, config),
        Some(tls) => Manager::from_config(target.config, tls, config),
    };
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move { note_connected(client).await.map_err(HookError::Backend) })
        }))
        .pre_recycle(deadpool_postgres::Hook::sync_fn(|_, metrics| {
            if is_stale(metrics.created) {
                Err(HookError::message("opened before a failover"))
            } else {
                Ok(())
            }
        }))
        .build()
        .map_err(|e| DatabaseError::Pool(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_every_host_and_no_password() {
        let url = "postgresql://app:s3cret@10.0.0.1:5432,10.0.0.2:6432/ledger?target_session_attrs=read-write";
        let target = Target::parse(url).unwrap();
        assert_eq!(
            target.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(describe(url), "10.0.0.1:5432,10.0.0.2:6432/ledger");
        assert!(!describe(url).contains("s3cret"));

        // In a URL each host takes its own port, 5432 when it names none.
        let url = "postgres://app:pw@db1,db2,db3:6000/ledger?target_session_attrs=read-write&sslmode=require";
        assert_eq!(
            describe(url),
            "db1:5432,db2:5432,db3:6000/ledger (sslmode=require)"
        );
        // In the key/value form one port may serve every host.
        assert_eq!(
            describe("host=db1,db2 port=6000 dbname=l"),
            "db1:6000,db2:6000/l"
        );
        // No port: libpq's 5432.
        assert_eq!(describe("postgres://u@a,b/db"), "a:5432,b:5432/db");

        // The key/value form.
        let kv = "host=db1,db2 port=5432,5433 user=app password='x y' dbname=ledger target_session_attrs=read-write";
        assert_eq!(describe(kv), "db1:5432,db2:5433/ledger");
        assert!(!describe(kv).contains("x y"));

        // One host, as before.
        assert_eq!(describe("postgres://u:p@h:5433/db"), "h:5433/db");
        assert_eq!(
            describe("postgres://u@h/db?target_session_attrs=bogus"),
            "<unparsable URL>"
        );
    }

    #[test]
    fn connections_opened_before_a_failover_error_are_stale() {
        let before = Instant::now();
        *STALE_BEFORE.lock().unwrap() = Some(Instant::now());
        let after = Instant::now() + Duration::from_millis(1);
        assert!(is_stale(before));
        assert!(!is_stale(after));
    }
}
