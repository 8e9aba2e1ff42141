//! The policy file: TOML text to a validated [`Policy`], checked whole before
//! anything is applied. Every error is one line: `FILE:LINE: message` naming the
//! offending value.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::policy::accelerate::{self, Accelerate, RawAccelerate};
use crate::policy::redirect::{self, RawRedirect, Redirect};
use crate::policy::services::{self, RawService, Service};
use crate::skel::policy::types::slp_limit;

use crate::policy::addr::{cidr, ports};
pub use crate::policy::addr::{mask, Cidr};
use crate::policy::source::{
    deepest_owner, is_under, leaves_root, match_target, normalize, value_text, Src,
};
pub use crate::policy::source::{CgroupDir, CgroupTree, PolicyError};

// ---- the file as written -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    attach: Option<Spanned<String>>,
    #[serde(default)]
    scope: Vec<Spanned<RawScope>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    redirect: Vec<Spanned<RawRedirect>>,
    #[serde(default)]
    accelerate: Vec<Spanned<RawAccelerate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<toml::Value>,
    action: Spanned<String>,
    on: Spanned<Vec<Spanned<String>>>,
    cidr: Option<Spanned<String>>,
    ports: Option<Spanned<toml::Value>>,
    proto: Option<Spanned<toml::Value>>,
    family: Option<Spanned<String>>,
    #[serde(rename = "type")]
    sock_type: Option<Spanned<String>>,
}

// ---- the validated policy ------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// What a rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Create,
    Bind,
    Connect,
    Sendmsg,
}

impl Op {
    pub const ALL: [Self; 4] = [Self::Create, Self::Bind, Self::Connect, Self::Sendmsg];

    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Bind => "bind",
            Self::Connect => "connect",
            Self::Sendmsg => "sendmsg",
        }
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// bind (local address), connect and sendmsg (destination).
    Addr {
        /// None: any address of either family.
        net: Option<Cidr>,
        ports: (u16, u16),
        /// 0 = any, else IPPROTO_TCP or IPPROTO_UDP.
        proto: u8,
    },
    /// socket creation; 0 / 0 / None = any.
    Create {
        family: u16,
        sock_type: u8,
        proto: Option<u16>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: u32,
    pub line: usize,
    pub action: Action,
    pub ops: Vec<Op>,
    pub target: Target,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The cgroup pattern or unit name as written.
    pub name: String,
    pub line: usize,
    pub mode: Mode,
    pub default: Action,
    /// The cgroups the pattern matched.
    pub matched: Vec<CgroupDir>,
    /// Every cgroup this scope governs now: matched ones and their descendants
    /// that no deeper scope matched.
    pub governs: Vec<u64>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub file: String,
    pub attach: CgroupDir,
    pub scopes: Vec<Scope>,
    pub services: Vec<Service>,
    pub redirects: Vec<Redirect>,
    pub accelerate: Vec<Accelerate>,
}

impl Policy {
    pub fn rule_count(&self) -> usize {
        self.scopes.iter().map(|s| s.rules.len()).sum()
    }
}

/// Reads and validates a policy file against the cgroup tree under `cgroup_root`.
pub fn load(path: &Path, cgroup_root: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let text = crate::host::trust::read_trusted(path).map_err(|e| PolicyError {
        file: file.clone(),
        line: 0,
        msg: match e {
            crate::host::trust::Refused::Io(e) => format!("cannot read the policy: {e}"),
            e => e.to_string(),
        },
    })?;
    parse(&file, &text, &CgroupTree::scan(cgroup_root))
}

/// Parses and validates policy text; `file` names it in errors. The capacity
/// of the compiled tables is `compile::check_capacity`'s (`policy::load`).
pub fn parse(file: &str, text: &str, tree: &CgroupTree) -> Result<Policy, PolicyError> {
    let src = Src::new(file, text);
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let msg = e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_owned();
        let line = e.span().map_or(1, |s| src.line(s.start));
        PolicyError {
            file: file.to_owned(),
            line,
            msg: format!("invalid policy: {msg}"),
        }
    })?;

    let attach = match &raw.attach {
        None => tree
            .get("/")
            .ok_or_else(|| src.err(0..0, "the cgroup v2 root is not readable"))?,
        Some(a) => {
            if a.get_ref().contains('*') || leaves_root(a.get_ref()) {
                return Err(src.err(
                    a.span(),
                    format!(
                        "attach '{}': must name one cgroup under the cgroup v2 root, without '*', '.' or '..'",
                        a.get_ref()
                    ),
                ));
            }
            tree.get(&normalize(a.get_ref())).ok_or_else(|| {
                src.err(
                    a.span(),
                    format!("attach '{}': no such cgroup", a.get_ref()),
                )
            })?
        }
    };

    let max_scopes = slp_limit::SLP_MAX_SCOPES.0 as usize;
    if raw.scope.len() > max_scopes {
        let extra = &raw.scope[max_scopes];
        return Err(src.err(
            extra.span(),
            format!(
                "scope {}: more scopes than the maps hold ({max_scopes})",
                max_scopes + 1
            ),
        ));
    }

    let mut ids: HashMap<u32, usize> = HashMap::new();
    let mut matched_by: HashMap<String, usize> = HashMap::new();
    let mut scopes = Vec::new();
    for (index, raw_scope) in raw.scope.iter().enumerate() {
        let scope = scope(&src, tree, &attach, raw_scope, &mut ids)?;
        for m in &scope.matched {
            if let Some(&other) = matched_by.get(&m.rel) {
                return Err(src.err(
                    scope_span(raw_scope),
                    format!(
                        "scope '{}': cgroup {} is already governed by scope '{}' (line {})",
                        scope.name,
                        m.rel,
                        scopes_name(&scopes, other),
                        scopes_line(&scopes, other)
                    ),
                ));
            }
            matched_by.insert(m.rel.clone(), index);
        }
        scopes.push(scope);
    }

    let max_rules = slp_limit::SLP_MAX_RULES.0 as usize;
    let total: usize = scopes.iter().map(|s: &Scope| s.rules.len()).sum();
    if total > max_rules {
        let rule = scopes
            .iter()
            .flat_map(|s| &s.rules)
            .nth(max_rules)
            .map_or(0, |r| r.line);
        return Err(PolicyError {
            file: file.to_owned(),
            line: rule,
            msg: format!(
                "rule {}: more rules than the maps hold ({max_rules})",
                max_rules + 1
            ),
        });
    }

    // Every cgroup under the attach point goes to the deepest scope that matched
    // it or an ancestor.
    let mut governed = 0usize;
    for (s, id) in deepest_owner(tree, &attach.rel, &matched_by) {
        scopes[s].governs.push(id);
        governed += 1;
    }
    let max_cgroups = slp_limit::SLP_MAX_CGROUPS.0 as usize;
    if governed > max_cgroups {
        return Err(PolicyError {
            file: file.to_owned(),
            line: 0,
            msg: format!(
                "the scopes cover {governed} cgroups, more than the maps hold ({max_cgroups})"
            ),
        });
    }
    let services = services::parse(&src, tree, &attach, &raw.service)?;
    let redirects = redirect::parse(&src, tree, &attach, &raw.redirect)?;
    let accelerate = accelerate::parse(&src, tree, &raw.accelerate)?;
    Ok(Policy {
        file: file.to_owned(),
        attach,
        scopes,
        services,
        redirects,
        accelerate,
    })
}

fn scopes_name(scopes: &[Scope], i: usize) -> &str {
    scopes.get(i).map_or("?", |s| s.name.as_str())
}

fn scopes_line(scopes: &[Scope], i: usize) -> usize {
    scopes.get(i).map_or(0, |s| s.line)
}

fn scope_span(raw: &Spanned<RawScope>) -> Range<usize> {
    let r = raw.get_ref();
    r.cgroup
        .as_ref()
        .or(r.unit.as_ref())
        .map_or_else(|| raw.span(), Spanned::span)
}

fn scope(
    src: &Src<'_>,
    tree: &CgroupTree,
    attach: &CgroupDir,
    raw: &Spanned<RawScope>,
    ids: &mut HashMap<u32, usize>,
) -> Result<Scope, PolicyError> {
    let r = raw.get_ref();
    let (name, span, matched) = match_target(src, tree, "scope", raw.span(), &r.cgroup, &r.unit)?;
    if let Some(out) = matched.iter().find(|m| !is_under(&m.rel, &attach.rel)) {
        return Err(src.err(
            span.clone(),
            format!(
                "scope '{name}': cgroup {} is outside the attach point {}",
                out.rel, attach.rel
            ),
        ));
    }
    if name.len() >= slp_limit::SLP_NAME_LEN.0 as usize {
        return Err(src.err(
            span.clone(),
            format!(
                "scope '{name}': longer than {} bytes",
                slp_limit::SLP_NAME_LEN.0 - 1
            ),
        ));
    }
    let mode = match &r.mode {
        None => Mode::Enforce,
        Some(m) => match m.get_ref().as_str() {
            "enforce" => Mode::Enforce,
            "audit" => Mode::Audit,
            other => {
                return Err(src.err(
                    m.span(),
                    format!("mode '{other}': expected enforce or audit"),
                ))
            }
        },
    };
    let default = match &r.default {
        None => Action::Allow,
        Some(d) => action(src, d, "default")?,
    };
    let rules = r
        .rule
        .iter()
        .map(|raw_rule| rule(src, raw_rule, ids))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Scope {
        name,
        line: src.line(span.start),
        mode,
        default,
        matched,
        governs: Vec::new(),
        rules,
    })
}

fn action(src: &Src<'_>, v: &Spanned<String>, key: &str) -> Result<Action, PolicyError> {
    match v.get_ref().as_str() {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(src.err(v.span(), format!("{key} '{other}': expected allow or deny"))),
    }
}

fn rule(
    src: &Src<'_>,
    raw: &Spanned<RawRule>,
    ids: &mut HashMap<u32, usize>,
) -> Result<Rule, PolicyError> {
    let r = raw.get_ref();
    let id = match r.id.get_ref() {
        toml::Value::Integer(n) if (1..=i64::from(u32::MAX)).contains(n) => *n as u32,
        other => {
            return Err(src.err(
                r.id.span(),
                format!(
                    "id {}: a rule id is an integer from 1 to {}",
                    value_text(other),
                    u32::MAX
                ),
            ))
        }
    };
    let line = src.line(r.id.span().start);
    if let Some(first) = ids.insert(id, line) {
        return Err(src.err(
            r.id.span(),
            format!("id {id}: duplicate rule id (first used on line {first})"),
        ));
    }
    let action = action(src, &r.action, "action")?;
    let mut ops = Vec::new();
    for op in r.on.get_ref() {
        let o = match op.get_ref().as_str() {
            "create" => Op::Create,
            "bind" => Op::Bind,
            "connect" => Op::Connect,
            "sendmsg" => Op::Sendmsg,
            other => {
                return Err(src.err(
                    op.span(),
                    format!("rule {id}: on '{other}': expected create, bind, connect or sendmsg"),
                ))
            }
        };
        if !ops.contains(&o) {
            ops.push(o);
        }
    }
    if ops.is_empty() {
        return Err(src.err(r.on.span(), format!("rule {id}: on []: names no operation")));
    }
    ops.sort();
    let create = ops.contains(&Op::Create);
    if create && ops.len() > 1 {
        return Err(src.err(
            r.on.span(),
            format!("rule {id}: on: create cannot share a rule with bind, connect or sendmsg"),
        ));
    }
    let target = if create {
        for (key, span) in [
            ("cidr", r.cidr.as_ref().map(Spanned::span)),
            ("ports", r.ports.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                return Err(src.err(
                    span,
                    format!(
                        "rule {id}: {key} does not apply to create rules (family, type, proto)"
                    ),
                ));
            }
        }
        Target::Create {
            family: match &r.family {
                None => 0,
                Some(f) => match f.get_ref().as_str() {
                    "any" => 0,
                    "inet" => libc::AF_INET as u16,
                    "inet6" => libc::AF_INET6 as u16,
                    "unix" | "netlink" | "packet" => {
                        return Err(src.err(
                            f.span(),
                            format!(
                                "rule {id}: family '{}': only inet and inet6 sockets pass the cgroup sock_create hook",
                                f.get_ref()
                            ),
                        ))
                    }
                    other => {
                        return Err(src.err(
                            f.span(),
                            format!("rule {id}: family '{other}': expected inet, inet6 or any"),
                        ))
                    }
                },
            },
            sock_type: match &r.sock_type {
                None => 0,
                Some(t) => match t.get_ref().as_str() {
                    "any" => 0,
                    "stream" => libc::SOCK_STREAM as u8,
                    "dgram" => libc::SOCK_DGRAM as u8,
                    "raw" => libc::SOCK_RAW as u8,
                    "seqpacket" => libc::SOCK_SEQPACKET as u8,
                    other => {
                        return Err(src.err(
                            t.span(),
                            format!(
                                "rule {id}: type '{other}': expected stream, dgram, raw, seqpacket or any"
                            ),
                        ))
                    }
                },
            },
            proto: match &r.proto {
                None => None,
                Some(p) => create_proto(src, id, p)?,
            },
        }
    } else {
        for (key, span) in [
            ("family", r.family.as_ref().map(Spanned::span)),
            ("type", r.sock_type.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                return Err(src.err(
                    span,
                    format!(
                        "rule {id}: {key} applies to create rules only (use cidr for the address family)"
                    ),
                ));
            }
        }
        Target::Addr {
            net: r
                .cidr
                .as_ref()
                .map(|c| cidr(src, &format!("rule {id}"), c))
                .transpose()?,
            ports: match &r.ports {
                None => (0, u16::MAX),
                Some(p) => ports(src, &format!("rule {id}"), p)?,
            },
            proto: match &r.proto {
                None => 0,
                Some(p) => match p.get_ref() {
                    toml::Value::String(s) if s == "any" => 0,
                    toml::Value::String(s) if s == "tcp" => libc::IPPROTO_TCP as u8,
                    toml::Value::String(s) if s == "udp" => libc::IPPROTO_UDP as u8,
                    other => {
                        return Err(src.err(
                            p.span(),
                            format!(
                                "rule {id}: proto {}: expected tcp, udp or any",
                                value_text(other)
                            ),
                        ))
                    }
                },
            },
        }
    };
    Ok(Rule {
        id,
        line,
        action,
        ops,
        target,
    })
}

fn create_proto(
    src: &Src<'_>,
    id: u32,
    p: &Spanned<toml::Value>,
) -> Result<Option<u16>, PolicyError> {
    let named = |s: &str| -> Option<Option<u16>> {
        Some(Some(match s {
            "any" => return Some(None),
            "ip" => 0,
            "icmp" => libc::IPPROTO_ICMP as u16,
            "tcp" => libc::IPPROTO_TCP as u16,
            "udp" => libc::IPPROTO_UDP as u16,
            "icmpv6" => libc::IPPROTO_ICMPV6 as u16,
            "sctp" => libc::IPPROTO_SCTP as u16,
            "udplite" => libc::IPPROTO_UDPLITE as u16,
            "raw" => libc::IPPROTO_RAW as u16,
            "mptcp" => libc::IPPROTO_MPTCP as u16,
            _ => return None,
        }))
    };
    match p.get_ref() {
        toml::Value::Integer(n) if (0..=255).contains(n) => Ok(Some(*n as u16)),
        toml::Value::String(s) => named(s).ok_or_else(|| {
            src.err(
                p.span(),
                format!(
                    "rule {id}: proto '{s}': expected a protocol name (tcp, udp, icmp, icmpv6, sctp, udplite, mptcp, raw), a number 0-255, or any"
                ),
            )
        }),
        other => Err(src.err(
            p.span(),
            format!(
                "rule {id}: proto {}: expected a protocol name, a number 0-255, or any",
                value_text(other)
            ),
        )),
    }
}

/// Resolves the cgroup v2 root for policy files.
pub fn cgroup_root() -> Result<PathBuf, crate::error::Error> {
    crate::host::system::cgroup2_root()
        .ok_or_else(|| crate::error::Error::Usage("cgroup v2 is not mounted on this host".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::source::glob_path;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    fn tree() -> CgroupTree {
        let mut dirs = BTreeMap::new();
        for (i, p) in [
            "/",
            "/app",
            "/app/web",
            "/app/web/child",
            "/app/db",
            "/system.slice",
            "/system.slice/nginx.service",
            "/system.slice/sshd.service",
        ]
        .iter()
        .enumerate()
        {
            dirs.insert((*p).to_owned(), 100 + i as u64);
        }
        CgroupTree { dirs }
    }

    fn ok(text: &str) -> Policy {
        parse("p.toml", text, &tree()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        parse("p.toml", text, &tree()).unwrap_err().to_string()
    }

    #[test]
    fn globs_match_one_component() {
        assert!(glob_path(
            "/system.slice/*.service",
            "/system.slice/nginx.service"
        ));
        assert!(!glob_path("/system.slice/*", "/system.slice/a/b"));
        assert!(glob_path("/*/web", "/app/web"));
        assert!(glob_path("/", "/"));
        assert!(!glob_path("/app", "/app/web"));
    }

    #[test]
    fn deepest_scope_governs_descendants() {
        let p = ok(r#"
[[scope]]
cgroup = "app"
[[scope]]
cgroup = "/app/web"
mode = "audit"
default = "deny"
"#);
        assert_eq!(p.attach.rel, "/");
        assert_eq!(p.scopes[0].governs, vec![101, 104]);
        assert_eq!(p.scopes[1].governs, vec![102, 103]);
        assert_eq!(p.scopes[1].mode, Mode::Audit);
        assert_eq!(p.scopes[1].default, Action::Deny);
    }

    #[test]
    fn units_and_globs_resolve() {
        let p = ok(r#"
[[scope]]
unit = "nginx.service"
[[scope]]
cgroup = "system.slice/ssh*"
"#);
        assert_eq!(p.scopes[0].matched[0].rel, "/system.slice/nginx.service");
        assert_eq!(p.scopes[1].matched[0].rel, "/system.slice/sshd.service");
    }

    #[test]
    fn rules_parse() {
        let p = ok(r#"
[[scope]]
cgroup = "app"
[[scope.rule]]
id = 7
action = "deny"
on = ["connect", "sendmsg"]
cidr = "10.0.0.0/8"
ports = "1-1024"
proto = "tcp"
[[scope.rule]]
id = 8
action = "deny"
on = ["create"]
family = "inet6"
type = "raw"
proto = 58
[[scope.rule]]
id = 9
action = "allow"
on = ["bind"]
ports = 80
"#);
        let r = &p.scopes[0].rules;
        assert_eq!(r[0].line, 5);
        assert_eq!(r[0].ops, vec![Op::Connect, Op::Sendmsg]);
        assert_eq!(
            r[0].target,
            Target::Addr {
                net: Some(Cidr {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix: 8
                }),
                ports: (1, 1024),
                proto: 6
            }
        );
        assert_eq!(
            r[1].target,
            Target::Create {
                family: 10,
                sock_type: 3,
                proto: Some(58)
            }
        );
        assert_eq!(
            r[2].target,
            Target::Addr {
                net: None,
                ports: (80, 80),
                proto: 0
            }
        );
    }

    #[test]
    fn errors_name_line_and_value() {
        let e = err("[[scope]]\ncgroup = \"app\"\n[[scope.rule]]\nid = 1\naction = \"deny\"\non = [\"connect\"]\ncidr = \"10.0.0.0/33\"\n");
        assert_eq!(
            e,
            "p.toml:7: rule 1: cidr '10.0.0.0/33': prefix length '33' is not 0 to 32"
        );
        let e = err("[[scope]]\ncgroup = \"nope\"\n");
        assert_eq!(e, "p.toml:2: cgroup 'nope': no such cgroup");
        let e = err("[[scope]]\ncgroup = \"app\"\nfrobnicate = 1\n");
        assert!(
            e.starts_with("p.toml:3: invalid policy: unknown field `frobnicate`"),
            "{e}"
        );
        let e = err("[[scope]]\ncgroup = \"app\"\n[[scope]]\ncgroup = \"/app/\"\n");
        assert!(
            e.starts_with("p.toml:4: scope '/app/': cgroup /app is already governed"),
            "{e}"
        );
    }

    #[test]
    fn masks() {
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 8),
            "10.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("::1".parse().unwrap(), 0),
            "::".parse::<IpAddr>().unwrap()
        );
    }
}
