"""A package index of the tests' own, on 127.0.0.1: tiny wheels built here (good ones, and ones
that try path traversal, carry a compiled extension, or lie about their hash), served the way
PyPI serves them (PEP 503 HTML and PEP 691 JSON simple pages, PEP 658 metadata files), with
every request counted."""

import base64
import hashlib
import http.server
import io
import json
import re
import threading
import zipfile


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(name, version, files, requires=(), tag="py3-none-any", extra=None,
                summary="A test package"):
    """A wheel's bytes: `files` maps paths in the wheel to text or bytes; `extra` adds entries
    verbatim (not in RECORD), for the malicious cases."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            f"Summary: {summary}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    metadata = "\n".join(meta) + "\n\n"
    wheel_file = f"Wheel-Version: 1.0\nGenerator: sandgate-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    entries = {p: (c.encode() if isinstance(c, str) else c) for p, c in files.items()}
    entries[f"{dist}.dist-info/METADATA"] = metadata.encode()
    entries[f"{dist}.dist-info/WHEEL"] = wheel_file.encode()
    record = "".join(f"{p},{_record_hash(c)},{len(c)}\n" for p, c in entries.items())
    record += f"{dist}.dist-info/RECORD,,\n"
    entries[f"{dist}.dist-info/RECORD"] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p, c in entries.items():
            z.writestr(p, c)
        for p, c in (extra or {}).items():
            z.writestr(p, c)
    return buf.getvalue(), metadata


class Index:
    """Projects -> files, served over HTTP on 127.0.0.1."""

    def __init__(self):
        self.projects = {}  # canonical name -> list of file dicts
        self.blobs = {}  # filename -> bytes
        self.requests = []  # paths asked, in order
        self.lock = threading.Lock()
        self.endless = set()  # filenames whose download never ends
        self.endless_started = threading.Event()  # set when one of them begins
        self.server = None

    def add(self, name, version, files=None, requires=(), tag="py3-none-any", extra=None,
            wrong_hash=False, metadata_file=True, hashed=True):
        files = files if files is not None else {
            f"{name.replace('-', '_')}/__init__.py": f"__version__ = {version!r}\n"}
        data, metadata = build_wheel(name, version, files, requires, tag, extra)
        filename = f"{name.replace('-', '_')}-{version}-{tag}.whl"
        digest = hashlib.sha256(data).hexdigest()
        if wrong_hash:
            digest = hashlib.sha256(b"not the file").hexdigest()
        self.blobs[filename] = data
        self.blobs[filename + ".metadata"] = metadata.encode()
        entry = {"filename": filename, "hashes": {"sha256": digest} if hashed else {},
                 "size": len(data)}
        if metadata_file:
            entry["core-metadata"] = {"sha256": hashlib.sha256(metadata.encode()).hexdigest()}
        self.projects.setdefault(canonical(name), []).append(entry)
        return filename

    def add_sdist(self, name, version):
        filename = f"{name}-{version}.tar.gz"
        self.blobs[filename] = b"not really a tarball"
        self.projects.setdefault(canonical(name), []).append(
            {"filename": filename, "hashes": {"sha256": hashlib.sha256(b"x").hexdigest()}})

    def count(self, prefix):
        with self.lock:
            return sum(1 for p in self.requests if p.startswith(prefix))

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def start(self):
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with index.lock:
                    index.requests.append(self.path)
                m = re.fullmatch(r"/simple/([^/]+)/", self.path)
                if m:
                    files = index.projects.get(m.group(1))
                    if files is None:
                        self.send_error(404)
                        return
                    if "application/vnd.pypi.simple.v1+json" in self.headers.get("Accept", ""):
                        body = json.dumps({
                            "meta": {"api-version": "1.1"}, "name": m.group(1),
                            "files": [{**f, "url": f"../../files/{f['filename']}"}
                                      for f in files]}).encode()
                        ctype = "application/vnd.pypi.simple.v1+json"
                    else:
                        links = []
                        for f in files:
                            frag = f"#sha256={f['hashes']['sha256']}" if f["hashes"] else ""
                            meta = (f' data-core-metadata="sha256={f["core-metadata"]["sha256"]}"'
                                    if "core-metadata" in f else "")
                            links.append(f'<a href="../../files/{f["filename"]}{frag}"{meta}>'
                                         f'{f["filename"]}</a><br/>')
                        body = ("<!DOCTYPE html><html><body>" + "".join(links) +
                                "</body></html>").encode()
                        ctype = "text/html"
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                m = re.fullmatch(r"/files/([^/]+)", self.path)
                if m and m.group(1) in index.blobs:
                    name = m.group(1)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    if name in index.endless:
                        self.end_headers()
                        index.endless_started.set()
                        chunk = b"\0" * 65536
                        try:
                            for _ in range(100_000):  # bounded: 6.5 GB, far past any cap
                                self.wfile.write(chunk)
                        except OSError:
                            pass
                        return
                    data = index.blobs[name]
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
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
