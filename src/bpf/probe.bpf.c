// SPDX-License-Identifier: GPL-2.0
/* Minimal programs for capability probing: the prober retargets them at each
 * kernel function and tries a real load and attach (src/host/probe.rs). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("fentry/inet_bind")
int BPF_PROG(sl_probe_fentry)
{
	return 0;
}

/* Copies of sl_probe_fentry for one batched trial load (src/host/probe.rs,
 * fentry_batch): libbpf parses the kernel's BTF once per object load, about
 * 0.4 s under QEMU TCG, and socklens probes 17 fentry functions at startup. */
#define SL_PROBE_FENTRY_COPY(n)                                                                   \
	SEC("fentry/inet_bind")                                                                   \
	int BPF_PROG(sl_probe_fentry_##n)                                                         \
	{                                                                                         \
		return 0;                                                                         \
	}
SL_PROBE_FENTRY_COPY(0)
SL_PROBE_FENTRY_COPY(1)
SL_PROBE_FENTRY_COPY(2)
SL_PROBE_FENTRY_COPY(3)
SL_PROBE_FENTRY_COPY(4)
SL_PROBE_FENTRY_COPY(5)
SL_PROBE_FENTRY_COPY(6)
SL_PROBE_FENTRY_COPY(7)
SL_PROBE_FENTRY_COPY(8)
SL_PROBE_FENTRY_COPY(9)
SL_PROBE_FENTRY_COPY(10)
SL_PROBE_FENTRY_COPY(11)
SL_PROBE_FENTRY_COPY(12)
SL_PROBE_FENTRY_COPY(13)
SL_PROBE_FENTRY_COPY(14)
SL_PROBE_FENTRY_COPY(15)
SL_PROBE_FENTRY_COPY(16)
SL_PROBE_FENTRY_COPY(17)
SL_PROBE_FENTRY_COPY(18)
SL_PROBE_FENTRY_COPY(19)

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
