#!/usr/bin/env python3
"""Agent benchmark: E2B's SDK (`e2b-code-interpreter`, unmodified, configured by
E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY) against Sandgate's E2B-compatible API, next to the
Jupyter API of the same gateway in the same run.

Run it from the repository root with the project's virtualenv after `cargo build --release`
and `sandgate-kernel install`:

    .venv/bin/python gateway/benches/bench_e2b.py [--runs N] [--rtt-runs M] [--parallel P]
        [--json out.json]

It starts `target/release/sandgate` the way bench_gateway.py does (its helpers are reused:
token in SANDGATE_TOKEN, JSON logs, the installed image and compiled module symlinked in).

What is measured:

- create: `Sandbox.create()` until it returns (the SDK's own cost included), on a gateway with
  a warm pool (`--pool-size`, default 2), the sandbox then killed and the gateway settled (the
  kernel gone, the pool full again) before the next. Beside it, in turns, the Jupyter way on
  the same gateway: `POST /api/kernels` until the kernel's WebSocket has answered
  `kernel_info_request` and gone idle (bench_gateway.py's "start to idle"). Also `create` plus
  the first `run_code("1+1")`. Median and p95 over `--runs`, after one unmeasured round.
- run_code: `sbx.run_code("1+1")` on one sandbox, against the WebSocket `1+1` round trip
  (execute_request until its execute_reply and idle) on a kernel of the same gateway, taking
  turns, after `--warmup` unmeasured rounds. Median and p95 over `--rtt-runs`.
- parallel: `--parallel` threads each create a sandbox, run `x = <i>` and `x * 2`, check the
  answer and kill it, all started at once, on a fresh gateway whose warm pool holds
  `--parallel` kernels (settled first). Wall time of the whole and each thread's create + run.

Targets (issue 14): create <= 20 ms p50, run_code("1+1") <= 3 ms p50; the WebSocket round trip
<= 1 ms p50.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402

import e2b_code_interpreter  # noqa: E402

TARGET_CREATE_MS = 20
TARGET_RUN_MS = 3
TARGET_WS_MS = 1


def ms_since(started):
    return (time.perf_counter() - started) * 1000


def sdk_env(gw):
    os.environ.update(E2B_API_URL=gw.url, E2B_SANDBOX_URL=gw.url, E2B_API_KEY=bg.TOKEN)
    for var in ("E2B_DEBUG", "E2B_DOMAIN"):
        os.environ.pop(var, None)


def sandbox_kernels(gw):
    return {k["id"] for k in gw.kernels()}


def measure_creates(gw, runs):
    """{"create": [...], "create_run": [...], "jupyter_start": [...]} in ms."""
    times = {"create": [], "create_run": [], "jupyter_start": []}
    gw.settle()
    for round_ in range(runs + 1):
        before = sandbox_kernels(gw)
        started = time.perf_counter()
        sbx = e2b_code_interpreter.Sandbox.create()
        create = ms_since(started)
        result = sbx.run_code("1+1")
        create_run = ms_since(started)
        if result.text != "2":
            raise RuntimeError(f"run_code('1+1') gave {result}")
        (kernel,) = sandbox_kernels(gw) - before
        sbx.kill()
        gw.settle(deleted=kernel)
        kernel_id, start, _ = bg.start_to_idle(gw)
        gw.delete_kernel(kernel_id)
        gw.settle(deleted=kernel_id)
        if round_ > 0:
            times["create"].append(create)
            times["create_run"].append(create_run)
            times["jupyter_start"].append(start)
        if round_ % 10 == 0 or round_ == runs:
            bg.progress(f"create round {round_}/{runs} done")
    return times


def measure_runs(gw, warmup, runs):
    """{"run_code": [...], "websocket": [...]} in ms, taking turns."""
    times = {"run_code": [], "websocket": []}
    sbx = e2b_code_interpreter.Sandbox.create()
    kernel_id, _, _ = bg.start_to_idle(gw)
    ws = gw.connect(kernel_id)
    try:
        for i in range(warmup + runs):
            started = time.perf_counter()
            result = sbx.run_code("1+1")
            run = ms_since(started)
            if result.text != "2":
                raise RuntimeError(f"run_code('1+1') gave {result}")
            started = time.perf_counter()
            ws.execute("1+1", bg.READY_TIMEOUT)
            rtt = ms_since(started)
            if i >= warmup:
                times["run_code"].append(run)
                times["websocket"].append(rtt)
    finally:
        ws.close()
        gw.delete_kernel(kernel_id)
        sbx.kill()
    return times


def measure_parallel(gw, n):
    """(wall ms, [per-thread create + run ms], errors)."""
    gw.settle()
    per, errors = [None] * n, []
    go = threading.Barrier(n + 1)

    def agent(i):
        try:
            go.wait()
            started = time.perf_counter()
            sbx = e2b_code_interpreter.Sandbox.create()
            try:
                sbx.run_code(f"x = {i}")
                answer = sbx.run_code("x * 2").text
                per[i] = ms_since(started)
                if answer != str(i * 2):
                    errors.append(f"sandbox {i} answered {answer!r}")
            finally:
                sbx.kill()
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f"sandbox {i}: {e!r}")

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    started = time.perf_counter()
    for t in threads:
        t.join(bg.READY_TIMEOUT)
    return ms_since(started), [p for p in per if p is not None], errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="measured creates (default 30)")
    parser.add_argument("--rtt-runs", type=int, default=200, help="measured run_code / round trips (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured rounds first (default 20)")
    parser.add_argument("--pool-size", type=int, default=2, help="warm pool for create and run_code (default 2)")
    parser.add_argument("--parallel", type=int, default=20, help="sandboxes at once (default 20)")
    parser.add_argument("--gateway", type=pathlib.Path, default=bg.ROOT / "target" / "release" / "sandgate")
    parser.add_argument("--home", type=pathlib.Path, default=bg.default_home())
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    if not args.gateway.exists():
        sys.exit(f"{args.gateway} is missing: build it with `cargo build --release`")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="sandgate-e2b-bench-"))
    bg.progress(f"gateway folders and logs in {tmp}")
    gateways, succeeded = [], False
    try:
        gw = bg.start_sandgate(args.gateway, args.home, tmp, "sandgate", args.pool_size, 64)
        gateways.append(gw)
        sdk_env(gw)
        creates = measure_creates(gw, args.runs)
        bg.progress("run_code and WebSocket round trips")
        runs = measure_runs(gw, args.warmup, args.rtt_runs)
        gw.stop()
        gw = bg.start_sandgate(args.gateway, args.home, tmp, "sandgate-parallel", args.parallel,
                               args.parallel * 2 + 8)
        gateways.append(gw)
        sdk_env(gw)
        bg.progress(f"{args.parallel} sandboxes at once")
        wall, per, errors = measure_parallel(gw, args.parallel)
        gw.stop()
        succeeded = not errors
    finally:
        for g in gateways:
            g.stop()
        if succeeded and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        sys.exit(f"parallel phase failed: {errors[:3]}")

    at_most = lambda t: (f"<= {t} ms", lambda s, r: s <= t)  # noqa: E731
    c, r = creates, runs
    metrics = [
        bg.metric("create_median", "`Sandbox.create()` vs REST start to idle (median)", "ms",
                  statistics.median(c["create"]), statistics.median(c["jupyter_start"]), at_most(TARGET_CREATE_MS)),
        bg.metric("create_p95", "`Sandbox.create()` vs REST start to idle (p95)", "ms",
                  bg.p95(c["create"]), bg.p95(c["jupyter_start"])),
        bg.metric("create_run_median", "`create()` + first `run_code(\"1+1\")` (median)", "ms",
                  statistics.median(c["create_run"])),
        bg.metric("run_median", "`run_code(\"1+1\")` vs WebSocket `1+1` (median)", "ms",
                  statistics.median(r["run_code"]), statistics.median(r["websocket"]), at_most(TARGET_RUN_MS)),
        bg.metric("run_p95", "`run_code(\"1+1\")` vs WebSocket `1+1` (p95)", "ms",
                  bg.p95(r["run_code"]), bg.p95(r["websocket"])),
        bg.metric("ws_median", "WebSocket `1+1` round trip, same gateway (median)", "ms",
                  statistics.median(r["websocket"]), None, at_most(TARGET_WS_MS)),
        bg.metric("parallel_wall", f"{args.parallel} sandboxes at once: create + 2 runs + kill, all", "ms", wall),
        bg.metric("parallel_each_median", f"{args.parallel} at once: each one's create + 2 runs (median)", "ms",
                  statistics.median(per)),
        bg.metric("parallel_each_p95", f"{args.parallel} at once: each one's create + 2 runs (p95)", "ms",
                  bg.p95(per)),
    ]
    from importlib.metadata import version
    print(f"\nSandgate on 127.0.0.1, e2b-code-interpreter {version('e2b-code-interpreter')} "
          f"through E2B_API_URL/E2B_SANDBOX_URL; {args.runs} creates (--pool-size {args.pool_size}), "
          f"{args.rtt_runs} runs after {args.warmup} warm-up; parallel: --pool-size {args.parallel}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n")
    bg.print_table(metrics, "Jupyter API of the same gateway")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "e2b",
            "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "load_average": os.getloadavg()},
            "metrics": metrics,
            "samples": {"creates": creates, "runs": runs, "parallel": per, "parallel_wall_ms": wall},
        }, indent=2))


if __name__ == "__main__":
    main()
