//! Observing the cgroup socket hooks for `socklens trace`: which programs of
//! src/bpf/policy.bpf.c each event needs, and loading them unpinned (observe
//! only, never enforcing). Their records: src/model/cg.rs.

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, OpenObject};

use crate::attach::cgroup_attach::CgroupTarget;
use crate::attach::loader::Filters;
use crate::error::{Context, Error, Result};
use crate::skel::policy::types::slp_event_kind;
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
        .ctx("opening the cgroup hook programs")?;
    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or_else(|| Error::Object {
            what: "opening the cgroup hook programs".into(),
            detail: "no .rodata section",
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
    let skel = open.load().ctx("loading the cgroup hook programs")?;
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
