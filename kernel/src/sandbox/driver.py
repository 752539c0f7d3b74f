"""Sandgate's guest-side driver.

Runs inside the sandbox, in the same interpreter as the user's code. The kernel hands it one
request per turn through the door (`_host.call`); it runs cells in `__main__` as IPython does
(last expression shown with rich reprs, `display()`, matplotlib figures as PNG at the end of the
cell, tracebacks that point at the cell), completes, inspects, and answers. It trusts nothing
the user's code leaves behind: the kernel checks every message it sends.
"""

import ast
import base64
import builtins
import codeop
import inspect
import io
import json
import keyword
import linecache
import os
import pprint
import re
import signal
import sys
import time
import traceback
import types

_host = __import__("_host")
_main = sys.modules["__main__"]
_ns = _main.__dict__
_state = {"count": 0, "request": None, "shown_figures": set(), "payload": [], "result": None,
          "capture": None, "parent": None}
# The cells' inputs and results, shown to the user as `In` and `Out` as in IPython; the driver
# keeps its own references, so a user who names a variable `In` or `Out` breaks nothing.
_inputs, _outputs = [""], {}
_ns["In"], _ns["Out"] = _inputs, _outputs

# The guest's environment, set again here because a snapshot's os.environ is the one it was
# taken with: the kernel hands over the one it gave this instance (`HOME` is /home/user when
# its launcher gave it a home folder).
os.environ.update(json.loads(_host.call(b'{"op":"env"}')))
for _d in ("/tmp/home/.matplotlib",):
    try:
        os.makedirs(_d, exist_ok=True)
    except OSError:
        pass
try:
    os.chdir("/workspace")
except OSError:
    pass
# As in IPython, modules next to the notebook (the working directory) can be imported; unlike
# IPython, after the image's own, so a workspace file named like one (`platform.py`, `json.py`)
# cannot replace a module this driver or the scientific stack imports later.
# Packages the workspace installed with %pip (a read-only folder the gateway fills, there only
# when the kernel was started by the gateway), after the image's own and before the notebook's
# folder; `site` reads their .pth files.
_SITE_PACKAGES = "/usr/local/lib/python3.15/site-packages"
if os.path.isdir(_SITE_PACKAGES) and _SITE_PACKAGES not in sys.path:
    import site as _site
    _site.addsitedir(_SITE_PACKAGES)
if "" not in sys.path:
    sys.path.append("")
try:
    signal.signal(signal.SIGINT, signal.default_int_handler)
except (ValueError, OSError, AttributeError):
    pass
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.reconfigure(line_buffering=True, errors="backslashreplace")
    except (AttributeError, ValueError):
        pass


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


_encode_json = json.JSONEncoder(default=str).encode


def _door(message):
    """One request to the kernel; stdout is flushed first so output stays in order."""
    _flush()
    answer = _host.call(_encode_json(message).encode())
    return json.loads(answer)


def _publish(msg_type, content):
    capture = _state["capture"]
    if capture is not None and msg_type == "display_data":
        capture.append(content)  # inside `%%capture`
        return
    _door({"op": "publish", "msg_type": msg_type, "content": content})


# ---------------------------------------------------------------------------------------------
# Rich output

_REPR_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
    ("application/pdf", "_repr_pdf_"),
)
_BINARY = {"image/png", "image/jpeg", "application/pdf"}


def _method(obj, name):
    """A repr method of an instance, never of a class, and only if it is callable."""
    if isinstance(obj, type):
        return None
    try:
        method = getattr(obj, name, None)
    except Exception:
        return None
    return method if callable(method) else None


def _encode(mime, value):
    if mime in _BINARY and isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if mime == "application/json" or mime.endswith("+json"):
        # JSON itself (a widget's `application/vnd.jupyter.widget-view+json`, say).
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _plain(obj):
    if type(obj) in (list, tuple, dict, set, frozenset):
        try:
            return pprint.pformat(obj, width=79, sort_dicts=False)
        except Exception:
            pass
    try:
        return repr(obj)
    except Exception as e:
        return f"<repr of {type(obj).__name__} failed: {type(e).__name__}: {e}>"


def _is_figure(obj):
    mpl = sys.modules.get("matplotlib.figure")
    return mpl is not None and isinstance(obj, mpl.Figure)


# Types whose instances have no rich reprs (none can be given to them): plain text at once.
_PLAIN_TYPES = frozenset((int, float, complex, bool, str, bytes, type(None)))


def format_bundle(obj, include=None, exclude=None):
    """(data, metadata) for `obj`, like IPython's display formatter."""
    if type(obj) in _PLAIN_TYPES and not include and not exclude and _shell["instance"] is None:
        return {"text/plain": _plain(obj)}, {}
    data, metadata = {}, {}
    if _shell["instance"] is not None:
        # Functions registered through get_ipython().display_formatter come first, as in IPython.
        data = {mime: _encode(mime, value) for mime, value in _registered_reprs(obj).items()}
    if _is_figure(obj):
        _state["shown_figures"].add(id(obj))
        figure, metadata = _figure_bundle(obj)
        data = dict(figure, **data)
    bundle_method = _method(obj, "_repr_mimebundle_")
    if bundle_method is not None:
        try:
            result = bundle_method(include=include, exclude=exclude)
        except TypeError:
            result = bundle_method()
        except Exception as e:
            result = None
            print(f"{type(obj).__name__}._repr_mimebundle_ failed: {e!r}", file=sys.stderr)
        if isinstance(result, tuple) and len(result) == 2:
            result, md = result
            if isinstance(md, dict):
                metadata.update(md)
        if isinstance(result, dict):
            for mime, value in result.items():
                data[str(mime)] = _encode(str(mime), value)
    for mime, name in _REPR_METHODS:
        if mime in data:
            continue
        method = _method(obj, name)
        if method is None:
            continue
        try:
            value = method()
        except NotImplementedError:
            continue
        except Exception as e:
            print(f"{type(obj).__name__}.{name} failed: {e!r}", file=sys.stderr)
            continue
        if value is None:
            continue
        if isinstance(value, tuple) and len(value) == 2:
            value, md = value
            if isinstance(md, dict):
                metadata[mime] = md
        data[mime] = _encode(mime, value)
    if "text/plain" not in data:
        data["text/plain"] = _plain(obj)
    if include:
        data = {k: v for k, v in data.items() if k in include}
    if exclude:
        data = {k: v for k, v in data.items() if k not in exclude}
    _e2b(obj, data, metadata, include, exclude)
    return data, metadata


def _e2b(obj, data, metadata, include=None, exclude=None):
    """E2B's structured results, `e2b/chart` for a figure and `e2b/data` for a DataFrame (see
    charts.py), added to `data` when the request asks for them: the gateway's E2B-compatible
    API sets `sandgate_e2b` in its execute_request's metadata. Jupyter's clients get a
    figure's chart as `application/vnd.e2b.chart+json` instead (nbformat refuses a dict under
    a MIME type that is not JSON's, so nbclient and papermill would fail on every figure with
    `e2b/chart`), and no DataFrame data (it would double the size of every table shown)."""
    request = _state["request"]
    if not request or not request.get("e2b"):
        if _is_figure(obj):
            _load("charts")
            _e2b_add(obj, data, metadata, include, exclude, jupyter=True)
        return
    pandas = sys.modules.get("pandas")
    if not (_is_figure(obj) or pandas is not None and isinstance(obj, pandas.DataFrame)
            or _method(obj, "_repr_e2b_chart_") or _method(obj, "_repr_e2b_data_")):
        return
    _load("charts")
    _e2b_add(obj, data, metadata, include, exclude)


def display(*objs, include=None, exclude=None, metadata=None, transient=None,
            display_id=None, raw=False, clear=False, update=False, **kwargs):
    """Show objects as `display_data`, as IPython's `display` does."""
    if clear:
        clear_output(wait=True)
    handle = None
    if display_id is True:
        display_id = os.urandom(16).hex()
    if display_id is not None:
        handle = DisplayHandle(display_id)
    for obj in objs:
        if raw:
            data, md = dict(obj), {}
        else:
            data, md = format_bundle(obj, include, exclude)
        if metadata:
            md.update(metadata)
        content = {"data": data, "metadata": md, "transient": dict(transient or {})}
        if display_id is not None:
            content["transient"]["display_id"] = str(display_id)
        _publish("update_display_data" if update else "display_data", content)
    return handle


def update_display(obj, *, display_id, **kwargs):
    """Replace what an earlier `display(..., display_id=...)` showed."""
    kwargs["update"] = True
    display(obj, display_id=display_id, **kwargs)


def clear_output(wait=False):
    """Clear the cell's output (after the next output if `wait`)."""
    _publish("clear_output", {"wait": bool(wait)})


class DisplayHandle:
    """What `display(..., display_id=True)` returns."""

    def __init__(self, display_id=None):
        self.display_id = display_id or os.urandom(16).hex()

    def display(self, obj, **kwargs):
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj, **kwargs):
        update_display(obj, display_id=self.display_id, **kwargs)

    def __repr__(self):
        return f"<DisplayHandle display_id={self.display_id}>"


def _flush_figures():
    """The inline backend: every open figure of this cell as PNG, then closed."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            fig = plt.figure(num)
            if id(fig) in _state["shown_figures"] or not fig.axes and not fig.texts and not fig.images:
                continue
            size = fig.get_size_inches() * fig.dpi
            text = f"<Figure size {size[0]:g}x{size[1]:g} with {len(fig.axes)} Axes>"
            data, metadata = _figure_bundle(fig)
            data["text/plain"] = text
            _e2b(fig, data, metadata)
            _publish("display_data", {"data": data, "metadata": metadata, "transient": {}})
    finally:
        plt.close("all")
        _state["shown_figures"].clear()


class _InlineBackendFinder:
    """Makes `module://_sandgate_inline` importable: Agg canvases, and a `show()` that
    displays. matplotlib reads the module's attributes with `vars()`, so they are set when the
    module is executed (that is, when matplotlib first selects the backend). Also makes
    `micropip` importable (when no installed package is named so): Pyodide's installer API over
    the gateway (packages.py)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in ("_sandgate_inline", "micropip"):
            return None
        import importlib.util
        return importlib.util.spec_from_loader(name, _InlineBackendFinder)

    @staticmethod
    def create_module(spec):
        if spec.name == "micropip":
            _load("packages")
            return _pkg_micropip_module()
        return None

    @staticmethod
    def exec_module(module):
        if module.__name__ == "micropip":
            return
        from matplotlib.backend_bases import FigureManagerBase
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        def show(*args, **kwargs):
            _flush_figures()

        module.FigureCanvas = FigureCanvasAgg
        module.FigureManager = FigureManagerBase
        module.show = show


sys.meta_path.append(_InlineBackendFinder)


class _LeftOutFinder:
    """Modules the image leaves out (see images/python-wasi/fetch.py), named in an error that
    says so, instead of a bare "No module named". Last on `sys.meta_path`: only asked for what
    nothing else found."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "sklearn.datasets.images":
            raise ImportError(
                "scikit-learn's sample images (sklearn.datasets.images, which "
                "load_sample_image and load_sample_images read) are left out of the sandbox "
                "image, whose Pillow cannot decode JPEG; a PNG beside the notebook can be read "
                "with matplotlib.pyplot.imread or PIL.Image.open", name=name)
        return None


sys.meta_path.append(_LeftOutFinder)


class _Object:
    """Base of the IPython.display stand-ins: `data` shown under one MIME type."""

    mime = "text/plain"

    def __init__(self, data=None, url=None, filename=None, metadata=None, **kwargs):
        if filename is not None and data is None:
            mode = "rb" if self.mime in _BINARY else "r"
            with open(filename, mode) as f:
                data = f.read()
        self.data = data
        self.metadata = metadata

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = self.data
        if self.mime in _BINARY and isinstance(data, (bytes, bytearray)):
            data = base64.b64encode(bytes(data)).decode("ascii")
        bundle = {self.mime: data, "text/plain": f"<{type(self).__module__}.{type(self).__name__} object>"}
        return (bundle, {self.mime: self.metadata}) if self.metadata else bundle


def _ipython_shim():
    """A small `IPython.display` so notebooks written for IPython run unchanged."""
    classes = {}
    for name, mime in (("HTML", "text/html"), ("Markdown", "text/markdown"), ("SVG", "image/svg+xml"),
                       ("Latex", "text/latex"), ("Math", "text/latex"), ("JSON", "application/json"),
                       ("Javascript", "application/javascript"), ("Pretty", "text/plain")):
        classes[name] = type(name, (_Object,), {"mime": mime, "__module__": "IPython.display"})

    def math_bundle(self, include=None, exclude=None):
        text = self.data if str(self.data).startswith("$") else f"$\\displaystyle {self.data}$"
        return {"text/latex": text, "text/plain": f"<IPython.display.Math object>"}

    classes["Math"]._repr_mimebundle_ = math_bundle

    class Image(_Object):
        """An image from bytes or a file; PNG unless `format` says otherwise."""

        def __init__(self, data=None, url=None, filename=None, format=None, **kwargs):
            if isinstance(data, str) and os.path.exists(data):
                filename, data = data, None
            fmt = (format or (filename or "").rsplit(".", 1)[-1] or "png").lower()
            self.mime = "image/jpeg" if fmt in ("jpg", "jpeg") else "image/png"
            if filename is not None and data is None:
                with open(filename, "rb") as f:
                    data = f.read()
            self.data = data
            self.metadata = None

    classes["Image"] = Image
    Image.__module__ = "IPython.display"
    pkg = types.ModuleType("IPython", "Sandgate's stand-in for the parts of IPython notebooks use.")
    disp = types.ModuleType("IPython.display")
    for name, value in dict(classes, display=display, clear_output=clear_output,
                            update_display=update_display, DisplayHandle=DisplayHandle).items():
        setattr(disp, name, value)
    core = types.ModuleType("IPython.core")
    # A package, so `IPython.core.interactiveshell` can be imported (see `_ImportHooks`).
    core.__path__ = []
    core.display = disp
    pkg.display = disp
    pkg.core = core
    getipython = types.ModuleType("IPython.core.getipython")
    getipython.get_ipython = pkg.get_ipython = get_ipython
    core.getipython = getipython
    # matplotlib asks this of IPython older than 8.24 for the GUI its backend needs: none.
    pylabtools = types.ModuleType("IPython.core.pylabtools")
    pylabtools.backend2gui = {}
    core.pylabtools = pylabtools
    pkg.version_info = (0, 0, 0, "sandgate")
    pkg.__version__ = "0.0.0+sandgate"
    sys.modules.setdefault("IPython", pkg)
    sys.modules.setdefault("IPython.display", disp)
    sys.modules.setdefault("IPython.core", core)
    sys.modules.setdefault("IPython.core.display", disp)
    sys.modules.setdefault("IPython.core.getipython", getipython)
    sys.modules.setdefault("IPython.core.pylabtools", pylabtools)


# The shell `get_ipython()` returns, made on first use (see ipython.py).
_shell = {"instance": None}


def get_ipython():
    """The running shell, as in IPython: what libraries and exported notebooks use of it."""
    if _shell["instance"] is None:
        _load("ipython")
    return _shell["instance"]


_ipython_shim()
builtins.display = display
builtins.get_ipython = get_ipython


class _PatchedLoader:
    """A module's own loader, and a function run on the module once it has been executed."""

    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __repr__(self):
        return f"<{self._loader!r}, patched by the sandbox>"

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _ImportHooks:
    """First on `sys.meta_path`, for four modules, when they are first imported (nothing is
    loaded at boot for any):
    - `comm`, the package ipywidgets and others make comms with: once it has run, its
      `create_comm` and `get_comm_manager` are the sandbox's (comms.py), as ipykernel assigns
      them when it starts;
    - `IPython.core.interactiveshell` (of the IPython stand-in): `InteractiveShell.instance()`
      is the shell `get_ipython()` returns (ipywidgets' Output formats with it);
    - `ipywidgets.widgets.interaction`: `interact` shows the figures its function draws inside
      its output, as with ipykernel (ipywidgets flushes them there only for the inline backend
      of ipykernel, which it recognises by name);
    - `tqdm.std`: its monitor thread is off from the start (the sandbox has no threads; tqdm
      would warn that it cannot start one above the first bar of every kernel)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "comm":
            return _ImportHooks._wrapped(name, path, target, _patch_comm)
        if name == "tqdm.std":
            return _ImportHooks._wrapped(name, path, target, _patch_tqdm)
        if name == "ipywidgets.widgets.interaction":
            return _ImportHooks._wrapped(name, path, target, _patch_interaction)
        if name == "IPython.core.interactiveshell" and sys.modules.get("IPython.core") is _IPYTHON_CORE:
            import importlib.util
            return importlib.util.spec_from_loader(name, _ImportHooks)
        return None

    @staticmethod
    def _wrapped(name, path, target, patch):
        """The spec the other finders give `name`, its loader wrapped to run `patch`."""
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is _ImportHooks or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchedLoader(spec.loader, patch)
                return spec
        return None

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module):
        get_ipython()  # the shell (ipython.py)
        module.InteractiveShell = ZMQInteractiveShell
        module.ExecutionInfo, module.ExecutionResult = ExecutionInfo, ExecutionResult


def _patch_comm(module):
    _load("comms")
    _comm_patch(module)


def _patch_interaction(module):
    if callable(getattr(module, "show_inline_matplotlib_plots", None)):
        module.show_inline_matplotlib_plots = _flush_figures


def _patch_tqdm(module):
    bar = getattr(module, "tqdm", None)
    if isinstance(getattr(bar, "monitor_interval", None), (int, float)):
        bar.monitor_interval = 0


_IPYTHON_CORE = sys.modules.get("IPython.core")
sys.meta_path.insert(0, _ImportHooks)


# ---------------------------------------------------------------------------------------------
# input()


class StdinNotImplementedError(RuntimeError):
    """input() was called but this request does not allow stdin."""


def _input(prompt="", password=False):
    request = _state["request"] or {}
    if not request.get("allow_stdin", False):
        raise StdinNotImplementedError(
            "input() was called, but this frontend does not support input requests.")
    answer = _door({"op": "input", "prompt": str(prompt), "password": bool(password)})
    if answer.get("interrupted"):
        raise KeyboardInterrupt("interrupted while waiting for input")
    if "error" in answer:
        raise EOFError(answer["error"])
    return answer.get("value", "")


def input(prompt=""):
    """Read a line from the frontend (Jupyter's `input_request`)."""
    return _input(prompt, False)


def getpass(prompt="Password: ", stream=None):
    """Read a hidden line from the frontend."""
    return _input(prompt, True)


builtins.input = input
try:
    import getpass as _getpass_module
    _getpass_module.getpass = getpass
except ImportError:
    pass


# ---------------------------------------------------------------------------------------------
# Magics: the syntax (`_transform`) and the entry point (`magic`). The magics themselves are in
# magics.py, which the kernel hands over when a cell first uses one.

_MAGIC_LINE = re.compile(r"^(\s*)([%!])(%?)(\w*)(.*)$")
# `x = %env HOME`, `a, b = %magic ...`: a line magic's value assigned.
_MAGIC_ASSIGN = re.compile(r"^(\s*)([A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)\s*=\s*([%!])(\w*)(.*)$")


class _UsageError(Exception):
    """A magic was misused (shown as `UsageError`, as IPython does)."""


_UsageError.__name__ = "UsageError"
_UsageError.__qualname__ = "UsageError"


# The inline backend's settings (`%config InlineBackend.…`), as IPython's defaults.
_FIGURE_FORMATS = {"png": "image/png", "retina": "image/png", "png2x": "image/png",
                   "jpeg": "image/jpeg", "jpg": "image/jpeg", "svg": "image/svg+xml",
                   "pdf": "application/pdf"}
_inline = {"formats": ("png",), "print_figure_kwargs": {"bbox_inches": "tight"}}


def _png_size(png):
    """(width, height) in pixels from a PNG's header."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _figure_bundle(fig):
    """(data, metadata) of a matplotlib figure in the configured formats."""
    data, metadata = {}, {}
    for fmt in _inline["formats"]:
        buf = io.BytesIO()
        kwargs = dict(_inline["print_figure_kwargs"])
        double = fmt in ("retina", "png2x")
        kwargs["dpi"] = fig.dpi * (2 if double else 1)
        fig.savefig(buf, format="jpeg" if fmt == "jpg" else ("png" if double else fmt), **kwargs)
        raw = buf.getvalue()
        mime = _FIGURE_FORMATS[fmt]
        if mime == "image/svg+xml":
            data[mime] = raw.decode("utf-8")
        else:
            data[mime] = base64.b64encode(raw).decode("ascii")
        if double:
            width, height = _png_size(raw)
            metadata[mime] = {"width": width // 2, "height": height // 2}
    return data, metadata


# `%autoreload`'s state; `_execute` looks at its mode before every cell (see the magics).
_autoreload = {"mode": 0, "loaded": False, "only": set(), "stamps": {}}


def _magic_call(kind, name, rest, assigned=False):
    """The call a `%name rest` or `!cmd` line becomes (`x = !cmd` gets the output's lines, as
    `!!cmd` does)."""
    name, rest = ("!", ("!" if assigned else "") + name + rest) if kind == "!" else (name, rest)
    return f"__import__('sys').modules['_sandgate'].magic({name!r}, {rest!r})"


def _transform(source):
    """IPython's syntax that plain Python lacks: `%magic`, `%%cellmagic`, `!cmd`, `obj?`. Only
    for a cell that is not valid Python (see `_execute`), so a `%` line in a string is kept."""
    if "%" not in source and "!" not in source and "?" not in source:
        return source
    stripped = source.lstrip()
    if stripped.startswith("%%"):
        first, _, body = stripped.partition("\n")
        parts = first[2:].split(None, 1)
        name = parts[0] if parts else ""
        args = parts[1] if len(parts) > 1 else ""
        return f"__import__('sys').modules['_sandgate'].magic({name!r}, {args!r}, {body!r})\n"
    help_match = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*(\?\??)\s*", source)
    if help_match:
        return (f"__import__('sys').modules['_sandgate'].page({help_match.group(1)!r}, "
                f"{len(help_match.group(2))})\n")
    out = []
    for line in source.split("\n"):
        m = _MAGIC_ASSIGN.match(line)
        if m and (m.group(3) == "!" or m.group(4)):
            indent, targets, kind, name, rest = m.groups()
            out.append(f"{indent}{targets} = {_magic_call(kind, name, rest, assigned=True)}")
            continue
        m = _MAGIC_LINE.match(line)
        if m and (m.group(2) == "!" or m.group(4)) and not m.group(3):
            indent, kind, _, name, rest = m.groups()
            out.append(indent + _magic_call(kind, name, rest))
        else:
            out.append(line)
    return "\n".join(out)


_loaded = set()


def _load(name):
    """Runs the guest module `name` (a part of the driver the kernel keeps until a cell first
    needs it) in the driver's globals, once."""
    if name not in _loaded:
        source = _host.call(_encode_json({"op": "source", "name": name}).encode())
        if source.startswith(b'{"error"'):
            raise RuntimeError(json.loads(source)["error"])
        exec(compile(source, "<sandgate-driver>", "exec", dont_inherit=True), globals())
        _loaded.add(name)


def magic(name, args, body=None):
    if name == "!":
        _load("shell")  # the shell commands (shell.py), also handed over on first use
        return _sh_main(args)
    _load("magics")
    return _magic(name, args, body)


# ---------------------------------------------------------------------------------------------
# Running cells


def _cell_name(count):
    return f"<cell-{count}>"


def _compile_source(source, filename, want_value=True):
    """(statements, last expression) of `source` as code objects, either None; raises
    SyntaxError before anything runs."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    if want_value:
        # A cell that is one expression (`df.head()`, `1+1`) compiles straight to its value,
        # without the round trip through Python AST objects; anything else fails to parse as
        # an expression at once and takes the general path.
        try:
            return None, compile(source, filename, "eval", flags=flags, dont_inherit=True)
        except SyntaxError:
            pass
    tree = ast.parse(source, filename, "exec")
    last = None
    if want_value and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval", flags=flags,
                       dont_inherit=True)
    body = None
    if tree.body or last is None:
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
    return body, last


def _compile_cell(source, filename):
    """`_compile_source` of a cell, IPython's syntax (magics, `obj?`) included: looked for only
    in what Python rejects, so a `%` line inside a string stays the string's."""
    try:
        return _compile_source(source, filename)
    except SyntaxError:
        transformed = _transform(source)
        if transformed == source:
            raise
        return _compile_source(transformed, filename)


def _run_compiled(compiled):
    """Runs `_compile_source`'s code objects; returns the last expression's value."""
    body, last = compiled
    if body is not None:
        _run_code(body)
    return None if last is None else _run_code(last, evaluate=True)


def _run_source(source, filename, want_value=True):
    """Runs `source` in the user's namespace; returns the last expression's value."""
    return _run_compiled(_compile_source(source, filename, want_value))


def _run_code(code, evaluate=False):
    if code.co_flags & inspect.CO_COROUTINE:
        import asyncio
        coro = types.FunctionType(code, _ns)() if not evaluate else eval(code, _ns)
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()
    if evaluate:
        return eval(code, _ns)
    exec(code, _ns)
    return None


def _user_frames(tb):
    """The traceback from the first frame of user code on (the driver's frames dropped)."""
    while tb is not None and tb.tb_frame.f_code.co_filename == "<sandgate-driver>":
        tb = tb.tb_next
    return tb


# Tracebacks longer than this many frames are cut before they are formatted. Formatting costs
# about 0.25 ms a frame here (the traceback module parses every frame's line to place its
# carets, even for the repeats it then leaves out), so a recursion a million calls deep was
# minutes of formatting; a thousand, a quarter of a second.
_TRACEBACK_FRAMES = 100
# Frames of a run on one line shown before "[Previous line repeated N more times]", as Python.
_RUN_SHOWN = 3
# Exceptions of a chain (`raise ... from`, or raised while handling another) formatted at most:
# the last raised half and the first causes' half.
_CHAIN_SHOWN = 20
# How deep in the stack a cut traceback may start and still be left on its exception.
_SHALLOW = 1000


def _frame_here():
    return sys._getframe()


def _mark(what):
    code = _frame_here.__code__.replace(co_filename=f"<sandgate: {what}>")
    return types.FunctionType(code, {"sys": sys})()


# The frames that stand for those cut from a long traceback, how many in the entry's line
# number (see `_items`; `_format_traceback` writes them as Python's notes). Made here, once: a
# frame keeps its caller's frame, and with it whatever the caller holds.
_REPEATED, _SKIPPED = _mark("repeated"), _mark("skipped")


class _ChainSkipped(Exception):
    """Stands for the exceptions cut from the middle of a long chain; its argument: how many."""


def _longer(tb, limit):
    while tb is not None and limit >= 0:
        tb, limit = tb.tb_next, limit - 1
    return limit < 0


def _entries(tb):
    """The entries of the traceback `tb`, unlinked from each other."""
    entries = []
    while tb is not None:
        entries.append(tb)
        following = tb.tb_next
        tb.tb_next = None
        tb = following
    return entries


def _items(entries):
    """What to show of a long traceback: each run of more than 3 frames on one line cut to its
    first 3 and the number of the others (Python's "[Previous line repeated N more times]"),
    then the first and last halves of `_TRACEBACK_FRAMES` of that and, between them, the number
    of frames skipped as a `str`."""
    items = []
    key, run = None, 0
    for tb in entries:
        this = (tb.tb_frame.f_code, tb.tb_lineno)
        if this != key:
            if run > _RUN_SHOWN:
                items.append(run - _RUN_SHOWN)
            key, run = this, 0
        run += 1
        if run <= _RUN_SHOWN:
            items.append(tb)
    if run > _RUN_SHOWN:
        items.append(run - _RUN_SHOWN)
    half = _TRACEBACK_FRAMES // 2
    if len(items) <= 2 * half:
        return items
    skipped, tail = items[half:-half], items[-half:]
    if isinstance(tail[0], int):  # the note of a run that is skipped
        skipped.append(tail.pop(0))
    count = sum(i if isinstance(i, int) else 1 for i in skipped)
    return items[:half] + [str(count)] + tail


def _linked(items):
    """A traceback of copies of the entries in `items`, numbers standing for cut frames."""
    tb = None
    for item in reversed(items):
        if isinstance(item, int):
            tb = types.TracebackType(tb, _REPEATED, -1, item)
        elif isinstance(item, str):
            tb = types.TracebackType(tb, _SKIPPED, -1, int(item))
        else:
            tb = types.TracebackType(tb, item.tb_frame, item.tb_lasti, item.tb_lineno)
    return tb


def _cut(chain):
    """Cuts, in place, what would take too long to format: a chain of more than `_CHAIN_SHOWN`
    exceptions to its ends, the middle replaced by a `_ChainSkipped`, and tracebacks of more
    than `_TRACEBACK_FRAMES` frames (see `_items`). None if nothing was; else a dict: the cut
    tracebacks' entries by id of their exception, for `_release`."""
    shown, cut = chain, None
    if len(chain) > _CHAIN_SHOWN:
        half = _CHAIN_SHOWN // 2
        mark = _ChainSkipped(len(chain) - 2 * half)
        mark.__cause__ = chain[-half]
        chain[half - 1].__cause__ = mark
        shown, cut = chain[:half] + chain[-half:], {}
    for link in shown:
        if _longer(link.__traceback__, _TRACEBACK_FRAMES):
            cut = cut if cut is not None else {}
            entries = _entries(link.__traceback__)
            link.__traceback__ = _linked(_items(entries))
            cut[id(link)] = entries
    return cut


def _shallow(frame):
    for _ in range(_SHALLOW):
        if frame is None:
            return True
        frame = frame.f_back
    return frame is None


def _release(chain, cut):
    """Once a cut traceback is formatted: frees the chain's tracebacks, and so their frames,
    deepest first, one at a time, leaving on each exception shown the first `_TRACEBACK_FRAMES`
    entries of its traceback if it starts near the top of the stack (for `%debug`), and unlinks
    the exceptions cut from the chain. Freed at once, each entry would
    free the next inside its own freeing, each frame its caller, each exception its cause: past
    some 20000 levels that nesting overflows the wasm stack and the interpreter is lost.
    (Python's guard against it watches the stack in linear memory, which these calls barely
    use.) A frame keeps its callers, so a deeper one is never left."""
    half = _CHAIN_SHOWN // 2
    release = []
    for i, link in enumerate(chain):
        entries = cut.get(id(link))
        if entries is None:
            entries = _entries(link.__traceback__)
        link.__traceback__ = None
        if half <= i < len(chain) - half:  # cut from the chain
            link.__cause__ = link.__context__ = None
        elif entries and _shallow(entries[0].tb_frame):
            link.__traceback__ = _linked(entries[:_TRACEBACK_FRAMES])
        release.extend(entries)
    while release:
        release.pop()


def _cut_note(filename, count):
    """The note a marker frame of `_cut` stands for (`filename` is its code's), else None."""
    if filename == "<sandgate: repeated>":
        return f"[Previous line repeated {count} more time{'s' if count > 1 else ''}]"
    if filename == "<sandgate: skipped>":
        return f"[... {count} frames skipped ...]"
    return None


def _chain_skipped_note(exc):
    """The line standing for the exceptions `_cut` took out of a chain, for a `_ChainSkipped`."""
    return f"[... {exc.args[0]} more exceptions of the chain skipped ...]"


def _formatted(formatter, e):
    """`formatter(e)` (traceback lines) with `e`'s chain cut first and released after (see
    `_cut` and `_release`): every traceback shape goes through here, so none takes minutes over
    a deep recursion or loses the interpreter freeing it. A formatter shows `_cut`'s marker
    frames with `_cut_note` and a `_ChainSkipped` with `_chain_skipped_note`."""
    chain, seen = [], set()
    link = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        chain.append(link)
        link.__traceback__ = _user_frames(link.__traceback__)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    if isinstance(e, KeyboardInterrupt):
        # What the interrupted code was handling is not what the user asked to see.
        e.__suppress_context__ = True
    cut = _cut(chain)
    try:
        return formatter(e)
    finally:
        if cut is not None:
            _release(chain, cut)


def _python_note(m):
    return f"  {_cut_note(m.group(1), int(m.group(2)))}\n"


def _format_traceback(e):
    """Traceback lines for `e` and its chain as Python prints them, cells named like IPython
    (the shape until `%xmode` picks another); call it through `_formatted`."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    text = re.sub(r'  File "(<sandgate: (?:repeated|skipped)>)", line (\d+), in \w+\n',
                  _python_note, text)
    text = re.sub(r"^_sandgate\._ChainSkipped: (\d+)$",
                  r"[... \1 more exceptions of the chain skipped ...]", text, flags=re.M)
    text = re.sub(r'File "<cell-(\d+)>", line (\d+)', r"Cell In[\1], line \2", text)
    return text.rstrip("\n").split("\n")


def _error_content(e, count):
    if isinstance(e, KeyboardInterrupt):
        reason = _door({"op": "stop_reason"})
        if reason.get("reason") == "timeout":
            evalue = (f"the cell ran longer than its {reason.get('limit_s')} s time limit and "
                      "was stopped; variables defined so far are kept")
            return {"ename": "TimeoutError", "evalue": evalue,
                    "traceback": [f"TimeoutError: {evalue}"]}
    name = type(e).__name__
    try:
        evalue = str(e)
    except Exception:
        evalue = "<str() failed>"
    if isinstance(e, _UsageError):
        # A misused magic is the user's line, not a failure inside: no traceback, as in IPython.
        return {"ename": name, "evalue": evalue, "traceback": [f"{name}: {evalue}"]}
    # `%xmode` (debugging.py) puts its formatter in `_state`; should it fail on some odd
    # frame, the error still reaches the user in the default shape.
    formatter = _state.get("format_traceback")
    if formatter is not None:
        try:
            return {"ename": name, "evalue": evalue, "traceback": _formatted(formatter, e)}
        except Exception:
            pass
    return {"ename": name, "evalue": evalue, "traceback": _formatted(_format_traceback, e)}


def _user_expressions(expressions):
    out = {}
    for key, expr in (expressions or {}).items():
        try:
            value = eval(compile(str(expr), "<user_expression>", "eval"), _ns)
            data, md = format_bundle(value)
            out[str(key)] = {"status": "ok", "data": data, "metadata": md}
        except Exception as e:
            out[str(key)] = {"status": "error", "ename": type(e).__name__, "evalue": str(e),
                             "traceback": traceback.format_exception_only(type(e), e)}
    return out


def _execute(req):
    count = int(req.get("execution_count") or 0)
    silent = bool(req.get("silent"))
    store = bool(req.get("store_history", True)) and not silent
    source = str(req.get("code", ""))
    filename = _cell_name(count)
    _state["payload"] = []
    if store:
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        _inputs.append(source)
        _ns["_i"] = source
    if store:
        _state["count"] = count
    status = {"status": "ok"}
    shell = _shell["instance"]
    if shell is not None:
        info = ExecutionInfo(source, store, silent, cell_id=(req.get("cell_id") or None))
    value = error = None
    try:
        if shell is not None:
            # Inside the `try`: an interrupt or a time limit while they run is the cell's error.
            shell.events.trigger("pre_execute")
            if not silent:
                shell.events.trigger("pre_run_cell", info)
        if _autoreload["mode"] and not silent:
            _autoreload_check()
        try:
            value = _run_compiled(_compile_cell(source, filename))
        finally:
            _flush()
        if not silent:
            _flush_figures()
        if value is not None and not silent and not source.rstrip().endswith(";"):
            data, md = format_bundle(value)
            result = {"data": data, "metadata": md, "execution_count": count}
            if req.get("user_expressions"):
                # Output of user expressions comes after the result, as in ipykernel.
                _publish("execute_result", result)
            else:
                # Goes out with the reply (see `serve`).
                _state["result"] = result
            if store:
                _ns["___"], _ns["__"], _ns["_"] = _ns.get("__"), _ns.get("_"), value
                _ns[f"_{count}"] = value
                _outputs[count] = value
    except BaseException as e:
        error = e
        if _state["result"] is not None:
            # The result was made before the failure: it goes out before the error.
            _publish("execute_result", _state["result"])
            _state["result"] = None
        try:
            _flush_figures()
        except BaseException:
            pass
        content = _error_content(e, count)
        if not silent:
            _publish("error", content)
            if not isinstance(e, _UsageError):
                # For `%debug`, as in IPython; and `%pdb on` (magics.py) debugs it now.
                sys.last_exc, sys.last_type, sys.last_value = e, type(e), e
                sys.last_traceback = e.__traceback__
                if _state.get("after_error") is not None:
                    _state["after_error"](e)
        status = dict(content, status="error")
    if shell is not None:
        try:
            shell.events.trigger("post_execute")
            if not silent:
                result = ExecutionResult(info)
                result.execution_count, result.result, result.error_in_exec = count, value, error
                shell.events.trigger("post_run_cell", result)
        except BaseException as e:
            # An interrupt or a time limit while the callbacks ran (each callback's own errors
            # are reported by `trigger`).
            content = _error_content(e, count)
            if not silent:
                _publish("error", content)
            if status["status"] == "ok":
                status = dict(content, status="error")
    status["user_expressions"] = _user_expressions(req.get("user_expressions"))
    status["payload"] = _state["payload"]
    return status


# ---------------------------------------------------------------------------------------------
# Completion, inspection, is_complete


_TOKEN = re.compile(r"[A-Za-z_][\w.]*$|\.$")


def _lookup(dotted):
    """The object a dotted name names, by attribute access only (nothing is called)."""
    parts = dotted.split(".")
    if parts[0] in _ns:
        obj = _ns[parts[0]]
    elif hasattr(builtins, parts[0]):
        obj = getattr(builtins, parts[0])
    else:
        raise NameError(parts[0])
    for part in parts[1:]:
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def _complete(req):
    code = str(req.get("code", ""))
    cursor = int(req.get("cursor_pos", len(code)))
    cursor = max(0, min(cursor, len(code)))
    m = re.search(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*\.?$", code[:cursor])
    text = m.group(0) if m else ""
    start = cursor - len(text)
    matches = []
    if "." in text:
        base, _, prefix = text.rpartition(".")
        try:
            obj = _lookup(base)
            names = dir(obj)
        except Exception:
            names = []
        matches = [f"{base}.{n}" for n in names if n.startswith(prefix)
                   and (prefix.startswith("_") or not n.startswith("_"))]
    else:
        names = set(_ns) | set(dir(builtins)) | set(keyword.kwlist)
        matches = [n for n in names if n.startswith(text) and (text.startswith("_") or not n.startswith("_"))]
    matches = sorted(set(matches), key=lambda s: (s.lower(), s))[:1000]
    return {"status": "ok", "matches": matches, "cursor_start": start, "cursor_end": cursor,
            "metadata": {}}


def _describe(obj, detail):
    parts = []
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = None
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    if sig is not None:
        parts.append(f"Signature: {name}{sig}")
    if not callable(obj) or isinstance(obj, type) is False and not inspect.isroutine(obj):
        parts.append(f"Type:      {type(obj).__name__}")
        text = _plain(obj)
        parts.append(f"String form: {text[:1000]}")
    doc = inspect.getdoc(obj)
    if doc:
        parts.append(f"Docstring:\n{doc}")
    if detail >= 1:
        try:
            parts.append(f"Source:\n{inspect.getsource(obj)}")
        except (OSError, TypeError):
            pass
    if isinstance(obj, type):
        parts.append(f"Type:      type")
    return "\n".join(parts)


def _inspect(req):
    code = str(req.get("code", ""))
    cursor = int(req.get("cursor_pos", len(code)))
    cursor = max(0, min(cursor, len(code)))
    left = re.search(r"[A-Za-z_][\w.]*$", code[:cursor])
    right = re.match(r"[\w]*", code[cursor:])
    name = (left.group(0) if left else "") + (right.group(0) if right else "")
    name = name.rstrip(".")
    if not name:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    try:
        obj = _lookup(name)
    except Exception:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    text = _describe(obj, int(req.get("detail_level", 0)))
    return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}


def page(name, level):
    """`obj?` and `obj??`: show help in the pager (a `page` payload)."""
    try:
        obj = _lookup(name)
    except Exception:
        print(f"Object `{name}` not found.")
        return None
    _state["payload"].append({"source": "page", "data": {"text/plain": _describe(obj, level - 1)},
                              "start": 0})
    return None


def _is_complete(req):
    code = str(req.get("code", ""))
    try:
        transformed = _transform(code)
        compiled = codeop.compile_command(transformed, "<input>", "exec")
    except (SyntaxError, OverflowError, ValueError):
        return {"status": "invalid"}
    if compiled is None:
        lines = code.rstrip("\n").split("\n")
        last = lines[-1] if lines else ""
        indent = last[: len(last) - len(last.lstrip())]
        if last.rstrip().endswith(":"):
            indent += "    "
        return {"status": "incomplete", "indent": indent}
    # As IPython: a block whose last line is still indented, with no blank line after it, is
    # still being typed.
    lines = code.split("\n")
    last = lines[-1]
    if len(lines) > 1 and last.strip() and last[0] in " \t":
        return {"status": "incomplete", "indent": last[: len(last) - len(last.lstrip())]}
    return {"status": "complete"}


# ---------------------------------------------------------------------------------------------
# What the gateway's %%ask tells the model about this kernel


_SECRETISH = re.compile(r"(?i)(key|token|secret|passw|credential|auth|cookie)")
_NOTABLE_PACKAGES = ("numpy", "pandas", "scipy", "sklearn", "statsmodels", "matplotlib", "seaborn",
                     "sympy", "networkx", "lxml", "PIL", "bs4", "yaml", "openpyxl", "pyarrow")


class _Json:
    """A value shown as `application/json` (how `describe` travels in a user expression)."""

    def __init__(self, value):
        self.value = value

    def _repr_json_(self):
        return self.value

    def __repr__(self):
        return json.dumps(self.value)


def _type_name(value):
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _summary(name, value):
    entry = {"name": name, "type": _type_name(value)}
    if _SECRETISH.search(name):
        entry["note"] = "value withheld (the name looks like a secret)"
        return entry
    try:
        if isinstance(value, types.ModuleType):
            entry["type"] = "module"
            entry["module"] = value.__name__
        elif isinstance(value, (bool, int, float, complex)):
            entry["value"] = repr(value)[:40]
        elif isinstance(value, (str, bytes)):
            entry["len"] = len(value)
        elif isinstance(value, (list, tuple, set, frozenset, dict)):
            entry["len"] = len(value)
        elif inspect.isclass(value):
            entry["type"] = "class"
        elif callable(value):
            try:
                entry["signature"] = f"{name}{inspect.signature(value)}"[:200]
            except (TypeError, ValueError):
                pass
        shape = getattr(value, "shape", None)
        if isinstance(shape, tuple):
            entry["shape"] = list(shape)
        dtype = getattr(value, "dtype", None)
        if dtype is not None and not callable(dtype):
            entry["dtype"] = str(dtype)
        dtypes = getattr(value, "dtypes", None)
        columns = getattr(value, "columns", None)
        if dtypes is not None and columns is not None:
            entry["columns"] = {str(c): str(t) for c, t in list(dtypes.items())[:40]}
    except Exception:
        pass
    return entry


def describe(limit=60):
    """Names, types and shapes of the user's variables (never their values, beyond short
    numbers), DataFrame columns and dtypes, and the notable packages installed."""
    import importlib.util
    hidden = {"In", "Out", "exit", "quit", "get_ipython", "display"}
    names = [n for n in _ns if not n.startswith("_") and n not in hidden]
    variables = [_summary(n, _ns[n]) for n in names[:limit]]
    packages = []
    for p in _NOTABLE_PACKAGES:
        try:
            if importlib.util.find_spec(p) is not None:
                packages.append(p)
        except Exception:
            pass
    return _Json({"variables": variables, "more": max(0, len(names) - limit), "packages": packages})


# ---------------------------------------------------------------------------------------------
# The turn entry point


def _info(req):
    import platform
    return {"status": "ok", "python_version": platform.python_version()}


def _comm(req):
    """A frontend's `comm_open`, `comm_msg` or `comm_close` (see comms.py)."""
    _load("comms")
    return _comm_dispatch(req)


def _comm_info(req):
    """The open comms (of one target if the request names one), as ipykernel lists them."""
    if "comms" not in _loaded:
        return {"status": "ok", "comms": {}}
    return {"status": "ok", "comms": _comm_targets(req.get("target_name"))}


_HANDLERS = {"info": _info, "execute": _execute, "complete": _complete, "inspect": _inspect,
             "is_complete": _is_complete, "comm": _comm, "comm_info": _comm_info}


def serve(request_json=None):
    """One turn: handle the kernel's request (its JSON text, or fetched through the door), send
    the reply. Never raises.

    A cell's `execute_result` rides with the reply (the kernel publishes it first) unless
    something else must come between them."""
    reply = None
    _state["result"] = None
    _state["parent"] = None
    try:
        if request_json is None:
            req = _door({"op": "request"})
        else:
            req = json.loads(request_json)
        _state["request"] = req if isinstance(req, dict) else {}
        handler = _HANDLERS.get(_state["request"].get("kind"))
        if handler is None:
            reply = {"status": "error", "ename": "KernelError",
                     "evalue": f"unknown request {_state['request'].get('kind')!r}", "traceback": []}
        else:
            reply = handler(_state["request"])
    except BaseException as e:
        reply = {"status": "error", "ename": type(e).__name__, "evalue": str(e),
                 "traceback": traceback.format_exception(type(e), e, e.__traceback__)}
    finally:
        _state["request"] = None
        _state["parent"] = None
        message = {"op": "reply", "content": reply or {"status": "error", "ename": "KernelError",
                                                        "evalue": "no reply", "traceback": []}}
        if _state["result"] is not None:
            message["publish"] = [{"msg_type": "execute_result", "content": _state["result"]}]
            _state["result"] = None
        try:
            _door(message)
        except BaseException:
            pass


# What `%reset` goes back to: the namespace as the driver leaves it.
_BASE_NAMESPACE = dict(_ns)

_module = types.ModuleType("_sandgate", __doc__)
_module.serve = serve
_module.magic = magic
_module.page = page
_module.display = display
_module.describe = describe
sys.modules["_sandgate"] = _module


# The kernel's request turns. The image's `turn` export hands every turn's text to
# `_reactor._run_turn`, which parses it, compiles it twice and registers it with linecache: about
# 70 µs for a one-call turn, on every request. A request turn is `_SERVE_TURN` (which the kernel
# passes in when it boots the driver: a call to `serve` and the start of a comment) followed by
# the request's JSON, so it is served directly, with the request taken from the text instead of
# fetched through the door; every other turn (the interrupt probe's) takes the image's own path.
def _install_turn_shortcut():
    reactor = sys.modules.get("_reactor")
    run_turn = getattr(reactor, "_run_turn", None)
    if run_turn is None:
        return
    start = len(_SERVE_TURN)

    def _run_turn(text, name):
        if text.startswith(_SERVE_TURN):
            serve(text[start:])
            return None
        return run_turn(text, name)

    reactor._run_turn = _run_turn


_install_turn_shortcut()
