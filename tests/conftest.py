"""Shared harness: kernels started through jupyter_client from kernelspecs written per test
session, so every test drives the real `sandgate-kernel` binary over ZeroMQ."""

import json
import os
import pathlib
import queue
import shutil
import sys
import time

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL = pathlib.Path(os.environ.get("SANDGATE_KERNEL", ROOT / "target" / "release" / "sandgate-kernel"))
TIMEOUT = 60


def write_spec(kernels_dir, name, extra):
    d = kernels_dir / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [str(KERNEL), *extra, "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "interrupt_mode": "message",
    }))


class Kernel:
    """A started kernel with a blocking client and helpers that collect a request's output."""

    def __init__(self, km, workspace):
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)
        self.workspace = workspace

    def execute(self, code, timeout=TIMEOUT, **kw):
        """Runs `code`; returns (reply content, [iopub messages between busy and idle])."""
        msg_id = self.kc.execute(code, **kw)
        return self.collect(msg_id, timeout)

    def collect(self, msg_id, timeout=TIMEOUT, stdin=None):
        deadline = time.monotonic() + timeout
        outputs, reply, idle = [], None, False
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply/idle for {msg_id}: reply={reply} outputs={outputs}")
            if stdin is not None:
                try:
                    req = self.kc.get_stdin_msg(timeout=0.01)
                    self.kc.input(stdin(req))
                except queue.Empty:
                    pass
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 0.05))
                if msg["parent_header"].get("msg_id") == msg_id:
                    msg["received"] = time.monotonic()
                    if msg["msg_type"] == "status":
                        idle = msg["content"]["execution_state"] == "idle"
                    else:
                        outputs.append(msg)
            except queue.Empty:
                pass
            if reply is None:
                try:
                    r = self.kc.get_shell_msg(timeout=0.001)
                    if r["parent_header"].get("msg_id") == msg_id:
                        reply = r["content"]
                        reply["received"] = time.monotonic()
                except queue.Empty:
                    pass
        return reply, outputs

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture(scope="session")
def kernels_dir(tmp_path_factory):
    if not KERNEL.exists():
        pytest.exit(f"{KERNEL} is missing: build it with `cargo build --release`", 2)
    d = tmp_path_factory.mktemp("kernels")
    return d


@pytest.fixture(scope="session")
def start_kernel(kernels_dir, tmp_path_factory):
    started = []

    def start(extra=(), env=None):
        workspace = tmp_path_factory.mktemp("workspace")
        name = f"sandgate-test-{len(started)}"
        write_spec(kernels_dir, name, ["--workspace", str(workspace), *extra])
        km = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]))
        km.start_kernel(env={**os.environ, **(env or {})})
        k = Kernel(km, workspace)
        started.append(k)
        return k

    yield start
    for k in started:
        try:
            k.close()
        except Exception:
            pass


@pytest.fixture(scope="session")
def kernel(start_kernel):
    """One kernel shared by the tests that keep to their own variable names."""
    return start_kernel()


def of_type(outputs, msg_type):
    return [m for m in outputs if m["msg_type"] == msg_type]


def stdout_text(outputs, name="stdout"):
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name)
