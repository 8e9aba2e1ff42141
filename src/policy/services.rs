//! Services (`[[service]]` in the policy file): a VIP:port translated at
//! connect/sendmsg time to one of its backends, by the policy's own programs,
//! pinned maps and generation flip. Design: docs/services.md.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use toml::Spanned;

use crate::error::{Context, Error, Result};
use crate::policy::compile::addr_bytes;
use crate::policy::file::{is_under, normalize, value_text, CgroupTree, PolicyError, Src};
use crate::policy::file::{CgroupDir, UNIT_SUFFIXES};
use crate::skel::policy::types::{
    slp_backend, slp_backend_flags, slp_svc, slp_svc_flags, slp_svc_info, slp_svc_key,
    slp_svc_limit, slp_xlate_kind, slp_xlate_stat,
};
use crate::skel::terminate::types::slp_term_key;

// SAFETY: plain C structs of integer fields and byte arrays, valid for any bit
// pattern, laid out in policy.h without implicit padding.
unsafe impl plain::Plain for slp_svc_key {}
unsafe impl plain::Plain for slp_svc {}
unsafe impl plain::Plain for slp_backend {}
unsafe impl plain::Plain for slp_svc_info {}
unsafe impl plain::Plain for slp_term_key {}

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

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lim(l: slp_svc_limit) -> usize {
    l.0 as usize
}

fn sock_addr(src: &Src<'_>, what: &str, v: &Spanned<String>) -> Result<SocketAddr, PolicyError> {
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

fn scope_cgroup(
    src: &Src<'_>,
    tree: &CgroupTree,
    attach: &CgroupDir,
    r: &RawService,
) -> Result<Option<CgroupDir>, PolicyError> {
    let (dir, name, span) = match (&r.cgroup, &r.unit) {
        (Some(_), Some(u)) => {
            return Err(src.err(
                u.span(),
                format!(
                    "service: give either cgroup or unit, not both (unit '{}')",
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
                        "cgroup '{}': a service names one cgroup, without '*'",
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
                "service scope '{name}': cgroup {} is outside the attach point {}",
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
        let cgroup = scope_cgroup(src, tree, attach, r)?;
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

/// One generation's service entries. Array indexes are within the generation.
#[derive(Debug, Default)]
pub struct SvcTables {
    pub svc: Vec<(slp_svc_key, slp_svc)>,
    pub info: Vec<slp_svc_info>,
    pub backends: Vec<slp_backend>,
    /// slot -> backend index
    pub slots: Vec<u32>,
}

fn family(ip: IpAddr) -> u16 {
    if ip.is_ipv4() {
        libc::AF_INET as u16
    } else {
        libc::AF_INET6 as u16
    }
}

/// Depth of a cgroup below the v2 root ("/" is 0).
fn level(rel: &str) -> u16 {
    rel.split('/').filter(|p| !p.is_empty()).count() as u16
}

/// Pure: services to map entries of generation `gen`; `cookies[i]` is the
/// netns cookie service i is limited to (ignored for NetnsScope::Any).
pub fn compile(services: &[Service], gen: u32, cookies: &[u64]) -> SvcTables {
    let mut t = SvcTables::default();
    for (i, s) in services.iter().enumerate() {
        let index = i as u32;
        let first_backend = t.backends.len() as u32;
        let slot_base = t.slots.len() as u32;
        let g = s.backends.iter().fold(0u32, |g, b| gcd(g, b.weight));
        for (j, b) in s.backends.iter().enumerate() {
            let bi = first_backend + j as u32;
            if let Some(n) = b.weight.checked_div(g) {
                t.slots.extend(std::iter::repeat_n(bi, n as usize));
            }
            t.backends.push(slp_backend {
                addr: addr_bytes(b.addr.ip()),
                port: b.addr.port(),
                family: family(b.addr.ip()),
                weight: b.weight as u16,
                flags: if b.terminate {
                    slp_backend_flags::SLP_BE_TERMINATE.0 as u16
                } else {
                    0
                },
                service: index,
                line: b.line as u32,
            });
        }
        let any = s.netns == NetnsScope::Any;
        let flags = if any {
            slp_svc_flags::SLP_SVC_ANY_NETNS.0 as u8
        } else {
            0
        };
        let cookie = if any {
            0
        } else {
            cookies.get(i).copied().unwrap_or(0)
        };
        let value = slp_svc {
            index,
            slot_base,
            nslots: t.slots.len() as u32 - slot_base,
            kind: slp_xlate_kind::SLP_XLATE_SERVICE.0 as u8,
            flags,
            cgroup_level: s.cgroup.as_ref().map_or(0, |c| level(&c.rel)),
            netns_cookie: cookie,
            cgroup_id: s.cgroup.as_ref().map_or(0, |c| c.id),
        };
        for (proto, on) in [(libc::IPPROTO_TCP, s.tcp), (libc::IPPROTO_UDP, s.udp)] {
            if on {
                t.svc.push((
                    slp_svc_key {
                        addr: addr_bytes(s.vip.ip()),
                        port: s.vip.port(),
                        proto: proto as u8,
                        r#gen: gen as u8,
                        family: family(s.vip.ip()),
                        ..Default::default()
                    },
                    value,
                ));
            }
        }
        t.info.push(slp_svc_info {
            addr: addr_bytes(s.vip.ip()),
            port: s.vip.port(),
            family: family(s.vip.ip()),
            protos: u8::from(s.tcp) | (u8::from(s.udp) << 1),
            flags,
            first_backend,
            nbackends: s.backends.len() as u32,
            line: s.line as u32,
            cgroup_id: value.cgroup_id,
            netns_cookie: cookie,
            ..Default::default()
        });
    }
    t
}

const SO_NETNS_COOKIE: libc::c_int = 71;

fn own_netns_cookie() -> std::io::Result<u64> {
    // SAFETY: socket(2), getsockopt(2) into a u64 we own, close(2) of our fd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut v = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(v)
    }
}

/// The netns cookie a service is limited to (SO_NETNS_COOKIE, Linux 5.14+).
pub fn netns_cookie(scope: &NetnsScope) -> Result<u64> {
    let what = |p: &Path| format!("reading the network namespace cookie of {}", p.display());
    match scope {
        NetnsScope::Any => Ok(0),
        NetnsScope::Applier => own_netns_cookie().ctx(what(Path::new("this process"))),
        NetnsScope::Path(p) => in_netns(p, || own_netns_cookie().ctx(what(p))),
    }
}

/// Runs `f` in the network namespace of file `p`, on a thread of its own
/// (setns changes only the calling thread).
fn in_netns<T: Send>(p: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let what = || format!("entering the network namespace {}", p.display());
    let ns = std::fs::File::open(p).ctx(what())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).ctx(what())?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")).ctx(what()))
    })
}

/// Map names the services add to the policy's pinned set.
pub const PINNED_MAPS: [&str; 7] = [
    "slp_svc",
    "slp_slots",
    "slp_backends",
    "slp_svc_info",
    "slp_svc_counters",
    "slp_xlate",
    "slp_xlate_stats",
];

/// The maps `write` fills, from the loaded skeleton or opened by pin path.
pub struct SvcMaps<'a> {
    pub svc: &'a dyn MapCore,
    pub slots: &'a dyn MapCore,
    pub backends: &'a dyn MapCore,
    pub info: &'a dyn MapCore,
    pub counters: &'a dyn MapCore,
}

/// Writes generation `t` (the one not in force): its service keys replace the
/// old ones of that generation; arrays are written at the indexes it uses.
pub fn write(m: &SvcMaps<'_>, gen: u32, t: &SvcTables) -> Result<()> {
    use crate::policy::state::{bytes, decode};
    let stale: Vec<Vec<u8>> = m
        .svc
        .keys()
        .filter(|k| decode::<slp_svc_key>(k).is_some_and(|k| u32::from(k.r#gen) == gen))
        .collect();
    for k in stale {
        m.svc.delete(&k).ctx("clearing slp_svc")?;
    }
    let put = |map: &dyn MapCore, idx: u32, v: &[u8], what: &'static str| {
        map.update(&idx.to_ne_bytes(), v, MapFlags::ANY).ctx(what)
    };
    let slots0 = gen * slp_svc_limit::SLP_MAX_SLOTS.0;
    for (i, b) in t.slots.iter().enumerate() {
        put(
            m.slots,
            slots0 + i as u32,
            &b.to_ne_bytes(),
            "writing slp_slots",
        )?;
    }
    let back0 = gen * slp_svc_limit::SLP_MAX_BACKENDS.0;
    for (i, b) in t.backends.iter().enumerate() {
        put(
            m.backends,
            back0 + i as u32,
            bytes(b),
            "writing slp_backends",
        )?;
    }
    let info0 = gen * slp_svc_limit::SLP_MAX_SERVICES.0;
    for (i, s) in t.info.iter().enumerate() {
        put(m.info, info0 + i as u32, bytes(s), "writing slp_svc_info")?;
    }
    let cpus = libbpf_rs::num_possible_cpus().ctx("counting CPUs")?;
    let zero = vec![vec![0u8; 8]; cpus];
    let c0 = gen * slp_svc_limit::SLP_SVC_COUNTERS.0;
    let fails = (0..t.info.len() as u32).map(|i| slp_svc_limit::SLP_MAX_BACKENDS.0 + i);
    for slot in (0..t.backends.len() as u32).chain(fails) {
        m.counters
            .update_percpu(&(c0 + slot).to_ne_bytes(), &zero, MapFlags::ANY)
            .ctx("resetting slp_svc_counters")?;
    }
    // Keys last: a key only points at slots, backends and info already written.
    for (k, v) in &t.svc {
        m.svc
            .update(bytes(k), bytes(v), MapFlags::ANY)
            .ctx("writing slp_svc")?;
    }
    Ok(())
}

/// Whether this kernel has bpf_sock_destroy (Linux 6.5+), which `terminate` needs.
pub fn kernel_can_terminate() -> bool {
    libbpf_rs::btf::Btf::from_path(crate::host::system::DEFAULT_BTF)
        .ok()
        .is_some_and(|b| {
            b.type_by_name::<libbpf_rs::btf::types::Func<'_>>("bpf_sock_destroy")
                .is_some()
        })
}

/// The one line `check` and `apply` print when a file asks for `terminate` on a
/// kernel that cannot do it.
pub const NO_TERMINATE: &str = "warning: terminate: this kernel lacks bpf_sock_destroy (Linux 6.5+); open connections of removed backends continue";

/// Whether any backend of the file asks for `terminate`.
pub fn wants_terminate(services: &[Service]) -> bool {
    services
        .iter()
        .any(|s| s.tcp && s.backends.iter().any(|b| b.terminate))
}

fn read<T: plain::Plain + Default>(m: &dyn MapCore, idx: u32) -> Option<T> {
    let v = m.lookup(&idx.to_ne_bytes(), MapFlags::ANY).ok()??;
    crate::policy::state::decode(&v)
}

/// Indexes of the services generation `gen` holds (one per VIP, tcp or udp).
fn service_indexes(svc: &dyn MapCore, gen: u32, tcp_only: bool) -> Vec<u32> {
    use crate::policy::state::{bytes, decode};
    let mut idx: Vec<u32> = svc
        .keys()
        .filter_map(|k| decode::<slp_svc_key>(&k))
        .filter(|k| u32::from(k.r#gen) == gen)
        .filter(|k| !tcp_only || i32::from(k.proto) == libc::IPPROTO_TCP)
        .filter_map(|k| {
            svc.lookup(bytes(&k), MapFlags::ANY)
                .ok()
                .flatten()
                .and_then(|v| decode::<slp_svc>(&v))
                .map(|v| v.index)
        })
        .collect();
    idx.sort_unstable();
    idx.dedup();
    idx
}

/// The (VIP, backend) pairs of TCP services whose open connections an apply of
/// `new` over generation `old` resets: backends of `old` that `new` removes or
/// drains (weight 0), marked `terminate` in either.
pub fn terminate_keys(m: &SvcMaps<'_>, old: u32, new: &[Service]) -> Vec<slp_term_key> {
    let mut after: HashMap<(SocketAddr, SocketAddr), &Backend> = HashMap::new();
    for s in new.iter().filter(|s| s.tcp) {
        for b in &s.backends {
            after.insert((s.vip, b.addr), b);
        }
    }
    let flag = slp_backend_flags::SLP_BE_TERMINATE.0 as u16;
    let mut keys = Vec::new();
    for i in service_indexes(m.svc, old, true) {
        let Some(s) = read::<slp_svc_info>(m.info, old * slp_svc_limit::SLP_MAX_SERVICES.0 + i)
        else {
            continue;
        };
        let vip = SocketAddr::new(crate::model::ip_from(s.family, &s.addr), s.port);
        for j in s.first_backend..s.first_backend + s.nbackends {
            let Some(b) =
                read::<slp_backend>(m.backends, old * slp_svc_limit::SLP_MAX_BACKENDS.0 + j)
            else {
                continue;
            };
            let addr = SocketAddr::new(crate::model::ip_from(b.family, &b.addr), b.port);
            let now = after.get(&(vip, addr));
            let gone = now.is_none_or(|n| n.weight == 0);
            let marked = b.flags & flag != 0 || now.is_some_and(|n| n.terminate);
            if gone && marked {
                keys.push(slp_term_key {
                    vip: s.addr,
                    backend: b.addr,
                    vip_port: s.port,
                    backend_port: b.port,
                    family: s.family,
                    ..Default::default()
                });
            }
        }
    }
    keys
}

/// What the terminate step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminated {
    /// Connections reset (in the applier's network namespace).
    Reset(u64),
    /// The kernel lacks bpf_sock_destroy: connections continue.
    Unsupported,
}

/// Resets the translated TCP sockets of the given (VIP, backend) pairs. A TCP
/// iterator sees the namespace it is created in, so it runs in the applier's,
/// in each named one (/run/netns) and in the services' netns files.
pub fn terminate(keys: &[slp_term_key], services: &[Service]) -> Result<Terminated> {
    use std::os::unix::fs::MetadataExt;
    if !kernel_can_terminate() {
        return Ok(Terminated::Unsupported);
    }
    let mut total = terminate_here(keys)?;
    let mut seen = std::collections::HashSet::new();
    if let Ok(m) = std::fs::metadata("/proc/self/ns/net") {
        seen.insert((m.dev(), m.ino()));
    }
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()));
    let files = services.iter().filter_map(|s| match &s.netns {
        NetnsScope::Path(p) => Some(p.clone()),
        _ => None,
    });
    for p in named.chain(files) {
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        if seen.insert((m.dev(), m.ino())) {
            total += in_netns(&p, || terminate_here(keys))?;
        }
    }
    Ok(Terminated::Reset(total))
}

/// One pass of the iter/tcp program over the calling thread's namespace.
fn terminate_here(keys: &[slp_term_key]) -> Result<u64> {
    use crate::skel::terminate::TerminateSkelBuilder;
    use libbpf_rs::skel::{OpenSkel, SkelBuilder};
    use std::io::Read;
    let mut storage = std::mem::MaybeUninit::uninit();
    let mut open = TerminateSkelBuilder::default()
        .open(&mut storage)
        .ctx("opening the terminate program")?;
    open.maps
        .slp_xlate
        .set_pin_path(crate::policy::state::pins().map("slp_xlate"))
        .ctx("setting a map pin path")?;
    let skel = open.load().ctx("loading the terminate program")?;
    for k in keys {
        skel.maps
            .slp_term
            .update(crate::policy::state::bytes(k), &[1], MapFlags::ANY)
            .ctx("writing slp_term")?;
    }
    let link = skel
        .progs
        .slp_terminate
        .attach()
        .ctx("attaching the terminate iterator")?;
    let mut it = libbpf_rs::Iter::new(&link).ctx("opening the terminate iterator")?;
    let mut sink = Vec::new();
    it.read_to_end(&mut sink)
        .ctx("running the terminate iterator")?;
    Ok(skel.maps.bss_data.as_deref().map_or(0, |b| b.reset_count))
}

fn open_pinned(name: &str) -> Result<MapHandle> {
    let p = crate::policy::state::pins().map(name);
    MapHandle::from_pinned_path(&p).map_err(|source| Error::BpfErrno {
        what: format!("opening pinned map {}", p.display()).into(),
        source,
    })
}

/// Sockets holding translation state now, and ever.
pub fn xlate_stats() -> Result<(i64, i64)> {
    let m = open_pinned("slp_xlate_stats")?;
    let get = |i: slp_xlate_stat| {
        m.lookup(&i.0.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| v.try_into().ok().map(i64::from_ne_bytes))
            .unwrap_or(0)
    };
    Ok((
        get(slp_xlate_stat::SLP_XS_LIVE),
        get(slp_xlate_stat::SLP_XS_MADE),
    ))
}

/// The services of generation `gen`, with per-backend counters, for show.
pub fn show(gen: u32) -> Result<Value> {
    use crate::skel::percpu_sum;
    let svc = open_pinned("slp_svc")?;
    let info = open_pinned("slp_svc_info")?;
    let backends = open_pinned("slp_backends")?;
    let counters = open_pinned("slp_svc_counters")?;
    let idx = service_indexes(&svc, gen, false);
    let c0 = gen * slp_svc_limit::SLP_SVC_COUNTERS.0;
    let mut list = Vec::new();
    for i in idx {
        let Some(s) = read::<slp_svc_info>(&info, gen * slp_svc_limit::SLP_MAX_SERVICES.0 + i)
        else {
            continue;
        };
        let ip = crate::model::ip_from(s.family, &s.addr);
        let mut bl = Vec::new();
        for j in s.first_backend..s.first_backend + s.nbackends {
            let Some(b) =
                read::<slp_backend>(&backends, gen * slp_svc_limit::SLP_MAX_BACKENDS.0 + j)
            else {
                continue;
            };
            let bip = crate::model::ip_from(b.family, &b.addr);
            bl.push(json!({
                "address": SocketAddr::new(bip, b.port).to_string(),
                "weight": b.weight,
                "terminate": b.flags & slp_backend_flags::SLP_BE_TERMINATE.0 as u16 != 0,
                "line": b.line,
                "picks": percpu_sum(&counters, c0 + j),
            }));
        }
        let proto = match s.protos {
            1 => "tcp",
            2 => "udp",
            _ => "both",
        };
        list.push(json!({
            "address": SocketAddr::new(ip, s.port).to_string(),
            "proto": proto,
            "line": s.line,
            "netns": if s.flags & slp_svc_flags::SLP_SVC_ANY_NETNS.0 as u8 != 0 {
                json!("any")
            } else {
                json!(s.netns_cookie)
            },
            "cgroup_id": s.cgroup_id,
            "failed_picks": percpu_sum(&counters, c0 + slp_svc_limit::SLP_MAX_BACKENDS.0 + i),
            "backends": bl,
        }));
    }
    Ok(Value::Array(list))
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
        dirs.insert("/app/web.service".to_owned(), 3);
        CgroupTree { dirs }
    }

    fn svcs(text: &str) -> Vec<Service> {
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
    fn weights_become_slots_divided_by_their_gcd() {
        let s = svcs(
            "[[service]]\naddress = \"198.51.100.1:80\"\nproto = \"both\"\nbackends = [\n{ address = \"127.0.0.2:8080\", weight = 30 },\n{ address = \"127.0.0.3:8080\", weight = 10 },\n{ address = \"127.0.0.4:8080\", weight = 0 },\n]\nunit = \"web.service\"\n",
        );
        assert_eq!(s[0].slots(), 4);
        let t = compile(&s, 1, &[77]);
        assert_eq!(t.slots, [0, 0, 0, 1]);
        assert_eq!(t.svc.len(), 2, "tcp and udp keys");
        let (k, v) = &t.svc[0];
        assert_eq!((k.r#gen, k.port, k.proto), (1, 80, 6));
        assert_eq!(&k.addr[..4], &[198, 51, 100, 1]);
        assert_eq!((v.nslots, v.slot_base, v.netns_cookie), (4, 0, 77));
        assert_eq!((v.cgroup_id, v.cgroup_level), (3, 2));
        assert_eq!(t.backends[1].port, 8080);
        assert_eq!(t.backends[2].weight, 0);
        assert_eq!(t.info[0].nbackends, 3);
    }

    #[test]
    fn zero_backends_compile_to_no_slots() {
        let s =
            svcs("[[service]]\naddress = \"[2001:db8::1]:53\"\nproto = \"udp\"\nnetns = \"any\"\n");
        let t = compile(&s, 0, &[5]);
        assert_eq!(t.svc[0].1.nslots, 0);
        assert_eq!(t.svc[0].1.netns_cookie, 0);
        assert_eq!(t.svc[0].0.proto, 17);
        assert_eq!(t.svc[0].0.family, libc::AF_INET6 as u16);
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
