"""Path confinement: a name that whoever can reach a ComfyUI server chose may only reach files and folders
under the allowed roots.

Used for model folders and single model files (``loading``, ``model_files``) and for LoRA files (``lora``).
Roots are (as given, resolved) pairs: a symlinked root (a models/ folder on another disk) compares by its
target. '~', '..', absolute paths outside the roots and links out of them are refused, and no error names
a path outside the roots, so the server answers no questions about its disk.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable

MODEL_FOLDERS = "the allowed model folders"


def real_roots(roots: Iterable[str]) -> list[tuple[str, str]]:
    """(as given, resolved) of each root."""
    return [(root, os.path.realpath(root)) for root in roots]


def inside(path: str, real_root: str) -> bool:
    """True when the resolved ``path`` lies under the resolved ``real_root``."""
    return os.path.commonpath([real_root, path]) == real_root


def inside_any(path: str, roots: list[tuple[str, str]]) -> bool:
    return any(inside(path, real_root) for _, real_root in roots)


def has_dotdot(name: str) -> bool:
    return ".." in re.split(r"[/\\]", name)


def confined_path(name: str, roots: list[tuple[str, str]], kind: str, label: str, what: str,
                  no_roots: str, fix: str, *, folders: str = MODEL_FOLDERS,
                  lookup: Callable[[], Iterable[str]] | None = None) -> str | None:
    """Inside ComfyUI: the real path of the ``kind`` ("folder" or "file") under one of ``roots``
    ((given, real) pairs) that ``name`` names, or None when it names none. '~', '..', absolute paths
    outside the roots and links out of them are refused, and the error names no path outside the roots.

    ``label`` (e.g. "model_id") and ``what`` ("model folder name") word the errors, ``folders`` names the
    roots ("the allowed model folders"); ``fix`` says what to do; ``no_roots`` stands for the allowed
    folders when there are none. ``lookup``: paths to try before ``name`` under each root (ComfyUI's own
    ``folder_paths.get_full_path``), called once the name has passed the checks."""
    exists = os.path.isdir if kind == "folder" else os.path.isfile
    allowed = ", ".join(given for given, _ in roots) or no_roots
    if name.startswith("~") or has_dotdot(name):
        raise ValueError(
            f"{label}={name!r}: '~' and '..' may not be used in a {what} on a ComfyUI server; "
            f"name a {kind} under {folders} ({allowed}), or {fix}"
        )
    if os.path.isabs(name):
        real = os.path.realpath(name)
        if inside_any(real, roots) and exists(real):
            return real
        # One message whether or not the path exists, so the server answers no questions about its disk.
        raise ValueError(f"{label}={name!r} is not a {kind} under {folders} ({allowed}): {fix}")
    tried = [(None, path) for path in (lookup() if lookup else ())]
    tried += [(given, os.path.join(real_root, name)) for given, real_root in roots]
    escaped = []
    for given, candidate in tried:
        real = os.path.realpath(candidate)
        if not exists(real):
            continue
        if inside_any(real, roots):
            return real
        escaped.append(given)  # a link out of the roots; say so, but not where it goes
    if escaped:
        under = f" under {escaped[0]}" if escaped[0] else ""
        raise ValueError(
            f"{label}={name!r}{under} is a link to a {kind} outside {folders} ({allowed}): {fix}"
        )
    return None
