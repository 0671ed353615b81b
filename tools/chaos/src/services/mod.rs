//! Throwaway PostgreSQL and RabbitMQ instances for the chaos run, on their
//! own ports and in a directory of their own, so that restarting them never
//! disturbs the shared services that other tests use.
//!
//! - PostgreSQL: `initdb` into `<root>/pg` (as the `postgres` user when we are
//!   root: the server refuses to run as root), then `pg_ctl` starts, restarts
//!   and stops it. Trust authentication, loopback only.
//! - RabbitMQ: a second Erlang node (`holdfast-chaos@localhost` by default)
//!   with its own port, distribution port, Mnesia and log directories, an
//!   empty plugin file (the main node's Prometheus port would clash) and its
//!   own Erlang cookie; `rabbitmqctl -n <node>` controls it.
//!
//! With `--tls` ([`ServiceSettings::tls`]) a throwaway CA made for the run
//! ([`certs`]) signs a certificate for `localhost`, and both serve TLS only:
//! the URLs are `amqps://…?cacertfile=` and `sslmode=verify-full`.
//!
//! Both are stopped and their directories removed by [`Services::shutdown`],
//! and, should that not run (a panic), by their `Drop`: PostgreSQL with an
//! immediate stop, RabbitMQ by killing its process.

pub mod certs;
mod host;
mod rabbit_cluster;
mod rabbitmq;

use std::path::PathBuf;
use std::time::Instant;

pub use holdfast_harness::postgres::Postgres;
pub use rabbit_cluster::{RabbitCluster, NODES as CLUSTER_NODES};
pub use rabbitmq::Rabbit;

/// Both throwaway services under one directory. Fields drop in order: the
/// services stop, then their directory goes.
pub struct Services {
    pub pg: Postgres,
    pub rabbit: Rabbit,
    /// The throwaway CA's files, with `--tls`.
    pub tls: Option<certs::TlsFiles>,
    _root: RemoveOnDrop,
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ports and names of the throwaway services.
#[derive(Clone, Debug, clap::Args)]
pub struct ServiceSettings {
    /// Port of the throwaway PostgreSQL.
    #[arg(long, default_value_t = 5433)]
    pub pg_port: u16,
    /// AMQP port of the throwaway RabbitMQ node.
    #[arg(long, default_value_t = 5673)]
    pub amqp_port: u16,
    /// Erlang distribution port of the throwaway RabbitMQ node.
    #[arg(long, default_value_t = 25673)]
    pub dist_port: u16,
    /// Erlang node name of the throwaway RabbitMQ node.
    #[arg(long, default_value = "holdfast-chaos@localhost")]
    pub node: String,
    /// Serve PostgreSQL and RabbitMQ over TLS only, with a certificate for
    /// `localhost` from a CA made for the run; the roles connect with
    /// `sslmode=verify-full` and `amqps://` trusting that CA alone.
    #[arg(long)]
    pub tls: bool,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            pg_port: 5433,
            amqp_port: 5673,
            dist_port: 25673,
            node: "holdfast-chaos@localhost".into(),
            tls: false,
        }
    }
}

impl Services {
    /// Create and start both, in a fresh directory under the system's temp dir.
    pub async fn start(settings: &ServiceSettings) -> anyhow::Result<Self> {
        let root = std::env::temp_dir().join(format!("holdfast-chaos-{}", std::process::id()));
        std::fs::create_dir_all(&root)?;
        let guard = RemoveOnDrop(root.clone());
        // The `postgres` user must be able to reach its directory inside.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let started = Instant::now();
        let tls = match settings.tls {
            false => None,
            true => Some(
                certs::Authority::new("Holdfast chaos throwaway CA")?
                    .write(&root.join("tls"), &["localhost"])?,
            ),
        };
        let pg = Postgres::create(&root, settings.pg_port, tls.as_ref()).await;
        let pg = match pg {
            Ok(pg) => pg,
            Err(e) => return Err(e.context("starting the throwaway PostgreSQL")),
        };
        let rabbit = Rabbit::create(
            &root,
            &settings.node,
            settings.amqp_port,
            settings.dist_port,
            tls.as_ref(),
        )
        .await;
        let rabbit = match rabbit {
            Ok(r) => r,
            Err(e) => return Err(e.context("starting the throwaway RabbitMQ node")),
        };
        tracing::info!(elapsed = ?started.elapsed(), pg = settings.pg_port, amqp = settings.amqp_port,
            tls = settings.tls, "throwaway services up");
        Ok(Self {
            pg,
            rabbit,
            tls,
            _root: guard,
        })
    }

    /// Stop both (in order) and remove their directory.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.rabbit.stop().await {
            tracing::warn!(error = format!("{e:#}"), "stopping the throwaway RabbitMQ");
        }
        if let Err(e) = self.pg.stop("fast").await {
            tracing::warn!(
                error = format!("{e:#}"),
                "stopping the throwaway PostgreSQL"
            );
        }
        // Drop removes the rest.
    }
}
