"""E2B's SDKs (`e2b-code-interpreter`, `e2b`; pinned in requirements.txt), unmodified, against
Sandgate's E2B-compatible API, configured only by environment variables:

    E2B_API_URL=<gateway> E2B_SANDBOX_URL=<gateway> E2B_API_KEY=<sandgate token>
"""

import asyncio
import gzip
import hashlib
import io
import json
import os
import pathlib
import struct
import threading
import time
import urllib.parse
import uuid

import pytest

from conftest import TOKEN, start_multiuser_gateway

e2b_ci = pytest.importorskip("e2b_code_interpreter")
import e2b  # noqa: E402

ALICE = "alice-" + "a1" * 16
BOB = "bob-" + "b2" * 16


@pytest.fixture(scope="module")
def gw(start_gateway, tmp_path_factory):
    """A gateway with two users besides the main token's, and a warm pool."""
    return start_multiuser_gateway(start_gateway, tmp_path_factory.mktemp("e2b-users") / "users.toml",
                                   {"alice": ALICE, "bob": BOB}, "[kernels]\npool_size = 2\n")


@pytest.fixture
def sdk_env(gw, monkeypatch):
    """The two URL variables and the key, as an agent builder sets them."""
    monkeypatch.setenv("E2B_API_URL", gw.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", gw.url)
    monkeypatch.setenv("E2B_API_KEY", TOKEN)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    return gw


def test_run_code_keeps_state_and_returns_results(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        assert sbx.sandbox_id.startswith("sg") and len(sbx.sandbox_id) == 34
        first = sbx.run_code("x = 41\nx + 1")
        assert first.text == "42"
        assert first.error is None
        second = sbx.run_code("print('hi'); import sys; print('oops', file=sys.stderr); x")
        assert second.logs.stdout == ["hi\n"]
        assert second.logs.stderr == ["oops\n"]
        assert second.text == "41"
        assert second.execution_count == first.execution_count + 1
        assert sbx.is_running()
    # Leaving the block killed it.
    assert sbx.sandbox_id not in [s.sandbox_id for s in e2b_ci.Sandbox.list().next_items()]


def test_errors_carry_name_value_and_a_plain_traceback(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        seen = []
        ex = sbx.run_code("def f():\n    return 1/0\nf()", on_error=seen.append)
        assert ex.error.name == "ZeroDivisionError"
        assert ex.error.value == "division by zero"
        assert "f()" in ex.error.traceback and "\x1b[" not in ex.error.traceback
        assert seen and seen[0].name == "ZeroDivisionError"
        # The sandbox goes on after an error.
        assert sbx.run_code("2 * 21").text == "42"


def test_callbacks_arrive_while_a_long_cell_runs(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        arrivals = []
        code = "import time\nprint('start', flush=True)\ntime.sleep(2)\nprint('end')"
        ex = sbx.run_code(code, on_stdout=lambda m: arrivals.append((time.monotonic(), m.line)))
        done = time.monotonic()
        assert [line for _, line in arrivals] == ["start\n", "end\n"]
        # The first line came while the cell was still sleeping, not with its end.
        assert done - arrivals[0][0] >= 1.5, (done, arrivals)
        assert ex.logs.stdout == ["start\n", "end\n"]


def test_display_outputs_and_rich_results(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        ex = sbx.run_code(
            "from IPython.display import display, HTML, Markdown\n"
            "display(HTML('<b>bold</b>'))\ndisplay(Markdown('# title'))\n'text'")
        kinds = [(r.is_main_result, r.html, r.markdown, r.text) for r in ex.results]
        assert (False, "<b>bold</b>", None) in [k[:3] for k in kinds]
        assert any(r.markdown == "# title" for r in ex.results)
        assert ex.text == "text"


def test_a_timeout_interrupts_the_code_and_the_sandbox_goes_on(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        sbx.run_code("n = 0")
        with pytest.raises(e2b.TimeoutException):
            sbx.run_code("while True:\n    n += 1", timeout=2)
        # The client went away; the loop was interrupted, so the next cell runs at once.
        started = time.monotonic()
        ex = sbx.run_code("n > 0")
        assert ex.text == "True"
        assert time.monotonic() - started < 10


def test_environment_of_the_sandbox_and_of_one_run(sdk_env):
    with e2b_ci.Sandbox.create(envs={"GREETING": "hello"}) as sbx:
        assert sbx.run_code("import os; os.environ['GREETING']").text == "hello"
        ex = sbx.run_code("os.environ.get('ONCE')", envs={"ONCE": "yes"})
        assert ex.text == "yes"
        assert sbx.run_code("os.environ.get('ONCE')").text is None or \
            sbx.run_code("repr(os.environ.get('ONCE'))").text == "None"
        # Nothing of the gateway's own environment is in the sandbox.
        assert sbx.run_code("'E2B_API_KEY' in os.environ or 'SANDGATE_TOKEN' in os.environ").text == "False"


def test_contexts_are_separate_interpreters(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        sbx.run_code("where = 'default'")
        ctx = sbx.create_code_context()
        assert ctx.language == "python"
        assert sbx.run_code("where = 'ctx'", context=ctx).error is None
        assert sbx.run_code("where").text == "default"
        assert sbx.run_code("where", context=ctx).text == "ctx"
        ids = [c.id for c in sbx.list_code_contexts()]
        assert ctx.id in ids and len(ids) == 2
        sbx.restart_code_context(ctx)
        ex = sbx.run_code("where", context=ctx)
        assert ex.error is not None and ex.error.name == "NameError"
        sbx.remove_code_context(ctx)
        assert [c.id for c in sbx.list_code_contexts()] == [i for i in ids if i != ctx.id]
        with pytest.raises(Exception, match="both"):
            sbx.run_code("1", language="python", context=ctx)


def test_other_languages_get_a_clear_error(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        with pytest.raises(e2b.SandboxException, match="Python only"):
            sbx.run_code("console.log(1)", language="javascript")


def test_control_plane_info_list_timeout_connect(sdk_env):
    sbx = e2b_ci.Sandbox.create(metadata={"job": "etl", "n": "1"}, timeout=60)
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata == {"job": "etl", "n": "1"}
        assert 50 <= (info.end_at - info.started_at).total_seconds() <= 61
        sbx.set_timeout(600)
        assert (sbx.get_info().end_at - info.started_at).total_seconds() >= 590
        listed = e2b_ci.Sandbox.list(query=e2b.SandboxQuery(metadata={"job": "etl"})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        assert e2b_ci.Sandbox.list(query=e2b.SandboxQuery(metadata={"job": "other"})).next_items() == []
        again = e2b_ci.Sandbox.connect(sbx.sandbox_id)
        assert again.run_code("1 + 1").text == "2"
        with pytest.raises(Exception, match="not supported"):
            sbx.pause()
    finally:
        assert sbx.kill() is True
    assert e2b_ci.Sandbox.kill(sbx.sandbox_id) is False


def test_list_pages_through_many_sandboxes(sdk_env):
    made = [e2b_ci.Sandbox.create(metadata={"page": "yes"}) for _ in range(3)]
    try:
        paginator = e2b_ci.Sandbox.list(query=e2b.SandboxQuery(metadata={"page": "yes"}), limit=2)
        seen = paginator.next_items()
        assert len(seen) == 2 and paginator.has_next
        seen += paginator.next_items()
        assert not paginator.has_next
        assert sorted(s.sandbox_id for s in seen) == sorted(s.sandbox_id for s in made)
    finally:
        for s in made:
            s.kill()


def test_a_sandbox_dies_at_its_timeout(sdk_env):
    sbx = e2b_ci.Sandbox.create(timeout=2)
    assert sbx.run_code("1").text == "1"
    deadline = time.monotonic() + 30
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sbx.is_running()
    with pytest.raises(Exception):
        sbx.run_code("1")


def test_unknown_template_lists_the_templates(sdk_env):
    with pytest.raises(Exception, match="code-interpreter-v1"):
        e2b_ci.Sandbox.create(template="no-such-template")


def test_wrong_and_missing_keys_are_refused(sdk_env, monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "wrong-key")
    with pytest.raises(e2b.AuthenticationException):
        e2b_ci.Sandbox.create()
    monkeypatch.delenv("E2B_API_KEY")
    with pytest.raises(e2b.AuthenticationException):
        e2b_ci.Sandbox.create()


def test_another_users_sandbox_is_not_found(sdk_env, monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", ALICE)
    sbx = e2b_ci.Sandbox.create()
    try:
        monkeypatch.setenv("E2B_API_KEY", BOB)
        with pytest.raises(e2b.NotFoundException):
            e2b_ci.Sandbox.connect(sbx.sandbox_id)
        assert e2b_ci.Sandbox.kill(sbx.sandbox_id) is False
        assert sbx.sandbox_id not in [s.sandbox_id for s in e2b_ci.Sandbox.list().next_items()]
        # The data plane needs the sandbox's own token, which only its creator got.
        status, body, _ = sdk_env.request(
            "POST", "/execute", {"code": "1"}, token=BOB,
            headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"})
        assert status == 401, body
        # Its owner still uses it.
        assert sbx.run_code("'mine'").text == "mine"
    finally:
        monkeypatch.setenv("E2B_API_KEY", ALICE)
        sbx.kill()


def test_twenty_sandboxes_in_parallel_keep_their_own_state(sdk_env):
    n = 20
    results, errors = [None] * n, []

    def agent(i):
        try:
            with e2b_ci.Sandbox.create() as sbx:
                sbx.run_code(f"mine = {i}")
                out = []
                ex = sbx.run_code("import time\nfor k in range(3):\n    print(mine, k)\n    time.sleep(0.05)\nmine * 2",
                                  on_stdout=lambda m: out.append(m.line))
                results[i] = (ex.text, out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, (text, out) in enumerate(results):
        assert text == str(i * 2)
        # The kernel may batch lines printed close together into one stream message.
        assert "".join(out) == "".join(f"{i} {k}\n" for k in range(3))


def test_the_async_sdk(sdk_env):
    async def main():
        sbx = await e2b_ci.AsyncSandbox.create()
        try:
            got = []
            ex = await sbx.run_code("print('a'); 6 * 7", on_stdout=lambda m: got.append(m.line))
            assert ex.text == "42" and got == ["a\n"]
            ctx = await sbx.create_code_context()
            assert (await sbx.run_code("'in ctx'", context=ctx)).text == "in ctx"
            assert await sbx.is_running()
        finally:
            assert await sbx.kill()

    asyncio.run(main())


# --- envd: a sandbox's files, its home, and commands ---------------------------------------------

ENVD = "49983"


def envd_headers(sbx):
    """What the SDK sends on its envd calls: the sandbox id and its access token."""
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": ENVD, "X-Access-Token": sbx._envd_access_token}


def host_home(gw, sbx):
    """The host folder that is the sandbox's /home/user, found by a marker file."""
    marker = f".marker-{uuid.uuid4().hex}"
    sbx.files.write(f"/home/user/{marker}", b"")
    found = list((gw.data_dir / "homes").glob(f"*/*/{marker}"))
    assert len(found) == 1, found
    (found[0]).unlink()
    return found[0].parent


def test_files_round_trip_str_bytes_and_10_mb(sdk_env):
    big = os.urandom(10 << 20)
    with e2b_ci.Sandbox.create() as sbx:
        info = sbx.files.write("/home/user/hello.txt", "héllo\n")
        assert (info.name, info.path, info.type) == ("hello.txt", "/home/user/hello.txt", e2b.FileType.FILE)
        assert sbx.files.read("/home/user/hello.txt") == "héllo\n"
        # A relative path is in the home folder, as envd has it.
        sbx.files.write("rel/b.bin", b"\x00\xffbytes")
        assert sbx.files.read("/home/user/rel/b.bin", format="bytes") == bytearray(b"\x00\xffbytes")
        sbx.files.write("/home/user/big.bin", big)
        assert bytes(sbx.files.read("/home/user/big.bin", format="bytes")) == big
        streamed = b"".join(sbx.files.read("/home/user/big.bin", format="stream"))
        assert hashlib.sha256(streamed).digest() == hashlib.sha256(big).digest()
        # File-like data goes as a raw octet-stream body; gzip too.
        sbx.files.write("/home/user/stream.bin", io.BytesIO(big[:3 << 20]))
        assert bytes(sbx.files.read("/home/user/stream.bin", format="bytes")) == big[:3 << 20]
        sbx.files.write("/home/user/zipped.txt", "z" * 100_000, gzip=True)
        assert sbx.files.read("/home/user/zipped.txt") == "z" * 100_000
        # Several files at once, in one multipart body.
        infos = sbx.files.write_files([{"path": "/home/user/m1.txt", "data": "one"},
                                       {"path": "/workspace/" + (ws := f"m2-{uuid.uuid4().hex}.txt"), "data": b"two"}])
        assert [i.path for i in infos] == ["/home/user/m1.txt", f"/workspace/{ws}"]
        assert sbx.files.read("/home/user/m1.txt") == "one" and sbx.files.read(f"/workspace/{ws}") == "two"
        # The file the code sees is the one written.
        assert sbx.run_code("import hashlib\nhashlib.sha256(open('/home/user/big.bin','rb').read()).hexdigest()").text \
            == hashlib.sha256(big).hexdigest()
        with pytest.raises(e2b.FileNotFoundException):
            sbx.files.read("/home/user/missing.txt")


def test_the_async_sdk_reads_and_writes_files(sdk_env):
    big = os.urandom(10 << 20)

    async def main():
        sbx = await e2b_ci.AsyncSandbox.create()
        try:
            await sbx.files.write("/home/user/a.txt", "async text")
            assert await sbx.files.read("/home/user/a.txt") == "async text"
            await sbx.files.write("/home/user/big.bin", big)
            assert bytes(await sbx.files.read("/home/user/big.bin", format="bytes")) == big
            assert await sbx.files.exists("/home/user/a.txt")
            assert [e.name for e in await sbx.files.list("/home/user")] == ["a.txt", "big.bin"]
            with pytest.raises(e2b.SandboxException, match="no shell"):
                await sbx.commands.run("ls")
        finally:
            await sbx.kill()

    asyncio.run(main())


def test_code_and_files_share_the_home_folder_and_workspace(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        # Contexts start in the home folder, which is $HOME.
        ex = sbx.run_code("import os\nopen('made.txt', 'w').write('by code')\n[os.getcwd(), os.environ['HOME']]")
        assert ex.text == "['/home/user', '/home/user']", ex
        assert sbx.files.read("/home/user/made.txt") == "by code"
        sbx.files.write("/home/user/given.txt", "by files")
        assert sbx.run_code("open('given.txt').read()").text == "by files"
        name = f"shared-{uuid.uuid4().hex}.txt"
        sbx.run_code(f"open('/workspace/{name}', 'w').write('ws by code')")
        assert sbx.files.read(f"/workspace/{name}") == "ws by code"
        sbx.files.write(f"/workspace/{name}", "ws by files")
        assert sbx.run_code(f"open('/workspace/{name}').read()").text == "ws by files"


def test_workspace_files_outlive_the_sandbox_and_home_files_do_not(sdk_env):
    name = f"keep-{uuid.uuid4().hex}.txt"
    with e2b_ci.Sandbox.create() as sbx:
        sbx.files.write(f"/workspace/{name}", "kept")
        sbx.files.write("/home/user/gone.txt", "gone")
        # In the encrypted store before the write answered: the Contents API reads the store.
        status, model, _ = sdk_env.request("GET", f"/api/contents/{name}?content=1")
        assert status == 200 and model["content"] == "kept", model
    with e2b_ci.Sandbox.create() as fresh:
        assert fresh.files.read(f"/workspace/{name}") == "kept"
        assert not fresh.files.exists("/home/user/gone.txt")
        assert fresh.files.list("/home/user") == []
        fresh.files.remove(f"/workspace/{name}")
    # Removed from the store too.
    status, _, _ = sdk_env.request("GET", f"/api/contents/{name}")
    assert status == 404


def test_the_home_folder_is_removed_when_the_sandbox_ends(sdk_env):
    sbx = e2b_ci.Sandbox.create()
    home = host_home(sdk_env, sbx)
    sbx.files.write("/home/user/x.txt", "x")
    assert (home / "x.txt").read_text() == "x"
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    sbx.kill()
    deadline = time.monotonic() + 30
    while home.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not home.exists()


def test_list_exists_info_make_dir_remove_rename(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        assert sbx.files.make_dir("/home/user/d/e")
        assert not sbx.files.make_dir("/home/user/d")  # exists already
        sbx.files.write("/home/user/d/e/f.txt", "12345")
        sbx.files.write("/home/user/d/g.txt", "")
        top = sbx.files.list("/home/user/d")
        assert [(e.name, e.type) for e in top] == [("e", e2b.FileType.DIR), ("g.txt", e2b.FileType.FILE)]
        deep = sbx.files.list("/home/user/d", depth=2)
        assert [e.path for e in deep] == ["/home/user/d/e", "/home/user/d/e/f.txt", "/home/user/d/g.txt"]
        info = sbx.files.get_info("/home/user/d/e/f.txt")
        assert (info.name, info.size, info.type, info.path) == ("f.txt", 5, e2b.FileType.FILE, "/home/user/d/e/f.txt")
        assert info.permissions.startswith("-rw") and info.owner == "user"
        assert abs((info.modified_time.timestamp() - time.time())) < 600
        assert sbx.files.get_info("/home/user").type == e2b.FileType.DIR
        assert sbx.files.exists("/home/user/d/g.txt") and not sbx.files.exists("/home/user/nope")
        moved = sbx.files.rename("/home/user/d/e/f.txt", "/home/user/moved/f2.txt")
        assert moved.path == "/home/user/moved/f2.txt"
        assert sbx.files.read("/home/user/moved/f2.txt") == "12345"
        sbx.files.remove("/home/user/d")
        assert not sbx.files.exists("/home/user/d/g.txt")
        with pytest.raises(e2b.FileNotFoundException):
            sbx.files.remove("/home/user/d")
        with pytest.raises(e2b.FileNotFoundException):
            sbx.files.list("/home/user/nope")
        # The same in the workspace, saved to the store.
        folder = f"dir-{uuid.uuid4().hex}"
        assert sbx.files.make_dir(f"/workspace/{folder}/sub")
        sbx.files.write(f"/workspace/{folder}/sub/a.txt", "a")
        sbx.files.rename(f"/workspace/{folder}/sub/a.txt", f"/workspace/{folder}/b.txt")
        status, model, _ = sdk_env.request("GET", f"/api/contents/{folder}/b.txt?content=1")
        assert status == 200 and model["content"] == "a"
        assert sbx.run_code(f"open('/workspace/{folder}/b.txt').read()").text == "a"
        sbx.files.remove(f"/workspace/{folder}")
        assert sdk_env.request("GET", f"/api/contents/{folder}")[0] == 404
        # Moving between the two places is refused with a reason.
        with pytest.raises(e2b.InvalidArgumentException, match="different places"):
            sbx.files.rename("/home/user/moved/f2.txt", "/workspace/f2.txt")


def test_contexts_share_the_home_folder_until_the_sandbox_ends(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        home = host_home(sdk_env, sbx)
        ctx = sbx.create_code_context()
        assert ctx.cwd == "/home/user"
        assert sbx.run_code("import os\nopen('from-ctx.txt', 'w').write('c')\nos.getcwd()", context=ctx).text == "/home/user"
        assert sbx.run_code("open('/home/user/from-ctx.txt').read()").text == "c"
        assert sbx.files.read("/home/user/from-ctx.txt") == "c"
        # Restarts keep the home; a context's end does not remove it.
        sbx.restart_code_context(ctx)
        assert sbx.run_code("open('from-ctx.txt').read()", context=ctx).text == "c"
        sbx.remove_code_context(ctx)
        default = sbx.list_code_contexts()[0]
        sbx.restart_code_context(default)
        assert sbx.run_code("import os\n(os.getcwd(), open('from-ctx.txt').read())").text == "('/home/user', 'c')"
        assert (home / "from-ctx.txt").exists()


def test_commands_run_raises_a_clear_error(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        with pytest.raises(e2b.SandboxException) as raised:
            sbx.commands.run("ls -la")
        message = str(raised.value)
        assert "no shell" in message and "Linux sandbox tier with Bash" in message, message
        with pytest.raises(e2b.SandboxException, match="no shell"):
            sbx.commands.run("sleep 10", background=True)
        with pytest.raises(e2b.SandboxException, match="no shell"):
            sbx.commands.list()
        # The sandbox goes on.
        assert sbx.run_code("1 + 1").text == "2"


# --- envd: hostile input ------------------------------------------------------------------------

def envd(gw, sbx, method, path, body=None, content_type="application/json", extra=None):
    """A raw envd request: (status, parsed JSON or bytes)."""
    import urllib.error
    import urllib.request
    headers = {**envd_headers(sbx), "Content-Type": content_type, **(extra or {})}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    if body is None and method == "POST":
        body = b""
    req = urllib.request.Request(gw.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, payload, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, payload, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    # Connect's streams are envelopes (`application/connect+json`): left as bytes.
    if ctype.split(";")[0].strip() == "application/json":
        payload = json.loads(payload)
    return status, payload


def envelope(flags, data, length=None):
    return bytes([flags]) + struct.pack(">I", len(data) if length is None else length) + data


OUTSIDE = ["/etc/passwd", "../../etc/passwd", "/home/user/../../etc/passwd", "/workspace/../../etc/shadow",
           "%2e%2e/%2e%2e/etc/passwd", "/proc/self/environ", "/", "/home", "/tmp"]


def test_envd_paths_outside_the_sandbox_are_refused_everywhere(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        for path in OUTSIDE:
            q = urllib.parse.quote(path, safe="%/")
            status, body = envd(sdk_env, sbx, "GET", f"/files?path={q}")
            assert status == 403 and body["code"] == 403 and "outside this sandbox" in body["message"], (path, body)
            status, body = envd(sdk_env, sbx, "POST", f"/files?path={q}", b"x", "application/octet-stream")
            assert status == 403, (path, body)
            if "%" in path:
                continue  # Percent-encoding is the query's; in a JSON message it is a name.
            for method, request in [("Stat", {"path": path}), ("ListDir", {"path": path, "depth": 1}),
                                    ("MakeDir", {"path": path + "/new"}), ("Remove", {"path": path}),
                                    ("Move", {"source": path, "destination": "/home/user/x"}),
                                    ("Move", {"source": "/home/user", "destination": path})]:
                status, body = envd(sdk_env, sbx, "POST", f"/filesystem.Filesystem/{method}", request)
                assert status == 403 and body["code"] == "permission_denied", (method, path, body)
        assert not os.path.exists("/etc/new") and not os.path.exists("/x")
        # Through the SDK: an error, never the host's file.
        with pytest.raises(e2b.SandboxException, match="outside this sandbox"):
            sbx.files.read("/etc/passwd")
        with pytest.raises(e2b.SandboxException, match="outside this sandbox"):
            sbx.files.write("../../../etc/sandgate-escape", "x")
        assert not os.path.exists("/etc/sandgate-escape")
        # Malformed paths are invalid arguments.
        status, body = envd(sdk_env, sbx, "POST", "/filesystem.Filesystem/Stat", {"path": "/home/user/a\nb"})
        assert status == 400 and body["code"] == "invalid_argument", body
        # And the sandbox serves on.
        sbx.files.write("ok.txt", "fine")
        assert sbx.files.read("ok.txt") == "fine"


def test_envd_never_follows_a_symlink_out_of_the_sandbox(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        secret = pathlib.Path(sdk_env.data_dir) / f"host-secret-{uuid.uuid4().hex}"
        secret.write_text("host secret")
        # The guest plants what WASI lets it; the host side plants the rest in the same folders.
        planted = sbx.run_code(
            "import os\nmade = []\n"
            "for target, name in [('/etc/passwd', 'g-abs'), ('../../../../../../../etc', 'g-up'),\n"
            "                     ('../../../../../etc/passwd', '/workspace/g-ws')]:\n"
            "    try:\n        os.symlink(target, name); made.append(name)\n"
            "    except OSError:\n        pass\nmade").text
        # WASI refuses absolute link targets; relative ones that climb out are made.
        assert "g-up" in planted and "/workspace/g-ws" in planted, planted
        home = host_home(sdk_env, sbx)
        (home / "h-abs").symlink_to(secret)
        (home / "h-dir").symlink_to(secret.parent)
        (home / "h-rel").symlink_to("../../../../../../../../../" + str(secret).lstrip("/"))
        (home / "inside.txt").write_text("inside")
        (home / "h-good").symlink_to("inside.txt")
        for name in ["h-abs", "h-rel", "h-dir/" + secret.name, "g-abs", "g-up/passwd"]:
            status, body = envd(sdk_env, sbx, "GET", f"/files?path=/home/user/{name}")
            if name.startswith("g-") and name.split("/")[0] not in planted:
                assert status == 404, (name, body)
                continue
            assert status == 403 and "symbolic link" in body["message"], (name, status, body)
        status, body = envd(sdk_env, sbx, "GET", "/files?path=/workspace/g-ws")
        assert status == 403 and "symbolic link" in body["message"], body
        sbx.files.remove("/workspace/g-ws")
        assert sbx.files.read("/home/user/h-good") == "inside"
        # Listed as symlinks, not walked into.
        listed = {e.name: e for e in sbx.files.list("/home/user", depth=3)}
        assert listed["h-abs"].type == e2b.FileType.SYMLINK and listed["h-abs"].symlink_target == str(secret)
        assert listed["h-good"].type == e2b.FileType.SYMLINK
        assert not any(secret.name in p for p in listed)
        with pytest.raises(e2b.SandboxException):
            sbx.files.list("/home/user/h-dir")
        # Writing, making folders and moving through a planted folder link stay inside.
        for attempt in [lambda: sbx.files.write("/home/user/h-dir/evil.txt", "x"),
                        lambda: sbx.files.make_dir("/home/user/h-dir/evil"),
                        lambda: sbx.files.rename("/home/user/inside.txt", "/home/user/h-dir/evil2.txt")]:
            with pytest.raises(e2b.SandboxException):
                attempt()
        assert sorted(p.name for p in secret.parent.iterdir() if p.name.startswith("evil")) == []
        # Writing over a file symlink replaces the link; removing a folder link removes the link.
        sbx.files.write("/home/user/h-abs", "mine")
        assert secret.read_text() == "host secret" and (home / "h-abs").read_text() == "mine"
        sbx.files.remove("/home/user/h-dir")
        assert secret.exists() and not (home / "h-dir").is_symlink()


def test_envd_connect_envelopes_lying_truncated_or_oversized_get_400(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        start = "/process.Process/Start"
        stream = "application/connect+json"
        good = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-c", "ls"]}}).encode()
        cases = [
            (envelope(0, good, length=len(good) + 100), "says its message has"),  # lying length
            (envelope(0, good)[:3], "inside an envelope's header"),                 # truncated header
            (envelope(0, good)[:-5], "says its message has"),                      # truncated message
            (envelope(0, b"{}", length=0xFFFFFFFF), "limit"),                      # oversized length
            (envelope(1, good), "compressed"),                                     # compression never agreed
            (envelope(2, good), "flags"),                                          # end-of-stream from a client
            (envelope(0, good) + envelope(0, good), "one request message"),
            (b"", "one request message"),
            (envelope(0, b"not json"), "JSON object"),
        ]
        for body, words in cases:
            status, reply = envd(sdk_env, sbx, "POST", start, body, stream)
            assert status == 400 and reply["code"] == "invalid_argument" and words in reply["message"], (body[:12], reply)
        status, reply = envd(sdk_env, sbx, "POST", start, envelope(0, good), "application/proto")
        assert status == 415, reply
        # A well-formed start: a 200 stream whose end carries the error.
        status, raw = envd(sdk_env, sbx, "POST", start, envelope(0, good), stream)
        assert status == 200 and raw[0] == 2, raw
        end = json.loads(raw[5:5 + struct.unpack(">I", raw[1:5])[0]])
        assert end["error"]["code"] == "unimplemented" and "no shell" in end["error"]["message"]
        # Unary calls: bad JSON, wrong codec, wrong method, unknown calls, bad depth.
        stat = "/filesystem.Filesystem/Stat"
        assert envd(sdk_env, sbx, "POST", stat, b"{nope")[0] == 400
        assert envd(sdk_env, sbx, "POST", stat, b"[]")[0] == 400
        assert envd(sdk_env, sbx, "POST", stat, b"{}", "text/plain")[0] == 415
        assert envd(sdk_env, sbx, "GET", stat)[0] == 405
        status, reply = envd(sdk_env, sbx, "POST", "/filesystem.Filesystem/Nope", {})
        assert status == 501 and reply["code"] == "unimplemented", reply
        status, reply = envd(sdk_env, sbx, "POST", "/process.Process/SendSignal", {})
        assert status == 501 and "no shell" in reply["message"], reply
        for depth in [-1, 1000, "x", 1.5]:
            status, reply = envd(sdk_env, sbx, "POST", "/filesystem.Filesystem/ListDir", {"path": "/home/user", "depth": depth})
            assert status == 400 and reply["code"] == "invalid_argument", (depth, reply)
        # No access token: refused before anything is read.
        status, _, _ = sdk_env.request("POST", stat, {"path": "/home/user"}, token=None,
                                       headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": ENVD})
        assert status == 401
        # The sandbox and the gateway go on.
        assert sbx.run_code("6 * 7").text == "42"
        assert sbx.files.list("/home/user") == []


def multipart_body(parts, boundary="b0undary", close=True):
    out = b""
    for headers, data in parts:
        out += f"--{boundary}\r\n".encode() + headers + b"\r\n\r\n" + data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def test_envd_malformed_uploads_get_a_clear_4xx_and_leave_nothing(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        mp = "multipart/form-data; boundary=b0undary"
        file_part = (b'Content-Disposition: form-data; name="file"; filename="/home/user/t.txt"', b"data")
        cases = [
            (multipart_body([file_part], close=False), mp, 400, "closing boundary"),
            (multipart_body([file_part]), "multipart/form-data", 400, "boundary"),
            (b"--b0undary garbage\r\n", mp, 400, "boundary"),
            (multipart_body([(b'Content-Disposition: form-data; name="file"', b"x")]), mp, 400, "filename"),
            (multipart_body([(b'Content-Disposition: form-data; name="other"', b"x")]), mp, 400, "no file"),
            (multipart_body([(b"no colon", b"x")]), mp, 400, "header"),
            (multipart_body([(b"X: " + b"h" * 20000, b"x")]), mp, 400, "headers are longer"),
            (b"x" * 100_000, mp, 400, "no multipart boundary"),
            (b"raw", "text/plain", 415, "multipart/form-data or application/octet-stream"),
        ]
        for body, ctype, want, words in cases:
            status, reply = envd(sdk_env, sbx, "POST", "/files", body, ctype)
            assert status == want and words in reply["message"], (body[:40], reply)
        status, reply = envd(sdk_env, sbx, "POST", "/files?path=/home/user/z.txt", b"not gzip",
                             "application/octet-stream", {"Content-Encoding": "gzip"})
        assert status == 400 and "gzip" in reply["message"], reply
        status, reply = envd(sdk_env, sbx, "POST", "/files?path=/home/user/z.txt", b"x",
                             "application/octet-stream", {"Content-Encoding": "br"})
        assert status == 415, reply
        status, reply = envd(sdk_env, sbx, "POST", "/files", b"x", "application/octet-stream")
        assert status == 400 and "path" in reply["message"], reply
        status, reply = envd(sdk_env, sbx, "POST", "/files?path=/home/user", b"x", "application/octet-stream")
        assert status == 400 and "folder" in reply["message"], reply
        # Nothing half-written is left, and the next upload works.
        assert sbx.files.list("/home/user") == []
        sbx.files.write("/home/user/t.txt", "fine")
        assert [e.name for e in sbx.files.list("/home/user")] == ["t.txt"]


def test_envd_uploads_past_the_disk_quota_get_413_or_507(start_gateway, tmp_path, monkeypatch):
    config = tmp_path / "small.toml"
    config.write_text("[kernels]\npool_size = 1\n[sandbox]\ndisk_mb = 4\n[http]\nmax_body_bytes = 65536\n")
    small = start_gateway(["--config", str(config)], env={"SANDGATE_MASTER_KEY": os.urandom(32).hex()})
    for k, v in {"E2B_API_URL": small.url, "E2B_SANDBOX_URL": small.url, "E2B_API_KEY": TOKEN}.items():
        monkeypatch.setenv(k, v)
    with e2b_ci.Sandbox.create() as sbx:
        five = os.urandom(5 << 20)
        for data, ctype, extra in [
            (five, "application/octet-stream", {}),
            (multipart_body([(b'Content-Disposition: form-data; name="file"; filename="/home/user/f"', five)]),
             "multipart/form-data; boundary=b0undary", {}),
            (gzip.compress(b"\0" * (64 << 20)), "application/octet-stream", {"Content-Encoding": "gzip"}),  # a bomb
        ]:
            status, reply = envd(small, sbx, "POST", "/files?path=/home/user/f", data, ctype, extra)
            assert status == 413 and "disk_mb" in reply["message"], reply
        with pytest.raises(e2b.SandboxException, match="413"):
            sbx.files.write("/home/user/big.bin", five)
        sbx.files.write("/home/user/three.bin", os.urandom(3 << 20))
        with pytest.raises(e2b.NotEnoughSpaceException):
            sbx.files.write("/home/user/two.bin", os.urandom(2 << 20))
        assert [e.name for e in sbx.files.list("/home/user")] == ["three.bin"]
        # A Connect body over http.max_body_bytes.
        status, reply = envd(small, sbx, "POST", "/process.Process/Start", envelope(0, b"{" + b" " * 100_000 + b"}"),
                             "application/connect+json")
        assert status == 413 and reply["code"] == "resource_exhausted", reply
        assert sbx.run_code("1 + 1").text == "2"


def test_debug_ports_serve_older_sdks_one_sandbox_on_loopback(start_gateway, monkeypatch):
    """`E2B_DEBUG=true` (every SDK version, 1.x included) talks to localhost:49983/49999 with no
    key and no tokens; the opt-in debug ports serve one implicit sandbox there."""
    import socket
    import urllib.error
    import urllib.request
    g = start_gateway(["--pool-size", "1", "--e2b-debug-ports"])
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("E2B_DEBUG", "true")
    sbx = e2b_ci.Sandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    assert sbx.run_code("kept = 7").error is None
    assert e2b_ci.Sandbox.create().run_code("kept * 6").text == "42"  # one sandbox per host
    assert sbx.is_running()
    # Its files and its home, as a created sandbox's.
    sbx.files.write("/home/user/debug.txt", "debug files")
    assert sbx.run_code("import os\n(os.getcwd(), open('debug.txt').read())").text == "('/home/user', 'debug files')"
    assert [e.name for e in sbx.files.list("~")] == ["debug.txt"]
    # No web page reaches them: a request naming an Origin (browsers always do) is refused.
    req = urllib.request.Request("http://127.0.0.1:49999/execute", data=b'{"code": "kept = 0"}', method="POST",
                                 headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401
    assert sbx.run_code("kept").text == "7"
    # Only the data plane is there: not Jupyter's API, which needs a token on the main port.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen("http://127.0.0.1:49999/api/kernels", timeout=30)
    assert e.value.code == 404
    # Loopback only: the ports are not bound on another address of this machine.
    others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for addr in sorted(others)[:2]:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((addr, 49999)) != 0
    g.stop()


def test_charts_and_dataframes_come_back_structured(sdk_env):
    from e2b_code_interpreter.charts import BarChart, LineChart, SuperChart
    with e2b_ci.Sandbox.create() as sbx:
        ex = sbx.run_code(
            "import matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots()\nax.plot([1, 2, 3], [2, 4, 1], label='sales')\n"
            "ax.set_title('Sales'); ax.set_ylabel('Revenue (USD)')\nplt.show()")
        (fig,) = ex.results
        assert fig.png and fig.text.startswith("<Figure")
        assert isinstance(fig.chart, LineChart)
        assert fig.chart.title == "Sales" and fig.chart.y_unit == "USD"
        assert [tuple(p) for p in fig.chart.elements[0].points] == [(1.0, 2.0), (2.0, 4.0), (3.0, 1.0)]
        ex = sbx.run_code(
            "fig, (a, b) = plt.subplots(1, 2)\na.bar(['x', 'y'], [3, 5])\nb.plot([0, 1], [1, 0])\n"
            "fig.suptitle('Two')\nfig")
        chart = ex.results[0].chart
        assert isinstance(chart, SuperChart) and chart.title == "Two"
        assert [type(c) for c in chart.elements] == [BarChart, LineChart]
        ex = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})")
        (df,) = ex.results
        assert df.is_main_result and df.html and "<table" in df.html
        assert df.data == {"a": [1, 2], "b": ["x", None]}


def test_the_idle_culler_leaves_sandboxes_to_their_own_timeout(start_gateway, monkeypatch):
    g = start_gateway(["--pool-size", "1", "--cull-idle-timeout", "1", "--cull-interval", "1"])
    monkeypatch.setenv("E2B_API_URL", g.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", g.url)
    monkeypatch.setenv("E2B_API_KEY", TOKEN)
    sbx = e2b_ci.Sandbox.create(timeout=120)
    sbx.run_code("kept = 1")
    ctx = sbx.create_code_context()
    notebook = g.start_kernel()["id"]
    # A notebook's kernel idle as long is culled...
    deadline = time.monotonic() + 60
    while any(k["id"] == notebook for k in g.request("GET", "/api/kernels")[1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(k["id"] != notebook for k in g.request("GET", "/api/kernels")[1])
    # ...the sandbox's kernels are not: it ends at its own deadline.
    assert sbx.run_code("kept").text == "1"
    assert sbx.run_code("1", context=ctx).text == "1"
    sbx.kill()
    g.stop()


def test_internet_access_is_refused_not_faked(sdk_env):
    with pytest.raises(Exception, match="no network"):
        e2b_ci.Sandbox.create(allow_internet_access=True)
    with e2b_ci.Sandbox.create(allow_internet_access=False) as sbx:
        ex = sbx.run_code("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
        assert ex.error is not None


def test_a_running_execution_shows_its_kernel_busy(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        (kernel,) = [c.id for c in sbx.list_code_contexts()]
        started = threading.Event()
        runner = threading.Thread(target=lambda: sbx.run_code(
            "print('go', flush=True)\nimport time\ntime.sleep(3)", on_stdout=lambda m: started.set()))
        runner.start()
        assert started.wait(60)
        status, model, _ = sdk_env.request("GET", f"/api/kernels/{kernel}")
        assert status == 200 and model["execution_state"] == "busy", model
        runner.join(60)
        status, model, _ = sdk_env.request("GET", f"/api/kernels/{kernel}")
        assert model["execution_state"] == "idle", model


def test_a_silent_cell_streams_keepalives(sdk_env):
    """E2B's server sends a keepalive line every 5 s without output; the SDK skips them, and they
    let the gateway notice a client that went away."""
    import json
    import urllib.request
    info = sdk_env.request("POST", "/v2/sandboxes", {"templateID": "code-interpreter-v1"},
                           headers={"X-API-Key": TOKEN}, token=None)[1]
    try:
        headers = {"E2b-Sandbox-Id": info["sandboxID"], "E2b-Sandbox-Port": "49999",
                   "X-Access-Token": info["envdAccessToken"],
                   "E2B-Traffic-Access-Token": info["trafficAccessToken"], "Content-Type": "application/json"}
        req = urllib.request.Request(sdk_env.url + "/execute", method="POST", headers=headers,
                                     data=b'{"code": "import time; time.sleep(6); 1"}')
        with urllib.request.urlopen(req, timeout=60) as r:
            kinds = [json.loads(line)["type"] for line in r.read().splitlines()]
        assert kinds[0] == "number_of_executions" and kinds[-1] == "end_of_execution", kinds
        assert "keepalive" in kinds and kinds.index("keepalive") < kinds.index("result"), kinds
    finally:
        sdk_env.request("DELETE", f"/sandboxes/{info['sandboxID']}", headers={"X-API-Key": TOKEN}, token=None)


def test_a_crashed_context_comes_back_with_its_environment_and_folder(sdk_env):
    import signal
    from conftest import kernel_pid
    with e2b_ci.Sandbox.create(envs={"STAGE": "one"}) as sbx:
        (kernel,) = [c.id for c in sbx.list_code_contexts()]
        assert sbx.run_code("import os\nlost = 1\n(os.getcwd(), os.environ['STAGE'])").text == \
            "('/home/user', 'one')"
        old = kernel_pid(sdk_env, kernel)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if kernel_pid(sdk_env, kernel) != old and \
                        sdk_env.request("GET", f"/api/kernels/{kernel}")[1]["execution_state"] == "idle":
                    break
            except AssertionError:
                pass  # between the old process and the new one
            time.sleep(0.1)
        ex = sbx.run_code("import os\n(os.getcwd(), os.environ['STAGE'])")
        assert ex.text == "('/home/user', 'one')", ex
        assert sbx.run_code("lost").error.name == "NameError"


def test_runs_with_their_own_environment_at_once_leave_none_behind(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        sbx.run_code("import os, time")
        seen, errors = {}, []

        def run(name):
            try:
                seen[name] = sbx.run_code("time.sleep(0.3); os.environ.get('WHO')", envs={"WHO": name}).text
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and seen == {"a": "a", "b": "b", "c": "c"}, (seen, errors)
        assert sbx.run_code("repr(os.environ.get('WHO'))").text == "None"


def test_a_huge_connect_timeout_is_capped_not_a_crash(sdk_env):
    with e2b_ci.Sandbox.create() as sbx:
        status, body, _ = sdk_env.request("POST", f"/v2/sandboxes/{sbx.sandbox_id}/connect",
                                          {"timeout": 10 ** 13}, headers={"X-API-Key": TOKEN}, token=None)
        assert status == 200, body
        assert (sbx.get_info().end_at - sbx.get_info().started_at).total_seconds() <= 24 * 3600 + 5
