//! `socklens trace`: validate, probe, plan, load, stream events until stopped.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::cgevents::{self, CgHook};
use crate::cgroup::{self, CgroupPaths};
use crate::error::{Error, Result};
use crate::events::{EventStream, ExtraSource, Losses};
use crate::loader::{self, BufferKind, Filters, LoadOptions};
use crate::output::{Clock, Renderer};
use crate::plan::{self, Hook, Plan, PlanOptions, Tier};
use crate::probe::{self, Prober};
use crate::system;

const POLL: Duration = Duration::from_millis(100);
/// The kernel keeps 15 bytes of a task's comm plus the NUL.
const COMM_MAX: usize = 15;

/// What the user asked `trace` for, before any validation.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    pub hooks: Vec<Hook>,
    /// cgroup socket hooks, observed by src/bpf/policy.bpf.c.
    pub cg_hooks: Vec<CgHook>,
    /// policy_deny and policy_audit events of the pinned policy.
    pub policy_events: bool,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    pub netns: Option<u32>,
    pub family: Option<u16>,
    pub json: bool,
    pub force: Option<Tier>,
    pub buffer: Option<BufferKind>,
    pub btf: PathBuf,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub events: u64,
    pub losses: Losses,
}

/// Checks everything the user typed before touching the system.
fn validate(req: &TraceRequest) -> Result<Filters> {
    if req.hooks.is_empty() && req.cg_hooks.is_empty() && !req.policy_events {
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
            Some(cgroup::resolve(&root, given).ok_or_else(|| {
                Error::Usage(format!(
                    "--cgroup '{given}': no such cgroup under {}",
                    root.display()
                ))
            })?)
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

/// Validates, checks the host and works out the plan, without loading anything.
pub fn prepare(req: &TraceRequest) -> Result<(Filters, Plan, BufferKind)> {
    let filters = validate(req)?;
    system::check_privileges()?;
    system::check_btf(&req.btf)?;
    let tracefs = system::ensure_tracefs()?;
    let prober = Prober::new(&tracefs.path, &req.btf);
    let caps = prober.probe(&plan::requirements(&req.hooks));
    let plan = plan::plan(
        &caps,
        &PlanOptions {
            hooks: req.hooks.clone(),
            force: req.force,
        },
    )?;
    let buffer = match req.buffer {
        Some(b) => b,
        None if probe::ringbuf_supported() => BufferKind::Ring,
        None => BufferKind::Perf,
    };
    Ok((filters, plan, buffer))
}

fn custom_btf(path: &Path) -> Option<PathBuf> {
    (path != Path::new(system::DEFAULT_BTF)).then(|| path.to_owned())
}

fn describe(plan: &Plan, buffer: BufferKind) -> String {
    let hooks: Vec<String> = plan
        .hooks
        .iter()
        .map(|h| format!("{}: {}", h.hook, h.tier))
        .collect();
    let buf = match buffer {
        BufferKind::Ring => "ring buffer",
        BufferKind::Perf => "perf buffer",
    };
    format!("{}; {buf}", hooks.join(", "))
}

/// Runs until `stop` is set, writing one line per event to `out`.
pub fn run(req: &TraceRequest, stop: &AtomicBool, out: &mut dyn Write) -> Result<Summary> {
    let (filters, plan, buffer) = prepare(req)?;
    let mut storage = MaybeUninit::uninit();
    let session = loader::load(
        &mut storage,
        &LoadOptions {
            plan: &plan,
            filters: &filters,
            buffer,
            btf: custom_btf(&req.btf),
        },
    )?;
    let mut cg_storage = MaybeUninit::uninit();
    let cg_session = if req.cg_hooks.is_empty() {
        None
    } else {
        let at = match &filters.cgroup {
            Some(dir) => dir.clone(),
            None => system::cgroup2_root()
                .ok_or_else(|| Error::Usage("cgroup v2 is not mounted on this host".into()))?,
        };
        Some(cgevents::load(
            &mut cg_storage,
            &req.cg_hooks,
            &filters,
            &at,
        )?)
    };
    let pinned = if req.policy_events {
        let maps = crate::policy::state::PinnedMaps::open()?.ok_or_else(|| {
            Error::Usage("--events policy: no policy is applied (socklens policy apply)".into())
        })?;
        cgevents::drain(&maps.events)?;
        Some(maps)
    } else {
        None
    };
    let mut extras = Vec::new();
    if let Some(cg) = &cg_session {
        extras.push(ExtraSource {
            map: &cg.skel.maps.slp_events,
            decode: cgevents::decode,
            lost: Box::new(|| crate::policy::state::percpu_sum(&cg.skel.maps.slp_lost, 0)),
        });
    }
    if let Some(maps) = &pinned {
        extras.push(ExtraSource {
            map: &maps.events,
            decode: cgevents::decode,
            lost: Box::new(|| 0),
        });
    }
    let stream = EventStream::open_with(&session, extras)?;
    let mut renderer = Renderer {
        clock: Clock::now(),
        cgroups: system::cgroup2_root().map(CgroupPaths::new),
        json: req.json,
    };
    let mut what = describe(&plan, buffer);
    if let Some(cg) = &cg_session {
        let names: Vec<&str> = req.cg_hooks.iter().map(|h| h.name()).collect();
        what = format!(
            "{what}; {}: cgroup hooks at {}",
            names.join(", "),
            cg.attached_at
        );
    }
    if pinned.is_some() {
        what = format!("{what}; policy verdicts of the pinned policy");
    }
    eprintln!("socklens: tracing {what}. Ctrl-C to stop.");

    let cgroup_rel = filters.cgroup.as_ref().and_then(|dir| {
        let root = system::cgroup2_root()?;
        let rel = dir.strip_prefix(&root).ok()?;
        Some(format!("/{}", rel.display()))
    });
    let mut summary = Summary::default();
    let mut result = match renderer.header() {
        Some(h) => writeln!(out, "{h}"),
        None => Ok(()),
    };
    loop {
        // Read the stop flag before polling, so a final pass drains what the
        // kernel queued before the signal.
        let stopping = stop.load(Ordering::Relaxed);
        let timeout = if stopping { Duration::ZERO } else { POLL };
        for event in stream.poll(timeout)? {
            // The pinned policy's verdicts come unfiltered: filter them here.
            if !cgevents::verdict_wanted(&event, &filters, cgroup_rel.as_deref(), &mut renderer) {
                continue;
            }
            summary.events += 1;
            let line = renderer.render(&event);
            result = result.and_then(|()| writeln!(out, "{line}"));
        }
        result = result.and_then(|()| out.flush());
        if stopping || result.is_err() {
            break;
        }
    }
    summary.losses = stream.losses();
    drop(stream);
    drop(cg_session);
    drop(session);

    let piped_away = |e: &io::Error| e.kind() == io::ErrorKind::BrokenPipe;
    let write_err = |e: io::Error| Error::kernel("writing events", e);
    match result {
        Err(e) if piped_away(&e) => return Ok(summary),
        Err(e) => return Err(write_err(e)),
        Ok(()) => {}
    }
    if req.json {
        let mut attach: serde_json::Map<String, serde_json::Value> = plan
            .hooks
            .iter()
            .map(|h| (h.hook.name().to_owned(), json!(h.tier)))
            .collect();
        for h in &req.cg_hooks {
            attach.insert(h.name().to_owned(), json!("cgroup"));
        }
        let line = json!({
            "event": "summary",
            "events": summary.events,
            "lost": summary.losses.lost,
            "malformed": summary.losses.malformed,
            "attach": attach,
        });
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Err(e) if !piped_away(&e) => return Err(write_err(e)),
            _ => {}
        }
    }
    Ok(summary)
}
