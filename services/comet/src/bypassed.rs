//! Pushes stored around this comet, heard from the message service.
//!
//! On the embedded store a push reaches its comet over gRPC from web. When
//! the comet fails it or does not answer, web stores the push itself and
//! hands it over with `Deliver`; but a comet that web cannot reach (a
//! broken route between them, while clients still reach the comet) would
//! never get it, and its connected clients would see it only at their next
//! reconnect. So web marks such stores `announce`, and every comet follows
//! the message service's `Bypassed` stream and delivers what it hears to
//! the key's connections, exactly as `Deliver` would: in mid order, a gap
//! filled by the clients' fetch, a mid they already have dropped.
//!
//! A comet that falls so far behind that the message service dropped
//! announcements for it cannot know which keys they were for: it asks all
//! its clients to reconnect, and they fetch what they missed by mid. While
//! the stream is down (the message service restarting), web cannot store
//! either, so nothing is acknowledged that an announcement would be lost
//! for. On Redis this path is not used: every store publishes on the key's
//! live channel ([`crate::live`]).

use crate::comet::Comet;
use pushcluster_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// First pause before following again after the stream ended.
const RETRY: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Follows the message service's announcements until `cancel` fires.
pub(crate) async fn follow(comet: Arc<Comet>, cancel: CancellationToken) {
    let mut pause = RETRY;
    loop {
        let mut message = comet.message.clone();
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            r = message.bypassed(pb::BypassedRequest {}) => r,
        };
        match opened {
            Ok(stream) => {
                pause = RETRY;
                let mut stream = stream.into_inner();
                loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => return,
                        n = stream.message() => n,
                    };
                    match next {
                        Ok(Some(d)) => {
                            let (Some(m), key) = (d.message, d.key) else {
                                continue;
                            };
                            match comet.deliver_private(&key, m) {
                                Ok(n) => {
                                    comet.metrics.deliveries.inc_by(n);
                                }
                                Err(e) => tracing::warn!(error = %e, "announced message refused"),
                            }
                        }
                        Ok(None) => break,
                        Err(s) if s.code() == tonic::Code::DataLoss => {
                            let n = comet.registry.reconnect_all();
                            tracing::warn!(error = %s, connections = n, "missed announced messages: asked every client to reconnect");
                            break;
                        }
                        Err(s) => {
                            tracing::warn!(error = %s, "announced messages: stream broke");
                            break;
                        }
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                // A message service of the previous release announces
                // nothing; web's Deliver still reaches this comet.
                tracing::info!("the message service announces no bypassed pushes");
                return;
            }
            Err(s) => tracing::debug!(error = %s, "following announced messages failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}
