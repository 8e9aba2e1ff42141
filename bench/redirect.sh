#!/usr/bin/env bash
# Connect + 1-byte request/response rate through a local proxy (haproxy, the
# same process in every configuration), side by side (rounds interleaved):
#   direct     the client connects to the proxy itself (127.0.0.1:15002, whose
#              backend is the echo server)
#   socklens   the client connects to the echo server 10.200.0.2:7000; a socklens
#              [[redirect]] sends it to 127.0.0.1:15001, where haproxy reads
#              SO_ORIGINAL_DST and forwards there
#   iptables   the same through `iptables -t nat -A OUTPUT ... -j REDIRECT`
#              (iptables-legacy), the classic sidecar set-up
# Everything runs in one netns made for the run (the echo server's address on
# its lo); the client (socklens-testbed) and haproxy (uid 1337, the iptables
# rule's exclusion; its cgroup, socklens' exclusion) in cgroups made for it;
# client, proxy and server all on one CPU. A last round, apart from the rates,
# reads the kernel run time of socklens' programs (kernel.bpf_stats_enabled). Each round: N times connect, send 1 byte, read it back,
# close; every exchange must succeed.
# Usage (root): [CPU=1] bench/redirect.sh [N] [ROUNDS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
N=${1:-3000}
ROUNDS=${2:-5}
CPU=${CPU:-1}
NAME=slbench-rd-$$
. bench/policy_common.sh
IPT=iptables-legacy
command -v "$IPT" >/dev/null || { echo "iptables is not installed: run scripts/install-deps.sh" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "haproxy is not installed: run scripts/install-deps.sh" >&2; exit 1; }
NS=$NAME
BACKEND=10.200.0.2
PIDS=()

cleanup() {
    sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"
    "$SL" policy remove >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rmdir "$CG/proxy" "$CG/gov" "$CG" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$CG/proxy"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add "$BACKEND/32" dev lo

cat > "$WORK/haproxy.cfg" <<CFG
global
  maxconn 4000
  uid 1337
  gid 1337
defaults
  mode tcp
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend transparent
  bind 127.0.0.1:15001
  default_backend orig
backend orig
  server s 0.0.0.0:0
frontend plain
  bind 127.0.0.1:15002
  default_backend fixed
backend fixed
  server s $BACKEND:7000
CFG
cat > "$WORK/redirect.toml" <<TOML
attach = "/$NAME"
[[redirect]]
cgroup = "/$NAME/gov"
to = ["$BACKEND/32"]
ports = "7000"
proxy = "127.0.0.1:15001"
proxy_cgroups = ["/$NAME/proxy"]
TOML

# The echo server (outside both cgroups) and haproxy, for the whole run.
# nsenter, not `ip netns exec`: that remounts /sys (cgroup2 and bpffs).
IN_NS=(nsenter --net="/var/run/netns/$NS")
taskset -c "$CPU" "$TB" --netns "$NS" "serve,tcp4,$BACKEND,7000,echo" sleep,86400000 >/dev/null &
PIDS+=($!)
sh -c "echo \$\$ > $CG/proxy/cgroup.procs && exec taskset -c $CPU ${IN_NS[*]} haproxy -db -f $WORK/haproxy.cfg" &
PIDS+=($!)
sleep 1

round() { # config round -> rate
    local config=$1 target=$BACKEND,7000 out
    case $config in
        direct) target=127.0.0.1,15002 ;;
        socklens) "${IN_NS[@]}" "$SL" policy apply "$WORK/redirect.toml" >/dev/null ;;
        iptables) "${IN_NS[@]}" "$IPT" -t nat -A OUTPUT -p tcp -d "$BACKEND" --dport 7000 \
                      -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001 ;;
    esac
    out=$(taskset -c "$CPU" "$TB" --netns "$NS" --cgroup "$CG/gov" "rr,tcp4,${target%,*},${target#*,},$N")
    case $config in
        socklens) [ "$(sysctl -n kernel.bpf_stats_enabled)" = 0 ] || policy_prog_time "$N" >&2
                  "$SL" policy remove >/dev/null ;;
        iptables) "${IN_NS[@]}" "$IPT" -t nat -F OUTPUT ;;
    esac
    grep -q "\"by_errno\":{\"0\":$N}" <<<"$out" || { echo "$config: exchanges failed: $out" >&2; exit 1; }
    grep -o '"rate":[0-9]*' <<<"$out" | cut -d: -f2
}

CONFIGS="direct socklens iptables"
run_rounds
echo "socklens / direct   $(awk "BEGIN { printf \"%.3f\", ${med[socklens]} / ${med[direct]} }")  (target >= 0.97)"
echo "socklens / iptables $(awk "BEGIN { printf \"%.3f\", ${med[socklens]} / ${med[iptables]} }")  (target >= 1.0)"
# One more socklens round, with the kernel's program statistics on: what its
# programs cost per exchange (not in the rates above).
sysctl -qw kernel.bpf_stats_enabled=1
rate=$(round socklens 0 2>"$WORK/stats")
echo "socklens programs, one more round with kernel.bpf_stats_enabled=1 ($rate exchanges/s):"
cat "$WORK/stats"
