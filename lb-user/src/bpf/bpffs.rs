//! The bpf filesystem that pinned maps live on. A fresh VM, or a process started by
//! `ip netns exec` (which mounts a new /sys), often has none at /sys/fs/bpf: like other BPF
//! agents, we mount one there when it is missing.

use std::path::{Path, PathBuf};

pub const MOUNTPOINT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "pin directory {dir:?} is not on a bpf filesystem; mount one there \
         (mount -t bpf bpf DIR) or choose a pin directory under {MOUNTPOINT}"
    )]
    NotBpffs { dir: PathBuf },
    #[error("cannot mount a bpf filesystem at {MOUNTPOINT}; mount it yourself (mount -t bpf bpf {MOUNTPOINT})")]
    Mount {
        #[source]
        source: std::io::Error,
    },
}

/// Is `path` on a bpf filesystem?
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: c is NUL-terminated; st is a plain out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure pins under `dir` land on a bpffs, mounting one at /sys/fs/bpf (mode 0700) if
/// `dir` is below it and nothing is mounted there. Returns whether it mounted one.
pub fn ensure(dir: &Path) -> Result<bool, BpffsError> {
    // The nearest existing ancestor decides which filesystem the pins land on.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(false);
    }
    let root = Path::new(MOUNTPOINT);
    if !dir.starts_with(root) || !root.is_dir() || is_bpffs(root) {
        return Err(BpffsError::NotBpffs {
            dir: dir.to_path_buf(),
        });
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("literal without NUL");
    let (src, target, fstype, data) = (c("bpf"), c(MOUNTPOINT), c("bpf"), c("mode=0700"));
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(BpffsError::Mount {
            source: std::io::Error::last_os_error(),
        });
    }
    log::info!("mounted a bpf filesystem at {MOUNTPOINT} (this mount namespace had none)");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_outside_the_mountpoint_is_refused_not_mounted() {
        let err = ensure(Path::new("/tmp/lbx-not-bpffs/pins")).unwrap_err();
        assert!(matches!(err, BpffsError::NotBpffs { .. }), "{err}");
        assert!(!is_bpffs(Path::new("/tmp")));
    }
}
