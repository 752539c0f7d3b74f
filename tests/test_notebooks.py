"""Every notebook in notebooks/ runs end to end: the plain ones with nbclient straight on the
sandgate-python kernel, in a copy of the notebooks folder (its data files beside them, as Jupyter
runs a notebook in its own folder); the ones that need the gateway (`%%ask`, metadata `sandgate.needs_gateway`)
through a real `jupyter lab --gateway-url=...` in front of Sandgate, with the model played by the
local fake provider. Executed copies go to tests/artifacts/."""

import json
import os
import pathlib
import shutil
import sys

import nbclient
import nbformat
import pytest

from conftest import KernelSocket

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / "tests" / "artifacts"


def needs_gateway(path):
    return nbformat.read(path, as_version=4).metadata.get("sandgate", {}).get("needs_gateway", False)


DIRECT = [p for p in NOTEBOOKS if not needs_gateway(p)]
THROUGH_GATEWAY = [p for p in NOTEBOOKS if needs_gateway(p)]


KERNEL_NAME = os.environ.get("SANDGATE_KERNEL_NAME", "sandgate-python")


def notebook_folder(tmp_path):
    """A copy of notebooks/ (notebooks and their data), where a test runs them."""
    folder = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder)
    return folder


def cell_text(cell):
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)


def check_births(nb, folder):
    """What births-by-decade.ipynb shows: the data beside it, read through `!` and pandas."""
    by_source = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code"}
    assert cell_text(by_source["!ls data | wc -l"]) == "1\n"
    assert cell_text(by_source["!head -4 data/births.csv"]) == (
        "year,month,gender,births\n1969,1,F,133528\n1969,1,M,136307\n1969,2,F,134479\n")
    assert cell_text(by_source["!wc -l data/births.csv"]) == "241 data/births.csv\n"
    assert "<table" in by_source["import pandas as pd"].outputs[0]["data"]["text/html"]
    assert cell_text(by_source["%%file decades.py"]) == "Writing decades.py\n"
    assert (folder / "decades.py").read_text().startswith("def by_decade(df):")
    assert "1970" in by_source["from decades import by_decade"].outputs[0]["data"]["text/html"]
    profile = cell_text(by_source["stats = %prun -q -r by_decade(births)"])
    assert "Ordered by: cumulative time" in profile and "by_decade" in profile, profile
    assert cell_text(by_source["!mkdir -p out"]) == "by_decade.csv\n"
    assert (folder / "out" / "by_decade.csv").read_text().startswith("decade,F,M\n")
    assert cell_text(by_source["written = !cat out/by_decade.csv"]).startswith("['decade,F,M',")


@pytest.mark.parametrize("path", DIRECT, ids=[p.name for p in DIRECT])
def test_notebook_runs(path, tmp_path):
    folder = notebook_folder(tmp_path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=180,
                                     resources={"metadata": {"path": str(folder)}})
    client.execute()
    ARTIFACTS.mkdir(exist_ok=True)
    nbformat.write(nb, ARTIFACTS / path.name)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "sales-analysis.ipynb":
        assert any("<table" in o.get("data", {}).get("text/html", "") for o in outputs)
        assert any("image/png" in o.get("data", {}) for o in outputs)
        assert any("extra units per month" in o.get("text", "") for o in outputs)
    if path.name == "births-by-decade.ipynb":
        check_births(nb, folder)


def test_tutorial_notebook_runs_with_papermill_in_its_folder(tmp_path):
    """papermill, as people run notebooks in batch: the kernel started in the notebook's folder
    (papermill's `cwd`) has that folder as /workspace."""
    import papermill
    folder = notebook_folder(tmp_path)
    output = tmp_path / "births-out.ipynb"
    papermill.execute_notebook(str(folder / "births-by-decade.ipynb"), str(output), kernel_name=KERNEL_NAME,
                               cwd=str(folder), progress_bar=False, execution_timeout=180)
    check_births(nbformat.read(output, as_version=4), folder)


def test_the_kernel_works_in_the_notebooks_folder(tmp_path):
    """Started by Jupyter in a notebook's folder, the kernel sees that folder, writable, as its
    /workspace and working directory (it used to see Sandgate's own workspace folder)."""
    folder = notebook_folder(tmp_path)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os\nopen('made-by-the-kernel.txt', 'w').write('hi')\n"
        "os.getcwd(), open('data/births.csv').readline()")])
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=60,
                                     resources={"metadata": {"path": str(folder)}})
    client.execute()
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "('/workspace', 'year,month,gender,births\\n')"
    assert (folder / "made-by-the-kernel.txt").read_text() == "hi"


def test_the_kernel_refuses_to_hand_over_the_home_folder(tmp_path, capfd):
    """Started by Jupyter in $HOME (or /, or a system folder) the kernel refuses to start, and
    says which setting chooses another folder; SANDGATE_WORKSPACE does."""
    home = pathlib.Path(os.path.expanduser("~")).resolve()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nsorted(os.listdir('.'))[:3]")])
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=60, startup_timeout=60,
                                     resources={"metadata": {"path": str(home)}})
    with pytest.raises(RuntimeError):  # nbclient's DeadKernelError, or "Kernel died before replying"
        client.execute()
    import atexit
    atexit.unregister(client._cleanup_kernel)  # nbclient's own would find no kernel to stop
    err = capfd.readouterr().err
    assert f"refusing to use {home} as the sandbox's /workspace" in err, err
    assert "--workspace DIR" in err and "SANDGATE_WORKSPACE=DIR" in err, err

    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "only-here.txt").write_text("x")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nos.listdir('.')")])
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=60,
                                     resources={"metadata": {"path": str(home)}})
    client.execute(env={**os.environ, "SANDGATE_WORKSPACE": str(chosen)})
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "['only-here.txt']"


# What the fake model answers, in order, for each gateway notebook's %%ask cells.
MODEL_REPLIES = {
    "ask-sales.ipynb": [
        "```python\nimport pandas as pd\nsales = pd.read_csv('sales.csv')\n"
        "by_month = sales.groupby('month', sort=False)['revenue'].sum()\n"
        "by_month.plot(kind='bar', title='Revenue by month')\nby_month\n```",
        "```python\nfirst, last = sales[sales.month == 'Jan'], sales[sales.month == 'Jun']\n"
        "growth = last.set_index('region').revenue / first.set_index('region').revenue\ngrowth.idxmax()\n```\n"
        "This divides June's revenue by January's for each region and names the larger ratio.",
    ],
}


def as_output(msg):
    """An iopub message as an nbformat output, as nbclient builds them."""
    c, t = msg["content"], msg["msg_type"]
    if t == "stream":
        return nbformat.v4.new_output("stream", name=c["name"], text=c["text"])
    if t in ("display_data", "execute_result"):
        kw = {"execution_count": c["execution_count"]} if t == "execute_result" else {}
        return nbformat.v4.new_output(t, data=c["data"], metadata=c.get("metadata", {}), **kw)
    if t == "error":
        return nbformat.v4.new_output("error", ename=c["ename"], evalue=c["evalue"], traceback=c["traceback"])
    return None


@pytest.mark.parametrize("path", THROUGH_GATEWAY, ids=[p.name for p in THROUGH_GATEWAY])
def test_gateway_notebook_runs_through_jupyterlab(path, start_gateway, start_lab, tmp_path):
    from fake_models import FakeModels
    nb = nbformat.read(path, as_version=4)
    with FakeModels() as fake:
        config = tmp_path / "ask.toml"
        config.write_text(f'[kernels]\npool_size = 1\n[ask]\ndefault_provider = "openai"\n'
                          f'[[ask.providers]]\nname = "openai"\nkind = "openai"\nbase_url = "{fake.openai_base}"\n'
                          f'key_env = "SANDGATE_NOTEBOOK_TEST_KEY"\nmodels = ["gpt-4.1-mini"]\n')
        fake.models = set(fake.models) | {"gpt-4.1-mini"}
        fake.script(*MODEL_REPLIES[path.name])
        gw = start_gateway(["--config", str(config)], env={"SANDGATE_NOTEBOOK_TEST_KEY": fake.key})
        lab = start_lab(gw)
        status, session, _ = lab.request("POST", "/api/sessions", {
            "path": path.name, "type": "notebook", "name": path.name, "kernel": {"name": nb.metadata.kernelspec.name}})
        assert status == 201, session
        s = KernelSocket(lab, session["kernel"]["id"])
        payloads = []
        try:
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                reply, out = s.execute(cell.source, timeout=120)
                cell.outputs = [o for o in map(as_output, out) if o is not None]
                cell.execution_count = reply.get("execution_count")
                payloads += reply.get("payload", [])
                assert reply["status"] == "ok", (cell.source, reply)
        finally:
            s.close()
            lab.request("DELETE", f"/api/sessions/{session['id']}")
    ARTIFACTS.mkdir(exist_ok=True)
    nbformat.write(nb, ARTIFACTS / path.name)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the chart"
    assert [p["source"] for p in payloads] == ["set_next_input"] * len(MODEL_REPLIES[path.name])
    assert "by_month" in payloads[0]["text"]
    assert any("divides June" in json.dumps(o.get("data", {})) for o in outputs), "the explanation"


@pytest.fixture(scope="module")
def python3_kernelspec(tmp_path_factory):
    """`sandgate-kernel install --name python3` into a folder of its own, which JUPYTER_PATH puts
    first: notebooks whose metadata names `python3` then run in the sandbox."""
    import subprocess
    from conftest import KERNEL
    prefix = tmp_path_factory.mktemp("python3-prefix")
    done = subprocess.run([str(KERNEL), "install", "--no-prepare", "--name", "python3", "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    spec = json.loads((prefix / "share/jupyter/kernels/python3/kernel.json").read_text())
    assert "Sandgate" in spec["display_name"], spec
    return {**os.environ, "JUPYTER_PATH": str(prefix / "share/jupyter")}


def written_for_ipykernel(path):
    """A notebook as Jupyter writes it for ipykernel: its kernelspec is `python3`."""
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("import sys\nprint(sys.platform, 6 * 7)")]
    nbformat.write(nb, path)
    return path


def test_papermill_nbclient_and_jupyter_execute_run_python3_notebooks_in_the_sandbox(python3_kernelspec, tmp_path):
    import subprocess
    bin_dir = pathlib.Path(sys.executable).parent
    source = written_for_ipykernel(tmp_path / "elsewhere.ipynb")
    runs = {
        "papermill": [str(bin_dir / "papermill"), str(source), str(tmp_path / "papermill.ipynb")],
        "jupyter execute": [str(bin_dir / "jupyter"), "execute", "--output", "executed", str(source)],
    }
    for name, argv in runs.items():
        done = subprocess.run(argv, cwd=tmp_path, env=python3_kernelspec, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
    executed = [tmp_path / "papermill.ipynb", tmp_path / "executed.ipynb"]
    # nbclient in this process, as a library user calls it.
    nb = nbformat.read(source, as_version=4)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = python3_kernelspec["JUPYTER_PATH"]
    try:
        nbclient.NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if old is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = old
    nbformat.write(nb, tmp_path / "nbclient.ipynb")
    executed.append(tmp_path / "nbclient.ipynb")
    for path in executed:
        out = nbformat.read(path, as_version=4)
        assert out.metadata.kernelspec.name == "python3", path
        texts = [o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.outputs]
        # The sandbox's Python (WASI), not the host's ipykernel.
        assert texts == ["wasi 42\n"], (path, texts)
