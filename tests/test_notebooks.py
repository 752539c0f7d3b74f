"""nbclient executes every notebook in notebooks/ through the sandgate-python kernel."""

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=os.environ.get("SANDGATE_KERNEL_NAME", "sandgate-python"),
                                     timeout=180, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    ARTIFACTS.mkdir(exist_ok=True)
    nbformat.write(nb, ARTIFACTS / path.name)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "sales-analysis.ipynb":
        assert any("<table" in o.get("data", {}).get("text/html", "") for o in outputs)
        assert any("image/png" in o.get("data", {}) for o in outputs)
        assert any("extra units per month" in o.get("text", "") for o in outputs)
