//! Conditions callers act on. `main` maps each to an exit code.

use std::path::PathBuf;

use crate::plan::PlanError;

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
    #[error(transparent)]
    Plan(#[from] PlanError),
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

pub type Result<T, E = Error> = std::result::Result<T, E>;
