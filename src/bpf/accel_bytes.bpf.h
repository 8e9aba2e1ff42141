/* `slp_accel_bytes`: what sk_msg delivered to each hashed end's ingress queue,
 * filed under that end's sockhash key. Written by the policy object (accel.bpf.h),
 * read by the tracer (conn.bpf.h, tcp_accel_exact) through the pinned map; one
 * definition so both objects' maps match. A pair's entries go with its sockets
 * when no tracer reads them (enum slp_accel_mark); LRU otherwise. */
#ifndef SOCKLENS_ACCEL_BYTES_BPF_H
#define SOCKLENS_ACCEL_BYTES_BPF_H

#include "accel.h"

#define SLP_SK_USER_DATA_PSOCK 4 /* include/net/sock.h: sk_user_data holds a psock */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SLP_ACCEL_MAX_SOCKS);
	__type(key, struct slp_accel_key);
	__type(value, struct slp_accel_bytes);
} slp_accel_bytes SEC(".maps");

/* The key the peer of `own` is filed under. */
static __always_inline void accel_peer_key(const struct slp_accel_key *own, struct slp_accel_key *peer)
{
	__builtin_memcpy(peer->laddr, own->raddr, 16);
	__builtin_memcpy(peer->raddr, own->laddr, 16);
	peer->lport = own->rport;
	peer->rport = own->lport;
	peer->family = own->family;
	peer->pad = 0;
	peer->netns = own->netns;
}

/* Whether a tracer reads the counts now (its lease, the all-zero key). */
static __always_inline bool accel_reader(void)
{
	struct slp_accel_key k = {};
	struct slp_accel_bytes *l = bpf_map_lookup_elem(&slp_accel_bytes, &k);

	return l && l->delivered > bpf_ktime_get_ns();
}

/* Both entries of a pair, once nobody needs them. */
static __always_inline void accel_forget(const struct slp_accel_key *own,
					 const struct slp_accel_key *peer)
{
	bpf_map_delete_elem(&slp_accel_bytes, own);
	bpf_map_delete_elem(&slp_accel_bytes, peer);
}

/* Bytes redirected to a hashed end and still queued in its psock; -1 when not
 * known: no psock, or one without msg_tot_len (6.12 before .75) holding some. */
static __always_inline long accel_queued(struct sock *sk)
{
	unsigned long ud = (unsigned long)BPF_CORE_READ(sk, sk_user_data);
	struct sk_psock *psock = (struct sk_psock *)(ud & ~7UL);

	if (!(ud & SLP_SK_USER_DATA_PSOCK) || !psock)
		return -1;
	if (bpf_core_field_exists(struct sk_psock, msg_tot_len))
		return BPF_CORE_READ(psock, msg_tot_len);
	if ((unsigned long)BPF_CORE_READ(psock, ingress_msg.next) ==
	    (unsigned long)psock + bpf_core_field_offset(struct sk_psock, ingress_msg))
		return 0;
	return -1;
}

/* What the application of an end with `delivered` bytes redirected to it read. */
static __always_inline bool accel_read(struct sock *sk, __u64 delivered, __u64 *read)
{
	long queued = accel_queued(sk);

	if (queued < 0 || (__u64)queued > delivered)
		return false;
	*read = delivered - queued;
	return true;
}

#endif
