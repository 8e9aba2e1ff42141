/* Local TCP acceleration: sock_ops puts both ends of a same-netns loopback TCP
 * connection into a sockhash at ESTABLISHED, and sk_msg hands each message to the
 * peer's receive queue (bpf_msg_redirect_hash, BPF_F_INGRESS). Included by
 * policy.bpf.c: scopes follow the policy's generation flip. Design and the kernel
 * traps each guard answers: docs/accelerate.md. */
#ifndef SOCKLENS_ACCEL_BPF_H
#define SOCKLENS_ACCEL_BPF_H

#include "accel.h"
#include "accel_bytes.bpf.h"

#define SLP_IFF_LOOPBACK 8
#define SLP_SOCK_ZEROCOPY 18
#define SLP_SOL_TCP 6
#define SLP_TCP_ULP 31

struct slp_accel_key _slp_accel_key = {};
struct slp_accel_cg_key _slp_accel_cg_key = {};
struct slp_accel_scope _slp_accel_scope = {};
struct slp_accel_info _slp_accel_info = {};
struct slp_accel_bytes _slp_accel_bytes = {};
struct slp_accel_end _slp_accel_end = {};
enum slp_accel_limit _slp_accel_limit = SLP_ACCEL_MAX_SCOPES;
enum slp_accel_stat _slp_accel_stat = SLP_AS_PAIRED;

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SLP_ACCEL_MAX_SOCKS);
	__type(key, struct slp_accel_key);
	__type(value, __u64);
} slp_accel_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * SLP_ACCEL_MAX_CGROUPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slp_accel_cg_key);
	__type(value, struct slp_accel_scope);
} slp_accel_of SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * SLP_ACCEL_MAX_SCOPES);
	__type(key, __u32);
	__type(value, struct slp_accel_info);
} slp_accel_info SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct slp_accel_end);
} slp_accel_end SEC(".maps");

/* Active ends that joined and wait for their passive end: sock_ops cannot hold
 * a socket looked up in the sockhash (no bpf_sk_release there). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct slp_accel_key);
	__type(value, __u64);
} slp_accel_pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLP_AS_NSTATS);
	__type(key, __u32);
	__type(value, __u64);
} slp_accel_stats SEC(".maps");

static __always_inline void accel_count(__u32 stat, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&slp_accel_stats, &stat);

	if (v)
		*v += n;
}

/* This end's key, read from the socket itself (the same code for sock_ops and
 * sk_msg; their contexts lay the addresses out differently). */
static __always_inline void accel_own_key(struct tcp_sock *tp, __u64 netns, struct slp_accel_key *k)
{
	struct sock_common *c = &tp->inet_conn.icsk_inet.sk.__sk_common;

	__builtin_memset(k, 0, sizeof(*k));
	k->family = BPF_CORE_READ(c, skc_family);
	if (k->family == AF_INET) {
		__u32 l = BPF_CORE_READ(c, skc_rcv_saddr), r = BPF_CORE_READ(c, skc_daddr);

		__builtin_memcpy(k->laddr, &l, 4);
		__builtin_memcpy(k->raddr, &r, 4);
	} else {
		BPF_CORE_READ_INTO(&k->laddr, c, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&k->raddr, c, skc_v6_daddr);
	}
	k->lport = BPF_CORE_READ(c, skc_num);
	k->rport = bpf_ntohs(BPF_CORE_READ(c, skc_dport));
	k->netns = netns;
}

/* Nothing of this end ever went through TCP: no byte queued past the SYN. While
 * redirecting, write_seq stays put, so this holds exactly until a message passes. */
static __always_inline bool accel_clean(struct tcp_sock *tp)
{
	return tp && tp->write_seq == tp->snd_una && tp->bytes_acked <= 1;
}

/* The [[accelerate]] entry of the socket's cgroup or its deepest entered
 * ancestor, in generation `gen`. */
static __always_inline struct slp_accel_scope *accel_scope_of(struct tcp_sock *tp, __u32 gen)
{
	struct cgroup *cg = BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.sk_cgrp_data.cgroup);
	struct slp_accel_cg_key k = { .gen = gen };

	for (int i = 0; i < SLP_MAX_DEPTH && cg; i++) {
		struct slp_accel_scope *s;

		k.cgroup_id = BPF_CORE_READ(cg, kn, id);
		s = bpf_map_lookup_elem(&slp_accel_of, &k);
		if (s)
			return s;
		struct cgroup_subsys_state *parent = BPF_CORE_READ(cg, self.parent);
		if (!parent)
			break;
		cg = BPF_CORE_READ(parent, cgroup);
	}
	return NULL;
}

/* May this end join for a connection to server port `port`? */
static __always_inline bool accel_eligible(struct tcp_sock *tp, __u16 port)
{
	__u32 zero = 0;
	struct slp_config *cfg = bpf_map_lookup_elem(&slp_config, &zero);
	struct slp_accel_scope *s;
	unsigned long flags;

	if (!cfg || !tp)
		return false;
	s = accel_scope_of(tp, cfg->gen);
	if (!s)
		return false;
	if (s->nports) {
		bool hit = false;

		for (int i = 0; i < SLP_ACCEL_MAX_PORTS; i++)
			if (i < s->nports && port >= s->lo[i] && port <= s->hi[i])
				hit = true;
		if (!hit)
			return false;
	}
	flags = BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.__sk_common.skc_flags);
	if (flags & (1UL << SLP_SOCK_ZEROCOPY)) {
		accel_count(SLP_AS_SKIP_ZEROCOPY, 1);
		return false;
	}
	/* poll on a hashed socket ignores SO_RCVLOWAT (tcp_bpf_sock_is_readable). */
	if (BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.sk_rcvlowat) > 1) {
		accel_count(SLP_AS_SKIP_RCVLOWAT, 1);
		return false;
	}
	if (BPF_CORE_READ(tp, inet_conn.icsk_ulp_ops)) {
		accel_count(SLP_AS_SKIP_ULP, 1);
		return false;
	}
	return true;
}

/* Where the release hook finds this end's counts; also the mark by which the
 * ULP guard knows socklens filed the socket (not another tool's sockmap). */
static __always_inline void accel_remember(struct bpf_sock *sk, struct tcp_sock *tp,
					   const struct slp_accel_key *own)
{
	struct slp_accel_end *e = bpf_sk_storage_get(&slp_accel_end, sk, 0,
						     BPF_SK_STORAGE_GET_F_CREATE);

	if (e) {
		e->key = *own;
		e->sk = (__u64)tp;
	}
}

SEC("sockops")
int slp_accel_sockops(struct bpf_sock_ops *ctx)
{
	struct slp_accel_key own = {}, peer = {};
	struct slp_accel_bytes mine = {}, theirs = {};
	struct bpf_sock *sk = ctx->sk;
	__u64 cookie, *pending;
	struct tcp_sock *tp;

	if (ctx->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    ctx->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (ctx->family != AF_INET && ctx->family != AF_INET6)
		return 1;
	if (!sk)
		return 1;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 1;
	accel_own_key(tp, bpf_get_netns_cookie(ctx), &own);

	if (ctx->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		/* Only towards this netns's own addresses (the route goes through lo),
		 * and not with a Fast Open SYN: its passive end is established first. */
		struct dst_entry *dst = BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.sk_dst_cache);

		if (!dst || !(BPF_CORE_READ(dst, dev, flags) & SLP_IFF_LOOPBACK))
			return 1;
		if (BPF_CORE_READ_BITFIELD_PROBED(tp, syn_fastopen))
			return 1;
		cookie = bpf_get_socket_cookie(ctx);
		if (accel_eligible(tp, own.rport) && accel_clean(tp) &&
		    bpf_sock_hash_update(ctx, &slp_accel_hash, &own, BPF_NOEXIST) == 0) {
			bpf_map_update_elem(&slp_accel_pending, &own, &cookie, BPF_ANY);
			accel_remember(sk, tp, &own);
		} else
			bpf_map_delete_elem(&slp_accel_pending, &own);
		return 1;
	}

	/* Passive end: join only next to an active end already in, when nothing has
	 * arrived through TCP; otherwise take the active end out, so no hashed socket
	 * receives through TCP (FIONREAD would miss those bytes). */
	accel_peer_key(&own, &peer);
	pending = bpf_map_lookup_elem(&slp_accel_pending, &peer);
	if (!pending)
		return 1;
	mine.peer_cookie = theirs.cookie = *pending;
	if (bpf_map_delete_elem(&slp_accel_pending, &peer) != 0)
		return 1;
	/* The counters before the join: the active end redirects from then on. */
	mine.cookie = theirs.peer_cookie = bpf_get_socket_cookie(ctx);
	if (accel_eligible(tp, own.lport) && ctx->bytes_received == 0 && accel_clean(tp) &&
	    bpf_map_update_elem(&slp_accel_bytes, &own, &mine, BPF_ANY) == 0 &&
	    bpf_map_update_elem(&slp_accel_bytes, &peer, &theirs, BPF_ANY) == 0 &&
	    bpf_sock_hash_update(ctx, &slp_accel_hash, &own, BPF_NOEXIST) == 0) {
		accel_remember(sk, tp, &own);
		accel_count(SLP_AS_PAIRED, 1);
	} else {
		bpf_map_delete_elem(&slp_accel_hash, &peer);
		accel_count(SLP_AS_UNPAIRED, 1);
	}
	return 1;
}

SEC("sk_msg")
int slp_accel_msg(struct sk_msg_md *msg)
{
	struct slp_accel_key own, peer;
	struct bpf_sock *sk = msg->sk;
	struct tcp_sock *tp = NULL;
	__u32 size = msg->size;

	if (sk)
		tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return SK_PASS;
	accel_own_key(tp, bpf_get_netns_cookie(msg), &own);
	accel_peer_key(&own, &peer);
	if (accel_clean(tp)) {
		if (bpf_msg_redirect_hash(msg, &slp_accel_hash, &peer, BPF_F_INGRESS) == SK_PASS) {
			struct slp_accel_bytes *b = bpf_map_lookup_elem(&slp_accel_bytes, &peer);

			/* Counted here, as no tracing run can be skipped. */
			if (b)
				__sync_fetch_and_add(&b->delivered, size);
			accel_count(SLP_AS_MSGS, 1);
			accel_count(SLP_AS_BYTES, size);
			return SK_PASS;
		}
	}
	accel_count(SLP_AS_PASSED, 1);
	return SK_PASS;
}

/* setsockopt(SOL_TCP, TCP_ULP) on a socket in the sockhash: refused with EPERM,
 * before the ULP exists (docs/accelerate.md, "kTLS"). TLS libraries fall back to
 * userspace TLS. Every other call goes on untouched (optval, optlen, return 1). */
SEC("cgroup/setsockopt")
int slp_accel_ulp(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (ctx->level != SLP_SOL_TCP || ctx->optname != SLP_TCP_ULP || !sk)
		return 1;
	if (!bpf_sk_storage_get(&slp_accel_end, sk, 0, 0))
		return 1;
	/* Marked but taken out since (a lone active end): no psock left. */
	if (bpf_rdonly_cast) {
		struct sock *s = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct sock));

		if (!((unsigned long)BPF_CORE_READ(s, sk_user_data) & SLP_SK_USER_DATA_PSOCK))
			return 1;
	}
	accel_count(SLP_AS_REFUSED_ULP, 1);
	return 0;
}

/* close() of a hashed end, before the kernel takes it out of the sockhash and
 * drops what is still queued: what its application read is final now, and known
 * from the psock. A cgroup program, which no run of which the kernel skips. */
SEC("cgroup/sock_release")
int slp_accel_release(struct bpf_sock *ctx)
{
	struct slp_accel_bytes *b, *p;
	struct slp_accel_key peer;
	struct slp_accel_end *e;
	__u64 read;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	e = bpf_sk_storage_get(&slp_accel_end, ctx, 0, 0);
	if (!e)
		return 1;
	b = bpf_map_lookup_elem(&slp_accel_bytes, &e->key);
	if (!b || b->cookie != bpf_get_socket_cookie(ctx))
		return 1;
	if (accel_read((struct sock *)e->sk, b->delivered, &read)) {
		b->read = read;
		b->released = 1;
	}
	b->marks |= SLP_ACCEL_GONE;
	/* The second end's close() with no tracer to report them: free the pair. */
	accel_peer_key(&e->key, &peer);
	p = bpf_map_lookup_elem(&slp_accel_bytes, &peer);
	if (p && p->cookie == b->peer_cookie && (p->marks & SLP_ACCEL_GONE) && !accel_reader())
		accel_forget(&e->key, &peer);
	return 1;
}

#endif
