//! Live-test harness: runs the real socklens binary as root against socket
//! activity the tests create with socklens-testbed, and compares the two.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SOCKLENS: &str = env!("CARGO_BIN_EXE_socklens");
pub const TESTBED: &str = env!("CARGO_BIN_EXE_socklens-testbed");

/// Live tests load BPF programs: they need root and never skip (CI runs as root).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "live tests need root: run the suite as root (docs/testing.md)"
    );
}

/// `--attach` value for every trace: SOCKLENS_ATTACH lets the kernel matrix
/// force each tier in turn.
pub fn attach_arg() -> String {
    std::env::var("SOCKLENS_ATTACH").unwrap_or_else(|_| "auto".into())
}

/// The tier every event must report: SOCKLENS_EXPECT_TIER, else a forced tier.
pub fn expected_tier() -> Option<String> {
    std::env::var("SOCKLENS_EXPECT_TIER")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| Some(attach_arg()).filter(|a| a != "auto"))
}

/// The running kernel's (major, minor) release, from uname(2).
pub fn kernel_release() -> (u32, u32) {
    let u = nix::sys::utsname::uname().expect("uname");
    let rel = u.release().to_string_lossy().into_owned();
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().expect("numeric release"));
    (it.next().expect("major"), it.next().expect("minor"))
}

/// How much of the repetition-heavy work (e.g. thousands of short connections)
/// a test does: `SOCKLENS_TEST_SCALE`, a fraction in (0, 1], default 1. The
/// kernel matrix sets 0.1: its VMs run under TCG, about 20 times slower than the
/// host. What a test checks never changes with the scale, only how many times.
pub fn scale() -> f64 {
    match std::env::var("SOCKLENS_TEST_SCALE") {
        Ok(s) if !s.is_empty() => {
            let f: f64 = s
                .parse()
                .unwrap_or_else(|e| panic!("SOCKLENS_TEST_SCALE={s:?}: {e}"));
            assert!(
                f > 0.0 && f <= 1.0,
                "SOCKLENS_TEST_SCALE={s:?} not in (0, 1]"
            );
            f
        }
        _ => 1.0,
    }
}

/// `n` scaled by [`scale`], at least 1.
pub fn scaled(n: u64) -> u64 {
    ((n as f64 * scale()).round() as u64).max(1)
}

/// A name unique to this test run, usable as a comm (at most 15 bytes).
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let s = format!("{tag}{}{n}", std::process::id() % 100_000);
    s.chars().take(15).collect()
}

/// Reads a socklens child's stdout into a channel of lines and its stderr into
/// a shared string, each on its own thread, so neither pipe ever fills.
pub fn watch_output(child: &mut Child) -> (Receiver<String>, Arc<Mutex<String>>) {
    let (tx, lines) = channel();
    let stdout = child.stdout.take().expect("stdout");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (lines, watch_stderr(child))
}

/// Reads a child's stderr into a shared string on its own thread.
pub fn watch_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let stderr = Arc::new(Mutex::new(String::new()));
    let shared = Arc::clone(&stderr);
    let err = child.stderr.take().expect("stderr");
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut s = shared.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    stderr
}

/// Waits until socklens printed its ready line ("Ctrl-C to stop"), failing
/// with its stderr if it exits first or takes longer than `wait`.
pub fn wait_ready(child: &mut Child, stderr: &Mutex<String>, wait: Duration) {
    let text = || stderr.lock().unwrap().clone();
    let deadline = Instant::now() + wait;
    while !text().contains("Ctrl-C to stop") {
        if let Ok(Some(status)) = child.try_wait() {
            thread::sleep(Duration::from_millis(100));
            panic!("socklens exited early ({status}): {}", text());
        }
        assert!(Instant::now() < deadline, "socklens not ready: {}", text());
        thread::sleep(Duration::from_millis(20));
    }
}

pub struct Tracer {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

pub struct Stopped {
    pub status: ExitStatus,
    pub events: Vec<Value>,
    pub summary: Option<Value>,
    pub stderr: String,
}

impl Tracer {
    /// Starts `socklens trace --json ARGS` and waits until it is attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_env(args, &[])
    }

    /// The same with these environment variables set for socklens.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let attach = attach_arg();
        let mut child = Command::new(SOCKLENS)
            .args(["trace", "--json", "--attach", &attach])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn socklens");
        let (lines, stderr) = watch_output(&mut child);
        wait_ready(&mut child, &stderr, Duration::from_secs(30));
        Self {
            child,
            lines,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then everything it printed.
    pub fn stop(mut self) -> Stopped {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
        let status = self.child.wait().expect("wait");
        thread::sleep(Duration::from_millis(50));
        let mut events = Vec::new();
        let mut summary = None;
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
            if v["event"] == "summary" {
                summary = Some(v);
            } else {
                events.push(v);
            }
        }
        Stopped {
            status,
            events,
            summary,
            stderr: self.stderr(),
        }
    }
}

impl Stopped {
    /// Asserts a clean exit: status 0, a summary line, nothing lost.
    pub fn assert_clean(&self) {
        assert!(
            self.status.success(),
            "socklens exit {}: {}",
            self.status,
            self.stderr
        );
        let summary = self
            .summary
            .as_ref()
            .unwrap_or_else(|| panic!("no summary line: {}", self.stderr));
        assert_eq!(summary["lost"], 0, "{summary}");
        assert_eq!(summary["malformed"], 0, "{summary}");
        if let Some(tier) = expected_tier() {
            // cgroup hook events have no tiers: they attach to cgroups.
            for e in self.events.iter().filter(|e| e["attach"] != "cgroup") {
                assert_eq!(e["attach"], tier.as_str(), "event from the wrong tier: {e}");
            }
        }
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }

    pub fn of_pid(&self, pid: u64) -> Vec<&Value> {
        self.events.iter().filter(|e| e["pid"] == pid).collect()
    }
}

/// Runs socklens-testbed to completion and returns its report.
pub fn testbed(args: &[&str]) -> Value {
    let out = Command::new(TESTBED)
        .args(args)
        .output()
        .expect("spawn testbed");
    assert!(
        out.status.success(),
        "testbed {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).expect("testbed JSON")
}

/// A testbed started with --wait: its pid is known before it does anything.
pub struct Waiting {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
    pub pid: u64,
}

impl Waiting {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(TESTBED)
            .arg("--wait")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn testbed");
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("ready line");
        let ready: Value = serde_json::from_str(&line).expect("ready JSON");
        let pid = ready["pid"].as_u64().expect("pid");
        Self {
            child,
            stdin,
            out,
            pid,
        }
    }

    pub fn go(mut self) -> Value {
        writeln!(self.stdin).expect("release testbed");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("report line");
        assert!(self.child.wait().expect("wait").success());
        serde_json::from_str(&line).expect("report JSON")
    }
}

/// A network namespace made for one test, with lo up; removed on drop.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("sl-{}", unique(tag));
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory made for one test; removed on drop.
pub struct Cgroup {
    pub path: std::path::PathBuf,
    pub rel: String,
}

pub fn cgroup2_root() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
        .expect("cgroup v2 mounted")
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        let rel = format!("sl-test-{}", unique(tag));
        let path = cgroup2_root().join(&rel);
        std::fs::create_dir(&path).expect("create cgroup");
        Self {
            path,
            rel: format!("/{rel}"),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Where socklens pins (SOCKLENS_PIN_ROOT lets two suites share a host).
pub fn pin_root() -> std::path::PathBuf {
    std::env::var_os("SOCKLENS_PIN_ROOT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| "/sys/fs/bpf/socklens".into(), std::path::PathBuf::from)
}

/// IDs of loaded BPF programs named like socklens' (all start with "sl_").
/// Other socklens instances may run on the same host: compare ID sets.
pub fn socklens_programs() -> std::collections::BTreeSet<u32> {
    libbpf_rs::query::ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("sl_"))
        .map(|p| p.id)
        .collect()
}

/// Runs socklens with ARGS to completion: (exit code, stdout, stderr).
pub fn socklens(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SOCKLENS)
        .args(args)
        .output()
        .expect("spawn socklens");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A testbed running in the background: read its `announce`/`wait` reports
/// as they come, release its `wait` steps, then collect the final report.
pub struct Bed {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Bed {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(TESTBED)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn testbed");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// The next report line (from `announce`, `wait` or the end).
    pub fn report(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("testbed report in time");
        serde_json::from_str(&line).expect("testbed JSON")
    }

    /// Lets a `wait` step go on.
    pub fn release(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin).expect("release testbed");
        stdin.flush().expect("flush");
    }

    /// Waits for the exit and returns the final report.
    pub fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait testbed");
        assert!(status.success(), "testbed failed: {status}");
        let mut last = None;
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            last = Some(line);
        }
        serde_json::from_str(&last.expect("final report")).expect("testbed JSON")
    }
}

/// The inode of a named netns, as socklens reports `netns`.
pub fn netns_inode(name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/var/run/netns/{name}"))
        .expect("netns")
        .ino()
}

/// Two netns joined by a veth pair, 10.77.N.1 (a) and 10.77.N.2 (b).
pub struct NetnsPair {
    pub a: Netns,
    pub b: Netns,
    pub addr_a: String,
    pub addr_b: String,
}

impl NetnsPair {
    pub fn new(tag: &str) -> Self {
        static NET: AtomicU32 = AtomicU32::new(0);
        let n = NET.fetch_add(1, Ordering::Relaxed) % 200;
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        let (va, vb) = (format!("sla{}", unique("")), format!("slb{}", unique("")));
        ip(&[
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ]);
        let (addr_a, addr_b) = (format!("10.77.{n}.1"), format!("10.77.{n}.2"));
        ip(&[
            "-n",
            &a.name,
            "addr",
            "add",
            &format!("{addr_a}/24"),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &b.name,
            "addr",
            "add",
            &format!("{addr_b}/24"),
            "dev",
            &vb,
        ]);
        ip(&["-n", &a.name, "link", "set", &va, "up"]);
        ip(&["-n", &b.name, "link", "set", &vb, "up"]);
        Self {
            a,
            b,
            addr_a,
            addr_b,
        }
    }
}

/// Waits until no TCP socket on `port` (local or remote) is left in the
/// given network namespaces (None: the host's) but TIME-WAIT ones, so every
/// close has happened in the kernel before a test stops its tracer. A close
/// that comes in softirq can be deferred to ksoftirqd, which a loaded VM runs
/// late; a fixed pause raced it. Panics after `limit`, naming what is left.
pub fn wait_tcp_closed(port: u16, netns: &[Option<&str>], limit: Duration) {
    wait_closed(port, netns, limit, &["exclude", "time-wait"]);
}

/// [`wait_tcp_closed`] for a port whose listener stays: its connections.
pub fn wait_conns_closed(port: u16, netns: &[Option<&str>], limit: Duration) {
    wait_closed(
        port,
        netns,
        limit,
        &["exclude", "time-wait", "exclude", "listening"],
    );
}

fn wait_closed(port: u16, netns: &[Option<&str>], limit: Duration, exclude: &[&str]) {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let left = || -> String {
        let mut out = String::new();
        for ns in netns {
            let mut cmd = match ns {
                Some(name) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", name, "ss"]);
                    c
                }
                None => Command::new("ss"),
            };
            let o = cmd
                .args(["-tanH", "state", "all"])
                .args(exclude)
                .arg(&filter)
                .output()
                .expect("run ss");
            assert!(o.status.success(), "ss failed: {o:?}");
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        out
    };
    let deadline = Instant::now() + limit;
    loop {
        let open = left();
        if open.trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "TCP sockets on port {port} still open after {limit:?}:\n{open}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `socklens conns --json --duration SECS ARGS`, calls `during` once it
/// is attached, and returns the snapshot lines and its stderr.
pub fn conns_snapshot(secs: f64, args: &[&str], during: impl FnOnce()) -> (Vec<Value>, String) {
    conns_snapshot_inner(secs, args, &[], during, None)
}

/// The same with these environment variables set for socklens.
pub fn conns_snapshot_env(
    secs: f64,
    args: &[&str],
    env: &[(&str, &str)],
    during: impl FnOnce(),
) -> (Vec<Value>, String) {
    conns_snapshot_inner(secs, args, env, during, None)
}

/// Like [`conns_snapshot`], but the snapshot is taken `settle` after `during`
/// returns (socklens gets SIGTERM, which prints the snapshot), with `cap_secs`
/// only as the upper bound: the test lasts as long as its workload.
pub fn conns_snapshot_after(
    cap_secs: f64,
    settle: Duration,
    args: &[&str],
    during: impl FnOnce(),
) -> (Vec<Value>, String) {
    conns_snapshot_inner(cap_secs, args, &[], during, Some(settle))
}

/// [`conns_snapshot_after`] with these environment variables set for socklens.
pub fn conns_snapshot_after_env(
    cap_secs: f64,
    settle: Duration,
    args: &[&str],
    env: &[(&str, &str)],
    during: impl FnOnce(),
) -> (Vec<Value>, String) {
    conns_snapshot_inner(cap_secs, args, env, during, Some(settle))
}

fn conns_snapshot_inner(
    secs: f64,
    args: &[&str],
    env: &[(&str, &str)],
    during: impl FnOnce(),
    stop_after: Option<Duration>,
) -> (Vec<Value>, String) {
    let attach = attach_arg();
    let duration = secs.to_string();
    let mut child = Command::new(SOCKLENS)
        .args([
            "conns",
            "--json",
            "--attach",
            &attach,
            "--duration",
            &duration,
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn socklens conns");
    let err = child.stderr.take().expect("stderr");
    let (ready_tx, ready_rx) = channel();
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let stderr = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("Ctrl-C to stop") {
                    let _ = ready_tx.send(());
                }
                stderr.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
    }
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("conns not ready: {}", stderr.lock().unwrap()));
    during();
    if let Some(settle) = stop_after {
        thread::sleep(settle);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill conns");
    }
    let out = child.wait_with_output().expect("wait conns");
    thread::sleep(Duration::from_millis(100));
    let stderr = stderr.lock().unwrap().clone();
    assert!(out.status.success(), "conns failed: {stderr}");
    assert!(
        stderr.contains(" 0 lost, 0 malformed, 0 untracked connections, 0 untracked UDP flows"),
        "{stderr}"
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect();
    (lines, stderr)
}

/// Test PKI made with the openssl CLI in `dir`: ca.pem/ca.key, a server
/// cert.pem/key.pem for 127.0.0.1 and a client client.pem/client.key, both
/// signed by the CA.
pub fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=socklens test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    ]
    .concat());
    for (name, key, ext) in [
        (
            "cert",
            "key.pem",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "client.key", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                key,
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=socklens test {name}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

/// One HTTP/1.0 GET (no chunking, the server closes): (status, body).
pub fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// On a kernel older than 5.18 (bpf_loop 5.17, bpf_set_retval 5.18): checks
/// the documented fallback, `policy apply` of `text` failing with exit 1, one
/// line naming the missing features and nothing applied, and returns true.
pub fn policy_apply_fails_here(tag: &str, text: &str) -> bool {
    if kernel_release() >= (5, 18) {
        return false;
    }
    let p = std::env::temp_dir().join(format!("{}.toml", unique(tag)));
    std::fs::write(&p, text).unwrap();
    let (code, out, err) = socklens(&["policy", "apply", p.to_str().unwrap()]);
    let _ = std::fs::remove_file(&p);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("lacks bpf_loop (Linux 5.17), bpf_set_retval (Linux 5.18)"),
        "{err}"
    );
    let (_, show, _) = socklens(&["policy", "show", "--json"]);
    assert!(show.contains("\"policy\":null"), "nothing applied: {show}");
    true
}

/// The value of every sample of `metric` whose labels contain all of `labels`
/// (`key="value"` text), summed; None when there is none.
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(metric).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((lbl, v)) = rest.rsplit_once("} ") else {
            continue;
        };
        if labels
            .iter()
            .all(|want| lbl.split(',').any(|have| have == *want))
        {
            *found.get_or_insert(0.0) += v.parse::<f64>().unwrap();
        }
    }
    found
}

/// Whether connection events carry steering: the kprobe tier cannot read
/// socket storage (docs/services.md, "Seen in trace, conns and the agent"),
/// its events go without; snapshots have it on every tier.
pub fn events_carry_steering() -> bool {
    attach_arg() != "kprobe"
}

/// A client's record for local port `sport`, one exactly.
pub fn record_of<'a>(records: &[&'a Value], pid: &Value, sport: &Value) -> &'a Value {
    let found: Vec<&&Value> = records
        .iter()
        .filter(|e| e["pid"] == *pid && e["sport"] == *sport)
        .collect();
    assert_eq!(found.len(), 1, "one record of {pid}:{sport} in {records:?}");
    found[0]
}

/// A connection record steered (`kind`: service or redirect) from `orig` to `to`.
pub fn assert_steered(rec: &Value, kind: &str, orig: (&str, u16), to: std::net::SocketAddr) {
    assert_eq!(rec["steered"], kind, "{rec}");
    assert_eq!(rec["orig_addr"], orig.0, "{rec}");
    assert_eq!(rec["orig_port"], orig.1, "{rec}");
    assert_eq!(rec["daddr"], to.ip().to_string(), "{rec}");
    assert_eq!(rec["dport"], to.port(), "{rec}");
}

pub fn assert_not_steered(rec: &Value) {
    for k in ["steered", "orig_addr", "orig_port"] {
        assert!(rec.get(k).is_none(), "{k} on an untranslated record: {rec}");
    }
}

/// How long the agent gets to start, stop or show a figure.
pub const WAIT: Duration = Duration::from_secs(30);

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A running `socklens agent`, ready (its /healthz said 200).
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    pub config: PathBuf,
}

impl Agent {
    /// Starts the agent applying the policy file `policy` and tracing the
    /// cgroup `cgroup` (relative to the cgroup v2 root), metrics on a free
    /// loopback port, reading the maps every 0.3 s.
    pub fn with_policy(dir: &Path, policy: &Path, cgroup: &str) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "listen = \"{addr}\"\npolicy = \"{}\"\ninterval = 0.3\ncgroup = \"{cgroup}\"\n",
            policy.display()
        );
        Self::start(dir, &config, addr)
    }

    /// Starts the agent with `config` written to `dir/agent.toml`.
    pub fn start(dir: &Path, config: &str, addr: SocketAddr) -> Self {
        let path = dir.join("agent.toml");
        fs::write(&path, config).expect("write config");
        Self::start_with(&["--config", path.to_str().unwrap()], path.clone(), addr)
    }

    /// `start` for an endpoint that wants a password (on /healthz too): ready
    /// is the agent's own line.
    pub fn start_protected(dir: &Path, config: &str, addr: SocketAddr) -> Self {
        let path = dir.join("agent.toml");
        fs::write(&path, config).expect("write config");
        Self::spawn(
            &["--config", path.to_str().unwrap()],
            path.clone(),
            addr,
            |a| a.stderr().contains("agent ready"),
        )
    }

    pub fn start_with(args: &[&str], config: PathBuf, addr: SocketAddr) -> Self {
        Self::spawn(args, config, addr, |a| {
            matches!(http_get(a.addr, "/healthz", None), Ok((200, _)))
        })
    }

    /// Starts the agent and waits until `ready` says so.
    pub fn spawn(
        args: &[&str],
        config: PathBuf,
        addr: SocketAddr,
        ready: impl Fn(&Self) -> bool,
    ) -> Self {
        let mut child = Command::new(SOCKLENS)
            .args(["agent", "--attach", &attach_arg()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let stderr = watch_stderr(&mut child);
        let mut agent = Self {
            child,
            addr,
            stderr,
            config,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if ready(&agent) {
                break;
            }
            if let Ok(Some(st)) = agent.child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                panic!("agent exited early ({st}): {}", agent.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready: {}",
                agent.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal agent");
    }

    /// The Prometheus text format, as `promtool` and old scrapers read it.
    pub fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.addr, "/metrics", None).expect("scrape");
        assert_eq!(status, 200);
        body
    }

    /// Scrapes until `check` of the text format is Ok, for up to [`WAIT`];
    /// fails with the last error, the text and the agent's stderr.
    pub fn wait_metrics(&self, check: impl Fn(&str) -> Result<(), String>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.metrics_text();
            let Err(e) = check(&text) else {
                return;
            };
            assert!(Instant::now() < deadline, "{e}\n{text}\n{}", self.stderr());
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The value of one sample line (exact label text) in the text format.
    pub fn sample(&self, series: &str) -> Option<f64> {
        self.metrics_text().lines().find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().ok())?
        })
    }

    /// SIGTERM; the exit status must be 0.
    pub fn stop(mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "agent did not stop");
            thread::sleep(Duration::from_millis(50));
        };
        thread::sleep(Duration::from_millis(100));
        let err = self.stderr();
        assert!(status.success(), "agent exit {status}: {err}");
        err
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's redis-server on a loopback port and a unix socket, nothing saved;
/// killed on drop. The unix socket carries control traffic socklens does not trace.
pub struct Redis {
    pub child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

impl Redis {
    /// Started in this process' cgroup, with a control connection on the unix socket.
    pub fn start() -> (Self, std::os::unix::net::UnixStream) {
        let dir = std::env::temp_dir().join(unique("slredis"));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("redis.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--unixsocket", sock.to_str().unwrap()])
            .args(["--dir", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/install-deps.sh installs it)");
        let redis = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        let ctl = loop {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
                break s;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(50));
        };
        (redis, ctl)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends one RESP command on `s` and returns its reply (a bulk string's
/// payload, or the whole status line) and the reply's length on the wire
/// (what redis counts as output).
pub fn redis_raw<S, A>(s: &mut S, args: &[A]) -> (Vec<u8>, u64)
where
    S: std::io::Read + Write,
    A: AsRef<[u8]>,
{
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let Some(len) = head.strip_prefix(b"$") else {
        return (head.clone(), head.len() as u64); // +OK, -ERR
    };
    let len: usize = String::from_utf8_lossy(len).trim().parse().unwrap();
    let mut body = vec![0; len + 2];
    s.read_exact(&mut body).unwrap();
    body.truncate(len);
    (body, (head.len() + len + 2) as u64)
}

/// [`redis_raw`] with the reply as text.
pub fn redis_call<S: std::io::Read + Write>(s: &mut S, args: &[&str]) -> (String, u64) {
    let (body, len) = redis_raw(s, args);
    (String::from_utf8_lossy(&body).into_owned(), len)
}

/// The length of `args` as one RESP request: what redis counts as input.
pub fn redis_request_len<A: AsRef<[u8]>>(args: &[A]) -> u64 {
    let mut n = format!("*{}\r\n", args.len()).len();
    for a in args {
        let a = a.as_ref();
        n += format!("${}\r\n", a.len()).len() + a.len() + 2;
    }
    n as u64
}

/// An `INFO` field of redis.
pub fn redis_stat(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in INFO: {info}"))
        .trim()
        .parse()
        .unwrap()
}

/// The control connection of a [`Redis`], keeping count of its own traffic,
/// which redis counts too: each request when read, each reply when written
/// (after the next INFO's snapshot of the counters).
pub struct RedisCtl {
    pub s: std::os::unix::net::UnixStream,
    before: String,
    ctl_in: u64,
    ctl_out: u64,
}

impl RedisCtl {
    /// Takes redis' counters now.
    pub fn begin(mut s: std::os::unix::net::UnixStream) -> Self {
        let (before, ctl_out) = redis_call(&mut s, &["INFO", "stats"]);
        Self {
            s,
            before,
            ctl_in: 0,
            ctl_out,
        }
    }

    /// One command, its traffic taken out of redis' counts.
    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Vec<u8> {
        let (body, len) = redis_raw(&mut self.s, args);
        self.ctl_in += redis_request_len(args);
        self.ctl_out += len;
        body
    }

    /// Waits until only this connection is left (the server closes its ends
    /// when it reads the clients' FINs), then returns redis' own (input,
    /// output) bytes since [`RedisCtl::begin`] without the control traffic.
    pub fn end(mut self, limit: Duration) -> (u64, u64) {
        let deadline = Instant::now() + limit;
        loop {
            let c = String::from_utf8_lossy(&self.call(&["INFO", "clients"])).into_owned();
            if redis_stat(&c, "connected_clients") == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "clients left: {c}");
            thread::sleep(Duration::from_millis(50));
        }
        let stats = ["INFO", "stats"];
        let (after, _) = redis_call(&mut self.s, &stats);
        self.ctl_in += redis_request_len(&stats);
        let d = |name| redis_stat(&after, name) - redis_stat(&self.before, name);
        (
            d("total_net_input_bytes") - self.ctl_in,
            d("total_net_output_bytes") - self.ctl_out,
        )
    }
}

/// redis-benchmark against `port`: 8 clients, pipelined SET and GET of
/// 100 kB values, `requests` of each.
pub fn redis_benchmark(port: u16, requests: u64) {
    let bench = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "8", "-P", "16", "-d", "100000"])
        .args(["-n", &requests.to_string(), "-t", "set,get", "-q"])
        .output()
        .expect("spawn redis-benchmark");
    assert!(bench.status.success(), "redis-benchmark: {bench:?}");
}

/// Checks the close records of the connections to redis on `port` against
/// redis' own (input, output) counts and returns the server ends' records by
/// peer port. Each connection has both ends: the server's (sport = port) and
/// the client's (dport = port), one close each.
pub fn redis_closes_match(
    stopped: &Stopped,
    port: u16,
    (redis_in, redis_out): (u64, u64),
    min_conns: usize,
) -> std::collections::BTreeMap<u64, &Value> {
    let port = u64::from(port);
    let u = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"));
    let mut server_side = std::collections::BTreeMap::new();
    let mut client_side = std::collections::BTreeMap::new();
    for e in stopped.of_kind("close") {
        let (sport, dport) = (u(&e["sport"]), u(&e["dport"]));
        let (side, peer) = match (sport == port, dport == port) {
            (true, _) => (&mut server_side, dport),
            (_, true) => (&mut client_side, sport),
            _ => continue,
        };
        let prev = side.insert(peer, e);
        assert!(prev.is_none(), "two closes for {sport}->{dport}: {e}");
    }
    let bytes = |e: &Value| (u(&e["tx_bytes"]), u(&e["rx_bytes"]));
    let total = server_side
        .values()
        .fold((0, 0), |(t, r), e| (t + bytes(e).0, r + bytes(e).1));
    eprintln!(
        "redis counted in {redis_in} out {redis_out} on {} connections",
        server_side.len()
    );
    assert!(
        server_side.len() >= min_conns,
        "{server_side:?} {:?}",
        stopped.summary
    );
    // Exact, unless a record says it may be short (accelerated bytes of
    // skipped hook runs): then no more than redis counted.
    let short = |side: &std::collections::BTreeMap<u64, &Value>| {
        side.values().any(|e| e["maybe_short"] == true)
    };
    let maybe_short = short(&server_side) || short(&client_side);
    let msg = format!(
        "server side (tx, rx) vs redis' own counters; summary {:?}",
        stopped.summary
    );
    if maybe_short {
        assert!(
            total.0 <= redis_out && total.1 <= redis_in,
            "{msg}: {total:?}"
        );
    } else {
        assert_eq!(total, (redis_out, redis_in), "{msg}");
    }
    // The client ends mirror the server's, connection by connection. Only the
    // server side has ground truth: redis-benchmark stops when its count of
    // requests is done, with pipelined requests unread by redis and replies
    // unread by itself, so each client end bounds the server's from above.
    assert_eq!(
        client_side.keys().collect::<Vec<_>>(),
        server_side.keys().collect::<Vec<_>>()
    );
    for (peer, e) in client_side.iter().filter(|_| !maybe_short) {
        let ((tx, rx), (server_tx, server_rx)) = (bytes(e), bytes(server_side[peer]));
        assert!(
            tx >= server_rx,
            "client {peer}: tx {tx} < the server's rx {server_rx}"
        );
        assert!(
            rx <= server_tx,
            "client {peer}: rx {rx} > the server's tx {server_tx}"
        );
    }
    server_side
}

/// A record's (tx, rx) against the application's own counts: equal, or, on a
/// record that says `maybe_short` (the kernel skipped hook runs that counted
/// accelerated bytes), no more than them.
pub fn assert_bytes_exact_or_flagged_short(e: &Value, tx: u64, rx: u64) {
    let got = (e["tx_bytes"].as_u64(), e["rx_bytes"].as_u64());
    let got = (got.0.unwrap_or(u64::MAX), got.1.unwrap_or(u64::MAX));
    if e["maybe_short"] == true {
        assert!(
            got.0 <= tx && got.1 <= rx,
            "({tx}, {rx}) sent and read: {e}"
        );
    } else {
        assert_eq!(got, (tx, rx), "{e}");
    }
}
