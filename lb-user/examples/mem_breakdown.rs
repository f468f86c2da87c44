//! Where the agent's memory goes at N Services (default 10 000; 10 endpoints each, shaped like
//! `cargo xtask bench agent`'s objects), component by component: the two reflector stores,
//! the agent's index, the desired state, the reconciler's shadow and the full apply's peak.
//! Counts the bytes the code asks the allocator for (a counting global allocator), so the
//! numbers are exact and repeatable but leave out malloc's per-chunk overhead and
//! fragmentation: the benchmark's RSS is the number the target is about.
//!
//! `cargo run --release -p lb-user --example mem_breakdown [-- N]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use k8s_openapi::api::core::v1::{Node, Service};
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use lb_common::{Backend, Frontend, FrontendKey};
use lb_user::control::model::BackendSpec;
use lb_user::control::reconcile::{
    Delivery, MapWriter, ReconcileConfig, Reconciler, Resolver, WriteError,
};
use lb_user::k8s::slim::SlimEndpointSlice;
use lb_user::k8s::state::AgentState;
use lb_user::k8s::watch::{trim_service, trim_slice, Stores};
use serde_json::json;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size() as isize, Ordering::Relaxed) + l.size() as isize;
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(bytes: isize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Prints what changed since the last step and the peak within this step.
struct Steps {
    last: isize,
}

impl Steps {
    fn step(&mut self, what: &str) {
        let live = LIVE.load(Ordering::Relaxed);
        println!(
            "{what:44} {:>11}   live {:>11}   peak in step {:>11}",
            mib(live - self.last),
            mib(live),
            mib(PEAK.load(Ordering::Relaxed))
        );
        self.last = live;
        PEAK.store(live, Ordering::Relaxed);
    }
}

/// Every backend is reachable; no writes.
struct Reachable;
impl Resolver for Reachable {
    fn resolve(&self, _: &BackendSpec) -> Result<Delivery, String> {
        Ok(Delivery {
            ifindex: 2,
            dmac: [2; 6],
            smac: [4; 6],
            tunnel_to: None,
        })
    }
}

struct NoMaps;
impl MapWriter for NoMaps {
    fn set_backend(&mut self, _: u32, _: &Backend) -> Result<(), WriteError> {
        Ok(())
    }
    fn clear_backend(&mut self, _: u32) -> Result<(), WriteError> {
        Ok(())
    }
    fn write_ring(&mut self, _: u32, _: &[(u32, u32)]) -> Result<(), WriteError> {
        Ok(())
    }
    fn set_frontend(&mut self, _: &FrontendKey, _: &Frontend) -> Result<(), WriteError> {
        Ok(())
    }
    fn remove_frontend(&mut self, _: &FrontendKey) -> Result<(), WriteError> {
        Ok(())
    }
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("bench-svc-{i:05}"), "namespace": "lbx-bench",
            "uid": "0f0e4d3c-1111-2222-3333-444455556666", "resourceVersion": "123456",
            "creationTimestamp": "2026-11-24T00:00:00Z",
            "labels": {"app.kubernetes.io/part-of": "lbx-bench"}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.1.2", "clusterIPs": ["10.96.1.2"],
            "externalIPs": [format!("198.18.{}.{}", i / 250, i % 250 + 1)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        "status": {"loadBalancer": {}}
    }))
    .expect("a valid Service")
}

fn slice(i: usize) -> SlimEndpointSlice {
    let endpoints: Vec<_> = (0..10)
        .map(|j| {
            json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 25000, (i / 100) % 250, (i % 100) * 2 + j)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "lbx-remote-node"})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("bench-svc-{i:05}-bench"), "namespace": "lbx-bench",
            "uid": "0f0e4d3c-1111-2222-3333-444455556666", "resourceVersion": "123456",
            "labels": {"kubernetes.io/service-name": format!("bench-svc-{i:05}"),
                       "endpointslice.kubernetes.io/managed-by": "lbx-bench"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .expect("a valid EndpointSlice")
}

fn main() {
    let n: usize = match std::env::args().nth(1) {
        None => 10_000,
        Some(a) => a.parse().expect("usage: mem_breakdown [SERVICES]"),
    };
    let mut steps = Steps { last: 0 };
    steps.step("start");
    let (services, mut services_w) = reflector::store::<Service>();
    let (slices, mut slices_w) = reflector::store::<SlimEndpointSlice>();
    let (nodes, _nodes_w) = reflector::store::<Node>();
    for i in 0..n {
        let mut s = service(i);
        trim_service(&mut s);
        services_w.apply_watcher_event(&Event::Apply(s));
    }
    steps.step("Services store (trimmed)");
    for i in 0..n {
        let mut s = slice(i);
        trim_slice(&mut s);
        slices_w.apply_watcher_event(&Event::Apply(s));
    }
    steps.step("EndpointSlice store (slim, trimmed)");
    let stores = Stores {
        services,
        slices,
        nodes,
    };
    let mut state = AgentState::new("lbx-this-node", Default::default());
    state.resync(&stores);
    let desired = state.take_desired();
    steps.step("agent index + desired state");
    let mut rec = Reconciler::new(ReconcileConfig {
        max_services: n as u32,
        max_backends: (n * 10 + 2) as u32,
        maglev_size: 1021,
    })
    .expect("a usable config");
    let report = rec
        .apply(&desired, &Reachable, &mut NoMaps)
        .expect("no write fails");
    drop(report);
    steps.step("reconciler after the first full apply");
    drop(desired);
    steps.step("(desired state dropped)");
    drop(rec);
    steps.step("(reconciler dropped)");
    drop(state);
    steps.step("(agent index dropped)");
}
