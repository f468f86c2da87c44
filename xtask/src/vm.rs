//! Booting one of the matrix's kernels under qemu with this machine's filesystem as the
//! guest's root (read-only, over 9p), so the guest runs the test binaries built on the host.
//!
//! The boot: qemu loads the kernel and a small initramfs made here (Debian's static busybox
//! and the few modules the root filesystem needs); its `/init` mounts the host's `/` (9p,
//! read-only), tmpfs on `/tmp` and `/run`, the run's output directory (9p, writable, at the
//! same path as on the host) and switches to it, running the run's guest script as PID 1.
//! The guest script ends with a power-off; qemu then exits. The serial console is streamed
//! to our stdout with the kernel's label in front of every line.
//!
//! Nothing here waits without a bound: every boot has a deadline after which qemu is killed
//! (by its PID) and the run fails with the console's last lines.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::kernels::Kernel;

/// Where the guest finds its modules and busybox: Debian's busybox-static.
const BUSYBOX: &str = "/bin/busybox";
/// What the initramfs prints first: proof that the kernel booted and ran our init.
pub const INITRAMFS_MARKER: &str = "lbx-vm: initramfs up";
/// How long a KVM guest may take to print [`INITRAMFS_MARKER`] before KVM counts as unable
/// to boot it (a working KVM needs 1-3 s; TCG is not probed).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Modules the initramfs loads (with their dependencies) to mount the host's root over 9p.
const ROOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];
/// 9p message size: large reads of the test binaries, within what 6.1's virtio transport takes.
const MSIZE: u32 = 262_144;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving the initramfs modules of {release} failed: {detail}")]
    Modules { release: String, detail: String },
    #[error("could not start `{command}`: {source} (is qemu-system-x86 installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the {label} guest did not finish within {}s ({accel}); qemu (pid {pid}) was killed. \
         Last console lines:\n{tail}",
        timeout.as_secs()
    )]
    Timeout {
        label: String,
        accel: Accel,
        timeout: Duration,
        pid: u32,
        tail: String,
    },
}

/// How qemu runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        })
    }
}

/// A virtio-net NIC backed by a tap device that already exists in network namespace
/// `netns` (qemu runs inside that namespace to open it).
#[derive(Clone, Debug)]
pub struct Nic {
    pub netns: String,
    pub tap: String,
    pub mac: String,
    /// Queue pairs of the tap (created `multi_queue`) and the device.
    pub queues: u32,
}

/// One boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub kernel: Kernel,
    pub accel: Accel,
    /// Shared read-write with the guest at the same path; holds the initramfs and logs too.
    pub out_dir: PathBuf,
    /// Run by `/bin/sh` as the guest's PID 1 (a host path: the guest sees the host's files).
    pub guest_script: PathBuf,
    pub nic: Option<Nic>,
    /// Host directories the guest must see (workspace, binaries, kernel tree; the guest
    /// script must lie in one of them or in `out_dir`): those under `/tmp` are bound back
    /// over the guest's own tmpfs `/tmp`.
    pub host_paths: Vec<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
}

/// How a boot ended.
#[derive(Debug)]
pub struct VmOutcome {
    pub status: ExitStatus,
    pub elapsed: Duration,
    /// qemu's own stderr (not the guest's).
    pub qemu_stderr: String,
}

/// Writes the initramfs for `kernel` into `dir` and returns its path.
pub fn build_initramfs(spec: &VmSpec) -> Result<PathBuf, VmError> {
    let (kernel, dir) = (&spec.kernel, &spec.out_dir);
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    let busybox = fs::read(BUSYBOX).map_err(|source| VmError::Io {
        action: "read (apt-get install busybox-static)",
        path: BUSYBOX.into(),
        source,
    })?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for (i, module) in root_modules(kernel)?.iter().enumerate() {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or("module");
        let bytes = read_module(module).map_err(|detail| VmError::Modules {
            release: kernel.release.clone(),
            detail,
        })?;
        cpio.file(&format!("modules/{i:02}-{name}.ko"), 0o644, &bytes);
    }
    cpio.file(
        "init",
        0o755,
        init_script(kernel, &spec.out_dir, &spec.guest_script, &spec.host_paths).as_bytes(),
    );
    let path = dir.join(format!("initramfs-{}.cpio", kernel.release));
    fs::write(&path, cpio.finish()).map_err(|source| VmError::Io {
        action: "write",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The initramfs's `/init`: mounts, then hands over to the guest script on the host's root.
/// Any failure is printed and powers the guest off, so the host never waits for a hung init.
fn init_script(kernel: &Kernel, out_dir: &Path, script: &Path, host_paths: &[PathBuf]) -> String {
    let out = out_dir.display();
    // A workspace under /tmp (a CI clone, say) would vanish under the guest's tmpfs: the
    // host's /tmp stays reachable under /run and those paths are bound back.
    let mut under_tmp: Vec<String> = host_paths
        .iter()
        .chain([&out_dir.to_path_buf()])
        .filter_map(|p| p.strip_prefix("/tmp").ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(|rel| rel.display().to_string())
        .collect();
    under_tmp.sort();
    under_tmp.dedup();
    let binds: String = under_tmp
        .iter()
        .map(|rel| {
            format!(
                "$B mkdir -p \"/newroot/tmp/{rel}\" && $B mount --bind \"/newroot/run/lbx-host-tmp/{rel}\" \"/newroot/tmp/{rel}\" \\\n    || fail \"binding the host's /tmp/{rel}\"\n"
            )
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
echo "{INITRAMFS_MARKER} ({release})"
fail() {{ echo "lbx-vm: FAILED in the initramfs: $*"; $B poweroff -f; }}
if $B grep -qw lbx.probe /proc/cmdline; then $B poweroff -f; fi
for m in /modules/*.ko; do $B insmod "$m" || fail "insmod $m"; done
$B mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize={MSIZE},cache=loose hostroot /newroot \
    || fail "mounting the host's root over 9p"
$B mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs on /run"
$B mkdir /newroot/run/lbx-host-tmp && $B mount --bind /newroot/tmp /newroot/run/lbx-host-tmp \
    || fail "keeping the host's /tmp reachable"
$B mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || fail "tmpfs on /tmp"
{binds}$B mount -t 9p -o rw,trans=virtio,version=9p2000.L,msize={MSIZE} lbxout "/newroot{out}" \
    || fail "mounting the output directory {out}"
$B umount /proc /sys
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /bin/sh "{script}"
"#,
        release = kernel.release,
        script = script.display(),
        binds = binds,
    )
}

/// The `.ko` files (in load order) for [`ROOT_MODULES`], from kmod's
/// `modprobe --show-depends` over the unpacked tree; built-in ones are left out.
fn root_modules(kernel: &Kernel) -> Result<Vec<PathBuf>, VmError> {
    let tree = kernel
        .modules
        .ancestors()
        .nth(3)
        .expect("modules lives at <tree>/lib/modules/<release>");
    let mut out: Vec<PathBuf> = Vec::new();
    for module in ROOT_MODULES {
        let res = Command::new("modprobe")
            .arg("-d")
            .arg(tree)
            .args(["-S", &kernel.release, "--show-depends", module])
            .output()
            .map_err(|e| VmError::Modules {
                release: kernel.release.clone(),
                detail: format!("running modprobe (apt-get install kmod): {e}"),
            })?;
        if !res.status.success() {
            return Err(VmError::Modules {
                release: kernel.release.clone(),
                detail: format!(
                    "`modprobe --show-depends {module}`: {}",
                    String::from_utf8_lossy(&res.stderr).trim()
                ),
            });
        }
        for line in String::from_utf8_lossy(&res.stdout).lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.split_whitespace().next().unwrap_or_default());
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
    }
    Ok(out)
}

/// A module's bytes, decompressed: busybox's insmod takes plain ELF.
fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).map_err(|e| format!("reading {}: {e}", path.display())),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("running `{tool} -dc {}`: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{tool} -dc {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// A `newc` cpio archive, what the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), body);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// The qemu command line for `spec` (without the netns wrapper).
fn qemu_args(spec: &VmSpec, initramfs: &Path, probe: bool) -> Vec<String> {
    let accel = match spec.accel {
        Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
        Accel::Tcg => vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "max".into(),
        ],
    };
    let mut append = "console=ttyS0 panic=-1 quiet".to_string();
    if probe {
        append.push_str(" lbx.probe");
    }
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-machine",
        "q35",
    ]
    .map(String::from)
    .to_vec();
    args.extend(accel);
    args.extend([
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-kernel".into(),
        spec.kernel.image.display().to_string(),
        "-initrd".into(),
        initramfs.display().to_string(),
        "-append".into(),
        append,
        "-virtfs".into(),
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap".into(),
        "-virtfs".into(),
        format!(
            "local,path={},mount_tag=lbxout,security_model=none",
            spec.out_dir.display()
        ),
    ]);
    if let Some(nic) = &spec.nic {
        args.extend([
            "-netdev".into(),
            format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off,queues={}",
                nic.tap, nic.queues
            ),
            "-device".into(),
            // Guest offloads off: native XDP on virtio_net needs the host to hand over
            // complete frames with full checksums (no GRO_HW, no CHECKSUM_PARTIAL).
            format!(
                "virtio-net-pci,netdev=n0,mac={},mq=on,vectors={},guest_tso4=off,\
                 guest_tso6=off,guest_ecn=off,guest_ufo=off,guest_csum=off",
                nic.mac,
                2 * nic.queues + 2
            ),
        ]);
    }
    args
}

/// Whether KVM boots `kernel` here: a probe guest under KVM must reach the initramfs within
/// [`KVM_PROBE_TIMEOUT`]. Err says why not (this machine's PVM-based KVM cannot boot stock
/// kernels: the guest hangs before printing anything).
pub fn probe_kvm(kernel: &Kernel, dir: &Path) -> Result<Duration, String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let spec = VmSpec {
        kernel: kernel.clone(),
        accel: Accel::Kvm,
        out_dir: dir.to_owned(),
        guest_script: dir.join("guest.sh"),
        nic: None,
        host_paths: Vec::new(),
        memory_mib: 512,
        cpus: 1,
        timeout: KVM_PROBE_TIMEOUT,
    };
    let initramfs = build_initramfs(&spec).map_err(|e| e.to_string())?;
    let mut seen = false;
    let outcome = run_qemu(&spec, &initramfs, true, "kvm-probe", &mut |line: &str| {
        seen |= line.contains(INITRAMFS_MARKER);
    });
    match outcome {
        Ok(o) if seen && o.status.success() => Ok(o.elapsed),
        Ok(o) => Err(format!(
            "the KVM guest exited ({}) without reaching the initramfs: {}",
            o.status,
            o.qemu_stderr.trim()
        )),
        Err(VmError::Timeout { .. }) => Err(format!(
            "the KVM guest printed nothing in {}s (this host's KVM cannot boot the kernel)",
            KVM_PROBE_TIMEOUT.as_secs()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Boots `spec`, streaming the console (each line prefixed with `[label]`, also saved to
/// `out_dir/console.log`) and handing every line to `on_line`.
pub fn run(spec: &VmSpec, on_line: &mut dyn FnMut(&str)) -> Result<VmOutcome, VmError> {
    let initramfs = build_initramfs(spec)?;
    run_qemu(spec, &initramfs, false, spec.kernel.spec.label, on_line)
}

fn run_qemu(
    spec: &VmSpec,
    initramfs: &Path,
    probe: bool,
    label: &str,
    on_line: &mut dyn FnMut(&str),
) -> Result<VmOutcome, VmError> {
    let mut command = match &spec.nic {
        Some(nic) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &nic.netns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    command
        .args(qemu_args(spec, initramfs, probe))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // qemu dies with us, also when we are killed without a chance to clean up.
    // SAFETY: prctl is async-signal-safe; the closure touches no shared state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let described = crate::cmd::describe(&command);
    if !probe {
        println!("[{label}] {described}");
    }
    let log_path = spec.out_dir.join(if probe {
        "kvm-probe.log"
    } else {
        "console.log"
    });
    let mut log = fs::File::create(&log_path).map_err(|source| VmError::Io {
        action: "create",
        path: log_path.clone(),
        source,
    })?;
    let started = Instant::now();
    // `ip netns exec` execs qemu: this pid is qemu's.
    let mut guard = KillOnDrop(Some(command.spawn().map_err(|source| VmError::Spawn {
        command: described,
        source,
    })?));
    let stdout = guard.child().stdout.take().expect("piped");
    let mut stderr = guard.child().stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = started + spec.timeout;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                if !probe {
                    println!("[{label}] {line}");
                }
                on_line(&line);
                tail.push_back(line);
                if tail.len() > 40 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let pid = guard.child().id();
                drop(guard);
                let _ = reader.join();
                return Err(VmError::Timeout {
                    label: label.into(),
                    accel: spec.accel,
                    timeout: spec.timeout,
                    pid,
                    tail: Vec::from(tail).join("\n"),
                });
            }
        }
    }
    let _ = reader.join();
    // stdout closed: qemu is exiting; give it what is left of the deadline.
    let status = loop {
        if let Some(status) = guard.child().try_wait().ok().flatten() {
            break status;
        }
        if Instant::now() >= deadline {
            let pid = guard.child().id();
            drop(guard);
            return Err(VmError::Timeout {
                label: label.into(),
                accel: spec.accel,
                timeout: spec.timeout,
                pid,
                tail: Vec::from(tail).join("\n"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    guard.0 = None;
    let qemu_stderr = err_reader.join().unwrap_or_default();
    Ok(VmOutcome {
        status,
        elapsed: started.elapsed(),
        qemu_stderr,
    })
}

/// Kills the qemu it holds (by its PID) when dropped, e.g. on a timeout or a panic.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("the child is held until the guard is released")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_under_tmp_are_bound_back() {
        let kernel = Kernel {
            spec: crate::kernels::MATRIX[0],
            package: "linux-image-6.1.0-57-amd64".into(),
            version: "6.1.192-3".into(),
            release: "6.1.0-57-amd64".into(),
            image: "/cache/vmlinux".into(),
            modules: "/cache/tree/lib/modules/6.1.0-57-amd64".into(),
        };
        let out = Path::new("/tmp/ci/target/lbx-kernels/6.1");
        let script = init_script(
            &kernel,
            out,
            &out.join("guest.sh"),
            &[PathBuf::from("/tmp/ci"), PathBuf::from("/root/.cache/lbx")],
        );
        let keep = script
            .find("--bind /newroot/tmp /newroot/run/lbx-host-tmp")
            .unwrap();
        let tmpfs = script.find("tmpfs /newroot/tmp").unwrap();
        let bind = script
            .find("mount --bind \"/newroot/run/lbx-host-tmp/ci\" \"/newroot/tmp/ci\"")
            .unwrap();
        let out_mount = script.find("lbxout").unwrap();
        assert!(keep < tmpfs && tmpfs < bind && bind < out_mount, "{script}");
        assert!(!script.contains("/newroot/tmp/root"), "{script}");
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("dev");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // name "dev" right after the 110-byte header.
        assert_eq!(&out[110..114], b"dev\0");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file entry's mode field: regular file, 0755.
        let init_hdr = text
            .find("070701")
            .map(|_| text.match_indices("070701").nth(1).unwrap().0);
        let hdr = &text[init_hdr.unwrap()..];
        assert_eq!(&hdr[14..22], "000081ed");
    }
}
