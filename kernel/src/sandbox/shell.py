"""Sandgate's shell commands: `!cmd`, `x = !cmd`, `%sx`, and IPython's `%ls`-style aliases.

The sandbox runs no processes, so the commands notebooks run most are written here in Python
and run in the interpreter the cell runs in: the same limits (memory, time, output, disk, open
files), the same folders, and nothing started on the host. Each prints what GNU coreutils 9
prints in the guest's locale (C.UTF-8, UTC): ls, cat, head, tail, wc, mkdir, rm, cp, mv, touch,
rmdir, pwd, echo, true, false and cd, with pipes (`|`), redirections (`>`, `>>`, `<`, `2>`,
`2>&1`, `&>`), `;`, `&&`, `||`, quotes, globs, `~`, `$VAR`, and IPython's `$name` and `{expr}`
expansion from the notebook's variables. As in Jupyter, `!cmd` prints as a terminal would
(`ls` in columns, 80 wide; error messages on the same stream), and `x = !cmd` gets the lines a
pipe would (one name per line), as a list with IPython's SList helpers. Anything else is a
UsageError that names what there is.

Loaded into the driver's namespace the first time a cell uses `!` (see `_load`), so names here
start with `_sh` (or are IPython's: `SList`).
"""

import collections as _sh_collections
import errno as _sh_errno
import stat as _sh_stat

_SH_WIDTH = 80  # the terminal's width, as pexpect gives IPython's `!cmd`
_SH_CHUNK = 1 << 16


class SList(list):
    """A list of lines, as IPython's `x = !cmd` gives: `.l` (the list), `.n` (joined by
    newlines), `.s` (joined by spaces), `.p` (the lines that name existing files, as paths),
    `.grep(pattern, prune=False, field=None)`, `.fields(*indexes)` and `.sort(field, nums)`."""

    @property
    def l(self):
        return self

    list = l

    @property
    def n(self):
        return "\n".join(self)

    nlstr = n

    @property
    def s(self):
        return " ".join(self)

    spstr = s

    @property
    def p(self):
        import pathlib
        return [pathlib.Path(x) for x in self if os.path.exists(x)]

    paths = p

    def grep(self, pattern, prune=False, field=None):
        """The lines matching `pattern` (a regular expression, case-insensitive, or a
        function); with `prune`, those that do not; with `field`, matched on that
        whitespace-separated field."""
        def target(line):
            if field is None:
                return line
            parts = line.split()
            try:
                return parts[field]
            except IndexError:
                return ""
        match = ((lambda s: re.search(pattern, s, re.IGNORECASE)) if isinstance(pattern, str)
                 else pattern)
        return SList(x for x in self if bool(match(target(x))) != bool(prune))

    def fields(self, *indexes):
        """Whitespace-separated fields of every line (awk-like): `fields(0)` is each line's
        first word, `fields(1, 0)` its second and first joined by a space; no index: every
        line split."""
        if not indexes:
            return [x.split() for x in self]
        out = SList()
        for parts in (x.split() for x in self):
            picked = []
            for i in indexes:
                try:
                    picked.append(parts[i])
                except IndexError:
                    pass
            if picked:
                out.append(" ".join(picked))
        return out

    def sort(self, field=None, nums=False):
        """A sorted copy: by `field` (see `fields`) if given, numerically with `nums`."""
        def key(line):
            k = SList([line]).fields(field) if field is not None else line
            if isinstance(k, list):
                k = " ".join(k)
            if nums:
                digits = "".join(c for c in k if c.isdigit())
                return int(digits) if digits else 0
            return k
        return SList(sorted(self, key=key))

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": _plain(list(self))}


# ---------------------------------------------------------------------------------------------
# The command line: IPython's expansion, then a small POSIX shell grammar.


class _ShSyntax(Exception):
    """The command line uses shell syntax this shell does not have."""


def _sh_python_expand(cmd):
    """IPython's `var_expand`: `{expr}` evaluated and `$name` (or `$name.attr`) looked up in
    the notebook's namespace, `$$` for a literal `$`; if any part fails, the line is left as
    it was (so `$HOME` reaches the shell's own expansion)."""
    import string

    dollar = re.compile(r"(.*?)\$(\$?[\w\.]+)(?=([^']*'[^']*')*[^']*$)")

    class Formatter(string.Formatter):
        def parse(self, text):
            for literal, field, spec, conversion in super().parse(text):
                done, kept = 0, ""
                for m in dollar.finditer(literal):
                    before, name = m.group(1, 2)
                    if name.startswith("$"):
                        kept += before + name
                    else:
                        yield kept + before, name, "", None
                        kept = ""
                    done = m.end()
                yield kept + literal[done:], field, spec, conversion

        def vformat(self, text, args, kwargs):
            out = []
            for literal, field, spec, conversion in self.parse(text):
                if literal:
                    out.append(literal)
                if field is not None:
                    if spec:
                        field = f"{field}:{spec}"
                    value = self.convert_field(eval(field, dict(kwargs)), conversion)
                    out.append(self.format_field(value, ""))
            return "".join(out)

    if "$" not in cmd and "{" not in cmd:
        return cmd
    namespace = dict(_ns)
    # The names of the function the line is in, if it is in one (IPython's `depth`).
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == "<sandgate-driver>":
        frame = frame.f_back
    if frame is not None and frame.f_locals is not frame.f_globals:
        namespace.update(frame.f_locals)
    try:
        return Formatter().vformat(cmd, (), namespace)
    except Exception:
        return cmd


_SH_OPERATORS = ("2>&1", "1>&2", "&>>", "2>>", "&&", "||", ">>", ">&", "&>", "<<", "2>", "1>",
                 "|", "&", ";", "<", ">", "(", ")")


class _ShWord:
    """A word of the command line: its text, and the pattern its unquoted globs make."""

    def __init__(self):
        self.parts, self.globbed = [], False

    def add(self, text, quoted):
        """`text` (a function for `$?`, which is read when the command runs)."""
        self.parts.append((text, quoted))
        if not quoted and any(c in text for c in "*?["):
            self.globbed = True

    @property
    def static_text(self):
        return "".join(t for t, _ in self.parts if isinstance(t, str))

    def expand(self):
        """The word's arguments: its glob's matches (sorted, as in the C locale), or the word
        itself when it has no glob or the glob matches nothing (as bash does)."""
        import glob
        parts = [(t() if callable(t) else t, q) for t, q in self.parts]
        text = "".join(t for t, _ in parts)
        if self.globbed:
            pattern = "".join(glob.escape(t) if q else t for t, q in parts)
            matches = sorted(glob.glob(pattern))
            if matches:
                return matches
        return [text]


_sh_state = {"status": 0}


def _sh_env(name):
    if name == "?":
        return lambda: str(_sh_state["status"])
    return os.environ.get(name, "")


def _sh_lex(line):
    """Words (`_ShWord`) and operators (str) of `line`."""
    tokens, i, n = [], 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t\n":
            i += 1
            continue
        if c == "#":
            break
        op = next((o for o in _SH_OPERATORS if line.startswith(o, i)), None)
        if op is not None:
            if op in ("<<", "&", "(", ")"):
                what = {"<<": "here-documents (<<)", "&": "background jobs (&)",
                        "(": "subshells ( ( ) )", ")": "subshells ( ( ) )"}[op]
                raise _ShSyntax(what)
            tokens.append(op)
            i += len(op)
            continue
        word = _ShWord()
        if c == "~" and (i + 1 == n or line[i + 1] in "/ \t|;&<>"):
            word.add(os.environ.get("HOME", "/tmp/home"), True)
            i += 1
        while i < n and line[i] not in " \t\n|&;<>()":
            c = line[i]
            if c == "'":
                end = line.find("'", i + 1)
                if end < 0:
                    raise _ShSyntax("an unterminated quote (')")
                word.add(line[i + 1:end], True)
                i = end + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise _ShSyntax('an unterminated quote (")')
                    c = line[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\" and i + 1 < n and line[i + 1] in '$`"\\\n':
                        word.add(line[i + 1], True)
                        i += 2
                    elif c == "$":
                        text, i = _sh_dollar(line, i)
                        word.add(text, True)
                    elif c == "`":
                        raise _ShSyntax("command substitution (`...`)")
                    else:
                        word.add(c, True)
                        i += 1
                if not word.parts:
                    word.add("", True)
            elif c == "\\":
                if i + 1 < n:
                    word.add(line[i + 1], True)
                i += 2
            elif c == "$":
                text, i = _sh_dollar(line, i)
                word.add(text, True)
            elif c == "`":
                raise _ShSyntax("command substitution (`...`)")
            else:
                j = i
                while j < n and line[j] not in " \t\n|&;<>()'\"\\$`":
                    j += 1
                word.add(line[i:j], False)
                i = j
        tokens.append(word)
    return tokens


def _sh_dollar(line, i):
    """`$NAME`, `${NAME}` or `$?` at `line[i]`: (its value, the index after it)."""
    rest = line[i + 1:]
    if rest.startswith("("):
        raise _ShSyntax("command substitution ($(...))")
    m = re.match(r"\{([A-Za-z_]\w*|\?)\}|([A-Za-z_]\w*|\?)", rest)
    if m is None:
        return "$", i + 1
    return _sh_env(m.group(1) or m.group(2)), i + 1 + m.end()


def _sh_parse(tokens):
    """[(connector, [command, ...]), ...] where a command is {"words": [...], "redirects":
    [(op, word or None)]} and the connector (None, ";", "&&", "||") says when it runs."""
    items, connector, pipeline, command = [], None, [], {"words": [], "redirects": []}
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if isinstance(t, _ShWord):
            command["words"].append(t)
        elif t in ("|", ";", "&&", "||"):
            if not command["words"]:
                if t == ";" and not pipeline and not command["redirects"]:
                    i += 1
                    continue
                raise _ShSyntax(f"a `{t}` with no command before it")
            pipeline.append(command)
            command = {"words": [], "redirects": []}
            if t != "|":
                items.append((connector, pipeline))
                connector, pipeline = t, []
        elif t in ("2>&1", "1>&2", ">&"):
            if t == ">&":
                target = tokens[i + 1] if i + 1 < len(tokens) else None
                text = target.static_text if isinstance(target, _ShWord) else ""
                if text not in ("1", "2"):
                    raise _ShSyntax("`>&` other than 2>&1 and >&2")
                t = "2>&1" if text == "1" else "1>&2"
                i += 1
            command["redirects"].append((t, None))
        else:
            target = tokens[i + 1] if i + 1 < len(tokens) else None
            if not isinstance(target, _ShWord):
                raise _ShSyntax(f"`{t}` with no file name after it")
            command["redirects"].append((t, target))
            i += 1
        i += 1
    if command["words"]:
        pipeline.append(command)
    elif command["redirects"] or pipeline:
        raise _ShSyntax("a command line that ends in an operator")
    if pipeline:
        items.append((connector, pipeline))
    return items


# ---------------------------------------------------------------------------------------------
# Running a command line


class _ShProcess:
    """One command of a pipeline: its output as an iterator of byte chunks (its stderr, when
    sent the same way, in order with it), and its status once it is done."""

    def __init__(self, body, argv, stdin, tty):
        self.argv, self.stdin, self.tty = argv, stdin, tty
        self.queue = _sh_collections.deque()
        self.status = None
        self.err_target = None  # None: merged into the output; else a writer
        self.gen = body(self, argv[1:])

    def err(self, message):
        """An error line, as `prog: message`."""
        self.write_err(f"{self.argv[0]}: {message}\n".encode("utf-8", "surrogateescape"))

    def write_err(self, data):
        if self.err_target is None:
            self.queue.append(data)
        else:
            self.err_target(data)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self.queue:
                return self.queue.popleft()
            if self.gen is None:
                raise StopIteration
            try:
                chunk = next(self.gen)
            except StopIteration as e:
                self.status = 0 if e.value is None else e.value
                self.gen = None
                continue
            except _ShUsage as e:
                self.err(str(e))
                self.status = e.status
                self.gen = None
                continue
            if chunk:
                self.queue.append(chunk)

    def close(self):
        if self.gen is not None:
            self.gen.close()
            self.gen = None
        if self.status is None:
            self.status = 141  # ended by its reader, as by SIGPIPE


class _ShUsage(Exception):
    """A command's own usage error (`ls: invalid option -- 'z'`); status 2 for ls, else 1."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def _sh_open_out(path, append):
    if path == "/dev/null":
        return "null"
    return open(path, "ab" if append else "wb")


class _ShFileStream:
    """Standard input read from a file (`< FILE`): chunks, and the file's status for wc."""

    def __init__(self, f):
        self.f, self.st = f, os.fstat(f.fileno())
        self.chunks = _sh_read_chunks(f)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.chunks)


def _sh_run_pipeline(pipeline, out, terminal):
    """Runs one pipeline; `out` takes what reaches the terminal (bytes): the last command's
    output and every command's errors, unless redirected. Returns the last command's
    status."""
    stream = iter(())
    processes, files = [], []
    status = 0
    try:
        for index, command in enumerate(pipeline):
            last = index == len(pipeline) - 1
            argv = [a for w in command["words"] for a in w.expand()]
            stdin = stream if index else iter(())
            # Where stdout and stderr go, redirections applied left to right as a shell does:
            # "pipe" (the next command), "terminal", "null", or an open file.
            stdout, stderr = "terminal" if last else "pipe", "terminal"
            failed = False
            for op, target in command["redirects"]:
                name = None if target is None else " ".join(target.expand())
                try:
                    if op == "<":
                        if name == "/dev/null":
                            stdin = iter(())
                        else:
                            f = open(name, "rb")
                            files.append(f)
                            stdin = _ShFileStream(f)
                    elif op in (">", "1>", ">>", "&>", "&>>"):
                        stdout = _sh_open_out(name, op.endswith(">>"))
                        if stdout != "null":
                            files.append(stdout)
                        if op.startswith("&"):
                            stderr = stdout
                    elif op in ("2>", "2>>"):
                        stderr = _sh_open_out(name, op == "2>>")
                        if stderr != "null":
                            files.append(stderr)
                    elif op == "2>&1":
                        stderr = stdout
                    elif op == "1>&2":
                        stdout = stderr
                except OSError as e:
                    out(f"sh: {name}: {_sh_strerror(e)}\n".encode("utf-8", "surrogateescape"))
                    failed = True
                    break
            stream = iter(())
            if failed:
                status = 1
                continue
            if argv[0] not in _SH_COMMANDS:  # a name made when the line ran (`$?`)
                raise _sh_unknown(argv[0])
            proc = _ShProcess(_SH_COMMANDS[argv[0]], argv, stdin,
                              tty=terminal and stdout == "terminal")
            processes.append(proc)
            piped_errors = []
            if stderr == stdout and stderr in ("pipe", "terminal"):
                proc.err_target = None  # in order with its output
            elif stderr == "pipe":
                proc.err_target = piped_errors.append
            elif stderr == "terminal":
                proc.err_target = out
            elif stderr == "null":
                proc.err_target = lambda data: None
            else:
                proc.err_target = stderr.write
            if stdout == "pipe":
                stream = proc
            elif stdout == "terminal":
                for chunk in proc:
                    out(chunk)
            else:
                write = (lambda data: None) if stdout == "null" else stdout.write
                for chunk in proc:
                    write(chunk)
            if piped_errors:
                stream = iter(piped_errors)
            status = proc
    finally:
        for proc in processes:
            proc.close()
        for f in files:
            f.close()
    return status.status if isinstance(status, _ShProcess) else status


def _sh_run(line, out, terminal):
    """Runs a command line; returns its status. Raises UsageError (before running anything)
    for a command or syntax this shell does not have."""
    try:
        items = _sh_parse(_sh_lex(line))
    except _ShSyntax as e:
        raise _UsageError(f"the sandbox's shell does not have {e}; it runs "
                          f"{_sh_names()} with |, >, >>, <, 2>, 2>&1, ;, && and ||, "
                          f"quotes and globs") from None
    for _, pipeline in items:
        for command in pipeline:
            name = command["words"][0].static_text
            if re.match(r"[A-Za-z_]\w*=", name):
                raise _UsageError("setting shell variables is not available in the sandbox's "
                                  "shell; %env NAME=VALUE sets an environment variable")
            if name not in _SH_COMMANDS:
                raise _sh_unknown(name)
    status = _sh_state["status"] = _ns.get("_exit_code", 0)
    saved_cwd = os.getcwd()
    try:
        for connector, pipeline in items:
            if connector == "&&" and status != 0 or connector == "||" and status == 0:
                continue
            status = _sh_state["status"] = _sh_run_pipeline(pipeline, out, terminal)
    finally:
        try:
            os.chdir(saved_cwd)  # `cd` lasts for the line, as in a subshell
        except OSError:
            pass
    return status


def _sh_unknown(name):
    pip = (" (`%pip install NAME`, or `!pip install NAME` on a line of its own, installs "
           "packages)") if name in ("pip", "pip3") else ""
    return _UsageError(
        f"{name}: not available{pip}. The sandbox runs no programs; `!` runs these commands "
        f"inside it, as GNU coreutils prints them: {_sh_names()}. Other commands need a real "
        "shell, which Sandgate's Linux tier (a kernel in a Linux sandbox, coming) will have.")


def _sh_names():
    return ", ".join(sorted(_SH_COMMANDS))


def _sh_main(line):
    """`!cmd`: runs it, printing its output as a terminal shows it; `!!cmd` returns the lines
    instead, as `x = !cmd` does."""
    if line.startswith("!"):
        return _sh_getoutput(line.lstrip("!"))
    pip = re.match(r"\s*(?:pip3?|python3?\s+-m\s+pip)(?:\s+|$)(.*)", line, re.S)
    if pip:  # as in IPython notebooks, `!pip install x` installs into the kernel (see %pip)
        _load("packages")
        return _pip(pip.group(1))
    return _sh_system(line)


def _sh_system(line):
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    held = []
    _flush()

    def write(final=False):
        text = decoder.decode(b"".join(held), final=final)
        held.clear()
        if text:
            sys.stdout.write(text)

    def out(data):
        # Written in pieces of 64 KiB, not a stream message per line.
        held.append(data)
        if sum(map(len, held)) >= _SH_CHUNK:
            write()

    try:
        status = _sh_run(_sh_python_expand(line), out, terminal=True)
    finally:
        write(final=True)
    _ns["_exit_code"] = status
    return None


def _sh_getoutput(line):
    """`x = !cmd`, `%sx cmd`: the output (errors included, as IPython's getoutput) as an SList
    of lines."""
    chunks = []
    _sh_run(_sh_python_expand(line), chunks.append, terminal=False)
    return SList(b"".join(chunks).decode("utf-8", "replace").splitlines())


# ---------------------------------------------------------------------------------------------
# What the commands share


_SH_STRERROR = {
    _sh_errno.ENOENT: "No such file or directory",
    _sh_errno.EISDIR: "Is a directory",
    _sh_errno.ENOTDIR: "Not a directory",
    _sh_errno.EEXIST: "File exists",
    _sh_errno.ENOTEMPTY: "Directory not empty",
    _sh_errno.EACCES: "Permission denied",
    _sh_errno.EPERM: "Operation not permitted",
    _sh_errno.EROFS: "Read-only file system",
    _sh_errno.ENOSPC: "No space left on device",
    _sh_errno.EMFILE: "Too many open files",
    _sh_errno.EXDEV: "Invalid cross-device link",
    _sh_errno.EINVAL: "Invalid argument",
}


def _sh_strerror(e):
    return _SH_STRERROR.get(e.errno) or e.strerror or str(e)


_SH_SPECIAL = set(" !\"$&()*;<=>?[\\]^`|'\t\n\r\v\f\a\b")


def _sh_quote(name, always=True):
    """A file name as GNU shows it (`shell-escape` quoting): in single quotes if it has
    characters a shell would read (always, for error messages), in double quotes if its only
    such character is a single quote."""
    needs = (any(c in _SH_SPECIAL or ord(c) < 32 for c in name) or name[:1] in ("#", "~")
             or name in ("{", "}"))
    if not needs and not always:
        return name
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        # Control characters as $'\t', between quoted runs of the rest: 'tab'$'\t''x'.
        out, run = [], []
        for c in name + "\0":
            if ord(c) < 32 or ord(c) == 127 or c == "'":
                if run:
                    out.append("'" + "".join(run) + "'")
                    run = []
                if c == "\0":
                    break
                named = {"\n": "n", "\t": "t", "\r": "r", "\v": "v", "\f": "f", "\a": "a",
                         "\b": "b", "'": "'"}.get(c)
                out.append(f"$'\\{named}'" if named else f"$'\\{ord(c):03o}'")
            else:
                run.append(c)
        text = "".join(out)
        return "''" + text if text.startswith("$") else text
    if "'" in name:
        if not any(c in name for c in '"$`\\!'):
            return f'"{name}"'
        return "'" + name.replace("'", "'\\''") + "'"
    return f"'{name}'"


def _sh_lquote(name):
    """`quote()` in a UTF-8 locale: ‘name’ (mkdir's and head's messages)."""
    return f"\u2018{name}\u2019"


def _sh_getopt(prog, args, flags="", valued="", long_flags=None, long_valued=None,
               digits=False, status=1):
    """GNU getopt_long with argument permutation: ([(option, value)], operands). `digits`
    lets `-N` stand for `-n N` (head, tail). An unknown option is a usage error."""
    long_flags, long_valued = long_flags or {}, long_valued or {}
    options, operands, i = [], [], 0
    usage = f"\nTry '{prog} --help' for more information."
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            operands.extend(args[i:])
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            matches = [k for k in list(long_flags) + list(long_valued) if k.startswith(name)]
            exact = name if name in long_flags or name in long_valued else None
            key = exact or (matches[0] if len(matches) == 1 else None)
            if key is None:
                if matches:
                    raise _ShUsage(f"option '{a}' is ambiguous{usage}", status)
                raise _ShUsage(f"unrecognized option '{a}'{usage}", status)
            if key in long_valued:
                if not eq:
                    if i >= len(args):
                        raise _ShUsage(f"option '--{key}' requires an argument{usage}", status)
                    value = args[i]
                    i += 1
                options.append((long_valued[key], value))
            else:
                if eq and not long_flags[key].startswith("--"):
                    raise _ShUsage(f"option '--{key}' doesn't allow an argument{usage}", status)
                options.append((long_flags[key], value if eq else None))
            continue
        if len(a) > 1 and a[0] == "-":
            if digits and a[1:].isdigit():
                options.append(("n", a[1:]))
                continue
            j = 1
            while j < len(a):
                c = a[j]
                j += 1
                if c in valued:
                    value = a[j:]
                    if not value:
                        if i >= len(args):
                            raise _ShUsage(f"option requires an argument -- '{c}'{usage}", status)
                        value = args[i]
                        i += 1
                    options.append((c, value))
                    break
                if c not in flags:
                    raise _ShUsage(f"invalid option -- '{c}'{usage}", status)
                options.append((c, None))
            continue
        operands.append(a)
    return options, operands


def _sh_read_chunks(f):
    while True:
        chunk = f.read(_SH_CHUNK)
        if not chunk:
            return
        yield chunk


def _sh_inputs(proc, operands, what):
    """(name shown, chunks, the open file or None) per operand ("-": stdin); a file that
    cannot be opened is reported as `what` says and skipped. Yields (name, chunks, file)."""
    for name in operands or ["-"]:
        if name == "-":
            yield name, proc.stdin, None
            continue
        if os.path.isdir(name):
            yield name, _sh_directory_chunks(), None
            continue
        try:
            f = open(name, "rb")
        except OSError as e:
            proc.err(what(name, e))
            proc.failed = True
            continue
        try:
            yield name, _sh_read_chunks(f), f
        finally:
            f.close()


def _sh_directory_chunks():
    raise IsADirectoryError(_sh_errno.EISDIR, "Is a directory")
    yield


def _sh_lines(chunks):
    """Lines (each with its newline, the last maybe without) from byte chunks."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk
        parts = data.split(b"\n")
        rest = parts.pop()
        for p in parts:
            yield p + b"\n"
    if rest:
        yield rest


def _sh_count(text, what, prog):
    """`-n N` / `-c N` as GNU reads them: optional sign, suffixes b, kB, K, MB, M, ..."""
    m = re.fullmatch(r"([+-]?)(\d+)(b|[kKMGTPEZY]B?|KiB|[MGTPEZY]iB)?", text.strip())
    if m is None:
        raise _ShUsage(f"invalid number of {what}: {_sh_lquote(text)}")
    sign, digits, suffix = m.groups()
    n = int(digits)
    if suffix:
        if suffix == "b":
            n *= 512
        else:
            power = "KMGTPEZY".index(suffix[0].upper()) + 1
            n *= (1000 if suffix.endswith("B") and not suffix.endswith("iB") else 1024) ** power
    return sign, n


# ---------------------------------------------------------------------------------------------
# The commands. Each is a generator: (process, args) -> yields output bytes, returns status.


def _sh_echo(proc, args):
    """bash's `echo`: -n (no newline), -e (backslash escapes), -E."""
    newline, escapes = True, False
    while args and re.fullmatch(r"-[neE]+", args[0]):
        for c in args.pop(0)[1:]:
            if c == "n":
                newline = False
            else:
                escapes = c == "e"
    text = " ".join(args)
    if escapes:
        out, i = [], 0
        while i < len(text):
            c = text[i]
            if c != "\\" or i + 1 == len(text):
                out.append(c)
                i += 1
                continue
            e = text[i + 1]
            simple = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n",
                      "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
            if e in simple:
                out.append(simple[e])
                i += 2
            elif e == "c":
                newline = False
                break
            elif e == "0":
                m = re.match(r"[0-7]{0,3}", text[i + 2:])
                out.append(chr(int(m.group(0) or "0", 8)))
                i += 2 + m.end()
            elif e == "x" and re.match(r"[0-9A-Fa-f]", text[i + 2:i + 3]):
                m = re.match(r"[0-9A-Fa-f]{1,2}", text[i + 2:])
                out.append(chr(int(m.group(0), 16)))
                i += 2 + m.end()
            elif e in "uU" and re.match(r"[0-9A-Fa-f]", text[i + 2:i + 3]):
                m = re.match(r"[0-9A-Fa-f]{1,%d}" % (4 if e == "u" else 8), text[i + 2:])
                out.append(chr(int(m.group(0), 16)))
                i += 2 + m.end()
            else:
                out.append(c)
                i += 1
        text = "".join(out)
    yield (text + ("\n" if newline else "")).encode("utf-8", "surrogateescape")
    return 0


def _sh_pwd(proc, args):
    _sh_getopt("pwd", args, flags="LP")
    yield (os.getcwd() + "\n").encode("utf-8", "surrogateescape")
    return 0


def _sh_true(proc, args):
    return 0
    yield


def _sh_false(proc, args):
    return 1
    yield


def _sh_cd(proc, args):
    """`cd DIR` for the rest of the command line (a `!` line runs in a subshell, as in
    IPython; `%cd` changes the notebook's folder)."""
    target = args[0] if args else os.environ.get("HOME", "/tmp/home")
    try:
        os.chdir(target)
    except OSError as e:
        proc.argv[0] = "sh: cd"
        proc.err(f"{target}: {_sh_strerror(e)}")
        return 1
    return 0
    yield


def _sh_cat(proc, args):
    """cat [-nbsETA] [FILE...]"""
    options, operands = _sh_getopt(
        "cat", args, flags="nbsETAuv",
        long_flags={"number": "n", "number-nonblank": "b", "squeeze-blank": "s",
                    "show-ends": "E", "show-tabs": "T", "show-all": "A",
                    "show-nonprinting": "v"})
    opts = {o for o, _ in options}
    if "A" in opts:
        opts |= {"v", "E", "T"}
    plain = not (opts & {"n", "b", "s", "E", "T", "v"})
    proc.failed = False
    number, blank_run = 0, 0
    for name, chunks, _ in _sh_inputs(
            proc, operands, lambda n, e: f"{n}: {_sh_strerror(e)}"):
        try:
            if plain:
                for chunk in chunks:
                    yield chunk
                continue
            for line in _sh_lines(chunks):
                body = line[:-1] if line.endswith(b"\n") else line
                end = b"\n" if line.endswith(b"\n") else b""
                if not body and end:
                    blank_run += 1
                    if "s" in opts and blank_run > 1:
                        continue
                else:
                    blank_run = 0
                if "v" in opts:
                    body = _sh_nonprinting(body, "T" in opts)
                elif "T" in opts:
                    body = body.replace(b"\t", b"^I")
                if "E" in opts and end:
                    body += b"$"
                if "b" in opts and body or "n" in opts and "b" not in opts:
                    number += 1
                    body = b"%6d\t" % number + body
                yield body + end
        except OSError as e:
            proc.err(f"{name}: {_sh_strerror(e)}")
            proc.failed = True
    return 1 if proc.failed else 0


def _sh_nonprinting(data, tabs):
    out = bytearray()
    for b in data:
        if b >= 128:
            out += b"M-"
            b -= 128
        if b == 9 and not tabs:
            out.append(b)
        elif b < 32:
            out += b"^" + bytes([b + 64])
        elif b == 127:
            out += b"^?"
        else:
            out.append(b)
    return bytes(out)


def _sh_head_tail(proc, args, prog):
    options, operands = _sh_getopt(
        prog, args, flags="qvzf" if prog == "tail" else "qvz", valued="nc", digits=True,
        long_flags={"quiet": "q", "silent": "q", "verbose": "v", "follow": "f"},
        long_valued={"lines": "n", "bytes": "c"})
    unit, count, sign, headers = "n", "10", "", None
    for o, v in options:
        if o in "nc":
            unit, count = o, v
        elif o == "q":
            headers = False
        elif o == "v":
            headers = True
        elif o == "f":
            raise _UsageError("tail -f follows a file for ever, which a cell cannot do; "
                              "run tail without -f")
    if prog == "tail" and len(operands) > 1 and any(
            re.fullmatch(r"-\d+", a) for a in args if a not in operands):
        digits = next(a for a in args if re.fullmatch(r"-\d+", a))[1:]
        raise _ShUsage(f"option used in invalid context -- {digits[0]}")
    sign, n = _sh_count(count, "lines" if unit == "n" else "bytes", prog)
    if headers is None:
        headers = len(operands) > 1
    proc.failed = False
    first = True
    for name, chunks, f in _sh_inputs(
            proc, operands, lambda n, e: f"cannot open {_sh_quote(n)} for reading: "
                                         f"{_sh_strerror(e)}"):
        try:
            if headers:
                shown = "standard input" if name == "-" else name
                yield (("" if first else "\n") + f"==> {shown} <==\n").encode(
                    "utf-8", "surrogateescape")
            first = False
            if prog == "head":
                yield from _sh_head_body(chunks, unit, sign, n)
            else:
                yield from _sh_tail_body(chunks, f, unit, sign, n)
        except OSError as e:
            proc.err(f"error reading {_sh_quote(name)}: {_sh_strerror(e)}")
            proc.failed = True
    return 1 if proc.failed else 0


def _sh_head_body(chunks, unit, sign, n):
    if unit == "c":
        if sign == "-":
            held = b""
            for chunk in chunks:
                held += chunk
                if len(held) > n:
                    yield held[:len(held) - n]
                    held = held[len(held) - n:]
            return
        for chunk in chunks:
            if n <= 0:
                return
            yield chunk[:n]
            n -= len(chunk)
        return
    if sign == "-":
        held = _sh_collections.deque()
        for line in _sh_lines(chunks):
            held.append(line)
            if len(held) > n:
                yield held.popleft()
        return
    if n <= 0:
        return
    for line in _sh_lines(chunks):
        yield line
        n -= 1
        if n <= 0:
            return


def _sh_tail_body(chunks, f, unit, sign, n):
    if sign == "+":
        skip = max(n - 1, 0)
        if unit == "c":
            for chunk in chunks:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                yield chunk[skip:]
                skip = 0
            return
        for line in _sh_lines(chunks):
            if skip:
                skip -= 1
                continue
            yield line
        return
    if n == 0:
        return
    seekable = f is not None and _sh_stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    if unit == "c":
        if seekable:
            size = f.seek(0, 2)
            f.seek(max(size - n, 0))
            yield from _sh_read_chunks(f)
            return
        held = b""
        for chunk in chunks:
            held = (held + chunk)[-n:]
        yield held
        return
    if seekable:
        # From the end backwards, until more than n newlines are in hand.
        pos = f.seek(0, 2)
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(_SH_CHUNK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
        lines = list(_sh_lines([data]))
        yield b"".join(lines[-n:])
        return
    held = _sh_collections.deque(maxlen=n)
    for line in _sh_lines(chunks):
        held.append(line)
    yield b"".join(held)


def _sh_head(proc, args):
    """head [-n [-]N | -N | -c [-]N] [-qv] [FILE...]"""
    return (yield from _sh_head_tail(proc, args, "head"))


def _sh_tail(proc, args):
    """tail [-n [+]N | -N | -c [+]N] [-qv] [FILE...]"""
    return (yield from _sh_head_tail(proc, args, "tail"))


def _sh_wc(proc, args):
    """wc [-lwcmL] [FILE...], with GNU's column widths."""
    options, operands = _sh_getopt(
        "wc", args, flags="lwcmL",
        long_flags={"lines": "l", "words": "w", "bytes": "c", "chars": "m",
                    "max-line-length": "L"})
    want = [o for o in "lwmcL" if o in {o for o, _ in options}] or ["l", "w", "c"]
    names = operands or [None]
    # The width: 1 for one count of one input; else the digits of the regular files' total
    # size, at least 7 if any input is not a regular file (GNU's compute_number_width).
    width = 1
    if not (len(names) == 1 and len(want) == 1):
        minimum, total = 1, 0
        for name in names:
            try:
                if name in (None, "-"):
                    if not isinstance(proc.stdin, _ShFileStream):
                        raise _ShNotRegular()
                    st = proc.stdin.st
                else:
                    st = os.stat(name)
                if _sh_stat.S_ISREG(st.st_mode):
                    total += st.st_size
                else:
                    minimum = 7
            except _ShNotRegular:
                minimum = 7
            except OSError:
                pass
        width = max(len(str(total)), minimum)
    totals = dict.fromkeys("lwmcL", 0)
    failed = False

    def line(counts, name):
        text = " ".join(f"{counts[o]:>{width}}" for o in want)
        return (text + (f" {name}" if name is not None else "") + "\n").encode(
            "utf-8", "surrogateescape")

    for name in names:
        counts = dict.fromkeys("lwmcL", 0)
        try:
            if name in (None, "-"):
                chunks = proc.stdin
                f = None
            else:
                if os.path.isdir(name):
                    raise IsADirectoryError(_sh_errno.EISDIR, "Is a directory")
                f = open(name, "rb")
                chunks = _sh_read_chunks(f)
            try:
                in_word, line_len = False, 0
                for chunk in chunks:
                    counts["c"] += len(chunk)
                    counts["l"] += chunk.count(b"\n")
                    if "w" in want:
                        # Words are runs of printable characters between white space;
                        # control characters neither make nor break them.
                        text = chunk.translate(None, _SH_CONTROL)
                        words = len(text.split())
                        if in_word and text[:1] and not text[:1].isspace():
                            words -= 1
                        counts["w"] += words
                        if text:
                            in_word = not text[-1:].isspace()
                    if "m" in want or "L" in want:
                        counts["m"] += len(chunk) - sum(chunk.count(bytes([b]))
                                                        for b in range(0x80, 0xC0))
                    if "L" in want:
                        line_len, longest = _sh_line_widths(chunk, line_len)
                        counts["L"] = max(counts["L"], longest)
            finally:
                if f is not None:
                    f.close()
        except OSError as e:
            proc.err(f"{name}: {_sh_strerror(e)}")
            failed = True
            if isinstance(e, IsADirectoryError):
                yield line(counts, name)
            continue
        for o in "lwmc":
            totals[o] += counts[o]
        totals["L"] = max(totals["L"], counts["L"])
        yield line(counts, name)
    if len(names) > 1:
        yield line(totals, "total")
    return 1 if failed else 0


_SH_CONTROL = bytes(b for b in range(32) if b not in b" \t\n\r\v\f") + b"\x7f"


class _ShNotRegular(Exception):
    pass


def _sh_line_widths(chunk, current):
    """(the width of the line still open at the chunk's end, the longest line ended or open
    in it), tabs to 8 columns, wide characters 2."""
    import unicodedata
    longest = current
    for c in chunk.decode("utf-8", "replace"):
        if c in "\n\r\f":
            current = 0
        elif c == "\t":
            current += 8 - current % 8
        elif c.isprintable():
            current += 2 if unicodedata.east_asian_width(c) in "WF" else 1
        longest = max(longest, current)
    return current, longest


def _sh_mkdir(proc, args):
    """mkdir [-pv] [-m MODE] DIR..."""
    options, operands = _sh_getopt("mkdir", args, flags="pv", valued="m",
                                   long_flags={"parents": "p", "verbose": "v"},
                                   long_valued={"mode": "m"})
    opts = {o for o, _ in options}
    if not operands:
        raise _ShUsage("missing operand\nTry 'mkdir --help' for more information.")
    failed = False
    for name in operands:
        try:
            if "p" in opts:
                parts, path = [], name
                while path and not os.path.isdir(path):
                    parts.append(path)
                    head = os.path.dirname(path.rstrip("/"))
                    if head == path:
                        break
                    path = head
                for path in reversed(parts):
                    os.mkdir(path)
                    if "v" in opts:
                        yield f"mkdir: created directory {_sh_quote(path)}\n".encode(
                            "utf-8", "surrogateescape")
            else:
                os.mkdir(name)
                if "v" in opts:
                    yield f"mkdir: created directory {_sh_quote(name)}\n".encode(
                        "utf-8", "surrogateescape")
        except OSError as e:
            proc.err(f"cannot create directory {_sh_lquote(name)}: {_sh_strerror(e)}")
            failed = True
    return 1 if failed else 0


def _sh_rmdir(proc, args):
    """rmdir [-pv] DIR..."""
    options, operands = _sh_getopt("rmdir", args, flags="pv",
                                   long_flags={"parents": "p", "verbose": "v"})
    opts = {o for o, _ in options}
    if not operands:
        raise _ShUsage("missing operand\nTry 'rmdir --help' for more information.")
    failed = False
    for name in operands:
        path = name
        while True:
            try:
                if "v" in opts:
                    yield f"rmdir: removing directory, {_sh_quote(path)}\n".encode(
                        "utf-8", "surrogateescape")
                os.rmdir(path)
            except OSError as e:
                proc.err(f"failed to remove {_sh_quote(path)}: {_sh_strerror(e)}")
                failed = True
                break
            path = os.path.dirname(path.rstrip("/"))
            if "p" not in opts or not path or path in ("/", "."):
                break
    return 1 if failed else 0


def _sh_touch(proc, args):
    """touch [-c] FILE..."""
    options, operands = _sh_getopt("touch", args, flags="cam",
                                   long_flags={"no-create": "c"})
    if not operands:
        raise _ShUsage("missing file operand\nTry 'touch --help' for more information.")
    failed = False
    for name in operands:
        try:
            if os.path.exists(name):
                os.utime(name)
            elif ("c", None) not in options:
                open(name, "ab").close()
        except OSError as e:
            proc.err(f"cannot touch {_sh_quote(name)}: {_sh_strerror(e)}")
            failed = True
    return 1 if failed else 0
    yield


def _sh_rm(proc, args):
    """rm [-rfdv] FILE..."""
    options, operands = _sh_getopt(
        "rm", args, flags="rRfdvI",
        long_flags={"recursive": "r", "force": "f", "dir": "d", "verbose": "v",
                    "no-preserve-root": "--no-preserve-root", "preserve-root": "--preserve-root"})
    opts = {o for o, _ in options}
    recursive, force, verbose = bool(opts & {"r", "R"}), "f" in opts, "v" in opts
    if not operands:
        if force:
            return 0
        raise _ShUsage("missing operand\nTry 'rm --help' for more information.")
    failed = False
    out = []

    def remove(path):
        nonlocal failed
        try:
            st = os.lstat(path)
        except OSError as e:
            if not (force and e.errno == _sh_errno.ENOENT):
                proc.err(f"cannot remove {_sh_quote(path)}: {_sh_strerror(e)}")
                failed = True
            return
        if _sh_stat.S_ISDIR(st.st_mode):
            if recursive:
                try:
                    names = sorted(os.listdir(path))
                except OSError as e:
                    proc.err(f"cannot remove {_sh_quote(path)}: {_sh_strerror(e)}")
                    failed = True
                    return
                for entry in names:
                    remove(os.path.join(path, entry))
            elif "d" not in opts:
                proc.err(f"cannot remove {_sh_quote(path)}: Is a directory")
                failed = True
                return
            try:
                os.rmdir(path)
            except OSError as e:
                proc.err(f"cannot remove {_sh_quote(path)}: {_sh_strerror(e)}")
                failed = True
                return
            if verbose:
                out.append(f"removed directory {_sh_quote(path)}\n")
        else:
            try:
                os.unlink(path)
            except OSError as e:
                proc.err(f"cannot remove {_sh_quote(path)}: {_sh_strerror(e)}")
                failed = True
                return
            if verbose:
                out.append(f"removed {_sh_quote(path)}\n")

    for name in operands:
        base = os.path.basename(name.rstrip("/"))
        if recursive and os.path.abspath(name) == "/" and "--no-preserve-root" not in opts:
            proc.err("it is dangerous to operate recursively on '/'")
            proc.err("use --no-preserve-root to override this failsafe")
            failed = True
            continue
        if base in (".", ".."):
            proc.err(f"refusing to remove '.' or '..' directory: skipping {_sh_quote(name)}")
            failed = True
            continue
        remove(name)
        while out:
            yield out.pop(0).encode("utf-8", "surrogateescape")
    return 1 if failed else 0


def _sh_cp_mv(proc, args, prog):
    if prog == "cp":
        options, operands = _sh_getopt(
            "cp", args, flags="rRapvnfT", valued="t",
            long_flags={"recursive": "r", "archive": "a", "verbose": "v",
                        "no-clobber": "n", "force": "f", "no-target-directory": "T",
                        "preserve": "p"},
            long_valued={"target-directory": "t"})
    else:
        options, operands = _sh_getopt(
            "mv", args, flags="vnfT", valued="t",
            long_flags={"verbose": "v", "no-clobber": "n", "force": "f",
                        "no-target-directory": "T"},
            long_valued={"target-directory": "t"})
    opts = {o for o, _ in options}
    target_dir = next((v for o, v in options if o == "t"), None)
    recursive = bool(opts & {"r", "R", "a"})
    keep_times = bool(opts & {"a", "p"})
    if target_dir is None:
        if not operands:
            raise _ShUsage(f"missing file operand\nTry '{prog} --help' for more information.")
        if len(operands) == 1:
            raise _ShUsage(f"missing destination file operand after {_sh_quote(operands[0])}"
                           f"\nTry '{prog} --help' for more information.")
        *sources, dest = operands
    else:
        sources, dest = operands, target_dir
    dest_is_dir = os.path.isdir(dest) and "T" not in opts
    if (len(sources) > 1 or target_dir is not None) and not dest_is_dir:
        if not os.path.exists(dest):
            proc.err(f"target {_sh_quote(dest)}: No such file or directory")
        else:
            proc.err(f"target {_sh_quote(dest)} is not a directory")
        return 1
    failed = False
    import shutil
    for src in sources:
        target = os.path.join(dest, os.path.basename(src.rstrip("/"))) if dest_is_dir else dest
        try:
            st = os.lstat(src)
        except OSError as e:
            proc.err(f"cannot stat {_sh_quote(src)}: {_sh_strerror(e)}")
            failed = True
            continue
        is_dir = _sh_stat.S_ISDIR(st.st_mode)
        if os.path.exists(target) and os.path.samefile(src, target):
            proc.err(f"{_sh_quote(src)} and {_sh_quote(target)} are the same file")
            failed = True
            continue
        if is_dir:
            inside = os.path.abspath(target) + "/"
            if inside.startswith(os.path.abspath(src).rstrip("/") + "/"):
                if prog == "cp":
                    proc.err(f"cannot copy a directory, {_sh_quote(src)}, into itself, "
                             f"{_sh_quote(target)}")
                else:
                    proc.err(f"cannot move {_sh_quote(src)} to a subdirectory of itself, "
                             f"{_sh_quote(target)}")
                failed = True
                continue
        if "n" in opts and os.path.lexists(target):
            continue
        try:
            if prog == "mv":
                if os.path.isdir(target) and not is_dir:
                    proc.err(f"cannot overwrite directory {_sh_quote(target)} with "
                             f"non-directory")
                    failed = True
                    continue
                shutil.move(src, target)
                if "v" in opts:
                    yield f"renamed {_sh_quote(src)} -> {_sh_quote(target)}\n".encode(
                        "utf-8", "surrogateescape")
                continue
            if is_dir:
                if not recursive:
                    proc.err(f"-r not specified; omitting directory {_sh_quote(src)}")
                    failed = True
                    continue
                for line in _sh_copy_tree(src, target, keep_times, "v" in opts):
                    yield line
                continue
            if "v" in opts:
                yield f"{_sh_quote(src)} -> {_sh_quote(target)}\n".encode(
                    "utf-8", "surrogateescape")
            (shutil.copy2 if keep_times else shutil.copyfile)(src, target)
        except OSError as e:
            what = getattr(e, "filename", None) or target
            verb = "cannot create regular file" if prog == "cp" else "cannot move"
            proc.err(f"{verb} {_sh_quote(str(what))}: {_sh_strerror(e)}")
            failed = True
    return 1 if failed else 0


def _sh_copy_tree(src, target, keep_times, verbose):
    import shutil
    if verbose:
        yield f"{_sh_quote(src)} -> {_sh_quote(target)}\n".encode("utf-8", "surrogateescape")
    if not os.path.isdir(target):
        os.mkdir(target)
    for entry in sorted(os.listdir(src)):
        s, t = os.path.join(src, entry), os.path.join(target, entry)
        if os.path.isdir(s) and not os.path.islink(s):
            yield from _sh_copy_tree(s, t, keep_times, verbose)
        else:
            if verbose:
                yield f"{_sh_quote(s)} -> {_sh_quote(t)}\n".encode("utf-8", "surrogateescape")
            (shutil.copy2 if keep_times else shutil.copyfile)(s, t)
    if keep_times:
        shutil.copystat(src, target)


def _sh_cp(proc, args):
    """cp [-rapvnfT] [-t DIR] SOURCE... DEST"""
    return (yield from _sh_cp_mv(proc, args, "cp"))


def _sh_mv(proc, args):
    """mv [-vnfT] [-t DIR] SOURCE... DEST"""
    return (yield from _sh_cp_mv(proc, args, "mv"))


# ---------------------------------------------------------------------------------------------
# ls


_SH_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _sh_human(n):
    """GNU's `-h` size: bytes below 1024, else K, M, G, ... rounded up, with one decimal
    below 10."""
    if n < 1024:
        return str(n)
    units, power = "KMGTPEZY", 1
    while n >= 1024 ** (power + 1) and power < len(units):
        power += 1
    base = 1024 ** power
    tenths = -(-n * 10 // base)
    if tenths < 100:
        return f"{tenths // 10}.{tenths % 10}{units[power - 1]}"
    whole = -(-n // base)
    if whole >= 1024 and power < len(units):
        return f"1.0{units[power]}"
    return f"{whole}{units[power - 1]}"


class _ShEntry:
    """A file as ls shows it."""

    def __init__(self, name, path, st, target=None):
        self.name, self.path, self.st, self.target = name, path, st, target

    @property
    def is_dir(self):
        return _sh_stat.S_ISDIR(self.st.st_mode)


def _sh_blocks(st):
    """1 KiB blocks the file takes: `st_blocks` where the platform has it; WASI's stat has no
    block count, so there it is the size in the 4 KiB blocks of ext4 and tmpfs (a folder whose
    size is no multiple of 4 KiB is a tmpfs one, which takes none)."""
    if sys.platform != "wasi":
        return -(-getattr(st, "st_blocks", 0) // 2)
    if _sh_stat.S_ISLNK(st.st_mode):
        return 0
    if _sh_stat.S_ISDIR(st.st_mode) and st.st_size % 4096:
        return 0
    return -(-st.st_size // 4096) * 4


def _sh_mode(st):
    mode = st.st_mode
    kind = ("d" if _sh_stat.S_ISDIR(mode) else "l" if _sh_stat.S_ISLNK(mode)
            else "p" if _sh_stat.S_ISFIFO(mode) else "s" if _sh_stat.S_ISSOCK(mode)
            else "c" if _sh_stat.S_ISCHR(mode) else "b" if _sh_stat.S_ISBLK(mode) else "-")
    perms = mode & 0o7777
    if perms == 0:
        # WASI's stat carries no permission bits: what the guest can do with them.
        perms = 0o777 if kind == "l" else 0o755 if kind == "d" else 0o644
    return kind + _sh_stat.filemode(perms)[1:]


def _sh_time(mtime, now):
    t = time.gmtime(mtime)
    month, day = _SH_MONTHS[t.tm_mon - 1], f"{t.tm_mday:>2}"
    six_months = 31556952 // 2
    if now - six_months < mtime <= now + 1:
        return f"{month} {day} {t.tm_hour:02}:{t.tm_min:02}"
    return f"{month} {day}  {t.tm_year}"


def _sh_ls(proc, args):
    """ls [-aAlh1CFdtSrRsgonpU] [FILE...]"""
    options, operands = _sh_getopt(
        "ls", args, flags="aAlh1CFdtSrRsgonpUGx", valued="w",
        long_flags={"all": "a", "almost-all": "A", "human-readable": "h", "classify": "F",
                    "directory": "d", "reverse": "r", "recursive": "R", "size": "s",
                    "numeric-uid-gid": "n", "no-group": "G",
                    "color": "--color", "colour": "--color",
                    "group-directories-first": "--group-directories-first"},
        long_valued={"width": "w", "sort": "--sort"}, status=2)
    opts = set()
    width, sort = _SH_WIDTH, "name"
    layout = "columns" if proc.tty else "lines"
    for o, v in options:
        opts.add(o)
        if o in "lgno":
            layout = "long"
        elif o == "1":
            layout = "lines"
        elif o == "C":
            layout = "columns"
        elif o == "x":
            layout = "across"
        elif o == "w":
            width = int(v) if v.isdigit() else _SH_WIDTH
        elif o == "t":
            sort = "time"
        elif o == "S":
            sort = "size"
        elif o == "U":
            sort = "none"
        elif o == "--sort":
            sort = {"none": "none", "size": "size", "time": "time", "name": "name"}.get(v, "name")
    show_hidden = "all" if "a" in opts else "almost" if "A" in opts else None
    now = time.time()
    status = 0
    files, dirs = [], []
    for name in operands or ["."]:
        try:
            st = os.lstat(name)
            target = os.readlink(name) if _sh_stat.S_ISLNK(st.st_mode) else None
            if target is not None and "d" not in opts and layout != "long":
                try:
                    st = os.stat(name)
                except OSError:
                    pass
        except OSError as e:
            proc.err(f"cannot access {_sh_quote(name)}: {_sh_strerror(e)}")
            status = 2
            continue
        entry = _ShEntry(name, name, st, target)
        if entry.is_dir and "d" not in opts:
            dirs.append(entry)
        else:
            files.append(entry)
    files = _sh_ls_sorted(files, sort, opts)
    dirs = _sh_ls_sorted(dirs, sort, opts)
    first = True
    if files:
        yield from _sh_ls_format(proc, files, opts, layout, width, now, total=False)
        first = False
    headers = bool(files) or len(dirs) > 1 or status != 0 or "R" in opts
    pending = list(dirs)
    while pending:
        d = pending.pop(0)
        try:
            names = os.listdir(d.path)
        except OSError as e:
            proc.err(f"cannot open directory {_sh_quote(d.path)}: {_sh_strerror(e)}")
            status = 2
            continue
        if show_hidden != "all":
            names = [n for n in names if show_hidden == "almost" or not n.startswith(".")]
        entries = []
        for n in names:
            path = os.path.join(d.path, n)
            try:
                st = os.lstat(path)
                target = os.readlink(path) if _sh_stat.S_ISLNK(st.st_mode) else None
            except OSError as e:
                proc.err(f"cannot access {_sh_quote(path)}: {_sh_strerror(e)}")
                status = max(status, 1)
                continue
            entries.append(_ShEntry(n, path, st, target))
        if show_hidden == "all":
            here = os.path.abspath(d.path)
            # WASI cannot go above a preopened folder by `..`: its parent is looked up by name.
            for n, candidates in ((".", (here,)), ("..", (os.path.join(here, ".."),
                                                         os.path.dirname(here), here))):
                for candidate in candidates:
                    try:
                        entries.append(_ShEntry(n, os.path.join(d.path, n), os.stat(candidate)))
                        break
                    except OSError:
                        continue
        entries = _sh_ls_sorted(entries, sort, opts)
        if headers:
            shown = _sh_quote(d.path, always=False) if proc.tty else d.path
            yield (("" if first else "\n") + f"{shown}:\n").encode("utf-8", "surrogateescape")
        first = False
        yield from _sh_ls_format(proc, entries, opts, layout, width, now, total=True)
        if "R" in opts:
            subdirs = [e for e in entries if e.is_dir and e.name not in (".", "..")]
            pending[0:0] = subdirs
    return status


def _sh_ls_sorted(entries, sort, opts):
    key = lambda e: e.name.encode("utf-8", "surrogateescape")
    if sort == "none":
        ordered = list(entries)
    elif sort == "time":
        ordered = sorted(sorted(entries, key=key), key=lambda e: -e.st.st_mtime_ns)
    elif sort == "size":
        ordered = sorted(sorted(entries, key=key), key=lambda e: -e.st.st_size)
    else:
        ordered = sorted(entries, key=key)
    if "r" in opts and sort != "none":
        ordered.reverse()
    if "--group-directories-first" in opts:
        ordered = [e for e in ordered if e.is_dir] + [e for e in ordered if not e.is_dir]
    return ordered


def _sh_ls_indicator(entry, opts):
    if "F" in opts:
        mode = entry.st.st_mode
        if _sh_stat.S_ISDIR(mode):
            return "/"
        if _sh_stat.S_ISLNK(mode):
            return "@"
        if _sh_stat.S_ISFIFO(mode):
            return "|"
        if _sh_stat.S_ISSOCK(mode):
            return "="
        if mode & 0o111 and _sh_stat.S_ISREG(mode):
            return "*"
    elif "p" in opts and entry.is_dir:
        return "/"
    return ""


def _sh_width(text):
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _sh_ls_format(proc, entries, opts, layout, width, now, total):
    """The lines of one listing."""
    tty = proc.tty
    names = [(_sh_quote(e.name, always=False) if tty else e.name) for e in entries]
    # GNU aligns unquoted names with quoted ones (one space for the quote) on a terminal.
    if tty and layout != "lines" and any(n != e.name and n[:1] in "'\"" for n, e in
                                         zip(names, entries)):
        names = [n if n[:1] in "'\"" and n != e.name else " " + n for n, e in zip(names, entries)]
    names = [n + _sh_ls_indicator(e, opts) for n, e in zip(names, entries)]
    sizes = None
    if "s" in opts:
        blocks = [_sh_blocks(e.st) for e in entries]
        sizes = [_sh_human(b * 1024) if "h" in opts else str(b) for b in blocks]
    lines = []
    if total and (layout == "long" or "s" in opts):
        blocks = sum(_sh_blocks(e.st) for e in entries)
        lines.append(f"total {_sh_human(blocks * 1024) if 'h' in opts else blocks}")
    if layout == "long":
        owner = "0" if "n" in opts else "user"
        rows = []
        for e, name in zip(entries, names):
            size = _sh_human(e.st.st_size) if "h" in opts else str(e.st.st_size)
            if e.target is not None:
                if name.endswith("@"):
                    name = name[:-1]
                shown = _sh_quote(e.target, always=False) if tty else e.target
                if "F" in opts and os.path.isdir(os.path.join(os.path.dirname(e.path), e.target)):
                    shown += "/"
                name += f" -> {shown}"
            cols = [_sh_mode(e.st), str(e.st.st_nlink)]
            if "g" not in opts:
                cols.append(owner)
            if "o" not in opts and "G" not in opts:
                cols.append(owner)
            cols += [size, _sh_time(e.st.st_mtime, now), name]
            rows.append(cols)
        if rows:
            n = len(rows[0])
            widths = [max(len(r[i]) for r in rows) for i in range(n)]
            for r in rows:
                parts = [r[0], r[1].rjust(widths[1])]
                k = 2
                while k < n - 3:
                    parts.append(r[k].ljust(widths[k]))
                    k += 1
                parts += [r[n - 3].rjust(widths[n - 3]), r[n - 2], r[n - 1]]
                text = " ".join(parts)
                if sizes is not None:
                    text = sizes[rows.index(r)].rjust(max(map(len, sizes))) + " " + text
                lines.append(text)
    else:
        if sizes is not None:
            w = max(map(len, sizes)) if sizes else 0
            names = [s.rjust(w) + " " + n for s, n in zip(sizes, names)]
        if layout == "lines" or not names:
            lines += names
        else:
            lines += _sh_ls_columns(names, width, across=layout == "across")
    if lines:
        yield ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _sh_ls_columns(names, width, across=False):
    """GNU ls's many-per-line layout: the most columns that fit in `width`, filled down the
    columns (or across), padded with tabs every 8 columns."""
    lengths = [_sh_width(n) for n in names]
    count = len(names)
    best = (1, [max(lengths)])
    max_cols = max(1, min(count, width // 3))
    for cols in range(max_cols, 1, -1):
        rows = -(-count // cols)
        widths = [3] * cols
        for i, length in enumerate(lengths):
            c = i % cols if across else i // rows
            if c >= cols:
                break
            widths[c] = max(widths[c], length + (2 if c != cols - 1 else 0))
        if sum(widths) < width:
            best = (cols, widths)
            break
    cols, widths = best
    rows = -(-count // cols)
    lines = []
    for r in range(rows):
        line, pos, c = [], 0, 0
        indices = (range(r * cols, min((r + 1) * cols, count)) if across
                   else range(r, count, rows))
        indices = list(indices)
        for k, i in enumerate(indices):
            line.append(names[i])
            if k == len(indices) - 1:
                break
            column_width = widths[c] if c < len(widths) else lengths[i] + 2
            start, end = pos + lengths[i], pos + column_width
            # GNU's indent(): tabs while a tab stop lies before the end, then spaces.
            while start < end:
                if end // 8 > (start + 1) // 8:
                    line.append("\t")
                    start += 8 - start % 8
                else:
                    line.append(" ")
                    start += 1
            pos = end
            c += 1
        lines.append("".join(line))
    return lines


_SH_COMMANDS = {
    "cat": _sh_cat, "cd": _sh_cd, "cp": _sh_cp, "echo": _sh_echo, "false": _sh_false,
    "head": _sh_head, "ls": _sh_ls, "mkdir": _sh_mkdir, "mv": _sh_mv, "pwd": _sh_pwd,
    "rm": _sh_rm, "rmdir": _sh_rmdir, "tail": _sh_tail, "touch": _sh_touch, "true": _sh_true,
    "wc": _sh_wc,
}
