//! A slim EndpointSlice for the reflector store (the idea of Cilium's "slim" Kubernetes
//! types): only the fields [`crate::k8s::translate`] reads are decoded and kept. The full
//! `k8s_openapi` Endpoint is 352 bytes before any of its strings (most of it inline `Option`s
//! we never read: targetRef, hints, zone, hostname, deprecatedTopology); at 10 000 Services of
//! 10 endpoints each, the slim store is tens of MiB smaller. Translation reads the slim
//! slices themselves; a full slice (from a manifest file) is made slim with [`SlimEndpointSlice::from_full`].

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::control::intern::intern;

use crate::k8s::translate::SERVICE_NAME_LABEL;

/// `discovery.k8s.io/v1` EndpointSlice, decoded with only what the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimEndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    /// The API sends `null` for a slice without endpoints.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<SlimEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EndpointPort>>,
    /// The `kubernetes.io/service-name` label, moved out of the labels by the agent's trim (a
    /// one-entry label map costs a B-tree node, half a KiB).
    #[serde(skip)]
    pub service_name: Option<String>,
}

/// One endpoint: its first address (the API says all of them are fungible and consumers
/// may use only the first, as kube-proxy does), conditions and node. 48 bytes and no heap
/// allocation of its own for an IPv4 endpoint (the node name is shared, see
/// [`crate::intern`]); the k8s_openapi Endpoint is 352 bytes plus a chunk per string.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimEndpoint {
    #[serde(
        default,
        rename = "addresses",
        deserialize_with = "first_of",
        serialize_with = "as_list"
    )]
    pub address: Option<SlimAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<EndpointConditions>,
    #[serde(
        default,
        deserialize_with = "interned",
        serialize_with = "as_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_name: Option<Arc<str>>,
}

/// An endpoint address as the API sent it: parsed when it is an IPv4 address in canonical
/// form (what the agent uses; no allocation), else the text (an IPv6 or FQDN slice, or an
/// address translation will report as unusable, exactly as written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlimAddress {
    V4(Ipv4Addr),
    Text(Box<str>),
}

impl SlimAddress {
    pub fn new(text: &str) -> Self {
        match text.parse::<Ipv4Addr>() {
            // Only when printing it gives the same text back: the text kept otherwise is what
            // translation reports, exactly as written.
            Ok(a) if a.to_string() == text => SlimAddress::V4(a),
            _ => SlimAddress::Text(text.into()),
        }
    }
}

impl fmt::Display for SlimAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlimAddress::V4(a) => write!(f, "{a}"),
            SlimAddress::Text(t) => f.write_str(t),
        }
    }
}

impl Serialize for SlimAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SlimAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(SlimAddress::new(&text))
    }
}

/// The first element of a list (`null` and `[]`: None).
fn first_of<'de, D>(d: D) -> Result<Option<SlimAddress>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(null_as_empty::<D, SlimAddress>(d)?.into_iter().next())
}

fn as_list<S: serde::Serializer>(a: &Option<SlimAddress>, s: S) -> Result<S::Ok, S::Error> {
    a.iter().collect::<Vec<_>>().serialize(s)
}

fn as_str<S: serde::Serializer>(n: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    n.as_deref().serialize(s)
}

/// A name shared with every other endpoint on the same node.
fn interned<'de, D>(d: D) -> Result<Option<Arc<str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let name = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
    Ok(name.map(|n| intern(&n)))
}

/// `null` or a missing field as an empty list, as k8s_openapi reads list fields.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl Resource for SlimEndpointSlice {
    const API_VERSION: &'static str = <EndpointSlice as Resource>::API_VERSION;
    const GROUP: &'static str = <EndpointSlice as Resource>::GROUP;
    const KIND: &'static str = <EndpointSlice as Resource>::KIND;
    const VERSION: &'static str = <EndpointSlice as Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <EndpointSlice as Resource>::URL_PATH_SEGMENT;
    type Scope = NamespaceResourceScope;
}

impl Metadata for SlimEndpointSlice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl SlimEndpointSlice {
    /// The Service this slice belongs to: its label, or where the trim moved it.
    pub fn service_name(&self) -> Option<&str> {
        self.service_name.as_deref().or_else(|| {
            self.metadata
                .labels
                .as_ref()?
                .get(SERVICE_NAME_LABEL)
                .map(String::as_str)
        })
    }

    /// Keeps what a full slice has that the agent reads.
    pub fn from_full(slice: &EndpointSlice) -> Self {
        SlimEndpointSlice {
            metadata: slice.metadata.clone(),
            address_type: slice.address_type.clone(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|e| SlimEndpoint {
                    address: e.addresses.first().map(|a| SlimAddress::new(a)),
                    conditions: e.conditions.clone(),
                    node_name: e.node_name.as_deref().map(intern),
                })
                .collect(),
            ports: slice.ports.clone(),
            service_name: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource as _;
    use serde_json::json;

    fn api_slice() -> serde_json::Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true,
                 "terminating": false}, "nodeName": "n1", "zone": "a",
                 "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"},
                 "hints": {"forZones": [{"name": "a"}]}},
                {"addresses": ["10.1.0.6"]}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        })
    }

    #[test]
    fn slim_slice_keeps_what_translate_reads() {
        let full: EndpointSlice = serde_json::from_value(api_slice()).unwrap();
        let slim: SlimEndpointSlice = serde_json::from_value(api_slice()).unwrap();
        assert_eq!(slim, SlimEndpointSlice::from_full(&full));
        assert_eq!(slim.metadata, full.metadata);
        assert_eq!(slim.address_type, "IPv4");
        assert_eq!(slim.ports, full.ports);
        assert_eq!(slim.service_name(), Some("web"));
        assert_eq!(slim.endpoints.len(), 2);
        for (s, f) in slim.endpoints.iter().zip(&full.endpoints) {
            assert_eq!(
                (
                    s.address.as_ref().map(|a| a.to_string()),
                    &s.conditions,
                    s.node_name.as_deref()
                ),
                (
                    f.addresses.first().cloned(),
                    &f.conditions,
                    f.node_name.as_deref()
                )
            );
        }
    }

    #[test]
    fn slim_slice_reads_null_lists_as_empty() {
        // The EndpointSlice controller writes `endpoints: null` for a Service without pods.
        let v = json!({"metadata": {"name": "empty"}, "addressType": "IPv4",
                       "endpoints": null, "ports": null});
        let full: EndpointSlice = serde_json::from_value(v.clone()).unwrap();
        let slim: SlimEndpointSlice = serde_json::from_value(v).unwrap();
        assert!(slim.endpoints.is_empty());
        assert_eq!(slim, SlimEndpointSlice::from_full(&full));
        let ep: SlimEndpoint = serde_json::from_value(json!({"addresses": null})).unwrap();
        assert_eq!(ep.address, None);
        let ep: SlimEndpoint =
            serde_json::from_value(json!({"addresses": ["10.0.0.1", "10.0.0.2"]})).unwrap();
        assert_eq!(
            ep.address,
            Some(SlimAddress::V4(Ipv4Addr::new(10, 0, 0, 1)))
        );
        assert_eq!(
            serde_json::to_value(&ep).unwrap()["addresses"],
            json!(["10.0.0.1"])
        );
    }

    #[test]
    fn slim_slice_gives_back_every_address_as_written_and_shares_node_names() {
        let v = json!({"metadata": {"name": "odd"}, "addressType": "IPv4", "endpoints": [
            {"addresses": ["10.0.0.1"], "nodeName": "slim-test-node"},
            {"addresses": ["010.0.0.1"], "nodeName": "slim-test-node"},
            {"addresses": ["fd00::1"]},
            {"addresses": ["pod.example"]},
            {"addresses": [" 10.0.0.2"]}
        ]});
        let full: EndpointSlice = serde_json::from_value(v.clone()).unwrap();
        let slim: SlimEndpointSlice = serde_json::from_value(v).unwrap();
        assert_eq!(slim, SlimEndpointSlice::from_full(&full));
        assert_eq!(
            slim.endpoints[0].address,
            Some(SlimAddress::V4(Ipv4Addr::new(10, 0, 0, 1)))
        );
        assert_eq!(
            slim.endpoints[1].address,
            Some(SlimAddress::Text("010.0.0.1".into())),
            "a non-canonical IPv4 text stays text, so translation reports it as written"
        );
        for (s, f) in slim.endpoints.iter().zip(&full.endpoints) {
            assert_eq!(
                (
                    s.address.as_ref().map(|a| a.to_string()),
                    s.node_name.as_deref()
                ),
                (f.addresses.first().cloned(), f.node_name.as_deref())
            );
        }
        let (a, b) = (
            slim.endpoints[0].node_name.as_ref().unwrap(),
            slim.endpoints[1].node_name.as_ref().unwrap(),
        );
        assert!(Arc::ptr_eq(a, b), "one node name, one allocation");
        assert_eq!(
            serde_json::to_value(&slim.endpoints[1]).unwrap(),
            json!({"addresses": ["010.0.0.1"], "nodeName": "slim-test-node"})
        );
    }

    #[test]
    fn slim_slice_is_the_same_api_resource() {
        assert_eq!(
            SlimEndpointSlice::url_path(&(), Some("shop")),
            EndpointSlice::url_path(&(), Some("shop"))
        );
        assert_eq!(SlimEndpointSlice::kind(&()), "EndpointSlice");
        assert!(
            std::mem::size_of::<SlimEndpoint>() * 4
                < std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>()
        );
        assert!(std::mem::size_of::<SlimEndpoint>() <= 48);
    }
}
