"""The gateway's REST API as Jupyter Server's gateway client and direct clients use it: every
endpoint, the JSON shapes the client is strict about, errors, and authentication."""

import re
import urllib.request

import pytest

from conftest import KernelSocket

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
# What jupyter_server's gateway client parses with strptime("%Y-%m-%dT%H:%M:%S.%fZ").
LAST_ACTIVITY = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def check_model(model):
    assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
    assert UUID.match(model["id"]), model["id"]
    assert LAST_ACTIVITY.match(model["last_activity"]), model["last_activity"]
    assert isinstance(model["connections"], int)
    assert model["execution_state"] in ("starting", "idle", "busy", "restarting", "dead")


def test_api_version_is_public(gateway):
    status, body, _ = gateway.request("GET", "/api", token=None)
    assert status == 200 and "version" in body


def test_status_counts_kernels_and_connections(gateway):
    k = gateway.start_kernel()
    s = KernelSocket(gateway, k["id"])
    try:
        status, body, _ = gateway.request("GET", "/api/status")
        assert status == 200
        assert body["kernels"] >= 1 and body["connections"] >= 1
        assert LAST_ACTIVITY.match(body["last_activity"]) and LAST_ACTIVITY.match(body["started"])
    finally:
        s.close()
        gateway.request("DELETE", f"/api/kernels/{k['id']}")


def test_kernelspecs_and_their_resources(gateway):
    status, body, _ = gateway.request("GET", "/api/kernelspecs")
    assert status == 200 and body["default"] == "sandgate-python"
    spec = body["kernelspecs"]["sandgate-python"]
    assert spec["name"] == "sandgate-python"
    assert spec["spec"]["language"] == "python" and isinstance(spec["spec"]["argv"], list)
    assert spec["spec"]["display_name"]
    # Resources are served without the /api prefix, where the gateway client fetches them.
    for key, url in spec["resources"].items():
        assert url.startswith("/kernelspecs/sandgate-python/"), url
        status, data, headers = gateway.request("GET", url)
        assert status == 200 and len(data) > 100, key
        if url.endswith(".png"):
            assert data.startswith(b"\x89PNG") and headers["Content-Type"] == "image/png"
    status, one, _ = gateway.request("GET", "/api/kernelspecs/sandgate-python")
    assert status == 200 and one == spec
    status, err, _ = gateway.request("GET", "/api/kernelspecs/nope")
    assert status == 404 and err["reason"] == "Not Found" and "nope" in err["message"]
    status, _, _ = gateway.request("GET", "/kernelspecs/sandgate-python/kernel.json")
    assert status == 404


def test_kernel_crud(gateway):
    status, model, headers = gateway.request("POST", "/api/kernels", {"name": None, "env": {"KERNEL_LAUNCH_TIMEOUT": "40"}})
    assert status == 201
    check_model(model)
    assert headers["Location"] == f"/api/kernels/{model['id']}"
    assert model["name"] == "sandgate-python"
    status, listed, _ = gateway.request("GET", "/api/kernels")
    assert status == 200 and model["id"] in [k["id"] for k in listed]
    for k in listed:
        check_model(k)
    status, got, _ = gateway.request("GET", f"/api/kernels/{model['id']}")
    assert status == 200 and got["id"] == model["id"]
    check_model(got)
    status, body, _ = gateway.request("DELETE", f"/api/kernels/{model['id']}")
    assert status == 204 and body == b""
    status, err, _ = gateway.request("GET", f"/api/kernels/{model['id']}")
    assert status == 404 and err == {"reason": "Not Found", "message": f"Kernel does not exist: {model['id']}"}
    # A second DELETE is a 404 (the gateway client ignores it).
    status, _, _ = gateway.request("DELETE", f"/api/kernels/{model['id']}")
    assert status == 404


def test_unknown_kernelspec_and_bad_bodies(gateway):
    status, err, _ = gateway.request("POST", "/api/kernels", {"name": "python2"})
    # The error names what is offered.
    assert status == 404 and "python2" in err["message"], err
    assert '"sandgate-python", "python3"' in err["message"], err
    status, err, _ = gateway.request("POST", "/api/kernels", raw=b"{not json")
    assert status == 400 and "invalid JSON" in err["message"]
    status, err, _ = gateway.request("POST", "/api/kernels", {"env": "PATH=/bin"})
    assert status == 400
    status, err, _ = gateway.request("POST", "/api/kernels", {"env": {"A": 1}})
    assert status == 400 and "strings" in err["message"]


def test_body_size_is_capped(start_gateway, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[http]\nmax_body_bytes = 1024\n[kernels]\npool_size = 0\n")
    g = start_gateway(["--config", str(config)])
    status, err, _ = g.request("POST", "/api/kernels", raw=b'{"name": "' + b"x" * 4096 + b'"}')
    assert status == 413 and "1024" in err["message"]


def test_unknown_paths_and_methods(gateway):
    status, err, _ = gateway.request("GET", "/api/nothing")
    assert status == 404 and err["reason"] == "Not Found"
    status, err, headers = gateway.request("PUT", "/api/kernels")
    assert status == 405 and headers["Allow"] == "GET, POST"
    for bad in ["not-a-uuid", "00000000-0000-4000-8000-000000000000", "..%2f..%2fetc"]:
        status, _, _ = gateway.request("GET", f"/api/kernels/{bad}")
        assert status == 404, bad


def test_interrupt_and_restart_over_rest(gateway):
    k = gateway.start_kernel()
    s = KernelSocket(gateway, k["id"])
    try:
        s.execute("kept = 1")
        msg_id = s.send("execute_request", {"code": "while True:\n    pass", "silent": False})
        # Wait until the kernel runs it, then interrupt over REST.
        while True:
            m = s.recv()
            if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg_id:
                break
        status, body, _ = gateway.request("POST", f"/api/kernels/{k['id']}/interrupt", {})
        assert status == 204 and body == b""
        reply, _ = s.collect(msg_id)
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        reply, out = s.execute("kept")
        assert reply["status"] == "ok"

        status, model, _ = gateway.request("POST", f"/api/kernels/{k['id']}/restart", {})
        assert status == 200 and model["id"] == k["id"]
        check_model(model)
    finally:
        s.close()
    # The same id now runs a fresh interpreter.
    s = KernelSocket(gateway, k["id"])
    try:
        reply, _ = s.execute("kept")
        assert reply["status"] == "error" and reply["ename"] == "NameError"
    finally:
        s.close()
        gateway.request("DELETE", f"/api/kernels/{k['id']}")
    status, _, _ = gateway.request("POST", f"/api/kernels/{k['id']}/interrupt", {})
    assert status == 404


def test_sessions_crud(gateway):
    status, sess, _ = gateway.request("POST", "/api/sessions", {"path": "work/a.ipynb", "type": "notebook",
                                                                 "name": "a.ipynb", "kernel": {"name": "sandgate-python"}})
    assert status == 201
    assert sess["path"] == "work/a.ipynb" and sess["type"] == "notebook" and sess["name"] == "a.ipynb"
    assert sess["notebook"] == {"path": "work/a.ipynb", "name": "a.ipynb"}
    check_model(sess["kernel"])
    # The same path gives the same session.
    status, again, _ = gateway.request("POST", "/api/sessions", {"path": "work/a.ipynb", "type": "notebook"})
    assert status == 201 and again["id"] == sess["id"]
    status, listed, _ = gateway.request("GET", "/api/sessions")
    assert sess["id"] in [x["id"] for x in listed]
    status, renamed, _ = gateway.request("PATCH", f"/api/sessions/{sess['id']}", {"path": "work/b.ipynb", "name": "b.ipynb"})
    assert status == 200 and renamed["path"] == "work/b.ipynb" and renamed["kernel"]["id"] == sess["kernel"]["id"]
    # Moving the session to a new kernel shuts the old one down, as Jupyter Server does.
    status, moved, _ = gateway.request("PATCH", f"/api/sessions/{sess['id']}", {"kernel": {"name": "sandgate-python"}})
    assert status == 200 and moved["kernel"]["id"] != sess["kernel"]["id"]
    status, _, _ = gateway.request("GET", f"/api/kernels/{sess['kernel']['id']}")
    assert status == 404
    status, _, _ = gateway.request("DELETE", f"/api/sessions/{sess['id']}")
    assert status == 204
    status, _, _ = gateway.request("GET", f"/api/kernels/{moved['kernel']['id']}")
    assert status == 404
    status, _, _ = gateway.request("GET", f"/api/sessions/{sess['id']}")
    assert status == 404
    status, err, _ = gateway.request("POST", "/api/sessions", {"type": "notebook"})
    assert status == 400 and "path" in err["message"]


def test_kernel_limit_is_a_clear_error(start_gateway):
    g = start_gateway(["--max-kernels", "2", "--pool-size", "0"])
    a, b = g.start_kernel(), g.start_kernel()
    status, err, _ = g.request("POST", "/api/kernels", {})
    assert status == 403
    assert "kernel limit" in err["message"] and "max_kernels = 2" in err["message"]
    g.request("DELETE", f"/api/kernels/{a['id']}")
    c = g.start_kernel()
    for k in (b, c):
        g.request("DELETE", f"/api/kernels/{k['id']}")


# --- authentication ----------------------------------------------------------------------------

def test_requests_without_or_with_a_wrong_token_are_refused(gateway):
    for token in (None, "wrong", ""):
        status, err, headers = gateway.request("GET", "/api/kernels", token=token)
        assert status == 401, token
        assert err["reason"] == "Unauthorized"
        assert "Authorization" not in err["message"] or "token" in err["message"]
    # Bearer works too; the query parameter does not on plain REST calls (tokens in URLs leak).
    status, _, _ = gateway.request("GET", "/api/kernels", token=None, headers={"Authorization": f"Bearer {gateway.token}"})
    assert status == 200
    status, _, _ = gateway.request("GET", f"/api/kernels?token={gateway.token}", token=None)
    assert status == 401


def test_the_token_never_reaches_the_log(gateway):
    gateway.request("GET", f"/api/kernels?token={gateway.token}", token=None)
    gateway.request("GET", "/api/kernels", token="wrong-secret-value")
    log = gateway.log()
    assert gateway.token not in log and "wrong-secret-value" not in log


def test_a_foreign_host_header_is_refused(gateway):
    # DNS rebinding: a page on attacker.example resolving to 127.0.0.1.
    status, err, _ = gateway.request("GET", "/api/kernels", headers={"Host": "attacker.example:8888"})
    assert status == 403 and "attacker.example" in err["message"]
    status, _, _ = gateway.request("GET", "/api/kernels", headers={"Host": "localhost"})
    assert status == 200


def test_generated_token_is_printed_once_and_stored_as_a_hash(start_gateway):
    import hashlib
    g = start_gateway(["--pool-size", "0"], token=None)
    stored = (g.data_dir / "token.sha256").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    # The token was printed before the listening line; it is not in the data folder.
    for path in g.data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
            assert stored != hashlib.sha256(path.read_bytes()).hexdigest()
    status, _, _ = g.request("GET", "/api/kernels", token=None)
    assert status == 401


def test_cors_is_off_unless_configured(start_gateway, tmp_path, gateway):
    status, _, headers = gateway.request("GET", "/api/kernels", headers={"Origin": "https://lab.example.org"})
    assert "Access-Control-Allow-Origin" not in headers
    config = tmp_path / "cors.toml"
    config.write_text('[auth]\ncors_origins = ["https://lab.example.org"]\n[kernels]\npool_size = 0\n')
    g = start_gateway(["--config", str(config)])
    status, _, headers = g.request("GET", "/api/kernels", headers={"Origin": "https://lab.example.org"})
    assert headers["Access-Control-Allow-Origin"] == "https://lab.example.org"
    status, _, headers = g.request("GET", "/api/kernels", headers={"Origin": "https://lab.example.org.evil.example"})
    assert "Access-Control-Allow-Origin" not in headers
    # Preflight needs no token.
    status, _, headers = g.request("OPTIONS", "/api/kernels", token=None, headers={"Origin": "https://lab.example.org"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://lab.example.org"


def test_unknown_config_keys_are_refused(tmp_path):
    import subprocess
    from conftest import GATEWAY
    config = tmp_path / "typo.toml"
    config.write_text("[kernels]\npool_sise = 3\n")
    r = subprocess.run([str(GATEWAY), "--config", str(config), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "pool_sise" in r.stderr
