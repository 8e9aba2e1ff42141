//! A live tracing session: validate, probe, plan, load, seed, then hand the
//! live session to a command (`trace`, `conns`, `top`, the agent).

pub mod cgobserve;
pub mod events;
pub mod reorder;
pub mod seed;
pub mod snapshot;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::attach::loader::{self, BufferKind, Filters, LoadOptions, Session};
use crate::attach::plan::{self, Hook, Knobs, Plan, PlanOptions, Tier};
use crate::error::{Error, Result};
use crate::host::cgroup::{self, CgroupPaths};
use crate::host::probe::{self, Prober};
use crate::host::system;
use crate::model::{Conn, ConnEventKind, Event, SockEventKind};
use crate::output::{Clock, Renderer};
use cgobserve::CgHook;
use events::{EventStream, ExtraSource};
use seed::Owners;

pub const POLL: Duration = Duration::from_millis(100);
/// The kernel keeps 15 bytes of a task's comm plus the NUL.
const COMM_MAX: usize = 15;
pub const DEFAULT_MAX_CONNS: u32 = 65_536;

/// What `trace --events` can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TraceEvent {
    Bind,
    Listen,
    /// An outgoing TCP connection got established (connection tracking).
    Established,
    Accept,
    Close,
    Retransmit,
}

impl TraceEvent {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Listen => "listen",
            Self::Established => "established",
            Self::Accept => "accept",
            Self::Close => "close",
            Self::Retransmit => "retransmit",
        }
    }

    /// Connection events come from connection tracking as a whole.
    fn tracks_conns(self) -> bool {
        !matches!(self, Self::Bind | Self::Listen)
    }

    /// Which of these an event is; cgroup hook events are asked for apart.
    pub fn of(event: &Event) -> Option<Self> {
        Some(match event {
            Event::Sock(s) => match s.kind {
                SockEventKind::Bind => Self::Bind,
                SockEventKind::Listen => Self::Listen,
            },
            Event::Conn(c) => match c.kind {
                ConnEventKind::Established => Self::Established,
                ConnEventKind::Accept => Self::Accept,
                ConnEventKind::Close => Self::Close,
                ConnEventKind::Retransmit => Self::Retransmit,
            },
            Event::Cg(_) => return None,
        })
    }
}

/// What the user asked for, before any validation.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    pub events: Vec<TraceEvent>,
    /// cgroup socket hooks, observed by src/bpf/policy.bpf.c.
    pub cg_hooks: Vec<CgHook>,
    /// policy_deny and policy_audit events of the pinned policy.
    pub policy_events: bool,
    /// translate events of the pinned policy (services, redirects).
    pub translate_events: bool,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    pub netns: Option<u32>,
    pub family: Option<u16>,
    pub json: bool,
    /// Columns view: full addresses, rows never cut at the terminal's edge.
    pub wide: bool,
    /// `trace` got no --events: it says so, and how to get the others.
    pub events_defaulted: bool,
    pub force: Option<Tier>,
    pub buffer: Option<BufferKind>,
    pub btf: PathBuf,
    pub max_conns: u32,
    /// Whether connection events are wanted at all (`conns` reads only maps).
    pub conn_events: bool,
    /// Whether UDP traffic is accounted per peer: only for users that read
    /// snapshots (`conns`, `top`, the agent), whose refreshes remove the
    /// flows of closed sockets. `trace` has no UDP events.
    pub udp_flows: bool,
    /// Test knobs (`SOCKLENS_DISABLE`), read once by the command line.
    pub knobs: Knobs,
}

impl TraceRequest {
    fn tracks_conns(&self) -> bool {
        self.events.iter().any(|e| e.tracks_conns())
    }

    /// Hooks left out rather than served by syscall tracepoints, unless
    /// their events are asked for. The accept hook gives an accepted
    /// connection its owner early; without it the owner is the task that
    /// first sends or receives on it. The listen hook adds listeners to the
    /// map; without it snapshots find them with the socket iterator.
    fn optional_hooks(&self) -> Vec<Hook> {
        let wants = |e: TraceEvent| self.events.contains(&e);
        let mut optional = Vec::new();
        if !(self.conn_events && wants(TraceEvent::Accept)) {
            optional.push(Hook::Accept);
        }
        if !wants(TraceEvent::Listen) {
            optional.push(Hook::Listen);
        }
        optional
    }

    /// The logical hooks behind the requested events.
    pub fn hooks(&self) -> Vec<Hook> {
        let mut hooks: Vec<Hook> = Vec::new();
        for e in &self.events {
            match e {
                TraceEvent::Bind => hooks.push(Hook::Bind),
                TraceEvent::Listen => hooks.push(Hook::Listen),
                _ => hooks.extend(Hook::CONNS),
            }
        }
        hooks.sort();
        hooks.dedup();
        hooks
    }
}

/// Checks everything the user typed before touching the system.
fn validate(req: &TraceRequest) -> Result<Filters> {
    if req.events.is_empty()
        && req.cg_hooks.is_empty()
        && !req.policy_events
        && !req.translate_events
    {
        return Err(Error::Usage("--events names no event".into()));
    }
    if let Some(pid) = req.pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(Error::Usage(format!("--pid {pid}: no such process")));
        }
    }
    if let Some(comm) = &req.comm {
        if comm.is_empty() || comm.len() > COMM_MAX {
            return Err(Error::Usage(format!(
                "--comm '{comm}': a command name is 1 to {COMM_MAX} bytes (the kernel truncates longer ones)"
            )));
        }
    }
    let cgroup = match &req.cgroup {
        None => None,
        Some(given) => {
            let root = system::cgroup2_root().ok_or_else(|| {
                Error::Usage("--cgroup: cgroup v2 is not mounted on this host".into())
            })?;
            Some(
                cgroup::resolve(&root, given)
                    .map_err(|why| Error::Usage(format!("--cgroup '{given}': {why}")))?,
            )
        }
    };
    Ok(Filters {
        pid: req.pid,
        comm: req.comm.clone(),
        netns: req.netns,
        family: req.family,
        cgroup,
    })
}

/// Everything decided before loading.
pub struct Prepared {
    pub filters: Filters,
    pub plan: Plan,
    pub buffer: BufferKind,
}

/// Validates, checks the host and works out the plan, without loading anything.
pub fn prepare(req: &TraceRequest) -> Result<Prepared> {
    let filters = validate(req)?;
    system::check_privileges()?;
    system::check_btf(&req.btf)?;
    let tracefs = system::ensure_tracefs()?;
    let prober = Prober::new(&tracefs.path, &req.btf, &plan::requirements(&Hook::ALL));
    let hooks = req.hooks();
    // A forced tier is planned from its own requirements alone: probing the
    // others (trial loads and attaches) would only cost time, seconds per
    // start under QEMU TCG (the kernel matrix starts socklens ~30 times a cell).
    let reqs: std::collections::BTreeSet<_> = match req.force {
        None => plan::requirements(&hooks),
        Some(tier) => hooks
            .iter()
            .flat_map(|h| h.tiers())
            .filter(|spec| spec.tier == tier)
            .flat_map(|spec| spec.requires.iter().copied())
            .chain(plan::psock_requirements(&hooks, Some(tier)))
            .collect(),
    };
    let caps = prober.probe(&reqs);
    let plan = plan::plan(
        &caps,
        &PlanOptions {
            hooks,
            force: req.force,
            optional: req.optional_hooks(),
            knobs: req.knobs.clone(),
            shape: prober.kernel_shape(),
            track_conns: req.tracks_conns(),
            udp_flows: req.udp_flows,
        },
    )?;
    let buffer = match req.buffer {
        Some(b) => b,
        None if probe::ringbuf_supported() => BufferKind::Ring,
        None => BufferKind::Perf,
    };
    Ok(Prepared {
        filters,
        plan,
        buffer,
    })
}

fn custom_btf(path: &Path) -> Option<PathBuf> {
    (path != Path::new(system::DEFAULT_BTF)).then(|| path.to_owned())
}

fn describe(plan: &Plan, buffer: BufferKind) -> String {
    let hooks: Vec<String> = plan
        .hooks
        .iter()
        .map(|h| format!("{}: {}", h.hook, h.tier))
        .chain(plan.skipped.iter().map(|(hook, _)| format!("{hook}: off")))
        .collect();
    let buf = match buffer {
        BufferKind::Ring => "ring buffer",
        BufferKind::Perf => "perf buffer",
    };
    format!("{}; {buf}", hooks.join(", "))
}

/// A loaded, attached session handed to a command.
pub struct Live<'a> {
    pub session: &'a Session<'a>,
    pub stream: &'a EventStream<'a>,
    pub plan: &'a Plan,
    pub renderer: Renderer,
    pub owners: Owners,
    pub filters: &'a Filters,
    /// `--cgroup` as a path under the v2 root, for filtering policy verdicts.
    pub cgroup_rel: Option<String>,
}

impl Live<'_> {
    /// Completes a connection the kernel side knew no owner for, and says
    /// whether it passes the task filters (which the kernel could not apply).
    pub fn settle(&mut self, conn: &mut Conn) -> bool {
        let had_owner = conn.owner_known;
        self.owners.adopt(conn);
        had_owner || self.owner_wanted(conn)
    }

    fn owner_wanted(&mut self, conn: &Conn) -> bool {
        let f = self.filters;
        if f.pid.is_none() && f.comm.is_none() && f.cgroup.is_none() {
            return true;
        }
        if !conn.owner_known {
            return false;
        }
        if f.pid.is_some_and(|p| p != conn.pid) || f.comm.as_ref().is_some_and(|c| *c != conn.comm)
        {
            return false;
        }
        match (&f.cgroup, system::cgroup2_root()) {
            (Some(dir), Some(root)) => {
                let want = dir.strip_prefix(&root).map(|p| format!("/{}", p.display()));
                let have = self
                    .renderer
                    .cgroups
                    .as_mut()
                    .and_then(|c| c.path_of(conn.cgroup_id));
                match (want, have) {
                    (Ok(w), Some(h)) => h == w || h.starts_with(&format!("{w}/")),
                    _ => false,
                }
            }
            _ => true,
        }
    }
}

/// Loads and attaches what `req` needs, seeds existing connections, then runs
/// `body` with the live session. Everything is detached when it returns.
pub fn with_session<T>(
    req: &TraceRequest,
    body: impl FnOnce(&mut Live<'_>) -> Result<T>,
) -> Result<T> {
    let prepared = prepare(req)?;
    let mut storage = MaybeUninit::uninit();
    let session = loader::load(
        &mut storage,
        &LoadOptions {
            plan: &prepared.plan,
            filters: &prepared.filters,
            buffer: prepared.buffer,
            max_conns: req.tracks_conns().then_some(req.max_conns),
            conn_events: req.conn_events,
            udp_flows: req.udp_flows,
            btf: custom_btf(&req.btf),
        },
    )?;
    let mut cg_storage = MaybeUninit::uninit();
    let cg_session = if req.cg_hooks.is_empty() {
        None
    } else {
        let at = match &prepared.filters.cgroup {
            Some(dir) => dir.clone(),
            None => system::cgroup2_root()
                .ok_or_else(|| Error::Usage("cgroup v2 is not mounted on this host".into()))?,
        };
        Some(cgobserve::load(
            &mut cg_storage,
            &req.cg_hooks,
            &prepared.filters,
            &at,
        )?)
    };
    let pinned = if req.policy_events || req.translate_events {
        let name = if req.policy_events {
            "policy"
        } else {
            "translate"
        };
        let maps = crate::policy::state::PinnedMaps::open()?.ok_or_else(|| {
            Error::Usage(format!(
                "--events {name}: no policy is applied (socklens policy apply)"
            ))
        })?;
        maps.drain_events()?;
        Some(maps)
    } else {
        None
    };
    let mut extras = Vec::new();
    if let Some(cg) = &cg_session {
        extras.push(ExtraSource {
            map: &cg.skel.maps.slp_events,
            decode: crate::model::decode_cg,
            lost: Box::new(|| crate::skel::percpu_sum(&cg.skel.maps.slp_lost, 0)),
        });
    }
    if let Some(maps) = &pinned {
        extras.push(ExtraSource {
            map: &maps.events,
            decode: crate::model::decode_cg,
            lost: Box::new(|| 0),
        });
    }
    let stream = EventStream::open_with(&session, extras)?;
    if req.tracks_conns() {
        // After attach, so nothing opened meanwhile is missed; the iterators
        // skip sockets the live hooks already track.
        seed::seed(&session, true)?;
    }
    let cgroup2 = system::cgroup2_root();
    let cgroup_rel = prepared.filters.cgroup.as_ref().and_then(|dir| {
        let rel = dir.strip_prefix(cgroup2.as_ref()?).ok()?;
        Some(format!("/{}", rel.display()))
    });
    let mut live = Live {
        session: &session,
        stream: &stream,
        plan: &prepared.plan,
        renderer: Renderer {
            clock: Clock::now(),
            cgroups: cgroup2.clone().map(CgroupPaths::new),
            json: req.json,
            layout: crate::output::columns::Layout::for_stdout(req.wide),
            missed_runs: false,
        },
        owners: Owners::new(cgroup2),
        filters: &prepared.filters,
        cgroup_rel,
    };
    let mut what = describe(&prepared.plan, prepared.buffer);
    if let Some(cg) = &cg_session {
        let names: Vec<&str> = req.cg_hooks.iter().map(|h| h.name()).collect();
        what = format!(
            "{what}; {}: cgroup hooks at {}",
            names.join(", "),
            cg.attached_at
        );
    }
    if req.policy_events {
        what = format!("{what}; policy verdicts of the pinned policy");
    }
    // The leases first: what happens after the ready line is recorded.
    let translate = req.translate_events;
    let accel = session.setting(|ro| ro.accel_join);
    renew_leases(translate, accel)?;
    if translate {
        eprintln!("socklens: tracing {what}; translations of the pinned policy. Ctrl-C to stop.");
    } else {
        eprintln!("socklens: tracing {what}. Ctrl-C to stop.");
    }
    if !translate && !accel {
        return body(&mut live);
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(LEASE / 4);
                // A failed renewal ends the lease within LEASE; nothing to report.
                let _ = renew_leases(translate, accel);
            }
        });
        let r = body(&mut live);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

/// How long the policy programs emit translate records after a renewal.
const LEASE: Duration = Duration::from_secs(1);

/// Renews the leases the session holds: translate records of the pinned policy,
/// and sk_msg's counts, whose closed pairs' entries then stay for its close
/// records (docs/accelerate.md, "Accounting"). Both are tried.
fn renew_leases(translate: bool, accel: bool) -> Result<()> {
    let until = reorder::monotonic_ns() + LEASE.as_nanos() as u64;
    let t = if translate {
        crate::policy::svcmaps::watch_translations(until)
    } else {
        Ok(())
    };
    let a = if accel {
        crate::policy::accelmaps::lease_reader(until)
    } else {
        Ok(())
    };
    t.and(a)
}

/// Whether a record of the pinned policy (a verdict, a translation) was asked
/// for and passes the trace filters. The pinned policy's programs emit every
/// one; the observer programs filter in the kernel, so every other event passes.
pub fn verdict_wanted(
    event: &Event,
    req: &TraceRequest,
    f: &Filters,
    cgroup_rel: Option<&str>,
    r: &mut Renderer,
) -> bool {
    let Event::Cg(e) = event else {
        return true;
    };
    if e.is_verdict() {
        if !req.policy_events {
            return false;
        }
    } else if e.is_translate() {
        if !req.translate_events {
            return false;
        }
    } else {
        return true;
    }
    if f.pid.is_some_and(|p| p != e.pid)
        || f.comm.as_ref().is_some_and(|c| *c != e.comm)
        || f.netns.is_some_and(|n| n != e.netns)
        || f.family.is_some_and(|fam| fam != e.family)
    {
        return false;
    }
    match cgroup_rel {
        None => true,
        Some(rel) => r
            .cgroups
            .as_mut()
            .and_then(|c| c.path_of(e.cgroup_id))
            .is_some_and(|p| rel == "/" || p == rel || p.starts_with(&format!("{rel}/"))),
    }
}
