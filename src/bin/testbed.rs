//! socklens-testbed: performs socket calls for the live tests and benchmarks
//! and prints the kernel's own view of them (the port it assigned, the netns
//! inode, pid/tid/comm) as one JSON line: the ground truth tests compare with.
//!
//! Steps, run in order:
//!   bind,PROTO,ADDR,PORT[,OPT...]   PROTO: tcp4 tcp6 udp4 udp6;
//!                                   OPT: reuseaddr reuseport freebind transparent dev=IFNAME
//!   listen,SOCKET,BACKLOG           SOCKET: index of an earlier step's socket
//!   connect,PROTO,ADDR,PORT         a new socket connected (TCP) or associated (UDP);
//!                                   PORT "@N" is the local port of socket N
//!   accept,SOCKET                   a new socket from a listener
//!   send,SOCKET,BYTES,CHUNK[,GAP_MS] write BYTES in CHUNK-sized send() calls, pausing between
//!   sendtillerr,SOCKET,CHUNK,GAP_MS  send() CHUNK bytes every GAP_MS until a call fails (the peer
//!                                   reset): reports the bytes sent and the error
//!   churn,PROTO,ADDR,PORT,N         N short connections: connect, close
//!   acceptloop,SOCKET,N             accept and close N connections
//!   load,CONNS,ROUNDS,SEED,FILE     concurrent pipelined connections on one CPU (load.rs)
//!   recv,SOCKET,BYTES,BUF           blocking recv() with a BUF-byte buffer until BYTES arrived
//!   recvall,SOCKET,BUF              recv() until EOF
//!   peek,SOCKET,BUF                 one recv(MSG_PEEK)
//!   sendfile,SOCKET,PATH            sendfile() the whole file
//!   sendto,SOCKET,ADDR,PORT,BYTES   one UDP datagram
//!   recvfrom,SOCKET,COUNT           COUNT datagrams; reports each size and sender
//!   tcpinfo,SOCKET                  TCP_INFO: total_retrans, rtt, rttvar
//!   linger0,SOCKET                  SO_LINGER {1, 0}: close() resets, no FIN
//!   shutdown,SOCKET / close,SOCKET
//!   sleep,MS
//!   announce                        print the report so far (a line) and go on
//!   wait                            announce, then block until a line arrives on stdin

//!
//! and the cgroup hook / policy steps of testbed/cg_steps.rs (socket, connect,
//! sendto with PROTO,ADDR,PORT, recv with SOCKET, peer, getsockopt, close, serve,
//! connects, connects_for), where a name here does not take those arguments.

#[path = "testbed/cg_steps.rs"]
mod cg_steps;
#[path = "testbed/load.rs"]
mod load;

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, getsockname, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use serde_json::{json, Value};

/// Socket calls with ground truth, for socklens' tests.
#[derive(Debug, Parser)]
struct Args {
    /// Join this named network namespace (/var/run/netns/NAME) first.
    #[arg(long)]
    netns: Option<String>,
    /// Move into this cgroup v2 directory (absolute path) first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Set the command name (comm) first.
    #[arg(long)]
    comm: Option<String>,
    /// Drop to this user (and group of the same number) last, after the
    /// steps above that need root.
    #[arg(long)]
    uid: Option<u32>,
    /// Print {"ready":..} and wait for a line on stdin before the steps.
    #[arg(long)]
    wait: bool,
    /// The steps.
    steps: Vec<String>,
}

fn netns_inode() -> Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")
        .context("stat /proc/self/ns/net")?
        .ino())
}

fn enter(args: &Args) -> Result<()> {
    if let Some(name) = &args.netns {
        let f = fs::File::open(format!("/var/run/netns/{name}"))
            .with_context(|| format!("netns {name}"))?;
        setns(f, CloneFlags::CLONE_NEWNET).context("setns")?;
    }
    if let Some(dir) = &args.cgroup {
        fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    if let Some(comm) = &args.comm {
        nix::sys::prctl::set_name(&CString::new(comm.as_str())?).context("prctl")?;
    }
    if let Some(uid) = args.uid {
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(uid),
            nix::unistd::Gid::from_raw(uid),
        );
        nix::unistd::setgroups(&[]).context("setgroups")?;
        nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
        nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    }
    Ok(())
}

fn errno_of<T>(r: nix::Result<T>) -> (Option<T>, i32) {
    match r {
        Ok(v) => (Some(v), 0),
        Err(e) => (None, e as i32),
    }
}

fn apply_opt(fd: &OwnedFd, opt: &str) -> Result<()> {
    match opt {
        "reuseaddr" => setsockopt(fd, sockopt::ReuseAddr, &true)?,
        "reuseport" => setsockopt(fd, sockopt::ReusePort, &true)?,
        "freebind" => setsockopt(fd, sockopt::IpFreebind, &true)?,
        "transparent" => setsockopt(fd, sockopt::IpTransparent, &true)?,
        other => match other.strip_prefix("dev=") {
            Some(dev) => setsockopt(fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev))?,
            None => bail!("unknown socket option {other}"),
        },
    }
    Ok(())
}

fn bind_step(parts: &[&str], sockets: &mut Vec<OwnedFd>) -> Result<Value> {
    let [proto, addr, port, opts @ ..] = parts else {
        bail!("bind needs PROTO,ADDR,PORT");
    };
    let (family, ty) = match *proto {
        "tcp4" => (AddressFamily::Inet, SockType::Stream),
        "tcp6" => (AddressFamily::Inet6, SockType::Stream),
        "udp4" => (AddressFamily::Inet, SockType::Datagram),
        "udp6" => (AddressFamily::Inet6, SockType::Datagram),
        other => bail!("unknown protocol {other}"),
    };
    let ip: IpAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let sa = SocketAddr::new(ip, port.parse().with_context(|| format!("port {port}"))?);
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    for opt in opts {
        apply_opt(&fd, opt)?;
    }
    let (_, errno) = errno_of(match sa {
        SocketAddr::V4(v4) => bind(fd.as_raw_fd(), &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => bind(fd.as_raw_fd(), &SockaddrIn6::from(v6)),
    });
    let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let port = local
        .as_sockaddr_in()
        .map(SockaddrIn::port)
        .or_else(|| local.as_sockaddr_in6().map(SockaddrIn6::port))
        .unwrap_or(0);
    sockets.push(fd);
    Ok(json!({"step": "bind", "socket": sockets.len() - 1, "errno": errno, "port": port}))
}

fn listen_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, backlog] = parts else {
        bail!("listen needs SOCKET,BACKLOG");
    };
    let idx: usize = idx.parse()?;
    let fd = sockets.get(idx).ok_or_else(|| anyhow!("no socket {idx}"))?;
    let backlog: i32 = backlog.parse()?;
    // SAFETY: listen(2) on a socket we own; any backlog value is valid input.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    let (_, errno) = errno_of(Errno::result(rc));
    Ok(json!({"step": "listen", "socket": idx, "errno": errno, "backlog": backlog}))
}

fn proto_of(proto: &str) -> Result<(AddressFamily, SockType)> {
    Ok(match proto {
        "tcp4" => (AddressFamily::Inet, SockType::Stream),
        "tcp6" => (AddressFamily::Inet6, SockType::Stream),
        "udp4" => (AddressFamily::Inet, SockType::Datagram),
        "udp6" => (AddressFamily::Inet6, SockType::Datagram),
        other => bail!("unknown protocol {other}"),
    })
}

fn sockaddr(addr: &str, port: &str) -> Result<SocketAddr> {
    let ip: IpAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    Ok(SocketAddr::new(
        ip,
        port.parse().with_context(|| format!("port {port}"))?,
    ))
}

fn to_storage(sa: SocketAddr) -> SockaddrStorage {
    SockaddrStorage::from(sa)
}

fn local_port(fd: &OwnedFd) -> Result<u16> {
    let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    Ok(local
        .as_sockaddr_in()
        .map(SockaddrIn::port)
        .or_else(|| local.as_sockaddr_in6().map(SockaddrIn6::port))
        .unwrap_or(0))
}

fn sock<'a>(sockets: &'a [OwnedFd], idx: &str) -> Result<&'a OwnedFd> {
    let i: usize = idx.parse()?;
    sockets.get(i).ok_or_else(|| anyhow!("no socket {i}"))
}

fn connect_step(parts: &[&str], sockets: &mut Vec<OwnedFd>) -> Result<Value> {
    let [proto, addr, port] = parts else {
        bail!("connect needs PROTO,ADDR,PORT")
    };
    let (family, ty) = proto_of(proto)?;
    // "@N": the local port of this run's socket N (connect to ourselves).
    let own;
    let port = match port.strip_prefix('@') {
        Some(idx) => {
            own = local_port(sock(sockets, idx)?)?.to_string();
            own.as_str()
        }
        None => port,
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    let (_, errno) = errno_of(nix::sys::socket::connect(
        fd.as_raw_fd(),
        &to_storage(sockaddr(addr, port)?),
    ));
    let port = local_port(&fd)?;
    sockets.push(fd);
    Ok(
        json!({"step": "connect", "socket": sockets.len() - 1, "errno": errno, "port": port,
              "local_port": port}),
    )
}

fn accept_step(parts: &[&str], sockets: &mut Vec<OwnedFd>) -> Result<Value> {
    let [idx] = parts else {
        bail!("accept needs SOCKET")
    };
    let raw = nix::sys::socket::accept(sock(sockets, idx)?.as_raw_fd())?;
    // SAFETY: accept returned a fresh descriptor that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let port = local_port(&fd)?;
    sockets.push(fd);
    Ok(json!({"step": "accept", "socket": sockets.len() - 1, "port": port}))
}

fn send_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let (idx, bytes, chunk, gap) = match parts {
        [idx, bytes, chunk] => (idx, bytes, chunk, 0),
        [idx, bytes, chunk, gap] => (idx, bytes, chunk, gap.parse()?),
        _ => bail!("send needs SOCKET,BYTES,CHUNK[,GAP_MS]"),
    };
    let fd = sock(sockets, idx)?;
    let (total, chunk): (usize, usize) = (bytes.parse()?, chunk.parse()?);
    let buf = vec![b's'; chunk.max(1)];
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(buf.len());
        sent += nix::sys::socket::send(fd.as_raw_fd(), &buf[..n], MsgFlags::empty())?;
        if gap > 0 {
            std::thread::sleep(std::time::Duration::from_millis(gap));
        }
    }
    Ok(json!({"step": "send", "socket": idx.parse::<usize>()?, "bytes": sent}))
}

fn send_till_error_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, chunk, gap] = parts else {
        bail!("sendtillerr needs SOCKET,CHUNK,GAP_MS")
    };
    let fd = sock(sockets, idx)?;
    let buf = vec![b's'; chunk.parse::<usize>()?.max(1)];
    let gap = std::time::Duration::from_millis(gap.parse()?);
    let mut sent = 0;
    let errno = loop {
        match nix::sys::socket::send(fd.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
        std::thread::sleep(gap);
    };
    Ok(json!({"step": "sendtillerr", "bytes": sent, "errno": errno as i32}))
}

fn recv_until(fd: &OwnedFd, want: Option<usize>, bufsize: usize) -> Result<(usize, usize)> {
    let mut buf = vec![0u8; bufsize.max(1)];
    let (mut got, mut calls) = (0, 0);
    while want.is_none_or(|w| got < w) {
        let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        calls += 1;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok((got, calls))
}

fn recv_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let (idx, want, bufsize) = match parts {
        [idx, bytes, buf] => (idx, Some(bytes.parse()?), buf.parse()?),
        [idx, buf] => (idx, None, buf.parse()?),
        _ => bail!("recv needs SOCKET,BYTES,BUF (recvall: SOCKET,BUF)"),
    };
    let (got, calls) = recv_until(sock(sockets, idx)?, want, bufsize)?;
    Ok(json!({"step": "recv", "socket": idx.parse::<usize>()?, "bytes": got, "calls": calls}))
}

fn peek_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, bufsize] = parts else {
        bail!("peek needs SOCKET,BUF")
    };
    let mut buf = vec![0u8; bufsize.parse::<usize>()?.max(1)];
    let n = nix::sys::socket::recv(
        sock(sockets, idx)?.as_raw_fd(),
        &mut buf,
        MsgFlags::MSG_PEEK,
    )?;
    Ok(json!({"step": "peek", "socket": idx.parse::<usize>()?, "bytes": n}))
}

fn sendfile_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, path] = parts else {
        bail!("sendfile needs SOCKET,PATH")
    };
    let file = fs::File::open(path).with_context(|| format!("open {path}"))?;
    let size = usize::try_from(file.metadata()?.len())?;
    let out = sock(sockets, idx)?;
    let mut sent = 0;
    while sent < size {
        let n = nix::sys::sendfile::sendfile(out, &file, None, size - sent)?;
        if n == 0 {
            break;
        }
        sent += n;
    }
    Ok(json!({"step": "sendfile", "socket": idx.parse::<usize>()?, "bytes": sent}))
}

fn sendto_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, addr, port, bytes] = parts else {
        bail!("sendto needs SOCKET,ADDR,PORT,BYTES")
    };
    let buf = vec![b'u'; bytes.parse()?];
    let n = nix::sys::socket::sendto(
        sock(sockets, idx)?.as_raw_fd(),
        &buf,
        &to_storage(sockaddr(addr, port)?),
        MsgFlags::empty(),
    )?;
    Ok(json!({"step": "sendto", "bytes": n}))
}

fn recvfrom_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, count] = parts else {
        bail!("recvfrom needs SOCKET,COUNT")
    };
    let fd = sock(sockets, idx)?;
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    for _ in 0..count.parse::<usize>()? {
        let (n, from) = nix::sys::socket::recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut buf)?;
        got.push(json!({"bytes": n, "from": from.map(|f| f.to_string())}));
    }
    Ok(json!({"step": "recvfrom", "datagrams": got}))
}

fn tcpinfo_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx] = parts else {
        bail!("tcpinfo needs SOCKET")
    };
    let fd = sock(sockets, idx)?;
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())?;
    // SAFETY: `info` and `len` are valid for writes and describe the same buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    Errno::result(rc)?;
    Ok(
        json!({"step": "tcpinfo", "total_retrans": info.tcpi_total_retrans,
              "rtt_us": info.tcpi_rtt, "rttvar_us": info.tcpi_rttvar}),
    )
}

fn churn_step(parts: &[&str]) -> Result<Value> {
    let [proto, addr, port, n] = parts else {
        bail!("churn needs PROTO,ADDR,PORT,N")
    };
    let (family, ty) = proto_of(proto)?;
    let target = to_storage(sockaddr(addr, port)?);
    let n: usize = n.parse()?;
    for _ in 0..n {
        let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
        nix::sys::socket::connect(fd.as_raw_fd(), &target)?;
    }
    Ok(json!({"step": "churn", "connections": n}))
}

fn acceptloop_step(parts: &[&str], sockets: &[OwnedFd]) -> Result<Value> {
    let [idx, n] = parts else {
        bail!("acceptloop needs SOCKET,N")
    };
    let listener = sock(sockets, idx)?;
    let n: usize = n.parse()?;
    for _ in 0..n {
        let raw = nix::sys::socket::accept(listener.as_raw_fd())?;
        nix::unistd::close(raw)?;
    }
    Ok(json!({"step": "acceptloop", "connections": n}))
}

fn run_step(step: &str, sockets: &mut Vec<OwnedFd>) -> Result<Value> {
    let parts: Vec<&str> = step.split(',').collect();
    let Some((&verb, rest)) = parts.split_first() else {
        bail!("empty step")
    };
    // The cgroup-hook steps share some names with other arguments.
    if matches!((verb, rest.len()), ("sendto", 3) | ("recv", 1)) {
        return cg_steps::run(verb, rest, sockets).unwrap_or_else(|| bail!("unknown step {step}"));
    }
    match verb {
        "bind" => bind_step(rest, sockets),
        "listen" => listen_step(rest, sockets),
        "connect" => connect_step(rest, sockets),
        "accept" => accept_step(rest, sockets),
        "send" => send_step(rest, sockets),
        "sendtillerr" => send_till_error_step(rest, sockets),
        "recv" | "recvall" => recv_step(rest, sockets),
        "peek" => peek_step(rest, sockets),
        "sendfile" => sendfile_step(rest, sockets),
        "sendto" => sendto_step(rest, sockets),
        "recvfrom" => recvfrom_step(rest, sockets),
        "tcpinfo" => tcpinfo_step(rest, sockets),
        "churn" => churn_step(rest),
        "acceptloop" => acceptloop_step(rest, sockets),
        "load" => load::run(rest),
        "linger0" => {
            let [idx] = rest else {
                bail!("linger0 needs SOCKET")
            };
            let off = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            setsockopt(sock(sockets, idx)?, sockopt::Linger, &off)?;
            Ok(json!({"step": "linger0"}))
        }
        "shutdown" => {
            let [idx] = rest else {
                bail!("shutdown needs SOCKET")
            };
            nix::sys::socket::shutdown(
                sock(sockets, idx)?.as_raw_fd(),
                nix::sys::socket::Shutdown::Write,
            )?;
            Ok(json!({"step": "shutdown"}))
        }
        "close" => {
            let [idx] = rest else {
                bail!("close needs SOCKET")
            };
            let i: usize = idx.parse()?;
            let fd = sockets.get_mut(i).ok_or_else(|| anyhow!("no socket {i}"))?;
            // Replace with a harmless descriptor so later indices stay stable.
            drop(std::mem::replace(fd, fs::File::open("/dev/null")?.into()));
            Ok(json!({"step": "close"}))
        }
        "sleep" => {
            let [ms] = rest else { bail!("sleep needs MS") };
            std::thread::sleep(std::time::Duration::from_millis(ms.parse()?));
            Ok(json!({"step": "sleep"}))
        }
        _ => cg_steps::run(verb, rest, sockets).unwrap_or_else(|| bail!("unknown step {step}")),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    enter(&args)?;
    let pid = std::process::id();
    let me = json!({
        "pid": pid,
        "tid": nix::unistd::gettid().as_raw(),
        "comm": fs::read_to_string("/proc/thread-self/comm")?.trim_end(),
        "uid": nix::unistd::getuid().as_raw(),
        "netns": netns_inode()?,
        "somaxconn": fs::read_to_string("/proc/sys/net/core/somaxconn")?.trim().parse::<u32>()?,
    });
    let mut out = io::stdout().lock();
    if args.wait {
        writeln!(out, "{}", json!({"ready": true, "pid": pid}))?;
        out.flush()?;
        io::stdin().lock().read_line(&mut String::new())?;
    }
    let mut sockets = Vec::new();
    let mut report = me;
    let mut steps = Vec::new();
    for step in &args.steps {
        if step == "announce" || step == "wait" {
            report["steps"] = Value::Array(steps.clone());
            writeln!(out, "{report}")?;
            out.flush()?;
            if step == "wait" {
                io::stdin().lock().read_line(&mut String::new())?;
            }
            continue;
        }
        steps.push(run_step(step, &mut sockets).with_context(|| format!("step {step}"))?);
    }
    report["steps"] = Value::Array(steps);
    writeln!(out, "{report}")?;
    Ok(())
}
