#!/usr/bin/env python3
"""Per-program BPF run time and agent CPU of several socklens builds, side by
side under connection churn.

Usage (root, from the repository, after bench/run.sh built loadgen):

    ROUNDS=3 SECS=5 python3 bench/prog_stats.py BUILD [BUILD...]
    LOAD=rr MODE=conns ROUNDS=3 SECS=3 python3 bench/prog_stats.py BUILD [BUILD...]

Each round starts each build in turn as `socklens trace` with every event
(MODE=conns: `socklens conns`), runs `loadgen churn SECS 2` (LOAD=rr:
`loadgen rr 1 SECS`) pinned to CPU 0 in a fresh netns, and prints, from
kernel.bpf_stats_enabled=1 and the kernel's counters for that build's own
programs: ns per run of the programs a churn connection runs ("=NSxRUNS": runs
per connection), their total per
connection, and the agent's CPU (schedstat) per event it printed.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The harness's own readers of the kernel's per-program counters, and its
# names for loadgen, the event list and the ready line.
from bench import ALL_EVENTS, LOADGEN, READY, bpf_run_stats  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
LOAD = os.environ.get("LOAD", "churn")
MODE = os.environ.get("MODE", "trace")
SECS = os.environ.get("SECS", "5")
NS = f"slstats{os.getpid()}"


def cpu_ns(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def one(build):
    args = ["trace", "--events", ALL_EVENTS, "--json"] if MODE == "trace" else \
        ["conns", "--duration", "3600"]
    load_args = ["churn", SECS, "2"] if LOAD == "churn" else ["rr", "1", SECS]
    tracer = subprocess.Popen([build, *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in tracer.stderr:
            if READY in line:
                break
        else:
            raise RuntimeError(f"{build} never printed {READY!r}")
        time.sleep(0.3)
        before, cpu0 = bpf_run_stats(tracer.pid), cpu_ns(tracer.pid)
        load = json.loads(subprocess.check_output(
            ["ip", "netns", "exec", NS, "taskset", "-c", "0", LOADGEN, *load_args]))
        time.sleep(0.2)
        after, cpu1 = bpf_run_stats(tracer.pid), cpu_ns(tracer.pid)
    finally:
        tracer.terminate()
        rest = tracer.stderr.read()
        tracer.wait()
    # "socklens: N events, ..."
    events = next(int(l.split()[1]) for l in reversed(rest.strip().splitlines())
                  if l.startswith("socklens: ") and " events, " in l)
    delta = {n: (after[n][0] - before.get(n, (0, 0))[0], after[n][1] - before.get(n, (0, 0))[1])
             for n in after}
    busy = {n: (ns / runs, runs / load["ops"]) for n, (runs, ns) in delta.items() if runs > 1000}
    per_conn = sum(ns for _, ns in delta.values()) / load["ops"]
    progs = " ".join(f"{n}={v:.0f}x{k:.1f}" for n, (v, k) in sorted(busy.items()))
    unit = "conn" if LOAD == "churn" else "transaction"
    print(f"{build}: {load['rate']:.0f} {unit}s/s; ns per run: {progs}; "
          f"kernel ns per {unit} {per_conn:.0f}; "
          + (f"agent ns per event {(cpu1 - cpu0) / events:.0f} ({events} events)" if events
             else f"agent CPU {(cpu1 - cpu0) / 1e6:.1f} ms, no events"), flush=True)


def main():
    builds = sys.argv[1:]
    if not builds:
        sys.exit(__doc__)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        was = f.read().strip()
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", NS, "sysctl", "-q",
                        "net.ipv4.ip_local_port_range=1024 65535"], check=True)
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        for _ in range(ROUNDS):
            for build in builds:
                one(build)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(was)
        subprocess.run(["ip", "netns", "del", NS])


if __name__ == "__main__":
    main()
