//! bind and listen tracing against ground truth from socklens-testbed.
//! Root only; run single-threaded (docs/testing.md).

mod common;

use common::*;
use serde_json::Value;

fn host_netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

/// The one event of `kind` from this testbed run, checked against its identity.
fn one_event<'a>(stopped: &'a Stopped, kind: &str, tb: &Value, port: u64) -> &'a Value {
    let found: Vec<&Value> = stopped
        .of_kind(kind)
        .into_iter()
        .filter(|e| e["pid"] == tb["pid"] && e["port"] == port)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one {kind} on port {port} from {tb}, got {:?}",
        stopped.events
    );
    let e = found[0];
    assert_eq!(e["tid"], tb["tid"], "{e}");
    assert_eq!(e["comm"], tb["comm"], "{e}");
    assert_eq!(e["netns"], tb["netns"], "{e}");
    assert_eq!(e["uid"], 0, "{e}");
    assert!(e["cgroup_id"].as_u64().unwrap() > 0, "{e}");
    assert!(e["cgroup"].is_string(), "{e}");
    assert!(e["time_ns"].as_u64().unwrap() > 0, "{e}");
    assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    e
}

/// Binds of each protocol and family to port 0, in the host netns or a test netns.
fn binds_report_assigned_ports(netns: Option<&Netns>) {
    require_root();
    let comm = unique("slbind");
    let tracer = Tracer::start(&["--events", "bind", "--comm", &comm]);
    let mut args = vec!["--comm", comm.as_str()];
    if let Some(ns) = netns {
        args.extend(["--netns", ns.name.as_str()]);
    }
    args.extend([
        "bind,tcp4,127.0.0.1,0",
        "bind,udp4,127.0.0.1,0",
        "bind,tcp6,::1,0",
        "bind,udp6,::1,0",
    ]);
    let tb = testbed(&args);
    let stopped = tracer.stop();
    stopped.assert_clean();
    if netns.is_some() {
        assert_ne!(
            tb["netns"],
            host_netns(),
            "testbed did not enter the test netns"
        );
    }
    let want = [
        ("tcp", "inet", "127.0.0.1"),
        ("udp", "inet", "127.0.0.1"),
        ("tcp", "inet6", "::1"),
        ("udp", "inet6", "::1"),
    ];
    for (i, (proto, family, addr)) in want.into_iter().enumerate() {
        let step = &tb["steps"][i];
        assert_eq!(step["errno"], 0, "{tb}");
        let port = step["port"].as_u64().unwrap();
        assert_ne!(port, 0);
        let e = one_event(&stopped, "bind", &tb, port);
        assert_eq!(e["proto"], proto, "{e}");
        assert_eq!(e["family"], family, "{e}");
        assert_eq!(e["addr"], addr, "{e}");
        assert_eq!(e["ret"], 0, "{e}");
        assert_eq!(e["errno"], Value::Null, "{e}");
    }
    assert_eq!(
        stopped.events.len(),
        4,
        "only this testbed's binds: {:?}",
        stopped.events
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn bind_port_zero_reports_assigned_port_host_netns() {
    binds_report_assigned_ports(None);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn bind_port_zero_reports_assigned_port_test_netns() {
    let ns = Netns::new("b");
    binds_report_assigned_ports(Some(&ns));
}

fn free_port_v6_udp() -> u16 {
    let s = std::net::UdpSocket::bind("[::1]:0").unwrap();
    s.local_addr().unwrap().port()
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn bind_fixed_port_and_socket_options() {
    require_root();
    let comm = unique("slopt");
    let port = free_port_v6_udp();
    let tracer = Tracer::start(&["--events", "bind", "--comm", &comm]);
    let step = format!("bind,udp6,::1,{port},reuseaddr,reuseport,freebind,dev=lo");
    let tb = testbed(&["--comm", &comm, &step]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert_eq!(tb["steps"][0]["port"], port);
    let e = one_event(&stopped, "bind", &tb, u64::from(port));
    let opts: Vec<&str> = e["opts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(opts, ["IP_FREEBIND", "SO_REUSEADDR", "SO_REUSEPORT"], "{e}");
    let lo_index: u64 = std::fs::read_to_string("/sys/class/net/lo/ifindex")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(e["bound_dev_if"], lo_index, "{e}");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn failed_bind_reports_errno_and_requested_address() {
    require_root();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let comm = unique("slfail");
    let tracer = Tracer::start(&["--events", "bind", "--comm", &comm]);
    let tb = testbed(&["--comm", &comm, &format!("bind,tcp4,127.0.0.1,{port}")]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert_eq!(tb["steps"][0]["errno"], libc::EADDRINUSE, "{tb}");
    let e = one_event(&stopped, "bind", &tb, u64::from(port));
    assert_eq!(e["ret"], -libc::EADDRINUSE, "{e}");
    assert_eq!(e["errno"], "EADDRINUSE", "{e}");
    assert_eq!(e["addr"], "127.0.0.1", "{e}");
}

/// listen with backlogs 1, 128 and 100000: effective = min(requested, somaxconn).
fn listen_backlogs(netns: Option<&Netns>) {
    require_root();
    let comm = unique("sllisten");
    let tracer = Tracer::start(&["--events", "listen", "--comm", &comm]);
    let mut args = vec!["--comm", comm.as_str()];
    if let Some(ns) = netns {
        args.extend(["--netns", ns.name.as_str()]);
    }
    args.extend([
        "bind,tcp4,127.0.0.1,0",
        "bind,tcp6,::1,0",
        "bind,tcp4,127.0.0.1,0",
        "listen,0,1",
        "listen,1,128",
        "listen,2,100000",
    ]);
    let tb = testbed(&args);
    let stopped = tracer.stop();
    stopped.assert_clean();
    let somaxconn = tb["somaxconn"].as_u64().unwrap();
    for (sock, requested) in [(0, 1u64), (1, 128), (2, 100_000)] {
        assert_eq!(tb["steps"][3 + sock]["errno"], 0, "{tb}");
        let port = tb["steps"][sock]["port"].as_u64().unwrap();
        let e = one_event(&stopped, "listen", &tb, port);
        assert_eq!(e["backlog_requested"], requested, "{e}");
        assert_eq!(e["backlog"], requested.min(somaxconn), "{e}");
        assert_eq!(e["ret"], 0, "{e}");
        assert_eq!(e["proto"], "tcp", "{e}");
    }
    assert_eq!(stopped.events.len(), 3, "{:?}", stopped.events);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn listen_backlog_capped_by_somaxconn_host_netns() {
    listen_backlogs(None);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn listen_backlog_capped_by_the_sockets_own_netns_somaxconn() {
    let ns = Netns::new("l");
    // A cap unlike the host's proves the netns' own sysctl is what applies.
    ns.exec(&["sysctl", "-q", "-w", "net.core.somaxconn=333"]);
    listen_backlogs(Some(&ns));
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn pid_filter_drops_other_processes() {
    require_root();
    let comm = unique("slpid");
    let wanted = Waiting::start(&["--comm", &comm, "bind,tcp4,127.0.0.1,0"]);
    let pid = wanted.pid.to_string();
    let tracer = Tracer::start(&["--pid", &pid]);
    let other = testbed(&["--comm", &comm, "bind,tcp4,127.0.0.1,0"]);
    let tb = wanted.go();
    let stopped = tracer.stop();
    stopped.assert_clean();
    one_event(
        &stopped,
        "bind",
        &tb,
        tb["steps"][0]["port"].as_u64().unwrap(),
    );
    assert!(stopped.of_pid(other["pid"].as_u64().unwrap()).is_empty());
    assert!(
        stopped.events.iter().all(|e| e["pid"] == wanted_pid(&tb)),
        "{:?}",
        stopped.events
    );
    // Without --events: one line says which events these are.
    let notes: Vec<&str> = stopped
        .stderr
        .lines()
        .filter(|l| l.contains("showing bind and listen") && l.contains("--events"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", stopped.stderr);
}

fn wanted_pid(tb: &Value) -> u64 {
    tb["pid"].as_u64().unwrap()
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn netns_filter_keeps_only_that_namespace() {
    require_root();
    let ns = Netns::new("f");
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/var/run/netns/{}", ns.name))
            .unwrap()
            .ino()
    };
    let comm = unique("slns");
    let tracer = Tracer::start(&["--netns", &inode.to_string(), "--comm", &comm]);
    let host = testbed(&["--comm", &comm, "bind,tcp4,127.0.0.1,0"]);
    let inside = testbed(&[
        "--comm",
        &comm,
        "--netns",
        &ns.name,
        "bind,tcp4,127.0.0.1,0",
        "listen,0,7",
    ]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert_eq!(inside["netns"], inode);
    let port = inside["steps"][0]["port"].as_u64().unwrap();
    one_event(&stopped, "bind", &inside, port);
    one_event(&stopped, "listen", &inside, port);
    assert!(
        stopped.of_pid(host["pid"].as_u64().unwrap()).is_empty(),
        "{:?}",
        stopped.events
    );
    assert_eq!(stopped.events.len(), 2);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn family_filter_keeps_only_ipv6() {
    require_root();
    let comm = unique("slv6");
    let tracer = Tracer::start(&["-6", "--comm", &comm]);
    let tb = testbed(&["--comm", &comm, "bind,tcp4,127.0.0.1,0", "bind,udp6,::1,0"]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert_eq!(stopped.events.len(), 1, "{:?}", stopped.events);
    one_event(
        &stopped,
        "bind",
        &tb,
        tb["steps"][1]["port"].as_u64().unwrap(),
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn cgroup_filter_and_cgroup_path() {
    require_root();
    let cg = Cgroup::new("c");
    let comm = unique("slcg");
    let tracer = Tracer::start(&["--cgroup", &cg.rel]);
    let outside = testbed(&["--comm", &comm, "bind,tcp4,127.0.0.1,0"]);
    let inside = testbed(&[
        "--comm",
        &comm,
        "--cgroup",
        cg.path.to_str().unwrap(),
        "bind,tcp4,127.0.0.1,0",
    ]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    let e = one_event(
        &stopped,
        "bind",
        &inside,
        inside["steps"][0]["port"].as_u64().unwrap(),
    );
    assert_eq!(e["cgroup"], cg.rel.as_str(), "{e}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        e["cgroup_id"],
        std::fs::metadata(&cg.path).unwrap().ino(),
        "{e}"
    );
    assert!(stopped.of_pid(outside["pid"].as_u64().unwrap()).is_empty());
    assert_eq!(stopped.events.len(), 1, "{:?}", stopped.events);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn perf_buffer_fallback_delivers_events() {
    require_root();
    let comm = unique("slperf");
    let tracer = Tracer::start(&["--buffer", "perf", "--comm", &comm]);
    let tb = testbed(&["--comm", &comm, "bind,udp4,127.0.0.1,0"]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    one_event(
        &stopped,
        "bind",
        &tb,
        tb["steps"][0]["port"].as_u64().unwrap(),
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn sigterm_detaches_everything() {
    require_root();
    let before = socklens_programs();
    let tracer = Tracer::start(&[]);
    let ours: Vec<u32> = socklens_programs().difference(&before).copied().collect();
    assert!(!ours.is_empty(), "programs should be loaded while tracing");
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert!(
        stopped.stderr.contains("events, 0 lost"),
        "{}",
        stopped.stderr
    );
    let after = socklens_programs();
    let left: Vec<&u32> = ours.iter().filter(|id| after.contains(id)).collect();
    assert!(
        left.is_empty(),
        "programs {left:?} left loaded after SIGTERM"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn columns_output_names_the_event() {
    require_root();
    let comm = unique("slcol");
    let mut child = std::process::Command::new(SOCKLENS)
        .args(["trace", "--attach", &attach_arg(), "--comm", &comm])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until attached: start-up takes seconds under emulation.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Ctrl-C to stop") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut err, &mut line).unwrap() > 0,
            "socklens exited"
        );
    }
    let tb = testbed(&["--comm", &comm, "bind,tcp4,127.0.0.1,0"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("TIME"), "{text}");
    let port = tb["steps"][0]["port"].to_string();
    let line = lines
        .find(|l| l.contains(&comm))
        .unwrap_or_else(|| panic!("no line for {comm}: {text}"));
    assert!(line.contains(" bind "), "{line}");
    assert!(line.contains(&format!(" 127.0.0.1:{port} ")), "{line}");
    assert!(line.ends_with(&format!("netns={}", host_netns())), "{line}");
}
