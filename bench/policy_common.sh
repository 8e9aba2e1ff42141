# Sourced by the policy benchmarks (bench/policy_connect.sh, policy_audit.sh,
# services.sh, redirect.sh; run_rounds and policy_prog_time: services.sh, redirect.sh):
# builds socklens and its testbed, and makes the governed cgroup $CG/gov under
# cgroup v2 (found from /proc/mounts), named $NAME; $WORK is a scratch dir.
# The caller sets NAME and removes all three on exit.
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q
SL=target/release/socklens
TB=target/release/socklens-testbed

CG2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CG2" ] || { echo "cgroup v2 is not mounted" >&2; exit 1; }
CG=$CG2/$NAME
WORK=$(mktemp -d)
mkdir -p "$CG/gov"

PIN=${SOCKLENS_PIN_ROOT:-/sys/fs/bpf/socklens}
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)

# The kernel's run time of the pinned policy programs per exchange of $1
# (kernel.bpf_stats_enabled must be on: it adds a clock read to every run of
# every program, so rates are measured with it off): each program that ran,
# then the total; apply loads them afresh, so the counts are of one round.
policy_prog_time() {
    local link
    for link in "$PIN"/policy/links/*; do
        bpftool -j link show pinned "$link"
    done | python3 -c 'import json, subprocess, sys
n, total = int(sys.argv[1]), 0
for line in sys.stdin.read().replace("}{", "}\n{").splitlines():
    link = json.loads(line)
    p = json.loads(subprocess.check_output(["bpftool", "-j", "prog", "show", "id", str(link["prog_id"])]))
    runs, ns = p.get("run_cnt", 0), p.get("run_time_ns", 0)
    total += ns
    if runs:
        print("  %-20s %5.1f runs %7.0f ns per exchange (%.0f ns/run)" % (p["name"], runs / n, ns / n, ns / runs))
print("  policy programs      %7.0f ns per exchange" % (total / n))' "$1"
}

# The median of the numbers on stdin.
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Runs `round CONFIG ROUND` (it prints an exchanges/s rate) ROUNDS times for
# each of $CONFIGS, interleaved, prints every rate, then each configuration's
# median, range and ratio to `direct`; the medians are left in `med`.
declare -A med
run_rounds() {
    local r config rate range
    declare -A rates
    echo "kernel $(uname -r), $(nproc) CPUs, client on CPU $CPU, N=$N exchanges per round, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for r in $(seq 1 "$ROUNDS"); do
        for config in $CONFIGS; do
            rate=$(round "$config" "$r")
            [ -n "$rate" ] || { echo "round $r $config failed" >&2; exit 1; }
            rates[$config]="${rates[$config]:-} $rate"
            echo "round $r $config $rate exchanges/s"
        done
    done
    echo "load after $(cut -d' ' -f1-3 /proc/loadavg)"
    for config in $CONFIGS; do
        med[$config]=$(echo "${rates[$config]}" | median)
        range=$(echo "${rates[$config]}" | tr ' ' '\n' | grep -v '^$' | sort -n | sed -n '1p;$p' | paste -sd-)
        # and what the configuration adds to one exchange, in microseconds
        echo "median $config ${med[$config]} exchanges/s (range $range) ratio to direct $(awk "BEGIN { printf \"%.3f\", ${med[$config]} / ${med[direct]} }") adds $(awk "BEGIN { printf \"%.1f\", 1e6 / ${med[$config]} - 1e6 / ${med[direct]} }") us/exchange"
    done
}
