/* The one definition of every struct and constant shared by the cgroup socket
 * programs (policy.bpf.c) and the Rust side (src/policy/, src/attach/cgroup_attach.rs).
 * Rust uses the skeleton's generated types; never mirror these by hand. Fields are
 * fixed-width and carry no pointers. */
#ifndef SOCKLENS_POLICY_H
#define SOCKLENS_POLICY_H

/* Capacities and fixed values, as an enum so that Rust sees them too (BTF keeps
 * enums, not macros). Each generation (see slp_config) has its own half of every
 * table. */
enum slp_limit {
	SLP_COMM_LEN = 16,
	SLP_MAX_RULES = 16384,      /* rules per policy */
	SLP_MAX_SCOPES = 1024,      /* scopes per policy */
	SLP_MAX_CGROUPS = 65536,    /* cgroup -> scope entries per policy */
	SLP_MAX_PREFIXES = 131072,  /* (scope, op, cidr) entries per policy */
	SLP_PORT_RULES = 16,        /* rules sharing one (scope, op, cidr) */
	SLP_CREATE_ENTRIES = 16384, /* (scope, family, type, proto) entries per policy */
	SLP_NAME_LEN = 96,          /* a scope's cgroup pattern or unit, for `policy show` */
	SLP_MAX_DEPTH = 32,         /* cgroup levels walked to find a scope */
	/* Counter slots per generation: one per rule, then one per scope default. */
	SLP_COUNTER_SLOTS = SLP_MAX_RULES + SLP_MAX_SCOPES,
	/* Bits of the LPM key before the address: gen, op and scope. */
	SLP_KEY_HDR_BITS = 32,
	/* Wildcards in slp_create_key. */
	SLP_ANY_FAMILY = 0,
	SLP_ANY_TYPE = 0,
	SLP_ANY_PROTO = 0xffff,
	/* Rule id reported for a scope's default verdict. User rule ids are >= 1. */
	SLP_DEFAULT_RULE = 0,
};

/* Record kinds on the `slp_events` ring buffer. Numbered apart from sl_event_kind
 * (socklens.h) so the two can never be confused. */
enum slp_event_kind {
	SLP_EV_SOCK_CREATE = 101,
	SLP_EV_CONNECT = 102,
	SLP_EV_SENDMSG = 103,
	SLP_EV_RECVMSG = 104,
	SLP_EV_GETSOCKOPT = 105,
	SLP_EV_GETPEERNAME = 106,
	SLP_EV_SOCK_RELEASE = 107,
	SLP_EV_POLICY_DENY = 120,
	SLP_EV_POLICY_AUDIT = 121,
	SLP_EV_TRANSLATE = 122, /* an slp_xlate entry stored: original -> real address */
};

/* What a rule governs. Address ops come in a v4 and a v6 flavour in map keys. */
enum slp_op {
	SLP_OP_CREATE = 1,
	SLP_OP_BIND4 = 2,
	SLP_OP_BIND6 = 3,
	SLP_OP_CONNECT4 = 4,
	SLP_OP_CONNECT6 = 5,
	SLP_OP_SENDMSG4 = 6,
	SLP_OP_SENDMSG6 = 7,
};

enum slp_action {
	SLP_ALLOW = 1,
	SLP_DENY = 2,
};

enum slp_mode {
	SLP_MODE_ENFORCE = 1,
	SLP_MODE_AUDIT = 2,
};

/* The errno a denied call fails with, per hook (set with bpf_set_retval). */
enum slp_errno {
	SLP_ERRNO_CREATE = 13,  /* EACCES: socket(2) "permission to create ... denied" */
	SLP_ERRNO_BIND = 13,    /* EACCES: bind(2) "the address is protected" */
	SLP_ERRNO_CONNECT = 13, /* EACCES: connect(2) "... failed because of a local firewall rule" */
	SLP_ERRNO_SENDMSG = 1,  /* EPERM: what a local firewall drop gives a UDP send */
};

/* proto of a port rule: 0 = any, else IPPROTO_TCP / IPPROTO_UDP. */

/* Element 0 of the `slp_config` array. `gen` (0 or 1) selects which half of every
 * table the programs read; user space fills the other half and then flips `gen`
 * with one map update. 0 and 1 differ in one byte, so a reader sees one or the
 * other, never a mix. */
struct slp_config {
	__u32 gen;
	__u32 nscopes[2];
	__u32 nrules[2];
	__u32 pad;
	__u64 attach_cgroup_id; /* where the links are attached */
	__u64 applied_ns[2];    /* CLOCK_REALTIME of each generation's apply */
};

/* `slp_scope_of`: (gen, cgroup id) -> the scope governing that cgroup. */
struct slp_cgroup_key {
	__u64 cgroup_id;
	__u32 gen;
	__u32 pad;
};

struct slp_scope {
	__u16 index; /* 0-based within its generation */
	__u8 mode;   /* enum slp_mode */
	__u8 dflt;   /* enum slp_action */
	/* Shortcuts, so calls no rule can match cost no lookups: */
	__u8 ops;    /* bits (1 << SLP_OP_*) of the address ops with rules */
	__u8 create_shapes; /* bits (1 << shape) of create keys present, shape =
			     * 4 * family given + 2 * type given + proto given */
	__u16 pad;
};

/* `slp_scopes` array, index gen * SLP_MAX_SCOPES + scope index: for `policy show`. */
struct slp_scope_info {
	__u64 cgroup_id; /* the first cgroup the pattern matched */
	__u32 ncgroups;
	__u16 index;
	__u8 mode;
	__u8 dflt;
	__u8 name[SLP_NAME_LEN];
};

/* `slp_lpm` trie key: every rule for one op of one scope, by address prefix.
 * prefixlen counts SLP_KEY_HDR_BITS of header and then address bits. */
struct slp_lpm_key {
	__u32 prefixlen;
	__u8 gen;
	__u8 op;     /* enum slp_op, an address op */
	__u16 scope; /* scope index */
	__u8 addr[16]; /* IPv4 in the first 4 bytes, network order */
};

struct slp_port_rule {
	__u32 slot;    /* rule index: counter slot */
	__u32 rule_id; /* the user's id */
	__u16 port_lo; /* host order, inclusive */
	__u16 port_hi;
	__u8 proto;    /* 0 = any */
	__u8 action;   /* enum slp_action */
	__u16 pad;
};

/* Value of an `slp_lpm` entry: the rules of exactly this prefix, most specific
 * first (narrowest port range, then deny before allow). */
struct slp_prefix_rules {
	__u32 prefixlen; /* the entry's own prefixlen, header included */
	__u32 count;
	struct slp_port_rule rules[SLP_PORT_RULES];
};

/* `slp_create` hash key: socket creation rules. */
struct slp_create_key {
	__u8 gen;
	__u8 type;    /* SOCK_*; SLP_ANY_TYPE */
	__u16 scope;
	__u16 family; /* AF_INET / AF_INET6; SLP_ANY_FAMILY */
	__u16 proto;  /* IPPROTO_*; SLP_ANY_PROTO */
};

struct slp_create_rule {
	__u32 slot;
	__u32 rule_id;
	__u8 action;
	__u8 pad[3];
};

/* `slp_rules` array, index gen * SLP_MAX_RULES + slot: each rule as applied, for
 * `policy show`. */
struct slp_rule_info {
	__u32 rule_id;
	__u16 scope;
	__u8 action;
	__u8 ops;         /* bits (1 << SLP_OP_*) */
	__u8 addr[16];
	__u8 prefix;      /* address bits; 255 = any address of either family */
	__u8 family;      /* cidr family or create family; 0 = any */
	__u16 proto;      /* SLP_ANY_PROTO = any */
	__u16 port_lo;
	__u16 port_hi;
	__u8 sock_type;   /* create: SOCK_*; 0 = any */
	__u8 pad[3];
	__u32 line;       /* line of the rule in the policy file */
};

/* Every record on `slp_events`: observed cgroup hook calls and policy verdicts. */
struct slp_event {
	__u32 kind;       /* enum slp_event_kind */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u64 ts_ns;      /* CLOCK_MONOTONIC */
	__u64 cgroup_id;  /* cgroup v2 id of the calling task */
	__u64 cookie;     /* socket cookie */
	__u64 lifetime_ns; /* sock_release: since sock_create; 0 = unknown */
	__u32 netns;      /* inode of the socket's network namespace */
	__s32 ret;        /* getsockopt: the kernel's return; verdicts: -errno returned */
	__u16 family;
	__u16 sock_type;
	__u16 proto;
	__u16 port;       /* host order */
	__s32 level;      /* getsockopt */
	__s32 optname;
	__u32 rule_id;    /* verdicts: the deciding rule, SLP_DEFAULT_RULE for the default */
	__u8 op;          /* verdicts: enum slp_op */
	__u8 mode;        /* verdicts: enum slp_mode */
	__u8 action;      /* verdicts: enum slp_action the rule asked for */
	__u8 pad;
	__u8 addr[16];    /* IPv4 in the first 4 bytes, network order */
	__u8 comm[SLP_COMM_LEN];
	/* translate: the entry's kind (enum slp_xlate_kind), and where the
	 * kernel sent the call; addr/port are what the application asked for. */
	__u8 steer;
	__u8 pad2;
	__u16 real_port;  /* host order */
	__u32 pad3;
	__u8 real_addr[16];
};

/* ---- services: connect-time translation of a VIP to a backend ------------ */

/* Capacities of the service tables, per generation. */
enum slp_svc_limit {
	SLP_MAX_SERVICES = 16384,   /* services (a tcp+udp service counts once) */
	SLP_MAX_BACKENDS = 65536,   /* backends of all services */
	SLP_MAX_SLOTS = 262144,     /* weight slots of all services */
	SLP_SVC_SLOTS = 4096,       /* weight slots of one service (weights / their gcd) */
	SLP_XLATE_ENTRIES = 4,      /* translations remembered per socket (UDP: per VIP) */
	/* Counter slots per generation: one per backend, then one per service
	 * (picks that found no backend). */
	SLP_SVC_COUNTERS = SLP_MAX_BACKENDS + SLP_MAX_SERVICES,
	/* connect() / sendmsg() to a service without backends: ECONNREFUSED, what
	 * kube-proxy's REJECT gives. Kernels without bpf_set_retval give EPERM. */
	SLP_ERRNO_NO_BACKEND = 111,
};

/* What a translation entry does: the kind is kept per socket so the reverse
 * path (recvmsg, getpeername) and later kinds (redirect to a local proxy) share
 * one table. 0 = empty. */
enum slp_xlate_kind {
	SLP_XLATE_SERVICE = 1,
	/* A client's connect sent to a local proxy (orig: where it was going,
	 * real: the proxy). service = rule index. */
	SLP_XLATE_REDIRECT = 2,
	/* On the proxy's accepted socket: orig is the client's original
	 * destination, for getsockopt SO_ORIGINAL_DST. Never reverse-translated. */
	SLP_XLATE_ORIG_DST = 3,
};

enum slp_svc_flags {
	SLP_SVC_ANY_NETNS = 1, /* translate sockets of every network namespace */
};

/* `slp_svc` hash key: one (VIP, port, protocol) of one generation. IPv4 VIPs are
 * in the first 4 bytes; a v4-mapped IPv6 destination looks up the IPv4 key. */
struct slp_svc_key {
	__u8 addr[16];
	__u16 port;   /* host order */
	__u8 proto;   /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 gen;
	__u16 family; /* AF_INET / AF_INET6 */
	__u16 pad;
};

struct slp_svc {
	__u32 index;     /* within its generation: failed-pick counter, `policy show` */
	__u32 slot_base; /* first slot of this service in its generation's half of slp_slots */
	__u32 nslots;    /* 0: no backend, the call fails with SLP_ERRNO_NO_BACKEND */
	__u8 kind;       /* enum slp_xlate_kind */
	__u8 flags;      /* enum slp_svc_flags */
	__u16 cgroup_level; /* scope: depth of cgroup_id below the v2 root */
	__u64 netns_cookie; /* sockets of this netns only, unless SLP_SVC_ANY_NETNS */
	__u64 cgroup_id;    /* 0: every socket under the attach cgroup */
};

/* `slp_backends` array, index gen * SLP_MAX_BACKENDS + backend index. */
struct slp_backend {
	__u8 addr[16];   /* IPv4 in the first 4 bytes */
	__u16 port;      /* host order */
	__u16 family;
	__u16 weight;
	__u16 flags;     /* enum slp_backend_flags */
	__u32 service;   /* service index */
	__u32 line;      /* in the policy file */
};

enum slp_backend_flags {
	/* Reset the backend's open TCP connections when an apply removes or
	 * drains it (see slp_term_key). */
	SLP_BE_TERMINATE = 1,
};

/* `slp_term` hash key of the terminate program (terminate.bpf.c): a VIP and a
 * backend whose translated TCP sockets are reset. IPv4 in the first 4 bytes;
 * a v4-mapped pair is looked up in its IPv4 form. */
struct slp_term_key {
	__u8 vip[16];
	__u8 backend[16];
	__u16 vip_port;     /* host order */
	__u16 backend_port;
	__u16 family;
	__u16 pad;
};

/* `slp_svc_info` array, index gen * SLP_MAX_SERVICES + service index: for show. */
struct slp_svc_info {
	__u8 addr[16];
	__u16 port;
	__u16 family;
	__u8 protos;     /* bit 0: tcp, bit 1: udp */
	__u8 flags;
	__u16 pad;
	__u32 first_backend;
	__u32 nbackends;
	__u32 line;
	__u32 pad2;
	__u64 cgroup_id;
	__u64 netns_cookie;
};

/* One translation a socket went through: what the application asked for
 * (orig) and where the kernel sent it (real), as the hook saw them (an IPv6
 * socket keeps v4-mapped addresses). */
struct slp_xlate_entry {
	__u8 orig[16];
	__u8 real[16];
	__u16 orig_port; /* host order */
	__u16 real_port;
	__u8 kind;       /* enum slp_xlate_kind; 0 = unused */
	__u8 gen;
	__u16 family;    /* SLP_XLATE_ORIG_DST: family of orig (v4 in 4 bytes); else 0 */
	__u32 service;   /* index within gen */
	__u32 backend;   /* index within gen */
};

/* Socket-local storage (`slp_xlate`): the kernel frees it with the socket;
 * sock_release deletes it first so `slp_xlate_stats` can count live entries. */
struct slp_sock_xlate {
	__u32 next;      /* entry replaced when all are used */
	__u32 state_cb;  /* redirect subscribed the socket to sock_ops STATE_CB */
	struct slp_xlate_entry e[SLP_XLATE_ENTRIES];
};

/* `slp_watch` element 0: CLOCK_MONOTONIC ns until which translations are
 * emitted as SLP_EV_TRANSLATE (a reader renews it while it runs, so a killed
 * one stops the records within a second). */

/* `slp_xlate_stats` array indexes. */
enum slp_xlate_stat {
	SLP_XS_LIVE = 0, /* sockets holding translation state now */
	SLP_XS_MADE = 1, /* sockets that ever got translation state */
	SLP_XS_COUNT = 2,
};

/* ---- redirect: outbound connections to a local proxy ------------------- */

enum slp_redir_limit {
	SLP_MAX_REDIRECTS = 64,    /* [[redirect]] entries per policy */
	SLP_REDIR_CIDRS = 8,       /* destination and exclusion prefixes per entry */
	SLP_REDIR_EXEMPT = 4,      /* exempt cgroups, exempt uids, excluded port ranges */
	SLP_REDIR_PAIRS = 65536,   /* connections between connect and the proxy's accept */
	SLP_SO_ORIGINAL_DST = 80,  /* SOL_IP SO_ORIGINAL_DST = SOL_IPV6 IP6T_SO_ORIGINAL_DST */
};

/* One destination prefix: (dst & mask) == addr. IPv4 in the first 4 bytes. */
struct slp_redir_cidr {
	__u8 addr[16];
	__u8 mask[16];
	__u16 family;
	__u8 exclude;    /* 1: never redirected */
	__u8 pad;
};

/* `slp_redirects` array, index gen * SLP_MAX_REDIRECTS + i; the first entry
 * with line 0 ends the list. */
struct slp_redirect {
	__u32 line;         /* in the policy file; 0 = unused */
	__u8 protos;        /* bit 0: tcp, bit 1: udp */
	__u8 ncidrs;
	__u8 nexempt_cg;
	__u8 nexempt_uid;
	__u16 port_lo;      /* host order, inclusive */
	__u16 port_hi;
	__u16 xport_lo[SLP_REDIR_EXEMPT]; /* excluded port ranges */
	__u16 xport_hi[SLP_REDIR_EXEMPT];
	__u8 nxports;
	__u8 pad[3];
	__u16 cgroup_level;
	__u16 exempt_level[SLP_REDIR_EXEMPT];
	__u16 pad2;
	__u64 cgroup_id;    /* scope: tasks in this cgroup or below */
	__u64 exempt_cg[SLP_REDIR_EXEMPT]; /* the proxy's cgroups: never redirected */
	__u32 exempt_uid[SLP_REDIR_EXEMPT];
	__u64 netns_cookie; /* sockets of this network namespace only */
	__u8 proxy4[4];     /* 0.0.0.0:0 = no IPv4 proxy */
	__u16 proxy4_port;
	__u16 proxy6_port;  /* 0 = no IPv6 proxy */
	__u8 proxy6[16];
	struct slp_redir_cidr cidrs[SLP_REDIR_CIDRS];
};

/* `slp_redir_pairs` LRU key: a redirected connection as the proxy's accepted
 * socket sees it. A v4-mapped pair is kept in its IPv4 form. */
struct slp_redir_key {
	__u8 client[16];
	__u8 proxy[16];
	__u16 client_port;  /* host order */
	__u16 proxy_port;
	__u16 family;
	__u16 pad;
	__u64 netns_cookie;
};

struct slp_redir_orig {
	__u8 addr[16];
	__u16 port;         /* host order */
	__u16 family;
	__u32 rule;         /* index within its generation */
};

#endif
