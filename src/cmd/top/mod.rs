//! `socklens top`: per-interval rates, like bcc's tcptop, from the tracked
//! connection maps (the figures: src/accounting.rs).

mod tui;

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::accounting::{Accountant, GroupBy, Report, SortKey, Totals, View};
use crate::error::{Context, Result};
use crate::model::Losses;
use crate::model::{ConnEventKind, Event};
use crate::output::top::{write_json, Sheet};
use crate::output::Renderer;
use crate::session::snapshot::{settled_snapshot, snapshot};
use crate::session::{with_session, Live, TraceRequest, POLL};
use tui::{pending_input, Input, Screen};

#[derive(Debug, Clone, Copy)]
pub struct TopOptions {
    pub interval: Duration,
    pub sort: SortKey,
    pub by: GroupBy,
    /// One interval, then exit.
    pub once: bool,
}

// ---- the loop --------------------------------------------------------------

enum Output<'w> {
    Json(&'w mut dyn Write),
    Text(&'w mut dyn Write),
    Tui(Screen<'w>),
}

impl Output<'_> {
    /// Writes one interval; false when the reader went away (broken pipe).
    fn show(&mut self, report: &Report, view: View, renderer: &mut Renderer) -> Result<bool> {
        let written = match self {
            Self::Tui(screen) => {
                screen.show(report, view, renderer)?;
                return Ok(true);
            }
            Self::Json(out) => write_json(report, view, renderer, *out).and_then(|()| out.flush()),
            Self::Text(out) => Sheet::new(report, view, renderer, usize::MAX)
                .text()
                .iter()
                .try_for_each(|l| writeln!(out, "{l}"))
                .and_then(|()| writeln!(out))
                .and_then(|()| out.flush()),
        };
        match written {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).ctx("writing top"),
        }
    }
}

/// Feeds close events to the accountant; other events are not needed here
/// (their counters are in the maps).
fn drain_closes(live: &mut Live<'_>, acct: &mut Accountant, timeout: Duration) -> Result<()> {
    for event in live.stream.poll(timeout)? {
        if let Event::Conn(mut e) = event {
            if e.kind == ConnEventKind::Close && live.settle(&mut e.conn) {
                acct.on_close(e.conn);
            }
        }
    }
    Ok(())
}

/// Reacts to keys; true to quit.
fn handle_keys(
    output: &mut Output<'_>,
    view: &mut View,
    last: Option<&Report>,
    interval: Duration,
    renderer: &mut Renderer,
) -> Result<bool> {
    let Output::Tui(screen) = output else {
        return Ok(false);
    };
    let inputs = pending_input()?;
    for input in &inputs {
        match input {
            Input::Quit => return Ok(true),
            Input::NextSort => view.sort = view.sort.next(),
            Input::NextGroup => view.by = view.by.next(),
            Input::Redraw => {}
        }
    }
    if !inputs.is_empty() {
        match last {
            Some(report) => screen.show(report, *view, renderer)?,
            None => screen.draw(&Sheet::waiting(*view, interval))?,
        }
    }
    Ok(false)
}

fn watch(
    live: &mut Live<'_>,
    opts: &TopOptions,
    stop: &AtomicBool,
    output: &mut Output<'_>,
) -> Result<()> {
    let mut view = View {
        by: opts.by,
        sort: opts.sort,
    };
    // The raw map, not a settled snapshot: only seeded connections'
    // retransmit counts are needed, and settling (owners from /proc, a
    // sorted map) would cost tens of MiB more at 65,536 connections.
    let mut acct = Accountant::new(&snapshot(live.session).0);
    let mut started = Instant::now();
    let mut last: Option<Report> = None;
    if let Output::Tui(screen) = output {
        screen.draw(&Sheet::waiting(view, opts.interval))?;
    }
    for index in 1.. {
        loop {
            let left = opts.interval.saturating_sub(started.elapsed());
            drain_closes(live, &mut acct, left.min(POLL))?;
            if stop.load(Ordering::Relaxed)
                || handle_keys(
                    output,
                    &mut view,
                    last.as_ref(),
                    opts.interval,
                    &mut live.renderer,
                )?
            {
                return Ok(());
            }
            if started.elapsed() >= opts.interval {
                break;
            }
        }
        let elapsed = started.elapsed();
        started = Instant::now();
        let (conns, flows) = settled_snapshot(live);
        // Closes queued before the snapshot belong to this interval.
        drain_closes(live, &mut acct, Duration::ZERO)?;
        let activities = acct.tick(&conns, &flows);
        let report = Report {
            index,
            elapsed,
            totals: Totals::new(&conns, &flows, &activities, live.stream.losses()),
            activities,
            time: OffsetDateTime::now_utc(),
        };
        if !output.show(&report, view, &mut live.renderer)? || opts.once {
            return Ok(());
        }
        last = Some(report);
    }
    Ok(())
}

/// `socklens top`: a refreshing table on a terminal; plain text per
/// interval when stdout is not one or with `--once`; JSON lines with `--json`.
pub fn run(
    req: &TraceRequest,
    opts: &TopOptions,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<Losses> {
    let tui = !req.json && !opts.once && io::stdout().is_terminal();
    with_session(req, |live| {
        let mut output = if req.json {
            Output::Json(out)
        } else if tui {
            Output::Tui(Screen::enter(out)?)
        } else {
            Output::Text(out)
        };
        let result = watch(live, opts, stop, &mut output);
        drop(output); // the terminal is restored before anything else prints
        result?;
        Ok(live.stream.losses())
    })
}
