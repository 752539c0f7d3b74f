"""`%%ask` end to end, through the gateway's WebSocket (a real Jupyter protocol client), against
a local fake of the OpenAI and Anthropic APIs (tests/fake_models.py) on 127.0.0.1: code streams
in, runs in the sandbox, is offered as a new cell; errors go back to the model; every provider
failure is a clear error; interrupts stop a slow stream; the key never leaks."""

import base64
import json
import os
import pathlib
import subprocess
import time

import pytest

from conftest import GATEWAY, KernelSocket
from fake_models import FakeModels

KEY = "sk-test-" + os.urandom(12).hex()

CHART_CODE = """import pandas as pd
import matplotlib.pyplot as plt
sales = pd.read_csv('sales.csv')
by_month = sales.groupby('month', sort=False)['revenue'].sum()
by_month.plot(kind='bar', title='Revenue by month')
print('months:', len(by_month))
by_month"""


def fence(code):
    return f"Here is the code:\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def fake():
    with FakeModels(key=KEY) as f:
        f.models = set(f.models) | {"fake-gpt", "fake-claude"}
        yield f


def ask_config(tmp_path, fake, extra="", openai_key_env="SANDGATE_TEST_OPENAI_KEY"):
    config = tmp_path / "ask.toml"
    config.write_text(f"""
[kernels]
pool_size = 1
[ask]
default_provider = "fakeai"
max_repairs = 2
attempts = 2
timeout_s = 20
idle_timeout_s = 10
{extra}
[[ask.providers]]
name = "fakeai"
kind = "openai"
base_url = "{fake.openai_base}"
key_env = "{openai_key_env}"
models = ["fake-gpt"]

[[ask.providers]]
name = "claude"
kind = "anthropic"
base_url = "{fake.anthropic_base}"
key_env = "SANDGATE_TEST_ANTHROPIC_KEY"
models = ["fake-claude"]
""")
    return config


@pytest.fixture(scope="module")
def ask_gateway(start_gateway, tmp_path_factory, fake):
    config = ask_config(tmp_path_factory.mktemp("askcfg"), fake)
    return start_gateway(["--config", str(config)],
                         env={"SANDGATE_TEST_OPENAI_KEY": KEY, "SANDGATE_TEST_ANTHROPIC_KEY": KEY})


@pytest.fixture
def sock(ask_gateway, fake):
    fake.reset()
    k = ask_gateway.start_kernel()
    s = KernelSocket(ask_gateway, k["id"])
    s.kernel_id = k["id"]
    yield s
    s.close()
    ask_gateway.request("DELETE", f"/api/kernels/{k['id']}")


def streams(out, name=None):
    return "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name))


def markdown(out):
    return [m["content"]["data"].get("text/markdown", "") for m in out if m["msg_type"] in ("display_data", "update_display_data")]


def put_sales(g):
    csv = "month,revenue\nJan,120\nFeb,135\nMar,160\nJan,30\n"
    status, _, _ = g.request("PUT", "/api/contents/sales.csv", {"type": "file", "format": "text", "content": csv})
    assert status in (200, 201)


def test_ask_streams_code_runs_it_and_offers_it_as_a_cell(ask_gateway, fake, sock):
    put_sales(ask_gateway)
    sock.execute("import pandas as pd\ntargets = pd.DataFrame({'month': ['Jan'], 'goal': [150]})")
    fake.script({"text": fence(CHART_CODE), "chunks": 8, "input_tokens": 321, "output_tokens": 77})
    reply, out = sock.execute("%%ask\nload sales.csv, show revenue by month as a bar chart")
    assert reply["status"] == "ok", reply
    # The code was shown as it arrived: one display, then updates to it.
    ids = {m["content"].get("transient", {}).get("display_id") for m in out if m["msg_type"] == "update_display_data"}
    assert len(ids) == 1
    shown = [m for m in out if m["content"].get("transient", {}).get("display_id") in ids]
    assert shown[0]["msg_type"] == "display_data" and len(shown) >= 3
    assert {m["msg_type"] for m in shown[1:]} == {"update_display_data"}
    assert CHART_CODE in shown[-1]["content"]["data"]["text/markdown"]
    # It ran in the sandbox: its print, its chart, its table.
    assert "months: 3" in streams(out, "stdout")
    pngs = [m for m in out if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]["content"]["data"]["image/png"]).startswith(b"\x89PNG")
    assert any(m["msg_type"] == "execute_result" for m in out)
    # Offered as a new cell below, and the usage was shown.
    assert reply["payload"] == [{"source": "set_next_input", "text": CHART_CODE, "replace": False}]
    assert any("321 tokens in, 77 out" in md for md in markdown(out))
    # The model got the context a person would expect it to have.
    prompt = json.dumps(fake.requests[-1]["body"])
    assert "targets" in prompt and "goal: int64" in prompt, "variables with columns and dtypes"
    assert "sales.csv" in prompt, "files in /workspace"
    assert "import pandas as pd" in prompt, "recent cells"
    assert "pandas" in prompt and "no network" in prompt.lower()
    # The generated code's state is in the kernel.
    reply, out = sock.execute("int(by_month.sum())")
    assert [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"] == "445"
    status, usage, _ = ask_gateway.request("GET", "/api/ask/usage")
    assert usage["kernels"][sock.kernel_id] == {"input_tokens": 321, "output_tokens": 77, "calls": 1}


def test_errors_go_back_to_the_model_which_fixes_them(fake, sock):
    fake.script(fence("result = undefined_name * 2"), fence("undefined_name = 21\nresult = undefined_name * 2\nresult"))
    reply, out = sock.execute("%%ask\ncompute the result")
    assert reply["status"] == "ok"
    errors = [m for m in out if m["msg_type"] == "error"]
    assert len(errors) == 1 and errors[0]["content"]["ename"] == "NameError", "the first attempt's error is visible"
    assert "attempt 2" in streams(out, "stderr")
    assert [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"] == "42"
    second = fake.requests[-1]["body"]["messages"]
    assert "NameError" in second[-1]["content"] and second[-2]["role"] == "assistant"
    assert reply["payload"][0]["text"].startswith("undefined_name = 21")


def test_repairs_are_bounded(fake, sock):
    fake.script(*[fence("1 / 0")] * 3)
    reply, out = sock.execute("%%ask\ndivide")
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    assert len(fake.requests) == 3, "one try and two repairs"
    assert len([m for m in out if m["msg_type"] == "error"]) == 3
    assert reply["payload"][0]["text"] == "1 / 0"


def test_no_run_and_explain(fake, sock):
    fake.script(fence("never_defined = 1") + "This defines a name.")
    reply, out = sock.execute("%%ask --no-run --explain\ndefine a name")
    assert reply["status"] == "ok" and reply["payload"][0]["text"] == "never_defined = 1"
    assert any(md.strip() == "Here is the code:\nThis defines a name." for md in markdown(out))
    reply, _ = sock.execute("never_defined")
    assert reply["ename"] == "NameError"
    assert "explain" in fake.requests[-1]["body"]["messages"][0]["content"]


def test_anthropic_provider(fake, sock):
    fake.script({"text": fence("print('from claude')"), "input_tokens": 10, "output_tokens": 5})
    reply, out = sock.execute("%%ask --provider claude --model fake-claude\nsay hello")
    assert reply["status"] == "ok" and "from claude" in streams(out, "stdout")
    req = fake.requests[-1]
    assert req["path"] == "/v1/messages" and req["body"]["model"] == "fake-claude"
    assert req["headers"]["x-api-key"] == KEY and req["headers"]["anthropic-version"]
    assert req["body"]["system"] and req["body"]["stream"] is True


def test_help_models_and_usage_errors(sock):
    for code in ("%ask?", "%%ask --help\n"):
        reply, out = sock.execute(code)
        assert reply["status"] == "ok" and "--no-run" in streams(out)
    reply, out = sock.execute("%ask models")
    assert "fakeai (default): fake-gpt" in streams(out) and "claude: fake-claude" in streams(out)
    reply, out = sock.execute("%%ask --colour red\nx")
    assert reply["ename"] == "UsageError" and "unknown option" in reply["evalue"]
    reply, out = sock.execute("%%ask --provider nobody\nx")
    assert reply["ename"] == "AskError" and "no provider" in reply["evalue"]


@pytest.mark.parametrize("script,words", [
    ({"status": 404}, "has no model"),
    ({"status": 500}, "unavailable"),
    ({"malformed": "not_json"}, "could not be read"),
    ({"malformed": "bad_sse"}, "could not be read"),
    ({"malformed": "truncated"}, "ended before it was complete"),
    ({"malformed": "empty"}, "no text"),
])
def test_provider_failures_are_clear_errors(fake, sock, script, words):
    fake.script(*([script] * 2))
    reply, out = sock.execute("%%ask\nanything")
    assert reply["status"] == "error" and reply["ename"] == "AskError", reply
    assert words in reply["evalue"], reply["evalue"]
    reply, _ = sock.execute("1 + 1")
    assert reply["status"] == "ok", "the kernel is fine"


def test_rate_limits_are_retried(fake, sock):
    fake.script({"status": 429, "retry_after": 0}, fence("print('after the wait')"))
    reply, out = sock.execute("%%ask\nhello")
    assert reply["status"] == "ok" and "after the wait" in streams(out)
    assert [r["status"] for r in fake.requests] == [429, 200]


def test_interrupt_stops_a_slow_stream(ask_gateway, fake, sock):
    fake.script({"text": fence("print('too late')") + "x" * 400, "chunks": 50, "delay_s": 0.2})
    msg_id = sock.send("execute_request", {"code": "%%ask\nslowly", "silent": False})
    while True:  # the stream has begun once the code display appears
        m = sock.recv()
        if m["msg_type"] == "display_data" and m["parent_header"].get("msg_id") == msg_id:
            break
    status, _, _ = ask_gateway.request("POST", f"/api/kernels/{sock.kernel_id}/interrupt", {})
    assert status == 204
    reply, out = sock.collect(msg_id, timeout=10)
    assert reply["ename"] == "KeyboardInterrupt" and "model was writing" in reply["evalue"]
    fake.wait_for(lambda reqs: reqs and reqs[-1]["disconnected"], timeout=10)
    reply, _ = sock.execute("'still alive'")
    assert reply["status"] == "ok"


def test_cells_queued_behind_an_ask_run_in_order(fake, sock):
    fake.script(fence("from_ask = before * 10"))
    ids = [sock.send("execute_request", {"code": c, "silent": False}) for c in
           ("before = 4", "%%ask\nmultiply", "after = from_ask + 2\nafter")]
    replies = [sock.collect(i) for i in ids]
    assert [r[0]["status"] for r in replies] == ["ok", "ok", "ok"]
    assert [m for m in replies[2][1] if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"] == "42"


def test_requests_sent_back_to_back_keep_their_order_around_an_ask(fake, sock):
    """While the gateway's shell queue is empty a request goes straight to the kernel; behind a
    `%%ask` the queue holds them. Either way none overtakes one sent before it: many requests
    sent without waiting (executions and kernel_info, a `%%ask` in the middle) are answered, and
    run, in the order sent."""
    fake.script(fence("order.append('ask')"))
    reply, _ = sock.execute("order = []")
    assert reply["status"] == "ok"
    codes = [f"order.append({i})" for i in range(40)]
    codes.insert(20, "%%ask\nappend ask")
    sent = []
    for i, code in enumerate(codes):
        sent.append(sock.send("execute_request", {"code": code, "silent": False}))
        if i % 7 == 3:
            sent.append(sock.send("kernel_info_request", {}))
    answered = []
    deadline = time.monotonic() + 120
    while len(answered) < len(sent):
        assert time.monotonic() < deadline, f"only {len(answered)} of {len(sent)} replies came"
        m = sock.recv()
        if m["channel"] == "shell" and m["msg_type"].endswith("_reply"):
            assert m["content"]["status"] == "ok", m["content"]
            answered.append(m["parent_header"]["msg_id"])
    assert answered == sent
    reply, out = sock.execute("print(order)")
    assert reply["status"] == "ok"
    assert streams(out, "stdout") == repr(list(range(20)) + ["ask"] + list(range(20, 40))) + "\n"


def test_the_key_never_leaks(ask_gateway, fake, sock):
    fake.script(fence("import os\nprint(sorted(os.environ))"))
    raw = []
    msg_id = sock.send("execute_request", {"code": "%%ask\nlist the environment", "silent": False})
    while True:
        op, data = sock.ws.recv_data()
        raw.append(data)
        m = json.loads(data)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" and m["parent_header"].get("msg_id") == msg_id:
            break
    assert all(KEY.encode() not in r for r in raw), "the key appeared in a message"
    # The sandbox has no way to it.
    # (The probe carries the key reversed, so the probe itself, kept in the history notebook,
    # does not put the key into a file.)
    reply, out = sock.execute(
        "import os, glob\n"
        f"key = {KEY[::-1]!r}[::-1]\n"
        "hits = [k for k, v in os.environ.items() if key in v]\n"
        "for p in glob.glob('/**', recursive=True):\n"
        "    try:\n"
        "        hits += [p] if os.path.isfile(p) and key.encode() in open(p, 'rb').read() else []\n"
        "    except OSError:\n"
        "        pass\n"
        "hits")
    assert [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"] == "[]"
    # Nor the kernel process's environment, the gateway's log, or any file it wrote.
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"sandgate-kernel" in cmd:
                assert KEY.encode() not in pathlib.Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            pass
    assert KEY not in ask_gateway.log()
    for root in (ask_gateway.data_dir, pathlib.Path("/dev/shm")):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    assert KEY.encode() not in path.read_bytes(), path
                except PermissionError:
                    pass


def test_missing_and_wrong_keys(start_gateway, tmp_path, fake):
    fake.reset()
    g = start_gateway(["--config", str(ask_config(tmp_path, fake, openai_key_env="NOT_SET_ANYWHERE"))])
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        reply, _ = s.execute("%%ask\nhi")
        assert reply["ename"] == "AskError" and "no API key" in reply["evalue"] and "set-key" in reply["evalue"]
        assert fake.requests == []
    finally:
        s.close()
    (tmp_path / "w").mkdir()
    g2 = start_gateway(["--config", str(ask_config(tmp_path / "w", fake))], env={"SANDGATE_TEST_OPENAI_KEY": "sk-wrong-" + "0" * 20})
    k = g2.start_kernel()
    s = KernelSocket(g2, k["id"])
    try:
        reply, _ = s.execute("%%ask\nhi")
        assert reply["ename"] == "AskError" and "refused the API key" in reply["evalue"]
        assert "sk-wrong-" + "0" * 20 not in reply["evalue"]
    finally:
        s.close()


def test_set_key_stores_the_key_sealed(start_gateway, tmp_path, fake):
    fake.reset()
    config = ask_config(tmp_path, fake, openai_key_env="NOT_SET_ANYWHERE")
    g = start_gateway(["--config", str(config)])
    g.stop()
    r = subprocess.run([str(GATEWAY), "set-key", "fakeai", "--config", str(config), "--data-dir", str(g.data_dir)],
                       input=KEY + "\n", text=True, capture_output=True, timeout=60,
                       env={**os.environ, "SANDGATE_TOKEN": g.token})
    assert r.returncode == 0, r.stderr
    assert KEY not in (g.data_dir / "secrets.json").read_text()
    g.start()
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        fake.script(fence("print('with the stored key')"))
        reply, out = s.execute("%%ask\nhi")
        assert reply["status"] == "ok" and "with the stored key" in streams(out)
    finally:
        s.close()


def test_budget_refuses_when_spent(start_gateway, tmp_path, fake):
    fake.reset()
    g = start_gateway(["--config", str(ask_config(tmp_path, fake, extra="budget_tokens = 100"))],
                      env={"SANDGATE_TEST_OPENAI_KEY": KEY})
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        fake.script({"text": fence("x = 1"), "input_tokens": 90, "output_tokens": 20})
        reply, _ = s.execute("%%ask\nfirst")
        assert reply["status"] == "ok"
        reply, _ = s.execute("%%ask\nsecond")
        assert reply["ename"] == "AskError" and "budget" in reply["evalue"] and "110 of 100" in reply["evalue"]
        assert len(fake.requests) == 1
        status, usage, _ = g.request("GET", "/api/ask/usage")
        assert usage["workspace"]["input_tokens"] == 90 and usage["budget_tokens"] == 100
    finally:
        s.close()
