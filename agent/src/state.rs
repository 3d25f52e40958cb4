//! What the agent knows about the mesh, rebuilt from each accepted config: every meshed workload
//! by IP (local pods and peers on other nodes) with its identity and node, and the authorization
//! policies. Connection handlers take a snapshot; a reload swaps it whole.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, RwLock},
};

use crate::{
    config::{Config, InboundMode, PodId},
    identity::Identity,
    l7::service::Services,
    policy::PolicySet,
    stats::{Peer, Stats},
};

#[derive(Debug)]
pub struct Workload {
    pub id: PodId,
    /// The workload (owner) name metrics and logs use.
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub identity: Identity,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub inbound_mode: InboundMode,
    /// How metrics and logs name it.
    pub peer: Peer,
}

pub struct MeshState {
    /// The configuration this state was built from.
    pub config: Arc<Config>,
    pub node_name: String,
    workloads: HashMap<Ipv4Addr, Arc<Workload>>,
    pub policies: PolicySet,
    pub services: Services,
}

impl MeshState {
    /// Without an identity section there is no mesh: no workload is known, all traffic is L4
    /// (services still balance, over plain TCP). `previous` carries the services' run-time state;
    /// their counters live in `stats`.
    pub fn from_config(config: &Config, previous: &Services, stats: &Stats) -> Self {
        let node_name = config.agent.node_name.clone();
        let mut workloads = HashMap::new();
        if let Some(identity) = &config.identity {
            let td = &identity.trust_domain;
            for pod in &config.pods {
                let identity = Identity::new(td, &pod.namespace, &pod.service_account);
                let workload = Workload {
                    peer: Peer::new(
                        pod.workload_name(),
                        &pod.namespace,
                        Some(identity.to_string()),
                    ),
                    id: pod.id(),
                    name: pod.workload_name().to_owned(),
                    namespace: pod.namespace.clone(),
                    ip: pod.ip,
                    identity,
                    node: node_name.clone(),
                    labels: pod.labels.clone(),
                    inbound_mode: pod.inbound_mode,
                };
                workloads.insert(pod.ip, Arc::new(workload));
            }
            for peer in &config.peers {
                let identity = Identity::new(td, &peer.namespace, &peer.service_account);
                let workload = Workload {
                    peer: Peer::new(
                        peer.workload_name(),
                        &peer.namespace,
                        Some(identity.to_string()),
                    ),
                    id: PodId::new(&peer.namespace, &peer.name),
                    name: peer.workload_name().to_owned(),
                    namespace: peer.namespace.clone(),
                    ip: peer.ip,
                    identity,
                    node: peer.node.clone(),
                    labels: peer.labels.clone(),
                    inbound_mode: InboundMode::default(),
                };
                workloads.insert(peer.ip, Arc::new(workload));
            }
        }
        Self {
            config: Arc::new(config.clone()),
            node_name,
            workloads,
            policies: PolicySet::new(&config.policies),
            services: Services::build(config, previous, stats),
        }
    }

    /// Every meshed workload, local and on other nodes.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// The meshed workload at `ip`, on any node.
    pub fn workload(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// How metrics name whoever is at `ip`: its workload, or `unknown` outside the mesh.
    pub fn peer_at(&self, ip: Ipv4Addr) -> Peer {
        self.workload(ip)
            .map(|w| w.peer.clone())
            .unwrap_or_else(Peer::unknown)
    }

    /// The meshed workload at `ip` if it runs on this node.
    pub fn local_workload(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.workload(ip).filter(|w| w.node == self.node_name)
    }
}

/// The current [`MeshState`], replaced whole on reload.
pub struct SharedState(RwLock<Arc<MeshState>>);

impl SharedState {
    pub fn new(state: MeshState) -> Self {
        Self(RwLock::new(Arc::new(state)))
    }

    pub fn get(&self) -> Arc<MeshState> {
        Arc::clone(&crate::read(&self.0))
    }

    pub fn replace(&self, state: MeshState) {
        *crate::write(&self.0) = Arc::new(state);
    }
}
