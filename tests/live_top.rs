//! `socklens top` against traffic the tests make themselves: exact byte
//! counts per interval, grouping by process and cgroup, and the terminal UI
//! quitting cleanly. Root only; run single-threaded (docs/testing.md).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Held by every test that moves bytes on sockets of this test process:
/// `once_json_by_process_counts_exact_interval_bytes` sums this process's
/// row, which would take in the others' bytes if they ran at the same time.
static IN_PROCESS_TRAFFIC: Mutex<()> = Mutex::new(());

fn in_process_traffic() -> std::sync::MutexGuard<'static, ()> {
    IN_PROCESS_TRAFFIC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

const WAIT: Duration = Duration::from_secs(30);

/// A running `socklens top`, attached.
struct Top {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit in {timeout:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// With SOCKLENS_EXPECT_TIER set, every hook in the "tracing ..." line must
/// have attached with that tier.
fn assert_tier(stderr: &str) {
    let Some(tier) = expected_tier() else { return };
    let line = stderr
        .lines()
        .find(|l| l.contains("Ctrl-C to stop"))
        .expect("ready line");
    let hooks = line
        .trim_start_matches("socklens: tracing ")
        .split(';')
        .next()
        .unwrap();
    for hook in hooks.split(", ") {
        // Optional hooks left off rather than served by syscall tracepoints.
        if hook.ends_with(": off") {
            continue;
        }
        assert!(hook.ends_with(&format!(": {tier}")), "{hook} in {line}");
    }
}

impl Top {
    fn start(args: &[&str]) -> Self {
        require_root();
        let mut child = Command::new(SOCKLENS)
            .args(["top", "--attach", &attach_arg()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn socklens top");
        let (lines, stderr) = watch_output(&mut child);
        wait_ready(&mut child, &stderr, WAIT);
        let top = Self {
            child,
            lines,
            stderr,
        };
        assert_tier(&top.stderr());
        top
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// JSON lines up to and including the `top_interval` line of `index`.
    fn json_until_interval(&self, index: u64) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no interval {index}: {got:?} {}", self.stderr()));
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            let done = v["event"] == "top_interval" && v["interval"] == index;
            got.push(v);
            if done {
                return got;
            }
        }
    }

    fn finish(mut self) -> Finished {
        let status = wait_with_timeout(&mut self.child, WAIT);
        thread::sleep(Duration::from_millis(100));
        let mut stdout = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            stdout.push(line);
        }
        Finished {
            status,
            stdout,
            stderr: self.stderr(),
        }
    }

    fn terminate(self) -> Finished {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
        self.finish()
    }
}

impl Finished {
    fn assert_success(&self) {
        assert!(
            self.status.success(),
            "top: {} {}",
            self.status,
            self.stderr
        );
    }

    fn json(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

/// One request/response on a fresh connection: the client sends `send`
/// bytes, the server answers `reply` bytes; `close` ends the connection
/// inside the interval, otherwise it stays open past it.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    send: usize,
    reply: usize,
    close: bool,
}

/// Serves `plan` in order (the client runs it in order) and returns the
/// connections left open.
fn serve(listener: TcpListener, plan: Vec<Exchange>) -> JoinHandle<Vec<TcpStream>> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        for x in plan {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; x.send];
            s.read_exact(&mut buf).expect("read request");
            s.write_all(&vec![b'y'; x.reply]).expect("write reply");
            if x.close {
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).expect("read to EOF");
                assert!(rest.is_empty(), "client sent more than planned");
            } else {
                kept.push(s);
            }
        }
        kept
    })
}

/// The client half, in python3 so it is a separate process (pid, comm,
/// cgroup) from the server half in this test. It waits for a line on stdin
/// before connecting, prints "done" after the plan, and exits on the next line.
const CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
plan = [tuple(int(v) for v in a.split(":")) for a in sys.argv[2:]]
sys.stdin.readline()
kept = []
for send, reply, close in plan:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"x" * send)
    got = 0
    while got < reply:
        b = s.recv(min(65536, reply - got))
        if not b:
            sys.exit("short reply")
        got += len(b)
    if close:
        s.close()
    else:
        kept.append(s)
print("done", flush=True)
sys.stdin.readline()
"#;

struct Client {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Client {
    fn spawn(port: u16, plan: &[Exchange]) -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(CLIENT)
            .arg(port.to_string())
            .args(
                plan.iter()
                    .map(|x| format!("{}:{}:{}", x.send, x.reply, u8::from(x.close))),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3 (scripts/install-deps.sh installs it)");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, out }
    }

    fn pid(&self) -> u64 {
        u64::from(self.child.id())
    }

    /// The command name the kernel has for it.
    fn comm(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))
            .unwrap()
            .trim_end()
            .to_owned()
    }

    /// Runs the plan and waits until it is done.
    fn run_plan(&mut self) {
        writeln!(self.stdin).expect("release client");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("client report");
        assert_eq!(line.trim(), "done", "client failed");
    }

    fn exit(mut self) {
        writeln!(self.stdin).expect("release client");
        assert!(wait_with_timeout(&mut self.child, WAIT).success());
    }
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn rows(lines: &[Value], interval: u64) -> Vec<&Value> {
    lines
        .iter()
        .filter(|v| v["event"] == "top" && v["interval"] == interval)
        .collect()
}

fn one<'a>(rows: &[&'a Value], what: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&&Value> = rows.iter().filter(|v| pred(v)).collect();
    assert_eq!(found.len(), 1, "want one row for {what}: {rows:?}");
    found[0]
}

fn sum(plan: &[Exchange], f: impl Fn(&Exchange) -> usize) -> u64 {
    plan.iter().map(f).sum::<usize>() as u64
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn once_json_by_process_counts_exact_interval_bytes() {
    let _serial = in_process_traffic();
    let plan = vec![
        Exchange {
            send: 100_000,
            reply: 3_000,
            close: false,
        },
        Exchange {
            send: 5_000,
            reply: 250_000,
            close: true,
        },
    ];
    let (l, port) = listener();
    let mut client = Client::spawn(port, &plan);
    let server = serve(l, plan.clone());
    let top = Top::start(&["--once", "--json", "--interval", "2", "--by", "process"]);
    client.run_plan();
    let comm = client.comm();
    let done = top.finish();
    done.assert_success();
    let kept = server.join().expect("server");
    let client_pid = client.pid();
    client.exit();
    drop(kept);

    let lines = done.json();
    let rows = rows(&lines, 1);
    let sent = sum(&plan, |x| x.send);
    let replied = sum(&plan, |x| x.reply);
    let c = one(&rows, "the client", |v| v["pid"] == client_pid);
    assert_eq!(c["by"], "process", "{c}");
    assert_eq!(c["comm"], comm.as_str(), "{c}");
    assert_eq!(c["tx_bytes"], sent, "{c}");
    assert_eq!(c["rx_bytes"], replied, "{c}");
    assert_eq!(c["conns"], 2, "{c}");
    assert_eq!(
        c["closed"], 1,
        "one connection closed inside the interval: {c}"
    );
    assert_eq!(c["retransmits"], 0, "{c}");
    let secs = c["interval_s"].as_f64().unwrap();
    assert!((1.9..3.0).contains(&secs), "{c}");
    let rate = c["tx_bytes_per_s"].as_f64().unwrap();
    assert!((rate - sent as f64 / secs).abs() < 0.1, "{c}");
    let me = u64::from(std::process::id());
    let s = one(&rows, "this test (the server)", |v| v["pid"] == me);
    assert_eq!(s["tx_bytes"], replied, "{s}");
    assert_eq!(s["rx_bytes"], sent, "{s}");
    assert_eq!(s["conns"], 2, "{s}");
    assert_eq!(s["closed"], 1, "{s}");
    let totals = lines.last().unwrap();
    assert_eq!(totals["event"], "top_interval", "{totals}");
    assert_eq!(totals["lost"], 0, "{totals}");
    assert!(totals["tx_bytes"].as_u64().unwrap() >= sent + replied);
    assert!(totals["closed"].as_u64().unwrap() >= 2, "{totals}");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn by_cgroup_puts_a_child_in_a_fresh_cgroup_in_its_own_row() {
    let _serial = in_process_traffic();
    let plan = vec![Exchange {
        send: 70_000,
        reply: 9_000,
        close: false,
    }];
    let cg = Cgroup::new("top");
    let (l, port) = listener();
    let mut client = Client::spawn(port, &plan);
    std::fs::write(cg.path.join("cgroup.procs"), client.pid().to_string())
        .expect("move the client into the test cgroup");
    let server = serve(l, plan.clone());
    let top = Top::start(&["--once", "--json", "--interval", "2", "--by", "cgroup"]);
    client.run_plan();
    let done = top.finish();
    done.assert_success();
    let kept = server.join().expect("server");
    client.exit();
    drop(kept);

    let lines = done.json();
    let rows = rows(&lines, 1);
    let row = one(&rows, "the test cgroup", |v| v["cgroup"] == cg.rel.as_str());
    assert_eq!(row["by"], "cgroup", "{row}");
    assert_eq!(
        row["cgroup_id"],
        std::fs::metadata(&cg.path).unwrap().ino(),
        "{row}"
    );
    assert_eq!(row["tx_bytes"], 70_000, "{row}");
    assert_eq!(row["rx_bytes"], 9_000, "{row}");
    assert_eq!(row["conns"], 1, "only the client is in that cgroup: {row}");
    assert!(row.get("pid").is_none(), "{row}");
}

/// A connection inside this process: (client, server).
fn local_pair() -> (TcpStream, TcpStream, u16, u16) {
    let (l, port) = listener();
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (server, _) = l.accept().expect("accept");
    let cport = client.local_addr().unwrap().port();
    (client, server, cport, port)
}

fn conn_row<'a>(rows: &[&'a Value], sport: u16, dport: u16) -> &'a Value {
    one(rows, &format!("{sport}->{dport}"), |v| {
        v["sport"] == sport && v["dport"] == dport
    })
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn json_by_conn_gives_each_interval_its_own_bytes() {
    let _serial = in_process_traffic();
    let me = std::process::id().to_string();
    let top = Top::start(&["--json", "--interval", "1", "--by", "conn", "--pid", &me]);
    let (mut client, mut server, cport, sport) = local_pair();
    let mut buf = vec![0u8; 40_000];
    client.write_all(&buf).unwrap();
    server.read_exact(&mut buf).unwrap();
    let first = top.json_until_interval(1);
    let mut reply = vec![0u8; 12_345];
    server.write_all(&reply).unwrap();
    client.read_exact(&mut reply).unwrap();
    let second = top.json_until_interval(2);
    let done = top.terminate();
    done.assert_success();

    let r1 = rows(&first, 1);
    let c1 = conn_row(&r1, cport, sport);
    assert_eq!(
        (c1["tx_bytes"].as_u64(), c1["rx_bytes"].as_u64()),
        (Some(40_000), Some(0)),
        "{c1}"
    );
    assert_eq!(c1["state"], "ESTABLISHED", "{c1}");
    assert_eq!(c1["pid"], std::process::id(), "{c1}");
    assert_eq!(c1["proto"], "tcp", "{c1}");
    let s1 = conn_row(&r1, sport, cport);
    assert_eq!(
        (s1["tx_bytes"].as_u64(), s1["rx_bytes"].as_u64()),
        (Some(0), Some(40_000)),
        "{s1}"
    );
    let r2 = rows(&second, 2);
    let c2 = conn_row(&r2, cport, sport);
    assert_eq!(
        (c2["tx_bytes"].as_u64(), c2["rx_bytes"].as_u64()),
        (Some(0), Some(12_345)),
        "{c2}"
    );
    let s2 = conn_row(&r2, sport, cport);
    assert_eq!(
        (s2["tx_bytes"].as_u64(), s2["rx_bytes"].as_u64()),
        (Some(12_345), Some(0)),
        "{s2}"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn once_text_is_plain_with_a_totals_header() {
    let _serial = in_process_traffic();
    let me = std::process::id().to_string();
    let top = Top::start(&["--once", "--interval", "1", "--by", "conn", "--pid", &me]);
    let (mut client, mut server, cport, _) = local_pair();
    let mut buf = vec![0u8; 54_321];
    client.write_all(&buf).unwrap();
    server.read_exact(&mut buf).unwrap();
    let done = top.finish();
    done.assert_success();
    let text = done.stdout.join("\n");
    assert!(
        !text.contains('\x1b'),
        "control codes in --once output: {text:?}"
    );
    assert!(done.stdout[0].starts_with("socklens top - "), "{text}");
    assert!(done.stdout[0].contains("interval 1"), "{text}");
    assert!(done.stdout[1].starts_with("conns "), "{text}");
    assert!(done.stdout[1].contains("lost 0"), "{text}");
    assert!(
        done.stdout[2].trim_start().starts_with("PID COMM"),
        "{text}"
    );
    let local = format!("127.0.0.1:{cport}");
    let row = done
        .stdout
        .iter()
        .find(|l| l.split_whitespace().nth(3) == Some(local.as_str()))
        .unwrap_or_else(|| panic!("no row for {local}: {text}"));
    let f: Vec<&str> = row.split_whitespace().collect();
    // ... TX RX RETR end the row.
    assert_eq!(f[f.len() - 3..], ["54321", "0", "0"], "{row}");
    assert_eq!(f[0], me, "{row}");
}

/// Runs the TUI on a pseudo-terminal (util-linux `script`), sends `keys`
/// once it has drawn an interval and returns (exit status, everything it wrote).
fn tui_session(keys: &[u8]) -> (ExitStatus, String) {
    require_root();
    // stty -g before and after: raw mode undone means the settings match.
    let shell = format!(
        "stty cols 160 rows 30; before=$(stty -g); {SOCKLENS} top --attach {} --interval 1; rc=$?; \
         after=$(stty -g); [ \"$before\" = \"$after\" ] && echo TERMINAL-RESTORED; exit $rc",
        attach_arg()
    );
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &shell, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script (util-linux)");
    let mut out = child.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let seen = Arc::clone(&seen);
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        })
    };
    // Keys go out once the table is up (raw mode on, so Ctrl-C is a key),
    // and after at least one interval has been drawn.
    let deadline = Instant::now() + WAIT;
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("q quit") {
        assert!(Instant::now() < deadline, "the TUI never drew");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(1500));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(keys).expect("send keys");
    stdin.flush().unwrap();
    let status = wait_with_timeout(&mut child, WAIT);
    drop(stdin);
    reader.join().unwrap();
    let bytes = seen.lock().unwrap().clone();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn assert_tui_ran_and_restored(status: ExitStatus, out: &str) {
    assert!(status.success(), "exit {status}: {out:?}");
    let enter = out
        .find("\x1b[?1049h")
        .unwrap_or_else(|| panic!("no alternate screen: {out:?}"));
    let leave = out
        .rfind("\x1b[?1049l")
        .unwrap_or_else(|| panic!("alternate screen not left: {out:?}"));
    assert!(enter < leave, "{out:?}");
    let shown = &out[enter..leave];
    assert!(shown.contains("PID") && shown.contains("q quit"), "{out:?}");
    // Only a finished interval's title carries the clock ("... UTC - interval 1").
    assert!(shown.contains("UTC"), "no interval drawn: {out:?}");
    assert!(
        out[leave..].contains("\x1b[?25h"),
        "cursor not shown again: {out:?}"
    );
    assert!(
        out.contains("TERMINAL-RESTORED"),
        "tty settings differ after exit: {out:?}"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn tui_quits_on_q_and_restores_the_terminal() {
    let (status, out) = tui_session(b"q");
    assert_tui_ran_and_restored(status, &out);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn tui_quits_on_ctrl_c_and_restores_the_terminal() {
    // Raw mode delivers Ctrl-C as a key (0x03), not as SIGINT.
    let (status, out) = tui_session(b"\x03");
    assert_tui_ran_and_restored(status, &out);
}

#[test]
fn bad_values_are_one_line_errors_with_exit_2() {
    for args in [
        ["top", "--interval", "0"],
        ["top", "--interval", "nan"],
        ["top", "--sort", "foo"],
        ["top", "--by", "thread"],
    ] {
        let (code, stdout, stderr) = socklens(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("socklens: "), "{args:?}: {stderr}");
    }
    let (_, _, stderr) = socklens(&["top", "--sort", "foo"]);
    assert!(stderr.contains("rx, tx, retrans"), "{stderr}");
}
