//! `socklens agent` against a real Prometheus (Debian's `prometheus`, from
//! scripts/install-deps.sh) and against workloads the tests make with
//! socklens-testbed: every value Prometheus stores must equal the ground
//! truth the testbed reports. Root only; run single-threaded (docs/testing.md).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A name for this test's cgroups, netns and files: `slagent-PID-N`.
fn name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "slagent-{tag}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A cgroup v2 directory for one test; removed on drop.
struct Cg {
    path: PathBuf,
    rel: String,
}

impl Cg {
    fn new(tag: &str) -> Self {
        let rel = name(tag);
        let path = cgroup2_root().join(&rel);
        fs::create_dir(&path).expect("create cgroup");
        Self {
            path,
            rel: format!("/{rel}"),
        }
    }
}

impl Drop for Cg {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.path);
    }
}

/// A network namespace with lo up; removed on drop.
struct Ns {
    name: String,
}

impl Ns {
    fn new(tag: &str) -> Self {
        let name = name(tag);
        run_ok("ip", &["netns", "add", &name]);
        run_ok("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ok(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect("spawn");
    assert!(st.success(), "{cmd} {args:?} failed");
}

/// Debian's prometheus on loopback, scraping the agent every second, with
/// its own storage in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Self {
        Self::with_jobs(
            dir,
            &format!(
                "  - job_name: socklens\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
    }

    /// Prometheus with these `scrape_configs` entries (YAML, indented).
    fn with_jobs(dir: &Path, jobs: &str) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let cfg = dir.join("prometheus.yml");
        fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("spawn prometheus (apt-get install prometheus; see scripts/install-deps.sh)");
        let mut p = Self { child, addr };
        let deadline = Instant::now() + WAIT;
        while !matches!(http_get(addr, "/-/ready", None), Ok((200, _))) {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited: {st}");
            }
            assert!(Instant::now() < deadline, "prometheus not ready");
            thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The value of an instant query that yields one sample, if any.
    fn query(&self, expr: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let (status, body) = http_get(self.addr, &path, None).ok()?;
        assert_eq!(status, 200, "{expr}: {body}");
        let v: Value = serde_json::from_str(&body).expect("prometheus JSON");
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{expr} gave several series: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `expr` equals `want`, then checks it stays there for a
    /// few more scrapes (counters must not over-count later).
    fn assert_settles(&self, expr: &str, want: f64) {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(expr);
            if last == Some(want) {
                thread::sleep(Duration::from_millis(2500));
                assert_eq!(self.query(expr), Some(want), "{expr} moved after settling");
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
        panic!("{expr}: want {want}, Prometheus has {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes any pinned policy when a test ends, however it ends.
struct PolicyGuard;

impl PolicyGuard {
    fn new() -> Self {
        let (code, _, err) = socklens(&["policy", "remove"]);
        assert_eq!(code, 0, "{err}");
        Self
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let _ = Command::new(SOCKLENS).args(["policy", "remove"]).output();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name(tag));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn policy_text(cgroup_rel: &str, rules: &[(u32, &str, &str)]) -> String {
    let mut s = format!("[[scope]]\ncgroup = \"{cgroup_rel}\"\n");
    for (id, action, extra) in rules {
        s.push_str(&format!(
            "\n[[scope.rule]]\nid = {id}\naction = \"{action}\"\non = [\"connect\"]\n{extra}\n"
        ));
    }
    s
}

fn steps_of<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["step"] == kind)
        .collect()
}

/// The workload: a listener on 127.0.0.1:7000 in its own netns, N closed
/// connections and one left open with known byte counts each way (the open
/// one also sendfile()s `file`), one refused connect, one connect the policy
/// denies; then it waits.
struct Workload {
    steps: Vec<String>,
    /// Step indices of client sends / server sends (the report's "steps").
    client_sends: Vec<usize>,
    server_sends: Vec<usize>,
    /// Step index of the client's sendfile (its bytes are in client_sends too).
    sendfile: usize,
}

fn workload(n: usize, file: &Path, file_len: usize) -> Workload {
    let mut steps = vec!["bind,tcp4,127.0.0.1,7000".to_owned(), "listen,0,64".into()];
    let (mut client_sends, mut server_sends) = (Vec::new(), Vec::new());
    let mut next_socket = 1;
    for i in 0..=n {
        let (c, a) = (next_socket, next_socket + 1);
        next_socket += 2;
        let (up, down) = (1000 * (i + 1) + 7, 50_000 + 313 * i);
        steps.push("connect,tcp4,127.0.0.1,7000".into());
        steps.push("accept,0".into());
        client_sends.push(steps.len());
        steps.push(format!("send,{c},{up},4096"));
        steps.push(format!("recv,{a},{up},65536"));
        server_sends.push(steps.len());
        steps.push(format!("send,{a},{down},4096"));
        steps.push(format!("recv,{c},{down},65536"));
        if i == n {
            client_sends.push(steps.len());
            steps.push(format!("sendfile,{c},{}", file.display()));
            steps.push(format!("recv,{a},{file_len},65536"));
        }
        if i < n {
            // The last connection stays open: its bytes come from map reads.
            steps.push(format!("close,{c}"));
            steps.push(format!("close,{a}"));
        }
    }
    steps.push("connect,tcp4,127.0.0.1,7001".into()); // refused
    steps.push("connect,tcp4,127.0.0.2,7000".into()); // denied by rule 10
    steps.push("wait".into());
    Workload {
        steps,
        sendfile: client_sends.last().copied().unwrap_or_default(),
        client_sends,
        server_sends,
    }
}

fn sum_bytes(report: &Value, idx: &[usize]) -> f64 {
    idx.iter()
        .map(|&i| report["steps"][i]["bytes"].as_u64().expect("bytes") as f64)
        .sum()
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn prometheus_stores_exact_counters_of_a_known_workload_and_promtool_accepts_the_text() {
    require_root();
    let _guard = PolicyGuard::new();
    let dir = temp_dir("prom");
    let cg = Cg::new("wl");
    let ns = Ns::new("wl");
    let policy = dir.join("policy.toml");
    fs::write(
        &policy,
        policy_text(&cg.rel, &[(10, "deny", "cidr = \"127.0.0.2/32\"")]),
    )
    .unwrap();
    let log = dir.join("events.jsonl");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let before = socklens_programs();
    // The agent traces the test's cgroup only (the kernel filter): connection
    // churn of other tests on the host must not fill the ring buffer whose
    // losses this test requires to be 0.
    let agent = Agent::start(
        &dir,
        &format!(
            "listen = \"{addr}\"\npolicy = \"policy.toml\"\nevent_log = \"{}\"\ninterval = 0.5\nremote_ports = [7000]\ncgroup = \"{}\"\n",
            log.display(),
            cg.rel
        ),
        addr,
    );
    let prom = Prometheus::start(&dir, addr);

    const N: usize = 4;
    const FILE_LEN: usize = 123_457;
    let file = dir.join("sendfile.bin");
    fs::write(&file, vec![b'f'; FILE_LEN]).unwrap();
    let w = workload(N, &file, FILE_LEN);
    let mut args = vec![
        "--netns".to_owned(),
        ns.name.clone(),
        "--cgroup".into(),
        cg.path.display().to_string(),
        "--comm".into(),
        "slagent-wl".into(),
    ];
    args.extend(w.steps.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bed = Bed::spawn(&args);
    let report = bed.report(); // at `wait`: everything done, the listener open
    let connects = steps_of(&report, "connect");
    assert_eq!(connects[N + 1]["errno"], libc::ECONNREFUSED, "{report}");
    assert_eq!(connects[N + 2]["errno"], libc::EACCES, "{report}");
    let up = sum_bytes(&report, &w.client_sends);
    let down = sum_bytes(&report, &w.server_sends);
    let sent_by_sendfile = sum_bytes(&report, &[w.sendfile]);
    assert_eq!(sent_by_sendfile, FILE_LEN as f64, "{report}");
    let pid = report["pid"].as_u64().unwrap();
    let netns = report["netns"].as_u64().unwrap();

    let cgl = format!("cgroup=\"{}\"", cg.rel);
    let sum_dir = |metric: &str, dir: &str| {
        format!("sum({metric}{{{cgl},comm=\"slagent-wl\",direction=\"{dir}\"}})")
    };
    prom.assert_settles(
        &format!(
            "sum(socklens_sent_bytes_total{{{cgl},direction=\"out\",remote_port=\"7000\",family=\"inet\",proto=\"tcp\"}})"
        ),
        up,
    );
    prom.assert_settles(&sum_dir("socklens_sent_bytes_total", "in"), down);
    prom.assert_settles(
        &sum_dir("socklens_sendfile_bytes_total", "out"),
        sent_by_sendfile,
    );
    prom.assert_settles(&sum_dir("socklens_received_bytes_total", "out"), down);
    prom.assert_settles(&sum_dir("socklens_received_bytes_total", "in"), up);
    prom.assert_settles(
        &sum_dir("socklens_connections_opened_total", "out"),
        (N + 1) as f64,
    );
    prom.assert_settles(
        &sum_dir("socklens_connections_opened_total", "in"),
        (N + 1) as f64,
    );
    prom.assert_settles(
        &sum_dir("socklens_connections_closed_total", "out"),
        N as f64,
    );
    prom.assert_settles(
        &sum_dir("socklens_connections_closed_total", "in"),
        N as f64,
    );
    prom.assert_settles(
        &format!("sum(socklens_rtt_seconds_count{{{cgl}}})"),
        (2 * N) as f64,
    );
    prom.assert_settles(
        &format!("sum(socklens_connections_failed_total{{{cgl},reason=\"refused\"}})"),
        1.0,
    );
    prom.assert_settles(
        &format!("socklens_policy_denials_total{{{cgl},rule=\"10\",op=\"connect\"}}"),
        1.0,
    );
    prom.assert_settles(&format!("socklens_binds_total{{{cgl},result=\"ok\"}}"), 1.0);
    prom.assert_settles(
        &format!(
            "socklens_listening_socket_info{{address=\"127.0.0.1\",port=\"7000\",backlog=\"64\",netns=\"{netns}\"}}"
        ),
        1.0,
    );
    prom.assert_settles("socklens_events_lost_total", 0.0);
    prom.assert_settles("sum(socklens_untracked_total)", 0.0);
    prom.assert_settles("count(socklens_hook_attached == 1)", 8.0);
    if let Some(tier) = expected_tier() {
        prom.assert_settles(
            &format!("count(socklens_hook_attached{{method=\"{tier}\"}})"),
            8.0,
        );
    }

    // promtool lints the text format the agent serves to non-OpenMetrics
    // scrapers; silence and exit 0 mean no problems.
    let text = agent.metrics_text();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, om) = http_get(addr, "/metrics", Some("application/openmetrics-text")).unwrap();
    assert!(om.ends_with("# EOF\n"), "OpenMetrics on request");

    // Closing the open connection adds nothing: its bytes were counted once.
    bed.release();
    let end = bed.finish();
    assert_eq!(end["pid"], pid);
    prom.assert_settles(
        &sum_dir("socklens_connections_closed_total", "out"),
        (N + 1) as f64,
    );
    prom.assert_settles(&sum_dir("socklens_sent_bytes_total", "out"), up);
    prom.assert_settles(&sum_dir("socklens_received_bytes_total", "out"), down);
    prom.assert_settles(
        &format!("count(socklens_listening_socket_info{{netns=\"{netns}\"}}) or vector(0)"),
        0.0,
    );

    // The event log has the testbed's listen, as `trace --json` prints it.
    let logged = fs::read_to_string(&log).expect("event log");
    let listen: Vec<Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|v: &Value| v["event"] == "listen" && v["pid"] == pid)
        .collect();
    assert_eq!(listen.len(), 1, "{logged}");
    assert_eq!(listen[0]["port"], 7000);
    assert_eq!(listen[0]["backlog"], 64);

    // SIGTERM: exit 0, tracing programs gone, the policy still pinned.
    agent.stop();
    assert!(
        socklens_programs().difference(&before).next().is_none(),
        "tracing programs left loaded"
    );
    let (code, out, _) = socklens(&["policy", "show", "--json"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\"id\":10") || out.contains("\"id\": 10"),
        "{out}"
    );
    let denied = testbed(&[
        "--netns",
        &ns.name,
        "--cgroup",
        cg.path.to_str().unwrap(),
        "connect,tcp4,127.0.0.2,7000",
    ]);
    assert_eq!(
        denied["steps"][0]["errno"],
        libc::EACCES,
        "policy stays in force"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn sighup_switches_policy_without_a_gap_and_bad_reloads_keep_the_old_config() {
    require_root();
    let _guard = PolicyGuard::new();
    let dir = temp_dir("hup");
    let cg = Cg::new("hup");
    let ns = Ns::new("hup");
    let a = policy_text(
        &cg.rel,
        &[(81, "deny", "cidr = \"127.0.0.2/32\"\nports = 7000")],
    );
    let b = policy_text(
        &cg.rel,
        &[
            (82, "deny", "cidr = \"127.0.0.0/8\"\nports = \"7000-7001\""),
            (83, "allow", "cidr = \"127.0.0.2/32\"\nports = 7001"),
        ],
    );
    let policy = dir.join("policy.toml");
    fs::write(&policy, &a).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Only the test's cgroup is traced: other tests on the host (connection
    // churn) must not fill the ring buffer this test checks for losses.
    let config = format!(
        "listen = \"{addr}\"\npolicy = \"policy.toml\"\ninterval = 0.5\ncgroup = \"{}\"\n",
        cg.rel
    );
    let agent = Agent::start(&dir, &config, addr);

    let looper = Command::new(TESTBED)
        .args([
            "--netns",
            &ns.name,
            "--cgroup",
            cg.path.to_str().unwrap(),
            "serve,tcp4,127.0.0.2,7000",
            "connects,tcp4,127.0.0.2,7000,5000,500",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    // Signals that arrive while a reload is pending fold into one reload (it
    // reads the files as they are then): wait for each before the next.
    let wait_reloads = |want: f64| {
        let deadline = Instant::now() + WAIT;
        while agent.sample("socklens_config_reloads_total") != Some(want) {
            assert!(Instant::now() < deadline, "reloads: {}", agent.stderr());
            thread::sleep(Duration::from_millis(50));
        }
    };
    let mut hups = 0;
    for i in 0..4 {
        fs::write(&policy, if i % 2 == 0 { &b } else { &a }).unwrap();
        agent.signal(nix::sys::signal::Signal::SIGHUP);
        hups += 1;
        wait_reloads(f64::from(hups));
        thread::sleep(Duration::from_millis(200));
    }
    let out = looper.wait_with_output().unwrap();
    assert!(out.status.success());
    let tb: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    // The destination has a listener: an attempt judged by no rule set would succeed.
    assert_eq!(tb["steps"][1]["n"], 5000, "{tb}");
    assert_eq!(
        tb["steps"][1]["by_errno"],
        serde_json::json!({"13": 5000}),
        "{tb}"
    );

    let series = |rule: u32| {
        format!(
            "socklens_policy_denials_total{{rule=\"{rule}\",op=\"connect\",cgroup=\"{}\"}}",
            cg.rel
        )
    };
    let deadline = Instant::now() + WAIT;
    let counted = loop {
        let (r81, r82) = (agent.sample(&series(81)), agent.sample(&series(82)));
        let total = r81.unwrap_or(0.0) + r82.unwrap_or(0.0);
        if total >= 5000.0 || Instant::now() > deadline {
            break (r81, r82, total);
        }
        thread::sleep(Duration::from_millis(200));
    };
    // Counters keep counting across reloads: every denial, under either rule set.
    assert_eq!(counted.2, 5000.0, "{counted:?}: {}", agent.stderr());
    assert!(
        counted.0.unwrap_or(0.0) > 0.0 && counted.1.unwrap_or(0.0) > 0.0,
        "{counted:?}"
    );
    assert_eq!(agent.sample("socklens_events_lost_total"), Some(0.0));
    // Policy A is in force now (4 reloads: B, A, B, A).
    let probe = |port: &str| {
        testbed(&[
            "--netns",
            &ns.name,
            "--cgroup",
            cg.path.to_str().unwrap(),
            &format!("connect,tcp4,127.0.0.2,{port}"),
        ])["steps"][0]["errno"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(probe("7000"), i64::from(libc::EACCES));
    assert_eq!(
        probe("7001"),
        i64::from(libc::ECONNREFUSED),
        "B's 7001 deny is gone"
    );

    // Bad reloads: an unknown key in the config, then a bad policy. Each
    // logs one line with file:line, counts as a failure, and changes nothing.
    let cfg_path = agent.config.clone();
    let bad_reloads: [(&dyn Fn(), String); 2] = [
        (
            &|| fs::write(&cfg_path, format!("{config}scrape_me = true\n")).unwrap(),
            format!("{}:5: ", cfg_path.display()),
        ),
        (
            &|| {
                fs::write(&cfg_path, &config).unwrap();
                fs::write(&policy, format!("{b}\n[[scope.rule]]\nid = 82\n")).unwrap();
            },
            format!("{}:", policy.display()),
        ),
    ];
    for (n, (break_it, prefix)) in bad_reloads.iter().enumerate() {
        break_it();
        let lines_before = agent.stderr().lines().count();
        agent.signal(nix::sys::signal::Signal::SIGHUP);
        let deadline = Instant::now() + WAIT;
        while agent.sample("socklens_config_reload_failures_total") != Some((n + 1) as f64) {
            assert!(
                Instant::now() < deadline,
                "no failure counted: {}",
                agent.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            agent.sample("socklens_config_last_reload_success"),
            Some(0.0)
        );
        // The agent prints the line before counting; our reader thread may
        // still be on its way with it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.stderr().lines().count() == lines_before && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(200)); // a second line would show by now
        let err = agent.stderr();
        let new: Vec<&str> = err.lines().skip(lines_before).collect();
        assert_eq!(new.len(), 1, "one line per failed reload: {new:?}");
        assert!(new[0].contains(prefix.as_str()), "{prefix} in {new:?}");
        assert_eq!(
            probe("7000"),
            i64::from(libc::EACCES),
            "old policy in force"
        );
        assert_eq!(probe("7001"), i64::from(libc::ECONNREFUSED));
    }
    assert_eq!(
        agent.sample("socklens_config_reloads_total"),
        Some(f64::from(hups))
    );
    // A good reload again clears the failure gauge.
    fs::write(&policy, &a).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_reloads(f64::from(hups + 1));
    assert_eq!(
        agent.sample("socklens_config_last_reload_success"),
        Some(1.0)
    );
    agent.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// A local address that is not loopback: the host's, or one on a dummy
/// interface in a netns made for the test (then the agent runs there).
fn non_loopback_address() -> Option<IpAddr> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
        .find(|a| !a.is_loopback())
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn metrics_endpoint_defaults_to_loopback_only() {
    require_root();
    let dir = temp_dir("lo");
    let config = dir.join("empty.toml");
    fs::write(&config, "").unwrap();
    let default: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let (ns, other) = match non_loopback_address() {
        Some(a) => (None, a),
        None => {
            // No such address here: a netns with a dummy interface, where
            // the agent's endpoint is the only listener.
            let ns = Ns::new("lo");
            run_ok(
                "ip",
                &["-n", &ns.name, "link", "add", "sl0", "type", "dummy"],
            );
            run_ok(
                "ip",
                &["-n", &ns.name, "addr", "add", "192.0.2.77/24", "dev", "sl0"],
            );
            run_ok("ip", &["-n", &ns.name, "link", "set", "sl0", "up"]);
            (Some(ns), "192.0.2.77".parse().unwrap())
        }
    };
    let agent = match &ns {
        None => Agent::start_with(
            &["--config", config.to_str().unwrap()],
            config.clone(),
            default,
        ),
        Some(ns) => {
            // nsenter --net changes only the network namespace (`ip netns
            // exec` would remount /sys, hiding bpffs and cgroup2).
            let netns = format!("--net=/var/run/netns/{}", ns.name);
            let mut child = Command::new("nsenter")
                .args([netns.as_str(), SOCKLENS, "agent", "--config"])
                .arg(&config)
                .stderr(Stdio::null())
                .spawn()
                .expect("nsenter agent");
            let ok = Command::new("nsenter")
                .args([netns.as_str(), "bash", "-c"])
                .arg("for i in $(seq 300); do exec 3<>/dev/tcp/127.0.0.1/9464 && exit 0; sleep 0.1; done; exit 1")
                .status()
                .unwrap();
            assert!(ok.success(), "agent not listening on loopback in the netns");
            let refused = Command::new("nsenter")
                .args([netns.as_str(), "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{other}/9464"))
                .stderr(Stdio::null())
                .status()
                .unwrap();
            let _ = child.kill();
            let _ = child.wait();
            assert!(!refused.success(), "{other}:9464 must not accept");
            let _ = fs::remove_dir_all(&dir);
            return;
        }
    };
    assert!(matches!(http_get(default, "/healthz", None), Ok((200, _))));
    let err = TcpStream::connect_timeout(&SocketAddr::new(other, 9464), Duration::from_secs(3))
        .expect_err("the endpoint must not be reachable on a non-loopback address");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    agent.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// Sends `bytes` on a fresh connection and reads the status of the answer.
fn raw_status(addr: SocketAddr, bytes: &[u8]) -> u16 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {raw:?}"))
}

/// Prometheus gives up on a scrape after its scrape_timeout (1 s in these
/// tests' Prometheus): a scrape answered later is a lost scrape.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(1);

/// One scrape that must be answered with 200 within [`SCRAPE_DEADLINE`].
fn scrape_in_time(addr: SocketAddr) {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_DEADLINE).expect("connect");
    s.set_read_timeout(Some(SCRAPE_DEADLINE)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("scrape not answered: {e}"));
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw:.200}");
    assert!(raw.contains("socklens_config_last_reload_success 1"));
    assert!(
        start.elapsed() < SCRAPE_DEADLINE,
        "scrape answered after the scrape deadline: {:?}",
        start.elapsed()
    );
}

fn proc_count(pid: u32, what: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/{what}"))
        .expect("read /proc")
        .count()
}

/// The process's open sockets (its other descriptors come and go with
/// /proc and cgroup reads).
fn sockets(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

fn vm_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS")
}

/// Clients that connect and send nothing, or trickle a byte a second, or
/// send garbage, must not cost a scrape its deadline; connection floods
/// leave the agent's threads, descriptors and memory bounded; requests
/// that are not a scrape get a 4xx.
#[test]
#[ignore = "needs root: ./test.sh"]
fn metrics_endpoint_serves_scrapes_beside_idle_slow_and_hostile_clients() {
    require_root();
    let dir = temp_dir("http");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::start(&dir, &format!("listen = \"{addr}\"\n"), addr);
    let pid = agent.pid();
    // Until the readiness probe's connection is gone.
    thread::sleep(Duration::from_millis(300));
    let (threads, fds, rss) = (
        proc_count(pid, "task"),
        proc_count(pid, "fd"),
        vm_rss_kib(pid),
    );
    let socks = sockets(pid);

    // 64 silent clients and 16 that send a scrape's first bytes one a second.
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut slow: Vec<TcpStream> = (0..16)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            for &b in b"GET /metrics HTTP/1.1\r\n".iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for s in &mut slow {
                    let _ = s.write_all(&[b]);
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // The agent holds them all (one descriptor each) while it answers.
    let deadline = Instant::now() + WAIT;
    while sockets(pid) < socks + 80 {
        assert!(
            Instant::now() < deadline,
            "agent did not accept 80 clients: {} sockets, {socks} before",
            sockets(pid)
        );
        thread::sleep(Duration::from_millis(20));
    }
    // (The agent closes any connection 5 s after accepting it.)
    for _ in 0..10 {
        assert!(sockets(pid) >= socks + 80, "slow clients dropped");
        scrape_in_time(addr);
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    drop(idle);

    // Requests that are not a scrape.
    let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(raw_status(addr, b"\x00\x01\x02 garbage\r\n\r\n"), 400);
    assert_eq!(raw_status(addr, format!("{get}{get}").as_bytes()), 400);
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(raw_status(addr, big.as_bytes()), 431);
    let body = "GET /metrics HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
    assert_eq!(raw_status(addr, body.as_bytes()), 400);
    assert_eq!(raw_status(addr, b"POST /metrics HTTP/1.1\r\n\r\n"), 405);
    assert_eq!(raw_status(addr, get.as_bytes()), 200);

    // A flood of connection attempts, 400 held open at a time (more than
    // the 256 the agent keeps), every tenth sending garbage; scrapes go on.
    let attempts = scaled(10_000);
    let mut held = std::collections::VecDeque::new();
    let (mut max_threads, mut max_fds) = (0, 0);
    for i in 0..attempts {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            continue;
        };
        if i % 10 == 0 {
            let _ = s.write_all(b"\x16\x03\x01 not http\r\n\r\n");
        }
        held.push_back(s);
        if held.len() > 400 {
            held.pop_front();
        }
        if i % 500 == 0 {
            max_threads = max_threads.max(proc_count(pid, "task"));
            max_fds = max_fds.max(proc_count(pid, "fd"));
            scrape_in_time(addr);
        }
    }
    drop(held);
    assert!(
        max_threads <= threads,
        "threads grew from {threads} to {max_threads}"
    );
    // The agent opens a few files of its own at times (/proc, cgroups).
    assert!(
        max_fds <= fds + 256 + 16,
        "descriptors grew from {fds} to {max_fds}: more connections kept than the cap"
    );
    let grown = vm_rss_kib(pid).saturating_sub(rss);
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB");
    scrape_in_time(addr);
    agent.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// The endpoint with TLS (client certificates required and verified) and
/// basic auth, scraped by a real Prometheus: the job with the right
/// password and certificate is up and stores the agent's samples; a wrong
/// password, no client certificate, and plain HTTP are all refused.
#[test]
#[ignore = "needs root: ./test.sh"]
fn prometheus_scrapes_over_tls_with_basic_auth_and_others_are_refused() {
    require_root();
    let dir = temp_dir("tls");
    make_certs(&dir);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let hash = bcrypt::hash("s3cret", 10).unwrap();
    let config = format!(
        "listen = \"{addr}\"\n[tls_server_config]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\nclient_ca_file = \"ca.pem\"\nclient_auth_type = \"RequireAndVerifyClientCert\"\n[basic_auth_users]\nprom = \"{hash}\"\n"
    );
    let agent = Agent::start_protected(&dir, &config, addr);
    assert!(!agent.stderr().contains("warning"), "{}", agent.stderr());

    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let plain = http_get(addr, "/metrics", None);
    assert!(
        !matches!(plain, Ok((200, _))),
        "plain HTTP answered: {plain:?}"
    );

    let d = dir.display();
    let job = |name: &str, scheme: &str, tls: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: {scheme}\n{tls}    basic_auth:\n      username: prom\n      password: {password}\n    static_configs:\n      - targets: ['{addr}']\n"
        )
    };
    let with_cert = format!(
        "    tls_config:\n      ca_file: {d}/ca.pem\n      cert_file: {d}/client.pem\n      key_file: {d}/client.key\n"
    );
    let no_cert = format!("    tls_config:\n      ca_file: {d}/ca.pem\n");
    let jobs = [
        job("good", "https", &with_cert, "s3cret"),
        job("wrong_password", "https", &with_cert, "guess"),
        job("no_client_cert", "https", &no_cert, "s3cret"),
        job("plain_http", "http", "", "s3cret"),
    ]
    .concat();
    let prom = Prometheus::with_jobs(&dir, &jobs);
    prom.assert_settles("up{job=\"good\"}", 1.0);
    prom.assert_settles("socklens_config_last_reload_success{job=\"good\"}", 1.0);
    for bad in ["wrong_password", "no_client_cert", "plain_http"] {
        prom.assert_settles(&format!("up{{job=\"{bad}\"}}"), 0.0);
    }
    drop(prom);
    agent.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// The event log is private: 0600 even where an older file was readable by
/// all, and its lines are the agent's JSON events.
#[test]
#[ignore = "needs root: ./test.sh"]
fn event_log_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let dir = temp_dir("log");
    let log = dir.join("events.jsonl");
    fs::write(&log, "").unwrap();
    fs::set_permissions(&log, fs::Permissions::from_mode(0o644)).unwrap();
    let fresh = dir.join("fresh.jsonl");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    for path in [&log, &fresh] {
        let agent = Agent::start(
            &dir,
            &format!("listen = \"{addr}\"\nevent_log = \"{}\"\n", path.display()),
            addr,
        );
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{}: mode {mode:o}", path.display());
        agent.stop();
    }
    let _ = fs::remove_dir_all(&dir);
}

fn cap_eff(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapEff")
}

/// Once attached, the agent's main thread keeps only the capabilities its
/// loop and reloads use (and says which), and the metrics threads none.
#[test]
#[ignore = "needs root: ./test.sh"]
fn agent_drops_capabilities_it_no_longer_needs() {
    require_root();
    let dir = temp_dir("caps");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let agent = Agent::start_protected(
        &dir,
        &format!("listen = \"{addr}\"\n[basic_auth_users]\nprom = \"{hash}\"\n"),
        addr,
    );
    // CAP_DAC_READ_SEARCH 2, NET_ADMIN 12, SYS_PTRACE 19, SYS_ADMIN 21, PERFMON 38, BPF 39.
    let want: u64 = [2, 12, 19, 21, 38, 39].iter().map(|b| 1u64 << b).sum();
    let pid = agent.pid();
    let mut seen = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = fs::read_to_string(task.join("comm")).unwrap();
        let eff = cap_eff(&fs::read_to_string(task.join("status")).unwrap());
        match comm.trim() {
            "metrics-http" | "metrics-auth" => assert_eq!(eff, 0, "{comm}"),
            _ => assert_eq!(eff, want, "{comm}: CapEff {eff:x}, want {want:x}"),
        }
        seen.push(comm.trim().to_owned());
    }
    assert!(seen.iter().any(|c| c == "metrics-http"), "{seen:?}");
    assert!(seen.iter().any(|c| c == "metrics-auth"), "{seen:?}");
    let err = agent.stderr();
    assert!(
        err.contains("capabilities kept: CAP_BPF, CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE; all others dropped"),
        "{err}"
    );
    agent.stop();
    let _ = fs::remove_dir_all(&dir);
}
