//! Opens the skeleton, applies the plan and the filters, loads and attaches.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapType, OpenObject, ProgramType};

use crate::error::{Error, Result};
use crate::plan::{uses_program, Hook, HookPlan, Plan};
use crate::probe::{errno_name, KernelShape};
use crate::skel::{SocklensSkel, SocklensSkelBuilder};

/// Socket iterators that seed connections which existed before start; they
/// need no attach tier (src/conns.rs runs them).
pub const SEED_TCP: &str = "sl_seed_tcp";
pub const SEED_UDP: &str = "sl_seed_udp";
pub const SEED_PROGRAMS: [&str; 2] = [SEED_TCP, SEED_UDP];

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
    pub shape: KernelShape,
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

fn load_err(what: &str) -> impl Fn(libbpf_rs::Error) -> Error + '_ {
    move |e| Error::kernel(what, format!("{} ({e})", errno_name(&e)))
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
            .map_err(load_err("using custom BTF"))?;
    }
    let mut open = builder
        .open(storage)
        .map_err(load_err("opening BPF object"))?;
    write_filters(&mut open, opts)?;
    if opts.buffer == BufferKind::Perf {
        let events = &mut open.maps.events;
        events
            .set_type(MapType::PerfEventArray)
            .map_err(load_err("events map"))?;
        events.set_key_size(4).map_err(load_err("events map"))?;
        events.set_value_size(4).map_err(load_err("events map"))?;
        // libbpf sizes a perf event array with 0 entries to the CPU count.
        events.set_max_entries(0).map_err(load_err("events map"))?;
    }
    // Maps are created whether used or not, and hash maps are preallocated:
    // keep unused ones at one entry.
    let entries = opts.max_conns.unwrap_or(1);
    open.maps
        .conns
        .set_max_entries(entries)
        .map_err(load_err("conns map"))?;
    open.maps
        .udp_flows
        .set_max_entries(if opts.udp_flows { entries } else { 1 })
        .map_err(load_err("udp_flows map"))?;
    if opts.max_conns.is_none() {
        open.maps
            .seeded_waiting
            .set_max_entries(1)
            .map_err(load_err("seeded_waiting map"))?;
    }
    let mut wanted: std::collections::BTreeSet<&str> = opts
        .plan
        .programs()
        .into_iter()
        .filter_map(|p| shaped(p, opts.shape))
        .collect();
    if opts.max_conns.is_some() {
        // The UDP iterator runs only where UDP is tracked (src/conns.rs, seed).
        wanted.insert(SEED_TCP);
        if opts.udp_flows {
            wanted.insert(SEED_UDP);
        }
    }
    if sendfile_in_send_len(opts.plan) {
        wanted.remove(SENDFILE_LEN);
    }
    let udp_release = udp_release_program(opts);
    wanted.extend(udp_release);
    for mut prog in open.open_object_mut().progs_mut() {
        let keep = prog.name().to_str().is_some_and(|n| wanted.contains(n));
        prog.set_autoload(keep);
    }
    let skel = open.load().map_err(load_err("loading BPF programs"))?;
    if let Some(dir) = &opts.filters.cgroup {
        let cg =
            File::open(dir).map_err(|e| Error::kernel(format!("opening {}", dir.display()), e))?;
        let fd = u32::try_from(cg.as_raw_fd()).unwrap_or_default();
        skel.maps
            .cgroup_filter
            .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(load_err("setting the cgroup filter"))?;
    }
    let mut links = attach(&skel, opts.plan, opts.shape)?;
    if let Some(name) = udp_release {
        links.push(attach_named(&skel, name, Hook::Send.name(), "")?);
    }
    Ok(Session {
        skel,
        buffer: opts.buffer,
        _links: links,
    })
}

fn write_filters(
    open: &mut crate::skel::OpenSocklensSkel<'_>,
    opts: &LoadOptions<'_>,
) -> Result<()> {
    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or_else(|| Error::kernel("opening BPF object", "no .rodata section"))?;
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
    // The send hook misses sendfile data on tcp_sendpage kernels, and when it
    // counts send syscalls rather than sock_sendmsg.
    ro.sendfile_adds_tx = opts.shape.sendfile_bypasses_sendmsg
        || opts
            .plan
            .hooks
            .iter()
            .any(|h| h.hook == Hook::Send && h.via_syscalls());
    ro.recvmsg_has_nonblock = opts.shape.recvmsg_has_nonblock;
    ro.sendfile_in_send_len = sendfile_in_send_len(opts.plan);
    ro.tcp_bytes_from_seq = ro.track_conns && tcp_bytes_from_seq(&opts.plan.hooks);
    ro.tracing_has_cookie_helper = opts.shape.tracing_cookie_helper;
    ro.state_skips_close = crate::probe::state_close_disabled();
    ro.state_skips_start = crate::probe::state_start_disabled();
    Ok(())
}

const SEND_LEN: &str = "sl_tp_send_len";
const SENDFILE_LEN: &str = "sl_tp_sendfile_len";
const UDP_RELEASE: &str = "sl_cg_sock_release";

/// The tracepoint tier has no tracepoint where a UDP socket ends; a cgroup
/// sock_release program at the cgroup v2 root sees every inet socket's
/// release. Without cgroup v2, snapshot refreshes remove ended UDP sockets.
fn udp_release_program(opts: &LoadOptions<'_>) -> Option<&'static str> {
    let send_by_tracepoint = opts.plan.tier_of(Hook::Send) == Some(crate::plan::Tier::Tracepoint);
    (opts.udp_flows && send_by_tracepoint && crate::system::cgroup2_root().is_some())
        .then_some(UDP_RELEASE)
}

/// Both the send and the sendfile hook on sock:sock_send_length: the send
/// program does the sendfile check too, and the sendfile program stays out
/// (two programs on one tracepoint cost a second dispatch on every send).
fn sendfile_in_send_len(plan: &Plan) -> bool {
    uses_program(&plan.hooks, Hook::Send, SEND_LEN)
        && uses_program(&plan.hooks, Hook::Sendfile, SENDFILE_LEN)
}

/// The TCP byte method these plans get (src/bpf/conn.bpf.h): the planner's
/// choice, unless the `tcp_seq` test knob asks for per-call counting.
pub fn tcp_bytes_from_seq(hooks: &[HookPlan]) -> bool {
    crate::plan::tcp_bytes_from_seq(hooks) && !crate::probe::tcp_seq_disabled()
}

/// The variant of a program written for this kernel's function signatures;
/// None where this kernel needs no such program: with BTF casts the bind and
/// listen exits read the syscall's arguments from the saved registers, so
/// no syscall entry tracepoint is enabled for them (each one enabled costs
/// every syscall of every task). The `_cast` and `_btf` variants load only
/// where the kernel has BTF casts.
pub fn shaped(program: &'static str, shape: KernelShape) -> Option<&'static str> {
    Some(match program {
        "sl_tp_bind_enter" | "sl_tp_listen_enter" if shape.btf_casts => return None,
        "sl_fx_accept" if shape.accept_has_flags => "sl_fx_accept_old",
        "sl_tp_accept4_exit" if shape.btf_casts => "sl_tp_accept4_exit_btf",
        "sl_tp_accept_exit" if shape.btf_casts => "sl_tp_accept_exit_btf",
        "sl_tp_bind_exit" if shape.btf_casts => "sl_tp_bind_exit_btf",
        "sl_tp_listen_exit" if shape.btf_casts => "sl_tp_listen_exit_btf",
        "sl_tp_set_state" if shape.btf_casts => "sl_tp_set_state_cast",
        "sl_tp_tcp_destroy" if shape.btf_casts => "sl_tp_tcp_destroy_cast",
        "sl_fe_tcp_set_state" if shape.btf_casts => "sl_fe_tcp_set_state_cast",
        "sl_fe_tcp_destroy" if shape.btf_casts => "sl_fe_tcp_destroy_cast",
        "sl_fx_tcp_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_tcp_recvmsg_nb",
        "sl_fx_udp_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_udp_recvmsg_nb",
        "sl_fx_udp6_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_udp6_recvmsg_nb",
        "sl_fx_tcp_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_tcp_recvmsg_na",
        "sl_fx_udp_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_udp_recvmsg_na",
        "sl_fx_udp6_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_udp6_recvmsg_na",
        other => other,
    })
}

/// cgroup sock_addr programs that only observe (UDP peers for the tracepoint
/// tier) go at the cgroup v2 root, through a bpf_link: multi-attach, so they
/// run beside whatever else is attached there and judge nothing.
fn attach_at_cgroup_root(prog: &libbpf_rs::ProgramMut<'_>) -> libbpf_rs::Result<Link> {
    let root = crate::system::cgroup2_root().ok_or_else(|| {
        libbpf_rs::Error::from(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no cgroup2 mount",
        ))
    })?;
    let dir = File::open(&root).map_err(libbpf_rs::Error::from)?;
    prog.attach_cgroup(dir.as_raw_fd())
}

/// Attaches the plan's programs one by one, so a failure names its hook.
fn attach(skel: &SocklensSkel<'_>, plan: &Plan, shape: KernelShape) -> Result<Vec<Link>> {
    let mut links = Vec::new();
    let merged = sendfile_in_send_len(plan);
    for hook in &plan.hooks {
        for name in hook.programs().iter().filter_map(|p| shaped(p, shape)) {
            if merged && name == SENDFILE_LEN {
                continue;
            }
            links.push(attach_named(
                skel,
                name,
                hook.hook.name(),
                &format!("{} ", hook.tier),
            )?);
        }
    }
    Ok(links)
}

fn attach_program(prog: &libbpf_rs::ProgramMut<'_>) -> libbpf_rs::Result<Link> {
    match prog.prog_type() {
        ProgramType::CgroupSockAddr | ProgramType::CgroupSock => attach_at_cgroup_root(prog),
        _ => prog.attach(),
    }
}

/// Attaches program `name` of `hook`; `tier` ("fentry ", or "" for a
/// program outside the plan) is for the error.
fn attach_named(skel: &SocklensSkel<'_>, name: &str, hook: &str, tier: &str) -> Result<Link> {
    let prog = skel
        .object()
        .progs_mut()
        .find(|p| p.name() == name)
        .ok_or_else(|| Error::kernel(format!("{hook}: program {name}"), "missing from object"))?;
    attach_program(&prog).map_err(|e| {
        Error::kernel(
            format!("{hook}: attaching {tier}program {name}"),
            format!("{} ({e})", errno_name(&e)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Tier;

    /// Names in src/plan.rs and `shaped` must match programs in the object.
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
    }

    /// With BTF casts no syscall entry program is needed: the exits read
    /// the arguments themselves.
    #[test]
    fn btf_casts_leave_no_syscall_entry_program() {
        let casts = KernelShape {
            btf_casts: true,
            ..KernelShape::default()
        };
        for hook in [Hook::Bind, Hook::Listen] {
            for spec in hook.tiers() {
                let entries: Vec<&str> = spec
                    .programs
                    .iter()
                    .filter_map(|p| shaped(p, casts))
                    .filter(|p| p.ends_with("_enter"))
                    .collect();
                assert!(entries.is_empty(), "{hook}: {entries:?}");
            }
        }
        assert_eq!(
            shaped("sl_tp_bind_enter", KernelShape::default()),
            Some("sl_tp_bind_enter")
        );
    }

    /// The state and destroy hooks of the fentry and tracepoint tiers load
    /// their `_cast` variants exactly where the kernel has BTF casts (the
    /// variants call bpf_rdonly_cast, which older kernels refuse).
    #[test]
    fn state_and_destroy_cast_only_with_btf_casts() {
        let casts = KernelShape {
            btf_casts: true,
            ..KernelShape::default()
        };
        for tier in [Tier::Fentry, Tier::Tracepoint] {
            let spec = Hook::State
                .tiers()
                .iter()
                .find(|s| s.tier == tier)
                .expect("state tier");
            for p in spec.programs {
                assert_eq!(shaped(p, KernelShape::default()), Some(*p));
                let cast = shaped(p, casts).expect("a program");
                assert_eq!(cast, format!("{p}_cast"), "{tier}");
            }
        }
    }
}
