//! An older release's RPC surface in front of the real services, for the
//! rolling-upgrade tests: it forwards every unary method to the real
//! message service or comet and answers `Unimplemented` for the stream
//! methods (AppendStream, PushStream) that release did not have. Each proxy
//! counts the calls it saw, so a test can tell which path a push took.

use pushcluster_proto::auth::{AuthChannel, RpcToken};
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::comet_server::{Comet, CometServer};
use pushcluster_proto::v1::message_client::MessageClient;
use pushcluster_proto::v1::message_server::{Message, MessageServer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tonic::service::Routes;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};

/// Calls an older-release proxy saw, by kind.
#[derive(Debug, Default)]
pub struct Calls {
    /// Stream-method calls, each refused as Unimplemented.
    pub streams: AtomicU64,
    /// Batch calls (AppendBatch or PushBatch), forwarded.
    pub batches: AtomicU64,
}

impl Calls {
    /// (stream calls refused, batch calls forwarded).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.streams.load(Ordering::Relaxed),
            self.batches.load(Ordering::Relaxed),
        )
    }
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// What it saw.
    pub calls: Arc<Calls>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A message service of the release before AppendStream, forwarding to the
/// one on `port`.
pub fn message(port: u16, token: Option<&str>) -> Proxy {
    serve(port, token, |to, calls| {
        Routes::new(MessageServer::new(OldMessage {
            to: MessageClient::new(to),
            calls,
        }))
    })
}

/// A comet of the release before PushStream, forwarding to the one whose
/// gRPC port is `port`.
pub fn comet(port: u16, token: Option<&str>) -> Proxy {
    serve(port, token, |to, calls| {
        Routes::new(CometServer::new(OldComet {
            to: CometClient::new(to),
            calls,
        }))
    })
}

/// Serves what `make` builds on a free port, on a thread of its own (the
/// clusters are started from synchronous code).
/// Calls onward carry the cluster's RPC `token`, as an older release did.
fn serve(
    target: u16,
    token: Option<&str>,
    make: impl FnOnce(AuthChannel, Arc<Calls>) -> Routes + Send + 'static,
) -> Proxy {
    let token = RpcToken::new(token).expect("RPC token");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy listener");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let port = listener.local_addr().expect("proxy address").port();
    let calls = Arc::new(Calls::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let seen = calls.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("proxy runtime");
        rt.block_on(async move {
            let to = Endpoint::from_shared(format!("http://127.0.0.1:{target}"))
                .expect("target url")
                .connect_lazy();
            let to = token.on(to);
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_routes(make(to, seen))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
    });
    Proxy {
        port,
        calls,
        stop: Some(stop),
    }
}

struct OldMessage {
    to: MessageClient<AuthChannel>,
    calls: Arc<Calls>,
}

#[tonic::async_trait]
impl Message for OldMessage {
    async fn append(
        &self,
        r: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        self.to.clone().append(r.into_inner()).await
    }
    async fn append_batch(
        &self,
        r: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchReply>, Status> {
        self.calls.batches.fetch_add(1, Ordering::Relaxed);
        self.to.clone().append_batch(r.into_inner()).await
    }
    type AppendStreamStream = pushcluster_proto::pipeline::Replies<pb::AppendBatchReply>;
    async fn append_stream(
        &self,
        _: Request<Streaming<pb::AppendBatchRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        self.calls.streams.fetch_add(1, Ordering::Relaxed);
        Err(Status::unimplemented(
            "Message.AppendStream is not in this release",
        ))
    }
    async fn fetch(
        &self,
        r: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, Status> {
        self.to.clone().fetch(r.into_inner()).await
    }
    async fn delete(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        self.to.clone().delete(r.into_inner()).await
    }
    async fn last_mid(
        &self,
        r: Request<pb::LastMidRequest>,
    ) -> Result<Response<pb::LastMidReply>, Status> {
        self.to.clone().last_mid(r.into_inner()).await
    }
    async fn raise_fence(
        &self,
        _: Request<pb::RaiseFenceRequest>,
    ) -> Result<Response<pb::RaiseFenceReply>, Status> {
        Err(Status::unimplemented(
            "the previous release keeps no fence to raise",
        ))
    }
    type BypassedStream = pushcluster_proto::pipeline::Replies<pb::DeliverRequest>;
    async fn bypassed(
        &self,
        _: Request<pb::BypassedRequest>,
    ) -> Result<Response<Self::BypassedStream>, Status> {
        Err(Status::unimplemented(
            "the previous release announces no bypassed pushes",
        ))
    }
}

struct OldComet {
    to: CometClient<AuthChannel>,
    calls: Arc<Calls>,
}

#[tonic::async_trait]
impl Comet for OldComet {
    async fn push(&self, r: Request<pb::PushRequest>) -> Result<Response<pb::PushReply>, Status> {
        self.to.clone().push(r.into_inner()).await
    }
    async fn multi_push(
        &self,
        r: Request<pb::MultiPushRequest>,
    ) -> Result<Response<pb::MultiPushReply>, Status> {
        self.to.clone().multi_push(r.into_inner()).await
    }
    async fn push_batch(
        &self,
        r: Request<pb::PushBatchRequest>,
    ) -> Result<Response<pb::MultiPushReply>, Status> {
        self.calls.batches.fetch_add(1, Ordering::Relaxed);
        self.to.clone().push_batch(r.into_inner()).await
    }
    type PushStreamStream = pushcluster_proto::pipeline::Replies<pb::MultiPushReply>;
    async fn push_stream(
        &self,
        _: Request<Streaming<pb::PushBatchRequest>>,
    ) -> Result<Response<Self::PushStreamStream>, Status> {
        self.calls.streams.fetch_add(1, Ordering::Relaxed);
        Err(Status::unimplemented(
            "Comet.PushStream is not in this release",
        ))
    }
    async fn deliver(
        &self,
        r: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        self.to.clone().deliver(r.into_inner()).await
    }
    async fn stats(
        &self,
        r: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        self.to.clone().stats(r.into_inner()).await
    }
}
