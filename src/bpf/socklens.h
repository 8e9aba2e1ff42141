/* The one definition of every struct and constant shared by the BPF programs and
 * the Rust side. Rust uses the skeleton's generated types; never mirror these by
 * hand. Fields are fixed-width and carry no pointers. */
#ifndef SOCKLENS_H
#define SOCKLENS_H

#define SL_COMM_LEN 16

enum sl_event_kind {
	SL_EV_BIND = 1,
	SL_EV_LISTEN = 2,
	SL_EV_CONNECT = 3,    /* an outgoing TCP connection got established */
	SL_EV_ACCEPT = 4,     /* accept() returned a connection */
	SL_EV_CLOSE = 5,      /* a tracked TCP connection closed: the whole record */
	SL_EV_RETRANSMIT = 6, /* one TCP retransmission */
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
	SL_STAT_UNTRACKED = 1,     /* connections not tracked: the conns map was full */
	SL_STAT_UDP_UNTRACKED = 2, /* UDP flows not tracked: the udp_flows map was full */
	SL_STAT_RET_MISSED = 3,    /* kretprobe runs found dropped (socklens.bpf.c, stash_put) */
	SL_STAT_MAX = 4,
};

enum sl_direction {
	SL_DIR_UNKNOWN = 0,
	SL_DIR_OUT = 1, /* connect(), or UDP: this side sent first */
	SL_DIR_IN = 2,  /* accepted, or UDP: the peer sent first */
};

enum sl_conn_flag {
	SL_CONN_OWNER = 1,       /* pid/comm/cgroup were captured in process context */
	SL_CONN_SEEDED = 2,      /* existed before socklens started; counts are from start */
	SL_CONN_ESTABLISHED = 4, /* reached ESTABLISHED at least once */
	SL_CONN_DRAINING = 8,    /* closed while data it received was still unread */
	SL_CONN_CLOSED_AT_DESTROY = 16, /* its close was seen only when the kernel freed it */
	SL_CONN_WAITING = 32,    /* seeded, counted in seeded_waiting until its owner's first use */
	SL_CONN_FOUND_LATE = 64, /* its start was missed: tracked later, from its socket's start */
	SL_CONN_FIN_QUEUED = 128, /* its FIN took a sequence number (FIN_WAIT1 or LAST_ACK seen) */
	SL_CONN_ACCEL = 256,     /* had a psock (sockmap/sockhash): bytes redirected past TCP counted */
	SL_CONN_ACCEL_EXACT = 512, /* its redirected bytes came from sk_msg's counts (slp_accel_bytes) */
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

/* One TCP connection or UDP socket, keyed by its struct sock address. */
struct sl_conn {
	__u64 cookie;      /* socket cookie (0 where the attach tier cannot compute it) */
	__u64 start_ns;    /* CLOCK_MONOTONIC; when socklens first saw it */
	__u64 end_ns;
	__u64 tx_bytes;    /* accepted by sendmsg/sendfile: return values, not sizes asked */
	__u64 rx_bytes;    /* delivered by recvmsg to the application, MSG_PEEK excluded */
	__u64 sendfile_bytes;
	__u64 cgroup_id;
	__u64 ino;         /* socket inode, to find the owner of seeded sockets */
	__u32 pid;
	__u32 uid;
	__u32 netns;
	__u32 retransmits; /* tcp_sock.total_retrans: the kernel's own count */
	__u32 srtt_us;
	__u32 rttvar_us;
	__s32 error;       /* sk_err when it closed: why a connect failed */
	__u32 seen_gen;    /* last socket-iterator pass that saw it (src/session/seed.rs sweep) */
	__u16 family;
	__u16 proto;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 state;        /* TCP_* */
	__u8 direction;    /* enum sl_direction */
	__u16 flags;       /* enum sl_conn_flag bits */
	__u8 comm[SL_COMM_LEN];
	/* Where tx/rx come from the socket's sequence counters (conn.bpf.h,
	 * tcp_bytes_from_seq): the counters' values that count as zero. */
	__u64 tx_base;
	__u64 rx_base;
	/* TCP: the kernel's lifetime counters tcp_sock.bytes_acked and
	 * bytes_received (what `ss -ti` shows), as of the last read; unlike
	 * tcp_tx_total() in conn.bpf.h, nothing queued beyond them. */
	__u64 tx_total;
	__u64 rx_total;
	/* A connection the policy programs steered (a service VIP translated to
	 * a backend, or a redirect): the address the application connected to,
	 * which the kernel rewrote to daddr/dport. conn.bpf.h, conn_steer. */
	__u8 orig_addr[16];
	__u16 orig_port;   /* host order */
	__u8 steered;      /* enum slp_xlate_kind (policy.h); 0 = not steered */
	__u8 _pad2[5];
	/* SL_CONN_ACCEL: bytes sendmsg/recvmsg moved that the sequence counters
	 * never saw (sk_msg redirect), and those counters as of the last such
	 * call, to tell the two apart per call (conn.bpf.h, tcp_accel_count). */
	__u64 accel_tx;
	__u64 accel_rx;
	__u64 tx_seen;
	__u64 rx_seen;
};

/* connect, accept, close, retransmit. */
struct sl_conn_event {
	__u32 kind;
	__u32 tier;
	__u64 ts_ns;
	__u64 sk;
	struct sl_conn conn;
};

/* A UDP socket and one peer it talks to. */
struct sl_udp_key {
	__u64 sk;
	__u8 addr[16];
	__u16 port;
	__u16 family;
	__u32 _pad;
};

struct sl_udp_flow {
	__u64 tx_bytes;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 rx_packets;
	__u64 first_ns;
	__u64 last_ns;
	__u32 direction; /* enum sl_direction: who sent first */
	__u32 _pad;
	/* start_ns of the socket's entry in conns: a flow left by a socket
	 * whose address a new socket took over is not that socket's. */
	__u64 conn_start_ns;
};

#endif
