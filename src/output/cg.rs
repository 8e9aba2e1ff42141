//! Cgroup hook events and policy verdicts as JSON and columns, with the
//! conventions of bind/listen events.

use std::net::SocketAddr;

use crate::host::cgroup::CgroupPaths;
use crate::model::cg::{op_name, steer_name, CgEvent};
use crate::model::names::{level_name, type_name};
use crate::model::{errno_name, family_name, proto_name};
use crate::output::columns::{self, Row};
use crate::output::json::line;
use crate::output::rfc3339::Clock;
use crate::skel::policy::types::{slp_action, slp_event_kind, slp_mode};

fn opt_errno(ret: i32) -> Option<String> {
    let n = errno_name(ret);
    (!n.is_empty()).then_some(n)
}

/// One JSON line per event, with the fields bind/listen events have.
pub fn json_line(clock: &Clock, cgroups: Option<&mut CgroupPaths>, e: &CgEvent) -> String {
    let cgroup = cgroups.and_then(|c| c.path_of(e.cgroup_id));
    line(|obj| {
        obj.value("event", &e.name());
        obj.plain_str("time", |out| clock.write_iso(e.ts_ns, out));
        obj.uint("time_ns", e.ts_ns);
        obj.uint("pid", e.pid);
        obj.uint("tid", e.tid);
        obj.uint("uid", e.uid);
        obj.value("comm", &e.comm);
        obj.uint("cgroup_id", e.cgroup_id);
        obj.value("cgroup", &cgroup);
        obj.uint("netns", e.netns);
        obj.plain("family", family_name(e.family));
        obj.value("type", &type_name(e.sock_type));
        obj.value("proto", &proto_name(e.proto));
        obj.plain("attach", "cgroup");
        if !matches!(slp_event_kind(e.kind), slp_event_kind::SLP_EV_GETSOCKOPT) {
            obj.uint("cookie", e.cookie);
        }
        if e.has_addr() {
            obj.ip("addr", e.addr);
            obj.uint("port", e.port);
        }
        match slp_event_kind(e.kind) {
            slp_event_kind::SLP_EV_SOCK_RELEASE => {
                obj.uint_or_null("lifetime_ns", (e.lifetime_ns != 0).then_some(e.lifetime_ns));
            }
            slp_event_kind::SLP_EV_TRANSLATE => {
                obj.value("steered", &steer_name(e.steer));
                obj.ip("real_addr", e.real_addr);
                obj.uint("real_port", e.real_port);
            }
            slp_event_kind::SLP_EV_GETSOCKOPT => {
                obj.value("level", &e.level);
                obj.value("level_name", &level_name(e.level));
                obj.value("optname", &e.optname);
                obj.value("ret", &e.ret);
                obj.value("errno", &opt_errno(e.ret));
            }
            _ if e.is_verdict() => {
                obj.value("op", &op_name(e.op));
                obj.uint("rule_id", e.rule_id);
                obj.bool("default", e.rule_id == 0);
                obj.plain(
                    "mode",
                    if u32::from(e.mode) == slp_mode::SLP_MODE_AUDIT.0 {
                        "audit"
                    } else {
                        "enforce"
                    },
                );
                obj.plain(
                    "action",
                    if u32::from(e.action) == slp_action::SLP_DENY.0 {
                        "deny"
                    } else {
                        "allow"
                    },
                );
                obj.value("ret", &e.ret);
                obj.value("errno", &opt_errno(e.ret));
            }
            _ => {}
        }
    })
}

/// The columns form: the address goes in LOCAL (bind, sock_release) or
/// REMOTE (connect, sendmsg, recvmsg, getpeername), the rest in DETAILS.
pub fn row(e: &CgEvent) -> Row {
    let mut row = Row {
        ts_ns: e.ts_ns,
        event: e.name(),
        pid: Some(e.pid),
        comm: Some(e.comm.to_string()),
        ..Default::default()
    };
    let addr = e.has_addr().then(|| SocketAddr::new(e.addr, e.port));
    let local = match slp_event_kind(e.kind) {
        slp_event_kind::SLP_EV_SOCK_RELEASE => true,
        _ if e.is_verdict() => op_name(e.op) == "bind",
        _ => false,
    };
    if local {
        row.local = addr;
    } else {
        row.remote = addr;
    }
    if e.is_verdict() {
        row.kv("op", op_name(e.op));
        let action = if u32::from(e.action) == slp_action::SLP_DENY.0 {
            "deny"
        } else {
            "allow"
        };
        row.kv("action", action);
        match e.rule_id {
            0 => row.kv("rule", "default"),
            id => row.kv("rule", id),
        }
        if e.ret != 0 {
            row.kv("err", errno_name(e.ret));
        }
    }
    match slp_event_kind(e.kind) {
        slp_event_kind::SLP_EV_SOCK_CREATE => {
            row.kv("family", family_name(e.family));
            row.kv("type", type_name(e.sock_type));
        }
        slp_event_kind::SLP_EV_GETSOCKOPT => {
            let level = level_name(e.level).map_or_else(|| e.level.to_string(), str::to_owned);
            row.kv("level", level);
            row.kv("opt", e.optname);
            row.kv("ret", e.ret);
        }
        slp_event_kind::SLP_EV_SOCK_RELEASE if e.lifetime_ns != 0 => {
            row.kv("life", columns::duration_ns(e.lifetime_ns));
        }
        slp_event_kind::SLP_EV_TRANSLATE => {
            row.kv("to", SocketAddr::new(e.real_addr, e.real_port));
            row.kv("steered", steer_name(e.steer));
            row.kv("cookie", e.cookie);
        }
        _ => {}
    }
    columns::proto_unless_tcp(&mut row, e.proto);
    row.kv("netns", e.netns);
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cg::decode;
    use crate::model::DecodeError;
    use crate::skel::policy::types::{slp_event, slp_op};

    fn raw(kind: slp_event_kind) -> slp_event {
        let mut r = slp_event {
            kind: kind.0,
            pid: 5,
            family: libc::AF_INET6 as u16,
            sock_type: libc::SOCK_STREAM as u16,
            proto: 6,
            port: 443,
            rule_id: 12,
            op: slp_op::SLP_OP_CONNECT6.0 as u8,
            mode: slp_mode::SLP_MODE_ENFORCE.0 as u8,
            action: slp_action::SLP_DENY.0 as u8,
            ret: -13,
            ..Default::default()
        };
        r.addr = std::net::Ipv6Addr::LOCALHOST.octets();
        r.comm[..3].copy_from_slice(b"app");
        r
    }

    fn bytes(r: &slp_event) -> Vec<u8> {
        // SAFETY: slp_event is a plain C struct.
        unsafe { plain::as_bytes(r) }.to_vec()
    }

    fn json_of(e: &CgEvent) -> serde_json::Value {
        serde_json::from_str(&json_line(&Clock::now(), None, e)).unwrap()
    }

    #[test]
    fn deny_json_names_rule_and_errno() {
        let Ok(e) = decode(&bytes(&raw(slp_event_kind::SLP_EV_POLICY_DENY))) else {
            panic!("decode");
        };
        let v = json_of(&e);
        assert_eq!(v["event"], "policy_deny");
        assert_eq!(v["op"], "connect");
        assert_eq!(v["rule_id"], 12);
        assert_eq!(v["errno"], "EACCES");
        assert_eq!(v["addr"], "::1");
        assert_eq!(v["port"], 443);
        assert_eq!(v["attach"], "cgroup");
    }

    #[test]
    fn sock_create_has_no_address_and_release_has_lifetime() {
        let Ok(e) = decode(&bytes(&raw(slp_event_kind::SLP_EV_SOCK_CREATE))) else {
            panic!("decode");
        };
        let v = json_of(&e);
        assert_eq!(v["type"], "stream");
        assert!(v.get("addr").is_none());
        let mut r = raw(slp_event_kind::SLP_EV_SOCK_RELEASE);
        r.lifetime_ns = 0;
        let Ok(e) = decode(&bytes(&r)) else {
            panic!("decode");
        };
        assert_eq!(json_of(&e)["lifetime_ns"], serde_json::Value::Null);
    }

    #[test]
    fn translate_names_the_service_and_the_backend() {
        let mut r = raw(slp_event_kind::SLP_EV_TRANSLATE);
        r.family = libc::AF_INET as u16;
        r.addr = [198, 51, 100, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        r.port = 80;
        r.real_addr = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        r.real_port = 8080;
        r.steer = 1;
        r.cookie = 77;
        let Ok(e) = decode(&bytes(&r)) else {
            panic!("decode");
        };
        let v = json_of(&e);
        assert_eq!(v["event"], "translate");
        assert_eq!(v["addr"], "198.51.100.10");
        assert_eq!(v["port"], 80);
        assert_eq!(v["real_addr"], "10.0.0.2");
        assert_eq!(v["real_port"], 8080);
        assert_eq!(v["steered"], "service");
        assert_eq!(v["cookie"], 77);
        let row = row(&e);
        assert_eq!(row.remote, Some("198.51.100.10:80".parse().unwrap()));
        assert_eq!(
            row.details[..3],
            ["to=10.0.0.2:8080", "steered=service", "cookie=77"]
        );
    }

    #[test]
    fn unknown_kinds_are_malformed() {
        let r = slp_event {
            kind: 3,
            ..Default::default()
        };
        assert_eq!(decode(&bytes(&r)), Err(DecodeError::UnknownKind(3)));
    }
}
