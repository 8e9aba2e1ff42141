//! `socklens top`: per-interval rates, like bcc's tcptop, from the tracked
//! connection maps.
//!
//! Each interval ends with a snapshot of the maps. A connection's share of
//! the interval is its counters now minus its counters at the previous
//! snapshot (its baseline). Connections that closed during the interval are
//! gone from the map by then: their final counters arrive with the close
//! event, and their share is those minus the baseline. A connection is known
//! by its socket address *and* its tracking start, because the kernel reuses
//! socket addresses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, IsTerminal, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Alignment, Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row as TableRow, Table};
use ratatui::Terminal;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::conns::{settled_snapshot, snapshot};
use crate::error::{Error, Result};
use crate::events::Losses;
use crate::model::{family_name, proto_name, tcp_state_name, Conn, ConnEventKind, Event, UdpFlow};
use crate::output::{socket_addr, Renderer};
use crate::trace::{with_session, Live, TraceRequest, POLL};

const TCP_LISTEN: u8 = 10;
const IPPROTO_UDP: u16 = libc::IPPROTO_UDP as u16;
const IPPROTO_TCP: u16 = libc::IPPROTO_TCP as u16;
/// Snapshots a vanished connection's baseline is kept for while its close
/// event is on its way; some entries leave the map without one (listeners,
/// accepted sockets the filters reject).
const MISSED_SNAPSHOTS_KEPT: u8 = 2;

/// Which column orders the rows, largest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Rx,
    Tx,
    Retrans,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rx => "rx",
            Self::Tx => "tx",
            Self::Retrans => "retrans",
        }
    }

    fn next(self) -> Self {
        match self {
            Self::Rx => Self::Tx,
            Self::Tx => Self::Retrans,
            Self::Retrans => Self::Rx,
        }
    }
}

/// What one row stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Conn,
    Process,
    Cgroup,
}

impl GroupBy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Conn => "conn",
            Self::Process => "process",
            Self::Cgroup => "cgroup",
        }
    }

    fn next(self) -> Self {
        match self {
            Self::Conn => Self::Process,
            Self::Process => Self::Cgroup,
            Self::Cgroup => Self::Conn,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TopOptions {
    pub interval: Duration,
    pub sort: SortKey,
    pub by: GroupBy,
    /// One interval, then exit.
    pub once: bool,
}

// ---- accounting (pure) ---------------------------------------------------

/// Counters that `top` turns into per-interval figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx: u64,
    pub rx: u64,
    pub retrans: u64,
    /// Part of `tx` that sendfile moved (the agent exports it apart).
    pub sendfile: u64,
}

impl Counters {
    fn of(c: &Conn) -> Self {
        Self {
            tx: c.tx_bytes,
            rx: c.rx_bytes,
            retrans: u64::from(c.retransmits),
            sendfile: c.sendfile_bytes,
        }
    }

    fn of_flow(f: &UdpFlow) -> Self {
        Self {
            tx: f.tx_bytes,
            rx: f.rx_bytes,
            retrans: 0,
            sendfile: 0,
        }
    }

    /// What was added since `before`; saturating, since a counter read from
    /// tcp_sock (retransmits) is a reading, not a sum we own.
    fn since(self, before: Self) -> Self {
        Self {
            tx: self.tx.saturating_sub(before.tx),
            rx: self.rx.saturating_sub(before.rx),
            retrans: self.retrans.saturating_sub(before.retrans),
            sendfile: self.sendfile.saturating_sub(before.sendfile),
        }
    }

    fn add(&mut self, other: Self) {
        self.tx += other.tx;
        self.rx += other.rx;
        self.retrans += other.retrans;
        self.sendfile += other.sendfile;
    }

    fn is_zero(self) -> bool {
        self == Self::default()
    }
}

/// A tracked connection's identity: the kernel reuses socket addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnId {
    sk: u64,
    start_ns: u64,
}

impl ConnId {
    fn of(c: &Conn) -> Self {
        Self {
            sk: c.sk,
            start_ns: c.start_ns,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlowId {
    sk: u64,
    peer: IpAddr,
    port: u16,
    first_ns: u64,
}

impl FlowId {
    fn of(f: &UdpFlow) -> Self {
        Self {
            sk: f.sk,
            peer: f.peer,
            port: f.peer_port,
            first_ns: f.first_ns,
        }
    }
}

/// One connection's (or UDP flow's) share of an interval.
#[derive(Debug, Clone)]
pub struct Activity {
    /// Owner and tuple; for a closed connection, its final record.
    pub conn: Conn,
    /// The peer of a UDP flow (the owning socket is `conn`).
    pub peer: Option<(IpAddr, u16)>,
    pub delta: Counters,
    pub closed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Baseline {
    counters: Counters,
    missed: u8,
}

/// Turns snapshots and close events into per-interval activity.
#[derive(Debug, Default)]
pub struct Accountant {
    conns: HashMap<ConnId, Baseline>,
    flows: HashMap<FlowId, Counters>,
    closed: Vec<Activity>,
    /// Closes of this interval and the one before: a snapshot read between
    /// the close event and the map delete must not count them again.
    closed_ids: HashSet<ConnId>,
    prev_closed_ids: HashSet<ConnId>,
}

impl Accountant {
    /// Everything in the maps was counted after attach, so the first
    /// interval starts from zero, except the retransmit count of a seeded
    /// connection: read from tcp_sock, it covers the connection's whole life.
    pub fn new<'c>(initial: impl IntoIterator<Item = &'c Conn>) -> Self {
        let conns = initial
            .into_iter()
            .filter(|c| c.seeded)
            .map(|c| {
                let counters = Counters {
                    retrans: u64::from(c.retransmits),
                    ..Counters::default()
                };
                (
                    ConnId::of(c),
                    Baseline {
                        counters,
                        missed: 0,
                    },
                )
            })
            .collect();
        Self {
            conns,
            ..Self::default()
        }
    }

    /// A close event: the connection's final counters.
    pub fn on_close(&mut self, conn: Conn) {
        let id = ConnId::of(&conn);
        if self.prev_closed_ids.contains(&id) || !self.closed_ids.insert(id) {
            return; // already counted
        }
        let base = self
            .conns
            .remove(&id)
            .map_or_else(Counters::default, |b| b.counters);
        self.closed.push(Activity {
            delta: Counters::of(&conn).since(base),
            conn,
            peer: None,
            closed: true,
        });
    }

    /// Ends the interval at this snapshot: every connection and flow that
    /// moved, plus every connection that closed.
    pub fn tick(&mut self, conns: &BTreeMap<u64, Conn>, flows: &[UdpFlow]) -> Vec<Activity> {
        let mut out = std::mem::take(&mut self.closed);
        self.tick_conns(conns, &mut out);
        self.tick_flows(conns, flows, &mut out);
        self.prev_closed_ids = std::mem::take(&mut self.closed_ids);
        out
    }

    fn tick_conns(&mut self, conns: &BTreeMap<u64, Conn>, out: &mut Vec<Activity>) {
        let mut seen = HashSet::new();
        for c in conns.values() {
            let id = ConnId::of(c);
            if self.closed_ids.contains(&id) || self.prev_closed_ids.contains(&id) {
                continue;
            }
            seen.insert(id);
            let now = Counters::of(c);
            let base = self
                .conns
                .insert(
                    id,
                    Baseline {
                        counters: now,
                        missed: 0,
                    },
                )
                .map_or_else(Counters::default, |b| b.counters);
            let delta = now.since(base);
            if !delta.is_zero() {
                out.push(Activity {
                    conn: c.clone(),
                    peer: None,
                    delta,
                    closed: false,
                });
            }
        }
        // Gone from the map: the close event may still be in the buffer.
        for (id, b) in &mut self.conns {
            if !seen.contains(id) {
                b.missed += 1;
            }
        }
        self.conns.retain(|_, b| b.missed <= MISSED_SNAPSHOTS_KEPT);
    }

    /// UDP flows have no close event: what a flow did between the last
    /// snapshot and its socket's end is not seen.
    fn tick_flows(
        &mut self,
        conns: &BTreeMap<u64, Conn>,
        flows: &[UdpFlow],
        out: &mut Vec<Activity>,
    ) {
        let mut next = HashMap::with_capacity(flows.len());
        for f in flows {
            let Some(owner) = conns.get(&f.sk) else {
                continue;
            };
            let id = FlowId::of(f);
            let now = Counters::of_flow(f);
            let delta = now.since(self.flows.get(&id).copied().unwrap_or_default());
            next.insert(id, now);
            if !delta.is_zero() {
                out.push(Activity {
                    conn: owner.clone(),
                    peer: Some((f.peer, f.peer_port)),
                    delta,
                    closed: false,
                });
            }
        }
        self.flows = next;
    }
}

// ---- grouping and sorting (pure) -----------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Conn {
        sk: u64,
        start_ns: u64,
        peer: Option<(IpAddr, u16)>,
    },
    Process {
        pid: Option<u32>,
    },
    Cgroup {
        id: Option<u64>,
    },
}

impl Key {
    fn of(a: &Activity, by: GroupBy) -> Self {
        let owner = a.conn.owner_known;
        match by {
            GroupBy::Conn => Self::Conn {
                sk: a.conn.sk,
                start_ns: a.conn.start_ns,
                peer: a.peer,
            },
            GroupBy::Process => Self::Process {
                pid: owner.then_some(a.conn.pid),
            },
            GroupBy::Cgroup => Self::Cgroup {
                id: owner.then_some(a.conn.cgroup_id),
            },
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Key,
    /// The first activity of the group: tuple for a connection row; comm
    /// for a process row (a process whose threads have different names
    /// shows the first one seen).
    pub sample: Activity,
    pub delta: Counters,
    pub conns: u64,
    pub closed: u64,
}

pub fn group(activities: &[Activity], by: GroupBy) -> Vec<Row> {
    let mut rows: BTreeMap<Key, Row> = BTreeMap::new();
    for a in activities {
        let key = Key::of(a, by);
        let row = rows.entry(key.clone()).or_insert_with(|| Row {
            key,
            sample: a.clone(),
            delta: Counters::default(),
            conns: 0,
            closed: 0,
        });
        row.delta.add(a.delta);
        row.conns += 1;
        row.closed += u64::from(a.closed);
    }
    rows.into_values().collect()
}

/// Largest first by `sort`, then by total bytes; ties keep key order.
pub fn sort_rows(rows: &mut [Row], sort: SortKey) {
    let primary = |r: &Row| match sort {
        SortKey::Rx => r.delta.rx,
        SortKey::Tx => r.delta.tx,
        SortKey::Retrans => r.delta.retrans,
    };
    rows.sort_by(|a, b| {
        primary(b)
            .cmp(&primary(a))
            .then((b.delta.rx + b.delta.tx).cmp(&(a.delta.rx + a.delta.tx)))
            .then(a.key.cmp(&b.key))
    });
}

/// The header figures of one interval.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub tracked: usize,
    pub listening: usize,
    pub udp_flows: usize,
    pub delta: Counters,
    pub closed: u64,
    pub losses: Losses,
}

impl Totals {
    fn new(
        conns: &BTreeMap<u64, Conn>,
        flows: &[UdpFlow],
        activities: &[Activity],
        losses: Losses,
    ) -> Self {
        let mut delta = Counters::default();
        for a in activities {
            delta.add(a.delta);
        }
        Self {
            tracked: conns.len(),
            listening: conns.values().filter(|c| c.state == TCP_LISTEN).count(),
            udp_flows: flows.len(),
            delta,
            closed: activities.iter().filter(|a| a.closed).count() as u64,
            losses,
        }
    }
}

/// One finished interval.
#[derive(Debug, Clone)]
pub struct Report {
    pub index: u64,
    pub elapsed: Duration,
    pub activities: Vec<Activity>,
    pub totals: Totals,
    pub time: OffsetDateTime,
}

/// How the rows are shown; the TUI's keys change it.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub by: GroupBy,
    pub sort: SortKey,
}

impl View {
    fn rows(self, report: &Report) -> Vec<Row> {
        let mut rows = group(&report.activities, self.by);
        sort_rows(&mut rows, self.sort);
        rows
    }
}

// ---- text (plain and TUI) ------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Column {
    title: &'static str,
    width: u16,
    right: bool,
}

const fn left(title: &'static str, width: u16) -> Column {
    Column {
        title,
        width,
        right: false,
    }
}

const fn right(title: &'static str, width: u16) -> Column {
    Column {
        title,
        width,
        right: true,
    }
}

const CONN_COLUMNS: &[Column] = &[
    right("PID", 7),
    left("COMM", 15),
    left("PROTO", 5),
    left("LOCAL", 26),
    left("REMOTE", 26),
    left("STATE", 11),
    right("TX_TOTAL", 9),
    right("RX_TOTAL", 9),
];
const PROCESS_COLUMNS: &[Column] = &[
    right("PID", 7),
    left("COMM", 15),
    right("CONNS", 6),
    right("CLOSED", 6),
];
const CGROUP_COLUMNS: &[Column] = &[left("CGROUP", 40), right("CONNS", 6), right("CLOSED", 6)];
const RATE_COLUMNS: &[Column] = &[
    right("TX/s", 10),
    right("RX/s", 10),
    right("TX", 12),
    right("RX", 12),
    right("RETR", 5),
];

fn key_columns(by: GroupBy) -> &'static [Column] {
    match by {
        GroupBy::Conn => CONN_COLUMNS,
        GroupBy::Process => PROCESS_COLUMNS,
        GroupBy::Cgroup => CGROUP_COLUMNS,
    }
}

fn columns(by: GroupBy) -> Vec<Column> {
    key_columns(by)
        .iter()
        .chain(RATE_COLUMNS)
        .copied()
        .collect()
}

/// 512 B, 1.5 KiB, 3.2 MiB...
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn per_second(n: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn owner_cells(c: &Conn) -> [String; 2] {
    if c.owner_known {
        [c.pid.to_string(), c.comm.to_string()]
    } else {
        ["-".into(), "-".into()]
    }
}

fn conn_state(a: &Activity) -> String {
    if a.peer.is_some() || a.conn.proto == IPPROTO_UDP {
        return "-".into();
    }
    if a.closed {
        return a.conn.failure().unwrap_or_else(|| "CLOSED".into());
    }
    tcp_state_name(a.conn.state).to_owned()
}

fn remote(a: &Activity) -> (IpAddr, u16) {
    a.peer.unwrap_or((a.conn.daddr, a.conn.dport))
}

/// A TCP connection's lifetime counter as the kernel keeps it (`-` for UDP).
fn lifetime(a: &Activity, total: u64) -> String {
    if a.peer.is_some() || a.conn.proto != IPPROTO_TCP {
        return "-".into();
    }
    crate::columns::bytes(total)
}

fn lifetime_json(a: &Activity, total: u64) -> Value {
    let tcp = a.peer.is_none() && a.conn.proto == IPPROTO_TCP;
    json!(tcp.then_some(total))
}

fn cgroup_name(renderer: &mut Renderer, id: Option<u64>) -> Option<String> {
    id.and_then(|id| renderer.cgroups.as_mut().and_then(|c| c.path_of(id)))
}

fn key_cells(row: &Row, renderer: &mut Renderer) -> Vec<String> {
    let a = &row.sample;
    match row.key {
        Key::Conn { .. } => {
            let (peer, port) = remote(a);
            let [pid, comm] = owner_cells(&a.conn);
            vec![
                pid,
                comm,
                proto_name(a.conn.proto),
                socket_addr(a.conn.saddr, a.conn.sport),
                socket_addr(peer, port),
                conn_state(a),
                lifetime(a, a.conn.tx_total),
                lifetime(a, a.conn.rx_total),
            ]
        }
        Key::Process { .. } => {
            let [pid, comm] = owner_cells(&a.conn);
            vec![pid, comm, row.conns.to_string(), row.closed.to_string()]
        }
        Key::Cgroup { id } => {
            let name = match (id, cgroup_name(renderer, id)) {
                (_, Some(path)) => path,
                (Some(id), None) => format!("cgroup id {id}"),
                (None, None) => "-".into(),
            };
            vec![name, row.conns.to_string(), row.closed.to_string()]
        }
    }
}

fn row_cells(row: &Row, elapsed: Duration, renderer: &mut Renderer) -> Vec<String> {
    let mut cells = key_cells(row, renderer);
    cells.extend([
        human(per_second(row.delta.tx, elapsed)),
        human(per_second(row.delta.rx, elapsed)),
        row.delta.tx.to_string(),
        row.delta.rx.to_string(),
        row.delta.retrans.to_string(),
    ]);
    cells
}

/// A rendered interval: shared by the plain-text output and the TUI.
struct Sheet {
    title: String,
    summary: String,
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

fn summary_line(t: &Totals, elapsed: Duration) -> String {
    let l = &t.losses;
    format!(
        "conns {} tracked ({} listening), {} closed, {} UDP flows | TX {}/s RX {}/s, {} retransmits | lost {}, malformed {}, untracked {} (UDP {}), missed {}",
        t.tracked,
        t.listening,
        t.closed,
        t.udp_flows,
        human(per_second(t.delta.tx, elapsed)),
        human(per_second(t.delta.rx, elapsed)),
        t.delta.retrans,
        l.lost,
        l.malformed,
        l.untracked,
        l.udp_untracked,
        l.missed,
    )
}

fn clock(t: OffsetDateTime) -> String {
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

impl Sheet {
    /// At most `limit` rows: the TUI renders only what fits.
    fn new(report: &Report, view: View, renderer: &mut Renderer, limit: usize) -> Self {
        let rows = view
            .rows(report)
            .iter()
            .take(limit)
            .map(|r| row_cells(r, report.elapsed, renderer))
            .collect();
        Self {
            title: format!(
                "socklens top - {} UTC - interval {} ({:.2} s) - by {}, sorted by {}",
                clock(report.time),
                report.index,
                report.elapsed.as_secs_f64(),
                view.by.name(),
                view.sort.name(),
            ),
            summary: summary_line(&report.totals, report.elapsed),
            columns: columns(view.by),
            rows,
        }
    }

    fn waiting(view: View, interval: Duration) -> Self {
        Self {
            title: format!(
                "socklens top - first interval ({:.2} s) - by {}, sorted by {}",
                interval.as_secs_f64(),
                view.by.name(),
                view.sort.name()
            ),
            summary: "counting...".into(),
            columns: columns(view.by),
            rows: Vec::new(),
        }
    }

    fn line(columns: &[Column], cells: &[String]) -> String {
        let parts: Vec<String> = columns
            .iter()
            .zip(cells)
            .map(|(c, s)| {
                let w = usize::from(c.width);
                if c.right {
                    format!("{s:>w$}")
                } else {
                    format!("{s:<w$}")
                }
            })
            .collect();
        parts.join(" ").trim_end().to_owned()
    }

    fn text(&self) -> Vec<String> {
        let titles: Vec<String> = self.columns.iter().map(|c| c.title.to_owned()).collect();
        let mut lines = vec![
            self.title.clone(),
            self.summary.clone(),
            Self::line(&self.columns, &titles),
        ];
        lines.extend(self.rows.iter().map(|r| Self::line(&self.columns, r)));
        lines
    }
}

// ---- JSON ----------------------------------------------------------------

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn key_json(row: &Row, renderer: &mut Renderer) -> Value {
    let c = &row.sample.conn;
    let owner = c.owner_known;
    match row.key {
        Key::Conn { .. } => {
            let (peer, port) = remote(&row.sample);
            json!({
                "sk": format!("{:#x}", c.sk),
                "family": family_name(c.family),
                "proto": proto_name(c.proto),
                "saddr": c.saddr.to_string(),
                "sport": c.sport,
                "daddr": peer.to_string(),
                "dport": port,
                "netns": c.netns,
                "direction": c.direction,
                "state": conn_state(&row.sample),
                "tx_total": lifetime_json(&row.sample, c.tx_total),
                "rx_total": lifetime_json(&row.sample, c.rx_total),
                "pid": owner.then_some(c.pid),
                "comm": owner.then(|| c.comm.clone()),
                "cgroup_id": owner.then_some(c.cgroup_id),
                "cgroup": cgroup_name(renderer, owner.then_some(c.cgroup_id)),
            })
        }
        Key::Process { pid } => json!({
            "pid": pid,
            "comm": owner.then(|| c.comm.clone()),
        }),
        Key::Cgroup { id } => json!({
            "cgroup_id": id,
            "cgroup": cgroup_name(renderer, id),
        }),
    }
}

fn json_row(report: &Report, view: View, row: &Row, renderer: &mut Renderer) -> Value {
    let mut v = key_json(row, renderer);
    v["event"] = json!("top");
    v["interval"] = json!(report.index);
    v["interval_s"] = json!(report.elapsed.as_secs_f64());
    v["time"] = json!(report.time.format(&Rfc3339).unwrap_or_default());
    v["by"] = json!(view.by.name());
    v["conns"] = json!(row.conns);
    v["closed"] = json!(row.closed);
    v["tx_bytes"] = json!(row.delta.tx);
    v["rx_bytes"] = json!(row.delta.rx);
    v["tx_bytes_per_s"] = json!(round1(per_second(row.delta.tx, report.elapsed)));
    v["rx_bytes_per_s"] = json!(round1(per_second(row.delta.rx, report.elapsed)));
    v["retransmits"] = json!(row.delta.retrans);
    v
}

fn json_totals(report: &Report, view: View, rows: usize) -> Value {
    let t = &report.totals;
    json!({
        "event": "top_interval",
        "interval": report.index,
        "interval_s": report.elapsed.as_secs_f64(),
        "time": report.time.format(&Rfc3339).unwrap_or_default(),
        "by": view.by.name(),
        "sort": view.sort.name(),
        "rows": rows,
        "tracked": t.tracked,
        "listening": t.listening,
        "udp_flows": t.udp_flows,
        "closed": t.closed,
        "tx_bytes": t.delta.tx,
        "rx_bytes": t.delta.rx,
        "retransmits": t.delta.retrans,
        "lost": t.losses.lost,
        "malformed": t.losses.malformed,
        "untracked": t.losses.untracked,
        "udp_untracked": t.losses.udp_untracked,
        "missed": t.losses.missed,
    })
}

/// One object per row, then one `top_interval` object with the totals.
/// Rows are written as they are made: a JSON value costs a few KiB, and an
/// interval of a busy host can have tens of thousands of rows.
fn write_json(
    report: &Report,
    view: View,
    renderer: &mut Renderer,
    out: &mut dyn Write,
) -> io::Result<()> {
    let rows = view.rows(report);
    for row in &rows {
        writeln!(out, "{}", json_row(report, view, row, renderer))?;
    }
    writeln!(out, "{}", json_totals(report, view, rows.len()))
}

// ---- the terminal UI -------------------------------------------------------

fn restore_terminal() {
    // Best effort: this also runs from the panic hook, where nothing can be
    // reported.
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(io::stdout(), LeaveAlternateScreen, crossterm::cursor::Show);
}

/// Restores the terminal before a panic message is printed, so the message
/// is not lost on the alternate screen and the shell is usable after.
fn install_panic_restore() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// Raw mode and the alternate screen, undone on drop (errors and panics too).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

struct Screen<'w> {
    terminal: Terminal<CrosstermBackend<&'w mut dyn Write>>,
    _guard: TerminalGuard,
}

fn term_err(e: io::Error) -> Error {
    Error::kernel("drawing the terminal", e)
}

impl<'w> Screen<'w> {
    fn enter(out: &'w mut dyn Write) -> Result<Self> {
        install_panic_restore();
        crossterm::terminal::enable_raw_mode().map_err(term_err)?;
        let guard = TerminalGuard;
        let mut terminal = Terminal::new(CrosstermBackend::new(out)).map_err(term_err)?;
        crossterm::execute!(
            terminal.backend_mut(),
            EnterAlternateScreen,
            crossterm::cursor::Hide
        )
        .map_err(term_err)?;
        terminal.clear().map_err(term_err)?;
        Ok(Self {
            terminal,
            _guard: guard,
        })
    }

    /// Rows that fit under the two header lines, the column titles and the footer.
    fn visible_rows(&self) -> usize {
        self.terminal
            .size()
            .map_or(0, |s| usize::from(s.height).saturating_sub(4))
    }

    fn show(&mut self, report: &Report, view: View, renderer: &mut Renderer) -> Result<()> {
        let sheet = Sheet::new(report, view, renderer, self.visible_rows());
        self.draw(&sheet)
    }

    fn draw(&mut self, sheet: &Sheet) -> Result<()> {
        let header = TableRow::new(sheet.columns.iter().map(|c| Cell::from(c.title)))
            .style(Style::default().add_modifier(Modifier::REVERSED));
        let rows = sheet.rows.iter().map(|cells| {
            TableRow::new(sheet.columns.iter().zip(cells).map(|(c, s)| {
                let align = if c.right {
                    Alignment::Right
                } else {
                    Alignment::Left
                };
                Cell::from(Line::from(s.as_str()).alignment(align))
            }))
        });
        let widths = sheet.columns.iter().map(|c| Constraint::Length(c.width));
        let table = Table::new(rows, widths).header(header).column_spacing(1);
        let head = Paragraph::new(vec![
            Line::from(sheet.title.as_str()),
            Line::from(sheet.summary.as_str()),
        ]);
        let foot =
            Paragraph::new("q quit   s sort (rx/tx/retrans)   b group by (conn/process/cgroup)")
                .style(Style::default().add_modifier(Modifier::DIM));
        self.terminal
            .draw(|f| {
                let [top, body, bottom] = Layout::vertical([
                    Constraint::Length(2),
                    Constraint::Min(1),
                    Constraint::Length(1),
                ])
                .areas(f.area());
                f.render_widget(head, top);
                f.render_widget(table, body);
                f.render_widget(foot, bottom);
            })
            .map_err(term_err)?;
        Ok(())
    }
}

/// What a key press asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Quit,
    NextSort,
    NextGroup,
    Redraw,
}

fn input_of(key: KeyEvent) -> Option<Input> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    match key.code {
        // Raw mode turns Ctrl-C into a key, not a SIGINT.
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Some(Input::Quit),
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Input::Quit),
        KeyCode::Char('s') => Some(Input::NextSort),
        KeyCode::Char('b') => Some(Input::NextGroup),
        _ => None,
    }
}

/// Key presses and resizes waiting in the terminal, without blocking.
fn pending_input() -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    while event::poll(Duration::ZERO).map_err(term_err)? {
        match event::read().map_err(term_err)? {
            TermEvent::Key(k) => inputs.extend(input_of(k)),
            TermEvent::Resize(..) => inputs.push(Input::Redraw),
            _ => {}
        }
    }
    Ok(inputs)
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
            Err(e) => Err(Error::kernel("writing top", e)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Direction;
    use crate::output::Clock;
    use std::net::Ipv4Addr;

    fn conn(sk: u64, start_ns: u64, tx: u64, rx: u64) -> Conn {
        Conn::sample(sk, start_ns, tx, rx)
    }

    fn map(conns: &[Conn]) -> BTreeMap<u64, Conn> {
        conns.iter().map(|c| (c.sk, c.clone())).collect()
    }

    fn deltas(acts: &[Activity]) -> Vec<(u64, u64, u64, bool)> {
        let mut v: Vec<_> = acts
            .iter()
            .map(|a| (a.conn.sk, a.delta.tx, a.delta.rx, a.closed))
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn first_interval_counts_from_attach_and_later_ones_from_the_last_snapshot() {
        let mut acct = Accountant::new(&[]);
        let acts = acct.tick(&map(&[conn(1, 10, 500, 20)]), &[]);
        assert_eq!(deltas(&acts), [(1, 500, 20, false)]);
        let acts = acct.tick(&map(&[conn(1, 10, 800, 20)]), &[]);
        assert_eq!(deltas(&acts), [(1, 300, 0, false)]);
        let acts = acct.tick(&map(&[conn(1, 10, 800, 20)]), &[]);
        assert!(acts.is_empty(), "an idle connection has no row");
    }

    #[test]
    fn a_closed_connection_counts_its_final_counters_minus_the_baseline() {
        let mut acct = Accountant::new(&[]);
        acct.tick(&map(&[conn(1, 10, 100, 100)]), &[]);
        let mut last = conn(1, 10, 150, 400);
        last.end_ns = 99;
        acct.on_close(last);
        let acts = acct.tick(&BTreeMap::new(), &[]);
        assert_eq!(deltas(&acts), [(1, 50, 300, true)]);
        // Opened and closed inside one interval: everything counts.
        acct.on_close(conn(2, 20, 7, 9));
        let acts = acct.tick(&BTreeMap::new(), &[]);
        assert_eq!(deltas(&acts), [(2, 7, 9, true)]);
    }

    #[test]
    fn a_close_seen_before_the_map_delete_is_not_counted_twice() {
        let mut acct = Accountant::new(&[]);
        acct.tick(&map(&[conn(1, 10, 100, 0)]), &[]);
        acct.on_close(conn(1, 10, 120, 0));
        acct.on_close(conn(1, 10, 120, 0));
        // The snapshot was read before the kernel deleted the entry.
        let acts = acct.tick(&map(&[conn(1, 10, 120, 0)]), &[]);
        assert_eq!(deltas(&acts), [(1, 20, 0, true)]);
        let acts = acct.tick(&map(&[conn(1, 10, 120, 0)]), &[]);
        assert!(acts.is_empty());
    }

    #[test]
    fn a_close_delivered_after_the_snapshot_subtracts_what_it_counted() {
        let mut acct = Accountant::new(&[]);
        acct.tick(&map(&[conn(1, 10, 100, 0)]), &[]);
        // Gone from the map; the close event is still in the buffer.
        assert!(acct.tick(&BTreeMap::new(), &[]).is_empty());
        acct.on_close(conn(1, 10, 130, 0));
        assert_eq!(
            deltas(&acct.tick(&BTreeMap::new(), &[])),
            [(1, 30, 0, true)]
        );
    }

    #[test]
    fn a_reused_socket_address_is_a_new_connection() {
        let mut acct = Accountant::new(&[]);
        acct.tick(&map(&[conn(1, 10, 1000, 0)]), &[]);
        acct.on_close(conn(1, 10, 1000, 0));
        let acts = acct.tick(&map(&[conn(1, 50, 40, 0)]), &[]);
        assert_eq!(deltas(&acts), [(1, 0, 0, true), (1, 40, 0, false)]);
    }

    #[test]
    fn seeded_retransmits_count_from_start_not_from_the_connection_start() {
        let mut old = conn(1, 10, 0, 0);
        old.seeded = true;
        old.retransmits = 40;
        let mut acct = Accountant::new([&old]);
        old.retransmits = 43;
        old.tx_bytes = 5;
        let acts = acct.tick(&map(&[old]), &[]);
        assert_eq!(acts.len(), 1);
        assert_eq!(
            acts[0].delta,
            Counters {
                tx: 5,
                rx: 0,
                retrans: 3,
                sendfile: 0,
            }
        );
    }

    #[test]
    fn udp_flows_are_counted_per_peer() {
        let mut udp = conn(5, 10, 0, 0);
        udp.proto = IPPROTO_UDP;
        let flow = |port: u16, tx: u64| UdpFlow {
            sk: 5,
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            peer_port: port,
            tx_bytes: tx,
            rx_bytes: 0,
            tx_packets: 1,
            rx_packets: 0,
            first_ns: 11,
            last_ns: 12,
            direction: Direction::Out,
            conn_start_ns: 10,
        };
        let mut acct = Accountant::new(&[]);
        let conns = map(&[udp]);
        acct.tick(&conns, &[flow(53, 100), flow(54, 10)]);
        let acts = acct.tick(&conns, &[flow(53, 160), flow(54, 10)]);
        assert_eq!(acts.len(), 1);
        assert_eq!(acts[0].peer.map(|p| p.1), Some(53));
        assert_eq!(acts[0].delta.tx, 60);
    }

    fn activity(c: Conn, closed: bool) -> Activity {
        Activity {
            delta: Counters::of(&c),
            conn: c,
            peer: None,
            closed,
        }
    }

    #[test]
    fn groups_by_process_and_cgroup_and_sorts_largest_first() {
        let mut a = conn(1, 1, 10, 1000);
        a.pid = 1;
        let mut b = conn(2, 1, 20, 5);
        b.pid = 2;
        b.cgroup_id = 8;
        let mut c = conn(3, 1, 30, 5);
        c.pid = 2;
        c.cgroup_id = 8;
        let acts = [activity(a, false), activity(b, true), activity(c, false)];
        let mut rows = group(&acts, GroupBy::Process);
        sort_rows(&mut rows, SortKey::Tx);
        assert_eq!(rows[0].key, Key::Process { pid: Some(2) });
        assert_eq!(
            (rows[0].delta.tx, rows[0].conns, rows[0].closed),
            (50, 2, 1)
        );
        sort_rows(&mut rows, SortKey::Rx);
        assert_eq!(rows[0].key, Key::Process { pid: Some(1) });
        let rows = group(&acts, GroupBy::Cgroup);
        assert_eq!(rows.len(), 2);
        assert_eq!(group(&acts, GroupBy::Conn).len(), 3);
    }

    fn renderer() -> Renderer {
        Renderer {
            clock: Clock::now(),
            cgroups: None,
            json: false,
            layout: crate::columns::Layout::default(),
        }
    }

    fn report(acts: Vec<Activity>) -> Report {
        Report {
            index: 3,
            elapsed: Duration::from_secs(2),
            totals: Totals::new(&BTreeMap::new(), &[], &acts, Losses::default()),
            activities: acts,
            time: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn text_has_a_header_of_totals_and_exact_bytes() {
        let r = report(vec![activity(conn(1, 1, 4096, 2048), false)]);
        let view = View {
            by: GroupBy::Conn,
            sort: SortKey::Rx,
        };
        let lines = Sheet::new(&r, view, &mut renderer(), usize::MAX).text();
        assert!(lines[0].contains("interval 3 (2.00 s)"), "{lines:?}");
        assert!(lines[1].contains("TX 2.0 KiB/s RX 1.0 KiB/s"), "{lines:?}");
        assert!(lines[2].starts_with("    PID COMM"), "{lines:?}");
        assert!(lines[3].contains("127.0.0.1:40000"), "{lines:?}");
        assert!(lines[3].contains(" 4096 "), "{lines:?}");
        assert!(lines[3].contains("ESTABLISHED"), "{lines:?}");
        // The kernel's lifetime counters (Conn::sample: the same as tx/rx).
        assert!(lines[2].contains("TX_TOTAL  RX_TOTAL"), "{lines:?}");
        assert!(lines[3].contains(" 4096B     2048B "), "{lines:?}");
        assert!(lines.iter().all(|l| !l.contains('\x1b')));
    }

    #[test]
    fn json_rows_carry_interval_totals_and_rates() {
        let mut closed = conn(1, 1, 300, 100);
        closed.end_ns = 5;
        let r = report(vec![activity(closed, true)]);
        let view = View {
            by: GroupBy::Process,
            sort: SortKey::Rx,
        };
        let mut out = Vec::new();
        write_json(&r, view, &mut renderer(), &mut out).unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let row = &lines[0];
        assert_eq!(row["event"], "top");
        assert_eq!(row["interval"], 3);
        assert_eq!(row["by"], "process");
        assert_eq!(row["pid"], 100);
        assert_eq!(row["comm"], "curl");
        assert_eq!(row["tx_bytes"], 300);
        assert!(row.get("tx_total").is_none(), "per connection only: {row}");
        let mut out = Vec::new();
        let by_conn = View {
            by: GroupBy::Conn,
            sort: SortKey::Rx,
        };
        write_json(&r, by_conn, &mut renderer(), &mut out).unwrap();
        let conn_row: Value =
            serde_json::from_slice(out.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(
            (&conn_row["tx_total"], &conn_row["rx_total"]),
            (&json!(300), &json!(100))
        );
        assert_eq!(row["tx_bytes_per_s"], 150.0);
        assert_eq!(row["closed"], 1);
        assert_eq!(lines[1]["event"], "top_interval");
        assert_eq!(lines[1]["closed"], 1);
        assert_eq!(lines[1]["rx_bytes"], 100);
    }

    #[test]
    fn keys_quit_and_cycle() {
        let key = |code, modifiers| input_of(KeyEvent::new(code, modifiers));
        assert_eq!(
            key(KeyCode::Char('q'), KeyModifiers::NONE),
            Some(Input::Quit)
        );
        assert_eq!(
            key(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Input::Quit)
        );
        assert_eq!(key(KeyCode::Char('c'), KeyModifiers::NONE), None);
        assert_eq!(
            key(KeyCode::Char('s'), KeyModifiers::NONE),
            Some(Input::NextSort)
        );
        assert_eq!(SortKey::Retrans.next(), SortKey::Rx);
        assert_eq!(GroupBy::Cgroup.next(), GroupBy::Conn);
    }

    #[test]
    fn human_units() {
        assert_eq!(human(0.0), "0 B");
        assert_eq!(human(1023.0), "1023 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
