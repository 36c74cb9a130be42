"""Run a recipe with every optimizer step slowed down, so that a test can stop it in the middle of training.

Usage: [accelerate launch ...] tests/scripts/slow_steps.py {unic,udon,task_distill} SECONDS [recipe arguments ...]
"""

import importlib.util
import os
import sys
import time

from transformers import TrainerCallback

from hf_distill.recipe_utils import exit_cleanly

HERE = os.path.dirname(os.path.abspath(__file__))
name, seconds, recipe_args = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
spec = importlib.util.spec_from_file_location(
    f"{name}_recipe", os.path.join(HERE, "..", "..", "recipes", f"{name}.py")
)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


class SlowSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(seconds)


recipe.main(recipe_args, callbacks=[SlowSteps()])
exit_cleanly(0)
