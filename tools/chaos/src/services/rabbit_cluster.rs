//! A throwaway three-node RabbitMQ cluster for the `rabbitmq-node-loss`
//! scenario: three Erlang nodes (`holdfast-chaos-rc1@localhost`, …) with
//! their own AMQP and distribution ports and directories and one shared
//! Erlang cookie; nodes 2 and 3 join node 1 (`stop_app`, `reset`,
//! `join_cluster`, `start_app`). Quorum queues declared with
//! `x-quorum-initial-group-size: 3` have a member on every node, so the
//! loss of any one node leaves a majority.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Rabbit;

/// First AMQP and distribution ports of the cluster's nodes (the single
/// throwaway node uses 5673 and 25673 by default).
pub const FIRST_PORT: u16 = 5674;
pub const FIRST_DIST_PORT: u16 = 25674;

/// How many nodes.
pub const NODES: usize = 3;

/// Three clustered nodes under one directory, removed when dropped.
pub struct RabbitCluster {
    pub nodes: Vec<Rabbit>,
    root: PathBuf,
}

impl RabbitCluster {
    /// Start and join the three nodes under `root`.
    pub async fn start(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        let cookie = uuid::Uuid::new_v4().simple().to_string();
        let mut cluster = Self {
            nodes: Vec::with_capacity(NODES),
            root: root.to_path_buf(),
        };
        for i in 0..NODES {
            let name = format!("holdfast-chaos-rc{}@localhost", i + 1);
            let node = Rabbit::create_in(
                &root.join(format!("rc{}", i + 1)),
                &name,
                FIRST_PORT + i as u16,
                FIRST_DIST_PORT + i as u16,
                None,
                &cookie,
            )
            .await
            .map_err(|e| e.context(format!("starting RabbitMQ node {name}")))?;
            cluster.nodes.push(node);
        }
        let first = cluster.nodes[0].node.clone();
        for node in &cluster.nodes[1..] {
            for args in [
                &["stop_app"][..],
                &["reset"][..],
                &["join_cluster", first.as_str()][..],
                &["start_app"][..],
            ] {
                node.ctl(args)
                    .await
                    .map_err(|e| e.context(format!("{} {args:?}", node.node)))?;
            }
            node.ctl(&["await_startup"]).await?;
        }
        let running = cluster.nodes[0].ctl(&["cluster_status"]).await?;
        for node in &cluster.nodes {
            anyhow::ensure!(
                running.contains(&node.node),
                "{} is not in the cluster: {running}",
                node.node
            );
        }
        Ok(cluster)
    }

    /// The comma-separated URL list, starting at node `first` (so that
    /// processes can be spread over the nodes).
    pub fn urls_from(&self, first: usize) -> String {
        (0..NODES)
            .map(|k| self.nodes[(first + k) % NODES].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `rabbitmqctl -q <args>` on the first node that answers.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut last = None;
        for node in &self.nodes {
            if !node.running() {
                continue;
            }
            match node.ctl(args).await {
                Ok(out) => return Ok(out),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no RabbitMQ node is running")))
    }

    /// The index of the node leading quorum queue `queue`.
    pub async fn leader(&self, queue: &str) -> anyhow::Result<usize> {
        let out = self
            .ctl(&["list_queues", "--no-table-headers", "name", "leader"])
            .await?;
        let leader = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_string())
            .ok_or_else(|| anyhow::anyhow!("no queue {queue} in {out}"))?;
        self.nodes
            .iter()
            .position(|n| n.node == leader)
            .ok_or_else(|| anyhow::anyhow!("{queue} is led by {leader}, not a node of ours"))
    }

    /// How many members of quorum queue `queue` are online.
    pub async fn online_members(&self, queue: &str) -> anyhow::Result<usize> {
        let out = self
            .ctl(&["list_queues", "--no-table-headers", "name", "online"])
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, online)| online.matches('@').count())
            .unwrap_or(0))
    }

    /// Wait (up to `timeout`) until every queue of `queues` has all its
    /// members online again; how long it took.
    pub async fn wait_members(
        &self,
        queues: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let mut all = true;
            for q in queues {
                if self.online_members(q).await.unwrap_or(0) < NODES {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "quorum queues {queues:?} not back to {NODES} online members within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stop every node (orderly) and remove the directory.
    pub async fn shutdown(mut self) {
        for node in self.nodes.iter_mut().rev() {
            if let Err(e) = node.stop().await {
                tracing::warn!(error = format!("{e:#}"), node = %node.node, "stopping a cluster node");
            }
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // The nodes kill themselves and remove their directories on drop.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
