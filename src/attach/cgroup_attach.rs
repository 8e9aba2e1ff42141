//! The cgroup attach manager: attaches cgroup programs through bpf_links at the
//! cgroup v2 root or a named cgroup, pins links and maps under
//! /sys/fs/bpf/socklens/<component>/, re-adopts what an earlier socklens pinned,
//! and detaches and unpins all of it.
//!
//! Link-based cgroup attachment is always multi-attach (BPF_F_ALLOW_MULTI
//! semantics): programs others attached to the same cgroup and hook (systemd,
//! Cilium) keep running, and the kernel lets a call through only when every
//! program allows it, so ours can only narrow what the others allow.
//!
//! Layout of one component (e.g. `policy`):
//! ```text
//! /sys/fs/bpf/socklens/policy/maps/<map name>
//! /sys/fs/bpf/socklens/policy/links/<program name>
//! ```

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::{Link, ProgramMut};

use crate::error::{Context, Error, Result};
use crate::host::system;

/// The policy's component: its maps are also read by the tracing programs
/// (the loader joins `slp_xlate`, the per-socket translation state).
pub const POLICY: &str = "policy";

/// Everything socklens pins lives under here.
pub const PIN_ROOT: &str = "/sys/fs/bpf/socklens";

/// The pin root in use: `SOCKLENS_PIN_ROOT` moves it (a directory on bpffs) so
/// that two test suites can each hold a policy on one host without touching the
/// other's; everyone else uses [`PIN_ROOT`].
pub fn pin_root() -> PathBuf {
    std::env::var_os("SOCKLENS_PIN_ROOT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(PIN_ROOT), PathBuf::from)
}

/// Pinned state of one socklens component.
#[derive(Debug, Clone)]
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(component: &str) -> Self {
        Self {
            dir: pin_root().join(component),
        }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// Mounts bpffs if needed and creates the component's directories.
    pub fn create_dirs(&self) -> Result<()> {
        system::ensure_bpffs()?;
        for d in [self.maps_dir(), self.links_dir()] {
            // Pins are root's alone (the kernel makes pinned files 0600).
            std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
                .create(&d)
                .ctx(format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    /// The pinned links, by program name, in name order.
    pub fn pinned_links(&self) -> Result<Vec<(String, Link)>> {
        let mut out = Vec::new();
        for path in files_in(&self.links_dir()) {
            let name = file_name(&path);
            let link = Link::open(&path).map_err(|source| Error::BpfErrno {
                what: format!("opening pinned link {}", path.display()).into(),
                source,
            })?;
            out.push((name, link));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Pins each link as links/<name>, replacing what is there.
    pub fn pin_links(&self, links: &mut [(String, Link)]) -> Result<()> {
        for (name, link) in links.iter_mut() {
            let path = self.link(name);
            let _ = fs::remove_file(&path);
            link.pin(&path).map_err(|source| Error::BpfErrno {
                what: format!("pinning {}", path.display()).into(),
                source,
            })?;
        }
        Ok(())
    }

    /// Detaches every pinned link of this component and unpins it.
    pub fn detach_links(&self) -> Result<()> {
        for path in files_in(&self.links_dir()) {
            detach_and_unpin(&path)?;
        }
        Ok(())
    }

    /// Detaches and unpins one pinned link of this component.
    pub fn detach_link(&self, name: &str) -> Result<()> {
        detach_and_unpin(&self.link(name))
    }

    /// Detaches and unpins everything of this component.
    pub fn remove(&self) -> Result<()> {
        remove_tree(&self.dir)
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The pinned object at `path` when it is a BPF link. (libbpf opens any pinned
/// object as a link; the kernel's fdinfo says what it really is.)
fn open_link(path: &Path) -> Option<Link> {
    let link = Link::open(path).ok()?;
    let fd = link.as_fd().as_raw_fd();
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .any(|l| l.starts_with("link_type:"))
        .then_some(link)
}

/// A pinned link is detached first, so the program stops running even if some
/// other process still holds the link open; other pinned objects are unpinned.
fn detach_and_unpin(path: &Path) -> Result<()> {
    if let Some(link) = open_link(path) {
        link.detach().map_err(|source| Error::BpfErrno {
            what: format!("detaching {}", path.display()).into(),
            source,
        })?;
    }
    match fs::remove_file(path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => Err(Error::Io {
            what: format!("unpinning {}", path.display()).into(),
            source,
        }),
        _ => Ok(()),
    }
}

/// Detaches and unpins every object under `dir`, then removes the directories.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Links first, wherever they are, so nothing runs against half-removed maps.
    let mut dirs = vec![dir.to_owned()];
    let mut all_dirs = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
        all_dirs.push(d);
    }
    for d in &all_dirs {
        for f in files_in(d) {
            if open_link(&f).is_some() {
                detach_and_unpin(&f)?;
            }
        }
    }
    for d in &all_dirs {
        for f in files_in(d) {
            detach_and_unpin(&f)?;
        }
    }
    // Deepest first.
    all_dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in all_dirs {
        fs::remove_dir(&d).ctx(format!("removing {}", d.display()))?;
    }
    // The socklens root goes too once it is empty.
    let root = pin_root();
    if root.exists() && fs::read_dir(&root).is_ok_and(|mut it| it.next().is_none()) {
        let _ = fs::remove_dir(&root);
    }
    Ok(())
}

/// Removes everything socklens ever pinned (`socklens down`).
pub fn remove_all() -> Result<()> {
    remove_tree(&pin_root())
}

/// A cgroup v2 directory, opened for attaching.
pub struct CgroupTarget {
    pub path: PathBuf,
    pub id: u64,
    file: File,
}

impl CgroupTarget {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).ctx(format!("opening cgroup {}", path.display()))?;
        let id = file
            .metadata()
            .ctx(format!("stat {}", path.display()))?
            .ino();
        Ok(Self {
            path: path.to_owned(),
            id,
            file,
        })
    }

    /// Attaches one program with a bpf_link (multi-attach).
    pub fn attach(&self, prog: &ProgramMut<'_>) -> Result<Link> {
        prog.attach_cgroup(self.file.as_raw_fd()).ctx(format!(
            "attaching {} to cgroup {}",
            prog.name().to_string_lossy(),
            self.path.display()
        ))
    }
}

/// The cgroup id a pinned cgroup link is attached to, if it is one and attached.
pub fn link_cgroup(link: &Link) -> Option<u64> {
    match link.info().ok()?.info {
        LinkTypeInfo::Cgroup(c) if c.cgroup_id != 0 => Some(c.cgroup_id),
        _ => None,
    }
}
