//! push-bench: load generator for pushcluster and the servers it is compared
//! with (nginx+nchan, Node `ws`, the push-floor). Which URLs to subscribe and
//! publish to are templates, so one generator drives every server with the
//! same message sizes, subscriber counts and timing. Loopback only, bounded in
//! count and time. Reports the server's memory and CPU from /proc and its own
//! CPU, since the server and the generator share the machine.
//!
//! Longer than 500 lines on purpose: one subcommand per scenario, each a
//! page, sharing the CLI and the report; the transports and the /proc
//! readings already live in `target.rs` and `proc.rs`.

mod proc;
mod target;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use proc::{cpu_by_pid, cpu_per_push_by_name, delta, usage, Usage};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use target::{now_ns, sent_at_bytes, Sub};
use tokio_tungstenite::tungstenite::Message;

/// Load generator for push servers.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the server is, as the generator sees it.
#[derive(clap::Args, Debug, Clone)]
struct Server {
    /// WebSocket addresses (host:port); subscribers go round-robin.
    #[arg(long, value_delimiter = ',')]
    ws: Vec<SocketAddr>,
    /// pushcluster comets' TCP addresses: idle subscribers then use the TCP
    /// protocol (gopush-cluster's) instead of WebSocket.
    #[arg(long, value_delimiter = ',')]
    tcp: Vec<SocketAddr>,
    #[command(flatten)]
    sub: Sub,
    /// Source addresses to spread connections over (each has ~28k ports).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Server process ids: memory and CPU are summed over them.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Idle density: hold N subscribers with heartbeats; prints `open=N` once
    /// they are connected, then the server's memory per connection.
    Idle {
        #[command(flatten)]
        server: Server,
        /// Connections to open.
        #[arg(long)]
        conns: usize,
        /// First connection number (keys are `idle-<n>`), for several generators.
        #[arg(long, default_value_t = 0)]
        first: usize,
        /// Seconds to hold the connections once open.
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// Connections opened per second; 0: as fast as the server's accept
        /// queue keeps up (pushpin, which answers bursts with 502, gets a rate).
        #[arg(long, default_value_t = 0)]
        connect_rate: u64,
    },
    /// Private push latency: one subscriber per key; pushes at a fixed rate;
    /// latency from the scheduled send time to delivery.
    Latency {
        #[command(flatten)]
        server: Server,
        /// Publish URL; `{key}` is replaced by the key.
        #[arg(long)]
        publish: String,
        /// Publish request body (see `publish_body`); `{key}` is the key.
        #[arg(long, default_value = "{msg}")]
        publish_body: String,
        /// Resolve each key's WebSocket address through pushcluster's web
        /// (`<url>/1/server/get`) instead of going round-robin over --ws.
        #[arg(long)]
        resolve: Option<String>,
        /// Subscribers, one key each.
        #[arg(long)]
        keys: usize,
        /// Pushes per second.
        #[arg(long)]
        rate: u64,
        /// Seconds of pushing.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Writes every delivery as `<send time, Unix seconds> <latency µs>`
        /// to this file, to see when the tail happens.
        #[arg(long)]
        trace: Option<std::path::PathBuf>,
    },
    /// Broadcast fan-out: N subscribers, broadcasts from P publishers with at
    /// most K in flight each; deliveries per server CPU-second. With --rate,
    /// broadcasts leave on a fixed schedule instead, and latency counts from
    /// each one's scheduled send time.
    Fanout {
        #[command(flatten)]
        server: Server,
        /// Broadcast URL (POSTed the message body).
        #[arg(long)]
        publish: String,
        /// Broadcast request body (see `publish_body`); `{key}` is --key.
        #[arg(long, default_value = "{msg}")]
        publish_body: String,
        /// Key every subscriber subscribes to (`{i}`: its number), e.g. one
        /// shared channel for servers whose broadcast is a channel.
        #[arg(long, default_value = "fan-{i}")]
        key: String,
        /// Subscribers.
        #[arg(long)]
        conns: usize,
        /// Publishers.
        #[arg(long, default_value_t = 2)]
        publishers: usize,
        /// Broadcasts in flight per publisher.
        #[arg(long, default_value_t = 2)]
        in_flight: usize,
        /// Seconds of broadcasting.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Message body size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Broadcasts per second on a fixed schedule (0: each publisher sends
        /// again as soon as a broadcast is acknowledged). Publishers × in
        /// flight then caps the broadcasts awaiting their acknowledgement; a
        /// send that waits for room is late, and its lateness counts.
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Offline catch-up (pushcluster): stores M messages for each of K keys,
    /// then K clients subscribe and fetch their backlog; time until all have it.
    Catchup {
        #[command(flatten)]
        server: Server,
        /// pushcluster web public URL (resolve and /1/msg/get).
        #[arg(long)]
        web: String,
        /// pushcluster web admin URL (multi-push to store the backlog).
        #[arg(long)]
        admin: String,
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        #[arg(long, default_value_t = 100)]
        messages: usize,
        /// Clients fetching at once.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
    },
    /// Prints the memory (PSS and RSS, KiB) and CPU seconds of processes.
    Usage {
        #[arg(long, value_delimiter = ',', required = true)]
        server_pids: Vec<u32>,
    },
}

/// Subscribes one idle connection (over TCP or WebSocket) and holds it for
/// `secs`, counted in `open` while it is; false when it could not subscribe.
async fn hold_idle(
    sub: &Sub,
    tcp: bool,
    addr: SocketAddr,
    src: IpAddr,
    key: &str,
    secs: u64,
    open: &AtomicU64,
) -> bool {
    if tcp {
        let Ok(s) = sub.connect_tcp(addr, src, key).await else {
            return false;
        };
        open.fetch_add(1, Ordering::Relaxed);
        hold_tcp(s, sub.heartbeat, secs).await;
    } else {
        let Ok(w) = sub.connect(addr, src, key).await else {
            return false;
        };
        open.fetch_add(1, Ordering::Relaxed);
        hold_ws(w, sub, secs).await;
    }
    open.fetch_sub(1, Ordering::Relaxed);
    true
}

/// Holds a WebSocket subscriber for `secs`, sending the heartbeat frame (if
/// any) every heartbeat and reading whatever comes, until the server closes.
async fn hold_ws(mut w: target::Ws, sub: &Sub, secs: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut beat = tokio::time::interval(Duration::from_secs(sub.heartbeat));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => return,
            _ = beat.tick(), if !sub.heartbeat_frame.is_empty() => {
                if w.send(Message::Text(sub.heartbeat_frame.clone().into())).await.is_err() { return }
            }
            m = w.next() => if !matches!(m, Some(Ok(_))) { return },
        }
    }
}

/// Holds a TCP subscriber for `secs`, sending `h` every `heartbeat` seconds
/// and reading whatever comes, until the server closes.
async fn hold_tcp(mut s: tokio::net::TcpStream, heartbeat: u64, secs: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut beat = tokio::time::interval(Duration::from_secs(heartbeat.max(1)));
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => return,
            _ = beat.tick() => if s.write_all(b"h").await.is_err() { return },
            n = s.read(&mut buf) => if !matches!(n, Ok(n) if n > 0) { return },
        }
    }
}

/// GETs `url` and parses the JSON body.
async fn get_json(http: &reqwest::Client, url: String) -> anyhow::Result<serde_json::Value> {
    Ok(http.get(url).send().await?.json().await?)
}

/// The WebSocket address pushcluster's web gives for `key`.
async fn resolve_ws(http: &reqwest::Client, web: &str, key: &str) -> anyhow::Result<SocketAddr> {
    let v = get_json(http, format!("{web}/1/server/get?k={key}&p=1")).await?;
    Ok(v["data"]["server"].as_str().context("no server")?.parse()?)
}

fn pids(p: &[u32]) -> Vec<String> {
    p.iter().map(|p| p.to_string()).collect()
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn cpu(before: Usage, after: Usage) -> String {
    let (u, s) = delta(before, after);
    format!("server_cpu_user_s={u:.2} server_cpu_sys_s={s:.2}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Each connection is a file descriptor; the hard limit is the ceiling.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let me = vec![std::process::id().to_string()];
    match Cli::parse().cmd {
        Cmd::Usage { server_pids } => {
            let u = usage(&pids(&server_pids));
            println!(
                "pss_kib={} rss_kib={} cpu_user_s={:.2} cpu_sys_s={:.2}",
                u.pss_kib, u.rss_kib, u.user, u.system
            );
        }
        Cmd::Idle {
            server,
            conns,
            first,
            hold,
            connect_rate,
        } => {
            if conns as u64 + 64 > limit {
                bail!("{conns} connections need more than this process's {limit} file descriptors: run several generators");
            }
            let sp = pids(&server.server_pids);
            let (before, me0, t0) = (usage(&sp), usage(&me), Instant::now());
            let open = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::with_capacity(conns);
            let tcp = !server.tcp.is_empty();
            let addrs = if tcp { &server.tcp } else { &server.ws };
            if addrs.is_empty() {
                bail!("no server address: give --ws or --tcp");
            }
            for i in first..first + conns {
                let (addr, src) = (
                    addrs[i % addrs.len()],
                    server.sources[i % server.sources.len()],
                );
                let (open, errors, sub) = (open.clone(), errors.clone(), server.sub.clone());
                tasks.push(tokio::spawn(async move {
                    let key = format!("idle-{i}");
                    if !hold_idle(&sub, tcp, addr, src, &key, hold + 60, &open).await {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }));
                let nth = (i - first + 1) as u64;
                if let Some(ns) = (nth * 1_000_000_000).checked_div(connect_rate) {
                    tokio::time::sleep_until((t0 + Duration::from_nanos(ns)).into()).await;
                } else if i % 500 == 499 {
                    // Pace connection setup a little so accept queues keep up.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            // Connected (or failed) means the first frame, when there is one,
            // arrived; give the rest a moment to settle.
            while open.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed) < conns as u64
                && t0.elapsed() < Duration::from_secs(120)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let setup = t0.elapsed();
            println!(
                "open={} errors={} setup_s={:.1}",
                open.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                setup.as_secs_f64()
            );
            tokio::time::sleep(Duration::from_secs(hold)).await;
            let after = usage(&sp);
            let held = open.load(Ordering::Relaxed);
            let per_conn =
                |a: u64, b: u64| b.saturating_sub(a) as f64 * 1024.0 / held.max(1) as f64;
            println!("scenario=idle conns_held={held} errors={} setup_s={:.1} server_pss_kib={} pss_bytes_per_conn={:.0} rss_bytes_per_conn={:.0} {} bench_cpu_s={:.2}",
                errors.load(Ordering::Relaxed), setup.as_secs_f64(), after.pss_kib,
                per_conn(before.pss_kib, after.pss_kib), per_conn(before.rss_kib, after.rss_kib),
                cpu(before, after), usage(&me).cpu() - me0.cpu());
            for t in tasks {
                t.abort();
            }
        }
        Cmd::Latency {
            server,
            publish,
            publish_body,
            resolve,
            keys,
            rate,
            seconds,
            trace,
        } => {
            let sp = pids(&server.server_pids);
            let deliveries = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?;
            let hist = Arc::new(Mutex::new(histogram()?));
            let received = Arc::new(AtomicU64::new(0));
            let mut readers = Vec::new();
            for i in 0..keys {
                let key = format!("lat-{i}");
                let addr = match &resolve {
                    Some(web) => resolve_ws(&http, web, &key).await?,
                    None => server.ws[i % server.ws.len()],
                };
                let mut w = server
                    .sub
                    .connect_raw(addr, server.sources[i % server.sources.len()], &key)
                    .await?;
                let (hist, received) = (hist.clone(), received.clone());
                let deliveries = trace.is_some().then(|| deliveries.clone());
                readers.push(tokio::spawn(async move {
                    while let Ok(Some((op, r))) = w.next_frame().await {
                        if op != 1 {
                            continue;
                        }
                        if let Some(sent) = sent_at_bytes(w.payload(r)) {
                            let us = now_ns().saturating_sub(sent) / 1000;
                            if let Ok(mut h) = hist.lock() {
                                let _ = h.record(us.max(1));
                            }
                            if let Some(Ok(mut d)) = deliveries.as_ref().map(|d| d.lock()) {
                                d.push((sent, us));
                            }
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            let (before, me0, each0) = (usage(&sp), usage(&me), cpu_by_pid(&sp));
            let total = rate * seconds;
            let acked = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicU64::new(0));
            // Pushes are paced by a thread of their own sleeping to each
            // send time: the runtime's timer ticks in whole milliseconds,
            // which alone added up to 1 ms to every figure. The thread runs
            // its own single-threaded runtime and HTTP client between sleeps:
            // handing each push to another thread's runtime cost a wake-up of
            // that thread per push, and the server shares these two cores.
            let pacer = {
                let (acked, failed, publish) = (acked.clone(), failed.clone(), publish.clone());
                let template = publish_body;
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let http = rt.block_on(async {
                        reqwest::Client::builder()
                            .pool_max_idle_per_host(256)
                            .build()
                    })?;
                    let start = Instant::now();
                    let start_ns = now_ns();
                    for i in 0..total {
                        let at = Duration::from_nanos(i * 1_000_000_000 / rate);
                        if let Some(wait) = (start + at).checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        // Latency counts from the scheduled time: publisher lag counts too.
                        let msg = format!(r#"{{"t":{},"i":{i}}}"#, start_ns + at.as_nanos() as u64);
                        let key = format!("lat-{}", i as usize % keys);
                        let body = target::publish_body(&template, &key, msg);
                        let url = publish.replace("{key}", &key);
                        let req = http.post(url).body(body);
                        let (acked, failed) = (acked.clone(), failed.clone());
                        rt.block_on(async move {
                            tokio::spawn(async move {
                                match req.send().await {
                                    Ok(r) if r.status().is_success() => {
                                        acked.fetch_add(1, Ordering::Relaxed)
                                    }
                                    _ => failed.fetch_add(1, Ordering::Relaxed),
                                };
                            });
                            // Each yield runs the ready tasks and polls the
                            // sockets once: the request task hands the
                            // request to its connection, which writes it, and
                            // replies that came in meanwhile are read.
                            for _ in 0..3 {
                                tokio::task::yield_now().await;
                            }
                        });
                    }
                    // The last replies.
                    rt.block_on(async {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < total
                            && Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    });
                    Ok(())
                })
            };
            // The pacer returns once every reply is in (or after 30 s).
            while !pacer.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            pacer
                .join()
                .map_err(|_| anyhow::anyhow!("the publishing thread panicked"))??;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (after, each1) = (usage(&sp), cpu_by_pid(&sp));
            if let Some(path) = &trace {
                let mut d = deliveries
                    .lock()
                    .map_err(|_| anyhow::anyhow!("trace poisoned"))?
                    .clone();
                d.sort_unstable();
                let lines: String = d
                    .iter()
                    .map(|(sent, us)| format!("{:.6} {us}\n", *sent as f64 / 1e9))
                    .collect();
                std::fs::write(path, lines)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            let h = hist
                .lock()
                .map_err(|_| anyhow::anyhow!("histogram poisoned"))?;
            let (acked, got) = (
                acked.load(Ordering::Relaxed),
                received.load(Ordering::Relaxed),
            );
            // CPU per acknowledged push, over every server process and by
            // process name: the cost of a push beside its latency.
            let per_push = (after.cpu() - before.cpu()) * 1e6 / acked.max(1) as f64;
            println!("scenario=latency keys={keys} rate={rate}/s pushes={total} acked={acked} failed={} received={got} lost={} p50_us={} p90_us={} p99_us={} max_us={} {} cpu_per_push_us={per_push:.0} cpu_per_push_by_process={} bench_cpu_s={:.2}",
                failed.load(Ordering::Relaxed), acked.saturating_sub(got), h.value_at_quantile(0.5), h.value_at_quantile(0.9), h.value_at_quantile(0.99), h.max(),
                cpu(before, after), cpu_per_push_by_name(&each0, &each1, acked.max(1)), usage(&me).cpu() - me0.cpu());
            for r in readers {
                r.abort();
            }
        }
        Cmd::Fanout {
            server,
            publish,
            publish_body,
            key,
            conns,
            publishers,
            in_flight,
            seconds,
            size,
            rate,
        } => {
            if conns as u64 + 64 > limit {
                bail!("{conns} connections need more than this process's {limit} file descriptors");
            }
            let sp = pids(&server.server_pids);
            let delivered = Arc::new(AtomicU64::new(0));
            let hist = Arc::new(Mutex::new(histogram()?));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut readers = Vec::with_capacity(conns);
            for i in 0..conns {
                let mut w = server
                    .sub
                    .connect_raw(
                        server.ws[i % server.ws.len()],
                        server.sources[i % server.sources.len()],
                        &key.replace("{i}", &i.to_string()),
                    )
                    .await?;
                let (delivered, hist, mut stop) =
                    (delivered.clone(), hist.clone(), stop_rx.clone());
                readers.push(tokio::spawn(async move {
                    let mut local = histogram().ok();
                    loop {
                        let f = tokio::select! {
                            _ = stop.changed() => break,
                            f = w.next_frame() => f,
                        };
                        let Ok(Some((op, payload))) = f else { break };
                        match op {
                            1 => {}
                            8 => break,
                            _ => continue,
                        }
                        if let Some(sent) = sent_at_bytes(w.payload(payload)) {
                            delivered.fetch_add(1, Ordering::Relaxed);
                            if let Some(h) = local.as_mut() {
                                let _ = h.record((now_ns().saturating_sub(sent) / 1000).max(1));
                            }
                        }
                    }
                    if let (Some(l), Ok(mut h)) = (local, hist.lock()) {
                        let _ = h.add(l);
                    }
                }));
            }
            // Let the last subscriptions settle before the clock starts.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let pad = "x".repeat(size.saturating_sub(40));
            let http = reqwest::Client::new();
            let (before, me0) = (usage(&sp), usage(&me));
            let sent = Arc::new(AtomicU64::new(0));
            let broadcast = {
                let (http, sent) = (http.clone(), sent.clone());
                move |t_ns: u64| {
                    let msg = format!(r#"{{"t":{t_ns},"p":"{pad}"}}"#);
                    let req =
                        http.post(&publish)
                            .body(target::publish_body(&publish_body, &key, msg));
                    let sent = sent.clone();
                    async move {
                        if req.send().await.is_ok_and(|r| r.status().is_success()) {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            };
            let slots = publishers * in_flight;
            if rate > 0 {
                // The tokio timer rounds up to the millisecond: every server
                // gets the same up-to-1 ms of publisher lag in its figures.
                // Bounded in time as in count: a server that falls behind
                // gets no broadcasts after the last scheduled time, and 30 s
                // to answer those it has.
                let room = Arc::new(tokio::sync::Semaphore::new(slots));
                let (t0, t0_ns) = (tokio::time::Instant::now(), now_ns());
                let last = t0 + Duration::from_secs(seconds);
                for i in 0..rate * seconds {
                    let at = Duration::from_nanos(i * 1_000_000_000 / rate);
                    tokio::time::sleep_until(t0 + at).await;
                    let Ok(Ok(permit)) =
                        tokio::time::timeout_at(last, room.clone().acquire_owned()).await
                    else {
                        break;
                    };
                    let send = broadcast(t0_ns + at.as_nanos() as u64);
                    tokio::spawn(async move {
                        send.await;
                        drop(permit);
                    });
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), room.acquire_many(slots as u32))
                        .await;
            } else {
                let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
                let mut pubs = Vec::new();
                for _ in 0..slots {
                    let broadcast = broadcast.clone();
                    pubs.push(tokio::spawn(async move {
                        while tokio::time::Instant::now() < end {
                            broadcast(now_ns()).await;
                        }
                    }));
                }
                for p in pubs {
                    let _ = p.await;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = usage(&sp);
            let (su, ss) = delta(before, after);
            let (n, d) = (
                sent.load(Ordering::Relaxed),
                delivered.load(Ordering::Relaxed),
            );
            let _ = stop_tx.send(true);
            for r in readers {
                let _ = r.await;
            }
            let h = hist
                .lock()
                .map_err(|_| anyhow::anyhow!("histogram poisoned"))?;
            println!("scenario=fanout conns={conns} publishers={publishers} in_flight={in_flight} rate={rate} size={size} broadcasts={n} deliveries={d} expected={} deliveries_per_server_cpu_s={:.0} p50_us={} p90_us={} p99_us={} max_us={} {} bench_cpu_s={:.2}",
                n * conns as u64, d as f64 / (su + ss).max(0.001), h.value_at_quantile(0.5), h.value_at_quantile(0.9), h.value_at_quantile(0.99), h.max(),
                cpu(before, after), usage(&me).cpu() - me0.cpu());
        }
        Cmd::Catchup {
            server,
            web,
            admin,
            keys,
            messages,
            parallel,
        } => {
            let sp = pids(&server.server_pids);
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(parallel)
                .build()?;
            let names: Vec<String> = (0..keys).map(|i| format!("off-{i}")).collect();
            let t0 = Instant::now();
            for m in 0..messages {
                // One multi-push per round stores message m for up to 1000 keys.
                for chunk in names.chunks(1000) {
                    let body =
                        serde_json::json!({ "m": format!(r#"{{"n":{m}}}"#), "k": chunk.join(",") });
                    let r = http
                        .post(format!("{admin}/1/admin/push/mprivate?expire=600"))
                        .body(body.to_string())
                        .send()
                        .await?;
                    let v: serde_json::Value = r.json().await?;
                    if v["ret"] != 0 || v["data"]["fk"].as_array().is_some_and(|a| !a.is_empty()) {
                        bail!("storing the backlog failed: {v}");
                    }
                }
            }
            let store_s = t0.elapsed().as_secs_f64();
            let (before, me0) = (usage(&sp), usage(&me));
            let hist = Arc::new(Mutex::new(histogram()?));
            let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
            let t1 = Instant::now();
            let mut tasks = Vec::new();
            for (i, key) in names.into_iter().enumerate() {
                let (http, web, sub, hist, sem) = (
                    http.clone(),
                    web.clone(),
                    server.sub.clone(),
                    hist.clone(),
                    sem.clone(),
                );
                let src = server.sources[i % server.sources.len()];
                tasks.push(tokio::spawn(async move {
                    let _permit = sem.acquire().await?;
                    let t = Instant::now();
                    let addr = resolve_ws(&http, &web, &key).await?;
                    let _ws = sub.connect(addr, src, &key).await?;
                    let (mut got, mut after) = (0usize, 0i64);
                    loop {
                        let v =
                            get_json(&http, format!("{web}/1/msg/get?k={key}&m={after}")).await?;
                        let msgs = v["data"]["msgs"].as_array().cloned().unwrap_or_default();
                        if msgs.is_empty() {
                            break;
                        }
                        got += msgs.len();
                        after = msgs.last().and_then(|m| m["mid"].as_i64()).unwrap_or(after);
                    }
                    if let Ok(mut h) = hist.lock() {
                        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                    }
                    anyhow::Ok(got)
                }));
            }
            let (mut complete, mut fetched) = (0usize, 0usize);
            for t in tasks {
                if let Ok(Ok(n)) = t.await {
                    fetched += n;
                    complete += usize::from(n >= messages);
                }
            }
            let total_s = t1.elapsed().as_secs_f64();
            let after = usage(&sp);
            let h = hist
                .lock()
                .map_err(|_| anyhow::anyhow!("histogram poisoned"))?;
            println!("scenario=catchup keys={keys} messages_per_key={messages} store_s={store_s:.1} clients_complete={complete} messages_fetched={fetched} total_s={total_s:.2} per_client_p50_ms={:.1} per_client_p99_ms={:.1} {} bench_cpu_s={:.2}",
                h.value_at_quantile(0.5) as f64 / 1000.0, h.value_at_quantile(0.99) as f64 / 1000.0,
                cpu(before, after), usage(&me).cpu() - me0.cpu());
        }
    }
    Ok(())
}
