//! Observing the cgroup socket hooks for `socklens trace`: which programs of
//! src/bpf/policy.bpf.c each event needs, loading them unpinned (observe only,
//! never enforcing), decoding their records and rendering them with the same
//! conventions as bind/listen.

use std::fmt;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, OpenObject};
use serde_json::{json, Value};

use crate::cgroup_attach::CgroupTarget;
use crate::error::{Error, Result};
use crate::loader::Filters;
use crate::model::{c_string, errno_name, family_name, ip_from, proto_name, DecodeError, Event};
use crate::output::Renderer;
use crate::probe::errno_name as lib_errno;
use crate::skel::policy::types::{slp_action, slp_event, slp_event_kind, slp_mode, slp_op};
use crate::skel::policy::{PolicySkel, PolicySkelBuilder};

/// A cgroup socket hook `trace` can observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CgHook {
    SockCreate,
    Connect,
    Sendmsg,
    Recvmsg,
    Getsockopt,
    Getpeername,
    SockRelease,
}

impl CgHook {
    pub const ALL: [Self; 7] = [
        Self::SockCreate,
        Self::Connect,
        Self::Sendmsg,
        Self::Recvmsg,
        Self::Getsockopt,
        Self::Getpeername,
        Self::SockRelease,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::SockCreate => "sock_create",
            Self::Connect => "connect",
            Self::Sendmsg => "sendmsg",
            Self::Recvmsg => "recvmsg",
            Self::Getsockopt => "getsockopt",
            Self::Getpeername => "getpeername",
            Self::SockRelease => "sock_release",
        }
    }

    fn kind(self) -> slp_event_kind {
        match self {
            Self::SockCreate => slp_event_kind::SLP_EV_SOCK_CREATE,
            Self::Connect => slp_event_kind::SLP_EV_CONNECT,
            Self::Sendmsg => slp_event_kind::SLP_EV_SENDMSG,
            Self::Recvmsg => slp_event_kind::SLP_EV_RECVMSG,
            Self::Getsockopt => slp_event_kind::SLP_EV_GETSOCKOPT,
            Self::Getpeername => slp_event_kind::SLP_EV_GETPEERNAME,
            Self::SockRelease => slp_event_kind::SLP_EV_SOCK_RELEASE,
        }
    }

    /// The programs serving this hook. sock_release needs sock_create too: it
    /// stamps each socket's birth for the lifetime.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Self::SockCreate => &["slp_sock_create"],
            Self::Connect => &["slp_connect4", "slp_connect6"],
            Self::Sendmsg => &["slp_sendmsg4", "slp_sendmsg6"],
            Self::Recvmsg => &["slp_recvmsg4", "slp_recvmsg6"],
            Self::Getsockopt => &["slp_getsockopt"],
            Self::Getpeername => &["slp_getpeername4", "slp_getpeername6"],
            Self::SockRelease => &["slp_sock_release", "slp_sock_create"],
        }
    }
}

impl fmt::Display for CgHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Observer programs attached at one cgroup; dropping it detaches everything.
pub struct CgSession<'obj> {
    pub skel: PolicySkel<'obj>,
    pub attached_at: String,
    _links: Vec<Link>,
}

fn load_err(what: &str) -> impl Fn(libbpf_rs::Error) -> Error + '_ {
    move |e| Error::kernel(what, format!("{} ({e})", lib_errno(&e)))
}

/// Loads the observer programs for `hooks` with the trace filters and attaches
/// them at `cgroup` (the `--cgroup` directory, else the cgroup v2 root).
pub fn load<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    hooks: &[CgHook],
    filters: &Filters,
    cgroup: &Path,
) -> Result<CgSession<'obj>> {
    let mut open = PolicySkelBuilder::default()
        .open(storage)
        .map_err(load_err("opening the cgroup hook programs"))?;
    let ro =
        open.maps.rodata_data.as_deref_mut().ok_or_else(|| {
            Error::kernel("opening the cgroup hook programs", "no .rodata section")
        })?;
    ro.observe = true;
    ro.enforce = false;
    ro.observe_mask = hooks.iter().fold(0, |m, h| {
        m | 1 << (h.kind().0 - slp_event_kind::SLP_EV_SOCK_CREATE.0)
    });
    ro.filter_pid = filters.pid.unwrap_or(0);
    ro.filter_netns = filters.netns.unwrap_or(0);
    ro.filter_family = filters.family.unwrap_or(0);
    if let Some(comm) = &filters.comm {
        ro.filter_comm = true;
        let n = comm.len().min(ro.filter_comm_value.len() - 1);
        ro.filter_comm_value[..n].copy_from_slice(&comm.as_bytes()[..n]);
    }
    let wanted: Vec<&str> = hooks.iter().flat_map(|h| h.programs()).copied().collect();
    for mut prog in open.open_object_mut().progs_mut() {
        let keep = prog.name().to_str().is_some_and(|n| wanted.contains(&n));
        prog.set_autoload(keep);
    }
    let skel = open
        .load()
        .map_err(load_err("loading the cgroup hook programs"))?;
    let target = CgroupTarget::open(cgroup)?;
    let mut links = Vec::new();
    for prog in skel.object().progs_mut() {
        let name = prog.name().to_string_lossy().into_owned();
        if wanted.contains(&name.as_str()) {
            links.push(target.attach(&prog)?);
        }
    }
    Ok(CgSession {
        skel,
        attached_at: cgroup.display().to_string(),
        _links: links,
    })
}

/// One record of slp_events: an observed call or a policy verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgEvent {
    pub kind: u32,
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: crate::model::Comm,
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
            _ => "unknown",
        }
    }

    fn is_verdict(&self) -> bool {
        matches!(
            slp_event_kind(self.kind),
            slp_event_kind::SLP_EV_POLICY_DENY | slp_event_kind::SLP_EV_POLICY_AUDIT
        )
    }

    /// Whether the event carries an address and port.
    fn has_addr(&self) -> bool {
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

pub fn type_name(t: u16) -> String {
    match i32::from(t) {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        other => format!("type{other}"),
    }
}

fn level_name(level: i32) -> Option<&'static str> {
    Some(match level {
        libc::SOL_SOCKET => "SOL_SOCKET",
        libc::IPPROTO_IP => "SOL_IP",
        libc::IPPROTO_IPV6 => "SOL_IPV6",
        libc::IPPROTO_TCP => "SOL_TCP",
        libc::IPPROTO_UDP => "SOL_UDP",
        _ => return None,
    })
}

/// Decodes one slp_events record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
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
    };
    if e.name() == "unknown" {
        return Err(DecodeError::UnknownKind(raw.kind));
    }
    Ok(Event::Cg(e))
}

fn opt_errno(ret: i32) -> Option<String> {
    let n = errno_name(ret);
    (!n.is_empty()).then_some(n)
}

/// One JSON object per event, with the fields bind/listen events have.
pub fn json(r: &mut Renderer, e: &CgEvent) -> Value {
    let cgroup = r.cgroups.as_mut().and_then(|c| c.path_of(e.cgroup_id));
    let mut v = json!({
        "event": e.name(),
        "time": r.clock.iso(e.ts_ns),
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
pub fn row(e: &CgEvent) -> crate::columns::Row {
    let mut row = crate::columns::Row {
        ts_ns: e.ts_ns,
        event: e.name(),
        pid: Some(e.pid),
        comm: Some(e.comm.to_string()),
        ..Default::default()
    };
    let addr = e
        .has_addr()
        .then(|| std::net::SocketAddr::new(e.addr, e.port));
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
            row.kv("life", crate::columns::duration_ns(e.lifetime_ns));
        }
        _ => {}
    }
    crate::columns::proto_unless_tcp(&mut row, e.proto);
    row.kv("netns", e.netns);
    row
}

/// Whether a policy verdict passes the trace filters. The pinned policy's
/// programs emit every verdict; the observer programs filter in the kernel, so
/// every other event passes.
pub fn verdict_wanted(
    event: &Event,
    f: &Filters,
    cgroup_rel: Option<&str>,
    r: &mut Renderer,
) -> bool {
    let Event::Cg(e) = event else {
        return true;
    };
    if !e.is_verdict() {
        return true;
    }
    if f.pid.is_some_and(|p| p != e.pid)
        || f.comm.as_ref().is_some_and(|c| *c != e.comm)
        || f.netns.is_some_and(|n| n != e.netns)
        || f.family.is_some_and(|fam| fam != e.family)
    {
        return false;
    }
    match cgroup_rel {
        None => true,
        Some(rel) => r
            .cgroups
            .as_mut()
            .and_then(|c| c.path_of(e.cgroup_id))
            .is_some_and(|p| rel == "/" || p == rel || p.starts_with(&format!("{rel}/"))),
    }
}

/// Discards what a pinned ring buffer queued before we started reading it.
pub fn drain(map: &dyn MapCore) -> Result<()> {
    let mut b = libbpf_rs::RingBufferBuilder::new();
    b.add(map, |_: &[u8]| 0)
        .map_err(|e| Error::kernel("opening the policy event buffer", e))?;
    let rb = b
        .build()
        .map_err(|e| Error::kernel("opening the policy event buffer", e))?;
    rb.consume()
        .map_err(|e| Error::kernel("reading the policy event buffer", e))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn renderer() -> Renderer {
        Renderer {
            clock: crate::output::Clock::now(),
            cgroups: None,
            json: true,
            layout: crate::columns::Layout::default(),
        }
    }

    #[test]
    fn deny_json_names_rule_and_errno() {
        let Ok(Event::Cg(e)) = decode(&bytes(&raw(slp_event_kind::SLP_EV_POLICY_DENY))) else {
            panic!("decode");
        };
        let v = json(&mut renderer(), &e);
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
        let Ok(Event::Cg(e)) = decode(&bytes(&raw(slp_event_kind::SLP_EV_SOCK_CREATE))) else {
            panic!("decode");
        };
        let v = json(&mut renderer(), &e);
        assert_eq!(v["type"], "stream");
        assert!(v.get("addr").is_none());
        let mut r = raw(slp_event_kind::SLP_EV_SOCK_RELEASE);
        r.lifetime_ns = 0;
        let Ok(Event::Cg(e)) = decode(&bytes(&r)) else {
            panic!("decode");
        };
        assert_eq!(json(&mut renderer(), &e)["lifetime_ns"], Value::Null);
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
