//! A client that follows one key the way the docs tell clients to behave:
//! resolve through web, subscribe, fetch what was stored after the last mid,
//! fill gaps from storage, drop mids it already has, and reconnect when told
//! to (`-r`, `-c`) or when the connection breaks.
//!
//! It records what a test needs to judge a cluster: every mid in the order it
//! was applied, gaps it could not fill, duplicates dropped, and each period it
//! spent without a comet, so a chaos or e2e test can report how long clients
//! were cut off and how many reconnected.

use crate::http::{Client, Position, Proto};
use crate::sub::{Params, Subscriber};
use crate::{Error, Frame};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a follower sends `h`; well inside the 30 s it promises.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// The heartbeat the follower announces.
const HEARTBEAT_SECONDS: u64 = 30;
/// First pause between failed connection attempts (with jitter, doubling).
const RETRY: Duration = Duration::from_millis(50);
/// Longest pause between attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A period during which the follower had no comet connection.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    /// When the connection was lost (or the follower started).
    pub from: Instant,
    /// When a comet accepted it again.
    pub to: Instant,
}

impl Outage {
    /// Length of the outage.
    pub fn length(&self) -> Duration {
        self.to.saturating_duration_since(self.from)
    }
}

/// What one follower saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Every mid applied, in order.
    pub mids: Vec<i64>,
    /// Frames or fetched messages dropped because their mid was already seen.
    pub duplicates_dropped: usize,
    /// Mids that came after a hole storage could not fill: (expected, got).
    pub gaps: Vec<(i64, i64)>,
    /// Mids that went backwards after a higher one (a restarted sequence).
    pub regressions: Vec<(i64, i64)>,
    /// Times the cluster said the key's sequence started again (storage
    /// lost its data); `mids` then goes on with the new sequence.
    pub resets: usize,
    /// Where in `mids` the current sequence starts.
    pub epoch_start: usize,
    /// Accepted subscriptions.
    pub connections: usize,
    /// Periods without a comet, the first one from the start.
    pub outages: Vec<Outage>,
    /// Times a comet told it to reconnect (`-r`, SSE `reconnect`).
    pub told_to_reconnect: usize,
    /// Mids that arrived live over two connections: two comets delivered
    /// them (a fetched copy of a live mid is not counted).
    pub live_twice: Vec<i64>,
    /// When each mid first arrived live, for push-to-delivery latency.
    pub live_at: Vec<(i64, Instant)>,
}

impl Seen {
    /// The last mid applied (0 when none).
    pub fn last(&self) -> i64 {
        self.mids[self.epoch_start..].last().copied().unwrap_or(0)
    }
}

/// Shared controls of a group of followers.
#[derive(Debug, Clone, Default)]
pub struct Control {
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicUsize>,
}

impl Control {
    /// Followers connected to a comet right now.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::SeqCst)
    }

    /// Tells followers to finish once they reach their target mid.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// One follower's settings.
#[derive(Debug, Clone)]
pub struct Follow {
    pub api: Client,
    pub key: String,
    pub proto: Proto,
    pub token: Option<String>,
    /// After [`Control::stop`], the follower returns once it has seen this mid.
    pub until: Arc<AtomicI64>,
    pub control: Control,
}

enum Ended {
    /// Done: stopped and reached `until`.
    Done,
    /// The comet told it to go, or web failed it; resolve again.
    Reconnect,
    /// The connection broke without a word: the comet may be gone, so
    /// resolve asking web to wait for its successor.
    Lost,
}

/// Whether `e` says nothing answers at the address (the comet is gone or
/// cut off), rather than that a comet answered and refused.
fn unreachable(e: &Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as Ws;
    match e {
        Error::Io(_) | Error::Closed | Error::Timeout => true,
        Error::Ws(w) => matches!(
            w,
            Ws::Io(_) | Ws::ConnectionClosed | Ws::AlreadyClosed | Ws::Protocol(_)
        ),
        Error::Http(h) => h.status().is_none(),
        Error::Api { .. } | Error::Frame(_) => false,
    }
}

struct State {
    seen: Seen,
    /// The epoch the mids seen belong to (0 until one is learnt).
    epoch: u64,
    down_since: Option<Instant>,
    connected: Arc<AtomicUsize>,
    /// The connection (by number) each mid of each sequence came live on.
    live_on: std::collections::HashMap<(usize, i64), usize>,
}

impl State {
    /// Applies mid `m`: a new one (the next, or after a gap) or a duplicate.
    fn apply(&mut self, m: i64) {
        let last = self.seen.last();
        if m <= last {
            // A sequence that restarted shows as a big step back; a duplicate
            // of something just seen does not.
            if self.seen.mids[self.seen.epoch_start..]
                .binary_search(&m)
                .is_err()
            {
                self.seen.regressions.push((last, m));
            }
            self.seen.duplicates_dropped += 1;
            return;
        }
        if m != last + 1 {
            self.seen.gaps.push((last + 1, m));
        }
        self.seen.mids.push(m);
    }

    /// Notes that mid `m` came live on the current connection at `at`.
    fn live(&mut self, m: i64, at: Instant) {
        let conn = self.seen.connections;
        match self.live_on.entry((self.seen.resets, m)) {
            std::collections::hash_map::Entry::Occupied(first) => {
                if *first.get() != conn {
                    self.seen.live_twice.push(m);
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(conn);
                self.seen.live_at.push((m, at));
            }
        }
    }

    /// The key's sequence started again: mids from 1 are new.
    fn reset(&mut self) {
        self.seen.resets += 1;
        self.seen.epoch_start = self.seen.mids.len();
    }

    fn up(&mut self) {
        self.seen.connections += 1;
        self.connected.fetch_add(1, Ordering::SeqCst);
        if let Some(from) = self.down_since.take() {
            self.seen.outages.push(Outage {
                from,
                to: Instant::now(),
            });
        }
    }

    fn down(&mut self) {
        self.connected.fetch_sub(1, Ordering::SeqCst);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
    }
}

impl Follow {
    fn done(&self, last: i64) -> bool {
        self.control.stopping() && last >= self.until.load(Ordering::SeqCst)
    }

    /// Done, and storage agrees: a sequence that went back (Redis lost
    /// writes) can leave the follower past `until` in the old sequence
    /// while the comet's reset is still on its way, so a last fetch from
    /// its last mid asks. Storage out of reach leaves it at `done`.
    async fn finished(&self, st: &mut State) -> bool {
        if !self.done(st.seen.last()) {
            return false;
        }
        let _ = self.catch_up(st, None).await;
        self.done(st.seen.last())
    }

    async fn connect(&self, addr: &str, last: i64, epoch: u64) -> crate::Result<Subscriber> {
        let p = Params {
            key: self.key.clone(),
            heartbeat: HEARTBEAT_SECONDS,
            token: self.token.clone(),
            versioned: true,
        };
        let mut sub = match self.proto {
            Proto::WebSocket => Subscriber::websocket(addr, &p).await?,
            Proto::Tcp => Subscriber::tcp(addr, &p).await?,
            // SSE answers 200 only once the comet registered the connection.
            Proto::Sse => return Subscriber::sse_from(addr, &p, Some(last), Some(epoch)).await,
        };
        match sub.next_timeout(Duration::from_secs(3)).await? {
            Frame::Heartbeat => Ok(sub),
            Frame::Error(e) => Err(Error::Frame(e)),
            other => Err(Error::Frame(format!("first frame {other:?}"))),
        }
    }

    /// Fetches stored messages after the last one seen, below `below` if given.
    async fn catch_up(&self, st: &mut State, below: Option<i64>) -> crate::Result<()> {
        loop {
            let token = self.token.clone().or_else(|| self.api.minted(&self.key));
            let at = Position {
                after: st.seen.last(),
                epoch: Some(st.epoch),
                ..Position::default()
            };
            let page = self
                .api
                .fetch_page_with_token(&self.key, token.as_deref(), at)
                .await?;
            if page.reset {
                st.reset();
            }
            st.epoch = page.epoch.unwrap_or(st.epoch);
            let stored = page.msgs;
            let before = st.seen.last();
            for m in stored.iter().filter(|m| below.is_none_or(|b| m.mid < b)) {
                st.apply(m.mid);
            }
            // A page is bounded by count and by bytes: ask again until a
            // page brings nothing new.
            if stored.is_empty() || (st.seen.last() == before && !page.reset) {
                return Ok(());
            }
        }
    }

    async fn session(&self, st: &mut State, mut sub: Subscriber) -> Ended {
        // SSE resumes from Last-Event-ID on the comet (which also says when
        // the key's sequence started again); the others fetch through web.
        if self.proto != Proto::Sse && self.catch_up(st, None).await.is_err() {
            return Ended::Reconnect;
        }
        let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
        beat.tick().await;
        while !self.finished(st).await {
            let frame = tokio::select! {
                f = sub.next_timeout(Duration::from_millis(300)) => f,
                _ = beat.tick() => {
                    if sub.heartbeat().await.is_err() {
                        return Ended::Lost;
                    }
                    continue;
                }
            };
            match frame {
                Ok(Frame::Message(m)) => {
                    let arrived = Instant::now();
                    // A frame after a hole the follower could not fill is
                    // dropped unapplied: the next connection asks for it
                    // again (SSE's Last-Event-ID), so it only counts as
                    // delivered live once kept.
                    if m.mid > st.seen.last() + 1 && self.catch_up(st, Some(m.mid)).await.is_err() {
                        return Ended::Reconnect;
                    }
                    st.live(m.mid, arrived);
                    st.apply(m.mid);
                    // A sequence began while connected: learn its epoch,
                    // which the next fetch carries to tell a restart.
                    if m.mid == 1 && st.epoch == 0 && self.catch_up(st, None).await.is_err() {
                        return Ended::Reconnect;
                    }
                }
                Ok(Frame::Heartbeat) => {}
                Ok(Frame::Reset) => st.reset(),
                Ok(Frame::Epoch(e)) => st.epoch = e,
                Err(Error::Timeout) => {
                    // Quiet: once stopping, pick up what a lost frame left.
                    if self.control.stopping() && self.catch_up(st, None).await.is_err() {
                        return Ended::Reconnect;
                    }
                }
                Err(e) if unreachable(&e) => return Ended::Lost,
                Ok(Frame::Reconnect) => {
                    st.seen.told_to_reconnect += 1;
                    return Ended::Reconnect;
                }
                Ok(Frame::Error(_)) | Err(_) => return Ended::Reconnect,
            }
        }
        Ended::Done
    }

    /// Follows the key until stopped and caught up with `until`.
    pub async fn run(self) -> Seen {
        let mut st = State {
            seen: Seen::default(),
            epoch: 0,
            down_since: Some(Instant::now()),
            connected: self.control.connected.clone(),
            live_on: Default::default(),
        };
        let mut backoff = crate::backoff::Backoff::new(RETRY, RETRY_MAX);
        // The address lost last, for web to wait past; at most one such
        // wait per outage, then plain backoff (a load balancer may still
        // point at the dead comet for a moment after web knows better).
        let mut lost: Option<String> = None;
        let mut may_wait = true;
        while !self.finished(&mut st).await {
            let resolved = match lost.take() {
                Some(gone) => {
                    self.api
                        .resolve_after_losing(&self.key, self.proto, &gone)
                        .await
                }
                None => self.api.resolve(&self.key, self.proto).await,
            };
            let (addr, sub) = match resolved {
                Ok(addr) => {
                    let sub = self.connect(&addr, st.seen.last(), st.epoch).await;
                    (Some(addr), sub)
                }
                Err(e) => (None, Err(e)),
            };
            let addr = addr.unwrap_or_default();
            let sub = match sub {
                Ok(sub) => sub,
                Err(e) => {
                    // Refused (-c: not this comet's key yet) or unreachable. Once
                    // stopping, storage alone can still bring the follower up to date.
                    if self.control.stopping() {
                        let _ = self.catch_up(&mut st, None).await;
                    }
                    if may_wait && !addr.is_empty() && unreachable(&e) {
                        may_wait = false;
                        lost = Some(addr);
                    } else {
                        tokio::time::sleep(backoff.next_pause()).await;
                    }
                    continue;
                }
            };
            backoff.reset();
            st.up();
            match self.session(&mut st, sub).await {
                Ended::Done => {
                    st.connected.fetch_sub(1, Ordering::SeqCst);
                    break;
                }
                Ended::Reconnect => {
                    st.down();
                    may_wait = true;
                }
                Ended::Lost => {
                    st.down();
                    may_wait = false;
                    lost = Some(addr);
                }
            }
        }
        st.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            seen: Seen::default(),
            epoch: 0,
            down_since: None,
            connected: Arc::default(),
            live_on: Default::default(),
        }
    }

    #[test]
    fn tells_a_mid_delivered_live_by_two_connections() {
        let mut st = state();
        let now = Instant::now();
        st.up();
        st.live(1, now);
        st.live(1, now);
        st.down();
        st.up();
        st.live(2, now);
        st.live(1, now);
        assert_eq!(st.seen.live_twice, vec![1]);
        // A new sequence's mid 1 is another message.
        st.reset();
        st.live(1, now);
        assert_eq!(st.seen.live_twice, vec![1]);
    }

    #[test]
    fn applies_in_order_and_drops_duplicates() {
        let mut st = state();
        for m in [1, 2, 2, 3, 1] {
            st.apply(m);
        }
        assert_eq!(st.seen.mids, vec![1, 2, 3]);
        assert_eq!(st.seen.duplicates_dropped, 2);
        assert!(st.seen.gaps.is_empty() && st.seen.regressions.is_empty());
    }

    #[test]
    fn records_gaps_and_restarted_sequences() {
        let mut st = state();
        for m in [2, 3, 6] {
            st.apply(m);
        }
        assert_eq!(st.seen.gaps, vec![(1, 2), (4, 6)]);
        // A sequence that restarted at 1 after 6: 1 was never seen.
        st.apply(1);
        assert_eq!(st.seen.regressions, vec![(6, 1)]);
    }
}
