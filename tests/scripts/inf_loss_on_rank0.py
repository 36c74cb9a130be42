"""Run the UNIC recipe under `accelerate launch` with an inf loss (whose gradients are finite) on rank 0 only at
optimizer step 1, and record per rank the final student weights and the log history.

Usage: accelerate launch ... tests/scripts/inf_loss_on_rank0.py RECORD_DIR [recipe arguments ...]
"""

import json
import math
import os
import sys

from safetensors.torch import save_file

from hf_distill.recipe_utils import exit_cleanly

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from hf_distill.trainers import unic_trainer
from tests.conftest import load_recipe  # the one recipe loader of the tests

record_dir, recipe_args = sys.argv[1], sys.argv[2:]
recipe = load_recipe("unic")
distillation_loss = unic_trainer.distillation_loss
calls = []


def inf_on_rank0(*args, **kwargs):
    loss, *rest = distillation_loss(*args, **kwargs)
    calls.append(None)
    if os.environ.get("RANK") == "0" and len(calls) == 2:  # the second training step (one micro-batch per step)
        loss = loss + math.inf  # a non-finite loss with finite gradients, on one process only
    return (loss, *rest)


unic_trainer.distillation_loss = inf_on_rank0
trainer = recipe.main(recipe_args)
rank = trainer.args.process_index
weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(record_dir, f"rank{rank}.st"))
with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as handle:
    json.dump(trainer.state.log_history, handle)
exit_cleanly(0)
