//! socklens: see and control every socket on a Linux host with eBPF.
//!
//! The modules read as the pipeline: `probe` (what the kernel can do) →
//! `plan` (pure: capabilities + options → attach tier per hook) → `loader` →
//! `events` (ring/perf buffer) → `model` (typed events) → `reorder` (time
//! order across buffers) → `output` (JSON) and `columns` (the columns view).

pub mod agent;
pub mod cgevents;
pub mod cgroup;
pub mod cgroup_attach;
pub mod columns;
pub mod conns;
pub mod doctor;
pub mod error;
pub mod events;
pub mod json_writer;
pub mod loader;
pub mod model;
pub mod output;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod reorder;
pub mod rfc3339;
pub mod skel;
pub mod system;
pub mod top;
pub mod trace;
