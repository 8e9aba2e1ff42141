//! testbed steps for the cgroup socket hooks and the policy tests:
//!
//!   socket,FAMILY,TYPE,PROTO        FAMILY: inet inet6; TYPE: stream dgram raw; PROTO: number
//!   connect,PROTO,ADDR,PORT         a new socket connects (PROTO: tcp4 tcp6 udp4 udp6)
//!   sendto,PROTO,ADDR,PORT          a new unconnected UDP socket sends one datagram
//!   recv,SOCKET                     recvfrom on an earlier socket (1 s timeout)
//!   peer,SOCKET                     getpeername
//!   ping,SOCKET                     send one byte, recv one byte (2 s timeout); the errno
//!   getsockopt,SOCKET,LEVEL,OPTNAME
//!   close,SOCKET
//!   serve,PROTO,ADDR,PORT[,echo]    bind + listen, with a thread accepting forever
//!                                   (echo: it reads one byte and writes it back)
//!   connects,PROTO,ADDR,PORT,N[,US] N connects, each on a new socket, closed at once,
//!                                   US microseconds apart
//!   connects_for,PROTO,ADDR,PORT,MS connects like that until MS milliseconds passed
//!   rr,PROTO,ADDR,PORT,N            N times: connect, one byte out and back, close
//!   rawopt,SOCKET,LEVEL,OPTNAME,LEN getsockopt into a LEN-byte buffer filled with 0xAA:
//!                                   errno, the optlen returned and the buffer (hex)
//!   proxy,PROTO,ADDR,PORT           a transparent proxy: each accepted connection asks
//!                                   SO_ORIGINAL_DST, connects there and relays both ways
//!
//! A step that makes a socket reports its index as "socket" (null if it failed).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{
    bind, connect, getpeername, getsockname, listen, recvfrom, sendto, setsockopt, socket, sockopt,
    AddressFamily, Backlog, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    SockaddrStorage,
};
use nix::sys::time::TimeVal;
use serde_json::{json, Value};

fn errno_of<T>(r: nix::Result<T>) -> (Option<T>, i32) {
    match r {
        Ok(v) => (Some(v), 0),
        Err(e) => (None, e as i32),
    }
}

fn proto_of(p: &str) -> Result<(AddressFamily, SockType)> {
    Ok(match p {
        "tcp4" => (AddressFamily::Inet, SockType::Stream),
        "tcp6" => (AddressFamily::Inet6, SockType::Stream),
        "udp4" => (AddressFamily::Inet, SockType::Datagram),
        "udp6" => (AddressFamily::Inet6, SockType::Datagram),
        other => bail!("unknown protocol {other}"),
    })
}

fn sockaddr(addr: &str, port: &str) -> Result<SockaddrStorage> {
    let ip: IpAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let sa = SocketAddr::new(ip, port.parse().with_context(|| format!("port {port}"))?);
    Ok(match sa {
        SocketAddr::V4(v4) => SockaddrStorage::from(v4),
        SocketAddr::V6(v6) => SockaddrStorage::from(v6),
    })
}

fn port_of(sa: &SockaddrStorage) -> u16 {
    sa.as_sockaddr_in()
        .map(SockaddrIn::port)
        .or_else(|| sa.as_sockaddr_in6().map(SockaddrIn6::port))
        .unwrap_or(0)
}

fn addr_of(sa: &SockaddrStorage) -> String {
    sa.as_sockaddr_in()
        .map(|a| a.ip().to_string())
        .or_else(|| sa.as_sockaddr_in6().map(|a| a.ip().to_string()))
        .unwrap_or_default()
}

fn get<'a>(sockets: &'a [OwnedFd], idx: &str) -> Result<&'a OwnedFd> {
    let i: usize = idx.parse()?;
    sockets.get(i).ok_or_else(|| anyhow!("no socket {i}"))
}

/// One connect on a new socket: (errno, the socket).
fn connect_once(proto: &str, sa: &SockaddrStorage) -> Result<(i32, OwnedFd)> {
    let (family, ty) = proto_of(proto)?;
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    let (_, errno) = errno_of(connect(fd.as_raw_fd(), sa));
    Ok((errno, fd))
}

/// One byte out, one byte back: 0, or the errno (-1 for an early EOF).
fn exchange(fd: &OwnedFd) -> i32 {
    let mut b = [0u8; 1];
    let (_, errno) = errno_of(nix::sys::socket::send(
        fd.as_raw_fd(),
        b"p",
        MsgFlags::empty(),
    ));
    if errno != 0 {
        return errno;
    }
    match errno_of(nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut b,
        MsgFlags::empty(),
    )) {
        (Some(0), _) => -1,
        (_, e) => e,
    }
}

/// Connects (and with `rr`, exchanges one byte each way) until `until`.
fn connect_loop(
    proto: &str,
    sa: &SockaddrStorage,
    pause: Duration,
    rr: bool,
    until: impl Fn(u64) -> bool,
) -> Result<Value> {
    let mut by_errno: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0u64;
    // Outcome changes in order: [index, errno] each time the errno differs from
    // the attempt before.
    let mut changes: Vec<(u64, i32)> = Vec::new();
    let start = Instant::now();
    while !until(n) {
        let (mut errno, fd) = connect_once(proto, sa)?;
        if rr && errno == 0 {
            errno = exchange(&fd);
        }
        drop(fd);
        if changes.last().map(|c| c.1) != Some(errno) {
            changes.push((n, errno));
        }
        *by_errno.entry(errno.to_string()).or_default() += 1;
        n += 1;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "n": n,
        "by_errno": by_errno,
        "changes": changes,
        "seconds": secs,
        "rate": if secs > 0.0 { n as f64 / secs } else { 0.0 },
    }))
}

/// Runs one of the steps above; None when `name` is not one of them.
pub fn run(name: &str, parts: &[&str], sockets: &mut Vec<OwnedFd>) -> Option<Result<Value>> {
    let r = match (name, parts) {
        ("socket", [family, ty, proto]) => (|| {
            let family = match *family {
                "inet" => AddressFamily::Inet,
                "inet6" => AddressFamily::Inet6,
                other => bail!("unknown family {other}"),
            };
            let ty = match *ty {
                "stream" => SockType::Stream,
                "dgram" => SockType::Datagram,
                "raw" => SockType::Raw,
                other => bail!("unknown type {other}"),
            };
            let proto: i32 = proto.parse()?;
            // SAFETY: socket(2) with plain integer arguments.
            let fd = unsafe { libc::socket(family as i32, ty as i32 | libc::SOCK_CLOEXEC, proto) };
            if fd < 0 {
                let errno = nix::errno::Errno::last() as i32;
                return Ok(json!({"step": "socket", "errno": errno, "socket": null}));
            }
            // SAFETY: a descriptor socket(2) just returned, owned by nobody else.
            sockets.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
            Ok(json!({"step": "socket", "errno": 0, "socket": sockets.len() - 1}))
        })(),
        ("connect", [proto, addr, port]) => (|| {
            let sa = sockaddr(addr, port)?;
            let (errno, fd) = connect_once(proto, &sa)?;
            let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
            sockets.push(fd);
            Ok(
                json!({"step": "connect", "errno": errno, "socket": sockets.len() - 1,
                      "local_port": port_of(&local)}),
            )
        })(),
        ("sendto", [proto, addr, port]) => (|| {
            let sa = sockaddr(addr, port)?;
            let (family, ty) = proto_of(proto)?;
            let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
            let (_, errno) = errno_of(sendto(fd.as_raw_fd(), b"socklens", &sa, MsgFlags::empty()));
            let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
            sockets.push(fd);
            Ok(
                json!({"step": "sendto", "errno": errno, "socket": sockets.len() - 1,
                      "local_port": port_of(&local)}),
            )
        })(),
        ("recv", [idx]) => (|| {
            let fd = get(sockets, idx)?;
            setsockopt(fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
            let mut buf = [0u8; 64];
            let (got, errno) = errno_of(recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut buf));
            let from = got.and_then(|(_, a)| a);
            Ok(json!({"step": "recv", "errno": errno,
                      "from_addr": from.as_ref().map(addr_of),
                      "from_port": from.as_ref().map(port_of)}))
        })(),
        ("ping", [idx]) => (|| {
            let fd = get(sockets, idx)?;
            setsockopt(fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
            Ok(json!({"step": "ping", "errno": exchange(fd)}))
        })(),
        ("peer", [idx]) => (|| {
            let fd = get(sockets, idx)?;
            let (got, errno) = errno_of(getpeername::<SockaddrStorage>(fd.as_raw_fd()));
            Ok(json!({"step": "peer", "errno": errno,
                      "addr": got.as_ref().map(addr_of), "port": got.as_ref().map(port_of)}))
        })(),
        ("getsockopt", [idx, level, optname]) => (|| {
            let fd = get(sockets, idx)?;
            let mut val = 0i32;
            let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
            // SAFETY: getsockopt(2) into an int we own, with its size.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    level.parse()?,
                    optname.parse()?,
                    (&mut val as *mut i32).cast(),
                    &mut len,
                )
            };
            let (_, errno) = errno_of(nix::errno::Errno::result(rc));
            Ok(json!({"step": "getsockopt", "errno": errno, "value": val}))
        })(),
        ("rawopt", [idx, level, optname, len]) => (|| {
            let fd = get(sockets, idx)?;
            let (errno, optlen, buf) = raw_getsockopt(
                fd.as_raw_fd(),
                level.parse()?,
                optname.parse()?,
                len.parse()?,
            );
            let shown: String = buf.iter().take(256).map(|b| format!("{b:02x}")).collect();
            Ok(json!({"step": "rawopt", "errno": errno, "optlen": optlen, "bytes": shown}))
        })(),
        ("proxy", [proto, addr, port]) => (|| {
            let (fd, local) = tcp_listener(proto, addr, port)?;
            let listener = std::net::TcpListener::from(fd.try_clone()?);
            let v6 = local.as_sockaddr_in6().is_some();
            std::thread::spawn(move || {
                for c in listener.incoming().flatten() {
                    std::thread::spawn(move || relay(c, v6));
                }
            });
            sockets.push(fd);
            Ok(json!({"step": "proxy", "socket": sockets.len() - 1, "port": port_of(&local)}))
        })(),
        ("close", [idx]) => (|| {
            let i: usize = idx.parse()?;
            let fd = sockets.get_mut(i).ok_or_else(|| anyhow!("no socket {i}"))?;
            // Replace with a closed-on-drop placeholder: indices stay stable.
            let placeholder = socket(
                AddressFamily::Unix,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            drop(std::mem::replace(fd, placeholder));
            Ok(json!({"step": "close", "socket": i}))
        })(),
        ("serve", [proto, addr, port, mode @ ..]) if mode.len() <= 1 => (|| {
            let echo = match mode.first() {
                None => false,
                Some(&"echo") => true,
                Some(other) => bail!("serve: unknown mode {other}"),
            };
            let (fd, local) = tcp_listener(proto, addr, port)?;
            let raw = fd.as_raw_fd();
            std::thread::spawn(move || loop {
                // SAFETY: accept(2) on the listening socket, which lives as long
                // as the process (it stays in `sockets`).
                let c = unsafe {
                    libc::accept4(
                        raw,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c >= 0 {
                    if echo {
                        // SAFETY: read(2)/write(2) of one byte on the descriptor
                        // accept4 just returned, into a buffer we own.
                        unsafe {
                            let mut b = 0u8;
                            if libc::read(c, (&mut b as *mut u8).cast(), 1) == 1 {
                                libc::write(c, (&b as *const u8).cast(), 1);
                            }
                        }
                    }
                    // SAFETY: closing the descriptor accept4 just returned.
                    unsafe { libc::close(c) };
                } else if nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            sockets.push(fd);
            Ok(json!({"step": "serve", "socket": sockets.len() - 1, "port": port_of(&local)}))
        })(),
        ("connects", [proto, addr, port, n, pause @ ..]) if pause.len() <= 1 => (|| {
            let sa = sockaddr(addr, port)?;
            let n: u64 = n.parse()?;
            let us: u64 = pause.first().map_or(Ok(0), |p| p.parse())?;
            let mut v = connect_loop(proto, &sa, Duration::from_micros(us), false, |i| i >= n)?;
            v["step"] = json!("connects");
            Ok(v)
        })(),
        ("rr", [proto, addr, port, n]) => (|| {
            let sa = sockaddr(addr, port)?;
            let n: u64 = n.parse()?;
            let mut v = connect_loop(proto, &sa, Duration::ZERO, true, |i| i >= n)?;
            v["step"] = json!("rr");
            Ok(v)
        })(),
        ("connects_for", [proto, addr, port, ms]) => (|| {
            let sa = sockaddr(addr, port)?;
            let until = Instant::now() + Duration::from_millis(ms.parse()?);
            let mut v = connect_loop(proto, &sa, Duration::ZERO, false, |_| {
                Instant::now() >= until
            })?;
            v["step"] = json!("connects_for");
            Ok(v)
        })(),
        _ => return None,
    };
    Some(r)
}

/// A TCP socket bound (SO_REUSEADDR) and listening: (it, its address).
fn tcp_listener(proto: &str, addr: &str, port: &str) -> Result<(OwnedFd, SockaddrStorage)> {
    let sa = sockaddr(addr, port)?;
    let (family, ty) = proto_of(proto)?;
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, SockProtocol::Tcp)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &sa)?;
    listen(&fd, Backlog::MAXCONN)?;
    let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    Ok((fd, local))
}

/// getsockopt(2) into a `len`-byte buffer prefilled with 0xAA: (errno, the
/// optlen the kernel wrote back, the buffer).
fn raw_getsockopt(fd: i32, level: i32, optname: i32, len: i32) -> (i32, i32, Vec<u8>) {
    let mut buf = vec![0xAAu8; len.max(0) as usize];
    let mut optlen = len as libc::socklen_t;
    // SAFETY: getsockopt(2) into a buffer we own, with its size.
    let rc = unsafe { libc::getsockopt(fd, level, optname, buf.as_mut_ptr().cast(), &mut optlen) };
    let (_, errno) = errno_of(nix::errno::Errno::result(rc));
    (errno, optlen as i32, buf)
}

/// The original destination of an accepted connection, as an iptables
/// REDIRECT proxy asks for it: SOL_IP or SOL_IPV6, optname 80.
fn original_dst(fd: i32, v6: bool) -> Option<SocketAddr> {
    let (level, len) = if v6 {
        (libc::SOL_IPV6, 28)
    } else {
        (libc::SOL_IP, 16)
    };
    let (errno, _, b) = raw_getsockopt(fd, level, 80, len);
    if errno != 0 {
        return None;
    }
    let port = u16::from_be_bytes([b[2], b[3]]);
    let ip: IpAddr = if v6 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[8..24]);
        IpAddr::from(a)
    } else {
        IpAddr::from([b[4], b[5], b[6], b[7]])
    };
    Some(SocketAddr::new(ip, port))
}

/// One proxied connection: onward to the original destination, bytes copied
/// both ways until each side closes.
fn relay(c: std::net::TcpStream, v6: bool) {
    let Some(dst) = original_dst(c.as_raw_fd(), v6) else {
        return;
    };
    let Ok(up) = std::net::TcpStream::connect(dst) else {
        return;
    };
    let (Ok(mut c2), Ok(mut up2)) = (c.try_clone(), up.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let (mut c3, mut up3) = (c, up);
    let _ = std::io::copy(&mut up3, &mut c3);
    let _ = c3.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}
