//! The throwaway RabbitMQ node: a second Erlang node with its own ports,
//! Mnesia and log directories, configuration, empty plugin file and Erlang
//! cookie, run from the packaged scripts; `rabbitmqctl -n <node>` controls it.
//! With TLS files its one AMQP listener speaks TLS only (`amqps://`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use super::certs::TlsFiles;
use super::host::{ensure_free, output, port_open, START_TIMEOUT};

/// Where the Debian package (scripts/services.sh installs it) puts the scripts.
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A RabbitMQ node of our own.
pub struct Rabbit {
    dir: PathBuf,
    pub node: String,
    pub port: u16,
    dist_port: u16,
    server: Option<Child>,
    tls: Option<TlsFiles>,
}

impl Rabbit {
    /// Prepare `<root>/rabbitmq` and start node `node` on `port`, a TLS
    /// listener when `tls` is given.
    pub async fn create(
        root: &Path,
        node: &str,
        port: u16,
        dist_port: u16,
        tls: Option<&TlsFiles>,
    ) -> anyhow::Result<Self> {
        let cookie = uuid::Uuid::new_v4().simple().to_string();
        Self::create_in(&root.join("rabbitmq"), node, port, dist_port, tls, &cookie).await
    }

    /// Prepare `dir` and start node `node` there with Erlang cookie
    /// `cookie` (nodes of one cluster share theirs).
    pub async fn create_in(
        dir: &Path,
        node: &str,
        port: u16,
        dist_port: u16,
        tls: Option<&TlsFiles>,
        cookie: &str,
    ) -> anyhow::Result<Self> {
        ensure_free(port, "RabbitMQ")?;
        ensure_free(dist_port, "RabbitMQ distribution")?;
        let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
        anyhow::ensure!(
            server.exists(),
            "no {} (the rabbitmq-server package; scripts/services.sh installs it)",
            server.display()
        );
        let dir = dir.to_path_buf();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Our own listener: the packaged /etc/rabbitmq/rabbitmq.conf names the main node's port.
        let listeners = match tls {
            None => format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
            Some(files) => format!(
                "listeners.tcp = none\n\
                 listeners.ssl.1 = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            ),
        };
        std::fs::write(dir.join("rabbitmq.conf"), listeners)?;
        std::fs::write(dir.join("enabled_plugins"), "")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let cookie_file = dir.join(".erlang.cookie");
        std::fs::write(&cookie_file, cookie)?;
        std::fs::set_permissions(
            &cookie_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o400),
        )?;
        let mut rabbit = Self {
            dir,
            node: node.to_string(),
            port,
            dist_port,
            server: None,
            tls: tls.cloned(),
        };
        rabbit.start().await?;
        Ok(rabbit)
    }

    /// The environment that makes the packaged scripts run (or talk to) our node.
    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        if self.tls.is_none() {
            // With TLS the configuration file names the only listener.
            cmd.env("RABBITMQ_NODE_PORT", self.port.to_string());
        }
        cmd.current_dir(d)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
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

    /// True while the node was started and not stopped or killed since.
    pub fn running(&self) -> bool {
        self.server.is_some()
    }

    /// Kill the node with SIGKILL, at once (no `rabbitmqctl`, which takes
    /// a second or two to start): its clients lose their connections now.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.server.take() {
            kill_group(&mut child);
            child.wait().await?;
        }
        Ok(())
    }

    /// Stop (orderly, or with SIGKILL when `kill`) and start again; returns
    /// how long the broker was away.
    pub async fn restart(&mut self, kill: bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if kill {
            self.kill().await?;
        } else {
            self.stop().await?;
        }
        self.start().await?;
        Ok(started.elapsed())
    }

    /// The node's URL: with TLS, by the name on the server's certificate,
    /// trusting the throwaway CA only.
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port),
            Some(tls) => format!(
                "amqps://guest:guest@localhost:{}/%2f?cacertfile={}",
                self.port,
                tls.ca.display()
            ),
        }
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
