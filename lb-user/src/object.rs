//! The BPF object this binary was built with (see build.rs): embedding it means the agent
//! never loads programs that disagree with its own map types.

/// ELF object holding the XDP and TC programs and their maps, aligned for aya's parser.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));
