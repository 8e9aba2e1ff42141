//! Reading the connection maps: every tracked connection and UDP flow.

use std::collections::BTreeMap;
use std::net::IpAddr;

use libbpf_rs::{MapCore, MapFlags};

use crate::attach::loader::Session;
use crate::model::{Conn, Direction, UdpFlow};
use crate::session::seed::seed;
use crate::session::{Live, TraceEvent};
use crate::skel::types::{sl_conn, sl_udp_flow, sl_udp_key};

const IPPROTO_TCP: u16 = libc::IPPROTO_TCP as u16;

/// Every tracked connection and UDP flow, as the maps hold them now.
pub fn snapshot(session: &Session<'_>) -> (Vec<Conn>, Vec<UdpFlow>) {
    let maps = &session.skel.maps;
    let conns = maps
        .conns
        .keys()
        .filter_map(|k| {
            let v = maps.conns.lookup(&k, MapFlags::ANY).ok().flatten()?;
            let mut raw = sl_conn::default();
            plain::copy_from_bytes(&mut raw, &v).ok()?;
            let sk = u64::from_ne_bytes(k.get(..8)?.try_into().ok()?);
            Some(Conn::from_raw(sk, &raw))
        })
        .collect();
    let flows = maps
        .udp_flows
        .keys()
        .filter_map(|k| {
            let v = maps.udp_flows.lookup(&k, MapFlags::ANY).ok().flatten()?;
            let mut key = sl_udp_key::default();
            let mut raw = sl_udp_flow::default();
            plain::copy_from_bytes(&mut key, &k).ok()?;
            plain::copy_from_bytes(&mut raw, &v).ok()?;
            Some(UdpFlow::from_raw(&key, &raw))
        })
        .collect();
    (conns, flows)
}

/// Events whose hooks make up connection tracking; `conns` and `top` load
/// them all and read the maps instead of printing the events.
pub fn snapshot_events() -> Vec<TraceEvent> {
    vec![
        TraceEvent::Established,
        TraceEvent::Accept,
        TraceEvent::Close,
        TraceEvent::Retransmit,
    ]
}

/// Tracked connections with owners settled and filters applied, keyed by sk.
pub fn settled_snapshot(live: &mut Live<'_>) -> (BTreeMap<u64, Conn>, Vec<UdpFlow>) {
    // Best effort: a failed refresh leaves RTT as of the last send/recv.
    let _ = seed(live.session, false);
    let (conns, flows) = snapshot(live.session);
    let mut conns = conns
        .into_iter()
        .filter_map(|mut c| live.settle(&mut c).then_some((c.sk, c)))
        .collect::<BTreeMap<_, _>>();
    infer_seeded_directions(&mut conns);
    let flows = flows
        .into_iter()
        .filter(|f| {
            conns
                .get(&f.sk)
                .is_some_and(|c| c.start_ns == f.conn_start_ns)
        })
        .collect();
    (conns, flows)
}

/// Gives seeded TCP sockets (found at start, direction unknown) the
/// direction the kernel's tables imply: a socket on a listener's local port
/// was accepted (`in`); any other connected one was opened by connect (`out`).
pub fn infer_seeded_directions(conns: &mut BTreeMap<u64, Conn>) {
    const TCP_LISTEN: u8 = 10;
    let listeners: Vec<(u32, IpAddr, u16)> = conns
        .values()
        .filter(|c| c.proto == IPPROTO_TCP && c.state == TCP_LISTEN)
        .map(|c| (c.netns, c.saddr, c.sport))
        .collect();
    for c in conns.values_mut() {
        if !c.seeded || c.proto != IPPROTO_TCP || c.state == TCP_LISTEN {
            continue;
        }
        if c.direction != Direction::Unknown || c.dport == 0 {
            continue;
        }
        let accepted = listeners.iter().any(|&(netns, addr, port)| {
            netns == c.netns && port == c.sport && (addr.is_unspecified() || same_ip(addr, c.saddr))
        });
        c.direction = if accepted {
            Direction::In
        } else {
            Direction::Out
        };
    }
}

/// Equal addresses, an IPv4-mapped IPv6 one equal to its IPv4 form.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_sockets_on_a_listeners_port_are_accepted() {
        let listener = |sk, addr: &str, port| {
            let mut c = Conn::sample(sk, 1, 0, 0);
            c.state = 10;
            c.seeded = true;
            c.direction = Direction::Unknown;
            c.saddr = addr.parse().unwrap();
            c.sport = port;
            c.daddr = "0.0.0.0".parse().unwrap();
            c.dport = 0;
            c
        };
        let seeded = |sk, local: &str, sport, dport| {
            let mut c = Conn::sample(sk, 1, 0, 0);
            c.seeded = true;
            c.direction = Direction::Unknown;
            c.saddr = local.parse().unwrap();
            c.sport = sport;
            c.dport = dport;
            c
        };
        let mut conns: BTreeMap<u64, Conn> = [
            listener(1, "0.0.0.0", 8080),
            listener(2, "127.0.0.2", 9090),
            seeded(3, "127.0.0.1", 8080, 50_000), // on the wildcard listener
            seeded(4, "127.0.0.1", 50_000, 8080), // its client
            seeded(5, "127.0.0.1", 9090, 50_001), // same port, other address
            seeded(6, "::ffff:127.0.0.2", 9090, 50_002),
        ]
        .into_iter()
        .map(|c| (c.sk, c))
        .collect();
        let mut other_netns = seeded(7, "127.0.0.1", 8080, 50_003);
        other_netns.netns = 2;
        conns.insert(7, other_netns);
        infer_seeded_directions(&mut conns);
        let dir = |sk| conns[&sk].direction;
        assert_eq!(dir(1), Direction::Unknown);
        assert_eq!(dir(3), Direction::In);
        assert_eq!(dir(4), Direction::Out);
        assert_eq!(dir(5), Direction::Out);
        assert_eq!(dir(6), Direction::In);
        assert_eq!(dir(7), Direction::Out);
    }
}
