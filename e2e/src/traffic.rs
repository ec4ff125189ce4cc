//! Traffic as clients outside the cluster see it: a load balancer in front of
//! web's Services, subscribers over WebSocket, TCP and SSE that follow their
//! keys, a back end pushing at a steady rate, and the bookkeeping that turns
//! all of it into per-event figures (time without a comet, failed pushes,
//! lost messages, whether every key's mid sequence continued).
//!
//! Over 700 lines, kept whole: the followers, the pusher, the watch on the
//! test's own runtime and the bookkeeping (figures per window, the slowest
//! deliveries, the stalls) share one record of what was pushed and seen.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::Client;
use pushcluster_client::follow::{Control, Follow, Seen};
use pushcluster_client::http::{Client as Api2, Proto};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Ready endpoints (`ip:port`) of `service`'s port named `port`.
pub async fn ready_endpoints(
    client: &Client,
    ns: &str,
    service: &str,
    port: &str,
) -> anyhow::Result<Vec<SocketAddr>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    let mut out = Vec::new();
    for s in list.items {
        let Some(p) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let terminating = e
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for a in e.addresses {
                if let Ok(ip) = a.parse::<std::net::IpAddr>() {
                    out.push(SocketAddr::new(ip, p as u16));
                }
            }
        }
    }
    Ok(out)
}

/// A load balancer on 127.0.0.1 in front of one Service port, as an Ingress
/// or a cloud load balancer would be: each new connection goes to a ready
/// endpoint (round robin), following the Service's EndpointSlices through a
/// watch, as ingress controllers and kube-proxy do. It stands in for
/// kube-proxy, which the process harness lacks, and works the same on any
/// cluster whose pod IPs the test can reach.
pub struct ServiceProxy {
    pub addr: SocketAddr,
    cancel: CancellationToken,
}

impl ServiceProxy {
    /// Starts forwarding to `service`'s port `port` in `ns`.
    pub async fn start(
        client: &Client,
        ns: &str,
        service: &str,
        port: &str,
    ) -> anyhow::Result<Self> {
        Self::start_at(client, ns, service, port, "127.0.0.1:0".parse()?).await
    }

    /// [`ServiceProxy::start`], listening on `bind`.
    pub async fn start_at(
        client: &Client,
        ns: &str,
        service: &str,
        port: &str,
        bind: SocketAddr,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        // Like a load balancer's first health check: wait for an endpoint.
        let mut first = Vec::new();
        for _ in 0..300 {
            first = ready_endpoints(client, ns, service, port).await?;
            if !first.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::ensure!(
            !first.is_empty(),
            "service {ns}/{service} has no ready endpoint for port {port}"
        );
        let targets: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(first));
        let refresh = {
            let (client, ns, service, port) = (
                client.clone(),
                ns.to_owned(),
                service.to_owned(),
                port.to_owned(),
            );
            let targets = targets.clone();
            let cancel = cancel.clone();
            async move {
                use futures::StreamExt;
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
                let cfg = kube::runtime::watcher::Config::default()
                    .labels(&format!("kubernetes.io/service-name={service}"));
                let mut changes = kube::runtime::watcher(api, cfg).boxed();
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        ev = changes.next() => if ev.is_none() { return },
                    }
                    if let Ok(t) = ready_endpoints(&client, &ns, &service, &port).await {
                        *targets.lock().unwrap_or_else(|e| e.into_inner()) = t;
                    }
                }
            }
        };
        tokio::spawn(refresh);
        let accept = {
            let cancel = cancel.clone();
            async move {
                let mut next = 0usize;
                loop {
                    let (conn, _) = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    };
                    let pick = {
                        let t = targets.lock().unwrap_or_else(|e| e.into_inner());
                        next = next.wrapping_add(1);
                        (!t.is_empty()).then(|| t[next % t.len()])
                    };
                    let Some(target) = pick else { continue };
                    tokio::spawn(async move {
                        if let Ok(mut up) = TcpStream::connect(target).await {
                            let mut conn = conn;
                            let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                        }
                    });
                }
            }
        };
        tokio::spawn(accept);
        Ok(Self { addr, cancel })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One push attempt's outcome.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub key: String,
    /// When the push was sent.
    pub at: Instant,
    /// When its answer came.
    pub done: Instant,
    /// The mid on success; the error otherwise.
    pub result: Result<i64, String>,
}

/// Runs followers and a pusher until [`Traffic::finish`].
pub struct Traffic {
    api: Api2,
    started: Instant,
    control: Control,
    keys: Vec<String>,
    untils: BTreeMap<String, Arc<AtomicI64>>,
    followers: Vec<(String, Proto, JoinHandle<Seen>)>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop_push: CancellationToken,
    pusher: Option<JoinHandle<()>>,
    stalls: Arc<Mutex<Vec<(Instant, Duration)>>>,
}

/// Settings of a traffic run.
#[derive(Debug, Clone)]
pub struct Load {
    /// Keys, each with one follower; transports rotate WebSocket, TCP, SSE.
    pub keys: usize,
    /// Pushes per second over all keys, round robin.
    pub rate: u32,
    /// Prefix of key names (so two clusters' keys differ).
    pub prefix: String,
    /// The cluster's subscriber secret: each follower gets its key's token,
    /// as an app back end would hand it out.
    pub subscriber_secret: Option<String>,
}

impl Traffic {
    /// Starts followers on every key, then the pusher.
    pub async fn start(api: Api2, load: &Load) -> Self {
        let control = Control::default();
        let protos = [Proto::WebSocket, Proto::Tcp, Proto::Sse];
        let keys: Vec<String> = (0..load.keys)
            .map(|i| format!("{}-{i}", load.prefix))
            .collect();
        let mut untils = BTreeMap::new();
        let mut followers = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let until = Arc::new(AtomicI64::new(i64::MAX));
            untils.insert(key.clone(), until.clone());
            let proto = protos[i % protos.len()];
            let f = Follow {
                api: api.clone(),
                key: key.clone(),
                proto,
                token: load
                    .subscriber_secret
                    .as_ref()
                    .map(|s| pushcluster_core::token::mint_for(s.as_bytes(), key, 24 * 3600)),
                until,
                control: control.clone(),
            };
            followers.push((key.clone(), proto, tokio::spawn(f.run())));
        }
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let stop_push = CancellationToken::new();
        let pusher = tokio::spawn(push_steadily(
            api.clone(),
            keys.clone(),
            load.rate,
            attempts.clone(),
            stop_push.clone(),
        ));
        let stalls: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
        tokio::spawn(watch_runtime(stalls.clone(), stop_push.clone()));
        Self {
            api,
            started: Instant::now(),
            control,
            keys,
            untils,
            followers,
            attempts,
            stop_push,
            pusher: Some(pusher),
            stalls,
        }
    }

    /// The HTTP API client the traffic uses.
    pub fn api(&self) -> &Api2 {
        &self.api
    }

    /// [`Traffic::start`], then waits up to `limit` until every follower is
    /// on a comet (an error if one is not by then).
    pub async fn start_connected(api: Api2, load: &Load, limit: Duration) -> anyhow::Result<Self> {
        let traffic = Self::start(api, load).await;
        anyhow::ensure!(
            traffic.all_connected(limit).await,
            "followers did not all reach a comet within {limit:?}"
        );
        Ok(traffic)
    }

    /// Waits until every follower is on a comet; false after `limit`.
    pub async fn all_connected(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.control.connected() < self.keys.len() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// When the traffic started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Push attempts so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops pushing, lets every follower catch up with its key's last
    /// acknowledged mid (at most `limit`), and returns what everyone saw.
    pub async fn finish(mut self, limit: Duration) -> Outcome {
        self.stop_push.cancel();
        if let Some(p) = self.pusher.take() {
            let _ = p.await;
        }
        let attempts = self.attempts();
        let mut last_acked: BTreeMap<String, i64> = BTreeMap::new();
        for a in &attempts {
            if let Ok(m) = a.result {
                let e = last_acked.entry(a.key.clone()).or_default();
                *e = (*e).max(m);
            }
        }
        for (key, until) in &self.untils {
            until.store(last_acked.get(key).copied().unwrap_or(0), Ordering::SeqCst);
        }
        self.control.stop();
        let mut seen = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + limit;
        for (key, proto, h) in self.followers.drain(..) {
            let abort = h.abort_handle();
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(s)) => {
                    seen.insert(key, (proto, Some(s)));
                }
                _ => {
                    abort.abort();
                    seen.insert(key, (proto, None));
                }
            }
        }
        Outcome {
            keys: self.keys.clone(),
            attempts,
            seen,
            stalls: std::mem::take(&mut *self.stalls.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// How late a timer of the test's own runtime may fire before it counts as
/// a stall of the test process (its pusher and followers share it).
const STALL: Duration = Duration::from_millis(20);

/// Records each time a 5 ms timer of this runtime fired more than [`STALL`]
/// late: the test process (or its host) was not running its tasks, and the
/// pushes and deliveries it timed then look slower than the cluster was.
async fn watch_runtime(stalls: Arc<Mutex<Vec<(Instant, Duration)>>>, stop: CancellationToken) {
    let period = Duration::from_millis(5);
    loop {
        let start = Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let late = start.elapsed().saturating_sub(period);
        if late > STALL {
            stalls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((start, late));
        }
    }
}

/// One push every `1/rate` s, round robin over `keys`, each in its own task
/// so a slow answer does not hold the schedule back.
async fn push_steadily(
    api: Api2,
    keys: Vec<String>,
    rate: u32,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = tokio::task::JoinSet::new();
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let key = keys[n % keys.len()].clone();
        n += 1;
        let (api, attempts) = (api.clone(), attempts.clone());
        inflight.spawn(async move {
            let at = Instant::now();
            let body = format!("{{\"n\":{n}}}");
            let result = tokio::time::timeout(Duration::from_secs(30), api.push(&key, &body, None))
                .await
                .map_err(|_| "timed out after 30 s".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()));
            attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Attempt {
                    key,
                    at,
                    done: Instant::now(),
                    result,
                });
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// Everything a traffic run produced.
#[derive(Debug)]
pub struct Outcome {
    pub keys: Vec<String>,
    pub attempts: Vec<Attempt>,
    /// Per key: its transport and what its follower saw (None: it never caught up).
    pub seen: BTreeMap<String, (Proto, Option<Seen>)>,
    /// When the test's runtime fired a timer over 20 ms late, and by how much.
    pub stalls: Vec<(Instant, Duration)>,
}

/// Figures of one time window (an event, or the whole run).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    pub acked: usize,
    pub failed: usize,
    /// Acknowledged mids no follower ever saw.
    pub lost: usize,
    /// Keys whose acknowledged mids did not keep increasing (a restarted sequence).
    pub restarted_keys: usize,
    /// Followers that lost their comet and came back in the window.
    pub reconnected: usize,
    /// The longest time a follower was without a comet, in the window.
    pub longest_outage: Duration,
    /// Followers still without a comet at the window's end.
    pub still_down: usize,
    /// Reconnect frames the followers got over the whole run (frames carry
    /// no time, so this is not limited to the window).
    pub told_to_reconnect: usize,
    /// Push-to-delivery time of the pushes sent in the window that reached
    /// their follower live: the 99th percentile, and how many there were.
    pub p99_delivery: Option<Duration>,
    /// The 95th percentile of the same: a host's occasional fsync stall
    /// (a few pushes each) moves the p99 of a short window, not this.
    pub p95_delivery: Option<Duration>,
    pub delivered_live: usize,
    /// Up to three distinct errors of failed pushes.
    pub failure_samples: Vec<String>,
    /// Up to three restarts seen: the key, the mid and why it counts.
    pub restart_samples: Vec<String>,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acked={} failed_pushes={} lost={} mid_restarts={} reconnected={} longest_without_comet={:.2}s",
            self.acked,
            self.failed,
            self.lost,
            self.restarted_keys,
            self.reconnected,
            self.longest_outage.as_secs_f64()
        )?;
        if let Some(p) = self.p99_delivery {
            write!(
                f,
                " p99_push_to_delivery={:.1}ms (of {} live)",
                p.as_secs_f64() * 1000.0,
                self.delivered_live
            )?;
        }
        if !self.failure_samples.is_empty() {
            write!(f, " push_errors={:?}", self.failure_samples)?;
        }
        if !self.restart_samples.is_empty() {
            write!(f, " restarts={:?}", self.restart_samples)?;
        }
        Ok(())
    }
}

impl Outcome {
    /// Figures of the attempts and outages that fall in `[from, to)`.
    pub fn figures(&self, from: Instant, to: Instant) -> Figures {
        let inside = |t: Instant| t >= from && t < to;
        let mut f = Figures::default();
        // A key's sequence restarted when a push gets a mid not above one
        // acknowledged before that push was sent, or when one mid was
        // acknowledged for two pushes. (Pushes to one key run concurrently,
        // and one that waited out a failover may be answered after later
        // ones: only "acknowledged before sent" orders two pushes.)
        let mut acked: BTreeMap<&str, Vec<(Instant, i64)>> = BTreeMap::new();
        for a in &self.attempts {
            if let Ok(m) = a.result {
                acked.entry(&a.key).or_default().push((a.done, m));
            }
        }
        for v in acked.values_mut() {
            v.sort();
            // Each entry's mid becomes the highest acknowledged up to then.
            let mut top = 0;
            for e in v.iter_mut() {
                top = top.max(e.1);
                e.1 = top;
            }
        }
        let acked_before = |key: &str, sent: Instant| -> i64 {
            acked.get(key).map_or(0, |v| {
                let n = v.partition_point(|(done, _)| *done < sent);
                if n == 0 {
                    0
                } else {
                    v[n - 1].1
                }
            })
        };
        let mut acks_of: BTreeMap<(&str, i64), usize> = BTreeMap::new();
        for a in &self.attempts {
            if let Ok(m) = a.result {
                *acks_of.entry((a.key.as_str(), m)).or_default() += 1;
            }
        }
        let mut restarted = std::collections::BTreeSet::new();
        let mut by_key: BTreeMap<&str, Vec<(Instant, i64)>> = BTreeMap::new();
        for a in self.attempts.iter().filter(|a| inside(a.at)) {
            match a.result {
                Ok(m) => {
                    f.acked += 1;
                    by_key.entry(&a.key).or_default().push((a.at, m));
                    let seen = self
                        .seen
                        .get(&a.key)
                        .and_then(|(_, s)| s.as_ref())
                        .is_some_and(|s| s.mids.binary_search(&m).is_ok());
                    if !seen {
                        f.lost += 1;
                    }
                }
                Err(ref e) => {
                    f.failed += 1;
                    if f.failure_samples.len() < 3 && !f.failure_samples.contains(e) {
                        f.failure_samples.push(e.clone());
                    }
                }
            }
        }
        for (key, acks) in by_key {
            for (sent, m) in acks {
                let before = acked_before(key, sent);
                let twice = acks_of.get(&(key, m)).copied().unwrap_or(0) > 1;
                if m <= before || twice {
                    restarted.insert(key);
                    if f.restart_samples.len() < 3 {
                        let times: Vec<String> = self
                            .attempts
                            .iter()
                            .filter(|a| a.key == key && a.result == Ok(m))
                            .map(|a| {
                                let rel = |t: Instant| {
                                    t.checked_duration_since(from).map_or_else(
                                        || -(from.duration_since(t).as_secs_f64()),
                                        |d| d.as_secs_f64(),
                                    )
                                };
                                format!("sent {:.2}s answered {:.2}s", rel(a.at), rel(a.done))
                            })
                            .collect();
                        f.restart_samples.push(if twice {
                            format!("{key}: mid {m} acknowledged twice ({})", times.join("; "))
                        } else {
                            format!("{key}: mid {m} after {before} was acknowledged")
                        });
                    }
                }
            }
        }
        f.restarted_keys = restarted.len();
        let mut delays = Vec::new();
        for a in self.attempts.iter().filter(|a| inside(a.at)) {
            let (Ok(m), Some((_, Some(s)))) = (&a.result, self.seen.get(&a.key)) else {
                continue;
            };
            if let Some((_, t)) = s.live_at.iter().find(|(mid, _)| mid == m) {
                delays.push(t.saturating_duration_since(a.at));
            }
        }
        delays.sort();
        f.delivered_live = delays.len();
        let quantile = |q: f64| {
            (!delays.is_empty()).then(|| delays[((delays.len() - 1) as f64 * q).round() as usize])
        };
        f.p99_delivery = quantile(0.99);
        f.p95_delivery = quantile(0.95);
        for (_, s) in self.seen.values() {
            let Some(s) = s else {
                f.still_down += 1;
                continue;
            };
            let mut came_back = false;
            for o in &s.outages {
                if o.to > from && o.from < to && o.from >= from {
                    came_back = true;
                    f.longest_outage = f.longest_outage.max(o.length());
                }
            }
            f.reconnected += usize::from(came_back);
            f.told_to_reconnect += s.told_to_reconnect;
        }
        f
    }

    /// The `n` pushes sent in `[from, to)` that took longest to reach their
    /// follower live, slowest first: when each was sent (from `from`), its
    /// key and transport, how long its acknowledgement and its delivery
    /// took. Slow answers as well point at the push path (proxy, web,
    /// storage); prompt answers at the comets or the followers; many keys
    /// at one moment at the host or the test process.
    pub fn slowest_deliveries(&self, from: Instant, to: Instant, n: usize) -> Vec<String> {
        let mut slow: Vec<(Duration, String)> = Vec::new();
        for a in self.attempts.iter().filter(|a| a.at >= from && a.at < to) {
            let (Ok(m), Some((proto, Some(s)))) = (&a.result, self.seen.get(&a.key)) else {
                continue;
            };
            let Some((_, t)) = s.live_at.iter().find(|(mid, _)| mid == m) else {
                continue;
            };
            let delivery = t.saturating_duration_since(a.at);
            let line = format!(
                "+{:.3}s {} ({proto:?}) mid {m}: acked {:.1} ms, delivered {:.1} ms",
                a.at.duration_since(from).as_secs_f64(),
                a.key,
                a.done.saturating_duration_since(a.at).as_secs_f64() * 1000.0,
                delivery.as_secs_f64() * 1000.0
            );
            slow.push((delivery, line));
        }
        slow.sort_by_key(|s| std::cmp::Reverse(s.0));
        slow.into_iter().take(n).map(|(_, l)| l).collect()
    }

    /// The test runtime's stalls that began in `[from, to)`: when (from
    /// `from`) and how long, as `+1.234s 57 ms`.
    pub fn stalls_in(&self, from: Instant, to: Instant) -> Vec<String> {
        self.stalls
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(t, d)| {
                format!(
                    "+{:.3}s {} ms",
                    t.duration_since(from).as_secs_f64(),
                    d.as_millis()
                )
            })
            .collect()
    }

    /// [`Outcome::figures`] of the followers on `protos` only (and the
    /// pushes to their keys).
    pub fn figures_of(&self, protos: &[Proto], from: Instant, to: Instant) -> Figures {
        self.figures_where(|_, p| protos.contains(&p), from, to)
    }

    /// [`Outcome::figures`] of the followers of `keys` only.
    pub fn figures_for(&self, keys: &[String], from: Instant, to: Instant) -> Figures {
        self.figures_where(|k, _| keys.iter().any(|x| x == k), from, to)
    }

    fn figures_where(
        &self,
        pick: impl Fn(&str, Proto) -> bool,
        from: Instant,
        to: Instant,
    ) -> Figures {
        let seen: BTreeMap<String, (Proto, Option<Seen>)> = self
            .seen
            .iter()
            .filter(|(k, (p, _))| pick(k, *p))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let part = Outcome {
            keys: seen.keys().cloned().collect(),
            attempts: self
                .attempts
                .iter()
                .filter(|a| seen.contains_key(&a.key))
                .cloned()
                .collect(),
            seen,
            stalls: self.stalls.clone(),
        };
        part.figures(from, to)
    }

    /// Problems with the run as a whole: losses, gaps, restarted sequences,
    /// mids delivered live by two comets, followers that never caught up.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, (proto, s)) in &self.seen {
            let Some(s) = s else {
                out.push(format!("{key} ({proto:?}): follower never caught up"));
                continue;
            };
            if !s.gaps.is_empty() {
                out.push(format!("{key} ({proto:?}): unfilled gaps {:?}", s.gaps));
            }
            if !s.regressions.is_empty() {
                out.push(format!(
                    "{key} ({proto:?}): mids went back {:?}",
                    s.regressions
                ));
            }
            if !s.live_twice.is_empty() {
                out.push(format!(
                    "{key} ({proto:?}): mids delivered live by two comets {:?}",
                    s.live_twice
                ));
            }
        }
        out
    }

    /// Duplicates dropped by all followers (live frames also fetched, or re-sent).
    pub fn duplicates(&self) -> usize {
        self.seen
            .values()
            .filter_map(|(_, s)| s.as_ref())
            .map(|s| s.duplicates_dropped)
            .sum()
    }
}
