"""Run recipes/unic.py under `accelerate launch` and record, per rank, what it trained on and the final weights.

Usage: accelerate launch ... tests/scripts/unic_two_ranks.py RECORD_DIR [recipe arguments ...]
"""

import importlib.util
import json
import os
import sys

from safetensors.torch import save_file

from hf_distill.cli import exit_cleanly
from hf_distill.trainers import UnicTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("unic_recipe", os.path.join(HERE, "..", "..", "recipes", "unic.py"))
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)

record_dir, recipe_args = sys.argv[1], sys.argv[2:]
fingerprints = []
compute_loss = UnicTrainer.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    # one fingerprint per raw (pre-augmentation) image: the sum of its uint8 pixels
    fingerprints.extend(inputs["pixel_values"].long().sum(dim=(1, 2, 3)).tolist())
    return compute_loss(self, model, inputs, *args, **kwargs)


UnicTrainer.compute_loss = recording_compute_loss
trainer = recipe.main(recipe_args)
rank = trainer.args.process_index
student = trainer.accelerator.unwrap_model(trainer.model)
save_file(
    {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, f"{record_dir}/rank{rank}.safetensors"
)
with open(f"{record_dir}/rank{rank}.json", "w") as handle:
    json.dump({"world_size": trainer.args.world_size, "fingerprints": fingerprints}, handle)
exit_cleanly(0)
