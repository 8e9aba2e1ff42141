// SPDX-License-Identifier: GPL-2.0
/* Minimal programs for capability probing: the prober retargets them at each
 * kernel function and tries a real load and attach (src/probe.rs). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("fentry/inet_bind")
int BPF_PROG(sl_probe_fentry)
{
	return 0;
}

SEC("kprobe/inet_bind")
int BPF_KPROBE(sl_probe_kprobe)
{
	return 0;
}

/* Whether tracing programs may call bpf_get_socket_cookie (5.12+). tp_btf, not
 * fentry: hosts that refuse fentry still allow tp_btf, and both are tracing
 * programs with the same helpers. Only loaded, never attached. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(sl_probe_cookie, struct sock *sk)
{
	bpf_get_socket_cookie(sk);
	return 0;
}
