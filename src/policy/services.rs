//! Services (`[[service]]` in the policy file): a VIP:port translated at
//! connect/sendmsg time to one of its backends, by the policy's own programs,
//! pinned maps and generation flip. Design: docs/services.md.
//!
//! This module validates `[[service]]`; `compile::compile_services` makes the
//! map entries and `svcmaps` writes them, terminates and reads them back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::policy::source::{is_under, normalize, value_text, CgroupTree, PolicyError, Src};
use crate::policy::source::{CgroupDir, UNIT_SUFFIXES};
use crate::skel::policy::types::slp_svc_limit;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    address: Spanned<String>,
    proto: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    netns: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<toml::Value>>,
    #[serde(default)]
    terminate: bool,
}

/// Which network namespaces' sockets a service translates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsScope {
    /// The namespace of the process that applies the file.
    Applier,
    Any,
    /// A namespace file (/run/netns/NAME, /proc/PID/ns/net).
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Reset its open TCP connections when an apply removes or drains it.
    pub terminate: bool,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub line: usize,
    pub vip: SocketAddr,
    pub tcp: bool,
    pub udp: bool,
    pub backends: Vec<Backend>,
    /// Only sockets of tasks in this cgroup or below; None: every one under the
    /// attach cgroup.
    pub cgroup: Option<CgroupDir>,
    pub netns: NetnsScope,
}

impl Service {
    /// Weight slots this service needs: each weight divided by their gcd.
    pub fn slots(&self) -> u64 {
        let g = self.backends.iter().fold(0u32, |g, b| gcd(g, b.weight));
        if g == 0 {
            return 0;
        }
        self.backends.iter().map(|b| u64::from(b.weight / g)).sum()
    }
}

pub(crate) fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lim(l: slp_svc_limit) -> usize {
    l.0 as usize
}

pub(crate) fn sock_addr(
    src: &Src<'_>,
    what: &str,
    v: &Spanned<String>,
) -> Result<SocketAddr, PolicyError> {
    v.get_ref().parse().map_err(|_| {
        src.err(
            v.span(),
            format!(
                "{what} '{}': expected IP:PORT (IPv6 as [ADDR]:PORT)",
                v.get_ref()
            ),
        )
    })
}

/// The one cgroup (`cgroup` path or systemd `unit`) that scopes a `what`
/// ("service", "redirect"); None when neither is given.
pub(crate) fn scope_cgroup(
    src: &Src<'_>,
    tree: &CgroupTree,
    attach: &CgroupDir,
    what: &str,
    cgroup: Option<&Spanned<String>>,
    unit: Option<&Spanned<String>>,
) -> Result<Option<CgroupDir>, PolicyError> {
    let (dir, name, span) = match (cgroup, unit) {
        (Some(_), Some(u)) => {
            return Err(src.err(
                u.span(),
                format!(
                    "{what}: give either cgroup or unit, not both (unit '{}')",
                    u.get_ref()
                ),
            ))
        }
        (None, None) => return Ok(None),
        (Some(c), None) => {
            if c.get_ref().contains('*') {
                return Err(src.err(
                    c.span(),
                    format!(
                        "cgroup '{}': a {what} names one cgroup, without '*'",
                        c.get_ref()
                    ),
                ));
            }
            let dir = tree.get(&normalize(c.get_ref())).ok_or_else(|| {
                src.err(
                    c.span(),
                    format!("cgroup '{}': no such cgroup", c.get_ref()),
                )
            })?;
            (dir, c.get_ref().clone(), c.span())
        }
        (None, Some(u)) => {
            let unit = u.get_ref();
            if unit.contains('/') || !UNIT_SUFFIXES.iter().any(|s| unit.ends_with(s)) {
                return Err(src.err(u.span(), format!("unit '{unit}': not a systemd unit name")));
            }
            let found: Vec<&String> = tree
                .dirs
                .keys()
                .filter(|rel| rel.rsplit('/').next() == Some(unit.as_str()))
                .collect();
            let dir = match found.as_slice() {
                [one] => tree.get(one),
                [] => None,
                _ => {
                    return Err(src.err(
                        u.span(),
                        format!(
                            "unit '{unit}': {} cgroups have that name; name the cgroup",
                            found.len()
                        ),
                    ))
                }
            }
            .ok_or_else(|| {
                src.err(
                    u.span(),
                    format!("unit '{unit}': no cgroup of that unit exists"),
                )
            })?;
            (dir, unit.clone(), u.span())
        }
    };
    if !is_under(&dir.rel, &attach.rel) {
        return Err(src.err(
            span,
            format!(
                "{what} scope '{name}': cgroup {} is outside the attach point {}",
                dir.rel, attach.rel
            ),
        ));
    }
    Ok(Some(dir))
}

/// Validates every `[[service]]`: one line with FILE:LINE and the value on the
/// first problem.
pub(crate) fn parse(
    src: &Src<'_>,
    tree: &CgroupTree,
    attach: &CgroupDir,
    raw: &[Spanned<RawService>],
) -> Result<Vec<Service>, PolicyError> {
    let max_services = lim(slp_svc_limit::SLP_MAX_SERVICES);
    if raw.len() > max_services {
        return Err(src.err(
            raw[max_services].get_ref().address.span(),
            format!(
                "service {}: more services than the maps hold ({max_services})",
                max_services + 1
            ),
        ));
    }
    let mut seen: HashMap<(SocketAddr, bool), usize> = HashMap::new();
    let mut out = Vec::new();
    let (mut backends, mut slots) = (0usize, 0u64);
    for rs in raw {
        let r = rs.get_ref();
        let vip = sock_addr(src, "service address", &r.address)?;
        let line = src.line(r.address.span().start);
        let at = r.address.span();
        if vip.port() == 0 {
            return Err(src.err(at, format!("service {vip}: port 0")));
        }
        let (tcp, udp) = match r.proto.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("tcp") => (true, false),
            Some("udp") => (false, true),
            Some("both") => (true, true),
            Some(other) => {
                let span = r.proto.as_ref().map_or(at.clone(), Spanned::span);
                return Err(src.err(
                    span,
                    format!("service {vip}: proto '{other}': expected tcp, udp or both"),
                ));
            }
        };
        for (is_udp, on) in [(false, tcp), (true, udp)] {
            if !on {
                continue;
            }
            if let Some(first) = seen.insert((vip, is_udp), line) {
                return Err(src.err(
                    at,
                    format!(
                        "service {vip}/{}: duplicate VIP (first on line {first})",
                        if is_udp { "udp" } else { "tcp" }
                    ),
                ));
            }
        }
        let mut list: Vec<Backend> = Vec::new();
        for rb in &r.backends {
            let b = rb.get_ref();
            let addr = sock_addr(src, "backend address", &b.address)?;
            let bspan = b.address.span();
            if addr.port() == 0 {
                return Err(src.err(bspan, format!("service {vip}: backend {addr}: port 0")));
            }
            if addr == vip {
                return Err(src.err(
                    bspan,
                    format!("service {vip}: backend {addr} is the VIP itself"),
                ));
            }
            if addr.is_ipv4() != vip.is_ipv4() {
                return Err(src.err(
                    bspan,
                    format!("service {vip}: backend {addr}: not the VIP's address family"),
                ));
            }
            if let Some(other) = list.iter().find(|o| o.addr == addr) {
                return Err(src.err(
                    bspan,
                    format!(
                        "service {vip}: backend {addr} listed twice (first on line {})",
                        other.line
                    ),
                ));
            }
            let weight = match b.weight.as_ref() {
                None => 1,
                Some(w) => match w.get_ref() {
                    toml::Value::Integer(n) if (0..=65535).contains(n) => *n as u32,
                    other => {
                        return Err(src.err(
                            w.span(),
                            format!(
                            "service {vip}: backend {addr}: weight {}: an integer from 0 to 65535",
                            value_text(other)
                        ),
                        ))
                    }
                },
            };
            list.push(Backend {
                addr,
                weight,
                terminate: b.terminate,
                line: src.line(bspan.start),
            });
        }
        if !list.is_empty() && list.iter().all(|b| b.weight == 0) {
            return Err(src.err(at, format!("service {vip}: the backends' weights sum to 0")));
        }
        let netns = match r.netns.as_ref() {
            None => NetnsScope::Applier,
            Some(n) if n.get_ref() == "any" => NetnsScope::Any,
            Some(n) => {
                let p = Path::new(n.get_ref());
                if !p.is_absolute() || !p.exists() {
                    return Err(src.err(
                        n.span(),
                        format!(
                            "service {vip}: netns '{}': expected \"any\" or the path of a network namespace file",
                            n.get_ref()
                        ),
                    ));
                }
                NetnsScope::Path(p.to_owned())
            }
        };
        let cgroup = scope_cgroup(
            src,
            tree,
            attach,
            "service",
            r.cgroup.as_ref(),
            r.unit.as_ref(),
        )?;
        let svc = Service {
            line,
            vip,
            tcp,
            udp,
            backends: list,
            cgroup,
            netns,
        };
        let need = svc.slots();
        let per = lim(slp_svc_limit::SLP_SVC_SLOTS) as u64;
        if need > per {
            return Err(src.err(
                at,
                format!("service {vip}: the weights need {need} slots (weights divided by their gcd), more than the maps hold ({per})"),
            ));
        }
        backends += svc.backends.len();
        slots += need;
        let max_backends = lim(slp_svc_limit::SLP_MAX_BACKENDS);
        if backends > max_backends {
            return Err(src.err(
                at,
                format!(
                    "service {vip}: more backends in the file than the maps hold ({max_backends})"
                ),
            ));
        }
        let max_slots = lim(slp_svc_limit::SLP_MAX_SLOTS) as u64;
        if slots > max_slots {
            return Err(src.err(
                at,
                format!("service {vip}: the weights of the file need more slots than the maps hold ({max_slots})"),
            ));
        }
        out.push(svc);
    }
    Ok(out)
}

/// Whether any backend of the file asks for `terminate`.
pub fn wants_terminate(services: &[Service]) -> bool {
    services
        .iter()
        .any(|s| s.tcp && s.backends.iter().any(|b| b.terminate))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::file::parse as parse_policy;
    use std::collections::BTreeMap;

    fn tree() -> CgroupTree {
        let mut dirs = BTreeMap::new();
        dirs.insert("/".to_owned(), 1);
        dirs.insert("/app".to_owned(), 2);
        dirs.insert("/app/web.service".to_owned(), 3);
        CgroupTree { dirs }
    }

    pub(crate) fn svcs(text: &str) -> Vec<Service> {
        parse_policy("p.toml", text, &tree())
            .unwrap_or_else(|e| panic!("{e}"))
            .services
    }

    fn err(text: &str) -> String {
        parse_policy("p.toml", text, &tree())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_services_name_line_and_value() {
        let e = err("[[service]]\naddress = \"198.51.100.1:80\"\nbackends = [{ address = \"127.0.0.2:0\" }]\n");
        assert_eq!(
            e,
            "p.toml:3: service 198.51.100.1:80: backend 127.0.0.2:0: port 0"
        );
        let e = err("[[service]]\naddress = \"198.51.100.1:80\"\n[[service]]\naddress = \"198.51.100.1:80\"\nproto = \"both\"\n");
        assert_eq!(
            e,
            "p.toml:4: service 198.51.100.1:80/tcp: duplicate VIP (first on line 2)"
        );
        let e = err(
            "[[service]]\naddress = \"198.51.100.1:80\"\nbackends = [{ address = \"[::1]:80\" }]\n",
        );
        assert!(e.contains("not the VIP's address family"), "{e}");
    }
}
