//! The roles under measurement, as child processes (`holdfast coordinator`,
//! `worker`, `reconciler`), so that each role's peak RSS is its own.

use std::time::Duration;

use holdfast_common::config::Connections;
use holdfast_harness::processes::RoleProcess;

/// The roles as child processes of the bench: one process each.
pub(crate) struct Children {
    roles: Vec<RoleProcess>,
}

impl Children {
    pub(crate) fn start(conn: &Connections) -> anyhow::Result<Self> {
        // Every role with the settings it ships with.
        let roles = ["coordinator", "worker", "reconciler"]
            .into_iter()
            .map(|role| RoleProcess::spawn(conn, role, role, &[], None))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { roles })
    }

    /// Pause or resume a role (`STOP` / `CONT`), to measure the others alone.
    pub(crate) async fn signal(&self, role: &str, signal: &str) -> anyhow::Result<()> {
        for p in self.roles.iter().filter(|p| p.role == role) {
            p.signal(signal).await?;
        }
        Ok(())
    }

    /// (pid, role) of each role process, for [`crate::cpu::CpuMeter`].
    pub(crate) fn pids(&self) -> Vec<(u32, String)> {
        self.roles
            .iter()
            .filter_map(|p| Some((p.pid()?, p.role.clone())))
            .collect()
    }

    pub(crate) fn peak_rss_mib(&self) -> Vec<(String, f64)> {
        self.roles
            .iter()
            .filter_map(|p| Some((p.role.clone(), p.peak_rss_mib()?)))
            .collect()
    }

    pub(crate) async fn stop(mut self) {
        for p in &mut self.roles {
            p.terminate(Duration::from_secs(10)).await;
        }
    }
}
