#!/usr/bin/env bash
# Runs a command inside QEMU VMs for every kernel x attach tier and prints a
# PASS/FAIL markdown table (paste-able into BENCHMARKS.md).
#
# Usage: tests/vm/matrix.sh [options] -- CMD [ARGS...]
#   --tiers "T1 T2 ..."     attach tiers, each run with SOCKLENS_ATTACH=T
#                           (default "auto fentry kprobe tracepoint"). T:E also sets
#                           SOCKLENS_EXPECT_TIER=E, e.g. "auto:fentry" (auto must pick fentry)
#   --kernels "S1 S2 ..."   kernel series (default "6.1 6.12 5.10 7"; 6.1/6.12 are required,
#                           5.10/7 wanted: skipped when unavailable)
#   --jobs N                VMs side by side (default: number of cores, at most 2)
#   --log-dir DIR           where per-cell logs go (default: a new dir under ${TMPDIR:-/tmp})
#   --timeout SECONDS       per VM (default $SOCKLENS_VM_TIMEOUT or 600)
#   --env NAME[=VALUE]      extra guest environment (repeatable, see run.sh)
#   --no-install            do not apt-get install missing host packages
#
# Run as root from the directory the command should run in (the guest sees the
# host's root file system read-only, with a throw-away writable overlay; build
# binaries on the host first). Exit status: 0 when every cell passed (skipped
# wanted kernels allowed), 1 otherwise. Kernels are cached in
# $SOCKLENS_VM_CACHE (default /var/cache/socklens-vm), see kernels.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACKAGES=(qemu-system-x86 busybox-static cpio kmod xz-utils zstd)

TIERS="auto fentry kprobe tracepoint"
SERIES="6.1 6.12 5.10 7"
JOBS=
LOG_DIR=
INSTALL=1
declare -a RUN_OPTS=() CMD=()

log() { printf 'matrix: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --tiers) [ $# -ge 2 ] || usage; TIERS=$2; shift 2 ;;
            --kernels) [ $# -ge 2 ] || usage; SERIES=$2; shift 2 ;;
            --jobs) [ $# -ge 2 ] || usage; JOBS=$2; shift 2 ;;
            --log-dir) [ $# -ge 2 ] || usage; LOG_DIR=$2; shift 2 ;;
            --timeout) [ $# -ge 2 ] || usage; RUN_OPTS+=(--timeout "$2"); shift 2 ;;
            --env) [ $# -ge 2 ] || usage; RUN_OPTS+=(--env "$2"); shift 2 ;;
            --no-install) INSTALL=0; shift ;;
            --) shift; break ;;
            -h|--help) usage ;;
            *) log "unknown option $1"; usage ;;
        esac
    done
    [ $# -ge 1 ] || { log "no command given"; usage; }
    CMD=("$@")
    [ -n "$TIERS" ] || die "--tiers is empty"
    if [ -z "$JOBS" ]; then
        # Each VM is single-threaded (-smp 1): one per core, two at most (the
        # measured sweet spot on the 2-core CI machines).
        JOBS=$(nproc)
        [ "$JOBS" -le 2 ] || JOBS=2
    fi
    [[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a positive number"
}

# Installs the host tools when missing; apt-get update runs only if needed.
ensure_packages() {
    local p status
    local -a missing=()
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [ "$status" = installed ] || missing+=("$p")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    [ "$INSTALL" = 1 ] || die "missing packages: ${missing[*]} (and --no-install given)"
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (run as root to install them)"
    log "installing ${missing[*]}"
    apt-get -q update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Fills KERNEL_LINES with kernels.sh output ("SERIES KVER DIR" or "SERIES - note").
resolve_kernels() {
    local out rc=0
    # shellcheck disable=SC2086  # SERIES is a word list on purpose
    out=$("$HERE/kernels.sh" $SERIES) || rc=$?
    [ "$rc" -le 1 ] || die "kernels.sh failed (exit $rc)"
    mapfile -t KERNEL_LINES <<<"$out"
}

series_label() {
    case $1 in
        6.1|6.12) echo "$1 (required)" ;;
        *) echo "$1 (wanted)" ;;
    esac
}

# One cell: boots KDIR with SOCKLENS_ATTACH=TIER. Writes "RC SECONDS" to CELL.result.
# "auto:fentry" -> "auto": the value of SOCKLENS_ATTACH and the log file name.
tier_name() { echo "${1%%:*}"; }

# Runs in a background subshell; run.sh is its child so that a TERM from
# stop_cells reaches run.sh (which then stops its QEMU) instead of orphaning it.
run_cell() {
    local kdir=$1 tier=$2 cell=$3 t0 rc=0 child
    local -a env=(--env "SOCKLENS_ATTACH=$(tier_name "$tier")")
    [[ $tier != *:* ]] || env+=(--env "SOCKLENS_EXPECT_TIER=${tier#*:}")
    t0=$(now)
    "$HERE/run.sh" "$kdir" --log-dir "$cell.vm" "${env[@]}" \
        "${RUN_OPTS[@]}" -- "${CMD[@]}" >"$cell.log" 2>&1 &
    child=$!
    # shellcheck disable=SC2064  # expand now: child is local
    trap "kill $child 2>/dev/null; wait $child; exit 143" TERM
    wait "$child" || rc=$?
    echo "$rc $(elapsed "$t0" "$(now)")" >"$cell.result"
}

cell_text() {
    local rc=$1 secs=$2
    case $rc in
        0) echo "PASS (${secs} s)" ;;
        124) echo "**FAIL** (timeout)" ;;
        125) echo "**FAIL** (VM error)" ;;
        *) echo "**FAIL** (exit $rc)" ;;
    esac
}

declare -A PID_CELL=()
# Interrupted: stop our own cells (each run.sh kills its QEMU on TERM).
stop_cells() {
    local pid
    for pid in "${!PID_CELL[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait || true
}

# Runs all cells, JOBS at a time, and reports each one as it finishes.
run_cells() {
    local -a cells=()
    local line series kver kdir tier
    for line in "${KERNEL_LINES[@]}"; do
        read -r series kver kdir <<<"$line"
        [ "$kver" != - ] || continue
        # Build the initramfs up front: parallel cells of one kernel would wait on its lock.
        "$HERE/initramfs.sh" "$kdir" >/dev/null
        mkdir -p "$LOG_DIR/$kver"
        for tier in $TIERS; do cells+=("$kdir|$tier|$LOG_DIR/$kver/$(tier_name "$tier")"); done
    done
    CELL_TOTAL=${#cells[@]} CELL_DONE=0
    local c cell
    trap 'stop_cells; exit 130' INT TERM
    for c in "${cells[@]}"; do
        IFS='|' read -r kdir tier cell <<<"$c"
        [ "${#PID_CELL[@]}" -lt "$JOBS" ] || reap_one
        run_cell "$kdir" "$tier" "$cell" &
        PID_CELL[$!]=$c
    done
    while [ "${#PID_CELL[@]}" -gt 0 ]; do reap_one; done
    trap - INT TERM
}

# Waits for any running cell and reports it.
reap_one() {
    local pid=
    wait -n -p pid "${!PID_CELL[@]}" || true
    [ -n "$pid" ] || { PID_CELL=(); return 0; }
    local kdir tier cell rc secs
    IFS='|' read -r kdir tier cell <<<"${PID_CELL[$pid]}"
    unset "PID_CELL[$pid]"
    read -r rc secs <"$cell.result" || { rc=125 secs=0; }
    CELL_DONE=$((CELL_DONE + 1))
    log "[$CELL_DONE/$CELL_TOTAL] $(basename "$kdir") $tier: $(cell_text "$rc" "$secs")  ($cell.log)"
}

# Prints the markdown table and sets FAILED=1 when any cell or required kernel failed.
print_table() {
    local line series kver kdir note tier rc secs row
    local header="| kernel | series |" rule="|---|---|"
    for tier in $TIERS; do header+=" ${tier/:/ → } |"; rule+="---|"; done
    echo "$header"
    echo "$rule"
    for line in "${KERNEL_LINES[@]}"; do
        read -r series kver kdir <<<"$line"
        if [ "$kver" = - ]; then
            note=${line#* - }
            row="| $note | $(series_label "$series") |"
            for tier in $TIERS; do
                case $note in
                    skipped*) row+=" skip |" ;;
                    *) row+=" **FAIL** |"; FAILED=1 ;;
                esac
            done
        else
            row="| $kver | $(series_label "$series") |"
            for tier in $TIERS; do
                read -r rc secs <"$LOG_DIR/$kver/$(tier_name "$tier").result" || { rc=125 secs=0; }
                [ "$rc" = 0 ] || FAILED=1
                row+=" $(cell_text "$rc" "$secs") |"
            done
        fi
        echo "$row"
    done
}

# The end of each failed cell's log, so that CI output alone explains the failure.
show_failures() {
    local f rc
    for f in "$LOG_DIR"/*/*.result; do
        [ -e "$f" ] || continue
        read -r rc _ <"$f"
        [ "$rc" != 0 ] || continue
        echo
        echo "---- ${f%.result}.log (last 30 lines) ----"
        tail -n 30 "${f%.result}.log"
    done
}

main() {
    parse_args "$@"
    local t0
    t0=$(now)
    ensure_packages
    if [ -z "$LOG_DIR" ]; then
        LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/socklens-vm-matrix.$(date +%Y%m%d-%H%M%S).XXXX")
    fi
    mkdir -p "$LOG_DIR"
    LOG_DIR=$(cd "$LOG_DIR" && pwd)
    log "logs: $LOG_DIR"
    resolve_kernels
    local t_cells
    t_cells=$(now)
    run_cells
    FAILED=0
    # Not in a pipeline: print_table sets FAILED in this shell.
    print_table >"$LOG_DIR/summary.md"
    cat "$LOG_DIR/summary.md"
    local total cells
    total=$(elapsed "$t0" "$(now)")
    cells=$(elapsed "$t_cells" "$(now)")
    echo
    echo "command: ${CMD[*]}"
    echo "logs: $LOG_DIR (per cell: KVER/TIER.log, VM console: KVER/TIER.vm/)"
    echo "total wall time: ${total} s (VM cells: ${cells} s, ${JOBS} at a time)"
    [ "$FAILED" = 0 ] || { show_failures; echo "matrix: FAILED"; exit 1; }
    echo "matrix: all passed"
}

main "$@"
