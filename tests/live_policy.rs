//! Per-cgroup socket policy, enforced for real: processes (socklens-testbed) in
//! fresh cgroups and netns this test makes, the policy attached only at a
//! test-made cgroup (never at the cgroup v2 root), and removed after each test.
//! Root only; run single-threaded (the pinned policy is one per host).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const EACCES: i64 = libc::EACCES as i64;
const EPERM: i64 = libc::EPERM as i64;

/// A test cgroup with `gov` (governed) and `sib` (sibling) children, a test
/// netns, and a guard that removes the policy when the test ends.
struct Bed {
    root: Cgroup,
    pub netns: Netns,
    dir: PathBuf,
}

impl Bed {
    fn new(tag: &str) -> Self {
        require_root();
        // Leftovers of an earlier, aborted run would make results meaningless.
        let (code, _, err) = socklens(&["policy", "remove"]);
        assert_eq!(code, 0, "{err}");
        let root = Cgroup::new(tag);
        for child in ["gov", "sib"] {
            fs::create_dir(root.path.join(child)).expect("child cgroup");
        }
        let dir = std::env::temp_dir().join(format!("slp-{}", unique(tag)));
        fs::create_dir_all(&dir).unwrap();
        Self {
            netns: Netns::new(tag),
            root,
            dir,
        }
    }

    fn gov(&self) -> PathBuf {
        self.root.path.join("gov")
    }

    fn sib(&self) -> PathBuf {
        self.root.path.join("sib")
    }

    /// A policy attached at this test's cgroup, governing `gov`.
    fn policy(&self, name: &str, scope_extra: &str, rules: &str) -> PathBuf {
        let text = format!(
            "attach = \"{root}\"\n\n[[scope]]\ncgroup = \"{root}/gov\"\n{scope_extra}\n{rules}",
            root = self.root.rel
        );
        let path = self.dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn apply(&self, path: &Path) {
        let (code, out, err) = socklens(&["policy", "apply", path.to_str().unwrap()]);
        assert_eq!(code, 0, "apply failed: {err}");
        assert!(out.starts_with("applied "), "{out}");
    }

    /// testbed in `cgroup` and this test's netns.
    fn run(&self, cgroup: &Path, steps: &[&str]) -> Value {
        let mut args = vec![
            "--netns",
            self.netns.name.as_str(),
            "--cgroup",
            cgroup.to_str().unwrap(),
        ];
        args.extend_from_slice(steps);
        testbed(&args)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new(SOCKLENS).args(["policy", "remove"]).output();
        for child in ["gov", "sib"] {
            let _ = fs::remove_dir(self.root.path.join(child));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn rule(id: u32, action: &str, on: &str, extra: &str) -> String {
    format!("[[scope.rule]]\nid = {id}\naction = \"{action}\"\non = [{on}]\n{extra}\n")
}

fn errnos(tb: &Value) -> Vec<i64> {
    tb["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("errno").is_some())
        .map(|s| s["errno"].as_i64().unwrap())
        .collect()
}

fn show() -> Value {
    let (code, out, err) = socklens(&["policy", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

/// hits of rule `id` in the policy in force.
fn hits(id: u64) -> u64 {
    let v = show();
    for s in v["scopes"].as_array().unwrap() {
        for r in s["rules"].as_array().unwrap() {
            if r["id"] == id {
                return r["hits"].as_u64().unwrap();
            }
        }
    }
    panic!("no rule {id} in {v}");
}

fn slp_programs() -> Vec<String> {
    libbpf_rs::query::ProgInfoIter::default()
        .map(|p| p.name.to_string_lossy().into_owned())
        .filter(|n| n.starts_with("slp_"))
        .collect()
}

/// Program freeing after the last link goes is deferred (RCU): wait a little.
fn assert_no_slp_programs() {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !slp_programs().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(slp_programs(), Vec::<String>::new(), "programs left loaded");
}

const SERVE_V4: [&str; 3] = [
    "serve,tcp4,127.0.0.1,7050",
    "serve,tcp4,127.0.0.1,7200",
    "serve,tcp4,127.0.0.2,7200",
];
const SERVE_V6: [&str; 2] = ["serve,tcp6,::1,7050", "serve,tcp6,::1,7200"];

#[test]
#[ignore = "needs root: ./test.sh"]
fn connect_denied_cidr_and_ports_fail_with_eacces_others_and_sibling_succeed() {
    let bed = Bed::new("pc");
    let p = bed.policy(
        "p.toml",
        "",
        &[
            rule(
                11,
                "deny",
                "\"connect\"",
                "cidr = \"127.0.0.1/32\"\nports = \"7000-7099\"",
            ),
            rule(12, "deny", "\"connect\"", "cidr = \"127.0.0.2\""),
            rule(
                13,
                "deny",
                "\"connect\"",
                "cidr = \"::1/128\"\nports = \"7000-7099\"",
            ),
        ]
        .concat(),
    );
    bed.apply(&p);
    let mut steps: Vec<&str> = SERVE_V4.into_iter().chain(SERVE_V6).collect();
    steps.extend([
        "connect,tcp4,127.0.0.1,7050",
        "connect,tcp4,127.0.0.1,7200",
        "connect,tcp4,127.0.0.2,7200",
        "connect,tcp6,::1,7050",
        "connect,tcp6,::1,7200",
        // A dual-stack IPv6 socket to an IPv4-mapped address: the IPv4 rules.
        "connect,tcp6,::ffff:127.0.0.2,7200",
        // UDP connect is judged too.
        "connect,udp4,127.0.0.1,7060",
        "connect,udp4,127.0.0.1,7260",
    ]);
    let gov = bed.run(&bed.gov(), &steps);
    assert_eq!(
        errnos(&gov),
        [EACCES, 0, EACCES, EACCES, 0, EACCES, EACCES, 0],
        "{gov}"
    );
    let sib = bed.run(&bed.sib(), &steps);
    assert_eq!(errnos(&sib), [0; 8], "sibling cgroup is unaffected: {sib}");
    assert_eq!(hits(11), 2, "rule 11: tcp4 and udp4 to 127.0.0.1:70xx");
    assert_eq!(hits(12), 2, "rule 12: 127.0.0.2 and ::ffff:127.0.0.2");
    assert_eq!(hits(13), 1);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn precedence_longest_prefix_then_narrowest_ports_then_deny() {
    let bed = Bed::new("pp");
    let p = bed.policy(
        "p.toml",
        "",
        &[
            rule(1, "deny", "\"connect\"", "cidr = \"127.0.0.0/8\""),
            rule(
                2,
                "allow",
                "\"connect\"",
                "cidr = \"127.0.0.0/24\"\nports = \"7000-7999\"",
            ),
            rule(
                3,
                "deny",
                "\"connect\"",
                "cidr = \"127.0.0.1/32\"\nports = 7001",
            ),
            rule(
                4,
                "allow",
                "\"connect\"",
                "cidr = \"127.0.0.1/32\"\nports = 7001",
            ),
            rule(
                5,
                "allow",
                "\"connect\"",
                "cidr = \"127.0.0.5/32\"\nports = \"7100-7200\"",
            ),
            rule(
                6,
                "deny",
                "\"connect\"",
                "cidr = \"127.0.0.5/32\"\nports = 7150",
            ),
            rule(7, "allow", "\"connect\"", "cidr = \"::/0\""),
            rule(
                8,
                "deny",
                "\"connect\"",
                "cidr = \"::1/128\"\nports = \"7000-7010\"",
            ),
        ]
        .concat(),
    );
    bed.apply(&p);
    let tb = bed.run(
        &bed.gov(),
        &[
            "serve,tcp4,127.0.0.2,7000",
            "serve,tcp4,127.0.1.1,7000",
            "serve,tcp4,127.0.0.1,7001",
            "serve,tcp4,127.0.0.1,7002",
            "serve,tcp4,127.0.0.5,7150",
            "serve,tcp4,127.0.0.5,7151",
            "serve,tcp6,::1,7005",
            "serve,tcp6,::1,7011",
            "connect,tcp4,127.0.0.2,7000", // /24 allow beats /8 deny
            "connect,tcp4,127.0.1.1,7000", // only /8: deny
            "connect,tcp4,127.0.0.1,7001", // same prefix, same ports: deny wins
            "connect,tcp4,127.0.0.1,7002", // /32 has no rule for 7002: /24 allows
            "connect,tcp4,127.0.0.5,7150", // narrower port range (deny) wins
            "connect,tcp4,127.0.0.5,7151", // only the wider allow covers it
            "connect,tcp6,::1,7005",       // /128 deny beats ::/0 allow
            "connect,tcp6,::1,7011",       // /128 has no rule for 7011: ::/0 allows
        ],
    );
    assert_eq!(
        errnos(&tb),
        [0, EACCES, EACCES, 0, EACCES, 0, EACCES, 0],
        "{tb}"
    );
    for (id, want) in [
        (1, 1),
        (2, 2),
        (3, 1),
        (4, 0),
        (5, 1),
        (6, 1),
        (7, 1),
        (8, 1),
    ] {
        assert_eq!(hits(id), want, "rule {id}: {}", show());
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn bind_to_denied_port_range_fails_tcp_udp_v4_v6() {
    let bed = Bed::new("pb");
    let p = bed.policy(
        "p.toml",
        "",
        &[
            rule(21, "deny", "\"bind\"", "ports = \"7000-7099\""),
            rule(
                22,
                "deny",
                "\"bind\"",
                "cidr = \"127.0.0.3/32\"\nproto = \"udp\"",
            ),
        ]
        .concat(),
    );
    bed.apply(&p);
    let steps = [
        "bind,tcp4,127.0.0.1,7050",
        "bind,udp4,127.0.0.1,7050",
        "bind,tcp6,::1,7099",
        "bind,udp6,::1,7000",
        "bind,tcp4,127.0.0.1,7100",
        "bind,udp6,::1,6999",
        "bind,udp4,127.0.0.3,7300",
        "bind,tcp4,127.0.0.3,7300",
    ];
    let gov = bed.run(&bed.gov(), &steps);
    assert_eq!(
        errnos(&gov),
        [EACCES, EACCES, EACCES, EACCES, 0, 0, EACCES, 0],
        "{gov}"
    );
    let sib = bed.run(&bed.sib(), &steps);
    assert_eq!(errnos(&sib), [0; 8], "{sib}");
    assert_eq!(hits(21), 4);
    assert_eq!(hits(22), 1);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn udp_sendto_denied_destination_fails_with_eperm() {
    let bed = Bed::new("ps");
    let p = bed.policy(
        "p.toml",
        "",
        &[
            rule(31, "deny", "\"sendmsg\"", "cidr = \"127.0.0.9/32\""),
            rule(32, "deny", "\"sendmsg\"", "cidr = \"::1/128\"\nports = 9"),
        ]
        .concat(),
    );
    bed.apply(&p);
    let steps = [
        "sendto,udp4,127.0.0.9,9",
        "sendto,udp4,127.0.0.10,9",
        "sendto,udp6,::1,9",
        "sendto,udp6,::1,10",
    ];
    let gov = bed.run(&bed.gov(), &steps);
    assert_eq!(errnos(&gov), [EPERM, 0, EPERM, 0], "{gov}");
    let sib = bed.run(&bed.sib(), &steps);
    assert_eq!(errnos(&sib), [0; 4], "{sib}");
    assert_eq!(hits(31), 1);
    assert_eq!(hits(32), 1);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn creating_denied_socket_types_fails() {
    let bed = Bed::new("pk");
    let p = bed.policy(
        "p.toml",
        "",
        &[
            rule(41, "deny", "\"create\"", "type = \"raw\""),
            rule(42, "deny", "\"create\"", "family = \"inet6\""),
            // More specific (family + type + proto) beats the family rule.
            rule(
                43,
                "allow",
                "\"create\"",
                "family = \"inet6\"\ntype = \"dgram\"\nproto = \"udp\"",
            ),
        ]
        .concat(),
    );
    bed.apply(&p);
    let steps = [
        "socket,inet,raw,1", // raw ICMP
        "socket,inet6,stream,0",
        "socket,inet6,dgram,0", // udp: rule 43 allows
        "socket,inet,stream,0",
        "socket,inet,dgram,0",
    ];
    let gov = bed.run(&bed.gov(), &steps);
    assert_eq!(errnos(&gov), [EACCES, EACCES, 0, 0, 0], "{gov}");
    let sib = bed.run(&bed.sib(), &steps);
    assert_eq!(errnos(&sib), [0; 5], "{sib}");
    assert_eq!(hits(41), 1);
    assert_eq!(hits(42), 1);
    assert_eq!(hits(43), 1);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn scope_default_deny_and_deny_events_name_the_rule() {
    let bed = Bed::new("pd");
    let p = bed.policy(
        "p.toml",
        "default = \"deny\"",
        &[
            rule(51, "allow", "\"create\"", ""),
            rule(
                52,
                "allow",
                "\"connect\"",
                "cidr = \"127.0.0.0/8\"\nports = 7200",
            ),
            rule(
                53,
                "deny",
                "\"connect\"",
                "cidr = \"127.0.0.0/8\"\nports = 7201",
            ),
        ]
        .concat(),
    );
    bed.apply(&p);
    let comm = unique("slpd");
    // The pinned programs emit every verdict; trace filters them by comm.
    let tracer = Tracer::start(&["--events", "policy", "--comm", &comm]);
    let other = bed.run(&bed.gov(), &["connect,tcp4,127.0.0.1,7100"]);
    assert_eq!(errnos(&other), [EACCES]);
    let tb = testbed(&[
        "--comm",
        &comm,
        "--netns",
        &bed.netns.name,
        "--cgroup",
        bed.gov().to_str().unwrap(),
        "connect,tcp4,127.0.0.1,7100",
        "connect,tcp4,127.0.0.1,7201",
        "connect,tcp4,127.0.0.1,7200",
    ]);
    let stopped = tracer.stop();
    stopped.assert_clean();
    // 7200 is allowed by the policy but nobody listens: the kernel refuses.
    assert_eq!(
        errnos(&tb),
        [EACCES, EACCES, libc::ECONNREFUSED as i64],
        "{tb}"
    );
    let mine: Vec<&Value> = stopped.of_pid(tb["pid"].as_u64().unwrap());
    assert_eq!(mine.len(), 2, "{:?}", stopped.events);
    assert_eq!(
        stopped.events.len(),
        2,
        "only --comm {comm}: {:?}",
        stopped.events
    );
    for (e, (port, rule, default)) in mine.iter().zip([(7100, 0, true), (7201, 53, false)]) {
        assert_eq!(e["event"], "policy_deny", "{e}");
        assert_eq!(e["op"], "connect", "{e}");
        assert_eq!(e["port"], port, "{e}");
        assert_eq!(e["addr"], "127.0.0.1", "{e}");
        assert_eq!(e["rule_id"], rule, "{e}");
        assert_eq!(e["default"], default, "{e}");
        assert_eq!(e["errno"], "EACCES", "{e}");
        assert_eq!(e["mode"], "enforce", "{e}");
        assert_eq!(e["comm"], comm.as_str(), "{e}");
        assert_eq!(e["netns"], tb["netns"], "{e}");
        assert_eq!(e["cgroup"], format!("{}/gov", bed.root.rel).as_str(), "{e}");
    }
    let v = show();
    // Two default denials (the filtered-out testbed's and ours) and the
    // creates rule 51 allowed.
    assert_eq!(v["scopes"][0]["default_hits"], 2, "{v}");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn audit_mode_lets_calls_through_and_reports_the_rule() {
    let bed = Bed::new("pa");
    let p = bed.policy(
        "p.toml",
        "mode = \"audit\"",
        &[
            rule(61, "deny", "\"connect\"", "cidr = \"127.0.0.2/32\""),
            rule(62, "deny", "\"create\"", "type = \"raw\""),
            rule(63, "deny", "\"sendmsg\"", "cidr = \"::1/128\""),
        ]
        .concat(),
    );
    bed.apply(&p);
    let tracer = Tracer::start(&["--events", "policy"]);
    let tb = bed.run(
        &bed.gov(),
        &[
            "serve,tcp4,127.0.0.2,7200",
            "connect,tcp4,127.0.0.2,7200",
            "socket,inet,raw,1",
            "sendto,udp6,::1,9",
            "connect,tcp4,127.0.0.1,7200",
        ],
    );
    let stopped = tracer.stop();
    stopped.assert_clean();
    assert_eq!(
        errnos(&tb),
        [0, 0, 0, libc::ECONNREFUSED as i64],
        "audit lets everything through: {tb}"
    );
    let mine = stopped.of_pid(tb["pid"].as_u64().unwrap());
    let got: Vec<(String, u64, String)> = mine
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["rule_id"].as_u64().unwrap(),
                e["op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("policy_audit".to_owned(), 61, "connect".to_owned()),
            ("policy_audit".to_owned(), 62, "create".to_owned()),
            ("policy_audit".to_owned(), 63, "sendmsg".to_owned()),
        ],
        "{mine:?}"
    );
    for e in &mine {
        assert_eq!(e["mode"], "audit", "{e}");
        assert_eq!(e["ret"], 0, "{e}");
    }
    assert_eq!(hits(61), 1);
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn survives_kill_9_of_the_applier_then_remove_restores_and_leaves_nothing() {
    let bed = Bed::new("pq");
    let p = bed.policy(
        "p.toml",
        "",
        &rule(
            71,
            "deny",
            "\"connect\"",
            "cidr = \"127.0.0.2/32\"\nports = 7000",
        ),
    );
    // The applier stays, following events, until it is killed.
    let mut child = Command::new(SOCKLENS)
        .args(["policy", "apply", "--follow", "--json", p.to_str().unwrap()])
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

    let denied = bed.run(
        &bed.gov(),
        &[
            "serve,tcp4,127.0.0.2,7000",
            "connects,tcp4,127.0.0.2,7000,1000",
        ],
    );
    let loop_ = &denied["steps"][1];
    assert_eq!(loop_["n"], 1000);
    assert_eq!(
        loop_["by_errno"],
        serde_json::json!({"13": 1000}),
        "every connect denied after kill -9: {denied}"
    );
    assert_eq!(hits(71), 1000);
    assert!(pin_root().join("policy/links/slp_connect4").exists());

    let (code, out, err) = socklens(&["policy", "remove"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy removed"), "{out}");
    assert!(
        !pin_root().exists(),
        "nothing left pinned under /sys/fs/bpf/socklens"
    );
    assert_no_slp_programs();
    let allowed = bed.run(
        &bed.gov(),
        &[
            "serve,tcp4,127.0.0.2,7000",
            "connects,tcp4,127.0.0.2,7000,100",
        ],
    );
    assert_eq!(
        allowed["steps"][1]["by_errno"],
        serde_json::json!({"0": 100}),
        "restored: {allowed}"
    );
    let (_, out, _) = socklens(&["policy", "show"]);
    assert_eq!(out.trim(), "no policy is applied");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn new_policy_applied_during_a_connect_loop_judges_every_attempt_by_old_or_new() {
    let bed = Bed::new("pw");
    let a = bed.policy(
        "a.toml",
        "",
        &rule(
            81,
            "deny",
            "\"connect\"",
            "cidr = \"127.0.0.2/32\"\nports = 7000",
        ),
    );
    let b = bed.policy(
        "b.toml",
        "",
        &[
            rule(
                82,
                "deny",
                "\"connect\"",
                "cidr = \"127.0.0.0/8\"\nports = \"7000-7001\"",
            ),
            rule(
                83,
                "allow",
                "\"connect\"",
                "cidr = \"127.0.0.2/32\"\nports = 7001",
            ),
        ]
        .concat(),
    );
    bed.apply(&a);
    let tracer = Tracer::start(&["--events", "policy"]);
    let looper = Command::new(TESTBED)
        .args([
            "--netns",
            &bed.netns.name,
            "--cgroup",
            bed.gov().to_str().unwrap(),
            "serve,tcp4,127.0.0.2,7000",
            "connects,tcp4,127.0.0.2,7000,3000,500",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut applies = 0;
    thread::sleep(Duration::from_millis(100));
    for i in 0..8 {
        bed.apply(if i % 2 == 0 { &b } else { &a });
        applies += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let out = looper.wait_with_output().unwrap();
    assert!(out.status.success());
    let tb: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let stopped = tracer.stop();
    stopped.assert_clean();
    let lp = &tb["steps"][1];
    assert_eq!(lp["n"], 3000);
    // The destination has a listener: an attempt judged by no rule set would succeed.
    assert_eq!(lp["by_errno"], serde_json::json!({"13": 3000}), "{tb}");
    let rules: Vec<u64> = stopped
        .of_pid(tb["pid"].as_u64().unwrap())
        .iter()
        .filter(|e| e["event"] == "policy_deny")
        .map(|e| e["rule_id"].as_u64().unwrap())
        .collect();
    assert_eq!(rules.len(), 3000, "one verdict per attempt");
    assert!(rules.iter().all(|r| *r == 81 || *r == 82), "{rules:?}");
    let switches = rules.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches >= 1, "the loop saw the new rule set take over");
    assert!(
        switches <= applies,
        "{switches} switches for {applies} applies"
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn reapply_keeps_links_and_flips_generation_and_down_removes_everything() {
    let bed = Bed::new("pr");
    let a = bed.policy(
        "a.toml",
        "",
        &rule(91, "deny", "\"connect\"", "cidr = \"127.0.0.2\""),
    );
    bed.apply(&a);
    let first = show();
    let (_, out, _) = socklens(&["policy", "apply", a.to_str().unwrap()]);
    assert!(!out.contains("new links"), "{out}");
    let second = show();
    assert_ne!(first["generation"], second["generation"]);
    assert_eq!(first["links"], second["links"]);
    // Every enforcing program but redirect's sock_ops: the file has no [[redirect]].
    let links = second["links"].as_array().unwrap();
    assert_eq!(links.len(), 13, "{second}");
    assert!(
        links.iter().all(|l| l["program"] != "slp_redir_sockops"),
        "{second}"
    );
    assert_eq!(
        second["attach"]["cgroup"],
        bed.root.rel.as_str(),
        "{second}"
    );
    let tb = bed.run(
        &bed.gov(),
        &["serve,tcp4,127.0.0.2,7200", "connect,tcp4,127.0.0.2,7200"],
    );
    assert_eq!(errnos(&tb), [EACCES]);

    let (code, out, err) = socklens(&["down"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("socklens is down"), "{out}");
    assert!(!pin_root().exists());
    assert_no_slp_programs();
    let tb = bed.run(
        &bed.gov(),
        &["serve,tcp4,127.0.0.2,7200", "connect,tcp4,127.0.0.2,7200"],
    );
    assert_eq!(errnos(&tb), [0]);
}
