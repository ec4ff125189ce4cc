//! The embedded backend: redb on local disk, for one machine and `make run`.
//!
//! All writes go through one writer thread that groups whatever appends are
//! waiting into a single transaction and one fsync, then answers each; the
//! durability of every acknowledged append costs a share of one fsync. Reads
//! run on MVCC snapshots beside it. Expired entries go a bounded step at a
//! time ([`EmbeddedStore::sweep`]).

mod sweep;

use crate::{
    now_ms, AppendOpts, Channel, Fence, Fetched, Page, Result, Retention, Seq, Store, StoreError,
    Stored,
};
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// channel name -> (last mid, last append in ms).
const SEQ: TableDefinition<&str, (u64, u64)> = TableDefinition::new("seq");
/// (channel name, mid) -> (expires at in ms, payload).
const MSGS: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("msgs");
/// (channel name, push id) -> (mid, forgotten at in ms): idempotent appends.
const IDS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("push_ids");
/// channel name -> when its sequence started, in ms (see [`crate::Seq`]);
/// beside `SEQ` rather than in it, so files written before epochs open
/// (their sequences get an epoch at their next append).
const EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("epochs");
/// shard -> the newest fencing token an append carried.
const FENCES: TableDefinition<u32, u64> = TableDefinition::new("fences");

/// How many queued writes one transaction takes at most.
const MAX_BATCH: usize = 512;
/// How often a sweep pass starts (expired messages, forgotten push ids and
/// idle sequences); a pass is as many steps as the file needs.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

fn channel_name(ch: Channel<'_>) -> String {
    match ch {
        Channel::Private(k) => format!("k/{k}"),
        Channel::Public => "g/".to_owned(),
    }
}

enum Op {
    Append {
        chan: String,
        payload: Bytes,
        expire_at: u64,
        push_id: Option<String>,
        fence: Option<Fence>,
        reply: oneshot::Sender<Result<i64>>,
    },
    Delete {
        chan: String,
        reply: oneshot::Sender<Result<()>>,
    },
    RaiseFence {
        fence: Fence,
        reply: oneshot::Sender<Result<i64>>,
    },
    /// One sweep step; answers true once the pass is through.
    Sweep { reply: oneshot::Sender<Result<i64>> },
}

/// redb-backed store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    writes: mpsc::Sender<Op>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database file at `path` and starts its writer.
    pub fn open(path: &Path, retention: Retention) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(redb::Error::from)?;
        }
        let db = Arc::new(Database::create(path).map_err(redb::Error::from)?);
        {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            tx.open_table(SEQ).map_err(redb::Error::from)?;
            tx.open_table(MSGS).map_err(redb::Error::from)?;
            tx.open_table(IDS).map_err(redb::Error::from)?;
            tx.open_table(FENCES).map_err(redb::Error::from)?;
            tx.open_table(EPOCHS).map_err(redb::Error::from)?;
            tx.commit().map_err(redb::Error::from)?;
        }
        let (writes, rx) = mpsc::channel(4096);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || writer(writer_db, rx, retention))
            .map_err(redb::Error::from)?;
        // Weak, so that dropping the store stops the writer and frees the file.
        let sweeper = writes.downgrade();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                // A step at a time, each behind the appends queued before
                // it; the store dropped, the pass and the task end.
                loop {
                    let Some(tx) = sweeper.upgrade() else { return };
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Op::Sweep { reply }).await.is_err() {
                        return;
                    }
                    drop(tx);
                    match rx.await {
                        Ok(Ok(0)) => continue,
                        Ok(Ok(_)) => break,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "embedded store sweep failed; trying at the next pass");
                            break;
                        }
                        Err(_) => return,
                    }
                }
            }
        });
        Ok(Self { db, writes })
    }

    /// Runs a whole sweep pass now, step by step: drops expired messages,
    /// push ids past their dedupe window and idle sequences. The store does
    /// this every minute on its own.
    pub async fn sweep(&self) -> Result<()> {
        loop {
            let (reply, rx) = oneshot::channel();
            if self.submit(Op::Sweep { reply }, rx).await? != 0 {
                return Ok(());
            }
        }
    }

    /// Hands `op` to the writer thread and waits for its durable result.
    async fn submit<T>(&self, op: Op, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.writes
            .send(op)
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Corrupt(format!("read task failed: {e}")))?
    }
}

fn writer(db: Arc<Database>, mut rx: mpsc::Receiver<Op>, retention: Retention) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut sweep_at = sweep::Cursor::default();
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // A failed transaction left the file as it was: so is the cursor.
        let before = sweep_at.clone();
        let applied = apply(&db, &mut batch, &retention, &mut sweep_at);
        if applied.is_err() {
            sweep_at = before;
        }
        match applied {
            Ok(results) => {
                for (op, r) in batch.drain(..).zip(results) {
                    match (op, r) {
                        (Op::Append { reply, .. }, r) => {
                            let _ = reply.send(r);
                        }
                        (Op::Delete { reply, .. }, _) => {
                            let _ = reply.send(Ok(()));
                        }
                        (Op::RaiseFence { reply, .. }, r) => {
                            let _ = reply.send(r);
                        }
                        (Op::Sweep { reply }, r) => {
                            let _ = reply.send(r);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = batch.len(), "embedded store write failed");
                for op in batch.drain(..) {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Corrupt(e.to_string())));
                        }
                        Op::Delete { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Corrupt(e.to_string())));
                        }
                        Op::RaiseFence { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Corrupt(e.to_string())));
                        }
                        Op::Sweep { reply } => {
                            let _ = reply.send(Err(StoreError::Corrupt(e.to_string())));
                        }
                    }
                }
            }
        }
    }
}

/// Applies a batch in one durable transaction; one result per op (the mid
/// for appends, or their refusal by a fence).
fn apply(
    db: &Database,
    batch: &mut [Op],
    retention: &Retention,
    sweep_at: &mut sweep::Cursor,
) -> Result<Vec<Result<i64>>, redb::Error> {
    let now = now_ms();
    let tx = db.begin_write()?;
    let mut out = Vec::with_capacity(batch.len());
    {
        let mut seq = tx.open_table(SEQ)?;
        let mut msgs = tx.open_table(MSGS)?;
        let mut ids = tx.open_table(IDS)?;
        let mut fences = tx.open_table(FENCES)?;
        let mut epochs = tx.open_table(EPOCHS)?;
        let backlog = retention.max_backlog.max(1) as u64;
        let window = retention.dedupe_window_seconds.saturating_mul(1000);
        for op in batch.iter() {
            match op {
                Op::Append {
                    chan,
                    payload,
                    expire_at,
                    push_id,
                    fence,
                    ..
                } => {
                    // The writer thread applies every write in order, so the
                    // check and the append are one step, as on Redis.
                    if let Some(f) = fence {
                        let current = fences.get(f.shard)?.map(|g| g.value()).unwrap_or(0);
                        if current > f.token {
                            out.push(Err(StoreError::Fenced {
                                shard: f.shard,
                                token: f.token,
                                current,
                            }));
                            continue;
                        }
                        if f.token > current {
                            fences.insert(f.shard, f.token)?;
                        }
                    }
                    if let Some(id) = push_id {
                        let seen = ids.get((chan.as_str(), id.as_str()))?.map(|g| g.value());
                        if let Some((mid, _)) = seen.filter(|(_, until)| *until > now) {
                            out.push(Ok(mid as i64));
                            continue;
                        }
                    }
                    let last = seq.get(chan.as_str())?.map(|g| g.value().0).unwrap_or(0);
                    let mid = last + 1;
                    seq.insert(chan.as_str(), (mid, now))?;
                    if mid == 1 || epochs.get(chan.as_str())?.is_none() {
                        epochs.insert(chan.as_str(), now)?;
                    }
                    msgs.insert((chan.as_str(), mid), (*expire_at, payload.as_ref()))?;
                    if mid > backlog {
                        msgs.retain_in(
                            (chan.as_str(), 0)..=(chan.as_str(), mid - backlog),
                            |_, _| false,
                        )?;
                    }
                    if let Some(id) = push_id {
                        ids.insert(
                            (chan.as_str(), id.as_str()),
                            (mid, now.saturating_add(window)),
                        )?;
                    }
                    out.push(Ok(mid as i64));
                }
                Op::Delete { chan, .. } => {
                    msgs.retain_in((chan.as_str(), 0)..=(chan.as_str(), u64::MAX), |_, _| false)?;
                    out.push(Ok(0));
                }
                Op::RaiseFence { fence: f, .. } => {
                    let current = fences.get(f.shard)?.map(|g| g.value()).unwrap_or(0);
                    if f.token > current {
                        fences.insert(f.shard, f.token)?;
                    }
                    out.push(Ok(current.max(f.token) as i64));
                }
                Op::Sweep { .. } => {
                    let tables = sweep::Tables {
                        msgs: &mut msgs,
                        ids: &mut ids,
                        seq: &mut seq,
                        epochs: &mut epochs,
                    };
                    match sweep::step(tables, sweep_at, now, retention)? {
                        Some(next) => {
                            *sweep_at = next;
                            out.push(Ok(0));
                        }
                        None => {
                            *sweep_at = sweep::Cursor::default();
                            out.push(Ok(1));
                        }
                    }
                }
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

impl Store for EmbeddedStore {
    /// Queues an append for the writer thread.
    async fn append_with(
        &self,
        ch: Channel<'_>,
        payload: Bytes,
        ttl: Duration,
        opts: AppendOpts<'_>,
    ) -> Result<i64> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Append {
            chan: channel_name(ch),
            payload,
            expire_at: now_ms().saturating_add(ttl.as_millis() as u64),
            // An empty id is no id: nothing to dedupe on.
            push_id: opts.push_id.filter(|id| !id.is_empty()).map(str::to_owned),
            fence: opts.fence,
            reply,
        };
        self.submit(op, rx).await
    }

    async fn fetch_page(&self, ch: Channel<'_>, after: i64, page: Page) -> Result<Fetched> {
        let chan = channel_name(ch);
        let from = after.max(0) as u64 + 1;
        self.read(move |db| {
            let now = now_ms();
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let msgs = tx.open_table(MSGS).map_err(redb::Error::from)?;
            let mut out = Fetched {
                seq: read_seq(&tx, &chan)?,
                ..Fetched::default()
            };
            let mut bytes = 0usize;
            for item in msgs
                .range((chan.as_str(), from)..=(chan.as_str(), u64::MAX))
                .map_err(redb::Error::from)?
            {
                let (k, v) = item.map_err(redb::Error::from)?;
                let (expire_at, payload) = v.value();
                if expire_at <= now {
                    continue;
                }
                if !page.fits(out.messages.len(), bytes, payload.len()) {
                    out.more = true;
                    break;
                }
                bytes += payload.len();
                out.messages.push(Stored {
                    mid: k.value().1 as i64,
                    payload: Bytes::copy_from_slice(payload),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn raise_fence(&self, fence: Fence) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        let op = Op::RaiseFence { fence, reply };
        Ok(self.submit(op, rx).await?.max(0) as u64)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Delete {
            chan: channel_name(Channel::Private(key)),
            reply,
        };
        self.submit(op, rx).await
    }

    async fn sequence(&self, ch: Channel<'_>) -> Result<Seq> {
        let chan = channel_name(ch);
        self.read(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            read_seq(&tx, &chan)
        })
        .await
    }
}

/// `chan`'s sequence as of the snapshot `tx`.
fn read_seq(tx: &redb::ReadTransaction, chan: &str) -> Result<Seq> {
    let seq = tx.open_table(SEQ).map_err(redb::Error::from)?;
    let last = seq
        .get(chan)
        .map_err(redb::Error::from)?
        .map(|g| g.value().0)
        .unwrap_or(0);
    let epoch = tx
        .open_table(EPOCHS)
        .map_err(redb::Error::from)?
        .get(chan)
        .map_err(redb::Error::from)?
        .map(|g| g.value())
        .unwrap_or(0);
    Ok(Seq {
        last: last as i64,
        epoch,
    })
}
