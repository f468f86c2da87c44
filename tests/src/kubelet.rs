//! The kubelet's part, played by the tests against a real API server ([`crate::controlplane`]):
//! there is no kubelet and no scheduler, so tests register Nodes, create Pods already bound
//! to a node, and report pod status (IP, readiness) themselves. The real EndpointSlice
//! controller then turns that into EndpointSlices, exactly what an agent sees in a cluster.

use std::{future::Future, net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Node, Pod, ServiceAccount},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;

/// The container port every test pod declares, and its name (Services target it by name).
pub const POD_PORT: u16 = 8080;
pub const POD_PORT_NAME: &str = "http";
/// The container's name in every test pod.
pub const CONTAINER: &str = "server";
/// Grace period of [`mark_terminating`]: long enough that the pod outlives any test.
pub const TERMINATING_GRACE_SECONDS: u32 = 3600;
/// How long [`create_pod`] waits for the namespace's `default` ServiceAccount, which the
/// ServiceAccount admission plugin requires and the controller manager creates.
const SERVICE_ACCOUNT_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "timed out after {waited:?} waiting for {what}{last}; is kube-controller-manager \
         running (see its log in the control plane's work dir)?"
    )]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("{what}: {detail}")]
    Unexpected { what: String, detail: String },
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeletError {
    let action = action.into();
    move |source| KubeletError::Api { action, source }
}

/// Polls `check` every 100 ms until it yields `Some`, or fails after `timeout` naming `what`
/// and the last error `check` returned.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, KubeletError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, kube::Error>>,
{
    let start = tokio::time::Instant::now();
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!(" (last error: {e})"),
        }
        if start.elapsed() >= timeout {
            return Err(KubeletError::Timeout {
                what: what.to_owned(),
                waited: start.elapsed(),
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates namespace `name`.
pub async fn create_namespace(client: &Client, name: &str) -> Result<Namespace, KubeletError> {
    let ns: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": name } })).expect("a valid Namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .map_err(api_err(format!("creating namespace {name}")))
}

/// Registers Node `name` with address `internal_ip` (InternalIP) and a Ready=True condition,
/// written through the status subresource like a kubelet does.
pub async fn create_node(
    client: &Client,
    name: &str,
    internal_ip: Ipv4Addr,
) -> Result<Node, KubeletError> {
    let nodes = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            },
        },
    }))
    .expect("a valid Node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .map_err(api_err(format!("creating node {name}")))?;
    let now = Timestamp::now().to_string();
    let status = json!({
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": internal_ip.to_string() },
                { "type": "Hostname", "address": name },
            ],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "lbx test kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        },
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(api_err(format!("setting status of node {name}")))
}

/// Creates Pod `namespace/name` bound to `node_name` (spec.nodeName set: there is no
/// scheduler) with `labels` and one container declaring port 8080 named `http`. Waits first
/// for the namespace's `default` ServiceAccount, which admission requires.
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    node_name: &str,
    labels: &[(&str, &str)],
) -> Result<Pod, KubeletError> {
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    wait_for(
        &format!("ServiceAccount {namespace}/default"),
        SERVICE_ACCOUNT_WAIT,
        || async { Ok(accounts.get_opt("default").await?.map(drop)) },
    )
    .await?;
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": namespace, "labels": labels },
        "spec": {
            "nodeName": node_name,
            // Nothing mounts volumes here; keep the spec to what a pod of ours needs.
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": CONTAINER,
                "image": "lbx.local/podserver:test",
                "ports": [{
                    "name": POD_PORT_NAME,
                    "containerPort": POD_PORT,
                    "protocol": "TCP",
                }],
            }],
        },
    }))
    .expect("a valid Pod");
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .map_err(api_err(format!("creating pod {namespace}/{name}")))
}

/// Reports the pod as a kubelet would once its container runs: phase Running, podIP/podIPs
/// `pod_ip`, hostIP the node's InternalIP (when the Node exists), and the Ready and
/// ContainersReady conditions set to `ready`.
pub async fn set_pod_ready(
    client: &Client,
    namespace: &str,
    name: &str,
    pod_ip: Ipv4Addr,
    ready: bool,
) -> Result<Pod, KubeletError> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod = pods
        .get(name)
        .await
        .map_err(api_err(format!("reading pod {namespace}/{name}")))?;
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let host_ip = match node_name {
        Some(node) => Api::<Node>::all(client.clone())
            .get_opt(&node)
            .await
            .map_err(api_err(format!("reading node {node}")))?
            .and_then(|n| n.status?.addresses)
            .and_then(|a| a.into_iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address),
        None => None,
    };
    let now = Timestamp::now().to_string();
    let flag = if ready { "True" } else { "False" };
    let condition = |type_: &str, status: &str| json!({ "type": type_, "status": status, "lastTransitionTime": now });
    let mut status = json!({
        "phase": "Running",
        "podIP": pod_ip.to_string(),
        "podIPs": [{ "ip": pod_ip.to_string() }],
        "startTime": now,
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", flag),
            condition("Ready", flag),
        ],
        "containerStatuses": [{
            "name": CONTAINER,
            "image": "lbx.local/podserver:test",
            "imageID": "",
            "ready": ready,
            "started": true,
            "restartCount": 0,
            "state": { "running": { "startedAt": now } },
        }],
    });
    if let Some(host_ip) = host_ip {
        status["hostIP"] = json!(host_ip);
        status["hostIPs"] = json!([{ "ip": host_ip }]);
    }
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
    .map_err(api_err(format!("setting status of pod {namespace}/{name}")))
}

/// Deletes the pod with a long grace period, so it stays with `deletionTimestamp` set
/// (terminating) as long as the test runs; there is no kubelet to finish the deletion.
/// Returns the terminating pod.
pub async fn mark_terminating(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Pod, KubeletError> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(TERMINATING_GRACE_SECONDS),
        ..DeleteParams::default()
    };
    pods.delete(name, &params)
        .await
        .map_err(api_err(format!("deleting pod {namespace}/{name}")))?;
    let pod = pods.get(name).await.map_err(api_err(format!(
        "reading terminating pod {namespace}/{name}"
    )))?;
    if pod.metadata.deletion_timestamp.is_none() {
        return Err(KubeletError::Unexpected {
            what: format!("pod {namespace}/{name} after a graceful delete"),
            detail: "no deletionTimestamp: is it unscheduled or not Running?".into(),
        });
    }
    Ok(pod)
}
