//! The acceleration's kernel state: the sockhash, the cgroup -> entry map (two
//! generations, flipped with the policy's), the sock_ops link at the cgroup v2
//! root and the sk_msg program attached to the sockhash. Pinned under
//! <pin root>/accel. Design: docs/accelerate.md.
//!
//! Taking a socket out of a sockhash drops the bytes redirected to it and not yet
//! read (measured, docs/accelerate.md). So nothing here ever deletes entries or
//! frees a sockhash that holds sockets: turning acceleration off detaches the
//! sock_ops link, and the sockhash stays pinned until its connections close.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use libbpf_rs::skel::Skel;
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::attach::cgroup_attach::{CgroupTarget, Pins};
use crate::error::{Context, Error, Result};
use crate::policy::accelerate::Accelerate;
use crate::policy::pinned::{bytes, decode};
use crate::skel::percpu_sum;
use crate::skel::policy::types::{slp_accel_cg_key, slp_accel_scope, slp_accel_stat};
use crate::skel::policy::PolicySkel;

pub const COMPONENT: &str = "accel";
pub const SOCKOPS: &str = "slp_accel_sockops";
pub const MSG: &str = "slp_accel_msg";
pub const HASH: &str = "slp_accel_hash";
pub const PINNED_MAPS: [&str; 4] = [HASH, "slp_accel_of", "slp_accel_stats", "slp_accel_pending"];

pub fn pins() -> Pins {
    Pins::new(COMPONENT)
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
    for (i, a) in entries.iter().enumerate() {
        let mut v = slp_accel_scope {
            index: i as u32,
            nports: a.ports.len() as u16,
            ..Default::default()
        };
        for (j, &(lo, hi)) in a.ports.iter().enumerate() {
            v.lo[j] = lo;
            v.hi[j] = hi;
        }
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

/// Attaches sk_msg to the sockhash and, once, sock_ops at the cgroup v2 root:
/// the root so that a passive end outside every entry still takes a lone
/// active end out of the sockhash (docs/accelerate.md, "FIONREAD").
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
    if pins.link(SOCKOPS).exists() {
        return Ok(());
    }
    let link = CgroupTarget::open(cgroup_root)?.attach(&prog(SOCKOPS)?)?;
    pins.pin_links(&mut [(SOCKOPS.to_owned(), link)])
}

/// Sockets in the pinned sockhash now (two per accelerated connection).
pub fn sockets() -> Option<u64> {
    let h = MapHandle::from_pinned_path(pins().map(HASH)).ok()?;
    Some(h.keys().count() as u64)
}

/// Turns acceleration off: no new connection joins. The sockhash and sk_msg stay
/// while they carry connections; once empty, everything is unpinned. Returns
/// the sockets still accelerated.
pub fn retire() -> Result<u64> {
    let pins = pins();
    if !pins.exists() {
        return Ok(0);
    }
    pins.detach_links()?;
    let left = sockets().unwrap_or(0);
    if left == 0 {
        pins.remove()?;
    }
    Ok(left)
}

/// `policy show`'s acceleration part.
pub fn show() -> serde_json::Value {
    let stats = MapHandle::from_pinned_path(pins().map("slp_accel_stats")).ok();
    let stat = |s: slp_accel_stat| stats.as_ref().map_or(0, |m| percpu_sum(m, s.0));
    serde_json::json!({
        "sockets": sockets().unwrap_or(0),
        "attached": pins().link(SOCKOPS).exists(),
        "paired": stat(slp_accel_stat::SLP_AS_PAIRED),
        "redirected_msgs": stat(slp_accel_stat::SLP_AS_MSGS),
        "redirected_bytes": stat(slp_accel_stat::SLP_AS_BYTES),
        "passed_msgs": stat(slp_accel_stat::SLP_AS_PASSED),
        "unpaired": stat(slp_accel_stat::SLP_AS_UNPAIRED),
        "skipped_zerocopy": stat(slp_accel_stat::SLP_AS_SKIP_ZEROCOPY),
        "skipped_ulp": stat(slp_accel_stat::SLP_AS_SKIP_ULP),
        "skipped_rcvlowat": stat(slp_accel_stat::SLP_AS_SKIP_RCVLOWAT),
    })
}
