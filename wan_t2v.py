"""Command-line entry: ``python wan_t2v.py --help`` (or ``bash scripts/run.sh``).

Imports this folder as a package the way ComfyUI does (by path, under the
folder's name), then runs ``cli.main``.
"""

from pack_loader import pack_module  # this folder is on sys.path: the script lives in it

if __name__ == "__main__":
    pack_module("cli").main()
