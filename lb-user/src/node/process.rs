//! The agent process: privileges it needs, and the stop signals it obeys.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::RunError;

/// How often the loop checks for a stop request while waiting.
const STOP_POLL: Duration = Duration::from_millis(50);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGTERM and SIGINT only set a flag: the loop notices it and shuts down cleanly.
pub fn install_signal_handlers() -> Result<(), RunError> {
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which
        // is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(RunError::Signal {
                signal: name,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleeps until `deadline`, returning early (true) when a stop was requested.
pub fn sleep_until(deadline: Instant) -> bool {
    loop {
        if stop_requested() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(STOP_POLL));
    }
}

// Preconditions

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether an effective capability set can load and attach the programs.
fn caps_sufficient(cap_eff: u64) -> bool {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
}

/// `CapEff` of /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

pub fn check_privileges() -> Result<(), RunError> {
    match effective_caps() {
        Some(caps) if !caps_sufficient(caps) => Err(RunError::NotPrivileged),
        // Unknown (no /proc): let the BPF syscalls speak for themselves.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_need_net_admin_and_bpf_or_sys_admin() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let root = parse_cap_eff(status).unwrap();
        assert!(caps_sufficient(root));
        assert!(!caps_sufficient(0));
        assert!(
            !caps_sufficient(1 << CAP_BPF),
            "CAP_BPF alone cannot attach"
        );
        assert!(caps_sufficient(1 << CAP_BPF | 1 << CAP_NET_ADMIN));
        assert!(caps_sufficient(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN));
        assert_eq!(parse_cap_eff("CapInh:\t0\n"), None);
    }

    #[test]
    fn stop_flag_cuts_sleep_short() {
        let start = Instant::now();
        assert!(!sleep_until(start + Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Only this test touches the flag.
        STOP.store(true, Ordering::SeqCst);
        let start = Instant::now();
        assert!(sleep_until(start + Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(1));
        STOP.store(false, Ordering::SeqCst);
    }
}
