//! `socklens trace`: one line per event until stopped.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::attach::plan::Plan;
use crate::error::{Context, Result};
use crate::model::Event;
use crate::model::Losses;
use crate::session::cgobserve::CgHook;
use crate::session::reorder::{self, Reorder};
use crate::session::{verdict_wanted, with_session, Live, TraceEvent, TraceRequest, POLL};

/// `trace` writes its lines in blocks of about this many bytes: the size of
/// the `BufWriter` on stdout (src/main.rs).
const TEXT_BLOCK: usize = 1 << 16;
/// What `trace` without --events says on stderr.
pub const DEFAULT_EVENTS_NOTE: &str = "socklens: showing bind and listen; --events picks others \
(established,accept,close,retransmit,connect,sock_create,... see trace --help)";

#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub events: u64,
    pub losses: Losses,
}

fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// `socklens trace`: one line per event until `stop` is set.
pub fn run(req: &TraceRequest, stop: &AtomicBool, out: &mut dyn Write) -> Result<Summary> {
    with_session(req, |live| {
        if req.events_defaulted {
            eprintln!("{DEFAULT_EVENTS_NOTE}");
        }
        let summary = stream_events(req, live, stop, out)?;
        if let Some(summary) = summary {
            if req.json {
                write_summary(live.plan, &req.cg_hooks, &summary, out)?;
            }
            return Ok(summary);
        }
        Ok(Summary::default())
    })
}

/// The event loop; `None` when the reader went away (broken pipe).
fn stream_events(
    req: &TraceRequest,
    live: &mut Live<'_>,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<Option<Summary>> {
    let mut summary = Summary::default();
    let mut result = match live.renderer.header() {
        Some(h) => writeln!(out, "{h}"),
        None => Ok(()),
    };
    // Reused for every batch: the events, and their lines, handed to `out`
    // in blocks (stdout's `BufWriter` passes a block its size straight
    // through rather than copying each line into its buffer).
    let mut batch = Vec::new();
    let mut ready = Vec::new();
    let mut order = Reorder::default();
    let mut text = Vec::with_capacity(TEXT_BLOCK + 4096);
    loop {
        // Read the stop flag before polling, so a final pass drains what the
        // kernel queued before the signal.
        let stopping = stop.load(Ordering::Relaxed);
        let timeout = if stopping { Duration::ZERO } else { POLL };
        // Every buffer is drained after this moment: what was stamped
        // before it (less the submit slack) is all in hand.
        let polled_at = reorder::monotonic_ns();
        live.stream.poll_into(timeout, &mut batch)?;
        order.push(batch.drain(..));
        order.release((!stopping).then(|| reorder::horizon(polled_at)), &mut ready);
        for mut event in ready.drain(..) {
            if TraceEvent::of(&event).is_some_and(|e| !req.events.contains(&e)) {
                continue;
            }
            // The pinned policy's verdicts come unfiltered: filter them here.
            let rel = live.cgroup_rel.as_deref();
            if !verdict_wanted(&event, req, live.filters, rel, &mut live.renderer) {
                continue;
            }
            if let Event::Conn(c) = &mut event {
                if !live.settle(&mut c.conn) {
                    continue;
                }
                // Asked only for an accelerated connection (reading the count
                // costs syscalls); once set it stays.
                if c.conn.accelerated && !live.renderer.missed_runs {
                    live.renderer.missed_runs = live.stream.losses().missed > 0;
                }
            }
            summary.events += 1;
            live.renderer.render_into(&event, &mut text);
            text.push(b'\n');
            if text.len() >= TEXT_BLOCK {
                result = result.and_then(|()| out.write_all(&text));
                text.clear();
            }
        }
        result = result
            .and_then(|()| out.write_all(&text))
            .and_then(|()| out.flush());
        text.clear();
        if stopping || result.is_err() {
            break;
        }
    }
    summary.losses = live.stream.losses();
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(None),
        Err(e) => Err(e).ctx("writing events"),
        Ok(()) => Ok(Some(summary)),
    }
}

fn write_summary(
    plan: &Plan,
    cg_hooks: &[CgHook],
    summary: &Summary,
    out: &mut dyn Write,
) -> Result<()> {
    // One tier per hook name; a cgroup hook of the same name wins, as it did.
    let mut attach: std::collections::BTreeMap<&str, &str> = plan
        .hooks
        .iter()
        .map(|h| (h.hook.name(), h.tier.name()))
        .collect();
    for h in cg_hooks {
        attach.insert(h.name(), "cgroup");
    }
    let line = crate::output::json::line(|obj| {
        obj.plain("event", "summary");
        obj.uint("events", summary.events);
        obj.uint("lost", summary.losses.lost);
        obj.uint("malformed", summary.losses.malformed);
        obj.uint("untracked", summary.losses.untracked);
        obj.uint("udp_untracked", summary.losses.udp_untracked);
        obj.uint("missed", summary.losses.missed);
        obj.object("attach", |a| {
            for (hook, tier) in &attach {
                a.plain(hook, tier);
            }
        });
    });
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if !is_broken_pipe(&e) => Err(e).ctx("writing events"),
        _ => Ok(()),
    }
}
