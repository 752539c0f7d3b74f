"""Shared harness: kernels started through jupyter_client from kernelspecs written per test
session, so every test drives the real `sandgate-kernel` binary over ZeroMQ."""

import json
import os
import pathlib
import queue
import shutil
import sys
import time

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL = pathlib.Path(os.environ.get("SANDGATE_KERNEL", ROOT / "target" / "release" / "sandgate-kernel"))
TIMEOUT = 60


def write_spec(kernels_dir, name, extra):
    d = kernels_dir / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [str(KERNEL), *extra, "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "interrupt_mode": "message",
    }))


class Kernel:
    """A started kernel with a blocking client and helpers that collect a request's output."""

    def __init__(self, km, workspace):
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)
        self.workspace = workspace

    def execute(self, code, timeout=TIMEOUT, **kw):
        """Runs `code`; returns (reply content, [iopub messages between busy and idle])."""
        msg_id = self.kc.execute(code, **kw)
        return self.collect(msg_id, timeout)

    def collect(self, msg_id, timeout=TIMEOUT, stdin=None):
        deadline = time.monotonic() + timeout
        outputs, reply, idle = [], None, False
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply/idle for {msg_id}: reply={reply} outputs={outputs}")
            if stdin is not None:
                try:
                    req = self.kc.get_stdin_msg(timeout=0.01)
                    self.kc.input(stdin(req))
                except queue.Empty:
                    pass
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 0.05))
                if msg["parent_header"].get("msg_id") == msg_id:
                    msg["received"] = time.monotonic()
                    if msg["msg_type"] == "status":
                        idle = msg["content"]["execution_state"] == "idle"
                    else:
                        outputs.append(msg)
            except queue.Empty:
                pass
            if reply is None:
                try:
                    r = self.kc.get_shell_msg(timeout=0.001)
                    if r["parent_header"].get("msg_id") == msg_id:
                        reply = r["content"]
                        reply["received"] = time.monotonic()
                except queue.Empty:
                    pass
        return reply, outputs

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture(scope="session")
def kernels_dir(tmp_path_factory):
    if not KERNEL.exists():
        pytest.exit(f"{KERNEL} is missing: build it with `cargo build --release`", 2)
    d = tmp_path_factory.mktemp("kernels")
    return d


class KernelStarter:
    """Starts kernels through jupyter_client from kernelspecs written per test session; `close`
    ends the ones it started."""

    count = 0  # kernelspec names are unique across starters

    def __init__(self, kernels_dir, tmp_path_factory):
        self.kernels_dir, self.tmp_path_factory, self.started = kernels_dir, tmp_path_factory, []

    def __call__(self, extra=(), env=None):
        workspace = self.tmp_path_factory.mktemp("workspace")
        KernelStarter.count += 1
        name = f"sandgate-test-{KernelStarter.count}"
        write_spec(self.kernels_dir, name, ["--workspace", str(workspace), *extra])
        km = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(self.kernels_dir)]))
        km.start_kernel(env={**os.environ, **(env or {})})
        k = Kernel(km, workspace)
        self.started.append(k)
        return k

    def close(self):
        for k in self.started:
            try:
                k.close()
            except Exception:
                pass
        self.started.clear()


@pytest.fixture
def start_kernel(kernels_dir, tmp_path_factory):
    """Starts kernels for one test; they end with it (each holds a process, its memory and a
    dozen of this process's file descriptors)."""
    starter = KernelStarter(kernels_dir, tmp_path_factory)
    yield starter
    starter.close()


@pytest.fixture(scope="session")
def kernel(kernels_dir, tmp_path_factory):
    """One kernel shared by the tests that keep to their own variable names."""
    starter = KernelStarter(kernels_dir, tmp_path_factory)
    yield starter()
    starter.close()


def of_type(outputs, msg_type):
    return [m for m in outputs if m["msg_type"] == msg_type]


def stdout_text(outputs, name="stdout"):
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name)


# --- the gateway -------------------------------------------------------------------------------

GATEWAY = pathlib.Path(os.environ.get("SANDGATE_GATEWAY", ROOT / "target" / "release" / "sandgate"))
TOKEN = "test-token-" + os.urandom(8).hex()


def sandgate_home():
    """Where `sandgate-kernel install` put the image and its compiled cache."""
    if os.environ.get("SANDGATE_HOME"):
        return pathlib.Path(os.environ["SANDGATE_HOME"])
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return pathlib.Path(xdg) / "sandgate"


class Gateway:
    """A `sandgate` process on a free port with its own data folder (sharing the prepared
    image), and helpers for its REST API."""

    def __init__(self, data_dir, args=(), env=None, token=TOKEN, open_files=None):
        import subprocess
        self.open_files = open_files
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        home = sandgate_home()
        for shared in ("images", "cache"):
            link = self.data_dir / shared
            if not link.exists():
                link.symlink_to(home / shared)
        self.token = token
        self.args, self.env = list(args), dict(env or {})
        self.start()

    def start(self):
        """Starts (or restarts) the process on this data folder."""
        import subprocess
        full_env = {**os.environ, **self.env}
        full_env.pop("SANDGATE_TOKEN", None)
        if self.token is not None and "SANDGATE_TOKEN" not in self.env:
            full_env["SANDGATE_TOKEN"] = self.token
        limit = None
        if self.open_files is not None:
            def limit():
                # The soft limit on open files the gateway starts with (its hard limit as ours).
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE,
                                   (self.open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        self.proc = subprocess.Popen(
            [str(GATEWAY), "--port", "0", "--data-dir", str(self.data_dir), *self.args],
            stdout=subprocess.PIPE, stderr=open(self.data_dir / "gateway.log", "ab"), env=full_env, text=True,
            preexec_fn=limit)
        self.url = None
        self.generated_token = None
        # Wait for the line that names the port (the gateway prints it once it listens); a token
        # it generated is printed, once, on the line after its announcement.
        announced = False
        for line in self.proc.stdout:
            if announced and self.generated_token is None:
                self.generated_token = line.strip()
            if "a new access token was made" in line:
                announced = True
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].strip()
                break
        if self.url is None:
            raise RuntimeError(f"the gateway did not start; see {self.data_dir / 'gateway.log'}")
        self.ws_url = self.url.replace("http://", "ws://")

    def restart(self):
        assert self.stop() == 0, self.log()[-3000:]
        self.start()

    def headers(self, extra=None):
        h = {"Authorization": f"token {self.token}"} if self.token else {}
        h.update(extra or {})
        return h

    _OWN = object()

    def request(self, method, path, body=None, headers=None, raw=None, token=_OWN):
        """(status, parsed JSON or bytes, response headers). `token=None` sends no token."""
        import urllib.error
        import urllib.request
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"}
        token = self.token if token is Gateway._OWN else token
        if token is not None:
            hdrs["Authorization"] = f"token {token}"
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, payload, rh = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, payload, rh = e.code, e.read(), e.headers
        content_type = rh.get("Content-Type", "")
        if "json" in content_type and "ndjson" not in content_type and payload:
            payload = json.loads(payload)
        return status, payload, rh

    def start_kernel(self, name=None):
        status, model, _ = self.request("POST", "/api/kernels", {"name": name} if name else {})
        assert status == 201, model
        return model

    def log(self):
        return (self.data_dir / "gateway.log").read_text(errors="replace")

    def stop(self):
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_multiuser_gateway(start_gateway, config, users, settings=""):
    """A gateway with more users ({name: token}) besides the main token's, `settings` (TOML) in
    its config file at `config`, and an explicit workspace key (which more users need)."""
    import hashlib
    entries = "".join(f'[[auth.users]]\nname = "{name}"\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
                      for name, token in users.items())
    config.write_text(settings + entries)
    return start_gateway(["--config", str(config)], env={"SANDGATE_MASTER_KEY": os.urandom(32).hex()})


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory):
    """Starts gateways; every one is stopped at the end of the session."""
    if not GATEWAY.exists():
        pytest.exit(f"{GATEWAY} is missing: build it with `cargo build --release`", 2)
    started = []

    def start(args=(), env=None, token=TOKEN, open_files=None):
        g = Gateway(tmp_path_factory.mktemp("gateway"), args, env, token, open_files)
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway):
    """One gateway shared by tests that only use their own kernels."""
    return start_gateway(["--pool-size", "1"])


class KernelSocket:
    """A WebSocket client on one kernel (legacy JSON or v1 binary protocol)."""

    def __init__(self, gw, kernel_id, session_id=None, v1=False, headers=None, query="", origin=None):
        import websocket
        self.session = session_id or str(__import__("uuid").uuid4())
        url = f"{gw.ws_url}/api/kernels/{kernel_id}/channels?session_id={self.session}{query}"
        hdrs = [f"{k}: {v}" for k, v in (gw.headers() if headers is None else headers).items()]
        self.v1 = v1
        extra = {"origin": origin} if origin else {}
        self.ws = websocket.create_connection(url, header=hdrs, timeout=TIMEOUT, **extra,
                                              subprotocols=["v1.kernel.websocket.jupyter.org"] if v1 else None)

    def send(self, msg_type, content, channel="shell", buffers=(), metadata=None):
        """Sends a message (with binary `buffers`: a binary frame in either framing); returns its id."""
        import uuid
        header = {"msg_id": str(uuid.uuid4()), "msg_type": msg_type, "username": "test", "session": self.session,
                  "date": "2026-01-01T00:00:00.000Z", "version": "5.3"}
        if self.v1:
            parts = [json.dumps(p).encode() for p in (header, {}, metadata or {}, content)]
            self.ws.send_binary(encode_v1(channel, parts + [bytes(b) for b in buffers]))
        else:
            text = json.dumps({"header": header, "parent_header": {}, "metadata": metadata or {}, "content": content,
                               "channel": channel})
            if buffers:
                self.ws.send_binary(encode_legacy_binary(text.encode(), [bytes(b) for b in buffers]))
            else:
                self.ws.send(text)
        return header["msg_id"]

    def recv(self):
        """The next message. The socket's timeout bounds the whole wait: the gateway's pings
        (answered here) do not extend it."""
        import websocket
        timeout = self.ws.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            op, data = self.ws.recv_data(control_frame=True)
            if op not in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise websocket.WebSocketTimeoutException(f"no message within {timeout} s")
                self.ws.settimeout(left)
        if timeout is not None:
            self.ws.settimeout(timeout)
        if op == websocket.ABNF.OPCODE_BINARY and self.v1:
            channel, parts = decode_v1(data)
            msg = {"channel": channel, "header": json.loads(parts[0]), "parent_header": json.loads(parts[1]),
                   "metadata": json.loads(parts[2]), "content": json.loads(parts[3]), "buffers": parts[4:]}
            msg["msg_type"] = msg["header"]["msg_type"]
            return msg
        if op == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionError(data)
        if op == websocket.ABNF.OPCODE_BINARY:
            # The legacy framing's message with buffers.
            text, buffers = decode_legacy_binary(data)
            msg = json.loads(text)
            msg["buffers"] = buffers
            return msg
        return json.loads(data)

    def execute(self, code, timeout=TIMEOUT, **content):
        """Runs code; returns (reply content, [iopub messages of this request between busy and idle])."""
        msg_id = self.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                               "user_expressions": {}, "allow_stdin": False, **content})
        return self.collect(msg_id, timeout)

    def collect(self, msg_id, timeout=TIMEOUT):
        """Messages of one request until its reply and its idle status; `timeout` bounds the whole
        wait, not each message, so a kernel that keeps talking about something else can't stall it."""
        deadline = time.monotonic() + timeout
        reply, outputs, idle = None, [], False
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply and idle for {msg_id} within {timeout} s")
            self.ws.settimeout(left)
            msg = self.recv()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "iopub":
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                else:
                    outputs.append(msg)
            elif msg["msg_type"].endswith("_reply"):
                reply = msg["content"]
        return reply, outputs

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


def encode_v1(channel, parts):
    """`v1.kernel.websocket.jupyter.org` framing, written from the protocol's description."""
    chan = channel.encode()
    offsets = [8 * (len(parts) + 3)]
    offsets.append(offsets[-1] + len(chan))
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    out = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return out + chan + b"".join(parts)


def encode_legacy_binary(text, buffers):
    """The legacy framing of a message with buffers, written from jupyter_server's description:
    nbufs (u32 big-endian), nbufs offsets (u32 big-endian) of the JSON and each buffer, the parts."""
    parts = [text, *buffers]
    offsets, at = [], 4 * (len(parts) + 1)
    for p in parts:
        offsets.append(at)
        at += len(p)
    return (len(parts).to_bytes(4, "big") + b"".join(o.to_bytes(4, "big") for o in offsets)
            + b"".join(parts))


def decode_legacy_binary(data):
    """(JSON text, [buffers]) of a legacy binary frame."""
    n = int.from_bytes(data[:4], "big")
    offsets = [int.from_bytes(data[4 * (i + 1):4 * (i + 2)], "big") for i in range(n)] + [len(data)]
    parts = [data[offsets[i]:offsets[i + 1]] for i in range(n)]
    return parts[0].decode(), parts[1:]


def decode_v1(data):
    n = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
    channel = data[offsets[0]:offsets[1]].decode()
    parts = [data[offsets[i]:offsets[i + 1]] for i in range(1, n - 1)]
    return channel, parts


# --- kernel processes ---------------------------------------------------------------------------

def children(pid):
    """Pids of processes whose parent is `pid`, with their command lines."""
    out = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
    return out


def kernel_pid(gateway, kernel_id):
    """The process serving `kernel_id` (launched with a connection file named after it)."""
    for pid, argv in children(gateway.proc.pid).items():
        if any(f"kernel-{kernel_id}".encode() in a for a in argv):
            return pid
    raise AssertionError(f"no process for kernel {kernel_id}")



# --- JupyterLab in front of a gateway ------------------------------------------------------------

class Lab(Gateway):
    """A real `jupyter lab --gateway-url=...` (jupyter_server's gateway client) in front of a
    Sandgate gateway. Shares the REST helpers of `Gateway`; its own token guards it."""

    def __init__(self, gateway, root_dir):
        import socket
        import subprocess
        self.data_dir = pathlib.Path(root_dir)
        self.token = "lab-" + os.urandom(8).hex()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(self.data_dir / "config"),
               "JUPYTER_RUNTIME_DIR": str(self.data_dir / "runtime")}
        self.log_path = self.data_dir / "lab.log"
        self.proc = subprocess.Popen(
            [str(pathlib.Path(sys.executable).with_name("jupyter")), "lab", "--allow-root", "--no-browser",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.data_dir}",
             f"--gateway-url={gateway.url}", f"--GatewayClient.auth_token={gateway.token}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        # jupyter_server logs its URL once it serves; read its log lines until then.
        with open(self.log_path, "w") as log:
            for line in self.proc.stderr:
                log.write(line)
                if f"127.0.0.1:{port}/lab" in line:
                    break
            else:
                raise RuntimeError(f"JupyterLab did not start; see {self.log_path}")
        import threading
        threading.Thread(target=self._drain, daemon=True).start()
        # jupyter_server logs its URL before its event loop binds the port (the bind is the
        # loop's first callback): wait until the port takes connections.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"JupyterLab does not accept connections; see {self.log_path}")
                time.sleep(0.05)

    def _drain(self):
        with open(self.log_path, "a") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()

    def log(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def start_lab(tmp_path_factory):
    """Starts JupyterLab servers in front of gateways; all are stopped at the end."""
    started = []

    def start(gateway):
        lab = Lab(gateway, tmp_path_factory.mktemp("lab"))
        started.append(lab)
        return lab

    yield start
    for lab in started:
        lab.stop()


# --- the widget packages (issue 15's ipywidgets) -------------------------------------------------

# The real, pure-Python wheels ipywidgets needs in a kernel, pinned: fetched on the host and unzipped
# beside the kernel ('' is on the guest's sys.path), so no %pip is needed.
WIDGET_WHEELS = {"comm": "0.2.3", "traitlets": "5.16.1", "ipywidgets": "8.1.9",
                 "widgetsnbextension": "4.0.16", "jupyterlab_widgets": "3.0.17"}
# What the kernel imports of them (the other two carry only the frontend's JavaScript).
WIDGET_IMPORTS = ("comm", "traitlets", "ipywidgets")


@pytest.fixture(scope="session")
def widget_wheels(tmp_path_factory):
    """{name: path of its wheel}, downloaded once per session with pip."""
    import subprocess
    d = tmp_path_factory.mktemp("widget-wheels")
    pins = [f"{name}=={version}" for name, version in WIDGET_WHEELS.items()]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                        "--disable-pip-version-check", "--quiet", "--dest", str(d), *pins],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip download {' '.join(pins)} failed:\n{r.stdout}\n{r.stderr}"
    wheels = {}
    for name in WIDGET_WHEELS:
        found = sorted(d.glob(f"{name}-{WIDGET_WHEELS[name]}-*.whl"))
        assert len(found) == 1, (name, sorted(p.name for p in d.iterdir()))
        wheels[name] = found[0]
    return wheels


def unzip_wheels(wheels, folder, names=None):
    """Unzips the wheels (those named, else all) into `folder`, as pip would lay them out."""
    import zipfile
    for name, wheel in wheels.items():
        if names is None or name in names:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(folder)
