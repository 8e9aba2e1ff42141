//! `socklens doctor`: what this kernel offers and how each hook would attach.

use std::io::Write;
use std::path::Path;

use crate::attach::plan::{self, Hook, Knobs, Tier};
use crate::error::{Context, Result};
use crate::host::probe::{self, Prober};
use crate::host::system;

fn status<T: std::fmt::Display, E: std::fmt::Display>(r: &std::result::Result<T, E>) -> String {
    match r {
        Ok(v) => format!("ok ({v})"),
        Err(e) => format!("unavailable: {e}"),
    }
}

fn mount_line(m: &Result<system::MountStatus>) -> String {
    match m {
        Ok(s) if s.mounted_now => format!("{} (mounted by socklens)", s.path.display()),
        Ok(s) => s.path.display().to_string(),
        Err(e) => format!("unavailable: {e}"),
    }
}

pub fn run(btf: &Path, force: Option<Tier>, knobs: &Knobs, out: &mut dyn Write) -> Result<()> {
    system::check_privileges()?;
    let btf_ok = system::check_btf(btf).map(|()| btf.display().to_string());
    let tracefs = system::ensure_tracefs();
    let bpffs = system::ensure_bpffs();
    let cgroup2 = system::cgroup2_root()
        .map(|p| p.display().to_string())
        .ok_or("cgroup v2 is not mounted");
    let tracefs_path = tracefs.as_ref().map(|s| s.path.clone()).unwrap_or_default();

    writeln!(out, "kernel       {}", system::kernel_release()).ctx("writing report")?;
    writeln!(out, "BTF          {}", status(&btf_ok)).ctx("writing report")?;
    let ringbuf = if probe::ringbuf_supported() {
        "ok"
    } else {
        "unavailable (perf buffer fallback)"
    };
    writeln!(out, "ring buffer  {ringbuf}").ctx("writing report")?;
    writeln!(out, "tracefs      {}", mount_line(&tracefs)).ctx("writing report")?;
    writeln!(out, "bpffs        {}", mount_line(&bpffs)).ctx("writing report")?;
    writeln!(out, "cgroup v2    {}", status(&cgroup2)).ctx("writing report")?;
    let kprobes = probe::kprobes_status(&tracefs_path).map(|()| "kprobe PMU or kprobe_events");
    writeln!(out, "kprobes      {}", status(&kprobes)).ctx("writing report")?;
    let prober = Prober::new(&tracefs_path, btf, &plan::requirements(&Hook::ALL));
    let caps = prober.probe(&plan::requirements(&Hook::ALL));
    let planned: Vec<_> = Hook::ALL
        .iter()
        .map(|&hook| (hook, plan::plan_hook(&caps, knobs, hook, force)))
        .collect();
    let chosen: Vec<_> = planned
        .iter()
        .filter_map(|(_, p)| p.as_ref().ok().cloned())
        .collect();
    let tcp_bytes = if plan::tcp_bytes_method(&chosen, knobs) {
        "from the sockets' sequence counters, at close and at each snapshot"
    } else {
        "from each send and receive"
    };
    writeln!(out, "tcp bytes    {tcp_bytes}").ctx("writing report")?;
    let accel = crate::policy::accelmaps::kernel_support()
        .map(|()| "sock_ops + sockhash + sk_msg redirect")
        .map_err(|what| format!("this kernel lacks {what}"));
    writeln!(out, "accelerate   {}", status(&accel)).ctx("writing report")?;
    writeln!(out, "hooks:").ctx("writing report")?;
    for (hook, result) in &planned {
        match result {
            Ok(hp) => {
                match hp.how() {
                    Some(how) => writeln!(out, "  {:<8} {} ({how})", hook.name(), hp.tier),
                    None => writeln!(out, "  {:<8} {}", hook.name(), hp.tier),
                }
                .ctx("writing report")?;
                for (tier, why) in &hp.rejected {
                    writeln!(out, "           rejected {tier}: {why}").ctx("writing report")?;
                }
            }
            Err(e) => writeln!(out, "  {:<8} NONE: {e}", hook.name()).ctx("writing report")?,
        }
    }
    Ok(())
}
