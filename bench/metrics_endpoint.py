#!/usr/bin/env python3
"""The agent's metrics endpoint under hostile clients (root; run by
bench/metrics_endpoint.sh, which starts the agent).

Opens IDLE connections that send nothing and SLOW ones that send a byte a
second, then times SCRAPES scrapes of /metrics (each given up after 10 s);
then makes ATTEMPTS connection attempts holding 300 open at a time and
reports the agent's peak threads, descriptors and RSS growth."""
import json
import os
import socket
import sys
import threading
import time

host, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
IDLE = int(os.environ.get("IDLE", 64))
SLOW = int(os.environ.get("SLOW", 64))
SCRAPES = int(os.environ.get("SCRAPES", 50))
ATTEMPTS = int(os.environ.get("ATTEMPTS", 10000))


def proc(what):
    return len(os.listdir(f"/proc/{pid}/{what}"))


def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scrape():
    t = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        ok = data.startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    return (time.monotonic() - t) * 1000, ok


def healthy():
    try:
        s = socket.create_connection((host, port), timeout=1)
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


for _ in range(300):
    if healthy():
        break
    time.sleep(0.1)
before = {"threads": proc("task"), "fds": proc("fd"), "rss_kib": rss_kib()}
idle = [socket.create_connection((host, port)) for _ in range(IDLE)]
slow = [socket.create_connection((host, port)) for _ in range(SLOW)]
stop = threading.Event()


def trickle():
    msg = b"GET /metrics HTTP/1.1\r\n" * 100
    i = 0
    while not stop.is_set():
        for s in slow:
            try:
                s.send(msg[i : i + 1])
            except OSError:
                pass
        i += 1
        stop.wait(1)


threading.Thread(target=trickle, daemon=True).start()
time.sleep(0.5)
times, failed = [], 0
for _ in range(SCRAPES):
    ms, ok = scrape()
    times.append(ms)
    failed += not ok
    time.sleep(0.05)
stop.set()
for s in idle + slow:
    s.close()
times.sort()

peak_threads, peak_fds, held, refused = 0, 0, [], 0
t0 = time.monotonic()
for i in range(ATTEMPTS):
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError:
        refused += 1
        continue
    if i % 10 == 0:
        s.send(b"\x16\x03\x01 not http\r\n\r\n")
    held.append(s)
    if len(held) > 300:
        held.pop(0).close()
    if i % 250 == 0:
        peak_threads = max(peak_threads, proc("task"))
        peak_fds = max(peak_fds, proc("fd"))
flood_s = time.monotonic() - t0
for s in held:
    s.close()
after_ms, after_ok = scrape()
print(
    json.dumps(
        {
            "idle": IDLE,
            "slow": SLOW,
            "scrapes": SCRAPES,
            "scrape_ms_median": round(times[len(times) // 2], 1),
            "scrape_ms_p99": round(times[min(len(times) - 1, len(times) * 99 // 100)], 1),
            "scrape_ms_max": round(times[-1], 1),
            "scrapes_failed": failed,
            "attempts": ATTEMPTS,
            "attempts_refused": refused,
            "flood_s": round(flood_s, 1),
            "before": before,
            "peak_threads": peak_threads,
            "peak_fds": peak_fds,
            "rss_growth_kib": rss_kib() - before["rss_kib"],
            "scrape_after_ms": round(after_ms, 1),
            "scrape_after_ok": after_ok,
        }
    )
)
