//! `lb-user explain`: what the data plane does with one packet, answered by the real
//! programs. The packet runs through `lb_ingress` (or `lb_reply`) with BPF_PROG_TEST_RUN in
//! a [`Sandbox`]: the maps the programs only read are the running instance's, shared through
//! its pins; the maps they write are private copies seeded with the entries of the live maps
//! that matter for this packet (below). The report is the verdict, the one reason counter
//! that moved, the packet as the program left it (decoded, checksums verified from scratch),
//! the interface it goes out of, and the map entries read and written. There is no model of
//! the program to drift from it: a new path in the program is explained the day it lands.
//!
//! The entries that matter, copied into the private maps before the run (what the program
//! would find in the live maps on this packet's path):
//! - the packet's own conntrack entry, and the reverse-NAT entry its flow's replies use;
//! - the packet's own reverse-NAT entry (a reply), and its flow's conntrack entry;
//! - the PEERS entries of its source and destination;
//! - the affinity entries of its client on the services its destination matches;
//! - for new flows to those services: the reverse-NAT entries of the client at each of their
//!   backends, and every SNAT entry towards them (the ports SNAT allocation probes).
//!
//! The interface a redirected packet leaves through is not part of what BPF_PROG_TEST_RUN
//! returns; it is read from the entry the program redirected by, named by the reason
//! (the flow's backend, the reverse-NAT entry, the local endpoint or the peer).

use std::collections::BTreeSet;
use std::path::Path;

use aya::Pod;
use lb_common::{
    maps::{
        AFFINITY, BACKENDS, CONFIG, CONNTRACK, FRONTENDS, LOCAL_ENDPOINTS, PEERS, RETURNS, REVNAT,
    },
    port_host, AffinityKey, Backend, Config, CtEntry, CtKey, FlowKey, FrontendKey, Reason,
    ReturnEntry, RevNatEntry, CFG_TUNNEL, CT_SNAT,
};
use serde::Serialize;

use crate::bpf::{
    dataplane::stats,
    maps::Maps,
    sandbox::{Hook, Sandbox},
};

use super::{
    describe::Describe,
    packet::{Decoded, FrameKeys},
    view::{serialize_reason, MapsView},
    InspectError,
};

/// One map entry as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub map: &'static str,
    pub key: String,
    pub value: String,
}

/// An entry the program changed: before and after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub map: &'static str,
    pub key: String,
    pub before: String,
    pub after: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The program the packet went through.
    pub program: &'static str,
    pub input: Decoded,
    /// The program's return value and its name (XDP_REDIRECT, TC_ACT_OK, ...).
    pub verdict: u32,
    pub action: &'static str,
    /// The reason counter that moved (None would be a program bug: every packet counts one).
    #[serde(serialize_with = "serialize_opt_reason")]
    pub reason: Option<Reason>,
    pub reason_text: &'static str,
    /// The packet as the program left it.
    #[serde(skip)]
    pub output: Vec<u8>,
    /// Decoded, when the program changed it.
    pub rewritten: Option<Decoded>,
    /// Where a redirected packet goes.
    pub out_ifindex: Option<u32>,
    /// The packet goes back out of the interface it came in on (an ICMP error lbx built).
    pub back_out: bool,
    /// Live entries on the packet's path (shared maps) and the flow state copied in.
    pub read: Vec<Entry>,
    pub created: Vec<Entry>,
    pub changed: Vec<Change>,
    pub removed: Vec<Entry>,
}

fn serialize_opt_reason<S: serde::Serializer>(r: &Option<Reason>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => serialize_reason(r, s),
        None => s.serialize_none(),
    }
}

/// Runs `frame` through the program at `hook` against the instance pinned in `live` (the
/// pin directory as this process reaches it). Live maps are not written.
pub fn explain(live: &Path, hook: Hook, frame: &[u8]) -> Result<Explanation, InspectError> {
    let maps = Maps::from_pins(live)?;
    let cfg = maps.element::<CONFIG>(0)?.unwrap_or_default();
    let fou = (cfg.flags & CFG_TUNNEL != 0).then(|| port_host(cfg.tunnel_port));
    let mut sandbox = Sandbox::open(live)?;
    let keys = Decoded::keys(frame, fou);
    let mut read = Vec::new();
    seed(&maps, &mut sandbox, hook, &cfg, &keys, &mut read)?;
    let before = State::of(sandbox.maps())?;
    let (verdict, output) = sandbox.run(hook, frame)?;
    let after = State::of(sandbox.maps())?;

    let moved: Vec<Reason> = before
        .stats
        .iter()
        .zip(&after.stats)
        .filter(|((_, a), (_, b))| b > a)
        .map(|((r, _), _)| *r)
        .collect();
    let reason = match moved.as_slice() {
        [one] => Some(*one),
        _ => None,
    };
    let (mut created, mut changed, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    before.diff(&after, &mut created, &mut changed, &mut removed);
    let out_ifindex = match reason {
        Some(r) => out_interface(&maps, &after, r, &keys)?,
        None => None,
    };
    Ok(Explanation {
        program: match hook {
            Hook::Ingress => "lb_ingress (XDP, node NIC)",
            Hook::Reply => "lb_reply (TC ingress, pod veth)",
        },
        input: Decoded::decode_with(frame, fou),
        verdict,
        action: action_name(hook, verdict),
        reason,
        reason_text: reason.map_or(
            " no reason counter moved by exactly one: a program bug",
            Reason::describe,
        ),
        rewritten: (output != frame).then(|| Decoded::decode_with(&output, fou)),
        output,
        out_ifindex,
        back_out: matches!(reason, Some(Reason::IcmpTooBig | Reason::IcmpTimeExceeded)),
        read,
        created,
        changed,
        removed,
    })
}

/// Copies the live entries that matter for the frame's keys into the sandbox (see the
/// module docs) and lists what the packet's path reads.
fn seed(
    maps: &Maps,
    sandbox: &mut Sandbox,
    hook: Hook,
    cfg: &Config,
    keys: &FrameKeys,
    read: &mut Vec<Entry>,
) -> Result<(), InspectError> {
    read.push(entry::<CONFIG>(&0, cfg));
    let mut copy = Copier {
        maps,
        sandbox,
        read,
        done: Vec::new(),
    };
    match hook {
        Hook::Reply => {
            if let Some(k) = &keys.l4 {
                copy.reply_flow(k)?;
                copy.one::<RETURNS>(&swapped(k))?;
            }
            if let Some(q) = &keys.quote {
                copy.request_flow(q)?;
                copy.one::<RETURNS>(q)?;
            }
            copy.one::<PEERS>(&keys.daddr)?;
        }
        Hook::Ingress => {
            copy.one::<PEERS>(&keys.saddr)?;
            if let Some(inner) = &keys.inner {
                // Tunnelled: a request for a pod here, or a reply of a flow held here.
                copy.shared::<LOCAL_ENDPOINTS>(&inner.daddr)?;
                if let Some(k) = &inner.l4 {
                    copy.one::<RETURNS>(k)?;
                    copy.reply_flow(k)?;
                }
                if let Some(q) = &inner.quote {
                    copy.request_flow(q)?;
                }
            }
            if let Some(q) = &keys.quote {
                // An error from a backend about a SNATed request, or from the path about a
                // reply (quoting frontend -> client).
                if let Some(rev) = copy.one::<REVNAT>(&swapped(q))? {
                    copy.one::<CONNTRACK>(&client_of(&rev, q.proto))?;
                }
                copy.reply_flow(q)?;
            }
            if let Some(k) = &keys.l4 {
                copy.ingress(cfg, k)?;
            }
        }
    }
    Ok(())
}

/// A 5-tuple the other way round (a reply's, from a request's).
fn swapped(k: &CtKey) -> CtKey {
    CtKey {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        ..*k
    }
}

/// The CONNTRACK key of the client a reverse-SNAT entry restores.
fn client_of(rev: &RevNatEntry, proto: u8) -> FlowKey {
    FlowKey {
        client: rev.client_addr,
        client_port: rev.client_port,
        proto,
        _pad: 0,
    }
}

/// Copies live entries into the sandbox and notes what was read (each entry once).
struct Copier<'a> {
    maps: &'a Maps,
    sandbox: &'a mut Sandbox,
    read: &'a mut Vec<Entry>,
    /// (map, key) of the entries already listed.
    done: Vec<(&'static str, String)>,
}

impl Copier<'_> {
    /// A request's flow (its source is the client): the entry, its backend, and for a SNATed
    /// flow the reverse-SNAT entry of its replies.
    fn request_flow(&mut self, k: &CtKey) -> Result<Option<CtEntry>, InspectError> {
        let key = FlowKey {
            client: k.saddr,
            client_port: k.sport,
            proto: k.proto,
            _pad: 0,
        };
        self.flow(&key, k.proto)
    }

    /// A reply's flow (its destination is the client).
    fn reply_flow(&mut self, k: &CtKey) -> Result<Option<CtEntry>, InspectError> {
        let key = FlowKey {
            client: k.daddr,
            client_port: k.dport,
            proto: k.proto,
            _pad: 0,
        };
        self.flow(&key, k.proto)
    }

    fn flow(&mut self, key: &FlowKey, proto: u8) -> Result<Option<CtEntry>, InspectError> {
        let Some(ct) = self.one::<CONNTRACK>(key)? else {
            return Ok(None);
        };
        if let Some(be) = self.backend(ct.backend_id)? {
            if ct.flags & CT_SNAT != 0 {
                let cfg = self.maps.element::<CONFIG>(0)?.unwrap_or_default();
                self.one::<REVNAT>(&reply_key(&be, cfg.snat_addr, ct.snat_port, proto))?;
            }
        }
        Ok(Some(ct))
    }

    /// A TCP/UDP packet on the NIC: a reply to a SNATed flow, a request of a flow (its own,
    /// or another frontend's on the client's tuple), and for a new flow the services its
    /// destination matches: this client's affinity, its entries at their backends, and the
    /// SNAT entries towards them.
    fn ingress(&mut self, cfg: &Config, k: &CtKey) -> Result<(), InspectError> {
        if let Some(rev) = self.one::<REVNAT>(k)? {
            self.one::<CONNTRACK>(&client_of(&rev, k.proto))?;
        }
        self.shared::<LOCAL_ENDPOINTS>(&k.daddr)?;
        self.request_flow(k)?;
        let mut services = BTreeSet::new();
        for addr in [0, k.daddr] {
            let fkey = FrontendKey {
                addr,
                port: k.dport,
                proto: k.proto,
                _pad: 0,
            };
            if let Some(fe) = self.shared::<FRONTENDS>(&fkey)? {
                services.insert(fe.service_id);
            }
        }
        let mut ends = Vec::new();
        for &service_id in &services {
            let akey = AffinityKey {
                client: k.saddr,
                service_id,
            };
            self.one::<AFFINITY>(&akey)?;
            for id in self.maps.ring(service_id, cfg.maglev_size)? {
                if id != 0 && !ends.iter().any(|(i, _)| *i == id) {
                    if let Some(be) = self.maps.element::<BACKENDS>(id)? {
                        ends.push((id, be));
                    }
                }
            }
        }
        if cfg.snat_addr != 0 && !ends.is_empty() {
            for (rk, v) in self.maps.entries::<REVNAT>()? {
                let towards = |(_, b): &(u32, Backend)| b.addr[0] == rk.saddr && b.port == rk.sport;
                if rk.daddr == cfg.snat_addr && rk.proto == k.proto && ends.iter().any(towards) {
                    self.sandbox.seed::<REVNAT>(&rk, &v)?;
                }
            }
        }
        Ok(())
    }

    /// The live entry of `key` in a map the programs write: copied into the sandbox.
    fn one<M>(&mut self, key: &M::Key) -> Result<Option<M::Value>, InspectError>
    where
        M: Describe,
        M::Key: Pod,
        M::Value: Pod,
    {
        let found = self.maps.lookup::<M>(key)?;
        if let Some(v) = &found {
            self.sandbox.seed::<M>(key, v)?;
            self.note(entry::<M>(key, v));
        }
        Ok(found)
    }

    fn note(&mut self, e: Entry) {
        let id = (e.map, e.key.clone());
        if !self.done.contains(&id) {
            self.done.push(id);
            self.read.push(e);
        }
    }

    /// The live entry of `key` in a map the sandbox shares with the live programs.
    fn shared<M>(&mut self, key: &M::Key) -> Result<Option<M::Value>, InspectError>
    where
        M: Describe,
        M::Key: Pod,
        M::Value: Pod,
    {
        let found = self.maps.lookup::<M>(key)?;
        if let Some(v) = &found {
            self.note(entry::<M>(key, v));
        }
        Ok(found)
    }

    fn backend(&mut self, id: u32) -> Result<Option<Backend>, InspectError> {
        let be = self.maps.element::<BACKENDS>(id)?;
        if let Some(b) = &be {
            self.note(entry::<BACKENDS>(&id, b));
        }
        Ok(be)
    }
}

fn entry<M: Describe>(key: &M::Key, value: &M::Value) -> Entry {
    Entry {
        map: M::SPEC.name,
        key: M::key(key),
        value: M::value(value),
    }
}

/// The 5-tuple a backend's reply to `dst:dport` arrives with (wire order).
fn reply_key(be: &Backend, dst: u32, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: be.addr[0],
        daddr: dst,
        sport: be.port,
        dport,
        proto,
        ..Default::default()
    }
}

/// The private maps' contents, before or after the run.
struct State {
    conntrack: Vec<(FlowKey, CtEntry)>,
    revnat: Vec<(CtKey, RevNatEntry)>,
    affinity: Vec<(AffinityKey, lb_common::AffinityEntry)>,
    peers: Vec<(u32, lb_common::PeerNode)>,
    returns: Vec<(CtKey, ReturnEntry)>,
    stats: Vec<(Reason, u64)>,
}

impl State {
    fn of(maps: &Maps) -> Result<Self, InspectError> {
        Ok(State {
            conntrack: maps.entries::<CONNTRACK>()?,
            revnat: maps.entries::<REVNAT>()?,
            affinity: maps.entries::<AFFINITY>()?,
            peers: maps.entries::<PEERS>()?,
            returns: maps.entries::<RETURNS>()?,
            stats: stats(maps)?,
        })
    }

    fn diff(
        &self,
        after: &State,
        created: &mut Vec<Entry>,
        changed: &mut Vec<Change>,
        removed: &mut Vec<Entry>,
    ) {
        diff::<CONNTRACK>(&self.conntrack, &after.conntrack, created, changed, removed);
        diff::<REVNAT>(&self.revnat, &after.revnat, created, changed, removed);
        diff::<AFFINITY>(&self.affinity, &after.affinity, created, changed, removed);
        diff::<PEERS>(&self.peers, &after.peers, created, changed, removed);
        diff::<RETURNS>(&self.returns, &after.returns, created, changed, removed);
    }
}

fn diff<M: Describe>(
    before: &[(M::Key, M::Value)],
    after: &[(M::Key, M::Value)],
    created: &mut Vec<Entry>,
    changed: &mut Vec<Change>,
    removed: &mut Vec<Entry>,
) where
    M::Key: PartialEq,
    M::Value: PartialEq,
{
    for (k, v) in after {
        match before.iter().find(|(bk, _)| bk == k) {
            None => created.push(entry::<M>(k, v)),
            Some((_, old)) if old != v => changed.push(Change {
                map: M::SPEC.name,
                key: M::key(k),
                before: M::value(old),
                after: M::value(v),
            }),
            Some(_) => {}
        }
    }
    for (k, v) in before {
        if !after.iter().any(|(ak, _)| ak == k) {
            removed.push(entry::<M>(k, v));
        }
    }
}

/// The interface a redirected packet leaves through, from the entry the program redirected
/// by (its reason says which).
fn out_interface(
    maps: &Maps,
    after: &State,
    reason: Reason,
    keys: &FrameKeys,
) -> Result<Option<u32>, InspectError> {
    let flow = |client: u32, port: u16, proto: u8| {
        after
            .conntrack
            .iter()
            .find(|(k, _)| k.client == client && k.client_port == port && k.proto == proto)
            .map(|(_, e)| *e)
    };
    let backend_if = |ct: Option<CtEntry>| -> Result<Option<u32>, InspectError> {
        Ok(match ct {
            Some(ct) => maps.element::<BACKENDS>(ct.backend_id)?.map(|b| b.ifindex),
            None => None,
        })
    };
    let inner = keys.inner.as_deref();
    Ok(match reason {
        Reason::FwdLocal | Reason::FwdRemote | Reason::FwdTunnel => match &keys.l4 {
            Some(k) => backend_if(flow(k.saddr, k.sport, k.proto))?,
            None => None,
        },
        Reason::RevNatRemote => after
            .revnat
            .iter()
            .find(|(k, _)| Some(*k) == keys.l4)
            .map(|(_, r)| r.ifindex),
        Reason::RevNatLocal => keys
            .l4
            .and_then(|k| flow(k.daddr, k.dport, k.proto))
            .map(|ct| ct.ifindex),
        Reason::RevNatTunnel => inner
            .and_then(|i| i.l4)
            .and_then(|k| flow(k.daddr, k.dport, k.proto))
            .map(|ct| ct.ifindex),
        Reason::IcmpRevNat => {
            let quote = keys.quote.or(inner.and_then(|i| i.quote));
            match quote {
                Some(q) => match flow(q.saddr, q.sport, q.proto) {
                    Some(ct) => Some(ct.ifindex),
                    // A SNATed flow's error, back to the client the REVNAT entry names.
                    None => after
                        .revnat
                        .iter()
                        .find(|(k, _)| *k == swapped(&q))
                        .map(|(_, r)| r.ifindex),
                },
                None => None,
            }
        }
        Reason::IcmpToBackend => match keys.quote {
            Some(q) => backend_if(flow(q.daddr, q.dport, q.proto))?,
            None => None,
        },
        Reason::FwdPeer => maps
            .lookup::<LOCAL_ENDPOINTS>(&keys.daddr)?
            .map(|e| e.ifindex),
        Reason::TunnelIn => match inner {
            Some(i) => maps.lookup::<LOCAL_ENDPOINTS>(&i.daddr)?.map(|e| e.ifindex),
            None => None,
        },
        Reason::TunnelReply => {
            let key = keys.l4.map(|k| swapped(&k)).or(keys.quote);
            after
                .returns
                .iter()
                .find(|(k, _)| Some(*k) == key)
                .map(|(_, r)| r.ifindex)
        }
        // Back out of the interface the packet came in on: the client's (the flow's entry
        // names it) or, for a pod's reply on the owning node, the pod's veth.
        Reason::IcmpTooBig | Reason::IcmpTimeExceeded => match &keys.l4 {
            Some(k) => match flow(k.saddr, k.sport, k.proto) {
                Some(ct) => Some(ct.ifindex),
                None => maps.lookup::<LOCAL_ENDPOINTS>(&k.saddr)?.map(|e| e.ifindex),
            },
            None => None,
        },
        Reason::ReplyPeer => after
            .peers
            .iter()
            .find(|(a, _)| *a == keys.daddr)
            .map(|(_, p)| p.ifindex),
        _ => None,
    })
}

/// The name of a program's return value.
pub fn action_name(hook: Hook, verdict: u32) -> &'static str {
    match (hook, verdict) {
        (Hook::Ingress, 0) => "XDP_ABORTED",
        (Hook::Ingress, 1) => "XDP_DROP",
        (Hook::Ingress, 2) => "XDP_PASS",
        (Hook::Ingress, 3) => "XDP_TX",
        (Hook::Ingress, 4) => "XDP_REDIRECT",
        (Hook::Reply, 0) => "TC_ACT_OK",
        (Hook::Reply, 2) => "TC_ACT_SHOT",
        (Hook::Reply, 7) => "TC_ACT_REDIRECT",
        (Hook::Reply, u32::MAX) => "TC_ACT_UNSPEC",
        _ => "unknown",
    }
}
