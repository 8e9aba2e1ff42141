/* Redirect: a matching TCP connect is sent to a local proxy (connect4/6), the
 * connection is paired with the proxy's accepted socket (sock_ops), and the
 * proxy reads the original destination with getsockopt SO_ORIGINAL_DST.
 * Included by policy.bpf.c after services.bpf.h. Design: docs/redirect.md. */
#ifndef SOCKLENS_REDIRECT_BPF_H
#define SOCKLENS_REDIRECT_BPF_H

#define SLP_SOL_IP 0
#define SLP_SOL_IPV6 41
#define SLP_EINVAL 22
#define SLP_IPPROTO_UDP 17

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_REDIRECTS);
	__type(key, __u32);
	__type(value, struct slp_redirect);
} slp_redirects SEC(".maps");

/* gen * SLP_MAX_REDIRECTS + rule: connections redirected by that rule. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * SLP_MAX_REDIRECTS);
	__type(key, __u32);
	__type(value, __u64);
} slp_redir_counters SEC(".maps");

/* Between the client's SYN and the proxy's accept only: the proxy's side
 * claims (deletes) the entry, the client's TCP_CLOSE deletes an unclaimed
 * one. LRU so a burst of connections nobody closes cannot fill it for good. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SLP_REDIR_PAIRS);
	__type(key, struct slp_redir_key);
	__type(value, struct slp_redir_orig);
} slp_redir_pairs SEC(".maps");

struct redir_walk {
	struct sa_view v;   /* the destination, v4-mapped folded to IPv4 */
	__u32 gen;
	__u32 uid;
	__u64 netns;
	__s32 hit;
	__u8 proto;
};

static __always_inline bool prefix_has(const struct slp_redir_cidr *c, const __u8 *a)
{
	const __u32 *x = (const __u32 *)a, *m = (const __u32 *)c->mask,
		    *p = (const __u32 *)c->addr;

	return (x[0] & m[0]) == p[0] && (x[1] & m[1]) == p[1] && (x[2] & m[2]) == p[2] &&
	       (x[3] & m[3]) == p[3];
}

static long redir_step(__u32 i, void *data)
{
	struct redir_walk *w = data;
	__u32 idx = w->gen * SLP_MAX_REDIRECTS + i;
	struct slp_redirect *r = bpf_map_lookup_elem(&slp_redirects, &idx);
	bool in = false;
	__u32 j;

	if (!r || !r->line)
		return 1;
	if (!(r->protos & (w->proto == SLP_IPPROTO_TCP ? 1 : w->proto == SLP_IPPROTO_UDP ? 2 : 0)))
		return 0;
	if (w->v.port < r->port_lo || w->v.port > r->port_hi)
		return 0;
	if (r->netns_cookie != w->netns)
		return 0;
	if (w->v.family == AF_INET ? !r->proxy4_port : !r->proxy6_port)
		return 0;
	for (j = 0; j < SLP_REDIR_EXEMPT; j++)
		if (j < r->nxports && w->v.port >= r->xport_lo[j] && w->v.port <= r->xport_hi[j])
			return 0;
	for (j = 0; j < SLP_REDIR_CIDRS; j++) {
		const struct slp_redir_cidr *c = &r->cidrs[j];

		if (j >= r->ncidrs)
			break;
		if (c->family != w->v.family || !prefix_has(c, w->v.addr))
			continue;
		if (c->exclude)
			return 0;
		in = true;
	}
	if (!in)
		return 0;
	if (r->cgroup_id && bpf_get_current_ancestor_cgroup_id(r->cgroup_level) != r->cgroup_id)
		return 0;
	/* The loop guard: the proxy's own connections go where they ask. */
	for (j = 0; j < SLP_REDIR_EXEMPT; j++) {
		if (j < r->nexempt_uid && r->exempt_uid[j] == w->uid)
			return 0;
		if (j < r->nexempt_cg &&
		    bpf_get_current_ancestor_cgroup_id(r->exempt_level[j]) == r->exempt_cg[j])
			return 0;
	}
	w->hit = i;
	return 1;
}

/* connect4/6 and sendmsg4/6 (UDP): a destination a rule covers goes to that
 * rule's proxy; the socket remembers the original, so getpeername and
 * recvmsg (a UDP reply from the proxy) still show it. */
static __always_inline void redirect_fwd(struct bpf_sock_addr *ctx, bool v6, __u32 gen)
{
	struct redir_walk w = { .gen = gen, .hit = -1, .proto = ctx->protocol };
	struct slp_redirect *r;
	struct sa_view orig = {};
	__u8 real[16] = {};
	__u16 port;
	__u32 idx;
	bool mapped;

	if (ctx->protocol != SLP_IPPROTO_TCP && ctx->protocol != SLP_IPPROTO_UDP)
		return;
	view_addr(ctx, v6, &orig);
	mapped = v6 && v4_mapped(orig.addr);
	w.v = orig;
	if (mapped) {
		__builtin_memset(w.v.addr, 0, 16);
		__builtin_memcpy(w.v.addr, orig.addr + 12, 4);
		w.v.family = AF_INET;
	}
	w.uid = (__u32)bpf_get_current_uid_gid();
	w.netns = bpf_get_netns_cookie(ctx);
	bpf_loop(SLP_MAX_REDIRECTS, redir_step, &w, 0);
	if (w.hit < 0)
		return;
	idx = gen * SLP_MAX_REDIRECTS + (w.hit & (SLP_MAX_REDIRECTS - 1));
	r = bpf_map_lookup_elem(&slp_redirects, &idx);
	if (!r)
		return;
	if (w.v.family == AF_INET) {
		if (mapped) {
			((__u32 *)real)[2] = bpf_htonl(0xffff);
			__builtin_memcpy(real + 12, r->proxy4, 4);
		} else {
			__builtin_memcpy(real, r->proxy4, 4);
		}
		port = r->proxy4_port;
	} else {
		__builtin_memcpy(real, r->proxy6, 16);
		port = r->proxy6_port;
	}
	{
		__u64 *c = bpf_map_lookup_elem(&slp_redir_counters, &idx);

		if (c)
			*c += 1;
	}
	remember(ctx, &orig, real, port, v6, SLP_XLATE_REDIRECT, gen, w.hit, 0);
	write_addr(ctx, v6, real, port);
}

/* A sock_ops address (network order words) as 16 bytes, v4-mapped folded. */
static __always_inline __u16 ops_addr(__u8 *out, __u32 family, __u32 ip4, const __u32 *ip6)
{
	__u32 *o = (__u32 *)out;

	if (family == AF_INET) {
		o[0] = ip4;
		return AF_INET;
	}
	if (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff)) {
		o[0] = ip6[3];
		return AF_INET;
	}
	o[0] = ip6[0];
	o[1] = ip6[1];
	o[2] = ip6[2];
	o[3] = ip6[3];
	return AF_INET6;
}

static __always_inline void ops_key(struct bpf_sock_ops *ctx, struct slp_redir_key *k, bool active)
{
	__u32 l6[4] = { ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2],
			ctx->local_ip6[3] };
	__u32 r6[4] = { ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2],
			ctx->remote_ip6[3] };
	/* local_port is host order; remote_port network order in the upper half. */
	__u16 lport = (__u16)ctx->local_port, rport = (__u16)bpf_ntohl(ctx->remote_port);

	if (active) {
		k->family = ops_addr(k->client, ctx->family, ctx->local_ip4, l6);
		ops_addr(k->proxy, ctx->family, ctx->remote_ip4, r6);
		k->client_port = lport;
		k->proxy_port = rport;
	} else {
		k->family = ops_addr(k->proxy, ctx->family, ctx->local_ip4, l6);
		ops_addr(k->client, ctx->family, ctx->remote_ip4, r6);
		k->proxy_port = lport;
		k->client_port = rport;
	}
	k->netns_cookie = bpf_get_netns_cookie(ctx);
}

/* The client's SYN: record (client, proxy) -> original destination. */
static __always_inline void redirect_connect_cb(struct bpf_sock_ops *ctx)
{
	struct slp_sock_xlate *st;
	struct slp_redir_key k = {};
	struct slp_redir_orig o = {};
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&slp_xlate, sk, 0, 0);
	if (!st)
		return;
	ops_key(ctx, &k, true);
	for (__u32 i = 0; i < SLP_XLATE_ENTRIES; i++) {
		struct slp_xlate_entry *e = &st->e[i];
		__u8 real[16] = {};
		__u16 fam;

		if (e->kind != SLP_XLATE_REDIRECT || e->real_port != k.proxy_port)
			continue;
		fam = ops_addr(real, ctx->family == AF_INET ? AF_INET : AF_INET6,
			       ((__u32 *)e->real)[0], (__u32 *)e->real);
		if (fam != k.family || !same_addr(real, k.proxy, fam == AF_INET6))
			continue;
		o.family = ops_addr(o.addr, ctx->family == AF_INET ? AF_INET : AF_INET6,
				    ((__u32 *)e->orig)[0], (__u32 *)e->orig);
		o.port = e->orig_port;
		o.rule = e->service;
		bpf_map_update_elem(&slp_redir_pairs, &k, &o, BPF_ANY);
		/* Other programs' flags kept: the helper sets them all. */
		if (!(ctx->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG)) {
			st->state_cb = 1;
			bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags |
							       BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		return;
	}
}

/* The proxy's side is established: the accepted socket takes the original
 * destination into its own storage (freed with it) and the pair is dropped. */
static __always_inline void redirect_accept_cb(struct bpf_sock_ops *ctx)
{
	struct slp_redir_key k = {};
	struct slp_redir_orig *o;
	struct slp_sock_xlate *st;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return;
	ops_key(ctx, &k, false);
	o = bpf_map_lookup_elem(&slp_redir_pairs, &k);
	if (!o)
		return;
	st = bpf_sk_storage_get(&slp_xlate, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (st) {
		if (!st->e[0].kind) {
			xlate_stat(SLP_XS_LIVE, 1);
			xlate_stat(SLP_XS_MADE, 1);
		}
		__builtin_memcpy(st->e[0].orig, o->addr, 16);
		st->e[0].orig_port = o->port;
		st->e[0].family = o->family;
		st->e[0].service = o->rule;
		st->e[0].kind = SLP_XLATE_ORIG_DST;
	}
	bpf_map_delete_elem(&slp_redir_pairs, &k);
}

/* The client's socket closes (TCP_CLOSE, whatever the reason: refused, reset,
 * closed before the proxy's side was established): drop its pair if the proxy
 * never claimed it. The 4-tuple is still set when tcp_set_state calls us. */
static __always_inline void redirect_close_cb(struct bpf_sock_ops *ctx)
{
	struct slp_redir_key k = {};
	struct slp_sock_xlate *st;
	struct bpf_sock *sk = ctx->sk;

	ops_key(ctx, &k, true);
	if (ctx->args[1] == BPF_TCP_CLOSE) {
		bpf_map_delete_elem(&slp_redir_pairs, &k);
		return;
	}
	/* Claimed already: nothing left to free, so stop the state callbacks
	 * (only if redirect asked for them; another program may want them). */
	if (!sk || bpf_map_lookup_elem(&slp_redir_pairs, &k))
		return;
	st = bpf_sk_storage_get(&slp_xlate, sk, 0, 0);
	if (st && st->state_cb) {
		st->state_cb = 0;
		bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags &
						       ~BPF_SOCK_OPS_STATE_CB_FLAG);
	}
}

/* getsockopt SO_ORIGINAL_DST on a socket the proxy accepted from a redirected
 * client: answer as netfilter's getorigdst does (optlen left as the caller
 * passed it; EINVAL when it is shorter than the address). Every other call,
 * and this one on any other socket, is left exactly as the kernel answered. */
static __always_inline void serve_orig_dst(struct bpf_sockopt *ctx)
{
	struct slp_sock_xlate *st;
	struct slp_xlate_entry *e;
	struct bpf_sock *sk = ctx->sk;
	__u32 need;
	void *p;

	if (ctx->optname != SLP_SO_ORIGINAL_DST || !sk)
		return;
	if (!(ctx->level == SLP_SOL_IP && sk->family == AF_INET) &&
	    !(ctx->level == SLP_SOL_IPV6 && sk->family == AF_INET6))
		return;
	st = bpf_sk_storage_get(&slp_xlate, sk, 0, 0);
	if (!st || st->e[0].kind != SLP_XLATE_ORIG_DST)
		return;
	e = &st->e[0];
	need = sk->family == AF_INET ? 16 : 28;
	if (ctx->optlen < (int)need) {
		ctx->retval = -SLP_EINVAL;
		return;
	}
	/* Above a page the kernel shows the program only the first page and
	 * ignores its buffer unless optlen shrinks to fit. */
	if (ctx->optlen > 4096)
		ctx->optlen = need;
	p = ctx->optval;
	if (p + 28 > ctx->optval_end && sk->family == AF_INET6)
		return;
	if (p + 16 > ctx->optval_end)
		return;
	if (sk->family == AF_INET) {
		struct sockaddr_in *sin = p;

		if (e->family != AF_INET)
			return;
		__builtin_memset(sin, 0, 16);
		sin->sin_family = AF_INET;
		sin->sin_port = bpf_htons(e->orig_port);
		sin->sin_addr.s_addr = *(__u32 *)e->orig;
	} else {
		struct sockaddr_in6 *sin6 = p;
		__u32 *a = (__u32 *)&sin6->sin6_addr;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return;
		__builtin_memset(sin6, 0, 28);
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = bpf_htons(e->orig_port);
		if (e->family == AF_INET) {
			a[2] = bpf_htonl(0xffff);
			a[3] = *(__u32 *)e->orig;
		} else {
			__builtin_memcpy(a, e->orig, 16);
		}
	}
	ctx->retval = 0;
}

#endif
