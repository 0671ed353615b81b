//! Settings for every role. Each comes from a flag, then a `HOLDFAST_*`
//! environment variable, then a default that points at the local services.
//!
//! Secrets (the database and broker URLs, which carry passwords, and the
//! admin token) come from the environment or from files (`*_FILE`, e.g. a
//! Docker secret), never from the code; `Debug` output and log lines show
//! them redacted.

use std::path::{Path, PathBuf};

use clap::Args;

/// Where the services are and how AMQP names are prefixed. Every command
/// takes these (they are global), listed under their own heading in `--help`.
#[derive(Args, Clone)]
#[command(next_help_heading = "Connections")]
pub struct Connections {
    /// PostgreSQL URL of the ledger database (created by `migrate` if missing).
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/holdfast",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,
    /// A file holding the PostgreSQL URL (e.g. /run/secrets/database_url);
    /// replaces --database-url.
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_URL_FILE",
        conflicts_with = "database_url",
        global = true
    )]
    pub database_url_file: Option<PathBuf>,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "HOLDFAST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        global = true
    )]
    pub amqp_url: String,
    /// A file holding the RabbitMQ URL; replaces --amqp-url.
    #[arg(
        long,
        env = "HOLDFAST_AMQP_URL_FILE",
        conflicts_with = "amqp_url",
        global = true
    )]
    pub amqp_url_file: Option<PathBuf>,
    /// Prefix of every queue and exchange name, so tenants and tests isolate.
    #[arg(
        long,
        env = "HOLDFAST_NAMESPACE",
        default_value = "holdfast",
        value_parser = crate::topology::parse_namespace,
        global = true
    )]
    pub namespace: String,
    /// Maximum PostgreSQL connections per process.
    #[arg(
        long,
        env = "HOLDFAST_DB_POOL_SIZE",
        default_value_t = 16,
        global = true
    )]
    pub db_pool_size: usize,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/holdfast".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            namespace: "holdfast".into(),
            db_pool_size: 16,
            database_url_file: None,
            amqp_url_file: None,
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("database_url", &redact_url(&self.database_url))
            .field("database_url_file", &self.database_url_file)
            .field("amqp_url", &redact_url_list(&self.amqp_url))
            .field("amqp_url_file", &self.amqp_url_file)
            .field("namespace", &self.namespace)
            .field("db_pool_size", &self.db_pool_size)
            .finish()
    }
}

impl Connections {
    /// Replace each URL given as a file (`--database-url-file`,
    /// `--amqp-url-file` or their `HOLDFAST_*_FILE` variables) by the file's
    /// content. Call once, after parsing the command line.
    pub fn load_secret_files(&mut self) -> Result<(), SecretError> {
        if let Some(path) = &self.database_url_file {
            self.database_url = read_secret(path)?;
        }
        if let Some(path) = &self.amqp_url_file {
            self.amqp_url = read_secret(path)?;
        }
        Ok(())
    }
}

/// A secret file that cannot be used. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret file {0} is empty")]
    Empty(PathBuf),
}

/// The content of a secret file, without surrounding whitespace (a trailing
/// newline is common).
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretError::Empty(path.to_owned()));
    }
    Ok(secret.to_string())
}

/// Every URL of a comma-separated list (`HOLDFAST_AMQP_URL` may name the
/// nodes of a cluster) with its password replaced by `***`.
pub fn redact_url_list(list: &str) -> String {
    list.split(',')
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` with its password replaced by `***`, for logs and `Debug`: both
/// `scheme://user:password@host/...` and libpq's `key=value` form.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // The userinfo ends at the last `@` before the path.
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some((user, _password)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***{}", &rest[at..]);
            }
        }
        // A password may also come as a query parameter.
        return match url.split_once('?') {
            Some((base, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                        _ => kv.to_string(),
                    })
                    .collect();
                format!("{base}?{}", query.join("&"))
            }
            None => url.to_string(),
        };
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Limits enforced on every batch request before any database work.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Request limits")]
pub struct Limits {
    /// Most items one batch may carry.
    #[arg(long, env = "HOLDFAST_MAX_ITEMS", default_value_t = 10_000)]
    pub max_items: usize,
    /// Largest payload of one item, in bytes of JSON.
    #[arg(long, env = "HOLDFAST_MAX_PAYLOAD_BYTES", default_value_t = 64 * 1024)]
    pub max_payload_bytes: usize,
    /// Largest batch request message, in bytes.
    #[arg(long, env = "HOLDFAST_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Highest estimated cost of one item, in credit units.
    #[arg(long, env = "HOLDFAST_MAX_ITEM_COST", default_value_t = 1_000_000_000)]
    pub max_item_cost: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: 10_000,
            max_payload_bytes: 64 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            max_item_cost: 1_000_000_000,
        }
    }
}

/// Queue behaviour shared by producers and consumers: the declarations must agree.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Queues")]
pub struct QueueSettings {
    /// Deliveries of one batch request before RabbitMQ dead-letters it.
    #[arg(long, env = "HOLDFAST_REQUEST_DELIVERY_LIMIT", default_value_t = 20)]
    pub request_delivery_limit: u32,
    /// Deliveries of one item job before RabbitMQ dead-letters it.
    #[arg(long, env = "HOLDFAST_JOB_DELIVERY_LIMIT", default_value_t = 5)]
    pub job_delivery_limit: u32,
    /// Declare the namespace's queues and exchanges at start (`false` for a
    /// broker user without configure permissions: see docs/security.md).
    #[arg(long = "amqp-declare", env = "HOLDFAST_AMQP_DECLARE", default_value_t = true, action = clap::ArgAction::Set)]
    pub declare: bool,
    /// Members of each new quorum queue (`x-quorum-initial-group-size`), so
    /// the queues spread over a cluster; unset: the broker's default (its
    /// `quorum_cluster_size`, 3 unless configured). Queues that
    /// exist already keep theirs: RabbitMQ refuses a declaration with another
    /// value (see docs/operations.md, "RabbitMQ cluster").
    #[arg(
        long,
        env = "HOLDFAST_QUORUM_INITIAL_GROUP_SIZE",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub quorum_initial_group_size: Option<u32>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            request_delivery_limit: 20,
            job_delivery_limit: 5,
            declare: true,
            quorum_initial_group_size: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        conn: Connections,
    }

    impl Cli {
        /// Parse `args` alone: every argument's environment variable is
        /// dropped, so a `HOLDFAST_*` variable of the shell that runs the
        /// tests cannot add to them (or conflict with them).
        fn try_from_args<const N: usize>(args: [&str; N]) -> Result<Self, clap::Error> {
            let command = Cli::command().mut_args(|arg| arg.env(None));
            Cli::from_arg_matches(&command.try_get_matches_from(args)?)
        }

        fn from_args<const N: usize>(args: [&str; N]) -> Self {
            Self::try_from_args(args).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let conn = Connections {
            database_url: "postgres://worker:pg-s3cret@db:5432/holdfast".into(),
            amqp_url: "amqp://holdfast:mq-s3cret@rabbitmq:5672/%2f".into(),
            ..Default::default()
        };
        let shown = format!("{conn:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://worker:***@db:5432/holdfast"),
            "{shown}"
        );
        assert!(
            shown.contains("amqp://holdfast:***@rabbitmq:5672/%2f"),
            "{shown}"
        );
    }

    #[test]
    fn every_password_of_a_broker_list_is_hidden() {
        let conn = Connections {
            amqp_url: "amqp://a:mq-s3cret1@mq1:5672/%2f,amqps://b:mq-s3cret2@mq2:5671/%2f".into(),
            ..Default::default()
        };
        let shown = format!("{conn:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("amqp://a:***@mq1:5672/%2f,amqps://b:***@mq2:5671/%2f"),
            "{shown}"
        );
    }

    #[derive(Parser)]
    struct Queues {
        #[command(flatten)]
        queues: QueueSettings,
    }

    #[test]
    fn the_quorum_group_size_is_unset_unless_given() {
        let parse = |args: &[&str]| {
            let command = Queues::command().mut_args(|arg| arg.env(None));
            command
                .try_get_matches_from(args)
                .and_then(|m| Queues::from_arg_matches(&m))
                .map(|q| q.queues.quorum_initial_group_size)
        };
        assert_eq!(parse(&["t"]).unwrap(), None);
        assert_eq!(
            parse(&["t", "--quorum-initial-group-size", "3"]).unwrap(),
            Some(3)
        );
        assert!(parse(&["t", "--quorum-initial-group-size", "0"]).is_err());
        assert!(parse(&["t", "--quorum-initial-group-size", "x"]).is_err());
    }

    #[test]
    fn redaction_covers_every_url_form() {
        for (url, shown) in [
            ("postgres://u:p@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p@ss@h:5/db", "postgres://u:***@h:5/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&password=p",
                "postgres://h/db?user=u&password=***",
            ),
            (
                "host=h user=u password=p dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            (
                "amqp://guest:guest@h:5672/%2f",
                "amqp://guest:***@h:5672/%2f",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn urls_come_from_secret_files() {
        let dir = std::env::temp_dir().join(format!("holdfast-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("database_url");
        let mq = dir.join("amqp_url");
        std::fs::write(&db, "postgres://w:from-file@db/holdfast\n").unwrap();
        std::fs::write(&mq, "amqp://u:from-file@mq/%2f").unwrap();
        let mut cli = Cli::from_args([
            "t",
            "--database-url-file",
            db.to_str().unwrap(),
            "--amqp-url-file",
            mq.to_str().unwrap(),
        ]);
        cli.conn.load_secret_files().unwrap();
        assert_eq!(cli.conn.database_url, "postgres://w:from-file@db/holdfast");
        assert_eq!(cli.conn.amqp_url, "amqp://u:from-file@mq/%2f");

        // A URL and a file for it at once is a mistake, not a silent choice.
        assert!(Cli::try_from_args([
            "t",
            "--database-url",
            "postgres://x@y/z",
            "--database-url-file",
            db.to_str().unwrap(),
        ])
        .is_err());

        // Errors name the file, never a secret.
        std::fs::write(&db, "  \n").unwrap();
        let mut cli = Cli::from_args(["t", "--database-url-file", db.to_str().unwrap()]);
        let e = cli.conn.load_secret_files().unwrap_err().to_string();
        assert!(e.contains("is empty") && e.contains("database_url"), "{e}");
        let mut cli = Cli::from_args(["t", "--amqp-url-file", "/nonexistent/amqp_url"]);
        let e = cli.conn.load_secret_files().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/amqp_url"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
