#!/usr/bin/env bash
# The metrics endpoint beside idle, trickling and flooding clients
# (bench/metrics_endpoint.py says what it does). Root only.
#   bench/metrics_endpoint.sh [SOCKLENS_BINARY]
# Prints one JSON line: scrape latency while 64 idle and 64 slow clients are
# connected, and the agent's threads, descriptors and RSS under 10,000
# connection attempts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SL=${1:-}
if [ -z "$SL" ]; then
    cargo build --release -q --bin socklens
    SL=$PWD/target/release/socklens
fi
WORK=$(mktemp -d)
PORT=19465
echo "listen = \"127.0.0.1:$PORT\"" >"$WORK/agent.toml"
"$SL" agent --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
AGENT=$!
trap 'kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null; rm -rf "$WORK"' EXIT
python3 bench/metrics_endpoint.py 127.0.0.1 "$PORT" "$AGENT"
