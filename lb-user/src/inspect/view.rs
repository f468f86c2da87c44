//! The map reads the reports (counters, flows, targets) need, behind one trait: the live maps
//! (`bpf::maps::Maps`, opened from pins) and, in tests, an in-memory [`Snapshot`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    maps::{BACKENDS, CONFIG, CONNTRACK, FRONTENDS, MAGLEV, RETURNS},
    port_host, v4_octets, Backend, Config, CtEntry, CtKey, FlowKey, Frontend, FrontendKey, Reason,
    ReturnEntry, BE_ACTIVE,
};

use crate::bpf::{dataplane::stats, maps::Maps};

use super::InspectError;

/// Lookups return `None` for a missing key or an index beyond the map, exactly the cases in
/// which the BPF program's lookup fails.
pub trait MapsView {
    fn config(&self) -> Result<Config, InspectError>;
    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError>;
    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError>;
    /// The ring of service slot `service_id`; shorter than `maglev_size` only if the map is.
    fn ring(&self, service_id: u32, maglev_size: u32) -> Result<Vec<u32>, InspectError>;
    fn flows(&self) -> Result<Vec<(FlowKey, CtEntry)>, InspectError>;
    /// The tunnelled flows whose pods are on this node.
    fn returns(&self) -> Result<Vec<(CtKey, ReturnEntry)>, InspectError>;
    /// Counters summed over CPUs, one per `Reason`.
    fn stats(&self) -> Result<Vec<(Reason, u64)>, InspectError>;
}

impl MapsView for Maps {
    fn config(&self) -> Result<Config, InspectError> {
        Ok(self.element::<CONFIG>(0)?.unwrap_or_default())
    }

    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError> {
        Ok(self.entries::<FRONTENDS>()?)
    }

    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError> {
        Ok(self.element::<BACKENDS>(id)?)
    }

    /// Reads each element (two slots) once.
    fn ring(&self, service_id: u32, maglev_size: u32) -> Result<Vec<u32>, InspectError> {
        let start = service_id as u64 * maglev_size as u64;
        let end = start + maglev_size as u64;
        let mut out = Vec::with_capacity(maglev_size as usize);
        let mut elem = start / 2;
        while elem * 2 < end {
            let Ok(index) = u32::try_from(elem) else {
                break;
            };
            let Some(pair) = self.element::<MAGLEV>(index)? else {
                break;
            };
            for (half, id) in pair.iter().enumerate() {
                let slot = elem * 2 + half as u64;
                if slot >= start && slot < end {
                    out.push(*id);
                }
            }
            elem += 1;
        }
        Ok(out)
    }

    fn flows(&self) -> Result<Vec<(FlowKey, CtEntry)>, InspectError> {
        Ok(self.entries::<CONNTRACK>()?)
    }

    fn returns(&self) -> Result<Vec<(CtKey, ReturnEntry)>, InspectError> {
        Ok(self.entries::<RETURNS>()?)
    }

    fn stats(&self) -> Result<Vec<(Reason, u64)>, InspectError> {
        Ok(stats(self)?)
    }
}

/// Map contents held in memory: for tests of the reports without a kernel.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub config: Config,
    pub frontends: HashMap<FrontendKey, Frontend>,
    /// Indexed by backend id; ids beyond the end do not exist.
    pub backends: Vec<Backend>,
    /// The flat ring sequence (service `s` at `[s * M, (s + 1) * M)`).
    pub rings: Vec<u32>,
    pub conntrack: HashMap<FlowKey, CtEntry>,
    pub returns: HashMap<CtKey, ReturnEntry>,
    /// Indexed by `Reason as usize`.
    pub stats: Vec<u64>,
}

impl MapsView for Snapshot {
    fn config(&self) -> Result<Config, InspectError> {
        Ok(self.config)
    }
    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError> {
        Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError> {
        Ok(self.backends.get(id as usize).copied())
    }
    fn ring(&self, service_id: u32, maglev_size: u32) -> Result<Vec<u32>, InspectError> {
        let start = service_id as usize * maglev_size as usize;
        let end = (start + maglev_size as usize).min(self.rings.len());
        Ok(self.rings.get(start..end).unwrap_or_default().to_vec())
    }
    fn flows(&self) -> Result<Vec<(FlowKey, CtEntry)>, InspectError> {
        Ok(self.conntrack.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn returns(&self) -> Result<Vec<(CtKey, ReturnEntry)>, InspectError> {
        Ok(self.returns.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn stats(&self) -> Result<Vec<(Reason, u64)>, InspectError> {
        Ok(Reason::ALL
            .iter()
            .map(|&r| (r, self.stats.get(r as usize).copied().unwrap_or(0)))
            .collect())
    }
}

// Formatting shared by the reports.

pub(crate) fn ip(addr: [u32; 4]) -> Ipv4Addr {
    Ipv4Addr::from(v4_octets(addr))
}

pub(crate) fn sock(addr: [u32; 4], port_net: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(addr), port_host(port_net))
}

/// An address as map keys hold it (one IPv4 `u32`, wire order).
pub(crate) fn ip_of(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

pub(crate) fn sock4(addr: u32, port_net: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip_of(addr), port_host(port_net))
}

pub(crate) fn serialize_reason<S: serde::Serializer>(r: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.name())
}

/// A BACKENDS entry that holds a backend.
pub(crate) fn active(be: Option<Backend>) -> Option<Backend> {
    be.filter(|b| b.flags & BE_ACTIVE != 0)
}

/// A small state for the reports' tests.
#[cfg(test)]
pub(crate) mod test_world {
    use std::net::SocketAddrV4;

    use lb_common::{
        ip4, port_be, v4, Backend, Config, Frontend, FrontendKey, BE_ACTIVE, BE_LOCAL, PROTO_TCP,
        PROTO_UDP,
    };

    use super::Snapshot;

    pub(crate) const NODE: [u8; 4] = [192, 168, 1, 10];
    pub(crate) const LB_IP: [u8; 4] = [203, 0, 113, 7];
    pub(crate) const M: u32 = 7;

    pub(crate) fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    pub(crate) fn be(addr: [u8; 4], port: u16, flags: u8, ifindex: u32) -> Backend {
        Backend {
            addr: v4(addr),
            port: port_be(port),
            flags: BE_ACTIVE | flags,
            ifindex,
            ..Default::default()
        }
    }

    /// One NodePort service (slot 1) with a local (id 1) and a remote (id 2) backend, one
    /// LoadBalancer IP frontend on the same slot, and an empty UDP service (slot 0).
    pub(crate) fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            config: Config {
                node_addrs: [v4(NODE)[0], 0, 0, 0],
                snat_addr: v4(NODE)[0],
                maglev_size: M,
                snat_port_min: 61000,
                snat_port_max: 61003,
                snat_idle_s: 300,
                ..Default::default()
            },
            backends: vec![
                Backend::default(),
                be([10, 244, 1, 5], 8080, BE_LOCAL, 7),
                be([10, 244, 2, 9], 8080, 0, 2),
            ],
            rings: vec![0; 3 * M as usize],
            stats: vec![0; 32],
            ..Default::default()
        };
        // Ring of slot 1: 4 x id 1, 3 x id 2.
        for (i, id) in [1, 2, 1, 2, 1, 2, 1].into_iter().enumerate() {
            s.rings[M as usize + i] = id;
        }
        let fe = Frontend {
            service_id: 1,
            backend_count: 2,
            flags: 0,
            affinity_timeout_s: 0,
        };
        s.frontends.insert(
            FrontendKey {
                addr: 0,
                port: port_be(30080),
                proto: PROTO_TCP,
                ..Default::default()
            },
            fe,
        );
        s.frontends.insert(
            FrontendKey {
                addr: ip4(LB_IP),
                port: port_be(80),
                proto: PROTO_TCP,
                ..Default::default()
            },
            fe,
        );
        s.frontends.insert(
            FrontendKey {
                addr: 0,
                port: port_be(30053),
                proto: PROTO_UDP,
                ..Default::default()
            },
            Frontend {
                service_id: 0,
                backend_count: 0,
                flags: 0,
                affinity_timeout_s: 0,
            },
        );
        s
    }
}
