"""`%pip install` in the sandbox: the gateway fetches from an index (one the tests serve on
127.0.0.1, and PyPI itself), the kernel and its sandbox keep no network, and what a workspace
installed comes back in its next kernels without a fetch."""

import json
import pathlib

import pytest

from conftest import KernelSocket, stdout_text
from package_index import Index


def run(ws, code, timeout=120):
    reply, outputs = ws.execute(code, timeout=timeout)
    return reply, outputs


def text(outputs, name="stdout"):
    return "".join(m["content"]["text"] for m in outputs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


def ok(ws, code, timeout=120):
    reply, outputs = run(ws, code, timeout)
    assert reply["status"] == "ok", (reply, outputs)
    return text(outputs)


def error(ws, code, timeout=120):
    reply, outputs = run(ws, code, timeout)
    assert reply["status"] == "error", (reply, outputs)
    return reply


@pytest.fixture(scope="module")
def index():
    idx = Index()
    idx.add("tinydep", "1.0")
    idx.add("tinydep", "2.0")
    idx.add("tinyhelper", "1.0", requires=["tinydep>=2", "numpy>=1", "neverneeded; python_version < '3'"],
            files={"tinyhelper/__init__.py": "import tinydep\nVALUE = 'helped ' + tinydep.__version__\n"})
    idx.add("withextra", "0.1", requires=["tinydep; extra == 'more'"])
    idx.add("compiledonly", "3.0", tag="cp312-cp312-manylinux_2_17_x86_64",
            files={"compiledonly/__init__.py": "", "compiledonly/_speed.cpython-312-x86_64-linux-gnu.so": b"\x7fELF"})
    idx.add("sneaky", "1.0", extra={"../../escaped.py": "print('out')\n"})
    idx.add("badhash", "1.0", wrong_hash=True)
    idx.add("nohash", "1.0", hashed=False)
    idx.add_sdist("sourceonly", "1.0")
    idx.add("oldnumpy", "1.0", requires=["numpy<2"])
    idx.add("agentpkg", "0.3")
    idx.add("endless", "1.0")
    idx.endless.add("endless-1.0-py3-none-any.whl")
    idx.add("nometa", "1.5", metadata_file=False, requires=["tinydep==1.0"])
    idx.add("cachedtwice", "1.0")
    idx.start()
    yield idx
    idx.stop()


@pytest.fixture(scope="module")
def gw(start_gateway, index):
    return start_gateway(["--package-index", index.url])


def socket_on_new_kernel(gw):
    kid = gw.start_kernel()["id"]
    return KernelSocket(gw, kid), kid


def test_pip_install_resolves_against_the_image_and_imports(gw, index):
    ws, _ = socket_on_new_kernel(gw)
    try:
        out = ok(ws, "%pip install tinyhelper")
        assert "Collecting tinydep==2.0" in out, out
        assert "Successfully installed" in out and "tinyhelper-1.0" in out and "tinydep-2.0" in out, out
        # numpy comes from the image, never fetched or shadowed; the marker-excluded one is skipped.
        assert index.count("/simple/numpy/") == 0 and index.count("/simple/neverneeded/") == 0
        out = ok(ws, "import tinyhelper, tinydep, numpy\nprint(tinyhelper.VALUE, tinydep.__file__)\n"
                     "print(numpy.__file__)")
        assert "helped 2.0 /usr/local/lib/python3.15/site-packages/tinydep/__init__.py" in out, out
        assert "python315.zip" in out, out
        # The guest cannot write the site folder: it is read-only inside.
        reply = error(ws, "open('/usr/local/lib/python3.15/site-packages/tinydep/__init__.py', 'w')")
        assert reply["ename"] in ("PermissionError", "OSError"), reply
        out = ok(ws, "%pip list")
        assert "tinyhelper" in out and "workspace" in out and "numpy" in out, out
        out = ok(ws, "%pip show tinyhelper")
        assert "Name: tinyhelper" in out and "Requires: neverneeded, numpy, tinydep" in out, out
        out = ok(ws, "%pip freeze")
        assert "tinydep==2.0" in out and "tinyhelper==1.0" in out, out
        # Installing it again fetches nothing.
        before = index.count("/files/")
        out = ok(ws, "%pip install tinyhelper")
        assert "Requirement already satisfied: tinyhelper" in out, out
        assert index.count("/files/") == before
        # The lock file in the workspace records both.
        lock = json.loads(ok(ws, "print(open('/workspace/.sandgate/packages.lock').read())"))
        names = {p["name"]: p for p in lock["packages"]}
        assert set(names) >= {"tinyhelper", "tinydep"}, lock
        assert names["tinyhelper"]["requested"] and not names["tinydep"]["requested"]
        assert len(names["tinydep"]["sha256"]) == 64
    finally:
        ws.close()


def test_installed_packages_come_back_in_new_kernels_without_a_fetch(gw, index):
    ws, _ = socket_on_new_kernel(gw)
    try:
        ok(ws, "%pip install tinydep==1.0 --upgrade")
    finally:
        ws.close()
    # The next gateway run rebuilds the site folder from the workspace's lock file and the cache.
    gw.restart()
    requests = len(index.requests)
    ws, _ = socket_on_new_kernel(gw)
    try:
        out = ok(ws, "import tinydep; print(tinydep.__version__)")
        assert out.strip() == "1.0", out
    finally:
        ws.close()
    assert len(index.requests) == requests, index.requests[requests:]


def test_a_wheel_already_in_the_cache_is_said_to_come_from_it(gw, index):
    ws, _ = socket_on_new_kernel(gw)
    try:
        out = ok(ws, "%pip install cachedtwice")
        assert "Downloading cachedtwice-1.0-py3-none-any.whl" in out, out
        assert "from the gateway's cache" not in out, out
        ok(ws, "%pip uninstall -y cachedtwice")
        fetched = index.count("/files/cachedtwice")
        out = ok(ws, "%pip install cachedtwice")
        assert "Successfully installed cachedtwice-1.0" in out, out
        assert "(from the gateway's cache)" in out, out
        assert index.count("/files/cachedtwice") == fetched
    finally:
        ws.close()


def test_requirements_files_extras_and_pins(gw, index):
    ws, _ = socket_on_new_kernel(gw)
    try:
        ok(ws, "import os\nos.makedirs('reqs', exist_ok=True)\n"
               "open('reqs/base.txt', 'w').write('# pinned\\ntinydep==1.0  # old one\\n')\n"
               "open('reqs/main.txt', 'w').write('-r base.txt\\n\\nwithextra[more]\\n')")
        out = ok(ws, "%pip install -r reqs/main.txt")
        assert "withextra-0.1" in out, out
        out = ok(ws, "import tinydep, withextra; print(tinydep.__version__)")
        assert out.strip() == "1.0", out
        # A wheel without a PEP 658 metadata file: the gateway reads it from the wheel.
        out = ok(ws, "%pip install nometa")
        assert "nometa-1.5" in out, out
        reply = error(ws, "%pip install -r reqs/missing.txt")
        assert "missing.txt" in reply["evalue"], reply
        reply = error(ws, "%pip install --index-url http://example.com/simple x")
        assert "operator" in reply["evalue"], reply
    finally:
        ws.close()


def site_files(gw):
    return sorted(str(p.relative_to(gw.data_dir)) for p in (gw.data_dir / "packages" / "sites").rglob("*"))


@pytest.mark.parametrize("spec, words", [
    ("compiledonly", ["compiledonly", "compiled", "WebAssembly"]),
    ("sneaky", ["escaped.py"]),
    ("badhash", ["sha256"]),
    ("nohash", ["hash"]),
    ("sourceonly", ["source distributions", "wheels only"]),
    ("oldnumpy", ["numpy", "image", "cannot be replaced"]),
    ("no-such-project", ["no-such-project"]),
    ("'tinydep>=9'", ["tinydep", "1.0", "2.0"]),
])
def test_what_cannot_be_installed_is_refused_whole_with_a_clear_error(gw, index, spec, words):
    ws, _ = socket_on_new_kernel(gw)
    try:
        before = site_files(gw)
        reply = error(ws, f"%pip install {spec}")
        assert reply["ename"] == "PipError", reply
        for w in words:
            assert w in reply["evalue"], (w, reply["evalue"])
        assert site_files(gw) == before
        assert not list(gw.data_dir.rglob("escaped.py"))
        assert not list(pathlib.Path("/").glob("*/escaped.py"))
        # The kernel carries on.
        assert ok(ws, "print(1 + 1)").strip() == "2"
    finally:
        ws.close()


def test_an_interrupted_install_leaves_nothing_behind(gw, index):
    ws, kid = socket_on_new_kernel(gw)
    try:
        index.endless_started.clear()
        msg_id = ws.send("execute_request", {"code": "%pip install endless", "silent": False,
                                             "store_history": True, "user_expressions": {},
                                             "allow_stdin": False})
        assert index.endless_started.wait(60), "the download never began"
        status, _, _ = gw.request("POST", f"/api/kernels/{kid}/interrupt")
        assert status == 204
        reply, _ = ws.collect(msg_id, timeout=60)
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        out = ok(ws, "%pip list --format=freeze")
        assert "endless" not in out
        cache = gw.data_dir / "packages" / "cache"
        leftovers = [p for p in cache.rglob("*") if "endless" in p.name or p.parent.name == "tmp"]
        assert not leftovers, leftovers
    finally:
        ws.close()


def test_uninstall_and_micropip(gw, index):
    ws, _ = socket_on_new_kernel(gw)
    try:
        ok(ws, "import micropip\nmicropip.install('tinyhelper')")
        out = ok(ws, "import tinyhelper; print(tinyhelper.VALUE)")
        assert out.startswith("helped"), out
        out = ok(ws, "!pip uninstall -y tinyhelper")
        assert "Successfully uninstalled tinyhelper-1.0" in out, out
        out = ok(ws, "import sys; sys.modules.pop('tinyhelper', None)\n"
                     "try:\n    import tinyhelper\nexcept ModuleNotFoundError as e:\n    print('gone', e.name)")
        assert "gone tinyhelper" in out, out
        assert "tinyhelper" not in ok(ws, "print(sorted(micropip.list()))")
        reply = error(ws, "%pip uninstall numpy")
        assert "part of the sandbox image" in reply["evalue"]
        out = ok(ws, "%pip uninstall -y never-installed")
        assert "Skipping never-installed" in out, out
    finally:
        ws.close()


def test_workspace_caps_refuse_an_install_whole(start_gateway, index, tmp_path):
    config = tmp_path / "sandgate.toml"
    config.write_text(f'[packages]\nindex = "{index.url}"\nmax_packages = 1\nmax_wheel_mb = 1\n')
    gw = start_gateway(["--config", str(config)])
    ws, _ = socket_on_new_kernel(gw)
    try:
        reply = error(ws, "%pip install tinyhelper")
        assert "max_packages" in reply["evalue"], reply
        assert "tinyhelper" not in ok(ws, "%pip freeze")
        # A download that never ends is cut at the wheel cap.
        reply = error(ws, "%pip install endless")
        assert "larger than the cap of 1048576 bytes" in reply["evalue"], reply
        assert not list((gw.data_dir / "packages" / "cache" / "tmp").iterdir())
    finally:
        ws.close()


def test_a_kernel_without_the_gateway_says_what_pip_needs(kernel):
    reply, outputs = kernel.execute("%pip install humanize")
    assert reply["status"] == "error"
    assert "needs the Sandgate gateway" in reply["evalue"], reply
    reply, outputs = kernel.execute("%pip list")
    assert reply["status"] == "ok" and "numpy" in stdout_text(outputs)


def test_a_real_package_from_pypi(start_gateway):
    """PyPI itself (CI reaches it): a small pure-Python package, pinned."""
    gw = start_gateway()
    ws, _ = socket_on_new_kernel(gw)
    try:
        out = ok(ws, "%pip install humanize==4.12.3", timeout=300)
        assert "Successfully installed humanize-4.12.3" in out, out
        out = ok(ws, "import humanize; print(humanize.naturalsize(3000000))")
        assert out.strip() == "3.0 MB", out
    finally:
        ws.close()


def test_an_agent_installs_with_e2b_run_code(gw, index, monkeypatch):
    """E2B's SDK, unchanged: `run_code("%pip install ...")` streams pip's lines to on_stdout, and
    the package is there for the next run; a compiled package is an error the agent can read."""
    e2b_ci = pytest.importorskip("e2b_code_interpreter")
    from conftest import TOKEN
    for k, v in {"E2B_API_URL": gw.url, "E2B_SANDBOX_URL": gw.url, "E2B_API_KEY": TOKEN}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    lines = []
    with e2b_ci.Sandbox.create() as sbx:
        ex = sbx.run_code("%pip install agentpkg", on_stdout=lambda m: lines.append(m.line))
        assert ex.error is None, ex.error
        assert any("Successfully installed agentpkg-0.3" in line for line in lines), lines
        ex = sbx.run_code("import agentpkg; agentpkg.__version__")
        assert ex.error is None and ex.text.strip("'") == "0.3", (ex.error, ex.text)
        ex = sbx.run_code("%pip install compiledonly")
        assert ex.error is not None and ex.error.name == "PipError", ex.error
        assert "compiled" in ex.error.value


def test_hostile_calls_from_the_guest_and_the_index_are_refused(gw, index):
    """The guest's code can call the door itself, bypassing %pip: names that try to become paths,
    files the index never listed, installs of what was not fetched. An index page whose file names
    try traversal has those files dropped."""
    index.projects["travel"] = [{"filename": "../../travel-1.0-py3-none-any.whl",
                                 "hashes": {"sha256": "00" * 32}}]
    ws, _ = socket_on_new_kernel(gw)
    try:
        out = ok(ws, "import json, _host\n"
                     "def call(c):\n"
                     "    return json.loads(_host.call(json.dumps({'op': 'packages', 'call': c}).encode()))\n"
                     "print(json.dumps([\n"
                     "    call({'op': 'project', 'name': '../../etc'}),\n"
                     "    call({'op': 'project', 'name': 'a/b'}),\n"
                     "    call({'op': 'fetch', 'name': 'tinydep', 'filename': '../../../etc/passwd'}),\n"
                     "    call({'op': 'fetch', 'name': 'tinydep', 'filename': 'http://127.0.0.1:1/x.whl'}),\n"
                     "    call({'op': 'install', 'packages': [{'name': 'tinydep', 'filename': 'tinydep-1.0-py3-none-any.whl'}]}),\n"
                     "    call({'op': 'metadata', 'name': 'tinydep'}),\n"
                     "    call({'op': 'rm -rf'}),\n"
                     "    call({'op': 'project', 'name': 'travel'}),\n"
                     "]))")
        answers = json.loads(out)
        assert "not a valid package name" in answers[0]["error"], answers[0]
        assert "not a valid package name" in answers[1]["error"], answers[1]
        assert "lists no file" in answers[2]["error"] and "passwd" not in answers[2]["error"], answers[2]
        assert "lists no file" in answers[3]["error"], answers[3]
        assert "was not fetched" in answers[4]["error"], answers[4]
        assert "needs a string `filename`" in answers[5]["error"], answers[5]
        assert "unknown package op" in answers[6]["error"], answers[6]
        assert answers[7] == {"files": []}, answers[7]
        assert not any(p.name.startswith("travel") for p in gw.data_dir.rglob("*"))
        # The kernel and the service carry on.
        assert "tinydep" in ok(ws, "%pip install tinydep")
    finally:
        ws.close()


def test_a_folder_of_wheels_is_an_index_for_hosts_without_a_network(start_gateway, index, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("tinydep-1.0-py3-none-any.whl", "tinydep-2.0-py3-none-any.whl",
                 "tinyhelper-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(index.blobs[name])
    gw = start_gateway(["--package-index", str(wheels)])
    ws, _ = socket_on_new_kernel(gw)
    try:
        requests = len(index.requests)
        out = ok(ws, "%pip install tinyhelper")
        assert "Successfully installed tinyhelper-1.0 tinydep-2.0" in out, out
        assert ok(ws, "import tinyhelper; print(tinyhelper.VALUE)").strip() == "helped 2.0"
        # Resolution conflicts are named, and nothing is installed.
        reply = error(ws, "%pip install --upgrade tinyhelper 'tinydep<2'")
        assert "conflicts" in reply["evalue"] and "tinydep" in reply["evalue"], reply
        assert len(index.requests) == requests  # the folder, never the HTTP index
    finally:
        ws.close()


def test_each_user_has_their_own_packages(start_gateway, index, tmp_path):
    from conftest import start_multiuser_gateway
    alice, bob = "alice-token-" + "a" * 20, "bob-token-" + "b" * 20
    gw = start_multiuser_gateway(start_gateway, tmp_path / "users.toml", {"alice": alice, "bob": bob},
                                 settings=f'[packages]\nindex = "{index.url}"\n')

    def socket_as(token):
        status, model, _ = gw.request("POST", "/api/kernels", {}, token=token)
        assert status == 201, model
        return KernelSocket(gw, model["id"], headers={"Authorization": f"token {token}"})

    a, b = socket_as(alice), socket_as(bob)
    try:
        assert "Successfully installed" in ok(a, "%pip install tinydep==1.0")
        assert ok(a, "import tinydep; print(tinydep.__version__)").strip() == "1.0"
        reply = error(b, "import tinydep")
        assert reply["ename"] == "ModuleNotFoundError", reply
        assert "tinydep" not in ok(b, "%pip freeze")
        # Bob's own install is his: another version, side by side with Alice's.
        assert "Successfully installed tinydep-2.0" in ok(b, "%pip install tinydep")
        assert ok(b, "import tinydep; print(tinydep.__version__)").strip() == "2.0"
        assert "tinydep==1.0" in ok(a, "%pip freeze")
    finally:
        a.close()
        b.close()


def test_a_damaged_lock_file_costs_only_itself(start_gateway, index):
    gw = start_gateway(["--package-index", index.url])
    ws, _ = socket_on_new_kernel(gw)
    try:
        ok(ws, "%pip install tinydep==1.0")
        ok(ws, "open('/workspace/.sandgate/packages.lock', 'w').write('{not json')")
    finally:
        ws.close()
    gw.restart()
    ws, _ = socket_on_new_kernel(gw)
    try:
        reply, outputs = run(ws, "%pip list --format=freeze")
        assert reply["status"] == "ok", reply
        assert "packages.lock is not a package lock" in text(outputs, "stderr"), outputs
        assert "tinydep" not in text(outputs)
        assert ok(ws, "print(6 * 7)").strip() == "42"
        # Installing again works and writes a good lock.
        assert "Successfully installed tinydep-2.0" in ok(ws, "%pip install tinydep")
        lock = json.loads(ok(ws, "print(open('/workspace/.sandgate/packages.lock').read())"))
        assert [p["name"] for p in lock["packages"]] == ["tinydep"]
    finally:
        ws.close()
