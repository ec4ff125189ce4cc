//! Test support: real `redis-server` processes on free loopback ports,
//! stopped on drop: one node (`RedisServer`), a Redis Cluster of masters
//! with a replica each (`RedisClusterServers`) and a master with replicas
//! watched by Sentinels (`RedisSentinels`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
pub struct RedisServer {
    child: Child,
    /// Its command line, to start it again.
    args: Vec<String>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its working directory, when the arguments named none: a replica
    /// writes the snapshot it syncs there (`dump.rdb`), and a later server
    /// started in the same directory would load it.
    _dir: Option<tempfile::TempDir>,
}

/// First and last port handed out: below Linux's ephemeral range (32768 up),
/// so no outgoing connection and no bind to port 0 can take a port while a
/// test restarts the process that listens on it. (Taking ports from the
/// ephemeral range made a SIGKILL-and-restart test flaky: the freed port was
/// sometimes in use by another test's connection when the process came back.)
const PORTS: std::ops::RangeInclusive<u16> = 20000..=32767;

/// A TCP port on 127.0.0.1 that is free now and that this process has not
/// handed out before. Each test process walks the range from its own
/// starting point, so parallel test processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end() - PORTS.start()) + 1;
    let start = {
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
        seed % span
    };
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = PORTS.start() + n as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?} on 127.0.0.1")
}

impl RedisServer {
    /// Starts `redis-server` (no persistence) and waits until it answers.
    ///
    /// Panics with a clear message when `redis-server` is not installed: the
    /// storage suite must run against the real server, not skip.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// As [`Self::start`], on a given port of 127.0.0.1.
    pub fn start_on(port: u16) -> Self {
        Self::spawn(port, None)
    }

    /// As [`Self::start_on`], with an append-only file in `dir` fsynced every
    /// write, so a restart on the same port and `dir` keeps everything
    /// acknowledged.
    pub fn start_durable_on(port: u16, dir: &std::path::Path) -> Self {
        Self::spawn(port, Some(dir))
    }

    fn spawn(port: u16, dir: Option<&std::path::Path>) -> Self {
        let mut args: Vec<String> = ["--save", ""].map(String::from).to_vec();
        match dir {
            Some(d) => args.extend(
                ["--appendonly", "yes", "--appendfsync", "always", "--dir"]
                    .map(String::from)
                    .into_iter()
                    .chain([d.display().to_string()]),
            ),
            None => args.extend(["--appendonly", "no"].map(String::from)),
        }
        Self::spawn_with(port, args)
    }

    /// `redis-server` on `port` with `args` added (after the port, the
    /// loopback bind and warning-level logs).
    pub fn spawn_with(port: u16, args: Vec<String>) -> Self {
        let mut all = base_args(port);
        // A replica syncs at once, not after the default 5 s a master waits
        // for more replicas to share one transfer.
        all.extend(["--repl-diskless-sync-delay".into(), "0".into()]);
        all.extend(args);
        Self::spawn_raw(port, all)
    }

    /// `redis-server` with exactly `all` as its arguments (and a fresh
    /// working directory unless they name one), listening on `port`.
    fn spawn_raw(port: u16, mut all: Vec<String>) -> Self {
        let own = (!all.iter().any(|a| a == "--dir")).then(|| {
            let d = tempfile::tempdir().expect("temp dir");
            all.extend(["--dir".into(), d.path().display().to_string()]);
            d
        });
        let child = launch(&all);
        let server = Self {
            child,
            args: all,
            port,
            _dir: own,
        };
        wait_listening(port);
        server
    }

    /// A node that takes TLS connections only, on a free port of
    /// 127.0.0.1, serving the certificate and key (PEM files) given;
    /// with `client_ca`, clients must show a certificate it issued
    /// (`tls-auth-clients yes`), else they need none.
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Self {
        let port = free_port();
        let mut all = base_args(0);
        if let Some(ca) = client_ca {
            all.extend(["--tls-ca-cert-file".into(), ca.display().to_string()]);
        }
        all.extend(
            [
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &cert.display().to_string(),
                "--tls-key-file",
                &key.display().to_string(),
                "--tls-auth-clients",
                if client_ca.is_some() { "yes" } else { "no" },
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from),
        );
        Self::spawn_raw(port, all)
    }

    /// Its `rediss://` URL (for a node of [`Self::start_tls`]).
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends it `signal` (`STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} redis-server on port {}", self.port);
    }

    /// Starts it again with the same command line, after [`Self::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.child = launch(&self.args);
        wait_listening(self.port);
    }

    /// A synchronous connection, for test set-up and inspection.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("redis on port {}: {e}", self.port))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// A node's TLS port `port` beside its plain one, with the certificate,
/// key and CA of `files`; replication over TLS, client certificates
/// optional.
fn tls_node_args(port: u16, [cert, key, ca]: [&std::path::Path; 3]) -> Vec<String> {
    let path = |p: &std::path::Path| p.display().to_string();
    vec![
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path(cert),
        "--tls-key-file".into(),
        path(key),
        "--tls-ca-cert-file".into(),
        path(ca),
        "--tls-auth-clients".into(),
        "optional".into(),
        "--tls-replication".into(),
        "yes".into(),
    ]
}

/// The port, the loopback bind and warning-level logs.
fn base_args(port: u16) -> Vec<String> {
    vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--loglevel".into(),
        "warning".into(),
    ]
}

/// `redis-server`'s own log goes to the test's output when
/// `PUSHCLUSTER_TEST_REDIS_LOGS` is set (a Sentinel's failover steps, say).
fn launch(args: &[String]) -> Child {
    let log = if std::env::var_os("PUSHCLUSTER_TEST_REDIS_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    Command::new("redis-server")
        .args(args)
        .stdout(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install it with `apt-get install -y redis-server` (make test does)")
        })
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start on port {port}");
}

/// Polls `f` every 50 ms until it holds; panics with `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} within {limit:?}");
}

/// A Redis Cluster on loopback: `masters` masters splitting the 16384
/// slots evenly, each with one replica; node timeout 1 s, so a dead master's
/// replica takes over within about 2 s.
pub struct RedisClusterServers {
    /// The nodes: masters first, then their replicas in the same order.
    pub nodes: Vec<RedisServer>,
    /// Node ids, in the order of `nodes`.
    pub ids: Vec<String>,
    dir: tempfile::TempDir,
    /// The nodes' TLS ports (of [`Self::start_tls`]), in the same order.
    tls_ports: Vec<u16>,
}

impl RedisClusterServers {
    /// Starts `masters` masters and as many replicas and joins them.
    pub fn start(masters: usize) -> Self {
        Self::start_with(masters, None)
    }

    /// As [`Self::start`], each node also taking TLS connections on a port
    /// of its own ([`Self::tls_url`]) with `tls`'s certificate, key and CA
    /// (PEM files), the cluster bus and replication over TLS too; the plain
    /// ports stay for the test's own set-up.
    pub fn start_tls(masters: usize, tls: [&std::path::Path; 3]) -> Self {
        Self::start_with(masters, Some(tls))
    }

    fn start_with(masters: usize, tls: Option<[&std::path::Path; 3]>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let buses: Vec<u16> = (0..masters * 2).map(|_| free_port()).collect();
        let tls_ports: Vec<u16> = tls
            .map(|_| (0..masters * 2).map(|_| free_port()).collect())
            .unwrap_or_default();
        let nodes: Vec<RedisServer> = buses
            .iter()
            .enumerate()
            .map(|(i, bus)| {
                let port = free_port();
                let tls_args: Vec<String> = match tls {
                    Some(files) => tls_node_args(tls_ports[i], files)
                        .into_iter()
                        .chain(["--tls-cluster".into(), "yes".into()])
                        .collect(),
                    None => Vec::new(),
                };
                RedisServer::spawn_with(
                    port,
                    [
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-replica-validity-factor",
                        "0",
                        "--cluster-require-full-coverage",
                        "no",
                        "--cluster-allow-reads-when-down",
                        "no",
                    ]
                    .map(String::from)
                    .into_iter()
                    .chain([
                        // The bus port defaults to port + 10000, which may
                        // be taken: pick a free one too.
                        "--cluster-port".into(),
                        bus.to_string(),
                        "--cluster-config-file".into(),
                        format!("nodes-{port}.conf"),
                        "--dbfilename".into(),
                        format!("dump-{port}.rdb"),
                        "--dir".into(),
                        dir.path().display().to_string(),
                    ])
                    .chain(tls_args)
                    .collect(),
                )
            })
            .collect();
        let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
        let meet: Vec<(String, u16, u16)> = nodes
            .iter()
            .zip(&buses)
            .map(|(n, bus)| ("127.0.0.1".to_owned(), n.port, *bus))
            .collect();
        let ids = form_cluster(&urls, &meet, masters);
        let cluster = Self {
            nodes,
            ids,
            dir,
            tls_ports,
        };
        cluster.wait_healthy();
        cluster
    }

    /// Waits until every live node says the cluster is ok and every
    /// replica's link to its master is up.
    pub fn wait_healthy(&self) {
        wait_for(
            Duration::from_secs(30),
            "the redis cluster did not become healthy",
            || {
                self.nodes.iter().all(|n| {
                    let mut c = n.conn();
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query(&mut c)
                        .unwrap_or_default();
                    let repl: String = redis::cmd("INFO")
                        .arg("replication")
                        .query(&mut c)
                        .unwrap_or_default();
                    info.contains("cluster_state:ok")
                        && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                })
            },
        );
    }

    /// `redis+cluster://` URL naming every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// `rediss+cluster://` URL naming every node's TLS port as a seed.
    pub fn tls_url(&self) -> String {
        let seeds: Vec<String> = self
            .tls_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("rediss+cluster://{}", seeds.join(","))
    }

    /// Index in `nodes` of the master that serves `key`'s slot now, asked
    /// of node `ask` (any live node).
    pub fn master_of(&self, key: &str, ask: usize) -> usize {
        let slot = pushcluster_redis::slot(key.as_bytes());
        let slots: Vec<(i64, i64, String, i64)> = cluster_slots(&mut self.nodes[ask].conn());
        let (_, _, _, port) = slots
            .into_iter()
            .find(|(a, b, _, _)| (*a..=*b).contains(&i64::from(slot)))
            .expect("the slot is served");
        self.nodes
            .iter()
            .position(|n| i64::from(n.port) == port)
            .expect("a known node serves it")
    }

    /// The directory holding the nodes' cluster config files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Joins fresh cluster-enabled nodes into a Redis Cluster, as `redis-cli
/// --cluster create` does: the first `masters` of `urls` split the 16384
/// slots evenly, the rest replicate them in order (one each, wrapping).
/// `meet` gives each node's address as the others should see it (host,
/// port, cluster bus port). Returns the node ids, in order. Panics (it is
/// test set-up) when a node does not answer or the nodes never meet.
pub fn form_cluster(urls: &[String], meet: &[(String, u16, u16)], masters: usize) -> Vec<String> {
    let conn = |url: &String| {
        redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("redis node {url}: {e}"))
    };
    let ids: Vec<String> = urls
        .iter()
        .map(|u| {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut conn(u))
                .expect("CLUSTER MYID")
        })
        .collect();
    let per = 16384 / masters;
    for (i, u) in urls.iter().take(masters).enumerate() {
        let first = i * per;
        let last = if i + 1 == masters {
            16383
        } else {
            first + per - 1
        };
        let mut c = conn(u);
        redis::cmd("CLUSTER")
            .arg("SET-CONFIG-EPOCH")
            .arg(i + 1)
            .exec(&mut c)
            .expect("SET-CONFIG-EPOCH");
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(first)
            .arg(last)
            .exec(&mut c)
            .expect("ADDSLOTSRANGE");
    }
    let mut first = conn(&urls[0]);
    for (host, port, bus) in &meet[1..] {
        redis::cmd("CLUSTER")
            .arg("MEET")
            .arg(host)
            .arg(port)
            .arg(bus)
            .exec(&mut first)
            .expect("CLUSTER MEET");
    }
    wait_for(
        Duration::from_secs(30),
        "cluster nodes did not all meet",
        || {
            urls.iter().all(|u| {
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query::<String>(&mut conn(u))
                    .is_ok_and(|t| t.lines().count() == urls.len() && !t.contains("handshake"))
            })
        },
    );
    for (i, u) in urls.iter().enumerate().skip(masters) {
        redis::cmd("CLUSTER")
            .arg("REPLICATE")
            .arg(&ids[(i - masters) % masters])
            .exec(&mut conn(u))
            .expect("CLUSTER REPLICATE");
    }
    ids
}

/// `CLUSTER SLOTS` as (first slot, last slot, master host, master port).
fn cluster_slots(c: &mut redis::Connection) -> Vec<(i64, i64, String, i64)> {
    let v: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(c)
        .expect("CLUSTER SLOTS");
    v.into_iter()
        .filter_map(|range| {
            let redis::Value::Array(parts) = range else {
                return None;
            };
            let first: i64 = redis::from_redis_value_ref(parts.first()?).ok()?;
            let last: i64 = redis::from_redis_value_ref(parts.get(1)?).ok()?;
            let redis::Value::Array(master) = parts.get(2)? else {
                return None;
            };
            let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
            let port: i64 = redis::from_redis_value_ref(master.get(1)?).ok()?;
            Some((first, last, host, port))
        })
        .collect()
}

/// A master with replicas, watched by three Sentinels (quorum 2) that call
/// a master down after 1 s.
pub struct RedisSentinels {
    /// The data nodes: the first master, then its replicas.
    pub nodes: Vec<RedisServer>,
    /// The Sentinels.
    pub sentinels: Vec<RedisServer>,
    /// The master's name.
    pub master: String,
    _dir: tempfile::TempDir,
    /// TLS ports (of [`Self::start_tls`]): the data nodes', then the
    /// Sentinels'.
    tls_ports: Vec<u16>,
}

impl RedisSentinels {
    /// Starts a master, `replicas` replicas and three Sentinels, and waits
    /// until every Sentinel knows every replica and the other Sentinels.
    pub fn start(replicas: usize) -> Self {
        Self::start_with(replicas, None)
    }

    /// As [`Self::start`], every node and Sentinel also taking TLS
    /// connections on a port of its own with `tls`'s certificate, key and
    /// CA (PEM files), and replication and the Sentinels' own connections
    /// over TLS: clients reach it by [`Self::tls_url`]. The plain ports
    /// stay for the test's own set-up.
    pub fn start_tls(replicas: usize, tls: [&std::path::Path; 3]) -> Self {
        Self::start_with(replicas, Some(tls))
    }

    fn start_with(replicas: usize, tls: Option<[&std::path::Path; 3]>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Where replicas and Sentinels reach a node: its TLS port with TLS.
        let mut tls_ports = Vec::new();
        let mut reach = |plain: u16| -> (u16, Vec<String>) {
            match tls {
                Some(files) => {
                    let p = free_port();
                    tls_ports.push(p);
                    (p, tls_node_args(p, files))
                }
                None => (plain, Vec::new()),
            }
        };
        let port = free_port();
        let (master_at, extra) = reach(port);
        let master = RedisServer::spawn_with(
            port,
            ["--save", "", "--appendonly", "no"]
                .map(String::from)
                .into_iter()
                .chain(extra)
                .collect(),
        );
        let mut nodes = vec![master];
        for _ in 0..replicas {
            let port = free_port();
            let (_, extra) = reach(port);
            nodes.push(RedisServer::spawn_with(
                port,
                [
                    "--save".into(),
                    "".into(),
                    "--appendonly".into(),
                    "no".into(),
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    master_at.to_string(),
                ]
                .into_iter()
                .chain(extra)
                .collect(),
            ));
        }
        let name = "pcmaster".to_owned();
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|i| {
                let port = free_port();
                let (_, extra) = reach(port);
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "sentinel monitor {name} 127.0.0.1 {master_at} 2\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 10000\n\
                         sentinel parallel-syncs {name} 2\n",
                    ),
                )
                .expect("sentinel config");
                let mut args = vec![conf.display().to_string(), "--sentinel".into()];
                args.extend(base_args(port));
                args.extend(extra);
                RedisServer::spawn_raw(port, args)
            })
            .collect();
        let group = Self {
            nodes,
            sentinels,
            master: name,
            _dir: dir,
            tls_ports,
        };
        wait_for(
            Duration::from_secs(30),
            "the sentinels did not discover the group",
            || {
                group.sentinels.iter().all(|s| {
                    let mut c = s.conn();
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(&group.master)
                        .query(&mut c)
                        .unwrap_or_default();
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(&group.master)
                        .query(&mut c)
                        .unwrap_or_default();
                    replicas.len() == group.nodes.len() - 1
                        && others.len() == group.sentinels.len() - 1
                })
            },
        );
        wait_for(Duration::from_secs(30), "the replicas did not sync", || {
            group.nodes[1..].iter().all(|n| {
                redis::cmd("INFO")
                    .arg("replication")
                    .query::<String>(&mut n.conn())
                    .is_ok_and(|i| i.contains("master_link_status:up"))
            })
        });
        group
    }

    /// `redis+sentinel://` URL naming the Sentinels and the master.
    pub fn url(&self) -> String {
        let s: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{}", s.join(","), self.master)
    }

    /// `rediss+sentinel://` URL naming the Sentinels' TLS ports.
    pub fn tls_url(&self) -> String {
        let s: Vec<String> = self.tls_ports[self.nodes.len()..]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("rediss+sentinel://{}/{}", s.join(","), self.master)
    }

    /// Index in `nodes` of the master the first live Sentinel names.
    pub fn master_index(&self) -> Option<usize> {
        self.sentinels.iter().find_map(|s| {
            let mut c = redis::Client::open(s.url()).ok()?.get_connection().ok()?;
            let (_, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&self.master)
                .query(&mut c)
                .ok()?;
            self.nodes.iter().position(|n| n.port == port)
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
