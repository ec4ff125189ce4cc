//! Prometheus metrics of the control loop.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub(crate) reason: &'static str,
}

/// Metrics of the control loop.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) reconciles: Counter,
    pub(crate) failures: Family<ErrorLabels, Counter>,
    pub(crate) duration: Histogram,
    pub(crate) applied: Counter,
}

impl Metrics {
    /// Registers the operator's metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            applied: Counter::default(),
        };
        reg.register(
            "pushcluster_operator_reconciles",
            "Reconciliations",
            m.reconciles.clone(),
        );
        reg.register(
            "pushcluster_operator_reconcile_errors",
            "Failed reconciliations by reason",
            m.failures.clone(),
        );
        reg.register(
            "pushcluster_operator_reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        reg.register(
            "pushcluster_operator_applied_objects",
            "Child objects written",
            m.applied.clone(),
        );
        m
    }
}
