//! The services' side of the pinned policy state: netns cookies, writing one
//! generation's service maps, resetting connections of removed backends
//! (terminate), and reading the maps back for `policy show`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::model::policy::{BackendView, ServiceView};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::error::{Context, Error, Result};
use crate::policy::compile::SvcTables;
use crate::policy::services::{Backend, NetnsScope, Service};
use crate::skel::policy::types::{
    slp_backend, slp_backend_flags, slp_svc, slp_svc_flags, slp_svc_info, slp_svc_key,
    slp_svc_limit, slp_xlate_stat,
};
use crate::skel::terminate::types::slp_term_key;

// SAFETY: plain C structs of integer fields and byte arrays, valid for any bit
// pattern, laid out in policy.h without implicit padding.
unsafe impl plain::Plain for slp_svc_key {}
unsafe impl plain::Plain for slp_svc {}
unsafe impl plain::Plain for slp_backend {}
unsafe impl plain::Plain for slp_svc_info {}
unsafe impl plain::Plain for slp_term_key {}

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
pub const PINNED_MAPS: [&str; 8] = [
    "slp_svc",
    "slp_slots",
    "slp_backends",
    "slp_svc_info",
    "slp_svc_counters",
    "slp_xlate",
    "slp_xlate_stats",
    "slp_watch",
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
    use crate::policy::pinned::{bytes, decode};
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

fn read<T: plain::Plain + Default>(m: &dyn MapCore, idx: u32) -> Option<T> {
    let v = m.lookup(&idx.to_ne_bytes(), MapFlags::ANY).ok()??;
    crate::policy::pinned::decode(&v)
}

/// Indexes of the services generation `gen` holds (one per VIP, tcp or udp).
fn service_indexes(svc: &dyn MapCore, gen: u32, tcp_only: bool) -> Vec<u32> {
    use crate::policy::pinned::{bytes, decode};
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
        .set_pin_path(crate::policy::pinned::pins().map("slp_xlate"))
        .ctx("setting a map pin path")?;
    let skel = open.load().ctx("loading the terminate program")?;
    for k in keys {
        skel.maps
            .slp_term
            .update(crate::policy::pinned::bytes(k), &[1], MapFlags::ANY)
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
    let p = crate::policy::pinned::pins().map(name);
    MapHandle::from_pinned_path(&p).map_err(|source| Error::BpfErrno {
        what: format!("opening pinned map {}", p.display()).into(),
        source,
    })
}

/// Asks the policy programs for a translate record per translation until
/// CLOCK_MONOTONIC `until_ns` (the `slp_watch` lease); 0 stops them.
pub fn watch_translations(until_ns: u64) -> Result<()> {
    open_pinned("slp_watch")?
        .update(&0u32.to_ne_bytes(), &until_ns.to_ne_bytes(), MapFlags::ANY)
        .ctx("writing slp_watch")
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

/// The services of generation `gen`, with per-backend counters.
pub fn services(gen: u32) -> Result<Vec<ServiceView>> {
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
            bl.push(BackendView {
                address: SocketAddr::new(bip, b.port).to_string(),
                weight: u32::from(b.weight),
                terminate: b.flags & slp_backend_flags::SLP_BE_TERMINATE.0 as u16 != 0,
                line: b.line,
                picks: percpu_sum(&counters, c0 + j),
            });
        }
        list.push(ServiceView {
            address: SocketAddr::new(ip, s.port).to_string(),
            proto: match s.protos {
                1 => "tcp",
                2 => "udp",
                _ => "both",
            },
            line: s.line,
            netns_cookie: (s.flags & slp_svc_flags::SLP_SVC_ANY_NETNS.0 as u8 == 0)
                .then_some(s.netns_cookie),
            cgroup_id: s.cgroup_id,
            failed_picks: percpu_sum(&counters, c0 + slp_svc_limit::SLP_MAX_BACKENDS.0 + i),
            backends: bl,
        });
    }
    Ok(list)
}
