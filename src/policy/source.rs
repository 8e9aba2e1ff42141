//! What the policy file's parsers share: the one-line error with FILE:LINE,
//! line numbers of a TOML text, and the cgroup v2 tree names are checked against.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use toml::Spanned;

/// A policy file that cannot be applied, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub file: String,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.msg)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.msg)
        }
    }
}

impl From<PolicyError> for crate::error::Error {
    fn from(e: PolicyError) -> Self {
        Self::Usage(e.to_string())
    }
}

/// A cgroup v2 directory: its path under the v2 root ("/" for the root) and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    pub rel: String,
    pub id: u64,
}

/// The cgroup v2 tree at validation time.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    /// Every directory: path under the root ("/", "/a", "/a/b") -> id.
    pub dirs: BTreeMap<String, u64>,
}

impl CgroupTree {
    /// Walks the tree under `root` (a cgroup v2 mount, or any directory in tests).
    pub fn scan(root: &Path) -> Self {
        let mut dirs = BTreeMap::new();
        let mut stack = vec![(root.to_owned(), "/".to_owned())];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            dirs.insert(rel.clone(), meta.ino());
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((e.path(), child));
                }
            }
        }
        Self { dirs }
    }

    pub(crate) fn get(&self, rel: &str) -> Option<CgroupDir> {
        self.dirs.get(rel).map(|&id| CgroupDir {
            rel: rel.to_owned(),
            id,
        })
    }
}

/// "/a/b/" and "a/b" -> "/a/b"; "" and "/" -> "/".
pub(crate) fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

pub(crate) fn is_under(rel: &str, ancestor: &str) -> bool {
    ancestor == "/" || rel == ancestor || rel.starts_with(&format!("{ancestor}/"))
}

pub(crate) const UNIT_SUFFIXES: [&str; 6] =
    [".service", ".slice", ".scope", ".socket", ".mount", ".swap"];

pub(crate) struct Src<'a> {
    file: &'a str,
    /// Byte offset of each newline.
    newlines: Vec<usize>,
}

impl<'a> Src<'a> {
    pub(crate) fn new(file: &'a str, text: &str) -> Self {
        Self {
            file,
            newlines: text
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        }
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&nl| nl < offset) + 1
    }

    pub(crate) fn err(&self, span: Range<usize>, msg: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.to_owned(),
            line: self.line(span.start),
            msg: msg.into(),
        }
    }
}

pub(crate) fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}

/// A `.` or `..` component: a pattern names cgroups under the root only.
pub(crate) fn leaves_root(path: &str) -> bool {
    path.split('/').any(|p| p == ".." || p == ".")
}

/// `*` matches any run of characters within one path component.
fn glob_component(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_component(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob_component(rest, &s[1..]),
    }
}

pub(crate) fn glob_path(pattern: &str, rel: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').filter(|x| !x.is_empty()).collect();
    let r: Vec<&str> = rel.split('/').filter(|x| !x.is_empty()).collect();
    p.len() == r.len()
        && p.iter()
            .zip(&r)
            .all(|(a, b)| glob_component(a.as_bytes(), b.as_bytes()))
}

// ---- validation ----------------------------------------------------------

/// Every cgroup under `under` paired with the entry that matched it or its
/// deepest matched ancestor (`matched_by`: cgroup path -> entry index).
pub(crate) fn deepest_owner(
    tree: &CgroupTree,
    under: &str,
    matched_by: &HashMap<String, usize>,
) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    for (rel, &id) in &tree.dirs {
        if !is_under(rel, under) {
            continue;
        }
        let mut cur = rel.as_str();
        loop {
            if let Some(&s) = matched_by.get(cur) {
                out.push((s, id));
                break;
            }
            if cur == "/" {
                break;
            }
            cur = match cur.rfind('/') {
                Some(0) => "/",
                Some(i) => &cur[..i],
                None => break,
            };
        }
    }
    out
}

/// The cgroups a `cgroup` pattern or `unit` name matches (exactly one of the two):
/// (the name as written, its span, the matched cgroups). `what` names the table
/// in errors; `whole` is its span when neither key is there.
pub(crate) fn match_target(
    src: &Src<'_>,
    tree: &CgroupTree,
    what: &str,
    whole: Range<usize>,
    cgroup: &Option<Spanned<String>>,
    unit: &Option<Spanned<String>>,
) -> Result<(String, Range<usize>, Vec<CgroupDir>), PolicyError> {
    let found = match (cgroup, unit) {
        (Some(c), Some(u)) => {
            return Err(src.err(
                u.span(),
                format!(
                    "{what} '{}': give either cgroup or unit, not both (unit '{}')",
                    c.get_ref(),
                    u.get_ref()
                ),
            ))
        }
        (None, None) => {
            return Err(src.err(whole, format!("{what}: needs a cgroup or a unit")));
        }
        (Some(c), None) => {
            if leaves_root(c.get_ref()) {
                return Err(src.err(
                    c.span(),
                    format!(
                        "cgroup '{}': '.' and '..' are not allowed: patterns are paths under the cgroup v2 root",
                        c.get_ref()
                    ),
                ));
            }
            let pat = normalize(c.get_ref());
            let matched: Vec<CgroupDir> = if pat.contains('*') {
                tree.dirs
                    .iter()
                    .filter(|(rel, _)| glob_path(&pat, rel))
                    .map(|(rel, &id)| CgroupDir {
                        rel: rel.clone(),
                        id,
                    })
                    .collect()
            } else {
                tree.get(&pat).into_iter().collect()
            };
            if matched.is_empty() {
                return Err(src.err(
                    c.span(),
                    format!("cgroup '{}': no such cgroup", c.get_ref()),
                ));
            }
            (c.get_ref().clone(), c.span(), matched)
        }
        (None, Some(u)) => {
            let unit = u.get_ref();
            if unit.contains('/') || !UNIT_SUFFIXES.iter().any(|s| unit.ends_with(s)) {
                return Err(src.err(
                    u.span(),
                    format!(
                        "unit '{unit}': not a systemd unit name (NAME.service, .slice, .scope, .socket, .mount, .swap)"
                    ),
                ));
            }
            let matched: Vec<CgroupDir> = tree
                .dirs
                .iter()
                .filter(|(rel, _)| rel.rsplit('/').next() == Some(unit.as_str()))
                .map(|(rel, &id)| CgroupDir {
                    rel: rel.clone(),
                    id,
                })
                .collect();
            if matched.is_empty() {
                return Err(src.err(
                    u.span(),
                    format!("unit '{unit}': no cgroup of that unit exists"),
                ));
            }
            (unit.clone(), u.span(), matched)
        }
    };
    Ok(found)
}

/// PORT or "LOW-HIGH"; errors name `owner` ("rule 7") and the value.
pub(crate) fn port_range(
    src: &Src<'_>,
    owner: &str,
    span: Range<usize>,
    v: &toml::Value,
) -> Result<(u16, u16), PolicyError> {
    let shown = value_text(v);
    let bad = |why: &str| src.err(span.clone(), format!("{owner}: ports {shown}: {why}"));
    let port = |s: &str| -> Result<u16, PolicyError> {
        match s.trim().parse::<i64>() {
            Ok(n) if (0..=65535).contains(&n) => Ok(n as u16),
            Ok(_) => Err(bad("a port is 0 to 65535")),
            Err(_) => Err(bad("expected PORT or LOW-HIGH")),
        }
    };
    match v {
        toml::Value::Integer(n) => port(&n.to_string()).map(|v| (v, v)),
        toml::Value::String(s) => {
            let (lo, hi) = match s.split_once('-') {
                Some((a, b)) if !a.trim().is_empty() => (port(a)?, port(b)?),
                _ => {
                    let v = port(s)?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(bad("the range is inverted (LOW-HIGH with LOW <= HIGH)"));
            }
            Ok((lo, hi))
        }
        _ => Err(bad("expected PORT or LOW-HIGH")),
    }
}
