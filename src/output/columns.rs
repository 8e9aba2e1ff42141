//! The columns view of every record, one header for any mix of events: each
//! row starts with TIME EVENT PID COMM LOCAL REMOTE and ends with DETAILS,
//! `key=value` pairs of what differs per kind (as Tetragon's compact output
//! keeps the common part fixed and the rest per event). Numbers a person
//! reads are humanised here; JSON stays exact.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};

use crate::model::{
    errno_name, proto_name, tcp_state_name, Conn, ConnEvent, ConnEventKind, Direction, SockEvent,
    SockEventKind, UdpFlow,
};
use crate::output::rfc3339::Clock;

/// `IPv4:port` at its longest, and `[IPv6]:port`.
const ADDR_V4: usize = 21;
const ADDR_V6: usize = 47;
/// The longest event name (`sock_release`, `policy_audit`).
const EVENT: usize = 12;
/// The kernel's comm is 15 bytes; bcc's tcpconnect shows 12 on narrow screens.
const COMM: usize = 15;
const COMM_NARROW: usize = 12;

/// Column widths, from the terminal's width. On a terminal rows are cut at
/// its edge with `…` (as `ps` does), so nothing wraps; `--wide`, or output
/// to a pipe or file, never cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Cut rows to this many characters.
    pub width: Option<usize>,
    comm: usize,
    addr: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Self::new(None, false)
    }
}

impl Layout {
    /// `width`: the terminal's, None when not writing to one.
    pub fn new(width: Option<usize>, wide: bool) -> Self {
        let width = width.filter(|_| !wide);
        let narrow = |below: usize| width.is_some_and(|w| w < below);
        Self {
            width,
            comm: if narrow(120) { COMM_NARROW } else { COMM },
            addr: match () {
                () if wide => ADDR_V6,
                () if narrow(130) => 15,
                () => ADDR_V4,
            },
        }
    }

    /// For stdout: its terminal's width, if it is one.
    pub fn for_stdout(wide: bool) -> Self {
        let width = std::io::stdout()
            .is_terminal()
            .then(|| crossterm::terminal::size().ok())
            .flatten()
            .map(|(w, _)| usize::from(w));
        Self::new(width, wide)
    }

    pub fn header(&self) -> String {
        self.line("TIME", "EVENT", "PID", "COMM", "LOCAL", "REMOTE", "DETAILS")
    }

    #[allow(clippy::too_many_arguments)]
    fn line(
        &self,
        time: &str,
        event: &str,
        pid: &str,
        comm: &str,
        local: &str,
        remote: &str,
        details: &str,
    ) -> String {
        let (c, a, e) = (self.comm, self.addr, EVENT);
        let mut s = String::with_capacity(128);
        let _ = write!(
            s,
            "{time:<12} {event:<e$} {pid:>7} {:<c$} {:<a$} {:<a$} {details}",
            comm.chars().take(c).collect::<String>(),
            fit(local, a),
            fit(remote, a),
        );
        let s = s.trim_end();
        match self.width {
            Some(w) if s.chars().count() > w => {
                let mut cut: String = s.chars().take(w.saturating_sub(1)).collect();
                cut.push('…');
                cut
            }
            _ => s.to_owned(),
        }
    }

    /// One row of `row`, its time rendered by `clock`.
    pub fn render(&self, clock: &Clock, row: &Row) -> String {
        let t = clock.wall(row.ts_ns);
        let time = format!(
            "{:02}:{:02}:{:02}.{:03}",
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        );
        let pid = row.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let comm = row
            .comm
            .as_deref()
            .map_or_else(|| "-".to_owned(), printable);
        let addr = |a: &Option<SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
        self.line(
            &time,
            row.event,
            &pid,
            &comm,
            &addr(&row.local),
            &addr(&row.remote),
            &row.details.join(" "),
        )
    }
}

/// `s` in at most `width` characters: a longer address keeps its port and
/// the start and end of its IP, with `…` between.
fn fit(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_owned();
    }
    let port = s.rfind(':').map_or(0, |i| s.len() - i);
    let ip = &s[..s.len() - port];
    let room = width.saturating_sub(port + 1);
    let tail = room / 2;
    let mut out: String = ip.chars().take(room - tail).collect();
    out.push('…');
    out.extend(ip.chars().skip(ip.chars().count().saturating_sub(tail)));
    out.push_str(&s[s.len() - port..]);
    out
}

/// Control characters (a comm may hold any byte) as `?`: a row stays one line.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What a row shows, before widths apply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub ts_ns: u64,
    pub event: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// `key=value` pairs, most telling first: a cut row loses the last ones.
    pub details: Vec<String>,
}

impl Row {
    pub fn kv(&mut self, key: &str, value: impl std::fmt::Display) {
        self.details.push(format!("{key}={value}"));
    }
}

/// `1000B`, `1.5KiB`, `3.2MiB`: a byte count as a person reads it.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 10_000 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// `850us`, `12.3ms`, `4.2s`.
pub fn duration_ns(ns: u64) -> String {
    match ns {
        n if n < 1_000_000 => format!("{}us", n / 1_000),
        n if n < 10_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.1}s", n as f64 / 1e9),
    }
}

fn sock_addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// TCP goes without saying; any other protocol is named.
pub fn proto_unless_tcp(row: &mut Row, proto: u16) {
    if proto != libc::IPPROTO_TCP as u16 {
        row.kv("proto", proto_name(proto));
    }
}

pub fn sock_row(e: &SockEvent) -> Row {
    let mut row = Row {
        ts_ns: e.ts_ns,
        event: e.kind.name(),
        pid: Some(e.pid),
        comm: Some(e.comm.to_string()),
        local: Some(sock_addr(e.addr, e.port)),
        ..Row::default()
    };
    proto_unless_tcp(&mut row, e.proto);
    if e.ret != 0 {
        row.kv("err", errno_name(e.ret));
    }
    match e.kind {
        SockEventKind::Bind => {
            if e.opts.0 != 0 {
                row.kv("opts", e.opts.letters());
            }
            if e.bound_dev_if != 0 {
                row.kv("if", e.bound_dev_if);
            }
        }
        SockEventKind::Listen => row.kv("backlog", format!("{}/{}", e.backlog_req, e.backlog)),
    }
    row.kv("netns", e.netns);
    row
}

fn conn_base(event: &'static str, ts_ns: u64, c: &Conn) -> Row {
    let mut row = Row {
        ts_ns,
        event,
        pid: c.owner_known.then_some(c.pid),
        comm: c.owner_known.then(|| c.comm.to_string()),
        local: Some(sock_addr(c.saddr, c.sport)),
        remote: (c.dport != 0 || !c.daddr.is_unspecified()).then(|| sock_addr(c.daddr, c.dport)),
        ..Row::default()
    };
    proto_unless_tcp(&mut row, c.proto);
    if c.direction != Direction::Unknown {
        row.kv("dir", c.direction.name());
    }
    if let Some(s) = &c.steer {
        row.kv(s.kind, sock_addr(s.addr, s.port));
    }
    row
}

pub fn conn_event_row(e: &ConnEvent) -> Row {
    let c = &e.conn;
    let mut row = conn_base(e.kind.name(), e.ts_ns, c);
    row.kv("tx", bytes(c.tx_bytes));
    row.kv("rx", bytes(c.rx_bytes));
    match e.kind {
        ConnEventKind::Close => {
            if let Some(f) = c.failure() {
                row.kv("fail", f);
            }
            if c.end_ns > c.start_ns && c.start_ns > 0 {
                row.kv("dur", duration_ns(c.end_ns - c.start_ns));
            }
        }
        ConnEventKind::Retransmit => row.kv("state", tcp_state_name(c.state)),
        ConnEventKind::Established | ConnEventKind::Accept => {}
    }
    row.kv("rtt", format!("{}us", c.srtt_us));
    if c.retransmits != 0 || e.kind == ConnEventKind::Retransmit {
        row.kv("retr", c.retransmits);
    }
    flag_kvs(&mut row, c);
    row
}

/// The flags worth a column, set ones only.
fn flag_kvs(row: &mut Row, c: &Conn) {
    if c.accelerated {
        row.kv("accel", "yes");
    }
    if c.seeded {
        row.kv("seeded", "yes");
    }
}

/// A `conns` row: since-start counts beside the kernel's lifetime ones.
pub fn conn_snapshot_row(ts_ns: u64, c: &Conn) -> Row {
    let mut row = conn_base("conn", ts_ns, c);
    row.kv("state", tcp_state_name(c.state));
    row.kv("tx", bytes(c.tx_bytes));
    row.kv("rx", bytes(c.rx_bytes));
    if c.proto == libc::IPPROTO_TCP as u16 {
        row.kv("tx_total", bytes(c.tx_total));
        row.kv("rx_total", bytes(c.rx_total));
        row.kv("retr", c.retransmits);
        row.kv("rtt", format!("{}us", c.srtt_us));
    }
    flag_kvs(&mut row, c);
    row
}

pub fn udp_flow_row(ts_ns: u64, owner: Option<&Conn>, f: &UdpFlow) -> Row {
    let mut row = Row {
        ts_ns,
        event: "udp_flow",
        pid: owner.filter(|c| c.owner_known).map(|c| c.pid),
        comm: owner.filter(|c| c.owner_known).map(|c| c.comm.to_string()),
        local: owner.map(|c| sock_addr(c.saddr, c.sport)),
        remote: Some(sock_addr(f.peer, f.peer_port)),
        ..Row::default()
    };
    if f.direction != Direction::Unknown {
        row.kv("dir", f.direction.name());
    }
    row.kv("tx", bytes(f.tx_bytes));
    row.kv("rx", bytes(f.rx_bytes));
    row.kv("pkts", format!("{}/{}", f.tx_packets, f.rx_packets));
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::plan::Tier;
    use crate::model::cg::CgEvent;
    use crate::model::{Event, SockOpts};
    use crate::skel::policy::types::{slp_action, slp_event_kind as K, slp_op};

    const MS: u64 = 1_000_000;

    fn clock() -> Clock {
        Clock::with_offset(1_700_000_000_000_000_000)
    }

    fn sock(kind: SockEventKind, ts_ns: u64) -> Event {
        Event::Sock(SockEvent {
            kind,
            tier: Tier::Tracepoint,
            ts_ns,
            pid: 4_194_304,
            tid: 4_194_304,
            uid: 0,
            comm: "nginx".into(),
            cgroup_id: 1,
            netns: 4_026_531_840,
            family: libc::AF_INET as u16,
            proto: 6,
            sock_type: 1,
            addr: "10.0.0.1".parse().unwrap(),
            port: 8080,
            ret: if kind == SockEventKind::Bind { -98 } else { 0 },
            opts: SockOpts(1 | 2),
            bound_dev_if: 2,
            backlog_req: 511,
            backlog: 128,
        })
    }

    fn conn(kind: ConnEventKind, ts_ns: u64) -> Event {
        let mut c = Conn::sample(1, MS, 1_234_567, 999);
        c.end_ns = ts_ns;
        c.srtt_us = 27;
        if kind == ConnEventKind::Accept {
            c.direction = Direction::In;
            (c.saddr, c.daddr) = (c.daddr, c.saddr);
            (c.sport, c.dport) = (80, 40_000);
        }
        if kind == ConnEventKind::Retransmit {
            c.retransmits = 2;
            c.family = libc::AF_INET6 as u16;
            c.saddr = "2001:db8:ffff:ffff:ffff:ffff:ffff:1".parse().unwrap();
            c.daddr = "2001:db8::2".parse().unwrap();
        }
        Event::Conn(ConnEvent {
            kind,
            tier: Tier::Tracepoint,
            ts_ns,
            conn: c,
        })
    }

    fn cg(kind: K, ts_ns: u64) -> Event {
        let verdict = matches!(kind, K::SLP_EV_POLICY_DENY | K::SLP_EV_POLICY_AUDIT);
        Event::Cg(CgEvent {
            kind: kind.0,
            ts_ns,
            pid: 321,
            tid: 321,
            uid: 1000,
            comm: "a very long comm".into(),
            cgroup_id: 9,
            cookie: 77,
            lifetime_ns: if kind == K::SLP_EV_SOCK_RELEASE {
                1_500 * MS
            } else {
                0
            },
            netns: 4_026_531_840,
            ret: if kind == K::SLP_EV_GETSOCKOPT || verdict {
                -13
            } else {
                0
            },
            family: libc::AF_INET as u16,
            sock_type: 1,
            proto: 6,
            port: 443,
            level: libc::SOL_SOCKET,
            optname: 4,
            rule_id: if kind == K::SLP_EV_POLICY_DENY { 12 } else { 0 },
            op: slp_op::SLP_OP_CONNECT4.0 as u8,
            mode: 1,
            action: slp_action::SLP_DENY.0 as u8,
            addr: "93.184.216.34".parse().unwrap(),
            steer: 0,
            real_addr: "0.0.0.0".parse().unwrap(),
            real_port: 0,
        })
    }

    /// One of every event kind, in time order.
    fn mixed() -> Vec<Event> {
        use ConnEventKind as C;
        use SockEventKind as S;
        let mut t = 0;
        let mut at = || {
            t += 7 * MS;
            t
        };
        vec![
            sock(S::Bind, at()),
            sock(S::Listen, at()),
            cg(K::SLP_EV_SOCK_CREATE, at()),
            cg(K::SLP_EV_CONNECT, at()),
            conn(C::Established, at()),
            conn(C::Accept, at()),
            cg(K::SLP_EV_SENDMSG, at()),
            cg(K::SLP_EV_RECVMSG, at()),
            cg(K::SLP_EV_GETSOCKOPT, at()),
            cg(K::SLP_EV_GETPEERNAME, at()),
            conn(C::Retransmit, at()),
            conn(C::Close, at()),
            cg(K::SLP_EV_SOCK_RELEASE, at()),
            cg(K::SLP_EV_POLICY_DENY, at()),
            cg(K::SLP_EV_POLICY_AUDIT, at()),
        ]
    }

    fn render(layout: Layout, events: &[Event]) -> Vec<String> {
        let clock = clock();
        std::iter::once(layout.header())
            .chain(
                events
                    .iter()
                    .map(|e| layout.render(&clock, &crate::output::event_row(e))),
            )
            .collect()
    }

    const PIPE: &str = "\
TIME         EVENT            PID COMM            LOCAL                 REMOTE                DETAILS
22:13:20.007 bind         4194304 nginx           10.0.0.1:8080         -                     err=EADDRINUSE opts=...Rr if=2 netns=4026531840
22:13:20.014 listen       4194304 nginx           10.0.0.1:8080         -                     backlog=511/128 netns=4026531840
22:13:20.021 sock_create      321 a very long com -                     -                     family=inet type=stream netns=4026531840
22:13:20.028 connect          321 a very long com -                     93.184.216.34:443     netns=4026531840
22:13:20.035 established      100 curl            127.0.0.1:40000       127.0.0.1:80          dir=out tx=1.2MiB rx=999B rtt=27us
22:13:20.042 accept           100 curl            127.0.0.1:80          127.0.0.1:40000       dir=in tx=1.2MiB rx=999B rtt=27us
22:13:20.049 sendmsg          321 a very long com -                     93.184.216.34:443     netns=4026531840
22:13:20.056 recvmsg          321 a very long com -                     93.184.216.34:443     netns=4026531840
22:13:20.063 getsockopt       321 a very long com -                     -                     level=SOL_SOCKET opt=4 ret=-13 netns=4026531840
22:13:20.070 getpeername      321 a very long com -                     93.184.216.34:443     netns=4026531840
22:13:20.077 retransmit       100 curl            [2001:d…ffff:1]:40000 [2001:db8::2]:80      dir=out tx=1.2MiB rx=999B state=ESTABLISHED rtt=27us retr=2
22:13:20.084 close            100 curl            127.0.0.1:40000       127.0.0.1:80          dir=out tx=1.2MiB rx=999B dur=83.0ms rtt=27us
22:13:20.091 sock_release     321 a very long com 93.184.216.34:443     -                     life=1500.0ms netns=4026531840
22:13:20.098 policy_deny      321 a very long com -                     93.184.216.34:443     op=connect action=deny rule=12 err=EACCES netns=4026531840
22:13:20.105 policy_audit     321 a very long com -                     93.184.216.34:443     op=connect action=deny rule=default err=EACCES netns=4026531840";

    const TERM_100: &str = "\
TIME         EVENT            PID COMM         LOCAL           REMOTE          DETAILS
22:13:20.007 bind         4194304 nginx        10.0.0.1:8080   -               err=EADDRINUSE opts=…
22:13:20.014 listen       4194304 nginx        10.0.0.1:8080   -               backlog=511/128 netn…
22:13:20.021 sock_create      321 a very long  -               -               family=inet type=str…
22:13:20.028 connect          321 a very long  -               93.18…16.34:443 netns=4026531840
22:13:20.035 established      100 curl         127.0.0.1:40000 127.0.0.1:80    dir=out tx=1.2MiB rx…
22:13:20.042 accept           100 curl         127.0.0.1:80    127.0.0.1:40000 dir=in tx=1.2MiB rx=…
22:13:20.049 sendmsg          321 a very long  -               93.18…16.34:443 netns=4026531840
22:13:20.056 recvmsg          321 a very long  -               93.18…16.34:443 netns=4026531840
22:13:20.063 getsockopt       321 a very long  -               -               level=SOL_SOCKET opt…
22:13:20.070 getpeername      321 a very long  -               93.18…16.34:443 netns=4026531840
22:13:20.077 retransmit       100 curl         [200…f:1]:40000 [2001:…8::2]:80 dir=out tx=1.2MiB rx…
22:13:20.084 close            100 curl         127.0.0.1:40000 127.0.0.1:80    dir=out tx=1.2MiB rx…
22:13:20.091 sock_release     321 a very long  93.18…16.34:443 -               life=1500.0ms netns=…
22:13:20.098 policy_deny      321 a very long  -               93.18…16.34:443 op=connect action=de…
22:13:20.105 policy_audit     321 a very long  -               93.18…16.34:443 op=connect action=de…";

    fn assert_golden(lines: &[String], golden: &str) {
        for l in lines {
            println!("{l}");
        }
        assert_eq!(lines.join("\n"), golden);
    }

    #[test]
    fn every_kind_in_one_layout() {
        let lines = render(Layout::new(None, false), &mixed());
        assert_aligned(&lines);
        assert_golden(&lines, PIPE);
    }

    /// Where each header title starts: every row has a cell boundary (a
    /// space) just before it, and the right-aligned PID ends under its title.
    fn assert_aligned(lines: &[String]) {
        let header = &lines[0];
        let starts: Vec<usize> = ["EVENT", "COMM", "LOCAL", "REMOTE", "DETAILS"]
            .iter()
            .map(|t| header.find(t).unwrap())
            .collect();
        let pid_end = header.find("PID").unwrap() + 3;
        for line in &lines[1..] {
            let chars: Vec<char> = line.chars().collect();
            for &s in &starts {
                assert_eq!(chars[s - 1], ' ', "column at {s}: {line}");
                assert_ne!(chars[s], ' ', "column at {s}: {line}");
            }
            assert_ne!(chars[pid_end - 1], ' ', "{line}");
            assert_eq!(chars[pid_end], ' ', "{line}");
        }
    }

    #[test]
    fn a_100_column_terminal_gets_aligned_rows_that_do_not_wrap() {
        let lines = render(Layout::new(Some(100), false), &mixed());
        assert_aligned(&lines);
        for line in &lines {
            assert!(line.chars().count() <= 100, "{line}");
        }
        assert_golden(&lines, TERM_100);
    }

    #[test]
    fn wide_shows_full_ipv6_addresses_aligned() {
        let lines = render(Layout::new(Some(100), true), &mixed());
        assert_aligned(&lines);
        assert!(lines[11].contains(" [2001:db8:ffff:ffff:ffff:ffff:ffff:1]:40000 "));
        assert!(lines[11].ends_with("state=ESTABLISHED rtt=27us retr=2"));
    }

    #[test]
    fn snapshot_rows_show_lifetime_totals_beside_since_start_counts() {
        let mut c = Conn::sample(1, MS, 1000, 2000);
        c.tx_total = 5_000_001;
        c.rx_total = 77;
        c.seeded = true;
        c.direction = Direction::In;
        let flow = UdpFlow {
            sk: 1,
            peer: "10.0.0.2".parse().unwrap(),
            peer_port: 53,
            tx_bytes: 60,
            rx_bytes: 120_000,
            tx_packets: 1,
            rx_packets: 2,
            first_ns: 0,
            last_ns: 0,
            direction: Direction::Out,
            conn_start_ns: MS,
        };
        let layout = Layout::new(None, false);
        let lines = [
            layout.header(),
            layout.render(&clock(), &conn_snapshot_row(5 * MS, &c)),
            layout.render(&clock(), &udp_flow_row(5 * MS, Some(&c), &flow)),
        ];
        assert_aligned(&lines);
        assert_eq!(lines[1], "22:13:20.005 conn             100 curl            127.0.0.1:40000       127.0.0.1:80          dir=in state=ESTABLISHED tx=1000B rx=2000B tx_total=4.8MiB rx_total=77B retr=0 rtt=0us seeded=yes");
        assert_eq!(lines[2], "22:13:20.005 udp_flow         100 curl            127.0.0.1:40000       10.0.0.2:53           dir=out tx=60B rx=117.2KiB pkts=1/2");
    }

    #[test]
    fn humanised_numbers() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(9_999), "9999B");
        assert_eq!(bytes(10_000), "9.8KiB");
        assert_eq!(bytes(1_288_490_189), "1.2GiB");
        assert_eq!(duration_ns(999_999), "999us");
        assert_eq!(duration_ns(12_340_000), "12.3ms");
        assert_eq!(duration_ns(12_000_000_000), "12.0s");
        assert_eq!(fit("[2001:db8::1:0:0:1]:80", 15), "[2001:…:0:1]:80");
        assert_eq!(fit("127.0.0.1:80", 15), "127.0.0.1:80");
    }
}
