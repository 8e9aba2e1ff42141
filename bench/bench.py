#!/usr/bin/env python3
"""Drives the loopback benchmarks (run through bench/run.sh, which builds
what this needs). Part 1 alternates tracer conditions round by round on each
workload; part 2 measures memory and start-up with many tracked connections.

Environment knobs: ROUNDS (5), SECS (5 per run), CHURN_CLIENTS (2), QUIET_WAIT (60),
IDLE_PAIRS (32768: two tracked sockets each, so 65,536 entries),
BIG_PAIRS (65536, tracked with --max-conns 131072; 0 skips),
STARTUPS (5), ALT_SOCKLENS (a second build: conditions named "alt-X" run X with it)."""

import json
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCKLENS = os.path.join(ROOT, "target/release/socklens")
# A second build for A/B runs: a condition named "alt-X" runs condition X with
# this binary instead (e.g. CONDITIONS=base,socklens-conns,alt-socklens-conns).
ALT_SOCKLENS = os.environ.get("ALT_SOCKLENS")
LOADGEN = os.path.join(ROOT, "target/bench/loadgen")
OUT_DIR = os.path.join(ROOT, "target/bench")

ROUNDS = int(os.environ.get("ROUNDS", "5"))
SECS = float(os.environ.get("SECS", "5"))
CHURN_CLIENTS = int(os.environ.get("CHURN_CLIENTS", "2"))
IDLE_PAIRS = int(os.environ.get("IDLE_PAIRS", "32768"))
BIG_PAIRS = int(os.environ.get("BIG_PAIRS", "65536"))
STARTUPS = int(os.environ.get("STARTUPS", "5"))
QUIET_WAIT = float(os.environ.get("QUIET_WAIT", "60"))
QUIET_CORES = 0.2
# A round counts as contended when other processes used more than this much
# of a core (out of 2) during any of its runs; medians use the other rounds.
CONTENDED_CORES = 0.75
NS = f"slbench{os.getpid()}"
ALL_EVENTS = "bind,listen,established,accept,close,retransmit"
# What an operator streams to a log: every connection record, no per-call events.
CONN_EVENTS = "established,close,retransmit"
READY = "Ctrl-C to stop"
# Per-connection byte counting in bpftrace, the same tracepoints and the
# same rules (bytes returned, no MSG_PEEK) as socklens' tracepoint tier.
BPFTRACE = (
    "tracepoint:sock:sock_send_length /args->ret > 0/ { @tx[args->sk] = sum(args->ret); } "
    "tracepoint:sock:sock_recv_length /args->ret > 0 && (args->flags & 2) == 0/ "
    "{ @rx[args->sk] = sum(args->ret); }"
)
TIMEOUT = 120


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def in_ns(*args):
    return ["ip", "netns", "exec", NS, *args]


def pinned(*args):
    """The load runs on CPU 0 only: on this VM, a ping-pong whose two ends
    sit on different vCPUs waits for the guest's halt-polling and the host to
    wake the other vCPU, and runs 15x slower, at random (measured: 10k vs
    170k transactions/s). On one CPU the tracer's cost shows as CPU cost; the
    tracer itself is left free to run on CPU 1."""
    return in_ns("taskset", "-c", "0", *args)


def busy_jiffies():
    """All CPUs' non-idle time from /proc/stat (includes irq and softirq)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle


def task_jiffies():
    """All CPUs' user + nice + system time: what processes ran, without idle,
    iowait, irq and softirq (so it compares with processes' utime + stime)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2]


def wait_quiet():
    """Waits (bounded by QUIET_WAIT s) until the rest of the host uses less
    than QUIET_CORES of CPU; returns the last reading, in cores. Other work on
    this 2-core machine (VM test matrices, builds) skews a run far more than
    any tracer does."""
    deadline = time.time() + QUIET_WAIT
    while True:
        j0 = task_jiffies()
        time.sleep(1)
        cores = (task_jiffies() - j0) / os.sysconf("SC_CLK_TCK")
        if cores < QUIET_CORES or time.time() > deadline:
            return cores
        time.sleep(2)


def proc_cpu(pid):
    """utime + stime of a process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def proc_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_for(stream, pattern, proc, timeout=30):
    """Reads lines until one contains pattern; returns the lines read."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"{proc.args[0]} exited before '{pattern}': {''.join(seen)}")
        seen.append(line)
        if pattern in line:
            return seen
    raise RuntimeError(f"no '{pattern}' in {timeout} s")


# ---- tracer conditions ---------------------------------------------------


class Tracer:
    """One tracer under test, started before a workload and stopped after."""

    def __init__(self, name):
        self.name = name
        self.proc = None
        self.rest = []
        self.reader = None
        self.hwm = None

    def start(self):
        if self.name == "base":
            return
        if self.name == "bpftrace":
            self.proc = subprocess.Popen(
                ["bpftrace", "-e", BPFTRACE],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            stream = self.proc.stdout
            wait_for(stream, "Attaching", self.proc)
            # bpftrace prints that line before it attaches.
            time.sleep(1.0)
        else:
            binary, name = SOCKLENS, self.name
            if name.startswith("alt-"):
                if not ALT_SOCKLENS:
                    raise RuntimeError(f"condition {name} needs ALT_SOCKLENS=/path/to/socklens")
                binary, name = ALT_SOCKLENS, name[len("alt-"):]
            args = {
                "socklens-trace": ["trace", "--events", ALL_EVENTS, "--json"],
                "socklens-conn-events": ["trace", "--events", CONN_EVENTS, "--json"],
                "socklens-conns": ["conns", "--duration", "3600"],
                "socklens-conns-percall": ["conns", "--duration", "3600"],
            }[name]
            env = dict(os.environ)
            if name == "socklens-conns-percall":
                # TCP bytes per send and receive instead of from the sequence
                # counters: the method the counters replaced, for comparison.
                env["SOCKLENS_DISABLE"] = "tcp_seq"
            self.proc = subprocess.Popen(
                [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env=env)
            stream = self.proc.stderr
            wait_for(stream, READY, self.proc)
            time.sleep(0.3)
        # Drain the rest (the exit summary, bpftrace's maps) so stopping
        # never blocks on a pipe.
        self.reader = threading.Thread(target=lambda: self.rest.extend(stream), daemon=True)
        self.reader.start()

    def cpu(self):
        return proc_cpu(self.proc.pid) if self.proc else 0.0

    def _signal_and_wait(self):
        sig = signal.SIGINT if self.name == "bpftrace" else signal.SIGTERM
        for attempt in range(2):
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=30 if attempt == 0 else 15)
            except subprocess.TimeoutExpired:
                # bpftrace 0.17 has been seen to miss a SIGINT under load.
                log(f"{self.name} ignored a stop signal; asking again")
        self.proc.kill()
        return self.proc.wait(timeout=TIMEOUT)

    def stop(self):
        """Stops it; returns (events, lost) from socklens' summary line."""
        if not self.proc:
            return None, None
        self.hwm = proc_hwm_kib(self.proc.pid)
        code = self._signal_and_wait()
        self.reader.join(timeout=30)
        self.proc = None
        if code not in (0, -signal.SIGINT):
            raise RuntimeError(f"{self.name} exited {code}: {''.join(self.rest)[-500:]}")
        for line in self.rest:
            # "socklens: N events, N lost, N malformed, ..."
            if line.startswith("socklens: ") and " events, " in line:
                f = line.split()
                return int(f[1]), int(f[3])
        return None, None


# ---- workloads -----------------------------------------------------------


def run_loadgen(*args):
    out = subprocess.run(pinned(LOADGEN, *args), check=True, capture_output=True,
                         text=True, timeout=SECS + TIMEOUT).stdout
    return json.loads(out.strip().splitlines()[-1])


def workload(name):
    secs = str(SECS)
    if name == "rr-1B":
        r = run_loadgen("rr", "1", secs)
        return r["rate"], r["ops"], "transactions/s", r["cpu_s"]
    if name == "rr-1KiB":
        r = run_loadgen("rr", "1024", secs)
        return r["rate"], r["ops"], "transactions/s", r["cpu_s"]
    if name == "churn":
        r = run_loadgen("churn", secs, str(CHURN_CLIENTS))
        if r["failed"]:
            log(f"churn: {r['failed']} connections failed")
        return r["rate"], r["ops"], "connections/s", r["cpu_s"]
    if name == "iperf3":
        out = subprocess.run(pinned("iperf3", "-c", "127.0.0.1", "-t", secs, "-J"),
                             check=True, capture_output=True, text=True,
                             timeout=SECS + TIMEOUT).stdout
        end = json.loads(out)["end"]
        got = end["sum_received"]
        # iperf3's own CPU use, client and server, in % of one CPU.
        cpu = (end["cpu_utilization_percent"]["host_total"]
               + end["cpu_utilization_percent"]["remote_total"]) / 100 * got["seconds"]
        # ops in MiB, so "CPU per op" reads per MiB moved.
        return got["bits_per_second"] / 1e9, got["bytes"] / 2**20, "Gbit/s", cpu
    raise ValueError(name)


WORKLOADS = os.environ.get("WORKLOADS", "rr-1B,rr-1KiB,iperf3,churn").split(",")
CONDITIONS = os.environ.get(
    "CONDITIONS", "base,socklens-trace,socklens-conn-events,socklens-conns,bpftrace").split(",")
# Which parts run: side (the side-by-side rounds), stats (BPF run time), memory.
PASSES = os.environ.get("PASSES", "side,stats,memory").split(",")


def one_run(wl, cond):
    tracer = Tracer(cond)
    tracer.start()
    b0, j0, t0, w0 = busy_jiffies(), task_jiffies(), tracer.cpu(), time.time()
    rate, ops, unit, load_cpu = workload(wl)
    b1, j1, t1, w1 = busy_jiffies(), task_jiffies(), tracer.cpu(), time.time()
    events, lost = tracer.stop()
    hz = os.sysconf("SC_CLK_TCK")
    # CPU of processes that are not part of this run, in cores.
    foreign = max(0.0, (j1 - j0) / hz - load_cpu - (t1 - t0)) / (w1 - w0)
    return {
        "workload": wl, "condition": cond, "rate": rate, "ops": ops, "unit": unit,
        "busy_s": (b1 - b0) / hz, "tracer_cpu_s": t1 - t0, "load_cpu_s": load_cpu,
        "foreign_cores": foreign,
        "events": events, "lost": lost, "tracer_hwm_kib": getattr(tracer, "hwm", None),
    }


def side_by_side():
    results = []
    for r in range(ROUNDS):
        # Rotate the order each round, so no condition always runs first.
        order = CONDITIONS[r % len(CONDITIONS):] + CONDITIONS[:r % len(CONDITIONS)]
        for wl in WORKLOADS:
            quiet = wait_quiet()
            for cond in order:
                res = one_run(wl, cond)
                res["round"] = r
                res["quiet_cores_before"] = quiet
                results.append(res)
                log(f"round {r + 1}/{ROUNDS} {wl:8} {cond:15} {res['rate']:.2f} {res['unit']} "
                    f"(others {res['foreign_cores']:.2f} cores)"
                    + (f" events {res['events']} lost {res['lost']}" if res["events"] is not None else ""))
    return results


# ---- CPU per event from the kernel's own BPF run-time counters ------------


def prog_ids(pid):
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            pass
    return ids


def bpf_run_stats(pid):
    ids = prog_ids(pid)
    progs = json.loads(subprocess.check_output(["bpftool", "prog", "show", "-j"]))
    per = {p["name"]: (p.get("run_cnt", 0), p.get("run_time_ns", 0))
           for p in progs if p["id"] in ids and not p["name"].startswith("sl_seed")}
    return per


def bpf_stats_pass():
    """Churn under `socklens trace` with kernel.bpf_stats_enabled=1: the
    kernel side's run time per hook invocation, plus the agent's CPU."""
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        was = f.read().strip()
    out = []
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        for wl, cond in [(w, c) for w in ["churn", "rr-1B"]
                         for c in ["socklens-conns", "socklens-trace"]]:
            for _ in range(max(1, ROUNDS // 2)):
                tracer = Tracer(cond)
                tracer.start()
                before = bpf_run_stats(tracer.proc.pid)
                t0 = tracer.cpu()
                rate, ops, unit, _ = workload(wl)
                t1 = tracer.cpu()
                after = bpf_run_stats(tracer.proc.pid)
                events, lost = tracer.stop()
                runs = sum(after[n][0] - before.get(n, (0, 0))[0] for n in after)
                ns = sum(after[n][1] - before.get(n, (0, 0))[1] for n in after)
                per_prog = {n: [after[n][0] - before.get(n, (0, 0))[0],
                                after[n][1] - before.get(n, (0, 0))[1]] for n in after}
                out.append({"workload": wl, "condition": cond, "rate": rate, "ops": ops, "events": events,
                            "lost": lost, "bpf_runs": runs, "bpf_ns": ns,
                            "agent_cpu_s": t1 - t0, "per_prog": per_prog})
                log(f"bpf_stats {wl} {cond}: {runs} runs, {ns / max(runs, 1):.0f} ns/run, "
                    f"agent {t1 - t0:.2f} s, events {events} lost {lost}")
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(was)
    return out


# ---- memory and start-up -------------------------------------------------


def startup_ms(n, extra=()):
    times = []
    for _ in range(n):
        out = subprocess.run([LOADGEN, "startup", READY, SOCKLENS, "trace", "--events",
                              ALL_EVENTS, "--json", *extra],
                             check=True, capture_output=True, text=True, timeout=TIMEOUT).stdout
        times.append(json.loads(out)["ms"])
        time.sleep(0.5)
    return times


# A process may hold at most the hard RLIMIT_NOFILE (20,000 here, and root
# without CAP_SYS_RESOURCE cannot raise it): the idle connections are spread
# over several holders of PAIRS_PER_HOLDER pairs (two fds each).
PAIRS_PER_HOLDER = 8192


def raise_nofile():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_idle(pairs):
    holders, infos = [], []
    try:
        left = pairs
        while left > 0:
            n = min(left, PAIRS_PER_HOLDER)
            proc = subprocess.Popen(in_ns(LOADGEN, "idle", str(n), "2"), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile)
            holders.append(proc)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("loadgen idle failed")
            infos.append(json.loads(line))
            left -= n
    except BaseException:
        close_idle(holders)
        raise
    info = {"connections": sum(i["connections"] for i in infos),
            "sockets": sum(i["sockets"] for i in infos), "holders": len(holders)}
    return holders, info


def close_idle(holders):
    for proc in holders:
        proc.stdin.close()
    for proc in holders:
        proc.wait(timeout=TIMEOUT)


def timed_rss(args):
    """Peak RSS (KiB, GNU time) of a socklens run, its stdout line count and stderr."""
    r = subprocess.run(["/usr/bin/time", "-f", "RSS_KIB %M", SOCKLENS, *args],
                       capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError(f"socklens {args}: {r.stderr}")
    rss = next(int(l.split()[1]) for l in r.stderr.splitlines() if l.startswith("RSS_KIB"))
    summary = next((l for l in r.stderr.splitlines() if " untracked connections" in l), "")
    return rss, len(r.stdout.splitlines()), summary


def map_memlock(extra=()):
    """Kernel memory charged to socklens' maps (fdinfo memlock), while tracking."""
    proc = subprocess.Popen([SOCKLENS, "conns", "--duration", "3600", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc.stderr, READY, proc, timeout=TIMEOUT)
        total = 0
        for fd in os.listdir(f"/proc/{proc.pid}/fdinfo"):
            try:
                with open(f"/proc/{proc.pid}/fdinfo/{fd}") as f:
                    text = f.read()
            except OSError:
                continue
            if "map_type:" in text:
                total += next(int(l.split()[1]) for l in text.splitlines()
                              if l.startswith("memlock:"))
        return total
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        proc.wait(timeout=TIMEOUT)


def memory_pass():
    res = {"startup_ms_idle_host": startup_ms(STARTUPS)}
    log(f"start-up, no extra connections: {res['startup_ms_idle_host']}")
    # The larger map keeps 16,384 entries of headroom for the rest of the host.
    for pairs, extra in [(IDLE_PAIRS, []),
                         (BIG_PAIRS, ["--max-conns", str(2 * BIG_PAIRS + 16384)])]:
        if pairs == 0:
            continue
        proc, info = open_idle(pairs)
        try:
            key = f"pairs_{pairs}"
            r = {"idle": info, "max_conns": extra[1] if extra else "65536 (default)"}
            log(f"{info['sockets']} idle sockets open")
            r["startup_ms"] = startup_ms(STARTUPS, extra)
            r["conns_rss_kib"], r["conns_lines"], r["conns_summary"] = timed_rss(
                ["conns", "--json", "--duration", "2", *extra])
            r["top_rss_kib"], r["top_lines"], r["top_summary"] = timed_rss(
                ["top", "--once", "--json", "--interval", "2", "--by", "conn", *extra])
            r["map_memlock_bytes"] = map_memlock(extra)
            log(f"{key}: {r}")
            res[key] = r
        finally:
            close_idle(proc)
    return res


# ---- summary -------------------------------------------------------------


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def median_interval(xs, level=0.95, resamples=4000):
    """A bootstrap interval of the median of `xs`: the range the median of
    rounds like these falls in `level` of the time, so a target inside it
    is not resolved by this run. Seeded, so a report reads the same twice."""
    if len(xs) < 3:
        return None, None
    rng = random.Random(len(xs))
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    cut = int(resamples * (1 - level) / 2)
    return meds[cut], meds[-cut - 1]


def clean_rounds(results, wl):
    """Rounds of `wl` in which no run shared the CPU with other work."""
    rounds = {r["round"] for r in results if r["workload"] == wl}
    return {n for n in rounds
            if all(r["foreign_cores"] < CONTENDED_CORES for r in results
                   if r["workload"] == wl and r["round"] == n)}


def summarize(results):
    rows = []
    for wl in WORKLOADS:
        clean = clean_rounds(results, wl)
        if not clean:  # all contended: use them all, and say so
            clean = {r["round"] for r in results if r["workload"] == wl}
        base = {r["round"]: r for r in results
                if r["workload"] == wl and r["condition"] == "base" and r["round"] in clean}
        for cond in CONDITIONS:
            every = [r for r in results if r["workload"] == wl and r["condition"] == cond]
            runs = [r for r in every if r["round"] in clean]
            if not runs:  # PASSES without "side"
                continue
            ratios = [r["rate"] / base[r["round"]]["rate"] for r in runs if r["round"] in base]
            low, high = median_interval(ratios)
            rows.append({
                "workload": wl, "condition": cond, "unit": runs[0]["unit"],
                "median_rate": med([r["rate"] for r in runs]),
                "min_rate": min(r["rate"] for r in runs), "max_rate": max(r["rate"] for r in runs),
                "median_ratio": med(ratios), "ratio_low": low, "ratio_high": high,
                "busy_s_per_op": med([r["busy_s"] / r["ops"] for r in runs]),
                "tracer_cpu_s": med([r["tracer_cpu_s"] for r in runs]),
                "events": med([r["events"] for r in runs]),
                "rounds_used": len(runs), "rounds": len(every),
                # Losses count in every round, contended or not.
                "lost_total": sum(r["lost"] or 0 for r in every) if cond.startswith("socklens") else None,
                "lost_max": max((r["lost"] or 0 for r in every), default=None),
                "tracer_hwm_kib": med([r["tracer_hwm_kib"] for r in runs]),
            })
    return rows


def machine():
    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(), "cpu": model, "cpus": os.cpu_count(), "mem_mib": mem,
        "commit": commit, "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "rounds": ROUNDS, "secs": SECS, "churn_clients": CHURN_CLIENTS,
    }


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(info, rows, stats, mem):
    out = [f"Run: {info['date']}, commit {info['commit']}, kernel {info['kernel']}, "
           f"{info['cpus']} x {info['cpu']}, {info['mem_mib']} MiB; {info['rounds']} rounds x "
           f"{info['secs']} s per run; load average at start {' '.join(info['loadavg_start'])}, "
           f"at end {' '.join(info['loadavg_end'])}.", "",
           f"Medians over rounds where other processes used < {CONTENDED_CORES} of a core during "
           "every run of that workload (column 'rounds'); lost events count every round.", "",
           "The ratio's interval is a 95 % bootstrap interval of the median over those rounds.", "",
           "| workload | condition | rounds | median | unit | median ratio to base | 95 % interval | "
           "min..max | system CPU per op (us; iperf3: per MiB) | tracer CPU (s) | events (median) | "
           "lost (all runs) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['workload']} | {r['condition']} | {r['rounds_used']}/{r['rounds']} | "
            f"{fmt(r['median_rate'], '.2f')} | {r['unit']} | "
            f"{fmt(r['median_ratio'])} | {fmt(r['ratio_low'])}..{fmt(r['ratio_high'])} | "
            f"{fmt(r['min_rate'], '.1f')}..{fmt(r['max_rate'], '.1f')} | "
            f"{fmt(r['busy_s_per_op'] * 1e6, '.2f')} | {fmt(r['tracer_cpu_s'], '.2f')} | "
            f"{fmt(r['events'], '.0f')} | {fmt(r['lost_total'], 'd')} |")
    churn = {r["condition"]: r for r in rows if r["workload"] == "churn"}
    base = churn.get("base")
    for cond in ("socklens-trace", "socklens-conn-events"):
        r = churn.get(cond)
        if base and r and r["events"]:
            events_per_op = r["events"] / (r["median_rate"] * info["secs"])
            extra = (r["busy_s_per_op"] - base["busy_s_per_op"]) * 1e9
            out.append("")
            out.append(f"Churn, differential system CPU: {cond} adds {extra:.0f} ns of CPU per "
                       f"connection over base; at {events_per_op:.2f} events per connection that is "
                       f"{extra / events_per_op:.0f} ns per event (all CPUs, /proc/stat).")
    out += ["", "BPF run time (kernel.bpf_stats_enabled=1, separate runs under `socklens trace`):", "",
            "| workload | condition | rate | hook runs | ns per hook run | agent CPU (s) | events | lost | "
            "(kernel + agent) ns per hook run | (kernel + agent) ns per emitted event (delivered + lost) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        # Only churn emits events in bulk; rr has a handful (its connect).
        emitted = (s["events"] or 0) + (s["lost"] or 0)
        total_ns = s["bpf_ns"] + s["agent_cpu_s"] * 1e9
        per_event = total_ns / emitted if emitted > 1000 else None
        # Every hook run is an event the tracer traced, whether or not it
        # emitted a record: the other reading of "CPU cost per traced event".
        per_run = total_ns / s["bpf_runs"] if s["bpf_runs"] else None
        out.append(f"| {s['workload']} | {s['condition']} | {s['rate']:.0f} | {s['bpf_runs']} | "
                   f"{s['bpf_ns'] / max(s['bpf_runs'], 1):.0f} | {s['agent_cpu_s']:.2f} | {s['events']} | "
                   f"{s['lost']} | {fmt(per_run, '.0f')} | {fmt(per_event, '.0f')} |")
    out += ["", "Memory and start-up:", "", "```", json.dumps(mem, indent=1), "```"]
    return "\n".join(out)


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    info = machine()
    sh("ip", "netns", "add", NS)
    iperf = None
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        # Churn and 65k idle connections need more than the default 28k ports.
        sh(*in_ns("sysctl", "-q", "net.ipv4.ip_local_port_range=1024 65535"))
        iperf = subprocess.Popen(pinned("iperf3", "-s"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(1)
        results = side_by_side() if "side" in PASSES else []
        stats = bpf_stats_pass() if "stats" in PASSES else {}
        mem = memory_pass() if "memory" in PASSES else {}
    finally:
        if iperf:
            iperf.terminate()
            iperf.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", NS])
    info["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    rows = summarize(results)
    raw = {"machine": info, "runs": results, "summary": rows, "bpf_stats": stats, "memory": mem}
    with open(os.path.join(OUT_DIR, "report.json"), "w") as f:
        json.dump(raw, f, indent=1)
    md = markdown(info, rows, stats, mem)
    with open(os.path.join(OUT_DIR, "report.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
