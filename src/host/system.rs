//! The host around the BPF programs: privileges, BTF, the pseudo-filesystems
//! socklens needs, and where cgroup v2 is mounted.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use crate::error::{Context, Error, Result};

pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

pub fn check_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(Error::NotPrivileged)
    }
}

pub fn check_btf(path: &Path) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        _ => Err(Error::NoBtf(path.to_owned())),
    }
}

/// One line of /proc/mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub fstype: String,
    pub target: PathBuf,
}

/// Parses /proc/mounts text; octal escapes (`\040` for space) are decoded.
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = unescape_mount_path(fields.next()?);
            let fstype = fields.next()?.to_owned();
            Some(MountEntry {
                fstype,
                target: PathBuf::from(target),
            })
        })
        .collect()
}

fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Vec<MountEntry> {
    parse_mounts(&fs::read_to_string("/proc/mounts").unwrap_or_default())
}

fn mounted(fstype: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|m| m.fstype == fstype)
        .map(|m| m.target)
}

/// The cgroup v2 mount, wherever this host has it (e.g. /sys/fs/cgroup or,
/// on hybrid hierarchies, /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Option<PathBuf> {
    mounted("cgroup2")
}

/// Where something socklens needs is mounted, and whether socklens mounted it.
#[derive(Debug, Clone)]
pub struct MountStatus {
    pub path: PathBuf,
    pub mounted_now: bool,
}

fn ensure_mounted(fstype: &str, target: &str) -> Result<MountStatus> {
    if let Some(path) = mounted(fstype) {
        return Ok(MountStatus {
            path,
            mounted_now: false,
        });
    }
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .ctx(format!("mounting {fstype} at {target}"))?;
    Ok(MountStatus {
        path: PathBuf::from(target),
        mounted_now: true,
    })
}

/// tracefs, needed to find tracepoints. libbpf looks for it only at
/// /sys/kernel/tracing and /sys/kernel/debug/tracing, so a mount elsewhere
/// does not count.
pub fn ensure_tracefs() -> Result<MountStatus> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(MountStatus {
                path: PathBuf::from(dir),
                mounted_now: false,
            });
        }
    }
    mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .ctx(format!("mounting tracefs at {TRACEFS}"))?;
    Ok(MountStatus {
        path: PathBuf::from(TRACEFS),
        mounted_now: true,
    })
}

/// bpffs, where pinned objects live.
pub fn ensure_bpffs() -> Result<MountStatus> {
    ensure_mounted("bpf", BPFFS)
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Inode of a network namespace file such as /proc/PID/ns/net.
pub fn netns_inode(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
none /mnt/with\\040space tracefs rw 0 0
";

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let m = parse_mounts(HYBRID);
        let cg2 = m.iter().find(|e| e.fstype == "cgroup2").unwrap();
        assert_eq!(cg2.target, PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn decodes_octal_escapes() {
        let m = parse_mounts(HYBRID);
        assert_eq!(m[4].target, PathBuf::from("/mnt/with space"));
    }
}
