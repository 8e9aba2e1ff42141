//! Loopback load for the socklens benchmarks (bench/run.sh compiles it with
//! plain rustc; std only). Every mode prints one JSON line on stdout.
//!
//!   loadgen rr SIZE SECS          request/response of SIZE bytes on one
//!                                 connection (like netperf TCP_RR)
//!   loadgen churn SECS CLIENTS    short connections as fast as CLIENTS
//!                                 threads can make them: connect, 1 byte
//!                                 each way, server closes first
//!   loadgen idle COUNT PORTS      COUNT idle connections spread over PORTS
//!                                 listeners; held until stdin closes
//!   loadgen startup PATTERN CMD.. runs CMD until PATTERN appears on its
//!                                 stderr, reports the time, then SIGTERM
//!   loadgen syscalls COUNT        COUNT getpid() calls (a syscall that does
//!                                 nothing), ns per call: the price of the
//!                                 kernel's syscall entry and exit alone
//!
//! CPU figures are this process's user+system time from /proc/self/stat.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// user + system seconds of this process (all threads), 10 ms resolution.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that ends comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

fn report(mode: &str, extra: &str, ops: u64, secs: f64, cpu: f64) {
    println!(
        "{{\"mode\":\"{mode}\",{extra}\"ops\":{ops},\"secs\":{secs:.3},\"rate\":{:.1},\"cpu_s\":{cpu:.2}}}",
        ops as f64 / secs
    );
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Res<T> {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("missing or bad {what}").into())
}

fn rr(size: usize, secs: f64) -> Res<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(()); // client done
            }
            s.write_all(&buf)?;
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = vec![1u8; size];
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut ops = 0u64;
    while start.elapsed() < limit {
        // Check the clock every 256 transactions, not every one.
        for _ in 0..256 {
            c.write_all(&buf)?;
            c.read_exact(&mut buf)?;
        }
        ops += 256;
    }
    let took = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    c.shutdown(Shutdown::Both)?;
    let _ = server.join();
    report("rr", &format!("\"size\":{size},"), ops, took, cpu);
    Ok(())
}

fn churn_server(listener: TcpListener, stop: Arc<AtomicBool>) {
    let mut one = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        if s.read_exact(&mut one).is_ok() {
            let _ = s.write_all(&one);
        }
        // Dropping closes first: TIME_WAIT stays on the server side, so
        // client ports are not held.
    }
}

fn churn(secs: f64, clients: usize) -> Res<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    {
        let stop = Arc::clone(&stop);
        thread::spawn(move || churn_server(listener, stop));
    }
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            thread::spawn(move || {
                let mut one = [7u8; 1];
                let mut rest = Vec::new();
                while start.elapsed() < limit {
                    let ok = (|| -> std::io::Result<()> {
                        let mut c = TcpStream::connect(addr)?;
                        c.write_all(&one)?;
                        c.read_exact(&mut one)?;
                        rest.clear();
                        c.read_to_end(&mut rest)?; // the server's FIN
                        Ok(())
                    })();
                    let counter = if ok.is_ok() { &done } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let took = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(addr); // wake the server's accept
    report(
        "churn",
        &format!(
            "\"clients\":{clients},\"failed\":{},",
            failed.load(Ordering::Relaxed)
        ),
        done.load(Ordering::Relaxed),
        took,
        cpu,
    );
    Ok(())
}

fn idle(count: usize, ports: usize) -> Res<()> {
    let listeners: Vec<TcpListener> = (0..ports)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<_> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    let per_port = count.div_ceil(ports);
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || -> std::io::Result<Vec<TcpStream>> {
                let mut held = Vec::with_capacity(per_port);
                while held.len() < per_port {
                    held.push(l.accept()?.0);
                }
                Ok(held)
            })
        })
        .collect();
    let start = Instant::now();
    let mut clients = Vec::with_capacity(count);
    for i in 0..per_port * ports {
        clients.push(TcpStream::connect(addrs[i % ports])?);
    }
    let mut servers = Vec::new();
    for a in acceptors {
        servers.extend(a.join().map_err(|_| "acceptor panicked")??);
    }
    report(
        "idle",
        &format!("\"connections\":{},\"sockets\":{},", clients.len(), clients.len() + servers.len()),
        clients.len() as u64,
        start.elapsed().as_secs_f64(),
        cpu_seconds(),
    );
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?; // hold until stdin closes
    drop((clients, servers));
    Ok(())
}

fn startup(pattern: &str, cmd: &[String]) -> Res<()> {
    let (prog, args) = cmd.split_first().ok_or("startup needs a command")?;
    let start = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut ms = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if line.contains(pattern) {
            ms = Some(start.elapsed().as_secs_f64() * 1e3);
            break;
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let status = child.wait()?;
    let ms = ms.ok_or_else(|| format!("'{pattern}' never printed ({status})"))?;
    println!("{{\"mode\":\"startup\",\"ms\":{ms:.1}}}");
    Ok(())
}

fn syscalls(count: u64) -> Res<()> {
    let start = Instant::now();
    let mut sum = 0u64;
    for _ in 0..count {
        // glibc does not cache the pid: each call enters the kernel.
        sum = sum.wrapping_add(u64::from(std::process::id()));
    }
    let ns = start.elapsed().as_nanos() as f64 / count as f64;
    println!("{{\"mode\":\"syscalls\",\"count\":{count},\"ns_per_call\":{ns:.1},\"sum\":{sum}}}");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("rr") => arg(&args, 1, "SIZE").and_then(|n| rr(n, arg(&args, 2, "SECS")?)),
        Some("churn") => arg(&args, 1, "SECS").and_then(|s| churn(s, arg(&args, 2, "CLIENTS")?)),
        Some("idle") => arg(&args, 1, "COUNT").and_then(|n| idle(n, arg(&args, 2, "PORTS")?)),
        Some("startup") if args.len() > 2 => startup(&args[1], &args[2..]),
        Some("syscalls") => arg(&args, 1, "COUNT").and_then(syscalls),
        _ => Err("usage: loadgen rr SIZE SECS | churn SECS CLIENTS | idle COUNT PORTS | startup PATTERN CMD... | syscalls COUNT".into()),
    };
    if let Err(e) = result {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}
