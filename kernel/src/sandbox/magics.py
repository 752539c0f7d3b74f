"""Sandgate's magics: the IPython magics notebooks use most, each doing what IPython's does; the
rest say clearly that they are not here.

Loaded into the driver's namespace (it runs with the driver's globals, so it uses the driver's
helpers as its own) the first time a cell uses a magic: most kernels never do, and compiling
this at every kernel start would add about 6 ms to it.
"""

def _options(args, flags, usage):
    """Splits `args` shell-style into (set of the given flags found first, the rest)."""
    import shlex
    try:
        words = shlex.split(args)
    except ValueError as e:
        raise _UsageError(f"{usage}: {e}") from None
    found = set()
    while words and words[0].startswith("-"):
        if words[0] not in flags:
            raise _UsageError(f"{usage}: unknown option {words[0]!r}")
        found.add(words.pop(0))
    return found, words


def _set_figure_formats(value):
    formats = (value,) if isinstance(value, str) else tuple(value)
    bad = [f for f in formats if not isinstance(f, str) or f.lower() not in _FIGURE_FORMATS]
    if bad or not formats:
        raise _UsageError(f"figure format {bad[0] if bad else value!r} is not one of "
                          f"{', '.join(sorted(_FIGURE_FORMATS))}")
    _inline["formats"] = tuple(dict.fromkeys(f.lower() for f in formats))


def _set_print_figure_kwargs(value):
    if not isinstance(value, dict):
        raise _UsageError("InlineBackend.print_figure_kwargs must be a dict (savefig's options)")
    _inline["print_figure_kwargs"] = dict(value)


def _no_setting(value):
    """Completer settings choose between IPython's completers; Sandgate has one, so there is
    nothing to change and the line is accepted, as notebooks written for IPython expect."""


_CONFIG = {
    "InlineBackend": {"figure_format": _set_figure_formats, "figure_formats": _set_figure_formats,
                      "print_figure_kwargs": _set_print_figure_kwargs},
    "Completer": {"use_jedi": _no_setting, "greedy": _no_setting},
    "IPCompleter": {"use_jedi": _no_setting, "greedy": _no_setting},
}


def _config(args):
    args = args.strip()
    if not args:
        print("Available objects for config:\n    " + "\n    ".join(_CONFIG))
        return None
    if args == "InlineBackend":
        print(f"InlineBackend.figure_formats = {set(_inline['formats'])!r}\n"
              f"InlineBackend.print_figure_kwargs = {_inline['print_figure_kwargs']!r}")
        return None
    m = re.fullmatch(r"(\w+)\.(\w+)\s*=\s*(.+)", args, re.S)
    if not m:
        raise _UsageError("%config takes `Class.setting = value`, e.g. "
                          "%config InlineBackend.figure_format = 'retina'")
    cls, key, expr = m.groups()
    setter = _CONFIG.get(cls, {}).get(key)
    if setter is None:
        known = ", ".join(f"{c}.{k}" for c, keys in _CONFIG.items() for k in keys)
        raise _UsageError(f"{cls}.{key} cannot be configured in the sandbox (these can: {known})")
    setter(eval(expr, _ns))
    return None


# `%autoreload`: modules the user wrote (under /workspace or /tmp, the guest's only writable
# places; the image's own modules cannot change) are reloaded before a cell when their file
# changed, and the functions and classes the user already holds are updated in place, so
# `from helpers import f` sees the new `f` as IPython's autoreload makes it.
_WRITABLE = ("/workspace/", "/tmp/")


def _user_modules():
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        if not path.startswith("/"):
            path = os.path.abspath(path)
        if not path.startswith(_WRITABLE):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        yield name, module, (st.st_mtime_ns, st.st_size)


def _update_in_place(old, new, seen):
    """Makes `old` (a function or class from before a reload) behave as `new`."""
    if id(old) in seen:
        return
    seen.add(id(old))
    if isinstance(old, types.FunctionType) and isinstance(new, types.FunctionType):
        for attr in ("__code__", "__defaults__", "__kwdefaults__", "__doc__", "__annotations__"):
            try:
                setattr(old, attr, getattr(new, attr))
            except (AttributeError, TypeError, ValueError):
                pass
        old.__dict__.update(new.__dict__)
    elif isinstance(old, type) and isinstance(new, type):
        for key, value in list(new.__dict__.items()):
            if key in ("__dict__", "__weakref__", "__doc__"):
                continue
            previous = old.__dict__.get(key)
            if previous is not None:
                _update_in_place(getattr(previous, "__func__", previous),
                                 getattr(value, "__func__", value), seen)
            try:
                setattr(old, key, value)
            except (AttributeError, TypeError):
                pass


def _autoreload_check(only_changed=True):
    """Before a cell: reload the user's modules whose file changed since the last look."""
    import importlib
    stamps = _autoreload["stamps"]
    for name, module, stamp in _user_modules():
        previous = stamps.get(name)
        stamps[name] = stamp
        if only_changed and (previous is None or previous == stamp):
            continue
        if _autoreload["mode"] == 1 and name not in _autoreload["only"]:
            continue
        old = dict(module.__dict__)
        try:
            importlib.reload(module)
        except Exception as e:
            print(f"[autoreload of {name} failed: {type(e).__name__}: {e}]", file=sys.stderr)
            continue
        seen = set()
        for key, value in old.items():
            new = module.__dict__.get(key)
            if new is not None and new is not value and getattr(value, "__module__", None) == name:
                _update_in_place(value, new, seen)


def _load_ext(name):
    if name != "autoreload":
        raise _UsageError(f"extension {name!r} is not available: the sandbox has no IPython "
                          "extensions but autoreload")
    _autoreload["loaded"] = True
    return None


def _autoreload_magic(args):
    if not _autoreload["loaded"]:
        raise _UsageError("Line magic function `%autoreload` not found (load it with "
                          "%load_ext autoreload).")
    mode = args.strip().split()[0] if args.strip() else "now"
    modes = {"0": 0, "off": 0, "1": 1, "explicit": 1, "2": 2, "all": 2, "3": 2, "complete": 2}
    if mode == "now":
        _autoreload_check(only_changed=False)
    elif mode in modes:
        _autoreload["mode"] = modes[mode]
        _autoreload_check()  # takes stamps of what is loaded now
    else:
        raise _UsageError(f"%autoreload takes one of now, {', '.join(modes)}, not {mode!r}")
    return None


def _aimport(args):
    if not _autoreload["loaded"]:
        raise _UsageError("Line magic function `%aimport` not found (load it with "
                          "%load_ext autoreload).")
    import importlib
    names = [n.strip() for n in args.split(",") if n.strip()]
    if not names:
        print(f"Modules to reload:\n{' '.join(sorted(_autoreload['only']))}")
    for name in names:
        if name.startswith("-"):
            _autoreload["only"].discard(name[1:])
            continue
        module = importlib.import_module(name)
        _autoreload["only"].add(name)
        _ns[name.split(".")[0]] = sys.modules[name.split(".")[0]] if "." in name else module
    _autoreload_check()
    return None


def _env(args):
    args = args.strip()
    if not args:
        return dict(os.environ)
    m = re.fullmatch(r"([^=\s]+)(?:\s*=\s*|\s+)(.*)", args, re.S)
    if m is None:
        if args not in os.environ:
            raise _UsageError(f"Environment does not have key: {args}")
        return os.environ[args]
    key, value = m.groups()
    os.environ[key] = value
    print(f"env: {key}={value}")
    return None


def _run_file(args):
    usage = "%run [-i] FILE [ARGS ...]"
    found, words = _options(args, {"-i"}, usage)
    if not words:
        raise _UsageError(f"{usage}: which file?")
    path, argv = words[0], words[1:]
    if not os.path.exists(path) and os.path.exists(path + ".py"):
        path += ".py"
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except FileNotFoundError:
        raise _UsageError(f"File `{path}` not found.") from None
    full = os.path.abspath(path)
    code = compile(source, full, "exec", dont_inherit=True)
    linecache.cache[full] = (len(source), None, source.splitlines(True), full)
    namespace = _ns if "-i" in found else {"__name__": "__main__", "__builtins__": builtins}
    saved = (sys.argv, namespace.get("__file__"))
    sys.argv = [path] + argv
    namespace["__file__"] = full
    try:
        exec(code, namespace)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    finally:
        sys.argv = saved[0]
        if namespace is _ns and saved[1] is None:
            del _ns["__file__"]
        elif namespace is _ns:
            _ns["__file__"] = saved[1]
    if namespace is not _ns:
        _ns.update((k, v) for k, v in namespace.items() if not k.startswith("__"))
    return None


def _reset(args):
    found, _ = _options(args, {"-f"}, "%reset [-f]")
    if "-f" not in found:
        try:
            answer = input("Once deleted, variables cannot be recovered. Proceed (y/[n])? ")
        except StdinNotImplementedError:
            raise _UsageError("%reset asks before it deletes, and this frontend cannot answer; "
                              "%reset -f deletes without asking") from None
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing done.")
            return None
    for name in list(_ns):
        if name not in _BASE_NAMESPACE and not name.startswith("__sandgate"):
            del _ns[name]
    _ns.update(_BASE_NAMESPACE)
    _HIDDEN.clear()
    del _inputs[1:]
    _outputs.clear()
    return None


def _pylab(args):
    print("%pylab is deprecated, use %matplotlib inline and import the required libraries.\n"
          "Populating the interactive namespace from numpy and matplotlib")
    before = set(_ns)
    exec("import numpy\nimport matplotlib\nfrom matplotlib import pylab, mlab, pyplot\n"
         "np = numpy\nplt = pyplot\nfrom pylab import *\nfrom numpy import *\n", _ns)
    # As in IPython, %who leaves out what %pylab put there.
    _HIDDEN.update(set(_ns) - before)
    return None


def _matplotlib(args):
    if args.strip() not in ("", "inline"):
        print("Only the inline backend is available in the sandbox; using inline.",
              file=sys.stderr)
    return None


def _time(source):
    start = time.perf_counter()
    try:
        return _run_source(source, "<timed>")
    finally:
        print(f"Wall time: {(time.perf_counter() - start) * 1000:.3g} ms")


def _seconds(t):
    """`t` seconds in the unit IPython's %timeit uses, three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


class TimeitResult:
    """What `%timeit -o` returns, as IPython's: `best`, `worst`, `average`, `stdev`, `loops`,
    `repeat`, `all_runs` (seconds per run of `loops` loops) and `timings` (per loop)."""

    def __init__(self, loops, repeat, all_runs):
        self.loops, self.repeat, self.all_runs = loops, repeat, all_runs
        self.timings = [t / loops for t in all_runs]
        self.best, self.worst = min(self.timings), max(self.timings)
        self.average = sum(self.timings) / len(self.timings)
        self.stdev = (sum((t - self.average) ** 2 for t in self.timings) / len(self.timings)) ** 0.5

    def __str__(self):
        runs = f"{self.repeat} run{'s' if self.repeat != 1 else ''}"
        loops = f"{self.loops:,} loop{'s' if self.loops != 1 else ''}"
        return (f"{_seconds(self.average)} ± {_seconds(self.stdev)} per loop "
                f"(mean ± std. dev. of {runs}, {loops} each)")

    def __repr__(self):
        return f"<TimeitResult : {self}>"


_TIMEIT_OPTION = re.compile(r"\s*-(?:([nr])\s*(\d+)|([oq]))(?=\s|$)")


def _timeit(line, body=None):
    """`%timeit [-n N] [-r R] [-o] [-q] STATEMENT`; as a cell magic the line after the options
    is setup code and the cell is the statement."""
    import timeit
    options = {"n": None, "r": 7, "o": False, "q": False}
    while True:
        m = _TIMEIT_OPTION.match(line)
        if m is None:
            break
        if m.group(1):
            options[m.group(1)] = int(m.group(2))
        else:
            options[m.group(3)] = True
        line = line[m.end():]
    if re.match(r"\s*-[nr](\s|$)", line):
        raise _UsageError("%timeit: -n and -r take a number (`%timeit -n 100 -r 5 STATEMENT`)")
    setup, stmt = (line.strip() or "pass", body) if body is not None else ("pass", line.strip())
    if not stmt or not stmt.strip():
        raise _UsageError("%timeit needs a statement to time")
    if options["r"] < 1 or (options["n"] is not None and options["n"] < 1):
        raise _UsageError("%timeit: -n and -r take numbers of at least 1")
    timer = timeit.Timer(stmt, setup, globals=_ns)
    number = options["n"] or timer.autorange()[0]
    result = TimeitResult(number, options["r"], timer.repeat(repeat=options["r"], number=number))
    if not options["q"]:
        print(result)
    return result if options["o"] else None


_HIDDEN = set()


def _who(args):
    names = sorted(k for k, v in _ns.items() if not k.startswith("_")
                   and not isinstance(v, types.ModuleType)
                   and k not in _BASE_NAMESPACE and k not in _HIDDEN)
    print("  ".join(names) if names else "Interactive namespace is empty.")
    return None


def _cd(args):
    os.chdir(os.path.expanduser(args.strip() or "/workspace"))
    print(os.getcwd())
    return None


# ---------------------------------------------------------------------------------------------
# %xmode, %prun, %debug and %pdb live in debugging.py, handed over when one is first used.


def _from(module, name):
    """A magic whose code is in the guest module `module` (loaded on its first use)."""
    def run(*args):
        _load(module)
        return globals()[name](*args)
    return run


# ---------------------------------------------------------------------------------------------
# Shell commands through magics: %sx, %system, and IPython's aliases (%ls, %cat, ...).


def _shell_output(args):
    _load("shell")
    return _sh_getoutput(args)


def _alias(command):
    def run(args):
        _load("shell")
        return _sh_system(f"{command} {args}".strip())
    return run


_LINE_MAGICS = {
    "matplotlib": _matplotlib,
    "pylab": _pylab,
    "config": _config,
    "load_ext": lambda args: _load_ext(args.strip()),
    "reload_ext": lambda args: _load_ext(args.strip()),
    "autoreload": _autoreload_magic,
    "aimport": _aimport,
    "env": _env,
    "run": _run_file,
    "reset": _reset,
    "time": lambda args: _time(args.strip()),
    "timeit": _timeit,
    "pwd": lambda args: os.getcwd(),
    "cd": _cd,
    "xmode": _from("debugging", "_xmode"),
    "prun": _from("debugging", "_prun"),
    "debug": _from("debugging", "_debug"),
    "pdb": _from("debugging", "_pdb"),
    "sx": _shell_output,
    "system": _shell_output,
    "ls": _alias("ls -F"),
    "ll": _alias("ls -F -o"),
    "cat": _alias("cat"),
    "cp": _alias("cp"),
    "mv": _alias("mv"),
    "rm": _alias("rm"),
    "mkdir": _alias("mkdir"),
    "rmdir": _alias("rmdir"),
    "who": _who,
    "whos": _who,
    "lsmagic": lambda args: print(
        "Line magics: " + " ".join("%" + n for n in sorted(_LINE_MAGICS)) + "\n"
        "Cell magics: " + " ".join("%%" + n for n in sorted(_CELL_MAGICS)) + " %%ask (with the "
        "gateway)"),
}


class CapturedIO:
    """What `%%capture NAME` keeps: the cell's stdout, stderr and rich outputs."""

    def __init__(self, stdout, stderr, outputs):
        self._stdout, self._stderr, self.outputs = stdout, stderr, outputs

    @property
    def stdout(self):
        return self._stdout.getvalue() if self._stdout is not None else ""

    @property
    def stderr(self):
        return self._stderr.getvalue() if self._stderr is not None else ""

    def show(self):
        """Sends what was captured, as the cell would have."""
        if self.stdout:
            sys.stdout.write(self.stdout)
        if self.stderr:
            sys.stderr.write(self.stderr)
        for content in self.outputs:
            _publish("display_data", content)

    __call__ = show

    def __repr__(self):
        return f"<CapturedIO: {len(self.stdout)} chars of stdout, {len(self.stderr)} of stderr, " \
               f"{len(self.outputs)} outputs>"


def _capture(args, body):
    usage = "%%capture [--no-stdout] [--no-stderr] [--no-display] [NAME]"
    found, words = _options(args, {"--no-stdout", "--no-stderr", "--no-display"}, usage)
    if len(words) > 1 or (words and not words[0].isidentifier()):
        raise _UsageError(f"{usage}: {' '.join(words)!r} is not a variable name")
    out = None if "--no-stdout" in found else io.StringIO()
    err = None if "--no-stderr" in found else io.StringIO()
    outputs = None if "--no-display" in found else []
    saved = (sys.stdout, sys.stderr, _state["capture"])
    _flush()
    if out is not None:
        sys.stdout = out
    if err is not None:
        sys.stderr = err
    _state["capture"] = outputs
    try:
        value = _run_source(body, "<capture>")
        if outputs is not None:
            if value is not None:
                data, md = format_bundle(value)
                outputs.append({"data": data, "metadata": md, "transient": {}})
            _flush_figures()
    finally:
        sys.stdout, sys.stderr, _state["capture"] = saved
    if words:
        _ns[words[0]] = CapturedIO(out, err, outputs or [])
    return None


def _writefile(args, body):
    usage = "%%writefile [-a] FILE"
    found, words = _options(args, {"-a", "--append"}, usage)
    if len(words) != 1:
        raise _UsageError(f"{usage}: one file name, not {len(words)}")
    path = os.path.expanduser(words[0])
    append = bool(found)
    verb = "Appending to" if append else ("Overwriting" if os.path.exists(path) else "Writing")
    print(f"{verb} {words[0]}")
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.write(body if body.endswith("\n") or not body else body + "\n")
    return None


def _shows(mime):
    def show(args, body):
        display({mime: body, "text/plain": f"<{mime} cell>"}, raw=True)
        return None
    return show


_CELL_MAGICS = {
    "time": lambda args, body: _time(body),
    "timeit": _timeit,
    "capture": _capture,
    "writefile": _writefile,
    "file": _writefile,
    "prun": _from("debugging", "_prun"),
    "debug": _from("debugging", "_debug"),
    "html": _shows("text/html"),
    "HTML": _shows("text/html"),
    "markdown": _shows("text/markdown"),
    "latex": _shows("text/latex"),
    "svg": _shows("image/svg+xml"),
    "javascript": _shows("application/javascript"),
    "js": _shows("application/javascript"),
}
_NO_PROCESSES = {"bash", "sh", "script", "system", "sx", "perl", "ruby", "python3", "pypy"}
_SHELL_HINT = ("; `!` runs ls, cat, head, tail, wc, mkdir, rm, cp, mv, pwd and echo inside the "
               "sandbox")


def _magic(name, args, body=None):
    name = name.strip()
    if name == "pip" and body is None:
        _load("packages")
        return _pip(args)
    if name in ("conda", "mamba", "uv"):
        raise _UsageError(
            f"%{name} is not available in the sandbox; %pip install installs packages (pure-Python "
            "wheels, fetched by the gateway). Already installed: numpy, pandas, scipy, "
            "scikit-learn, statsmodels, matplotlib, seaborn, sympy, networkx and more "
            "(`%pip list`).")
    if name == "ask":
        raise _UsageError("%%ask is served by the Sandgate gateway; this kernel was started "
                          "without it.")
    if body is not None:
        handler = _CELL_MAGICS.get(name)
        if handler is not None:
            return handler(args.strip(), body)
        if name in _NO_PROCESSES:
            raise _UsageError(f"%%{name} is not available: the sandbox runs no processes"
                              f"{_SHELL_HINT}.")
        raise _UsageError(f"Cell magic `%%{name}` not found (Sandgate has "
                          f"{', '.join('%%' + n for n in sorted(_CELL_MAGICS))}).")
    handler = _LINE_MAGICS.get(name)
    if handler is not None:
        return handler(args)
    raise _UsageError(f"Line magic function `%{name}` not found (Sandgate has "
                      f"{', '.join('%' + n for n in sorted(_LINE_MAGICS))}; %lsmagic lists them).")
