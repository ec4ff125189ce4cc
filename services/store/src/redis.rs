//! The Redis backend.
//!
//! Per channel three keys share one hash tag, so they sit in one slot of a Redis
//! Cluster and one script updates them atomically: `<ns>:k:{<key>}:s` (the
//! sequence, an INCR counter), `<ns>:k:{<key>}:e` (its epoch: when it started)
//! and `<ns>:k:{<key>}:m` (a list of messages in mid
//! order, each `"<mid> <expires-at-ms> <payload>"`). The public channel uses
//! `<ns>:g:{all}:*`. A list, not a sorted set: a sorted-set score is a double,
//! the seed's precision problem; list positions follow from contiguous mids.
//! The list lives as long as its longest-lived message (and up to a quarter
//! of that message's life longer, see `APPEND`); the sequence and its
//! epoch as long as `idle_ttl` after the last append (and up to a quarter
//! longer).
//!
//! Every newly stored private message is also published, in the same script,
//! on its key's live channel (see [`live`]): the comets that hold connections
//! for the key subscribe to it. Publishing inside the script that assigns the
//! mid is what keeps delivery in mid order whoever stored the message: Redis
//! runs scripts one at a time and sends a subscriber its messages in the
//! order they were published. A store that waits for replicas
//! ([`RedisStore::durability`]) publishes after the wait instead, so that
//! nothing a failover can still lose reaches a client; comets put its
//! messages back in mid order from the store (`services/comet/src/live.rs`).

use crate::{
    now_ms, AppendOpts, Channel, Fence, Fetched, Page, Result, Retention, Seq, Store, StoreError,
    Stored,
};
use bytes::Bytes;
use pushcluster_redis::{Conn, Durability, Mode, Target};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use std::time::Duration;

// KEYS[4] is the fence: the shard's on one node, the key's own copy of it
// on a Redis Cluster (a script may touch one slot only), `"<shard> <token>"`
// with the shard in ARGV[13], compared only within one shard (a key that a
// reshard moved answers to its new shard's tokens) and kept as long as the
// sequence. ARGV[12] is the
// publish command: SPUBLISH on a Redis Cluster (sharded pub/sub: the
// message goes to the key's slot's node only), PUBLISH elsewhere; an empty
// ARGV[9] publishes nothing (the writer publishes after WAIT instead). A
// repeated push id returns its mid and, when ARGV[14] is set (the writer
// waits for replicas), its stored entry (empty once trimmed), for the
// writer to publish (the first writer may have failed between its WAIT and
// its publish), after writing its id again: the WAIT that follows on this
// connection then covers the first attempt's write, which came before it
// in the replication stream, whichever connection made it. ARGV[15] set:
// the push id is used for the first time (`AppendOpts::first_use`), so
// the lookup is skipped; it is recorded all the same. Not on a Redis
// Cluster: its client sends a command again by itself after a broken
// connection or a timeout, when the first sending may have run, and only
// the lookup makes that second run return the first mid.
// A new sequence (mid 1) gets a new epoch, ARGV[3] (now, in ms), kept as
// long as the sequence; so does a sequence older than epochs at its next
// append. The sequence and its epoch live `idle_ttl` (ARGV[5]) and a
// quarter more after an append, renewed together once less than `idle_ttl`
// and an eighth is left (every eighth of `idle_ttl`, on a busy key): one
// PTTL per append rather than two PEXPIREs. A writer of a release before
// this one sets exactly `idle_ttl`, below the renewal mark, so the next
// append here renews both (and gives an older sequence its epoch) whatever
// came between. The list's life is extended past its newest message's by
// a quarter of that message's (at most an hour), so that the pushes to a
// key in that time skip the PEXPIRE (one command less in the replication
// stream and the AOF too); readers skip expired entries, so a list
// outliving its messages only holds memory a little longer. Fences are
// compared as 20-digit strings: Lua numbers are doubles, exact only to
// 2^53. A refused append returns -1 and the fence in force. Every
// redis.call costs the script a round through Redis's command dispatch, so
// there are as few as the semantics allow (RPUSH's reply is the length; the
// expiry, an integer string, is concatenated rather than formatted). Numbers
// go to redis.call as strings made with '%d': Lua turns a number argument
// into one with '%.14g', the C library's floating-point printing (1–2 % of
// Redis's samples in S3).
const APPEND: &str = r"
if ARGV[8] ~= '' and ARGV[13] ~= '' then
  local cur = redis.call('GET', KEYS[4])
  local shard, token
  if cur then shard, token = string.match(cur, '^(%d+) (%d+)$') end
  if shard == ARGV[13] and token > ARGV[8] then return {-1, token, ''} end
  if shard ~= ARGV[13] or ARGV[8] > token then
    redis.call('SET', KEYS[4], ARGV[13] .. ' ' .. ARGV[8], 'PX', ARGV[5])
  end
elseif ARGV[8] ~= '' then
  local cur = redis.call('GET', KEYS[4])
  if cur and cur > ARGV[8] then return {-1, cur, ''} end
  if not cur or ARGV[8] > cur then redis.call('SET', KEYS[4], ARGV[8]) end
end
if ARGV[6] ~= '' and ARGV[15] == '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local entry = ''
    if ARGV[14] ~= '' then
      redis.call('SET', KEYS[3], seen, 'PX', ARGV[7])
      local head = redis.call('LINDEX', KEYS[2], 0)
      if head then
        local at = tonumber(seen) - tonumber(string.match(head, '^(%d+) '))
        if at >= 0 then entry = redis.call('LINDEX', KEYS[2], at) or '' end
      end
    end
    return {tonumber(seen), '', entry}
  end
end
local mid = redis.call('INCR', KEYS[1])
local life = tonumber(ARGV[5])
if mid == 1 or redis.call('PTTL', KEYS[1]) < life + math.floor(life / 8) then
  local keep = string.format('%d', life + math.floor(life / 4))
  redis.call('PEXPIRE', KEYS[1], keep)
  if mid == 1 or redis.call('PEXPIRE', KEYS[5], keep) == 0 then
    redis.call('SET', KEYS[5], ARGV[3], 'PX', keep)
  end
end
local m = string.format('%d', mid)
local head = m .. ' '
local len = redis.call('RPUSH', KEYS[2], head .. ARGV[2] .. ' ' .. ARGV[1])
local keep = tonumber(ARGV[4])
if len > keep then redis.call('LTRIM', KEYS[2], len - keep, -1) end
local want = tonumber(ARGV[2]) - tonumber(ARGV[3])
if redis.call('PTTL', KEYS[2]) < want then
  redis.call('PEXPIRE', KEYS[2], string.format('%d', want + math.min(math.floor(want / 4), 3600000)))
end
if ARGV[6] ~= '' then redis.call('SET', KEYS[3], m, 'PX', ARGV[7]) end
if ARGV[9] ~= '' then
  local signed = head
  if ARGV[10] ~= '' then
    local sig = redis.sha1hex(ARGV[11] .. redis.sha1hex(ARGV[10] .. ARGV[9] .. ' ' .. head .. ARGV[1]))
    signed = head .. 's' .. sig .. ' '
  end
  redis.call(ARGV[12], ARGV[9], signed .. ARGV[1])
end
return {mid, '', ''}
";

// Raises a shard's fence (20-digit strings, as in APPEND) and returns the
// fence in force.
const RAISE_FENCE: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur or ARGV[1] > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return cur
";

// A page of entries after mid ARGV[1]: at most ARGV[2] of them and, past
// the first, no more than ARGV[3] payload bytes in all; with the sequence's
// last mid and epoch, read in the same step (as strings: exact). Read in LRANGE
// chunks sized by the entries seen so far, so a backlog of large messages
// costs Redis one page's worth of reading, not the whole list (a 1,000-entry
// LRANGE of 60 KiB messages was 60 MB for one 2 MiB page). Entries are
// `"<mid> <expiry> <payload>"`; the expiry is checked by the caller, which
// also hears whether more follow.
const FETCH: &str = r"
local last = redis.call('GET', KEYS[2]) or ''
local epoch = redis.call('GET', KEYS[3]) or ''
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then return {0, {}, last, epoch} end
local first = tonumber(string.match(head, '^(%d+) '))
local start = tonumber(ARGV[1]) - first + 1
if start < 0 then start = 0 end
local want = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local out = {}
local bytes = 0
local chunk = 16
while true do
  local got = redis.call('LRANGE', KEYS[1], start, start + chunk - 1)
  for _, e in ipairs(got) do
    local h = string.find(e, ' ', string.find(e, ' ', 1, true) + 1, true)
    local size = #e - h
    if #out > 0 and (#out >= want or bytes + size > budget) then return {1, out, last, epoch} end
    out[#out + 1] = e
    bytes = bytes + size
  end
  if #got < chunk then return {0, out, last, epoch} end
  start = start + #got
  local avg = math.max(1, math.floor(bytes / #out))
  chunk = math.max(1, math.min(want - #out + 1, math.floor((budget - bytes) / avg) + 1, 1024))
end
";

// Made once per process: a Script hashes its source when made.
static APPEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND));
static FETCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FETCH));
static RAISE_FENCE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RAISE_FENCE));

/// Storing pushes straight into the cluster's Redis (web and comets), in
/// the message service's keys: see the module docs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "snake_case", deny_unknown_fields)]
pub struct DirectStore {
    /// `redis://host:port/db` of the message store; unset, pushes are
    /// stored through the message service (and web through the comets). Give a URL with a password
    /// through `PUSH_REDIS_URL` (a Secret), not the config file.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key: the message service's `redis_namespace`.
    pub redis_namespace: String,
    /// Backlog, sequence lifetime and dedupe window: the message service's.
    pub retention: Retention,
    /// Replicas that must have a push before it is acknowledged: the
    /// message service's `storage.redis_durability`.
    // Left out when default, so configs (and their hashes: pods roll on a
    // change) of clusters that do not set it stay as they were.
    #[serde(skip_serializing_if = "pushcluster_redis::Durability::is_master_only")]
    pub redis_durability: Durability,
}

impl DirectStore {
    /// The Redis URL, when one is set.
    pub fn url(&self) -> Option<&str> {
        self.redis_url.as_deref().filter(|u| !u.is_empty())
    }

    /// A lazily connected store for it, when a URL is set, signing live
    /// messages with a key derived from `live_secret` (the cluster's RPC
    /// token) when one is given.
    pub fn open(&self, live_secret: Option<&str>) -> Result<Option<RedisStore>> {
        self.url()
            .map(|url| {
                RedisStore::connect_lazy(url, &self.redis_namespace, self.retention.clone()).map(
                    |s| {
                        s.signing(live_secret.map(live::LiveKey::derive))
                            .durability(self.redis_durability)
                    },
                )
            })
            .transpose()
    }
}

impl Default for DirectStore {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_namespace: "pc".into(),
            retention: Retention::default(),
            redis_durability: Durability::default(),
        }
    }
}

/// Redis-backed store on one node, a Sentinel-watched master or a Redis
/// Cluster ([`pushcluster_redis::Target`]). Clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    target: std::sync::Arc<Target>,
    ns: String,
    retention: Retention,
    signing: Option<std::sync::Arc<live::LiveKey>>,
    durability: Durability,
}

impl RedisStore {
    /// Connects to `url` (any mode: see [`pushcluster_redis`]), prefixing
    /// every key with `ns`.
    pub async fn connect(url: &str, ns: &str, retention: Retention) -> Result<Self> {
        let target = Target::parse(url)?;
        let conn = target.connect().await?;
        Ok(Self::over(conn, target, ns, retention))
    }

    /// Connects to a parsed `target` (one that trusts a given CA, say),
    /// prefixing every key with `ns`.
    pub async fn connect_to(target: Target, ns: &str, retention: Retention) -> Result<Self> {
        let conn = target.connect().await?;
        Ok(Self::over(conn, target, ns, retention))
    }

    /// Like [`Self::connect`], but connects on first use and reconnects
    /// after a failure: a process that starts while Redis is down (a comet
    /// in a rollout, say) comes up, and its appends fail until Redis answers.
    pub fn connect_lazy(url: &str, ns: &str, retention: Retention) -> Result<Self> {
        let target = Target::parse(url)?;
        let conn = target.connect_lazy()?;
        Ok(Self::over(conn, target, ns, retention))
    }

    fn over(conn: Conn, target: Target, ns: &str, retention: Retention) -> Self {
        Self {
            conn,
            target: std::sync::Arc::new(target),
            ns: ns.to_owned(),
            retention,
            signing: None,
            durability: Durability::default(),
        }
    }

    /// Acknowledges an append only once `d.replicas` replicas have it.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Where Redis is: for subscribers of the same Redis (live feeds).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The connection, for what else lives in the same Redis.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    fn cluster(&self) -> bool {
        self.conn.mode() == Mode::Cluster
    }

    /// Publishes `payload`, stored as `mid`, on its key's live channel as
    /// the append script would have.
    async fn publish_live(&self, channel: &str, mid: i64, payload: &[u8]) -> Result<()> {
        let message = live::encode(self.live_key(), channel, mid, payload);
        let mut conn = self.conn.clone();
        // Sharded on a Cluster: the channel's hash tag routes it to the
        // key's master.
        redis::cmd(if self.cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        })
        .arg(channel)
        .arg(message)
        .query_async::<()>(&mut conn)
        .await?;
        Ok(())
    }

    /// Signs what it publishes on live channels with `key` (see
    /// [`live::LiveKey`]); without one, live messages go unsigned.
    pub fn signing(mut self, key: Option<live::LiveKey>) -> Self {
        self.signing = key.map(std::sync::Arc::new);
        self
    }

    /// The key live messages are signed with, if any.
    pub fn live_key(&self) -> Option<&live::LiveKey> {
        self.signing.as_deref()
    }

    /// Where each private key's sequence stands, in one round trip:
    /// pipelined GETs rather than an MGET, so each key can sit in its own
    /// slot of a Redis Cluster.
    /// On a Redis Cluster, one pipeline per hash slot, all in flight at once.
    pub async fn sequences<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Seq>> {
        let parts: Vec<(String, Vec<redis::Cmd>)> = keys
            .iter()
            .map(|k| {
                let (seq, _) = self.keys(Channel::Private(k.as_ref()));
                let cmds = vec![redis::Cmd::get(epoch_key(&seq)), redis::Cmd::get(&seq)];
                (seq, cmds)
            })
            .collect();
        let got = read_retrying(|| self.conn.query_parts::<Option<u64>>(&parts)).await?;
        Ok(got
            .chunks(2)
            .map(|pair| Seq {
                epoch: pair[0].unwrap_or_default(),
                last: pair.get(1).copied().flatten().unwrap_or_default() as i64,
            })
            .collect())
    }

    fn keys(&self, ch: Channel<'_>) -> (String, String) {
        let base = match ch {
            Channel::Private(k) => format!("{}:k:{{{k}}}", self.ns),
            Channel::Public => format!("{}:g:{{all}}", self.ns),
        };
        (format!("{base}:s"), format!("{base}:m"))
    }
}

/// The key of a sequence's epoch, beside the sequence `seq` (`...:s`) in
/// its hash slot.
fn epoch_key(seq: &str) -> String {
    format!("{}:e", &seq[..seq.len() - 2])
}

/// A sequence as the scripts return it: GET results, empty when missing.
fn parse_seq(last: &[u8], epoch: &[u8]) -> Result<Seq> {
    let num = |raw: &[u8], what: &str| -> Result<u64> {
        if raw.is_empty() {
            return Ok(0);
        }
        std::str::from_utf8(raw)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                StoreError::Corrupt(format!("{what} {:?}", String::from_utf8_lossy(raw)))
            })
    };
    Ok(Seq {
        last: num(last, "sequence")? as i64,
        epoch: num(epoch, "epoch")?,
    })
}

fn parse_entry(raw: &[u8]) -> Result<(i64, u64, Bytes)> {
    let mut parts = raw.splitn(3, |&b| b == b' ');
    let mut num = |what: &str| -> Result<u64> {
        parts
            .next()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("message entry without {what}")))
    };
    let mid = num("mid")? as i64;
    let expire_at = num("expiry")?;
    let payload = parts
        .next()
        .ok_or_else(|| StoreError::Corrupt("message entry without payload".into()))?;
    Ok((mid, expire_at, Bytes::copy_from_slice(payload)))
}

impl Store for RedisStore {
    /// One atomic script: check and raise the shard's fence, dedupe by push
    /// id (same hash tag, same slot), INCR the sequence, append, trim, extend
    /// the list's life. The fence is the shard's `<ns>:fence:{<shard>}` on
    /// one node; on a Redis Cluster, where a script touches one slot, it is
    /// the key's own copy `<ns>:k:{<key>}:f`, raised by the appends of each
    /// new holder: a superseded holder is refused on every key its successor
    /// has written, and its appends to other keys still get their mids from
    /// the one sequence (no key has two streams). With
    /// [`RedisStore::durability`], the append is acknowledged only once
    /// that many replicas confirm it.
    async fn append_with(
        &self,
        ch: Channel<'_>,
        payload: Bytes,
        ttl: Duration,
        opts: AppendOpts<'_>,
    ) -> Result<i64> {
        // The script skips deduplication for an empty id.
        let (push_id, fence) = (opts.push_id.unwrap_or_default(), opts.fence);
        let (seq, list) = self.keys(ch);
        let id_key = format!("{}:id:{push_id}", &seq[..seq.len() - 2]);
        let epoch = epoch_key(&seq);
        let cluster = self.cluster();
        let (fence_key, token) = match fence {
            Some(f) if cluster => (
                format!("{}:f", &seq[..seq.len() - 2]),
                format!("{:020}", f.token),
            ),
            Some(f) => (
                format!("{}:fence:{{{}}}", self.ns, f.shard),
                format!("{:020}", f.token),
            ),
            None if cluster => (format!("{}:f", &seq[..seq.len() - 2]), String::new()),
            None => (format!("{}:fence:{{none}}", self.ns), String::new()),
        };
        let live_channel = match ch {
            Channel::Private(key) => live::channel(&self.ns, key),
            Channel::Public => String::new(),
        };
        let publish = if cluster { "SPUBLISH" } else { "PUBLISH" };
        // Waiting for replicas, the script publishes nothing: a message
        // published before they confirm it could be delivered, then lost in
        // a failover, and the retried push would get its mid again, the
        // key's clients told to reset. The writer publishes it after WAIT.
        let durable = self.durability.waits();
        let late = durable && !live_channel.is_empty();
        let now = now_ms();
        let script = |eval: bool| {
            let mut c = redis::cmd(if eval { "EVAL" } else { "EVALSHA" });
            c.arg(if eval {
                APPEND
            } else {
                APPEND_SCRIPT.get_hash()
            })
            .arg(5)
            .arg(&seq)
            .arg(&list)
            .arg(&id_key)
            .arg(&fence_key)
            .arg(&epoch)
            .arg(payload.as_ref())
            .arg(now.saturating_add(ttl.as_millis() as u64))
            .arg(now)
            .arg(self.retention.max_backlog.max(1))
            .arg(self.retention.idle_ttl_seconds.saturating_mul(1000).max(1))
            .arg(push_id)
            .arg(
                self.retention
                    .dedupe_window_seconds
                    .saturating_mul(1000)
                    .max(1),
            )
            .arg(&token)
            .arg(if late { "" } else { live_channel.as_str() })
            .arg(self.signing.as_ref().map_or("", |k| k.inner.as_str()))
            .arg(self.signing.as_ref().map_or("", |k| k.outer.as_str()))
            .arg(publish)
            .arg(match fence {
                Some(f) if cluster => f.shard.to_string(),
                _ => String::new(),
            })
            .arg(if durable { "1" } else { "" })
            .arg(if opts.first_use && !cluster { "1" } else { "" });
            c
        };
        // The script and its WAIT in one pipeline: see
        // `Conn::write_confirmed`. A node that has not seen the script yet
        // gets its body once.
        let seq_key = seq.as_str();
        let run = |eval: bool| {
            let cmd = script(eval);
            async move {
                self.conn
                    .write_confirmed(seq_key, vec![cmd], &self.durability)
                    .await
            }
        };
        let replies = match run(false).await {
            Err(pushcluster_redis::Error::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                run(true).await?
            }
            r => r?,
        };
        let reply = replies
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt("no reply to the append".into()))?;
        let (mid, current, entry): (i64, String, Vec<u8>) =
            redis::from_redis_value(reply.extract_error()?).map_err(redis::RedisError::from)?;
        match fence {
            Some(f) if mid < 0 => Err(StoreError::Fenced {
                shard: f.shard,
                token: f.token,
                current: current.parse().unwrap_or(u64::MAX),
            }),
            _ => {
                if late {
                    // A repeated push id publishes what was stored under it
                    // (an earlier attempt may have failed before
                    // publishing); comets drop a mid they delivered.
                    let stored = match entry.as_slice() {
                        [] => Some(payload),
                        raw => parse_entry(raw)
                            .ok()
                            .filter(|(m, expire_at, _)| *m == mid && *expire_at > now_ms())
                            .map(|(_, _, p)| p),
                    };
                    if let Some(p) = stored {
                        self.publish_live(&live_channel, mid, &p).await?;
                    }
                }
                Ok(mid)
            }
        }
    }

    async fn fetch_page(&self, ch: Channel<'_>, after: i64, page: Page) -> Result<Fetched> {
        let (seq, list) = self.keys(ch);
        let epoch = epoch_key(&seq);
        let read = || {
            let mut conn = self.conn.clone();
            let mut call = FETCH_SCRIPT.key(&list);
            call.key(&seq).key(&epoch);
            call.arg(after.max(0))
                .arg(page.messages.max(1))
                // Lua numbers are doubles: keep the budget exact.
                .arg(page.bytes.min(1 << 50));
            async move {
                call.invoke_async::<(i64, Vec<Vec<u8>>, Vec<u8>, Vec<u8>)>(&mut conn)
                    .await
            }
        };
        let (more, raw, last, epoch) = read_retrying(read).await?;
        let now = now_ms();
        let mut out = Fetched {
            messages: Vec::with_capacity(raw.len()),
            more: more != 0,
            seq: parse_seq(&last, &epoch)?,
        };
        for r in raw {
            let (mid, expire_at, payload) = parse_entry(&r)?;
            if mid > after && expire_at > now {
                out.messages.push(Stored { mid, payload });
            }
        }
        Ok(out)
    }

    async fn raise_fence(&self, fence: Fence) -> Result<u64> {
        let key = format!("{}:fence:{{{}}}", self.ns, fence.shard);
        let mut conn = self.conn.clone();
        let current: String = RAISE_FENCE_SCRIPT
            .key(key)
            .arg(format!("{:020}", fence.token))
            .invoke_async(&mut conn)
            .await?;
        current
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("fence {current:?}")))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let (_, list) = self.keys(Channel::Private(key));
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(list).await?;
        Ok(())
    }

    async fn sequence(&self, ch: Channel<'_>) -> Result<Seq> {
        let (seq, _) = self.keys(ch);
        let epoch = epoch_key(&seq);
        let read = || {
            let mut conn = self.conn.clone();
            let (seq, epoch) = (seq.clone(), epoch.clone());
            async move { conn.mget::<_, Vec<Option<Vec<u8>>>>(&[seq, epoch]).await }
        };
        let got = read_retrying(read).await?;
        let part = |i: usize| got.get(i).cloned().flatten().unwrap_or_default();
        parse_seq(&part(0), &part(1))
    }
}

/// Runs a read, once more if the connection it went out on had been
/// dropped (Redis restarted, a proxy or `CLIENT KILL` cut it): the
/// connection manager reconnects only after a call fails, and a read is
/// safe to repeat, so a reader never sees that first failure.
async fn read_retrying<T, F, Fut>(read: F) -> redis::RedisResult<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    match read().await {
        Err(e) if e.is_connection_dropped() || e.is_io_error() => read().await,
        r => r,
    }
}

pub mod live;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse() {
        let (mid, exp, p) = parse_entry(b"12 3456 {\"a\": \"b c\"}").unwrap();
        assert_eq!((mid, exp, p.as_ref()), (12, 3456, &b"{\"a\": \"b c\"}"[..]));
        assert!(parse_entry(b"12").is_err());
        assert!(parse_entry(b"x 1 {}").is_err());
    }
}
