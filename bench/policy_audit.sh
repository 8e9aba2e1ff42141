#!/usr/bin/env bash
# connect() rate from a governed cgroup when every connect makes a policy
# event (`mode = "audit"`), against the same policy matching nothing.
#   events  an audit-mode scope whose one rule matches 127.0.0.0/8: each
#           connect emits a policy_audit record, read by `policy apply --follow`
#   none    the same policy with the rule on 10.0.0.0/8: no record
# Also counts IRQ-work interrupts (/proc/interrupts, IWI) during each round:
# the wakeups the records cost their producer. Set SL2 to a second socklens
# build to add its `events` round (A/B in one run).
# Usage (root): [CPU=1] [SL2=path] bench/policy_audit.sh [N] [ROUNDS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
N=${1:-20000}
ROUNDS=${2:-5}
CPU=${CPU:-1}
NAME=slaudit-$$
. bench/policy_common.sh
FOLLOWER=

cleanup() {
    [ -n "$FOLLOWER" ] && kill "$FOLLOWER" 2>/dev/null
    "$SL" policy remove >/dev/null 2>&1 || true
    ip netns del "$NAME" 2>/dev/null || true
    rmdir "$CG/gov" "$CG" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

policy() { # cidr -> file
    printf 'attach = "/%s"\n[[scope]]\ncgroup = "/%s/gov"\nmode = "audit"\n' "$NAME" "$NAME"
    printf '[[scope.rule]]\nid = 1\naction = "deny"\non = ["connect"]\ncidr = "%s"\n' "$1"
}
policy 127.0.0.0/8 > "$WORK/events.toml"
policy 10.0.0.0/8 > "$WORK/none.toml"
ip netns add "$NAME"
ip -n "$NAME" link set lo up

iwi() { awk '/IWI/ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts; }

round() { # binary policy -> "rate iwi records"
    local bin=$1 file=$2 out before after
    "$bin" policy apply --follow --json "$file" > "$WORK/records" 2> "$WORK/err" &
    FOLLOWER=$!
    for _ in $(seq 100); do grep -q following "$WORK/err" && break; sleep 0.05; done
    before=$(iwi)
    out=$(taskset -c "$CPU" "$TB" --netns "$NAME" --cgroup "$CG/gov" serve,tcp4,127.0.0.1,7000 \
        "connects,tcp4,127.0.0.1,7000,$N")
    after=$(iwi)
    sleep 0.3 # the follower drains on its 100 ms poll timeout
    kill "$FOLLOWER"; wait "$FOLLOWER" 2>/dev/null || true; FOLLOWER=
    "$bin" policy remove >/dev/null
    grep -q "\"by_errno\":{\"0\":$N}" <<<"$out" || { echo "connects failed: $out" >&2; exit 1; }
    echo "$(grep -o '"rate":[0-9]*' <<<"$out" | cut -d: -f2) $((after - before)) $(grep -c policy_audit "$WORK/records" || true)"
}

configs="none events"
[ -n "${SL2:-}" ] && configs="$configs alt-events"
declare -A rates
echo "kernel $(uname -r), $(nproc) CPUs, testbed on CPU $CPU, N=$N connects per round, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    for config in $configs; do
        case $config in
            none) res=$(round "$SL" "$WORK/none.toml") ;;
            events) res=$(round "$SL" "$WORK/events.toml") ;;
            alt-events) res=$(round "$SL2" "$WORK/events.toml") ;;
        esac
        read -r rate irqs records <<<"$res"
        rates[$config]="${rates[$config]:-} $rate"
        echo "round $r $config $rate connects/s, $irqs IRQ-work interrupts, $records audit records"
    done
done
none=$(echo "${rates[none]}" | median)
for config in $configs; do
    m=$(echo "${rates[$config]}" | median)
    echo "median $config $m connects/s  ratio $(awk "BEGIN { printf \"%.3f\", $m / $none }")"
done
