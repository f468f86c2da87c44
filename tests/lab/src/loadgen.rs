//! The side-by-side lab's load generator: closed-loop HTTP/1.1 clients against
//! `lbx-podserver` pods behind a load balancer. It records throughput, latency, which pod
//! served each request and which client address that pod saw; [`probe_hops`] measures how
//! many routers a path crosses.
//!
//! Everything runs in the network namespace of the calling thread: the lab `setns()`es that
//! thread into its client namespace first, and the threads spawned here inherit it. This
//! module never touches namespaces.
//!
//! [`Mode::NewConnection`] opens one connection per request and closes it normally, so every
//! request leaves a client socket in TIME_WAIT. At lab rates that would use up the ephemeral
//! ports within seconds; the caller sets `net.ipv4.tcp_tw_reuse=1` and a wide
//! `net.ipv4.ip_local_port_range` in the client namespace, and this module relies on that.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How many distinct error messages a result keeps.
const MAX_FIRST_ERRORS: usize = 5;
/// An answer whose headers exceed this is a bad answer, not something to buffer.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// A pod's body is one short line; anything longer is a bad answer.
const MAX_BODY_BYTES: usize = 4096;

/// How the clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each client keeps one connection open and sends request after request on it; a failed
    /// connection is reopened (and counted as an error).
    KeepAlive,
    /// Every request opens its own connection (`Connection: close`), so the load balancer
    /// sees a new flow per request.
    NewConnection,
}

/// What load to offer.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Requests are spread round-robin over these: per request in [`Mode::NewConnection`],
    /// per connection in [`Mode::KeepAlive`] (connection `i` uses `targets[i % len]`).
    pub targets: Vec<SocketAddrV4>,
    pub mode: Mode,
    /// Concurrent client threads, each with one connection at a time.
    pub connections: usize,
    /// Requests that start during warm-up are not recorded.
    pub warmup: Duration,
    /// The measured period, right after warm-up.
    pub duration: Duration,
    /// Limit per connect and per request read or write.
    pub timeout: Duration,
    /// The client addresses to connect from (the namespace's own): `targets[i]` is reached
    /// from `sources[i % len]`; empty lets the kernel choose. Lets each measured path (and
    /// each frontend of one) use its own address, so no TCP tuple is shared between them.
    pub sources: Vec<Ipv4Addr>,
}

impl LoadSpec {
    /// The source for `targets[i]` (None: the kernel's choice).
    fn source_for(&self, i: usize) -> Option<Ipv4Addr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

/// What a run measured. Only requests that started inside the measured period count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadResult {
    /// Successful measured requests.
    pub requests: u64,
    /// Failed measured requests: connect refused or timed out, I/O error, bad answer.
    pub errors: u64,
    /// Up to 5 distinct error messages, each naming its target.
    pub first_errors: Vec<String>,
    /// The measured period. Requests count by start time, so `requests / elapsed` is the rate.
    pub elapsed: Duration,
    /// Sorted ascending, one per successful measured request.
    pub latencies_us: Vec<u32>,
    /// Pod name -> requests it served.
    pub served_by: BTreeMap<String, u64>,
    /// (pod, target IP the request was sent to, client IP the pod saw) -> requests.
    pub client_seen: BTreeMap<(String, Ipv4Addr, Ipv4Addr), u64>,
    /// Requests answered outside the measured period (the warm-up, and the ones that
    /// started before it ended): machine-wide counters sampled around [`run`] include
    /// them, so per-request costs divide by `requests + warmup_requests`.
    pub warmup_requests: u64,
}

impl LoadResult {
    /// Successful requests per second of the measured period.
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// The nearest-rank `p`th percentile (`p` in 0..=100) of the latencies in µs; 0.0 when
    /// there are none.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let n = self.latencies_us.len();
        if n == 0 {
            return 0.0;
        }
        let rank = (p.clamp(0.0, 100.0) / 100.0 * n as f64).ceil() as usize;
        f64::from(self.latencies_us[rank.clamp(1, n) - 1])
    }

    /// At most `points` pairs (latency µs, fraction of requests at or below it), ascending
    /// in both and always ending with the maximum at 1.0; empty when there are no samples.
    pub fn cdf(&self, points: usize) -> Vec<(f64, f64)> {
        let lat = &self.latencies_us;
        let (n, k) = (lat.len(), points.min(lat.len()));
        let mut out: Vec<(f64, f64)> = Vec::with_capacity(k);
        for j in 1..=k {
            let v = lat[(j * n).div_ceil(k) - 1];
            let at_or_below = lat.partition_point(|&x| x <= v);
            if out.last().is_none_or(|last| last.0 < f64::from(v)) {
                out.push((f64::from(v), at_or_below as f64 / n as f64));
            }
        }
        out
    }
}

/// Why a run or probe gave no usable result.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the load spec has no targets: put at least one address in LoadSpec::targets")]
    NoTargets,
    #[error("the load spec asks for 0 connections: set LoadSpec::connections to 1 or more")]
    NoConnections,
    #[error("{field} is zero: give it a positive duration")]
    ZeroDuration { field: &'static str },
    #[error("HopProbe::{field} is 0: probe at least one TTL, with at least one round of one try, for at least one pod")]
    EmptyProbe { field: &'static str },
    #[error("could not start client thread {index}: {source}; lower the connection count or raise the thread limit")]
    Spawn {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("client thread {index} panicked ({message}); that is a loadgen bug: fix it, the run's numbers are incomplete")]
    Panicked { index: usize, message: String },
    #[error("all {errors} measured requests failed; first errors: {}; check that the pods listen on the targets and that the client namespace routes to them", .first_errors.join("; "))]
    AllFailed {
        errors: u64,
        first_errors: Vec<String>,
    },
    #[error("no request started in the measured period: every client was still busy with a warm-up request; lengthen the duration or shorten the timeout")]
    NoRequests,
    #[error("no pod answered {target} at any TTL up to {max_ttl}; first errors: {}; check the target with a plain request, or raise max_ttl or the timeout", .first_errors.join("; "))]
    NoHopAnswer {
        target: SocketAddrV4,
        max_ttl: u8,
        first_errors: Vec<String>,
    },
}

/// Offers the load `spec` describes and returns what was measured.
///
/// Errors: an invalid spec, a client thread that could not start or panicked (all threads
/// are joined first), [`LoadError::AllFailed`] when no measured request succeeded, and
/// [`LoadError::NoRequests`] when none was even measured. If only some requests fail, the
/// result is `Ok` with `errors > 0` and `first_errors` naming the failing targets.
pub fn run(spec: &LoadSpec) -> Result<LoadResult, LoadError> {
    if spec.targets.is_empty() {
        return Err(LoadError::NoTargets);
    }
    if spec.connections == 0 {
        return Err(LoadError::NoConnections);
    }
    for (field, d) in [
        ("LoadSpec::duration", spec.duration),
        ("LoadSpec::timeout", spec.timeout),
    ] {
        if d.is_zero() {
            return Err(LoadError::ZeroDuration { field });
        }
    }
    let start = Instant::now();
    let shared = Shared {
        spec,
        from: start + spec.warmup,
        until: start + spec.warmup + spec.duration,
        next_target: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    let tallies = run_threads(spec.connections, "loadgen", &shared.stop, |i| {
        client_thread(i, &shared)
    })?;
    let mut total = Tally::default();
    tallies.into_iter().for_each(|t| total.merge(t));
    total.latencies_us.sort_unstable();
    let result = LoadResult {
        requests: total.latencies_us.len() as u64,
        errors: total.errors,
        first_errors: total.first_errors,
        elapsed: spec.duration,
        latencies_us: total.latencies_us,
        served_by: total.served_by,
        client_seen: total.client_seen,
        warmup_requests: total.unmeasured,
    };
    match (result.requests, result.errors) {
        (0, 0) => Err(LoadError::NoRequests),
        (0, errors) => Err(LoadError::AllFailed {
            errors,
            first_errors: result.first_errors,
        }),
        _ => Ok(result),
    }
}

/// A TTL probe of the path to `target`.
#[derive(Debug, Clone)]
pub struct HopProbe {
    pub target: SocketAddrV4,
    /// TTLs 1..=max_ttl are tried.
    pub max_ttl: u8,
    /// Parallel connections per round.
    pub tries: usize,
    /// Rounds per TTL while some expected pod has not answered yet. The load balancer picks a
    /// pod per connection, so a TTL's connections can miss a pod that TTL would reach; the pod
    /// would then be counted one hop too far. A pod picked with share s is missed at its
    /// smallest TTL with probability (1 - s)^(tries * rounds).
    pub rounds: usize,
    /// Pods that stand behind `target`: the probe ends once this many have answered.
    pub pods: usize,
    /// Per connect and per request I/O.
    pub timeout: Duration,
    /// The client address to connect from; None lets the kernel choose.
    pub source: Option<Ipv4Addr>,
}

/// For each pod that answered: the smallest IP TTL with which a connection to `target`
/// reached it and got an answer (so routers between = ttl - 1).
///
/// The TTL is set on the socket before connect, so every packet of the connection carries
/// it. A connection whose packets die in transit times out or gets an ICMP error: either
/// means "not reached at this TTL". Each TTL in 1..=max_ttl gets `rounds` rounds of `tries`
/// parallel connections until `pods` pods have answered; [`LoadError::NoHopAnswer`] when no
/// pod ever answered.
pub fn probe_hops(p: &HopProbe) -> Result<BTreeMap<String, u8>, LoadError> {
    for (field, n) in [
        ("max_ttl", usize::from(p.max_ttl)),
        ("tries", p.tries),
        ("rounds", p.rounds),
        ("pods", p.pods),
    ] {
        if n == 0 {
            return Err(LoadError::EmptyProbe { field });
        }
    }
    if p.timeout.is_zero() {
        return Err(LoadError::ZeroDuration {
            field: "HopProbe::timeout",
        });
    }
    let mut hops = BTreeMap::new();
    let mut first_errors = Vec::new();
    let no_stop = AtomicBool::new(false);
    'ttls: for ttl in 1..=p.max_ttl {
        for _ in 0..p.rounds {
            if hops.len() >= p.pods {
                break 'ttls;
            }
            let answers = run_threads(p.tries, "hop-probe", &no_stop, |_| {
                let stream = connect(p.target, p.source, Some(ttl), p.timeout)
                    .map_err(|e| format!("connect to {}: {}", p.target, io_msg(&e, p.timeout)))?;
                Ok::<_, String>(Conn::new(stream, p.target, p.timeout)?.request(true)?.pod)
            })?;
            for answer in answers {
                match answer {
                    // TTLs ascend: the first TTL that reached a pod is its smallest.
                    Ok(pod) => {
                        hops.entry(pod).or_insert(ttl);
                    }
                    Err(e) => note_error(&mut first_errors, format!("ttl {ttl}: {e}")),
                }
            }
        }
    }
    if hops.is_empty() {
        return Err(LoadError::NoHopAnswer {
            target: p.target,
            max_ttl: p.max_ttl,
            first_errors,
        });
    }
    Ok(hops)
}

/// What every client thread of one run shares.
struct Shared<'a> {
    spec: &'a LoadSpec,
    /// The measured period: requests starting in `from..until` are recorded.
    from: Instant,
    until: Instant,
    /// Round-robin position for [`Mode::NewConnection`].
    next_target: AtomicUsize,
    /// Set when the run is abandoned (a thread failed to start or panicked).
    stop: AtomicBool,
}

/// What one client thread measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_errors: Vec<String>,
    served_by: BTreeMap<String, u64>,
    client_seen: BTreeMap<(String, Ipv4Addr, Ipv4Addr), u64>,
    /// Successful requests outside the measured period.
    unmeasured: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.unmeasured += other.unmeasured;
        other
            .first_errors
            .into_iter()
            .for_each(|e| note_error(&mut self.first_errors, e));
        for (pod, n) in other.served_by {
            *self.served_by.entry(pod).or_default() += n;
        }
        for (key, n) in other.client_seen {
            *self.client_seen.entry(key).or_default() += n;
        }
    }
}

fn note_error(list: &mut Vec<String>, msg: String) {
    if list.len() < MAX_FIRST_ERRORS && !list.contains(&msg) {
        list.push(msg);
    }
}

/// One closed-loop client: issues requests until the measured period ends.
fn client_thread(index: usize, sh: &Shared) -> Tally {
    let spec = sh.spec;
    let keep_alive = spec.mode == Mode::KeepAlive;
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < sh.until {
        let ti = match spec.mode {
            Mode::KeepAlive => index % spec.targets.len(),
            Mode::NewConnection => {
                sh.next_target.fetch_add(1, Ordering::Relaxed) % spec.targets.len()
            }
        };
        let target = spec.targets[ti];
        // NewConnection times connect + request; KeepAlive only the request.
        let mut start = Instant::now();
        let result = match conn.as_mut() {
            Some(c) => c.request(keep_alive),
            None => Conn::open(target, spec.source_for(ti), spec.timeout).and_then(|c| {
                if keep_alive {
                    start = Instant::now();
                }
                conn.insert(c).request(keep_alive)
            }),
        };
        let latency = start.elapsed();
        if !matches!(&result, Ok(a) if keep_alive && !a.server_closes) {
            conn = None;
        }
        if start < sh.from || start >= sh.until {
            tally.unmeasured += u64::from(result.is_ok());
            continue;
        }
        match result {
            Ok(a) => {
                tally
                    .latencies_us
                    .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                *tally.served_by.entry(a.pod.clone()).or_default() += 1;
                *tally
                    .client_seen
                    .entry((a.pod, *target.ip(), a.client))
                    .or_default() += 1;
            }
            Err(e) => {
                tally.errors += 1;
                note_error(&mut tally.first_errors, e);
            }
        }
    }
    tally
}

/// Runs `work(0..n)` on `n` scoped threads and joins them all. A thread that cannot start
/// or panics sets `stop` (so the others can wind down) and becomes the error.
fn run_threads<T: Send>(
    n: usize,
    name: &str,
    stop: &AtomicBool,
    work: impl Fn(usize) -> T + Sync,
) -> Result<Vec<T>, LoadError> {
    thread::scope(|s| {
        let work = &work;
        let mut handles = Vec::with_capacity(n);
        let mut failure = None;
        for index in 0..n {
            let spawned = thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn_scoped(s, move || work(index));
            match spawned {
                Ok(h) => handles.push(h),
                Err(source) => {
                    stop.store(true, Ordering::Relaxed);
                    failure = Some(LoadError::Spawn { index, source });
                    break;
                }
            }
        }
        let mut out = Vec::with_capacity(handles.len());
        for (index, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(t) => out.push(t),
                Err(payload) => {
                    stop.store(true, Ordering::Relaxed);
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".into());
                    failure.get_or_insert(LoadError::Panicked { index, message });
                }
            }
        }
        failure.map_or(Ok(out), Err)
    })
}

/// A pod's answer.
struct Answer {
    pod: String,
    /// The client IP the pod saw.
    client: Ipv4Addr,
    /// The pod said `Connection: close`.
    server_closes: bool,
}

/// One client connection; errors are messages naming the target.
struct Conn {
    reader: BufReader<TcpStream>,
    target: SocketAddrV4,
    timeout: Duration,
}

impl Conn {
    fn open(
        target: SocketAddrV4,
        source: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let stream = connect(target, source, None, timeout)
            .map_err(|e| format!("connect to {target}: {}", io_msg(&e, timeout)))?;
        Self::new(stream, target, timeout)
    }

    fn new(stream: TcpStream, target: SocketAddrV4, timeout: Duration) -> Result<Self, String> {
        let setup = |e: io::Error| format!("socket options for {target}: {e}");
        stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        stream.set_write_timeout(Some(timeout)).map_err(setup)?;
        stream.set_nodelay(true).map_err(setup)?;
        Ok(Conn {
            reader: BufReader::new(stream),
            target,
            timeout,
        })
    }

    /// One `GET /`, read up to the end of the body.
    fn request(&mut self, keep_alive: bool) -> Result<Answer, String> {
        let (target, timeout) = (self.target, self.timeout);
        let io_err = |e: io::Error| format!("request to {target}: {}", io_msg(&e, timeout));
        let bad = |detail: &str| format!("bad answer from {target}: {detail}");
        let conn = if keep_alive { "keep-alive" } else { "close" };
        let req = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: {conn}\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(io_err)?;
        let (mut header_bytes, mut content_length, mut server_closes) = (0, None, !keep_alive);
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(io_err)?;
            if n == 0 {
                return Err(bad("connection closed before the end of the headers"));
            }
            let first = header_bytes == 0;
            header_bytes += n;
            if header_bytes > MAX_HEADER_BYTES {
                return Err(bad("headers too long"));
            }
            let l = line.trim_end();
            if first {
                if !l.starts_with("HTTP/1.1 200 ") {
                    return Err(bad(&format!("status line {l:?}, expected HTTP/1.1 200")));
                }
            } else if l.is_empty() {
                break;
            } else if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("connection") {
                    server_closes |= v.trim().eq_ignore_ascii_case("close");
                }
            }
        }
        let len = content_length.ok_or_else(|| bad("no valid Content-Length"))?;
        if len > MAX_BODY_BYTES {
            return Err(bad(&format!("body of {len} bytes, a pod sends one line")));
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).map_err(io_err)?;
        let (pod, client) = parse_body(&String::from_utf8_lossy(&body)).map_err(|e| bad(&e))?;
        Ok(Answer {
            pod,
            client,
            server_closes,
        })
    }
}

/// `pod=NAME client=IP:PORT` (other fields, such as a UDP answer's `ttl=`, are ignored).
fn parse_body(body: &str) -> Result<(String, Ipv4Addr), String> {
    let (mut pod, mut client) = (None, None);
    for field in body.split_whitespace() {
        match field.split_once('=') {
            Some(("pod", v)) if !v.is_empty() => pod = Some(v.to_string()),
            Some(("client", v)) => {
                let addr = v.parse::<SocketAddrV4>();
                client = Some(*addr.map_err(|e| format!("client={v}: {e}"))?.ip());
            }
            _ => {}
        }
    }
    match (pod, client) {
        (Some(pod), Some(client)) => Ok((pod, client)),
        _ => Err(format!("body {body:?} lacks pod= or client=")),
    }
}

/// Timeouts read as such, not as "Resource temporarily unavailable".
fn io_msg(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out after {timeout:?}")
        }
        _ => e.to_string(),
    }
}

/// A TCP connection from `source` (if given; the port is still the kernel's, chosen at
/// connect time with IP_BIND_ADDRESS_NO_PORT so ports are shared across destinations) whose
/// packets carry IP TTL `ttl` (if given; set before the SYN is sent).
fn connect(
    target: SocketAddrV4,
    source: Option<Ipv4Addr>,
    ttl: Option<u8>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain syscall; the fd is owned (and closed on every path) right away.
    let fd = unsafe { libc::socket(libc::AF_INET, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(ttl) = ttl {
        set_int_opt(&sock, libc::IP_TTL, libc::c_int::from(ttl))?;
    }
    if let Some(src) = source {
        set_int_opt(&sock, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        let local = sockaddr(SocketAddrV4::new(src, 0));
        // SAFETY: local is a valid sockaddr_in of the length passed.
        let rc = unsafe {
            libc::bind(
                fd,
                &local as *const libc::sockaddr_in as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let addr = sockaddr(target);
    // SAFETY: addr is a valid sockaddr_in of the length passed.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        wait_connected(&sock, timeout)?;
    }
    let stream = TcpStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An IPPROTO_IP integer socket option.
fn set_int_opt(sock: &OwnedFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for a non-blocking connect to finish; its outcome is SO_ERROR.
fn wait_connected(sock: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => {}
            _ => break,
        }
    }
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, a c_int out-value and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match err {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;

    const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// An in-process pod on 127.0.0.1 that answers exactly like `lbx-podserver`.
    struct TestPod {
        addr: SocketAddrV4,
        stop: Arc<AtomicBool>,
        /// Connections accepted (the wake-up connection of Drop not counted).
        accepted: Arc<AtomicUsize>,
        accept: Option<thread::JoinHandle<()>>,
    }

    impl TestPod {
        fn start(name: &str) -> Self {
            let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind 127.0.0.1:0");
            let addr = v4(listener.local_addr().unwrap());
            let stop = Arc::new(AtomicBool::new(false));
            let accepted = Arc::new(AtomicUsize::new(0));
            let (flag, count, name) = (stop.clone(), accepted.clone(), name.to_string());
            let accept = thread::spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = conn {
                        count.fetch_add(1, Ordering::SeqCst);
                        let name = name.clone();
                        thread::spawn(move || serve(stream, &name));
                    }
                }
            });
            TestPod {
                addr,
                stop,
                accepted,
                accept: Some(accept),
            }
        }
    }

    impl Drop for TestPod {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wakes accept()
            if let Some(h) = self.accept.take() {
                let _ = h.join();
            }
        }
    }

    fn serve(stream: TcpStream, name: &str) -> io::Result<()> {
        let body = format!("pod={name} client={}\n", stream.peer_addr()?);
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream);
        loop {
            let mut close = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    close |= k.eq_ignore_ascii_case("connection")
                        && v.trim().eq_ignore_ascii_case("close");
                }
            }
            let conn = if close { "close" } else { "keep-alive" };
            let msg = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
                body.len()
            );
            reader.get_mut().write_all(msg.as_bytes())?;
            if close {
                return Ok(());
            }
        }
    }

    fn v4(addr: SocketAddr) -> SocketAddrV4 {
        match addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("expected IPv4, got {a}"),
        }
    }

    /// A loopback port with no listener.
    fn dead_port() -> SocketAddrV4 {
        let l = TcpListener::bind((LOCALHOST, 0)).unwrap();
        v4(l.local_addr().unwrap())
    }

    fn spec(targets: Vec<SocketAddrV4>, mode: Mode) -> LoadSpec {
        LoadSpec {
            sources: Vec::new(),
            targets,
            mode,
            connections: 2,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            timeout: Duration::from_secs(1),
        }
    }

    /// Error-free result served by exactly `pods`, each seeing the loopback client.
    fn check_clean(r: &LoadResult, pods: &[&str]) {
        assert!(r.requests > 0, "{r:?}");
        assert_eq!(r.errors, 0, "{:?}", r.first_errors);
        assert_eq!(r.latencies_us.len() as u64, r.requests);
        assert!(r.latencies_us.is_sorted());
        let served: Vec<&str> = r.served_by.keys().map(String::as_str).collect();
        assert_eq!(served, pods);
        assert_eq!(r.served_by.values().sum::<u64>(), r.requests);
        for pod in pods {
            let key = (pod.to_string(), LOCALHOST, LOCALHOST);
            assert_eq!(r.client_seen.get(&key), r.served_by.get(*pod), "{key:?}");
        }
        let ps: Vec<f64> = [0.0, 50.0, 90.0, 99.0, 100.0]
            .iter()
            .map(|&p| r.percentile_us(p))
            .collect();
        assert!(ps.windows(2).all(|w| w[0] <= w[1]), "{ps:?}");
        assert_eq!(ps[4], f64::from(*r.latencies_us.last().unwrap()));
        assert_eq!(r.elapsed, Duration::from_millis(300));
        assert!(r.rps() > 0.0);
    }

    #[test]
    fn each_target_is_reached_from_its_own_source_address() {
        let (a, b) = (TestPod::start("pod-a"), TestPod::start("pod-b"));
        let sources = vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
        for mode in [Mode::KeepAlive, Mode::NewConnection] {
            let r = run(&LoadSpec {
                sources: sources.clone(),
                ..spec(vec![a.addr, b.addr], mode)
            })
            .unwrap();
            assert!(r.requests > 0 && r.errors == 0, "{:?}", r.first_errors);
            // (pod, target address, client address the pod saw): target i from sources[i].
            let seen: BTreeMap<&str, Ipv4Addr> =
                r.client_seen.keys().map(|k| (k.0.as_str(), k.2)).collect();
            assert_eq!(
                seen,
                BTreeMap::from([("pod-a", sources[0]), ("pod-b", sources[1])]),
                "{mode:?}: {:?}",
                r.client_seen
            );
        }
    }

    #[test]
    fn keep_alive_uses_one_target_per_connection() {
        let (a, b) = (TestPod::start("pod-a"), TestPod::start("pod-b"));
        let r = run(&spec(vec![a.addr, b.addr], Mode::KeepAlive)).unwrap();
        check_clean(&r, &["pod-a", "pod-b"]);
    }

    #[test]
    fn new_connection_spreads_requests_round_robin() {
        let (a, b) = (TestPod::start("pod-a"), TestPod::start("pod-b"));
        let r = run(&spec(vec![a.addr, b.addr], Mode::NewConnection)).unwrap();
        check_clean(&r, &["pod-a", "pod-b"]);
        let (na, nb) = (r.served_by["pod-a"], r.served_by["pod-b"]);
        assert!(na.abs_diff(nb) <= 5, "pod-a {na}, pod-b {nb}");
    }

    #[test]
    fn unreachable_target_fails_with_its_errors() {
        let dead = dead_port();
        match run(&spec(vec![dead], Mode::NewConnection)) {
            Err(LoadError::AllFailed {
                errors,
                first_errors,
            }) => {
                assert!(errors > 0);
                assert_eq!(first_errors.len(), 1, "distinct only: {first_errors:?}");
                assert!(first_errors[0].contains(&format!("connect to {dead}")));
                assert!(first_errors[0].contains("refused"), "{first_errors:?}");
            }
            other => panic!("expected AllFailed, got {other:?}"),
        }
    }

    #[test]
    fn partly_unreachable_targets_count_errors() {
        let (pod, dead) = (TestPod::start("pod-a"), dead_port());
        for mode in [Mode::NewConnection, Mode::KeepAlive] {
            let r = run(&spec(vec![pod.addr, dead], mode)).unwrap();
            assert!(r.requests > 0 && r.errors > 0, "{mode:?}: {r:?}");
            assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["pod-a"]);
            assert!(r.first_errors.iter().all(|e| e.contains(&dead.to_string())));
        }
    }

    #[test]
    fn silent_server_times_out() {
        // Listening (the kernel completes the handshake) but never answering.
        let silent = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let mut s = spec(vec![v4(silent.local_addr().unwrap())], Mode::KeepAlive);
        (s.warmup, s.timeout) = (Duration::ZERO, Duration::from_millis(100));
        match run(&s) {
            Err(LoadError::AllFailed { first_errors, .. }) => {
                assert!(
                    first_errors[0].contains("timed out after 100ms"),
                    "{first_errors:?}"
                )
            }
            other => panic!("expected AllFailed, got {other:?}"),
        }
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let pod = dead_port();
        let mut s = spec(vec![], Mode::KeepAlive);
        assert!(matches!(run(&s), Err(LoadError::NoTargets)));
        (s.targets, s.connections) = (vec![pod], 0);
        assert!(matches!(run(&s), Err(LoadError::NoConnections)));
        (s.connections, s.timeout) = (1, Duration::ZERO);
        assert!(matches!(run(&s), Err(LoadError::ZeroDuration { .. })));
    }

    #[test]
    fn panicking_thread_becomes_an_error() {
        let stop = AtomicBool::new(false);
        let r = run_threads(3, "t", &stop, |i| {
            assert_ne!(i, 1, "boom");
            i
        });
        match r {
            Err(LoadError::Panicked { index: 1, message }) => assert!(message.contains("boom")),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert!(stop.load(Ordering::Relaxed));
        assert_eq!(run_threads(3, "t", &stop, |i| i * 2).unwrap(), [0, 2, 4]);
    }

    #[test]
    fn percentiles_and_cdf() {
        let mut r = LoadResult {
            latencies_us: (1..=100).collect(),
            elapsed: Duration::from_secs(2),
            requests: 100,
            ..Default::default()
        };
        assert_eq!(r.rps(), 50.0);
        assert_eq!(r.percentile_us(0.0), 1.0);
        assert_eq!(r.percentile_us(50.0), 50.0);
        assert_eq!(r.percentile_us(99.0), 99.0);
        assert_eq!(r.percentile_us(99.5), 100.0);
        assert_eq!(r.percentile_us(100.0), 100.0);
        let cdf = r.cdf(10);
        assert_eq!(cdf.len(), 10);
        assert_eq!(cdf[0], (10.0, 0.1));
        assert_eq!(*cdf.last().unwrap(), (100.0, 1.0));
        assert!(cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        assert_eq!(r.cdf(1000).len(), 100);
        assert!(r.cdf(0).is_empty());

        r.latencies_us = vec![5, 5, 5, 7];
        assert_eq!(r.cdf(4), [(5.0, 0.75), (7.0, 1.0)]);
        assert_eq!(r.cdf(1), [(7.0, 1.0)]);

        r.latencies_us.clear();
        assert!(r.cdf(10).is_empty());
        assert_eq!(r.percentile_us(50.0), 0.0);
    }

    #[test]
    fn body_parsing() {
        assert_eq!(
            parse_body("pod=web-1 client=10.0.0.9:40000\n").unwrap(),
            ("web-1".to_string(), Ipv4Addr::new(10, 0, 0, 9))
        );
        assert!(parse_body("pod=web-1 client=10.0.0.9:40000 ttl=63").is_ok());
        assert!(parse_body("pod=web-1").is_err());
        assert!(parse_body("pod=web-1 client=nonsense").is_err());
    }

    #[test]
    fn loopback_is_reached_with_ttl_one() {
        let pod = TestPod::start("pod-a");
        let mut probe = HopProbe {
            source: None,
            target: pod.addr,
            max_ttl: 3,
            tries: 2,
            rounds: 3,
            pods: 1,
            timeout: Duration::from_secs(1),
        };
        let hops = probe_hops(&probe).unwrap();
        assert_eq!(hops, BTreeMap::from([("pod-a".to_string(), 1)]));
        // The one expected pod answered in the first round: nothing more was sent.
        assert_eq!(pod.accepted.load(Ordering::SeqCst), 2);

        // Expecting a second pod that never answers: every round of every TTL runs.
        probe.pods = 2;
        assert_eq!(probe_hops(&probe).unwrap(), hops);
        assert_eq!(pod.accepted.load(Ordering::SeqCst), 2 + 2 * 3 * 3);
    }

    #[test]
    fn probe_sockets_carry_the_ttl() {
        let pod = TestPod::start("pod-a");
        let stream = connect(pod.addr, None, Some(7), Duration::from_secs(1)).unwrap();
        assert_eq!(stream.ttl().unwrap(), 7);
        assert_eq!(v4(stream.peer_addr().unwrap()), pod.addr);
    }

    #[test]
    fn probe_without_answer_is_an_error() {
        let dead = dead_port();
        let probe = HopProbe {
            source: None,
            target: dead,
            max_ttl: 2,
            tries: 1,
            rounds: 1,
            pods: 1,
            timeout: Duration::from_millis(500),
        };
        match probe_hops(&probe) {
            Err(LoadError::NoHopAnswer { first_errors, .. }) => {
                assert_eq!(first_errors.len(), 2, "{first_errors:?}");
                assert!(first_errors[0].starts_with(&format!("ttl 1: connect to {dead}")));
            }
            other => panic!("expected NoHopAnswer, got {other:?}"),
        }
        for field in ["tries", "rounds", "pods"] {
            let mut empty = probe.clone();
            match field {
                "tries" => empty.tries = 0,
                "rounds" => empty.rounds = 0,
                _ => empty.pods = 0,
            }
            assert!(
                matches!(probe_hops(&empty), Err(LoadError::EmptyProbe { field: f }) if f == field),
                "{field}"
            );
        }
    }
}
