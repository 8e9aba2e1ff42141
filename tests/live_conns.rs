//! Connection accounting against ground truth from socklens-testbed: exact
//! bytes, sendfile, UDP per peer, retransmits, failures, owners, seeding.
//! Root only; run single-threaded (see README).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The close record of the connection `pid` had on local port `sport`.
fn close_of<'a>(stopped: &'a Stopped, pid: &Value, sport: u64) -> &'a Value {
    let found: Vec<&Value> = stopped
        .of_kind("close")
        .into_iter()
        .filter(|e| e["pid"] == *pid && e["sport"] == sport)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one close for pid {pid} port {sport}: {:#?}",
        stopped.events
    );
    found[0]
}

/// Server and client testbeds exchanging data over TCP while socklens traces
/// close events; returns (server report, client report, what socklens saw).
fn exchange(
    server_steps: &[&str],
    client_steps: &[String],
    netns: Option<(&Netns, &Netns, &str)>,
) -> (Value, Value, Stopped) {
    let tracer = Tracer::start(&["--events", "connect,accept,close"]);
    let mut sargs: Vec<String> = vec!["--comm".into(), unique("slsrv")];
    let mut cargs: Vec<String> = vec!["--comm".into(), unique("slcli")];
    if let Some((a, b, _)) = netns {
        sargs.extend(["--netns".into(), a.name.clone()]);
        cargs.extend(["--netns".into(), b.name.clone()]);
    }
    sargs.extend(server_steps.iter().map(|s| (*s).to_owned()));
    let sargs_ref: Vec<&str> = sargs.iter().map(String::as_str).collect();
    let server = Bed::spawn(&sargs_ref);
    let ready = server.report();
    let port = ready["steps"][0]["port"].to_string();
    cargs.extend(client_steps.iter().map(|s| s.replace("PORT", &port)));
    let cargs_ref: Vec<&str> = cargs.iter().map(String::as_str).collect();
    let client = testbed(&cargs_ref);
    let server = server.finish();
    std::thread::sleep(Duration::from_millis(200));
    let stopped = tracer.stop();
    stopped.assert_clean();
    (server, client, stopped)
}

/// Standard pair: a server that reads everything, a client that does `client`.
fn check_bytes(client: &[&str], sent: u64, family: &str) {
    require_root();
    let (bind, addr) = if family == "inet6" {
        ("bind,tcp6,::1,0", "::1")
    } else {
        ("bind,tcp4,127.0.0.1,0", "127.0.0.1")
    };
    let proto = if family == "inet6" { "tcp6" } else { "tcp4" };
    let mut steps = vec![format!("connect,{proto},{addr},PORT")];
    steps.extend(client.iter().map(|s| (*s).to_owned()));
    steps.push("close,0".into());
    let (server, client, stopped) = exchange(
        &[
            bind,
            "listen,0,8",
            "announce",
            "accept,0",
            "recvall,1,65536",
            "close,1",
        ],
        &steps,
        None,
    );
    assert_eq!(
        u(&server["steps"][3]["bytes"]),
        sent,
        "server read everything: {server}"
    );
    let out = close_of(&stopped, &client["pid"], u(&client["steps"][0]["port"]));
    assert_eq!(out["direction"], "out", "{out}");
    assert_eq!(out["family"], family, "{out}");
    assert_eq!(u(&out["tx_bytes"]), sent, "{out}");
    assert_eq!(u(&out["rx_bytes"]), 0, "{out}");
    assert_eq!(out["comm"], client["comm"], "{out}");
    assert_eq!(out["netns"], client["netns"], "{out}");
    let port = u(&server["steps"][0]["port"]);
    let inn = close_of(&stopped, &server["pid"], port);
    assert_eq!(inn["direction"], "in", "{inn}");
    assert_eq!(u(&inn["rx_bytes"]), sent, "{inn}");
    assert_eq!(u(&inn["tx_bytes"]), 0, "{inn}");
    assert_eq!(inn["comm"], server["comm"], "{inn}");
    assert_eq!(inn["dport"], out["sport"], "the two ends pair up");
    assert!(out["duration_ms"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(out["failure"], Value::Null);
    let connects: Vec<&Value> = stopped
        .of_kind("connect")
        .into_iter()
        .filter(|e| e["pid"] == client["pid"])
        .collect();
    assert_eq!(connects.len(), 1, "{:?}", stopped.events);
    let accepts: Vec<&Value> = stopped
        .of_kind("accept")
        .into_iter()
        .filter(|e| e["pid"] == server["pid"])
        .collect();
    assert_eq!(accepts.len(), 1, "{:?}", stopped.events);
}

#[test]
fn many_small_writes_exact() {
    check_bytes(&["send,0,100000,100"], 100_000, "inet");
}

#[test]
fn one_large_write_exact() {
    check_bytes(&["send,0,4000000,4000000"], 4_000_000, "inet");
}

#[test]
fn ipv6_exact() {
    check_bytes(&["send,0,250000,1000"], 250_000, "inet6");
}

#[test]
fn trickling_sender_blocking_reader_not_overcounted() {
    require_root();
    // The reader blocks in recv() with a 1 MiB buffer while data trickles in:
    // the kernel's receive path runs many times per recv (the tcp_cleanup_rbuf trap).
    let (server, client, stopped) = exchange(
        &[
            "bind,tcp4,127.0.0.1,0",
            "listen,0,8",
            "announce",
            "accept,0",
            "recv,1,60000,1048576",
            "close,1",
        ],
        &[
            "connect,tcp4,127.0.0.1,PORT".into(),
            "send,0,60000,1500,2".into(),
            "close,0".into(),
        ],
        None,
    );
    let calls = u(&server["steps"][3]["calls"]);
    assert!(
        calls > 1,
        "the reader really blocked more than once: {server}"
    );
    let inn = close_of(&stopped, &server["pid"], u(&server["steps"][0]["port"]));
    assert_eq!(u(&inn["rx_bytes"]), 60_000, "{inn}");
    let out = close_of(&stopped, &client["pid"], u(&client["steps"][0]["port"]));
    assert_eq!(u(&out["tx_bytes"]), 60_000, "{out}");
}

#[test]
fn peek_is_not_counted() {
    require_root();
    let (server, _client, stopped) = exchange(
        &[
            "bind,tcp4,127.0.0.1,0",
            "listen,0,8",
            "announce",
            "accept,0",
            "sleep,300",
            "peek,1,65536",
            "recv,1,5000,65536",
            "close,1",
        ],
        &[
            "connect,tcp4,127.0.0.1,PORT".into(),
            "send,0,5000,5000".into(),
            "sleep,800".into(),
            "close,0".into(),
        ],
        None,
    );
    assert!(
        u(&server["steps"][4]["bytes"]) > 0,
        "the peek saw data: {server}"
    );
    let inn = close_of(&stopped, &server["pid"], u(&server["steps"][0]["port"]));
    assert_eq!(u(&inn["rx_bytes"]), 5000, "{inn}");
}

#[test]
fn sendfile_bytes_equal_file_size() {
    require_root();
    let path = std::env::temp_dir().join(format!("sl-sendfile-{}", std::process::id()));
    let size = 300_001usize;
    std::fs::write(&path, vec![b'f'; size]).unwrap();
    let (server, client, stopped) = exchange(
        &[
            "bind,tcp4,127.0.0.1,0",
            "listen,0,8",
            "announce",
            "accept,0",
            "recvall,1,65536",
            "close,1",
        ],
        &[
            "connect,tcp4,127.0.0.1,PORT".into(),
            format!("sendfile,0,{}", path.display()),
            "send,0,10,10".into(),
            "close,0".into(),
        ],
        None,
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(u(&client["steps"][1]["bytes"]), size as u64);
    let out = close_of(&stopped, &client["pid"], u(&client["steps"][0]["port"]));
    assert_eq!(u(&out["sendfile_bytes"]), size as u64, "{out}");
    assert_eq!(
        u(&out["tx_bytes"]),
        size as u64 + 10,
        "sendfile counts in tx too: {out}"
    );
    let inn = close_of(&stopped, &server["pid"], u(&server["steps"][0]["port"]));
    assert_eq!(u(&inn["rx_bytes"]), size as u64 + 10, "{inn}");
}

#[test]
fn active_closer_reading_after_fin_keeps_one_record() {
    require_root();
    // The client half-closes, the server answers and closes: the client's
    // socket reaches TCP_CLOSE (TIME_WAIT handoff) before it reads the answer.
    let (server, client, stopped) = exchange(
        &[
            "bind,tcp4,127.0.0.1,0",
            "listen,0,8",
            "announce",
            "accept,0",
            "recvall,1,65536",
            "send,1,777,777",
            "close,1",
        ],
        &[
            "connect,tcp4,127.0.0.1,PORT".into(),
            "send,0,1000,1000".into(),
            "shutdown,0".into(),
            "sleep,300".into(),
            "recvall,0,65536".into(),
            "close,0".into(),
        ],
        None,
    );
    assert_eq!(u(&client["steps"][4]["bytes"]), 777);
    let out = close_of(&stopped, &client["pid"], u(&client["steps"][0]["port"]));
    assert_eq!(
        (u(&out["tx_bytes"]), u(&out["rx_bytes"])),
        (1000, 777),
        "{out}"
    );
    let inn = close_of(&stopped, &server["pid"], u(&server["steps"][0]["port"]));
    assert_eq!(
        (u(&inn["tx_bytes"]), u(&inn["rx_bytes"])),
        (777, 1000),
        "{inn}"
    );
    let client_closes = stopped
        .of_kind("close")
        .into_iter()
        .filter(|e| e["pid"] == client["pid"])
        .count();
    assert_eq!(client_closes, 1, "{:#?}", stopped.events);
}

#[test]
fn veth_between_two_netns_exact_with_each_sides_netns() {
    require_root();
    let pair = NetnsPair::new("v");
    let bind = format!("bind,tcp4,{},0", pair.addr_a);
    let (server, client, stopped) = exchange(
        &[
            &bind,
            "listen,0,8",
            "announce",
            "accept,0",
            "recvall,1,65536",
            "close,1",
        ],
        &[
            format!("connect,tcp4,{},PORT", pair.addr_a),
            "send,0,123456,4096".into(),
            "close,0".into(),
        ],
        Some((&pair.a, &pair.b, "")),
    );
    let out = close_of(&stopped, &client["pid"], u(&client["steps"][0]["port"]));
    assert_eq!(u(&out["tx_bytes"]), 123_456, "{out}");
    assert_eq!(u(&out["netns"]), netns_inode(&pair.b.name), "{out}");
    assert_eq!(out["saddr"], pair.addr_b.as_str(), "{out}");
    assert_eq!(out["daddr"], pair.addr_a.as_str(), "{out}");
    let inn = close_of(&stopped, &server["pid"], u(&server["steps"][0]["port"]));
    assert_eq!(u(&inn["rx_bytes"]), 123_456, "{inn}");
    assert_eq!(u(&inn["netns"]), netns_inode(&pair.a.name), "{inn}");
}

#[test]
fn failed_connect_is_refused() {
    require_root();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let comm = unique("slref");
    let tracer = Tracer::start(&["--events", "close", "--comm", &comm]);
    let tb = testbed(&["--comm", &comm, &format!("connect,tcp4,127.0.0.1,{port}")]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert_eq!(tb["steps"][0]["errno"], libc::ECONNREFUSED);
    assert_eq!(stopped.events.len(), 1, "{:#?}", stopped.events);
    let e = &stopped.events[0];
    assert_eq!(e["failure"], "refused", "{e}");
    assert_eq!(e["pid"], tb["pid"], "{e}");
    assert_eq!(u(&e["dport"]), u64::from(port), "{e}");
    assert_eq!(e["direction"], "out", "{e}");
}

#[test]
fn owner_cgroup_netns_and_comm_match_the_opener() {
    require_root();
    let cg = Cgroup::new("o");
    let ns = Netns::new("o");
    let comm = unique("slown");
    let tracer = Tracer::start(&["--events", "close", "--comm", &comm]);
    let cgpath = cg.path.to_str().unwrap();
    let tb = testbed(&[
        "--comm",
        &comm,
        "--netns",
        &ns.name,
        "--cgroup",
        cgpath,
        "bind,tcp4,127.0.0.1,0",
        "listen,0,4",
        "connect,tcp4,127.0.0.1,@0",
        "accept,0",
        "send,1,10,10",
        "recv,2,10,10",
        "close,1",
        "close,2",
    ]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    let closes = stopped.of_kind("close");
    assert_eq!(closes.len(), 2, "both ends: {:#?}", stopped.events);
    for e in closes {
        assert_eq!(e["pid"], tb["pid"], "{e}");
        assert_eq!(e["comm"], comm.as_str(), "{e}");
        assert_eq!(e["cgroup"], cg.rel.as_str(), "{e}");
        assert_eq!(u(&e["cgroup_id"]), {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&cg.path).unwrap().ino()
        });
        assert_eq!(u(&e["netns"]), netns_inode(&ns.name), "{e}");
        assert_eq!((u(&e["tx_bytes"]) + u(&e["rx_bytes"])), 10, "{e}");
    }
}
