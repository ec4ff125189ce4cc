//! Lease tests: the ownership state machine, the Redis and Kubernetes
//! backends, membership. One test binary for all of them.

mod kubernetes;
mod membership;
mod owner;
mod redis_backend;
