#!/usr/bin/env bash
# Boots one kernel under QEMU (TCG) and runs a command inside it, in the
# caller's cwd, on a writable overlay of the host's root file system.
#
# Usage: tests/vm/run.sh KERNEL_DIR [options] -- CMD [ARGS...]
#   KERNEL_DIR          a directory printed by kernels.sh
#   --env NAME=VALUE    set NAME in the guest command's environment (repeatable)
#   --env NAME          pass the host's NAME through, if set
#   --timeout SECONDS   kill the guest after this long (default $SOCKLENS_VM_TIMEOUT or 600)
#   --log-dir DIR       keep the console logs and result files in DIR (default: a temp dir,
#                       removed on success)
#
# The command's stdout/stderr are printed on run.sh's stdout/stderr after the
# guest powers off; run.sh exits with the command's exit code, 124 on timeout,
# 125 when the VM itself failed (never reached the command twice, or died while
# it ran).
#
# Environment:
#   SOCKLENS_VM_TIMEOUT        overall timeout in seconds (600)
#   SOCKLENS_VM_BOOT_TIMEOUT   seconds for the guest to reach the command (180), else retry
#   SOCKLENS_VM_MEM            guest memory (2G)
#   SOCKLENS_VM_PASS_ENV       host variables passed through when set
#                              (default "CI RUST_BACKTRACE RUST_LOG SOCKLENS_ATTACH")
#   SOCKLENS_VM_APPEND         extra kernel command line arguments
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=${SOCKLENS_VM_TIMEOUT:-600}
BOOT_TIMEOUT=${SOCKLENS_VM_BOOT_TIMEOUT:-180}
MEM=${SOCKLENS_VM_MEM:-2G}
PASS_ENV=${SOCKLENS_VM_PASS_ENV:-CI RUST_BACKTRACE RUST_LOG SOCKLENS_ATTACH}

log() { printf 'vm: %s\n' "$*" >&2; }
die() { log "$*"; exit 125; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

KDIR='' LOG_DIR='' TMP_RUN_DIR=''
declare -a GUEST_ENV=() CMD=()

parse_args() {
    [ $# -ge 1 ] || usage
    case $1 in -h|--help) usage ;; esac
    KDIR=$(cd "$1" && pwd) || die "no such kernel dir: $1"
    shift
    while [ $# -gt 0 ]; do
        case $1 in
            --env) [ $# -ge 2 ] || usage; add_env "$2"; shift 2 ;;
            --env=*) add_env "${1#--env=}"; shift ;;
            --timeout) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
            --log-dir) [ $# -ge 2 ] || usage; LOG_DIR=$2; shift 2 ;;
            --) shift; break ;;
            -h|--help) usage ;;
            *) log "unknown option $1"; usage ;;
        esac
    done
    [ $# -ge 1 ] || { log "no command given"; usage; }
    CMD=("$@")
    [[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout needs whole seconds"
}

# NAME=VALUE is taken as given; a bare NAME copies the host's value if set.
add_env() {
    local kv=$1 name=${1%%=*}
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad --env name: $name"
    if [[ $kv != *=* ]]; then
        [ -n "${!name+x}" ] || return 0
        kv="$name=${!name}"
    fi
    GUEST_ENV+=("$kv")
}

default_env() {
    local name
    for name in $PASS_ENV; do
        # Explicit --env entries win over the pass-through list.
        if [ -n "${!name+x}" ] && ! printf '%s\n' "${GUEST_ENV[@]}" | grep -q "^$name="; then
            GUEST_ENV+=("$name=${!name}")
        fi
    done
}

# The script the guest's /init runs (with bash from the host root) in the chroot.
write_cmd_script() {
    local out=$1 kv
    {
        echo '#!/bin/bash'
        printf 'cd -- %q || { echo "vm: cannot cd to %s in the guest" >&2; exit 125; }\n' "$PWD" "$PWD"
        for kv in "${GUEST_ENV[@]}"; do
            printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
        done
        printf 'exec'
        printf ' %q' "${CMD[@]}"
        echo
    } >"$out"
}

# Single-quotes a value for the busybox shell that sources guest.conf.
sh_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

write_guest_conf() {
    local out=$1 moddir
    moddir=$(readlink -f "$KDIR/modules")
    printf 'SOCKLENS_VM_MODULES=%s\n' "$(sh_quote "$moddir")" >"$out"
    local config=
    [ -e "$KDIR/config" ] && config=$(readlink -f "$KDIR/config")
    printf 'SOCKLENS_VM_KCONFIG=%s\n' "$(sh_quote "$config")" >>"$out"
}

# Starts QEMU in the background; the console goes to a log file.
start_qemu() {
    local share=$1 console=$2 initrd=$3
    qemu-system-x86_64 \
        -accel tcg -cpu max -smp 1 -m "$MEM" \
        -nographic -no-reboot -nic none \
        -kernel "$KDIR/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 rdinit=/init ${SOCKLENS_VM_APPEND:-}" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -virtfs "local,path=$share,mount_tag=results,security_model=none,multidevs=remap" \
        </dev/null >"$console" 2>&1 &
    QEMU_PID=$!
}

stop_qemu() {
    kill "$QEMU_PID" 2>/dev/null || true
    sleep 1
    kill -9 "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
}

# One boot. Sets ATTEMPT_RESULT to finished | noboot | killed | timeout.
boot_once() {
    local share=$1 console=$2 initrd=$3 start now
    start_qemu "$share" "$console" "$initrd"
    start=$SECONDS
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        now=$((SECONDS - start))
        if [ ! -e "$share/started" ] && [ "$now" -ge "$BOOT_TIMEOUT" ]; then
            stop_qemu
            ATTEMPT_RESULT=noboot
            return 0
        fi
        if [ "$now" -ge "$TIMEOUT" ]; then
            stop_qemu
            ATTEMPT_RESULT=timeout
            return 0
        fi
        sleep 0.2
    done
    wait "$QEMU_PID" || true
    if [ -e "$share/started" ]; then
        ATTEMPT_RESULT=finished
    elif grep -q 'terminating on signal' "$console"; then
        # Someone else stopped QEMU (e.g. Ctrl-C reached it): not a flaky boot, do not retry.
        ATTEMPT_RESULT=killed
    else
        ATTEMPT_RESULT=noboot
    fi
}

print_output() {
    local share=$1
    [ -f "$share/stdout" ] && cat "$share/stdout"
    [ -f "$share/stderr" ] && cat "$share/stderr" >&2
    return 0
}

console_tail() {
    log "last console lines ($1):"
    # Strip the firmware's terminal escape sequences; keep the kernel's last words.
    tail -n 25 "$1" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g; s/^/  | /' >&2
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    if [ -n "${QEMU_PID:-}" ] && kill -0 "$QEMU_PID" 2>/dev/null; then stop_qemu; fi
    [ -z "$TMP_RUN_DIR" ] || rm -rf "$TMP_RUN_DIR"
}

main() {
    parse_args "$@"
    default_env
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (tests/vm/matrix.sh installs it)"
    local initrd run_dir
    initrd=$("$HERE/initramfs.sh" "$KDIR")
    if [ -n "$LOG_DIR" ]; then
        mkdir -p "$LOG_DIR"
        run_dir=$(cd "$LOG_DIR" && pwd)
    else
        run_dir=$(mktemp -d "${TMPDIR:-/tmp}/socklens-vm.XXXXXX")
        TMP_RUN_DIR=$run_dir
    fi
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    local attempt share console rc
    for attempt in 1 2; do
        share=$run_dir/share.$attempt
        console=$run_dir/console.$attempt.log
        rm -rf "$share"
        mkdir -p "$share"
        write_cmd_script "$share/cmd.sh"
        write_guest_conf "$share/guest.conf"
        boot_once "$share" "$console" "$initrd"
        case $ATTEMPT_RESULT in
            finished)
                print_output "$share"
                if [ ! -f "$share/rc" ]; then
                    console_tail "$console"
                    TMP_RUN_DIR=
                    die "guest died while the command ran (logs in $run_dir)"
                fi
                rc=$(cat "$share/rc")
                [ "$rc" -eq 0 ] || TMP_RUN_DIR=  # keep a failed run's logs
                [ "$rc" -eq 0 ] || log "command exited $rc on $(cat "$KDIR/kver") (logs in $run_dir)"
                exit "$rc"
                ;;
            timeout)
                print_output "$share"
                console_tail "$console"
                TMP_RUN_DIR=
                log "timeout after ${TIMEOUT}s on $(cat "$KDIR/kver") (logs in $run_dir)"
                exit 124
                ;;
            killed)
                TMP_RUN_DIR=
                die "QEMU was stopped by a signal before the command ran (logs in $run_dir)"
                ;;
            noboot)
                console_tail "$console"
                [ -f "$share/init-error" ] && log "guest init: $(cat "$share/init-error")"
                # About one TCG boot in a hundred dies early; a second one is independent.
                if [ "$attempt" = 1 ]; then log "guest never reached the command; retrying once"; fi
                ;;
        esac
    done
    TMP_RUN_DIR=
    die "guest never reached the command, twice (logs in $run_dir)"
}

main "$@"
