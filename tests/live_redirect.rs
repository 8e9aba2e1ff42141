//! Redirect to a local proxy, for real, on loopback: a client (socklens-testbed)
//! in a test-made cgroup connects to a server this test runs; the policy sends
//! the connection to a proxy (testbed's `proxy` step, or a bare listener) in a
//! sibling cgroup, which asks SO_ORIGINAL_DST where it was going. Ground truth:
//! the servers' own accounting and the same calls made without socklens.
//! Root only; run single-threaded (the pinned policy is one per host).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const EINVAL: i64 = libc::EINVAL as i64;
const ECONNREFUSED: i64 = libc::ECONNREFUSED as i64;

struct Setup {
    root: Cgroup,
    dir: PathBuf,
}

impl Setup {
    /// None on a kernel older than 5.18, after checking the documented
    /// fallback there: apply fails with exit 1 and one line naming what the
    /// kernel lacks, and nothing is applied (docs/redirect.md, "Kernels").
    fn new(tag: &str) -> Option<Self> {
        require_root();
        let (code, _, err) = socklens(&["policy", "remove"]);
        assert_eq!(code, 0, "{err}");
        let file = "[[redirect]]\nproxy = \"127.0.0.1:15001\"\nproxy_uids = [1337]\n";
        if policy_apply_fails_here(tag, file) {
            return None;
        }
        let root = Cgroup::new(tag);
        fs::create_dir(root.path.join("app")).expect("app cgroup");
        fs::create_dir(root.path.join("proxy")).expect("proxy cgroup");
        let dir = std::env::temp_dir().join(format!("slr-{}", unique(tag)));
        fs::create_dir_all(&dir).unwrap();
        Some(Self { root, dir })
    }

    fn cg(&self, name: &str) -> String {
        self.root.path.join(name).to_str().unwrap().to_owned()
    }

    /// Redirects the app cgroup's TCP connections to `ports` on loopback.
    fn apply(&self, ports: &str, proxy4: u16, proxy6: u16) -> PathBuf {
        self.apply_proto("tcp", ports, proxy4, proxy6)
    }

    /// Writes the policy file that redirects the app cgroup's `proto`
    /// connections to `ports` on loopback (one `[[redirect]]`, on line 2).
    fn write(&self, proto: &str, ports: &str, proxy4: u16, proxy6: u16) -> PathBuf {
        let path = self.dir.join("redirect.toml");
        fs::write(
            &path,
            format!(
                "attach = \"{r}\"\n[[redirect]]\nproto = \"{proto}\"\ncgroup = \"{r}/app\"\nto = [\"127.0.0.1/32\", \"::1/128\"]\nports = \"{ports}\"\nproxy = \"127.0.0.1:{proxy4}\"\nproxy6 = \"[::1]:{proxy6}\"\nproxy_cgroups = [\"{r}/proxy\"]\n",
                r = self.root.rel
            ),
        )
        .unwrap();
        path
    }

    fn apply_proto(&self, proto: &str, ports: &str, proxy4: u16, proxy6: u16) -> PathBuf {
        let path = self.write(proto, ports, proxy4, proxy6);
        let (code, out, err) = socklens(&["policy", "apply", path.to_str().unwrap()]);
        assert_eq!(code, 0, "apply failed: {err}");
        assert!(out.starts_with("applied "), "{out}");
        path
    }

    /// testbed in cgroup `cg` with `steps`, to completion.
    fn run(&self, cg: &str, steps: &[&str]) -> Value {
        let c = self.cg(cg);
        let mut args = vec!["--cgroup", c.as_str()];
        args.extend_from_slice(steps);
        testbed(&args)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = Command::new(SOCKLENS).args(["policy", "remove"]).output();
        let _ = fs::remove_dir(self.root.path.join("app"));
        let _ = fs::remove_dir(self.root.path.join("proxy"));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An echo server: counts connections and keeps each peer.
struct Echo {
    port: u16,
    accepted: Arc<AtomicU64>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Echo {
    /// Connections accepted once `want` arrived or 5 s passed: a connect
    /// returns at the handshake, before the server's accept.
    fn accepted_at_least(&self, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.accepted.load(Ordering::SeqCst) < want && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.accepted.load(Ordering::SeqCst)
    }
}

fn echo(addr: &str) -> Echo {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let (a, p) = (Arc::clone(&accepted), Arc::clone(&peers));
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            a.fetch_add(1, Ordering::SeqCst);
            p.lock().unwrap().push(c.peer_addr().unwrap());
            thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Echo {
        port,
        accepted,
        peers,
    }
}

/// The test's proxy (testbed `proxy` steps on v4 and v6 loopback, port 0) in
/// the proxy cgroup: (the running testbed, v4 port, v6 port).
fn start_proxy(s: &Setup) -> (Bed, u16, u16) {
    let c = s.cg("proxy");
    let bed = Bed::spawn(&[
        "--cgroup",
        &c,
        "proxy,tcp4,127.0.0.1,0",
        "proxy,tcp6,::1,0",
        "wait",
    ]);
    let r = bed.report();
    let port = |i: usize| r["steps"][i]["port"].as_u64().unwrap() as u16;
    let (p4, p6) = (port(0), port(1));
    (bed, p4, p6)
}

fn show() -> Value {
    let (code, out, err) = socklens(&["policy", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn pairs_left() -> usize {
    let p = pin_root().join("policy/maps/slp_redir_pairs");
    let m = libbpf_rs::MapHandle::from_pinned_path(&p).unwrap();
    libbpf_rs::MapCore::keys(&m).count()
}

#[test]
fn tcp_reaches_the_server_through_the_proxy_v4_and_v6() {
    let Some(s) = Setup::new("rd-through") else {
        return;
    };
    let e4 = echo("127.0.0.1:0");
    let e6 = echo("[::1]:0");
    let (proxy, p4, p6) = start_proxy(&s);
    let ports = format!("{}-{}", e4.port.min(e6.port), e4.port.max(e6.port));
    s.apply(&ports, p4, p6);
    let (a4, a6) = (e4.port.to_string(), e6.port.to_string());
    let r = s.run(
        "app",
        &[
            &format!("connect,tcp4,127.0.0.1,{a4}"),
            "peer,0",
            "send,0,100000,1000",
            "recv,0,100000,4096",
            &format!("connect,tcp6,::1,{a6}"),
            "peer,1",
            "send,1,100000,1000",
            "recv,1,100000,4096",
        ],
    );
    let st = &r["steps"];
    assert_eq!(st[0]["errno"], 0, "{r}");
    // The client's own view stays the original destination.
    assert_eq!(
        (st[1]["addr"].as_str(), st[1]["port"].as_u64()),
        (Some("127.0.0.1"), Some(u64::from(e4.port))),
        "{r}"
    );
    assert_eq!(
        (st[5]["addr"].as_str(), st[5]["port"].as_u64()),
        (Some("::1"), Some(u64::from(e6.port))),
        "{r}"
    );
    for i in [3, 7] {
        assert_eq!(st[i]["bytes"], 100000, "bytes back through the proxy: {r}");
    }
    // Each server saw one connection, from the proxy (its onward connection,
    // not redirected back to itself), not from the client's port.
    assert_eq!(e4.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(e6.accepted.load(Ordering::SeqCst), 1);
    let client4 = st[0]["local_port"].as_u64().unwrap() as u16;
    assert_ne!(e4.peers.lock().unwrap()[0].port(), client4);
    let v = show();
    assert_eq!(v["redirects"][0]["redirected"], 2, "{v}");
    // A file with no [[scope]]: the rule-judging programs stay out.
    let progs: Vec<&str> = v["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["program"].as_str().unwrap())
        .collect();
    assert!(progs.contains(&"slp_redir_sockops"), "{v}");
    assert!(
        !progs.contains(&"slp_sock_create") && !progs.contains(&"slp_bind4"),
        "{v}"
    );
    drop(proxy.finish());
}

/// rawopt on the accepted socket (index 1) of a bare listener: (errno, optlen, hex).
fn opt(r: &Value, i: usize) -> (i64, i64, String) {
    let s = &r["steps"][i];
    (
        s["errno"].as_i64().unwrap(),
        s["optlen"].as_i64().unwrap(),
        s["bytes"].as_str().unwrap().to_owned(),
    )
}

/// A listener in the proxy cgroup accepts one connection (from `client`) and
/// asks the option calls `calls` (LEVEL,OPTNAME,LEN) on it.
fn accept_and_ask(s: &Setup, v6: bool, client: impl FnOnce(u16), calls: &[&str]) -> Value {
    let c = s.cg("proxy");
    let bind = if v6 {
        "bind,tcp6,::1,0"
    } else {
        "bind,tcp4,127.0.0.1,0"
    };
    let mut args: Vec<String> = vec![
        "--cgroup".into(),
        c,
        bind.into(),
        "listen,0,16".into(),
        "wait".into(),
        "accept,0".into(),
    ];
    args.extend(calls.iter().map(|c| format!("rawopt,1,{c}")));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bed = Bed::spawn(&refs);
    let r = bed.report();
    let port = r["steps"][0]["port"].as_u64().unwrap() as u16;
    client(port);
    bed.release();
    bed.finish()
}

fn sockaddr_hex(v6: bool, port: u16) -> String {
    if v6 {
        format!(
            "0a00{port:04x}00000000{}00000001{}",
            "0".repeat(24),
            "00000000"
        )
    } else {
        format!("0200{port:04x}7f0000010000000000000000")
    }
}

#[test]
fn so_original_dst_exact_and_other_calls_untouched() {
    let Some(s) = Setup::new("rd-origdst") else {
        return;
    };
    // The original destination need not exist: the proxy answers the handshake.
    let unused = TcpListener::bind("127.0.0.1:0").unwrap();
    let orig = unused.local_addr().unwrap().port();
    drop(unused);
    for v6 in [false, true] {
        let level = if v6 { "41" } else { "0" };
        let need = if v6 { 28 } else { 16 };
        let host = if v6 { "::1" } else { "127.0.0.1" };
        let calls: Vec<String> = [need, need - 1, 64, 8192]
            .iter()
            .map(|n| format!("{level},80,{n}"))
            .collect();
        let calls: Vec<&str> = calls.iter().map(String::as_str).collect();
        // Both proxy ports are the listener's; apply once it is known.
        let r = accept_and_ask(
            &s,
            v6,
            |port| {
                s.apply(&orig.to_string(), port, port);
                let proto = if v6 { "tcp6" } else { "tcp4" };
                let c = s.run(
                    "app",
                    &[&format!("connect,{proto},{host},{orig}"), "sleep,200"],
                );
                assert_eq!(c["steps"][0]["errno"], 0, "{c}");
            },
            &calls,
        );
        let (errno, len, hex) = opt(&r, 3);
        assert_eq!((errno, len), (0, need), "{r}");
        assert_eq!(&hex[..need as usize * 2], sockaddr_hex(v6, orig), "{r}");
        // Shorter than the address: EINVAL, optlen and buffer untouched.
        let (errno, len, hex) = opt(&r, 4);
        assert_eq!((errno, len), (EINVAL, need - 1), "{r}");
        assert!(hex.chars().all(|c| c == 'a'), "{r}");
        // Longer: the address, optlen as passed (netfilter's getorigdst).
        let (errno, len, hex) = opt(&r, 5);
        assert_eq!((errno, len), (0, 64), "{r}");
        assert_eq!(&hex[..need as usize * 2], sockaddr_hex(v6, orig), "{r}");
        // Above a page: the address, optlen the address' size.
        let (errno, len, _) = opt(&r, 6);
        assert_eq!((errno, len), (0, need), "{r}");
        socklens(&["policy", "remove"]);
    }

    // Not redirected (a direct connection from this test, outside the
    // redirected cgroup), and unrelated options: exactly what the kernel
    // gives without socklens.
    let calls = [
        "0,80,16",    // SO_ORIGINAL_DST, not redirected
        "41,80,28",   // IP6T_SO_ORIGINAL_DST on a v4 socket
        "1,8,4",      // SO_RCVBUF
        "0,1,4",      // IP_TOS
        "6,11,8192",  // TCP_INFO, optlen above a page
        "0,64,16384", // IPT_SO_GET_INFO-sized call above a page
        "6,35,8192",  // TCP_ZEROCOPY_RECEIVE
    ];
    let direct = |port: u16| {
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        thread::sleep(Duration::from_millis(200));
        drop(c);
    };
    let with = {
        let r = accept_and_ask(
            &s,
            false,
            |port| {
                s.apply(&orig.to_string(), port, port);
                direct(port);
            },
            &calls,
        );
        socklens(&["policy", "remove"]);
        r
    };
    let without = accept_and_ask(&s, false, direct, &calls);
    for (i, call) in calls.iter().enumerate() {
        let (a, b) = (opt(&with, 3 + i), opt(&without, 3 + i));
        if call.starts_with("6,11,") {
            // TCP_INFO's bytes change with time: errno and length must not.
            assert_eq!((a.0, a.1), (b.0, b.1), "{call}: {with} vs {without}");
        } else {
            assert_eq!(a, b, "{call}: {with} vs {without}");
        }
    }
}

#[test]
fn ten_thousand_connections_leave_no_state() {
    let Some(s) = Setup::new("rd-many") else {
        return;
    };
    let e = echo("127.0.0.1:0");
    let (proxy, p4, p6) = start_proxy(&s);
    s.apply(&e.port.to_string(), p4, p6);
    let n = scaled(10_000);
    let r = s.run("app", &[&format!("rr,tcp4,127.0.0.1,{},{n}", e.port)]);
    assert_eq!(
        r["steps"][0]["by_errno"],
        serde_json::json!({"0": n}),
        "{r}"
    );
    assert_eq!(e.accepted.load(Ordering::SeqCst), n);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = show();
        let live = v["translated_sockets"]["live"].as_i64().unwrap();
        if live == 0 && pairs_left() == 0 {
            assert_eq!(v["redirects"][0]["redirected"], n, "{v}");
            // Every client and every accepted socket held state once.
            assert_eq!(v["translated_sockets"]["total"], 2 * n, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "state left: {live} sockets, {} pairs",
            pairs_left()
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(proxy.finish());
}

#[test]
fn survives_the_applier_and_remove_lifts_it() {
    let Some(s) = Setup::new("rd-remove") else {
        return;
    };
    let (proxy, p4, p6) = start_proxy(&s);
    // A port nothing listens on: reachable only through the proxy.
    let unused = TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = unused.local_addr().unwrap().port();
    drop(unused);
    let path = s.dir.join("kill.toml");
    s.apply(&gone.to_string(), p4, p6);
    fs::copy(s.dir.join("redirect.toml"), &path).unwrap();
    // An applier killed with -9 mid-way leaves the one in force as it was.
    let mut child = Command::new(SOCKLENS)
        .args(["policy", "apply", path.to_str().unwrap()])
        .spawn()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    // Through the proxy the connection reaches the proxy, whose onward
    // connect to the unused port fails: the client sees its connect succeed.
    let r = s.run(
        "app",
        &[&format!("connect,tcp4,127.0.0.1,{gone}"), "peer,0"],
    );
    assert_eq!(r["steps"][0]["errno"], 0, "redirected: {r}");
    assert_eq!(r["steps"][1]["port"], u64::from(gone), "{r}");
    let (code, _, err) = socklens(&["policy", "remove"]);
    assert_eq!(code, 0, "{err}");
    let r = s.run("app", &[&format!("connect,tcp4,127.0.0.1,{gone}")]);
    assert_eq!(r["steps"][0]["errno"], ECONNREFUSED, "not redirected: {r}");
    drop(proxy.finish());
}

/// Kills the proxy process it holds on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn haproxy_reads_the_original_destination_unchanged() {
    let Some(s) = Setup::new("rd-haproxy") else {
        return;
    };
    let e = echo("127.0.0.1:0");
    let port = free_port();
    // `server 0.0.0.0:0`: forward to the destination the connection had before
    // NAT, which haproxy asks with getsockopt(SOL_IP, SO_ORIGINAL_DST).
    let cfg = s.dir.join("haproxy.cfg");
    fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend orig\nbackend orig\n  server s 0.0.0.0:0\n"
        ),
    )
    .unwrap();
    let procs = format!("{}/cgroup.procs", s.cg("proxy"));
    let _haproxy = Child(
        Command::new("sh")
            .args([
                "-c",
                &format!("echo $$ > {procs} && exec haproxy -db -f {}", cfg.display()),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (scripts/install-deps.sh installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    // Listening once the port cannot be bound (a probe connection would be
    // forwarded to haproxy itself: it has no original destination).
    while TcpListener::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "haproxy did not listen");
        thread::sleep(Duration::from_millis(50));
    }
    s.apply(&e.port.to_string(), port, port);
    let r = s.run(
        "app",
        &[
            &format!("connect,tcp4,127.0.0.1,{}", e.port),
            "send,0,50000,1000",
            "recv,0,50000,4096",
        ],
    );
    assert_eq!(r["steps"][0]["errno"], 0, "{r}");
    assert_eq!(r["steps"][2]["bytes"], 50000, "through haproxy: {r}");
    assert_eq!(e.accepted.load(Ordering::SeqCst), 1);
    let client = r["steps"][0]["local_port"].as_u64().unwrap() as u16;
    assert_ne!(e.peers.lock().unwrap().last().unwrap().port(), client);
}

#[test]
fn udp_to_a_local_resolver_replies_from_the_original_server() {
    let Some(s) = Setup::new("rd-udp") else {
        return;
    };
    // The resolver: answers each datagram to its sender.
    let mut ports = Vec::new();
    let seen = Arc::new(AtomicU64::new(0));
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let u = std::net::UdpSocket::bind(addr).unwrap();
        ports.push(u.local_addr().unwrap().port());
        let seen = Arc::clone(&seen);
        thread::spawn(move || {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = u.recv_from(&mut b) {
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = u.send_to(&b[..n], from);
            }
        });
    }
    // The "server" the client asks: a port nothing listens on.
    let orig = {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.local_addr().unwrap().port()
    };
    s.apply_proto("udp", &orig.to_string(), ports[0], ports[1]);
    let r = s.run(
        "app",
        &[
            &format!("sendto,udp4,127.0.0.1,{orig}"),
            "recv,0",
            &format!("sendto,udp6,::1,{orig}"),
            "recv,1",
        ],
    );
    let st = &r["steps"];
    for (i, host) in [(1, "127.0.0.1"), (3, "::1")] {
        assert_eq!(st[i]["errno"], 0, "the resolver answered: {r}");
        assert_eq!(st[i]["from_addr"], host, "{r}");
        assert_eq!(
            st[i]["from_port"],
            u64::from(orig),
            "reply from the original server: {r}"
        );
    }
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    let v = show();
    assert_eq!(v["redirects"][0]["proto"], "udp", "{v}");
    assert_eq!(v["redirects"][0]["redirected"], 2, "{v}");
}

/// The client's records (trace's established and close, a `conns` snapshot)
/// name the original destination beside the proxy the kernel connected to;
/// a direct connection and the proxy's own sockets are not steered.
#[test]
fn conns_and_close_records_carry_the_original_destination_beside_the_proxy() {
    let Some(s) = Setup::new("rd-conns") else {
        return;
    };
    // Dual-stack: one port for 127.0.0.1 and ::1.
    let e = echo("[::]:0");
    let other = echo("127.0.0.1:0");
    let (proxy, p4, p6) = start_proxy(&s);
    s.apply(&e.port.to_string(), p4, p6);
    let tracer = Tracer::start(&["--events", "established,close"]);
    let app = s.cg("app");
    let (ep, op) = (e.port.to_string(), other.port.to_string());
    let mut client = Bed::spawn(&[
        "--cgroup",
        &app,
        &format!("connect,tcp4,127.0.0.1,{ep}"),
        &format!("connect,tcp6,::1,{ep}"),
        &format!("connect,tcp4,127.0.0.1,{op}"),
        "wait",
        "close,0",
        "close,1",
        "close,2",
    ]);
    let open = client.report();
    let pid = open["pid"].clone();
    let port = |i: usize| open["steps"][i]["local_port"].clone();
    let (via4, via6, direct) = (port(0), port(1), port(2));
    for i in 0..3 {
        assert_eq!(open["steps"][i]["errno"], 0, "{open}");
    }
    let proxy4: SocketAddr = format!("127.0.0.1:{p4}").parse().unwrap();
    let proxy6: SocketAddr = format!("[::1]:{p6}").parse().unwrap();
    let (snap, _) = conns_snapshot(0.5, &[], || {});
    let snap: Vec<&Value> = snap.iter().collect();
    let orig4 = ("127.0.0.1", e.port);
    let orig6 = ("::1", e.port);
    assert_steered(record_of(&snap, &pid, &via4), "redirect", orig4, proxy4);
    assert_steered(record_of(&snap, &pid, &via6), "redirect", orig6, proxy6);
    assert_not_steered(record_of(&snap, &pid, &direct));
    client.release();
    client.finish();
    for p in [e.port, other.port, p4, p6] {
        wait_conns_closed(p, &[None], Duration::from_secs(20));
    }
    let stopped = tracer.stop();
    stopped.assert_clean();
    for kind in ["established", "close"] {
        let recs = stopped.of_kind(kind);
        let (r4, r6) = (record_of(&recs, &pid, &via4), record_of(&recs, &pid, &via6));
        if events_carry_steering() {
            assert_steered(r4, "redirect", orig4, proxy4);
            assert_steered(r6, "redirect", orig6, proxy6);
        } else {
            assert_not_steered(r4);
            assert_not_steered(r6);
        }
        assert_not_steered(record_of(&recs, &pid, &direct));
    }
    // The proxy's accepted sockets (they hold the original for
    // SO_ORIGINAL_DST), its onward connections and the server's ends are no
    // steering of theirs: two of each.
    let closes = stopped.of_kind("close");
    let others: Vec<&&Value> = closes
        .iter()
        .filter(|r| [&r["sport"], &r["dport"]].iter().any(|p| **p == e.port))
        .chain(
            closes
                .iter()
                .filter(|r| r["sport"] == p4 || r["sport"] == p6),
        )
        .collect();
    assert_eq!(others.len(), 6, "{closes:?}");
    for r in others {
        assert_not_steered(r);
    }
    drop(proxy.finish());
}

/// `trace --events translate`: one record per redirected connect, of kind
/// redirect, naming the original destination and the proxy, with the
/// cookie of the client's socket (the cookie of its close record).
#[test]
fn trace_translate_shows_each_redirect_with_cookie_original_and_proxy() {
    let Some(s) = Setup::new("rd-xlate") else {
        return;
    };
    let e = echo("[::]:0");
    let other = echo("127.0.0.1:0");
    let (proxy, p4, p6) = start_proxy(&s);
    s.apply(&e.port.to_string(), p4, p6);
    let tracer = Tracer::start(&["--events", "translate,close"]);
    let n = scaled(50);
    let tb = s.run(
        "app",
        &[
            &format!("connects,tcp4,127.0.0.1,{},{n}", e.port),
            &format!("connect,tcp6,::1,{}", e.port),
            &format!("connect,tcp4,127.0.0.1,{}", other.port),
            "close,0",
            "close,1",
        ],
    );
    assert_eq!(
        tb["steps"][0]["by_errno"],
        serde_json::json!({"0": n}),
        "{tb}"
    );
    for i in [1, 2] {
        assert_eq!(tb["steps"][i]["errno"], 0, "{tb}");
    }
    for p in [e.port, other.port, p4, p6] {
        wait_conns_closed(p, &[None], Duration::from_secs(20));
    }
    let stopped = tracer.stop();
    stopped.assert_clean();
    let ours = |kind: &str| -> Vec<Value> {
        stopped
            .of_kind(kind)
            .into_iter()
            .filter(|e| e["pid"] == tb["pid"])
            .cloned()
            .collect()
    };
    let translated = ours("translate");
    // One per redirected connect, none for the direct one.
    assert_eq!(translated.len() as u64, n + 1, "{translated:?}");
    let mut cookies = std::collections::BTreeMap::new();
    for t in &translated {
        let (host, proxy_port) = if t["family"] == "inet6" {
            ("::1", p6)
        } else {
            ("127.0.0.1", p4)
        };
        assert_eq!(t["steered"], "redirect", "{t}");
        assert_eq!(t["proto"], "tcp", "{t}");
        assert_eq!(
            (&t["addr"], &t["port"]),
            (&host.into(), &e.port.into()),
            "{t}"
        );
        assert_eq!(
            (&t["real_addr"], &t["real_port"]),
            (&host.into(), &proxy_port.into()),
            "{t}"
        );
        let c = t["cookie"].as_u64().unwrap();
        assert!(c != 0 && cookies.insert(c, proxy_port).is_none(), "{t}");
    }
    assert_eq!(cookies.values().filter(|p| **p == p6).count(), 1);
    // Each names the socket whose connection went to the proxy.
    let closed: std::collections::BTreeMap<u64, u16> = ours("close")
        .iter()
        .filter(|c| c["dport"] != other.port)
        .map(|c| {
            let port = c["dport"].as_u64().unwrap() as u16;
            (c["cookie"].as_u64().unwrap(), port)
        })
        .collect();
    assert_eq!(closed, cookies);
    drop(proxy.finish());
}

/// The agent exports each redirect's count from the pinned counters: the
/// connections the test sent through the rule, not those it did not cover.
#[test]
fn agent_counts_the_connections_each_redirect_sent_to_its_proxy() {
    let Some(s) = Setup::new("rd-agent") else {
        return;
    };
    let e = echo("127.0.0.1:0");
    let other = echo("127.0.0.1:0");
    let (proxy, p4, p6) = start_proxy(&s);
    let policy = s.write("tcp", &e.port.to_string(), p4, p6);
    let agent = Agent::with_policy(&s.dir, &policy, &s.root.rel);
    let n = scaled(200);
    let r = s.run(
        "app",
        &[
            &format!("rr,tcp4,127.0.0.1,{},{n}", e.port),
            // Not covered: another port.
            &format!("connects,tcp4,127.0.0.1,{},3", other.port),
        ],
    );
    // Not covered: the proxy's own cgroup.
    let p = s.run("proxy", &[&format!("connects,tcp4,127.0.0.1,{},2", e.port)]);
    assert_eq!(
        r["steps"][0]["by_errno"],
        serde_json::json!({"0": n}),
        "{r}"
    );
    assert_eq!(
        r["steps"][1]["by_errno"],
        serde_json::json!({"0": 3}),
        "{r}"
    );
    assert_eq!(
        p["steps"][0]["by_errno"],
        serde_json::json!({"0": 2}),
        "{p}"
    );
    assert_eq!(e.accepted_at_least(n + 2), n + 2);
    assert_eq!(other.accepted_at_least(3), 3);
    let line = show()["redirects"][0]["line"].to_string();
    let labels = [
        format!("line=\"{line}\""),
        "proto=\"tcp\"".into(),
        format!("proxy=\"127.0.0.1:{p4}\""),
        format!("proxy6=\"[::1]:{p6}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    agent.wait_metrics(|text| {
        let all = metric_sum(text, "socklens_redirects_total", &[]);
        let ours = metric_sum(text, "socklens_redirects_total", &labels);
        if all == Some(n as f64) && ours == all {
            Ok(())
        } else {
            Err(format!("want {n} for {labels:?}, got {ours:?} of {all:?}"))
        }
    });
    agent.stop();
    drop(proxy.finish());
}

/// A pair the proxy's side never claims is freed when the client's socket
/// closes, on every kernel: connections refused at the proxy's address, and
/// connections a proxy outside the attach cgroup accepts (the sock_ops
/// program never sees its side), while open and after.
#[test]
fn pairs_the_proxy_never_claims_are_freed_with_the_client() {
    let Some(s) = Setup::new("rd-unclaimed") else {
        return;
    };
    // This test's own listener: its cgroup is outside the attach point.
    let outside = TcpListener::bind("127.0.0.1:0").unwrap();
    let outside_port = outside.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    {
        let accepted = Arc::clone(&accepted);
        thread::spawn(move || {
            for c in outside.incoming().flatten() {
                accepted.lock().unwrap().push(c);
            }
        });
    }
    // Three distinct ports nothing listens on (held together while chosen).
    let held: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let port = |i: usize| held[i].local_addr().unwrap().port();
    let (dead, orig_a, orig_b) = (port(0), port(1), port(2));
    drop(held);
    let path = s.dir.join("unclaimed.toml");
    let rule = |port: u16, proxy: u16| {
        format!(
            "[[redirect]]\ncgroup = \"{r}/app\"\nto = [\"127.0.0.1/32\"]\nports = \"{port}\"\nproxy = \"127.0.0.1:{proxy}\"\nproxy_uids = [1337]\n",
            r = s.root.rel
        )
    };
    fs::write(
        &path,
        format!(
            "attach = \"{}\"\n{}{}",
            s.root.rel,
            rule(orig_a, dead),
            rule(orig_b, outside_port)
        ),
    )
    .unwrap();
    let (code, _, err) = socklens(&["policy", "apply", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pairs_left(), 0);
    let refused = scaled(1000);
    let open = 5;
    let app = s.cg("app");
    let mut steps = vec![format!("connects,tcp4,127.0.0.1,{orig_a},{refused}")];
    steps.extend((0..open).map(|_| format!("connect,tcp4,127.0.0.1,{orig_b}")));
    steps.push("wait".into());
    let mut args = vec!["--cgroup", app.as_str()];
    args.extend(steps.iter().map(String::as_str));
    let mut client = Bed::spawn(&args);
    let r = client.report();
    let by_errno = r["steps"][0]["by_errno"].as_object().unwrap();
    assert_eq!(by_errno.len(), 1, "{r}");
    assert_eq!(by_errno[&ECONNREFUSED.to_string()], refused, "{r}");
    for i in 1..=open {
        assert_eq!(r["steps"][i]["errno"], 0, "{r}");
    }
    // The open ones' pairs wait for a claim that never comes.
    assert_eq!(pairs_left(), open);
    client.release();
    client.finish();
    // The proxy closes its ends too, so the clients' sockets reach TCP_CLOSE.
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.lock().unwrap().len() < open {
        assert!(Instant::now() < deadline, "the outside proxy accepted all");
        thread::sleep(Duration::from_millis(20));
    }
    accepted.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pairs_left() != 0 {
        assert!(
            Instant::now() < deadline,
            "{} pairs left after the clients closed",
            pairs_left()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let v = show();
    assert_eq!(v["redirects"][0]["redirected"], refused, "{v}");
    assert_eq!(v["redirects"][1]["redirected"], open, "{v}");
}
