/* Shared structs of local TCP acceleration (accel.bpf.h) and src/policy/accel*.rs.
 * Rust uses the skeleton's generated types. Design: docs/accelerate.md. */
#ifndef SOCKLENS_ACCEL_H
#define SOCKLENS_ACCEL_H

enum slp_accel_limit {
	SLP_ACCEL_MAX_SCOPES = 256,    /* [[accelerate]] entries per policy */
	SLP_ACCEL_MAX_PORTS = 8,       /* port ranges per entry */
	SLP_ACCEL_MAX_CGROUPS = 65536, /* cgroup -> entry per generation */
	SLP_ACCEL_MAX_SOCKS = 131072,  /* sockets in the sockhash (two per connection) */
};

/* The sockhash key: one end of a connection as that end sees it. Ports in host
 * order; the peer's key is the same with local and remote swapped. */
struct slp_accel_key {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
	__u16 family;
	__u16 pad;
	__u64 netns;
};

/* `slp_accel_bytes` (accel_bytes.bpf.h): one hashed end, made when its pair joins,
 * before either end can redirect. The cookies tell this pair's entry from one a
 * closed connection with the same addresses left. */
struct slp_accel_bytes {
	__u64 cookie;      /* this end's socket cookie */
	__u64 peer_cookie; /* its peer's */
	__u64 delivered;   /* bytes sk_msg redirected to this end's ingress queue */
	__u64 read;        /* released: what its application had read of them */
	__u32 released;    /* its last close() came with its psock's queue known */
	__u32 marks;       /* enum slp_accel_mark */
};

/* A pair's entries go at the second end's close() when no tracer reads them
 * (the all-zero key's `delivered`: CLOCK_MONOTONIC ns of a tracer's lease);
 * while one does, the last close record needs them and they age out (LRU). */
enum slp_accel_mark {
	SLP_ACCEL_GONE = 1, /* close() ran (the release hook) */
};

/* Socket storage of a hashed end (`slp_accel_end`, freed with the socket): where
 * its counts are, for the release hook, which has no other way to its key or its
 * psock; the ULP guard's mark of sockets socklens filed. */
struct slp_accel_end {
	struct slp_accel_key key;
	__u64 sk;
};

/* `slp_accel_of`: (gen, cgroup id) -> the entry accelerating that cgroup. */
struct slp_accel_cg_key {
	__u64 cgroup_id;
	__u32 gen;
	__u32 pad;
};

/* One [[accelerate]] entry: the server ports it accepts (nports 0: any). */
struct slp_accel_scope {
	__u32 index;
	__u16 nports;
	__u16 pad;
	__u16 lo[SLP_ACCEL_MAX_PORTS];
	__u16 hi[SLP_ACCEL_MAX_PORTS];
};

/* `slp_accel_info`, index gen * SLP_ACCEL_MAX_SCOPES + entry: what `policy show`
 * lists. Not read by the programs. */
struct slp_accel_info {
	__u32 line;
	__u32 ncgroups;
	__u16 nports;
	__u16 pad[3];
	__u16 lo[SLP_ACCEL_MAX_PORTS];
	__u16 hi[SLP_ACCEL_MAX_PORTS];
	char name[96];
};

/* Per-CPU counters (`policy show`), array index = the stat. */
enum slp_accel_stat {
	SLP_AS_PAIRED = 0,        /* connections whose both ends joined */
	SLP_AS_MSGS = 1,          /* messages redirected */
	SLP_AS_BYTES = 2,         /* bytes redirected */
	SLP_AS_PASSED = 3,        /* messages of hashed sockets sent through TCP */
	SLP_AS_UNPAIRED = 4,      /* lone active ends taken out (peer not eligible) */
	SLP_AS_REFUSED_ULP = 5,   /* setsockopt(TCP_ULP) refused on hashed sockets */
	SLP_AS_SKIP_ZEROCOPY = 6, /* ends not joined: SO_ZEROCOPY */
	SLP_AS_SKIP_ULP = 7,      /* ends not joined: a ULP (kTLS, MPTCP) */
	SLP_AS_SKIP_RCVLOWAT = 8, /* ends not joined: SO_RCVLOWAT above 1 */
	SLP_AS_NSTATS = 9,
};

#endif
