//! Where Redis is: a [`Target`] parsed from a URL of any mode (the crate
//! docs list the forms), the connections it opens, and what Redis says it
//! looks like now ([`Topology`]).

use crate::cluster::LazyCluster;
use crate::tls::Tls;
use crate::TlsSettings;
use crate::{
    manager_config, sentinel, Conn, Error, Inner, Mode, CONNECT_TIMEOUT, RESPONSE_TIMEOUT,
};
use pushcluster_core::ops::redact_url as redact;
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::RedisError;
use std::sync::Arc;
use std::time::Duration;

/// Where Redis is, parsed from a URL (see the crate docs).
#[derive(Clone)]
pub struct Target {
    pub(crate) kind: Kind,
    /// The URL without its password, for logs.
    redacted: String,
}

#[derive(Clone)]
pub(crate) enum Kind {
    Single(redis::Client),
    Sentinel(sentinel::Group),
    Cluster {
        nodes: Vec<String>,
        username: Option<String>,
        password: Option<String>,
        tls: Tls,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Target").field(&self.redacted).finish()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

const SENTINEL: &str = "+sentinel://";
const CLUSTER: &str = "+cluster://";

/// The scheme's TLS choice (`rediss…` on) and the URL after `redis` or
/// `rediss`; `None` for a scheme of neither family.
fn tls_scheme(url: &str) -> Option<(bool, &str)> {
    if let Some(rest) = url.strip_prefix("rediss") {
        Some((true, rest))
    } else {
        url.strip_prefix("redis").map(|rest| (false, rest))
    }
}

impl Target {
    /// Parses a URL of any mode; a `rediss` scheme uses the installed
    /// [`TlsSettings`] (the system's roots when none).
    pub fn parse(url: &str) -> Result<Self, Error> {
        Self::parse_with(url, None)
    }

    /// Parses a URL of any mode; a `rediss` scheme uses `tls` when given.
    pub fn parse_with(url: &str, tls: Option<TlsSettings>) -> Result<Self, Error> {
        let bad = |why: &str| Error::Url {
            url: redact(url),
            why: why.to_owned(),
        };
        let (on, rest) = tls_scheme(url).unwrap_or((false, url));
        // The process-wide settings go with whatever URL; ones given for
        // this URL say it was meant to be TLS.
        if tls.as_ref().is_some_and(TlsSettings::is_set) && !on {
            return Err(bad(
                "TLS settings are given for Redis but the URL is not TLS: use rediss://, \
                 rediss+sentinel:// or rediss+cluster://",
            ));
        }
        let tls = Tls::new(on, tls);
        if let Some(rest) = rest.strip_prefix(SENTINEL) {
            let parts = Authority::split(rest, 26379).map_err(|w| bad(&w))?;
            let mut path = parts.path.split('/').filter(|p| !p.is_empty());
            let master = path
                .next()
                .ok_or_else(|| bad("name the master after the Sentinel addresses: /<master>"))?;
            let db = match path.next() {
                Some(d) => d
                    .parse()
                    .map_err(|_| bad("the database after the master must be a number"))?,
                None => 0,
            };
            if path.next().is_some() {
                return Err(bad(
                    "expected /<master>[/<db>] after the Sentinel addresses",
                ));
            }
            let mut node = redis::RedisConnectionInfo::default().set_db(db);
            if let Some(u) = &parts.username {
                node = node.set_username(u);
            }
            if let Some(p) = &parts.password {
                node = node.set_password(p);
            }
            Ok(Self {
                kind: Kind::Sentinel(sentinel::Group::new(
                    parts.hosts,
                    master.to_owned(),
                    node,
                    tls,
                )),
                redacted: redact(url),
            })
        } else if let Some(rest) = rest.strip_prefix(CLUSTER) {
            let parts = Authority::split(rest, 6379).map_err(|w| bad(&w))?;
            if !parts.path.trim_matches('/').is_empty() && parts.path.trim_matches('/') != "0" {
                return Err(bad("a Redis Cluster has only database 0"));
            }
            Ok(Self {
                kind: Kind::Cluster {
                    nodes: parts.hosts,
                    username: parts.username,
                    password: parts.password,
                    tls,
                },
                redacted: redact(url),
            })
        } else {
            let client = tls.open(url).map_err(|e| bad(&e.to_string()))?;
            Ok(Self {
                kind: Kind::Single(client),
                redacted: redact(url),
            })
        }
    }

    /// Which way this Redis is deployed.
    pub fn mode(&self) -> Mode {
        match self.kind {
            Kind::Single(_) => Mode::Single,
            Kind::Sentinel(_) => Mode::Sentinel,
            Kind::Cluster { .. } => Mode::Cluster,
        }
    }

    /// A connection, opened now (an error if Redis does not answer).
    pub async fn connect(&self) -> Result<Conn, Error> {
        let conn = self.connect_lazy()?;
        conn.open().await?;
        Ok(conn)
    }

    /// A connection that opens on first use and reopens after a failure:
    /// a process that starts while Redis is down comes up, and its calls
    /// fail until Redis answers.
    pub fn connect_lazy(&self) -> Result<Conn, Error> {
        let inner = match &self.kind {
            Kind::Single(client) => Inner::Node(ConnectionManager::new_lazy_with_config(
                client.clone(),
                manager_config(),
            )?),
            Kind::Sentinel(group) => {
                Inner::Sentinel(Arc::new(sentinel::Follower::new(group.clone())))
            }
            Kind::Cluster { .. } => {
                Inner::Cluster(Arc::new(LazyCluster::new(self.cluster_builder().build()?)))
            }
        };
        Ok(Conn { inner })
    }

    pub(crate) fn cluster_builder(&self) -> ClusterClientBuilder {
        let Kind::Cluster {
            nodes,
            username,
            password,
            tls,
        } = &self.kind
        else {
            unreachable!("cluster_builder on a cluster target only")
        };
        let scheme = if tls.on { "rediss" } else { "redis" };
        let mut b = ClusterClientBuilder::new(nodes.iter().map(|n| format!("{scheme}://{n}")))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT);
        if let Some(certs) = tls.certs() {
            b = b.certs(certs);
        }
        if let Some(u) = username {
            b = b.username(u);
        }
        if let Some(p) = password {
            b = b.password(p);
        }
        b
    }

    /// A client of the node that takes writes now: the node itself, or the
    /// master the Sentinels name (asked now). Not for a Redis Cluster.
    pub async fn master_client(&self) -> Result<redis::Client, Error> {
        match &self.kind {
            Kind::Single(c) => Ok(c.clone()),
            Kind::Sentinel(group) => Ok(group.master_client().await?),
            Kind::Cluster { .. } => Err(Error::Url {
                url: self.redacted.clone(),
                why: "a Redis Cluster has no single master".into(),
            }),
        }
    }
}

/// What a Redis deployment looks like now, as its own nodes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One node, answering.
    Single,
    /// The master the Sentinels name (`host:port`), checked with `ROLE`.
    Sentinel { master: String },
    /// Masters serving slots, and how many of them answer (not flagged
    /// failing by the node asked).
    Cluster { masters: u32, answering: u32 },
}

impl Target {
    /// Asks Redis what it looks like now, within `limit`: the status's
    /// view of a Sentinel group or a Cluster.
    pub async fn topology(&self, limit: Duration) -> Result<Topology, Error> {
        let ask = async {
            match &self.kind {
                Kind::Single(c) => {
                    let mut conn = c.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await?;
                    Ok(Topology::Single)
                }
                Kind::Sentinel(_) => {
                    let client = self.master_client().await?;
                    Ok(Topology::Sentinel {
                        master: client.get_connection_info().addr().to_string(),
                    })
                }
                Kind::Cluster { .. } => {
                    let conn = self.connect_lazy()?;
                    let Inner::Cluster(c) = &conn.inner else {
                        unreachable!("a cluster target connects to a cluster")
                    };
                    let mut cluster = c.get().await?;
                    let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                    let nodes = cluster
                        .route_command(redis::cmd("CLUSTER").arg("NODES").to_owned(), any)
                        .await?
                        .extract_error()?;
                    let text: String = redis::from_redis_value(nodes).map_err(RedisError::from)?;
                    Ok(cluster_masters(&text))
                }
            }
        };
        tokio::time::timeout(limit, ask)
            .await
            .map_err(|_| Error::Url {
                url: self.redacted.clone(),
                why: format!("no answer within {limit:?}"),
            })?
    }
}

/// Masters with slots in a `CLUSTER NODES` reply, and those not failing.
fn cluster_masters(nodes: &str) -> Topology {
    let (mut masters, mut answering) = (0, 0);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(link)) = (fields.get(2), fields.get(7)) else {
            continue;
        };
        if !flags.split(',').any(|f| f == "master") || fields.len() < 9 {
            continue;
        }
        masters += 1;
        let failing = flags.split(',').any(|f| f == "fail" || f == "fail?");
        if !failing && *link == "connected" {
            answering += 1;
        }
    }
    Topology::Cluster { masters, answering }
}

/// A URL's authority split into credentials and `host:port` addresses.
struct Authority {
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<String>,
    path: String,
}

impl Authority {
    fn split(rest: &str, default_port: u16) -> Result<Self, String> {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, String::new()),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user)?;
                let pass = percent_decode(pass)?;
                (
                    Some(user).filter(|u| !u.is_empty()),
                    Some(pass).filter(|p| !p.is_empty()),
                )
            }
        };
        let hosts = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| host_port(h, default_port))
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.is_empty() {
            return Err("give at least one host:port".into());
        }
        Ok(Self {
            username,
            password,
            hosts,
            path,
        })
    }
}

/// `host:port` with the default port added when absent; `[v6]:port` kept.
fn host_port(h: &str, default_port: u16) -> Result<String, String> {
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let end = v6.find(']').ok_or_else(|| format!("{h:?}: unclosed ["))?;
        let port = v6[end + 1..].strip_prefix(':');
        (&h[..end + 2], port)
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{h:?}: no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("{h:?}: the port must be a number up to 65535"))?,
        None => default_port,
    };
    Ok(format!("{host}:{port}"))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a % in the credentials must start an escape like %40")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the credentials are not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        let t = Target::parse("redis://127.0.0.1:6379/2").unwrap();
        assert_eq!(t.mode(), Mode::Single);
        let t = Target::parse("redis+sentinel://a:26379,b,[::1]:26380/mymaster/3").unwrap();
        assert_eq!(t.mode(), Mode::Sentinel);
        let Kind::Sentinel(group) = &t.kind else {
            panic!("sentinel")
        };
        assert_eq!(group.sentinels, ["a:26379", "b:26379", "[::1]:26380"]);
        assert_eq!(group.master, "mymaster");
        assert_eq!(group.node.db(), 3);
        let t = Target::parse("redis+cluster://u:p%40ss@n1:7000,n2").unwrap();
        let Kind::Cluster {
            nodes,
            username,
            password,
            tls,
        } = &t.kind
        else {
            panic!("cluster")
        };
        assert!(!tls.on);
        assert_eq!(nodes, &["n1:7000", "n2:6379"]);
        assert_eq!(username.as_deref(), Some("u"));
        assert_eq!(password.as_deref(), Some("p@ss"));
        assert_eq!(t.to_string(), "redis+cluster://***@n1:7000,n2");
    }

    #[test]
    fn rediss_schemes_connect_over_tls() {
        let t = Target::parse("rediss://h:6380/1").unwrap();
        let Kind::Single(client) = &t.kind else {
            panic!("single")
        };
        assert!(matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls {
                insecure: false,
                ..
            }
        ));
        let t = Target::parse("rediss+sentinel://a:26379,b/m").unwrap();
        let Kind::Sentinel(group) = &t.kind else {
            panic!("sentinel")
        };
        assert!(group.tls.on);
        assert_eq!(group.sentinels, ["a:26379", "b:26379"]);
        let t = Target::parse("rediss+cluster://n1:7000").unwrap();
        let Kind::Cluster { tls, nodes, .. } = &t.kind else {
            panic!("cluster")
        };
        assert!(tls.on);
        assert_eq!(nodes, &["n1:7000"]);
        assert_eq!(t.to_string(), "rediss+cluster://n1:7000");
        let Kind::Sentinel(group) = Target::parse("redis+sentinel://a/m").unwrap().kind else {
            panic!("sentinel")
        };
        assert!(!group.tls.on);
    }

    #[test]
    fn a_ca_for_a_plain_url_is_refused() {
        let ca = pushcluster_core::tls::testing::TestCa::new("test CA");
        for url in ["redis://h", "redis+cluster://n1", "redis+sentinel://s/m"] {
            let e = Target::parse_with(
                url,
                Some(TlsSettings::trusting(ca.pem.clone().into_bytes())),
            )
            .err()
            .unwrap_or_else(|| panic!("{url} taken"))
            .to_string();
            assert!(e.contains("rediss://"), "{url}: {e}");
        }
        let t = Target::parse_with(
            "rediss+cluster://n1",
            Some(TlsSettings::trusting(ca.pem.into_bytes())),
        )
        .unwrap();
        assert_eq!(t.mode(), Mode::Cluster);
    }

    #[test]
    fn cluster_nodes_count_masters_with_slots_and_those_answering() {
        let nodes = "\
a 10.0.0.1:6379@16379 myself,master - 0 0 1 connected 0-5460
b 10.0.0.2:6379@16379 master,fail - 0 0 2 disconnected 5461-10922
c 10.0.0.3:6379@16379 master - 0 0 3 connected 10923-16383
d 10.0.0.4:6379@16379 slave a 0 0 1 connected
e 10.0.0.5:6379@16379 master - 0 0 0 connected
";
        assert_eq!(
            cluster_masters(nodes),
            Topology::Cluster {
                masters: 3,
                answering: 2
            }
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://a:26379", "name the master"),
            ("redis+sentinel://a:26379/m/x", "must be a number"),
            ("redis+cluster://", "at least one host"),
            ("redis+cluster://a:99999", "port"),
            ("redis+cluster://a/3", "only database 0"),
            ("redis+cluster://:%zz@a", "escape"),
            ("nope://x", "redis URL"),
        ] {
            let e = Target::parse(url).expect_err(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn passwords_join_and_leave_urls() {
        let url = pushcluster_core::ops::with_password("redis+sentinel://s1,s2/m", "p@ss:/w");
        assert_eq!(url, "redis+sentinel://:p%40ss%3A%2Fw@s1,s2/m");
        assert_eq!(redact(&url), "redis+sentinel://***@s1,s2/m");
        let Kind::Sentinel(group) = Target::parse(&url).unwrap().kind else {
            panic!("sentinel")
        };
        assert_eq!(group.node.password(), Some("p@ss:/w"));
        assert_eq!(
            pushcluster_core::ops::with_password("redis://admin:old@h:1/0", "new"),
            "redis://admin:new@h:1/0"
        );
    }
}
