"""JupyterLab in a real browser, in front of Sandgate: headless Chromium, driven by Playwright
(tests/browser/lab.mjs), opens `jupyter lab --gateway-url=...`, creates a notebook on the
Sandgate kernel, prints 42, then shows a pandas DataFrame as an HTML table and an inline
matplotlib PNG. Screenshots go to tests/artifacts/browser-*.png, with JupyterLab's and the
gateway's logs beside them (browser-jupyterlab.log, browser-gateway.log). A second test runs a
cell the moment each of 10 new notebooks has its kernel, with every core busy
(tests/artifacts/at-once/). A third installs ipywidgets with %pip and shows them: a slider moved with the
keyboard updates the Output widget its callback prints into, and a tqdm.notebook bar reaches 100%
(tests/artifacts/widgets/).

Needs Node.js and Chromium (Debian's `chromium`, or the CHROMIUM variable); playwright-core is
installed from tests/browser/package-lock.json with `npm ci` when it is missing."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")
SCALE = float(os.environ.get("LAB_TIMEOUT_SCALE", "1"))
# lab.mjs bounds its own run (300 s times the scale) and reports where it stood; this is the backstop.
RUN_TIMEOUT = 300 * SCALE + 60

missing = [what for what, ok in (
    ("node (Debian: apt-get install -y nodejs npm)", NODE),
    (f"Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)", os.access(CHROMIUM, os.X_OK)),
) if not ok]
pytestmark = pytest.mark.skipif(bool(missing), reason="browser test needs " + " and ".join(missing))


def ensure_playwright():
    if (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        return
    npm = shutil.which("npm")
    assert npm, "npm is missing: it installs playwright-core (cd tests/browser && npm ci)"
    r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"`npm ci` in {BROWSER_DIR} failed:\n{r.stdout}\n{r.stderr}"


def tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


def quiet(lab):
    """Keeps the "official Jupyter news?" toast out of the screenshots (and the browser off the
    network): JupyterLab reads user settings from its (per-test) config dir on every load."""
    settings = lab.data_dir / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')


def run_lab_mjs(lab, display_name, artifacts, *args):
    """Runs lab.mjs on `lab` (bounded; node and its Chromium are killed past RUN_TIMEOUT);
    returns (exit status, its output)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [NODE, str(BROWSER_DIR / "lab.mjs"), "--artifacts", str(artifacts), "--kernel-display-name", display_name,
         *args, f"{lab.url}/lab?token={lab.token}"],
        cwd=ROOT, env={**os.environ, "CHROMIUM": CHROMIUM}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # node and the Chromium it started
        output, _ = proc.communicate()
        output += f"\n(killed after {RUN_TIMEOUT:.0f} s)"
    print(output)
    print(f"lab.mjs took {time.monotonic() - started:.1f} s")
    return proc.returncode, output


def test_jupyterlab_in_chromium_runs_a_notebook_on_sandgate(start_gateway, start_lab):
    ensure_playwright()
    gw = start_gateway()
    status, specs, _ = gw.request("GET", "/api/kernelspecs")
    assert status == 200 and "sandgate-python" in specs["kernelspecs"], specs
    display_name = specs["kernelspecs"]["sandgate-python"]["spec"]["display_name"]

    lab = start_lab(gw)
    try:
        quiet(lab)
        returncode, output = run_lab_mjs(lab, display_name, ARTIFACTS)

        # The notebook's kernel lives in the gateway, and is idle once the cells ran.
        try:
            status, kernels, _ = gw.request("GET", "/api/kernels")
            kernels_seen = kernels if status == 200 else f"HTTP {status}: {kernels}"
        except OSError as e:
            kernels_seen = f"GET /api/kernels on the gateway failed: {e}"
    finally:
        lab.stop()
        shutil.copyfile(lab.log_path, ARTIFACTS / "browser-jupyterlab.log")
        (ARTIFACTS / "browser-gateway.log").write_text(gw.log())

    assert returncode == 0, (
        f"the browser run failed (exit {returncode}); screenshots in {ARTIFACTS}/browser-*.png\n"
        f"--- lab.mjs\n{output}\n--- JupyterLab (last lines)\n{tail(lab.log())}\n"
        f"--- gateway (last lines)\n{tail(gw.log())}")
    assert isinstance(kernels_seen, list) and [k["name"] for k in kernels_seen] == ["sandgate-python"], (
        f"{kernels_seen}\n--- gateway (last lines)\n{tail(gw.log())}")
    assert kernels_seen[0]["execution_state"] == "idle", kernels_seen
    for shot in ("browser-3-print.png", "browser-4-dataframe-plot.png"):
        assert (ARTIFACTS / shot).stat().st_size > 10_000, shot

    # What the notebook ran and drew is in the encrypted workspace, and survives a restart of
    # the gateway: the history notebook holds both cells, and the chart is a PNG file.
    kernel_id = kernels_seen[0]["id"]
    gw.restart()
    status, history, _ = gw.request("GET", f"/api/contents/history/{kernel_id}.ipynb")
    assert status == 200, history
    sources = [c["source"] for c in history["content"]["cells"]]
    assert any("print(6*7)" in s for s in sources), sources
    printed = [o for c in history["content"]["cells"] for o in c["outputs"] if o.get("output_type") == "stream"]
    assert any("42" in o["text"] for o in printed), printed
    assert any("<table" in o.get("data", {}).get("text/html", "")
               for c in history["content"]["cells"] for o in c["outputs"])
    status, outputs, _ = gw.request("GET", f"/api/contents/outputs/{kernel_id}")
    assert status == 200, outputs
    pngs = [c["path"] for c in outputs["content"] if c["name"].endswith(".png")]
    assert pngs, outputs
    import base64
    status, png, _ = gw.request("GET", f"/api/contents/{pngs[0]}")
    assert base64.b64decode(png["content"]).startswith(b"\x89PNG")


AT_ONCE_ROUNDS = 10


def cpu_hogs(seconds):
    """One busy process per core, started by this test and killed by it (by pid); each also ends
    by itself after `seconds`, whatever happens to the test."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]


def test_jupyterlab_runs_a_cell_run_at_once_in_a_new_notebook_under_load(start_gateway, start_lab):
    """Issue 13, item 1: a cell run the moment a new notebook has its kernel, before the kernel's
    WebSocket is connected (JupyterLab's server is then opening its two gateway sockets for the
    browser's two WebSockets), must run; 10 new notebooks in a row, with every core kept busy.
    lab.mjs writes every WebSocket frame the page sent and received to
    tests/artifacts/at-once/browser-websocket.log."""
    ensure_playwright()
    gw = start_gateway(env={"SANDGATE_LOG": "debug"})
    status, specs, _ = gw.request("GET", "/api/kernelspecs")
    assert status == 200 and "sandgate-python" in specs["kernelspecs"], specs
    display_name = specs["kernelspecs"]["sandgate-python"]["spec"]["display_name"]
    artifacts = ARTIFACTS / "at-once"

    lab = start_lab(gw)
    hogs = cpu_hogs(RUN_TIMEOUT)
    try:
        quiet(lab)
        returncode, output = run_lab_mjs(lab, display_name, artifacts, "--at-once", str(AT_ONCE_ROUNDS))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        lab.stop()
        shutil.copyfile(lab.log_path, artifacts / "browser-jupyterlab.log")
        (artifacts / "browser-gateway.log").write_text(gw.log())

    assert returncode == 0, (
        f"the browser run failed (exit {returncode}); screenshots in {artifacts}/browser-*.png, every "
        f"WebSocket frame in {artifacts}/browser-websocket.log\n--- lab.mjs\n{output}\n"
        f"--- JupyterLab (last lines)\n{tail(lab.log())}\n--- gateway (last lines)\n{tail(gw.log())}")
    summary = [line for line in output.splitlines() if "at once: 42 in all" in line]
    assert summary and f"42 in all {AT_ONCE_ROUNDS} rounds" in summary[0], output
    # The point is a run before the kernel is idle: at least some rounds must have been that early.
    early = int(summary[0].split("before the kernel was idle in ", 1)[1].split()[0])
    assert early >= 1, summary[0]


def test_jupyterlab_shows_widgets_from_the_sandbox(start_gateway, start_lab):
    """Issue 15: a notebook runs `%pip install ipywidgets` (from PyPI, fetched by the gateway),
    and JupyterLab (with jupyterlab_widgets, tests/requirements.txt) renders the sandbox's widgets:
    a slider moved with the keyboard makes its observe callback print into an Output widget, and
    a tqdm.notebook bar reaches 100%. Screenshots in tests/artifacts/widgets/."""
    import importlib.util
    assert importlib.util.find_spec("jupyterlab_widgets"), "jupyterlab_widgets is missing (tests/requirements.txt)"
    ensure_playwright()
    gw = start_gateway()
    status, specs, _ = gw.request("GET", "/api/kernelspecs")
    assert status == 200 and "sandgate-python" in specs["kernelspecs"], specs
    display_name = specs["kernelspecs"]["sandgate-python"]["spec"]["display_name"]
    artifacts = ARTIFACTS / "widgets"

    lab = start_lab(gw)
    try:
        quiet(lab)
        returncode, output = run_lab_mjs(lab, display_name, artifacts, "--widgets")
    finally:
        lab.stop()
        shutil.copyfile(lab.log_path, artifacts / "browser-jupyterlab.log")
        (artifacts / "browser-gateway.log").write_text(gw.log())

    assert returncode == 0, (
        f"the browser run failed (exit {returncode}); screenshots in {artifacts}/browser-*.png, every "
        f"WebSocket frame in {artifacts}/browser-websocket.log\n--- lab.mjs\n{output}\n"
        f"--- JupyterLab (last lines)\n{tail(lab.log())}\n--- gateway (last lines)\n{tail(gw.log())}")
    assert "the Output widget shows" in output and "4 squared is 16" in output, output
    assert "Successfully installed" in output and "ipywidgets-" in output, output
    for shot in ("browser-4-slider-moved.png", "browser-5-tqdm.png"):
        assert (artifacts / shot).stat().st_size > 10_000, shot
