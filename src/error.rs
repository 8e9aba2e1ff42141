//! Conditions callers act on. `main` maps each to an exit code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "socklens must run as root: loading BPF programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"
    )]
    NotPrivileged,
    #[error("no kernel BTF at {}: socklens needs a kernel built with CONFIG_DEBUG_INFO_BTF", .0.display())]
    NoBtf(PathBuf),
    /// Bad user input: a one-line message naming the problem.
    #[error("{0}")]
    Usage(String),
    /// No attach method serves a hook (attach::plan::PlanError).
    #[error(transparent)]
    Plan(Box<dyn std::error::Error + Send + Sync>),
    #[error("{what}: {detail}")]
    Kernel { what: String, detail: String },
}

impl Error {
    /// 2 for bad input, 1 for everything the environment refused.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            _ => 1,
        }
    }

    pub fn kernel(what: impl Into<String>, detail: impl ToString) -> Self {
        Self::Kernel {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// Short errno-style name for a libbpf error, for one-line reasons.
pub fn bpf_errno(err: &libbpf_rs::Error) -> String {
    let name = match err.kind() {
        libbpf_rs::ErrorKind::PermissionDenied => "EPERM",
        libbpf_rs::ErrorKind::NotFound => "ENOENT",
        libbpf_rs::ErrorKind::InvalidInput => "EINVAL",
        libbpf_rs::ErrorKind::Unsupported => "EOPNOTSUPP",
        libbpf_rs::ErrorKind::AlreadyExists => "EEXIST",
        libbpf_rs::ErrorKind::OutOfMemory => "ENOMEM",
        libbpf_rs::ErrorKind::WouldBlock => "EAGAIN",
        _ => return err.to_string(),
    };
    name.to_owned()
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
