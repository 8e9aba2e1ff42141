//! Every rendering: the columns view (`columns`) and JSON lines of each
//! record type, and `top`'s intervals.

pub mod cg;
pub mod columns;
pub mod json;
pub mod policy;
pub mod rfc3339;
pub mod top;

pub use rfc3339::Clock;

use crate::host::cgroup::CgroupPaths;
use crate::model::{
    errno_name, family_name, known_proto_name, proto_name, tcp_state_name, Conn, ConnEvent, Event,
    SockEvent, SockEventKind, UdpFlow,
};
use crate::output::columns::{Layout, Row};
use crate::output::json::{line, JsonObject};

/// The columns view's row of any event; each kind's module builds its own.
pub fn event_row(event: &Event) -> Row {
    match event {
        Event::Sock(e) => columns::sock_row(e),
        Event::Conn(e) => columns::conn_event_row(e),
        Event::Cg(e) => cg::row(e),
    }
}

/// Everything needed to turn events into text.
pub struct Renderer {
    pub clock: Clock,
    pub cgroups: Option<CgroupPaths>,
    pub json: bool,
    /// Column widths of the columns view.
    pub layout: Layout,
    /// The session counted skipped hook runs: accelerated connections'
    /// redirected bytes may then be short (`maybe_short`, docs/json.md).
    pub missed_runs: bool,
}

impl Renderer {
    pub fn header(&self) -> Option<String> {
        (!self.json).then(|| self.layout.header())
    }

    /// A row of the columns view.
    pub fn columns(&self, row: &Row) -> String {
        self.layout.render(&self.clock, row)
    }

    pub fn render(&mut self, event: &Event) -> String {
        match event {
            Event::Sock(e) if self.json => self.sock_line(e),
            Event::Conn(e) if self.json => {
                let mut line = Vec::new();
                self.write_conn_event(e, &mut line);
                utf8(line)
            }
            Event::Cg(e) if self.json => cg::json_line(&self.clock, self.cgroups.as_mut(), e),
            _ => self.columns(&event_row(event)),
        }
    }

    /// `render`'s text appended to `out`: the per-event path of `trace`,
    /// which reuses one buffer instead of a `String` per line.
    pub fn render_into(&mut self, event: &Event, out: &mut Vec<u8>) {
        match event {
            Event::Conn(e) if self.json => self.write_conn_event(e, out),
            _ => out.extend_from_slice(self.render(event).as_bytes()),
        }
    }

    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        self.cgroups.as_mut().and_then(|c| c.path_of(id))
    }

    /// A bind or listen event as one JSON line.
    pub fn sock_line(&mut self, e: &SockEvent) -> String {
        let errno = errno_name(e.ret);
        let cgroup = self.cgroup_path(e.cgroup_id);
        line(|obj| {
            obj.plain("event", e.kind.name());
            obj.plain_str("time", |out| self.clock.write_iso(e.ts_ns, out));
            obj.uint("time_ns", e.ts_ns);
            obj.uint("pid", e.pid);
            obj.uint("tid", e.tid);
            obj.uint("uid", e.uid);
            obj.value("comm", &e.comm);
            obj.uint("cgroup_id", e.cgroup_id);
            obj.value("cgroup", &cgroup);
            obj.uint("netns", e.netns);
            obj.plain("family", family_name(e.family));
            obj.value("proto", &proto_name(e.proto));
            obj.ip("addr", e.addr);
            obj.uint("port", e.port);
            obj.value("ret", &e.ret);
            obj.value("errno", &(!errno.is_empty()).then_some(errno));
            obj.plain("attach", e.tier.name());
            match e.kind {
                SockEventKind::Bind => {
                    obj.value("opts", &e.opts.names());
                    obj.uint("bound_dev_if", e.bound_dev_if);
                }
                SockEventKind::Listen => {
                    obj.value("backlog_requested", &e.backlog_req);
                    obj.uint("backlog", e.backlog);
                }
            }
        })
    }

    /// Every field of a tracked connection, shared by events and snapshots.
    /// A connection of a `conns` snapshot as one JSON line.
    pub fn conn_line(&mut self, c: &Conn) -> String {
        let mut out = Vec::with_capacity(512);
        let mut obj = JsonObject::new(&mut out);
        obj.plain("event", "conn");
        self.write_conn_members(&mut obj, c);
        obj.finish();
        utf8(out)
    }

    /// A connection's members, in the order of the interface.
    fn write_conn_members(&mut self, obj: &mut JsonObject<'_>, c: &Conn) {
        obj.hex("sk", c.sk);
        obj.uint("cookie", c.cookie);
        obj.plain("family", family_name(c.family));
        match known_proto_name(c.proto) {
            Some(name) => obj.plain("proto", name),
            None => obj.value("proto", &proto_name(c.proto)),
        }
        obj.ip("saddr", c.saddr);
        obj.uint("sport", c.sport);
        obj.ip("daddr", c.daddr);
        obj.uint("dport", c.dport);
        if let Some(s) = &c.steer {
            obj.plain("steered", s.kind);
            obj.ip("orig_addr", s.addr);
            obj.uint("orig_port", s.port);
        }
        obj.uint("netns", c.netns);
        obj.plain("direction", c.direction.json_name());
        obj.plain("state", tcp_state_name(c.state));
        self.write_owner_members(obj, c);
        obj.uint("tx_bytes", c.tx_bytes);
        obj.uint("rx_bytes", c.rx_bytes);
        let tcp = c.proto == libc::IPPROTO_TCP as u16;
        obj.uint_or_null("tx_total", tcp.then_some(c.tx_total));
        obj.uint_or_null("rx_total", tcp.then_some(c.rx_total));
        obj.uint("sendfile_bytes", c.sendfile_bytes);
        obj.uint("retransmits", c.retransmits);
        obj.uint("srtt_us", c.srtt_us);
        obj.uint("rttvar_us", c.rttvar_us);
        self.write_time_or_null(obj, "start", c.start_ns);
        self.write_time_or_null(obj, "end", c.end_ns);
        obj.value("duration_ms", &c.duration_ms());
        obj.value("failure", &c.failure());
        obj.bool("seeded", c.seeded);
        // Only where some bytes may have bypassed TCP (docs/accelerate.md).
        if c.accelerated {
            obj.bool("accelerated", true);
            if self.missed_runs && !c.accel_exact {
                obj.bool("maybe_short", true);
            }
        }
        // Only on the rare close the state hook missed (docs/accounting.md).
        if c.found_late {
            obj.bool("found_late", true);
        }
        if c.closed_at_destroy {
            obj.bool("close_at_destroy", true);
        }
    }

    /// Who owns a connection: null members where no hook saw the owner.
    fn write_owner_members(&mut self, obj: &mut JsonObject<'_>, c: &Conn) {
        let owner = c.owner_known;
        obj.uint_or_null("pid", owner.then_some(c.pid));
        obj.value("comm", &owner.then_some(c.comm.as_str()));
        obj.uint_or_null("uid", owner.then_some(c.uid));
        obj.uint_or_null("cgroup_id", owner.then_some(c.cgroup_id));
        let cgroup = match &mut self.cgroups {
            Some(paths) if owner => paths.path_ref(c.cgroup_id),
            _ => None,
        };
        obj.value("cgroup", &cgroup);
    }

    /// A timestamp member, null for 0 (not known).
    fn write_time_or_null(&self, obj: &mut JsonObject<'_>, key: &str, mono_ns: u64) {
        match mono_ns {
            0 => obj.null(key),
            ns => obj.plain_str(key, |out| self.clock.write_iso(ns, out)),
        }
    }

    /// A connection event as one JSON line (no newline), appended to `out`.
    pub fn write_conn_event(&mut self, e: &ConnEvent, out: &mut Vec<u8>) {
        let mut obj = JsonObject::new(out);
        obj.plain("event", e.kind.name());
        obj.plain_str("time", |out| self.clock.write_iso(e.ts_ns, out));
        obj.uint("time_ns", e.ts_ns);
        obj.plain("attach", e.tier.name());
        self.write_conn_members(&mut obj, &e.conn);
        obj.finish();
    }

    /// One peer of a UDP socket in a `conns` snapshot as one JSON line: the
    /// socket's own members (when it is tracked) and the flow's;
    /// `maybe_short` once the kernel skipped hook runs (docs/json.md).
    pub fn udp_flow_line(
        &mut self,
        owner: Option<&Conn>,
        f: &UdpFlow,
        maybe_short: bool,
    ) -> String {
        let mut out = Vec::with_capacity(512);
        let mut obj = JsonObject::new(&mut out);
        obj.plain("event", "udp_flow");
        obj.hex("sk", f.sk);
        obj.plain("proto", "udp");
        if let Some(c) = owner {
            obj.uint("cookie", c.cookie);
            obj.plain("family", family_name(c.family));
            obj.ip("saddr", c.saddr);
            obj.uint("sport", c.sport);
            obj.uint("netns", c.netns);
            self.write_owner_members(&mut obj, c);
            obj.null("tx_total");
            obj.null("rx_total");
            self.write_time_or_null(&mut obj, "end", c.end_ns);
            obj.value("duration_ms", &c.duration_ms());
            obj.bool("seeded", c.seeded);
            if c.found_late {
                obj.bool("found_late", true);
            }
            if c.closed_at_destroy {
                obj.bool("close_at_destroy", true);
            }
        }
        obj.ip("peer", f.peer);
        obj.uint("peer_port", f.peer_port);
        obj.value("direction", &f.direction);
        obj.uint("tx_bytes", f.tx_bytes);
        obj.uint("rx_bytes", f.rx_bytes);
        obj.uint("tx_packets", f.tx_packets);
        obj.uint("rx_packets", f.rx_packets);
        obj.value("start", &self.clock.iso(f.first_ns));
        obj.value("last", &self.clock.iso(f.last_ns));
        if maybe_short {
            obj.bool("maybe_short", true);
        }
        obj.finish();
        utf8(out)
    }
}

/// Text this crate wrote from `str`s and ASCII only.
fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `1.2.3.4:80` or `[::1]:80`.
pub fn socket_addr(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::plan::Tier;
    use crate::model::{ConnEventKind, Direction, SockOpts};
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
            clock: Clock::with_offset(1_700_000_000_000_000_000),
            cgroups: None,
            json,
            layout: Layout::default(),
            missed_runs: false,
        }
    }

    #[test]
    fn listen_json_has_both_backlogs() {
        let v: serde_json::Value =
            serde_json::from_str(&renderer(true).sock_line(&listen_event())).unwrap();
        assert_eq!(v["event"], "listen");
        assert_eq!(v["family"], "inet6");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["addr"], "::1");
        assert_eq!(v["backlog_requested"], 100_000);
        assert_eq!(v["backlog"], 4096);
        assert_eq!(v["errno"], serde_json::Value::Null);
        assert_eq!(v["attach"], "tracepoint");
        assert_eq!(v["time"], "2023-11-14T22:13:20.000001Z");
        assert!(v.get("opts").is_none());
    }

    #[test]
    fn header_only_for_columns() {
        assert!(renderer(true).header().is_none());
        assert!(renderer(false).header().unwrap().starts_with("TIME"));
    }

    /// Connection events covering every kind of field value: owner known or
    /// not, IPv4 and IPv6 (mapped too), fractions of all lengths, failures,
    /// an unknown protocol and direction, a comm that needs escaping.
    fn conn_events(cgroup_id: u64) -> Vec<ConnEvent> {
        let event = |kind, tier, ts_ns, conn| ConnEvent {
            kind,
            tier,
            ts_ns,
            conn,
        };
        let mut established = Conn::sample(0xffff_8880_1234_5678, 5_000_000_123, 10, 20);
        established.cgroup_id = cgroup_id;
        let mut refused = Conn::sample(1, 1_000_000_000, 0, 0);
        refused.family = libc::AF_INET6 as u16;
        refused.saddr = "::ffff:127.0.0.1".parse().unwrap();
        refused.daddr = "2001:db8::1:0:0:1".parse().unwrap();
        refused.owner_known = false;
        refused.established = false;
        refused.end_ns = 1_001_234_567;
        refused.error = libc::ECONNREFUSED;
        refused.closed_at_destroy = true;
        refused.seeded = true;
        refused.state = 7;
        refused.retransmits = 3;
        refused.srtt_us = 1500;
        refused.rttvar_us = 250;
        refused.sendfile_bytes = 99;
        let mut odd = Conn::sample(u64::MAX, 3_000_000_000, u64::MAX, 0);
        odd.comm = "a\"b\\c\x01\n\u{e9}\u{7f}".into();
        odd.proto = 200;
        odd.family = 99;
        odd.direction = Direction::Unknown;
        odd.state = 99;
        odd.end_ns = 3_002_000_000;
        odd.cgroup_id = 424_242;
        odd.pid = u32::MAX;
        odd.uid = 65534;
        let mut accepted = Conn::sample(2, 0, 0, 0);
        accepted.direction = Direction::In;
        accepted.proto = 17;
        accepted.end_ns = 9_000_000_001;
        accepted.established = false;
        let mut failed = Conn::sample(3, 10, 0, 0);
        failed.established = false;
        failed.end_ns = 1_000_000_011;
        failed.closed_at_destroy = true;
        let unknown = failed.clone();
        failed.closed_at_destroy = false;
        failed.error = libc::EHOSTUNREACH;
        let unreachable = failed.clone();
        failed.error = libc::EPROTO;
        use ConnEventKind::{Accept, Close, Established, Retransmit};
        vec![
            event(Established, Tier::Fentry, 5_123_456_789, established),
            event(Close, Tier::Kprobe, 7_000_000_000, refused),
            event(Retransmit, Tier::Tracepoint, 8_100_000_000, odd),
            event(Accept, Tier::Fentry, 0, accepted),
            event(Close, Tier::Fentry, 1_000_000_012, unknown),
            event(Close, Tier::Fentry, 1_000_000_012, unreachable),
            event(Close, Tier::Fentry, 1_000_000_012, failed),
        ]
    }

    /// The lines serde printed for `conn_events` before the renderer wrote
    /// them by hand (commit 3fa060f): names, order and formats must stay
    /// (`tx_total` and `rx_total` were added since).
    const CONN_EVENT_LINES: [&str; 7] = [
        r#"{"event":"established","time":"2023-11-14T22:13:25.123456789Z","time_ns":5123456789,"attach":"fentry","sk":"0xffff888012345678","cookie":18446612682375452280,"family":"inet","proto":"tcp","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":80,"netns":1,"direction":"out","state":"ESTABLISHED","pid":100,"comm":"curl","uid":0,"cgroup_id":CGROUP_ID,"cgroup":"/svc","tx_bytes":10,"rx_bytes":20,"tx_total":10,"rx_total":20,"sendfile_bytes":0,"retransmits":0,"srtt_us":0,"rttvar_us":0,"start":"2023-11-14T22:13:25.000000123Z","end":null,"duration_ms":null,"failure":null,"seeded":false}"#,
        r#"{"event":"close","time":"2023-11-14T22:13:27Z","time_ns":7000000000,"attach":"kprobe","sk":"0x1","cookie":1,"family":"inet6","proto":"tcp","saddr":"::ffff:127.0.0.1","sport":40000,"daddr":"2001:db8::1:0:0:1","dport":80,"netns":1,"direction":"out","state":"CLOSE","pid":null,"comm":null,"uid":null,"cgroup_id":null,"cgroup":null,"tx_bytes":0,"rx_bytes":0,"tx_total":0,"rx_total":0,"sendfile_bytes":99,"retransmits":3,"srtt_us":1500,"rttvar_us":250,"start":"2023-11-14T22:13:21Z","end":"2023-11-14T22:13:21.001234567Z","duration_ms":1.234567,"failure":"refused","seeded":true,"close_at_destroy":true}"#,
        r#"{"event":"retransmit","time":"2023-11-14T22:13:28.1Z","time_ns":8100000000,"attach":"tracepoint","sk":"0xffffffffffffffff","cookie":18446744073709551615,"family":"other","proto":"proto200","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":80,"netns":1,"direction":"unknown","state":"UNKNOWN","pid":4294967295,"comm":"a\"b\\c\u0001\né","uid":65534,"cgroup_id":424242,"cgroup":null,"tx_bytes":18446744073709551615,"rx_bytes":0,"tx_total":null,"rx_total":null,"sendfile_bytes":0,"retransmits":0,"srtt_us":0,"rttvar_us":0,"start":"2023-11-14T22:13:23Z","end":"2023-11-14T22:13:23.002Z","duration_ms":2.0,"failure":null,"seeded":false}"#,
        r#"{"event":"accept","time":"2023-11-14T22:13:20Z","time_ns":0,"attach":"fentry","sk":"0x2","cookie":2,"family":"inet","proto":"udp","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":80,"netns":1,"direction":"in","state":"ESTABLISHED","pid":100,"comm":"curl","uid":0,"cgroup_id":7,"cgroup":null,"tx_bytes":0,"rx_bytes":0,"tx_total":null,"rx_total":null,"sendfile_bytes":0,"retransmits":0,"srtt_us":0,"rttvar_us":0,"start":null,"end":"2023-11-14T22:13:29.000000001Z","duration_ms":null,"failure":null,"seeded":false}"#,
        r#"{"event":"close","time":"2023-11-14T22:13:21.000000012Z","time_ns":1000000012,"attach":"fentry","sk":"0x3","cookie":3,"family":"inet","proto":"tcp","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":80,"netns":1,"direction":"out","state":"ESTABLISHED","pid":100,"comm":"curl","uid":0,"cgroup_id":7,"cgroup":null,"tx_bytes":0,"rx_bytes":0,"tx_total":0,"rx_total":0,"sendfile_bytes":0,"retransmits":0,"srtt_us":0,"rttvar_us":0,"start":"2023-11-14T22:13:20.00000001Z","end":"2023-11-14T22:13:21.000000011Z","duration_ms":1000.000001,"failure":"unknown","seeded":false,"close_at_destroy":true}"#,
        r#"{"event":"close","time":"2023-11-14T22:13:21.000000012Z","time_ns":1000000012,"attach":"fentry","sk":"0x3","cookie":3,"family":"inet","proto":"tcp","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":80,"netns":1,"direction":"out","state":"ESTABLISHED","pid":100,"comm":"curl","uid":0,"cgroup_id":7,"cgroup":null,"tx_bytes":0,"rx_bytes":0,"tx_total":0,"rx_total":0,"sendfile_bytes":0,"retransmits":0,"srtt_us":0,"rttvar_us":0,"start":"2023-11-14T22:13:20.00000001Z","end":"2023-11-14T22:13:21.000000011Z","duration_ms":1000.000001,"failure":"unreachable","seeded":false}"#,
        r#"{"event":"close","time":"2023-11-14T22:13:21.000000012Z","time_ns":1000000012,"attach":"fentry","sk":"0x3","cookie":3,"family":"inet","proto":"tcp","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":80,"netns":1,"direction":"out","state":"ESTABLISHED","pid":100,"comm":"curl","uid":0,"cgroup_id":7,"cgroup":null,"tx_bytes":0,"rx_bytes":0,"tx_total":0,"rx_total":0,"sendfile_bytes":0,"retransmits":0,"srtt_us":0,"rttvar_us":0,"start":"2023-11-14T22:13:20.00000001Z","end":"2023-11-14T22:13:21.000000011Z","duration_ms":1000.000001,"failure":"EPROTO","seeded":false}"#,
    ];

    #[test]
    fn conn_event_lines_are_as_serde_printed_them() {
        let root = std::env::temp_dir().join(format!("sl-out-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("svc")).unwrap();
        let cgroup_id =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(root.join("svc")).unwrap());
        let mut r = renderer(true);
        r.cgroups = Some(CgroupPaths::new(root.clone()));
        for (e, expected) in conn_events(cgroup_id).iter().zip(CONN_EVENT_LINES) {
            let expected = expected.replace("CGROUP_ID", &cgroup_id.to_string());
            let mut line = Vec::new();
            r.render_into(&Event::Conn(e.clone()), &mut line);
            assert_eq!(std::str::from_utf8(&line).unwrap(), expected);
            assert_eq!(r.render(&Event::Conn(e.clone())), expected);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn snapshot_line_is_the_event_line_without_the_event_fields() {
        use serde_json::Value;
        let mut r = renderer(true);
        for e in conn_events(7) {
            let mut line: Value = serde_json::from_str(&r.render(&Event::Conn(e.clone()))).unwrap();
            for k in ["time", "time_ns", "attach"] {
                line.as_object_mut().unwrap().remove(k);
            }
            line["event"] = "conn".into();
            let snapshot: Value = serde_json::from_str(&r.conn_line(&e.conn)).unwrap();
            assert_eq!(snapshot, line);
        }
    }

    fn steered() -> ConnEvent {
        let mut c = Conn::sample(4, 10, 1, 2);
        c.daddr = "10.0.0.2".parse().unwrap();
        c.dport = 8080;
        c.steer = Some(crate::model::Steer {
            kind: "service",
            addr: "198.51.100.10".parse().unwrap(),
            port: 80,
        });
        ConnEvent {
            kind: ConnEventKind::Close,
            tier: Tier::Tracepoint,
            ts_ns: 11,
            conn: c,
        }
    }

    #[test]
    fn accelerated_connections_on_per_call_counts_are_maybe_short_once_runs_were_missed() {
        let mut r = renderer(true);
        let mut e = steered();
        let v = |r: &mut Renderer, e: &ConnEvent| {
            let event: serde_json::Value =
                serde_json::from_str(&r.render(&Event::Conn(e.clone()))).unwrap();
            let snapshot: serde_json::Value = serde_json::from_str(&r.conn_line(&e.conn)).unwrap();
            [
                event.get("maybe_short").cloned(),
                snapshot.get("maybe_short").cloned(),
            ]
        };
        r.missed_runs = true;
        assert_eq!(v(&mut r, &e), [None, None], "plain TCP has counters");
        e.conn.accelerated = true;
        assert_eq!(v(&mut r, &e), [Some(true.into()), Some(true.into())]);
        e.conn.accel_exact = true;
        assert_eq!(v(&mut r, &e), [None, None], "sk_msg's own counts");
        e.conn.accel_exact = false;
        r.missed_runs = false;
        assert_eq!(v(&mut r, &e), [None, None]);
    }

    #[test]
    fn steered_connections_name_the_address_asked_for_after_the_real_one() {
        let mut r = renderer(true);
        let e = steered();
        let line = r.render(&Event::Conn(e.clone()));
        assert!(
            line.contains(r#""daddr":"10.0.0.2","dport":8080,"steered":"service","orig_addr":"198.51.100.10","orig_port":80,"netns":1,"#),
            "{line}"
        );
        let mut line: serde_json::Value = serde_json::from_str(&line).unwrap();
        for k in ["time", "time_ns", "attach"] {
            line.as_object_mut().unwrap().remove(k);
        }
        line["event"] = "conn".into();
        let snapshot: serde_json::Value = serde_json::from_str(&r.conn_line(&e.conn)).unwrap();
        assert_eq!(snapshot, line);
        let row = crate::output::columns::conn_event_row(&e);
        assert!(
            row.details.contains(&"service=198.51.100.10:80".to_owned()),
            "{:?}",
            row.details
        );
    }

    /// The time to render a connection event as JSON, for working on that
    /// path (a figure, not a test):
    /// `cargo test --release --lib render_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test: see the comment above"]
    fn conn_event_render_cost() {
        let mut r = renderer(true);
        let mut events: Vec<Event> = conn_events(7).into_iter().map(Event::Conn).collect();
        events.push(Event::Conn(steered()));
        let rounds = 50_000;
        let mut line = Vec::new();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                for event in &mut events {
                    if let Event::Conn(e) = event {
                        e.ts_ns += 1_013; // new fractions, now and then a new second
                    }
                    line.clear();
                    r.render_into(event, &mut line);
                }
            }
            let per_event = start.elapsed().as_nanos() as f64 / (rounds * events.len()) as f64;
            best = best.min(per_event);
        }
        println!("conn event as JSON: {best:.0} ns (best of 5 runs)");
    }
}
