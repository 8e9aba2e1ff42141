#!/usr/bin/env bash
# Runs socklens' root test binaries, built on the host, one after the other:
# the command the kernel matrix runs inside each VM. $1 is a file listing the
# binaries (written by tests/vm/ci.sh); extra arguments go to every binary.
set -euo pipefail
list=$1
shift
rc=0
while read -r bin; do
    [ -n "$bin" ] || continue
    echo "=== $bin"
    "$bin" --test-threads=1 "$@" || rc=1
done < "$list"
exit "$rc"
