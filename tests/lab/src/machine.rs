//! The whole machine as the lab measures it: busy CPU time, a quiet machine before each
//! load, and BPF run-time statistics.

use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};

use crate::interrupt::sleep;

/// bpf(BPF_ENABLE_STATS, BPF_STATS_RUN_TIME): run-time statistics stay on while the fd is
/// open and go off when it closes (also when this process dies), unlike the sysctl.
pub(crate) fn enable_bpf_stats() -> std::io::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr = [0u32; 32]; // enable_stats.type = BPF_STATS_RUN_TIME (0); the rest zero
                           // SAFETY: bpf(2) with a zeroed attribute buffer of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A load starts when the machine was at most this busy (fraction of all cores) over the
/// last [`QUIET_WINDOW`]...
pub(crate) const QUIET_BUSY: f64 = 0.5;
pub(crate) const QUIET_WINDOW: Duration = Duration::from_millis(500);
/// ... or after this long regardless (the note in the report says how long each waited).
pub(crate) const QUIET_MAX: Duration = Duration::from_secs(15);

/// Waits until the machine is quiet (see [`QUIET_BUSY`]): the kube-proxies and agents are
/// done with what the last change made them do. Returns how long it waited.
pub(crate) fn wait_quiet() -> Result<Duration> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let started = Instant::now();
    loop {
        let b0 = cpu_busy_s()?;
        sleep(QUIET_WINDOW)?;
        let busy = (cpu_busy_s()? - b0) / QUIET_WINDOW.as_secs_f64() / cores;
        if busy <= QUIET_BUSY || started.elapsed() >= QUIET_MAX {
            return Ok(started.elapsed());
        }
    }
}

/// Busy CPU time of the whole machine (user, nice, system, irq, softirq, steal) in seconds.
pub(crate) fn cpu_busy_s() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() >= 8, "short cpu line in /proc/stat: {line:?}");
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / hz)
}
