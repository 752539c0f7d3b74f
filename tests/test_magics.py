"""IPython's magics that notebooks use most, through jupyter_client: each does what IPython's
does, and the ones the sandbox cannot have say so in one line."""

import base64
import struct

from conftest import of_type, stdout_text


def result_text(outputs):
    return [m["content"]["data"]["text/plain"] for m in of_type(outputs, "execute_result")]


def write(path, text):
    path.write_text(text)


def test_workspace_modules_import_and_autoreload_updates_what_the_user_holds(start_kernel):
    k = start_kernel()
    helpers = k.workspace / "helpers_ar.py"
    write(helpers, "def f():\n    return 1\nclass C:\n    def m(self):\n        return 'old'\n")
    reply, out = k.execute("import helpers_ar\nfrom helpers_ar import f, C\nc = C()\nf(), c.m()")
    assert reply["status"] == "ok", reply
    assert result_text(out) == ["(1, 'old')"]

    # Without autoreload an edit is not seen, as in IPython.
    write(helpers, "def f():\n    return 22\nclass C:\n    def m(self):\n        return 'new'\n")
    _, out = k.execute("f(), c.m()")
    assert result_text(out) == ["(1, 'old')"]

    for line in ("%load_ext autoreload", "%autoreload 2"):
        reply, _ = k.execute(line)
        assert reply["status"] == "ok", reply
    write(helpers, "def f():\n    return 333\nclass C:\n    def m(self):\n        return 'newest'\n")
    _, out = k.execute("f(), c.m(), helpers_ar.f()")
    assert result_text(out) == ["(333, 'newest', 333)"]

    # A broken edit is reported and the cell runs on the code that was there.
    write(helpers, "def f(:\n")
    reply, out = k.execute("f()")
    assert reply["status"] == "ok"
    assert "autoreload of helpers_ar failed: SyntaxError" in stdout_text(out, "stderr")
    assert result_text(out) == ["333"]

    reply, _ = k.execute("%autoreload sometimes")
    assert reply["ename"] == "UsageError" and "sometimes" in reply["evalue"]


def test_a_workspace_file_cannot_shadow_the_images_modules(start_kernel):
    k = start_kernel()
    _, out = k.execute("import sys\n'statistics' in sys.modules, 'shlex' in sys.modules")
    assert result_text(out) == ["(False, False)"]  # so the imports below look them up
    for name in ("statistics", "shlex"):
        (k.workspace / f"{name}.py").write_text("raise RuntimeError('shadowed')\n")
    reply, out = k.execute("import statistics\nstatistics.mean([1, 2, 3])")
    assert reply["status"] == "ok", reply
    assert result_text(out) == ["2"]
    # The magics import shlex when first used.
    reply, out = k.execute("%%writefile -a shadow_note.txt\nnot shadowed")
    assert reply["status"] == "ok", reply
    assert (k.workspace / "shadow_note.txt").read_text() == "not shadowed\n"


def png_size(b64):
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_inline_backend_figure_formats(start_kernel):
    k = start_kernel()
    plot = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]);"
    _, out = k.execute(plot)
    (png,) = of_type(out, "display_data")
    width, height = png_size(png["content"]["data"]["image/png"])

    reply, _ = k.execute("%config InlineBackend.figure_format = 'retina'")
    assert reply["status"] == "ok"
    _, out = k.execute(plot)
    (retina,) = of_type(out, "display_data")
    w2, h2 = png_size(retina["content"]["data"]["image/png"])
    assert abs(w2 - 2 * width) <= 4 and abs(h2 - 2 * height) <= 4
    # Shown at the size of the plain PNG, with twice its pixels.
    assert retina["content"]["metadata"]["image/png"] == {"width": w2 // 2, "height": h2 // 2}

    k.execute("fmts = {'svg', 'png'}")
    reply, _ = k.execute("%config InlineBackend.figure_formats = fmts")
    assert reply["status"] == "ok"
    _, out = k.execute(plot)
    (both,) = of_type(out, "display_data")
    assert both["content"]["data"]["image/svg+xml"].lstrip().startswith("<?xml")
    png_size(both["content"]["data"]["image/png"])

    reply, out = k.execute("%config InlineBackend.figure_format = 'gif'")
    assert reply["ename"] == "UsageError" and "'gif'" in reply["evalue"] and "retina" in reply["evalue"]
    # A misused magic is one line, as in IPython, not a traceback into the driver.
    assert of_type(out, "error")[0]["content"]["traceback"] == [f"UsageError: {reply['evalue']}"]
    reply, _ = k.execute("%config Application.log_level = 10")
    assert reply["ename"] == "UsageError" and "InlineBackend.figure_format" in reply["evalue"]
    reply, _ = k.execute("%config IPCompleter.use_jedi = False")
    assert reply["status"] == "ok"


def test_writefile_then_run_with_arguments(kernel):
    reply, out = kernel.execute("%%writefile wf_script.py\nimport sys\nprint('args', sys.argv[1:], __name__)\nwf_made = 5")
    assert reply["status"] == "ok"
    assert stdout_text(out) == "Writing wf_script.py\n"
    assert (kernel.workspace / "wf_script.py").read_text().startswith("import sys\n")
    reply, out = kernel.execute("%%writefile -a wf_script.py\nwf_more = wf_made + 1")
    assert stdout_text(out) == "Appending to wf_script.py\n"

    reply, out = kernel.execute("%run wf_script.py one 'two words'")
    assert reply["status"] == "ok", reply
    assert stdout_text(out) == "args ['one', 'two words'] __main__\n"
    _, out = kernel.execute("wf_made, wf_more")
    assert result_text(out) == ["(5, 6)"]

    reply, _ = kernel.execute("%run wf_missing.py")
    assert reply["ename"] == "UsageError" and "wf_missing.py" in reply["evalue"]
    (kernel.workspace / "wf_fails.py").write_text("x = 1\nraise ValueError('from the script')\n")
    reply, out = kernel.execute("%run wf_fails.py")
    assert reply["ename"] == "ValueError"
    assert any("wf_fails.py" in line and "line 2" in line for line in reply["traceback"])


def test_env_sets_and_reads_the_sandbox_environment(kernel):
    _, out = kernel.execute("%env SG_MAGIC_VAR=forty two")
    assert stdout_text(out) == "env: SG_MAGIC_VAR=forty two\n"
    _, out = kernel.execute("%env SG_MAGIC_VAR")
    assert result_text(out) == ["'forty two'"]
    _, out = kernel.execute("import os\nos.environ['SG_MAGIC_VAR']")
    assert result_text(out) == ["'forty two'"]
    reply, _ = kernel.execute("%env SG_NOT_SET_ANYWHERE")
    assert reply["ename"] == "UsageError" and "SG_NOT_SET_ANYWHERE" in reply["evalue"]


def test_capture_keeps_a_cells_output_and_shows_it_on_request(kernel):
    code = ("%%capture cap_a\nprint('quiet please')\nimport sys\nprint('err', file=sys.stderr)\n"
            "display({'text/html': '<b>kept</b>', 'text/plain': 'kept'}, raw=True)\n"
            "import matplotlib.pyplot as plt\nplt.plot([1, 2])\n40 + 2")
    reply, out = kernel.execute(code)
    assert reply["status"] == "ok"
    assert out == [m for m in out if m["msg_type"] == "execute_input"]  # nothing shown
    _, out = kernel.execute("cap_a.stdout, cap_a.stderr, len(cap_a.outputs)")
    assert result_text(out) == ["('quiet please\\n', 'err\\n', 3)"]
    _, out = kernel.execute("cap_a.show()")
    assert stdout_text(out) == "quiet please\n" and stdout_text(out, "stderr") == "err\n"
    shown = of_type(out, "display_data")
    assert [sorted(m["content"]["data"]) for m in shown] == [
        ["text/html", "text/plain"], ["text/plain"], ["image/png", "text/plain"]]
    assert shown[1]["content"]["data"]["text/plain"] == "42"

    _, out = kernel.execute("%%capture --no-stdout\nprint('still shown')")
    assert stdout_text(out) == "still shown\n"
    reply, _ = kernel.execute("%%capture --verbose\nx = 1")
    assert reply["ename"] == "UsageError" and "--verbose" in reply["evalue"]


def test_display_cell_magics_and_magics_that_are_not_here(kernel):
    for magic, mime in (("html", "text/html"), ("markdown", "text/markdown"),
                        ("latex", "text/latex"), ("javascript", "application/javascript")):
        reply, out = kernel.execute(f"%%{magic}\nbody of {magic}")
        assert reply["status"] == "ok"
        (shown,) = of_type(out, "display_data")
        assert shown["content"]["data"][mime] == f"body of {magic}"
    reply, _ = kernel.execute("%%bash\nls /")
    assert reply["ename"] == "UsageError" and "runs no processes" in reply["evalue"]
    reply, _ = kernel.execute("%%nosuchmagic\nx")
    assert reply["ename"] == "UsageError" and "Cell magic `%%nosuchmagic` not found" in reply["evalue"]
    reply, _ = kernel.execute("%load_ext some_extension")
    assert reply["ename"] == "UsageError" and "some_extension" in reply["evalue"]
    _, out = kernel.execute("%lsmagic")
    assert "%autoreload" in stdout_text(out) and "%%capture" in stdout_text(out)
    _, out = kernel.execute("%time 6 * 7")
    assert result_text(out) == ["42"] and stdout_text(out).startswith("Wall time: ")
    _, out = kernel.execute("%%time\nt_a = 6\nt_a * 7")
    assert result_text(out) == ["42"]


def test_pylab_who_and_reset(start_kernel):
    k = start_kernel()
    _, out = k.execute("%pylab inline")
    assert "Populating the interactive namespace" in stdout_text(out)
    _, out = k.execute("mine = linspace(0, 1, 3)\ntype(np).__name__, type(plt).__name__, mine[1]")
    assert result_text(out) == ["('module', 'module', np.float64(0.5))"]
    _, out = k.execute("%who")
    assert stdout_text(out) == "mine\n"

    # Without -f it asks first: a frontend that cannot answer is told what to do instead...
    reply, _ = k.execute("%reset", allow_stdin=False)
    assert reply["ename"] == "UsageError" and "%reset -f" in reply["evalue"]
    # ...and "n" keeps everything.
    msg_id = k.kc.execute("%reset", allow_stdin=True)
    reply, out = k.collect(msg_id, stdin=lambda req: "n")
    assert reply["status"] == "ok" and "Nothing done." in stdout_text(out)
    _, out = k.execute("mine[1]")
    assert result_text(out) == ["np.float64(0.5)"]

    reply, _ = k.execute("%reset -f")
    assert reply["status"] == "ok"
    reply, _ = k.execute("mine")
    assert reply["ename"] == "NameError"
    _, out = k.execute("%who")
    assert stdout_text(out) == "Interactive namespace is empty.\n"
    # The kernel's own names came back: display and In still work.
    _, out = k.execute("display('after reset'); In[1:3]")
    assert [m["content"]["data"]["text/plain"] for m in of_type(out, "display_data")] == ["'after reset'"]
    assert result_text(out) == ["['mine', '%who']"]  # the cells since the reset


def test_timeit_options_and_its_result_object(kernel):
    _, out = kernel.execute("%timeit -n 50 -r 3 sum(range(10))")
    text = stdout_text(out)
    assert "per loop (mean ± std. dev. of 3 runs, 50 loops each)" in text, text
    _, out = kernel.execute("ti_r = %timeit -o -q -n 20 -r 2 sorted(range(30))\n"
                            "ti_r.loops, ti_r.repeat, len(ti_r.all_runs), ti_r.best <= ti_r.average <= ti_r.worst")
    assert result_text(out) == ["(20, 2, 2, True)"] and stdout_text(out) == ""
    # As a cell magic the line holds the options and the setup.
    _, out = kernel.execute("%%timeit -n 5 -r 2 ti_data = list(range(100))\nsorted(ti_data)")
    assert "of 2 runs, 5 loops each" in stdout_text(out)
    reply, _ = kernel.execute("%timeit -n")
    assert reply["ename"] == "UsageError" and "-n" in reply["evalue"]


def test_a_magics_value_can_be_assigned_and_strings_are_left_alone(kernel):
    _, out = kernel.execute("as_home = %env HOME\nas_cwd = %pwd\nas_home, as_cwd")
    assert result_text(out) == ["('/tmp/home', '/workspace')"]
    reply, _ = kernel.execute("as_files = !ls")
    assert reply["ename"] == "UsageError" and "no processes" in reply["evalue"]
    # Lines that look like magics inside a string of valid Python are the string's.
    _, out = kernel.execute("as_q = '''\nvalue = %s\n%matplotlib inline\n!rm -rf x\n'''\nas_q.splitlines()")
    assert result_text(out) == ["['', 'value = %s', '%matplotlib inline', '!rm -rf x']"]
