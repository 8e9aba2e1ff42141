//! Reading the connection maps: every tracked connection and UDP flow.

use std::collections::BTreeMap;

use libbpf_rs::{MapCore, MapFlags};

use crate::attach::loader::Session;
use crate::model::{Conn, UdpFlow};
use crate::session::seed::seed;
use crate::session::{Live, TraceEvent};
use crate::skel::types::{sl_conn, sl_udp_flow, sl_udp_key};

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
    let conns = conns
        .into_iter()
        .filter_map(|mut c| live.settle(&mut c).then_some((c.sk, c)))
        .collect::<BTreeMap<_, _>>();
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
