//! Opens the skeleton, applies the plan and the filters, loads and attaches.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, MapType, OpenObject, ProgramType};

use crate::attach::cgroup_attach::{Pins, POLICY};
use crate::attach::plan::{Plan, Program};
use crate::error::{Context, Error, Result};
use crate::skel::{SocklensSkel, SocklensSkelBuilder};

/// In-kernel filters; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub netns: Option<u32>,
    /// AF_INET or AF_INET6.
    pub family: Option<u16>,
    /// A cgroup v2 directory; its descendants match too.
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    Ring,
    Perf,
}

pub struct LoadOptions<'a> {
    pub plan: &'a Plan,
    pub filters: &'a Filters,
    pub buffer: BufferKind,
    /// Track connections, in maps of this many entries (TCP and UDP each).
    pub max_conns: Option<u32>,
    /// Send connect/accept/close/retransmit records (off when only the maps are read).
    pub conn_events: bool,
    /// Account UDP traffic per (socket, peer) too.
    pub udp_flows: bool,
    /// BTF for CO-RE relocation when not the running kernel's default.
    pub btf: Option<PathBuf>,
}

/// Loaded programs and their links; dropping it detaches and unloads everything.
pub struct Session<'obj> {
    pub skel: SocklensSkel<'obj>,
    pub buffer: BufferKind,
    _links: Vec<Link>,
}

impl Session<'_> {
    /// A read-only setting of the loaded object (false if it has none).
    pub fn setting(&self, f: impl Fn(&crate::skel::types::rodata) -> bool) -> bool {
        self.skel.maps.rodata_data.as_ref().is_some_and(|ro| f(ro))
    }

    /// Runs the kernel skipped at the kprobe layer: a kprobe hit while
    /// another kprobe's handler runs on the same CPU (a softirq nested in a
    /// handler) is dropped before any BPF program, so the programs'
    /// recursion_misses never see it. The kernel reports these per link
    /// (6.7+; 0 before).
    pub fn kprobe_misses(&self) -> u64 {
        self._links
            .iter()
            .filter_map(|link| {
                libbpf_rs::query::LinkInfo::from_fd(std::os::fd::AsFd::as_fd(link)).ok()
            })
            .map(|info| match info.info {
                libbpf_rs::query::LinkTypeInfo::PerfEvent(pe) => match pe.event_type {
                    libbpf_rs::query::PerfEventType::Kprobe { missed, .. } => missed,
                    _ => 0,
                },
                libbpf_rs::query::LinkTypeInfo::KprobeMulti(km) => km.missed,
                _ => 0,
            })
            .sum()
    }
}

pub fn load<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    opts: &LoadOptions<'_>,
) -> Result<Session<'obj>> {
    let mut builder = SocklensSkelBuilder::default();
    if let Some(btf) = &opts.btf {
        builder
            .obj_builder
            .btf_custom_path(btf)
            .ctx("using custom BTF")?;
    }
    let mut open = builder.open(storage).ctx("opening BPF object")?;
    write_filters(&mut open, opts)?;
    if opts.buffer == BufferKind::Perf {
        let events = &mut open.maps.events;
        events.set_type(MapType::PerfEventArray).ctx("events map")?;
        events.set_key_size(4).ctx("events map")?;
        events.set_value_size(4).ctx("events map")?;
        // libbpf sizes a perf event array with 0 entries to the CPU count.
        events.set_max_entries(0).ctx("events map")?;
    }
    // Maps are created whether used or not, and hash maps are preallocated:
    // keep unused ones at one entry.
    let entries = opts.max_conns.unwrap_or(1);
    open.maps.conns.set_max_entries(entries).ctx("conns map")?;
    open.maps
        .reported
        .set_max_entries(entries)
        .ctx("reported map")?;
    open.maps
        .udp_flows
        .set_max_entries(if opts.udp_flows { entries } else { 1 })
        .ctx("udp_flows map")?;
    if opts.max_conns.is_none() {
        open.maps
            .seeded_waiting
            .set_max_entries(1)
            .ctx("seeded_waiting map")?;
    }
    // Keeps the pinned map open until load has taken its own reference.
    let _xlate = join_steering(&mut open)?;
    let _accel = join_accel_bytes(&mut open)?;
    let wanted = opts.plan.names();
    for mut prog in open.open_object_mut().progs_mut() {
        let keep = prog.name().to_str().is_some_and(|n| wanted.contains(n));
        prog.set_autoload(keep);
    }
    let skel = open.load().ctx("loading BPF programs")?;
    if let Some(dir) = &opts.filters.cgroup {
        let cg = File::open(dir).ctx(format!("opening {}", dir.display()))?;
        let fd = u32::try_from(cg.as_raw_fd()).unwrap_or_default();
        skel.maps
            .cgroup_filter
            .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .ctx("setting the cgroup filter")?;
    }
    let links = attach(&skel, opts.plan)?;
    Ok(Session {
        skel,
        buffer: opts.buffer,
        _links: links,
    })
}

/// When a policy is applied, its per-socket translation state becomes the
/// tracing programs' `slp_xlate`, so connection records name the service or
/// redirected address they were opened to (conn.bpf.h, conn_steer). Without
/// one, the object keeps its own empty map and the lookup is compiled out.
fn join_steering(open: &mut crate::skel::OpenSocklensSkel<'_>) -> Result<Option<MapHandle>> {
    let map = join_pinned(&mut open.maps.slp_xlate, Pins::new(POLICY).map("slp_xlate"))?;
    if let (Some(_), Some(ro)) = (&map, open.maps.rodata_data.as_deref_mut()) {
        ro.steer_join = true;
    }
    Ok(map)
}

/// Likewise sk_msg's counts of accelerated bytes (`slp_accel_bytes`), which
/// replace per-call counts that a skipped run can lose (conn.bpf.h,
/// tcp_accel_exact).
fn join_accel_bytes(open: &mut crate::skel::OpenSocklensSkel<'_>) -> Result<Option<MapHandle>> {
    let map = join_pinned(
        &mut open.maps.slp_accel_bytes,
        crate::policy::accelmaps::pins().map(crate::policy::accelmaps::BYTES),
    )?;
    if let (Some(_), Some(ro)) = (&map, open.maps.rodata_data.as_deref_mut()) {
        ro.accel_join = true;
    }
    Ok(map)
}

/// The pinned map at `path`, if any, as the object's `map`.
fn join_pinned(map: &mut libbpf_rs::OpenMapMut<'_>, path: PathBuf) -> Result<Option<MapHandle>> {
    if !path.exists() {
        return Ok(None);
    }
    let pinned = MapHandle::from_pinned_path(&path).map_err(|source| Error::BpfErrno {
        what: format!("opening pinned map {}", path.display()).into(),
        source,
    })?;
    map.reuse_fd(pinned.as_fd())
        .ctx(format!("joining {}", path.display()))?;
    Ok(Some(pinned))
}

fn write_filters(
    open: &mut crate::skel::OpenSocklensSkel<'_>,
    opts: &LoadOptions<'_>,
) -> Result<()> {
    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or_else(|| Error::Object {
            what: "opening BPF object".into(),
            detail: "no .rodata section",
        })?;
    let f = opts.filters;
    ro.filter_pid = f.pid.unwrap_or(0);
    ro.filter_netns = f.netns.unwrap_or(0);
    ro.filter_family = f.family.unwrap_or(0);
    ro.filter_cgroup = f.cgroup.is_some();
    if let Some(comm) = &f.comm {
        ro.filter_comm = true;
        let n = comm.len().min(ro.filter_comm_value.len() - 1);
        ro.filter_comm_value[..n].copy_from_slice(&comm.as_bytes()[..n]);
    }
    ro.use_ringbuf = opts.buffer == BufferKind::Ring;
    ro.track_conns = opts.max_conns.is_some();
    ro.conn_events = opts.conn_events;
    ro.track_udp = opts.udp_flows;
    ro.sendfile_adds_tx = opts.plan.sendfile_adds_tx;
    ro.recvmsg_has_nonblock = opts.plan.shape.recvmsg_has_nonblock;
    ro.sendfile_in_send_len = opts.plan.sendfile_in_send_len;
    ro.tcp_bytes_from_seq = ro.track_conns && opts.plan.tcp_bytes_from_seq;
    ro.tracing_has_cookie_helper = opts.plan.shape.tracing_cookie_helper;
    ro.state_skips_close = opts.plan.state_skips_close;
    ro.state_skips_start = opts.plan.state_skips_start;
    ro.udp_sends_skipped = opts.plan.udp_sends_skipped;
    ro.conn_hooks_blind = opts.plan.conn_hooks_blind;
    ro.accel_calls_blind = opts.plan.accel_calls_blind;
    Ok(())
}

/// cgroup sock_addr programs that only observe (UDP peers for the tracepoint
/// tier) go at the cgroup v2 root, through a bpf_link: multi-attach, so they
/// run beside whatever else is attached there and judge nothing.
fn attach_at_cgroup_root(prog: &libbpf_rs::ProgramMut<'_>) -> libbpf_rs::Result<Link> {
    let root = crate::host::system::cgroup2_root().ok_or_else(|| {
        libbpf_rs::Error::from(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no cgroup2 mount",
        ))
    })?;
    let dir = File::open(&root).map_err(libbpf_rs::Error::from)?;
    prog.attach_cgroup(dir.as_raw_fd())
}

/// Attaches the plan's programs one by one, so a failure names its hook.
fn attach(skel: &SocklensSkel<'_>, plan: &Plan) -> Result<Vec<Link>> {
    plan.programs
        .iter()
        .filter(|p| p.hook.is_some())
        .map(|p| attach_named(skel, p))
        .collect()
}

fn attach_program(prog: &libbpf_rs::ProgramMut<'_>) -> libbpf_rs::Result<Link> {
    match prog.prog_type() {
        ProgramType::CgroupSockAddr | ProgramType::CgroupSock => attach_at_cgroup_root(prog),
        _ => prog.attach(),
    }
}

/// Attaches one program; the error names its hook and tier.
fn attach_named(skel: &SocklensSkel<'_>, p: &Program) -> Result<Link> {
    let hook = p.hook.map_or("", |h| h.name());
    let tier = p.tier.map(|t| format!("{t} ")).unwrap_or_default();
    let name = p.name;
    let prog = skel
        .object()
        .progs_mut()
        .find(|prog| prog.name() == name)
        .ok_or_else(|| Error::Object {
            what: format!("{hook}: program {name}").into(),
            detail: "missing from object",
        })?;
    attach_program(&prog).ctx(format!("{hook}: attaching {tier}program {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::plan::{matrix, shaped, Hook, SEED_PROGRAMS};
    use crate::host::probe::KernelShape;

    /// Names in src/attach/plan.rs and `shaped` must match programs in the object.
    #[test]
    fn every_planned_program_exists_in_the_object() {
        let mut storage = MaybeUninit::uninit();
        let mut open = SocklensSkelBuilder::default().open(&mut storage).unwrap();
        let names: Vec<String> = open
            .open_object_mut()
            .progs_mut()
            .map(|p| p.name().to_string_lossy().into_owned())
            .collect();
        let shapes = [
            KernelShape::default(),
            KernelShape {
                recvmsg_has_nonblock: true,
                accept_has_flags: true,
                sendfile_bypasses_sendmsg: true,
                recvmsg_lacks_addr_len: false,
                tracing_cookie_helper: true,
                btf_casts: false,
            },
            KernelShape {
                recvmsg_lacks_addr_len: true,
                btf_casts: true,
                ..KernelShape::default()
            },
        ];
        for hook in Hook::ALL {
            for spec in hook.tiers() {
                for shape in shapes {
                    for p in spec.programs.iter().filter_map(|p| shaped(p, shape)) {
                        assert!(
                            names.iter().any(|n| n == p),
                            "{hook}/{}: no program {p}",
                            spec.tier
                        );
                    }
                }
            }
        }
        for p in SEED_PROGRAMS {
            assert!(names.iter().any(|n| n == p), "no program {p}");
        }
        for (cell, plan) in matrix::plans() {
            for p in &plan.programs {
                assert!(
                    names.iter().any(|n| n == p.name),
                    "{cell}: no program {}",
                    p.name
                );
            }
        }
    }
}
