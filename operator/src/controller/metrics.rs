//! Prometheus metrics of the control loop.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub(crate) reason: &'static str,
}

/// Which PushCluster, and why it is degraded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DegradedLabels {
    /// The PushCluster's namespace: scrape the operator with honorLabels,
    /// so this wins over the operator pod's own namespace.
    pub(crate) namespace: String,
    pub(crate) pushcluster: String,
    pub(crate) reason: &'static str,
}

/// Metrics of the control loop.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) reconciles: Counter,
    /// 1 while a PushCluster's last reconcile failed for a reason; the
    /// series goes once a reconcile succeeds.
    pub(crate) degraded: Family<DegradedLabels, Gauge>,
    pub(crate) failures: Family<ErrorLabels, Counter>,
    pub(crate) duration: Histogram,
    pub(crate) applied: Counter,
}

impl Metrics {
    /// Registers the operator's metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            degraded: Family::default(),
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
            "pushcluster_operator_cluster_degraded",
            "1 while a PushCluster's reconcile fails, by reason (CredentialsFailed: its credentials Secret cannot be read or made; ApplyFailed: a child object was refused)",
            m.degraded.clone(),
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

impl Metrics {
    /// Marks `namespace/name` degraded for `reason` (and for no other).
    pub fn set_degraded(&self, namespace: &str, name: &str, reason: Option<&'static str>) {
        for r in DEGRADED_REASONS {
            let labels = DegradedLabels {
                namespace: namespace.to_owned(),
                pushcluster: name.to_owned(),
                reason: r,
            };
            if reason == Some(r) {
                self.degraded.get_or_create(&labels).set(1);
            } else {
                self.degraded.remove(&labels);
            }
        }
    }
}

/// The reasons [`Metrics::set_degraded`] reports.
const DEGRADED_REASONS: [&str; 2] = ["CredentialsFailed", "ApplyFailed"];

#[cfg(test)]
mod tests {
    use super::Metrics;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    #[test]
    fn a_degraded_cluster_has_one_series_until_it_recovers_or_goes() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        let text = |reg: &Registry| {
            let mut t = String::new();
            encode(&mut t, reg).unwrap();
            // A family's series come in hash order.
            let mut lines: Vec<String> = t
                .lines()
                .filter(|l| l.starts_with("pushcluster_operator_cluster_degraded{"))
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines
        };
        m.set_degraded("a", "chat", Some("ApplyFailed"));
        m.set_degraded("a", "chat", Some("CredentialsFailed"));
        m.set_degraded("b", "mail", Some("ApplyFailed"));
        assert_eq!(
            text(&reg),
            [
                r#"pushcluster_operator_cluster_degraded{namespace="a",pushcluster="chat",reason="CredentialsFailed"} 1"#,
                r#"pushcluster_operator_cluster_degraded{namespace="b",pushcluster="mail",reason="ApplyFailed"} 1"#,
            ]
        );
        m.set_degraded("a", "chat", None);
        m.set_degraded("b", "mail", None);
        assert!(text(&reg).is_empty(), "{:?}", text(&reg));
    }
}
