// SPDX-License-Identifier: GPL-2.0
/* Tracing programs. Each hook body is one static __always_inline function; the
 * SEC() wrappers below it only adapt one attach tier's arguments to it. The
 * loader keeps the wrappers of the tier the planner chose and turns off
 * autoload for the rest (src/attach/plan.rs names them). */
#include "common.bpf.h"
#include "conn.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Force the skeleton to emit the shared types for Rust. */
struct sl_sock_event _sl_sock_event = {};
enum sl_event_kind _sl_event_kind = SL_EV_BIND;
enum sl_tier _sl_tier = SL_TIER_FENTRY;
enum sl_sockopt _sl_sockopt = SL_OPT_REUSEADDR;
enum sl_stat _sl_stat = SL_STAT_EVENTS_LOST;
struct sl_conn_event _sl_conn_event = {};
struct sl_udp_key _sl_udp_key = {};
struct sl_udp_flow _sl_udp_flow = {};
enum sl_direction _sl_direction = SL_DIR_UNKNOWN;
enum sl_conn_flag _sl_conn_flag = SL_CONN_OWNER;

#define SOCKADDR_COPY 28 /* sizeof(struct sockaddr_in6) */

/* A syscall's number and arguments in the task's saved user registers, which
 * still hold them at its exit. */
#if defined(__TARGET_ARCH_x86)
#define SL_NR_SENDFILE 40
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#define SYSCALL_ARG1(regs) ((regs)->di)
#define SYSCALL_ARG2(regs) ((regs)->si)
#else
#error "socklens: syscall numbers for this architecture are missing"
#endif

/* The current task's saved user registers, for programs loaded only where
 * the kernel has BTF casts (6.2+). They sit at the same offset from the base
 * of every task's stack (task_pt_regs), learned from the helper on the first
 * call: every send asks which syscall it is in (in_sendfile), and a helper
 * call there costs as much as the rest of the hook's work. The two pointers
 * become numbers by way of memory, the only way the verifier allows. NULL
 * only if the offset is implausible (it bounds the add for the verifier). */
volatile __u64 pt_regs_from_stack = 0;
volatile __u64 pt_regs_seen = 0;
volatile __u64 stack_seen = 0;
#define SL_MAX_PT_REGS_OFFSET (1 << 20)

static __always_inline struct pt_regs *syscall_regs(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u8 *stack = task->stack;
	__u64 off = pt_regs_from_stack;

	if (!off) {
		pt_regs_seen = (__u64)bpf_task_pt_regs(task);
		stack_seen = (__u64)stack;
		off = pt_regs_seen - stack_seen;
		pt_regs_from_stack = off;
	}
	if (off > SL_MAX_PT_REGS_OFFSET)
		return NULL;
	return bpf_core_cast(stack + off, struct pt_regs);
}

/* A caller's sockaddr, in full where it can be read (a sockaddr_in is
 * shorter than the copy: the short read is the retry when the long one
 * faults). */
static __always_inline void read_user_sockaddr(__u8 sa[SOCKADDR_COPY], const void *uaddr)
{
	if (bpf_probe_read_user(sa, SOCKADDR_COPY, uaddr))
		bpf_probe_read_user(sa, 16, uaddr);
}

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

	if (!sk || !sock_wanted(sk, SL_PROBED))
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

/* The tracepoint tier's stash holds the fd (kernels without BTF casts; see
 * sl_tp_bind_exit_btf for the others), the kprobe tier's the socket. */
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
	if (tier == SL_TIER_TRACEPOINT)
		sock = socket_from_fd(st.fd);
	else
		sock = (struct socket *)st.sock;
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
	read_user_sockaddr(st.sa, uaddr);
	bpf_map_update_elem(&bind_stash, &id, &st, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_bind")
int sl_tp_bind_exit(struct trace_event_raw_sys_exit *ctx)
{
	return bind_stash_exit(ctx, (int)ctx->ret, SL_TIER_TRACEPOINT);
}

/* Where the kernel has BTF casts (6.2+; the loader picks): the arguments come
 * from the saved registers, so no sys_enter_bind program runs. An enabled
 * syscall entry tracepoint costs every syscall of every task about 20 ns more
 * (bench/syscall_tracepoints.sh). */
SEC("tracepoint/syscalls/sys_exit_bind")
int sl_tp_bind_exit_btf(struct trace_event_raw_sys_exit *ctx)
{
	__u8 sa[SOCKADDR_COPY] = {};
	struct pt_regs *regs;
	struct socket *sock;

	if (!task_wanted())
		return 0;
	regs = syscall_regs();
	if (!regs)
		return 0;
	/* The caller's sockaddr is still there: the syscall has not returned. */
	read_user_sockaddr(sa, (const void *)SYSCALL_ARG2(regs));
	sock = socket_from_fd_btf((int)SYSCALL_ARG1(regs));
	if (sock)
		on_bind(ctx, sock, sa, (int)ctx->ret, SL_TIER_TRACEPOINT);
	return 0;
}

/* ---- listen ----------------------------------------------------------- */

static __always_inline void on_listen(void *ctx, struct socket *sock, int backlog_req, int ret,
				      __u32 tier)
{
	struct sl_sock_event e = {};
	struct sock *sk = BPF_CORE_READ(sock, sk);

	if (!sk || !sock_wanted(sk, SL_PROBED))
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
	if (ret == 0) {
		e.backlog = BPF_CORE_READ(sk, sk_max_ack_backlog);
		on_listening(sk);
	}
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

/* Where the kernel has BTF casts (6.2+; the loader picks): fd and backlog
 * from the saved registers, with no sys_enter_listen program (see
 * sl_tp_bind_exit_btf). */
SEC("tracepoint/syscalls/sys_exit_listen")
int sl_tp_listen_exit_btf(struct trace_event_raw_sys_exit *ctx)
{
	struct pt_regs *regs;
	struct socket *sock;

	if (!task_wanted())
		return 0;
	regs = syscall_regs();
	if (!regs)
		return 0;
	sock = socket_from_fd_btf((int)SYSCALL_ARG1(regs));
	if (sock)
		on_listen(ctx, sock, (int)SYSCALL_ARG2(regs), (int)ctx->ret, SL_TIER_TRACEPOINT);
	return 0;
}

/* ==== connection accounting: thin wrappers around conn.bpf.h ============ */

/* Kernel function shapes, from BTF (src/host/probe.rs). fexit programs come in
 * one variant per shape (the loader picks); kprobes branch on this. */
const volatile bool recvmsg_has_nonblock = false; /* before 5.19 */

/* ---- state ---- */

SEC("fentry/tcp_set_state")
int BPF_PROG(sl_fe_tcp_set_state, struct sock *sk, int state)
{
	if (!state_matters(state))
		return 0;
	on_state(ctx, sk, sk->__sk_common.skc_state, state, SL_TIER_FENTRY, SL_BTF);
	return 0;
}

/* Each `_cast` program is its plain twin for kernels with BTF casts (the
 * loader picks; see SL_CAST). */
SEC("fentry/tcp_set_state")
int BPF_PROG(sl_fe_tcp_set_state_cast, struct sock *sk, int state)
{
	if (!state_matters(state))
		return 0;
	on_state(ctx, sk, sk->__sk_common.skc_state, state, SL_TIER_FENTRY, SL_CAST);
	return 0;
}

SEC("kprobe/tcp_set_state")
int BPF_KPROBE(sl_kp_tcp_set_state, struct sock *sk, int state)
{
	if (!state_matters(state))
		return 0;
	on_state(ctx, sk, BPF_CORE_READ(sk, __sk_common.skc_state), state, SL_TIER_KPROBE,
		 SL_PROBED);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(sl_tp_set_state, struct sock *sk, int oldstate, int newstate)
{
	if (!state_matters(newstate))
		return 0;
	on_state(ctx, sk, oldstate, newstate, SL_TIER_TRACEPOINT, SL_BTF);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(sl_tp_set_state_cast, struct sock *sk, int oldstate, int newstate)
{
	if (!state_matters(newstate))
		return 0;
	on_state(ctx, sk, oldstate, newstate, SL_TIER_TRACEPOINT, SL_CAST);
	return 0;
}

/* Socket destruction: the last chance for an entry whose close the state
 * hook missed (conn.bpf.h, on_destroy). tcp_v6_destroy_sock, where it exists,
 * calls tcp_v4_destroy_sock, and so does every IPv6 socket's destroy. */
SEC("fentry/tcp_v4_destroy_sock")
int BPF_PROG(sl_fe_tcp_destroy, struct sock *sk)
{
	on_destroy(ctx, sk, SL_TIER_FENTRY, SL_BTF);
	return 0;
}

SEC("fentry/tcp_v4_destroy_sock")
int BPF_PROG(sl_fe_tcp_destroy_cast, struct sock *sk)
{
	on_destroy(ctx, sk, SL_TIER_FENTRY, SL_CAST);
	return 0;
}

SEC("kprobe/tcp_v4_destroy_sock")
int BPF_KPROBE(sl_kp_tcp_destroy, struct sock *sk)
{
	on_destroy(ctx, sk, SL_TIER_KPROBE, SL_PROBED);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(sl_tp_tcp_destroy, struct sock *sk)
{
	on_destroy(ctx, sk, SL_TIER_TRACEPOINT, SL_BTF);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(sl_tp_tcp_destroy_cast, struct sock *sk)
{
	on_destroy(ctx, sk, SL_TIER_TRACEPOINT, SL_CAST);
	return 0;
}

/* UDP socket destruction (fentry and kprobe tiers): see on_udp_gone. */
SEC("fentry/udp_destroy_sock")
int BPF_PROG(sl_fe_udp_destroy, struct sock *sk)
{
	on_udp_gone((__u64)sk);
	return 0;
}

SEC("fentry/udpv6_destroy_sock")
int BPF_PROG(sl_fe_udp6_destroy, struct sock *sk)
{
	on_udp_gone((__u64)sk);
	return 0;
}

SEC("kprobe/udp_destroy_sock")
int BPF_KPROBE(sl_kp_udp_destroy, struct sock *sk)
{
	on_udp_gone((__u64)sk);
	return 0;
}

SEC("kprobe/udpv6_destroy_sock")
int BPF_KPROBE(sl_kp_udp6_destroy, struct sock *sk)
{
	on_udp_gone((__u64)sk);
	return 0;
}

/* ---- accept ---- */

/* 6.10+: inet_csk_accept(sk, arg); every such kernel has BTF casts. */
SEC("fexit/inet_csk_accept")
int BPF_PROG(sl_fx_accept, struct sock *lsk, void *arg, struct sock *sk)
{
	if (sk)
		on_accept(ctx, sk, tracing_cookie(sk), SL_TIER_FENTRY, SL_CAST);
	return 0;
}

/* Before 6.10: inet_csk_accept(sk, flags, err, kern) */
SEC("fexit/inet_csk_accept")
int BPF_PROG(sl_fx_accept_old, struct sock *lsk, int flags, int *err, bool kern, struct sock *sk)
{
	if (sk)
		on_accept(ctx, sk, tracing_cookie(sk), SL_TIER_FENTRY, SL_BTF);
	return 0;
}

SEC("kretprobe/inet_csk_accept")
int BPF_KRETPROBE(sl_kr_accept, struct sock *sk)
{
	if (sk)
		on_accept(ctx, sk, kprobe_cookie(sk), SL_TIER_KPROBE, SL_PROBED);
	return 0;
}

/* `btf_walk`: the _btf variants, where the kernel has BTF casts (6.2+; the
 * loader picks). Under churn the probe-read walk made this the costliest
 * program per run (1.5 us). */
static __always_inline int accept_exit(void *ctx, long fd, bool btf_walk)
{
	struct socket *sock = fd >= 0 ? socket_of_fd(fd, btf_walk) : NULL;

	if (sock)
		on_accept(ctx, SL_READ(btf_walk, sock, sk), 0, SL_TIER_TRACEPOINT,
			  btf_walk ? SL_CAST : SL_PROBED);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int sl_tp_accept4_exit(struct trace_event_raw_sys_exit *ctx)
{
	return accept_exit(ctx, ctx->ret, false);
}

SEC("tracepoint/syscalls/sys_exit_accept")
int sl_tp_accept_exit(struct trace_event_raw_sys_exit *ctx)
{
	return accept_exit(ctx, ctx->ret, false);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int sl_tp_accept4_exit_btf(struct trace_event_raw_sys_exit *ctx)
{
	return accept_exit(ctx, ctx->ret, true);
}

SEC("tracepoint/syscalls/sys_exit_accept")
int sl_tp_accept_exit_btf(struct trace_event_raw_sys_exit *ctx)
{
	return accept_exit(ctx, ctx->ret, true);
}

/* ---- send / recv: fentry tier ---- */

static __always_inline void read_msg_name(__u8 *sa, struct msghdr *msg)
{
	void *name = BPF_CORE_READ(msg, msg_name);

	if (name)
		bpf_probe_read_kernel(sa, SOCKADDR_COPY, name);
}

static __always_inline int send_fexit(void *ctx, struct sock *sk, struct msghdr *msg, long ret)
{
	__u8 sa[SOCKADDR_COPY] = {};

	if (ret <= 0)
		return 0;
	read_msg_name(sa, msg);
	on_send(sk, tracing_cookie(sk), sa, ret, SL_BTF);
	return 0;
}

SEC("fexit/tcp_sendmsg")
int BPF_PROG(sl_fx_tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
	return send_fexit(ctx, sk, msg, ret);
}

/* udpv6_sendmsg sends to v4-mapped peers through udp_sendmsg: an IPv6
 * socket's datagram is counted once, by the outer call. */
static __always_inline bool nested_in_udpv6(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_family) == AF_INET6;
}

SEC("fexit/udp_sendmsg")
int BPF_PROG(sl_fx_udp_sendmsg, struct sock *sk, struct msghdr *msg, size_t len, int ret)
{
	if (nested_in_udpv6(sk))
		return 0;
	return send_fexit(ctx, sk, msg, ret);
}

SEC("fexit/udpv6_sendmsg")
int BPF_PROG(sl_fx_udp6_sendmsg, struct sock *sk, struct msghdr *msg, size_t len, int ret)
{
	return send_fexit(ctx, sk, msg, ret);
}

static __always_inline int recv_fexit(void *ctx, struct sock *sk, struct msghdr *msg, int flags,
				      int ret)
{
	__u8 sa[SOCKADDR_COPY] = {};

	if (ret <= 0 || (flags & MSG_PEEK))
		return 0;
	read_msg_name(sa, msg);
	on_recv(ctx, sk, tracing_cookie(sk), sa, ret, flags, SL_TIER_FENTRY, SL_BTF);
	return 0;
}

/* One program per signature: 5.19 dropped recvmsg's `nonblock` parameter, later
 * kernels (Debian's 7.x) also `addr_len` (4 parameters: the `_na` variant), and
 * an fexit may read only the argument slots its function has. The loader picks
 * the variant from the parameter count in BTF (src/host/probe.rs, kernel_shape). */
#define RECV_FEXIT(name, func, body)                                                              \
	SEC("fexit/" #func)                                                                       \
	int BPF_PROG(name, struct sock *sk, struct msghdr *msg, size_t len, int flags,            \
		     int *addr_len, int ret)                                                      \
	{                                                                                         \
		return body(ctx, sk, msg, flags, ret);                                            \
	}                                                                                         \
	SEC("fexit/" #func)                                                                       \
	int BPF_PROG(name##_nb, struct sock *sk, struct msghdr *msg, size_t len, int nonblock,    \
		     int flags, int *addr_len, int ret)                                           \
	{                                                                                         \
		return body(ctx, sk, msg, flags, ret);                                            \
	}                                                                                         \
	SEC("fexit/" #func)                                                                       \
	int BPF_PROG(name##_na, struct sock *sk, struct msghdr *msg, size_t len, int flags,       \
		     int ret)                                                                     \
	{                                                                                         \
		return body(ctx, sk, msg, flags, ret);                                            \
	}

RECV_FEXIT(sl_fx_tcp_recvmsg, tcp_recvmsg, recv_fexit)
RECV_FEXIT(sl_fx_udp_recvmsg, udp_recvmsg, recv_fexit)
RECV_FEXIT(sl_fx_udp6_recvmsg, udpv6_recvmsg, recv_fexit)

/* A socket with a psock sends and reads through tcp_bpf, which calls
 * tcp_sendmsg/tcp_recvmsg only for what goes through TCP: bytes sk_msg
 * redirected are seen here, where the whole call is (conn.bpf.h, tcp_accel_count). */
static __always_inline int psock_recv_fexit(void *ctx, struct sock *sk, struct msghdr *msg,
					    int flags, int ret)
{
	if (ret >= 0 && !(flags & MSG_PEEK))
		tcp_touch(ctx, sk, tracing_cookie(sk), ret, flags, true, true, SL_TIER_FENTRY, SL_BTF);
	return 0;
}

RECV_FEXIT(sl_fx_tcp_bpf_recvmsg, tcp_bpf_recvmsg, psock_recv_fexit)

SEC("fexit/tcp_bpf_sendmsg")
int BPF_PROG(sl_fx_tcp_bpf_sendmsg, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
	if (ret > 0)
		tcp_touch(ctx, sk, tracing_cookie(sk), ret, 0, false, true, SL_TIER_FENTRY, SL_BTF);
	return 0;
}

/* ---- send / recv: kprobe tier ---- */

struct msg_stash {
	__u64 sk;
	__u64 msg;
	__s32 flags;
	__s32 ret;
	__u64 uaddr;  /* tracepoint tier: the caller's sockaddr (user memory) */
	__u64 cookie;
	__u8 pending; /* tracepoint tier: a recv waits for the syscall exit */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct msg_stash);
} send_stash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct msg_stash);
} recv_stash SEC(".maps");

/* A kprobe's stash for its kretprobe, by thread. Before 6.7 the kernel counts
 * no dropped kretprobe run (more threads inside the function than its
 * instances, or a skipped program): one shows as a stash still there at the
 * thread's next entry, or none at an exit; both count in SL_STAT_RET_MISSED. */
static __always_inline void stash_put(void *map, __u64 *id, void *st)
{
	if (bpf_map_update_elem(map, id, st, BPF_NOEXIST)) {
		stat_inc(SL_STAT_RET_MISSED);
		bpf_map_update_elem(map, id, st, BPF_ANY);
	}
}

static __always_inline int stash_msg(void *map, struct sock *sk, struct msghdr *msg, int flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct msg_stash st = { .sk = (__u64)sk, .msg = (__u64)msg, .flags = flags };

	stash_put(map, &id, &st);
	return 0;
}

static __always_inline int take_msg(void *map, struct msg_stash *out)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct msg_stash *st = bpf_map_lookup_elem(map, &id);

	if (!st) {
		stat_inc(SL_STAT_RET_MISSED);
		return 0;
	}
	*out = *st;
	bpf_map_delete_elem(map, &id);
	return 1;
}

static __always_inline int send_kretprobe(long ret)
{
	struct msg_stash st;
	__u8 sa[SOCKADDR_COPY] = {};
	struct sock *sk;

	if (!take_msg(&send_stash, &st) || ret <= 0)
		return 0;
	sk = (struct sock *)st.sk;
	read_msg_name(sa, (struct msghdr *)st.msg);
	on_send(sk, kprobe_cookie(sk), sa, ret, SL_PROBED);
	return 0;
}

static __always_inline int recv_kretprobe(void *ctx, long ret)
{
	struct msg_stash st;
	__u8 sa[SOCKADDR_COPY] = {};
	struct sock *sk;

	if (!take_msg(&recv_stash, &st) || ret <= 0)
		return 0;
	sk = (struct sock *)st.sk;
	read_msg_name(sa, (struct msghdr *)st.msg);
	on_recv(ctx, sk, kprobe_cookie(sk), sa, ret, st.flags, SL_TIER_KPROBE, SL_PROBED);
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(sl_kp_tcp_sendmsg, struct sock *sk, struct msghdr *msg)
{
	return stash_msg(&send_stash, sk, msg, 0);
}

SEC("kretprobe/tcp_sendmsg")
int BPF_KRETPROBE(sl_kr_tcp_sendmsg, int ret)
{
	return send_kretprobe(ret);
}

SEC("kprobe/udp_sendmsg")
int BPF_KPROBE(sl_kp_udp_sendmsg, struct sock *sk, struct msghdr *msg)
{
	if (nested_in_udpv6(sk))
		return 0; /* keep the outer udpv6_sendmsg's stash */
	return stash_msg(&send_stash, sk, msg, 0);
}

SEC("kretprobe/udp_sendmsg")
int BPF_KRETPROBE(sl_kr_udp_sendmsg, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct msg_stash *st = bpf_map_lookup_elem(&send_stash, &id);

	if (st && nested_in_udpv6((struct sock *)st->sk))
		return 0; /* the outer udpv6_sendmsg's; its kretprobe takes it */
	return send_kretprobe(ret);
}

SEC("kprobe/udpv6_sendmsg")
int BPF_KPROBE(sl_kp_udp6_sendmsg, struct sock *sk, struct msghdr *msg)
{
	return stash_msg(&send_stash, sk, msg, 0);
}

SEC("kretprobe/udpv6_sendmsg")
int BPF_KRETPROBE(sl_kr_udp6_sendmsg, int ret)
{
	return send_kretprobe(ret);
}

static __always_inline int recv_kprobe_to(struct pt_regs *ctx, void *stash)
{
	struct sock *sk = (struct sock *)PT_REGS_PARM1(ctx);
	struct msghdr *msg = (struct msghdr *)PT_REGS_PARM2(ctx);
	/* Read both registers at fixed offsets: the verifier rejects a context
	 * access at an offset chosen at run time. */
	unsigned long p4 = PT_REGS_PARM4(ctx), p5 = PT_REGS_PARM5(ctx);

	barrier_var(p4);
	barrier_var(p5);
	return stash_msg(stash, sk, msg, (int)(recvmsg_has_nonblock ? p5 : p4));
}

static __always_inline int recv_kprobe(struct pt_regs *ctx)
{
	return recv_kprobe_to(ctx, &recv_stash);
}

SEC("kprobe/tcp_recvmsg")
int BPF_KPROBE(sl_kp_tcp_recvmsg)
{
	return recv_kprobe(ctx);
}

SEC("kretprobe/tcp_recvmsg")
int BPF_KRETPROBE(sl_kr_tcp_recvmsg, int ret)
{
	return recv_kretprobe(ctx, ret);
}

SEC("kprobe/udp_recvmsg")
int BPF_KPROBE(sl_kp_udp_recvmsg)
{
	return recv_kprobe(ctx);
}

SEC("kretprobe/udp_recvmsg")
int BPF_KRETPROBE(sl_kr_udp_recvmsg, int ret)
{
	return recv_kretprobe(ctx, ret);
}

SEC("kprobe/udpv6_recvmsg")
int BPF_KPROBE(sl_kp_udp6_recvmsg)
{
	return recv_kprobe(ctx);
}

SEC("kretprobe/udpv6_recvmsg")
int BPF_KRETPROBE(sl_kr_udp6_recvmsg, int ret)
{
	return recv_kretprobe(ctx, ret);
}

/* tcp_bpf_sendmsg/tcp_bpf_recvmsg (see sl_fx_tcp_bpf_sendmsg): their own
 * stash, as they call tcp_sendmsg/tcp_recvmsg, whose kprobes use the others. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct msg_stash);
} psock_stash SEC(".maps");

static __always_inline int psock_kretprobe(void *ctx, long ret, bool recv)
{
	struct msg_stash st;
	struct sock *sk;

	if (!take_msg(&psock_stash, &st) || ret < 0 || (!recv && !ret) || (st.flags & MSG_PEEK))
		return 0;
	sk = (struct sock *)st.sk;
	tcp_touch(ctx, sk, kprobe_cookie(sk), ret, st.flags, recv, true, SL_TIER_KPROBE, SL_PROBED);
	return 0;
}

SEC("kprobe/tcp_bpf_sendmsg")
int BPF_KPROBE(sl_kp_tcp_bpf_sendmsg, struct sock *sk, struct msghdr *msg)
{
	return stash_msg(&psock_stash, sk, msg, 0);
}

SEC("kretprobe/tcp_bpf_sendmsg")
int BPF_KRETPROBE(sl_kr_tcp_bpf_sendmsg, int ret)
{
	return psock_kretprobe(ctx, ret, false);
}

SEC("kprobe/tcp_bpf_recvmsg")
int BPF_KPROBE(sl_kp_tcp_bpf_recvmsg)
{
	return recv_kprobe_to(ctx, &psock_stash);
}

SEC("kretprobe/tcp_bpf_recvmsg")
int BPF_KRETPROBE(sl_kr_tcp_bpf_recvmsg, int ret)
{
	return psock_kretprobe(ctx, ret, true);
}

/* ---- send / recv: tracepoint tier, tp_btf variant ----
 * sock:sock_send_length / sock_recv_length carry the socket and the return
 * value of every sendmsg/recvmsg, but not the peer of an unconnected UDP
 * socket. The cgroup sendmsg/recvmsg hooks run inside udp(v6)_sendmsg and
 * udp(v6)_recvmsg, on the same thread and just before those tracepoints, with
 * that peer: they stash it for the tracepoint. Syscall tracepoints could do it
 * too, but enabling any of them puts every syscall of every task on the slow
 * path (see BENCHMARKS.md). */

struct udp_peer {
	__u64 cookie;
	__u8 sa[SOCKADDR_COPY]; /* sockaddr_in / sockaddr_in6 layout */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct udp_peer);
} udp_send_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct udp_peer);
} udp_recv_peer SEC(".maps");

/* Cgroup sock_addr programs: always 1, they observe and never judge. A v4
 * program may not read user_ip6 at all, hence one body per family. */
static __always_inline int stash_udp_peer(void *map, struct bpf_sock_addr *ctx, bool v6)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct udp_peer p = {};
	__u16 family = v6 ? AF_INET6 : AF_INET;
	__u16 port = ctx->user_port; /* network order, low 16 bits */

	p.cookie = bpf_get_socket_cookie(ctx);
	p.sa[0] = family & 0xff;
	p.sa[1] = family >> 8;
	__builtin_memcpy(&p.sa[2], &port, 2);
	if (v6) {
		__u32 a[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
			       ctx->user_ip6[3] };

		__builtin_memcpy(&p.sa[8], a, 16);
	} else {
		__u32 a = ctx->user_ip4;

		__builtin_memcpy(&p.sa[4], &a, 4);
	}
	bpf_map_update_elem(map, &id, &p, BPF_ANY);
	return 1;
}

SEC("cgroup/sendmsg4")
int sl_cg_udp_send4(struct bpf_sock_addr *ctx)
{
	return stash_udp_peer(&udp_send_peer, ctx, false);
}

SEC("cgroup/sendmsg6")
int sl_cg_udp_send6(struct bpf_sock_addr *ctx)
{
	return stash_udp_peer(&udp_send_peer, ctx, true);
}

SEC("cgroup/recvmsg4")
int sl_cg_udp_recv4(struct bpf_sock_addr *ctx)
{
	return stash_udp_peer(&udp_recv_peer, ctx, false);
}

SEC("cgroup/recvmsg6")
int sl_cg_udp_recv6(struct bpf_sock_addr *ctx)
{
	return stash_udp_peer(&udp_recv_peer, ctx, true);
}

/* Every inet socket's release, in process context (close of its last fd):
 * the end of a UDP socket for the tracepoint tier, which has no tracepoint
 * for it. Observes only. The context is the socket itself, and the socket's
 * address is the key of conns. */
SEC("cgroup/sock_release")
int sl_cg_sock_release(struct bpf_sock *ctx)
{
	if (ctx->protocol == IPPROTO_UDP)
		on_udp_gone((__u64)ctx);
	return 1;
}

/* This thread's stashed peer, if it was for this socket; always consumed. */
static __always_inline void take_udp_peer(void *map, __u64 cookie, __u8 *sa)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct udp_peer *p = bpf_map_lookup_elem(map, &id);

	if (!p)
		return;
	if (p->cookie == cookie)
		__builtin_memcpy(sa, p->sa, SOCKADDR_COPY);
	bpf_map_delete_elem(map, &id);
}

/* TCP or UDP over IPv4/IPv6: the only sockets accounted. The tracepoints fire
 * for every socket (unix, netlink, ...), so this comes before anything else. */
static __always_inline __u16 inet_proto(struct sock *sk, int btf)
{
	__u16 family = SL_READ(btf, sk, __sk_common.skc_family);
	__u16 proto;

	if (family != AF_INET && family != AF_INET6)
		return 0;
	proto = sock_proto(sk, btf);
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP ? proto : 0;
}

/* sendfile(2) on kernels where it reaches the socket through sock_sendmsg
 * (splice_to_socket, 6.5+): its bytes pass sock_send_length like any send and
 * are in tx already; the syscall the task is in tells sendfile from write or
 * splice. The loader sets this when both hooks use sock_send_length, so one
 * program does both (a second program on the tracepoint cost as much again
 * as the check). */
const volatile bool sendfile_in_send_len = false;

static __always_inline bool in_sendfile(void)
{
	struct pt_regs *regs = syscall_regs();

	return regs && SYSCALL_NR(regs) == SL_NR_SENDFILE;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(sl_tp_send_len, struct sock *sk, int ret, int flags)
{
	__u8 sa[SOCKADDR_COPY] = {};
	__u16 proto = inet_proto(sk, SL_BTF);
	__u64 cookie;

	if (!proto)
		return 0;
	if (proto == IPPROTO_TCP) {
		if (sendfile_in_send_len && ret > 0 && in_sendfile())
			on_sendfile_sk(sk, ret);
		if (tcp_bytes_from_seq) {
			tcp_touch(ctx, sk, 0, ret, 0, false, true, SL_TIER_TRACEPOINT, SL_CAST);
			return 0;
		}
	}
	cookie = tracing_cookie(sk);
	if (proto == IPPROTO_UDP)
		take_udp_peer(&udp_send_peer, cookie, sa);
	on_send_proto(sk, proto, cookie, sa, ret, SL_CAST);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sl_tp_recv_len, struct sock *sk, int ret, int flags)
{
	__u8 sa[SOCKADDR_COPY] = {};
	__u16 proto = inet_proto(sk, SL_BTF);
	__u64 cookie;

	if (!proto)
		return 0;
	if (proto == IPPROTO_TCP && tcp_bytes_from_seq) {
		tcp_touch(ctx, sk, 0, ret, flags, true, true, SL_TIER_TRACEPOINT, SL_CAST);
		return 0;
	}
	cookie = tracing_cookie(sk);
	if (proto == IPPROTO_UDP)
		take_udp_peer(&udp_recv_peer, cookie, sa);
	on_recv_proto(ctx, sk, proto, cookie, sa, ret, flags, SL_TIER_TRACEPOINT, SL_CAST);
	return 0;
}

/* ---- send / recv: tracepoint tier, syscall variant ----
 * For kernels without sock_send_length/sock_recv_length (before 6.3) or
 * without cgroup v2: the byte counts are the return values of the socket
 * syscalls (write, writev, sendto, sendmsg / read, readv, recvfrom, recvmsg)
 * on socket fds. The entry stashes the socket, the caller's sockaddr and the
 * flags; the exit accounts. sendmmsg/recvmmsg and splice are not seen here. */

struct sys_msg {
	__u64 sk;
	__u64 uaddr; /* the caller's sockaddr (user memory), or 0 */
	__s32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct sys_msg);
} sys_msg_stash SEC(".maps");

static __always_inline int sys_msg_enter(long fd, __u64 uaddr, long flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct socket *sock = socket_from_fd(fd);
	struct sys_msg m = { .uaddr = uaddr, .flags = flags };

	if (!sock)
		return 0;
	m.sk = (__u64)BPF_CORE_READ(sock, sk);
	if (!m.sk || !inet_proto((struct sock *)m.sk, SL_PROBED))
		return 0;
	bpf_map_update_elem(&sys_msg_stash, &id, &m, BPF_ANY);
	return 0;
}

static __always_inline __u64 user_msg_name(unsigned long umsg)
{
	void *name = NULL;

	bpf_probe_read_user(&name, sizeof(name), (void *)umsg); /* msg_name is first */
	return (__u64)name;
}

static __always_inline void read_user_sa(__u8 *sa, __u64 uaddr)
{
	if (uaddr && bpf_probe_read_user(sa, SOCKADDR_COPY, (void *)uaddr))
		bpf_probe_read_user(sa, 16, (void *)uaddr);
}

static __always_inline int sys_msg_exit(void *ctx, long ret, bool tx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sys_msg *m = bpf_map_lookup_elem(&sys_msg_stash, &id);
	__u8 sa[SOCKADDR_COPY] = {};
	struct sock *sk;
	__s32 flags;

	if (!m)
		return 0;
	sk = (struct sock *)m->sk;
	flags = m->flags;
	/* A recvfrom/recvmsg peer is in the caller's buffer only now, at the exit. */
	if (ret > 0)
		read_user_sa(sa, m->uaddr);
	bpf_map_delete_elem(&sys_msg_stash, &id);
	if (tx)
		on_send(sk, kprobe_cookie(sk), sa, ret, SL_PROBED);
	else
		on_recv(ctx, sk, kprobe_cookie(sk), sa, ret, flags, SL_TIER_TRACEPOINT, SL_PROBED);
	return 0;
}

#define SYS_MSG(name, enter_expr, tx)                                                              \
	SEC("tracepoint/syscalls/sys_enter_" #name)                                                \
	int sl_sys_##name##_enter(struct trace_event_raw_sys_enter *ctx)                           \
	{                                                                                          \
		return enter_expr;                                                                 \
	}                                                                                          \
	SEC("tracepoint/syscalls/sys_exit_" #name)                                                 \
	int sl_sys_##name##_exit(struct trace_event_raw_sys_exit *ctx)                             \
	{                                                                                          \
		return sys_msg_exit(ctx, ctx->ret, tx);                                            \
	}

/* args: write/read(fd, buf, n), sendto/recvfrom(fd, buf, n, flags, addr, len),
 * sendmsg/recvmsg(fd, msg, flags) */
SYS_MSG(write, sys_msg_enter(ctx->args[0], 0, 0), true)
SYS_MSG(writev, sys_msg_enter(ctx->args[0], 0, 0), true)
SYS_MSG(sendto, sys_msg_enter(ctx->args[0], ctx->args[4], ctx->args[3]), true)
SYS_MSG(sendmsg, sys_msg_enter(ctx->args[0], user_msg_name(ctx->args[1]), ctx->args[2]), true)
SYS_MSG(read, sys_msg_enter(ctx->args[0], 0, 0), false)
SYS_MSG(readv, sys_msg_enter(ctx->args[0], 0, 0), false)
SYS_MSG(recvfrom, sys_msg_enter(ctx->args[0], ctx->args[4], ctx->args[3]), false)
SYS_MSG(recvmsg, sys_msg_enter(ctx->args[0], user_msg_name(ctx->args[1]), ctx->args[2]), false)

/* ---- sendfile ---- */

SEC("fexit/do_sendfile")
int BPF_PROG(sl_fx_sendfile, int out_fd, int in_fd, loff_t *ppos, size_t count, loff_t max,
	     ssize_t ret)
{
	if (ret > 0)
		on_sendfile(socket_from_fd(out_fd), ret);
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __s32);
} sendfile_stash SEC(".maps");

static __always_inline int sendfile_enter(int out_fd)
{
	__u64 id = bpf_get_current_pid_tgid();

	stash_put(&sendfile_stash, &id, &out_fd);
	return 0;
}

static __always_inline int sendfile_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__s32 *fd = bpf_map_lookup_elem(&sendfile_stash, &id);
	__s32 out_fd;

	if (!fd) {
		stat_inc(SL_STAT_RET_MISSED);
		return 0;
	}
	out_fd = *fd;
	bpf_map_delete_elem(&sendfile_stash, &id);
	if (ret > 0)
		on_sendfile(socket_from_fd(out_fd), ret);
	return 0;
}

/* The same on its own, when the send hook is on another tier. */
SEC("tp_btf/sock_send_length")
int BPF_PROG(sl_tp_sendfile_len, struct sock *sk, int ret, int flags)
{
	if (ret > 0 && in_sendfile())
		on_sendfile_sk(sk, ret);
	return 0;
}

SEC("kprobe/do_sendfile")
int BPF_KPROBE(sl_kp_sendfile, int out_fd)
{
	return sendfile_enter(out_fd);
}

SEC("kretprobe/do_sendfile")
int BPF_KRETPROBE(sl_kr_sendfile, long ret)
{
	return sendfile_exit(ret);
}

SEC("tracepoint/syscalls/sys_enter_sendfile64")
int sl_tp_sendfile_enter(struct trace_event_raw_sys_enter *ctx)
{
	return sendfile_enter((int)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_exit_sendfile64")
int sl_tp_sendfile_exit(struct trace_event_raw_sys_exit *ctx)
{
	return sendfile_exit(ctx->ret);
}

/* ---- retransmit ---- */

SEC("fentry/tcp_retransmit_skb")
int BPF_PROG(sl_fe_retransmit, struct sock *sk)
{
	on_retransmit(ctx, sk, SL_TIER_FENTRY);
	return 0;
}

SEC("kprobe/tcp_retransmit_skb")
int BPF_KPROBE(sl_kp_retransmit, struct sock *sk)
{
	on_retransmit(ctx, sk, SL_TIER_KPROBE);
	return 0;
}

/* BTF-typed: the raw record's layout differs between releases (its own event
 * class since 6.13), the first argument does not. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(sl_tp_retransmit, struct sock *sk)
{
	on_retransmit(ctx, sk, SL_TIER_TRACEPOINT);
	return 0;
}

/* ---- seeding: sockets that existed before socklens started ----
 * Socket iterators walk the TCP and UDP tables of the netns of the task that
 * reads them; the loader reads them once per network namespace. The owner of
 * a seeded socket is found in user space from its inode (/proc/PID/fd). */

/* Slot 0: 1 while seeding at start; 0 when only refreshing tracked entries
 * (RTT and retransmits move on ACKs, which no hook here sees). */
/* seed_mode[0]: adopt new sockets (1) or refresh only (0); [1]: the pass's
 * generation, stamped on every entry the pass sees. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} seed_mode SEC(".maps");

/* An entry the pass found tracked already: its state, RTT and counts now. */
static __always_inline void seed_refresh(struct sl_conn *c, struct sock *sk, struct tcp_sock *tp,
					 __u32 *gen)
{
	if (gen)
		c->seen_gen = *gen;
	conn_steer(c, sk); /* what kprobes could not read at connect */
	/* the state hook skips the transitions in between (state_matters) */
	c->state = sk->__sk_common.skc_state;
	read_tcp_info(c, tp, SL_BTF);
	if (tcp_bytes_from_seq && tp && c->state != SL_TCP_CLOSE) {
		if (tcp_has_psock(sk, SL_BTF))
			tcp_accel_mark(c);
		tcp_accel_sync(c, sk, true);
		tcp_seq_sync_tx(c, tp, tcp_fin_queued(c->state), SL_BTF);
		tcp_seq_sync_rx(c, tp, SL_BTF);
	}
}

static __always_inline void seed(struct sock *sk, struct tcp_sock *tp)
{
	__u64 key = (__u64)sk;
	__u32 zero = 0, one = 1;
	__u32 *seeding = bpf_map_lookup_elem(&seed_mode, &zero);
	__u32 *gen = bpf_map_lookup_elem(&seed_mode, &one);
	bool adopt = seeding && *seeding;
	struct sl_conn *c;
	bool waits;
	int err;

	/* At start nearly every socket is new: insert first, and look up only
	 * the few a hook tracked since attach. A refresh finds nearly every
	 * socket tracked: look up first. */
	if (!adopt) {
		c = bpf_map_lookup_elem(&conns, &key);
		if (c) {
			seed_refresh(c, sk, tp, gen);
			return;
		}
		/* A refresh adopts new listeners too: without bind/listen
		 * events the listen hook stays off on the tracepoint tier
		 * (syscall tracepoints). And connections whose start every
		 * hook missed: the start pass took all older ones. */
		if (sk->__sk_common.skc_state != SL_TCP_LISTEN) {
			if (tp)
				c = conn_recover(sk, tracing_cookie(sk),
						 tcp_active_open(sk, SL_BTF), false, SL_BTF);
			if (c)
				seed_refresh(c, sk, tp, gen);
			return;
		}
	}
	c = conn_fresh(sk, tracing_cookie(sk), SL_DIR_UNKNOWN, false, SL_BTF);
	if (!c)
		return;
	c->flags |= SL_CONN_SEEDED;
	conn_steer(c, sk);
	if (tcp_bytes_from_seq && tp) {
		tcp_seq_base_now(c, tp);
		if (tcp_has_psock(sk, SL_BTF))
			tcp_accel_mark(c);
	}
	if (gen)
		c->seen_gen = *gen;
	if (c->state == SL_TCP_ESTABLISHED)
		c->flags |= SL_CONN_ESTABLISHED;
	read_tcp_info(c, tp, SL_BTF);
	/* Its first send or receive claims it (tcp_touch); a listener has none. */
	waits = tcp_bytes_from_seq && tp && c->cookie && c->state != SL_TCP_LISTEN;
	if (waits)
		c->flags |= SL_CONN_WAITING;
	err = conn_put(sk, c, BPF_NOEXIST);
	if (err == -SL_EEXIST) {
		/* A hook tracked it meanwhile, as a connection of its own. */
		c = bpf_map_lookup_elem(&conns, &key);
		if (c)
			seed_refresh(c, sk, tp, gen);
		return;
	}
	/* Counted once inserted: a use in between is missed, the next one claims. */
	if (!err && waits)
		waiting_count(c->cookie);
}

SEC("iter/tcp")
int sl_seed_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc); /* full sockets only: no TIME_WAIT, no request socks */
	if (tp)
		seed((struct sock *)tp, tp);
	return 0;
}

SEC("iter/udp")
int sl_seed_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (udp && track_udp)
		seed((struct sock *)udp, NULL);
	return 0;
}
