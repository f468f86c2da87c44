//! The agent's desired state, kept up to date incrementally: a change to one Service or one
//! of its EndpointSlices retranslates only that Service ([`crate::k8s::translate::translate`] on
//! it and its slices) and records which service ports changed, so the runtime applies only
//! those ([`crate::node::runtime::NodeRuntime::update`]) and an update costs the same at 1 and at
//! 10 000 Services. A full resync (after any reflector's InitDone) retranslates everything
//! from the stores. The one complete [`DesiredState`] lives in the runtime; this keeps each
//! Service's own contribution.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};

use super::slim::SlimEndpointSlice;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt as _;
use log::{info, warn};

use super::watch::{service_key, slice_service_key, ServiceKey, Stores};
use crate::control::intern::intern;
use crate::control::model::{DesiredState, ServicePortId, ServicePortState};
use crate::k8s::translate::{translate, Skipped, TranslateOptions};
use crate::node::runtime::PortChanges;

/// A Service as the state keys it: the namespace shared by every object in it
/// ([`crate::intern`]), the name shared by the entry and its slices' owner records.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    ns: Arc<str>,
    name: Arc<str>,
}

impl Key {
    fn new(ns: &str, name: &str) -> Self {
        Key {
            ns: intern(ns),
            name: name.into(),
        }
    }

    fn of(key: &ServiceKey) -> Self {
        Key::new(&key.0, &key.1)
    }

    fn service_key(&self) -> ServiceKey {
        (self.ns.to_string(), self.name.to_string())
    }
}

/// What one Service contributes, and its EndpointSlices. Its ports' states are not kept
/// here: they go to the runtime (through [`AgentState::take_changes`]), which holds the one
/// desired state. Memory: names are shared rather than copied; at 10 000 Services with one
/// slice each, this index and the owner records hold 4 MiB (11 MiB when each held its own
/// `ObjectRef`s and key strings; counted with a counting allocator).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ServiceEntry {
    /// Names of the EndpointSlices that name this Service (in its namespace). A Vec, not a
    /// set: a Service usually has one slice.
    slices: Vec<Arc<str>>,
    /// Its service ports in the desired state (shared with it).
    ports: Vec<ServicePortId>,
    /// Why parts of it were left out (logged when this changes).
    skipped: Vec<String>,
    /// spec.healthCheckNodePort of an accelerated externalTrafficPolicy Local LoadBalancer.
    health_check_node_port: Option<u16>,
    /// Ready endpoints of the Service on this node (distinct pod addresses).
    local_ready: u32,
}

impl ServiceEntry {
    fn is_empty(&self) -> bool {
        self.slices.is_empty()
            && self.ports.is_empty()
            && self.skipped.is_empty()
            && self.health_check_node_port.is_none()
    }
}

/// A healthCheckNodePort to serve and what it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node (distinct pod addresses).
    pub local_endpoints: usize,
}

pub struct AgentState {
    node_name: String,
    opts: TranslateOptions,
    /// Every Service that was translated or has slices.
    services: HashMap<Key, ServiceEntry>,
    /// (namespace, slice name) -> the Service its label named when last seen (the name
    /// shared with that Service's key).
    slice_owner: HashMap<(Arc<str>, Arc<str>), Arc<str>>,
    /// Service ports retranslated since [`AgentState::take_changes`]: the new state, or
    /// None when the port is gone. The runtime ignores states equal to what it has.
    pending: BTreeMap<ServicePortId, Option<ServicePortState>>,
}

impl AgentState {
    pub fn new(node_name: &str, opts: TranslateOptions) -> Self {
        AgentState {
            node_name: node_name.to_string(),
            opts,
            services: HashMap::new(),
            slice_owner: HashMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// The complete desired state after [`AgentState::resync`] (which retranslated every
    /// Service into the pending changes); nothing stays pending.
    pub fn take_desired(&mut self) -> DesiredState {
        DesiredState {
            services: std::mem::take(&mut self.pending)
                .into_iter()
                .filter_map(|(id, state)| Some((id, state?)))
                .collect(),
        }
    }

    /// How many service ports the desired state has.
    pub fn service_ports(&self) -> usize {
        self.services.values().map(|e| e.ports.len()).sum()
    }

    /// The service ports retranslated since the last call, with their new state (None:
    /// gone).
    pub fn take_changes(&mut self) -> PortChanges {
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// Everything from the stores: after a (re)list of any kind. The caller applies
    /// [`AgentState::take_desired`] in full.
    pub fn resync(&mut self, stores: &Stores) {
        self.pending.clear();
        self.slice_owner.clear();
        for entry in self.services.values_mut() {
            entry.slices.clear();
        }
        for slice in stores.slices.state() {
            let key = slice_service_key(&slice);
            self.slice_changed(ObjectRef::from_obj(&*slice), key, false);
        }
        let mut keys: BTreeSet<ServiceKey> = self.services.keys().map(Key::service_key).collect();
        keys.extend(stores.services.state().iter().map(|s| service_key(s)));
        for key in keys {
            self.update_service(stores, &key);
        }
        self.services.shrink_to_fit();
        self.slice_owner.shrink_to_fit();
    }

    /// An EndpointSlice was applied (`service`: the Service its label names now, if any) or
    /// deleted: re-index it, without looking at the other slices. Returns the Services whose
    /// slices changed: the one it belongs to, and the one it left if it was relabelled.
    pub fn slice_changed(
        &mut self,
        slice: ObjectRef<SlimEndpointSlice>,
        service: Option<ServiceKey>,
        deleted: bool,
    ) -> Vec<ServiceKey> {
        let service = if deleted { None } else { service };
        let ns = intern(slice.namespace.as_deref().unwrap_or("default"));
        let name: Arc<str> = slice.name.as_str().into();
        let old = self.slice_owner.remove(&(ns.clone(), name.clone()));
        let mut touched = Vec::new();
        if let Some(old) = old {
            let old_key = Key {
                ns: ns.clone(),
                name: old,
            };
            if service.as_ref().map(Key::of).as_ref() != Some(&old_key) {
                if let Some(entry) = self.services.get_mut(&old_key) {
                    entry.slices.retain(|s| *s != name);
                    if entry.is_empty() {
                        self.services.remove(&old_key);
                    }
                }
            }
            touched.push(old_key.service_key());
        }
        if let Some(key) = service {
            // An EndpointSlice belongs to a Service of its own namespace.
            let key = Key {
                ns: ns.clone(),
                name: key.1.as_str().into(),
            };
            let shared = match self.services.get_key_value(&key) {
                Some((existing, _)) => existing.clone(),
                None => {
                    self.services.insert(key.clone(), ServiceEntry::default());
                    key
                }
            };
            let entry = self.services.get_mut(&shared).expect("present");
            let name = match entry.slices.iter().find(|s| **s == name) {
                Some(existing) => existing.clone(),
                None => {
                    entry.slices.push(name.clone());
                    name
                }
            };
            self.slice_owner.insert((ns, name), shared.name.clone());
            let key = shared.service_key();
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        touched
    }

    /// Retranslates one Service from the stores and queues its ports' states (and the
    /// removal of ports it no longer has); true when anything was queued.
    pub fn update_service(&mut self, stores: &Stores, key: &ServiceKey) -> bool {
        // remove_entry gives back the key the slices' owner records share.
        let k = Key::of(key);
        let (k, mut old) = match self.services.remove_entry(&k) {
            Some(existing) => existing,
            None => (k, ServiceEntry::default()),
        };
        let svc = stores
            .services
            .get(&ObjectRef::<Service>::new(&key.1).within(&key.0));
        let mut new = ServiceEntry {
            slices: std::mem::take(&mut old.slices),
            ..ServiceEntry::default()
        };
        let mut states = Vec::new();
        if let Some(svc) = svc {
            let slices: Vec<_> = new
                .slices
                .iter()
                .filter_map(|name| stores.slices.get(&ObjectRef::new(name).within(&k.ns)))
                .collect();
            let (desired, skipped) = translate(&[&*svc], &slices, &self.node_name, &self.opts);
            let local_ready: BTreeSet<Ipv4Addr> = desired
                .services
                .values()
                .flat_map(|st| st.ring_backends().filter(|b| b.local && b.ready))
                .map(|b| b.addr)
                .collect();
            new.health_check_node_port = health_check_port(&svc, &desired);
            new.skipped = skipped.iter().map(describe_skip).collect();
            new.local_ready = local_ready.len() as u32;
            new.ports = desired.services.keys().cloned().collect();
            states = desired.services.into_iter().collect::<Vec<_>>();
        }
        if old.skipped != new.skipped {
            for s in new.skipped.iter().filter(|s| !old.skipped.contains(s)) {
                warn!("{s}");
            }
        }
        let queued = !old.ports.is_empty() || !states.is_empty();
        for id in old.ports {
            self.pending.insert(id, None);
        }
        for (id, state) in states {
            self.pending.insert(id, Some(state));
        }
        if !new.is_empty() {
            // Keep the key the slices' owner records share.
            self.services.insert(k, new);
        }
        queued
    }

    /// The healthCheckNodePorts this node serves, by port.
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut out = BTreeMap::new();
        for (key, entry) in &self.services {
            let Some(port) = entry.health_check_node_port else {
                continue;
            };
            out.insert(
                port,
                HealthCheck {
                    namespace: key.ns.to_string(),
                    name: key.name.to_string(),
                    local_endpoints: entry.local_ready as usize,
                },
            );
        }
        out
    }

    /// How many Services contribute state (for logs).
    pub fn services(&self) -> usize {
        self.services
            .values()
            .filter(|e| !e.ports.is_empty())
            .count()
    }
}

fn describe_skip(s: &Skipped) -> String {
    format!("skipped {} {}: {}", s.kind, s.object, s.reason)
}

/// kube-proxy serves spec.healthCheckNodePort for LoadBalancer Services with
/// externalTrafficPolicy Local; we do when we accelerate the Service.
fn health_check_port(svc: &Service, desired: &DesiredState) -> Option<u16> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
        || !desired.services.values().any(|s| s.local_only)
    {
        return None;
    }
    let port = spec.health_check_node_port?;
    match u16::try_from(port) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            warn!(
                "Service {}/{}: spec.healthCheckNodePort {port} is not a port; not serving it",
                svc.namespace().unwrap_or_default(),
                svc.name_any()
            );
            None
        }
    }
}

/// Other nodes' InternalIPv4 by name, and whether this node exists.
pub fn node_ips<N: std::borrow::Borrow<Node>>(
    nodes: &[N],
    this_node: &str,
) -> (BTreeMap<String, Ipv4Addr>, bool) {
    let mut out = BTreeMap::new();
    let mut found = false;
    for node in nodes.iter().map(std::borrow::Borrow::borrow) {
        let name = node.name_any();
        if name == this_node {
            found = true;
            continue;
        }
        let ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        if let Some(ip) = ip {
            out.insert(name, ip);
        }
    }
    (out, found)
}

/// Logged once per change of the set of Services.
pub fn log_sync(state: &AgentState, what: &str) {
    info!(
        "{what}: {} services accelerated, {} service ports",
        state.services(),
        state.service_ports()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher::Event;
    use serde_json::json;

    const NODE: &str = "n0";

    struct Fake {
        services: Writer<Service>,
        slices: Writer<SlimEndpointSlice>,
        nodes: Writer<Node>,
        stores: Stores,
    }

    fn fake() -> Fake {
        let (s, sw) = reflector::store();
        let (e, ew) = reflector::store();
        let (n, nw) = reflector::store();
        Fake {
            services: sw,
            slices: ew,
            nodes: nw,
            stores: Stores {
                services: s,
                slices: e,
                nodes: n,
            },
        }
    }

    fn svc(ns: &str, name: &str, node_port: i32, local: bool) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                "healthCheckNodePort": if local { json!(32000 + node_port % 1000) } else { json!(null) },
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": node_port, "protocol": "TCP"}]
            }
        }))
        .unwrap()
    }

    fn slice(ns: &str, svc: &str, name: &str, eps: &[(&str, &str, bool)]) -> SlimEndpointSlice {
        let endpoints: Vec<_> = eps
            .iter()
            .map(|(ip, node, ready)| {
                json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn node(name: &str, ip: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "Hostname", "address": name},
                                     {"type": "InternalIP", "address": ip}]}
        }))
        .unwrap()
    }

    /// What a from-scratch translation of the stores gives.
    fn full(stores: &Stores) -> DesiredState {
        let services = stores.services.state();
        let slices = stores.slices.state();
        let s: Vec<&Service> = services.iter().map(|s| &**s).collect();
        translate(&s, &slices, NODE, &TranslateOptions::default()).0
    }

    #[test]
    fn agent_state_incremental_updates_match_full_translation() {
        let mut f = fake();
        let mut st = AgentState::new(NODE, TranslateOptions::default());
        for i in 0..5 {
            f.services.apply_watcher_event(&Event::Apply(svc(
                "a",
                &format!("s{i}"),
                30000 + i,
                false,
            )));
            f.slices.apply_watcher_event(&Event::Apply(slice(
                "a",
                &format!("s{i}"),
                &format!("s{i}-x"),
                &[("10.77.1.10", "n0", true), ("10.77.2.10", "n1", true)],
            )));
        }
        st.resync(&f.stores);
        // What the runtime holds: the resync's state, then the changes (states equal to
        // what it has are ignored, as NodeRuntime::update does).
        let mut runtime = st.take_desired();
        assert_eq!(runtime, full(&f.stores));
        assert_eq!((runtime.services.len(), st.service_ports()), (5, 5));
        assert!(st.take_changes().is_empty(), "a resync is applied in full");
        let mut apply = |st: &mut AgentState| {
            let mut changed = 0;
            for (id, state) in st.take_changes() {
                if runtime.services.get(&id) == state.as_ref() {
                    continue;
                }
                changed += 1;
                match state {
                    Some(state) => runtime.services.insert(id, state),
                    None => runtime.services.remove(&id),
                };
            }
            (changed, runtime.clone())
        };

        // A second slice for s1, then a change in one endpoint, then the slice's deletion.
        let extra = slice("a", "s1", "s1-y", &[("10.77.1.11", "n0", true)]);
        f.slices.apply_watcher_event(&Event::Apply(extra.clone()));
        let key = ("a".to_string(), "s1".to_string());
        let extra_ref = ObjectRef::from_obj(&extra);
        assert_eq!(
            st.slice_changed(extra_ref.clone(), Some(key.clone()), false),
            vec![key.clone()]
        );
        assert!(st.update_service(&f.stores, &key));
        let (n, d) = apply(&mut st);
        assert_eq!((n, &d), (1, &full(&f.stores)), "one port changed");
        assert_eq!(d.services.values().nth(1).unwrap().backends.len(), 3);

        // Unchanged input: retranslated, nothing changes.
        st.update_service(&f.stores, &key);
        assert_eq!(apply(&mut st).0, 0);

        f.slices.apply_watcher_event(&Event::Delete(extra));
        assert_eq!(
            st.slice_changed(extra_ref, Some(key.clone()), true),
            vec![key.clone()]
        );
        assert!(st.update_service(&f.stores, &key));
        assert_eq!(apply(&mut st), (1, full(&f.stores)));

        // Service deleted: its ports leave the desired state; the others stay.
        let s3 = svc("a", "s3", 30003, false);
        f.services.apply_watcher_event(&Event::Delete(s3));
        let key3 = ("a".to_string(), "s3".to_string());
        assert!(st.update_service(&f.stores, &key3));
        let (n, runtime) = apply(&mut st);
        assert_eq!(
            (n, runtime.services.len()),
            (1, 4),
            "the deletion is a change"
        );
        assert_eq!(runtime, full(&f.stores));
        assert_eq!(st.service_ports(), 4);
        // Gone for good: a second retranslation queues nothing.
        assert!(!st.update_service(&f.stores, &key3));
    }

    #[test]
    fn agent_state_follows_a_relabelled_slice_and_forgets_what_is_gone() {
        let mut f = fake();
        let mut st = AgentState::new(NODE, TranslateOptions::default());
        for name in ["s1", "s2"] {
            f.services
                .apply_watcher_event(&Event::Apply(svc("a", name, 30001, false)));
        }
        let x = slice("a", "s1", "x", &[("10.77.1.10", "n0", true)]);
        f.slices.apply_watcher_event(&Event::Apply(x.clone()));
        st.resync(&f.stores);
        let d = st.take_desired();
        assert_eq!(d, full(&f.stores));
        let backends = |d: &DesiredState, name: &str| {
            d.services
                .iter()
                .find(|(id, _)| id.name == name)
                .map(|(_, s)| s.backends.len())
        };
        assert_eq!((backends(&d, "s1"), backends(&d, "s2")), (Some(1), Some(0)));

        // The same slice now names s2: both Services are retranslated.
        let moved = slice("a", "s2", "x", &[("10.77.1.10", "n0", true)]);
        f.slices.apply_watcher_event(&Event::Apply(moved.clone()));
        let (k1, k2) = (
            ("a".to_string(), "s1".to_string()),
            ("a".to_string(), "s2".to_string()),
        );
        assert_eq!(
            st.slice_changed(ObjectRef::from_obj(&moved), Some(k2.clone()), false),
            vec![k1.clone(), k2.clone()]
        );
        // Applied twice (a resent event): nothing new to retranslate but its own Service.
        assert_eq!(
            st.slice_changed(ObjectRef::from_obj(&moved), Some(k2.clone()), false),
            vec![k2.clone()]
        );
        st.update_service(&f.stores, &k1);
        st.update_service(&f.stores, &k2);
        let mut d = d;
        for (id, state) in st.take_changes() {
            match state {
                Some(state) => d.services.insert(id, state),
                None => d.services.remove(&id),
            };
        }
        assert_eq!(d, full(&f.stores));
        assert_eq!((backends(&d, "s1"), backends(&d, "s2")), (Some(0), Some(1)));

        // Everything deleted: no entry, no owner record is left behind.
        f.slices.apply_watcher_event(&Event::Delete(moved.clone()));
        st.slice_changed(ObjectRef::from_obj(&moved), Some(k2.clone()), true);
        for name in ["s1", "s2"] {
            f.services
                .apply_watcher_event(&Event::Delete(svc("a", name, 30001, false)));
        }
        st.update_service(&f.stores, &k1);
        st.update_service(&f.stores, &k2);
        assert_eq!(st.service_ports(), 0);
        assert_eq!((st.services.len(), st.slice_owner.len()), (0, 0));
    }

    #[test]
    fn agent_state_resync_drops_objects_gone_while_away() {
        let mut f = fake();
        let mut st = AgentState::new(NODE, TranslateOptions::default());
        f.services
            .apply_watcher_event(&Event::Apply(svc("a", "old", 30001, false)));
        f.services
            .apply_watcher_event(&Event::Apply(svc("a", "kept", 30002, false)));
        st.resync(&f.stores);
        assert_eq!(st.take_desired().services.len(), 2);
        // A relist that no longer has "old" (deleted while the watch was down).
        f.services.apply_watcher_event(&Event::Init);
        f.services
            .apply_watcher_event(&Event::InitApply(svc("a", "kept", 30002, false)));
        f.services.apply_watcher_event(&Event::InitDone);
        st.resync(&f.stores);
        let d = st.take_desired();
        assert_eq!(d, full(&f.stores));
        let names: Vec<&str> = d.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["kept"]);
    }

    #[test]
    fn agent_state_health_checks_count_local_ready_endpoints() {
        let mut f = fake();
        let mut st = AgentState::new(NODE, TranslateOptions::default());
        f.services
            .apply_watcher_event(&Event::Apply(svc("ui", "ui-nlb", 30080, true)));
        f.slices.apply_watcher_event(&Event::Apply(slice(
            "ui",
            "ui-nlb",
            "ui-nlb-a",
            &[
                ("10.77.1.10", "n0", true),
                ("10.77.1.11", "n0", false),
                ("10.77.2.10", "n1", true),
            ],
        )));
        st.resync(&f.stores);
        let hc = st.health_checks();
        assert_eq!(hc.len(), 1);
        let (port, check) = hc.iter().next().unwrap();
        assert_eq!(*port, 32080);
        assert_eq!(check.local_endpoints, 1);
        // Local only: the remote endpoint is not a backend here.
        let d = st.take_desired();
        let state = d.services.values().next().unwrap();
        assert!(state.local_only);
        assert!(state.backends.iter().all(|b| b.local));

        // No local endpoints left: still served (answering 503), count 0.
        f.slices.apply_watcher_event(&Event::Apply(slice(
            "ui",
            "ui-nlb",
            "ui-nlb-a",
            &[("10.77.2.10", "n1", true)],
        )));
        let key = ("ui".to_string(), "ui-nlb".to_string());
        let a = slice("ui", "ui-nlb", "ui-nlb-a", &[]);
        st.slice_changed(ObjectRef::from_obj(&a), Some(key.clone()), false);
        st.update_service(&f.stores, &key);
        assert_eq!(st.health_checks()[&32080].local_endpoints, 0);

        // Cluster policy: no health check port.
        f.services
            .apply_watcher_event(&Event::Apply(svc("ui", "ui-nlb", 30080, false)));
        st.update_service(&f.stores, &key);
        assert!(st.health_checks().is_empty());
    }

    #[test]
    fn agent_node_ips_take_other_nodes_internal_ipv4() {
        let mut f = fake();
        f.nodes
            .apply_watcher_event(&Event::Apply(node("n0", "10.77.0.10")));
        f.nodes
            .apply_watcher_event(&Event::Apply(node("n1", "10.77.0.11")));
        f.nodes
            .apply_watcher_event(&Event::Apply(node("n2", "fd00::2")));
        let (ips, found) = node_ips(&f.stores.nodes.state(), NODE);
        assert!(found);
        assert_eq!(
            ips,
            BTreeMap::from([("n1".to_string(), Ipv4Addr::new(10, 77, 0, 11))])
        );
        let (_, found) = node_ips(&f.stores.nodes.state(), "missing");
        assert!(!found);
    }
}
