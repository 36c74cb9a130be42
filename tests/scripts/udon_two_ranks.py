"""Run recipes/udon.py under `accelerate launch` and record, per rank and step, the batch's domain and its images.

Usage: accelerate launch ... tests/scripts/udon_two_ranks.py RECORD_DIR [recipe arguments ...]
"""

import importlib.util
import json
import os
import sys

from safetensors.torch import save_file

from hf_distill.cli import exit_cleanly
from hf_distill.trainers import UdonTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("udon_recipe", os.path.join(HERE, "..", "..", "recipes", "udon.py"))
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)

record_dir, recipe_args = sys.argv[1], sys.argv[2:]
steps = []
compute_loss = UdonTrainer.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    if model.training:  # one fingerprint per raw (pre-augmentation) image: the sum of its uint8 pixels
        steps.append([inputs["domain"], inputs["pixel_values"].long().sum(dim=(1, 2, 3)).tolist()])
    return compute_loss(self, model, inputs, *args, **kwargs)


UdonTrainer.compute_loss = recording_compute_loss
trainer, _ = recipe.main(recipe_args)
rank = trainer.args.process_index
model = trainer.accelerator.unwrap_model(trainer.model)
save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{record_dir}/rank{rank}.st")
with open(f"{record_dir}/rank{rank}.json", "w") as handle:
    json.dump({"world_size": trainer.args.world_size, "steps": steps}, handle)
exit_cleanly(0)
