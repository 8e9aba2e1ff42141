//! cgroup v2 ids (what bpf_get_current_cgroup_id returns: the kernfs inode of
//! the cgroup directory) to paths under the cgroup v2 root, and back.

use std::collections::HashMap;
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Rescanning the tree is bounded: at most once per this interval.
const RESCAN_INTERVAL: Duration = Duration::from_millis(500);

pub struct CgroupPaths {
    root: PathBuf,
    by_id: HashMap<u64, String, BuildHasherDefault<IdHasher>>,
    last_scan: Option<Instant>,
}

/// Hashes cgroup ids for `by_id`, which `trace` looks up for every event
/// with an owner. The ids are inode numbers the kernel hands out, not keys
/// anyone can choose to collide, so SipHash's resistance to flooding buys
/// nothing here, and its two hashes a lookup were a visible part of the
/// time per event.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    /// Fibonacci hashing: consecutive ids spread over all the bits.
    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl CgroupPaths {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            by_id: HashMap::default(),
            last_scan: None,
        }
    }

    /// The cgroup's path relative to the v2 root ("/" for the root itself),
    /// or None for a cgroup that is gone.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        self.path_ref(id).map(str::to_owned)
    }

    /// `path_of`, borrowed: what a renderer writes out needs no copy.
    pub fn path_ref(&mut self, id: u64) -> Option<&str> {
        if !self.by_id.contains_key(&id) && self.stale() {
            self.rescan();
        }
        self.by_id.get(&id).map(String::as_str)
    }

    /// Whether a miss may rescan the tree; asked only on a miss, as it reads
    /// the clock.
    fn stale(&self) -> bool {
        self.last_scan
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL)
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            self.by_id.insert(meta.ino(), relative(&self.root, &dir));
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

fn relative(root: &Path, dir: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => "/".to_owned(),
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// Resolves a user-given cgroup, absolute inside the v2 mount or relative to
/// it, to a real cgroup directory inside the mount: symlinks and `..` are
/// resolved first, so nothing outside the v2 root is ever opened. The error
/// says why, for a one-line message after the value.
pub fn resolve(root: &Path, given: &str) -> Result<PathBuf, String> {
    let path = Path::new(given);
    let candidate = if path.starts_with(root) {
        path.to_owned()
    } else {
        root.join(given.trim_start_matches('/'))
    };
    let root = fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let real = match fs::canonicalize(&candidate) {
        Ok(p) => p,
        Err(_) if !escapes(&root, &candidate) => {
            return Err(format!("no such cgroup under {}", root.display()))
        }
        Err(_) => return Err(format!("outside the cgroup v2 root {}", root.display())),
    };
    if !real.starts_with(&root) {
        return Err(format!("outside the cgroup v2 root {}", root.display()));
    }
    // Every cgroup v2 directory has cgroup.procs; plain directories and
    // files in the mount do not.
    if !real.join("cgroup.procs").is_file() {
        return Err(format!("{} is not a cgroup", real.display()));
    }
    Ok(real)
}

/// Whether `path`'s `..` components, taken literally, leave `root`.
fn escapes(root: &Path, path: &Path) -> bool {
    let mut depth: Vec<std::path::Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                depth.pop();
            }
            std::path::Component::CurDir => {}
            c => depth.push(c),
        }
    }
    !depth.iter().collect::<PathBuf>().starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ids_to_relative_paths() {
        let tmp = std::env::temp_dir().join(format!("sl-cg-{}", std::process::id()));
        fs::create_dir_all(tmp.join("a/b")).unwrap();
        let ino = fs::metadata(tmp.join("a/b")).unwrap().ino();
        let root_ino = fs::metadata(&tmp).unwrap().ino();
        let mut paths = CgroupPaths::new(tmp.clone());
        assert_eq!(paths.path_of(ino).as_deref(), Some("/a/b"));
        assert_eq!(paths.path_of(root_ino).as_deref(), Some("/"));
        for d in ["", "a", "a/b"] {
            fs::write(tmp.join(d).join("cgroup.procs"), "").unwrap();
        }
        fs::create_dir_all(tmp.join("a/plain")).unwrap();
        let real = fs::canonicalize(&tmp).unwrap();
        assert_eq!(resolve(&tmp, "a/b"), Ok(real.join("a/b")));
        assert_eq!(resolve(&tmp, "/a"), Ok(real.join("a")));
        assert_eq!(resolve(&tmp, "a/b/../.."), Ok(real.clone()));
        let err = |given: &str| resolve(&tmp, given).unwrap_err();
        assert!(err("nope").starts_with("no such cgroup"), "{}", err("nope"));
        assert!(err("../../../").starts_with("outside the cgroup v2 root"));
        assert!(err("a/../../x").starts_with("outside the cgroup v2 root"));
        assert!(err("a/plain").ends_with("is not a cgroup"));
        assert!(err("a/b/cgroup.procs").ends_with("is not a cgroup"));
        fs::remove_dir_all(&tmp).unwrap();
    }
}
