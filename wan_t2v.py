"""Command-line entry: ``python wan_t2v.py --help`` (or ``bash scripts/run.sh``).

Imports this folder as a package the way ComfyUI does (by path, under the
folder's name), then runs ``cli.main``.
"""

import importlib
import importlib.util
import os
import sys


def _load_pack():
    folder = os.path.dirname(os.path.abspath(__file__))
    name = os.path.basename(folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.cli")


if __name__ == "__main__":
    _load_pack().main()
