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
