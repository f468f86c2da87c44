//! The kernels of the matrix: Debian's own kernel packages, fetched by package name with
//! `apt-get download`, unpacked with `dpkg-deb -x` (not installed) and cached per version under
//! `~/.cache/lbx/kernels/<package>_<version>/`, ready to boot under qemu.
//!
//! A kernel is named by a Debian metapackage (`linux-image-amd64` is bookworm's 6.1,
//! `linux-image-6.12-amd64` its 6.12 from bookworm-security), so the matrix follows Debian's
//! security updates without a code change: the metapackage depends on the current ABI package
//! (`linux-image-6.1.0-57-amd64`), whose candidate version names the cache directory. Old ABI
//! packages leave the archive, which is why no ABI package is pinned here.
//!
//! What the cache holds per version:
//! - `tree/`: the unpacked package, with `depmod` run over its modules (the package's
//!   postinst would do that on a real install), so the guest's `modprobe` works;
//! - `vmlinux`: the kernel proper, decompressed from the bzImage's payload. Debian builds with
//!   `CONFIG_PVH`, so qemu boots it straight into 64-bit mode: under TCG this saves the ~20 s
//!   the bzImage's own decompressor takes before the kernel prints anything;
//! - `release`: `uname -r` of the kernel (the directory under `tree/lib/modules`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::cmd::{self, CmdError};

/// One kernel of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// What the output and `--kernel` call it: the upstream major.minor.
    pub label: &'static str,
    /// The Debian metapackage that depends on the current package of this series.
    pub metapackage: &'static str,
}

/// Debian 12's kernel (also what Amazon Linux 2023 runs: 6.1) and the newer 6.12.
pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        label: "6.1",
        metapackage: "linux-image-amd64",
    },
    KernelSpec {
        label: "6.12",
        metapackage: "linux-image-6.12-amd64",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "neither XDG_CACHE_HOME nor HOME is set; set HOME so the kernels have a cache directory"
    )]
    NoCacheDir,
    #[error("cannot query apt (`apt-cache`): the kernel matrix needs Debian's package tools")]
    AptCache {
        #[source]
        source: CmdError,
    },
    #[error(
        "apt knows no package behind {metapackage}{detail}; run `apt-get update` as root and \
         check that bookworm and bookworm-security are configured"
    )]
    Unresolved { metapackage: String, detail: String },
    #[error(
        "{metapackage} now depends on {package} {version}, which is not a {label} kernel: \
         Debian moved the series on; update MATRIX in xtask/src/kernels.rs"
    )]
    WrongSeries {
        metapackage: String,
        package: String,
        version: String,
        label: String,
    },
    #[error("refreshing the package lists (`apt-get update`) failed")]
    AptUpdate {
        #[source]
        source: CmdError,
    },
    #[error("fetching {package} {version} failed; check the apt/dpkg output above")]
    Fetch {
        package: String,
        version: String,
        #[source]
        source: CmdError,
    },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{package} {version}: {detail}; delete {} and re-run", dir.display())]
    Broken {
        package: String,
        version: String,
        dir: PathBuf,
        detail: String,
    },
    #[error("`{tool}` failed on {}: {detail}", path.display())]
    Tool {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
}

/// A kernel unpacked and ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub spec: KernelSpec,
    /// The Debian package (`linux-image-6.1.0-57-amd64`) and its version (`6.1.192-3`).
    pub package: String,
    pub version: String,
    /// `uname -r` in the guest.
    pub release: String,
    /// What qemu's `-kernel` boots: the PVH-capable ELF, else the bzImage.
    pub image: PathBuf,
    /// `lib/modules/<release>` of the unpacked package, depmod already run.
    pub modules: PathBuf,
}

/// Resolves `spec` to the current Debian package and makes sure it is unpacked in the cache.
pub fn prepare(spec: KernelSpec) -> Result<Kernel, KernelError> {
    let (package, version) = resolve(spec)?;
    let dir = cmd::cache_base()
        .ok_or(KernelError::NoCacheDir)?
        .join("lbx")
        .join("kernels")
        .join(format!("{package}_{version}"));
    let step = format!("kernels: {} = {package} {version}", spec.label);
    if !dir.join("release").is_file() {
        println!("{step}: downloading into {} ...", dir.display());
        let parent = dir.parent().expect("the cache dir has a parent");
        let staging = parent.join(format!(
            ".{package}_{version}.partial-{}",
            std::process::id()
        ));
        let result = unpack(&package, &version, &staging).and_then(|()| {
            match fs::rename(&staging, &dir) {
                Ok(()) => Ok(()),
                // A concurrent run finished first: its copy is as good as ours.
                Err(_) if dir.join("release").is_file() => Ok(()),
                Err(source) => Err(KernelError::Io {
                    action: "move the unpacked kernel into",
                    path: dir.clone(),
                    source,
                }),
            }
        });
        let _ = fs::remove_dir_all(&staging);
        result?;
    } else {
        println!("{step}: ok (cached in {})", dir.display());
    }
    load(spec, package, version, &dir)
}

/// Reads what [`unpack`] left in `dir`.
fn load(
    spec: KernelSpec,
    package: String,
    version: String,
    dir: &Path,
) -> Result<Kernel, KernelError> {
    let broken = |detail: String| KernelError::Broken {
        package: package.clone(),
        version: version.clone(),
        dir: dir.to_owned(),
        detail,
    };
    let release = fs::read_to_string(dir.join("release"))
        .map_err(|e| broken(format!("no release file: {e}")))?
        .trim()
        .to_owned();
    let modules = dir.join("tree/lib/modules").join(&release);
    if !modules.join("modules.dep").is_file() {
        return Err(broken(format!("{} has no modules.dep", modules.display())));
    }
    let vmlinux = dir.join("vmlinux");
    let bzimage = dir.join("tree/boot").join(format!("vmlinuz-{release}"));
    let image = if vmlinux.is_file() { vmlinux } else { bzimage };
    if !image.is_file() {
        return Err(broken(format!("{} is missing", image.display())));
    }
    Ok(Kernel {
        spec,
        package,
        version,
        release,
        image,
        modules,
    })
}

/// The ABI package the metapackage depends on, and apt's candidate version of it.
fn resolve(spec: KernelSpec) -> Result<(String, String), KernelError> {
    let lookup = || -> Result<Option<(String, String)>, KernelError> {
        let depends = apt_cache(&["depends", spec.metapackage])?;
        let Some(package) = parse_depends(&depends) else {
            return Ok(None);
        };
        let policy = apt_cache(&["policy", &package])?;
        Ok(crate::setup::parse_candidate(&policy).map(|v| (package, v)))
    };
    let found = match lookup()? {
        Some(found) => found,
        None if cmd::is_root() => {
            // A fresh machine's package lists may be empty or lack bookworm-security's.
            cmd::run(
                Command::new("apt-get")
                    .arg("update")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(Stdio::null()),
            )
            .map_err(|source| KernelError::AptUpdate { source })?;
            lookup()?.ok_or_else(|| KernelError::Unresolved {
                metapackage: spec.metapackage.into(),
                detail: " even after `apt-get update`".into(),
            })?
        }
        None => {
            return Err(KernelError::Unresolved {
                metapackage: spec.metapackage.into(),
                detail: " (and refreshing the package lists needs root)".into(),
            })
        }
    };
    if !found.1.starts_with(&format!("{}.", spec.label)) {
        return Err(KernelError::WrongSeries {
            metapackage: spec.metapackage.into(),
            package: found.0,
            version: found.1,
            label: spec.label.into(),
        });
    }
    Ok(found)
}

fn apt_cache(args: &[&str]) -> Result<String, KernelError> {
    let out = cmd::output(Command::new("apt-cache").args(args))
        .map_err(|source| KernelError::AptCache { source })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first `Depends: linux-image-...` of `apt-cache depends METAPACKAGE`.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_owned)
}

/// `apt-get download` + `dpkg-deb -x` into `staging/tree`, then depmod, the vmlinux and the
/// release file (written last: its presence marks a complete directory).
fn unpack(package: &str, version: &str, staging: &Path) -> Result<(), KernelError> {
    let _ = fs::remove_dir_all(staging);
    let download = staging.join("deb");
    mkdir(&download)?;
    let fetch = |source| KernelError::Fetch {
        package: package.into(),
        version: version.into(),
        source,
    };
    // Root's apt drops to the _apt user for downloads, which cannot write our directory.
    cmd::run(
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{package}={version}"))
            .current_dir(&download)
            .stdin(Stdio::null()),
    )
    .map_err(fetch)?;
    let deb = fs::read_dir(&download)
        .map_err(|source| KernelError::Io {
            action: "list",
            path: download.clone(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| KernelError::Broken {
            package: package.into(),
            version: version.into(),
            dir: staging.into(),
            detail: "apt-get download left no .deb file".into(),
        })?;
    let tree = staging.join("tree");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree)).map_err(fetch)?;
    fs::remove_dir_all(&download).map_err(|source| KernelError::Io {
        action: "remove",
        path: download,
        source,
    })?;

    let release = only_release(&tree.join("lib/modules"))?;
    cmd::run(Command::new("depmod").arg("-b").arg(&tree).arg(&release)).map_err(|e| {
        KernelError::Tool {
            tool: "depmod",
            path: tree.clone(),
            detail: e.to_string(),
        }
    })?;
    let bzimage = tree.join("boot").join(format!("vmlinuz-{release}"));
    match extract_vmlinux(&bzimage, &staging.join("vmlinux")) {
        Ok(()) => {}
        // Not fatal: qemu boots the bzImage too, only slower under TCG.
        Err(e) => println!("kernels: {package}: booting the bzImage ({e})"),
    }
    fs::write(staging.join("release"), format!("{release}\n")).map_err(|source| KernelError::Io {
        action: "write",
        path: staging.join("release"),
        source,
    })
}

/// The one directory under `lib/modules` of a kernel package.
fn only_release(modules: &Path) -> Result<String, KernelError> {
    let names: Vec<String> = fs::read_dir(modules)
        .map_err(|source| KernelError::Io {
            action: "list",
            path: modules.into(),
            source,
        })?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(KernelError::Tool {
            tool: "dpkg-deb",
            path: modules.into(),
            detail: format!("expected one kernel release directory, found {names:?}"),
        }),
    }
}

fn mkdir(path: &Path) -> Result<(), KernelError> {
    fs::create_dir_all(path).map_err(|source| KernelError::Io {
        action: "create",
        path: path.into(),
        source,
    })
}

/// How a bzImage's payload is compressed, by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    fn of(payload: &[u8]) -> Option<Self> {
        if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Self::Xz)
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else if payload.starts_with(&[0x1f, 0x8b]) {
            Some(Self::Gzip)
        } else {
            None
        }
    }

    fn tool(self) -> &'static str {
        match self {
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
        }
    }
}

/// The compressed kernel inside a bzImage: the setup header's payload_offset and
/// payload_length (boot protocol 2.08+), relative to the protected-mode code after the
/// `setup_sects` real-mode sectors.
fn bzimage_payload(image: &[u8]) -> Result<&[u8], String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("no bzImage setup header (HdrS)".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
    let u32_at =
        |o: usize| u32::from_le_bytes([image[o], image[o + 1], image[o + 2], image[o + 3]]);
    if u16_at(0x206) < 0x208 {
        return Err(format!(
            "boot protocol {:#x} has no payload fields",
            u16_at(0x206)
        ));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248) as usize;
    let len = u32_at(0x24c) as usize;
    image.get(start..start + len).ok_or_else(|| {
        format!(
            "payload {start}+{len} lies outside the {} byte image",
            image.len()
        )
    })
}

/// Decompresses the kernel out of `bzimage` into `out` and checks that it is an ELF with a
/// PVH entry note, which qemu needs to boot it directly.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), String> {
    let image = fs::read(bzimage).map_err(|e| format!("reading {}: {e}", bzimage.display()))?;
    let payload = bzimage_payload(&image)?;
    let compression =
        Compression::of(payload).ok_or("the payload's compression is not xz, zstd or gzip")?;
    // The kernel build appends the decompressed size (4 bytes, LE) to xz and zstd payloads;
    // the tools reject it as trailing garbage.
    let (stream, size) = match compression {
        Compression::Gzip => (payload, None),
        _ if payload.len() > 4 => {
            let (s, tail) = payload.split_at(payload.len() - 4);
            (
                s,
                Some(u32::from_le_bytes(tail.try_into().expect("4 bytes"))),
            )
        }
        _ => return Err("the payload is empty".into()),
    };
    let tool = compression.tool();
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running `{tool} -dc`: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let stream = stream.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &stream));
    let output = child
        .wait_with_output()
        .map_err(|e| format!("running `{tool} -dc`: {e}"))?;
    let _ = writer.join();
    if !output.status.success() {
        return Err(format!(
            "`{tool} -dc` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let elf = output.stdout;
    if let Some(size) = size {
        if elf.len() != size as usize {
            return Err(format!(
                "decompressed {} bytes, the image says {size}",
                elf.len()
            ));
        }
    }
    if !has_pvh_note(&elf) {
        return Err("the kernel has no PVH entry note (CONFIG_PVH off)".into());
    }
    fs::write(out, &elf).map_err(|e| format!("writing {}: {e}", out.display()))
}

/// Whether a 64-bit little-endian ELF has a `Xen` note of type XEN_ELFNOTE_PHYS32_ENTRY (18)
/// in a PT_NOTE segment: what qemu looks for to boot an uncompressed kernel.
fn has_pvh_note(elf: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).any(|i| {
        let ph = phoff as usize + i * phentsize as usize;
        if u32_at(ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            return false;
        };
        let (mut at, end) = (off as usize, (off + size) as usize);
        while at + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(at), u32_at(at + 4), u32_at(at + 8))
            else {
                return false;
            };
            let name = elf.get(at + 12..at + 12 + namesz as usize);
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == Some(b"Xen\0") {
                return true;
            }
            let pad = |n: u32| (n as usize).div_ceil(4) * 4;
            at += 12 + pad(namesz) + pad(descsz);
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metapackage_dependency_parsed() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        let virtual_first = "linux-image-6.12-amd64\n  Depends: <linux-image-foo>\n  \
                             Depends: linux-image-6.12.118+deb12-amd64\n";
        assert_eq!(
            parse_depends(virtual_first).as_deref(),
            Some("linux-image-6.12.118+deb12-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn matrix_labels_are_unique_series() {
        let labels: Vec<&str> = MATRIX.iter().map(|k| k.label).collect();
        assert_eq!(labels, ["6.1", "6.12"]);
    }

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img.extend_from_slice(b"trailer");
        img
    }

    #[test]
    fn payload_found_through_the_setup_header() {
        let payload = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3];
        let img = fake_bzimage(&payload);
        assert_eq!(bzimage_payload(&img).unwrap(), payload);
        assert_eq!(Compression::of(&payload), Some(Compression::Xz));
        assert_eq!(
            Compression::of(&[0x28, 0xb5, 0x2f, 0xfd]),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::of(b"BZh"), None);
        assert!(bzimage_payload(b"not a kernel").is_err());
    }

    #[test]
    fn pvh_note_recognised() {
        // ELF header + one PT_NOTE program header + one note.
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_off = elf.len() as u64;
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x100_0000u32.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        assert!(has_pvh_note(&elf));
        // Another note type only: not bootable as PVH.
        let mut other = elf.clone();
        let kind = note_off as usize + 8;
        other[kind..kind + 4].copy_from_slice(&1u32.to_le_bytes());
        assert!(!has_pvh_note(&other));
        assert!(!has_pvh_note(b"\x7fELF"));
    }
}
