//! Per-cgroup socket policy: `socklens policy check | apply | show | remove` and
//! `socklens down`.
//!
//! `file` validates the TOML (`services` its `[[service]]`, both on `source`'s
//! primitives), `compile` turns it into map entries (pure), `state` holds the
//! pinned maps and links and swaps rule sets atomically (`svcmaps` the services'
//! maps and terminate, both on `pinned`).

pub mod accelerate;
pub mod accelmaps;
pub mod addr;
pub mod compile;
pub mod file;
pub mod pinned;
pub mod redirect;
pub mod services;
pub mod source;
pub mod state;
pub mod svcmaps;

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::model::policy::{
    PolicyView, RedirectView, RuleTarget, RuleView, ScopeView, ServiceView,
};
use libbpf_rs::RingBufferBuilder;

use crate::error::{Context, Error, Result};
use crate::host::cgroup::CgroupPaths;
use crate::host::system;
use crate::model::names::type_name;
use crate::model::{ip_from, Event};
use crate::output::{Clock, Renderer};
use crate::skel::policy::types::{slp_action, slp_limit, slp_mode, slp_op};

pub use file::{Policy, PolicyError};

/// Reads and validates a policy file: against the cgroup tree under
/// `cgroup_root`, then against the capacity of the compiled tables (prefix
/// entries, rules per prefix).
pub fn load(path: &Path, cgroup_root: &Path) -> Result<Policy, PolicyError> {
    let policy = file::load(path, cgroup_root)?;
    compile::check_capacity(&policy).map_err(|(line, msg)| PolicyError {
        file: policy.file.clone(),
        line,
        msg,
    })?;
    Ok(policy)
}

/// `policy check`: validates the whole file and reports what it would do.
pub fn check(path: &Path, out: &mut dyn Write) -> Result<Policy> {
    let root = file::cgroup_root()?;
    let policy = load(path, &root)?;
    writeln!(
        out,
        "{}: ok: {} scopes, {} rules, {} cgroups governed, {} services, {} redirects, attach at {}",
        path.display(),
        policy.scopes.len(),
        policy.rule_count(),
        policy.scopes.iter().map(|s| s.governs.len()).sum::<usize>(),
        policy.services.len(),
        policy.redirects.len(),
        policy.attach.rel
    )
    .ctx("writing output")?;
    if services::wants_terminate(&policy.services) && !svcmaps::kernel_can_terminate() {
        eprintln!("{}", svcmaps::NO_TERMINATE);
    }
    if !policy.accelerate.is_empty() {
        writeln!(
            out,
            "accelerate: {} entries, {} cgroups",
            policy.accelerate.len(),
            policy
                .accelerate
                .iter()
                .map(|a| a.governs.len())
                .sum::<usize>()
        )
        .ctx("writing output")?;
    }
    Ok(policy)
}

/// `policy apply`: validate, then replace the rule set in force in one step.
pub fn apply(path: &Path, out: &mut dyn Write) -> Result<()> {
    system::check_privileges()?;
    let root = file::cgroup_root()?;
    let policy = load(path, &root)?;
    let done = state::apply(&policy, &root)?;
    writeln!(
        out,
        "applied {}: {} scopes, {} rules, {} cgroups governed, {} services, {} redirects; generation {}; attached at {}{}{}",
        path.display(),
        done.scopes,
        done.rules,
        done.cgroups,
        done.services,
        policy.redirects.len(),
        done.gen,
        done.attach,
        if done.attached_now {
            " (new links)"
        } else {
            ""
        },
        match done.terminated {
            Some(svcmaps::Terminated::Reset(n)) =>
                format!("; {n} connections of removed backends reset"),
            _ => String::new(),
        }
    )
    .ctx("writing output")?;
    if done.terminated == Some(svcmaps::Terminated::Unsupported) {
        eprintln!("{}", svcmaps::NO_TERMINATE);
    }
    out.flush().ctx("writing output")
}

/// `policy apply --follow`: after applying, print every policy_deny and
/// policy_audit event until stopped. Enforcement does not depend on this process.
pub fn follow(json: bool, stop: &AtomicBool, out: &mut dyn Write) -> Result<u64> {
    let maps =
        state::PinnedMaps::open()?.ok_or_else(|| Error::Usage("no policy is applied".into()))?;
    maps.drain_events()?;
    let queue = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let mut b = RingBufferBuilder::new();
    {
        let queue = std::rc::Rc::clone(&queue);
        b.add(&maps.events, move |bytes: &[u8]| {
            if let Ok(e) = crate::model::decode_cg(bytes) {
                queue.borrow_mut().push(e);
            }
            0
        })
        .map_err(|source| Error::BpfText {
            what: "opening the policy event buffer".into(),
            source,
        })?;
    }
    let rb = b.build().map_err(|source| Error::BpfText {
        what: "opening the policy event buffer".into(),
        source,
    })?;
    let mut renderer = Renderer {
        clock: Clock::now(),
        cgroups: system::cgroup2_root().map(CgroupPaths::new),
        json,
        layout: crate::output::columns::Layout::for_stdout(false),
        missed_runs: false,
    };
    if let Some(h) = renderer.header() {
        writeln!(out, "{h}").ctx("writing output")?;
    }
    eprintln!("socklens: following policy events. Ctrl-C to stop (the policy stays in force).");
    let mut n = 0;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let timeout = if stopping {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        // Records come without a wakeup until a batch is waiting
        // (src/bpf/wakeup.bpf.h): drain whatever is there after the wait.
        if let Err(source) = rb.poll(timeout).and_then(|()| rb.consume()) {
            if source.kind() != libbpf_rs::ErrorKind::Interrupted {
                return Err(Error::BpfText {
                    what: "reading policy events".into(),
                    source,
                });
            }
        }
        let events: Vec<Event> = std::mem::take(&mut *queue.borrow_mut());
        for e in &events {
            n += 1;
            writeln!(out, "{}", renderer.render(e)).ctx("writing output")?;
        }
        out.flush().ctx("writing output")?;
        if stopping {
            return Ok(n);
        }
    }
}

/// The services and redirects in force with their counters, which count
/// from their generation's apply.
pub struct Steering {
    pub gen: u32,
    pub services: Vec<ServiceView>,
    pub redirects: Vec<RedirectView>,
}

/// What the policy in force steers (for the agent's counters); None when no
/// policy is applied.
pub fn steering_in_force() -> Result<Option<Steering>> {
    let Some(maps) = state::PinnedMaps::open()? else {
        return Ok(None);
    };
    let gen = maps.config()?.r#gen & 1;
    Ok(Some(Steering {
        gen,
        services: svcmaps::services(gen)?,
        redirects: redirect::show(gen)?,
    }))
}

/// `policy remove`: detach and unpin; every call is allowed again.
pub fn remove(out: &mut dyn Write) -> Result<()> {
    let existed = state::remove()?;
    let msg = if existed {
        "policy removed: links detached, maps unpinned"
    } else {
        "no policy was applied"
    };
    writeln!(out, "{msg}").ctx("writing output")
}

/// `socklens down`: detach and unpin everything socklens ever pinned.
pub fn down(out: &mut dyn Write) -> Result<()> {
    system::check_privileges()?;
    let left = accelmaps::retire()?;
    if left == 0 {
        crate::attach::cgroup_attach::remove_all()?;
        return writeln!(
            out,
            "socklens is down: nothing pinned or attached under {}",
            crate::attach::cgroup_attach::pin_root().display()
        )
        .ctx("writing output");
    }
    // Unpinning a sockhash drops what its sockets have not read yet: it stays
    // until its connections close (docs/accelerate.md).
    let root = crate::attach::cgroup_attach::pin_root();
    let keep = accelmaps::pins().dir;
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        if e.path() != keep {
            crate::attach::cgroup_attach::remove_tree(&e.path())?;
        }
    }
    writeln!(
        out,
        "socklens is down; {left} accelerated sockets keep {} pinned until they close",
        keep.display()
    )
    .ctx("writing output")
}

fn ops_names(bits: u8) -> Vec<&'static str> {
    [
        (slp_op::SLP_OP_CREATE, "create"),
        (slp_op::SLP_OP_BIND4, "bind"),
        (slp_op::SLP_OP_CONNECT4, "connect"),
        (slp_op::SLP_OP_SENDMSG4, "sendmsg"),
    ]
    .iter()
    .filter(|(op, _)| bits & (1 << op.0) != 0)
    .map(|&(_, n)| n)
    .collect()
}

fn action_name(a: u8) -> &'static str {
    if u32::from(a) == slp_action::SLP_DENY.0 {
        "deny"
    } else {
        "allow"
    }
}

fn mode_name(m: u8) -> &'static str {
    if u32::from(m) == slp_mode::SLP_MODE_AUDIT.0 {
        "audit"
    } else {
        "enforce"
    }
}

/// The policy in force, read back from the pinned maps, with per-rule counters.
pub fn show_view() -> Result<Option<PolicyView>> {
    let Some(maps) = state::PinnedMaps::open()? else {
        return Ok(None);
    };
    let cfg = maps.config()?;
    let gen = cfg.r#gen & 1;
    let mut paths = system::cgroup2_root().map(CgroupPaths::new);
    let mut path_of = |id: u64| paths.as_mut().and_then(|p| p.path_of(id));
    let links = pinned::pins()
        .pinned_links()?
        .iter()
        .map(|(name, link)| {
            (
                name.clone(),
                crate::attach::cgroup_attach::link_cgroup(link),
            )
        })
        .collect();
    let (translated_live, translated_total) = svcmaps::xlate_stats()?;
    let nscopes = cfg.nscopes[gen as usize];
    let nrules = cfg.nrules[gen as usize];
    let mut scopes = Vec::new();
    for i in 0..nscopes {
        let Some(s) = maps.scope(gen, i) else {
            continue;
        };
        scopes.push(ScopeView {
            index: u32::from(s.index),
            name: crate::model::c_string(&s.name).to_string(),
            cgroup: path_of(s.cgroup_id),
            cgroups: s.ncgroups,
            mode: mode_name(s.mode),
            default: action_name(s.dflt),
            default_hits: maps.counter(gen, slp_limit::SLP_MAX_RULES.0 + i),
            rules: Vec::new(),
        });
    }
    let any = |known: bool, name: String| if known { name } else { "any".to_owned() };
    for slot in 0..nrules {
        let Some(r) = maps.rule(gen, slot) else {
            continue;
        };
        let target = if r.ops & (1 << slp_op::SLP_OP_CREATE.0) != 0 {
            RuleTarget::Create {
                family: any(
                    r.family != 0,
                    crate::model::family_name(r.family as u16).to_owned(),
                ),
                sock_type: any(r.sock_type != 0, type_name(u16::from(r.sock_type))),
            }
        } else {
            let addr: IpAddr = ip_from(u16::from(r.family), &r.addr);
            RuleTarget::Addr {
                cidr: any(r.prefix != u8::MAX, format!("{addr}/{}", r.prefix)),
                ports: format!("{}-{}", r.port_lo, r.port_hi),
            }
        };
        let rule = RuleView {
            id: r.rule_id,
            line: r.line,
            action: action_name(r.action),
            on: ops_names(r.ops),
            hits: maps.counter(gen, slot),
            target,
            proto: any(r.proto != u16::MAX, crate::model::proto_name(r.proto)),
        };
        if let Some(scope) = scopes.get_mut(usize::from(r.scope)) {
            scope.rules.push(rule);
        }
    }
    Ok(Some(PolicyView {
        generation: gen,
        attach_cgroup_id: cfg.attach_cgroup_id,
        attach_cgroup: path_of(cfg.attach_cgroup_id),
        links,
        events_lost: maps.lost(),
        scopes,
        services: svcmaps::services(gen)?,
        redirects: redirect::show(gen)?,
        accelerate: accelmaps::show(gen),
        translated_live,
        translated_total,
    }))
}

/// `policy show`: text, or JSON with `--json`.
pub fn show(json_out: bool, out: &mut dyn Write) -> Result<()> {
    system::check_privileges()?;
    let view = show_view()?;
    // Connections still accelerated after `remove` keep their sockhash.
    let draining = view
        .is_none()
        .then(|| accelmaps::pins().exists().then(|| accelmaps::show(0)))
        .flatten();
    if json_out {
        writeln!(
            out,
            "{}",
            crate::output::policy::json(view.as_ref(), draining.as_ref())
        )
        .ctx("writing output")?;
    } else {
        for line in crate::output::policy::text(view.as_ref(), draining.as_ref()) {
            writeln!(out, "{line}").ctx("writing output")?;
        }
    }
    Ok(())
}
