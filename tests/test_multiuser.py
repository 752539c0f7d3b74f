"""Several users on one gateway: each has a token, kernels and a workspace of their own, and
cannot list, reach, interrupt, delete or read the other's. Someone else's kernel is a 404, not a
403, so ids do not leak."""

import hashlib
import os

import pytest
import websocket

from conftest import KernelSocket, start_multiuser_gateway

ALICE, BOB = "alice-" + os.urandom(8).hex(), "bob-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def gw(start_gateway, tmp_path_factory):
    return start_multiuser_gateway(start_gateway, tmp_path_factory.mktemp("users") / "users.toml",
                                   {"alice": ALICE, "bob": BOB}, "[kernels]\npool_size = 1\n")


def as_user(g, token, method, path, body=None):
    return g.request(method, path, body, token=token)


def test_users_cannot_see_or_touch_each_others_kernels(gw):
    status, alices, _ = as_user(gw, ALICE, "POST", "/api/kernels", {})
    assert status == 201
    kid = alices["id"]
    for method, path in [("GET", f"/api/kernels/{kid}"), ("DELETE", f"/api/kernels/{kid}"),
                         ("POST", f"/api/kernels/{kid}/interrupt"), ("POST", f"/api/kernels/{kid}/restart")]:
        status, err, _ = as_user(gw, BOB, method, path, {} if method == "POST" else None)
        assert status == 404, (method, path, status)
        assert err["message"] == f"Kernel does not exist: {kid}"
    assert [k["id"] for k in as_user(gw, BOB, "GET", "/api/kernels")[1]] == []
    assert [k["id"] for k in as_user(gw, ALICE, "GET", "/api/kernels")[1]] == [kid]
    # The main token's user does not see it either.
    assert kid not in [k["id"] for k in gw.request("GET", "/api/kernels")[1]]
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        KernelSocket(gw, kid, headers={"Authorization": f"token {BOB}"})
    assert e.value.status_code == 404
    status, _, _ = as_user(gw, ALICE, "DELETE", f"/api/kernels/{kid}")
    assert status == 204


def test_users_have_their_own_workspaces(gw):
    status, _, _ = as_user(gw, ALICE, "PUT", "/api/contents/alice-only.txt",
                           {"type": "file", "format": "text", "content": "for alice"})
    assert status == 201
    status, _, _ = as_user(gw, BOB, "GET", "/api/contents/alice-only.txt")
    assert status == 404
    status, bobs, _ = as_user(gw, BOB, "POST", "/api/kernels", {})
    s = KernelSocket(gw, bobs["id"], headers={"Authorization": f"token {BOB}"})
    try:
        reply, out = s.execute("import os\nopen('/workspace/bob-wrote.txt', 'w').write('bob')\nsorted(os.listdir('/workspace'))")
        listing = [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]
        assert "alice-only.txt" not in listing and "bob-wrote.txt" in listing
    finally:
        s.close()
    status, m, _ = as_user(gw, BOB, "GET", "/api/contents/bob-wrote.txt")
    assert status == 200 and m["content"] == "bob"
    status, _, _ = as_user(gw, ALICE, "GET", "/api/contents/bob-wrote.txt")
    assert status == 404
    status, alices, _ = as_user(gw, ALICE, "POST", "/api/kernels", {})
    s = KernelSocket(gw, alices["id"], headers={"Authorization": f"token {ALICE}"})
    try:
        reply, out = s.execute("import os\nsorted(os.listdir('/workspace'))")
        listing = [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]
        assert "alice-only.txt" in listing and "bob-wrote.txt" not in listing
    finally:
        s.close()


def test_users_need_an_explicit_workspace_key(start_gateway, tmp_path):
    config = tmp_path / "nokey.toml"
    config.write_text(f'[[auth.users]]\nname = "carol"\ntoken_sha256 = "{"0" * 64}"\n')
    with pytest.raises(RuntimeError):
        start_gateway(["--config", str(config)])


def workspace_dir(g, user):
    """A user's workspace folder: named by a hash of the user, as the gateway names it."""
    return g.data_dir / "workspaces" / hashlib.sha256(f"sandgate-workspace:{user}".encode()).hexdigest()[:24]


def test_a_damaged_index_costs_that_workspace_only(start_gateway, tmp_path):
    g = start_multiuser_gateway(start_gateway, tmp_path / "users.toml", {"alice": ALICE, "bob": BOB},
                                "[kernels]\npool_size = 0\n")
    for token, name in ((ALICE, "alice"), (BOB, "bob")):
        status, _, _ = as_user(g, token, "PUT", f"/api/contents/{name}.txt",
                               {"type": "file", "format": "text", "content": f"{name}'s file"})
        assert status == 201
    g.stop()
    alices = workspace_dir(g, "alice")
    index = alices / "index.sgw"
    backup = index.read_bytes()
    objects = sorted(alices.rglob("objects/*/*.sgw"))
    assert objects
    for run, how in enumerate(("flip", "truncate", "remove")):
        index.write_bytes(backup)
        if how == "remove":
            index.unlink()
        else:
            data = bytearray(backup)
            if how == "flip":
                data[len(data) // 2] ^= 0x01
            else:
                del data[len(data) // 2:]
            index.write_bytes(bytes(data))
        g.start()  # it used to exit
        # Alice's workspace answers a clear error naming it and the way out.
        for path in ("alice.txt", ""):
            status, err, _ = as_user(g, ALICE, "GET", f"/api/contents/{path}")
            assert status == 500, (how, err)
            m = err["message"]
            assert "alice" in m and f"workspaces/{alices.name}" in m and "backup" in m and "out of workspaces/" in m, m
            assert str(g.data_dir) not in m
        status, err, _ = as_user(g, ALICE, "PUT", "/api/contents/new.txt",
                                 {"type": "file", "format": "text", "content": "x"})
        assert status == 500 and "alice" in err["message"]
        # Bob's works, through the API and in his kernel.
        status, m, _ = as_user(g, BOB, "GET", "/api/contents/bob.txt")
        assert status == 200 and m["content"] == "bob's file"
        status, k, _ = as_user(g, BOB, "POST", "/api/kernels", {})
        s = KernelSocket(g, k["id"], headers={"Authorization": f"token {BOB}"})
        try:
            reply, out = s.execute("import os\nsorted(os.listdir('/workspace'))")
            listing = [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]
            assert "bob.txt" in listing and "alice.txt" not in listing, listing
        finally:
            s.close()
        # Alice's kernels still run; what they write is kept for when her workspace opens again.
        status, k, _ = as_user(g, ALICE, "POST", "/api/kernels", {})
        assert status == 201, k
        s = KernelSocket(g, k["id"], headers={"Authorization": f"token {ALICE}"})
        try:
            reply, out = s.execute(f"open('/workspace/while-{how}.txt', 'w').write('kept')\n6 * 7")
            assert [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"] == "42"
        finally:
            s.close()
        assert g.stop() == 0
        log = g.log()
        # Logged once per run, naming the folder and the way out.
        assert log.count("a workspace cannot be opened") == run + 1, log[-3000:]
        assert str(alices) in log and "backup" in log
        # Nothing of alice's was deleted or rewritten.
        assert sorted(alices.rglob("objects/*/*.sgw")) == objects, how
        assert index.exists() == (how != "remove")
    # The operator's way out: the index put back from a backup brings every file back.
    index.write_bytes(backup)
    g.start()
    status, m, _ = as_user(g, ALICE, "GET", "/api/contents/alice.txt")
    assert status == 200 and m["content"] == "alice's file"
    for how in ("flip", "truncate", "remove"):
        status, m, _ = as_user(g, ALICE, "GET", f"/api/contents/while-{how}.txt")
        assert status == 200 and m["content"] == "kept", (how, m)
    # Or the folder moved out of workspaces/: alice starts afresh, bob keeps his files.
    g.stop()
    alices.rename(g.data_dir / "set-aside")
    g.start()
    status, m, _ = as_user(g, ALICE, "GET", "/api/contents/")
    assert status == 200 and m["content"] == []
    assert as_user(g, BOB, "GET", "/api/contents/bob.txt")[1]["content"] == "bob's file"
