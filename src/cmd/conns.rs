//! `socklens conns`: a snapshot of tracked connections and UDP flows.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::model::Losses;
use crate::output::columns;
use crate::session::reorder;
use crate::session::snapshot::settled_snapshot;
use crate::session::{with_session, TraceRequest, POLL};

const IPPROTO_UDP: u16 = libc::IPPROTO_UDP as u16;

/// `socklens conns`: track for `duration`, then print every tracked
/// connection and UDP flow once.
pub fn run(
    req: &TraceRequest,
    duration: Duration,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<Losses> {
    with_session(req, |live| {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            live.stream.poll(POLL)?;
        }
        let (conns, flows) = settled_snapshot(live);
        // Line by line: with 65,536 connections the rendered snapshot alone
        // was a third of the peak RSS.
        let mut emit = |line: String| writeln!(out, "{line}").ctx("writing snapshot");
        if let Some(header) = live.renderer.header() {
            emit(header)?;
        }
        // The kernel does not say which socket a skipped run was for, and UDP
        // has no counters to recover from, nor has a redirect past TCP: after
        // any, every UDP flow and accelerated connection may be short.
        let maybe_short = live.stream.losses().missed > 0;
        live.renderer.missed_runs = maybe_short;
        let now = reorder::monotonic_ns();
        let udp_with_flows: BTreeSet<u64> = flows.iter().map(|f| f.sk).collect();
        for c in conns.values() {
            if c.proto == IPPROTO_UDP && udp_with_flows.contains(&c.sk) {
                continue; // shown per peer below
            }
            emit(if live.renderer.json {
                live.renderer.conn_line(c)
            } else {
                live.renderer.columns(&columns::conn_snapshot_row(now, c))
            })?;
        }
        for f in &flows {
            let owner = conns.get(&f.sk);
            emit(if live.renderer.json {
                live.renderer.udp_flow_line(owner, f, maybe_short)
            } else {
                live.renderer.columns(&columns::udp_flow_row(now, owner, f))
            })?;
        }
        out.flush().ctx("writing snapshot")?;
        Ok(live.stream.losses())
    })
}
