//! socklens: see and control every socket on a Linux host with eBPF.
//!
//! The folders read as the pipeline (ARCHITECTURE.md): `host` (what the
//! kernel offers) → `attach` (the pure plan, then loading it) → `session`
//! (a live tracing session and its event stream) → `model` (typed records)
//! → `accounting` (per-interval figures) → `output` (every rendering);
//! `policy` and `agent` beside them, and the commands in `cmd`.

pub mod accounting;
pub mod agent;
pub mod attach;
pub mod cmd;
pub mod error;
pub mod host;
pub mod model;
pub mod output;
pub mod policy;
pub mod session;
pub mod skel;
