#!/bin/bash
# The kernel's run time of slp_accel_msg per message (kernel.bpf_stats_enabled):
# one accelerated pair, 200,000 sends of 1000 bytes from python. Root.
# Usage: bench/accel_msg_cost.sh [SOCKLENS_BINARY]   (default target/debug/socklens)
set -euo pipefail
BIN=${1:-target/debug/socklens}
CG_ROOT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
NAME=socklens-accel-msg-cost-$$
CG=$CG_ROOT/$NAME
FILE=$(mktemp --suffix=.toml)
was=$(cat /proc/sys/kernel/bpf_stats_enabled)
cleanup() {
    "$BIN" policy remove >/dev/null || true
    rmdir "$CG" 2>/dev/null || true
    rm -f "$FILE"
    sysctl -qw kernel.bpf_stats_enabled="$was"
}
trap cleanup EXIT
mkdir -p "$CG"
printf '[[accelerate]]\ncgroup = "/%s"\n' "$NAME" >"$FILE"
"$BIN" policy apply "$FILE" >/dev/null
sysctl -qw kernel.bpf_stats_enabled=1
python3 - "$CG" <<'PY'
import os, socket, sys, threading
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname()); s, _ = l.accept()
N, M = 200000, 1000
def rd():
    left = N * M
    while left:
        left -= len(s.recv(65536))
t = threading.Thread(target=rd); t.start()
buf = b"x" * M
for _ in range(N):
    c.sendall(buf)
t.join()
PY
bpftool prog show name slp_accel_msg | grep -o "run_time_ns [0-9]* run_cnt [0-9]*" |
    awk '{ printf "slp_accel_msg: %d runs, %.1f ns/run\n", $4, $2 / $4 }'
