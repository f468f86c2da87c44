//! The lab's pod server: answers every TCP request with an HTTP/1.1 200 whose body names the
//! pod and the client address it saw, and echoes the same for UDP datagrams (plus the TTL
//! they arrived with). That is how tests and the benchmark tell which backend served a flow,
//! whether the client IP survived, and how many hops a path took.
//!
//! `/bytes/N` (any method) appends N filler bytes to the answer, and a request may carry a
//! body (Content-Length): bulk transfers both ways for MTU and segmentation checks.
//!
//! Usage: lbx-podserver --name POD [--tcp PORT] [--udp PORT]
//! Prints `lbx-podserver ready name=POD tcp=PORT udp=PORT` once both sockets listen.
//! std only (a thread per connection): it must start fast and stay out of the measurements.

use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::exit;
use std::sync::Arc;

/// A peer that never finishes its headers gets dropped rather than growing memory forever.
const MAX_HEADERS: usize = 1 << 20;
/// The largest request body taken (Content-Length); a larger one drops the connection.
const MAX_BODY: usize = 64 << 20;

const USAGE: &str = "usage: lbx-podserver --name POD [--tcp PORT] [--udp PORT]";

struct Args {
    name: String,
    tcp: Option<u16>,
    udp: Option<u16>,
}

fn parse_args() -> Result<Args, String> {
    let mut name = None;
    let (mut tcp, mut udp) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let port = |v: String| v.parse::<u16>().map_err(|e| format!("bad port {v:?}: {e}"));
        match flag.as_str() {
            "--name" => name = Some(value()?),
            "--tcp" => tcp = Some(port(value()?)?),
            "--udp" => udp = Some(port(value()?)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0)
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let name = name.ok_or("--name is required")?;
    if tcp.is_none() && udp.is_none() {
        return Err("give --tcp PORT, --udp PORT or both".into());
    }
    Ok(Args { name, tcp, udp })
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("lbx-podserver: {e}\n{USAGE}");
        exit(2)
    });
    let name: Arc<str> = args.name.into();
    let fail = |what: &str, e: io::Error| -> ! {
        eprintln!("lbx-podserver: {what}: {e}");
        exit(1)
    };

    let tcp = args.tcp.map(|p| {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).unwrap_or_else(|e| fail("bind tcp", e))
    });
    let udp = args.udp.map(|p| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p)).unwrap_or_else(|e| fail("bind udp", e));
        enable_recvttl(&s).unwrap_or_else(|e| fail("setsockopt IP_RECVTTL", e));
        s
    });
    let port = |p: Option<u16>| p.map_or("-".to_string(), |p| p.to_string());
    let tcp_port = tcp
        .as_ref()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0));
    let udp_port = udp
        .as_ref()
        .map(|s| s.local_addr().map(|a| a.port()).unwrap_or(0));
    println!(
        "lbx-podserver ready name={name} tcp={} udp={}",
        port(tcp_port),
        port(udp_port)
    );
    let _ = io::stdout().flush();

    let udp_thread = udp.map(|sock| {
        let name = name.clone();
        std::thread::spawn(move || serve_udp(&sock, &name))
    });
    if let Some(listener) = tcp {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let name = name.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = serve_tcp(stream, &name) {
                            // Resets are normal under load tests; anything else is worth a line.
                            if e.kind() != io::ErrorKind::ConnectionReset {
                                eprintln!("lbx-podserver {name}: tcp: {e}");
                            }
                        }
                    });
                }
                Err(e) => eprintln!("lbx-podserver {name}: accept: {e}"),
            }
        }
    }
    if let Some(t) = udp_thread {
        let _ = t.join();
    }
}

fn body(name: &str, peer: SocketAddr, ttl: Option<i32>) -> String {
    match ttl {
        Some(ttl) => format!("pod={name} client={peer} ttl={ttl}\n"),
        None => format!("pod={name} client={peer}\n"),
    }
}

/// What the buffered bytes hold so far.
#[derive(Debug, PartialEq)]
enum Request {
    /// Not complete yet: read more.
    Partial,
    /// An HTTP request ending at byte `end` (headers plus Content-Length body); `fill`
    /// filler bytes follow the body line of the answer (`/bytes/N`).
    Http {
        end: usize,
        close: bool,
        head: bool,
        fill: usize,
    },
    /// Not HTTP: every read is one request.
    Raw,
    /// Headers longer than [`MAX_HEADERS`] or a body longer than [`MAX_BODY`]: dropped.
    TooLarge,
}

/// HTTP if it starts with an upper-case method token and a space ("GET ", "POST ", ...).
fn classify(buf: &[u8]) -> Request {
    let token_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token_len == 0 || (token_len < buf.len() && buf[token_len] != b' ') {
        return Request::Raw;
    }
    if token_len == buf.len() {
        return Request::Partial;
    }
    let Some(hdr_end) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        if buf.len() > MAX_HEADERS {
            return Request::TooLarge;
        }
        return Request::Partial;
    };
    let head = String::from_utf8_lossy(&buf[..hdr_end]);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let http10 = request_line.ends_with("HTTP/1.0");
    let mut content_length = 0usize;
    let mut conn_close = http10;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            content_length = v.parse().unwrap_or(0);
        } else if k.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                conn_close = true;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                conn_close = false;
            }
        }
    }
    if content_length > MAX_BODY {
        return Request::TooLarge;
    }
    let end = hdr_end + content_length;
    if buf.len() < end {
        return Request::Partial;
    }
    Request::Http {
        end,
        close: conn_close,
        head: request_line.starts_with("HEAD "),
        fill: fill_of(request_line),
    }
}

/// The most filler one answer carries.
const MAX_FILL: usize = 64 << 20;

/// `N` of a `/bytes/N` request target (capped at [`MAX_FILL`]), else 0.
fn fill_of(request_line: &str) -> usize {
    request_line
        .split(' ')
        .nth(1)
        .and_then(|target| target.strip_prefix("/bytes/"))
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.min(MAX_FILL))
}

/// Filler byte `i` of an answer: a pattern the client checks (`lb_tests::scenario::filler`
/// is the same; std only here).
fn filler(i: usize) -> u8 {
    (i % 251) as u8
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn respond(
    stream: &mut TcpStream,
    body: &str,
    close: bool,
    head: bool,
    fill: usize,
) -> io::Result<()> {
    let conn = if close { "close" } else { "keep-alive" };
    let mut msg = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
        body.len() + fill
    )
    .into_bytes();
    if !head {
        msg.extend_from_slice(body.as_bytes());
        msg.extend((0..fill).map(filler));
    }
    stream.write_all(&msg)
}

fn serve_tcp(mut stream: TcpStream, name: &str) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let body = body(name, peer, None);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            // EOF ends an unterminated request: answer it, then close.
            if !buf.is_empty() {
                respond(&mut stream, &body, true, false, 0)?;
            }
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match classify(&buf) {
                Request::TooLarge => return Ok(()),
                Request::Partial => break,
                Request::Raw => {
                    respond(&mut stream, &body, false, false, 0)?;
                    buf.clear();
                    break;
                }
                Request::Http {
                    end,
                    close,
                    head,
                    fill,
                } => {
                    respond(&mut stream, &body, close, head, fill)?;
                    if close {
                        return Ok(());
                    }
                    buf.drain(..end);
                    if buf.is_empty() {
                        break;
                    }
                }
            }
        }
    }
}

fn enable_recvttl(sock: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd and a c_int option value of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVTTL,
            &on as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// recvmsg(2) with the IP_TTL control message: (length, peer, ttl).
fn recv_with_ttl(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddrV4, Option<i32>)> {
    // SAFETY: all-zero is valid for these plain C structs.
    let mut from: libc::sockaddr_in = unsafe { zeroed() };
    let mut control = [0u64; 16]; // u64 for cmsghdr alignment
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the sizes recorded in it.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ttl = None;
    // SAFETY: walking the control buffer the kernel just filled, with the libc macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_TTL {
                ttl = Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg) as *const libc::c_int
                ));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let peer = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
        u16::from_be(from.sin_port),
    );
    Ok((n as usize, peer, ttl))
}

fn serve_udp(sock: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv_with_ttl(sock, &mut buf) {
            Ok((_, peer, ttl)) => {
                let reply = body(name, SocketAddr::V4(peer), ttl);
                if let Err(e) = sock.send_to(reply.as_bytes(), peer) {
                    eprintln!("lbx-podserver {name}: udp send to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("lbx-podserver {name}: udp recv: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests() {
        assert_eq!(classify(b"GE"), Request::Partial);
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: x\r\n"), Request::Partial);
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            classify(get),
            Request::Http {
                end: get.len(),
                close: false,
                head: false,
                fill: 0,
            }
        );
        let close = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET";
        assert_eq!(
            classify(close),
            Request::Http {
                end: close.len() - 3,
                close: true,
                head: false,
                fill: 0,
            }
        );
        assert!(matches!(
            classify(b"GET / HTTP/1.0\r\n\r\n"),
            Request::Http { close: true, .. }
        ));
        let bytes = b"POST /bytes/1048576 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx";
        assert!(matches!(
            classify(bytes),
            Request::Http { fill: 1048576, end, .. } if end == bytes.len()
        ));
        assert_eq!(fill_of("GET /bytes/999999999999 HTTP/1.1"), MAX_FILL);
        assert_eq!(fill_of("GET /bytes/x HTTP/1.1"), 0);
        let post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab";
        assert_eq!(classify(post), Request::Partial);
        let post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert!(matches!(classify(post), Request::Http { end: 41, .. }));
        assert!(matches!(
            classify(b"HEAD / HTTP/1.1\r\n\r\n"),
            Request::Http { head: true, .. }
        ));
        // A body of several MiB is fine (bulk uploads); headers that never end are not.
        let mut big = b"POST / HTTP/1.1\r\nContent-Length: 4194304\r\n\r\n".to_vec();
        let head = big.len();
        big.resize(head + (2 << 20), b'x');
        assert_eq!(classify(&big), Request::Partial);
        big.resize(head + (4 << 20), b'x');
        assert!(matches!(classify(&big), Request::Http { end, .. } if end == big.len()));
        let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
        endless.resize(MAX_HEADERS + 1, b'x');
        assert_eq!(classify(&endless), Request::TooLarge);
        let huge = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(classify(huge.as_bytes()), Request::TooLarge);
        assert_eq!(classify(b"hello"), Request::Raw);
        assert_eq!(classify(b"PING\n"), Request::Raw);
    }
}
