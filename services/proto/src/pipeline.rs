//! Calls over one long-lived gRPC stream, answered in order.
//!
//! A unary gRPC call opens an HTTP/2 stream: the client writes HEADERS and
//! DATA, the server HEADERS, DATA and trailers, each write waking the other
//! side, and the server spawns a task for the call. On the push path (web →
//! comet → message service) that set-up costs more CPU than the pushes it
//! carries, and on a loaded node CPU is latency. A [`Pipeline`] opens one
//! bidirectional stream and sends each call as one message on it; the server
//! ([`answer_in_order`]) answers every message with exactly one reply, in
//! the order the messages came, so replies need no ids. Calls are pipelined:
//! a call need not wait for the one before it.
//!
//! A broken stream fails the calls waiting on it and the next call opens a
//! new one. A server that does not know the stream method (an older version
//! during a rolling upgrade) answers `Unimplemented`; the caller then falls
//! back to the unary method ([`Pipeline::call_or`]), and the pipeline tries
//! the stream again after [`RETRY_UNSUPPORTED`].

use futures::{Stream, StreamExt};
use pushcluster_core::batch::Batcher;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

/// How long a pipeline keeps to unary calls after the server said it does
/// not know the stream method.
pub const RETRY_UNSUPPORTED: Duration = Duration::from_secs(30);

/// The request stream a pipeline hands to its `open` function.
pub type Calls<Req> = UnboundedReceiverStream<Req>;

/// What `open` returns: the server's reply stream once it has answered.
pub type Opening<Rep> = Pin<Box<dyn Future<Output = Result<Streaming<Rep>, Status>> + Send>>;

/// The reply stream a server returns from a stream method.
pub type Replies<Rep> = Pin<Box<dyn Stream<Item = Result<Rep, Status>> + Send>>;

/// Why a pipelined call has no reply.
#[derive(Debug)]
pub enum CallError<Req> {
    /// The call never left: no stream could be opened (connection refused,
    /// or `Unimplemented` from an older server). Here is the request back,
    /// for the unary method.
    NotSent(Status, Req),
    /// The call was sent and then its stream broke or went quiet past the
    /// deadline: the server may or may not have acted on it.
    Failed(Status),
}

type Waiting<Rep> = oneshot::Sender<Result<Rep, Status>>;

/// The `open` and `unary` arguments of [`pipelined_batcher`] for a tonic
/// client: `calls!(client, stream_method, unary_method)`, each call on a
/// clone of `client` (clones share its channel).
#[macro_export]
macro_rules! calls {
    ($client:expr, $stream:ident, $unary:ident) => {{
        let open = {
            let client = $client.clone();
            move |calls| -> $crate::pipeline::Opening<_> {
                let mut client = client.clone();
                Box::pin(async move {
                    client
                        .$stream(calls)
                        .await
                        .map(::tonic::Response::into_inner)
                })
            }
        };
        let unary = {
            let client = $client.clone();
            move |req| {
                let mut client = client.clone();
                async move { client.$unary(req).await.map(::tonic::Response::into_inner) }
            }
        };
        (open, unary)
    }};
}

/// A [`Batcher`] whose batches travel pipelined on one long-lived stream:
/// the shape of both batched calls on the push path (web's pushes to a
/// comet, a comet's appends to the message service).
///
/// Items that arrive while a batch is in flight leave together in the next
/// one (at most `max_batch`, `in_flight` batches at once). `open` opens the
/// stream (a tonic client's stream method); a server without it (the
/// previous release during a rolling upgrade) gets `unary`. `wrap` makes a
/// batch into a request, and `split` a reply, or the call's failure, into one
/// outcome per item, in order.
#[allow(clippy::too_many_arguments)]
pub fn pipelined_batcher<Item, Req, Rep, Out, O, U, UFut>(
    deadline: Duration,
    max_batch: usize,
    in_flight: usize,
    open: O,
    unary: U,
    wrap: fn(Vec<Item>) -> Req,
    split: fn(Result<Rep, Status>, usize) -> Vec<Out>,
) -> Batcher<Item, Out>
where
    Item: Send + 'static,
    Req: Send + 'static,
    Rep: Send + 'static,
    Out: Send + 'static,
    O: Fn(Calls<Req>) -> Opening<Rep> + Send + Sync + 'static,
    U: Fn(Req) -> UFut + Clone + Send + Sync + 'static,
    UFut: Future<Output = Result<Rep, Status>> + Send + 'static,
{
    let stream = Arc::new(Pipeline::new(deadline, open));
    Batcher::new(max_batch, in_flight, move |items| {
        let (stream, unary) = (stream.clone(), unary.clone());
        async move {
            let n = items.len();
            split(stream.call_or(wrap(items), unary).await, n)
        }
    })
}

/// Sends calls over one bidirectional stream; see the module docs.
///
/// The pipeline does not bound how many calls are in flight: its callers do
/// (pushcluster's services put a batcher with a fixed number in front).
pub struct Pipeline<Req, Rep> {
    open: Box<dyn Fn(Calls<Req>) -> Opening<Rep> + Send + Sync>,
    deadline: Duration,
    state: tokio::sync::Mutex<State<Req, Rep>>,
}

enum State<Req, Rep> {
    Closed,
    Open(Arc<Conn<Req, Rep>>),
    Unsupported(Instant),
}

/// One open stream: the sending half and the calls waiting for replies, in
/// the order they were sent. One lock covers both so that order holds.
struct Conn<Req, Rep> {
    inner: Mutex<Inner<Req, Rep>>,
    closed: CancellationToken,
}

struct Inner<Req, Rep> {
    tx: Option<mpsc::UnboundedSender<Req>>,
    waiting: VecDeque<Waiting<Rep>>,
}

impl<Req: Send + 'static, Rep: Send + 'static> Pipeline<Req, Rep> {
    /// A pipeline that opens its stream with `open` (e.g. a tonic client's
    /// stream method) and fails a call that has no reply after `deadline`.
    pub fn new<F>(deadline: Duration, open: F) -> Self
    where
        F: Fn(Calls<Req>) -> Opening<Rep> + Send + Sync + 'static,
    {
        Self {
            open: Box::new(open),
            deadline,
            state: tokio::sync::Mutex::new(State::Closed),
        }
    }

    /// Sends `req` on the stream (opening it if needed) and waits for its reply.
    pub async fn call(&self, mut req: Req) -> Result<Rep, CallError<Req>> {
        // A stream may close between being handed out and the send; the
        // request did not leave then, so one more stream is worth a try.
        for _ in 0..2 {
            let conn = match self.conn().await {
                Ok(c) => c,
                Err(s) => return Err(CallError::NotSent(s, req)),
            };
            let reply = match conn.send(req) {
                Ok(r) => r,
                Err(back) => {
                    req = back;
                    continue;
                }
            };
            return match tokio::time::timeout(self.deadline, reply).await {
                Ok(Ok(r)) => r.map_err(CallError::Failed),
                Ok(Err(_)) => Err(CallError::Failed(Status::unavailable(
                    "the stream closed before the reply",
                ))),
                Err(_) => {
                    // A stream that leaves a call unanswered this long is
                    // stuck; later calls go on a fresh one.
                    let why = format!("no reply within {:?}", self.deadline);
                    conn.close(&Status::unavailable(why.clone()));
                    Err(CallError::Failed(Status::unavailable(why)))
                }
            };
        }
        Err(CallError::NotSent(
            Status::unavailable("the stream closed as it opened"),
            req,
        ))
    }

    /// As [`Self::call`], but a request the server's missing stream method
    /// (`Unimplemented`) sent back goes to `unary`, and any failure is its
    /// status.
    pub async fn call_or<F, Fut>(&self, req: Req, unary: F) -> Result<Rep, Status>
    where
        F: FnOnce(Req) -> Fut,
        Fut: Future<Output = Result<Rep, Status>>,
    {
        match self.call(req).await {
            Ok(r) => Ok(r),
            Err(CallError::NotSent(s, req)) if s.code() == Code::Unimplemented => unary(req).await,
            Err(CallError::NotSent(s, _) | CallError::Failed(s)) => Err(s),
        }
    }

    /// The open stream, opened now if there is none.
    async fn conn(&self) -> Result<Arc<Conn<Req, Rep>>, Status> {
        let mut state = self.state.lock().await;
        match &*state {
            State::Open(c) if !c.closed.is_cancelled() => return Ok(c.clone()),
            State::Unsupported(at) if at.elapsed() < RETRY_UNSUPPORTED => {
                return Err(Status::unimplemented("the server has no stream method"))
            }
            _ => {}
        }
        let (tx, rx) = mpsc::unbounded_channel();
        match (self.open)(UnboundedReceiverStream::new(rx)).await {
            Ok(replies) => {
                let conn = Arc::new(Conn {
                    inner: Mutex::new(Inner {
                        tx: Some(tx),
                        waiting: VecDeque::new(),
                    }),
                    closed: CancellationToken::new(),
                });
                tokio::spawn(read(conn.clone(), replies));
                *state = State::Open(conn.clone());
                Ok(conn)
            }
            Err(s) => {
                *state = if s.code() == Code::Unimplemented {
                    State::Unsupported(Instant::now())
                } else {
                    State::Closed
                };
                Err(s)
            }
        }
    }
}

impl<Req, Rep> Conn<Req, Rep> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<Req, Rep>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `req` on the stream; gives it back if the stream is closed.
    fn send(&self, req: Req) -> Result<oneshot::Receiver<Result<Rep, Status>>, Req> {
        let mut inner = self.lock();
        let Some(tx) = &inner.tx else {
            return Err(req);
        };
        if let Err(e) = tx.send(req) {
            // The request stream is gone (its HTTP/2 stream ended) before
            // the reader noticed: close now, so the retry opens a new one.
            drop(inner);
            self.close(&Status::unavailable("the request stream ended"));
            return Err(e.0);
        }
        let (reply, wait) = oneshot::channel();
        inner.waiting.push_back(reply);
        Ok(wait)
    }

    /// The call the next reply answers.
    fn next_waiting(&self) -> Option<Waiting<Rep>> {
        self.lock().waiting.pop_front()
    }

    /// Ends the request stream and fails every call still waiting with `why`.
    fn close(&self, why: &Status) {
        let waiting = {
            let mut inner = self.lock();
            inner.tx = None;
            std::mem::take(&mut inner.waiting)
        };
        self.closed.cancel();
        for w in waiting {
            // Unavailable: the caller cannot know whether the call was acted
            // on, and treats it like a server it did not reach.
            let _ = w.send(Err(Status::unavailable(format!(
                "stream broke: {}",
                why.message()
            ))));
        }
    }
}

/// Hands each reply to the call it answers until the stream ends or breaks.
async fn read<Req, Rep>(conn: Arc<Conn<Req, Rep>>, mut replies: Streaming<Rep>) {
    let why = loop {
        let next = tokio::select! {
            r = replies.message() => r,
            () = conn.closed.cancelled() => return,
        };
        match next {
            Ok(Some(rep)) => match conn.next_waiting() {
                Some(w) => {
                    // The caller may have given up; nothing to do then.
                    let _ = w.send(Ok(rep));
                }
                None => break Status::internal("a reply that answers no call"),
            },
            Ok(None) => break Status::unavailable("the server ended the stream"),
            Err(s) => break s,
        }
    };
    conn.close(&why);
}

/// The server side: answers each call on `calls` with `answer`, up to
/// `concurrency` at once, and sends the replies in the calls' order. A
/// broken request stream ends the replies with its error.
///
/// Once `drain` fires the server takes no more calls, answers those it took
/// and ends the stream: a graceful shutdown waits for open streams, and a
/// client's stream would otherwise stay open for ever. The client fails the
/// calls it sent that were not taken as unavailable (they were not acted on)
/// and opens its next stream elsewhere.
pub fn answer_in_order<Req, Rep, F, Fut>(
    calls: Streaming<Req>,
    concurrency: usize,
    drain: CancellationToken,
    answer: F,
) -> Replies<Rep>
where
    Req: Send + 'static,
    Rep: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Rep> + Send + 'static,
{
    Box::pin(
        calls
            .take_until(drain.cancelled_owned())
            .map(move |call| {
                let answering = call.map(&answer);
                async move {
                    match answering {
                        Ok(a) => Ok(a.await),
                        Err(s) => Err(s),
                    }
                }
            })
            .buffered(concurrency.max(1)),
    )
}
