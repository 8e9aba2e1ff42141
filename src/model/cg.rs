//! Records of the cgroup socket programs (src/bpf/policy.bpf.c): an
//! observed call or a policy verdict, decoded from slp_events.

use std::net::IpAddr;

use crate::model::raw::{c_string, ip_from, Comm, DecodeError};
use crate::skel::policy::types::{slp_event, slp_event_kind, slp_op, slp_xlate_kind};

/// One record of slp_events: an observed call or a policy verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgEvent {
    pub kind: u32,
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub cookie: u64,
    pub lifetime_ns: u64,
    pub netns: u32,
    pub ret: i32,
    pub family: u16,
    pub sock_type: u16,
    pub proto: u16,
    pub port: u16,
    pub level: i32,
    pub optname: i32,
    pub rule_id: u32,
    pub op: u8,
    pub mode: u8,
    pub action: u8,
    pub addr: IpAddr,
    /// translate: the entry's kind and where the kernel sent the call.
    pub steer: u8,
    pub real_addr: IpAddr,
    pub real_port: u16,
}

impl CgEvent {
    pub fn name(&self) -> &'static str {
        match slp_event_kind(self.kind) {
            slp_event_kind::SLP_EV_SOCK_CREATE => "sock_create",
            slp_event_kind::SLP_EV_CONNECT => "connect",
            slp_event_kind::SLP_EV_SENDMSG => "sendmsg",
            slp_event_kind::SLP_EV_RECVMSG => "recvmsg",
            slp_event_kind::SLP_EV_GETSOCKOPT => "getsockopt",
            slp_event_kind::SLP_EV_GETPEERNAME => "getpeername",
            slp_event_kind::SLP_EV_SOCK_RELEASE => "sock_release",
            slp_event_kind::SLP_EV_POLICY_DENY => "policy_deny",
            slp_event_kind::SLP_EV_POLICY_AUDIT => "policy_audit",
            slp_event_kind::SLP_EV_TRANSLATE => "translate",
            _ => "unknown",
        }
    }

    pub fn is_verdict(&self) -> bool {
        matches!(
            slp_event_kind(self.kind),
            slp_event_kind::SLP_EV_POLICY_DENY | slp_event_kind::SLP_EV_POLICY_AUDIT
        )
    }

    pub fn is_translate(&self) -> bool {
        slp_event_kind(self.kind) == slp_event_kind::SLP_EV_TRANSLATE
    }

    /// Whether the event carries an address and port.
    pub fn has_addr(&self) -> bool {
        match slp_event_kind(self.kind) {
            slp_event_kind::SLP_EV_SOCK_CREATE | slp_event_kind::SLP_EV_GETSOCKOPT => false,
            _ if self.is_verdict() => self.op != slp_op::SLP_OP_CREATE.0 as u8,
            _ => true,
        }
    }
}

/// The operation of a verdict, by name.
pub fn op_name(op: u8) -> &'static str {
    match slp_op(u32::from(op)) {
        slp_op::SLP_OP_CREATE => "create",
        slp_op::SLP_OP_BIND4 | slp_op::SLP_OP_BIND6 => "bind",
        slp_op::SLP_OP_CONNECT4 | slp_op::SLP_OP_CONNECT6 => "connect",
        slp_op::SLP_OP_SENDMSG4 | slp_op::SLP_OP_SENDMSG6 => "sendmsg",
        _ => "unknown",
    }
}

/// The name of a steering kind (policy.h enum slp_xlate_kind), as records
/// show it.
pub fn steer_name(kind: u8) -> &'static str {
    match slp_xlate_kind(u32::from(kind)) {
        slp_xlate_kind::SLP_XLATE_SERVICE => "service",
        slp_xlate_kind::SLP_XLATE_REDIRECT => "redirect",
        slp_xlate_kind::SLP_XLATE_ORIG_DST => "original_dst",
        _ => "unknown",
    }
}

/// Decodes one slp_events record.
pub fn decode(bytes: &[u8]) -> Result<CgEvent, DecodeError> {
    let mut raw = slp_event::default();
    plain::copy_from_bytes(&mut raw, bytes).map_err(|_| DecodeError::Short(bytes.len()))?;
    let e = CgEvent {
        kind: raw.kind,
        ts_ns: raw.ts_ns,
        pid: raw.pid,
        tid: raw.tid,
        uid: raw.uid,
        comm: c_string(&raw.comm),
        cgroup_id: raw.cgroup_id,
        cookie: raw.cookie,
        lifetime_ns: raw.lifetime_ns,
        netns: raw.netns,
        ret: raw.ret,
        family: raw.family,
        sock_type: raw.sock_type,
        proto: raw.proto,
        port: raw.port,
        level: raw.level,
        optname: raw.optname,
        rule_id: raw.rule_id,
        op: raw.op,
        mode: raw.mode,
        action: raw.action,
        addr: ip_from(raw.family, &raw.addr),
        steer: raw.steer,
        real_addr: ip_from(raw.family, &raw.real_addr),
        real_port: raw.real_port,
    };
    if e.name() == "unknown" {
        return Err(DecodeError::UnknownKind(raw.kind));
    }
    Ok(e)
}
