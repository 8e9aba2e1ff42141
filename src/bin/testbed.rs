//! socklens-testbed: performs socket calls for the live tests and benchmarks
//! and prints the kernel's own view of them (the port it assigned, the netns
//! inode, pid/tid/comm) as one JSON line: the ground truth tests compare with.
//!
//! Steps, run in order:
//!   bind,PROTO,ADDR,PORT[,OPT...]   PROTO: tcp4 tcp6 udp4 udp6;
//!                                   OPT: reuseaddr reuseport freebind transparent dev=IFNAME
//!   listen,SOCKET,BACKLOG           SOCKET: index of an earlier bind step's socket
//!   and the cgroup hook / policy steps of testbed/cg_steps.rs (socket, connect,
//!   sendto, recv, peer, getsockopt, close, serve, connects, connects_for)

#[path = "testbed/cg_steps.rs"]
mod cg_steps;

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
    bind, getsockname, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    SockaddrIn6, SockaddrStorage,
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

fn run_step(step: &str, sockets: &mut Vec<OwnedFd>) -> Result<Value> {
    let parts: Vec<&str> = step.split(',').collect();
    match parts.split_first() {
        Some((&"bind", rest)) => bind_step(rest, sockets),
        Some((&"listen", rest)) => listen_step(rest, sockets),
        Some((name, rest)) => {
            cg_steps::run(name, rest, sockets).unwrap_or_else(|| bail!("unknown step {step}"))
        }
        _ => bail!("unknown step {step}"),
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
    let steps = args
        .steps
        .iter()
        .map(|s| run_step(s, &mut sockets))
        .collect::<Result<Vec<_>>>()?;
    let mut report = me;
    report["steps"] = Value::Array(steps);
    writeln!(out, "{report}")?;
    Ok(())
}
