"""Import this folder as a package the way ComfyUI imports a custom node: by path, under the folder's name.

The command line (``wan_t2v.py``), the tests and the benchmarks all load the pack with this, so each sees
the pack exactly as ComfyUI does (relative imports, nothing installed). Standard library only; ComfyUI
itself never imports this file.
"""

import importlib
import importlib.util
import os
import sys

PACK_DIR = os.path.dirname(os.path.abspath(__file__))
PACK_NAME = os.path.basename(PACK_DIR)


def load_pack():
    """The pack's top-level module, imported once."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(PACK_DIR, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK_NAME]
            raise
    return sys.modules[PACK_NAME]


def pack_module(name: str):
    """One of the pack's modules, e.g. ``pack_module("pipeline")``."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
