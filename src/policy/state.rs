//! The policy in force: pinned maps and links under /sys/fs/bpf/socklens/policy.
//!
//! Atomic apply: every policy map is split in two generations (a `gen` byte in
//! each key, or the upper half of each array). The programs read `slp_config.gen`
//! once per call and look everything up in that generation only. `apply` clears
//! and fills the generation not in force, then flips `gen` with one map update:
//! every call is judged wholly by the old rule set or wholly by the new one.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject};

use crate::attach::cgroup_attach::{link_cgroup, CgroupTarget, Pins};
use crate::error::{Context, Error, Result};
use crate::host::system;
use crate::policy::accelmaps;
use crate::policy::compile::{compile, compile_services, Tables};
use crate::policy::file::Policy;
use crate::policy::pinned::{bytes, decode, pins};
use crate::policy::redirect;
use crate::policy::services;
use crate::policy::svcmaps;
use crate::skel::percpu_sum;
use crate::skel::policy::types::{
    slp_cgroup_key, slp_config, slp_create_key, slp_limit, slp_lpm_key, slp_rule_info,
    slp_scope_info,
};
use crate::skel::policy::{PolicySkel, PolicySkelBuilder};

/// The programs that enforce and translate; the observing getsockopt
/// (slp_getsockopt) is never pinned, redirect's slp_orig_dst is.
pub const ENFORCING: [&str; 14] = [
    "slp_bind4",
    "slp_bind6",
    "slp_connect4",
    "slp_connect6",
    "slp_sendmsg4",
    "slp_sendmsg6",
    "slp_sock_create",
    "slp_recvmsg4",
    "slp_recvmsg6",
    "slp_getpeername4",
    "slp_getpeername6",
    "slp_sock_release",
    "slp_orig_dst",
    "slp_redir_sockops",
];

/// Attached only while the file has a `[[redirect]]`: a sock_ops program runs
/// on some nine callbacks of every TCP connection in the attach cgroup.
const REDIRECT_ONLY: &str = "slp_redir_sockops";

/// Attached only while the file has a `[[scope]]`: they judge rules and do
/// nothing else (sock_create runs for every socket made in the attach cgroup).
const SCOPES_ONLY: [&str; 3] = ["slp_sock_create", "slp_bind4", "slp_bind6"];

/// The enforcing programs a policy attaches.
fn attached(policy: &Policy) -> Vec<&'static str> {
    let redirects = !policy.redirects.is_empty();
    let scopes = !policy.scopes.is_empty();
    ENFORCING
        .into_iter()
        .filter(|n| redirects || *n != REDIRECT_ONLY)
        .filter(|n| scopes || !SCOPES_ONLY.contains(n))
        .collect()
}

/// Maps shared by every load of the enforcing programs, pinned by name.
pub const PINNED_MAPS: [&str; 12] = [
    "slp_config",
    "slp_scope_of",
    "slp_scopes",
    "slp_lpm",
    "slp_create",
    "slp_rules",
    "slp_counters",
    "slp_events",
    "slp_lost",
    "slp_redirects",
    "slp_redir_counters",
    "slp_redir_pairs",
];

/// Serializes concurrent `policy` commands: an advisory lock on the bpffs root.
struct Lock(#[allow(dead_code)] File);

fn lock() -> Result<Lock> {
    system::ensure_bpffs()?;
    let f = File::open(system::BPFFS).ctx(format!("opening {}", system::BPFFS))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).ctx("locking the policy state");
    }
    Ok(Lock(f))
}

/// Loads the enforcing programs with every policy map pinned (re-adopting maps an
/// earlier socklens pinned).
fn load_enforcing<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    pins: &Pins,
    accel: bool,
) -> Result<PolicySkel<'obj>> {
    let accel_pins = accelmaps::pins();
    let pin_accel = accel || accel_pins.map(accelmaps::HASH).exists();
    let mut open = PolicySkelBuilder::default()
        .open(storage)
        .ctx("opening the policy programs")?;
    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or_else(|| Error::Object {
            what: "opening the policy programs".into(),
            detail: "no .rodata section",
        })?;
    ro.enforce = true;
    ro.observe = false;
    for mut map in open.open_object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if PINNED_MAPS.contains(&name.as_str()) || svcmaps::PINNED_MAPS.contains(&name.as_str()) {
            map.set_pin_path(pins.map(&name))
                .ctx("setting a map pin path")?;
        } else if pin_accel && accelmaps::PINNED_MAPS.contains(&name.as_str()) {
            map.set_pin_path(accel_pins.map(&name))
                .ctx("setting a map pin path")?;
        }
    }
    if pin_accel {
        accel_pins.create_dirs()?;
    }
    for mut prog in open.open_object_mut().progs_mut() {
        let keep = prog
            .name()
            .to_str()
            .is_some_and(|n| ENFORCING.contains(&n) || (accel && accelmaps::PROGRAMS.contains(&n)));
        prog.set_autoload(keep);
    }
    open.load()
        .ctx("loading the policy programs")
        .map_err(|e| Error::Hint {
            inner: Box::new(e),
            hint: "if maps pinned by another socklens version are in the way, run `socklens policy remove`",
        })
}

fn read_config(map: &dyn MapCore) -> Result<slp_config> {
    let v = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .ctx("reading slp_config")?
        .unwrap_or_default();
    Ok(decode(&v).unwrap_or_default())
}

/// Deletes every entry of generation `gen` from a gen-keyed map.
fn clear_gen(map: &dyn MapCore, gen: u32, gen_of: impl Fn(&[u8]) -> Option<u32>) -> Result<()> {
    let stale: Vec<Vec<u8>> = map.keys().filter(|k| gen_of(k) == Some(gen)).collect();
    for k in stale {
        map.delete(&k).ctx("clearing a policy map")?;
    }
    Ok(())
}

fn write_generation(skel: &PolicySkel<'_>, t: &Tables) -> Result<()> {
    let m = &skel.maps;
    let gen = t.gen;
    clear_gen(&m.slp_scope_of, gen, |k| {
        decode::<slp_cgroup_key>(k).map(|k| k.r#gen)
    })?;
    clear_gen(&m.slp_lpm, gen, |k| {
        decode::<slp_lpm_key>(k).map(|k| u32::from(k.r#gen))
    })?;
    clear_gen(&m.slp_create, gen, |k| {
        decode::<slp_create_key>(k).map(|k| u32::from(k.r#gen))
    })?;
    let upd = |map: &dyn MapCore, k: &[u8], v: &[u8], what: &'static str| {
        map.update(k, v, MapFlags::ANY).ctx(what)
    };
    for (k, v) in &t.scope_of {
        upd(&m.slp_scope_of, bytes(k), bytes(v), "writing slp_scope_of")?;
    }
    for (k, v) in &t.lpm {
        upd(&m.slp_lpm, bytes(k), bytes(v), "writing slp_lpm")?;
    }
    for (k, v) in &t.create {
        upd(&m.slp_create, bytes(k), bytes(v), "writing slp_create")?;
    }
    let max_scopes = slp_limit::SLP_MAX_SCOPES.0;
    let max_rules = slp_limit::SLP_MAX_RULES.0;
    for (i, v) in &t.scopes {
        let idx = gen * max_scopes + i;
        upd(
            &m.slp_scopes,
            &idx.to_ne_bytes(),
            bytes(v),
            "writing slp_scopes",
        )?;
    }
    for (i, v) in &t.rules {
        let idx = gen * max_rules + i;
        upd(
            &m.slp_rules,
            &idx.to_ne_bytes(),
            bytes(v),
            "writing slp_rules",
        )?;
    }
    // Fresh counters for every slot this generation uses.
    let cpus = libbpf_rs::num_possible_cpus().ctx("counting CPUs")?;
    let zero = vec![vec![0u8; 8]; cpus];
    let base = gen * slp_limit::SLP_COUNTER_SLOTS.0;
    let slots = t
        .rules
        .iter()
        .map(|(i, _)| *i)
        .chain(t.scopes.iter().map(|(i, _)| max_rules + i));
    for s in slots {
        m.slp_counters
            .update_percpu(&(base + s).to_ne_bytes(), &zero, MapFlags::ANY)
            .ctx("resetting slp_counters")?;
    }
    Ok(())
}

fn realtime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| (t.tv_sec() as u64) * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What `apply` did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub gen: u32,
    pub scopes: usize,
    pub rules: usize,
    pub cgroups: usize,
    pub services: usize,
    pub attach: String,
    pub attached_now: bool,
    /// Connections of removed or drained backends reset (`terminate`).
    pub terminated: Option<svcmaps::Terminated>,
}

/// Helpers the policy programs cannot do without, by program type, with the
/// release that brought each. Without them the object cannot load; no fallback
/// replaces them (docs/services.md and docs/redirect.md, "Kernels").
const NEEDED_HELPERS: [(
    libbpf_rs::ProgramType,
    libbpf_rs::libbpf_sys::bpf_func_id,
    &str,
); 5] = [
    (
        libbpf_rs::ProgramType::CgroupSockAddr,
        libbpf_rs::libbpf_sys::BPF_FUNC_loop,
        "bpf_loop (Linux 5.17)",
    ),
    (
        libbpf_rs::ProgramType::CgroupSockAddr,
        libbpf_rs::libbpf_sys::BPF_FUNC_set_retval,
        "bpf_set_retval (Linux 5.18)",
    ),
    (
        libbpf_rs::ProgramType::CgroupSockAddr,
        libbpf_rs::libbpf_sys::BPF_FUNC_sk_storage_get,
        "socket-local storage in cgroup sock_addr programs",
    ),
    (
        libbpf_rs::ProgramType::CgroupSockAddr,
        libbpf_rs::libbpf_sys::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie in cgroup sock_addr programs (Linux 5.7)",
    ),
    (
        libbpf_rs::ProgramType::SockOps,
        libbpf_rs::libbpf_sys::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie in sock_ops programs (Linux 5.15)",
    ),
];

/// The features of NEEDED_HELPERS this kernel lacks (by a trial load each).
pub fn missing_features() -> Vec<&'static str> {
    NEEDED_HELPERS
        .iter()
        .filter(|(ty, id, _)| !ty.is_helper_supported(*id).unwrap_or(false))
        .map(|(_, _, name)| *name)
        .collect()
}

/// Applies a validated policy: the new rule set replaces the old in one step.
pub fn apply(policy: &Policy, cgroup_root: &Path) -> Result<Applied> {
    system::check_privileges()?;
    let missing = missing_features();
    if !missing.is_empty() {
        return Err(Error::Unsupported {
            what: "policy apply",
            detail: format!(
                "this kernel lacks {}, which the policy programs need",
                missing.join(", ")
            ),
        });
    }
    let accel = !policy.accelerate.is_empty();
    if accel {
        accelmaps::kernel_support().map_err(|what| Error::Unsupported {
            what: "accelerate",
            detail: format!("this kernel lacks {what}, which acceleration needs"),
        })?;
    }
    let _lock = lock()?;
    let pins = pins();
    pins.create_dirs()?;
    let mut storage = MaybeUninit::uninit();
    let skel = load_enforcing(&mut storage, &pins, accel)?;
    let mut cfg = read_config(&skel.maps.slp_config)?;
    let next = (cfg.r#gen & 1) ^ 1;
    let tables = compile(policy, next)
        .map_err(|(line, msg)| Error::Usage(format!("{}:{line}: {msg}", policy.file)))?;
    write_generation(&skel, &tables)?;
    accelmaps::write(&skel, next, &policy.accelerate)?;
    let cookies = policy
        .services
        .iter()
        .map(|s| svcmaps::netns_cookie(&s.netns))
        .collect::<Result<Vec<u64>>>()?;
    let m = &skel.maps;
    let svc_maps = svcmaps::SvcMaps {
        svc: &m.slp_svc,
        slots: &m.slp_slots,
        backends: &m.slp_backends,
        info: &m.slp_svc_info,
        counters: &m.slp_svc_counters,
    };
    let cfg_old = cfg.r#gen & 1;
    svcmaps::write(
        &svc_maps,
        next,
        &compile_services(&policy.services, next, &cookies),
    )?;
    let own_netns = svcmaps::netns_cookie(&services::NetnsScope::Applier)?;
    redirect::write(
        &m.slp_redirects,
        &m.slp_redir_counters,
        next,
        &redirect::compile(&policy.redirects, own_netns),
    )?;

    let target = CgroupTarget::open(&cgroup_root.join(policy.attach.rel.trim_start_matches('/')))?;
    let wanted = attached(policy);
    let existing = pins.pinned_links()?;
    let keep = existing.len() == wanted.len()
        && existing
            .iter()
            .all(|(n, l)| wanted.contains(&n.as_str()) && link_cgroup(l) == Some(target.id));
    drop(existing);
    let mut new_links = Vec::new();
    if !keep {
        for name in wanted {
            let prog = skel
                .object()
                .progs_mut()
                .find(|p| p.name() == name)
                .ok_or_else(|| Error::Object {
                    what: format!("program {name}").into(),
                    detail: "missing from object",
                })?;
            new_links.push((name.to_owned(), target.attach(&prog)?));
        }
    }

    if accel {
        accelmaps::attach(&skel, cgroup_root)?;
    }

    // The switch: one update of the config element.
    let n = next as usize;
    cfg.r#gen = next;
    cfg.nscopes[n] = policy.scopes.len() as u32;
    cfg.nrules[n] = policy.rule_count() as u32;
    cfg.attach_cgroup_id = target.id;
    cfg.applied_ns[n] = realtime_ns();
    skel.maps
        .slp_config
        .update(&0u32.to_ne_bytes(), bytes(&cfg), MapFlags::ANY)
        .ctx("switching the policy generation")?;

    if !keep {
        // The new links run the new generation already; drop the old ones.
        pins.detach_links()?;
        pins.pin_links(&mut new_links)?;
    }
    if !accel {
        accelmaps::retire()?;
    }
    // After the flip no connect reaches a removed backend; reset the open ones.
    let term = svcmaps::terminate_keys(&svc_maps, cfg_old, &policy.services);
    let terminated = if term.is_empty() && !services::wants_terminate(&policy.services) {
        None
    } else {
        Some(svcmaps::terminate(&term, &policy.services)?)
    };
    Ok(Applied {
        gen: next,
        scopes: policy.scopes.len(),
        rules: policy.rule_count(),
        cgroups: policy.scopes.iter().map(|s| s.governs.len()).sum(),
        services: policy.services.len(),
        attach: policy.attach.rel.clone(),
        attached_now: !keep,
        terminated,
    })
}

/// Detaches and unpins the policy: every call is allowed again.
pub fn remove() -> Result<bool> {
    system::check_privileges()?;
    let _lock = lock()?;
    let pins = pins();
    let existed = pins.exists();
    pins.remove()?;
    accelmaps::retire()?;
    Ok(existed)
}

/// The pinned maps, opened by path (no programs loaded).
pub struct PinnedMaps {
    pub config: MapHandle,
    pub scopes: MapHandle,
    pub rules: MapHandle,
    pub counters: MapHandle,
    pub scope_of: MapHandle,
    pub events: MapHandle,
    pub lost: MapHandle,
}

impl PinnedMaps {
    /// None when no policy is pinned.
    pub fn open() -> Result<Option<Self>> {
        let pins = pins();
        if !pins.map("slp_config").exists() {
            return Ok(None);
        }
        let open = |name: &str| {
            MapHandle::from_pinned_path(pins.map(name)).map_err(|source| Error::BpfErrno {
                what: format!("opening pinned map {}", pins.map(name).display()).into(),
                source,
            })
        };
        Ok(Some(Self {
            config: open("slp_config")?,
            scopes: open("slp_scopes")?,
            rules: open("slp_rules")?,
            counters: open("slp_counters")?,
            scope_of: open("slp_scope_of")?,
            events: open("slp_events")?,
            lost: open("slp_lost")?,
        }))
    }

    pub fn config(&self) -> Result<slp_config> {
        read_config(&self.config)
    }

    pub fn counter(&self, gen: u32, slot: u32) -> u64 {
        let idx = gen * slp_limit::SLP_COUNTER_SLOTS.0 + slot;
        percpu_sum(&self.counters, idx)
    }

    pub fn scope(&self, gen: u32, i: u32) -> Option<slp_scope_info> {
        let idx = gen * slp_limit::SLP_MAX_SCOPES.0 + i;
        let v = self
            .scopes
            .lookup(&idx.to_ne_bytes(), MapFlags::ANY)
            .ok()??;
        decode(&v)
    }

    pub fn rule(&self, gen: u32, i: u32) -> Option<slp_rule_info> {
        let idx = gen * slp_limit::SLP_MAX_RULES.0 + i;
        let v = self
            .rules
            .lookup(&idx.to_ne_bytes(), MapFlags::ANY)
            .ok()??;
        decode(&v)
    }

    /// Discards what the pinned event buffer queued before we started reading it.
    pub fn drain_events(&self) -> Result<()> {
        let mut b = libbpf_rs::RingBufferBuilder::new();
        let opening = |source| Error::BpfText {
            what: "opening the policy event buffer".into(),
            source,
        };
        b.add(&self.events, |_: &[u8]| 0).map_err(opening)?;
        let rb = b.build().map_err(opening)?;
        rb.consume().map_err(|source| Error::BpfText {
            what: "reading the policy event buffer".into(),
            source,
        })
    }

    /// Records the kernel could not queue on slp_events.
    pub fn lost(&self) -> u64 {
        percpu_sum(&self.lost, 0)
    }
}
