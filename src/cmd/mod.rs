//! The commands: the command line (clap) and one thin function per command
//! over the library's layers.

pub mod conns;
pub mod doctor;
pub mod top;
pub mod trace;

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::attach::loader::BufferKind;
use crate::attach::plan::{Knobs, Tier};
use crate::error::{Context, Error};
use crate::host::system::DEFAULT_BTF;
use crate::model::Losses;
use crate::session::cgobserve::CgHook;
use crate::session::{TraceEvent, TraceRequest, DEFAULT_MAX_CONNS};
/// See every socket on this host, as it happens.
#[derive(Debug, Parser)]
#[command(name = "socklens", version, about)]
pub struct Cli {
    /// Show libbpf's own log (verifier output, warnings) on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// BTF describing the running kernel, for CO-RE relocation.
    #[arg(long, global = true, value_name = "FILE", default_value = DEFAULT_BTF)]
    btf: PathBuf,
    #[command(subcommand)]
    command: Command,
    /// Test knobs: not an option, the environment's `SOCKLENS_DISABLE`
    /// (main reads it once).
    #[arg(skip)]
    pub knobs: Knobs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace socket events as they happen (like bindsnoop and solisten).
    #[command(after_help = "Examples:\n  \
        socklens trace --events established,accept,close   TCP connections, like tcplife\n  \
        socklens trace --events bind,listen,connect --json --comm nginx")]
    Trace(TraceArgs),
    /// Snapshot of tracked connections and UDP flows with their counters (like `ss -tunp`).
    #[command(after_help = "Examples:\n  \
        socklens conns --duration 5         count for 5 s, then list every connection\n  \
        socklens conns --json -4 --pid 1234")]
    Conns(ConnsArgs),
    /// Live table of per-interval rates by connection, process or cgroup (like tcptop).
    #[command(after_help = "Examples:\n  \
        socklens top --by process --sort tx\n  \
        socklens top --once --interval 3 --json")]
    Top(TopArgs),
    /// Show what this kernel offers and how each hook attaches, and why.
    #[command(after_help = "Examples:\n  \
        socklens doctor\n  \
        socklens doctor --attach kprobe     why the kprobe tier would or would not work")]
    Doctor {
        #[command(flatten)]
        attach: AttachArg,
    },
    /// Per-cgroup socket policy (allow / deny / audit), enforced in the kernel.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        socklens policy check policy.toml\n  \
        socklens policy apply policy.toml --follow"
    )]
    Policy(PolicyCommand),
    /// Detach and unpin everything socklens ever pinned (policy included).
    #[command(after_help = "Example:\n  \
        socklens down       every call is allowed again; nothing stays attached")]
    Down,
    /// Run as a daemon: tracing and the configured policy, served as
    /// Prometheus metrics (SIGHUP reloads the config, SIGTERM stops).
    #[command(after_help = "Examples:\n  \
        socklens agent                       defaults: metrics on 127.0.0.1:9464\n  \
        socklens agent --config /etc/socklens/agent.toml")]
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// The agent's config (TOML); without this option, a missing default file means defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    attach: AttachArg,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file without applying it.
    #[command(
        after_help = "Example:\n  socklens policy check policy.toml; echo $?   0 valid, 2 not"
    )]
    Check {
        /// The policy (TOML).
        file: PathBuf,
    },
    /// Validate a policy file and make it the policy in force, in one step.
    /// It stays in force (pinned) after this command exits.
    #[command(after_help = "Examples:\n  \
        socklens policy apply policy.toml\n  \
        socklens policy apply policy.toml --follow --json   then print its verdicts")]
    Apply {
        /// The policy (TOML).
        file: PathBuf,
        /// Then print policy_deny / policy_audit events until stopped.
        #[arg(long)]
        follow: bool,
        /// With --follow: one JSON object per line.
        #[arg(long, requires = "follow")]
        json: bool,
    },
    /// Show the policy in force, with per-rule counters.
    #[command(after_help = "Examples:\n  socklens policy show\n  socklens policy show --json")]
    Show {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Detach and unpin the policy: every call is allowed again.
    #[command(after_help = "Example:\n  socklens policy remove")]
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EventName {
    Bind,
    Listen,
    /// An outgoing TCP connection got established (connection tracking).
    Established,
    /// accept() returned a connection (connection tracking).
    Accept,
    /// A tracked TCP connection closed: the whole record, like tcplife.
    Close,
    /// A TCP retransmission, like tcpretrans.
    Retransmit,
    /// cgroup hook: socket creation (family, type, protocol).
    #[value(name = "sock_create")]
    SockCreate,
    /// cgroup hook: TCP and UDP connect, with the destination.
    Connect,
    /// cgroup hook: UDP sendmsg destinations of unconnected sockets.
    Sendmsg,
    /// cgroup hook: UDP recvmsg sources of unconnected sockets.
    Recvmsg,
    /// cgroup hook: getsockopt level and optname.
    Getsockopt,
    /// cgroup hook: getpeername.
    Getpeername,
    /// cgroup hook: socket release, with the socket's lifetime.
    #[value(name = "sock_release")]
    SockRelease,
    /// policy_deny and policy_audit events of the applied policy.
    Policy,
    /// Each translation of the applied policy: socket cookie, the service
    /// (or redirected) address asked for and where the kernel sent it.
    Translate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AttachChoice {
    /// The best tier the kernel supports, per hook.
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BufferChoice {
    Auto,
    Ring,
    Perf,
}

#[derive(Debug, Args)]
struct AttachArg {
    /// Attach method for every tracing hook; a forced one the kernel lacks is an error.
    #[arg(long, value_enum, default_value_t = AttachChoice::Auto)]
    attach: AttachChoice,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// Events to trace, comma-separated [default: bind,listen].
    #[arg(long, value_enum, value_delimiter = ',')]
    events: Vec<EventName>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
struct ConnsArgs {
    /// Seconds to count for before printing the snapshot.
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
    duration: f64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SortChoice {
    Rx,
    Tx,
    Retrans,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ByChoice {
    Conn,
    Process,
    Cgroup,
}

#[derive(Debug, Args)]
struct TopArgs {
    /// Seconds per refresh; rates are per interval.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    interval: f64,
    /// Column the rows are sorted by, largest first.
    #[arg(long, value_enum, default_value_t = SortChoice::Rx)]
    sort: SortChoice,
    /// What one row stands for.
    #[arg(long, value_enum, default_value_t = ByChoice::Conn)]
    by: ByChoice,
    /// Show one interval as plain text (or JSON with --json) and exit.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    common: CommonArgs,
}

impl TopArgs {
    fn options(&self) -> top::TopOptions {
        use crate::accounting::{GroupBy, SortKey};
        top::TopOptions {
            interval: std::time::Duration::from_secs_f64(self.interval),
            sort: match self.sort {
                SortChoice::Rx => SortKey::Rx,
                SortChoice::Tx => SortKey::Tx,
                SortChoice::Retrans => SortKey::Retrans,
            },
            by: match self.by {
                ByChoice::Conn => GroupBy::Conn,
                ByChoice::Process => GroupBy::Process,
                ByChoice::Cgroup => GroupBy::Cgroup,
            },
            once: self.once,
        }
    }
}

/// A refresh interval: each one snapshots every tracked connection, so
/// shorter than 0.1 s would spend the time reading maps.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0.1 to 86400"
        )),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds from 0 to 86400")),
    }
}

/// Filters and knobs shared by the commands that load tracing programs.
#[derive(Debug, Args)]
struct CommonArgs {
    /// Only this process (thread group id).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..))]
    pid: Option<u32>,
    /// Only tasks with this command name.
    #[arg(long)]
    comm: Option<String>,
    /// Only tasks in this cgroup v2 (path under the cgroup v2 root) or below it.
    #[arg(long)]
    cgroup: Option<String>,
    /// Only sockets in the network namespace with this inode.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    netns: Option<u32>,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    ipv6: bool,
    /// One JSON object per line instead of columns.
    #[arg(long)]
    json: bool,
    /// Columns: full IPv6 addresses, and rows not cut at the terminal's edge.
    #[arg(short, long)]
    wide: bool,
    #[command(flatten)]
    attach: AttachArg,
    /// Event buffer: ring buffer, or the perf buffer fallback.
    #[arg(long, value_enum, default_value_t = BufferChoice::Auto, hide = true)]
    buffer: BufferChoice,
    /// Most connections (and UDP flows) tracked at once; more are counted as untracked.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNS, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_conns: u32,
}

impl AttachArg {
    fn forced(&self) -> Option<Tier> {
        match self.attach {
            AttachChoice::Auto => None,
            AttachChoice::Fentry => Some(Tier::Fentry),
            AttachChoice::Kprobe => Some(Tier::Kprobe),
            AttachChoice::Tracepoint => Some(Tier::Tracepoint),
        }
    }
}

impl CommonArgs {
    fn request(
        &self,
        events: Vec<TraceEvent>,
        cg_hooks: Vec<CgHook>,
        policy_events: bool,
        btf: PathBuf,
    ) -> TraceRequest {
        let family = match (self.ipv4, self.ipv6) {
            (true, _) => Some(libc::AF_INET as u16),
            (_, true) => Some(libc::AF_INET6 as u16),
            _ => None,
        };
        TraceRequest {
            events,
            cg_hooks,
            policy_events,
            translate_events: false,
            pid: self.pid,
            comm: self.comm.clone(),
            cgroup: self.cgroup.clone(),
            netns: self.netns,
            family,
            json: self.json,
            wide: self.wide,
            events_defaulted: false,
            force: self.attach.forced(),
            buffer: match self.buffer {
                BufferChoice::Auto => None,
                BufferChoice::Ring => Some(BufferKind::Ring),
                BufferChoice::Perf => Some(BufferKind::Perf),
            },
            btf,
            max_conns: self.max_conns,
            conn_events: true,
            udp_flows: false,
            knobs: Knobs::default(),
        }
    }
}

impl TraceArgs {
    fn request(&self, btf: PathBuf) -> TraceRequest {
        let mut events: Vec<TraceEvent> = Vec::new();
        let mut cg_hooks: Vec<CgHook> = Vec::new();
        let mut policy_events = false;
        let mut translate_events = false;
        let names = if self.events.is_empty() {
            &[EventName::Bind, EventName::Listen][..]
        } else {
            &self.events[..]
        };
        for e in names {
            match e {
                EventName::Bind => events.push(TraceEvent::Bind),
                EventName::Listen => events.push(TraceEvent::Listen),
                EventName::Established => events.push(TraceEvent::Established),
                EventName::Accept => events.push(TraceEvent::Accept),
                EventName::Close => events.push(TraceEvent::Close),
                EventName::Retransmit => events.push(TraceEvent::Retransmit),
                EventName::SockCreate => cg_hooks.push(CgHook::SockCreate),
                EventName::Connect => cg_hooks.push(CgHook::Connect),
                EventName::Sendmsg => cg_hooks.push(CgHook::Sendmsg),
                EventName::Recvmsg => cg_hooks.push(CgHook::Recvmsg),
                EventName::Getsockopt => cg_hooks.push(CgHook::Getsockopt),
                EventName::Getpeername => cg_hooks.push(CgHook::Getpeername),
                EventName::SockRelease => cg_hooks.push(CgHook::SockRelease),
                EventName::Policy => policy_events = true,
                EventName::Translate => translate_events = true,
            }
        }
        events.sort();
        events.dedup();
        cg_hooks.sort();
        cg_hooks.dedup();
        let mut req = self.common.request(events, cg_hooks, policy_events, btf);
        req.events_defaulted = self.events.is_empty();
        req.translate_events = translate_events;
        req
    }
}

fn report_losses(events: u64, l: &Losses) {
    eprintln!(
        "socklens: {events} events, {} lost, {} malformed, {} untracked connections, {} untracked UDP flows, {} missed hook runs",
        l.lost, l.malformed, l.untracked, l.udp_untracked, l.missed
    );
}

/// Runs the command `cli` names.
pub fn run(cli: &Cli) -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).ctx("installing signal handlers")?;
    }
    let mut stdout = io::stdout().lock();
    match &cli.command {
        Command::Trace(args) => {
            // Block-buffered: stdout is line-buffered, a write(2) per event;
            // the event loop flushes after each batch it drains.
            let mut out = io::BufWriter::with_capacity(1 << 16, stdout);
            let mut req = args.request(cli.btf.clone());
            req.knobs = cli.knobs.clone();
            let summary = trace::run(&req, &stop, &mut out)?;
            report_losses(summary.events, &summary.losses);
            Ok(())
        }
        Command::Conns(args) => {
            let duration = std::time::Duration::from_secs_f64(args.duration);
            let mut req = args.common.request(
                crate::session::snapshot::snapshot_events(),
                Vec::new(),
                false,
                cli.btf.clone(),
            );
            req.knobs = cli.knobs.clone();
            req.conn_events = false; // a snapshot reads the maps only
            req.udp_flows = true;
            let mut out = io::BufWriter::with_capacity(1 << 16, stdout);
            let losses = conns::run(&req, duration, &stop, &mut out)?;
            out.flush().ctx("writing to stdout")?;
            report_losses(0, &losses);
            Ok(())
        }
        Command::Top(args) => {
            let mut req = args.common.request(
                crate::session::snapshot::snapshot_events(),
                Vec::new(),
                false,
                cli.btf.clone(),
            );
            req.udp_flows = true;
            req.knobs = cli.knobs.clone();
            let losses = top::run(&req, &args.options(), &stop, &mut stdout)?;
            report_losses(0, &losses);
            Ok(())
        }
        Command::Doctor { attach } => {
            doctor::run(&cli.btf, attach.forced(), &cli.knobs, &mut stdout)
        }
        Command::Policy(cmd) => run_policy(cmd, &stop, &mut stdout),
        Command::Down => crate::policy::down(&mut stdout),
        Command::Agent(args) => {
            drop(stdout); // the event log may write to stdout from here
            let hup = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
                .ctx("installing signal handlers")?;
            let agent_args = crate::agent::AgentArgs {
                explicit: args.config.is_some(),
                config: args
                    .config
                    .clone()
                    .unwrap_or_else(|| crate::agent::config::DEFAULT_PATH.into()),
                btf: cli.btf.clone(),
                force: args.attach.forced(),
                knobs: cli.knobs.clone(),
            };
            crate::agent::run(&agent_args, &stop, &hup)
        }
    }
}

fn run_policy(
    cmd: &PolicyCommand,
    stop: &AtomicBool,
    out: &mut dyn io::Write,
) -> Result<(), Error> {
    use crate::policy;
    match cmd {
        PolicyCommand::Check { file } => policy::check(file, out).map(|_| ()),
        PolicyCommand::Apply { file, follow, json } => {
            policy::apply(file, out)?;
            if *follow {
                let n = policy::follow(*json, stop, out)?;
                eprintln!("socklens: {n} policy events");
            }
            Ok(())
        }
        PolicyCommand::Show { json } => policy::show(*json, out),
        PolicyCommand::Remove => policy::remove(out),
    }
}
