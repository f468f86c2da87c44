//! Why a packet got its verdict: the index into the per-CPU `STATS` array. Every packet
//! the programs see increments exactly one reason, so the counters add up to the traffic.

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident = $val:literal, $label:literal;)*) => {
        /// One per outcome. `XDP_PASS`/`TC_ACT_OK` outcomes leave the packet to the kernel.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason { $($(#[doc = $doc])* $name = $val,)* }

        impl Reason {
            /// Every reason, in index order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];
            /// Stable snake_case name (CLI, JSON, metrics).
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$name => $label,)* }
            }
            /// What the reason means: its doc comment (each line starts with a space).
            pub const fn describe(self) -> &'static str {
                match self { $(Reason::$name => concat!($($doc),*),)* }
            }
        }
    };
}

reasons! {
    /// Request DNATed to a backend on this node and redirected into its veth.
    FwdLocal = 0, "fwd_local";
    /// Request SNATed+DNATed and sent to the node that owns the backend.
    FwdRemote = 1, "fwd_remote";
    /// Reply from a local backend reverse-NATed (TC) and redirected out of the NIC.
    RevNatLocal = 2, "rev_nat_local";
    /// Reply to a SNATed flow reverse-NATed (XDP) and sent back to the client.
    RevNatRemote = 3, "rev_nat_remote";
    /// Not IPv4 (ARP, IPv6, ...): passed.
    PassNotIpv4 = 4, "pass_not_ipv4";
    /// Shorter than an Ethernet header.
    PassTruncEth = 5, "pass_trunc_eth";
    /// 802.1Q tag cut short.
    PassTruncVlan = 6, "pass_trunc_vlan";
    /// Shorter than an IPv4 header.
    PassTruncIp = 7, "pass_trunc_ip";
    /// IPv4 header with options (IHL > 5) or IHL < 5 / version != 4.
    PassIpOptions = 8, "pass_ip_options";
    /// IPv4 fragment (MF set or offset != 0).
    PassFragment = 9, "pass_fragment";
    /// TTL <= 1: the kernel sends time-exceeded.
    PassTtl = 10, "pass_ttl";
    /// IPv4 total length disagrees with the frame.
    PassBadLen = 11, "pass_bad_len";
    /// Neither TCP nor UDP.
    PassUnknownProto = 12, "pass_unknown_proto";
    /// TCP/UDP header cut short.
    PassTruncL4 = 13, "pass_trunc_l4";
    /// No frontend for this address/port/protocol.
    PassNonService = 14, "pass_non_service";
    /// Frontend has no backend that takes new flows.
    PassNoBackend = 15, "pass_no_backend";
    /// The ring pointed at an empty backend slot (maps being rewritten).
    PassBackendMissing = 16, "pass_backend_missing";
    /// No free SNAT port for a remote backend: passed to the kernel (kube-proxy).
    PassSnatExhausted = 17, "pass_snat_exhausted";
    /// Connection tracking insert failed.
    PassCtFull = 18, "pass_ct_full";
    /// Packet on the pod side that is not a reply to an accelerated flow.
    PassNotReply = 19, "pass_not_reply";
    /// bpf_redirect() refused the target interface.
    DropRedirectFailed = 20, "drop_redirect_failed";
    /// Program error (map missing, bounds): packet passed; a bug if it ever counts.
    PassInternal = 21, "pass_internal";
    /// Request another node's lbx SNATed to a pod on this node: redirected straight into
    /// the pod's veth (no netfilter, no NAT here).
    FwdPeer = 22, "fwd_peer";
    /// A local pod's reply to a peer node's SNAT address: redirected straight out of the
    /// interface the peer's requests came in on (TC).
    ReplyPeer = 23, "reply_peer";
    /// TCP packet without SYN (or with SYN+ACK) for a service, and no flow entry: the
    /// connection is the kernel's (its SYN was passed, or it predates lbx). lbx starts TCP
    /// flows that have no entry only at a SYN.
    PassMidStream = 24, "pass_mid_stream";
    /// Request DNATed and encapsulated to the node that owns its backend (client address
    /// kept).
    FwdTunnel = 25, "fwd_tunnel";
    /// A tunnelled request from a peer node, decapsulated and redirected into the pod's veth.
    TunnelIn = 26, "tunnel_in";
    /// A local pod's reply to a tunnelled flow, encapsulated back to the node that holds the
    /// flow (TC).
    TunnelReply = 27, "tunnel_reply";
    /// A reply that came back through the tunnel, decapsulated, reverse-NATed and sent to the
    /// client.
    RevNatTunnel = 28, "rev_nat_tunnel";
    /// An encapsulated packet from an address that is not a known peer node: passed.
    PassTunnelPeer = 29, "pass_tunnel_peer";
    /// An encapsulated packet whose inner packet lbx does not deliver (not to a local pod,
    /// not a reply of a flow held here, malformed, a fragment, IP options): passed.
    PassTunnelInner = 30, "pass_tunnel_inner";
    /// A request too large for the tunnel with DF set: answered with ICMP
    /// fragmentation-needed carrying the tunnel's MTU (the sender retries smaller).
    IcmpTooBig = 31, "icmp_too_big";
    /// A request too large for the tunnel without DF: passed (lbx does not fragment).
    PassTooBig = 32, "pass_too_big";
    /// An ICMP error from a backend about a NATed flow (port unreachable, fragmentation
    /// needed, TTL exceeded), translated back to the client.
    IcmpRevNat = 33, "icmp_rev_nat";
    /// An ICMP error from the path about a reply of a NATed flow, translated and delivered
    /// to its pod.
    IcmpToBackend = 34, "icmp_to_backend";
    /// A new flow whose client address and port a live flow of this node to another
    /// frontend holds: passed to the kernel.
    PassFlowCollision = 35, "pass_flow_collision";
    /// A request of a tunnelled flow that arrived with TTL 2: it would run out on the owning
    /// node, so it is answered here with ICMP time-exceeded (from this node's address) and
    /// not sent.
    IcmpTimeExceeded = 36, "icmp_time_exceeded";
}

/// Size of the `STATS` array.
pub const NUM_REASONS: u32 = 64;
const _: () = assert!((Reason::ALL.len() as u32) <= NUM_REASONS);
