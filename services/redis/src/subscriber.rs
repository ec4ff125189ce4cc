//! Subscriptions in any mode, as one stream of [`Event`]s.
//!
//! On one node (or the master Sentinels name) it is a RESP2 pub/sub
//! connection. On a Redis Cluster it is a RESP3 cluster connection whose
//! pushes come on a channel: sharded subscriptions (`SSUBSCRIBE`) go to the
//! node that owns each channel's slot, plain ones anywhere (a cluster-wide
//! `PUBLISH` reaches every node). When a slot moves, its node drops the
//! slot's sharded subscriptions (an `sunsubscribe` the client did not ask
//! for): that comes out as [`Event::Dropped`], and subscribing again
//! reaches the slot's new owner. Messages published in between are not
//! delivered: whoever subscribes reads what it missed from the store.
//!
//! The stream ends when the connection is lost, including any one node's
//! connection of a cluster, and behind Sentinels when they announce a
//! failover (the old master, if still up, hears nothing of the new one's
//! messages): the subscriber starts again with a new one and reads what it
//! missed, rather than trust a silent resubscription.

use crate::target::Kind;
use crate::{sentinel, Error, Target};
use futures::stream::BoxStream;
use futures::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Msg, PushInfo, PushKind, RedisResult, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// What a subscription delivers.
#[derive(Debug)]
pub enum Event {
    /// A message published on a subscribed channel.
    Message(Msg),
    /// The server dropped this subscription (its slot moved to another
    /// node of a Redis Cluster); subscribe again to follow it.
    Dropped(String),
}

/// Opens subscriptions: see the module docs.
pub struct Subscriber;

/// Subscribes, unsubscribes and pings on a subscriber's connection; clones
/// share it.
#[derive(Clone)]
pub struct SubscriberHandle {
    inner: Handle,
}

#[derive(Clone)]
enum Handle {
    Node(redis::aio::PubSubSink),
    Cluster {
        conn: ClusterConnection,
        sharded: bool,
        /// Channels this side asked to leave, whose `sunsubscribe` is
        /// therefore no news.
        leaving: Arc<Mutex<HashSet<Vec<u8>>>>,
    },
}

impl Subscriber {
    /// A subscription connection to `target` and the stream of what it
    /// receives. On a Redis Cluster, `sharded` picks `SSUBSCRIBE` (channels
    /// that live in a key's slot) over `SUBSCRIBE`; elsewhere it changes
    /// nothing.
    pub async fn connect(
        target: &Target,
        sharded: bool,
    ) -> Result<(SubscriberHandle, BoxStream<'static, Event>), Error> {
        if let Kind::Cluster { .. } = target.kind {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
            let client = target
                .cluster_builder()
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()?;
            let conn = client.get_async_connection().await?;
            let leaving: Arc<Mutex<HashSet<Vec<u8>>>> = Default::default();
            let stream = cluster_events(rx, leaving.clone());
            return Ok((
                SubscriberHandle {
                    inner: Handle::Cluster {
                        conn,
                        sharded,
                        leaving,
                    },
                },
                stream,
            ));
        }
        // Behind Sentinels, listen for failovers before asking for the
        // master, so none between the two goes unheard.
        let switches = match &target.kind {
            Kind::Sentinel(group) => Some(group.switches()),
            _ => None,
        };
        let client = target.master_client().await?;
        let (sink, stream) = client.get_async_pubsub().await?.split();
        let stream = stream.map(Event::Message);
        let stream = match switches {
            Some(heard) => stream
                .take_until(switched_away(heard, sentinel::address(&client)))
                .boxed(),
            None => stream.boxed(),
        };
        Ok((
            SubscriberHandle {
                inner: Handle::Node(sink),
            },
            stream,
        ))
    }
}

/// Resolves when the Sentinels announce a master other than `subscribed`:
/// the subscription is on the old master, which hears nothing of the new
/// one's messages, so its stream ends and the subscriber starts again on
/// the new one (reading what it missed from the store).
async fn switched_away(
    mut heard: tokio::sync::mpsc::UnboundedReceiver<String>,
    subscribed: String,
) {
    while let Some(to) = heard.recv().await {
        if !sentinel::same_addr(&to, &subscribed) {
            tracing::info!(from = %subscribed, %to, "redis sentinel: the sentinels switched the master; subscribing again");
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// The pushes of a cluster connection as events, ending at the first
/// disconnection (see the module docs).
fn cluster_events(
    rx: tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
    leaving: Arc<Mutex<HashSet<Vec<u8>>>>,
) -> BoxStream<'static, Event> {
    futures::stream::unfold(rx, move |mut rx| {
        let leaving = leaving.clone();
        async move {
            loop {
                let push = rx.recv().await?;
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        if let Some(m) = Msg::from_push_info(push) {
                            return Some((Event::Message(m), rx));
                        }
                    }
                    PushKind::SUnsubscribe => {
                        let Some(Value::BulkString(channel)) = push.data.into_iter().next() else {
                            continue;
                        };
                        let asked = leaving
                            .lock()
                            .map(|mut l| l.remove(&channel))
                            .unwrap_or(false);
                        if !asked {
                            let name = String::from_utf8_lossy(&channel).into_owned();
                            return Some((Event::Dropped(name), rx));
                        }
                    }
                    PushKind::Disconnection => return None,
                    _ => {}
                }
            }
        }
    })
    .boxed()
}

impl SubscriberHandle {
    /// Subscribes to `channels`; done once Redis has confirmed them all.
    pub async fn subscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match &mut self.inner {
            Handle::Node(sink) => sink.subscribe(channels).await,
            Handle::Cluster { conn, sharded, .. } => {
                if !*sharded {
                    return conn.subscribe(channels).await;
                }
                let calls = crate::by_slot(channels, |c| crate::slot(c.as_bytes()))
                    .into_iter()
                    .map(|group| {
                        let mut conn = conn.clone();
                        async move { conn.ssubscribe(group).await }
                    });
                futures::future::try_join_all(calls).await.map(|_| ())
            }
        }
    }

    /// Unsubscribes from `channels`.
    pub async fn unsubscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match &mut self.inner {
            Handle::Node(sink) => sink.unsubscribe(channels).await,
            Handle::Cluster {
                conn,
                sharded,
                leaving,
            } => {
                if !*sharded {
                    return conn.unsubscribe(channels).await;
                }
                if let Ok(mut l) = leaving.lock() {
                    l.extend(channels.iter().map(|c| c.as_bytes().to_vec()));
                }
                let calls = crate::by_slot(channels, |c| crate::slot(c.as_bytes()))
                    .into_iter()
                    .map(|group| {
                        let mut conn = conn.clone();
                        async move { conn.sunsubscribe(group).await }
                    });
                futures::future::try_join_all(calls).await.map(|_| ())
            }
        }
    }

    /// A round trip on the subscribing connection(s): on a cluster, to
    /// every master, so a lost or stopped node shows.
    pub async fn ping(&mut self) -> RedisResult<()> {
        match &mut self.inner {
            Handle::Node(sink) => sink.ping::<()>().await,
            Handle::Cluster { conn, .. } => {
                let every = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                conn.route_command(redis::cmd("PING"), every)
                    .await
                    .map(|_| ())
            }
        }
    }
}
