//! `socklens policy check` and `apply` on bad files: each of tests/bad-policies
//! fails with one line naming FILE:LINE and the offending value, exit 2, and
//! leaves the policy in force exactly as it was. Root only (the files name
//! cgroups this test creates: @ROOT@ stands for the test's cgroup).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

struct Case {
    name: String,
    text: String,
    line: usize,
    needle: String,
}

fn corpus(root: &str) -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-policies");
    let mut cases: Vec<Case> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap().replace("@ROOT@", root);
            let first = text.lines().next().unwrap_or("");
            let spec = first.strip_prefix("# expect: ").unwrap_or_else(|| {
                panic!(
                    "{}: first line must be '# expect: LINE NEEDLE'",
                    p.display()
                )
            });
            let (line, needle) = spec.split_once(' ').unwrap();
            Case {
                name: p.file_name().unwrap().to_string_lossy().into_owned(),
                line: line.parse().unwrap(),
                needle: needle.to_owned(),
                text,
            }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

struct Bed {
    cg: Cgroup,
    dir: PathBuf,
}

impl Bed {
    fn new(tag: &str) -> Self {
        require_root();
        let cg = Cgroup::new(tag);
        for c in ["gov", "sib"] {
            fs::create_dir(cg.path.join(c)).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("slp-bad-{}", unique(tag)));
        fs::create_dir_all(&dir).unwrap();
        Self { cg, dir }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::process::Command::new(SOCKLENS)
            .args(["policy", "remove"])
            .output();
        for c in ["gov", "sib"] {
            let _ = fs::remove_dir(self.cg.path.join(c));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn assert_rejected(cmd: &str, path: &Path, line: usize, needle: &str) {
    let p = path.to_str().unwrap();
    let (code, out, err) = socklens(&["policy", cmd, p]);
    assert_eq!(code, 2, "{cmd} {p}: exit code; stderr {err}");
    assert_eq!(err.lines().count(), 1, "{cmd} {p}: one line: {err:?}");
    let prefix = format!("socklens: {p}:{line}: ");
    assert!(
        err.starts_with(&prefix),
        "{cmd} {p}: want {prefix:?}, got {err:?}"
    );
    assert!(
        err.contains(needle),
        "{cmd} {p}: {err:?} should contain {needle:?}"
    );
    assert!(out.is_empty(), "{cmd} {p}: printed {out:?}");
}

fn show() -> String {
    let (code, out, err) = socklens(&["policy", "show", "--json"]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn every_bad_file_fails_check_and_apply_and_leaves_the_policy_in_force() {
    let bed = Bed::new("bad");
    let cases = corpus(&bed.cg.rel);
    assert!(cases.len() >= 20, "corpus has {} files", cases.len());
    // A good policy in force first.
    let good = bed.dir.join("good.toml");
    fs::write(
        &good,
        format!(
            "attach = \"{r}\"\n[[scope]]\ncgroup = \"{r}/gov\"\n[[scope.rule]]\nid = 1\naction = \"deny\"\non = [\"connect\"]\ncidr = \"127.0.0.2\"\n[[service]]\naddress = \"198.51.100.7:80\"\nbackends = [{{ address = \"127.0.0.4:8080\", weight = 2 }}]\n",
            r = bed.cg.rel
        ),
    )
    .unwrap();
    let (code, _, err) = socklens(&["policy", "apply", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let before = show();
    assert!(before.contains("198.51.100.7:80"), "{before}");
    for case in &cases {
        let path = bed.dir.join(&case.name);
        fs::write(&path, &case.text).unwrap();
        assert_rejected("check", &path, case.line, &case.needle);
        assert_rejected("apply", &path, case.line, &case.needle);
        assert_eq!(show(), before, "{}: the policy in force changed", case.name);
    }
}

/// A policy file others may write, or another user owns, is refused by
/// check and apply: one line naming it and its mode, exit 2.
#[test]
#[ignore = "needs root: ./test.sh"]
fn policy_files_writable_by_others_or_owned_by_another_user_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let bed = Bed::new("mode");
    let path = bed.dir.join("p.toml");
    fs::write(
        &path,
        format!(
            "attach = \"{r}\"\n[[scope]]\ncgroup = \"{r}/gov\"\n",
            r = bed.cg.rel
        ),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let refused = |want: &str| {
        for cmd in ["check", "apply"] {
            let (code, out, err) = socklens(&["policy", cmd, p]);
            assert_eq!(code, 2, "{cmd}: {err}");
            assert_eq!(err.lines().count(), 1, "{cmd}: {err}");
            assert!(
                err.starts_with(&format!("socklens: {p}: {want}")),
                "{cmd}: {err}"
            );
            assert!(out.is_empty());
        }
    };
    for mode in [0o664, 0o606] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        refused(&format!("writable by group or others (mode 0{mode:o})"));
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    refused("owned by uid 65534");
    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    let (code, _, err) = socklens(&["policy", "check", p]);
    assert_eq!(code, 0, "{err}");
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn more_rules_than_the_maps_hold() {
    let bed = Bed::new("big");
    let mut text = format!(
        "attach = \"{r}\"\n[[scope]]\ncgroup = \"{r}/gov\"\n",
        r = bed.cg.rel
    );
    let max = 16384;
    let mut line_of_last = 0;
    let mut lines = text.lines().count();
    for i in 1..=max + 1 {
        line_of_last = lines + 2;
        lines += 5;
        text.push_str(&format!(
            "[[scope.rule]]\nid = {i}\naction = \"deny\"\non = [\"connect\"]\ncidr = \"10.{}.{}.0/24\"\n",
            i / 256,
            i % 256
        ));
    }
    let path = bed.dir.join("big.toml");
    fs::write(&path, text).unwrap();
    assert_rejected(
        "check",
        &path,
        line_of_last,
        "rule 16385: more rules than the maps hold (16384)",
    );
}

#[test]
#[ignore = "needs root: ./test.sh"]
fn check_accepts_a_good_file_without_applying_it() {
    let bed = Bed::new("ok");
    let (code, _, err) = socklens(&["policy", "remove"]);
    assert_eq!(code, 0, "{err}");
    let path = bed.dir.join("ok.toml");
    fs::write(
        &path,
        format!(
            "attach = \"{r}\"\n[[scope]]\ncgroup = \"{r}/*\"\nmode = \"audit\"\n[[scope.rule]]\nid = 3\naction = \"deny\"\non = [\"create\"]\ntype = \"raw\"\n",
            r = bed.cg.rel
        ),
    )
    .unwrap();
    let (code, out, err) = socklens(&["policy", "check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok: 1 scopes, 1 rules, 2 cgroups governed"),
        "{out}"
    );
    assert!(!pin_root().join("policy").exists(), "check applied nothing");
}

/// `[[service]]` entries past a capacity: the one that does not fit is named.
fn too_many(tag: &str, services: usize, backends: usize) -> (PathBuf, usize, Bed) {
    let bed = Bed::new(tag);
    let mut text = format!("attach = \"{}\"\n", bed.cg.rel);
    let mut line_of_last = 0;
    for i in 0..services {
        line_of_last = text.lines().count() + 2;
        text.push_str(&format!(
            "[[service]]\naddress = \"198.51.{}.{}:80\"\n",
            i / 256,
            i % 256
        ));
        if backends > 0 {
            let list: Vec<String> = (0..backends)
                .map(|b| format!("{{ address = \"127.0.{}.{}:80\" }}", b / 256, b % 256))
                .collect();
            text.push_str(&format!("backends = [{}]\n", list.join(", ")));
        }
    }
    let path = bed.dir.join(format!("{tag}.toml"));
    fs::write(&path, text).unwrap();
    (path, line_of_last, bed)
}

#[test]
fn more_services_than_the_maps_hold() {
    let (path, line, _bed) = too_many("svcs", 16385, 0);
    assert_rejected(
        "check",
        &path,
        line,
        "service 16385: more services than the maps hold (16384)",
    );
}

#[test]
fn more_backends_than_the_maps_hold() {
    // 17 services of 4096 backends: the 17th passes 65536.
    let (path, line, _bed) = too_many("backends", 17, 4096);
    assert_rejected(
        "check",
        &path,
        line,
        "more backends in the file than the maps hold (65536)",
    );
}
