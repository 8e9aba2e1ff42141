//! Generated libbpf skeletons and the types shared with src/bpf/socklens.h.

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::use_self,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
mod socklens_skel {
    include!(concat!(env!("OUT_DIR"), "/socklens.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::use_self,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
mod probe_skel {
    include!(concat!(env!("OUT_DIR"), "/probe.skel.rs"));
}

pub use probe_skel::{OpenProbeSkel, ProbeSkelBuilder};
pub use socklens_skel::{types, OpenSocklensSkel, SocklensSkel, SocklensSkelBuilder};

// SAFETY: plain C structs of integer fields and byte arrays, valid for any bit pattern.
unsafe impl plain::Plain for types::sl_sock_event {}
// SAFETY: as above.
unsafe impl plain::Plain for types::sl_conn_event {}
// SAFETY: as above.
unsafe impl plain::Plain for types::sl_conn {}
// SAFETY: as above.
unsafe impl plain::Plain for types::sl_udp_key {}
// SAFETY: as above.
unsafe impl plain::Plain for types::sl_udp_flow {}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::use_self,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
mod policy_skel {
    include!(concat!(env!("OUT_DIR"), "/policy.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::use_self,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
mod terminate_skel {
    include!(concat!(env!("OUT_DIR"), "/terminate.skel.rs"));
}

/// The iterator that resets connections of removed backends (src/bpf/terminate.bpf.c).
pub mod terminate {
    pub use super::terminate_skel::{types, TerminateSkel, TerminateSkelBuilder};
}

/// The cgroup socket programs (src/bpf/policy.bpf.c) and the types of policy.h.
pub mod policy {
    pub use super::policy_skel::{types, OpenPolicySkel, PolicySkel, PolicySkelBuilder};
}

// SAFETY: plain C structs of integer fields and byte arrays, valid for any bit
// pattern, laid out in policy.h without implicit padding.
mod policy_plain {
    use super::policy::types::{
        slp_cgroup_key, slp_config, slp_create_key, slp_create_rule, slp_event, slp_lpm_key,
        slp_port_rule, slp_prefix_rules, slp_rule_info, slp_scope, slp_scope_info,
    };
    unsafe impl plain::Plain for slp_event {}
    unsafe impl plain::Plain for slp_config {}
    unsafe impl plain::Plain for slp_cgroup_key {}
    unsafe impl plain::Plain for slp_scope {}
    unsafe impl plain::Plain for slp_scope_info {}
    unsafe impl plain::Plain for slp_lpm_key {}
    unsafe impl plain::Plain for slp_port_rule {}
    unsafe impl plain::Plain for slp_prefix_rules {}
    unsafe impl plain::Plain for slp_create_key {}
    unsafe impl plain::Plain for slp_create_rule {}
    unsafe impl plain::Plain for slp_rule_info {}
    unsafe impl plain::Plain for super::policy::types::slp_accel_cg_key {}
    unsafe impl plain::Plain for super::policy::types::slp_accel_scope {}
    unsafe impl plain::Plain for super::policy::types::slp_accel_info {}
    unsafe impl plain::Plain for super::policy::types::slp_accel_key {}
    unsafe impl plain::Plain for super::policy::types::slp_accel_bytes {}
}

/// Sum over CPUs of slot `idx` of a per-CPU array of u64 counters.
pub fn percpu_sum(map: &dyn libbpf_rs::MapCore, idx: u32) -> u64 {
    map.lookup_percpu(&idx.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .ok()
        .flatten()
        .map(|cpus| {
            cpus.iter()
                .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
                .map(u64::from_ne_bytes)
                .sum()
        })
        .unwrap_or(0)
}
