//! From Kubernetes objects to the agent's own model: the same pod, peer, service, policy and route
//! entries the config file has, so both sources feed one state. Pure functions: the watchers hand
//! in what their stores hold, the result is merged with the file's config.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service, ServicePort as KubeServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{api::DynamicObject, ResourceExt};
use serde::Serialize;

use crate::{
    config::{
        AppProtocol, Config, InboundMode, OutlierSpec, PeerSpec, PodSpec, ServicePort, ServiceSpec,
    },
    l7::route::{validate_routes, HttpRoute, RouteMetadata, ServicePortKey},
    policy::{validate_policies, AuthorizationPolicy, PolicyMetadata},
};

/// `weft.dev/mesh=enabled` on a namespace enrolls its pods; `=disabled` on a pod opts it out.
pub const MESH_LABEL: &str = "weft.dev/mesh";
/// `STRICT` or `PERMISSIVE`, on a namespace or (winning) on a pod.
pub const INBOUND_MODE_ANNOTATION: &str = "weft.dev/inbound-mode";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// What the watchers' stores hold at one moment.
#[derive(Clone, Default)]
pub struct ClusterObjects {
    pub namespaces: Vec<Arc<Namespace>>,
    /// Pods scheduled on this node.
    pub local_pods: Vec<Arc<Pod>>,
    /// Pods of the whole cluster (for peers' addresses, nodes and identities).
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub policies: Vec<Arc<DynamicObject>>,
    pub routes: Vec<Arc<DynamicObject>>,
}

/// The agent's view of the cluster, in config-file terms.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterConfig {
    pub enrolled_namespaces: BTreeSet<String>,
    pub pods: Vec<PodSpec>,
    pub peers: Vec<PeerSpec>,
    pub services: Vec<ServiceSpec>,
    pub policies: Vec<AuthorizationPolicy>,
    pub routes: Vec<HttpRoute>,
    /// Objects left out, and why (shown in `/config_dump`).
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// `Kind namespace/name`.
    pub object: String,
    pub reason: String,
}

impl Skipped {
    fn new(kind: &str, namespace: &str, name: &str, reason: impl Into<String>) -> Self {
        Self {
            object: format!("{kind} {namespace}/{name}"),
            reason: reason.into(),
        }
    }
}

pub fn namespace_enrolled(namespace: &Namespace) -> bool {
    namespace.labels().get(MESH_LABEL).map(String::as_str) == Some("enabled")
}

/// Turns the cluster's objects into pods (this node's), peers (other nodes'), services, policies
/// and routes. An object that cannot be used is skipped with a reason; the rest still apply.
pub fn derive(objects: &ClusterObjects, node_name: &str) -> ClusterConfig {
    let mut out = ClusterConfig::default();
    let mut namespace_modes = BTreeMap::new();
    for namespace in &objects.namespaces {
        if namespace_enrolled(namespace) {
            out.enrolled_namespaces.insert(namespace.name_any());
            namespace_modes.insert(namespace.name_any(), inbound_mode(namespace.annotations()));
        }
    }
    let mut seen_ips = HashSet::new();
    for pod in &objects.local_pods {
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let Some(namespace_mode) = namespace_modes.get(&namespace) else {
            continue;
        };
        if pod_node(pod) != Some(node_name) || pod_finished(pod) {
            continue;
        }
        let spec = pod_ip(pod)
            .context("no pod IP yet")
            .and_then(|ip| local_pod_spec(pod, ip, *namespace_mode));
        match spec {
            Ok(spec) if seen_ips.insert(spec.ip) => out.pods.push(spec),
            Ok(spec) => out.skipped.push(Skipped::new(
                "Pod",
                &namespace,
                &name,
                format!("ip {} is already another pod's", spec.ip),
            )),
            Err(err) => {
                out.skipped
                    .push(Skipped::new("Pod", &namespace, &name, format!("{err:#}")))
            }
        }
    }
    for pod in &objects.pods {
        let namespace = pod.namespace().unwrap_or_default();
        let Some(node) = pod_node(pod) else { continue };
        if node == node_name || !namespace_modes.contains_key(&namespace) || pod_finished(pod) {
            continue;
        }
        // Peers are many and not ours to fix: one that cannot be meshed is left out quietly,
        // its own node's agent reports it.
        let Some(ip) = pod_ip(pod) else { continue };
        if !meshable(pod) || !seen_ips.insert(ip) {
            continue;
        }
        out.peers.push(PeerSpec {
            name: pod.name_any(),
            namespace,
            ip,
            service_account: service_account(pod),
            node: node.to_owned(),
            labels: pod.labels().clone(),
            workload: Some(workload_name(pod)),
        });
    }
    let mut service_ports = HashSet::new();
    for service in &objects.services {
        match service_spec(service, &objects.endpoint_slices) {
            Ok(spec) => {
                for port in &spec.ports {
                    service_ports.insert(ServicePortKey {
                        namespace: spec.namespace.clone(),
                        name: spec.name.clone(),
                        port: port.port,
                    });
                }
                out.services.push(spec);
            }
            Err(err) => out.skipped.push(Skipped::new(
                "Service",
                &service.namespace().unwrap_or_default(),
                &service.name_any(),
                format!("{err:#}"),
            )),
        }
    }
    for object in &objects.policies {
        let policy = custom_object(object).and_then(|(metadata, spec)| {
            let policy = AuthorizationPolicy {
                metadata: PolicyMetadata {
                    name: metadata.0,
                    namespace: metadata.1,
                },
                spec: serde_json::from_value(spec).context("invalid spec")?,
            };
            validate_policies(std::slice::from_ref(&policy))?;
            Ok(policy)
        });
        match policy {
            Ok(policy) => out.policies.push(policy),
            Err(err) => out
                .skipped
                .push(skipped_custom("AuthorizationPolicy", object, err)),
        }
    }
    for object in &objects.routes {
        let route = custom_object(object).and_then(|(metadata, spec)| {
            let route = HttpRoute {
                metadata: RouteMetadata {
                    name: metadata.0,
                    namespace: metadata.1,
                },
                spec: serde_json::from_value(spec).context("invalid spec")?,
            };
            validate_routes(std::slice::from_ref(&route), &service_ports)?;
            Ok(route)
        });
        match route {
            Ok(route) => out.routes.push(route),
            Err(err) => out.skipped.push(skipped_custom("HTTPRoute", object, err)),
        }
    }
    // Stores list in no particular order; a stable order keeps equal views equal.
    out.pods.sort_by_key(PodSpec::id);
    out.peers
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.policies.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    out.routes.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    out.skipped.sort_by(|a, b| a.object.cmp(&b.object));
    out
}

/// This node's pod as the agent enrolls it, at `ip` (from the pod's status, or from the CNI
/// result before the API server has it). Its network namespace is found by UID unless the CNI
/// plugin named it.
pub fn local_pod_spec(pod: &Pod, ip: Ipv4Addr, namespace_mode: InboundMode) -> Result<PodSpec> {
    if !meshable(pod) {
        if host_network(pod) {
            bail!("hostNetwork pods are never enrolled");
        }
        bail!("opted out with label {MESH_LABEL}=disabled");
    }
    let uid = pod.uid().context("the pod has no uid")?;
    let annotated = pod
        .annotations()
        .get(INBOUND_MODE_ANNOTATION)
        .map(|_| inbound_mode(pod.annotations()));
    Ok(PodSpec {
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        netns: None,
        uid: Some(uid),
        ip,
        service_account: service_account(pod),
        labels: pod.labels().clone(),
        inbound_mode: annotated.unwrap_or(namespace_mode),
        workload: Some(workload_name(pod)),
    })
}

/// The inbound mode a namespace's pods get, for pods enrolled before the API server lists them.
pub fn namespace_inbound_mode(namespace: &Namespace) -> InboundMode {
    inbound_mode(namespace.annotations())
}

fn inbound_mode(annotations: &BTreeMap<String, String>) -> InboundMode {
    match annotations.get(INBOUND_MODE_ANNOTATION).map(String::as_str) {
        Some("STRICT") => InboundMode::Strict,
        _ => InboundMode::Permissive,
    }
}

fn meshable(pod: &Pod) -> bool {
    !host_network(pod) && pod.labels().get(MESH_LABEL).map(String::as_str) != Some("disabled")
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.host_network)
        .unwrap_or(false)
}

fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Finished pods keep their object (and, briefly, their IP) but no longer run; their address
/// may already be another pod's.
fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    status
        .pod_ip
        .as_deref()
        .into_iter()
        .chain(listed)
        .find_map(|ip| ip.parse().ok())
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// The workload a pod belongs to, as metrics name it: a Deployment's pods are named after the
/// Deployment (their ReplicaSet's name less the template hash), other controllers' after the
/// controller, bare pods after themselves.
pub fn workload_name(pod: &Pod) -> String {
    let owner = pod
        .owner_references()
        .iter()
        .find(|owner| owner.controller == Some(true));
    match owner {
        Some(owner) if owner.kind == "ReplicaSet" => {
            match pod.labels().get(POD_TEMPLATE_HASH_LABEL) {
                Some(hash) => owner
                    .name
                    .strip_suffix(hash.as_str())
                    .and_then(|name| name.strip_suffix('-'))
                    .unwrap_or(&owner.name)
                    .to_owned(),
                None => owner.name.clone(),
            }
        }
        Some(owner) => owner.name.clone(),
        None => pod.name_any(),
    }
}

fn service_spec(service: &Service, slices: &[Arc<EndpointSlice>]) -> Result<ServiceSpec> {
    let (namespace, name) = (service.namespace().unwrap_or_default(), service.name_any());
    let spec = service.spec.as_ref().context("no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        bail!("ExternalName services have no endpoints to balance");
    }
    let vips: Vec<Ipv4Addr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut vips, ip| {
            if !vips.contains(&ip) {
                vips.push(ip);
            }
            vips
        });
    if vips.is_empty() {
        bail!("no IPv4 cluster IP (headless services are reached at their pods' addresses)");
    }
    let slices: Vec<&EndpointSlice> = slices
        .iter()
        .map(Arc::as_ref)
        .filter(|slice| {
            slice.namespace().as_deref() == Some(namespace.as_str())
                && slice.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                && slice.address_type == "IPv4"
        })
        .collect();
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let port_number = u16::try_from(port.port)
            .with_context(|| format!("port {} is out of range", port.port))?;
        let target_port = target_port(port, &slices).with_context(|| {
            format!("port {port_number}: cannot tell which port the endpoints listen on")
        })?;
        ports.push(ServicePort {
            port: port_number,
            target_port: Some(target_port),
            protocol: app_protocol(port),
        });
    }
    if ports.is_empty() {
        bail!("no TCP port");
    }
    let mut endpoints = Vec::new();
    for slice in &slices {
        for endpoint in slice.endpoints.iter().flatten() {
            // Kubernetes says an endpoint with an unknown condition is ready.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    if !endpoints.contains(&ip) {
                        endpoints.push(ip);
                    }
                }
            }
        }
    }
    if endpoints.is_empty() {
        bail!("no ready endpoint");
    }
    endpoints.sort();
    Ok(ServiceSpec {
        name,
        namespace,
        vips,
        ports,
        selector: BTreeMap::new(),
        endpoints,
        outlier_detection: OutlierSpec::default(),
        retry_budget: Some(Default::default()),
    })
}

/// The endpoints' port for a service port: what the EndpointSlices publish under the port's
/// name (the only way to resolve a named target port), else a numeric target port.
fn target_port(port: &KubeServicePort, slices: &[&EndpointSlice]) -> Option<u16> {
    let name = port.name.as_deref().unwrap_or("");
    let published = slices
        .iter()
        .flat_map(|slice| slice.ports.iter().flatten())
        .find(|p| p.name.as_deref().unwrap_or("") == name)
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    published.or(match &port.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(_)) => None,
        None => u16::try_from(port.port).ok(),
    })
}

/// `appProtocol` first, then the port name's prefix (`http-web`, `grpc`), as Istio reads them.
fn app_protocol(port: &KubeServicePort) -> Option<AppProtocol> {
    let by_name = port
        .name
        .as_deref()
        .map(|name| name.split('-').next().unwrap_or(name));
    let declared = port.app_protocol.as_deref().or(by_name)?;
    match declared.to_ascii_lowercase().as_str() {
        "http" => Some(AppProtocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(AppProtocol::Http2),
        "grpc" => Some(AppProtocol::Grpc),
        "tcp" => Some(AppProtocol::Tcp),
        _ => None,
    }
}

type ObjectName = (String, String);

fn custom_object(object: &DynamicObject) -> Result<(ObjectName, serde_json::Value)> {
    let namespace = object.namespace().context("not namespaced")?;
    let spec = object.data.get("spec").cloned().context("no spec")?;
    Ok(((object.name_any(), namespace), spec))
}

fn skipped_custom(kind: &str, object: &DynamicObject, err: anyhow::Error) -> Skipped {
    Skipped::new(
        kind,
        &object.namespace().unwrap_or_default(),
        &object.name_any(),
        format!("{err:#}"),
    )
}

/// The config in force: the file's entries plus the cluster's. On a clash (same pod, address,
/// service, VIP or object name) the file wins and the cluster's entry is reported as skipped.
/// Pods the CNI plugin enrolled (by UID) keep the network namespace path it gave, and are
/// enrolled before the API server has their address, as long as their namespace is; pods whose
/// sandbox the plugin saw go (`cni_deleted`) are left out while the API server still lists them.
pub fn merge(
    file: &Config,
    cluster: &ClusterConfig,
    cni_pods: &BTreeMap<String, PodSpec>,
    cni_deleted: &BTreeSet<String>,
) -> (Config, Vec<Skipped>) {
    let mut config = file.clone();
    let mut skipped = cluster.skipped.clone();
    let mut ips: HashSet<Ipv4Addr> = file
        .pods
        .iter()
        .map(|p| p.ip)
        .chain(file.peers.iter().map(|p| p.ip))
        .collect();
    let pod_ids: HashSet<_> = file.pods.iter().map(PodSpec::id).collect();
    let listed: HashSet<&String> = cluster.pods.iter().filter_map(|p| p.uid.as_ref()).collect();
    let early = cni_pods.iter().filter(|(uid, pod)| {
        !listed.contains(uid) && cluster.enrolled_namespaces.contains(&pod.namespace)
    });
    let deleted = |pod: &&PodSpec| {
        pod.uid
            .as_ref()
            .is_some_and(|uid| cni_deleted.contains(uid))
    };
    for pod in cluster.pods.iter().chain(early.map(|(_, pod)| pod)) {
        if deleted(&pod) {
            skipped.push(Skipped::new(
                "Pod",
                &pod.namespace,
                &pod.name,
                "its sandbox was deleted (CNI DEL); waiting for the pod to go",
            ));
            continue;
        }
        if pod_ids.contains(&pod.id()) || !ips.insert(pod.ip) {
            skipped.push(Skipped::new(
                "Pod",
                &pod.namespace,
                &pod.name,
                "the config file lists this pod or its address",
            ));
            continue;
        }
        let mut pod = pod.clone();
        if let Some(cni) = pod.uid.as_ref().and_then(|uid| cni_pods.get(uid)) {
            pod.netns.clone_from(&cni.netns);
        }
        config.pods.push(pod);
    }
    // Pods the plugin enrolled before the API server had their address are no longer skipped.
    skipped.retain(|s| {
        !config
            .pods
            .iter()
            .any(|pod| s.object == format!("Pod {}/{}", pod.namespace, pod.name))
    });
    for peer in &cluster.peers {
        if ips.insert(peer.ip) {
            config.peers.push(peer.clone());
        }
    }
    let names: HashSet<_> = file
        .services
        .iter()
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect();
    let mut vips: HashSet<Ipv4Addr> = file.services.iter().flat_map(|s| s.vips.clone()).collect();
    for service in &cluster.services {
        let clash = names.contains(&(service.namespace.clone(), service.name.clone()))
            || service
                .vips
                .iter()
                .any(|vip| vips.contains(vip) || ips.contains(vip));
        if clash {
            skipped.push(Skipped::new(
                "Service",
                &service.namespace,
                &service.name,
                "the config file has a service of this name or address",
            ));
            continue;
        }
        vips.extend(service.vips.iter().copied());
        config.services.push(service.clone());
    }
    let policy_names: HashSet<_> = file
        .policies
        .iter()
        .map(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()))
        .collect();
    config.policies.extend(
        cluster
            .policies
            .iter()
            .filter(|p| {
                !policy_names.contains(&(p.metadata.namespace.clone(), p.metadata.name.clone()))
            })
            .cloned(),
    );
    let route_names: HashSet<_> = file
        .routes
        .iter()
        .map(|r| (r.metadata.namespace.clone(), r.metadata.name.clone()))
        .collect();
    config.routes.extend(
        cluster
            .routes
            .iter()
            .filter(|r| {
                !route_names.contains(&(r.metadata.namespace.clone(), r.metadata.name.clone()))
            })
            .cloned(),
    );
    (config, skipped)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn object<K: serde::de::DeserializeOwned>(value: Value) -> Arc<K> {
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn namespace(name: &str, labels: Value, annotations: Value) -> Arc<Namespace> {
        object(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "resourceVersion": "10",
                         "labels": labels, "annotations": annotations,
                         "creationTimestamp": "2026-11-01T10:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }))
    }

    /// A pod as the API server returns it for a Deployment's replica.
    fn pod(namespace: &str, name: &str, node: &str, ip: Option<&str>, extra: Value) -> Value {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": namespace,
                "uid": format!(
                    "0c3b6a1e-8f2d-4c55-9a7b-{:0>12}",
                    name.bytes().map(u64::from).sum::<u64>()
                ),
                "resourceVersion": "4711",
                "labels": {"app": "web", "pod-template-hash": "5d8f7c9b4"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-5d8f7c9b4", "uid": "6d1f0f6e-1111-4b5c-8d9e-0123456789ab",
                    "controller": true, "blockOwnerDeletion": true}]
            },
            "spec": {
                "nodeName": node, "serviceAccountName": "web", "serviceAccount": "web",
                "containers": [{"name": "web", "image": "nginx:1.27",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}],
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"
            },
            "status": {"phase": "Running", "hostIP": "192.168.1.10",
                       "startTime": "2026-11-01T10:00:00Z"}
        });
        if let Some(ip) = ip {
            pod["status"]["podIP"] = json!(ip);
            pod["status"]["podIPs"] = json!([{"ip": ip}]);
        }
        merge_json(&mut pod, extra);
        pod
    }

    fn merge_json(target: &mut Value, patch: Value) {
        match (target, patch) {
            (Value::Object(target), Value::Object(patch)) => {
                for (key, value) in patch {
                    merge_json(target.entry(key).or_insert(Value::Null), value);
                }
            }
            (target, patch) => *target = patch,
        }
    }

    fn service() -> Arc<Service> {
        object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "5f5b1c1a-2222-4d3e-9f00-aaaaaaaaaaaa",
                         "resourceVersion": "900"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "10.96.0.80", "clusterIPs": ["10.96.0.80"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "selector": {"app": "web"}, "sessionAffinity": "None",
                "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                    {"name": "grpc-api", "port": 9090, "protocol": "TCP", "targetPort": 9091},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}
                ]
            },
            "status": {"loadBalancer": {}}
        }))
    }

    fn endpoint_slice() -> Arc<EndpointSlice> {
        object(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                              "uid": "5f5b1c1a-2222-4d3e-9f00-aaaaaaaaaaaa", "controller": true,
                              "blockOwnerDeletion": true}]},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-1", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}},
                {"addresses": ["10.244.2.4"], "conditions": {"ready": true},
                 "nodeName": "node-2", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-2"}},
                {"addresses": ["10.244.2.9"], "conditions": {"ready": false, "serving": false, "terminating": true},
                 "nodeName": "node-2"}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "grpc-api", "port": 9091, "protocol": "TCP"}]
        }))
    }

    fn custom(kind: &str, plural: &str, name: &str, spec: Value) -> Arc<DynamicObject> {
        object(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "shop", "uid": format!("{plural}-{name}"),
                         "resourceVersion": "77", "generation": 1},
            "spec": spec
        }))
    }

    fn cluster() -> ClusterObjects {
        let local = |name, ip, extra| object::<Pod>(pod("shop", name, "node-1", ip, extra));
        ClusterObjects {
            namespaces: vec![
                namespace(
                    "shop",
                    json!({"weft.dev/mesh": "enabled", "kubernetes.io/metadata.name": "shop"}),
                    json!({"weft.dev/inbound-mode": "STRICT"}),
                ),
                namespace("plain", json!({"weft.dev/mesh": "disabled"}), json!({})),
            ],
            local_pods: vec![
                local("web-1", Some("10.244.1.7"), json!({})),
                local(
                    "web-3",
                    Some("10.244.1.8"),
                    json!({"metadata": {"annotations": {"weft.dev/inbound-mode": "PERMISSIVE"}}}),
                ),
                local("web-4", None, json!({})),
                local(
                    "agent",
                    Some("192.168.1.10"),
                    json!({"spec": {"hostNetwork": true}}),
                ),
                local(
                    "batch",
                    Some("10.244.1.20"),
                    json!({"metadata": {"labels": {"weft.dev/mesh": "disabled"}}}),
                ),
                local(
                    "done",
                    Some("10.244.1.21"),
                    json!({"status": {"phase": "Succeeded"}}),
                ),
                object(pod(
                    "plain",
                    "other",
                    "node-1",
                    Some("10.244.1.30"),
                    json!({}),
                )),
            ],
            pods: vec![
                object(pod(
                    "shop",
                    "web-1",
                    "node-1",
                    Some("10.244.1.7"),
                    json!({}),
                )),
                object(pod(
                    "shop",
                    "web-2",
                    "node-2",
                    Some("10.244.2.4"),
                    json!({}),
                )),
                object(pod(
                    "shop",
                    "cron",
                    "node-2",
                    Some("10.244.2.5"),
                    json!({"metadata": {"ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                        "name": "cron-29000", "uid": "7e0f0000-0000-4000-8000-000000000001", "controller": true}]}}),
                )),
                object(pod("plain", "far", "node-2", Some("10.244.2.6"), json!({}))),
            ],
            services: vec![service()],
            endpoint_slices: vec![endpoint_slice()],
            policies: vec![
                custom(
                    "AuthorizationPolicy",
                    "authorizationpolicies",
                    "web-clients",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                           "rules": [{"from": [{"source": {"namespaces": ["shop"]}}],
                                      "to": [{"operation": {"ports": [8080]}}]}]}),
                ),
                custom(
                    "AuthorizationPolicy",
                    "authorizationpolicies",
                    "broken",
                    json!({"action": "MAYBE"}),
                ),
            ],
            routes: vec![custom(
                "HTTPRoute",
                "httproutes",
                "web-retries",
                json!({"parentRefs": [{"name": "web", "port": 80}], "rules": [{}]}),
            )],
        }
    }

    #[test]
    fn enrolled_namespaces_pods_become_local_pods_and_peers() {
        let derived = derive(&cluster(), "node-1");
        assert_eq!(
            derived.enrolled_namespaces,
            BTreeSet::from(["shop".to_owned()])
        );
        let pods: Vec<_> = derived
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.ip.to_string(), p.inbound_mode))
            .collect();
        assert_eq!(
            pods,
            [
                ("web-1", "10.244.1.7".to_owned(), InboundMode::Strict),
                ("web-3", "10.244.1.8".to_owned(), InboundMode::Permissive),
            ]
        );
        let web = &derived.pods[0];
        assert_eq!(
            web.uid.as_deref(),
            Some("0c3b6a1e-8f2d-4c55-9a7b-000000000412")
        );
        assert_eq!(
            (web.netns.as_ref(), web.service_account.as_str()),
            (None, "web")
        );
        assert_eq!(web.workload.as_deref(), Some("web"), "Deployment name");
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

        let peers: Vec<_> = derived
            .peers
            .iter()
            .map(|p| (p.name.as_str(), p.node.as_str(), p.workload.as_deref()))
            .collect();
        assert_eq!(
            peers,
            [
                ("cron", "node-2", Some("cron-29000")),
                ("web-2", "node-2", Some("web"))
            ]
        );
        let skipped: Vec<_> = derived
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.object, s.reason))
            .collect();
        assert_eq!(
            skipped,
            [
                "AuthorizationPolicy shop/broken: invalid spec: unknown variant `MAYBE`, expected `ALLOW` or `DENY`",
                "Pod shop/agent: hostNetwork pods are never enrolled",
                "Pod shop/batch: opted out with label weft.dev/mesh=disabled",
                "Pod shop/web-4: no pod IP yet",
            ]
        );
    }

    #[test]
    fn services_take_ready_endpoints_and_resolve_named_ports() {
        let derived = derive(&cluster(), "node-1");
        let [web] = derived.services.as_slice() else {
            panic!("one service expected: {:?}", derived.services);
        };
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
        assert_eq!(web.vips, [Ipv4Addr::new(10, 96, 0, 80)]);
        assert_eq!(
            web.endpoints,
            [Ipv4Addr::new(10, 244, 1, 7), Ipv4Addr::new(10, 244, 2, 4)],
            "the endpoint that is not ready is left out"
        );
        let ports: Vec<_> = web
            .ports
            .iter()
            .map(|p| (p.port, p.target_port(), p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                (80, 8080, Some(AppProtocol::Http)),
                (9090, 9091, Some(AppProtocol::Grpc))
            ],
            "UDP is not proxied; the named target port comes from the slice"
        );
    }

    #[test]
    fn services_without_cluster_ip_or_ready_endpoints_are_skipped() {
        let mut objects = cluster();
        let mut headless: Service = (*service()).clone();
        headless.metadata.name = Some("db".into());
        if let Some(spec) = headless.spec.as_mut() {
            spec.cluster_ip = Some("None".into());
            spec.cluster_ips = Some(vec!["None".into()]);
        }
        let mut lonely: Service = (*service()).clone();
        lonely.metadata.name = Some("lonely".into());
        if let Some(spec) = lonely.spec.as_mut() {
            spec.cluster_ip = Some("10.96.0.81".into());
            spec.cluster_ips = None;
        }
        objects.services = vec![Arc::new(headless), Arc::new(lonely)];
        let derived = derive(&objects, "node-1");
        assert!(derived.services.is_empty());
        let reasons: Vec<_> = derived
            .skipped
            .iter()
            .filter(|s| s.object.starts_with("Service"))
            .map(|s| format!("{}: {}", s.object, s.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                "Service shop/db: no IPv4 cluster IP (headless services are reached at their pods' addresses)",
                "Service shop/lonely: port 80: cannot tell which port the endpoints listen on",
            ]
        );
    }

    #[test]
    fn custom_resources_become_policies_and_routes() {
        let derived = derive(&cluster(), "node-1");
        let [policy] = derived.policies.as_slice() else {
            panic!("one valid policy expected");
        };
        assert_eq!(policy.metadata.name, "web-clients");
        assert_eq!(policy.spec.rules[0].to[0].operation.ports, [8080]);
        assert_eq!(derived.routes.len(), 1);
        assert_eq!(derived.routes[0].spec.parent_refs[0].port, Some(80));
    }

    #[test]
    fn unlabelling_the_namespace_releases_its_pods() {
        let mut objects = cluster();
        objects.namespaces = vec![namespace("shop", json!({}), json!({}))];
        let derived = derive(&objects, "node-1");
        assert!(derived.pods.is_empty() && derived.peers.is_empty());
        assert!(derived.enrolled_namespaces.is_empty());
    }

    fn file_config() -> Config {
        Config::parse(
            "agent: {node_name: node-1}\n\
             identity: {trust_domain: cluster.local, ca_cert: /ca.pem, ca_key: /ca-key.pem}\n\
             pods:\n  - {name: legacy, namespace: shop, netns: /var/run/netns/legacy, ip: 10.244.1.8}\n",
        )
        .unwrap()
    }

    #[test]
    fn merge_keeps_the_file_first_and_the_cni_netns() {
        let derived = derive(&cluster(), "node-1");
        let web = derived.pods[0].clone();
        let uid = web.uid.clone().unwrap();
        let early = PodSpec {
            name: "fresh".into(),
            uid: Some("9d9e0000-0000-4000-8000-000000000009".into()),
            netns: Some("/var/run/netns/cni-fresh".into()),
            ip: Ipv4Addr::new(10, 244, 1, 40),
            ..web.clone()
        };
        let cni = BTreeMap::from([
            (
                uid,
                PodSpec {
                    netns: Some("/var/run/netns/cni-web".into()),
                    ..web
                },
            ),
            (early.uid.clone().unwrap(), early),
        ]);
        let (config, skipped) = merge(&file_config(), &derived, &cni, &BTreeSet::new());
        config.validate().unwrap();
        let pods: Vec<_> = config
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.netns_source()))
            .collect();
        assert_eq!(
            pods,
            [
                ("legacy", "/var/run/netns/legacy".to_owned()),
                ("web-1", "/var/run/netns/cni-web".to_owned()),
                ("fresh", "/var/run/netns/cni-fresh".to_owned()),
            ],
            "web-3 clashes with the file's address"
        );
        assert!(skipped
            .iter()
            .any(|s| s.object == "Pod shop/web-3" && s.reason.contains("config file")));
        assert!(
            !skipped.iter().any(|s| s.object == "Pod shop/fresh"),
            "a pod the CNI plugin enrolled is not reported as skipped: {skipped:?}"
        );
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.services.len(), 1);
        assert_eq!((config.policies.len(), config.routes.len()), (1, 1));
    }

    #[test]
    fn a_pod_whose_sandbox_was_deleted_is_not_enrolled_again_by_uid() {
        let derived = derive(&cluster(), "node-1");
        let web_uid = derived.pods[0].uid.clone().unwrap();
        let (config, skipped) = merge(
            &Config::default(),
            &derived,
            &BTreeMap::new(),
            &BTreeSet::from([web_uid]),
        );
        let pods: Vec<_> = config.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(pods, ["web-3"]);
        assert!(skipped
            .iter()
            .any(|s| s.object == "Pod shop/web-1" && s.reason.contains("CNI DEL")));
    }
}
