//! Following the master that Redis Sentinels name.
//!
//! A connection manager reconnects to the address it was made for; after a
//! failover that address is a replica (writes answer `READONLY`) or gone.
//! So the follower keeps one manager for the master it last resolved, drops
//! it on the first error that says the master moved or went away
//! ([`crate::lost_master`]), and asks the Sentinels again on the next call.
//! The call that saw the error fails (its caller retries, with its push id);
//! the ones after it reach the new master as soon as the Sentinels name it.

use crate::{lost_master, manager_config};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, RedisConnectionInfo, RedisResult, Value};
use std::sync::Mutex;

/// The master of one Sentinel-watched group, followed across failovers.
pub(crate) struct Follower {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The manager for the master resolved last, with a generation so an
    /// error on an older one does not drop a newer one.
    current: Mutex<Option<(u64, ConnectionManager)>>,
    generation: std::sync::atomic::AtomicU64,
    master: Mutex<Option<String>>,
    db: i64,
}

fn client(
    sentinels: &[String],
    master: &str,
    node: &RedisConnectionInfo,
) -> RedisResult<SentinelClient> {
    SentinelClient::build(
        sentinels
            .iter()
            .map(|s| format!("redis://{s}"))
            .collect::<Vec<_>>(),
        master.to_owned(),
        Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node.clone())),
        SentinelServerType::Master,
    )
}

/// A client of the master the Sentinels name now.
pub(crate) async fn master_client(
    sentinels: &[String],
    master: &str,
    node: &RedisConnectionInfo,
) -> RedisResult<redis::Client> {
    client(sentinels, master, node)?.async_get_client().await
}

impl Follower {
    pub(crate) fn new(
        sentinels: &[String],
        master: &str,
        node: &RedisConnectionInfo,
    ) -> RedisResult<Self> {
        Ok(Self {
            sentinels: tokio::sync::Mutex::new(client(sentinels, master, node)?),
            current: Mutex::new(None),
            generation: Default::default(),
            master: Mutex::new(None),
            db: node.db(),
        })
    }

    pub(crate) fn db(&self) -> i64 {
        self.db
    }

    pub(crate) fn master(&self) -> Option<String> {
        self.master.lock().ok().and_then(|m| m.clone())
    }

    fn cached(&self) -> Option<(u64, ConnectionManager)> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// The manager for the current master, asking the Sentinels when there
    /// is none (one caller asks; the others wait for its answer).
    pub(crate) async fn conn(&self) -> RedisResult<(u64, ConnectionManager)> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut sentinels = self.sentinels.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let client = sentinels.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let manager = ConnectionManager::new_with_config(client, manager_config()).await?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::info!(master = %addr, "redis sentinel: following the master");
        if let Ok(mut m) = self.master.lock() {
            *m = Some(addr);
        }
        if let Ok(mut c) = self.current.lock() {
            *c = Some((generation, manager.clone()));
        }
        Ok((generation, manager))
    }

    fn failed(&self, generation: u64, e: &redis::RedisError) {
        if !lost_master(e) {
            return;
        }
        if let Ok(mut c) = self.current.lock() {
            if c.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::warn!(error = %e, "redis sentinel: the master moved or went away; asking the sentinels again");
                *c = None;
            }
        }
    }

    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.conn().await?;
        let r = conn.req_packed_command(cmd).await;
        if let Err(e) = &r {
            self.failed(generation, e);
        }
        r
    }

    pub(crate) async fn commands(
        &self,
        pipeline: &redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.conn().await?;
        let r = conn.req_packed_commands(pipeline, offset, count).await;
        if let Err(e) = &r {
            self.failed(generation, e);
        }
        r
    }
}
