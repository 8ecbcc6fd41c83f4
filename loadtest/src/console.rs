//! The web console's pages with many processes in Redis: seeds `processes` processes
//! through the engine's create path (what the gateway's submit does; concurrent tasks),
//! cancels every other one right after its creation so half are finished (Cancelled) and
//! half active (their first job queued, no worker runs), then serves the gateway on
//! loopback and times `renders` GETs of the process list (first page, no filter), a
//! process's detail page and the overview, each from request to the last byte of the
//! reply. The target: list and detail under 100 ms of server time with 100,000
//! processes.

use crate::error::BenchError;
use crate::server::Server;
use crate::stats::Dist;
use crate::throughput::{Bench, spread, submission};
use honua_scheduler::processes::Processes;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct ConsoleParams {
    pub processes: usize,
    pub renders: usize,
    pub seeders: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsoleResult {
    pub processes: usize,
    pub active: usize,
    pub finished: usize,
    pub seed_seconds: f64,
    pub renders: usize,
    pub list: Dist,
    pub detail: Dist,
    pub overview: Dist,
    /// Bytes of each page's last reply.
    pub list_bytes: usize,
    pub detail_bytes: usize,
}

/// Creates `total` processes from `tasks` concurrent tasks, cancelling every other one;
/// returns the ids in creation order (the odd ones cancelled).
async fn seed(engine: &Processes, total: usize, tasks: usize) -> Result<Vec<String>, BenchError> {
    let (engine, sub) = (engine.clone(), Arc::new(submission()));
    let mut ids = spread(total, tasks, move |i| {
        let (engine, sub) = (engine.clone(), sub.clone());
        async move {
            let id = engine.create(&sub, None).await?.id().to_string();
            if i % 2 == 1 {
                engine
                    .cancel(&id, Some("loadtest"), None)
                    .await
                    .map_err(|e| BenchError::Component(format!("cancel {id}: {e}")))?;
            }
            Ok((i, id))
        }
    })
    .await?;
    ids.sort_unstable();
    Ok(ids.into_iter().map(|(_, id)| id).collect())
}

/// One GET on a fresh loopback connection: the reply's size and the time to its last byte.
async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(usize, f64), BenchError> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(BenchError::io("cannot connect to the gateway"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(BenchError::io("cannot send a request"))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)
        .await
        .map_err(BenchError::io("cannot read a reply"))?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if !body.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&body[..body.len().min(200)]).to_string();
        return Err(BenchError::Component(format!("GET {path}: {head}")));
    }
    Ok((body.len(), ms))
}

/// `renders` timed GETs of `path` (after one untimed).
async fn time_page(
    addr: std::net::SocketAddr,
    path: &str,
    renders: usize,
) -> Result<(Dist, usize), BenchError> {
    let (mut bytes, _) = get(addr, path).await?;
    let mut ms = Vec::with_capacity(renders);
    for _ in 0..renders {
        let (b, t) = get(addr, path).await?;
        bytes = b;
        ms.push(t);
    }
    Ok((Dist::of(ms), bytes))
}

pub async fn run(
    server: &Server,
    prefix: &str,
    p: ConsoleParams,
) -> Result<ConsoleResult, BenchError> {
    let bench = Bench::prepare(server, prefix, "noop", |_| {})?;
    let engine = bench.engine().await;
    // The consumer groups a scheduler creates at start (the overview reads the job queue's).
    bench.store.ensure_groups().await?;
    eprintln!(
        "console: seeding {} processes (half cancelled) ...",
        p.processes
    );
    let start = Instant::now();
    let ids = seed(&engine, p.processes, p.seeders).await?;
    let seed_seconds = start.elapsed().as_secs_f64();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(BenchError::io("cannot bind the gateway"))?;
    let addr = listener
        .local_addr()
        .map_err(BenchError::io("no gateway address"))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(honua_scheduler::gateway::serve(
        engine.clone(),
        listener,
        shutdown.clone(),
    ));
    eprintln!("console: timing {} renders of each page ...", p.renders);
    let timed = async {
        let (list, list_bytes) = time_page(addr, "/ui/processes", p.renders).await?;
        // A finished (cancelled) process from the middle of the seeding.
        let id = &ids[(ids.len() / 2) | 1];
        let (detail, detail_bytes) =
            time_page(addr, &format!("/ui/processes/{id}"), p.renders).await?;
        let (overview, _) = time_page(addr, "/ui", p.renders).await?;
        Ok::<_, BenchError>((list, list_bytes, detail, detail_bytes, overview))
    }
    .await;
    shutdown.cancel();
    let _ = serving.await;
    bench.cleanup(server).await;
    let (list, list_bytes, detail, detail_bytes, overview) = timed?;
    Ok(ConsoleResult {
        processes: ids.len(),
        active: ids.len() - ids.len() / 2,
        finished: ids.len() / 2,
        seed_seconds,
        renders: p.renders,
        list,
        detail,
        overview,
        list_bytes,
        detail_bytes,
    })
}
