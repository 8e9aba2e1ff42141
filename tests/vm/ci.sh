#!/usr/bin/env bash
# The kernel matrix as CI runs it: build the root test binaries on the host,
# then run them in a VM per kernel and attach tier. Extra arguments go to
# matrix.sh (e.g. --kernels "6.12"). Only the suites whose hooks have attach tiers
# run in the VMs; the cgroup policy tests do not depend on the tier.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
list=target/vm-tests.txt
cargo test --locked --no-run 2>&1 \
    | grep -oE 'target/debug/deps/(cli|live_bind_listen|live_conns)-[0-9a-f]+' | sort -u > "$list"
[ -s "$list" ] || { echo "vm/ci: no test binaries found" >&2; exit 1; }
exec tests/vm/matrix.sh --tiers "${SOCKLENS_VM_TIERS:-auto:fentry fentry kprobe tracepoint}" "$@" \
    -- tests/vm/suite.sh "$list"
