//! Web's gRPC clients: the message service, and one client per comet address,
//! made on first use and kept (connections are lazy and reused).

use crate::Error;
use pushcluster_proto::auth::{AuthChannel, RpcToken};
use pushcluster_proto::tls::{endpoint, ClientTls};
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::message_client::MessageClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The message service's client and the comets' clients.
pub struct Clients {
    /// The message service.
    pub message: MessageClient<AuthChannel>,
    comets: Mutex<HashMap<String, CometClient<AuthChannel>>>,
    probes: Mutex<HashMap<String, (Instant, Probe)>>,
    rpc_token: RpcToken,
    tls: Option<ClientTls>,
    timeout_ms: u64,
    max_bytes: usize,
}

impl Clients {
    /// Clients that send `rpc_token`, connect with `tls` when given, wait
    /// `timeout_ms` per call and carry messages up to `max_bytes`.
    pub fn new(
        message_url: &str,
        rpc_token: Option<&str>,
        tls: Option<ClientTls>,
        timeout_ms: u64,
        max_bytes: usize,
    ) -> Result<Self, Error> {
        let rpc_token = RpcToken::new(rpc_token).map_err(Error::RpcToken)?;
        let message =
            MessageClient::new(rpc_token.on(channel(message_url, tls.as_ref(), timeout_ms)?))
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes);
        Ok(Self {
            message,
            comets: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            rpc_token,
            tls,
            timeout_ms,
            max_bytes,
        })
    }

    /// A client for the comet at `rpc`.
    pub fn comet(&self, rpc: &str) -> Result<CometClient<AuthChannel>, Error> {
        let mut map = self.comets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(rpc) {
            return Ok(c.clone());
        }
        let c = CometClient::new(self.rpc_token.on(channel(
            rpc,
            self.tls.as_ref(),
            self.timeout_ms,
        )?))
        .max_decoding_message_size(self.max_bytes)
        .max_encoding_message_size(self.max_bytes);
        map.insert(rpc.to_owned(), c.clone());
        Ok(c)
    }

    /// Whether the comet at `rpc` answers a call within `PROBE_DEADLINE`.
    /// One call per address per `PROBE_FRESH`: when a comet dies, the
    /// thousands of clients that lost it together ask about it together,
    /// and all share that one answer.
    pub async fn comet_answers(&self, rpc: &str) -> bool {
        let probe = {
            let mut map = self.probes.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, (at, _)| at.elapsed() < PROBE_FRESH);
            map.entry(rpc.to_owned())
                .or_insert_with(|| (Instant::now(), Probe::default()))
                .1
                .clone()
        };
        let Ok(mut comet) = self.comet(rpc) else {
            return false;
        };
        *probe
            .get_or_init(|| async move {
                let mut req = tonic::Request::new(pushcluster_proto::v1::StatsRequest {});
                req.set_timeout(PROBE_DEADLINE);
                tokio::time::timeout(PROBE_DEADLINE, comet.stats(req))
                    .await
                    .is_ok_and(|r| r.is_ok())
            })
            .await
    }

    /// The deadline of one call.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// One shared answer to "does this comet answer?".
type Probe = Arc<tokio::sync::OnceCell<bool>>;

/// How long after it began one probe's answer stands for every client
/// asking: long enough to share among the clients that lost one comet
/// together, short enough that "it answered" is not older than the loss a
/// client reports (a comet that answered just before it died).
const PROBE_FRESH: Duration = Duration::from_millis(100);
/// How long a live comet has to answer a probe; one that is stopped or
/// cut off counts as gone after this.
const PROBE_DEADLINE: Duration = Duration::from_millis(300);

fn channel(url: &str, tls: Option<&ClientTls>, timeout_ms: u64) -> Result<Channel, Error> {
    Ok(endpoint(url, tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_millis(timeout_ms.max(1)))
        .tcp_nodelay(true)
        .connect_lazy())
}
