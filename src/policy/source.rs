//! What the policy file's parsers share: the one-line error with FILE:LINE,
//! line numbers of a TOML text, and the cgroup v2 tree names are checked against.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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
