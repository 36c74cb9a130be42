"""Run the UDON or task-distillation recipe under `accelerate launch` and record, per rank, the metric values each
training micro-batch adds (before any reduction across processes, with the optimizer step it belongs to) and the
log history.

Usage: accelerate launch ... tests/scripts/metric_ranks.py {udon,task_distill} RECORD_DIR [recipe arguments ...]
"""

import importlib.util
import json
import os
import sys

from hf_distill.recipe_utils import exit_cleanly
from hf_distill.trainers import KDTrainer, UdonTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
name, record_dir, recipe_args = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = importlib.util.spec_from_file_location(
    f"{name}_recipe", os.path.join(HERE, "..", "..", "recipes", f"{name}.py")
)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
trainer_class = {"udon": UdonTrainer, "task_distill": KDTrainer}[name]
calls = []
compute_loss = trainer_class.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    metrics = self._metrics["train"]
    before = {key: len(values) for key, values in metrics.items()}
    step = self.state.global_step
    loss = compute_loss(self, model, inputs, *args, **kwargs)
    if model.training:  # the values this micro-batch added, read on the host (a test may sync)
        added = {key: values[-1].item() for key, values in metrics.items() if len(values) > before.get(key, 0)}
        calls.append({"step": step, "metrics": added})
    return loss


trainer_class.compute_loss = recording_compute_loss
trainer, _ = recipe.main(recipe_args)
rank = trainer.args.process_index
with open(f"{record_dir}/rank{rank}.json", "w") as handle:
    json.dump({"world_size": trainer.args.world_size, "calls": calls, "logs": trainer.state.log_history}, handle)
exit_cleanly(0)
