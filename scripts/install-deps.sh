#!/usr/bin/env bash
# Installs every Debian package socklens needs to build and test, skipping
# what is already present. Idempotent; run as root.
set -euo pipefail

# clang/llvm compile the BPF programs; libelf/zlib/pkg-config build the vendored
# libbpf; iproute2 and nftables drive the network tests (iptables: the services
# benchmark compares with its DNAT); procps gives sysctl;
# bpftool regenerates vmlinux.h; python3 is the second process in the `top` tests;
# prometheus (server + promtool) scrapes the agent in its tests and benchmark;
# openssl makes the test certificates; systemd (systemd-analyze) scores the unit;
# haproxy is the unchanged proxy that reads SO_ORIGINAL_DST in the redirect tests;
# redis-server and redis-tools (redis-benchmark) are the real server under load
# whose own byte counters the connection tests compare with; sockperf, iperf3,
# redis, nginx-light and wrk run accelerated in bench/accel.sh.
PACKAGES=(clang llvm libelf-dev zlib1g-dev pkg-config make iproute2 nftables iptables procps bpftool python3 prometheus openssl systemd haproxy sockperf iperf3 redis-server redis-tools nginx-light wrk)

die() { echo "install-deps: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get install needs it)"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian 12's own cargo (1.63) is too old for libbpf-rs; the machine's rustup
# toolchain is expected on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain >= 1.82 (rustup)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
