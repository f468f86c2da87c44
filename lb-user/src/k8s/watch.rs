//! The three reflectors (Services, EndpointSlices, Nodes) and what they tell the control loop.
//!
//! Each reflector is a kube-rs watcher with the default exponential backoff feeding a
//! reflector store. Its events are forwarded to the control loop as [`Change`]s:
//! - `Apply`/`Delete` of one object: the Service it belongs to is dirty;
//! - `InitDone`: a full (re)list finished (start-up, reconnect after the API server went away,
//!   or a 410 Gone relist); the store now holds exactly the listed objects, so the loop
//!   recomputes everything and stale map entries disappear in the next apply.
//!
//! Errors never end a watcher: they are logged (with the 410 case named) and counted, and the
//! backoff retries. While the API server is unreachable the stores keep the last state and so
//! do the maps.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource, ResourceExt as _};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::slim::SlimEndpointSlice;
use crate::k8s::translate::{ACCELERATE_ANNOTATION, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

/// Which reflector an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }
}

/// (namespace, name) of a Service.
pub type ServiceKey = (String, String);

/// What the control loop needs to hear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// This Service changed or went away.
    Service(ServiceKey),
    /// An EndpointSlice changed (`service`: the Service its label names, if any) or went away.
    Slice {
        slice: ObjectRef<SlimEndpointSlice>,
        service: Option<ServiceKey>,
        deleted: bool,
    },
    /// A Node changed or went away (node addresses, this node's existence).
    Node,
    /// A full list of this kind is in its store.
    Synced(Kind),
}

/// Watch errors per kind, for logs and tests.
#[derive(Debug, Default)]
pub struct WatchStats {
    pub errors: AtomicU64,
    pub gone_relists: AtomicU64,
}

/// The stores the control loop reads.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<SlimEndpointSlice>,
    pub nodes: Store<Node>,
}

/// Starts the three reflectors on the current tokio runtime; their changes arrive on `tx`.
pub fn spawn(client: &Client, tx: mpsc::UnboundedSender<Change>, stats: Arc<WatchStats>) -> Stores {
    let services = spawn_one::<Service>(
        Api::all(client.clone()),
        Kind::Service,
        tx.clone(),
        stats.clone(),
        |svc, _| Some(Change::Service(service_key(svc))),
        trim_service,
    );
    let slices = spawn_one::<SlimEndpointSlice>(
        Api::all(client.clone()),
        Kind::EndpointSlice,
        tx.clone(),
        stats.clone(),
        |slice, deleted| {
            Some(Change::Slice {
                slice: ObjectRef::from_obj(slice),
                service: slice_service_key(slice),
                deleted,
            })
        },
        trim_slice,
    );
    let nodes = spawn_one::<Node>(
        Api::all(client.clone()),
        Kind::Node,
        tx,
        stats,
        |_, _| Some(Change::Node),
        trim_node,
    );
    Stores {
        services,
        slices,
        nodes,
    }
}

pub fn service_key(svc: &Service) -> ServiceKey {
    (
        svc.namespace().unwrap_or_else(|| "default".into()),
        svc.name_any(),
    )
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service_key(slice: &SlimEndpointSlice) -> Option<ServiceKey> {
    let svc = slice.service_name()?;
    Some((
        slice.namespace().unwrap_or_else(|| "default".into()),
        svc.to_string(),
    ))
}

/// Memory: the agent holds every Service and EndpointSlice of the cluster. Managed fields
/// and annotations we never read are most of an object's size.
pub fn trim_service(svc: &mut Service) {
    svc.managed_fields_mut().clear();
    svc.annotations_mut()
        .retain(|k, _| k == ACCELERATE_ANNOTATION);
    svc.labels_mut()
        .retain(|k, _| k == SERVICE_PROXY_NAME_LABEL);
    trim_meta(&mut svc.metadata);
    if let Some(spec) = svc.spec.as_mut() {
        // Translation reads clusterIP (headless or not), never these.
        spec.cluster_ips = None;
        spec.ip_families = None;
        spec.ip_family_policy = None;
        spec.internal_traffic_policy = None;
        spec.allocate_load_balancer_node_ports = None;
        spec.selector = None;
    }
}

/// Metadata nothing here reads (the store keys objects by namespace and name; the watcher
/// took the resourceVersion before this runs).
fn trim_meta(meta: &mut ObjectMeta) {
    meta.owner_references = None;
    meta.uid = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.generate_name = None;
    meta.generation = None;
    meta.finalizers = None;
    // An empty map still holds a B-tree node (half a KiB).
    if meta.labels.as_ref().is_some_and(|l| l.is_empty()) {
        meta.labels = None;
    }
    if meta.annotations.as_ref().is_some_and(|a| a.is_empty()) {
        meta.annotations = None;
    }
}

pub fn trim_slice(slice: &mut SlimEndpointSlice) {
    slice.managed_fields_mut().clear();
    slice.annotations_mut().clear();
    // The one label read, as a plain field (see SlimEndpointSlice::service_name).
    slice.service_name = slice
        .labels_mut()
        .remove(SERVICE_NAME_LABEL)
        .or(slice.service_name.take());
    slice.labels_mut().clear();
    trim_meta(&mut slice.metadata);
}

fn trim_node(node: &mut Node) {
    node.managed_fields_mut().clear();
    node.annotations_mut().clear();
    node.labels_mut().clear();
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.node_info = None;
        status.capacity = None;
        status.allocatable = None;
    }
    node.spec = None;
}

fn spawn_one<K>(
    api: Api<K>,
    kind: Kind,
    tx: mpsc::UnboundedSender<Change>,
    stats: Arc<WatchStats>,
    change_of: fn(&K, bool) -> Option<Change>,
    trim: fn(&mut K),
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(Event::Apply(obj)) => change_of(&obj, false),
                Ok(Event::Delete(obj)) => change_of(&obj, true),
                Ok(Event::Init) => None,
                Ok(Event::InitApply(_)) => None,
                Ok(Event::InitDone) => {
                    if failing {
                        info!("watch of {} is back: relisted", kind.plural());
                        failing = false;
                    }
                    Some(Change::Synced(kind))
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    let text = e.to_string();
                    if is_gone(&e) {
                        stats.gone_relists.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            "watch of {} expired (410 Gone: {text}); relisting",
                            kind.plural()
                        );
                    } else if !failing {
                        warn!(
                            "watch of {} failed: {text}; keeping the last state and retrying \
                             with backoff",
                            kind.plural()
                        );
                    }
                    failing = true;
                    None
                }
            };
            if let Some(change) = change {
                if tx.send(change).is_err() {
                    return; // the control loop is gone: shutting down
                }
            }
        }
    });
    reader
}

/// A 410 Gone from the API server: our resourceVersion is older than it keeps.
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        other => {
            let text = other.to_string();
            text.contains("410") || text.contains("too old resource version")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn watch_trims_keep_what_translation_reads() {
        let mut slice: SlimEndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "uid": "u", "resourceVersion": "7",
                         "generateName": "web-", "annotations": {"a": "b"},
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "x"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "s"}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"], "nodeName": "n1"}]
        }))
        .unwrap();
        trim_slice(&mut slice);
        assert_eq!(slice.metadata.labels, None, "the label moved to a field");
        assert_eq!(slice.metadata.annotations, None);
        assert_eq!(slice.metadata.owner_references, None);
        assert_eq!(slice.metadata.uid, None);
        assert_eq!(
            slice_service_key(&slice),
            Some(("shop".to_string(), "web".to_string()))
        );
        assert_eq!(
            slice.service_name(),
            Some("web"),
            "translation finds the Service by the trimmed label"
        );

        let mut svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "labels": {"app": "web", SERVICE_PROXY_NAME_LABEL: "lbx"},
                         "annotations": {ACCELERATE_ANNOTATION: "false", "other": "x"}},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ipFamilies": ["IPv4"],
                     "selector": {"app": "web"}, "ports": [{"port": 80}]}
        }))
        .unwrap();
        trim_service(&mut svc);
        let labels = svc.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels.keys().collect::<Vec<_>>(),
            vec![SERVICE_PROXY_NAME_LABEL]
        );
        let annotations = svc.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            vec![ACCELERATE_ANNOTATION]
        );
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(
            spec.cluster_ip.as_deref(),
            Some("None"),
            "headless is still seen"
        );
        assert_eq!(
            (spec.cluster_ips.as_ref(), spec.selector.as_ref()),
            (None, None)
        );
        assert_eq!(spec.ports.as_ref().unwrap().len(), 1);

        let mut bare: Service =
            serde_json::from_value(json!({"metadata": {"name": "b", "labels": {"app": "b"}}}))
                .unwrap();
        trim_service(&mut bare);
        assert_eq!(bare.metadata.labels, None, "an emptied map is dropped");
    }
}
