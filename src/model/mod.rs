//! Typed events: records from the BPF side decoded into owned Rust values.
//! Pure data: no loading code.

pub mod cg;
pub mod names;
pub mod policy;
pub mod raw;

pub use names::{errno_name, family_name, known_proto_name, proto_name, tcp_state_name};
pub use raw::{c_string, ip_from, Comm, DecodeError};

use std::net::IpAddr;

use serde::Serialize;

use crate::attach::plan::Tier;
use crate::skel::types::{
    sl_conn, sl_conn_event, sl_conn_flag, sl_direction, sl_event_kind, sl_sock_event, sl_sockopt,
    sl_tier, sl_udp_flow, sl_udp_key,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SockEventKind {
    Bind,
    Listen,
}

impl SockEventKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Listen => "listen",
        }
    }
}

/// Socket options in force at bind time, in bindsnoop's OPTS order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockOpts(pub u32);

impl SockOpts {
    const TABLE: [(sl_sockopt, char, &'static str); 5] = [
        (sl_sockopt::SL_OPT_FREEBIND, 'F', "IP_FREEBIND"),
        (sl_sockopt::SL_OPT_TRANSPARENT, 'T', "IP_TRANSPARENT"),
        (
            sl_sockopt::SL_OPT_BIND_ADDRESS_NO_PORT,
            'N',
            "IP_BIND_ADDRESS_NO_PORT",
        ),
        (sl_sockopt::SL_OPT_REUSEADDR, 'R', "SO_REUSEADDR"),
        (sl_sockopt::SL_OPT_REUSEPORT, 'r', "SO_REUSEPORT"),
    ];

    fn set(self, opt: sl_sockopt) -> bool {
        self.0 & opt.0 != 0
    }

    /// bindsnoop's five-letter column, '.' for options not set.
    pub fn letters(self) -> String {
        Self::TABLE
            .iter()
            .map(|&(opt, c, _)| if self.set(opt) { c } else { '.' })
            .collect()
    }

    pub fn names(self) -> Vec<&'static str> {
        Self::TABLE
            .iter()
            .filter(|&&(opt, _, _)| self.set(opt))
            .map(|&(_, _, name)| name)
            .collect()
    }
}

/// A bind() or listen() as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockEvent {
    pub kind: SockEventKind,
    pub tier: Tier,
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub netns: u32,
    pub family: u16,
    pub proto: u16,
    pub sock_type: u16,
    pub addr: IpAddr,
    pub port: u16,
    pub ret: i32,
    pub opts: SockOpts,
    pub bound_dev_if: u32,
    pub backlog_req: i32,
    pub backlog: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Unknown,
    Out,
    In,
}

impl Direction {
    fn from_raw(raw: u32) -> Self {
        match sl_direction(raw) {
            sl_direction::SL_DIR_OUT => Self::Out,
            sl_direction::SL_DIR_IN => Self::In,
            _ => Self::Unknown,
        }
    }

    /// The serialized name (`Serialize`), without going through serde.
    pub fn json_name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Out => "out",
            Self::In => "in",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "-",
            Self::Out => "out",
            Self::In => "in",
        }
    }
}

/// One TCP connection or UDP socket as the kernel side tracked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub sk: u64,
    pub cookie: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// TCP: the kernel's lifetime bytes_acked / bytes_received.
    pub tx_total: u64,
    pub rx_total: u64,
    pub sendfile_bytes: u64,
    pub cgroup_id: u64,
    pub ino: u64,
    pub pid: u32,
    pub uid: u32,
    pub comm: Comm,
    pub netns: u32,
    pub retransmits: u32,
    pub srtt_us: u32,
    pub rttvar_us: u32,
    pub error: i32,
    pub family: u16,
    pub proto: u16,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub state: u8,
    pub direction: Direction,
    pub owner_known: bool,
    pub seeded: bool,
    pub established: bool,
    /// The close was seen only when the kernel freed the socket.
    pub closed_at_destroy: bool,
    /// Its start was missed: tracked later, its counts from the socket's start.
    pub found_late: bool,
    /// It had a psock: some of its bytes may have moved by sk_msg redirect,
    /// counted per call (docs/accelerate.md, "Accounting").
    pub accelerated: bool,
    /// Its redirected bytes came from sk_msg's own counts, which no skipped
    /// hook run can shorten (docs/accelerate.md, "Accounting").
    pub accel_exact: bool,
    /// The policy steered it: the address the application connected to.
    pub steer: Option<Steer>,
}

/// Where a steered connection was opened to: a service VIP, or the address a
/// redirect took it from (daddr/dport are where the kernel sent it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steer {
    /// "service" or "redirect" (cg::steer_name).
    pub kind: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

impl Conn {
    pub fn from_raw(sk: u64, raw: &sl_conn) -> Self {
        let flag = |f: sl_conn_flag| u32::from(raw.flags) & f.0 != 0;
        Self {
            sk,
            cookie: raw.cookie,
            start_ns: raw.start_ns,
            end_ns: raw.end_ns,
            tx_bytes: raw.tx_bytes,
            rx_bytes: raw.rx_bytes,
            tx_total: raw.tx_total,
            rx_total: raw.rx_total,
            sendfile_bytes: raw.sendfile_bytes,
            cgroup_id: raw.cgroup_id,
            ino: raw.ino,
            pid: raw.pid,
            uid: raw.uid,
            comm: c_string(&raw.comm),
            netns: raw.netns,
            retransmits: raw.retransmits,
            srtt_us: raw.srtt_us,
            rttvar_us: raw.rttvar_us,
            error: raw.error,
            family: raw.family,
            proto: raw.proto,
            saddr: ip_from(raw.family, &raw.saddr),
            sport: raw.sport,
            daddr: ip_from(raw.family, &raw.daddr),
            dport: raw.dport,
            state: raw.state,
            direction: Direction::from_raw(u32::from(raw.direction)),
            owner_known: flag(sl_conn_flag::SL_CONN_OWNER),
            seeded: flag(sl_conn_flag::SL_CONN_SEEDED),
            established: flag(sl_conn_flag::SL_CONN_ESTABLISHED),
            closed_at_destroy: flag(sl_conn_flag::SL_CONN_CLOSED_AT_DESTROY),
            found_late: flag(sl_conn_flag::SL_CONN_FOUND_LATE),
            accelerated: flag(sl_conn_flag::SL_CONN_ACCEL),
            accel_exact: flag(sl_conn_flag::SL_CONN_ACCEL_EXACT),
            steer: (raw.steered != 0).then(|| Steer {
                kind: cg::steer_name(raw.steered),
                addr: ip_from(raw.family, &raw.orig_addr),
                port: raw.orig_port,
            }),
        }
    }

    /// Why an outgoing connection never got established, tcplife/DD style.
    pub fn failure(&self) -> Option<String> {
        if self.established || self.direction != Direction::Out || self.end_ns == 0 {
            return None;
        }
        if self.closed_at_destroy && self.error == 0 {
            // connect() may have handed the error to the application already.
            return Some("unknown".into());
        }
        Some(match self.error {
            libc::ECONNREFUSED => "refused".into(),
            libc::ETIMEDOUT => "timed out".into(),
            libc::ECONNRESET => "reset".into(),
            libc::EHOSTUNREACH | libc::ENETUNREACH => "unreachable".into(),
            0 => "closed".into(),
            e => errno_name(-e),
        })
    }

    pub fn duration_ms(&self) -> Option<f64> {
        (self.end_ns > self.start_ns && self.start_ns > 0)
            .then(|| (self.end_ns - self.start_ns) as f64 / 1e6)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnEventKind {
    /// An outgoing TCP connection got established.
    Established,
    Accept,
    Close,
    Retransmit,
}

impl ConnEventKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::Accept => "accept",
            Self::Close => "close",
            Self::Retransmit => "retransmit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: ConnEventKind,
    pub tier: Tier,
    pub ts_ns: u64,
    pub conn: Conn,
}

/// A UDP socket's traffic with one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFlow {
    pub sk: u64,
    pub peer: IpAddr,
    pub peer_port: u16,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub direction: Direction,
    /// `start_ns` of the socket's entry when the flow began.
    pub conn_start_ns: u64,
}

impl UdpFlow {
    pub fn from_raw(key: &sl_udp_key, raw: &sl_udp_flow) -> Self {
        Self {
            sk: key.sk,
            peer: ip_from(key.family, &key.addr),
            peer_port: key.port,
            tx_bytes: raw.tx_bytes,
            rx_bytes: raw.rx_bytes,
            tx_packets: raw.tx_packets,
            rx_packets: raw.rx_packets,
            first_ns: raw.first_ns,
            last_ns: raw.last_ns,
            direction: Direction::from_raw(raw.direction),
            conn_start_ns: raw.conn_start_ns,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Sock(SockEvent),
    Conn(ConnEvent),
    /// A cgroup socket hook call or a policy verdict (src/model/cg.rs).
    Cg(cg::CgEvent),
}

/// Counters of what did not make it to the user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records the kernel could not queue (ring full) or perf reported lost.
    pub lost: u64,
    /// Records that arrived but did not decode.
    pub malformed: u64,
    /// Connections not tracked because the conns map was full.
    pub untracked: u64,
    /// Hook runs the kernel skipped: a BPF tracing program does not run
    /// while it is already running on the same CPU (say, a TCP state change
    /// in softirq that interrupts its own run in process context).
    pub missed: u64,
    /// UDP flows not tracked because the udp_flows map was full.
    pub udp_untracked: u64,
}

pub fn tier_from(raw: u32) -> Result<Tier, DecodeError> {
    match sl_tier(raw) {
        sl_tier::SL_TIER_FENTRY => Ok(Tier::Fentry),
        sl_tier::SL_TIER_KPROBE => Ok(Tier::Kprobe),
        sl_tier::SL_TIER_TRACEPOINT => Ok(Tier::Tracepoint),
        _ => Err(DecodeError::UnknownTier(raw)),
    }
}

fn decode_sock(raw: &sl_sock_event) -> Result<SockEvent, DecodeError> {
    let kind = match sl_event_kind(raw.kind) {
        sl_event_kind::SL_EV_BIND => SockEventKind::Bind,
        sl_event_kind::SL_EV_LISTEN => SockEventKind::Listen,
        _ => return Err(DecodeError::UnknownKind(raw.kind)),
    };
    Ok(SockEvent {
        kind,
        tier: tier_from(raw.tier)?,
        ts_ns: raw.ts_ns,
        pid: raw.pid,
        tid: raw.tid,
        uid: raw.uid,
        comm: c_string(&raw.comm),
        cgroup_id: raw.cgroup_id,
        netns: raw.netns,
        family: raw.family,
        proto: raw.proto,
        sock_type: raw.sock_type,
        addr: ip_from(raw.family, &raw.addr),
        port: raw.port,
        ret: raw.ret,
        opts: SockOpts(raw.opts),
        bound_dev_if: raw.bound_dev_if,
        backlog_req: raw.backlog_req,
        backlog: raw.backlog,
    })
}

/// Decodes one record of slp_events (src/model/cg.rs).
pub fn decode_cg(bytes: &[u8]) -> Result<Event, DecodeError> {
    cg::decode(bytes).map(Event::Cg)
}

/// Decodes one ring/perf buffer record. Every record starts with its kind.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let kind = bytes
        .get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(DecodeError::Short(bytes.len()))?;
    match sl_event_kind(kind) {
        sl_event_kind::SL_EV_BIND | sl_event_kind::SL_EV_LISTEN => {
            let mut raw = sl_sock_event::default();
            plain::copy_from_bytes(&mut raw, bytes).map_err(|_| DecodeError::Short(bytes.len()))?;
            decode_sock(&raw).map(Event::Sock)
        }
        sl_event_kind::SL_EV_CONNECT
        | sl_event_kind::SL_EV_ACCEPT
        | sl_event_kind::SL_EV_CLOSE
        | sl_event_kind::SL_EV_RETRANSMIT => {
            let mut raw = sl_conn_event::default();
            plain::copy_from_bytes(&mut raw, bytes).map_err(|_| DecodeError::Short(bytes.len()))?;
            let kind = match sl_event_kind(kind) {
                sl_event_kind::SL_EV_CONNECT => ConnEventKind::Established,
                sl_event_kind::SL_EV_ACCEPT => ConnEventKind::Accept,
                sl_event_kind::SL_EV_CLOSE => ConnEventKind::Close,
                _ => ConnEventKind::Retransmit,
            };
            Ok(Event::Conn(ConnEvent {
                kind,
                tier: tier_from(raw.tier)?,
                ts_ns: raw.ts_ns,
                conn: Conn::from_raw(raw.sk, &raw.conn),
            }))
        }
        _ => Err(DecodeError::UnknownKind(kind)),
    }
}

#[cfg(test)]
impl Conn {
    /// A loopback TCP connection owned by pid 100 ("curl"), for unit tests.
    pub fn sample(sk: u64, start_ns: u64, tx: u64, rx: u64) -> Self {
        Self {
            sk,
            cookie: sk,
            start_ns,
            end_ns: 0,
            tx_bytes: tx,
            rx_bytes: rx,
            tx_total: tx,
            rx_total: rx,
            sendfile_bytes: 0,
            cgroup_id: 7,
            ino: 0,
            pid: 100,
            uid: 0,
            comm: "curl".into(),
            netns: 1,
            retransmits: 0,
            srtt_us: 0,
            rttvar_us: 0,
            error: 0,
            family: libc::AF_INET as u16,
            proto: 6,
            saddr: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            sport: 40_000,
            daddr: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            dport: 80,
            state: 1,
            direction: Direction::Out,
            owner_known: true,
            seeded: false,
            established: true,
            closed_at_destroy: false,
            found_late: false,
            accelerated: false,
            accel_exact: false,
            steer: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const AF_INET6: u16 = libc::AF_INET6 as u16;

    fn raw_bind() -> sl_sock_event {
        let mut raw = sl_sock_event {
            kind: sl_event_kind::SL_EV_BIND.0,
            tier: sl_tier::SL_TIER_TRACEPOINT.0,
            ts_ns: 42,
            pid: 100,
            tid: 101,
            uid: 0,
            netns: 4_026_531_840,
            ret: -98,
            family: libc::AF_INET as u16,
            proto: 6,
            sock_type: 1,
            port: 8080,
            opts: (sl_sockopt::SL_OPT_REUSEADDR.0) | (sl_sockopt::SL_OPT_FREEBIND.0),
            ..Default::default()
        };
        raw.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.comm[..5].copy_from_slice(b"nginx");
        raw
    }

    fn bytes_of(raw: &sl_sock_event) -> Vec<u8> {
        // SAFETY: sl_sock_event is a plain C struct; reading its bytes is fine.
        unsafe { plain::as_bytes(raw) }.to_vec()
    }

    fn sock(e: Event) -> SockEvent {
        match e {
            Event::Sock(s) => s,
            other => panic!("not a sock event: {other:?}"),
        }
    }

    #[test]
    fn decodes_a_close_record_with_failure_reason() {
        let mut raw = sl_conn_event {
            kind: sl_event_kind::SL_EV_CLOSE.0,
            tier: sl_tier::SL_TIER_KPROBE.0,
            sk: 0xffff_8880_0000_1000,
            ..Default::default()
        };
        raw.conn.family = AF_INET6;
        raw.conn.proto = 6;
        raw.conn.daddr = Ipv6Addr::LOCALHOST.octets();
        raw.conn.dport = 9;
        raw.conn.direction = sl_direction::SL_DIR_OUT.0 as u8;
        raw.conn.start_ns = 1_000_000;
        raw.conn.end_ns = 3_500_000;
        raw.conn.error = libc::ECONNREFUSED;
        raw.conn.tx_bytes = 7;
        let bytes = unsafe { plain::as_bytes(&raw) }.to_vec();
        let Event::Conn(e) = decode(&bytes).unwrap() else {
            panic!("not a conn event")
        };
        assert_eq!(e.kind, ConnEventKind::Close);
        assert_eq!(e.tier, Tier::Kprobe);
        assert_eq!(e.conn.sk, 0xffff_8880_0000_1000);
        assert_eq!(e.conn.daddr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(e.conn.failure().as_deref(), Some("refused"));
        assert_eq!(e.conn.duration_ms(), Some(2.5));
        assert_eq!(e.conn.tx_bytes, 7);
        raw.conn.flags = sl_conn_flag::SL_CONN_ESTABLISHED.0 as u16;
        let bytes = unsafe { plain::as_bytes(&raw) }.to_vec();
        let Event::Conn(e) = decode(&bytes).unwrap() else {
            panic!("not a conn event")
        };
        assert_eq!(
            e.conn.failure(),
            None,
            "an established connection did not fail"
        );
    }

    #[test]
    fn decodes_a_bind_record() {
        let e = sock(decode(&bytes_of(&raw_bind())).unwrap());
        assert_eq!(e.kind, SockEventKind::Bind);
        assert_eq!(e.tier, Tier::Tracepoint);
        assert_eq!(e.comm, "nginx");
        assert_eq!(e.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(e.port, 8080);
        assert_eq!(e.opts.letters(), "F..R.");
        assert_eq!(e.opts.names(), ["IP_FREEBIND", "SO_REUSEADDR"]);
    }

    #[test]
    fn decodes_ipv6_addresses() {
        let mut raw = raw_bind();
        raw.family = AF_INET6;
        raw.addr = Ipv6Addr::LOCALHOST.octets();
        let e = sock(decode(&bytes_of(&raw)).unwrap());
        assert_eq!(e.addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Short(2)));
        let mut raw = raw_bind();
        raw.kind = 99;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownKind(99)));
        let mut raw = raw_bind();
        raw.tier = 7;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownTier(7)));
    }

    #[test]
    fn comm_stops_at_nul_and_full_comm_is_kept() {
        assert_eq!(c_string(b"ab\0cd"), "ab");
        assert_eq!(c_string(b"0123456789abcdef"), "0123456789abcdef");
    }

    #[test]
    fn comm_that_is_not_utf8_is_replaced_not_dropped() {
        // A name cut mid-character by the kernel's 16-byte limit.
        assert_eq!(c_string(b"caf\xc3\0x"), "caf\u{FFFD}");
        assert_eq!(c_string(b"a\xffb\0"), "a\u{FFFD}b");
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(-98), "EADDRINUSE");
        assert_eq!(errno_name(-13), "EACCES");
        assert_eq!(errno_name(0), "");
    }

    #[test]
    fn names_written_without_serde_are_serdes() {
        for d in [Direction::Unknown, Direction::Out, Direction::In] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.json_name());
        }
        for t in Tier::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
    }

    #[test]
    fn protocol_and_family_names() {
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(proto_name(200), "proto200");
        assert_eq!(family_name(AF_INET6), "inet6");
    }
}
