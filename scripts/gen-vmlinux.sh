#!/usr/bin/env bash
# Regenerates src/bpf/vmlinux_x86.h from the running kernel's BTF.
# CO-RE relocations make the header portable: it only needs to be regenerated
# when a program starts using a type or field this header lacks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
btf=${1:-/sys/kernel/btf/vmlinux}
command -v bpftool >/dev/null || { echo "gen-vmlinux: bpftool not found (apt-get install bpftool)" >&2; exit 1; }
[ -r "$btf" ] || { echo "gen-vmlinux: no BTF at $btf" >&2; exit 1; }
bpftool btf dump file "$btf" format c > "$here/src/bpf/vmlinux_x86.h.tmp"
mv "$here/src/bpf/vmlinux_x86.h.tmp" "$here/src/bpf/vmlinux_x86.h"
echo "wrote src/bpf/vmlinux_x86.h from $btf"
