//! Cgroup hook events and policy verdicts as JSON and columns, with the
//! conventions of bind/listen events.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::host::cgroup::CgroupPaths;
use crate::model::cg::{op_name, steer_name, CgEvent};
use crate::model::names::{level_name, type_name};
use crate::model::{errno_name, family_name, proto_name};
use crate::output::columns::{self, Row};
use crate::output::rfc3339::Clock;
use crate::skel::policy::types::{slp_action, slp_event_kind, slp_mode};

fn opt_errno(ret: i32) -> Option<String> {
    let n = errno_name(ret);
    (!n.is_empty()).then_some(n)
}

/// One JSON object per event, with the fields bind/listen events have.
pub fn json(clock: &Clock, cgroups: Option<&mut CgroupPaths>, e: &CgEvent) -> Value {
    let cgroup = cgroups.and_then(|c| c.path_of(e.cgroup_id));
    let mut v = json!({
        "event": e.name(),
        "time": clock.iso(e.ts_ns),
        "time_ns": e.ts_ns,
        "pid": e.pid,
        "tid": e.tid,
        "uid": e.uid,
        "comm": e.comm,
        "cgroup_id": e.cgroup_id,
        "cgroup": cgroup,
        "netns": e.netns,
        "family": family_name(e.family),
        "type": type_name(e.sock_type),
        "proto": proto_name(e.proto),
        "attach": "cgroup",
    });
    if !matches!(slp_event_kind(e.kind), slp_event_kind::SLP_EV_GETSOCKOPT) {
        v["cookie"] = json!(e.cookie);
    }
    if e.has_addr() {
        v["addr"] = json!(e.addr.to_string());
        v["port"] = json!(e.port);
    }
    match slp_event_kind(e.kind) {
        slp_event_kind::SLP_EV_SOCK_RELEASE => {
            v["lifetime_ns"] = json!((e.lifetime_ns != 0).then_some(e.lifetime_ns));
        }
        slp_event_kind::SLP_EV_GETSOCKOPT => {
            v["level"] = json!(e.level);
            v["level_name"] = json!(level_name(e.level));
            v["optname"] = json!(e.optname);
            v["ret"] = json!(e.ret);
            v["errno"] = json!(opt_errno(e.ret));
        }
        slp_event_kind::SLP_EV_TRANSLATE => {
            v["steered"] = json!(steer_name(e.steer));
            v["real_addr"] = json!(e.real_addr.to_string());
            v["real_port"] = json!(e.real_port);
        }
        _ if e.is_verdict() => {
            v["op"] = json!(op_name(e.op));
            v["rule_id"] = json!(e.rule_id);
            v["default"] = json!(e.rule_id == 0);
            v["mode"] = json!(if u32::from(e.mode) == slp_mode::SLP_MODE_AUDIT.0 {
                "audit"
            } else {
                "enforce"
            });
            v["action"] = json!(if u32::from(e.action) == slp_action::SLP_DENY.0 {
                "deny"
            } else {
                "allow"
            });
            v["ret"] = json!(e.ret);
            v["errno"] = json!(opt_errno(e.ret));
        }
        _ => {}
    }
    v
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

    fn json_of(e: &CgEvent) -> Value {
        json(&Clock::now(), None, e)
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
        assert_eq!(json_of(&e)["lifetime_ns"], Value::Null);
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
