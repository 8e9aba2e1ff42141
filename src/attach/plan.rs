//! Attach planning: a pure function from what the kernel can do (probed by
//! `probe`) and what the user asked for to one attach tier per logical hook.
//!
//! Every logical hook lists, best first, the tiers that can serve it, what
//! each tier needs from the kernel, and which BPF programs implement it. The
//! plan is also the only owner of the final program set: the kernel-shape
//! variants, the special cases and the test knobs are its inputs, and the
//! loader loads and attaches `Plan::programs`, turning off the rest.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::host::probe::KernelShape;
pub use crate::host::probe::{Capabilities, Requirement};

/// An attach method, best first: fentry/fexit are the cheapest, kprobes work
/// on kernels without BTF trampolines, tracepoints work everywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Tier {
    pub const ALL: [Self; 3] = [Self::Fentry, Self::Kprobe, Self::Tracepoint];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown attach tier '{s}' (fentry, kprobe, tracepoint)"))
    }
}

/// A logical hook: one kind of socket activity socklens observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Bind,
    Listen,
    /// TCP state changes: connection start, establishment, close.
    State,
    /// accept() returning a connection: its owner.
    Accept,
    /// sendmsg return values: bytes sent.
    Send,
    /// recvmsg return values: bytes received.
    Recv,
    Sendfile,
    Retransmit,
}

impl Hook {
    pub const ALL: [Self; 8] = [
        Self::Bind,
        Self::Listen,
        Self::State,
        Self::Accept,
        Self::Send,
        Self::Recv,
        Self::Sendfile,
        Self::Retransmit,
    ];

    /// Everything connection accounting needs.
    pub const CONNS: [Self; 7] = [
        Self::Listen,
        Self::State,
        Self::Accept,
        Self::Send,
        Self::Recv,
        Self::Sendfile,
        Self::Retransmit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Listen => "listen",
            Self::State => "state",
            Self::Accept => "accept",
            Self::Send => "send",
            Self::Recv => "recv",
            Self::Sendfile => "sendfile",
            Self::Retransmit => "retransmit",
        }
    }

    /// The tiers that can serve this hook, best first.
    pub fn tiers(self) -> &'static [TierSpec] {
        match self {
            Self::Bind => BIND_TIERS,
            Self::Listen => LISTEN_TIERS,
            Self::State => STATE_TIERS,
            Self::Accept => ACCEPT_TIERS,
            Self::Send => SEND_TIERS,
            Self::Recv => RECV_TIERS,
            Self::Sendfile => SENDFILE_TIERS,
            Self::Retransmit => RETRANSMIT_TIERS,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One way to serve a hook. A hook may list several specs of one tier, best
/// first: the first whose requirements hold serves it.
#[derive(Debug)]
pub struct TierSpec {
    pub tier: Tier,
    pub requires: &'static [Requirement],
    /// Program names in src/bpf/socklens.bpf.c.
    pub programs: &'static [&'static str],
}

impl TierSpec {
    /// Enabling any syscall tracepoint puts every syscall of every task on
    /// the kernel's slow path, traced or not: a cost worth avoiding.
    pub fn slows_all_syscalls(&self) -> bool {
        self.requires
            .iter()
            .any(|r| matches!(r, Requirement::Tracepoint("syscalls", _)))
    }
}

const BIND_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[
            Requirement::Fentry("inet_bind"),
            Requirement::Fentry("inet6_bind"),
        ],
        programs: &["sl_fx_inet_bind", "sl_fx_inet6_bind"],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[
            Requirement::Kprobe("inet_bind"),
            Requirement::Kprobe("inet6_bind"),
        ],
        programs: &[
            "sl_kp_inet_bind",
            "sl_kr_inet_bind",
            "sl_kp_inet6_bind",
            "sl_kr_inet6_bind",
        ],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::Tracepoint("syscalls", "sys_enter_bind"),
            Requirement::Tracepoint("syscalls", "sys_exit_bind"),
        ],
        programs: &["sl_tp_bind_enter", "sl_tp_bind_exit"],
    },
];

const LISTEN_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[
            Requirement::Fentry("__sys_listen"),
            Requirement::Fentry("inet_listen"),
        ],
        programs: &["sl_fe_sys_listen", "sl_fx_inet_listen"],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[
            Requirement::Kprobe("__sys_listen"),
            Requirement::Kprobe("inet_listen"),
        ],
        programs: &["sl_kp_sys_listen", "sl_kp_inet_listen", "sl_kr_inet_listen"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::Tracepoint("syscalls", "sys_enter_listen"),
            Requirement::Tracepoint("syscalls", "sys_exit_listen"),
        ],
        programs: &["sl_tp_listen_enter", "sl_tp_listen_exit"],
    },
];

/// State changes, and socket destruction: the close of a socket whose
/// TCP_CLOSE the state program missed (the kernel skips a tracing program
/// already running on the same CPU) is reported there, by another program.
const STATE_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[
            Requirement::Fentry("tcp_set_state"),
            Requirement::Fentry("tcp_v4_destroy_sock"),
        ],
        programs: &["sl_fe_tcp_set_state", "sl_fe_tcp_destroy"],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[
            Requirement::Kprobe("tcp_set_state"),
            Requirement::Kprobe("tcp_v4_destroy_sock"),
        ],
        programs: &["sl_kp_tcp_set_state", "sl_kp_tcp_destroy"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::TpBtf("sock", "inet_sock_set_state"),
            Requirement::TpBtf("tcp", "tcp_destroy_sock"),
        ],
        programs: &["sl_tp_set_state", "sl_tp_tcp_destroy"],
    },
];

const ACCEPT_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[Requirement::Fentry("inet_csk_accept")],
        programs: &["sl_fx_accept"],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[Requirement::Kprobe("inet_csk_accept")],
        programs: &["sl_kr_accept"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::Tracepoint("syscalls", "sys_exit_accept4"),
            Requirement::Tracepoint("syscalls", "sys_exit_accept"),
        ],
        programs: &["sl_tp_accept4_exit", "sl_tp_accept_exit"],
    },
];

/// The send hook also sees UDP sockets end (their entries must go before a
/// new socket takes the address): udp(v6)_destroy_sock on the fentry and
/// kprobe tiers; on the tracepoint tier, which has no tracepoint there, the
/// loader adds a cgroup sock_release program where cgroup v2 is mounted.
const SEND_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[
            Requirement::Fentry("tcp_sendmsg"),
            Requirement::Fentry("udp_sendmsg"),
            Requirement::Fentry("udpv6_sendmsg"),
            Requirement::Fentry("udp_destroy_sock"),
            Requirement::Fentry("udpv6_destroy_sock"),
        ],
        programs: &[
            "sl_fx_tcp_sendmsg",
            "sl_fx_udp_sendmsg",
            "sl_fx_udp6_sendmsg",
            "sl_fe_udp_destroy",
            "sl_fe_udp6_destroy",
        ],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[
            Requirement::Kprobe("tcp_sendmsg"),
            Requirement::Kprobe("udp_sendmsg"),
            Requirement::Kprobe("udpv6_sendmsg"),
            Requirement::Kprobe("udp_destroy_sock"),
            Requirement::Kprobe("udpv6_destroy_sock"),
        ],
        programs: &[
            "sl_kp_tcp_sendmsg",
            "sl_kr_tcp_sendmsg",
            "sl_kp_udp_sendmsg",
            "sl_kr_udp_sendmsg",
            "sl_kp_udp6_sendmsg",
            "sl_kr_udp6_sendmsg",
            "sl_kp_udp_destroy",
            "sl_kp_udp6_destroy",
        ],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::TpBtf("sock", "sock_send_length"),
            Requirement::CgroupV2,
            // tcp_touch casts the socket to a tcp_sock (6.2+).
            Requirement::BtfFunc("bpf_rdonly_cast"),
        ],
        programs: &["sl_tp_send_len", "sl_cg_udp_send4", "sl_cg_udp_send6"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::Tracepoint("syscalls", "sys_enter_write"),
            Requirement::Tracepoint("syscalls", "sys_exit_write"),
            Requirement::Tracepoint("syscalls", "sys_enter_writev"),
            Requirement::Tracepoint("syscalls", "sys_exit_writev"),
            Requirement::Tracepoint("syscalls", "sys_enter_sendto"),
            Requirement::Tracepoint("syscalls", "sys_exit_sendto"),
            Requirement::Tracepoint("syscalls", "sys_enter_sendmsg"),
            Requirement::Tracepoint("syscalls", "sys_exit_sendmsg"),
        ],
        programs: &[
            "sl_sys_write_enter",
            "sl_sys_write_exit",
            "sl_sys_writev_enter",
            "sl_sys_writev_exit",
            "sl_sys_sendto_enter",
            "sl_sys_sendto_exit",
            "sl_sys_sendmsg_enter",
            "sl_sys_sendmsg_exit",
        ],
    },
];

const RECV_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[
            Requirement::Fentry("tcp_recvmsg"),
            Requirement::Fentry("udp_recvmsg"),
            Requirement::Fentry("udpv6_recvmsg"),
        ],
        programs: &[
            "sl_fx_tcp_recvmsg",
            "sl_fx_udp_recvmsg",
            "sl_fx_udp6_recvmsg",
        ],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[
            Requirement::Kprobe("tcp_recvmsg"),
            Requirement::Kprobe("udp_recvmsg"),
            Requirement::Kprobe("udpv6_recvmsg"),
        ],
        programs: &[
            "sl_kp_tcp_recvmsg",
            "sl_kr_tcp_recvmsg",
            "sl_kp_udp_recvmsg",
            "sl_kr_udp_recvmsg",
            "sl_kp_udp6_recvmsg",
            "sl_kr_udp6_recvmsg",
        ],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::TpBtf("sock", "sock_recv_length"),
            Requirement::CgroupV2,
            // tcp_touch casts the socket to a tcp_sock (6.2+).
            Requirement::BtfFunc("bpf_rdonly_cast"),
        ],
        programs: &["sl_tp_recv_len", "sl_cg_udp_recv4", "sl_cg_udp_recv6"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::Tracepoint("syscalls", "sys_enter_read"),
            Requirement::Tracepoint("syscalls", "sys_exit_read"),
            Requirement::Tracepoint("syscalls", "sys_enter_readv"),
            Requirement::Tracepoint("syscalls", "sys_exit_readv"),
            Requirement::Tracepoint("syscalls", "sys_enter_recvfrom"),
            Requirement::Tracepoint("syscalls", "sys_exit_recvfrom"),
            Requirement::Tracepoint("syscalls", "sys_enter_recvmsg"),
            Requirement::Tracepoint("syscalls", "sys_exit_recvmsg"),
        ],
        programs: &[
            "sl_sys_read_enter",
            "sl_sys_read_exit",
            "sl_sys_readv_enter",
            "sl_sys_readv_exit",
            "sl_sys_recvfrom_enter",
            "sl_sys_recvfrom_exit",
            "sl_sys_recvmsg_enter",
            "sl_sys_recvmsg_exit",
        ],
    },
];

const SENDFILE_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[Requirement::Fentry("do_sendfile")],
        programs: &["sl_fx_sendfile"],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[Requirement::Kprobe("do_sendfile")],
        programs: &["sl_kp_sendfile", "sl_kr_sendfile"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::TpBtf("sock", "sock_send_length"),
            Requirement::BtfFunc("splice_to_socket"),
            // in_sendfile casts the task's saved registers (6.2+).
            Requirement::BtfFunc("bpf_rdonly_cast"),
        ],
        programs: &["sl_tp_sendfile_len"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[
            Requirement::Tracepoint("syscalls", "sys_enter_sendfile64"),
            Requirement::Tracepoint("syscalls", "sys_exit_sendfile64"),
        ],
        programs: &["sl_tp_sendfile_enter", "sl_tp_sendfile_exit"],
    },
];

const RETRANSMIT_TIERS: &[TierSpec] = &[
    TierSpec {
        tier: Tier::Fentry,
        requires: &[Requirement::Fentry("tcp_retransmit_skb")],
        programs: &["sl_fe_retransmit"],
    },
    TierSpec {
        tier: Tier::Kprobe,
        requires: &[Requirement::Kprobe("tcp_retransmit_skb")],
        programs: &["sl_kp_retransmit"],
    },
    TierSpec {
        tier: Tier::Tracepoint,
        requires: &[Requirement::TpBtf("tcp", "tcp_retransmit_skb")],
        programs: &["sl_tp_retransmit"],
    },
];

/// Test knobs: `SOCKLENS_DISABLE`, a comma-separated list parsed once by
/// the command line. BTF tracepoint names (say `sock_send_length`) and
/// `cgroup` count as missing, so the suite can run the fallback variants of
/// the tracepoint tier on a kernel that has the better ones (as before 6.3);
/// `tcp_seq` counts TCP bytes per send and receive even where the sequence
/// counters would serve (bench/bench.py compares the two); `state_close`
/// makes the state hook ignore TCP_CLOSE, as when the kernel skips its run,
/// so the suite can check that socket destruction still reports every close;
/// `state_start` makes it ignore every start, so the suite can check that
/// each connection is still tracked from its first use or active open;
/// `accel_calls` makes the send and receive hooks count no redirected bytes,
/// so the suite can check what sk_msg's own counts give.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knobs {
    off: BTreeSet<String>,
}

impl Knobs {
    pub const ENV: &'static str = "SOCKLENS_DISABLE";

    pub fn parse(list: &str) -> Self {
        Self {
            off: list
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The knobs of this process's environment.
    pub fn from_env() -> Self {
        std::env::var(Self::ENV).map_or_else(|_| Self::default(), |v| Self::parse(&v))
    }

    fn has(&self, name: &str) -> bool {
        self.off.contains(name)
    }

    /// Whether a requirement counts as missing.
    pub fn disables(&self, req: Requirement) -> bool {
        match req {
            Requirement::TpBtf(_, name) => self.has(name),
            Requirement::CgroupV2 => self.has("cgroup"),
            _ => false,
        }
    }

    pub fn tcp_seq_off(&self) -> bool {
        self.has("tcp_seq")
    }

    pub fn state_close_off(&self) -> bool {
        self.has("state_close")
    }

    pub fn conn_hooks_off(&self) -> bool {
        self.has("conn_hooks")
    }

    pub fn udp_send_off(&self) -> bool {
        self.has("udp_send")
    }

    pub fn state_start_off(&self) -> bool {
        self.has("state_start")
    }

    pub fn accel_calls_off(&self) -> bool {
        self.has("accel_calls")
    }
}

/// What the user asked for, and what the plan needs to know about the kernel
/// beyond the capabilities.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub hooks: Vec<Hook>,
    /// Use this tier for every hook, or fail; `None` picks the best available.
    pub force: Option<Tier>,
    /// Hooks worth having only when cheap: left out (see `Plan::skipped`)
    /// when the way chosen for them would slow every syscall on the host.
    pub optional: Vec<Hook>,
    pub knobs: Knobs,
    /// The kernel's function signatures: which variant of a program loads.
    pub shape: KernelShape,
    /// Connections are tracked: the socket iterators seed the maps.
    pub track_conns: bool,
    /// UDP traffic is accounted per peer.
    pub udp_flows: bool,
}

/// The chosen tier of one hook and why each better tier lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookPlan {
    pub hook: Hook,
    pub tier: Tier,
    /// Index of the chosen spec in `hook.tiers()`.
    pub variant: usize,
    pub rejected: Vec<(Tier, String)>,
}

impl HookPlan {
    pub fn spec(&self) -> &'static TierSpec {
        &self.hook.tiers()[self.variant]
    }

    pub fn programs(&self) -> &'static [&'static str] {
        self.spec().programs
    }

    /// The chosen way in a few words, when a tier has more than one.
    pub fn how(&self) -> Option<String> {
        let variants = self
            .hook
            .tiers()
            .iter()
            .filter(|s| s.tier == self.tier)
            .count();
        if variants < 2 {
            return None;
        }
        if self.via_syscalls() {
            return Some("syscall tracepoints".to_owned());
        }
        let reqs: Vec<String> = self.spec().requires.iter().map(|r| r.to_string()).collect();
        Some(reqs.join(" + "))
    }

    /// Whether the chosen way is the syscall-tracepoint one.
    pub fn via_syscalls(&self) -> bool {
        self.spec().slows_all_syscalls()
    }
}

/// One program of the final set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    /// Its name in src/bpf/socklens.bpf.c.
    pub name: &'static str,
    /// The hook it serves, which the loader attaches it for and names in
    /// errors; `None` for the socket iterators, loaded but run by
    /// src/session/seed.rs.
    pub hook: Option<Hook>,
    /// The tier it serves the hook as; `None` for a program outside the
    /// tier tables.
    pub tier: Option<Tier>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub hooks: Vec<HookPlan>,
    /// Optional hooks left out, and why.
    pub skipped: Vec<(Hook, String)>,
    /// Every program to load, in attach order; the loader turns off the rest.
    pub programs: Vec<Program>,
    /// TCP bytes from the sockets' sequence counters (`tcp_bytes_from_seq`).
    pub tcp_bytes_from_seq: bool,
    /// The send program on sock:sock_send_length does the sendfile check too.
    pub sendfile_in_send_len: bool,
    /// sendfile data needs adding to tx: the send hook misses it on
    /// tcp_sendpage kernels, and when it counts send syscalls.
    pub sendfile_adds_tx: bool,
    /// The state hook ignores TCP_CLOSE (the `state_close` knob).
    pub state_skips_close: bool,
    /// The state hook ignores connection starts (the `state_start` knob).
    pub state_skips_start: bool,
    /// The send hook skips UDP sends and counts them missed (the `udp_send` knob).
    pub udp_sends_skipped: bool,
    /// Only the destruction hook sees TCP connections (the `conn_hooks` knob).
    pub conn_hooks_blind: bool,
    /// The send and receive hooks count no redirected bytes (`accel_calls`).
    pub accel_calls_blind: bool,
    /// The kernel's function signatures the programs branch on (rodata).
    pub shape: KernelShape,
}

impl Plan {
    /// The names of `programs`.
    pub fn names(&self) -> BTreeSet<&'static str> {
        self.programs.iter().map(|p| p.name).collect()
    }

    pub fn tier_of(&self, hook: Hook) -> Option<Tier> {
        self.hooks.iter().find(|h| h.hook == hook).map(|h| h.tier)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{hook}: no attach method works on this kernel ({})", join_reasons(.reasons))]
    NoTier {
        hook: Hook,
        reasons: Vec<(Tier, String)>,
    },
    #[error("{hook}: forced attach method {tier} is not available: {reason}")]
    ForcedUnavailable {
        hook: Hook,
        tier: Tier,
        reason: String,
    },
}

impl From<PlanError> for crate::error::Error {
    fn from(e: PlanError) -> Self {
        Self::Plan(Box::new(e))
    }
}

fn join_reasons(reasons: &[(Tier, String)]) -> String {
    reasons
        .iter()
        .map(|(t, r)| format!("{t}: {r}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a tier cannot serve its hook: the first unmet requirement.
fn tier_verdict(caps: &Capabilities, knobs: &Knobs, spec: &TierSpec) -> Result<(), String> {
    spec.requires.iter().try_for_each(|&req| {
        if knobs.disables(req) {
            return Err(format!("{req}: turned off by {}", Knobs::ENV));
        }
        caps.check(req).map_err(|why| format!("{req}: {why}"))
    })
}

/// The first spec of `tier` that works, or why none does (every variant's reason).
fn pick_variant(
    caps: &Capabilities,
    knobs: &Knobs,
    hook: Hook,
    tier: Tier,
) -> Result<usize, String> {
    let mut reasons = Vec::new();
    for (i, spec) in hook.tiers().iter().enumerate() {
        if spec.tier != tier {
            continue;
        }
        match tier_verdict(caps, knobs, spec) {
            Ok(()) => return Ok(i),
            Err(why) => reasons.push(why),
        }
    }
    Err(reasons.join(", or "))
}

/// Chooses the tier of one hook.
pub fn plan_hook(
    caps: &Capabilities,
    knobs: &Knobs,
    hook: Hook,
    force: Option<Tier>,
) -> Result<HookPlan, PlanError> {
    if let Some(tier) = force {
        return match pick_variant(caps, knobs, hook, tier) {
            Ok(variant) => Ok(HookPlan {
                hook,
                tier,
                variant,
                rejected: Vec::new(),
            }),
            Err(reason) => Err(PlanError::ForcedUnavailable { hook, tier, reason }),
        };
    }
    let mut rejected = Vec::new();
    for tier in Tier::ALL {
        match pick_variant(caps, knobs, hook, tier) {
            Ok(variant) => {
                return Ok(HookPlan {
                    hook,
                    tier,
                    variant,
                    rejected,
                })
            }
            Err(reason) => rejected.push((tier, reason)),
        }
    }
    Err(PlanError::NoTier {
        hook,
        reasons: rejected,
    })
}

/// Chooses a tier for every requested hook, then the final program set;
/// the first hook that cannot be served fails the whole plan, unless it is
/// optional.
pub fn plan(caps: &Capabilities, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let mut hooks = Vec::new();
    let mut skipped = Vec::new();
    for &hook in &opts.hooks {
        let optional = opts.optional.contains(&hook);
        match plan_hook(caps, &opts.knobs, hook, opts.force) {
            Ok(hp) if optional && hp.via_syscalls() => skipped.push((
                hook,
                format!(
                    "{} would need syscall tracepoints, which slow every syscall",
                    hp.tier
                ),
            )),
            Ok(hp) => hooks.push(hp),
            Err(e) if optional => skipped.push((hook, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    let sendfile_in_send_len = uses_program(&hooks, Hook::Send, SEND_LEN)
        && uses_program(&hooks, Hook::Sendfile, SENDFILE_LEN);
    let mut programs = Vec::new();
    for hp in &hooks {
        for name in hp.programs().iter().filter_map(|p| shaped(p, opts.shape)) {
            if !(sendfile_in_send_len && name == SENDFILE_LEN) {
                programs.push(Program {
                    name,
                    hook: Some(hp.hook),
                    tier: Some(hp.tier),
                });
            }
        }
    }
    programs.extend(psock_programs(caps, &hooks, opts.shape));
    // The tracepoint tier has no tracepoint where a UDP socket ends; a
    // cgroup sock_release program at the cgroup v2 root sees every inet
    // socket's release. Without cgroup v2, snapshot refreshes remove them.
    let send_tier = hooks.iter().find(|h| h.hook == Hook::Send).map(|h| h.tier);
    if opts.udp_flows
        && send_tier == Some(Tier::Tracepoint)
        && caps.check(Requirement::CgroupV2).is_ok()
    {
        programs.push(Program {
            name: UDP_RELEASE,
            hook: Some(Hook::Send),
            tier: None,
        });
    }
    if opts.track_conns {
        // The UDP iterator runs only where UDP is tracked.
        let seeds = if opts.udp_flows {
            &SEED_PROGRAMS[..]
        } else {
            &SEED_PROGRAMS[..1]
        };
        programs.extend(seeds.iter().map(|&name| Program {
            name,
            hook: None,
            tier: None,
        }));
    }
    let sendfile_adds_tx = opts.shape.sendfile_bypasses_sendmsg
        || hooks
            .iter()
            .any(|h| h.hook == Hook::Send && h.via_syscalls());
    Ok(Plan {
        tcp_bytes_from_seq: tcp_bytes_method(&hooks, &opts.knobs),
        sendfile_in_send_len,
        sendfile_adds_tx,
        state_skips_close: opts.knobs.state_close_off(),
        state_skips_start: opts.knobs.state_start_off(),
        udp_sends_skipped: opts.knobs.udp_send_off(),
        conn_hooks_blind: opts.knobs.conn_hooks_off(),
        accel_calls_blind: opts.knobs.accel_calls_off(),
        shape: opts.shape,
        hooks,
        skipped,
        programs,
    })
}

/// Socket iterators that seed connections which existed before start; they
/// need no attach tier (src/session/seed.rs runs them).
pub const SEED_TCP: &str = "sl_seed_tcp";
pub const SEED_UDP: &str = "sl_seed_udp";
pub const SEED_PROGRAMS: [&str; 2] = [SEED_TCP, SEED_UDP];

const SEND_LEN: &str = "sl_tp_send_len";
const SENDFILE_LEN: &str = "sl_tp_sendfile_len";
const UDP_RELEASE: &str = "sl_cg_sock_release";

/// The variant of a program written for this kernel's function signatures;
/// None where this kernel needs no such program: with BTF casts the bind and
/// listen exits read the syscall's arguments from the saved registers, so
/// no syscall entry tracepoint is enabled for them (each one enabled costs
/// every syscall of every task). The `_cast` and `_btf` variants load only
/// where the kernel has BTF casts.
pub fn shaped(program: &'static str, shape: KernelShape) -> Option<&'static str> {
    Some(match program {
        "sl_tp_bind_enter" | "sl_tp_listen_enter" if shape.btf_casts => return None,
        "sl_fx_accept" if shape.accept_has_flags => "sl_fx_accept_old",
        "sl_tp_accept4_exit" if shape.btf_casts => "sl_tp_accept4_exit_btf",
        "sl_tp_accept_exit" if shape.btf_casts => "sl_tp_accept_exit_btf",
        "sl_tp_bind_exit" if shape.btf_casts => "sl_tp_bind_exit_btf",
        "sl_tp_listen_exit" if shape.btf_casts => "sl_tp_listen_exit_btf",
        "sl_tp_set_state" if shape.btf_casts => "sl_tp_set_state_cast",
        "sl_tp_tcp_destroy" if shape.btf_casts => "sl_tp_tcp_destroy_cast",
        "sl_fe_tcp_set_state" if shape.btf_casts => "sl_fe_tcp_set_state_cast",
        "sl_fe_tcp_destroy" if shape.btf_casts => "sl_fe_tcp_destroy_cast",
        "sl_fx_tcp_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_tcp_recvmsg_nb",
        "sl_fx_tcp_bpf_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_tcp_bpf_recvmsg_nb",
        "sl_fx_tcp_bpf_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_tcp_bpf_recvmsg_na",
        "sl_fx_udp_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_udp_recvmsg_nb",
        "sl_fx_udp6_recvmsg" if shape.recvmsg_has_nonblock => "sl_fx_udp6_recvmsg_nb",
        "sl_fx_tcp_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_tcp_recvmsg_na",
        "sl_fx_udp_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_udp_recvmsg_na",
        "sl_fx_udp6_recvmsg" if shape.recvmsg_lacks_addr_len => "sl_fx_udp6_recvmsg_na",
        other => other,
    })
}

/// Every requirement any tier of these hooks has, for the prober.
pub fn requirements(hooks: &[Hook]) -> BTreeSet<Requirement> {
    hooks
        .iter()
        .flat_map(|h| h.tiers())
        .flat_map(|s| s.requires.iter().copied())
        .chain(psock_requirements(hooks, None))
        .collect()
}

/// What the PSOCK_CALLS programs of these hooks need, on `tier` or any.
pub fn psock_requirements(hooks: &[Hook], tier: Option<Tier>) -> Vec<Requirement> {
    let mut out = Vec::new();
    for p in PSOCK_CALLS.iter().filter(|p| hooks.contains(&p.hook)) {
        if tier.is_none_or(|t| t == Tier::Fentry) {
            out.push(Requirement::BtfFunc(p.func));
        }
        if tier.is_none_or(|t| t == Tier::Kprobe) {
            out.push(Requirement::Kprobe(p.func));
        }
    }
    out
}

/// A socket with a psock (sockmap, sockhash) sends and reads through tcp_bpf,
/// which reaches tcp_sendmsg/tcp_recvmsg only for bytes that go through TCP.
/// Where those two carry the fentry or kprobe tier, these see the bytes
/// sk_msg redirects (the tracepoint tier sees every call already).
struct PsockCall {
    hook: Hook,
    func: &'static str,
    fentry: &'static str,
    kprobe: [&'static str; 2],
}

const PSOCK_CALLS: [PsockCall; 2] = [
    PsockCall {
        hook: Hook::Send,
        func: "tcp_bpf_sendmsg",
        fentry: "sl_fx_tcp_bpf_sendmsg",
        kprobe: ["sl_kp_tcp_bpf_sendmsg", "sl_kr_tcp_bpf_sendmsg"],
    },
    PsockCall {
        hook: Hook::Recv,
        func: "tcp_bpf_recvmsg",
        fentry: "sl_fx_tcp_bpf_recvmsg",
        kprobe: ["sl_kp_tcp_bpf_recvmsg", "sl_kr_tcp_bpf_recvmsg"],
    },
];

/// The programs of PSOCK_CALLS these hooks need on this kernel.
fn psock_programs(caps: &Capabilities, hooks: &[HookPlan], shape: KernelShape) -> Vec<Program> {
    let mut out = Vec::new();
    if !tcp_bytes_from_seq(hooks) {
        return out;
    }
    for p in &PSOCK_CALLS {
        let Some(hp) = hooks.iter().find(|h| h.hook == p.hook) else {
            continue;
        };
        let (names, req): (&[&'static str], _) = match hp.tier {
            Tier::Fentry => (
                std::slice::from_ref(&p.fentry),
                Requirement::BtfFunc(p.func),
            ),
            Tier::Kprobe => (&p.kprobe, Requirement::Kprobe(p.func)),
            Tier::Tracepoint => continue,
        };
        if caps.check(req).is_ok() {
            out.extend(
                names
                    .iter()
                    .filter_map(|&n| shaped(n, shape))
                    .map(|name| Program {
                        name,
                        hook: Some(p.hook),
                        tier: Some(hp.tier),
                    }),
            );
        }
    }
    out
}

/// Whether TCP byte counts come from the sockets' own sequence counters
/// (src/bpf/conn.bpf.h) rather than from each send and receive: on every
/// tier, wherever state changes are hooked (the counters are read at close,
/// at destruction and at snapshots). A send or receive run the kernel skips
/// then loses no byte.
pub fn tcp_bytes_from_seq(hooks: &[HookPlan]) -> bool {
    hooks.iter().any(|h| h.hook == Hook::State)
}

/// The TCP byte method these hooks get: the planner's choice, unless the
/// `tcp_seq` knob asks for per-call counting.
pub fn tcp_bytes_method(hooks: &[HookPlan], knobs: &Knobs) -> bool {
    tcp_bytes_from_seq(hooks) && !knobs.tcp_seq_off()
}

/// Whether `hook` is served by the BPF program `prog` in these plans.
pub fn uses_program(hooks: &[HookPlan], hook: Hook, prog: &str) -> bool {
    hooks
        .iter()
        .any(|h| h.hook == hook && h.programs().contains(&prog))
}

/// The kernels of the VM matrix (tests/vm) as the plan sees them: their
/// shapes and capabilities, for unit tests of the final program set.
#[cfg(test)]
pub mod matrix {
    use super::*;

    /// (name, shape, what the kernel lacks) of each kernel.
    pub fn kernels() -> Vec<(&'static str, KernelShape, Vec<Requirement>)> {
        let no_byte_tracepoints = vec![
            Requirement::TpBtf("sock", "sock_send_length"),
            Requirement::TpBtf("sock", "sock_recv_length"),
        ];
        let old = KernelShape {
            recvmsg_has_nonblock: false,
            accept_has_flags: true,
            sendfile_bypasses_sendmsg: true,
            recvmsg_lacks_addr_len: false,
            tracing_cookie_helper: true,
            btf_casts: false,
        };
        let mut lacks_510 = no_byte_tracepoints.clone();
        lacks_510.extend([
            Requirement::BtfFunc("bpf_rdonly_cast"),
            Requirement::BtfFunc("splice_to_socket"),
        ]);
        let current = KernelShape {
            tracing_cookie_helper: true,
            btf_casts: true,
            ..KernelShape::default()
        };
        vec![
            (
                "5.10",
                KernelShape {
                    recvmsg_has_nonblock: true,
                    tracing_cookie_helper: false,
                    ..old
                },
                lacks_510.clone(),
            ),
            ("6.1", old, lacks_510),
            ("6.12", current, Vec::new()),
            (
                "7",
                KernelShape {
                    recvmsg_lacks_addr_len: true,
                    ..current
                },
                Vec::new(),
            ),
        ]
    }

    fn caps(lacks: &[Requirement]) -> Capabilities {
        let mut caps = Capabilities::default();
        for req in requirements(&Hook::ALL) {
            let verdict = if lacks.contains(&req) {
                Err("not in this kernel".to_owned())
            } else {
                Ok(())
            };
            caps.set(req, verdict);
        }
        caps
    }

    /// The plan of `conns`/`top` (every hook, UDP per peer) in every cell:
    /// each kernel with auto and each forced tier.
    pub fn plans() -> Vec<(String, Plan)> {
        let mut out = Vec::new();
        for (kernel, shape, lacks) in kernels() {
            for force in [
                None,
                Some(Tier::Fentry),
                Some(Tier::Kprobe),
                Some(Tier::Tracepoint),
            ] {
                let opts = PlanOptions {
                    hooks: Hook::ALL.to_vec(),
                    force,
                    shape,
                    track_conns: true,
                    udp_flows: true,
                    ..PlanOptions::default()
                };
                let name = format!("{kernel}/{}", force.map_or("auto", Tier::name));
                let plan = plan(&caps(&lacks), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
                out.push((name, plan));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capabilities where exactly the listed tiers work for every hook.
    fn caps_with(working: &[Tier]) -> Capabilities {
        let mut caps = Capabilities::default();
        for req in requirements(&Hook::ALL) {
            let tier = match req {
                Requirement::Fentry(_) => Tier::Fentry,
                Requirement::Kprobe(_) => Tier::Kprobe,
                Requirement::Tracepoint(..)
                | Requirement::TpBtf(..)
                | Requirement::CgroupV2
                | Requirement::BtfFunc(_) => Tier::Tracepoint,
            };
            let verdict = if working.contains(&tier) {
                Ok(())
            } else {
                Err(format!("{tier} broken"))
            };
            caps.set(req, verdict);
        }
        caps
    }

    fn all_hooks(force: Option<Tier>) -> PlanOptions {
        PlanOptions {
            hooks: Hook::ALL.to_vec(),
            force,
            ..PlanOptions::default()
        }
    }

    fn tiers(plan: &Plan) -> Vec<Tier> {
        plan.hooks.iter().map(|h| h.tier).collect()
    }

    #[test]
    fn all_tiers_choose_fentry() {
        let plan = plan(&caps_with(&Tier::ALL), &all_hooks(None)).unwrap();
        assert_eq!(tiers(&plan), [Tier::Fentry; 8]);
        assert!(plan.hooks.iter().all(|h| h.rejected.is_empty()));
    }

    #[test]
    fn no_fentry_chooses_kprobe_and_says_why() {
        let plan = plan(
            &caps_with(&[Tier::Kprobe, Tier::Tracepoint]),
            &all_hooks(None),
        )
        .unwrap();
        assert_eq!(tiers(&plan), [Tier::Kprobe; 8]);
        let bind = &plan.hooks[0];
        assert_eq!(bind.rejected.len(), 1);
        assert_eq!(bind.rejected[0].0, Tier::Fentry);
        assert_eq!(bind.rejected[0].1, "fentry/inet_bind: fentry broken");
    }

    #[test]
    fn neither_chooses_tracepoint() {
        let plan = plan(&caps_with(&[Tier::Tracepoint]), &all_hooks(None)).unwrap();
        assert_eq!(tiers(&plan), [Tier::Tracepoint; 8]);
        let rejected: Vec<Tier> = plan.hooks[1].rejected.iter().map(|r| r.0).collect();
        assert_eq!(rejected, [Tier::Fentry, Tier::Kprobe]);
        let bind_listen = super::plan(
            &caps_with(&[Tier::Tracepoint]),
            &PlanOptions {
                hooks: vec![Hook::Bind, Hook::Listen],
                force: None,
                ..PlanOptions::default()
            },
        )
        .unwrap();
        assert_eq!(
            bind_listen.names().into_iter().collect::<Vec<_>>(),
            [
                "sl_tp_bind_enter",
                "sl_tp_bind_exit",
                "sl_tp_listen_enter",
                "sl_tp_listen_exit"
            ]
        );
    }

    #[test]
    fn none_is_an_error_naming_the_hook() {
        let err = plan(&caps_with(&[]), &all_hooks(None)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("bind: no attach method works"), "{msg}");
        assert!(
            msg.contains("fentry: fentry/inet_bind: fentry broken"),
            "{msg}"
        );
        assert!(
            msg.contains("tracepoint: tracepoint syscalls:sys_enter_bind"),
            "{msg}"
        );
    }

    #[test]
    fn one_missing_requirement_rejects_the_tier() {
        let mut caps = caps_with(&Tier::ALL);
        caps.set(
            Requirement::Fentry("inet6_bind"),
            Err("no BTF function".into()),
        );
        let plan = plan(&caps, &all_hooks(None)).unwrap();
        assert_eq!(
            tiers(&plan)[..3],
            [Tier::Kprobe, Tier::Fentry, Tier::Fentry]
        );
        assert_eq!(
            plan.hooks[0].rejected[0].1,
            "fentry/inet6_bind: no BTF function"
        );
    }

    #[test]
    fn forced_tier_is_used_even_when_a_better_one_works() {
        let plan = plan(&caps_with(&Tier::ALL), &all_hooks(Some(Tier::Tracepoint))).unwrap();
        assert_eq!(tiers(&plan), [Tier::Tracepoint; 8]);
    }

    #[test]
    fn forced_tier_the_kernel_lacks_fails_without_fallback() {
        let err = plan(
            &caps_with(&[Tier::Tracepoint]),
            &all_hooks(Some(Tier::Kprobe)),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PlanError::ForcedUnavailable {
                hook: Hook::Bind,
                tier: Tier::Kprobe,
                reason: "kprobe/inet_bind: kprobe broken".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "bind: forced attach method kprobe is not available: kprobe/inet_bind: kprobe broken"
        );
    }

    #[test]
    fn unprobed_requirement_is_unavailable() {
        let err = plan(&Capabilities::default(), &all_hooks(None)).unwrap_err();
        assert!(err.to_string().contains("not probed"));
    }

    #[test]
    fn only_requested_hooks_are_planned() {
        let opts = PlanOptions {
            hooks: vec![Hook::Listen],
            ..PlanOptions::default()
        };
        let plan = plan(&caps_with(&[Tier::Tracepoint]), &opts).unwrap();
        assert_eq!(plan.hooks.len(), 1);
        assert_eq!(plan.tier_of(Hook::Listen), Some(Tier::Tracepoint));
        assert_eq!(plan.tier_of(Hook::Bind), None);
    }

    #[test]
    fn every_tier_names_programs_and_requirements() {
        for hook in Hook::ALL {
            let mut listed: Vec<Tier> = hook.tiers().iter().map(|s| s.tier).collect();
            assert!(listed.is_sorted(), "{hook} lists tiers best first");
            listed.dedup();
            assert_eq!(listed, Tier::ALL, "{hook} lists every tier");
            for spec in hook.tiers() {
                assert!(!spec.programs.is_empty() && !spec.requires.is_empty());
            }
        }
    }

    #[test]
    fn fentry_and_kprobe_send_and_recv_add_the_tcp_bpf_calls_and_tracepoints_do_not() {
        for (cell, plan) in matrix::plans() {
            let names = plan.names();
            for p in &PSOCK_CALLS {
                let tier = plan.hooks.iter().find(|h| h.hook == p.hook).map(|h| h.tier);
                let has = |n: &str| names.iter().any(|m| m.starts_with(n));
                assert_eq!(has(p.fentry), tier == Some(Tier::Fentry), "{cell}");
                for n in p.kprobe {
                    assert_eq!(has(n), tier == Some(Tier::Kprobe), "{cell}: {n}");
                }
            }
        }
    }

    #[test]
    fn tracepoint_tier_prefers_tp_btf_and_cgroup_then_syscalls() {
        let mut caps = caps_with(&[Tier::Tracepoint]);
        let send = plan_hook(&caps, &Knobs::default(), Hook::Send, None).unwrap();
        assert!(!send.via_syscalls());
        assert!(send.programs().contains(&"sl_cg_udp_send4"));
        // No cgroup v2 (or, before 6.3, no sock_send_length): syscall exits.
        caps.set(Requirement::CgroupV2, Err("no cgroup2 mount".into()));
        let send = plan_hook(&caps, &Knobs::default(), Hook::Send, None).unwrap();
        assert_eq!(send.tier, Tier::Tracepoint);
        assert!(send.via_syscalls());
        assert_eq!(send.how().as_deref(), Some("syscall tracepoints"));
        let sendfile = plan_hook(&caps, &Knobs::default(), Hook::Sendfile, None).unwrap();
        assert!(!sendfile.via_syscalls(), "sendfile needs no cgroup");
        caps.set(
            Requirement::BtfFunc("splice_to_socket"),
            Err("no BTF function".into()),
        );
        assert!(plan_hook(&caps, &Knobs::default(), Hook::Sendfile, None)
            .unwrap()
            .via_syscalls());
    }

    #[test]
    fn byte_tracepoints_need_btf_casts() {
        let mut caps = caps_with(&[Tier::Tracepoint]);
        caps.set(
            Requirement::BtfFunc("bpf_rdonly_cast"),
            Err("no BTF function".into()),
        );
        for hook in [Hook::Send, Hook::Recv, Hook::Sendfile] {
            let p = plan_hook(&caps, &Knobs::default(), hook, None).unwrap();
            assert_eq!(p.tier, Tier::Tracepoint, "{hook}");
            assert!(p.via_syscalls(), "{hook} without bpf_rdonly_cast");
        }
    }

    #[test]
    fn tcp_bytes_come_from_sequence_counters_on_every_tier_with_state_changes() {
        let mut caps = caps_with(&[Tier::Tracepoint]);
        let tp = plan(&caps, &all_hooks(None)).unwrap();
        assert!(tcp_bytes_from_seq(&tp.hooks));
        caps.set(Requirement::CgroupV2, Err("no cgroup2 mount".into()));
        let sys = plan(&caps, &all_hooks(None)).unwrap();
        assert!(tcp_bytes_from_seq(&sys.hooks));
        for other in [Tier::Fentry, Tier::Kprobe] {
            let p = plan(&caps_with(&[other]), &all_hooks(None)).unwrap();
            assert!(tcp_bytes_from_seq(&p.hooks), "{other}");
        }
        let opts = PlanOptions {
            hooks: vec![Hook::Bind, Hook::Send],
            ..PlanOptions::default()
        };
        let no_state = plan(&caps_with(&[Tier::Fentry]), &opts).unwrap();
        assert!(!tcp_bytes_from_seq(&no_state.hooks));
    }

    #[test]
    fn forced_tier_without_any_variant_names_every_reason() {
        let mut caps = caps_with(&[Tier::Tracepoint]);
        caps.set(Requirement::CgroupV2, Err("no cgroup2 mount".into()));
        caps.set(
            Requirement::Tracepoint("syscalls", "sys_enter_write"),
            Err("absent".into()),
        );
        let err =
            plan_hook(&caps, &Knobs::default(), Hook::Send, Some(Tier::Tracepoint)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cgroup v2: no cgroup2 mount"), "{msg}");
        assert!(msg.contains("sys_enter_write: absent"), "{msg}");
    }

    #[test]
    fn optional_hook_is_skipped_rather_than_served_by_syscall_tracepoints() {
        let opts = PlanOptions {
            hooks: vec![Hook::Accept, Hook::Send],
            force: None,
            optional: vec![Hook::Accept],
            ..PlanOptions::default()
        };
        let tp = plan(&caps_with(&[Tier::Tracepoint]), &opts).unwrap();
        assert_eq!(tp.tier_of(Hook::Accept), None);
        assert_eq!(tp.skipped.len(), 1);
        assert_eq!(tp.tier_of(Hook::Send), Some(Tier::Tracepoint));
        let kp = plan(&caps_with(&[Tier::Kprobe, Tier::Tracepoint]), &opts).unwrap();
        assert_eq!(kp.tier_of(Hook::Accept), Some(Tier::Kprobe));
        assert!(kp.skipped.is_empty());
    }

    #[test]
    fn tier_parses_from_its_name() {
        for tier in Tier::ALL {
            assert_eq!(tier.name().parse::<Tier>(), Ok(tier));
        }
        assert!("uprobe".parse::<Tier>().is_err());
    }

    /// With BTF casts no syscall entry program is needed: the exits read
    /// the arguments themselves.
    #[test]
    fn btf_casts_leave_no_syscall_entry_program() {
        let casts = KernelShape {
            btf_casts: true,
            ..KernelShape::default()
        };
        for hook in [Hook::Bind, Hook::Listen] {
            for spec in hook.tiers() {
                let entries: Vec<&str> = spec
                    .programs
                    .iter()
                    .filter_map(|p| shaped(p, casts))
                    .filter(|p| p.ends_with("_enter"))
                    .collect();
                assert!(entries.is_empty(), "{hook}: {entries:?}");
            }
        }
        assert_eq!(
            shaped("sl_tp_bind_enter", KernelShape::default()),
            Some("sl_tp_bind_enter")
        );
    }

    /// The state and destroy hooks of the fentry and tracepoint tiers load
    /// their `_cast` variants exactly where the kernel has BTF casts (the
    /// variants call bpf_rdonly_cast, which older kernels refuse).
    #[test]
    fn state_and_destroy_cast_only_with_btf_casts() {
        let casts = KernelShape {
            btf_casts: true,
            ..KernelShape::default()
        };
        for tier in [Tier::Fentry, Tier::Tracepoint] {
            let spec = Hook::State
                .tiers()
                .iter()
                .find(|s| s.tier == tier)
                .expect("state tier");
            for p in spec.programs {
                assert_eq!(shaped(p, KernelShape::default()), Some(*p));
                let cast = shaped(p, casts).expect("a program");
                assert_eq!(cast, format!("{p}_cast"), "{tier}");
            }
        }
    }

    fn cell(name: &str) -> Plan {
        matrix::plans()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("no cell {name}"))
    }

    /// Every cell of the VM matrix plans, loads the seed iterators, and
    /// names each program once with the hook and tier it serves.
    #[test]
    fn every_matrix_cell_plans_each_program_once() {
        for (name, plan) in matrix::plans() {
            let names = plan.names();
            assert_eq!(names.len(), plan.programs.len(), "{name}: a program twice");
            assert!(
                names.contains(SEED_TCP) && names.contains(SEED_UDP),
                "{name}"
            );
            for p in &plan.programs {
                if let (Some(hook), Some(tier)) = (p.hook, p.tier) {
                    assert_eq!(plan.tier_of(hook), Some(tier), "{name}: {}", p.name);
                }
            }
            let forced = name.rsplit('/').next().unwrap_or_default();
            if let Ok(tier) = forced.parse::<Tier>() {
                assert!(plan.hooks.iter().all(|h| h.tier == tier), "{name}");
            }
        }
    }

    /// The recvmsg and accept variants follow each kernel's signatures.
    #[test]
    fn fentry_variants_follow_each_kernels_signatures() {
        let has = |cell: &str, p: &str| cell_has(cell, p);
        assert!(has("5.10/fentry", "sl_fx_tcp_recvmsg_nb"));
        assert!(has("5.10/fentry", "sl_fx_accept_old"));
        assert!(has("6.1/fentry", "sl_fx_tcp_recvmsg"));
        assert!(has("6.1/fentry", "sl_fx_accept_old"));
        assert!(has("6.12/fentry", "sl_fx_tcp_recvmsg"));
        assert!(has("6.12/fentry", "sl_fx_accept"));
        assert!(has("6.12/fentry", "sl_fe_tcp_set_state_cast"));
        assert!(has("7/fentry", "sl_fx_tcp_recvmsg_na"));
        assert!(has("7/fentry", "sl_fx_udp6_recvmsg_na"));
        assert!(!has("6.1/fentry", "sl_fe_tcp_set_state_cast"));
        assert!(has("6.1/fentry", "sl_fe_tcp_set_state"));
        for kernel in ["5.10", "6.1", "6.12", "7"] {
            assert!(
                has(&format!("{kernel}/auto"), "sl_fx_inet_bind"),
                "{kernel}"
            );
            assert!(
                has(&format!("{kernel}/kprobe"), "sl_kp_tcp_recvmsg"),
                "{kernel}"
            );
        }
    }

    fn cell_has(name: &str, program: &str) -> bool {
        cell(name).names().contains(program)
    }

    /// The tracepoint tier: syscall tracepoints before 6.3; from 6.12 the
    /// byte tracepoints with sendfile merged into the send program, BTF casts
    /// instead of syscall entry programs, and TCP bytes from the sequence
    /// counters. Both end UDP sockets with the cgroup release program.
    #[test]
    fn tracepoint_tier_per_kernel() {
        for kernel in ["5.10", "6.1"] {
            let plan = cell(&format!("{kernel}/tracepoint"));
            let names = plan.names();
            for p in [
                "sl_tp_bind_enter",
                "sl_tp_bind_exit",
                "sl_sys_write_enter",
                "sl_tp_sendfile_enter",
                "sl_tp_set_state",
            ] {
                assert!(names.contains(p), "{kernel}: {p}");
            }
            assert!(names.contains(UDP_RELEASE), "{kernel}");
            assert!(
                plan.tcp_bytes_from_seq && !plan.sendfile_in_send_len,
                "{kernel}"
            );
            assert!(plan.sendfile_adds_tx, "{kernel}");
        }
        for kernel in ["6.12", "7"] {
            let plan = cell(&format!("{kernel}/tracepoint"));
            let names = plan.names();
            for p in [
                SEND_LEN,
                "sl_tp_recv_len",
                UDP_RELEASE,
                "sl_tp_bind_exit_btf",
                "sl_tp_set_state_cast",
            ] {
                assert!(names.contains(p), "{kernel}: {p}");
            }
            assert!(
                !names.contains(SENDFILE_LEN),
                "{kernel}: merged into {SEND_LEN}"
            );
            assert!(
                !names.iter().any(|p| p.ends_with("_enter")),
                "{kernel}: {names:?}"
            );
            assert!(
                plan.tcp_bytes_from_seq && plan.sendfile_in_send_len,
                "{kernel}"
            );
            assert!(!plan.sendfile_adds_tx, "{kernel}");
            let release = plan.programs.iter().find(|p| p.name == UDP_RELEASE);
            assert_eq!(release.and_then(|p| p.hook), Some(Hook::Send), "{kernel}");
        }
    }

    /// The knobs are plan inputs: a disabled byte tracepoint falls back to
    /// syscall tracepoints, `tcp_seq` turns the sequence counters off, and
    /// `state_close` reaches the plan; without UDP flows neither the UDP
    /// iterator nor the release program loads.
    #[test]
    fn knobs_and_options_shape_the_program_set() {
        let (_, shape, _) = matrix::kernels().remove(2);
        let caps = caps_with(&[Tier::Tracepoint]);
        let opts = |knobs: &str, udp_flows| PlanOptions {
            hooks: Hook::ALL.to_vec(),
            knobs: Knobs::parse(knobs),
            shape,
            track_conns: true,
            udp_flows,
            ..PlanOptions::default()
        };
        let p = plan(&caps, &opts("sock_send_length, sock_recv_length", true)).unwrap();
        assert!(p.names().contains("sl_sys_write_enter"));
        assert!(!p.names().contains(SEND_LEN) && p.tcp_bytes_from_seq);
        assert!(p.names().contains(UDP_RELEASE));
        let send = p.hooks.iter().find(|h| h.hook == Hook::Send);
        assert!(send.is_some_and(HookPlan::via_syscalls));
        assert!(!p.udp_sends_skipped);
        let p = plan(
            &caps,
            &opts("tcp_seq,state_close,state_start,udp_send", false),
        )
        .unwrap();
        assert!(p.names().contains(SEND_LEN) && !p.tcp_bytes_from_seq);
        assert!(p.state_skips_close && p.state_skips_start && p.udp_sends_skipped);
        assert!(!p.names().contains(SEED_UDP) && !p.names().contains(UDP_RELEASE));
        let err = plan_hook(
            &caps,
            &Knobs::parse("sock_send_length"),
            Hook::Send,
            Some(Tier::Tracepoint),
        );
        assert!(err.is_ok());
        let k = Knobs::parse("cgroup");
        let why = pick_variant(&caps, &k, Hook::Send, Tier::Tracepoint);
        assert!(why.is_ok());
        assert!(tier_verdict(&caps, &k, &SEND_TIERS[2])
            .is_err_and(|e| e == "cgroup v2: turned off by SOCKLENS_DISABLE"));
    }
}
