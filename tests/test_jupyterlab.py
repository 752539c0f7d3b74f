"""A real `jupyter lab --gateway-url=...` in front of Sandgate: through JupyterLab's own REST and
WebSocket API (what the browser calls), a notebook session starts a Sandgate kernel and runs
cells; JupyterLab's gateway client relays everything."""

import base64

from conftest import KernelSocket


def test_jupyterlab_runs_cells_in_a_sandgate_kernel(gateway, start_lab):
    lab = start_lab(gateway)
    status, specs, _ = lab.request("GET", "/api/kernelspecs")
    assert status == 200 and "sandgate-python" in specs["kernelspecs"]
    status, logo, _ = lab.request("GET", "/kernelspecs/sandgate-python/logo-64x64.png")
    assert status == 200 and logo.startswith(b"\x89PNG")

    status, session, _ = lab.request("POST", "/api/sessions", {
        "path": "analysis.ipynb", "type": "notebook", "name": "analysis.ipynb",
        "kernel": {"name": "sandgate-python"}})
    assert status == 201, session
    kernel_id = session["kernel"]["id"]
    # The kernel lives in the gateway.
    status, model, _ = gateway.request("GET", f"/api/kernels/{kernel_id}")
    assert status == 200 and model["name"] == "sandgate-python"

    s = KernelSocket(lab, kernel_id)
    try:
        reply, out = s.execute("print(6*7)")
        assert reply["status"] == "ok"
        assert [m["content"]["text"] for m in out if m["msg_type"] == "stream"] == ["42\n"]
        reply, out = s.execute(
            "import pandas as pd, matplotlib.pyplot as plt\n"
            "df = pd.DataFrame({'month': ['Jan', 'Feb', 'Mar'], 'revenue': [120, 135, 160]})\n"
            "df.plot(x='month', y='revenue', kind='bar')\n"
            "df")
        assert reply["status"] == "ok"
        kinds = {m["msg_type"]: m for m in out}
        assert "<table" in kinds["execute_result"]["content"]["data"]["text/html"]
        png = base64.b64decode(kinds["display_data"]["content"]["data"]["image/png"])
        assert png.startswith(b"\x89PNG")

        status, listed, _ = lab.request("GET", "/api/kernels")
        assert kernel_id in [k["id"] for k in listed]
        status, _, _ = lab.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})
        assert status == 204
    finally:
        s.close()

    status, model, _ = lab.request("POST", f"/api/kernels/{kernel_id}/restart", {})
    assert status == 200 and model["id"] == kernel_id
    s = KernelSocket(lab, kernel_id)
    try:
        reply, _ = s.execute("df")
        assert reply["ename"] == "NameError"
    finally:
        s.close()
    status, _, _ = lab.request("DELETE", f"/api/sessions/{session['id']}")
    assert status == 204
    status, _, _ = gateway.request("GET", f"/api/kernels/{kernel_id}")
    assert status == 404


def test_notebooks_that_name_python3_run_in_the_sandbox(gateway, start_lab):
    """Notebooks written elsewhere say `"kernelspec": {"name": "python3"}`: JupyterLab's REST API
    starts sessions and kernels by that name, and they get the same Sandgate sandbox."""
    lab = start_lab(gateway)
    status, specs, _ = lab.request("GET", "/api/kernelspecs")
    assert status == 200, specs
    assert "Sandgate" in specs["kernelspecs"]["python3"]["spec"]["display_name"], specs
    status, logo, _ = lab.request("GET", "/kernelspecs/python3/logo-64x64.png")
    assert status == 200 and logo.startswith(b"\x89PNG")

    status, session, _ = lab.request("POST", "/api/sessions", {
        "path": "written-elsewhere.ipynb", "type": "notebook", "name": "written-elsewhere.ipynb",
        "kernel": {"name": "python3"}})
    assert status == 201, session
    assert session["kernel"]["name"] == "python3"
    status, kernel, _ = lab.request("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, kernel
    try:
        for kernel_id in (session["kernel"]["id"], kernel["id"]):
            status, model, _ = gateway.request("GET", f"/api/kernels/{kernel_id}")
            assert status == 200 and model["name"] == "python3", model
            s = KernelSocket(lab, kernel_id)
            try:
                reply, out = s.execute("import sys; print(sys.platform, 6*7)")
                assert reply["status"] == "ok", reply
                assert [m["content"]["text"] for m in out if m["msg_type"] == "stream"] == ["wasi 42\n"]
            finally:
                s.close()
        # A restart keeps the name.
        status, model, _ = lab.request("POST", f"/api/kernels/{kernel['id']}/restart", {})
        assert status == 200 and model["name"] == "python3", model
    finally:
        lab.request("DELETE", f"/api/sessions/{session['id']}")
        lab.request("DELETE", f"/api/kernels/{kernel['id']}")
