"""`hf-distill RECIPE [OPTIONS]`: run `recipes/<RECIPE>.py` of the source checkout this package is installed from
(`pip install -e .`), exactly as `python recipes/<RECIPE>.py [OPTIONS]` does.

    hf-distill unic --config recipes/configs/unic_tiny.yaml
    hf-distill task-distill --help
    hf-distill export-onnx outputs/unic-tiny
    accelerate launch $(which hf-distill) udon --config recipes/configs/udon_mnist_fashion_small.yaml

The recipes are scripts beside the package, not part of it: a wheel install has none (run them from a checkout).
"""

import os
import runpy
import sys

RECIPES = ("unic", "udon", "task-distill", "synthesize", "evaluate", "prepare-uned", "export-onnx")
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in RECIPES:
        sys.exit(f"usage: hf-distill {{{','.join(RECIPES)}}} [OPTIONS]  (OPTIONS: hf-distill RECIPE --help)")
    path = os.path.join(RECIPES_DIR, argv[0].replace("-", "_") + ".py")
    if not os.path.isfile(path):
        sys.exit(
            f"No recipe {path}: the recipes live in the source checkout. Install it editable (`pip install -e .`) "
            f"or run `python recipes/{argv[0].replace('-', '_')}.py` there."
        )
    sys.argv = [path, *argv[1:]]
    runpy.run_path(path, run_name="__main__")
