#!/usr/bin/env bash
# The kernel matrix as CI runs it (./test.sh calls it after the host suite):
# build the root test binaries on the host, then run them in a VM per kernel
# and attach tier. Extra arguments go to matrix.sh (e.g. --kernels "6.12").
#
# Only the suites whose hooks have attach tiers run in the VMs (live_bind_listen:
# every cell; live_conns: every forced tier's cell); cli does not read
# SOCKLENS_ATTACH (it forces each tier itself), so it runs once per kernel, in
# the auto cell. The cgroup policy tests do not depend on the tier: live_services
# and live_redirect run once per kernel in the auto cell and check each kernel's
# documented fallback (docs/services.md and docs/redirect.md, "Kernels");
# live_accel likewise (docs/accelerate.md).
#
# Environment: SOCKLENS_VM_TIERS (default "auto:fentry fentry kprobe tracepoint"),
# SOCKLENS_VM_KERNELS (default "6.1 6.12 5.10 7"), SOCKLENS_TEST_SCALE for the
# guests (default 0.1, see tests/common/mod.rs). SOCKLENS_EXPECT_KTLS=1: every
# kernel here that accelerates has the tls module, so live_accel's kTLS cases
# must run (docs/accelerate.md, "kTLS").
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
list=target/vm-tests.txt
bins=$(cargo test --locked --no-run 2>&1 \
    | grep -oE 'target/debug/deps/(cli|live_bind_listen|live_conns|live_services|live_redirect|live_accel)-[0-9a-f]+' | sort -u)
[ -n "$bins" ] || { echo "vm/ci: no test binaries found" >&2; exit 1; }
# The auto cell checks auto's choice with cli and live_bind_listen (every
# event must carry the expected tier); the connection suite runs in the cell
# of the tier it chose (fentry on every kernel here), not twice.
for b in $bins; do
    case $b in
        */cli-*) echo "$b auto" ;;
        # The tests whose outcome depends on the kernel's features (every one
        # of them checks the failing apply on 5.10); the rest run on the host.
        */live_services-*) echo "$b auto terminate tcp_v4 udp_unconnected zero_backends" ;;
        */live_redirect-*) echo "$b auto tcp_reaches so_original_dst udp_to ten_thousand pairs_the_proxy" ;;
        */live_conns-*) echo "$b -auto" ;;
        # Tier-independent; checks acceleration where doctor says the kernel
        # has it, the refused apply where not (docs/accelerate.md).
        */live_accel-*) echo "$b auto" ;;
        *) echo "$b" ;;
    esac
done > "$list"
exec tests/vm/matrix.sh --tiers "${SOCKLENS_VM_TIERS:-auto:fentry fentry kprobe tracepoint}" \
    --kernels "${SOCKLENS_VM_KERNELS:-6.1 6.12 5.10 7}" \
    --env "SOCKLENS_TEST_SCALE=${SOCKLENS_TEST_SCALE:-0.1}" --env SOCKLENS_EXPECT_KTLS=1 "$@" \
    -- tests/vm/suite.sh "$list"
