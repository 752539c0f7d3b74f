"""Sandgate's magics for errors and time: %xmode (IPython's traceback shapes), %prun and %%prun
(cProfile), %debug and %pdb (pdb through the frontend's input requests).

Loaded into the driver's namespace, like magics.py, the first time a cell uses one of them (see
`_from` in magics.py): few notebooks do, so the other magics do not pay for compiling this.
"""

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
        note = _cut_note(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        if note is not None and run and tb.tb_frame.f_code.co_filename == "<sandgate: repeated>":
            # The driver's cut kept the run's first frames: folded as IPython writes it.
            (code, line), frames = run[0][0], [(t.tb_frame, t.tb_lineno) for _, t in run]
            hidden = len(frames) - _TB_REPEATS + tb.tb_lineno
            out += frames[:_TB_REPEATS] + [(None, (code.co_name, line, hidden))]
            run = []
            tb = tb.tb_next
            continue
        if note is not None:
            out += _fold(run)
            out.append((None, note))
            run = []
            tb = tb.tb_next
            continue
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
    # The code object and linecache may disagree (a module edited since it was imported).
    stop = min(last, lineno + _TB_CONTEXT // 2, len(lines))
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
    """Traceback lines for `e` in the mode `%xmode` chose (the driver calls it through
    `_formatted`, which has dropped the driver's frames and cut what is too long)."""
    mode = _state.get("xmode") or "Context"
    chain = _chain(e)
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
        if isinstance(exc, _ChainSkipped):
            out.append(_chain_skipped_note(exc) + "\n")
            if joiner is not None:
                out.append(joiner)
            continue
        name = type(exc).__name__
        if mode == "Plain":
            out.append("Traceback (most recent call last):\n")
        else:
            out.append(name + "Traceback (most recent call last)".rjust(_TB_WIDTH - len(name)))
        for frame, lineno in _frames(exc.__traceback__):
            if frame is None:
                if isinstance(lineno, str):  # a note of the driver's `_cut`
                    out.append(f"    {lineno}\n")
                    continue
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


