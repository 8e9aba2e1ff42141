// SPDX-License-Identifier: GPL-2.0
/* cgroup socket programs: one object that both observes the cgroup socket hooks
 * (`socklens trace --events sock_create,connect,...`, loaded unpinned with
 * `observe` set) and enforces the socket policy (`socklens policy apply`, loaded
 * with `enforce` set, maps and links pinned under /sys/fs/bpf/socklens/policy).
 *
 * Every program returns 1 ("no objection") unless the policy denies the call, so
 * with multi-attach our verdict only ever narrows what other programs allow. A
 * denial sets the errno with bpf_set_retval, unless an earlier program already
 * rejected the call with its own errno. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "policy.h"
#include "wakeup.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10

/* Force the skeleton to emit the shared types for Rust. */
struct slp_event _slp_event = {};
struct slp_config _slp_config = {};
struct slp_cgroup_key _slp_cgroup_key = {};
struct slp_scope _slp_scope = {};
struct slp_scope_info _slp_scope_info = {};
struct slp_lpm_key _slp_lpm_key = {};
struct slp_prefix_rules _slp_prefix_rules = {};
struct slp_create_key _slp_create_key = {};
struct slp_create_rule _slp_create_rule = {};
struct slp_rule_info _slp_rule_info = {};
enum slp_event_kind _slp_event_kind = SLP_EV_SOCK_CREATE;
enum slp_op _slp_op = SLP_OP_CREATE;
enum slp_action _slp_action = SLP_ALLOW;
enum slp_mode _slp_mode = SLP_MODE_ENFORCE;
enum slp_errno _slp_errno = SLP_ERRNO_CREATE;
enum slp_limit _slp_limit = SLP_MAX_RULES;
struct slp_svc_key _slp_svc_key = {};
struct slp_svc _slp_svc = {};
struct slp_backend _slp_backend = {};
struct slp_svc_info _slp_svc_info = {};
struct slp_sock_xlate _slp_sock_xlate = {};
enum slp_svc_limit _slp_svc_limit = SLP_MAX_SERVICES;
enum slp_xlate_kind _slp_xlate_kind = SLP_XLATE_SERVICE;
enum slp_svc_flags _slp_svc_flags = SLP_SVC_ANY_NETNS;
enum slp_xlate_stat _slp_xlate_stat = SLP_XS_LIVE;
enum slp_backend_flags _slp_backend_flags = SLP_BE_TERMINATE;
struct slp_redirect _slp_redirect = {};
struct slp_redir_key _slp_redir_key = {};
struct slp_redir_orig _slp_redir_orig = {};
enum slp_redir_limit _slp_redir_limit = SLP_MAX_REDIRECTS;

/* Written by the loader before load and frozen. */
const volatile bool observe = false; /* emit an event per observed call (trace) */
const volatile bool enforce = false; /* judge calls against the policy maps */
const volatile __u32 observe_mask = 0; /* bits (1 << (kind - SLP_EV_SOCK_CREATE)) */
const volatile __u32 filter_pid = 0;
const volatile __u32 filter_netns = 0;
const volatile __u16 filter_family = 0;
const volatile bool filter_comm = false;
const volatile __u8 filter_comm_value[SLP_COMM_LEN] = {};

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct slp_config);
} slp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * SLP_MAX_CGROUPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slp_cgroup_key);
	__type(value, struct slp_scope);
} slp_scope_of SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_SCOPES);
	__type(key, __u32);
	__type(value, struct slp_scope_info);
} slp_scopes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 2 * SLP_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slp_lpm_key);
	__type(value, struct slp_prefix_rules);
} slp_lpm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * SLP_CREATE_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slp_create_key);
	__type(value, struct slp_create_rule);
} slp_create SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_RULES);
	__type(key, __u32);
	__type(value, struct slp_rule_info);
} slp_rules SEC(".maps");

/* Decisions per rule (and per scope default), index gen * SLP_COUNTER_SLOTS + slot. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * SLP_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} slp_counters SEC(".maps");

#define SLP_EVENTS_BYTES (1 << 20)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, SLP_EVENTS_BYTES);
} slp_events SEC(".maps");

/* Slot 0: records slp_events could not take. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} slp_lost SEC(".maps");

/* When each socket was created, for sock_release's lifetime (trace only). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} slp_born SEC(".maps");

/* ---- plumbing ---------------------------------------------------------- */

static __always_inline void emit(struct slp_event *e)
{
	/* The reader wakes once per quarter of the ring's backlog (wakeup.bpf.h). */
	__u64 backlog = bpf_ringbuf_query(&slp_events, BPF_RB_AVAIL_DATA);

	if (bpf_ringbuf_output(&slp_events, e, sizeof(*e),
			       ringbuf_wakeup_flag(backlog, sizeof(*e), SLP_EVENTS_BYTES / 4))) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&slp_lost, &zero);

		if (lost)
			*lost += 1; /* per-CPU slot: no other writer */
	}
}

/* Network namespace inode of a socket the hook hands us (a struct sock). */
static __always_inline __u32 sk_netns(const void *sk)
{
	struct sock *s;

	if (!bpf_rdonly_cast)
		return 0;
	s = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct sock));
	return BPF_CORE_READ(s, __sk_common.skc_net.net, ns.inum);
}

static __always_inline bool wanted(__u32 kind, __u16 family)
{
	if (!(observe_mask & (1U << (kind - SLP_EV_SOCK_CREATE))))
		return false;
	if (family != AF_INET && family != AF_INET6)
		return false;
	if (filter_family && family != filter_family)
		return false;
	if (filter_pid && (bpf_get_current_pid_tgid() >> 32) != filter_pid)
		return false;
	if (filter_comm) {
		__u8 comm[SLP_COMM_LEN];

		bpf_get_current_comm(comm, sizeof(comm));
		for (int i = 0; i < SLP_COMM_LEN; i++) {
			if (comm[i] != filter_comm_value[i])
				return false;
			if (comm[i] == 0)
				break;
		}
	}
	return true;
}

static __always_inline void fill_task(struct slp_event *e, __u32 kind)
{
	__u64 id = bpf_get_current_pid_tgid();

	e->kind = kind;
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

/* The address a sock_addr hook sees, as family + 16 bytes + host-order port. */
struct sa_view {
	__u8 addr[16];
	__u16 port;
	__u16 family;
};

static __always_inline void view_addr(struct bpf_sock_addr *ctx, bool v6, struct sa_view *v)
{
	v->port = bpf_ntohs((__u16)ctx->user_port);
	if (v6) {
		__u32 *a = (__u32 *)v->addr;

		v->family = AF_INET6;
		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
	} else {
		v->family = AF_INET;
		*(__u32 *)v->addr = ctx->user_ip4;
	}
}

/* ---- policy ------------------------------------------------------------ */

static __always_inline struct slp_config *slp_cfg(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&slp_config, &zero);
}

struct scope_walk {
	__u32 gen;
	__u32 found;
	struct slp_scope scope;
};

static long scope_step(__u32 level, void *data)
{
	struct scope_walk *w = data;
	struct slp_cgroup_key k = { .gen = w->gen };
	struct slp_scope *s;

	k.cgroup_id = bpf_get_current_ancestor_cgroup_id(level);
	if (!k.cgroup_id)
		return 1;
	s = bpf_map_lookup_elem(&slp_scope_of, &k);
	if (s) {
		/* Walking down from the root: the deepest match wins. */
		w->scope = *s;
		w->found = 1;
	}
	return 0;
}

/* The scope governing the calling task: its own cgroup (user space lists every
 * cgroup a scope covered at apply time), else the deepest scoped ancestor (for
 * cgroups made since). */
static __always_inline bool find_scope(__u32 gen, struct slp_scope *out)
{
	struct slp_cgroup_key k = { .gen = gen };
	struct scope_walk w = { .gen = gen };
	struct slp_config *cfg = slp_cfg();
	struct slp_scope *s;

	/* A file of services or redirects only: no cgroup walk on every call. */
	if (cfg && !cfg->nscopes[gen & 1])
		return false;
	k.cgroup_id = bpf_get_current_cgroup_id();
	s = bpf_map_lookup_elem(&slp_scope_of, &k);
	if (s) {
		*out = *s;
		return true;
	}
	bpf_loop(SLP_MAX_DEPTH, scope_step, &w, 0);
	if (!w.found)
		return false;
	*out = w.scope;
	return true;
}

static __always_inline void count(__u32 gen, __u32 slot)
{
	__u32 idx = gen * SLP_COUNTER_SLOTS + slot;
	__u64 *c = bpf_map_lookup_elem(&slp_counters, &idx);

	if (c)
		*c += 1;
}

/* A deny decision: 1 lets the call through (audit), 0 denies it. */
static __always_inline int deny(struct slp_event *e, const struct slp_scope *sc, __u32 rule_id,
				__u8 op, __u8 action, int err)
{
	e->rule_id = rule_id;
	e->op = op;
	e->mode = sc->mode;
	e->action = action;
	if (sc->mode == SLP_MODE_AUDIT) {
		fill_task(e, SLP_EV_POLICY_AUDIT);
		emit(e);
		return 1;
	}
	/* Keep the errno of a program that rejected the call before us. */
	if (bpf_get_retval() == 0)
		bpf_set_retval(-err);
	e->ret = -err;
	fill_task(e, SLP_EV_POLICY_DENY);
	emit(e);
	return 0;
}

struct lpm_walk {
	struct slp_lpm_key key;
	__u16 port;
	__u8 proto;
	__u8 found;
	struct slp_port_rule hit;
};

/* One prefix: the longest one matching key (up to key.prefixlen). If none of its
 * rules covers the port and protocol, go on with the next shorter prefix. */
static long lpm_step(__u32 i, void *data)
{
	struct lpm_walk *w = data;
	struct slp_prefix_rules *pr = bpf_map_lookup_elem(&slp_lpm, &w->key);
	__u32 n;

	if (!pr)
		return 1;
	n = pr->count;
	for (__u32 j = 0; j < SLP_PORT_RULES; j++) {
		struct slp_port_rule *r = &pr->rules[j];

		if (j >= n)
			break;
		if (w->port < r->port_lo || w->port > r->port_hi)
			continue;
		if (r->proto && r->proto != w->proto)
			continue;
		w->hit = *r;
		w->found = 1;
		return 1;
	}
	if (pr->prefixlen <= SLP_KEY_HDR_BITS)
		return 1;
	w->key.prefixlen = pr->prefixlen - 1;
	return 0;
}

static __always_inline bool v4_mapped(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

/* bind, connect and sendmsg: the most specific prefix with a rule covering the
 * port and protocol decides; else the scope's default. */
static __always_inline int judge_addr(struct bpf_sock_addr *ctx, const struct sa_view *v, __u8 op4,
				      __u8 op6, int err)
{
	struct slp_event e = {};
	struct lpm_walk w = {};
	struct slp_config *cfg = slp_cfg();
	struct slp_scope sc;
	__u32 gen;
	__u8 op;

	if (!cfg)
		return 1;
	gen = cfg->gen & 1;
	if (!find_scope(gen, &sc))
		return 1;
	w.key.gen = gen;
	w.key.scope = sc.index;
	w.port = v->port;
	w.proto = ctx->protocol;
	if (v->family == AF_INET6 && !v4_mapped(v->addr)) {
		op = op6;
		w.key.prefixlen = SLP_KEY_HDR_BITS + 128;
		__builtin_memcpy(w.key.addr, v->addr, 16);
	} else {
		/* IPv4, or IPv4-mapped IPv6 on a dual-stack socket: the IPv4 rules. */
		op = op4;
		w.key.prefixlen = SLP_KEY_HDR_BITS + 32;
		if (v->family == AF_INET6)
			__builtin_memcpy(w.key.addr, v->addr + 12, 4);
		else
			__builtin_memcpy(w.key.addr, v->addr, 4);
	}
	w.key.op = op;
	if (sc.ops & (1U << op))
		bpf_loop(SLP_KEY_HDR_BITS + 129, lpm_step, &w, 0);
	if (!w.found) {
		w.hit.action = sc.dflt;
		w.hit.slot = SLP_MAX_RULES + sc.index;
		w.hit.rule_id = SLP_DEFAULT_RULE;
	}
	count(gen, w.hit.slot);
	if (w.hit.action != SLP_DENY)
		return 1;
	e.cookie = bpf_get_socket_cookie(ctx);
	e.netns = sk_netns(ctx->sk);
	e.family = v->family;
	e.sock_type = ctx->type;
	e.proto = ctx->protocol;
	e.port = v->port;
	__builtin_memcpy(e.addr, v->addr, 16);
	return deny(&e, &sc, w.hit.rule_id, op, w.hit.action, err);
}

/* One group of equally specific create keys: deny wins over allow. */
static __always_inline void create_probe(struct slp_create_key *k, __u8 shapes, __u16 family,
					 __u8 type, __u16 proto, struct slp_create_rule *best)
{
	struct slp_create_rule *r;
	__u32 shape = (family != SLP_ANY_FAMILY) * 4 + (type != SLP_ANY_TYPE) * 2 +
		      (proto != SLP_ANY_PROTO);

	if (!(shapes & (1U << shape)))
		return;
	k->family = family;
	k->type = type;
	k->proto = proto;
	r = bpf_map_lookup_elem(&slp_create, k);
	if (r && (!best->action || (r->action == SLP_DENY && best->action != SLP_DENY)))
		*best = *r;
}

static __always_inline int judge_create(struct bpf_sock *ctx)
{
	struct slp_create_rule best = {};
	struct slp_create_key k = {};
	struct slp_event e = {};
	struct slp_config *cfg = slp_cfg();
	struct slp_scope sc;
	__u16 f = ctx->family, p = ctx->protocol;
	__u8 t = ctx->type;
	__u32 gen;

	if (!cfg)
		return 1;
	gen = cfg->gen & 1;
	if (!find_scope(gen, &sc))
		return 1;
	k.gen = gen;
	k.scope = sc.index;
	/* Most fields given first; within a group deny wins. */
	create_probe(&k, sc.create_shapes, f, t, p, &best);
	if (!best.action) {
		create_probe(&k, sc.create_shapes, f, t, SLP_ANY_PROTO, &best);
		create_probe(&k, sc.create_shapes, f, SLP_ANY_TYPE, p, &best);
		create_probe(&k, sc.create_shapes, SLP_ANY_FAMILY, t, p, &best);
	}
	if (!best.action) {
		create_probe(&k, sc.create_shapes, f, SLP_ANY_TYPE, SLP_ANY_PROTO, &best);
		create_probe(&k, sc.create_shapes, SLP_ANY_FAMILY, t, SLP_ANY_PROTO, &best);
		create_probe(&k, sc.create_shapes, SLP_ANY_FAMILY, SLP_ANY_TYPE, p, &best);
	}
	if (!best.action)
		create_probe(&k, sc.create_shapes, SLP_ANY_FAMILY, SLP_ANY_TYPE, SLP_ANY_PROTO,
			     &best);
	if (!best.action) {
		best.action = sc.dflt;
		best.slot = SLP_MAX_RULES + sc.index;
		best.rule_id = SLP_DEFAULT_RULE;
	}
	count(gen, best.slot);
	if (best.action != SLP_DENY)
		return 1;
	e.cookie = bpf_get_socket_cookie(ctx);
	e.netns = sk_netns(ctx);
	e.family = f;
	e.sock_type = t;
	e.proto = p;
	return deny(&e, &sc, best.rule_id, SLP_OP_CREATE, best.action, SLP_ERRNO_CREATE);
}

#include "services.bpf.h"
#include "redirect.bpf.h"
#include "accel.bpf.h"

/* ---- observing --------------------------------------------------------- */

static __always_inline void observe_addr(struct bpf_sock_addr *ctx, __u32 kind, bool v6)
{
	struct slp_event e = {};
	struct sa_view v = {};

	view_addr(ctx, v6, &v);
	if (!wanted(kind, v.family))
		return;
	e.netns = sk_netns(ctx->sk);
	if (filter_netns && e.netns != filter_netns)
		return;
	fill_task(&e, kind);
	e.cookie = bpf_get_socket_cookie(ctx);
	e.family = v.family;
	e.sock_type = ctx->type;
	e.proto = ctx->protocol;
	e.port = v.port;
	__builtin_memcpy(e.addr, v.addr, 16);
	emit(&e);
}

static __always_inline void observe_sock(struct bpf_sock *ctx, __u32 kind)
{
	struct slp_event e = {};
	__u64 now = bpf_ktime_get_ns();
	__u64 *born;

	/* Birth times are kept whenever sock_release is observed. */
	if (kind == SLP_EV_SOCK_CREATE &&
	    (observe_mask & (1U << (SLP_EV_SOCK_RELEASE - SLP_EV_SOCK_CREATE)))) {
		born = bpf_sk_storage_get(&slp_born, ctx, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (born)
			*born = now;
	}
	if (!wanted(kind, ctx->family))
		return;
	e.netns = sk_netns(ctx);
	if (filter_netns && e.netns != filter_netns)
		return;
	fill_task(&e, kind);
	e.ts_ns = now;
	e.cookie = bpf_get_socket_cookie(ctx);
	e.family = ctx->family;
	e.sock_type = ctx->type;
	e.proto = ctx->protocol;
	if (kind == SLP_EV_SOCK_RELEASE) {
		born = bpf_sk_storage_get(&slp_born, ctx, 0, 0);
		if (born && *born && now > *born)
			e.lifetime_ns = now - *born;
		/* The local address and port the socket held (the context offers
		 * them to post_bind programs only: read the socket itself). */
		if (bpf_rdonly_cast) {
			struct sock *s = bpf_rdonly_cast(ctx, bpf_core_type_id_kernel(struct sock));

			e.port = BPF_CORE_READ(s, __sk_common.skc_num);
			if (e.family == AF_INET6)
				BPF_CORE_READ_INTO(&e.addr, s,
						   __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
			else
				BPF_CORE_READ_INTO(&e.addr, s, __sk_common.skc_rcv_saddr);
		}
	}
	emit(&e);
}

/* ---- programs ---------------------------------------------------------- */

SEC("cgroup/sock_create")
int slp_sock_create(struct bpf_sock *ctx)
{
	if (observe)
		observe_sock(ctx, SLP_EV_SOCK_CREATE);
	if (enforce)
		return judge_create(ctx);
	return 1;
}

SEC("cgroup/sock_release")
int slp_sock_release(struct bpf_sock *ctx)
{
	if (observe)
		observe_sock(ctx, SLP_EV_SOCK_RELEASE);
	if (enforce)
		xlate_release(ctx);
	return 1;
}

/* connect and sendmsg translate a service address first; the policy then judges
 * the backend, the address the connection really goes to. */
static __always_inline int addr_hook(struct bpf_sock_addr *ctx, bool v6, __u32 kind, __u8 op4,
				     __u8 op6, int err, bool xlate)
{
	struct slp_config *cfg;
	struct sa_view v = {};

	if (observe && kind)
		observe_addr(ctx, kind, v6);
	if (!enforce)
		return 1;
	cfg = slp_cfg();
	if (xlate && cfg) {
		int x = xlate_fwd(ctx, v6, cfg->gen & 1);

		if (!x)
			return 0;
		/* A connect or send no service translated may go to a local proxy. */
		if (x == 1)
			redirect_fwd(ctx, v6, cfg->gen & 1);
	}
	view_addr(ctx, v6, &v);
	return judge_addr(ctx, &v, op4, op6, err);
}

SEC("cgroup/bind4")
int slp_bind4(struct bpf_sock_addr *ctx)
{
	return addr_hook(ctx, false, 0, SLP_OP_BIND4, SLP_OP_BIND6, SLP_ERRNO_BIND, false);
}

SEC("cgroup/bind6")
int slp_bind6(struct bpf_sock_addr *ctx)
{
	return addr_hook(ctx, true, 0, SLP_OP_BIND4, SLP_OP_BIND6, SLP_ERRNO_BIND, false);
}

SEC("cgroup/connect4")
int slp_connect4(struct bpf_sock_addr *ctx)
{
	return addr_hook(ctx, false, SLP_EV_CONNECT, SLP_OP_CONNECT4, SLP_OP_CONNECT6,
			 SLP_ERRNO_CONNECT, true);
}

SEC("cgroup/connect6")
int slp_connect6(struct bpf_sock_addr *ctx)
{
	return addr_hook(ctx, true, SLP_EV_CONNECT, SLP_OP_CONNECT4, SLP_OP_CONNECT6,
			 SLP_ERRNO_CONNECT, true);
}

SEC("cgroup/sendmsg4")
int slp_sendmsg4(struct bpf_sock_addr *ctx)
{
	return addr_hook(ctx, false, SLP_EV_SENDMSG, SLP_OP_SENDMSG4, SLP_OP_SENDMSG6,
			 SLP_ERRNO_SENDMSG, true);
}

SEC("cgroup/sendmsg6")
int slp_sendmsg6(struct bpf_sock_addr *ctx)
{
	return addr_hook(ctx, true, SLP_EV_SENDMSG, SLP_OP_SENDMSG4, SLP_OP_SENDMSG6,
			 SLP_ERRNO_SENDMSG, true);
}

/* Reverse-translating hooks (the kernel requires them to return 1). Trace sees
 * the address the kernel gives before translation: the backend. */

static __always_inline int rev_hook(struct bpf_sock_addr *ctx, bool v6, __u32 kind)
{
	if (observe)
		observe_addr(ctx, kind, v6);
	if (enforce)
		xlate_rev(ctx, v6);
	return 1;
}

SEC("cgroup/recvmsg4")
int slp_recvmsg4(struct bpf_sock_addr *ctx)
{
	return rev_hook(ctx, false, SLP_EV_RECVMSG);
}

SEC("cgroup/recvmsg6")
int slp_recvmsg6(struct bpf_sock_addr *ctx)
{
	return rev_hook(ctx, true, SLP_EV_RECVMSG);
}

SEC("cgroup/getpeername4")
int slp_getpeername4(struct bpf_sock_addr *ctx)
{
	return rev_hook(ctx, false, SLP_EV_GETPEERNAME);
}

SEC("cgroup/getpeername6")
int slp_getpeername6(struct bpf_sock_addr *ctx)
{
	return rev_hook(ctx, true, SLP_EV_GETPEERNAME);
}

/* getsockopt runs for every getsockopt in the cgroup, iptables' included: it only
 * reads level, optname and the kernel's return, never touches optval or optlen,
 * and always returns 1 so every caller gets exactly what the kernel gave it. */
SEC("cgroup/getsockopt")
int slp_getsockopt(struct bpf_sockopt *ctx)
{
	struct slp_event e = {};
	struct bpf_sock *sk = ctx->sk;

	if (!observe || !sk)
		return 1;
	if (!wanted(SLP_EV_GETSOCKOPT, sk->family))
		return 1;
	e.netns = sk_netns(sk);
	if (filter_netns && e.netns != filter_netns)
		return 1;
	fill_task(&e, SLP_EV_GETSOCKOPT);
	e.family = sk->family;
	e.sock_type = sk->type;
	e.proto = sk->protocol;
	e.level = ctx->level;
	e.optname = ctx->optname;
	e.ret = ctx->retval;
	emit(&e);
	return 1;
}

/* Redirect's half of the policy (docs/redirect.md): answers SO_ORIGINAL_DST on
 * a proxy's accepted socket and returns 1 with everything else untouched. */
SEC("cgroup/getsockopt")
int slp_orig_dst(struct bpf_sockopt *ctx)
{
	if (enforce)
		serve_orig_dst(ctx);
	return 1;
}

/* Pairs a redirected client's connection with the proxy's accepted socket. */
SEC("sockops")
int slp_redir_sockops(struct bpf_sock_ops *ctx)
{
	if (!enforce)
		return 1;
	if (ctx->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
		redirect_connect_cb(ctx);
	else if (ctx->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		redirect_accept_cb(ctx);
	else if (ctx->op == BPF_SOCK_OPS_STATE_CB)
		redirect_close_cb(ctx);
	return 1;
}
