// SPDX-License-Identifier: GPL-2.0
/* `terminate = true`: an iter/tcp program that resets (bpf_sock_destroy, 6.5+)
 * the TCP sockets whose translation state points at a backend an apply removed
 * or drained. It is loaded only for such an apply, so the policy programs load
 * on kernels without the kfunc. Design: docs/services.md. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "policy.h"
#include "xlate.bpf.h"

#define AF_INET 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "GPL";

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLP_MAX_BACKENDS);
	__type(key, struct slp_term_key);
	__type(value, __u8);
} slp_term SEC(".maps");

__u64 reset_count = 0;

static __always_inline bool mapped(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

/* An entry as the hook saw it, in the key's form: a v4-mapped pair as IPv4. */
static __always_inline void term_key(struct slp_term_key *k, const struct slp_xlate_entry *e,
				     __u16 family)
{
	k->vip_port = e->orig_port;
	k->backend_port = e->real_port;
	if (family == AF_INET6 && mapped(e->orig) && mapped(e->real)) {
		k->family = AF_INET;
		__builtin_memcpy(k->vip, e->orig + 12, 4);
		__builtin_memcpy(k->backend, e->real + 12, 4);
		return;
	}
	k->family = family;
	__builtin_memcpy(k->vip, e->orig, 16);
	__builtin_memcpy(k->backend, e->real, 16);
}

SEC("iter/tcp")
int slp_terminate(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct slp_sock_xlate *st;
	struct tcp_sock *tp;
	__u16 family;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc); /* full sockets: no request or TIME_WAIT socks */
	if (!tp)
		return 0;
	st = bpf_sk_storage_get(&slp_xlate, tp, 0, 0);
	if (!st)
		return 0;
	family = skc->skc_family;
	for (__u32 i = 0; i < SLP_XLATE_ENTRIES; i++) {
		struct slp_term_key k = {};

		if (st->e[i].kind != SLP_XLATE_SERVICE)
			continue;
		term_key(&k, &st->e[i], family);
		if (!bpf_map_lookup_elem(&slp_term, &k))
			continue;
		if (bpf_sock_destroy(skc) == 0)
			__sync_fetch_and_add(&reset_count, 1);
		break;
	}
	return 0;
}
