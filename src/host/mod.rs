//! What the host offers: privileges, mounts and BTF (`system`), kernel
//! capabilities found by trying (`probe`), cgroup v2 paths (`cgroup`), the
//! process's own capability sets (`caps`) and which files it may trust or
//! must keep private (`trust`).

pub mod caps;
pub mod cgroup;
pub mod probe;
pub mod system;
pub mod trust;
