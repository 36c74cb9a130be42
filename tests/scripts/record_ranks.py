"""Run a recipe under `accelerate launch` and record, per rank, every training batch (its domain, if any, and one
fingerprint per raw image) and the final weights.

Usage: accelerate launch ... tests/scripts/record_ranks.py {unic,udon,task_distill} RECORD_DIR [recipe arguments ...]
"""

import json
import os
import sys

from safetensors.torch import save_file

from hf_distill.recipe_utils import exit_cleanly

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from hf_distill.trainers import KDTrainer, UdonTrainer, UnicTrainer
from tests.conftest import load_recipe  # the one recipe loader of the tests

name, record_dir, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
recipe = load_recipe(name)
trainer_class = {"unic": UnicTrainer, "udon": UdonTrainer, "task_distill": KDTrainer}[name]
batches = []
compute_loss = trainer_class.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    if model.training:  # one fingerprint per raw (pre-augmentation) image: the sum of its uint8 pixels
        fingerprints = inputs["pixel_values"].long().sum(dim=(1, 2, 3)).tolist()
        labels = inputs["labels"].tolist() if "labels" in inputs else None
        batches.append({"domain": inputs.get("domain"), "fingerprints": fingerprints, "labels": labels})
    return compute_loss(self, model, inputs, *args, **kwargs)


trainer_class.compute_loss = recording_compute_loss
trainer = recipe.main(recipe_args)
trainer = trainer[0] if isinstance(trainer, tuple) else trainer  # udon / task_distill also return results
rank = trainer.args.process_index
model = trainer.accelerator.unwrap_model(trainer.model)
save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{record_dir}/rank{rank}.st")
with open(f"{record_dir}/rank{rank}.json", "w") as handle:
    json.dump({"world_size": trainer.args.world_size, "batches": batches}, handle)
exit_cleanly(0)
