//! Where the CPU goes during a bench phase: the CPU time of each role
//! process, of PostgreSQL's processes, of RabbitMQ's Erlang VM and of the
//! bench itself (the producer), read from `/proc` before and after. On a
//! 2-core machine the services and the roles share the same cores, so this
//! split says which part a faster path would have to shrink.
//!
//! PostgreSQL's part is that of the one server the bench uses
//! ([`use_postgres_server`]): its postmaster and every process whose parent
//! it is (backends, walwriter, checkpointer, background writer, autovacuum),
//! plus the postmaster's `cutime` + `cstime`, the CPU time of the children it
//! has reaped, so that a backend that ends between the two samples (a
//! connection closed by a pool, an autovacuum worker) still counts. Other
//! PostgreSQL servers on the machine (other builds' throwaway clusters) do
//! not count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

/// The component name of PostgreSQL's CPU time.
pub const POSTGRESQL: &str = "postgresql";

/// The postmaster of the server the bench uses (0: not known yet).
static POSTMASTER: AtomicU32 = AtomicU32::new(0);

/// Attribute to PostgreSQL the CPU time of the server whose postmaster is
/// `pid`, and of its children ([`postmaster_of`] finds it).
pub fn use_postgres_server(pid: u32) {
    POSTMASTER.store(pid, Ordering::Relaxed);
}

/// The postmaster of the server behind `database_url`: the parent of the
/// backend that serves a connection to it.
pub async fn postmaster_of(database_url: &str) -> anyhow::Result<u32> {
    let pool = holdfast_common::database::pool(database_url, 1)?;
    let c = pool.get().await?;
    let backend: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let stat = Stat::read(backend as u32).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot read /proc/{backend}/stat: the bench measures PostgreSQL's CPU from /proc, so the server must run on this machine"
        )
    })?;
    Ok(stat.ppid)
}

/// CPU seconds per component over one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuSplit {
    pub phase: String,
    pub wall_seconds: f64,
    /// (component, CPU seconds), largest first.
    pub cpu_seconds: Vec<(String, f64)>,
}

impl CpuSplit {
    /// CPU seconds of every component together.
    pub fn total_seconds(&self) -> f64 {
        self.cpu_seconds.iter().map(|(_, s)| s).sum()
    }

    /// CPU seconds of `component` (0 when it took none).
    pub fn seconds_of(&self, component: &str) -> f64 {
        self.cpu_seconds
            .iter()
            .filter(|(c, _)| c == component)
            .map(|(_, s)| s)
            .sum()
    }
}

/// The fields of `/proc/<pid>/stat` the meter reads.
struct Stat {
    comm: String,
    ppid: u32,
    /// utime + stime, in ticks.
    own: u64,
    /// cutime + cstime: the children this process has waited for, in ticks.
    children: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ...`: comm may hold spaces, so split after the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the comm: state is field 0, ppid 1, utime 11, stime 12,
        // cutime 13, cstime 14.
        let n = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
        Some(Self {
            comm: comm.to_string(),
            ppid: n(1) as u32,
            own: n(11) + n(12),
            children: n(13) + n(14),
        })
    }
}

/// A snapshot of CPU time per component.
pub struct CpuMeter {
    roles: Vec<(u32, String)>,
    ticks_per_second: f64,
    at: std::time::Instant,
    before: BTreeMap<String, u64>,
}

impl CpuMeter {
    /// Start measuring; `roles` names the role processes by pid.
    pub fn start(roles: Vec<(u32, String)>) -> Self {
        let ticks_per_second = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0);
        let mut meter = Self {
            roles,
            ticks_per_second,
            at: std::time::Instant::now(),
            before: BTreeMap::new(),
        };
        meter.before = meter.sample();
        meter
    }

    /// CPU seconds per component since [`CpuMeter::start`].
    pub fn stop(self, phase: &str) -> CpuSplit {
        let after = self.sample();
        let mut cpu: Vec<(String, f64)> = after
            .iter()
            .map(|(k, v)| {
                let d = v.saturating_sub(*self.before.get(k).unwrap_or(&0));
                (k.clone(), d as f64 / self.ticks_per_second)
            })
            .filter(|(_, s)| *s > 0.0)
            .collect();
        cpu.sort_by(|a, b| b.1.total_cmp(&a.1));
        CpuSplit {
            phase: phase.into(),
            wall_seconds: self.at.elapsed().as_secs_f64(),
            cpu_seconds: cpu,
        }
    }

    /// utime + stime, in ticks, summed per component (for PostgreSQL's
    /// postmaster, with its reaped children's time).
    fn sample(&self) -> BTreeMap<String, u64> {
        let me = std::process::id();
        let postmaster = POSTMASTER.load(Ordering::Relaxed);
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(stat) = Stat::read(pid) else {
                continue;
            };
            let (component, ticks) = if pid == me {
                ("bench (producer, checks)".to_string(), stat.own)
            } else if let Some((_, role)) = self.roles.iter().find(|(p, _)| *p == pid) {
                (format!("holdfast {role}"), stat.own)
            } else if postmaster != 0 && pid == postmaster {
                (POSTGRESQL.to_string(), stat.own + stat.children)
            } else if (postmaster != 0 && stat.ppid == postmaster)
                || (postmaster == 0 && stat.comm == "postgres")
            {
                (POSTGRESQL.to_string(), stat.own)
            } else if stat.comm.starts_with("beam") || stat.comm == "erl_child_setup" {
                ("rabbitmq".to_string(), stat.own)
            } else {
                continue;
            };
            *out.entry(component).or_default() += ticks;
        }
        out
    }
}
