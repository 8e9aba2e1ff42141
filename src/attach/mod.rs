//! What loads and where: the pure attach plan (`plan`), the tracing object's
//! loading and attaching (`loader`), and cgroup attachments (`cgroup_attach`).

pub mod cgroup_attach;
pub mod loader;
pub mod plan;
