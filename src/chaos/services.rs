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
//! Both are stopped and their directories removed by [`Services::shutdown`],
//! and, should that not run (a panic), by their `Drop`: PostgreSQL with an
//! immediate stop, RabbitMQ by killing its process.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// How long a service may take to start before the run gives up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the Debian packages (scripts/services.sh installs them) put the server binaries.
const PG_LIB: &str = "/usr/lib/postgresql";
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

fn ensure_free(port: u16, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !port_open(port),
        "port {port} (for the throwaway {what}) is already taken; choose another with the chaos flags"
    );
    Ok(())
}

async fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when this process runs as root (the owner of `/proc/self` is our uid).
fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A PostgreSQL cluster of our own.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
    running: bool,
}

impl Postgres {
    /// `initdb` a fresh cluster in `<root>/pg` and start it on `port`.
    pub async fn create(root: &Path, port: u16) -> anyhow::Result<Self> {
        ensure_free(port, "PostgreSQL")?;
        let bin = newest_pg_bin()?;
        let dir = root.join("pg");
        std::fs::create_dir_all(&dir)?;
        let as_postgres = is_root();
        if as_postgres {
            // The server runs as `postgres`, which must own its directory.
            output(
                Command::new("chown").args(["-R", "postgres"]).arg(&dir),
                "chown postgres",
            )
            .await?;
        }
        let mut pg = Self {
            bin,
            dir,
            port,
            as_postgres,
            running: false,
        };
        let data = pg.dir.join("data");
        output(
            pg.command("initdb").arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            "initdb",
        )
        .await?;
        pg.start().await?;
        Ok(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg_ctl(&self, action: &str) -> Command {
        let mut c = self.command("pg_ctl");
        c.arg(action)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-t", "120"]);
        c
    }

    /// Start and wait until it accepts connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        // fsync off: a throwaway cluster on a shared machine; a crash of the
        // server process (not of the machine) loses nothing with it off.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        output(
            self.pg_ctl("start")
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .arg("-o")
                .arg(options),
            "pg_ctl start",
        )
        .await?;
        self.running = true;
        Ok(())
    }

    /// Stop: `immediate` is a crash (every backend killed, recovery at the next start).
    pub async fn stop(&mut self, mode: &str) -> anyhow::Result<()> {
        output(self.pg_ctl("stop").args(["-m", mode]), "pg_ctl stop").await?;
        self.running = false;
        Ok(())
    }

    /// Crash, stay down for `pause`, start again; returns how long the
    /// server was away.
    pub async fn crash_restart(&mut self, pause: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.stop("immediate").await?;
        tokio::time::sleep(pause).await;
        self.start().await?;
        Ok(started.elapsed())
    }

    /// A URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    fn stop_now(&mut self) {
        if self.running {
            let mut c = std::process::Command::new(if self.as_postgres {
                PathBuf::from("runuser")
            } else {
                self.bin.join("pg_ctl")
            });
            if self.as_postgres {
                c.args(["-u", "postgres", "--"])
                    .arg(self.bin.join("pg_ctl"));
            }
            let _ = c
                .arg("stop")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_now();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn newest_pg_bin() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_LIB)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or_else(|| {
        anyhow::anyhow!(
            "no PostgreSQL server under {PG_LIB}/<version>/bin (scripts/services.sh installs it)"
        )
    })
}

/// A RabbitMQ node of our own.
pub struct Rabbit {
    dir: PathBuf,
    pub node: String,
    pub port: u16,
    dist_port: u16,
    server: Option<Child>,
}

impl Rabbit {
    /// Prepare `<root>/rabbitmq` and start node `node` on `port`.
    pub async fn create(
        root: &Path,
        node: &str,
        port: u16,
        dist_port: u16,
    ) -> anyhow::Result<Self> {
        ensure_free(port, "RabbitMQ")?;
        ensure_free(dist_port, "RabbitMQ distribution")?;
        let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
        anyhow::ensure!(
            server.exists(),
            "no {} (the rabbitmq-server package; scripts/services.sh installs it)",
            server.display()
        );
        let dir = root.join("rabbitmq");
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Our own listener: the packaged /etc/rabbitmq/rabbitmq.conf names the main node's port.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string())?;
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        let mut rabbit = Self {
            dir,
            node: node.to_string(),
            port,
            dist_port,
            server: None,
        };
        rabbit.start().await?;
        Ok(rabbit)
    }

    /// The environment that makes the packaged scripts run (or talk to) our node.
    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.current_dir(d)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("rabbitmq.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
    }

    /// Start the node and wait until it serves AMQP.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        // A node still going down (or a stray one) would answer in its place.
        let deadline = Instant::now() + START_TIMEOUT;
        while port_open(self.port) || port_open(self.dist_port) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "port {} or {} still taken: is an earlier node still running?",
                self.port,
                self.dist_port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let mut cmd = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmq-server"));
        self.env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting rabbitmq-server")?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_open(self.port) {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "rabbitmq-server exited ({status}); see {}",
                    self.dir.join("server.log").display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "RabbitMQ did not open port {} within {START_TIMEOUT:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.server = Some(child);
        self.ctl(&["await_startup"]).await?;
        Ok(())
    }

    /// `rabbitmqctl -n <node> -q <args>`; its standard output.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"));
        self.env(&mut cmd);
        cmd.args(["-n", &self.node, "-q"]).args(args);
        tokio::time::timeout(Duration::from_secs(60), output(&mut cmd, "rabbitmqctl"))
            .await
            .map_err(|_| anyhow::anyhow!("rabbitmqctl {args:?} timed out"))?
    }

    /// Stop the node (orderly), or kill it if it does not stop.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let stopped = self.ctl(&["stop"]).await;
        if let Some(mut child) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                kill_group(&mut child);
                let _ = child.wait().await;
            }
        }
        stopped.map(drop)
    }

    /// Stop (orderly, or with SIGKILL when `kill`) and start again; returns
    /// how long the broker was away.
    pub async fn restart(&mut self, kill: bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if kill {
            if let Some(mut child) = self.server.take() {
                kill_group(&mut child);
                child.wait().await?;
            }
        } else {
            self.stop().await?;
        }
        self.start().await?;
        Ok(started.elapsed())
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// SIGKILL the server's whole process group. The packaged `rabbitmq-server`
/// script runs the Erlang VM as a background job of its own shell (it
/// forwards signals), so killing the shell alone would leave the node up.
/// The child leads its own group (`process_group(0)`), so its id is the group's.
fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.start_kill();
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            kill_group(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Both throwaway services under one directory. Fields drop in order: the
/// services stop, then their directory goes.
pub struct Services {
    pub pg: Postgres,
    pub rabbit: Rabbit,
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
        let pg = Postgres::create(&root, settings.pg_port).await;
        let pg = match pg {
            Ok(pg) => pg,
            Err(e) => return Err(e.context("starting the throwaway PostgreSQL")),
        };
        let rabbit = Rabbit::create(
            &root,
            &settings.node,
            settings.amqp_port,
            settings.dist_port,
        )
        .await;
        let rabbit = match rabbit {
            Ok(r) => r,
            Err(e) => return Err(e.context("starting the throwaway RabbitMQ node")),
        };
        tracing::info!(elapsed = ?started.elapsed(), pg = settings.pg_port, amqp = settings.amqp_port,
            "throwaway services up");
        Ok(Self {
            pg,
            rabbit,
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
