//! The command line: bad input, privileges, doctor, forced attach tiers.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;

/// One line on stderr, naming `needle`, and the given exit code.
fn assert_one_line_error(args: &[&str], code: i32, needle: &str) {
    let (got, stdout, stderr) = socklens(args);
    assert_eq!(got, code, "exit code of {args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line for {args:?}: {stderr:?}"
    );
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} should name {needle:?}"
    );
    assert!(stdout.is_empty(), "{args:?} printed {stdout:?}");
}

#[test]
fn unknown_event_name() {
    assert_one_line_error(&["trace", "--events", "bind,frobnicate"], 2, "frobnicate");
}

#[test]
fn bad_pid() {
    assert_one_line_error(&["trace", "--pid", "abc"], 2, "abc");
    assert_one_line_error(&["trace", "--pid", "0"], 2, "0");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn nonexistent_pid() {
    require_root();
    assert_one_line_error(&["trace", "--pid", "2147483000"], 2, "no such process");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn nonexistent_cgroup() {
    require_root();
    assert_one_line_error(
        &["trace", "--cgroup", "no/such/cgroup-xyz"],
        2,
        "no/such/cgroup-xyz",
    );
}

/// Paths that leave the cgroup v2 root, or name something in it that is not
/// a cgroup, are refused before anything is loaded.
#[test]
#[ignore = "needs root: ./test.sh"]
fn cgroup_outside_the_root_or_not_a_cgroup_is_refused() {
    require_root();
    let root = cgroup2_root();
    let outside = format!("{}/../../..", root.display());
    for given in ["../../../", "a/../../..", outside.as_str(), "/../etc"] {
        assert_one_line_error(
            &["trace", "--cgroup", given],
            2,
            &format!("--cgroup '{given}': outside the cgroup v2 root"),
        );
    }
    assert_one_line_error(&["trace", "--cgroup", "cgroup.procs"], 2, "is not a cgroup");
}

#[test]
fn comm_too_long() {
    assert_one_line_error(
        &["trace", "--comm", "a-name-longer-than-15"],
        2,
        "a-name-longer-than-15",
    );
}

#[test]
fn unknown_attach_tier() {
    assert_one_line_error(&["trace", "--attach", "uprobe"], 2, "uprobe");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn missing_btf_is_one_line() {
    require_root();
    assert_one_line_error(
        &["trace", "--btf", "/nonexistent/vmlinux"],
        1,
        "no kernel BTF at /nonexistent/vmlinux",
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn not_root_is_one_line() {
    require_root();
    let out = Command::new(SOCKLENS)
        .args(["trace"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("must run as root"), "{stderr}");
}

#[test]
fn help_works() {
    let (code, out, _) = socklens(&["trace", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--events"));
}

#[test]
fn every_command_help_shows_examples() {
    let commands: [&[&str]; 11] = [
        &["trace"],
        &["conns"],
        &["top"],
        &["doctor"],
        &["policy"],
        &["policy", "check"],
        &["policy", "apply"],
        &["policy", "show"],
        &["policy", "remove"],
        &["down"],
        &["agent"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (code, out, _) = socklens(&args);
        assert_eq!(code, 0, "{args:?}");
        let prefix = format!("  socklens {}", cmd.join(" "));
        let examples = out.lines().filter(|l| l.starts_with(&prefix)).count();
        assert!(
            out.contains("Example") && (1..=2).contains(&examples),
            "{args:?}: one or two examples of `{prefix}`:\n{out}"
        );
    }
}

/// doctor's hook section: (hook, chosen tier, rejected tiers).
fn doctor_hooks(text: &str) -> Vec<(String, String, Vec<String>)> {
    let mut hooks: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in text.lines().skip_while(|l| *l != "hooks:").skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["rejected", tier, ..] => hooks
                .last_mut()
                .unwrap()
                .2
                .push(tier.trim_end_matches(':').to_owned()),
            [hook, tier, ..] => hooks.push(((*hook).to_owned(), (*tier).to_owned(), Vec::new())),
            _ => {}
        }
    }
    hooks
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn doctor_reports_tier_per_hook_and_why_better_ones_lost() {
    require_root();
    let (code, out, err) = socklens(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    for key in [
        "kernel",
        "BTF",
        "ring buffer",
        "tracefs",
        "bpffs",
        "cgroup v2",
        "kprobes",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(key)),
            "doctor lacks {key}: {out}"
        );
    }
    // TCP bytes come from the sequence counters on every tier.
    assert!(
        out.contains("tcp bytes    from the sockets' sequence counters"),
        "{out}"
    );
    let hooks = doctor_hooks(&out);
    let names: Vec<&str> = hooks.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "bind",
            "listen",
            "state",
            "accept",
            "send",
            "recv",
            "sendfile",
            "retransmit"
        ],
        "{out}"
    );
    let order = ["fentry", "kprobe", "tracepoint"];
    for (hook, tier, rejected) in &hooks {
        let pos = order
            .iter()
            .position(|t| t == tier)
            .unwrap_or_else(|| panic!("{hook}: {tier}"));
        assert_eq!(
            rejected,
            &order[..pos],
            "{hook}: every better tier has a reason: {out}"
        );
        if let Ok(expect) = std::env::var("SOCKLENS_EXPECT_TIER") {
            if !expect.is_empty() {
                assert_eq!(tier, &expect, "{out}");
            }
        }
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn forced_tier_the_kernel_lacks_fails_with_the_reason() {
    require_root();
    let (_, doctor, _) = socklens(&["doctor"]);
    let hooks = doctor_hooks(&doctor);
    let lacking: Vec<&String> = hooks.iter().flat_map(|h| &h.2).collect();
    for tier in ["fentry", "kprobe", "tracepoint"] {
        if lacking.iter().any(|t| *t == tier) {
            let (code, _, err) = socklens(&["trace", "--attach", tier, "--pid", "1", "--json"]);
            assert_eq!(code, 1, "{tier}: {err}");
            assert_eq!(err.lines().count(), 1, "{err:?}");
            assert!(
                err.contains(&format!("forced attach method {tier} is not available")),
                "{err}"
            );
            assert!(
                err.contains("bind: ") || err.contains("listen: "),
                "names the hook: {err}"
            );
        }
    }
    if std::env::var("SOCKLENS_EXPECT_TIER").as_deref() == Ok("tracepoint") {
        assert_eq!(
            lacking.len(),
            16,
            "fentry and kprobe rejected for all 8 hooks: {doctor}"
        );
    }
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn forced_tier_the_kernel_has_is_used() {
    require_root();
    let (_, doctor, _) = socklens(&["doctor"]);
    for (hook, tier, _) in doctor_hooks(&doctor) {
        let (code, out, err) = socklens(&["doctor", "--attach", &tier]);
        assert_eq!(code, 0, "{err}");
        let forced = doctor_hooks(&out);
        let h = forced.iter().find(|h| h.0 == hook).unwrap();
        assert_eq!(h.1, tier, "{out}");
        assert!(h.2.is_empty(), "a forced tier lists no rejections: {out}");
    }
}

/// `doctor --attach tracepoint` with some capabilities turned off.
fn doctor_tracepoint_lines(disable: &str) -> String {
    let out = Command::new(SOCKLENS)
        .args(["doctor", "--attach", "tracepoint"])
        .env("SOCKLENS_DISABLE", disable)
        .output()
        .expect("spawn socklens");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn hook_line<'a>(doctor: &'a str, hook: &str) -> &'a str {
    doctor
        .lines()
        .find(|l| l.split_whitespace().next() == Some(hook))
        .unwrap_or_else(|| panic!("no {hook} line: {doctor}"))
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn tracepoint_tier_uses_syscall_exits_only_without_the_socket_tracepoints() {
    require_root();
    let has = |cat: &str, name: &str| {
        let tracefs = std::path::Path::new("/sys/kernel/tracing/events");
        tracefs.join(cat).join(name).join("id").exists()
    };
    let full = doctor_tracepoint_lines("");
    let modern = has("sock", "sock_send_length") && has("sock", "sock_recv_length");
    for hook in ["send", "recv"] {
        let line = hook_line(&full, hook);
        assert_eq!(
            line.contains("syscall tracepoints"),
            !modern,
            "sock_*_length present: {modern}: {line}"
        );
    }
    // What a kernel before 6.3 offers: the syscall exits, same tier.
    let old = doctor_tracepoint_lines("sock_send_length,sock_recv_length");
    for hook in ["send", "recv"] {
        let line = hook_line(&old, hook);
        assert!(line.contains("tracepoint (syscall tracepoints)"), "{line}");
    }
    let no_cgroup = doctor_tracepoint_lines("cgroup");
    assert!(hook_line(&no_cgroup, "send").contains("syscall tracepoints"));
}
