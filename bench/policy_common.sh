# Sourced by the policy benchmarks (bench/policy_connect.sh, policy_audit.sh,
# services.sh, redirect.sh; run_rounds: redirect.sh):
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

# The median of the numbers on stdin.
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Runs `round CONFIG ROUND` (it prints an exchanges/s rate) ROUNDS times for
# each of $CONFIGS, interleaved, prints every rate, then each configuration's
# median, range and ratio to `direct`; the medians are left in `med`.
declare -A med
run_rounds() {
    local r config rate range
    declare -A rates
    echo "kernel $(uname -r), $(nproc) CPUs, testbed on CPU $CPU, N=$N exchanges per round, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
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
        echo "median $config ${med[$config]} exchanges/s (range $range) ratio to direct $(awk "BEGIN { printf \"%.3f\", ${med[$config]} / ${med[direct]} }")"
    done
}
