"""The kernel through jupyter_client: execution, output, rich display, input, interrupt."""

import base64
import pathlib
import time

from conftest import of_type, stdout_text


def test_state_survives_between_cells(kernel):
    reply, _ = kernel.execute("state_a = 20")
    assert reply["status"] == "ok"
    reply, out = kernel.execute("state_b = state_a + 1\nstate_a * 2 + state_b - 19")
    assert reply["status"] == "ok"
    [result] = of_type(out, "execute_result")
    assert result["content"]["data"]["text/plain"] == "42"
    assert result["content"]["execution_count"] == reply["execution_count"]


def test_execution_count_increments_and_silent_does_not(kernel):
    r1, _ = kernel.execute("1")
    r2, out = kernel.execute("2", silent=True)
    r3, _ = kernel.execute("3")
    assert r3["execution_count"] == r1["execution_count"] + 1
    assert r2["execution_count"] == r1["execution_count"]
    assert of_type(out, "execute_input") == [] and of_type(out, "execute_result") == []


def test_output_streams_while_the_cell_runs_and_in_order(kernel):
    code = "import time\nfor i in range(4):\n    print('line', i, flush=True)\n    time.sleep(0.25)\n'done'"
    reply, out = kernel.execute(code)
    streams = of_type(out, "stream")
    assert stdout_text(out) == "".join(f"line {i}\n" for i in range(4))
    # The first line reached the client well before the cell finished.
    assert streams[0]["received"] < reply["received"] - 0.5
    kinds = [m["msg_type"] for m in out]
    assert kinds[0] == "execute_input" and kinds[-1] == "execute_result"


def test_stderr_and_stdout_are_separate_streams(kernel):
    _, out = kernel.execute("import sys\nprint('to out')\nprint('to err', file=sys.stderr)")
    assert stdout_text(out) == "to out\n"
    assert stdout_text(out, "stderr") == "to err\n"


def test_error_has_ename_evalue_and_a_traceback_into_the_cell(kernel):
    code = "def inner():\n    raise ValueError('bad value')\ninner()"
    reply, out = kernel.execute(code)
    assert reply["status"] == "error"
    assert (reply["ename"], reply["evalue"]) == ("ValueError", "bad value")
    [err] = of_type(out, "error")
    tb = "\n".join(err["content"]["traceback"])
    assert "Cell In[" in tb and "inner()" in tb and "raise ValueError('bad value')" in tb
    assert "sandgate-driver" not in tb


def test_syntax_error_is_reported(kernel):
    reply, _ = kernel.execute("def broken(:\n  pass")
    assert reply["status"] == "error" and reply["ename"] == "SyntaxError"


def test_stop_on_error_aborts_queued_cells(kernel):
    first = kernel.kc.execute("import time; time.sleep(0.5); raise RuntimeError('stop')")
    second = kernel.kc.execute("after_abort = 1")
    r1, _ = kernel.collect(first)
    r2, _ = kernel.collect(second)
    assert r1["status"] == "error"
    assert r2["status"] == "aborted"
    reply, out = kernel.execute("'after_abort' in globals()")
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "False"


def test_dataframe_shows_as_html_table(kernel):
    reply, out = kernel.execute("import pandas as pd\ndf = pd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [3, 4]})\ndf")
    assert reply["status"] == "ok"
    data = of_type(out, "execute_result")[0]["content"]["data"]
    assert "<table" in data["text/html"] and "Oslo" in data["text/html"]
    assert "Lima" in data["text/plain"]


def test_matplotlib_figure_is_displayed_as_png_without_show(kernel):
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('inline')\nfig_made = True"
    reply, out = kernel.execute(code)
    assert reply["status"] == "ok"
    [shown] = of_type(out, "display_data")
    png = base64.b64decode(shown["content"]["data"]["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert "Figure" in shown["content"]["data"]["text/plain"]
    # Figures are closed after being shown: the next cell shows nothing.
    _, out = kernel.execute("x_after_plot = 1")
    assert of_type(out, "display_data") == []


def test_display_and_ipython_display_helpers(kernel):
    code = ("from IPython.display import HTML, Markdown, display\n"
            "display(HTML('<b>bold</b>'), Markdown('*md*'))\n"
            "display({'a': 1}, raw=False)")
    reply, out = kernel.execute(code)
    shown = of_type(out, "display_data")
    assert [m["content"]["data"].get("text/html") for m in shown][0] == "<b>bold</b>"
    assert shown[1]["content"]["data"]["text/markdown"] == "*md*"
    assert shown[2]["content"]["data"]["text/plain"] == "{'a': 1}"


def test_object_reprs_svg_json_and_mimebundle(kernel):
    code = ("class Rich:\n"
            "    def _repr_svg_(self): return '<svg xmlns=\"http://www.w3.org/2000/svg\"/>'\n"
            "    def _repr_json_(self): return {'k': [1, 2]}\n"
            "    def __repr__(self): return 'Rich()'\n"
            "Rich()")
    _, out = kernel.execute(code)
    data = of_type(out, "execute_result")[0]["content"]["data"]
    assert data["image/svg+xml"].startswith("<svg")
    assert data["application/json"] == {"k": [1, 2]}
    assert data["text/plain"] == "Rich()"


def test_input_goes_through_the_frontend(kernel):
    msg_id = kernel.kc.execute("name = input('Who? ')\nprint('hello', name)", allow_stdin=True)
    prompts = []

    def answer(req):
        prompts.append(req["content"]["prompt"])
        return "Ada"

    reply, out = kernel.collect(msg_id, stdin=answer)
    assert reply["status"] == "ok"
    assert prompts == ["Who? "]
    assert stdout_text(out) == "hello Ada\n"


def test_input_without_stdin_is_a_clear_error(kernel):
    reply, _ = kernel.execute("input('x')", allow_stdin=False)
    assert reply["status"] == "error" and reply["ename"] == "StdinNotImplementedError"


def wait_for_execute_input(kernel, msg_id):
    """Blocks until the kernel has announced the cell, i.e. it is running it."""
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=10)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            return


def test_interrupt_stops_a_busy_loop_within_a_second_and_keeps_state(kernel):
    kernel.execute("kept = 'still here'")
    msg_id = kernel.kc.execute("spins = 0\nwhile True:\n    spins += 1")
    wait_for_execute_input(kernel, msg_id)
    t0 = time.monotonic()
    kernel.km.interrupt_kernel()
    reply, _ = kernel.collect(msg_id, timeout=10)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert reply["received"] - t0 < 1.0
    reply, out = kernel.execute("kept, spins > 0")
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "('still here', True)"


def test_interrupt_ends_a_sleep(kernel):
    msg_id = kernel.kc.execute("import time\ntime.sleep(60)")
    wait_for_execute_input(kernel, msg_id)
    t0 = time.monotonic()
    kernel.km.interrupt_kernel()
    reply, out = kernel.collect(msg_id, timeout=10)
    assert reply["ename"] == "KeyboardInterrupt"
    assert reply["received"] - t0 < 1.0
    tb = "\n".join(of_type(out, "error")[0]["content"]["traceback"])
    assert "time.sleep(60)" in tb


def threads(pid):
    """{thread id: (name, ns on a CPU, times it was scheduled)} of process `pid`, from
    /proc/PID/task/*/schedstat (exact, unlike the 10 ms ticks of utime/stime)."""
    out = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ran_ns, _, slices = map(int, (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        out[int(task.name)] = (name, ran_ns, slices)
    return out


def wait_until_threads_are_still(pid, name, timeout=10, every=0.3):
    """Polls until no thread called `name` of process `pid` was scheduled for `every` s."""
    def slices():
        return {tid: s for tid, (n, _, s) in threads(pid).items() if n == name}
    deadline = time.monotonic() + timeout
    before = slices()
    assert before, f"the kernel has no {name} thread"
    while True:
        time.sleep(every)
        now = slices()
        if now == before:
            return
        woke = sum(now.values()) - sum(before.values())
        assert time.monotonic() < deadline, (
            f"the kernel is idle, yet its {name} thread still wakes ({woke} times in {every} s)")
        before = now


IDLE_WINDOW_S = 3
# An idle kernel should cost at most 0.05 ms of CPU per second (so a thousand of them leave two
# cores idle); asserted with room to spare for a loaded machine. The 10 ms epoch ticker that ran
# without a pause cost 0.75-1.1 ms/s here (2.7 ms/s in issue 13's measurement).
IDLE_CPU_LIMIT_MS_PER_S = 0.25


def test_an_idle_kernel_wakes_no_thread_and_still_interrupts_and_times_out(start_kernel):
    """Between cells no thread of the kernel process runs: the epoch ticker that lets a running
    cell be interrupted or timed out stops ticking once no turn runs, and the first cell after
    the pause starts it again. Measured over a window of the whole process's threads, with the
    client's heartbeat paused (it is the client's choice, once a second here, every 3 s in the
    gateway)."""
    k = start_kernel(["--cell-timeout-s", "2"])
    k.execute("kept = 'still here'")
    pid = k.km.provisioner.process.pid
    k.kc.hb_channel.pause()
    try:
        wait_until_threads_are_still(pid, "epoch-ticker")
        before = threads(pid)
        t0 = time.monotonic()
        time.sleep(IDLE_WINDOW_S)  # the measurement window itself, not a wait for an event
        after = threads(pid)
        elapsed = time.monotonic() - t0
    finally:
        k.kc.hb_channel.unpause()
    cost = {}
    for tid, (name, ran_ns, slices) in after.items():
        _, ran0, slices0 = before.get(tid, (name, 0, 0))
        cost[f"{name} ({tid})"] = ((ran_ns - ran0) / 1e6 / elapsed, slices - slices0)
    total = sum(ms for ms, _ in cost.values())
    assert total < IDLE_CPU_LIMIT_MS_PER_S, f"{total:.3f} ms of CPU per second while idle: {cost}"

    # The first cell after the pause wakes the ticker: an interrupt still stops it at once ...
    msg_id = k.kc.execute("spins = 0\nwhile True:\n    spins += 1")
    wait_for_execute_input(k, msg_id)
    t0 = time.monotonic()
    k.km.interrupt_kernel()
    reply, _ = k.collect(msg_id, timeout=10)
    assert reply["ename"] == "KeyboardInterrupt"
    assert reply["received"] - t0 < 1.0
    # ... and, after another pause, the cell time limit still ends a busy loop, state kept.
    wait_until_threads_are_still(pid, "epoch-ticker")
    t0 = time.monotonic()
    reply, _ = k.execute("while True:\n    pass")
    assert reply["ename"] == "TimeoutError"
    assert time.monotonic() - t0 < 5
    reply, out = k.execute("kept, spins > 0")
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "('still here', True)"


def test_a_busy_cell_leaves_heartbeat_control_and_streaming_working(start_kernel):
    """A cell that computes without pause (no sleep, no full output queue) for 3 s: its
    printed line, heartbeats and a control request are all answered while it runs."""
    import zmq
    k = start_kernel()
    code = ("import time\nprint('started', flush=True)\nt0 = time.monotonic()\n"
            "while time.monotonic() - t0 < 3:\n    pass\n'done'")
    msg_id = k.kc.execute(code)
    started = None
    deadline = time.monotonic() + 30
    while started is None and time.monotonic() < deadline:
        msg = k.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            assert msg["content"]["text"] == "started\n"
            started = time.monotonic()
    assert started is not None
    info = k.km.get_connection_info()
    hb = zmq.Context.instance().socket(zmq.REQ)
    hb.setsockopt(zmq.LINGER, 0)
    hb.connect(f"tcp://{info['ip']}:{info['hb_port']}")
    beats = []
    for i in range(5):
        t = time.monotonic()
        hb.send(b"beat %d" % i)
        assert hb.poll(1000), "no heartbeat answer within 1 s while the cell runs"
        assert hb.recv() == b"beat %d" % i
        beats.append(time.monotonic() - t)
    hb.close()
    request = k.kc.session.msg("kernel_info_request", {})
    k.kc.control_channel.send(request)
    control = k.kc.control_channel.get_msg(timeout=2)
    assert control["parent_header"]["msg_id"] == request["header"]["msg_id"]
    assert control["content"]["status"] == "ok"
    answered = time.monotonic()
    reply, out = k.collect(msg_id)
    assert reply["status"] == "ok"
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "'done'"
    # All of it happened while the cell was still running.
    assert answered < reply["received"] - 1.0, (started, answered, reply["received"])
    assert max(beats) < 0.5, beats


def test_complete_inspect_and_is_complete(kernel):
    kernel.execute("import math\nmy_variable = 3")
    kc = kernel.kc
    kc.complete("my_var", 6)
    reply = kc.get_shell_msg(timeout=10)["content"]
    assert "my_variable" in reply["matches"] and reply["cursor_start"] == 0
    kc.complete("math.sq", 7)
    assert "math.sqrt" in kc.get_shell_msg(timeout=10)["content"]["matches"]
    kc.inspect("math.sqrt", 9)
    reply = kc.get_shell_msg(timeout=10)["content"]
    assert reply["found"] and "square root" in reply["data"]["text/plain"]
    for code, status in [("x = 1", "complete"), ("for i in range(3):", "incomplete"), ("x = = 1", "invalid")]:
        kc.is_complete(code)
        assert kc.get_shell_msg(timeout=10)["content"]["status"] == status


def test_history_tail_and_search(kernel):
    kernel.execute("history_marker = 'hm'")
    kernel.kc.history(hist_access_type="tail", n=1, output=False, raw=True)
    reply = kernel.kc.get_shell_msg(timeout=10)["content"]
    assert reply["history"][-1][2] == "history_marker = 'hm'"
    kernel.kc.history(hist_access_type="search", pattern="history_marker*", output=False, raw=True)
    assert len(kernel.kc.get_shell_msg(timeout=10)["content"]["history"]) == 1


def test_kernel_info_describes_python_in_a_sandbox(kernel):
    kernel.kc.kernel_info()
    info = kernel.kc.get_shell_msg(timeout=10)["content"]
    assert info["language_info"]["name"] == "python"
    assert info["language_info"]["version"].startswith("3.15")
    assert info["implementation"] == "sandgate" and info["protocol_version"] == "5.3"


def test_magics_and_pip_give_clear_answers(kernel):
    reply, out = kernel.execute("%matplotlib inline\nmagic_ok = 1")
    assert reply["status"] == "ok"
    # Without the gateway there is nothing to fetch packages with: it says so.
    reply, _ = kernel.execute("%pip install requests")
    assert reply["ename"] == "PipError" and "needs the Sandgate gateway" in reply["evalue"]
    assert "no network" in reply["evalue"]
    # `!` runs the sandbox's own commands; a program it does not have is one clear line.
    reply, _ = kernel.execute("!git status")
    assert reply["ename"] == "UsageError" and "git: not available" in reply["evalue"]


def test_what_the_image_leaves_out_says_so(kernel):
    """scikit-learn's sample images are not in the image (and its Pillow has no JPEG codec):
    load_sample_image says that, instead of a bare "No module named"."""
    reply, _ = kernel.execute("from sklearn.datasets import load_sample_image\nload_sample_image('china.jpg')")
    assert reply["ename"] == "ImportError", reply
    assert "left out of the sandbox image" in reply["evalue"] and "JPEG" in reply["evalue"]
    _, out = kernel.execute("from sklearn.datasets import load_iris\nload_iris().data.shape")
    assert [m["content"]["data"]["text/plain"] for m in of_type(out, "execute_result")] == ["(150, 4)"]


def test_restart_gives_a_fresh_interpreter(start_kernel):
    k = start_kernel()
    k.execute("before_restart = 1")
    k.km.restart_kernel(now=False)
    k.kc.wait_for_ready(timeout=60)
    reply, _ = k.execute("before_restart")
    assert reply["ename"] == "NameError"


def test_a_subscriber_that_stops_reading_does_not_stop_the_kernel(start_kernel):
    """A second iopub subscriber that reads nothing (its buffers full) costs the kernel a short
    stall, then its messages are dropped: the cell finishes, and once that subscriber has gone
    the one that reads gets every message of the next cell."""
    import zmq
    k = start_kernel()
    info = k.km.get_connection_info()
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(f"{info['transport']}://{info['ip']}:{info['iopub_port']}")
    try:
        # Subscribed once a message reaches it; from then on it never reads again.
        for _ in range(100):
            k.execute("0")
            if stuck.poll(100):
                break
        else:
            raise AssertionError("the second subscriber never received anything")
        started = time.monotonic()
        msg_id = k.kc.execute("for i in range(6000):\n    print('y' * 1000, flush=True)\n'flooded'")
        reply = k.kc.get_shell_msg(timeout=120)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = k.kc.get_shell_msg(timeout=120)
        assert reply["content"]["status"] == "ok"
        assert time.monotonic() - started < 60
    finally:
        stuck.close(linger=0)
        ctx.term()
    # The reading client sees the next cell whole (its idle included).
    reply, out = k.execute("'after'")
    assert reply["status"] == "ok"
    assert [m["content"]["data"]["text/plain"] for m in of_type(out, "execute_result")] == ["'after'"]


def test_result_comes_after_the_cells_output_and_before_user_expressions_output(kernel):
    _, out = kernel.execute("print('from the cell')\n6 * 7")
    assert [m["msg_type"] for m in out] == ["execute_input", "stream", "execute_result"]
    reply, out = kernel.execute(
        "print('from the cell')\n6 * 7",
        user_expressions={"seen": "print('from the expression') or 5"},
    )
    assert [m["msg_type"] for m in out] == ["execute_input", "stream", "execute_result", "stream"]
    assert out[1]["content"]["text"] == "from the cell\n"
    assert out[2]["content"]["data"]["text/plain"] == "42"
    assert out[3]["content"]["text"] == "from the expression\n"
    assert reply["user_expressions"]["seen"]["data"]["text/plain"] == "5"


def test_a_failing_rich_repr_warns_before_the_plain_result(kernel):
    reply, out = kernel.execute(
        "class Shy:\n"
        "    def _repr_html_(self):\n"
        "        raise RuntimeError('no html today')\n"
        "    def __repr__(self):\n"
        "        return 'Shy()'\n"
        "Shy()"
    )
    assert reply["status"] == "ok"
    assert [m["msg_type"] for m in out] == ["execute_input", "stream", "execute_result"]
    assert out[1]["content"]["name"] == "stderr" and "no html today" in out[1]["content"]["text"]
    assert out[2]["content"]["data"] == {"text/plain": "Shy()"}


def test_user_variables_named_in_and_out_break_nothing(kernel):
    reply, _ = kernel.execute("In = 'mine'\nOut = 3")
    assert reply["status"] == "ok"
    reply, out = kernel.execute("1 + 1")
    assert reply["status"] == "ok"
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "2"
    reply, out = kernel.execute("In, Out, _")
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == "('mine', 3, 2)"


def test_cell_text_with_unusual_characters_runs_exactly(kernel):
    # The kernel hands the request to the interpreter as one line of JSON after a comment
    # marker: line and paragraph separators, a form feed, non-BMP text and a backslash-n in
    # the source must arrive unchanged.
    text = "a\u2028b\u2029c\x0cd\U0001f600é\\n#"
    reply, out = kernel.execute(f"s = {text!r}\nlen(s), s")
    assert reply["status"] == "ok"
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/plain"] == repr((len(text), text))
    reply, out = kernel.execute("# a cell that is only a comment\u2028 with a separator")
    assert reply["status"] == "ok" and of_type(out, "execute_result") == []
