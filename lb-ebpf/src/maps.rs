//! Every map of the data plane, generated from lb-common's catalogue (`lb_common::maps`),
//! where each map's name, types, size, flags and doc comment are written once. Userspace
//! (lb-user) owns the contents of the control maps and resizes them at load time; the
//! programs write only the connection state maps, learned peer values and the counters.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

/// One `#[map]` static per catalogue entry, of the aya-ebpf type its kind names (arrays
/// take only the value type).
macro_rules! ebpf_maps {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident : $kind:ident < $k:ty, $v:ty > [$max:expr, $flags:expr, $size:ident, $writer:ident];
    )*) => {
        $( ebpf_map!($(#[doc = $doc])* $name, $kind, $k, $v, $max, $flags); )*
    };
}

macro_rules! ebpf_map {
    ($(#[doc = $doc:literal])* $name:ident, Array, $k:ty, $v:ty, $max:expr, $flags:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: Array<$v> = Array::with_max_entries($max, $flags);
    };
    ($(#[doc = $doc:literal])* $name:ident, PerCpuArray, $k:ty, $v:ty, $max:expr, $flags:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: PerCpuArray<$v> = PerCpuArray::with_max_entries($max, $flags);
    };
    ($(#[doc = $doc:literal])* $name:ident, HashMap, $k:ty, $v:ty, $max:expr, $flags:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: HashMap<$k, $v> = HashMap::with_max_entries($max, $flags);
    };
    ($(#[doc = $doc:literal])* $name:ident, LruHashMap, $k:ty, $v:ty, $max:expr, $flags:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: LruHashMap<$k, $v> = LruHashMap::with_max_entries($max, $flags);
    };
}

lb_common::map_catalogue!(ebpf_maps);
