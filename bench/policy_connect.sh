#!/usr/bin/env bash
# connect() rate on loopback from inside a governed cgroup:
#   none      no policy at all
#   socklens  a 10,000-rule socklens policy governing the cgroup
#   nftables  the same 10,000 prefixes as an nftables set, matched with
#             `socket cgroupv2` in the output hook of the netns
# The connecting process is socklens-testbed in a fresh cgroup and a fresh netns
# per round (no TIME_WAIT carried over); each round makes N TCP connects to a
# listener on 127.0.0.1:7000 (allowed by both rule sets: the 10,000 denied
# prefixes are 10.x.y.0/24). Configurations are interleaved round by round.
# The testbed (connecting thread and accepting thread) is pinned to one CPU
# (CPU=1 by default): unpinned, cross-CPU wakeups on a 2-core machine make the
# rate bimodal (about 17k or 45k/s from one run to the next, whatever the policy).
# Prints one line per round and the median rate per configuration.
# Usage (root): [CPU=1] bench/policy_connect.sh [N] [ROUNDS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
N=${1:-20000}
ROUNDS=${2:-9}
CPU=${CPU:-1}
RULES=10000
NAME=slbench-$$
. bench/policy_common.sh

cleanup() {
    "$SL" policy remove >/dev/null 2>&1 || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NAME-" || true); do ip netns del "$ns"; done
    rmdir "$CG/gov" "$CG" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The socklens policy: one scope, 10,000 deny rules, default allow.
{
    echo "attach = \"/$NAME\""
    echo "[[scope]]"
    echo "cgroup = \"/$NAME/gov\""
    for i in $(seq 1 $RULES); do
        printf '[[scope.rule]]\nid = %d\naction = "deny"\non = ["connect"]\ncidr = "10.%d.%d.0/24"\n' \
            "$i" $((i / 256)) $((i % 256))
    done
} > "$WORK/policy.toml"

# The nftables equivalent: the same prefixes in an interval set.
NFT_CG=${CG#/sys/fs/cgroup/}   # nft resolves the path under /sys/fs/cgroup
{
    echo "table inet slbench {"
    echo "  set deny { type ipv4_addr; flags interval; elements = {"
    for i in $(seq 1 $RULES); do
        printf '    10.%d.%d.0/24,\n' $((i / 256)) $((i % 256))
    done
    echo "  } }"
    echo "  chain out { type filter hook output priority 0; policy accept;"
    echo "    socket cgroupv2 level 2 \"$NFT_CG/gov\" ip daddr @deny reject"
    echo "  }"
    echo "}"
} > "$WORK/rules.nft"

round() { # config round -> rate
    local config=$1 r=$2 ns="$NAME-$1-$2"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts nft resolves.
    if [ "$config" = nftables ]; then nsenter --net="/var/run/netns/$ns" nft -f "$WORK/rules.nft"; fi
    if [ "$config" = socklens ]; then "$SL" policy apply "$WORK/policy.toml" >/dev/null; fi
    local out
    out=$(taskset -c "$CPU" "$TB" --netns "$ns" --cgroup "$CG/gov" serve,tcp4,127.0.0.1,7000 "connects,tcp4,127.0.0.1,7000,$N")
    if [ "$config" = socklens ]; then "$SL" policy remove >/dev/null; fi
    ip netns del "$ns"
    # Every connect must have succeeded: {"0": N} and nothing else.
    grep -q "\"by_errno\":{\"0\":$N}" <<<"$out" || { echo "connects failed: $out" >&2; exit 1; }
    grep -o '"rate":[0-9]*' <<<"$out" | cut -d: -f2
}

declare -A rates
echo "kernel $(uname -r), $(nproc) CPUs, testbed on CPU $CPU, N=$N connects per round, $ROUNDS rounds, $RULES rules, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    for config in none socklens nftables; do
        rate=$(round "$config" "$r")
        [ -n "$rate" ] || { echo "round $r $config failed" >&2; exit 1; }
        rates[$config]="${rates[$config]:-} $rate"
        echo "round $r $config $rate connects/s"
    done
done
none=$(echo "${rates[none]}" | median)
sl=$(echo "${rates[socklens]}" | median)
nf=$(echo "${rates[nftables]}" | median)
echo "median none     $none connects/s"
echo "median socklens $sl connects/s  ratio $(awk "BEGIN { printf \"%.3f\", $sl / $none }")"
echo "median nftables $nf connects/s  ratio $(awk "BEGIN { printf \"%.3f\", $nf / $none }")"
