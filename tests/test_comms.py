"""Jupyter comms in the sandbox kernel (issue 15), so ipywidgets and tqdm.notebook work as with
ipykernel: comms the kernel opens (the `comm` package's `create_comm`) reach the client with their
data, metadata and binary buffers; a frontend's `comm_open`, `comm_msg` and `comm_close` run the
target's, or the comm's, handlers inside busy/idle, their output a child of that message;
`comm_info_request` lists the open comms; a handler that raises, or is interrupted, leaves the
kernel working. Through jupyter_client against the kernelspec, and through the gateway's
WebSocket in both framings.

The real wheels of comm, traitlets, ipywidgets, widgetsnbextension and jupyterlab_widgets
(pinned in conftest.WIDGET_WHEELS) are fetched on the host with `pip download` and unzipped into
the kernel's working folder, where the guest imports them ('' is on its sys.path): no %pip."""

import base64
import queue
import time
import uuid

import pytest

from conftest import TIMEOUT, WIDGET_IMPORTS, KernelSocket, KernelStarter, of_type, stdout_text, unzip_wheels


@pytest.fixture(scope="module")
def wk(kernels_dir, tmp_path_factory, widget_wheels):
    """One kernel with the five widget packages unzipped in its working folder, shared by the tests
    that keep to their own names and comm targets."""
    starter = KernelStarter(kernels_dir, tmp_path_factory)
    k = starter()
    unzip_wheels(widget_wheels, k.workspace)
    yield k
    starter.close()


def ok(k, code):
    reply, out = k.execute(code)
    assert reply["status"] == "ok", (code, reply, out)
    return out


def result(out):
    return [m["content"]["data"]["text/plain"] for m in of_type(out, "execute_result")]


def send(k, msg_type, content, buffers=(), metadata=None):
    """Sends a frontend's message on shell, as JupyterLab's widget manager does; returns its id."""
    msg = k.kc.session.msg(msg_type, content, metadata=metadata)
    if buffers:
        msg["buffers"] = list(buffers)
    k.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def until_idle(k, msg_id, timeout=TIMEOUT, during=None):
    """The iopub messages whose parent is `msg_id`, from its `busy` to its `idle` (a comm message
    has no reply). `during(message)` is called with each as it arrives."""
    deadline = time.monotonic() + timeout
    out, busy = [], False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no idle for {msg_id}; busy={busy}, got {out}")
        try:
            m = k.kc.get_iopub_msg(timeout=min(left, 1))
        except queue.Empty:
            continue
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status":
            state = m["content"]["execution_state"]
            if state == "busy":
                assert not busy and not out, out
                busy = True
            elif state == "idle":
                assert busy, f"idle before busy for {msg_id}"
                return out
            continue
        assert busy, f"{m['msg_type']} before busy for {msg_id}"
        out.append(m)
        if during is not None:
            during(m)


def comm_info(k, target_name=None):
    msg_id = k.kc.comm_info(target_name)
    reply, _ = k.collect(msg_id)
    assert reply["status"] == "ok", reply
    return reply["comms"]


def comm_id_of(out):
    return result(out)[-1].strip("'")


def test_a_comm_the_kernel_opens_reaches_the_client_with_data_metadata_and_buffers(wk):
    reply, out = wk.execute(
        "import comm\n"
        "c1 = comm.create_comm(target_name='t1', data={'a': 1}, metadata={'m': 2},\n"
        "                      buffers=[b'\\x00\\x01', memoryview(b'xyz')])\n"
        "c1.send({'x': [1, 2.5, None]}, {'k': 'v'}, [bytearray(b'abc')])\n"
        "type(c1).__name__, comm.get_comm_manager() is get_ipython().kernel.comm_manager, c1.comm_id")
    assert reply["status"] == "ok", reply
    name, same, comm_id = eval(result(out)[0])
    assert (name, same) == ("Comm", True)
    [opened] = of_type(out, "comm_open")
    assert opened["content"] == {"comm_id": comm_id, "target_name": "t1", "target_module": None,
                                 "data": {"a": 1}}
    assert opened["metadata"] == {"m": 2}
    assert [bytes(b) for b in opened["buffers"]] == [b"\x00\x01", b"xyz"]
    [sent] = of_type(out, "comm_msg")
    assert sent["content"] == {"comm_id": comm_id, "data": {"x": [1, 2.5, None]}}
    assert sent["metadata"] == {"k": "v"} and [bytes(b) for b in sent["buffers"]] == [b"abc"]
    # Both are children of the cell that sent them, in the order it sent them.
    kinds = [m["msg_type"] for m in out]
    assert kinds.index("comm_open") < kinds.index("comm_msg") < kinds.index("execute_result")
    assert comm_info(wk, "t1") == {comm_id: {"target_name": "t1"}}


def test_a_client_comm_msg_runs_the_comms_on_msg_and_its_output_has_that_parent(wk):
    out = ok(wk, "import comm\n"
                 "c2 = comm.create_comm(target_name='t2')\n"
                 "def on2(msg):\n"
                 "    parent = get_ipython().kernel.get_parent()\n"
                 "    print('got', msg['content']['data'], [bytes(b) for b in msg['buffers']],\n"
                 "          msg['header']['msg_type'], parent['header']['msg_id'] == msg['header']['msg_id'])\n"
                 "    c2.send({'echo': msg['content']['data']}, buffers=[bytes(b)[::-1] for b in msg['buffers']])\n"
                 "    display({'text/plain': 'shown'}, raw=True)\n"
                 "c2.on_msg(on2)\n"
                 "c2.comm_id")
    comm_id = comm_id_of(out)
    msg_id = send(wk, "comm_msg", {"comm_id": comm_id, "data": {"n": 7}}, [b"\x01\x02\x03"])
    out = until_idle(wk, msg_id)
    assert stdout_text(out) == "got {'n': 7} [b'\\x01\\x02\\x03'] comm_msg True\n", out
    [echo] = of_type(out, "comm_msg")
    assert echo["content"] == {"comm_id": comm_id, "data": {"echo": {"n": 7}}}
    assert [bytes(b) for b in echo["buffers"]] == [b"\x03\x02\x01"]
    assert [m["content"]["data"] for m in of_type(out, "display_data")] == [{"text/plain": "shown"}]
    # A cell after it sees the kernel as before.
    assert result(ok(wk, "6 * 7")) == ["42"]


def test_comm_info_lists_the_open_comms_and_filters_by_target(start_kernel, widget_wheels):
    k = start_kernel()
    assert comm_info(k) == {}
    unzip_wheels(widget_wheels, k.workspace, ["comm"])
    out = ok(k, "import comm\n"
                "a1, a2, b = (comm.create_comm(target_name=t) for t in ('a', 'a', 'b'))\n"
                "a1.comm_id, a2.comm_id, b.comm_id")
    a1, a2, b = eval(result(out)[0])
    assert comm_info(k) == {a1: {"target_name": "a"}, a2: {"target_name": "a"}, b: {"target_name": "b"}}
    assert comm_info(k, "a") == {a1: {"target_name": "a"}, a2: {"target_name": "a"}}
    assert comm_info(k, "nothing") == {}


def test_comms_close_both_ways(wk):
    out = ok(wk, "import comm\n"
                 "c3, c4 = comm.create_comm(target_name='t3'), comm.create_comm(target_name='t3')\n"
                 "c4.on_close(lambda msg: print('closed by the frontend', msg['content']['data']))\n"
                 "c3.comm_id, c4.comm_id")
    c3, c4 = eval(result(out)[0])
    assert set(comm_info(wk, "t3")) == {c3, c4}
    # The kernel closes one: the client is told, with the data.
    out = ok(wk, "c3.close({'bye': 1})\nc3.close()")
    [closed] = of_type(out, "comm_close")
    assert closed["content"] == {"comm_id": c3, "data": {"bye": 1}}
    assert comm_info(wk, "t3") == {c4: {"target_name": "t3"}}
    # The frontend closes the other: its on_close runs, inside busy/idle with that parent.
    msg_id = send(wk, "comm_close", {"comm_id": c4, "data": {"why": "done"}})
    out = until_idle(wk, msg_id)
    assert stdout_text(out) == "closed by the frontend {'why': 'done'}\n"
    assert comm_info(wk, "t3") == {}
    # A message to a comm that is gone: a warning on stderr, as ipykernel logs one.
    out = until_idle(wk, send(wk, "comm_msg", {"comm_id": c4, "data": {}}))
    assert stdout_text(out, "stderr") == f"No such comm: {c4}\n"


def test_a_frontend_opens_a_comm_to_a_registered_target(wk):
    ok(wk, "def echo_target(comm, msg):\n"
           "    print('opened', msg['content']['data'], [bytes(b) for b in msg['buffers']])\n"
           "    comm.on_msg(lambda m: comm.send({'echo': m['content']['data']}))\n"
           "    comm.send({'hello': True})\n"
           "get_ipython().kernel.comm_manager.register_target('echo-target', echo_target)\n"
           "import comm\n"
           "comm.get_comm_manager().register_target('other-target', 'builtins.print')")
    comm_id = uuid.uuid4().hex
    msg_id = send(wk, "comm_open", {"comm_id": comm_id, "target_name": "echo-target", "data": {"x": 1}},
                  [b"open-buffer"])
    out = until_idle(wk, msg_id)
    assert stdout_text(out) == "opened {'x': 1} [b'open-buffer']\n"
    assert [(m["msg_type"], m["content"]) for m in out if m["msg_type"].startswith("comm_")] == [
        ("comm_msg", {"comm_id": comm_id, "data": {"hello": True}})]
    assert comm_info(wk, "echo-target") == {comm_id: {"target_name": "echo-target"}}
    out = until_idle(wk, send(wk, "comm_msg", {"comm_id": comm_id, "data": {"y": 2}}))
    assert [m["content"] for m in of_type(out, "comm_msg")] == [{"comm_id": comm_id, "data": {"echo": {"y": 2}}}]
    # A target given as an import string.
    other = uuid.uuid4().hex
    out = until_idle(wk, send(wk, "comm_open", {"comm_id": other, "target_name": "other-target", "data": {}}))
    assert stdout_text(out).startswith("<Comm ") and not of_type(out, "comm_close")


def test_a_frontend_comm_open_to_an_unknown_target_is_closed(start_kernel):
    """Without the comm package at all: the kernel's own comm manager answers, as ipykernel's."""
    k = start_kernel()
    comm_id = uuid.uuid4().hex
    msg_id = send(k, "comm_open", {"comm_id": comm_id, "target_name": "no-such-target", "data": {}})
    out = until_idle(k, msg_id)
    assert [(m["msg_type"], m["content"]) for m in out if m["msg_type"] != "stream"] == [
        ("comm_close", {"comm_id": comm_id, "data": {}})]
    assert stdout_text(out, "stderr") == "No such comm target registered: no-such-target\n"
    assert comm_info(k) == {}
    assert result(ok(k, "1 + 1")) == ["2"]


def test_handlers_that_raise_leave_the_kernel_working(wk):
    out = ok(wk, "import comm\n"
                 "c5 = comm.create_comm(target_name='t5')\n"
                 "c5.on_msg(lambda msg: 1 / 0)\n"
                 "c5.on_close(lambda msg: {}['missing'])\n"
                 "def broken_target(comm, msg):\n"
                 "    raise ValueError('no thanks')\n"
                 "comm.get_comm_manager().register_target('broken', broken_target)\n"
                 "c5.comm_id")
    c5 = comm_id_of(out)
    out = until_idle(wk, send(wk, "comm_msg", {"comm_id": c5, "data": {}}))
    err = stdout_text(out, "stderr")
    assert err.startswith(f"Exception in comm_msg for {c5}\n") and "ZeroDivisionError: division by zero" in err, err
    assert "<lambda>" in err and "<sandgate-driver>" not in err, err
    # A target that raises: logged, and the comm closed again.
    opened = uuid.uuid4().hex
    out = until_idle(wk, send(wk, "comm_open", {"comm_id": opened, "target_name": "broken", "data": {}}))
    err = stdout_text(out, "stderr")
    assert err.startswith("Exception opening comm with target: broken\n") and "ValueError: no thanks" in err, err
    assert [m["content"] for m in of_type(out, "comm_close")] == [{"comm_id": opened, "data": {}}]
    out = until_idle(wk, send(wk, "comm_close", {"comm_id": c5, "data": {}}))
    assert "KeyError: 'missing'" in stdout_text(out, "stderr")
    # Malformed messages (no comm_id, a comm_id that is not a string, no target): said on stderr.
    for content in ({"data": {}}, {"comm_id": [1], "data": {}}, {"comm_id": "x"}):
        for msg_type in ("comm_msg", "comm_open", "comm_close"):
            until_idle(wk, send(wk, msg_type, content))
    assert result(ok(wk, "c5.comm_id in get_ipython().kernel.comm_manager.comms, 2 + 2")) == ["(False, 4)"]


def test_an_interrupt_stops_a_comm_handler_and_the_kernel_keeps_its_state(wk):
    out = ok(wk, "import comm\n"
                 "kept = 'still here'\n"
                 "c6 = comm.create_comm(target_name='t6')\n"
                 "def spin(msg):\n"
                 "    print('spinning', flush=True)\n"
                 "    while True:\n"
                 "        pass\n"
                 "c6.on_msg(spin)\n"
                 "c6.comm_id")
    c6 = comm_id_of(out)
    interrupted = []

    def interrupt_once_spinning(m):
        if m["msg_type"] == "stream" and "spinning" in m["content"]["text"] and not interrupted:
            interrupted.append(True)
            wk.km.interrupt_kernel()

    out = until_idle(wk, send(wk, "comm_msg", {"comm_id": c6, "data": {}}), during=interrupt_once_spinning)
    assert interrupted
    err = stdout_text(out, "stderr")
    assert "KeyboardInterrupt" in err, out
    assert result(ok(wk, "kept")) == ["'still here'"]


def test_an_int_slider_update_prints_into_an_output_widget(wk):
    """JupyterLab moves a slider: its comm_msg's observe callback prints inside `with out:`, and the
    Output widget captures it (the frontend matches the output's parent to the widget's msg_id)."""
    out = ok(wk, "import ipywidgets as widgets\n"
                 "slider, shown = widgets.IntSlider(description='x'), widgets.Output()\n"
                 "def moved(change):\n"
                 "    with shown:\n"
                 "        print('value', change['new'])\n"
                 "slider.observe(moved, names='value')\n"
                 "display(slider, shown)")
    opened = {m["content"]["data"]["state"]["_model_name"]: m for m in of_type(out, "comm_open")}
    slider_open, output_open = opened["IntSliderModel"], opened["OutputModel"]
    for m in (slider_open, output_open):
        assert m["content"]["target_name"] == "jupyter.widget"
        assert m["metadata"] == {"version": "2.1.0"}  # the widget manager checks the protocol's version
    views = [m["content"]["data"]["application/vnd.jupyter.widget-view+json"] for m in of_type(out, "display_data")]
    assert [v["model_id"] for v in views] == [slider_open["content"]["comm_id"], output_open["content"]["comm_id"]]
    assert views[0]["version_major"] == 2

    output_id = output_open["content"]["comm_id"]
    msg_id = send(wk, "comm_msg", {"comm_id": slider_open["content"]["comm_id"],
                                   "data": {"method": "update", "state": {"value": 5}, "buffer_paths": []}})
    out = until_idle(wk, msg_id)
    steps = []
    for m in out:
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == output_id:
            steps.append(("msg_id", m["content"]["data"]["state"]["msg_id"]))
        elif m["msg_type"] == "stream":
            steps.append((m["content"]["name"], m["content"]["text"]))
    assert steps == [("msg_id", msg_id), ("stdout", "value 5\n"), ("msg_id", "")], out
    assert result(ok(wk, "slider.value")) == ["5"]


def test_interact_clears_its_output_and_prints_into_it(wk):
    """`@interact`: moving its slider runs the function again inside the Output, after a
    `clear_output(wait=True)`, all children of the frontend's message."""
    out = ok(wk, "from ipywidgets import interact\n"
                 "@interact(x=3)\n"
                 "def square(x):\n"
                 "    print('square', x * x)")
    states = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in of_type(out, "comm_open")}
    [slider] = [cid for cid, st in states.items() if st["_model_name"] == "IntSliderModel"]
    [output] = [cid for cid, st in states.items() if st["_model_name"] == "OutputModel"]
    assert "square 9\n" in stdout_text(out)  # the first call, when the cell runs
    msg_id = send(wk, "comm_msg", {"comm_id": slider,
                                   "data": {"method": "update", "state": {"value": 4}, "buffer_paths": []}})
    steps = []
    for m in until_idle(wk, msg_id):
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == output:
            steps.append(("msg_id", m["content"]["data"]["state"].get("msg_id")))
        elif m["msg_type"] in ("clear_output", "stream"):
            steps.append((m["msg_type"], m["content"].get("wait", m["content"].get("text"))))
    assert steps == [("msg_id", msg_id), ("clear_output", True), ("stream", "square 16\n"), ("msg_id", "")], steps


def test_interact_shows_the_figure_its_function_draws_inside_its_output(wk):
    """As with ipykernel's inline backend: no `plt.show()` needed, the figure goes into the
    interact's Output (between the msg_id it sets and the one it clears), not after it."""
    out = ok(wk, "import matplotlib.pyplot as plt\n"
                 "from ipywidgets import interact\n"
                 "@interact(n=3)\n"
                 "def line(n):\n"
                 "    plt.plot(range(n))")
    states = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in of_type(out, "comm_open")}
    [slider] = [cid for cid, st in states.items() if st["_model_name"] == "IntSliderModel"]
    [output] = [cid for cid, st in states.items() if st["_model_name"] == "OutputModel"]
    msg_id = send(wk, "comm_msg", {"comm_id": slider,
                                   "data": {"method": "update", "state": {"value": 5}, "buffer_paths": []}})
    steps = []
    for m in until_idle(wk, msg_id):
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == output:
            steps.append(("msg_id", m["content"]["data"]["state"].get("msg_id")))
        elif m["msg_type"] == "display_data":
            steps.append(("figure", "image/png" in m["content"]["data"]))
    assert steps == [("msg_id", msg_id), ("figure", True), ("msg_id", "")], steps


def test_widgets_with_binary_state_both_ways(wk):
    """An Image's bytes go to the frontend as a buffer of its comm_open; a FileUpload's file comes
    from the frontend as a buffer of its update (`buffer_paths`), as JupyterLab sends it."""
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    out = ok(wk, f"import ipywidgets as widgets\n"
                 f"image = widgets.Image(value={png!r}, format='png')\n"
                 f"upload = widgets.FileUpload()\n"
                 f"display(image, upload)")
    opened = {m["content"]["data"]["state"]["_model_name"]: m for m in of_type(out, "comm_open")}
    image = opened["ImageModel"]
    assert image["content"]["data"]["buffer_paths"] == [["value"]]
    assert [bytes(b) for b in image["buffers"]] == [png]
    upload = opened["FileUploadModel"]["content"]["comm_id"]
    state = {"value": [{"name": "data.csv", "type": "text/csv", "size": 8, "last_modified": 1767225600000}]}
    msg_id = send(wk, "comm_msg", {"comm_id": upload, "data": {"method": "update", "state": state,
                                                              "buffer_paths": [["value", 0, "content"]]}},
                  [b"a,b\n1,2\n"])
    until_idle(wk, msg_id)
    assert result(ok(wk, "f = upload.value[0]\nf.name, f.size, type(f.content).__name__, f.content.tobytes()")) == [
        "('data.csv', 8, 'memoryview', b'a,b\\n1,2\\n')"]
    # A page reload: JupyterLab's widget manager opens the control comm and asks for every
    # widget's state, which comes back in one message, the Image's bytes as a buffer.
    control = uuid.uuid4().hex
    out = until_idle(wk, send(wk, "comm_open", {"comm_id": control, "target_name": "jupyter.widget.control",
                                                "data": {}}, metadata={"version": "1.0.0"}))
    assert not of_type(out, "comm_close") and not stdout_text(out, "stderr"), out
    out = until_idle(wk, send(wk, "comm_msg", {"comm_id": control, "data": {"method": "request_states"}}))
    [states] = of_type(out, "comm_msg")
    data = states["content"]["data"]
    assert data["method"] == "update_states" and image["content"]["comm_id"] in data["states"], data.keys()
    at = data["buffer_paths"].index([image["content"]["comm_id"], "state", "value"])
    assert bytes(states["buffers"][at]) == png


def test_the_kernels_get_parent_is_the_request_being_served(wk):
    out = ok(wk, "k = get_ipython().kernel\n"
                 "p = k.get_parent()\n"
                 "get_ipython().set_parent(p)\n"
                 "p['header']['msg_type'], p['msg_id'] == p['header']['msg_id'], p['content']['code'][:5],"
                 " get_ipython().get_parent() is p")
    [text] = result(out)
    assert text == "('execute_request', True, 'k = g', True)", text
    reply, out = wk.execute("get_ipython().set_parent({'header': {'msg_id': 'another'}})")
    assert reply["ename"] == "NotImplementedError" and "parent" in reply["evalue"], reply


def test_a_tqdm_notebook_bar_reaches_100_percent(wk):
    reply, out = wk.execute("from tqdm.notebook import tqdm\nfor i in tqdm(range(50), desc='work'):\n    pass")
    assert reply["status"] == "ok", reply
    assert not stdout_text(out, "stderr"), out  # no warning about tqdm's monitor thread
    opened = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in of_type(out, "comm_open")}
    [bar] = [cid for cid, state in opened.items() if state["_model_name"] == "FloatProgressModel"]
    assert opened[bar]["max"] == 50
    state = dict(opened[bar])
    for m in of_type(out, "comm_msg"):
        if m["content"]["comm_id"] == bar:
            state.update(m["content"]["data"]["state"])
    assert state["value"] == 50 and state["bar_style"] == "success", state
    texts = [m["content"]["data"]["state"].get("value") for m in of_type(out, "comm_msg")]
    assert "work:\u2007100%" in texts, texts  # the label left of the bar
    [view] = of_type(out, "display_data")
    assert "application/vnd.jupyter.widget-view+json" in view["content"]["data"]


# --- through the gateway's WebSocket -------------------------------------------------------------

def install_by_cell(s, widget_wheels):
    """Unzips the wheels the kernel imports into its working folder from a cell (the gateway's
    kernels keep theirs in the encrypted workspace)."""
    blobs = [base64.b64encode(widget_wheels[name].read_bytes()).decode() for name in WIDGET_IMPORTS]
    reply, _ = s.execute("import base64, io, zipfile\n"
                         f"for blob in {blobs!r}:\n"
                         "    zipfile.ZipFile(io.BytesIO(base64.b64decode(blob))).extractall()")
    assert reply["status"] == "ok", reply


def collect_comm(s, msg_id, timeout=TIMEOUT):
    """The iopub messages of a comm message (no reply), from its busy to its idle."""
    deadline = time.monotonic() + timeout
    out, busy = [], False
    while True:
        s.ws.settimeout(max(0.1, deadline - time.monotonic()))
        m = s.recv()
        if m["parent_header"].get("msg_id") != msg_id or m["channel"] != "iopub":
            continue
        if m["msg_type"] == "status":
            busy = busy or m["content"]["execution_state"] == "busy"
            if m["content"]["execution_state"] == "idle":
                assert busy
                return out
        else:
            out.append(m)


@pytest.fixture(scope="module")
def widget_gateway(start_gateway):
    """A gateway of their own (its workspace gets the widget packages)."""
    return start_gateway(["--pool-size", "0"])


@pytest.mark.parametrize("v1", [False, True], ids=["legacy-json", "v1-binary"])
def test_comms_and_widgets_through_the_gateway(widget_gateway, widget_wheels, v1):
    gw = widget_gateway
    kernel = gw.start_kernel()
    s = KernelSocket(gw, kernel["id"], v1=v1)
    try:
        install_by_cell(s, widget_wheels)
        # A comm the kernel opens, with buffers: binary frames in either framing.
        reply, out = s.execute("import comm\n"
                               "c = comm.create_comm(target_name='gw', data={'a': 1}, buffers=[b'\\x00\\xffkernel'])\n"
                               "c.on_msg(lambda msg: c.send({'got': msg['content']['data']},\n"
                               "                            buffers=[bytes(b).upper() for b in msg['buffers']]))\n"
                               "c.comm_id")
        assert reply["status"] == "ok", reply
        [opened] = [m for m in out if m["msg_type"] == "comm_open"]
        comm_id = opened["content"]["comm_id"]
        assert opened["content"]["data"] == {"a": 1} and opened["content"]["target_name"] == "gw"
        assert [bytes(b) for b in opened["buffers"]] == [b"\x00\xffkernel"]
        # The client's comm_msg with a buffer reaches on_msg; its answer carries the parent.
        msg_id = s.send("comm_msg", {"comm_id": comm_id, "data": {"n": 1}}, buffers=[b"from the client"])
        out = collect_comm(s, msg_id)
        [answer] = [m for m in out if m["msg_type"] == "comm_msg"]
        assert answer["content"] == {"comm_id": comm_id, "data": {"got": {"n": 1}}}
        assert [bytes(b) for b in answer["buffers"]] == [b"FROM THE CLIENT"]
        msg_id = s.send("comm_info_request", {"target_name": "gw"})
        reply, _ = s.collect(msg_id)
        assert reply == {"status": "ok", "comms": {comm_id: {"target_name": "gw"}}}

        # A slider moved from the client prints into an Output widget.
        reply, out = s.execute("import ipywidgets as widgets\n"
                               "slider, shown = widgets.IntSlider(), widgets.Output()\n"
                               "def moved(change):\n"
                               "    with shown:\n"
                               "        print('value', change['new'])\n"
                               "slider.observe(moved, names='value')\n"
                               "display(slider, shown)")
        assert reply["status"] == "ok", reply
        models = {m["content"]["data"]["state"]["_model_name"]: m["content"]["comm_id"]
                  for m in out if m["msg_type"] == "comm_open"}
        msg_id = s.send("comm_msg", {"comm_id": models["IntSliderModel"],
                                     "data": {"method": "update", "state": {"value": 7}, "buffer_paths": []}})
        out = collect_comm(s, msg_id)
        captured = [m["content"]["data"]["state"]["msg_id"] for m in out
                    if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == models["OutputModel"]
                    and "msg_id" in m["content"]["data"]["state"]]
        assert captured == [msg_id, ""], out
        assert [m["content"]["text"] for m in out if m["msg_type"] == "stream"] == ["value 7\n"]
    finally:
        s.close()
        gw.request("DELETE", f"/api/kernels/{kernel['id']}")
