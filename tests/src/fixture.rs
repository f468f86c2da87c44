//! A small, fixed world for BPF_PROG_TEST_RUN fixtures and the XDP benchmark: one node with
//! two addresses, a client, local and remote pods, and services written straight into the
//! maps (the reconcile path has its own tests; these exercise the program).
//!
//! BPF_PROG_TEST_RUN runs the XDP program as if the packet arrived on `lo` (ifindex 1), so
//! the "NIC" here is ifindex 1: replies and remote forwards are redirected to it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use lb_common::{
    ip4, port_be, v4, Backend, Config, Frontend, FrontendKey, BE_ACTIVE, BE_LOCAL, BE_TERMINATING,
    BE_TUNNEL, CFG_DEC_TTL, CFG_TUNNEL, PROTO_TCP, PROTO_UDP,
};
use lb_user::{
    bpf::dataplane::{Dataplane, DataplaneError, DataplaneOptions},
    control::maglev::{self, MaglevBackend},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The MAC of a router on the node's network (the source of ICMP errors from the path).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x64];
pub const NIC_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 0x0a];
pub const NODE1_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 0x0b];
pub const VETH_A_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 1, 0x0a];
pub const POD_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 1, 0x0a];
pub const VETH_B_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 1, 0x0b];
pub const POD_B_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 1, 0x0b];

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
pub const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
/// A second address of the same node: NodePort answers on it too.
pub const NODE_ALT: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 10);
pub const NODE1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
/// Node 1's SNAT address, a peer in [`world`]: its forwarded requests to local pods bypass
/// netfilter here.
pub const PEER_SNAT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 151);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 10);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);
pub const POD_R: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 10);
/// A pod on node 1 reached through the tunnel (node 1's tunnel address is [`NODE1`]).
pub const POD_T: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 10);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 2);

/// Ifindex of the "NIC" as seen by BPF_PROG_TEST_RUN (loopback).
pub const NIC_IFINDEX: u32 = 1;
pub const VETH_A_IFINDEX: u32 = 1001;
pub const VETH_B_IFINDEX: u32 = 1002;

/// The FOU port of the fixture's nodes and the largest packet their tunnel path carries.
pub const TUNNEL_PORT: u16 = 5555;
pub const TUNNEL_MTU: u16 = 1500;

pub const SNAT_PORT_MIN: u16 = 61000;
pub const SNAT_PORT_MAX: u16 = 61999;

/// Fixture services: (service slot, what it is).
pub const SVC_NODEPORT_TCP: u32 = 0; // NodePort 30080/TCP -> POD_A:8080
pub const SVC_NODEPORT_UDP: u32 = 1; // NodePort 30080/UDP -> POD_B:5353
pub const SVC_LB: u32 = 2; // LB_IP:80/TCP -> POD_A:8080
pub const SVC_EXTERNAL_IP: u32 = 3; // EXT_IP:443/TCP -> POD_B:8443
pub const SVC_REMOTE: u32 = 4; // NodePort 30081/TCP -> POD_R:8080 on node 1 (SNAT)
pub const SVC_EMPTY: u32 = 5; // NodePort 30082/TCP, no endpoints
pub const SVC_MULTI: u32 = 6; // NodePort 30090/TCP -> POD_A, POD_B, POD_R (all local ids)
pub const SVC_AFFINITY: u32 = 7; // NodePort 30091/TCP, ClientIP affinity 60 s -> POD_A, POD_B
pub const SVC_TUNNEL: u32 = 8; // NodePort 30083/TCP -> POD_T:8080 on node 1 (tunnel)
pub const SVC_TUNNEL_UDP: u32 = 9; // NodePort 30083/UDP -> POD_T:5353 on node 1 (tunnel)

/// Backend ids.
pub const BE_A_8080: u32 = 1;
pub const BE_B_5353: u32 = 2;
pub const BE_B_8443: u32 = 3;
pub const BE_R_8080: u32 = 4;
pub const BE_B_8080: u32 = 5;
pub const BE_A_9090: u32 = 6;
pub const BE_B_9090: u32 = 7;
pub const BE_R_9090: u32 = 8;
pub const BE_T_8080: u32 = 9;
pub const BE_T_5353: u32 = 10;

pub const FIXTURE_MAGLEV_SIZE: u32 = lb_common::DEFAULT_MAGLEV_SIZE;

pub fn addr(ip: Ipv4Addr) -> [u32; 4] {
    v4(ip.octets())
}

pub fn local_backend(
    ip: Ipv4Addr,
    port: u16,
    ifindex: u32,
    veth_mac: [u8; 6],
    pod_mac: [u8; 6],
) -> Backend {
    Backend {
        addr: addr(ip),
        port: port_be(port),
        flags: BE_ACTIVE | BE_LOCAL,
        ifindex,
        dmac: pod_mac,
        smac: veth_mac,
        ..Default::default()
    }
}

pub fn remote_backend(ip: Ipv4Addr, port: u16) -> Backend {
    Backend {
        addr: addr(ip),
        port: port_be(port),
        flags: BE_ACTIVE,
        ifindex: NIC_IFINDEX,
        dmac: NODE1_MAC,
        smac: NIC_MAC,
        ..Default::default()
    }
}

/// A pod on node 1 reached through the tunnel to node 1's tunnel address.
pub fn tunnel_backend(ip: Ipv4Addr, port: u16) -> Backend {
    Backend {
        flags: BE_ACTIVE | BE_TUNNEL,
        node_addr: addr(NODE1)[0],
        ..remote_backend(ip, port)
    }
}

pub fn frontend_key(ip: Option<Ipv4Addr>, port: u16, proto: u8) -> FrontendKey {
    FrontendKey {
        addr: ip.map(|ip| ip4(ip.octets())).unwrap_or(0),
        port: port_be(port),
        proto,
        _pad: 0,
    }
}

/// Builds the Maglev ring over the backends that take new flows and writes the backends,
/// the ring and the frontends (in make-before-break order).
pub fn install_service(
    dp: &mut Dataplane,
    service_id: u32,
    frontends: &[FrontendKey],
    backends: &[(u32, Backend)],
    flags: u32,
    affinity_timeout_s: u32,
) -> Result<Vec<u32>, DataplaneError> {
    for (id, be) in backends {
        dp.set_backend(*id, be)?;
    }
    let ring = ring_for(backends, dp.options().maglev_size);
    dp.write_full_ring(service_id, &ring)?;
    let fe = Frontend {
        service_id,
        backend_count: backends
            .iter()
            .filter(|(_, b)| b.flags & BE_TERMINATING == 0)
            .count() as u32,
        flags,
        affinity_timeout_s,
    };
    for key in frontends {
        dp.set_frontend(key, &fe)?;
    }
    Ok(ring)
}

/// The Maglev table for the non-terminating backends.
pub fn ring_for(backends: &[(u32, Backend)], m: u32) -> Vec<u32> {
    let mb: Vec<MaglevBackend> = backends
        .iter()
        .filter(|(_, b)| b.flags & BE_TERMINATING == 0)
        .map(|(id, b)| MaglevBackend {
            id: *id,
            key: maglev::backend_key(b.addr, b.port),
        })
        .collect();
    maglev::build(&mb, m).expect("fixture ring")
}

pub fn node_config() -> Config {
    Config {
        node_addrs: [addr(NODE)[0], addr(NODE_ALT)[0], 0, 0],
        snat_addr: addr(NODE)[0],
        maglev_size: FIXTURE_MAGLEV_SIZE,
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        flags: CFG_DEC_TTL | CFG_TUNNEL,
        snat_idle_s: 300,
        close_grace_s: 10,
        frontend_epoch: 0,
        tunnel_addr: addr(NODE)[0],
        tunnel_port: port_be(TUNNEL_PORT),
        tunnel_mtu: TUNNEL_MTU,
    }
}

/// A freshly loaded data plane holding the fixture services.
pub fn world() -> Dataplane {
    world_in(None)
}

/// [`world`], its maps pinned in `pin_dir` (see [`TestPins`]) so `explain` and the operator
/// CLI can read them.
pub fn world_in(pin_dir: Option<PathBuf>) -> Dataplane {
    let mut dp = Dataplane::load(DataplaneOptions {
        max_services: 16,
        maglev_size: FIXTURE_MAGLEV_SIZE,
        max_backends: 64,
        max_frontends: 64,
        ct_entries: 4096,
        affinity_entries: 1024,
        pin_dir,
    })
    .expect("load the BPF object (run as root; `cargo xtask test` does)");
    dp.set_config(&node_config()).unwrap();
    // Node 1 by its SNAT address (SNAT mode) and by its tunnel address.
    dp.set_peers(&[
        (PEER_SNAT, lb_common::PEER_SNAT),
        (NODE1, lb_common::PEER_TUNNEL),
    ])
    .unwrap();

    let a8080 = local_backend(POD_A, 8080, VETH_A_IFINDEX, VETH_A_MAC, POD_A_MAC);
    let b8080 = local_backend(POD_B, 8080, VETH_B_IFINDEX, VETH_B_MAC, POD_B_MAC);
    let b5353 = local_backend(POD_B, 5353, VETH_B_IFINDEX, VETH_B_MAC, POD_B_MAC);
    let b8443 = local_backend(POD_B, 8443, VETH_B_IFINDEX, VETH_B_MAC, POD_B_MAC);
    let r8080 = remote_backend(POD_R, 8080);
    let a9090 = local_backend(POD_A, 9090, VETH_A_IFINDEX, VETH_A_MAC, POD_A_MAC);
    let b9090 = local_backend(POD_B, 9090, VETH_B_IFINDEX, VETH_B_MAC, POD_B_MAC);
    let r9090 = local_backend(POD_R, 9090, VETH_B_IFINDEX, VETH_B_MAC, POD_B_MAC);

    let tcp = PROTO_TCP;
    let udp = PROTO_UDP;
    install_service(
        &mut dp,
        SVC_NODEPORT_TCP,
        &[frontend_key(None, 30080, tcp)],
        &[(BE_A_8080, a8080)],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_NODEPORT_UDP,
        &[frontend_key(None, 30080, udp)],
        &[(BE_B_5353, b5353)],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_LB,
        &[frontend_key(Some(LB_IP), 80, tcp)],
        &[(BE_A_8080, a8080)],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_EXTERNAL_IP,
        &[frontend_key(Some(EXT_IP), 443, tcp)],
        &[(BE_B_8443, b8443)],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_REMOTE,
        &[frontend_key(None, 30081, tcp)],
        &[(BE_R_8080, r8080)],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_EMPTY,
        &[frontend_key(None, 30082, tcp)],
        &[],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_MULTI,
        &[frontend_key(None, 30090, tcp)],
        &[(BE_A_9090, a9090), (BE_B_9090, b9090), (BE_R_9090, r9090)],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_AFFINITY,
        &[frontend_key(None, 30091, tcp)],
        &[(BE_A_8080, a8080), (BE_B_8080, b8080)],
        lb_common::FE_AFFINITY,
        60,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_TUNNEL,
        &[frontend_key(None, 30083, tcp)],
        &[(BE_T_8080, tunnel_backend(POD_T, 8080))],
        0,
        0,
    )
    .unwrap();
    install_service(
        &mut dp,
        SVC_TUNNEL_UDP,
        &[frontend_key(None, 30083, udp)],
        &[(BE_T_5353, tunnel_backend(POD_T, 5353))],
        0,
        0,
    )
    .unwrap();
    dp
}

/// A pin directory of this test process on bpffs, removed (with every map pinned in it) on
/// drop, also when the test fails.
pub struct TestPins {
    dir: PathBuf,
}

impl TestPins {
    /// A fresh directory `/sys/fs/bpf/lbx-test-<pid>-<n>-<name>` (bpffs is mounted there if
    /// it is not yet).
    pub fn new(name: &str) -> TestPins {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(lb_user::bpf::bpffs::MOUNTPOINT)
            .join(format!("lbx-test-{}-{n}-{name}", std::process::id()));
        lb_user::bpf::bpffs::ensure(&dir).expect("bpffs at /sys/fs/bpf");
        let _ = lb_user::bpf::pins::remove_all(&dir);
        TestPins { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(errors) = lb_user::bpf::pins::remove_all(&self.dir) {
            eprintln!("TestPins: {}", errors.join("; "));
        }
    }
}

/// Everything a data plane's maps hold (the MAGLEV rings aside), to show that something
/// left them as they were.
#[derive(Debug, PartialEq)]
pub struct LiveState {
    config: Config,
    frontends: HashMap<FrontendKey, Frontend>,
    backends: Vec<Backend>,
    local_endpoints: HashMap<u32, lb_common::LocalEndpoint>,
    peers: HashMap<u32, lb_common::PeerNode>,
    conntrack: HashMap<lb_common::FlowKey, lb_common::CtEntry>,
    returns: HashMap<lb_common::CtKey, lb_common::ReturnEntry>,
    revnat: HashMap<lb_common::CtKey, lb_common::RevNatEntry>,
    affinity: HashMap<lb_common::AffinityKey, lb_common::AffinityEntry>,
    stats: Vec<(lb_common::Reason, u64)>,
}

impl LiveState {
    pub fn of(dp: &Dataplane) -> LiveState {
        let max_backends = dp.options().max_backends;
        LiveState {
            config: dp.config().unwrap(),
            frontends: dp.frontends().unwrap().into_iter().collect(),
            backends: (0..max_backends)
                .map(|id| dp.backend(id).unwrap())
                .collect(),
            local_endpoints: dp.local_endpoints().unwrap().into_iter().collect(),
            peers: dp.peers().unwrap().into_iter().collect(),
            conntrack: dp.conntrack().unwrap().into_iter().collect(),
            returns: dp.returns().unwrap().into_iter().collect(),
            revnat: dp.revnat().unwrap().into_iter().collect(),
            affinity: dp
                .maps()
                .entries::<lb_common::maps::AFFINITY>()
                .unwrap()
                .into_iter()
                .collect(),
            stats: dp.stats().unwrap(),
        }
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
