//! Keeps the cluster's objects current: one kube-rs watcher per resource feeding a reflector
//! store. A store keeps its objects while its watch fails (API server restart, dropped
//! connection) and swaps a re-list in whole once it is complete (410 Gone), so no enrolled pod
//! drops out while the agent cannot see the API server. Every change wakes [`ClusterWatch::changes`].
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher::{self, Event},
        WatchStreamExt,
    },
    Api, Client,
};
use serde::Serialize;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::model::ClusterObjects;
use crate::{config::KubernetesSettings, lock};

/// Changes often come in bursts (a rollout touches a pod, its slice and its replica set);
/// one rebuild after they settle is enough.
pub const SETTLE: Duration = Duration::from_millis(100);

/// How each watch is doing, for `/config_dump` and `/ready`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WatchStatus {
    /// The first complete list has arrived.
    pub synced: bool,
    /// The last error, until the watch next delivers an event (a watch that resumes without
    /// a change shows its last error until something changes).
    pub last_error: Option<String>,
    pub errors_total: u64,
}

pub type WatchStatusTable = Arc<Mutex<BTreeMap<&'static str, WatchStatus>>>;

#[derive(Clone)]
pub struct ClusterWatch {
    namespaces: Store<Namespace>,
    local_pods: Store<Pod>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    policies: Store<DynamicObject>,
    routes: Store<DynamicObject>,
    changed: Arc<Notify>,
    status: WatchStatusTable,
}

fn custom_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("weft.dev", "v1alpha1", kind), plural)
}

impl ClusterWatch {
    /// Connects with the kubeconfig given, or in-cluster credentials / `KUBECONFIG`, and starts
    /// the watchers. Returns at once; [`synced`](Self::synced) says when the first lists are in.
    pub async fn start(settings: &KubernetesSettings, node_name: &str) -> Result<Self> {
        let client = match &settings.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                let config =
                    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                        .await
                        .with_context(|| format!("kubeconfig {}", path.display()))?;
                Client::try_from(config).context("creating the Kubernetes client")?
            }
            None => Client::try_default()
                .await
                .context("no Kubernetes credentials (in-cluster service account or KUBECONFIG)")?,
        };
        let changed = Arc::new(Notify::new());
        let status = WatchStatusTable::default();
        let watch = Watches {
            changed: &changed,
            status: &status,
        };
        let local = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let policies = custom_resource("AuthorizationPolicy", "authorizationpolicies");
        let routes = custom_resource("HTTPRoute", "httproutes");
        Ok(Self {
            namespaces: watch.typed("namespaces", Api::all(client.clone()), Default::default()),
            local_pods: watch.typed("pods on this node", Api::all(client.clone()), local),
            pods: watch.start("pods", (), |writer| {
                let api = Api::<Pod>::all(client.clone());
                reflector::reflector(
                    writer,
                    watcher::watcher(api, Default::default())
                        .default_backoff()
                        .modify(keep_identity_fields),
                )
            }),
            services: watch.typed("services", Api::all(client.clone()), Default::default()),
            endpoint_slices: watch.typed(
                "endpointslices",
                Api::all(client.clone()),
                Default::default(),
            ),
            policies: watch.start("authorizationpolicies", policies.clone(), |writer| {
                let api = Api::<DynamicObject>::all_with(client.clone(), &policies);
                reflector::reflector(
                    writer,
                    watcher::watcher(api, Default::default()).default_backoff(),
                )
            }),
            routes: watch.start("httproutes", routes.clone(), |writer| {
                let api = Api::<DynamicObject>::all_with(client.clone(), &routes);
                reflector::reflector(
                    writer,
                    watcher::watcher(api, Default::default()).default_backoff(),
                )
            }),
            changed,
            status,
        })
    }

    /// True once every watch has had its first complete list.
    pub fn synced(&self) -> bool {
        lock(&self.status).values().all(|s| s.synced)
    }

    pub fn status(&self) -> WatchStatusTable {
        Arc::clone(&self.status)
    }

    /// Resolves at the next change. Cancel-safe (a `select!` may drop it): a notification not
    /// taken stays for the next call. The caller waits [`SETTLE`] before reading the stores.
    pub async fn changes(&self) {
        self.changed.notified().await;
    }

    pub fn objects(&self) -> ClusterObjects {
        ClusterObjects {
            namespaces: self.namespaces.state(),
            local_pods: self.local_pods.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            policies: self.policies.state(),
            routes: self.routes.state(),
        }
    }

    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&reflector::ObjectRef::new(name))
    }

    /// This node's pod `namespace/name`, if the watch has seen it.
    pub fn local_pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.local_pods
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }
}

/// Peers need only their address, node, service account, labels and owner: the rest of a pod
/// (containers, volumes, managed fields) would cost memory for every pod of the cluster.
fn keep_identity_fields(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.clear();
        spec.init_containers = None;
        spec.volumes = None;
        spec.tolerations = None;
        spec.affinity = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.conditions = None;
    }
}

struct Watches<'a> {
    changed: &'a Arc<Notify>,
    status: &'a WatchStatusTable,
}

impl Watches<'_> {
    fn typed<K>(&self, name: &'static str, api: Api<K>, config: watcher::Config) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        self.start(name, (), |writer| {
            reflector::reflector(writer, watcher::watcher(api, config).default_backoff())
        })
    }

    /// Spawns the task that drives `name`'s watch into a new store, and reports its progress.
    fn start<K, S>(
        &self,
        name: &'static str,
        dynamic_type: K::DynamicType,
        stream: impl FnOnce(reflector::store::Writer<K>) -> S,
    ) -> Store<K>
    where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash,
        S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    {
        let writer = reflector::store::Writer::new(dynamic_type);
        let reader = writer.as_reader();
        lock(self.status).insert(name, WatchStatus::default());
        let events = stream(writer);
        tokio::spawn(drive(
            name,
            events,
            Arc::clone(self.changed),
            Arc::clone(self.status),
        ));
        reader
    }
}

async fn drive<K, S>(name: &'static str, events: S, changed: Arc<Notify>, status: WatchStatusTable)
where
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let mut table = lock(&status);
        let Some(state) = table.get_mut(name) else {
            return;
        };
        match event {
            Ok(event) => {
                if let Some(error) = state.last_error.take() {
                    info!(watch = name, last_error = %error, "watch recovered");
                }
                match event {
                    // A (re-)list is complete: the store has just swapped it in.
                    Event::InitDone => {
                        if !state.synced {
                            debug!(watch = name, "first list complete");
                        }
                        state.synced = true;
                        changed.notify_one();
                    }
                    Event::Apply(_) | Event::Delete(_) => changed.notify_one(),
                    Event::Init | Event::InitApply(_) => {}
                }
            }
            Err(err) => {
                state.errors_total += 1;
                let missing = is_not_found(&err);
                if state.last_error.is_none() {
                    if missing {
                        warn!(watch = name, "resource not served by the API server (CRDs from deploy/crds not installed?); none assumed, retrying");
                    } else {
                        warn!(watch = name, error = %err, "watch failed; objects already seen are kept, retrying");
                    }
                }
                // A custom resource that is not installed has no objects: that is a complete,
                // empty list, and must not hold up readiness.
                if missing && !state.synced {
                    state.synced = true;
                    changed.notify_one();
                }
                state.last_error = Some(err.to_string());
            }
        }
    }
}

fn is_not_found(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}
