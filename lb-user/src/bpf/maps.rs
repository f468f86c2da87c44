//! The one handle layer over the map catalogue (`lb_common::maps`): opens every map of the
//! data plane from a loaded object or from its pins, and gives typed access by catalogue
//! entry (`maps.lookup::<CONNTRACK>(&key)`), with errors that name the map and the
//! operation. The data plane, the node runtime, the operator view and the explain sandbox
//! all read and write maps through here; no map name is spelled anywhere in lb-user.

use std::fmt;
use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    Ebpf, Pod,
};
use lb_common::maps::{MapDef, MapSpec, CATALOGUE};

/// Where a [`Maps`] came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Taken from a freshly loaded object (pinned there or not).
    Object,
    /// Opened from the pins in this directory.
    Pins(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Object => f.write_str("the loaded BPF object"),
            Origin::Pins(dir) => write!(f, "the pins in {}", dir.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from {origin} (rebuild with `cargo xtask build-ebpf`, or start lb-user of the version that pinned it)")]
    Missing { name: &'static str, origin: Origin },
    #[error("cannot open map {name} from {origin}: {source}")]
    Open {
        name: &'static str,
        origin: Origin,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {name}: {op} failed: {source}")]
    Op {
        name: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// The catalogue's maps, open.
pub struct Maps {
    /// In catalogue order; None where a map was not asked for.
    maps: Vec<Option<Map>>,
    origin: Origin,
}

/// The path of `spec`'s pin in `dir`.
pub fn pin_path(dir: &Path, spec: &MapSpec) -> PathBuf {
    dir.join(spec.name)
}

fn index_of(spec: &MapSpec) -> usize {
    CATALOGUE
        .iter()
        .position(|s| s.name == spec.name)
        .expect("every MapDef is in CATALOGUE")
}

impl Maps {
    /// Takes every catalogue map out of a loaded object (its programs keep their own
    /// references to them).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let maps = CATALOGUE
            .iter()
            .map(|spec| {
                ebpf.take_map(spec.name)
                    .map(Some)
                    .ok_or(MapsError::Missing {
                        name: spec.name,
                        origin: Origin::Object,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Maps {
            maps,
            origin: Origin::Object,
        })
    }

    /// Opens every catalogue map pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        Self::from_some_pins(dir, |_| true)
    }

    /// Opens the catalogue maps `want` picks from their pins in `dir`.
    pub fn from_some_pins(dir: &Path, want: impl Fn(&MapSpec) -> bool) -> Result<Self, MapsError> {
        let origin = Origin::Pins(dir.to_path_buf());
        let mut maps = Vec::with_capacity(CATALOGUE.len());
        for spec in CATALOGUE {
            if !want(spec) {
                maps.push(None);
                continue;
            }
            let open = |source| MapsError::Open {
                name: spec.name,
                origin: origin.clone(),
                source: Box::new(source),
            };
            let path = pin_path(dir, spec);
            if !path.exists() {
                return Err(MapsError::Missing {
                    name: spec.name,
                    origin,
                });
            }
            let data = MapData::from_pin(&path).map_err(open)?;
            maps.push(Some(Map::from_map_data(data).map_err(open)?));
        }
        Ok(Maps { maps, origin })
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The map of catalogue entry `M`.
    pub fn map<M: MapDef>(&self) -> Result<&Map, MapsError> {
        self.maps[index_of(&M::SPEC)]
            .as_ref()
            .ok_or_else(|| MapsError::Missing {
                name: M::SPEC.name,
                origin: self.origin.clone(),
            })
    }

    fn map_mut<M: MapDef>(&mut self) -> Result<&mut Map, MapsError> {
        let origin = self.origin.clone();
        self.maps[index_of(&M::SPEC)]
            .as_mut()
            .ok_or(MapsError::Missing {
                name: M::SPEC.name,
                origin,
            })
    }

    fn typed<'a, M: MapDef, T: TryFrom<&'a Map, Error = MapError>>(
        &'a self,
    ) -> Result<T, MapsError> {
        T::try_from(self.map::<M>()?).map_err(op::<M>("open"))
    }

    fn typed_mut<'a, M: MapDef, T: TryFrom<&'a mut Map, Error = MapError>>(
        &'a mut self,
    ) -> Result<T, MapsError> {
        T::try_from(self.map_mut::<M>()?).map_err(op::<M>("open"))
    }

    /// An array map, read-only.
    pub fn array<M>(&self) -> Result<Array<&MapData, M::Value>, MapsError>
    where
        M: MapDef<Key = u32>,
        M::Value: Pod,
    {
        self.typed::<M, _>()
    }

    pub fn array_mut<M>(&mut self) -> Result<Array<&mut MapData, M::Value>, MapsError>
    where
        M: MapDef<Key = u32>,
        M::Value: Pod,
    {
        self.typed_mut::<M, _>()
    }

    /// A hash map (LRU or not), read-only.
    pub fn hash<M>(&self) -> Result<HashMap<&MapData, M::Key, M::Value>, MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        self.typed::<M, _>()
    }

    pub fn hash_mut<M>(&mut self) -> Result<HashMap<&mut MapData, M::Key, M::Value>, MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        self.typed_mut::<M, _>()
    }

    pub fn per_cpu<M>(&self) -> Result<PerCpuArray<&MapData, M::Value>, MapsError>
    where
        M: MapDef<Key = u32>,
        M::Value: Pod,
    {
        self.typed::<M, _>()
    }

    /// Element `index` of an array map; None beyond its end.
    pub fn element<M>(&self, index: u32) -> Result<Option<M::Value>, MapsError>
    where
        M: MapDef<Key = u32>,
        M::Value: Pod,
    {
        missing_is_none::<M, _>(self.array::<M>()?.get(&index, 0))
    }

    pub fn set_element<M>(&mut self, index: u32, value: M::Value) -> Result<(), MapsError>
    where
        M: MapDef<Key = u32>,
        M::Value: Pod,
    {
        self.array_mut::<M>()?
            .set(index, value, 0)
            .map_err(op::<M>("set"))
    }

    /// The entry of `key` in a hash map.
    pub fn lookup<M>(&self, key: &M::Key) -> Result<Option<M::Value>, MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        missing_is_none::<M, _>(self.hash::<M>()?.get(key, 0))
    }

    pub fn insert<M>(&mut self, key: &M::Key, value: &M::Value) -> Result<(), MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        self.hash_mut::<M>()?
            .insert(key, value, 0)
            .map_err(op::<M>("insert"))
    }

    /// Removes `key`; false when it was not there.
    pub fn remove<M>(&mut self, key: &M::Key) -> Result<bool, MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        match self.hash_mut::<M>()?.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(op::<M>("remove")(e)),
        }
    }

    /// Every entry of a hash map.
    pub fn entries<M>(&self) -> Result<Vec<(M::Key, M::Value)>, MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        self.hash::<M>()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op::<M>("iterate"))
    }

    /// Deletes every entry of a hash map; returns how many were deleted (entries the
    /// programs add or evict meanwhile are not counted).
    pub fn clear<M>(&mut self) -> Result<usize, MapsError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        let mut map = self.hash_mut::<M>()?;
        let keys: Vec<M::Key> = map.keys().filter_map(Result::ok).collect();
        Ok(keys.iter().filter(|k| map.remove(k).is_ok()).count())
    }

    /// Element `index` of a per-CPU array, one value per possible CPU.
    pub fn per_cpu_element<M>(&self, index: u32) -> Result<PerCpuValues<M::Value>, MapsError>
    where
        M: MapDef<Key = u32>,
        M::Value: Pod,
    {
        self.per_cpu::<M>()?
            .get(&index, 0)
            .map_err(op::<M>("lookup"))
    }
}

fn op<M: MapDef>(op: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Op {
        name: M::SPEC.name,
        op,
        source: Box::new(source),
    }
}

/// A lookup whose "missing" (key absent, index out of range) is `None`.
fn missing_is_none<M: MapDef, V>(res: Result<V, MapError>) -> Result<Option<V>, MapsError> {
    match res {
        Ok(v) => Ok(Some(v)),
        Err(MapError::OutOfBounds { .. }) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(op::<M>("lookup")(e)),
    }
}

/// aya reports a missing key as KeyNotFound on lookups and as ENOENT on deletes.
pub fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
