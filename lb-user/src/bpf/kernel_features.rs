//! What lbx needs from the kernel, probed before anything is loaded, so an agent on a kernel
//! without it refuses to start with the missing feature named, instead of failing halfway
//! through a load with a verifier or syscall error.
//!
//! Needed (each entry of [`REQUIRED`] says since which Linux release and what for): program
//! types XDP and SCHED_CLS; map types ARRAY, HASH, LRU_HASH and PERCPU_ARRAY; the map flags
//! `BPF_F_NO_COMMON_LRU` (LRU hashes) and `BPF_F_MMAPABLE` (arrays, Linux 5.5: the newest
//! need); the helpers the object calls, per program type. How programs attach is not a
//! requirement: aya uses a bpf_link for XDP where the kernel has one (5.9+) and netlink
//! otherwise, TCX for TC on 6.6+ and a clsact qdisc otherwise; [`attach_methods`] reports
//! which. The oldest kernel the project tests is Debian 12's 6.1 (`cargo xtask test
//! --kernels`); a unit test keeps [`REQUIRED`] equal to what the embedded object uses.

use std::sync::OnceLock;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

/// The oldest kernel series the project proves (verifier, fixtures, data path) in CI.
pub const OLDEST_PROVEN: &str = "6.1";

/// How one feature is probed.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    Program(ProgramType),
    Map(MapType),
    /// Creating a map of this type with this flag (`BPF_F_*`) set.
    MapFlag {
        map: MapType,
        flag: u32,
    },
    Helper(ProgramType, BpfHelper),
}

/// One thing lbx needs.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// What the messages call it, as the kernel's UAPI names it.
    pub name: &'static str,
    /// The Linux release that introduced it.
    pub since: &'static str,
    /// What lbx uses it for.
    pub used_for: &'static str,
    pub check: Check,
}

const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

const fn helper(
    prog: ProgramType,
    helper: BpfHelper,
    name: &'static str,
    since: &'static str,
    used_for: &'static str,
) -> Feature {
    Feature {
        name,
        since,
        used_for,
        check: Check::Helper(prog, helper),
    }
}

use BpfHelper as H;
use ProgramType::{SchedClassifier as Tc, Xdp};

/// Everything lbx needs, in the order it is probed (program and map types before the
/// flags and helpers that depend on them).
pub const REQUIRED: &[Feature] = &[
    Feature {
        name: "program type BPF_PROG_TYPE_XDP",
        since: "4.8",
        used_for: "lb_ingress on the node's NIC",
        check: Check::Program(Xdp),
    },
    Feature {
        name: "program type BPF_PROG_TYPE_SCHED_CLS",
        since: "4.1",
        used_for: "lb_reply at TC ingress of pod veths",
        check: Check::Program(Tc),
    },
    Feature {
        name: "map type BPF_MAP_TYPE_ARRAY",
        since: "3.19",
        used_for: "CONFIG, SERVICE_PORTS, BACKENDS, MAGLEV",
        check: Check::Map(MapType::Array),
    },
    Feature {
        name: "map type BPF_MAP_TYPE_HASH",
        since: "3.19",
        used_for: "FRONTENDS, LOCAL_ENDPOINTS, PEERS",
        check: Check::Map(MapType::Hash),
    },
    Feature {
        name: "map type BPF_MAP_TYPE_LRU_HASH",
        since: "4.10",
        used_for: "CONNTRACK, REVNAT, AFFINITY",
        check: Check::Map(MapType::LruHash),
    },
    Feature {
        name: "map type BPF_MAP_TYPE_PERCPU_ARRAY",
        since: "4.6",
        used_for: "STATS",
        check: Check::Map(MapType::PerCpuArray),
    },
    Feature {
        name: "map flag BPF_F_NO_COMMON_LRU on LRU hashes",
        since: "4.10",
        used_for: "per-CPU LRU lists of CONNTRACK, REVNAT, AFFINITY",
        check: Check::MapFlag {
            map: MapType::LruHash,
            flag: BPF_F_NO_COMMON_LRU,
        },
    },
    Feature {
        name: "map flag BPF_F_MMAPABLE on arrays",
        since: "5.5",
        used_for: "MAGLEV rings written through mmap",
        check: Check::MapFlag {
            map: MapType::Array,
            flag: BPF_F_MMAPABLE,
        },
    },
    helper(
        Xdp,
        H::BPF_FUNC_map_lookup_elem,
        "helper bpf_map_lookup_elem in XDP",
        "4.8",
        "every map read",
    ),
    helper(
        Xdp,
        H::BPF_FUNC_map_update_elem,
        "helper bpf_map_update_elem in XDP",
        "4.8",
        "new flows' conntrack and reverse-NAT entries",
    ),
    helper(
        Xdp,
        H::BPF_FUNC_ktime_get_ns,
        "helper bpf_ktime_get_ns in XDP",
        "4.8",
        "flow ageing and sessionAffinity timeouts",
    ),
    helper(
        Xdp,
        H::BPF_FUNC_get_prandom_u32,
        "helper bpf_get_prandom_u32 in XDP",
        "4.8",
        "SNAT port probing",
    ),
    helper(
        Xdp,
        H::BPF_FUNC_redirect,
        "helper bpf_redirect in XDP",
        "4.14",
        "delivery into pod veths and out of the NIC",
    ),
    helper(
        Xdp,
        H::BPF_FUNC_xdp_adjust_head,
        "helper bpf_xdp_adjust_head in XDP",
        "4.10",
        "tunnel encapsulation and decapsulation, ICMP fragmentation-needed replies",
    ),
    helper(
        Xdp,
        H::BPF_FUNC_xdp_adjust_tail,
        "helper bpf_xdp_adjust_tail in XDP",
        "4.18",
        "ICMP fragmentation-needed replies (the quote is cut to its limit)",
    ),
    helper(
        Tc,
        H::BPF_FUNC_map_lookup_elem,
        "helper bpf_map_lookup_elem in TC",
        "4.1",
        "reverse-NAT lookups",
    ),
    helper(
        Tc,
        H::BPF_FUNC_skb_load_bytes,
        "helper bpf_skb_load_bytes in TC",
        "4.5",
        "protocol bytes and MAC addresses of pod replies",
    ),
    helper(
        Tc,
        H::BPF_FUNC_ktime_get_ns,
        "helper bpf_ktime_get_ns in TC",
        "4.1",
        "flow ageing",
    ),
    helper(
        Tc,
        H::BPF_FUNC_skb_store_bytes,
        "helper bpf_skb_store_bytes in TC",
        "4.1",
        "reply header rewrites",
    ),
    helper(
        Tc,
        H::BPF_FUNC_l3_csum_replace,
        "helper bpf_l3_csum_replace in TC",
        "4.1",
        "IPv4 checksums of replies",
    ),
    helper(
        Tc,
        H::BPF_FUNC_l4_csum_replace,
        "helper bpf_l4_csum_replace in TC",
        "4.1",
        "TCP/UDP checksums of replies",
    ),
    helper(
        Tc,
        H::BPF_FUNC_redirect,
        "helper bpf_redirect in TC",
        "4.4",
        "replies out of the NIC",
    ),
    helper(
        Tc,
        H::BPF_FUNC_skb_pull_data,
        "helper bpf_skb_pull_data in TC",
        "4.9",
        "linear headers of non-linear replies",
    ),
    helper(
        Tc,
        H::BPF_FUNC_skb_adjust_room,
        "helper bpf_skb_adjust_room (BPF_ADJ_ROOM_MAC) in TC",
        "5.2",
        "tunnelling replies back to the node that holds the flow, ICMP errors of pods",
    ),
    helper(
        Tc,
        H::BPF_FUNC_skb_change_tail,
        "helper bpf_skb_change_tail in TC",
        "4.9",
        "ICMP errors of pods (the quote is cut to its limit)",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum KernelFeaturesError {
    #[error(
        "this kernel ({kernel}) lacks BPF features lbx needs: {}. lbx is tested on Linux \
         {OLDEST_PROVEN} and newer (README, \"Kernels\"); upgrade the node's kernel",
        missing.iter().map(describe).collect::<Vec<_>>().join("; ")
    )]
    Missing {
        kernel: String,
        missing: Vec<&'static Feature>,
    },
    #[error(
        "probing the kernel for {} failed: {detail} (lbx needs root, or CAP_BPF, CAP_NET_ADMIN \
         and CAP_PERFMON)",
        feature.name
    )]
    Probe {
        feature: &'static Feature,
        detail: String,
    },
}

/// "map flag BPF_F_MMAPABLE on arrays (Linux 5.5+, for MAGLEV rings written through mmap)".
fn describe(f: &&'static Feature) -> String {
    format!("{} (Linux {}+, for {})", f.name, f.since, f.used_for)
}

/// One probed feature.
#[derive(Clone, Copy, Debug)]
pub struct Probed {
    pub feature: &'static Feature,
    pub present: bool,
}

/// Probes every feature of [`REQUIRED`] on the running kernel.
pub fn probe() -> Result<Vec<Probed>, KernelFeaturesError> {
    probe_with(&mut probe_one)
}

/// Refuses (naming every missing feature) unless the running kernel has all of
/// [`REQUIRED`]. Probed once per process.
pub fn require() -> Result<(), KernelFeaturesError> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    // Errors are not cached: a later call (say, after capabilities changed) probes again.
    if let Some(Ok(())) = PROBED.get() {
        return Ok(());
    }
    let result = require_with(&mut probe_one);
    if result.is_ok() {
        let _ = PROBED.set(Ok(()));
    }
    result
}

/// [`probe`] with another prober (tests).
fn probe_with(
    probe: &mut dyn FnMut(&Check) -> Result<bool, String>,
) -> Result<Vec<Probed>, KernelFeaturesError> {
    REQUIRED
        .iter()
        .map(|feature| {
            probe(&feature.check)
                .map(|present| Probed { feature, present })
                .map_err(|detail| KernelFeaturesError::Probe { feature, detail })
        })
        .collect()
}

/// [`require`] with another prober (tests).
fn require_with(
    probe: &mut dyn FnMut(&Check) -> Result<bool, String>,
) -> Result<(), KernelFeaturesError> {
    let missing: Vec<&'static Feature> = probe_with(probe)?
        .into_iter()
        .filter(|p| !p.present)
        .map(|p| p.feature)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelFeaturesError::Missing {
            kernel: kernel_release(),
            missing,
        })
    }
}

fn probe_one(check: &Check) -> Result<bool, String> {
    match *check {
        Check::Program(p) => is_program_supported(p).map_err(|e| e.to_string()),
        Check::Map(m) => is_map_supported(m).map_err(|e| e.to_string()),
        Check::MapFlag { map, flag } => map_with_flag(map, flag),
        Check::Helper(p, h) => is_helper_supported(p, h).map_err(|e| e.to_string()),
    }
}

/// Whether BPF_MAP_CREATE accepts a small map of `map` type with `flag`: EINVAL means the
/// kernel does not know the flag (or not for this type); other errors are probe failures.
fn map_with_flag(map: MapType, flag: u32) -> Result<bool, String> {
    // The head of `union bpf_attr` for BPF_MAP_CREATE; the kernel zero-fills the rest.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    let attr = MapCreate {
        map_type: map as u32,
        key_size: 4,
        value_size: 4,
        max_entries: 64,
        map_flags: flag,
    };
    // SAFETY: bpf(2) reads size_of::<MapCreate>() bytes of `attr`, which lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: a file descriptor we own and nothing else refers to.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => Ok(false),
        _ => Err(format!("BPF_MAP_CREATE: {err}")),
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// How aya will attach on this kernel (informational, not a requirement): XDP through a
/// bpf_link (5.9+) or netlink, TC through TCX (6.6+) or a clsact qdisc.
pub fn attach_methods() -> (&'static str, &'static str) {
    use aya::util::KernelVersion;
    let at_least = |major, minor| {
        KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(major, minor, 0))
    };
    (
        if at_least(5, 9) {
            "bpf_link (netlink if the driver refuses it)"
        } else {
            "netlink"
        },
        if at_least(6, 6) {
            "TCX link"
        } else {
            "clsact qdisc + cls_bpf (netlink)"
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn all_present(_: &Check) -> Result<bool, String> {
        Ok(true)
    }

    #[test]
    fn a_kernel_with_everything_passes() {
        assert!(require_with(&mut all_present).is_ok());
        let probed = probe_with(&mut all_present).unwrap();
        assert_eq!(probed.len(), REQUIRED.len());
    }

    #[test]
    fn a_missing_feature_is_named_with_its_release_and_use() {
        let mut no_mmapable =
            |c: &Check| Ok(!matches!(c, Check::MapFlag { flag, .. } if *flag == BPF_F_MMAPABLE));
        let err = require_with(&mut no_mmapable).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(
                "map flag BPF_F_MMAPABLE on arrays (Linux 5.5+, for MAGLEV rings written \
                 through mmap)"
            ),
            "{msg}"
        );
        assert!(msg.contains(&kernel_release()), "{msg}");
        assert!(msg.contains("tested on Linux 6.1 and newer"), "{msg}");
        // Nothing present is listed as missing.
        assert!(!msg.contains("LRU"), "{msg}");
    }

    #[test]
    fn every_missing_feature_is_listed() {
        let mut no_tc = |c: &Check| Ok(!matches!(c, Check::Program(Tc) | Check::Helper(Tc, _)));
        let KernelFeaturesError::Missing { missing, .. } = require_with(&mut no_tc).unwrap_err()
        else {
            panic!("expected Missing");
        };
        assert_eq!(missing[0].name, "program type BPF_PROG_TYPE_SCHED_CLS");
        assert_eq!(
            missing.len(),
            1 + REQUIRED
                .iter()
                .filter(|f| matches!(f.check, Check::Helper(Tc, _)))
                .count()
        );
    }

    #[test]
    fn a_failed_probe_is_not_reported_as_missing() {
        let mut denied = |_: &Check| Err("Operation not permitted (os error 1)".to_string());
        let msg = require_with(&mut denied).unwrap_err().to_string();
        assert!(
            msg.starts_with("probing the kernel for program type BPF_PROG_TYPE_XDP failed"),
            "{msg}"
        );
        assert!(msg.contains("Operation not permitted"), "{msg}");
        assert!(msg.contains("CAP_BPF"), "{msg}");
    }

    /// A 64-bit little-endian ELF relocatable, read just far enough to follow the BPF calls:
    /// sections, function symbols and call relocations.
    struct Elf<'a> {
        /// (name, bytes) by section index.
        sections: Vec<(String, &'a [u8])>,
        /// Symbols: (section index, value, size, is a section symbol).
        symbols: Vec<(usize, usize, usize, bool)>,
        /// (section index, instruction offset) -> symbol index, from the SHT_REL sections.
        call_relocs: BTreeMap<(usize, usize), usize>,
    }

    fn parse_elf(elf: &[u8]) -> Elf<'_> {
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
        let (shoff, shentsize, shnum, shstrndx) =
            (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
        let header = |i: usize| shoff + i * shentsize;
        let strtab = u64_at(header(shstrndx) + 0x18);
        let bytes_of = |h: usize| -> &[u8] {
            let (off, size) = (u64_at(h + 0x18), u64_at(h + 0x20));
            if u32_at(h + 4) == 8 {
                &[][..] // SHT_NOBITS
            } else {
                &elf[off..off + size]
            }
        };
        let sections = (0..shnum)
            .map(|i| {
                let name_at = strtab + u32_at(header(i));
                let end = elf[name_at..].iter().position(|&b| b == 0).unwrap();
                let name = String::from_utf8_lossy(&elf[name_at..name_at + end]).into_owned();
                (name, bytes_of(header(i)))
            })
            .collect();
        let mut symbols = Vec::new();
        let mut call_relocs = BTreeMap::new();
        for i in 0..shnum {
            let h = header(i);
            match u32_at(h + 4) {
                // SHT_SYMTAB: Elf64_Sym is name u32, info u8, other u8, shndx u16, value, size.
                2 => {
                    for sym in bytes_of(h).chunks_exact(24) {
                        let shndx = u16::from_le_bytes([sym[6], sym[7]]) as usize;
                        let value = u64::from_le_bytes(sym[8..16].try_into().unwrap()) as usize;
                        let size = u64::from_le_bytes(sym[16..24].try_into().unwrap()) as usize;
                        symbols.push((shndx, value, size, sym[4] & 0xf == 3)); // STT_SECTION
                    }
                }
                // SHT_REL: Elf64_Rel is offset, info (symbol << 32 | type); sh_info names
                // the section the relocations apply to.
                9 => {
                    let target = u32_at(h + 0x2c);
                    for rel in bytes_of(h).chunks_exact(16) {
                        let offset = u64::from_le_bytes(rel[0..8].try_into().unwrap()) as usize;
                        let info = u64::from_le_bytes(rel[8..16].try_into().unwrap());
                        call_relocs.insert((target, offset), (info >> 32) as usize);
                    }
                }
                _ => {}
            }
        }
        Elf {
            sections,
            symbols,
            call_relocs,
        }
    }

    impl Elf<'_> {
        /// The helper ids a program section can reach: its own calls and those of every
        /// subprogram it calls (BPF-to-BPF calls, src_reg 1, followed through relocations into
        /// .text), so code only XDP reaches is not charged to TC.
        fn helpers_reachable_from(&self, prefix: &str) -> BTreeSet<u32> {
            let function_at = |section: usize, offset: usize| -> (usize, usize) {
                self.symbols
                    .iter()
                    .find(|&&(s, value, size, is_section)| {
                        s == section && !is_section && value <= offset && offset < value + size
                    })
                    .map(|&(_, value, size, _)| (value, value + size))
                    .unwrap_or_else(|| panic!("no function at {offset:#x} in section {section}"))
            };
            let mut todo: Vec<(usize, usize, usize)> = self
                .sections
                .iter()
                .enumerate()
                .filter(|(_, (name, _))| name.starts_with(prefix))
                .map(|(i, (_, code))| (i, 0, code.len()))
                .collect();
            assert!(!todo.is_empty(), "no section named {prefix}*");
            let (mut seen, mut helpers) = (BTreeSet::new(), BTreeSet::new());
            while let Some((section, start, end)) = todo.pop() {
                if !seen.insert((section, start)) {
                    continue;
                }
                let code = self.sections[section].1;
                for at in (start..end).step_by(8) {
                    let insn = &code[at..at + 8];
                    if insn[0] != 0x85 {
                        continue;
                    }
                    let imm = i32::from_le_bytes(insn[4..8].try_into().unwrap());
                    match insn[1] >> 4 {
                        0 => {
                            helpers.insert(imm as u32);
                        }
                        1 => {
                            let (to_section, to_offset) = match self.call_relocs.get(&(section, at))
                            {
                                Some(&sym) => {
                                    let (s, value, _, is_section) = self.symbols[sym];
                                    if is_section {
                                        (s, (value as i64 + (imm as i64 + 1) * 8) as usize)
                                    } else {
                                        (s, value)
                                    }
                                }
                                None => (section, (at as i64 + 8 + imm as i64 * 8) as usize),
                            };
                            let (from, to) = function_at(to_section, to_offset);
                            todo.push((to_section, from, to));
                        }
                        _ => {}
                    }
                }
            }
            helpers
        }
    }

    /// The sections of a 64-bit little-endian ELF: (name, bytes).
    fn elf_sections(elf: &[u8]) -> Vec<(String, &[u8])> {
        parse_elf(elf).sections
    }

    fn required_helpers(prog: ProgramType) -> BTreeSet<u32> {
        REQUIRED
            .iter()
            .filter_map(|f| match f.check {
                Check::Helper(p, h) if p == prog => Some(h as u32),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_helpers_probed_are_the_helpers_the_object_calls() {
        let elf = parse_elf(crate::bpf::object::EBPF_OBJECT);
        let xdp = elf.helpers_reachable_from("xdp");
        let tc = elf.helpers_reachable_from("classifier");
        assert!(
            !xdp.is_empty() && !tc.is_empty(),
            "no helper calls found in the program sections"
        );
        assert_eq!(
            required_helpers(Xdp),
            xdp,
            "REQUIRED's XDP helpers differ from the helper ids lb-ebpf's XDP code calls: \
             add or remove entries in kernel_features.rs"
        );
        assert_eq!(
            required_helpers(Tc),
            tc,
            "REQUIRED's TC helpers differ from the helper ids lb-ebpf's TC code calls"
        );
    }

    #[test]
    fn the_map_types_and_flags_probed_cover_the_objects_maps() {
        let sections = elf_sections(crate::bpf::object::EBPF_OBJECT);
        let maps = sections
            .iter()
            .find(|(name, _)| name == "maps")
            .map(|(_, b)| *b)
            .expect("the object has a legacy maps section");
        // aya-ebpf 0.2's bpf_map_def: type, key, value, max_entries, flags, id, pinning.
        assert_eq!(maps.len() % 28, 0);
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        for def in maps.chunks_exact(28) {
            let (map_type, flags) = (u32_at(def, 0), u32_at(def, 16));
            assert!(
                REQUIRED
                    .iter()
                    .any(|f| matches!(f.check, Check::Map(m) if m as u32 == map_type)),
                "map type {map_type} of the object is not probed"
            );
            for bit in (0..32).map(|i| 1u32 << i).filter(|b| flags & b != 0) {
                assert!(
                    REQUIRED.iter().any(|f| matches!(
                        f.check,
                        Check::MapFlag { map, flag } if map as u32 == map_type && flag == bit
                    )),
                    "flag {bit:#x} on map type {map_type} of the object is not probed"
                );
            }
        }
    }
}
