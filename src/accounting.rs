//! Per-interval accounting, used by `socklens top` and the agent: turns
//! map snapshots and close events into what each connection did since the
//! last snapshot.
//!
//! Each interval ends with a snapshot of the maps. A connection's share of
//! the interval is its counters now minus its counters at the previous
//! snapshot (its baseline). Connections that closed during the interval are
//! gone from the map by then: their final counters arrive with the close
//! event, and their share is those minus the baseline. A connection is known
//! by its socket address *and* its tracking start, because the kernel reuses
//! socket addresses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use time::OffsetDateTime;

use crate::model::Losses;
use crate::model::{Conn, UdpFlow};

const TCP_LISTEN: u8 = 10;
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

    pub fn next(self) -> Self {
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

    pub fn next(self) -> Self {
        match self {
            Self::Conn => Self::Process,
            Self::Process => Self::Cgroup,
            Self::Cgroup => Self::Conn,
        }
    }
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
    pub fn new(
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
    pub fn rows(self, report: &Report) -> Vec<Row> {
        let mut rows = group(&report.activities, self.by);
        sort_rows(&mut rows, self.sort);
        rows
    }
}

#[cfg(test)]
impl Activity {
    /// A connection's whole counters as one interval's share, for unit tests.
    pub fn sample(conn: Conn, closed: bool) -> Self {
        Self {
            delta: Counters::of(&conn),
            conn,
            peer: None,
            closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Direction;
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
        udp.proto = libc::IPPROTO_UDP as u16;
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
        Activity::sample(c, closed)
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
}
