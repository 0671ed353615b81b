//! What the throwaway services need from the host: ports that are free
//! (and, later, open), and the packaged tools run to completion.

use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Command;

/// How long a service may take to start before the run gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

/// Refuse a port something already listens on: it would answer in our service's place.
pub fn ensure_free(port: u16, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !port_open(port),
        "port {port} (for the throwaway {what}) is already taken; choose another port"
    );
    Ok(())
}

/// Run `cmd` to completion; its standard output, or an error with both outputs.
pub async fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
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
