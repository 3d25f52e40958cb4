//! What the agent does when the CNI plugin calls at a pod's ADD, DEL or CHECK: decide from the
//! watched Namespace and Pod whether the pod is meshed, and if so what to enroll. Enrolling
//! itself is the agent loop's job (it owns the enrollment), so this returns an [`Admission`].
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use tracing::debug;

use super::{
    model::{local_pod_spec, namespace_enrolled, namespace_inbound_mode},
    watch::ClusterWatch,
};
use crate::{
    cni::{CniCommand, CniRequest, CniResponse},
    config::{PodId, PodSpec},
};

/// The kubelet creates the Pod object before it asks the runtime for a sandbox, but this node's
/// watch may see it a little later than the plugin calls.
const POD_WAIT: Duration = Duration::from_secs(5);
const POD_POLL: Duration = Duration::from_millis(50);

pub enum Admission {
    /// Enroll this pod now, then answer.
    Enroll(PodSpec),
    /// The pod's sandbox is going: forget what the plugin said about it.
    Release { uid: String },
    /// Answer `enrolled` if the pod is, else an error.
    Check(PodId),
    /// Nothing to do but answer.
    Answer(CniResponse),
}

fn error(text: impl Into<String>) -> Admission {
    Admission::Answer(CniResponse::Error { error: text.into() })
}

fn not_meshed(reason: impl Into<String>) -> Admission {
    Admission::Answer(CniResponse::NotMeshed {
        reason: reason.into(),
    })
}

pub async fn admit(cluster: &ClusterWatch, request: &CniRequest) -> Admission {
    if request.command == CniCommand::Del {
        return Admission::Release {
            uid: request.pod_uid.clone(),
        };
    }
    if !cluster.synced() {
        return error("the agent has not loaded the cluster's state yet; try again");
    }
    let (namespace, name) = (&request.pod_namespace, &request.pod_name);
    let Some(ns) = cluster.namespace(namespace) else {
        return error(format!("namespace {namespace} is not known to the agent"));
    };
    if !namespace_enrolled(&ns) {
        return not_meshed(format!("namespace {namespace} is not enrolled"));
    }
    let mut waited = Duration::ZERO;
    let pod = loop {
        if let Some(pod) = cluster.local_pod(namespace, name) {
            break pod;
        }
        if waited >= POD_WAIT {
            return error(format!(
                "pod {namespace}/{name} is not among this node's pods on the API server"
            ));
        }
        tokio::time::sleep(POD_POLL).await;
        waited += POD_POLL;
    };
    debug!(pod = %PodId::new(namespace, name), waited_ms = waited.as_millis() as u64, "CNI request for a meshed namespace");
    if pod.metadata.uid.as_deref() != Some(request.pod_uid.as_str()) {
        return error(format!(
            "pod {namespace}/{name} has uid {:?} on the API server, not {:?}",
            pod.metadata.uid, request.pod_uid
        ));
    }
    if request.command == CniCommand::Check {
        return match local_pod_spec(&pod, Ipv4Addr::UNSPECIFIED, namespace_inbound_mode(&ns)) {
            Ok(_) => Admission::Check(PodId::new(namespace, name)),
            Err(reason) => not_meshed(format!("{reason:#}")),
        };
    }
    let Some(ip) = request.ips.first().copied() else {
        return error("the previous plugins gave the pod no IPv4 address");
    };
    if request.netns.is_empty() {
        return error("no network namespace (CNI_NETNS) given");
    }
    match local_pod_spec(&pod, ip, namespace_inbound_mode(&ns)) {
        Ok(spec) => Admission::Enroll(PodSpec {
            netns: Some(PathBuf::from(&request.netns)),
            ..spec
        }),
        Err(reason) => not_meshed(format!("{reason:#}")),
    }
}
