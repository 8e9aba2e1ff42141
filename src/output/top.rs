//! `socklens top`'s intervals as text (plain and the TUI's sheet) and JSON lines.

use std::io::{self, Write};
use std::net::IpAddr;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::accounting::{Activity, GroupBy, Key, Report, Row, Totals, View};
use crate::model::{family_name, proto_name, tcp_state_name, Conn};
use crate::output::json::{line, JsonObject};
use crate::output::{socket_addr, Renderer};

const IPPROTO_UDP: u16 = libc::IPPROTO_UDP as u16;
const IPPROTO_TCP: u16 = libc::IPPROTO_TCP as u16;

// ---- text (plain and TUI) ------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub title: &'static str,
    pub width: u16,
    pub right: bool,
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
    crate::output::columns::bytes(total)
}

fn lifetime_json(a: &Activity, total: u64) -> Option<u64> {
    let tcp = a.peer.is_none() && a.conn.proto == IPPROTO_TCP;
    tcp.then_some(total)
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
pub struct Sheet {
    pub title: String,
    pub summary: String,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<String>>,
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
    pub fn new(report: &Report, view: View, renderer: &mut Renderer, limit: usize) -> Self {
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

    pub fn waiting(view: View, interval: Duration) -> Self {
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

    pub fn text(&self) -> Vec<String> {
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

fn write_key(obj: &mut JsonObject<'_>, row: &Row, renderer: &mut Renderer) {
    let c = &row.sample.conn;
    let owner = c.owner_known;
    match row.key {
        Key::Conn { .. } => {
            let (peer, port) = remote(&row.sample);
            obj.hex("sk", c.sk);
            obj.plain("family", family_name(c.family));
            obj.value("proto", &proto_name(c.proto));
            obj.ip("saddr", c.saddr);
            obj.uint("sport", c.sport);
            obj.ip("daddr", peer);
            obj.uint("dport", port);
            obj.uint("netns", c.netns);
            obj.value("direction", &c.direction);
            obj.value("state", &conn_state(&row.sample));
            obj.uint_or_null("tx_total", lifetime_json(&row.sample, c.tx_total));
            obj.uint_or_null("rx_total", lifetime_json(&row.sample, c.rx_total));
            obj.uint_or_null("pid", owner.then_some(c.pid));
            obj.value("comm", &owner.then_some(c.comm.as_str()));
            obj.uint_or_null("cgroup_id", owner.then_some(c.cgroup_id));
            obj.value(
                "cgroup",
                &cgroup_name(renderer, owner.then_some(c.cgroup_id)),
            );
        }
        Key::Process { pid } => {
            obj.value("pid", &pid);
            obj.value("comm", &owner.then_some(c.comm.as_str()));
        }
        Key::Cgroup { id } => {
            obj.value("cgroup_id", &id);
            obj.value("cgroup", &cgroup_name(renderer, id));
        }
    }
}

fn json_row(report: &Report, view: View, row: &Row, renderer: &mut Renderer) -> String {
    line(|obj| {
        obj.plain("event", "top");
        obj.uint("interval", report.index);
        obj.value("interval_s", &report.elapsed.as_secs_f64());
        obj.value("time", &report.time.format(&Rfc3339).unwrap_or_default());
        obj.plain("by", view.by.name());
        write_key(obj, row, renderer);
        obj.value("conns", &row.conns);
        obj.value("closed", &row.closed);
        obj.uint("tx_bytes", row.delta.tx);
        obj.uint("rx_bytes", row.delta.rx);
        obj.value(
            "tx_bytes_per_s",
            &round1(per_second(row.delta.tx, report.elapsed)),
        );
        obj.value(
            "rx_bytes_per_s",
            &round1(per_second(row.delta.rx, report.elapsed)),
        );
        obj.uint("retransmits", row.delta.retrans);
    })
}

fn json_totals(report: &Report, view: View, rows: usize) -> String {
    let t = &report.totals;
    line(|obj| {
        obj.plain("event", "top_interval");
        obj.uint("interval", report.index);
        obj.value("interval_s", &report.elapsed.as_secs_f64());
        obj.value("time", &report.time.format(&Rfc3339).unwrap_or_default());
        obj.plain("by", view.by.name());
        obj.plain("sort", view.sort.name());
        obj.value("rows", &rows);
        obj.value("tracked", &t.tracked);
        obj.value("listening", &t.listening);
        obj.value("udp_flows", &t.udp_flows);
        obj.value("closed", &t.closed);
        obj.uint("tx_bytes", t.delta.tx);
        obj.uint("rx_bytes", t.delta.rx);
        obj.uint("retransmits", t.delta.retrans);
        obj.uint("lost", t.losses.lost);
        obj.uint("malformed", t.losses.malformed);
        obj.uint("untracked", t.losses.untracked);
        obj.uint("udp_untracked", t.losses.udp_untracked);
        obj.uint("missed", t.losses.missed);
    })
}

/// One object per row, then one `top_interval` object with the totals.
/// Rows are written as they are made: a JSON value costs a few KiB, and an
/// interval of a busy host can have tens of thousands of rows.
pub fn write_json(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::SortKey;

    fn conn(sk: u64, start_ns: u64, tx: u64, rx: u64) -> Conn {
        Conn::sample(sk, start_ns, tx, rx)
    }

    fn activity(c: Conn, closed: bool) -> Activity {
        Activity::sample(c, closed)
    }

    use crate::model::Losses;
    use crate::output::Clock;
    use std::collections::BTreeMap;

    fn renderer() -> Renderer {
        Renderer {
            clock: Clock::now(),
            cgroups: None,
            json: false,
            layout: crate::output::columns::Layout::default(),
            missed_runs: false,
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
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
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
        let conn_row: serde_json::Value =
            serde_json::from_slice(out.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(
            (&conn_row["tx_total"], &conn_row["rx_total"]),
            (&serde_json::json!(300), &serde_json::json!(100))
        );
        assert_eq!(row["tx_bytes_per_s"], 150.0);
        assert_eq!(row["closed"], 1);
        assert_eq!(lines[1]["event"], "top_interval");
        assert_eq!(lines[1]["closed"], 1);
        assert_eq!(lines[1]["rx_bytes"], 100);
    }

    #[test]
    fn human_units() {
        assert_eq!(human(0.0), "0 B");
        assert_eq!(human(1023.0), "1023 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
