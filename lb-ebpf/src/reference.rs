//! Benchmark references, never attached: what the map operations the pipeline cannot avoid
//! cost through BPF_PROG_TEST_RUN on this machine. `cargo xtask bench xdp` runs them next to
//! the real cases, so its report shows how much of a case is the kernel's map code and how
//! much is the program's own logic.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_get_prandom_u32, macros::xdp, programs::XdpContext};
use lb_common::CtEntry;

use crate::{lb, maps::CONNTRACK, parse::parse};

/// `parse` and one `CONNTRACK` lookup of the packet's 5-tuple, then XDP_PASS: the part of
/// `ct_hit` that is header parsing and the LRU hash lookup.
#[xdp]
pub fn lb_ref_ct_lookup(ctx: XdpContext) -> u32 {
    if let Ok(p) = parse(&ctx) {
        if CONNTRACK.get_ptr_mut(&lb::request_key(&p)).is_some() {
            return xdp_action::XDP_PASS;
        }
    }
    xdp_action::XDP_DROP
}

/// One `CONNTRACK` insert of a fresh key (random client address), then XDP_PASS: the one
/// LRU insert `ct_create` makes for every new flow (local or tunnelled).
#[xdp]
pub fn lb_ref_ct_insert(_ctx: XdpContext) -> u32 {
    let key = lb_common::FlowKey {
        client: unsafe { bpf_get_prandom_u32() },
        client_port: 1,
        proto: lb_common::PROTO_TCP,
        _pad: 0,
    };
    match CONNTRACK.insert(&key, &CtEntry::default(), 0) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_DROP,
    }
}
