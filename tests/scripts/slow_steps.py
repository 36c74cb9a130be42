"""Run a recipe with every optimizer step slowed down, so that a test can stop it in the middle of training.

Usage: [accelerate launch ...] tests/scripts/slow_steps.py {unic,udon,task_distill} SECONDS [recipe arguments ...]
"""

import os
import sys
import time

from transformers import TrainerCallback

from hf_distill.recipe_utils import exit_cleanly

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tests.conftest import load_recipe  # the one recipe loader of the tests

name, seconds, recipe_args = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
recipe = load_recipe(name)


class SlowSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(seconds)


recipe.main(recipe_args, callbacks=[SlowSteps()])
exit_cleanly(0)
