//! push-bench: load generator for pushcluster (and any server speaking the
//! gopush-cluster WebSocket protocol). Loopback only, bounded in count and
//! time. Reports the server's RSS and CPU from /proc and its own CPU, since
//! the server and the generator share the machine.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message;

/// Load generator for push servers.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Idle density: hold N WebSocket subscribers with heartbeats, report server RSS per connection.
    Idle {
        /// Comet WebSocket addresses (host:port); connections go round-robin.
        #[arg(long, value_delimiter = ',', required = true)]
        ws: Vec<SocketAddr>,
        /// Connections to open.
        #[arg(long)]
        conns: usize,
        /// Source addresses to spread connections over (each has ~28k ports).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        /// Server process ids (RSS and CPU are summed over them).
        #[arg(long, value_delimiter = ',')]
        server_pids: Vec<u32>,
        /// Seconds to hold the connections once open.
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// Heartbeat interval the subscribers announce and keep.
        #[arg(long, default_value_t = 30)]
        heartbeat: u64,
    },
    /// Private push latency: one subscriber per key; pushes at a fixed rate
    /// through web; latency from the scheduled send time to delivery.
    Latency {
        /// Web public base URL (resolves each key's comet).
        #[arg(long)]
        web: String,
        /// Web admin base URL (pushes).
        #[arg(long)]
        admin: String,
        /// Subscribers, one key each.
        #[arg(long)]
        keys: usize,
        /// Pushes per second.
        #[arg(long)]
        rate: u64,
        /// Seconds of pushing.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        #[arg(long, value_delimiter = ',')]
        server_pids: Vec<u32>,
    },
    /// Broadcast fan-out: N subscribers, broadcasts from P publishers with at
    /// most K in flight each; deliveries per server CPU-second.
    Fanout {
        /// Comet WebSocket addresses; subscribers go round-robin.
        #[arg(long, value_delimiter = ',', required = true)]
        ws: Vec<SocketAddr>,
        /// Web admin base URL (broadcasts).
        #[arg(long)]
        admin: String,
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
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        #[arg(long, value_delimiter = ',')]
        server_pids: Vec<u32>,
    },
}

/// RSS (KiB) and CPU seconds (user, system) of a process, from /proc.
fn proc_usage(pid: &str) -> anyhow::Result<(u64, f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let utime = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / ticks;
    let stime = f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / ticks;
    Ok((rss, utime, stime))
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_kib: u64,
    user: f64,
    system: f64,
}

fn usage(pids: &[String]) -> Usage {
    pids.iter()
        .filter_map(|p| proc_usage(p).ok())
        .fold(Usage::default(), |a, (r, u, s)| Usage {
            rss_kib: a.rss_kib + r,
            user: a.user + u,
            system: a.system + s,
        })
}

fn delta(a: Usage, b: Usage) -> (f64, f64) {
    (b.user - a.user, b.system - a.system)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects a subscriber from `source` and waits for `+h`.
async fn subscribe(
    addr: SocketAddr,
    source: IpAddr,
    key: &str,
    heartbeat: u64,
) -> anyhow::Result<Ws> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}/sub?key={key}&heartbeat={heartbeat}&ver=1");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "+h\r\n" => Ok(ws),
        other => bail!("subscribe {key}: unexpected first frame {other:?}"),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Each connection is a file descriptor; the hard limit is the ceiling.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let me = std::process::id().to_string();
    match Cli::parse().cmd {
        Cmd::Idle {
            ws,
            conns,
            sources,
            server_pids,
            hold,
            heartbeat,
        } => {
            if conns as u64 + 64 > limit {
                bail!("{conns} connections need more than this process's {limit} file descriptors: run several generators");
            }
            let pids: Vec<String> = server_pids.iter().map(|p| p.to_string()).collect();
            let (before, me0, t0) = (
                usage(&pids),
                usage(std::slice::from_ref(&me)),
                Instant::now(),
            );
            let open = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::with_capacity(conns);
            for i in 0..conns {
                let (addr, src) = (ws[i % ws.len()], sources[i % sources.len()]);
                let (open, errors) = (open.clone(), errors.clone());
                tasks.push(tokio::spawn(async move {
                    match subscribe(addr, src, &format!("idle-{i}"), heartbeat).await {
                        Ok(mut w) => {
                            open.fetch_add(1, Ordering::Relaxed);
                            let end = tokio::time::Instant::now() + Duration::from_secs(hold + 30);
                            let mut beat = tokio::time::interval(Duration::from_secs(heartbeat));
                            loop {
                                tokio::select! {
                                    _ = tokio::time::sleep_until(end) => break,
                                    _ = beat.tick() => if w.send(Message::Text("h".into())).await.is_err() { break },
                                    m = w.next() => if !matches!(m, Some(Ok(_))) { break },
                                }
                            }
                            open.fetch_sub(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
                // Pace connection setup a little so accept queues keep up.
                if i % 500 == 499 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let setup = t0.elapsed();
            tokio::time::sleep(Duration::from_secs(hold)).await;
            let after = usage(&pids);
            let held = open.load(Ordering::Relaxed);
            let per_conn =
                (after.rss_kib.saturating_sub(before.rss_kib)) as f64 * 1024.0 / held.max(1) as f64;
            let (su, ss) = delta(before, after);
            let (mu, ms) = delta(me0, usage(std::slice::from_ref(&me)));
            println!("scenario=idle conns_held={held} errors={} setup_s={:.1} server_rss_before_kib={} server_rss_after_kib={} bytes_per_conn={per_conn:.0} server_cpu_user_s={su:.2} server_cpu_sys_s={ss:.2} bench_cpu_s={:.2}",
                errors.load(Ordering::Relaxed), setup.as_secs_f64(), before.rss_kib, after.rss_kib, mu + ms);
            for t in tasks {
                t.abort();
            }
        }
        Cmd::Latency {
            web,
            admin,
            keys,
            rate,
            seconds,
            sources,
            server_pids,
        } => {
            let pids: Vec<String> = server_pids.iter().map(|p| p.to_string()).collect();
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?;
            let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1, 60_000_000, 3,
            )?));
            let received = Arc::new(AtomicU64::new(0));
            let mut readers = Vec::new();
            for i in 0..keys {
                let key = format!("lat-{i}");
                let v: serde_json::Value = http
                    .get(format!("{web}/1/server/get?k={key}&p=1"))
                    .send()
                    .await?
                    .json()
                    .await?;
                let addr: SocketAddr =
                    v["data"]["server"].as_str().context("no server")?.parse()?;
                let mut w = subscribe(addr, sources[i % sources.len()], &key, 300).await?;
                let (hist, received) = (hist.clone(), received.clone());
                readers.push(tokio::spawn(async move {
                    while let Some(Ok(m)) = w.next().await {
                        let Message::Text(t) = m else { continue };
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                            continue;
                        };
                        if let Some(sent) = v["msg"]["t"].as_u64() {
                            let us = now_ns().saturating_sub(sent) / 1000;
                            if let Ok(mut h) = hist.lock() {
                                let _ = h.record(us.max(1));
                            }
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            let (before, me0) = (usage(&pids), usage(std::slice::from_ref(&me)));
            let total = rate * seconds;
            let acked = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicU64::new(0));
            let start = tokio::time::Instant::now();
            let start_ns = now_ns();
            let mut pushes = Vec::with_capacity(total as usize);
            for i in 0..total {
                let at = Duration::from_nanos(i * 1_000_000_000 / rate);
                tokio::time::sleep_until(start + at).await;
                // Latency counts from the scheduled time: publisher lag counts too.
                let body = format!(r#"{{"t":{},"i":{i}}}"#, start_ns + at.as_nanos() as u64);
                let req = http
                    .post(format!(
                        "{admin}/1/admin/push/private?key=lat-{}&expire=60",
                        i as usize % keys
                    ))
                    .body(body);
                let (acked, failed) = (acked.clone(), failed.clone());
                pushes.push(tokio::spawn(async move {
                    match req.send().await {
                        Ok(r) if r.status().is_success() => acked.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }));
            }
            for p in pushes {
                let _ = p.await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (su, ss) = delta(before, usage(&pids));
            let (mu, ms) = delta(me0, usage(std::slice::from_ref(&me)));
            let h = hist
                .lock()
                .map_err(|_| anyhow::anyhow!("histogram poisoned"))?;
            let (acked, got) = (
                acked.load(Ordering::Relaxed),
                received.load(Ordering::Relaxed),
            );
            println!("scenario=latency keys={keys} rate={rate}/s pushes={total} acked={acked} failed={} received={got} lost={} p50_us={} p90_us={} p99_us={} max_us={} server_cpu_user_s={su:.2} server_cpu_sys_s={ss:.2} bench_cpu_s={:.2}",
                failed.load(Ordering::Relaxed), acked.saturating_sub(got), h.value_at_quantile(0.5), h.value_at_quantile(0.9), h.value_at_quantile(0.99), h.max(), mu + ms);
            for r in readers {
                r.abort();
            }
        }
        Cmd::Fanout {
            ws,
            admin,
            conns,
            publishers,
            in_flight,
            seconds,
            size,
            sources,
            server_pids,
        } => {
            if conns as u64 + 64 > limit {
                bail!("{conns} connections need more than this process's {limit} file descriptors");
            }
            let pids: Vec<String> = server_pids.iter().map(|p| p.to_string()).collect();
            let delivered = Arc::new(AtomicU64::new(0));
            let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1, 60_000_000, 3,
            )?));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut readers = Vec::with_capacity(conns);
            for i in 0..conns {
                let mut w = subscribe(
                    ws[i % ws.len()],
                    sources[i % sources.len()],
                    &format!("fan-{i}"),
                    300,
                )
                .await?;
                let (delivered, hist, mut stop) =
                    (delivered.clone(), hist.clone(), stop_rx.clone());
                readers.push(tokio::spawn(async move {
                    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
                    loop {
                        let m = tokio::select! {
                            _ = stop.changed() => break,
                            m = w.next() => m,
                        };
                        let Some(Ok(m)) = m else { break };
                        let Message::Text(t) = m else { continue };
                        // The send time sits at a fixed place: {"msg":{"t":<ns>,...
                        if let Some(sent) = t
                            .as_str()
                            .split("\"t\":")
                            .nth(1)
                            .and_then(|r| r.split(',').next())
                            .and_then(|n| n.parse::<u64>().ok())
                        {
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
            let pad = "x".repeat(size.saturating_sub(40));
            let http = reqwest::Client::new();
            let (before, me0) = (usage(&pids), usage(std::slice::from_ref(&me)));
            let sent = Arc::new(AtomicU64::new(0));
            let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
            let mut pubs = Vec::new();
            for _ in 0..publishers * in_flight {
                let (http, admin, pad, sent) =
                    (http.clone(), admin.clone(), pad.clone(), sent.clone());
                pubs.push(tokio::spawn(async move {
                    while tokio::time::Instant::now() < end {
                        let body = format!(r#"{{"t":{},"p":"{pad}"}}"#, now_ns());
                        let ok = http
                            .post(format!("{admin}/1/admin/push/broadcast?expire=60"))
                            .body(body)
                            .send()
                            .await
                            .map(|r| r.status().is_success())
                            .unwrap_or(false);
                        if ok {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for p in pubs {
                let _ = p.await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (su, ss) = delta(before, usage(&pids));
            let (mu, ms) = delta(me0, usage(std::slice::from_ref(&me)));
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
            println!("scenario=fanout conns={conns} publishers={publishers} in_flight={in_flight} size={size} broadcasts={n} deliveries={d} expected={} deliveries_per_server_cpu_s={:.0} p50_us={} p99_us={} server_cpu_user_s={su:.2} server_cpu_sys_s={ss:.2} bench_cpu_s={:.2}",
                n * conns as u64, d as f64 / (su + ss).max(0.001), h.value_at_quantile(0.5), h.value_at_quantile(0.99), mu + ms);
        }
    }
    Ok(())
}
