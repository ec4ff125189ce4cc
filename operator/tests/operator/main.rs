//! Operator tests: CRD schema, desired objects (snapshots), the Helm chart and
//! reconcile against a fake API server. One test binary for all of them.

mod builders;
mod chart;
mod crd;
mod reconcile;
