//! A slim EndpointSlice for the reflector store (the idea of Cilium's "slim" Kubernetes
//! types): only the fields [`crate::translate`] reads are decoded and kept. The full
//! `k8s_openapi` Endpoint is 352 bytes before any of its strings (most of it inline `Option`s
//! we never read: targetRef, hints, zone, hostname, deprecatedTopology); at 10 000 Services of
//! 10 endpoints each, the slim store is tens of MiB smaller. A Service's slices are turned
//! back into full EndpointSlices only while that Service is translated.

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::{Deserialize, Serialize};

use crate::translate::SERVICE_NAME_LABEL;

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
/// may use only the first, as kube-proxy does), conditions and node.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimEndpoint {
    #[serde(
        default,
        rename = "addresses",
        deserialize_with = "first_of",
        serialize_with = "as_list"
    )]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<EndpointConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// The first element of a list (`null` and `[]`: None).
fn first_of<'de, D>(d: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(null_as_empty::<D, String>(d)?.into_iter().next())
}

fn as_list<S: serde::Serializer>(a: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    a.iter().collect::<Vec<_>>().serialize(s)
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
                    address: e.addresses.first().cloned(),
                    conditions: e.conditions.clone(),
                    node_name: e.node_name.clone(),
                })
                .collect(),
            ports: slice.ports.clone(),
            service_name: None,
        }
    }

    /// The full slice [`crate::translate::translate`] takes (unread fields empty).
    pub fn to_full(&self) -> EndpointSlice {
        let mut metadata = self.metadata.clone();
        if let Some(svc) = &self.service_name {
            metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(SERVICE_NAME_LABEL.to_string(), svc.clone());
        }
        EndpointSlice {
            metadata,
            address_type: self.address_type.clone(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: e.address.iter().cloned().collect(),
                    conditions: e.conditions.clone(),
                    node_name: e.node_name.clone(),
                    ..Endpoint::default()
                })
                .collect(),
            ports: self.ports.clone(),
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
        let back = slim.to_full();
        assert_eq!(back.metadata, full.metadata);
        assert_eq!(back.address_type, "IPv4");
        assert_eq!(back.ports, full.ports);
        for (b, f) in back.endpoints.iter().zip(&full.endpoints) {
            assert_eq!(
                (&b.addresses, &b.conditions, &b.node_name),
                (&f.addresses, &f.conditions, &f.node_name)
            );
        }
        assert_eq!(back.endpoints[0].zone, None, "unread fields are dropped");
        assert_eq!(back.endpoints.len(), 2);
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
        assert_eq!(ep.address.as_deref(), Some("10.0.0.1"));
        assert_eq!(
            serde_json::to_value(&ep).unwrap()["addresses"],
            json!(["10.0.0.1"])
        );
    }

    #[test]
    fn slim_slice_is_the_same_api_resource() {
        assert_eq!(
            SlimEndpointSlice::url_path(&(), Some("shop")),
            EndpointSlice::url_path(&(), Some("shop"))
        );
        assert_eq!(SlimEndpointSlice::kind(&()), "EndpointSlice");
        assert!(std::mem::size_of::<SlimEndpoint>() * 4 < std::mem::size_of::<Endpoint>());
    }
}
