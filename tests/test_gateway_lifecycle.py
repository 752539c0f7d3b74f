"""Kernel lifecycle behind the gateway: death and automatic restart, the restart limit,
shutdown requests from clients, culling, graceful shutdown, and what a kernel process inherits."""

import os
import pathlib
import signal
import time

from conftest import KernelSocket, children, kernel_pid


def wait_until(condition, timeout=30, what="condition"):
    """Polls `condition` (a request to the gateway) every 0.1 s until it holds or `timeout`
    passes: the state it waits for (a culled kernel) has no event a client can wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def statuses_until(s, wanted, timeout=60):
    """iopub execution states received until `wanted` has been seen, within `timeout` in all."""
    deadline = time.monotonic() + timeout
    seen = []
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} status within {timeout} s; saw {seen}"
        s.ws.settimeout(left)
        m = s.recv()
        if m["msg_type"] == "status":
            seen.append(m["content"]["execution_state"])
    return seen


def test_a_killed_kernel_is_restarted_and_clients_are_told(gateway):
    k = gateway.start_kernel()
    s = KernelSocket(gateway, k["id"])
    try:
        s.execute("before_crash = 1")
        os.kill(kernel_pid(gateway, k["id"]), signal.SIGKILL)
        seen = statuses_until(s, "idle")
        assert "restarting" in seen
        reply, _ = s.execute("before_crash")
        assert reply["status"] == "error" and reply["ename"] == "NameError"
        reply, _ = s.execute("6 * 7")
        assert reply["status"] == "ok"
        status, model, _ = gateway.request("GET", f"/api/kernels/{k['id']}")
        assert status == 200 and model["execution_state"] == "idle"
    finally:
        s.close()
        gateway.request("DELETE", f"/api/kernels/{k['id']}")


def test_a_kernel_killed_mid_cell_is_reported(gateway):
    k = gateway.start_kernel()
    s = KernelSocket(gateway, k["id"])
    try:
        msg_id = s.send("execute_request", {"code": "import time\ntime.sleep(60)", "silent": False})
        while True:
            m = s.recv()
            if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg_id:
                break
        os.kill(kernel_pid(gateway, k["id"]), signal.SIGKILL)
        assert "restarting" in statuses_until(s, "idle")
        reply, _ = s.execute("'alive again'")
        assert reply["status"] == "ok"
    finally:
        s.close()
        gateway.request("DELETE", f"/api/kernels/{k['id']}")


def test_the_restart_limit_declares_the_kernel_dead(start_gateway, tmp_path):
    config = tmp_path / "limit.toml"
    config.write_text("[kernels]\nrestart_limit = 1\nrestart_window_s = 600\npool_size = 1\n")
    g = start_gateway(["--config", str(config)])
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        os.kill(kernel_pid(g, k["id"]), signal.SIGKILL)
        # The restart's own idle (an idle of the first process, answering the socket's opening
        # kernel_info, can come first under load: the new process may not exist yet then).
        statuses_until(s, "restarting")
        statuses_until(s, "idle")
        # The restarted process has a new connection file; find it among the gateway's children.
        pids = [p for p, argv in children(g.proc.pid).items() if any(b"sandgate-kernel" in a for a in argv)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert "dead" in statuses_until(s, "dead")
        status, model, _ = g.request("GET", f"/api/kernels/{k['id']}")
        assert status == 200 and model["execution_state"] == "dead"
        status, _, _ = g.request("DELETE", f"/api/kernels/{k['id']}")
        assert status == 204
    finally:
        s.close()


def test_shutdown_request_from_a_client(gateway):
    k = gateway.start_kernel()
    s = KernelSocket(gateway, k["id"])
    try:
        s.execute("x = 1")
        msg_id = s.send("shutdown_request", {"restart": True}, channel="control")
        reply, _ = s.collect(msg_id)
        assert reply["restart"] is True
        seen = statuses_until(s, "idle")
        assert "restarting" in seen
        reply, _ = s.execute("x")
        assert reply["ename"] == "NameError"
        s.send("shutdown_request", {"restart": False}, channel="control")
        wait_until(lambda: gateway.request("GET", f"/api/kernels/{k['id']}")[0] == 404, what="the kernel to go")
    finally:
        s.close()


def test_idle_kernels_are_culled_but_not_connected_ones(start_gateway):
    g = start_gateway(["--pool-size", "0", "--cull-idle-timeout", "2", "--cull-interval", "1"])
    lonely = g.start_kernel()
    watched = g.start_kernel()
    s = KernelSocket(g, watched["id"])
    try:
        wait_until(lambda: g.request("GET", f"/api/kernels/{lonely['id']}")[0] == 404, what="culling")
        status, model, _ = g.request("GET", f"/api/kernels/{watched['id']}")
        assert status == 200 and model["connections"] == 1
        assert "culling an idle kernel" in g.log()
    finally:
        s.close()


def test_cull_connected_culls_kernels_with_clients(start_gateway, tmp_path):
    config = tmp_path / "cull.toml"
    config.write_text("[kernels]\npool_size = 0\ncull_idle_timeout_s = 2\ncull_interval_s = 1\ncull_connected = true\n")
    g = start_gateway(["--config", str(config)])
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        wait_until(lambda: g.request("GET", f"/api/kernels/{k['id']}")[0] == 404, what="culling")
    finally:
        s.close()


def test_sigterm_shuts_every_kernel_down(start_gateway):
    g = start_gateway(["--pool-size", "2"])
    ks = [g.start_kernel() for _ in range(2)]
    s = KernelSocket(g, ks[0]["id"])
    pids = [p for p, argv in children(g.proc.pid).items() if any(b"sandgate-kernel" in a for a in argv)]
    assert len(pids) >= 2
    assert g.stop() == 0
    # The client was told, and no kernel process outlived the gateway.
    s.ws.settimeout(30)
    import websocket
    try:
        while True:
            frame = s.ws.recv_frame()
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                assert b"shutting down" in frame.data
                break
    except websocket.WebSocketConnectionClosedException:
        pass
    for pid in pids:
        assert not pathlib.Path(f"/proc/{pid}").exists() or "Z" in pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_kernel_processes_inherit_nothing_of_the_gateway_environment(start_gateway):
    g = start_gateway(["--pool-size", "0"], env={"OPENAI_API_KEY": "sk-test-should-not-leak"})
    k = g.start_kernel()
    environ = pathlib.Path(f"/proc/{kernel_pid(g, k['id'])}/environ").read_bytes()
    assert b"sk-test-should-not-leak" not in environ and b"SANDGATE_TOKEN" not in environ
    s = KernelSocket(g, k["id"])
    try:
        reply, out = s.execute("import os\nsorted(os.environ)")
        text = [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]
        assert "OPENAI_API_KEY" not in text and "SANDGATE_TOKEN" not in text
    finally:
        s.close()
