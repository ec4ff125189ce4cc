//! Following the master across failovers: one connection manager for the
//! master resolved last, dropped when it fails or a failover is announced.

use super::{address, same_addr, Group};
use crate::{lost_master, manager_config};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, RedisResult, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The master of one Sentinel-watched group, followed across failovers.
pub(crate) struct Follower {
    group: Group,
    /// Held while the Sentinels are asked: one caller asks, the others
    /// wait for its answer.
    asking: tokio::sync::Mutex<()>,
    followed: Arc<Followed>,
    /// Listens to the Sentinels' failover announcements from the first
    /// call on (a runtime is there then); stopped with the follower.
    watcher: OnceLock<tokio::task::AbortHandle>,
}

/// What a follower follows now, shared with its watcher.
#[derive(Default)]
struct Followed {
    /// The manager for the master resolved last, with a generation so an
    /// error on an older one does not drop a newer one.
    current: Mutex<Option<(u64, ConnectionManager)>>,
    generation: AtomicU64,
    /// Failovers announced so far: a resolution that one overtook asks again.
    switches: AtomicU64,
    /// Managers of this generation or older were for a master that an
    /// announcement has since replaced: their answers are not trusted.
    left: AtomicU64,
    master: Mutex<Option<String>>,
}

impl Followed {
    /// The current manager, unless an announcement has left its master
    /// (one made while an announcement came in is not kept: every answer
    /// on it would be refused).
    fn cached(&self) -> Option<(u64, ConnectionManager)> {
        let left = self.left.load(Ordering::SeqCst);
        let mut c = self.current.lock().ok()?;
        if c.as_ref().is_some_and(|(g, _)| *g <= left) {
            *c = None;
        }
        c.clone()
    }

    /// The Sentinels announced `to` as the master: a manager for any other
    /// node is dropped, so the next call reaches `to`.
    fn switched(&self, to: &str) {
        self.switches.fetch_add(1, Ordering::SeqCst);
        let following = self.master.lock().ok().and_then(|m| m.clone());
        if following.as_deref().is_some_and(|m| same_addr(m, to)) {
            return;
        }
        self.left
            .fetch_max(self.generation.load(Ordering::SeqCst), Ordering::SeqCst);
        if let Ok(mut c) = self.current.lock() {
            if c.take().is_some() {
                tracing::info!(
                    from = following.as_deref().unwrap_or("-"),
                    to,
                    "redis sentinel: the sentinels switched the master; following the new one"
                );
            }
        }
    }
}

impl Follower {
    pub(crate) fn new(group: Group) -> Self {
        Self {
            group,
            asking: tokio::sync::Mutex::new(()),
            followed: Arc::default(),
            watcher: OnceLock::new(),
        }
    }

    pub(crate) fn db(&self) -> i64 {
        self.group.node.db()
    }

    pub(crate) fn master(&self) -> Option<String> {
        self.followed.master.lock().ok().and_then(|m| m.clone())
    }

    /// Starts listening to the Sentinels' failovers, once.
    fn watch(&self) {
        self.watcher.get_or_init(|| {
            let mut heard = self.group.switches();
            let followed = self.followed.clone();
            tokio::spawn(async move {
                while let Some(to) = heard.recv().await {
                    followed.switched(&to);
                }
            })
            .abort_handle()
        });
    }

    /// The manager for the current master, asking the Sentinels when there
    /// is none (one caller asks; the others wait for its answer).
    pub(crate) async fn conn(&self) -> RedisResult<(u64, ConnectionManager)> {
        if let Some(c) = self.followed.cached() {
            return Ok(c);
        }
        self.watch();
        let _asking = self.asking.lock().await;
        if let Some(c) = self.followed.cached() {
            return Ok(c);
        }
        // A failover announced while the Sentinels were being asked may
        // have made their answer stale: ask again (a few times at most).
        let mut tries = 0;
        let client = loop {
            let before = self.followed.switches.load(Ordering::SeqCst);
            let client = self.group.master_client().await?;
            tries += 1;
            if tries == 3 || self.followed.switches.load(Ordering::SeqCst) == before {
                break client;
            }
        };
        let addr = address(&client);
        let manager = ConnectionManager::new_with_config(client, manager_config()).await?;
        let generation = self.followed.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(master = %addr, "redis sentinel: following the master");
        if let Ok(mut m) = self.followed.master.lock() {
            *m = Some(addr);
        }
        if let Ok(mut c) = self.followed.current.lock() {
            *c = Some((generation, manager.clone()));
        }
        Ok((generation, manager))
    }

    fn failed(&self, generation: u64, e: &redis::RedisError) {
        if !lost_master(e) {
            return;
        }
        if let Ok(mut c) = self.followed.current.lock() {
            if c.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::warn!(error = %e, "redis sentinel: the master moved or went away; asking the sentinels again");
                *c = None;
            }
        }
    }

    /// `r` as answered on `generation`'s manager: failed if a failover was
    /// announced away from its master meanwhile (see the module doc).
    fn answered<T>(&self, generation: u64, r: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &r {
            self.failed(generation, e);
        }
        if generation <= self.followed.left.load(Ordering::SeqCst) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown),
                "answered by a master the sentinels have since replaced",
            )));
        }
        r
    }

    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.conn().await?;
        let r = conn.req_packed_command(cmd).await;
        self.answered(generation, r)
    }

    pub(crate) async fn commands(
        &self,
        pipeline: &redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.conn().await?;
        let r = conn.req_packed_commands(pipeline, offset, count).await;
        self.answered(generation, r)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.get() {
            w.abort();
        }
    }
}
