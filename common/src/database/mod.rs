//! Connecting to PostgreSQL: the pool, creating the database when it is
//! missing, and applying the embedded migrations. Every connection goes
//! through [`ssl::Target`], which gives the URL's `sslmode` and
//! `sslrootcert` libpq's meaning (plain, or TLS on rustls).

pub mod ssl;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
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
    let place = format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or(""));
    match target.describe_ssl() {
        ssl if ssl.is_empty() => place,
        ssl => format!("{place} ({ssl})"),
    }
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
            let host = match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(s)) => s.clone(),
                #[cfg(unix)]
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => String::new(),
            };
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            Err(DatabaseError::Missing {
                name: cfg.get_dbname().unwrap_or_default().to_string(),
                server: format!("{host}:{port}"),
            })
        }
        // The connection goes back to the pool for the first query.
        _ => Ok(pool),
    }
}

/// A connection pool for the ledger (connections are opened on first use),
/// with TLS as the URL's `sslmode` says (the CA file is read once, here).
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
        .build()
        .map_err(|e| DatabaseError::Pool(e.to_string()))
}
