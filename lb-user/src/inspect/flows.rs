//! `lb-user conntrack`: the tracked flows and the backends they use.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{port_host, Backend, ProtoName, CT_CLOSING, CT_SNAT, CT_TUNNEL, RET_FOU};
use serde::Serialize;

use super::{
    view::{active, ip_of, sock, sock4, MapsView},
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
    /// How the requests reach the backend: "local", "tunnel" or "snat".
    pub via: &'static str,
    /// The owning node of a tunnelled flow's backend (the tunnel's far end).
    pub tunnel_to: Option<Ipv4Addr>,
    /// Source port towards a remote backend (host order), for SNATed flows.
    pub snat_port: Option<u16>,
    /// The flow saw FIN or RST.
    pub closing: bool,
}

/// A tunnelled flow whose pod is on this node (the owning node's side): the node that holds
/// it gets the pod's replies back through the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReturnRow {
    pub client: SocketAddrV4,
    pub pod: SocketAddrV4,
    pub proto: String,
    /// The node that holds the flow (the tunnel's far end).
    pub holder: Ipv4Addr,
    /// "ipip" or "fou".
    pub encap: &'static str,
}

/// Every tunnelled flow this node serves for others, sorted by client then pod.
pub fn returns(view: &dyn MapsView) -> Result<Vec<ReturnRow>, InspectError> {
    let mut rows: Vec<ReturnRow> = view
        .returns()?
        .into_iter()
        .map(|(k, r)| ReturnRow {
            client: sock4(k.saddr, k.sport),
            pod: sock4(k.daddr, k.dport),
            proto: ProtoName(k.proto).to_string(),
            holder: ip_of(r.peer),
            encap: if r.flags & RET_FOU != 0 {
                "fou"
            } else {
                "ipip"
            },
        })
        .collect();
    rows.sort_by(|a, b| (a.client, a.pod, &a.proto).cmp(&(b.client, b.pod, &b.proto)));
    Ok(rows)
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
        let tunnel = ct.flags & CT_TUNNEL != 0;
        rows.push(FlowRow {
            client: sock4(key.client, key.client_port),
            frontend: sock4(ct.frontend_addr, ct.frontend_port),
            proto: ProtoName(key.proto).to_string(),
            service_id: ct.service_id,
            backend_id: ct.backend_id,
            backend: be.map(|b| sock(b.addr, b.port)),
            via: if tunnel {
                "tunnel"
            } else if ct.flags & CT_SNAT != 0 {
                "snat"
            } else {
                "local"
            },
            tunnel_to: be.filter(|_| tunnel).map(|b| ip_of(b.node_addr)),
            snat_port: (ct.flags & CT_SNAT != 0).then(|| port_host(ct.snat_port)),
            closing: ct.flags & CT_CLOSING != 0,
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
    use lb_common::{ip4, port_be, CtEntry, CtKey, FlowKey, ReturnEntry, PROTO_TCP};

    use super::*;
    use crate::inspect::view::test_world::{be, sa, snapshot, NODE};

    #[test]
    fn flows_resolve_backends_snat_ports_and_tunnels() {
        let mut s = snapshot();
        let key = FlowKey {
            client: ip4([10, 0, 0, 9]),
            client_port: port_be(40000),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let entry = CtEntry {
            frontend_addr: ip4(NODE),
            frontend_port: port_be(30080),
            backend_id: 2,
            service_id: 1,
            snat_port: port_be(61002),
            flags: CT_SNAT,
            ..Default::default()
        };
        s.conntrack.insert(key, entry);
        s.conntrack.insert(
            FlowKey {
                client_port: port_be(40001),
                ..key
            },
            CtEntry {
                backend_id: 9,
                flags: 0,
                ..entry
            },
        );
        // A tunnelled flow to backend 3, a pod of node 192.168.1.11.
        let mut tunnelled = be([10, 244, 2, 10], 8080, lb_common::BE_TUNNEL, 2);
        tunnelled.node_addr = ip4([192, 168, 1, 11]);
        s.backends.push(tunnelled);
        s.conntrack.insert(
            FlowKey {
                client_port: port_be(40002),
                ..key
            },
            CtEntry {
                backend_id: 3,
                flags: CT_TUNNEL | CT_CLOSING,
                snat_port: 0,
                ..entry
            },
        );
        let rows = flows(&s).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].client, sa("10.0.0.9:40000"));
        assert_eq!(rows[0].frontend, sa("192.168.1.10:30080"));
        assert_eq!(rows[0].backend, Some(sa("10.244.2.9:8080")));
        assert_eq!((rows[0].via, rows[0].snat_port), ("snat", Some(61002)));
        assert_eq!(rows[1].backend, None, "id 9 holds no backend");
        assert_eq!((rows[1].via, rows[1].snat_port), ("local", None));
        assert_eq!(rows[2].via, "tunnel");
        assert_eq!(rows[2].tunnel_to, Some("192.168.1.11".parse().unwrap()));
        assert!(rows[2].closing && !rows[0].closing);

        s.returns.insert(
            CtKey {
                saddr: ip4([10, 0, 0, 9]),
                daddr: ip4([10, 244, 1, 5]),
                sport: port_be(40003),
                dport: port_be(8080),
                proto: PROTO_TCP,
                ..Default::default()
            },
            ReturnEntry {
                peer: ip4([192, 168, 1, 12]),
                flags: RET_FOU,
                ..Default::default()
            },
        );
        let r = returns(&s).unwrap();
        assert_eq!(
            (r[0].client, r[0].pod, r[0].holder, r[0].encap),
            (
                sa("10.0.0.9:40003"),
                sa("10.244.1.5:8080"),
                "192.168.1.12".parse().unwrap(),
                "fou"
            )
        );
    }
}
