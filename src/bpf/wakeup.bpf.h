/* When a ring buffer record wakes its reader: shared by socklens.bpf.c's
 * `events` and policy.bpf.c's `slp_events`. */
#ifndef SOCKLENS_WAKEUP_H
#define SOCKLENS_WAKEUP_H

/* A record that wakes the reader costs the producer an irq_work, which is a
 * self-IPI, and the reader a context switch. On a VM whose hypervisor traps
 * the APIC write, each IPI cost the producing CPU about 25 us (measured on
 * the test machine: 473 of them a second cost churn 300 ns per connection,
 * and a policy auditing every connect halved the connect rate). So records
 * wake the reader only when the backlog crosses a multiple of `batch` bytes
 * (once per batch, not once per record while it stays above); readers also
 * drain on their poll timeout (100 ms), so a lone record waits at most that
 * long. Callers pass a constant `batch`, a quarter of their ring: three
 * quarters stay free while the reader wakes and catches up. */
static __always_inline __u64 ringbuf_wakeup_flag(__u64 backlog, __u64 size, __u64 batch)
{
	return backlog / batch != (backlog + size) / batch ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

#endif
