//! The Redis Cluster connection behind [`crate::Conn`].

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisError, RedisResult, Value};

/// A cluster connection made on first use (a failed attempt is retried
/// by the next call) and made again after a call times out or loses its
/// connection: the client learns a new slot map only from a redirection or
/// a refused connection, so a master that stops answering (hung, cut off)
/// would otherwise keep its slots in the client's eyes after a replica took
/// them over. A fresh connection asks the seeds.
pub(crate) struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<(u64, ClusterConnection)>>,
    generation: std::sync::atomic::AtomicU64,
}

impl LazyCluster {
    pub(crate) fn new(client: redis::cluster::ClusterClient) -> Self {
        Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            generation: Default::default(),
        }
    }

    pub(crate) async fn get(&self) -> RedisResult<ClusterConnection> {
        self.current().await.map(|(_, c)| c)
    }

    pub(crate) async fn current(&self) -> RedisResult<(u64, ClusterConnection)> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let made = self.client.get_async_connection().await?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *conn = Some((generation, made.clone()));
        Ok((generation, made))
    }

    /// Drops connection `generation` after `e`, if `e` says a node stopped
    /// answering, so the next call starts from the seeds.
    pub(crate) async fn failed(&self, generation: u64, e: &RedisError) {
        if !(e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()) {
            return;
        }
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(error = %e, "redis cluster: a node stopped answering; reconnecting through the seeds");
            *conn = None;
        }
    }

    /// Drops connection `generation`: its slot map is out of date (a write
    /// sent to one node was redirected), and the next call asks the seeds.
    pub(crate) async fn stale(&self, generation: u64) {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::info!("redis cluster: a slot moved; learning the slots again from the seeds");
            *conn = None;
        }
    }

    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.current().await?;
        let r = conn.req_packed_command(cmd).await;
        if let Err(e) = &r {
            self.failed(generation, e).await;
        }
        r
    }

    pub(crate) async fn commands(
        &self,
        pipeline: &redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.current().await?;
        let r = conn.req_packed_commands(pipeline, offset, count).await;
        if let Err(e) = &r {
            self.failed(generation, e).await;
        }
        r
    }
}
