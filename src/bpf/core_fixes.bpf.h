/* CO-RE shims for fields that moved between kernel releases. */
#ifndef SOCKLENS_CORE_FIXES_H
#define SOCKLENS_CORE_FIXES_H

#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include "socklens.h"

/* Linux 6.6 (commits 3f7e753206b8 "inet: move inet->freebind to inet->inet_flags",
 * 4bd0623f04ee "inet: move inet->transparent to inet->inet_flags",
 * ca571e2eb7eb "inet: move inet->bind_address_no_port to inet->inet_flags")
 * turned these bitfields into bits of inet_sock.inet_flags. The enum holding the
 * bit numbers is anonymous, so CO-RE cannot resolve it by name; the numbers below
 * are the ones every kernel since 6.6 uses. */
#define SL_INET_FLAGS_FREEBIND 11
#define SL_INET_FLAGS_TRANSPARENT 15
#define SL_INET_FLAGS_BIND_ADDRESS_NO_PORT 18

struct inet_sock___pre66 {
	__u8 freebind : 1;
	__u8 transparent : 1;
	__u8 bind_address_no_port : 1;
} __attribute__((preserve_access_index));

static __always_inline __u32 sl_inet_opts(struct sock *sk)
{
	struct inet_sock *inet = (struct inet_sock *)sk;
	__u32 opts = 0;

	if (bpf_core_field_exists(inet->inet_flags)) {
		unsigned long flags = BPF_CORE_READ(inet, inet_flags);

		if (flags & (1UL << SL_INET_FLAGS_FREEBIND))
			opts |= SL_OPT_FREEBIND;
		if (flags & (1UL << SL_INET_FLAGS_TRANSPARENT))
			opts |= SL_OPT_TRANSPARENT;
		if (flags & (1UL << SL_INET_FLAGS_BIND_ADDRESS_NO_PORT))
			opts |= SL_OPT_BIND_ADDRESS_NO_PORT;
	} else {
		struct inet_sock___pre66 *old = (void *)sk;

		if (BPF_CORE_READ_BITFIELD_PROBED(old, freebind))
			opts |= SL_OPT_FREEBIND;
		if (BPF_CORE_READ_BITFIELD_PROBED(old, transparent))
			opts |= SL_OPT_TRANSPARENT;
		if (BPF_CORE_READ_BITFIELD_PROBED(old, bind_address_no_port))
			opts |= SL_OPT_BIND_ADDRESS_NO_PORT;
	}
	return opts;
}

#endif
