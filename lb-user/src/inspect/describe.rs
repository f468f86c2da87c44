//! Map entries in words, per catalogue map: what `explain` prints for what it read and what
//! the program wrote.

use std::fmt::Write as _;

use lb_common::{
    maps::{
        MapDef, AFFINITY, BACKENDS, CONFIG, CONNTRACK, FRONTENDS, LOCAL_ENDPOINTS, PEERS, RETURNS,
        REVNAT,
    },
    port_host, AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, FlowKey, Frontend,
    FrontendKey, LocalEndpoint, PeerNode, ProtoName, ReturnEntry, RevNatEntry, BE_ACTIVE, BE_LOCAL,
    BE_TERMINATING, BE_TUNNEL, CFG_PEERS, CFG_TUNNEL, CFG_TUNNEL_FOU, CT_CLOSING, CT_SNAT,
    CT_TUNNEL, FE_AFFINITY, FE_LOCAL_ONLY, PEER_SNAT, PEER_TUNNEL, RET_FOU, REV_CLOSING, REV_SNAT,
};

use super::view::{ip_of, sock, sock4};

/// A catalogue map whose keys and values can be put in words.
pub trait Describe: MapDef {
    fn key(key: &Self::Key) -> String;
    fn value(value: &Self::Value) -> String;
}

pub(crate) fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn tuple(k: &CtKey) -> String {
    format!(
        "{} -> {} {}",
        sock4(k.saddr, k.sport),
        sock4(k.daddr, k.dport),
        ProtoName(k.proto)
    )
}

impl Describe for CONFIG {
    fn key(index: &u32) -> String {
        format!("[{index}]")
    }
    fn value(c: &Config) -> String {
        let addrs: Vec<String> = c
            .node_addrs
            .iter()
            .filter(|&&a| a != 0)
            .map(|&a| ip_of(a).to_string())
            .collect();
        let mut s = format!(
            "node addresses {}, SNAT {} ports {}-{}, maglev {}, frontend epoch {}",
            addrs.join(","),
            ip_of(c.snat_addr),
            c.snat_port_min,
            c.snat_port_max,
            c.maglev_size,
            c.frontend_epoch
        );
        if c.flags & CFG_PEERS != 0 {
            s.push_str(", peers on");
        }
        if c.flags & CFG_TUNNEL != 0 {
            let _ = write!(
                s,
                ", tunnel from {} ({}, MTU {})",
                ip_of(c.tunnel_addr),
                if c.flags & CFG_TUNNEL_FOU != 0 {
                    format!("fou port {}", port_host(c.tunnel_port))
                } else {
                    "ipip".to_string()
                },
                c.tunnel_mtu
            );
        }
        s
    }
}

impl Describe for FRONTENDS {
    fn key(k: &FrontendKey) -> String {
        let addr = if k.addr == 0 {
            "*".to_string()
        } else {
            ip_of(k.addr).to_string()
        };
        format!("{addr}:{}/{}", port_host(k.port), ProtoName(k.proto))
    }
    fn value(fe: &Frontend) -> String {
        let mut s = format!(
            "service slot {}, {} backend(s) take new flows",
            fe.service_id, fe.backend_count
        );
        if fe.flags & FE_AFFINITY != 0 {
            let _ = write!(s, ", sessionAffinity ClientIP {} s", fe.affinity_timeout_s);
        }
        if fe.flags & FE_LOCAL_ONLY != 0 {
            s.push_str(", externalTrafficPolicy Local");
        }
        s
    }
}

impl Describe for BACKENDS {
    fn key(id: &u32) -> String {
        format!("id {id}")
    }
    fn value(be: &Backend) -> String {
        if be.flags & BE_ACTIVE == 0 {
            return "empty slot".to_string();
        }
        let mut s = format!(
            "{} {}, ifindex {}, {} -> {}",
            sock(be.addr, be.port),
            if be.flags & BE_LOCAL != 0 {
                "local pod"
            } else {
                "remote"
            },
            be.ifindex,
            mac(&be.smac),
            mac(&be.dmac)
        );
        if be.flags & BE_TUNNEL != 0 {
            let _ = write!(s, ", tunnelled to node {}", ip_of(be.node_addr));
        }
        if be.flags & BE_TERMINATING != 0 {
            s.push_str(", terminating");
        }
        s
    }
}

impl Describe for LOCAL_ENDPOINTS {
    fn key(addr: &u32) -> String {
        ip_of(*addr).to_string()
    }
    fn value(ep: &LocalEndpoint) -> String {
        format!(
            "ifindex {}, {} -> {}",
            ep.ifindex,
            mac(&ep.node_mac),
            mac(&ep.mac)
        )
    }
}

impl Describe for PEERS {
    fn key(addr: &u32) -> String {
        ip_of(*addr).to_string()
    }
    fn value(p: &PeerNode) -> String {
        let roles = match (p.flags & PEER_SNAT != 0, p.flags & PEER_TUNNEL != 0) {
            (true, true) => "SNAT and tunnel peer",
            (true, false) => "SNAT peer",
            (false, true) => "tunnel peer",
            (false, false) => "no role",
        };
        if p.ifindex == 0 {
            return format!("{roles}, no SNATed request seen yet");
        }
        format!(
            "{roles}, SNATed requests arrive on ifindex {} from {} (to {})",
            p.ifindex,
            mac(&p.mac),
            mac(&p.node_mac)
        )
    }
}

impl Describe for CONNTRACK {
    fn key(k: &FlowKey) -> String {
        format!(
            "client {} {}",
            sock4(k.client, k.client_port),
            ProtoName(k.proto)
        )
    }
    fn value(ct: &CtEntry) -> String {
        let mut s = format!(
            "to {}, backend id {}, service slot {}, frontend epoch {}",
            sock4(ct.frontend_addr, ct.frontend_port),
            ct.backend_id,
            ct.service_id,
            ct.frontend_epoch
        );
        if ct.flags & CT_TUNNEL != 0 {
            s.push_str(", tunnelled");
        }
        if ct.flags & CT_SNAT != 0 {
            let _ = write!(s, ", SNAT port {}", port_host(ct.snat_port));
        }
        let _ = write!(
            s,
            ", replies out ifindex {} to {}",
            ct.ifindex,
            mac(&ct.client_mac)
        );
        if ct.flags & CT_CLOSING != 0 {
            let _ = write!(s, ", closing since {} s", ct.stamp_s);
        }
        s
    }
}

impl Describe for RETURNS {
    fn key(k: &CtKey) -> String {
        tuple(k)
    }
    fn value(r: &ReturnEntry) -> String {
        format!(
            "replies go back to {} ({}), out ifindex {} to {}",
            ip_of(r.peer),
            if r.flags & RET_FOU != 0 {
                "fou"
            } else {
                "ipip"
            },
            r.ifindex,
            mac(&r.peer_mac)
        )
    }
}

impl Describe for REVNAT {
    fn key(k: &CtKey) -> String {
        tuple(k)
    }
    fn value(r: &RevNatEntry) -> String {
        let mut s = format!(
            "reply becomes {} -> {}, out ifindex {} to {}",
            sock4(r.frontend_addr, r.frontend_port),
            sock4(r.client_addr, r.client_port),
            r.ifindex,
            mac(&r.client_mac)
        );
        if r.flags & REV_SNAT != 0 {
            s.push_str(", undoes SNAT");
        }
        if r.flags & REV_CLOSING != 0 {
            let _ = write!(s, ", closing since {} s", r.stamp_s);
        } else if r.flags & REV_SNAT != 0 {
            let _ = write!(s, ", last reply at {} s", r.stamp_s);
        }
        s
    }
}

impl Describe for AFFINITY {
    fn key(k: &AffinityKey) -> String {
        format!(
            "client {} on service slot {}",
            ip_of(k.client),
            k.service_id
        )
    }
    fn value(a: &AffinityEntry) -> String {
        format!(
            "backend id {}, last used at {} ms",
            a.backend_id,
            a.last_used_ns / 1_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{ip4, port_be, PROTO_TCP};

    #[test]
    fn entries_read_as_addresses_ports_and_flags() {
        let k = FlowKey {
            client: ip4([10, 0, 0, 9]),
            client_port: port_be(40000),
            proto: PROTO_TCP,
            _pad: 0,
        };
        assert_eq!(CONNTRACK::key(&k), "client 10.0.0.9:40000 TCP");
        let ct = CtEntry {
            frontend_addr: ip4([192, 168, 1, 10]),
            frontend_port: port_be(30080),
            backend_id: 3,
            service_id: 1,
            snat_port: port_be(61001),
            flags: CT_SNAT,
            ifindex: 2,
            ..Default::default()
        };
        assert_eq!(
            CONNTRACK::value(&ct),
            "to 192.168.1.10:30080, backend id 3, service slot 1, frontend epoch 0, SNAT port \
             61001, replies out ifindex 2 to 00:00:00:00:00:00"
        );
        let r5 = CtKey {
            saddr: ip4([10, 0, 0, 9]),
            daddr: ip4([10, 244, 1, 5]),
            sport: port_be(40000),
            dport: port_be(8080),
            proto: PROTO_TCP,
            ..Default::default()
        };
        assert_eq!(RETURNS::key(&r5), "10.0.0.9:40000 -> 10.244.1.5:8080 TCP");
        let fk = FrontendKey {
            addr: 0,
            port: port_be(30080),
            proto: PROTO_TCP,
            _pad: 0,
        };
        assert_eq!(FRONTENDS::key(&fk), "*:30080/TCP");
        assert_eq!(BACKENDS::value(&Backend::default()), "empty slot");
        assert_eq!(
            PEERS::value(&PeerNode {
                flags: PEER_TUNNEL,
                ..PeerNode::default()
            }),
            "tunnel peer, no SNATed request seen yet"
        );
    }
}
