//! The MAGLEV map, read and written through mmap (the map is `BPF_F_MMAPABLE`). Only the
//! pages of the ring being read or written are mapped, and only while that happens: the
//! whole map (up to 64 MiB at 10 000 Services) would otherwise count in the agent's resident
//! memory although it is the kernel's.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;

use aya::maps::Map;

#[derive(Debug, thiserror::Error)]
pub enum RingsError {
    #[error("the MAGLEV map is not an array map")]
    NotAnArray,
    #[error("mmap of the MAGLEV map failed: {source}")]
    Mmap {
        #[source]
        source: std::io::Error,
    },
    #[error("ring of service slot {service_id} out of range (max_services {max_services})")]
    OutOfRange { service_id: u32, max_services: u32 },
    #[error("ring length {len} differs from maglev_size {maglev_size}")]
    Size { len: usize, maglev_size: u32 },
}

/// The rings of `max_services` service slots of `maglev_size` positions each.
pub struct Rings {
    /// The MAGLEV map's fd (owned by the `Maps` that holds the map, which outlives this).
    fd: RawFd,
    /// u32 ring slots the map holds.
    entries: usize,
    maglev_size: u32,
    max_services: u32,
}

impl Rings {
    /// `map` is MAGLEV with `elements` two-slot elements.
    pub fn new(
        map: &Map,
        elements: u32,
        maglev_size: u32,
        max_services: u32,
    ) -> Result<Self, RingsError> {
        let Map::Array(data) = map else {
            return Err(RingsError::NotAnArray);
        };
        let rings = Rings {
            fd: data.fd().as_fd().as_raw_fd(),
            entries: elements as usize * 2,
            maglev_size,
            max_services,
        };
        // Fail at load, not at the first write, if the map cannot be mapped.
        drop(Window::map(&rings, 0, 1)?);
        Ok(rings)
    }

    /// Writes ring positions of one service slot (only the changed ones, Katran style).
    pub fn write(&mut self, service_id: u32, changes: &[(u32, u32)]) -> Result<(), RingsError> {
        let mut window = self.window(service_id)?;
        let ring = window.slots();
        for &(pos, id) in changes {
            if let Some(slot) = ring.get_mut(pos as usize) {
                // Aligned 4-byte stores are single-copy atomic: a packet sees old or new id.
                unsafe { std::ptr::write_volatile(slot, id) };
            }
        }
        Ok(())
    }

    /// Writes a whole ring of one service slot.
    pub fn write_full(&mut self, service_id: u32, table: &[u32]) -> Result<(), RingsError> {
        if table.len() != self.maglev_size as usize {
            return Err(RingsError::Size {
                len: table.len(),
                maglev_size: self.maglev_size,
            });
        }
        let mut window = self.window(service_id)?;
        for (slot, id) in window.slots().iter_mut().zip(table) {
            unsafe { std::ptr::write_volatile(slot, *id) };
        }
        Ok(())
    }

    /// The ring of a service slot as the program sees it.
    pub fn read(&self, service_id: u32) -> Result<Vec<u32>, RingsError> {
        let mut window = self.window(service_id)?;
        Ok(window
            .slots()
            .iter()
            .map(|slot| unsafe { std::ptr::read_volatile(slot) })
            .collect())
    }

    fn window(&self, service_id: u32) -> Result<Window, RingsError> {
        let m = self.maglev_size as usize;
        let start = service_id as usize * m;
        if service_id >= self.max_services || start + m > self.entries {
            return Err(RingsError::OutOfRange {
                service_id,
                max_services: self.max_services,
            });
        }
        Window::map(self, start, m)
    }
}

/// Ring slots `[start, start + len)` of the MAGLEV map, mapped until dropped.
struct Window {
    base: NonNull<u8>,
    len_bytes: usize,
    /// The first slot's place in the mapping.
    first: *mut u32,
    len: usize,
}

impl Window {
    fn map(rings: &Rings, start: usize, len: usize) -> Result<Self, RingsError> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let begin = start * 4 / page * page;
        let end = ((start + len) * 4).div_ceil(page) * page;
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                end - begin,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                rings.fd,
                begin as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RingsError::Mmap {
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap returned NULL without MAP_FAILED");
        Ok(Window {
            base,
            len_bytes: end - begin,
            first: unsafe { base.as_ptr().add(start * 4 - begin).cast() },
            len,
        })
    }

    fn slots(&mut self) -> &mut [u32] {
        // The window covers exactly these slots, 4-byte aligned (page + multiple of 4).
        unsafe { std::slice::from_raw_parts_mut(self.first, self.len) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len_bytes) };
    }
}
