"""The kernel WebSocket through the gateway: both framings, several clients on one kernel,
reply routing, reconnecting with a session id, stdin, origins and malformed frames."""

import base64
import json
import time
import uuid

import pytest
import websocket

from conftest import KernelSocket, encode_v1


@pytest.fixture
def kernel(gateway):
    k = gateway.start_kernel()
    yield k
    gateway.request("DELETE", f"/api/kernels/{k['id']}")


def result_text(outputs):
    return [m for m in outputs if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]


@pytest.mark.parametrize("v1", [False, True], ids=["legacy-json", "v1-binary"])
def test_execute_with_both_protocols(gateway, kernel, v1):
    s = KernelSocket(gateway, kernel["id"], v1=v1)
    try:
        if v1:
            assert s.ws.getsubprotocol() == "v1.kernel.websocket.jupyter.org"
        else:
            assert s.ws.getsubprotocol() is None
        reply, out = s.execute("import pandas as pd\nprint('hi')\npd.DataFrame({'a': [1, 2]})")
        assert reply["status"] == "ok"
        kinds = [m["msg_type"] for m in out]
        assert kinds[0] == "execute_input" and "stream" in kinds and kinds[-1] == "execute_result"
        data = out[-1]["content"]["data"]
        assert "<table" in data["text/html"]
        for m in out:
            assert m["channel"] == "iopub"
            for key in ("username", "version", "session", "msg_id", "msg_type"):
                assert isinstance(m["header"][key], str)
            if not v1:
                # Top-level ids, as the gateway client's kernel client reads them.
                assert m["msg_id"] == m["header"]["msg_id"] and m["msg_type"] == m["header"]["msg_type"]
    finally:
        s.close()


def test_a_plot_arrives_as_png(gateway, kernel):
    s = KernelSocket(gateway, kernel["id"])
    try:
        reply, out = s.execute("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('through the gateway')")
        assert reply["status"] == "ok"
        pngs = [m for m in out if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
        assert len(pngs) == 1
        assert base64.b64decode(pngs[0]["content"]["data"]["image/png"]).startswith(b"\x89PNG")
    finally:
        s.close()


def test_every_client_gets_iopub_but_replies_go_to_the_asker(gateway, kernel):
    a, b = KernelSocket(gateway, kernel["id"]), KernelSocket(gateway, kernel["id"])
    try:
        status, model, _ = gateway.request("GET", f"/api/kernels/{kernel['id']}")
        assert model["connections"] == 2
        msg_id = a.send("execute_request", {"code": "print('to both')", "silent": False})
        reply, out_a = a.collect(msg_id)
        assert reply["status"] == "ok"
        # b sees the same iopub messages, and never a's reply.
        b.ws.settimeout(30)
        seen, idle = [], False
        while not idle:
            m = b.recv()
            assert m["channel"] == "iopub", m
            if m["parent_header"].get("msg_id") == msg_id:
                seen.append(m["msg_type"])
                idle = m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
        assert "stream" in seen and "execute_input" in seen
        # b's own request is answered to b only.
        msg_b = b.send("kernel_info_request", {})
        reply_b, _ = b.collect(msg_b)
        assert reply_b["implementation"] == "sandgate"
        msg_a = a.send("kernel_info_request", {})
        a.ws.settimeout(30)
        while True:
            m = a.recv()
            assert m["parent_header"].get("msg_id") != msg_b or m["channel"] == "iopub", "b's reply went to a"
            if m["msg_type"] == "kernel_info_reply" and m["parent_header"]["msg_id"] == msg_a:
                break
    finally:
        a.close()
        b.close()


def test_reconnecting_with_the_same_session_gets_missed_messages(gateway, kernel):
    session = str(uuid.uuid4())
    s = KernelSocket(gateway, kernel["id"], session_id=session)
    msg_id = s.send("execute_request", {"code": "import time\ntime.sleep(1)\nprint('while you were away')", "silent": False})
    # Leave as soon as the kernel has the request.
    while True:
        m = s.recv()
        if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg_id:
            break
    s.close()
    s2 = KernelSocket(gateway, kernel["id"], session_id=session)
    try:
        reply, out = s2.collect(msg_id)
        assert reply["status"] == "ok"
        assert any(m["msg_type"] == "stream" and "while you were away" in m["content"]["text"] for m in out)
    finally:
        s2.close()


def recv_until_closed(sock, timeout=20):
    """Reads `sock` until the gateway closes it; returns the close frame's (code, reason)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the gateway did not close the socket"
        sock.ws.settimeout(left)
        op, data = sock.ws.recv_data()
        if op == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big"), data[2:].decode()


def stdout_of(outputs):
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


# Jupyter Server's gateway client (JupyterLab's server in gateway mode) opens a gateway socket
# for each browser WebSocket on a kernel, all with the browser's session id. Chromium offers the
# v1 subprotocol first, which the gateway client refuses after its handler has already opened
# a gateway socket; Chromium drops that WebSocket and opens another without it. So every time
# JupyterLab connects to a kernel, the gateway sees two sockets of one session within a few
# milliseconds: one the gateway client abandons (closes, or when it had not finished
# connecting, leaves open and never reads), and the one it uses. Under load they can reach the
# gateway in either order. These tests play that dance with a plain client.

def test_a_later_socket_of_the_session_does_not_cut_off_the_one_in_use(gateway, kernel):
    session = str(uuid.uuid4())
    used = KernelSocket(gateway, kernel["id"], session_id=session)
    late = None
    try:
        reply, _ = used.collect(used.send("kernel_info_request", {}), timeout=30)
        assert reply["status"] == "ok"
        # The abandoned socket arrives last, and is never written to.
        late = KernelSocket(gateway, kernel["id"], session_id=session)
        reply, out = used.execute("print(6*7)", timeout=30)
        assert reply["status"] == "ok" and stdout_of(out) == "42\n"
        # Once the client spoke on `used`, the gateway closed the stale one, which got nothing.
        code, reason = recv_until_closed(late)
        assert code == 1001 and "another connection of this session" in reason, (code, reason)
        reply, out = used.execute("print(7*6)", timeout=30)
        assert stdout_of(out) == "42\n"
    finally:
        used.close()
        if late:
            late.close()


def test_a_request_sent_on_a_socket_being_closed_is_run_and_answered_on_the_session(gateway, kernel):
    session = str(uuid.uuid4())
    old = KernelSocket(gateway, kernel["id"], session_id=session)
    new = None
    try:
        old.collect(old.send("kernel_info_request", {}), timeout=30)
        new = KernelSocket(gateway, kernel["id"], session_id=session)
        # The client speaks on `new`: the gateway closes `old`...
        new.collect(new.send("kernel_info_request", {}), timeout=30)
        # ...but `old` has not read that close yet and sends a request, which must not be lost:
        # it runs, and its reply and output go to the session's socket in use.
        msg_id = old.send("execute_request", {"code": "print(6*7)", "silent": False, "store_history": True,
                                              "user_expressions": {}, "allow_stdin": False})
        reply, out = new.collect(msg_id, timeout=30)
        assert reply["status"] == "ok" and stdout_of(out) == "42\n"
        code, reason = recv_until_closed(old)
        assert code == 1001, (code, reason)
    finally:
        old.close()
        if new:
            new.close()


def test_what_an_abandoned_socket_took_goes_to_the_session_socket_in_use(gateway, kernel):
    session = str(uuid.uuid4())
    s = KernelSocket(gateway, kernel["id"], session_id=session)
    msg_id = s.send("execute_request", {"code": "import time\ntime.sleep(0.5)\nprint('while you were away')",
                                        "silent": False})
    while True:
        m = s.recv()
        if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg_id:
            break
    s.close()
    # Reconnecting: the abandoned socket comes first and alone, so it is handed what the session
    # missed (the gateway client's connection object reads it into a queue nobody looks at)...
    abandoned = KernelSocket(gateway, kernel["id"], session_id=session)
    used = None
    try:
        reply, _ = abandoned.collect(msg_id, timeout=30)
        assert reply["status"] == "ok"
        # ...and the socket the client uses comes next and speaks: it gets all of it again.
        used = KernelSocket(gateway, kernel["id"], session_id=session)
        used.send("kernel_info_request", {})
        reply, out = used.collect(msg_id, timeout=30)
        assert reply["status"] == "ok" and stdout_of(out) == "while you were away\n"
    finally:
        abandoned.close()
        if used:
            used.close()


def test_input_request_round_trip(gateway, kernel):
    s = KernelSocket(gateway, kernel["id"])
    try:
        msg_id = s.send("execute_request", {"code": "name = input('Name? ')\nprint('hello', name)",
                                            "silent": False, "allow_stdin": True})
        while True:
            m = s.recv()
            if m["msg_type"] == "input_request":
                assert m["channel"] == "stdin" and m["content"]["prompt"] == "Name? "
                break
        s.ws.send(json.dumps({"header": {"msg_id": str(uuid.uuid4()), "msg_type": "input_reply", "username": "t",
                                         "session": s.session, "date": "2026-01-01T00:00:00Z", "version": "5.3"},
                              "parent_header": m["header"], "metadata": {}, "content": {"value": "Ada"},
                              "channel": "stdin"}))
        reply, out = s.collect(msg_id)
        assert reply["status"] == "ok"
        assert "".join(o["content"]["text"] for o in out if o["msg_type"] == "stream") == "hello Ada\n"
    finally:
        s.close()


def test_token_in_query_works_for_the_websocket(gateway, kernel):
    s = KernelSocket(gateway, kernel["id"], headers={}, query=f"&token={gateway.token}")
    try:
        reply, _ = s.execute("1 + 1")
        assert reply["status"] == "ok"
    finally:
        s.close()


@pytest.mark.parametrize("headers,query,status", [
    ({}, "", 401),
    ({"Authorization": "token wrong"}, "", 401),
    ({}, "&token=wrong", 401),
])
def test_websocket_auth_failures(gateway, kernel, headers, query, status):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        KernelSocket(gateway, kernel["id"], headers=headers, query=query)
    assert e.value.status_code == status


def test_foreign_origin_is_refused(gateway, kernel):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        KernelSocket(gateway, kernel["id"], origin="https://evil.example")
    assert e.value.status_code == 403
    # Its own origin is fine.
    host = gateway.url.split("://", 1)[1]
    s = KernelSocket(gateway, kernel["id"], origin=f"http://{host}")
    s.close()


def test_unknown_kernel_websocket_is_404(gateway):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        KernelSocket(gateway, str(uuid.uuid4()))
    assert e.value.status_code == 404


def close_reason(s):
    """Reads until the server closes; returns (code, reason)."""
    s.ws.settimeout(30)
    while True:
        frame = s.ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            return int.from_bytes(data[:2], "big"), data[2:].decode()


@pytest.mark.parametrize("frame,code,words", [
    ("this is not json", 1007, "not a JSON object"),
    ("[1, 2, 3]", 1007, "not a JSON object"),
    (json.dumps({"header": {"msg_id": "x", "msg_type": "execute_request"}, "channel": "iopub"}), 1008, "unknown channel"),
    (json.dumps({"header": {"msg_type": "execute_request"}, "channel": "shell"}), 1008, "msg_id"),
    (json.dumps({"header": {"msg_id": "x", "msg_type": "execute_request"}, "content": [1], "channel": "shell"}), 1008, "content"),
])
def test_malformed_frames_close_with_a_clear_reason(gateway, kernel, frame, code, words):
    s = KernelSocket(gateway, kernel["id"])
    s.ws.send(frame)
    got_code, reason = close_reason(s)
    assert got_code == code and words in reason, (got_code, reason)
    # The kernel is unharmed.
    s2 = KernelSocket(gateway, kernel["id"])
    try:
        reply, _ = s2.execute("6 * 7")
        assert reply["status"] == "ok"
    finally:
        s2.close()


def test_malformed_v1_binary_frames(gateway, kernel):
    s = KernelSocket(gateway, kernel["id"], v1=True)
    s.ws.send_binary((1000).to_bytes(8, "little") + b"\x00" * 16)
    code, reason = close_reason(s)
    assert code in (1007, 1008) and reason
    s = KernelSocket(gateway, kernel["id"], v1=True)
    s.ws.send("text is not v1")
    code, reason = close_reason(s)
    assert code == 1008 and "binary" in reason
    s = KernelSocket(gateway, kernel["id"], v1=True)
    s.ws.send_binary(encode_v1("shell", [b"{not json", b"{}", b"{}", b"{}"]))
    code, reason = close_reason(s)
    assert code == 1007


def test_unknown_message_types_reach_the_kernel_and_are_ignored(gateway, kernel):
    s = KernelSocket(gateway, kernel["id"])
    try:
        s.send("made_up_request", {"x": 1})
        reply, _ = s.execute("'still fine'")
        assert reply["status"] == "ok"
    finally:
        s.close()


@pytest.mark.parametrize("v1", [False, True], ids=["legacy-json", "v1-binary"])
def test_messages_far_larger_than_one_socket_read_arrive_whole(gateway, kernel, v1):
    # The gateway reads a client's socket 16 KiB at a time: a message of several reads, between
    # small ones on the same socket, still arrives whole and in order.
    s = KernelSocket(gateway, kernel["id"], v1=v1)
    try:
        for size in (10, 3_000_000, 20_000, 16 * 1024, 5):
            reply, out = s.execute(f"x = '{'ab' * (size // 2)}'\nlen(x)")
            assert reply["status"] == "ok", reply
            result = [m for m in out if m["msg_type"] == "execute_result"]
            assert result[0]["content"]["data"]["text/plain"] == str(size // 2 * 2)
    finally:
        s.close()


def test_oversized_message_is_refused(start_gateway, tmp_path):
    config = tmp_path / "ws.toml"
    config.write_text("[http]\nmax_ws_message_bytes = 65536\n[kernels]\npool_size = 1\n")
    g = start_gateway(["--config", str(config)])
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    s.send("execute_request", {"code": "x = '" + "a" * 100_000 + "'", "silent": False})
    code, reason = close_reason(s)
    assert code == 1009, (code, reason)
    s2 = KernelSocket(g, k["id"])
    try:
        reply, _ = s2.execute("1")
        assert reply["status"] == "ok"
    finally:
        s2.close()


def test_messages_arrive_in_the_order_the_kernel_sent_them(gateway, kernel):
    # The kernel publishes a cell's output, then sends its reply on shell, then publishes idle.
    # Those are separate connections to the gateway; the WebSocket must still carry them in
    # that order, or a client that stops at the reply loses the output, and one that stops at
    # idle loses the reply. 60 cells, each with a stream, a result and a display: with one
    # reader per channel the reply overtook the output in most cells.
    s = KernelSocket(gateway, kernel["id"])
    try:
        code = "print('out')\ndisplay('shown')\n6 * 7"
        for _ in range(60):
            msg_id = s.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                                "user_expressions": {}, "allow_stdin": False})
            seen = []
            deadline = time.monotonic() + 30
            while not seen or seen[-1] != ("iopub", "status", "idle"):
                assert time.monotonic() < deadline, f"no idle for {msg_id}: {seen}"
                msg = s.recv()
                if msg["parent_header"].get("msg_id") == msg_id:
                    state = msg["content"].get("execution_state") if msg["msg_type"] == "status" else None
                    seen.append((msg["channel"], msg["msg_type"], state))
            assert [t for _, t, _ in seen] == ["status", "execute_input", "stream", "display_data",
                                               "execute_result", "execute_reply", "status"], seen
    finally:
        s.close()


def test_an_interrupt_reply_comes_before_its_idle(gateway, kernel):
    s = KernelSocket(gateway, kernel["id"])
    try:
        for _ in range(20):
            msg_id = s.send("interrupt_request", {}, channel="control")
            seen = []
            deadline = time.monotonic() + 30
            while not seen or seen[-1] != "idle":
                assert time.monotonic() < deadline, f"no idle for {msg_id}: {seen}"
                msg = s.recv()
                if msg["parent_header"].get("msg_id") == msg_id:
                    seen.append(msg["content"]["execution_state"] if msg["msg_type"] == "status"
                                else msg["msg_type"])
            assert seen == ["busy", "interrupt_reply", "idle"], seen
    finally:
        s.close()


def test_deep_recursion_with_a_raised_limit_answers_and_keeps_state(gateway, kernel):
    """A million Python frames, and recursion through C (a `sorted` key, `repr` of a nested
    list): each a RecursionError within 20 s, and the kernel keeps its variables."""
    s = KernelSocket(gateway, kernel["id"])
    try:
        s.execute("before = 'kept'")
        for code in ("import sys; sys.setrecursionlimit(10**6); f=lambda n: f(n+1); f(0)",
                     "def h(n):\n    return sorted([n], key=h)\nh(0)",
                     "nested = []\nfor _ in range(10**6):\n    nested = [nested]\nrepr(nested)"):
            t0 = time.monotonic()
            reply, out = s.execute(code, timeout=60)
            assert reply["status"] == "error" and reply["ename"] == "RecursionError", reply
            assert time.monotonic() - t0 < 20, code
            assert [m["content"]["ename"] for m in out if m["msg_type"] == "error"] == ["RecursionError"]
        reply, out = s.execute("before")
        assert result_text(out) == "'kept'"
    finally:
        s.close()
