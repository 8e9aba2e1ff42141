//! Names of kernel numbers: address families, protocols, TCP states, socket
//! types and errno values, as socklens prints them.

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

pub fn family_name(family: u16) -> &'static str {
    match family {
        AF_INET => "inet",
        AF_INET6 => "inet6",
        _ => "other",
    }
}

pub fn proto_name(proto: u16) -> String {
    known_proto_name(proto).map_or_else(|| format!("proto{proto}"), str::to_owned)
}

/// The name of an IP protocol socklens knows by name.
pub fn known_proto_name(proto: u16) -> Option<&'static str> {
    Some(match i32::from(proto) {
        libc::IPPROTO_TCP => "tcp",
        libc::IPPROTO_UDP => "udp",
        libc::IPPROTO_UDPLITE => "udplite",
        libc::IPPROTO_SCTP => "sctp",
        libc::IPPROTO_MPTCP => "mptcp",
        libc::IPPROTO_ICMP => "icmp",
        libc::IPPROTO_ICMPV6 => "icmpv6",
        libc::IPPROTO_RAW => "raw",
        _ => return None,
    })
}

/// "EADDRINUSE" for -98; empty for 0.
pub fn errno_name(ret: i32) -> String {
    if ret >= 0 {
        return String::new();
    }
    format!("{:?}", nix::errno::Errno::from_raw(-ret))
}

pub fn type_name(t: u16) -> String {
    match i32::from(t) {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        other => format!("type{other}"),
    }
}

pub fn level_name(level: i32) -> Option<&'static str> {
    Some(match level {
        libc::SOL_SOCKET => "SOL_SOCKET",
        libc::IPPROTO_IP => "SOL_IP",
        libc::IPPROTO_IPV6 => "SOL_IPV6",
        libc::IPPROTO_TCP => "SOL_TCP",
        libc::IPPROTO_UDP => "SOL_UDP",
        _ => return None,
    })
}
