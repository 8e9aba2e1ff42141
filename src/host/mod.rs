//! What the host offers: privileges, mounts and BTF (`system`), kernel
//! capabilities found by trying (`probe`), and cgroup v2 paths (`cgroup`).

pub mod cgroup;
pub mod probe;
pub mod system;
