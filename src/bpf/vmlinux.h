/* Arch dispatcher for the committed BTF dumps (regenerate with scripts/gen-vmlinux.sh). */
#ifndef SOCKLENS_VMLINUX_H
#define SOCKLENS_VMLINUX_H
#if defined(__TARGET_ARCH_x86)
#include "vmlinux_x86.h"
#else
#error "socklens ships vmlinux.h for x86 only; add src/bpf/vmlinux_<arch>.h with scripts/gen-vmlinux.sh"
#endif
#endif
