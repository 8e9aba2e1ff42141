#!/usr/bin/env bash
# Runs the whole socklens test suite: formatting, lints, unit tests and the
# live BPF tests (root only: they load programs and create netns and cgroups).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# Live tests share the kernel's tracing state (tracefs, loaded programs):
# one at a time.
cargo test --locked -- --test-threads=1
# The tracepoint tier's variant for kernels without sock:sock_send_length /
# sock_recv_length (before 6.3): byte counts from the socket syscalls' exits.
SOCKLENS_DISABLE=sock_send_length,sock_recv_length \
    cargo test --locked --test live_conns -- --test-threads=1
