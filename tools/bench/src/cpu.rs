//! Where the CPU goes during a bench phase: the CPU time of each role
//! process, of PostgreSQL's processes, of RabbitMQ's Erlang VM and of the
//! bench itself (the producer), read from `/proc` before and after. On a
//! 2-core machine the services and the roles share the same cores, so this
//! split says which part a faster path would have to shrink.

use std::collections::BTreeMap;

use serde::Serialize;

/// CPU seconds per component over one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuSplit {
    pub phase: String,
    pub wall_seconds: f64,
    /// (component, CPU seconds), largest first.
    pub cpu_seconds: Vec<(String, f64)>,
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

    /// utime + stime, in ticks, summed per component.
    fn sample(&self) -> BTreeMap<String, u64> {
        let me = std::process::id();
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
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ...`: comm may hold spaces, so split after the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
            let component = if pid == me {
                "bench (producer, checks)".to_string()
            } else if let Some((_, role)) = self.roles.iter().find(|(p, _)| *p == pid) {
                format!("holdfast {role}")
            } else if comm == "postgres" {
                "postgresql".to_string()
            } else if comm.starts_with("beam") || comm == "erl_child_setup" {
                "rabbitmq".to_string()
            } else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After the comm: state is field 0, utime field 11, stime field 12.
            let ticks = fields
                .get(11)
                .and_then(|u| u.parse::<u64>().ok())
                .unwrap_or(0)
                + fields
                    .get(12)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
            *out.entry(component).or_default() += ticks;
        }
        out
    }
}
