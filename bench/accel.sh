#!/usr/bin/env bash
# Local TCP acceleration, accelerated vs plain loopback side by side, one run:
#   sockperf ping-pong over TCP, 64 B / 1 KiB / 16 KiB messages: rate, p50, p99
#   iperf3 bulk throughput, one stream
#   redis-server + redis-benchmark (SET/GET), then the values checked with redis-cli
#   nginx-light + wrk (the FIONREAD-sensitive server): requests/s, errors
# Plain runs in one fresh cgroup, accelerated in another named by an
# [[accelerate]] entry; both under the same socklens policy (pin root as set by
# SOCKLENS_PIN_ROOT). Each pair runs back to back, accelerated second.
# Usage (root): [CPU=1] bench/accel.sh [SECONDS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
SECS=${1:-5}
export PATH="$HOME/.cargo/bin:$PATH"
cargo build -q
SL=target/debug/socklens
for t in sockperf iperf3 redis-server redis-benchmark redis-cli nginx wrk; do
    command -v "$t" >/dev/null || { echo "$t is not installed: run scripts/install-deps.sh" >&2; exit 1; }
done
CG2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
NAME=slaccel-$$
WORK=$(mktemp -d)
mkdir -p "$CG2/$NAME/plain" "$CG2/$NAME/accel"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$SL" policy remove >/dev/null 2>&1 || true
    rmdir "$CG2/$NAME/plain" "$CG2/$NAME/accel" "$CG2/$NAME" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
printf '[[accelerate]]\ncgroup = "/%s/accel"\n' "$NAME" > "$WORK/accel.toml"
"$SL" policy apply "$WORK/accel.toml" >/dev/null

# incg MODE CMD...: runs CMD in the cgroup of MODE (plain | accel).
# Everything on one CPU ($CPU): on this 2-CPU host with other load, client and
# server on different CPUs made ping-pong rates swing tenfold between runs.
CPU=${CPU:-1}
CGRUN='echo $$ > "$0/cgroup.procs"; exec taskset -c '"$CPU"' "$@"'
incg() { local m=$1; shift; sh -c "$CGRUN" "$CG2/$NAME/$m" "$@"; }
# bg MODE CMD...: a server in the background; $! is the server itself (sh execs it).
bg() { local m=$1; shift; sh -c "$CGRUN" "$CG2/$NAME/$m" "$@" >/dev/null 2>&1 & PIDS+=($!); }
port=$((20000 + $$ % 20000))
# The next port nothing listens on.
next_port() { port=$((port + 1)); while ss -ltnH "sport = :$port" | grep -q .; do port=$((port + 1)); done; }
wait_port() { for _ in $(seq 100); do ss -ltn "sport = :$1" | grep -q LISTEN && return; sleep 0.05; done; echo "port $1 never listened" >&2; exit 1; }
stop_last() { kill "${PIDS[-1]}" 2>/dev/null || true; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }

echo "kernel $(uname -r); $(nproc) CPUs, all on CPU $CPU; ${SECS}s per run; load $(cut -d" " -f1-3 /proc/loadavg)"
printf '%-22s %14s %14s %7s\n' test plain accelerated ratio
row() { awk -v t="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%-22s %14s %14s %7.2f\n", t, a, b, (a > 0 ? b / a : 0) }'; }

for size in 64 1024 16384; do
    declare -A rate p50 p99
    for m in plain accel; do
        next_port
        bg "$m" sockperf server --tcp -i 127.0.0.1 -p "$port"
        wait_port "$port"
        incg "$m" sockperf ping-pong --tcp -i 127.0.0.1 -p "$port" -m "$size" -t "$SECS" > "$WORK/sp" 2>&1
        stop_last
        rate[$m]=$(awk -F'[=; ]+' '/\[Valid Duration\]/ { for (i = 1; i <= NF; i++) { if ($i == "RunTime") t = $(i+1); if ($i == "ReceivedMessages") r = $(i+1) } } END { printf "%.0f", r / t }' "$WORK/sp")
        p50[$m]=$(awk '/percentile 50.000/ { print $NF }' "$WORK/sp")
        p99[$m]=$(awk '/percentile 99.000/ { print $NF }' "$WORK/sp")
    done
    row "pingpong ${size}B msg/s" "${rate[plain]}" "${rate[accel]}"
    row "pingpong ${size}B p50 us" "${p50[plain]}" "${p50[accel]}"
    row "pingpong ${size}B p99 us" "${p99[plain]}" "${p99[accel]}"
done

declare -A bulk
for m in plain accel; do
    next_port
    bg "$m" iperf3 -s -1 -B 127.0.0.1 -p "$port"
    wait_port "$port"
    incg "$m" iperf3 -c 127.0.0.1 -p "$port" -t "$SECS" -J > "$WORK/ip"
    bulk[$m]=$(python3 -c 'import json,sys; print("%.0f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e6))' "$WORK/ip")
    stop_last
done
row "iperf3 bulk Mbit/s" "${bulk[plain]}" "${bulk[accel]}"

declare -A rset rget
for m in plain accel; do
    next_port
    bg "$m" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no
    wait_port "$port"
    incg "$m" redis-benchmark -p "$port" -q --csv -t set,get -n 200000 -c 50 -r 10000 > "$WORK/rb"
    rset[$m]=$(awk -F'"' '$2 == "SET" { printf "%.0f", $4 }' "$WORK/rb")
    rget[$m]=$(awk -F'"' '$2 == "GET" { printf "%.0f", $4 }' "$WORK/rb")
    # Identical results: a value of every size written and read back intact.
    for n in 1 1000 100000 1000000; do
        head -c "$n" /dev/urandom | base64 -w0 > "$WORK/v"
        incg "$m" redis-cli -p "$port" -x set "k$n" < "$WORK/v" >/dev/null
        incg "$m" redis-cli -p "$port" --raw get "k$n" | head -c -1 > "$WORK/got"
        cmp -s "$WORK/v" "$WORK/got" || { echo "redis $m: value of $n bytes came back different" >&2; exit 1; }
    done
    stop_last
done
row "redis SET req/s" "${rset[plain]}" "${rset[accel]}"
row "redis GET req/s" "${rget[plain]}" "${rget[accel]}"

declare -A wrps werr
head -c 65536 /dev/urandom > "$WORK/64k.bin"
echo hello > "$WORK/index.html"
for m in plain accel; do
    next_port
    cat > "$WORK/nginx.conf" <<CONF
user root root; daemon off; worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$port; root $WORK; } }
CONF
    bg "$m" nginx -c "$WORK/nginx.conf" -p "$WORK"
    wait_port "$port"
    incg "$m" wrk -t 2 -c 64 -d "${SECS}s" --timeout 5s "http://127.0.0.1:$port/64k.bin" > "$WORK/wrk"
    wrps[$m]=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' "$WORK/wrk")
    werr[$m]=$(awk '/Socket errors|Non-2xx/ { e = e $0 "; " } END { print (e == "" ? "none" : e) }' "$WORK/wrk")
    curl_ok=$(incg "$m" python3 -c 'import sys,urllib.request; d=urllib.request.urlopen(sys.argv[1]).read(); print(d == open(sys.argv[2],"rb").read())' "http://127.0.0.1:$port/64k.bin" "$WORK/64k.bin")
    [ "$curl_ok" = True ] || { echo "nginx $m: 64k.bin came back different" >&2; exit 1; }
    stop_last
done
row "nginx+wrk 64KiB req/s" "${wrps[plain]}" "${wrps[accel]}"
echo "wrk errors: plain: ${werr[plain]}  accelerated: ${werr[accel]}"
"$SL" policy show --json | python3 -c 'import json,sys; a=json.load(sys.stdin)["accelerate"]; print("accelerate counters:", {k: a[k] for k in ("paired","redirected_msgs","redirected_bytes","passed_msgs","unpaired")})'
