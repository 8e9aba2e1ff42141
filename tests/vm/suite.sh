#!/usr/bin/env bash
# Runs socklens' root test binaries, built on the host, one after the other:
# the command the kernel matrix runs inside each VM. $1 is a file listing the
# binaries (written by tests/vm/ci.sh), one per line: "PATH" runs in every cell,
# "PATH auto" only where SOCKLENS_ATTACH=auto (for suites that do not read
# SOCKLENS_ATTACH, e.g. cli: they would repeat the same checks in every tier's
# cell), "PATH -auto" everywhere but there (suites the forced tier's own cell
# runs in full once auto's choice is checked). Words after that are test name
# filters for the binary. Extra arguments go to every binary. Prints each
# binary's wall time.
set -euo pipefail
list=$1
shift
rc=0
# How this cell counts bytes, for the log (which send/recv way, which TCP method).
sl=target/debug/socklens
if [ -x "$sl" ]; then
    echo "=== socklens doctor --attach ${SOCKLENS_ATTACH:-auto}"
    "$sl" doctor --attach "${SOCKLENS_ATTACH:-auto}" 2>&1 | grep -E '^tcp bytes|^  (send|recv) ' || true
fi
while read -r bin only filters; do
    [ -n "$bin" ] || continue
    case "$only" in
    "") ;;
    -*)
        if [ "${SOCKLENS_ATTACH:-auto}" = "${only#-}" ]; then
            echo "=== $bin: not in this cell (the cell of the tier ${only#-} chose runs it)"
            continue
        fi
        ;;
    *)
        if [ "${SOCKLENS_ATTACH:-auto}" != "$only" ]; then
            echo "=== $bin: not in this cell (tier-independent, runs with SOCKLENS_ATTACH=$only)"
            continue
        fi
        ;;
    esac
    echo "=== $bin"
    start=$(date +%s)
    # Root-only tests are #[ignore]d for a plain `cargo test`: run them all.
    # shellcheck disable=SC2086 # test name filters, one per word
    "$bin" --test-threads=1 --include-ignored "$@" ${filters:-} || rc=1
    echo "=== $bin: $(($(date +%s) - start)) s"
    # The fentry and kprobe wrappers of the destruction hook, which reports a
    # close the state hook missed: three byte tests with the state hook blind
    # to TCP_CLOSE (test.sh runs the whole file so on the host's tier).
    case "$bin:${SOCKLENS_ATTACH:-auto}" in
    *live_conns-*:fentry | *live_conns-*:kprobe)
        echo "=== $bin with SOCKLENS_DISABLE=state_close"
        SOCKLENS_DISABLE=state_close "$bin" --test-threads=1 --include-ignored --exact "$@" \
            many_small_writes_exact reset_by_unread_close_counts_what_was_accepted_and_what_was_read \
            reset_after_the_peers_fin_counts_no_fin_in_tx ||
            rc=1
        ;;
    esac
done < "$list"
exit "$rc"
