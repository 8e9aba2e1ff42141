//! The agent's configuration file (TOML). Every error is one line naming the
//! file, the line and the offending value, like the policy file's.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Where the agent looks when `--config` is not given; missing means defaults.
pub const DEFAULT_PATH: &str = "/etc/socklens/agent.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
const DEFAULT_INTERVAL_S: f64 = 1.0;

/// A config that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the problem is the file as a whole (unreadable).
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.msg)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.msg)
        }
    }
}

impl From<ConfigError> for crate::error::Error {
    fn from(e: ConfigError) -> Self {
        Self::Usage(e.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    policy: Option<Spanned<String>>,
    event_log: Option<Spanned<String>>,
    interval: Option<Spanned<f64>>,
    remote_address_label: Option<bool>,
    remote_ports: Option<Spanned<Vec<Spanned<i64>>>>,
    max_conns: Option<Spanned<i64>>,
    cgroup: Option<Spanned<String>>,
    event_log_group: Option<Spanned<String>>,
    tls_server_config: Option<Spanned<RawTls>>,
    basic_auth_users: Option<BTreeMap<String, Spanned<String>>>,
}

/// Prometheus exporters' `tls_server_config`, same keys and meaning.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    client_ca_file: Option<Spanned<String>>,
    client_auth_type: Option<Spanned<String>>,
}

/// Which client certificates the endpoint asks for (exporter-toolkit's
/// `client_auth_type`, Go's tls.ClientAuthType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

/// TLS for the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// TLS and basic auth of the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Web {
    pub tls: Option<Tls>,
    /// User name to bcrypt hash; empty means no authentication.
    pub users: BTreeMap<String, String>,
}

/// Where events go as JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLog {
    Stdout,
    File(PathBuf),
}

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from; None for the built-in defaults.
    pub file: Option<PathBuf>,
    pub listen: SocketAddr,
    /// A policy file to apply (relative paths are relative to the config file).
    pub policy: Option<PathBuf>,
    pub event_log: Option<EventLog>,
    /// How often the connection maps are read into the metrics.
    pub interval: Duration,
    /// Adds `remote_address` to connection metrics (unbounded: off by default).
    pub remote_address_label: bool,
    /// Remote ports shown as themselves; others fall in a range bucket.
    pub remote_ports: Vec<u16>,
    pub max_conns: u32,
    /// Only tasks in this cgroup v2 (path under the root) and below: the
    /// kernel-side filter of `trace --cgroup`. With the line it came from.
    pub cgroup: Option<(String, usize)>,
    /// The event log file is 0600, or 0640 with this group (gid) reading it.
    pub event_log_group: Option<u32>,
    pub web: Web,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            file: None,
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9464))),
            policy: None,
            event_log: None,
            interval: Duration::from_secs_f64(DEFAULT_INTERVAL_S),
            remote_address_label: false,
            remote_ports: Vec::new(),
            max_conns: crate::session::DEFAULT_MAX_CONNS,
            cgroup: None,
            event_log_group: None,
            web: Web::default(),
        }
    }
}

/// Byte offsets to 1-based lines.
struct Src<'a> {
    file: &'a str,
    text: &'a str,
}

impl Src<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(&self, span: Range<usize>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: self.line(span.start),
            msg: msg.into(),
        }
    }
}

/// The config at `path`; `explicit` says the user named it, so a missing
/// file is an error rather than "use the defaults".
pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = match crate::host::trust::read_trusted(path) {
        Ok(t) => t,
        Err(crate::host::trust::Refused::Io(e))
            if !explicit && e.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Config::default());
        }
        Err(crate::host::trust::Refused::Io(e)) => {
            return Err(ConfigError {
                file,
                line: 0,
                msg: format!("cannot read the config: {e}"),
            })
        }
        Err(e) => {
            return Err(ConfigError {
                file,
                line: 0,
                msg: e.to_string(),
            })
        }
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("/"));
    let mut config = parse(&file, &text, dir)?;
    config.file = Some(path.to_owned());
    Ok(config)
}

/// Parses and validates config text; `dir` anchors relative paths.
pub fn parse(file: &str, text: &str, dir: &Path) -> Result<Config, ConfigError> {
    let src = Src { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().lines().next().unwrap_or("invalid TOML");
        src.err(e.span().unwrap_or(0..0), format!("invalid config: {msg}"))
    })?;
    let mut c = Config::default();
    if let Some(l) = &raw.listen {
        c.listen = l.get_ref().parse().map_err(|_| {
            src.err(
                l.span(),
                format!(
                    "listen '{}': not an address:port (e.g. {DEFAULT_LISTEN})",
                    l.get_ref()
                ),
            )
        })?;
    }
    if let Some(p) = &raw.policy {
        c.policy = Some(non_empty_path(&src, p, "policy")?).map(|p| dir.join(p));
    }
    if let Some(l) = &raw.event_log {
        c.event_log = Some(match l.get_ref().as_str() {
            "stdout" | "-" => EventLog::Stdout,
            _ => EventLog::File(dir.join(non_empty_path(&src, l, "event_log")?)),
        });
    }
    if let Some(i) = &raw.interval {
        let v = *i.get_ref();
        if !(v.is_finite() && (0.1..=3600.0).contains(&v)) {
            return Err(src.err(
                i.span(),
                format!("interval {v}: a number of seconds from 0.1 to 3600"),
            ));
        }
        c.interval = Duration::from_secs_f64(v);
    }
    c.remote_address_label = raw.remote_address_label.unwrap_or(false);
    if let Some(ports) = &raw.remote_ports {
        for p in ports.get_ref() {
            let port = u16::try_from(*p.get_ref())
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| {
                    src.err(
                        p.span(),
                        format!("remote_ports: {} is not a port (1-65535)", p.get_ref()),
                    )
                })?;
            c.remote_ports.push(port);
        }
        c.remote_ports.sort_unstable();
        c.remote_ports.dedup();
    }
    if let Some(m) = &raw.max_conns {
        c.max_conns = u32::try_from(*m.get_ref())
            .ok()
            .filter(|v| (1..=16_777_216).contains(v))
            .ok_or_else(|| {
                src.err(
                    m.span(),
                    format!("max_conns {}: from 1 to 16777216", m.get_ref()),
                )
            })?;
    }
    if let Some(g) = &raw.cgroup {
        if g.get_ref().trim().is_empty() {
            return Err(src.err(g.span(), "cgroup '': names no cgroup"));
        }
        c.cgroup = Some((g.get_ref().clone(), src.line(g.span().start)));
    }
    if let Some(g) = &raw.event_log_group {
        let group = nix::unistd::Group::from_name(g.get_ref()).ok().flatten();
        let gid = group.map(|g| g.gid.as_raw()).ok_or_else(|| {
            src.err(
                g.span(),
                format!("event_log_group '{}': no such group", g.get_ref()),
            )
        })?;
        c.event_log_group = Some(gid);
    }
    if let Some(t) = &raw.tls_server_config {
        c.web.tls = Some(tls(&src, t, dir)?);
    }
    for (user, hash) in raw.basic_auth_users.iter().flatten() {
        if user.is_empty() || user.contains(':') {
            return Err(src.err(
                hash.span(),
                format!("basic_auth_users: '{user}' is not a user name (empty or with ':')"),
            ));
        }
        if hash.get_ref().parse::<bcrypt::HashParts>().is_err() {
            return Err(src.err(
                hash.span(),
                format!("basic_auth_users: the password of '{user}' is not a bcrypt hash (htpasswd -nBC 10 USER)"),
            ));
        }
        c.web.users.insert(user.clone(), hash.get_ref().clone());
    }
    Ok(c)
}

fn tls(src: &Src<'_>, t: &Spanned<RawTls>, dir: &Path) -> Result<Tls, ConfigError> {
    let r = t.get_ref();
    let file = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<PathBuf>, ConfigError> {
        v.as_ref()
            .map(|v| non_empty_path(src, v, key).map(|p| dir.join(p)))
            .transpose()
    };
    let missing = |key: &str| src.err(t.span(), format!("tls_server_config: {key} is missing"));
    let cert_file = file(&r.cert_file, "cert_file")?.ok_or_else(|| missing("cert_file"))?;
    let key_file = file(&r.key_file, "key_file")?.ok_or_else(|| missing("key_file"))?;
    let client_ca_file = file(&r.client_ca_file, "client_ca_file")?;
    let client_auth = match r.client_auth_type.as_ref().map(|a| (a.get_ref().as_str(), a.span())) {
        None | Some(("NoClientCert" | "", _)) => ClientAuth::NoClientCert,
        Some(("VerifyClientCertIfGiven", _)) => ClientAuth::VerifyClientCertIfGiven,
        Some(("RequireAndVerifyClientCert", _)) => ClientAuth::RequireAndVerifyClientCert,
        // Accepting any certificate unverified is not authentication.
        Some((other @ ("RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert"), span)) => {
            return Err(src.err(
                span,
                format!("client_auth_type '{other}': client certificates are always verified here (VerifyClientCertIfGiven or RequireAndVerifyClientCert, with client_ca_file)"),
            ))
        }
        Some((other, span)) => {
            return Err(src.err(
                span,
                format!("client_auth_type '{other}': one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
            ))
        }
    };
    match (&client_ca_file, client_auth) {
        (Some(_), ClientAuth::NoClientCert) => Err(src.err(
            t.span(),
            "tls_server_config: client_ca_file is set without a client_auth_type",
        )),
        (None, ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert) => {
            Err(src.err(
                t.span(),
                "tls_server_config: verifying client certificates needs client_ca_file",
            ))
        }
        _ => Ok(Tls {
            cert_file,
            key_file,
            client_ca_file,
            client_auth,
        }),
    }
}

impl Config {
    /// Checks `cgroup` against the cgroup v2 tree (it must exist now).
    pub fn check_cgroup(&self) -> Result<(), ConfigError> {
        let Some((given, line)) = &self.cgroup else {
            return Ok(());
        };
        let err = |msg: String| ConfigError {
            file: self
                .file
                .as_ref()
                .map_or_else(String::new, |f| f.display().to_string()),
            line: *line,
            msg,
        };
        let root = crate::host::system::cgroup2_root()
            .ok_or_else(|| err(format!("cgroup '{given}': cgroup v2 is not mounted")))?;
        crate::host::cgroup::resolve(&root, given)
            .map(|_| ())
            .map_err(|why| err(format!("cgroup '{given}': {why}")))
    }
}

fn non_empty_path(src: &Src<'_>, v: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
    if v.get_ref().trim().is_empty() {
        return Err(src.err(v.span(), format!("{key} '': names no file")));
    }
    Ok(PathBuf::from(v.get_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        parse("a.toml", text, Path::new("/etc/socklens")).expect("valid config")
    }

    fn parse_err(text: &str) -> String {
        parse("a.toml", text, Path::new("/etc/socklens"))
            .expect_err("invalid config")
            .to_string()
    }

    #[test]
    fn empty_file_means_loopback_defaults() {
        let c = parse_ok("");
        assert_eq!(c.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.interval, Duration::from_secs(1));
        assert!(c.policy.is_none() && c.event_log.is_none());
        assert!(!c.remote_address_label);
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let c = parse_ok("policy = \"p.toml\"\nevent_log = \"/var/log/e.jsonl\"\n");
        assert_eq!(c.policy, Some(PathBuf::from("/etc/socklens/p.toml")));
        assert_eq!(
            c.event_log,
            Some(EventLog::File(PathBuf::from("/var/log/e.jsonl")))
        );
        assert_eq!(
            parse_ok("event_log = \"stdout\"").event_log,
            Some(EventLog::Stdout)
        );
    }

    #[test]
    fn errors_name_file_line_and_value() {
        assert!(
            parse_err("interval = 2.0\nlisten_on = \"x\"\n").starts_with("a.toml:2: "),
            "unknown key"
        );
        let e = parse_err("\n\nlisten = \"127.0.0.1:99999\"\n");
        assert!(e.starts_with("a.toml:3: listen '127.0.0.1:99999'"), "{e}");
        let e = parse_err("remote_ports = [443,\n 70000]\n");
        assert!(e.starts_with("a.toml:2: remote_ports: 70000"), "{e}");
        let e = parse_err("interval = 0.01\n");
        assert!(e.starts_with("a.toml:1: interval 0.01"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn missing_default_file_is_defaults_but_a_named_one_is_an_error() {
        let p = Path::new("/nonexistent/socklens-agent.toml");
        assert_eq!(
            load(p, false).map(|c| c.listen),
            Ok(Config::default().listen)
        );
        let e = load(p, true)
            .expect_err("named file must exist")
            .to_string();
        assert!(
            e.starts_with("/nonexistent/socklens-agent.toml: cannot read"),
            "{e}"
        );
    }
}
