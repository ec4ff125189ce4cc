//! Harness for system tests: the real pushcluster binaries as processes on
//! loopback, each on free ports, with their logs kept in a temp dir.
//!
//! The binaries come from the same target directory as the test executable;
//! `make test` builds them first (`cargo build --workspace --bins`).
//!
//! Longer than 500 lines: one process wrapper per binary (comet, message,
//! web, Redis), each with its typed config and readiness wait, used by every
//! system test; an older release's binaries are in [`older`].

pub mod older;
pub mod proxy;

use pushcluster_core::key::Limits;
use pushcluster_core::membership::ShardEndpoint;
use pushcluster_lease::{LeaseTiming, MembershipConfig};
use pushcluster_store::redis::DirectStore;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use pushcluster_store::testing::{free_port, RedisServer};

/// The directory holding the workspace binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which `make test` does)",
        p.display()
    );
    p
}

/// One service process; killed on drop.
pub struct Proc {
    pub name: String,
    bin: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Its ops port (`/readyz`).
    pub ops_port: u16,
    /// Path polled after start: `/readyz`, or `/healthz` for a lease-mode
    /// comet, which is only ready once it holds a shard.
    wait_path: &'static str,
    /// Environment variables it starts with (besides `RUST_LOG`).
    env: Vec<(String, String)>,
}

impl Proc {
    fn spawn(
        dir: &Path,
        name: &str,
        bin_name: &str,
        config: &str,
        ops_port: u16,
        env: Vec<(String, String)>,
    ) -> Self {
        Self::spawn_waiting(dir, name, bin_name, config, ops_port, "/readyz", env)
    }

    fn spawn_waiting(
        dir: &Path,
        name: &str,
        bin_name: &str,
        config: &str,
        ops_port: u16,
        wait_path: &'static str,
        env: Vec<(String, String)>,
    ) -> Self {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config).expect("write config");
        let mut p = Self {
            name: name.to_owned(),
            bin: bin_name.to_owned(),
            config: cfg,
            log: dir.join(format!("{name}.log")),
            child: None,
            ops_port,
            wait_path,
            env,
        };
        p.start();
        p
    }

    /// Whether `/readyz` answers 200 now.
    pub fn is_ready(&self) -> bool {
        http_status(self.ops_port, "/readyz") == Some(200)
    }

    /// Whether this comet holds a shard now (standbys are ready too).
    pub fn is_serving(&self) -> bool {
        metric(self.ops_port, "pushcluster_comet_serving") == 1.0
    }

    /// Starts the process (again) with the same config.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(bin(&self.bin))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until its wait path (`/readyz` or `/healthz`) answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_status(self.ops_port, self.wait_path) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "{} did not become ready; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &c.id().to_string()])
                .status();
        }
    }

    /// Resident memory of the process now, in KiB (0 when not running).
    pub fn rss_kib(&self) -> u64 {
        let Some(c) = &self.child else { return 0 };
        std::fs::read_to_string(format!("/proc/{}/status", c.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Sends SIGTERM without waiting; `term` or `reap` waits.
    pub fn send_term(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, then wait for a graceful exit (SIGKILL after 15 s).
    pub fn term(&mut self) -> Duration {
        let start = Instant::now();
        self.send_term();
        self.reap();
        start.elapsed()
    }

    /// Waits for the process to exit after a signal (SIGKILL after 15 s).
    pub fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("{} did not stop within 15 s of SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP GET returning the status code (no client library, so it
/// can run in blocking helpers).
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// How to build a test cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub shards: u32,
    pub redis_url: Option<String>,
    pub admin_token: Option<String>,
    pub subscriber_secret: Option<String>,
    /// The cluster's internal RPC token (on by default, as the operator
    /// always sets one: every test runs the authenticated path).
    pub rpc_token: Option<String>,
    pub queue_depth: usize,
    pub max_subscribers_per_key: usize,
    pub heartbeat_grace_seconds: u64,
    pub max_message_bytes: usize,
    /// Redis holding shard leases: comets fail over (membership kind redis).
    pub lease_redis: Option<String>,
    /// Extra comets without a shard of their own (lease mode).
    pub standbys: u32,
    /// Lease duration, renew deadline, retry period in ms (lease mode).
    pub lease_ms: (u64, u64, u64),
    /// Web and the comets reach the message service, and web the comets,
    /// through proxies of an older release without the stream methods
    /// ([`older`]): a rolling upgrade's mixed versions. Static membership
    /// only: with leases, web finds the comets' own addresses.
    pub older_rpc: bool,
    /// With `redis_url`: comets store pushes straight into Redis and
    /// deliver stored messages from its live channels, as the operator sets
    /// them up (true), or store through the message service (false).
    pub comets_store_in_redis: bool,
    /// With `redis_url` and `comets_store_in_redis`: web stores private
    /// pushes straight into Redis, as the operator sets it up (true), or
    /// pushes through the comets, as web of the previous release did (false).
    pub web_stores_in_redis: bool,
    /// With `redis_url`: the Redis URL the comets use instead (a proxy in
    /// front of the same server, say, that a test cuts).
    pub comet_redis_url: Option<String>,
    /// The comets reach the message service through a proxy the test can
    /// cut or freeze ([`Cluster::comet_message_proxy`]); web reaches it
    /// directly.
    pub comet_message_proxy: bool,
    /// Web reaches each comet's gRPC through a proxy the test can cut or
    /// freeze ([`Cluster::web_comet_proxies`]); clients reach the comets
    /// directly.
    pub web_comet_proxy: bool,
    /// Web's lame-duck period after SIGTERM (`drain_delay_ms`).
    pub web_drain_delay_ms: u64,
    /// Client listeners' caps and header deadline (comet and web).
    pub listener_limits: pushcluster_core::serve::ListenerLimits,
    /// Replicas every Redis write waits for (web, comets, message service).
    pub redis_durability: pushcluster_redis::Durability,
    /// A directory with `tls.crt` and `tls.key`: comets serve WebSocket and
    /// SSE behind TLS on a port of their own (`CometAddrs::wss`), web its
    /// public API (`Cluster::public_tls_port`), re-reading them every second.
    pub tls_dir: Option<std::path::PathBuf>,
    /// CAs every service trusts for a `rediss://` Redis
    /// (`PUSH_REDIS_CA_FILE`).
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Certificate and key every service shows a Redis that asks for one
    /// (`PUSH_REDIS_CLIENT_CERT_FILE`, `PUSH_REDIS_CLIENT_KEY_FILE`).
    pub redis_client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// TLS on the internal gRPC ports of every service (`rpc_tls`).
    pub rpc_tls: Option<pushcluster_proto::tls::RpcTls>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shards: 2,
            redis_url: None,
            admin_token: None,
            subscriber_secret: None,
            rpc_token: Some("systest-rpc-token".into()),
            queue_depth: 256,
            max_subscribers_per_key: 64,
            heartbeat_grace_seconds: 5,
            max_message_bytes: 65536,
            lease_redis: None,
            standbys: 0,
            lease_ms: (2000, 1400, 300),
            older_rpc: false,
            comets_store_in_redis: true,
            web_stores_in_redis: true,
            comet_redis_url: None,
            comet_message_proxy: false,
            web_comet_proxy: false,
            web_drain_delay_ms: 0,
            listener_limits: pushcluster_core::serve::ListenerLimits::default(),
            redis_durability: pushcluster_redis::Durability::default(),
            tls_dir: None,
            redis_ca_file: None,
            rpc_tls: None,
            redis_client_cert: None,
        }
    }
}

/// Addresses of one comet.
#[derive(Debug, Clone)]
pub struct CometAddrs {
    pub ws: String,
    /// WebSocket and SSE behind TLS (with `Options::tls_dir`).
    pub wss: Option<String>,
    pub tcp: String,
    pub rpc_port: u16,
}

/// A running cluster: message, comets, web.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub message: Proc,
    /// The message service's gRPC port.
    pub message_rpc_port: u16,
    pub comets: Vec<Proc>,
    pub comet_addrs: Vec<CometAddrs>,
    pub web: Proc,
    pub public_url: String,
    /// Web's public API behind TLS (with `Options::tls_dir`).
    pub public_tls_port: Option<u16>,
    pub admin_url: String,
    pub opts: Options,
    /// With `older_rpc`: the proxy in front of the message service.
    pub older_message: Option<older::Proxy>,
    /// With `older_rpc`: the proxies in front of the comets, by shard.
    pub older_comets: Vec<older::Proxy>,
    /// With `comet_message_proxy`: the proxy between comets and the
    /// message service.
    pub comet_message_proxy: Option<proxy::FreezableProxy>,
    /// With `web_comet_proxy`: the proxies between web and each comet, by
    /// shard.
    pub web_comet_proxies: Vec<proxy::FreezableProxy>,
}

fn yaml<T: serde::Serialize>(cfg: &T) -> String {
    serde_yaml::to_string(cfg).expect("config serializes")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TLS listener on a free port with the certificate in `dir`.
fn tls_listen(dir: &std::path::Path) -> (u16, pushcluster_core::tls::TlsListen) {
    let port = free_port();
    let t = pushcluster_core::tls::TlsListen {
        listen: local(port),
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        reload_seconds: 1,
    };
    (port, t)
}

impl Cluster {
    /// Starts a cluster and waits until every process is ready.
    pub fn start(opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let limits = Limits {
            max_message_bytes: opts.max_message_bytes,
            max_key_bytes: 64,
            max_keys_per_multipush: 50,
            ..Limits::default()
        };
        let file = |var: &str, f: &Path| (var.to_owned(), f.display().to_string());
        let mut env: Vec<(String, String)> = opts
            .redis_ca_file
            .iter()
            .map(|f| file("PUSH_REDIS_CA_FILE", f))
            .collect();
        if let Some((cert, key)) = &opts.redis_client_cert {
            env.push(file("PUSH_REDIS_CLIENT_CERT_FILE", cert));
            env.push(file("PUSH_REDIS_CLIENT_KEY_FILE", key));
        }
        let msg_port = free_port();
        let msg_ops = free_port();
        let mut message_cfg = push_message::Config {
            listen: local(msg_port),
            ops_listen: local(msg_ops),
            rpc_token: opts.rpc_token.clone(),
            rpc_tls: opts.rpc_tls.clone(),
            limits: limits.clone(),
            ..push_message::Config::default()
        };
        message_cfg.storage.redis_url = opts.redis_url.clone();
        message_cfg.storage.redis_durability = opts.redis_durability;
        message_cfg.storage.path = dir.path().join("data/messages.redb");
        let message = Proc::spawn(
            dir.path(),
            "message",
            "push-message",
            &yaml(&message_cfg),
            msg_ops,
            env.clone(),
        );
        let older_message = opts
            .older_rpc
            .then(|| older::message(msg_port, opts.rpc_token.as_deref()));
        let msg_rpc = older_message.as_ref().map_or(msg_port, |p| p.port);
        let (dur, deadline, retry) = opts.lease_ms;
        let membership = match &opts.lease_redis {
            None => MembershipConfig::Static {
                shards: opts.shards,
            },
            Some(url) => MembershipConfig::Redis {
                redis_url: url.clone(),
                namespace: "t".into(),
                shards: opts.shards,
                lease: LeaseTiming {
                    duration_ms: dur,
                    renew_deadline_ms: deadline,
                    retry_period_ms: retry,
                },
            },
        };
        let comet_store = DirectStore {
            redis_url: opts
                .redis_url
                .clone()
                .filter(|_| opts.comets_store_in_redis),
            redis_durability: opts.redis_durability,
            ..DirectStore::default()
        };
        let web_store = if opts.web_stores_in_redis {
            comet_store.clone()
        } else {
            DirectStore::default()
        };
        let comet_store = match (&opts.comet_redis_url, &comet_store.redis_url) {
            (Some(url), Some(_)) => DirectStore {
                redis_url: Some(url.clone()),
                ..comet_store
            },
            _ => comet_store,
        };
        let wait_path = if opts.lease_redis.is_some() {
            "/healthz"
        } else {
            "/readyz"
        };
        let message_url = format!("http://127.0.0.1:{msg_rpc}");
        let comet_message_proxy = opts
            .comet_message_proxy
            .then(|| proxy::FreezableProxy::start_now(msg_rpc));
        let comet_message_url = comet_message_proxy
            .as_ref()
            .map_or(message_url.clone(), |p| {
                format!("http://127.0.0.1:{}", p.port)
            });
        let mut comets = Vec::new();
        let mut comet_addrs = Vec::new();
        for i in 0..opts.shards + opts.standbys {
            let (ws, tcp, rpc, ops) = (free_port(), free_port(), free_port(), free_port());
            let wss = opts.tls_dir.as_deref().map(tls_listen);
            let cfg = push_comet::Config {
                ws_tls: wss.as_ref().map(|(_, t)| t.clone()),
                shard: i % opts.shards,
                holder: Some(format!("comet-{i}")),
                membership: membership.clone(),
                ws_listen: local(ws),
                tcp_listen: local(tcp),
                rpc_listen: local(rpc),
                ops_listen: local(ops),
                message_url: comet_message_url.clone(),
                store: comet_store.clone(),
                queue_depth: opts.queue_depth,
                max_subscribers_per_key: opts.max_subscribers_per_key,
                heartbeat_grace_seconds: opts.heartbeat_grace_seconds,
                subscriber_secret: opts.subscriber_secret.clone(),
                rpc_token: opts.rpc_token.clone(),
                rpc_tls: opts.rpc_tls.clone(),
                limits: limits.clone(),
                listener_limits: opts.listener_limits.clone(),
                ..push_comet::Config::default()
            };
            comets.push(Proc::spawn_waiting(
                dir.path(),
                &format!("comet-{i}"),
                "push-comet",
                &yaml(&cfg),
                ops,
                wait_path,
                env.clone(),
            ));
            if opts.lease_redis.is_some() && i < opts.shards {
                // The first comets take their preferred shards before standbys start.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !comets[i as usize].is_serving() {
                    assert!(Instant::now() < deadline, "comet-{i} took no shard");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            comet_addrs.push(CometAddrs {
                ws: format!("127.0.0.1:{ws}"),
                wss: wss.map(|(port, _)| format!("localhost:{port}")),
                tcp: format!("127.0.0.1:{tcp}"),
                rpc_port: rpc,
            });
        }
        let (public, admin, ops) = (free_port(), free_port(), free_port());
        let public_tls = opts.tls_dir.as_deref().map(tls_listen);
        let mut static_comets = Vec::new();
        let mut older_comets = Vec::new();
        let mut web_comet_proxies = Vec::new();
        for (shard, a) in comet_addrs.iter().enumerate() {
            let mut rpc = a.rpc_port;
            if opts.older_rpc {
                let p = older::comet(rpc, opts.rpc_token.as_deref());
                rpc = p.port;
                older_comets.push(p);
            }
            if opts.web_comet_proxy {
                let p = proxy::FreezableProxy::start_now(rpc);
                rpc = p.port;
                web_comet_proxies.push(p);
            }
            static_comets.push(ShardEndpoint {
                shard: shard as u32,
                rpc: format!("http://127.0.0.1:{rpc}"),
                ws: a.ws.clone(),
                tcp: a.tcp.clone(),
            });
        }
        let web_cfg = push_web::Config {
            public_listen: local(public),
            public_tls: public_tls.as_ref().map(|(_, t)| t.clone()),
            admin_listen: local(admin),
            ops_listen: local(ops),
            message_url,
            admin_token: opts.admin_token.clone(),
            subscriber_secret: opts.subscriber_secret.clone(),
            rpc_token: opts.rpc_token.clone(),
            rpc_tls: opts.rpc_tls.clone(),
            rpc_timeout_ms: 3000,
            drain_delay_ms: opts.web_drain_delay_ms,
            membership,
            store: web_store,
            limits,
            listener_limits: opts.listener_limits.clone(),
            comets: static_comets,
            ..push_web::Config::default()
        };
        let web = Proc::spawn(dir.path(), "web", "push-web", &yaml(&web_cfg), ops, env);
        Self {
            dir,
            message,
            message_rpc_port: msg_port,
            comets,
            comet_addrs,
            web,
            public_url: format!("http://127.0.0.1:{public}"),
            public_tls_port: public_tls.map(|(port, _)| port),
            admin_url: format!("http://127.0.0.1:{admin}"),
            opts,
            older_message,
            comet_message_proxy,
            older_comets,
            web_comet_proxies,
        }
    }

    /// A client of this cluster's web.
    pub fn client(&self) -> pushcluster_client::http::Client {
        pushcluster_client::http::Client::new(
            &self.public_url,
            &self.admin_url,
            self.opts.admin_token.clone(),
        )
        .with_subscriber_secret(self.opts.subscriber_secret.clone())
    }

    /// A comet's metric value from its `/metrics` (0 when absent).
    pub fn comet_metric(&self, shard: usize, name: &str) -> f64 {
        metric(self.comets[shard].ops_port, name)
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in std::iter::once(&self.message)
            .chain(self.comets.iter())
            .chain(std::iter::once(&self.web))
        {
            out.push_str(&format!("==== {} ====\n{}\n", p.name, p.log_text()));
        }
        out
    }
}

/// Reads a metric from a service's `/metrics`, summed over its labels (0 when absent).
pub fn metric(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    sum_metric(&buf, name)
}

/// Sums the samples of metric `name` in Prometheus text, over all labels.
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| match rest.as_bytes().first() {
            Some(b' ') => Some(rest),
            Some(b'{') => rest.split_once("} ").map(|(_, v)| v),
            _ => None,
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// Transport of a test subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Tcp,
    Sse,
}

/// Resolves `key` through web and subscribes; returns once the comet has
/// registered the connection (after `+h`, or the SSE response headers).
pub async fn subscribe(
    c: &Cluster,
    key: &str,
    t: Transport,
    versioned: bool,
) -> pushcluster_client::sub::Subscriber {
    use pushcluster_client::http::Proto;
    use pushcluster_client::sub::{Params, Subscriber};
    let api = c.client();
    let p = Params {
        key: key.to_owned(),
        heartbeat: 30,
        token: None,
        versioned,
    };
    let proto = match t {
        Transport::Ws => Proto::WebSocket,
        Transport::Tcp => Proto::Tcp,
        Transport::Sse => Proto::Sse,
    };
    let addr = api.resolve(key, proto).await.expect("resolve");
    let mut sub = match t {
        Transport::Ws => Subscriber::websocket(&addr, &p).await,
        Transport::Tcp => Subscriber::tcp(&addr, &p).await,
        Transport::Sse => Subscriber::sse(&addr, &p, None).await,
    }
    .expect("connect");
    if t != Transport::Sse {
        let f = sub
            .next_timeout(Duration::from_secs(5))
            .await
            .expect("first frame");
        assert_eq!(
            f,
            pushcluster_client::Frame::Heartbeat,
            "first frame must be +h"
        );
    }
    sub
}

/// Collects `n` messages (skipping heartbeats), failing after `timeout`.
pub async fn collect(
    sub: &mut pushcluster_client::sub::Subscriber,
    n: usize,
    timeout: Duration,
) -> Vec<pushcluster_client::Message> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sub.next_timeout(left).await {
            Ok(pushcluster_client::Frame::Message(m)) => out.push(m),
            Ok(pushcluster_client::Frame::Heartbeat) => {}
            Ok(other) => panic!("unexpected frame {other:?} after {} messages", out.len()),
            Err(e) => panic!("after {} of {n} messages: {e}", out.len()),
        }
    }
    out
}

/// A lazily connected gRPC channel to a service on `127.0.0.1:port`.
pub fn grpc_channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect_lazy()
}

/// One follower per key (`pushcluster_client::follow`), behaving as the
/// docs tell clients to: resolve, subscribe, fetch, dedupe by mid, follow
/// reconnect frames.
pub struct Followers {
    /// Stops them and counts their connections.
    pub control: pushcluster_client::follow::Control,
    keys: Vec<String>,
    untils: Vec<std::sync::Arc<std::sync::atomic::AtomicI64>>,
    tasks: Vec<tokio::task::JoinHandle<pushcluster_client::follow::Seen>>,
}

impl Followers {
    /// Starts a follower on each of `keys` over `proto`.
    pub fn start(
        api: &pushcluster_client::http::Client,
        keys: &[String],
        proto: pushcluster_client::http::Proto,
    ) -> Self {
        use std::sync::atomic::AtomicI64;
        let control = pushcluster_client::follow::Control::default();
        let untils: Vec<_> = keys
            .iter()
            .map(|_| std::sync::Arc::new(AtomicI64::new(i64::MAX)))
            .collect();
        let tasks = keys
            .iter()
            .zip(&untils)
            .map(|(k, u)| {
                tokio::spawn(
                    pushcluster_client::follow::Follow {
                        api: api.clone(),
                        key: k.clone(),
                        proto,
                        token: None,
                        until: u.clone(),
                        control: control.clone(),
                    }
                    .run(),
                )
            })
            .collect();
        Self {
            control,
            keys: keys.to_vec(),
            untils,
            tasks,
        }
    }

    /// Tells each follower its key's last mid, lets it catch up (failing
    /// the test after 20 s, with `c`'s logs) and returns what each saw.
    pub async fn finish(
        self,
        last: &std::collections::BTreeMap<String, i64>,
        c: &Cluster,
    ) -> Vec<(String, pushcluster_client::follow::Seen)> {
        for (k, u) in self.keys.iter().zip(&self.untils) {
            u.store(last[k], std::sync::atomic::Ordering::SeqCst);
        }
        self.control.stop();
        let mut out = Vec::new();
        for (k, f) in self.keys.into_iter().zip(self.tasks) {
            let seen = tokio::time::timeout(Duration::from_secs(20), f)
                .await
                .unwrap_or_else(|_| panic!("{k}: follower did not catch up\n{}", c.logs()))
                .expect("follower");
            out.push((k, seen));
        }
        out
    }
}

/// `name` on every comet of `c`, by index.
pub fn comets_metric(c: &Cluster, name: &str) -> Vec<f64> {
    (0..c.comets.len())
        .map(|i| c.comet_metric(i, name))
        .collect()
}

/// Waits until `f` holds, up to `limit`; how long it took.
pub async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_labelled_and_plain_samples() {
        let text = "# HELP x_total X.\n# TYPE x counter\nx_total{shard=\"0\"} 2\nx_total{shard=\"1\"} 1.5\nx_totally 9\ny 3\n# EOF\n";
        assert_eq!(super::sum_metric(text, "x_total"), 3.5);
        assert_eq!(super::sum_metric(text, "y"), 3.0);
        assert_eq!(super::sum_metric(text, "z"), 0.0);
    }
}
