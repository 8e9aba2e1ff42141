/* Connection accounting: the hook bodies. Every attach tier's wrapper in
 * socklens.bpf.c ends up in one of the on_* functions below. */
#ifndef SOCKLENS_CONN_H
#define SOCKLENS_CONN_H

#include "common.bpf.h"

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define MSG_PEEK 2

/* TCP states (include/net/tcp_states.h) */
#define SL_TCP_ESTABLISHED 1
#define SL_TCP_SYN_SENT 2
#define SL_TCP_SYN_RECV 3
#define SL_TCP_CLOSE 7
#define SL_TCP_LISTEN 10

/* Set by the loader from what the prober found in BTF. */
const volatile bool track_conns = false;
/* false for snapshot-only users (`conns`): the maps are read, no event is sent. */
const volatile bool conn_events = true;
/* Whether the send hook misses sendfile data, so the sendfile hook must add it
 * to tx_bytes: kernels with tcp_sendpage (before 6.5) send it without
 * tcp_sendmsg or sock_sendmsg, and the syscall variant of the tracepoint tier
 * sees only the send syscalls. */
const volatile bool sendfile_adds_tx = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the loader sets --max-conns */
	__type(key, __u64);
	__type(value, struct sl_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sl_udp_key);
	__type(value, struct sl_udp_flow);
} udp_flows SEC(".maps");

/* Room for records too big for the 512-byte BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sl_conn_event);
} conn_scratch SEC(".maps");

static __always_inline struct sl_conn_event *scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&conn_scratch, &zero);
}

static __always_inline __u16 sock_proto(struct sock *sk)
{
	return BPF_CORE_READ(sk, sk_protocol);
}

static __always_inline void read_tuple(struct sl_conn *c, struct sock *sk)
{
	c->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	c->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	c->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (c->family == AF_INET6) {
		BPF_CORE_READ_INTO(&c->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&c->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		BPF_CORE_READ_INTO(&c->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO(&c->daddr, sk, __sk_common.skc_daddr);
	}
}

/* RTT and the retransmission count straight from tcp_sock. */
static __always_inline void read_tcp_info(struct sl_conn *c, struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	if (c->proto != IPPROTO_TCP)
		return;
	c->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
	c->rttvar_us = BPF_CORE_READ(tp, mdev_us) >> 2;
	c->retransmits = BPF_CORE_READ(tp, total_retrans);
}

/* Pid/comm/cgroup of the current task: only called in process context. */
static __always_inline void set_owner(struct sl_conn *c)
{
	__u64 id;

	if (c->flags & SL_CONN_OWNER)
		return;
	id = bpf_get_current_pid_tgid();
	c->pid = id >> 32;
	c->uid = (__u32)bpf_get_current_uid_gid();
	c->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	c->flags |= SL_CONN_OWNER;
}

/* First process-context use of a socket tracked from softirq (an accepted
 * connection when the accept hook is not attached): it belongs to this task. */
static __always_inline void claim(struct sl_conn *c, struct sock *sk)
{
	if (c->flags & SL_CONN_OWNER)
		return;
	set_owner(c);
	if (!c->ino)
		c->ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
}

/* The entry of a socket, created if new. `in_task` says the current task owns
 * the socket (process context), so task filters apply and the owner is known. */
static __always_inline struct sl_conn *conn_track(struct sock *sk, __u64 cookie, __u8 direction,
						  bool in_task)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct sl_conn_event *tmp;
	struct socket *sock;
	long err;

	if (c)
		return c;
	if ((in_task && !task_wanted()) || !sock_wanted(sk))
		return NULL;
	tmp = scratch();
	if (!tmp)
		return NULL;
	__builtin_memset(&tmp->conn, 0, sizeof(tmp->conn));
	tmp->conn.cookie = cookie;
	tmp->conn.start_ns = bpf_ktime_get_ns();
	tmp->conn.netns = sock_netns(sk);
	tmp->conn.proto = sock_proto(sk);
	tmp->conn.state = BPF_CORE_READ(sk, __sk_common.skc_state);
	tmp->conn.direction = direction;
	sock = BPF_CORE_READ(sk, sk_socket); /* none yet for a passive open */
	if (sock)
		tmp->conn.ino = BPF_CORE_READ(sock, file, f_inode, i_ino);
	read_tuple(&tmp->conn, sk);
	if (in_task)
		set_owner(&tmp->conn);
	err = bpf_map_update_elem(&conns, &key, &tmp->conn, BPF_NOEXIST);
	if (err && err != -17 /* EEXIST: another CPU won the race */) {
		stat_inc(SL_STAT_UNTRACKED);
		return NULL;
	}
	return bpf_map_lookup_elem(&conns, &key);
}

static __always_inline void emit_conn(void *ctx, __u32 kind, __u32 tier, struct sock *sk,
				      struct sl_conn *c)
{
	struct sl_conn_event *e;

	if (!conn_events)
		return;
	e = scratch();
	if (!e)
		return;
	e->kind = kind;
	e->tier = tier;
	e->ts_ns = bpf_ktime_get_ns();
	e->sk = (__u64)sk;
	e->conn = *c;
	output(ctx, e, sizeof(*e));
}

/* conn_track for process-context hooks (accept, send, recv): a TCP socket
 * already in TCP_CLOSE was reported and removed when it got there (say, reset
 * before accept() returned it); tracking it again would leave an entry that
 * no state change will ever close. */
static __always_inline struct sl_conn *conn_track_open(struct sock *sk, __u64 cookie,
						       __u8 direction)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c = bpf_map_lookup_elem(&conns, &key);

	if (c)
		return c;
	if (sock_proto(sk) == IPPROTO_TCP &&
	    BPF_CORE_READ(sk, __sk_common.skc_state) == SL_TCP_CLOSE)
		return NULL;
	return conn_track(sk, cookie, direction, true);
}

/* ---- TCP lifecycle ---------------------------------------------------- */

static __always_inline void finish(void *ctx, struct sock *sk, struct sl_conn *c, __u32 tier)
{
	__u64 key = (__u64)sk;

	emit_conn(ctx, SL_EV_CLOSE, tier, sk, c);
	bpf_map_delete_elem(&conns, &key);
}

/* TCP_CLOSE. A socket the application still holds can reach it with received
 * data unread (FIN_WAIT2 -> TIME_WAIT hands the tuple to a timewait sock):
 * the record is final only once those bytes are read. */
static __always_inline void on_closed(void *ctx, struct sock *sk, struct sl_conn *c, int old,
				      __u32 tier)
{
	__u64 key = (__u64)sk;

	if (old == SL_TCP_LISTEN) {
		bpf_map_delete_elem(&conns, &key); /* a listener, not a connection */
		return;
	}
	if (!c->end_ns) {
		c->end_ns = bpf_ktime_get_ns();
		c->error = BPF_CORE_READ(sk, sk_err);
	}
	if (!c->sport) /* connect failed after binding a port, then unhashed it */
		c->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	if (BPF_CORE_READ(sk, sk_socket) && BPF_CORE_READ(sk, sk_receive_queue.qlen) > 0) {
		c->flags |= SL_CONN_DRAINING;
		return;
	}
	finish(ctx, sk, c, tier);
}

/* Only these transitions change what socklens records; the others (FIN_WAIT1,
 * FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING) are six of a short connection's ten
 * state changes, so the wrappers return before any kernel read. Snapshots take
 * the current state from the socket iterator. */
static __always_inline bool state_matters(int new)
{
	return new == SL_TCP_SYN_SENT || new == SL_TCP_ESTABLISHED || new == SL_TCP_CLOSE;
}

static __always_inline void on_state(void *ctx, struct sock *sk, __u64 cookie, int old, int new,
				     __u32 tier)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c;

	if (sock_proto(sk) != IPPROTO_TCP)
		return;
	if (new == SL_TCP_SYN_SENT) {
		/* connect(): process context, the caller owns it. */
		c = conn_track(sk, cookie, SL_DIR_OUT, true);
	} else if (new == SL_TCP_ESTABLISHED && old == SL_TCP_SYN_RECV) {
		/* A passive open completes in softirq: the owner comes with accept(). */
		c = conn_track(sk, cookie, SL_DIR_IN, false);
	} else {
		c = bpf_map_lookup_elem(&conns, &key);
	}
	if (!c)
		return;
	c->state = new;
	/* Ten state changes per short connection: only the ones that report
	 * read RTT and retransmissions. */
	if (new == SL_TCP_ESTABLISHED) {
		c->flags |= SL_CONN_ESTABLISHED;
		read_tcp_info(c, sk);
		if (old == SL_TCP_SYN_SENT) {
			read_tuple(c, sk); /* the local port of a connect is bound after SYN_SENT */
			emit_conn(ctx, SL_EV_CONNECT, tier, sk, c);
		}
	} else if (new == SL_TCP_CLOSE) {
		read_tcp_info(c, sk);
		on_closed(ctx, sk, c, old, tier);
	}
}
/* A listening socket (process context), so `conns` shows listeners like ss. */
static __always_inline void on_listening(struct sock *sk)
{
	struct sl_conn *c;

	if (!track_conns)
		return;
	c = conn_track(sk, 0, SL_DIR_UNKNOWN, true);
	if (c)
		c->state = SL_TCP_LISTEN;
}

static __always_inline void on_accept(void *ctx, struct sock *sk, __u64 cookie, __u32 tier)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c;

	if (!sk)
		return;
	c = bpf_map_lookup_elem(&conns, &key);
	if (c && !task_wanted()) {
		/* Tracked from softirq before its owner was known; not wanted after all. */
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	if (!c)
		c = conn_track_open(sk, cookie, SL_DIR_IN);
	if (!c)
		return;
	set_owner(c);
	c->ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	if (!c->cookie)
		c->cookie = cookie;
	emit_conn(ctx, SL_EV_ACCEPT, tier, sk, c);
}

static __always_inline void on_retransmit(void *ctx, struct sock *sk, __u32 tier)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c = bpf_map_lookup_elem(&conns, &key);

	if (!c)
		return;
	read_tcp_info(c, sk);
	emit_conn(ctx, SL_EV_RETRANSMIT, tier, sk, c);
}

/* ---- bytes ------------------------------------------------------------ */

/* Peer of a UDP datagram: the connected peer, else the sockaddr the caller
 * named (`sa`: a kernel-readable copy, or NULL when unknown). */
static __always_inline void udp_peer(struct sl_udp_key *k, struct sock *sk, const __u8 *sa)
{
	__u16 family;

	k->sk = (__u64)sk;
	k->port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (k->port) {
		k->family = BPF_CORE_READ(sk, __sk_common.skc_family);
		if (k->family == AF_INET6)
			BPF_CORE_READ_INTO(&k->addr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
		else
			BPF_CORE_READ_INTO(&k->addr, sk, __sk_common.skc_daddr);
		return;
	}
	if (!sa)
		return;
	family = sa[0] | (sa[1] << 8);
	k->family = family;
	k->port = (sa[2] << 8) | sa[3];
	if (family == AF_INET6)
		__builtin_memcpy(k->addr, sa + 8, 16);
	else
		__builtin_memcpy(k->addr, sa + 4, 4);
}

static __always_inline void udp_account(struct sock *sk, const __u8 *sa, long bytes, bool tx)
{
	struct sl_udp_key k = {};
	struct sl_udp_flow *f;
	__u64 now = bpf_ktime_get_ns();

	udp_peer(&k, sk, sa);
	f = bpf_map_lookup_elem(&udp_flows, &k);
	if (!f) {
		struct sl_udp_flow init = { .first_ns = now, .direction = tx ? SL_DIR_OUT : SL_DIR_IN };
		long err = bpf_map_update_elem(&udp_flows, &k, &init, BPF_NOEXIST);

		if (err && err != -17) {
			stat_inc(SL_STAT_UDP_UNTRACKED);
			return;
		}
		f = bpf_map_lookup_elem(&udp_flows, &k);
		if (!f)
			return;
	}
	f->last_ns = now;
	if (tx) {
		__sync_fetch_and_add(&f->tx_bytes, bytes);
		__sync_fetch_and_add(&f->tx_packets, 1);
	} else {
		__sync_fetch_and_add(&f->rx_bytes, bytes);
		__sync_fetch_and_add(&f->rx_packets, 1);
	}
}

/* The byte hooks run on every send and receive: they leave RTT and the
 * retransmission count alone (state changes, retransmits and snapshots read
 * those), as each kernel read is a helper call here. */

/* sendmsg on a TCP/UDP socket (`proto`) returned `ret` (bytes accepted, or -errno). */
static __always_inline void on_send_proto(struct sock *sk, __u16 proto, __u64 cookie,
					  const __u8 *sa, long ret)
{
	struct sl_conn *c;

	if (ret <= 0)
		return;
	c = conn_track_open(sk, cookie, SL_DIR_UNKNOWN);
	if (!c)
		return;
	claim(c, sk);
	if (proto == IPPROTO_TCP)
		__sync_fetch_and_add(&c->tx_bytes, ret);
	else
		udp_account(sk, sa, ret, true);
}

static __always_inline void on_send(struct sock *sk, __u64 cookie, const __u8 *sa, long ret)
{
	__u16 proto;

	if (ret <= 0 || !sk)
		return;
	proto = sock_proto(sk);
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		on_send_proto(sk, proto, cookie, sa, ret);
}

/* recvmsg returned `ret` bytes to the application; peeks leave data queued. */
static __always_inline void on_recv_proto(void *ctx, struct sock *sk, __u16 proto, __u64 cookie,
					  const __u8 *sa, long ret, int flags, __u32 tier)
{
	struct sl_conn *c;

	if (ret <= 0 || (flags & MSG_PEEK))
		return;
	c = conn_track_open(sk, cookie, SL_DIR_UNKNOWN);
	if (!c)
		return;
	claim(c, sk);
	if (proto == IPPROTO_TCP) {
		__sync_fetch_and_add(&c->rx_bytes, ret);
		if ((c->flags & SL_CONN_DRAINING) && !BPF_CORE_READ(sk, sk_receive_queue.qlen))
			finish(ctx, sk, c, tier);
	} else {
		udp_account(sk, sa, ret, false);
	}
}

static __always_inline void on_recv(void *ctx, struct sock *sk, __u64 cookie, const __u8 *sa,
				    long ret, int flags, __u32 tier)
{
	__u16 proto;

	if (ret <= 0 || !sk || (flags & MSG_PEEK))
		return;
	proto = sock_proto(sk);
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		on_recv_proto(ctx, sk, proto, cookie, sa, ret, flags, tier);
}

/* sendfile(2) moved `ret` bytes into the socket. */
static __always_inline void on_sendfile_sk(struct sock *sk, long ret)
{
	struct sl_conn *c;

	if (ret <= 0 || !sk || sock_proto(sk) != IPPROTO_TCP)
		return;
	c = conn_track(sk, 0, SL_DIR_UNKNOWN, true);
	if (!c)
		return;
	__sync_fetch_and_add(&c->sendfile_bytes, ret);
	if (sendfile_adds_tx)
		__sync_fetch_and_add(&c->tx_bytes, ret);
}

/* sendfile(2) moved `ret` bytes into the socket behind out_fd. */
static __always_inline void on_sendfile(struct socket *sock, long ret)
{
	if (sock)
		on_sendfile_sk(BPF_CORE_READ(sock, sk), ret);
}

#endif
