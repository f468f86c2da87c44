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
    maps::{AFFINITY, BACKENDS, CONFIG, CONNTRACK, FRONTENDS, LOCAL_ENDPOINTS, PEERS, REVNAT},
    AffinityKey, Backend, CtEntry, CtKey, FrontendKey, Reason, RevNatEntry, CT_SNAT,
};
use serde::Serialize;

use crate::bpf::{
    dataplane::stats,
    maps::Maps,
    sandbox::{Hook, Sandbox},
};

use super::{
    describe::Describe,
    packet::Decoded,
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
    let mut sandbox = Sandbox::open(live)?;
    let key = Decoded::key(frame);
    let mut read = Vec::new();
    if let Some(key) = &key {
        seed(&maps, &mut sandbox, hook, key, &mut read)?;
    }
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
        Some(r) => out_interface(&maps, &after, r, key.as_ref())?,
        None => None,
    };
    Ok(Explanation {
        program: match hook {
            Hook::Ingress => "lb_ingress (XDP, node NIC)",
            Hook::Reply => "lb_reply (TC ingress, pod veth)",
        },
        input: Decoded::decode(frame),
        verdict,
        action: action_name(hook, verdict),
        reason,
        reason_text: reason.map_or(
            " no reason counter moved by exactly one: a program bug",
            Reason::describe,
        ),
        rewritten: (output != frame).then(|| Decoded::decode(&output)),
        output,
        out_ifindex,
        read,
        created,
        changed,
        removed,
    })
}

/// Copies the live entries that matter for `key` into the sandbox (see the module docs) and
/// lists what the packet's path reads.
fn seed(
    maps: &Maps,
    sandbox: &mut Sandbox,
    hook: Hook,
    key: &CtKey,
    read: &mut Vec<Entry>,
) -> Result<(), InspectError> {
    let cfg = maps.element::<CONFIG>(0)?.unwrap_or_default();
    read.push(entry::<CONFIG>(&0, &cfg));
    let mut copy = Copier {
        maps,
        sandbox,
        read,
    };

    // A reply (to a SNATed flow on the NIC, or from a local pod): its reverse-NAT entry, and
    // the client's conntrack entry a FIN or RST marks closing.
    if let Some(rev) = copy.one::<REVNAT>(key)? {
        copy.one::<CONNTRACK>(&client_key(&rev, key.proto))?;
    }
    copy.one::<PEERS>(&key.daddr)?;
    if hook == Hook::Reply {
        return Ok(());
    }
    copy.one::<PEERS>(&key.saddr)?;
    copy.shared::<LOCAL_ENDPOINTS>(&key.daddr)?;

    // An established flow: its entry, its backend, and the reverse-NAT entry of its replies.
    if let Some(ct) = copy.one::<CONNTRACK>(key)? {
        if let Some(be) = copy.backend(ct.backend_id)? {
            let rkey = if ct.flags & CT_SNAT != 0 {
                reply_key(&be, cfg.snat_addr, ct.snat_port, key.proto)
            } else {
                reply_key(&be, key.saddr, key.sport, key.proto)
            };
            copy.one::<REVNAT>(&rkey)?;
        }
    }

    // The services the destination may match: affinity of this client, and for a new flow
    // the state at each backend of their rings.
    let mut services = BTreeSet::new();
    for addr in [0, key.daddr] {
        let fkey = FrontendKey {
            addr,
            port: key.dport,
            proto: key.proto,
            _pad: 0,
        };
        if let Some(fe) = copy.shared::<FRONTENDS>(&fkey)? {
            services.insert(fe.service_id);
        }
    }
    let mut backends = BTreeSet::new();
    for &service_id in &services {
        let akey = AffinityKey {
            client: key.saddr,
            service_id,
        };
        copy.one::<AFFINITY>(&akey)?;
        backends.extend(
            maps.ring(service_id, cfg.maglev_size)?
                .into_iter()
                .filter(|&id| id != 0),
        );
    }
    let mut ends = Vec::new();
    for id in backends {
        if let Some(be) = maps.element::<BACKENDS>(id)? {
            copy.one::<REVNAT>(&reply_key(&be, key.saddr, key.sport, key.proto))?;
            ends.push((be.addr[0], be.port));
        }
    }
    if cfg.snat_addr != 0 && !ends.is_empty() {
        for (k, v) in maps.entries::<REVNAT>()? {
            if k.daddr == cfg.snat_addr
                && k.proto == key.proto
                && ends.contains(&(k.saddr, k.sport))
            {
                copy.sandbox.seed::<REVNAT>(&k, &v)?;
            }
        }
    }
    Ok(())
}

/// Copies live entries into the sandbox and notes what was read.
struct Copier<'a> {
    maps: &'a Maps,
    sandbox: &'a mut Sandbox,
    read: &'a mut Vec<Entry>,
}

impl Copier<'_> {
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
            self.read.push(entry::<M>(key, v));
        }
        Ok(found)
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
            self.read.push(entry::<M>(key, v));
        }
        Ok(found)
    }

    fn backend(&mut self, id: u32) -> Result<Option<Backend>, InspectError> {
        let be = self.maps.element::<BACKENDS>(id)?;
        if let Some(b) = &be {
            self.read.push(entry::<BACKENDS>(&id, b));
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

/// The client's conntrack key of the flow a reverse-NAT entry belongs to.
fn client_key(rev: &RevNatEntry, proto: u8) -> CtKey {
    CtKey {
        saddr: rev.client_addr,
        daddr: rev.frontend_addr,
        sport: rev.client_port,
        dport: rev.frontend_port,
        proto,
        ..Default::default()
    }
}

/// The private maps' contents, before or after the run.
struct State {
    conntrack: Vec<(CtKey, CtEntry)>,
    revnat: Vec<(CtKey, RevNatEntry)>,
    affinity: Vec<(AffinityKey, lb_common::AffinityEntry)>,
    peers: Vec<(u32, lb_common::PeerNode)>,
    stats: Vec<(Reason, u64)>,
}

impl State {
    fn of(maps: &Maps) -> Result<Self, InspectError> {
        Ok(State {
            conntrack: maps.entries::<CONNTRACK>()?,
            revnat: maps.entries::<REVNAT>()?,
            affinity: maps.entries::<AFFINITY>()?,
            peers: maps.entries::<PEERS>()?,
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
    key: Option<&CtKey>,
) -> Result<Option<u32>, InspectError> {
    let Some(key) = key else { return Ok(None) };
    Ok(match reason {
        Reason::FwdLocal | Reason::FwdRemote => {
            let ct = after.conntrack.iter().find(|(k, _)| k == key);
            match ct {
                Some((_, ct)) => maps.element::<BACKENDS>(ct.backend_id)?.map(|b| b.ifindex),
                None => None,
            }
        }
        Reason::RevNatRemote | Reason::RevNatLocal => after
            .revnat
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, r)| r.ifindex),
        Reason::FwdPeer => maps
            .lookup::<LOCAL_ENDPOINTS>(&key.daddr)?
            .map(|e| e.ifindex),
        Reason::ReplyPeer => after
            .peers
            .iter()
            .find(|(a, _)| *a == key.daddr)
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
