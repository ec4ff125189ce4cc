//! Web's gRPC clients: the message service, and one client per comet address,
//! made on first use and kept (connections are lazy and reused).

use crate::Error;
use pushcluster_proto::auth::{AuthChannel, RpcToken};
use pushcluster_proto::v1::comet_client::CometClient;
use pushcluster_proto::v1::message_client::MessageClient;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// The message service's client and the comets' clients.
pub struct Clients {
    /// The message service.
    pub message: MessageClient<AuthChannel>,
    comets: Mutex<HashMap<String, CometClient<AuthChannel>>>,
    rpc_token: RpcToken,
    timeout_ms: u64,
    max_bytes: usize,
}

impl Clients {
    /// Clients that send `rpc_token`, wait `timeout_ms` per call and carry
    /// messages up to `max_bytes`.
    pub fn new(
        message_url: &str,
        rpc_token: Option<&str>,
        timeout_ms: u64,
        max_bytes: usize,
    ) -> Result<Self, Error> {
        let rpc_token = RpcToken::new(rpc_token).map_err(Error::RpcToken)?;
        let message = MessageClient::new(rpc_token.on(channel(message_url, timeout_ms)?))
            .max_decoding_message_size(max_bytes)
            .max_encoding_message_size(max_bytes);
        Ok(Self {
            message,
            comets: Mutex::new(HashMap::new()),
            rpc_token,
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
        let c = CometClient::new(self.rpc_token.on(channel(rpc, self.timeout_ms)?))
            .max_decoding_message_size(self.max_bytes)
            .max_encoding_message_size(self.max_bytes);
        map.insert(rpc.to_owned(), c.clone());
        Ok(c)
    }

    /// The deadline of one call.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

fn channel(url: &str, timeout_ms: u64) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|source| Error::Endpoint {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_millis(timeout_ms.max(1)))
        .tcp_nodelay(true)
        .connect_lazy())
}
