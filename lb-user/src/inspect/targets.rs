//! `lb-user targets`: per frontend, its backends and their share of new flows, like
//! `aws elbv2 describe-target-health`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddrV4;

use lb_common::{
    port_host, Backend, ProtoName, BE_LOCAL, BE_TERMINATING, BE_TUNNEL, FE_AFFINITY, FE_LOCAL_ONLY,
};
use serde::Serialize;

use super::{
    view::{active, ip_of, sock, MapsView},
    InspectError,
};

/// A target's health as far as the data plane is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Takes new flows.
    Healthy,
    /// Terminating (or no longer ready): keeps its established flows, gets no new ones.
    Draining,
    /// Holds a backend but gets no share of new flows and is not draining.
    Unused,
    /// The ring or a flow points at an id that holds no backend: such packets go to the kernel.
    Missing,
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Healthy => "healthy",
            TargetState::Draining => "draining",
            TargetState::Unused => "unused",
            TargetState::Missing => "missing",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    pub id: u32,
    /// None when the id holds no backend.
    pub backend: Option<SocketAddrV4>,
    pub state: TargetState,
    /// "local" (a pod on this node), "tunnel" (on another node, through the tunnel) or
    /// "snat" (on another node, SNATed); None when the id holds no backend.
    pub location: Option<&'static str>,
    /// The owning node of a tunnelled backend.
    pub node: Option<std::net::Ipv4Addr>,
    /// Ring positions pointing at it.
    pub ring_slots: u32,
    /// Share of new flows, percent of the ring.
    pub share_pct: f64,
    /// Conntrack entries of this frontend's service slot using it.
    pub flows: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendTargets {
    /// "*" for the NodePort wildcard (every node address), else the address.
    pub address: String,
    pub port: u16,
    pub proto: String,
    pub service_id: u32,
    pub backend_count: u32,
    pub affinity_timeout_s: Option<u32>,
    pub local_only: bool,
    /// Ring members first (by share), then backends only flows still use.
    pub targets: Vec<Target>,
}

impl FrontendTargets {
    /// `addr:port`, `*:nodePort` for the wildcard.
    pub fn label(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// Per frontend, its backends from the Maglev ring (and the ones established flows still use),
/// like `aws elbv2 describe-target-health`. Sorted by protocol, port, address.
pub fn targets(view: &dyn MapsView) -> Result<Vec<FrontendTargets>, InspectError> {
    let cfg = view.config()?;
    let m = cfg.maglev_size;
    let mut frontends = view.frontends()?;
    frontends.sort_by_key(|(k, _)| (k.proto, port_host(k.port), ip_of(k.addr)));

    // Flows per (service slot, backend id).
    let mut flow_counts: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for (_, ct) in view.flows()? {
        *flow_counts
            .entry((ct.service_id, ct.backend_id))
            .or_default() += 1;
    }
    let mut rings: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    let mut backends: BTreeMap<u32, Option<Backend>> = BTreeMap::new();

    let mut out = Vec::new();
    for (key, fe) in frontends {
        let sid = fe.service_id;
        if let std::collections::btree_map::Entry::Vacant(slot) = rings.entry(sid) {
            let mut counts = BTreeMap::new();
            // backend_count 0 means the program never reads the ring.
            if fe.backend_count > 0 && m > 0 {
                for id in view.ring(sid, m)? {
                    *counts.entry(id).or_insert(0u32) += 1;
                }
            }
            slot.insert(counts);
        }
        let ring = &rings[&sid];
        let mut ids: Vec<u32> = ring.keys().copied().collect();
        for &(s, id) in flow_counts.keys() {
            if s == sid && !ring.contains_key(&id) {
                ids.push(id);
            }
        }
        let mut list = Vec::new();
        for id in ids {
            let be = match backends.get(&id) {
                Some(b) => *b,
                None => {
                    let b = active(view.backend(id)?);
                    backends.insert(id, b);
                    b
                }
            };
            let slots = ring.get(&id).copied().unwrap_or(0);
            let state = match be {
                _ if id == 0 => TargetState::Missing,
                None => TargetState::Missing,
                Some(b) if b.flags & BE_TERMINATING != 0 => TargetState::Draining,
                Some(_) if slots > 0 => TargetState::Healthy,
                Some(_) => TargetState::Unused,
            };
            list.push(Target {
                id,
                backend: be.map(|b| sock(b.addr, b.port)),
                state,
                location: be.map(|b| {
                    if b.flags & BE_LOCAL != 0 {
                        "local"
                    } else if b.flags & BE_TUNNEL != 0 {
                        "tunnel"
                    } else {
                        "snat"
                    }
                }),
                node: be
                    .filter(|b| b.flags & (BE_LOCAL | BE_TUNNEL) == BE_TUNNEL)
                    .map(|b| ip_of(b.node_addr)),
                ring_slots: slots,
                share_pct: if m > 0 {
                    slots as f64 * 100.0 / m as f64
                } else {
                    0.0
                },
                flows: flow_counts.get(&(sid, id)).copied().unwrap_or(0),
            });
        }
        list.sort_by(|a, b| {
            b.ring_slots
                .cmp(&a.ring_slots)
                .then_with(|| a.backend.cmp(&b.backend))
                .then_with(|| a.id.cmp(&b.id))
        });
        out.push(FrontendTargets {
            address: if key.addr == 0 {
                "*".to_string()
            } else {
                ip_of(key.addr).to_string()
            },
            port: port_host(key.port),
            proto: ProtoName(key.proto).to_string(),
            service_id: sid,
            backend_count: fe.backend_count,
            affinity_timeout_s: (fe.flags & FE_AFFINITY != 0).then_some(fe.affinity_timeout_s),
            local_only: fe.flags & FE_LOCAL_ONLY != 0,
            targets: list,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use lb_common::{CtEntry, FlowKey, BE_LOCAL, BE_TERMINATING};

    use super::*;
    use crate::inspect::view::test_world::{be, snapshot};

    #[test]
    fn targets_report_ring_share_state_and_flows() {
        let mut s = snapshot();
        // A draining backend still used by one flow of slot 1.
        s.backends
            .push(be([10, 244, 1, 6], 8080, BE_LOCAL | BE_TERMINATING, 8));
        s.conntrack.insert(
            FlowKey {
                client_port: 1,
                ..Default::default()
            },
            CtEntry {
                backend_id: 3,
                service_id: 1,
                ..Default::default()
            },
        );
        s.conntrack.insert(
            FlowKey {
                client_port: 2,
                ..Default::default()
            },
            CtEntry {
                backend_id: 1,
                service_id: 1,
                ..Default::default()
            },
        );
        let t = targets(&s).unwrap();
        let labels: Vec<String> = t
            .iter()
            .map(|f| format!("{}/{}", f.label(), f.proto))
            .collect();
        assert_eq!(labels, ["203.0.113.7:80/TCP", "*:30080/TCP", "*:30053/UDP"]);
        let np = &t[1];
        let rows: Vec<(u32, TargetState, Option<&str>, u32, u64)> = np
            .targets
            .iter()
            .map(|x| (x.id, x.state, x.location, x.ring_slots, x.flows))
            .collect();
        assert_eq!(
            rows,
            [
                (1, TargetState::Healthy, Some("local"), 4, 1),
                (2, TargetState::Healthy, Some("snat"), 3, 0),
                (3, TargetState::Draining, Some("local"), 0, 1),
            ]
        );
        assert!((np.targets[0].share_pct - 400.0 / 7.0).abs() < 1e-9);
        assert!(t[2].targets.is_empty(), "no backends: the ring is not read");
    }
}
