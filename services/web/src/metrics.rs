//! Web's metrics, and the one layer that counts every request by route and
//! reply code.

use crate::reply::Ret;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    ret: u32,
}

/// Metrics of web.
#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    pub(crate) push_latency: Histogram,
    pub(crate) stored_without_comet: Counter,
    pub(crate) store_retries: Counter,
    pub(crate) told_comet: Counter,
}

impl Metrics {
    /// Registers web's metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            stored_without_comet: Counter::default(),
            store_retries: Counter::default(),
            told_comet: Counter::default(),
        };
        reg.register(
            "pushcluster_web_store_retries",
            "Stores retried because the message service was unreachable",
            m.store_retries.clone(),
        );
        reg.register(
            "pushcluster_web_requests",
            "HTTP requests by route and ret",
            m.requests.clone(),
        );
        reg.register(
            "pushcluster_web_push_latency_seconds",
            "Admin push latency, from request to acknowledgement",
            m.push_latency.clone(),
        );
        reg.register(
            "pushcluster_web_stored_without_comet",
            "Pushes stored directly because no comet could take them",
            m.stored_without_comet.clone(),
        );
        reg.register(
            "pushcluster_web_told_comet",
            "Pushes web stored itself and then handed to the key's comet for its connected subscribers",
            m.told_comet.clone(),
        );
        m
    }

    /// Counts a finished request.
    pub fn request(&self, route: &'static str, ret: u32) {
        self.requests
            .get_or_create(&RequestLabels { route, ret })
            .inc();
    }
}

/// Every route of both listeners: the `route` label takes one of these (a
/// static string, so counting a request allocates nothing).
const ROUTES: &[&str] = &[
    "/1/server/get",
    "/1/msg/get",
    "/1/time/get",
    "/server/get",
    "/msg/get",
    "/time/get",
    "/openapi.json",
    "/1/admin/push/private",
    "/1/admin/push/mprivate",
    "/1/admin/push/broadcast",
    "/1/admin/msg/del",
    "/admin/push",
    "/admin/msg/clean",
];

/// The `route` label of a request: its route, or `unmatched`.
fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    matched
        .and_then(|m| ROUTES.iter().find(|r| **r == m.as_str()))
        .copied()
        .unwrap_or("unmatched")
}

/// Counts each request under its route and the `ret` its reply carries.
pub(crate) async fn count_requests(
    axum::extract::State(m): axum::extract::State<Metrics>,
    req: Request,
    next: Next,
) -> Response {
    let route = route_label(req.extensions().get::<MatchedPath>());
    let res = next.run(req).await;
    let ret = res.extensions().get::<Ret>().map_or(0, |r| r.0);
    m.request(route, ret);
    res
}
