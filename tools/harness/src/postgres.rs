//! A throwaway PostgreSQL cluster (for the chaos run, and the bench's
//! per-statement profile): `initdb` into `<root>/pg` (as the `postgres` user
//! when we are root: the server refuses to run as root), then `pg_ctl`
//! starts, crashes and stops it. With TLS files it serves TLS only
//! (`ssl=on`, and `hostssl` lines alone in `pg_hba.conf`); extra server
//! settings (`name=value`, e.g. `shared_preload_libraries=pg_stat_statements`)
//! are passed to every start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::host::{ensure_free, output};

/// The files a TLS listener needs: the CA's certificate (what clients
/// trust), the server's certificate and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A synchronous standby of such a cluster (the `postgres-failover` scenario).
#[path = "pg_standby.rs"]
mod standby;

/// Where the Debian packages (scripts/services.sh installs them) put the server binaries.
const PG_LIB: &str = "/usr/lib/postgresql";

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
    /// The server's certificate and key (copies the server may read) and the CA.
    tls: Option<TlsFiles>,
    /// Extra server settings, `name=value`, passed as `-c` at every start.
    settings: Vec<String>,
}

impl Postgres {
    /// `initdb` a fresh cluster in `<root>/pg` and start it on `port`, with
    /// a TLS-only listener when `tls` is given.
    pub async fn create(root: &Path, port: u16, tls: Option<&TlsFiles>) -> anyhow::Result<Self> {
        Self::create_with(root, port, tls, &[]).await
    }

    /// [`Postgres::create`] with extra server settings (`name=value`), given
    /// at every start.
    pub async fn create_with(
        root: &Path,
        port: u16,
        tls: Option<&TlsFiles>,
        settings: &[&str],
    ) -> anyhow::Result<Self> {
        for s in settings {
            anyhow::ensure!(
                s.split_once('=').is_some_and(|(k, _)| !k.is_empty())
                    && !s.contains(char::is_whitespace),
                "PostgreSQL setting {s:?}: expected name=value without spaces"
            );
        }
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
            tls: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
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
        if let Some(files) = tls {
            pg.tls = Some(pg.serve_tls_only(files).await?);
        }
        pg.start().await?;
        Ok(pg)
    }

    /// Copy the server's certificate and key where the server may read
    /// them, and allow TCP connections over TLS only.
    async fn serve_tls_only(&self, files: &TlsFiles) -> anyhow::Result<TlsFiles> {
        let data = self.dir.join("data");
        let own = TlsFiles {
            ca: files.ca.clone(),
            cert: data.join("server.crt"),
            key: data.join("server.key"),
        };
        std::fs::copy(&files.cert, &own.cert)?;
        std::fs::copy(&files.key, &own.key)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "# Throwaway cluster: TLS only over TCP.\n\
             local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl all all ::1/128 trust\n",
        )?;
        if self.as_postgres {
            output(
                Command::new("chown")
                    .arg("postgres")
                    .arg(&own.cert)
                    .arg(&own.key)
                    .arg(data.join("pg_hba.conf")),
                "chown postgres",
            )
            .await?;
        }
        Ok(own)
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
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        for s in &self.settings {
            options.push_str(&format!(" -c {s}"));
        }
        if let Some(tls) = &self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                tls.cert.display(),
                tls.key.display()
            ));
        }
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

    /// A URL of database `name` on this cluster: with TLS, by the name on
    /// the server's certificate, checked in full against the throwaway CA.
    pub fn url(&self, name: &str) -> String {
        match &self.tls {
            None => format!("postgres://postgres@127.0.0.1:{}/{name}", self.port),
            Some(tls) => format!(
                "postgres://postgres@localhost:{}/{name}?sslmode=verify-full&sslrootcert={}",
                self.port,
                tls.ca.display()
            ),
        }
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
