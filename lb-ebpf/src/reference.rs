//! Benchmark references, never attached: what the map operations the pipeline cannot avoid
//! cost through BPF_PROG_TEST_RUN on this machine. `cargo xtask bench xdp` runs them next to
//! the real cases, so its report shows how much of a case is the kernel's map code and how
//! much is the program's own logic. `lb_bench_harness` lets it repeat the cases whose output
//! is not their input.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    bench::{BenchInput, BENCH_PACKET_LEN, BENCH_PIPELINE},
    CtEntry,
};

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

/// The benchmark harness's input (see `lb_common::bench`). Not in the map catalogue: only
/// the bench loads `lb_bench_harness` and writes this; the data plane never reads it.
#[map]
static BENCH_INPUT: Array<BenchInput> = Array::with_max_entries(1, 0);

/// Puts `BENCH_INPUT`'s packet back (length and bytes, a fresh flow if asked), then runs
/// `lb_ingress`'s code on it, or only returns XDP_PASS (the harness's own cost). Lets
/// BPF_PROG_TEST_RUN repeat a case whose output differs from its input (encapsulation,
/// decapsulation, new flows) with every repeat on the same path. XDP_ABORTED: no input, or
/// the buffer could not be restored.
#[xdp]
pub fn lb_bench_harness(ctx: XdpContext) -> u32 {
    match restore(&ctx) {
        Some(BENCH_PIPELINE) => crate::ingress(&ctx),
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn restore(ctx: &XdpContext) -> Option<u32> {
    let input = BENCH_INPUT.get_ptr_mut(0)?;
    // adjust_head never moves data_end: the packet is back at its first length when data
    // is BENCH_PACKET_LEN before it.
    let delta = (ctx.data_end() - ctx.data()) as i32 - BENCH_PACKET_LEN as i32;
    if delta != 0 && unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, delta) } != 0 {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + BENCH_PACKET_LEN > end {
        return None;
    }
    let input = unsafe { &mut *input };
    // Eight bytes at a time: the test run's buffer starts 8-aligned, and so does `packet`.
    let src = input.packet.as_ptr() as *const u64;
    let dst = data as *mut u64;
    for i in 0..BENCH_PACKET_LEN / 8 {
        unsafe { *dst.add(i) = *src.add(i) };
    }
    if input.vary != 0 {
        let c = input.counter;
        input.counter = c + 1;
        // The verifier needs each variable offset bounded and checked against data_end on
        // its own pointer.
        let addr = data + (input.addr_off as usize & 0x3f);
        if addr + 4 > end {
            return None;
        }
        // The template's first octet stays: the source keeps its network.
        unsafe {
            *((addr + 1) as *mut u8) = (c >> 16) as u8;
            *((addr + 2) as *mut u8) = (c >> 8) as u8;
            *((addr + 3) as *mut u8) = c as u8;
        }
        let port = ctx.data() + (input.port_off as usize & 0x3f);
        if port + 2 > ctx.data_end() {
            return None;
        }
        let flow_port = 1024 + ((c >> 24) & 0x7fff) as u16;
        unsafe {
            *(port as *mut u8) = (flow_port >> 8) as u8;
            *((port + 1) as *mut u8) = flow_port as u8;
        }
    }
    Some(input.mode)
}
