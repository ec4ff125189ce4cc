//! Following the master that Redis Sentinels name.
//!
//! A connection manager reconnects to the address it was made for; after a
//! failover that address is a replica (writes answer `READONLY`) or gone.
//! So the follower keeps one manager for the master it last resolved, drops
//! it on the first error that says the master moved or went away
//! ([`crate::lost_master`]), and asks the Sentinels again on the next call.
//! The call that saw the error fails (its caller retries, with its push id);
//! the ones after it reach the new master as soon as the Sentinels name it.
//!
//! An old master that is still up answers no error: it keeps taking writes
//! until the Sentinels turn it into a replica, which they do only when they
//! next look at it (10 s later in the tests), and then its writes are gone
//! and its subscribers hear nothing from the new master. So the follower
//! and every subscription also listen to the Sentinels' own announcement
//! of a failover (`+switch-master`, on each Sentinel's pub/sub) and move to
//! the new master the moment it is made, as Jedis's and Lettuce's Sentinel
//! pools do ([`Group::switches`]). The announced master is also the first
//! one tried afterwards: the other Sentinels learn of the failover from its
//! leader a second or two later, and until then name the old master, which
//! answers `ROLE` as a master too.
//!
//! `+switch-master` comes only once every replica was re-pointed at the new
//! master; until a replica takes its `REPLICAOF`, it still replicates the
//! old master. An old master that comes back in that time (a stalled one,
//! let go) takes the writes queued to it and a replica confirms their
//! `WAIT`, and then the replica resyncs from the new master and they are
//! gone (CI saw 5 acknowledged mids reused, `WAIT 1` with two replicas).
//! So the leader's earlier `+selected-slave` (the replica it chose, just
//! before `REPLICAOF NO ONE`) and `+promoted-slave` (the replica answers as
//! a master, which the leader sees only at its next `INFO`, up to a second
//! later) count as announcements too: the writers leave the old master at
//! the selection and wait for the replica to answer as a master. An answer
//! that arrives from an old master after an announcement named another is
//! not trusted: the call fails as `MASTERDOWN`, and its caller retries on
//! the new master (a push under its push id, which the new master may not
//! have).

mod announce;
mod follower;

pub(crate) use follower::Follower;

use crate::tls::Tls;
use crate::CONNECT_TIMEOUT;
use futures::StreamExt;
use redis::{RedisConnectionInfo, RedisResult, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the Sentinels are waited for once the first has answered: a
/// Sentinel that is down (or slow) costs a resolution this, not a timeout.
const STRAGGLERS: Duration = Duration::from_millis(250);

/// How long a replica announced as selected is waited for to answer as a
/// master (the leader tells it within a tick, 100 ms, of selecting it), and
/// how often it is asked meanwhile.
const PROMOTION_WAIT: Duration = Duration::from_secs(3);
const PROMOTION_POLL: Duration = Duration::from_millis(20);

/// A Sentinel-watched group as a target names it; clones share what was
/// heard of its failovers.
#[derive(Clone)]
pub(crate) struct Group {
    /// The Sentinels' addresses (`host:port`).
    pub(crate) sentinels: Vec<String>,
    /// The master's name.
    pub(crate) master: String,
    /// How to talk to the data nodes (credentials, database).
    pub(crate) node: RedisConnectionInfo,
    /// Plain or TLS, to the Sentinels and the data nodes alike.
    pub(crate) tls: Tls,
    /// The master the last announcement (`+promoted-slave`,
    /// `+switch-master`) named.
    announced: Arc<Mutex<Option<String>>>,
}

/// What one Sentinel says of the master: where it is, under which
/// configuration epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) epoch: u64,
}

/// Reads a `SENTINEL MASTER <name>` reply (field, value, ...).
fn named(fields: &HashMap<String, String>) -> Option<Named> {
    Some(Named {
        host: fields.get("ip")?.clone(),
        port: fields.get("port")?.parse().ok()?,
        epoch: fields
            .get("config-epoch")
            .and_then(|e| e.parse().ok())
            .unwrap_or(0),
    })
}

/// The masters the Sentinels name, in the order to try them: the newest
/// configuration first and, within one, the address most Sentinels name
/// (a Sentinel that voted in a failover may show its epoch before its new
/// address); each address once.
pub(crate) fn candidates(answers: &[Named]) -> Vec<Named> {
    let mut votes: HashMap<(&str, u16, u64), usize> = HashMap::new();
    for n in answers {
        *votes.entry((&n.host, n.port, n.epoch)).or_default() += 1;
    }
    let mut ranked: Vec<(&Named, usize)> = Vec::new();
    for n in answers {
        if !ranked.iter().any(|(r, _)| r == &n) {
            ranked.push((n, votes[&(n.host.as_str(), n.port, n.epoch)]));
        }
    }
    ranked.sort_by(|(a, va), (b, vb)| b.epoch.cmp(&a.epoch).then(vb.cmp(va)));
    let mut out: Vec<Named> = Vec::new();
    for (n, _) in ranked {
        if !out.iter().any(|o| o.host == n.host && o.port == n.port) {
            out.push(n.clone());
        }
    }
    out
}

async fn ask_sentinel(sentinel: &str, master: &str, tls: &Tls) -> RedisResult<Named> {
    let client = tls.client_of_addr(sentinel)?;
    let asked = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(master)
            .query_async::<HashMap<String, String>>(&mut conn)
            .await
    };
    let fields = tokio::time::timeout(CONNECT_TIMEOUT, asked)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    named(&fields).ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "a Sentinel's SENTINEL MASTER reply without ip and port",
        ))
    })
}

/// Whether the node behind `client` answers as a master within
/// [`PROMOTION_WAIT`]: a replica just selected is waited for, since the
/// Sentinels still name the old master, which may be up and would take
/// writes that the new one never gets.
async fn answers_as_master(client: &redis::Client) -> bool {
    let until = tokio::time::Instant::now() + PROMOTION_WAIT;
    loop {
        match role(client).await {
            Some(Role::Master) => return true,
            Some(Role::Replica) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(PROMOTION_POLL).await;
            }
            _ => return false,
        }
    }
}

/// What a node answers to `ROLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Master,
    Replica,
}

/// The role the node behind `client` answers, `None` if it does not.
async fn role(client: &redis::Client) -> Option<Role> {
    let asked = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("ROLE")
            .query_async::<Vec<Value>>(&mut conn)
            .await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, asked).await {
        Ok(Ok(r)) => match r.first() {
            Some(Value::BulkString(b)) if b == b"master" => Some(Role::Master),
            Some(Value::BulkString(b)) if b == b"slave" => Some(Role::Replica),
            _ => None,
        },
        _ => None,
    }
}

/// The address (`host:port`) of a node a client is for.
pub(crate) fn address(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// Whether two `host:port` addresses name the same node (an IPv6 host may
/// come with brackets or without).
pub(crate) fn same_addr(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.replace(['[', ']'], "");
    norm(a) == norm(b)
}

/// Splits `host:port` (an IPv6 host in brackets).
pub(crate) fn host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port.parse().ok()?,
    ))
}

impl Group {
    pub(crate) fn new(
        sentinels: Vec<String>,
        master: String,
        node: RedisConnectionInfo,
        tls: Tls,
    ) -> Self {
        Self {
            sentinels,
            master,
            node,
            tls,
            announced: Arc::default(),
        }
    }

    fn client_of(&self, host: String, port: u16) -> RedisResult<redis::Client> {
        self.tls.client(host, port, self.node.clone())
    }

    /// A client of the master now: the one last announced once it answers
    /// as a master (see [`answers_as_master`]), else the first the
    /// Sentinels name (see [`candidates`]) that does. Every Sentinel is
    /// asked, and those that have not answered [`STRAGGLERS`] after the
    /// first are not waited for.
    pub(crate) async fn master_client(&self) -> RedisResult<redis::Client> {
        let announced = self.announced.lock().ok().and_then(|a| a.clone());
        if let Some((host, port)) = announced.as_deref().and_then(host_port) {
            let client = self.client_of(host, port)?;
            if answers_as_master(&client).await {
                return Ok(client);
            }
            // Not promoted (the failover was aborted) or gone: the
            // Sentinels' word stands, and the announcement is not tried
            // first again.
            if let Ok(mut a) = self.announced.lock() {
                if *a == announced {
                    *a = None;
                }
            }
        }
        let mut asked: futures::stream::FuturesUnordered<_> = self
            .sentinels
            .iter()
            .map(|s| ask_sentinel(s, &self.master, &self.tls))
            .collect();
        let mut answers = Vec::new();
        let mut last_error = None;
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let next = match grace.as_mut() {
                Some(g) => tokio::select! {
                    a = asked.next() => a,
                    () = g => None,
                },
                None => asked.next().await,
            };
            match next {
                Some(Ok(n)) => {
                    answers.push(n);
                    if grace.is_none() {
                        grace = Some(Box::pin(tokio::time::sleep(STRAGGLERS)));
                    }
                }
                Some(Err(e)) => last_error = Some(e),
                None => break,
            }
        }
        for n in candidates(&answers) {
            let client = self.client_of(n.host, n.port)?;
            if role(&client).await == Some(Role::Master) {
                return Ok(client);
            }
        }
        Err(last_error.unwrap_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "no Sentinel names a master of this name that answers as one",
            ))
        }))
    }

    /// The new master's address each time one of the Sentinels announces
    /// that the master failed over (also kept as the one to try first).
    /// Each Sentinel is listened to on its own connection, reconnected when
    /// it drops (a Sentinel may be down while the others carry on); so a
    /// failover usually comes once per Sentinel. The listeners stop when
    /// the receiver is dropped.
    pub(crate) fn switches(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        for s in &self.sentinels {
            tokio::spawn(announce::listen(s.clone(), self.clone(), tx.clone()));
        }
        rx
    }

    /// Keeps `to` as the master to try first.
    fn heard(&self, to: &str) {
        if let Ok(mut a) = self.announced.lock() {
            *a = Some(to.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(host: &str, port: u16, epoch: u64) -> Named {
        Named {
            host: host.into(),
            port,
            epoch,
        }
    }

    #[test]
    fn the_newest_configuration_comes_first_and_each_address_once() {
        // Two Sentinels still name the old master (epoch 0); the leader of
        // the failover already names the new one (epoch 1).
        let answers = vec![named("a", 1, 0), named("b", 2, 1), named("a", 1, 0)];
        assert_eq!(
            candidates(&answers),
            vec![named("b", 2, 1), named("a", 1, 0)]
        );
        assert!(candidates(&[]).is_empty());
        // A Sentinel that voted shows the new epoch with the old address
        // until it hears the new one: most Sentinels decide the tie.
        let answers = vec![named("a", 1, 1), named("b", 2, 1), named("b", 2, 1)];
        assert_eq!(
            candidates(&answers),
            vec![named("b", 2, 1), named("a", 1, 1)]
        );
    }

    #[test]
    fn a_sentinel_master_reply_gives_address_and_epoch() {
        let reply: std::collections::HashMap<String, String> = [
            ("name", "pcmaster"),
            ("ip", "10.0.0.2"),
            ("port", "6380"),
            ("config-epoch", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(super::named(&reply), Some(named("10.0.0.2", 6380, 3)));
        let mut no_port = reply.clone();
        no_port.remove("port");
        assert_eq!(super::named(&no_port), None);
    }

    #[test]
    fn addresses_compare_with_or_without_brackets() {
        assert!(same_addr("[::1]:6380", "::1:6380"));
        assert_eq!(host_port("[::1]:6380"), Some(("::1".into(), 6380)));
        assert_eq!(host_port("10.0.0.1:6380"), Some(("10.0.0.1".into(), 6380)));
        assert_eq!(host_port("nope"), None);
        assert!(same_addr("127.0.0.1:6380", "127.0.0.1:6380"));
        assert!(!same_addr("127.0.0.1:6380", "127.0.0.1:6381"));
    }
}
