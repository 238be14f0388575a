"""Kernel scripts from the templates shipped in `kit.kernels`: settings filled in, prelude rendered.

A template (``kit/kernels/<name>.py``) holds two blocks, each between a begin and an end line:
``# >>> kit build settings`` .. ``# <<< kit build settings`` becomes ``SETTINGS = {...}`` (the build's
dataset slugs, competition, fold, extra arguments), and ``# >>> kit prelude`` .. ``# <<< kit prelude``
becomes the body of ``kit/kernels/prelude.py`` (everything after its ``from __future__`` line), the
standard-library code both kernels share. The templates are read as package data, so this works from
an installed kit as well as from a checkout.
"""
from __future__ import annotations

import ast
import json
import pprint
from importlib import resources

from kit.errors import KitError

KERNEL_NAMES = ("infer", "train")
SETTINGS_BEGIN = "# >>> kit build settings"
SETTINGS_END = "# <<< kit build settings"
PRELUDE_BEGIN = "# >>> kit prelude"
PRELUDE_END = "# <<< kit prelude"


def template_text(name: str) -> str:
    """The text of template `name` (``infer``, ``train`` or ``prelude``) from the installed package."""
    path = resources.files("kit.kernels") / f"{name}.py"
    if not path.is_file():
        raise KitError(f"kit/kernels/{name}.py: kernel template not found in the installed kit; reinstall it")
    return path.read_text(encoding="utf-8")


def prelude_body() -> str:
    """``kit/kernels/prelude.py`` without its docstring and ``from __future__`` line (a kernel has its own)."""
    text = template_text("prelude")
    tree = ast.parse(text)
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    start = future[-1].end_lineno if future else 0
    return "\n".join(text.splitlines()[start:]).strip("\n") + "\n"


def _fill(text: str, begin: str, end: str, body: str, where: str) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise KitError(f"{where}: no '{begin}' ... '{end}' block to fill")
    line_end = text.index("\n", start) + 1
    return text[:line_end] + body + text[stop:]


def render_kernel(name: str, settings: dict) -> str:
    """The script of kernel `name` (``infer`` or ``train``) with `settings` and the prelude filled in."""
    if name not in KERNEL_NAMES:
        raise KitError(f"no kernel template {name!r}; choose one of {list(KERNEL_NAMES)}")
    where = f"kit/kernels/{name}.py"
    text = template_text(name)
    text = _fill(text, SETTINGS_BEGIN, SETTINGS_END,
                 "SETTINGS = " + pprint.pformat(settings, width=100, sort_dicts=False) + "\n", where)
    return _fill(text, PRELUDE_BEGIN, PRELUDE_END, prelude_body(), where)


def as_notebook(script: str) -> str:
    """A one-cell Jupyter notebook (nbformat 4) running `script` (its ``sys.exit(main())`` becomes ``main()``,
    which Jupyter does not report as an exit)."""
    code = script.replace("if __name__ == \"__main__\":\n    sys.exit(main())", "if __name__ == \"__main__\":\n    main()")
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                   "source": code.splitlines(keepends=True)}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 4,
    }
    return json.dumps(nb, indent=1) + "\n"
