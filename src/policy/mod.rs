//! Per-cgroup socket policy: `socklens policy check | apply | show | remove` and
//! `socklens down`.
//!
//! `file` validates the TOML (`services` its `[[service]]`, both on `source`'s
//! primitives), `compile` turns it into map entries (pure), `state` holds the
//! pinned maps and links and swaps rule sets atomically (`svcmaps` the services'
//! maps and terminate, both on `pinned`).

pub mod accelerate;
pub mod accelmaps;
pub mod compile;
pub mod file;
pub mod pinned;
pub mod services;
pub mod source;
pub mod state;
pub mod svcmaps;

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use libbpf_rs::RingBufferBuilder;
use serde_json::{json, Value};

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
        "{}: ok: {} scopes, {} rules, {} cgroups governed, {} services, attach at {}",
        path.display(),
        policy.scopes.len(),
        policy.rule_count(),
        policy.scopes.iter().map(|s| s.governs.len()).sum::<usize>(),
        policy.services.len(),
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
        "applied {}: {} scopes, {} rules, {} cgroups governed, {} services; generation {}; attached at {}{}{}",
        path.display(),
        done.scopes,
        done.rules,
        done.cgroups,
        done.services,
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
pub fn show_value() -> Result<Option<Value>> {
    let Some(maps) = state::PinnedMaps::open()? else {
        return Ok(None);
    };
    let cfg = maps.config()?;
    let gen = cfg.r#gen & 1;
    let mut paths = system::cgroup2_root().map(CgroupPaths::new);
    let mut path_of = |id: u64| paths.as_mut().and_then(|p| p.path_of(id));
    let links: Vec<Value> = pinned::pins()
        .pinned_links()?
        .iter()
        .map(|(name, link)| {
            json!({
                "program": name,
                "cgroup_id": crate::attach::cgroup_attach::link_cgroup(link),
            })
        })
        .collect();
    let (live, made) = svcmaps::xlate_stats()?;
    let nscopes = cfg.nscopes[gen as usize];
    let nrules = cfg.nrules[gen as usize];
    let mut scopes: Vec<Value> = Vec::new();
    for i in 0..nscopes {
        let Some(s) = maps.scope(gen, i) else {
            continue;
        };
        scopes.push(json!({
            "index": s.index,
            "name": crate::model::c_string(&s.name),
            "cgroup": path_of(s.cgroup_id),
            "cgroups": s.ncgroups,
            "mode": mode_name(s.mode),
            "default": action_name(s.dflt),
            "default_hits": maps.counter(gen, slp_limit::SLP_MAX_RULES.0 + i),
            "rules": [],
        }));
    }
    for slot in 0..nrules {
        let Some(r) = maps.rule(gen, slot) else {
            continue;
        };
        let mut v = json!({
            "id": r.rule_id,
            "line": r.line,
            "action": action_name(r.action),
            "on": ops_names(r.ops),
            "hits": maps.counter(gen, slot),
        });
        if r.ops & (1 << slp_op::SLP_OP_CREATE.0) != 0 {
            v["family"] = json!(match i32::from(r.family) {
                0 => "any".to_owned(),
                f => crate::model::family_name(f as u16).to_owned(),
            });
            v["type"] = json!(match r.sock_type {
                0 => "any".to_owned(),
                t => type_name(u16::from(t)),
            });
        } else {
            v["cidr"] = json!(if r.prefix == u8::MAX {
                "any".to_owned()
            } else {
                let addr: IpAddr = ip_from(u16::from(r.family), &r.addr);
                format!("{addr}/{}", r.prefix)
            });
            v["ports"] = json!(format!("{}-{}", r.port_lo, r.port_hi));
        }
        v["proto"] = json!(if r.proto == u16::MAX {
            "any".to_owned()
        } else {
            crate::model::proto_name(r.proto)
        });
        if let Some(scope) = scopes.get_mut(usize::from(r.scope)) {
            if let Some(list) = scope["rules"].as_array_mut() {
                list.push(v);
            }
        }
    }
    Ok(Some(json!({
        "generation": gen,
        "attach": {
            "cgroup_id": cfg.attach_cgroup_id,
            "cgroup": path_of(cfg.attach_cgroup_id),
        },
        "links": links,
        "events_lost": maps.lost(),
        "scopes": scopes,
        "services": svcmaps::show(gen)?,
        "translated_sockets": {"live": live, "total": made},
        "accelerate": accelmaps::show(gen),
    })))
}

/// `policy show`: text, or JSON with `--json`.
pub fn show(json_out: bool, out: &mut dyn Write) -> Result<()> {
    system::check_privileges()?;
    let Some(v) = show_value()? else {
        // Connections still accelerated after `remove` keep their sockhash.
        let accel = accelmaps::pins().exists().then(|| accelmaps::show(0));
        if json_out {
            writeln!(out, "{}", json!({"policy": null, "accelerate": accel}))
                .ctx("writing output")?;
        } else {
            writeln!(out, "no policy is applied").ctx("writing output")?;
            if let Some(a) = accel {
                writeln!(
                    out,
                    "accelerated connections: {} still open",
                    a["connections"]
                )
                .ctx("writing output")?;
            }
        }
        return Ok(());
    };
    if json_out {
        return writeln!(out, "{v}").ctx("writing output");
    }
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".to_owned(),
        other => other.to_string(),
    };
    writeln!(
        out,
        "policy in force: generation {}, attached at {} ({} links), {} events lost",
        v["generation"],
        s(&v["attach"]["cgroup"]),
        v["links"].as_array().map_or(0, Vec::len),
        v["events_lost"]
    )
    .ctx("writing output")?;
    for sc in v["scopes"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "scope {} ({} cgroups): mode {}, default {} (hits {})",
            s(&sc["name"]),
            sc["cgroups"],
            s(&sc["mode"]),
            s(&sc["default"]),
            sc["default_hits"]
        )
        .ctx("writing output")?;
        for r in sc["rules"].as_array().into_iter().flatten() {
            let on: Vec<String> = r["on"].as_array().into_iter().flatten().map(s).collect();
            let target = if r.get("cidr").is_some() {
                format!(
                    "{} ports {} proto {}",
                    s(&r["cidr"]),
                    s(&r["ports"]),
                    s(&r["proto"])
                )
            } else {
                format!(
                    "family {} type {} proto {}",
                    s(&r["family"]),
                    s(&r["type"]),
                    s(&r["proto"])
                )
            };
            writeln!(
                out,
                "  rule {:>6} line {:>5}  {:<5} {:<22} {target}  hits {}",
                r["id"],
                r["line"],
                s(&r["action"]),
                on.join(","),
                r["hits"]
            )
            .ctx("writing output")?;
        }
    }
    for sv in v["services"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "service {} {} (line {}): netns {}, failed picks {}",
            s(&sv["address"]),
            s(&sv["proto"]),
            sv["line"],
            s(&sv["netns"]),
            sv["failed_picks"]
        )
        .ctx("writing output")?;
        for b in sv["backends"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "  backend {:<40} weight {:>5}  picks {}",
                s(&b["address"]),
                b["weight"],
                b["picks"]
            )
            .ctx("writing output")?;
        }
    }
    writeln!(
        out,
        "translated sockets: {} open, {} since apply",
        v["translated_sockets"]["live"], v["translated_sockets"]["total"]
    )
    .ctx("writing output")?;
    let a = &v["accelerate"];
    for e in a["entries"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "accelerate {} (line {}): {} cgroups, ports {}",
            s(&e["name"]),
            e["line"],
            e["cgroups"],
            e["ports"]
        )
        .ctx("writing output")?;
    }
    writeln!(
        out,
        "accelerated connections: {} now ({} paired since the sockhash was made{})",
        a["connections"],
        a["paired"],
        if a["attached"] == true {
            ""
        } else {
            "; new connections are not accelerated"
        }
    )
    .ctx("writing output")?;
    Ok(())
}
