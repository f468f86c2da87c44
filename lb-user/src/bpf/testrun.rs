//! BPF_PROG_TEST_RUN: running a loaded program on a packet in the kernel, once (fixtures,
//! the explain sandbox) or many times (the benchmark).

use std::time::Duration;

use aya::programs::{ProgramError, TestRun, TestRunOptions, TestRunResult};

/// Room for what a program may add in front of or behind the packet (encapsulation).
const HEADROOM: usize = 256;

/// Runs `prog` once on `packet`: the verdict and the packet as the program left it.
pub fn run_once<P>(prog: &mut P, packet: &[u8]) -> Result<(u32, Vec<u8>), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + HEADROOM];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    let res = prog.test_run(opts)?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}

/// Runs `prog` `repeat` times on `packet` in the kernel: the last verdict and the kernel's
/// average duration per run (the benchmark's unit).
pub fn run_repeated<P>(
    prog: &mut P,
    packet: &[u8],
    repeat: u32,
) -> Result<(u32, Duration), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + HEADROOM];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let res = prog.test_run(opts)?;
    Ok((res.return_value, res.duration))
}
