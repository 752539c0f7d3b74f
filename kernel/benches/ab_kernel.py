#!/usr/bin/env python3
"""Paired comparison of two `sandgate-kernel` builds: which one answers `1+1` faster, and at
what CPU cost. For judging a change to the kernel on a noisy machine, where two separate
benchmark runs differ by more than the change does.

    .venv/bin/python kernel/benches/ab_kernel.py OLD_BINARY NEW_BINARY [--blocks 20] [--gap MS]

Both kernels run at once, started by jupyter_client from kernelspecs in a temporary folder
(with the installed image: `--home`, default the Sandgate data folder). Each block sends 50
`execute_request`s in a row to one kernel, then 50 to the other (the order alternates between
blocks), then 50 that alternate request by request; background load therefore hits both alike.
A round trip is from sending the request until both its reply and its `idle` have arrived; the
client signs and parses with jupyter_client's `Session`, reading the sockets directly.
`--gap MS` waits that long before each request, so each one finds the kernel idle (a person
typing, not Run All).

Printed per kernel: median round trip in a row and alternating, the kernel process's CPU time
per request (user + system, all its threads, from /proc) and its context switches per request.
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import zmq
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

PER_BLOCK = 50


def default_home():
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return pathlib.Path(base) / "sandgate"


class Kernel:
    def __init__(self, binary, home, specs, index):
        d = specs / f"k{index}"
        d.mkdir()
        (d / "kernel.json").write_text(json.dumps({
            "argv": [str(binary), "--home", str(home), "-f", "{connection_file}"],
            "display_name": f"ab {index}", "language": "python", "interrupt_mode": "message"}))
        self.binary = binary
        self.km = KernelManager(kernel_name=f"k{index}",
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))
        self.km.start_kernel()
        kc = self.km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        kc.stop_channels()
        info = self.km.get_connection_info()
        ctx = zmq.Context.instance()
        self.shell = ctx.socket(zmq.DEALER)
        self.shell.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
        self.session = self.km.session
        self.row, self.alternating = [], []

    def subscribed(self, timeout=10):
        """Sends kernel_info until its idle arrives on iopub (the SUB socket is connected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.round_trip("kernel_info_request", {}, wait=0.2) is not None:
                return
        raise TimeoutError(f"{self.binary}: iopub never delivered an idle")

    def round_trip(self, msg_type, content, wait=10.0):
        msg = self.session.msg(msg_type, content)
        mid = msg["header"]["msg_id"]
        t0 = time.perf_counter()
        self.session.send(self.shell, msg)
        reply = idle = False
        poller = zmq.Poller()
        poller.register(self.shell, zmq.POLLIN)
        poller.register(self.iopub, zmq.POLLIN)
        while not (reply and idle):
            if time.perf_counter() - t0 > wait:
                return None
            for sock, _ in poller.poll(int(wait * 1000)):
                _, frames = self.session.feed_identities(sock.recv_multipart())
                m = self.session.deserialize(frames)
                if m["parent_header"].get("msg_id") != mid:
                    continue
                if sock is self.shell:
                    reply = True
                elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    idle = True
        return (time.perf_counter() - t0) * 1000

    def execute(self, gap):
        if gap:
            time.sleep(gap)
        ms = self.round_trip("execute_request", {
            "code": "1+1", "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        if ms is None:
            raise TimeoutError(f"{self.binary}: no reply and idle within 10 s")
        return ms

    def cpu(self):
        """(CPU ms, context switches) of the kernel process so far, all threads."""
        pid = self.km.provisioner.process.pid
        ticks = switches = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            ticks += int(stat[11]) + int(stat[12])
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if "ctxt_switches" in line:
                    switches += int(line.split()[1])
        return ticks * 1000 / os.sysconf("SC_CLK_TCK"), switches

    def stop(self):
        self.shell.close(0)
        self.iopub.close(0)
        self.km.shutdown_kernel(now=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs=2, type=pathlib.Path, help="the two kernel binaries")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of 3 x 50 requests (default 20)")
    parser.add_argument("--gap", type=float, default=0.0, help="ms to wait before each request")
    parser.add_argument("--home", type=pathlib.Path, default=default_home())
    args = parser.parse_args()
    gap = args.gap / 1000
    with tempfile.TemporaryDirectory() as specs:
        kernels = [Kernel(b.resolve(), args.home, pathlib.Path(specs), i)
                   for i, b in enumerate(args.binaries)]
        try:
            for k in kernels:
                k.subscribed()
                for _ in range(30):
                    k.execute(0)
            before = [k.cpu() for k in kernels]
            for block in range(args.blocks):
                for k in kernels if block % 2 == 0 else kernels[::-1]:
                    k.row += [k.execute(gap) for _ in range(PER_BLOCK)]
                for _ in range(PER_BLOCK):
                    for k in kernels:
                        k.alternating.append(k.execute(gap))
            after = [k.cpu() for k in kernels]
        finally:
            for k in kernels:
                k.stop()
    print(f"{args.blocks} blocks, gap {args.gap:g} ms, load average {os.getloadavg()[0]:.2f}")
    for k, b, a in zip(kernels, before, after):
        n = len(k.row) + len(k.alternating)
        print(f"{k.binary}: in a row {statistics.median(k.row):.3f} ms, alternating "
              f"{statistics.median(k.alternating):.3f} ms (medians of {len(k.row)} each); "
              f"CPU {(a[0] - b[0]) / n * 1000:.0f} us and {(a[1] - b[1]) / n:.2f} context "
              f"switches per request")


if __name__ == "__main__":
    main()
