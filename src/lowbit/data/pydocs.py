"""A real text from another domain than the bundled Wikipedia: the Python standard library's own
documentation strings (module, class and function docstrings, as `inspect.getdoc` gives them),
from the interpreter running lowbit. Licence: the Python Software Foundation License (the
docstrings are part of CPython's sources).

Two disjoint parts, split by module, so no sentence of the held-out part is in the training part:

    task_text("train")     TRAIN_MODULES (collections, itertools, pathlib, argparse, ...)
    task_text("heldout")   HELDOUT_MODULES (socket, difflib, configparser, enum, ...)

The text depends on the Python version (docstrings change between releases); `text_sha256`
identifies it in results. Used as the fine-tuning task of train/lora.py (QLoRA) and its benchmark.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect

from lowbit.errors import LowbitError

TRAIN_MODULES = ("collections", "itertools", "functools", "pathlib", "json", "re", "argparse", "logging",
                 "subprocess", "threading", "typing", "dataclasses", "string", "textwrap", "datetime",
                 "calendar", "decimal", "fractions", "statistics", "random", "shutil", "tempfile", "zipfile",
                 "tarfile", "csv", "inspect", "ast", "pickle", "copy", "heapq", "bisect", "os", "unittest",
                 "urllib.parse", "http.client", "email.message", "xml.dom.minidom", "sqlite3")
HELDOUT_MODULES = ("socket", "difflib", "configparser", "enum", "contextlib", "pprint", "codecs", "struct",
                   "queue", "sched", "gzip", "hashlib", "uuid", "base64", "mimetypes", "smtplib", "locale",
                   "traceback", "warnings", "weakref", "timeit", "glob", "fnmatch", "operator", "ftplib")


def _docs(modname: str) -> list[str]:
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise LowbitError(f"task text: standard-library module {modname} not importable ({e})") from None
    out = [inspect.getdoc(mod) or ""]
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for mname in sorted(vars(obj)):
                    m = vars(obj)[mname]
                    if not mname.startswith("_") and inspect.isfunction(m):
                        out.append(inspect.getdoc(m) or "")
    return [d.strip() for d in out if d and len(d.strip()) > 40]


def task_text(part: str = "train") -> str:
    """The train or held-out part: docstrings joined by blank lines, modules in the listed order."""
    if part not in ("train", "heldout"):
        raise LowbitError(f"task text part {part!r}: expected 'train' or 'heldout'")
    mods = TRAIN_MODULES if part == "train" else HELDOUT_MODULES
    seen, docs = set(), []
    for m in mods:
        for d in _docs(m):
            if d not in seen:               # a docstring inherited into two modules counts once
                seen.add(d)
                docs.append(d)
    paras = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
    if part == "heldout":                   # drop any paragraph the training part also holds
        train = set(task_text("train").split("\n\n"))
        paras = [p for p in paras if p not in train]
    return "\n\n".join(paras)


def text_sha256(part: str) -> str:
    return hashlib.sha256(task_text(part).encode("utf-8")).hexdigest()
