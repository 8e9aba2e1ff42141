//! Capabilities after start: the agent keeps only what its loop and
//! reloads use, and threads that only talk to the network keep none.
//! Capabilities are per thread, so each thread drops its own.

use std::collections::HashSet;

use caps::{CapSet, Capability};

use crate::error::{Error, Result};

/// What the agent's loop and reloads use: map reads and policy programs
/// (BPF, PERFMON, NET_ADMIN), setns into each netns for the socket
/// iterators (SYS_ADMIN), reading every process's /proc/PID/fd for socket
/// owners (SYS_PTRACE, DAC_READ_SEARCH).
pub const AGENT_KEEPS: [Capability; 6] = [
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Limits the calling thread to `keep` (those of them it has): effective,
/// permitted, inheritable and ambient sets, and the bounding set where it
/// may still change it. Returns what it kept, by name.
pub fn keep_only(keep: &[Capability]) -> Result<Vec<String>> {
    let err = |source| Error::Caps {
        what: "dropping capabilities",
        source,
    };
    let permitted = caps::read(None, CapSet::Permitted).map_err(err)?;
    let kept: HashSet<Capability> = keep
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    // The bounding set needs CAP_SETPCAP to shrink; under systemd it is
    // already the unit's CapabilityBoundingSet.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in caps::all() {
            if !kept.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c).map_err(err)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::set(None, CapSet::Inheritable, &HashSet::new()).map_err(err)?;
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)?;
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}
