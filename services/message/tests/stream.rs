//! AppendStream through a client [`Pipeline`], against the real message
//! service on the embedded store over real sockets.

use push_message::{run, Config, StorageConfig};
use pushcluster_proto::pipeline::{CallError, Pipeline};
use pushcluster_proto::v1 as pb;
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::message_client::MessageClient;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::Response;

type Appends = Pipeline<pb::AppendBatchRequest, pb::AppendBatchReply>;

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A message service on a real port over a fresh embedded store.
struct Server {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        Self::start_at(free_addr()).await
    }

    /// Up and accepting on `addr`.
    async fn start_at(addr: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Config {
            listen: addr,
            ops_listen: free_addr(),
            storage: StorageConfig {
                path: dir.path().join("messages.redb"),
                ..StorageConfig::default()
            },
            ..Config::default()
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run(cfg, cancel).await.expect("message service") }
        });
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Self {
                    addr,
                    cancel,
                    task,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("message service did not listen on {addr}");
    }

    /// Graceful shutdown; draining ends open streams, so it does not wait on them.
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("shutdown waited for an open stream")
            .expect("task");
    }
}

fn endpoint(addr: SocketAddr) -> tonic::transport::Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

fn appends(addr: SocketAddr) -> Appends {
    let client = MessageClient::new(endpoint(addr));
    Pipeline::new(Duration::from_secs(5), move |calls| {
        let mut c = client.clone();
        Box::pin(async move { c.append_stream(calls).await.map(Response::into_inner) })
    })
}

fn batch(key: &str, n: usize) -> pb::AppendBatchRequest {
    pb::AppendBatchRequest {
        appends: (0..n)
            .map(|i| pb::AppendRequest {
                key: key.to_owned(),
                payload: format!("{{\"n\":{i}}}").into(),
                ..Default::default()
            })
            .collect(),
    }
}

fn mids(r: &pb::AppendBatchReply) -> Vec<i64> {
    assert!(r.results.iter().all(|a| a.error.is_empty()), "{r:?}");
    let mut m: Vec<i64> = r.results.iter().map(|a| a.mid).collect();
    m.sort_unstable();
    m
}

#[tokio::test]
async fn pipelined_calls_each_get_their_own_reply() {
    let server = Server::start().await;
    let p = appends(server.addr);
    // 60 calls in flight at once, each with its own key and its own count of
    // appends: a reply handed to the wrong call shows as a wrong count.
    let calls = (0..60).map(|i| {
        let p = &p;
        async move { (i, p.call(batch(&format!("k{i}"), i % 7 + 1)).await) }
    });
    for (i, r) in futures::future::join_all(calls).await {
        let r = r.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        let want: Vec<i64> = (1..=(i % 7 + 1) as i64).collect();
        assert_eq!(mids(&r), want, "call {i}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_batch_over_the_limit_is_refused_per_append_and_the_stream_goes_on() {
    let server = Server::start().await;
    let p = appends(server.addr);
    let big = p.call(batch("big", 257)).await.expect("reply");
    assert_eq!(big.results.len(), 257);
    assert!(big
        .results
        .iter()
        .all(|a| a.invalid && a.error.contains("257 appends")));
    let next = p.call(batch("big", 2)).await.expect("reply");
    assert_eq!(
        mids(&next),
        vec![1, 2],
        "nothing of the refused batch was stored"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_server_gets_a_new_stream() {
    let server = Server::start().await;
    let p = appends(server.addr);
    assert_eq!(mids(&p.call(batch("r", 1)).await.expect("reply")), vec![1]);
    let addr = server.addr;
    server.stop().await;
    // Down: the call fails as unavailable, it does not hang.
    match p.call(batch("r", 1)).await {
        Err(CallError::NotSent(s, _) | CallError::Failed(s)) => {
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}")
        }
        Ok(r) => panic!("a stopped server answered: {r:?}"),
    }
    // A new store: the stopped server's may still be held open by its
    // connections' tasks winding down in this process.
    let server = Server::start_at(addr).await;
    let mut again = None;
    for _ in 0..50 {
        match p.call(batch("r", 1)).await {
            Ok(r) => {
                again = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let again = again.expect("no stream to the restarted server");
    assert_eq!(mids(&again), vec![1]);
    server.stop().await;
}

#[tokio::test]
async fn a_server_without_the_stream_gives_the_request_back() {
    let server = Server::start().await;
    // The message service has no Comet.PushStream: what an older comet
    // answers for a method it does not know.
    let client = CometClient::new(endpoint(server.addr));
    let p: Pipeline<pb::PushBatchRequest, pb::MultiPushReply> =
        Pipeline::new(Duration::from_secs(5), move |calls| {
            let mut c = client.clone();
            Box::pin(async move { c.push_stream(calls).await.map(Response::into_inner) })
        });
    let req = pb::PushBatchRequest {
        pushes: vec![pb::PushRequest {
            key: "u".into(),
            ..Default::default()
        }],
    };
    match p.call(req).await {
        Err(CallError::NotSent(s, back)) => {
            assert_eq!(s.code(), tonic::Code::Unimplemented, "{s:?}");
            assert_eq!(back.pushes[0].key, "u");
        }
        other => panic!("expected the request back, got {other:?}"),
    }
    server.stop().await;
}

/// A message service that takes AppendStream calls and never answers: what a
/// stuck server looks like to the pipeline.
struct Silent;

#[tonic::async_trait]
impl pb::message_server::Message for Silent {
    async fn append(
        &self,
        _: tonic::Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
    async fn append_batch(
        &self,
        _: tonic::Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
    type AppendStreamStream = pushcluster_proto::pipeline::Replies<pb::AppendBatchReply>;
    async fn append_stream(
        &self,
        req: tonic::Request<tonic::Streaming<pb::AppendBatchRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, tonic::Status> {
        // Keep reading calls (so the client's sends succeed), answer none.
        let mut calls = req.into_inner();
        let replies =
            silent_replies(async move { while let Ok(Some(_)) = calls.message().await {} });
        Ok(Response::new(replies))
    }
    async fn fetch(
        &self,
        _: tonic::Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
    async fn delete(
        &self,
        _: tonic::Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
    async fn last_mid(
        &self,
        _: tonic::Request<pb::LastMidRequest>,
    ) -> Result<Response<pb::LastMidReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
    async fn raise_fence(
        &self,
        _: tonic::Request<pb::RaiseFenceRequest>,
    ) -> Result<Response<pb::RaiseFenceReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
    type BypassedStream = pushcluster_proto::pipeline::Replies<pb::DeliverRequest>;
    async fn bypassed(
        &self,
        _: tonic::Request<pb::BypassedRequest>,
    ) -> Result<Response<Self::BypassedStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("silent"))
    }
}

/// A reply stream that yields nothing while `work` runs, then ends.
fn silent_replies(
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> pushcluster_proto::pipeline::Replies<pb::AppendBatchReply> {
    use futures::StreamExt;
    Box::pin(futures::stream::once(work).filter_map(|()| async { None }))
}

#[tokio::test]
async fn a_stuck_server_fails_the_call_at_the_deadline_and_the_next_call_gets_a_new_stream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::message_server::MessageServer::new(Silent))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let client = MessageClient::new(endpoint(addr));
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p: Appends = Pipeline::new(Duration::from_millis(300), {
        let opened = opened.clone();
        move |calls| {
            opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut c = client.clone();
            Box::pin(async move { c.append_stream(calls).await.map(Response::into_inner) })
        }
    });
    for round in 1..=2 {
        let started = std::time::Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), p.call(batch("s", 1)))
            .await
            .expect("the call hung past its deadline")
        {
            Err(CallError::Failed(s)) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(s.message().contains("no reply within"), "{s:?}");
            }
            other => panic!("round {round}: expected a failed call, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The stuck stream was closed: each call opened its own.
        assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), round);
    }
    server.abort();
}

/// Bypassed: a follower hears each private append marked `announce` (web's
/// stores around a comet), with its mid and payload, and nothing else; a
/// draining service ends the stream.
#[tokio::test]
async fn announced_appends_reach_bypassed_followers() {
    let server = Server::start().await;
    let mut client = MessageClient::new(endpoint(server.addr));
    let mut heard = client
        .bypassed(pb::BypassedRequest {})
        .await
        .expect("follow")
        .into_inner();
    let append = |key: &str, announce: bool| pb::AppendRequest {
        key: key.to_owned(),
        payload: format!(r#"{{"announce":{announce}}}"#).into(),
        announce,
        ..Default::default()
    };
    let quiet = client
        .append(append("k", false))
        .await
        .expect("append")
        .into_inner()
        .mid;
    let loud = client
        .append(append("k", true))
        .await
        .expect("append")
        .into_inner()
        .mid;
    let d = tokio::time::timeout(Duration::from_secs(5), heard.message())
        .await
        .expect("announced in time")
        .expect("stream")
        .expect("one message");
    assert_eq!(d.key, "k");
    let m = d.message.expect("message");
    assert_eq!((m.mid, quiet + 1), (loud, loud));
    assert_eq!(&m.payload[..], br#"{"announce":true}"#);
    server.stop().await;
    let end = tokio::time::timeout(Duration::from_secs(5), heard.message())
        .await
        .expect("stream ends on drain");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}
