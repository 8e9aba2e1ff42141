/* The one definition of every struct and constant shared by the BPF programs and
 * the Rust side. Rust uses the skeleton's generated types; never mirror these by
 * hand. Fields are fixed-width and carry no pointers. */
#ifndef SOCKLENS_H
#define SOCKLENS_H

#define SL_COMM_LEN 16

enum sl_event_kind {
	SL_EV_BIND = 1,
	SL_EV_LISTEN = 2,
};

/* The attach tier whose program produced an event. */
enum sl_tier {
	SL_TIER_FENTRY = 1,
	SL_TIER_KPROBE = 2,
	SL_TIER_TRACEPOINT = 3,
};

/* Socket options shown with bind, as in bindsnoop's OPTS column. */
enum sl_sockopt {
	SL_OPT_REUSEADDR = 1,
	SL_OPT_REUSEPORT = 2,
	SL_OPT_FREEBIND = 4,
	SL_OPT_TRANSPARENT = 8,
	SL_OPT_BIND_ADDRESS_NO_PORT = 16,
};

/* Slots of the per-CPU `stats` array. */
enum sl_stat {
	SL_STAT_EVENTS_LOST = 0,
	SL_STAT_MAX = 4,
};

/* bind and listen. Every event record starts with `kind`. */
struct sl_sock_event {
	__u32 kind;
	__u32 tier;
	__u64 ts_ns;      /* CLOCK_MONOTONIC */
	__u64 cgroup_id;  /* cgroup v2 id of the calling task */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 netns;      /* inode of the socket's network namespace */
	__s32 ret;        /* 0 or -errno */
	__u16 family;     /* AF_INET / AF_INET6 */
	__u16 proto;      /* IPPROTO_* */
	__u16 sock_type;  /* SOCK_STREAM / SOCK_DGRAM / ... */
	__u16 port;       /* host byte order; the assigned one when bind asked for 0 */
	__u32 bound_dev_if;
	__u32 opts;       /* enum sl_sockopt bits */
	__s32 backlog_req; /* listen: what the caller asked for */
	__u32 backlog;     /* listen: what the kernel uses, min(requested, somaxconn) */
	__u8 addr[16];     /* IPv4 in the first 4 bytes, network order */
	__u8 comm[SL_COMM_LEN];
};

#endif
