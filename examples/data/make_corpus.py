"""Regenerate python_stdlib_docs.txt: docstrings of Python standard-library modules (PSF licence).

Run once with the interpreter whose documentation you want (the shipped file was made with
CPython 3.x on the dev machine); the examples only read the text file, never this script.
    python examples/data/make_corpus.py
"""
from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

MODULES = ["collections", "itertools", "functools", "json", "re", "pathlib", "string", "textwrap",
           "heapq", "bisect", "datetime", "argparse", "dataclasses", "enum", "contextlib",
           "statistics", "fractions", "random", "shutil", "subprocess", "logging", "csv", "abc",
           "copy", "pprint", "operator", "tempfile", "glob", "fnmatch", "difflib", "calendar",
           "queue", "threading", "zipfile", "base64", "hashlib", "shlex", "inspect"]
LIMIT = 240_000   # bytes: ~240 KB, a few epochs of the example's default run


def docs(name: str):
    mod = importlib.import_module(name)
    yield f"Module {name}\n\n{inspect.getdoc(mod) or ''}\n"
    for attr in sorted(getattr(mod, "__all__", None) or [a for a in dir(mod) if not a.startswith("_")]):
        obj = getattr(mod, attr, None)
        if obj is None or getattr(obj, "__module__", name) != name:
            continue
        doc = inspect.getdoc(obj)
        if doc and (inspect.isclass(obj) or inspect.isfunction(obj)):
            yield f"{name}.{attr}\n\n{doc}\n"


def main() -> None:
    out, size = [], 0
    for name in MODULES:
        for chunk in docs(name):
            chunk = chunk.encode("ascii", "replace").decode() + "\n"
            if size + len(chunk) > LIMIT:
                break
            out.append(chunk)
            size += len(chunk)
    path = pathlib.Path(__file__).with_name("python_stdlib_docs.txt")
    path.write_text("".join(out))
    print(f"wrote {path} ({size:,} bytes) from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
