"""Load: 100 concurrent WebSocket clients on 50 kernels for a bounded time (60 s by default,
SANDGATE_LOAD_SECONDS to change), all on 127.0.0.1. Every request is answered, no message goes
to the wrong client, and the gateway's memory stays bounded."""

import os
import threading
import time
import uuid

import pytest

from conftest import KernelSocket

KERNELS = 50
CLIENTS_PER_KERNEL = 2
SECONDS = float(os.environ.get("SANDGATE_LOAD_SECONDS", "60"))


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Client(threading.Thread):
    """Runs cells that print and return a token unique to this client and request, and checks
    that what comes back under each request is exactly its own."""

    def __init__(self, gw, kernel_id, deadline):
        super().__init__(daemon=True)
        self.gw, self.kernel_id, self.deadline = gw, kernel_id, deadline
        self.sent = self.answered = 0
        self.problems = []

    def collect(self, s, msg_id):
        """Like KernelSocket.collect, but a reply to a request this client did not send is a
        misrouted message, and a problem."""
        s.ws.settimeout(120)
        reply, outputs, idle = None, [], False
        while reply is None or not idle:
            msg = s.recv()
            parent = msg["parent_header"].get("msg_id")
            if msg["channel"] != "iopub" and parent != msg_id:
                self.problems.append(("misrouted", msg["msg_type"], parent))
                continue
            if parent != msg_id:
                continue
            if msg["channel"] == "iopub":
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                else:
                    outputs.append(msg)
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
        return reply, outputs

    def run(self):
        s = KernelSocket(self.gw, self.kernel_id)
        me = uuid.uuid4().hex[:8]
        try:
            while time.monotonic() < self.deadline:
                token = f"{me}-{self.sent}"
                msg_id = s.send("execute_request", {"code": f"print({token!r})\n{token!r}", "silent": False})
                self.sent += 1
                reply, out = self.collect(s, msg_id)
                streams = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
                results = [m["content"]["data"]["text/plain"] for m in out if m["msg_type"] == "execute_result"]
                if reply.get("status") != "ok" or streams != f"{token}\n" or results != [repr(token)]:
                    self.problems.append((token, reply.get("status"), streams, results))
                self.answered += 1
        except Exception as e:  # reported, and fails the test below
            self.problems.append(("exception", repr(e)))
        finally:
            s.close()


def test_100_clients_on_50_kernels(start_gateway, tmp_path):
    config = tmp_path / "load.toml"
    config.write_text("[kernels]\nmax_kernels = 64\npool_size = 4\n")
    gw = start_gateway(["--config", str(config)])
    kernels = [gw.start_kernel()["id"] for _ in range(KERNELS)]
    rss_start = rss_mib(gw.proc.pid)
    deadline = time.monotonic() + SECONDS
    clients = [Client(gw, k, deadline) for k in kernels for _ in range(CLIENTS_PER_KERNEL)]
    for c in clients:
        c.start()
    peak = rss_start
    # Sample the gateway's memory while the clients run (each sample waits for a client to end
    # or for a second to pass, whichever is first).
    for c in clients:
        while c.is_alive():
            c.join(timeout=1)
            peak = max(peak, rss_mib(gw.proc.pid))
    problems = [p for c in clients for p in c.problems]
    sent = sum(c.sent for c in clients)
    answered = sum(c.answered for c in clients)
    print(f"{sent} requests from {len(clients)} clients in {SECONDS:.0f} s; gateway RSS "
          f"{rss_start:.0f} MiB at start, {peak:.0f} MiB at peak")
    assert problems == [], problems[:5]
    assert answered == sent and sent >= len(clients)
    assert peak < 512, f"the gateway grew to {peak:.0f} MiB"
    status, listed, _ = gw.request("GET", "/api/kernels")
    assert status == 200 and len(listed) == KERNELS


def anon_mib(pid):
    """The process's anonymous resident memory (its heap; file-backed pages left out)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RssAnon for process {pid}")


LOW_OPEN_FILES = 128
MANY_KERNELS = 40  # about 8 of the gateway's descriptors each: far past LOW_OPEN_FILES


def test_kernels_past_a_low_open_files_limit_and_their_memory_given_back(start_gateway):
    """A gateway started with a soft open-files limit of 128 (where the hard one is higher, as
    on most hosts, whose default soft limit is 1024) raises it, and holds 40 kernels that each
    answer; once they are deleted, the memory the gateway used for them goes back to the
    system (glibc's malloc kept it in its arenas)."""
    gw = start_gateway(["--pool-size", "0", "--max-kernels", str(MANY_KERNELS + 8)], open_files=LOW_OPEN_FILES)
    pid = gw.proc.pid
    before = anon_mib(pid)
    ids = [gw.start_kernel()["id"] for _ in range(MANY_KERNELS)]
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    assert open_now > LOW_OPEN_FILES, open_now
    for kernel_id in (ids[0], ids[-1]):
        s = KernelSocket(gw, kernel_id)
        try:
            reply, _ = s.execute("1+1")
            assert reply["status"] == "ok", reply
        finally:
            s.close()
    peak = anon_mib(pid)
    for kernel_id in ids:
        status, body, _ = gw.request("DELETE", f"/api/kernels/{kernel_id}")
        assert status == 204, body
    # Most of what the kernels took is handed back within seconds of their end.
    wanted = before + (peak - before) / 2
    deadline = time.monotonic() + 20
    while anon_mib(pid) > wanted:
        assert time.monotonic() < deadline, (
            f"gateway heap {anon_mib(pid):.1f} MiB after deleting {MANY_KERNELS} kernels: "
            f"{before:.1f} MiB before them, {peak:.1f} MiB with them")
        time.sleep(0.2)
