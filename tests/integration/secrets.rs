//! Secrets come from the environment or from files (`*_FILE`), and never
//! show in logs or error messages: the binary runs with its database URL,
//! broker URL and admin token in files, logging at debug level.

use crate::support;

use std::path::PathBuf;
use std::process::Stdio;

use holdfast::fleet::Roles;
use support::*;
use tokio::io::AsyncReadExt;

const DB_PASSWORD: &str = "pg-Secret-4711";
const TOKEN: &str = "admin-Token-0815";

/// A directory of secret files, removed afterwards.
struct SecretDir(PathBuf);

impl SecretDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("holdfast-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        SecretDir(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, format!("{content}\n")).unwrap();
        path
    }
}

impl Drop for SecretDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test database's URL with a password (trust authentication ignores it).
fn with_password(url: &str) -> String {
    url.replacen("://postgres@", &format!("://postgres:{DB_PASSWORD}@"), 1)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn secrets_come_from_files_and_never_reach_the_logs() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 10).await;
    let dir = SecretDir::new();
    let db = dir.write("database_url", &with_password(&t.conn.database_url));
    let mq = dir.write("amqp_url", &t.conn.amqp_url);
    let token = dir.write("admin_token", TOKEN);
    let port = free_port();

    let mut child = holdfast_command()
        .arg("coordinator")
        .env("HOLDFAST_DATABASE_URL_FILE", &db)
        .env("HOLDFAST_AMQP_URL_FILE", &mq)
        .env("HOLDFAST_ADMIN_TOKEN_FILE", &token)
        .env("HOLDFAST_NAMESPACE", &t.conn.namespace)
        .env("HOLDFAST_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("HOLDFAST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Ready once it answers on the database and the broker read from the files.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually("the coordinator becomes ready", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // The admin token from the file is the one that works.
    let grant = |token: &'static str| {
        http.post(format!("{base}/v1/accounts/acme/grants"))
            .bearer_auth(token)
            .json(&serde_json::json!({"amount": 5}))
            .send()
    };
    assert_eq!(grant("wrong").await.unwrap().status(), 401);
    assert_eq!(grant(TOKEN).await.unwrap().status(), 200);
    assert_eq!(t.available("acme").await, 15);

    child.start_kill().unwrap();
    let _ = child.wait().await;
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(!logs.is_empty(), "the coordinator logged at debug level");
    assert!(!logs.contains(DB_PASSWORD), "the database password leaked");
    assert!(!logs.contains(TOKEN), "the admin token leaked");
}

#[tokio::test]
async fn errors_name_the_server_and_the_file_never_the_secret() {
    let dir = SecretDir::new();
    let unreachable = format!("postgres://holdfast:{DB_PASSWORD}@127.0.0.1:1/holdfast");
    let db = dir.write("database_url", &unreachable);
    let run = |args: &[&str], file: &PathBuf| {
        holdfast_command()
            .args(args)
            .env("HOLDFAST_DATABASE_URL_FILE", file)
            .env("HOLDFAST_LOG", "debug")
            .output()
    };
    let out = run(&["migrate"], &db).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("127.0.0.1:1/holdfast"), "{stderr}");
    assert!(!stderr.contains(DB_PASSWORD), "{stderr}");

    let missing = dir.0.join("nothing-here");
    let out = run(&["audit"], &missing).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot read the secret file") && stderr.contains("nothing-here"),
        "{stderr}"
    );
}
