//! The agent's metrics: one prometheus-client registry, label sets of bounded
//! cardinality, and the two exposition formats.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::model::{family_name, proto_name, Conn, Direction};

/// Label sets are built at run time: which labels a series has depends on
/// the config (remote address), so a fixed struct does not fit.
pub type Labels = Vec<(String, String)>;

/// RTT buckets: 50 µs to ~1.6 s, doubling (loopback to intercontinental).
fn rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every series the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub sent_bytes: Family<Labels, Counter>,
    pub received_bytes: Family<Labels, Counter>,
    pub sendfile_bytes: Family<Labels, Counter>,
    pub retransmits: Family<Labels, Counter>,
    pub opened: Family<Labels, Counter>,
    pub closed: Family<Labels, Counter>,
    pub failed: Family<Labels, Counter>,
    pub rtt: Family<Labels, Histogram, fn() -> Histogram>,
    pub binds: Family<Labels, Counter>,
    pub listening: Family<Labels, Gauge>,
    pub policy_denials: Family<Labels, Counter>,
    pub policy_audits: Family<Labels, Counter>,
    pub service_picks: Family<Labels, Counter>,
    pub service_failed_picks: Family<Labels, Counter>,
    pub redirects: Family<Labels, Counter>,
    pub events_lost: Counter,
    pub events_malformed: Counter,
    pub hook_runs_missed: Counter,
    pub untracked: Family<Labels, Counter>,
    pub map_fill: Family<Labels, Gauge<f64, AtomicU64>>,
    pub hook_attach: Family<Labels, Gauge>,
    pub reloads: Counter,
    pub reload_failures: Counter,
    pub last_reload_success: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            sendfile_bytes: Family::default(),
            retransmits: Family::default(),
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            rtt: Family::new_with_constructor(rtt_histogram as fn() -> Histogram),
            binds: Family::default(),
            listening: Family::default(),
            policy_denials: Family::default(),
            policy_audits: Family::default(),
            service_picks: Family::default(),
            service_failed_picks: Family::default(),
            redirects: Family::default(),
            events_lost: Counter::default(),
            events_malformed: Counter::default(),
            hook_runs_missed: Counter::default(),
            untracked: Family::default(),
            map_fill: Family::default(),
            hook_attach: Family::default(),
            reloads: Counter::default(),
            reload_failures: Counter::default(),
            last_reload_success: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register_with_unit(
            "socklens_sent",
            "Bytes sockets accepted from sendmsg and sendfile",
            Unit::Bytes,
            m.sent_bytes.clone(),
        );
        r.register_with_unit(
            "socklens_received",
            "Bytes recvmsg delivered to applications",
            Unit::Bytes,
            m.received_bytes.clone(),
        );
        r.register_with_unit(
            "socklens_sendfile",
            "Bytes sendfile moved into sockets (also in sent)",
            Unit::Bytes,
            m.sendfile_bytes.clone(),
        );
        r.register(
            "socklens_retransmits",
            "TCP retransmitted segments (the kernel's total_retrans)",
            m.retransmits.clone(),
        );
        r.register(
            "socklens_connections_opened",
            "TCP connections established (out) or accepted (in)",
            m.opened.clone(),
        );
        r.register(
            "socklens_connections_closed",
            "Established TCP connections that closed",
            m.closed.clone(),
        );
        r.register(
            "socklens_connections_failed",
            "Outgoing TCP connections that never got established, by reason",
            m.failed.clone(),
        );
        r.register_with_unit(
            "socklens_rtt",
            "Smoothed RTT of each TCP connection at its close",
            Unit::Seconds,
            m.rtt.clone(),
        );
        r.register("socklens_binds", "bind() calls, by result", m.binds.clone());
        r.register(
            "socklens_listening_socket_info",
            "Listening TCP sockets (1 while listening)",
            m.listening.clone(),
        );
        r.register(
            "socklens_policy_denials",
            "Calls the policy denied, by rule (0: the scope default)",
            m.policy_denials.clone(),
        );
        r.register(
            "socklens_policy_audits",
            "Calls an audit-mode policy would have denied, by rule",
            m.policy_audits.clone(),
        );
        r.register(
            "socklens_service_picks",
            "Connections (UDP: first datagrams of a socket) a service sent to each backend",
            m.service_picks.clone(),
        );
        r.register(
            "socklens_service_failed_picks",
            "connect/sendmsg calls to a service refused for want of a backend",
            m.service_failed_picks.clone(),
        );
        r.register(
            "socklens_redirects",
            "Connections (UDP: connects and datagrams) a redirect sent to its proxy",
            m.redirects.clone(),
        );
        r.register(
            "socklens_events_lost",
            "Event records the kernel could not queue",
            m.events_lost.clone(),
        );
        r.register(
            "socklens_events_malformed",
            "Event records that did not decode",
            m.events_malformed.clone(),
        );
        r.register(
            "socklens_hook_runs_missed",
            "Hook runs the kernel skipped because the program was already running on that CPU",
            m.hook_runs_missed.clone(),
        );
        r.register(
            "socklens_untracked",
            "Connections or UDP flows not tracked because their map was full",
            m.untracked.clone(),
        );
        r.register(
            "socklens_map_fill_ratio",
            "Entries in a tracking map over its capacity",
            m.map_fill.clone(),
        );
        r.register(
            "socklens_hook_attached",
            "Logical hooks by the attach method in use (1 when attached)",
            m.hook_attach.clone(),
        );
        r.register(
            "socklens_config_reloads",
            "Config reloads (SIGHUP) that took effect",
            m.reloads.clone(),
        );
        r.register(
            "socklens_config_reload_failures",
            "Config reloads refused (the old config stayed in force)",
            m.reload_failures.clone(),
        );
        r.register(
            "socklens_config_last_reload_success",
            "1 if the last reload (or the start) succeeded, else 0",
            m.last_reload_success.clone(),
        );
        m.last_reload_success.set(1);
        Self { registry, ..m }
    }

    /// OpenMetrics text, as prometheus-client encodes it.
    pub fn openmetrics(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The Prometheus text format (0.0.4) from OpenMetrics text: the two differ
/// in counter family names (`_total` in the text format's TYPE/HELP), the
/// UNIT and EOF lines it lacks; samples are the same.
pub fn to_prometheus_text(om: &str) -> String {
    let counters: BTreeSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Well-known ports keep their number; the rest fall into the IANA ranges,
/// so the label has at most 1,024 + configured + 2 values.
pub fn port_bucket(port: u16, exact: &[u16]) -> String {
    if port < 1024 || exact.binary_search(&port).is_ok() {
        port.to_string()
    } else if port < 49152 {
        "1024-49151".into()
    } else {
        "49152-65535".into()
    }
}

/// What connection series are keyed by.
#[derive(Debug, Clone)]
pub struct LabelRules {
    pub remote_ports: Vec<u16>,
    pub remote_address: bool,
}

impl LabelRules {
    /// The labels of a connection (or of a UDP flow with its `peer`).
    /// `cgroup` is the owner's cgroup path ("" when unknown).
    pub fn conn(&self, c: &Conn, cgroup: &str, peer: Option<(IpAddr, u16)>) -> Labels {
        let (addr, port) = peer.unwrap_or((c.daddr, c.dport));
        let mut l = owner_labels(c, cgroup);
        let direction = match c.direction {
            Direction::Unknown => "unknown",
            d => d.name(),
        };
        l.push(("direction".into(), direction.into()));
        l.push(("family".into(), family_name(c.family).into()));
        l.push(("proto".into(), proto_name(c.proto)));
        l.push(("remote_port".into(), port_bucket(port, &self.remote_ports)));
        if self.remote_address {
            l.push(("remote_address".into(), addr.to_string()));
        }
        // A steered connection (a UDP flow only to the peer it was steered
        // to): `service` or `redirect`, the address the application asked for.
        if let Some(s) = &c.steer {
            if peer.is_none_or(|p| p == (c.daddr, c.dport)) {
                l.push((s.kind.into(), crate::output::socket_addr(s.addr, s.port)));
            }
        }
        l
    }
}

/// cgroup and comm; unknown owners get empty values (one series, not many).
pub fn owner_labels(c: &Conn, cgroup: &str) -> Labels {
    let comm = if c.owner_known { c.comm.as_str() } else { "" };
    vec![
        ("cgroup".into(), cgroup.into()),
        ("comm".into(), comm.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_bucketed_with_configured_exceptions() {
        assert_eq!(port_bucket(443, &[]), "443");
        assert_eq!(port_bucket(5432, &[]), "1024-49151");
        assert_eq!(port_bucket(5432, &[5432, 6379]), "5432");
        assert_eq!(port_bucket(50000, &[]), "49152-65535");
    }

    #[test]
    fn remote_address_label_only_when_switched_on() {
        let c = crate::model::Conn {
            saddr: IpAddr::from([10, 0, 0, 1]),
            daddr: IpAddr::from([10, 0, 0, 2]),
            dport: 5432,
            ..crate::model::Conn::sample(1, 1, 0, 0)
        };
        let mut rules = LabelRules {
            remote_ports: vec![5432],
            remote_address: false,
        };
        let keys = |l: &Labels| l.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        let l = rules.conn(&c, "/db", None);
        assert_eq!(
            keys(&l),
            [
                "cgroup",
                "comm",
                "direction",
                "family",
                "proto",
                "remote_port"
            ]
        );
        assert!(l.contains(&("remote_port".into(), "5432".into())));
        assert!(l.contains(&("direction".into(), "out".into())));
        rules.remote_address = true;
        let l = rules.conn(&c, "/db", Some((IpAddr::from([10, 0, 0, 9]), 53)));
        assert!(l.contains(&("remote_address".into(), "10.0.0.9".into())));
        assert!(l.contains(&("remote_port".into(), "53".into())));
    }

    #[test]
    fn steered_connections_carry_their_service() {
        let c = crate::model::Conn {
            daddr: IpAddr::from([10, 0, 0, 2]),
            dport: 8080,
            steer: Some(crate::model::Steer {
                kind: "service",
                addr: IpAddr::from([198, 51, 100, 10]),
                port: 80,
            }),
            ..crate::model::Conn::sample(1, 1, 0, 0)
        };
        let rules = LabelRules {
            remote_ports: vec![],
            remote_address: false,
        };
        let l = rules.conn(&c, "/web", None);
        assert!(l.contains(&("service".into(), "198.51.100.10:80".into())));
        let other = rules.conn(&c, "/web", Some((IpAddr::from([10, 0, 0, 9]), 53)));
        assert!(!other.iter().any(|(k, _)| k == "service"));
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_drops_unit_and_eof() {
        let m = Metrics::new();
        m.sent_bytes
            .get_or_create(&vec![("comm".into(), "curl".into())])
            .inc_by(5);
        m.map_fill
            .get_or_create(&vec![("map".into(), "conns".into())])
            .set(0.25);
        let om = m.openmetrics();
        assert!(om.contains("# TYPE socklens_sent_bytes counter"), "{om}");
        assert!(om.contains("# UNIT socklens_sent_bytes bytes"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = to_prometheus_text(&om);
        assert!(
            text.contains("# TYPE socklens_sent_bytes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP socklens_sent_bytes_total Bytes"),
            "{text}"
        );
        assert!(
            text.contains("socklens_sent_bytes_total{comm=\"curl\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE socklens_map_fill_ratio gauge\n"),
            "{text}"
        );
        assert!(
            !text.contains("# UNIT") && !text.contains("# EOF"),
            "{text}"
        );
    }
}
