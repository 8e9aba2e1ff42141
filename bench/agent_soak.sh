#!/usr/bin/env bash
# Agent soak: `socklens agent` under steady mixed load for DURATION
# seconds (default 600), with Debian's prometheus scraping it every 5 s.
# Load, all on loopback in a netns made for the run:
#   churn  short TCP connections at about RATE/s (connect, accept, close)
#   bulk   one long TCP connection carrying about 1.3 MB/s (64 KiB every 50 ms)
#   udp    1,000-byte datagrams, 100/s, to a bound receiver
# Every SAMPLE seconds it records the agent's CPU (utime+stime from
# /proc/PID/stat) and RSS (VmRSS); at the end it prints RSS after warm-up
# (WARMUP s, default 60 or a fifth of a shorter run) and at the end, the
# growth, the agent's CPU in cores, the connection rate Prometheus computed
# from the agent's own counter, and CPU per 1,000 connections/s.
# Usage (root): [RATE=500] [SAMPLE=5] [WARMUP=60] bench/agent_soak.sh [DURATION]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
DURATION=${1:-600}
RATE=${RATE:-500}
SAMPLE=${SAMPLE:-5}
WARMUP=${WARMUP:-$(( DURATION / 5 < 60 ? DURATION / 5 : 60 ))}
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q
SL=$PWD/target/release/socklens
TB=$PWD/target/release/socklens-testbed
NAME=slagent-soak-$$
WORK=$(mktemp -d)
AGENT_PORT=19464
PROM_PORT=19090
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NAME" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NAME"
ip -n "$NAME" link set lo up

cat > "$WORK/agent.toml" <<TOML
listen = "127.0.0.1:$AGENT_PORT"
TOML
cat > "$WORK/prometheus.yml" <<YML
global:
  scrape_interval: 5s
scrape_configs:
  - job_name: socklens
    static_configs:
      - targets: ['127.0.0.1:$AGENT_PORT']
YML

"$SL" agent --config "$WORK/agent.toml" 2>"$WORK/agent.err" &
AGENT=$!
pids+=("$AGENT")
# HTTP GET with python3 (already a dependency): prints the body, fails on errors.
http_get() {
    python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
}
for _ in $(seq 300); do
    http_get "http://127.0.0.1:$AGENT_PORT/healthz" >/dev/null 2>&1 && break
    kill -0 "$AGENT" || { cat "$WORK/agent.err" >&2; exit 1; }
    sleep 0.1
done
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >/dev/null 2>"$WORK/prometheus.log" &
pids+=("$!")

# The load, in the netns. Pauses set the rates; each generator runs a bit
# longer than the measurement so the load is steady until the last sample.
RUN=$(( DURATION + 10 ))
PAUSE_US=$(( 1000000 / RATE ))
"$TB" --netns "$NAME" serve,tcp4,127.0.0.1,7000 \
    "connects,tcp4,127.0.0.1,7000,$(( RUN * RATE )),$PAUSE_US" >"$WORK/churn.json" &
pids+=("$!")
"$TB" --netns "$NAME" bind,tcp4,127.0.0.1,7100 listen,0,8 accept,0 recvall,1,65536 >/dev/null &
pids+=("$!")
sleep 0.3
"$TB" --netns "$NAME" connect,tcp4,127.0.0.1,7100 "send,0,$(( RUN * 20 * 65536 )),65536,50" >/dev/null &
pids+=("$!")
"$TB" --netns "$NAME" bind,udp4,127.0.0.1,7200 "recvfrom,0,$(( RUN * 100 ))" >/dev/null &
pids+=("$!")
sleep 0.3
"$TB" --netns "$NAME" connect,udp4,127.0.0.1,7200 "send,0,$(( RUN * 100 * 1000 )),1000,10" >/dev/null &
pids+=("$!")

HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$AGENT/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$AGENT/status"; }
echo "t_s cpu_ticks rss_kib" > "$WORK/samples"
start=$(python3 -c 'import time; print(time.time())')
for (( t = 0; t <= DURATION; t += SAMPLE )); do
    sleep "$(python3 -c "import sys, time; print(max(0.0, float(sys.argv[1]) + $t - time.time()))" "$start")"
    echo "$t $(cpu_ticks) $(rss_kib)" >> "$WORK/samples"
done

query() {
    http_get "http://127.0.0.1:$PROM_PORT/api/v1/query?query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1")" |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "nan")'
}
window=$(( DURATION - WARMUP ))
conn_rate=$(query "sum(rate(socklens_connections_opened_total{direction=\"out\"}[${window}s]))")
lost=$(query "socklens_events_lost_total")
scrapes=$(query "count_over_time(up{job=\"socklens\"}[${DURATION}s])")

python3 - "$WORK/samples" "$HZ" "$WARMUP" "$conn_rate" "$lost" "$scrapes" "$DURATION" "$RATE" <<'PY'
import sys
path, hz, warmup, conn_rate, lost, scrapes, duration, rate = sys.argv[1:]
hz, warmup, conn_rate = int(hz), int(warmup), float(conn_rate)
rows = [tuple(map(int, l.split())) for l in open(path).read().splitlines()[1:]]
after = [r for r in rows if r[0] >= warmup]
t0, c0, m0 = after[0]
t1, c1, m1 = after[-1]
cores = (c1 - c0) / hz / (t1 - t0)
peak = max(r[2] for r in after)
print(f"duration {duration} s (warm-up {warmup} s), target churn {rate}/s, "
      f"{len(rows)} samples, {scrapes} prometheus scrapes, {lost} events lost")
print(f"RSS after warm-up {m0/1024:.1f} MiB, at end {m1/1024:.1f} MiB, peak {peak/1024:.1f} MiB, "
      f"growth {m1 - m0:+d} KiB")
print(f"agent CPU {cores*100:.1f} % of one core; connections {conn_rate:.0f}/s (outgoing, "
      f"from socklens_connections_opened_total); CPU per 1,000 conn/s "
      f"{cores*100/(conn_rate/1000) if conn_rate > 0 else float('nan'):.1f} % of a core")
print("samples (t_s cpu_ticks rss_kib):", " ".join(f"{t}:{c}:{m}" for t, c, m in rows))
PY
