#!/usr/bin/env bash
# Sets socklens up on a fresh Debian 12 host and runs the main job:
# installs packages, builds, then `socklens trace` (Ctrl-C to stop).
# Extra arguments go to `socklens trace`, e.g. ./setup.sh --json --events listen
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked
exec target/release/socklens trace "$@"
