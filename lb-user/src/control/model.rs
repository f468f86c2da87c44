//! The desired data-plane state, free of Kubernetes types: what `translate` produces from
//! Services and EndpointSlices and what `reconcile` turns into map writes. Keeping it separate
//! lets the standalone loader, the agent and the tests share one vocabulary, and keeps the
//! reconciler testable without building API objects.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// One port of one Service: the unit that owns a Maglev ring (a `service_id` slot).
/// Ports are told apart by name and protocol, as kube-proxy does (`port_name` is "" for the
/// single unnamed port a Service may have).
///
/// Shared, not copied: the desired state, the reconciler's shadow (by service and by
/// frontend), its problem lists and every apply's plan each hold one, so a clone is a
/// reference count (at 10 000 Services, four copies of three strings each were megabytes).
/// Fields read through `Deref`; compared, ordered and hashed by value.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortId(Arc<PortId>);

/// The fields of a [`ServicePortId`].
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// IP protocol number: `lb_common::PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
}

impl ServicePortId {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        port_name: impl Into<String>,
        protocol: u8,
    ) -> Self {
        ServicePortId(Arc::new(PortId {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
        }))
    }
}

impl std::ops::Deref for ServicePortId {
    type Target = PortId;

    fn deref(&self) -> &PortId {
        &self.0
    }
}

impl fmt::Debug for ServicePortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServicePortId")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("port_name", &self.port_name)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl fmt::Display for ServicePortId {
    /// `ns/name:port/TCP`, or `ns/name/TCP` for an unnamed port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", proto_name(self.protocol))
    }
}

/// "TCP", "UDP" or the protocol number, for messages.
pub fn proto_name(proto: u8) -> String {
    lb_common::ProtoName(proto).to_string()
}

/// Where a frontend listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendAddr {
    /// NodePort: matches every address of this node (the all-zero key in FRONTENDS).
    Wildcard,
    /// A LoadBalancer ingress IP or an externalIP: matches exactly.
    Ip(Ipv4Addr),
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontendAddr::Wildcard => f.write_str("*"),
            FrontendAddr::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// One endpoint of a Service port: a (pod IPv4, target port) pair and its conditions, with
/// the kube-proxy defaults already applied (`ready` nil -> true, `serving` nil -> `ready`,
/// `terminating` nil -> false).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    pub addr: Ipv4Addr,
    /// Host byte order.
    pub port: u16,
    /// Shared with every other backend on that node ([`crate::intern`]).
    pub node_name: Option<Arc<str>>,
    /// The pod runs on this node (delivered by redirect into its veth, no SNAT).
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Everything the data plane needs for one Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePortState {
    /// (address, host-order port, IP protocol). All of them share the port's ring.
    pub frontends: Vec<(FrontendAddr, u16, u8)>,
    /// Every endpoint to keep in BACKENDS: the ones that take new flows (see
    /// [`ServicePortState::ring_backends`]) and terminating ones kept for established flows.
    /// Sorted by (addr, port), one entry per (addr, port).
    pub backends: Vec<BackendSpec>,
    /// sessionAffinity ClientIP and its timeout; None = no affinity.
    pub affinity_timeout_s: Option<u32>,
    /// externalTrafficPolicy Local: `backends` already holds only this node's endpoints.
    pub local_only: bool,
}

impl ServicePortState {
    /// The backends that take new flows, by kube-proxy's rule: the ready ones; if there are
    /// none, the ones that are still serving while terminating (so a rolling update of the
    /// last pods does not black-hole traffic).
    pub fn ring_backends(&self) -> impl Iterator<Item = &BackendSpec> {
        let any_ready = self.backends.iter().any(|b| b.ready);
        self.backends.iter().filter(move |b| {
            if any_ready {
                b.ready
            } else {
                b.serving && b.terminating
            }
        })
    }
}

/// The whole desired state of this node's data plane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortId, ServicePortState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{PROTO_TCP, PROTO_UDP};

    fn be(last: u8, ready: bool, serving: bool, terminating: bool) -> BackendSpec {
        BackendSpec {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 8080,
            node_name: None,
            local: false,
            ready,
            serving,
            terminating,
        }
    }

    fn ring_addrs(s: &ServicePortState) -> Vec<u8> {
        s.ring_backends().map(|b| b.addr.octets()[3]).collect()
    }

    #[test]
    fn model_ring_takes_ready_backends_when_any() {
        let s = ServicePortState {
            backends: vec![
                be(1, true, true, false),
                be(2, false, true, true),
                be(3, true, true, false),
            ],
            ..Default::default()
        };
        assert_eq!(ring_addrs(&s), vec![1, 3]);
    }

    #[test]
    fn model_ring_falls_back_to_serving_terminating() {
        let s = ServicePortState {
            backends: vec![
                be(1, false, true, true),
                be(2, false, false, true),
                be(3, false, true, false),
            ],
            ..Default::default()
        };
        assert_eq!(ring_addrs(&s), vec![1]);
    }

    #[test]
    fn model_display_names_port_and_protocol() {
        let id = ServicePortId::new("ui", "ui-nlb", "http", PROTO_TCP);
        assert_eq!(id.to_string(), "ui/ui-nlb:http/TCP");
        let unnamed = ServicePortId::new("ui", "ui-nlb", "", PROTO_UDP);
        assert_eq!(unnamed.to_string(), "ui/ui-nlb/UDP");
        assert_ne!(id, unnamed);
        let copy = id.clone();
        assert!(Arc::ptr_eq(&id.0, &copy.0), "a clone shares the strings");
        assert_eq!(
            ServicePortId::new("ui", "ui-nlb", "http", PROTO_TCP),
            id,
            "equal by value"
        );
        assert!(unnamed < id, "ordered by value: \"\" < \"http\"");
    }
}
