//! Services, translated for real: backends this test runs inside a netns it
//! makes (loopback only), clients (socklens-testbed) in that netns and a
//! test-made cgroup, the policy attached at that cgroup. VIPs are documentation
//! addresses that exist nowhere: untranslated, a connect to them fails with
//! ENETUNREACH inside the netns (it has no route), so nothing leaves the host.
//! Root only; run single-threaded (the pinned policy is one per host).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ECONNREFUSED: i64 = libc::ECONNREFUSED as i64;
const ENETUNREACH: i64 = libc::ENETUNREACH as i64;

struct Bed {
    root: Cgroup,
    netns: Netns,
    dir: PathBuf,
}

impl Bed {
    /// None on a kernel older than 5.18 (bpf_loop 5.17, bpf_set_retval 5.18),
    /// after checking the documented fallback there: `policy apply` fails with
    /// exit 1 and one line naming the missing features.
    fn new(tag: &str) -> Option<Self> {
        require_root();
        let (code, _, err) = socklens(&["policy", "remove"]);
        assert_eq!(code, 0, "{err}");
        if policy_apply_fails_here(tag, "[[service]]\naddress = \"198.51.100.1:80\"\n") {
            return None;
        }
        let root = Cgroup::new(tag);
        fs::create_dir(root.path.join("cli")).expect("child cgroup");
        let dir = std::env::temp_dir().join(format!("sls-{}", unique(tag)));
        fs::create_dir_all(&dir).unwrap();
        Some(Self {
            netns: Netns::new(tag),
            root,
            dir,
        })
    }

    fn cli(&self) -> PathBuf {
        self.root.path.join("cli")
    }

    fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns.name)
    }

    /// A policy file of `services` (TOML), attached at this test's cgroup.
    fn file(&self, name: &str, services: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, format!("attach = \"{}\"\n{services}", self.root.rel)).unwrap();
        path
    }

    fn apply(&self, path: &Path) {
        let (code, out, err) = socklens(&["policy", "apply", path.to_str().unwrap()]);
        assert_eq!(code, 0, "apply failed: {err}");
        assert!(out.starts_with("applied "), "{out}");
    }

    /// A service limited to this test's netns.
    fn service(&self, vip: &str, proto: &str, backends: &[(SocketAddr, u32)]) -> String {
        let list: Vec<String> = backends
            .iter()
            .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
            .collect();
        format!(
            "[[service]]\naddress = \"{vip}\"\nproto = \"{proto}\"\nnetns = \"{}\"\nbackends = [{}]\n",
            self.netns_path(),
            list.join(", ")
        )
    }

    /// testbed in the client cgroup and this test's netns.
    fn run(&self, steps: &[&str]) -> Value {
        let cli = self.cli();
        let mut args = vec![
            "--netns",
            self.netns.name.as_str(),
            "--cgroup",
            cli.to_str().unwrap(),
        ];
        args.extend_from_slice(steps);
        testbed(&args)
    }

    /// Runs `f` on a thread inside this test's netns (sockets made there stay there).
    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let f_ns = fs::File::open(self.netns_path()).unwrap();
        thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(f_ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new(SOCKLENS).args(["policy", "remove"]).output();
        let _ = fs::remove_dir(self.cli());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A TCP backend in the netns: counts connections and keeps each peer address.
struct Tcp {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Tcp {
    fn start(bed: &Bed, addr: &str) -> Self {
        let listener = bed.in_netns(|| TcpListener::bind(addr).unwrap());
        // A deep accept queue: a SYN dropped on a full one is retried a second
        // later and would be accepted long after the connect loop moved on.
        // SAFETY: listen(2) again on our listening socket only resizes its queue.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 4096) }, 0);
        let accepted = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (a, p) = (Arc::clone(&accepted), Arc::clone(&peers));
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                if let Ok(peer) = s.peer_addr() {
                    p.lock().unwrap().push(peer);
                }
                a.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            addr: addr.parse().unwrap(),
            accepted,
            peers,
        }
    }

    fn count(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Waits until `f` holds (accepts trail the clients' connects a little).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP echo backend: keeps (client port, count) of what it received.
struct Udp {
    addr: SocketAddr,
    from: Arc<Mutex<BTreeMap<SocketAddr, u64>>>,
}

impl Udp {
    fn start(bed: &Bed, addr: &str) -> Self {
        let sock = bed.in_netns(|| UdpSocket::bind(addr).unwrap());
        let from = Arc::new(Mutex::new(BTreeMap::new()));
        let f = Arc::clone(&from);
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                *f.lock().unwrap().entry(peer).or_insert(0) += 1;
                let _ = sock.send_to(&buf[..n], peer);
            }
        });
        Self {
            addr: addr.parse().unwrap(),
            from,
        }
    }

    fn seen(&self) -> BTreeMap<SocketAddr, u64> {
        self.from.lock().unwrap().clone()
    }
}

fn show() -> Value {
    let (code, out, err) = socklens(&["policy", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

fn service_of(v: &Value, vip: &str) -> Value {
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == vip)
        .cloned()
        .unwrap_or_else(|| panic!("no service {vip} in {v}"))
}

/// Pearson's chi-square against `weights` is below the p = 0.001 critical value.
fn assert_proportions(observed: &[u64], weights: &[u64]) {
    let n: u64 = observed.iter().sum();
    let w: u64 = weights.iter().sum();
    let chi2: f64 = observed
        .iter()
        .zip(weights)
        .map(|(&o, &wi)| {
            let e = n as f64 * wi as f64 / w as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum();
    // Critical values at p = 0.001 for 1 and 2 degrees of freedom.
    let crit = [10.828, 13.816][observed.len() - 2];
    assert!(
        chi2 < crit,
        "observed {observed:?} for weights {weights:?}: chi2 {chi2:.2} >= {crit}"
    );
}

fn weighted_tcp(v6: bool) {
    let Some(bed) = Bed::new(if v6 { "s6" } else { "s4" }) else {
        return;
    };
    let (a, b, vip, proto) = if v6 {
        ("[::1]:8081", "[::1]:8082", "[2001:db8::10]:80", "tcp6")
    } else {
        (
            "127.0.0.2:8080",
            "127.0.0.3:8080",
            "198.51.100.10:80",
            "tcp4",
        )
    };
    let (sa, sb) = (Tcp::start(&bed, a), Tcp::start(&bed, b));
    let p = bed.file(
        "w.toml",
        &bed.service(vip, "tcp", &[(sa.addr, 3), (sb.addr, 1)]),
    );
    bed.apply(&p);
    let vip_addr: SocketAddr = vip.parse().unwrap();
    let (vip_ip, vip_port) = (vip_addr.ip().to_string(), vip_addr.port().to_string());
    let n = scaled(2000);
    let tb = bed.run(&[
        &format!("connects,{proto},{vip_ip},{vip_port},{n}"),
        &format!("connect,{proto},{vip_ip},{vip_port}"),
        "peer,0",
        &format!("connect,{proto},{},{}", sa.addr.ip(), sa.addr.port()),
        "peer,1",
    ]);
    assert_eq!(tb["steps"][0]["by_errno"], json!({"0": n}), "{tb}");
    eventually("every connection accepted", || {
        sa.count() + sb.count() == n + 2
    });
    // The translated socket's peer is the VIP; the untranslated one's the backend.
    assert_eq!(tb["steps"][2]["addr"], vip_ip, "{tb}");
    assert_eq!(tb["steps"][2]["port"], vip_addr.port(), "{tb}");
    assert_eq!(tb["steps"][4]["addr"], sa.addr.ip().to_string(), "{tb}");
    assert_eq!(tb["steps"][4]["port"], sa.addr.port(), "{tb}");
    // The server sees the client's own address and port, not a rewritten one.
    let port = tb["steps"][1]["local_port"].as_u64().unwrap() as u16;
    let client = if v6 { "::1" } else { "127.0.0.1" };
    let peers: Vec<SocketAddr> = [&sa, &sb]
        .iter()
        .flat_map(|s| s.peers.lock().unwrap().clone())
        .collect();
    assert!(
        peers
            .iter()
            .any(|p| p.port() == port && p.ip().to_string() == client),
        "client {client}:{port} not among the servers' peers"
    );
    // Accepts of the loop, less the one direct connect to `a` and the probe.
    let (ca, cb) = (sa.count() - 1, sb.count());
    let probe_went_to_a = u64::from(sa.peers.lock().unwrap().iter().any(|p| p.port() == port));
    let observed = [ca - probe_went_to_a, cb - (1 - probe_went_to_a)];
    assert_proportions(&observed, &[3, 1]);
    // The per-backend counters agree with what the servers accepted.
    let svc = service_of(&show(), &vip_addr.to_string());
    let picks: Vec<u64> = svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["picks"].as_u64().unwrap())
        .collect();
    assert_eq!(picks, [sa.count() - 1, sb.count()], "{svc}");
}

#[test]
fn tcp_v4_reaches_backends_in_weight_proportion_and_peer_is_the_vip() {
    weighted_tcp(false);
}

#[test]
fn tcp_v6_reaches_backends_in_weight_proportion_and_peer_is_the_vip() {
    weighted_tcp(true);
}

#[test]
fn v4_mapped_destination_on_a_v6_socket_uses_the_v4_service() {
    let Some(bed) = Bed::new("sm") else {
        return;
    };
    let sa = Tcp::start(&bed, "127.0.0.2:8080");
    let p = bed.file(
        "m.toml",
        &bed.service("198.51.100.11:80", "tcp", &[(sa.addr, 1)]),
    );
    bed.apply(&p);
    let tb = bed.run(&["connect,tcp6,::ffff:198.51.100.11,80", "peer,0"]);
    assert_eq!(tb["steps"][0]["errno"], 0, "{tb}");
    assert_eq!(tb["steps"][1]["addr"], "::ffff:198.51.100.11", "{tb}");
    eventually("the accept", || sa.count() == 1);
}

#[test]
fn udp_unconnected_replies_come_from_the_vip_and_a_socket_stays_on_one_backend() {
    let Some(bed) = Bed::new("su") else {
        return;
    };
    let (ua, ub) = (
        Udp::start(&bed, "127.0.0.2:5353"),
        Udp::start(&bed, "127.0.0.3:5353"),
    );
    let p = bed.file(
        "u.toml",
        &bed.service("198.51.100.53:53", "udp", &[(ua.addr, 1), (ub.addr, 1)]),
    );
    bed.apply(&p);
    let sockets = 20;
    let mut steps = Vec::new();
    for i in 0..sockets {
        // Socket i: a first datagram, 3 more, then the 4 echoes.
        steps.push("sendto,udp4,198.51.100.53,53".to_owned());
        for _ in 0..3 {
            steps.push(format!("sendto,{i},198.51.100.53,53,8"));
        }
        for _ in 0..4 {
            steps.push(format!("recv,{i}"));
        }
    }
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    let tb = bed.run(&refs);
    let mut ports = Vec::new();
    let mut replies = 0;
    for s in tb["steps"].as_array().unwrap() {
        match s["step"].as_str() {
            Some("sendto") if s.get("local_port").is_some() => {
                assert_eq!(s["errno"], 0, "{s}");
                ports.push(s["local_port"].as_u64().unwrap() as u16);
            }
            Some("recv") => {
                assert_eq!(s["errno"], 0, "{s}");
                assert_eq!(s["from_addr"], "198.51.100.53", "reply source: {s}");
                assert_eq!(s["from_port"], 53, "reply source: {s}");
                replies += 1;
            }
            _ => {}
        }
    }
    assert_eq!(ports.len(), sockets);
    assert_eq!(replies, 4 * sockets);
    let (a, b) = (ua.seen(), ub.seen());
    for port in &ports {
        let in_a = a.iter().find(|(k, _)| k.port() == *port).map(|(_, n)| *n);
        let in_b = b.iter().find(|(k, _)| k.port() == *port).map(|(_, n)| *n);
        match (in_a, in_b) {
            (Some(4), None) | (None, Some(4)) => {}
            other => panic!("socket port {port}: datagrams at (a, b) = {other:?}"),
        }
    }
    // 20 sockets by cookie over two equal backends: both get some.
    assert!(!a.is_empty() && !b.is_empty(), "a {a:?} b {b:?}");
}

#[test]
fn udp_connected_socket_sends_to_a_backend_and_reads_the_vip() {
    let Some(bed) = Bed::new("sc") else {
        return;
    };
    let ua = Udp::start(&bed, "127.0.0.2:5353");
    let p = bed.file(
        "c.toml",
        &bed.service("198.51.100.54:53", "udp", &[(ua.addr, 1)]),
    );
    bed.apply(&p);
    let tb = bed.run(&[
        "connect,udp4,198.51.100.54,53",
        "peer,0",
        "send,0,8,8",
        "recv,0",
    ]);
    assert_eq!(tb["steps"][0]["errno"], 0, "{tb}");
    assert_eq!(tb["steps"][1]["addr"], "198.51.100.54", "{tb}");
    assert_eq!(tb["steps"][1]["port"], 53, "{tb}");
    assert_eq!(tb["steps"][3]["from_addr"], "198.51.100.54", "{tb}");
    assert_eq!(tb["steps"][3]["from_port"], 53, "{tb}");
    let port = tb["steps"][0]["local_port"].as_u64().unwrap() as u16;
    assert!(
        ua.seen().keys().any(|k| k.port() == port),
        "{:?}",
        ua.seen()
    );
}

#[test]
fn zero_backends_fail_at_once_with_econnrefused() {
    let Some(bed) = Bed::new("sz") else {
        return;
    };
    let p = bed.file(
        "z.toml",
        &(bed.service("198.51.100.12:80", "tcp", &[])
            + &bed.service("198.51.100.12:53", "udp", &[])),
    );
    bed.apply(&p);
    let tb = bed.run(&[
        "connects,tcp4,198.51.100.12,80,10",
        "sendto,udp4,198.51.100.12,53",
    ]);
    assert_eq!(tb["steps"][0]["by_errno"], json!({"111": 10}), "{tb}");
    assert_eq!(tb["steps"][1]["errno"], ECONNREFUSED, "{tb}");
    let v = show();
    assert_eq!(service_of(&v, "198.51.100.12:80")["failed_picks"], 10);
    assert_eq!(service_of(&v, "198.51.100.12:53")["failed_picks"], 1);
}

#[test]
fn other_netns_is_not_translated_unless_the_service_says_so() {
    let Some(bed) = Bed::new("sn") else {
        return;
    };
    let sa = Tcp::start(&bed, "127.0.0.2:8080");
    // No netns key: the applier's (this process', the host's) namespace only.
    let p = bed.file(
        "n.toml",
        "[[service]]\naddress = \"198.51.100.13:80\"\nbackends = [{ address = \"127.0.0.2:8080\" }]\n",
    );
    bed.apply(&p);
    let tb = bed.run(&["connect,tcp4,198.51.100.13,80"]);
    assert_eq!(tb["steps"][0]["errno"], ENETUNREACH, "{tb}");
    let p = bed.file(
        "n2.toml",
        "[[service]]\naddress = \"198.51.100.13:80\"\nnetns = \"any\"\nbackends = [{ address = \"127.0.0.2:8080\" }]\n",
    );
    bed.apply(&p);
    let tb = bed.run(&["connect,tcp4,198.51.100.13,80"]);
    assert_eq!(tb["steps"][0]["errno"], 0, "{tb}");
    eventually("the accept", || sa.count() == 1);
}

#[test]
fn removed_backend_gets_no_connection_after_apply_returns() {
    let Some(bed) = Bed::new("sr") else {
        return;
    };
    let (sa, sb) = (
        Tcp::start(&bed, "127.0.0.2:8080"),
        Tcp::start(&bed, "127.0.0.3:8080"),
    );
    let both = bed.file(
        "both.toml",
        &bed.service("198.51.100.14:80", "tcp", &[(sa.addr, 1), (sb.addr, 1)]),
    );
    let only_a = bed.file(
        "a.toml",
        &bed.service("198.51.100.14:80", "tcp", &[(sa.addr, 1)]),
    );
    let t0 = Instant::now();
    bed.apply(&both);
    // The loop must outlast the next apply (seconds in an emulated VM).
    let ms = 3000 + 6 * t0.elapsed().as_millis();
    let netns = bed.netns.name.clone();
    let cli = bed.cli();
    let connect_for = move |ms: u128| {
        testbed(&[
            "--netns",
            &netns,
            "--cgroup",
            cli.to_str().unwrap(),
            &format!("connects_for,tcp4,198.51.100.14,80,{ms}"),
        ])
    };
    let looper = {
        let connect_for = connect_for.clone();
        thread::spawn(move || connect_for(ms))
    };
    // Both backends in use before the update, however slow the loop's start.
    eventually("both backends used", || sa.count() > 0 && sb.count() > 0);
    bed.apply(&only_a);
    // Connections translated before the flip may still be in the accept queue
    // (or its thread not yet scheduled on a busy host): wait until b's count
    // stands still for 300 ms while the loop keeps connecting.
    let mut b_at_apply = sb.count();
    let settle = Instant::now() + Duration::from_secs(5);
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = sb.count();
        if now == b_at_apply || Instant::now() > settle {
            break;
        }
        b_at_apply = now;
    }
    // A loop wholly after the update, beside the one that spans it.
    let a_before = sa.count();
    let after = connect_for(300);
    let n_after = after["steps"][0]["n"].as_u64().unwrap();
    assert!(n_after > 0, "{after}");
    let tb = looper.join().unwrap();
    let n = tb["steps"][0]["n"].as_u64().unwrap();
    assert_eq!(tb["steps"][0]["by_errno"], json!({"0": n}), "{tb}");
    assert_eq!(
        after["steps"][0]["by_errno"],
        json!({"0": n_after}),
        "{after}"
    );
    eventually("every connection accepted", || {
        sa.count() + sb.count() == n + n_after
    });
    assert!(
        sa.count() >= a_before + n_after,
        "the loop after the update reached a"
    );
    assert_eq!(
        sb.count(),
        b_at_apply,
        "b got connections after apply returned"
    );
}

#[test]
fn survives_kill_9_of_the_applier_then_remove_restores_plain_connects() {
    let Some(bed) = Bed::new("sk") else {
        return;
    };
    let sa = Tcp::start(&bed, "127.0.0.2:8080");
    let p = bed.file(
        "k.toml",
        &bed.service("198.51.100.15:80", "tcp", &[(sa.addr, 1)]),
    );
    let mut child = Command::new(SOCKLENS)
        .args(["policy", "apply", "--follow", p.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("following policy events"), "{line}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let tb = bed.run(&["connects,tcp4,198.51.100.15,80,100"]);
    assert_eq!(tb["steps"][0]["by_errno"], json!({"0": 100}), "{tb}");
    eventually("every connection accepted", || sa.count() == 100);

    let (code, _, err) = socklens(&["policy", "remove"]);
    assert_eq!(code, 0, "{err}");
    assert!(!pin_root().exists());
    let tb = bed.run(&["connects,tcp4,198.51.100.15,80,10"]);
    assert_eq!(
        tb["steps"][0]["by_errno"],
        json!({ ENETUNREACH.to_string(): 10 }),
        "plain connects after remove: {tb}"
    );
}

#[test]
fn no_translation_state_left_after_many_short_connections() {
    let Some(bed) = Bed::new("sl") else {
        return;
    };
    // Eight backends: the clients' TIME_WAIT sockets spread over eight 4-tuple
    // spaces, so 100,000 connects do not exhaust the ephemeral ports.
    let servers: Vec<Tcp> = (2..10)
        .map(|i| Tcp::start(&bed, &format!("127.0.0.{i}:8080")))
        .collect();
    let ua = Udp::start(&bed, "127.0.0.2:5353");
    let weights: Vec<(SocketAddr, u32)> = servers.iter().map(|s| (s.addr, 1)).collect();
    let p = bed.file(
        "l.toml",
        &(bed.service("198.51.100.16:80", "tcp", &weights)
            + &bed.service("198.51.100.16:53", "udp", &[(ua.addr, 1)])),
    );
    bed.apply(&p);
    let n = scaled(100_000);
    let udp = scaled(300);
    let mut steps = vec![format!("connects,tcp4,198.51.100.16,80,{n}")];
    steps.extend((0..udp).map(|_| "sendto,udp4,198.51.100.16,53".to_owned()));
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    let tb = bed.run(&refs);
    assert_eq!(tb["steps"][0]["by_errno"], json!({"0": n}), "{tb}");
    let v = show();
    assert_eq!(
        v["translated_sockets"],
        json!({"live": 0, "total": n + udp}),
        "{v}"
    );
}

#[test]
fn the_policy_judges_the_backend_not_the_vip() {
    let Some(bed) = Bed::new("sp") else {
        return;
    };
    let (sa, sb) = (
        Tcp::start(&bed, "127.0.0.2:8080"),
        Tcp::start(&bed, "127.0.0.3:8080"),
    );
    // Deny the VIP's own address (no effect) and backend b (every pick of b fails).
    let rules = format!(
        "[[scope]]\ncgroup = \"{root}/cli\"\n[[scope.rule]]\nid = 1\naction = \"deny\"\non = [\"connect\"]\ncidr = \"198.51.100.17/32\"\n[[scope.rule]]\nid = 2\naction = \"deny\"\non = [\"connect\"]\ncidr = \"127.0.0.3/32\"\n",
        root = bed.root.rel
    );
    let p = bed.file(
        "p.toml",
        &(rules + &bed.service("198.51.100.17:80", "tcp", &[(sa.addr, 1), (sb.addr, 1)])),
    );
    bed.apply(&p);
    let n = scaled(400);
    let tb = bed.run(&[&format!("connects,tcp4,198.51.100.17,80,{n}")]);
    let by = &tb["steps"][0]["by_errno"];
    let ok = by["0"].as_u64().unwrap_or(0);
    let denied = by[libc::EACCES.to_string()].as_u64().unwrap_or(0);
    assert_eq!(ok + denied, n, "{tb}");
    assert!(ok > 0 && denied > 0, "both backends picked: {tb}");
    eventually("the allowed connections accepted", || sa.count() == ok);
    assert_eq!(sb.count(), 0, "b is denied");
    let picks: Vec<u64> = service_of(&show(), "198.51.100.17:80")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["picks"].as_u64().unwrap())
        .collect();
    assert_eq!(picks, [ok, denied]);
}

#[test]
fn byte_accounting_is_exact_for_translated_connections() {
    let Some(bed) = Bed::new("sb") else {
        return;
    };
    let backend: SocketAddr = "127.0.0.2:8080".parse().unwrap();
    let p = bed.file(
        "b.toml",
        &bed.service("198.51.100.18:80", "tcp", &[(backend, 1)]),
    );
    bed.apply(&p);
    let tracer = Tracer::start(&["--events", "close"]);
    let ns = bed.netns.name.clone();
    let server = common::Bed::spawn(&[
        "--netns",
        &ns,
        "bind,tcp4,127.0.0.2,8080",
        "listen,0,8",
        "announce",
        "accept,0",
        "send,1,30000,1000",
        "recvall,1,65536",
        "close,1",
    ]);
    server.report();
    let client = bed.run(&[
        "connect,tcp4,198.51.100.18,80",
        "send,0,100000,100",
        "shutdown,0",
        "recvall,0,65536",
        "close,0",
    ]);
    let server = server.finish();
    assert_eq!(server["steps"][4]["bytes"], 100_000, "{server}");
    assert_eq!(client["steps"][3]["bytes"], 30_000, "{client}");
    wait_tcp_closed(8080, &[Some(ns.as_str())], Duration::from_secs(20));
    let stopped = tracer.stop();
    stopped.assert_clean();
    let closes = stopped.of_kind("close");
    let sport = client["steps"][0]["local_port"].clone();
    let out: Vec<&&Value> = closes
        .iter()
        .filter(|e| e["pid"] == client["pid"] && e["sport"] == sport)
        .collect();
    assert_eq!(out.len(), 1, "{closes:?}");
    // The record carries the real backend tuple and the exact bytes.
    assert_eq!(out[0]["daddr"], "127.0.0.2", "{}", out[0]);
    assert_eq!(out[0]["dport"], 8080, "{}", out[0]);
    assert_eq!(out[0]["tx_bytes"], 100_000, "{}", out[0]);
    assert_eq!(out[0]["rx_bytes"], 30_000, "{}", out[0]);
    let inn: Vec<&&Value> = closes
        .iter()
        .filter(|e| e["pid"] == server["pid"] && e["dport"] == sport)
        .collect();
    assert_eq!(inn.len(), 1, "{closes:?}");
    assert_eq!(inn[0]["tx_bytes"], 30_000, "{}", inn[0]);
    assert_eq!(inn[0]["rx_bytes"], 100_000, "{}", inn[0]);
}

/// A TCP backend in the netns that echoes every byte on each connection and
/// counts the connections that ended in a reset (ECONNRESET).
fn echo_backend(bed: &Bed, addr: &str) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = bed.in_netns(|| TcpListener::bind(addr).unwrap());
    let resets = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&resets);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let r = Arc::clone(&r);
            thread::spawn(move || {
                let mut b = [0u8; 64];
                loop {
                    match std::io::Read::read(&mut s, &mut b) {
                        Ok(0) => break,
                        Ok(n) => {
                            if std::io::Write::write_all(&mut s, &b[..n]).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            if e.raw_os_error() == Some(libc::ECONNRESET) {
                                r.fetch_add(1, Ordering::SeqCst);
                            }
                            break;
                        }
                    }
                }
            });
        }
    });
    (addr.parse().unwrap(), resets)
}

#[test]
fn terminate_resets_open_connections_of_removed_and_drained_backends_only() {
    let Some(bed) = Bed::new("st") else {
        return;
    };
    let backends = [
        "127.0.0.2:8080",
        "127.0.0.3:8080",
        "127.0.0.4:8080",
        "127.0.0.5:8080",
        "127.0.0.6:8080",
    ]
    .map(|x| echo_backend(&bed, x));
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|i| backends[i].0);
    let resets = |i: usize| backends[i].1.load(Ordering::SeqCst);
    let ns = bed.netns_path();
    let svc = |vip: &str, backends: &str| {
        format!("[[service]]\naddress = \"{vip}\"\nnetns = \"{ns}\"\nbackends = [{backends}]\n")
    };
    // Removed with terminate, removed without, drained (weight 0) with terminate.
    let before = bed.file(
        "before.toml",
        &[
            svc(
                "198.51.100.20:80",
                &format!("{{ address = \"{a}\", terminate = true }}"),
            ),
            svc("198.51.100.21:80", &format!("{{ address = \"{b}\" }}")),
            svc(
                "198.51.100.22:80",
                &format!("{{ address = \"{d}\" }}, {{ address = \"{e}\", weight = 0 }}"),
            ),
        ]
        .concat(),
    );
    let after = bed.file(
        "after.toml",
        &[
            svc("198.51.100.20:80", &format!("{{ address = \"{c}\" }}")),
            svc("198.51.100.21:80", &format!("{{ address = \"{c}\" }}")),
            svc("198.51.100.22:80", &format!("{{ address = \"{d}\", weight = 0, terminate = true }}, {{ address = \"{e}\" }}")),
        ]
        .concat(),
    );
    bed.apply(&before);
    let cli = bed.cli();
    let mut tb = common::Bed::spawn(&[
        "--netns",
        &bed.netns.name,
        "--cgroup",
        cli.to_str().unwrap(),
        "connect,tcp4,198.51.100.20,80",
        "connect,tcp4,198.51.100.21,80",
        "connect,tcp4,198.51.100.22,80",
        "ping,0",
        "ping,1",
        "ping,2",
        "wait",
        "ping,0",
        "ping,1",
        "ping,2",
        "connect,tcp4,198.51.100.20,80",
        "peer,3",
    ]);
    let first = tb.report();
    for i in 0..6 {
        assert_eq!(first["steps"][i]["errno"], 0, "{first}");
    }
    let (code, out, err) = socklens(&["policy", "apply", after.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    tb.release();
    let last = tb.finish();
    let errno = |i: usize| last["steps"][i]["errno"].as_i64().unwrap();
    // bpf_sock_destroy came with Linux 6.5.
    if kernel_release() >= (6, 5) {
        assert!(
            out.contains("; 2 connections of removed backends reset"),
            "{out}"
        );
        // The client's socket is aborted (the kernel's errno for a destroyed
        // socket); the backend gets the RST.
        assert_eq!(
            errno(6),
            libc::ECONNABORTED as i64,
            "removed with terminate: {last}"
        );
        assert_eq!(
            errno(8),
            libc::ECONNABORTED as i64,
            "drained with terminate: {last}"
        );
        eventually("the backends see the resets", || {
            resets(0) == 1 && resets(3) == 1
        });
        assert!(err.is_empty(), "{err}");
    } else {
        // The documented fallback: one warning line, the connections go on.
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("lacks bpf_sock_destroy"), "{err}");
        assert_eq!(errno(6), 0, "{last}");
        assert_eq!(errno(8), 0, "{last}");
    }
    assert_eq!(errno(7), 0, "removed without terminate continues: {last}");
    assert_eq!((resets(1), resets(2), resets(4)), (0, 0, 0));
    // New connections to the VIP reach the new backend.
    assert_eq!(last["steps"][9]["errno"], 0, "{last}");
    assert_eq!(last["steps"][10]["addr"], "198.51.100.20", "{last}");
}

#[test]
fn conns_established_and_close_records_name_the_service_beside_the_backend() {
    let Some(bed) = Bed::new("so") else {
        return;
    };
    let backend: SocketAddr = "127.0.0.2:8080".parse().unwrap();
    let _sa = Tcp::start(&bed, "127.0.0.2:8080");
    let p = bed.file(
        "o.toml",
        &bed.service("198.51.100.20:80", "tcp", &[(backend, 1)]),
    );
    bed.apply(&p);
    // Started after apply: it joins the pinned translation state.
    let tracer = Tracer::start(&["--events", "established,close"]);
    let ns = bed.netns.name.clone();
    let cli = bed.cli();
    let mut client = common::Bed::spawn(&[
        "--netns",
        &ns,
        "--cgroup",
        cli.to_str().unwrap(),
        "connect,tcp4,198.51.100.20,80",
        "connect,tcp4,127.0.0.2,8080",
        "wait",
        "close,0",
        "close,1",
    ]);
    let open = client.report();
    let pid = open["pid"].clone();
    let (via_vip, direct) = (
        open["steps"][0]["local_port"].clone(),
        open["steps"][1]["local_port"].clone(),
    );
    assert_eq!(open["steps"][0]["errno"], 0, "{open}");
    // A snapshot of the open connections (the socket iterator reads the state).
    let (snap, _) = conns_snapshot(0.5, &[], || {});
    let snap: Vec<&Value> = snap.iter().collect();
    assert_steered(
        record_of(&snap, &pid, &via_vip),
        "service",
        ("198.51.100.20", 80),
        backend,
    );
    assert_not_steered(record_of(&snap, &pid, &direct));
    client.release();
    client.finish();
    // Every close has happened in the kernel (the backend keeps listening).
    eventually("the connections closed", || {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns, "ss", "-tanH", "state", "all"])
            .args(["exclude", "time-wait", "exclude", "listening"])
            .arg("( sport = :8080 or dport = :8080 )")
            .output()
            .unwrap();
        o.status.success() && o.stdout.is_empty()
    });
    let stopped = tracer.stop();
    stopped.assert_clean();
    for kind in ["established", "close"] {
        let recs = stopped.of_kind(kind);
        let rec = record_of(&recs, &pid, &via_vip);
        if events_carry_steering() {
            assert_steered(rec, "service", ("198.51.100.20", 80), backend);
        } else {
            assert_not_steered(rec);
        }
        assert_not_steered(record_of(&recs, &pid, &direct));
    }
    // The server's side of the translated connection was not steered.
    let server_side: Vec<&Value> = stopped
        .of_kind("close")
        .into_iter()
        .filter(|e| e["sport"] == 8080 && e["dport"] == via_vip)
        .collect();
    assert_eq!(server_side.len(), 1, "{server_side:?}");
    assert_not_steered(server_side[0]);
}

#[test]
fn trace_translate_shows_each_translation_with_cookie_vip_and_backend() {
    let Some(bed) = Bed::new("sx") else {
        return;
    };
    let (sa, sb) = (
        Tcp::start(&bed, "127.0.0.2:8080"),
        Tcp::start(&bed, "127.0.0.3:8080"),
    );
    let ua = Udp::start(&bed, "127.0.0.2:5353");
    let p = bed.file(
        "x.toml",
        &(bed.service("198.51.100.21:80", "tcp", &[(sa.addr, 1), (sb.addr, 1)])
            + &bed.service("198.51.100.21:53", "udp", &[(ua.addr, 1)])),
    );
    bed.apply(&p);
    let tracer = Tracer::start(&["--events", "translate"]);
    let n = scaled(200);
    let tb = bed.run(&[
        &format!("connects,tcp4,198.51.100.21,80,{n}"),
        "connect,tcp4,127.0.0.2,8080",
        "sendto,udp4,198.51.100.21,53",
    ]);
    assert_eq!(tb["steps"][0]["by_errno"], json!({"0": n}), "{tb}");
    eventually("every connection accepted", || {
        sa.count() + sb.count() == n + 1
    });
    let stopped = tracer.stop();
    stopped.assert_clean();
    let ours: Vec<&Value> = stopped
        .of_kind("translate")
        .into_iter()
        .filter(|e| e["pid"] == tb["pid"])
        .collect();
    let tcp: Vec<&&Value> = ours.iter().filter(|e| e["proto"] == "tcp").collect();
    // One record per translated connect, none for the direct one; the
    // backends they name are the ones that accepted.
    assert_eq!(tcp.len() as u64, n, "{ours:?}");
    let to = |addr: SocketAddr| {
        tcp.iter()
            .filter(|e| e["real_addr"] == addr.ip().to_string() && e["real_port"] == addr.port())
            .count() as u64
    };
    assert_eq!((to(sa.addr), to(sb.addr)), (sa.count() - 1, sb.count()));
    let mut cookies = std::collections::BTreeSet::new();
    for e in &tcp {
        assert_eq!(e["addr"], "198.51.100.21", "{e}");
        assert_eq!(e["port"], 80, "{e}");
        assert_eq!(e["steered"], "service", "{e}");
        assert_eq!(e["netns"], netns_inode(&bed.netns.name), "{e}");
        let c = e["cookie"].as_u64().unwrap();
        assert!(c != 0 && cookies.insert(c), "cookies are per socket: {e}");
    }
    let udp: Vec<&&Value> = ours.iter().filter(|e| e["proto"] == "udp").collect();
    assert_eq!(udp.len(), 1, "{ours:?}");
    assert_eq!(udp[0]["addr"], "198.51.100.21", "{}", udp[0]);
    assert_eq!(udp[0]["port"], 53, "{}", udp[0]);
    assert_eq!(udp[0]["real_addr"], "127.0.0.2", "{}", udp[0]);
    assert_eq!(udp[0]["real_port"], 5353, "{}", udp[0]);
    assert_eq!(ua.seen().values().sum::<u64>(), 1);
}

#[test]
fn agent_counts_picks_failed_picks_and_bytes_per_service() {
    let Some(bed) = Bed::new("sg") else {
        return;
    };
    let (sa, sb) = (
        Tcp::start(&bed, "127.0.0.2:8080"),
        Tcp::start(&bed, "127.0.0.3:8080"),
    );
    let (echo, _) = echo_backend(&bed, "127.0.0.4:8080");
    let p = bed.file(
        "g.toml",
        &(bed.service("198.51.100.22:80", "tcp", &[(sa.addr, 1), (sb.addr, 1)])
            + &bed.service("198.51.100.23:80", "tcp", &[(echo, 1)])
            + &bed.service("198.51.100.24:80", "tcp", &[])),
    );
    let agent = Agent::with_policy(&bed.dir, &p, &bed.root.rel);
    let n = 30;
    let tb = bed.run(&[
        &format!("connects,tcp4,198.51.100.22,80,{n}"),
        "connects,tcp4,198.51.100.24,80,7",
        "connect,tcp4,198.51.100.23,80",
        "send,0,5000,1000",
        "shutdown,0",
        "recvall,0,65536",
        "close,0",
    ]);
    assert_eq!(tb["steps"][0]["by_errno"], json!({"0": n}), "{tb}");
    assert_eq!(tb["steps"][1]["by_errno"], json!({"111": 7}), "{tb}");
    assert_eq!(tb["steps"][5]["bytes"], 5000, "{tb}");
    eventually("every connection accepted", || sa.count() + sb.count() == n);
    let want = |text: &str| {
        let picks = |b: SocketAddr| {
            metric_sum(
                text,
                "socklens_service_picks_total",
                &[
                    "service=\"198.51.100.22:80\"",
                    "proto=\"tcp\"",
                    &format!("backend=\"{b}\""),
                ],
            )
        };
        let svc23 = ["service=\"198.51.100.23:80\""];
        // The kprobe tier labels only connections a map read saw open.
        let unlabelled = !events_carry_steering();
        [
            picks(sa.addr) == Some(sa.count() as f64),
            picks(sb.addr) == Some(sb.count() as f64),
            metric_sum(
                text,
                "socklens_service_failed_picks_total",
                &["service=\"198.51.100.24:80\""],
            ) == Some(7.0),
            unlabelled || metric_sum(text, "socklens_sent_bytes_total", &svc23) == Some(5000.0),
            unlabelled || metric_sum(text, "socklens_received_bytes_total", &svc23) == Some(5000.0),
            unlabelled
                || metric_sum(text, "socklens_connections_closed_total", &svc23) == Some(1.0),
        ]
    };
    agent.wait_metrics(|text| {
        let got = want(text);
        if got.iter().all(|ok| *ok) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    agent.stop();
}
