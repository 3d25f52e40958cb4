//! weft, the node agent. A connection's path through this crate:
//! `datapath` (eBPF hooks redirect an enrolled pod's connect to 127.0.0.1:15001 in that pod) →
//! `enrollment` (opened that listener inside the pod's netns via `netns`) →
//! `proxy` (accepts, asks `datapath` for the original destination; a meshed destination in
//! `state` goes through `tunnel`, an mTLS HTTP/2 CONNECT stream with certificates from
//! `identity`; anything else is connected from inside the pod as plain TCP) →
//! on the destination node, `inbound` (accepts the tunnel in the destination pod, checks the
//! peer's identity and `policy`, and connects to the app from the client's address; plaintext
//! arriving at the pod is steered there by `datapath`'s sk_lookup program).
//! `stats` counts it all (`l7::observe` per request), `metrics` renders the counts for Prometheus,
//! `access_log` writes a line per connection and request, `admin` serves them with `graph`, and
//! `agent` wires it together.
pub mod access_log;
pub mod admin;
pub mod agent;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod enrollment;
pub mod graph;
pub mod handover;
pub mod identity;
pub mod inbound;
pub mod kubernetes;
pub mod l7;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod podns;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod stats;
pub mod tunnel;

/// Locks a mutex, ignoring poisoning: none of the state behind weft's mutexes can be left
/// half-updated by a panicking holder.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read-locks an RwLock, ignoring poisoning (see [`lock`]).
pub(crate) fn read<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write-locks an RwLock, ignoring poisoning (see [`lock`]).
pub(crate) fn write<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
