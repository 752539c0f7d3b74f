#!/usr/bin/env python3
"""Kernel benchmark: `sandgate-kernel` against the reference, ipykernel, in the same run.

Run it from the repository root with the project's virtualenv (it needs jupyter_client and
ipykernel) after `cargo build --release` and `sandgate-kernel install`:

    .venv/bin/python kernel/benches/bench_kernel.py [--runs N] [--rtt-runs M] [--no-cold] [--json out.json]

Both kernels are started the way every Jupyter frontend starts them: jupyter_client's
`KernelManager` launches the command of a kernelspec and talks to the kernel over ZeroMQ.
Sandgate uses a kernelspec written to a temporary folder that points at
`target/release/sandgate-kernel --home HOME -f {connection_file}`; ipykernel uses the `python3`
kernelspec installed in the virtualenv.

What is measured:

- start, module cached: from `KernelManager.start_kernel()` until the kernel has answered a
  `kernel_info_request` on shell and published the `idle` status of that request on iopub (what
  `wait_for_ready` waits for, without its fixed 0.2 s iopub flush). HOME holds symlinks to the
  installed image and compiled-module cache. When a reply comes without its idle within 0.2 s
  (iopub subscribed after the kernel published it), another request is sent, as
  `wait_for_ready` does; such retries are counted and printed. The kernels take turns so
  background load hits both alike, and one unmeasured round comes first so both read their
  files from the page cache. Median and p95 over `--runs` starts.
- cold start (Sandgate only, on by default, `--no-cold` skips it): the same, once, with a fresh
  HOME whose `cache` folder is empty, so the kernel compiles the image first (a minute or two).
- round trip: from sending `execute_request` for `1+1` until both its `execute_reply` and its
  `idle` status have arrived, on one kernel of each kind, both running. First the kernels take
  turns, so each execute follows one on the other kernel (a kernel that has sat idle for a few
  ms), after `--warmup` unmeasured rounds; then `--rtt-runs` executes in a row on each, each
  sent as soon as the previous one is idle (a notebook's Run All). Median and p95 over
  `--rtt-runs` runs each; the target is checked against both.
- `kernel_info` round trip: the same two modes for a request that runs no code (three messages:
  busy, the reply, idle; an execute has five). It is the floor the client, the transport and
  the machine's wake-ups set, next to which the execute round trip can be read.

The client side (jupyter_client's `Session` signs and decodes; both channels' sockets are read
directly, each message as it arrives, as a frontend's event loop reads them) is the same Python
for both kernels, so the ratio sandgate/ipykernel compares the kernels.
Targets: start under 300 ms, round trip under 1 ms.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import queue
import signal
import statistics
import sys
import tempfile
import time

import ipykernel
import jupyter_client
import zmq
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

ROOT = pathlib.Path(__file__).resolve().parents[2]
SANDGATE_SPEC = "sandgate-bench"
REFERENCE_SPEC = "python3"
START_TIMEOUT = 60
COLD_START_TIMEOUT = 900
REPLY_TIMEOUT = 30
IOPUB_RETRY = 0.2
TARGET_START_MS = 300
TARGET_RTT_MS = 1.0


def default_home():
    """Where `sandgate-kernel install` put the image and its compiled cache."""
    if os.environ.get("SANDGATE_HOME"):
        return pathlib.Path(os.environ["SANDGATE_HOME"])
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return pathlib.Path(xdg) / "sandgate"


def make_home(path, installed, share_cache):
    """A Sandgate home sharing the installed image; the compiled-module cache is shared too, or
    empty so the first start compiles."""
    path.mkdir(parents=True)
    (path / "images").symlink_to(installed / "images")
    if share_cache:
        (path / "cache").symlink_to(installed / "cache")
    else:
        (path / "cache").mkdir()
    return path


def write_sandgate_spec(kernels_dir, name, kernel, home):
    d = kernels_dir / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [str(kernel), "--home", str(home), "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "interrupt_mode": "message",
    }))


def await_reply_and_idle(kc, msg_id, deadline, idle_within):
    """Waits for the shell reply to `msg_id` (until `deadline`) and for the iopub `idle` status
    it caused (within `idle_within` seconds of the reply). Returns the reply. Raises
    `TimeoutError` if the reply does not come and `queue.Empty` if the idle does not.

    It reads both channels' sockets directly, each message as it arrives, as a frontend's event
    loop does: the client decodes `busy` and `execute_input` while the kernel runs the cell, not
    after the reply (reading the reply first and iopub after it added about 0.3 ms of the
    client's own work to every round trip, whatever the kernel). The blocking client's
    `get_shell_msg` would also run an asyncio loop per call, about 1 ms more."""
    shell, iopub = kc.shell_channel.socket, kc.iopub_channel.socket
    poller = zmq.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(iopub, zmq.POLLIN)
    reply, idle, idle_deadline = None, False, None
    while reply is None or not idle:
        limit = deadline if reply is None else idle_deadline
        left = limit - time.monotonic()
        if left <= 0:
            if reply is None:
                raise TimeoutError(f"no reply to {msg_id}")
            raise queue.Empty
        for sock, _ in poller.poll(left * 1000):
            _, frames = kc.session.feed_identities(sock.recv_multipart())
            msg = kc.session.deserialize(frames)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if sock is shell:
                reply = msg
                idle_deadline = time.monotonic() + idle_within
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
    return reply


def await_ready(kc, timeout):
    """Sends `kernel_info_request` until one gets both its reply and its iopub `idle`. ZeroMQ
    queues the request until the kernel listens; another is sent when a reply came but no idle
    within IOPUB_RETRY s (iopub subscribed too late to see it), as `wait_for_ready` does.
    Returns how many extra requests that took."""
    deadline = time.monotonic() + timeout
    retries = 0
    while True:
        msg_id = kc.kernel_info()
        try:
            await_reply_and_idle(kc, msg_id, deadline, IOPUB_RETRY)
            return retries
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"kernel not ready within {timeout} s") from None
            retries += 1


class Launcher:
    """Starts kernels from kernelspecs and shuts down every one it started, also on failure."""

    def __init__(self, ksm):
        self.ksm = ksm
        self.live = []

    def start(self, spec, timeout=START_TIMEOUT):
        """Starts a kernel of `spec` and waits until it is ready.
        Returns (manager, client, seconds to ready, extra kernel_info requests)."""
        km = KernelManager(kernel_name=spec, kernel_spec_manager=self.ksm)
        started = time.perf_counter()
        km.start_kernel()
        kc = km.client()
        self.live.append((km, kc))
        kc.start_channels()
        retries = await_ready(kc, timeout)
        return km, kc, time.perf_counter() - started, retries

    def stop(self, km, kc):
        self.live.remove((km, kc))
        kc.stop_channels()
        km.shutdown_kernel(now=False)

    def stop_all(self):
        for km, kc in list(self.live):
            self.live.remove((km, kc))
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def measure_starts(launcher, specs, runs):
    """Start-to-ready times in ms per spec, the specs taking turns so background load hits both
    alike; the first round is not counted. Also the extra kernel_info requests per spec."""
    times = {s: [] for s in specs}
    retries = dict.fromkeys(specs, 0)
    for round_ in range(runs + 1):
        for spec in specs:
            km, kc, seconds, extra = launcher.start(spec)
            launcher.stop(km, kc)
            if round_ > 0:
                times[spec].append(seconds * 1000)
                retries[spec] += extra
        progress(f"start round {round_}/{runs} done")
    return times, retries


def measure_roundtrips(launcher, specs, warmup, runs, code="1+1"):
    """Round trips in ms, {spec: {mode: [...]}}, on one kernel of each spec, all running: of
    `execute_request` for `code`, or of `kernel_info_request` if `code` is None. Mode "turns":
    the kernels take turns, so every request follows one on the other kernel, after `warmup`
    unmeasured rounds. Then mode "in_a_row": `runs` requests on each kernel in turn, each sent
    as soon as the previous one is idle."""
    kernels = {spec: launcher.start(spec)[:2] for spec in specs}
    times = {spec: {"turns": [], "in_a_row": []} for spec in specs}
    what = "kernel_info" if code is None else repr(code)

    def timed(spec, kc):
        started = time.perf_counter()
        msg_id = kc.kernel_info() if code is None else kc.execute(code)
        try:
            reply = await_reply_and_idle(kc, msg_id, time.monotonic() + REPLY_TIMEOUT, REPLY_TIMEOUT)
        except queue.Empty:
            raise TimeoutError(f"{spec}: no idle after {what}") from None
        elapsed = time.perf_counter() - started
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"{spec}: {what} failed: {reply['content']}")
        return elapsed * 1000

    for i in range(warmup + runs):
        for spec, (_, kc) in kernels.items():
            elapsed = timed(spec, kc)
            if i >= warmup:
                times[spec]["turns"].append(elapsed)
    for spec, (_, kc) in kernels.items():
        times[spec]["in_a_row"] = [timed(spec, kc) for _ in range(runs)]
    for km, kc in kernels.values():
        launcher.stop(km, kc)
    return times


def p95(samples):
    """Nearest-rank 95th percentile."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


def metric(name, label, unit, sandgate, reference=None, target=None, chart=None):
    """One row of the results: `target` is (text, passes(sandgate, reference)); `chart` is
    (panel, bar label) for `gateway/benches/chart.rs`."""
    return {
        "name": name,
        "label": label,
        "unit": unit,
        "sandgate": sandgate,
        "reference": reference,
        "ratio": sandgate / reference if reference else None,
        "target": target[0] if target else None,
        "met": target[1](sandgate, reference) if target else None,
        "chart": {"panel": chart[0], "label": chart[1]} if chart else None,
    }


def print_table(metrics, reference_name):
    def fmt(value, unit):
        return "n/a" if value is None else f"{value:.3g} {unit}" if value < 10 else f"{value:.0f} {unit}"

    print(f"| metric | Sandgate | {reference_name} | Sandgate / {reference_name} | target |")
    print("|---|---:|---:|---:|---|")
    for m in metrics:
        ratio = "n/a" if m["ratio"] is None else f"{m['ratio']:.2f}"
        target = "" if m["target"] is None else f"{m['target']}: {'met' if m['met'] else 'missed'}"
        print(f"| {m['label']} | {fmt(m['sandgate'], m['unit'])} | {fmt(m['reference'], m['unit'])} "
              f"| {ratio} | {target} |")


def progress(text):
    print(f"[bench_kernel] {text}", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured starts per kernel (default 10)")
    parser.add_argument("--rtt-runs", type=int, default=200,
                        help="measured round trips per kernel and mode (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured round trips first (default 20)")
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                        help="measure one Sandgate start that compiles the image (default on; 1-2 minutes)")
    parser.add_argument("--kernel", type=pathlib.Path, default=ROOT / "target" / "release" / "sandgate-kernel",
                        help="the sandgate-kernel binary (default target/release/sandgate-kernel)")
    parser.add_argument("--home", type=pathlib.Path, default=default_home(),
                        help="the installed Sandgate home with images/ and cache/ (default $SANDGATE_HOME "
                             "or ~/.local/share/sandgate)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    # `timeout` and `kill` send SIGTERM: end through the clean-up below, not at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not args.kernel.exists():
        sys.exit(f"{args.kernel} is missing: build it with `cargo build --release`")
    # Another build may replace the binary during the run: this names the one the run started with.
    binary_mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.kernel.stat().st_mtime))
    if not any((args.home / "cache").glob("*.cwasm")):
        sys.exit(f"no compiled module in {args.home / 'cache'}: run `sandgate-kernel install` first")
    reference = KernelSpecManager().get_kernel_spec(REFERENCE_SPEC)
    progress(f"reference kernelspec {REFERENCE_SPEC}: {reference.resource_dir}")

    with tempfile.TemporaryDirectory(prefix="sandgate-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        ksm = KernelSpecManager()
        ksm.kernel_dirs.insert(0, str(tmp / "kernels"))
        write_sandgate_spec(tmp / "kernels", SANDGATE_SPEC, args.kernel,
                            make_home(tmp / "home-cached", args.home, share_cache=True))
        launcher = Launcher(ksm)
        specs = [SANDGATE_SPEC, REFERENCE_SPEC]
        try:
            starts, retries = measure_starts(launcher, specs, args.runs)
            progress("round trips")
            rtts = measure_roundtrips(launcher, specs, args.warmup, args.rtt_runs)
            progress("kernel_info round trips")
            infos = measure_roundtrips(launcher, specs, args.warmup, args.rtt_runs, code=None)
            cold = None
            if args.cold:
                write_sandgate_spec(tmp / "kernels", "sandgate-cold", args.kernel,
                                    make_home(tmp / "home-cold", args.home, share_cache=False))
                progress("cold start: compiling the image (a minute or two)")
                km, kc, cold, _ = launcher.start("sandgate-cold", COLD_START_TIMEOUT)
                launcher.stop(km, kc)
        finally:
            launcher.stop_all()

    sg, ref = SANDGATE_SPEC, REFERENCE_SPEC
    start_target = (f"< {TARGET_START_MS} ms", lambda s, r: s < TARGET_START_MS)
    rtt_target = (f"< {TARGET_RTT_MS:g} ms", lambda s, r: s < TARGET_RTT_MS)
    metrics = [
        metric("start_median", "start to idle, module cached (median)", "ms", statistics.median(starts[sg]),
               statistics.median(starts[ref]), start_target, chart=("start", "kernel, module cached")),
        metric("start_p95", "start to idle, module cached (p95)", "ms", p95(starts[sg]), p95(starts[ref])),
        metric("rtt_median", "execute `1+1` round trip, kernels taking turns (median)", "ms",
               statistics.median(rtts[sg]["turns"]), statistics.median(rtts[ref]["turns"]), rtt_target,
               chart=("roundtrip", "kernel, taking turns")),
        metric("rtt_p95", "execute `1+1` round trip, kernels taking turns (p95)", "ms",
               p95(rtts[sg]["turns"]), p95(rtts[ref]["turns"])),
        metric("rtt_in_a_row_median", "execute `1+1` round trip, cells in a row (median)", "ms",
               statistics.median(rtts[sg]["in_a_row"]), statistics.median(rtts[ref]["in_a_row"]), rtt_target,
               chart=("roundtrip", "kernel, in a row")),
        metric("rtt_in_a_row_p95", "execute `1+1` round trip, cells in a row (p95)", "ms",
               p95(rtts[sg]["in_a_row"]), p95(rtts[ref]["in_a_row"])),
        metric("info_median", "`kernel_info` round trip (no code run), taking turns (median)", "ms",
               statistics.median(infos[sg]["turns"]), statistics.median(infos[ref]["turns"])),
        metric("info_in_a_row_median", "`kernel_info` round trip (no code run), in a row (median)", "ms",
               statistics.median(infos[sg]["in_a_row"]), statistics.median(infos[ref]["in_a_row"])),
    ]
    if cold is not None:
        metrics.append(metric("cold_start", "start to idle, compiling the image (once)", "s", cold))

    reference_name = f"ipykernel {ipykernel.__version__}"
    print(f"\nKernels through jupyter_client {jupyter_client.__version__}: {args.runs} starts each, "
          f"{args.rtt_runs} round trips each after {args.warmup} warm-up; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print_table(metrics, reference_name)
    if any(retries.values()):
        print(f"\nextra kernel_info requests (iopub subscribed late): {retries}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "kernel",
            "subject": "Sandgate (sandgate-kernel)",
            "reference": reference_name,
            "environment": {
                "python": platform.python_version(),
                "jupyter_client": jupyter_client.__version__,
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "kernel_binary": str(args.kernel),
                "kernel_binary_mtime": binary_mtime,
            },
            "runs": {"starts": args.runs, "round_trips": args.rtt_runs, "warmup": args.warmup},
            "metrics": metrics,
            "samples_ms": {"start": {"sandgate": starts[sg], "reference": starts[ref]},
                           "round_trip": {"sandgate": rtts[sg], "reference": rtts[ref]}},
            "kernel_info_retries": {"sandgate": retries[sg], "reference": retries[ref]},
        }, indent=2))
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
