//! Local TCP acceleration (`[[accelerate]]`): streams through the sockhash and
//! sk_msg redirect arrive byte-exact, socket semantics match plain TCP, and
//! turning acceleration off mid-transfer loses nothing. The test process moves
//! itself into an accelerated cgroup to make its sockets, and proves the bypass
//! with TCP_INFO (the TCP byte counters stay 0 when every byte is redirected).
//! Root only.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// This process in an accelerated cgroup (under a policy applied for the test);
/// back to its own cgroup and the policy removed on drop.
struct Accel {
    cg: Cgroup,
    home: PathBuf,
    file: PathBuf,
}

fn own_cgroup() -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 entry");
    cgroup2_root().join(rel.trim_start_matches('/'))
}

fn join(cg: &std::path::Path) {
    fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
}

/// Whether `doctor` says this kernel can accelerate; where it cannot, `apply` of
/// an `[[accelerate]]` file must refuse with one line naming what is missing.
fn supported() -> bool {
    let (code, out, err) = socklens(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("accelerate "))
        .expect("doctor has an accelerate line")
        .to_owned();
    if line.contains(" ok (") {
        return true;
    }
    assert!(line.contains("lacks"), "{line}");
    let cg = Cgroup::new("accel-refused");
    let file = std::env::temp_dir().join(format!("accel-{}.toml", unique("refused")));
    fs::write(&file, format!("[[accelerate]]\ncgroup = \"{}\"\n", cg.rel)).unwrap();
    let (code, _, err) = socklens(&["policy", "apply", file.to_str().unwrap()]);
    let _ = fs::remove_file(&file);
    assert_eq!(code, 1, "apply on a kernel without support: {err}");
    assert!(err.contains("lacks") && err.lines().count() == 1, "{err}");
    assert!(!pin_root().join("accel").exists());
    false
}

impl Accel {
    /// None where the kernel cannot accelerate (after checking the refusal).
    fn new(tag: &str, extra: &str) -> Option<Self> {
        require_root();
        if !supported() {
            return None;
        }
        let (code, _, err) = socklens(&["policy", "remove"]);
        assert_eq!(code, 0, "{err}");
        let cg = Cgroup::new(tag);
        let file = std::env::temp_dir().join(format!("accel-{}.toml", unique(tag)));
        fs::write(
            &file,
            format!("[[accelerate]]\ncgroup = \"{}\"\n{extra}", cg.rel),
        )
        .unwrap();
        let (code, out, err) = socklens(&["policy", "apply", file.to_str().unwrap()]);
        assert_eq!(code, 0, "apply: {err}");
        assert!(out.starts_with("applied "), "{out}");
        let home = own_cgroup();
        join(&cg.path);
        Some(Self { cg, home, file })
    }

    fn leave(&self) {
        join(&self.home);
    }
}

impl Drop for Accel {
    fn drop(&mut self) {
        join(&self.home);
        let _ = socklens(&["policy", "remove"]);
        let _ = fs::remove_file(&self.file);
        let _ = &self.cg;
    }
}

fn accel_show() -> Value {
    let (code, out, err) = socklens(&["policy", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["accelerate"].clone()
}

/// (bytes_acked, bytes_received) from TCP_INFO.
fn tcp_bytes(s: &TcpStream) -> (u64, u64) {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of `len` bytes we own.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    let at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    (at(120), at(128))
}

fn set_int(s: &impl AsRawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) {
    // SAFETY: setsockopt with an int we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

fn fionread(s: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n
}

/// poll(2) revents for `events` within `ms`.
fn poll(s: &TcpStream, events: libc::c_short, ms: i32) -> libc::c_short {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(rc >= 0);
    p.revents
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// xorshift64*: the stream's content and the sizes of writes and reads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        1 + self.next() % n
    }
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| (r.next() >> 32) as u8).collect()
}

/// Writes `data` in random sizes 1 B..1 MiB.
fn send_all(mut s: &TcpStream, data: &[u8], seed: u64) {
    let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut off = 0;
    while off < data.len() {
        let n = (r.below(1 << 20) as usize).min(data.len() - off);
        s.write_all(&data[off..off + n]).unwrap();
        off += n;
    }
}

static SPURIOUS_EAGAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads to EOF in random sizes; returns everything read.
fn recv_all(mut s: &TcpStream, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed ^ 0xdead_beef);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let want = r.below(buf.len() as u64) as usize;
        // A blocking read of a hashed socket can return EAGAIN when woken
        // without data (docs/accelerate.md, "Blocking reads"): read again.
        let n = match s.read(&mut buf[..want]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                SPURIOUS_EAGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            r => r.unwrap(),
        };
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// One direction of a pair: write `len` bytes, half-close, the peer reads to EOF.
type Job = (thread::JoinHandle<()>, thread::JoinHandle<Vec<u8>>);

fn stream(tx: TcpStream, rx: TcpStream, seed: u64, len: usize) -> Job {
    let data = content(seed, len);
    let w = thread::spawn(move || {
        send_all(&tx, &data, seed);
        tx.shutdown(Shutdown::Write).unwrap();
    });
    let r = thread::spawn(move || recv_all(&rx, seed));
    (w, r)
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn sixty_four_pairs_stream_byte_exact_both_ways_and_the_redirected_bytes_equal_the_applications() {
    let Some(bed) = Accel::new("accel-streams", "") else {
        return;
    };
    let before = accel_show();
    let pairs: Vec<(TcpStream, TcpStream)> = (0..64).map(|_| pair()).collect();
    bed.leave();
    let mut jobs = Vec::new();
    let mut total = 0u64;
    for (i, (c, s)) in pairs.iter().enumerate() {
        for (dir, (tx, rx)) in [(c, s), (s, c)].into_iter().enumerate() {
            let seed = (i as u64) << 8 | dir as u64;
            let len = Rng(seed + 7).below(scaled(3 << 20)) as usize;
            total += len as u64;
            let (w, r) = stream(tx.try_clone().unwrap(), rx.try_clone().unwrap(), seed, len);
            jobs.push((seed, len, w, r));
        }
    }
    for (seed, len, w, r) in jobs {
        let got = r.join().unwrap();
        w.join().unwrap();
        assert_eq!(got.len(), len, "stream {seed}: length");
        assert!(got == content(seed, len), "stream {seed}: content differs");
    }
    for (c, s) in &pairs {
        // Every byte went through the sockhash: TCP never carried one.
        // At most the FIN (1) came through TCP.
        assert!(tcp_bytes(c).1 <= 1, "client received through TCP");
        assert!(tcp_bytes(s).1 <= 1, "server received through TCP");
    }
    eprintln!(
        "blocking reads that returned EAGAIN: {}",
        SPURIOUS_EAGAIN.load(std::sync::atomic::Ordering::Relaxed)
    );
    let after = accel_show();
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(d("paired"), 64);
    assert_eq!(d("redirected_bytes"), total, "{after}");
    assert_eq!(d("passed_msgs"), 0);
    assert_eq!(after["sockets"].as_u64(), Some(128));
    assert_eq!(after["connections"].as_u64(), Some(64));
    assert_eq!(
        after["entries"][0]["name"].as_str(),
        Some(bed.cg.rel.as_str())
    );
    drop(pairs);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn peek_fionread_poll_dontwait_half_close_rcvlowat_and_close_with_unread_data() {
    let Some(bed) = Accel::new("accel-semantics", "") else {
        return;
    };
    let (c, s) = pair();
    let (c2, s2) = pair();
    // SO_RCVLOWAT on the listener, inherited at accept: never accelerated (poll
    // on a hashed socket ignores it), so 500 of 1000 bytes are not readable.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    set_int(&l, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1000);
    let c3 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s3, _) = l.accept().unwrap();
    bed.leave();
    (&c3).write_all(&[1u8; 500]).unwrap();
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        poll(&s3, libc::POLLIN, 0),
        0,
        "SO_RCVLOWAT: readable with 500 of 1000 bytes"
    );
    (&c3).write_all(&[2u8; 500]).unwrap();
    assert_eq!(poll(&s3, libc::POLLIN, 2000) & libc::POLLIN, libc::POLLIN);
    assert!(
        tcp_bytes(&s3).1 >= 1000,
        "SO_RCVLOWAT socket was accelerated"
    );
    // Nothing there: not readable, FIONREAD 0.
    assert_eq!(poll(&s, libc::POLLIN, 0), 0);
    assert_eq!(fionread(&s), 0);
    (&c).write_all(&[7u8; 1000]).unwrap();
    assert_eq!(poll(&s, libc::POLLIN, 2000) & libc::POLLIN, libc::POLLIN);
    assert_eq!(fionread(&s), 1000);
    let mut b = [0u8; 4096];
    // MSG_PEEK leaves the bytes.
    // SAFETY: recv into a buffer we own.
    let n = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 100, libc::MSG_PEEK) };
    assert_eq!(n, 100);
    assert_eq!(fionread(&s), 1000);
    assert_eq!((&s).read(&mut b[..300]).unwrap(), 300);
    assert_eq!(fionread(&s), 700);
    assert_eq!((&s).read(&mut b).unwrap(), 700);
    assert_eq!(fionread(&s), 0);
    // MSG_DONTWAIT on an empty queue: EAGAIN.
    // SAFETY: as above.
    let n = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 10, libc::MSG_DONTWAIT) };
    assert_eq!(n, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EAGAIN)
    );
    assert_eq!(poll(&s, libc::POLLIN, 0), 0);

    // Half-close: the data, then EOF and POLLRDHUP; the other way still works.
    (&c).write_all(b"last").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let ev = poll(&s, libc::POLLIN | libc::POLLRDHUP, 2000);
    assert_eq!(ev & libc::POLLRDHUP, libc::POLLRDHUP);
    let mut got = Vec::new();
    (&s).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last");
    (&s).write_all(b"reply").unwrap();
    let mut r = [0u8; 5];
    (&c).read_exact(&mut r).unwrap();
    assert_eq!(&r, b"reply");
    assert!(
        tcp_bytes(&s).1 <= 1,
        "went through TCP (1 is the FIN): {:?}",
        tcp_bytes(&s)
    );

    // Close with unread data: plain TCP resets the peer; here the unread bytes
    // sit in the psock queue, the kernel sends a FIN and the peer reads EOF
    // (docs/accelerate.md). The writer still learns: its writes then fail.
    (&c2).write_all(&[3u8; 100]).unwrap();
    thread::sleep(Duration::from_millis(50));
    drop(s2);
    thread::sleep(Duration::from_millis(50));
    let eof = (&c2).read(&mut b);
    assert!(
        matches!(eof, Ok(0))
            || eof
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::ECONNRESET)),
        "{eof:?}"
    );
    let failed = first_write_error(&c2);
    assert!(
        matches!(failed, Some(libc::EPIPE | libc::ECONNRESET)),
        "writes to a closed peer kept succeeding: {failed:?}"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn sendfile_and_splice_into_an_accelerated_socket_arrive_intact() {
    let Some(bed) = Accel::new("accel-sendfile", "") else {
        return;
    };
    let (c, s) = pair();
    bed.leave();
    let data = content(42, 3 << 20);
    let path = std::env::temp_dir().join(format!("accel-sf-{}", unique("sf")));
    fs::write(&path, &data).unwrap();
    let reader = {
        let s = s.try_clone().unwrap();
        thread::spawn(move || {
            let mut got = vec![0u8; 2 * data.len()];
            (&s).read_exact(&mut got).unwrap();
            got
        })
    };
    let f = fs::File::open(&path).unwrap();
    let mut off: libc::off_t = 0;
    while (off as usize) < 3 << 20 {
        // SAFETY: sendfile between two descriptors we own.
        let n = unsafe { libc::sendfile(c.as_raw_fd(), f.as_raw_fd(), &mut off, 1 << 20) };
        assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
    }
    // splice: file -> pipe -> socket.
    let mut p = [0 as libc::c_int; 2];
    // SAFETY: pipe into an array of two ints.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    let mut foff: libc::loff_t = 0;
    while foff < 3 << 20 {
        // SAFETY: splice between descriptors we own.
        let n = unsafe {
            libc::splice(
                f.as_raw_fd(),
                &mut foff,
                p[1],
                std::ptr::null_mut(),
                65536,
                0,
            )
        };
        assert!(n > 0);
        let mut left = n;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    p[0],
                    std::ptr::null_mut(),
                    c.as_raw_fd(),
                    std::ptr::null_mut(),
                    left as usize,
                    0,
                )
            };
            assert!(m > 0, "splice: {}", std::io::Error::last_os_error());
            left -= m;
        }
    }
    // SAFETY: closing the pipe we made.
    unsafe {
        libc::close(p[0]);
        libc::close(p[1]);
    }
    let got = reader.join().unwrap();
    let _ = fs::remove_file(&path);
    let expect = content(42, 3 << 20);
    assert!(got[..3 << 20] == expect[..], "sendfile bytes differ");
    assert!(got[3 << 20..] == expect[..], "splice bytes differ");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn one_end_outside_every_entry_is_not_accelerated_and_fionread_stays_right() {
    let Some(bed) = Accel::new("accel-lonely", "") else {
        return;
    };
    let before = accel_show();
    // Client in the accelerated cgroup, server outside (an accepted socket has
    // its listener's cgroup); then the other way.
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    bed.leave();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    join(&bed.cg.path);
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    bed.leave();
    let (s, _) = l.accept().unwrap();
    let c2 = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
    let (s2, _) = l2.accept().unwrap();
    for (mut tx, mut rx) in [(&s, &c), (&c, &s), (&s2, &c2), (&c2, &s2)] {
        tx.write_all(&[5u8; 5000]).unwrap();
        let mut waited = 0;
        while fionread(rx) < 5000 && waited < 100 {
            thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        assert_eq!(fionread(rx), 5000, "FIONREAD");
        let mut b = vec![0u8; 5000];
        rx.read_exact(&mut b).unwrap();
        assert!(
            tcp_bytes(rx).1 >= 5000,
            "not through TCP: {:?}",
            tcp_bytes(rx)
        );
    }
    let v = accel_show();
    assert_eq!(v["sockets"].as_u64(), Some(0), "{v}");
    assert_eq!(
        v["unpaired"].as_u64().unwrap() - before["unpaired"].as_u64().unwrap(),
        1,
        "{v}"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn a_port_outside_the_entry_ports_is_not_accelerated_one_inside_is() {
    // The listener's port is ephemeral (>= 1024): port 1 never matches it.
    for (ports, accelerated) in [("1", false), ("[1, \"1024-65535\"]", true)] {
        let Some(bed) = Accel::new("accel-ports", &format!("ports = {ports}\n")) else {
            return;
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        bed.leave();
        (&c).write_all(&[9u8; 4000]).unwrap();
        let mut b = [0u8; 4000];
        (&s).read_exact(&mut b).unwrap();
        assert_eq!(
            tcp_bytes(&s).1 == 0,
            accelerated,
            "ports = {ports}: {:?}",
            tcp_bytes(&s)
        );
        assert_eq!(
            accel_show()["connections"].as_u64(),
            Some(u64::from(accelerated)),
            "ports = {ports}"
        );
        drop((c, s, l));
        drop(bed);
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn so_zerocopy_sockets_are_not_accelerated_and_get_their_completions() {
    let Some(bed) = Accel::new("accel-zerocopy", "") else {
        return;
    };
    let before = accel_show();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    set_int(&l, libc::SOL_SOCKET, libc::SO_ZEROCOPY, 1);
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    bed.leave();
    let data = [8u8; 65536];
    // SAFETY: send from a buffer we own.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_ZEROCOPY,
        )
    };
    assert_eq!(n, 65536, "{}", std::io::Error::last_os_error());
    let mut got = vec![0u8; 65536];
    (&c).read_exact(&mut got).unwrap();
    // The completion arrives on the error queue, as on plain TCP.
    assert_eq!(
        poll(&s, 0, 2000) & libc::POLLERR,
        libc::POLLERR,
        "no zerocopy completion"
    );
    let after = accel_show();
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert!(d("skipped_zerocopy") >= 1, "{after}");
    assert_eq!(after["connections"].as_u64(), Some(0));
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn removing_acceleration_while_16_streams_are_mid_transfer_loses_nothing() {
    let Some(bed) = Accel::new("accel-remove", "") else {
        return;
    };
    let pairs: Vec<(TcpStream, TcpStream)> = (0..16).map(|_| pair()).collect();
    bed.leave();
    let len = scaled(24 << 20) as usize;
    // Writers start; readers wait until acceleration is off, so the receive
    // queues are full and the writers blocked when it goes.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
    let mut jobs = Vec::new();
    for (i, (c, s)) in pairs.iter().enumerate() {
        let seed = 1000 + i as u64;
        let (tx, rx) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let data = content(seed, len);
        let w = thread::spawn(move || {
            send_all(&tx, &data, seed);
            tx.shutdown(Shutdown::Write).unwrap();
        });
        let go = std::sync::Arc::clone(&go_rx);
        let r = thread::spawn(move || {
            go.lock().unwrap().recv().unwrap();
            recv_all(&rx, seed)
        });
        jobs.push((seed, w, r));
    }
    thread::sleep(Duration::from_millis(300));
    let queued: i32 = pairs.iter().map(|(_, s)| fionread(s)).sum();
    assert!(queued > 0, "nothing queued before the removal");
    let (code, _, err) = socklens(&["policy", "remove"]);
    assert_eq!(code, 0, "{err}");
    // The sockhash stays while it holds these sockets.
    assert!(pin_root().join("accel/maps/slp_accel_hash").exists());
    for _ in 0..16 {
        go_tx.send(()).unwrap();
    }
    for (seed, w, r) in jobs {
        let got = r.join().unwrap();
        w.join().unwrap();
        assert_eq!(got.len(), len, "stream {seed}: length");
        assert!(got == content(seed, len), "stream {seed}: content differs");
    }
    eprintln!("bytes queued unread at the removal: {queued}");
    drop(pairs);
    thread::sleep(Duration::from_millis(100));
    let (code, _, err) = socklens(&["down"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !pin_root().join("accel").exists(),
        "the drained sockhash is unpinned"
    );
}

/// The close record of the socket with local port `sport` and peer port `dport`.
fn close_of<'a>(closes: &[&'a Value], sport: u16, dport: u16) -> &'a Value {
    let hits: Vec<_> = closes
        .iter()
        .filter(|e| e["sport"] == sport && e["dport"] == dport)
        .collect();
    assert_eq!(hits.len(), 1, "close records of {sport}->{dport}: {hits:?}");
    hits[0]
}

fn ports(s: &TcpStream) -> (u16, u16) {
    (
        s.local_addr().unwrap().port(),
        s.peer_addr().unwrap().port(),
    )
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn close_records_of_accelerated_pairs_carry_what_the_applications_sent_and_read() {
    require_root();
    let pid = std::process::id().to_string();
    let tracer = Tracer::start(&["--events", "close", "--pid", &pid]);
    let Some(bed) = Accel::new("accel-acct", "") else {
        tracer.stop();
        return;
    };
    let pairs: Vec<(TcpStream, TcpStream)> = (0..8).map(|_| pair()).collect();
    let (c2, s2) = pair();
    bed.leave();
    let (plain_c, plain_s) = pair();
    let before = accel_show();

    // Ground truth per socket (local port, peer port) -> (written, read).
    let mut truth = std::collections::HashMap::<(u16, u16), (u64, u64)>::new();
    let mut jobs = Vec::new();
    for (i, (c, s)) in pairs.iter().enumerate() {
        // Before streaming: a socket closed both ways has no peer address.
        let (cp, sp) = (ports(c), ports(s));
        for (dir, (tx, rx, txp, rxp)) in [(c, s, cp, sp), (s, c, sp, cp)].into_iter().enumerate() {
            let seed = (i as u64) << 8 | dir as u64 | 0x5000;
            let len = Rng(seed + 3).below(scaled(2 << 20)) as usize;
            let (w, r) = stream(tx.try_clone().unwrap(), rx.try_clone().unwrap(), seed, len);
            jobs.push((txp, rxp, len, w, r));
        }
    }
    for (txp, rxp, len, w, r) in jobs {
        let got = r.join().unwrap();
        w.join().unwrap();
        assert_eq!(got.len(), len);
        truth.entry(txp).or_default().0 += len as u64;
        truth.entry(rxp).or_default().1 += got.len() as u64;
    }
    // Closed with data unread: the reader's record has what it read, not
    // what was sent to it.
    let sent = content(77, 100_000);
    send_all(&c2, &sent, 77);
    let mut part = vec![0u8; 37_123];
    (&s2).read_exact(&mut part).unwrap();
    (&s2).write_all(&[9u8; 5000]).unwrap();
    (&c2).read_exact(&mut [0u8; 5000]).unwrap();
    truth.insert(ports(&c2), (100_000, 5000));
    truth.insert(ports(&s2), (5000, 37_123));
    // A plain pair beside them: exact, and not flagged.
    (&plain_c).write_all(&[1u8; 3000]).unwrap();
    (&plain_s).read_exact(&mut [0u8; 3000]).unwrap();
    let plain = [(ports(&plain_c), (3000, 0)), (ports(&plain_s), (0, 3000))];

    let after = accel_show();
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let written: u64 = truth.values().map(|t| t.0).sum();
    assert_eq!(d("redirected_bytes"), written, "{after}");
    drop(s2);
    drop(c2);
    drop(pairs);
    drop(plain_c);
    drop(plain_s);
    thread::sleep(Duration::from_millis(300));
    let out = tracer.stop();
    out.assert_clean();
    let closes = out.of_kind("close");
    for ((sport, dport), (tx, rx)) in &truth {
        let e = close_of(&closes, *sport, *dport);
        assert_eq!(e["accelerated"], true, "{e}");
        assert_bytes_exact_or_flagged_short(e, *tx, *rx);
    }
    for ((sport, dport), (tx, rx)) in plain {
        let e = close_of(&closes, sport, dport);
        assert!(e.get("accelerated").is_none(), "{e}");
        assert_eq!(
            (e["tx_bytes"].as_u64(), e["rx_bytes"].as_u64()),
            (Some(tx), Some(rx)),
            "{e}"
        );
    }
}

/// What the peer of an end killed with SIGKILL sees: the read, then whether a
/// write fails within 3 tries. `unread`: bytes sent to the killed end first.
fn peer_of_killed_end(c: TcpStream, s: TcpStream, unread: usize) -> (String, Option<i32>) {
    if unread > 0 {
        (&c).write_all(&vec![5u8; unread]).unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: the child only waits to be killed; it touches no lock.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // SAFETY: closing the peer's copy, then waiting for SIGKILL.
        unsafe {
            libc::close(c.as_raw_fd());
            loop {
                libc::pause();
            }
        }
    }
    drop(s);
    thread::sleep(Duration::from_millis(50));
    // SAFETY: our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let read = match (&c).read(&mut [0u8; 64]) {
        Ok(n) => format!("read {n}"),
        Err(e) => format!("error {:?}", e.raw_os_error()),
    };
    (read, first_write_error(&c))
}

/// The errno of the first of 3 writes 50 ms apart that fails, if one does.
fn first_write_error(s: &TcpStream) -> Option<i32> {
    for _ in 0..3 {
        if let Err(e) = (&*s).write_all(&[4u8; 100]) {
            return e.raw_os_error();
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn kill_9_of_one_end_the_peer_sees_what_plain_tcp_gives() {
    let Some(bed) = Accel::new("accel-kill", "") else {
        return;
    };
    let (c, s) = pair();
    let (c2, s2) = pair();
    bed.leave();
    let (pc, ps) = pair();
    let (pc2, ps2) = pair();
    assert_eq!(accel_show()["connections"].as_u64(), Some(2));
    // Nothing unread at the killed end: EOF, then writes fail, as plain TCP.
    let plain = peer_of_killed_end(pc, ps, 0);
    let accel = peer_of_killed_end(c, s, 0);
    assert_eq!(plain.0, "read 0");
    assert!(
        matches!(plain.1, Some(libc::EPIPE | libc::ECONNRESET)),
        "{plain:?}"
    );
    assert_eq!(accel.0, plain.0);
    assert!(
        matches!(accel.1, Some(libc::EPIPE | libc::ECONNRESET)),
        "{accel:?}"
    );
    // Unread data at the killed end: plain TCP resets; accelerated, the bytes
    // sit in the psock queue and the peer reads EOF (docs/accelerate.md), then
    // its writes fail all the same.
    let plain = peer_of_killed_end(pc2, ps2, 1000);
    let accel = peer_of_killed_end(c2, s2, 1000);
    assert_eq!(
        plain.0,
        format!("error {:?}", Some(libc::ECONNRESET)),
        "{plain:?}"
    );
    assert!(accel.0 == "read 0" || accel.0 == plain.0, "{accel:?}");
    assert!(
        matches!(accel.1, Some(libc::EPIPE | libc::ECONNRESET)),
        "{accel:?}"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn a_blocking_read_with_a_big_buffer_returns_each_trickled_byte_in_order() {
    let Some(bed) = Accel::new("accel-trickle", "") else {
        return;
    };
    let (c, s) = pair();
    bed.leave();
    let w = thread::spawn(move || {
        for i in 0..200u8 {
            (&c).write_all(&[i]).unwrap();
            thread::sleep(Duration::from_millis(5));
        }
        c
    });
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    while got.len() < 200 {
        let t = std::time::Instant::now();
        match (&s).read(&mut buf) {
            Ok(n) => {
                assert!(n > 0, "EOF after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
            // A spurious wakeup returns EAGAIN early (docs/accelerate.md);
            // the timeout returns it after 5 s: that is a stuck read.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(t.elapsed() < Duration::from_secs(4), "read stuck");
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, (0..200u8).collect::<Vec<_>>());
    let c = w.join().unwrap();
    assert!(
        tcp_bytes(&s).1 == 0 && tcp_bytes(&c).0 <= 1,
        "went through TCP"
    );
}

fn epoll_events(ep: libc::c_int, ms: i32) -> u32 {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: one event into a struct we own.
    let n = unsafe { libc::epoll_wait(ep, &mut ev, 1, ms) };
    assert!(n >= 0);
    if n == 0 {
        0
    } else {
        ev.events
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn epoll_reports_epollin_exactly_while_data_waits_and_epollrdhup_on_half_close() {
    let Some(bed) = Accel::new("accel-epoll", "") else {
        return;
    };
    let (c, s) = pair();
    bed.leave();
    // SAFETY: a new epoll instance we close below.
    let ep = unsafe { libc::epoll_create1(0) };
    assert!(ep >= 0);
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: 1,
    };
    // SAFETY: registering our socket.
    assert_eq!(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) },
        0
    );
    let rdhup = libc::EPOLLRDHUP as u32;
    let epollin = libc::EPOLLIN as u32;
    assert_eq!(epoll_events(ep, 0), 0, "readable with nothing sent");
    let mut buf = [0u8; 4096];
    for n in [1usize, 700, 4096] {
        (&c).write_all(&buf[..n]).unwrap();
        assert_eq!(epoll_events(ep, 2000), epollin, "{n} bytes sent");
        let mut left = n;
        while left > 0 {
            left -= (&s).read(&mut buf[..left]).unwrap();
        }
        assert_eq!(
            epoll_events(ep, 0),
            0,
            "readable after all {n} bytes were read"
        );
    }
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(epoll_events(ep, 2000) & (epollin | rdhup), epollin | rdhup);
    assert_eq!((&s).read(&mut buf).unwrap(), 0);
    assert!(tcp_bytes(&s).1 <= 1, "went through TCP (1 is the FIN)");
    // SAFETY: closing the epoll instance we made.
    unsafe { libc::close(ep) };
}

/// `tx` writes `len` bytes in random sizes; `rx` reads all but `unread` of them
/// in random sizes. Returns (written, read).
fn transfer(tx: &TcpStream, rx: &TcpStream, seed: u64, len: usize, unread: usize) -> (u64, u64) {
    let data = content(seed, len);
    thread::scope(|sc| {
        sc.spawn(|| send_all(tx, &data, seed));
        let mut r = Rng(seed ^ 0xfeed);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len - unread;
        while left > 0 {
            let want = (r.below(buf.len() as u64) as usize).min(left);
            match (&*rx).read(&mut buf[..want]) {
                // Blocking reads of a hashed socket can return EAGAIN.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                n => left -= n.unwrap(),
            }
        }
    });
    (len as u64, (len - unread) as u64)
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn conns_snapshots_of_accelerated_pairs_carry_what_the_applications_sent_and_read() {
    require_root();
    let pid = std::process::id().to_string();
    let mut held = None;
    let mut truth = Vec::new();
    let (lines, _) =
        conns_snapshot_after(60.0, Duration::from_millis(500), &["--pid", &pid], || {
            let Some(bed) = Accel::new("accel-conns", "") else {
                return;
            };
            let pairs: Vec<(TcpStream, TcpStream)> = (0..4).map(|_| pair()).collect();
            bed.leave();
            for (i, (c, s)) in pairs.iter().enumerate() {
                let seed = 0x7000 | i as u64;
                let mut r = Rng(seed);
                let (l1, l2) = (
                    r.below(scaled(1 << 20)) as usize,
                    r.below(scaled(1 << 20)) as usize,
                );
                let (u1, u2) = (r.next() as usize % l1, r.next() as usize % l2);
                let (cw, sr) = transfer(c, s, seed, l1, if i % 2 == 1 { u1 } else { 0 });
                let (sw, cr) = transfer(s, c, seed << 1, l2, if i == 3 { u2 } else { 0 });
                truth.push((ports(c), (cw, cr)));
                truth.push((ports(s), (sw, sr)));
            }
            held = Some((bed, pairs));
        });
    if held.is_none() {
        return;
    }
    for ((sport, dport), (tx, rx)) in truth {
        let e: Vec<_> = lines
            .iter()
            .filter(|e| e["event"] == "conn" && e["sport"] == sport && e["dport"] == dport)
            .collect();
        assert_eq!(e.len(), 1, "{sport}->{dport}: {e:?}");
        assert_eq!(e[0]["accelerated"], true, "{}", e[0]);
        assert_bytes_exact_or_flagged_short(e[0], tx, rx);
    }
}

/// Applications that do not know: Debian's redis-server and redis-benchmark,
/// both in an accelerated cgroup, give identical results (keys of random
/// sizes written over accelerated TCP read back over the unix socket, and the
/// other way round), and the close records of the accelerated connections
/// equal redis' own byte counters (as in live_conns'
/// `redis_benchmark_bytes_equal_redis_own_counters`).
#[test]
#[ignore = "needs root: ./test.sh"]
fn redis_and_its_benchmark_run_accelerated_with_identical_results_and_exact_accounting() {
    require_root();
    let tracer = Tracer::start(&["--events", "close"]);
    let Some(bed) = Accel::new("accel-redis", "") else {
        tracer.stop();
        return;
    };
    let before = accel_show();
    let (mut server, ctl) = Redis::start();
    let mut ctl = RedisCtl::begin(ctl);
    redis_benchmark(server.port, scaled(1000));
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let mut rng = Rng(0x4ed15);
    for i in 0..scaled(24) {
        let key = format!("k{i}");
        let value = content(rng.next(), rng.below(1 << 20) as usize);
        let got = if i % 2 == 0 {
            let (ok, _) = redis_raw(&mut tcp, &[b"SET".as_slice(), key.as_bytes(), &value]);
            assert_eq!(ok, b"+OK\r\n");
            ctl.call(&[b"GET".as_slice(), key.as_bytes()])
        } else {
            assert_eq!(ctl.call(&[b"SET", key.as_bytes(), &value]), b"+OK\r\n");
            redis_raw(&mut tcp, &[b"GET".as_slice(), key.as_bytes()]).0
        };
        assert!(
            got == value,
            "{key}: {} bytes back of {}",
            got.len(),
            value.len()
        );
    }
    drop(tcp);
    let counted = ctl.end(Duration::from_secs(20));
    server.stop();
    let after = accel_show();
    bed.leave();
    wait_tcp_closed(server.port, &[None], Duration::from_secs(20));
    let stopped = tracer.stop();
    stopped.assert_clean();
    let server_side = redis_closes_match(&stopped, server.port, counted, 9);
    for e in server_side.values() {
        assert_eq!(e["accelerated"], true, "{e}");
    }
    let redirected = |v: &Value| v["redirected_bytes"].as_u64().unwrap();
    assert!(redirected(&after) > redirected(&before), "{after}");
}

// kTLS (docs/accelerate.md, "kTLS"): linux/tls.h values.
const SOL_TLS: libc::c_int = 282;
const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;

/// setsockopt(TCP_ULP, "tls"): the errno on failure.
fn ulp_tls(s: &TcpStream) -> Result<(), i32> {
    // SAFETY: setsockopt with a 3-byte name we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_ULP,
            b"tls".as_ptr().cast(),
            3,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// TLS 1.2 AES-GCM-128 keys for one direction (tls12_crypto_info_aes_gcm_128),
/// all derived from `seed`; record sequence 0.
fn tls_key(s: &TcpStream, dir: libc::c_int, seed: u8) -> Result<(), i32> {
    let mut info = [0u8; 40];
    info[0..2].copy_from_slice(&0x0303u16.to_ne_bytes());
    info[2..4].copy_from_slice(&51u16.to_ne_bytes());
    for (i, b) in info[4..32].iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    // SAFETY: setsockopt with 40 bytes we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            SOL_TLS,
            dir,
            info.as_ptr().cast(),
            info.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Reads until `want` bytes, EOF, an error or 2 s without data: (bytes, errno).
fn read_for(mut s: &TcpStream, want: usize) -> (Vec<u8>, Option<i32>) {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while out.len() < want {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, e.raw_os_error()),
        }
    }
    (out, None)
}

/// Whether the kernel has the tls ULP (loaded here if it is a module). Where
/// SOCKLENS_EXPECT_KTLS=1 (the kernel matrix's cells) it must.
fn ktls_available() -> bool {
    let _ = std::process::Command::new("modprobe")
        .arg("tls")
        .stderr(std::process::Stdio::null())
        .status();
    let ok = fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|w| w == "tls"));
    if std::env::var("SOCKLENS_EXPECT_KTLS").is_ok_and(|v| v == "1") {
        assert!(ok, "SOCKLENS_EXPECT_KTLS=1 but this kernel has no tls ULP");
    }
    ok
}

/// The record bytes a plain (never accelerated) kTLS socket sends for `msg`
/// with the keys of `seed`: the ground truth of userspace TLS below.
fn records_of(msg: &[u8], seed: u8) -> Vec<u8> {
    let (c, s) = pair();
    assert_eq!(ulp_tls(&c), Ok(()));
    assert_eq!(tls_key(&c, TLS_TX, seed), Ok(()));
    (&c).write_all(msg).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_for(&s, usize::MAX);
    assert_eq!(err, None);
    assert!(
        got.len() > msg.len() && got[0] == 0x17,
        "{:02x?}",
        &got[..8]
    );
    got
}

/// One application of the pair, TLS 1.2 after a plaintext exchange (its
/// handshake): kTLS where the kernel takes TCP_ULP and the keys, else userspace
/// TLS, as OpenSSL falls back. Userspace TLS sends `r1` (client) / `r2`
/// (server), the records of `msg`, and decrypts by matching them. Case "both":
/// both ends want kTLS; "tx": the client wants kTLS TX, the server reads raw
/// (returns the bytes on the wire); "rx": the server wants kTLS RX, the client
/// writes records. Returns what each reader got and the setup's answers.
fn tls_app(
    c: &TcpStream,
    s: &TcpStream,
    case: &str,
    msg: &[u8],
    r1: &[u8],
    r2: &[u8],
) -> (Vec<Vec<u8>>, String) {
    (&*c).write_all(b"client hello").unwrap();
    assert_eq!(read_for(s, 12).0, b"client hello");
    (&*s).write_all(b"server hello").unwrap();
    assert_eq!(read_for(c, 12).0, b"server hello");
    let on = |x: &TcpStream, keys: &[(libc::c_int, u8)]| {
        let mut r = ulp_tls(x);
        for &(dir, seed) in keys {
            r = r.and_then(|()| tls_key(x, dir, seed));
        }
        r
    };
    let send = |x: &TcpStream, ktls: bool, rec: &[u8]| {
        let mut w = x;
        w.write_all(if ktls { msg } else { rec }).unwrap();
    };
    let recv = |x: &TcpStream, ktls: bool, rec: &[u8]| {
        let (got, err) = read_for(x, if ktls { msg.len() } else { rec.len() });
        assert_eq!(err, None);
        if !ktls && got == rec {
            msg.to_vec()
        } else {
            got
        }
    };
    match case {
        "both" => {
            let kc = on(c, &[(TLS_TX, 1), (TLS_RX, 2)]);
            let ks = on(s, &[(TLS_TX, 2), (TLS_RX, 1)]);
            send(c, kc.is_ok(), r1);
            let at_s = recv(s, ks.is_ok(), r1);
            send(s, ks.is_ok(), r2);
            let at_c = recv(c, kc.is_ok(), r2);
            (vec![at_s, at_c], format!("client {kc:?}, server {ks:?}"))
        }
        "tx" => {
            let kc = on(c, &[(TLS_TX, 1)]);
            send(c, kc.is_ok(), r1);
            c.shutdown(Shutdown::Write).unwrap();
            let (wire, err) = read_for(s, usize::MAX);
            assert_eq!(err, None);
            (vec![wire], format!("client {kc:?}"))
        }
        _ => {
            let ks = on(s, &[(TLS_RX, 1)]);
            send(c, false, r1);
            (vec![recv(s, ks.is_ok(), r1)], format!("server {ks:?}"))
        }
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn ktls_on_an_accelerated_socket_is_refused_and_each_case_delivers_what_plain_tcp_delivers() {
    let Some(bed) = Accel::new("accel-ktls", "") else {
        return;
    };
    let ktls = ktls_available();
    let before = accel_show();
    let (c, s) = pair();
    bed.leave();
    let (pc, ps) = pair();
    // The guard answers TCP_ULP on hashed sockets only; the kernel answers the
    // rest (ENOENT without a tls ULP), and every other option is untouched.
    assert_eq!(ulp_tls(&c), Err(libc::EPERM));
    assert_eq!(ulp_tls(&s), Err(libc::EPERM));
    assert_eq!(ulp_tls(&pc), if ktls { Ok(()) } else { Err(libc::ENOENT) });
    set_int(&c, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    set_int(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, 300_000);
    assert!(c.nodelay().unwrap());
    let after = accel_show();
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(d("refused_ulp"), 2, "{after}");
    assert_eq!(after["connections"].as_u64(), Some(1), "{after}");
    (&c).write_all(&[5u8; 5000]).unwrap();
    assert_eq!(read_for(&s, 5000).0, vec![5u8; 5000]);
    assert_eq!(tcp_bytes(&s).1, 0, "still accelerated");
    drop((c, s, pc, ps));
    if !ktls {
        eprintln!("no tls ULP in this kernel: the delivery cases run in the kernel matrix");
        return;
    }
    let msg = content(7, 3000);
    let (r1, r2) = (records_of(&msg, 1), records_of(&msg, 2));
    for case in ["both", "tx", "rx"] {
        let (pc, ps) = pair();
        let (plain, plain_setup) = tls_app(&pc, &ps, case, &msg, &r1, &r2);
        join(&bed.cg.path);
        let (ac, as_) = pair();
        bed.leave();
        let (accel, accel_setup) = tls_app(&ac, &as_, case, &msg, &r1, &r2);
        let want = if case == "tx" { &r1 } else { &msg };
        assert!(
            plain.iter().all(|g| g == want),
            "{case} plain: {plain_setup}"
        );
        assert!(
            accel == plain,
            "{case}: accelerated ({accel_setup}) delivered {:?} bytes, plain ({plain_setup}) {:?}",
            accel.iter().map(Vec::len).collect::<Vec<_>>(),
            plain.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(accel_setup.contains("Err(1)"), "{case}: {accel_setup}");
        assert!(!plain_setup.contains("Err"), "{case}: {plain_setup}");
        // Only the FIN ("tx" half-closes) went through TCP.
        assert!(tcp_bytes(&as_).1 <= 1, "{case}: not accelerated");
    }
}

/// The per-call counts blind (`SOCKLENS_DISABLE=accel_calls`, as when the kernel
/// skips every run of those hooks): snapshots and close records still carry what
/// the applications sent and read, from sk_msg's own counts and the psock, and
/// say nothing of `maybe_short`. The tracers start after the policy, so they
/// join its counts.
#[test]
#[ignore = "needs root: ./test.sh"]
fn with_per_call_hooks_blind_accelerated_records_still_equal_what_the_applications_sent_and_read() {
    require_root();
    let Some(bed) = Accel::new("accel-exact", "") else {
        return;
    };
    bed.leave();
    let pid = std::process::id().to_string();
    let blind = [("SOCKLENS_DISABLE", "accel_calls")];
    let tracer = Tracer::start_env(&["--events", "close", "--pid", &pid], &blind);
    let mut truth = Vec::new();
    let mut pairs = Vec::new();
    let (lines, _) = conns_snapshot_after_env(
        60.0,
        Duration::from_millis(500),
        &["--pid", &pid],
        &blind,
        || {
            join(&bed.cg.path);
            pairs = (0..6).map(|_| pair()).collect();
            bed.leave();
            for (i, (c, s)) in pairs.iter().enumerate() {
                let seed = 0x9100 | i as u64;
                let mut r = Rng(seed);
                let (l1, l2) = (
                    1 + r.below(scaled(1 << 20)) as usize,
                    1 + r.below(scaled(1 << 20)) as usize,
                );
                let (cw, sr) = transfer(c, s, seed, l1, 0);
                let (sw, cr) = transfer(s, c, seed << 1, l2, 0);
                truth.push((ports(c), (cw, cr)));
                truth.push((ports(s), (sw, sr)));
            }
        },
    );
    let check = |e: &Value, tx: u64, rx: u64| {
        assert_eq!(e["accelerated"], true, "{e}");
        assert!(e.get("maybe_short").is_none(), "{e}");
        assert_eq!(
            (e["tx_bytes"].as_u64(), e["rx_bytes"].as_u64()),
            (Some(tx), Some(rx)),
            "{e}"
        );
    };
    for ((sport, dport), (tx, rx)) in &truth {
        let e: Vec<_> = lines
            .iter()
            .filter(|e| e["event"] == "conn" && e["sport"] == *sport && e["dport"] == *dport)
            .collect();
        assert_eq!(e.len(), 1, "{sport}->{dport}: {e:?}");
        check(e[0], *tx, *rx);
    }
    drop(pairs);
    thread::sleep(Duration::from_millis(300));
    let out = tracer.stop();
    out.assert_clean();
    let closes = out.of_kind("close");
    for ((sport, dport), (tx, rx)) in &truth {
        check(close_of(&closes, *sport, *dport), *tx, *rx);
    }
    // With no tracer reading (its lease ran out), the counts go with the
    // sockets: the second close() of a pair frees them.
    thread::sleep(Duration::from_millis(1500));
    let before = accel_count_entries();
    join(&bed.cg.path);
    let more: Vec<_> = (0..3).map(|_| pair()).collect();
    bed.leave();
    for (c, s) in &more {
        transfer(c, s, 7, 1000, 0);
    }
    assert_eq!(
        accel_count_entries(),
        before + 6,
        "two entries per open pair"
    );
    drop(more);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(accel_count_entries(), before, "left after both ends closed");
}

/// Entries of `slp_accel_bytes` that belong to pairs (the tracer's lease, the
/// all-zero key, has no socket cookie).
fn accel_count_entries() -> usize {
    let m = libbpf_rs::MapHandle::from_pinned_path(pin_root().join("accel/maps/slp_accel_bytes"))
        .unwrap();
    libbpf_rs::MapCore::keys(&m)
        .filter(|k| {
            let v = libbpf_rs::MapCore::lookup(&m, k, libbpf_rs::MapFlags::ANY)
                .unwrap()
                .unwrap_or_default();
            v.len() >= 8 && v[..8] != [0u8; 8]
        })
        .count()
}
