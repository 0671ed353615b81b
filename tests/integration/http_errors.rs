//! The HTTP server's own refusals, over raw TCP against the real server on
//! 127.0.0.1 port 0: over-long URLs and header blocks, wrong methods, unknown
//! routes and bodies over the limit are problem documents; a client that
//! sends half a request head is disconnected after the header timeout while
//! other connections are served; a stalled body is 408; a handler that panics
//! is 500 and counted; one that overruns the request timeout is 503; and a
//! shutdown does not wait on slow clients. Every wait is bounded (20 s) and
//! nothing asserts speed.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use holdfast::fleet::{FleetSettings, HttpAddr, Roles};
use holdfast_coordinator::api::server::{self, ServerLimits};
use holdfast_coordinator::keys::Scope;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The longest any step of these tests may take.
const BOUND: Duration = Duration::from_secs(20);

/// An answer read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Raw {
    /// Assert a problem document with `status`; return its `detail`.
    fn problem(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json"),
            "{self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        assert_eq!(body["status"], status, "{body}");
        for key in ["type", "title", "detail"] {
            assert!(body[key].is_string(), "problem without `{key}`: {body}");
        }
        body["detail"].as_str().unwrap().to_string()
    }
}

/// Parse one HTTP/1.1 response (the server closes after it).
fn parse(bytes: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_string());
    Raw {
        status,
        content_type,
        body: body.as_bytes().to_vec(),
    }
}

/// Send `request` on a new connection and read until the server closes it.
async fn exchange(addr: SocketAddr, request: Vec<u8>) -> Raw {
    tokio::time::timeout(BOUND, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let (mut reader, mut writer) = stream.split();
        // The server may answer (and close) before it has read everything.
        let write = async {
            let _ = writer.write_all(&request).await;
        };
        let mut answer = Vec::new();
        let read = async {
            let _ = reader.read_to_end(&mut answer).await;
        };
        tokio::join!(write, read);
        parse(&answer)
    })
    .await
    .expect("an answer within the bound")
}

fn get_request(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

fn post_json(target: &str, body: &[u8], key: &str) -> Vec<u8> {
    let mut req = format!(
        "POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// A fleet with the API only, on a free port, with `settings` adjusted by `tune`.
async fn api_fleet(tune: impl FnOnce(&mut FleetSettings)) -> (TestFleet, SocketAddr) {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    tune(&mut settings);
    let roles = Roles {
        api: true,
        ..Roles::default()
    };
    let t = TestFleet::start_with(settings, roles, None).await;
    let addr = t.fleets[0].http_addr().expect("the API listens");
    (t, addr)
}

#[tokio::test]
async fn every_refusal_is_a_problem_document() {
    let (t, addr) = api_fleet(|s| s.limits.max_message_bytes = 64 * 1024).await;

    // A URL over the limit (8 KiB by default), and header fields over theirs (16 KiB).
    let long = format!("/v1/batches/{}", "x".repeat(10 * 1024));
    let detail = exchange(addr, get_request(&long, "")).await.problem(414);
    assert!(detail.contains("8192"), "{detail}");
    let big = format!("X-Big: {}\r\n", "y".repeat(20 * 1024));
    let detail = exchange(addr, get_request("/healthz", &big))
        .await
        .problem(431);
    assert!(detail.contains("16384"), "{detail}");
    let many: String = (0..90)
        .map(|i| format!("X-H{i}: {}\r\n", "z".repeat(200)))
        .collect();
    exchange(addr, get_request("/healthz", &many))
        .await
        .problem(431);

    // Wrong method, unknown route, body over the limit.
    let put =
        b"PUT /v1/preview HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    exchange(addr, put.to_vec()).await.problem(405);
    exchange(addr, get_request("/no/such/route", ""))
        .await
        .problem(404);
    let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70 * 1024));
    let key = t.api_key(Scope::Producer, &[]).await;
    exchange(addr, post_json("/v1/preview", huge.as_bytes(), &key))
        .await
        .problem(413);

    // What hyper would refuse on its own, with an empty body, is refused
    // first by the server's watch on each request head, with a problem
    // document: a request target over 65,534 bytes, more than 100 header
    // fields, a malformed request line.
    for (request, status) in [
        (
            get_request(&format!("/{}", "x".repeat(100 * 1024)), ""),
            414,
        ),
        (
            get_request(
                "/healthz",
                &(0..120)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>(),
            ),
            431,
        ),
        (b"NOT HTTP\r\n\r\n".to_vec(), 400),
    ] {
        exchange(addr, request).await.problem(status);
    }

    // The server answers normally afterwards.
    assert_eq!(
        exchange(addr, get_request("/healthz", "")).await.status,
        200
    );
    t.stop().await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_while_others_are_served() {
    let (t, addr) = api_fleet(|s| s.api.http_header_timeout_secs = 1).await;

    // A handful of clients send half a request head and stall.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow:")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = tokio::time::Instant::now();

    // Others are served meanwhile, on connections of their own.
    for _ in 0..3 {
        let ok = exchange(addr, get_request("/healthz", "")).await;
        assert_eq!((ok.status, ok.body.as_slice()), (200, &b"ok"[..]));
    }

    // Each slow client is disconnected, unanswered, after the header timeout.
    for mut s in slow {
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut got))
            .await
            .expect("the slow client is disconnected within the bound")
            .ok();
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        exchange(addr, get_request("/healthz", "")).await.status,
        200
    );
    t.stop().await;
}

#[tokio::test]
async fn a_stalled_body_is_answered_408() {
    let (t, addr) = api_fleet(|s| s.api.http_body_timeout_secs = 1).await;
    let key = t.api_key(Scope::Producer, &[]).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/preview HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n{{\"account_id\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut answer))
        .await
        .expect("an answer within the bound")
        .ok();
    let detail = parse(&answer).problem(408);
    assert!(detail.contains("1 s"), "{detail}");
    t.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_wait_and_idle_ones_are_closed() {
    let (t, addr) = api_fleet(|s| {
        s.api.http_max_connections = 2;
        s.api.http_header_timeout_secs = 1;
    })
    .await;

    // One keep-alive connection that made a request and now idles, one that
    // never sends anything: the cap of two is reached.
    let mut used = TcpStream::connect(addr).await.unwrap();
    used.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).ends_with("ok") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(BOUND, used.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the first answer arrives");
        first.extend_from_slice(&buf[..n]);
    }
    let silent = TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();

    // A third client is not served while both are open...
    let third = tokio::spawn(exchange(addr, get_request("/healthz", "")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "served past the connection cap");

    // ...the idle ones are closed after the header timeout, unanswered...
    for mut idle in [used, silent] {
        let mut rest = Vec::new();
        tokio::time::timeout(BOUND, idle.read_to_end(&mut rest))
            .await
            .expect("an idle connection is closed within the bound")
            .ok();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
    // ...and then the third is served.
    let answer = third.await.unwrap();
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ok"[..]));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    t.stop().await;
}

/// A router with a handler that panics and one that takes too long, served
/// like the API, and the token that stops it.
async fn misbehaving_server(limits: ServerLimits) -> (SocketAddr, CancellationToken) {
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/panic",
            get(|| async {
                if std::hint::black_box(true) {
                    panic!("this handler fails on purpose");
                }
                "unreachable"
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "late"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(app, listener, limits, shutdown.clone()));
    (addr, shutdown)
}

fn panics_counted() -> u64 {
    let rendered = holdfast_common::telemetry::metrics().render();
    rendered
        .lines()
        .find(|l| {
            l.starts_with("holdfast_task_panics_total{")
                && l.contains(r#"role="api""#)
                && l.contains(r#"task="http""#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no api/http panic counter in\n{rendered}"))
}

#[tokio::test]
async fn a_panic_is_500_and_counted_and_an_overrun_is_503() {
    let limits = ServerLimits {
        request_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let (addr, shutdown) = misbehaving_server(limits).await;
    let before = panics_counted();

    exchange(addr, get_request("/panic", "")).await.problem(500);
    assert_eq!(panics_counted(), before + 1);
    let detail = exchange(addr, get_request("/slow", "")).await.problem(503);
    assert!(detail.contains("1 s"), "{detail}");

    // The server goes on serving.
    assert_eq!(exchange(addr, get_request("/ok", "")).await.status, 200);
    shutdown.cancel();
}

#[tokio::test]
async fn a_shutdown_does_not_wait_on_slow_clients() {
    // Timeouts far longer than the bound: the shutdown must not wait for them.
    let limits = ServerLimits {
        header_timeout: Duration::from_secs(600),
        body_timeout: Duration::from_secs(600),
        ..ServerLimits::default()
    };
    let app = Router::new().route("/ok", get(|| async { "ok" }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(server::serve(app, listener, limits, shutdown.clone()));

    let mut half_head = TcpStream::connect(addr).await.unwrap();
    half_head
        .write_all(b"GET /ok HTTP/1.1\r\nHost: test\r\nX-Slow:")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(BOUND, idle.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(n > 0);
    // Let the server see both connections before it is told to stop.
    assert_eq!(exchange(addr, get_request("/ok", "")).await.status, 200);

    shutdown.cancel();
    tokio::time::timeout(BOUND, served)
        .await
        .expect("the server stops within the bound, slow clients or not")
        .unwrap();
    for mut s in [half_head, idle] {
        let mut rest = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut rest))
            .await
            .expect("the connection is closed")
            .ok();
    }
}
