// SPDX-License-Identifier: GPL-2.0
/* Tracing programs. Each hook body is one static __always_inline function; the
 * SEC() wrappers below it only adapt one attach tier's arguments to it. The
 * loader keeps the wrappers of the tier the planner chose and turns off
 * autoload for the rest (src/plan.rs names them). */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Force the skeleton to emit the shared types for Rust. */
struct sl_sock_event _sl_sock_event = {};
enum sl_event_kind _sl_event_kind = SL_EV_BIND;
enum sl_tier _sl_tier = SL_TIER_FENTRY;
enum sl_sockopt _sl_sockopt = SL_OPT_REUSEADDR;
enum sl_stat _sl_stat = SL_STAT_EVENTS_LOST;

#define SOCKADDR_COPY 28 /* sizeof(struct sockaddr_in6) */

/* Entry-side state, keyed by pid_tgid, for tiers that see entry and exit apart.
 * LRU: a thread that dies between the two must not leak a slot forever. */
struct bind_stash {
	__u64 sock; /* struct socket *, kprobe tier */
	__s32 fd;   /* tracepoint tier */
	__u8 sa[SOCKADDR_COPY];
};

struct listen_stash {
	__u64 sock;
	__s32 fd;
	__s32 backlog_req;
	__u8 has_req;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct bind_stash);
} bind_stash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct listen_stash);
} listen_stash SEC(".maps");

/* ---- bind ------------------------------------------------------------- */

static __always_inline void on_bind(void *ctx, struct socket *sock, const __u8 *sa, int ret,
				    __u32 tier)
{
	struct sl_sock_event e = {};
	struct sock *sk = BPF_CORE_READ(sock, sk);

	if (!sk || !sock_wanted(sk))
		return;
	fill_task(&e);
	fill_sock(&e, sk);
	e.kind = SL_EV_BIND;
	e.tier = tier;
	e.ret = ret;
	e.opts = sl_inet_opts(sk);
	if (BPF_CORE_READ_BITFIELD_PROBED(&sk->__sk_common, skc_reuse))
		e.opts |= SL_OPT_REUSEADDR;
	if (BPF_CORE_READ_BITFIELD_PROBED(&sk->__sk_common, skc_reuseport))
		e.opts |= SL_OPT_REUSEPORT;
	/* A failed bind leaves the socket unbound: report what was asked for. */
	if (ret != 0)
		fill_requested(&e, sa);
	emit(ctx, &e);
}

static __always_inline int bind_fexit(void *ctx, struct socket *sock, struct sockaddr *uaddr,
				      int ret)
{
	__u8 sa[SOCKADDR_COPY] = {};

	if (!task_wanted())
		return 0;
	bpf_probe_read_kernel(sa, sizeof(sa), uaddr);
	on_bind(ctx, sock, sa, ret, SL_TIER_FENTRY);
	return 0;
}

SEC("fexit/inet_bind")
int BPF_PROG(sl_fx_inet_bind, struct socket *sock, struct sockaddr *uaddr, int addr_len, int ret)
{
	return bind_fexit(ctx, sock, uaddr, ret);
}

SEC("fexit/inet6_bind")
int BPF_PROG(sl_fx_inet6_bind, struct socket *sock, struct sockaddr *uaddr, int addr_len, int ret)
{
	return bind_fexit(ctx, sock, uaddr, ret);
}

static __always_inline int bind_kprobe_enter(struct socket *sock, struct sockaddr *uaddr)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct bind_stash st = { .sock = (__u64)sock, .fd = -1 };

	if (!task_wanted())
		return 0;
	bpf_probe_read_kernel(st.sa, sizeof(st.sa), uaddr);
	bpf_map_update_elem(&bind_stash, &id, &st, BPF_ANY);
	return 0;
}

static __always_inline int bind_stash_exit(void *ctx, int ret, __u32 tier)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct bind_stash *found = bpf_map_lookup_elem(&bind_stash, &id);
	struct bind_stash st;
	struct socket *sock;

	if (!found)
		return 0;
	st = *found;
	bpf_map_delete_elem(&bind_stash, &id);
	sock = tier == SL_TIER_TRACEPOINT ? socket_from_fd(st.fd) : (struct socket *)st.sock;
	if (sock)
		on_bind(ctx, sock, st.sa, ret, tier);
	return 0;
}

SEC("kprobe/inet_bind")
int BPF_KPROBE(sl_kp_inet_bind, struct socket *sock, struct sockaddr *uaddr)
{
	return bind_kprobe_enter(sock, uaddr);
}

SEC("kretprobe/inet_bind")
int BPF_KRETPROBE(sl_kr_inet_bind, int ret)
{
	return bind_stash_exit(ctx, ret, SL_TIER_KPROBE);
}

SEC("kprobe/inet6_bind")
int BPF_KPROBE(sl_kp_inet6_bind, struct socket *sock, struct sockaddr *uaddr)
{
	return bind_kprobe_enter(sock, uaddr);
}

SEC("kretprobe/inet6_bind")
int BPF_KRETPROBE(sl_kr_inet6_bind, int ret)
{
	return bind_stash_exit(ctx, ret, SL_TIER_KPROBE);
}

SEC("tracepoint/syscalls/sys_enter_bind")
int sl_tp_bind_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct bind_stash st = { .fd = (__s32)ctx->args[0] };
	const void *uaddr = (const void *)ctx->args[1];

	if (!task_wanted())
		return 0;
	/* A sockaddr_in is shorter than the copy: retry short if the long read faults. */
	if (bpf_probe_read_user(st.sa, sizeof(st.sa), uaddr))
		bpf_probe_read_user(st.sa, 16, uaddr);
	bpf_map_update_elem(&bind_stash, &id, &st, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_bind")
int sl_tp_bind_exit(struct trace_event_raw_sys_exit *ctx)
{
	return bind_stash_exit(ctx, (int)ctx->ret, SL_TIER_TRACEPOINT);
}

/* ---- listen ----------------------------------------------------------- */

static __always_inline void on_listen(void *ctx, struct socket *sock, int backlog_req, int ret,
				      __u32 tier)
{
	struct sl_sock_event e = {};
	struct sock *sk = BPF_CORE_READ(sock, sk);

	if (!sk || !sock_wanted(sk))
		return;
	/* inet_listen serves stream sockets only; keep every tier to that set. */
	if (BPF_CORE_READ(sock, type) != SOCK_STREAM)
		return;
	fill_task(&e);
	fill_sock(&e, sk);
	e.kind = SL_EV_LISTEN;
	e.tier = tier;
	e.ret = ret;
	e.backlog_req = backlog_req;
	if (ret == 0)
		e.backlog = BPF_CORE_READ(sk, sk_max_ack_backlog);
	emit(ctx, &e);
}

/* The syscall layer sees the backlog the caller asked for; inet_listen only
 * gets it after the somaxconn cap. */
static __always_inline int listen_stash_request(int fd, int backlog)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct listen_stash st = { .fd = fd, .backlog_req = backlog, .has_req = 1 };

	if (!task_wanted())
		return 0;
	bpf_map_update_elem(&listen_stash, &id, &st, BPF_ANY);
	return 0;
}

/* Takes the stash entry; a listen reached without the syscall (io_uring)
 * reports the capped backlog as the request. */
static __always_inline int listen_take_request(int capped, struct listen_stash *out)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct listen_stash *found = bpf_map_lookup_elem(&listen_stash, &id);

	if (!found) {
		out->backlog_req = capped;
		out->fd = -1;
		out->sock = 0;
		return 0;
	}
	*out = *found;
	bpf_map_delete_elem(&listen_stash, &id);
	if (!out->has_req)
		out->backlog_req = capped;
	return 1;
}

SEC("fentry/__sys_listen")
int BPF_PROG(sl_fe_sys_listen, int fd, int backlog)
{
	return listen_stash_request(fd, backlog);
}

SEC("fexit/inet_listen")
int BPF_PROG(sl_fx_inet_listen, struct socket *sock, int backlog, int ret)
{
	struct listen_stash st;

	if (!task_wanted())
		return 0;
	listen_take_request(backlog, &st);
	on_listen(ctx, sock, st.backlog_req, ret, SL_TIER_FENTRY);
	return 0;
}

SEC("kprobe/__sys_listen")
int BPF_KPROBE(sl_kp_sys_listen, int fd, int backlog)
{
	return listen_stash_request(fd, backlog);
}

SEC("kprobe/inet_listen")
int BPF_KPROBE(sl_kp_inet_listen, struct socket *sock, int backlog)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct listen_stash *found;
	struct listen_stash st = { .fd = -1, .backlog_req = backlog };

	if (!task_wanted())
		return 0;
	found = bpf_map_lookup_elem(&listen_stash, &id);
	if (found)
		st = *found;
	st.sock = (__u64)sock;
	bpf_map_update_elem(&listen_stash, &id, &st, BPF_ANY);
	return 0;
}

SEC("kretprobe/inet_listen")
int BPF_KRETPROBE(sl_kr_inet_listen, int ret)
{
	struct listen_stash st;

	if (!listen_take_request(0, &st) || !st.sock)
		return 0;
	on_listen(ctx, (struct socket *)st.sock, st.backlog_req, ret, SL_TIER_KPROBE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_listen")
int sl_tp_listen_enter(struct trace_event_raw_sys_enter *ctx)
{
	return listen_stash_request((int)ctx->args[0], (int)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_exit_listen")
int sl_tp_listen_exit(struct trace_event_raw_sys_exit *ctx)
{
	struct listen_stash st;
	struct socket *sock;

	if (!listen_take_request(0, &st))
		return 0;
	sock = socket_from_fd(st.fd);
	if (sock)
		on_listen(ctx, sock, st.backlog_req, (int)ctx->ret, SL_TIER_TRACEPOINT);
	return 0;
}
