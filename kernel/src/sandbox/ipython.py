"""The shell `get_ipython()` returns: what libraries and exported notebooks use of IPython's
`InteractiveShell`, over the driver's own machinery.

Loaded into the driver's namespace (it runs with the driver's globals) the first time anything
calls `get_ipython()`: matplotlib's pyplot does on import, tqdm.auto and pandas do to learn they
run in a notebook, scripts exported from notebooks do for every magic. The class is named as
ipykernel's (`ZMQInteractiveShell`): pandas and others recognise a notebook frontend by that name.

Real IPython (pure Python) was weighed instead: see the README's "The kernel's IPython" notes.
"""


class _Events:
    """`shell.events`: callbacks for `pre_execute`, `pre_run_cell`, `post_execute` and
    `post_run_cell`, fired around every cell as IPython fires them."""

    available_events = ("pre_execute", "pre_run_cell", "post_execute", "post_run_cell",
                        "shell_initialized")

    def __init__(self):
        self.callbacks = {name: [] for name in self.available_events}

    def register(self, event, function):
        if event not in self.callbacks:
            raise KeyError(f"Unknown event {event}")
        if not callable(function):
            raise TypeError(f"Need a callable, got {function!r}")
        if function not in self.callbacks[event]:
            self.callbacks[event].append(function)

    def unregister(self, event, function):
        try:
            self.callbacks[event].remove(function)
        except (KeyError, ValueError):
            raise ValueError(f"Function {function!r} is not registered as a {event} callback") from None

    def trigger(self, event, *args, **kwargs):
        for function in list(self.callbacks[event]):
            try:
                function(*args, **kwargs)
            except Exception as e:
                # As IPython: a failing callback is reported and the others still run. Its
                # traceback is cut as a cell's is (a deep recursion must not take minutes).
                print(f"Error in callback {function!r} (for {event}):", file=sys.stderr)
                print("\n".join(_formatted(_format_traceback, e)), file=sys.stderr)


class _Formatter:
    """One MIME type's formatter (`display_formatter.formatters['text/html']`): functions
    registered for types take precedence over the objects' own `_repr_*_` methods."""

    def __init__(self, format_type):
        self.format_type = format_type
        self.enabled = True
        self.type_printers = {}
        self.deferred_printers = {}

    def for_type(self, typ, func=None):
        if isinstance(typ, str):
            module, _, name = typ.rpartition(".")
            return self.for_type_by_name(module, name, func)
        old = self.type_printers.get(typ)
        if func is not None:
            self.type_printers[typ] = func
        return old

    def for_type_by_name(self, type_module, type_name, func=None):
        key = (type_module, type_name)
        old = self.deferred_printers.get(key)
        if func is not None:
            self.deferred_printers[key] = func
        return old

    def pop(self, typ, default=None):
        if isinstance(typ, str):
            module, _, name = typ.rpartition(".")
            return self.deferred_printers.pop((module, name), default)
        return self.type_printers.pop(typ, default)

    def lookup(self, obj):
        """The function registered for `obj`'s type or a base of it, or None."""
        for cls in type(obj).__mro__:
            func = self.type_printers.get(cls)
            if func is None:
                func = self.deferred_printers.pop((cls.__module__, cls.__name__), None)
                if func is not None:
                    self.type_printers[cls] = func
            if func is not None:
                return func
        return None

    def __call__(self, obj):
        if not self.enabled:
            return None
        func = self.lookup(obj)
        if func is None:
            return None
        if self.format_type != "text/plain":
            return func(obj)
        # text/plain printers write to IPython's pretty printer: `func(obj, p, cycle)`.
        printer = _PrettyText()
        func(obj, printer, False)
        return "".join(printer.parts)


class _PrettyText:
    """The `p` a text/plain printer writes to: IPython's pretty printer, as far as printers use
    it (text, nested objects, breaks and groups; no line-width layout)."""

    def __init__(self):
        self.parts = []

    def text(self, obj):
        self.parts.append(str(obj))

    def pretty(self, obj):
        self.parts.append(_plain(obj))

    def breakable(self, sep=" "):
        self.parts.append(sep)

    def break_(self):
        self.parts.append("\n")

    def begin_group(self, indent=0, open=""):
        self.parts.append(open)

    def end_group(self, dedent=0, close=""):
        self.parts.append(close)

    def group(self, indent=0, open="", close=""):
        printer = self

        class _Group:
            def __enter__(self):
                printer.begin_group(indent, open)

            def __exit__(self, *exc):
                printer.end_group(indent, close)

        return _Group()


class _DisplayFormatter:
    """`shell.display_formatter`: `.formatters` by MIME type, and `format(obj)` as
    (data, metadata)."""

    def __init__(self):
        mimes = ["text/plain"] + [mime for mime, _ in _REPR_METHODS]
        self.formatters = {mime: _Formatter(mime) for mime in mimes}
        self.active_types = list(self.formatters)

    def format(self, obj, include=None, exclude=None):
        return format_bundle(obj, include, exclude)


def _registered_reprs(obj):
    """What functions registered through `display_formatter.formatters` make of `obj`:
    {mime: value}, empty when none is registered (the usual case)."""
    shell = _shell["instance"]
    if shell is None:
        return {}
    out = {}
    for mime, formatter in shell.display_formatter.formatters.items():
        if not (formatter.type_printers or formatter.deferred_printers):
            continue
        try:
            value = formatter(obj)
        except Exception as e:
            print(f"{mime} formatter for {type(obj).__name__} failed: {e!r}", file=sys.stderr)
            continue
        if value is not None:
            out[mime] = value
    return out


def _parent():
    """The message of the request being served (an `execute_request`, or a frontend's comm
    message), as ipykernel's `get_parent()` gives it: `header`, `parent_header`, `metadata`,
    `content`, `buffers`, `msg_id` and `msg_type`. Empty outside a request."""
    parent = _state["parent"]
    if parent is not None:
        return parent
    if _state["request"] is None:
        return {}
    # A cell's request is asked of the kernel the first time (a comm message's comes with it).
    parent = _door({"op": "parent"})
    header = parent.get("header")
    if not isinstance(header, dict):
        return {}
    parent.update(msg_id=header.get("msg_id"), msg_type=header.get("msg_type"), buffers=[])
    _state["parent"] = parent
    return parent


class _Kernel:
    """`shell.kernel`: what code asks of ipykernel's kernel object."""

    implementation = "sandgate"
    language = "python"

    def __init__(self, shell):
        self.shell = shell

    @property
    def execution_count(self):
        return _state["count"]

    def get_parent(self, channel=None):
        """The request being served (ipywidgets' Output captures what is its child)."""
        return _parent()

    @property
    def comm_manager(self):
        """The kernel's comm manager (comms.py)."""
        _load("comms")
        return get_comm_manager()


class ExecutionResult:
    """What `shell.run_cell` returns, as IPython's."""

    def __init__(self, info):
        self.info = info
        self.execution_count = None
        self.error_before_exec = None
        self.error_in_exec = None
        self.result = None

    @property
    def success(self):
        return self.error_before_exec is None and self.error_in_exec is None

    def raise_error(self):
        if self.error_before_exec is not None:
            raise self.error_before_exec
        if self.error_in_exec is not None:
            raise self.error_in_exec

    def __repr__(self):
        return (f"<ExecutionResult object at {id(self):x}, execution_count={self.execution_count} "
                f"error_before_exec={self.error_before_exec} error_in_exec={self.error_in_exec} "
                f"info={self.info!r} result={self.result!r}>")


class ExecutionInfo:
    """The `info` passed to `pre_run_cell` callbacks."""

    def __init__(self, raw_cell, store_history, silent, shell_futures=True, cell_id=None):
        self.raw_cell = raw_cell
        self.store_history = store_history
        self.silent = silent
        self.shell_futures = shell_futures
        self.cell_id = cell_id

    def __repr__(self):
        return (f"<ExecutionInfo object at {id(self):x}, raw_cell={self.raw_cell[:50]!r} "
                f"store_history={self.store_history} silent={self.silent} cell_id={self.cell_id}>")


class _Config(dict):
    """`shell.config`: tqdm.auto and others look for `IPKernelApp` in it to learn they run in a
    Jupyter kernel. Sections are made on first access, as traitlets' Config does."""

    def __missing__(self, key):
        if not key[:1].isupper():
            raise KeyError(key)
        value = self[key] = _Config()
        return value

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class ZMQInteractiveShell:
    """Sandgate's stand-in for IPython's shell in a Jupyter kernel."""

    def __init__(self):
        self.events = _Events()
        self.display_formatter = _DisplayFormatter()
        self.kernel = _Kernel(self)
        self.config = _Config(IPKernelApp=_Config())
        self.user_ns = _ns
        self.user_global_ns = _ns
        self.user_ns_hidden = {}

    # -- magics --------------------------------------------------------------------------------

    def run_line_magic(self, magic_name, line, _stack_depth=1):
        return magic(magic_name.lstrip("%"), line)

    def run_cell_magic(self, magic_name, line, cell):
        return magic(magic_name.lstrip("%"), line, cell)

    def magic(self, arg_s):
        """The old spelling: `get_ipython().magic("matplotlib inline")`."""
        name, _, line = arg_s.lstrip("%").partition(" ")
        return self.run_line_magic(name, line)

    def find_line_magic(self, magic_name):
        _load("magics")
        return _LINE_MAGICS.get(magic_name)

    def find_cell_magic(self, magic_name):
        _load("magics")
        return _CELL_MAGICS.get(magic_name)

    def system(self, cmd):
        return magic("!", cmd)

    def getoutput(self, cmd, split=True, depth=0):
        """The output's lines (an SList), as `x = !cmd`; with `split=False`, one string."""
        lines = magic("!", "!" + cmd)
        return lines if split else lines.n

    # -- code and names ------------------------------------------------------------------------

    def run_cell(self, raw_cell, store_history=False, silent=False, shell_futures=True,
                 cell_id=None):
        """Runs `raw_cell` in the user's namespace from inside a cell, IPython's syntax included;
        errors are shown and kept in the result, as IPython does."""
        info = ExecutionInfo(raw_cell, store_history, silent, shell_futures, cell_id)
        result = ExecutionResult(info)
        result.execution_count = _state["count"]
        try:
            compiled = _compile_cell(raw_cell, "<run_cell>")
        except SyntaxError as e:
            result.error_before_exec = e
            self.showtraceback((type(e), e, e.__traceback__))
            return result
        try:
            result.result = _run_compiled(compiled)
        except Exception as e:
            result.error_in_exec = e
            self.showtraceback((type(e), e, e.__traceback__))
            return result
        if result.result is not None and not silent:
            display(result.result)
        return result

    def ev(self, expr):
        return eval(expr, _ns)

    def ex(self, cmd):
        exec(cmd, _ns)

    def push(self, variables, interactive=True):
        if isinstance(variables, str):
            frame = sys._getframe(1)
            variables = {name: eval(name, frame.f_globals, frame.f_locals)
                         for name in variables.replace(",", " ").split()}
        _ns.update(variables)

    def drop_by_id(self, variables):
        for name, obj in variables.items():
            if name in _ns and _ns[name] is obj:
                del _ns[name]

    def showtraceback(self, exc_tuple=None, **kwargs):
        e = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
        if e is not None:
            _publish("error", _error_content(e, _state["count"]))

    def get_parent(self):
        """The request being served, as ipykernel's shell gives it."""
        return _parent()

    def set_parent(self, parent):
        """ipykernel's shell makes `parent` the parent of what follows. Here what a request
        prints, displays and sends always has that request as its parent: only it can be set."""
        current = _parent()
        wanted = (parent or {}).get("header", {}).get("msg_id")
        if wanted != current.get("header", {}).get("msg_id"):
            raise NotImplementedError(
                "set_parent: in the sandbox the output of a request always has that request as "
                "its parent; another message cannot be made the parent")

    @classmethod
    def instance(cls, *args, **kwargs):
        """The one shell (`IPython.core.interactiveshell.InteractiveShell.instance()`)."""
        return get_ipython()

    @classmethod
    def initialized(cls):
        return True

    def set_next_input(self, text, replace=False):
        _state["payload"].append({"source": "set_next_input", "text": str(text),
                                  "replace": bool(replace)})

    def enable_gui(self, gui=None):
        if gui not in (None, "inline"):
            raise _UsageError(f"GUI event loop {gui!r} is not available in the sandbox: "
                              "figures are shown inline.")

    def enable_matplotlib(self, gui=None):
        return magic("matplotlib", gui or "inline")

    def ask_exit(self):
        raise _UsageError("a sandbox kernel is shut down from the frontend (Kernel > Shut Down).")

    @property
    def execution_count(self):
        return _state["count"] + 1

    def has_trait(self, name):
        return hasattr(self, name)

    def __repr__(self):
        return f"<_sandgate.ZMQInteractiveShell object at {id(self):#x}>"


ZMQInteractiveShell.__module__ = "_sandgate"
_shell["instance"] = ZMQInteractiveShell()
