//! Connecting to PostgreSQL: the pool, creating the database when it is
//! missing, and applying the embedded migrations.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Why the database could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("invalid database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("the database URL names no database")]
    NoDatabaseName,
    #[error(
        "cannot connect to PostgreSQL at {target}: {}",
        crate::ledger::pg_message(source)
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

/// `host:port/dbname` of a URL, for messages: never the password.
pub fn describe(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(cfg) => {
            let host = cfg
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or(""))
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

async fn connect_one(
    cfg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Create the database named in `url` if it does not exist (connecting to the
/// `postgres` maintenance database of the same server). Safe to call concurrently.
pub async fn create_if_missing(url: &str) -> Result<bool, DatabaseError> {
    let cfg = tokio_postgres::Config::from_str(url).map_err(DatabaseError::Url)?;
    let name = cfg
        .get_dbname()
        .ok_or(DatabaseError::NoDatabaseName)?
        .to_owned();
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let client = connect_one(&admin)
        .await
        .map_err(|source| DatabaseError::Connect {
            target: describe(url),
            source,
        })?;
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
    let cfg = tokio_postgres::Config::from_str(url).map_err(DatabaseError::Url)?;
    let name = cfg
        .get_dbname()
        .ok_or(DatabaseError::NoDatabaseName)?
        .to_owned();
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let client = connect_one(&admin)
        .await
        .map_err(|source| DatabaseError::Connect {
            target: describe(url),
            source,
        })?;
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
    let cfg = tokio_postgres::Config::from_str(url).map_err(DatabaseError::Url)?;
    let mut client = connect_one(&cfg)
        .await
        .map_err(|source| DatabaseError::Connect {
            target: describe(url),
            source,
        })?;
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

/// A connection pool for the ledger whose first connection is opened at
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
            let cfg = tokio_postgres::Config::from_str(url).map_err(DatabaseError::Url)?;
            let server = describe(url);
            let server = server.rsplit_once('/').map_or(server.as_str(), |(s, _)| s);
            Err(DatabaseError::Missing {
                name: cfg.get_dbname().unwrap_or_default().to_string(),
                server: server.to_string(),
            })
        }
        // The connection goes back to the pool for the first query.
        _ => Ok(pool),
    }
}

/// A connection pool for the ledger (connections are opened on first use).
pub fn pool(url: &str, size: usize) -> Result<Pool, DatabaseError> {
    let cfg = tokio_postgres::Config::from_str(url).map_err(DatabaseError::Url)?;
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DatabaseError::Pool(e.to_string()))
}
