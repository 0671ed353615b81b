//! Role processes: `holdfast coordinator | worker | reconciler` started as
//! child processes on given connections. `holdfast-bench` measures each
//! role's memory this way; `holdfast-chaos` kills, pauses and terminates them
//! one by one. The `holdfast` binary is found by [`holdfast_exe`].
//!
//! Every child is killed when its handle is dropped (`kill_on_drop`) and runs
//! in its own process group, so a Ctrl-C in the terminal reaches only the
//! parent, which then stops its children in order.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use holdfast_common::config::Connections;
use tokio::process::{Child, Command};

/// Names the `holdfast` binary to start, instead of the one beside this program.
pub const HOLDFAST_BIN: &str = "HOLDFAST_BIN";

/// The `holdfast` binary: `$HOLDFAST_BIN` when set, else the one cargo built
/// beside this program (`target/<profile>/holdfast`, next to
/// `holdfast-bench` and `holdfast-chaos`; one directory up from a test's
/// `deps/`). Cargo does not build it for `cargo run -p holdfast-chaos`: the
/// Makefile's `bench` and `chaos` targets build it first.
pub fn holdfast_exe() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(HOLDFAST_BIN) {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = me
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("holdfast"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no `holdfast` binary at {}: build it first (`cargo build --bin holdfast`, \
                 with `--release` for a release build) or name it in {HOLDFAST_BIN}",
                me.with_file_name("holdfast").display()
            )
        })
}

/// One role process.
pub struct RoleProcess {
    /// A name for logs and tables, e.g. `worker-2`.
    pub name: String,
    pub role: String,
    child: Child,
    exit: Option<ExitStatus>,
}

/// How a process ended, as seen by its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Exited by itself with this code.
    Exited(i32),
    /// Killed by this signal (6: abort, 9: SIGKILL).
    Signalled(i32),
}

impl From<ExitStatus> for Ended {
    fn from(s: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => Ended::Exited(c),
            (None, Some(sig)) => Ended::Signalled(sig),
            (None, None) => Ended::Exited(-1),
        }
    }
}

impl RoleProcess {
    /// Start `holdfast <role>` on `conn`, with `env` on top of the connection
    /// variables (later entries win). Standard error (the logs) goes to `log`
    /// when given, else nowhere; standard output always nowhere.
    pub fn spawn(
        conn: &Connections,
        role: &str,
        name: &str,
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let exe = holdfast_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg(role)
            .env("HOLDFAST_DATABASE_URL", &conn.database_url)
            .env("HOLDFAST_AMQP_URL", &conn.amqp_url)
            .env("HOLDFAST_NAMESPACE", &conn.namespace)
            .env("HOLDFAST_DB_POOL_SIZE", conn.db_pool_size.to_string())
            .env("HOLDFAST_HTTP_ADDR", "off")
            .env("HOLDFAST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting `holdfast {role}`: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            role: role.to_string(),
            child,
            exit: None,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Send `signal` (a name for kill(1): `STOP`, `CONT`, `TERM`, ...).
    pub async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status()
                .await?;
            anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) -> Ended {
        let _ = self.child.start_kill();
        self.wait().await
    }

    /// Wait for the process to end by itself.
    pub async fn wait(&mut self) -> Ended {
        if let Some(s) = self.exit {
            return s.into();
        }
        match self.child.wait().await {
            Ok(s) => {
                self.exit = Some(s);
                s.into()
            }
            Err(_) => Ended::Exited(-1),
        }
    }

    /// Wait at most `timeout` for the process to end by itself.
    pub async fn wait_for(&mut self, timeout: Duration) -> Option<Ended> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    /// SIGTERM (resuming it first if paused), wait up to `timeout`, then
    /// SIGKILL. Returns how it ended, how long that took, and whether it had
    /// to be killed.
    pub async fn terminate(&mut self, timeout: Duration) -> (Ended, Duration, bool) {
        let started = Instant::now();
        if self.exit.is_none() {
            let _ = self.signal("CONT").await;
            let _ = self.signal("TERM").await;
        }
        match self.wait_for(timeout).await {
            Some(ended) => (ended, started.elapsed(), false),
            None => (self.kill().await, started.elapsed(), true),
        }
    }

    /// Peak resident memory (VmHWM) in MiB, while the process runs.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }
}
