//! The benchmark harness's input (`lb-ebpf/src/reference.rs`, `lb_bench_harness`): never
//! read by an attached program. BPF_PROG_TEST_RUN reruns a program on the buffer the last
//! repeat left, so a case whose output is not its input (encapsulation, decapsulation, a
//! new flow) needs the packet put back on every repeat; the harness does that from here.

/// Bytes of every harness packet (the bench pads its packets to exactly this).
pub const BENCH_PACKET_LEN: usize = 96;

/// `BenchInput::mode`: restore the packet and return XDP_PASS (the harness's own cost).
pub const BENCH_RESTORE_ONLY: u32 = 0;
/// `BenchInput::mode`: restore the packet, then run the request pipeline on it.
pub const BENCH_PIPELINE: u32 = 1;

/// Value of the harness's one-entry array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchInput {
    /// [`BENCH_RESTORE_ONLY`] or [`BENCH_PIPELINE`].
    pub mode: u32,
    /// Non-zero: every repeat is a new flow. The harness writes a fresh IPv4 source address
    /// (the template's first octet, then the counter's low 24 bits) at `addr_off` and a port
    /// (1024 + the counter's next bits) at `port_off`. Checksums are not refreshed (no
    /// path of the pipeline verifies them; its incremental updates stay consistent).
    pub vary: u32,
    /// Offset of the IPv4 source address to vary (the inner one for a tunnelled packet);
    /// below 64, as the port's.
    pub addr_off: u32,
    /// Offset of the source port to vary.
    pub port_off: u32,
    /// Flows made so far (written by the harness: it keeps counting across runs, so a
    /// flow stays new unless the bench flushes the tables).
    pub counter: u64,
    pub packet: [u8; BENCH_PACKET_LEN],
}
const _: () = assert!(core::mem::size_of::<BenchInput>() == 24 + BENCH_PACKET_LEN);
const _: () = assert!(BENCH_PACKET_LEN % 8 == 0);

impl Default for BenchInput {
    fn default() -> Self {
        BenchInput {
            mode: BENCH_RESTORE_ONLY,
            vary: 0,
            addr_off: 0,
            port_off: 0,
            counter: 0,
            packet: [0; BENCH_PACKET_LEN],
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for BenchInput {}
