//! Loads Services and EndpointSlices from a file instead of an API server: what
//! `kubectl get svc,endpointslices -o yaml` prints, or hand-written manifests. Lets operators
//! (and tests) see what lbx would program for a cluster without running in it.
//!
//! Accepted: YAML with one or more documents (`---`), or JSON (one object, a stream of
//! them, or an array of them); any document may be a `kind: List` (or `ServiceList`, ...)
//! with `items`. Objects must be Service (v1), EndpointSlice (discovery.k8s.io/v1) or Node
//! (v1: the other nodes' InternalIPs, where tunnelled endpoints go). Errors name the document
//! (1-based), the list item, and the field path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::slim::SlimEndpointSlice;
use super::state::node_ips;
use crate::control::model::DesiredState;
use crate::k8s::translate::{translate, Skipped, TranslateOptions};

/// The objects of a manifest file, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

impl Manifests {
    /// The slices as the agent's store holds them: what translation reads.
    pub fn slim_slices(&self) -> Vec<SlimEndpointSlice> {
        self.endpoint_slices
            .iter()
            .map(SlimEndpointSlice::from_full)
            .collect()
    }
}

/// Where in a file an object sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based document number (YAML `---` documents, or JSON values in a stream).
    pub document: usize,
    /// 0-based index into the document's `items` when the document is a List.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

/// Why a manifest file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("cannot read {path:?}: {source} (check the path and its permissions)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("document {document}: invalid YAML: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {document}: invalid JSON: {source}")]
    Json {
        document: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{location}: the object has no `kind`; every object needs apiVersion and kind")]
    MissingKind { location: Location },
    #[error(
        "{location}: unsupported kind {kind:?} (apiVersion {api_version:?}); the file may hold \
         Service (v1), EndpointSlice (discovery.k8s.io/v1), Node (v1) and List objects only"
    )]
    UnknownKind {
        location: Location,
        kind: String,
        api_version: String,
    },
    #[error(
        "{location}: {kind} with apiVersion {api_version:?}: lbx reads {kind} {expected} only, \
         export the object with `kubectl get -o yaml` from a current cluster"
    )]
    ApiVersion {
        location: Location,
        kind: String,
        api_version: String,
        expected: &'static str,
    },
    #[error("{location}: {kind} has `items` that are not a list")]
    BadList { location: Location, kind: String },
    #[error("{location}: {kind} {name}: field `{path}`: {source}")]
    Decode {
        location: Location,
        kind: String,
        /// "namespace/name" as far as it could be read, else "(unnamed)".
        name: String,
        /// Field path inside the object, e.g. `spec.ports[0].port`.
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads and parses a manifest file.
pub fn load_file(path: &Path) -> Result<Manifests, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(&text)
}

/// Parses manifests; JSON when the text starts with `{` or `[`, YAML otherwise.
pub fn parse_str(text: &str) -> Result<Manifests, StandaloneError> {
    let mut out = Manifests::default();
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let stream = serde_json::Deserializer::from_str(trimmed).into_iter::<Value>();
        for (i, doc) in stream.enumerate() {
            let document = i + 1;
            let value = doc.map_err(|source| StandaloneError::Json { document, source })?;
            add_document(&mut out, document, value)?;
        }
    } else {
        // Untrimmed, so YAML error positions match the file's lines.
        let text = text.trim_start_matches('\u{feff}');
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let document = i + 1;
            let value = Value::deserialize(doc)
                .map_err(|source| StandaloneError::Yaml { document, source })?;
            add_document(&mut out, document, value)?;
        }
    }
    Ok(out)
}

/// What a manifest file gives a node: its desired state, what was skipped, and the other
/// nodes' InternalIPs (from the file's Node objects: where tunnelled endpoints go).
pub struct FileState {
    pub desired: DesiredState,
    pub skipped: Vec<Skipped>,
    pub node_ips: BTreeMap<String, Ipv4Addr>,
}

/// Loads a manifest file and translates it for node `node_name`.
pub fn translate_file(
    path: &Path,
    node_name: &str,
    opts: &TranslateOptions,
) -> Result<FileState, StandaloneError> {
    let m = load_file(path)?;
    let (desired, skipped) = translate(&m.services, &m.slim_slices(), node_name, opts);
    Ok(FileState {
        desired,
        skipped,
        node_ips: node_ips(&m.nodes, node_name).0,
    })
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn add_document(out: &mut Manifests, document: usize, value: Value) -> Result<(), StandaloneError> {
    // Empty documents (a leading `---`, comments only) are fine.
    if value.is_null() {
        return Ok(());
    }
    let location = Location {
        document,
        item: None,
    };
    if let Value::Array(items) = value {
        // A bare JSON array of objects: a List without the envelope.
        return add_items(out, document, items, None);
    }
    let kind = str_field(&value, "kind").ok_or(StandaloneError::MissingKind { location })?;
    if kind.ends_with("List") && !is_object_kind(kind) {
        // `kind: List` items carry their own kind; typed lists (ServiceList straight from
        // the API) omit it in items.
        let item_kind = kind
            .strip_suffix("List")
            .filter(|k| !k.is_empty())
            .map(str::to_string);
        let kind = kind.to_string();
        let items = match value.get("items") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(items)) => items.clone(),
            Some(_) => return Err(StandaloneError::BadList { location, kind }),
        };
        return add_items(out, document, items, item_kind.as_deref());
    }
    let kind = kind.to_string();
    add_object(out, location, &kind, value)
}

fn add_items(
    out: &mut Manifests,
    document: usize,
    items: Vec<Value>,
    item_kind: Option<&str>,
) -> Result<(), StandaloneError> {
    for (i, item) in items.into_iter().enumerate() {
        let location = Location {
            document,
            item: Some(i),
        };
        let kind = match (str_field(&item, "kind"), item_kind) {
            (Some(k), _) => k.to_string(),
            (None, Some(k)) => k.to_string(),
            (None, None) => return Err(StandaloneError::MissingKind { location }),
        };
        add_object(out, location, &kind, item)?;
    }
    Ok(())
}

fn is_object_kind(kind: &str) -> bool {
    matches!(kind, "Service" | "EndpointSlice" | "Node")
}

fn add_object(
    out: &mut Manifests,
    location: Location,
    kind: &str,
    value: Value,
) -> Result<(), StandaloneError> {
    let expected = match kind {
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "v1",
    };
    if let Some(api_version) = str_field(&value, "apiVersion") {
        if is_object_kind(kind) && api_version != expected {
            return Err(StandaloneError::ApiVersion {
                location,
                kind: kind.to_string(),
                api_version: api_version.to_string(),
                expected,
            });
        }
    }
    match kind {
        "Service" => out.services.push(decode(location, kind, value)?),
        "EndpointSlice" => out.endpoint_slices.push(decode(location, kind, value)?),
        "Node" => out.nodes.push(decode(location, kind, value)?),
        _ => {
            return Err(StandaloneError::UnknownKind {
                location,
                kind: kind.to_string(),
                api_version: str_field(&value, "apiVersion").unwrap_or("").to_string(),
            })
        }
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(
    location: Location,
    kind: &str,
    value: Value,
) -> Result<T, StandaloneError> {
    let meta = value.get("metadata");
    let name = match (
        meta.and_then(|m| str_field(m, "namespace")),
        meta.and_then(|m| str_field(m, "name")),
    ) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.to_string(),
        _ => "(unnamed)".to_string(),
    };
    serde_path_to_error::deserialize(value).map_err(|e| StandaloneError::Decode {
        location,
        kind: kind.to_string(),
        name,
        path: e.path().to_string(),
        source: e.into_inner(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::{FrontendAddr, ServicePortId};
    use lb_common::PROTO_TCP;
    use std::net::Ipv4Addr;

    /// The EKS workshop's NLB example, as `kubectl get -o yaml` prints it after the AWS Load
    /// Balancer Controller provisioned it (instance targets: traffic arrives on the NodePort).
    const AWS_UI_NLB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  annotations:
    service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: instance
    service.beta.kubernetes.io/aws-load-balancer-scheme: internet-facing
    service.beta.kubernetes.io/aws-load-balancer-type: external
  creationTimestamp: "2024-05-02T09:12:44Z"
  finalizers:
  - service.k8s.aws/resources
  name: ui-nlb
  namespace: ui
  resourceVersion: "348211"
  uid: 5f0c8e1e-8a4e-4c41-9d55-1f0b7d3c2a10
spec:
  allocateLoadBalancerNodePorts: true
  clusterIP: 172.20.83.114
  clusterIPs:
  - 172.20.83.114
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  loadBalancerClass: service.k8s.aws/nlb
  ports:
  - name: http
    nodePort: 31582
    port: 80
    protocol: TCP
    targetPort: 8080
  selector:
    app.kubernetes.io/component: service
    app.kubernetes.io/instance: ui
    app.kubernetes.io/name: ui
  sessionAffinity: None
  type: LoadBalancer
status:
  loadBalancer:
    ingress:
    - hostname: k8s-ui-uinlb-a9797f0f61-1a2b3c4d5e6f7a8b.elb.us-west-2.amazonaws.com
---
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.42.11.184
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: ip-10-42-11-23.us-west-2.compute.internal
  targetRef:
    kind: Pod
    name: ui-6d5bb7b9c4-8xk2p
    namespace: ui
    uid: 0c7f3b0e-2d1a-4a3b-9f51-7d3a6b1c9e01
  zone: us-west-2a
- addresses:
  - 10.42.128.47
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: ip-10-42-135-98.us-west-2.compute.internal
  targetRef:
    kind: Pod
    name: ui-6d5bb7b9c4-j4m9w
    namespace: ui
    uid: 6b1e2f3a-4c5d-4e6f-8a9b-0c1d2e3f4a5b
  zone: us-west-2b
- addresses:
  - 10.42.160.21
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: ip-10-42-173-4.us-west-2.compute.internal
  targetRef:
    kind: Pod
    name: ui-6d5bb7b9c4-qz7tn
    namespace: ui
    uid: 9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d
  zone: us-west-2c
kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2024-05-02T09:12:44Z"
  generateName: ui-nlb-
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: ui-nlb
  name: ui-nlb-7xq2d
  namespace: ui
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: ui-nlb
    uid: 5f0c8e1e-8a4e-4c41-9d55-1f0b7d3c2a10
ports:
- name: http
  port: 8080
  protocol: TCP
---
apiVersion: v1
kind: Node
metadata:
  name: ip-10-42-11-23.us-west-2.compute.internal
status:
  addresses:
  - address: 10.42.11.23
    type: InternalIP
"#;

    const NODE: &str = "ip-10-42-11-23.us-west-2.compute.internal";

    fn ui_nlb_id() -> ServicePortId {
        ServicePortId::new("ui", "ui-nlb", "http", PROTO_TCP)
    }

    fn check_ui_nlb(desired: &DesiredState, skipped: &[Skipped]) {
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(desired.services.len(), 1);
        let s = &desired.services[&ui_nlb_id()];
        // Hostname-only ingress: the NLB targets the NodePort.
        assert_eq!(
            s.frontends,
            vec![(FrontendAddr::Wildcard, 31582, PROTO_TCP)]
        );
        let got: Vec<(Ipv4Addr, u16, bool)> = s
            .backends
            .iter()
            .map(|b| (b.addr, b.port, b.local))
            .collect();
        assert_eq!(
            got,
            vec![
                (Ipv4Addr::new(10, 42, 11, 184), 8080, true),
                (Ipv4Addr::new(10, 42, 128, 47), 8080, false),
                (Ipv4Addr::new(10, 42, 160, 21), 8080, false),
            ]
        );
        assert_eq!(s.ring_backends().count(), 3);
    }

    #[test]
    fn standalone_aws_ui_nlb_yaml() {
        let m = parse_str(AWS_UI_NLB).unwrap();
        assert_eq!(
            (m.services.len(), m.endpoint_slices.len(), m.nodes.len()),
            (1, 1, 1)
        );
        let (desired, skipped) = translate(
            &m.services,
            &m.slim_slices(),
            NODE,
            &TranslateOptions::default(),
        );
        check_ui_nlb(&desired, &skipped);
    }

    #[test]
    fn standalone_same_objects_as_kind_list_json_and_file() {
        // What `kubectl get svc,endpointslices,nodes -o json` prints: one List.
        let m = parse_str(AWS_UI_NLB).unwrap();
        let mut items: Vec<Value> = Vec::new();
        items.extend(m.services.iter().map(|s| serde_json::to_value(s).unwrap()));
        items.extend(
            m.endpoint_slices
                .iter()
                .map(|s| serde_json::to_value(s).unwrap()),
        );
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let text = serde_json::to_string_pretty(&list).unwrap();
        let from_json = parse_str(&text).unwrap();
        assert_eq!(from_json.services, m.services);
        assert_eq!(from_json.endpoint_slices, m.endpoint_slices);

        let dir = std::env::temp_dir().join(format!("lbx-standalone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ui.json");
        std::fs::write(&path, &text).unwrap();
        let result = translate_file(&path, NODE, &TranslateOptions::default());
        std::fs::remove_dir_all(&dir).unwrap();
        let state = result.unwrap();
        check_ui_nlb(&state.desired, &state.skipped);

        // The same as a YAML List.
        let yaml = serde_yaml::to_string(&list).unwrap();
        assert_eq!(parse_str(&yaml).unwrap().endpoint_slices, m.endpoint_slices);
    }

    #[test]
    fn standalone_typed_list_items_without_kind() {
        let text = r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
            {"metadata": {"name": "a", "namespace": "x"}, "spec": {"type": "NodePort",
             "ports": [{"port": 80, "nodePort": 30001}]}}]}"#;
        let m = parse_str(text).unwrap();
        assert_eq!(m.services[0].metadata.name.as_deref(), Some("a"));
    }

    #[test]
    fn standalone_unknown_kind_names_document_and_kind() {
        let text = "---\n# comment only\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let err = parse_str(text).unwrap_err();
        match &err {
            StandaloneError::UnknownKind {
                location,
                kind,
                api_version,
            } => {
                assert_eq!(location.document, 3);
                assert_eq!(location.item, None);
                assert_eq!(kind, "Deployment");
                assert_eq!(api_version, "apps/v1");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("document 3: unsupported kind \"Deployment\""),
            "{err}"
        );

        let in_list = r#"{"kind": "List", "items": [{"kind": "Service", "metadata": {"name": "a"}}, {"kind": "ConfigMap"}]}"#;
        let err = parse_str(in_list).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("document 1, items[1]: unsupported kind \"ConfigMap\""),
            "{err}"
        );

        let no_kind = "apiVersion: v1\nmetadata: {name: a}\n";
        assert!(matches!(
            parse_str(no_kind),
            Err(StandaloneError::MissingKind { .. })
        ));
    }

    #[test]
    fn standalone_decode_error_names_field_path_and_document() {
        let bad = AWS_UI_NLB.replace("    nodePort: 31582", "    nodePort: \"not-a-number\"");
        let err = parse_str(&bad).unwrap_err();
        match &err {
            StandaloneError::Decode {
                location,
                kind,
                name,
                path,
                ..
            } => {
                assert_eq!(location.document, 1);
                assert_eq!(kind, "Service");
                assert_eq!(name, "ui/ui-nlb");
                assert_eq!(path, "spec.ports[0].nodePort");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            err.to_string().contains("field `spec.ports[0].nodePort`"),
            "{err}"
        );

        let bad = AWS_UI_NLB.replace(
            "apiVersion: discovery.k8s.io/v1",
            "apiVersion: discovery.k8s.io/v1beta1",
        );
        let err = parse_str(&bad).unwrap_err();
        match &err {
            StandaloneError::ApiVersion {
                location,
                kind,
                api_version,
                expected,
            } => {
                assert_eq!(location.document, 2);
                assert_eq!(
                    (kind.as_str(), api_version.as_str()),
                    ("EndpointSlice", "discovery.k8s.io/v1beta1")
                );
                assert_eq!(*expected, "discovery.k8s.io/v1");
            }
            other => panic!("unexpected error {other:?}"),
        }

        let bad = AWS_UI_NLB.replace("  - 10.42.128.47\n", "  - {ip: 10.42.128.47}\n");
        let err = parse_str(&bad).unwrap_err();
        assert!(
            matches!(&err, StandaloneError::Decode { path, .. } if path == "endpoints[1].addresses[0]"),
            "{err}"
        );
    }

    #[test]
    fn standalone_syntax_errors_name_the_document() {
        let err = parse_str("kind: Service\n---\nkind: [unclosed\n").unwrap_err();
        assert!(
            matches!(err, StandaloneError::Yaml { document: 2, .. }),
            "{err:?}"
        );
        let err = parse_str("{\"kind\": \"Service\"} {\"kind\": ").unwrap_err();
        assert!(
            matches!(err, StandaloneError::Json { document: 2, .. }),
            "{err:?}"
        );
        let err = load_file(Path::new("/nonexistent/lbx/services.yaml")).unwrap_err();
        assert!(matches!(err, StandaloneError::Read { .. }), "{err:?}");
    }
}
