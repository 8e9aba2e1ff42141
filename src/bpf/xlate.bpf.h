/* The per-socket translation state, shared by the cgroup programs that write it
 * (services.bpf.h) and the terminate iterator that reads it (terminate.bpf.c);
 * both open the one pinned map. */
#ifndef SOCKLENS_XLATE_BPF_H
#define SOCKLENS_XLATE_BPF_H

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct slp_sock_xlate);
} slp_xlate SEC(".maps");

#endif
