//! Hostile HTTP clients against the hardened server (gateway and worker metrics): an idle
//! socket, a slow header trickle and a 1-byte-per-interval body are cut off, the connection
//! cap holds further clients in the backlog, and normal clients are served meanwhile. A
//! worker out of file descriptors backs off instead of spinning on accept errors.

use honua_runtime::http_server::Limits;
use honua_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short limits so the test is quick; the deadlines below are far longer.
fn limits(max_connections: usize) -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(1_000),
        idle_timeout: Duration::from_millis(1_500),
        body_read_timeout: Duration::from_millis(1_500),
        max_connections,
    }
}

fn http_config(cfg: &mut honua_shared::config::Config, l: Limits) {
    cfg.http_server.header_read_timeout_ms = l.header_read_timeout.as_millis() as u64;
    cfg.http_server.idle_timeout_ms = l.idle_timeout.as_millis() as u64;
    cfg.http_server.body_read_timeout_ms = l.body_read_timeout.as_millis() as u64;
    cfg.http_server.max_connections = l.max_connections;
}

/// Sends `bytes` one at a time, `every` apart, then keeps reading; returns what the server
/// sent before it closed the connection. Panics if it is still open after [`DEADLINE`].
async fn trickle(addr: SocketAddr, head: Vec<u8>, bytes: &[u8], every: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&head).await.unwrap();
    let end = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    let mut next = bytes.iter().cycle();
    loop {
        assert!(
            Instant::now() < end,
            "the server never closed the slow client"
        );
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {
                if !bytes.is_empty() && s.write_all(&[*next.next().unwrap()]).await.is_err() {
                    return String::from_utf8_lossy(&got).into_owned();
                }
            }
        }
    }
}

/// A well-behaved request on a fresh connection; returns the status code.
async fn get(addr: SocketAddr, path: &str) -> u16 {
    try_get(addr, path).await.unwrap()
}

async fn try_get(addr: SocketAddr, path: &str) -> Option<u16> {
    honua_runtime::install_crypto_provider();
    let r = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    Some(r.status().as_u16())
}

/// Holds `n` connections that send nothing; waits until the server has accepted them (a
/// slot is taken only once accepted, which `established` cannot tell: the caller checks).
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.unwrap());
    }
    v
}

/// Whether the server closed this socket (EOF or reset already received).
fn closed_by_server(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Every slow client is cut off while normal clients are served (`reads_body`: the route
/// reads the body, so the trickled one gets a 408).
async fn slow_clients_are_cut_off(addr: SocketAddr, post_path: &str, reads_body: bool) {
    let every = Duration::from_millis(200);
    let idle = tokio::spawn(trickle(addr, vec![], b"", every));
    let header = tokio::spawn(trickle(
        addr,
        b"GET /health/live HTTP/1.1\r\nhost: x\r\n".to_vec(),
        b"x-slow: aaaaaaaa",
        every,
    ));
    let head = format!(
        "POST {post_path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    );
    let body = tokio::spawn(trickle(addr, head.into_bytes(), b"{", every));
    // A kept-alive connection that goes idle after one request.
    let keepalive = tokio::spawn(trickle(
        addr,
        b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        b"",
        every,
    ));
    // Normal clients, meanwhile.
    for _ in 0..5 {
        assert_eq!(get(addr, "/metrics").await, 200);
    }
    assert_eq!(
        idle.await.unwrap(),
        "",
        "idle socket closed without an answer"
    );
    assert_eq!(
        header.await.unwrap(),
        "",
        "header trickle closed without an answer"
    );
    let body = body.await.unwrap();
    if reads_body {
        assert!(body.starts_with("HTTP/1.1 408"), "{body}");
        assert!(body.contains("request_timeout"), "{body}");
    }
    let keepalive = keepalive.await.unwrap();
    assert!(keepalive.starts_with("HTTP/1.1 200"), "{keepalive}");
    assert_eq!(get(addr, "/metrics").await, 200);
}

/// With every slot taken by an idle socket, a new client waits until the server frees one
/// (by cutting an idle socket off), then is served.
async fn connection_cap_holds(addr: SocketAddr, cap: usize) {
    let held = idle_sockets(addr, cap).await;
    let started = Instant::now();
    assert_eq!(get(addr, "/metrics").await, 200);
    let freed = held.iter().filter(|s| closed_by_server(s)).count();
    assert!(
        freed >= 1,
        "served after {:?} with all {cap} slots still held",
        started.elapsed()
    );
}

/// A scheduler with its gateway and `workers` workers, with `l` as its connection limits.
async fn gateway(l: Limits, workers: usize) -> (RedisServer, tempfile::TempDir, Fleet) {
    let redis = RedisServer::start();
    let dir = defs_dir(&[defs::THREE]);
    let mut cfg = test_config(&redis.url(), dir.path());
    http_config(&mut cfg, l);
    let f = Fleet::start(cfg, 1, workers).await;
    (redis, dir, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_cuts_off_slow_clients_and_serves_normal_ones() {
    let (_redis, _dir, f) = gateway(limits(10_000), 1).await;
    slow_clients_are_cut_off(f.addr, "/api/processes", true).await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_connection_cap_holds_clients_in_the_backlog() {
    let (_redis, _dir, f) = gateway(limits(4), 0).await;
    connection_cap_holds(f.addr, 4).await;
    f.stop().await;
}

async fn metrics_server(l: Limits) -> (SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(honua_runtime::telemetry::serve_metrics(
        listener,
        l,
        stop.clone(),
    ));
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_cut_off_slow_clients_and_cap_connections() {
    let (addr, stop) = metrics_server(limits(10_000)).await;
    slow_clients_are_cut_off(addr, "/metrics", false).await;
    stop.cancel();
    let (addr, stop) = metrics_server(limits(3)).await;
    connection_cap_holds(addr, 3).await;
    stop.cancel();
}

/// Open descriptors of a process.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in ms (clock ticks of 10 ms).
fn cpu_ms(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `after` starts at field 3.
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_out_of_descriptors_backs_off_instead_of_spinning() {
    let redis = RedisServer::start();
    let dir = defs_dir(&[defs::THREE]);
    let cfg = test_config(&redis.url(), dir.path());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path().join("exec.log");
    let w = WorkerProcess::spawn_with_env(
        env!("CARGO_BIN_EXE_honua-test-worker"),
        &cfg,
        "w1",
        &log,
        &[("HONUA_WORKER_METRICS_ADDR", &addr.to_string())],
    );
    wait_for("the worker's metrics", DEADLINE, || async {
        (try_get(addr, "/metrics").await == Some(200)).then_some(())
    })
    .await;
    // Leave the worker four spare descriptors, then connect more clients than that.
    let pid = w.pid();
    let limit = fd_count(pid) + 4;
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(ok.success(), "prlimit failed");
    let held = idle_sockets(addr, 40).await;
    wait_for("the worker to run out of descriptors", DEADLINE, || async {
        (fd_count(pid) >= limit).then_some(())
    })
    .await;
    // A measurement window, not a wait for a condition: CPU used while every accept fails
    // with EMFILE. A hot retry loop uses a whole core (~2,000 ms here); backing off, the
    // worker stays near idle.
    let before = cpu_ms(pid);
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let used = cpu_ms(pid) - before;
    eprintln!("worker CPU while out of descriptors: {used} ms in {window:?}");
    assert!(
        used < window.as_millis() as u64 / 4,
        "{used} ms of CPU in {window:?}: the accept loop spins"
    );
    drop(held);
    wait_for("the worker's metrics again", DEADLINE, || async {
        (try_get(addr, "/metrics").await == Some(200)).then_some(())
    })
    .await;
}
