//! The state every handler shares, and the checks both listeners apply to
//! what a request names (key, expiry, message).

use crate::clients::Clients;
use crate::metrics::Metrics;
use crate::push::{PushPath, Pushes};
use crate::reply::Reply;
use crate::request::param;
use crate::{Config, Error};
use prometheus_client::registry::Registry;
use pushcluster_core::membership::Membership;
use pushcluster_proto::tls::ClientTls;
use std::collections::HashMap;
use std::sync::Arc;

/// Shared state of the web handlers.
pub struct AppState {
    pub(crate) cfg: Config,
    pub(crate) membership: Arc<dyn Membership>,
    pub(crate) clients: Arc<Clients>,
    pub(crate) pushes: Pushes,
    pub(crate) metrics: Metrics,
    /// How long `/1/server/get` waits for a lost comet's successor (see
    /// [`crate::public`]); `None` answers at once.
    pub(crate) handover_within: Option<std::time::Duration>,
    /// Fires when web starts draining: waiting resolves answer at once.
    pub(crate) draining: tokio_util::sync::CancellationToken,
}

impl AppState {
    /// Builds the state; `membership` tells where each shard's comet is.
    /// The push path follows the storage kind: Redis when `store` names one.
    /// `draining` ends the waits of resolves for a lost comet.
    pub fn new(
        cfg: Config,
        membership: Arc<dyn Membership>,
        draining: tokio_util::sync::CancellationToken,
        reg: &mut Registry,
    ) -> Result<Arc<Self>, Error> {
        let handover_within = cfg.membership.handover_within();
        let clients = Arc::new(Clients::new(
            &cfg.message_url,
            cfg.rpc_token.as_deref(),
            ClientTls::load(cfg.rpc_tls.as_ref())?,
            cfg.rpc_timeout_ms,
            cfg.max_rpc_bytes(),
        )?);
        // Lazily: web comes up (and serves reads) while Redis is down.
        let path = match cfg
            .store
            .open(cfg.rpc_token.as_deref())
            .map_err(Error::Store)?
        {
            Some(redis) => {
                if let Some(url) = cfg.store.url() {
                    tracing::info!(url = %pushcluster_core::ops::redact_url(url), "storing private pushes straight into redis");
                }
                PushPath::StoreInRedis(redis)
            }
            None => PushPath::ThroughComets,
        };
        let metrics = Metrics::register(reg);
        let pushes = Pushes::new(
            path,
            clients.clone(),
            membership.clone(),
            cfg.limits.clone(),
            metrics.clone(),
        );
        Ok(Arc::new(Self {
            cfg,
            membership,
            clients,
            pushes,
            metrics,
            handover_within,
            draining,
        }))
    }

    /// A present key within the limits, or the parameter error to answer.
    pub(crate) fn check_key<'a>(&self, key: Option<&'a str>) -> Result<&'a str, Reply> {
        let key = key.ok_or_else(|| Reply::param("key is required"))?;
        self.cfg
            .limits
            .check_key(key)
            .map_err(|e| Reply::param(format!("key {key:?}: {e}")))?;
        Ok(key)
    }

    /// The `expire` parameter in seconds (0 when absent: the default).
    pub(crate) fn expire(&self, q: &HashMap<String, String>) -> Result<u64, Reply> {
        let secs = match param(q, "expire") {
            None => 0,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| Reply::param("expire must be a whole number of seconds"))?,
        };
        self.cfg
            .limits
            .expire(secs)
            .map(|d| d.as_secs())
            .map_err(|e| Reply::param(e.to_string()))
    }

    /// A message within the limits (size, JSON).
    pub(crate) fn check_message(&self, body: &[u8]) -> Result<(), Reply> {
        self.cfg
            .limits
            .check_message(body)
            .map_err(|e| Reply::param(e.to_string()))
    }
}
