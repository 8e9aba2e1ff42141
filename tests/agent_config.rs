//! `socklens agent` refuses bad configs before touching the system: one line
//! naming file:line and the offending value, exit 2, nothing pinned.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
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

/// The files the agent trusts (its config, the policy it names, TLS key,
/// certificate and client CA) are refused when group or others may write
/// them, or when another non-root user owns them: one line naming the file
/// and its mode, exit 2.
#[test]
#[ignore = "needs root: ./test.sh"]
fn trusted_files_writable_by_others_or_owned_by_another_user_are_refused() {
    require_root();
    let d = dir("trust");
    let config = d.join("agent.toml");
    let refused = |want: &str| {
        let (code, _, err) = socklens(&["agent", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        assert_one_line(&err, want);
    };
    fs::write(&config, "interval = 1.0\n").unwrap();
    for mode in [0o664, 0o646, 0o666] {
        fs::set_permissions(&config, fs::Permissions::from_mode(mode)).unwrap();
        refused(&format!(
            "{}: writable by group or others (mode 0{mode:o})",
            config.display()
        ));
    }
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    nix::unistd::chown(&config, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    refused(&format!("{}: owned by uid 65534", config.display()));
    nix::unistd::chown(&config, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();

    // Each file the config names, in turn writable by its group.
    make_certs(&d.0);
    fs::write(d.join("policy.toml"), "").unwrap();
    fs::write(
        &config,
        "policy = \"policy.toml\"\n[tls_server_config]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\nclient_ca_file = \"ca.pem\"\nclient_auth_type = \"RequireAndVerifyClientCert\"\n",
    )
    .unwrap();
    for f in ["policy.toml", "cert.pem", "key.pem", "ca.pem"] {
        let path = d.join(f);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).unwrap();
        let (code, _, err) = socklens(&["agent", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 2, "{f}: {err}");
        assert_eq!(err.lines().count(), 1, "{f}: {err}");
        assert!(
            err.contains(&format!(
                "{}: writable by group or others (mode 0620)",
                path.display()
            )),
            "{f}: {err}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn web_config_errors_name_file_line_and_value() {
    for (text, want) in [
        ("[tls_server_config]\ncert_file = \"c.pem\"\n", ":1: tls_server_config: key_file is missing"),
        (
            "[tls_server_config]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_auth_type = \"Maybe\"\n",
            ":4: client_auth_type 'Maybe'",
        ),
        (
            "[tls_server_config]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"\n",
            ":1: tls_server_config: client_ca_file is set without a client_auth_type",
        ),
        (
            "[basic_auth_users]\nprom = \"secret\"\n",
            ":2: basic_auth_users: the password of 'prom' is not a bcrypt hash",
        ),
    ] {
        let (code, err, path) = agent_with("web", text);
        assert_eq!(code, 2, "{err}");
        assert_one_line(&err, &format!("{}{want}", path.display()));
    }
}
