//! Redis leases, for a cluster of plain processes (no Kubernetes).
//!
//! Shard k's lease is the key `<ns>:lease:{k}` holding `"<token> <candidate
//! JSON>"` with a PX expiry, set only if absent; `<ns>:lease:{k}:fence` counts
//! acquisitions and gives the fencing token. Renew and release compare the
//! whole stored value, so only the holder of that very acquisition can extend
//! or drop it. Expiry is judged by the Redis server's clock alone. Acquire and
//! release publish on `<ns>:leases`, so standbys and routers react at once.
//!
//! Any mode [`pushcluster_redis`] reaches works: on a Redis Cluster each
//! shard's two keys share its hash tag, and `PUBLISH` reaches every node;
//! behind Sentinels the leases follow the master (a failover that loses
//! the last writes may shorten a lease, never hand one shard to two
//! holders at once beyond what the lost write allowed: use WAIT-grade
//! durability for the store, and leases long enough to cover a failover).

use crate::{Candidate, Error, Held, LeaseBackend, LeaseRecord, Result};
use futures::StreamExt;
use pushcluster_redis::{Conn, Event, Subscriber, Target};
use redis::Script;
use std::time::Duration;

const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local t = redis.call('INCR', KEYS[2])
local v = string.format('%d ', t) .. ARGV[1]
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], 'acquired')
return v
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
  return 1
end
return 0
";

/// Leases in one Redis.
pub struct RedisLeases {
    conn: Conn,
    ns: String,
    acquire: Script,
    renew: Script,
    release: Script,
    events: crate::LeaseEvents,
    /// The earliest expiry of a lease the last snapshot found held.
    next_expiry: std::sync::Mutex<Option<tokio::time::Instant>>,
    _listener: tokio::task::JoinHandle<()>,
}

impl RedisLeases {
    /// Connects to `url` (any mode: see [`pushcluster_redis`]); keys are
    /// prefixed with `ns`.
    pub async fn connect(url: &str, ns: &str) -> Result<Self> {
        let target = Target::parse(url)?;
        let conn = target.connect().await?;
        let events = crate::LeaseEvents::default();
        let channel = format!("{ns}:leases");
        let listener = tokio::spawn(listen(target, channel, events.clone()));
        Ok(Self {
            conn,
            ns: ns.to_owned(),
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            events,
            next_expiry: std::sync::Mutex::new(None),
            _listener: listener,
        })
    }

    fn key(&self, shard: u32) -> String {
        format!("{}:lease:{{{shard}}}", self.ns)
    }

    fn channel(&self) -> String {
        format!("{}:leases", self.ns)
    }
}

impl Drop for RedisLeases {
    fn drop(&mut self) {
        self._listener.abort();
    }
}

/// Announces every lease event on `events`; reconnects when the connection drops.
async fn listen(target: Target, channel: String, events: crate::LeaseEvents) {
    loop {
        match Subscriber::connect(&target, false).await {
            Ok((mut handle, mut stream)) => {
                if handle.subscribe(vec![channel.clone()]).await.is_ok() {
                    while let Some(e) = stream.next().await {
                        if let Event::Message(_) = e {
                            events.notify();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease event subscription failed"),
        }
        // Whatever happened meanwhile, let waiters look again.
        events.notify();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn parse(shard: u32, raw: &str) -> Result<LeaseRecord> {
    let (token, json) = raw
        .split_once(' ')
        .ok_or_else(|| Error::Corrupt(raw.to_owned()))?;
    Ok(LeaseRecord {
        shard,
        token: token.parse().map_err(|_| Error::Corrupt(raw.to_owned()))?,
        candidate: serde_json::from_str(json).map_err(|e| Error::Corrupt(e.to_string()))?,
    })
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl LeaseBackend for RedisLeases {
    async fn try_acquire(&self, shard: u32, me: &Candidate, ttl: Duration) -> Result<Option<Held>> {
        let json = serde_json::to_string(me).map_err(|e| Error::Corrupt(e.to_string()))?;
        let mut conn = self.conn.clone();
        let raw: Option<String> = self
            .acquire
            .key(self.key(shard))
            .key(format!("{}:fence", self.key(shard)))
            .arg(json)
            .arg(ms(ttl))
            .arg(self.channel())
            .invoke_async(&mut conn)
            .await?;
        match raw {
            None => Ok(None),
            Some(raw) => Ok(Some(Held {
                record: parse(shard, &raw)?,
                raw,
            })),
        }
    }

    async fn renew(&self, held: &Held, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let ok: i64 = self
            .renew
            .key(self.key(held.record.shard))
            .arg(&held.raw)
            .arg(ms(ttl))
            .invoke_async(&mut conn)
            .await?;
        Ok(ok == 1)
    }

    async fn release(&self, held: &Held) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(self.key(held.record.shard))
            .arg(&held.raw)
            .arg(self.channel())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn snapshot(&self, shards: u32) -> Result<Vec<Option<LeaseRecord>>> {
        if shards == 0 {
            return Ok(Vec::new());
        }
        let parts: Vec<(String, Vec<redis::Cmd>)> = (0..shards)
            .map(|k| {
                let key = self.key(k);
                let cmds = vec![redis::Cmd::get(&key), redis::Cmd::pttl(&key)];
                (key, cmds)
            })
            .collect();
        let replies: Vec<redis::Value> = self.conn.query_parts(&parts).await?;
        let raws: Vec<(Option<String>, i64)> = replies
            .chunks(2)
            .map(|pair| match pair {
                [raw, ttl] => Ok((
                    redis::from_redis_value_ref(raw).map_err(redis::RedisError::from)?,
                    redis::from_redis_value_ref(ttl).map_err(redis::RedisError::from)?,
                )),
                _ => Err(Error::Corrupt(
                    "a lease snapshot reply was cut short".into(),
                )),
            })
            .collect::<Result<_>>()?;
        // Counted from the reply, so at most a round trip late: a standby
        // waking then finds the key gone, never still held.
        let now = tokio::time::Instant::now();
        let first = raws
            .iter()
            .filter(|(raw, ttl)| raw.is_some() && *ttl > 0)
            .map(|(_, ttl)| now + Duration::from_millis(*ttl as u64))
            .min();
        *self.next_expiry.lock().unwrap_or_else(|e| e.into_inner()) = first;
        raws.into_iter()
            .enumerate()
            .map(|(k, (raw, _))| raw.map(|r| parse(k as u32, &r)).transpose())
            .collect()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        *self.next_expiry.lock().unwrap_or_else(|e| e.into_inner())
    }
}
