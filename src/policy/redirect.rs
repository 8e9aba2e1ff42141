//! Redirect (`[[redirect]]` in the policy file): outbound TCP connections of
//! chosen cgroups sent to a local proxy, which reads the original destination
//! with getsockopt SO_ORIGINAL_DST. Validation, the map entries and `show`.
//! Design: docs/redirect.md.

use std::net::{IpAddr, SocketAddr};

use libbpf_rs::{MapCore, MapFlags};
use serde::Deserialize;
use toml::Spanned;

use crate::error::{Context, Result};
use crate::model::policy::RedirectView;
use crate::policy::addr::{cidr, mask, ports, Cidr};
use crate::policy::services::{scope_cgroup, sock_addr};
use crate::policy::source::{is_under, normalize, value_text, CgroupDir, CgroupTree};
use crate::policy::source::{PolicyError, Src};
use crate::skel::policy::types::{slp_redir_cidr, slp_redir_limit, slp_redirect};

// SAFETY: C structs of integers and byte arrays (policy.h), any byte is valid.
unsafe impl plain::Plain for slp_redirect {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    proto: Option<Spanned<String>>,
    to: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    exclude_ports: Vec<Spanned<toml::Value>>,
    proxy: Option<Spanned<String>>,
    proxy6: Option<Spanned<String>>,
    #[serde(default)]
    proxy_cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    proxy_uids: Vec<Spanned<toml::Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub line: usize,
    /// Bit 0: tcp, bit 1: udp.
    pub protos: u8,
    /// Tasks in this cgroup or below; None: every one under the attach cgroup.
    pub cgroup: Option<CgroupDir>,
    pub to: Vec<Cidr>,
    pub exclude: Vec<Cidr>,
    pub ports: (u16, u16),
    pub exclude_ports: Vec<(u16, u16)>,
    pub proxy4: Option<SocketAddr>,
    pub proxy6: Option<SocketAddr>,
    /// The proxy itself: never redirected (the loop guard).
    pub proxy_cgroups: Vec<CgroupDir>,
    pub proxy_uids: Vec<u32>,
}

fn lim(l: slp_redir_limit) -> usize {
    l.0 as usize
}

/// Addresses of this host's interfaces (in the applier's network namespace).
fn local_addrs() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|a| {
                let s = a.address?;
                if let Some(v4) = s.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect()
        })
        .unwrap_or_default()
}

fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    a.addr.is_ipv4() == b.addr.is_ipv4() && {
        let p = a.prefix.min(b.prefix);
        mask(a.addr, p) == mask(b.addr, p)
    }
}

/// Validates every `[[redirect]]`: one line with FILE:LINE on the first problem.
pub(crate) fn parse(
    src: &Src<'_>,
    tree: &CgroupTree,
    attach: &CgroupDir,
    raw: &[Spanned<RawRedirect>],
) -> Result<Vec<Redirect>, PolicyError> {
    let locals = local_addrs();
    let mut out: Vec<Redirect> = Vec::new();
    for rs in raw {
        let r = rs.get_ref();
        let at = rs.span();
        let line = src.line(at.start);
        if out.len() == lim(slp_redir_limit::SLP_MAX_REDIRECTS) {
            return Err(src.err(
                at,
                format!(
                    "redirect: more redirects than the maps hold ({})",
                    out.len()
                ),
            ));
        }
        let protos = match r.proto.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None | Some((_, "tcp")) => 1,
            Some((_, "udp")) => 2,
            Some((_, "both")) => 3,
            Some((p, other)) => {
                return Err(src.err(
                    p.span(),
                    format!("redirect: proto '{other}': expected tcp, udp or both"),
                ))
            }
        };
        let proxy = |v: &Option<Spanned<String>>, v6: bool| -> Result<_, PolicyError> {
            let Some(v) = v else { return Ok(None) };
            let a = sock_addr(src, "redirect proxy", v)?;
            let key = if v6 { "proxy6" } else { "proxy" };
            if a.is_ipv6() != v6 {
                return Err(src.err(
                    v.span(),
                    format!(
                        "redirect: {key} {a}: expected an IPv{} address",
                        if v6 { 6 } else { 4 }
                    ),
                ));
            }
            if a.port() == 0 {
                return Err(src.err(v.span(), format!("redirect: {key} {a}: port 0")));
            }
            if !a.ip().is_loopback() && !locals.contains(&a.ip()) {
                return Err(src.err(
                    v.span(),
                    format!("redirect: {key} {a}: not an address of this host"),
                ));
            }
            Ok(Some(a))
        };
        let proxy4 = proxy(&r.proxy, false)?;
        let proxy6 = proxy(&r.proxy6, true)?;
        if proxy4.is_none() && proxy6.is_none() {
            return Err(src.err(at, "redirect: no proxy (give proxy and/or proxy6)"));
        }
        let cgroup = scope_cgroup(
            src,
            tree,
            attach,
            "redirect",
            r.cgroup.as_ref(),
            r.unit.as_ref(),
        )?;
        let cidrs = |list: &[Spanned<String>]| -> Result<Vec<Cidr>, PolicyError> {
            list.iter().map(|c| cidr(src, "redirect", c)).collect()
        };
        let to = match &r.to {
            Some(list) => cidrs(list)?,
            None => ["0.0.0.0/0", "::/0"]
                .iter()
                .filter_map(|t| {
                    let (a, p) = t.split_once('/')?;
                    Some(Cidr {
                        addr: a.parse().ok()?,
                        prefix: p.parse().ok()?,
                    })
                })
                .collect(),
        };
        let exclude = cidrs(&r.exclude)?;
        if to.len() + exclude.len() > lim(slp_redir_limit::SLP_REDIR_CIDRS) {
            return Err(src.err(
                at,
                format!(
                    "redirect: {} prefixes in to and exclude, more than the maps hold ({})",
                    to.len() + exclude.len(),
                    lim(slp_redir_limit::SLP_REDIR_CIDRS)
                ),
            ));
        }
        let ports_ = match &r.ports {
            Some(p) => ports(src, "redirect", p)?,
            None => (1, 65535),
        };
        let exempt = lim(slp_redir_limit::SLP_REDIR_EXEMPT);
        let too_many = |what: &str| {
            src.err(
                at.clone(),
                format!("redirect: more than {exempt} {what}, more than the maps hold"),
            )
        };
        if r.exclude_ports.len() > exempt {
            return Err(too_many("exclude_ports"));
        }
        let exclude_ports = r
            .exclude_ports
            .iter()
            .map(|p| ports(src, "redirect exclude_ports", p))
            .collect::<Result<Vec<_>, _>>()?;
        if r.proxy_cgroups.len() > exempt {
            return Err(too_many("proxy_cgroups"));
        }
        if r.proxy_uids.len() > exempt {
            return Err(too_many("proxy_uids"));
        }
        let mut proxy_cgroups = Vec::new();
        for c in &r.proxy_cgroups {
            let dir = tree.get(&normalize(c.get_ref())).ok_or_else(|| {
                src.err(
                    c.span(),
                    format!("redirect: proxy_cgroups '{}': no such cgroup", c.get_ref()),
                )
            })?;
            // The proxy's accepted sockets are paired by programs attached there.
            if !is_under(&dir.rel, &attach.rel) {
                return Err(src.err(
                    c.span(),
                    format!(
                        "redirect: proxy_cgroups '{}': outside the attach point {}",
                        c.get_ref(),
                        attach.rel
                    ),
                ));
            }
            proxy_cgroups.push(dir);
        }
        let mut proxy_uids = Vec::new();
        for u in &r.proxy_uids {
            match u.get_ref() {
                toml::Value::Integer(n) if (0..=i64::from(u32::MAX)).contains(n) => {
                    proxy_uids.push(*n as u32)
                }
                other => {
                    return Err(src.err(
                        u.span(),
                        format!("redirect: proxy_uids {}: not a uid", value_text(other)),
                    ))
                }
            }
        }
        // The loop guard: the proxy's own connections must stay out of scope.
        let scope_rel = cgroup
            .as_ref()
            .map_or(attach.rel.as_str(), |c| c.rel.as_str());
        if proxy_cgroups.is_empty() && proxy_uids.is_empty() {
            return Err(src.err(
                at,
                format!("redirect: a loop: nothing marks the proxy (give proxy_cgroups or proxy_uids), so its own connections to {scope_rel}'s destinations would come back to it"),
            ));
        }
        let red = Redirect {
            line,
            protos,
            cgroup,
            to,
            exclude,
            ports: ports_,
            exclude_ports,
            proxy4,
            proxy6,
            proxy_cgroups,
            proxy_uids,
        };
        if let Some(other) = out.iter().find(|o| overlap(o, &red, &attach.rel)) {
            return Err(src.err(
                at,
                format!(
                    "redirect: overlaps the redirect on line {} (same cgroups, ports and destinations)",
                    other.line
                ),
            ));
        }
        out.push(red);
    }
    Ok(out)
}

fn overlap(a: &Redirect, b: &Redirect, attach: &str) -> bool {
    let ra = a.cgroup.as_ref().map_or(attach, |c| c.rel.as_str());
    let rb = b.cgroup.as_ref().map_or(attach, |c| c.rel.as_str());
    (is_under(ra, rb) || is_under(rb, ra))
        && a.protos & b.protos != 0
        && a.ports.0 <= b.ports.1
        && b.ports.0 <= a.ports.1
        && a.to.iter().any(|x| b.to.iter().any(|y| overlaps(x, y)))
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v) => a[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => a = v.octets(),
    }
    a
}

fn mask16(ip: IpAddr, prefix: u8) -> [u8; 16] {
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let mut m = [0u8; 16];
    for (i, b) in m.iter_mut().enumerate().take(bits / 8) {
        let have = (prefix as usize).saturating_sub(i * 8).min(8);
        *b = if have == 0 { 0 } else { 0xffu8 << (8 - have) };
    }
    m
}

fn cidr_entry(c: &Cidr, exclude: bool) -> slp_redir_cidr {
    slp_redir_cidr {
        addr: addr16(c.addr),
        mask: mask16(c.addr, c.prefix),
        family: if c.addr.is_ipv4() { 2 } else { 10 },
        exclude: u8::from(exclude),
        ..Default::default()
    }
}

/// One generation's `slp_redirects` entries, in file order (pure).
pub fn compile(redirects: &[Redirect], netns_cookie: u64) -> Vec<slp_redirect> {
    redirects
        .iter()
        .map(|r| {
            let mut e = slp_redirect {
                line: r.line as u32,
                protos: r.protos,
                port_lo: r.ports.0,
                port_hi: r.ports.1,
                netns_cookie,
                ..Default::default()
            };
            if let Some(c) = &r.cgroup {
                e.cgroup_id = c.id;
                e.cgroup_level = level(&c.rel);
            }
            // Exclusions first: the kernel stops at the first one that matches.
            let list = r
                .exclude
                .iter()
                .map(|c| cidr_entry(c, true))
                .chain(r.to.iter().map(|c| cidr_entry(c, false)));
            for (i, c) in list.enumerate() {
                e.cidrs[i] = c;
                e.ncidrs = i as u8 + 1;
            }
            for (i, (lo, hi)) in r.exclude_ports.iter().enumerate() {
                e.xport_lo[i] = *lo;
                e.xport_hi[i] = *hi;
                e.nxports = i as u8 + 1;
            }
            for (i, c) in r.proxy_cgroups.iter().enumerate() {
                e.exempt_cg[i] = c.id;
                e.exempt_level[i] = level(&c.rel);
                e.nexempt_cg = i as u8 + 1;
            }
            for (i, u) in r.proxy_uids.iter().enumerate() {
                e.exempt_uid[i] = *u;
                e.nexempt_uid = i as u8 + 1;
            }
            if let Some(p) = r.proxy4 {
                e.proxy4.copy_from_slice(&addr16(p.ip())[..4]);
                e.proxy4_port = p.port();
            }
            if let Some(p) = r.proxy6 {
                e.proxy6 = addr16(p.ip());
                e.proxy6_port = p.port();
            }
            e
        })
        .collect()
}

/// Depth below the cgroup v2 root, as bpf_get_current_ancestor_cgroup_id counts.
fn level(rel: &str) -> u16 {
    rel.split('/').filter(|p| !p.is_empty()).count() as u16
}

/// Writes generation `gen` of `slp_redirects` (unused entries zeroed, which
/// ends the list) and zeroes its counters.
pub fn write(
    redirects: &dyn MapCore,
    counters: &dyn MapCore,
    gen: u32,
    t: &[slp_redirect],
) -> Result<()> {
    let max = slp_redir_limit::SLP_MAX_REDIRECTS.0;
    let cpus = libbpf_rs::num_possible_cpus().ctx("counting CPUs")?;
    let zero = vec![vec![0u8; 8]; cpus];
    let empty = slp_redirect::default();
    for i in 0..max {
        let v = t.get(i as usize).unwrap_or(&empty);
        let idx = (gen * max + i).to_ne_bytes();
        redirects
            .update(&idx, crate::policy::pinned::bytes(v), MapFlags::ANY)
            .ctx("writing slp_redirects")?;
        counters
            .update_percpu(&idx, &zero, MapFlags::ANY)
            .ctx("resetting slp_redir_counters")?;
    }
    Ok(())
}

/// The redirects of generation `gen` with their counters, for `policy show`.
pub fn show(gen: u32) -> Result<Vec<RedirectView>> {
    let open = |n: &str| {
        let p = crate::policy::pinned::pins().map(n);
        libbpf_rs::MapHandle::from_pinned_path(&p)
            .ctx(format!("opening pinned map {}", p.display()))
    };
    let map = open("slp_redirects")?;
    let counters = open("slp_redir_counters")?;
    let max = slp_redir_limit::SLP_MAX_REDIRECTS.0;
    let mut list = Vec::new();
    for i in 0..max {
        let idx = gen * max + i;
        let Some(r) = map
            .lookup(&idx.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| crate::policy::pinned::decode::<slp_redirect>(&v))
        else {
            break;
        };
        if r.line == 0 {
            break;
        }
        let proxy4 = (r.proxy4_port != 0).then(|| {
            SocketAddr::new(
                crate::model::ip_from(2, &addr_of4(&r.proxy4)),
                r.proxy4_port,
            )
            .to_string()
        });
        let proxy6 = (r.proxy6_port != 0).then(|| {
            SocketAddr::new(crate::model::ip_from(10, &r.proxy6), r.proxy6_port).to_string()
        });
        list.push(RedirectView {
            line: r.line,
            cgroup_id: r.cgroup_id,
            proto: match r.protos {
                1 => "tcp",
                2 => "udp",
                _ => "both",
            },
            ports: format!("{}-{}", r.port_lo, r.port_hi),
            proxy: proxy4,
            proxy6,
            redirected: crate::skel::percpu_sum(&counters, idx),
        });
    }
    Ok(list)
}

fn addr_of4(a: &[u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(a);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::file::parse as parse_policy;
    use std::collections::BTreeMap;

    fn tree() -> CgroupTree {
        let mut dirs = BTreeMap::new();
        dirs.insert("/".to_owned(), 1);
        dirs.insert("/app".to_owned(), 2);
        dirs.insert("/app/proxy".to_owned(), 3);
        CgroupTree { dirs }
    }

    fn err(text: &str) -> String {
        parse_policy("p.toml", text, &tree())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn masks_cover_prefix_bits() {
        let m = mask16("10.0.0.0".parse().unwrap_or(IpAddr::from([0u8; 4])), 12);
        assert_eq!(&m[..4], &[255, 240, 0, 0]);
        assert_eq!(&m[4..], &[0u8; 12]);
    }

    #[test]
    fn bad_redirects_name_line_and_value() {
        let ok = "[[redirect]]\ncgroup = \"/app\"\nproxy = \"127.0.0.1:15001\"\nproxy_cgroups = [\"/app/proxy\"]\n";
        let p = parse_policy("p.toml", ok, &tree()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.redirects.len(), 1);
        assert_eq!(p.redirects[0].to.len(), 2);
        let e = err("[[redirect]]\ncgroup = \"/app\"\nproxy = \"127.0.0.1:15001\"\n");
        assert!(e.starts_with("p.toml:1: redirect: a loop"), "{e}");
        let e = err("[[redirect]]\nproxy = \"192.0.2.1:15001\"\nproxy_uids = [1337]\n");
        assert_eq!(
            e,
            "p.toml:2: redirect: proxy 192.0.2.1:15001: not an address of this host"
        );
        let e = err(&format!("{ok}{ok}"));
        assert_eq!(
            e,
            "p.toml:5: redirect: overlaps the redirect on line 1 (same cgroups, ports and destinations)"
        );
    }
}
