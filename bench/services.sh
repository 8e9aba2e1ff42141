#!/usr/bin/env bash
# Connect + 1-byte request/response rate on loopback, side by side (rounds
# interleaved):
#   direct     to the backend 10.200.0.2:7000 itself (on lo of the netns)
#   vip1       through a socklens service VIP, 1 service configured
#   vip100     ... 100 services
#   vip10k     ... 10,000 services
#   miss10k    the 10,000-service policy applied, connecting to the backend itself:
#              what the policy programs cost a connect that no VIP translates
#   iptl       iptables-legacy DNAT in nat OUTPUT, 10,000 rules, the last matching
#   iptl-mid   the same rules, the 5,000th matching (an average service)
#   iptn       iptables-nft (Debian 12's `iptables`), 10,000 rules, the last matching
#   nft        one nftables DNAT rule over a map of 10,000 elements
# The VIP configurations connect to the last of their services (10.0.39.16:80
# for 10,000). The client is bench/rr.c (built here with cc): one process that
# forks an echo server on the backend address, then N times connects, sends 1
# byte, reads it back and closes; nothing else in the loop. It runs in a fresh
# netns per round (a 10.0.0.0/16 route on lo there, so untranslated VIPs route
# like translated ones) and the governed cgroup, pinned to one CPU (see
# bench/policy_connect.sh for why).
# A last round of vip1, vip10k and miss10k, apart from the rates, reads the
# kernel's run time of the policy's programs (kernel.bpf_stats_enabled, on for
# that round only: it slows every program run): what translating and judging
# cost per exchange.
# Usage (root): [CPU=1] bench/services.sh [N] [ROUNDS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
N=${1:-5000}
ROUNDS=${2:-5}
CPU=${CPU:-1}
NAME=slbench-$$
. bench/policy_common.sh
for tool in iptables-legacy-restore iptables-nft-restore nft cc; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed: run scripts/install-deps.sh" >&2; exit 1; }
done
RR=$WORK/rr
cc -O2 -Wall -o "$RR" bench/rr.c

cleanup() {
    sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"
    "$SL" policy remove >/dev/null 2>&1 || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NAME-" || true); do ip netns del "$ns"; done
    rmdir "$CG/gov" "$CG" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

vip() { echo "10.$(($1 / 65536)).$(($1 / 256 % 256)).$(($1 % 256))"; }
# The backend's address is on lo in the round's netns: DNAT in nat OUTPUT to
# 127.0.0.0/8 would need route_localnet and a 127/8 source; a plain address on
# lo, and the VIP route with it as source, keeps every configuration equal.
BACKEND=10.200.0.2

# socklens: COUNT services VIP_i:80 -> the backend, for sockets of any netns.
for count in 1 100 10000; do
    {
        echo "attach = \"/$NAME\""
        for i in $(seq 1 "$count"); do
            printf '[[service]]\naddress = "%s:80"\nnetns = "any"\nbackends = [{ address = "%s:7000" }]\n' \
                "$(vip "$i")" "$BACKEND"
        done
    } > "$WORK/svc$count.toml"
done
{
    echo "*nat"
    echo ":OUTPUT ACCEPT [0:0]"
    for i in $(seq 1 10000); do
        echo "-A OUTPUT -d $(vip "$i")/32 -p tcp --dport 80 -j DNAT --to-destination $BACKEND:7000"
    done
    echo "COMMIT"
} > "$WORK/rules.ipt"
{
    echo "table ip slbench {"
    echo "  map svc { type ipv4_addr . inet_service : ipv4_addr . inet_service; elements = {"
    for i in $(seq 1 10000); do echo "    $(vip "$i") . 80 : $BACKEND . 7000,"; done
    echo "  } }"
    echo "  chain out { type nat hook output priority -100; policy accept;"
    echo "    meta l4proto tcp dnat ip to ip daddr . tcp dport map @svc"
    echo "  }"
    echo "}"
} > "$WORK/rules.nft"

round() { # config round -> rate
    local config=$1 r=$2 ns="$NAME-$1-$2" target
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$BACKEND/32" dev lo
    ip -n "$ns" route add 10.0.0.0/16 dev lo src "$BACKEND"
    case $config in
        direct|miss10k) target=$BACKEND,7000 ;;
        vip1) target=$(vip 1),80 ;;
        vip100) target=$(vip 100),80 ;;
        iptl-mid) target=$(vip 5000),80 ;;
        *) target=$(vip 10000),80 ;;
    esac
    case $config in
        vip*|miss10k) f=${config#vip}; [ "$f" = 10k ] || [ "$f" = miss10k ] && f=10000
              "$SL" policy apply "$WORK/svc$f.toml" >/dev/null ;;
        iptl*) nsenter --net="/var/run/netns/$ns" iptables-legacy-restore < "$WORK/rules.ipt" ;;
        iptn) nsenter --net="/var/run/netns/$ns" iptables-nft-restore < "$WORK/rules.ipt" ;;
        nft) nsenter --net="/var/run/netns/$ns" nft -f "$WORK/rules.nft" ;;
    esac
    local out
    # shellcheck disable=SC2016 # expanded by the inner shell
    out=$(sh -c 'echo $$ > "$1/cgroup.procs" && exec taskset -c "$2" ip netns exec "$3" "$4" "$5" "$6" "$7" "$8" 7000' \
        sh "$CG/gov" "$CPU" "$ns" "$RR" "${target%,*}" "${target#*,}" "$N" "$BACKEND")
    case $config in vip*|miss10k)
        [ "$(sysctl -n kernel.bpf_stats_enabled)" = 0 ] || policy_prog_time "$N" >&2
        "$SL" policy remove >/dev/null ;;
    esac
    ip netns del "$ns"
    # Every exchange must have succeeded.
    grep -q " ok $N failed 0$" <<<"$out" || { echo "$config: exchanges failed: $out" >&2; exit 1; }
    cut -d' ' -f2 <<<"$out"
}

CONFIGS="direct vip1 vip100 vip10k miss10k iptl iptl-mid iptn nft"
run_rounds
v=${med[vip10k]}
echo "vip10k / direct        $(awk "BEGIN { printf \"%.3f\", $v / ${med[direct]} }")  (target >= 0.95)"
for t in iptl iptl-mid iptn; do
    echo "vip10k / $t $(awk "BEGIN { printf \"%.2f\", $v / ${med[$t]} }")  (target >= 10)"
done
echo "vip10k / nft           $(awk "BEGIN { printf \"%.3f\", $v / ${med[nft]} }")  (target >= 1.0)"
# One more round of each socklens configuration, with the kernel's program
# statistics on: what translating and judging cost per exchange, measured
# apart from the rates above.
sysctl -qw kernel.bpf_stats_enabled=1
for config in vip1 vip10k miss10k; do
    rate=$(round "$config" 0 2>"$WORK/stats")
    echo "$config programs, one more round with kernel.bpf_stats_enabled=1 ($rate exchanges/s):"
    cat "$WORK/stats"
done
