//! Resolving backends with the kernel's routes and neighbours: where XDP sends a pod's
//! packets (the interface, next-hop MAC and our MAC), whether the pod is local, and a cache
//! so a one-Service update does not ask again for every node address.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::netinfo;
use crate::control::{
    model::BackendSpec,
    reconcile::{Delivery, Resolver},
};

/// Whether the EndpointSlice's idea of where a pod runs agrees with this node's routes;
/// Err(reason) when it does not (XDP would deliver the wrong way).
fn check_locality(spec: &BackendSpec, d: &netinfo::Delivery, node: &str) -> Result<(), String> {
    match (spec.local, d.local) {
        (true, false) => Err(format!(
            "the EndpointSlice puts {} on this node ({node}) but the route to it {}, so it is \
             not a local pod's veth; fix the pod's host route or the endpoint's nodeName",
            spec.addr,
            match d.gateway {
                Some(gw) => format!("goes via {gw}"),
                None => format!("is on a shared subnet of ifindex {}", d.ifindex),
            }
        )),
        (false, true) => Err(format!(
            "the EndpointSlice puts {} on node {} but this node ({node}) reaches it through a \
             host route on ifindex {}, like a local pod; fix the endpoint's nodeName or the route",
            spec.addr,
            spec.node_name.as_deref().unwrap_or("(none)"),
            d.ifindex
        )),
        _ => Ok(()),
    }
}

/// A backend's delivery, or why it has none.
type Resolved = Result<netinfo::Delivery, String>;

/// How long a successful resolution is reused by scoped applies. A lookup (`ip route get`,
/// the link, the neighbour) costs a few milliseconds of process spawns, which a one-Service
/// update must not pay for the same node address again and again; full applies (at start,
/// on resyncs, every [`FULL_APPLY_EVERY`]) always resolve afresh.
const RESOLVE_TTL: Duration = Duration::from_secs(10);

/// Resolutions by address, kept between applies: (when, result). Failures are reused only
/// within the apply that saw them.
#[derive(Default)]
pub(crate) struct ResolveCache {
    pub(crate) entries: BTreeMap<Ipv4Addr, (Instant, Resolved)>,
}

/// Resolves backends with the kernel's routes and neighbours (one lookup per address per
/// apply, or per [`RESOLVE_TTL`]) and remembers the veths of local pods for the TC reply
/// program.
pub(crate) struct NetResolver<'a> {
    node: &'a str,
    /// InternalIP of every other node by name: a remote endpoint is forwarded to the node its
    /// EndpointSlice names (direct node routing), without needing a route to its pod subnet.
    node_ips: &'a BTreeMap<String, Ipv4Addr>,
    cache: &'a RefCell<ResolveCache>,
    /// When this apply began: older failures are looked up again.
    started: Instant,
    /// Remote endpoints of known nodes go through the tunnel (`--remote-mode tunnel`).
    tunnel: bool,
    pub(crate) local_ifindexes: RefCell<BTreeSet<u32>>,
}

impl<'a> NetResolver<'a> {
    pub(crate) fn new(
        node: &'a str,
        node_ips: &'a BTreeMap<String, Ipv4Addr>,
        cache: &'a RefCell<ResolveCache>,
        tunnel: bool,
    ) -> Self {
        NetResolver {
            node,
            node_ips,
            cache,
            tunnel,
            started: Instant::now(),
            local_ifindexes: RefCell::new(BTreeSet::new()),
        }
    }

    fn lookup(&self, addr: Ipv4Addr) -> Resolved {
        let mut cache = self.cache.borrow_mut();
        if let Some((at, r)) = cache.entries.get(&addr) {
            let fresh = match r {
                Ok(_) => at.elapsed() < RESOLVE_TTL,
                Err(_) => *at >= self.started,
            };
            if fresh {
                return r.clone();
            }
        }
        let r = netinfo::resolve_backend(addr).map_err(|e| e.to_string());
        cache.entries.insert(addr, (Instant::now(), r.clone()));
        r
    }
}

impl Resolver for NetResolver<'_> {
    fn resolve(&self, spec: &BackendSpec) -> Result<Delivery, String> {
        if let Some(node_ip) = remote_node_ip(spec, self.node, self.node_ips) {
            let d = self.lookup(node_ip).map_err(|e| {
                format!(
                    "node {} ({node_ip}): {e}",
                    spec.node_name.as_deref().unwrap_or_default()
                )
            })?;
            if d.local {
                return Err(format!(
                    "node {} has InternalIP {node_ip}, which this node routes into a local veth; \
                     fix the Node's addresses",
                    spec.node_name.as_deref().unwrap_or_default()
                ));
            }
            return Ok(Delivery {
                ifindex: d.ifindex,
                dmac: d.dmac,
                smac: d.smac,
                tunnel_to: self.tunnel.then_some(node_ip),
            });
        }
        let d = self.lookup(spec.addr)?;
        check_locality(spec, &d, self.node)?;
        if d.local {
            self.local_ifindexes.borrow_mut().insert(d.ifindex);
        }
        // A remote pod of an unknown node: routed to the pod itself, by SNAT.
        Ok(Delivery {
            ifindex: d.ifindex,
            dmac: d.dmac,
            smac: d.smac,
            tunnel_to: None,
        })
    }
}

/// The InternalIP to forward a remote endpoint to, when its node is known.
fn remote_node_ip(
    spec: &BackendSpec,
    this_node: &str,
    node_ips: &BTreeMap<String, Ipv4Addr>,
) -> Option<Ipv4Addr> {
    if spec.local {
        return None;
    }
    let node = spec.node_name.as_deref()?;
    if node == this_node {
        return None;
    }
    node_ips.get(node).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(local: bool) -> BackendSpec {
        BackendSpec {
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            node_name: Some(if local { "n1" } else { "n2" }.into()),
            local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn delivery(local: bool, gateway: Option<Ipv4Addr>) -> netinfo::Delivery {
        netinfo::Delivery {
            ifindex: 7,
            dmac: [2, 0, 0, 0, 0, 1],
            smac: [2, 0, 0, 0, 0, 2],
            local,
            gateway,
        }
    }

    #[test]
    fn locality_must_agree_with_routes() {
        assert!(check_locality(&spec(true), &delivery(true, None), "n1").is_ok());
        assert!(check_locality(
            &spec(false),
            &delivery(false, Some("10.1.1.7".parse().unwrap())),
            "n1"
        )
        .is_ok());
        let e = check_locality(
            &spec(true),
            &delivery(false, Some("10.1.1.7".parse().unwrap())),
            "n1",
        )
        .unwrap_err();
        assert!(e.contains("via 10.1.1.7") && e.contains("nodeName"), "{e}");
        let e = check_locality(&spec(false), &delivery(true, None), "n1").unwrap_err();
        assert!(e.contains("node n2") && e.contains("ifindex 7"), "{e}");
    }
}
