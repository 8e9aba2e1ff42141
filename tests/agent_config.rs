//! `socklens agent` refuses bad configs before touching the system: one line
//! naming file:line and the offending value, exit 2, nothing pinned.

mod common;

use std::fs;
use std::path::PathBuf;

use common::*;

/// A temp directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("slagent-cfg-{tag}-{}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// Runs the agent with `text` as its config: (exit code, stderr, config path).
fn agent_with(tag: &str, text: &str) -> (i32, String, PathBuf) {
    let d = dir(tag);
    let path = d.join("agent.toml");
    fs::write(&path, text).unwrap();
    let (code, _, err) = socklens(&["agent", "--config", path.to_str().unwrap()]);
    (code, err, path)
}

fn assert_one_line(err: &str, want_start: &str) {
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!("socklens: {want_start}")),
        "{want_start} in {err}"
    );
}

#[test]
fn unknown_key_names_file_and_line() {
    let (code, err, path) = agent_with("key", "interval = 1.0\nlisten_adress = \"127.0.0.1:1\"\n");
    assert_eq!(code, 2, "{err}");
    assert_one_line(
        &err,
        &format!(
            "{}:2: invalid config: unknown field `listen_adress`",
            path.display()
        ),
    );
}

#[test]
fn bad_listen_address_names_file_line_and_value() {
    let (code, err, path) = agent_with("addr", "\nlisten = \"localhost:9464\"\n");
    assert_eq!(code, 2, "{err}");
    assert_one_line(
        &err,
        &format!("{}:2: listen 'localhost:9464'", path.display()),
    );
    let (code, err, path) = agent_with("port", "listen = \"127.0.0.1:65536\"\n");
    assert_eq!(code, 2, "{err}");
    assert_one_line(
        &err,
        &format!("{}:1: listen '127.0.0.1:65536'", path.display()),
    );
}

#[test]
fn missing_cgroup_names_file_line_and_value() {
    let (code, err, path) = agent_with(
        "cg",
        "interval = 1.0\ncgroup = \"/slagent-no-such-cgroup\"\n",
    );
    assert_eq!(code, 2, "{err}");
    assert_one_line(
        &err,
        &format!(
            "{}:2: cgroup '/slagent-no-such-cgroup': no such cgroup",
            path.display()
        ),
    );
}

#[test]
fn unreadable_config_is_one_line_exit_2() {
    let gone = dir("missing");
    let missing = gone.join("nope.toml");
    let (code, _, err) = socklens(&["agent", "--config", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_one_line(
        &err,
        &format!("{}: cannot read the config", missing.display()),
    );
    // A directory cannot be read as a file either.
    let d = dir("isdir");
    let (code, _, err) = socklens(&["agent", "--config", d.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_one_line(&err, &format!("{}: cannot read the config", d.0.display()));
}

#[test]
fn bad_policy_named_by_the_config_is_refused_before_anything_is_applied() {
    let d = dir("policy");
    fs::write(
        d.join("p.toml"),
        "[[scope]]\ncgroup = \"/\"\nmode = \"loud\"\n",
    )
    .unwrap();
    let (code, err, _) = agent_with(
        "policy",
        &format!("policy = \"{}\"\n", d.join("p.toml").display()),
    );
    assert_eq!(code, 2, "{err}");
    assert_one_line(&err, &format!("{}:3: ", d.join("p.toml").display()));
}
