"""`get_ipython()` through jupyter_client: the shell object libraries and notebooks exported as
scripts use (magics, events, display formatters, config, the kernel), with matplotlib's inline
figures still shown once per cell."""

from conftest import of_type, stdout_text


def ok(k, code):
    reply, out = k.execute(code)
    assert reply["status"] == "ok", (code, reply)
    return out


def result_text(outputs):
    return [m["content"]["data"]["text/plain"] for m in of_type(outputs, "execute_result")]


def test_the_shell_is_there_as_in_a_jupyter_kernel(start_kernel):
    k = start_kernel()
    out = ok(k, "ip = get_ipython()\n"
                "from IPython import get_ipython as g1\n"
                "from IPython.core.getipython import get_ipython as g2\n"
                "(type(ip).__name__, ip is g1() is g2(), 'IPKernelApp' in ip.config,\n"
                " ip.user_ns is globals(), bool(ip.kernel))")
    assert result_text(out) == ["('ZMQInteractiveShell', True, True, True, True)"]
    # pandas learns it runs in a notebook frontend from the shell's type.
    out = ok(k, "from pandas.io.formats.console import in_ipython_frontend\nin_ipython_frontend()")
    assert result_text(out) == ["True"]
    # ip.push / ev / ex reach the user's namespace.
    out = ok(k, "ip.push({'pushed': 41})\nip.ex('pushed += 1')\nip.ev('pushed')")
    assert result_text(out) == ["42"]


def test_a_notebook_exported_as_a_script_runs(start_kernel):
    """`jupyter nbconvert --to script` turns magics into get_ipython() calls."""
    k = start_kernel()
    out = ok(k, "get_ipython().run_cell_magic('writefile', 'exported.txt', 'line one\\n')\n"
                "get_ipython().run_line_magic('config', \"InlineBackend.figure_format = 'svg'\")\n"
                "get_ipython().run_line_magic('matplotlib', 'inline')\n"
                "import matplotlib.pyplot as plt\n"
                "plt.plot([1, 2, 3])\n"
                "print(open('exported.txt').read())")
    assert stdout_text(out).endswith("line one\n\n")
    figures = of_type(out, "display_data")
    assert len(figures) == 1 and "image/svg+xml" in figures[0]["content"]["data"], figures
    # The old spelling, and a magic that does not exist: a UsageError, as in IPython.
    reply, _ = k.execute("get_ipython().magic('nosuchmagic')")
    assert reply["ename"] == "UsageError" and "nosuchmagic" in reply["evalue"], reply
    # run_cell runs IPython's syntax and keeps the error in its result.
    out = ok(k, "r = get_ipython().run_cell('x_rc = 6 * 7\\n%env SOME_VAR=1\\nx_rc')\n"
                "bad = get_ipython().run_cell('1/0')\n"
                "r.success, r.result, bad.success, type(bad.error_in_exec).__name__")
    assert result_text(out)[-1] == "(True, 42, False, 'ZeroDivisionError')"
    assert [m["content"]["ename"] for m in of_type(out, "error")] == ["ZeroDivisionError"]


def test_events_fire_around_every_cell(start_kernel):
    k = start_kernel()
    ok(k, "seen = []\n"
          "ip = get_ipython()\n"
          "def pre(): seen.append('pre_execute')\n"
          "def pre_cell(info): seen.append(('pre_run_cell', info.raw_cell))\n"
          "def post(): seen.append('post_execute')\n"
          "def post_cell(result): seen.append(('post_run_cell', result.success, result.result))\n"
          "for name, f in [('pre_execute', pre), ('pre_run_cell', pre_cell),\n"
          "                ('post_execute', post), ('post_run_cell', post_cell)]:\n"
          "    ip.events.register(name, f)")
    ok(k, "seen.clear()\n7 * 6")
    reply, _ = k.execute("1/0")
    assert reply["ename"] == "ZeroDivisionError"
    out = ok(k, "print(seen)")
    assert stdout_text(out) == str([
        "post_execute", ("post_run_cell", True, 42), "pre_execute", ("pre_run_cell", "1/0"),
        "post_execute", ("post_run_cell", False, None), "pre_execute", ("pre_run_cell", "print(seen)")]) + "\n"
    # A failing callback is reported and the cell still runs; unregister stops one.
    out = ok(k, "def broken(): raise ValueError('callback broke')\n"
                "ip.events.register('pre_execute', broken)\n"
                "for name, f in [('pre_execute', pre), ('pre_run_cell', pre_cell),\n"
                "                ('post_execute', post), ('post_run_cell', post_cell)]:\n"
                "    ip.events.unregister(name, f)")
    out = ok(k, "seen.clear()\n'ran'")
    assert result_text(out) == ["'ran'"]
    assert "callback broke" in stdout_text(out, "stderr")
    out = ok(k, "ip.events.unregister('pre_execute', broken)\nseen")
    assert result_text(out) == ["[]"]
    reply, _ = k.execute("ip.events.register('no_such_event', print)")
    assert reply["ename"] == "KeyError"


def test_display_formatters_registered_for_types(start_kernel):
    k = start_kernel()
    out = ok(k, "class Point:\n"
                "    def __init__(self, x, y): self.x, self.y = x, y\n"
                "f = get_ipython().display_formatter.formatters\n"
                "f['text/html'].for_type(Point, lambda p: f'<b>({p.x}, {p.y})</b>')\n"
                "f['text/plain'].for_type(Point, lambda p, printer, cycle: printer.text(f'Point{(p.x, p.y)}'))\n"
                "Point(1, 2)")
    data = of_type(out, "execute_result")[0]["content"]["data"]
    assert data["text/html"] == "<b>(1, 2)</b>" and data["text/plain"] == "Point(1, 2)", data
    # By name, before the type exists, as libraries register for types they may not import.
    out = ok(k, "f['text/markdown'].for_type_by_name('collections', 'OrderedDict', lambda d: '**od**')\n"
                "import collections\ncollections.OrderedDict(a=1)")
    assert of_type(out, "execute_result")[0]["content"]["data"]["text/markdown"] == "**od**"


def test_matplotlib_inline_figures_are_shown_once_with_the_shell_present(start_kernel):
    """matplotlib registers a post_execute hook when it finds a shell: figures still come out
    once, at the end of the cell that drew them."""
    k = start_kernel()
    out = ok(k, "get_ipython()\nimport matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.title('once')")
    assert len(of_type(out, "display_data")) == 1
    out = ok(k, "[getattr(f, '__name__', '') for f in get_ipython().events.callbacks['post_execute']]")
    assert "_draw_all_if_interactive" in result_text(out)[0]
    out = ok(k, "x_after = 1")
    assert of_type(out, "display_data") == []
    out = ok(k, "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [1, 2])\nplt.show()\n'shown'")
    assert len(of_type(out, "display_data")) == 1 and result_text(out) == ["'shown'"]


def test_an_interrupt_inside_an_event_callback_is_the_cells_error(start_kernel):
    """A KeyboardInterrupt (an interrupt, a time limit) that lands while a callback runs ends
    that cell with a proper error, published as any other, and the kernel goes on."""
    k = start_kernel()
    ok(k, "pre_armed, post_armed = [], []\n"
          "def stop_pre(*args):\n    if pre_armed:\n        pre_armed.pop()\n"
          "        raise KeyboardInterrupt('in a callback')\n"
          "def stop_post(*args):\n    if post_armed:\n        post_armed.pop()\n"
          "        raise KeyboardInterrupt('in a callback')\n"
          "get_ipython().events.register('pre_run_cell', stop_pre)\n"
          "get_ipython().events.register('post_execute', stop_post)")
    ok(k, "pre_armed.append(1)")
    reply, out = k.execute("never = 'ran'")
    assert reply["ename"] == "KeyboardInterrupt", reply
    assert [m["content"]["ename"] for m in of_type(out, "error")] == ["KeyboardInterrupt"]
    reply, out = k.execute("post_armed.append(1)\nafter = 'ran'")
    assert reply["ename"] == "KeyboardInterrupt", reply
    assert [m["content"]["ename"] for m in of_type(out, "error")] == ["KeyboardInterrupt"]
    out = ok(k, "'never' in globals(), after")
    assert result_text(out) == ["(False, 'ran')"]
