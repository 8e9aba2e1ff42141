/* Connection accounting: the hook bodies. Every attach tier's wrapper in
 * socklens.bpf.c ends up in one of the on_* functions below. */
#ifndef SOCKLENS_CONN_H
#define SOCKLENS_CONN_H

#include "common.bpf.h"
#include "policy.h"
#include "xlate.bpf.h"
#include "accel_bytes.bpf.h"

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define MSG_PEEK 2
/* Map helpers' errors are compared as int (see conn_put). */
#define SL_EEXIST 17

/* TCP states (include/net/tcp_states.h) */
#define SL_TCP_ESTABLISHED 1
#define SL_TCP_SYN_SENT 2
#define SL_TCP_SYN_RECV 3
#define SL_TCP_TIME_WAIT 6
#define SL_TCP_CLOSE 7
#define SL_TCP_FIN_WAIT1 4
#define SL_TCP_CLOSE_WAIT 8
#define SL_TCP_LAST_ACK 9
#define SL_TCP_LISTEN 10
#define SL_TCP_NEW_SYN_RECV 12

/* Set by the loader from what the prober found in BTF. */
const volatile bool track_conns = false;
/* false for snapshot-only users (`conns`): the maps are read, no event is sent. */
const volatile bool conn_events = true;
/* UDP sockets and flows: only for users that read snapshots, whose refreshes
 * remove closed sockets (src/session/seed.rs, sweep). */
const volatile bool track_udp = false;
/* Whether the send hook misses sendfile data, so the sendfile hook must add it
 * to tx_bytes: kernels with tcp_sendpage (before 6.5) send it without
 * tcp_sendmsg or sock_sendmsg, and the syscall variant of the tracepoint tier
 * sees only the send syscalls. */
const volatile bool sendfile_adds_tx = false;

/* TCP bytes from the socket's own counters, not per-call hooks, so a hook run
 * the kernel skips cannot lose bytes; the send and receive hooks only claim
 * owners and find late sockets (docs/accounting.md, "Kernel side"). */
const volatile bool tcp_bytes_from_seq = false;

/* Test knobs (SOCKLENS_DISABLE=state_close, state_start): the state hook
 * ignores TCP_CLOSE, or the start of a connection (SYN_SENT, and a passive
 * open's ESTABLISHED), as when the kernel skips its run. */
const volatile bool state_skips_close = false;
const volatile bool state_skips_start = false;
/* SOCKLENS_DISABLE=udp_send: every UDP send run is skipped and counted as
 * missed, as when the kernel skips it; UDP has no counters to recover from. */
const volatile bool udp_sends_skipped = false;
/* SOCKLENS_DISABLE=accel_calls: the send and receive hooks count no redirected
 * bytes, as when the kernel skips every run; only slp_accel_bytes can. */
const volatile bool accel_calls_blind = false;
/* SOCKLENS_DISABLE=conn_hooks: the state, accept, send, receive and sendfile
 * hooks ignore TCP connections, so only the destruction hook sees them. */
const volatile bool conn_hooks_blind = false;

/* Seeded sockets whose owner is not known yet, counted by a hash of their
 * cookie: a send or receive on a socket whose slot counts none costs one array
 * load, not a hash lookup (docs/accounting.md, "Kernel side"). */
#define SL_WAITING_BITS 18
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << SL_WAITING_BITS); /* 1 when conns are not tracked */
	__type(key, __u32);
	__type(value, __u32);
} seeded_waiting SEC(".maps");

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

/* Sockets whose close was reported, until the kernel frees them: the
 * destruction hook tells them from a connection no other hook ever saw (its
 * start, calls and close all skipped). LRU: a skipped destruction run leaves
 * a key that ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* the loader sets --max-conns */
	__type(key, __u64);
	__type(value, __u8);
} reported SEC(".maps");

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

static __always_inline __u16 sock_proto(struct sock *sk, int btf)
{
	return SL_READ(btf, sk, sk_protocol);
}

static __always_inline __u64 kprobe_cookie(struct sock *sk)
{
	/* kprobes cannot call the cookie helper: take it if already assigned. */
	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

/* Tracing programs (fentry/fexit, tp_btf, iter) may call the cookie helper only
 * on kernels that offer it to them (5.12+; on 5.10 the verifier refuses the
 * whole object with "unknown func bpf_get_socket_cookie"). The loader sets this
 * from a trial load (src/host/probe.rs, kernel_shape); without it they read the
 * cookie like kprobes do. The branch is on read-only data: the verifier drops
 * the dead call. */
const volatile bool tracing_has_cookie_helper = false;

static __always_inline __u64 tracing_cookie(struct sock *sk)
{
	if (tracing_has_cookie_helper)
		return bpf_get_socket_cookie(sk);
	return kprobe_cookie(sk);
}

/* The cookie as each kind of program may take it: `btf` is a tracing
 * program's, which may ask the helper. */
static __always_inline __u64 sock_cookie(struct sock *sk, int btf)
{
	return btf ? tracing_cookie(sk) : kprobe_cookie(sk);
}

/* The tcp_sock of a TCP socket (NULL for anything else). With BTF-typed
 * pointers the verifier refuses loads past struct sock through a
 * `struct sock *`: the helper gives a checked one, or, where the kernel has
 * casts, the same checks (the helper's: a full TCP stream socket) precede a
 * cast. */
static __always_inline struct tcp_sock *tcp_sk_of(struct sock *sk, int btf)
{
	if (btf == SL_CAST) {
		if (sk->__sk_common.skc_state == SL_TCP_NEW_SYN_RECV ||
		    sk->__sk_common.skc_state == SL_TCP_TIME_WAIT || sk->sk_type != SOCK_STREAM ||
		    sk->sk_protocol != IPPROTO_TCP)
			return NULL;
		return bpf_core_cast(sk, struct tcp_sock);
	}
	return btf ? bpf_skc_to_tcp_sock(sk) : (struct tcp_sock *)sk;
}

static __always_inline void read_tuple(struct sl_conn *c, struct sock *sk, int btf)
{
	c->family = SL_READ(btf, sk, __sk_common.skc_family);
	c->sport = SL_READ(btf, sk, __sk_common.skc_num);
	c->dport = bpf_ntohs(SL_READ(btf, sk, __sk_common.skc_dport));
	if (c->family == AF_INET6) {
		/* One helper call copies each 16-byte address either way. */
		BPF_CORE_READ_INTO(&c->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&c->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		__be32 saddr = SL_READ(btf, sk, __sk_common.skc_rcv_saddr);
		__be32 daddr = SL_READ(btf, sk, __sk_common.skc_daddr);

		__builtin_memcpy(c->saddr, &saddr, sizeof(saddr));
		__builtin_memcpy(c->daddr, &daddr, sizeof(daddr));
	}
}

/* RTT and the retransmission count straight from tcp_sock. */
static __always_inline void read_tcp_info(struct sl_conn *c, struct tcp_sock *tp, int btf)
{
	if (c->proto != IPPROTO_TCP || !tp)
		return;
	c->srtt_us = SL_READ(btf, tp, srtt_us) >> 3;
	c->rttvar_us = SL_READ(btf, tp, mdev_us) >> 2;
	c->retransmits = SL_READ(btf, tp, total_retrans);
	c->tx_total = SL_READ(btf, tp, bytes_acked);
	c->rx_total = SL_READ(btf, tp, bytes_received);
}

/* Pid/comm/cgroup of the current task: only called in process context. An
 * entry made in softirq (a passive open) gets its owner from its first
 * process-context use; one that has an owner keeps it. SL_CAST programs
 * read them from the task with one helper call instead of four; the values
 * are the helpers' (tgid, real uid in the initial user namespace,
 * default-hierarchy cgroup id, comm). */
static __always_inline void set_owner(struct sl_conn *c, int btf)
{
	struct task_struct *task;
	__u64 id;

	if (c->flags & SL_CONN_OWNER)
		return;
	if (btf == SL_CAST) {
		task = bpf_get_current_task_btf();
		c->pid = task->tgid;
		c->uid = task->cred->uid.val;
		c->cgroup_id = task->cgroups->dfl_cgrp->kn->id;
		__builtin_memcpy(c->comm, task->comm, sizeof(c->comm));
		c->flags |= SL_CONN_OWNER;
		return;
	}
	id = bpf_get_current_pid_tgid();
	c->pid = id >> 32;
	c->uid = (__u32)bpf_get_current_uid_gid();
	c->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	c->flags |= SL_CONN_OWNER;
}

/* The seeded_waiting slot of a socket, by its cookie: a number the socket
 * keeps for life (its address is a pointer the verifier will not hash), and
 * one every seeded and tracked socket has (the hooks ask for it). Fibonacci
 * hashing: cookies are consecutive. */
static __always_inline __u32 *waiting_slot(__u64 cookie)
{
	__u32 slot = (cookie * 0x9E3779B97F4A7C15ULL) >> (64 - SL_WAITING_BITS);

	return bpf_map_lookup_elem(&seeded_waiting, &slot);
}

/* The largest cookie ever counted in seeded_waiting. The kernel hands out
 * cookies from one counter (each CPU takes a batch of 4,096 at a time), so
 * nearly every socket made after the start pass has a larger one, and this
 * one load spares it the slot: a random line of a 2 MiB array, a cache and
 * TLB miss on the first send and receive of each new connection (measured
 * under churn: 60-110 ns per send and 50-75 ns per receive). Only the seed
 * pass writes it, from one thread. */
volatile __u64 seeded_cookie_max = 0;

/* Whether a seeded socket may be waiting for its owner (see seeded_waiting).
 * A socket without a cookie was never seeded. */
static __always_inline bool maybe_waiting(struct sock *sk)
{
	__u64 cookie = sk->__sk_common.skc_cookie.counter;
	__u32 *n;

	if (!cookie || cookie > seeded_cookie_max)
		return false;
	n = waiting_slot(cookie);
	return n && *(volatile __u32 *)n;
}

/* Counts a socket whose entry carries SL_CONN_WAITING. */
static __always_inline void waiting_count(__u64 cookie)
{
	__u32 *n = waiting_slot(cookie);

	if (cookie > seeded_cookie_max)
		seeded_cookie_max = cookie;
	if (n)
		__sync_fetch_and_add(n, 1);
}

/* Its owner is known, or the entry goes: no longer counted as waiting. */
static __always_inline void waiting_done(struct sl_conn *c)
{
	__u32 *n;

	if (!(c->flags & SL_CONN_WAITING))
		return;
	c->flags &= ~SL_CONN_WAITING;
	n = waiting_slot(c->cookie);
	if (n)
		__sync_fetch_and_add(n, -1);
}

/* ---- TCP bytes from sequence counters (tcp_bytes_from_seq) ----
 * tx: sequence space the send side has used, as a 64-bit count: bytes the
 * peer acked (the kernel's own u64) plus what is queued or in flight beyond
 * them. That is every byte sendmsg, sendfile or splice accepted, plus the SYN
 * of an active open and a FIN once queued.
 * rx: sequence space the application consumed: bytes received in order (u64)
 * minus what still waits unread. That is every byte recvmsg or splice
 * delivered, MSG_PEEK excluded (it moves neither), plus a FIN once read.
 * Retransmissions move neither count. */
static __always_inline __u64 tcp_tx_total(struct tcp_sock *tp, int btf)
{
	return SL_READ(btf, tp, bytes_acked) +
	       (__u32)(SL_READ(btf, tp, write_seq) - SL_READ(btf, tp, snd_una));
}

static __always_inline __u64 tcp_rx_total(struct tcp_sock *tp, int btf)
{
	return SL_READ(btf, tp, bytes_received) -
	       (__u32)(SL_READ(btf, tp, rcv_nxt) - SL_READ(btf, tp, copied_seq));
}

/* A FIN is queued exactly when the socket enters FIN_WAIT1 (close or
 * shutdown from ESTABLISHED) or LAST_ACK (close from CLOSE_WAIT); these and
 * the states after them say it is in tx. */
static __always_inline bool tcp_fin_queued(int state)
{
	return state == 4 /* FIN_WAIT1 */ || state == 5 /* FIN_WAIT2 */ ||
	       state == 6 /* TIME_WAIT */ || state == 9 /* LAST_ACK */ ||
	       state == 11 /* CLOSING */;
}

/* The peer's FIN arrived (tcp_fin sets SOCK_DONE) and the application read
 * up to it: read() returned 0, which moved copied_seq past the FIN. */
static __always_inline bool tcp_fin_received(struct tcp_sock *tp, int btf)
{
	unsigned long done = 1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE);

	return SL_READ(btf, tp, inet_conn.icsk_inet.sk.__sk_common.skc_flags) & done;
}

static __always_inline bool tcp_fin_read(struct tcp_sock *tp, int btf)
{
	return tcp_fin_received(tp, btf) &&
	       SL_READ(btf, tp, copied_seq) == SL_READ(btf, tp, rcv_nxt);
}

/* Whether a child socket's (accepted) application had neither sent nor read
 * anything before this send or receive of `ret` bytes: then its counters hold
 * this call's bytes at most, besides a FIN the call read or one queued by
 * shutdown. A send that moved bytes cannot follow a queued FIN (shutdown
 * makes it fail), so only a failed one allows for one. Sockets of an active
 * open count their SYN: their first successful send does not pass, so a
 * client that speaks first costs no lookup; their first receive does when
 * the peer speaks first, one lookup of an entry their owner already holds. */
static __always_inline bool tcp_maybe_first_use(struct tcp_sock *tp, long ret, bool recv, bool syn,
						int btf)
{
	__u64 now = ret > 0 ? ret : 0;
	__u64 tx = tcp_tx_total(tp, btf);
	__u64 rx = tcp_rx_total(tp, btf) - tcp_fin_read(tp, btf);

	if (recv)
		return rx <= now && tx <= 1;
	return tx <= now + syn + (ret <= 0) && !rx;
}

static __always_inline __u64 seq_delta(__u64 total, __u64 base, __u64 fin)
{
	return total > base + fin ? total - base - fin : 0;
}

/* tx of `c` from the counters; `fin_queued`: a FIN took a sequence number. */
static __always_inline void tcp_seq_sync_tx(struct sl_conn *c, struct tcp_sock *tp, bool fin_queued,
					    int btf)
{
	c->tx_bytes = seq_delta(tcp_tx_total(tp, btf), c->tx_base, fin_queued) + c->accel_tx;
}

static __always_inline void tcp_seq_sync_rx(struct sl_conn *c, struct tcp_sock *tp, int btf)
{
	c->rx_bytes = seq_delta(tcp_rx_total(tp, btf), c->rx_base, tcp_fin_read(tp, btf)) + c->accel_rx;
}

/* A socket with a psock (in a sockmap or sockhash): sk_msg may hand its sends
 * to a peer, and its reads may come from the psock queue, past TCP. */
static __always_inline bool tcp_has_psock(struct sock *sk, int btf)
{
	return (unsigned long)SL_READ(btf, sk, sk_user_data) & SLP_SK_USER_DATA_PSOCK;
}

/* From here on its sends and reads are split. The counters as of its base:
 * exact for a socket that joined its sockhash before its first byte, as
 * [[accelerate]] ends do (docs/accelerate.md). */
static __always_inline void tcp_accel_mark(struct sl_conn *c)
{
	if (c->flags & SL_CONN_ACCEL)
		return;
	c->flags |= SL_CONN_ACCEL;
	c->tx_seen = c->tx_base;
	c->rx_seen = c->rx_base;
}

/* A send or read of `ret` bytes on a socket with a psock: the part of it the
 * sequence counters did not move since the last such call went past TCP. The
 * counters move only by this socket's own sends and reads (acks move
 * bytes_acked and snd_una alike), so the split is exact per call. */
static __always_inline void tcp_accel_count(struct sl_conn *c, struct tcp_sock *tp, long ret,
					    bool recv, int btf)
{
	__u64 now = recv ? tcp_rx_total(tp, btf) : tcp_tx_total(tp, btf);
	__u64 *seen = recv ? &c->rx_seen : &c->tx_seen;
	__u64 moved, n = ret > 0 ? ret : 0;

	tcp_accel_mark(c);
	moved = now - *seen;
	*seen = now;
	if (n > moved)
		__sync_fetch_and_add(recv ? &c->accel_rx : &c->accel_tx, n - moved);
}

/* The loader reuses the policy's pinned slp_accel_bytes (only where [[accelerate]]
 * runs, 6.12+, so the guarded reads below load everywhere). */
const volatile bool accel_join = false;

/* An [[accelerate]] end: sk_msg counted what it delivered to each end
 * (slp_accel_bytes), which no skipped tracing run can lose. tx is what its peer
 * received; rx, while the psock lives (`live`), what it received less what is
 * still queued, and after, what the release hook found read at close().
 * Returns whether both came from the counters. */
static __always_inline bool tcp_accel_exact(struct sl_conn *c, struct sock *sk, bool live)
{
	struct slp_accel_bytes *mine, *theirs;
	struct slp_accel_key own, peer;
	__u64 cookie;

	if (!accel_join || !bpf_core_field_exists(struct net, net_cookie) ||
	    (c->flags & SL_CONN_SEEDED))
		return false;
	/* The record's tuple: a closed socket's local port is gone (inet_put_port). */
	__builtin_memset(&own, 0, sizeof(own));
	__builtin_memcpy(own.laddr, c->saddr, 16);
	__builtin_memcpy(own.raddr, c->daddr, 16);
	own.lport = c->sport;
	own.rport = c->dport;
	own.family = c->family;
	own.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, net_cookie);
	accel_peer_key(&own, &peer);
	cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	mine = bpf_map_lookup_elem(&slp_accel_bytes, &own);
	if (!mine || mine->cookie != cookie)
		return false;
	theirs = bpf_map_lookup_elem(&slp_accel_bytes, &peer);
	if (!theirs || theirs->cookie != mine->peer_cookie || theirs->peer_cookie != cookie)
		return false;
	tcp_accel_mark(c);
	c->accel_tx = theirs->delivered;
	if (live)
		return accel_read(sk, mine->delivered, &c->accel_rx);
	if (!mine->released)
		return false;
	c->accel_rx = mine->read;
	return true;
}

/* Before a sync of tx/rx: the counters where they apply, and the flag that
 * says whether the record still rests on per-call counts. */
static __always_inline void tcp_accel_sync(struct sl_conn *c, struct sock *sk, bool live)
{
	if (tcp_accel_exact(c, sk, live))
		c->flags |= SL_CONN_ACCEL_EXACT;
	else
		c->flags &= ~SL_CONN_ACCEL_EXACT;
}

/* Counting from the start of a new connection: the counters start at zero on
 * a new socket, and an active open's SYN takes one; a child socket's start
 * after the handshake, so data of a Fast Open SYN counts too. */
static __always_inline void tcp_seq_base_start(struct sl_conn *c, bool active)
{
	c->tx_base = active;
	c->rx_base = 0;
}

/* Counting from now: for sockets that existed before start. */
static __always_inline void tcp_seq_base_now(struct sl_conn *c, struct tcp_sock *tp)
{
	c->tx_base = tcp_tx_total(tp, SL_BTF);
	c->rx_base = tcp_rx_total(tp, SL_BTF);
}

/* Whether a socket found without an entry opened actively, so that its SYN
 * is in its tx count: an accepted socket is a copy of its listener and keeps
 * the listener's backlog; one that connected never had one. */
static __always_inline bool tcp_active_open(struct sock *sk, int btf)
{
	return !SL_READ(btf, sk, sk_max_ack_backlog);
}

/* A new entry for a socket, built in the per-CPU scratch and not inserted
 * yet (conn_put), so that callers that know the socket is new fill in the
 * rest first: no lookup before the insert, none after it. NULL when a filter
 * leaves the socket out. `in_task` says the current task owns the socket
 * (process context), so task filters apply and the owner is known. */
static __always_inline struct sl_conn *conn_fresh(struct sock *sk, __u64 cookie, __u8 direction,
						  bool in_task, int btf)
{
	struct sl_conn_event *tmp;
	struct socket *sock;

	if ((in_task && !task_wanted()) || !sock_wanted(sk, btf))
		return NULL;
	tmp = scratch();
	if (!tmp)
		return NULL;
	__builtin_memset(&tmp->conn, 0, sizeof(tmp->conn));
	tmp->conn.cookie = cookie;
	tmp->conn.start_ns = bpf_ktime_get_ns();
	tmp->conn.netns = sock_netns(sk, btf);
	tmp->conn.proto = sock_proto(sk, btf);
	tmp->conn.state = SL_READ(btf, sk, __sk_common.skc_state);
	tmp->conn.direction = direction;
	read_tuple(&tmp->conn, sk, btf);
	if (in_task) {
		set_owner(&tmp->conn, btf);
		return &tmp->conn;
	}
	/* Only an entry without its owner needs the inode (user space finds
	 * the owner by it); a passive open has no socket yet. */
	sock = SL_READ(btf, sk, sk_socket);
	if (sock)
		tmp->conn.ino = SL_READ(btf, sock, file, f_inode, i_ino);
	return &tmp->conn;
}

/* The policy programs' per-socket translation state (xlate.bpf.h): the
 * loader reuses the pinned map and sets this when a policy is applied.
 * Socket storage is readable from tracing programs (fentry, tp_btf, iter;
 * 5.11+), not from kprobes: callers pass only BTF-typed sockets. */
const volatile bool steer_join = false;

/* Marks a connection the policy steered: the entry translated to its
 * destination names the address the application asked for. */
static __always_inline void conn_steer(struct sl_conn *c, struct sock *sk)
{
	struct slp_sock_xlate *st;
	const __u32 *d = (const __u32 *)c->daddr;

	if (!steer_join || c->steered)
		return;
	st = bpf_sk_storage_get(&slp_xlate, sk, 0, 0);
	if (!st)
		return;
	for (__u32 i = 0; i < SLP_XLATE_ENTRIES; i++) {
		struct slp_xlate_entry *e = &st->e[i];
		const __u32 *r = (const __u32 *)e->real;

		/* The proxy side's SO_ORIGINAL_DST entry is no steering of this socket. */
		if ((e->kind != SLP_XLATE_SERVICE && e->kind != SLP_XLATE_REDIRECT) ||
		    e->real_port != c->dport || r[0] != d[0] || r[1] != d[1] ||
		    r[2] != d[2] || r[3] != d[3])
			continue;
		__builtin_memcpy(c->orig_addr, e->orig, 16);
		c->orig_port = e->orig_port;
		c->steered = e->kind;
		return;
	}
}

/* Inserts a conn_fresh entry: 0, -EEXIST when the socket has one already
 * (BPF_NOEXIST), or another error, counted as untracked. The error is the
 * helper's 32-bit int: 5.10 hands kprobe programs -EEXIST zero-extended to
 * 64 bits (measured: 4294967279), so a `long` would not compare equal. */
static __always_inline int conn_put(struct sock *sk, struct sl_conn *fresh, __u64 flags)
{
	__u64 key = (__u64)sk;
	int err = bpf_map_update_elem(&conns, &key, fresh, flags);

	if (err && err != -SL_EEXIST)
		stat_inc(SL_STAT_UNTRACKED);
	return err;
}

/* The entry of a socket, created if new. */
static __always_inline struct sl_conn *conn_track(struct sock *sk, __u64 cookie, __u8 direction,
						  bool in_task, int btf)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c = bpf_map_lookup_elem(&conns, &key);
	int err;

	if (c)
		return c;
	c = conn_fresh(sk, cookie, direction, in_task, btf);
	if (!c)
		return NULL;
	err = conn_put(sk, c, BPF_NOEXIST);
	if (err && err != -SL_EEXIST /* another CPU won the race */)
		return NULL;
	return bpf_map_lookup_elem(&conns, &key);
}

static __always_inline void emit_conn(void *ctx, __u32 kind, __u32 tier, struct sock *sk,
				      struct sl_conn *c)
{
	struct sl_conn_event *e;

	if (!conn_events)
		return;
	if (use_ringbuf) {
		/* Built in place: one copy of the entry instead of two. */
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (!e) {
			stat_inc(SL_STAT_EVENTS_LOST);
			return;
		}
	} else {
		e = scratch();
		if (!e)
			return;
	}
	e->kind = kind;
	e->tier = tier;
	/* A close record's time is its connection's end, taken just before:
	 * one clock read less per close. */
	e->ts_ns = kind == SL_EV_CLOSE && c->end_ns ? c->end_ns : bpf_ktime_get_ns();
	e->sk = (__u64)sk;
	e->conn = *c;
	if (use_ringbuf)
		bpf_ringbuf_submit(e, ringbuf_wakeup_reserved(sizeof(*e)));
	else
		output(ctx, e, sizeof(*e));
}

/* conn_track for process-context hooks (accept, send, recv): a TCP socket
 * already in TCP_CLOSE was reported and removed when it got there (say, reset
 * before accept() returned it); tracking it again would leave an entry that
 * no state change will ever close. */
static __always_inline struct sl_conn *conn_track_open(struct sock *sk, __u64 cookie,
						       __u8 direction, int btf)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c = bpf_map_lookup_elem(&conns, &key);

	if (c)
		return c;
	if (sock_proto(sk, btf) == IPPROTO_TCP &&
	    SL_READ(btf, sk, __sk_common.skc_state) == SL_TCP_CLOSE)
		return NULL;
	return conn_track(sk, cookie, direction, true, btf);
}

/* ---- TCP lifecycle ---------------------------------------------------- */

/* Whether the destruction hook reports connections no other hook saw: only
 * with the counters, and without a task filter (outside its process nobody
 * can tell whose a socket is). */
static __always_inline bool destroy_finds_unseen(void)
{
	return tcp_bytes_from_seq && !filter_pid && !filter_comm && !filter_cgroup;
}

/* `freed`: the socket is being destroyed, nothing will look it up again. */
static __always_inline void finish_sk(void *ctx, struct sock *sk, struct sl_conn *c, __u32 tier,
				      bool freed)
{
	__u64 key = (__u64)sk;
	__u8 one = 1;

	waiting_done(c);
	/* Under a task filter, an accepted connection no process ever claimed
	 * (closed before its accept or first use) cannot be shown to match. */
	if (!(c->flags & (SL_CONN_OWNER | SL_CONN_SEEDED)) &&
	    (filter_pid || filter_comm || filter_cgroup)) {
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	emit_conn(ctx, SL_EV_CLOSE, tier, sk, c);
	bpf_map_delete_elem(&conns, &key);
	if (!freed && destroy_finds_unseen())
		bpf_map_update_elem(&reported, &key, &one, BPF_ANY);
}

static __always_inline void finish(void *ctx, struct sock *sk, struct sl_conn *c, __u32 tier)
{
	finish_sk(ctx, sk, c, tier, false);
}

/* TCP_CLOSE. A socket the application still holds can reach it with received
 * data unread (FIN_WAIT2 -> TIME_WAIT hands the tuple to a timewait sock):
 * the record is final only once those bytes are read. */
static __always_inline void on_closed(void *ctx, struct sock *sk, struct tcp_sock *tp,
				      struct sl_conn *c, int old, __u32 tier, int btf)
{
	__u64 key = (__u64)sk;

	if (old == SL_TCP_LISTEN) {
		bpf_map_delete_elem(&conns, &key); /* a listener, not a connection */
		return;
	}
	if (!c->end_ns) {
		c->end_ns = bpf_ktime_get_ns();
		c->error = SL_READ(btf, sk, sk_err);
	}
	if (!c->sport) /* connect failed after binding a port, then unhashed it */
		c->sport = bpf_ntohs(SL_READ(btf, tp, inet_conn.icsk_inet.inet_sport));
	if (SL_READ(btf, sk, sk_socket) && SL_READ(btf, sk, sk_receive_queue.qlen) > 0) {
		c->flags |= SL_CONN_DRAINING;
		return;
	}
	finish(ctx, sk, c, tier);
}

/* Only these transitions change what socklens records: FIN_WAIT1 and LAST_ACK
 * say a FIN was queued, for a close seen only at destruction. The others
 * (FIN_WAIT2, CLOSE_WAIT, CLOSING, TIME_WAIT) are four of a short connection's
 * ten state changes, so the wrappers return before any kernel read. Snapshots
 * take the current state from the socket iterator. */
static __always_inline bool state_matters(int new)
{
	return new == SL_TCP_SYN_SENT || new == SL_TCP_ESTABLISHED || new == SL_TCP_CLOSE ||
	       new == SL_TCP_FIN_WAIT1 || new == SL_TCP_LAST_ACK;
}

/* The entry of a connection that starts here (connect, or the end of a
 * passive open's handshake), inserted complete. -EEXIST when the socket has
 * one already: a server's accept of a Fast Open child can come before its
 * handshake ends, and that entry (its owner, its bytes) stays; or an earlier
 * socket at this address left one whose end the hooks missed (seen on 5.10's
 * kprobe tier, which skips a kprobe run nested in another and does not count
 * it), which the new connection takes over as before. */
static __always_inline int conn_start(struct sock *sk, int new, int btf)
{
	bool out = new == SL_TCP_SYN_SENT;
	struct tcp_sock *tp;
	struct sl_conn *c;

	/* connect() is process context, the caller owns the socket; a passive
	 * open completes in softirq: the owner comes with accept or first use. */
	c = conn_fresh(sk, sock_cookie(sk, btf), out ? SL_DIR_OUT : SL_DIR_IN, out, btf);
	if (!c)
		return 0;
	c->state = new;
	if (tcp_bytes_from_seq)
		tcp_seq_base_start(c, out);
	if (out && btf != SL_PROBED)
		conn_steer(c, sk);
	if (!out) {
		tp = tcp_sk_of(sk, btf);
		if (tp)
			read_tcp_info(c, tp, btf);
		c->flags |= SL_CONN_ESTABLISHED;
	}
	return conn_put(sk, c, BPF_NOEXIST);
}

/* The entry of a connection whose start no hook saw (the kernel skipped the
 * run), made later: at an active open's ESTABLISHED, at a first use, or by a
 * snapshot refresh. It counts from the socket's start, so its bytes are all
 * there; only with the counters. */
static __always_inline struct sl_conn *conn_recover(struct sock *sk, __u64 cookie, bool active,
						    bool in_task, int btf)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c;
	int err;

	/* Outside its owner's process a task filter cannot tell whose it is. */
	if (!tcp_bytes_from_seq || (!in_task && (filter_pid || filter_comm || filter_cgroup)))
		return NULL;
	c = conn_fresh(sk, cookie, active ? SL_DIR_OUT : SL_DIR_IN, in_task, btf);
	if (!c)
		return NULL;
	tcp_seq_base_start(c, active);
	c->flags |= SL_CONN_FOUND_LATE;
	err = conn_put(sk, c, BPF_NOEXIST);
	if (err && err != -SL_EEXIST)
		return NULL;
	return bpf_map_lookup_elem(&conns, &key);
}

/* The cookie is taken only for a new entry: two of a short connection's five
 * state changes that get here. */
static __always_inline void on_state(void *ctx, struct sock *sk, int old, int new, __u32 tier,
				     int btf)
{
	__u64 key = (__u64)sk;
	bool starts = new == SL_TCP_SYN_SENT || (new == SL_TCP_ESTABLISHED && old == SL_TCP_SYN_RECV);
	struct tcp_sock *tp;
	struct sl_conn *c;

	if (sock_proto(sk, btf) != IPPROTO_TCP || conn_hooks_blind)
		return;
	if (starts && state_skips_start)
		return;
	if (starts && conn_start(sk, new, btf) != -SL_EEXIST)
		return;
	c = bpf_map_lookup_elem(&conns, &key);
	if (new == SL_TCP_FIN_WAIT1 || new == SL_TCP_LAST_ACK) {
		if (c)
			c->flags |= SL_CONN_FIN_QUEUED;
		return;
	}
	if (!c && new == SL_TCP_ESTABLISHED && old == SL_TCP_SYN_SENT)
		c = conn_recover(sk, sock_cookie(sk, btf), true, false, btf);
	/* An established connection never seen: its last chance (the runs that
	 * missed its start can miss its first use too, when one preempted run
	 * makes the kernel skip the program on that CPU for a while). */
	if (!c && new == SL_TCP_CLOSE && old != SL_TCP_LISTEN && old != SL_TCP_SYN_SENT &&
	    old != SL_TCP_SYN_RECV && !state_skips_close)
		c = conn_recover(sk, sock_cookie(sk, btf), tcp_active_open(sk, btf), false, btf);
	if (!c || (new == SL_TCP_CLOSE && state_skips_close))
		return;
	if (starts && tcp_bytes_from_seq)
		tcp_seq_base_start(c, new == SL_TCP_SYN_SENT);
	c->state = new;
	/* Ten state changes per short connection: only the ones that report
	 * read RTT and retransmissions. */
	if (new != SL_TCP_ESTABLISHED && new != SL_TCP_CLOSE)
		return;
	tp = tcp_sk_of(sk, btf);
	if (!tp)
		return;
	read_tcp_info(c, tp, btf);
	if (new == SL_TCP_ESTABLISHED) {
		c->flags |= SL_CONN_ESTABLISHED;
		if (old == SL_TCP_SYN_SENT) {
			/* the local port of a connect is bound after SYN_SENT */
			read_tuple(c, sk, btf);
			emit_conn(ctx, SL_EV_CONNECT, tier, sk, c);
		}
		return;
	}
	if (tcp_bytes_from_seq) {
		tcp_accel_sync(c, sk, false);
		tcp_seq_sync_tx(c, tp, tcp_fin_queued(old), btf);
		tcp_seq_sync_rx(c, tp, btf);
	}
	on_closed(ctx, sk, tp, c, old, tier, btf);
}
/* Whether the socket queued a FIN, for a close seen only at destruction: the
 * hooks saw it do so, or saw it open and not (its close then a reset, or with
 * unread data). An entry made only now knows neither: it was shut down for
 * sending, not reset (sk_err, until the application reads the error) and not
 * closed with unread data (between copied_seq and rcv_nxt, a FIN taking one). */
static __always_inline bool tcp_fin_queued_at_destroy(struct sl_conn *c, struct tcp_sock *tp,
						      int btf)
{
	struct sock *sk = &tp->inet_conn.icsk_inet.sk;
	__u8 shutdown;
	__u32 unread;

	if ((c->flags & SL_CONN_FIN_QUEUED) || tcp_fin_queued(c->state))
		return true;
	if (c->state != SL_TCP_CLOSE)
		return false;
	/* a bitfield before 6.5 */
	shutdown = btf ? BPF_CORE_READ_BITFIELD(sk, sk_shutdown)
		       : BPF_CORE_READ_BITFIELD_PROBED(sk, sk_shutdown);
	unread = SL_READ(btf, tp, rcv_nxt) - SL_READ(btf, tp, copied_seq);
	if (unread && tcp_fin_received(tp, btf))
		unread--;
	return (shutdown & 2 /* SEND_SHUTDOWN */) && !SL_READ(btf, sk, sk_err) && !unread;
}

/* A socket being freed that no entry holds: reported already (its key in
 * `reported`), never a connection (a listener, a failed or no connect: only
 * a peer's SYN sets rcv_nxt), or a connection every other hook run missed,
 * tracked now from its counters to be reported at once. */
static __always_inline struct sl_conn *conn_unseen(struct sock *sk, int btf)
{
	__u64 key = (__u64)sk;
	struct tcp_sock *tp;
	struct sl_conn *c;

	if (!destroy_finds_unseen() || !bpf_map_delete_elem(&reported, &key))
		return NULL;
	tp = tcp_sk_of(sk, btf);
	if (!tp || !SL_READ(btf, tp, rcv_nxt))
		return NULL;
	c = conn_recover(sk, sock_cookie(sk, btf), tcp_active_open(sk, btf), false, btf);
	if (c)
		c->flags |= SL_CONN_ESTABLISHED;
	return c;
}

/* The kernel is about to free a TCP socket. Its entry normally left at
 * TCP_CLOSE; one still here either waits for unread data its application
 * never read, or missed its close: the kernel skips a tracing program already
 * running on the same CPU (a state change in softirq interrupting the state
 * hook's run in process context; `missed`). Either way this is its last
 * chance: report it now, before the socket's address (the key) can be reused.
 * A different program from the state hook's, so it runs where that one was
 * skipped. */
static __always_inline void on_destroy(void *ctx, struct sock *sk, __u32 tier, int btf)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c;
	struct tcp_sock *tp;
	bool wiped;

	c = bpf_map_lookup_elem(&conns, &key);
	if (!c)
		c = conn_unseen(sk, btf);
	if (!c)
		return;
	tp = tcp_sk_of(sk, btf);
	if (c->state == SL_TCP_LISTEN || !tp) {
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	/* An abortive close (SO_LINGER 0, connect(AF_UNSPEC)) went through
	 * tcp_disconnect, which zeroes RTT, retransmits and the byte counters:
	 * the entry keeps what it had. Only established sockets have an RTT. */
	wiped = (c->flags & SL_CONN_ESTABLISHED) && !SL_READ(btf, tp, srtt_us);
	if (!c->end_ns) {
		c->end_ns = bpf_ktime_get_ns();
		c->error = SL_READ(btf, sk, sk_err);
		c->flags |= SL_CONN_CLOSED_AT_DESTROY;
		if (!wiped)
			read_tcp_info(c, tp, btf);
	}
	if (!c->sport)
		c->sport = bpf_ntohs(SL_READ(btf, tp, inet_conn.icsk_inet.inet_sport));
	if (tcp_bytes_from_seq && !wiped) {
		/* A draining entry's tx was final at TCP_CLOSE. */
		tcp_accel_sync(c, sk, false);
		if (!(c->flags & SL_CONN_DRAINING))
			tcp_seq_sync_tx(c, tp, tcp_fin_queued_at_destroy(c, tp, btf), btf);
		tcp_seq_sync_rx(c, tp, btf);
	}
	c->state = SL_TCP_CLOSE;
	finish_sk(ctx, sk, c, tier, true);
}

/* A UDP socket is being closed: its entry goes, so that a socket the kernel
 * later puts at the same address starts its own. Its flows stay for the next
 * snapshot's sweep (src/session/seed.rs); udp_account ignores them meanwhile. */
static __always_inline void on_udp_gone(__u64 key)
{
	if (track_udp)
		bpf_map_delete_elem(&conns, &key);
}

/* A listening socket (process context), so `conns` shows listeners like ss. */
static __always_inline void on_listening(struct sock *sk)
{
	struct sl_conn *c;

	if (!track_conns)
		return;
	c = conn_track(sk, 0, SL_DIR_UNKNOWN, true, SL_PROBED);
	if (c)
		c->state = SL_TCP_LISTEN;
}

/* `btf`: how `sk` reads. The rare entry made here is read with the helper
 * whatever `btf` says: the socket may be a cast pointer, which helpers that
 * want a socket refuse. */
static __always_inline void on_accept(void *ctx, struct sock *sk, __u64 cookie, __u32 tier,
				      int btf)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c;

	if (!sk || conn_hooks_blind)
		return;
	c = bpf_map_lookup_elem(&conns, &key);
	if (c && !task_wanted()) {
		/* Tracked from softirq before its owner was known; not wanted after all. */
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	if (!c)
		c = conn_track_open(sk, cookie, SL_DIR_IN, SL_PROBED);
	if (!c)
		return;
	set_owner(c, btf);
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
	read_tcp_info(c, (struct tcp_sock *)sk, SL_PROBED);
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

static __always_inline void udp_account(struct sock *sk, const __u8 *sa, long bytes, bool tx,
					__u64 conn_start)
{
	struct sl_udp_key k = {};
	struct sl_udp_flow *f;
	__u64 now = bpf_ktime_get_ns();

	udp_peer(&k, sk, sa);
	f = bpf_map_lookup_elem(&udp_flows, &k);
	if (f && f->conn_start_ns != conn_start) {
		/* Left by an earlier socket at this address (its end was not
		 * seen, or its flows wait for the next snapshot's sweep). */
		bpf_map_delete_elem(&udp_flows, &k);
		f = NULL;
	}
	if (!f) {
		struct sl_udp_flow init = { .first_ns = now,
					    .direction = tx ? SL_DIR_OUT : SL_DIR_IN,
					    .conn_start_ns = conn_start };
		int err = bpf_map_update_elem(&udp_flows, &k, &init, BPF_NOEXIST); /* see conn_put */

		if (err && err != -SL_EEXIST) {
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

/* A TCP send or receive of `ret` bytes when the bytes come from the counters
 * (tcp_bytes_from_seq): the hook's only work is the socket that needs it: one
 * waiting for its owner (see `seeded_waiting`), one whose start no hook saw
 * (its first use tracks it), or one closed with data unread. SL_CAST
 * programs (the tp_btf tier, on every send and receive of every socket) look
 * the entry up only for those; the others look it up every time, as they
 * always did, and read the counters only without one. `cookie` 0: take it
 * here if needed. */
static __always_inline void tcp_touch(void *ctx, struct sock *sk, __u64 cookie, long ret,
				      int flags, bool recv, bool whole, __u32 tier, int btf)
{
	__u64 key = (__u64)sk;
	/* A cast where the checked conversion would be a helper call per call. */
	struct tcp_sock *tp = tcp_sk_of(sk, btf);
	bool closed = SL_READ(btf, sk, __sk_common.skc_state) == SL_TCP_CLOSE;
	bool first = false, active, psock = whole && tcp_has_psock(sk, btf);
	struct sl_conn *c;

	if (!tp || conn_hooks_blind)
		return;
	if (btf == SL_CAST) {
		first = tcp_maybe_first_use(tp, ret, recv, false, btf);
		if (!first && !psock && !maybe_waiting(sk) && !(closed && recv))
			return;
	}
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c) {
		/* Where every call looks up, an active open's first send (its SYN
		 * counted) is fresh too. */
		active = tcp_active_open(sk, btf);
		if (closed || !(btf == SL_CAST ? first : tcp_maybe_first_use(tp, ret, recv, active, btf)))
			return;
		if (!cookie)
			cookie = sock_cookie(sk, btf);
		c = conn_recover(sk, cookie, active, true, btf);
		if (!c)
			return;
	}
	/* Its first use, in its owner's process. An accepted socket is tracked
	 * in softirq, and can be after its accept returned (the child is queued
	 * before its ESTABLISHED): a task filter decides here. */
	if (!(c->flags & SL_CONN_OWNER) && !task_wanted()) {
		waiting_done(c);
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	waiting_done(c);
	set_owner(c, btf);
	if (psock && !(flags & MSG_PEEK)) {
		if (accel_calls_blind)
			tcp_accel_mark(c);
		else
			tcp_accel_count(c, tp, ret, recv, btf);
	}
	if (!recv || !closed || !(c->flags & SL_CONN_DRAINING))
		return;
	/* Closed with data unread: its record waits for this read. */
	tcp_seq_sync_rx(c, tp, btf); /* tx was final at TCP_CLOSE */
	if (!SL_READ(btf, sk, sk_receive_queue.qlen))
		finish(ctx, sk, c, tier);
}

/* The byte hooks run on every send and receive: they leave RTT and the
 * retransmission count alone (state changes, retransmits and snapshots read
 * those), as each kernel read is a helper call here. */

/* sendmsg on a TCP/UDP socket (`proto`) returned `ret` (bytes accepted, or -errno). */
static __always_inline void on_send_proto(struct sock *sk, __u16 proto, __u64 cookie,
					  const __u8 *sa, long ret, int btf)
{
	struct sl_conn *c;

	if (ret <= 0 || (proto == IPPROTO_UDP && !track_udp))
		return;
	if (proto == IPPROTO_TCP && tcp_bytes_from_seq) {
		tcp_touch(NULL, sk, cookie, ret, 0, false, false, 0, btf);
		return;
	}
	if (proto == IPPROTO_UDP && udp_sends_skipped) {
		stat_inc(SL_STAT_RET_MISSED);
		return;
	}
	c = conn_track_open(sk, cookie, SL_DIR_UNKNOWN, btf);
	if (!c)
		return;
	set_owner(c, btf);
	if (proto == IPPROTO_TCP)
		__sync_fetch_and_add(&c->tx_bytes, ret);
	else
		udp_account(sk, sa, ret, true, c->start_ns);
}

static __always_inline void on_send(struct sock *sk, __u64 cookie, const __u8 *sa, long ret,
				    int btf)
{
	__u16 proto;

	if (ret <= 0 || !sk)
		return;
	proto = sock_proto(sk, btf);
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		on_send_proto(sk, proto, cookie, sa, ret, btf);
}

/* recvmsg returned `ret` bytes to the application; peeks leave data queued. */
static __always_inline void on_recv_proto(void *ctx, struct sock *sk, __u16 proto, __u64 cookie,
					  const __u8 *sa, long ret, int flags, __u32 tier,
					  int btf)
{
	__u64 key = (__u64)sk;
	struct sl_conn *c;

	if (ret < 0 || (flags & MSG_PEEK) || (proto == IPPROTO_UDP && !track_udp))
		return;
	if (proto == IPPROTO_TCP && tcp_bytes_from_seq) {
		tcp_touch(ctx, sk, cookie, ret, flags, true, false, tier, btf);
		return;
	}
	if (!ret) {
		/* End of stream: nothing to count, but it names the owner of an
		 * accepted socket whose only use this is. */
		c = proto == IPPROTO_TCP ? bpf_map_lookup_elem(&conns, &key) : NULL;
		if (c)
			set_owner(c, btf);
		return;
	}
	c = conn_track_open(sk, cookie, SL_DIR_UNKNOWN, btf);
	if (!c)
		return;
	set_owner(c, btf);
	if (proto == IPPROTO_TCP) {
		__sync_fetch_and_add(&c->rx_bytes, ret);
		if ((c->flags & SL_CONN_DRAINING) && !SL_READ(btf, sk, sk_receive_queue.qlen))
			finish(ctx, sk, c, tier);
	} else {
		udp_account(sk, sa, ret, false, c->start_ns);
	}
}

static __always_inline void on_recv(void *ctx, struct sock *sk, __u64 cookie, const __u8 *sa,
				    long ret, int flags, __u32 tier, int btf)
{
	__u16 proto;

	if (ret < 0 || !sk || (flags & MSG_PEEK))
		return;
	proto = sock_proto(sk, btf);
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		on_recv_proto(ctx, sk, proto, cookie, sa, ret, flags, tier, btf);
}

/* sendfile(2) moved `ret` bytes into the socket. */
static __always_inline void on_sendfile_sk(struct sock *sk, long ret)
{
	struct sl_conn *c;

	if (ret <= 0 || !sk || sock_proto(sk, SL_PROBED) != IPPROTO_TCP || conn_hooks_blind)
		return;
	c = conn_track(sk, 0, SL_DIR_UNKNOWN, true, SL_PROBED);
	if (!c)
		return;
	/* Process context: an accepted socket whose first use this is (its
	 * counters are past zero now) belongs to the caller. */
	set_owner(c, SL_PROBED);
	__sync_fetch_and_add(&c->sendfile_bytes, ret);
	if (sendfile_adds_tx && !tcp_bytes_from_seq)
		__sync_fetch_and_add(&c->tx_bytes, ret);
}

/* sendfile(2) moved `ret` bytes into the socket behind out_fd. */
static __always_inline void on_sendfile(struct socket *sock, long ret)
{
	if (sock)
		on_sendfile_sk(BPF_CORE_READ(sock, sk), ret);
}

#endif
