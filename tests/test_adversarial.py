"""The adversarial suite: each case is an attack a malicious notebook or client would try, with
the behaviour Sandgate promises, checked end to end through the gateway (a real WebSocket client)
or straight on the kernel's ZeroMQ channels. Escapes that jupyter_client drives on a bare
kernel are in test_sandbox.py; this file adds what only the full system can show."""

import ast
import os
import pathlib
import signal
import uuid

import pytest
import zmq
from jupyter_client.session import Session

from conftest import KernelSocket, kernel_pid


def result(out):
    return [m for m in out if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]


@pytest.fixture(scope="module")
def gw(start_gateway, tmp_path_factory):
    config = tmp_path_factory.mktemp("adv") / "adv.toml"
    config.write_text("[kernels]\npool_size = 1\n[sandbox]\nmemory_mb = 512\ncell_timeout_s = 5\n"
                      "output_bytes = 200000\ndisk_mb = 64\ndisk_files = 2000\n")
    return start_gateway(["--config", str(config)], env={"OPENAI_API_KEY": "sk-adversarial-" + uuid.uuid4().hex})


@pytest.fixture
def k(gw):
    model = gw.start_kernel()
    s = KernelSocket(gw, model["id"])
    s.kernel_id = model["id"]
    yield s
    s.close()
    gw.request("DELETE", f"/api/kernels/{model['id']}")


def alive(s):
    reply, out = s.execute("6 * 7")
    assert reply["status"] == "ok" and result(out) == "42"


# --- reaching the host --------------------------------------------------------------------------

def test_host_files_do_not_exist_for_the_guest(k):
    """Expected: host paths are not there (FileNotFoundError), whatever the spelling."""
    for path in ["/etc/passwd", "/proc/self/environ", "/root/.ssh/id_rsa", "/dev/shm", "/work"]:
        reply, out = k.execute(f"import os\nos.path.exists({path!r})")
        assert result(out) == "False", path


def test_workspace_traversal_and_symlinks_stay_inside(k):
    """Expected: `..` and symlinks resolve inside the guest's folders, never to the host."""
    reply, out = k.execute("import os\ntry:\n    os.symlink('/etc', '/workspace/etc_link')\nexcept OSError:\n    pass\n"
                           "[os.path.exists('/workspace/../etc/passwd'), os.path.exists('/workspace/etc_link/passwd')]")
    assert result(out) == "[False, False]"


def test_no_network_at_all(gw, k):
    """Expected: socket calls fail; the gateway's own port is unreachable from the guest."""
    port = int(gw.url.rsplit(":", 1)[1])
    reply, _ = k.execute(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert reply["status"] == "error"
    reply, _ = k.execute(f"s = socket.socket()\ns.connect(('127.0.0.1', {port}))")
    assert reply["status"] == "error" and reply["ename"] == "OSError"


def test_no_host_environment_or_model_key(k):
    """Expected: the guest's environment is Sandgate's fixed list; no key, token or path."""
    reply, out = k.execute("import os\nsorted(os.environ)")
    names = ast.literal_eval(result(out))
    assert set(names) <= {"HOME", "TMPDIR", "MPLCONFIGDIR", "MPLBACKEND", "PYTHONTZPATH", "PYTHONUNBUFFERED", "LANG"}


def test_the_kernel_process_has_no_network_and_is_filtered(gw, k):
    """Expected (Linux): the kernel process has its own network namespace, no_new_privs, and
    seccomp filters in force."""
    pid = kernel_pid(gw, k.kernel_id)
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink(f"/proc/{gw.proc.pid}/ns/net")


# --- exhausting resources -----------------------------------------------------------------------

def test_memory_bomb(k):
    """Expected: MemoryError in the cell; the kernel keeps its state."""
    k.execute("keep = 'me'")
    reply, _ = k.execute("bomb = []\nwhile True:\n    bomb.append(bytearray(16 << 20))")
    assert reply["ename"] == "MemoryError"
    reply, out = k.execute("del bomb\nkeep")
    assert result(out) == "'me'"


def test_infinite_loop(k):
    """Expected: the cell time limit stops it with TimeoutError; state kept."""
    k.execute("before_loop = 1")
    reply, _ = k.execute("while True:\n    pass", timeout=30)
    assert reply["ename"] == "TimeoutError"
    reply, out = k.execute("before_loop")
    assert result(out) == "1"


def test_deep_recursion(k):
    """Expected: RecursionError, never a crash of the kernel process."""
    reply, _ = k.execute("def f(n):\n    return f(n + 1)\nf(0)")
    assert reply["ename"] == "RecursionError"
    alive(k)


def test_stdout_flood(k):
    """Expected: output past the per-cell cap is dropped with one notice; the client gets at
    most the cap (plus the notice), and the cell finishes."""
    reply, out = k.execute("for i in range(10**5):\n    print('flood', i)", timeout=60)
    text = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
    assert len(text.encode()) < 200_000 + 1000
    assert text.count("output limit reached") == 1
    alive(k)


def test_disk_fill(k):
    """Expected: writing past the guest's disk cap fails with OSError(ENOSPC); the data
    written before stays, and deleting it gives the room back."""
    reply, _ = k.execute("f = open('/tmp/fill.bin', 'wb')\nchunk = b'x' * (1 << 20)\n"
                         "for i in range(1000):\n    f.write(chunk)\n    f.flush()")
    assert reply["status"] == "error" and "No space left" in reply["evalue"], reply
    reply, out = k.execute("f.close()\nimport os\nsize = os.path.getsize('/tmp/fill.bin')\n"
                           "os.remove('/tmp/fill.bin')\nopen('/tmp/after.bin', 'wb').write(b'y' * (1 << 20))\nsize > (32 << 20)")
    assert result(out) == "True"


def test_many_files(k):
    """Expected: creating files past the cap fails with OSError(ENOSPC)."""
    reply, _ = k.execute("import os\nos.makedirs('/tmp/many', exist_ok=True)\n"
                         "for i in range(5000):\n    open(f'/tmp/many/{i}', 'w').close()")
    assert reply["status"] == "error" and "No space left" in reply["evalue"], reply
    reply, _ = k.execute("import shutil\nshutil.rmtree('/tmp/many')\nopen('/tmp/one-more', 'w').close()")
    assert reply["status"] == "ok"


def test_thousands_of_messages_per_second(gw, k):
    """Expected: a client firing 2000 requests without waiting gets 2000 replies, in order."""
    ids = [k.send("kernel_info_request", {}) for _ in range(2000)]
    got = []
    k.ws.settimeout(120)
    while len(got) < len(ids):
        m = k.recv()
        if m["msg_type"] == "kernel_info_reply":
            got.append(m["parent_header"]["msg_id"])
    assert got == ids
    alive(k)


# --- the wire -----------------------------------------------------------------------------------

def test_replayed_signed_messages_are_dropped(start_kernel):
    """Expected: a captured, validly signed execute_request sent again is not executed twice."""
    kern = start_kernel()
    info = kern.km.get_connection_info()
    session = Session(key=info["key"], signature_scheme="hmac-sha256")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    try:
        msg = session.msg("execute_request", {"code": "with open('/workspace/count.txt', 'a') as f:\n    f.write('x')", "silent": False,
                                               "store_history": False, "user_expressions": {}, "allow_stdin": False})
        frames = session.serialize(msg)
        sock.send_multipart(frames)
        sock.send_multipart(frames)  # the replay
        assert sock.poll(30_000), "the first copy is answered"
        sock.recv_multipart()
        # Requests on one connection are read in order, so the replay was read before this.
        reply, _ = kern.execute("open('/workspace/count.txt').read()")
        assert reply["status"] == "ok"
        assert (kern.workspace / "count.txt").read_text() == "x"
    finally:
        sock.close(0)


# --- losing work --------------------------------------------------------------------------------

def test_kill_9_mid_cell_keeps_saved_files(gw, k):
    """Expected: `kill -9` of the kernel process mid-cell is reported (`restarting`), the kernel
    comes back under the same id, and every file saved before is still there."""
    reply, _ = k.execute("open('/workspace/saved-before.txt', 'w').write('safe')")
    assert reply["status"] == "ok"
    msg_id = k.send("execute_request", {"code": "import time\ntime.sleep(30)", "silent": False})
    while True:
        m = k.recv()
        if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg_id:
            break
    os.kill(kernel_pid(gw, k.kernel_id), signal.SIGKILL)
    seen = []
    k.ws.settimeout(60)
    while "idle" not in seen or "restarting" not in seen:
        m = k.recv()
        if m["msg_type"] == "status":
            seen.append(m["content"]["execution_state"])
    reply, out = k.execute("open('/workspace/saved-before.txt').read()")
    assert result(out) == "'safe'"
    status, model, _ = gw.request("GET", "/api/contents/saved-before.txt")
    assert status == 200 and model["content"] == "safe"


def test_an_iopub_flood_is_rate_limited_with_a_notice(start_gateway, tmp_path):
    """Expected: past the iopub rate, output is dropped and clients are told once; once the
    rate is back under the limit, output resumes (and they are told)."""
    config = tmp_path / "rate.toml"
    config.write_text("[kernels]\npool_size = 1\niopub_msg_rate_limit = 100\nrate_limit_window_s = 1\n")
    g = start_gateway(["--config", str(config)])
    model = g.start_kernel()
    s = KernelSocket(g, model["id"])
    try:
        reply, out = s.execute("for i in range(3000):\n    display(i)")
        assert reply["status"] == "ok"
        shown = [m for m in out if m["msg_type"] == "display_data"]
        assert 0 < len(shown) < 3000
        notices = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        assert notices.count("IOPub rate exceeded") == 1
        # A cell that outlasts the window gets its output through again.
        reply, out = s.execute("import time\ntime.sleep(1.5)\nprint('after the flood')")
        text = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        assert "after the flood" in text and "output resumes" in text
    finally:
        s.close()


def test_slow_clients_are_cut_off(start_gateway, tmp_path):
    """Expected: a client that never finishes its headers, or trickles its body, is cut off
    (slowloris), and the gateway keeps serving others."""
    import socket
    config = tmp_path / "slow.toml"
    config.write_text("[kernels]\npool_size = 0\n[http]\nheader_timeout_s = 1\nbody_timeout_s = 1\n")
    g = start_gateway(["--config", str(config)])
    port = int(g.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"GET /api HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        answer = s.recv(4096)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"POST /api/kernels HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token " + g.token.encode()
                  + b"\r\nContent-Length: 100\r\n\r\n{")
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer, answer
    status, _, _ = g.request("GET", "/api/kernels")
    assert status == 200


def test_each_kernel_process_has_a_cgroup_of_its_own(gw, k):
    """Expected: where the host lets the gateway make cgroups, each kernel process is in one of
    its own, capped at the sandbox's memory plus the process overhead (512 + 1024 MiB here);
    where it does not, the gateway said so in its log (never silently)."""
    lines = pathlib.Path(f"/proc/{kernel_pid(gw, k.kernel_id)}/cgroup").read_text().splitlines()
    own = [line.split(":", 2) for line in lines if "sandgate-kernels" in line]
    if not own:
        assert "kernels run without cgroups of their own" in gw.log()
        return
    for _, controllers, path in own:
        if controllers == "memory":
            limit = pathlib.Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text()
            assert int(limit) == (512 + 1024) << 20
        elif controllers == "":
            limit = pathlib.Path(f"/sys/fs/cgroup{path}/memory.max").read_text().strip()
            assert int(limit) == (512 + 1024) << 20


# The E2B-compatible API (issue 14): hostile requests on its two planes.

def e2b_sandbox(gw):
    """A sandbox made over raw HTTP: (id, data-plane headers for the code interpreter)."""
    status, made, _ = gw.request("POST", "/v2/sandboxes", {"templateID": "code-interpreter-v1", "timeout": 60},
                                 headers={"X-API-Key": gw.token}, token=None)
    assert status == 201, made
    return made["sandboxID"], {"E2b-Sandbox-Id": made["sandboxID"], "E2b-Sandbox-Port": "49999",
                               "X-Access-Token": made["envdAccessToken"],
                               "E2B-Traffic-Access-Token": made["trafficAccessToken"]}


def test_e2b_malformed_requests_get_clear_errors_and_lose_nothing(gw):
    sid, headers = e2b_sandbox(gw)
    try:
        assert gw.request("POST", "/execute", {"code": "kept = 5"}, headers=headers, token=None)[0] == 200
        cases = [
            ("POST", "/execute", b"{not json", 400, "invalid JSON"),
            ("POST", "/execute", b'{"code": 5}', 400, "invalid JSON"),
            ("POST", "/execute", b'["code"]', 400, "invalid JSON"),
            ("POST", "/execute", b'{"code": "1", "context_id": "c", "language": "python"}', 400, "not both"),
            ("POST", "/execute", b'{"code": "1", "context_id": "../../etc"}', 404, "not found"),
            ("POST", "/execute", b'{"code": "1", "env_vars": {"A": 1}}', 200, None),
            ("POST", "/contexts", b'{"language": "cobol"}', 400, "unknown language"),
            ("DELETE", "/contexts/nope", b"", 404, "not found"),
        ]
        for method, path, raw, want, says in cases:
            status, body, _ = gw.request(method, path, raw=raw, headers=headers, token=None)
            assert status == want, (path, raw, status, body)
            if says:
                assert says in body["message"], (raw, body)
            if want == 200:
                # A bad environment is an error line in the stream, not a run.
                assert b'"type":"error"' in body and b"must be a string" in body, body
        for raw in (b"{", b'{"templateID": 5}', b'{"timeout": -1}', b'{"envVars": {"A": 1}}'):
            status, body, _ = gw.request("POST", "/v2/sandboxes", raw=raw, headers={"X-API-Key": gw.token},
                                         token=None)
            assert status == 400 and body["code"] == 400 and body["message"], (raw, body)
        status, body, _ = gw.request("POST", "/execute", raw=b'{"code": "' + b"x" * (17 << 20) + b'"}',
                                     headers=headers, token=None)
        assert status == 413, status
        # Nothing was lost: the sandbox still has its state.
        status, body, _ = gw.request("POST", "/execute", {"code": "kept"}, headers=headers, token=None)
        assert b'"text":"5"' in body, body
    finally:
        gw.request("DELETE", f"/sandboxes/{sid}", headers={"X-API-Key": gw.token}, token=None)


def test_e2b_tokens_are_required_and_never_logged(gw):
    sid, headers = e2b_sandbox(gw)
    try:
        for drop in ("X-Access-Token", "E2B-Traffic-Access-Token"):
            partial = {k: v for k, v in headers.items() if k != drop}
            status, body, _ = gw.request("POST", "/execute", {"code": "1"}, headers=partial, token=None)
            assert status == 401, (drop, body)
        good = headers["E2B-Traffic-Access-Token"]
        wrong = {**headers, "E2B-Traffic-Access-Token": good[:-1] + ("1" if good[-1] == "0" else "0")}
        assert gw.request("GET", "/contexts", headers=wrong, token=None)[0] == 401
        # The main token is not a sandbox token.
        assert gw.request("GET", "/contexts", headers={**headers, "E2B-Traffic-Access-Token": gw.token},
                          token=None)[0] == 401
        # A sandbox id that does not exist is a 404, whatever the tokens.
        other = {**headers, "E2b-Sandbox-Id": "sg" + "0" * 32}
        assert gw.request("POST", "/execute", {"code": "1"}, headers=other, token=None)[0] == 404
        assert gw.request("GET", "/v2/sandboxes", headers={"X-API-Key": "wrong"}, token=None)[0] == 401
        status, body, _ = gw.request("POST", "/execute", {"code": "1+1"}, headers=headers, token=None)
        assert b'"text":"2"' in body
    finally:
        gw.request("DELETE", f"/sandboxes/{sid}", headers={"X-API-Key": gw.token}, token=None)
    log = gw.log()
    for secret in (gw.token, headers["X-Access-Token"], headers["E2B-Traffic-Access-Token"]):
        assert secret not in log
