//! Operator tests: CRD schema, desired objects (snapshots), the Helm chart and
//! reconcile against a fake API server. One test binary for all of them.

mod chart;
mod children;
mod crd;
mod listeners;
mod reconcile;
