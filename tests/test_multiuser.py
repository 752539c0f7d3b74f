"""Several users on one gateway: each has a token, kernels and a workspace of their own, and
cannot list, reach, interrupt, delete or read the other's. Someone else's kernel is a 404, not a
403, so ids do not leak."""

import hashlib
import os

import pytest
import websocket

from conftest import KernelSocket

ALICE, BOB = "alice-" + os.urandom(8).hex(), "bob-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def gw(start_gateway, tmp_path_factory):
    config = tmp_path_factory.mktemp("users") / "users.toml"
    config.write_text(
        "[kernels]\npool_size = 1\n"
        f'[[auth.users]]\nname = "alice"\ntoken_sha256 = "{hashlib.sha256(ALICE.encode()).hexdigest()}"\n'
        f'[[auth.users]]\nname = "bob"\ntoken_sha256 = "{hashlib.sha256(BOB.encode()).hexdigest()}"\n')
    return start_gateway(["--config", str(config)], env={"SANDGATE_MASTER_KEY": os.urandom(32).hex()})


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
