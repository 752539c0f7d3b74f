"""The encrypted workspace: the Contents API, the kernel's /workspace, persistence across
gateway restarts, encryption at rest, tamper detection, crash safety, traversal, quotas, keys,
and the history notebook and saved charts."""

import base64
import json
import os
import pathlib
import signal
import threading
import time
import urllib.request

import pytest

from conftest import KernelSocket

MARKER = "sandgate-plaintext-marker-" + os.urandom(6).hex()


def put_text(g, path, text):
    return g.request("PUT", f"/api/contents/{path}", {"type": "file", "format": "text", "content": text})


def get(g, path, **query):
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return g.request("GET", f"/api/contents/{path}" + (f"?{q}" if q else ""))


def assert_a_kernel_runs(g):
    """A new kernel of gateway `g` answers a cell."""
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        _, out = s.execute("6 * 7")
        assert result_text(out) == "42"
    finally:
        s.close()


def result_text(out):
    return [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]


def scan_for(root, needle):
    """Files under `root` (not following symlinks) whose bytes contain `needle`."""
    hits = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            p = pathlib.Path(dirpath) / name
            if p.is_symlink() or not p.is_file():  # sockets and the like hold no data
                continue
            if needle in p.read_bytes() or needle in name.encode():
                hits.append(p)
    return hits


@pytest.fixture
def ws_gateway(start_gateway):
    return start_gateway(["--pool-size", "1"])


# --- the Contents API --------------------------------------------------------------------------

def test_files_notebooks_and_folders_round_trip(ws_gateway):
    g = ws_gateway
    status, m, headers = g.request("PUT", "/api/contents/data", {"type": "directory"})
    assert status == 201 and m["type"] == "directory"
    status, m, headers = put_text(g, "data/notes.txt", "héllo\n")
    assert status == 201 and m["type"] == "file" and m["size"] == len("héllo\n".encode())
    assert headers["Location"] == "/api/contents/data/notes.txt"
    status, m, _ = put_text(g, "data/notes.txt", "second version\n")
    assert status == 200
    status, m, _ = get(g, "data/notes.txt")
    assert (m["content"], m["format"], m["mimetype"]) == ("second version\n", "text", "text/plain")
    for key in ("created", "last_modified"):
        assert m[key].endswith("Z")
    blob = bytes(range(256))
    status, m, _ = g.request("PUT", "/api/contents/data/blob.bin",
                             {"type": "file", "format": "base64", "content": base64.b64encode(blob).decode()})
    assert status == 201
    status, m, _ = get(g, "data/blob.bin")
    assert m["format"] == "base64" and base64.b64decode(m["content"]) == blob
    status, err, _ = get(g, "data/blob.bin", format="text")
    assert status == 400 and "UTF-8" in err["message"]
    nb = {"cells": [{"cell_type": "code", "source": "1+1", "metadata": {}, "outputs": [], "execution_count": None}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    status, m, _ = g.request("PUT", "/api/contents/data/a.ipynb", {"type": "notebook", "content": nb})
    assert status == 201 and m["type"] == "notebook"
    status, m, _ = get(g, "data/a.ipynb")
    assert m["format"] == "json" and m["content"]["cells"][0]["source"] == "1+1"
    status, m, _ = get(g, "data/a.ipynb", type="file", format="text")
    assert m["type"] == "file" and json.loads(m["content"])["nbformat"] == 4
    status, m, _ = get(g, "data", content=0)
    assert m["content"] is None
    status, m, _ = get(g, "data")
    assert sorted(c["name"] for c in m["content"]) == ["a.ipynb", "blob.bin", "notes.txt"]
    assert all(c["content"] is None for c in m["content"])
    status, m, _ = get(g, "data/notes.txt", content=0, hash=1)
    assert m["hash_algorithm"] == "sha256" and len(m["hash"]) == 64
    status, root, _ = get(g, "")
    assert "data" in [c["name"] for c in root["content"]]


def test_untitled_copies_renames_and_conflicts(ws_gateway):
    g = ws_gateway
    g.request("PUT", "/api/contents/proj", {"type": "directory"})
    names = []
    for kind in ("notebook", "notebook", "file", "directory", "directory"):
        status, m, _ = g.request("POST", "/api/contents/proj", {"type": kind})
        assert status == 201, m
        names.append(m["name"])
    assert names == ["Untitled.ipynb", "Untitled1.ipynb", "untitled.txt", "Untitled Folder", "Untitled Folder 1"]
    status, m, _ = g.request("POST", "/api/contents/proj", {"copy_from": "proj/Untitled.ipynb"})
    assert status == 201 and m["name"] == "Untitled-Copy1.ipynb"
    status, m, _ = g.request("POST", "/api/contents/proj", {"copy_from": "proj/Untitled.ipynb"})
    assert m["name"] == "Untitled-Copy2.ipynb"
    status, m, _ = g.request("PATCH", "/api/contents/proj/untitled.txt", {"path": "proj/readme.txt"})
    assert status == 200 and m["path"] == "proj/readme.txt"
    status, err, _ = g.request("PATCH", "/api/contents/proj/readme.txt", {"path": "proj/Untitled.ipynb"})
    assert status == 409 and "already exists" in err["message"]
    status, m, _ = g.request("PATCH", "/api/contents/proj", {"path": "project"})
    assert status == 200
    status, m, _ = get(g, "project/readme.txt")
    assert status == 200
    status, _, _ = get(g, "proj/readme.txt")
    assert status == 404
    status, _, _ = g.request("DELETE", "/api/contents/project")
    assert status == 204
    status, _, _ = get(g, "project")
    assert status == 404
    status, err, _ = g.request("DELETE", "/api/contents/nothing-here")
    assert status == 404 and err["reason"] == "Not Found"
    status, err, _ = put_text(g, "no/such/dir/x.txt", "x")
    assert status == 404


def test_chunked_upload_and_checkpoints(ws_gateway):
    g = ws_gateway
    parts = [os.urandom(100_000) for _ in range(3)]
    for i, part in enumerate(parts):
        chunk = -1 if i == len(parts) - 1 else i + 1
        status, m, _ = g.request("PUT", "/api/contents/upload.bin", {
            "type": "file", "format": "base64", "content": base64.b64encode(part).decode(), "chunk": chunk})
        assert status in (200, 201), m
    status, m, _ = get(g, "upload.bin")
    assert base64.b64decode(m["content"]) == b"".join(parts)

    put_text(g, "draft.txt", "version one")
    status, cp, headers = g.request("POST", "/api/contents/draft.txt/checkpoints")
    assert status == 201 and cp["id"] and cp["last_modified"].endswith("Z")
    put_text(g, "draft.txt", "version two")
    status, listed, _ = g.request("GET", "/api/contents/draft.txt/checkpoints")
    assert [c["id"] for c in listed] == [cp["id"]]
    status, _, _ = g.request("POST", f"/api/contents/draft.txt/checkpoints/{cp['id']}")
    assert status == 204
    assert get(g, "draft.txt")[1]["content"] == "version one"
    status, _, _ = g.request("DELETE", f"/api/contents/draft.txt/checkpoints/{cp['id']}")
    assert status == 204
    status, _, _ = g.request("POST", f"/api/contents/draft.txt/checkpoints/{cp['id']}")
    assert status == 404


@pytest.mark.parametrize("path", [
    "..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd", "a/../../b", "..", "a%5c..%5cb", "x%00y",
])
def test_traversal_is_refused(ws_gateway, path):
    status, err, _ = ws_gateway.request("GET", f"/api/contents/{path}")
    assert status in (400, 404), (status, err)
    if status == 400:
        assert "workspace" in err["message"] or "forbidden" in err["message"]
    status, err, _ = ws_gateway.request("PUT", f"/api/contents/{path}", {"type": "file", "format": "text", "content": "x"})
    assert status in (400, 404)
    status, err, _ = ws_gateway.request("PATCH", "/api/contents/", {"path": "../escaped"})
    assert status == 400


# --- /workspace in kernels ---------------------------------------------------------------------

def test_kernels_see_the_workspace_and_their_files_are_stored(ws_gateway):
    g = ws_gateway
    g.request("PUT", "/api/contents/in", {"type": "directory"})
    put_text(g, "in/from-api.txt", "written through the API")
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        reply, out = s.execute("open('/workspace/in/from-api.txt').read()")
        assert result_text(out) == "'written through the API'"
        reply, _ = s.execute("import os\nos.makedirs('/workspace/out', exist_ok=True)\n"
                             "open('/workspace/out/result.csv', 'w').write('month,revenue\\nJan,120\\n')")
        assert reply["status"] == "ok"
        status, m, _ = get(g, "out/result.csv")
        assert status == 200 and m["content"] == "month,revenue\nJan,120\n"
        # A file the kernel deletes is deleted from the store.
        s.execute("os.remove('/workspace/out/result.csv')")
        status, _, _ = get(g, "out/result.csv")
        assert status == 404
        # A file uploaded while the kernel runs is visible at once.
        put_text(g, "late.txt", "arrived later")
        reply, out = s.execute("open('/workspace/late.txt').read()")
        assert result_text(out) == "'arrived later'"
    finally:
        s.close()


def test_symlinks_planted_by_a_kernel_lead_nowhere(ws_gateway):
    g = ws_gateway
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        reply, _ = s.execute("import os\nos.symlink('/etc/passwd', '/workspace/passwd')\nos.symlink('/etc', '/workspace/etcdir')")
        # Symlinks are not stored, so their targets cannot be read through the API.
        status, _, _ = get(g, "passwd")
        assert status == 404
        status, _, _ = get(g, "etcdir")
        assert status == 404
        # Writing "through" the planted folder link does not reach the host's /etc.
        status, err, _ = put_text(g, "etcdir/sandgate-escape", "x")
        assert status in (400, 404, 500)
        assert not pathlib.Path("/etc/sandgate-escape").exists()
    finally:
        s.close()


# --- persistence, encryption, tampering ----------------------------------------------------------

def test_everything_survives_a_gateway_restart_and_no_plaintext_is_on_disk(start_gateway):
    g = start_gateway(["--pool-size", "1"])
    put_text(g, f"{MARKER}.txt", f"api says {MARKER}")
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        reply, _ = s.execute(
            f"open('/workspace/kernel-wrote.txt', 'w').write('kernel says {MARKER}')\n"
            "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.title('saved chart')")
        assert reply["status"] == "ok"
        reply, _ = s.execute("%config InlineBackend.figure_format = 'svg'\nplt.plot([1, 2])\nplt.title('svg chart')")
        assert reply["status"] == "ok"
    finally:
        s.close()
    g.restart()
    assert get(g, f"{MARKER}.txt")[1]["content"] == f"api says {MARKER}"
    assert get(g, "kernel-wrote.txt")[1]["content"] == f"kernel says {MARKER}"
    # The chart and the executed cell were recorded in the workspace.
    status, outputs, _ = get(g, f"outputs/{k['id']}")
    assert status == 200, outputs
    pngs = [c for c in outputs["content"] if c["name"].endswith(".png")]
    assert pngs
    status, png, _ = get(g, pngs[0]["path"])
    assert base64.b64decode(png["content"]).startswith(b"\x89PNG")
    # A chart in another format is saved in that format.
    svgs = [c for c in outputs["content"] if c["name"].endswith(".svg")]
    assert len(svgs) == 1, outputs["content"]
    status, svg, _ = get(g, svgs[0]["path"])
    assert status == 200 and "svg chart" in svg["content"] and "<svg" in svg["content"]
    status, hist, _ = get(g, f"history/{k['id']}.ipynb")
    assert status == 200
    cells = hist["content"]["cells"]
    assert any("saved chart" in c["source"] for c in cells)
    assert any(o.get("output_type") == "display_data" for c in cells for o in c["outputs"])
    # A new kernel sees the files.
    k2 = g.start_kernel()
    s = KernelSocket(g, k2["id"])
    try:
        reply, out = s.execute("open('/workspace/kernel-wrote.txt').read()")
        assert MARKER in result_text(out)
    finally:
        s.close()
    g.stop()
    # Nothing readable on disk: neither the contents nor the file names.
    assert scan_for(g.data_dir, MARKER.encode()) == []
    assert scan_for(g.data_dir, b"saved chart") == []
    assert scan_for(g.data_dir, b"svg chart") == []
    assert scan_for(g.data_dir, b"kernel-wrote") == []


def test_a_flipped_byte_is_a_clear_error(start_gateway):
    g = start_gateway(["--pool-size", "0"])
    put_text(g, "precious.txt", "do not touch")
    objects = sorted((g.data_dir / "workspaces").rglob("objects/*/*.sgw"), key=lambda p: p.stat().st_mtime)
    victim = objects[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    status, err, _ = get(g, "precious.txt")
    assert status == 500
    assert "precious.txt" in err["message"] and "integrity" in err["message"]
    # Truncated: same.
    victim.write_bytes(bytes(data[:20]))
    status, err, _ = get(g, "precious.txt")
    assert status == 500 and "precious.txt" in err["message"]


def stored_objects(g):
    return set((g.data_dir / "workspaces").rglob("objects/*/*.sgw"))


def damage(path, how):
    """Damages a stored file on disk as bit rot, a bad copy or a careless hand would."""
    if how == "remove":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        del data[len(data) // 2:]
    elif how == "header":  # the key version in an object's header
        data[5] ^= 0x01
    path.write_bytes(bytes(data))


def listing(g, path=""):
    status, m, _ = get(g, path)
    assert status == 200, m
    return {c["name"]: c for c in m["content"]}


def test_a_damaged_file_costs_that_file_only(start_gateway):
    g = start_gateway(["--pool-size", "0"])
    put_text(g, "good.txt", "still good")
    g.request("PUT", "/api/contents/sub", {"type": "directory"})
    put_text(g, "sub/other.txt", "other file")
    tag = os.urandom(4).hex()
    victims = {}
    for how in ("flip", "truncate", "header", "remove"):
        name = f"damaged-{how}-{tag}.txt"
        put_text(g, name, f"old text {how}")
        before = stored_objects(g)
        put_text(g, name, f"precious text {how}")
        (obj,) = stored_objects(g) - before  # the save's new object (the old one is gone)
        victims[name] = (how, obj)
    g.stop()
    for how, obj in victims.values():
        damage(obj, how)
    g.start()  # the gateway starts (it used to exit, serving nobody)
    log = g.log()
    for name, (how, obj) in victims.items():
        # The warning names the object on disk; the file's name stays out of the log.
        assert str(obj) in log, (how, log[-3000:])
        assert name not in log
    assert "failed its integrity check" in log
    # Every other file works.
    assert get(g, "good.txt")[1]["content"] == "still good"
    assert get(g, "sub/other.txt")[1]["content"] == "other file"
    # Listed under their names, marked; healthy ones carry no mark.
    entries = listing(g)
    for name in victims:
        assert entries[name]["damaged"] is True and entries[name]["type"] == "file", entries[name]
    assert "damaged" not in entries["good.txt"] and "damaged" not in entries["sub"]
    # Reading one is a clear error naming it: never garbage, never the old text.
    for name, (how, _) in victims.items():
        status, err, _ = get(g, name)
        assert status == 500, (how, err)
        assert name in err["message"] and "integrity" in err["message"], err
        assert "precious" not in json.dumps(err) and "old text" not in json.dumps(err), err
        status, m, _ = get(g, name, content=0)
        assert status == 200 and m["damaged"] is True and m["content"] is None
    # A kernel's /workspace has every other file, and no copy of a damaged one.
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        reply, out = s.execute("import os\nsorted(os.listdir('/workspace')), open('/workspace/sub/other.txt').read()")
        assert reply["status"] == "ok", reply
        seen = result_text(out)
        assert "'good.txt'" in seen and "'sub'" in seen and "other file" in seen, seen
        assert not any(name in seen for name in victims), seen
        names = list(victims)
        # The user deletes one, saves over another through the API, and over a third from the kernel.
        status, _, _ = g.request("DELETE", f"/api/contents/{names[1]}")
        assert status == 204
        assert get(g, names[1])[0] == 404
        status, m, _ = put_text(g, names[0], "a new version")
        assert status == 200 and "damaged" not in m
        assert get(g, names[0])[1]["content"] == "a new version"
        reply, out = s.execute(f"open('/workspace/{names[2]}', 'w').write('written by the kernel')\n"
                               f"open('/workspace/{names[0]}').read()")
        assert result_text(out) == "'a new version'"
        assert get(g, names[2])[1]["content"] == "written by the kernel"
    finally:
        s.close()
    entries = listing(g)
    assert names[1] not in entries
    assert [n for n, e in entries.items() if e.get("damaged")] == [names[3]]
    # The one left damaged stays so, and costs nothing else, across another restart.
    g.restart()
    assert get(g, names[3])[0] == 500
    assert listing(g)[names[3]]["damaged"] is True
    assert get(g, "good.txt")[1]["content"] == "still good"


def test_a_damaged_index_of_the_workspace_opened_at_start_does_not_stop_the_gateway(start_gateway):
    g = start_gateway(["--pool-size", "0"])
    put_text(g, "indexed.txt", "found through the index")
    g.stop()
    (index,) = (g.data_dir / "workspaces").glob("*/index.sgw")
    good = index.read_bytes()
    damage(index, "flip")
    g.start()  # it used to exit
    status, err, _ = get(g, "indexed.txt")
    assert status == 500 and f"workspaces/{index.parent.name}" in err["message"], err
    assert "backup" in err["message"] and "out of workspaces/" in err["message"], err
    assert_a_kernel_runs(g)
    assert g.stop() == 0
    assert str(index.parent) in g.log() and "backup" in g.log()
    index.write_bytes(good)
    g.start()
    assert get(g, "indexed.txt")[1]["content"] == "found through the index"


def test_a_damaged_key_file_is_an_error_with_the_way_out(start_gateway):
    g = start_gateway(["--pool-size", "0"])
    put_text(g, "kept.txt", "kept under the key")
    g.stop()
    keys = g.data_dir / "keys.json"
    good = keys.read_bytes()
    for run, how in enumerate(("flip", "truncate", "remove")):
        damage(keys, how)
        damaged = keys.read_bytes() if how != "remove" else None
        g.start()  # it used to exit
        for path in ("kept.txt", ""):
            status, err, _ = get(g, path)
            assert status == 500, err
            assert "keys.json" in err["message"] and "backup" in err["message"], err
            assert str(g.data_dir) not in err["message"]  # host paths stay in the log
        # Kernels still run.
        assert_a_kernel_runs(g)
        assert g.stop() == 0
        # Logged once per run (not per request), with the way out.
        log = g.log()
        assert log.count("key file is damaged") == run + 1 and "backup" in log, log[-3000:]
        # The damaged (or missing) key file was left as it was, never made anew.
        assert (keys.read_bytes() if keys.exists() else None) == damaged, how
        keys.write_bytes(good)
    # Put back from a backup, every file is there.
    g.start()
    assert get(g, "kept.txt")[1]["content"] == "kept under the key"


def test_killing_the_gateway_mid_save_never_loses_the_file(start_gateway):
    g = start_gateway(["--pool-size", "0"])
    old = "v1 " + "a" * 1000
    put_text(g, "doc.txt", old)
    big = "v2 " + "b" * (8 << 20)
    body = json.dumps({"type": "file", "format": "text", "content": big}).encode()
    for attempt in range(3):
        # Send the save, and kill the gateway as soon as the request is on its way.
        req = urllib.request.Request(f"{g.url}/api/contents/doc.txt", data=body, method="PUT",
                                     headers={"Authorization": f"token {g.token}", "Content-Type": "application/json"})
        t = threading.Thread(target=lambda: _ignore(lambda: urllib.request.urlopen(req, timeout=30)))
        t.start()
        time.sleep(0.05 * attempt)  # vary where the kill lands; the check below holds for any moment
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait()
        t.join()
        g.start()
        status, m, _ = get(g, "doc.txt")
        assert status == 200
        assert m["content"] in (old, big), "a save cut short left a mixed or damaged file"
        assert list((g.data_dir / "workspaces").rglob("tmp/*")) == []


def _ignore(f):
    try:
        f()
    except Exception:
        pass


def test_quotas_give_clear_errors(start_gateway, tmp_path):
    config = tmp_path / "quota.toml"
    config.write_text("[workspace]\nmax_bytes = 100000\nmax_files = 5\n[kernels]\npool_size = 1\n")
    g = start_gateway(["--config", str(config)])
    status, err, _ = put_text(g, "big.txt", "x" * 200_000)
    assert status == 507 and "100000 bytes" in err["message"]
    for i in range(5):
        assert put_text(g, f"f{i}.txt", "x")[0] == 201
    status, err, _ = put_text(g, "one-too-many.txt", "x")
    assert status == 507 and "limit of 5" in err["message"]
    k = g.start_kernel()
    s = KernelSocket(g, k["id"])
    try:
        reply, out = s.execute("open('/workspace/f0.txt', 'w').write('y' * 500000)")
        assert reply["status"] == "ok"
        # The user is told, under the cell, before its reply.
        notice = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        assert "were not saved" in notice and "f0.txt" in notice and "quota" in notice, notice
    finally:
        s.close()
    # The oversized version was refused; the stored one is unchanged and the log says why.
    assert get(g, "f0.txt")[1]["content"] == "x"
    assert "quota" in g.log()


# --- keys -------------------------------------------------------------------------------------

def test_the_token_opens_the_workspace_after_a_restart(start_gateway):
    g = start_gateway(["--pool-size", "0"], token=None)
    token = g.generated_token
    assert token and len(token) >= 32
    g.token = token
    put_text(g, "kept.txt", "opened by the token")
    g.token = None  # restart without SANDGATE_TOKEN: the first request must bring it
    g.restart()
    g.token = token
    status, m, _ = get(g, "kept.txt")
    assert status == 200 and m["content"] == "opened by the token"
    keys = json.loads((g.data_dir / "keys.json").read_text())
    assert [s["kind"] for s in keys["slots"]] == ["token"]
    assert token not in (g.data_dir / "keys.json").read_text()


def test_master_key_from_the_environment_and_a_wrong_key_is_refused(start_gateway):
    key = os.urandom(32).hex()
    g = start_gateway(["--pool-size", "0"], env={"SANDGATE_MASTER_KEY": key})
    put_text(g, "m.txt", "under the master key")
    g.stop()
    g.env["SANDGATE_MASTER_KEY"] = os.urandom(32).hex()
    with pytest.raises(RuntimeError):
        g.start()
    assert "does not open" in g.log()
    g.env["SANDGATE_MASTER_KEY"] = key
    g.start()
    assert get(g, "m.txt")[1]["content"] == "under the master key"


def test_rotate_key_reencrypts_without_losing_a_file(start_gateway):
    import subprocess
    from conftest import GATEWAY
    g = start_gateway(["--pool-size", "0"], env={"SANDGATE_PASSPHRASE": "correct horse battery staple"})
    for i in range(5):
        put_text(g, f"r{i}.txt", f"file {i}")
    g.stop()
    before = json.loads((g.data_dir / "keys.json").read_text())
    env = {**os.environ, "SANDGATE_PASSPHRASE": "correct horse battery staple"}
    for _ in range(2):  # running it again is harmless (an interrupted rotation resumes the same way)
        r = subprocess.run([str(GATEWAY), "rotate-key", "--data-dir", str(g.data_dir)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    after = json.loads((g.data_dir / "keys.json").read_text())
    assert list(after["data_keys"]) != list(before["data_keys"])
    g.start()
    for i in range(5):
        assert get(g, f"r{i}.txt")[1]["content"] == f"file {i}"


def test_rotate_key_keeps_the_old_key_while_a_file_is_damaged(start_gateway):
    import subprocess
    from conftest import GATEWAY
    env = {"SANDGATE_PASSPHRASE": "rotate with a damaged file"}
    g = start_gateway(["--pool-size", "0"], env=env)
    for i in range(3):
        put_text(g, f"r{i}.txt", f"file {i}")
    before = stored_objects(g)
    put_text(g, "bad.txt", "to be damaged")
    (obj,) = stored_objects(g) - before
    g.stop()
    damage(obj, "flip")

    def rotate():
        return subprocess.run([str(GATEWAY), "rotate-key", "--data-dir", str(g.data_dir)],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=120)

    r = rotate()
    assert r.returncode == 1, r.stderr
    assert "1 damaged files" in r.stderr and "old data key" in r.stderr, r.stderr
    assert "bad.txt" not in r.stdout + r.stderr
    assert len(json.loads((g.data_dir / "keys.json").read_text())["data_keys"]) == 2
    g.start()
    for i in range(3):
        assert get(g, f"r{i}.txt")[1]["content"] == f"file {i}"
    assert get(g, "bad.txt")[0] == 500
    assert g.request("DELETE", "/api/contents/bad.txt")[0] == 204
    g.stop()
    r = rotate()
    assert r.returncode == 0, r.stderr
    assert len(json.loads((g.data_dir / "keys.json").read_text())["data_keys"]) == 1
    g.start()
    for i in range(3):
        assert get(g, f"r{i}.txt")[1]["content"] == f"file {i}"
