//! Kubernetes Services + EndpointSlices -> [`DesiredState`], with kube-proxy's semantics so
//! that an accelerated Service behaves exactly as it does without lbx.
//!
//! What is translated, per Service port (TCP or UDP):
//! - a NodePort frontend (the wildcard address) when the type is NodePort or LoadBalancer and
//!   a nodePort is allocated;
//! - one frontend per `status.loadBalancer.ingress[].ip` (type LoadBalancer), except ingress
//!   points with `ipMode: Proxy`, whose traffic arrives addressed to the node (kube-proxy does
//!   not capture those IPs either), and except when `loadBalancerSourceRanges` is set: lbx has
//!   no firewall, so those IPs stay with kube-proxy, which enforces the ranges;
//! - one frontend per `spec.externalIPs` entry.
//!
//! Endpoints come from `discovery.k8s.io/v1` EndpointSlices labelled
//! `kubernetes.io/service-name`, matched to the Service port by name and protocol (the
//! EndpointSlice controller has already resolved named targetPorts, per pod). Never panics:
//! anything invalid or unsupported becomes a [`Skipped`] entry and the rest goes on.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use lb_common::{PROTO_TCP, PROTO_UDP};

use crate::k8s::slim::{SlimAddress, SlimEndpointSlice};

use crate::control::model::{
    proto_name, BackendSpec, DesiredState, FrontendAddr, ServicePortId, ServicePortState,
};

/// Per-Service opt-out: `lbx.io/accelerate: "false"` leaves the Service to kube-proxy.
pub const ACCELERATE_ANNOTATION: &str = "lbx.io/accelerate";
/// Services with this label belong to another proxy (kube-proxy ignores them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Kubernetes' default sessionAffinity ClientIP timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;
/// Kubernetes' maximum sessionAffinity ClientIP timeout (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86400;

/// Knobs of the translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TranslateOptions {
    /// Also take Services labelled `service.kubernetes.io/service-proxy-name: <this>`.
    /// Services without the label are always taken (lbx accelerates kube-proxy's Services).
    pub proxy_name: Option<String>,
}

/// An object, or part of one, that produced no data-plane state, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// "Service" or "EndpointSlice".
    pub kind: &'static str,
    /// "namespace/name".
    pub object: String,
    pub reason: String,
}

/// Translates Services and EndpointSlices (any order, e.g. straight from reflector stores)
/// into the desired state of this node's data plane. `node_name` decides which endpoints are
/// local. The result does not depend on input order.
pub fn translate<S: Borrow<Service>, E: Borrow<SlimEndpointSlice>>(
    services: &[S],
    endpoint_slices: &[E],
    node_name: &str,
    opts: &TranslateOptions,
) -> (DesiredState, Vec<Skipped>) {
    let mut out = Translation {
        desired: DesiredState::default(),
        skipped: Vec::new(),
    };

    // Slices by (namespace, service name), each list sorted by slice name.
    let mut slices: BTreeMap<(String, String), BTreeMap<String, &SlimEndpointSlice>> =
        BTreeMap::new();
    for slice in endpoint_slices.iter().map(Borrow::borrow) {
        let meta = &slice.metadata;
        let Some(service) = slice.service_name() else {
            continue; // not managed for a Service: kube-proxy ignores it too
        };
        let ns = namespace_of(meta.namespace.as_deref());
        let name = meta.name.clone().unwrap_or_default();
        slices
            .entry((ns, service.to_string()))
            .or_default()
            .insert(name, slice);
    }

    let mut by_name: BTreeMap<(String, String), &Service> = BTreeMap::new();
    for svc in services.iter().map(Borrow::borrow) {
        let ns = namespace_of(svc.metadata.namespace.as_deref());
        let Some(name) = svc.metadata.name.clone().filter(|n| !n.is_empty()) else {
            out.skip("Service", format!("{ns}/"), "metadata.name is missing");
            continue;
        };
        if by_name.insert((ns.clone(), name.clone()), svc).is_some() {
            out.skip(
                "Service",
                format!("{ns}/{name}"),
                "the input holds this Service twice; the last copy is used",
            );
        }
    }

    for ((ns, name), svc) in &by_name {
        let no_slices = BTreeMap::new();
        let svc_slices = slices
            .get(&(ns.clone(), name.clone()))
            .unwrap_or(&no_slices);
        out.service(ns, name, svc, svc_slices, node_name, opts);
    }
    (out.desired, out.skipped)
}

fn namespace_of(ns: Option<&str>) -> String {
    // Like kubectl: an object without a namespace lives in "default".
    match ns {
        Some(ns) if !ns.is_empty() => ns.to_string(),
        _ => "default".to_string(),
    }
}

/// An endpoint of one slice, conditions defaulted like kube-proxy.
struct SliceEndpoint {
    addr: Ipv4Addr,
    node_name: Option<Arc<str>>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// A usable (IPv4) slice, parsed once per Service.
struct ParsedSlice {
    /// (port name, protocol) -> port number.
    ports: BTreeMap<(String, u8), Option<u16>>,
    endpoints: Vec<SliceEndpoint>,
}

struct Translation {
    desired: DesiredState,
    skipped: Vec<Skipped>,
}

impl Translation {
    fn skip(&mut self, kind: &'static str, object: String, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            kind,
            object,
            reason: reason.into(),
        });
    }

    fn service(
        &mut self,
        ns: &str,
        name: &str,
        svc: &Service,
        slices: &BTreeMap<String, &SlimEndpointSlice>,
        node_name: &str,
        opts: &TranslateOptions,
    ) {
        let object = format!("{ns}/{name}");
        let meta = &svc.metadata;
        if let Some(proxy) = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        {
            if opts.proxy_name.as_deref() != Some(proxy.as_str()) {
                self.skip(
                    "Service",
                    object,
                    format!(
                        "labelled {SERVICE_PROXY_NAME_LABEL}={proxy:?}: it belongs to that proxy \
                         (start lbx with that proxy name to take it)"
                    ),
                );
                return;
            }
        }
        match meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ACCELERATE_ANNOTATION))
            .map(String::as_str)
        {
            None | Some("true") => {}
            Some("false") => {
                self.skip("Service", object, "opted out");
                return;
            }
            Some(other) => {
                self.skip(
                    "Service",
                    object,
                    format!(
                        "annotation {ACCELERATE_ANNOTATION}={other:?} is neither \"true\" nor \
                         \"false\"; not accelerated until it is fixed"
                    ),
                );
                return;
            }
        }
        let Some(spec) = svc.spec.as_ref() else {
            self.skip("Service", object, "spec is missing");
            return;
        };
        let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        let (node_port, load_balancer) = match svc_type {
            "ClusterIP" => (false, false),
            "NodePort" => (true, false),
            "LoadBalancer" => (true, true),
            "ExternalName" => return,
            other => {
                self.skip("Service", object, format!("unknown spec.type {other:?}"));
                return;
            }
        };
        // Headless: kube-proxy programs nothing for it, not even externalIPs. An empty
        // clusterIP is not headless: it is a manifest the API server has not allocated yet.
        if spec.cluster_ip.as_deref() == Some("None") {
            return;
        }
        let local_only = match spec.external_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                self.skip(
                    "Service",
                    object,
                    format!(
                        "unknown spec.externalTrafficPolicy {other:?} (expected Cluster or Local)"
                    ),
                );
                return;
            }
        };
        let Some(affinity_timeout_s) = self.affinity(&object, spec) else {
            return;
        };
        let ips = self.frontend_ips(&object, svc, spec, load_balancer);

        let mut parsed = Vec::new();
        for (slice_name, slice) in slices {
            if let Some(p) = self.parse_slice(ns, slice_name, slice) {
                parsed.push(p);
            }
        }

        let mut seen_ports = BTreeSet::new();
        for (index, port) in spec.ports.iter().flatten().enumerate() {
            let port_name = port.name.clone().unwrap_or_default();
            let what = if port_name.is_empty() {
                format!("spec.ports[{index}]")
            } else {
                format!("spec.ports[{index}] ({port_name})")
            };
            let Some(proto) = self.protocol(&object, &what, port.protocol.as_deref()) else {
                continue;
            };
            let Some(svc_port) = valid_port(port.port) else {
                self.skip(
                    "Service",
                    object.clone(),
                    format!("{what}: port {} is not in 1..=65535", port.port),
                );
                continue;
            };
            if !seen_ports.insert((port_name.clone(), proto)) {
                self.skip(
                    "Service",
                    object.clone(),
                    format!(
                        "{what}: a second {} port with the same name; only the first is used",
                        proto_name(proto)
                    ),
                );
                continue;
            }
            let frontends = self.frontends(&object, &what, port, node_port, &ips, svc_port, proto);
            if frontends.is_empty() {
                continue; // ClusterIP only: kube-proxy's job
            }
            let backends = backends_for(&parsed, &port_name, proto, node_name, local_only);
            let id = ServicePortId::new(ns, name, port_name, proto);
            self.desired.services.insert(
                id,
                ServicePortState {
                    frontends,
                    backends,
                    affinity_timeout_s,
                    local_only,
                },
            );
        }
    }

    /// `Some(None)`: no affinity; `Some(Some(t))`: ClientIP with timeout t; `None`: invalid,
    /// already reported.
    fn affinity(&mut self, object: &str, spec: &ServiceSpec) -> Option<Option<u32>> {
        match spec.session_affinity.as_deref() {
            None | Some("None") => Some(None),
            Some("ClientIP") => {
                let configured = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match configured {
                    None => Some(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                    Some(t) if t >= 1 && t as i64 <= MAX_AFFINITY_TIMEOUT_S as i64 => {
                        Some(Some(t as u32))
                    }
                    Some(t) => {
                        self.skip(
                            "Service",
                            object.to_string(),
                            format!(
                                "sessionAffinityConfig.clientIP.timeoutSeconds {t} is not in \
                                 1..={MAX_AFFINITY_TIMEOUT_S}"
                            ),
                        );
                        None
                    }
                }
            }
            Some(other) => {
                self.skip(
                    "Service",
                    object.to_string(),
                    format!("unknown spec.sessionAffinity {other:?} (expected None or ClientIP)"),
                );
                None
            }
        }
    }

    /// The exact-match frontend addresses: LoadBalancer ingress IPs and externalIPs.
    fn frontend_ips(
        &mut self,
        object: &str,
        svc: &Service,
        spec: &ServiceSpec,
        load_balancer: bool,
    ) -> Vec<Ipv4Addr> {
        let mut ips = Vec::new();
        if load_balancer {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            let ranges = spec
                .load_balancer_source_ranges
                .as_ref()
                .is_some_and(|r| !r.is_empty());
            for (i, ing) in ingress.into_iter().flatten().enumerate() {
                // Hostname-only ingress (e.g. an AWS NLB) has no IP to capture: its traffic
                // reaches the NodePort frontend.
                let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                    continue;
                };
                if ing.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                if ranges {
                    self.skip(
                        "Service",
                        object.to_string(),
                        format!(
                            "status.loadBalancer.ingress[{i}] {ip}: spec.loadBalancerSourceRanges is \
                             set and lbx does not filter sources, so this IP stays with kube-proxy"
                        ),
                    );
                    continue;
                }
                if let Some(v4) =
                    self.ipv4(object, &format!("status.loadBalancer.ingress[{i}].ip"), ip)
                {
                    ips.push(v4);
                }
            }
        }
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            if let Some(v4) = self.ipv4(object, &format!("spec.externalIPs[{i}]"), ip) {
                ips.push(v4);
            }
        }
        ips.sort();
        ips.dedup();
        ips
    }

    fn ipv4(&mut self, object: &str, field: &str, text: &str) -> Option<Ipv4Addr> {
        match text.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if !v4.is_unspecified() => Some(v4),
            Ok(IpAddr::V4(_)) => {
                self.skip(
                    "Service",
                    object.to_string(),
                    format!("{field}: 0.0.0.0 is not a frontend address"),
                );
                None
            }
            Ok(IpAddr::V6(_)) => {
                self.skip(
                    "Service",
                    object.to_string(),
                    format!("{field}: IPv6 address {text} is not supported yet; kube-proxy keeps serving it"),
                );
                None
            }
            Err(_) => {
                self.skip(
                    "Service",
                    object.to_string(),
                    format!("{field}: {text:?} is not an IP address"),
                );
                None
            }
        }
    }

    fn protocol(&mut self, object: &str, what: &str, protocol: Option<&str>) -> Option<u8> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(PROTO_TCP),
            "UDP" => Some(PROTO_UDP),
            "SCTP" => {
                self.skip(
                    "Service",
                    object.to_string(),
                    format!(
                        "{what}: SCTP is not supported by lbx; kube-proxy keeps serving this port"
                    ),
                );
                None
            }
            other => {
                self.skip(
                    "Service",
                    object.to_string(),
                    format!("{what}: unknown protocol {other:?}"),
                );
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn frontends(
        &mut self,
        object: &str,
        what: &str,
        port: &ServicePort,
        node_port: bool,
        ips: &[Ipv4Addr],
        svc_port: u16,
        proto: u8,
    ) -> Vec<(FrontendAddr, u16, u8)> {
        let mut frontends = Vec::new();
        if node_port {
            match port.node_port {
                // Not allocated (yet, or allocateLoadBalancerNodePorts: false).
                None | Some(0) => {}
                Some(np) => match valid_port(np) {
                    Some(np) => frontends.push((FrontendAddr::Wildcard, np, proto)),
                    None => self.skip(
                        "Service",
                        object.to_string(),
                        format!("{what}: nodePort {np} is not in 1..=65535"),
                    ),
                },
            }
        }
        frontends.extend(
            ips.iter()
                .map(|ip| (FrontendAddr::Ip(*ip), svc_port, proto)),
        );
        frontends
    }

    /// Parses one slice of a translated Service; None (reported if unusable) for slices that
    /// cannot contribute.
    fn parse_slice(
        &mut self,
        ns: &str,
        slice_name: &str,
        slice: &SlimEndpointSlice,
    ) -> Option<ParsedSlice> {
        let object = format!("{ns}/{slice_name}");
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" => {
                self.skip(
                    "EndpointSlice",
                    object,
                    "IPv6 endpoints are not supported yet; kube-proxy keeps serving them",
                );
                return None;
            }
            other => {
                self.skip(
                    "EndpointSlice",
                    object,
                    format!("addressType {other:?} is not supported (kube-proxy ignores it too)"),
                );
                return None;
            }
        }
        let mut ports = BTreeMap::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => PROTO_TCP,
                "UDP" => PROTO_UDP,
                _ => continue, // SCTP etc.: no Service port of ours can match
            };
            let number = match p.port {
                None => None,
                Some(n) => match valid_port(n) {
                    Some(n) => Some(n),
                    None => {
                        self.skip(
                            "EndpointSlice",
                            object.clone(),
                            format!("ports[{i}]: port {n} is not in 1..=65535"),
                        );
                        None
                    }
                },
            };
            ports.insert((p.name.clone().unwrap_or_default(), proto), number);
        }
        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().enumerate() {
            // kube-proxy uses the first address only (the slim endpoint keeps only that).
            let Some(first) = &ep.address else {
                self.skip(
                    "EndpointSlice",
                    object.clone(),
                    format!("endpoints[{i}] has no address"),
                );
                continue;
            };
            let addr = match first {
                SlimAddress::V4(a) if !a.is_unspecified() => *a,
                _ => {
                    let text = first.to_string();
                    self.skip(
                        "EndpointSlice",
                        object.clone(),
                        format!(
                            "endpoints[{i}].addresses[0] {text:?} is not a usable IPv4 address"
                        ),
                    );
                    continue;
                }
            };
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            // API: "nil ... should defer to the ready condition".
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            endpoints.push(SliceEndpoint {
                addr,
                node_name: ep.node_name.clone(),
                ready,
                serving,
                terminating,
            });
        }
        Some(ParsedSlice { ports, endpoints })
    }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The endpoints of one Service port: matched by port name and protocol in each slice, kept
/// if they may take new flows or must keep established ones (ready or terminating), limited
/// to this node for externalTrafficPolicy Local, one per (address, port).
fn backends_for(
    slices: &[ParsedSlice],
    port_name: &str,
    proto: u8,
    node_name: &str,
    local_only: bool,
) -> Vec<BackendSpec> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), BackendSpec> = BTreeMap::new();
    for slice in slices {
        let Some(Some(port)) = slice.ports.get(&(port_name.to_string(), proto)) else {
            continue;
        };
        for ep in &slice.endpoints {
            // Not ready and not terminating (starting, or failing its probe): kube-proxy
            // sends it nothing.
            if !ep.ready && !ep.terminating {
                continue;
            }
            let local = ep.node_name.as_deref() == Some(node_name);
            if local_only && !local {
                continue;
            }
            let spec = BackendSpec {
                addr: ep.addr,
                port: *port,
                node_name: ep.node_name.clone(),
                local,
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
            };
            // The same endpoint in two slices (while the controller moves it): keep the copy
            // in the best state, so a stale duplicate never hides a ready endpoint.
            let rank = |b: &BackendSpec| (b.ready, b.serving, !b.terminating, b.local);
            match by_addr.get(&(spec.addr, spec.port)) {
                Some(old) if rank(old) >= rank(&spec) => {}
                _ => {
                    by_addr.insert((spec.addr, spec.port), spec);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NODE: &str = "node-a";

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("test Service")
    }

    fn slice(v: serde_json::Value) -> SlimEndpointSlice {
        serde_json::from_value(v).expect("test EndpointSlice")
    }

    /// A LoadBalancer Service "shop/web" with ports http (80 -> named "web", nodePort 30080)
    /// and dns (53/UDP -> 5353, nodePort 30053), an ingress IP and an externalIP.
    fn web(extra_spec: serde_json::Value) -> Service {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "externalIPs": ["192.0.2.7"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080, "protocol": "TCP"},
                    {"name": "dns", "port": 53, "targetPort": 5353, "nodePort": 30053, "protocol": "UDP"}
                ]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}, {"hostname": "lb.example.com"}]}}
        });
        for (k, val) in extra_spec.as_object().unwrap() {
            v["spec"][k] = val.clone();
        }
        svc(v)
    }

    fn ep(
        ip: &str,
        node: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> serde_json::Value {
        let mut cond = serde_json::Map::new();
        if let Some(r) = ready {
            cond.insert("ready".into(), json!(r));
        }
        if let Some(s) = serving {
            cond.insert("serving".into(), json!(s));
        }
        if let Some(t) = terminating {
            cond.insert("terminating".into(), json!(t));
        }
        json!({"addresses": [ip], "nodeName": node, "conditions": cond})
    }

    fn web_slice(
        name: &str,
        http_port: u16,
        endpoints: Vec<serde_json::Value>,
    ) -> SlimEndpointSlice {
        slice(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": http_port, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints
        }))
    }

    fn id(port_name: &str, proto: u8) -> ServicePortId {
        ServicePortId::new("shop", "web", port_name, proto)
    }

    fn run(services: &[Service], slices: &[SlimEndpointSlice]) -> (DesiredState, Vec<Skipped>) {
        translate(services, slices, NODE, &TranslateOptions::default())
    }

    fn addrs(s: &ServicePortState) -> Vec<String> {
        s.backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    #[test]
    fn translate_loadbalancer_frontends_and_named_target_port() {
        let slices = [web_slice(
            "web-abc",
            8080,
            vec![
                ep("10.1.0.5", NODE, Some(true), None, None),
                ep("10.1.1.6", "node-b", None, None, None),
            ],
        )];
        let (desired, skipped) = run(&[web(json!({}))], &slices);
        assert_eq!(skipped, vec![]);
        assert_eq!(desired.services.len(), 2);

        let http = &desired.services[&id("http", PROTO_TCP)];
        assert_eq!(
            http.frontends,
            vec![
                (FrontendAddr::Wildcard, 30080, PROTO_TCP),
                (FrontendAddr::Ip(Ipv4Addr::new(192, 0, 2, 7)), 80, PROTO_TCP),
                (
                    FrontendAddr::Ip(Ipv4Addr::new(203, 0, 113, 5)),
                    80,
                    PROTO_TCP
                ),
            ]
        );
        assert_eq!(addrs(http), vec!["10.1.0.5:8080", "10.1.1.6:8080"]);
        assert!(http.backends[0].local && !http.backends[1].local);
        assert!(http
            .backends
            .iter()
            .all(|b| b.ready && b.serving && !b.terminating));
        assert_eq!(http.affinity_timeout_s, None);
        assert!(!http.local_only);

        let dns = &desired.services[&id("dns", PROTO_UDP)];
        assert_eq!(dns.frontends[0], (FrontendAddr::Wildcard, 30053, PROTO_UDP));
        assert_eq!(addrs(dns), vec!["10.1.0.5:5353", "10.1.1.6:5353"]);
    }

    #[test]
    fn translate_named_port_resolves_per_slice() {
        // Two pod templates resolve the named targetPort "web" differently.
        let slices = [
            web_slice("web-a", 8080, vec![ep("10.1.0.5", NODE, None, None, None)]),
            web_slice("web-b", 9090, vec![ep("10.1.0.9", NODE, None, None, None)]),
        ];
        let (desired, _) = run(&[web(json!({}))], &slices);
        assert_eq!(
            addrs(&desired.services[&id("http", PROTO_TCP)]),
            vec!["10.1.0.5:8080", "10.1.0.9:9090"]
        );
    }

    #[test]
    fn translate_nodeport_type_has_no_lb_ips_and_clusterip_only_has_nothing() {
        let np = web(json!({"type": "NodePort", "externalIPs": []}));
        let (desired, _) = run(&[np], &[]);
        let http = &desired.services[&id("http", PROTO_TCP)];
        assert_eq!(
            http.frontends,
            vec![(FrontendAddr::Wildcard, 30080, PROTO_TCP)]
        );
        assert!(http.backends.is_empty());

        let cip = web(json!({"type": "ClusterIP", "externalIPs": null}));
        let (desired, skipped) = run(&[cip], &[]);
        assert!(desired.services.is_empty() && skipped.is_empty());

        // ClusterIP with externalIPs: kube-proxy serves the externalIPs, so do we.
        let cip_ext = web(json!({"type": "ClusterIP"}));
        let (desired, _) = run(&[cip_ext], &[]);
        assert_eq!(
            desired.services[&id("http", PROTO_TCP)].frontends,
            vec![(FrontendAddr::Ip(Ipv4Addr::new(192, 0, 2, 7)), 80, PROTO_TCP)]
        );
    }

    #[test]
    fn translate_headless_and_externalname_produce_nothing() {
        let headless = web(json!({"clusterIP": "None", "type": "ClusterIP"}));
        let mut ext = web(json!({"type": "ExternalName", "externalName": "example.com"}));
        ext.metadata.name = Some("ext".into());
        let (desired, skipped) = run(&[headless, ext], &[]);
        assert!(desired.services.is_empty());
        assert!(skipped.is_empty());
    }

    #[test]
    fn translate_sctp_and_ipv6_are_skipped_with_reasons() {
        let s = web(json!({
            "externalIPs": ["2001:db8::1", "not-an-ip"],
            "ports": [{"name": "sig", "port": 3868, "protocol": "SCTP", "nodePort": 30868},
                      {"name": "http", "port": 80, "nodePort": 30080}]
        }));
        let v6 = slice(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-v6", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::5"]}]
        }));
        let (desired, skipped) = run(&[s], &[v6]);
        let reasons: Vec<String> = skipped
            .iter()
            .map(|s| format!("{} {}: {}", s.kind, s.object, s.reason))
            .collect();
        assert_eq!(skipped.len(), 4, "{reasons:#?}");
        assert!(
            reasons[0].contains("spec.externalIPs[0]: IPv6"),
            "{reasons:#?}"
        );
        assert!(
            reasons[1].contains("\"not-an-ip\" is not an IP"),
            "{reasons:#?}"
        );
        assert!(
            reasons[2].starts_with("EndpointSlice shop/web-v6: IPv6"),
            "{reasons:#?}"
        );
        assert!(
            reasons[3].contains("spec.ports[0] (sig): SCTP"),
            "{reasons:#?}"
        );
        // The TCP port still works, without IPv6 backends.
        let http = &desired.services[&id("http", PROTO_TCP)];
        assert!(http.backends.is_empty());
        assert_eq!(desired.services.len(), 1);
    }

    #[test]
    fn translate_conditions_like_kube_proxy() {
        let slices = [web_slice(
            "web-abc",
            8080,
            vec![
                ep("10.1.0.1", NODE, None, None, None), // nil ready -> ready
                ep("10.1.0.2", NODE, Some(false), Some(true), Some(true)), // terminating, serving
                ep("10.1.0.3", NODE, Some(false), Some(false), Some(false)), // not ready: dropped
                ep("10.1.0.4", NODE, Some(false), Some(false), Some(true)), // terminating, not serving
            ],
        )];
        let (desired, _) = run(&[web(json!({}))], &slices);
        let http = &desired.services[&id("http", PROTO_TCP)];
        assert_eq!(
            addrs(http),
            vec!["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.4:8080"]
        );
        let ring: Vec<_> = http.ring_backends().map(|b| b.addr.to_string()).collect();
        assert_eq!(ring, vec!["10.1.0.1"]);
        assert!(
            http.backends[1].terminating && http.backends[1].serving && !http.backends[1].ready
        );

        // Without ready endpoints the ring falls back to serving+terminating ones.
        let slices = [web_slice(
            "web-abc",
            8080,
            vec![
                ep("10.1.0.2", NODE, Some(false), Some(true), Some(true)),
                ep("10.1.0.4", NODE, Some(false), Some(false), Some(true)),
            ],
        )];
        let (desired, _) = run(&[web(json!({}))], &slices);
        let http = &desired.services[&id("http", PROTO_TCP)];
        let ring: Vec<_> = http.ring_backends().map(|b| b.addr.to_string()).collect();
        assert_eq!(ring, vec!["10.1.0.2"]);
    }

    #[test]
    fn translate_local_policy_and_affinity() {
        let s = web(json!({
            "externalTrafficPolicy": "Local",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}
        }));
        let slices = [web_slice(
            "web-abc",
            8080,
            vec![
                ep("10.1.0.5", NODE, None, None, None),
                ep("10.1.1.6", "node-b", None, None, None),
            ],
        )];
        let (desired, _) = run(&[s], &slices);
        let http = &desired.services[&id("http", PROTO_TCP)];
        assert!(http.local_only);
        assert_eq!(http.affinity_timeout_s, Some(600));
        assert_eq!(addrs(http), vec!["10.1.0.5:8080"]);

        let default_timeout = web(json!({"sessionAffinity": "ClientIP"}));
        let (desired, _) = run(&[default_timeout], &[]);
        assert_eq!(
            desired.services[&id("http", PROTO_TCP)].affinity_timeout_s,
            Some(10800)
        );

        let bad = web(json!({"sessionAffinity": "ClientIP",
                             "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}));
        let (desired, skipped) = run(&[bad], &[]);
        assert!(desired.services.is_empty());
        assert!(
            skipped[0].reason.contains("timeoutSeconds 0"),
            "{skipped:?}"
        );
    }

    #[test]
    fn translate_dedups_endpoints_across_slices_preferring_ready() {
        let slices = [
            web_slice(
                "web-a",
                8080,
                vec![ep("10.1.0.5", NODE, Some(false), Some(false), Some(true))],
            ),
            web_slice(
                "web-b",
                8080,
                vec![ep("10.1.0.5", NODE, Some(true), None, None)],
            ),
        ];
        let (desired, _) = run(&[web(json!({}))], &slices);
        let http = &desired.services[&id("http", PROTO_TCP)];
        assert_eq!(addrs(http), vec!["10.1.0.5:8080"]);
        assert!(http.backends[0].ready && !http.backends[0].terminating);
    }

    #[test]
    fn translate_proxy_name_and_opt_out() {
        let mut other = web(json!({}));
        other.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "lbx".to_string())].into());
        let (desired, skipped) = run(std::slice::from_ref(&other), &[]);
        assert!(desired.services.is_empty());
        assert!(skipped[0].reason.contains("belongs to that proxy"));

        let opts = TranslateOptions {
            proxy_name: Some("lbx".into()),
        };
        let (desired, skipped) = translate(&[other], &[] as &[SlimEndpointSlice], NODE, &opts);
        assert_eq!(desired.services.len(), 2);
        assert!(skipped.is_empty());

        let mut out = web(json!({}));
        out.metadata.annotations =
            Some([(ACCELERATE_ANNOTATION.to_string(), "false".to_string())].into());
        let (desired, skipped) = run(&[out], &[]);
        assert!(desired.services.is_empty());
        assert_eq!(skipped[0].reason, "opted out");
        assert_eq!(skipped[0].object, "shop/web");
    }

    #[test]
    fn translate_lb_source_ranges_and_proxy_ip_mode_leave_lb_ip_alone() {
        let ranges =
            web(json!({"externalIPs": null, "loadBalancerSourceRanges": ["198.51.100.0/24"]}));
        let (desired, skipped) = run(&[ranges], &[]);
        let http = &desired.services[&id("http", PROTO_TCP)];
        assert_eq!(
            http.frontends,
            vec![(FrontendAddr::Wildcard, 30080, PROTO_TCP)]
        );
        assert!(skipped[0].reason.contains("loadBalancerSourceRanges"));

        let mut proxy = web(json!({"externalIPs": null}));
        proxy
            .status
            .as_mut()
            .unwrap()
            .load_balancer
            .as_mut()
            .unwrap()
            .ingress
            .as_mut()
            .unwrap()[0]
            .ip_mode = Some("Proxy".into());
        let (desired, skipped) = run(&[proxy], &[]);
        assert!(skipped.is_empty());
        assert_eq!(
            desired.services[&id("http", PROTO_TCP)].frontends,
            vec![(FrontendAddr::Wildcard, 30080, PROTO_TCP)]
        );
    }

    #[test]
    fn translate_is_independent_of_input_order_and_ignores_other_services_slices() {
        let a = web(json!({}));
        let mut b = web(json!({}));
        b.metadata.name = Some("api".into());
        let mut other_ns = web_slice("web-x", 8080, vec![ep("10.9.9.9", NODE, None, None, None)]);
        other_ns.metadata.namespace = Some("elsewhere".into());
        let s1 = web_slice("web-a", 8080, vec![ep("10.1.0.5", NODE, None, None, None)]);
        let s2 = web_slice("web-b", 8080, vec![ep("10.1.0.6", NODE, None, None, None)]);
        let one = run(
            &[a.clone(), b.clone()],
            &[s1.clone(), other_ns.clone(), s2.clone()],
        );
        let two = run(&[b, a], &[s2, s1, other_ns]);
        assert_eq!(one, two);
        assert_eq!(
            addrs(&one.0.services[&id("http", PROTO_TCP)]),
            vec!["10.1.0.5:8080", "10.1.0.6:8080"]
        );
    }

    #[test]
    fn translate_invalid_specs_are_skipped_not_panics() {
        let nameless =
            svc(json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "NodePort"}}));
        let weird_type = web(json!({"type": "Weird"}));
        let mut bad_port = web(
            json!({"ports": [{"name": "x", "port": 70000, "nodePort": 30001},
                                               {"name": "y", "port": 81, "nodePort": -3}]}),
        );
        bad_port.metadata.name = Some("bad".into());
        let mut no_spec = Service::default();
        no_spec.metadata.name = Some("nospec".into());
        let (desired, skipped) = run(&[nameless, weird_type, bad_port, no_spec], &[]);
        let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("metadata.name is missing")),
            "{reasons:#?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("unknown spec.type \"Weird\"")),
            "{reasons:#?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("port 70000 is not in")),
            "{reasons:#?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("nodePort -3 is not in")),
            "{reasons:#?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("spec is missing")),
            "{reasons:#?}"
        );
        // Port y keeps its externalIP and LB IP frontends despite the bad nodePort.
        let y = ServicePortId::new("shop", "bad", "y", PROTO_TCP);
        assert_eq!(desired.services[&y].frontends.len(), 2);
        assert_eq!(desired.services.len(), 1);
    }
}
