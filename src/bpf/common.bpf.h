/* Shared plumbing for every socklens program: filters, event output, socket reads. */
#ifndef SOCKLENS_COMMON_H
#define SOCKLENS_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "socklens.h"
#include "core_fixes.bpf.h"
#include "wakeup.bpf.h"

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

/* Filters, written by the loader before load and frozen: the verifier prunes
 * what they switch off. */
const volatile __u32 filter_pid = 0;    /* tgid; 0 = any */
const volatile __u32 filter_netns = 0;  /* netns inode; 0 = any */
const volatile __u16 filter_family = 0; /* AF_INET / AF_INET6; 0 = any */
const volatile bool filter_cgroup = false; /* the cgroup in cgroup_filter and below */
const volatile bool filter_comm = false;
const volatile __u8 filter_comm_value[SL_COMM_LEN] = {};
/* false when the loader turned `events` into a perf event array. */
const volatile bool use_ringbuf = true;

#define SL_EVENTS_BYTES (1 << 22) /* ~20k connection records: bursts of churn */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, SL_EVENTS_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cgroup_filter SEC(".maps");

static __always_inline void stat_inc(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &slot);

	if (v)
		*v += 1; /* per-CPU slot: no other writer */
}

/* Task filters come first in every handler: they need nothing but the current task. */
static __always_inline bool task_wanted(void)
{
	if (filter_pid && (bpf_get_current_pid_tgid() >> 32) != filter_pid)
		return false;
	if (filter_comm) {
		__u8 comm[SL_COMM_LEN];

		bpf_get_current_comm(comm, sizeof(comm));
		for (int i = 0; i < SL_COMM_LEN; i++) {
			if (comm[i] != filter_comm_value[i])
				return false;
			if (comm[i] == 0)
				break;
		}
	}
	if (filter_cgroup && bpf_current_task_under_cgroup(&cgroup_filter, 0) != 1)
		return false;
	return true;
}

/* How a hook body reads the kernel, passed down from its wrapper as a
 * literal, so that once the body is inlined each program keeps one way:
 * SL_BTF where the socket pointer is BTF-typed (fentry/fexit and tp_btf
 * arguments): plain loads, which the verifier checks and CO-RE relocates;
 * SL_PROBED where it is a bare number (kprobe arguments, pointers stashed
 * by syscall tracepoints): a probe-read helper call per field. A load costs
 * about a nanosecond, a helper call tens. SL_CAST is SL_BTF in programs
 * that load only where the kernel has BTF casts (bpf_rdonly_cast, 6.2+; the
 * loader picks them): they also cast instead of asking helpers for what
 * plain loads can read (the tcp_sock of a TCP socket, the current task's
 * ids). Any non-zero mode reads with plain loads (SL_READ). */
#define SL_PROBED 0
#define SL_BTF 1
#define SL_CAST 2

/* One field, or a chain through pointers, written as for BPF_CORE_READ. */
#define SL_READ(btf, src, a, ...)                                                                 \
	((btf) ? ___arrow(src, a, ##__VA_ARGS__) : BPF_CORE_READ(src, a, ##__VA_ARGS__))

static __always_inline __u32 sock_netns(struct sock *sk, int btf)
{
	return SL_READ(btf, sk, __sk_common.skc_net.net, ns.inum);
}

/* Socket filters: family and netns of the socket itself. */
static __always_inline bool sock_wanted(struct sock *sk, int btf)
{
	__u16 family = SL_READ(btf, sk, __sk_common.skc_family);

	if (family != AF_INET && family != AF_INET6)
		return false;
	if (filter_family && family != filter_family)
		return false;
	if (filter_netns && sock_netns(sk, btf) != filter_netns)
		return false;
	return true;
}

static __always_inline void fill_task(struct sl_sock_event *e)
{
	__u64 id = bpf_get_current_pid_tgid();

	e->ts_ns = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

/* Identity and local address of a socket as the kernel holds it now. */
static __always_inline void fill_sock(struct sl_sock_event *e, struct sock *sk)
{
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->proto = BPF_CORE_READ(sk, sk_protocol);
	e->sock_type = BPF_CORE_READ(sk, sk_type);
	e->netns = sock_netns(sk, SL_PROBED);
	e->port = BPF_CORE_READ(sk, __sk_common.skc_num);
	e->bound_dev_if = BPF_CORE_READ(sk, __sk_common.skc_bound_dev_if);
	if (e->family == AF_INET6)
		BPF_CORE_READ_INTO(&e->addr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
	else
		BPF_CORE_READ_INTO(&e->addr, sk, __sk_common.skc_rcv_saddr);
}

/* The address and port a caller asked for, from a sockaddr already in
 * kernel-readable memory (`sa` points at a stash copy). */
static __always_inline void fill_requested(struct sl_sock_event *e, const __u8 *sa)
{
	__u16 family = sa[0] | (sa[1] << 8);

	e->port = (sa[2] << 8) | sa[3];
	if (family == AF_INET6)
		__builtin_memcpy(e->addr, sa + 8, 16);
	else
		__builtin_memcpy(e->addr, sa + 4, 4);
}

/* The reader wakes once per quarter of the ring's backlog (wakeup.bpf.h). */
static __always_inline __u64 ringbuf_wakeup(__u64 size)
{
	return ringbuf_wakeup_flag(bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA), size,
				   SL_EVENTS_BYTES / 4);
}

/* The same for a record already reserved: the backlog counts it. */
static __always_inline __u64 ringbuf_wakeup_reserved(__u64 size)
{
	return ringbuf_wakeup_flag(bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) - size, size,
				   SL_EVENTS_BYTES / 4);
}

/* One record to user space, through whichever buffer the loader chose. */
static __always_inline void output(void *ctx, void *data, __u64 size)
{
	long err;

	if (use_ringbuf) {
		err = bpf_ringbuf_output(&events, data, size, ringbuf_wakeup(size));
	} else {
		err = bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, data, size);
	}
	if (err)
		stat_inc(SL_STAT_EVENTS_LOST);
}

static __always_inline void emit(void *ctx, struct sl_sock_event *e)
{
	output(ctx, e, sizeof(*e));
}

/* The socket behind a file descriptor of the current task, or NULL when the fd
 * is not a socket (a socket's file and struct socket point at each other). */
static __always_inline struct socket *socket_from_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	struct socket *sock;

	if (fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	if (bpf_core_read(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	if (!sock || BPF_CORE_READ(sock, file) != file)
		return NULL;
	return sock;
}

/* socket_from_fd through BTF-typed pointers (the task's, 5.11+, and casts,
 * 6.2+): plain loads where socket_from_fd calls the probe-read helper seven
 * times. Only the fd table's slot is read with the helper: the table is an
 * array of pointers, which BTF does not type. The result may be read with
 * plain loads but not given to helpers that want a socket (a cast pointer is
 * untrusted). */
static __always_inline struct socket *socket_from_fd_btf(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	struct file *slot = NULL, *file;
	struct socket *sock;

	if (fd < 0 || (unsigned int)fd >= fdt->max_fds)
		return NULL;
	if (bpf_probe_read_kernel(&slot, sizeof(slot), &fdt->fd[fd]) || !slot)
		return NULL;
	file = bpf_core_cast(slot, struct file);
	sock = bpf_core_cast(file->private_data, struct socket);
	if (!sock || sock->file != file)
		return NULL;
	return sock;
}

/* The syscall tracepoints' way to the socket behind `fd`: `btf_walk`, a
 * literal in each program, picks the walk (the loader picks the program). */
static __always_inline struct socket *socket_of_fd(int fd, bool btf_walk)
{
	return btf_walk ? socket_from_fd_btf(fd) : socket_from_fd(fd);
}

#endif
