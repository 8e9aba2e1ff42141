#!/usr/bin/env bash
# What an attached syscall tracepoint costs every other syscall: getpid() in a
# loop on CPU 0 (loadgen syscalls), with nothing attached, with a bpftrace
# program on one syscall's exit, on its entry and exit, and under `socklens
# trace` with every event (bind, listen and accept use syscall tracepoints on
# the tracepoint tier). Alternates the four ROUNDS times; prints ns per call.
# Root; after bench/run.sh built loadgen and the release binary.
#
#   ROUNDS=5 bench/syscall_tracepoints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-5}
CALLS=${CALLS:-3000000}
LOADGEN=target/bench/loadgen
SOCKLENS=target/release/socklens

measure() { taskset -c 0 "$LOADGEN" syscalls "$CALLS" | sed 's/.*"ns_per_call":\([0-9.]*\).*/\1/'; }

# Runs the loop while the tracer given as arguments is attached.
with_tracer() {
    local log pid
    log=$(mktemp)
    "$@" >/dev/null 2>"$log" &
    pid=$!
    for _ in $(seq 100); do
        grep -qE "Attaching|Ctrl-C to stop" "$log" && break
        sleep 0.1
    done
    sleep 1 # bpftrace prints its line before it attaches
    measure
    kill -INT "$pid"
    wait "$pid" || true
    rm -f "$log"
}

declare -A results
for r in $(seq "$ROUNDS"); do
    results[base]+="$(measure) "
    results[exit]+="$(with_tracer bpftrace -e 'tracepoint:syscalls:sys_exit_listen { @n = count(); }') "
    results[both]+="$(with_tracer bpftrace -e 'tracepoint:syscalls:sys_enter_listen { @n = count(); } tracepoint:syscalls:sys_exit_listen { @n = count(); }') "
    results[socklens]+="$(with_tracer "$SOCKLENS" trace --events bind,listen,established,accept,close,retransmit --json) "
    echo "bench: round $r/$ROUNDS done" >&2
done
for k in base exit both socklens; do
    echo "$k: ${results[$k]}"
done
