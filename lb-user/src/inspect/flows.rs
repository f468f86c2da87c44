//! `lb-user conntrack`: the tracked flows and the backends they use.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use lb_common::{port_host, Backend, ProtoName, CT_SNAT};
use serde::Serialize;

use super::{
    view::{active, sock, sock4, MapsView},
    InspectError,
};

/// One tracked flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub proto: String,
    pub service_id: u32,
    pub backend_id: u32,
    /// None when the id no longer holds a backend (the flow will reselect).
    pub backend: Option<SocketAddrV4>,
    /// Source port towards a remote backend (host order), for SNATed flows.
    pub snat_port: Option<u16>,
}

/// Every conntrack entry, sorted by client then frontend.
pub fn flows(view: &dyn MapsView) -> Result<Vec<FlowRow>, InspectError> {
    let mut backends: BTreeMap<u32, Option<Backend>> = BTreeMap::new();
    let mut rows = Vec::new();
    for (key, ct) in view.flows()? {
        let be = match backends.get(&ct.backend_id) {
            Some(b) => *b,
            None => {
                let b = active(view.backend(ct.backend_id)?);
                backends.insert(ct.backend_id, b);
                b
            }
        };
        rows.push(FlowRow {
            client: sock4(key.saddr, key.sport),
            frontend: sock4(key.daddr, key.dport),
            proto: ProtoName(key.proto).to_string(),
            service_id: ct.service_id,
            backend_id: ct.backend_id,
            backend: be.map(|b| sock(b.addr, b.port)),
            snat_port: (ct.flags & CT_SNAT != 0).then(|| port_host(ct.snat_port)),
        });
    }
    rows.sort_by(|a, b| {
        (
            a.client.ip(),
            a.client.port(),
            a.frontend.ip(),
            a.frontend.port(),
            &a.proto,
        )
            .cmp(&(
                b.client.ip(),
                b.client.port(),
                b.frontend.ip(),
                b.frontend.port(),
                &b.proto,
            ))
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use lb_common::{ip4, port_be, CtEntry, CtKey, CT_SNAT, PROTO_TCP};

    use super::*;
    use crate::inspect::view::test_world::{sa, snapshot, NODE};

    #[test]
    fn flows_resolve_backends_and_snat_ports() {
        let mut s = snapshot();
        let key = CtKey {
            saddr: ip4([10, 0, 0, 9]),
            daddr: ip4(NODE),
            sport: port_be(40000),
            dport: port_be(30080),
            proto: PROTO_TCP,
            ..Default::default()
        };
        s.conntrack.insert(
            key,
            CtEntry {
                backend_id: 2,
                service_id: 1,
                snat_port: port_be(61002),
                flags: CT_SNAT,
                ..Default::default()
            },
        );
        s.conntrack.insert(
            CtKey {
                sport: port_be(40001),
                ..key
            },
            CtEntry {
                backend_id: 9,
                service_id: 1,
                ..Default::default()
            },
        );
        let rows = flows(&s).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].client, sa("10.0.0.9:40000"));
        assert_eq!(rows[0].frontend, sa("192.168.1.10:30080"));
        assert_eq!(rows[0].backend, Some(sa("10.244.2.9:8080")));
        assert_eq!(rows[0].snat_port, Some(61002));
        assert_eq!(rows[1].backend, None, "id 9 holds no backend");
        assert_eq!(rows[1].snat_port, None);
    }
}
