//! System tests: the real binaries as processes on loopback. One test binary
//! for all of them (nextest still runs each test in its own process), so a
//! build links the dependency graph once instead of once per file.

mod auth;
mod bypass;
mod compat;
mod delivery;
mod durability;
mod epochs;
mod errors;
mod failover;
mod fencing;
mod hostile;
mod idempotency;
mod live;
mod monitoring;
mod pushctl;
mod redis_faults;
mod redis_ha;
mod sizes;
mod tls;
mod upgrade;
