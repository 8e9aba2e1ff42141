//! The acceleration's kernel state: the sockhash, the cgroup -> entry map (two
//! generations, flipped with the policy's), the sock_ops link at the cgroup v2
//! root and the sk_msg program attached to the sockhash. Pinned under
//! <pin root>/accel. Design: docs/accelerate.md.
//!
//! Taking a socket out of a sockhash drops the bytes redirected to it and not yet
//! read (measured, docs/accelerate.md). So nothing here ever deletes entries or
//! frees a sockhash that holds sockets: turning acceleration off detaches the
//! sock_ops link, and the sockhash stays pinned until its connections close.

use crate::model::policy::{AccelEntryView, AccelView};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use libbpf_rs::skel::Skel;
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::attach::cgroup_attach::{CgroupTarget, Pins};
use crate::error::{Context, Error, Result};
use crate::policy::accelerate::Accelerate;
use crate::policy::pinned::{bytes, decode};
use crate::skel::percpu_sum;
use crate::skel::policy::types::{
    slp_accel_bytes, slp_accel_cg_key, slp_accel_info, slp_accel_key, slp_accel_limit,
    slp_accel_scope, slp_accel_stat,
};
use crate::skel::policy::PolicySkel;

pub const COMPONENT: &str = "accel";
pub const SOCKOPS: &str = "slp_accel_sockops";
pub const MSG: &str = "slp_accel_msg";
pub const ULP: &str = "slp_accel_ulp";
/// At close(), records what the application read (docs/accelerate.md, "Accounting").
pub const RELEASE: &str = "slp_accel_release";
/// The programs loaded for acceleration.
pub const PROGRAMS: [&str; 4] = [SOCKOPS, MSG, RELEASE, ULP];
pub const HASH: &str = "slp_accel_hash";
/// sk_msg's byte counts per hashed end, which the tracer joins.
pub const BYTES: &str = "slp_accel_bytes";
pub const PINNED_MAPS: [&str; 7] = [
    HASH,
    BYTES,
    "slp_accel_end",
    "slp_accel_of",
    "slp_accel_info",
    "slp_accel_stats",
    "slp_accel_pending",
];

pub fn pins() -> Pins {
    Pins::new(COMPONENT)
}

/// Whether `release` ("6.1.0-57-amd64") is older than `floor` (major, minor).
fn release_below(release: &str, floor: (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < floor,
        _ => false,
    }
}

/// Whether the kernel has what acceleration needs: sock_ops and sk_msg programs
/// with the sockhash helpers (a trial load each).
pub fn kernel_support() -> std::result::Result<(), &'static str> {
    use libbpf_rs::libbpf_sys as sys;
    let need = [
        (
            libbpf_rs::ProgramType::SockOps,
            sys::BPF_FUNC_sock_hash_update,
            "bpf_sock_hash_update in sock_ops",
        ),
        (
            libbpf_rs::ProgramType::SockOps,
            sys::BPF_FUNC_skc_to_tcp_sock,
            "bpf_skc_to_tcp_sock in sock_ops",
        ),
        (
            libbpf_rs::ProgramType::SockOps,
            sys::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie in sock_ops",
        ),
        (
            libbpf_rs::ProgramType::SkMsg,
            sys::BPF_FUNC_msg_redirect_hash,
            "bpf_msg_redirect_hash",
        ),
        (
            libbpf_rs::ProgramType::SkMsg,
            sys::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie in sk_msg",
        ),
    ];
    for (ty, id, name) in need {
        if !ty.is_helper_supported(id).unwrap_or(false) {
            return Err(name);
        }
    }
    // No probe shows it: 6.1 answers FIONREAD with 0 for redirected data
    // (measured in the kernel matrix); 6.12 and later count it.
    if release_below(&crate::host::system::kernel_release(), (6, 12)) {
        return Err("a FIONREAD that counts redirected data (Linux 6.12)");
    }
    Ok(())
}

/// Writes generation `gen` of slp_accel_of (cleared first).
pub fn write(skel: &PolicySkel<'_>, gen: u32, entries: &[Accelerate]) -> Result<()> {
    let map = &skel.maps.slp_accel_of;
    let stale: Vec<Vec<u8>> = map
        .keys()
        .filter(|k| decode::<slp_accel_cg_key>(k).map(|k| k.r#gen) == Some(gen))
        .collect();
    for k in stale {
        map.delete(&k).ctx("clearing slp_accel_of")?;
    }
    // Entries of an earlier file in this half: line 0 marks a free slot.
    let max = slp_accel_limit::SLP_ACCEL_MAX_SCOPES.0;
    let empty = slp_accel_info::default();
    for i in entries.len() as u32..max {
        skel.maps
            .slp_accel_info
            .update(&(gen * max + i).to_ne_bytes(), bytes(&empty), MapFlags::ANY)
            .ctx("clearing slp_accel_info")?;
    }
    for (i, a) in entries.iter().enumerate() {
        let mut v = slp_accel_scope {
            index: i as u32,
            nports: a.ports.len() as u16,
            ..Default::default()
        };
        let mut info = slp_accel_info {
            line: a.line as u32,
            ncgroups: a.governs.len() as u32,
            nports: v.nports,
            ..Default::default()
        };
        for (j, &(lo, hi)) in a.ports.iter().enumerate() {
            (v.lo[j], v.hi[j]) = (lo, hi);
            (info.lo[j], info.hi[j]) = (lo, hi);
        }
        for (d, b) in info.name.iter_mut().zip(a.name.bytes().take(95)) {
            *d = b as _;
        }
        let idx = gen * slp_accel_limit::SLP_ACCEL_MAX_SCOPES.0 + i as u32;
        skel.maps
            .slp_accel_info
            .update(&idx.to_ne_bytes(), bytes(&info), MapFlags::ANY)
            .ctx("writing slp_accel_info")?;
        for &id in &a.governs {
            let k = slp_accel_cg_key {
                cgroup_id: id,
                r#gen,
                ..Default::default()
            };
            map.update(bytes(&k), bytes(&v), MapFlags::ANY)
                .ctx("writing slp_accel_of")?;
        }
    }
    Ok(())
}

/// Attaches sk_msg to the sockhash and, once each, sock_ops, sock_release and
/// the TCP_ULP guard at the cgroup v2 root: the root so that a passive end outside
/// every entry still takes a lone active end out of the sockhash
/// (docs/accelerate.md, "FIONREAD"), and so that no process can put a ULP on a
/// hashed socket ("kTLS").
pub fn attach(skel: &PolicySkel<'_>, cgroup_root: &Path) -> Result<()> {
    let pins = pins();
    pins.create_dirs()?;
    let prog = |name: &str| {
        skel.object()
            .progs_mut()
            .find(|p| p.name() == name)
            .ok_or_else(|| Error::Object {
                what: format!("program {name}").into(),
                detail: "missing from object",
            })
    };
    prog(MSG)?
        .attach_sockmap(skel.maps.slp_accel_hash.as_fd().as_raw_fd())
        .ctx("attaching slp_accel_msg to the sockhash")?;
    for name in [ULP, SOCKOPS, RELEASE] {
        if !pins.link(name).exists() {
            let link = CgroupTarget::open(cgroup_root)?.attach(&prog(name)?)?;
            pins.pin_links(&mut [(name.to_owned(), link)])?;
        }
    }
    Ok(())
}

/// Tells the release program a tracer reads `slp_accel_bytes` until
/// CLOCK_MONOTONIC `until_ns`, so it leaves a closed pair's entries to the
/// tracer's close records (the all-zero key; docs/accelerate.md, "Accounting").
/// Nothing to do when no counts are pinned.
pub fn lease_reader(until_ns: u64) -> Result<()> {
    let Ok(m) = MapHandle::from_pinned_path(pins().map(BYTES)) else {
        return Ok(());
    };
    let lease = slp_accel_bytes {
        delivered: until_ns,
        ..Default::default()
    };
    m.update(
        bytes(&slp_accel_key::default()),
        bytes(&lease),
        MapFlags::ANY,
    )
    .ctx("writing the slp_accel_bytes lease")
}

/// Sockets in the pinned sockhash now (two per accelerated connection).
pub fn sockets() -> Option<u64> {
    let h = MapHandle::from_pinned_path(pins().map(HASH)).ok()?;
    Some(h.keys().count() as u64)
}

/// Turns acceleration off: no new connection joins. The sockhash, sk_msg, the
/// release program and the TCP_ULP guard stay while they carry connections; once
/// empty, everything is unpinned. Returns the sockets still accelerated.
pub fn retire() -> Result<u64> {
    let pins = pins();
    if !pins.exists() {
        return Ok(0);
    }
    pins.detach_link(SOCKOPS)?;
    let left = sockets().unwrap_or(0);
    if left == 0 {
        pins.remove()?;
    }
    Ok(left)
}

/// The entries of generation `gen` as applied.
fn entries(gen: u32) -> Vec<AccelEntryView> {
    let Ok(m) = MapHandle::from_pinned_path(pins().map("slp_accel_info")) else {
        return Vec::new();
    };
    let base = gen * slp_accel_limit::SLP_ACCEL_MAX_SCOPES.0;
    (0..slp_accel_limit::SLP_ACCEL_MAX_SCOPES.0)
        .filter_map(|i| {
            let v = m.lookup(&(base + i).to_ne_bytes(), MapFlags::ANY).ok()??;
            let info: slp_accel_info = decode(&v).filter(|x: &slp_accel_info| x.line != 0)?;
            let name: Vec<u8> = info
                .name
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            let ports: Vec<String> = (0..usize::from(info.nports))
                .map(|j| match (info.lo[j], info.hi[j]) {
                    (lo, hi) if lo == hi => lo.to_string(),
                    (lo, hi) => format!("{lo}-{hi}"),
                })
                .collect();
            Some(AccelEntryView {
                name: String::from_utf8_lossy(&name).into_owned(),
                line: u64::from(info.line),
                cgroups: u64::from(info.ncgroups),
                ports: (!ports.is_empty()).then_some(ports),
            })
        })
        .collect()
}

/// `policy show`'s acceleration part: the entries of generation `gen` and the
/// counters.
pub fn show(gen: u32) -> AccelView {
    let stats = MapHandle::from_pinned_path(pins().map("slp_accel_stats")).ok();
    let stat = |s: slp_accel_stat| stats.as_ref().map_or(0, |m| percpu_sum(m, s.0));
    let attached = pins().link(SOCKOPS).exists();
    AccelView {
        entries: if attached { entries(gen) } else { Vec::new() },
        sockets: sockets().unwrap_or(0),
        attached,
        paired: stat(slp_accel_stat::SLP_AS_PAIRED),
        redirected_msgs: stat(slp_accel_stat::SLP_AS_MSGS),
        redirected_bytes: stat(slp_accel_stat::SLP_AS_BYTES),
        passed_msgs: stat(slp_accel_stat::SLP_AS_PASSED),
        unpaired: stat(slp_accel_stat::SLP_AS_UNPAIRED),
        refused_ulp: stat(slp_accel_stat::SLP_AS_REFUSED_ULP),
        skipped_zerocopy: stat(slp_accel_stat::SLP_AS_SKIP_ZEROCOPY),
        skipped_ulp: stat(slp_accel_stat::SLP_AS_SKIP_ULP),
        skipped_rcvlowat: stat(slp_accel_stat::SLP_AS_SKIP_RCVLOWAT),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn release_floor() {
        assert!(super::release_below("6.1.0-57-amd64", (6, 12)));
        assert!(super::release_below("5.10.0-46-amd64", (6, 12)));
        assert!(!super::release_below("6.12.118+deb12-amd64", (6, 12)));
        assert!(!super::release_below("6.18.44-fc-v1252", (6, 12)));
        assert!(!super::release_below("7.3.4+deb13-amd64", (6, 12)));
    }
}
