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
# %xmode: IPython's traceback shapes (without colours). The driver's own shape (Python's
# traceback, cells named `Cell In[n]`) stays until a cell picks one.

_XMODES = ("Plain", "Context", "Verbose", "Minimal")
_TB_WIDTH = 75
_TB_CONTEXT = 5
# Frames of one recursion past this many are folded into one line, as IPython does.
_TB_REPEATS = 3
_CHAIN_CAUSE = "\nThe above exception was the direct cause of the following exception:\n"
_CHAIN_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n"


def _xmode(args):
    mode = args.strip().capitalize()
    current = _state.get("xmode") or "Context"
    if not mode:
        mode = _XMODES[(_XMODES.index(current) + 1) % len(_XMODES)]
    if mode not in _XMODES:
        raise _UsageError(f"%xmode takes one of {', '.join(_XMODES)}, not {args.strip()!r}")
    _state["xmode"] = mode
    _state["format_traceback"] = _format_traceback_xmode
    print(f"Exception reporting mode: {mode}")
    return None


def _chain(e):
    """`e` and the exceptions it came from, oldest first, with the text that joins each to
    the next, as Python prints them (at most 50, as a guard against cycles)."""
    links, seen, link, joiner = [], set(), e, None
    while link is not None and id(link) not in seen and len(links) < 50:
        seen.add(id(link))
        links.append((link, joiner))
        if link.__cause__ is not None:
            link, joiner = link.__cause__, _CHAIN_CAUSE
        elif link.__context__ is not None and not link.__suppress_context__:
            link, joiner = link.__context__, _CHAIN_CONTEXT
        else:
            link = None
    links.reverse()  # each joiner now follows its exception
    return links


def _frames(tb):
    """(frame, line number) of a traceback, runs of one recursion folded to
    (None, (name, line, count)) after their first `_TB_REPEATS` frames."""
    out, run = [], []
    while tb is not None:
        key = (tb.tb_frame.f_code, tb.tb_lineno)
        if run and run[-1][0] == key:
            run.append((key, tb))
        else:
            out += _fold(run)
            run = [(key, tb)]
        tb = tb.tb_next
    return out + _fold(run)


def _fold(run):
    frames = [(tb.tb_frame, tb.tb_lineno) for _, tb in run]
    if len(frames) <= _TB_REPEATS + 1:
        return frames
    code, line = run[0][0]
    skipped = len(frames) - _TB_REPEATS - 1
    return frames[:_TB_REPEATS] + [(None, (code.co_name, line, skipped))] + frames[-1:]


def _where(frame, lineno, plain=False):
    """`Cell In[3], line 2` or `File /path/x.py:12`."""
    name = frame.f_code.co_filename
    m = re.fullmatch(r"<cell-(\d+)>", name)
    if m:
        return f"Cell In[{m.group(1)}], line {lineno}"
    return f"File {name}:{lineno}"


def _call(frame, verbose):
    """`in f(a, b)` (with the values in Verbose mode), nothing for module-level code."""
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    if name == "<module>":
        return ""
    try:
        args = inspect.getargvalues(frame)
        fmt = (lambda v: "=" + _short_repr(v)) if verbose else (lambda v: "")
        return f"in {name}{inspect.formatargvalues(*args, formatvalue=fmt)}"
    except Exception:
        return f"in {name}(***failed resolving arguments***)"


def _short_repr(value, limit=200):
    try:
        text = repr(value)
    except Exception as e:
        text = f"<repr failed: {type(e).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _context_lines(frame, lineno, verbose):
    """The numbered source lines around `lineno` within the frame's function (or the whole
    cell), the current one marked `---->`, as IPython's Context mode."""
    code = frame.f_code
    lines = linecache.getlines(code.co_filename, frame.f_globals)
    if not lines or not 0 < lineno <= len(lines):
        return ""
    if code.co_name == "<module>":
        first, last = 1, len(lines)
    else:
        first = code.co_firstlineno
        last = max((l for _, _, l in code.co_lines() if l), default=lineno)
    start = max(first, lineno - (_TB_CONTEXT - 1))
    while start < lineno and not lines[start - 1].strip():
        start += 1
    stop = min(last, lineno + _TB_CONTEXT // 2)
    while stop > lineno and not lines[stop - 1].strip():
        stop -= 1
    out = []
    for n in range(start, stop + 1):
        text = lines[n - 1].rstrip("\n")
        if n == lineno:
            pad = 7 - len(str(n))
            arrow = "-" * (pad - 2) + "> " if pad >= 2 else ">" * pad
            out.append(f"{arrow}{n} {text}")
            if verbose:
                out += [f"        {v}" for v in _line_variables(frame, text)]
        else:
            out.append(f"{n:>7} {text}")
    return "\n".join(out) + "\n"


def _line_variables(frame, text):
    """`name = value` for the variables the line uses (Verbose mode)."""
    import io as _io
    import tokenize
    names = []
    try:
        for tok in tokenize.generate_tokens(_io.StringIO(text.strip() + "\n").readline):
            if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string) \
                    and tok.string not in names:
                names.append(tok.string)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    out = []
    for name in names:
        for scope in (frame.f_locals, frame.f_globals):
            if name in scope:
                value = scope[name]
                if not isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    out.append(f"{name} = {_short_repr(value)}")
                break
    return out


def _exception_line(exc):
    return "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")


def _format_traceback_xmode(e):
    """Traceback lines for `e` in the mode `%xmode` chose."""
    mode = _state.get("xmode") or "Context"
    if isinstance(e, KeyboardInterrupt):
        e.__suppress_context__ = True  # what the interrupted code was handling is not news
    chain = _chain(e)
    for exc, _ in chain:
        exc.__traceback__ = _user_frames(exc.__traceback__)
    if isinstance(e, SyntaxError) and re.fullmatch(r"<cell-\d+>", str(e.filename)):
        # The cell itself did not compile: one shape in all modes, as in IPython.
        text = re.sub(r'File "<cell-(\d+)>", line (\d+)', r"Cell In[\1], line \2",
                      _exception_line(e))
        return [text + "\n"]
    if mode == "Minimal":
        return [_exception_line(e) + "\n"]
    out = []
    if mode != "Plain":
        out.append("-" * _TB_WIDTH)
    for exc, joiner in chain:
        name = type(exc).__name__
        if mode == "Plain":
            out.append("Traceback (most recent call last):\n")
        else:
            out.append(name + "Traceback (most recent call last)".rjust(_TB_WIDTH - len(name)))
        for frame, lineno in _frames(exc.__traceback__):
            if frame is None:
                fname, line, count = lineno
                out.append(f"    [... skipping similar frames: {fname} at line {line} "
                           f"({count} times)]\n")
                continue
            if mode == "Plain":
                call = frame.f_code.co_name
                where = "  " + _where(frame, lineno) + (f" in {call}" if call != "<module>"
                                                         else "")
                line = linecache.getline(frame.f_code.co_filename, lineno,
                                         frame.f_globals).strip()
                out.append(where + "\n" + (f"    {line}\n" if line else ""))
                continue
            call = _call(frame, mode == "Verbose")
            head = _where(frame, lineno) + (f", {call}" if call else "")
            out.append(head + "\n" + _context_lines(frame, lineno, mode == "Verbose"))
        out.append(_exception_line(exc) + ("\n" if mode == "Plain" else ""))
        if joiner is not None:
            out.append(joiner)
    return out


# ---------------------------------------------------------------------------------------------
# %prun, %%prun: cProfile with IPython's options, the report shown in the pager.

_PRUN_OPTION = re.compile(r"\s*-([DlsT])\s*(\S+)|\s*-([rq])(?=\s|$)")


def _prun(line, body=None):
    """`%prun [-s KEY]... [-l LIMIT]... [-r] [-q] [-T FILE] [-D FILE] STATEMENT`; as a cell
    magic the cell is appended to what follows the options."""
    import cProfile
    import pstats
    opts = {"D": [], "l": [], "s": [], "T": [], "r": False, "q": False}
    while True:
        m = _PRUN_OPTION.match(line)
        if m is None:
            break
        if m.group(1):
            opts[m.group(1)].append(m.group(2))
        else:
            opts[m.group(3)] = True
        line = line[m.end():]
    if re.match(r"\s*-\w", line) and not re.match(r"\s*-\s*\d", line):
        bad = re.match(r"\s*(-\w)", line).group(1)
        raise _UsageError(f"%prun: option {bad} not recognized (allowed: -D FILE, -l LIMIT, "
                          "-r, -s KEY, -T FILE, -q)")
    code = line.strip() if body is None else line.strip() + "\n" + body
    keys = opts["s"] or ["time"]
    valid = pstats.Stats.sort_arg_dict_default
    bad = [k for k in keys if k not in valid]
    if bad:
        raise _UsageError(f"%prun: {bad[0]!r} is not a sort key (these are: "
                          f"{', '.join(sorted(valid))})")
    profiler = cProfile.Profile()
    exited = ""
    try:
        profiler.runctx(code, _ns, _ns)
    except SystemExit:
        exited = "*** SystemExit exception caught in code being profiled."
    stats = pstats.Stats(profiler).strip_dirs().sort_stats(*keys)
    limits = []
    for lim in opts["l"]:
        try:
            limits.append(int(lim))
        except ValueError:
            try:
                limits.append(float(lim))
            except ValueError:
                limits.append(lim)
    buf = io.StringIO()
    stats.stream = buf
    stats.print_stats(*limits)
    stats.stream = sys.stdout
    report = buf.getvalue().rstrip()
    if not opts["q"]:
        _state["payload"].append({"source": "page", "data": {"text/plain": report}, "start": 0})
    if exited:
        print(exited)
    if opts["D"]:
        profiler.dump_stats(opts["D"][0])
        print(f"\n*** Profile stats marshalled to file {opts['D'][0]!r}.{exited}")
    if opts["T"]:
        with open(opts["T"][0], "w", encoding="utf-8") as f:
            f.write(report)
        print(f"\n*** Profile printout saved to text file {opts['T'][0]!r}.{exited}")
    return stats if opts["r"] else None


# ---------------------------------------------------------------------------------------------
# %debug, %pdb: pdb on the last exception, its prompt answered through input_request.


def _debugger():
    import pdb

    class Pdb(pdb.Pdb):
        """pdb whose prompt is a Jupyter input request; an interrupt ends the session (pdb's
        own loop would ask again)."""

        def _cmdloop(self):
            self.allow_kbdint = True
            try:
                self.cmdloop()
            finally:
                self.allow_kbdint = False

    request = _state["request"] or {}
    if not request.get("allow_stdin", False):
        raise _UsageError("the debugger needs to ask for input, and this frontend cannot "
                          "answer input requests (run the cell from a notebook or console)")
    debugger = Pdb(nosigint=True)
    debugger.prompt = "ipdb> "
    return debugger


def _post_mortem(exc):
    debugger = _debugger()
    debugger.reset()
    debugger.interaction(None, exc)


def _debug(args, body=None):
    """`%debug`: post-mortem on the last exception; `%debug STATEMENT` (or `%%debug`): run it
    under the debugger."""
    code = args.strip() if body is None else (args.strip() + "\n" + body).strip()
    if code:
        debugger = _debugger()
        debugger.run(code, _ns, _ns)
        return None
    exc = getattr(sys, "last_exc", None)
    if exc is None:
        print("ERROR: No traceback has been produced, nothing to debug.", file=sys.stderr)
        return None
    _post_mortem(exc)
    return None


def _after_error(exc):
    """With `%pdb on`: the debugger on the exception a cell just raised."""
    if isinstance(exc, (KeyboardInterrupt, _UsageError)):
        return
    try:
        _post_mortem(exc)
    except KeyboardInterrupt:
        print("--KeyboardInterrupt--")
    except _UsageError as e:
        print(f"%pdb: {e}", file=sys.stderr)
    except Exception as e:
        print(f"%pdb: the debugger failed: {type(e).__name__}: {e}", file=sys.stderr)


def _pdb(args):
    arg = args.strip().lower()
    if arg:
        new = {"off": False, "0": False, "on": True, "1": True}.get(arg)
        if new is None:
            print("Incorrect argument. Use on/1, off/0, or nothing for a toggle.")
            return None
    else:
        new = _state.get("after_error") is None
    _state["after_error"] = _after_error if new else None
    print("Automatic pdb calling has been turned", "ON" if new else "OFF")
    return None


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
    "xmode": _xmode,
    "prun": _prun,
    "debug": _debug,
    "pdb": _pdb,
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
    "prun": _prun,
    "debug": _debug,
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
    if name in ("pip", "conda", "mamba", "uv"):
        raise _UsageError(
            f"%{name} is not available: the sandbox has no network. These packages are "
            "installed: numpy, pandas, scipy, scikit-learn, statsmodels, matplotlib, seaborn, "
            "sympy, networkx and more (see `help('modules')`).")
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
