//! `socklens trace` on the cgroup socket hooks (sock_create, connect, sendmsg,
//! recvmsg, getsockopt, getpeername, sock_release) against ground truth from
//! socklens-testbed, run in a cgroup and netns this test makes. The observer
//! programs attach at that cgroup (--cgroup) and never enforce.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use serde_json::Value;

const ALL: &str = "sock_create,connect,sendmsg,recvmsg,getsockopt,getpeername,sock_release";

fn with_cookie<'a>(events: &'a [&'a Value], kind: &str, cookie: &Value) -> Vec<&'a Value> {
    events
        .iter()
        .copied()
        .filter(|e| e["event"] == kind && &e["cookie"] == cookie)
        .collect()
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn every_cgroup_hook_event_matches_ground_truth() {
    require_root();
    let cg = Cgroup::new("ct");
    let ns = Netns::new("ct");
    let comm = unique("slct");
    let tracer = Tracer::start(&["--events", ALL, "--cgroup", &cg.rel, "--comm", &comm]);
    let start = std::time::Instant::now();
    let tb = testbed(&[
        "--comm",
        &comm,
        "--netns",
        &ns.name,
        "--cgroup",
        cg.path.to_str().unwrap(),
        "bind,tcp4,127.0.0.1,7000",    // socket 0; nobody accepts: the
        "listen,0,5",                  // connection waits in the queue
        "connect,tcp4,127.0.0.1,7000", // socket 1
        "peer,1",
        "getsockopt,1,1,3",     // SOL_SOCKET, SO_TYPE
        "bind,udp6,::1,7777",   // socket 2
        "sendto,udp6,::1,7777", // socket 3
        "recv,2",
        "close,1",
    ]);
    let elapsed = start.elapsed().as_nanos() as u64;
    let stopped = tracer.stop();
    stopped.assert_clean();
    let steps = &tb["steps"];
    for i in 0..8 {
        assert_eq!(steps[i]["errno"], 0, "step {i}: {tb}");
    }
    assert_eq!(steps[3]["port"], 7000);
    assert_eq!(steps[4]["value"], libc::SOCK_STREAM);
    let cg_id = std::fs::metadata(&cg.path).unwrap().ino();
    let mine = stopped.of_pid(tb["pid"].as_u64().unwrap());
    assert_eq!(
        mine.len(),
        stopped.events.len(),
        "only the testbed: {:?}",
        stopped.events
    );
    for e in &mine {
        assert_eq!(e["tid"], tb["tid"], "{e}");
        assert_eq!(e["comm"], comm.as_str(), "{e}");
        assert_eq!(e["netns"], tb["netns"], "{e}");
        assert_eq!(e["cgroup_id"], cg_id, "{e}");
        assert_eq!(e["cgroup"], cg.rel.as_str(), "{e}");
        assert_eq!(e["attach"], "cgroup", "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    }
    let of =
        |k: &str| -> Vec<&Value> { mine.iter().copied().filter(|e| e["event"] == k).collect() };

    // One sock_create per socket the testbed made (the close placeholder is AF_UNIX,
    // which the inet hook never sees).
    let creates = of("sock_create");
    let want = [
        ("inet", "stream", "tcp"),
        ("inet", "stream", "tcp"),
        ("inet6", "dgram", "udp"),
        ("inet6", "dgram", "udp"),
    ];
    let got: Vec<(&str, &str, &str)> = creates
        .iter()
        .map(|e| {
            (
                e["family"].as_str().unwrap(),
                e["type"].as_str().unwrap(),
                e["proto"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want, "{creates:?}");

    let connects = of("connect");
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert_eq!(connects[0]["addr"], "127.0.0.1");
    assert_eq!(connects[0]["port"], 7000);
    assert_eq!(connects[0]["proto"], "tcp");
    assert_eq!(connects[0]["cookie"], creates[1]["cookie"], "same socket");

    let peers = of("getpeername");
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["addr"], "127.0.0.1");
    assert_eq!(peers[0]["port"], 7000);

    let opts = of("getsockopt");
    assert_eq!(opts.len(), 1, "{opts:?}");
    assert_eq!(opts[0]["level"], libc::SOL_SOCKET);
    assert_eq!(opts[0]["level_name"], "SOL_SOCKET");
    assert_eq!(opts[0]["optname"], libc::SO_TYPE);
    assert_eq!(opts[0]["ret"], 0);

    let sends = of("sendmsg");
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0]["addr"], "::1");
    assert_eq!(sends[0]["port"], 7777);
    assert_eq!(sends[0]["family"], "inet6");
    assert_eq!(sends[0]["cookie"], creates[3]["cookie"]);

    let recvs = of("recvmsg");
    assert_eq!(recvs.len(), 1, "{recvs:?}");
    assert_eq!(recvs[0]["addr"], "::1");
    assert_eq!(
        recvs[0]["port"], steps[6]["local_port"],
        "the sender's port"
    );
    assert_eq!(steps[7]["from_port"], steps[6]["local_port"]);
    assert_eq!(recvs[0]["cookie"], creates[2]["cookie"]);

    // Every socket is released (close, then exit), each with its lifetime.
    let releases = of("sock_release");
    assert_eq!(releases.len(), 4, "{releases:?}");
    for c in &creates {
        let r = with_cookie(&releases, "sock_release", &c["cookie"]);
        assert_eq!(r.len(), 1, "release of {c}");
        let life = r[0]["lifetime_ns"].as_u64().unwrap();
        let span = r[0]["time_ns"].as_u64().unwrap() - c["time_ns"].as_u64().unwrap();
        assert_eq!(
            life, span,
            "lifetime = release time - create time: {}",
            r[0]
        );
        assert!(
            life > 0 && life < elapsed,
            "{life} within the testbed's {elapsed} ns"
        );
    }
    let bound = with_cookie(&releases, "sock_release", &creates[2]["cookie"]);
    assert_eq!(bound[0]["port"], 7777, "release shows the local port");
    assert_eq!(bound[0]["addr"], "::1");

    let summary = stopped.summary.as_ref().unwrap();
    for hook in ALL.split(',') {
        assert_eq!(summary["attach"][hook], "cgroup", "{summary}");
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn cgroup_hooks_combine_with_bind_and_listen_and_detach_on_exit() {
    require_root();
    let cg = Cgroup::new("cb");
    let comm = unique("slcb");
    let tracer = Tracer::start(&[
        "--events",
        "bind,listen,connect",
        "--cgroup",
        &cg.rel,
        "--comm",
        &comm,
    ]);
    let tb = testbed(&[
        "--comm",
        &comm,
        "--cgroup",
        cg.path.to_str().unwrap(),
        "bind,tcp6,::1,0",
        "listen,0,5",
        "connect,tcp4,127.0.0.1,1",
    ]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    let kinds: Vec<&str> = stopped
        .events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "bind").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "listen").count(),
        1,
        "{kinds:?}"
    );
    let c: Vec<&Value> = stopped.of_kind("connect");
    assert_eq!(c.len(), 1, "{kinds:?}");
    assert_eq!(c[0]["port"], 1);
    assert_eq!(tb["steps"][2]["errno"], libc::ECONNREFUSED);
    // This binary applies no policy, so no slp_ program may remain (freeing is
    // deferred: wait a little).
    let slp = || -> Vec<String> {
        libbpf_rs::query::ProgInfoIter::default()
            .map(|p| p.name.to_string_lossy().into_owned())
            .filter(|n| n.starts_with("slp_"))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = slp();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        left = slp();
    }
    assert_eq!(left, Vec::<String>::new(), "trace left programs loaded");
}

#[test]
fn unknown_event_lists_the_cgroup_hooks() {
    let (code, _, err) = socklens(&["trace", "--events", "connect,frob"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("sock_create") && err.contains("sock_release"),
        "{err}"
    );
}

/// Records of the connection/bind ring buffer and of the cgroup hooks' ring
/// buffer reach the output merged in the order of their kernel timestamps.
#[test]
#[ignore = "needs root: ./test.sh"]
fn events_of_both_ring_buffers_come_in_time_order() {
    require_root();
    let comm = unique("slord");
    let tracer = Tracer::start(&[
        "--events",
        "bind,listen,established,accept,close,sock_create,connect,sock_release",
        "--comm",
        &comm,
    ]);
    let mut steps: Vec<String> = vec![
        "--comm".into(),
        comm.clone(),
        "bind,tcp4,127.0.0.1,0".into(),
        "listen,0,64".into(),
    ];
    for i in 0..40 {
        let client = 1 + 2 * i;
        steps.push("connect,tcp4,127.0.0.1,@0".into());
        steps.push("accept,0".into());
        steps.push(format!("close,{client}"));
        steps.push(format!("close,{}", client + 1));
        // Spread over several polls of the buffers, so that some records
        // of one round are drained in one poll and the rest in the next.
        steps.push("sleep,7".into());
    }
    let args: Vec<&str> = steps.iter().map(String::as_str).collect();
    let tb = testbed(&args);
    wait_tcp_closed(
        u16::try_from(tb["steps"][0]["port"].as_u64().unwrap()).unwrap(),
        &[None],
        std::time::Duration::from_secs(20),
    );
    let stopped = tracer.stop();
    stopped.assert_clean();
    let stamps: Vec<u64> = stopped
        .events
        .iter()
        .map(|e| e["time_ns"].as_u64().unwrap())
        .collect();
    let cgroup: Vec<bool> = stopped
        .events
        .iter()
        .map(|e| e["attach"] == "cgroup")
        .collect();
    let switches = cgroup.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches >= 40,
        "the two buffers' records interleave ({switches} switches): {:#?}",
        stopped.events
    );
    for (i, w) in stamps.windows(2).enumerate() {
        assert!(
            w[0] <= w[1],
            "record {} ({}) is older than the one before it ({}): {:#?}",
            i + 1,
            stopped.events[i + 1],
            stopped.events[i],
            &stopped.events[i.saturating_sub(3)..(i + 4).min(stamps.len())]
        );
    }
}
