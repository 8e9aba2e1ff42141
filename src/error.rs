//! Conditions callers act on. `main` maps each to an exit code.

use std::borrow::Cow;
use std::io;
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
    /// A libbpf call failed: the errno name, then libbpf's words.
    #[error("{what}: {} ({source})", bpf_errno(.source))]
    Bpf {
        what: Cow<'static, str>,
        #[source]
        source: libbpf_rs::Error,
    },
    /// A libbpf call on a pinned object failed: the errno name alone.
    #[error("{what}: {}", bpf_errno(.source))]
    BpfErrno {
        what: Cow<'static, str>,
        #[source]
        source: libbpf_rs::Error,
    },
    /// A libbpf call on an event buffer or iterator failed: libbpf's words alone.
    #[error("{what}: {source}")]
    BpfText {
        what: Cow<'static, str>,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: Cow<'static, str>,
        #[source]
        source: io::Error,
    },
    /// A raw system call (nix) failed; shown with the errno's description.
    #[error("{what}: {}", .source.desc())]
    Sys {
        what: Cow<'static, str>,
        #[source]
        source: nix::errno::Errno,
    },
    /// Reading or changing the process's capability sets failed.
    #[error("{what}: {source}")]
    Caps {
        what: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    /// The BPF object lacks something the code expects (a section, a program).
    #[error("{what}: {detail}")]
    Object {
        what: Cow<'static, str>,
        detail: &'static str,
    },
    /// The kernel lacks what a command needs.
    #[error("{what}: {detail}")]
    Unsupported { what: &'static str, detail: String },
    /// `inner`, then what the user can do about it.
    #[error("{inner}; {hint}")]
    Hint {
        #[source]
        inner: Box<Self>,
        hint: &'static str,
    },
}

impl Error {
    /// 2 for bad input, 1 for everything the environment refused.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Names what was being done when a call failed: `.ctx("loading BPF programs")`.
pub trait Context<T> {
    fn ctx(self, what: impl Into<Cow<'static, str>>) -> Result<T>;
}

impl<T> Context<T> for Result<T, libbpf_rs::Error> {
    fn ctx(self, what: impl Into<Cow<'static, str>>) -> Result<T> {
        self.map_err(|source| Error::Bpf {
            what: what.into(),
            source,
        })
    }
}

impl<T> Context<T> for Result<T, io::Error> {
    fn ctx(self, what: impl Into<Cow<'static, str>>) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what.into(),
            source,
        })
    }
}

impl<T> Context<T> for Result<T, nix::errno::Errno> {
    fn ctx(self, what: impl Into<Cow<'static, str>>) -> Result<T> {
        self.map_err(|source| Error::Sys {
            what: what.into(),
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bpf(errno: i32) -> libbpf_rs::Error {
        libbpf_rs::Error::from(io::Error::from_raw_os_error(errno))
    }

    /// The one-line texts users see, and the source kept behind them.
    #[test]
    fn messages_name_the_errno_and_keep_the_source() {
        let e = Err::<(), _>(bpf(libc::EPERM))
            .ctx("loading BPF programs")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "loading BPF programs: EPERM (Operation not permitted (os error 1))"
        );
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("Operation not permitted (os error 1)")
        );
        assert_eq!(e.exit_code(), 1);

        let e = Error::BpfErrno {
            what: "pinning /sys/fs/bpf/x".into(),
            source: bpf(libc::ENOENT),
        };
        assert_eq!(e.to_string(), "pinning /sys/fs/bpf/x: ENOENT");

        let e = Error::BpfText {
            what: "reading events".into(),
            source: bpf(libc::EBADF),
        };
        assert_eq!(
            e.to_string(),
            "reading events: Bad file descriptor (os error 9)"
        );

        let e = Err::<(), _>(io::Error::from_raw_os_error(libc::EACCES))
            .ctx(format!("opening {}", "/x"))
            .unwrap_err();
        assert_eq!(e.to_string(), "opening /x: Permission denied (os error 13)");

        let e = Err::<(), _>(nix::errno::Errno::EBUSY)
            .ctx("mounting")
            .unwrap_err();
        assert_eq!(e.to_string(), "mounting: Device or resource busy");

        let e = Error::Hint {
            inner: Box::new(Error::Object {
                what: "opening".into(),
                detail: "no .rodata section",
            }),
            hint: "run `x`",
        };
        assert_eq!(e.to_string(), "opening: no .rodata section; run `x`");
        assert_eq!(Error::Usage("bad".into()).exit_code(), 2);
    }
}
