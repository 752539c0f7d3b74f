"""IPython's magics that notebooks use most, through jupyter_client: each does what IPython's
does, and the ones the sandbox cannot have say so in one line."""

import base64
import json
import os
import pathlib
import re
import struct
import subprocess

import pytest

from conftest import children, of_type, stdout_text


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
        ["text/html", "text/plain"], ["text/plain"],
        ["application/vnd.e2b.chart+json", "image/png", "text/plain"]]
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
    _, out = kernel.execute("as_files = !pwd\nas_files")
    assert result_text(out) == ["['/workspace']"]
    # Lines that look like magics inside a string of valid Python are the string's.
    _, out = kernel.execute("as_q = '''\nvalue = %s\n%matplotlib inline\n!rm -rf x\n'''\nas_q.splitlines()")
    assert result_text(out) == ["['', 'value = %s', '%matplotlib inline', '!rm -rf x']"]


# --- %xmode, %prun, %%file, %debug/%pdb ---------------------------------------------------------

XMODE_DEFS = "def xm_f(x):\n    y = x * 2\n    return 1/(x-1)\n\ndef xm_g(a, b=3):\n    s = 'text'\n    return xm_f(a)"


def test_xmode_gives_ipythons_traceback_shapes(start_kernel):
    k = start_kernel()
    defs, _ = k.execute(XMODE_DEFS)
    d = defs["execution_count"]

    def traceback_of(code):
        reply, out = k.execute(code)
        assert reply["status"] == "error"
        (err,) = of_type(out, "error")
        assert err["content"]["traceback"] == reply["traceback"]
        return reply["execution_count"], reply["traceback"]

    reply, out = k.execute("%xmode Plain")
    assert stdout_text(out) == "Exception reporting mode: Plain\n"
    n, tb = traceback_of("xm_g(1)")
    assert tb == ["Traceback (most recent call last):\n",
                  f"  Cell In[{n}], line 1\n    xm_g(1)\n",
                  f"  Cell In[{d}], line 7 in xm_g\n    return xm_f(a)\n",
                  f"  Cell In[{d}], line 3 in xm_f\n    return 1/(x-1)\n",
                  "ZeroDivisionError: division by zero\n"]

    k.execute("%xmode context")  # any case, as in IPython
    n, tb = traceback_of("xm_g(1)")
    assert tb == ["-" * 75,
                  "ZeroDivisionError                         Traceback (most recent call last)",
                  f"Cell In[{n}], line 1\n----> 1 xm_g(1)\n",
                  f"Cell In[{d}], line 7, in xm_g(a, b)\n      5 def xm_g(a, b=3):\n"
                  "      6     s = 'text'\n----> 7     return xm_f(a)\n",
                  f"Cell In[{d}], line 3, in xm_f(x)\n      1 def xm_f(x):\n      2     y = x * 2\n"
                  "----> 3     return 1/(x-1)\n",
                  "ZeroDivisionError: division by zero"]

    k.execute("%xmode Verbose")
    n, tb = traceback_of("xm_g(1)")
    assert tb[3].startswith(f"Cell In[{d}], line 7, in xm_g(a=1, b=3)\n")
    assert tb[4] == (f"Cell In[{d}], line 3, in xm_f(x=1)\n      1 def xm_f(x):\n      2     y = x * 2\n"
                     "----> 3     return 1/(x-1)\n        x = 1\n")

    # A chain keeps its order and its joining line; the header rule comes once.
    k.execute("%xmode Context")
    n, tb = traceback_of("try:\n    xm_g(1)\nexcept ZeroDivisionError as e:\n    raise ValueError('wrapped') from e")
    assert tb.count("-" * 75) == 1
    assert tb.index("ZeroDivisionError: division by zero") < tb.index(
        "\nThe above exception was the direct cause of the following exception:\n") < tb.index("ValueError: wrapped")

    # Deep recursion is folded, not thousands of frames.
    n, tb = traceback_of("def xm_r(n):\n    return xm_r(n + 1)\nxm_r(0)")
    assert any("[... skipping similar frames: xm_r at line 2" in line for line in tb), tb
    assert len(tb) < 15 and tb[-1].startswith("RecursionError")

    k.execute("%xmode Minimal")
    n, tb = traceback_of("xm_g(1)")
    assert tb == ["ZeroDivisionError: division by zero\n"]
    # A cell that does not compile looks the same in every mode.
    n, tb = traceback_of("1 +")
    assert tb == [f"  Cell In[{n}], line 1\n    1 +\n       ^\nSyntaxError: invalid syntax\n"]

    reply, _ = k.execute("%xmode Loud")
    assert reply["ename"] == "UsageError" and "Plain, Context, Verbose, Minimal" in reply["evalue"]


def page_text(reply):
    pages = [p for p in reply.get("payload", []) if p["source"] == "page"]
    assert len(pages) == 1, reply.get("payload")
    return pages[0]["data"]["text/plain"]


def test_prun_profiles_with_ipythons_options_and_report(kernel):
    kernel.execute("def pr_f(n):\n    return sum(i * i for i in range(n))")
    reply, out = kernel.execute("%prun -l 3 pr_f(1000)")
    assert reply["status"] == "ok", reply
    text = page_text(reply)
    assert re.match(r"^ +\d+ function calls in \d+\.\d+ seconds\n\n   Ordered by: internal time\n"
                    r"   List reduced from \d+ to 3 due to restriction <3>\n\n"
                    r"   ncalls  tottime  percall  cumtime  percall filename:lineno\(function\)\n", text), text
    assert len(text.splitlines()) == 9
    assert "(pr_f)" in kernel.execute("%prun -s cumulative pr_f(10)")[0]["payload"][0]["data"]["text/plain"]

    # As a cell magic; -q shows nothing, -r returns the pstats.Stats, -T and -D write files.
    reply, out = kernel.execute("%%prun -q -r -T pr_report.txt -D pr_stats.bin\npr_f(10)\npr_f(20)")
    assert reply["status"] == "ok" and not reply["payload"], reply
    assert stdout_text(out) == ("\n*** Profile stats marshalled to file 'pr_stats.bin'.\n"
                                "\n*** Profile printout saved to text file 'pr_report.txt'.\n")
    assert "function calls" in (kernel.workspace / "pr_report.txt").read_text()
    assert (kernel.workspace / "pr_stats.bin").stat().st_size > 0
    _, out = kernel.execute("pr_stats = %prun -q -r pr_f(5)\ntype(pr_stats).__module__, pr_stats.total_calls > 3")
    assert result_text(out) == ["('pstats', True)"]

    reply, _ = kernel.execute("%prun -s bogus pr_f(1)")
    assert reply["ename"] == "UsageError" and "'bogus'" in reply["evalue"] and "cumulative" in reply["evalue"]
    reply, _ = kernel.execute("%prun -z pr_f(1)")
    assert reply["ename"] == "UsageError" and "-z" in reply["evalue"]
    reply, _ = kernel.execute("%prun 1/0")
    assert reply["ename"] == "ZeroDivisionError"


def test_file_is_writefiles_alias(kernel):
    reply, out = kernel.execute("%%file fa_note.txt\nfirst line")
    assert reply["status"] == "ok" and stdout_text(out) == "Writing fa_note.txt\n"
    assert (kernel.workspace / "fa_note.txt").read_text() == "first line\n"


def test_debug_and_pdb_talk_through_input_requests(start_kernel):
    k = start_kernel()
    defs, _ = k.execute("def db_f(x):\n    y = x * 2\n    return 1/(x-1)")
    d = defs["execution_count"]
    _, out = k.execute("%debug", allow_stdin=True)
    assert "No traceback has been produced" in stdout_text(out, "stderr")
    reply, _ = k.execute("db_f(1)")
    assert reply["ename"] == "ZeroDivisionError"

    def answering(*answers):
        prompts, left = [], list(answers)

        def answer(req):
            prompts.append(req["content"]["prompt"])
            return left.pop(0) if left else "q"
        return prompts, answer

    prompts, answer = answering("p y", "p x + 40", "up", "q")
    reply, out = k.collect(k.kc.execute("%debug", allow_stdin=True), stdin=answer)
    assert reply["status"] == "ok", reply
    text = stdout_text(out)
    assert prompts == ["ipdb> "] * 4
    assert f"<cell-{d}>(3)db_f()" in text and "-> return 1/(x-1)" in text, text
    assert "\n2\n" in text and "\n41\n" in text, text

    # The frontend cannot answer: a clear error, no hang.
    reply, _ = k.execute("%debug", allow_stdin=False)
    assert reply["ename"] == "UsageError" and "input" in reply["evalue"]

    _, out = k.execute("%pdb on")
    assert stdout_text(out) == "Automatic pdb calling has been turned ON\n"
    prompts, answer = answering("p x * 100", "q")
    reply, out = k.collect(k.kc.execute("db_f(1)", allow_stdin=True), stdin=answer)
    assert reply["ename"] == "ZeroDivisionError" and prompts == ["ipdb> "] * 2
    assert "\n100\n" in stdout_text(out)
    _, out = k.execute("%pdb")
    assert stdout_text(out) == "Automatic pdb calling has been turned OFF\n"
    reply, _ = k.collect(k.kc.execute("db_f(1)", allow_stdin=True), stdin=lambda req: pytest.fail("asked"))
    assert reply["ename"] == "ZeroDivisionError"
    # The kernel goes on.
    _, out = k.execute("db_f(3)")
    assert result_text(out) == ["0.5"]


# --- !cmd: the shell commands, inside the sandbox ------------------------------------------------

def make_files(ws):
    (ws / "data.csv").write_text("a,b\n1,2\n3,4\n5,6\n7,8\n")
    (ws / "sub").mkdir()
    (ws / "sub" / "f.txt").write_text("x")
    (ws / "z.bin").write_bytes(b"\0" * 5000)
    (ws / "my file.txt").write_text("hello world\nfoo  bar baz\n")
    (ws / "nums.txt").write_text("".join(f"{i}\n" for i in range(1, 101)))
    (ws / ".hidden").write_text("")
    for i in range(1, 13):
        (ws / f"f_{i}.png").write_bytes(b"0" * (i * 700))


def test_shell_commands_run_inside_the_sandbox(start_kernel):
    k = start_kernel()
    ws = k.workspace
    make_files(ws)
    _, out = k.execute("!head -4 data.csv")
    assert stdout_text(out) == "a,b\n1,2\n3,4\n5,6\n"
    _, out = k.execute("!cat data.csv | wc -l")
    assert stdout_text(out) == "5\n"
    _, out = k.execute("!ls sub data.csv")
    assert stdout_text(out) == "data.csv\n\nsub:\nf.txt\n"
    reply, out = k.execute("!ls nope\n_exit_code")
    assert stdout_text(out) == "ls: cannot access 'nope': No such file or directory\n"
    assert result_text(out) == ["2"]
    _, out = k.execute("!echo made here > sh_made.txt && cat sh_made.txt")
    assert stdout_text(out) == "made here\n" and (ws / "sh_made.txt").read_text() == "made here\n"
    # IPython's expansion of the notebook's variables: $name and {expression}.
    _, out = k.execute("sh_n = 2\n!head -n $sh_n nums.txt; tail -n {sh_n + 1} nums.txt")
    assert stdout_text(out) == "1\n2\n98\n99\n100\n"
    _, out = k.execute("def sh_first(name):\n    !head -1 {name}\nsh_first('data.csv')")  # a function's names too
    assert stdout_text(out) == "a,b\n"

    # x = !cmd: the lines, as a pipe gives them (one name per line), with SList's helpers.
    _, out = k.execute("sh_files = !ls *.csv sub\nprint(type(sh_files).__name__, sh_files, repr(sh_files.n), sh_files.s)")
    assert stdout_text(out) == "SList ['data.csv', '', 'sub:', 'f.txt'] 'data.csv\\n\\nsub:\\nf.txt' data.csv  sub: f.txt\n"
    _, out = k.execute("sh_l = !ls -l data.csv nums.txt\nsh_l.fields(4), sh_l.grep('NUMS').fields(-1)")
    assert result_text(out) == ["(['20', '292'], ['nums.txt'])"]
    _, out = k.execute("%sx wc -l nums.txt")
    assert result_text(out) == ["['100 nums.txt']"]
    _, out = k.execute("%ls sub")
    assert stdout_text(out) == "f.txt\n"
    # What scripts exported from notebooks call.
    _, out = k.execute("get_ipython().system('head -1 data.csv')\nget_ipython().getoutput('wc -l nums.txt')")
    assert stdout_text(out) == "a,b\n" and result_text(out) == ["['100 nums.txt']"]

    # Only these commands; anything else is a UsageError before anything runs.
    reply, out = k.execute("!mkdir sh_never && pip install requests")
    assert reply["ename"] == "UsageError"
    assert "pip: not available" in reply["evalue"] and "ls" in reply["evalue"] and "Linux tier" in reply["evalue"]
    assert not (ws / "sh_never").exists()
    reply, _ = k.execute("!echo $(whoami)")
    assert reply["ename"] == "UsageError" and "command substitution" in reply["evalue"]
    # No process was started on the host for any of this.
    assert children(k.km.provisioner.pid) == {}


def gnu_coreutils_9():
    try:
        text = subprocess.run(["ls", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    m = re.search(r"GNU coreutils\) (\d+)", text)
    return bool(m) and int(m.group(1)) >= 9


def run_gnu(command, cwd, tty):
    """What GNU coreutils print for `command` in `cwd` (as the sandbox's locale: C.UTF-8, UTC), on
    an 80-column terminal as Jupyter's `!cmd` has, or on a pipe."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "TZ": "UTC", "HOME": "/tmp/home"}
    if not tty:
        p = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return p.stdout.decode()
    import fcntl
    import pty
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    p = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                         stderr=follower, close_fds=True)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=30)
    os.close(leader)
    return out.decode().replace("\r\n", "\n")


def same_owner(text):
    """The sandbox has no users: ls -l names the owner and group `user`."""
    return re.sub(r"^([-dl][-rwx]{9} +\d+) +\S+ +\S+ ", r"\1 user user ", text, flags=re.M)


GNU_CHECKED = [
    "ls", "ls -a", "ls -A", "ls -1", "ls -F", "ls -l", "ls -lh", "ls -lhS", "ls -lt", "ls -s", "ls -lh *.png",
    "ls *.png", "ls -d sub", "ls sub data.csv", "ls nope sub", "ls -R", "ls -r", "ls -x", "ls *.nothing", "ls -z",
    "cat -n data.csv", "cat nope sub data.csv", "cat data.csv | wc -l", "head -2 data.csv sub/f.txt", "head -n -97 nums.txt",
    "head -c 5 data.csv", "head -n x data.csv", "head sub", "tail -n 2 data.csv", "tail -3 nums.txt", "tail -n +98 nums.txt",
    "tail -n 2 nope data.csv", "tail -c 5 nums.txt", "wc data.csv", "wc -l data.csv", "wc data.csv z.bin nums.txt",
    "wc nope data.csv", "wc < data.csv", "cat data.csv | wc", "wc sub", "wc -w 'my file.txt'", "ls | wc -l",
    "echo -e 'a\\tb'", "echo -n a; echo b", "mkdir sub", "mkdir a/b", "mkdir -pv a/b/c && rm -rv a", "rm nope", "rm sub",
    "cp nope x", "cp sub x", "cp -v data.csv c.csv && mv -v c.csv d.csv && rm -v d.csv", "cp data.csv data.csv",
    "rm -r /", "ls nope 2>&1 | wc -l", "false || echo fallback", "touch t.txt && ls t.txt && rm t.txt",
]


@pytest.mark.skipif(not gnu_coreutils_9(), reason="needs GNU coreutils 9 on the host to compare with")
def test_shell_commands_print_what_gnu_coreutils_print(start_kernel):
    """Each command's output, through jupyter_client, against GNU coreutils run on the same
    folder: on a terminal (`!cmd`) and on a pipe (`x = !cmd`)."""
    k = start_kernel()
    make_files(k.workspace)
    k.execute("import json")
    differences = []
    for command in GNU_CHECKED:
        for tty in (True, False):
            code = f"!{command}" if tty else f"sh_out = !{command}\nprint(json.dumps(sh_out.n))"
            reply, out = k.execute(code)
            assert reply["status"] == "ok", (command, reply)
            got = stdout_text(out) if tty else json.loads(stdout_text(out))
            want = run_gnu(command, k.workspace, tty)
            if not tty:
                want = "\n".join(want.splitlines())
            if same_owner(got) != same_owner(want):
                differences.append(f"{'!' if tty else 'x = !'}{command}\n--- sandbox:\n{got}--- GNU:\n{want}")
    assert not differences, "\n\n".join(differences)


def test_guest_modules_do_not_redefine_each_others_names():
    """The guest modules (magics.py, shell.py, ...) run in the driver's globals: a top-level name
    defined twice silently replaces the first (shell.py's entry point once replaced the driver's
    `_shell`, and every cell after the first `!` failed)."""
    import ast
    here = pathlib.Path(__file__).resolve().parent.parent / "kernel" / "src" / "sandbox"

    def top_level(path):
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        return names

    files = sorted(here.glob("*.py"))
    assert len(files) >= 3
    seen = {}
    for path in files:
        for name in top_level(path):
            assert name not in seen, f"{name} is defined in {seen.get(name)} and in {path.name}"
            seen[name] = path.name


def test_xmode_context_survives_a_module_edited_since_it_was_imported(start_kernel):
    """The code object and the file on disk disagree: the context lines stop at the file's end,
    and the error is shown, not lost to an error in its formatting."""
    k = start_kernel()
    (k.workspace / "shrinking.py").write_text(
        "def f():\n    x = 1\n    y = 2\n    z = 3\n    w = 1 / 0\n    v = 6\n    u = 7\n    return 8\n")
    reply, _ = k.execute("%xmode Context")
    assert reply["status"] == "ok", reply
    reply, _ = k.execute("import shrinking")
    assert reply["status"] == "ok", reply
    (k.workspace / "shrinking.py").write_text("a = 1\nb = 2\nc = 3\nd = 4\ne = 5\n")
    reply, out = k.execute("shrinking.f()")
    assert reply["ename"] == "ZeroDivisionError", reply
    assert any("shrinking.py" in line for line in reply["traceback"]), reply["traceback"]
