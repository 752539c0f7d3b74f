# Packages: `%pip`, `!pip` and `micropip` in the sandbox (handed over on first use; runs in the
# driver's namespace).
#
# The sandbox has no network. Resolution happens here, with the image's own `packaging`, against
# the distributions the image already has (never shadowed or replaced); the gateway answers
# three questions through the door (`packages` op): which files a project has on the configured
# index, a wheel's metadata, and "fetch this file" (downloaded, hash-checked and unpacked by the
# gateway, cached on the host). Then one `install` call puts the whole set into the workspace's
# site folder (read-only here, at _PKG_SITE) and its lock file, or nothing. The gateway names
# files only as the index listed them: nothing here can make it fetch another URL.

_PKG_SITE = "/usr/local/lib/python3.15/site-packages"
# Distributions the sandbox itself stands in for: `IPython` is Sandgate's shell (ipython.py),
# which does what packages that require it (ipywidgets, tqdm.notebook) use.
_PKG_PROVIDED = {"ipython": "Sandgate's IPython-compatible shell"}
_PKG_MAX_REQUIREMENT_FILES = 10


class _PipError(_UsageError):
    """`%pip` could not do what was asked (shown without a traceback, as a UsageError is)."""


_PipError.__name__ = "PipError"
_PipError.__qualname__ = "PipError"


def _pkg_call(call):
    answer = _door({"op": "packages", "call": call})
    if answer.get("interrupted"):
        raise KeyboardInterrupt
    if "error" in answer:
        raise _PipError(answer["error"])
    return answer


def _pkg_canon(name):
    from packaging.utils import canonicalize_name
    return canonicalize_name(name)


def _pkg_image():
    """canonical name -> (name, version) of what the image has."""
    import importlib.metadata as md
    found = {}
    for dist in md.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:
            continue
        if not name:
            continue
        path = str(getattr(dist, "_path", ""))
        if path.startswith(_PKG_SITE):
            continue  # installed by %pip: the gateway's list says which
        found.setdefault(_pkg_canon(name), (name, dist.version))
    return found


def _pkg_installed():
    """canonical name -> the gateway's record of what this workspace installed."""
    return {_pkg_canon(p["name"]): p for p in _pkg_call({"op": "list"})["packages"]}


def _pkg_size(n):
    if n is None:
        return "size unknown"
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def _pkg_pure(tags):
    return any(t.abi == "none" and t.platform == "any" and
               (t.interpreter.startswith("py3") or t.interpreter in ("py2.py3",) or
                t.interpreter.startswith("cp3"))
               for t in tags)


def _pkg_choose(req, files, pre):
    """The best installable wheel for `req` among the index's `files`, or a _PipError that says
    why none is."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
    python = Version("3.15")
    pinned = any(s.operator in ("==", "===") for s in req.specifier)
    best, compiled, sdists, seen = None, {}, set(), set()
    for f in files:
        name = f.get("filename", "")
        if not name.endswith(".whl"):
            if name.endswith((".tar.gz", ".zip", ".tar.bz2")):
                sdists.add(name)
            continue
        try:
            _, version, _, tags = parse_wheel_filename(name)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        seen.add(version)
        if not req.specifier.contains(version, prereleases=pre or None):
            continue
        if f.get("yanked") and not pinned:
            continue
        rp = f.get("requires_python")
        if rp:
            try:
                if not SpecifierSet(rp).contains(python, prereleases=True):
                    continue
            except Exception:
                continue
        if not _pkg_pure(tags):
            compiled.setdefault(version, set()).update(str(t.platform) for t in tags)
            continue
        if best is None or version > best[0]:
            best = (version, f)
    if best is not None:
        return best
    wanted = f"{req.name}{req.specifier}" if str(req.specifier) else req.name
    if compiled:
        version = max(compiled)
        platforms = sorted(compiled[version])
        shown = ", ".join(platforms[:4]) + (", ..." if len(platforms) > 4 else "")
        raise _PipError(
            f"{wanted}: {req.name} {version} has only compiled wheels ({shown}), and none for "
            "WebAssembly (WASI): it needs a compiled extension that this sandbox's Python "
            "cannot load. Nothing was installed.")
    if sdists and not seen:
        raise _PipError(
            f"{wanted}: {req.name} publishes only source distributions; Sandgate installs "
            "wheels only (building a source distribution runs its code). Nothing was installed.")
    if not files:
        raise _PipError(f"{wanted}: the package index has no project named {req.name!r}. "
                        "Nothing was installed.")
    shown = ", ".join(str(v) for v in sorted(seen)[-8:]) or "none"
    raise _PipError(f"{wanted}: no wheel on the index matches (versions with wheels: {shown}; "
                    "this is Python 3.15). Nothing was installed.")


def _pkg_requires(metadata_text):
    """Requires-Dist lines of a METADATA text."""
    import email.parser
    message = email.parser.Parser().parsestr(metadata_text, headersonly=True)
    return message.get_all("Requires-Dist") or []


def _pkg_resolve(reqs, upgrade, deps, pre, say):
    """The plan: canonical name -> {name, version, file}, greedily, first come first chosen (as
    micropip resolves). Raises _PipError on a conflict or a package that cannot be installed."""
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version
    env = default_environment()
    image, installed = _pkg_image(), _pkg_installed()
    top = {_pkg_canon(r.name) for r in reqs}
    plan, queue = {}, [(r, None, ()) for r in reqs]
    while queue:
        req, parent, extras = queue.pop(0)
        if req.marker is not None:
            if not any(req.marker.evaluate({**env, "extra": e}) for e in (extras or ("",))):
                continue
        name = _pkg_canon(req.name)
        why = f" (required by {parent})" if parent else ""
        if name in _PKG_PROVIDED:
            continue
        if name in image:
            have = Version(image[name][1])
            if not req.specifier.contains(have, prereleases=True):
                raise _PipError(
                    f"{req}{why}: the sandbox image has {image[name][0]} {have}, which is part of "
                    "the image and cannot be replaced. Nothing was installed.")
            if parent is None:
                say(f"Requirement already satisfied: {req} (in the sandbox image: "
                    f"{image[name][0]} {have})")
            continue
        if name in plan:
            chosen = plan[name]["version"]
            if not req.specifier.contains(chosen, prereleases=True):
                raise _PipError(f"{req}{why} conflicts with {plan[name]['name']} {chosen}, "
                                "chosen for an earlier requirement. Nothing was installed.")
            new = set(req.extras) - plan[name]["extras"]
            if not new:
                continue
            plan[name]["extras"] |= new
            if deps:
                for line in plan[name]["requires"]:
                    queue.append((Requirement(line), plan[name]["name"], tuple(new)))
            continue
        if name in installed and not (upgrade and name in top):
            have = Version(installed[name]["version"])
            if req.specifier.contains(have, prereleases=True):
                if parent is None:
                    say(f"Requirement already satisfied: {req} ({installed[name]['name']} "
                        f"{have})")
                continue
        files = _pkg_call({"op": "project", "name": req.name})["files"]
        version, f = _pkg_choose(req, files, pre)
        meta = _pkg_call({"op": "metadata", "name": req.name, "filename": f["filename"]})
        requires = _pkg_requires(meta["metadata"])
        for line in requires:
            try:
                Requirement(line)
            except InvalidRequirement as e:
                raise _PipError(f"{f['filename']} declares a requirement that cannot be read "
                                f"({line!r}: {e}). Nothing was installed.") from None
        display = meta.get("name") or req.name
        keep = name in installed and installed[name]["filename"] == f["filename"]
        if keep and parent is None:
            say(f"Requirement already satisfied: {req} ({display} {version})")
        plan[name] = {"name": display, "version": version, "file": f, "requires": requires,
                      "extras": set(req.extras), "keep": keep}
        if deps:
            for line in requires:
                queue.append((Requirement(line), display, tuple(req.extras)))
    return plan, installed


def _pkg_read_requirements(path, depth=0):
    """Requirement strings from a requirements file, as pip reads them (comments, blank lines,
    line continuations, nested `-r`)."""
    if depth >= _PKG_MAX_REQUIREMENT_FILES:
        raise _PipError(f"{path}: requirement files nest more than "
                        f"{_PKG_MAX_REQUIREMENT_FILES} deep")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise _PipError(f"cannot read the requirements file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise _PipError(f"the requirements file {path} is not UTF-8 text") from None
    out = []
    text = text.replace("\\\n", "")
    base = os.path.dirname(path)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        where = f"{path}, line {number}"
        if line.startswith(("-r ", "--requirement ", "-r", "--requirement=")):
            target = line.split("=", 1)[1] if line.startswith("--requirement=") else \
                line[2:].strip() if line.startswith("-r") else line.split(None, 1)[1]
            out += _pkg_read_requirements(os.path.join(base, target.strip()), depth + 1)
            continue
        if line.startswith("-"):
            raise _PipError(f"{where}: {line.split()[0]} is not available in the sandbox "
                            f"{_pkg_option_hint(line.split()[0])}")
        out.append((line, where))
    return out


def _pkg_option_hint(option):
    if option in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
        return ("(the package index is the one the Sandgate operator configured: "
                "`[packages] index` in the gateway's config)")
    if option in ("-e", "--editable"):
        return "(an editable install builds and runs the project's code)"
    if option in ("-c", "--constraint"):
        return "(pin versions in the requirements themselves, e.g. name==1.2)"
    return "(supported: -r FILE, -U/--upgrade, --no-deps, --pre, -q, -y)"


def _pkg_parse_requirements(items):
    from packaging.requirements import InvalidRequirement, Requirement
    reqs = []
    for text, where in items:
        if "://" in text or text.startswith((".", "/")) or text.endswith((".whl", ".tar.gz")):
            raise _PipError(f"{where}: {text!r}: Sandgate installs packages by name from the "
                            "configured index, not from URLs or files")
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise _PipError(f"{where}: {text!r} is not a requirement ({e})") from None
        if req.url:
            raise _PipError(f"{where}: {text!r}: Sandgate installs packages by name from the "
                            "configured index, not from URLs")
        reqs.append(req)
    return reqs


def _pkg_install(specs, files=(), upgrade=False, deps=True, pre=False, quiet=False):
    """Installs requirement strings `specs` (and those of the requirement files `files`)."""
    import importlib
    say = (lambda _text: None) if quiet else print
    items = [(s, "%pip install") for s in specs]
    for path in files:
        items += _pkg_read_requirements(path)
    if not items:
        raise _PipError("%pip install needs a package name or -r FILE "
                        "(e.g. `%pip install humanize`)")
    reqs = _pkg_parse_requirements(items)
    plan, installed = _pkg_resolve(reqs, upgrade, deps, pre, say)
    todo = [p for p in plan.values() if not p["keep"]]
    for p in todo:
        f = p["file"]
        say(f"Collecting {p['name']}=={p['version']}")
        say(f"  Downloading {f['filename']} ({_pkg_size(f.get('size'))})")
        got = _pkg_call({"op": "fetch", "name": p["name"], "filename": f["filename"]})
        if got.get("cached"):
            say("  (from the gateway's cache)")
    if not todo:
        return []
    answer = _pkg_call({"op": "install", "packages": [
        {"name": p["name"], "filename": p["file"]["filename"]} for p in todo],
        "requested": [r.name for r in reqs]})
    importlib.invalidate_caches()
    _pkg_activate()
    for gone in answer.get("replaced", []):
        say(f"  Attempting uninstall: {gone['name']}\n    Found existing installation: "
            f"{gone['name']} {gone['version']}\n    Successfully uninstalled "
            f"{gone['name']}-{gone['version']}")
    names = [f"{p['name']}-{p['version']}" for p in todo]
    say("Successfully installed " + " ".join(names))
    stale = [p["name"] for p in todo
             if _pkg_canon(p["name"]) in installed and _pkg_loaded(p["name"])]
    if stale:
        say("Note: you may need to restart the kernel to use updated packages "
            f"({', '.join(stale)} was already imported).")
    return names


def _pkg_loaded(name):
    top = _pkg_canon(name).replace("-", "_")
    return any(m == top or m.startswith(top + ".") for m in list(sys.modules))


def _pkg_activate():
    """Puts the site folder on sys.path (after the image's, so nothing in it shadows the image),
    with its .pth files, as `site` does."""
    import site
    if os.path.isdir(_PKG_SITE) and _PKG_SITE not in sys.path:
        site.addsitedir(_PKG_SITE)


def _pkg_uninstall(names, quiet=False):
    say = (lambda _text: None) if quiet else print
    if not names:
        raise _PipError("%pip uninstall needs a package name")
    image = _pkg_image()
    for n in names:
        if _pkg_canon(n) in image:
            raise _PipError(f"{n} is part of the sandbox image and cannot be uninstalled")
    answer = _pkg_call({"op": "uninstall", "names": list(names)})
    import importlib
    importlib.invalidate_caches()
    for gone in answer.get("removed", []):
        say(f"Found existing installation: {gone['name']} {gone['version']}\n"
            f"Uninstalling {gone['name']}-{gone['version']}:\n"
            f"  Successfully uninstalled {gone['name']}-{gone['version']}")
    for name in answer.get("not_installed", []):
        say(f"WARNING: Skipping {name} as it is not installed.")
    return answer


def _pkg_all(warn=False):
    """(name, version, where) of every distribution the guest has, sorted by name; with
    `warn`, what the gateway could not restore from the workspace's lock file goes to stderr."""
    rows = {k: (n, v, "image") for k, (n, v) in _pkg_image().items()}
    try:
        answer = _pkg_call({"op": "list"})
    except _PipError:
        answer = {}  # no gateway: the image's list
    for p in answer.get("packages", []):
        rows[_pkg_canon(p["name"])] = (p["name"], p["version"], "workspace")
    if warn:
        for problem in answer.get("problems", []):
            print(f"WARNING: {problem}", file=sys.stderr)
    return sorted(rows.values(), key=lambda r: r[0].lower())


def _pkg_list(args):
    fmt = "columns"
    for a in args:
        if a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        elif a == "--format":
            continue
        elif a in ("json", "freeze", "columns") and fmt == "columns" and "--format" in args:
            fmt = a
        elif a not in ("-l", "--local"):
            raise _PipError(f"%pip list: {a} is not supported (use --format=columns|freeze|json)")
    rows = _pkg_all(warn=True)
    if fmt == "json":
        print(json.dumps([{"name": n, "version": v} for n, v, _ in rows]))
    elif fmt == "freeze":
        print("\n".join(f"{n}=={v}" for n, v, _ in rows))
    elif fmt == "columns":
        w1 = max([len("Package")] + [len(n) for n, _, _ in rows])
        w2 = max([len("Version")] + [len(v) for _, v, _ in rows])
        lines = [f"{'Package':<{w1}} {'Version':<{w2}} Location",
                 f"{'-' * w1} {'-' * w2} {'-' * 9}"]
        lines += [f"{n:<{w1}} {v:<{w2}} {w}" for n, v, w in rows]
        print("\n".join(lines))
    else:
        raise _PipError(f"%pip list: unknown format {fmt!r} (columns, freeze, json)")


def _pkg_show(names):
    import importlib.metadata as md
    if not names:
        raise _PipError("%pip show needs a package name")
    _pkg_activate()
    everything = _pkg_all()
    out, missing = [], []
    for n in names:
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            missing.append(n)
            continue
        meta = dist.metadata
        name = meta["Name"]
        requires = sorted({_pkg_req_name(r) for r in (dist.requires or [])
                           if "extra ==" not in r})
        required_by = sorted(
            other for other, _, _ in everything
            if any(_pkg_canon(_pkg_req_name(r)) == _pkg_canon(name)
                   for r in (_pkg_requires_of(other) or []) if "extra ==" not in r))
        location = _PKG_SITE if str(getattr(dist, "_path", "")).startswith(_PKG_SITE) \
            else "/usr/local/lib/python315.zip (the sandbox image)"
        out.append("\n".join([
            f"Name: {name}", f"Version: {dist.version}", f"Summary: {meta.get('Summary', '')}",
            f"Home-page: {meta.get('Home-page', '')}", f"Author: {meta.get('Author', '')}",
            f"License: {meta.get('License', '')}", f"Location: {location}",
            f"Requires: {', '.join(requires)}", f"Required-by: {', '.join(required_by)}"]))
    if out:
        print("\n---\n".join(out))
    if missing:
        print(f"WARNING: Package(s) not found: {', '.join(missing)}", file=sys.stderr)


def _pkg_req_name(text):
    return re.split(r"[\s;\[<>=!~(]", text.strip(), maxsplit=1)[0]


def _pkg_requires_of(name):
    import importlib.metadata as md
    try:
        return md.requires(name)
    except Exception:
        return None


_PKG_USAGE = ("%pip install [-U] [--no-deps] [--pre] [-q] NAME[SPEC]... | -r FILE; "
              "%pip uninstall [-y] NAME...; %pip list [--format=columns|freeze|json]; "
              "%pip freeze; %pip show NAME...")


def _pip(line):
    """`%pip ...` / `!pip ...`: the subcommands pip has that make sense in the sandbox."""
    import shlex
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise _PipError(f"%pip: {e}") from None
    if not words:
        raise _PipError(f"usage: {_PKG_USAGE}")
    command, rest = words[0], words[1:]
    if command == "install":
        specs, files, flags = [], [], {"upgrade": False, "deps": True, "pre": False,
                                       "quiet": False}
        i = 0
        while i < len(rest):
            a = rest[i]
            if a in ("-r", "--requirement"):
                if i + 1 >= len(rest):
                    raise _PipError(f"%pip install {a} needs a file name")
                files.append(rest[i + 1])
                i += 2
                continue
            if a.startswith("--requirement="):
                files.append(a.split("=", 1)[1])
            elif a.startswith("-r") and len(a) > 2:
                files.append(a[2:])
            elif a in ("-U", "--upgrade"):
                flags["upgrade"] = True
            elif a == "--no-deps":
                flags["deps"] = False
            elif a == "--pre":
                flags["pre"] = True
            elif a in ("-q", "--quiet", "-qq"):
                flags["quiet"] = True
            elif a in ("--user", "--no-cache-dir", "--disable-pip-version-check",
                       "--no-warn-script-location", "--progress-bar=off", "--only-binary=:all:",
                       "--prefer-binary", "-y", "--yes"):
                pass  # what they ask is what happens here anyway
            elif a.startswith("-"):
                raise _PipError(f"%pip install: {a} is not available in the sandbox "
                                f"{_pkg_option_hint(a.split('=')[0])}")
            else:
                specs.append(a)
            i += 1
        _pkg_install(specs, files, **flags)
    elif command == "uninstall":
        names = [a for a in rest if a not in ("-y", "--yes", "-q", "--quiet")]
        bad = [a for a in names if a.startswith("-")]
        if bad:
            raise _PipError(f"%pip uninstall: {bad[0]} is not supported (-y, -q)")
        _pkg_uninstall(names, quiet="-q" in rest or "--quiet" in rest)
    elif command == "list":
        _pkg_list(rest)
    elif command == "freeze":
        _pkg_list(["--format=freeze"])
    elif command == "show":
        _pkg_show([a for a in rest if not a.startswith("-")])
    elif command in ("-V", "--version"):
        print("pip (Sandgate: packages fetched by the gateway, installed into the workspace; "
              "Python 3.15 on WebAssembly)")
    else:
        raise _PipError(f"%pip {command} is not available in the sandbox; {_PKG_USAGE}")


class _PkgDone:
    """What `micropip.install` returns: already done, and awaitable, so code written for
    Pyodide's `await micropip.install(...)` and plain calls both work."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        return self.value
        yield  # a generator: `await` gets `value` at once

    def __repr__(self):
        return "<micropip: done>"


def _pkg_micropip_module():
    """A `micropip` module (Pyodide's installer API) over the gateway."""
    mod = types.ModuleType("micropip", "Sandgate's micropip: packages fetched by the gateway.")

    def install(requirements, keep_going=False, deps=True, credentials=None, pre=False,
                index_urls=None, *, verbose=False, **_ignored):
        if index_urls:
            raise _PipError("micropip.install: index_urls cannot be set in the sandbox "
                            + _pkg_option_hint("--index-url"))
        if isinstance(requirements, str):
            requirements = [requirements]
        return _PkgDone(_pkg_install(list(requirements), deps=deps, pre=pre,
                                     quiet=not verbose))

    def uninstall(packages, *, verbose=False):
        if isinstance(packages, str):
            packages = [packages]
        _pkg_uninstall(list(packages), quiet=not verbose)

    def list_():
        return {n: v for n, v, _ in _pkg_all()}

    mod.install, mod.uninstall, mod.list = install, uninstall, list_
    mod.__version__ = "0.0+sandgate"
    return mod
