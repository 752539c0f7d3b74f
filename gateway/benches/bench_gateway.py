#!/usr/bin/env python3
"""Gateway benchmark: the `sandgate` gateway against the reference, Jupyter Kernel Gateway with
ipykernel, in the same run, both on 127.0.0.1.

Run it from the repository root with the project's virtualenv (it needs websocket-client and
jupyter_kernel_gateway) after `cargo build --release` and `sandgate-kernel install`:

    .venv/bin/python gateway/benches/bench_gateway.py [--runs N] [--rtt-runs M] [--kernels K]
        [--capacity C] [--capacity-only] [--rtt-only] [--json out.json]

The gateways:

- Sandgate: `target/release/sandgate --port 0 --data-dir TMP` with the token in SANDGATE_TOKEN,
  JSON logs, and TMP/images, TMP/cache symlinked to the installed image and compiled module.
  Ready once it prints `listening on URL`.
- the reference: `jupyter kernelgateway` from the virtualenv (KG_AUTH_TOKEN, KG_LIST_KERNELS),
  default kernel `python3` (ipykernel). Ready once it logs `is available at URL` and answers
  GET /api.

Clients speak the Jupyter Server REST API and the legacy JSON WebSocket protocol
(`/api/kernels/{id}/channels`), with `Authorization: token T`, as JupyterLab's gateway client does.

What is measured:

- start: from `POST /api/kernels` until the kernel's WebSocket has delivered the reply to a
  `kernel_info_request` sent right after connecting and the `idle` status it caused (what
  JupyterLab waits for). The kernel is then deleted, and the next start waits until
  GET /api/kernels no longer lists it, the gateway's process tree is back to its idle size and,
  for the warm pool, the pool is full again. Sandgate is measured twice: "pool warm"
  (`--pool-size P`, P >= 1, every start finds a ready kernel; the pool's fill is read from the
  gateway's log lines `kernel process ready` and `kernel started`) and "pool empty"
  (`--pool-size 0`, every start launches a kernel). The reference has no pool for POSTed
  kernels. The three take turns so background load hits them alike; one unmeasured round
  first. Median and p95 over `--runs` starts each.
- round trip: on one kernel per gateway, from sending `execute_request` for `1+1` over the
  WebSocket until its `execute_reply` and `idle` have come back (in either order); the gateways
  take turns; after `--warmup` unmeasured runs. Median and p95 over `--rtt-runs`. Each run is
  done twice: with the client socket as the OS sets it up (delayed ACKs), and with TCP_QUICKACK
  set before every read. The reference's server (tornado) writes with Nagle's algorithm on, so
  its second small message of a reply waits for the client's delayed ACK (about 40 ms on
  Linux): what its clients get, but not the cost of the gateway and kernel themselves, which
  the second figure shows. In these two, every execute follows one on the other gateway. A
  third figure, "in a row", times `--rtt-runs` executes on each gateway sent one after another,
  each as soon as the previous one is idle (a notebook's Run All), so any work a gateway does
  after a cell ends counts. The target is checked against all three.
- memory: a fresh gateway alone on the machine (Sandgate with `--pool-size 0 --max-kernels 64`,
  so no pooled kernels are counted) starts `--kernels` kernels one after another, each to
  `idle` as above; once GET /api/kernels shows them all idle, the PSS (/proc/PID/smaps_rollup)
  of the gateway process and of every process descending from it is summed. Reported: the
  total, the gateway process alone, and the total divided by the number of kernels.

- capacity: a fresh gateway (Sandgate with its default pool, `--max-kernels` raised to fit)
  starts `--capacity` kernels one after another, each to `idle` as above, and stops early if
  the machine's MemAvailable falls below `--min-available-mib`, a start fails, or
  `--capacity-minutes` pass (the reference may not fit in memory: its row says how many it
  reached and why it stopped). With them all alive and idle in GET /api/kernels: PSS of every
  kernel process (per kernel) and of the gateway; after `--settle` s, idle CPU over a window of
  `--window` s (time on a CPU of every thread of the kernels, from /proc/PID/task/*/schedstat,
  per kernel and second; and the gateway's own); the 1-minute load average at the window's end
  (and before the phase, as the machine's own load: other work on the machine counts in it);
  `1+1` round trips on `--probe` kernels (the second execute on each, as the first warms it);
  and start to idle of `--probe` more kernels, each deleted before the next (so the count stays
  at the number reached). The gateway's RSS is read at its start, with the kernels alive, and
  after deleting them all (5 s after the process count is back to the pool's).

Targets: warm-pool start under 50 ms median, round trip no slower than the reference, memory
per idle kernel under a third of the reference's, idle CPU per kernel at most 0.05 ms/s.
"""

import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import kernel_gateway
import websocket

ROOT = pathlib.Path(__file__).resolve().parents[2]
VENV_BIN = pathlib.Path(sys.executable).parent
TOKEN = "bench-" + os.urandom(12).hex()
LISTEN_TIMEOUT = 60
HTTP_TIMEOUT = 120
READY_TIMEOUT = 120
SETTLE_TIMEOUT = 60
STOP_TIMEOUT = 60
IOPUB_RETRY = 0.2
POLL_INTERVAL = 0.01
TARGET_WARM_START_MS = 50
TARGET_IDLE_CPU_MS = 0.05
CAPACITY_POOL = 2
RELEASE_WAIT = 5
TARGET_IDLE_CPU_MS = 0.05


def default_home():
    """Where `sandgate-kernel install` put the image and its compiled cache."""
    if os.environ.get("SANDGATE_HOME"):
        return pathlib.Path(os.environ["SANDGATE_HOME"])
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return pathlib.Path(xdg) / "sandgate"


def progress(text):
    print(f"[bench_gateway] {text}", file=sys.stderr, flush=True)


def poll_until(test, timeout, what, every=POLL_INTERVAL):
    """Checks `test()` every `every` s until it returns something true, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = test()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


class Output:
    """Copies a child's output stream to a log file on a thread, and lets callers wait until the
    lines seen so far pass a test."""

    def __init__(self, stream, log_path):
        self.lines = []
        self.closed = False
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, args=(stream, log_path), daemon=True).start()

    def _pump(self, stream, log_path):
        with open(log_path, "w") as log:
            for line in stream:
                log.write(line)
                log.flush()
                with self.cond:
                    self.lines.append(line)
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, test, timeout, what):
        """Returns `test(lines)` once it is true; raises `TimeoutError` after `timeout` s or once
        the stream closed without it."""
        with self.cond:
            self.cond.wait_for(lambda: test(self.lines) or self.closed, timeout)
            value = test(self.lines)
        if not value:
            raise TimeoutError(f"{what}: not seen within {timeout} s"
                               + (" (the process closed its output)" if self.closed else ""))
        return value


class PoolCount:
    """Sandgate's warm-pool fill, read from its JSON log: each `kernel process ready` is a
    launched kernel, each `kernel started` a POST that took one."""

    def __init__(self):
        self.ready, self.taken, self.seen = set(), set(), 0

    def __call__(self, lines):
        for line in lines[self.seen:]:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "kernel process ready":
                self.ready.add(fields.get("kernel"))
            elif fields.get("message") == "kernel started":
                self.taken.add(fields.get("kernel"))
        self.seen = len(lines)
        return len(self.ready - self.taken)


def process_table():
    """{pid: (parent pid, start time in clock ticks)} of every process but zombies."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line for process {pid}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line for process {pid}")


def thread_cpu_ns(pids):
    """{(pid, thread id): time on a CPU, ns} of every thread of `pids`."""
    out = {}
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[(pid, tid)] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return out


def cpu_ns_between(before, after):
    """CPU time, ns, the threads in `after` used since `before` (both from `thread_cpu_ns`); a
    thread that ended in between is left out (what it used in between is lost with it)."""
    return sum(ns - before.get(key, 0) for key, ns in after.items())


def available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class Gateway:
    """A gateway process that leads its own process group, with helpers for its REST API and
    kernel WebSockets. `stop` ends it and every process descending from it."""

    def __init__(self, label, argv, env, cwd, kernel_name, ready_stream, ready_marker, idle_children):
        self.label = label
        self.kernel_name = kernel_name
        self.idle_children = idle_children
        self.tree = {}
        cwd.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stdout = Output(self.proc.stdout, cwd / "stdout.log")
        self.stderr = Output(self.proc.stderr, cwd / "stderr.log")
        stream = self.stdout if ready_stream == "stdout" else self.stderr
        try:
            line = stream.wait(lambda lines: next((ln for ln in lines if ready_marker in ln), None),
                               LISTEN_TIMEOUT, f"{label}: `{ready_marker}` (logs in {cwd})")
            self.url = line.split(ready_marker, 1)[1].split()[0].rstrip("/")
            self.ws_url = self.url.replace("http://", "ws://", 1)
            status, _ = self.request("GET", "/api")
            if status != 200:
                raise RuntimeError(f"{label}: GET /api answered {status}")
        except BaseException:
            self.stop()
            raise

    def request(self, method, path, body=None):
        """(status, parsed JSON body or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        return status, (json.loads(payload) if payload else None)

    def start_kernel(self):
        status, model = self.request("POST", "/api/kernels", {"name": self.kernel_name})
        if status != 201 or not isinstance(model, dict) or "id" not in model:
            raise RuntimeError(f"{self.label}: POST /api/kernels answered {status}: {model}")
        return model["id"]

    def delete_kernel(self, kernel_id):
        status, body = self.request("DELETE", f"/api/kernels/{kernel_id}")
        if status != 204:
            raise RuntimeError(f"{self.label}: DELETE /api/kernels/{kernel_id} answered {status}: {body}")

    def kernels(self):
        status, models = self.request("GET", "/api/kernels")
        if status != 200 or not isinstance(models, list):
            raise RuntimeError(f"{self.label}: GET /api/kernels answered {status}: {models}")
        return models

    def connect(self, kernel_id):
        return KernelSocket(f"{self.ws_url}/api/kernels/{kernel_id}/channels")

    def descendants(self):
        """{pid: start time} of the processes descending from the gateway, which are recorded so
        that `stop` can end them even after the gateway is gone."""
        table = process_table()
        children = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = {}, list(children.get(self.proc.pid, []))
        while todo:
            pid = todo.pop()
            found[pid] = table[pid][1]
            todo.extend(children.get(pid, []))
        self.tree.update(found)
        return found

    def settle(self, deleted=None, every=POLL_INTERVAL):
        """Waits until `deleted` is no longer listed and only the idle processes remain."""
        if deleted is not None:
            poll_until(lambda: all(k["id"] != deleted for k in self.kernels()), SETTLE_TIMEOUT,
                       f"{self.label}: kernel {deleted} still listed after DELETE", every)
        poll_until(lambda: len(self.descendants()) == self.idle_children, SETTLE_TIMEOUT,
                   f"{self.label}: {self.idle_children} child processes", every)

    def memory(self):
        """(PSS KiB of the gateway process, {pid: PSS KiB} of its descendants)."""
        return pss_kib(self.proc.pid), {pid: pss_kib(pid) for pid in self.descendants()}

    def stop(self):
        """SIGTERM (the gateway shuts its kernels down), SIGKILL to its process group after
        STOP_TIMEOUT; then waits as long for every recorded descendant to end, and kills the
        ones that do not."""
        if self.proc.poll() is None:
            self.descendants()
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                progress(f"{self.label} did not stop within {STOP_TIMEOUT} s; killing its process group")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

        def leftovers():
            table = process_table()
            return [pid for pid, started in self.tree.items() if pid in table and table[pid][1] == started]

        try:
            poll_until(lambda: not leftovers(), STOP_TIMEOUT, f"{self.label}: its processes to exit")
        except TimeoutError:
            for pid in leftovers():
                progress(f"{self.label}: process {pid} outlived the gateway by {STOP_TIMEOUT} s; killing it")
                os.kill(pid, signal.SIGKILL)


class PooledSandgate(Gateway):
    """Sandgate with a warm pool: settled also means the pool is full."""

    def __init__(self, pool_size, **kw):
        super().__init__(idle_children=pool_size, **kw)
        self.pool_size = pool_size
        self.pool = PoolCount()

    def settle(self, deleted=None, every=POLL_INTERVAL):
        super().settle(deleted, every)
        self.stderr.wait(lambda lines: self.pool(lines) >= self.pool_size, SETTLE_TIMEOUT,
                         f"{self.label}: a full pool of {self.pool_size}")


def start_sandgate(binary, home, tmp, label, pool_size, max_kernels):
    data = tmp / label
    data.mkdir(parents=True)
    for shared in ("images", "cache"):
        (data / shared).symlink_to(home / shared)
    argv = [str(binary), "--port", "0", "--data-dir", str(data), "--log-format", "json",
            "--pool-size", str(pool_size), "--max-kernels", str(max_kernels)]
    kw = dict(label=label, argv=argv, env={**os.environ, "SANDGATE_TOKEN": TOKEN}, cwd=data,
              kernel_name="sandgate-python", ready_stream="stdout", ready_marker="listening on ")
    return PooledSandgate(pool_size, **kw) if pool_size else Gateway(idle_children=0, **kw)


def start_kernel_gateway(tmp, label):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cwd = tmp / label
    env = {**os.environ, "KG_AUTH_TOKEN": TOKEN, "KG_LIST_KERNELS": "True",
           "JUPYTER_RUNTIME_DIR": str(cwd / "runtime")}
    argv = [str(VENV_BIN / "jupyter"), "kernelgateway", "--ip=127.0.0.1", f"--port={port}",
            "--port_retries=0"]
    return Gateway(label, argv, env, cwd, kernel_name="python3", ready_stream="stderr",
                   ready_marker="is available at ", idle_children=0)


class BufferedSocket:
    """A socket whose `recv` is served from a buffer filled by large reads (everything else is
    the socket's own)."""

    def __init__(self, sock):
        self._sock = sock
        self._buffer = b""

    def recv(self, bufsize):
        if not self._buffer:
            self._buffer = self._sock.recv(max(bufsize, 1 << 16))
            if not self._buffer:
                return b""
        chunk, self._buffer = self._buffer[:bufsize], self._buffer[bufsize:]
        return chunk

    def pending(self):
        return bool(self._buffer)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class KernelSocket:
    """A kernel's WebSocket, legacy JSON protocol. With `quickack` set, the client acknowledges
    every TCP segment at once (TCP_QUICKACK before each read) instead of delaying the ACK."""

    def __init__(self, url):
        self.session = str(uuid.uuid4())
        self.quickack = False
        # No Origin header: JupyterLab's gateway client connects from the server side.
        self.ws = websocket.create_connection(f"{url}?session_id={self.session}", timeout=HTTP_TIMEOUT,
                                              header=[f"Authorization: token {TOKEN}"], suppress_origin=True)
        # websocket-client reads a frame's header, length and payload in separate socket reads,
        # each a poll() and a recv() with a timeout set: 25-30 system calls and their Python for
        # the five messages of an execute, which arrive in one segment. Reading the socket in
        # large chunks, as browsers and tornado do, takes the client's cost out of the figure.
        self.ws.sock = BufferedSocket(self.ws.sock)

    def send(self, msg_type, content):
        header = {"msg_id": str(uuid.uuid4()), "msg_type": msg_type, "username": "bench",
                  "session": self.session, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "version": "5.3"}
        self.ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                                 "channel": "shell", "buffers": []}))
        return header["msg_id"]

    def recv(self, deadline, what):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(what)
        self.ws.settimeout(left)
        if self.quickack:
            self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        try:
            return json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            raise TimeoutError(what) from None

    def await_reply_and_idle(self, msg_id, deadline, idle_within):
        """Waits for the reply to `msg_id` and the `idle` status it caused, in either order (they
        travel on different channels): for the reply until `deadline`, for the idle until
        `idle_within` s after the reply. Returns the reply's content, or None if the idle did
        not come."""
        reply, idle = None, False
        while reply is None or not idle:
            limit = deadline if reply is None else min(deadline, replied + idle_within)
            try:
                msg = self.recv(limit, f"no reply to {msg_id}")
            except TimeoutError:
                if reply is None:
                    raise
                return None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg.get("channel") == "shell":
                reply, replied = msg["content"], time.monotonic()
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        return reply

    def await_ready(self, timeout):
        """Sends `kernel_info_request` until one gets its reply and its idle (a new one only when
        a reply came without its idle within IOPUB_RETRY s). Returns how many extra requests that
        took."""
        deadline = time.monotonic() + timeout
        retries = 0
        while self.await_reply_and_idle(self.send("kernel_info_request", {}), deadline, IOPUB_RETRY) is None:
            retries += 1
        return retries

    def execute(self, code, timeout):
        msg_id = self.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                               "user_expressions": {}, "allow_stdin": False})
        deadline = time.monotonic() + timeout
        reply = self.await_reply_and_idle(msg_id, deadline, timeout)
        if reply is None:
            raise TimeoutError(f"no idle after executing {code!r}")
        if reply.get("status") != "ok":
            raise RuntimeError(f"{code!r} failed: {reply}")

    def close(self):
        self.ws.close()


def start_to_idle(gw):
    """Starts a kernel through `gw` and waits until it is idle; returns (id, ms, extra requests)."""
    started = time.perf_counter()
    kernel_id = gw.start_kernel()
    ws = gw.connect(kernel_id)
    try:
        retries = ws.await_ready(READY_TIMEOUT)
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        ws.close()
    return kernel_id, elapsed, retries


def measure_starts(gateways, runs):
    """Start-to-idle times in ms per gateway label, the gateways taking turns; round 0 is not
    counted. Also the extra kernel_info requests per label."""
    times = {gw.label: [] for gw in gateways}
    retries = {gw.label: 0 for gw in gateways}
    for gw in gateways:
        gw.settle()
    for round_ in range(runs + 1):
        for gw in gateways:
            kernel_id, ms, extra = start_to_idle(gw)
            gw.delete_kernel(kernel_id)
            gw.settle(deleted=kernel_id)
            if round_ > 0:
                times[gw.label].append(ms)
                retries[gw.label] += extra
        if round_ % 5 == 0 or round_ == runs:
            progress(f"start round {round_}/{runs} done")
    return times, retries


def measure_roundtrips(gateways, warmup, runs, code="1+1"):
    """WebSocket round trips in ms, {gateway label: {mode: [...]}}, on one kernel per gateway.
    Modes "default" (the client's ACKs delayed as the OS does by default) and "quickack" (sent at
    once) take turns with the gateways, so every execute follows one on the other gateway, after
    `warmup` unmeasured rounds. Then mode "in_a_row": `runs` executes on each gateway in turn,
    each sent as soon as the previous one is idle, as a notebook's Run All does."""
    sockets = {}
    try:
        for gw in gateways:
            kernel_id, _, _ = start_to_idle(gw)
            sockets[gw.label] = (gw, kernel_id, gw.connect(kernel_id))
        times = {label: {"default": [], "quickack": [], "in_a_row": []} for label in sockets}

        def timed(ws):
            started = time.perf_counter()
            ws.execute(code, READY_TIMEOUT)
            return (time.perf_counter() - started) * 1000

        for i in range(warmup + runs):
            for mode in ("default", "quickack"):
                for label, (_, _, ws) in sockets.items():
                    ws.quickack = mode == "quickack"
                    elapsed = timed(ws)
                    if i >= warmup:
                        times[label][mode].append(elapsed)
        for label, (_, _, ws) in sockets.items():
            ws.quickack = False
            times[label]["in_a_row"] = [timed(ws) for _ in range(runs)]
    finally:
        for gw, kernel_id, ws in sockets.values():
            ws.close()
            gw.delete_kernel(kernel_id)
    return times


def measure_memory(gw, count):
    """Starts `count` kernels to idle, then sums PSS over the gateway's process tree."""
    ids = []
    for i in range(count):
        ids.append(start_to_idle(gw)[0])
        if (i + 1) % 10 == 0:
            progress(f"{gw.label}: {i + 1}/{count} kernels idle")
    poll_until(lambda: sum(k["execution_state"] == "idle" for k in gw.kernels() if k["id"] in ids) == count,
               SETTLE_TIMEOUT, f"{gw.label}: all {count} kernels idle in GET /api/kernels")
    gateway_kib, kernels_kib = gw.memory()
    return {"kernels": count, "processes": len(kernels_kib), "gateway_mib": gateway_kib / 1024,
            "descendants_mib": sum(kernels_kib.values()) / 1024,
            "total_mib": (gateway_kib + sum(kernels_kib.values())) / 1024,
            "per_kernel_mib": (gateway_kib + sum(kernels_kib.values())) / 1024 / count}


def measure_capacity(gw, args):
    """The capacity phase (see the module's docstring) on a fresh gateway `gw`, whose idle
    process count (`gw.idle_children`) is its pool."""
    pool = gw.idle_children
    result = {"target": args.capacity, "gateway_rss_start_mib": rss_kib(gw.proc.pid) / 1024,
              "load_before": os.getloadavg()[0]}
    ids, fill_ms = [], []
    stopped = f"reached {args.capacity}"
    deadline = time.monotonic() + args.capacity_minutes * 60
    while len(ids) < args.capacity:
        if available_mib() < args.min_available_mib:
            stopped = f"MemAvailable fell below {args.min_available_mib} MiB"
            break
        if time.monotonic() > deadline:
            stopped = f"{args.capacity_minutes} min passed"
            break
        try:
            kernel_id, ms, _ = start_to_idle(gw)
        except Exception as e:  # noqa: BLE001 - the reason is the result
            stopped = f"a start failed: {type(e).__name__}: {e}"[:400]
            break
        ids.append(kernel_id)
        fill_ms.append(ms)
        if len(ids) % 100 == 0:
            progress(f"{gw.label}: {len(ids)} kernels idle, last start {ms:.0f} ms, "
                     f"{available_mib():.0f} MiB available, load {os.getloadavg()[0]:.2f}")
    alive = len(ids)
    progress(f"{gw.label}: {alive} kernels alive ({stopped})")
    result.update(alive=alive, stopped=stopped, fill_start_ms=fill_ms)
    wanted = set(ids)
    poll_until(lambda: sum(k["execution_state"] == "idle" for k in gw.kernels() if k["id"] in wanted) == alive,
               SETTLE_TIMEOUT, f"{gw.label}: all {alive} kernels idle in GET /api/kernels", every=1)
    processes = gw.descendants()
    gateway_pss, kernels_pss = pss_kib(gw.proc.pid), [pss_kib(pid) for pid in processes]
    result.update(processes=len(processes), gateway_rss_alive_mib=rss_kib(gw.proc.pid) / 1024,
                  gateway_pss_alive_mib=gateway_pss / 1024,
                  pss_per_kernel_mib=sum(kernels_pss) / 1024 / len(processes),
                  pss_total_mib=(gateway_pss + sum(kernels_pss)) / 1024,
                  gateway_fds=len(os.listdir(f"/proc/{gw.proc.pid}/fd")))
    progress(f"{gw.label}: settling {args.settle} s, then idle CPU over {args.window} s")
    time.sleep(args.settle)
    pids = list(processes)
    kernels0, gateway0, t0 = thread_cpu_ns(pids), thread_cpu_ns([gw.proc.pid]), time.monotonic()
    time.sleep(args.window)
    kernels1, gateway1, elapsed = thread_cpu_ns(pids), thread_cpu_ns([gw.proc.pid]), time.monotonic() - t0
    kernels_ns, gateway_ns = cpu_ns_between(kernels0, kernels1), cpu_ns_between(gateway0, gateway1)
    result.update(load_alive=os.getloadavg()[0],
                  idle_cpu_per_kernel_ms=kernels_ns / 1e6 / elapsed / len(pids),
                  idle_cpu_kernels_cores=kernels_ns / 1e9 / elapsed,
                  idle_cpu_gateway_ms=gateway_ns / 1e6 / elapsed)
    progress(f"{gw.label}: round trips and starts with {alive} alive")
    rtts, starts, failures = [], [], []
    for kernel_id in ids[::max(alive // args.probe, 1)][:args.probe]:
        try:
            ws = gw.connect(kernel_id)
            try:
                ws.await_ready(READY_TIMEOUT)
                ws.execute("1+1", READY_TIMEOUT)
                started = time.perf_counter()
                ws.execute("1+1", READY_TIMEOUT)
                rtts.append((time.perf_counter() - started) * 1000)
            finally:
                ws.close()
        except Exception as e:  # noqa: BLE001 - a gateway at its limit; counted, not fatal
            failures.append(f"round trip: {type(e).__name__}: {e}"[:300])
    gw.idle_children = alive + pool
    for _ in range(args.probe):
        started = time.perf_counter()
        try:
            kernel_id = gw.start_kernel()
        except Exception as e:  # noqa: BLE001
            failures.append(f"start: {type(e).__name__}: {e}"[:300])
            continue
        try:
            ws = gw.connect(kernel_id)
            try:
                ws.await_ready(READY_TIMEOUT)
            finally:
                ws.close()
            starts.append((time.perf_counter() - started) * 1000)
        except Exception as e:  # noqa: BLE001
            failures.append(f"start: {type(e).__name__}: {e}"[:300])
        try:
            gw.delete_kernel(kernel_id)
            gw.settle(deleted=kernel_id, every=0.2)
        except (RuntimeError, TimeoutError) as e:
            failures.append(f"delete: {e}"[:300])
            break  # a gateway that cannot end kernels any more: no use starting more
    result.update(rtt_ms=rtts, start_ms=starts, probe_failures=failures)
    progress(f"{gw.label}: deleting {alive} kernels")
    with concurrent.futures.ThreadPoolExecutor(8) as deleting:
        deleted = list(deleting.map(lambda kernel_id: gw.request("DELETE", f"/api/kernels/{kernel_id}")[0], ids))
    result["delete_failures"] = sum(status != 204 for status in deleted)
    gw.idle_children = pool
    try:
        gw.settle(every=0.5)
    except TimeoutError as e:
        result["delete_failures"] += 1
        failures.append(f"after deleting all: {e}"[:300])
    # Sandgate hands freed memory back 2 s after the last kernel ended: read after that.
    time.sleep(RELEASE_WAIT)
    result["gateway_rss_after_mib"] = rss_kib(gw.proc.pid) / 1024
    result["gateway_fds_after"] = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
    progress(f"{gw.label}: " + json.dumps({k: v for k, v in result.items() if k != "fill_start_ms"}))
    return result


def median_or_none(samples):
    return statistics.median(samples) if samples else None


def p95(samples):
    """Nearest-rank 95th percentile (None for no samples)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


def metric(name, label, unit, sandgate, reference=None, target=None, chart=None):
    """One row of the results: `target` is (text, passes(sandgate, reference)); `chart` is (panel,
    bar label) for `gateway/benches/chart.rs`."""
    return {
        "name": name,
        "label": label,
        "unit": unit,
        "sandgate": sandgate,
        "reference": reference,
        "ratio": sandgate / reference if reference and sandgate is not None else None,
        "target": target[0] if target else None,
        "met": target[1](sandgate, reference) if target and sandgate is not None else None,
        "chart": {"panel": chart[0], "label": chart[1]} if chart else None,
    }


def print_table(metrics, reference_name):
    def fmt(value, unit):
        return "n/a" if value is None else f"{value:.3g} {unit}" if value < 10 else f"{value:.0f} {unit}"

    print(f"| metric | Sandgate | {reference_name} | Sandgate / reference | target |")
    print("|---|---:|---:|---:|---|")
    for m in metrics:
        ratio = "n/a" if m["ratio"] is None else f"{m['ratio']:.2f}"
        target = "" if m["target"] is None else f"{m['target']}: {'met' if m['met'] else 'missed'}"
        print(f"| {m['label']} | {fmt(m['sandgate'], m['unit'])} | {fmt(m['reference'], m['unit'])} "
              f"| {ratio} | {target} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="measured starts per gateway (default 20)")
    parser.add_argument("--rtt-runs", type=int, default=200,
                        help="measured round trips per gateway and mode (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured round trips first (default 20)")
    parser.add_argument("--kernels", type=int, default=50, help="idle kernels for the memory phase (default 50)")
    parser.add_argument("--pool-size", type=int, default=2, help="Sandgate's warm pool (default 2; at least 1)")
    parser.add_argument("--gateway", type=pathlib.Path, default=ROOT / "target" / "release" / "sandgate",
                        help="the sandgate binary (default target/release/sandgate)")
    parser.add_argument("--home", type=pathlib.Path, default=default_home(),
                        help="the installed Sandgate home with images/ and cache/ (default $SANDGATE_HOME "
                             "or ~/.local/share/sandgate)")
    parser.add_argument("--capacity", type=int, default=1000,
                        help="kernels alive at once in the capacity phase (default 1000; 0 skips it)")
    parser.add_argument("--capacity-only", action="store_true", help="run only the capacity phase")
    parser.add_argument("--rtt-only", action="store_true",
                        help="run only the round-trip phase (Sandgate with its warm pool against the reference)")
    parser.add_argument("--min-available-mib", type=int, default=4096,
                        help="capacity: stop starting kernels below this MemAvailable (default 4096)")
    parser.add_argument("--capacity-minutes", type=float, default=30,
                        help="capacity: stop starting kernels after this long, per gateway (default 30)")
    parser.add_argument("--settle", type=float, default=120,
                        help="capacity: seconds idle before the CPU window, so the load average forgets "
                             "the starts (default 120)")
    parser.add_argument("--window", type=float, default=60, help="capacity: idle CPU window, s (default 60)")
    parser.add_argument("--probe", type=int, default=20,
                        help="capacity: round trips and starts measured at the full count (default 20)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the gateways' folders and logs (always kept when the run fails)")
    args = parser.parse_args()
    # `timeout` and `kill` send SIGTERM: end through the clean-up below, not at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.rtt_only and args.capacity_only:
        parser.error("--rtt-only and --capacity-only exclude each other")
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1 (the pool-empty case is measured anyway)")
    if not args.gateway.exists():
        sys.exit(f"{args.gateway} is missing: build it with `cargo build --release`")
    # Another build may replace the binary during the run: this names the one the run started with.
    binary_mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.gateway.stat().st_mtime))
    if not any((args.home / "cache").glob("*.cwasm")):
        sys.exit(f"no compiled module in {args.home / 'cache'}: run `sandgate-kernel install` first")
    max_kernels = max(64, args.kernels + 1)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="sandgate-gw-bench-"))
    progress(f"gateway folders and logs in {tmp} (removed after a run that succeeds, unless --keep-logs)")
    gateways = []
    succeeded = False

    def launch(start, *a):
        gw = start(*a)
        gateways.append(gw)
        return gw

    starts = retries = rtts = None
    memory, capacity = {}, {}
    try:
        if args.rtt_only:
            warm = launch(start_sandgate, args.gateway, args.home, tmp, "sandgate-pool", args.pool_size,
                          max_kernels)
            kg = launch(start_kernel_gateway, tmp, "kernel-gateway")
            for gw in (warm, kg):
                gw.settle()
            progress("round trips")
            rtts = measure_roundtrips([warm, kg], args.warmup, args.rtt_runs)
            for gw in (warm, kg):
                gw.stop()
        elif not args.capacity_only:
            warm = launch(start_sandgate, args.gateway, args.home, tmp, "sandgate-pool", args.pool_size,
                          max_kernels)
            empty = launch(start_sandgate, args.gateway, args.home, tmp, "sandgate-nopool", 0, max_kernels)
            kg = launch(start_kernel_gateway, tmp, "kernel-gateway")
            starts, retries = measure_starts([warm, empty, kg], args.runs)
            progress("round trips")
            rtts = measure_roundtrips([warm, kg], args.warmup, args.rtt_runs)
            for gw in (warm, empty, kg):
                gw.stop()
            gw = launch(start_sandgate, args.gateway, args.home, tmp, "sandgate-memory", 0, max_kernels)
            progress(f"memory: {args.kernels} kernels on {gw.label}")
            memory["sandgate"] = measure_memory(gw, args.kernels)
            gw.stop()
            gw = launch(start_kernel_gateway, tmp, "kernel-gateway-memory")
            progress(f"memory: {args.kernels} kernels on {gw.label}")
            memory["reference"] = measure_memory(gw, args.kernels)
            gw.stop()
        if args.capacity and not args.rtt_only:
            # The default pool, and the limit raised to fit the kernels, the probes and the pool.
            gw = launch(start_sandgate, args.gateway, args.home, tmp, "sandgate-capacity", CAPACITY_POOL,
                        args.capacity + CAPACITY_POOL + 8)
            gw.settle()
            progress(f"capacity: {args.capacity} kernels on {gw.label}")
            capacity["sandgate"] = measure_capacity(gw, args)
            gw.stop()
            gw = launch(start_kernel_gateway, tmp, "kernel-gateway-capacity")
            progress(f"capacity: {args.capacity} kernels on {gw.label}")
            capacity["reference"] = measure_capacity(gw, args)
            gw.stop()
        succeeded = True
    finally:
        for gw in gateways:
            gw.stop()
        if succeeded and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)

    not_slower = ("no slower than the reference", lambda s, r: s <= r)
    third = ("< 1/3 of the reference", lambda s, r: s < r / 3)
    warm_target = (f"< {TARGET_WARM_START_MS} ms", lambda s, r: s < TARGET_WARM_START_MS)
    idle_target = (f"<= {TARGET_IDLE_CPU_MS} ms/s", lambda s, r: s <= TARGET_IDLE_CPU_MS)
    metrics = []
    summary = []
    rtt_metrics = []
    if rtts:
        sg_rtt, kg_rtt = rtts[warm.label], rtts[kg.label]
        rtt_metrics = [
            metric("rtt_median", "WebSocket `1+1` round trip (median)", "ms", statistics.median(sg_rtt["default"]),
                   statistics.median(kg_rtt["default"]), not_slower, chart=("roundtrip", "gateway, taking turns")),
            metric("rtt_p95", "WebSocket `1+1` round trip (p95)", "ms", p95(sg_rtt["default"]),
                   p95(kg_rtt["default"])),
            metric("rtt_quickack_median", "WebSocket `1+1` round trip, client TCP_QUICKACK (median)", "ms",
                   statistics.median(sg_rtt["quickack"]), statistics.median(kg_rtt["quickack"]), not_slower,
                   chart=("roundtrip", "gateway, quick ACKs")),
            metric("rtt_quickack_p95", "WebSocket `1+1` round trip, client TCP_QUICKACK (p95)", "ms",
                   p95(sg_rtt["quickack"]), p95(kg_rtt["quickack"])),
            metric("rtt_in_a_row_median", "WebSocket `1+1` round trip, cells in a row (median)", "ms",
                   statistics.median(sg_rtt["in_a_row"]), statistics.median(kg_rtt["in_a_row"]), not_slower,
                   chart=("roundtrip", "gateway, in a row")),
            metric("rtt_in_a_row_p95", "WebSocket `1+1` round trip, cells in a row (p95)", "ms",
                   p95(sg_rtt["in_a_row"]), p95(kg_rtt["in_a_row"])),
        ]
    if args.rtt_only:
        metrics += rtt_metrics
        summary.append(f"round trips only: {args.rtt_runs} each after {args.warmup} warm-up (Sandgate --pool-size "
                       f"{args.pool_size})")
    elif not args.capacity_only:
        sg_mem, kg_mem = memory["sandgate"], memory["reference"]
        w, e, k = starts[warm.label], starts[empty.label], starts[kg.label]
        metrics += [
            metric("start_warm_median", "start to idle, pool warm (median)", "ms", statistics.median(w),
                   statistics.median(k), warm_target, chart=("start", "gateway, pool warm")),
            metric("start_warm_p95", "start to idle, pool warm (p95)", "ms", p95(w), p95(k)),
            metric("start_empty_median", "start to idle, pool empty (median)", "ms", statistics.median(e),
                   statistics.median(k), chart=("start", "gateway, pool empty")),
            metric("start_empty_p95", "start to idle, pool empty (p95)", "ms", p95(e), p95(k)),
        ] + rtt_metrics + [
            metric("memory_per_kernel", f"PSS per idle kernel ({args.kernels} kernels, total / {args.kernels})",
                   "MiB", sg_mem["per_kernel_mib"], kg_mem["per_kernel_mib"], third,
                   chart=("memory", f"gateway, {args.kernels} kernels")),
            metric("memory_total", f"PSS of gateway + {args.kernels} idle kernels", "MiB",
                   sg_mem["total_mib"], kg_mem["total_mib"]),
            metric("memory_gateway", f"PSS of the gateway process alone (with {args.kernels} kernels)", "MiB",
                   sg_mem["gateway_mib"], kg_mem["gateway_mib"]),
        ]
        summary.append(f"{args.runs} starts each (Sandgate pool warm: --pool-size {args.pool_size}; pool empty: "
                       f"--pool-size 0), {args.rtt_runs} round trips each after {args.warmup} warm-up, memory "
                       f"with {args.kernels} kernels (Sandgate --pool-size 0: {sg_mem['processes']} kernel "
                       f"processes; reference: {kg_mem['processes']})")
    if capacity:
        sg, ref = capacity["sandgate"], capacity["reference"]
        n = f"{sg['alive']} / {ref['alive']} alive"
        metrics += [
            metric("capacity_alive", f"kernels alive at once (of {args.capacity} asked)", "", sg["alive"],
                   ref["alive"]),
            metric("capacity_pss_per_kernel", f"PSS per idle kernel process ({n})", "MiB",
                   sg["pss_per_kernel_mib"], ref["pss_per_kernel_mib"]),
            metric("capacity_idle_cpu", f"idle CPU per kernel ({n})", "ms/s",
                   sg["idle_cpu_per_kernel_ms"], ref["idle_cpu_per_kernel_ms"], idle_target),
            metric("capacity_idle_cpu_gateway", f"the gateway process's own idle CPU ({n})", "ms/s",
                   sg["idle_cpu_gateway_ms"], ref["idle_cpu_gateway_ms"]),
            metric("capacity_load", f"load average, 1 min, all idle ({n}; before: {sg['load_before']:.2f} / "
                   f"{ref['load_before']:.2f})", "", sg["load_alive"], ref["load_alive"]),
            metric("capacity_start_median", f"start to idle ({n}, median)", "ms",
                   median_or_none(sg["start_ms"]), median_or_none(ref["start_ms"])),
            metric("capacity_start_p95", f"start to idle ({n}, p95)", "ms", p95(sg["start_ms"]),
                   p95(ref["start_ms"])),
            metric("capacity_rtt_median", f"WebSocket `1+1` round trip ({n}, median)", "ms",
                   median_or_none(sg["rtt_ms"]), median_or_none(ref["rtt_ms"])),
            metric("capacity_gateway_rss_start", "gateway RSS at its start", "MiB",
                   sg["gateway_rss_start_mib"], ref["gateway_rss_start_mib"]),
            metric("capacity_gateway_rss_alive", f"gateway RSS ({n})", "MiB",
                   sg["gateway_rss_alive_mib"], ref["gateway_rss_alive_mib"]),
            metric("capacity_gateway_rss_after", "gateway RSS after deleting them all", "MiB",
                   sg["gateway_rss_after_mib"], ref["gateway_rss_after_mib"]),
        ]
        for label, r in (("Sandgate", sg), ("reference", ref)):
            if r["probe_failures"]:
                summary.append(f"{label}: {len(r['probe_failures'])} of the probes at full count failed, "
                               f"first: {r['probe_failures'][0]}")
        summary.append(f"capacity: {args.capacity} kernels asked (Sandgate --pool-size {CAPACITY_POOL}); Sandgate "
                       f"{sg['alive']} ({sg['stopped']}), reference {ref['alive']} ({ref['stopped']}); idle CPU "
                       f"over {args.window:.0f} s after {args.settle:.0f} s")
    reference_name = f"Kernel Gateway {kernel_gateway.__version__} + ipykernel"
    print(f"\nGateways on 127.0.0.1: {'; '.join(summary)}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print_table(metrics, reference_name)
    if retries and any(retries.values()):
        print(f"\nextra kernel_info requests (iopub idle not seen within {IOPUB_RETRY} s): {retries}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "gateway",
            "subject": "Sandgate (sandgate)",
            "reference": reference_name,
            "environment": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "gateway_binary": str(args.gateway),
                "gateway_binary_mtime": binary_mtime,
            },
            "runs": {"starts": args.runs, "round_trips": args.rtt_runs, "warmup": args.warmup,
                     "pool_size": args.pool_size, "memory_kernels": args.kernels, "capacity": args.capacity,
                     "capacity_only": args.capacity_only, "rtt_only": args.rtt_only},
            "metrics": metrics,
            "memory": memory,
            "capacity": capacity,
            "samples_ms": None if args.capacity_only else {
                "start": None if args.rtt_only else {"sandgate_pool_warm": w, "sandgate_pool_empty": e,
                                                     "reference": k},
                "round_trip": {"sandgate": sg_rtt, "reference": kg_rtt}},
            "kernel_info_retries": retries,
        }, indent=2))
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
