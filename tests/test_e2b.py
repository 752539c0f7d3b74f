"""E2B's SDKs (`e2b-code-interpreter`, `e2b`; pinned in requirements.txt), unmodified, against
Sandgate's E2B-compatible API, configured only by environment variables:

    E2B_API_URL=<gateway> E2B_SANDBOX_URL=<gateway> E2B_API_KEY=<sandgate token>
"""

import asyncio
import hashlib
import os
import threading
import time

import pytest

from conftest import TOKEN

e2b_ci = pytest.importorskip("e2b_code_interpreter")
import e2b  # noqa: E402

ALICE = "alice-" + "a1" * 16
BOB = "bob-" + "b2" * 16


@pytest.fixture(scope="module")
def gw(start_gateway, tmp_path_factory):
    """A gateway with two users besides the main token's, and a warm pool."""
    config = tmp_path_factory.mktemp("e2b-users") / "users.toml"
    config.write_text(
        "[kernels]\npool_size = 2\n"
        f'[[auth.users]]\nname = "alice"\ntoken_sha256 = "{hashlib.sha256(ALICE.encode()).hexdigest()}"\n'
        f'[[auth.users]]\nname = "bob"\ntoken_sha256 = "{hashlib.sha256(BOB.encode()).hexdigest()}"\n')
    return start_gateway(["--config", str(config)], env={"SANDGATE_MASTER_KEY": os.urandom(32).hex()})


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
        assert out == [f"{i} {k}\n" for k in range(3)]


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
