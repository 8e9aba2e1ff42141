/* When a ring buffer record wakes its reader: shared by socklens.bpf.c's
 * `events` and policy.bpf.c's `slp_events`. */
#ifndef SOCKLENS_WAKEUP_H
#define SOCKLENS_WAKEUP_H

/* Wake the reader once per `batch` bytes of backlog, not per record: each
 * wakeup is a self-IPI, costly under a hypervisor; readers also drain on their
 * 100 ms poll timeout (docs/accounting.md, "Kernel side"). */
static __always_inline __u64 ringbuf_wakeup_flag(__u64 backlog, __u64 size, __u64 batch)
{
	return backlog / batch != (backlog + size) / batch ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

#endif
