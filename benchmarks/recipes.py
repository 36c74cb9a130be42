"""The recipes as modules, for the evidence commands that run many recipe runs in one process."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_recipe(name: str):
    """`recipes/{name}.py` as a module (recipes are scripts, not a package), loaded once: its `main(argv)` runs one
    run."""
    module_name = f"recipes_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]
