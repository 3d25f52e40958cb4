//! weft, the node agent. A connection's path through this crate:
//! `datapath` (eBPF hooks redirect an enrolled pod's connect to 127.0.0.1:15001 in that pod) →
//! `enrollment` (opened that listener inside the pod's netns via `netns`) →
//! `proxy` (accepts, asks `datapath` for the original destination, connects from inside the pod,
//! copies bytes, counts them in `stats`). `agent` wires it together; `admin` shows the counters.
pub mod admin;
pub mod agent;
pub mod config;
pub mod datapath;
pub mod enrollment;
pub mod netns;
pub mod proxy;
pub mod stats;

/// Locks a mutex, ignoring poisoning: none of the state behind weft's mutexes can be left
/// half-updated by a panicking holder.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
