//! The `load` step: concurrent connections pipelining requests both ways on
//! one CPU beside a busy loop, each side counting what it moved.
//!
//! load,CONNS,ROUNDS,SEED,FILE: CONNS client connections to a listener of its
//! own on 127.0.0.1; each client writes ROUNDS requests (one thread) while
//! reading the responses (another); the server side reads each request, then
//! writes its response. Sizes (1 B to 256 KiB), write chunks, read buffers and
//! blocking or non-blocking reads come from a generator seeded by SEED; one
//! request in four goes by sendfile() from FILE (at least 256 KiB). Reports per
//! connection both sides' ports and byte counts.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recv, send, MsgFlags};
use serde_json::{json, Value};

const MAX_SIZE: usize = 256 * 1024;

/// xorshift64*: the same sequence on both sides of a connection.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Mostly small messages, some large ones.
    fn size(&mut self) -> usize {
        if self.below(4) == 0 {
            16 * 1024 + self.below(MAX_SIZE - 16 * 1024)
        } else {
            1 + self.below(2048)
        }
    }
}

struct Msg {
    request: usize,
    response: usize,
    by_sendfile: bool,
}

fn plan(seed: u64, rounds: usize) -> Vec<Msg> {
    let mut rng = Rng(seed.wrapping_mul(2).wrapping_add(1));
    (0..rounds)
        .map(|_| Msg {
            request: rng.size(),
            response: rng.size(),
            by_sendfile: rng.below(4) == 0,
        })
        .collect()
}

fn write_all(s: &TcpStream, mut n: usize, rng: &mut Rng) -> Result<usize> {
    let buf = vec![b'l'; MAX_SIZE];
    let total = n;
    while n > 0 {
        let chunk = n.min(1 + rng.below(64 * 1024));
        n -= send(s.as_raw_fd(), &buf[..chunk], MsgFlags::empty())?;
    }
    Ok(total)
}

fn sendfile_all(s: &TcpStream, file: &File, n: usize) -> Result<usize> {
    let mut off: i64 = 0;
    while (off as usize) < n {
        let left = n - off as usize;
        let sent = nix::sys::sendfile::sendfile(s, file, Some(&mut off), left)?;
        if sent == 0 {
            bail!("sendfile: file shorter than {n} bytes");
        }
    }
    Ok(n)
}

/// Reads exactly `n` bytes (or to EOF if `n` is None) in reads of random
/// sizes, half of them non-blocking.
fn read_n(s: &TcpStream, n: Option<usize>, rng: &mut Rng) -> Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while n.is_none_or(|n| got < n) {
        let want = match n {
            Some(n) => (n - got).min(1 + rng.below(buf.len())),
            None => 1 + rng.below(buf.len()),
        };
        let flags = if rng.below(2) == 0 {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        match recv(s.as_raw_fd(), &mut buf[..want], flags) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(nix::errno::Errno::EAGAIN) => thread::sleep(Duration::from_micros(200)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

fn serve(s: TcpStream, msgs: Arc<Vec<Msg>>, seed: u64) -> Result<(u64, u64)> {
    let mut rng = Rng(seed ^ 0x5EED);
    let (mut tx, mut rx) = (0, 0);
    for m in msgs.iter() {
        rx += read_n(&s, Some(m.request), &mut rng)?;
        tx += write_all(&s, m.response, &mut rng)?;
    }
    // The client closes first: read to its EOF.
    rx += read_n(&s, None, &mut rng)?;
    Ok((tx as u64, rx as u64))
}

fn client(s: TcpStream, msgs: Arc<Vec<Msg>>, seed: u64, file: Arc<File>) -> Result<(u64, u64)> {
    let w = s.try_clone()?;
    let wmsgs = Arc::clone(&msgs);
    let writer = thread::spawn(move || -> Result<u64> {
        let mut rng = Rng(seed ^ 0xC11E);
        let mut tx = 0;
        for m in wmsgs.iter() {
            tx += if m.by_sendfile {
                sendfile_all(&w, &file, m.request)?
            } else {
                write_all(&w, m.request, &mut rng)?
            };
        }
        Ok(tx as u64)
    });
    let mut rng = Rng(seed ^ 0x4EAD);
    let want: usize = msgs.iter().map(|m| m.response).sum();
    let rx = read_n(&s, Some(want), &mut rng)? as u64;
    let tx = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok((tx, rx))
}

/// Pins this process's threads (those started from now on) to CPU 0.
fn pin_to_one_cpu() -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

pub fn run(parts: &[&str]) -> Result<Value> {
    let [conns, rounds, seed, path] = parts else {
        bail!("load needs CONNS,ROUNDS,SEED,FILE")
    };
    let (conns, rounds, seed): (usize, usize, u64) =
        (conns.parse()?, rounds.parse()?, seed.parse()?);
    let file = Arc::new(File::open(path).with_context(|| format!("opening {path}"))?);
    pin_to_one_cpu()?;
    let stop = Arc::new(AtomicBool::new(false));
    let hog = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        })
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let lport = listener.local_addr()?.port();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for i in 0..conns {
        let cseed = seed.wrapping_mul(1000).wrapping_add(i as u64);
        let msgs = Arc::new(plan(cseed, rounds));
        let c = TcpStream::connect(("127.0.0.1", lport))?;
        let (s, _) = listener.accept()?;
        let cport = c.local_addr()?.port();
        let smsgs = Arc::clone(&msgs);
        servers.push(thread::spawn(move || serve(s, smsgs, cseed)));
        let f = Arc::clone(&file);
        clients.push((cport, thread::spawn(move || client(c, msgs, cseed, f))));
    }
    let mut out = Vec::new();
    for ((cport, c), s) in clients.into_iter().zip(servers) {
        let (ctx, crx) = c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        let (stx, srx) = s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
        out.push(json!({
            "client_port": cport, "server_port": lport,
            "client_tx": ctx, "client_rx": crx, "server_tx": stx, "server_rx": srx,
        }));
    }
    stop.store(true, Ordering::Relaxed);
    hog.join().map_err(|_| anyhow::anyhow!("hog panicked"))?;
    Ok(json!({"step": "load", "port": lport, "conns": out}))
}
