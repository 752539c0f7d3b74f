"""Sandgate's MCP server, driven by the official MCP Python SDK (`mcp`, pinned in
requirements.txt) as Claude Code and Claude Desktop would use it: over Streamable HTTP at the
gateway's `/mcp`, and over stdio through `sandgate mcp` (a proxy to the same endpoint).

Plus hostile input sent by hand: malformed JSON-RPC, unknown methods, huge bodies, other
users' sessions and sandboxes."""

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import GATEWAY, TIMEOUT, TOKEN, start_multiuser_gateway

pytest.importorskip("mcp")
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

ALICE = "alice-" + "a3" * 16
BOB = "bob-" + "b4" * 16
MAX_BODY = 256 * 1024
TOOLS = {"run_code", "create_sandbox", "list_sandboxes", "kill_sandbox", "read_file", "write_file", "list_files"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gw(start_gateway, tmp_path_factory):
    """A gateway with two users besides the main token's, a small body limit, a warm pool."""
    return start_multiuser_gateway(start_gateway, tmp_path_factory.mktemp("mcp-users") / "users.toml",
                                   {"alice": ALICE, "bob": BOB},
                                   f"[kernels]\npool_size = 2\n[http]\nmax_body_bytes = {MAX_BODY}\n")


@contextlib.asynccontextmanager
async def connect(gw, transport, token=TOKEN, token_file=None):
    """An initialized MCP client on `gw` over `transport` ("http" or "stdio")."""
    if transport == "http":
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with create_mcp_http_client(headers=headers) as http:
            async with Client(streamable_http_client(gw.url + "/mcp", http_client=http)) as client:
                yield client
    else:
        env = {"SANDGATE_TOKEN": token} if token else {}
        args = ["mcp", "--url", gw.url] + (["--token-file", str(token_file)] if token_file else [])
        async with Client(StdioServerParameters(command=str(GATEWAY), args=args, env=env)) as client:
            yield client


def run(coro):
    """Runs one test's client code, bounded."""
    return asyncio.run(asyncio.wait_for(coro, 4 * TIMEOUT))


def leaf(e):
    """The one exception inside task groups' exception groups."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def texts(result):
    return "".join(c.text for c in result.content if c.type == "text")


def images(result):
    return [c for c in result.content if c.type == "image"]


def rpc(gw, body, token=TOKEN, session=None, headers=None, method="POST"):
    """One raw HTTP request to /mcp: (status, parsed JSON or None, headers)."""
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if session:
        h["Mcp-Session-Id"] = session
    h.update(headers or {})
    req = urllib.request.Request(gw.url + "/mcp", data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            status, raw, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), e.headers
    return status, (json.loads(raw) if raw else None), hdrs


def initialize(gw, token=TOKEN):
    """A session made by hand; returns its id."""
    status, body, hdrs = rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}},
        token=token)
    assert status == 200, body
    assert body["result"]["protocolVersion"] == "2025-06-18"
    return hdrs["Mcp-Session-Id"]


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_initialize_and_list_tools(gw, transport):
    async def main():
        async with connect(gw, transport) as c:
            assert c.server_info.name == "sandgate"
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(tools) == TOOLS
            for t in tools.values():
                assert len(t.description) > 40 and t.input_schema["type"] == "object"
            assert tools["run_code"].input_schema["required"] == ["code"]
            assert set(tools["run_code"].input_schema["properties"]) == {"code", "language", "sandbox_id", "timeout_s"}
    run(main())


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_run_code_keeps_state_and_returns_figures(gw, transport):
    async def main():
        async with connect(gw, transport) as c:
            r = await c.call_tool("run_code", {"code": "x = 41\nprint('hello')\nx + 1"})
            assert not r.is_error, r
            assert "hello\n" in texts(r) and "42" in texts(r)
            r = await c.call_tool("run_code", {"code": "import sys\nprint('warn', file=sys.stderr)\nx"})
            assert "41" in texts(r) and "[stderr]\nwarn" in texts(r)
            # Contexts start in the sandbox's home, as the E2B API's do.
            assert "'/home/user'" in texts(await c.call_tool("run_code", {"code": "import os\nos.getcwd()"}))
            r = await c.call_tool("run_code", {"code": (
                "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('mcp')\nplt.show()\nprint('drawn')")})
            assert not r.is_error, texts(r)
            [img] = images(r)
            assert img.mime_type == "image/png"
            assert base64.b64decode(img.data).startswith(PNG_MAGIC)
            assert "drawn" in texts(r)
    run(main())


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_errors_are_error_results(gw, transport):
    async def main():
        async with connect(gw, transport) as c:
            r = await c.call_tool("run_code", {"code": "def f():\n    return 1 / 0\nf()"})
            assert r.is_error
            t = texts(r)
            assert "ZeroDivisionError: division by zero" in t and "f()" in t and "\x1b[" not in t
            r = await c.call_tool("run_code", {"code": "console.log(1)", "language": "javascript"})
            assert r.is_error
            assert "javascript" in texts(r) and "Python only" in texts(r)
            r = await c.call_tool("run_code", {})
            assert r.is_error and "code" in texts(r)
            # Code that runs too long is interrupted; the sandbox and its state go on.
            await c.call_tool("run_code", {"code": "kept = 'yes'"})
            r = await c.call_tool("run_code", {"code": "import time\nprint('started', flush=True)\ntime.sleep(60)",
                                               "timeout_s": 2})
            assert r.is_error and "within 2 s" in texts(r) and "started" in texts(r)
            r = await c.call_tool("run_code", {"code": "kept"})
            assert not r.is_error and "yes" in texts(r)
            with pytest.raises(MCPError) as e:
                await c.call_tool("no_such_tool", {})
            assert "unknown tool" in str(e.value)
    run(main())


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_create_list_and_kill_sandboxes(gw, transport):
    async def main():
        async with connect(gw, transport) as c:
            await c.call_tool("run_code", {"code": "where = 'session'"})
            r = await c.call_tool("create_sandbox", {"timeout_s": 600})
            assert not r.is_error, texts(r)
            sid = r.structured_content["sandbox_id"]
            assert sid.startswith("sg") and sid in texts(r)
            await c.call_tool("run_code", {"code": "where = 'own'", "sandbox_id": sid})
            assert "own" in texts(await c.call_tool("run_code", {"code": "where", "sandbox_id": sid}))
            assert "session" in texts(await c.call_tool("run_code", {"code": "where"}))
            listed = (await c.call_tool("list_sandboxes", {})).structured_content["sandboxes"]
            by_id = {s["sandbox_id"]: s for s in listed}
            assert sid in by_id and not by_id[sid]["session_sandbox"]
            assert [s for s in listed if s["session_sandbox"]], listed
            # The E2B API sees the same registry.
            status, body, _ = gw.request("GET", "/v2/sandboxes")
            assert sid in [s["sandboxID"] for s in body], body
            r = await c.call_tool("kill_sandbox", {"sandbox_id": sid})
            assert not r.is_error, texts(r)
            listed = (await c.call_tool("list_sandboxes", {})).structured_content["sandboxes"]
            assert sid not in [s["sandbox_id"] for s in listed]
            r = await c.call_tool("run_code", {"code": "1", "sandbox_id": sid})
            assert r.is_error and "not found" in texts(r)
    run(main())


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_the_session_sandbox_ends_with_the_session(gw, transport):
    async def main():
        async with connect(gw, transport) as c:
            await c.call_tool("run_code", {"code": "1"})
            listed = (await c.call_tool("list_sandboxes", {})).structured_content["sandboxes"]
            [own] = [s["sandbox_id"] for s in listed if s["session_sandbox"]]
            status, body, _ = gw.request("GET", "/v2/sandboxes")
            assert own in [s["sandboxID"] for s in body]
        return own

    own = run(main())
    # The client ended its session (DELETE; the stdio proxy does it when stdin closes).
    status, body, _ = gw.request("GET", "/v2/sandboxes")
    assert status == 200 and own not in [s["sandboxID"] for s in body], body


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_workspace_files(gw, transport, tmp_path):
    async def main():
        async with connect(gw, transport) as c:
            r = await c.call_tool("write_file", {"path": f"mcp-{transport}/notes.txt", "content": "héllo\nworld\n"})
            assert not r.is_error, texts(r)
            r = await c.call_tool("read_file", {"path": f"/workspace/mcp-{transport}/notes.txt"})
            assert not r.is_error and texts(r) == "héllo\nworld\n"
            # Code sees the file, and what it writes is read back.
            r = await c.call_tool("run_code", {"code": (
                f"print(open('/workspace/mcp-{transport}/notes.txt').read().upper(), end='')\n"
                f"open('/workspace/mcp-{transport}/from_code.csv', 'w').write('a,b\\n1,2\\n')\n"
                "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\n"
                f"plt.savefig('/workspace/mcp-{transport}/plot.png')\nplt.close()")})
            assert not r.is_error and "HÉLLO" in texts(r), texts(r)
            r = await c.call_tool("read_file", {"path": f"mcp-{transport}/from_code.csv"})
            assert texts(r) == "a,b\n1,2\n"
            [img] = images(await c.call_tool("read_file", {"path": f"mcp-{transport}/plot.png"}))
            assert base64.b64decode(img.data).startswith(PNG_MAGIC)
            blob = bytes(range(256))
            r = await c.call_tool("write_file", {"path": f"mcp-{transport}/raw.bin",
                                                 "content": base64.b64encode(blob).decode(), "encoding": "base64"})
            assert not r.is_error, texts(r)
            r = await c.call_tool("read_file", {"path": f"mcp-{transport}/raw.bin"})
            [res] = [x for x in r.content if x.type == "resource"]
            assert base64.b64decode(res.resource.blob) == blob
            listed = (await c.call_tool("list_files", {"path": f"mcp-{transport}"})).structured_content
            names = {e["path"]: e for e in listed["entries"]}
            assert set(names) == {f"mcp-{transport}/{n}" for n in ("notes.txt", "from_code.csv", "plot.png", "raw.bin")}
            assert names[f"mcp-{transport}/raw.bin"]["size"] == 256
            top = (await c.call_tool("list_files", {})).structured_content["entries"]
            assert {"path": f"mcp-{transport}", "type": "directory"}.items() <= \
                [e for e in top if e["path"] == f"mcp-{transport}"][0].items()
            # Paths stay in the workspace.
            for bad in ("../outside.txt", "a/../../b", "/etc/passwd"):
                r = await c.call_tool("read_file", {"path": bad})
                assert r.is_error, bad
                r = await c.call_tool("write_file", {"path": bad, "content": "x"})
                assert r.is_error, bad
            r = await c.call_tool("read_file", {"path": "no/such/file"})
            assert r.is_error and "No such file" in texts(r)
        # Files outlive the session.
        async with connect(gw, transport) as c:
            r = await c.call_tool("read_file", {"path": f"mcp-{transport}/notes.txt"})
            assert texts(r) == "héllo\nworld\n"
    run(main())


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_wrong_and_missing_tokens_are_refused(gw, transport, tmp_path):
    async def refused(token):
        with pytest.raises(Exception) as e:
            async with connect(gw, transport, token=token) as c:
                await c.list_tools()
        return leaf(e.value)

    if transport == "http":
        for token in ("wrong-token", None):
            e = run(refused(token))
            assert isinstance(e, MCPError) and "token" in str(e), repr(e)
    else:
        e = run(refused("wrong-token"))
        assert isinstance(e, MCPError) and "token" in str(e), repr(e)
        # Without a token the proxy does not start.
        p = subprocess.run([str(GATEWAY), "mcp", "--url", gw.url], input="", capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"]}, timeout=TIMEOUT)
        assert p.returncode != 0 and "SANDGATE_TOKEN" in p.stderr and p.stdout == ""
        # A token file works.
        f = tmp_path / "token"
        f.write_text(TOKEN + "\n")

        async def with_file():
            async with connect(gw, transport, token=None, token_file=f) as c:
                return texts(await c.call_tool("run_code", {"code": "6 * 7"}))
        assert "42" in run(with_file())


def test_another_users_sandboxes_and_sessions_are_refused(gw):
    async def main():
        async with connect(gw, "http", token=ALICE) as alice:
            sid = (await alice.call_tool("create_sandbox", {})).structured_content["sandbox_id"]
            await alice.call_tool("run_code", {"code": "secret = 'alice'", "sandbox_id": sid})
            async with connect(gw, "stdio", token=BOB) as bob:
                r = await bob.call_tool("run_code", {"code": "secret", "sandbox_id": sid})
                assert r.is_error and "not found" in texts(r) and "alice" not in texts(r)
                r = await bob.call_tool("kill_sandbox", {"sandbox_id": sid})
                assert r.is_error and "not found" in texts(r)
                listed = (await bob.call_tool("list_sandboxes", {})).structured_content["sandboxes"]
                assert sid not in [s["sandbox_id"] for s in listed]
                await bob.call_tool("write_file", {"path": "whose.txt", "content": "bob's"})
            await alice.call_tool("write_file", {"path": "whose.txt", "content": "alice's"})
            assert "alice" in texts(await alice.call_tool("run_code", {"code": "secret", "sandbox_id": sid}))
            # Each user has a workspace of their own.
            assert texts(await alice.call_tool("read_file", {"path": "whose.txt"})) == "alice's"
            async with connect(gw, "http", token=BOB) as bob:
                assert texts(await bob.call_tool("read_file", {"path": "whose.txt"})) == "bob's"
            await alice.call_tool("kill_sandbox", {"sandbox_id": sid})
    run(main())
    # A session id is refused with another user's token, as if it did not exist.
    session = initialize(gw, token=ALICE)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_sandboxes", "arguments": {}}}
    status, body, _ = rpc(gw, call, token=BOB, session=session)
    assert status == 404 and body["error"]["code"] == -32002, body
    status, _, _ = rpc(gw, None, token=BOB, session=session, method="DELETE")
    assert status == 404
    status, body, _ = rpc(gw, call, token=ALICE, session=session)
    assert status == 200 and "sandboxes" in body["result"]["structuredContent"], body
    status, _, _ = rpc(gw, None, token=ALICE, session=session, method="DELETE")
    assert status == 204
    status, body, _ = rpc(gw, call, token=ALICE, session=session)
    assert status == 404


def test_hostile_input_gets_json_rpc_errors(gw):
    session = initialize(gw)

    def error(status, body, code, expected_status):
        assert status == expected_status, (status, body)
        assert body["jsonrpc"] == "2.0" and body["error"]["code"] == code, body
        assert body["error"]["message"]
        return body["error"]["message"]

    error(*rpc(gw, b"{not json", session=session)[:2], -32700, 400)
    error(*rpc(gw, b"", session=session)[:2], -32700, 400)
    error(*rpc(gw, b"\xff\xfe", session=session)[:2], -32700, 400)
    error(*rpc(gw, [{"jsonrpc": "2.0", "id": 1, "method": "ping"}], session=session)[:2], -32600, 400)
    error(*rpc(gw, {"id": 1, "method": "ping"}, session=session)[:2], -32600, 400)
    error(*rpc(gw, {"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}, session=session)[:2], -32600, 400)
    error(*rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": ["x"]}, session=session)[:2], -32600, 400)
    error(*rpc(gw, "just a string", session=session)[:2], -32600, 400)
    msg = error(*rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": "no/such/method"}, session=session)[:2], -32601, 200)
    assert "no/such/method" in msg
    msg = error(*rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": "rm_rf", "arguments": {}}}, session=session)[:2], -32602, 200)
    assert "rm_rf" in msg
    error(*rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "run_code", "arguments": [1]}}, session=session)[:2], -32602, 200)
    error(*rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, session=session)[:2], -32602, 200)
    # A body over the gateway's limit.
    huge = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                       "params": {"name": "run_code", "arguments": {"code": "#" * (MAX_BODY + 1)}}}).encode()
    msg = error(*rpc(gw, huge, session=session)[:2], -32600, 413)
    assert str(MAX_BODY) in msg
    # Sessions and versions.
    ping = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
    error(*rpc(gw, ping)[:2], -32600, 400)
    error(*rpc(gw, ping, session="0" * 32)[:2], -32002, 404)
    error(*rpc(gw, ping, session=session, headers={"MCP-Protocol-Version": "1999-01-01"})[:2], -32600, 400)
    error(*rpc(gw, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})[:2], -32602, 200)
    error(*rpc(gw, ping, session=session, headers={"Accept": "text/event-stream"})[:2], -32600, 406)
    error(*rpc(gw, ping, session=session, headers={"Content-Type": "text/plain"})[:2], -32600, 415)
    # No GET stream is offered; other methods are refused too.
    for method in ("GET", "PUT"):
        status, body, hdrs = rpc(gw, None, session=session, method=method)
        assert status == 405 and hdrs["Allow"] == "POST, DELETE" and body["error"]["code"] == -32600
    # Notifications and responses are acknowledged without a body.
    status, body, _ = rpc(gw, {"jsonrpc": "2.0", "method": "notifications/whatever"}, session=session)
    assert status == 202 and body is None
    status, body, _ = rpc(gw, {"jsonrpc": "2.0", "id": 5, "result": {}}, session=session)
    assert status == 202
    # The session and the gateway still serve.
    status, body, _ = rpc(gw, ping, session=session)
    assert status == 200 and {t["name"] for t in body["result"]["tools"]} == TOOLS
    assert gw.request("GET", "/api/kernels")[0] == 200


def test_stdio_writes_only_protocol(gw):
    """Garbage on stdin gets a JSON-RPC error line; every stdout line is JSON-RPC."""
    p = subprocess.Popen([str(GATEWAY), "mcp", "--url", gw.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={"PATH": os.environ["PATH"], "SANDGATE_TOKEN": TOKEN})
    lines = [
        "{oops",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        "",
        json.dumps({"jsonrpc": "2.0", "id": "two", "method": "tools/call",
                    "params": {"name": "run_code", "arguments": {"code": "print('out')\n'v'"}}}),
    ]
    out, err = p.communicate("\n".join(lines) + "\n", timeout=4 * TIMEOUT)
    assert p.returncode == 0, err
    messages = [json.loads(line) for line in out.splitlines()]
    assert all(m["jsonrpc"] == "2.0" for m in messages), out
    by_id = {m.get("id"): m for m in messages}
    assert by_id[None]["error"]["code"] == -32700
    assert by_id[1]["result"]["serverInfo"]["name"] == "sandgate"
    assert by_id[1]["result"]["protocolVersion"] == "2025-11-25"
    result = by_id["two"]["result"]
    assert not result["isError"] and "out" in json.dumps(result["content"]) and "'v'" in json.dumps(result["content"])
    assert len(messages) == 3, out


def test_a_cancelled_call_is_interrupted(gw):
    """`notifications/cancelled` stops a running call: its code is interrupted at once and the
    session's sandbox keeps its state."""
    import threading
    import time
    session = initialize(gw)

    def call(i, code, **args):
        return rpc(gw, {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                        "params": {"name": "run_code", "arguments": {"code": code, **args}}}, session=session)

    assert call(1, "state = 'kept'")[0] == 200
    got = {}
    code = "open('/workspace/cancel-marker', 'w').write('running')\nimport time\ntime.sleep(120)"
    t = threading.Thread(target=lambda: got.setdefault("r", call(2, code)))
    started = time.monotonic()
    t.start()
    # Cancel once the code runs: it has written its marker into the workspace.
    deadline = time.monotonic() + TIMEOUT
    while gw.request("GET", "/api/contents/cancel-marker")[0] != 200:
        assert time.monotonic() < deadline, "the code did not start"
        time.sleep(0.05)
    status, _, _ = rpc(gw, {"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": 2, "reason": "test"}}, session=session)
    assert status == 202
    t.join(TIMEOUT)
    status, body, _ = got["r"]
    assert body["error"]["code"] == -32800, body
    assert time.monotonic() - started < 60
    status, body, _ = call(3, "state")
    assert "kept" in json.dumps(body["result"]["content"]), body


def test_the_stdio_proxy_replaces_a_lost_session(gw):
    """When the gateway no longer has the proxy's session (here: displaced by newer ones of the
    same user), the call that finds out gets an error saying so, and the next call works."""

    async def main():
        async with connect(gw, "stdio", token=BOB) as c:
            await c.call_tool("run_code", {"code": "v = 1"})
            sessions = [initialize(gw, token=BOB) for _ in range(64)]
            with pytest.raises(MCPError) as e:
                await c.call_tool("run_code", {"code": "v"})
            assert "no longer had this MCP session" in str(e.value) and "run the call again" in str(e.value)
            r = await c.call_tool("run_code", {"code": "'again'"})
            assert not r.is_error and "again" in texts(r)
            for s in sessions:
                rpc(gw, None, token=BOB, session=s, method="DELETE")
    run(main())
