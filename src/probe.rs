//! Kernel capability probing: for each requirement of a tier, is it really
//! usable here? Decided by trying (BTF lookup, trial load and attach), never
//! by kernel version.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use libbpf_rs::btf::types::{Func, FuncProto, Typedef};
use libbpf_rs::btf::{Btf, BtfKind, BtfType, ReferencesType, TypeId};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{ErrorKind, MapType};

use crate::plan::{Capabilities, Hook, Requirement};
use crate::skel::{OpenProbeSkel, ProbeSkelBuilder};

/// Short errno-style name for a libbpf error, for one-line reasons.
pub fn errno_name(err: &libbpf_rs::Error) -> String {
    let name = match err.kind() {
        ErrorKind::PermissionDenied => "EPERM",
        ErrorKind::NotFound => "ENOENT",
        ErrorKind::InvalidInput => "EINVAL",
        ErrorKind::Unsupported => "EOPNOTSUPP",
        ErrorKind::AlreadyExists => "EEXIST",
        ErrorKind::OutOfMemory => "ENOMEM",
        ErrorKind::WouldBlock => "EAGAIN",
        _ => return err.to_string(),
    };
    name.to_owned()
}

/// Kernel signature differences the BPF programs branch on (rodata).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelShape {
    pub recvmsg_has_nonblock: bool,
    pub accept_has_flags: bool,
    pub sendfile_bypasses_sendmsg: bool,
    pub recvmsg_lacks_addr_len: bool,
    /// Tracing programs may call bpf_get_socket_cookie (a trial load).
    pub tracing_cookie_helper: bool,
    /// Any program may cast a kernel address to a BTF type (bpf_rdonly_cast,
    /// 6.2+), so the syscall tracepoints can walk the fd table with loads.
    pub btf_casts: bool,
}

pub struct Prober {
    tracefs: PathBuf,
    btf: Option<BtfIndex>,
    kprobe_support: Result<(), String>,
}

/// The kernel functions and typedefs socklens may ask about, by name.
/// libbpf finds a name by walking every type (some 120,000 in a distribution
/// kernel), and the prober asks for about thirty: those walks were most of a
/// start under QEMU TCG. One walk, keeping only the names that can be asked
/// for, replaces them; any other name gets libbpf's walk.
struct BtfIndex {
    btf: Btf<'static>,
    /// Every name that can be asked for, with its type if the kernel has it.
    funcs: HashMap<String, Option<TypeId>>,
    typedefs: HashMap<String, Option<TypeId>>,
}

/// Functions whose signatures `kernel_shape` reads.
const SHAPE_FUNCS: [&str; 4] = [
    "tcp_recvmsg",
    "inet_csk_accept",
    "tcp_sendpage",
    "bpf_rdonly_cast",
];

impl BtfIndex {
    fn new(btf: Btf<'static>) -> Self {
        let mut funcs: HashMap<String, Option<TypeId>> =
            SHAPE_FUNCS.iter().map(|f| (f.to_string(), None)).collect();
        let mut typedefs = HashMap::new();
        for req in crate::plan::requirements(&Hook::ALL) {
            match req {
                Requirement::Fentry(f) | Requirement::BtfFunc(f) => {
                    funcs.insert(f.to_owned(), None);
                }
                Requirement::TpBtf(_, name) => {
                    typedefs.insert(tp_typedef(name), None);
                }
                _ => {}
            }
        }
        for id in 1..btf.len() {
            let Some(ty) = btf.type_by_id::<BtfType<'_>>(TypeId::from(id as u32)) else {
                continue;
            };
            let map = match ty.kind() {
                BtfKind::Func => &mut funcs,
                BtfKind::Typedef => &mut typedefs,
                _ => continue,
            };
            if let Some(slot) = ty.name().and_then(|n| map.get_mut(n.to_str()?)) {
                // The first of a name, as libbpf's own lookup gives.
                slot.get_or_insert(ty.type_id());
            }
        }
        Self {
            btf,
            funcs,
            typedefs,
        }
    }

    fn func(&self, name: &str) -> Option<Func<'_>> {
        match self.funcs.get(name) {
            Some(id) => self.btf.type_by_id((*id)?),
            None => self.btf.type_by_name(name),
        }
    }

    fn has_typedef(&self, name: &str) -> bool {
        match self.typedefs.get(name) {
            Some(id) => id.is_some(),
            None => self.btf.type_by_name::<Typedef<'_>>(name).is_some(),
        }
    }
}

/// The typedef a BTF-typed tracepoint's program needs.
fn tp_typedef(name: &str) -> String {
    format!("btf_trace_{name}")
}

impl Prober {
    pub fn new(tracefs: &Path, btf_path: &Path) -> Self {
        Self {
            tracefs: tracefs.to_owned(),
            btf: Btf::from_path(btf_path).ok().map(BtfIndex::new),
            kprobe_support: kprobe_support(tracefs),
        }
    }

    /// Probes every requirement once.
    pub fn probe<'a>(&self, reqs: impl IntoIterator<Item = &'a Requirement>) -> Capabilities {
        let reqs: Vec<Requirement> = reqs.into_iter().copied().collect();
        let mut caps = Capabilities::default();
        let mut seen = HashMap::new();
        let mut funcs: Vec<&'static str> = Vec::new();
        for req in &reqs {
            if let Requirement::Fentry(func) = *req {
                if !funcs.contains(&func) && self.btf_has_func(func).is_ok() {
                    funcs.push(func);
                }
            }
        }
        for chunk in funcs.chunks(FENTRY_BATCH) {
            if let Some(verdicts) = self.fentry_batch(chunk) {
                seen.extend(
                    verdicts
                        .into_iter()
                        .map(|(func, v)| (Requirement::Fentry(func), v)),
                );
            } else if let Some((&first, rest)) = chunk.split_first() {
                // Where the kernel refuses fentry programs as such (EPERM on
                // load: ftrace hooks locked down), every function shares the
                // first one's reason; no need for a failed load each.
                let verdict = self.fentry(first);
                if verdict
                    .as_ref()
                    .is_err_and(|e| e.starts_with("EPERM on trial load"))
                {
                    seen.extend(
                        rest.iter()
                            .map(|&f| (Requirement::Fentry(f), verdict.clone())),
                    );
                }
                seen.insert(Requirement::Fentry(first), verdict);
            }
        }
        for req in reqs {
            let verdict = seen
                .entry(req)
                .or_insert_with(|| self.probe_one(req))
                .clone();
            caps.set(req, verdict);
        }
        caps
    }

    fn probe_one(&self, req: Requirement) -> Result<(), String> {
        if disabled_by_env(req) {
            return Err(format!("turned off by {DISABLE_ENV}"));
        }
        match req {
            Requirement::Fentry(func) => self.fentry(func),
            Requirement::Kprobe(func) => self.kprobe(func),
            Requirement::Tracepoint(cat, name) => self.tracepoint(cat, name),
            Requirement::TpBtf(cat, name) => self
                .tracepoint(cat, name)
                .and_then(|()| self.btf_has_tp(name)),
            Requirement::CgroupV2 => crate::system::cgroup2_root()
                .map(drop)
                .ok_or_else(|| "no cgroup2 mount in /proc/mounts".to_owned()),
            Requirement::BtfFunc(func) => self.btf_has_func(func),
        }
    }

    /// A BTF-typed tracepoint needs its `btf_trace_<name>` typedef.
    fn btf_has_tp(&self, name: &str) -> Result<(), String> {
        let btf = self.btf.as_ref().ok_or("kernel BTF unreadable")?;
        let typedef = tp_typedef(name);
        match btf.has_typedef(&typedef) {
            true => Ok(()),
            false => Err(format!("no BTF type {typedef}")),
        }
    }

    /// Number of parameters of a kernel function, from BTF.
    fn param_count(&self, func: &str) -> Option<usize> {
        let btf = self.btf.as_ref()?;
        let f = btf.func(func)?;
        let proto = btf
            .btf
            .type_by_id::<FuncProto<'_>>(f.referenced_type_id())?;
        Some(proto.len())
    }

    /// Signatures that changed between kernel releases, so one object fits all.
    pub fn kernel_shape(&self) -> KernelShape {
        KernelShape {
            // 5.19 dropped the `nonblock` parameter (6 -> 5 parameters).
            recvmsg_has_nonblock: self.param_count("tcp_recvmsg") == Some(6),
            // 6.10 folded flags/err/kern into struct proto_accept_arg (4 -> 2).
            accept_has_flags: self.param_count("inet_csk_accept") == Some(4),
            // 6.5 removed tcp_sendpage; before it sendfile bypassed tcp_sendmsg.
            sendfile_bypasses_sendmsg: self.btf_has_func("tcp_sendpage").is_ok(),
            // Newer kernels (Debian's 7.x) also dropped `addr_len` (5 -> 4).
            recvmsg_lacks_addr_len: self.param_count("tcp_recvmsg") == Some(4),
            tracing_cookie_helper: self.tracing_cookie_helper().is_ok(),
            // A kfunc, so in BTF exactly where programs can call it.
            btf_casts: self.btf_has_func("bpf_rdonly_cast").is_ok(),
        }
    }

    /// A trial load of a tp_btf program that calls bpf_get_socket_cookie.
    fn tracing_cookie_helper(&self) -> Result<(), String> {
        let mut storage = MaybeUninit::uninit();
        let open = open_probe(&mut storage, "sl_probe_cookie")?;
        open.load()
            .map(drop)
            .map_err(|e| format!("{} on trial load", errno_name(&e)))
    }

    fn btf_has_func(&self, func: &str) -> Result<(), String> {
        let btf = self.btf.as_ref().ok_or("kernel BTF unreadable")?;
        btf.func(func)
            .map(drop)
            .ok_or_else(|| format!("no BTF function {func}"))
    }

    /// fentry verdicts for several functions from one trial load of copies of
    /// the probe program, then trial attaches. libbpf parses the kernel's BTF
    /// once per load (about 0.4 s under QEMU TCG, 14 functions). An attach and
    /// its detach each rewrite ftrace's call sites (about 0.13 s each under
    /// TCG, 6.1): once one function attached, every other function that
    /// ftrace lists as traceable shares its verdict, since the trampoline
    /// machinery is the kernel's, not the function's. Functions ftrace does
    /// not list, or all of them when its list is unreadable, get their own
    /// trial attach, so that a refusal has its own reason.
    /// None when the batch does not load (e.g. fentry refused): then each
    /// function is probed on its own.
    fn fentry_batch(
        &self,
        funcs: &[&'static str],
    ) -> Option<HashMap<&'static str, Result<(), String>>> {
        let names: Vec<String> = (0..funcs.len())
            .map(|i| format!("sl_probe_fentry_{i}"))
            .collect();
        let mut storage = MaybeUninit::uninit();
        let mut open = ProbeSkelBuilder::default().open(&mut storage).ok()?;
        for mut prog in open.open_object_mut().progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            match names.iter().position(|n| *n == name) {
                Some(i) => prog.set_attach_target(0, Some(funcs[i].to_owned())).ok()?,
                None => prog.set_autoload(false),
            }
        }
        let skel = open.load().ok()?;
        let mut verdicts = HashMap::new();
        let mut traceable: Option<Vec<&str>> = None;
        for (name, func) in names.iter().zip(funcs) {
            if traceable.as_ref().is_some_and(|t| t.contains(func)) {
                verdicts.insert(*func, Ok(()));
                continue;
            }
            let prog = skel
                .object()
                .progs_mut()
                .find(|p| p.name() == name.as_str())?;
            let verdict = prog
                .attach()
                .map(drop)
                .map_err(|e| format!("{} on trial attach", errno_name(&e)));
            if verdict.is_ok() && traceable.is_none() && funcs.len() > 1 {
                traceable = Some(ftrace_listed(&self.tracefs, funcs));
            }
            verdicts.insert(*func, verdict);
        }
        Some(verdicts)
    }

    /// bcc's fentry_can_attach: a BTF function and a trial load + attach.
    fn fentry(&self, func: &str) -> Result<(), String> {
        self.btf_has_func(func)?;
        let mut storage = MaybeUninit::uninit();
        let mut open = open_probe(&mut storage, "sl_probe_fentry")?;
        open.progs
            .sl_probe_fentry
            .set_attach_target(0, Some(func.to_owned()))
            .map_err(|e| format!("retargeting probe: {e}"))?;
        let skel = open
            .load()
            .map_err(|e| format!("{} on trial load", errno_name(&e)))?;
        skel.progs
            .sl_probe_fentry
            .attach()
            .map(drop)
            .map_err(|e| format!("{} on trial attach", errno_name(&e)))
    }

    fn kprobe(&self, func: &str) -> Result<(), String> {
        self.kprobe_support.clone()?;
        let mut storage = MaybeUninit::uninit();
        let open = open_probe(&mut storage, "sl_probe_kprobe")?;
        let skel = open
            .load()
            .map_err(|e| format!("{} on trial load", errno_name(&e)))?;
        skel.progs
            .sl_probe_kprobe
            .attach_kprobe(false, func)
            .map(drop)
            .map_err(|e| format!("{} on trial attach", errno_name(&e)))
    }

    fn tracepoint(&self, cat: &str, name: &str) -> Result<(), String> {
        let id = self.tracefs.join("events").join(cat).join(name).join("id");
        if id.is_file() {
            Ok(())
        } else {
            Err(format!("not in {}", self.tracefs.join("events").display()))
        }
    }
}

/// Test knob: a comma-separated list of BTF tracepoint names (say
/// `sock_send_length`) and `cgroup` to treat as missing (and `tcp_seq` and
/// `state_close`, below), so the suite can run the fallback variants of the tracepoint tier
/// on a kernel that has the better ones (as on kernels before 6.3).
const DISABLE_ENV: &str = "SOCKLENS_DISABLE";

fn disabled_by_env(req: Requirement) -> bool {
    match req {
        Requirement::TpBtf(_, name) => knob_names(name),
        Requirement::CgroupV2 => knob_names("cgroup"),
        _ => false,
    }
}

/// The same knob's `tcp_seq`: count TCP bytes per send and receive even where
/// the sequence counters would serve (bench/bench.py compares the two).
pub fn tcp_seq_disabled() -> bool {
    knob_names("tcp_seq")
}

/// The same knob's `state_close`: the state hook ignores TCP_CLOSE, as when
/// the kernel skips its run, so the suite can check that socket destruction
/// still reports every close exactly.
pub fn state_close_disabled() -> bool {
    knob_names("state_close")
}

/// The same knob's `state_start`: the state hook ignores the start of every
/// connection, as when the kernel skips those runs, so the suite can check
/// that each is still tracked from its first use or active open, exactly.
pub fn state_start_disabled() -> bool {
    knob_names("state_start")
}

fn knob_names(name: &str) -> bool {
    std::env::var(DISABLE_ENV).is_ok_and(|list| list.split(',').any(|k| k.trim() == name))
}

/// Programs in one batched fentry trial load (copies in src/bpf/probe.bpf.c).
const FENTRY_BATCH: usize = 20;

/// Opens the probe object with only the program `keep` to be loaded.
fn open_probe<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    keep: &str,
) -> Result<OpenProbeSkel<'obj>, String> {
    let mut open = ProbeSkelBuilder::default()
        .open(storage)
        .map_err(|e| format!("opening probe object: {e}"))?;
    for mut prog in open.open_object_mut().progs_mut() {
        let wanted = prog.name() == keep;
        prog.set_autoload(wanted);
    }
    Ok(open)
}

/// Which of `funcs` ftrace lists as traceable (tracefs'
/// available_filter_functions; lines are `name` or `name [module]`). Empty
/// when the list is unreadable (lockdown, no tracefs): nothing is vouched for.
fn ftrace_listed<'a>(tracefs: &Path, funcs: &[&'a str]) -> Vec<&'a str> {
    let Ok(file) = std::fs::File::open(tracefs.join("available_filter_functions")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(&f) = funcs.iter().find(|&&f| f == name) {
            if !found.contains(&f) {
                found.push(f);
                if found.len() == funcs.len() {
                    break;
                }
            }
        }
    }
    found
}

/// Kprobes need either the kprobe PMU (perf_event_open) or tracefs'
/// kprobe_events (legacy); CONFIG_KPROBES=n kernels have neither.
fn kprobe_support(tracefs: &Path) -> Result<(), String> {
    let pmu = Path::new("/sys/bus/event_source/devices/kprobe/type");
    if pmu.exists() || tracefs.join("kprobe_events").exists() {
        Ok(())
    } else {
        Err("kernel has no kprobe support (no kprobe PMU, no kprobe_events)".into())
    }
}

pub fn ringbuf_supported() -> bool {
    MapType::RingBuf.is_supported().unwrap_or(false)
}

/// Whether kprobes exist at all, for `doctor`.
pub fn kprobes_status(tracefs: &Path) -> Result<(), String> {
    kprobe_support(tracefs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btf_index_agrees_with_a_walk_of_the_kernels_btf() {
        let load = || Btf::from_path(crate::system::DEFAULT_BTF).expect("kernel BTF");
        let index = BtfIndex::new(load());
        let btf = load();
        assert!(index.funcs.len() > 10 && index.typedefs.len() > 3);
        let first_func = |name: &str| {
            btf.type_by_kind::<Func<'_>>()
                .find(|f| f.name().is_some_and(|n| n == name))
                .map(|f| f.type_id())
        };
        let typedef_exists = |name: &str| {
            btf.type_by_kind::<Typedef<'_>>()
                .any(|t| t.name().is_some_and(|n| n == name))
        };
        for name in index.funcs.keys() {
            assert_eq!(
                index.func(name).map(|f| f.type_id()),
                first_func(name),
                "{name}"
            );
        }
        for name in index.typedefs.keys() {
            assert_eq!(index.has_typedef(name), typedef_exists(name), "{name}");
        }
        // In every kernel socklens supports; names outside the index resolve
        // through libbpf's own walk.
        assert!(index.func("tcp_set_state").is_some());
        assert!(index.has_typedef("btf_trace_inet_sock_set_state"));
        assert!(index.func("tcp_close").is_some());
        assert!(index.func("no_such_function_socklens").is_none());
    }
}
