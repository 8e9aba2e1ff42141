//! Rendering events: bindsnoop/solisten-style columns and JSON lines.

use serde::Serialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::cgroup::CgroupPaths;
use crate::model::{
    errno_name, family_name, proto_name, tcp_state_name, Conn, ConnEvent, Direction, Event,
    SockEvent, SockEventKind, UdpFlow,
};
use crate::plan::Tier;

/// Converts CLOCK_MONOTONIC stamps (bpf_ktime_get_ns) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

fn clock_ns(id: nix::time::ClockId) -> i128 {
    nix::time::clock_gettime(id)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
        .unwrap_or(0)
}

impl Clock {
    pub fn now() -> Self {
        let mono = clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
        let real = clock_ns(nix::time::ClockId::CLOCK_REALTIME);
        Self {
            realtime_minus_monotonic_ns: real - mono,
        }
    }

    pub fn wall(&self, mono_ns: u64) -> OffsetDateTime {
        let ns = i128::from(mono_ns) + self.realtime_minus_monotonic_ns;
        OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    pub fn iso(&self, mono_ns: u64) -> String {
        self.wall(mono_ns).format(&Rfc3339).unwrap_or_default()
    }
}

/// The JSON form of a tracked connection (field names are the interface).
#[derive(Serialize)]
struct ConnRecord<'c> {
    sk: String,
    cookie: u64,
    family: &'static str,
    proto: String,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    netns: u32,
    direction: Direction,
    state: &'static str,
    pid: Option<u32>,
    comm: Option<&'c str>,
    uid: Option<u32>,
    cgroup_id: Option<u64>,
    cgroup: Option<String>,
    tx_bytes: u64,
    rx_bytes: u64,
    sendfile_bytes: u64,
    retransmits: u32,
    srtt_us: u32,
    rttvar_us: u32,
    start: Option<String>,
    end: Option<String>,
    duration_ms: Option<f64>,
    failure: Option<String>,
    seeded: bool,
    /// Only on the rare close the state hook missed (see README).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    close_at_destroy: bool,
}

#[derive(Serialize)]
struct ConnEventRecord<'c> {
    event: &'static str,
    time: String,
    time_ns: u64,
    attach: Tier,
    #[serde(flatten)]
    conn: ConnRecord<'c>,
}

/// Everything needed to turn events into text.
pub struct Renderer {
    pub clock: Clock,
    pub cgroups: Option<CgroupPaths>,
    pub json: bool,
}

impl Renderer {
    pub fn header(&self) -> Option<String> {
        (!self.json).then(|| {
            format!(
                "{:<12} {:<6} {:>7} {:<16} {:<16} {:<5} {:<5} {:>3} {:<13} {:>10}  {:<6} {}",
                "TIME",
                "EVENT",
                "PID",
                "COMM",
                "RET",
                "PROTO",
                "OPTS",
                "IF",
                "BACKLOG",
                "NETNS",
                "PORT",
                "ADDR"
            )
        })
    }

    pub fn render(&mut self, event: &Event) -> String {
        match event {
            Event::Sock(e) if self.json => self.sock_json(e).to_string(),
            Event::Sock(e) => self.sock_columns(e),
            Event::Conn(e) if self.json => self.conn_event_line(e),
            Event::Conn(e) => self.conn_event_columns(e),
            Event::Cg(e) if self.json => crate::cgevents::json(self, e).to_string(),
            Event::Cg(e) => crate::cgevents::columns(self, e),
        }
    }

    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        self.cgroups.as_mut().and_then(|c| c.path_of(id))
    }

    pub fn sock_json(&mut self, e: &SockEvent) -> Value {
        let errno = errno_name(e.ret);
        let mut v = json!({
            "event": e.kind.name(),
            "time": self.clock.iso(e.ts_ns),
            "time_ns": e.ts_ns,
            "pid": e.pid,
            "tid": e.tid,
            "uid": e.uid,
            "comm": e.comm,
            "cgroup_id": e.cgroup_id,
            "cgroup": self.cgroup_path(e.cgroup_id),
            "netns": e.netns,
            "family": family_name(e.family),
            "proto": proto_name(e.proto),
            "addr": e.addr.to_string(),
            "port": e.port,
            "ret": e.ret,
            "errno": (!errno.is_empty()).then_some(errno),
            "attach": e.tier,
        });
        match e.kind {
            SockEventKind::Bind => {
                v["opts"] = json!(e.opts.names());
                v["bound_dev_if"] = json!(e.bound_dev_if);
            }
            SockEventKind::Listen => {
                v["backlog_requested"] = json!(e.backlog_req);
                v["backlog"] = json!(e.backlog);
            }
        }
        v
    }

    /// Every field of a tracked connection, shared by events and snapshots.
    pub fn conn_json(&mut self, c: &Conn) -> Value {
        serde_json::to_value(self.conn_record(c)).unwrap_or(Value::Null)
    }

    fn conn_record<'c>(&mut self, c: &'c Conn) -> ConnRecord<'c> {
        let owner = c.owner_known;
        ConnRecord {
            sk: format!("{:#x}", c.sk),
            cookie: c.cookie,
            family: family_name(c.family),
            proto: proto_name(c.proto),
            saddr: c.saddr.to_string(),
            sport: c.sport,
            daddr: c.daddr.to_string(),
            dport: c.dport,
            netns: c.netns,
            direction: c.direction,
            state: tcp_state_name(c.state),
            pid: owner.then_some(c.pid),
            comm: owner.then_some(c.comm.as_str()),
            uid: owner.then_some(c.uid),
            cgroup_id: owner.then_some(c.cgroup_id),
            cgroup: if owner {
                self.cgroup_path(c.cgroup_id)
            } else {
                None
            },
            tx_bytes: c.tx_bytes,
            rx_bytes: c.rx_bytes,
            sendfile_bytes: c.sendfile_bytes,
            retransmits: c.retransmits,
            srtt_us: c.srtt_us,
            rttvar_us: c.rttvar_us,
            start: (c.start_ns > 0).then(|| self.clock.iso(c.start_ns)),
            end: (c.end_ns > 0).then(|| self.clock.iso(c.end_ns)),
            duration_ms: c.duration_ms(),
            failure: c.failure(),
            seeded: c.seeded,
            close_at_destroy: c.closed_at_destroy,
        }
    }

    /// A connection event as one JSON line. Serialized straight from a
    /// struct: building a `Value` first cost most of the agent's time per
    /// event under connection churn.
    pub fn conn_event_line(&mut self, e: &ConnEvent) -> String {
        let record = ConnEventRecord {
            event: e.kind.name(),
            time: self.clock.iso(e.ts_ns),
            time_ns: e.ts_ns,
            attach: e.tier,
            conn: self.conn_record(&e.conn),
        };
        serde_json::to_string(&record).unwrap_or_default()
    }

    pub fn conn_event_json(&mut self, e: &ConnEvent) -> Value {
        serde_json::from_str(&self.conn_event_line(e)).unwrap_or(Value::Null)
    }

    pub fn udp_flow_json(&mut self, owner: Option<&Conn>, f: &UdpFlow) -> Value {
        let mut v = owner
            .map(|c| self.conn_json(c))
            .unwrap_or_else(|| json!({}));
        for k in [
            "state",
            "daddr",
            "dport",
            "retransmits",
            "srtt_us",
            "rttvar_us",
            "sendfile_bytes",
            "failure",
        ] {
            if let Some(obj) = v.as_object_mut() {
                obj.remove(k);
            }
        }
        v["event"] = json!("udp_flow");
        v["proto"] = json!("udp");
        v["sk"] = json!(format!("{:#x}", f.sk));
        v["peer"] = json!(f.peer.to_string());
        v["peer_port"] = json!(f.peer_port);
        v["direction"] = json!(f.direction);
        v["tx_bytes"] = json!(f.tx_bytes);
        v["rx_bytes"] = json!(f.rx_bytes);
        v["tx_packets"] = json!(f.tx_packets);
        v["rx_packets"] = json!(f.rx_packets);
        v["start"] = json!(self.clock.iso(f.first_ns));
        v["last"] = json!(self.clock.iso(f.last_ns));
        v
    }

    pub const CONN_HEADER: &'static str = "EVENT      PID     COMM             DIR PROTO LOCAL                          REMOTE                                  TX        RX  RETR   RTT_US        MS STATE";

    fn conn_columns(&self, kind: &str, c: &Conn) -> String {
        let (pid, comm) = if c.owner_known {
            (c.pid.to_string(), c.comm.as_str())
        } else {
            ("-".into(), "-")
        };
        let state = c
            .failure()
            .unwrap_or_else(|| tcp_state_name(c.state).to_owned());
        let ms = c
            .duration_ms()
            .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}"));
        format!(
            "{kind:<10} {pid:>7} {comm:<16} {:<3} {:<5} {:<30} {:<30} {:>9} {:>9} {:>5} {:>8} {ms:>9} {state}",
            c.direction.name(),
            proto_name(c.proto),
            socket_addr(c.saddr, c.sport),
            socket_addr(c.daddr, c.dport),
            c.tx_bytes,
            c.rx_bytes,
            c.retransmits,
            c.srtt_us,
        )
    }

    fn conn_event_columns(&self, e: &ConnEvent) -> String {
        self.conn_columns(e.kind.name(), &e.conn)
    }

    pub fn conn_snapshot_columns(&self, c: &Conn) -> String {
        self.conn_columns("conn", c)
    }

    pub fn udp_flow_columns(&self, owner: Option<&Conn>, f: &UdpFlow) -> String {
        let (pid, comm, local) = owner.map_or_else(
            || ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            |c| {
                let pid = if c.owner_known {
                    c.pid.to_string()
                } else {
                    "-".into()
                };
                (pid, c.comm.clone(), socket_addr(c.saddr, c.sport))
            },
        );
        format!(
            "{:<10} {pid:>7} {comm:<16} {:<3} {:<5} {local:<30} {:<30} {:>9} {:>9} {:>5} {:>8} {:>9} pkts {}/{}",
            "udp_flow",
            f.direction.name(),
            "udp",
            socket_addr(f.peer, f.peer_port),
            f.tx_bytes,
            f.rx_bytes,
            "-",
            "-",
            "-",
            f.tx_packets,
            f.rx_packets,
        )
    }

    fn sock_columns(&self, e: &SockEvent) -> String {
        let time = self.clock.wall(e.ts_ns);
        let ret = match e.ret {
            0 => "0".to_owned(),
            r => format!("{r} {}", errno_name(r)),
        };
        let (opts, dev, backlog) = match e.kind {
            SockEventKind::Bind => (e.opts.letters(), e.bound_dev_if.to_string(), "-".to_owned()),
            SockEventKind::Listen => (
                "-".to_owned(),
                "-".to_owned(),
                format!("{}/{}", e.backlog_req, e.backlog),
            ),
        };
        format!(
            "{:02}:{:02}:{:02}.{:03} {:<6} {:>7} {:<16} {:<16} {:<5} {:<5} {:>3} {:<13} {:>10}  {:<6} {}",
            time.hour(),
            time.minute(),
            time.second(),
            time.millisecond(),
            e.kind.name(),
            e.pid,
            e.comm,
            ret,
            proto_name(e.proto),
            opts,
            dev,
            backlog,
            e.netns,
            e.port,
            e.addr
        )
    }
}

/// `1.2.3.4:80` or `[::1]:80`.
pub fn socket_addr(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SockOpts;
    use crate::plan::Tier;
    use std::net::{IpAddr, Ipv6Addr};

    fn listen_event() -> SockEvent {
        SockEvent {
            kind: SockEventKind::Listen,
            tier: Tier::Tracepoint,
            ts_ns: 1_000,
            pid: 7,
            tid: 8,
            uid: 0,
            comm: "srv".into(),
            cgroup_id: 1,
            netns: 4_026_531_840,
            family: libc::AF_INET6 as u16,
            proto: 6,
            sock_type: 1,
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            port: 443,
            ret: 0,
            opts: SockOpts(0),
            bound_dev_if: 0,
            backlog_req: 100_000,
            backlog: 4096,
        }
    }

    fn renderer(json: bool) -> Renderer {
        Renderer {
            clock: Clock {
                realtime_minus_monotonic_ns: 1_700_000_000_000_000_000,
            },
            cgroups: None,
            json,
        }
    }

    #[test]
    fn listen_json_has_both_backlogs() {
        let v = renderer(true).sock_json(&listen_event());
        assert_eq!(v["event"], "listen");
        assert_eq!(v["family"], "inet6");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["addr"], "::1");
        assert_eq!(v["backlog_requested"], 100_000);
        assert_eq!(v["backlog"], 4096);
        assert_eq!(v["errno"], Value::Null);
        assert_eq!(v["attach"], "tracepoint");
        assert_eq!(v["time"], "2023-11-14T22:13:20.000001Z");
        assert!(v.get("opts").is_none());
    }

    #[test]
    fn failed_bind_columns_show_errno_and_opts() {
        let mut e = listen_event();
        e.kind = SockEventKind::Bind;
        e.ret = -98;
        e.opts = SockOpts(1 | 2);
        let line = renderer(false).render(&Event::Sock(e));
        assert!(line.contains("bind"), "{line}");
        assert!(line.contains("-98 EADDRINUSE"), "{line}");
        assert!(line.contains("...Rr"), "{line}");
        assert!(line.ends_with("443    ::1"), "{line}");
    }

    #[test]
    fn header_only_for_columns() {
        assert!(renderer(true).header().is_none());
        assert!(renderer(false).header().unwrap().starts_with("TIME"));
    }
}
