#!/usr/bin/env bash
# Loopback benchmarks: socklens' cost on loopback traffic, measured side by side
# with no tracer and with a bpftrace peer, alternating in one run; then agent
# RSS and start-up time with 65,536 tracked connections. Root only. Traffic
# stays on loopback inside a network namespace this script creates.
#
#   bench/run.sh                 # full run (about 15 minutes)
#   ROUNDS=3 SECS=3 bench/run.sh # shorter
#
# Results: target/bench/report.md (tables) and target/bench/report.json (raw).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "bench: run as root" >&2; exit 1; }

# Packages the benchmarks need beyond the build (scripts/install-deps.sh):
# iperf3 for bulk throughput, bpftrace for the peer baseline, GNU time for
# peak RSS, python3 to drive the runs.
need=()
for p in iperf3 bpftrace time python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "bench: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    }
fi

export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin socklens >&2
mkdir -p target/bench
rustc -O --edition 2021 -o target/bench/loadgen bench/loadgen.rs
exec python3 bench/bench.py "$@"
