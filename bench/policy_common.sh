# Sourced by the policy benchmarks (bench/policy_connect.sh, bench/policy_audit.sh):
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
