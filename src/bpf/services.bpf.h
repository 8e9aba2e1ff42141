/* Services: connect-time translation of a VIP:port to one of its backends, in
 * the cgroup socket programs of policy.bpf.c (included there, after its
 * plumbing). Design and fallbacks: docs/services.md. */
#ifndef SOCKLENS_SERVICES_BPF_H
#define SOCKLENS_SERVICES_BPF_H

#define SLP_IPPROTO_TCP 6

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	/* Two generations, and tcp + udp keys per service. */
	__uint(max_entries, 4 * SLP_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slp_svc_key);
	__type(value, struct slp_svc);
} slp_svc SEC(".maps");

/* Weight slots: gen * SLP_MAX_SLOTS + slot -> backend index. A backend of
 * weight w fills w / gcd(weights) slots of its service. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} slp_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct slp_backend);
} slp_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct slp_svc_info);
} slp_svc_info SEC(".maps");

/* gen * SLP_SVC_COUNTERS + backend index: connections/first datagrams sent to
 * it; + SLP_MAX_BACKENDS + service index: picks that found no backend. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * SLP_SVC_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} slp_svc_counters SEC(".maps");

#include "xlate.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLP_XS_COUNT);
	__type(key, __u32);
	__type(value, __s64);
} slp_xlate_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} slp_watch SEC(".maps");

/* SLP_EV_TRANSLATE for each entry stored, while a reader holds the lease. */
static __always_inline void xlate_event(struct bpf_sock_addr *ctx, const struct slp_xlate_entry *x,
					__u16 family)
{
	__u32 zero = 0;
	__u64 *until = bpf_map_lookup_elem(&slp_watch, &zero);
	struct slp_event e = {};

	if (!until || !*until || bpf_ktime_get_ns() > *until)
		return;
	fill_task(&e, SLP_EV_TRANSLATE);
	e.cookie = bpf_get_socket_cookie(ctx);
	e.netns = sk_netns(ctx->sk);
	e.family = family;
	e.sock_type = ctx->type;
	e.proto = ctx->protocol;
	e.port = x->orig_port;
	e.real_port = x->real_port;
	e.steer = x->kind;
	__builtin_memcpy(e.addr, x->orig, 16);
	__builtin_memcpy(e.real_addr, x->real, 16);
	emit(&e);
}

static __always_inline void xlate_stat(__u32 which, __s64 delta)
{
	__s64 *v = bpf_map_lookup_elem(&slp_xlate_stats, &which);

	if (v)
		__sync_fetch_and_add(v, delta);
}

static __always_inline void svc_count(__u32 gen, __u32 slot)
{
	__u32 idx = gen * SLP_SVC_COUNTERS + slot;
	__u64 *c = bpf_map_lookup_elem(&slp_svc_counters, &idx);

	if (c)
		*c += 1;
}

static __always_inline bool same_addr(const __u8 *a, const __u8 *b, bool v6)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	if (!v6)
		return x[0] == y[0];
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline void write_addr(struct bpf_sock_addr *ctx, bool v6, const __u8 *a,
				       __u16 port)
{
	const __u32 *w = (const __u32 *)a;

	if (v6) {
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
	} else {
		ctx->user_ip4 = w[0];
	}
	ctx->user_port = bpf_htons(port);
}

/* Remembers one translation on the socket: the entry for the same VIP, else a
 * free one, else the oldest. */
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct sa_view *orig,
				     const __u8 *real, __u16 real_port, bool v6, __u8 kind,
				     __u32 gen, __u32 service, __u32 backend)
{
	struct slp_sock_xlate *st = bpf_sk_storage_get(&slp_xlate, ctx->sk, 0, 0);
	struct slp_xlate_entry *e = NULL;
	__u32 i;

	if (!st) {
		st = bpf_sk_storage_get(&slp_xlate, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return; /* out of memory: translated, but replies keep the backend */
		xlate_stat(SLP_XS_LIVE, 1);
		xlate_stat(SLP_XS_MADE, 1);
	}
	for (i = 0; i < SLP_XLATE_ENTRIES; i++) {
		struct slp_xlate_entry *c = &st->e[i];

		if (!c->kind || (c->orig_port == orig->port && same_addr(c->orig, orig->addr, v6))) {
			e = c;
			break;
		}
	}
	if (!e) {
		i = st->next++ % SLP_XLATE_ENTRIES;
		e = &st->e[i & (SLP_XLATE_ENTRIES - 1)];
	}
	__builtin_memcpy(e->orig, orig->addr, 16);
	__builtin_memcpy(e->real, real, 16);
	e->orig_port = orig->port;
	e->real_port = real_port;
	e->kind = kind;
	e->gen = gen;
	e->service = service;
	e->backend = backend;
	xlate_event(ctx, e, orig->family);
}

/* connect and sendmsg: a VIP:port of the generation in force is rewritten to
 * one of its backends. Returns 0 (with the errno set) when the service has no
 * backend, 2 when translated, else 1. TCP picks by weighted random; UDP by socket cookie, so one
 * socket's datagrams all reach one backend. */
static __always_inline int xlate_fwd(struct bpf_sock_addr *ctx, bool v6, __u32 gen)
{
	struct slp_svc_key k = { .gen = gen, .proto = ctx->protocol };
	struct sa_view v = {};
	struct slp_backend *be;
	struct slp_svc *svc;
	__u8 real[16] = {};
	__u32 r, idx, *slot;
	bool mapped;

	view_addr(ctx, v6, &v);
	mapped = v6 && v4_mapped(v.addr);
	k.port = v.port;
	if (v6 && !mapped) {
		k.family = AF_INET6;
		__builtin_memcpy(k.addr, v.addr, 16);
	} else {
		/* IPv4, or a dual-stack socket sending to ::ffff:VIP4: the IPv4 service. */
		k.family = AF_INET;
		__builtin_memcpy(k.addr, v.addr + (mapped ? 12 : 0), 4);
	}
	svc = bpf_map_lookup_elem(&slp_svc, &k);
	if (!svc)
		return 1;
	if (!(svc->flags & SLP_SVC_ANY_NETNS) && bpf_get_netns_cookie(ctx) != svc->netns_cookie)
		return 1;
	if (svc->cgroup_id &&
	    bpf_get_current_ancestor_cgroup_id(svc->cgroup_level) != svc->cgroup_id)
		return 1;
	if (!svc->nslots) {
		svc_count(gen, SLP_MAX_BACKENDS + svc->index);
		if (bpf_get_retval() == 0)
			bpf_set_retval(-SLP_ERRNO_NO_BACKEND);
		return 0;
	}
	if (ctx->protocol == SLP_IPPROTO_TCP) {
		r = bpf_get_prandom_u32();
	} else {
		/* Spread consecutive cookies (Fibonacci hashing). */
		__u64 c = bpf_get_socket_cookie(ctx) * 0x9E3779B97F4A7C15ULL;

		r = (__u32)(c >> 32);
	}
	idx = gen * SLP_MAX_SLOTS + svc->slot_base + r % svc->nslots;
	slot = bpf_map_lookup_elem(&slp_slots, &idx);
	if (!slot)
		return 1;
	idx = gen * SLP_MAX_BACKENDS + (*slot & (SLP_MAX_BACKENDS - 1));
	be = bpf_map_lookup_elem(&slp_backends, &idx);
	if (!be)
		return 1;
	svc_count(gen, *slot & (SLP_MAX_BACKENDS - 1));
	if (mapped) {
		((__u32 *)real)[2] = bpf_htonl(0xffff);
		__builtin_memcpy(real + 12, be->addr, 4);
	} else {
		__builtin_memcpy(real, be->addr, 16);
	}
	remember(ctx, &v, real, be->port, v6, svc->kind, gen, svc->index, *slot);
	write_addr(ctx, v6, real, be->port);
	return 2;
}

/* recvmsg and getpeername: an address this socket was translated to reads as
 * the address the application asked for. */
static __always_inline void xlate_rev(struct bpf_sock_addr *ctx, bool v6)
{
	struct slp_sock_xlate *st = bpf_sk_storage_get(&slp_xlate, ctx->sk, 0, 0);
	struct sa_view v = {};

	if (!st)
		return;
	view_addr(ctx, v6, &v);
	for (__u32 i = 0; i < SLP_XLATE_ENTRIES; i++) {
		struct slp_xlate_entry *e = &st->e[i];

		if (!e->kind || e->kind == SLP_XLATE_ORIG_DST || e->real_port != v.port ||
		    !same_addr(e->real, v.addr, v6))
			continue;
		write_addr(ctx, v6, e->orig, e->orig_port);
		return;
	}
}

/* sock_release: the kernel frees the storage with the socket (cgroup sock
 * programs may not delete it); forget the translations now and count the
 * socket out, so `slp_xlate_stats` counts open translated sockets exactly. */
static __always_inline void xlate_release(struct bpf_sock *sk)
{
	struct slp_sock_xlate *st = bpf_sk_storage_get(&slp_xlate, sk, 0, 0);

	if (!st || !st->e[0].kind)
		return;
	for (__u32 i = 0; i < SLP_XLATE_ENTRIES; i++)
		st->e[i].kind = 0;
	xlate_stat(SLP_XS_LIVE, -1);
}

#endif
