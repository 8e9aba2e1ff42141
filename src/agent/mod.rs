//! `socklens agent`: tracing and policy as a daemon, exported as Prometheus
//! metrics, with an optional JSON-lines event log.
//!
//! Byte, sendfile and retransmit counters come from the kernel's
//! per-connection counters: each interval adds what a connection's counters
//! grew by since the last read, and a connection that closed adds its final
//! figures (from the close event) minus the same baseline, so every byte is
//! counted once (src/accounting.rs, shared with `top`). Connection
//! opened/closed/failed counts, binds, listeners and policy verdicts come
//! from events.

pub mod config;
pub mod http;
pub mod metrics;
pub mod web;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accounting::Accountant;
use crate::attach::plan::{Knobs, Plan, Tier};
use crate::error::{Context, Result};
use crate::model::cg::op_name;
use crate::model::Losses;
use crate::model::{Conn, ConnEventKind, Event, SockEventKind};
use crate::policy::{self, file as policy_file};
use crate::session::snapshot::{settled_snapshot, snapshot};
use crate::session::{with_session, Live, TraceEvent, TraceRequest, POLL};
use crate::skel::policy::types::slp_event_kind;

use config::{Config, EventLog};
use metrics::{LabelRules, Labels, Metrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

const TCP_LISTEN: u8 = 10;
/// Map reads a listen()'s backlog is kept for while its socket is not in the map.
const LISTENER_READS_KEPT: u8 = 3;
const IPPROTO_TCP: u16 = libc::IPPROTO_TCP as u16;
const IPPROTO_UDP: u16 = libc::IPPROTO_UDP as u16;

/// What the command line gives the agent.
#[derive(Debug, Clone)]
pub struct AgentArgs {
    pub config: PathBuf,
    /// `--config` was given: a missing file is an error, not the defaults.
    pub explicit: bool,
    pub btf: PathBuf,
    pub force: Option<Tier>,
    pub knobs: Knobs,
}

/// Validates the policy file the config names, before anything is changed.
fn load_policy(config: &Config) -> Result<Option<policy::Policy>> {
    let Some(path) = &config.policy else {
        return Ok(None);
    };
    let root = policy_file::cgroup_root()?;
    Ok(Some(policy::load(path, &root)?))
}

fn apply_policy(p: &policy::Policy) -> Result<String> {
    let root = policy_file::cgroup_root()?;
    let done = policy::state::apply(p, &root)?;
    Ok(format!(
        "applied {}: {} scopes, {} rules; generation {}",
        p.file, done.scopes, done.rules, done.gen
    ))
}

fn request(config: &Config, args: &AgentArgs, policy_events: bool) -> TraceRequest {
    TraceRequest {
        events: vec![
            TraceEvent::Bind,
            TraceEvent::Listen,
            TraceEvent::Established,
            TraceEvent::Accept,
            TraceEvent::Close,
            TraceEvent::Retransmit,
        ],
        cg_hooks: Vec::new(),
        policy_events,
        translate_events: false,
        pid: None,
        comm: None,
        cgroup: config.cgroup.as_ref().map(|(c, _)| c.clone()),
        netns: None,
        family: None,
        json: true,
        wide: false,
        events_defaulted: false,
        force: args.force,
        buffer: None,
        btf: args.btf.clone(),
        max_conns: config.max_conns,
        conn_events: true,
        udp_flows: true,
        knobs: args.knobs.clone(),
    }
}

/// Tells systemd (Type=notify) the agent is ready; nothing without systemd.
fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    // Best effort: readiness is also visible on /healthz.
    let _ = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(b"READY=1", &a))
        }
        None => sock.send_to(b"READY=1", Path::new(&target)),
    };
}

/// The warning for a metrics endpoint reachable from other hosts unprotected.
fn exposure_warning(config: &Config) -> Option<String> {
    let ip = config.listen.ip();
    let open = !ip.is_loopback() && (config.web.tls.is_none() || config.web.users.is_empty());
    open.then(|| {
        let missing = match (config.web.tls.is_none(), config.web.users.is_empty()) {
            (true, true) => "without TLS or basic auth",
            (true, false) => "without TLS (passwords travel in clear)",
            _ => "without basic auth",
        };
        format!(
            "metrics on {} {missing}: set tls_server_config and basic_auth_users in the config",
            config.listen
        )
    })
}

fn open_log(target: Option<&EventLog>, group: Option<u32>) -> Result<Option<Box<dyn Write>>> {
    Ok(match target {
        None => None,
        Some(EventLog::Stdout) => Some(Box::new(io::stdout())),
        Some(EventLog::File(path)) => {
            let f = crate::host::trust::open_private_append(path, group)
                .ctx(format!("opening event log {}", path.display()))?;
            Some(Box::new(io::BufWriter::new(f)))
        }
    })
}

/// `socklens agent`: runs until `stop`; `hup` asks for a reload.
pub fn run(args: &AgentArgs, stop: &AtomicBool, hup: &AtomicBool) -> Result<()> {
    let config = config::load(&args.config, args.explicit)?;
    config.check_cgroup()?;
    let policy = load_policy(&config)?;
    let log = open_log(config.event_log.as_ref(), config.event_log_group)?;
    crate::host::system::check_privileges()?;
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(http::Shared {
        metrics: Arc::clone(&metrics),
        ready: AtomicBool::new(false),
    });
    let addr = http::serve(config.listen, Arc::clone(&shared), &config.web)?;
    if let Some(warning) = exposure_warning(&config) {
        eprintln!("socklens: warning: {warning}");
    }
    if let Some(p) = &policy {
        eprintln!("socklens: {}", apply_policy(p)?);
    }
    let req = request(&config, args, policy.is_some());
    with_session(&req, |live| {
        let mut agent = Agent::new(config, args.clone(), metrics, log, policy.is_some());
        agent.export_plan(live.plan);
        agent.acct = Accountant::new(&snapshot(live.session).0);
        let kept = crate::host::caps::keep_only(&crate::host::caps::AGENT_KEEPS)?;
        eprintln!(
            "socklens: programs attached; capabilities kept: {}; all others dropped",
            kept.join(", ")
        );
        shared.ready.store(true, Ordering::Relaxed);
        notify_ready();
        eprintln!("socklens: agent ready: metrics on http://{addr}/metrics, readiness on /healthz");
        agent.run(live, stop, hup)
    })
}

/// The agent loop's state.
struct Agent {
    config: Config,
    args: AgentArgs,
    metrics: Arc<Metrics>,
    rules: LabelRules,
    acct: Accountant,
    log: Option<Box<dyn Write>>,
    /// Effective backlog of listen() calls seen, by (netns, address, port),
    /// with the number of map reads since that listener was last in the map.
    backlogs: HashMap<(u32, IpAddr, u16), (u32, u8)>,
    /// Listener series exported now, to remove those that went away.
    listening: HashSet<Labels>,
    losses: Losses,
    policy_events: bool,
    /// Service and redirect counters as last read, with their generation:
    /// the kernel's restart at each apply, the exported ones only grow.
    counters_seen: HashMap<Labels, (u32, u64)>,
}

fn rules_of(config: &Config) -> LabelRules {
    LabelRules {
        remote_ports: config.remote_ports.clone(),
        remote_address: config.remote_address_label,
    }
}

fn label(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_owned(), v.into())
}

fn cgroup_path(live: &mut Live<'_>, id: u64) -> String {
    live.renderer
        .cgroups
        .as_mut()
        .and_then(|c| c.path_of(id))
        .unwrap_or_default()
}

impl Agent {
    fn new(
        config: Config,
        args: AgentArgs,
        metrics: Arc<Metrics>,
        log: Option<Box<dyn Write>>,
        policy_events: bool,
    ) -> Self {
        Self {
            rules: rules_of(&config),
            config,
            args,
            metrics,
            acct: Accountant::default(),
            log,
            backlogs: HashMap::new(),
            listening: HashSet::new(),
            losses: Losses::default(),
            policy_events,
            counters_seen: HashMap::new(),
        }
    }

    fn export_plan(&self, plan: &Plan) {
        for h in &plan.hooks {
            self.metrics
                .hook_attach
                .get_or_create(&vec![
                    label("hook", h.hook.name()),
                    label("method", h.tier.to_string()),
                ])
                .set(1);
        }
    }

    fn run(&mut self, live: &mut Live<'_>, stop: &AtomicBool, hup: &AtomicBool) -> Result<()> {
        let mut started = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let timeout = if stopping {
                Duration::ZERO
            } else {
                self.config
                    .interval
                    .saturating_sub(started.elapsed())
                    .min(POLL)
            };
            self.drain(live, timeout)?;
            if hup.swap(false, Ordering::Relaxed) {
                self.reload();
            }
            if stopping || started.elapsed() >= self.config.interval {
                started = Instant::now();
                self.tick(live)?;
            }
            if stopping {
                return Ok(());
            }
        }
    }

    fn drain(&mut self, live: &mut Live<'_>, timeout: Duration) -> Result<()> {
        for event in live.stream.poll(timeout)? {
            self.on_event(live, event);
        }
        if let Some(log) = &mut self.log {
            if let Err(e) = log.flush() {
                eprintln!("socklens: event log: {e}; no more events are logged");
                self.log = None;
            }
        }
        Ok(())
    }

    fn write_log(&mut self, live: &mut Live<'_>, event: &Event) {
        if let Some(log) = &mut self.log {
            let line = live.renderer.render(event);
            if let Err(e) = writeln!(log, "{line}") {
                eprintln!("socklens: event log: {e}; no more events are logged");
                self.log = None;
            }
        }
    }

    fn on_event(&mut self, live: &mut Live<'_>, mut event: Event) {
        if let Event::Conn(c) = &mut event {
            live.settle(&mut c.conn);
        }
        self.write_log(live, &event);
        match event {
            Event::Sock(s) => {
                let cgroup = cgroup_path(live, s.cgroup_id);
                match s.kind {
                    SockEventKind::Bind => {
                        let result = if s.ret == 0 {
                            "ok".to_owned()
                        } else {
                            crate::model::errno_name(s.ret)
                        };
                        self.metrics
                            .binds
                            .get_or_create(&vec![
                                label("cgroup", cgroup),
                                label("comm", s.comm),
                                label("family", crate::model::family_name(s.family)),
                                label("proto", crate::model::proto_name(s.proto)),
                                label("result", result),
                            ])
                            .inc();
                    }
                    SockEventKind::Listen if s.ret == 0 => {
                        self.backlogs
                            .insert((s.netns, s.addr, s.port), (s.backlog, 0));
                    }
                    SockEventKind::Listen => {}
                }
            }
            Event::Conn(e) => {
                let c = e.conn;
                if c.proto != IPPROTO_TCP {
                    return;
                }
                let cgroup = cgroup_path(live, c.cgroup_id);
                let labels = self.rules.conn(&c, &cgroup, None);
                match e.kind {
                    ConnEventKind::Established | ConnEventKind::Accept => {
                        self.metrics.opened.get_or_create(&labels).inc();
                    }
                    ConnEventKind::Close => {
                        match c.failure() {
                            Some(reason) => {
                                let mut l = labels;
                                l.push(label("reason", reason));
                                self.metrics.failed.get_or_create(&l).inc();
                            }
                            None => {
                                self.metrics.closed.get_or_create(&labels).inc();
                                if c.established {
                                    self.metrics
                                        .rtt
                                        .get_or_create(&labels)
                                        .observe(f64::from(c.srtt_us) / 1e6);
                                }
                            }
                        }
                        self.acct.on_close(c);
                    }
                    ConnEventKind::Retransmit => {}
                }
            }
            Event::Cg(v) => {
                let family = match slp_event_kind(v.kind) {
                    slp_event_kind::SLP_EV_POLICY_DENY => &self.metrics.policy_denials,
                    slp_event_kind::SLP_EV_POLICY_AUDIT => &self.metrics.policy_audits,
                    _ => return,
                };
                let cgroup = cgroup_path(live, v.cgroup_id);
                family
                    .get_or_create(&vec![
                        label("rule", v.rule_id.to_string()),
                        label("op", op_name(v.op)),
                        label("cgroup", cgroup),
                    ])
                    .inc();
            }
        }
    }

    /// Reads the maps: counters grow by what connections moved since the
    /// last read (and closed connections' final figures).
    fn tick(&mut self, live: &mut Live<'_>) -> Result<()> {
        let (conns, flows) = settled_snapshot(live);
        // Closes queued before the snapshot belong to this interval.
        self.drain(live, Duration::ZERO)?;
        for a in self.acct.tick(&conns, &flows) {
            // UDP bytes are counted per peer (flows), not per socket.
            if a.peer.is_none() && a.conn.proto == IPPROTO_UDP {
                continue;
            }
            let cgroup = cgroup_path(live, a.conn.cgroup_id);
            let labels = self.rules.conn(&a.conn, &cgroup, a.peer);
            let m = &self.metrics;
            inc(&m.sent_bytes, &labels, a.delta.tx);
            inc(&m.received_bytes, &labels, a.delta.rx);
            inc(&m.sendfile_bytes, &labels, a.delta.sendfile);
            inc(&m.retransmits, &labels, a.delta.retrans);
        }
        self.export_listeners(&conns);
        // A reload cannot change the capacity the maps were loaded with.
        let max = f64::from(self.config.max_conns);
        let m = &self.metrics;
        m.map_fill
            .get_or_create(&vec![label("map", "conns")])
            .set(conns.len() as f64 / max);
        m.map_fill
            .get_or_create(&vec![label("map", "udp_flows")])
            .set(flows.len() as f64 / max);
        self.export_losses(live.stream.losses());
        self.export_steering();
        Ok(())
    }

    /// Picks per service and backend, failed picks, and connections sent to
    /// each redirect's proxy, from the pinned policy's counters. A counter of
    /// a generation read before adds what it grew by; one of a new generation
    /// (an apply since) all it holds.
    fn export_steering(&mut self) {
        // No policy: nothing to export. A read that fails now (a policy
        // removed meanwhile) is retried next interval.
        let Ok(Some(now)) = crate::policy::steering_in_force() else {
            return;
        };
        let gen = now.gen;
        let mut seen = HashMap::new();
        let mut feed = |family: &Family<Labels, Counter>, l: Labels, count: u64| {
            let delta = match self.counters_seen.get(&l) {
                Some(&(g, before)) if g == gen && count >= before => count - before,
                _ => count,
            };
            inc(family, &l, delta);
            seen.insert(l, (gen, count));
        };
        let m = &self.metrics;
        for s in &now.services {
            let svc = s.address.to_string();
            for b in &s.backends {
                let l = vec![
                    label("service", svc.clone()),
                    label("proto", s.proto),
                    label("backend", b.address.to_string()),
                ];
                feed(&m.service_picks, l, b.picks);
            }
            let l = vec![label("service", svc), label("proto", s.proto)];
            feed(&m.service_failed_picks, l, s.failed_picks);
        }
        for r in &now.redirects {
            let l = vec![
                label("line", r.line.to_string()),
                label("proto", r.proto),
                label("proxy", r.proxy.clone().unwrap_or_default()),
                label("proxy6", r.proxy6.clone().unwrap_or_default()),
            ];
            feed(&m.redirects, l, r.redirected);
        }
        self.counters_seen = seen;
    }

    fn export_listeners(&mut self, conns: &BTreeMap<u64, Conn>) {
        let mut now = HashSet::new();
        // Forget backlogs of listeners gone for a few reads, so a host that
        // opens many short-lived listeners does not grow this map; a few,
        // not one, since a listen event can come before its socket's first read.
        for (_, missed) in self.backlogs.values_mut() {
            *missed = missed.saturating_add(1);
        }
        for c in conns.values().filter(|c| c.state == TCP_LISTEN) {
            let backlog = match self.backlogs.get_mut(&(c.netns, c.saddr, c.sport)) {
                Some((b, missed)) => {
                    *missed = 0;
                    b.to_string()
                }
                None => String::new(),
            };
            let comm = if c.owner_known { c.comm.as_str() } else { "" };
            let l = vec![
                label("comm", comm),
                label("address", c.saddr.to_string()),
                label("port", c.sport.to_string()),
                label("backlog", backlog),
                label("netns", c.netns.to_string()),
                label("family", crate::model::family_name(c.family)),
            ];
            self.metrics.listening.get_or_create(&l).set(1);
            now.insert(l);
        }
        self.backlogs
            .retain(|_, (_, missed)| *missed <= LISTENER_READS_KEPT);
        for gone in self.listening.difference(&now) {
            self.metrics.listening.remove(gone);
        }
        self.listening = now;
    }

    fn export_losses(&mut self, now: Losses) {
        let before = std::mem::replace(&mut self.losses, now);
        let m = &self.metrics;
        m.events_lost.inc_by(now.lost.saturating_sub(before.lost));
        m.events_malformed
            .inc_by(now.malformed.saturating_sub(before.malformed));
        m.hook_runs_missed
            .inc_by(now.missed.saturating_sub(before.missed));
        // get_or_create even for 0: the series exist from the first scrape.
        m.untracked
            .get_or_create(&vec![label("map", "conns")])
            .inc_by(now.untracked.saturating_sub(before.untracked));
        m.untracked
            .get_or_create(&vec![label("map", "udp_flows")])
            .inc_by(now.udp_untracked.saturating_sub(before.udp_untracked));
    }

    /// SIGHUP: the new config and policy replace the old ones whole, or
    /// nothing changes (one line on stderr, and the failure metrics).
    fn reload(&mut self) {
        match self.try_reload() {
            Ok(msg) => {
                self.metrics.reloads.inc();
                self.metrics.last_reload_success.set(1);
                eprintln!("socklens: reloaded {msg}");
            }
            Err(e) => {
                // The line first: whoever sees the metric can find the reason.
                eprintln!("socklens: reload failed, the old config stays in force: {e}");
                self.metrics.reload_failures.inc();
                self.metrics.last_reload_success.set(0);
            }
        }
    }

    fn try_reload(&mut self) -> Result<String> {
        let config = config::load(&self.args.config, self.args.explicit)?;
        let policy = load_policy(&config)?;
        // Reopened even when unchanged: log rotation sends SIGHUP too.
        let log = open_log(config.event_log.as_ref(), config.event_log_group)?;
        let mut notes = Vec::new();
        if let Some(p) = &policy {
            notes.push(apply_policy(p)?);
            if !self.policy_events {
                notes.push("policy verdict metrics start at the next restart".into());
            }
        }
        for (what, changed) in [
            ("listen", config.listen != self.config.listen),
            ("max_conns", config.max_conns != self.config.max_conns),
            (
                "cgroup",
                config.cgroup.as_ref().map(|c| &c.0) != self.config.cgroup.as_ref().map(|c| &c.0),
            ),
            (
                "tls_server_config and basic_auth_users",
                config.web != self.config.web,
            ),
        ] {
            if changed {
                notes.push(format!("{what} takes effect at the next restart"));
            }
        }
        let keep_listen = self.config.listen;
        let keep_max = self.config.max_conns;
        let keep_cgroup = self.config.cgroup.clone();
        let keep_web = self.config.web.clone();
        self.rules = rules_of(&config);
        self.log = log;
        self.config = Config {
            listen: keep_listen,
            max_conns: keep_max,
            cgroup: keep_cgroup,
            web: keep_web,
            ..config
        };
        let file = self
            .config
            .file
            .as_ref()
            .map_or_else(|| "(defaults)".to_owned(), |f| f.display().to_string());
        Ok(if notes.is_empty() {
            file
        } else {
            format!("{file}; {}", notes.join("; "))
        })
    }
}

fn inc(family: &Family<Labels, Counter>, labels: &Labels, by: u64) {
    if by > 0 {
        family.get_or_create(labels).inc_by(by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unprotected_non_loopback_endpoints_get_one_warning_line() {
        let mut c = Config::default();
        assert_eq!(exposure_warning(&c), None, "loopback is the default");
        c.listen = "0.0.0.0:9464".parse().unwrap();
        let w = exposure_warning(&c).expect("warning");
        assert!(w.contains("0.0.0.0:9464 without TLS or basic auth"), "{w}");
        assert_eq!(w.lines().count(), 1);
        c.web.users.insert("prom".into(), "$2b$10$x".into());
        assert!(exposure_warning(&c).is_some_and(|w| w.contains("without TLS")));
        c.web.tls = Some(config::Tls {
            cert_file: "c".into(),
            key_file: "k".into(),
            client_ca_file: None,
            client_auth: config::ClientAuth::NoClientCert,
        });
        assert_eq!(exposure_warning(&c), None);
    }
}
