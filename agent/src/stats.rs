//! In-memory L4 counters per (source pod, original destination). Counters are shared with the
//! connection tasks and move while a connection is open, not only when it closes.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use serde::Serialize;

use crate::{config::PodId, lock};

#[derive(Default)]
pub struct FlowCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub failed: AtomicU64,
    /// Bytes from the pod towards the destination.
    pub bytes_sent: AtomicU64,
    /// Bytes from the destination back to the pod.
    pub bytes_received: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowSnapshot {
    pub source_pod: PodId,
    pub destination: SocketAddrV4,
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub active: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Default)]
pub struct Stats {
    flows: Mutex<HashMap<(PodId, SocketAddrV4), Arc<FlowCounters>>>,
    /// Connections accepted on a pod listener that the eBPF programs did not redirect.
    pub unknown_origin: AtomicU64,
}

impl Stats {
    pub fn flow(&self, pod: &PodId, destination: SocketAddrV4) -> Arc<FlowCounters> {
        let mut flows = lock(&self.flows);
        Arc::clone(flows.entry((pod.clone(), destination)).or_default())
    }

    pub fn snapshot(&self) -> Vec<FlowSnapshot> {
        let flows = lock(&self.flows);
        let mut snapshot: Vec<FlowSnapshot> = flows
            .iter()
            .map(|((pod, destination), c)| {
                let (opened, closed, failed) = (
                    c.opened.load(Relaxed),
                    c.closed.load(Relaxed),
                    c.failed.load(Relaxed),
                );
                FlowSnapshot {
                    source_pod: pod.clone(),
                    destination: *destination,
                    opened,
                    closed,
                    failed,
                    active: opened.saturating_sub(closed + failed),
                    bytes_sent: c.bytes_sent.load(Relaxed),
                    bytes_received: c.bytes_received.load(Relaxed),
                }
            })
            .collect();
        snapshot
            .sort_by(|a, b| (&a.source_pod, a.destination).cmp(&(&b.source_pod, b.destination)));
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_counted_per_pod_and_destination() {
        let stats = Stats::default();
        let (web, db) = (PodId::new("default", "web"), PodId::new("default", "db"));
        let dst: SocketAddrV4 = "10.0.0.1:80".parse().unwrap();
        stats.flow(&web, dst).opened.fetch_add(1, Relaxed);
        stats.flow(&web, dst).opened.fetch_add(1, Relaxed);
        stats.flow(&web, dst).closed.fetch_add(1, Relaxed);
        stats.flow(&web, dst).bytes_sent.fetch_add(10, Relaxed);
        stats.flow(&db, dst).failed.fetch_add(1, Relaxed);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.len(), 2);
        let web_flow = snapshot.iter().find(|f| f.source_pod == web).unwrap();
        assert_eq!(
            (
                web_flow.opened,
                web_flow.closed,
                web_flow.active,
                web_flow.bytes_sent
            ),
            (2, 1, 1, 10)
        );
        let db_flow = snapshot.iter().find(|f| f.source_pod == db).unwrap();
        assert_eq!((db_flow.failed, db_flow.active), (1, 0));
    }
}
