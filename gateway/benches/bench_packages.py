#!/usr/bin/env python3
"""Package benchmark: `%pip install` of a cached package and the first import after it, Sandgate
against the reference (Jupyter Kernel Gateway + ipykernel, whose `%pip` runs pip) in the same
run, both through their kernel WebSockets on 127.0.0.1, both from the same local index.

Run it from the repository root with the project's virtualenv after `cargo build --release` and
`sandgate-kernel install` (as bench_gateway.py, whose helpers it reuses):

    .venv/bin/python gateway/benches/bench_packages.py [--runs N] [--restarts M]
        [--wheels DIR] [--json out.json]

The packages: real wheels from PyPI, downloaded once (the only time anything is fetched from the
internet, before anything is timed) with `pip download --only-binary=:all: --no-deps` into
`--wheels` (default target/bench-wheels), each checked against the SHA-256 pinned below:
`humanize` (one wheel, no dependencies) and `rich` with its dependencies `markdown-it-py`, `mdurl`
and `pygments` (four wheels, 1.7 MB, 539 files). Both are pure Python. The benchmark serves them
from its own index on 127.0.0.1, the way PyPI serves them: PEP 691 JSON and PEP 503 HTML simple
pages with SHA-256 fragments, `requires-python` and PEP 658/714 metadata files, and PyPI's
`Cache-Control` headers (pages 10 minutes, files immutable), counting every request.

The two systems:

- Sandgate: `target/release/sandgate --package-index URL` (a data folder of the run's own, so
  its package cache starts empty; the image and compiled module linked in), warm pool
  `--pool-size` (default 2). `%pip install humanize==4.17.0` as a user types it.
- the reference: `jupyter kernelgateway` from the virtualenv, with a kernelspec (ipykernel's own,
  the interpreter changed) whose Python is a per-run venv: `python -m venv --without-pip` and a
  copy of ipykernel, pip and their dependencies from the project's virtualenv (no network; the
  project's virtualenv, which has rich among the test clients, is never installed into). So the
  reference is a user's fresh ipykernel environment, where pygments is already present (IPython
  needs it) and `%pip install rich` installs three wheels where Sandgate, whose image has no
  pygments, installs four. Its `%pip install --index-url URL --trusted-host 127.0.0.1
  humanize==4.17.0` runs the venv's pip (`python -m pip`, IPython's magic), with a per-run
  PIP_CACHE_DIR, none of the machine's pip settings (no PIP_* variable passed on,
  PIP_CONFIG_FILE=/dev/null), pip's version check off and HTTP(S)_PROXY set to a closed port on
  127.0.0.1 for anything but 127.0.0.1 (an attempt to reach the internet fails instead of being
  timed).
  `--trusted-host` is what lets pip cache from an http index (it caches only from https or
  trusted hosts). pip byte-compiles what it installs (its default); Sandgate's site folder is
  read-only to the guest, which compiles the sources at each first import.

What is measured, per package:

- first install, caches empty: once, at the start (Sandgate's package cache empty: download,
  hash check, unpack; pip's cache empty: download, build nothing, install). This fills the caches.
- cached install: `%pip install P` sent over the kernel's WebSocket until its `execute_reply` and
  `idle` have come back, in a kernel started (and run `1+1` once) for that round, with P's wheels
  in each system's cache but P not installed. After the round P is taken away again: Sandgate's
  `%pip uninstall -y` of everything the install reported (its cache keeps the wheels, as it
  would for another workspace's install), the reference's venv back to its files before the
  install (pip's cache keeps the wheels). Requests to the index during the install are counted.
- first import: right after, in the same kernel, one cell that imports P and calls it once
  (`humanize.naturalsize`; rich renders a Markdown text with a Python code block, which uses
  markdown-it-py, mdurl and pygments), until its reply and idle.
- new kernel, same gateway run: with P installed, `POST /api/kernels`, the WebSocket,
  `kernel_info` until idle, then the same import cell until its reply and idle: time to the
  first import in a new kernel (Sandgate's from its warm pool; a pooled kernel sees what the
  workspace installed), and the import cell alone. Index requests counted (Sandgate fetches
  nothing: its site folder is shared by the workspace's kernels).
- new kernel after a gateway restart (`--restarts` rounds per package): with P installed, each
  gateway is stopped and started again (Sandgate on the same data folder with `--pool-size 0`,
  so the workspace's site folder is rebuilt from its lock file and the cache on the way of that
  first start), then as above. The gateway's own start is not timed.

Rounds alternate which system goes first. Median and p90 (nearest rank) over `--runs` rounds.
"""

import argparse
import email.parser
import hashlib
import html
import http.server
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402

import kernel_gateway  # noqa: E402

INSTALL_TIMEOUT = 300
READY_TIMEOUT = bg.READY_TIMEOUT

# The wheels, pinned by version and SHA-256 (PyPI's files as of 2026-12-07).
WHEELS = {
    "humanize-4.17.0-py3-none-any.whl": "02d0899527760efe18011944f882df4970943b4cdff7b5a0ba7fed43a576ef98",
    "rich-15.0.0-py3-none-any.whl": "33bd4ef74232fb73fe9279a257718407f169c09b78a87ad3d296f548e27de0bb",
    "markdown_it_py-4.3.0-py3-none-any.whl": "7aa1511a46c39138de78d9eba92ce47e63124d8003fc98b3a351909e04239efa",
    "mdurl-0.1.2-py3-none-any.whl": "84008a41e51615a49fc9966191ff91509e3c40b939176e643fd50a5c2196b8f8",
    "pygments-2.21.0-py3-none-any.whl": "2363c69b61c4a97c838da3b130dcd6468f4848992b21a82f2a63ec34377137d9",
}

RICH_CODE = """\
import io
from rich.console import Console
from rich.markdown import Markdown
console = Console(file=io.StringIO(), width=60, color_system=None, force_jupyter=False)
console.print(Markdown("# Report\\n\\nSome *text*, then code:\\n\\n```python\\nprint(sum(range(10)))\\n```\\n"))
print(console.file.getvalue())
"""

PACKAGES = [
    {"name": "humanize", "spec": "humanize==4.17.0",
     "code": "import humanize\nprint(humanize.naturalsize(3000000))", "expect": "3.0 MB"},
    {"name": "rich", "spec": "rich==15.0.0", "code": RICH_CODE, "expect": "print(sum(range(10)))"},
]


def progress(text):
    print(f"[bench_packages] {text}", file=sys.stderr, flush=True)


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def ms_since(started):
    return (time.perf_counter() - started) * 1000


def pct(samples, q):
    """Nearest-rank percentile (None for no samples)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(-(-len(ordered) * q // 100) - 1, 0)]


# --- the wheels and the index ----------------------------------------------------------------


def ensure_wheels(folder):
    """The pinned wheels in `folder`, downloaded from PyPI with pip if any is missing; every file
    checked against its pinned SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [f for f in WHEELS if not (folder / f).exists()]
    if missing:
        pins = []
        for f in missing:
            name, version = f.split("-")[:2]
            pins.append(f"{name}=={version}")
        progress(f"downloading {', '.join(pins)} into {folder} (once; not timed)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                        "--disable-pip-version-check", "--quiet", "-d", str(folder), *pins], check=True)
    for f, sha in WHEELS.items():
        got = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        if got != sha:
            sys.exit(f"{folder / f}: SHA-256 {got}, pinned {sha}; remove it to download it again")
    return [folder / f for f in WHEELS]


class WheelIndex:
    """Wheels served as PyPI serves them, on 127.0.0.1, every request recorded."""

    def __init__(self, wheels):
        self.projects, self.blobs = {}, {}
        self.requests, self.lock = [], threading.Lock()
        for path in wheels:
            data = path.read_bytes()
            with zipfile.ZipFile(path) as z:
                (meta_name,) = [n for n in z.namelist()
                                if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
                metadata = z.read(meta_name)
            message = email.parser.BytesParser().parsebytes(metadata, headersonly=True)
            self.blobs[path.name] = data
            self.blobs[path.name + ".metadata"] = metadata
            meta_sha = {"sha256": hashlib.sha256(metadata).hexdigest()}
            self.projects.setdefault(canonical(message["Name"]), []).append({
                "filename": path.name, "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
                "requires-python": message.get("Requires-Python"), "size": len(data), "yanked": False,
                "core-metadata": meta_sha, "dist-info-metadata": meta_sha})
        self.server = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def mark(self):
        with self.lock:
            return len(self.requests)

    def since(self, mark):
        with self.lock:
            return list(self.requests[mark:])

    def start(self):
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, body, ctype, cache):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", cache)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with index.lock:
                    index.requests.append(self.path)
                page = re.fullmatch(r"/simple/([^/]+)/", self.path)
                if page and page.group(1) in index.projects:
                    files = index.projects[page.group(1)]
                    if "application/vnd.pypi.simple.v1+json" in self.headers.get("Accept", ""):
                        body = json.dumps({"meta": {"api-version": "1.1"}, "name": page.group(1), "files": [
                            {**f, "url": f"../../files/{f['filename']}"} for f in files]}).encode()
                        ctype = "application/vnd.pypi.simple.v1+json"
                    else:
                        links = "".join(
                            f'<a href="../../files/{f["filename"]}#sha256={f["hashes"]["sha256"]}"'
                            + (f' data-requires-python="{html.escape(f["requires-python"])}"'
                               if f["requires-python"] else "")
                            + f' data-core-metadata="sha256={f["core-metadata"]["sha256"]}"'
                            + f' data-dist-info-metadata="sha256={f["core-metadata"]["sha256"]}"'
                            + f'>{f["filename"]}</a><br/>' for f in files)
                        body = f"<!DOCTYPE html><html><body>{links}</body></html>".encode()
                        ctype = "text/html"
                    self.reply(body, ctype, "max-age=600, public")
                    return
                blob = re.fullmatch(r"/files/([^/]+)", self.path)
                if blob and blob.group(1) in index.blobs:
                    self.reply(index.blobs[blob.group(1)], "application/octet-stream",
                               "max-age=365000000, immutable, public")
                    return
                self.send_error(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def describe_requests(paths):
    """'N pages, M files' of a list of request paths."""
    pages = sum(p.startswith("/simple/") for p in paths)
    return f"{pages} pages, {len(paths) - pages} files"


# --- the reference's venv --------------------------------------------------------------------


def dependency_closure(roots):
    """The distributions of this interpreter's environment that `roots` need, by canonical
    name (markers evaluated for this interpreter, extras followed)."""
    import importlib.metadata as md
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    env = default_environment()
    dists = {canonical(d.metadata["Name"]): d for d in md.distributions()}
    found, todo = {}, [(r, ()) for r in roots]
    while todo:
        name, extras = todo.pop()
        name = canonical(name)
        if name in found:
            continue
        if name not in dists:
            sys.exit(f"the reference's venv needs {name}, which this virtualenv lacks")
        found[name] = dists[name]
        for line in found[name].requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (extras or ("",))):
                continue
            todo.append((req.name, tuple(req.extras)))
    return found


class ReferenceEnv:
    """A venv of the run's own for the reference kernel: ipykernel, pip and their dependencies
    copied from this virtualenv (their RECORDed files under site-packages), and a kernelspec
    (ipykernel's, pointing at the venv's Python). `reset` takes away whatever was added since."""

    def __init__(self, root, pip_cache, measured):
        self.root = root
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        self.python = root / "bin" / "python"
        self.site = root / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        closure = dependency_closure(["ipykernel", "pip"])
        clash = sorted(set(closure) & measured)
        if clash:
            sys.exit(f"ipykernel's environment already has {clash}: they cannot be measured")
        for dist in closure.values():
            base = pathlib.Path(dist.locate_file("")).resolve()
            for f in dist.files or []:
                src = pathlib.Path(dist.locate_file(f)).resolve()
                if not src.is_file() or base not in src.parents:
                    continue  # scripts in bin/ and the like
                dst = self.site / src.relative_to(base)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        self.versions = {n: closure[n].version for n in ("ipykernel", "ipython", "pip", "pygments")}
        self.baseline = self._entries()
        spec_dir = root / "share" / "jupyter" / "kernels" / "bench-ref"
        spec_dir.mkdir(parents=True)
        ipykernel_spec = bg.VENV_BIN.parent / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
        spec = json.loads(ipykernel_spec.read_text())
        spec["argv"][0] = str(self.python)
        spec["display_name"] = "Python 3 (ipykernel, benchmark venv)"
        spec["env"] = {"PIP_CACHE_DIR": str(pip_cache), "PIP_CONFIG_FILE": os.devnull,
                       "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
                       "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                       "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        self.jupyter_path = root / "share" / "jupyter"

    def _entries(self):
        return {p for d in (self.site, self.root / "bin") for p in d.iterdir()}

    def reset(self):
        for p in self._entries() - self.baseline:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


# --- the gateways ----------------------------------------------------------------------------


def start_sandgate(args, data, logs, index_url, pool_size):
    """Sandgate on `data` (made on first use, the installed image and compiled module linked
    in), its logs in `logs`."""
    data.mkdir(parents=True, exist_ok=True)
    for shared in ("images", "cache"):
        if not (data / shared).exists():
            (data / shared).symlink_to(args.home / shared)
    argv = [str(args.gateway), "--port", "0", "--data-dir", str(data), "--log-format", "json",
            "--pool-size", str(pool_size), "--max-kernels", "16", "--package-index", index_url]
    kw = dict(label=logs.name, argv=argv, env={**os.environ, "SANDGATE_TOKEN": bg.TOKEN}, cwd=logs,
              kernel_name="sandgate-python", ready_stream="stdout", ready_marker="listening on ")
    return bg.PooledSandgate(pool_size, **kw) if pool_size else bg.Gateway(idle_children=0, **kw)


def start_reference(ref, logs):
    """Jupyter Kernel Gateway from this virtualenv, its kernels from `ref`'s kernelspec."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The machine's own pip settings (PIP_FIND_LINKS and the like) stay out: the kernelspec sets
    # the reference's, and PIP_CONFIG_FILE=os.devnull keeps pip's configuration files out.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
           "KG_AUTH_TOKEN": bg.TOKEN, "KG_LIST_KERNELS": "True",
           "JUPYTER_RUNTIME_DIR": str(logs / "runtime"), "JUPYTER_PATH": str(ref.jupyter_path)}
    argv = [str(bg.VENV_BIN / "jupyter"), "kernelgateway", "--ip=127.0.0.1", f"--port={port}", "--port_retries=0"]
    return bg.Gateway(logs.name, argv, env, logs, kernel_name="bench-ref", ready_stream="stderr",
                      ready_marker="is available at ", idle_children=0)


class System:
    """One side of the comparison: how it is started and how its `%pip install` is typed."""

    def __init__(self, key, start, install_line):
        self.key, self.start, self.install_line = key, start, install_line
        self.gw = None
        self.starts = 0

    def launch(self, *extra):
        self.starts += 1
        self.gw = self.start(self.starts, *extra)
        self.gw.settle()
        return self.gw

    def stop(self):
        if self.gw is not None:
            self.gw.stop()
            self.gw = None


def run(ws, code, timeout):
    """Executes `code`; returns (reply content, stream text) once the reply and the idle it
    caused have come."""
    msg_id = ws.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                         "user_expressions": {}, "allow_stdin": False})
    deadline = time.monotonic() + timeout
    reply, idle, out = None, False, []
    while reply is None or not idle:
        msg = ws.recv(deadline, f"no reply and idle for {code[:40]!r} within {timeout} s")
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg.get("channel") == "shell":
            reply = msg["content"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
        elif msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
    return reply, "".join(out)


def checked(ws, code, timeout, expect=None):
    reply, text = run(ws, code, timeout)
    if reply.get("status") != "ok" or (expect is not None and expect not in text):
        raise RuntimeError(f"{code[:60]!r} gave {reply.get('status')}: "
                           f"{reply.get('ename')}: {reply.get('evalue')}\n{text[-2000:]}")
    return text


def installed_names(text):
    """The distributions a `Successfully installed a-1.0 b-2.0` line names."""
    line = next((ln for ln in text.splitlines() if "Successfully installed " in ln), None)
    if line is None:
        raise RuntimeError(f"no `Successfully installed` line in:\n{text[-2000:]}")
    return [w.rsplit("-", 1)[0] for w in line.split("Successfully installed ", 1)[1].split()]


class Kernel:
    """A kernel of `gw` and its WebSocket, ready."""

    def __init__(self, gw):
        self.gw = gw
        self.id = gw.start_kernel()
        self.ws = gw.connect(self.id)
        self.ws.await_ready(READY_TIMEOUT)

    def close(self):
        self.ws.close()
        self.gw.delete_kernel(self.id)
        self.gw.settle(deleted=self.id)


def install_round(system, pkg, index, verbose=False):
    """One install round on `system` (see the docstring); returns its figures and what the
    install put in."""
    gw = system.gw
    k = Kernel(gw)
    try:
        checked(k.ws, "1+1", READY_TIMEOUT)
        mark = index.mark()
        started = time.perf_counter()
        text = checked(k.ws, system.install_line(pkg), INSTALL_TIMEOUT, "Successfully installed")
        install = ms_since(started)
        install_requests = index.since(mark)
        names = installed_names(text)
        if verbose:
            progress(f"{gw.label}: {system.install_line(pkg)}\n{text}")
        started = time.perf_counter()
        checked(k.ws, pkg["code"], READY_TIMEOUT, pkg["expect"])
        first_import = ms_since(started)
    finally:
        k.close()
    return {"install_ms": install, "import_ms": first_import, "install_requests": install_requests,
            "installed": names}


def new_kernel_import(gw, pkg, index):
    """POST /api/kernels to the import cell's reply and idle: (total ms, import cell ms, index
    requests, the kernel, still open)."""
    mark = index.mark()
    started = time.perf_counter()
    k = Kernel(gw)
    ready = time.perf_counter()
    checked(k.ws, pkg["code"], READY_TIMEOUT, pkg["expect"])
    total, cell = ms_since(started), ms_since(ready)
    return total, cell, index.since(mark), k


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured rounds per package and system (default 10)")
    parser.add_argument("--restarts", type=int, default=5,
                        help="gateway restarts per package and system for the restore figure (default 5; 0 skips)")
    parser.add_argument("--pool-size", type=int, default=2, help="Sandgate's warm pool (default 2; at least 1)")
    parser.add_argument("--packages", nargs="+", choices=[p["name"] for p in PACKAGES],
                        default=[p["name"] for p in PACKAGES], help="the packages to measure (default all)")
    parser.add_argument("--wheels", type=pathlib.Path, default=bg.ROOT / "target" / "bench-wheels",
                        help="folder of the downloaded wheels (default target/bench-wheels)")
    parser.add_argument("--gateway", type=pathlib.Path, default=bg.ROOT / "target" / "release" / "sandgate")
    parser.add_argument("--home", type=pathlib.Path, default=bg.default_home(),
                        help="the installed Sandgate home with images/ and cache/")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true",
                        help="show what each `%%pip install` printed in the first two rounds")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the run's folder and logs (always kept when the run fails)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1 (the restart rounds use 0)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not args.gateway.exists():
        sys.exit(f"{args.gateway} is missing: build it with `cargo build --release`")
    if not any((args.home / "cache").glob("*.cwasm")):
        sys.exit(f"no compiled module in {args.home / 'cache'}: run `sandgate-kernel install` first")
    packages = [p for p in PACKAGES if p["name"] in args.packages]
    binary_mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.gateway.stat().st_mtime))
    load_start = os.getloadavg()

    wheels = ensure_wheels(args.wheels)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="sandgate-pkg-bench-"))
    progress(f"run folder and logs in {tmp} (removed after a run that succeeds, unless --keep-logs)")
    index = WheelIndex(wheels).start()
    systems, succeeded = [], False
    results = {p["name"]: {"sandgate": {}, "reference": {}} for p in packages}
    try:
        progress("the reference's venv: copying ipykernel, pip and their dependencies")
        ref = ReferenceEnv(tmp / "ref-venv", tmp / "pip-cache", {canonical(p["name"]) for p in packages})
        sandgate_data = tmp / "sandgate-data"

        def sandgate_start(n, pool_size=args.pool_size):
            return start_sandgate(args, sandgate_data, tmp / f"sandgate-{n}", index.url, pool_size)

        sandgate = System("sandgate", sandgate_start, lambda p: f"%pip install {p['spec']}")
        reference = System("reference", lambda n: start_reference(ref, tmp / f"kernel-gateway-{n}"),
                           lambda p: f"%pip install --index-url {index.url} --trusted-host 127.0.0.1 {p['spec']}")
        systems = [sandgate, reference]

        def take_away(system, k, names):
            """Uninstalls what an install round added, with its kernel `k` (not timed)."""
            if system is sandgate:
                checked(k.ws, "%pip uninstall -y " + " ".join(names), INSTALL_TIMEOUT, "Successfully uninstalled")
            else:
                ref.reset()

        for s in systems:
            s.launch()
        for round_ in range(args.runs + 1):
            order = systems if round_ % 2 == 0 else systems[::-1]
            for pkg in packages:
                for system in order:
                    r = results[pkg["name"]][system.key]
                    got = install_round(system, pkg, index, args.verbose and round_ < 2)
                    total, cell, requests, k = new_kernel_import(system.gw, pkg, index)
                    try:
                        take_away(system, k, got["installed"])
                    finally:
                        k.close()
                    if round_ == 0:
                        r["cold"] = got
                        r["installed"] = got["installed"]
                        continue
                    for key in ("install_ms", "import_ms"):
                        r.setdefault(key, []).append(got[key])
                    r.setdefault("install_requests", []).append(len(got["install_requests"]))
                    r.setdefault("install_requests_paths", []).append(got["install_requests"])
                    r.setdefault("new_kernel_ms", []).append(total)
                    r.setdefault("new_kernel_cell_ms", []).append(cell)
                    r.setdefault("new_kernel_requests", []).append(len(requests))
            progress(f"round {round_}/{args.runs} done" + (" (first installs, caches empty: not in the medians)"
                                                          if round_ == 0 else ""))
        if args.restarts:
            # Everything installed for good, then each gateway restarted before each measurement.
            for system in systems:
                k = Kernel(system.gw)
                try:
                    checked(k.ws, system.install_line({"spec": " ".join(p["spec"] for p in packages)}),
                            INSTALL_TIMEOUT, "Successfully installed")
                finally:
                    k.close()
                system.stop()
            for round_ in range(args.restarts):
                order = systems if round_ % 2 == 0 else systems[::-1]
                for pkg in packages:
                    for system in order:
                        gw = system.launch(0) if system is sandgate else system.launch()
                        try:
                            total, cell, requests, k = new_kernel_import(gw, pkg, index)
                            k.close()
                        finally:
                            system.stop()
                        r = results[pkg["name"]][system.key]
                        r.setdefault("restart_ms", []).append(total)
                        r.setdefault("restart_cell_ms", []).append(cell)
                        r.setdefault("restart_requests", []).append(len(requests))
                progress(f"restart round {round_ + 1}/{args.restarts} done")
        succeeded = True
    finally:
        for s in systems:
            s.stop()
        index.stop()
        if succeeded and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not succeeded:
            progress(f"the run failed; its folder and logs are in {tmp}")

    load_end = os.getloadavg()
    reference_name = (f"Kernel Gateway {kernel_gateway.__version__} + ipykernel {ref.versions['ipykernel']}, "
                      f"pip {ref.versions['pip']}")
    print(f"\nSandgate (--package-index on 127.0.0.1, --pool-size {args.pool_size}; binary of {binary_mtime}) against "
          f"{reference_name} (a venv of the run's own), the same index on 127.0.0.1; {args.runs} rounds after one "
          f"with empty caches, {args.restarts} gateway restarts; {os.cpu_count()} CPUs, load average "
          f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end\n")
    print(f"| metric | Sandgate | {reference_name} | Sandgate / reference |")
    print("|---|---:|---:|---:|")
    rows = []
    for pkg in packages:
        name = pkg["name"]
        sg, rf = results[name]["sandgate"], results[name]["reference"]
        for side in (sg, rf):
            side["cold_install_ms"] = [side["cold"]["install_ms"]]
            side["cold_import_ms"] = [side["cold"]["import_ms"]]
        table = [
            (f"`%pip install {pkg['spec']}`, wheels cached (median / p90)", "install_ms"),
            (f"... the first `import {name}` and a call after it (median / p90)", "import_ms"),
            (f"new kernel to its first `import {name}` and a call, same gateway run (median / p90)", "new_kernel_ms"),
            ("... the import cell alone (median / p90)", "new_kernel_cell_ms"),
        ]
        if args.restarts:
            table.append((f"new kernel to its first `import {name}` after a gateway restart (Sandgate "
                          "`--pool-size 0`: the site folder restored on the way; median / p90)", "restart_ms"))
        table += [(f"`%pip install {pkg['spec']}`, caches empty (one sample)", "cold_install_ms"),
                  ("... the first import after it (one sample)", "cold_import_ms")]
        for label, key in table:
            s, r = sg.get(key), rf.get(key)
            if len(s) == 1:
                cells = f"{s[0]:.0f} ms", f"{r[0]:.0f} ms"
            else:
                cells = tuple(f"{statistics.median(x):.0f} / {pct(x, 90):.0f} ms" for x in (s, r))
            ratio = statistics.median(s) / statistics.median(r)
            rows.append({"package": name, "metric": label, "key": key, "sandgate_median": statistics.median(s),
                         "sandgate_p90": pct(s, 90), "reference_median": statistics.median(r),
                         "reference_p90": pct(r, 90), "ratio": ratio})
            print(f"| {label} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    print()
    for pkg in packages:
        sg, rf = results[pkg["name"]]["sandgate"], results[pkg["name"]]["reference"]
        print(f"`{pkg['spec']}` installs {len(sg['installed'])} on Sandgate ({', '.join(sg['installed'])}), "
              f"{len(rf['installed'])} on the reference ({', '.join(rf['installed'])}).")
        for label, side in (("Sandgate", sg), ("the reference", rf)):
            first = describe_requests(side["install_requests_paths"][0])
            print(f"  index requests, {label}: per cached install {min(side['install_requests'])}-"
                  f"{max(side['install_requests'])} (the first: {first}), "
                  f"per new kernel at most {max(side['new_kernel_requests'])}"
                  + (f", after a restart at most {max(side['restart_requests'])}" if args.restarts else "")
                  + f"; the install with caches empty: {describe_requests(side['cold']['install_requests'])}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "packages",
            "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "load_average_start": load_start, "load_average_end": load_end,
                            "gateway_binary": str(args.gateway), "gateway_binary_mtime": binary_mtime,
                            "reference": reference_name, "reference_venv": ref.versions},
            "runs": {"runs": args.runs, "restarts": args.restarts, "pool_size": args.pool_size},
            "rows": rows,
            "samples": results,
        }, indent=2, default=str))
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
