#!/usr/bin/env python3
"""Paired comparison of two `sandgate` gateway builds: which one relays a WebSocket `1+1` round
trip faster, and at what CPU cost in the gateway. For judging a change to the relay on a noisy
machine, where two separate benchmark runs differ by more than the change does (as
`kernel/benches/ab_kernel.py` does for the kernel).

    .venv/bin/python gateway/benches/ab_gateway.py OLD_SANDGATE NEW_SANDGATE [--blocks 20] [--gap MS]

Each build is a `sandgate` binary with its `sandgate-kernel` beside it (copy both out of
`target/release` to keep a build). Both gateways run at once (`--port 0`, `--pool-size 1`, a
temporary data folder each, with the installed image: `--home`, default the Sandgate data
folder), one kernel each, one client WebSocket each, legacy JSON protocol with TCP_QUICKACK set
before every read (so the client's delayed ACKs do not count), as `bench_gateway.py`'s clients.
Each block sends 50 `execute_request`s in a row through one gateway, then 50 through the other
(the order alternates between blocks), then 50 that alternate request by request; background
load therefore hits both alike. A round trip is from sending the request until both its reply
and its `idle` have arrived. `--gap MS` waits that long before each request.

Printed per build: median and p95 round trip in a row and alternating, and the gateway process's
CPU time per request (every thread of the `sandgate` process, from /proc/PID/task/*/schedstat,
over the whole measurement: its own work, not its kernel's, including what it does after a
request), which varies far less from run to run than the round trip.
"""

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import websocket

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_gateway import default_home  # noqa: E402

PER_BLOCK = 50
TIMEOUT = 60
TOKEN = "ab-" + os.urandom(12).hex()


def cpu_ns(pid):
    """Time on a CPU, ns, of every thread of process `pid` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


class Gateway:
    """One gateway build serving one kernel, and a client WebSocket to it."""

    def __init__(self, label, binary, home):
        self.label = label
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"sandgate-ab-{label}-"))
        for shared in ("images", "cache"):
            (self.dir / shared).symlink_to(home / shared)
        self.log = open(self.dir / "gateway.log", "wb")
        self.proc = subprocess.Popen(
            [str(binary), "--port", "0", "--data-dir", str(self.dir), "--pool-size", "1"],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "SANDGATE_TOKEN": TOKEN})
        url = None
        deadline = time.monotonic() + TIMEOUT
        while url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split()[0].rstrip("/")
        if url is None:
            raise RuntimeError(f"{label}: the gateway did not start; see {self.dir / 'gateway.log'}")
        request = urllib.request.Request(
            url + "/api/kernels", method="POST", data=json.dumps({"name": "sandgate-python"}).encode(),
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            kernel_id = json.loads(r.read())["id"]
        self.session = str(uuid.uuid4())
        ws_url = url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={self.session}"
        self.ws = websocket.create_connection(ws_url, timeout=TIMEOUT, suppress_origin=True,
                                              header=[f"Authorization: token {TOKEN}"])
        self.times = {"in_a_row": [], "alternating": []}

    def execute(self, mode=None):
        """One `1+1` round trip, ms; counted under `mode` if given."""
        header = {"msg_id": str(uuid.uuid4()), "msg_type": "execute_request", "username": "ab",
                  "session": self.session, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "version": "5.3"}
        content = {"code": "1+1", "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False}
        started = time.perf_counter()
        self.ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                                 "channel": "shell", "buffers": []}))
        reply = idle = False
        while not (reply and idle):
            self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            msg = json.loads(self.ws.recv())
            if msg["parent_header"].get("msg_id") != header["msg_id"]:
                continue
            if msg["channel"] == "shell":
                if msg["content"].get("status") != "ok":
                    raise RuntimeError(f"{self.label}: 1+1 failed: {msg['content']}")
                reply = True
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        elapsed = (time.perf_counter() - started) * 1000
        if mode:
            self.times[mode].append(elapsed)
        return elapsed

    def stop(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def p95(samples):
    ordered = sorted(samples)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=pathlib.Path, help="the first sandgate binary (its sandgate-kernel beside it)")
    parser.add_argument("new", type=pathlib.Path, help="the second sandgate binary (its sandgate-kernel beside it)")
    parser.add_argument("--blocks", type=int, default=20, help=f"blocks of {PER_BLOCK} x 3 requests (default 20)")
    parser.add_argument("--gap", type=float, default=0, help="ms to wait before each request (default 0)")
    parser.add_argument("--home", type=pathlib.Path, default=default_home(),
                        help="the installed Sandgate home with images/ and cache/")
    args = parser.parse_args()
    for binary in (args.old, args.new):
        if not (binary.exists() and binary.with_name("sandgate-kernel").exists()):
            parser.error(f"{binary} and a sandgate-kernel beside it are needed")
    gateways = []
    try:
        gateways = [Gateway("old", args.old, args.home), Gateway("new", args.new, args.home)]
        for _ in range(20):
            for gw in gateways:
                gw.execute()
        gap = args.gap / 1000
        # Over the whole measurement: what the gateway does after a request (the history
        # notebook's write, say) counts too.
        cpu_before = [cpu_ns(gw.proc.pid) for gw in gateways]
        for block in range(args.blocks):
            order = gateways if block % 2 == 0 else gateways[::-1]
            for gw in order:
                for _ in range(PER_BLOCK):
                    time.sleep(gap)
                    gw.execute("in_a_row")
            for _ in range(PER_BLOCK):
                for gw in order:
                    time.sleep(gap)
                    gw.execute("alternating")
        cpu = [cpu_ns(gw.proc.pid) - before for gw, before in zip(gateways, cpu_before)]
        print(f"{args.blocks} blocks, {PER_BLOCK} requests per block and mode, gap {args.gap} ms; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        for gw, binary, used in zip(gateways, (args.old, args.new), cpu):
            row, alt = gw.times["in_a_row"], gw.times["alternating"]
            print(f"{gw.label} ({binary}): in a row median {statistics.median(row):.3f} ms, p95 {p95(row):.3f} ms; "
                  f"alternating median {statistics.median(alt):.3f} ms, p95 {p95(alt):.3f} ms; "
                  f"gateway CPU {used / (len(row) + len(alt)) / 1000:.0f} us per request")
    finally:
        for gw in gateways:
            gw.stop()


if __name__ == "__main__":
    main()
